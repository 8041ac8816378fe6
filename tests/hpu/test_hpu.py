"""On a Gaudi: Habana's casts and GEMMs against fp8train's emulation, the fused kernels against the plain model,
and short training runs with both FP8 engines. Skipped elsewhere (tests/hpu/conftest.py)."""

from __future__ import annotations

import pytest
import torch

from fp8train.config import BackendConfig, BackendName, ModelConfig
from fp8train.fp8 import formats
from fp8train.fp8.linear import Fp8Linear
from fp8train.fp8.ops import Fp8Ops
from fp8train.fp8.scaling import ScalingConfig
from fp8train.loggers import read_metrics
from fp8train.model import build_model
from tests.helpers import SMALL, run_train

GAUDI2 = ScalingConfig(recipe="current", profile="gaudi2", pow2=True)


@pytest.fixture(scope="module")
def hpu():
    from fp8train.backends import select

    return select(BackendConfig(name=BackendName.hpu))


def outliers(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g)
    x[:: max(1, n // 7)] *= 300.0
    return x


@pytest.mark.parametrize("fmt", [formats.E4M3, formats.E5M2])
def test_hpu_cast_equals_the_emulated_gaudi2_cast(hpu, fmt):
    x = outliers(1 << 16, 0)
    scale = formats.scale_from_amax(x.abs().amax() / 4, fmt, "gaudi2", pow2=True)  # a scale that saturates
    want = formats.quantize(x, fmt, scale, "gaudi2").float()
    got, _ = hpu.fp8_ops().quantize(x.to(hpu.device), fmt, scale.to(hpu.device), "gaudi2")
    assert torch.equal(got.cpu().float(), want)


def test_hpu_gemm_matches_the_emulated_one(hpu):
    ops, emu = hpu.fp8_ops(), Fp8Ops()
    a, b = outliers(128 * 256, 1).view(128, 256), outliers(64 * 256, 2).view(64, 256)
    sa, sb = (formats.scale_from_amax(t.abs().amax(), formats.E4M3, "gaudi2", pow2=True) for t in (a, b))
    qa, qb = (formats.quantize(t, formats.E4M3, s, "gaudi2") for t, s in ((a, sa), (b, sb)))
    want = emu.scaled_mm(qa, qb, sa, sb, torch.float32)
    got = ops.scaled_mm(qa.to(hpu.device), qb.to(hpu.device), sa.to(hpu.device), sb.to(hpu.device), torch.float32)
    torch.testing.assert_close(got.cpu(), want, rtol=1e-5, atol=1e-5)


def test_hybrid_fp8_linear_on_hpu_matches_the_cpu_emulation(hpu):
    torch.manual_seed(0)
    cpu = Fp8Linear(256, 128, scaling=GAUDI2, hybrid=True)
    dev = Fp8Linear(256, 128, scaling=GAUDI2, hybrid=True, ops=hpu.fp8_ops()).to(hpu.device)
    dev.load_state_dict(cpu.state_dict())
    x = outliers(32 * 256, 3).view(32, 256)
    xc, xd = x.clone().requires_grad_(), x.to(hpu.device).requires_grad_()
    yc, yd = cpu(xc), dev(xd)
    yc.sum().backward()
    yd.sum().backward()
    torch.testing.assert_close(yd.cpu(), yc, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(xd.grad.cpu(), xc.grad, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(dev.weight.grad.cpu(), cpu.weight.grad, rtol=1e-5, atol=1e-4)


def test_fused_kernels_compute_the_plain_model(hpu):
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=512, d_model=128, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=256)
    plain = build_model(cfg).to(hpu.device)
    fused = build_model(cfg).to(hpu.device)
    fused.load_state_dict(plain.state_dict())
    hpu.fuse(fused)
    tokens = torch.randint(0, 512, (2, 64), device=hpu.device)
    with torch.autocast("hpu", dtype=torch.bfloat16):
        torch.testing.assert_close(fused(tokens).float(), plain(tokens).float(), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize(
    "overrides",
    [["precision=bf16"], ["precision=fp8_smooth_gaudi2"], ["precision=fp8_smooth_gaudi2", "precision.engine=te"]],
    ids=["bf16", "fp8-native", "fp8-te"],
)
def test_training_on_hpu_lowers_the_loss_and_resumes(tmp_path, overrides):
    common = [*[o for o in SMALL if o != "backend=cpu"], "backend=hpu", "trainer.max_steps=40", "trainer.eval_every=0"]
    done = run_train(tmp_path, *common, *overrides, "trainer.stop_at=20", "trainer.checkpoint_every=10")
    assert done.returncode == 0, done.stderr[-3000:]
    done = run_train(tmp_path, *common, *overrides, "resume=auto", "trainer.checkpoint_every=10")
    assert done.returncode == 0, done.stderr[-3000:]
    losses = [r["loss"] for r in read_metrics(tmp_path) if "loss" in r]
    assert len(losses) == 40 and all(map(lambda v: v == v, losses))
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.3
