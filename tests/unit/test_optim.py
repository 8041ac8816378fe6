"""Learning-rate schedule and AdamW parameter groups."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from fp8train import optim
from fp8train.backends import select
from fp8train.config import BackendConfig, ModelConfig, OptimConfig, ScheduleName, compose
from fp8train.model import build_model


def test_warmup_is_linear_and_reaches_peak():
    cfg = OptimConfig(lr=1e-3, min_lr=1e-4, warmup_steps=10)
    factors = [optim.lr_factor(s, cfg, max_steps=100) for s in range(10)]
    assert factors == pytest.approx([(s + 1) / 10 for s in range(10)])


def test_cosine_goes_from_peak_to_min_lr_at_decay_end():
    cfg = OptimConfig(lr=1e-3, min_lr=1e-4, warmup_steps=10)
    assert optim.lr_factor(10, cfg, 110) == pytest.approx(1.0)
    assert optim.lr_factor(60, cfg, 110) == pytest.approx(0.1 + 0.9 * 0.5)  # half-way: mean of peak and floor
    assert optim.lr_factor(110, cfg, 110) == pytest.approx(0.1)
    assert optim.lr_factor(500, cfg, 110) == pytest.approx(0.1)  # stays at the floor past decay
    mid = [optim.lr_factor(s, cfg, 110) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(mid, mid[1:]))  # monotone decay


def test_decay_steps_override_max_steps():
    cfg = OptimConfig(lr=1.0, min_lr=0.0, warmup_steps=0, decay_steps=40)
    assert optim.lr_factor(20, cfg, max_steps=1000) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))
    assert optim.lr_factor(40, cfg, max_steps=1000) == pytest.approx(0.0)


def test_constant_schedule():
    cfg = OptimConfig(warmup_steps=4, schedule=ScheduleName.constant)
    assert [optim.lr_factor(s, cfg, 100) for s in (0, 3, 4, 99)] == pytest.approx([0.25, 1.0, 1.0, 1.0])


def test_dataclass_defaults_are_those_of_the_optim_files():
    """OptimConfig() is what Python users and Hydra's structured config get; conf/optim/*.yaml what train.py gets.
    The two must be the same run (the docs state warmup 30)."""
    default = dataclasses.asdict(OptimConfig())
    for option in ("adamw", "adamw_fp8"):
        composed = dataclasses.asdict(compose([f"optim={option}"]).optim)
        diffs = {k: (default[k], composed[k]) for k in default if k != "name" and default[k] != composed[k]}
        assert diffs == {}, option
    assert default["warmup_steps"] == 30


@pytest.mark.parametrize(
    "warmup, max_steps, schedule, expected",
    [
        (30, 6, "cosine", "optim.warmup_steps=30 is longer than trainer.max_steps=6: the run ends in warmup"),
        (30, 30, "cosine", "optim.warmup_steps=30 equals trainer.max_steps=30: the run ends in warmup"),
        (10, 4, "constant", "optim.warmup_steps=10 is longer than trainer.max_steps=4: the run ends in warmup"),
        (10, 10, "constant", None),  # the last step trains at optim.lr, and a constant schedule has nothing after
        (30, 31, "cosine", None),
        (0, 1, "cosine", None),
    ],
)
def test_a_run_that_ends_in_warmup_is_named(warmup, max_steps, schedule, expected):
    cfg = OptimConfig(lr=1e-3, min_lr=1e-4, warmup_steps=warmup, schedule=ScheduleName(schedule))
    found = optim.warmup_warning(cfg, max_steps)
    if expected is None:
        assert found is None
        return
    assert found.startswith(expected), found
    last = optim.lr_factor(max_steps - 1, cfg, max_steps) * cfg.lr  # the lr of the run's last step
    assert f"{last:.2e}" in found


def test_scheduler_sets_the_optimizer_lr_per_step():
    p = torch.nn.Parameter(torch.zeros(2, 2))
    cfg = OptimConfig(lr=2e-3, min_lr=2e-4, warmup_steps=2)
    opt = torch.optim.AdamW([p], lr=cfg.lr)
    sched = optim.build_schedule(cfg, opt, max_steps=10)
    seen = []
    for _ in range(10):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen == pytest.approx([cfg.lr * optim.lr_factor(s, cfg, 10) for s in range(10)])


def test_weight_decay_only_on_matrices_and_tied_weight_once():
    model = build_model(ModelConfig(vocab_size=128, d_model=32, n_layers=2, n_heads=4, ffn_dim=64, tie_embeddings=True))
    decay, no_decay = optim.param_groups(model, 0.1)
    assert all(p.ndim == 2 for p in decay["params"]) and all(p.ndim == 1 for p in no_decay["params"])
    n_norms = 2 * 2 + 1
    assert len(no_decay["params"]) == n_norms
    ids = [id(p) for g in (decay, no_decay) for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))


def test_fused_adamw_on_cpu_matches_the_plain_loop():
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=4, ffn_dim=64)
    backend = select(BackendConfig(name="cpu"))
    results = []
    for fused in (True, False):
        torch.manual_seed(0)
        model = build_model(cfg)
        opt = optim.build(OptimConfig(fused=fused), model, backend)
        assert bool(opt.defaults["fused"]) is fused
        for step in range(3):
            torch.manual_seed(step)
            loss = model(torch.randint(0, 64, (2, 8))).square().mean()
            loss.backward()
            opt.step()
            opt.zero_grad()
        results.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    torch.testing.assert_close(results[0], results[1], rtol=1e-5, atol=1e-6)


def test_adamw_fp8_is_built_from_the_config():
    from fp8train.optim.adamw_fp8 import AdamWFp8

    model = build_model(ModelConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=4, ffn_dim=64))
    cfg = OptimConfig(name="adamw_fp8", block_size=64, fp8_min_numel=0)
    opt = optim.build(cfg, model, select(BackendConfig(name="cpu")))
    assert isinstance(opt, AdamWFp8)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]
    assert opt.compile is None  # compiled on CUDA only, unless backend.compile=true asks for it everywhere


def test_adamw_fp8_scales_moments_into_gaudi2s_range_on_hpu():
    from fp8train.backends.base import Backend

    model = build_model(ModelConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=4, ffn_dim=64))
    cfg = OptimConfig(name="adamw_fp8")
    assert optim.build(cfg, model, select(BackendConfig(name="cpu"))).profile == "ocp"
    assert optim.build(cfg, model, Backend(name="hpu")).profile == "gaudi2"  # E4M3 saturates at 240 there


def test_backend_compile_compiles_adamw_fp8_where_inductor_runs(monkeypatch):
    from fp8train.backends.base import Backend

    model = build_model(ModelConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=4, ffn_dim=64))
    cfg = OptimConfig(name="adamw_fp8")
    assert optim.build(cfg, model, select(BackendConfig(name="cpu")), compile=True).compile is True
    monkeypatch.setattr(Backend, "inductor", lambda self: False)  # as on hpu: hpu_backend compiles, not inductor
    assert optim.build(cfg, model, select(BackendConfig(name="cpu")), compile=True).compile is None


def test_habana_fused_adam_outside_gaudi_names_the_fix():
    from fp8train.errors import BackendError

    model = build_model(ModelConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=4, ffn_dim=64))
    cfg = OptimConfig(name="adamw_fp8", habana_fused=True)
    with pytest.raises(BackendError, match="optim.habana_fused=true needs backend.name=hpu.*optim.habana_fused=false"):
        optim.build(cfg, model, select(BackendConfig(name="cpu")))
