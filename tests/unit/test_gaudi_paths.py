"""The Gaudi2 FP8 engines' wiring, checked on the CPU.

Habana's software cannot run here, so ``precision.engine=te`` is driven by a stand-in module that implements the
documented TE calls fp8train makes (``te.Linear`` with a passed-in weight, ``fp8_autocast``, ``DelayedScaling``,
``get/set_extra_state``) with plain PyTorch arithmetic. These tests check fp8train's side: parameters stay
shared, Smooth-SwiGLU works around TE linears, one autocast spans a whole step with the configured recipe and
group, and TE's FP8 state survives a safetensors checkpoint. TE's numerics are Habana's and are exercised only
by tests/hpu on a Gaudi.
"""

from __future__ import annotations

import contextlib
import io
import math
import types

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_model, save_model
from torch import nn

from fp8train import precision
from fp8train.backends.base import Backend
from fp8train.backends.hpu_te import TeLinear, fp8_autocast
from fp8train.config import AmaxAlgo, Fp8Engine, ModelConfig, PrecisionConfig, Recipe, SmoothSwiGLU
from fp8train.model import build_model
from fp8train.precision.smooth_swiglu import SmoothSwiGLUToken
from tests.helpers import documented_op

# Habana TE's documented signatures (software 1.19-1.24); the stand-in accepts nothing else.
TE_LINEAR = (
    "in_features, out_features, sequence_parallel=False, tp_group=None, tp_size=1, get_rng_state_tracker=None, "
    "init_method=None, bias=True, return_bias=False, params_dtype=None, parallel_mode=None, "
    "skip_weight_param_allocation=False, device='hpu', minimize_memory=False"
)
DELAYED_SCALING = (
    "margin=0, interval=1, fp8_format=None, amax_history_len=1, amax_compute_algo='most_recent', "
    "scaling_factor_compute_algo=None, override_linear_precision=(False, False, False), reduce_amax=True"
)


def stand_in_te() -> types.SimpleNamespace:
    """A module with the shape of Habana TE: Linear, fp8_autocast, recipe.DelayedScaling, recipe.Format."""
    te = types.SimpleNamespace(entered=[], calls_inside=0, active=False)

    linear_args = documented_op(TE_LINEAR, lambda **kw: kw, [])

    class Linear(nn.Module):
        def __init__(self, *args, **kwargs):
            super().__init__()
            kw = linear_args(*args, **kwargs)  # only Habana TE's documented arguments
            assert kw["skip_weight_param_allocation"], "fp8train passes its own weights"
            self.kw = kw
            self.register_buffer("scale_fwd", torch.ones(3))  # stands for TE's FP8 meta (scales, histories)

        def forward(self, inp, weight=None, bias=None, is_first_microbatch=None):
            if te.active:
                te.calls_inside += 1
                self.scale_fwd.add_(1.0)
            return F.linear(inp, weight, bias)

        def get_extra_state(self):
            buf = io.BytesIO()
            torch.save({"scale_fwd": self.scale_fwd.clone()}, buf)
            return buf

        def set_extra_state(self, state):
            state.seek(0)
            self.scale_fwd.copy_(torch.load(state)["scale_fwd"])

    @contextlib.contextmanager
    def fp8_autocast(enabled=False, fp8_recipe=None, fp8_group=None):
        te.entered.append((enabled, fp8_recipe, fp8_group))
        te.active = True
        try:
            yield
        finally:
            te.active = False

    recipe_args = documented_op(DELAYED_SCALING, lambda **kw: kw, [])

    class DelayedScaling:
        def __init__(self, *args, **kwargs):
            recipe_args(*args, **kwargs)  # only Habana TE's documented arguments
            self.kw = kwargs

    te.Linear = Linear
    te.fp8_autocast = fp8_autocast
    te.recipe = types.SimpleNamespace(DelayedScaling=DelayedScaling, Format=types.SimpleNamespace(HYBRID="HYBRID"))
    return te


class StandInGaudi(Backend):
    """A Backend named hpu whose TE is the stand-in (the real HpuBackend differs only in importing Habana's)."""

    def __init__(self, te):
        super().__init__(name="hpu", device=torch.device("cpu"), dist_backend="hccl")
        self.te = te

    def te_linear(self, linear):
        return TeLinear(linear, self.te)

    def fp8_autocast(self, cfg, group):
        return fp8_autocast(self.te, cfg, group)


def te_precision(**kw) -> PrecisionConfig:
    return PrecisionConfig(name="te", recipe=Recipe.fp8, engine=Fp8Engine.te, smooth_swiglu=SmoothSwiGLU.token, **kw)


def small_model() -> nn.Module:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=128, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128, max_seq_len=32)
    return build_model(cfg)


def test_te_linears_share_the_model_parameters_and_smooth_swiglu_wraps_them():
    te = stand_in_te()
    plain = small_model()
    params_before = {id(p) for p in plain.parameters()}
    tokens = torch.randint(0, 128, (2, 16))
    reference = plain(tokens).detach()
    m = precision.convert(plain, te_precision(), StandInGaudi(te))
    assert {id(p) for p in m.parameters()} == params_before  # optimizer, ties and export see the same weights
    q_te = m.layers[0].self_attn.q_proj.te
    assert (q_te.kw["in_features"], q_te.kw["out_features"], q_te.kw["bias"]) == (64, 64, False)
    assert q_te.kw["params_dtype"] == torch.float32 and q_te.kw["device"] == torch.device("cpu")
    assert isinstance(m.layers[0].mlp, SmoothSwiGLUToken)
    assert isinstance(m.layers[0].mlp.down_proj, TeLinear) and isinstance(m.layers[0].self_attn.q_proj, TeLinear)
    assert not isinstance(m.lm_head, TeLinear)
    # With the stand-in's exact matmuls the converted model is the plain one (Smooth-SwiGLU is exact).
    torch.testing.assert_close(m(tokens), reference, rtol=1e-5, atol=1e-5)


def test_one_fp8_autocast_spans_the_whole_step_with_the_configured_recipe():
    te = stand_in_te()
    cfg = te_precision(amax_history_len=16, amax_compute_algo=AmaxAlgo.max, margin=1)
    backend = StandInGaudi(te)
    m = precision.convert(small_model(), cfg, backend)
    group = object()  # the engine's data-parallel group
    step = precision.step_context(cfg, backend, group)
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    w0 = m.layers[0].mlp.up_proj.weight.detach().clone()
    with step():
        for _ in range(3):  # micro-batches: forward and backward inside the one region
            m(torch.randint(0, 128, (2, 16))).logsumexp(-1).mean().backward()
    opt.step()
    assert len(te.entered) == 1
    enabled, recipe, fp8_group = te.entered[0]
    assert enabled and fp8_group is group
    assert recipe.kw == {
        "margin": 1,
        "interval": 1,
        "fp8_format": "HYBRID",
        "amax_history_len": 16,
        "amax_compute_algo": "max",
        "reduce_amax": True,
    }
    assert te.calls_inside == 3 * 2 * 7  # micro-batches x layers x linears
    assert not torch.equal(m.layers[0].mlp.up_proj.weight, w0)  # gradients reached the shared parameter
    assert precision.step_context(PrecisionConfig(), backend, group) is contextlib.nullcontext


def test_te_fp8_state_survives_a_safetensors_checkpoint(tmp_path):
    te = stand_in_te()
    cfg = te_precision()
    m = precision.convert(small_model(), cfg, StandInGaudi(te))
    with precision.step_context(cfg, StandInGaudi(te), None)():
        m(torch.randint(0, 128, (2, 16)))
    keys = [k for k in m.state_dict() if k.endswith("_extra_state")]
    assert len(keys) == 2 * 7 and "layers.0.mlp.down_proj._extra_state" in keys
    save_model(m, str(tmp_path / "model.safetensors"))
    fresh = precision.convert(small_model(), cfg, StandInGaudi(stand_in_te()))
    assert fresh.layers[0].mlp.down_proj.te.scale_fwd[0] == 1.0
    load_model(fresh, str(tmp_path / "model.safetensors"))
    assert fresh.layers[0].mlp.down_proj.te.scale_fwd.tolist() == m.layers[0].mlp.down_proj.te.scale_fwd.tolist()
    assert fresh.layers[0].mlp.down_proj.te.scale_fwd[0] == 2.0


@pytest.mark.parametrize("bad", [{"smooth_swiglu": SmoothSwiGLU.channel}, {"scaling": "current"}])
def test_te_refuses_what_habana_te_cannot_do(bad):
    from fp8train.config import compose
    from fp8train.errors import ConfigError

    overrides = ["precision=fp8_smooth_gaudi2", "precision.engine=te"]
    overrides += [f"precision.{k}={getattr(v, 'value', v)}" for k, v in bad.items()]
    with pytest.raises(ConfigError, match="precision.engine=te: "):
        compose(overrides)


def test_te_engine_off_gaudi_is_a_config_error():
    from fp8train.config import compose
    from fp8train.errors import ConfigError

    with pytest.raises(ConfigError, match="precision.engine=te: Habana's Transformer Engine needs backend.name=hpu"):
        compose(["backend=cpu", "precision.engine=te"])


# The signatures of Habana's low-level FP8 ops (torch.ops.hpu) exactly as Habana's bridge documents them (1.17-1.19),
# with the documented meaning of each argument: the cast multiplies by ``scale`` and saturates (E4M3 at
# Gaudi2's 240), the GEMM computes op(A) @ op(B), op transposing when trans_* is set, times A_scale_inv * B_scale_inv.
CAST_TO_FP8_V2 = "input, scale=None, stochastic_rounding=False, is_amax=False, dtype=None, scale_shape=None"
FP8_GEMM_V2 = (
    "A, trans_A, B, trans_B, D, out_dtype, A_scale_inv=None, B_scale_inv=None, bias=None, accumulate=False, "
    "B_scale_shape=None"
)
GAUDI2_MAX = {torch.float8_e4m3fn: 240.0, torch.float8_e5m2: 57344.0}


def fake_hpu_ops(calls: list) -> types.SimpleNamespace:
    def cast(input, scale, stochastic_rounding, is_amax, dtype, scale_shape):
        limit = GAUDI2_MAX[dtype]
        q = (input.double() * scale.double()).clamp(-limit, limit).to(dtype)  # scale multiplies; saturating
        return q, input.abs().amax().float() if is_amax else None

    def gemm(A, trans_A, B, trans_B, D, out_dtype, A_scale_inv, B_scale_inv, bias, accumulate, B_scale_shape):
        a = A.double().t() if trans_A else A.double()
        b = B.double().t() if trans_B else B.double()
        out = (a @ b) * A_scale_inv.double() * B_scale_inv.double()
        return (out if bias is None else out + bias.double()).to(out_dtype)

    return types.SimpleNamespace(
        cast_to_fp8_v2=documented_op(CAST_TO_FP8_V2, cast, calls),
        fp8_gemm_v2=documented_op(FP8_GEMM_V2, gemm, calls),
    )


@pytest.fixture
def hpu_ops(monkeypatch):
    from fp8train.backends.hpu import HpuFp8Ops

    calls: list = []
    monkeypatch.setattr(torch.ops, "hpu", fake_hpu_ops(calls), raising=False)
    return HpuFp8Ops(), calls


@pytest.mark.parametrize("fmt", ["e4m3", "e5m2"])
def test_hpu_cast_passes_scale_dtype_and_rounding_where_habana_documents_them(hpu_ops, fmt):
    from fp8train.fp8 import formats

    ops, calls = hpu_ops
    g = torch.Generator().manual_seed(11)
    x = torch.randn(64, 96, generator=g) * torch.rand(64, 1, generator=g) * 30
    scale = formats.scale_from_amax(x.abs().amax() / 3, fmt, "gaudi2", pow2=True)  # saturates the largest third
    q, amax = ops.quantize(x, fmt, scale, "gaudi2")
    assert q.dtype == formats.fp8_dtype(fmt) and calls[-1]["stochastic_rounding"] is False
    # Gaudi2's saturating cast of x * scale is the CPU emulation of precision.profile=gaudi2, element for element.
    assert torch.equal(q.float(), formats.quantize(x, fmt, scale, "gaudi2").float())
    assert q.float().abs().max() == formats.fp8_max(fmt, "gaudi2")
    assert amax == x.abs().amax()
    ops.quantize(x, fmt, scale, "gaudi2", stochastic=True)
    assert calls[-1]["stochastic_rounding"] is True


def test_hpu_gemm_arguments_give_a_times_b_transposed_in_real_units(hpu_ops):
    from fp8train.fp8 import formats

    ops, _ = hpu_ops
    g = torch.Generator().manual_seed(12)
    a, b = torch.randn(48, 64, generator=g), torch.randn(80, 64, generator=g) * 1e-3
    sa, sb = (formats.scale_from_amax(t.abs().amax(), "e4m3", "gaudi2", pow2=True) for t in (a, b))
    qa, qb = formats.quantize(a, "e4m3", sa, "gaudi2"), formats.quantize(b, "e4m3", sb, "gaudi2")
    want = (qa.double() / sa.double()) @ (qb.double() / sb.double()).t()  # (M, N): the FP8 operands in real units
    got = ops.scaled_mm(qa, qb, sa, sb, torch.float32)
    assert got.shape == (48, 80) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-9)


def test_hybrid_fp8_linear_on_habanas_documented_ops_matches_the_cpu_emulation(hpu_ops):
    # Forward, dX and dW through the documented cast/GEMM calls (operands transposed by the layer as it runs them)
    # equal the emulated Gaudi2 recipe: a wrong argument order or transpose would change the numbers.
    from fp8train.fp8.linear import Fp8Linear
    from fp8train.fp8.scaling import ScalingConfig

    ops, calls = hpu_ops
    gaudi2 = ScalingConfig(recipe="current", profile="gaudi2", pow2=True)
    torch.manual_seed(13)
    cpu = Fp8Linear(64, 32, scaling=gaudi2, hybrid=True)
    hpu = Fp8Linear(64, 32, scaling=gaudi2, hybrid=True, ops=ops)
    hpu.load_state_dict(cpu.state_dict())
    x = torch.randn(40, 64) * 4
    xc, xh = x.clone().requires_grad_(), x.clone().requires_grad_()
    gy = torch.randn(40, 32)
    yc, yh = cpu(xc), hpu(xh)
    yc.backward(gy)
    yh.backward(gy)
    assert sum("A" in c for c in calls) == 3  # forward, dX and dW each one fp8_gemm_v2
    torch.testing.assert_close(yh, yc, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(xh.grad, xc.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(hpu.weight.grad, cpu.weight.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("fmt", ["e4m3", "e5m2"])
def test_hpu_cast_saturates_even_where_the_hardware_cast_would_overflow(monkeypatch, fmt):
    # Habana documents E4M3 saturating at 240 but not what its E5M2 cast does past 57344. fp8train clamps before the
    # cast, as on every backend, so a finite input never becomes inf or NaN whatever the hardware does.
    from fp8train.backends.hpu import HpuFp8Ops
    from fp8train.fp8 import formats

    def overflowing_cast(input, scale, stochastic_rounding, is_amax, dtype, scale_shape):
        return (input.float() * scale.float()).to(dtype), None  # torch's cast: inf (e5m2) or NaN (e4m3fn) past max

    calls: list = []
    monkeypatch.setattr(
        torch.ops,
        "hpu",
        types.SimpleNamespace(cast_to_fp8_v2=documented_op(CAST_TO_FP8_V2, overflowing_cast, calls)),
        raising=False,
    )
    g = torch.Generator().manual_seed(14)
    x = torch.randn(32, 48, generator=g) * 10
    x[3, 5], x[7, 1] = 1e6, -3e38  # far past the range the scale gives
    scale = formats.scale_from_amax(torch.tensor(20.0), fmt, "gaudi2", pow2=True)
    q, _ = HpuFp8Ops().quantize(x, fmt, scale, "gaudi2")
    assert torch.isfinite(q.float()).all()
    limit = formats.fp8_max(fmt, "gaudi2")
    assert q.float()[3, 5] == limit and q.float()[7, 1] == -limit
    assert torch.equal(q.float(), formats.quantize(x, fmt, scale, "gaudi2").float())


@pytest.mark.parametrize("fmt", ["e4m3", "e5m2"])
def test_hpu_cast_turns_inf_into_nan_as_the_emulation_does(hpu_ops, fmt):
    # The clamp before Habana's cast must not saturate an inf to max: on every backend an inf (a bf16 overflow
    # upstream) becomes NaN, reaches the loss, and the step is skipped, instead of training on a finite stand-in.
    from fp8train.fp8 import formats

    ops, _ = hpu_ops
    x = torch.randn(16, 32, generator=torch.Generator().manual_seed(15))
    x[2, 3], x[5, 7], x[9, 1] = math.inf, -math.inf, math.nan
    scale = formats.scale_from_amax(torch.tensor(4.0), fmt, "gaudi2", pow2=True)
    q, _ = ops.quantize(x, fmt, scale, "gaudi2")
    want = formats.quantize(x, fmt, scale, "gaudi2").float()
    assert want[2, 3].isnan() and want[5, 7].isnan() and want[9, 1].isnan()
    assert torch.equal(q.float().isnan(), want.isnan())
    assert torch.equal(q.float().nan_to_num(), want.nan_to_num())
