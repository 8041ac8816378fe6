"""FP8 formats and the saturating quantize / dequantize every part of fp8train uses.

    value = sign * 2^(e - bias) * 1.m     (subnormals: 2^(1 - bias) * 0.m)

| format | torch dtype    | mantissa bits | min normal exponent | max (ocp) | max (gaudi2) |
|--------|----------------|---------------|---------------------|-----------|--------------|
| e4m3   | float8_e4m3fn  | 3             | -6                  | 448       | 240          |
| e5m2   | float8_e5m2    | 2             | -14                 | 57344     | 57344        |

A plain ``tensor.to(float8)`` does not saturate the same way on every PyTorch version (older ones give NaN for
e4m3fn out of range; 2.13 clamps e4m3fn to 448 but sends e5m2 >= 61440 to inf), and none knows that Gaudi2's
E4M3 hardware saturates at 240. So every quantize here clamps to the profile's max first: finite inputs never
give NaN or inf, and the CPU emulation rounds exactly as the hardware profile does.

Scaling convention (as in Transformer Engine): ``q = saturate(x * scale)``, ``x ~= q / scale``.
"""

from __future__ import annotations

import math

import torch

E4M3 = "e4m3"
E5M2 = "e5m2"
PROFILES = ("ocp", "gaudi2")

_DTYPE = {E4M3: torch.float8_e4m3fn, E5M2: torch.float8_e5m2}
_MANTISSA_BITS = {E4M3: 3, E5M2: 2}
_MIN_NORMAL_EXP = {E4M3: -6, E5M2: -14}
_MAX = {(E4M3, "ocp"): 448.0, (E4M3, "gaudi2"): 240.0, (E5M2, "ocp"): 57344.0, (E5M2, "gaudi2"): 57344.0}


def fp8_dtype(fmt: str) -> torch.dtype:
    """The torch storage dtype of a format."""
    return _DTYPE[_check_fmt(fmt)]


def fp8_max(fmt: str, profile: str = "ocp") -> float:
    """Largest finite value of ``fmt`` on a hardware profile (Gaudi2 saturates E4M3 at 240)."""
    if profile not in PROFILES:
        raise ValueError(f"unknown FP8 profile {profile!r}; one of {PROFILES}")
    return _MAX[(_check_fmt(fmt), profile)]


def fp8_overflow_threshold(fmt: str, profile: str = "ocp") -> float:
    """Where saturation starts to lose information: ``max + ulp(max) / 2``.

    A value between max and this threshold would round to max even in a format without a limit, so clamping it
    changes nothing; beyond it, the clamp replaces what rounding would have given (or inf) by max. E4M3 448 -> 464,
    Gaudi2's 240 -> 248, E5M2 57344 -> 61440 (where torch's own cast starts giving inf)."""
    top = fp8_max(fmt, profile)
    ulp = 2.0 ** (math.floor(math.log2(top)) - _MANTISSA_BITS[fmt])
    return top + ulp / 2


def fp8_min_subnormal(fmt: str) -> float:
    """Smallest positive value of ``fmt``: values below half of it flush to zero."""
    return 2.0 ** (_MIN_NORMAL_EXP[_check_fmt(fmt)] - _MANTISSA_BITS[fmt])


def quantize(
    x: torch.Tensor,
    fmt: str,
    scale: torch.Tensor | float,
    profile: str = "ocp",
    stochastic: bool = False,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Saturating cast of ``x * scale`` to FP8: clamp to +-max, then round to nearest even (or stochastically).

    Computed in float32 whatever the input dtype. Finite inputs never give NaN or inf (one whose product with the
    scale overflows float32 saturates too). NaN stays NaN and +-inf becomes NaN: saturating an inf to max would
    hide it, where in bf16 it reaches the loss and the step is skipped (its amaxes discarded with it).
    """
    limit = fp8_max(fmt, profile)
    v = (x.float() * scale).clamp(-limit, limit)
    # inf * 0 is the NaN: a NaN constant would keep the compiler from merging two casts of one input (nan != nan)
    v = torch.where(x.isinf(), x.float() * 0.0, v)
    if stochastic:
        v = _round_stochastic(v, fmt, generator)
    return v.to(fp8_dtype(fmt))


def dequantize(q: torch.Tensor, scale: torch.Tensor | float, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``q / scale`` in ``dtype`` (the division happens in float32)."""
    return (q.float() / scale).to(dtype)


def scale_from_amax(
    amax: torch.Tensor,
    fmt: str,
    profile: str = "ocp",
    margin: int = 0,
    pow2: bool = False,
    prev_scale: torch.Tensor | None = None,
    keep: torch.Tensor | None = None,
) -> torch.Tensor:
    """``fp8_max / amax / 2^margin``, optionally rounded down to a power of two (Habana TE's rule).

    amax == 0 (an all-zero tensor) or a non-finite amax keeps ``prev_scale`` (1.0 if none): there is nothing to
    learn about the range from it, and an infinite scale would turn the next quantize into NaN. ``keep`` (bool)
    keeps ``prev_scale`` wherever it is true, whatever the amax (delayed scaling once its history is ready).
    """
    amax = amax.float()
    ratio = fp8_max(fmt, profile) / amax
    scale = torch.exp2(torch.floor(torch.log2(ratio))) if pow2 else ratio
    scale = scale * 2.0 ** (-margin)
    fallback = torch.ones_like(scale) if prev_scale is None else prev_scale.float().expand_as(scale)
    # One comparison covers every bad case (amax >= 0): amax 0 -> inf * 0, amax inf -> 0 * inf, NaN -> NaN,
    # an amax so small that the scale overflows -> inf * amax; a usable pair gives about fp8_max / 2^margin.
    ok = scale * amax < math.inf
    if keep is not None:
        # One select rather than where(keep, prev, where(ok, scale, prev)): a simpler kernel after the amax
        # reduction (the nested form was part of one Triton 3.6 failed to build for an H100; TensorScaler.count).
        ok = ok & ~keep
    return torch.where(ok, scale, fallback)


def _round_stochastic(v: torch.Tensor, fmt: str, generator: torch.Generator | None) -> torch.Tensor:
    """Round float32 ``v`` (already within +-max) to a neighbouring FP8 grid point, up with probability equal to
    the distance from the lower one in ulps: unbiased, E[result] == v. The result is exactly representable, so
    the cast that follows does not round again."""
    # Spacing of the FP8 grid around v: 2^(exponent - mantissa_bits), constant below the smallest normal.
    _, exp = torch.frexp(v)  # v = mant * 2^exp, 0.5 <= |mant| < 1, so floor(log2|v|) = exp - 1
    e = torch.clamp(exp - 1, min=_MIN_NORMAL_EXP[fmt])
    ulp = torch.exp2((e - _MANTISSA_BITS[fmt]).float())
    lower = torch.floor(v / ulp) * ulp
    u = torch.rand(v.shape, generator=generator, device=v.device)
    return torch.where(u < (v - lower) / ulp, lower + ulp, lower)


def _check_fmt(fmt: str) -> str:
    if fmt not in _DTYPE:
        raise ValueError(f"unknown FP8 format {fmt!r}; one of {E4M3!r}, {E5M2!r}")
    return fmt
