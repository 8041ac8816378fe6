"""``OutlierMonitor``: per-layer outlier statistics on monitored steps, alerts, outliers.jsonl and wandb.

Monitored steps are step 1 and every ``monitor.interval``-th step. On one of them the monitor

1. on the step's first micro-batch, listens to every SwiGLU MLP (whatever Smooth-SwiGLU variant replaced it: they all
   keep gate_proj, up_proj, down_proj) through forward hooks: the outputs of gate_proj and up_proj give g and u, from
   which it computes the plain SwiGLU ``h = silu(g) * u`` (the tensor that grows quadratically under alignment), and
   the input of down_proj gives what the down projection actually receives (= h for plain SwiGLU,
   ``silu(g) * u / s_t`` for Smooth-SwiGLU ``token``, ``h / s`` for ``channel``). The statistics are reduced to a
   few numbers inside the hook, so no activation is kept alive;
2. turns on ``track_stats`` of every FP8 tensor scaler, through the forward and the backward of every micro-batch
   of the step (input, weight and output-gradient of each Fp8Linear: amax, scale used, % saturated, % flushed to
   zero, amax_now / amax_assumed): with gradient accumulation an overflow in any micro-batch is counted, the
   counts summed and the amaxes and ratios maxed over the micro-batches; the scale is the smallest one used.

After the optimizer step it adds the W_up / W_gate alignment of every neuron, reads everything with one device
sync, applies the alert rules and writes one line to outliers.jsonl. Other steps run as without a monitor: no
statistics, no sync; the hooks stay registered but return at once.

Why registered once and switched by ``capturing``, rather than added and removed per monitored step: under
``torch.compile`` the first monitored step traces the hooks into a graph of their own, which later monitored steps
reuse. That graph calls the hook functions and fills the dicts it saw when traced; with hooks made anew each time,
a reused graph could write statistics nobody reads (seen with plain SwiGLU). A flag keeps the objects fixed, and
dynamo guards on its value: one graph with statistics, one without (and with grad_accum_steps > 1 a third, for the
later micro-batches of a monitored step: FP8 counters without hooks). The hooks are the same bound methods on every
layer and find the layer's slot (a dict, cleared in place) on the module they are called for, so a graph compiled
for one transformer block serves all of them (``backend.compile_scope=block``).

Under data parallelism the amaxes and FP8 figures are max-reduced over ranks (the scales min-reduced) before the
alert rules run, so every rank takes the same decision (an ``on_alert=stop`` stops them all); the distribution
statistics (RMS, kurtosis, top channels) are those of rank 0's micro-batch.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from fp8train.config import MonitorConfig, OnAlert
from fp8train.fp8.scaling import STAT_NAMES, TensorScaler
from fp8train.loggers import OUTLIERS_FILE, JsonLines, RunLogger, is_record, read_to_resume
from fp8train.monitor import stats
from fp8train.monitor.alerts import Alert, SpikeRule, overflowed
from fp8train.parallel import on_rank0

log = logging.getLogger("fp8train")

# amaxes and FP8 figures taken as the max over data-parallel ranks, the scale as the min: where ranks scale from
# their own amax (step 1, before a delayed history; current scaling; the per-channel variant's rescaled weight), the
# smallest scale is that of the rank with the largest amax, so that a record's amax and scale belong together (rank
# 0's scale beside another rank's larger amax read as an overflow no rank had). With a delayed history every rank
# has the same scale.
_REDUCED = ("h_amax", "u_amax", "g_amax", "down_in_amax")
_SCALE = STAT_NAMES.index("scale")


@dataclass
class LayerTaps:
    """What the monitor watches in one transformer layer."""

    index: int
    name: str  # module path of the layer, e.g. "layers.3"
    mlp: nn.Module
    fp8: dict[str, TensorScaler] = field(default_factory=dict)  # "mlp.down_proj.input" -> its scaler


def _mlp_linears(layer: LayerTaps) -> tuple[nn.Module, nn.Module, nn.Module]:
    return layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj


def find_layers(model: nn.Module) -> list[LayerTaps]:
    """Every SwiGLU MLP (a module with gate_proj, up_proj and down_proj), in order, with the FP8 scalers of its
    layer (the MLP's parent: attention and MLP linears). A scaler shared by linears of one input (q/k/v, gate/up:
    fp8train/precision) is listed under each of their names."""
    modules = dict(model.named_modules(remove_duplicate=False))
    layers = []
    for name, m in modules.items():
        if not all(hasattr(m, a) for a in ("gate_proj", "up_proj", "down_proj")):
            continue
        prefix = name.rpartition(".")[0]  # "layers.3.mlp" -> "layers.3"
        start = f"{prefix}." if prefix else ""
        fp8 = {
            sub[len(start) :].removesuffix("_scaler"): s
            for sub, s in modules.items()
            if isinstance(s, TensorScaler) and sub.startswith(start)
        }
        layers.append(LayerTaps(len(layers), prefix or name, m, fp8))
    return layers


class OutlierMonitor:
    """Statistics, alerts and their records on monitored steps (see the module docstring)."""

    def __init__(
        self,
        cfg: MonitorConfig,
        model: nn.Module,
        run_dir: Path,
        resume_step: int = 0,
        write: bool = True,
        reduce_max: Callable[[torch.Tensor], None] | None = None,
    ):
        self.cfg = cfg
        self.layers = find_layers(model)
        self.reduce_max = reduce_max
        self.spikes = SpikeRule(cfg.alert_factor, cfg.median_window, cfg.min_history)
        self.capturing = False
        self.alerts: list[Alert] = []  # the alerts of the last monitored step
        # Per layer: "g" until up_proj's output arrives, then "stats"; cleared in place, never replaced (see above)
        self._slots: list[dict] = [{} for _ in self.layers]
        self.slot_key = f"_fp8train_monitor_slot_{id(self)}"  # the attribute holding it: one per monitor
        self._handles = self._hooks()
        path = Path(run_dir) / OUTLIERS_FILE
        if resume_step:
            self._replay(path, resume_step)
        self.file = JsonLines(path, resume_step) if write else None
        if not self.layers:
            # its FP8 tensors too are found through the SwiGLU layers (find_layers): none of them is recorded either
            log.warning(
                "monitor: the model has no SwiGLU MLP (gate_proj, up_proj, down_proj), the layers the monitor "
                "watches: it records no statistics, h or FP8; set monitor.enabled=false for this model"
            )

    def is_monitored(self, step: int) -> bool:
        """Step 1 and every interval-th step (steps count from 1: the step being trained)."""
        return step == 1 or step % self.cfg.interval == 0

    # ------------------------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def capture(self, step: int, micro_step: int = 0) -> Iterator[bool]:
        """Around the forward and backward of micro-batch ``micro_step`` of ``step``. On a monitored step the FP8
        statistics count every micro-batch (counts summed, amaxes and ratios maxed over them; they start from zero
        at micro-batch 0) and the hooks measure the first one. Yields whether the hooks measure. Under torch.compile
        the hooks and counters are traced into a graph of their own (compiled once, at the first monitored step: see
        the module docstring); with grad_accum_steps > 1 the later micro-batches, counters without hooks, take one
        more."""
        if not self.is_monitored(step):
            yield False
            return
        first = micro_step == 0
        scalers = self._scalers()
        if first:
            self._clear_slots()
            for s in scalers:
                s.pop_stats_tensor()  # start from zero (a capture interrupted by an exception may have left counts)
        for s in scalers:
            s.track_stats = True
        self.capturing = first
        try:
            yield first
        finally:
            self.capturing = False
            for s in scalers:
                s.track_stats = False
            for slot in self._slots:
                slot.pop("g", None)

    def _scalers(self) -> list[TensorScaler]:
        return list(dict.fromkeys(s for layer in self.layers for s in layer.fp8.values()))

    def _clear_slots(self) -> None:
        for slot in self._slots:
            slot.clear()

    def _hooks(self) -> list[torch.utils.hooks.RemovableHandle]:
        handles = []
        for layer, slot in zip(self.layers, self._slots):
            gate, up, down = _mlp_linears(layer)
            for m in (gate, up, down):
                m.__dict__[self.slot_key] = slot  # a plain attribute: not a buffer, not in the state dict
            handles.append(gate.register_forward_hook(self._keep_g))
            handles.append(up.register_forward_hook(self._measure_h))
            handles.append(down.register_forward_pre_hook(self._measure_down_input))
        return handles

    def _keep_g(self, module, args, g):
        if self.capturing:
            module.__dict__[self.slot_key].setdefault("g", g.detach())

    def _measure_h(self, module, args, u):
        """Every variant computes g before u: at up_proj's output both are known, and h can be measured."""
        if not self.capturing:
            return
        slot = module.__dict__[self.slot_key]
        g = slot.pop("g", None)
        if "stats" in slot or g is None:  # a recomputed forward: keep the first
            return
        with torch.no_grad(), torch.autocast(u.device.type, enabled=False):
            h = stats.h_from(g, u)  # (M, F) fp32, freed when the hook returns
            slot["stats"] = {
                **stats.h_stats(h, self.cfg.top_k),
                "u_amax": u.detach().abs().amax().float(),
                "g_amax": g.abs().amax().float(),
            }

    def _measure_down_input(self, module, args):
        if not self.capturing:
            return
        entry = module.__dict__[self.slot_key].get("stats")
        if entry is not None and "down_in_amax" not in entry:
            entry["down_in_amax"] = args[0].detach().abs().amax().float()

    # ------------------------------------------------------------------------------------------------------------
    def collect(self, step: int, logger: RunLogger | None = None) -> list[Alert]:
        """After the optimizer step of ``step``: read the statistics (one device sync), alert, write, log.

        Does nothing on steps that are not monitored. Returns this step's alerts (also kept in ``self.alerts``).
        """
        self.alerts = []
        if not self.is_monitored(step):
            return []
        records = self._records()
        self.alerts = self._check(step, records)
        for a in self.alerts:
            log.warning("step %d: outlier alert: %s", step, a.message)
            if logger is not None:
                # wandb sends one alert per title a minute: a title per tensor, so that one tensor's alert never
                # hides another's (a gradient's, the down projection input's) of the same step or layer
                logger.alert(f"fp8train: {a.kind} in layer {a.layer} {a.tensor}", f"step {step}: {a.message}")
        if self.file is not None:
            self.file.write({"step": step, "layers": records, "alerts": [a.to_json() for a in self.alerts]})
        if logger is not None:
            logger.log_wandb(wandb_metrics(records, len(self.alerts)), step)
        log.info("step %d: outliers: %s", step, one_line(records))
        self._clear_slots()
        return self.alerts

    def _records(self) -> list[dict]:
        """Per layer, the statistics as Python numbers (one device sync for the whole model)."""
        tree = []
        for layer, slot in zip(self.layers, self._slots):
            entry = dict(slot.get("stats", {}))
            w_up, w_gate = layer.mlp.up_proj.weight, layer.mlp.gate_proj.weight
            if w_up.shape == w_gate.shape and w_up.dim() == 2 and w_up.numel():  # ZeRO-3 shards: no alignment
                entry.update(stats.alignment(w_up, w_gate, self.cfg.top_k))
            popped = {s: s.pop_stats_tensor() for s in dict.fromkeys(layer.fp8.values())}  # shared: popped once
            entry["fp8"] = {name: popped[s] for name, s in layer.fp8.items()}
            tree.append(entry)
        self._reduce(tree)
        host = stats.to_host(tree)
        return [_record(layer.index, entry) for layer, entry in zip(self.layers, host)]

    def _reduce(self, tree: list[dict]) -> None:
        """Max-reduce the amaxes and FP8 figures (min-reduce the scales) over data-parallel ranks, in place, in one
        collective."""
        if self.reduce_max is None:
            return
        slots = [(e, k) for e in tree for k in _REDUCED if k in e]
        fp8 = [(e["fp8"], name) for e in tree for name in e["fp8"]]
        parts = [e[k].reshape(1).float() for e, k in slots]
        if fp8:
            stats = torch.stack([d[n] for d, n in fp8]).float()  # (tensors, STAT_NAMES)
            stats[:, _SCALE] *= -1  # the max of -scale is minus the smallest scale
            parts.append(stats.flatten())
        if not parts:
            return
        flat = torch.cat(parts)
        # A max that skips NaN (gloo's all-reduce keeps rank 0's number over rank 1's NaN) would hide a diverging
        # rank: NaN travels as inf, with a flag per value that brings it back, in the same collective.
        nan = flat.isnan()
        both = torch.cat([torch.where(nan, math.inf, flat), nan.float()])
        self.reduce_max(both)
        flat = torch.where(both[len(flat) :] > 0, math.nan, both[: len(flat)])
        for (e, k), value in zip(slots, flat[: len(slots)].unbind()):
            e[k] = value
        if fp8:
            stats = flat[len(slots) :].view(len(fp8), -1).clone()
            stats[:, _SCALE] *= -1
            for (d, n), values in zip(fp8, stats.unbind()):
                d[n] = values

    def _check(self, step: int, records: list[dict]) -> list[Alert]:
        alerts = []
        taps = {layer.index: layer.fp8 for layer in self.layers}
        for r in records:
            i = r["layer"]
            alerted = set()  # a scaler shared by linears of one input (q/k/v, gate/up) overflows once, not per name
            if "h_amax" in r:
                amax = r["h_amax"]
                fires, median = self.spikes.check(f"layer_{i}/h_amax", amax)
                r["h_amax_vs_median"] = amax / median if median else None
                if fires:
                    kind = "amax_spike" if math.isfinite(amax) else "non_finite"
                    if kind == "non_finite":
                        times = ", not finite" + (f" (running median {median:.4g})" if median is not None else "")
                    elif median:
                        times = f" = {amax / median:.1f}x its running median {median:.4g}"
                    else:  # a layer whose h was all zeros until now
                        times = f", its running median {median:.4g}"
                    alerts.append(
                        Alert(step, i, "h", kind, amax, median or math.nan, f"layer {i} h amax {amax:.4g}{times}")
                    )
            for name, s in r["fp8"].items():
                scaler = taps[i].get(name)
                if scaler in alerted or not overflowed(s, self.cfg.overflow_ratio):
                    continue
                alerted.add(scaler)
                same = [n for n, other in taps[i].items() if other is scaler and n != name]
                tensor = f"{name} (= {', '.join(same)})" if same else name
                saturated = f"{100 * s['saturated_frac']:.3g}% of elements saturated"
                if math.isfinite(s["amax"]):
                    kind, what = "fp8_overflow", f"FP8 overflow, amax {s['amax_ratio']:.3g}x what its scale assumed"
                else:  # an inf or NaN in the tensor: no overflow of its scale, a step gone non-finite (as h's)
                    kind, what = "non_finite", f"amax {s['amax']:.4g}, not finite"
                alerts.append(
                    Alert(
                        step,
                        i,
                        name,
                        kind,
                        s["amax_ratio"],
                        s["saturated_frac"],
                        f"layer {i} {tensor}: {what}, {saturated}",
                    )
                )
        # Early training grows every amax many-fold; its values still enter the running medians above. A value that
        # is not finite is no growth: it alerts at any step.
        if step > self.cfg.alerts_after:
            return alerts
        return [a for a in alerts if not math.isfinite(a.value)]

    def _replay(self, path: Path, resume_step: int) -> None:
        """A resumed run continues the running medians from the monitored steps it keeps (those <= resume_step).
        Rank 0 reads them for every rank: ranks with other histories would alert, and with monitor.on_alert=stop or
        checkpoint stop or save (a collective), on other steps."""

        def read() -> list[tuple[str, float]]:
            return [
                (f"layer_{r['layer']}/h_amax", r["h_amax"])
                for row in read_to_resume(path)
                if is_record(row) and row["step"] <= resume_step
                for r in row["layers"]
                if isinstance(r.get("h_amax"), (int, float))
            ]

        for key, value in on_rank0(read):
            self.spikes.record(key, value)

    # ------------------------------------------------------------------------------------------------------------
    @property
    def checkpoint_requested(self) -> bool:
        """monitor.on_alert=checkpoint and the step just collected raised an alert."""
        return bool(self.alerts) and self.cfg.on_alert == OnAlert.checkpoint

    @property
    def stop_reason(self) -> str | None:
        """Why to stop after the step just collected (monitor.on_alert=stop and an alert), else None."""
        if self.alerts and self.cfg.on_alert == OnAlert.stop:
            return f"monitor.on_alert=stop: {self.alerts[0].message}"
        return None

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        for layer in self.layers:
            for m in _mlp_linears(layer):
                m.__dict__.pop(self.slot_key, None)
        if self.file is not None:
            self.file.close()
            self.file = None


class DisabledMonitor:
    """monitor.enabled=false: the same interface, doing nothing."""

    capturing = False
    alerts: list[Alert] = []
    checkpoint_requested = False
    stop_reason = None

    def is_monitored(self, step: int) -> bool:
        return False

    @contextlib.contextmanager
    def capture(self, step: int, micro_step: int = 0) -> Iterator[bool]:
        yield False

    def collect(self, step: int, logger: RunLogger | None = None) -> list[Alert]:
        return []

    def close(self) -> None:
        pass


def build_monitor(
    cfg: MonitorConfig,
    model: nn.Module,
    run_dir: Path,
    resume_step: int = 0,
    write: bool = True,
    reduce_max: Callable[[torch.Tensor], None] | None = None,
) -> OutlierMonitor | DisabledMonitor:
    """The monitor of monitor.enabled; only the main rank should ``write`` outliers.jsonl."""
    if not cfg.enabled:
        path = Path(run_dir) / OUTLIERS_FILE
        if write and path.exists():
            # The records after the checkpoint (all of them when a run starts over from step 0) belong to the
            # abandoned trajectory: drop them as an enabled monitor would, or they would be read as the new run's.
            JsonLines(path, resume_step).close()
        return DisabledMonitor()
    return OutlierMonitor(cfg, model, run_dir, resume_step, write, reduce_max)


# ----------------------------------------------------------------------------------------------------------------
def _record(index: int, entry: dict) -> dict:
    """One layer's line in outliers.jsonl: channel and neuron indices as ints, FP8 statistics by name."""
    r = {"layer": index}
    for k, v in entry.items():
        if k == "top_channels":
            r[k] = [[int(ch), amax] for ch, amax in v]
        elif k == "aligned_neurons":
            r[k] = [[int(j), cos, up, gate] for j, cos, up, gate in v]
        elif k == "fp8":
            r[k] = {name: dict(zip(STAT_NAMES, values)) for name, values in v.items()}
        else:
            r[k] = v
    return r


# Per-layer scalars sent to wandb; the per-tensor FP8 detail stays in outliers.jsonl, except for the down
# projection's input (the tensor Smooth-SwiGLU is about) and each layer's worst tensor.
WANDB_KEYS = (
    "h_amax",
    "h_rms",
    "h_amax_over_rms",
    "h_kurtosis",
    "h_amax_vs_median",
    "u_amax",
    "g_amax",
    "down_in_amax",
    "cos_mean_abs",
    "cos_max_abs",
    "cos_frac_above_half",
)


def nan_largest(v: float) -> tuple[bool, float]:
    """A key for max() that puts NaN above every number: max() alone keeps a NaN only when it comes first."""
    return math.isnan(v), v


def worst(values) -> float:
    """The largest of some FP8 statistics, NaN if one is NaN: a tensor that met a NaN is the worst off (as for the
    overflow rule), whatever the order of the tensors."""
    return max(values, key=nan_largest)


def wandb_metrics(records: list[dict], n_alerts: int) -> dict:
    """``outliers/layer_{i}/...`` scalars of one monitored step."""
    out: dict[str, float] = {"outliers/alerts": n_alerts}
    for r in records:
        base = f"outliers/layer_{r['layer']}"
        out.update({f"{base}/{k}": r[k] for k in WANDB_KEYS if isinstance(r.get(k), (int, float))})
        fp8 = r.get("fp8", {})
        if fp8:
            for stat in ("saturated_frac", "underflow_frac", "amax_ratio"):
                out[f"{base}/fp8_{stat}_max"] = worst(s[stat] for s in fp8.values())
            for stat, value in fp8.get("mlp.down_proj.input", {}).items():
                out[f"{base}/down_proj_input/{stat}"] = value
    return out


def one_line(records: list[dict]) -> str:
    """The console summary of one monitored step: the layer with the largest h amax, the most aligned neuron,
    the FP8 tensors that saturated."""
    parts = []
    with_h = [r for r in records if isinstance(r.get("h_amax"), (int, float))]
    if with_h:
        w = max(with_h, key=lambda r: nan_largest(r["h_amax"]))  # a NaN layer is the news, whatever its place
        parts.append(f"largest h amax {w['h_amax']:.4g} (layer {w['layer']}, kurtosis {w['h_kurtosis']:.3g})")
    with_cos = [r for r in records if "cos_max_abs" in r]
    if with_cos:
        most = max(with_cos, key=lambda r: nan_largest(r["cos_max_abs"]))
        parts.append(f"max |cos(W_up, W_gate)| {most['cos_max_abs']:.3f} (layer {most['layer']})")
    n_fp8 = sum(len(r.get("fp8", {})) for r in records)
    if n_fp8:
        saturated = sum(1 for r in records for s in r["fp8"].values() if s["saturated_frac"] > 0)
        # Per operand of each linear: q/k/v (and gate/up) read one input through one shared scaler, counted per linear.
        parts.append(f"{saturated} of {n_fp8} FP8 linear operands saturated")
    return "; ".join(parts) or "no statistics"
