"""Helpers shared by the tests."""

from __future__ import annotations

import ast
import copy
import inspect
import os
import subprocess
import sys
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent


# Small enough that a 60-step CPU run takes seconds; same shape family as model=tiny (GQA, tied embeddings).
SMALL = [
    "backend=cpu",
    "model.d_model=64",
    "model.n_layers=2",
    "model.n_heads=4",
    "model.n_kv_heads=2",
    "model.ffn_dim=192",
    "data.seq_len=64",
    "trainer.micro_batch_size=8",
    "logger.wandb.mode=disabled",
    "logger.log_every=1",
]


def run_train(run_dir: Path, *overrides: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """python train.py in a subprocess, as a user would run it, with its run dir at run_dir."""
    cmd = [sys.executable, str(ROOT / "train.py"), f"hydra.run.dir={run_dir}", *overrides]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=os.environ.copy())


# AdamWFp8 on every kind of tensor it meets: FP8 blocks, a padded last block, a second shape, a 1-D tensor and a
# small one (fp32 moments), and a bf16 parameter (fp32 master weights).
ADAM_SHAPES = [(1024, 512), (96, 130), (512, 256), (100,)]


def adam_params(device: str | torch.device, seed: int = 0) -> list[nn.Parameter]:
    gen = torch.Generator(device=device).manual_seed(seed)
    params = [nn.Parameter(torch.randn(s, device=device, generator=gen)) for s in ADAM_SHAPES]
    params.append(nn.Parameter(torch.randn(256, 128, device=device, generator=gen).bfloat16()))
    return params


def adam_grads(params: list[nn.Parameter], steps: int, seed: int = 1) -> list[list[torch.Tensor]]:
    """Gradients spanning two decades, with 1e4x outliers, drawn once so that every optimizer sees the same."""
    device = params[0].device
    gen = torch.Generator(device=device).manual_seed(seed)
    out = []
    for _ in range(steps):
        step = []
        for p in params:
            g = torch.randn(p.shape, device=device, generator=gen)
            g = g * 10 ** (-2 * torch.rand(p.shape, device=device, generator=gen))
            g = torch.where(torch.rand(p.shape, device=device, generator=gen) < 0.01, 1e4 * g.sign(), g)
            step.append(g.to(p.dtype))
        out.append(step)
    return out


def apply_grads(opt: torch.optim.Optimizer, params: list[nn.Parameter], grads: list[list[torch.Tensor]]) -> None:
    for step in grads:
        for p, g in zip(params, step):
            p.grad = g.clone()
        opt.step()


def counter_inputs(fmt: str, scale: float, device: str | torch.device = "cpu", seed: int = 0) -> torch.Tensor:
    """bf16 values for the saturated / flushed counters at a given power-of-two scale: ordinary values, some beyond
    the format's range, some far below its smallest subnormal, exact ties at half of it (round to even: 0), values
    just above the tie (round up to the subnormal), and zeros (never counted)."""
    from fp8train.fp8.formats import fp8_max, fp8_min_subnormal

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4096, generator=g) * (fp8_max(fmt) / scale / 8)
    half = fp8_min_subnormal(fmt) / 2 / scale
    x[:32] = fp8_max(fmt) / scale * (1.5 + 10 * torch.rand(32, generator=g))  # beyond max: saturated
    x[32:96] = half * torch.rand(64, generator=g)  # flushed
    x[96:128] = half  # ties: flushed
    x[128:160] = half * 1.5  # rounded up to the smallest subnormal: not flushed
    x[160:176] = 0.0
    sign = torch.where(torch.rand(4096, generator=g) < 0.5, -1.0, 1.0)
    return (x * sign)[torch.randperm(4096, generator=g)].to(torch.bfloat16).to(device)


def counting_scaler(fmt: str, scale: float, device: str | torch.device = "cpu"):
    """A delayed-scaling TensorScaler whose scale is fixed at ``scale``, with its counters on."""
    from fp8train.fp8.scaling import ScalingConfig, TensorScaler

    s = TensorScaler(fmt, ScalingConfig(recipe="delayed"), device=device)
    s.scale.fill_(scale)
    s.scale_ready.fill_(True)
    s.track_stats = True
    return s


def check_counts(s, x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> tuple[int, int]:
    """Assert the scaler's saturated / flushed counters equal a count of the FP8 result itself; returns
    (saturated, flushed)."""
    import pytest

    from fp8train.fp8.formats import fp8_overflow_threshold

    # Saturated: a finite element the clamp to max changed (quantize turns an inf into NaN or inf, never max).
    saturated = (x.isfinite() & ((x.double() * scale.double()).abs() > fp8_overflow_threshold(s.fmt))).sum().item()
    flushed = ((x != 0) & (q.float() == 0)).sum().item()
    stats = s.pop_stats()
    assert stats["saturated_frac"] * x.numel() == pytest.approx(saturated)
    assert stats["underflow_frac"] * x.numel() == pytest.approx(flushed)
    return saturated, flushed


def unshared(m: nn.Module) -> nn.Module:
    """A copy of a converted model in which every linear has an input scaler of its own (as before sharing)."""
    from fp8train.fp8.linear import Fp8Linear

    twin = copy.deepcopy(m)
    for linear in twin.modules():
        if isinstance(linear, Fp8Linear):
            linear.input_scaler = copy.deepcopy(linear.input_scaler)
    return twin


def documented_op(params: str, semantics, calls: list):
    """A callable with exactly the documented parameters (order, names, defaults: ``params`` is the text between a
    documented signature's parentheses); records its bound arguments and returns ``semantics(**arguments)``."""
    args = ast.parse(f"def f({params}): pass").body[0].args
    defaults = [inspect.Parameter.empty] * (len(args.args) - len(args.defaults))
    defaults += [ast.literal_eval(d) for d in args.defaults]
    signature = inspect.Signature(
        [
            inspect.Parameter(a.arg, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=d)
            for a, d in zip(args.args, defaults)
        ]
    )

    def op(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        calls.append(dict(bound.arguments))
        return semantics(**bound.arguments)

    return op


def saved_figures(monkeypatch) -> dict:
    """file name -> matplotlib Figure, for every figure saved from now on in the test (to read its axes)."""
    from matplotlib.figure import Figure

    figures, real = {}, Figure.savefig

    def savefig(fig, path, *args, **kwargs):
        figures[Path(path).name] = fig
        return real(fig, path, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", savefig)
    return figures


def damage_jsonl(path: Path, damage: str, not_objects: str) -> None:
    """Replace a run's JSON-lines file with what a disk error or another tool leaves: ``binary`` bytes, a
    ``directory`` of that name, or ``not_objects`` (JSON lines that are no records) for any other ``damage``."""
    if damage == "binary":
        path.write_bytes(b"\xff\xfe\x00garbage\n")
    elif damage == "directory":
        path.mkdir()
    else:
        path.write_text(not_objects)


def on_two_ranks(target, tmp_path: Path, *args) -> None:
    """``target(rank, init_file, *args)`` in 2 spawned processes, which join a gloo group through ``init_file``
    (under tmp_path); fails the test if a rank hangs (60 s) or dies."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=target, args=(rank, str(tmp_path / "init"), *args)) for rank in (0, 1)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=60)
        if p.is_alive():
            p.kill()
    assert [p.exitcode for p in procs] == [0, 0], "a rank hung or died"
