"""Command-line entry points: ``python train.py`` and the ``fp8train`` command."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

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
