"""NVIDIA GPUs."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from fp8train.backends.base import Backend
from fp8train.fp8.ops import Fp8Ops

log = logging.getLogger("fp8train")

FP8_MIN_CAPABILITY = (8, 9)  # Ada (sm_89) and Hopper (sm_90) have FP8 tensor cores


class ScaledMmOps(Fp8Ops):
    """FP8 matmuls on tensor cores through ``torch._scaled_mm`` (quantize is the emulated one: plain torch ops that
    torch.compile fuses into one amax + scale + cast kernel).

    cuBLASLt's constraints: a row-major, b column-major, M, K and N multiples of 16, fp32 scales, and no E5M2 x
    E5M2 product (dX uses E5M2 x E4M3; only precision.profile=gaudi2 asks for E5M2 x E5M2, and gets the
    emulation). ``_scaled_mm`` takes inverse scales: x = q / scale.
    """

    name = "scaled_mm"
    e5m2_pairs = False

    def scaled_mm(
        self,
        a_q: torch.Tensor,
        b_q: torch.Tensor,
        scale_a: torch.Tensor,
        scale_b: torch.Tensor,
        out_dtype: torch.dtype,
        fast_accum: bool = False,
    ) -> torch.Tensor:
        (m, k), n = a_q.shape, b_q.shape[0]
        both_e5m2 = a_q.dtype == torch.float8_e5m2 and b_q.dtype == torch.float8_e5m2
        if both_e5m2 or m % 16 or k % 16 or n % 16:
            # Dtype and shape checks only (static under torch.compile); the emulation gives the same numbers.
            return super().scaled_mm(a_q, b_q, scale_a, scale_b, out_dtype)
        return torch._scaled_mm(
            a_q.contiguous(),
            b_q.contiguous().t(),  # (K, N) column-major, as cuBLASLt wants its second operand
            scale_a=scale_a.float().reciprocal(),
            scale_b=scale_b.float().reciprocal(),
            out_dtype=out_dtype,
            use_fast_accum=fast_accum,
        )


@dataclass
class CudaBackend(Backend):
    def __post_init__(self) -> None:
        torch.cuda.set_device(self.device)
        # TF32 for the fp32 matmuls that remain (lm_head in fp32 recipes, optimizer math does not use matmuls).
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    def synchronize(self) -> None:
        torch.cuda.synchronize(self.device)

    def peak_memory_bytes(self) -> int:
        return torch.cuda.max_memory_allocated(self.device)

    def reset_peak_memory(self) -> None:
        torch.cuda.reset_peak_memory_stats(self.device)

    def rng_state(self) -> dict:
        return {"cuda": torch.cuda.get_rng_state(self.device)}

    def set_rng_state(self, state: dict) -> None:
        if "cuda" in state:
            torch.cuda.set_rng_state(state["cuda"], self.device)

    def has_fused_adamw(self) -> bool:
        return True

    def fp8_ops(self) -> Fp8Ops:
        """``torch._scaled_mm`` on sm_89+; below that, FP8 numerics are emulated (exact, but no speed-up)."""
        capability = torch.cuda.get_device_capability(self.device)
        if capability >= FP8_MIN_CAPABILITY:
            return ScaledMmOps()
        log.warning(
            "FP8 is emulated below sm_89: this GPU is sm_%d%d, so FP8 matmuls run as fp32 matmuls of FP8 values "
            "(same numerics, no speed-up). Use precision=bf16 for speed on this GPU.",
            *capability,
        )
        return Fp8Ops()

    def describe(self) -> str:
        major, minor = torch.cuda.get_device_capability(self.device)
        return f"cuda ({torch.cuda.get_device_name(self.device)}, sm_{major}{minor})"
