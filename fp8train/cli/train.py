"""Hydra entry point of a training run, shared by ``python train.py`` and ``fp8train train``."""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from fp8train.config import CONF_DIR, compose, register_schema, to_typed
from fp8train.errors import ConfigError, Fp8trainError

register_schema()


def fail(error: Fp8trainError) -> None:
    """Print a user-fixable problem as a message alone (no traceback) and exit with status 2."""
    print(f"fp8train: {error}", file=sys.stderr)
    sys.exit(2)


def interrupted() -> None:
    """Ctrl-C where the training loop does not catch it (it stops the loop itself, after the step, with a
    checkpoint): setting up, tokenizing, or a second Ctrl-C. A message and status 130 (128 + SIGINT), no traceback."""
    print(
        "fp8train: interrupted (Ctrl-C). Token caches, tokenizers and checkpoints are only ever published whole, "
        "so nothing half-written is left to be taken for a finished one.",
        file=sys.stderr,
    )
    sys.exit(130)


def preflight(argv: list[str]) -> None:
    """Validate the composed config and an explicit hydra.run.dir before Hydra creates the run directory, so a
    typo leaves nothing behind and a run dir Hydra cannot create is a message, not Hydra's traceback.

    Skipped when Hydra flags are present (--multirun, --cfg, ...): then each job validates its own config.
    """
    if any(a.startswith("-") for a in argv):
        return
    problems = run_dir_problems(argv)
    try:
        cfg = compose([a for a in argv if not a.startswith(("hydra.", "hydra/"))])
    except ConfigError as e:
        problems = [*e.problems, *problems]
    except Fp8trainError as e:
        fail(e)
    else:
        from fp8train.backends import unavailable  # imports torch, which the run needs next anyway

        if problem := unavailable(cfg.backend):
            problems.append(problem)
    if problems:
        fail(ConfigError(problems))


def run_dir_problems(argv: list[str]) -> list[str]:
    """Why an explicit hydra.run.dir cannot be a run directory: Hydra would fail creating it with a traceback.

    Only the part before the first ``${...}`` is checked (the folder it names, or the folder it ends in),
    so nothing is created and interpolations Hydra fills in at start-up (``${now:...}``) need no resolving.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser

    args = [a for a in argv if "hydra.run.dir=" in a]
    try:
        overrides = OverridesParser.create().parse_overrides(args)
    except Exception:  # Hydra reports malformed overrides itself
        return []
    problems = []
    for o in overrides:
        value = o.value()
        if o.key_or_group != "hydra.run.dir" or not isinstance(value, str) or not value:
            continue
        fixed = value.split("${", 1)[0]
        if "${" in value:  # the run dir is a folder yet to be named inside this one
            problem = folder_problem(Path(fixed if fixed.endswith("/") else Path(fixed).parent), inside=True)
        else:
            problem = folder_problem(Path(value))
        if problem:
            problems.append(f"hydra.run.dir={value}: {problem}; choose a run directory in a writable folder")
    return problems


def folder_problem(folder: Path, inside: bool = False) -> str | None:
    """Why ``folder`` can be neither used nor created (``inside``: why no folder can be created in it), or None."""
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        return f"{existing} is a file, not a folder"
    if existing == folder and not inside:
        return None if os.access(folder, os.W_OK | os.X_OK) else f"{folder} is not writable"
    # A test folder, removed at once, is the only sure test: as root, os.access says yes to /proc.
    try:
        tempfile.TemporaryDirectory(dir=existing).cleanup()
    except OSError as e:
        return f"cannot create folders in {existing} ({e.strerror or e})"
    return None


@hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")
def hydra_main(raw: DictConfig) -> None:
    from fp8train.trainer import Trainer

    try:
        cfg = to_typed(raw)
        Trainer(cfg, Path(HydraConfig.get().runtime.output_dir)).fit()
    except Fp8trainError as e:
        fail(e)


def without_local_rank(argv: list[str]) -> list[str]:
    """The deepspeed launcher appends ``--local_rank=N`` unless given --no_local_rank; LOCAL_RANK in the
    environment says the same, and Hydra would reject the flag, so it is dropped."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--local_rank":
            skip = True
        elif not a.startswith("--local_rank="):
            out.append(a)
    return out


def main(argv: list[str] | None = None) -> None:
    argv = without_local_rank(sys.argv[1:] if argv is None else argv)
    try:
        preflight(argv)
        sys.argv = [sys.argv[0], *argv]
        hydra_main()
    except KeyboardInterrupt:
        interrupted()
