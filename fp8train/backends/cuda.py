"""NVIDIA GPUs."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fp8train.backends.base import Backend


@dataclass
class CudaBackend(Backend):
    def __post_init__(self) -> None:
        torch.cuda.set_device(self.device)
        # TF32 for the fp32 matmuls that remain (lm_head in fp32 recipes, optimizer math does not use matmuls).
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    def synchronize(self) -> None:
        torch.cuda.synchronize(self.device)

    def peak_memory_bytes(self) -> int:
        return torch.cuda.max_memory_allocated(self.device)

    def reset_peak_memory(self) -> None:
        torch.cuda.reset_peak_memory_stats(self.device)

    def rng_state(self) -> dict:
        return {"cuda": torch.cuda.get_rng_state(self.device)}

    def set_rng_state(self, state: dict) -> None:
        if "cuda" in state:
            torch.cuda.set_rng_state(state["cuda"], self.device)

    def has_fused_adamw(self) -> bool:
        return True

    def describe(self) -> str:
        major, minor = torch.cuda.get_device_capability(self.device)
        return f"cuda ({torch.cuda.get_device_name(self.device)}, sm_{major}{minor})"
