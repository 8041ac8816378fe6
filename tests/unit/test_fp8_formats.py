"""FP8 formats: the saturating quantize agrees to the bit with a float64 round-to-nearest-even written from the
format definition (every bit pattern's value, nearest grid point, ties to the even mantissa)."""

from __future__ import annotations

import math

import pytest
import torch

from fp8train.fp8.formats import (
    E4M3,
    E5M2,
    dequantize,
    fp8_dtype,
    fp8_max,
    fp8_min_subnormal,
    fp8_overflow_threshold,
    quantize,
    scale_from_amax,
)

CASES = [(E4M3, "ocp"), (E4M3, "gaudi2"), (E5M2, "ocp"), (E5M2, "gaudi2")]


def grid(fmt: str, profile: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The finite values of ``fmt`` within the profile's range, ascending, in float64, and their bit patterns.

    -0 is left out (0 stands for both); the reference gives zeros the input's sign afterwards.
    """
    codes = torch.arange(256, dtype=torch.uint8)
    values = codes.view(fp8_dtype(fmt)).double()
    keep = torch.isfinite(values) & (values.abs() <= fp8_max(fmt, profile)) & (codes != 0x80)
    values, codes = values[keep], codes[keep]
    order = values.argsort()
    return values[order], codes[order]


def reference_quantize(v: torch.Tensor, fmt: str, profile: str) -> torch.Tensor:
    """Round float64 ``v`` to the nearest grid value, ties to the even mantissa (even bit pattern); bits as uint8."""
    values, codes = grid(fmt, profile)
    hi = torch.searchsorted(values, v).clamp(1, len(values) - 1)  # values[hi - 1] < v <= values[hi], clamped
    v = v.clamp(values[0], values[-1])  # beyond the range the nearest grid value is the end of the grid
    lo = hi - 1
    d_lo, d_hi = (v - values[lo]).abs(), (values[hi] - v).abs()
    lo_even = codes[lo] % 2 == 0
    pick_lo = (d_lo < d_hi) | ((d_lo == d_hi) & lo_even)
    out = torch.where(pick_lo, codes[lo], codes[hi])
    # A result of zero carries the sign of the input (-0 for small negatives and for -0 itself).
    return torch.where((out == 0) & torch.signbit(v), torch.tensor(0x80, dtype=torch.uint8), out)


def bits(q: torch.Tensor) -> torch.Tensor:
    return q.view(torch.uint8)


def ties(fmt: str, profile: str) -> torch.Tensor:
    """Exact midpoints between neighbouring grid values (representable in fp32: one more mantissa bit)."""
    values, _ = grid(fmt, profile)
    return ((values[1:] + values[:-1]) / 2).float()


def sample_inputs(fmt: str, profile: str) -> torch.Tensor:
    """Normal values, Cauchy-tailed outliers, subnormals, exact ties and values beyond the range, both signs."""
    torch.manual_seed(1234)
    g = torch.Generator().manual_seed(1234)
    limit = fp8_max(fmt, profile)
    tiny = fp8_min_subnormal(fmt)
    normal = torch.randn(20000, generator=g) * limit / 8
    heavy = torch.distributions.StudentT(1.0).sample((20000,)) * limit / 100  # Cauchy tails: far outliers
    subnormal = (torch.rand(20000, generator=g) * 2 - 1) * tiny * 16  # around and below the smallest normal
    edges = torch.tensor([limit, limit * 1.001, limit * 1.03, limit * 1.1, limit * 2, 1e6, 1e30, 3e38, 0.0])
    t = ties(fmt, profile)
    return torch.cat([normal, heavy, subnormal, t, -t, edges, -edges])


@pytest.mark.parametrize("fmt,profile", CASES)
@pytest.mark.parametrize("scale", [1.0, 2.0**-3, 0.37])
def test_quantize_matches_float64_round_to_nearest_even(fmt, profile, scale):
    x = sample_inputs(fmt, profile)
    s = torch.tensor(scale)
    # quantize multiplies in fp32 (the convention every backend follows), then rounds once to the grid.
    v = (x * s).double()
    q = quantize(x, fmt, s, profile)
    assert q.dtype == fp8_dtype(fmt)
    expected = reference_quantize(v, fmt, profile)
    mismatch = bits(q) != expected
    assert not mismatch.any(), (v[mismatch][:5], q[mismatch][:5].double(), expected[mismatch][:5])


@pytest.mark.parametrize("fmt,profile", CASES)
def test_ties_round_to_even_mantissa(fmt, profile):
    t = ties(fmt, profile)
    q = bits(quantize(t, fmt, 1.0, profile))
    assert torch.all(q % 2 == 0)  # the even neighbour, never the odd one
    # ... and each tie went to one of its two neighbours
    values, _ = grid(fmt, profile)
    got = quantize(t, fmt, 1.0, profile).double()
    assert torch.all((got == values[:-1]) | (got == values[1:]))


@pytest.mark.parametrize("fmt,profile", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_saturates_and_never_makes_nan_or_inf_from_finite_inputs(fmt, profile, dtype):
    limit = fp8_max(fmt, profile)
    info = torch.finfo(dtype)
    x = torch.tensor([1e30, -1e30, 0.0, -0.0, info.max, -info.max, limit * 1.5, -limit * 1.5, 1e-30]).to(dtype)
    x = x[torch.isfinite(x)]
    q = quantize(x, fmt, torch.tensor(1.0), profile).double()
    assert torch.isfinite(q).all()
    assert q.abs().max() == limit
    big = x.double().abs() >= limit
    assert torch.all(q[big].abs() == limit) and torch.all(torch.sign(q[big]) == torch.sign(x[big].double()))
    # a huge scale saturates too
    assert torch.isfinite(quantize(torch.randn(100), fmt, torch.tensor(1e30), profile).double()).all()


@pytest.mark.parametrize("fmt,profile", CASES)
def test_an_inf_input_stays_non_finite_rather_than_saturating(fmt, profile):
    """In bf16 an inf reaches the loss and the step is skipped; saturated to max it would pass unnoticed."""
    x = torch.tensor([math.inf, -math.inf, 3e38, -3e38, 1.0])  # 3e38 * scale overflows fp32: still saturates
    for stochastic in (False, True):
        q = quantize(x, fmt, torch.tensor(100.0), profile, stochastic=stochastic).double()
        assert q[:2].isnan().all() and torch.isfinite(q[2:]).all()
        assert q[2:4].tolist() == [fp8_max(fmt, profile), -fp8_max(fmt, profile)]


@pytest.mark.parametrize("fmt,profile", CASES)
def test_nan_stays_nan(fmt, profile):
    x = torch.tensor([float("nan"), 1.0, float("nan")])
    for stochastic in (False, True):
        q = quantize(x, fmt, torch.tensor(1.0), profile, stochastic=stochastic).double()
        assert q.isnan().tolist() == [True, False, True]


def neighbours(v: torch.Tensor, fmt: str, profile: str) -> tuple[torch.Tensor, torch.Tensor]:
    values, _ = grid(fmt, profile)
    hi = torch.searchsorted(values, v.double()).clamp(0, len(values) - 1)
    lo = torch.where(values[hi] == v.double(), hi, (hi - 1).clamp(min=0))
    return values[lo], values[hi]


@pytest.mark.parametrize("fmt,profile", CASES)
def test_stochastic_rounding_is_unbiased_and_picks_a_neighbour(fmt, profile):
    g = torch.Generator().manual_seed(7)
    tiny = fp8_min_subnormal(fmt)
    limit = fp8_max(fmt, profile)
    points = torch.tensor([0.3, -1.7, 3.14159, limit * 0.97, -limit * 0.61, tiny * 0.3, -tiny * 2.6, tiny * 37.4])
    draws = 20000
    x = points.repeat_interleave(draws).reshape(len(points), draws)
    q = quantize(x, fmt, torch.tensor(1.0), profile, stochastic=True, generator=g).double()
    lo, hi = neighbours(points, fmt, profile)
    assert torch.all((q == lo[:, None]) | (q == hi[:, None]))
    p_up = (points.double() - lo) / (hi - lo)
    standard_error = (hi - lo) * torch.sqrt(p_up * (1 - p_up) / draws)
    err = (q.mean(dim=1) - points.double()).abs()
    assert torch.all(err <= 4 * standard_error + 1e-12 * points.double().abs()), (err, standard_error)
    assert torch.all((q == hi[:, None]).any(dim=1) & (q == lo[:, None]).any(dim=1))  # both neighbours happen


@pytest.mark.parametrize("fmt,profile", CASES)
def test_stochastic_rounding_keeps_grid_values_and_saturates(fmt, profile):
    values, _ = grid(fmt, profile)
    exact = values.float().repeat(8)
    q = quantize(exact, fmt, torch.tensor(1.0), profile, stochastic=True).double()
    assert torch.equal(q, exact.double())
    limit = fp8_max(fmt, profile)
    out = quantize(torch.tensor([1e30, -1e30, limit * 1.01]), fmt, 1.0, profile, stochastic=True).double()
    assert out.tolist() == [limit, -limit, limit]


def test_stochastic_rounding_is_reproducible_with_a_generator():
    x = torch.randn(1000)
    a = quantize(x, E5M2, 1.0, stochastic=True, generator=torch.Generator().manual_seed(3))
    b = quantize(x, E5M2, 1.0, stochastic=True, generator=torch.Generator().manual_seed(3))
    assert torch.equal(bits(a), bits(b))


def test_format_constants():
    assert fp8_max(E4M3) == 448 and fp8_max(E4M3, "gaudi2") == 240 and fp8_max(E5M2) == 57344
    assert fp8_min_subnormal(E4M3) == 2.0**-9 and fp8_min_subnormal(E5M2) == 2.0**-16
    for fmt in (E4M3, E5M2):  # the tables agree with torch's own dtypes
        values, _ = grid(fmt, "ocp")
        assert values.max() == fp8_max(fmt) and values[values > 0].min() == fp8_min_subnormal(fmt)
    with pytest.raises(ValueError, match="profile"):
        fp8_max(E4M3, "h100")
    with pytest.raises(ValueError, match="format"):
        fp8_dtype("e3m4")


def test_dequantize_divides_by_the_scale():
    x = torch.randn(64)
    s = torch.tensor(8.0)
    q = quantize(x, E4M3, s)
    assert torch.equal(dequantize(q, s), q.float() / 8.0)
    assert dequantize(q, s, torch.bfloat16).dtype == torch.bfloat16


def test_scale_from_amax_plain_pow2_and_margin():
    amax = torch.tensor([3.0, 448.0, 0.01])
    assert torch.allclose(scale_from_amax(amax, E4M3), 448.0 / amax)
    # pow2 rounds down: 448/3 = 149.3 -> 128, 448/448 = 1 -> 1, 448/0.01 = 44800 -> 32768
    assert scale_from_amax(amax, E4M3, pow2=True).tolist() == [128.0, 1.0, 32768.0]
    assert torch.allclose(scale_from_amax(amax, E4M3, margin=2), 448.0 / amax / 4)
    assert scale_from_amax(amax, E4M3, margin=1, pow2=True).tolist() == [64.0, 0.5, 16384.0]
    assert scale_from_amax(torch.tensor(3.0), E4M3, "gaudi2").item() == pytest.approx(80.0)
    # scaled amax lands on (or, with pow2, within a factor 2 below) the max: no saturation at the amax itself
    s = scale_from_amax(torch.tensor(2.7), E5M2, pow2=True)
    assert fp8_max(E5M2) / 2 < 2.7 * s.item() <= fp8_max(E5M2)


def test_scale_from_amax_keeps_previous_scale_when_amax_says_nothing():
    prev = torch.tensor(16.0)
    for bad in (0.0, math.inf, math.nan, 1e-45):  # 1e-45: fp8_max / amax overflows fp32
        assert scale_from_amax(torch.tensor(bad), E4M3, prev_scale=prev).item() == 16.0
        assert scale_from_amax(torch.tensor(bad), E4M3, pow2=True, prev_scale=prev).item() == 16.0
    assert scale_from_amax(torch.tensor(0.0), E4M3).item() == 1.0  # no previous scale: 1
    # keep: the previous scale wherever it is set, whatever the amax (delayed scaling with a ready history)
    amax, keep = torch.tensor([2.0, 2.0, 0.0]), torch.tensor([True, False, False])
    assert scale_from_amax(amax, E4M3, prev_scale=prev, keep=keep).tolist() == [16.0, 224.0, 16.0]


def test_overflow_threshold_is_max_plus_half_an_ulp():
    assert fp8_overflow_threshold(E4M3) == 448 + 16 and fp8_overflow_threshold(E4M3, "gaudi2") == 240 + 8
    assert fp8_overflow_threshold(E5M2) == 57344 + 4096
    # E5M2 has an inf, so torch's plain cast shows where rounding stops giving max: exactly at the threshold.
    below = torch.tensor([61440.0]).nextafter(torch.tensor([0.0]))
    assert below.to(torch.float8_e5m2).float().item() == 57344
    assert torch.tensor([61440.0]).to(torch.float8_e5m2).float().isinf().all()
