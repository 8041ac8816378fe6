"""AdamWFp8 on CUDA: allocated memory, exact resume, training (the compiled update: tests/unit/test_compiled.py)."""

from __future__ import annotations

import io
import math

import pytest
import torch
from torch import nn

from fp8train.optim.adamw_fp8 import AdamWFp8
from tests.helpers import adam_grads, adam_params, apply_grads

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

CUDA = torch.device("cuda")
LR, BETAS, WD = 1e-2, (0.9, 0.95), 0.1


def test_allocated_state_is_about_2_bytes_per_param():
    p = nn.Parameter(torch.randn(4096, 4096, device=CUDA))
    p.grad = torch.randn_like(p)
    opt = AdamWFp8([p])
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    opt.step()
    torch.cuda.synchronize()
    per_param = (torch.cuda.memory_allocated() - before) / p.numel()
    assert per_param == pytest.approx(2 + 8 / 128, abs=0.01)  # the step's temporaries are all released
    assert opt.state_bytes() / p.numel() == pytest.approx(2 + 8 / 128, abs=1e-4)


def test_resume_is_bit_identical_on_cuda():
    straight_p = adam_params(CUDA)
    grads = adam_grads(straight_p, steps=10)
    straight = AdamWFp8(straight_p, lr=LR, betas=BETAS, weight_decay=WD)
    apply_grads(straight, straight_p, grads)

    first_p = adam_params(CUDA)
    first = AdamWFp8(first_p, lr=LR, betas=BETAS, weight_decay=WD)
    apply_grads(first, first_p, grads[:5])
    buf = io.BytesIO()
    torch.save({"params": [p.detach() for p in first_p], "optim": first.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf)
    resumed_p = adam_params(CUDA, seed=7)
    with torch.no_grad():
        for p, saved in zip(resumed_p, ckpt["params"]):
            p.copy_(saved)
    resumed = AdamWFp8(resumed_p, lr=LR, betas=BETAS, weight_decay=WD)
    resumed.load_state_dict(ckpt["optim"])
    for p in resumed_p:
        for k, t in resumed.state[p].items():
            assert t.device.type == ("cpu" if k == "step" else "cuda"), k
    apply_grads(resumed, resumed_p, grads[5:])
    for a, b in zip(straight_p, resumed_p):
        assert torch.equal(a, b)


def test_least_squares_tracks_fp32_adamw_on_cuda():
    gen = torch.Generator(device=CUDA).manual_seed(0)
    x = torch.randn(512, 128, device=CUDA, generator=gen)
    w_true = torch.randn(64, 128, device=CUDA, generator=gen) / math.sqrt(128)
    y = x @ w_true.T + 0.1 * torch.randn(512, 64, device=CUDA, generator=gen)
    w0 = 0.02 * torch.randn(64, 128, device=CUDA, generator=gen)
    final = {}
    for name, make in {
        "adamw": lambda p: torch.optim.AdamW(p, lr=LR, betas=BETAS, weight_decay=WD, fused=True),
        "fp8": lambda p: AdamWFp8(p, lr=LR, betas=BETAS, weight_decay=WD),
    }.items():
        w = nn.Parameter(w0.clone())
        opt = make([w])
        for _ in range(200):
            opt.zero_grad()
            (x @ w.T - y).square().mean().backward()
            opt.step()
        final[name] = (w.detach(), (x @ w.T - y).square().mean().item())
    (w32, loss32), (w8, loss8) = final["adamw"], final["fp8"]
    assert ((w8 - w32).norm() / (w32 - w0).norm()).item() < 0.02  # bound argued in tests/unit/test_adamw_fp8.py
    assert loss8 == pytest.approx(loss32, rel=0.02)
