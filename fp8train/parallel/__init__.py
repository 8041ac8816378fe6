"""Engines: how a model and its optimizer are run over processes. ``wrap`` picks one from parallel.name."""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from fp8train.backends import Backend
from fp8train.config import ParallelConfig, ParallelName


class SingleEngine:
    """One process, one device. Multi-process engines provide the same methods."""

    rank, world_size, is_main = 0, 1, True
    reduce_amax = None  # FP8 amaxes need no reduction with one process

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer):
        self.model = model
        self.optimizer = optimizer

    def no_sync(self, sync: bool) -> contextlib.AbstractContextManager:
        """Gradient accumulation: data-parallel engines skip the all-reduce unless ``sync``."""
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def clip_grad_norm(self, max_norm: float) -> torch.Tensor:
        """The global gradient norm before clipping (clipping only when max_norm > 0)."""
        params = [p for p in self.model.parameters() if p.grad is not None]
        if max_norm > 0:
            return torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True)
        return torch.nn.utils.get_total_norm([p.grad for p in params], foreach=True)

    def step(self) -> None:
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


def wrap(model: nn.Module, optimizer: torch.optim.Optimizer, cfg: ParallelConfig, backend: Backend) -> SingleEngine:
    if cfg.name == ParallelName.single:
        return SingleEngine(model, optimizer)
    raise ValueError(f"unknown parallel.name {cfg.name}")  # unreachable: the config schema only allows the above
