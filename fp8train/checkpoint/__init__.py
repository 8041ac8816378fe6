"""Checkpoints: written whole into a temporary folder, then renamed into place, so a folder named
``step_NNNNNNN`` is always complete (rename is atomic within one filesystem).

Layout of ``RUN_DIR/checkpoints/step_0000030/``:
    model.safetensors   model weights (tied weights stored once), FP8 scaling state included
    optimizer.pt        optimizer state_dict (parallel=single)
    deepspeed/          parallel=deepspeed: DeepSpeed's own files (module states, one optimizer partition per rank)
    rank_<r>.pt         multi-process runs: each rank's RNG state
    trainer.pt          step, schedule, data position, RNG states, data fingerprint
    config.yaml         the resolved config of the run that wrote it
    manifest.json       written last: step, size and sha256 of every file above

A run resumed from an older checkpoint starts a new timeline: the checkpoints after it are moved into
``checkpoints/superseded/`` (``set_aside_after``), where nothing takes them by accident.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import time
from pathlib import Path

import torch
from safetensors import SafetensorError

from fp8train.errors import CheckpointError

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
PREFIX = "step_"
STEP_DIR = re.compile(rf"{PREFIX}(\d+)")
SUPERSEDED = "superseded"


def step_dir_name(step: int) -> str:
    return f"{PREFIX}{step:07d}"


def step_of(path: Path) -> int | None:
    """The step of a ``step_NNNNNNN`` folder; None for any other name (``step_0000003.bak``, a user's copy)."""
    match = STEP_DIR.fullmatch(path.name)
    return int(match[1]) if match else None


def save(
    ckpt_root: Path,
    step: int,
    engine,
    trainer_state: dict,
    config_yaml: str,
    keep_last: int,
    rank_state: dict | None = None,
) -> Path:
    """Write a checkpoint of ``step`` and delete the older ones but the newest ``keep_last - 1``.

    ``engine`` (fp8train.parallel) writes the model and optimizer files; every rank of a multi-process run calls
    this, rank 0 writes the rest and renames the folder into place once all ranks are done. ``rank_state`` (e.g.
    this rank's RNG) goes to ``rank_<r>.pt``. A failed write (disk full, quota) removes its temporary folder and
    leaves every earlier checkpoint as it was.
    """
    from fp8train import parallel

    main = engine.is_main
    tmp = None
    if main:
        try:
            ckpt_root.mkdir(parents=True, exist_ok=True)
            remove_stale_tmp(ckpt_root)
            tmp = ckpt_root / f".tmp-{step_dir_name(step)}-{os.getpid()}"
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
        except OSError as e:
            raise _write_error(ckpt_root, step, e) from None
    tmp = Path(parallel.broadcast_object(str(tmp)))
    final = ckpt_root / step_dir_name(step)
    t0 = time.perf_counter()
    try:
        engine.save_state(tmp)
        if rank_state is not None:
            torch.save(rank_state, tmp / f"rank_{engine.rank}.pt")
        parallel.barrier()
        if main:
            _finish(tmp, step, trainer_state, config_yaml)
    except Exception as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if _is_write_failure(e):
            raise _write_error(ckpt_root, step, e) from None
        raise
    if main:
        if final.exists():  # a checkpoint of the same step from an earlier attempt: replace it
            _remove(final)
        os.replace(tmp, final)
        _fsync(ckpt_root)
        log.info("checkpoint step %d -> %s (%.1f s)", step, final, time.perf_counter() - t0)
        # Only steps before this one: the checkpoint just written is the run's state, whatever else lies beside it.
        older = [p for p in complete_checkpoints(ckpt_root) if step_of(p) < step]
        for old in older[: max(0, len(older) - (keep_last - 1))]:
            _remove(old)
    parallel.barrier()
    return final


def _is_write_failure(e: Exception) -> bool:
    """An exception of a file write (disk full, quota, I/O error) rather than a bug.

    torch.save reports a failed write as a RuntimeError from its archive writer (``[enforce fail at
    inline_container.cc] unexpected pos``, ``PytorchStreamWriter failed writing file``), safetensors as a
    SafetensorError ("I/O error: No space left on device").
    """
    if isinstance(e, RuntimeError):
        return "inline_container" in str(e) or "PytorchStreamWriter" in str(e)
    return isinstance(e, (OSError, SafetensorError))


def _write_error(ckpt_root: Path, step: int, e: Exception) -> CheckpointError:
    if isinstance(e, OSError):
        cause = e.strerror or str(e)
    else:  # torch's "unexpected pos 704 vs 662" does not say "disk full": the free space next to it does
        cause = (str(e).strip().splitlines() or [type(e).__name__])[0]
    try:
        free = f"{shutil.disk_usage(ckpt_root).free / 2**20:.0f} MiB free there"
    except OSError:
        free = "free space unknown"
    prev = latest(ckpt_root)
    kept = f"the previous checkpoint step {step_of(prev)} is intact" if prev else "no earlier checkpoint"
    return CheckpointError(
        f"writing checkpoint step {step} to {ckpt_root} failed: {cause} ({free}; {kept}). Free space or fix "
        f"the directory, then continue with resume=auto."
    )


def _finish(tmp: Path, step: int, trainer_state: dict, config_yaml: str) -> None:
    """Rank 0's part: trainer state, config, then the manifest (last) over every file of the folder."""
    torch.save(trainer_state, tmp / "trainer.pt")
    (tmp / "config.yaml").write_text(config_yaml)
    paths = sorted(p for p in tmp.rglob("*") if p.is_file())
    readable_as_umask(paths)
    files = {str(p.relative_to(tmp)): {"bytes": p.stat().st_size, "sha256": _sha256(p)} for p in paths}
    _write_synced(tmp / MANIFEST, json.dumps({"step": step, "files": files}, indent=2))
    for p in paths:
        _fsync(p)


def readable_as_umask(files: list[Path]) -> None:
    """Give files the mode the umask gives new files. safetensors creates its files private (0600): other users, or
    a serving container running as another user, could not read weights that sit beside readable files."""
    mask = os.umask(0)
    os.umask(mask)
    for file in files:
        file.chmod(0o666 & ~mask)


def _remove(path: Path) -> None:
    """Rename to a temporary name first: a deletion killed halfway never leaves a damaged step_* folder. A link (to
    a checkpoint kept elsewhere) goes as a link: what it points to is not this run's to delete."""
    if path.is_symlink():
        path.unlink()
        return
    doomed = path.parent / f".tmp-del-{path.name}-{os.getpid()}"
    os.replace(path, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def remove_stale_tmp(ckpt_root: Path) -> None:
    """Delete temporary folders left by writes of processes that died (killed, out of memory, node lost).

    Folders are named ``.tmp-...-PID``; one whose PID is no longer running on this machine is stale. A folder of a
    live process (another run writing into this directory by mistake) is left alone.
    """
    for p in ckpt_root.glob(".tmp-*"):
        pid = p.name.rsplit("-", 1)[-1]
        if pid.isdigit() and (int(pid) == os.getpid() or not _alive(int(pid))):
            shutil.rmtree(p, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def set_aside_after(ckpt_root: Path, step: int) -> Path | None:
    """Move the checkpoints of steps after ``step`` into ``superseded/``; return where they went, if anywhere.

    A run resumed from step N retrains steps N+1.. on a new timeline: the old checkpoints of those steps would be
    taken by resume=auto (newer numbers) and would make keep_last delete the new ones. They are kept, not deleted:
    the resume may have been a mistake.
    """
    later = sorted((p for p in ckpt_root.glob(f"{PREFIX}*") if p.is_dir() and (step_of(p) or 0) > step), key=step_of)
    if not later:
        return None
    dest = ckpt_root / SUPERSEDED / f"after_{step_dir_name(step)}_{time.strftime('%Y%m%d-%H%M%S')}"
    dest = _unused(dest)
    dest.mkdir(parents=True)
    for p in later:
        os.replace(p, dest / p.name)
    _fsync(ckpt_root)
    log.info(
        "resumed at step %d: the checkpoints of later steps (%s), of the timeline this run replaces, moved to %s",
        step,
        ", ".join(str(step_of(p)) for p in later),
        dest,
    )
    return dest


def _unused(path: Path) -> Path:
    candidate, n = path, 1
    while candidate.exists():
        n += 1
        candidate = path.with_name(f"{path.name}_{n}")
    return candidate


def complete_checkpoints(ckpt_root: Path) -> list[Path]:
    """Complete checkpoints, oldest first. Temporary folders, folders without a manifest and folders named other
    than ``step_<digits>`` (a ``step_0000003.bak`` copy) are ignored."""
    if not ckpt_root.is_dir():
        return []
    found = [
        p for p in ckpt_root.glob(f"{PREFIX}*") if step_of(p) is not None and p.is_dir() and (p / MANIFEST).is_file()
    ]
    return sorted(found, key=step_of)


def latest(ckpt_root: Path) -> Path | None:
    found = complete_checkpoints(ckpt_root)
    return found[-1] if found else None


def superseded_checkpoints(ckpt_root: Path) -> list[Path]:
    """The complete checkpoints ``set_aside_after`` moved into ``superseded/``, oldest move first."""
    moves = sorted(p for p in (ckpt_root / SUPERSEDED).glob("after_*") if p.is_dir())
    return [c for move in moves for c in complete_checkpoints(move)]


def run_dir_of(path: Path) -> Path | None:
    """The run directory of a checkpoint folder: ``RUN/checkpoints/step_N``, or one a resume set aside,
    ``RUN/checkpoints/superseded/after_.../step_N``; None for a folder in neither place."""
    path = Path(os.path.abspath(path))  # by the names of its parents: "step_N" given from inside checkpoints/ too
    if path.parent.name == "checkpoints":
        return path.parent.parent
    if path.parent.parent.name == SUPERSEDED and path.parent.parent.parent.name == "checkpoints":
        return path.parent.parent.parent.parent
    return None


def damage(path: Path) -> str | None:
    """What is wrong with a checkpoint folder (``"optimizer.pt: checksum mismatch"``), or None if it is intact."""
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except FileNotFoundError:
        return f"no {MANIFEST} (not a complete fp8train checkpoint)"
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        return f"{MANIFEST} is unreadable ({e})"
    except OSError as e:
        return f"{MANIFEST} cannot be read ({e.strerror or e})"
    problem = _manifest_problem(manifest)
    if problem:
        return f"{MANIFEST} {problem}"
    for name, meta in manifest["files"].items():
        f = path / name
        if not f.is_file():
            return f"{name} is missing"
        if f.stat().st_size != meta["bytes"]:
            return f"{name} has {f.stat().st_size} bytes, its manifest says {meta['bytes']} (truncated?)"
        if _sha256(f) != meta["sha256"]:
            return f"{name} does not match its checksum in {MANIFEST}"
    return None


def _manifest_problem(manifest) -> str | None:
    """What keeps ``manifest`` from being one that save wrote ({"step": N, "files": {name: {bytes, sha256}}})."""
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        return 'is not an fp8train manifest (no "files" table)'
    for name, meta in manifest["files"].items():
        if (
            not isinstance(meta, dict)
            or not isinstance(meta.get("bytes"), int)
            or not isinstance(meta.get("sha256"), str)
        ):
            return f'is not an fp8train manifest ("{name}" lacks its bytes and sha256)'
    return None


def verify(path: Path) -> None:
    """Check every file's size and checksum against the manifest; raise CheckpointError naming a damaged file."""
    problem = damage(path)
    if problem:
        raise CheckpointError(
            f"resume={path}: {problem}; the checkpoint is damaged. Resume from an older one (resume=PATH, or "
            f"resume=auto to take the newest intact one) or start over in a new run directory."
        )


def latest_intact(ckpt_root: Path) -> Path | None:
    """The newest complete checkpoint whose files match their checksums; damaged ones are skipped with a warning."""
    found = complete_checkpoints(ckpt_root)
    for path in reversed(found):
        problem = damage(path)
        if problem is None:
            check_named_by_step(path)
            return path
        log.warning("checkpoint %s is damaged: %s; falling back to the previous one", path, problem)
    if found:
        raise CheckpointError(
            f"resume=auto: no intact checkpoint in {ckpt_root} (all {len(found)} are damaged, see the warnings "
            f"above). Start over in a new run directory, or restore a checkpoint from a backup."
        )
    return None


def check_named_by_step(path: Path) -> None:
    """Refuse a checkpoint whose name says another step than its manifest (``cp -r step_0000100 step_0000900``):
    resume=auto goes by the names, and would retrain from the older step and set the later checkpoints aside."""
    recorded = json.loads((path / MANIFEST).read_text()).get("step")
    if isinstance(recorded, int) and recorded != step_of(path):
        raise CheckpointError(
            f"resume=auto: {path} holds the state of step {recorded} (its {MANIFEST}), not of step {step_of(path)} as "
            f"its name says: a copy under another name? resume=auto takes the checkpoint with the highest step in its "
            f"name. Move it out of {path.parent} (or give it its own name, {step_dir_name(recorded)}, if that is "
            f"free), or resume from it on purpose with resume={path}."
        )


def load(path: Path, engine, map_location: torch.device, verified: bool = False) -> dict:
    """Restore model and optimizer in place through ``engine``; return the trainer state saved with them, with
    this rank's ``rank_<r>.pt`` (if the checkpoint has one) under ``"rank_state"``."""
    if not verified:
        verify(path)
    engine.load_state(path, map_location)
    state = torch.load(path / "trainer.pt", map_location="cpu", weights_only=True)
    rank_file = path / f"rank_{engine.rank}.pt"
    if rank_file.is_file():
        state["rank_state"] = torch.load(rank_file, map_location="cpu", weights_only=True)
    return state


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
