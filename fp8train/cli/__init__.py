"""Command-line entry points: ``python train.py`` and the ``fp8train`` command."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import NoReturn

from fp8train.errors import Fp8trainError


@contextmanager
def writing_into(out: Path, what: str) -> Iterator[None]:
    """Turn an OSError met while creating or filling the output folder into a message naming --out, the fix."""
    try:
        yield
    except OSError as e:
        detail = f"{e.strerror}: {e.filename}" if e.strerror and e.filename else str(e)
        raise Fp8trainError(
            f"cannot write the {what} into {out} ({detail}); pass --out a folder you can write to."
        ) from None


def interrupted() -> NoReturn:
    """Ctrl-C where the training loop does not catch it (it stops the loop itself, after the step, with a
    checkpoint): starting up, tokenizing, or a second Ctrl-C. A message and status 130 (128 + SIGINT), no traceback."""
    print(
        "fp8train: interrupted (Ctrl-C). Token caches, tokenizers and checkpoints are only ever published whole, "
        "so nothing half-written is left to be taken for a finished one.",
        file=sys.stderr,
    )
    exit_with(130)


def exit_with(status: int) -> NoReturn:
    """sys.exit, except with a process group up: its communication threads, still running when the interpreter tears
    down, abort it now and then ("terminate called without an active exception", SIGABRT instead of the status).
    A wandb run still open is finished and logs and output are flushed (exit hooks do not run), then the process
    ends at once; the launcher stops the other ranks."""
    dist = sys.modules.get("torch.distributed")
    if dist is None or not dist.is_available() or not dist.is_initialized():
        sys.exit(status)
    from fp8train.loggers import finish_open_wandb  # here: this module must import where Ctrl-C cut imports short

    finish_open_wandb(status)
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def by_ctrl_c(error: BaseException) -> bool:
    """Whether ``error`` is Ctrl-C's KeyboardInterrupt or came of one: a library whose clean-up fails on the state
    the interrupt left (omegaconf, restoring its flags on a half-built config, raises AttributeError)."""
    if isinstance(error, SystemExit):  # an exit already decided on, e.g. by interrupted()
        return False
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, KeyboardInterrupt):
            return True
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return False


@contextmanager
def interruptible() -> Iterator[None]:
    """Ctrl-C in the block (starting up: imports, composing the config) is :func:`interrupted`."""
    try:
        yield
    except BaseException as e:
        if not by_ctrl_c(e):
            raise
        interrupted()
