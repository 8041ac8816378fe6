"""The training loop: wires backend, data, model, precision, optimizer, engine, logging and checkpoints.

One optimizer step = ``grad_accum_steps`` micro-batches of ``micro_batch_size`` x ``seq_len`` tokens.
Steps are counted as completed steps: the checkpoint "step 30" holds the state after 30 optimizer steps and
a run resumed from it trains step 31 on the same data, with the same learning rate, as an unbroken run.
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import logging
import math
import os
import random
import shutil
import signal
import socket
import threading
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from omegaconf import OmegaConf
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from fp8train import backends, checkpoint, locks, optim, parallel, precision
from fp8train.config import Config, DataConfig, format_value, init_from_problem
from fp8train.data import TokenData, build_data, tokens
from fp8train.data.loader import open_shared, shareable
from fp8train.data.tokenizer import eos_declaration
from fp8train.errors import BackendError, CheckpointError, ConfigError, DataError, Fp8trainError
from fp8train.fp8.scaling import discard_scalers, step_scalers
from fp8train.loggers import METRICS_FILE, RunLogger, use_progress_bar
from fp8train.model import build_model, empty_model
from fp8train.monitor import OUTLIERS_FILE, build_monitor
from fp8train.optim.adamw_fp8 import state_bytes_per_param
from fp8train.parallel import on_rank0

log = logging.getLogger("fp8train")


class DivergenceError(Fp8trainError):
    """Too many consecutive steps with a non-finite loss or gradient norm."""


class RunDirError(Fp8trainError):
    """A run directory that holds another run's files."""


class Trainer:
    def __init__(self, cfg: Config, run_dir: Path):
        self.logger: RunLogger | None = None
        self.took_lock = False
        try:
            self.start(cfg, run_dir)
        except BaseException as e:
            # The status the command line ends with: 2 for a message, 130 for Ctrl-C, 1 for a bug.
            self.release_failed_start(
                2 if isinstance(e, Fp8trainError) else 130 if isinstance(e, KeyboardInterrupt) else 1
            )
            raise

    def release_failed_start(self, exit_code: int) -> None:
        """Close what a start that raised had opened: the CLI's process exits, but a Trainer built from Python would
        leave an open wandb run (the next wandb.init would log into it), metrics.jsonl and the run directory's lock
        (the next Trainer there would be refused as a second run)."""
        try:
            if self.logger is not None:
                self.logger.finish(failed=True, exit_code=exit_code)
        except Exception as e:  # the error that stopped the start is the one to show
            log.warning("the logger of the failed start was not closed: %s", e)
        finally:
            if self.took_lock:
                unlock_run_dir(self.run_dir)

    def start(self, cfg: Config, run_dir: Path) -> None:
        """Everything __init__ builds, in order; on an error __init__ releases what it took."""
        self.cfg = cfg
        self.launch = parallel.launch_env(cfg.parallel)
        self.backend = backends.select(cfg.backend, self.launch.local_rank)
        parallel.init_distributed(cfg.parallel, self.backend, self.launch)
        self.run_dir = agree_on_run_dir(Path(run_dir))
        # A lock this process held before (an earlier job of a multirun) is not this start's to release.
        self.took_lock = self.run_dir.resolve() not in _locked_run_dirs
        on_rank0(lock_run_dir, self.run_dir)  # before anything in it is read or written
        if self.launch.rank != 0:
            quiet_logging()
        self.ckpt_root = self.run_dir / "checkpoints"
        self.resume_from = on_rank0(find_resume_checkpoint, cfg.resume, self.ckpt_root)  # checksums read once
        check_same_checkpoint(self.resume_from)
        torch.manual_seed(cfg.trainer.seed)  # the same initial weights on every rank
        random.seed(cfg.trainer.seed)
        self.data = build_data_rank0_first(
            cfg.data,
            seed=cfg.trainer.seed,
            micro_batch_size=cfg.trainer.micro_batch_size,
            grad_accum_steps=cfg.trainer.grad_accum_steps,
            rank=self.launch.rank,
            world_size=self.launch.world_size,
        )
        self.cfg = cfg = with_vocab_size(cfg, self.data.vocab_size)
        # A checkpoint of another run directory continues here only where a new run could start.
        own = self.resume_from is not None and self.resume_from.resolve().is_relative_to(self.ckpt_root.resolve())
        check_run_dir(self.run_dir, cfg, resuming=own)
        if self.resume_from:
            check_resume_settings(self.resume_from, cfg)
            self.check_resume_state(self.resume_from)  # before the weights are read: a refusal comes at once
        # Weights about to be loaded need no random init (for a 7B model, minutes and a second copy): built on meta.
        # A resumed run takes them from its checkpoint (model.init_from included), whose engine state loads after.
        model = empty_model(cfg.model) if self.resume_from or cfg.model.init_from else build_model(cfg.model)
        if self.resume_from:
            from fp8train.export.hf import load_weights

            load_weights(model, self.resume_from)  # checked: find_resume_checkpoint and check_resume_settings
        elif cfg.model.init_from:
            if problem := init_from_problem(cfg.model):  # resume=auto found no checkpoint: a fresh start needs them
                raise ConfigError([problem])
            init_from_weights(model, Path(cfg.model.init_from), self.data.tokenizer_file)
        model = model.to(self.backend.device)
        self.model = self.backend.fuse(precision.convert(model, cfg.precision, self.backend))
        self.autocast_dtype = precision.autocast_dtype(cfg.precision)
        self.optimizer = optim.build(cfg.optim, self.model, self.backend, cfg.backend.compile)
        self.scheduler = optim.build_schedule(cfg.optim, self.optimizer, cfg.trainer.max_steps)
        self.engine = parallel.wrap(
            self.model,
            self.optimizer,
            cfg.parallel,
            self.backend,
            ds_batch={
                "micro_batch_size": cfg.trainer.micro_batch_size,
                "grad_accum_steps": cfg.trainer.grad_accum_steps,
                "grad_clip": cfg.optim.grad_clip,
            },
        )
        self.fp8_step = precision.step_context(cfg.precision, self.backend, self.engine.dp_group)
        self.forward = self.backend.compile(self.model) if cfg.backend.compile else self.model
        self.bad_steps, self.bad_in_a_row = 0, 0  # optimizer steps skipped for non-finite loss/grads
        # Until this run writes a checkpoint, its last saved state is the one it resumed from, if resume=auto finds it.
        here = self.resume_from is not None and self.resume_from.resolve().parent == self.ckpt_root.resolve()
        self.saved_path: Path | None = self.resume_from if here else None
        self.stopped_by_signal = False  # whether the last stop_reason() came from SIGTERM / SIGINT
        self.step = self.load_checkpoint(self.resume_from) if self.resume_from else 0
        self.write_run_files()
        self.logger = RunLogger(cfg, self.run_dir, enabled=self.engine.is_main, resume_step=self.step)
        self.monitor = build_monitor(
            cfg.monitor, self.model, self.run_dir, self.step, self.engine.is_main, self.engine.reduce_amax
        )

    # ----------------------------------------------------------------------------------------------------------
    def fit(self) -> dict:
        """Train until trainer.max_steps; returns the last training and validation metrics."""
        cfg, t = self.cfg, self.cfg.trainer
        self.log_start()
        last: dict = {}
        bar = tqdm(
            total=t.max_steps,
            initial=self.step,
            unit="step",
            dynamic_ncols=True,
            disable=not (use_progress_bar(cfg) and self.engine.is_main),
        )
        window_t0, window_tokens = time.perf_counter(), 0
        finished_cleanly = False  # an exception on this rank alone must not wait for the others at shutdown
        with logging_redirect_tqdm(loggers=[logging.getLogger()]), StopSignals() as signals:
            try:
                first_step = self.step
                # The jobs of a Hydra multirun train one after another in this process: once a signal has stopped
                # one (a preemption, Ctrl-C), the jobs after it return at once rather than start training.
                earlier = StopSignals.stopped_a_run if multirun_sweep_dir() else None
                if earlier:
                    log.warning(
                        "%s during an earlier job of this multirun: this job does not start; continue the sweep "
                        "with the same command and %s",
                        earlier,
                        continue_overrides(self.run_dir),
                    )
                while self.step < t.max_steps and not earlier:
                    loss, grad_norm = self.train_step()
                    self.step += 1
                    if self.step == first_step + 1:  # optimizer state exists once the first step has run
                        log.info(
                            "optimizer %s: %.3f bytes of state per parameter%s",
                            cfg.optim.name.value,
                            state_bytes_per_param(self.optimizer, self.model),
                            " on this rank (ZeRO shards the state)" if getattr(self.engine, "stage", 0) else "",
                        )
                    window_tokens += cfg.tokens_per_step * self.engine.world_size
                    bar.update(1)
                    finished = self.step == t.max_steps
                    stop = None if finished else self.stop_reason(signals.received)
                    # The last step of an invocation is always logged: a diverged run's non-finite loss and bad_steps.
                    if self.step % cfg.logger.log_every == 0 or finished or stop:
                        self.backend.synchronize()
                        elapsed = time.perf_counter() - window_t0
                        last = self.log_train(loss, grad_norm, window_tokens / elapsed, bar)
                        window_t0, window_tokens = time.perf_counter(), 0
                    # tokens/s is training throughput: validation passes and checkpoints stay out of the window.
                    paused_at = time.perf_counter()
                    if (t.eval_every and self.step % t.eval_every == 0) or finished:
                        last.update(self.evaluate())
                    window_t0 += time.perf_counter() - paused_at
                    periodic = t.checkpoint_every and self.step % t.checkpoint_every == 0
                    paused_at = time.perf_counter()
                    if periodic or finished or stop or self.monitor.checkpoint_requested:
                        self.save_checkpoint()
                    window_t0 += time.perf_counter() - paused_at
                    if self.bad_in_a_row >= t.max_bad_steps:
                        raise self.divergence_error()
                    if stop:
                        if self.stopped_by_signal:
                            StopSignals.stopped_a_run = stop
                        log.info(
                            "%s: stopped after step %d with a checkpoint; continue with the same command and %s",
                            stop,
                            self.step,
                            continue_overrides(self.run_dir),
                        )
                        break
                finished_cleanly = True
            except torch._dynamo.exc.BackendCompilerFailed as e:  # inductor's InductorError included
                raise self.compile_error(e) from None
            except RuntimeError as e:
                cause = self.engine.lost_contact(e)
                if cause is None:
                    raise
                raise Fp8trainError(
                    f"rank {self.engine.rank} lost contact with another rank after step {self.step} ({cause}): that "
                    f"rank died, or stopped answering for parallel.timeout_min={cfg.parallel.timeout_min} minutes; "
                    f"its log, or its launcher's, says which and why. "
                    + (
                        f"Continue from the checkpoint {self.saved_path} with {continue_overrides(self.run_dir)}."
                        if self.saved_path
                        else "No checkpoint had been written yet."
                    )
                ) from None
            finally:
                bar.close()
                self.logger.summary({k: v for k, v in last.items() if isinstance(v, (int, float))})
                self.logger.finish(failed=not finished_cleanly)
                self.monitor.close()
                self.engine.close(clean=finished_cleanly)
        self.log_end(last)
        return last

    def train_step(self) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimizer step over grad_accum_steps micro-batches; returns (mean loss, grad norm) on device."""
        accum = self.cfg.trainer.grad_accum_steps
        self.model.train()
        loss_sum = torch.zeros((), device=self.backend.device)
        with self.fp8_step():  # Habana TE: one FP8 region per optimizer step; a no-op otherwise
            for micro_step in range(accum):
                inputs, targets = self.batch(self.data.train_batch(self.step, micro_step))
                # On monitored steps the FP8 statistics count every micro-batch's fwd + bwd, the hooks the first's.
                with (
                    self.engine.no_sync(sync=micro_step == accum - 1),
                    self.monitor.capture(self.step + 1, micro_step),
                ):
                    loss = self.loss(inputs, targets) / accum
                    self.engine.backward(loss)
                loss_sum += loss.detach()
                self.backend.mark_step()
        grad_norm, applied = self.engine.optimizer_step(self.cfg.optim.grad_clip, loss_sum)
        if applied:
            # Delayed scaling: this step's amaxes (max-reduced over data-parallel ranks) set the next step's scales.
            step_scalers(self.model, self.engine.reduce_amax)
            self.bad_in_a_row = 0
        else:
            self.skip_step(loss_sum, grad_norm)
        self.monitor.collect(self.step + 1, self.logger)  # monitored steps only: statistics, alerts, outliers.jsonl
        self.step_lr = self.scheduler.get_last_lr()[0]  # the lr this step trained with: the one logged for it
        # The schedule advances even over a skipped step: step t always trains on batch t with the lr of step t.
        self.scheduler.step()
        self.backend.mark_step()
        return loss_sum, grad_norm

    def skip_step(self, loss: torch.Tensor, grad_norm: torch.Tensor) -> None:
        """The engine dropped the gradients; drop the amaxes too: weights, moments and FP8 scales stay as they were."""
        discard_scalers(self.model)
        self.bad_steps += 1
        self.bad_in_a_row += 1
        loss = self.engine.mean(loss)  # every rank skips this step (the decision is reduced): the collective lines up
        if not self.engine.is_main:  # the run's warning, as its metrics are: once, with the global batch's loss
            return
        log.warning(
            "step %d: loss %s, grad_norm %s: not finite, optimizer step skipped (%d in a row, %d in total; "
            "trainer.max_bad_steps=%d in a row stop the run)",
            self.step + 1,
            loss.item(),
            grad_norm.item(),
            self.bad_in_a_row,
            self.bad_steps,
            self.cfg.trainer.max_bad_steps,
        )

    def stop_reason(self, signal_name: str | None) -> str | None:
        """Why this invocation ends before max_steps after the step just done, if it does."""
        t = self.cfg.trainer
        if self.engine.world_size > 1:  # a signal may reach some ranks only: all stop if any got one
            flag = torch.tensor([1.0 if signal_name else 0.0], device=self.backend.device)
            self.engine.reduce_amax(flag)
            signal_name = signal_name or ("a signal on another rank" if flag.item() else None)
        self.stopped_by_signal = bool(signal_name)  # the same on every rank
        if signal_name:
            return f"received {signal_name}"
        if t.stop_at is not None and self.step >= t.stop_at:
            return "trainer.stop_at"
        if self.monitor.stop_reason:  # the same on every rank: the monitor's alert inputs are max-reduced
            return self.monitor.stop_reason
        if self.bad_in_a_row >= t.max_bad_steps:
            return "diverged"
        return None

    def divergence_error(self) -> DivergenceError:
        layer = self.first_non_finite_layer()
        where = (
            f"the first layer whose output is not finite is {layer}"
            if layer
            else "the forward pass is finite, so the gradients overflowed in the backward pass"
        )
        bf16_hint = "" if self.cfg.precision.name in ("bf16", "fp32") else " or try precision=bf16"
        n = self.bad_in_a_row
        steps = f"step {self.step}" if n == 1 else f"{n} steps in a row (up to step {self.step})"
        return DivergenceError(
            f"{steps} had a non-finite loss or gradient norm; {where}. The weights were left at the last good step "
            f"and saved in {self.saved_path}. Lower optim.lr, "
            f"set optim.grad_clip{bf16_hint}, then continue with {continue_overrides(self.run_dir)} "
            f"(trainer.max_bad_steps=N tolerates more bad steps)."
        )

    def compile_error(self, e: Exception) -> BackendError:
        """torch.compile failed inside the compiler (a Triton kernel that does not build, say): name the cause
        briefly and the override that avoids the compiler."""
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()] or [type(e).__name__]
        kernel = next((ln for ln in lines if ln.startswith("Name=")), None)
        cause = next((ln for ln in reversed(lines) if ln.split(":")[0].endswith(("Error", "Exception"))), lines[0])
        versions = f"torch {torch.__version__}"
        try:
            import triton

            versions += f", triton {triton.__version__}"
        except ImportError:
            pass
        return BackendError(
            f"torch.compile could not compile this run's model or optimizer for {self.backend.describe()} "
            f"({versions}) with {self.step} step(s) done: {cause}"
            + (f" (kernel {kernel.removeprefix('Name=')})" if kernel else "")
            + ". Run without the compiler with backend.compile=false (slower; the same FP8 recipe), steer inductor "
            "around the failing kernel with +backend.compile_options.NAME=VALUE (torch._inductor.config names), "
            "or use another torch/Triton version. "
            + (
                f"The last checkpoint, {self.saved_path}, is intact: continue from it with "
                f"{continue_overrides(self.run_dir)} backend.compile=false."
                if self.saved_path
                else "No checkpoint had been written yet."
            )
        )

    @torch.no_grad()
    def first_non_finite_layer(self) -> str | None:
        """Re-run the last step's forward with a hook on every module; the first module (in forward order) to
        output inf/NaN is where the numbers broke. Eval mode, so no FP8 scaling state moves."""
        found: list[str] = []

        def check(name):
            def hook(module, args, output):
                outs = output if isinstance(output, (tuple, list)) else (output,)
                if not found and any(torch.is_tensor(o) and not torch.isfinite(o).all() for o in outs):
                    found.append(name)

            return hook

        handles = [m.register_forward_hook(check(name)) for name, m in self.model.named_modules() if name]
        self.model.eval()
        try:
            for micro_step in range(self.cfg.trainer.grad_accum_steps):
                inputs, _ = self.batch(self.data.train_batch(self.step - 1, micro_step))
                with self.backend.autocast(self.autocast_dtype):
                    self.model(inputs)
                if found:
                    break
        finally:
            for h in handles:
                h.remove()
        return found[0] if found else None

    def loss(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        # With backend.compile=true monitored micro-batches run compiled too: the hooks and FP8 counters make a second
        # graph (the counters alone a third, for later micro-batches under accumulation), compiled at the first
        # monitored step and reused by every later one.
        with self.backend.autocast(self.autocast_dtype):
            logits = self.forward(inputs)
        # Cross-entropy in fp32: log-softmax over a large vocabulary loses too much in bf16.
        return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Mean validation loss per source and over all sources (weighted by tokens), and perplexity.

        Each rank runs its share of every source's validation set (``TokenData.val_batches``: the set depends
        on the global batch only, not on how it is split); one sum over ranks gives every rank the same numbers.
        Eval mode: FP8 scaling state and the outlier monitor stay as training left them.
        """
        self.model.eval()
        sources = self.data.val_sources
        # Per source: the sum of the windows' mean losses and the number of windows (seq_len tokens each, so their
        # ratio is the mean over tokens; a short last batch weighs by its rows). float32: Gaudi has no float64, and
        # the counts are small integers.
        sums = torch.zeros(len(sources), 2, device=self.backend.device)
        for i, source in enumerate(sources):
            for inputs, targets, counted in self.data.val_batches(source, self.cfg.trainer.eval_batches):
                loss = self.loss(*self.batch((inputs, targets)))
                if counted:  # else a batch that only keeps this rank's forwards in step with the others'
                    sums[i, 0] += loss.float() * len(inputs)
                    sums[i, 1] += len(inputs)
                self.backend.mark_step()
        loss_sums, counts = self.engine.sum(sums).cpu().double().T.tolist()
        metrics = {f"val_loss/{source}": s / n for source, s, n in zip(sources, loss_sums, counts)}
        metrics["val_loss"] = sum(loss_sums) / sum(counts)
        metrics["val_ppl"] = math.exp(min(metrics["val_loss"], 50.0))
        self.logger.log(metrics, self.step)
        log.info("step %d: val_loss %.4f  val_ppl %.2f", self.step, metrics["val_loss"], metrics["val_ppl"])
        return metrics

    def batch(self, pair: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        return tuple(x.to(self.backend.device, non_blocking=True) for x in pair)

    # ----------------------------------------------------------------------------------------------------------
    def log_train(self, loss: torch.Tensor, grad_norm: torch.Tensor, tokens_per_s: float, bar: tqdm) -> dict:
        loss = self.engine.mean(loss)  # every rank logs at the same steps, so this collective lines up
        metrics = {
            "loss": loss.item(),
            "lr": self.step_lr,
            "grad_norm": grad_norm.item(),
            "tokens_per_s": tokens_per_s,
            "tokens": self.step * self.cfg.tokens_per_step * self.engine.world_size,
            "peak_mem_gb": self.backend.peak_memory_bytes() / 2**30,
            "bad_steps": self.bad_steps,
        }
        self.logger.log(metrics, self.step)
        bar.set_postfix(loss=f"{metrics['loss']:.4f}", tok_s=f"{tokens_per_s:,.0f}", refresh=False)
        log.info(
            "step %d/%d  loss %.4f  lr %.2e  grad_norm %.3f  %s tok/s  peak mem %.2f GB%s",
            self.step,
            self.cfg.trainer.max_steps,
            metrics["loss"],
            metrics["lr"],
            metrics["grad_norm"],
            f"{tokens_per_s:,.0f}",
            metrics["peak_mem_gb"],
            f"  bad steps {self.bad_steps}" if self.bad_steps else "",
        )
        return metrics

    def log_start(self) -> None:
        cfg = self.cfg
        n = self.model.num_params()
        log.info("run dir: %s", self.run_dir)
        log.info(
            "model %s: %.2fM parameters (%.2fM excluding the input embedding), %d layers, d %d, vocab %d",
            cfg.model.name,
            n / 1e6,
            self.model.num_params(exclude_embeddings=True) / 1e6,
            cfg.model.n_layers,
            cfg.model.d_model,
            cfg.model.vocab_size,
        )
        log.info(
            "backend %s, precision %s, %d tokens per step, %d steps%s",
            self.backend.describe(),
            cfg.precision.name,
            cfg.tokens_per_step * self.engine.world_size,
            cfg.trainer.max_steps,
            f", resuming after step {self.step}" if self.step else "",
        )
        for warning in (optim.warmup_warning(cfg.optim, cfg.trainer.max_steps), optim.fp8_moments_warning(cfg.optim)):
            if warning and self.engine.is_main:
                log.warning(warning)

    def log_end(self, last: dict) -> None:
        parts = [f"{k} {last[k]:.4f}" for k in ("loss", "val_loss") if k in last]
        log.info("done: step %d%s", self.step, ("; " + ", ".join(parts)) if parts else "")
        log.info(
            "results in %s (metrics.jsonl, checkpoints/, train.log%s)",
            self.run_dir,
            ", wandb/" if (self.run_dir / "wandb").exists() else "",
        )

    # ----------------------------------------------------------------------------------------------------------
    def write_run_files(self) -> None:
        """The resolved config and the tokenizer, beside the metrics, so a run dir explains itself; and checkpoints/
        without the temp folders of dead writers and, on resume, without the checkpoints of steps after this run's
        start (a timeline this run replaces; they are moved to checkpoints/superseded/)."""
        if not self.engine.is_main:
            return
        files = {
            "config.yaml": config_yaml(self.cfg).encode(),
            "tokenizer.json": Path(self.data.tokenizer_file).read_bytes(),
            # the EOS this run splits documents with, which the tokenizer.json alone may not say (export-hf reads it)
            "tokenizer_config.json": eos_declaration(self.data.tokenizer.id_to_token(self.data.eos_id)).encode(),
        }
        writing = "checkpoints/"
        try:
            if self.ckpt_root.is_dir():  # first: a disk-full stop may have left a temp folder taking the space
                checkpoint.remove_stale_tmp(self.ckpt_root)
                aside = checkpoint.set_aside_after(self.ckpt_root, self.step) if self.resume_from else None
                # The metrics of the steps set aside go with them (this run cuts them from its files): undoing the
                # resume puts that timeline back whole.
                for name in (METRICS_FILE, OUTLIERS_FILE) if aside else ():
                    if (self.run_dir / name).is_file():
                        shutil.copy2(self.run_dir / name, aside / name)
            for writing, content in files.items():
                tmp = self.run_dir / f".{writing}.{os.getpid()}"  # renamed into place: a kill never leaves half a file
                try:
                    tmp.write_bytes(content)
                    os.replace(tmp, self.run_dir / writing)
                finally:
                    tmp.unlink(missing_ok=True)
        except OSError as e:
            free = shutil.disk_usage(self.run_dir).free / 2**20
            raise Fp8trainError(
                f"Cannot write {writing} in the run directory {self.run_dir}: {e.strerror or e} ({free:.0f} MiB free "
                f"there). Free space or fix the directory's permissions, then run the same command again "
                f"(resume=auto continues from the newest checkpoint)."
            ) from None

    def save_checkpoint(self) -> None:
        """Every rank takes part (each writes its own shards); rank 0 writes the shared files."""
        state = {
            "step": self.step,
            "scheduler": self.scheduler.state_dict(),
            "data_position": self.data.position(self.step),
            "data_fingerprint": self.data.fingerprint,
            "bad_steps": (self.bad_steps, self.bad_in_a_row),
            "rng": self.rng_state(),
        }
        self.saved_path = checkpoint.save(
            self.ckpt_root,
            self.step,
            self.engine,
            state,
            config_yaml(self.cfg),
            self.cfg.trainer.keep_last,
            rank_state={"rng": self.rng_state()} if self.engine.world_size > 1 else None,
        )

    def rng_state(self) -> dict:
        return {"torch": torch.get_rng_state(), "python": random.getstate(), **self.backend.rng_state()}

    def load_checkpoint(self, path: Path) -> int:
        fresh_groups = [{k: v for k, v in g.items() if k != "params"} for g in self.optimizer.param_groups]
        state = checkpoint.load(path, self.engine, self.backend.device, verified=True)  # by find_resume_checkpoint
        self.scheduler.load_state_dict(state["scheduler"])
        self.apply_optim_settings(fresh_groups, state["step"])
        rng = state.get("rank_state", state)["rng"]  # each rank continues its own random stream
        torch.set_rng_state(rng["torch"])
        random.setstate(rng["python"])
        self.backend.set_rng_state(rng)
        self.bad_steps, self.bad_in_a_row = state.get("bad_steps", (0, 0))
        log.info("resumed from %s (step %d)", path, state["step"])
        return state["step"]

    def check_resume_state(self, path: Path) -> None:
        """Refuse a checkpoint this run cannot continue as an unbroken run would: other tokens, another data order or
        global batch, a step at or past where this invocation stops."""
        parallel.check_resume_layout(path, self.cfg.parallel, self.launch.world_size)  # names the ranks to use
        state = torch.load(path / "trainer.pt", map_location="cpu", weights_only=True)
        if state["data_fingerprint"] != self.data.fingerprint:
            diffs = settings_differences(path / "config.yaml", self.cfg, ("data",))
            diffs = [d for d in diffs if not d.startswith("data.cache_dir:")]  # where the caches are changes no token
            if not diffs:  # the same settings: the saved position names the source or tokenizer that changed
                self.data.check_resume(state["data_position"], path)
            what = (
                f"data settings changed ({'; '.join(diffs)})"
                if diffs
                else "the data settings are the same, so a source or tokenizer file has changed since"
            )
            raise CheckpointError(
                f"resume: {path} was trained on other tokens than this run reads: {what}. Resume with the data "
                f"settings in {path / 'config.yaml'} and its files, or start a new run directory from its weights "
                f"with model.init_from={path}."
            )
        self.data.check_resume(state["data_position"], path)
        self.check_resume_step(path, state["step"])

    def check_resume_step(self, path: Path, step: int) -> None:
        """A checkpoint at or past where this invocation should stop would train nothing, or one step too many."""
        t = self.cfg.trainer
        problems = []
        if step > t.max_steps:
            problems.append(f"trainer.max_steps={t.max_steps}: raise it above {step} to train further")
        if t.stop_at is not None and step >= t.stop_at:
            problems.append(f"trainer.stop_at={t.stop_at}: raise it above {step}, or drop it to train to max_steps")
        if problems:
            raise ConfigError([f"resume: {path} is at step {step}; {p}" for p in problems])
        if step == t.max_steps:  # a finished run started again (a requeued job): fine, but say why nothing trains
            log.info(
                "resume: %s is at trainer.max_steps=%d already: nothing to train (raise trainer.max_steps to train "
                "further)",
                path,
                step,
            )

    def apply_optim_settings(self, fresh_groups: list[dict], step: int) -> None:
        """Loading a checkpoint restores the optimizer's lr, weight decay, betas and eps as they were saved; the
        values of this run's config are the ones asked for (after a divergence: a lower optim.lr), so they win. The
        schedule's shape (warmup, min_lr, decay_steps, max_steps) comes from this run's config too: the saved lr,
        set by the saved run's schedule, is replaced by this one's even when no optim value changed."""
        keys = ("initial_lr", "weight_decay", "betas", "eps")
        changed = set()
        for group, fresh in zip(self.optimizer.param_groups, fresh_groups, strict=True):
            for key in keys:
                if key in fresh and group.get(key) != fresh[key]:
                    changed.add(key)
                    group[key] = fresh[key]
        self.scheduler.base_lrs = [g["initial_lr"] for g in self.optimizer.param_groups]
        for group, base_lr, factor in zip(
            self.optimizer.param_groups, self.scheduler.base_lrs, self.scheduler.lr_lambdas
        ):
            group["lr"] = base_lr * factor(self.scheduler.last_epoch)
        self.scheduler._last_lr = [g["lr"] for g in self.optimizer.param_groups]
        if not changed:
            return
        names = sorted(f"optim.{'lr' if k == 'initial_lr' else k}" for k in changed)
        log.info("resume: %s as set for this run, not as saved, from step %d on", ", ".join(names), step + 1)


def agree_on_run_dir(run_dir: Path) -> Path:
    """Rank 0's run directory for every rank. Hydra names it after the start time on each rank, and ranks started a
    second apart would otherwise write two directories. Hydra has already opened train.log in this rank's: that log
    moves into rank 0's directory (as when both name the same one), and the directory created in vain is removed."""
    chosen = Path(parallel.broadcast_object(str(run_dir)))
    chosen.mkdir(parents=True, exist_ok=True)
    if chosen.resolve() != run_dir.resolve():
        move_log_files(run_dir, chosen)
        if run_dir.is_dir() and not any(run_dir.iterdir()):
            run_dir.rmdir()
    check_shared(chosen)
    return chosen


def check_shared(run_dir: Path) -> None:
    """Refuse a run directory that is a folder of its own on each node (the same path on node-local disks): every
    rank writes its part of each checkpoint there, and rank 0 would rename into place checkpoints that lack the
    other nodes' optimizer partitions and RNG states; a resume would then find them on one node only. Rank 0 writes
    a file there that every rank must see."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    probe = None
    if dist.get_rank() == 0:
        probe = run_dir / f".shared-check-{os.getpid()}-{random.SystemRandom().getrandbits(64):016x}"
        try:
            probe.touch()
        except OSError:  # a directory rank 0 cannot write in: write_run_files reports it
            probe = None
    probe = parallel.broadcast_object(probe)
    if probe is None:
        return
    # A file system that caches directory listings (NFS) may show a new file a moment late.
    for _ in range(20):
        if seen := probe.exists():
            break
        time.sleep(0.25)
    ranks = parallel.all_gather_object((seen, socket.gethostname()))
    if dist.get_rank() == 0:
        probe.unlink(missing_ok=True)
    blind = [f"rank {r} (host {host})" for r, (ok, host) in enumerate(ranks) if not ok]
    if blind:
        raise RunDirError(
            f"The run directory {run_dir} is not one directory shared by every rank: {', '.join(blind)} "
            f"{'does' if len(blind) == 1 else 'do'} not see the file rank 0 (host {ranks[0][1]}) wrote there. Every "
            f"rank writes its part of each checkpoint into the run directory and reads them on resume, so a run over "
            f"several nodes needs it on a file system all of them mount at the same path (NFS, Lustre, ...): pass "
            f"hydra.run.dir=PATH on such a file system."
        )


RUN_DIR_LOCK = ".lock"
_locked_run_dirs: dict[Path, int] = {}  # run dir -> the open file holding its lock


def lock_run_dir(run_dir: Path) -> None:
    """Hold RUN_DIR/.lock until this process ends or ``unlock_run_dir``: a second process training in the same
    directory (a job requeued while the first still runs, a command typed twice) would write its checkpoints and
    metrics over the first's and delete checkpoints the other is about to load. The kernel drops the lock of a
    process that dies, however it dies. This process may take it again (the jobs of a multirun, one at a time)."""
    key = run_dir.resolve()
    if key in _locked_run_dirs:
        return
    fd = None
    try:
        fd = os.open(run_dir / RUN_DIR_LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        locks.mark_holder(fd)
    except BlockingIOError:
        holder = locks.holder(fd)
        os.close(fd)
        raise RunDirError(
            f"The run directory {run_dir} is in use: {holder} is training in it (it holds {run_dir / RUN_DIR_LOCK}). "
            f"Two runs in one directory overwrite each other's checkpoints and metrics: wait for that one to end or "
            f"stop it, then continue with resume=auto, or choose a new directory with {new_dir_override()}."
        ) from None
    except OSError:  # no flock on this filesystem (some network mounts), or a full disk that write_run_files reports
        if fd is not None:
            os.close(fd)
        log.debug("cannot lock %s; another run in this directory would go unnoticed", run_dir / RUN_DIR_LOCK)
        return
    _locked_run_dirs[key] = fd


def unlock_run_dir(run_dir: Path) -> None:
    """Release ``lock_run_dir``'s lock, if this process holds it."""
    fd = _locked_run_dirs.pop(Path(run_dir).resolve(), None)
    if fd is not None:
        os.close(fd)


def move_log_files(old_dir: Path, new_dir: Path) -> None:
    """Point every logging file handler writing into ``old_dir`` at the file of the same name in ``new_dir``
    (appended to, with the lines already written), and remove the old file."""
    old_dir = old_dir.resolve()
    loggers = [logging.getLogger(), *logging.root.manager.loggerDict.values()]
    handlers = {h for lg in loggers for h in getattr(lg, "handlers", ())}
    for h in handlers:
        if not isinstance(h, logging.FileHandler) or Path(h.baseFilename).parent != old_dir:
            continue
        old_file, new_file = Path(h.baseFilename), new_dir.resolve() / Path(h.baseFilename).name
        h.flush()
        written = old_file.read_bytes() if old_file.is_file() else b""
        with open(new_file, "ab") as f:
            f.write(written)
        old_stream = h.setStream(open(new_file, "a", encoding=h.encoding, errors=h.errors))
        h.baseFilename = str(new_file)
        if old_stream is not None:
            old_stream.close()
        old_file.unlink(missing_ok=True)


def quiet_logging() -> None:
    """Ranks other than 0 report only warnings and errors: one rank's progress lines are the run's."""
    logging.getLogger().setLevel(logging.WARNING)
    logging.getLogger("fp8train").setLevel(logging.WARNING)


def build_data_rank0_first(data_cfg: DataConfig, **layout) -> TokenData:
    """build_data on rank 0; the other ranks then open its tokenizer and token cache (on a shared cache dir) without
    reading the corpus again: one process reads, hashes and tokenizes it, not every rank of a node at once, each
    with all its cores and a copy of the text in memory. A data error on any rank stops every rank (with its message
    on that rank), rather than leave the others waiting in the next collective. The others wait in a collective, so
    at most parallel.timeout_min for a corpus that is not tokenized yet."""
    built: list[TokenData] = []
    shared = on_rank0(lambda: built.append(build_data(data_cfg, **layout)) or shareable(built[0]))  # paths, digests
    error = None
    if not built:
        try:
            built.append(open_shared(data_cfg, shared, **layout))
        except Exception as e:  # any failure: the other ranks must hear of it, or they wait for this one forever
            error = e
    # With a data.cache_dir per machine, the other machines may be tokenizing now, each on one of its ranks.
    waiting = "waiting for the other ranks to open the data, %d s so far (with a data.cache_dir on each machine, the"
    waiting += " other machines tokenize the corpus into theirs); parallel.timeout_min bounds the wait"
    with tokens.warning_after(tokens.LONG_WAIT_S, waiting, tokens.LONG_WAIT_S):
        failed = [rank for rank, bad in enumerate(parallel.all_gather_object(error is not None)) if bad]
    if error is not None:
        raise error
    if failed:
        names = ", ".join(map(str, failed))
        raise DataError(
            f"rank {names} could not open the data; see its message."
            if len(failed) == 1
            else f"ranks {names} could not open the data; see their messages."
        )
    return built[0]


def check_same_checkpoint(path: Path | None) -> None:
    """Every rank loads the checkpoint rank 0 chose and verified. At a path that is not shared (node-local scratch)
    another node may hold another checkpoint or none: its ranks would continue from other weights, or stop with a
    misleading message while the others wait. Each rank compares its manifest (which holds every file's checksum)
    with rank 0's."""
    if path is None or not dist.is_initialized():
        return
    try:
        mine = hashlib.sha256((path / checkpoint.MANIFEST).read_bytes()).hexdigest()
    except OSError:
        mine = None
    seen = parallel.all_gather_object((mine, socket.gethostname()))
    other = [f"rank {r} (host {host})" for r, (digest, host) in enumerate(seen) if digest != seen[0][0]]
    if other:
        raise CheckpointError(
            f"resume: the checkpoint {path} that rank 0 (host {seen[0][1]}) resumes from is missing or another "
            f"checkpoint on {', '.join(other)}. Every rank loads it: put it on a file system all nodes mount at the "
            f"same path (the run directory, with resume=auto, is one), or copy the same folder to that path on "
            f"every node."
        )


def find_resume_checkpoint(resume: str, ckpt_root: Path) -> Path | None:
    """resume=none refuses to overwrite a run that has checkpoints; auto takes the newest intact one."""
    # A checkpoints/ that cannot hold checkpoints would pass for an empty one: the run would start over (auto cutting
    # the metrics back to step 0) and fail at its first checkpoint.
    if ckpt_root.is_symlink() and not ckpt_root.exists():
        raise CheckpointError(
            f"{ckpt_root} is a link to {os.readlink(ckpt_root)}, which does not exist (a disk that is not mounted?): "
            f"this run could neither find its checkpoints there nor write any. Mount that disk or create the folder, "
            f"or remove the link for checkpoints in the run directory."
        )
    if ckpt_root.exists() and not ckpt_root.is_dir():
        raise CheckpointError(
            f"{ckpt_root} is a file, not a folder: the run keeps its checkpoints there. Move the file away."
        )
    if resume == "auto":
        found = checkpoint.latest_intact(ckpt_root)
        if found is None:
            log.info("resume=auto: no complete checkpoint in %s, starting at step 0", ckpt_root)
        return found
    if resume == "none":
        if checkpoint.latest(ckpt_root) is not None:
            raise CheckpointError(
                f"The run directory {ckpt_root.parent} already holds checkpoints. Pass resume=auto to continue "
                f"that run, or choose a new directory with {new_dir_override()}."
            )
        return None
    path = Path(resume).expanduser().resolve()
    wanted = "resume= takes a checkpoint folder (RUN_DIR/checkpoints/step_NNNNNNN), auto or none"
    if not path.exists():
        raise CheckpointError(f"resume={path}: no such file or folder; {wanted}.")
    if path.is_file():
        holder = path.parent if (path.parent / checkpoint.MANIFEST).is_file() else None
        raise CheckpointError(
            f"resume={path} is a file, not a checkpoint folder: "
            + (f"pass the checkpoint that holds it, resume={holder}." if holder else f"{wanted}.")
        )
    # A run directory or its checkpoints/ folder where one of its checkpoints was meant.
    run_dir = path if (path / "checkpoints").is_dir() else path.parent if checkpoint.latest(path) else None
    if run_dir is not None and not (path / checkpoint.MANIFEST).exists():
        newest = checkpoint.latest(run_dir / "checkpoints")
        raise CheckpointError(
            f"resume={path} is {'a run directory' if run_dir == path else 'the checkpoints folder of a run'}, not a "
            f"checkpoint. To continue that run pass hydra.run.dir={run_dir} resume=auto"
            + (f", or its newest checkpoint, resume={newest}." if newest else " (it has no complete checkpoint yet).")
        )
    # Checked in full before anything reads it: a cut config.yaml is damage, not a run with other settings.
    checkpoint.verify(path)
    return path


def check_run_dir(run_dir: Path, cfg: Config, resuming: bool) -> None:
    """Starting at step 0 (or from another run directory's checkpoint) in a directory that holds a run with other
    model/data/optim/precision settings would mix two runs' metrics and overwrite the old ones: refuse, naming what
    differs. The same settings may start over (a run that died before its first checkpoint). ``resuming``: this
    directory's own run continues."""
    old_file = run_dir / "config.yaml"
    if resuming or not old_file.is_file():
        return
    try:
        diffs = settings_differences(old_file, cfg, ("model", "data", "optim", "precision"))
    except Exception as e:  # not a config fp8train wrote: still someone's file, so leave it alone
        raise RunDirError(
            f"The run directory {run_dir} holds a config.yaml that cannot be read ({e}). Choose a new directory "
            f"with {new_dir_override()}."
        ) from None
    if diffs:
        raise RunDirError(
            f"The run directory {run_dir} holds a run with other settings ({'; '.join(diffs)})"
            + ("" if checkpoint.latest(run_dir / "checkpoints") else " and no checkpoint to continue it from")
            + f". Choose a new directory with {new_dir_override()}, or remove that run's files."
        )


# Settings a checkpoint's weights, optimizer state and FP8 scaling state only make sense with (data changes are
# caught by the data fingerprint), less those that may change between two steps of one run: how scales are
# derived from the amax history, how gradients round and how the forward GEMM accumulates, the initial weights'
# std (the weights are loaded), as well as lr, weight decay, schedule, clipping, max_steps and logging, which are
# not listed.
FIXED_ON_RESUME = ("model.", "precision.", "optim.name:", "optim.m_format:", "optim.v_format:", "optim.block_size:",
                   "optim.fp8_min_numel:", "optim.habana_fused:")  # fmt: skip
CHANGEABLE_ON_RESUME = ("model.name:", "model.init_from:", "model.init_std:", "precision.name:", "precision.margin:",
                        "precision.amax_compute_algo:", "precision.stochastic_grad_rounding:",
                        "precision.fast_accum:")  # fmt: skip
# Settings only some configurations read: FP8 Adam's (AdamWFp8's blocks only without Habana's fused Adam), and
# every precision setting but the recipe under a bf16 or fp32 recipe.
ADAMW_FP8_ONLY = ("m_format", "v_format", "block_size", "fp8_min_numel", "habana_fused")
ADAMW_FP8_OWN = ("block_size", "fp8_min_numel")


def check_resume_settings(path: Path, cfg: Config) -> None:
    """Refuse to continue a checkpoint with settings that change what its state means, naming them. A setting
    that neither the checkpoint's run nor this one uses (optim.block_size with optim=adamw) may differ."""
    if not (path / "config.yaml").is_file():
        return
    diffs = [
        d
        for d in settings_differences(path / "config.yaml", cfg, ("model", "optim", "precision"))
        if d.startswith(FIXED_ON_RESUME) and not d.startswith(CHANGEABLE_ON_RESUME)
    ]
    if diffs:
        raise CheckpointError(
            f"resume: {path} was written with other settings ({'; '.join(diffs)}), and its weights, optimizer "
            f"state and FP8 scaling state only continue with its own (in {path / 'config.yaml'}). Drop or change "
            f"those overrides, or start a new run from its weights with model.init_from={path} and a new "
            f"{new_dir_override().removesuffix('=PATH')}."
        )


def _in_effect(key: str, config: dict) -> bool:
    """Whether a run with ``config`` (a config.yaml's dict) reads the setting ``key``."""
    section, _, name = key.partition(".")
    part = config.get(section)
    part = part if isinstance(part, dict) else {}
    if section == "optim" and name in ADAMW_FP8_ONLY:
        return part.get("name") == "adamw_fp8" and not (name in ADAMW_FP8_OWN and part.get("habana_fused"))
    if section == "precision" and name not in ("name", "recipe"):
        return part.get("recipe") == "fp8"
    return True


def settings_differences(old_file: Path, cfg: Config, sections: tuple[str, ...]) -> list[str]:
    """``key: old -> new`` for each setting of ``sections`` that differs between a saved config.yaml and ``cfg``
    and that either run reads (optim.block_size with optim=adamw may differ)."""
    old = OmegaConf.to_container(OmegaConf.load(old_file), resolve=True)
    new = OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True, enum_to_str=True)
    return [
        f"{key}: {format_value(a)} -> {format_value(b)}"  # as an override writes them: null, true, [0.9,0.95]
        for section in sections
        for key, a, b in _differences(old.get(section), new[section], section)
        if _in_effect(key, old) or _in_effect(key, new)
    ]


# List settings that name a set: their order (or a name listed twice) changes nothing.
UNORDERED_SETTINGS = ("precision.linears",)


def _differences(a, b, prefix: str) -> list[tuple[str, object, object]]:
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in sorted(set(a) | set(b), key=str) for d in _differences(a.get(k), b.get(k), f"{prefix}.{k}")]
    if prefix in UNORDERED_SETTINGS and isinstance(a, list) and isinstance(b, list):
        return [] if set(a) == set(b) else [(prefix, a, b)]
    return [] if a == b else [(prefix, a, b)]


def multirun_sweep_dir() -> str | None:
    """The sweep folder (hydra.sweep.dir) when this process runs the jobs of a Hydra multirun, else None."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return None
    return str(HydraConfig.get().sweep.dir)


def new_dir_override() -> str:
    """How to start in another directory: hydra.run.dir, or in a multirun (which ignores it) hydra.sweep.dir."""
    return "hydra.sweep.dir=PATH" if multirun_sweep_dir() else "hydra.run.dir=PATH"


def continue_overrides(run_dir: Path) -> str:
    """What to add to the command that started a run to continue it: its run dir, or in a multirun the sweep
    folder (each job finds its own run dir in it)."""
    sweep_dir = multirun_sweep_dir()
    return f"hydra.sweep.dir={sweep_dir} resume=auto" if sweep_dir else f"hydra.run.dir={run_dir} resume=auto"


class StopSignals:
    """SIGTERM (a scheduler's preemption) and SIGINT (Ctrl-C) end the run after the current step, with a
    checkpoint, instead of mid-step; a second signal acts as usual (the handlers are restored on the first)."""

    stopped_a_run: str | None = None  # why a signal stopped a run of this process (read by the next multirun job)

    def __enter__(self) -> StopSignals:
        self.received: str | None = None
        self.previous = {}
        if threading.current_thread() is threading.main_thread():  # signal handlers can only be set there
            self.previous = {s: signal.signal(s, self.handle) for s in (signal.SIGTERM, signal.SIGINT)}
        return self

    def handle(self, signum, frame) -> None:
        self.received = signal.Signals(signum).name
        # Recorded here, not only where the loop stops for it: a signal during a run's last step, or one whose
        # step then fails (diverges, say), must still keep the later jobs of a multirun from starting.
        StopSignals.stopped_a_run = StopSignals.stopped_a_run or f"received {self.received}"
        self.restore()

    def restore(self) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)

    def __exit__(self, *exc) -> None:
        self.restore()


def init_from_weights(model: torch.nn.Module, folder: Path, tokenizer_file: Path) -> None:
    """Start from saved weights; the model settings and the tokenizer must be those the weights were trained with
    (with another tokenizer the embeddings mean other tokens: the run would start from chance, weights wasted)."""
    from fp8train.export.hf import load_weights, saved_model_config

    # A checkpoint's weights are checked as a resume checks them: a flipped bit still loads, as other numbers.
    if (folder / checkpoint.MANIFEST).is_file() and (problem := checkpoint.damage(folder)):
        raise CheckpointError(
            f"model.init_from={folder}: {problem}; the checkpoint is damaged. Start from another checkpoint (an "
            f"older one of the same run) or restore this one from a backup."
        )
    saved_cfg = saved_model_config(folder)
    # n_kv_heads=null is one key/value head per query head, the same weights as that number (an import-hf folder's)
    saved = dataclasses.asdict(dataclasses.replace(saved_cfg, n_kv_heads=saved_cfg.kv_heads))
    ours = dataclasses.asdict(dataclasses.replace(model.cfg, init_from=None, n_kv_heads=model.cfg.kv_heads))
    # init_std only draws initial weights, max_seq_len only sizes the RoPE tables (not saved): both are free.
    free = ("name", "init_std", "max_seq_len")
    diffs = [
        f"model.{k}={ours[k]} (the weights have {saved[k]})" for k in ours if k not in free and ours[k] != saved[k]
    ]
    if diffs:
        raise ConfigError([f"model.init_from={folder}: the model differs from the saved one: {'; '.join(diffs)}"])
    saved_tokenizer = tokenizer_beside(folder)
    if saved_tokenizer and vocabulary(saved_tokenizer) != vocabulary(tokenizer_file):
        raise ConfigError(
            [
                f"model.init_from={folder}: the weights were trained with the tokenizer {saved_tokenizer}, and this "
                f"run's data.tokenizer ({tokenizer_file}) has another vocabulary; set "
                f"data.tokenizer.path={saved_tokenizer}"
            ]
        )
    load_weights(model, folder)
    log.info("model weights from %s", folder)


def tokenizer_beside(folder: Path) -> Path | None:
    """The tokenizer saved with weights: in an import-hf folder, or a checkpoint's run dir (RUN/checkpoints/step_N)."""
    beside = [folder / "tokenizer.json"]
    if run_dir := checkpoint.run_dir_of(folder):  # also RUN/checkpoints/superseded/after_.../step_N
        beside.append(run_dir / "tokenizer.json")
    return next((f for f in beside if f.is_file()), None)


def vocabulary(tokenizer_file: Path) -> dict[str, int]:
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(tokenizer_file)).get_vocab()


def with_vocab_size(cfg: Config, tokenizer_vocab: int) -> Config:
    """Fill model.vocab_size from the tokenizer (rounded up to 64 for matmul-friendly shapes), or check it."""
    if cfg.model.vocab_size is None:
        vocab = -(-tokenizer_vocab // 64) * 64
    elif cfg.model.vocab_size < tokenizer_vocab:
        raise ConfigError(
            [
                f"model.vocab_size={cfg.model.vocab_size}: smaller than the tokenizer's {tokenizer_vocab} token "
                f"ids; raise it or set model.vocab_size=null"
            ]
        )
    else:
        vocab = cfg.model.vocab_size
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, vocab_size=vocab))


def config_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))
