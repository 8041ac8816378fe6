"""Fp8Linear: forward and gradients against float64 references, memory of what backward keeps, autocast,
weight overrides, both recipes under outliers, and a small training run.

Tolerances. Rounding to nearest in a format with m mantissa bits has a relative error of at most u = 2^-(m+1):
2^-4 for E4M3, 2^-3 for E5M2, and an RMS of about u / sqrt(3) for values spread over a binade (0.036, 0.072).
An output element is a dot product of two rounded operands; independent errors add in quadrature, so its
normwise relative error is about sqrt(0.036^2 + 0.036^2) = 0.05 forward (bound used: 0.1) and
sqrt(0.072^2 + 0.036^2) = 0.08 for dX and dW (bound used: 0.2). Against a float64 matmul of the *dequantized*
FP8 operands the emulation is exact up to fp32 accumulation: relative error ~1e-7 (bound used: 1e-6).
"""

from __future__ import annotations

import copy
import logging
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fp8train.backends.base import Backend
from fp8train.fp8.formats import E4M3, E5M2, fp8_dtype, quantize, scale_from_amax
from fp8train.fp8.linear import Fp8Linear
from fp8train.fp8.ops import Fp8Ops
from fp8train.fp8.scaling import ScalingConfig, fp8_scalers, step_scalers

CURRENT = ScalingConfig(recipe="current")
DELAYED = ScalingConfig(recipe="delayed", amax_history_len=4)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def inputs(seed: int, shape=(4, 16, 64), outliers: float = 20.0) -> torch.Tensor:
    """Normal activations with a few planted outliers (outliers x the typical size)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g)
    flat = x.view(-1)
    idx = torch.randint(0, flat.numel(), (5,), generator=g)
    flat[idx] = outliers * torch.sign(torch.randn(5, generator=g))
    return x


def layer(recipe: ScalingConfig = CURRENT, bias: bool = True, seed: int = 0) -> Fp8Linear:
    torch.manual_seed(seed)
    return Fp8Linear(64, 48, bias=bias, scaling=recipe)


def dequantized(x: torch.Tensor, fmt: str) -> torch.Tensor:
    """x as the current-scaling quantizer sees it: Q(x * s) / s in float64."""
    s = scale_from_amax(x.abs().amax(), fmt)
    return quantize(x, fmt, s).double() / s.double()


def test_forward_and_gradients_match_float64_references():
    lin = layer()
    x = inputs(1).requires_grad_()
    g = inputs(2, (4, 16, 48), outliers=10.0)
    y = lin(x)
    y.backward(g)

    x64, w64, b64, g64 = (t.detach().double() for t in (x, lin.weight, lin.bias, g))
    # 1) the real function from unquantized inputs: within FP8 tolerance
    y_ref = x64 @ w64.T + b64
    assert rel(y, y_ref) < 0.1
    assert rel(x.grad, g64 @ w64) < 0.2
    assert rel(lin.weight.grad, g64.flatten(0, 1).T @ x64.flatten(0, 1)) < 0.2
    assert rel(lin.bias.grad, g64.sum((0, 1))) < 1e-6
    # 2) the same products from the dequantized FP8 operands: exact up to fp32 accumulation
    qx, qw, qg = dequantized(x.detach(), E4M3), dequantized(lin.weight.detach(), E4M3), dequantized(g, E5M2)
    assert rel(y, qx @ qw.T + b64) < 1e-6
    assert rel(x.grad, qg @ qw) < 1e-6
    assert rel(lin.weight.grad, qg.flatten(0, 1).T @ qx.flatten(0, 1)) < 1e-6
    # and FP8 really was used: the result differs from the unquantized one by more than fp32 rounding
    assert rel(y, y_ref) > 1e-3


def test_hybrid_backward_runs_e5m2_by_e5m2_from_the_same_assumed_amax():
    """Gaudi2 GEMMs take one format: dX = Q5(g) Q5(W), dW = Q5(g)^T Q5(x); the forward is unchanged."""
    plain, hybrid = layer(), layer()
    hybrid.hybrid = True
    x = inputs(3)
    g = inputs(4, (4, 16, 48), outliers=10.0)
    xs = [x.clone().requires_grad_() for _ in range(2)]
    ys = [lin(xi) for lin, xi in zip((plain, hybrid), xs)]
    for y in ys:
        y.backward(g)
    assert torch.equal(ys[0], ys[1])
    g64 = dequantized(g, E5M2)

    # current scaling: the E4M3 scale of x assumes amax' = 448 / scale, the E5M2 copy is scaled for amax'.
    def as_e5m2(t):
        s4 = scale_from_amax(t.abs().amax(), E4M3)
        s5 = scale_from_amax(448.0 / s4, E5M2)
        return quantize(t, E5M2, s5).double() / s5.double()

    x5, w5 = as_e5m2(x), as_e5m2(hybrid.weight.detach())
    assert rel(xs[1].grad, g64 @ w5) < 1e-6
    assert rel(hybrid.weight.grad, g64.flatten(0, 1).T @ x5.flatten(0, 1)) < 1e-6
    # E5M2 copies are coarser than E4M3 ones, so hybrid gradients are further from the exact ones, but within
    # the E5M2 x E5M2 bound: sqrt(0.072^2 + 0.072^2) ~ 0.1 normwise (0.25 used).
    exact_dx = g.double() @ hybrid.weight.detach().double()
    assert rel(xs[0].grad, exact_dx) < rel(xs[1].grad, exact_dx) < 0.25


def test_from_linear_shares_the_parameters():
    lin = nn.Linear(64, 48)
    opt = torch.optim.SGD(lin.parameters(), lr=0.1)
    fp8 = Fp8Linear.from_linear(lin, scaling=CURRENT)
    assert fp8.weight is lin.weight and fp8.bias is lin.bias
    assert fp8.input_scaler.scale.device == lin.weight.device  # scaling state is real, not on the meta device
    before = lin.weight.detach().clone()
    fp8(torch.randn(8, 64)).sum().backward()
    opt.step()  # the optimizer built on the nn.Linear updates the Fp8Linear
    assert not torch.equal(before, fp8.weight.detach())
    no_bias = Fp8Linear.from_linear(nn.Linear(64, 48, bias=False), scaling=CURRENT)
    assert no_bias.bias is None and no_bias(torch.randn(2, 64)).shape == (2, 48)


@pytest.mark.parametrize("recipe", [CURRENT, DELAYED], ids=["current", "delayed"])
@pytest.mark.parametrize("hybrid", [False, True])
def test_in_scale_gives_the_real_products_with_the_scaled_weight_cast_just_in_time(recipe, hybrid):
    lin = layer(recipe, bias=False)
    lin.hybrid = hybrid
    lin.weight_scaler.scale.fill_(1e-6)  # a stale delayed scale would wreck the result ...
    lin.weight_scaler.scale_ready.fill_(True)
    x = inputs(3)
    x[..., :8] *= 1e-7  # quiet channels, whose columns of W diag(s) flush to zero: dX must not come from those
    s = x.abs().flatten(0, 1).amax(0)  # per-channel Smooth-SwiGLU's s: every channel of x / s has amax 1
    x.requires_grad_()
    g = torch.randn(4, 16, 48)
    y = lin(x / s, in_scale=s)  # = x @ W.T in real arithmetic
    y.backward(g)

    w64, x64, g64 = lin.weight.detach().double(), x.detach().double(), g.double()
    assert rel(y, x64 @ w64.T) < 0.1  # ... but W diag(s) is scaled just-in-time
    bound = 0.25 if hybrid else 0.2  # E5M2 x E5M2 backward (test_hybrid_backward_...)
    assert rel(x.grad, g64 @ w64) < bound
    assert rel(x.grad[..., :8], g64 @ w64[:, :8]) < bound
    assert rel(lin.weight.grad, g64.flatten(0, 1).T @ x64.flatten(0, 1)) < bound


class RecordingOps(Fp8Ops):
    """The emulated ops, noting the output dtype of every GEMM."""

    def __init__(self):
        self.out_dtypes = []

    def scaled_mm(self, a_q, b_q, scale_a, scale_b, out_dtype, fast_accum=False):
        self.out_dtypes.append(out_dtype)
        return super().scaled_mm(a_q, b_q, scale_a, scale_b, out_dtype, fast_accum)


def test_bf16_autocast_gives_bf16_output_and_fp32_parameter_grads():
    lin = layer()
    lin.ops = RecordingOps()
    x = inputs(4).requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = lin(x)
    assert y.dtype == torch.bfloat16
    y.float().square().sum().backward()
    # y and dX come out of their GEMMs in bf16, as autocast's linear gives them (an fp32 dX would double the
    # GEMM's output bytes); dW in the fp32 of the master weight. x's gradient is dX cast to x's fp32.
    assert lin.ops.out_dtypes == [torch.bfloat16, torch.bfloat16, torch.float32]
    assert x.grad.dtype == torch.float32 and torch.equal(x.grad, x.grad.bfloat16().float())
    assert lin.weight.grad.dtype == torch.float32 and lin.bias.grad.dtype == torch.float32
    assert rel(y, x.detach().double() @ lin.weight.detach().double().T + lin.bias.detach().double()) < 0.1
    x_bf16 = inputs(5).bfloat16().requires_grad_()  # a bf16 activation gets a bf16 gradient
    lin(x_bf16).float().sum().backward()
    assert x_bf16.grad.dtype == torch.bfloat16


def test_backward_keeps_only_fp8_copies():
    lin = layer()
    x = torch.randn(4, 128, 64, requires_grad=True)  # fp32 activations: 4 bytes per element
    saved = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append((t.dtype, t.numel() * t.element_size()))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = lin(x)
    y.sum().backward()
    big = [(dtype, nbytes) for dtype, nbytes in saved if nbytes > 8]
    assert {dtype for dtype, _ in big} == {fp8_dtype(E4M3)}
    total = sum(nbytes for _, nbytes in saved)
    assert total == x.numel() + lin.weight.numel() + 2 * 4  # 1 byte per element of x and W, plus two fp32 scales
    assert total / x.numel() < 1.1


@pytest.mark.parametrize("recipe", [CURRENT, DELAYED], ids=["current", "delayed"])
def test_both_recipes_track_the_reference_over_steps(recipe):
    lin = layer(recipe)
    for step, size in enumerate((4.0, 2.0, 1.0, 0.5)):  # the range shrinks: delayed scales stay safe
        x = inputs(10 + step) * size
        y = lin(x)
        y.square().mean().backward()
        step_scalers(lin)
        assert rel(y, x.double() @ lin.weight.detach().double().T + lin.bias.detach().double()) < 0.1
    scales = [s.scale.item() for s in fp8_scalers(lin)]
    assert all(s != 1.0 for s in scales)  # every tensor got a scale from its amax


def track(lin: nn.Module) -> None:
    for s in fp8_scalers(lin):
        s.track_stats = True
        s.pop_stats()


def test_delayed_scaling_saturates_on_a_10x_input_and_the_counters_show_it():
    results = {}
    for name, recipe in (("delayed", DELAYED), ("current", CURRENT)):
        lin = layer(recipe)
        for step in range(5):  # an outlier-free history
            lin(inputs(20 + step, outliers=1.0)).sum().backward()
            step_scalers(lin)
        track(lin)
        x = inputs(30, outliers=1.0) * 10
        y = lin(x)
        stats = lin.input_scaler.pop_stats()
        results[name] = stats
        ref = x.double() @ lin.weight.detach().double().T + lin.bias.detach().double()
        if name == "current":
            assert rel(y, ref) < 0.1
    assert results["delayed"]["saturated_frac"] > 0.1 and results["delayed"]["amax_ratio"] > 5
    assert results["current"]["saturated_frac"] == 0 and results["current"]["amax_ratio"] <= 1.0


@pytest.mark.parametrize("recipe", [CURRENT, DELAYED], ids=["current", "delayed"])
def test_huge_outliers_give_finite_outputs_and_gradients(recipe):
    lin = layer(recipe)
    for step in range(3):
        lin(inputs(40 + step)).sum().backward()
        step_scalers(lin)
    lin.zero_grad()
    x = inputs(50, outliers=1e6).requires_grad_()
    g = inputs(51, (4, 16, 48), outliers=1e6)
    y = lin(x)
    y.backward(g)
    for t in (y, x.grad, lin.weight.grad, lin.bias.grad):
        assert torch.isfinite(t).all()


def test_stochastic_gradient_rounding_is_unbiased_on_average():
    lin = layer(bias=False)
    lin.stochastic_grad = True
    x, g = inputs(60), inputs(61, (4, 16, 48))
    grads = []
    for _ in range(64):
        lin.weight.grad = None
        lin(x).backward(g)
        grads.append(lin.weight.grad.clone())
    exact = g.double().flatten(0, 1).T @ dequantized(x, E4M3).flatten(0, 1)
    single, mean = rel(grads[0], exact), rel(torch.stack(grads).mean(0), exact)
    assert mean < single / 3  # averaging independent roundings shrinks the error like 1/sqrt(n)


def test_fp8_mlp_trains_like_the_fp32_mlp():
    torch.manual_seed(0)
    x = torch.randn(4096, 32)
    teacher = nn.Sequential(nn.Linear(32, 64), nn.Tanh(), nn.Linear(64, 8))
    labels = teacher(x).argmax(-1).detach()
    flip = torch.rand(4096) < 0.2  # label noise: the loss levels off well above zero, where 10% is meaningful
    labels[flip] = torch.randint(0, 8, (int(flip.sum()),))
    base = nn.Sequential(nn.Linear(32, 64, bias=True), nn.GELU(), nn.Linear(64, 8, bias=True))
    losses = {}
    for name in ("fp32", "fp8"):
        model = copy.deepcopy(base)
        if name == "fp8":
            model[0] = Fp8Linear.from_linear(model[0], scaling=DELAYED)
            model[2] = Fp8Linear.from_linear(model[2], scaling=DELAYED)
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        for _ in range(50):
            loss = F.cross_entropy(model(x), labels)
            opt.zero_grad()
            loss.backward()
            opt.step()
            step_scalers(model)
        losses[name] = F.cross_entropy(model(x), labels).item()
    assert losses["fp32"] < 0.6 * math.log(8)  # it learned something (chance: log 8)
    assert losses["fp8"] == pytest.approx(losses["fp32"], rel=0.1), losses


def test_emulated_ops_shapes_dtypes_and_amax():
    ops = Fp8Ops()
    x = torch.randn(32, 16)
    q, amax = ops.quantize(x, E4M3, torch.tensor(4.0))
    assert q.dtype == torch.float8_e4m3fn and amax.dtype == torch.float32 and amax.dim() == 0
    assert amax.item() == x.abs().max().item()
    b, _ = ops.quantize(torch.randn(48, 16), E5M2, torch.tensor(2.0))
    out = ops.scaled_mm(q, b, torch.tensor(4.0), torch.tensor(2.0), torch.bfloat16)
    assert out.shape == (32, 48) and out.dtype == torch.bfloat16
    expected = (q.double() / 4) @ (b.double() / 2).T
    assert rel(out, expected) < 1e-2  # bf16 output


def test_backend_fp8_ops_default_to_emulation(monkeypatch, caplog):
    assert Backend().fp8_ops().name == "emulated"
    from fp8train.backends import cuda

    backend = cuda.CudaBackend.__new__(cuda.CudaBackend)  # no GPU here: skip __post_init__'s set_device
    backend.device = torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert isinstance(backend.fp8_ops(), cuda.ScaledMmOps)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    with caplog.at_level(logging.WARNING, logger="fp8train"):
        ops = backend.fp8_ops()
    assert ops.name == "emulated" and "emulated below sm_89" in caplog.text


@pytest.mark.parametrize("fast_accum", [True, False])
def test_only_the_forward_gemm_asks_for_fast_accumulation(monkeypatch, fast_accum):
    # Hopper's fast FP8 accumulation sums with fewer bits than fp32: acceptable for the forward GEMM (as torchao and
    # NVIDIA TE use it), never for dX and dW, whose long sums go straight into the weights' update.
    from fp8train.backends.cuda import ScaledMmOps

    calls, real = [], torch._scaled_mm

    def recording(a, b, **kw):
        calls.append((tuple(a.shape), tuple(b.shape), kw["use_fast_accum"]))
        return real(a, b, **kw)

    monkeypatch.setattr(torch, "_scaled_mm", recording)
    torch.manual_seed(0)
    lin = Fp8Linear(64, 48, scaling=CURRENT, ops=ScaledMmOps(), fast_accum=fast_accum)
    x = torch.randn(32, 64, requires_grad=True)
    lin(x).square().sum().backward()
    # forward (32, 64) x (64, 48); dX (32, 48) x (48, 64); dW (48, 32) x (32, 64): _scaled_mm's second operand is
    # (K, N), the transpose of scaled_mm's (N, K).
    assert calls == [((32, 64), (64, 48), fast_accum), ((32, 48), (48, 64), False), ((48, 32), (32, 64), False)]


@pytest.mark.parametrize("fast_accum", [True, False])
def test_the_converter_passes_precision_fast_accum_to_every_fp8_linear(fast_accum):
    from fp8train.config import ModelConfig, PrecisionConfig, Recipe
    from fp8train.model import build_model
    from fp8train.precision import convert

    cfg = PrecisionConfig(name="fp8", recipe=Recipe.fp8, fast_accum=fast_accum)
    sizes = ModelConfig(vocab_size=256, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=192)
    model = convert(build_model(sizes), cfg, Backend())
    linears = [m for m in model.modules() if isinstance(m, Fp8Linear)]
    assert linears and all(m.fast_accum is fast_accum for m in linears)
