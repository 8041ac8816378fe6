"""Optimizers and learning-rate schedules."""

from __future__ import annotations

import math

import torch
from torch import nn

from fp8train.backends import Backend
from fp8train.config import OptimConfig, OptimName, ScheduleName
from fp8train.errors import BackendError


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices and embeddings; never norms or biases (1-D), whose scale is not a capacity knob."""
    decay, no_decay = [], []
    for p in model.parameters():  # tied weights appear once
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def fp8_param_groups(model: nn.Module, weight_decay: float, min_numel: int) -> list[dict]:
    """param_groups, with the FP8-moment rule of AdamWFp8 decided here from each parameter's own shape: large
    matrices get FP8 moments, the rest fp32. The decision survives DeepSpeed ZeRO flattening a group."""
    decay, no_decay = param_groups(model, weight_decay)
    big = [p for p in decay["params"] if p.numel() >= min_numel]
    small = [p for p in decay["params"] if p.numel() < min_numel]
    groups = [
        {**decay, "params": big, "fp8_moments": True},
        {**decay, "params": small, "fp8_moments": False},
        {**no_decay, "fp8_moments": False},
    ]
    return [g for g in groups if g["params"]]


def build(cfg: OptimConfig, model: nn.Module, backend: Backend, compile: bool = False) -> torch.optim.Optimizer:
    """AdamW with decoupled weight decay: torch's (fused where the device has it) or with FP8 moments.

    ``compile`` (backend.compile): AdamWFp8's update is compiled on CUDA in any case; this compiles it wherever
    inductor generates code (on the CPU too: benchmarks/RESULTS.md). On hpu it stays eager;
    optim.habana_fused=true is the fast path there.
    """
    if cfg.name == OptimName.adamw_fp8 and cfg.habana_fused:
        if backend.name != "hpu":
            raise BackendError(
                f"optim.habana_fused=true needs backend.name=hpu (this run: {backend.name}); set "
                "optim.habana_fused=false to use fp8train's AdamWFp8 on any device."
            )
        return backend.fused_fp8_adamw(
            param_groups(model, cfg.weight_decay), cfg.lr, tuple(cfg.betas), cfg.eps, cfg.m_format, cfg.v_format
        )
    if cfg.name == OptimName.adamw_fp8:
        from fp8train.optim.adamw_fp8 import AdamWFp8

        return AdamWFp8(
            fp8_param_groups(model, cfg.weight_decay, cfg.fp8_min_numel),
            lr=cfg.lr,
            betas=tuple(cfg.betas),
            eps=cfg.eps,
            m_format=cfg.m_format,
            v_format=cfg.v_format,
            block_size=cfg.block_size,
            min_numel=cfg.fp8_min_numel,
            compile=True if compile and backend.inductor() else None,  # None: compiled on CUDA only
            profile="gaudi2" if backend.name == "hpu" else "ocp",  # Gaudi2 saturates E4M3 at 240
        )
    fused = backend.has_fused_adamw() if cfg.fused is None else cfg.fused
    return torch.optim.AdamW(
        param_groups(model, cfg.weight_decay),
        lr=cfg.lr,
        betas=tuple(cfg.betas),
        eps=cfg.eps,
        fused=fused or None,
    )


def lr_factor(step: int, cfg: OptimConfig, max_steps: int) -> float:
    """Multiplier of optim.lr for the step that follows ``step`` completed steps."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps  # never 0: the first step already moves the weights
    if cfg.schedule == ScheduleName.constant:
        return 1.0
    decay_steps = cfg.decay_steps or max_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, decay_steps - cfg.warmup_steps))
    floor = cfg.min_lr / cfg.lr
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_warning(cfg: OptimConfig, max_steps: int) -> str | None:
    """What a run whose trainer.max_steps ends in (or with) warmup will not do, or None. Not an error: the smoke runs
    of the README are a few steps long on a schedule meant for hundreds."""
    cosine = cfg.schedule == ScheduleName.cosine
    if max_steps > cfg.warmup_steps or (max_steps == cfg.warmup_steps and not cosine):
        return None
    last_lr = cfg.lr * lr_factor(max_steps - 1, cfg, max_steps)
    if max_steps < cfg.warmup_steps:
        what = (
            f"is longer than trainer.max_steps={max_steps}: the run ends in warmup, its lr rising to {last_lr:.2e} "
            f"at its last step, never to optim.lr={cfg.lr}" + (" nor down the cosine to optim.min_lr" if cosine else "")
        )
    else:
        what = (
            f"equals trainer.max_steps={max_steps}: the run ends in warmup, its lr rising to {last_lr:.2e} "
            f"(optim.lr) at its last step, and the cosine decay to optim.min_lr={cfg.min_lr} never starts"
        )
    return (
        f"optim.warmup_steps={cfg.warmup_steps} {what}. Fine for a smoke test; for a run to compare or keep, set "
        f"optim.warmup_steps below trainer.max_steps."
    )


# E5M2 has 2 mantissa bits: an entry of v moves to the next value only when the step's change exceeds half its
# spacing (7-12% of v). With beta2 = 0.95 a step changes v by up to 5% of (g^2 - v) and the stored v tracks its
# moving average; with a slower average most steps round back to the old value, and v lags a change of the
# gradient's scale (tests/unit/test_adamw_fp8.py measures it).
FP8_V_MAX_BETA2 = 0.95


def fp8_moments_warning(cfg: OptimConfig) -> str | None:
    """Why FP8 second moments suit this optim.betas poorly, or None."""
    if cfg.name != OptimName.adamw_fp8 or cfg.betas[1] <= FP8_V_MAX_BETA2:
        return None
    return (
        f"optim.betas[1]={cfg.betas[1]} with optim=adamw_fp8: its E5M2 second moments follow a moving average this "
        f"slow only coarsely (most steps round back to the stored value), so they lag changes of the gradient's "
        f"scale. Use optim.betas=[{cfg.betas[0]},{FP8_V_MAX_BETA2}] (the paper's and fp8train's default), or "
        "optim=adamw for fp32 moments."
    )


def build_schedule(cfg: OptimConfig, optimizer: torch.optim.Optimizer, max_steps: int):
    """Linear warmup, then cosine to min_lr (or constant); its state is the step count, saved in checkpoints."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, cfg, max_steps))
