"""Helpers shared by the integration tests."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


# Small enough that a 60-step CPU run takes seconds; same shape family as model=tiny (GQA, tied embeddings).
SMALL = [
    "backend=cpu",
    "model.d_model=64",
    "model.n_layers=2",
    "model.n_heads=4",
    "model.n_kv_heads=2",
    "model.ffn_dim=192",
    "data.seq_len=64",
    "trainer.micro_batch_size=8",
    "logger.wandb.mode=disabled",
    "logger.log_every=1",
]


def run_train(run_dir: Path, *overrides: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """python train.py in a subprocess, as a user would run it, with its run dir at run_dir."""
    cmd = [sys.executable, str(ROOT / "train.py"), f"hydra.run.dir={run_dir}", *overrides]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=os.environ.copy())
