"""``fp8train report RUN_DIR``: heatmaps and a text summary of a run's outliers.jsonl.

Files written (default: RUN_DIR/report/):
- ``h_amax.png``: amax of the SwiGLU down-projection input h, layers x monitored steps, log colour scale;
- ``alignment.png``: max |cos(W_up[j], W_gate[j])| over the neurons j of each layer, layers x steps;
- ``fp8_overflow.png``: per layer and step, the largest % of saturated elements and the largest
  amax_now / amax_assumed over the layer's FP8 tensors (> 1: the tensor overflowed the scale it was given);
- ``worst_layers.png``: h amax and the down projection's actual input amax of the layers with the largest h, over
  steps, alerts marked;
- ``summary.txt``: what :func:`report` prints.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from pathlib import Path

from fp8train.cli import writing_into
from fp8train.config import first_line
from fp8train.errors import Fp8trainError

# not from fp8train.monitor: it imports torch
from fp8train.loggers import OUTLIERS_FILE, is_number, is_record, read_jsonl

FILES = ("h_amax.png", "alignment.png", "fp8_overflow.png", "worst_layers.png", "summary.txt")
WORST = 4  # layers drawn in worst_layers.png
# Columns of a heatmap at most: fewer than the narrowest one has pixels (a panel of fp8_overflow.png, ~230).
COLUMNS = 200
ALERT_COLOR = "red"  # of the crosses that mark alerts in worst_layers.png
LAYER_LABELS = 8  # about as many layer labels on a heatmap's side (the shortest panels are ~170 pixels tall)
NON_FINITE_COLOR = "magenta"  # of heatmap cells holding an inf or NaN: in none of the colour maps used


@dataclass
class Outliers:
    """outliers.jsonl as step x layer tables (NaN where a value is missing)."""

    steps: list[int]
    layers: list[int]
    rows: list[dict]  # the lines of outliers.jsonl, one per monitored step
    skipped: int = 0  # lines of the file that are objects but no per-step record (hand edits, another tool's)

    @classmethod
    def load(cls, run_dir: Path) -> Outliers:
        path = Path(run_dir) / OUTLIERS_FILE
        try:
            lines = read_jsonl(path, numbers=True)
        except (OSError, UnicodeDecodeError) as e:
            raise Fp8trainError(
                f"{path} cannot be read ({first_line(e)}); report on a run directory whose outliers.jsonl train.py "
                f"wrote."
            ) from None
        records = [r for r in lines if is_record(r)]
        rows = [r for r in records if r["layers"]]  # a line of no layer: nothing to draw
        if not rows:
            if not path.exists():
                what = "does not exist"
            elif not path.read_text().strip():
                what = "is empty"
            else:
                what = 'has no per-layer statistics records (lines with a "step" and a list of "layers")'
            raise Fp8trainError(
                f"{path} {what}: no outlier statistics to report. The monitor writes it during training with "
                f"monitor=default (or monitor.enabled=true); check that RUN_DIR is a run directory of such a run."
            )
        rows = list({r["step"]: r for r in rows}.values())  # one line per step (the last, should a step repeat)
        rows.sort(key=lambda r: r["step"])
        layers = sorted({entry["layer"] for r in rows for entry in r["layers"]})
        return cls([r["step"] for r in rows], layers, rows, len(lines) - len(records))

    def table(self, value) -> list[list[float]]:
        """[layer][step] of ``value(layer_entry)`` (a number or None)."""
        out = [[math.nan] * len(self.steps) for _ in self.layers]
        where = {layer: i for i, layer in enumerate(self.layers)}
        for j, r in enumerate(self.rows):
            for entry in r["layers"]:
                out[where[entry["layer"]]][j] = _value(value(entry))
        return out

    def field(self, key: str) -> list[list[float]]:
        return self.table(lambda e: e.get(key))

    def non_finite(self, key: str) -> list[list[bool]]:
        """[layer][step]: whether ``key`` is an inf or NaN there (a NaN of ``field`` may also be no value at all)."""
        return [[v == 1.0 for v in row] for row in self.table(lambda e: float(_not_finite(e.get(key))))]

    @property
    def fp8_groups(self) -> list[str]:
        """The groups of FP8 tensors (GROUP_NAMES, in its order) this run has."""
        return [g for g in GROUP_NAMES if (FP8_DRAWN[0], g) in self._fp8_tables]

    def fp8_table(self, stat: str, group: str) -> list[list[float]]:
        """[layer][step] of the largest ``stat`` over the layer's FP8 tensors of ``group`` (NaN if one is NaN, as
        for :func:`fp8train.monitor.monitor.worst`; NaN where the layer has none)."""
        table = self._fp8_tables.get((stat, group))
        if table is None:
            return [[math.nan] * len(self.steps) for _ in self.layers]
        return [[math.nan if v is None else float(v) for v in row] for row in table]

    def fp8_non_finite(self, stat: str, group: str) -> list[list[bool]]:
        """[layer][step]: whether fp8_table(stat, group) is an inf or NaN there (rather than no value)."""
        table = self._fp8_tables.get((stat, group)) or [[None] * len(self.steps) for _ in self.layers]
        return [[_not_finite(v) for v in row] for row in table]

    @functools.cached_property
    def _fp8_tables(self) -> dict[tuple[str, str], list[list]]:
        """fp8_table of every (stat, group) drawn, None where there is no value, in one pass: a long run's file
        holds millions of FP8 tensor records, and a pass over them for each of the 8 tables took seconds."""
        tables: dict[tuple[str, str], list[list]] = {}
        where = {layer: i for i, layer in enumerate(self.layers)}
        for j, r in enumerate(self.rows):
            for entry in r["layers"]:
                i = where[entry["layer"]]
                for name, s in entry.get("fp8", {}).items():
                    group = tensor_group(name)
                    for stat in FP8_DRAWN:
                        table = tables.get((stat, group))
                        if table is None:
                            table = tables[stat, group] = [[None] * len(self.steps) for _ in self.layers]
                        v = s.get(stat)
                        if not isinstance(v, (int, float)):
                            continue
                        old = table[i][j]
                        # worst(): the largest, a NaN above every number, the first of equals
                        if old is None or v > old or (v != v and old == old):
                            table[i][j] = v
        return tables

    @property
    def alerts(self) -> list[dict]:
        return [a for r in self.rows for a in r.get("alerts", [])]


def _ticks(n: int, about: int) -> list[int]:
    """About ``about`` evenly spaced positions of ``n``, the first and the last included; none of the others so close
    to the last that their labels would print over each other."""
    last, stride = n - 1, max(1, n // about)
    return [t for t in range(0, last, stride) if t == 0 or last - t >= stride / 2] + [last]


def _value(v) -> float:
    """A statistic of a record as a float; NaN for no value (absent, or the null, text or bool of a hand edit:
    is_record() checks a line's structure, not its values)."""
    return float(v) if is_number(v) else math.nan


def _first(pairs):
    """The first index of a list of [index, value] pairs (top_channels, aligned_neurons); None if there is none."""
    ok = isinstance(pairs, list) and pairs and isinstance(pairs[0], list) and pairs[0]
    return pairs[0][0] if ok else None


def _not_finite(v) -> bool:
    """An inf or NaN number (rather than no value at all)."""
    return isinstance(v, (int, float)) and not math.isfinite(v)


def _nan_last(v) -> float:
    """A key for max(): NaN (and anything not a number) below every number, rather than wherever it happens to be."""
    return v if isinstance(v, (int, float)) and not math.isnan(v) else -math.inf


def report(run_dir: Path, out: Path) -> str:
    """Write the PNGs and summary.txt into ``out``; return the summary."""
    data = Outliers.load(run_dir)
    text = summary(data, run_dir)
    with writing_into(out, "report"):
        out.mkdir(parents=True, exist_ok=True)
        (out / "summary.txt").write_text(text + "\n")
        draw(data, out, no_fp8_text(run_dir))
    return text


# ----------------------------------------------------------------------------------------------------------------
def _finite(values) -> list[float]:
    return [v for v in values if isinstance(v, (int, float)) and math.isfinite(v)]


def summary(data: Outliers, run_dir: Path) -> str:
    """A few lines: the largest outlier, growth per layer, alignment, FP8 overflow, alerts."""
    steps, first, last = data.steps, data.rows[0], data.rows[-1]
    lines = [
        f"{run_dir}: {len(steps)} monitored steps ({steps[0]}..{steps[-1]}), {len(data.layers)} layers"
        + _precision(run_dir)
    ]
    if data.skipped:
        n, many = data.skipped, data.skipped > 1
        lines.append(
            f"skipped {n} line{'s' * many} of {OUTLIERS_FILE} that {'are' if many else 'is'} no per-step record"
        )
    h = data.field("h_amax")
    # an h amax that overflowed to inf is the largest of all; only NaN (nothing measured) is left out
    peaks = [(v, data.layers[i], steps[j]) for i, row in enumerate(h) for j, v in enumerate(row) if not math.isnan(v)]
    if peaks:
        v, layer, step = max(peaks)
        entry = _entry(data.rows[steps.index(step)], layer)
        ratio, kurtosis = (_value(entry.get(k, 0)) for k in ("h_amax_over_rms", "h_kurtosis"))
        lines.append(
            f"largest h amax: {v:.4g} in layer {layer} at step {step} (amax/RMS {ratio:.3g}, "
            f"kurtosis {kurtosis:.3g}, top channel {_first(entry.get('top_channels'))})"
        )
        growth = []
        for i, layer in enumerate(data.layers if len(steps) > 1 else []):
            known = [j for j, v in enumerate(h[i]) if math.isfinite(v)]  # a layer may lack values at some steps
            nonzero = [j for j in known if h[i][j] > 0]  # growth from an all-zero h has no ratio: start after it
            if nonzero and nonzero[0] < known[-1]:  # two steps to compare
                a, b = nonzero[0], known[-1]
                span = "" if (a, b) == (0, len(steps) - 1) else f" (step {steps[a]} -> {steps[b]})"
                growth.append(f"layer {layer} x{h[i][b] / h[i][a]:.3g}{span}")
        if len(steps) == 1:
            lines.append(f"h amax growth: one monitored step ({steps[0]}), nothing to compare yet")
        else:
            lines.append(
                f"h amax growth, step {steps[0]} -> {steps[-1]}: "
                + (", ".join(growth) or "no layer has two values to compare")
            )
    cos_last = [(_value(e.get("cos_max_abs")), e["layer"], e) for e in last["layers"] if "cos_max_abs" in e]
    if cos_last:
        cos, layer, e = max(cos_last, key=lambda t: _nan_last(t[0]))
        first_cos = max(_finite(e0.get("cos_max_abs") for e0 in first["layers"]), default=math.nan)
        neuron = _first(e.get("aligned_neurons"))
        frac = max(_finite(x.get("cos_frac_above_half") for x in last["layers"]), default=math.nan)
        lines.append(
            f"alignment: max |cos(W_up, W_gate)| {first_cos:.3f} at step {steps[0]} -> {cos:.3f} at step {steps[-1]} "
            f"(layer {layer}, neuron {neuron}); largest fraction of neurons above 0.5: {100 * frac:.2f}%"
        )
    lines += _overflow_lines(data, no_fp8_text(run_dir))
    alerts = data.alerts
    if alerts:
        counts: dict[str, int] = {}
        for a in alerts:
            group = tensor_group(a["tensor"])
            what = f"{a['kind']} ({GROUP_NAMES.get(group, group)})" if a["tensor"] != "h" else a["kind"]
            counts[what] = counts.get(what, 0) + 1
        lines.append(
            f"alerts: {len(alerts)}: {', '.join(f'{n} {k}' for k, n in sorted(counts.items()))}; "
            f"first at step {alerts[0]['step']}: {alerts[0]['message']}"
        )
    else:
        lines.append("alerts: none")
    return "\n".join(lines)


# FP8 tensors are summarised in four groups: the down projection's input (the tensor Smooth-SwiGLU changes), the
# other linears' inputs, the weights and the output gradients.
GROUP_NAMES = {"down_in": "down_proj input", "input": "other inputs", "weight": "weights", "grad": "gradients"}
FP8_DRAWN = ("amax_ratio", "saturated_frac")  # the statistics of fp8_overflow.png


@functools.cache  # called for every FP8 tensor of every line, with the same few dozen names
def tensor_group(name: str) -> str:
    """ "mlp.down_proj.input" -> "down_in"; "self_attn.q_proj.grad" -> "grad"."""
    return "down_in" if name == "mlp.down_proj.input" else name.rsplit(".", 1)[-1]


def _overflow_lines(data: Outliers, no_fp8: str) -> list[str]:
    """Per group of FP8 tensors: at how many (layer, monitored step) pairs some element saturated, and the worst."""
    # group -> its (step, layer) pairs, those of them where some tensor saturated
    pairs: dict[str, tuple[set, set]] = {g: (set(), set()) for g in GROUP_NAMES}
    # group -> (key, amax ratio, saturated fraction, step, layer) of its worst saturated tensor: the largest ratio, a
    # NaN above every number (a tensor that met a NaN, as for worst() and the overflow rule), then the largest fraction
    worst: dict[str, tuple] = {}
    for r in data.rows:
        for e in r["layers"]:
            pair = (r["step"], e["layer"])
            for name, s in e.get("fp8", {}).items():
                group, sat = tensor_group(name), _value(s.get("saturated_frac"))
                found, hit = pairs.setdefault(group, (set(), set()))
                found.add(pair)
                if not sat > 0:
                    continue
                hit.add(pair)
                ratio = _value(s.get("amax_ratio"))
                key = (math.isnan(ratio), 0.0 if math.isnan(ratio) else ratio, sat)
                if group not in worst or key > worst[group][0]:
                    worst[group] = (key, ratio, sat, *pair)
    if not any(found for found, _ in pairs.values()):
        return [f"FP8: {no_fp8}"]
    lines = []
    for group, (found, hit) in pairs.items():
        if not found:
            continue
        line = f"FP8 {GROUP_NAMES.get(group, group)}: saturated at {len(hit)} of {len(found)} (layer, step) pairs"
        if hit:
            _, ratio, sat, step, layer = worst[group]
            line += f"; worst {ratio:.3g}x the amax its scale assumed (layer {layer}, step {step}, {100 * sat:.3g}%)"
        lines.append(line)
    return lines


def _entry(row: dict, layer: int) -> dict:
    return next((e for e in row["layers"] if e["layer"] == layer), {})


def _precision(run_dir: Path) -> str:
    name = _config_value(run_dir, "precision.name")
    return "" if name is None else f", precision {name}"


def no_fp8_text(run_dir: Path) -> str:
    """What a run without FP8 statistics has: no FP8 tensors (bf16), or FP8 tensors the monitor cannot see."""
    if _config_value(run_dir, "precision.recipe") == "fp8" and _config_value(run_dir, "precision.engine") == "te":
        return "no FP8 statistics: precision.engine=te (Transformer Engine's scaling is not monitored)"
    return "no FP8 tensors in this run"


def _config_value(run_dir: Path, key: str):
    """``key`` (e.g. "precision.name") of the run's config.yaml, or None where there is none to read."""
    cfg = Path(run_dir) / "config.yaml"
    if not cfg.is_file():
        return None
    from omegaconf import OmegaConf

    try:
        return OmegaConf.select(OmegaConf.load(cfg), key)
    except Exception:  # a config from another version: the summary does without it
        return None


# ----------------------------------------------------------------------------------------------------------------
def draw(data: Outliers, out: Path, no_fp8: str = "no FP8 tensors in this run") -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only: works on machines without a display
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap, LogNorm, TwoSlopeNorm

    # More monitored steps than a heatmap has pixel columns: drawn one column per step, most steps would get no pixel
    # and a one-step spike, what the heatmaps are for, could vanish. Each column is then the largest of its steps.
    width = math.ceil(len(data.steps) / COLUMNS)
    columns = [range(j, min(j + width, len(data.steps))) for j in range(0, len(data.steps), width)]
    xlabel = "monitored step" + (f" (each column the largest of {width})" if width > 1 else "")

    def heatmap(ax, table, title, label, non_finite, norm=None, cmap="viridis", vmin=None, vmax=None):
        table = [
            [max((row[j] for j in c if not math.isnan(row[j])), default=math.nan) for c in columns] for row in table
        ]
        img = ax.imshow(
            table, aspect="auto", origin="lower", interpolation="nearest", cmap=cmap, norm=norm, vmin=vmin, vmax=vmax
        )
        # An inf or NaN has no colour on the scale: matplotlib leaves its cell blank, white, the colour coolwarm gives
        # an amax ratio of 1 (no overflow). Those cells, the news of a diverging run, get a colour of their own.
        non_finite = [[any(row[j] for j in c) for c in columns] for row in non_finite]
        note = ""
        if any(map(any, non_finite)):
            cells = [[1.0 if bad else math.nan for bad in row] for row in non_finite]
            only = ListedColormap([NON_FINITE_COLOR])
            ax.imshow(cells, aspect="auto", origin="lower", interpolation="nearest", cmap=only)
            note = f"; {NON_FINITE_COLOR}: inf or NaN"
        ax.set(title=title, xlabel=xlabel + note, ylabel="layer")
        ticks, last = _ticks(len(columns), 5), len(columns) - 1  # the last column ends at its last step
        ax.set_xticks(ticks, [str(data.steps[columns[t][-1 if t == last else 0]]) for t in ticks])
        # Rows too: a label per layer printed the 32 of a Llama-7B over each other.
        rows = _ticks(len(data.layers), LAYER_LABELS)
        ax.set_yticks(rows, [str(data.layers[i]) for i in rows])
        plt.colorbar(img, ax=ax, label=label)

    def save(fig, name):
        fig.tight_layout()
        fig.savefig(out / name, dpi=90)
        plt.close(fig)

    h = data.field("h_amax")
    positive = [v for row in h for v in row if math.isfinite(v) and v > 0]
    fig, ax = plt.subplots(figsize=(8, 3.6))
    norm = LogNorm(vmin=min(positive), vmax=max(positive)) if positive else None
    title = "amax of h = silu(g) * u (down-projection input, plain SwiGLU)"
    heatmap(ax, h, title, "amax (log scale)", data.non_finite("h_amax"), norm=norm)
    save(fig, "h_amax.png")

    fig, (ax_max, ax_frac) = plt.subplots(1, 2, figsize=(13, 3.6))
    cos_max, title = data.field("cos_max_abs"), "max |cos(W_up[j], W_gate[j])| over neurons j"
    heatmap(ax_max, cos_max, title, "|cos|", data.non_finite("cos_max_abs"), vmin=0, vmax=1)
    frac = [[100 * v for v in row] for row in data.field("cos_frac_above_half")]
    top_frac = max(_finite(v for row in frac for v in row), default=0.0) or 100.0  # all zero: 0 to 100%, not +-0.1
    title, bad = "neurons with |cos(W_up[j], W_gate[j])| > 0.5", data.non_finite("cos_frac_above_half")
    heatmap(ax_frac, frac, title, "% of neurons", bad, vmin=0, vmax=top_frac)
    save(fig, "alignment.png")

    groups = data.fp8_groups
    # at least two panels wide, as wide as the title (a bf16 run gets one panel, saying it has no FP8 tensor)
    fig, axes = plt.subplots(2, max(1, len(groups)), figsize=(4.2 * max(2, len(groups)), 6.4), squeeze=False)
    for col, group in enumerate(groups):
        ratio = data.fp8_table("amax_ratio", group)
        top = max(_finite(v for row in ratio for v in row), default=1.0)
        centred = TwoSlopeNorm(vmin=0.0, vcenter=1.0, vmax=max(2.0, top))  # white at 1, red: overflow
        title, bad = f"{GROUP_NAMES[group]}: amax ratio", data.fp8_non_finite("amax_ratio", group)
        heatmap(axes[0][col], ratio, title, "amax_now / amax_assumed", bad, centred, "coolwarm")
        sat = [[100 * v for v in row] for row in data.fp8_table("saturated_frac", group)]
        top_sat = max(max(_finite(v for row in sat for v in row), default=0.0), 1e-3)  # all zero: black, not grey
        title, bad = f"{GROUP_NAMES[group]}: saturated elements", data.fp8_non_finite("saturated_frac", group)
        heatmap(axes[1][col], sat, title, "%", bad, cmap="magma", vmin=0, vmax=top_sat)
    if not groups:
        for ax in axes.flat:
            ax.set_axis_off()
        axes[0][0].text(0.5, 0.5, no_fp8, ha="center", va="center")
    fig.suptitle("FP8 overflow per layer and monitored step (worst tensor of each group)")
    save(fig, "fp8_overflow.png")

    save(draw_worst(data, plt), "worst_layers.png")


def draw_worst(data: Outliers, plt):
    """h amax and the down projection's input amax over steps, for the layers with the largest h amax (at most
    WORST of them); steps with an alert in that layer are marked with a red x (on the top edge where the amax is not
    finite)."""
    from matplotlib.colors import to_rgb

    h, down = data.field("h_amax"), data.field("down_in_amax")
    # A layer whose h amax went inf or NaN is among the worst, as in the summary, whatever its values before.
    went_bad = data.non_finite("h_amax")
    peak = {i: (any(went_bad[i]), max(_finite(h[i]), default=-math.inf)) for i in range(len(data.layers))}
    worst = sorted(peak, key=peak.get, reverse=True)[:WORST]
    fig, (ax_h, ax_d) = plt.subplots(1, 2, figsize=(13, 4))
    # The alert crosses are red: the layers take the cycle's other colours (its red, #d62728, would hide them).
    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    colors = [c for c in cycle if math.dist(to_rgb(c), to_rgb(ALERT_COLOR)) > 0.4] or cycle
    marks = {"h": ax_h, "mlp.down_proj.input": ax_d}  # spike alerts on h, overflow alerts on the down input
    alerts = {(a["tensor"], a["layer"], a["step"]) for a in data.alerts}
    for n, i in enumerate(worst):
        layer, style = data.layers[i], {"color": colors[n % len(colors)], "label": f"layer {data.layers[i]}"}
        ax_h.plot(data.steps, h[i], marker=".", **style)
        ax_d.plot(data.steps, down[i], marker=".", **style)
        for (tensor, ax), table in zip(marks.items(), (h, down)):
            hits = [j for j, s in enumerate(data.steps) if (tensor, layer, s) in alerts]
            finite = [j for j in hits if math.isfinite(table[i][j])]
            ax.plot(
                [data.steps[j] for j in finite], [table[i][j] for j in finite], "x", color=ALERT_COLOR, markersize=9
            )
            # a NaN or inf amax has no place on the axis: its alert goes on the panel's top edge
            edge = [data.steps[j] for j in hits if j not in finite]
            if edge:
                top = {"transform": ax.get_xaxis_transform(), "clip_on": False}  # x: step, y: fraction of the panel
                ax.plot(edge, [1.0] * len(edge), "x", color=ALERT_COLOR, markersize=9, **top)
    ax_h.set(title="amax of h = silu(g) * u (x: spike or non-finite alert)", xlabel="step", ylabel="amax")
    ax_d.set(title="amax of down_proj's actual input (x: overflow or non-finite alert)", xlabel="step", ylabel="amax")
    for ax, table in ((ax_h, h), (ax_d, down)):
        # a log scale, but for a panel of no positive amax (an all-zero h): matplotlib warned it cannot be log-scaled
        if any(v > 0 for i in worst for v in _finite(table[i])):
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return fig
