"""FP8 training runs of train.py on CPU (emulated FP8): parity with bf16 and exact resume of scaling state."""

from __future__ import annotations

import pytest

from fp8train.loggers import read_metrics
from tests.helpers import SMALL, run_train

pytestmark = pytest.mark.slow

LEARN = [
    *SMALL,
    "trainer.max_steps=150",
    "trainer.eval_every=150",
    "trainer.checkpoint_every=0",
    "optim.lr=3e-3",
    "optim.warmup_steps=10",
    "logger.log_every=10",
]


def final_val_loss(run_dir) -> float:
    return [r["val_loss"] for r in read_metrics(run_dir) if "val_loss" in r][-1]


def test_fp8_smooth_run_learns_like_bf16(tmp_path):
    losses = {}
    for prec in ("bf16", "fp8_smooth"):
        out = run_train(tmp_path / prec, *LEARN, f"precision={prec}")
        assert out.returncode == 0, out.stderr
        losses[prec] = final_val_loss(tmp_path / prec)
    assert "linears to FP8" in (tmp_path / "fp8_smooth" / "train.log").read_text()
    assert losses["fp8_smooth"] == pytest.approx(losses["bf16"], rel=0.03), losses


def test_adamw_fp8_run_ends_within_2_percent_of_adamw(tmp_path):
    losses = {}
    for optim in ("adamw", "adamw_fp8"):
        # fp8_min_numel=0 puts every matrix of this small model on FP8 moments (1-D params stay fp32).
        out = run_train(tmp_path / optim, *LEARN, "precision=bf16", f"optim={optim}", "optim.fp8_min_numel=0")
        assert out.returncode == 0, out.stderr
        losses[optim] = final_val_loss(tmp_path / optim)
    log = (tmp_path / "adamw_fp8" / "train.log").read_text()
    bytes_per_param = float(log.split("optimizer adamw_fp8: ")[1].split(" bytes")[0])
    assert bytes_per_param < 2.2  # fp32 AdamW: 8
    assert losses["adamw_fp8"] == pytest.approx(losses["adamw"], rel=0.02), losses


def test_fp8_scaling_state_and_fp8_moments_resume_exactly(tmp_path):
    args = [
        *SMALL,
        "precision=fp8_smooth",
        "optim=adamw_fp8",
        "optim.fp8_min_numel=0",
        "trainer.micro_batch_size=4",  # the same 8 sequences per step, in two micro-batches: amaxes over both
        "trainer.grad_accum_steps=2",
        "trainer.max_steps=24",
        "trainer.eval_every=0",
        "trainer.checkpoint_every=8",
    ]
    assert run_train(tmp_path / "straight", *args).returncode == 0
    assert run_train(tmp_path / "split", *args, "trainer.stop_at=12").returncode == 0
    out = run_train(tmp_path / "split", *args, "resume=auto")
    assert out.returncode == 0, out.stderr

    def losses(d):
        return {r["step"]: r["loss"] for r in read_metrics(d) if "loss" in r}

    assert losses(tmp_path / "straight") == losses(tmp_path / "split")
    assert len(losses(tmp_path / "split")) == 24
