"""Per-tensor FP8 scaling state: amax histories, scales, and the overflow / underflow counters the monitor reads.

One ``TensorScaler`` per FP8 tensor (the input, weight and output gradient of each ``Fp8Linear``). Recipes:

- ``current``: the scale comes from this tensor's amax now (just-in-time). Robust; one extra reduction.
- ``delayed``: the scale for step t comes from the amax history up to step t-1, so a spike at step t is quantized
  with a scale that did not see it (it saturates) and only enters the scale at t+1. Slot 0 of the history is the
  running amax of the current step (max over micro-batches); ``step_scalers`` max-reduces slot 0 over
  data-parallel ranks in one collective and then moves every scaler to the next step.

All state lives in persistent buffers, so it is in ``model.state_dict()`` and a resumed run scales exactly as an
uninterrupted one. Nothing here calls ``.item()`` on the training path or branches on tensor values.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from fp8train.fp8 import formats
from fp8train.fp8.ops import Fp8Ops, amax_of

log = logging.getLogger("fp8train")

RECIPES = ("current", "delayed")
STAT_NAMES = ("amax", "scale", "saturated_frac", "underflow_frac", "amax_ratio")  # what pop_stats() reports
AMAX_ALGOS = ("max", "most_recent")


@dataclass(frozen=True)
class ScalingConfig:
    """How the scales of FP8 tensors are chosen (the same for every tensor of a model)."""

    recipe: str = "delayed"  # "current": scale from this tensor's amax; "delayed": from the previous steps' amaxes
    amax_history_len: int = 16  # delayed: steps of amax history (NVIDIA TE uses up to 1024, Habana TE 1)
    amax_compute_algo: str = "max"  # delayed: "max" over the history or its "most_recent" step
    margin: int = 0  # scales are divided by 2^margin: headroom against amax growth between steps
    pow2: bool = False  # round scales down to a power of two (rescaling is then exact, as in Habana TE)
    profile: str = "ocp"  # "ocp" (E4M3 max 448) or "gaudi2" (E4M3 saturates at 240)

    def __post_init__(self) -> None:
        problems = []
        if self.recipe not in RECIPES:
            problems.append(f"recipe={self.recipe!r} is not one of {RECIPES}")
        if self.amax_history_len < 1:
            problems.append(f"amax_history_len={self.amax_history_len} must be >= 1")
        if self.amax_compute_algo not in AMAX_ALGOS:
            problems.append(f"amax_compute_algo={self.amax_compute_algo!r} is not one of {AMAX_ALGOS}")
        if self.profile not in formats.PROFILES:
            problems.append(f"profile={self.profile!r} is not one of {formats.PROFILES}")
        else:
            # 2^-margin must leave an amax a normal E4M3 number (>= 2^-6): beyond, most of every tensor flushes to
            # zero, and far beyond, the scale underflows to 0 and the outputs are NaN.
            top = math.floor(math.log2(formats.fp8_max(formats.E4M3, self.profile))) + 6
            if not 0 <= self.margin <= top:
                problems.append(f"margin={self.margin} must be in [0, {top}] for profile {self.profile!r}")
        if problems:
            raise ValueError("ScalingConfig: " + "; ".join(problems))


class TensorScaler(nn.Module):
    """Scaling state of one FP8 tensor.

    Buffers (all persistent):
      amax_history (L,) fp32   slot 0: running amax of the current step; slot i: the amax of i steps ago
      scale () fp32            delayed: the scale of the current step; current: the last scale used
      scale_ready () bool      delayed: False until a step() has seen a nonzero amax. Until then there is no
                               history to scale from, and the scaler uses current scaling instead of a blind 1.0
                               (which would flush a whole step of small gradients to zero in E5M2)
      n_saturated, n_underflow, n_elements () int64, stat_amax, stat_scale, stat_ratio () fp32
                               statistics since the last ``pop_stats()``, gathered only while ``track_stats``
    State (history, scale) changes only in training mode: evaluation reuses the scales without moving them.

    ``history_ready`` (a Python bool, not state) mirrors ``scale_ready`` once it is True, set where the buffer is
    read anyway (``step()``, loading a state dict). Only then does the quantization stop depending on this tensor's
    own amax, so that torch.compile can cast it in the kernel that produces it instead of a second pass after the
    amax; before, ``where(scale_ready, scale, scale from amax now)`` gives the same scale once ready, with that
    dependency. Flipping it would recompile a compiled model; ``EagerUntilScalesReady`` runs the steps before eagerly.
    """

    def __init__(self, fmt: str, cfg: ScalingConfig, device: torch.device | str | None = None):
        super().__init__()
        self.fmt = fmt
        self.cfg = cfg
        self.fp8_max = formats.fp8_max(fmt, cfg.profile)
        self.overflow_threshold = formats.fp8_overflow_threshold(fmt, cfg.profile)
        self.flush_threshold = formats.fp8_min_subnormal(fmt) / 2  # |x * scale| <= this rounds (to even) to 0
        self.track_stats = False  # counting saturated / flushed elements costs two extra passes over each tensor
        self.history_ready = False  # scale_ready, known on the host (see the class docstring)
        f32 = {"dtype": torch.float32, "device": device}
        i64 = {"dtype": torch.int64, "device": device}
        self.register_buffer("amax_history", torch.zeros(cfg.amax_history_len, **f32))
        self.register_buffer("scale", torch.ones((), **f32))
        self.register_buffer("scale_ready", torch.zeros((), dtype=torch.bool, device=device))
        for name in ("n_saturated", "n_underflow", "n_elements"):
            self.register_buffer(name, torch.zeros((), **i64))
        for name in ("stat_amax", "stat_scale", "stat_ratio"):
            self.register_buffer(name, torch.zeros((), **f32))

    def extra_repr(self) -> str:
        c = self.cfg
        return f"{self.fmt}, {c.recipe}, history={c.amax_history_len}, {c.amax_compute_algo}, profile={c.profile}"

    def _scale_from(self, amax: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        c = self.cfg
        return formats.scale_from_amax(amax, self.fmt, c.profile, c.margin, c.pow2, prev_scale=self.scale, keep=keep)

    def scale_for(self, amax_now: torch.Tensor, force_current: bool = False) -> torch.Tensor:
        """The scale to quantize a tensor whose amax is ``amax_now`` with, recording the amax for this step.

        current (or ``force_current``, for tensors that change every step, like a rescaled weight): from
        ``amax_now``. delayed: the scale computed at the last ``step()`` from the history up to the previous step.
        Returns a new tensor (never the buffer itself), so later in-place updates cannot corrupt saved copies.
        """
        amax_now = amax_now.detach().float()
        if force_current or self.cfg.recipe == "current":
            scale = self._scale_from(amax_now)
        elif self.history_ready:  # the scale from the history: independent of this tensor's amax
            scale = self.scale.clone()
        else:  # the scale from the history once there is one, current scaling before
            scale = self._scale_from(amax_now, keep=self.scale_ready)
        if self.training:
            self.amax_history[:1].copy_(torch.maximum(self.amax_history[:1], amax_now.reshape(1)))
            if self.cfg.recipe == "current":
                self.scale.copy_(scale)
        if self.track_stats:
            self.stat_amax.copy_(torch.maximum(self.stat_amax, amax_now))
            # The smallest scale (0: none yet): where micro-batches are scaled from their own amax (current scaling,
            # delayed before its first step), the one the largest amax was quantized with, so the two belong together.
            self.stat_scale.copy_(torch.where(self.stat_scale > 0, torch.minimum(self.stat_scale, scale), scale))
        return scale

    def quantize(
        self, x: torch.Tensor, ops: Fp8Ops, stochastic: bool = False, force_current: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(q, scale)``: x quantized to this scaler's format with its scale, statistics counted if tracked."""
        x = x.detach()
        scale = self.scale_for(amax_of(x), force_current)
        q, _ = ops.quantize(x, self.fmt, scale, self.cfg.profile, stochastic)
        if self.track_stats:
            self.count(x, q, scale, stochastic)
        return q, scale

    @torch.no_grad()
    def count(self, x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, stochastic: bool = False) -> None:
        """Add to the counters: finite elements the clamp to the format's max changed (saturated), nonzeros
        quantized to 0 (flushed), and the largest |x * scale| / fp8_max (the amax ratio: inf or NaN where x holds
        an inf or NaN)."""
        if x.numel() == 0:
            return
        # Saturated = beyond max + half an ulp: below that, rounding alone gives max, so the clamp loses nothing.
        # (This also keeps rounding noise out of the count: with scale = fp8_max / amax the largest element can land
        # a few fp32 ulps above max, and a compiled graph may take the amax before a bf16 rounding the cast sees.)
        # An inf is not counted: quantize makes it NaN or inf, not max (it is no overflow of the scale but a
        # non-finite input, flagged by an inf or NaN amax_ratio). A finite x whose product overflows fp32 is.
        scaled = (x.float() * scale).abs()  # the same fp32 product quantize rounds
        self.n_saturated.add_(((scaled > self.overflow_threshold) & ~x.isinf()).sum())
        # max |x * scale| = amax * scale exactly (rounding is monotonic), taken here rather than from the amax in
        # scale_for: there, products of one amax with the scales of several scalers (q, k and v share their input)
        # fused after the amax reduction made Triton 3.6 fail to build the kernel for an H100.
        self.stat_ratio.copy_(torch.maximum(self.stat_ratio, scaled.amax() / self.fp8_max))
        # Flushed: round-to-nearest-even sends |x * scale| <= half the smallest subnormal to 0 (the tie too: 0 is
        # even), so the product formed above tells, with no pass over q. Stochastic rounding decides per element:
        # read q, as bytes (the sign bit aside, all-zero bits are +-0).
        if stochastic:
            flushed = (q.view(torch.uint8) & 0x7F) == 0
        else:
            flushed = scaled <= self.flush_threshold
        self.n_underflow.add_(((x != 0) & flushed).sum())
        self.n_elements.add_(x.numel())

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self.history_ready = self.cfg.recipe == "delayed" and bool(self.scale_ready)  # one sync, when loading

    @torch.no_grad()
    def step(self) -> None:
        """End of an optimizer step (after the amax all-reduce): delayed -> next scale from the history; roll."""
        _step_together([self])

    @torch.no_grad()
    def discard_step(self) -> None:
        """Forget the amax recorded by a step that was skipped (non-finite loss or gradients).

        Slot 0 goes back to 0, as after ``step()``, so an inf/NaN amax never enters the history or the next scale;
        the scale of the delayed recipe was not touched by the step. (With ``current`` the ``scale`` buffer only
        records the last scale used; it is recomputed from each tensor's own amax.)
        """
        self.amax_history[0] = 0.0

    @torch.no_grad()
    def pop_stats(self) -> dict:
        """Statistics since the last call (one step when called every step), then reset them.

        amax: largest amax seen; scale: the smallest scale used; saturated_frac / underflow_frac: fraction of elements
        clamped beyond what rounding would do (above max + half an ulp) / nonzero but flushed to zero; amax_ratio:
        the largest amax_now / amax_assumed, where amax_assumed = fp8_max / scale (> 1 means that tensor overflowed
        its scale). All zero unless ``track_stats`` was on. One device sync per call.
        """
        return dict(zip(STAT_NAMES, self.pop_stats_tensor().tolist()))

    @torch.no_grad()
    def pop_stats_tensor(self) -> torch.Tensor:
        """``pop_stats()`` as a (5,) float32 tensor in ``STAT_NAMES`` order, left on the device (no sync): many
        scalers' statistics can then be stacked and read in one transfer. float32, not float64: Gaudi has no float64,
        and a fraction of counts needs no more than float32's 2^-24 relative rounding."""
        n = self.n_elements.clamp(min=1).float()
        values = torch.stack(
            [
                self.stat_amax.float(),
                self.stat_scale.float(),
                self.n_saturated.float() / n,
                self.n_underflow.float() / n,
                self.stat_ratio.float(),
            ]
        )
        for buf in (
            self.n_saturated,
            self.n_underflow,
            self.n_elements,
            self.stat_amax,
            self.stat_scale,
            self.stat_ratio,
        ):
            buf.zero_()
        return values


def fp8_scalers(model: nn.Module) -> list[TensorScaler]:
    """Every TensorScaler of a model, in module order (the same on every rank)."""
    return [m for m in model.modules() if isinstance(m, TensorScaler)]


class EagerUntilScalesReady:
    """Run ``compiled`` (``model``, or its blocks, under torch.compile) eagerly until the delayed scalers of ``model``
    have a history, compiled from then on.

    Before its first ``step()`` a delayed scaler scales from its tensor's own amax, after it from the stored scale
    (``history_ready``), and a compiled graph is built for one or the other: compiled from the first call, an FP8
    model is compiled twice, at steps 1 and 2 (on an H100 at the 1B shape, 191 s and then 177 s more). Running the
    steps before the first scaler step eagerly compiles it once. Models without delayed scalers (bf16, current
    scaling) are compiled from the first call; a scaler that gets its history later (an amax that stayed 0)
    recompiles the graph then, as it would anyway.
    """

    def __init__(self, model: nn.Module, compiled: Callable):
        self.compiled = compiled
        self.delayed = [s for s in fp8_scalers(model) if s.cfg.recipe == "delayed"]
        self.announced = False

    def ready(self) -> bool:
        return not self.delayed or any(s.history_ready for s in self.delayed)

    def __call__(self, *args, **kwargs):
        if not self.ready():
            with torch.compiler.set_stance("force_eager"):  # the compiled code run as plain Python: nothing compiles
                return self.compiled(*args, **kwargs)
        if not self.announced:  # the silence that follows is the compiler, not a hang
            self.announced = True
            log.info(
                "torch.compile: compiling the model%s; this call and the next few wait for it (minutes for a "
                "large FP8 model: 191 s for one graph of a Llama-1B on an H100)",
                " now that the delayed FP8 scales have a history" if self.delayed else "",
            )
        return self.compiled(*args, **kwargs)


@torch.no_grad()
def step_scalers(model: nn.Module, reduce_amax: Callable[[torch.Tensor], None] | None = None) -> None:
    """Move every scaler of ``model`` to the next step, once per optimizer step.

    ``reduce_amax(t)`` reduces, in place, one tensor holding every scaler's amax of this step (e.g.
    ``dist.all_reduce(t, op=MAX)``): one collective per step however many FP8 tensors there are.
    """
    scalers = fp8_scalers(model)
    if not scalers:
        return
    if reduce_amax is not None:
        amax = torch.stack([s.amax_history[0] for s in scalers])
        reduce_amax(amax)
        torch._foreach_copy_([s.amax_history[0] for s in scalers], list(amax.unbind()))
    groups: dict[tuple, list[TensorScaler]] = {}
    for s in scalers:
        groups.setdefault((s.fmt, s.cfg, s.amax_history.device), []).append(s)
    for group in groups.values():
        _step_together(group)


@torch.no_grad()
def _step_together(scalers: list[TensorScaler]) -> None:
    """``step()`` of scalers of one format and config as (N, L) tensors: a handful of kernels for all of them
    rather than a dozen tiny ones each (a Llama-1B's 336 FP8 tensors: 2.3 ms of CPU time per optimizer step
    against 14 ms one by one, benchmarks/bench_scalers.py), with the same values, element for element."""
    first, c = scalers[0], scalers[0].cfg
    # A non-finite amax says nothing about the range (its step is normally skipped and discarded); kept in a
    # `max` history it would pin every later scale to the previous one for amax_history_len steps.
    hist = torch.stack([s.amax_history for s in scalers]).nan_to_num(nan=0.0, posinf=0.0)
    if c.recipe == "delayed":
        amax = hist.amax(dim=1) if c.amax_compute_algo == "max" else hist[:, 0]
        prev = torch.stack([s.scale for s in scalers])
        scale = formats.scale_from_amax(amax, first.fmt, c.profile, c.margin, c.pow2, prev_scale=prev)
        ready = torch.stack([s.scale_ready for s in scalers]) | ((amax > 0) & torch.isfinite(first.fp8_max / amax))
        torch._foreach_copy_([s.scale for s in scalers], list(scale.unbind()))
        torch._foreach_copy_([s.scale_ready for s in scalers], list(ready.unbind()))
        if not all(s.history_ready for s in scalers):  # one sync per step until every scaler has a history
            for s, r in zip(scalers, ready.tolist()):
                s.history_ready = r
    rolled = hist.roll(1, dims=1)
    rolled[:, 0] = 0.0
    torch._foreach_copy_([s.amax_history for s in scalers], list(rolled.unbind()))


@torch.no_grad()
def discard_scalers(model: nn.Module) -> None:
    """Undo the amax recording of a skipped optimizer step in every scaler of ``model`` (instead of step_scalers)."""
    for s in fp8_scalers(model):
        s.discard_step()
