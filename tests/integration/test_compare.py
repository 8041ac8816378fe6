"""experiment=compare_bf16_fp8 as one multirun, then fp8train compare on its run directories."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from omegaconf import OmegaConf

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
