"""Bad steps are skipped without touching any state, divergence stops with the broken layer named, and a run
directory of another run is never overwritten."""

from __future__ import annotations

import copy
import errno
import logging
import math
import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from fp8train import checkpoint
from fp8train.config import compose
from fp8train.errors import CheckpointError, Fp8trainError
from fp8train.fp8.scaling import ScalingConfig, TensorScaler, discard_scalers
from fp8train.loggers import read_metrics
from fp8train.trainer import DivergenceError, RunDirError, StopSignals, Trainer
from tests.helpers import ROOT, SMALL

FP8 = [*SMALL, "precision=fp8_smooth", "optim=adamw_fp8", "optim.fp8_min_numel=0", "optim.fused=false"]


def same(a, b) -> bool:
    """Equal nested state (dicts, lists, tensors bit for bit, NaN equal to NaN)."""
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if torch.is_tensor(a):
        return torch.equal(a, b) or bool(((a == b) | (a.isnan() & b.isnan())).all())
    return a == b


def test_discard_step_forgets_the_skipped_steps_amax():
    s = TensorScaler("e4m3", ScalingConfig(recipe="delayed", amax_history_len=4))
    s.train()
    s.scale_for(torch.tensor(2.0))
    s.step()
    before = copy.deepcopy(s.state_dict())
    s.scale_for(torch.tensor(float("inf")))
    assert math.isinf(s.amax_history[0].item())
    discard_scalers(torch.nn.Sequential(s))
    assert same(s.state_dict(), before)


def test_non_finite_steps_are_skipped_and_divergence_names_the_layer(tmp_path, caplog):
    cfg = compose(
        [
            *FP8,
            "trainer.micro_batch_size=2",
            "trainer.max_steps=10",
            "trainer.checkpoint_every=0",
            "trainer.max_bad_steps=3",
        ]
    )
    trainer = Trainer(cfg, tmp_path)
    # Steps 3 and 5-7 (1-based) blow up in layers.1.mlp.down_proj; from step 5 on they stay broken.
    broken = trainer.model.get_submodule("layers.1.mlp.down_proj")
    broken.register_forward_hook(lambda m, a, out: out * math.inf if trainer.step == 2 or trainer.step >= 4 else None)
    snapshots = {}  # state at the start of each step (0-based index)
    train_step = trainer.train_step

    def recording_step():
        snapshots[trainer.step] = copy.deepcopy((trainer.model.state_dict(), trainer.optimizer.state_dict()["state"]))
        return train_step()

    trainer.train_step = recording_step
    with caplog.at_level(logging.WARNING), pytest.raises(DivergenceError) as err:
        trainer.fit()

    msg = str(err.value)
    assert "3 steps in a row (up to step 7)" in msg
    assert "first layer whose output is not finite is layers.1.mlp.down_proj" in msg
    assert "step 3: loss nan" in caplog.text and "optimizer step skipped (1 in a row, 1 in total" in caplog.text
    rows = [r for r in read_metrics(tmp_path) if "loss" in r]
    assert [r["bad_steps"] for r in rows] == [0, 0, 1, 1, 2, 3, 4]
    # A skipped step changes nothing: weights, FP8 scaling state, optimizer moments and step counts.
    assert same(snapshots[3], snapshots[2])
    assert not same(snapshots[4], snapshots[3])  # step 4 was good and trained
    final = (trainer.model.state_dict(), trainer.optimizer.state_dict()["state"])
    assert same(final, snapshots[4])
    assert all(torch.isfinite(b).all() for k, b in final[0].items() if "amax_history" in k)
    # The schedule still advanced, so step t keeps the lr and batch of step t.
    assert trainer.scheduler.last_epoch == 7
    # The stop wrote the last good state as step 7.
    assert trainer.saved_path.name == "step_0000007"
    saved = load_file(trainer.saved_path / "model.safetensors")
    assert all(torch.equal(saved[k], snapshots[4][0][k]) for k in saved)


def test_run_dir_of_another_run_is_refused_and_left_alone(tmp_path):
    Trainer(compose([*SMALL, "precision=fp32"]), tmp_path)
    config_before = (tmp_path / "config.yaml").read_text()
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 7.0}\n')
    with pytest.raises(RunDirError) as err:
        Trainer(compose([*SMALL, "precision=fp32", "optim.lr=0.5", "model.n_layers=3"]), tmp_path)
    assert "optim.lr: 0.001 -> 0.5" in str(err.value) and "model.n_layers: 2 -> 3" in str(err.value)
    # It has no checkpoint, so resume=auto would start at step 0 too: only a new directory is advice.
    assert "no checkpoint" in str(err.value) and "hydra.run.dir=PATH" in str(err.value)
    assert "resume=auto" not in str(err.value)
    assert (tmp_path / "config.yaml").read_text() == config_before
    assert (tmp_path / "metrics.jsonl").read_text() == '{"step": 1, "loss": 7.0}\n'
    # The same settings again (a run that died before its first checkpoint) may start over.
    Trainer(compose([*SMALL, "precision=fp32"]), tmp_path)


def test_first_signal_asks_to_stop_and_a_second_one_acts_at_once(monkeypatch):
    monkeypatch.setattr(StopSignals, "stopped_a_run", None)  # what a signal records for a multirun's later jobs
    with StopSignals() as signals:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.01)  # Python runs handlers between bytecodes
        assert signals.received == "SIGINT"
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.01)
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL


def test_a_signal_the_loop_never_acts_on_still_keeps_later_multirun_jobs_from_starting(monkeypatch):
    # SIGTERM during a run's last step (the run just finishes) or during a step that then diverges (the run ends in
    # its error and a multirun goes on to its next job): the next job must still not start training.
    monkeypatch.setattr(StopSignals, "stopped_a_run", None)
    with StopSignals():
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.01)
    assert StopSignals.stopped_a_run == "received SIGTERM"


# A checkpoint every two steps, nothing else that takes time.
SHORT = [
    *SMALL,
    "precision=bf16",
    "trainer.micro_batch_size=2",
    "trainer.max_steps=6",
    "trainer.eval_every=0",
    "trainer.eval_batches=1",
    "trainer.checkpoint_every=2",
]


def test_resume_past_a_damaged_checkpoint_sets_it_aside_and_keeps_the_new_timeline(tmp_path, caplog):
    Trainer(compose([*SHORT, "trainer.keep_last=5"]), tmp_path).fit()
    ckpt_root = tmp_path / "checkpoints"
    with open(ckpt_root / "step_0000006" / "optimizer.pt", "r+b") as f:
        f.truncate(100)
    # Falls back to step 4, writes step 5 and keeps only it: the damaged step 6 is not taken for a newer state.
    with caplog.at_level(logging.INFO):
        Trainer(compose([*SHORT, "resume=auto", "trainer.keep_last=1", "trainer.stop_at=5"]), tmp_path).fit()
    assert [p.name for p in checkpoint.complete_checkpoints(ckpt_root)] == ["step_0000005"]
    (aside,) = (ckpt_root / "superseded").iterdir()
    assert sorted(p.name for p in aside.iterdir()) == ["metrics.jsonl", "outliers.jsonl", "step_0000006"]
    assert f"later steps (6), of the timeline this run replaces, moved to {aside}" in caplog.text
    assert Trainer(compose([*SHORT, "resume=auto"]), tmp_path).step == 5


def test_a_resume_from_an_older_checkpoint_sets_the_replaced_metrics_aside_with_its_checkpoints(tmp_path):
    """The checkpoints of the steps a resume from an older one retrains are kept aside, in case it was a mistake; the
    metrics and outliers of those steps, which the resumed run cuts from its files, go with them: that timeline can
    be put back whole."""
    Trainer(compose([*SHORT, "trainer.keep_last=5"]), tmp_path).fit()
    before = {name: (tmp_path / name).read_text() for name in ("metrics.jsonl", "outliers.jsonl")}
    Trainer(compose([*SHORT, f"resume={tmp_path / 'checkpoints' / 'step_0000002'}"]), tmp_path)
    (aside,) = (tmp_path / "checkpoints" / "superseded").iterdir()
    assert {name: (aside / name).read_text() for name in before} == before
    assert max(r["step"] for r in read_metrics(tmp_path)) == 2 and max(r["step"] for r in read_metrics(aside)) == 6


def test_startup_removes_the_temp_folders_of_dead_writers(tmp_path):
    dead_pid = 2**22 + 1  # above Linux's pid_max: never a live process
    stale = tmp_path / "checkpoints" / f".tmp-step_0000004-{dead_pid}"
    stale.mkdir(parents=True)
    (stale / "optimizer.pt").write_bytes(b"half")
    Trainer(compose(SHORT), tmp_path)
    assert not stale.exists()


def test_a_full_disk_at_startup_stops_with_a_message_and_leaves_no_temp_file(tmp_path, monkeypatch):
    Trainer(compose(SHORT), tmp_path)
    real_open = pathlib.Path.open

    def full_disk(self, mode="r", *args, **kwargs):
        f = real_open(self, mode, *args, **kwargs)
        if "w" in mode and self.name.startswith(".config.yaml."):
            f.close()
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return f

    monkeypatch.setattr(pathlib.Path, "open", full_disk)
    before = (tmp_path / "config.yaml").read_text()
    with pytest.raises(Fp8trainError, match=r"Cannot write config.yaml .*No space left on device \(\d+ MiB free"):
        Trainer(compose(SHORT), tmp_path)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == [".lock"]  # no half-written temp file
    assert (tmp_path / "config.yaml").read_text() == before


@pytest.mark.parametrize("config", ["model: [\n", "model:\n  name: tiny\n"])
def test_resume_path_to_a_checkpoint_with_a_damaged_config_names_the_damage(tmp_path, config):
    # Its files are checked against the manifest before its config.yaml is compared with this run's settings: an
    # unreadable or cut config.yaml is damage, not a traceback nor a run "written with other settings".
    Trainer(compose(SHORT), tmp_path).fit()
    path = tmp_path / "checkpoints" / "step_0000006"
    (path / "config.yaml").write_text(config)
    with pytest.raises(CheckpointError, match=r"step_0000006: config.yaml has \d+ bytes.*the checkpoint is damaged"):
        Trainer(compose([*SHORT, f"resume={path}", "trainer.max_steps=8"]), tmp_path)


def test_weights_of_a_damaged_checkpoint_are_refused_as_init_from(tmp_path):
    Trainer(compose(SHORT), tmp_path / "old").fit()
    path = tmp_path / "old" / "checkpoints" / "step_0000006"
    weights = bytearray((path / "model.safetensors").read_bytes())
    weights[-3] ^= 0x40  # one bit of a weight: the file still reads, as other numbers
    (path / "model.safetensors").write_bytes(bytes(weights))
    with pytest.raises(CheckpointError, match=r"model.init_from=.*step_0000006: model.safetensors does not match"):
        Trainer(compose([*SHORT, f"model.init_from={path}"]), tmp_path / "new")
    assert not (tmp_path / "new" / "checkpoints").exists() and not (tmp_path / "new" / "config.yaml").exists()


def test_a_run_directory_another_process_trains_in_is_refused(tmp_path):
    # A job requeued while the first still runs, or the same command typed twice: two writers of one run directory
    # overwrite each other's metrics and checkpoints and delete the checkpoints the other is about to load.
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys; from fp8train.trainer import lock_run_dir; from pathlib import Path; "
         "lock_run_dir(Path(sys.argv[1])); print('locked', flush=True); sys.stdin.read()", str(tmp_path)],
        cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline() == "locked\n"
        with pytest.raises(RunDirError, match=rf"run directory {tmp_path} is in use: process {holder.pid} on "):
            Trainer(compose([*SHORT, "resume=auto"]), tmp_path)
        assert not (tmp_path / "config.yaml").exists()
    finally:
        holder.communicate("")  # its end releases the lock
    Trainer(compose([*SHORT, "resume=auto"]), tmp_path)
    Trainer(compose([*SHORT, "resume=auto"]), tmp_path)  # this process again: the jobs of a multirun, say


def test_resuming_another_runs_checkpoint_in_a_run_directory_of_other_settings_is_refused(tmp_path):
    # Continuing run A's checkpoint in run B's directory would append A's steps to B's metrics and put A's config
    # over B's, beside B's checkpoints: refused as starting there would be. The same settings (a checkpoint restored
    # from a backup, say) may continue there.
    Trainer(compose(SHORT), tmp_path / "a").fit()
    Trainer(compose([*SHORT, "optim.lr=0.5"]), tmp_path / "b").fit()
    before = {f: (tmp_path / "b" / f).read_text() for f in ("config.yaml", "metrics.jsonl")}
    other = tmp_path / "a" / "checkpoints" / "step_0000004"
    with pytest.raises(RunDirError, match=r"holds a run with other settings \(optim.lr: 0.5 -> 0.001\)"):
        Trainer(compose([*SHORT, f"resume={other}", "trainer.max_steps=8"]), tmp_path / "b")
    assert {f: (tmp_path / "b" / f).read_text() for f in before} == before
    assert not (tmp_path / "b" / "checkpoints" / "superseded").exists()
    assert Trainer(compose([*SHORT, f"resume={other}", "trainer.max_steps=8"]), tmp_path / "c").step == 4
