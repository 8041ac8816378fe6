"""Scaling state: delayed vs current, amax history windows, micro-batches, the one-collective step, checkpoints,
and the overflow / underflow counters."""

from __future__ import annotations

import io
import math

import pytest
import torch
from torch import nn

from fp8train.fp8.formats import E4M3, E5M2, fp8_max, fp8_min_subnormal
from fp8train.fp8.linear import Fp8Linear
from fp8train.fp8.ops import Fp8Ops
from fp8train.fp8.scaling import EagerUntilScalesReady, ScalingConfig, TensorScaler, fp8_scalers, step_scalers
from tests.helpers import check_counts, counter_inputs, counting_scaler


def t(v: float) -> torch.Tensor:
    return torch.tensor(v)


def delayed(**kw) -> TensorScaler:
    return TensorScaler(E4M3, ScalingConfig(recipe="delayed", **kw))


def run_steps(scaler: TensorScaler, amaxes: list[float]) -> list[float]:
    """One scale_for per step with the given amaxes; returns the scale used at each step."""
    used = []
    for a in amaxes:
        used.append(scaler.scale_for(t(a)).item())
        scaler.step()
    return used


def test_delayed_scale_uses_the_previous_steps_only():
    s = delayed(amax_history_len=4)
    used = run_steps(s, [1.0, 1.0, 1.0, 100.0, 1.0])
    assert used[1:4] == [448.0, 448.0, 448.0]  # the spike at step 3 is quantized with the old scale ...
    assert used[4] == pytest.approx(4.48)  # ... and is in the scale of step 4


def test_delayed_first_step_without_history_scales_just_in_time():
    s = delayed()
    assert not s.scale_ready
    assert s.scale_for(t(2.0)).item() == 224.0  # not a blind 1.0
    s.step()
    assert s.scale_ready and s.scale_for(t(50.0)).item() == 224.0  # from now on: delayed


def test_the_host_learns_that_a_history_exists_from_step_and_from_a_loaded_state():
    s = delayed()
    s.scale_for(t(0.0))
    s.step()  # an all-zero tensor: still no history
    assert not s.scale_ready and not s.history_ready
    s.scale_for(t(2.0))
    s.step()
    assert s.scale_ready and s.history_ready
    resumed = delayed()
    resumed.load_state_dict(s.state_dict())
    assert resumed.history_ready and resumed.scale_for(t(50.0)).item() == 224.0
    fresh = delayed()
    fresh.load_state_dict(delayed().state_dict())
    assert not fresh.history_ready and fresh.scale_for(t(50.0)).item() == pytest.approx(8.96)  # just in time


def test_a_compiled_fp8_model_is_called_eagerly_until_its_delayed_scales_have_a_history(caplog):
    # backend.compile wraps the compiled model so that it is compiled once, for scales from the history, and not a
    # second time at step 2. Which steps run a compiled graph, and how many graphs get built:
    def routed(recipe: str, state: dict | None = None) -> tuple[list[str], int, dict]:
        torch._dynamo.reset()
        torch.manual_seed(0)
        model = Fp8Linear(32, 32, scaling=ScalingConfig(recipe=recipe), ops=Fp8Ops())
        if state is not None:
            model.load_state_dict(state)
        built, ran = [], []

        def counting_backend(gm, example_inputs):
            built.append(gm)

            def run(*args):
                ran.append(1)
                return gm(*args)

            return run

        forward = EagerUntilScalesReady(model, torch.compile(model, backend=counting_backend))
        steps = []
        for _ in range(3):
            n = len(ran)
            forward(torch.randn(4, 32)).sum().backward()
            steps.append("compiled" if len(ran) > n else "eager")
            step_scalers(model)
        return steps, len(built), model.state_dict()

    with caplog.at_level("INFO", logger="fp8train"):
        steps, graphs, trained = routed("delayed")
    assert (steps, graphs) == (["eager", "compiled", "compiled"], 1)
    said = [r.getMessage() for r in caplog.records if "torch.compile" in r.getMessage()]
    assert len(said) == 1 and "compiling the model now that the delayed FP8 scales have a history" in said[0]
    assert routed("delayed", state=trained)[:2] == (["compiled"] * 3, 1)  # resumed: the history came with it
    assert routed("current")[:2] == (["compiled"] * 3, 1)  # nothing to wait for
    torch._dynamo.reset()


def test_max_and_most_recent_over_the_window():
    amaxes = [1.0, 8.0, 2.0]
    s_max, s_recent = delayed(amax_history_len=4), delayed(amax_history_len=4, amax_compute_algo="most_recent")
    run_steps(s_max, amaxes)
    run_steps(s_recent, amaxes)
    assert s_max.scale.item() == 448.0 / 8
    assert s_recent.scale.item() == 448.0 / 2


@pytest.mark.parametrize("length", [1, 3, 16])
def test_history_of_length_l_forgets_a_spike_after_l_steps(length):
    s = delayed(amax_history_len=length)
    run_steps(s, [1.0, 1.0])
    used = run_steps(s, [64.0] + [1.0] * (length + 1))  # spike at step t = 0 of this list
    assert used[0] == 448.0
    assert used[1 : length + 1] == [7.0] * length  # the scales of steps t+1 .. t+L saw the spike
    assert used[length + 1] == 448.0  # step t+L+1 no longer does


@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_a_non_finite_amax_does_not_pin_the_scale_for_the_length_of_the_history(bad):
    """A step with an inf/NaN amax (normally skipped and discarded) must not freeze the scale: kept in a `max`
    history, an inf amax would keep the previous scale for amax_history_len steps while the range grows."""
    s = delayed(amax_history_len=4)
    run_steps(s, [1.0, bad])
    used = run_steps(s, [100.0, 100.0])
    assert used == [448.0, pytest.approx(4.48)]


def test_micro_batches_of_one_step_take_the_max():
    s = delayed()
    run_steps(s, [1.0])
    for a in (2.0, 7.0, 3.0):  # three micro-batches, one step: all use the same (delayed) scale
        assert s.scale_for(t(a)).item() == 448.0
    assert s.amax_history[0].item() == 7.0
    s.step()
    assert s.scale.item() == 64.0


def test_current_scaling_follows_each_tensor_and_keeps_the_scale_for_zero_tensors():
    s = TensorScaler(E5M2, ScalingConfig(recipe="current"))
    assert s.scale_for(t(2.0)).item() == 28672.0
    assert s.scale_for(t(4.0)).item() == 14336.0
    assert s.scale_for(t(0.0)).item() == 14336.0  # an all-zero tensor says nothing about the range
    assert s.amax_history[0].item() == 4.0
    s.step()
    assert s.amax_history[:2].tolist() == [0.0, 4.0]


def test_pow2_and_margin_apply_to_delayed_scales():
    s = delayed(pow2=True, margin=1)
    run_steps(s, [3.0])
    assert s.scale.item() == 64.0  # 448 / 3 = 149 -> 128, then / 2^1


def test_eval_mode_reuses_scales_without_recording():
    s = delayed()
    run_steps(s, [1.0])
    s.eval()
    assert s.scale_for(t(1000.0)).item() == 448.0
    assert s.amax_history.max().item() == 1.0
    c = TensorScaler(E4M3, ScalingConfig(recipe="current")).eval()
    c.scale_for(t(4.0))
    assert c.scale.item() == 1.0 and c.amax_history[0].item() == 0.0


def two_layer_model(recipe: str = "delayed") -> nn.Module:
    cfg = ScalingConfig(recipe=recipe, amax_history_len=4)
    return nn.Sequential(Fp8Linear(16, 32, scaling=cfg), nn.ReLU(), Fp8Linear(32, 16, scaling=cfg))


def test_step_scalers_makes_one_reduce_call_with_every_amax():
    model = two_layer_model()
    scalers = fp8_scalers(model)
    assert len(scalers) == 6
    for i, s in enumerate(scalers):
        s.amax_history[0] = i + 1.0
    calls = []

    def reduce_amax(amax: torch.Tensor) -> None:  # stands in for dist.all_reduce(amax, MAX) with other ranks
        calls.append(amax.clone())
        amax.copy_(torch.maximum(amax, torch.full_like(amax, 4.0)))

    step_scalers(model, reduce_amax)
    assert len(calls) == 1 and calls[0].tolist() == [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
    reduced = [4.0, 4.0, 4.0, 4.0, 5.0, 6.0]
    for s, a in zip(scalers, reduced):
        assert s.scale.item() == pytest.approx(s.fp8_max / a)  # the reduced amax set the scale
        assert s.amax_history[:2].tolist() == [0.0, a]  # and is what the history keeps
    step_scalers(nn.Linear(2, 2), reduce_amax)  # no FP8 tensors: nothing to reduce
    assert len(calls) == 1


def test_step_scalers_without_reduction_steps_every_scaler():
    model = two_layer_model()
    model(torch.randn(8, 16)).sum().backward()
    step_scalers(model)
    assert all(bool(s.scale_ready) and s.amax_history[0].item() == 0.0 for s in fp8_scalers(model))


def train_steps(model: nn.Module, steps: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    outs = []
    for _ in range(steps):
        x = torch.randn(8, 16, generator=g) * (1 + 10 * torch.rand(1, generator=g))
        y = model(x)
        y.square().mean().backward()
        step_scalers(model)
        outs.append(y.detach())
    return outs


def test_state_dict_round_trip_resumes_exactly():
    torch.manual_seed(0)
    model = two_layer_model()
    train_steps(model, 5, seed=1)
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    buf.seek(0)
    resumed = two_layer_model()
    resumed.load_state_dict(torch.load(buf))
    keys = model.state_dict().keys()
    assert {"0.input_scaler.amax_history", "0.input_scaler.scale", "2.grad_scaler.n_saturated"} <= set(keys)
    for a, b in zip(train_steps(model, 4, seed=2), train_steps(resumed, 4, seed=2)):
        assert torch.equal(a, b)
    for a, b in zip(fp8_scalers(model), fp8_scalers(resumed)):
        assert torch.equal(a.scale, b.scale) and torch.equal(a.amax_history, b.amax_history)


def test_pop_stats_counts_planted_saturated_and_flushed_elements():
    s = delayed()
    run_steps(s, [1.0])  # scale 448: |x| > 1 saturates, |x| < 2^-9 / 2 / 448 flushes to zero
    s.track_stats = True
    flush = fp8_min_subnormal(E4M3) / 2 / 448
    x = torch.rand(1000) * 0.9 + 0.05  # ordinary values in [0.05, 0.95]
    # 7 above the overflow threshold (464 / 448 = 1.0357: where rounding alone no longer gives 448), 2 just below it
    x[:7] = torch.tensor([1.5, -2.0, 3.0, -40.0, 1.04, 8.0, -1.2])
    x[25:27] = torch.tensor([1.01, -1.035])  # clamped to 448, as rounding without a limit would round them
    x[7:20] = torch.linspace(0.1, 0.9, 13) * flush * torch.tensor([1.0, -1.0]).repeat(7)[:13]  # 13 flushed
    x[20:25] = 0.0  # zeros are not underflow
    x = x[torch.randperm(1000)]
    q, scale = s.quantize(x, Fp8Ops())
    assert scale.item() == 448.0
    assert (q.float()[x.abs() > 1].abs() == 448).all()
    assert torch.equal(q[x.abs() == 1.01].float(), (x[x.abs() == 1.01] * 448).to(torch.float8_e4m3fn).float())
    stats = s.pop_stats()
    assert stats["saturated_frac"] == pytest.approx(7 / 1000)
    assert stats["underflow_frac"] == pytest.approx(13 / 1000)
    assert stats["amax"] == 40.0 and stats["scale"] == 448.0
    assert stats["amax_ratio"] == pytest.approx(40.0)  # 40x above the amax the scale assumed (1.0)
    after = s.pop_stats()
    assert after["saturated_frac"] == 0 and after["underflow_frac"] == 0 and after["amax_ratio"] == 0


@pytest.mark.parametrize("fmt,stochastic", [(E4M3, False), (E5M2, False), (E5M2, True)])
def test_counters_agree_with_a_count_of_the_fp8_result(fmt, stochastic):
    # The flushed count is taken from the fp32 values (round-to-nearest-even) or, when rounding is stochastic, from
    # q's bytes; either way it must equal counting zeros in the FP8 result, exact ties at half a subnormal included.
    s = counting_scaler(fmt, 64.0)
    x = counter_inputs(fmt, 64.0)
    q, scale = s.quantize(x, Fp8Ops(), stochastic=stochastic)
    saturated, flushed = check_counts(s, x, q, scale)
    assert saturated == 32 and flushed >= (32 if stochastic else 96)


@pytest.mark.parametrize("recipe", ["current", "delayed"])
def test_the_scale_popped_with_the_largest_amax_is_the_one_that_amax_was_quantized_with(recipe):
    # Where a tensor is scaled from its own amax (current scaling, delayed before its first step), micro-batches
    # have scales of their own. The stats paired the largest amax with the last micro-batch's scale: amax * scale
    # read 4x fp8_max, an overflow that never happened (amax_ratio 1). The smallest scale goes with the largest amax.
    s = TensorScaler(E4M3, ScalingConfig(recipe=recipe))
    s.track_stats = True
    for amax in (4.0, 1.0):  # two micro-batches
        s.quantize(torch.tensor([amax, -amax / 3]), Fp8Ops())
    stats = s.pop_stats()
    assert (stats["amax"], stats["scale"], stats["amax_ratio"]) == (4.0, 112.0, 1.0)
    assert s.pop_stats() == dict.fromkeys(stats, 0.0)  # nothing tracked since: all zero, the scale too


@pytest.mark.parametrize("fmt,stochastic", [(E4M3, False), (E5M2, False), (E5M2, True)])
@pytest.mark.parametrize("nan", [False, True])
def test_an_inf_or_nan_input_is_neither_saturated_nor_flushed(fmt, stochastic, nan):
    # quantize turns +-inf into NaN (E4M3) or inf (E5M2), never into max: no clamp to the scale's range happened.
    # Counted as saturated, an inf made the tensor that met it look like an FP8 overflow of its scale (the summary's,
    # wandb's and the console's saturated counts) where a NaN did not; the monitor flags both as non-finite through
    # amax_ratio. A finite element whose product with the scale overflows fp32 is saturated: the clamp gives max.
    s = counting_scaler(fmt, 64.0)
    inf = float("inf")
    special = [inf, -inf, 3e38, -inf] + ([float("nan")] if nan else [])
    x = torch.cat([counter_inputs(fmt, 64.0), torch.tensor(special, dtype=torch.bfloat16)])
    q, scale = s.quantize(x, Fp8Ops(), stochastic=stochastic)
    assert not q[-len(special) :].float()[[0, 1, 3]].isfinite().any()  # the infs stay non-finite
    stats = s.pop_stats()
    n = x.numel()
    assert stats["saturated_frac"] * n == pytest.approx(33)  # the 32 beyond max and 3e38; no inf
    assert stats["underflow_frac"] * n == pytest.approx(((x != 0) & (q.float() == 0)).sum().item())
    assert (math.isnan if nan else math.isinf)(stats["amax_ratio"])  # what the overflow alert fires on


def test_delayed_scale_is_one_select_between_the_history_scale_and_the_current_one():
    # Not where(ready, scale, where(ok, fp8_max / amax, scale)): one select, a simpler kernel after the amax
    # reduction (the nested form was part of a fused kernel Triton 3.6 failed to build for an H100).
    from torch.fx.experimental.proxy_tensor import make_fx

    s = delayed()
    graph = make_fx(lambda amax: s.scale_for(amax))(torch.tensor(3.0)).graph
    selects = [n for n in graph.nodes if n.target == torch.ops.aten.where.self]
    assert len(selects) == 1
    assert run_steps(delayed(), [2.0, 4.0]) == [224.0, 224.0]  # current scaling first, then the history's


def test_step_scalers_steps_every_format_and_config_as_each_scaler_alone_would():
    # step_scalers steps scalers of one format and config together, as (N, L) tensors; mixed ones must come out
    # exactly as one step() each. Amaxes include 0 (keeps the scale) and values far apart.
    configs = [
        ScalingConfig(recipe="delayed"),
        ScalingConfig(recipe="delayed", amax_compute_algo="most_recent", amax_history_len=4),
        ScalingConfig(recipe="delayed", margin=1, pow2=True, profile="gaudi2"),
        ScalingConfig(recipe="current"),
    ]

    def scalers():
        return nn.ModuleList(TensorScaler(fmt, cfg) for cfg in configs for fmt in (E4M3, E5M2, E4M3))

    together, alone = scalers(), scalers()
    g = torch.Generator().manual_seed(0)
    for step in range(6):
        amaxes = torch.rand(len(together), generator=g) * 10 ** torch.randint(-3, 4, (len(together),), generator=g)
        amaxes[step] = 0.0
        for a, b, amax in zip(together, alone, amaxes):
            a.scale_for(amax)
            b.scale_for(amax)
        step_scalers(together)
        for b in alone:
            b.step()
        for a, b in zip(together, alone):
            assert torch.equal(a.scale, b.scale) and torch.equal(a.amax_history, b.amax_history)
            assert torch.equal(a.scale_ready, b.scale_ready)


def test_no_counting_unless_tracked():
    s = delayed()
    s.quantize(torch.randn(100) * 1000, Fp8Ops())
    assert s.n_elements.item() == 0 and s.n_saturated.item() == 0


def test_config_validation_names_every_problem():
    with pytest.raises(ValueError) as e:
        ScalingConfig(recipe="lazy", amax_history_len=0, amax_compute_algo="mean", profile="h100")
    for word in ("recipe", "amax_history_len", "amax_compute_algo", "profile"):
        assert word in str(e.value)


@pytest.mark.parametrize("profile,limit", [("ocp", 14), ("gaudi2", 13)])
def test_a_margin_that_would_flush_every_tensor_or_zero_the_scale_is_refused(profile, limit):
    # The largest margin leaves an amax at or above E4M3's smallest normal; 200 would give scale 0 (NaN outputs).
    top = ScalingConfig(profile=profile, margin=limit)
    assert fp8_max(E4M3, profile) * 2.0**-top.margin >= 2.0**-6
    for margin in (-1, limit + 1, 200):
        with pytest.raises(ValueError, match="margin"):
            ScalingConfig(profile=profile, margin=margin)
