"""Device backends: ``select(cfg)`` turns ``backend.name`` into a Backend; device specifics live only here."""

from __future__ import annotations

import importlib.util

import torch

from fp8train.backends.base import Backend
from fp8train.config import BackendConfig, BackendName
from fp8train.errors import BackendError

__all__ = ["Backend", "select", "detect"]


def detect() -> BackendName:
    """What backend.name=auto picks on this machine."""
    if importlib.util.find_spec("habana_frameworks") is not None:
        return BackendName.hpu
    if torch.cuda.is_available():
        return BackendName.cuda
    return BackendName.cpu


def select(cfg: BackendConfig, local_rank: int = 0) -> Backend:
    """Build the backend a run asked for, or fail with a message naming the override that fixes it."""
    name = detect() if cfg.name == BackendName.auto else cfg.name
    compiling = {"compile_options": cfg.inductor_options(), "compile_scope": cfg.compile_scope.value}
    if name == BackendName.cpu:
        from fp8train.backends.cpu import CpuBackend

        return CpuBackend(name="cpu", device=torch.device("cpu"), dist_backend="gloo", threads=cfg.threads, **compiling)
    if name == BackendName.cuda:
        if not torch.cuda.is_available():
            raise BackendError(
                "backend.name=cuda: no CUDA device is visible (torch.cuda.is_available() is False, torch "
                f"{torch.__version__}). Use backend.name=cpu, or install a CUDA build of torch."
            )
        from fp8train.backends.cuda import CudaBackend

        return CudaBackend(name="cuda", device=torch.device("cuda", local_rank), dist_backend="nccl", **compiling)
    from fp8train.backends.hpu import HpuBackend

    return HpuBackend(name="hpu", device=torch.device("hpu"), dist_backend="hccl", eager=cfg.compile, **compiling)
