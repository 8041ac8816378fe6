"""Advisory lock files (flock) that say who holds them: a run directory's, a token cache's or tokenizer's."""

from __future__ import annotations

import os
import socket


def mark_holder(fd: int) -> None:
    """Write this process into the lock file ``fd`` whose flock it has just taken, for the processes that wait."""
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"process {os.getpid()} on {socket.gethostname()}\n".encode(), 0)


def holder(fd: int) -> str:
    """The process holding the lock file ``fd``, as it wrote itself there ("process P on HOST")."""
    return os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
