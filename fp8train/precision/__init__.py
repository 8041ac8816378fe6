"""The precision converter: applied between "build the model" and "wrap it for parallelism".

The model code never mentions a number format. ``convert`` turns a plain fp32 model into one that computes in
the configured format (``precision.recipe``) and tells the trainer which autocast dtype to run the forward in:

- bf16 / fp32: no module is swapped; bf16 comes from autocast around the forward.
- fp8: the chosen ``nn.Linear`` layers become ``Fp8Linear`` (E4M3 forward, E5M2 gradients, the backend's FP8
  ops; ``precision.engine=te``: Habana TE's linear instead), the MLPs whose down projection runs in FP8 become
  the chosen Smooth-SwiGLU variant, and everything else (embeddings, lm_head, norms, attention softmax, linears
  whose dims are not multiples of 16) runs in bf16 under autocast.
"""

from __future__ import annotations

import contextlib
import logging
from collections import Counter
from collections.abc import Callable

import torch
from torch import nn

from fp8train.backends import Backend
from fp8train.backends.base import TE_NEEDS_HPU
from fp8train.config import Fp8Engine, Fp8Profile, PrecisionConfig, Recipe, SmoothSwiGLU
from fp8train.errors import BackendError
from fp8train.fp8.linear import Fp8Linear
from fp8train.fp8.scaling import ScalingConfig
from fp8train.model.mlp import SwiGLU
from fp8train.precision.smooth_swiglu import VARIANTS

log = logging.getLogger(__name__)

_AUTOCAST = {Recipe.bf16: torch.bfloat16, Recipe.fp32: None, Recipe.fp8: torch.bfloat16}


def autocast_dtype(cfg: PrecisionConfig) -> torch.dtype | None:
    """The dtype the forward pass runs under (None: the parameters' own fp32)."""
    return _AUTOCAST[cfg.recipe]


def convert(model: nn.Module, cfg: PrecisionConfig, backend: Backend) -> nn.Module:
    """Apply a precision recipe to a freshly built fp32 model, in place, and return it."""
    if cfg.recipe != Recipe.fp8:
        log.info(
            "precision %s: no modules converted (fp32 master weights, autocast %s)",
            cfg.recipe.value,
            autocast_dtype(cfg),
        )
        return model
    check_hardware(cfg, backend)
    ops = backend.fp8_ops() if cfg.engine == Fp8Engine.native else None
    if ops is not None and cfg.profile == Fp8Profile.gaudi2 and not ops.e5m2_pairs:
        log.warning(
            "precision.profile=gaudi2 on backend.name=%s: Gaudi2's E5M2 x E5M2 backward GEMMs have no form on this "
            "device's FP8 units, so they run emulated (the same numbers, slower). For speed here use "
            "precision.profile=ocp (e.g. precision=fp8_smooth).",
            backend.name,
        )
    wanted = set(cfg.linears)
    if cfg.smooth_swiglu == SmoothSwiGLU.bf16_down:
        wanted.discard("down_proj")  # the paper's other fix: the quadratic tensor never meets FP8
    swapped, skipped, deselected = Counter(), [], Counter()
    for parent_name, parent in list(model.named_modules()):
        for name, child in list(parent.named_children()):
            if type(child) is not nn.Linear:
                continue
            if name not in wanted:
                deselected[name] += name != "lm_head"  # lm_head is named below in any case
                continue
            if child.in_features % 16 or child.out_features % 16:
                skipped.append(f"{parent_name}.{name}")  # FP8 GEMMs need both dims divisible by 16
                continue
            setattr(parent, name, fp8_linear(child, cfg, backend, ops))
            swapped[name] += 1
    if skipped and not swapped:  # asked for FP8 and got a bf16 model: the info line below is easy to miss
        log.warning(
            "precision.recipe=fp8: no linear runs in FP8, since every selected one has a dimension that is not a "
            "multiple of 16 (%s); this run computes in bf16. Choose model.d_model, model.ffn_dim and the head "
            "sizes as multiples of 16, or use precision=bf16.",
            ", ".join(skipped[:3]) + (", ..." if len(skipped) > 3 else ""),
        )
    shared = share_input_scalers(model)
    variant = VARIANTS.get(cfg.smooth_swiglu.value)
    n_mlps = n_bf16_down = 0
    if variant is not None:
        for parent in list(model.modules()):
            for name, child in list(parent.named_children()):
                if not isinstance(child, SwiGLU):
                    continue
                if type(child.down_proj) is nn.Linear:  # kept in bf16 (dims): no FP8 input to smooth
                    n_bf16_down += 1
                    continue
                setattr(parent, name, variant(child))
                n_mlps += 1
    log.info(
        "precision fp8 (%s, %s scaling, %s profile): %d linears to FP8 (%s)%s; Smooth-SwiGLU %s%s; kept in bf16: "
        "embeddings, lm_head, norms%s%s",
        f"{ops.name} ops" if ops else "Habana TE",
        cfg.scaling.value,
        cfg.profile.value,
        sum(swapped.values()),
        ", ".join(f"{k} x{v}" for k, v in swapped.items()) or "none",
        f", one input cast each for {' + '.join('/'.join(g) for g in sorted(shared))}" if shared else "",
        cfg.smooth_swiglu.value,
        (f" on {n_mlps} MLPs" if n_mlps else " on no MLP" if n_bf16_down else "")
        + (f" ({n_bf16_down} keep their down projection in bf16)" if n_bf16_down else ""),
        "".join(f", {k} x{v}" for k, v in deselected.items() if v),
        f"; not multiples of 16: {', '.join(skipped)}" if skipped else "",
    )
    return model


def share_input_scalers(model: nn.Module) -> set[tuple[str, ...]]:
    """Give the FP8 linears a module applies to one tensor (its ``same_input``: q/k/v, gate/up) one input scaler.

    Their input scalers would see the same amax every step, so they hold the same history and scale: one shared
    scaler changes no number, and lets torch.compile cast that input to FP8 once and save one FP8 copy of it for
    backward instead of three (q/k/v) or two (gate/up). The shared scaler is one module under each linear's name:
    state dicts keep every key, and model.modules() (step_scalers, the monitor) visits it once.
    Returns the groups that now share, by linear names."""
    shared = set()
    for module in model.modules():
        group = {n: getattr(module, n) for n in getattr(module, "same_input", ())}
        group = {n: m for n, m in group.items() if isinstance(m, Fp8Linear)}
        if len(group) < 2:
            continue
        first, *rest = group.values()
        for linear in rest:
            linear.input_scaler = first.input_scaler
        shared.add(tuple(group))
    return shared


def fp8_linear(linear: nn.Linear, cfg: PrecisionConfig, backend: Backend, ops) -> nn.Module:
    """The FP8 replacement of one linear, sharing its parameters."""
    if cfg.engine == Fp8Engine.te:
        return backend.te_linear(linear)
    return Fp8Linear.from_linear(
        linear,
        scaling=scaling_config(cfg),
        ops=ops,
        stochastic_grad=cfg.stochastic_grad_rounding,
        hybrid=cfg.profile == Fp8Profile.gaudi2,  # Gaudi2 GEMMs take one format: E5M2 x E5M2 backward
        fast_accum=cfg.fast_accum,
    )


def step_context(cfg: PrecisionConfig, backend: Backend, group) -> Callable[[], contextlib.AbstractContextManager]:
    """What wraps one optimizer step (every micro-batch's forward and backward): Habana TE's fp8_autocast for
    precision.engine=te, with amaxes max-reduced over ``group``; nothing otherwise (Fp8Linear scales itself)."""
    if cfg.recipe == Recipe.fp8 and cfg.engine == Fp8Engine.te:
        return lambda: backend.fp8_autocast(cfg, group)
    return contextlib.nullcontext


def scaling_config(cfg: PrecisionConfig) -> ScalingConfig:
    return ScalingConfig(
        recipe=cfg.scaling.value,
        amax_history_len=cfg.amax_history_len,
        amax_compute_algo=cfg.amax_compute_algo.value,
        margin=cfg.margin,
        pow2=cfg.pow2_scales,
        profile=cfg.profile.value,
    )


def check_hardware(cfg: PrecisionConfig, backend: Backend) -> None:
    """Refuse what the device cannot do, naming the override that fixes it."""
    if backend.name == "hpu" and cfg.engine == Fp8Engine.native and cfg.profile != Fp8Profile.gaudi2:
        raise BackendError(
            f"precision.engine=native on backend.name=hpu needs precision.profile=gaudi2 (this run: "
            f"{cfg.profile.value}): Gaudi2 saturates E4M3 at 240 and its GEMMs take one FP8 format, so the backward "
            f"runs E5M2 x E5M2. Use precision=fp8_smooth_gaudi2, or add precision.profile=gaudi2."
        )
    if backend.name != "hpu" and cfg.engine == Fp8Engine.te:
        raise BackendError(TE_NEEDS_HPU.format(name=backend.name))
