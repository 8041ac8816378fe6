"""train.py killed, interrupted and fed damaged checkpoints: resume=auto always ends with an unbroken run's losses."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time

import pytest

from fp8train import checkpoint
from fp8train.loggers import read_metrics
from tests.helpers import ROOT, SMALL, run_train

pytestmark = pytest.mark.slow

# A checkpoint every step: many chances to be killed mid-write, and any kill loses at most one step.
COMMON = [
    *SMALL,
    "trainer.micro_batch_size=2",
    "trainer.max_steps=10",
    "trainer.eval_every=0",
    "trainer.checkpoint_every=1",
    "trainer.keep_last=2",
]
PRECISIONS = {
    "bf16": ["precision=bf16"],
    "fp8": ["precision=fp8_smooth", "optim=adamw_fp8", "optim.fp8_min_numel=0"],
}


def train_losses(run_dir) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run_dir) if "loss" in r}


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """Losses of uninterrupted runs, per precision, computed once for the module."""
    cache = {}

    def get(prec: str) -> dict[int, float]:
        if prec not in cache:
            run_dir = tmp_path_factory.mktemp(f"straight_{prec}")
            out = run_train(run_dir, *COMMON, *PRECISIONS[prec])
            assert out.returncode == 0, out.stderr
            cache[prec] = train_losses(run_dir)
            assert sorted(cache[prec]) == list(range(1, 11))
        return cache[prec]

    return get


def popen_train(run_dir, *overrides: str) -> subprocess.Popen:
    cmd = [sys.executable, str(ROOT / "train.py"), f"hydra.run.dir={run_dir}", *overrides]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(proc: subprocess.Popen, condition, timeout: float = 120.0, poll: float = 0.0005) -> bool:
    """Poll until condition() holds (True) or the process exits (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(poll)
    raise AssertionError("timed out")


def tmp_dirs(run_dir) -> list:
    root = run_dir / "checkpoints"
    return [e.name for e in os.scandir(root) if e.name.startswith(".tmp-")] if root.is_dir() else []


@pytest.mark.parametrize("prec", ["fp8"])  # FP8 + FP8 Adam: bf16's checkpoint state and more (scales, FP8 moments)
def test_sigkill_at_random_moments_then_resume_gives_unbroken_losses(tmp_path, straight, prec):
    rng = random.Random(f"kill-{prec}")
    run_dir = tmp_path / "run"
    args = [*COMMON, *PRECISIONS[prec], "resume=auto"]
    killed_mid_write, kills = False, 0
    for _ in range(8):  # kill until one landed mid-write and three in all, then run to the end
        if kills >= 3 and killed_mid_write:
            break
        proc = popen_train(run_dir, *args)
        done = max(train_losses(run_dir), default=0)
        if not killed_mid_write:
            # Kill the moment a temporary checkpoint folder appears, i.e. during a checkpoint write.
            hit = wait_for(proc, lambda: tmp_dirs(run_dir))
        else:
            target = done + rng.randint(1, 3)  # a random point: 1-3 steps after those already logged
            hit = wait_for(proc, lambda t=target: max(train_losses(run_dir), default=0) >= t, poll=0.005)
            time.sleep(rng.uniform(0, 0.05))
        if not hit:  # finished before the kill point (cannot happen with these step counts)
            proc.communicate()
            break
        proc.kill()
        proc.communicate()
        kills += 1
        if tmp_dirs(run_dir):
            killed_mid_write = True
            # A killed write is never taken as a checkpoint.
            assert all(not p.name.startswith(".tmp") for p in checkpoint.complete_checkpoints(run_dir / "checkpoints"))
    assert killed_mid_write and kills >= 3, (killed_mid_write, kills)
    final = run_train(run_dir, *args)
    assert final.returncode == 0, final.stderr
    assert train_losses(run_dir) == straight(prec)  # every step, to the bit
    assert tmp_dirs(run_dir) == []  # the dead writers' temporary folders were cleaned up
    assert [p.name for p in checkpoint.complete_checkpoints(run_dir / "checkpoints")] == [
        "step_0000009",
        "step_0000010",
    ]


def test_sigterm_stops_after_the_step_with_a_checkpoint_and_resumes_exactly(tmp_path, straight):
    run_dir = tmp_path / "run"
    args = [*COMMON, "precision=bf16", "trainer.checkpoint_every=0"]  # only the SIGTERM writes a checkpoint
    proc = popen_train(run_dir, *args)
    assert wait_for(proc, lambda: len(train_losses(run_dir)) >= 3, poll=0.01)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr
    log = stdout + stderr
    last_logged = max(train_losses(run_dir))
    assert 3 <= last_logged < 10
    assert checkpoint.latest(run_dir / "checkpoints").name == checkpoint.step_dir_name(last_logged)
    assert f"received SIGTERM: stopped after step {last_logged}" in log
    assert f"hydra.run.dir={run_dir} resume=auto" in log
    out = run_train(run_dir, *args, "resume=auto")
    assert out.returncode == 0, out.stderr
    assert train_losses(run_dir) == straight("bf16")


def test_damaged_newest_checkpoint_falls_back_and_resume_path_to_it_fails_cleanly(tmp_path, straight):
    run_dir = tmp_path / "run"
    args = [*COMMON, "precision=bf16"]
    assert run_train(run_dir, *args, "trainer.stop_at=6").returncode == 0
    newest = run_dir / "checkpoints" / "step_0000006"
    with open(newest / "optimizer.pt", "r+b") as f:
        f.truncate(100)

    direct = run_train(run_dir, *args, f"resume={newest}")
    assert direct.returncode == 2
    assert "optimizer.pt has 100 bytes" in direct.stderr and "damaged" in direct.stderr
    assert "Traceback" not in direct.stderr

    out = run_train(run_dir, *args, "resume=auto")
    assert out.returncode == 0, out.stderr
    log = out.stderr + out.stdout
    assert "step_0000006 is damaged: optimizer.pt has 100 bytes" in log
    assert "resumed from" in log and "step_0000005 (step 5)" in log
    assert train_losses(run_dir) == straight("bf16")


def test_resume_from_an_older_checkpoint_replaces_the_later_timeline(tmp_path, straight):
    run_dir = tmp_path / "run"
    args = [*COMMON, "precision=bf16"]
    assert run_train(run_dir, *args, "trainer.keep_last=5", "trainer.stop_at=6").returncode == 0
    ckpt_root = run_dir / "checkpoints"
    older = ckpt_root / "step_0000002"
    out = run_train(run_dir, *args, f"resume={older}", "trainer.stop_at=3")
    assert out.returncode == 0, out.stderr
    # Steps 3-6 are trained again: their old checkpoints are kept aside, never taken or counted by keep_last.
    assert [p.name for p in checkpoint.complete_checkpoints(ckpt_root)] == ["step_0000002", "step_0000003"]
    (aside,) = (ckpt_root / "superseded").iterdir()
    assert [p.name for p in checkpoint.complete_checkpoints(aside)] == list(map(checkpoint.step_dir_name, (3, 4, 5, 6)))
    assert max(train_losses(aside)) == 6  # their metrics with them
    assert f"later steps (3, 4, 5, 6), of the timeline this run replaces, moved to {aside}" in out.stdout + out.stderr
    assert max(train_losses(run_dir)) == 3
    out = run_train(run_dir, *args, "resume=auto")
    assert out.returncode == 0, out.stderr
    assert "step_0000003 (step 3)" in out.stdout + out.stderr
    assert train_losses(run_dir) == straight("bf16")


def test_sigterm_ends_a_multirun_sweep_and_names_how_to_continue_it(tmp_path):
    # The jobs of a Hydra multirun train one after another in one process: a preemption stops the job it lands in
    # with a checkpoint, and the jobs after it must not start training (the scheduler's SIGKILL follows).
    sweep = tmp_path / "sweep"
    args = [*COMMON, "trainer.max_steps=100000", "trainer.checkpoint_every=0", "hydra.sweep.subdir=${precision.name}"]
    cmd = [sys.executable, str(ROOT / "train.py"), "-m", f"hydra.sweep.dir={sweep}", *args, "precision=bf16,fp32"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert wait_for(proc, lambda: len(train_losses(sweep / "bf16")) >= 2, poll=0.01)
    proc.send_signal(signal.SIGTERM)
    try:
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()  # the second job training on, before the fix: never leave it running
    assert proc.returncode == 0, stderr
    log = stdout + stderr
    stopped_at = max(train_losses(sweep / "bf16"))
    assert checkpoint.latest(sweep / "bf16" / "checkpoints").name == checkpoint.step_dir_name(stopped_at)
    assert f"received SIGTERM: stopped after step {stopped_at}" in log
    assert f"hydra.sweep.dir={sweep} resume=auto" in log  # the multirun's own folder, not one job's run dir
    assert train_losses(sweep / "fp32") == {}  # the second job trained nothing
    assert checkpoint.latest(sweep / "fp32" / "checkpoints") is None
    assert "does not start" in log
