"""``parallel=deepspeed``: data parallelism with ZeRO through DeepSpeed, on gloo (CPU), nccl (CUDA) or hccl (Gaudi).

What fp8train keeps for itself, so that a DeepSpeed run computes what a single-process run with the same global
batch computes:
- the model stays fp32 with the backend's bf16 autocast and fp8train's FP8 linears (DeepSpeed's ``bf16`` mode
  would cast the model, including the FP8 scaling buffers, to bf16);
- the optimizer is fp8train's (AdamW or AdamWFp8), passed as DeepSpeed's client optimizer;
- the trainer runs the micro-batches and marks the last one as the accumulation boundary
  (``set_gradient_accumulation_boundary``, in DeepSpeed since long before Habana's 0.14-based fork): DeepSpeed
  reduces the gradients in that backward and steps once per optimizer step;
- the learning-rate schedule and the FP8 scaling state are fp8train's; amaxes are max-reduced over all ranks.
DeepSpeed owns the gradient reduction, the ZeRO partitioning, clipping (``gradient_clipping``) and its checkpoint
files. On Gaudi, use Habana's DeepSpeed fork (docker/Dockerfile.gaudi installs it).
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import json
import logging
import os
import socket
from pathlib import Path

import torch
import torch.distributed as dist
from omegaconf import OmegaConf
from safetensors.torch import save_file
from torch import nn

from fp8train.backends import Backend
from fp8train.config import ParallelConfig, resolve_path
from fp8train.errors import CheckpointError, ConfigError
from fp8train.parallel import DEEPSPEED_DIR, MODEL_FILE, LaunchEnv, SingleEngine, barrier

log = logging.getLogger(__name__)

# ds_config keys that follow from the trainer's settings: a user ds_config may not contradict them (key: what
# sets it instead). ZeRO 1-3 clip in DeepSpeed's step, ZeRO 0 in fp8train's: both must clip to optim.grad_clip.
OWNED = {
    "train_micro_batch_size_per_gpu": "trainer.micro_batch_size",
    "gradient_accumulation_steps": "trainer.grad_accum_steps",
    "train_batch_size": "trainer.micro_batch_size / trainer.grad_accum_steps",
    "gradient_clipping": "optim.grad_clip",
}
# Parts of a run fp8train provides itself (the client optimizer, its lr schedule): a ds_config's would replace them.
NOT_FROM_DS_CONFIG = {
    "optimizer": "the optimizer is fp8train's: choose it with optim=adamw or optim=adamw_fp8",
    "scheduler": "the learning-rate schedule is fp8train's: set optim.lr, optim.warmup_steps, optim.min_lr",
}

# Sections of a ds_config that DeepSpeed reads as objects, and fp8train's checks too.
SECTIONS = ("zero_optimization", "bf16", "fp16")


_joined_before = False  # whether this process has already run a DeepSpeed job (one run per process)


def init_distributed(cfg: ParallelConfig, backend: Backend, env: LaunchEnv) -> None:
    """Join the process group through DeepSpeed with the backend's communication library."""
    global _joined_before
    if _joined_before:  # a second run in this process: Hydra's --multirun starts its jobs one after another
        raise ConfigError(
            [
                "parallel=deepspeed: this process has already run a DeepSpeed job, and DeepSpeed cannot set up a "
                "process group a second time in one process (with several ranks it hangs). Start one launch per "
                "job: for a multirun (-m), which runs its jobs in the same processes, one torchrun per job (e.g. "
                "a shell loop over the values of the sweep) or parallel=single for the multirun; from Python, one "
                "process per Trainer"
            ]
        )
    import deepspeed

    if env.world_size == 1:  # started without a launcher: a one-rank group on this machine
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        # A free port rather than a fixed one: two such runs on one machine would otherwise both take 29500 and
        # the second would fail with EADDRINUSE.
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    for name, value in (("RANK", env.rank), ("LOCAL_RANK", env.local_rank), ("WORLD_SIZE", env.world_size)):
        os.environ.setdefault(name, str(value))  # mpirun sets only OMPI_COMM_WORLD_*; DeepSpeed reads these
    timeout = datetime.timedelta(minutes=cfg.timeout_min)
    deepspeed.init_distributed(dist_backend=backend.dist_backend, timeout=timeout, verbose=False)
    groups_wait(timeout)
    _joined_before = True


def groups_wait(timeout: datetime.timedelta) -> None:
    """Give the process groups made from now on the world group's timeout, unless their maker names one.

    torch's ``new_group`` gives a group its own default (30 minutes) rather than the world group's, and DeepSpeed
    makes its data-parallel group, in which ZeRO reduces the gradients, that way: a rank that hung mid-step kept the
    others waiting that long whatever parallel.timeout_min said.
    """
    new_group = dist.new_group

    @functools.wraps(new_group)
    def with_timeout(*args, **kwargs):
        if len(args) < 2 and kwargs.get("timeout") is None:  # new_group(ranks=None, timeout=None, ...)
            kwargs["timeout"] = timeout
        return new_group(*args, **kwargs)

    dist.new_group = with_timeout


def free_port() -> int:
    """A TCP port nothing listens on now (the OS picks it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build_ds_config(
    cfg: ParallelConfig, *, micro_batch_size: int, grad_accum_steps: int, grad_clip: float, world_size: int
) -> dict:
    """The ds_config of a run: generated from the fp8train config, then parallel.ds_config merged over it."""
    generated = {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": grad_accum_steps,
        "train_batch_size": micro_batch_size * grad_accum_steps * world_size,
        "gradient_clipping": grad_clip,
        "zero_optimization": {
            "stage": cfg.zero_stage,
            # Habana's recommended settings for Gaudi2; harmless elsewhere.
            "contiguous_gradients": False,
            "overlap_comm": False,
        },
        "bf16": {"enabled": False},
        "fp16": {"enabled": False},
        "zero_allow_untested_optimizer": True,  # fp8train's AdamW / AdamWFp8 as the client optimizer
        # ... also under ZeRO-Offload (offload_optimizer in parallel.ds_config), where DeepSpeed otherwise demands its
        # own CPU Adam, which would replace fp8train's optimizer (FP8 moments, checkpoints) and cannot be chosen
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 2**31 - 1,  # fp8train logs progress itself
        "wall_clock_breakdown": False,
    }
    if cfg.ds_config is None:
        return generated
    path = resolve_path(cfg.ds_config)
    try:
        user = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError([f"parallel.ds_config={cfg.ds_config}: not a readable JSON file ({e})"]) from None
    # The checks below (and DeepSpeed) read these as JSON objects.
    shapes = [("the file", user)] if not isinstance(user, dict) else [(k, user[k]) for k in SECTIONS if k in user]
    if bad := [(where, value) for where, value in shapes if not isinstance(value, dict)]:
        raise ConfigError(
            [
                f"parallel.ds_config={cfg.ds_config}: {where} must be a JSON object ({{...}}), not {json.dumps(value)}"
                for where, value in bad
            ]
        )
    problems = [
        f"parallel.ds_config={cfg.ds_config}: sets {key}={user[key]}, but this run needs {generated[key]}; remove "
        f"it from the file and set {override} instead"
        for key, override in OWNED.items()
        if key in user and user[key] != generated[key]
    ]
    problems += [
        f"parallel.ds_config={cfg.ds_config}: sets {key}, but {why}; remove it from the file"
        for key, why in NOT_FROM_DS_CONFIG.items()
        if key in user
    ]
    if user.get("bf16", {}).get("enabled") or user.get("fp16", {}).get("enabled"):
        problems.append(
            f"parallel.ds_config={cfg.ds_config}: bf16/fp16.enabled would cast the model and its FP8 scaling state "
            f"to 16 bits; fp8train keeps fp32 weights and sets the compute precision with precision=..."
        )
    if "zero_optimization" in user and user["zero_optimization"].get("stage", cfg.zero_stage) != cfg.zero_stage:
        problems.append(
            f"parallel.ds_config={cfg.ds_config}: zero_optimization.stage differs from "
            f"parallel.zero_stage={cfg.zero_stage}; set the stage with parallel.zero_stage only"
        )
    if problems:
        raise ConfigError(problems)
    return _merge(generated, user)


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for key, value in over.items():
        out[key] = _merge(base[key], value) if isinstance(value, dict) and isinstance(base.get(key), dict) else value
    return out


class DeepSpeedEngine(SingleEngine):
    """``deepspeed.initialize`` around fp8train's model and optimizer; the trainer-facing methods of SingleEngine."""

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        cfg: ParallelConfig,
        backend: Backend,
        *,
        micro_batch_size: int,
        grad_accum_steps: int,
        grad_clip: float,
    ):
        import deepspeed

        self.stage = cfg.zero_stage
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.is_main = self.rank == 0
        self.dp_group = dist.group.WORLD
        self.ds_config = build_ds_config(
            cfg,
            micro_batch_size=micro_batch_size,
            grad_accum_steps=grad_accum_steps,
            grad_clip=grad_clip,
            world_size=self.world_size,
        )
        self.ds, ds_optimizer, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, config=self.ds_config, dist_init_required=False
        )
        # The trainer keeps calling the plain module (DeepSpeed's ZeRO-3 hooks sit on its submodules) and its own
        # optimizer object: its param_groups are the ones DeepSpeed steps, so the lr schedule reaches them.
        super().__init__(model, optimizer)
        self.ds_optimizer = ds_optimizer
        log.info(
            "deepspeed %s: %d ranks (%s), ZeRO stage %d, %d sequences per step",
            deepspeed.__version__,
            self.world_size,
            backend.dist_backend,
            self.stage,
            self.ds_config["train_batch_size"],
        )

    def reduce_amax(self, t: torch.Tensor) -> None:
        """Max-reduce FP8 amaxes (and the non-finite flag) over all ranks, in place: one collective per step."""
        dist.all_reduce(t, op=dist.ReduceOp.MAX)

    def mean(self, t: torch.Tensor) -> torch.Tensor:
        return self.sum(t) / self.world_size

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        t = t.detach().clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def no_sync(self, sync: bool) -> contextlib.AbstractContextManager:
        """Only the last micro-batch's backward reduces gradients over ranks (DeepSpeed does it there).

        Called before each micro-batch's forward. The trainer runs the plain module, not DeepSpeed's engine forward,
        so what that forward does first is done here: ``clear_backward_seen_flag`` on the ZeRO optimizer, where
        DeepSpeed >= 0.18 counts the micro-batches. Without it ZeRO-3 stays at micro-batch 0, and each backward
        overwrites the accumulated gradient partitions instead of adding to them: with trainer.grad_accum_steps > 1
        every micro-batch but the last was lost. (DeepSpeed releases that count in the backward have no such method.)
        """
        self.ds.set_gradient_accumulation_boundary(sync)
        clear = getattr(self.ds.optimizer, "clear_backward_seen_flag", None)
        if self.stage > 0 and clear is not None:
            clear()
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        self.ds.backward(loss, scale_wrt_gas=False)  # the trainer has already divided by grad_accum_steps

    def optimizer_step(self, max_norm: float, loss: torch.Tensor) -> tuple[torch.Tensor, bool]:
        if self.stage == 0:
            # Plain data parallelism: the boundary backward has averaged the gradients in place, so the
            # single-process step follows (DeepSpeed's own stage-0 step neither reports the norm nor skips a
            # non-finite step).
            return super().optimizer_step(max_norm, loss)
        # ZeRO: the gradients sit in each rank's partition; DeepSpeed computes the global norm, clips (to
        # gradient_clipping in the ds_config, which is optim.grad_clip, the max_norm given here), and skips
        # the update (clearing the partitions) when that norm is not finite. That covers a non-finite loss too:
        # the loss is computed in fp32 from the logits, so it can only be inf/NaN if the logits are, and then
        # their gradients are NaN.
        self.ds.step()
        norm = self.ds.get_global_grad_norm()
        grad_norm = torch.as_tensor(float("nan") if norm is None else norm, dtype=torch.float32).detach().cpu()
        return grad_norm, self.ds.was_step_applied()

    def save_state(self, folder: Path) -> None:
        """DeepSpeed's files (module, this rank's optimizer partition) in folder/deepspeed/, plus the full weights
        as model.safetensors from rank 0, so export-hf and model.init_from read DeepSpeed checkpoints too."""
        self.ds.save_checkpoint(str(folder), tag=DEEPSPEED_DIR, save_latest=False)
        with self.gathered():
            if self.is_main:
                save_file(whole_state_dict(self.model), str(folder / MODEL_FILE))
        barrier()

    def load_state(self, folder: Path, device: torch.device) -> None:
        check_layout(folder, self.stage, self.world_size)
        try:  # ZeRO stages 1-3 refuse another number of ranks with their own exception class
            from deepspeed.runtime.zero.utils import ZeRORuntimeException
        except ImportError:
            ZeRORuntimeException = RuntimeError  # noqa: N806
        try:
            path, _ = self.ds.load_checkpoint(
                str(folder), tag=DEEPSPEED_DIR, load_optimizer_states=True, load_lr_scheduler_states=False
            )
        except (RuntimeError, ValueError, AssertionError, ZeRORuntimeException) as e:
            cause = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]  # a bare assert has no message
            raise CheckpointError(
                f"resume={folder}: DeepSpeed cannot load it into this run ({cause}). ZeRO "
                f"stages 1-3 must resume with the number of ranks and the zero stage they were saved with "
                f"(see {folder / 'config.yaml'})."
            ) from None
        if path is None:
            raise CheckpointError(f"resume={folder}: DeepSpeed found no checkpoint in {folder / DEEPSPEED_DIR}.")

    def gathered(self):
        """ZeRO-3 keeps a shard of each weight per rank: gather them whole for the duration of the block."""
        if self.stage < 3:
            return contextlib.nullcontext()
        import deepspeed

        return deepspeed.zero.GatheredParameters(list(self.model.parameters()), modifier_rank=None)

    def lost_contact(self, e: RuntimeError) -> str | None:
        # NCCL and HCCL fail as torch's DistError; gloo as a RuntimeError from its transport (a connection reset by
        # a rank that died, or a wait past the timeout), other gloo errors being bugs that keep their traceback.
        if not (isinstance(e, dist.DistError) or "gloo/transport" in str(e)):
            return None
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        return first.split(". ")[0][:300]  # gloo goes on with generic advice

    def close(self, clean: bool = True) -> None:
        """A barrier, then leave the group: without it a rank can exit while another still talks to it.

        Not after an error (``clean=False``): it may have hit this rank alone (rank 0 failing to write a
        checkpoint's shared files, say) while the others wait in another collective, so a barrier here would hang
        until parallel.timeout_min and end in a timeout traceback instead of the error's message. The process exits
        instead, and the launcher (torchrun, deepspeed, mpirun, srun) stops the other ranks when it sees that.
        """
        if not dist.is_initialized():
            return
        if clean:
            dist.barrier()
            dist.destroy_process_group()


def whole_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict as standalone tensors, a tied weight once under its first name. Under ZeRO the
    parameters are views into DeepSpeed's flat buffers, which safetensors refuses to save as they are."""
    state = model.state_dict()
    seen: set[int] = set()
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            state.pop(name, None)
        seen.add(id(p))
    return {k: v.detach().contiguous().clone() for k, v in state.items()}


def check_layout(folder: Path, stage: int, world_size: int) -> None:
    """Refuse a checkpoint whose optimizer state DeepSpeed would lay out otherwise in this run, before DeepSpeed
    reads it (it fails on a missing file or a None deep inside, or asserts without a message).

    Each ZeRO stage has its own files: stage 0 keeps the whole optimizer state with the module, stages 1 and 2
    (which share one format: they resume into each other exactly) and 3 keep one partition per rank, which only
    that many ranks can take up. Stage 0 resumes on any number of ranks.
    """
    if not (folder / DEEPSPEED_DIR).is_dir():
        raise CheckpointError(
            f"resume={folder}: written by parallel=single (no {DEEPSPEED_DIR}/ folder); resume it with "
            f"parallel=single, or start this run from its weights with model.init_from={folder}."
        )
    try:
        saved = OmegaConf.load(folder / "config.yaml").parallel.zero_stage
    except Exception:  # not readable: DeepSpeed's own checks below are all there is
        return
    ranks = len(list((folder / DEEPSPEED_DIR).glob("zero_pp_rank_*_optim_states.pt")))
    fresh = f"or start a new run directory from its weights alone (fresh optimizer state) with model.init_from={folder}"
    if saved != stage and {saved, stage} != {1, 2}:
        also = " (or 2)" if saved == 1 else " (or 1)" if saved == 2 else ""
        raise CheckpointError(
            f"resume={folder}: written with parallel.zero_stage={saved}, and ZeRO stage {stage} keeps the "
            f"optimizer state in another layout, which cannot take it up: resume with "
            f"parallel.zero_stage={saved}{also}, {fresh}."
        )
    if saved > 0 and ranks and ranks != world_size:
        raise CheckpointError(
            f"resume={folder}: written by {ranks} ranks with parallel.zero_stage={saved}, which splits the "
            f"optimizer state into one partition per rank; this run has {world_size}. Resume with "
            f"{ranks} ranks (parallel.zero_stage=0 checkpoints resume on any number), {fresh}."
        )
