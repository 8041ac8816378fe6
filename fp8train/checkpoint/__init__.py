"""Checkpoints: written whole into a temporary folder, then renamed into place, so a folder named
``step_NNNNNNN`` is always complete (rename is atomic within one filesystem).

Layout of ``RUN_DIR/checkpoints/step_0000030/``:
    model.safetensors   model weights (tied weights stored once)
    optimizer.pt        optimizer state_dict
    trainer.pt          step, schedule, data position, RNG states, data fingerprint
    config.yaml         the resolved config of the run that wrote it
    manifest.json       written last: step, size and sha256 of every file above
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from pathlib import Path

import torch
from safetensors.torch import load_model, save_model
from torch import nn

from fp8train.errors import CheckpointError

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
PREFIX = "step_"


def step_dir_name(step: int) -> str:
    return f"{PREFIX}{step:07d}"


def save(
    ckpt_root: Path,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    trainer_state: dict,
    config_yaml: str,
    keep_last: int,
) -> Path:
    """Write a checkpoint of ``step`` and delete all but the newest ``keep_last`` complete ones."""
    ckpt_root.mkdir(parents=True, exist_ok=True)
    final = ckpt_root / step_dir_name(step)
    tmp = ckpt_root / f".tmp-{step_dir_name(step)}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    t0 = time.perf_counter()
    save_model(model, str(tmp / "model.safetensors"))
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    torch.save(trainer_state, tmp / "trainer.pt")
    (tmp / "config.yaml").write_text(config_yaml)
    files = {p.name: {"bytes": p.stat().st_size, "sha256": _sha256(p)} for p in sorted(tmp.iterdir())}
    _write_synced(tmp / MANIFEST, json.dumps({"step": step, "files": files}, indent=2))
    for p in tmp.iterdir():
        _fsync(p)
    if final.exists():  # a checkpoint of the same step from an earlier attempt: replace it
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync(ckpt_root)
    log.info("checkpoint step %d -> %s (%.1f s)", step, final, time.perf_counter() - t0)
    for old in complete_checkpoints(ckpt_root)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def complete_checkpoints(ckpt_root: Path) -> list[Path]:
    """Complete checkpoints, oldest first. Temporary folders and folders without a manifest are ignored."""
    if not ckpt_root.is_dir():
        return []
    found = [p for p in ckpt_root.glob(f"{PREFIX}*") if p.is_dir() and (p / MANIFEST).is_file()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX) :]))


def latest(ckpt_root: Path) -> Path | None:
    found = complete_checkpoints(ckpt_root)
    return found[-1] if found else None


def verify(path: Path) -> dict:
    """Read the manifest and check every file's size and checksum; returns the manifest."""
    manifest_file = path / MANIFEST
    if not manifest_file.is_file():
        raise CheckpointError(f"resume={path}: not a complete fp8train checkpoint (no {MANIFEST}).")
    try:
        manifest = json.loads(manifest_file.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"resume={path}: {MANIFEST} is unreadable ({e}).") from None
    for name, meta in manifest["files"].items():
        f = path / name
        if not f.is_file() or f.stat().st_size != meta["bytes"] or _sha256(f) != meta["sha256"]:
            raise CheckpointError(
                f"resume={path}: {name} is missing or does not match its checksum in {MANIFEST}; the checkpoint "
                f"is damaged. Resume from an older one (resume=PATH) or start over (resume=none)."
            )
    return manifest


def load(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, map_location: torch.device) -> dict:
    """Restore model and optimizer in place; return the trainer state saved with them."""
    verify(path)
    try:
        load_model(model, str(path / "model.safetensors"), device=str(map_location))
    except RuntimeError as e:
        raise CheckpointError(
            f"resume={path}: its weights do not fit this model ({str(e).splitlines()[0]}); resume with the "
            f"model settings the run was started with (see {path / 'config.yaml'})."
        ) from None
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location=map_location, weights_only=True))
    return torch.load(path / "trainer.pt", map_location="cpu", weights_only=True)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _write_synced(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
