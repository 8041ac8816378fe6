"""Checkpoints: exact round trip, atomic completion, retention, timelines, damage detection and resume mistakes."""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors import SafetensorError

from fp8train import checkpoint, parallel
from fp8train.config import ModelConfig
from fp8train.errors import CheckpointError
from fp8train.model import build_model
from fp8train.optim.adamw_fp8 import AdamWFp8
from fp8train.parallel import SingleEngine
from fp8train.trainer import find_resume_checkpoint

CFG = ModelConfig(vocab_size=96, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64, tie_embeddings=True)


def trained(seed: int):
    torch.manual_seed(seed)
    model = build_model(CFG)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(2):
        model(torch.randint(0, 96, (2, 8))).logsumexp(-1).mean().backward()
        opt.step()
        opt.zero_grad()
    return model, opt


def save(root, step, model, opt, keep_last=3):
    engine = SingleEngine(model, opt)
    return checkpoint.save(root, step, engine, {"step": step, "rng": torch.get_rng_state()}, "a: 1\n", keep_last)


def load(path, model, opt, verified=False):
    return checkpoint.load(path, SingleEngine(model, opt), torch.device("cpu"), verified)


def test_round_trip_is_exact(tmp_path):
    model, opt = trained(0)
    path = save(tmp_path, 7, model, opt)
    model2, opt2 = trained(1)  # different weights and moments, to be overwritten
    state = load(path, model2, opt2)
    assert state["step"] == 7
    for (k, a), (_, b) in zip(model.state_dict().items(), model2.state_dict().items()):
        assert torch.equal(a, b), k
    assert model2.lm_head.weight is model2.embed_tokens.weight  # tying survives the load
    s1, s2 = opt.state_dict()["state"], opt2.state_dict()["state"]
    assert all(torch.equal(s1[i][k], s2[i][k]) for i in s1 for k in s1[i])


def test_manifest_lists_every_file_with_checksum(tmp_path):
    model, opt = trained(0)
    path = save(tmp_path, 1, model, opt)
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["step"] == 1
    assert set(manifest["files"]) == {"model.safetensors", "optimizer.pt", "trainer.pt", "config.yaml"}
    assert all(len(m["sha256"]) == 64 and m["bytes"] > 0 for m in manifest["files"].values())
    assert not list(tmp_path.glob(".tmp-*"))


def test_checkpoint_weights_are_as_readable_as_the_other_files(tmp_path):
    """safetensors creates its files private (0600): a run directory shared with a team, or read by an evaluation
    job running as another user, needs the weights readable as the umask allows, like config.yaml beside them."""
    import stat

    model, opt = trained(0)
    path = save(tmp_path, 1, model, opt)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in path.iterdir()}
    mask = os.umask(0)
    os.umask(mask)
    assert modes["model.safetensors"] == modes["config.yaml"] == modes["optimizer.pt"] == 0o666 & ~mask, modes


def test_incomplete_folders_are_never_taken(tmp_path):
    model, opt = trained(0)
    save(tmp_path, 5, model, opt)
    (tmp_path / ".tmp-step_0000010-123").mkdir()  # a write that was killed before its rename
    (tmp_path / "step_0000020").mkdir()  # a folder without a manifest
    assert checkpoint.latest(tmp_path).name == "step_0000005"


def test_keep_last_deletes_oldest_and_orders_numerically(tmp_path):
    model, opt = trained(0)
    for step in (9, 10, 100, 1000):
        save(tmp_path, step, model, opt, keep_last=2)
    assert [p.name for p in checkpoint.complete_checkpoints(tmp_path)] == ["step_0000100", "step_0001000"]


def test_damaged_file_is_detected(tmp_path):
    model, opt = trained(0)
    path = save(tmp_path, 3, model, opt)
    data = bytearray((path / "optimizer.pt").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (path / "optimizer.pt").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="optimizer.pt does not match its checksum"):
        load(path, *trained(1))


def test_weights_of_another_shape_give_a_clear_error(tmp_path):
    model, opt = trained(0)
    path = save(tmp_path, 3, model, opt)
    other = build_model(ModelConfig(vocab_size=96, d_model=64, n_layers=2, n_heads=4, ffn_dim=64))
    with pytest.raises(CheckpointError, match="do not fit this model"):
        load(path, other, torch.optim.AdamW(other.parameters()))


@pytest.mark.parametrize("writer", ["save_model", "torch.save"])
def test_disk_full_keeps_the_previous_checkpoint_intact(tmp_path, monkeypatch, writer):
    model, opt = trained(0)
    prev = save(tmp_path, 3, model, opt)
    before = {p.name: p.read_bytes() for p in prev.iterdir()}

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    if writer == "save_model":
        monkeypatch.setattr(parallel, "save_model", no_space)
    else:
        monkeypatch.setattr(checkpoint.torch, "save", no_space)
    with pytest.raises(CheckpointError, match=r"(?i)no space left.*previous checkpoint step 3 is intact"):
        save(tmp_path, 4, model, opt)
    assert [p.name for p in tmp_path.iterdir()] == ["step_0000003"]  # no temp folder, no step 4
    assert {p.name: p.read_bytes() for p in prev.iterdir()} == before


def test_stale_temp_folders_of_dead_processes_are_removed_by_the_next_write(tmp_path):
    model, opt = trained(0)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f".tmp-step_0000004-{int(dead.stdout)}"
    live = tmp_path / f".tmp-step_0000004-{os.getppid()}"  # another live process writing here: not ours to delete
    for d in (stale, live):
        d.mkdir()
        (d / "model.safetensors").write_bytes(b"half")
    save(tmp_path, 5, model, opt)
    assert not stale.exists() and live.exists()
    assert checkpoint.latest(tmp_path).name == "step_0000005"


def test_latest_intact_skips_damaged_checkpoints_with_a_warning(tmp_path, caplog):
    model, opt = trained(0)
    for step in (1, 2, 3):
        save(tmp_path, step, model, opt)
    with open(tmp_path / "step_0000003" / "model.safetensors", "r+b") as f:
        f.truncate(10)
    data = bytearray((tmp_path / "step_0000002" / "trainer.pt").read_bytes())
    data[-5] ^= 0x01  # same size, one bit flipped
    (tmp_path / "step_0000002" / "trainer.pt").write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING):
        assert checkpoint.latest_intact(tmp_path).name == "step_0000001"
    assert "step_0000003 is damaged: model.safetensors has 10 bytes" in caplog.text
    assert "step_0000002 is damaged: trainer.pt does not match its checksum" in caplog.text
    (tmp_path / "step_0000001" / "optimizer.pt").unlink()
    with pytest.raises(CheckpointError, match="no intact checkpoint .*all 3 are damaged"):
        checkpoint.latest_intact(tmp_path)
    assert checkpoint.latest_intact(tmp_path / "none") is None


@pytest.mark.parametrize(
    "writer, error",
    [
        ("torch.save", RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 662")),
        ("save_model", SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")),
    ],
)
def test_full_disk_errors_of_torch_and_safetensors_stop_with_a_message(tmp_path, monkeypatch, writer, error):
    model, opt = trained(0)
    save(tmp_path, 3, model, opt)

    def fail(*args, **kwargs):
        raise error

    monkeypatch.setattr(*((checkpoint.torch, "save") if writer == "torch.save" else (parallel, "save_model")), fail)
    with pytest.raises(CheckpointError, match=r"step 4 .*failed: .*MiB free there; the previous checkpoint step 3"):
        save(tmp_path, 4, model, opt)
    assert [p.name for p in tmp_path.iterdir()] == ["step_0000003"]


def test_other_errors_while_writing_are_not_taken_for_a_full_disk(tmp_path, monkeypatch):
    model, opt = trained(0)

    def bug(*args, **kwargs):
        raise RuntimeError("expected a tensor")

    monkeypatch.setattr(checkpoint.torch, "save", bug)
    with pytest.raises(RuntimeError, match="expected a tensor"):
        save(tmp_path, 4, model, opt)
    assert list(tmp_path.iterdir()) == []  # the temporary folder is gone all the same


def test_a_checkpoint_just_written_is_kept_whatever_newer_steps_lie_beside_it(tmp_path):
    model, opt = trained(0)
    for step in (2, 4, 6):
        save(tmp_path, step, model, opt, keep_last=5)
    save(tmp_path, 3, model, opt, keep_last=2)
    assert [p.name for p in checkpoint.complete_checkpoints(tmp_path)] == [
        "step_0000002",
        "step_0000003",
        "step_0000004",
        "step_0000006",
    ]


def test_checkpoints_after_the_resumed_step_are_moved_aside_not_deleted(tmp_path, caplog):
    model, opt = trained(0)
    for step in (2, 4, 6):
        save(tmp_path, step, model, opt, keep_last=5)
    (tmp_path / "step_0000006" / "optimizer.pt").write_bytes(b"damaged")  # set aside as it is
    with caplog.at_level(logging.INFO):
        aside = checkpoint.set_aside_after(tmp_path, 2)
    assert [p.name for p in checkpoint.complete_checkpoints(tmp_path)] == ["step_0000002"]
    assert aside.parent == tmp_path / "superseded"
    assert sorted(p.name for p in aside.iterdir()) == ["step_0000004", "step_0000006"]
    assert checkpoint.damage(aside / "step_0000004") is None
    assert "later steps (4, 6)" in caplog.text and str(aside) in caplog.text
    assert checkpoint.set_aside_after(tmp_path, 2) is None  # nothing later: nothing moves
    save(tmp_path, 3, model, opt, keep_last=1)
    assert [p.name for p in checkpoint.complete_checkpoints(tmp_path)] == ["step_0000003"]
    assert (aside / "step_0000004").is_dir()  # keep_last never reaches into superseded/


def test_folders_named_other_than_step_digits_are_ignored(tmp_path):
    model, opt = trained(0)
    path = save(tmp_path, 3, model, opt)
    shutil.copytree(path, tmp_path / "step_0000003.bak")
    shutil.copytree(path, tmp_path / "step_old")
    assert [p.name for p in checkpoint.complete_checkpoints(tmp_path)] == ["step_0000003"]
    assert checkpoint.latest_intact(tmp_path) == path
    save(tmp_path, 4, model, opt, keep_last=1)
    assert (tmp_path / "step_0000003.bak").is_dir() and (tmp_path / "step_old").is_dir()


def test_keep_last_removes_a_linked_checkpoint_as_a_link_and_leaves_what_it_points_to(tmp_path):
    """A checkpoint linked in from elsewhere (another disk, another run) leaves the rotation as the link alone: the
    folder it points to is not this run's to delete, and the link must not stay behind under a temporary name."""
    model, opt = trained(0)
    elsewhere = save(tmp_path / "elsewhere", 1, model, opt)
    root = tmp_path / "checkpoints"
    save(root, 2, model, opt)
    (root / "step_0000001").symlink_to(elsewhere)
    save(root, 3, model, opt, keep_last=2)
    assert sorted(p.name for p in root.iterdir()) == ["step_0000002", "step_0000003"]
    assert checkpoint.damage(elsewhere) is None


@pytest.mark.parametrize("manifest", ["{}", "[1]", '{"files": {"trainer.pt": 12}}', '{"files": []}'])
def test_a_manifest_of_another_shape_is_reported_as_damage(tmp_path, manifest):
    model, opt = trained(0)
    path = save(tmp_path, 3, model, opt)
    (path / "manifest.json").write_text(manifest)
    assert "manifest.json is not an fp8train manifest" in checkpoint.damage(path)
    with pytest.raises(CheckpointError, match="not an fp8train manifest.*damaged"):
        load(path, model, opt)


def test_resume_paths_other_than_a_checkpoint_folder_say_what_to_pass(tmp_path):
    model, opt = trained(0)
    run_dir = tmp_path / "run"
    ckpt_root = run_dir / "checkpoints"
    path = save(ckpt_root, 3, model, opt)
    here = ckpt_root  # this run's checkpoints, as the trainer passes them
    assert find_resume_checkpoint(str(path), here) == path
    cases = {
        path / "model.safetensors": f"is a file, not a checkpoint folder: pass the checkpoint that holds it, "
        f"resume={path}\\.",
        run_dir: f"is a run directory.*hydra.run.dir={run_dir} resume=auto.*resume={path}\\.",
        ckpt_root: f"checkpoints folder of a run.*hydra.run.dir={run_dir} resume=auto.*resume={path}\\.",
        tmp_path / "nowhere": "no such file or folder",
    }
    for given, message in cases.items():
        with pytest.raises(CheckpointError, match=message):
            find_resume_checkpoint(str(given), here)


@pytest.mark.parametrize("resume", ["auto", "none"])
def test_a_checkpoints_folder_that_is_a_broken_link_or_a_file_stops_the_run_before_it_starts(tmp_path, resume):
    """RUN/checkpoints linked to a disk that is not mounted: resume=auto found no checkpoint, started over at step 0
    (cutting metrics.jsonl back to it) and failed at its first checkpoint; resume=none failed there too."""
    ckpt_root = tmp_path / "checkpoints"
    ckpt_root.symlink_to(tmp_path / "scratch" / "ckpts")
    with pytest.raises(CheckpointError, match=f"{ckpt_root} is a link to {tmp_path / 'scratch' / 'ckpts'}, which"):
        find_resume_checkpoint(resume, ckpt_root)
    ckpt_root.unlink()
    ckpt_root.write_text("")
    with pytest.raises(CheckpointError, match=f"{ckpt_root} is a file, not a folder"):
        find_resume_checkpoint(resume, ckpt_root)


def test_a_deepspeed_checkpoint_resumed_by_a_single_process_names_parallel_deepspeed(tmp_path):
    model, opt = trained(0)
    path = save(tmp_path, 3, model, opt)
    # parallel=deepspeed's layout: model.safetensors for export, the optimizer state in DeepSpeed's own files.
    (path / "deepspeed").mkdir()
    os.replace(path / "optimizer.pt", path / "deepspeed" / "mp_rank_00_model_states.pt")
    with pytest.raises(CheckpointError, match="written by parallel=deepspeed.*resume it with parallel=deepspeed"):
        load(path, model, opt, verified=True)


def test_optimizer_state_of_the_other_adamw_is_refused_naming_optim(tmp_path):
    model, adamw = trained(0)
    fp8 = AdamWFp8(model.parameters(), lr=1e-2, min_numel=0)
    model(torch.randint(0, 96, (2, 8))).logsumexp(-1).mean().backward()
    fp8.step()
    adamw_ckpt = save(tmp_path / "a", 3, model, adamw)
    fp8_ckpt = save(tmp_path / "b", 3, model, fp8)
    with pytest.raises(CheckpointError, match="optim=adamw\\b.*optim.habana_fused=true.*Resume with optim=adamw,"):
        load(adamw_ckpt, model, AdamWFp8(model.parameters(), min_numel=0))
    with pytest.raises(CheckpointError, match="optim=adamw_fp8.*this run has optim=adamw: resume with optim=adamw_fp8"):
        load(fp8_ckpt, model, torch.optim.AdamW(model.parameters()))


def test_a_checkpoint_copied_under_a_later_steps_name_is_refused_by_resume_auto(tmp_path):
    """``cp -r step_0000002 step_0000009``: resume=auto goes by the names, and would take step 2's state for the
    newest, retrain from step 3 and move the real later checkpoints aside. It names the folder instead."""
    model, opt = trained(0)
    for step in (2, 4):
        save(tmp_path, step, model, opt)
    shutil.copytree(tmp_path / "step_0000002", tmp_path / "step_0000009")
    with pytest.raises(CheckpointError, match=r"step_0000009 holds the state of step 2 \(its manifest.json\)"):
        find_resume_checkpoint("auto", tmp_path)
    assert [p.name for p in sorted(tmp_path.iterdir())] == ["step_0000002", "step_0000004", "step_0000009"]  # untouched
    shutil.move(tmp_path / "step_0000009", tmp_path / "copy")  # as the message says
    assert find_resume_checkpoint("auto", tmp_path) == tmp_path / "step_0000004"
    assert find_resume_checkpoint(str(tmp_path / "copy"), tmp_path) == tmp_path / "copy"  # on purpose: as asked
