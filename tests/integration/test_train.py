"""train.py run as a user runs it, in a subprocess: loss falls, resume is exact, bad input fails cleanly."""

from __future__ import annotations

import importlib.util
import math
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

from fp8train import checkpoint
from fp8train.loggers import read_metrics
from tests.helpers import ROOT, SMALL, run_train

# The loop's own behaviour, in bf16 (fast on CPU); FP8 runs are tested in test_fp8_train.py.
BF16 = [*SMALL, "precision=bf16"]

pytestmark = pytest.mark.slow


def train_losses(run_dir) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run_dir) if "loss" in r}


def unigram_entropy(tokenizer_file, text_file) -> float:
    """Loss of the best context-free model: what a model that ignores context cannot beat."""
    from tokenizers import Tokenizer

    ids = np.array(Tokenizer.from_file(str(tokenizer_file)).encode(text_file.read_text()).ids)
    p = np.bincount(ids) / len(ids)
    return float(-(p[p > 0] * np.log(p[p > 0])).sum())


def test_tiny_run_learns_and_writes_its_run_dir(tmp_path):
    run_dir = tmp_path / "run"
    out = run_train(
        run_dir,
        *BF16,
        "trainer.max_steps=150",
        "trainer.eval_every=75",
        "trainer.checkpoint_every=75",
        "optim.lr=3e-3",
        "optim.warmup_steps=10",
    )
    assert out.returncode == 0, out.stderr
    rows = read_metrics(run_dir)
    losses = train_losses(run_dir)
    assert sorted(losses) == list(range(1, 151))
    assert abs(losses[1] - math.log(2048)) < 0.3  # starts at chance level for the 2048-token vocabulary
    evals = [r for r in rows if "val_loss" in r]
    assert [r["step"] for r in evals] == [75, 150]
    assert evals[1]["val_loss"] < evals[0]["val_loss"]
    # Below the unigram entropy (6.0 nats here): the model predicts from context, not just token frequencies.
    floor = unigram_entropy(run_dir / "tokenizer.json", ROOT / "data" / "tinyshakespeare.txt")
    assert evals[1]["val_loss"] < floor - 0.3, (evals, floor)
    assert evals[1]["val_ppl"] == pytest.approx(math.exp(evals[1]["val_loss"]))
    assert "val_loss/shakespeare" in evals[0]
    train_rows = [r for r in rows if "loss" in r]
    assert all(r["tokens_per_s"] > 0 and r["peak_mem_gb"] > 0 and math.isfinite(r["grad_norm"]) for r in train_rows)
    assert train_rows[-1]["tokens"] == 150 * 8 * 64
    assert [p.name for p in checkpoint.complete_checkpoints(run_dir / "checkpoints")] == [
        "step_0000075",
        "step_0000150",
    ]
    assert (run_dir / "config.yaml").is_file() and (run_dir / "tokenizer.json").is_file()
    assert (run_dir / "train.log").read_text().count("val_loss") >= 2
    assert f"results in {run_dir}" in out.stderr + out.stdout


def test_stop_and_resume_gives_bit_identical_losses(tmp_path):
    args = [*BF16, "trainer.max_steps=60", "trainer.eval_every=0", "trainer.checkpoint_every=20"]
    straight = run_train(tmp_path / "straight", *args)
    assert straight.returncode == 0, straight.stderr
    first = run_train(tmp_path / "split", *args, "trainer.stop_at=30")
    assert first.returncode == 0, first.stderr
    assert checkpoint.latest(tmp_path / "split" / "checkpoints").name == "step_0000030"
    assert max(train_losses(tmp_path / "split")) == 30
    second = run_train(tmp_path / "split", *args, "resume=auto")
    assert second.returncode == 0, second.stderr
    assert "resumed from" in second.stderr + second.stdout
    a, b = train_losses(tmp_path / "straight"), train_losses(tmp_path / "split")
    assert sorted(b) == list(range(1, 61))
    assert a == b  # to the bit: JSON keeps every digit of a float


def test_resume_none_refuses_a_run_dir_with_checkpoints(tmp_path):
    run_dir = tmp_path / "run"
    assert run_train(run_dir, *BF16, "trainer.max_steps=2").returncode == 0
    before = {p.name: p.stat().st_mtime_ns for p in (run_dir / "checkpoints").iterdir()}
    metrics_before = (run_dir / "metrics.jsonl").read_text()
    out = run_train(run_dir, *BF16, "trainer.max_steps=4")
    assert out.returncode == 2
    assert "already holds checkpoints. Pass resume=auto" in out.stderr and "Traceback" not in out.stderr
    assert {p.name: p.stat().st_mtime_ns for p in (run_dir / "checkpoints").iterdir()} == before
    assert (run_dir / "metrics.jsonl").read_text() == metrics_before


def test_bad_config_lists_every_problem_without_traceback_or_run_dir(tmp_path):
    run_dir = tmp_path / "never"
    out = run_train(
        run_dir,
        "model=huge",
        "optim.lr=-1",
        "trainer.max_steps=ten",
        "model.n_heads=5",
        "data.sources=[{path: no/such.txt}]",
        "data.seq_len=100000",
    )
    assert out.returncode == 2
    assert "Traceback" not in out.stderr
    for expected in (
        "model=huge: unknown option",
        "optim.lr=-1.0: must be > 0",
        "trainer.max_steps=ten: expected an integer",
        "model.n_heads=5: must divide model.d_model=256",
        "data.sources.0.path=no/such.txt: no such file",
        "data.seq_len=100000: exceeds model.max_seq_len=512",
    ):
        assert expected in out.stderr, out.stderr
    assert not run_dir.exists()


def test_a_null_group_is_refused_without_traceback_or_run_dir(tmp_path):
    out = run_train(tmp_path / "never", "model=null")
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "model=null: a config group takes one of its options, not null" in out.stderr
    assert not (tmp_path / "never").exists()


@pytest.mark.skipif(importlib.util.find_spec("habana_frameworks") is not None, reason="this machine has Gaudi's bridge")
def test_a_backend_this_machine_lacks_is_refused_before_the_run_dir_exists(tmp_path):
    out = run_train(tmp_path / "never", *BF16, "backend=hpu")
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "backend.name=hpu needs Habana's PyTorch bridge (habana_frameworks)" in out.stderr
    assert "choose backend.name=cpu or backend.name=cuda" in out.stderr
    assert not (tmp_path / "never").exists()


def test_a_run_dir_that_is_a_file_is_refused_before_hydra_touches_it(tmp_path):
    taken = tmp_path / "taken"
    taken.write_text("not a run directory")
    out = run_train(taken, *BF16)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert f"hydra.run.dir={taken}: {taken} is a file, not a folder" in out.stderr
    assert taken.read_text() == "not a run directory"


def test_unreadable_data_is_a_clear_error(tmp_path):
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\xe9 au lait\n".encode("latin-1") * 100)
    out = run_train(tmp_path / "run", *BF16, f"data.sources=[{{path: {bad}}}]")
    assert out.returncode == 2
    assert "UTF-8" in out.stderr and str(bad) in out.stderr and "Traceback" not in out.stderr


def test_fp8train_command_checks_and_trains(tmp_path):
    exe = [sys.executable, "-m", "fp8train.cli.main"]
    env = os.environ.copy()
    ok = subprocess.run([*exe, "check", "model=llama2_7b"], cwd=ROOT, capture_output=True, text=True, env=env)
    assert ok.returncode == 0, ok.stderr
    assert "d_model: 4096" in ok.stdout and "config is valid" in ok.stdout
    bad = subprocess.run([*exe, "check", "optim.lr=0"], cwd=ROOT, capture_output=True, text=True, env=env)
    assert bad.returncode == 2 and "optim.lr=0.0: must be > 0" in bad.stderr
    run_dir = tmp_path / "run"
    out = subprocess.run(
        [*exe, "train", f"hydra.run.dir={run_dir}", *BF16, "trainer.max_steps=3"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=env,
    )
    assert out.returncode == 0, out.stderr
    assert sorted(train_losses(run_dir)) == [1, 2, 3]


def test_wandb_offline_run_is_written_into_the_run_dir(tmp_path):
    run_dir = tmp_path / "run"
    out = run_train(
        run_dir,
        *[a for a in BF16 if "wandb" not in a],
        "trainer.max_steps=3",
        "logger.wandb.mode=offline",
        "logger.wandb.group=cmp",
    )
    assert out.returncode == 0, out.stderr
    runs = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and runs[0].name.endswith((run_dir / "wandb_id").read_text())
    assert (runs[0] / f"run-{runs[0].name.split('-')[-1]}.wandb").stat().st_size > 0


@pytest.mark.parametrize("entry", [["train.py"], ["-m", "fp8train.cli.main", "train"]], ids=["train.py", "fp8train"])
def test_ctrl_c_while_importing_at_start_up_is_a_message_and_status_130(tmp_path, entry):
    """Ctrl-C in the first fraction of a second, while Python still imports Hydra: the one-line message and status
    130 of a Ctrl-C anywhere else, not the traceback of whatever import it lands in."""
    # -X importtime prints a line to stderr as each module's import ends: the signal goes out when omegaconf's has,
    # inside `import hydra`, and should land while fp8train.cli.train still imports, before the run's first steps.
    cmd = [sys.executable, "-X", "importtime", *entry, f"hydra.run.dir={tmp_path / 'run'}", *BF16]
    for _ in range(5):
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        lines = []
        for line in proc.stderr:
            lines.append(line)
            if line.split("|")[-1].strip() == "omegaconf":
                proc.send_signal(signal.SIGINT)
                break
        lines += proc.communicate(timeout=120)[1].splitlines(keepends=True)
        imported = [line.split("|")[-1].strip() for line in lines if line.startswith("import time:")]
        if imported[-1] == "fp8train.cli.train":  # its import ended (in the interrupt) and nothing was imported next
            break
    else:
        pytest.skip("the signal never reached the process during its imports")
    messages = [line for line in lines if not line.startswith("import time:")]
    assert proc.returncode == 130, "".join(messages)
    assert len(messages) == 1 and messages[0].startswith("fp8train: interrupted (Ctrl-C)"), "".join(messages)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "flags, named",
    [
        (["--info", "defaults", "model=nope"], "model=nope: unknown option"),
        (["-m", "--cfg", "job"], "--multirun and --cfg: Hydra does one of"),
        (["--resolve"], "--resolve: only applies with --cfg"),
    ],
)
def test_hydra_flags_used_wrongly_end_without_traceback(flags, named):
    out = subprocess.run([sys.executable, "train.py", *flags], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and named in out.stderr and "Traceback" not in out.stderr, out.stderr


@pytest.mark.parametrize(
    "override",
    [
        "trainer.micro_batch_size=100000000000",  # built a Python list of window indices until the machine ran out
        "model.vocab_size=1000000000000",  # the embedding alone: DefaultCPUAllocator's RuntimeError traceback
    ],
)
def test_settings_that_cannot_fit_in_memory_end_in_a_message_naming_what_to_lower(tmp_path, override):
    out = run_train(tmp_path / "run", *BF16, "trainer.max_steps=1", override, timeout=120)
    assert out.returncode == 2, out.stderr[-3000:]
    assert "Traceback" not in out.stderr and "fp8train: out of memory" in out.stderr, out.stderr[-3000:]
    assert "lower trainer.micro_batch_size" in out.stderr
