"""fp8train report on hand-written outliers.jsonl files: what its figures show. (The summary's tests are in
tests/unit/test_monitor.py, beside the monitor that writes the file.)"""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from fp8train.cli.report import report
from tests.helpers import saved_figures
from tests.unit.test_monitor import layer_record, write_outliers

VIRIDIS_TOP = (253, 231, 37)  # the colour of a heatmap's largest value


def heatmap_pixels(figure, ax, png) -> np.ndarray:
    """The RGB pixels of ``ax``'s image in the saved ``png`` of ``figure``, top row first."""
    image = np.asarray(Image.open(png).convert("RGB")).astype(int)
    scale = image.shape[1] / figure.bbox.width  # savefig's dpi over the figure's
    box = ax.get_window_extent()
    top, bottom = round(image.shape[0] - box.y1 * scale), round(image.shape[0] - box.y0 * scale)
    return image[top + 2 : bottom - 2, round(box.x0 * scale) + 2 : round(box.x1 * scale) - 2]


def test_a_one_step_spike_shows_in_a_heatmap_of_more_steps_than_pixels(tmp_path, monkeypatch):
    # A long run monitors more steps than a heatmap is pixels wide (h_amax.png: ~530 columns; each panel of
    # fp8_overflow.png: ~230, fewer than the 401 monitored steps of experiment=outlier_stress). Drawn as it was, about
    # half of 1000 steps had no column in h_amax.png: a layer's one-step h amax spike, the thing to look for, could be
    # missing from the picture.
    n_layers = 8
    rows = [{"step": s, "layers": [layer_record(i, 1.0) for i in range(n_layers)], "alerts": []} for s in range(1000)]
    for layer in range(n_layers):  # one spike per layer, each at another step
        rows[101 + 97 * layer]["layers"][layer] = layer_record(layer, 1000.0)
    write_outliers(tmp_path, rows)
    figures = saved_figures(monkeypatch)
    report(tmp_path, tmp_path / "report")
    fig = figures["h_amax.png"]
    pixels = heatmap_pixels(fig, next(a for a in fig.axes if a.images), tmp_path / "report" / "h_amax.png")
    spike = (np.abs(pixels - VIRIDIS_TOP).sum(axis=-1) < 40).any(axis=1)  # per pixel row
    band = len(pixels) / n_layers
    shown = [spike[round((n_layers - 1 - layer + 0.5) * band)] for layer in range(n_layers)]  # layer 0 at the bottom
    assert all(shown), shown


def test_a_heatmaps_step_labels_end_at_the_last_step_and_do_not_overlap(tmp_path, monkeypatch):
    # 401 monitored steps (experiment=outlier_stress) in columns of 3: a label every 27 columns and one for the last
    # column, 1 column after the previous label, printed both labels over each other.
    rows = [{"step": s, "layers": [layer_record(0, 1.0)], "alerts": []} for s in [1, *range(10, 4001, 10)]]
    write_outliers(tmp_path, rows)
    figures = saved_figures(monkeypatch)
    report(tmp_path, tmp_path / "report")
    ax = next(a for a in figures["h_amax.png"].axes if a.images)
    ticks, labels = list(ax.get_xticks()), [t.get_text() for t in ax.get_xticklabels()]
    assert labels[0] == "1" and labels[-1] == "4000"
    columns = ax.images[0].get_array().shape[1]
    assert min(b - a for a, b in zip(ticks, ticks[1:])) >= columns / 10


def test_fp8_tables_and_overflow_summary_match_a_direct_count(tmp_path):
    # The tables of fp8_overflow.png and the summary's FP8 lines are taken in one pass over every FP8 tensor record
    # (a long run's file holds millions): checked against the plain definition, one (layer, step, group) at a time,
    # on records with NaN, inf, ties, layers missing at some steps and a repeated step (the later line counts).
    import math
    import random

    from fp8train.cli.report import FP8_DRAWN, GROUP_NAMES, Outliers, summary, tensor_group
    from fp8train.monitor.monitor import worst

    rng = random.Random(0)
    names = ["self_attn.q_proj.input", "self_attn.o_proj.grad", "mlp.up_proj.weight", "mlp.down_proj.input"]
    names += ["mlp.down_proj.grad", "mlp.gate_proj.input"]

    def value():
        return rng.choice([0.0, 0.5, 2.0, 2.0, math.nan, math.inf, rng.random()])

    def layer(i):
        fp8 = {
            n: {"amax": 1.0, "scale": 2.0, "saturated_frac": value(), "underflow_frac": 0.0, "amax_ratio": value()}
            for n in rng.sample(names, 4)
        }
        return layer_record(i, rng.random(), fp8=fp8)

    rows = [{"step": s, "layers": [layer(i) for i in range(3) if rng.random() < 0.8], "alerts": []} for s in range(9)]
    rows.append({"step": 4, "layers": [layer(0), layer(2)], "alerts": []})
    write_outliers(tmp_path, rows)
    data = Outliers.load(tmp_path)
    by_step = {r["step"]: r for r in rows}  # the last line of a step
    for stat in FP8_DRAWN:
        for group in GROUP_NAMES:
            table = data.fp8_table(stat, group)
            for i, layer_index in enumerate(data.layers):
                for j, step in enumerate(data.steps):
                    entries = [e for e in by_step[step]["layers"] if e["layer"] == layer_index]
                    values = [s[stat] for e in entries for n, s in e["fp8"].items() if tensor_group(n) == group]
                    want = worst(values) if values else math.nan
                    assert table[i][j] == want or (math.isnan(want) and math.isnan(table[i][j])), (stat, group, i, j)
    text = summary(data, tmp_path)
    for group, label in GROUP_NAMES.items():
        tensors = [
            (step, e["layer"], s)
            for step, r in by_step.items()
            for e in r["layers"]
            for n, s in e["fp8"].items()
            if tensor_group(n) == group
        ]
        hit = {(step, layer) for step, layer, s in tensors if s["saturated_frac"] > 0}
        assert f"FP8 {label}: saturated at {len(hit)} of {len({t[:2] for t in tensors})} (layer, step) pairs" in text


def test_heatmap_cells_of_an_inf_or_nan_have_a_colour_of_their_own(tmp_path, monkeypatch):
    # matplotlib leaves an inf or NaN cell blank: white, which the amax-ratio map (coolwarm, centred on 1) gives to
    # "no overflow". A tensor whose amax ratio went inf or NaN, the step a report is read for, read as a healthy one.
    import math

    from fp8train.cli.report import NON_FINITE_COLOR

    rows = [{"step": s, "layers": [layer_record(0, 1.0), layer_record(1, 1.0)], "alerts": []} for s in (1, 2, 3)]
    rows[2]["layers"] = [layer_record(0, math.inf, ratio=math.inf, saturated=0.5), layer_record(1, 1.0, math.nan)]
    write_outliers(tmp_path, rows)
    figures = saved_figures(monkeypatch)
    report(tmp_path, tmp_path / "report")
    ratio_ax, sat_ax = (ax for ax in figures["fp8_overflow.png"].axes if ax.images)
    values, cells = (image.get_array() for image in ratio_ax.images)  # the map, then the inf/NaN cells over it
    assert values.mask.tolist() == [[False, False, True], [False, False, True]]  # blank where not finite
    assert (~cells.mask).tolist() == values.mask.tolist()  # ... and coloured there
    assert NON_FINITE_COLOR in ratio_ax.get_xlabel() and len(sat_ax.images) == 1  # nothing to colour there
    h_ax = next(ax for ax in figures["h_amax.png"].axes if ax.images)
    assert (~h_ax.images[1].get_array().mask).tolist() == [[False, False, True], [False, False, False]]


def test_a_heatmap_of_32_layers_labels_a_few_of_them(tmp_path, monkeypatch):
    # A label per layer: the 32 layers of a Llama-7B (the paper's model) printed their numbers over each other in
    # ~170 pixels of panel.
    rows = [{"step": s, "layers": [layer_record(i, 1.0 + i) for i in range(32)], "alerts": []} for s in (1, 2)]
    write_outliers(tmp_path, rows)
    figures = saved_figures(monkeypatch)
    report(tmp_path, tmp_path / "report")
    for name in ("h_amax.png", "fp8_overflow.png"):
        for ax in (a for a in figures[name].axes if a.images):
            labels = [t.get_text() for t in ax.get_yticklabels()]
            assert labels[0] == "0" and labels[-1] == "31" and len(labels) <= 9, labels


DROP = object()  # a key _edited() removes


def _edited(**changes) -> dict:
    """A line of outliers.jsonl as a hand edit leaves it: layer 1's record of step 2 with ``changes`` applied."""
    row = {"step": 2, "layers": [layer_record(1, 5.0, ratio=3.0, saturated=0.1)], "alerts": []}
    alert = {"step": 2, "layer": 1, "tensor": "h", "kind": "spike", "value": 5.0, "saturated_frac": 0.0}
    row["alerts"] = [{**alert, "message": "layer 1 h spike"}]
    for key, value in changes.items():
        where, _, key = key.rpartition("__")
        target = {"": row, "layer": row["layers"][0], "fp8": row["layers"][0]["fp8"]["mlp.down_proj.input"]}
        target = row["alerts"][0] if where == "alert" else target[where]
        target[key] = value
        if value is DROP:
            del target[key]
    return row


@pytest.mark.parametrize(
    "line, skipped",
    [
        ({"step": 2, "layers": [7], "alerts": []}, True),  # a layer that is not an object
        (_edited(step=True), True),  # a bool is no step
        (_edited(layer__layer=True), True),
        (_edited(alerts=None), True),
        (_edited(alerts=[{"step": 2}]), True),  # an alert without tensor, kind, layer, message
        (_edited(alerts=["spike"]), True),
        (_edited(layer__fp8=[1, 2]), True),
        (_edited(layer__fp8={"mlp.down_proj.input": 0.5}), True),
        (_edited(fp8__saturated_frac=DROP), False),  # values the report reads as no value
        (_edited(fp8__saturated_frac=None), False),
        (_edited(fp8__amax_ratio="big"), False),
        (_edited(layer__h_amax_over_rms="10"), False),
        (_edited(layer__h_kurtosis=None), False),
        (_edited(layer__top_channels=[5]), False),
        (_edited(layer__cos_max_abs="high", layer__aligned_neurons=7), False),
        (_edited(alert__tensor="attn.q"), False),  # a tensor of no group the report knows
    ],
)
def test_a_hand_edited_line_is_skipped_or_read_without_a_traceback(tmp_path, line, skipped):
    # is_record() accepted these lines, and the summary ended in a KeyError, TypeError, AttributeError or ValueError.
    from fp8train.cli.report import Outliers, summary

    write_outliers(tmp_path, [{"step": 1, "layers": [layer_record(0, 1.0), layer_record(1, 1.0)], "alerts": []}])
    with (tmp_path / "outliers.jsonl").open("a") as f:
        f.write(json.dumps(line) + "\n")
    data = Outliers.load(tmp_path)
    text = summary(data, tmp_path)
    assert data._fp8_tables  # what fp8_overflow.png draws, taken
    if skipped:
        assert data.steps == [1] and "skipped 1 line of outliers.jsonl that is no per-step record" in text
    else:
        assert data.steps == [1, 2] and "skipped" not in text


def test_worst_layers_of_an_all_zero_h_draws_without_a_warning(tmp_path, recwarn):
    # A zero-initialised down projection (or a hand-made file) gives h amax 0 at every step: the log y axis printed
    # matplotlib's "Data has no positive values, and therefore cannot be log-scaled".
    import matplotlib.pyplot as plt

    from fp8train.cli.report import Outliers, draw_worst

    rows = [{"step": s, "layers": [layer_record(0, 0.0, down_in_amax=0.0)], "alerts": []} for s in (1, 2)]
    rows.append({"step": 3, "layers": [layer_record(0, 0.0, down_in_amax=2.0)], "alerts": []})
    write_outliers(tmp_path, rows)
    fig = draw_worst(Outliers.load(tmp_path), plt)
    fig.savefig(tmp_path / "worst.png")
    plt.close(fig)
    assert [ax.get_yscale() for ax in fig.axes if ax.get_lines()] == ["linear", "log"]
    assert not [str(w.message) for w in recwarn]
