"""Outlier statistics as pure functions of tensors (no hooks, no state, no device syncs).

Notation (fp8train/model/mlp.py): ``g = x @ W_gate.T``, ``u = x @ W_up.T``, ``h = silu(g) * u``, ``y = h @ W_down.T``;
tokens are flattened, so h is (M, F): M tokens, F = ffn_dim channels (neurons).

Every function returns 0-d or small tensors on the input's device; the monitor reads all of a step's results with
one transfer (:func:`to_host`). Reductions run in fp32 on h divided by its amax: RMS / amax and kurtosis do not
depend on h's units, and in units of its amax no square or 4th power can leave fp32's range, however large h
grows in a diverging run (h of 1e10 has a 4th power of 1e40, beyond fp32's 3.4e38) or however small it is.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def h_from(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """The plain SwiGLU down-projection input ``silu(g) * u`` in fp32, as (M, F).

    This is the quantity that grows quadratically once a neuron's W_up and W_gate rows align, whatever the
    Smooth-SwiGLU variant later feeds to the FP8 quantizer (that tensor is the down projection's own input).
    """
    return (F.silu(g.detach().float()) * u.detach().float()).flatten(0, -2)


def kurtosis(x: torch.Tensor) -> torch.Tensor:
    """Pearson kurtosis ``E[(x - mean)^4] / E[(x - mean)^2]^2`` over all elements.

    3 for a Gaussian, 1 for a symmetric +-1 tensor (the smallest possible), 1.8 for a uniform; a few huge values
    among many ordinary ones push it far above 3. A constant tensor has 0 variance: its kurtosis is reported as 0.
    """
    x = x.detach().float().flatten()
    return _kurtosis_of_unit(_in_units_of_amax(x, x.abs().amax()))


def _kurtosis_of_unit(x: torch.Tensor) -> torch.Tensor:
    """kurtosis of a tensor already divided by its amax."""
    centred = x - x.mean()
    var = centred.square().mean()
    fourth = centred.square().square().mean()
    return torch.where(var > 0, fourth / var.square().clamp(min=torch.finfo(torch.float32).tiny), 0.0)


def _in_units_of_amax(x: torch.Tensor, amax: torch.Tensor) -> torch.Tensor:
    """x / amax (all zeros stay zeros): values in [-1, 1], whose powers fp32 holds. A non-finite amax gives NaN."""
    return x / torch.where(amax > 0, amax, 1.0)


def top_channels(h_MF: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(amax, index)`` of the k channels (columns of h) with the largest max |h| over tokens, largest first."""
    per_channel = h_MF.detach().abs().float().amax(dim=0)  # (F,)
    return per_channel.topk(min(k, per_channel.numel()))


def h_stats(h_MF: torch.Tensor, top_k: int) -> dict[str, torch.Tensor]:
    """amax, RMS, amax / RMS (how far the largest value stands above the typical one), kurtosis, top channels."""
    h = h_MF.detach().float()
    amax = h.abs().amax()
    unit = _in_units_of_amax(h, amax)
    rms_over_amax = unit.square().mean().sqrt()  # in (0, 1]: no overflow, no underflow
    top_amax, top_index = top_channels(h, top_k)
    return {
        "h_amax": amax,
        "h_rms": amax * rms_over_amax,
        "h_amax_over_rms": torch.where(rms_over_amax > 0, 1 / rms_over_amax, 0.0),
        "h_kurtosis": _kurtosis_of_unit(unit),
        "top_channels": torch.stack([top_index.float(), top_amax], dim=1),  # (k, 2): channel, its amax
    }


def alignment(w_up: torch.Tensor, w_gate: torch.Tensor, top_k: int) -> dict[str, torch.Tensor]:
    """Per neuron j, the cosine of W_up[j] and W_gate[j] (the paper's "w1/w2 correlation"), summarised.

    cos_mean_abs, cos_max_abs, cos_frac_above_half (|cos| > 0.5), the norms of all rows (mean) and, for the
    top_k most aligned neurons, (neuron, cos, |W_up[j]|, |W_gate[j]|). An aligned neuron (cos -> +-1) computes
    ~silu(x.w) * (x.w): quadratic in an outlier of x along w.
    """
    up, gate = w_up.detach().float(), w_gate.detach().float()
    up_norm, gate_norm = up.norm(dim=1), gate.norm(dim=1)  # (F,)
    tiny = torch.finfo(torch.float32).tiny
    cos = (up * gate).sum(dim=1) / (up_norm * gate_norm).clamp(min=tiny)  # a zero row has cos 0
    abs_cos = cos.abs()
    _, idx = abs_cos.topk(min(top_k, abs_cos.numel()))
    return {
        "cos_mean_abs": abs_cos.mean(),
        "cos_max_abs": abs_cos.amax(),
        "cos_frac_above_half": (abs_cos > 0.5).float().mean(),
        "w_up_norm_mean": up_norm.mean(),
        "w_gate_norm_mean": gate_norm.mean(),
        "aligned_neurons": torch.stack([idx.float(), cos[idx], up_norm[idx], gate_norm[idx]], dim=1),  # (k, 4)
    }


def to_host(tree):
    """A nested dict / list of tensors as the same structure of Python floats and lists, with one transfer."""
    leaves: list[torch.Tensor] = []

    def collect(node):
        if torch.is_tensor(node):
            leaves.append(node.detach().float().flatten())  # float32: every statistic is one; Gaudi has no float64
        elif isinstance(node, dict):
            for v in node.values():
                collect(v)
        elif isinstance(node, (list, tuple)):
            for v in node:
                collect(v)

    collect(tree)
    if not leaves:
        return tree
    device = leaves[0].device
    flat = torch.cat([t.to(device) for t in leaves]).tolist()  # the one device sync
    pos = 0

    def rebuild(node):
        nonlocal pos
        if torch.is_tensor(node):
            n = node.numel()
            values = flat[pos : pos + n]
            pos += n
            return values[0] if node.dim() == 0 else _unflatten(values, list(node.shape))
        if isinstance(node, dict):
            return {k: rebuild(v) for k, v in node.items()}
        if isinstance(node, (list, tuple)):
            return [rebuild(v) for v in node]
        return node

    return rebuild(tree)


def _unflatten(values: list[float], shape: list[int]) -> list:
    """A flat list in row-major order as nested lists of ``shape``."""
    if len(shape) == 1:
        return values
    step = len(values) // shape[0] if shape[0] else 0
    return [_unflatten(values[i * step : (i + 1) * step], shape[1:]) for i in range(shape[0])]
