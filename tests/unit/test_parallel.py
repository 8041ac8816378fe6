"""Engine plumbing that needs no second process: the generated ds_config, the launch environment, the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from fp8train.cli.train import without_local_rank
from fp8train.config import ParallelConfig, ParallelName, compose
from fp8train.errors import ConfigError
from fp8train.parallel import launch_env
from fp8train.parallel.deepspeed import build_ds_config
from tests.helpers import on_two_ranks


def ds_config(tmp_path=None, user: dict | None = None, **batch) -> dict:
    path = None
    if user is not None:
        path = tmp_path / "ds.json"
        path.write_text(json.dumps(user))
    cfg = ParallelConfig(name=ParallelName.deepspeed, zero_stage=2, ds_config=None if path is None else str(path))
    layout = {"micro_batch_size": 4, "grad_accum_steps": 3, "grad_clip": 1.0, "world_size": 8, **batch}
    return build_ds_config(cfg, **layout)


def test_ds_config_follows_the_trainer_settings():
    ds = ds_config()
    assert ds["train_batch_size"] == 4 * 3 * 8
    assert ds["train_micro_batch_size_per_gpu"] == 4 and ds["gradient_accumulation_steps"] == 3
    assert ds["zero_optimization"]["stage"] == 2 and ds["gradient_clipping"] == 1.0
    assert ds["bf16"]["enabled"] is False  # fp32 weights: bf16 mode would cast the FP8 scaling buffers too
    assert ds["zero_allow_untested_optimizer"] is True


def test_user_ds_config_is_merged_key_by_key(tmp_path):
    ds = ds_config(tmp_path, {"zero_optimization": {"reduce_bucket_size": 12345}, "comms_logger": {"enabled": True}})
    assert ds["zero_optimization"] == {
        "stage": 2,
        "contiguous_gradients": False,
        "overlap_comm": False,
        "reduce_bucket_size": 12345,
    }
    assert ds["comms_logger"] == {"enabled": True}


def test_user_ds_config_may_not_contradict_the_run(tmp_path):
    bad = {"train_micro_batch_size_per_gpu": 2, "bf16": {"enabled": True}, "zero_optimization": {"stage": 3}}
    with pytest.raises(ConfigError) as e:
        ds_config(tmp_path, bad)
    text = str(e.value)
    assert "sets train_micro_batch_size_per_gpu=2, but this run needs 4" in text
    assert "bf16/fp16.enabled" in text
    assert "parallel.zero_stage=2" in text


def test_user_ds_config_may_not_set_clipping_or_an_optimizer_of_its_own(tmp_path):
    # ZeRO 1-3 would clip to the file's value, ZeRO 0 (fp8train's own step) to optim.grad_clip; an "optimizer" or
    # "scheduler" would replace fp8train's AdamW / AdamWFp8 and lr schedule. Each is refused, naming the override.
    same = ds_config(tmp_path, {"gradient_clipping": 1.0})
    assert same["gradient_clipping"] == 1.0
    with pytest.raises(ConfigError) as e:
        ds_config(
            tmp_path, {"gradient_clipping": 0.5, "optimizer": {"type": "Adam"}, "scheduler": {"type": "WarmupLR"}}
        )
    text = str(e.value)
    assert "sets gradient_clipping=0.5, but this run needs 1.0" in text and "optim.grad_clip" in text
    assert "sets optimizer" in text and "optim=adamw" in text
    assert "sets scheduler" in text and "optim.lr" in text


@pytest.mark.parametrize(
    "user, where",
    [
        ([{"zero_optimization": {}}], "the file"),
        ({"zero_optimization": 2}, "zero_optimization"),
        ({"bf16": True}, "bf16"),
    ],
)
def test_a_ds_config_of_the_wrong_shape_is_a_config_error(tmp_path, user, where):
    # DeepSpeed's sections are JSON objects: a number or a list where one belongs is named, not an AttributeError.
    with pytest.raises(ConfigError) as e:
        ds_config(tmp_path, user)
    assert f"parallel.ds_config={tmp_path / 'ds.json'}: {where} must be a JSON object" in str(e.value)


def test_launch_env_reads_torchrun_and_mpirun_variables(monkeypatch):
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "OMPI_COMM_WORLD_RANK"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("OMPI_COMM_WORLD_RANK", "5")
    monkeypatch.setenv("OMPI_COMM_WORLD_LOCAL_RANK", "1")
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "16")
    ds = ParallelConfig(name=ParallelName.deepspeed)
    env = launch_env(ds)
    assert (env.rank, env.local_rank, env.world_size) == (5, 1, 16)
    monkeypatch.setenv("RANK", "7")  # a launcher's own variables win
    assert launch_env(ds).rank == 7
    assert launch_env(ParallelConfig()).world_size == 1  # parallel=single ignores the environment


def test_deepspeed_launcher_local_rank_flag_is_dropped():
    assert without_local_rank(["--local_rank=3", "a=1", "--local_rank", "2", "b=2"]) == ["a=1", "b=2"]


def test_bad_parallel_settings_name_the_fix(tmp_path):
    with pytest.raises(ConfigError) as e:
        compose(
            [
                "parallel=deepspeed",
                "parallel.zero_stage=4",
                f"parallel.ds_config={tmp_path / 'missing.json'}",
                "parallel.timeout_min=0",
            ]
        )
    text = str(e.value)
    assert "parallel.zero_stage=4: must be 0, 1, 2 or 3" in text
    assert "parallel.ds_config=" in text and "no such file" in text
    assert "parallel.timeout_min=0: must be > 0" in text


def test_a_rank_whose_clock_named_another_run_dir_logs_into_rank_0s(tmp_path, monkeypatch):
    """Hydra names the run dir after each rank's start time and opens RUN_DIR/train.log there at once; a rank that
    started a second later than rank 0 must move its log into rank 0's run dir and leave no directory behind."""
    import logging

    from fp8train import parallel
    from fp8train.trainer import agree_on_run_dir

    mine, rank0 = tmp_path / "run_14-00-01", tmp_path / "run_14-00-00"
    mine.mkdir()
    handler = logging.FileHandler(mine / "train.log")  # as Hydra's job logging sets it up
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        logging.getLogger("deepspeed").warning("before the run dir was agreed")
        monkeypatch.setattr(parallel, "broadcast_object", lambda obj: str(rank0))
        assert agree_on_run_dir(mine) == rank0
        logging.getLogger("fp8train").warning("a warning of this rank")
        handler.flush()
        assert not mine.exists()
        assert "a warning of this rank" in (rank0 / "train.log").read_text()
    finally:
        root.removeHandler(handler)
        handler.close()


@pytest.mark.parametrize("torch_has_get_total_norm", [True, False])
def test_unclipped_grad_norm_is_the_global_norm_on_every_supported_torch(monkeypatch, torch_has_get_total_norm):
    from fp8train.parallel import clip_grad_norm

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Linear(16, 4))
    model(torch.randn(5, 8)).square().sum().backward()
    want = torch.cat([p.grad.double().flatten() for p in model.parameters()]).norm().item()
    if not torch_has_get_total_norm:  # torch 2.5 has no torch.nn.utils.get_total_norm
        monkeypatch.delattr(torch.nn.utils, "get_total_norm")
    before = [p.grad.clone() for p in model.parameters()]
    assert clip_grad_norm(model, 0.0).item() == pytest.approx(want, rel=1e-6)
    assert all(torch.equal(a, p.grad) for a, p in zip(before, model.parameters()))  # max_norm 0: no clipping


def test_a_second_deepspeed_job_in_one_process_is_refused_with_the_fix_for_each_caller(monkeypatch):
    """A process group cannot be set up twice (with several ranks it hangs): both ways of getting there are named."""
    from fp8train.backends import select
    from fp8train.config import BackendConfig, BackendName
    from fp8train.parallel import deepspeed as ds_module

    monkeypatch.setattr(ds_module, "_joined_before", True)
    cfg = ParallelConfig(name=ParallelName.deepspeed)
    with pytest.raises(ConfigError) as refused:
        ds_module.init_distributed(cfg, select(BackendConfig(name=BackendName.cpu)), launch_env(cfg))
    message = str(refused.value)
    assert "one torchrun per job" in message and "one process per Trainer" in message


def _check_checkpoint_on_rank(rank: int, init_file: str, tmp: str) -> None:
    """One of 2 gloo ranks: check_same_checkpoint over this rank's own copy tmp/n<rank>/ckpt (the same path on
    two nodes); write the message it stopped with, or "ok", to tmp/out<rank>."""
    import torch.distributed as dist

    from fp8train.trainer import check_same_checkpoint

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        check_same_checkpoint(Path(tmp) / f"n{rank}" / "ckpt")
        result = "ok"
    except Exception as e:
        result = f"{type(e).__name__}: {e}"
    finally:
        dist.destroy_process_group()
    (Path(tmp) / f"out{rank}").write_text(result)


@pytest.mark.parametrize("rank1_has", ["the same", "another", "none"])
def test_a_resume_checkpoint_that_differs_between_nodes_stops_every_rank(tmp_path, rank1_has):
    """resume=PATH on node-local storage: a node without the checkpoint failed with a wrong reason (written by
    parallel=single) while the others waited, and one with another checkpoint there continued from other
    weights. Every rank stops with the path and the ranks that lack it."""
    from fp8train.checkpoint import MANIFEST

    for rank, manifest in (
        (0, '{"step": 2}'),
        (1, {"the same": '{"step": 2}', "another": '{"step": 1}'}.get(rank1_has)),
    ):
        (tmp_path / f"n{rank}" / "ckpt").mkdir(parents=True)
        if manifest is not None:
            (tmp_path / f"n{rank}" / "ckpt" / MANIFEST).write_text(manifest)
    on_two_ranks(_check_checkpoint_on_rank, tmp_path, str(tmp_path))
    for rank in (0, 1):
        result = (tmp_path / f"out{rank}").read_text()
        if rank1_has == "the same":
            assert result == "ok"
        else:  # each rank names the path as it knows it, here its own folder
            assert result.startswith(f"CheckpointError: resume: the checkpoint {tmp_path / f'n{rank}' / 'ckpt'} that ")
            assert "that rank 0 (host " in result and "another checkpoint on rank 1 (host " in result


def _fail_on_rank0(rank: int, init_file: str, out: str) -> None:
    """One of 2 gloo ranks: on_rank0 of a function that fails with a bug (not an Fp8trainError) on rank 0."""
    import torch.distributed as dist

    from fp8train.parallel import on_rank0

    def broken():
        raise OSError("a bug's error")

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        on_rank0(broken)
        result = {"error": None}
    except Exception as e:
        result = {"error": f"{type(e).__name__}: {e}"}
    finally:
        dist.destroy_process_group()
    Path(f"{out}{rank}.json").write_text(json.dumps(result))


def test_a_bug_on_rank_0_in_what_it_computes_for_all_stops_every_rank(tmp_path):
    """Only an Fp8trainError reached the other ranks: any other exception on rank 0 left them waiting in the
    broadcast until parallel.timeout_min. Rank 0 keeps its traceback; the others stop, pointing at it."""
    on_two_ranks(_fail_on_rank0, tmp_path, str(tmp_path / "out"))
    ranks = [json.loads((tmp_path / f"out{rank}.json").read_text())["error"] for rank in (0, 1)]
    assert ranks[0] == "OSError: a bug's error"
    assert ranks[1].startswith("Fp8trainError: rank 0 failed") and "OSError" in ranks[1], ranks[1]


def test_an_error_with_a_process_group_up_exits_with_its_status_message_and_logs(tmp_path):
    """With a group up, the interpreter's teardown could abort (SIGABRT, gloo's threads) instead of exiting 2: the
    error exit skips it, and still leaves the message on stderr and the log lines in their file."""
    import subprocess
    import sys

    script = f"""
import logging, torch.distributed as dist
from fp8train.cli.train import fail
from fp8train.errors import Fp8trainError
dist.init_process_group("gloo", init_method="file://{tmp_path / "init"}", rank=0, world_size=1)
logging.basicConfig(filename="{tmp_path / "train.log"}", level=logging.INFO)
logging.getLogger("fp8train").info("a line before the error")
print("on stdout", end="")
fail(Fp8trainError("what to change"))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr.strip().endswith("fp8train: what to change") and done.stdout == "on stdout"
    assert "a line before the error" in (tmp_path / "train.log").read_text()
