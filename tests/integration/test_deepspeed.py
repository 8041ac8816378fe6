"""parallel=deepspeed for real: 2 CPU ranks over gloo, launched by torchrun like a user would on one node.

The same global batch in one process and over 2 ranks is the same computation up to rounding: the data layout
puts the single process's micro-batch rows on the ranks in order and delayed-scaling amaxes are max-reduced
(the first step's just-in-time scales come from each rank's own rows). resume=auto continues a ZeRO run exactly.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fp8train.export.hf import load_checkpoint_model
from fp8train.loggers import read_metrics
from fp8train.parallel.deepspeed import free_port
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


@pytest.fixture(autouse=True)
def no_shared_memory_left_behind():
    """DeepSpeed's CPU all-reduce keeps buffers in /dev/shm; remove any a run of these tests leaves there."""
    shm = Path("/dev/shm")
    before = set(shm.glob("deepspeed_*")) if shm.is_dir() else set()
    yield
    for leftover in set(shm.glob("deepspeed_*")) - before if shm.is_dir() else ():
        leftover.unlink(missing_ok=True)


def torchrun_cmd(run_dir, *overrides: str, ranks: int = 2) -> list[str]:
    return [
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


ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def run_ranks(run_dir, *overrides: str, ranks: int = 2) -> str:
    """torchrun train.py on ``ranks`` CPU processes; returns what they printed (stdout and stderr)."""
    cmd = torchrun_cmd(run_dir, *overrides, ranks=ranks)
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=ENV)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    return done.stdout + done.stderr


def losses(run_dir, key: str = "loss") -> dict[int, float]:
    return {r["step"]: r[key] for r in read_metrics(run_dir) if key in r}


@pytest.fixture(scope="module")
def single_dir(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("single")
    done = run_train(run_dir, *COMMON, f"trainer.micro_batch_size={GLOBAL_BATCH}")
    assert done.returncode == 0, done.stderr[-3000:]
    return run_dir


@pytest.fixture(scope="module")
def single(single_dir):
    return losses(single_dir), losses(single_dir, "grad_norm")


@pytest.mark.parametrize(
    "zero_stage, micro_batch, accum",
    [(0, GLOBAL_BATCH // 2, 1), (1, GLOBAL_BATCH // 2, 1), (2, GLOBAL_BATCH // 4, 2), (3, GLOBAL_BATCH // 4, 2)],
    ids=["zero0", "zero1", "zero2-accum2", "zero3-accum2"],
)
def test_two_ranks_match_one_process_with_the_same_global_batch(
    tmp_path, single, single_dir, zero_stage, micro_batch, accum
):
    run_dir = tmp_path / "ds"
    extra = []
    if zero_stage == 3:  # partition every weight: by default ZeRO-3 keeps parameters this small whole on each rank
        (tmp_path / "ds.json").write_text('{"zero_optimization": {"stage3_param_persistence_threshold": 0}}')
        extra = [f"parallel.ds_config={tmp_path / 'ds.json'}"]
    done = run_ranks(
        run_dir,
        f"parallel.zero_stage={zero_stage}",
        f"trainer.micro_batch_size={micro_batch}",
        f"trainer.grad_accum_steps={accum}",
        *extra,
    )
    if zero_stage:  # fp32 AdamW's 8 bytes of m and v per parameter, half of them on each rank
        line = next(ln for ln in done.splitlines() if "bytes of state per parameter on this rank" in ln)
        assert 3.9 < float(line.split("adamw: ")[1].split()[0]) < 4.3, line
    assert f"2 ranks (gloo), ZeRO stage {zero_stage}, {GLOBAL_BATCH} sequences per step" in done
    ds = losses(run_dir)
    assert sorted(ds) == list(range(1, STEPS + 1))
    # Only rank 0 writes metrics: one line per step, not two.
    assert len([r for r in read_metrics(run_dir) if "loss" in r]) == STEPS
    single_losses, single_norms = single
    for step, loss in single_losses.items():
        assert ds[step] == pytest.approx(loss, rel=1e-4), step
    # The validation set is fixed by the global batch: the ranks share out the windows one process evaluates.
    assert losses(run_dir, "val_loss")[STEPS] == pytest.approx(losses(single_dir, "val_loss")[STEPS], rel=1e-4)
    # The norm of the averaged gradient: a rank stepping on its own half-batch gradient has a visibly larger one.
    for step, norm in losses(run_dir, "grad_norm").items():
        assert norm == pytest.approx(single_norms[step], rel=2e-3), step


def test_validation_over_two_ranks_scores_the_windows_of_one_process(tmp_path):
    """In fp32 the same windows give the same val_loss up to summation order. eval_batches=50 global batches of 8
    ask for more windows than the split holds (333 at seq_len 64), so the set is the whole split; in micro-batches of
    2 that is 167, 83 on rank 0 and 84 on rank 1: rank 0 runs one more, uncounted, so that each forward of ZeRO-3
    (which gathers the weights from both ranks) has its peer."""
    settings = ["precision=fp32", "trainer.max_steps=2", "trainer.eval_batches=50"]
    one = tmp_path / "one"
    done = run_train(one, *COMMON, *settings, f"trainer.micro_batch_size={GLOBAL_BATCH}")
    assert done.returncode == 0, done.stderr[-3000:]
    (tmp_path / "ds.json").write_text('{"zero_optimization": {"stage3_param_persistence_threshold": 0}}')
    two = tmp_path / "two"
    cmd = torchrun_cmd(
        two,
        *settings,
        "parallel.zero_stage=3",
        f"parallel.ds_config={tmp_path / 'ds.json'}",
        f"trainer.micro_batch_size={GLOBAL_BATCH // 4}",
        "trainer.grad_accum_steps=2",
    )
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=180, env=ENV)  # or hangs
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    assert losses(two, "val_loss")[2] == pytest.approx(losses(one, "val_loss")[2], rel=1e-6)


def test_optimizer_offload_from_a_ds_config_trains_like_one_process(tmp_path, single):
    """parallel.ds_config may add ZeRO-Offload; the optimizer stays fp8train's (a client optimizer), which DeepSpeed
    refuses with offload unless told that this is meant (zero_force_ds_cpu_optimizer)."""
    (tmp_path / "ds.json").write_text('{"zero_optimization": {"offload_optimizer": {"device": "cpu"}}}')
    run_dir = tmp_path / "ds"
    run_ranks(
        run_dir,
        "parallel.zero_stage=2",
        f"parallel.ds_config={tmp_path / 'ds.json'}",
        f"trainer.micro_batch_size={GLOBAL_BATCH // 2}",
        "trainer.max_steps=2",
    )
    single_losses, _ = single
    assert losses(run_dir) == pytest.approx({s: single_losses[s] for s in (1, 2)}, rel=1e-4)


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
    # ZeRO-2 shards the optimizer state over 2 ranks: one rank cannot take it up, and says so without a traceback.
    one = subprocess.run(
        torchrun_cmd(broken, *common, "resume=auto", ranks=1), cwd=ROOT, capture_output=True, text=True, env=ENV
    )
    assert one.returncode != 0
    assert "fp8train: resume=" in one.stderr and "written by 2 ranks" in one.stderr, one.stderr[-3000:]
    assert "Error executing job" not in one.stderr, one.stderr[-3000:]  # Hydra's header of a traceback
    done = run_ranks(broken, *common, "resume=auto")
    assert "resumed from" in done
    assert losses(broken) == losses(unbroken)


def test_resume_with_another_zero_stage_is_refused_with_its_message(tmp_path):
    """Each ZeRO stage lays out the optimizer state in its own files (1 and 2 share theirs): DeepSpeed, asked to
    load a stage-1 checkpoint into stage 0 or 3, fails deep inside (a None, a bare assert). The refusal must name
    the stage to resume with, without a traceback."""
    layout = ["trainer.micro_batch_size=8", "trainer.checkpoint_every=0"]
    run_ranks(tmp_path, *layout, "parallel.zero_stage=1", "trainer.max_steps=1", ranks=1)
    for stage in (0, 3):
        cmd = torchrun_cmd(
            tmp_path, *layout, f"parallel.zero_stage={stage}", "trainer.max_steps=2", "resume=auto", ranks=1
        )
        done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=ENV)
        assert done.returncode != 0
        assert "fp8train: resume=" in done.stderr, done.stderr[-3000:]
        assert "resume with parallel.zero_stage=1 (or 2)" in done.stderr, done.stderr[-3000:]
        assert "Error executing job" not in done.stderr, done.stderr[-3000:]  # Hydra's header of a traceback
    assert max(losses(tmp_path)) == 1  # nothing trained, nothing rewritten


def test_a_multirun_stops_with_a_message_before_its_second_deepspeed_job(tmp_path):
    """A Hydra multirun (-m) runs its jobs one after another in the same processes, and DeepSpeed cannot set up a
    process group there a second time: with one rank the second job died in a ValueError traceback, with two
    it hung. The first job's results stand; the second is refused with what to do instead."""
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=1",
        f"--master_port={free_port()}",
        str(ROOT / "train.py"),
        "-m",
        f"hydra.sweep.dir={tmp_path}",
        *COMMON,
        "parallel=deepspeed",
        "trainer.micro_batch_size=8",
        "trainer.max_steps=1",
        "trainer.checkpoint_every=0",
        "precision=bf16,fp32",
    ]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=ENV)
    assert done.returncode != 0
    assert "fp8train: " in done.stderr and "one torchrun per job" in done.stderr, done.stderr[-3000:]
    assert "Error executing job" not in done.stderr, done.stderr[-3000:]  # Hydra's header of a traceback
    first = next(tmp_path.glob("0_*"))
    assert max(losses(first)) == 1


def rank_pid(launcher_pid: int, rank: int) -> int | None:
    """The pid of the training process of ``rank`` among the launcher's children (Linux /proc)."""
    children = Path(f"/proc/{launcher_pid}/task/{launcher_pid}/children")
    for pid in children.read_text().split() if children.exists() else []:
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in env:
            return int(pid)
    return None


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="finds rank processes through Linux /proc")
def test_sigterm_to_one_rank_stops_all_with_a_checkpoint_and_resume_is_exact(tmp_path):
    """A preemption signal that reaches one rank only: every rank stops after the same step, one checkpoint is
    written, and resume=auto continues to the losses of a run that was never stopped (both compared over the
    steps after the stop: trainer.stop_at ends them there, on max_steps' schedule)."""
    common = [
        "parallel.zero_stage=2",
        "trainer.micro_batch_size=4",
        "trainer.max_steps=200",
        "trainer.checkpoint_every=0",
    ]
    broken = tmp_path / "broken"
    proc = subprocess.Popen(
        torchrun_cmd(broken, *common), cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        deadline = time.monotonic() + 300
        while not any(r.get("step", 0) >= 5 for r in read_metrics(broken)) and proc.poll() is None:
            assert time.monotonic() < deadline, "no training progress"
            time.sleep(0.01)
        pid = rank_pid(proc.pid, 1)
        assert pid is not None and proc.poll() is None, "the run ended before it could be signalled"
        os.kill(pid, signal.SIGTERM)
        out, _ = proc.communicate(timeout=300)
    finally:
        proc.kill()
    assert proc.returncode == 0, out[-3000:]
    assert "received a signal on another rank: stopped after step" in out
    stopped = max(losses(broken))
    assert 5 <= stopped < 200
    assert [p.name for p in (broken / "checkpoints").iterdir()] == [f"step_{stopped:07d}"]
    run_ranks(broken, *common, "resume=auto", f"trainer.stop_at={stopped + 3}")
    unbroken = tmp_path / "unbroken"
    run_ranks(unbroken, *common, f"trainer.stop_at={stopped + 3}")
    assert losses(broken) == losses(unbroken)
    assert max(losses(broken)) == stopped + 3


# train.py, with RUN_DIR/checkpoints turned into a file once the run has started (a start refuses one).
CHECKPOINTS_BECOME_A_FILE = """
import shutil
from fp8train import trainer
init = trainer.Trainer.__init__
def init_then_break(self, *args):
    init(self, *args)
    if self.engine.rank == 0:
        shutil.rmtree(self.ckpt_root, ignore_errors=True)
        self.ckpt_root.write_text("not a folder")
trainer.Trainer.__init__ = init_then_break
from fp8train.cli.train import main
main()
"""


def test_an_error_on_rank_0_ends_the_run_at_once_with_its_message(tmp_path):
    """A checkpoint rank 0 alone cannot write (here: checkpoints/ became a file) fails rank 0 while rank 1 waits in
    the checkpoint's first collective. Rank 0 must not then wait in a barrier of its own at shutdown (until
    parallel.timeout_min): it exits with its message and status 2, and the launcher stops the other rank."""
    run_dir = tmp_path / "ds"
    script = tmp_path / "break_checkpoints.py"
    script.write_text(CHECKPOINTS_BECOME_A_FILE)
    cmd = torchrun_cmd(run_dir, "trainer.micro_batch_size=4", "parallel.timeout_min=1", "trainer.checkpoint_every=2")
    cmd[cmd.index(str(ROOT / "train.py"))] = str(script)
    t0 = time.monotonic()
    done = subprocess.run(
        cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env={**ENV, "PYTHONPATH": str(ROOT)}
    )
    elapsed = time.monotonic() - t0
    out = done.stdout + done.stderr
    assert done.returncode != 0
    assert "fp8train: writing checkpoint step 2 to" in out, out[-3000:]
    assert "exitcode  : 2" in out, out[-3000:]  # rank 0's own status: a message, not a traceback
    assert elapsed < 50, f"took {elapsed:.0f} s: a rank waited for parallel.timeout_min=1"


def test_one_process_without_a_launcher_finds_a_free_port(tmp_path):
    """parallel=deepspeed started as plain `python train.py` forms a one-rank group on this machine; a second such
    run (or anything else on port 29500) must not make it fail with EADDRINUSE."""
    try:  # the rendezvous store of another one-rank run, on torch.distributed's default port
        busy = torch.distributed.TCPStore("127.0.0.1", 29500, 1, True)
    except RuntimeError:
        busy = None  # already taken by something else: the same situation
    env = {k: v for k, v in ENV.items() if k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE")}
    cmd = [sys.executable, str(ROOT / "train.py"), f"hydra.run.dir={tmp_path / 'one'}", *COMMON]
    done = subprocess.run(
        [*cmd, "parallel=deepspeed", "trainer.max_steps=1", "trainer.checkpoint_every=0"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    del busy
    assert done.returncode == 0, done.stderr[-3000:]
    assert "1 ranks (gloo)" in done.stderr + done.stdout


def node_local_cmd(nodes: Path, *overrides: str) -> list[str]:
    """torchrun of 2 ranks, each started in its own folder nodes/n<RANK> with hydra.run.dir=/proc/self/cwd/run: the
    same path on every rank, naming another folder on each, as runs/X does on nodes without a shared file system."""
    for rank in (0, 1):
        (nodes / f"n{rank}").mkdir(parents=True, exist_ok=True)
    rank_cmd = f'cd "$0/n$RANK" && exec {shlex.quote(sys.executable)} {shlex.quote(str(ROOT / "train.py"))} "$@"'
    cmd = torchrun_cmd("/proc/self/cwd/run", *overrides)
    launcher, train_py, args = cmd[:5], cmd[5], cmd[6:]
    assert train_py == str(ROOT / "train.py")
    return [
        *launcher,
        "--no-python",
        "sh",
        "-c",
        rank_cmd,
        str(nodes),
        *args,
        f"data.sources.0.path={ROOT / 'data' / 'tinyshakespeare.txt'}",
        f"data.cache_dir={nodes / 'cache'}",
    ]


def test_a_run_dir_that_the_ranks_do_not_share_is_refused_before_training(tmp_path):
    """A multi-node run whose run directory is a local folder on each node (the same path, other files) wrote
    checkpoints that looked complete on rank 0's node but lacked the other ranks' optimizer partitions and RNG
    states (those went into a temporary folder on their own node), and a resume failed with a wrong reason on each
    rank. The run is refused before anything trains, with the directory and the rank that does not see it."""
    overrides = ("trainer.micro_batch_size=4", "trainer.max_steps=2", "trainer.checkpoint_every=1")
    done = subprocess.run(
        node_local_cmd(tmp_path, *overrides), cwd=ROOT, capture_output=True, text=True, timeout=300, env=ENV
    )
    out = done.stdout + done.stderr
    assert "exitcode  : 2" in out, out[-3000:]  # a message, not a traceback
    refused = "fp8train: The run directory /proc/self/cwd/run is not one directory shared by every rank: rank 1 (host "
    assert refused in out, out[-3000:]
    assert not (tmp_path / "n0" / "run" / "checkpoints").exists()
    assert not (tmp_path / "n1" / "run" / "checkpoints").exists()
    # resume=auto where only rank 0's node has a checkpoint: the same refusal, before anything reads it
    (tmp_path / "n0" / "run" / "checkpoints" / "step_0000002").mkdir(parents=True)
    cmd = node_local_cmd(tmp_path, *overrides, "resume=auto")
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=ENV)
    assert refused in done.stdout + done.stderr, (done.stdout + done.stderr)[-3000:]
    assert [p.name for p in (tmp_path / "n0" / "run" / "checkpoints").iterdir()] == ["step_0000002"]


# Two ranks join through fp8train with a 1.2-second parallel.timeout_min, then reduce in the data-parallel group
# DeepSpeed makes for ZeRO (a group of its own, not the world group); rank 1 stops answering.
HUNG_PEER = """
import datetime, sys, time, torch, torch.distributed as dist
from fp8train.backends import select
from fp8train.config import BackendConfig, BackendName, ParallelConfig, ParallelName
from fp8train.parallel import deepspeed as ds, launch_env
from deepspeed.utils import groups
cfg = ParallelConfig(name=ParallelName.deepspeed, timeout_min=0.02)
ds.init_distributed(cfg, select(BackendConfig(name=BackendName.cpu)), launch_env(cfg))
group = groups._get_data_parallel_group()
t = torch.ones(2)
dist.all_reduce(t, group=group)
if dist.get_rank() == 1:
    time.sleep(6)  # past the test's bound: a rank 0 that waits for this one fails it
    sys.exit(0)
t0 = time.monotonic()
try:
    dist.all_reduce(t, group=group)
except RuntimeError:
    print(f"rank 0 gave up after {time.monotonic() - t0:.0f} s")
"""


def test_a_hung_rank_fails_the_others_after_parallel_timeout_min_in_deepspeeds_groups_too(tmp_path):
    """parallel.timeout_min bounds every collective. torch gives a group made with new_group (DeepSpeed's
    data-parallel group, in which ZeRO reduces the gradients) its own default of 30 minutes rather than the world
    group's timeout: a rank that hung mid-step kept the others waiting half an hour whatever the setting said."""
    script = tmp_path / "hung_peer.py"
    script.write_text(HUNG_PEER)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}"]
    env = {**ENV, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([*cmd, str(script)], cwd=ROOT, capture_output=True, text=True, timeout=120, env=env)
    assert "rank 0 gave up after" in done.stdout, done.stdout[-2000:] + done.stderr[-3000:]
    waited = int(done.stdout.split("rank 0 gave up after ")[1].split()[0])
    assert waited < 4, f"rank 0 waited {waited} s for a peer that hung, not parallel.timeout_min (1.2 s)"


def test_a_rank_that_dies_where_no_launcher_sees_it_ends_the_others_with_a_message(tmp_path):
    """Ranks on other machines than the one that died have no launcher that saw it: their next collective fails
    (connection reset, or parallel.timeout_min for a machine that went silent). That must end the run with what
    happened and how to continue, not a communication library's traceback."""
    port = str(free_port())
    run_dir = tmp_path / "ds"
    cmd = [sys.executable, str(ROOT / "train.py"), f"hydra.run.dir={run_dir}", *COMMON, "parallel=deepspeed"]
    cmd += ["trainer.micro_batch_size=4", "trainer.max_steps=300", "trainer.checkpoint_every=2"]
    ranks = []
    for rank in (0, 1):
        where = {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1"}
        env = {**ENV, **where, "MASTER_PORT": port}
        ranks.append(
            subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        )
    try:
        deadline = time.monotonic() + 120
        while not any(r.get("step", 0) >= 3 for r in read_metrics(run_dir)) and ranks[0].poll() is None:
            assert time.monotonic() < deadline, "no training progress"
            time.sleep(0.01)
        ranks[1].kill()
        _, err = ranks[0].communicate(timeout=120)
    finally:
        for p in ranks:
            p.kill()
            p.wait()
    assert ranks[0].returncode == 2, err[-3000:]
    assert "fp8train: rank 0 lost contact with another rank" in err, err[-3000:]
    assert "resume=auto" in err and "Error executing job" not in err, err[-3000:]


# train.py, then each rank's delayed-scaling state saved to SCALERS_DIR/rank_<r>.pt (a checkpoint holds rank 0's).
WITH_SCALERS = """
import os, sys, torch
from fp8train import trainer
fit = trainer.Trainer.fit
def fit_and_save(self):
    out = fit(self)
    keep = ("amax_history", "scale", "scale_ready")
    state = {k: v.clone() for k, v in self.model.named_buffers() if k.rsplit(".", 1)[-1] in keep}
    torch.save(state, os.path.join(os.environ["SCALERS_DIR"], f"rank_{self.engine.rank}.pt"))
    return out
trainer.Trainer.fit = fit_and_save
from fp8train.cli.train import main
main()
"""


@pytest.mark.parametrize(
    "zero_stage, precision", [(0, "fp8_smooth"), (3, "fp8_smooth_channel")], ids=["zero0-token", "zero3-channel"]
)
def test_fp8_adam_over_two_ranks_keeps_one_scaling_state_and_the_single_process_losses(tmp_path, zero_stage, precision):
    """FP8 Smooth-SwiGLU with optim=adamw_fp8, gradient accumulation and clipping that acts (grad norms ~0.75-0.9):
    the losses of one process with the same global batch (measured, token: relative 2.4e-5, grad norms 1.3e-3, the
    first step's just-in-time FP8 scales coming from each rank's own rows; channel, whose s is each micro-batch's
    own: 3.6e-5 and 1.4e-3), and every rank ends with the same amax histories and scales, bit for bit, because the
    amaxes are max-reduced before each scaler step. Under ZeRO-3 the per-channel variant's W_down diag(s) is formed
    inside the partitioned down_proj's forward, where W_down is gathered whole."""
    common = [f"precision={precision}", "optim=adamw_fp8", "optim.fp8_min_numel=0", "optim.grad_clip=0.5"]
    common += ["trainer.checkpoint_every=0"]
    script = tmp_path / "with_scalers.py"
    script.write_text(WITH_SCALERS)
    env = {**ENV, "PYTHONPATH": str(ROOT)}
    one = tmp_path / "one"
    (one / "scalers").mkdir(parents=True)
    cmd = [sys.executable, str(script), f"hydra.run.dir={one}", *COMMON, *common, "trainer.micro_batch_size=8"]
    done = subprocess.run(
        cmd, cwd=ROOT, capture_output=True, text=True, env={**env, "SCALERS_DIR": str(one / "scalers")}
    )
    assert done.returncode == 0, done.stderr[-3000:]
    two = tmp_path / "two"
    (two / "scalers").mkdir(parents=True)
    cmd = torchrun_cmd(two, *common, f"parallel.zero_stage={zero_stage}", "trainer.micro_batch_size=2")
    cmd[cmd.index(str(ROOT / "train.py"))] = str(script)
    cmd += ["trainer.grad_accum_steps=2"]
    if zero_stage == 3:  # partition every weight: by default ZeRO-3 keeps parameters this small whole on each rank
        (tmp_path / "ds.json").write_text('{"zero_optimization": {"stage3_param_persistence_threshold": 0}}')
        cmd += [f"parallel.ds_config={tmp_path / 'ds.json'}"]
    done = subprocess.run(
        cmd, cwd=ROOT, capture_output=True, text=True, env={**env, "SCALERS_DIR": str(two / "scalers")}
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    assert losses(two) == pytest.approx(losses(one), rel=1e-4)
    assert losses(two, "grad_norm") == pytest.approx(losses(one, "grad_norm"), rel=3e-3)
    assert min(losses(one, "grad_norm").values()) > 0.5  # clipped at every step
    rank0, rank1 = (torch.load(two / "scalers" / f"rank_{r}.pt") for r in (0, 1))
    alone = torch.load(one / "scalers" / "rank_0.pt")
    assert rank0.keys() == rank1.keys() == alone.keys() and len(rank0) > 50
    for name, value in rank0.items():
        assert torch.equal(value, rank1[name]), name
        if not name.endswith("amax_history"):
            continue
        # The global batch's amaxes, up to FP8 rounding of the rows they came from. A rank's loss is the mean over
        # its own rows, and DeepSpeed averages the weight gradients over ranks after the backward: the activation
        # gradients a rank quantizes are 2 (ranks) times one process's.
        expected = alone[name] * (2 if ".grad_scaler." in name else 1)
        assert torch.allclose(value, expected, rtol=0.1 if ".grad_scaler." not in name else 0.3), name


# train.py with a non-finite loss on rank 1 alone at step 3 (a NaN that one rank's rows produced).
NAN_ON_RANK_1 = """
import torch
from fp8train import trainer
loss = trainer.Trainer.loss
def nan_on_rank_1(self, inputs, targets):
    out = loss(self, inputs, targets)
    return out * float("nan") if self.engine.rank == 1 and self.step == 2 else out
trainer.Trainer.loss = nan_on_rank_1
from fp8train.cli.train import main
main()
"""


def test_a_step_skipped_on_every_rank_is_reported_once_with_the_loss_of_the_global_batch(tmp_path):
    """A NaN from one rank's rows makes every rank skip the step together (the decision is reduced); the warning is
    the run's, as the logged metrics are: once, naming the global batch's loss, not one line per rank each with its
    own rows' loss (finite on the rank whose rows were fine)."""
    script = tmp_path / "nan.py"
    script.write_text(NAN_ON_RANK_1)
    run_dir = tmp_path / "ds"
    cmd = torchrun_cmd(run_dir, "parallel.zero_stage=0", "trainer.micro_batch_size=4", "trainer.max_steps=4")
    cmd[cmd.index(str(ROOT / "train.py"))] = str(script)
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env={**ENV, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    out = done.stdout + done.stderr
    warnings = [line for line in out.splitlines() if "optimizer step skipped" in line]
    assert len(warnings) == 1, warnings
    assert "step 3: loss nan" in warnings[0], warnings
    assert [r["bad_steps"] for r in read_metrics(run_dir) if "loss" in r] == [0, 0, 1, 1]
