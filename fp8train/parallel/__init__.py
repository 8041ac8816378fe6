"""Engines: how a model and its optimizer are run over processes. ``wrap`` picks one from parallel.name.

Every engine offers the same few methods, so the trainer never branches on the engine:
``no_sync`` / ``backward`` per micro-batch, ``optimizer_step`` once per step (clip, skip non-finite steps, update),
``reduce_amax`` for FP8 delayed scaling, ``mean`` / ``sum`` over ranks for the losses it logs, ``save_state`` /
``load_state`` for the model and optimizer part of a checkpoint, and ``barrier`` / ``broadcast_object`` for the
little coordination the trainer needs.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_model, save_model
from torch import nn

from fp8train.backends import Backend
from fp8train.config import ParallelConfig, ParallelName, launch_vars
from fp8train.errors import CheckpointError, ConfigError, Fp8trainError

MODEL_FILE, OPTIMIZER_FILE = "model.safetensors", "optimizer.pt"
DEEPSPEED_DIR = "deepspeed"  # parallel=deepspeed: DeepSpeed's files of a checkpoint, CHECKPOINT/deepspeed/


@dataclass(frozen=True)
class LaunchEnv:
    """Where this process sits among the processes of a run, as a launcher described it in the environment."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1


def launch_env(cfg: ParallelConfig) -> LaunchEnv:
    """RANK / LOCAL_RANK / WORLD_SIZE as set by deepspeed, torchrun, or mpirun (OMPI_COMM_WORLD_*)."""
    if cfg.name == ParallelName.single:
        return LaunchEnv()
    found, problems = launch_vars()
    if problems:  # checked with the config already; for a Trainer built from Python
        raise ConfigError([f"parallel=deepspeed: {p}" for p in problems])
    return LaunchEnv(**found)


class SingleEngine:
    """One process, one device. Multi-process engines provide the same methods."""

    rank, world_size, is_main = 0, 1, True
    reduce_amax = None  # FP8 amaxes need no reduction with one process
    dp_group = None  # the process group of data-parallel ranks (for Habana TE's amax reduction)

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer):
        self.model = model
        self.optimizer = optimizer

    def no_sync(self, sync: bool) -> contextlib.AbstractContextManager:
        """Gradient accumulation: data-parallel engines skip the all-reduce unless ``sync``."""
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def optimizer_step(self, max_norm: float, loss: torch.Tensor) -> tuple[torch.Tensor, bool]:
        """Clip (when max_norm > 0) and update, unless the loss or the gradients are not finite: then the
        gradients are dropped and nothing moves. Returns (the global gradient norm before clipping, applied)."""
        grad_norm = clip_grad_norm(self.model, max_norm)
        applied = self.all_finite(loss, grad_norm)
        if applied:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm, applied

    def all_finite(self, *values: torch.Tensor) -> bool:
        """One host sync; the flag is max-reduced so that every data-parallel rank takes the same decision."""
        bad = torch.stack([(~torch.isfinite(v)).any() for v in values]).any().float().reshape(1)
        if self.reduce_amax is not None:
            self.reduce_amax(bad)
        return not bad.item()

    def mean(self, t: torch.Tensor) -> torch.Tensor:
        """The mean of ``t`` over data-parallel ranks (e.g. the loss of the whole global batch)."""
        return t

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        """The sum of ``t`` over data-parallel ranks (e.g. validation losses of each rank's share of the windows)."""
        return t

    def save_state(self, folder: Path) -> None:
        """Write the model and optimizer part of a checkpoint into ``folder`` (every rank calls this)."""
        save_model(self.model, str(folder / MODEL_FILE))
        torch.save(self.optimizer.state_dict(), folder / OPTIMIZER_FILE)

    def load_state(self, folder: Path, device: torch.device) -> None:
        check_single_layout(folder)
        try:
            load_weights(self.model, folder / MODEL_FILE, device)
        except RuntimeError as e:
            raise CheckpointError(
                f"resume={folder}: its weights do not fit this model ({str(e).splitlines()[0]}); resume with the "
                f"model settings the run was started with (see {folder / 'config.yaml'})."
            ) from None
        state = torch.load(folder / OPTIMIZER_FILE, map_location=device, weights_only=True)
        # torch's AdamW would take AdamWFp8's groups and fail at its first step (KeyError 'exp_avg').
        if isinstance(self.optimizer, torch.optim.AdamW) and any("m_format" in g for g in state["param_groups"]):
            raise CheckpointError(
                f"resume={folder}: its optimizer state is AdamWFp8's (FP8 moments, written with optim=adamw_fp8) and "
                f"this run has optim=adamw: resume with optim=adamw_fp8, or start a new run directory from its weights "
                f"alone (fresh optimizer state) with model.init_from={folder}."
            )
        self.optimizer.load_state_dict(state)

    def lost_contact(self, e: RuntimeError) -> str | None:
        """The cause, if ``e`` is a collective that failed because another rank died or hung; else None."""
        return None

    def close(self, clean: bool = True) -> None:
        """Leave the process group; ``clean=False`` after an error on this rank (see DeepSpeedEngine.close)."""


def barrier() -> None:
    """Wait for every rank (a no-op in a single process)."""
    if dist.is_initialized():
        dist.barrier()


def broadcast_object(obj):
    """Rank 0's ``obj`` on every rank (``obj`` itself in a single process)."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_gather_object(obj) -> list:
    """Every rank's ``obj``, in rank order (``[obj]`` in a single process)."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def check_single_layout(folder: Path) -> None:
    """Refuse a DeepSpeed checkpoint to a parallel=single run, before anything of it is read."""
    # DeepSpeed checkpoints carry a model.safetensors too (for export), but their optimizer state is DeepSpeed's.
    if (folder / DEEPSPEED_DIR).is_dir():
        raise CheckpointError(
            f"resume={folder}: written by parallel=deepspeed (its optimizer state is in {DEEPSPEED_DIR}/, there "
            f"is no {OPTIMIZER_FILE}): resume it with parallel=deepspeed (any number of ranks for ZeRO stage 0), "
            f"start a new run directory from its weights alone with model.init_from={folder}, or export it with "
            f"fp8train export-hf."
        )


def check_resume_layout(folder: Path, cfg: ParallelConfig, world_size: int) -> None:
    """Refuse a checkpoint whose optimizer state this run's process layout (parallel, ZeRO stage, ranks) cannot take
    up, before any other check of it: its message names the layout to resume with."""
    if cfg.name == ParallelName.deepspeed:
        from fp8train.parallel.deepspeed import check_layout

        check_layout(folder, cfg.zero_stage, world_size)
    else:
        check_single_layout(folder)


def on_rank0(fn, *args):
    """``fn(*args)`` computed by rank 0 and handed to every rank; if it raises an Fp8trainError, every rank raises
    one with the same message, so all ranks go on or stop together. Another exception (a bug) keeps its traceback on
    rank 0, and the other ranks stop with a message pointing at it rather than wait for it."""
    result = error = None
    if not dist.is_initialized() or dist.get_rank() == 0:
        try:
            result = fn(*args)
        except Exception as e:
            error = e
    if error is None or isinstance(error, Fp8trainError):
        message = None if error is None else str(error)
    else:
        message = f"rank 0 failed ({type(error).__name__}: {error}); its traceback is in its log"
    result, message = broadcast_object((result, message))
    if error is not None:
        raise error
    if message is not None:
        raise Fp8trainError(message)
    return result


def clip_grad_norm(model: nn.Module, max_norm: float) -> torch.Tensor:
    """The global gradient norm before clipping (clipping only when max_norm > 0)."""
    params = [p for p in model.parameters() if p.grad is not None]
    if max_norm > 0:
        return torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True)
    grads = [p.grad for p in params]
    if hasattr(torch.nn.utils, "get_total_norm"):  # torch >= 2.6
        return torch.nn.utils.get_total_norm(grads, foreach=True)
    norms = [torch.linalg.vector_norm(g.float()) for g in grads]  # torch 2.5, which fp8train still supports
    return torch.linalg.vector_norm(torch.stack(norms)) if norms else torch.zeros(())


def wrap(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    cfg: ParallelConfig,
    backend: Backend,
    ds_batch: dict | None = None,
) -> SingleEngine:
    """The engine of parallel.name; ``ds_batch`` holds the batch layout and clipping DeepSpeed must know."""
    if cfg.name == ParallelName.single:
        return SingleEngine(model, optimizer)
    from fp8train.parallel.deepspeed import DeepSpeedEngine

    return DeepSpeedEngine(model, optimizer, cfg, backend, **(ds_batch or {}))


def init_distributed(cfg: ParallelConfig, backend: Backend, env: LaunchEnv) -> None:
    """Join the process group of a multi-process run (a no-op for parallel=single)."""
    if cfg.name == ParallelName.single:
        return
    from fp8train.parallel.deepspeed import init_distributed as ds_init

    ds_init(cfg, backend, env)


def load_weights(model: nn.Module, path: Path, device: torch.device) -> None:
    """safetensors' load_model, strict, also for a file that stores shared tensors under every name.

    save_model stores a tensor shared by several names (tied embeddings, the input scaler q/k/v share) once; a
    file written before a tensor became shared has it under each name. Those extra names hold the same values (the
    shared scalers saw the same amaxes) and are loaded into the one tensor; any other mismatch is an error.
    """
    missing, unexpected = load_model(model, str(path), strict=False, device=str(device))
    names = model.state_dict().keys()
    unexpected = [k for k in unexpected if k not in names]
    if missing or unexpected:
        raise RuntimeError(f"missing keys: {sorted(missing)[:5]}; unexpected keys: {sorted(unexpected)[:5]}")
