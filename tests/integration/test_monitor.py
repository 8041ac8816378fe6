"""A monitored FP8 run end to end: outliers.jsonl (also across a stop and resume), then fp8train report on it."""

from __future__ import annotations

import subprocess
import sys

import pytest

from fp8train.loggers import read_jsonl, read_metrics
from tests.helpers import ROOT, SMALL, run_train

pytestmark = pytest.mark.slow

MONITORED = [
    *SMALL,
    "precision=fp8",
    "monitor=default",
    "monitor.interval=5",
    "trainer.max_steps=20",
    "trainer.eval_every=0",
    "trainer.checkpoint_every=10",
]


def test_monitored_run_resumes_its_outliers_and_the_report_draws_them(tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert run_train(straight, *MONITORED).returncode == 0
    first = run_train(resumed, *MONITORED, "trainer.stop_at=10")
    assert first.returncode == 0, first.stderr
    second = run_train(resumed, *MONITORED, "resume=auto")
    assert second.returncode == 0, second.stderr

    rows = read_jsonl(resumed / "outliers.jsonl")
    assert [r["step"] for r in rows] == [1, 5, 10, 15, 20]  # no step twice, none missing
    # FP8 training resumes bit-exactly, so the statistics after the resume equal the unbroken run's.
    assert rows == read_jsonl(straight / "outliers.jsonl")
    for row in rows:
        assert [layer["layer"] for layer in row["layers"]] == [0, 1]
        for layer in row["layers"]:
            assert 0 < layer["h_rms"] < layer["h_amax"] == pytest.approx(layer["top_channels"][0][1])
            assert layer["h_kurtosis"] > 1 and 0 < layer["cos_mean_abs"] <= layer["cos_max_abs"] <= 1
            assert layer["down_in_amax"] == pytest.approx(layer["h_amax"], rel=0.02)  # plain SwiGLU: h, in bf16
            assert len(layer["fp8"]) == 21  # 7 linears x (input, weight, grad)
            fp8 = layer["fp8"]  # q/k/v and gate/up read one tensor through one scaler: listed under each name
            assert fp8["self_attn.q_proj.input"] == fp8["self_attn.k_proj.input"] == fp8["self_attn.v_proj.input"]
            assert fp8["mlp.gate_proj.input"] == fp8["mlp.up_proj.input"] != fp8["mlp.down_proj.input"]
            for s in layer["fp8"].values():
                assert s["amax"] > 0 and s["scale"] > 0 and 0 <= s["saturated_frac"] < 0.01
    assert not any(k.startswith("outliers/") for r in read_metrics(resumed) for k in r)  # kept out of metrics
    assert "step 10: outliers: largest h amax" in (resumed / "train.log").read_text()

    out = tmp_path / "report"
    cmd = [sys.executable, "-m", "fp8train.cli.main", "report", str(resumed), "--out", str(out)]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "5 monitored steps (1..20), 2 layers, precision fp8" in result.stdout
    assert "largest h amax" in result.stdout and "h amax growth, step 1 -> 20" in result.stdout
    assert (out / "summary.txt").read_text().strip() in result.stdout
    for name in ("h_amax.png", "alignment.png", "fp8_overflow.png", "worst_layers.png"):
        png = out / name
        assert png.stat().st_size > 5_000 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name


def test_report_on_a_run_without_outliers_is_a_clear_error(tmp_path):
    cmd = [sys.executable, "-m", "fp8train.cli.main", "report", str(tmp_path)]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 2 and "outliers.jsonl does not exist" in result.stderr
    assert "monitor=default" in result.stderr and "Traceback" not in result.stderr
