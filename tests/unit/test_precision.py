"""The precision converter: which modules become FP8, which stay, and what it refuses."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

from fp8train import precision
from fp8train.backends import select
from fp8train.backends.base import Backend
from fp8train.config import BackendConfig, Fp8Engine, Fp8Profile, ModelConfig, PrecisionConfig, Recipe, SmoothSwiGLU
from fp8train.errors import BackendError
from fp8train.fp8.linear import Fp8Linear
from fp8train.fp8.scaling import fp8_scalers, step_scalers
from fp8train.model import build_model
from fp8train.model.mlp import SwiGLU
from fp8train.precision.smooth_swiglu import SmoothSwiGLUChannel, SmoothSwiGLUToken
from tests.helpers import unshared

CPU = select(BackendConfig(name="cpu"))


def model(**kw) -> nn.Module:
    torch.manual_seed(0)
    cfg = dict(vocab_size=256, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=192, tie_embeddings=False)
    return build_model(ModelConfig(**{**cfg, **kw}))


def fp8(**kw) -> PrecisionConfig:
    return PrecisionConfig(name="test", recipe=Recipe.fp8, **kw)


def linears_by_type(m: nn.Module) -> dict[str, str]:
    return {name: type(mod).__name__ for name, mod in m.named_modules() if isinstance(mod, nn.Linear)}


def test_fp8_swaps_attention_and_mlp_linears_and_keeps_lm_head_and_embeddings(caplog):
    m = model()
    params_before = {name: p for name, p in m.named_parameters()}
    with caplog.at_level(logging.INFO):
        precision.convert(m, fp8(), CPU)
    kinds = linears_by_type(m)
    assert kinds.pop("lm_head") == "Linear"
    assert set(kinds.values()) == {"Fp8Linear"} and len(kinds) == 2 * 7
    assert type(m.embed_tokens) is nn.Embedding
    # The same Parameter objects: an optimizer built before or after the swap updates the model's weights.
    assert all(params_before[name] is p for name, p in m.named_parameters())
    assert "14 linears to FP8" in caplog.text


def test_bf16_and_fp32_swap_nothing():
    for recipe in (Recipe.bf16, Recipe.fp32):
        m = model()
        precision.convert(m, PrecisionConfig(recipe=recipe), CPU)
        assert set(linears_by_type(m).values()) == {"Linear"}
    assert precision.autocast_dtype(PrecisionConfig(recipe=Recipe.fp32)) is None
    assert precision.autocast_dtype(fp8()) == torch.bfloat16


def test_linears_filter_and_dims_not_multiple_of_16_stay_high_precision(caplog):
    m = model(n_kv_heads=1, ffn_dim=200)  # k/v out 16 is fine; ffn 200 is not a multiple of 16
    with caplog.at_level(logging.INFO):
        precision.convert(m, fp8(linears=["q_proj", "gate_proj", "down_proj"]), CPU)
    kinds = linears_by_type(m)
    assert kinds["layers.0.self_attn.q_proj"] == "Fp8Linear"
    assert kinds["layers.0.self_attn.k_proj"] == "Linear"  # not asked for
    assert kinds["layers.0.mlp.gate_proj"] == "Linear" and kinds["layers.0.mlp.down_proj"] == "Linear"
    assert "not multiples of 16: layers.0.mlp.gate_proj, layers.0.mlp.down_proj" in caplog.text
    # What precision.linears left out is named with what stays in bf16, once per kind, counted over the layers.
    assert "kept in bf16: embeddings, lm_head, norms, k_proj x2, v_proj x2, o_proj x2, up_proj x2;" in caplog.text


def test_a_model_with_no_linear_fit_for_fp8_says_so_loudly(caplog):
    m = model(d_model=72, n_heads=4, n_kv_heads=4, ffn_dim=200)  # no dim of any block linear is a multiple of 16
    with caplog.at_level(logging.INFO):
        precision.convert(m, fp8(), CPU)
    assert set(linears_by_type(m).values()) == {"Linear"}
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "no linear runs in FP8" in warnings[0].getMessage()
    assert "model.d_model" in warnings[0].getMessage() and "precision=bf16" in warnings[0].getMessage()


@pytest.mark.parametrize(
    "variant,mlp_type,down_type",
    [
        (SmoothSwiGLU.none, SwiGLU, Fp8Linear),
        (SmoothSwiGLU.token, SmoothSwiGLUToken, Fp8Linear),
        (SmoothSwiGLU.channel, SmoothSwiGLUChannel, Fp8Linear),
        (SmoothSwiGLU.bf16_down, SwiGLU, nn.Linear),
    ],
)
def test_smooth_swiglu_variant_is_installed_by_the_converter(variant, mlp_type, down_type):
    m = model()
    keys_before = set(m.state_dict())
    precision.convert(m, fp8(smooth_swiglu=variant), CPU)
    for layer in m.layers:
        assert type(layer.mlp) is mlp_type and type(layer.mlp.down_proj) is down_type
    # Same parameter names as the plain model; the converter only adds FP8 scaling state (buffers).
    keys_after = set(m.state_dict())
    assert keys_before <= keys_after
    assert all("_scaler." in k for k in keys_after - keys_before)


@pytest.mark.parametrize("variant", [SmoothSwiGLU.token, SmoothSwiGLU.channel])
def test_smooth_swiglu_is_not_installed_where_the_down_projection_stays_in_bf16(variant, caplog):
    # ffn 200 is not a multiple of 16: the MLP linears stay bf16, and rescaling h would only cost time (the config
    # refuses the same thing asked for through precision.linears).
    m = model(ffn_dim=200)
    with caplog.at_level(logging.INFO):
        precision.convert(m, fp8(smooth_swiglu=variant), CPU)
    assert all(type(layer.mlp) is SwiGLU for layer in m.layers)
    assert type(m.layers[0].self_attn.q_proj) is Fp8Linear
    assert f"Smooth-SwiGLU {variant.value} on no MLP (2 keep their down projection in bf16)" in caplog.text


def test_converted_model_trains_without_non_finite_values():
    m = precision.convert(model(), fp8(smooth_swiglu=SmoothSwiGLU.token), CPU)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
    for _ in range(3):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = m(torch.randint(0, 256, (2, 32)))
        loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), torch.randint(0, 256, (64,)))
        loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in m.parameters())
        opt.step()
        opt.zero_grad()
    assert torch.isfinite(loss)


def test_gaudi_native_fp8_needs_the_gaudi2_profile_and_te_needs_a_gaudi():
    gaudi = Backend(name="hpu", device=torch.device("cpu"), dist_backend="hccl")
    with pytest.raises(BackendError, match="engine=native on backend.name=hpu needs precision.profile=gaudi2"):
        precision.convert(model(), fp8(), gaudi)
    with pytest.raises(BackendError, match="precision.engine=te .* needs backend.name=hpu .*this run: cpu"):
        precision.convert(model(), fp8(engine=Fp8Engine.te), CPU)


def test_gaudi2_profile_makes_linears_hybrid():
    m = precision.convert(model(), fp8(profile=Fp8Profile.gaudi2), CPU)
    assert all(mod.hybrid for mod in m.modules() if isinstance(mod, Fp8Linear))
    m = precision.convert(model(), fp8(), CPU)
    assert not any(mod.hybrid for mod in m.modules() if isinstance(mod, Fp8Linear))


def test_gaudi2_profile_on_tensor_cores_warns_and_emulates_its_e5m2_x_e5m2_gemms(caplog):
    # A backend whose FP8 GEMMs are torch._scaled_mm (as on CUDA sm_89+; its CPU kernel runs here).
    from fp8train.backends.cuda import ScaledMmOps

    class ScaledMmBackend(Backend):
        def fp8_ops(self):
            return ScaledMmOps()

    m = model()
    with caplog.at_level(logging.WARNING):
        precision.convert(m, fp8(profile=Fp8Profile.gaudi2), ScaledMmBackend(name="cuda"))
    assert "precision.profile=gaudi2 on backend.name=cuda" in caplog.text and "precision.profile=ocp" in caplog.text
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = m(torch.randint(0, 256, (2, 32)))
    logits.float().square().mean().backward()  # the E5M2 x E5M2 backward GEMMs take the emulation
    assert all(torch.isfinite(p.grad).all() for p in m.parameters() if p.grad is not None)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        precision.convert(model(), fp8(), ScaledMmBackend(name="cuda"))
        precision.convert(model(), fp8(profile=Fp8Profile.gaudi2), CPU)
    assert "profile=gaudi2" not in caplog.text  # the OCP profile, or a device that emulates everything: no warning


def train_steps(m: nn.Module, steps: int = 4) -> list[float]:
    gen = torch.Generator().manual_seed(3)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    losses = []
    for _ in range(steps):
        tokens = torch.randint(0, 256, (2, 33), generator=gen)
        tokens[0, 5] = 7  # the same token repeated: a larger activation somewhere, the amax moves between steps
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = m(tokens[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), tokens[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad()
        step_scalers(m)
        losses.append(loss.item())
    return losses


def test_linears_of_one_input_share_its_scaler_and_train_exactly_as_with_their_own(caplog):
    with caplog.at_level(logging.INFO):
        m = precision.convert(model(), fp8(smooth_swiglu=SmoothSwiGLU.token), CPU)
    assert "one input cast each for gate_proj/up_proj + q_proj/k_proj/v_proj" in caplog.text
    attn, mlp = m.layers[0].self_attn, m.layers[0].mlp
    assert attn.q_proj.input_scaler is attn.k_proj.input_scaler is attn.v_proj.input_scaler
    assert mlp.gate_proj.input_scaler is mlp.up_proj.input_scaler
    others = [attn.q_proj.input_scaler, attn.o_proj.input_scaler, mlp.up_proj.input_scaler, mlp.down_proj.input_scaler]
    assert len(set(others)) == 4  # o and down have inputs of their own; layers do not share
    assert m.layers[1].self_attn.q_proj.input_scaler is not attn.q_proj.input_scaler
    assert len({attn.q_proj.weight_scaler, attn.k_proj.weight_scaler, attn.q_proj.grad_scaler}) == 3
    # 7 weights, 7 output gradients and 4 distinct inputs per layer; every linear still names its input scaler.
    assert len(fp8_scalers(m)) == 2 * (7 + 7 + 4)
    assert "layers.0.self_attn.v_proj.input_scaler.amax_history" in m.state_dict()

    twin = unshared(m)
    assert train_steps(m) == train_steps(twin)  # the same amaxes, so the same scales: to the bit
    for name, value in twin.state_dict().items():
        assert torch.equal(m.state_dict()[name], value), name


def test_a_checkpoint_stored_before_scalers_were_shared_loads_into_the_shared_model(tmp_path):
    from safetensors.torch import save_file, save_model

    from fp8train.parallel import load_weights

    m = precision.convert(model(), fp8(), CPU)
    old = unshared(m)
    train_steps(old, steps=2)
    save_file({k: v.contiguous() for k, v in old.state_dict().items()}, tmp_path / "old.safetensors")  # every name
    load_weights(m, tmp_path / "old.safetensors", torch.device("cpu"))
    for name, value in old.state_dict().items():
        assert torch.equal(m.state_dict()[name], value), name
    save_model(m, str(tmp_path / "new.safetensors"))  # the shared scalers stored once, loaded back exactly
    fresh = precision.convert(model(), fp8(), CPU)
    load_weights(fresh, tmp_path / "new.safetensors", torch.device("cpu"))
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in m.state_dict().items())
    with pytest.raises(RuntimeError, match="missing keys"):  # a file of another model is still refused
        load_weights(precision.convert(model(n_layers=3), fp8(), CPU), tmp_path / "new.safetensors", "cpu")
