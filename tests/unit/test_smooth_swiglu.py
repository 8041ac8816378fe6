"""Smooth-SwiGLU: exact in real arithmetic, and it tames the outlier that an aligned SwiGLU neuron amplifies.

The planted mechanism (Fishman et al. 2025): neuron j's up and gate rows are aligned (W_up[j] = W_gate[j] = a w),
and one token's input projects on w m times harder than the batch's typical maximum. Then h_j = silu(a m c) a m c
grows like m^2 in plain SwiGLU; the per-token variant divides the linear branch by its own max, leaving growth
like m; the per-channel variant divides every channel by its max, leaving exactly 1.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

from fp8train.fp8.linear import Fp8Linear
from fp8train.fp8.ops import Fp8Ops, amax_of
from fp8train.fp8.scaling import ScalingConfig, fp8_scalers, step_scalers
from fp8train.model.mlp import SwiGLU
from fp8train.precision.smooth_swiglu import SmoothSwiGLUChannel, SmoothSwiGLUToken, down_proj_input

D, F, B = 256, 1024, 64
ALIGNED = 7  # the planted neuron
VARIANTS = {"none": lambda m: m, "token": SmoothSwiGLUToken, "channel": SmoothSwiGLUChannel}


def planted_mlp(dtype=torch.float64, seed=0) -> tuple[SwiGLU, torch.Tensor]:
    """A SwiGLU with Llama-like random weights and one neuron whose up and gate rows are aligned."""
    g = torch.Generator().manual_seed(seed)
    mlp = SwiGLU(D, F).double()  # drawn in float64 whatever the dtype, so every dtype gets the same weights
    with torch.no_grad():
        for lin in (mlp.gate_proj, mlp.up_proj, mlp.down_proj):
            lin.weight.copy_(torch.randn(lin.weight.shape, generator=g, dtype=torch.float64) * 0.02)
        w = torch.randn(D, generator=g, dtype=torch.float64)
        w /= w.norm()
        row_norm = mlp.up_proj.weight.norm(dim=1).mean()  # as long as any other row
        mlp.gate_proj.weight[ALIGNED] = row_norm * w
        mlp.up_proj.weight[ALIGNED] = row_norm * w
    return mlp.to(dtype), w


def batch(w: torch.Tensor, m: float, seed: int = 1) -> torch.Tensor:
    """B tokens of N(0, 1) inputs; token 0 projects on w m times harder than the batch's typical max (m=0: none)."""
    x = torch.randn(B, D, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    if m:
        typical = (x[1:] @ w).abs().max()
        x[0] += (m * typical - x[0] @ w) * w
    return x


def same_forward_then_backward(mlp, smooth, w) -> tuple[torch.Tensor, torch.Tensor]:
    """Check that ``smooth`` gives ``mlp``'s output in float64 on a batch with an outlier, then back-propagate
    through both; returns the two inputs, whose .grad hold the gradients."""
    x = batch(w, m=8).requires_grad_()
    x2 = x.detach().clone().requires_grad_()
    y, y_smooth = mlp(x), smooth(x2)
    torch.testing.assert_close(y_smooth, y, rtol=1e-12, atol=1e-15)
    y.square().sum().backward()
    y_smooth.square().sum().backward()
    return x, x2


@pytest.mark.parametrize("variant", ["token", "channel"])
def test_variants_equal_plain_swiglu_in_real_arithmetic(variant):
    mlp, w = planted_mlp(torch.float64)
    smooth = VARIANTS[variant](copy.deepcopy(mlp))
    x, x2 = same_forward_then_backward(mlp, smooth, w)
    torch.testing.assert_close(x2.grad, x.grad, rtol=1e-10, atol=1e-14)
    for (name, p), p2 in zip(mlp.named_parameters(), smooth.parameters()):
        torch.testing.assert_close(p2.grad, p.grad, rtol=1e-10, atol=1e-14, msg=name)


class UnroundedOps(Fp8Ops):
    """FP8's scaled arithmetic without its rounding: the quantizer only multiplies by the scale, the matmul runs in
    float64. Fp8Linear's formulas can then be checked in real arithmetic."""

    def quantize(self, x, fmt, scale, profile="ocp", stochastic=False):
        return x.detach().double() * scale.double(), amax_of(x)

    def scaled_mm(self, a_q, b_q, scale_a, scale_b, out_dtype, fast_accum=False):
        return ((a_q @ b_q.t()) / (scale_a.double() * scale_b.double())).to(out_dtype)


def test_channel_over_an_fp8_down_projection_is_plain_swiglu_without_fp8_rounding():
    # The path training takes: Fp8Linear(h / s, in_scale=s) forms W_down diag(s) itself and has a backward of its
    # own (dh from W_down, times s; dW_down times s). Its gradients are multiplied by s in fp32: fp32 rounding.
    mlp, w = planted_mlp(torch.float64)
    smooth = SmoothSwiGLUChannel(copy.deepcopy(mlp))
    scaling = ScalingConfig(recipe="current")
    smooth.down_proj = Fp8Linear.from_linear(smooth.down_proj, scaling=scaling, ops=UnroundedOps())
    x, x2 = same_forward_then_backward(mlp, smooth, w)
    assert ((x2.grad - x.grad).norm() / x.grad.norm()).item() < 1e-6
    for (name, p), p2 in zip(mlp.named_parameters(), smooth.parameters()):
        assert ((p2.grad - p.grad).norm() / p.grad.norm()).item() < 1e-6, name


@pytest.mark.parametrize("variant", ["token", "channel"])
def test_variants_equal_plain_swiglu_to_fp32_rounding(variant):
    mlp, w = planted_mlp(torch.float32)
    smooth = VARIANTS[variant](copy.deepcopy(mlp))
    x = batch(w, m=8)
    ref = planted_mlp(torch.float64)[0](x)
    err_plain = (mlp(x.float()).double() - ref).norm() / ref.norm()
    err_smooth = (smooth(x.float()).double() - ref).norm() / ref.norm()
    assert err_smooth < 1e-6 and err_smooth < 10 * err_plain + 1e-7


def growth(variant: str, ms=(2, 4, 8, 16, 32)) -> list[float]:
    """amax of the down projection's input with an outlier of strength m, over the same batch without it."""
    mlp, w = planted_mlp(torch.float64)
    module = VARIANTS[variant](mlp)
    with torch.no_grad():
        base = down_proj_input(module, batch(w, 0)).abs().max()
        return [(down_proj_input(module, batch(w, m)).abs().max() / base).item() for m in ms]


def loglog_slope(ms, values) -> float:
    lx, ly = [math.log(m) for m in ms], [math.log(v) for v in values]
    mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly)) / sum((a - mx) ** 2 for a in lx)


def test_plain_swiglu_amplifies_the_outlier_quadratically():
    ms = (2, 4, 8, 16, 32)
    g = growth("none", ms)
    assert 1.8 < loglog_slope(ms, g) < 2.2, g
    assert g[-1] > 300


def test_token_smoothing_leaves_linear_growth():
    ms = (2, 4, 8, 16, 32)
    g = growth("token", ms)
    assert 0.85 < loglog_slope(ms, g) < 1.15, g
    assert g[-1] < growth("none", ms)[-1] / 10


def test_channel_smoothing_keeps_amax_at_one():
    mlp, w = planted_mlp(torch.float64)
    module = SmoothSwiGLUChannel(mlp)
    with torch.no_grad():
        for m in (0, 2, 4, 8, 16, 32):
            h = down_proj_input(module, batch(w, m))
            assert h.abs().max().item() == pytest.approx(1.0, abs=1e-12)
            assert torch.all(h.abs().amax(dim=0) <= 1.0 + 1e-12)


def fp8_mlp(variant: str) -> torch.nn.Module:
    """The planted MLP in fp32 with an FP8 down projection under delayed scaling (history 16, max)."""
    mlp, _ = planted_mlp(torch.float32)
    scaling = ScalingConfig(recipe="delayed", amax_history_len=16, amax_compute_algo="max")
    mlp.down_proj = Fp8Linear.from_linear(mlp.down_proj, scaling=scaling)
    module = VARIANTS[variant](mlp)
    for s in fp8_scalers(module):
        s.track_stats = True
    return module


def test_under_delayed_scaling_plain_overflows_worst_and_channel_not_at_all():
    _, w = planted_mlp(torch.float64)
    reference, _ = planted_mlp(torch.float64)
    spike = batch(w, m=16, seed=99)
    results = {}
    for variant in ("none", "token", "channel"):
        module = fp8_mlp(variant)
        with torch.no_grad():
            for step in range(8):  # outlier-free history: the delayed scale settles on ordinary amaxes
                module(batch(w, 0, seed=10 + step).float())
                step_scalers(module)
            for s in fp8_scalers(module):
                s.pop_stats()
            y = module(spike.float()).double()
        stats = module.down_proj.input_scaler.pop_stats()
        ref = reference(spike)
        err = ((y[0] - ref[0]).norm() / ref[0].norm()).item()  # the outlier token's output row
        results[variant] = (stats["saturated_frac"], err, stats["amax_ratio"])
        assert torch.isfinite(y).all()
    (sat_none, err_none, ratio_none), (sat_tok, err_tok, ratio_tok), (sat_ch, err_ch, ratio_ch) = results.values()
    assert sat_none > 0 and ratio_none > 30  # the spike is far above what the history assumed
    assert sat_ch == 0 and ratio_ch <= 1.0 + 1e-6  # channel: the down projection's input never exceeds 1
    # token: the spike grows like m, not m^2 (measured: ~12x vs ~80x at m=16); still above a short history's
    # amax, so a few elements saturate; only channel removes the overflow.
    assert ratio_tok < ratio_none / 4
    assert sat_none > sat_tok > sat_ch, results
    assert err_none > err_tok > err_ch, results
    assert err_none > 0.5 and err_ch < 0.1, results


@pytest.mark.parametrize("quiet", [1e-4, 1e-5, 1e-6])
def test_channel_keeps_the_gradient_of_neurons_much_quieter_than_the_others(quiet):
    # s_j of a neuron whose activations are `quiet` times the others' is as small, and so is column j of
    # W_down * diag(s). Computed from that product, dh_j = (dy . Q(W_down diag(s)))_j / s_j would lose the column to
    # E4M3's underflow (its range is 2^-9..448 against the largest column): a quiet neuron would get no gradient
    # and could never recover. dh = dy . W_down does not depend on s; it must be as exact as with plain SwiGLU.
    rows = slice(100, 164)  # 64 neurons, not the aligned one
    dy = torch.randn(B, D, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    grads = {}
    for variant in ("ref", "none", "channel"):
        mlp, w = planted_mlp(torch.float64 if variant == "ref" else torch.float32)
        with torch.no_grad():
            mlp.up_proj.weight[rows] *= quiet
        if variant != "ref":
            mlp.down_proj = Fp8Linear.from_linear(mlp.down_proj, scaling=ScalingConfig(recipe="current"))
        module = VARIANTS.get(variant, VARIANTS["none"])(mlp)
        x = batch(w, 0, seed=99).to(mlp.up_proj.weight.dtype)
        module(x).backward(dy.to(x.dtype))
        grads[variant] = mlp.up_proj.weight.grad[rows].double()
    err = {v: ((grads[v] - grads["ref"]).norm() / grads["ref"].norm()).item() for v in ("none", "channel")}
    assert err["none"] < 0.1 and err["channel"] < 0.1, err


def hold_weights_as_zero3_does(module: torch.nn.Module) -> None:
    """ZeRO-3's rule for every linear in ``module``: its parameters hold no data outside the linear's own forward
    (ZeRO-3: only this rank's shard), which gathers them whole. A variant that reads W_down elsewhere gets nothing."""
    for linear in module.modules():
        if not isinstance(linear, torch.nn.Linear):
            continue
        whole = {name: p.data for name, p in linear.named_parameters(recurse=False)}

        def gather(m, args, whole=whole):
            for name, p in m.named_parameters(recurse=False):
                p.data = whole[name]

        def release(m, args=None, out=None):
            for p in m.parameters(recurse=False):
                p.data = torch.empty(0, dtype=p.dtype)

        linear.register_forward_pre_hook(gather)
        linear.register_forward_hook(release)
        release(linear)


@pytest.mark.parametrize("down", ["fp8", "plain"])
@pytest.mark.parametrize("variant", ["token", "channel"])
def test_variants_read_each_weight_only_inside_its_own_module_as_zero3_needs(variant, down):
    mlp, w = planted_mlp(torch.float32)
    if down == "fp8":
        mlp.down_proj = Fp8Linear.from_linear(mlp.down_proj, scaling=ScalingConfig(recipe="current"))
    whole, sharded = VARIANTS[variant](mlp), VARIANTS[variant](copy.deepcopy(mlp))
    hold_weights_as_zero3_does(sharded)
    x = batch(w, m=8).float()
    with torch.no_grad():
        torch.testing.assert_close(sharded(x), whole(x), rtol=0, atol=0)
    assert sharded.down_proj.weight.numel() == 0  # released again after the forward
