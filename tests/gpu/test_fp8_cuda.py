"""FP8 on CUDA tensor cores (sm_89+): torch._scaled_mm agrees with the emulation, eager and under torch.compile.

Both paths quantize identically (same torch ops), so only the matmul differs: cuBLASLt's fp32 accumulation order
versus the emulation's, and the output rounding. Hence ~1e-2 relative agreement for bf16 outputs.
"""

from __future__ import annotations

import copy

import pytest
import torch

from fp8train.fp8.formats import E4M3, E5M2
from fp8train.fp8.linear import Fp8Linear
from fp8train.fp8.ops import Fp8Ops
from fp8train.fp8.scaling import ScalingConfig, fp8_scalers, step_scalers

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9),
    reason="needs a CUDA GPU with FP8 tensor cores (sm_89+)",
)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def scaled_mm_ops():
    from fp8train.backends.cuda import ScaledMmOps

    return ScaledMmOps()


def test_scaled_mm_matches_emulation_for_every_gemm_of_a_linear():
    torch.manual_seed(0)
    emulated, hw = Fp8Ops(), scaled_mm_ops()
    x, w, g = (
        torch.randn(256, 512, device="cuda"),
        torch.randn(384, 512, device="cuda") * 0.02,
        torch.randn(256, 384, device="cuda") * 1e-3,
    )
    sx, sw, sg = (torch.tensor(448.0 / t.abs().max().item(), device="cuda") for t in (x, w, g))
    qx, _ = emulated.quantize(x, E4M3, sx)
    qw, _ = emulated.quantize(w, E4M3, sw)
    qg, _ = emulated.quantize(g, E5M2, sg)
    for a, b, sa, sb in ((qx, qw, sx, sw), (qg, qw.t(), sg, sw), (qg.t(), qx.t(), sg, sx)):
        for out_dtype in (torch.bfloat16, torch.float32):
            assert rel(hw.scaled_mm(a, b, sa, sb, out_dtype), emulated.scaled_mm(a, b, sa, sb, out_dtype)) < 1e-2
    with pytest.raises(ValueError, match="E5M2 x E5M2"):
        hw.scaled_mm(qg, qg, sg, sg, torch.bfloat16)


def run(model: torch.nn.Module, steps: int = 3) -> list[torch.Tensor]:
    """A few steps of forward/backward under bf16 autocast; outputs and grads of the last step."""
    g = torch.Generator(device="cuda").manual_seed(1)
    for _ in range(steps):
        for p in model.parameters():
            p.grad = None
        x = torch.randn(8, 64, 256, device="cuda", generator=g, requires_grad=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = model(x)
        y.float().square().mean().backward()
        step_scalers(model)
    return [y.detach(), x.grad, *(p.grad for p in model.parameters())]


@pytest.mark.parametrize("recipe", ["current", "delayed"])
def test_fp8_linear_on_scaled_mm_matches_emulation_eager_and_compiled(recipe):
    torch.manual_seed(0)
    cfg = ScalingConfig(recipe=recipe)
    base = torch.nn.Sequential(
        Fp8Linear(256, 512, bias=True, scaling=cfg, device="cuda"),
        torch.nn.GELU(),
        Fp8Linear(512, 256, scaling=cfg, device="cuda"),
    )
    hw = copy.deepcopy(base)
    for m in hw.modules():
        if isinstance(m, Fp8Linear):
            m.ops = scaled_mm_ops()
    compiled_model = copy.deepcopy(hw)
    reference = run(base)
    for got in (run(hw), run(torch.compile(compiled_model))):
        for a, b in zip(got, reference):
            assert a.dtype == b.dtype and torch.isfinite(a).all()
            assert rel(a, b) < 2e-2
    for a, b in zip(fp8_scalers(compiled_model), fp8_scalers(base)):
        assert rel(a.scale, b.scale) < 1e-2  # the compiled graph updated the scaling state too
