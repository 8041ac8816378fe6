"""CPU: development, CI and the reference for bit-exact resume tests."""

from __future__ import annotations

import platform
import resource
from dataclasses import dataclass

import torch

from fp8train.backends.base import Backend


@dataclass
class CpuBackend(Backend):
    threads: int | None = None

    def __post_init__(self) -> None:
        if self.threads:
            torch.set_num_threads(self.threads)

    def peak_memory_bytes(self) -> int:
        # ru_maxrss is the process's peak resident set, in KiB on Linux (bytes on macOS); it cannot be reset.
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return rss if platform.system() == "Darwin" else rss * 1024

    def has_fused_adamw(self) -> bool:
        return True  # torch >= 2.4 has a fused CPU AdamW

    def describe(self) -> str:
        return f"cpu ({torch.get_num_threads()} threads)"
