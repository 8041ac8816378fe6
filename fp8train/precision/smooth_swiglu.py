"""Smooth-SwiGLU (Fishman et al. 2025): rescale the SwiGLU output before the FP8 down projection.

Notation (fp8train/model/mlp.py): ``g = x @ W_gate.T``, ``u = x @ W_up.T``, ``h = silu(g) * u``, ``y = h @ W_down.T``.

Under weight decay the rows W_up[j] and W_gate[j] of a neuron align, so h_j ~ silu(x.w) * (x.w) grows like the
*square* of an input outlier. Delayed scaling sets this step's FP8 scale from earlier steps' amax, so a sudden
quadratic spike overflows E4M3 and training diverges. Each variant below computes exactly plain SwiGLU in real
arithmetic; only what the FP8 quantizer sees changes:

- ``token`` (the paper's released code): ``s_t = max_j |u_tj|`` per token (detached), the down projection gets
  ``silu(g) * (u / s_t)`` and its output row t is multiplied by s_t in high precision. Only the linear branch is
  normalised, so the outlier token's amax grows like m instead of m^2: the growth every other activation has.
  Works with any black-box FP8 linear (also Habana TE's te.Linear).
- ``channel`` (the paper's text): ``s_j = max_t |h_tj|`` per channel over the micro-batch (detached); quantize
  ``h / s`` (amax exactly 1 in every channel) and ``W_down * s`` (column j times s_j):
  ``y = Q(h / s) . Q(W_down diag(s))^T``. The weight changes every step, so it is quantized with current
  (just-in-time) scaling. The backward takes dh from ``Q(W_down)`` itself, as plain SwiGLU does: a neuron whose s_j
  is far below the largest has its column of ``W_down diag(s)`` flushed to zero, and would get no gradient.
  With s frozen it folds into W_up and W_down: an exported model is a plain Llama. W_down is only read inside
  ``down_proj``'s forward (``Fp8Linear(h / s, in_scale=s)``), so this works with ZeRO-3, which holds a shard of each
  weight and gathers it whole only for the forward of the module that owns it.

Both modules keep SwiGLU's attribute names (gate_proj, up_proj, down_proj), so state dicts are unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fp8train.fp8.linear import Fp8Linear
from fp8train.model.mlp import SwiGLU


def _safe(s: torch.Tensor) -> torch.Tensor:
    """A scale of 0 (an all-zero row or channel) would divide by zero; 1 leaves the zeros as they are."""
    return torch.where(s > 0, s, torch.ones_like(s))


def _high(t: torch.Tensor) -> torch.dtype:
    """fp32, or the tensor's own dtype if it is wider: the scale is applied and undone at this precision."""
    return torch.promote_types(t.dtype, torch.float32)


class SmoothSwiGLUToken(nn.Module):
    """Per-token Smooth-SwiGLU: down_proj(silu(g) * u / s_t) * s_t with s_t = max_j |u_tj|."""

    def __init__(self, mlp: SwiGLU):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = mlp.gate_proj, mlp.up_proj, mlp.down_proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g, u = self.gate_proj(x), self.up_proj(x)
        # fp32 scale, detached: it is a change of units, not part of the function being learned.
        s = _safe(u.detach().abs().amax(dim=-1, keepdim=True).to(_high(u)))  # (..., 1)
        y = self.down_proj(F.silu(g) * (u / s).to(u.dtype))
        return (y.to(s.dtype) * s).to(y.dtype)  # undo the scale in high precision, after the FP8 matmul


class SmoothSwiGLUChannel(nn.Module):
    """Per-channel Smooth-SwiGLU: Q(h / s) . Q(W_down diag(s))^T with s_j = max_t |h_tj| over the micro-batch."""

    def __init__(self, mlp: SwiGLU):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = mlp.gate_proj, mlp.up_proj, mlp.down_proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.silu(self.gate_proj(x)) * self.up_proj(x)
        if not isinstance(self.down_proj, Fp8Linear):
            # Nothing quantizes h, so there is nothing to rescale: (h / s) . (W_down diag(s))^T is h . W_down^T.
            # (The converter installs this variant only over an Fp8Linear down_proj.)
            return self.down_proj(h)
        s = _safe(h.detach().abs().flatten(0, -2).amax(dim=0).to(_high(h)))  # (F,)
        h_scaled = (h.to(s.dtype) / s).to(h.dtype)
        # W_down diag(s) is formed and quantized (current scaling) inside down_proj's own forward, where ZeRO-3 has
        # gathered W_down whole; dh comes from W_down itself (Fp8Linear.forward).
        return self.down_proj(h_scaled, in_scale=s)


VARIANTS = {"token": SmoothSwiGLUToken, "channel": SmoothSwiGLUChannel}


def down_proj_input(mlp: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The tensor the down projection quantizes, for each variant (the quantity the monitor and tests watch)."""
    h = F.silu(mlp.gate_proj(x)) * mlp.up_proj(x)
    if isinstance(mlp, SmoothSwiGLUToken):
        u = mlp.up_proj(x)
        return F.silu(mlp.gate_proj(x)) * (u / _safe(u.abs().amax(dim=-1, keepdim=True)))
    if isinstance(mlp, SmoothSwiGLUChannel):
        return h / _safe(h.abs().flatten(0, -2).amax(dim=0))
    return h
