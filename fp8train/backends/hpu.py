"""Intel Gaudi through Habana's PyTorch bridge. The only module that imports ``habana_frameworks``.

Not run on Gaudi hardware in fp8train's own tests (there is none in CI); written against the documented API
of Habana's software 1.19-1.24. Kept thin on purpose: everything here is a direct call into Habana's package.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass

import torch

from fp8train.backends.base import Backend
from fp8train.errors import BackendError

GAUDI_IMAGE = "vault.habana.ai/gaudi-docker/1.23.0/ubuntu22.04/habanalabs/pytorch-installer-2.9.0:latest"


def import_habana():
    """Import Habana's bridge; lazy mode must be chosen before the first import, so it is set here."""
    os.environ.setdefault("PT_HPU_LAZY_MODE", "1")
    try:
        return importlib.import_module("habana_frameworks.torch.core")
    except ImportError as e:
        raise BackendError(
            f"backend.name=hpu needs Habana's PyTorch bridge (habana_frameworks), which is not installed here "
            f"({e}). It ships only inside Habana's images: run fp8train in docker/Dockerfile.gaudi, built on "
            f"{GAUDI_IMAGE}, or choose backend.name=cpu or backend.name=cuda."
        ) from None


def lazy_mode() -> bool:
    return os.environ.get("PT_HPU_LAZY_MODE", "1") == "1"


@dataclass
class HpuBackend(Backend):
    def __post_init__(self) -> None:
        self._htcore = import_habana()
        if not torch.hpu.is_available():
            raise BackendError("backend.name=hpu: habana_frameworks imports but sees no Gaudi device (hl-smi).")

    def mark_step(self) -> None:
        if lazy_mode():
            self._htcore.mark_step()

    def synchronize(self) -> None:
        torch.hpu.synchronize()

    def peak_memory_bytes(self) -> int:
        return torch.hpu.max_memory_allocated()

    def reset_peak_memory(self) -> None:
        torch.hpu.reset_peak_memory_stats()

    def compile(self, model: torch.nn.Module) -> torch.nn.Module:
        if lazy_mode():
            raise BackendError("backend.compile=true on hpu needs eager mode: set PT_HPU_LAZY_MODE=0.")
        return torch.compile(model, backend="hpu_backend")

    def fused_fp8_adamw(
        self, param_groups: list[dict], lr: float, betas: tuple[float, float], eps: float, m_format: str, v_format: str
    ) -> torch.optim.Optimizer:
        """Habana's fused AdamW with FP8 moments (its own kernel and scaling), instead of fp8train's AdamWFp8."""
        from habana_frameworks.torch.hpex.optimizers import FusedAdamW

        dtypes = {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}
        return FusedAdamW(param_groups, lr=lr, betas=betas, eps=eps, moments_dtype=(dtypes[m_format], dtypes[v_format]))

    def describe(self) -> str:
        return f"hpu ({torch.hpu.get_device_name()}, {'lazy' if lazy_mode() else 'eager'} mode)"
