"""parallel=deepspeed for real: 2 CPU ranks over gloo, launched by torchrun like a user would on one node.

The same global batch in one process and over 2 ranks is the same computation up to rounding: the data layout
puts the single process's micro-batch rows on the ranks in order and delayed-scaling amaxes are max-reduced
(the first step's just-in-time scales come from each rank's own rows). resume=auto continues a ZeRO run exactly.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest
import torch

from fp8train.export.hf import load_checkpoint_model
from fp8train.loggers import read_metrics
from tests.helpers import ROOT, SMALL, run_train

pytestmark = pytest.mark.slow

STEPS = 6
COMMON = [
    *SMALL,
    "backend.threads=1",
    f"trainer.max_steps={STEPS}",
    "trainer.eval_every=0",
    "trainer.checkpoint_every=3",
]
GLOBAL_BATCH = 8  # sequences per optimizer step in every run below


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(run_dir, *overrides: str, ranks: int = 2) -> str:
    """torchrun train.py on ``ranks`` CPU processes; returns what they printed (stdout and stderr)."""
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={ranks}",
        f"--master_port={free_port()}",
        str(ROOT / "train.py"),
        f"hydra.run.dir={run_dir}",
        *COMMON,
        "parallel=deepspeed",
        *overrides,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    return done.stdout + done.stderr


def losses(run_dir, key: str = "loss") -> dict[int, float]:
    return {r["step"]: r[key] for r in read_metrics(run_dir) if key in r}


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("single")
    done = run_train(run_dir, *COMMON, f"trainer.micro_batch_size={GLOBAL_BATCH}")
    assert done.returncode == 0, done.stderr[-3000:]
    return losses(run_dir), losses(run_dir, "grad_norm")


@pytest.mark.parametrize(
    "zero_stage, micro_batch, accum",
    [(0, GLOBAL_BATCH // 2, 1), (1, GLOBAL_BATCH // 2, 1), (2, GLOBAL_BATCH // 4, 2), (3, GLOBAL_BATCH // 2, 1)],
    ids=["zero0", "zero1", "zero2-accum2", "zero3"],
)
def test_two_ranks_match_one_process_with_the_same_global_batch(tmp_path, single, zero_stage, micro_batch, accum):
    run_dir = tmp_path / "ds"
    done = run_ranks(
        run_dir,
        f"parallel.zero_stage={zero_stage}",
        f"trainer.micro_batch_size={micro_batch}",
        f"trainer.grad_accum_steps={accum}",
    )
    assert f"2 ranks (gloo), ZeRO stage {zero_stage}, {GLOBAL_BATCH} sequences per step" in done
    ds = losses(run_dir)
    assert sorted(ds) == list(range(1, STEPS + 1))
    # Only rank 0 writes metrics: one line per step, not two.
    assert len([r for r in read_metrics(run_dir) if "loss" in r]) == STEPS
    single_losses, single_norms = single
    for step, loss in single_losses.items():
        assert ds[step] == pytest.approx(loss, rel=1e-4), step
    # The norm of the averaged gradient: a rank stepping on its own half-batch gradient has a visibly larger one.
    for step, norm in losses(run_dir, "grad_norm").items():
        assert norm == pytest.approx(single_norms[step], rel=2e-3), step


def test_zero2_with_fp8_adam_resumes_exactly(tmp_path):
    common = ["parallel.zero_stage=2", "trainer.micro_batch_size=4", "optim=adamw_fp8", "optim.fp8_min_numel=0"]
    unbroken = tmp_path / "unbroken"
    done = run_ranks(unbroken, *common)
    # AdamWFp8 sees ZeRO's flat partitions, yet matrices keep FP8 moments (~1 byte/param per rank for 2 ranks).
    line = next(ln for ln in done.splitlines() if "bytes of state per parameter" in ln)
    per_rank = float(line.split("adamw_fp8: ")[1].split()[0])
    assert 0.9 < per_rank < 1.3, line
    broken = tmp_path / "broken"
    run_ranks(broken, *common, "trainer.stop_at=3")
    ckpt = broken / "checkpoints" / "step_0000003"
    assert (ckpt / "deepspeed").is_dir() and (ckpt / "model.safetensors").is_file()
    assert {p.name for p in ckpt.glob("rank_*.pt")} == {"rank_0.pt", "rank_1.pt"}
    # Its model.safetensors is the weights DeepSpeed saved, readable without DeepSpeed (export-hf, init_from).
    plain = load_checkpoint_model(ckpt).state_dict()
    module = torch.load(ckpt / "deepspeed" / "mp_rank_00_model_states.pt", weights_only=False)["module"]
    assert plain.keys() <= module.keys()
    for name, tensor in plain.items():
        assert torch.equal(tensor, module[name].float()), name
    assert max(losses(broken)) == 3
    done = run_ranks(broken, *common, "resume=auto")
    assert "resumed from" in done
    assert losses(broken) == losses(unbroken)
