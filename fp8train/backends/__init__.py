"""Device backends: ``select(cfg)`` turns ``backend.name`` into a Backend; device specifics live only here."""

from __future__ import annotations

import importlib.util

import torch

from fp8train.backends.base import Backend
from fp8train.config import BackendConfig, BackendName
from fp8train.errors import BackendError

__all__ = ["Backend", "select", "detect", "unavailable"]


def detect() -> BackendName:
    """What backend.name=auto picks on this machine."""
    if importlib.util.find_spec("habana_frameworks") is not None:
        return BackendName.hpu
    if torch.cuda.is_available():
        return BackendName.cuda
    return BackendName.cpu


def unavailable(cfg: BackendConfig) -> str | None:
    """Why this machine cannot run the backend ``cfg`` names, naming the override that fixes it; None if it can.
    Cheap (no device is initialised), so a run can ask before it creates anything."""
    if cfg.name == BackendName.cuda and not torch.cuda.is_available():
        return (
            "backend.name=cuda: no CUDA device is visible (torch.cuda.is_available() is False, torch "
            f"{torch.__version__}). Use backend.name=cpu, or install a CUDA build of torch."
        )
    if cfg.name == BackendName.hpu and importlib.util.find_spec("habana_frameworks") is None:
        from fp8train.backends.hpu import GAUDI_IMAGE

        return (
            "backend.name=hpu needs Habana's PyTorch bridge (habana_frameworks), which is not installed here. It "
            f"ships only inside Habana's images: run fp8train in docker/Dockerfile.gaudi, built on {GAUDI_IMAGE}, "
            "or choose backend.name=cpu or backend.name=cuda."
        )
    return None


def select(cfg: BackendConfig, local_rank: int = 0) -> Backend:
    """Build the backend a run asked for, or fail with a message naming the override that fixes it."""
    problem = unavailable(cfg)
    if problem:
        raise BackendError(problem)
    name = detect() if cfg.name == BackendName.auto else cfg.name
    compiling = {"compile_options": cfg.inductor_options(), "compile_scope": cfg.compile_scope.value}
    if name == BackendName.cpu:
        from fp8train.backends.cpu import CpuBackend

        return CpuBackend(name="cpu", device=torch.device("cpu"), dist_backend="gloo", threads=cfg.threads, **compiling)
    if name == BackendName.cuda:
        from fp8train.backends.cuda import CudaBackend

        return CudaBackend(name="cuda", device=torch.device("cuda", local_rank), dist_backend="nccl", **compiling)
    from fp8train.backends.hpu import HpuBackend

    return HpuBackend(name="hpu", device=torch.device("hpu"), dist_backend="hccl", eager=cfg.compile, **compiling)
