"""What every device backend provides to the trainer: a device, autocast, a sync point and memory stats."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from fp8train.errors import BackendError
from fp8train.fp8.ops import Fp8Ops
from fp8train.fp8.scaling import EagerUntilScalesReady


@dataclass
class Backend:
    """A device. Subclasses override what differs; the trainer never branches on the device name."""

    name: str = "cpu"
    device: torch.device = torch.device("cpu")
    dist_backend: str = "gloo"  # torch.distributed backend for data parallelism on this device
    compile_options: dict = field(default_factory=dict)  # backend.compile_options: torch.compile(options=...)
    compile_scope: str = "model"  # backend.compile_scope: the whole model, or each transformer block

    def autocast(self, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
        """Mixed precision for the forward pass; ``None`` runs in the parameters' dtype."""
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=dtype)

    def mark_step(self) -> None:
        """End of a graph segment (Gaudi lazy mode); a no-op elsewhere."""

    def synchronize(self) -> None:
        """Wait for queued device work, so wall-clock timings are honest."""

    def peak_memory_bytes(self) -> int:
        """Peak memory of this process on the device since the last reset."""
        return 0

    def reset_peak_memory(self) -> None:
        pass

    def compile(self, model: torch.nn.Module) -> Callable:
        """The model's forward under torch.compile, over the whole model or each of its blocks (compile_scope).

        ``block`` compiles every block of ``model.layers`` in place (``nn.Module.compile``: the state dict keys do not
        change). The blocks are alike, so dynamo builds one graph for all of them; embeddings, final norm, lm_head
        and the loss run eagerly. Either way, the steps before the delayed FP8 scales have a history run eagerly, so
        the graphs are built once (EagerUntilScalesReady).
        """
        if self.compile_scope == "block":
            for block in model.layers:
                block.compile(**self.compile_kwargs())
            return EagerUntilScalesReady(model, model)
        return EagerUntilScalesReady(model, torch.compile(model, **self.compile_kwargs()))

    def compile_kwargs(self) -> dict:
        # Static shapes: a training run's shapes do not change, and where one does (the same module class called
        # with other dims) the graph is recompiled for it instead of retraced with dynamic dims. torch 2.11 fails
        # that retrace for the FP8 linears' autograd.Function (an AssertionError in dynamo, seen when compiling
        # Fp8Linears of four shapes in one process); torch 2.13 does not.
        return {"dynamic": False, "options": self.compile_options or None}

    def inductor(self) -> bool:
        """Whether torch.compile's default compiler (inductor) generates code for this device."""
        return True

    def rng_state(self) -> dict:
        """Device RNG state for checkpoints (the CPU generator is saved by the trainer)."""
        return {}

    def set_rng_state(self, state: dict) -> None:
        pass

    def has_fused_adamw(self) -> bool:
        return False

    def fp8_ops(self) -> Fp8Ops:
        """The FP8 quantize and matmul primitives of this device (here: emulation, exact but not fast)."""
        return Fp8Ops()

    def fuse(self, model: torch.nn.Module) -> torch.nn.Module:
        """Swap in the device's fused kernels (norms, attention) where it has them; the model code stays plain."""
        return model

    def te_linear(self, linear: torch.nn.Linear) -> torch.nn.Module:
        """``linear`` run by the device's Transformer Engine (precision.engine=te)."""
        raise BackendError(TE_NEEDS_HPU.format(name=self.name))

    def fp8_autocast(self, cfg, group) -> contextlib.AbstractContextManager:
        """The Transformer Engine's FP8 region around one optimizer step (precision.engine=te)."""
        raise BackendError(TE_NEEDS_HPU.format(name=self.name))

    def describe(self) -> str:
        return self.name


TE_NEEDS_HPU = (
    "precision.engine=te runs FP8 through Habana's Transformer Engine, which needs backend.name=hpu (this run: "
    "{name}); use precision.engine=native, fp8train's own FP8 linears, on this device."
)
