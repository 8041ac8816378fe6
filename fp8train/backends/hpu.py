"""Intel Gaudi through Habana's PyTorch bridge. The only module that imports ``habana_frameworks``.

Not run on Gaudi hardware in fp8train's own tests (there is none in CI); written against the documented API
of Habana's software 1.19-1.24. Kept thin on purpose: everything here is a direct call into Habana's package.
tests/hpu runs it on a Gaudi: ``python -m pytest tests/hpu``.

- Mode: ``PT_HPU_LAZY_MODE`` is read once, when habana_frameworks is first imported, so it is set here before
  that import: 1 (lazy: ops gather into graphs cut by ``mark_step``) unless the run asks for
  ``backend.compile=true`` (eager mode + ``torch.compile(backend="hpu_backend")``, which also sets
  ``PT_TE_CUSTOM_OP=1``: Habana TE's ops as custom ops, as torch.compile needs them). A value already in the
  environment wins.
- Communication: importing ``habana_frameworks.torch.distributed.hccl`` registers the ``hccl`` backend.
- Kernels: Habana's fused RMSNorm and SDPA replace the model's plain ones (``fuse``); RoPE stays in PyTorch.
- FP8, two engines: ``native`` = fp8train's Fp8Linear with ``HpuFp8Ops`` (Gaudi2 casts and GEMMs), ``te`` =
  Habana's Transformer Engine (fp8train/backends/hpu_te.py).
"""

from __future__ import annotations

import contextlib
import importlib
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch

from fp8train.backends.base import Backend
from fp8train.errors import BackendError
from fp8train.fp8 import formats
from fp8train.fp8.ops import Fp8Ops, amax_of

GAUDI_IMAGE = "vault.habana.ai/gaudi-docker/1.23.0/ubuntu22.04/habanalabs/pytorch-installer-2.9.0:latest"


COMPILE_NEEDS_EAGER = (
    "backend.compile=true on hpu needs eager mode, but PT_HPU_LAZY_MODE=1 is set in the environment: unset it "
    "(fp8train then picks eager mode for compiled runs) or set PT_HPU_LAZY_MODE=0."
)


def import_habana(eager: bool = False):
    """Import Habana's bridge; lazy or eager mode must be chosen before the first import, so it is set here."""
    os.environ.setdefault("PT_HPU_LAZY_MODE", "0" if eager else "1")
    if eager:  # Habana TE's ops under torch.compile need it (precision.engine=te); set before anything Habana loads
        os.environ.setdefault("PT_TE_CUSTOM_OP", "1")
    try:
        core = importlib.import_module("habana_frameworks.torch.core")
        importlib.import_module("habana_frameworks.torch.distributed.hccl")  # registers the "hccl" backend
        return core
    except ImportError as e:
        raise BackendError(
            f"backend.name=hpu needs Habana's PyTorch bridge (habana_frameworks), which is not installed here "
            f"({e}). It ships only inside Habana's images: run fp8train in docker/Dockerfile.gaudi, built on "
            f"{GAUDI_IMAGE}, or choose backend.name=cpu or backend.name=cuda."
        ) from None


def lazy_mode() -> bool:
    return os.environ.get("PT_HPU_LAZY_MODE", "1") == "1"


class HpuFp8Ops(Fp8Ops):
    """Gaudi2's FP8 cast and GEMM (``torch.ops.hpu``). E4M3 saturates at 240 in hardware; GEMM operands must share
    one format, which Fp8Linear's ``hybrid`` mode (precision.profile=gaudi2) guarantees."""

    name = "hpu"

    def quantize(self, x, fmt, scale, profile="gaudi2", stochastic=False):
        # Clamped to +-max / scale first, as on every backend: Habana documents E4M3 saturating at 240 but not what
        # the E5M2 cast does past 57344, and a finite input must never become inf or NaN. An inf becomes NaN, as in
        # formats.quantize: clamped to max it would hide the overflow from the loss, and the step would not be skipped.
        x = x.detach()
        limit = formats.fp8_max(fmt, profile) / scale.float()
        xs = torch.where(x.isinf(), x * 0.0, torch.clamp(x, -limit, limit))  # inf * 0 is the NaN
        q, _ = torch.ops.hpu.cast_to_fp8_v2(
            xs, scale.float(), stochastic, False, formats.fp8_dtype(fmt)
        )  # scale multiplies
        return q, amax_of(x)

    def scaled_mm(self, a_q, b_q, scale_a, scale_b, out_dtype, fast_accum=False):  # fp8_gemm_v2 has no such switch
        if a_q.dtype != b_q.dtype:
            raise ValueError("Gaudi2 FP8 GEMMs need both operands in one format (precision.profile=gaudi2)")
        # (M, K) x (N, K)^T -> (M, N); the *_scale_inv arguments multiply the product back to real units.
        return torch.ops.hpu.fp8_gemm_v2(
            a_q,
            False,
            b_q,
            True,
            None,
            out_dtype,
            scale_a.float().reciprocal(),
            scale_b.float().reciprocal(),
            None,
            False,
        )


@dataclass
class HpuBackend(Backend):
    eager: bool = False  # backend.compile=true: eager mode + torch.compile(backend="hpu_backend")

    def __post_init__(self) -> None:
        self._htcore = import_habana(self.eager)
        if self.eager and lazy_mode():  # refused now, before the model and the process group are built
            raise BackendError(COMPILE_NEEDS_EAGER)
        if not torch.hpu.is_available():
            raise BackendError("backend.name=hpu: habana_frameworks imports but sees no Gaudi device (hl-smi).")
        self._te = None

    def mark_step(self) -> None:
        if lazy_mode():
            self._htcore.mark_step()

    def synchronize(self) -> None:
        torch.hpu.synchronize()

    def peak_memory_bytes(self) -> int:
        return torch.hpu.max_memory_allocated()

    def reset_peak_memory(self) -> None:
        torch.hpu.reset_peak_memory_stats()

    def compile(self, model: torch.nn.Module) -> Callable:
        if lazy_mode():
            raise BackendError(COMPILE_NEEDS_EAGER)
        return super().compile(model)

    def compile_kwargs(self) -> dict:
        return {"backend": "hpu_backend", "options": self.compile_options or None}

    def inductor(self) -> bool:
        return False  # Gaudi compiles through hpu_backend only

    def fuse(self, model: torch.nn.Module) -> torch.nn.Module:
        """Habana's fused RMSNorm and FusedSDPA in place of the model's plain ones (same weights, same math)."""
        from habana_frameworks.torch.hpex.kernels import FusedSDPA
        from habana_frameworks.torch.hpex.normalization import FusedRMSNorm

        from fp8train.model.llama import Attention, RMSNorm

        def rms_norm(norm: RMSNorm):
            def forward(x: torch.Tensor) -> torch.Tensor:
                return FusedRMSNorm.apply(x, norm.weight.to(x.dtype), norm.eps)  # same dtype for both, as required

            return forward

        def sdpa(q, k, v, is_causal=False, enable_gqa=False):
            return FusedSDPA.apply(q, k, v, None, 0.0, is_causal, None, "None", False)

        for module in model.modules():
            if isinstance(module, RMSNorm):
                module.forward = rms_norm(module)
            elif isinstance(module, Attention):
                module.sdpa = sdpa
        return model

    def has_fused_adamw(self) -> bool:
        return False  # torch's fused AdamW is CUDA/CPU only; optim.habana_fused selects Habana's FP8 FusedAdamW

    def fp8_ops(self) -> Fp8Ops:
        return HpuFp8Ops()

    def _transformer_engine(self):
        if self._te is None:
            from fp8train.backends.hpu_te import import_te

            self._te = import_te()
        return self._te

    def te_linear(self, linear: torch.nn.Linear) -> torch.nn.Module:
        from fp8train.backends.hpu_te import TeLinear

        return TeLinear(linear, self._transformer_engine())

    def fp8_autocast(self, cfg, group) -> contextlib.AbstractContextManager:
        from fp8train.backends.hpu_te import fp8_autocast

        return fp8_autocast(self._transformer_engine(), cfg, group)

    def fused_fp8_adamw(
        self, param_groups: list[dict], lr: float, betas: tuple[float, float], eps: float, m_format: str, v_format: str
    ) -> torch.optim.Optimizer:
        """Habana's fused AdamW with FP8 moments (its own kernel and scaling), instead of fp8train's AdamWFp8."""
        from habana_frameworks.torch.hpex.optimizers import FusedAdamW

        dtypes = {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}
        return FusedAdamW(param_groups, lr=lr, betas=betas, eps=eps, moments_dtype=(dtypes[m_format], dtypes[v_format]))

    def describe(self) -> str:
        return f"hpu ({torch.hpu.get_device_name()}, {'lazy' if lazy_mode() else 'eager'} mode)"
