"""experiment=compare_bf16_fp8 as one multirun, then fp8train compare on its run directories."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from omegaconf import OmegaConf

from fp8train.loggers import read_metrics
from tests.helpers import ROOT, SMALL
from tests.unit.test_compare import rows_of

pytestmark = pytest.mark.slow


def test_multirun_trains_four_arms_and_compare_plots_and_tabulates_them(tmp_path):
    sweep = tmp_path / "sweep"
    small = [a for a in SMALL if not a.startswith("logger.log_every")]
    cmd = [
        sys.executable,
        str(ROOT / "train.py"),
        "experiment=compare_bf16_fp8",
        f"hydra.sweep.dir={sweep}",
        *small,
        "trainer.max_steps=20",
        "trainer.eval_every=10",
        "logger.log_every=5",
        "optim.fp8_min_numel=0",
    ]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=os.environ.copy(), timeout=600)
    assert out.returncode == 0, out.stderr
    runs = sorted(p for p in sweep.iterdir() if p.is_dir())
    assert [p.name for p in runs] == ["0_bf16_adamw", "1_fp8_adamw", "2_fp8_smooth_adamw", "3_fp8_smooth_adamw_fp8"]
    groups = {OmegaConf.load(p / "config.yaml").logger.wandb.group for p in runs}
    assert groups == {"compare_bf16_fp8"}

    # A fifth run with another seed is plotted but flagged as not comparable.
    other = tmp_path / "other_seed"
    seeded = [
        sys.executable,
        str(ROOT / "train.py"),
        f"hydra.run.dir={other}",
        *SMALL,
        "precision=bf16",
        "trainer.max_steps=10",
        "trainer.eval_every=10",
        "trainer.seed=7",
    ]
    assert subprocess.run(seeded, cwd=ROOT, capture_output=True, env=os.environ.copy()).returncode == 0

    cmp = [
        sys.executable,
        "-m",
        "fp8train.cli.main",
        "compare",
        *map(str, runs),
        str(other),
        "--out",
        str(tmp_path / "cmp"),
    ]
    result = subprocess.run(cmp, cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    rows = rows_of(result.stdout)  # the two bf16 runs are told apart by their directories
    assert list(rows) == [f"bf16 ({runs[0].name})", "fp8", "fp8_smooth", "fp8_smooth+adamw_fp8", "bf16 (other_seed)"]
    assert rows[f"bf16 ({runs[0].name})"]["val gap to ref"] == "+0.00%"  # the reference against itself
    arms = list(rows.values())
    assert all(r["comparable"] == "yes" and r["notes"] == "" for r in arms[:4])
    # trained 10 steps of its own cosine, not 20: its lr differs too
    assert (
        arms[4]["comparable"] == "no: different seed, lr schedule (trainer.seed 7 vs 1234, trainer.max_steps 10 vs 20)"
    )
    gaps = [float(r["val gap to ref"].rstrip("%")) for r in arms[1:4]]
    assert all(abs(g) < 3.0 for g in gaps), rows  # 20 steps of FP8 stay within a few % of bf16
    png = tmp_path / "cmp" / "compare.png"
    assert png.stat().st_size > 10_000 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_compare_refuses_a_folder_that_is_not_a_run(tmp_path):
    cmp = [sys.executable, "-m", "fp8train.cli.main", "compare", str(tmp_path)]
    result = subprocess.run(cmp, cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 2 and "not an fp8train run directory" in result.stderr
    assert "Traceback" not in result.stderr


def diverging_sweep(sweep, lrs: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """A multirun over optim.lr in which an lr of 1e30 diverges at step 2 (trainer.max_bad_steps=1)."""
    cmd = [
        sys.executable,
        str(ROOT / "train.py"),
        "-m",
        f"hydra.sweep.dir={sweep}",
        "hydra.sweep.subdir=${hydra.job.num}",
        *SMALL,
        "precision=fp32",
        "trainer.max_steps=3",
        "trainer.eval_every=0",
        "trainer.checkpoint_every=0",
        "trainer.max_bad_steps=1",
        "optim.grad_clip=0",
        "optim.warmup_steps=0",
        f"optim.lr={lrs}",
    ]
    env = {**os.environ, **(env or {})}
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)


def test_a_job_that_diverges_does_not_stop_the_sweep_and_compare_notes_it(tmp_path):
    """compare_bf16_fp8 exists to show plain FP8 diverging where Smooth-SwiGLU does not: a job that ends in an
    fp8train error (here: divergence at an lr of 1e30) must not keep the jobs after it from training. The sweep
    ends with a summary naming the failed job and exit status 2; fp8train compare shows the run's fate."""
    sweep = tmp_path / "sweep"
    out = diverging_sweep(sweep, "1e-3,1e30,2e-3")
    assert out.returncode == 2, out.stderr[-3000:]
    assert "Traceback" not in out.stderr and "Error executing job" not in out.stderr, out.stderr[-3000:]
    # the job's own message, where it happened, naming the job and its run dir
    assert f"fp8train: job #1 of this multirun ({sweep / '1'}) failed: step 2 had a non-finite loss" in out.stderr
    # the jobs before and after it trained to the end
    steps = {p.name: [r["step"] for r in read_metrics(p) if "loss" in r] for p in (sweep / "0", sweep / "2")}
    assert steps == {"0": [1, 2, 3], "2": [1, 2, 3]}
    summary = out.stderr[out.stderr.index("fp8train: 1 of 3 jobs of this multirun failed") :]
    assert f"#1 optim.lr=1e+30 ({sweep / '1'}): step 2 had a non-finite loss" in summary
    assert "#0" not in summary and "#2" not in summary

    cmp = [sys.executable, "-m", "fp8train.cli.main", "compare", str(sweep), "--out", str(tmp_path / "cmp")]
    result = subprocess.run(cmp, cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    notes = {name: row["notes"] for name, row in rows_of(result.stdout).items()}
    assert notes["fp32 (1)"].startswith("stopped at step 2 of 3; 1 step skipped (non-finite loss or gradients)")
    assert notes["fp32 (0)"] == notes["fp32 (2)"] == ""  # trained to the end, validated at the last step


def test_a_failed_job_of_one_rank_among_several_ends_the_sweep_at_once(tmp_path):
    """With several ranks, the others may be waiting for this one in a collective: the process exits at the failed
    job, as a single run does, so that the launcher stops them; the jobs after it do not start."""
    sweep = tmp_path / "sweep"
    out = diverging_sweep(sweep, "1e30,1e-3", env={"WORLD_SIZE": "2"})  # parallel=single trains alone regardless
    assert out.returncode == 2, out.stderr[-3000:]
    assert "fp8train: 1 of 1 jobs of this multirun so far failed: #0 (" in out.stderr
    assert "The sweep stops here, its later jobs not started" in out.stderr
    assert not (sweep / "1").exists()
