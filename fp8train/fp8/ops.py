"""The two FP8 primitives every backend provides: a saturating quantize that also returns the amax, and a scaled
matmul of two FP8 operands. ``Fp8Ops`` is the emulation that runs on any device; backends subclass it
(fp8train/backends/cuda.py: ``torch._scaled_mm``).

Layout convention of ``scaled_mm`` (the one cuBLASLt and ``torch._scaled_mm`` want): both operands are given with
the reduction dimension K last, like ``nn.Linear``'s weight, and the result is ``a @ b.T``:

    a_q (M, K), b_q (N, K)  ->  (M, N) = (a_q / scale_a) @ (b_q / scale_b).T

so the forward pass is ``scaled_mm(Qx, Qw)``, ``dX = scaled_mm(Qg, Qw.T)`` and ``dW = scaled_mm(Qg.T, Qx.T)``.
"""

from __future__ import annotations

import torch

from fp8train.fp8 import formats


def amax_of(x: torch.Tensor) -> torch.Tensor:
    """max |x| as a float32 0-dim tensor (0 for an empty tensor); NaN if x holds a NaN."""
    if x.numel() == 0:
        return torch.zeros((), dtype=torch.float32, device=x.device)
    x = x.detach().abs()
    if x.dim() >= 2:  # per row first: a kernel that produces x row by row (a norm, say) can reduce it as it goes
        x = x.amax(dim=-1)
    return x.amax().float()


class Fp8Ops:
    """FP8 quantize and matmul by emulation: real FP8 rounding through torch's float8 dtypes, fp32 matmul.

    The emulated matmul is bit-faithful to FP8 hardware with fp32 accumulation: every product of two FP8 values is
    exact in fp32 (at most 4 x 4 significant bits), so the only roundings are those of the fp32 sums. The matmul
    runs on the unscaled FP8 values and applies ``1 / (scale_a * scale_b)`` afterwards, as the hardware does; this
    also keeps it exact under TF32, whose 10 mantissa bits hold any FP8 value.
    """

    name = "emulated"
    # False where the device's FP8 GEMMs lack E5M2 x E5M2 (precision.profile=gaudi2's backward) and fall back here.
    e5m2_pairs = True

    def quantize(
        self,
        x: torch.Tensor,
        fmt: str,
        scale: torch.Tensor,
        profile: str = "ocp",
        stochastic: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(saturate(x * scale) in fmt, amax of x as fp32 0-dim)``; nothing here calls ``.item()``."""
        return formats.quantize(x.detach(), fmt, scale, profile, stochastic), amax_of(x)

    def scaled_mm(
        self,
        a_q: torch.Tensor,
        b_q: torch.Tensor,
        scale_a: torch.Tensor,
        scale_b: torch.Tensor,
        out_dtype: torch.dtype,
        fast_accum: bool = False,
    ) -> torch.Tensor:
        """``(a_q / scale_a) @ (b_q / scale_b).T`` in ``out_dtype``; a_q (M, K), b_q (N, K), both FP8.

        ``fast_accum`` lets a device accumulate with fewer bits than fp32 where that is faster (Hopper's FP8
        tensor cores without the periodic promotion to fp32); the emulation always sums in fp32."""
        acc = a_q.float() @ b_q.float().t()  # (M, N), exact products, fp32 sums
        # The product of the inverse scales in fp32, as torch._scaled_mm / cuBLASLt form their alpha.
        return (acc * (scale_a.float().reciprocal() * scale_b.float().reciprocal())).to(out_dtype)
