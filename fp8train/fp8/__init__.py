"""FP8 numerics (torch only): formats and saturating casts, scaling state, the FP8 ops and ``Fp8Linear``."""

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
from fp8train.fp8.linear import Fp8Linear
from fp8train.fp8.ops import Fp8Ops
from fp8train.fp8.scaling import ScalingConfig, TensorScaler, fp8_scalers, step_scalers

__all__ = [
    "E4M3",
    "E5M2",
    "Fp8Linear",
    "Fp8Ops",
    "ScalingConfig",
    "TensorScaler",
    "dequantize",
    "fp8_dtype",
    "fp8_max",
    "fp8_min_subnormal",
    "fp8_overflow_threshold",
    "fp8_scalers",
    "quantize",
    "scale_from_amax",
    "step_scalers",
]
