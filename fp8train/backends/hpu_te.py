"""Habana Transformer Engine for ``precision.engine=te``: ``te.Linear`` over fp8train's own weights.

Thin on purpose, and written against Habana's documented TE API (software 1.19-1.24); it has not run on a Gaudi
in fp8train's own tests. What fp8train relies on:
- ``te.Linear(in, out, bias=..., skip_weight_param_allocation=True)`` with ``forward(x, weight=W, bias=b)``: the
  model keeps its ``nn.Parameter`` objects (optimizer, ties, checkpoints and export see a plain Llama), and
  per-token Smooth-SwiGLU works unchanged because it only calls ``down_proj(x)``.
- one ``te.fp8_autocast(enabled=True, fp8_recipe=DelayedScaling(HYBRID, ...), fp8_group=...)`` around the whole
  optimizer step, every micro-batch's forward and backward: TE updates its scales at the start of the next
  forward/backward and max-reduces amaxes over ``fp8_group`` (the data-parallel ranks).
- TE's per-module FP8 state (scales, amax histories) comes from ``get_extra_state``; ``TeLinear`` keeps it in
  the state dict as a byte tensor under ``<linear>._extra_state``, so safetensors checkpoints carry it.
"""

from __future__ import annotations

import contextlib
import importlib
import io

import torch
from torch import nn

from fp8train.errors import BackendError


def import_te():
    """Habana TE: ``intel_transformer_engine`` (software >= 1.19), else the module inside habana_frameworks."""
    for name in ("intel_transformer_engine", "habana_frameworks.torch.hpex.experimental.transformer_engine"):
        try:
            return importlib.import_module(name)
        except ImportError:
            continue
    raise BackendError(
        "precision.engine=te needs Habana's Transformer Engine (intel_transformer_engine), which is not installed "
        "here; it ships in Habana's images (docker/Dockerfile.gaudi). Use precision.engine=native otherwise."
    )


class TeLinear(nn.Module):
    """A Linear whose matmuls run in Habana TE; same parameters and state-dict names as the ``nn.Linear`` it wraps."""

    def __init__(self, linear: nn.Linear, te):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        te_linear = te.Linear(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            skip_weight_param_allocation=True,
            params_dtype=linear.weight.dtype,
            device=linear.weight.device,
        )
        # Held outside the module tree: its FP8 state reaches the state dict through get/set_extra_state below.
        object.__setattr__(self, "te", te_linear)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.te(x, weight=self.weight, bias=self.bias)

    def _apply(self, fn, recurse: bool = True):
        self.te._apply(fn)
        return super()._apply(fn, recurse)

    def train(self, mode: bool = True):
        self.te.train(mode)
        return super().train(mode)

    def get_extra_state(self) -> torch.Tensor:
        """TE's FP8 state serialised into a uint8 tensor (safetensors stores tensors only)."""
        state = self.te.get_extra_state()
        if isinstance(state, torch.Tensor):
            return state.detach().to("cpu", torch.uint8).flatten()
        buf = io.BytesIO()
        torch.save(state, buf)
        return torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8)

    def set_extra_state(self, state: torch.Tensor) -> None:
        if state is None or state.numel() == 0:
            return
        try:
            restored = torch.load(io.BytesIO(state.cpu().numpy().tobytes()), weights_only=False)
        except Exception:  # TE that serialises to a tensor itself
            restored = state
        self.te.set_extra_state(restored)

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, bias={self.bias is not None}, Habana TE"


def fp8_autocast(te, cfg, group) -> contextlib.AbstractContextManager:
    """TE's FP8 region for one optimizer step: DelayedScaling in the HYBRID format (E4M3 forward, E5M2 backward,
    Gaudi2's only FP8 pairing besides all-E5M2) from the precision config, amaxes max-reduced over ``group``."""
    recipe = te.recipe.DelayedScaling(
        margin=cfg.margin,
        interval=1,
        fp8_format=te.recipe.Format.HYBRID,
        amax_history_len=cfg.amax_history_len,
        amax_compute_algo=cfg.amax_compute_algo.value,
        reduce_amax=group is not None,
    )
    return te.fp8_autocast(enabled=True, fp8_recipe=recipe, fp8_group=group)
