"""The precision converter: applied between "build the model" and "wrap it for parallelism".

The model code never mentions a number format; a recipe turns a plain model into one that computes in that
format, and tells the trainer which autocast dtype to run the forward pass under.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from fp8train.backends import Backend
from fp8train.config import PrecisionConfig, Recipe

log = logging.getLogger(__name__)

_AUTOCAST = {Recipe.bf16: torch.bfloat16, Recipe.fp32: None}


def convert(model: nn.Module, cfg: PrecisionConfig, backend: Backend) -> nn.Module:
    """Apply a precision recipe to a freshly built fp32 model and return it (modules may be swapped)."""
    # bf16 and fp32 keep fp32 master weights and swap nothing: bf16 comes from autocast around the forward.
    log.info(
        "precision %s: no modules converted, fp32 master weights, autocast %s on %s",
        cfg.recipe.value,
        autocast_dtype(cfg),
        backend.name,
    )
    return model


def autocast_dtype(cfg: PrecisionConfig) -> torch.dtype | None:
    """The dtype the forward pass runs under (None: the parameters' own fp32)."""
    return _AUTOCAST[cfg.recipe]
