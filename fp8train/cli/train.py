"""Hydra entry point of a training run, shared by ``python train.py`` and ``fp8train train``."""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from fp8train.config import CONF_DIR, compose, register_schema, to_typed
from fp8train.errors import Fp8trainError

register_schema()


def fail(error: Fp8trainError) -> None:
    """Print a user-fixable problem as a message alone (no traceback) and exit with status 2."""
    print(f"fp8train: {error}", file=sys.stderr)
    sys.exit(2)


def preflight(argv: list[str]) -> None:
    """Validate the composed config before Hydra creates a run directory, so a typo leaves nothing behind.

    Skipped when Hydra flags are present (--multirun, --cfg, ...): then each job validates its own config.
    """
    if any(a.startswith("-") for a in argv):
        return
    try:
        compose([a for a in argv if not a.startswith(("hydra.", "hydra/"))])
    except Fp8trainError as e:
        fail(e)


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
    preflight(argv)
    sys.argv = [sys.argv[0], *argv]
    hydra_main()
