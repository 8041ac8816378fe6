"""The outlier monitor: each statistic against a direct float64 computation on planted tensors, the alert rules,
the hooks on a model, and the trainer's on_alert actions."""

from __future__ import annotations

import json
import math
import random
import statistics
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fp8train.config import MonitorConfig, OnAlert, compose
from fp8train.fp8.formats import E4M3, fp8_max
from fp8train.fp8.linear import Fp8Linear
from fp8train.fp8.scaling import ScalingConfig, fp8_scalers, step_scalers
from fp8train.loggers import read_jsonl
from fp8train.model.mlp import SwiGLU
from fp8train.monitor import OUTLIERS_FILE, Alert, DisabledMonitor, OutlierMonitor, build_monitor, stats
from fp8train.monitor.alerts import SpikeRule, overflowed
from fp8train.precision import share_input_scalers
from fp8train.precision.smooth_swiglu import SmoothSwiGLUToken
from tests.helpers import SMALL, damage_jsonl, on_two_ranks, saved_figures

# ---------------------------------------------------------------------------------------------------------------
# statistics


def test_kurtosis_of_known_distributions():
    signs = torch.tensor([1.0, -1.0]).repeat(5000)
    assert stats.kurtosis(signs).item() == pytest.approx(1.0, abs=1e-6)  # the smallest kurtosis there is
    g = torch.Generator().manual_seed(0)
    assert stats.kurtosis(torch.randn(400_000, generator=g)).item() == pytest.approx(3.0, abs=0.03)
    assert stats.kurtosis(torch.rand(400_000, generator=g)).item() == pytest.approx(1.8, abs=0.01)  # uniform
    # One value a among n - 1 zeros (a scaled Bernoulli(1/n)): kurtosis n^2 / (n - 1) - 3, whatever a is.
    spike = torch.zeros(1000)
    spike[123] = 37.0
    assert stats.kurtosis(spike).item() == pytest.approx(1000**2 / 999 - 3, rel=1e-4)
    assert stats.kurtosis(torch.full((10,), 2.0)).item() == 0.0  # no variance: reported as 0, not NaN


def test_h_stats_match_a_float64_computation_and_find_the_planted_channel():
    g = torch.Generator().manual_seed(1)
    h = torch.randn(512, 96, generator=g)
    h[:, 17] *= 40.0  # a planted outlier channel
    h[300, 55] = -25.0  # a single large value: the second channel by amax
    s = stats.to_host(stats.h_stats(h, top_k=3))
    ref = h.double()
    rms = ref.square().mean().sqrt().item()
    centred = ref - ref.mean()
    kurt = (centred**4).mean().item() / (centred**2).mean().item() ** 2
    assert s["h_amax"] == pytest.approx(ref.abs().max().item(), rel=1e-6)
    assert s["h_rms"] == pytest.approx(rms, rel=1e-5)
    assert s["h_amax_over_rms"] == pytest.approx(ref.abs().max().item() / rms, rel=1e-5)
    assert s["h_kurtosis"] == pytest.approx(kurt, rel=1e-4)
    channels = [int(c) for c, _ in s["top_channels"]]
    assert channels[:2] == [17, 55]
    assert s["top_channels"][0][1] == pytest.approx(ref[:, 17].abs().max().item(), rel=1e-6)
    assert s["top_channels"][1][1] == pytest.approx(25.0)


@pytest.mark.parametrize("magnitude", [1e-12, 1e12, 1e30])
def test_h_stats_stay_exact_for_huge_and_tiny_h(magnitude):
    # A diverging run is when the statistics matter most: h of 1e12 has a 4th power beyond fp32's range (and of
    # 1e30 a square), h of 1e-12 a 4th power below it. RMS, amax / RMS and kurtosis must still be h's own.
    g = torch.Generator().manual_seed(3)
    h = torch.randn(256, 64, generator=g)
    h[17, 5] = 30.0
    h = h * magnitude
    s = stats.to_host(stats.h_stats(h, top_k=1))
    ref = h.double()
    rms = ref.square().mean().sqrt().item()
    centred = ref - ref.mean()
    kurt = ((centred**4).mean() / (centred**2).mean() ** 2).item()
    assert s["h_amax"] == pytest.approx(ref.abs().max().item(), rel=1e-6)
    assert s["h_rms"] == pytest.approx(rms, rel=1e-5)
    assert s["h_amax_over_rms"] == pytest.approx(ref.abs().max().item() / rms, rel=1e-5)
    assert s["h_kurtosis"] == pytest.approx(kurt, rel=1e-4)


def test_h_is_silu_of_g_times_u_flattened_over_tokens():
    g, u = torch.randn(2, 5, 8, dtype=torch.bfloat16), torch.randn(2, 5, 8, dtype=torch.bfloat16)
    h = stats.h_from(g, u)
    assert h.shape == (10, 8) and h.dtype == torch.float32
    torch.testing.assert_close(h, (F.silu(g.double()) * u.double()).reshape(10, 8).float(), rtol=1e-6, atol=1e-7)


def test_alignment_finds_the_planted_aligned_neuron_and_its_norms():
    g = torch.Generator().manual_seed(2)
    w_up, w_gate = torch.randn(64, 32, generator=g), torch.randn(64, 32, generator=g)
    w_gate[5] = -3.0 * w_up[5]  # neuron 5: W_gate = -3 W_up, cos = -1
    w_gate[9] = w_up[9] + 0.5 * torch.randn(32, generator=g)  # neuron 9: partly aligned
    s = stats.to_host(stats.alignment(w_up, w_gate, top_k=2))
    cos = F.cosine_similarity(w_up.double(), w_gate.double(), dim=1)
    assert s["cos_max_abs"] == pytest.approx(1.0, abs=1e-6)
    assert s["cos_mean_abs"] == pytest.approx(cos.abs().mean().item(), rel=1e-5)
    assert s["cos_frac_above_half"] == pytest.approx((cos.abs() > 0.5).double().mean().item())
    (j, c, up_norm, gate_norm), (j2, c2, _, _) = s["aligned_neurons"]
    assert (int(j), int(j2)) == (5, 9)
    assert c == pytest.approx(-1.0, abs=1e-6) and c2 == pytest.approx(cos[9].item(), rel=1e-5)
    assert up_norm == pytest.approx(w_up[5].norm().item(), rel=1e-6)
    assert gate_norm == pytest.approx(3.0 * w_up[5].norm().item(), rel=1e-6)
    assert s["w_up_norm_mean"] == pytest.approx(w_up.double().norm(dim=1).mean().item(), rel=1e-5)


def test_to_host_keeps_the_structure():
    tree = [{"a": torch.tensor(1.5), "b": {"c": torch.tensor([[1.0, 2.0], [3.0, 4.0]])}, "d": "text"}]
    assert stats.to_host(tree) == [{"a": 1.5, "b": {"c": [[1.0, 2.0], [3.0, 4.0]]}, "d": "text"}]


# ---------------------------------------------------------------------------------------------------------------
# alert rules


def test_spike_rule_fires_on_a_planted_spike_and_not_on_noise():
    rule = SpikeRule(factor=4.0, window=20, min_history=3)
    rng = random.Random(0)
    # 500 monitored steps of a slowly growing amax with +-30% noise: delayed scaling's ordinary weather.
    values = [(1 + step / 100) * math.exp(rng.gauss(0, 0.3)) for step in range(500)]
    fired = [rule.check("h", v)[0] for v in values]
    assert not any(fired)
    level = 6.0  # the amax at the end of that drift
    fires, median = rule.check("h", 10 * level)
    # The bar is the median of the last 20 values (a mean would be pulled up by every spike it keeps).
    assert fires and median == statistics.median(values[-20:]) and median == pytest.approx(level, rel=0.2)
    fires, after = rule.check("h", level)
    assert not fires and after == statistics.median(values[-19:] + [10 * level])
    assert after == pytest.approx(median, rel=0.1)  # one spike does not raise the bar: the median stays put
    assert rule.check("h", math.inf)[0] and rule.check("h", math.nan)[0]  # non-finite always fires


def test_spike_rule_needs_history_first_and_keys_are_independent():
    rule = SpikeRule(factor=2.0, window=5, min_history=3)
    assert [rule.check("a", v)[0] for v in (1.0, 100.0, 1.0)] == [False, False, False]  # fewer than 3 known
    assert rule.check("a", 3.0)[0]  # median of (1, 100, 1) is 1
    assert not rule.check("b", 50.0)[0]  # another layer has its own history


def test_overflow_rule():
    assert overflowed({"saturated_frac": 1e-4, "amax_ratio": 3.0}, min_ratio=2.0)
    assert not overflowed({"saturated_frac": 1e-4, "amax_ratio": 1.5}, min_ratio=2.0)
    assert not overflowed({"saturated_frac": 0.0, "amax_ratio": 0.9}, min_ratio=1.0)
    assert overflowed({"saturated_frac": 1e-4, "amax_ratio": math.inf}, min_ratio=2.0)
    assert overflowed({"saturated_frac": 0.0, "amax_ratio": math.nan}, min_ratio=2.0)  # a NaN is never saturated


# ---------------------------------------------------------------------------------------------------------------
# the monitor on a model


class Block(nn.Module):
    def __init__(self, mlp: nn.Module):
        super().__init__()
        self.mlp = mlp

    def forward(self, x):
        return self.mlp(x)


class TwoLayers(nn.Module):
    """Two SwiGLU MLPs named like a Llama's (layers.{i}.mlp), applied to the same input."""

    def __init__(self, mlps: list[nn.Module]):
        super().__init__()
        self.layers = nn.ModuleList(Block(m) for m in mlps)

    def forward(self, x):
        return sum(layer(x) for layer in self.layers)


def planted_mlp(d: int = 32, ffn: int = 64, seed: int = 0) -> SwiGLU:
    """A SwiGLU whose neuron 3 has W_gate[3] = W_up[3], with an FP8 down projection under delayed scaling."""
    torch.manual_seed(seed)
    mlp = SwiGLU(d, ffn)
    with torch.no_grad():
        mlp.gate_proj.weight[3] = mlp.up_proj.weight[3]
    scaling = ScalingConfig(recipe="delayed", amax_history_len=4, amax_compute_algo="max")
    mlp.down_proj = Fp8Linear.from_linear(mlp.down_proj, scaling=scaling)
    return mlp


def settle_delayed_scales(model, seed: int, steps: int = 4) -> None:
    """A few steps of ordinary inputs, so the delayed scales are those of outlier-free history."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for _ in range(steps):
            model(torch.randn(64, 32))
            step_scalers(model)


def monitor_for(model, tmp_path, **overrides) -> OutlierMonitor:
    cfg = MonitorConfig(enabled=True, interval=10, alerts_after=0, **overrides)
    return build_monitor(cfg, model, tmp_path)


def test_layers_and_fp8_tensors_are_found_by_name(tmp_path):
    model = TwoLayers([planted_mlp(seed=0), SmoothSwiGLUToken(planted_mlp(seed=1))])
    mon = monitor_for(model, tmp_path)
    assert [(t.index, t.name) for t in mon.layers] == [(0, "layers.0"), (1, "layers.1")]
    assert sorted(mon.layers[0].fp8) == ["mlp.down_proj.grad", "mlp.down_proj.input", "mlp.down_proj.weight"]
    assert isinstance(build_monitor(MonitorConfig(enabled=False), model, tmp_path), DisabledMonitor)


def test_a_model_without_swiglu_is_warned_that_nothing_is_recorded(tmp_path, caplog):
    # The warning said "only FP8 statistics", but FP8 scalers are found through the SwiGLU layers: none were recorded.
    model = nn.Sequential(Fp8Linear.from_linear(nn.Linear(32, 32), scaling=ScalingConfig(recipe="delayed")))
    with caplog.at_level("WARNING", logger="fp8train"):
        mon = monitor_for(model, tmp_path)
    with mon.capture(1):
        model(torch.randn(8, 32)).sum().backward()
    mon.collect(1)
    mon.close()
    assert read_jsonl(tmp_path / OUTLIERS_FILE) == [{"step": 1, "layers": [], "alerts": []}]
    assert "no SwiGLU MLP" in caplog.text and "records no statistics" in caplog.text
    assert "only FP8" not in caplog.text


def test_only_monitored_steps_measure_and_count(tmp_path):
    mlp = planted_mlp()
    model = TwoLayers([mlp])
    mon = monitor_for(model, tmp_path)
    assert [s for s in range(1, 31) if mon.is_monitored(s)] == [1, 10, 20, 30]
    # One hook per tapped module, registered once (a compiled model keeps calling the same ones), idle when not
    # capturing: a forward outside a capture measures nothing and counts nothing.
    assert len(mlp.down_proj._forward_pre_hooks) == len(mlp.up_proj._forward_hooks) == 1
    with mon.capture(7) as on:
        assert not on and not mon.capturing and not mlp.down_proj.input_scaler.track_stats
        model(torch.randn(8, 32))
    assert mon._slots == [{}] and mlp.down_proj.input_scaler.n_elements.item() == 0
    with mon.capture(10, micro_step=1) as on:  # a later micro-batch of a monitored step: FP8 counts, no hooks
        assert not on and not mon.capturing and mlp.down_proj.input_scaler.track_stats
        model(torch.randn(8, 32))
    assert mon._slots == [{}] and mlp.down_proj.input_scaler.n_elements.item() == 8 * 64
    with mon.capture(10) as on:
        assert on and mon.capturing and mlp.down_proj.input_scaler.track_stats
        model(torch.randn(8, 32))
    assert list(mon._slots[0]) == ["stats"] and "down_in_amax" in mon._slots[0]["stats"]
    assert not any(s.track_stats for s in fp8_scalers(model))
    assert len(mlp.down_proj._forward_pre_hooks) == 1  # the same hooks, for the next monitored step
    mon.close()
    assert not mlp.down_proj._forward_pre_hooks and not mlp.up_proj._forward_hooks
    mon = monitor_for(model, tmp_path)
    assert mon.collect(7) == [] and not (tmp_path / OUTLIERS_FILE).read_text()  # nothing on other steps


def test_records_match_direct_computation_and_a_saturating_spike_alerts(tmp_path):
    mlp = planted_mlp()
    model = TwoLayers([mlp])
    mon = monitor_for(model, tmp_path, top_k=2, overflow_ratio=2.0)
    torch.manual_seed(5)
    with torch.no_grad():
        for _ in range(4):  # ordinary inputs: the delayed scale settles on their amax
            model(torch.randn(64, 32))
            step_scalers(model)
    x = torch.randn(64, 32)
    x[10] = 12.0 * mlp.up_proj.weight[3] / mlp.up_proj.weight[3].norm()  # an outlier along the aligned neuron
    scale_before = mlp.down_proj.input_scaler.scale.item()
    with mon.capture(10):
        model(x).square().sum().backward()
    step_scalers(model)
    alerts = mon.collect(10)
    row = json.loads((tmp_path / OUTLIERS_FILE).read_text())
    (r,) = row["layers"]
    with torch.no_grad():
        g, u = mlp.gate_proj(x).double(), mlp.up_proj(x).double()
    h = F.silu(g) * u
    assert row["step"] == 10 and r["layer"] == 0
    assert r["h_amax"] == pytest.approx(h.abs().max().item(), rel=1e-6)
    assert r["u_amax"] == pytest.approx(u.abs().max().item(), rel=1e-6)
    assert r["down_in_amax"] == pytest.approx(h.abs().max().item(), rel=1e-6)  # plain SwiGLU: h itself
    assert r["top_channels"][0][0] == 3  # the aligned neuron carries the quadratic outlier
    assert r["aligned_neurons"][0][:2] == [3, pytest.approx(1.0)]
    fp8 = r["fp8"]["mlp.down_proj.input"]
    sat = ((h * scale_before).abs() > fp8_max(E4M3, "ocp")).double().mean().item()
    assert fp8["scale"] == scale_before and fp8["saturated_frac"] == pytest.approx(sat) and sat > 0
    assert fp8["amax_ratio"] == pytest.approx(h.abs().max().item() * scale_before / 448, rel=1e-5)
    assert fp8["amax_ratio"] > 2
    assert r["fp8"]["mlp.down_proj.grad"]["amax"] > 0  # the backward of the captured micro-batch was counted
    overflow = [a for a in alerts if a.kind == "fp8_overflow"]
    assert [(a.layer, a.tensor) for a in overflow] == [(0, "mlp.down_proj.input")]
    assert row["alerts"] == [a.to_json() for a in alerts]
    assert "layer 0 mlp.down_proj.input: FP8 overflow" in overflow[0].message


def test_fp8_statistics_cover_every_micro_batch_of_a_monitored_step(tmp_path):
    # With gradient accumulation an overflow can happen in any micro-batch: the FP8 figures of a monitored step sum
    # the counts of all its micro-batches and take the largest amax and ratio. The hook statistics (h, u, g) stay
    # those of the first micro-batch.
    mlp = planted_mlp()
    model = TwoLayers([mlp])
    mon = monitor_for(model, tmp_path, overflow_ratio=2.0)
    settle_delayed_scales(model, seed=6)
    ordinary, spiked = torch.randn(64, 32), torch.randn(48, 32)
    spiked[7] = 12.0 * mlp.up_proj.weight[3] / mlp.up_proj.weight[3].norm()  # the outlier is in the second only
    scale = mlp.down_proj.input_scaler.scale.item()
    grads = []
    mlp.down_proj.register_full_backward_hook(lambda m, gin, gout: grads.append(gout[0].detach().double()))
    for micro_step, x in enumerate((ordinary, spiked)):
        with mon.capture(10, micro_step=micro_step) as hooked:
            assert hooked == (micro_step == 0)
            model(x).square().sum().backward()
    step_scalers(model)
    alerts = mon.collect(10)
    (r,) = json.loads((tmp_path / OUTLIERS_FILE).read_text())["layers"]
    with torch.no_grad():
        hs = [F.silu(mlp.gate_proj(x).double()) * mlp.up_proj(x).double() for x in (ordinary, spiked)]
    fp8 = r["fp8"]["mlp.down_proj.input"]
    saturated = sum(((h * scale).abs() > 464).sum().item() for h in hs)  # beyond E4M3's max 448 + half an ulp
    assert saturated > 0 and fp8["saturated_frac"] == pytest.approx(saturated / sum(h.numel() for h in hs))
    assert fp8["amax"] == pytest.approx(hs[1].abs().max().item(), rel=1e-6)
    assert fp8["amax_ratio"] == pytest.approx(hs[1].abs().max().item() * scale / 448, rel=1e-5)
    assert r["fp8"]["mlp.down_proj.grad"]["amax"] == pytest.approx(max(g.abs().max().item() for g in grads), rel=1e-6)
    assert r["h_amax"] == pytest.approx(hs[0].abs().max().item(), rel=1e-6)  # the hooks: first micro-batch
    assert [(a.kind, a.tensor) for a in alerts] == [("fp8_overflow", "mlp.down_proj.input")]
    assert not any(s.track_stats for s in fp8_scalers(model)) and not mon.capturing


def test_statistics_never_make_a_float64_tensor(tmp_path):
    # Gaudi has no float64: a monitored step there must not create one on the device, from the statistics taken
    # during the step to the one transfer that reads them.
    from torch.utils._python_dispatch import TorchDispatchMode

    class Dtypes(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            self.seen |= {t.dtype for t in torch.utils._pytree.tree_leaves(out) if torch.is_tensor(t)}
            return out

    model = TwoLayers([planted_mlp(seed=0), SmoothSwiGLUToken(planted_mlp(seed=1))])
    mon = monitor_for(model, tmp_path)
    with Dtypes() as mode:
        with mon.capture(10):
            model(torch.randn(16, 32)).square().sum().backward()
        step_scalers(model)
        (r0, r1) = mon._records()
    assert torch.float32 in mode.seen and torch.float64 not in mode.seen, mode.seen
    assert r0["h_amax"] > 0 and r1["fp8"]["mlp.down_proj.input"]["scale"] > 0


def test_a_shared_input_scaler_that_overflows_alerts_once(tmp_path):
    # gate_proj and up_proj read one tensor and share its scaler (fp8train/precision): the records list it under
    # both names, but one overflow of that tensor is one alert, naming both.
    mlp = planted_mlp()
    scaling = ScalingConfig(recipe="delayed", amax_history_len=4, amax_compute_algo="max")
    mlp.gate_proj = Fp8Linear.from_linear(mlp.gate_proj, scaling=scaling)
    mlp.up_proj = Fp8Linear.from_linear(mlp.up_proj, scaling=scaling)
    assert share_input_scalers(mlp) == {("gate_proj", "up_proj")}
    model = TwoLayers([mlp])
    mon = monitor_for(model, tmp_path, overflow_ratio=2.0)
    settle_delayed_scales(model, seed=5)
    x = torch.randn(64, 32)
    x[7] *= 10.0  # one token 10x larger: the MLP's input overflows its scale
    with mon.capture(10):
        model(x).square().sum().backward()
    alerts = mon.collect(10)
    (r,) = json.loads((tmp_path / OUTLIERS_FILE).read_text())["layers"]
    assert r["fp8"]["mlp.gate_proj.input"] == r["fp8"]["mlp.up_proj.input"]
    assert r["fp8"]["mlp.gate_proj.input"]["amax_ratio"] > 2
    inputs = [a for a in alerts if a.kind == "fp8_overflow" and a.tensor.endswith("_proj.input")]
    assert [a.tensor for a in inputs if "gate" in a.tensor or "up" in a.tensor] == ["mlp.gate_proj.input"]
    assert "layer 0 mlp.gate_proj.input (= mlp.up_proj.input): FP8 overflow" in inputs[0].message


def test_a_step_that_went_non_finite_alerts_in_words(tmp_path):
    # A diverging step's statistics are inf/NaN: its alerts say "not finite", not "nanx its running median".
    mlp = planted_mlp()
    model = TwoLayers([mlp])
    mon = monitor_for(model, tmp_path, min_history=1)
    torch.manual_seed(5)
    for step in (10, 20):  # a running median to compare with
        with mon.capture(step):
            model(torch.randn(64, 32))
        step_scalers(model)
        assert mon.collect(step) == []
    x = torch.randn(64, 32)
    x[3, 0] = math.inf
    with mon.capture(30):
        model(x)
    # An FP8 tensor that met the NaN or inf is as non-finite as h: no overflow of its scale (kind and words).
    alerts = {a.tensor: a for a in mon.collect(30)}
    assert sorted(alerts) == ["h", "mlp.down_proj.input"] and {a.kind for a in alerts.values()} == {"non_finite"}
    spike, down = alerts["h"], alerts["mlp.down_proj.input"]
    assert math.isnan(spike.value) and spike.reference > 0
    assert spike.message == f"layer 0 h amax nan, not finite (running median {spike.reference:.4g})"
    assert not math.isfinite(down.value)
    saturated = f"{100 * down.reference:.3g}% of elements saturated"
    assert down.message == f"layer 0 mlp.down_proj.input: amax nan, not finite, {saturated}"
    # A layer whose h was all zeros so far has a running median of 0: any amax is a spike, named without a ratio.
    mon.spikes.history["layer_0/h_amax"].extend([0.0] * 3)
    with mon.capture(40):
        model(torch.randn(64, 32))
    (spike,) = [a for a in mon.collect(40) if a.kind == "amax_spike"]
    assert spike.message == f"layer 0 h amax {spike.value:.4g}, its running median 0"


def test_a_non_finite_step_alerts_before_alerts_after_too(tmp_path):
    # monitor.alerts_after holds back the growth alerts of early training; a NaN or inf is no growth, and a run that
    # goes non-finite at step 20 must say so as one that does at step 200 does.
    model = TwoLayers([planted_mlp()])
    mon = build_monitor(MonitorConfig(enabled=True, interval=10, alerts_after=100), model, tmp_path)
    settle_delayed_scales(model, seed=5)
    with mon.capture(10):
        model(torch.randn(64, 32) * 10.0)  # a finite 10x jump: an overflow, held back until step 100
    assert mon.collect(10) == []
    (r,) = json.loads((tmp_path / OUTLIERS_FILE).read_text())["layers"]
    assert r["fp8"]["mlp.down_proj.input"]["amax_ratio"] > 2
    x = torch.randn(64, 32)
    x[3, 0] = math.inf
    with mon.capture(20):
        model(x)
    alerts = mon.collect(20)
    assert [(a.kind, a.tensor) for a in alerts] == [("non_finite", "h"), ("non_finite", "mlp.down_proj.input")]
    assert all(not math.isfinite(a.value) for a in alerts)
    row = json.loads((tmp_path / OUTLIERS_FILE).read_text().splitlines()[-1])
    assert [a["kind"] for a in row["alerts"]] == [a.kind for a in alerts]
    mon.close()


def test_an_fp8_tensor_with_a_nan_alerts(tmp_path):
    # A NaN is not saturated (the count of elements beyond the format's max skips it), so a gradient that met a NaN
    # in a backward whose forward stayed finite had saturated_frac 0 and raised no alert, its amax and ratio NaN.
    model = TwoLayers([planted_mlp()])
    mon = monitor_for(model, tmp_path)
    settle_delayed_scales(model, seed=5)
    with mon.capture(10):
        y = model(torch.randn(64, 32))
        grad = torch.ones_like(y)
        grad[5, 2] = math.nan
        y.backward(grad)
    (alert,) = mon.collect(10)
    assert (alert.kind, alert.tensor) == ("non_finite", "mlp.down_proj.grad") and math.isnan(alert.value)
    assert alert.message == "layer 0 mlp.down_proj.grad: amax nan, not finite, 0% of elements saturated"
    mon.close()


def monitors_of_two_ranks(tmp_path, combine):
    """Monitors of rank 1 and rank 0 of a simulated reduction over ranks: rank 1's collect sends its values, rank 0's
    takes ``combine`` of its own and those."""
    cfg = MonitorConfig(enabled=True, interval=10, alerts_after=0)
    sent = {}

    def send(flat):
        sent["flat"] = flat.clone()

    def receive(flat):
        flat.copy_(combine(flat, sent["flat"]))

    (tmp_path / "1").mkdir(), (tmp_path / "0").mkdir()
    rank1 = build_monitor(cfg, TwoLayers([planted_mlp()]), tmp_path / "1", reduce_max=send)
    rank0 = build_monitor(cfg, TwoLayers([planted_mlp()]), tmp_path / "0", reduce_max=receive)
    return rank1, rank0


def test_a_nan_on_another_rank_survives_the_max_over_ranks(tmp_path):
    # Under data parallelism the amaxes are max-reduced over the ranks. A max that skips NaN (gloo's all-reduce
    # does, for a NaN on rank 1 and a number on rank 0; fmax too) gave every rank rank 0's finite values: no alert.
    rank1, rank0 = monitors_of_two_ranks(tmp_path, torch.fmax)
    torch.manual_seed(5)
    x = torch.randn(64, 32)
    nan_x = x.clone()
    nan_x[3, 0] = math.nan  # rank 1's batch
    for mon, inputs in ((rank1, nan_x), (rank0, x)):  # rank 1 sends its values first, rank 0 takes the max
        with mon.capture(10):
            mon.layers[0].mlp(inputs).square().sum().backward()
        alerts = mon.collect(10)
        assert [(a.kind, a.tensor) for a in alerts] == [
            ("non_finite", "h"),
            ("non_finite", "mlp.down_proj.input"),
            ("non_finite", "mlp.down_proj.grad"),
        ]
        assert all(math.isnan(a.value) for a in alerts)
        mon.close()
    (row,) = read_jsonl(tmp_path / "0" / OUTLIERS_FILE)
    assert row["layers"][0]["h_amax"] == "nan" and row["layers"][0]["fp8"]["mlp.down_proj.input"]["amax"] == "nan"


def test_the_recorded_scale_is_that_of_the_rank_with_the_largest_amax(tmp_path):
    # Where ranks scale from their own amax (step 1, before a delayed history; current scaling; the per-channel
    # variant's rescaled weight) their scales differ. The record paired the largest amax over ranks with rank 0's
    # scale: amax * scale / fp8_max read 4x (an overflow of the scale) where every rank's amax_ratio was 1.
    rank1, rank0 = monitors_of_two_ranks(tmp_path, torch.maximum)
    torch.manual_seed(5)
    x = torch.randn(64, 32)
    scales = {}
    for mon, inputs in ((rank1, 4 * x), (rank0, x)):  # step 1: each rank scales from its own amax
        with mon.capture(1):
            mon.layers[0].mlp(inputs).square().sum().backward()
        scales[mon] = mon.layers[0].fp8["mlp.down_proj.input"].stat_scale.item()
        assert mon.collect(1) == []
        mon.close()
    assert scales[rank1] < scales[rank0] / 2
    (row,) = read_jsonl(tmp_path / "0" / OUTLIERS_FILE)
    stat = row["layers"][0]["fp8"]["mlp.down_proj.input"]
    assert stat["scale"] == scales[rank1]
    assert stat["amax"] * stat["scale"] / fp8_max(E4M3) == pytest.approx(stat["amax_ratio"], rel=1e-6)


@pytest.mark.parametrize("nan_first", [True, False])
def test_a_layers_worst_fp8_tensor_does_not_depend_on_the_order_of_its_tensors(tmp_path, nan_first):
    # A tensor that met a NaN (a diverging step) has amax_ratio NaN: max() over the layer's tensors returned NaN or
    # the other tensors' worst depending on which came first. Non-finite is the worst, as the overflow rule has it.
    from fp8train.cli.report import Outliers
    from fp8train.monitor.monitor import wandb_metrics

    stat = {"amax": 1.0, "scale": 1.0, "saturated_frac": 1e-3, "underflow_frac": 0.0}
    tensors = [("self_attn.o_proj.input", math.nan), ("mlp.down_proj.input", 3.0)]
    fp8 = {name: {**stat, "amax_ratio": ratio} for name, ratio in (tensors if nan_first else tensors[::-1])}
    metrics = wandb_metrics([{"layer": 0, "fp8": fp8}], 0)
    assert math.isnan(metrics["outliers/layer_0/fp8_amax_ratio_max"])
    assert metrics["outliers/layer_0/down_proj_input/amax_ratio"] == 3.0
    fp8 = {name: {**stat, "amax_ratio": ratio} for name, ratio in (("mlp.up_proj.input", 3.0), ("x.input", math.nan))}
    if nan_first:
        fp8 = dict(reversed(fp8.items()))
    write_outliers(tmp_path, [{"step": 1, "layers": [layer_record(0, 1.0, fp8=fp8)], "alerts": []}])
    assert math.isnan(Outliers.load(tmp_path).fp8_table("amax_ratio", "input")[0][0])


class SentAlerts:
    """A RunLogger stand-in that keeps the wandb alerts it is asked to send."""

    def __init__(self):
        self.titles: list[str] = []

    def alert(self, title: str, text: str) -> None:
        self.titles.append(title)

    def log_wandb(self, metrics: dict, step: int) -> None:
        pass


def test_each_alerting_tensor_has_a_wandb_alert_title_of_its_own(tmp_path):
    # wandb sends one alert per title and wait_duration (a minute): alerts of one step on two tensors of one layer
    # that shared a title left the second (here the down projection's input, after a gradient) unsent.
    model = TwoLayers([planted_mlp()])
    mon = monitor_for(model, tmp_path)
    planted = [
        Alert(10, 0, "mlp.down_proj.grad", "fp8_overflow", 3.0, 1e-4, "layer 0 mlp.down_proj.grad: FP8 overflow"),
        Alert(10, 0, "mlp.down_proj.input", "fp8_overflow", 2.5, 1e-4, "layer 0 mlp.down_proj.input: FP8 overflow"),
        Alert(10, 0, "h", "amax_spike", 9.0, 1.0, "layer 0 h amax 9"),
        Alert(10, 127, "self_attn.q_proj.input", "fp8_overflow", 2.5, 1e-4, "layer 127 ..."),
    ]
    mon._check = lambda step, records: planted
    sent = SentAlerts()
    with mon.capture(10):
        model(torch.randn(8, 32))
    assert mon.collect(10, sent) == planted
    assert len(set(sent.titles)) == len(planted)
    assert "mlp.down_proj.input" in sent.titles[1] and "layer 0" in sent.titles[1]
    assert all(len(t) < 64 for t in sent.titles)  # wandb's limit on a title


def test_smooth_swiglu_down_projection_input_is_the_rescaled_h(tmp_path):
    mlp = planted_mlp()
    model = TwoLayers([SmoothSwiGLUToken(mlp)])
    mon = monitor_for(model, tmp_path)
    x = torch.randn(64, 32)
    x[10] = 12.0 * mlp.up_proj.weight[3] / mlp.up_proj.weight[3].norm()
    with mon.capture(1):
        model(x)
    (r,) = mon._records()
    with torch.no_grad():
        g, u = mlp.gate_proj(x).double(), mlp.up_proj(x).double()
    assert r["h_amax"] == pytest.approx((F.silu(g) * u).abs().max().item(), rel=1e-6)
    smoothed = F.silu(g) * u / u.abs().amax(dim=-1, keepdim=True)
    assert r["down_in_amax"] == pytest.approx(smoothed.abs().max().item(), rel=1e-5)
    assert r["down_in_amax"] < r["h_amax"] / 5


def test_resumed_monitor_continues_its_running_median(tmp_path):
    model = TwoLayers([planted_mlp()])
    lines = [{"step": s, "layers": [{"layer": 0, "h_amax": 1.0}], "alerts": []} for s in (1, 10, 20, 30)]
    (tmp_path / OUTLIERS_FILE).write_text("".join(json.dumps(r) + "\n" for r in lines))
    mon = OutlierMonitor(MonitorConfig(enabled=True, interval=10, min_history=3), model, tmp_path, resume_step=20)
    mon.close()
    assert list(mon.spikes.history["layer_0/h_amax"]) == [1.0, 1.0, 1.0]  # steps 1, 10, 20: the kept ones
    assert [json.loads(x)["step"] for x in (tmp_path / OUTLIERS_FILE).read_text().splitlines()] == [1, 10, 20]


def _replay_on_rank(rank: int, init_file: str, tmp: str, out: str) -> None:
    """One of 2 gloo ranks: build a resumed monitor over this rank's own folder tmp/n<rank>; write what it replayed
    (or the message it stopped with) to out<rank>.json."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        cfg = MonitorConfig(enabled=True, interval=10, min_history=3)
        mon = OutlierMonitor(cfg, TwoLayers([planted_mlp()]), Path(tmp) / f"n{rank}", 20, write=rank == 0)
        mon.close()
        result = {k: list(v) for k, v in mon.spikes.history.items()}
    except Exception as e:
        result = {"error": str(e)}
    finally:
        dist.destroy_process_group()
    Path(f"{out}{rank}.json").write_text(json.dumps(result))


def replay_on_two_ranks(tmp_path, outliers: bytes) -> list[dict]:
    """What each of 2 ranks replays when only rank 0's folder holds outliers.jsonl (as a node-local run dir)."""
    for rank in (0, 1):
        (tmp_path / f"n{rank}").mkdir()
    (tmp_path / "n0" / OUTLIERS_FILE).write_bytes(outliers)
    on_two_ranks(_replay_on_rank, tmp_path, str(tmp_path), str(tmp_path / "out"))
    return [json.loads((tmp_path / f"out{rank}.json").read_text()) for rank in (0, 1)]


def test_every_rank_continues_rank_0s_running_medians(tmp_path):
    """A rank that read no outliers.jsonl on resume started with empty histories: its spike alerts, and with
    monitor.on_alert=stop or checkpoint its decision to stop or save (a collective), differed from rank 0's.
    Rank 0 reads the file and every rank continues the same medians."""
    lines = [{"step": s, "layers": [{"layer": 0, "h_amax": float(s)}], "alerts": []} for s in (1, 10, 20, 30)]
    ranks = replay_on_two_ranks(tmp_path, "".join(json.dumps(r) + "\n" for r in lines).encode())
    assert ranks[0] == ranks[1] == {"layer_0/h_amax": [1.0, 10.0, 20.0]}


def test_an_unreadable_outliers_file_stops_every_rank_with_its_message(tmp_path):
    """Rank 0's message about the file it cannot replay stops the other ranks too, rather than leave them waiting."""
    ranks = replay_on_two_ranks(tmp_path, b"\xff\xfe\x00garbage\n")
    assert "cannot be read" in ranks[0].get("error", "")
    assert ranks[1] == ranks[0]


# ---------------------------------------------------------------------------------------------------------------
# configuration and the trainer's actions


def test_monitor_config_problems_are_named():
    from fp8train.errors import ConfigError

    with pytest.raises(ConfigError) as e:
        compose(["monitor=default", "monitor.interval=0", "monitor.alert_factor=1", "monitor.on_alert=panic"])
    found = "\n".join(e.value.problems)
    assert "monitor.interval=0: must be > 0" in found
    assert "monitor.alert_factor=1.0: must be > 1" in found
    assert "monitor.on_alert=panic: must be one of warn, checkpoint, stop" in found
    assert compose(["monitor=default"]).monitor.on_alert == OnAlert.warn


def planted_alert(trainer, at_step: int):
    """Make the trainer's monitor raise one alert at ``at_step``."""
    real = trainer.monitor._check

    def check(step, records):
        found = real(step, records)
        return [*found, Alert(step, 0, "h", "amax_spike", 9.0, 1.0, "planted")] if step == at_step else found

    trainer.monitor._check = check


@pytest.mark.parametrize("action", ["checkpoint", "stop"])
def test_on_alert_checkpoint_and_stop(tmp_path, action, caplog):
    from fp8train.trainer import Trainer

    overrides = [*SMALL, "precision=fp32", "monitor=default", "monitor.interval=2", f"monitor.on_alert={action}"]
    cfg = compose([*overrides, "trainer.max_steps=6", "trainer.checkpoint_every=0", "trainer.eval_every=0"])
    trainer = Trainer(cfg, tmp_path)
    planted_alert(trainer, at_step=4)
    with caplog.at_level("INFO", logger="fp8train"):
        trainer.fit()
    saved = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    rows = [json.loads(x) for x in (tmp_path / OUTLIERS_FILE).read_text().splitlines()]
    if action == "checkpoint":
        assert trainer.step == 6 and saved == ["step_0000004", "step_0000006"]
        assert [r["step"] for r in rows] == [1, 2, 4, 6]
    else:
        assert trainer.step == 4 and saved == ["step_0000004"]
        assert "monitor.on_alert=stop: planted: stopped after step 4" in caplog.text
    assert rows[2]["alerts"][-1]["message"] == "planted"
    assert "outlier alert: planted" in caplog.text


@pytest.mark.parametrize("precision", ["fp8", "bf16"])
def test_the_monitor_changes_no_loss_gradient_or_weight(tmp_path, precision):
    # Eager runs with and without the monitor are the same to the bit (docs/outliers.md): its hooks and FP8 counters
    # only read. Every step monitored, with accumulation (counters through the later micro-batches, hooks not).
    from fp8train.trainer import Trainer

    runs = []
    for monitor in ("default", "disabled"):
        overrides = [f"precision={precision}", f"monitor={monitor}", "monitor.interval=1", "trainer.grad_accum_steps=2"]
        trainer = Trainer(compose([*SMALL, *overrides, "trainer.micro_batch_size=4"]), tmp_path / monitor)
        grads = []
        optimizer_step = trainer.engine.optimizer_step

        def keep_grads(*args, trainer=trainer, optimizer_step=optimizer_step, grads=grads):
            grads.append([p.grad.clone() for p in trainer.model.parameters() if p.grad is not None])
            return optimizer_step(*args)

        trainer.engine.optimizer_step = keep_grads
        losses = []
        for _ in range(3):
            losses.append(trainer.train_step()[0].item())
            trainer.step += 1
        runs.append((losses, grads, [p.detach().clone() for p in trainer.model.parameters()]))
        trainer.monitor.close()
    (losses, grads, weights), (want_losses, want_grads, want_weights) = runs
    assert losses == want_losses
    assert len(grads) == 3 and len(grads[0]) > 10
    for step_grads, want_step_grads in zip(grads, want_grads):
        assert len(step_grads) == len(want_step_grads)
        assert all(torch.equal(g, w) for g, w in zip(step_grads, want_step_grads))
    assert all(torch.equal(p, w) for p, w in zip(weights, want_weights))
    rows = read_jsonl(tmp_path / "default" / OUTLIERS_FILE)
    assert [r["step"] for r in rows] == [1, 2, 3] and not read_jsonl(tmp_path / "disabled" / OUTLIERS_FILE)
    # without FP8 tensors the FP8 figures are absent, not zeros: in outliers.jsonl, in wandb and on the console
    assert all(bool(layer["fp8"]) == (precision == "fp8") for r in rows for layer in r["layers"])
    from fp8train.monitor.monitor import wandb_metrics

    keys = wandb_metrics(rows[-1]["layers"], 0)
    assert any("fp8_" in k or "down_proj_input" in k for k in keys) == (precision == "fp8")


def test_the_trainer_counts_fp8_statistics_over_all_micro_batches(tmp_path):
    # grad_accum_steps=2: the FP8 amaxes of the monitored step 1 are the largest over both micro-batches, as
    # independent hooks on each down projection see them.
    from fp8train.trainer import Trainer

    cfg = compose([*SMALL, "precision=fp8", "trainer.micro_batch_size=4", "trainer.grad_accum_steps=2"])
    trainer = Trainer(cfg, tmp_path)
    inputs, grads = {}, {}
    for name, m in trainer.model.named_modules():
        if name.endswith("mlp.down_proj"):
            layer = int(name.split(".")[1])
            m.register_forward_pre_hook(lambda m, a, i=layer: inputs.setdefault(i, []).append(a[0].abs().max()))
            m.register_full_backward_hook(lambda m, gi, go, i=layer: grads.setdefault(i, []).append(go[0].abs().max()))
    trainer.train_step()
    (row,) = read_jsonl(tmp_path / OUTLIERS_FILE)
    assert sorted(inputs) == sorted(grads) == [0, 1] and all(len(v) == 2 for v in [*inputs.values(), *grads.values()])
    # the second micro-batch holds a larger amax somewhere: the first alone would not do
    assert any(v[1] > v[0] for v in [*inputs.values(), *grads.values()])
    for r in row["layers"]:
        fp8 = r["fp8"]
        assert fp8["mlp.down_proj.input"]["amax"] == pytest.approx(max(inputs[r["layer"]]).item(), rel=1e-6)
        assert fp8["mlp.down_proj.grad"]["amax"] == pytest.approx(max(grads[r["layer"]]).item(), rel=1e-6)
    trainer.monitor.close()


@pytest.mark.parametrize("enabled", [True, False])
def test_a_resume_drops_the_records_after_its_checkpoint_with_or_without_the_monitor(tmp_path, enabled):
    path = tmp_path / OUTLIERS_FILE
    path.write_text("".join(json.dumps({"step": s, "layers": [], "alerts": []}) + "\n" for s in (1, 10, 20, 30)))
    model = TwoLayers([planted_mlp()])
    build_monitor(MonitorConfig(enabled=enabled), model, tmp_path, resume_step=20, write=False).close()
    assert path.read_text().count("\n") == 4  # other ranks never touch the file
    build_monitor(MonitorConfig(enabled=enabled), model, tmp_path, resume_step=20).close()
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 10, 20]
    # A run that died before its first checkpoint starts over from step 0 (same settings, or resume=auto finding
    # no checkpoint): its records go, as its metrics.jsonl lines do, so none are read as the new run's.
    build_monitor(MonitorConfig(enabled=enabled), model, tmp_path, resume_step=0).close()
    assert path.read_text() == ""


def test_wandb_alerts_and_outlier_keys_never_fail_an_offline_run(tmp_path):
    from fp8train.loggers import RunLogger, read_metrics

    logger = RunLogger(compose(["logger.wandb.mode=offline"]), tmp_path)
    try:
        logger.log_wandb({"outliers/layer_0/h_amax": 3.0}, step=1)
        logger.alert("fp8train: amax_spike in layer 0", "step 1: planted")  # offline: no alert can be sent
        logger.log({"loss": 1.0}, step=1)
    finally:
        logger.finish()
    assert read_metrics(tmp_path) == [{"step": 1, "loss": 1.0}]  # outlier keys go to wandb only


# ---------------------------------------------------------------------------------------------------------------
# fp8train report


def write_outliers(run_dir, rows: list[dict]) -> None:
    """outliers.jsonl as the monitor writes it (non-finite numbers become the strings "nan", "inf")."""
    from fp8train.loggers import JsonLines

    out = JsonLines(run_dir / OUTLIERS_FILE)
    for row in rows:
        out.write(row)
    out.close()


def layer_record(layer: int, h_amax: float, ratio: float = 0.9, saturated: float = 0.0, **extra) -> dict:
    fp8 = {"amax": h_amax, "scale": 100.0, "saturated_frac": saturated, "underflow_frac": 0.0, "amax_ratio": ratio}
    return {
        "layer": layer,
        "h_amax": h_amax,
        "h_rms": h_amax / 10,
        "h_amax_over_rms": 10.0,
        "h_kurtosis": 5.0,
        "top_channels": [[3, h_amax]],
        "cos_max_abs": 0.5,
        "cos_frac_above_half": 0.1,
        "fp8": {"mlp.down_proj.input": fp8},
        **extra,
    }


def test_report_of_a_run_that_went_non_finite(tmp_path):
    # The steps of a diverging run are when the report is read: NaN / inf statistics (stored as strings) must not
    # stop it, and an overflow by an infinite factor is the worst one.
    from fp8train.cli.report import report

    nan, inf = math.nan, math.inf
    alert = Alert(3, 1, "h", "non_finite", nan, 2.0, "layer 1 h amax nan").to_json()
    write_outliers(
        tmp_path,
        [
            {"step": 1, "layers": [layer_record(0, 1.0), layer_record(1, 2.0)], "alerts": []},
            {
                "step": 2,
                "layers": [layer_record(0, 7.0, h_kurtosis=nan), layer_record(1, 2.0, ratio=3.0, saturated=0.01)],
                "alerts": [],
            },
            {
                "step": 3,
                "layers": [
                    layer_record(0, 1.0, cos_max_abs=nan),
                    layer_record(1, nan, ratio=inf, saturated=0.5, h_rms=inf, h_kurtosis=nan),
                ],
                "alerts": [alert],
            },
        ],
    )
    assert '"nan"' in (tmp_path / OUTLIERS_FILE).read_text()
    text = report(tmp_path, tmp_path / "report")
    assert "largest h amax: 7 in layer 0 at step 2 (amax/RMS 10, kurtosis nan, top channel 3)" in text
    assert "FP8 down_proj input: saturated at 2 of 6 (layer, step) pairs; worst infx" in text
    assert "(layer 1, step 3, 50%)" in text
    assert "alerts: 1: 1 non_finite; first at step 3: layer 1 h amax nan" in text
    assert sorted(p.name for p in (tmp_path / "report").iterdir()) == sorted(
        ["h_amax.png", "alignment.png", "fp8_overflow.png", "worst_layers.png", "summary.txt"]
    )


def test_report_names_a_saturated_tensor_that_met_a_nan_as_the_worst(tmp_path):
    # A tensor that met a NaN and saturated too has amax_ratio NaN: taken as the smallest ratio, the summary named as
    # the worst saturated pair one where nothing saturated ("worst 0x ... (layer 1, step 1, 0%)").
    from fp8train.cli.report import Outliers, summary

    layers = [layer_record(0, 1.0, ratio=math.nan, saturated=0.01), layer_record(1, 1.0), layer_record(2, 1.0, 3.0)]
    write_outliers(tmp_path, [{"step": 1, "layers": layers, "alerts": []}])
    text = summary(Outliers.load(tmp_path), tmp_path)
    assert (
        "saturated at 1 of 3 (layer, step) pairs; worst nanx the amax its scale assumed (layer 0, step 1, 1%)" in text
    )


def test_report_names_the_steps_a_layers_growth_is_taken_over(tmp_path):
    # A layer recorded from step 2 on only, a layer whose last value is NaN, and step 3 written twice (the later
    # line counts): each layer's growth names the steps it compares when they are not the run's first and last.
    from fp8train.cli.report import report

    write_outliers(
        tmp_path,
        [
            {"step": 1, "layers": [layer_record(0, 1.0), layer_record(2, 1.0)], "alerts": []},
            {"step": 2, "layers": [layer_record(0, 2.0), layer_record(1, 4.0), layer_record(2, 5.0)], "alerts": []},
            {"step": 3, "layers": [layer_record(0, 99.0), layer_record(1, 99.0)], "alerts": []},
            {
                "step": 3,
                "layers": [layer_record(0, 3.0), layer_record(1, 6.0), layer_record(2, math.nan)],
                "alerts": [],
            },
        ],
    )
    text = report(tmp_path, tmp_path / "report")
    assert "3 monitored steps (1..3), 3 layers" in text
    assert "h amax growth, step 1 -> 3: layer 0 x3, layer 1 x1.5 (step 2 -> 3), layer 2 x5 (step 1 -> 2)" in text


def test_report_names_an_infinite_h_amax_as_the_largest_and_grows_from_the_first_nonzero(tmp_path):
    # An h amax that overflowed to inf is the worst outlier of the run, not one to skip in favour of a finite one;
    # a layer whose h was all zero at first (a zero-initialised projection) grows from its first non-zero amax.
    from fp8train.cli.report import report

    write_outliers(
        tmp_path,
        [
            {"step": 1, "layers": [layer_record(0, 1.0), layer_record(1, 0.0, h_rms=0.0)], "alerts": []},
            {"step": 2, "layers": [layer_record(0, 2.0), layer_record(1, 0.5)], "alerts": []},
            {"step": 3, "layers": [layer_record(0, math.inf), layer_record(1, 2.0)], "alerts": []},
        ],
    )
    text = report(tmp_path, tmp_path / "report")
    assert "largest h amax: inf in layer 0 at step 3" in text
    assert "h amax growth, step 1 -> 3: layer 0 x2 (step 1 -> 2), layer 1 x4 (step 2 -> 3)" in text


def test_report_of_one_monitored_step_says_growth_needs_two(tmp_path):
    # Growth from a step to itself (x1) reads as a measured "no growth"; with one monitored step there is none yet.
    from fp8train.cli.report import report

    write_outliers(tmp_path, [{"step": 1, "layers": [layer_record(0, 1.0), layer_record(1, 2.0)], "alerts": []}])
    text = report(tmp_path, tmp_path / "report")
    assert "h amax growth: one monitored step (1), nothing to compare yet" in text
    assert "x1" not in text


def test_report_colour_scales_start_at_zero_when_nothing_is_aligned(tmp_path, monkeypatch):
    # Early in a run no neuron is above |cos| 0.5: the "% of neurons" colour bar ran from -0.1 to 0.1, a negative
    # percentage, with the zeros drawn in its middle colour.
    from fp8train.cli.report import report

    rows = [{"step": s, "layers": [layer_record(0, 1.0 + s, cos_frac_above_half=0.0)], "alerts": []} for s in (1, 2)]
    write_outliers(tmp_path, rows)
    figures = saved_figures(monkeypatch)
    report(tmp_path, tmp_path / "report")
    cos_max, frac = (ax.images[0] for ax in figures["alignment.png"].axes if ax.images)
    assert cos_max.get_clim() == (0, 1)
    low, high = frac.get_clim()
    assert low == 0 and high > 0


@pytest.mark.parametrize("damage", ["binary", "directory"])
def test_report_on_an_unreadable_outliers_file_is_one_message(tmp_path, damage):
    # As compare does for metrics.jsonl: a message naming the file, no traceback.
    from fp8train.cli.report import report
    from fp8train.errors import Fp8trainError

    path = tmp_path / OUTLIERS_FILE
    if damage == "binary":
        path.write_bytes(b"\xff\xfe\x00garbage\n")
    else:
        path.mkdir()
    with pytest.raises(Fp8trainError, match=f"{path} cannot be read"):
        report(tmp_path, tmp_path / "report")
    assert not (tmp_path / "report").exists()


def test_report_of_a_run_without_fp8_tensors_fits_its_title(tmp_path, monkeypatch):
    # A bf16 run's fp8_overflow.png is one panel saying so: its title was cut at both edges of the narrow figure.
    from fp8train.cli.report import report

    rows = [{"step": s, "layers": [layer_record(0, 1.0 + s, fp8={})], "alerts": []} for s in (1, 2)]
    write_outliers(tmp_path, rows)
    figures = saved_figures(monkeypatch)
    assert "FP8: no FP8 tensors in this run" in report(tmp_path, tmp_path / "report")
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    fig = figures["fp8_overflow.png"]
    title = fig.get_suptitle()
    box = fig._suptitle.get_window_extent(FigureCanvasAgg(fig).get_renderer())  # a closed figure: draw it again
    assert title.startswith("FP8 overflow") and 0 <= box.x0 and box.x1 <= fig.bbox.width


def test_report_of_an_fp8_run_through_transformer_engine_does_not_call_it_fp8_free(tmp_path, monkeypatch):
    # With precision.engine=te Habana's Transformer Engine scales the FP8 tensors, and the monitor records none of
    # them: the summary and fp8_overflow.png said "no FP8 tensors in this run" of an FP8 run.
    from fp8train.cli.report import report

    rows = [{"step": s, "layers": [layer_record(0, 1.0 + s, fp8={})], "alerts": []} for s in (1, 2)]
    write_outliers(tmp_path, rows)
    precision = {"name": "fp8_smooth_gaudi2", "recipe": "fp8", "engine": "te"}
    (tmp_path / "config.yaml").write_text(json.dumps({"precision": precision}))  # JSON is YAML
    figures = saved_figures(monkeypatch)
    text = report(tmp_path, tmp_path / "report")
    assert "FP8: no FP8 statistics: precision.engine=te (Transformer Engine's scaling is not monitored)" in text
    assert "no FP8 tensors" not in text
    (panel_text,) = figures["fp8_overflow.png"].axes[0].texts
    assert panel_text.get_text().startswith("no FP8 statistics: precision.engine=te")


def test_worst_layers_alert_crosses_have_a_colour_no_layer_line_has(tmp_path, monkeypatch):
    # Four layers drawn: the fourth line took matplotlib's red (#d62728), next to the red of the alert crosses.
    from matplotlib.colors import to_rgb

    from fp8train.cli.report import report

    alert = Alert(2, 3, "mlp.down_proj.input", "fp8_overflow", 3.0, 0.01, "layer 3 overflow").to_json()
    rows = [{"step": s, "layers": [layer_record(i, 1.0 + i * s) for i in range(4)], "alerts": []} for s in (1, 2)]
    rows[1]["alerts"] = [alert]
    write_outliers(tmp_path, rows)
    figures = saved_figures(monkeypatch)
    report(tmp_path, tmp_path / "report")
    _, down = figures["worst_layers.png"].axes
    curves = [line for line in down.get_lines() if line.get_label().startswith("layer")]
    crosses = [line for line in down.get_lines() if line.get_marker() == "x" and len(line.get_xdata())]
    assert len(curves) == 4 and len(crosses) == 1
    cross = to_rgb(crosses[0].get_color())
    assert all(math.dist(to_rgb(c.get_color()), cross) > 0.4 for c in curves)  # #d62728 is 0.27 from pure red


def test_worst_layers_marks_the_alert_of_a_step_gone_non_finite(tmp_path):
    # The cross of an alert sits at the layer's value that step: a NaN or inf amax put it nowhere, and the alert of a
    # diverging step, the one a report is read for, did not show. It goes on the top edge of the panel instead.
    import matplotlib.pyplot as plt

    from fp8train.cli.report import Outliers, draw_worst

    alerts = [Alert(3, 0, "h", "non_finite", math.nan, 2.0, "layer 0 h amax nan").to_json()]
    alerts.append(Alert(3, 0, "mlp.down_proj.input", "non_finite", math.inf, 0.0, "layer 0 down inf").to_json())
    rows = [{"step": s, "layers": [layer_record(0, 1.0 + s, down_in_amax=1.0)], "alerts": []} for s in (1, 2)]
    rows.append({"step": 3, "layers": [layer_record(0, math.nan, down_in_amax=math.inf)], "alerts": alerts})
    write_outliers(tmp_path, rows)
    fig = draw_worst(Outliers.load(tmp_path), plt)
    plt.close(fig)
    for ax in fig.axes:
        crosses = [line for line in ax.get_lines() if line.get_marker() == "x" and len(line.get_xdata())]
        assert len(crosses) == 1 and list(crosses[0].get_xdata()) == [3]
        assert all(math.isfinite(y) for y in crosses[0].get_ydata()), crosses[0].get_ydata()


@pytest.mark.parametrize("bad", [math.inf, math.nan])
def test_worst_layers_draws_a_layer_whose_h_amax_went_non_finite(tmp_path, bad):
    # The layers drawn were those of the largest finite h amax: a layer whose h overflowed to inf (the largest of
    # all, as the summary says) or went NaN first, with small values before, was left out of the picture.
    import matplotlib.pyplot as plt

    from fp8train.cli.report import WORST, Outliers, draw_worst

    rows = [{"step": s, "layers": [layer_record(i, 10.0 + i) for i in range(WORST + 2)], "alerts": []} for s in (1, 2)]
    rows[1]["layers"][0] = layer_record(0, bad)
    write_outliers(tmp_path, rows)
    fig = draw_worst(Outliers.load(tmp_path), plt)
    plt.close(fig)
    ax_h, _ = fig.axes
    drawn = [line.get_label() for line in ax_h.get_lines() if line.get_label().startswith("layer")]
    assert drawn[0] == "layer 0" and len(drawn) == WORST


@pytest.mark.parametrize("damage", ["binary", "directory", "not objects"])
def test_resuming_over_a_damaged_outliers_file_is_one_message(tmp_path, damage):
    # The replay of the running medians reads outliers.jsonl before anything else: a file that is no JSON-lines file
    # is named with what to do, not a traceback; lines that are no records are skipped, as the report does.
    path = tmp_path / OUTLIERS_FILE
    model = TwoLayers([planted_mlp()])
    cfg = MonitorConfig(enabled=True, interval=10, min_history=1)
    damage_jsonl(
        path, damage, '123\n{"step": 1, "layers": [{"layer": 0, "h_amax": 2.0}]}\n[1]\n{"step": 2, "layers": 7}\n'
    )
    if damage == "not objects":
        mon = OutlierMonitor(cfg, model, tmp_path, resume_step=10)
        mon.close()
        assert list(mon.spikes.history["layer_0/h_amax"]) == [2.0]
        return
    from fp8train.errors import Fp8trainError

    with pytest.raises(Fp8trainError, match=f"^{path} cannot be read \\(.*Move it out of the run directory"):
        OutlierMonitor(cfg, model, tmp_path, resume_step=10)


@pytest.mark.parametrize("nan_first", [True, False])
def test_the_console_line_names_a_nan_layer_whatever_the_layer_order(nan_first):
    # A NaN h amax (or alignment) is the news of the step: max() alone showed it only when it came first.
    from fp8train.monitor.monitor import one_line

    finite = {"layer": 0, "h_amax": 5.0, "h_kurtosis": 3.0, "cos_max_abs": 0.5}
    broken = {"layer": 1, "h_amax": math.nan, "h_kurtosis": math.nan, "cos_max_abs": math.nan}
    line = one_line([broken, finite] if nan_first else [finite, broken])
    assert "largest h amax nan (layer 1, kurtosis nan)" in line
    assert "max |cos(W_up, W_gate)| nan (layer 1)" in line
    assert "largest h amax inf (layer 0" in one_line([{**finite, "h_amax": math.inf}, broken | {"h_amax": 9.0}])
