"""The training step in-process: accumulation, clipping and the schedule as the loop applies them."""

from __future__ import annotations

import logging
import math
import shutil
import types
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fp8train import trainer as trainer_module
from fp8train.config import compose
from fp8train.loggers import read_jsonl
from fp8train.parallel import clip_grad_norm
from fp8train.trainer import Trainer
from tests.helpers import ROOT, SMALL


def make_trainer(tmp_path, *overrides: str) -> Trainer:
    cfg = compose([*SMALL, "precision=fp32", "optim.fused=false", *overrides])
    return Trainer(cfg, tmp_path)


def test_grad_accumulation_equals_one_large_batch(tmp_path):
    # micro 4 x accum 2 reads the same 8 windows as micro 8 x accum 1 (global sample index), so one step of each
    # must give the same loss and the same updated weights, up to fp32 summation order.
    big = make_trainer(tmp_path / "a", "trainer.micro_batch_size=8", "trainer.grad_accum_steps=1")
    acc = make_trainer(tmp_path / "b", "trainer.micro_batch_size=4", "trainer.grad_accum_steps=2")
    loss_big, norm_big = big.train_step()
    loss_acc, norm_acc = acc.train_step()
    assert loss_acc.item() == pytest.approx(loss_big.item(), rel=1e-6)
    assert norm_acc.item() == pytest.approx(norm_big.item(), rel=1e-5)
    for (name, a), b in zip(big.model.named_parameters(), acc.model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7, msg=name)


def test_clipping_scales_gradients_to_the_limit_and_reports_the_raw_norm():
    model = torch.nn.Linear(4, 3, bias=True)
    model.weight.grad = torch.full((3, 4), 2.0)  # norm sqrt(12 * 4) = sqrt(48)
    model.bias.grad = torch.full((3,), 2.0)  # norm sqrt(12)
    raw = clip_grad_norm(model, max_norm=1.0)
    assert raw.item() == pytest.approx(60**0.5)
    clipped = torch.cat([model.weight.grad.flatten(), model.bias.grad]).norm()
    assert clipped.item() == pytest.approx(1.0, rel=1e-5)
    assert clip_grad_norm(model, max_norm=0.0).item() == pytest.approx(1.0, rel=1e-5)  # 0: measure, never clip
    assert clipped.item() == pytest.approx(torch.cat([model.weight.grad.flatten(), model.bias.grad]).norm().item())


def test_lr_in_the_loop_follows_the_schedule(tmp_path):
    t = make_trainer(tmp_path, "optim.warmup_steps=4", "optim.lr=1e-3")
    seen = []
    for _ in range(6):
        seen.append(t.optimizer.param_groups[0]["lr"])
        t.train_step()
    assert seen[:4] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3])
    assert seen[5] < seen[4] <= 1e-3


def test_a_run_shorter_than_its_warmup_says_so_at_the_start(tmp_path, caplog):
    t = make_trainer(tmp_path, "optim.warmup_steps=4", "trainer.max_steps=2", "trainer.eval_every=0")
    with caplog.at_level(logging.WARNING, logger="fp8train"):
        t.fit()
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(m.startswith("optim.warmup_steps=4 is longer than trainer.max_steps=2") for m in warned), warned


def test_logged_lr_is_the_lr_the_step_trained_with(tmp_path):
    # warmup 4 of 6 steps: step s trains with lr * lr_factor(s - 1); the last step's is not min_lr.
    t = make_trainer(
        tmp_path, "optim.warmup_steps=4", "optim.lr=1e-3", "trainer.max_steps=6", "trainer.eval_every=0",
        "trainer.checkpoint_every=0", "monitor=disabled",
    )  # fmt: skip
    used = []
    t.optimizer.register_step_pre_hook(lambda opt, args, kwargs: used.append(opt.param_groups[0]["lr"]))
    t.fit()
    logged = [r["lr"] for r in read_jsonl(t.run_dir / "metrics.jsonl") if "lr" in r]
    expected = [1e-3 * trainer_module.optim.lr_factor(s, t.cfg.optim, 6) for s in range(6)]
    assert used == pytest.approx(expected)
    assert logged == pytest.approx(expected)
    assert logged[:4] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3])


def test_a_run_that_stops_between_log_steps_logs_its_last_step(tmp_path):
    """With the default log_every=10, a run that diverges or stops before step 10 must still leave its last step,
    with its non-finite loss and bad_steps, in metrics.jsonl: `fp8train compare` reads the run's fate from there."""
    common = ("trainer.max_steps=20", "trainer.eval_every=0", "trainer.checkpoint_every=0", "logger.log_every=10")
    t = make_trainer(tmp_path / "diverged", *common, "trainer.max_bad_steps=3", "monitor=disabled")
    layer = t.model.get_submodule("layers.1.mlp.down_proj")
    layer.register_forward_hook(lambda m, a, out: out * math.inf if t.step >= 2 else None)
    with pytest.raises(trainer_module.DivergenceError):
        t.fit()
    rows = [r for r in read_jsonl(t.run_dir / "metrics.jsonl") if "loss" in r]
    assert [(r["step"], r["bad_steps"]) for r in rows] == [(5, 3)]
    assert rows[0]["loss"] == "nan" and rows[0]["grad_norm"] == "nan"

    t = make_trainer(tmp_path / "stopped", *common, "trainer.stop_at=3")
    t.fit()
    rows = [r for r in read_jsonl(t.run_dir / "metrics.jsonl") if "loss" in r]
    assert [(r["step"], r["tokens"]) for r in rows] == [(3, 3 * t.cfg.tokens_per_step)]


@pytest.mark.parametrize("diverges", [True, False])
def test_a_run_that_ends_in_an_error_is_marked_failed_in_wandb(tmp_path, monkeypatch, diverges):
    """wandb shows a run whose exit code is not 0 as failed: a diverged arm must not look finished in the group."""
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb"))
    t = make_trainer(
        tmp_path / "run",
        "trainer.max_steps=4",
        "trainer.eval_every=0",
        "trainer.checkpoint_every=0",
        "trainer.max_bad_steps=1",
        "monitor=disabled",
        "logger.wandb.mode=offline",
    )
    exit_codes, finish = [], t.logger.wandb.finish
    monkeypatch.setattr(t.logger.wandb, "finish", lambda **kw: (exit_codes.append(kw.get("exit_code")), finish(**kw)))
    if diverges:
        layer = t.model.get_submodule("layers.1.mlp.down_proj")
        layer.register_forward_hook(lambda m, a, out: out * math.inf if t.step >= 2 else None)
        with pytest.raises(trainer_module.DivergenceError):
            t.fit()
    else:
        t.fit()
    assert exit_codes == [1 if diverges else 0]


def test_vocab_size_comes_from_the_tokenizer_rounded_to_64(tmp_path):
    t = make_trainer(tmp_path, "data.tokenizer.vocab_size=1000")
    assert t.data.vocab_size == 1000 and t.cfg.model.vocab_size == 1024
    assert t.model.embed_tokens.weight.shape == (1024, 64)


def test_too_small_vocab_size_is_a_config_error(tmp_path):
    from fp8train.errors import ConfigError

    with pytest.raises(ConfigError, match="model.vocab_size=512: smaller than the tokenizer's 2048 token ids"):
        make_trainer(tmp_path, "model.vocab_size=512")


def test_tokens_per_s_leaves_out_validation_and_checkpoints(tmp_path, monkeypatch):
    # A clock that only moves when told: a training step takes 1 s, a validation pass or a checkpoint 100 s.
    clock = types.SimpleNamespace(now=0.0)
    monkeypatch.setattr(trainer_module, "time", types.SimpleNamespace(perf_counter=lambda: clock.now))
    t = make_trainer(
        tmp_path,
        "trainer.max_steps=6",
        "trainer.eval_every=2",
        "trainer.checkpoint_every=3",
        "logger.log_every=1",
        "monitor=disabled",
    )

    def taking(seconds: float, fn):
        def timed(*args):
            clock.now += seconds
            return fn(*args)

        return timed

    monkeypatch.setattr(t, "train_step", taking(1.0, t.train_step))
    monkeypatch.setattr(t, "evaluate", taking(100.0, t.evaluate))
    monkeypatch.setattr(t, "save_checkpoint", taking(100.0, t.save_checkpoint))
    t.fit()
    rates = [m["tokens_per_s"] for m in read_jsonl(t.run_dir / "metrics.jsonl") if "tokens_per_s" in m]
    assert rates == [t.cfg.tokens_per_step] * 6  # steps 3, 4 and 5 follow a pause, and show none of it


RESUMABLE = ("trainer.max_steps=6", "trainer.checkpoint_every=2", "trainer.eval_every=0", "optim.warmup_steps=0")


@pytest.fixture
def stopped_run(tmp_path):
    """A run stopped after step 2 with a checkpoint, lr 1e-2, weight decay 0.1."""
    make_trainer(tmp_path / "run", *RESUMABLE, "trainer.stop_at=2", "optim.lr=1e-2").fit()
    return tmp_path / "run"


def test_resuming_on_an_edited_source_names_the_file(tmp_path):
    """The same settings on other text: the refusal names the source whose text changed, not 'a file'."""
    from fp8train.errors import DataError

    text = (ROOT / "data" / "tinyshakespeare.txt").read_text()[:200_000]
    source = tmp_path / "corpus.txt"
    source.write_text(text)
    data = ("data=text", f"data.sources=[{{path: {source}}}]", f"data.cache_dir={tmp_path / 'cache'}")
    make_trainer(tmp_path / "run", *RESUMABLE, *data, "trainer.stop_at=2").fit()
    source.write_text(text + "An added line.\n")
    with pytest.raises((DataError, trainer_module.CheckpointError)) as err:
        make_trainer(tmp_path / "run", *RESUMABLE, *data, "resume=auto")
    assert f"data.sources.0.path={source}" in str(err.value) and "holds other text" in str(err.value)


def test_resuming_with_another_lr_and_weight_decay_uses_them(stopped_run):
    """After a divergence the advice is a lower optim.lr and resume=auto: the saved optimizer state must not put
    the old lr and weight decay back."""
    new = ("optim.lr=1e-3", "optim.min_lr=1e-5", "optim.weight_decay=0.01")
    t = make_trainer(stopped_run, *RESUMABLE, *new, "resume=auto")
    assert t.step == 2
    factor = trainer_module.optim.lr_factor(2, t.cfg.optim, 6)
    for group in t.optimizer.param_groups:
        assert group["lr"] == pytest.approx(1e-3 * factor)
        assert group["weight_decay"] in (0.0, 0.01)  # norms never decay
    assert {g["weight_decay"] for g in t.optimizer.param_groups} == {0.0, 0.01}
    t.train_step()  # steps the schedule too
    assert t.optimizer.param_groups[0]["lr"] == pytest.approx(1e-3 * trainer_module.optim.lr_factor(3, t.cfg.optim, 6))
    same = make_trainer(stopped_run, *RESUMABLE, "optim.lr=1e-2", "resume=auto")  # nothing changed: as saved
    assert same.optimizer.param_groups[0]["lr"] == pytest.approx(
        1e-2 * trainer_module.optim.lr_factor(2, same.cfg.optim, 6)
    )


@pytest.mark.parametrize("change", ["trainer.max_steps=10", "optim.warmup_steps=4", "optim.decay_steps=3"])
def test_resuming_with_another_schedule_trains_its_first_step_on_it(stopped_run, change):
    """Raising max_steps to train further (the README's resume command) moves the cosine; the first resumed step
    must take its lr from the new schedule, as every later one does."""
    t = make_trainer(stopped_run, *RESUMABLE, "optim.lr=1e-2", change, "resume=auto")
    max_steps = t.cfg.trainer.max_steps
    used = []
    t.optimizer.register_step_pre_hook(lambda opt, args, kwargs: used.append([g["lr"] for g in opt.param_groups]))
    t.train_step()
    t.train_step()
    for step, lrs in zip((2, 3), used):
        assert lrs == pytest.approx([1e-2 * trainer_module.optim.lr_factor(step, t.cfg.optim, max_steps)] * len(lrs))


@pytest.mark.parametrize(
    "override, named",
    [
        ("optim=adamw_fp8", "optim.name: adamw -> adamw_fp8"),
        ("model.n_layers=3", "model.n_layers: 2 -> 3"),
        ("precision=fp8_smooth", "precision.recipe: fp32 -> fp8"),
        ("model.tie_embeddings=false", "model.tie_embeddings: true -> false"),  # as the override is written
        ("optim=adamw_fp8 optim.block_size=null", "optim.block_size: 128 -> null"),
    ],
)
def test_resuming_with_settings_that_change_the_state_is_refused_by_name(stopped_run, override, named):
    before = (stopped_run / "config.yaml").read_text(), (stopped_run / "metrics.jsonl").read_text()
    with pytest.raises(trainer_module.CheckpointError, match="was written with other settings") as err:
        make_trainer(stopped_run, *RESUMABLE, "optim.lr=1e-2", *override.split(), "resume=auto")
    assert named in str(err.value) and "model.init_from=" in str(err.value)
    assert ((stopped_run / "config.yaml").read_text(), (stopped_run / "metrics.jsonl").read_text()) == before


def test_resuming_on_other_data_names_the_data_settings_that_changed(stopped_run, monkeypatch):
    """The data settings to fix, named before the weights are read (for a 7B model, a minute to wait for a refusal)."""
    from fp8train.export import hf

    monkeypatch.setattr(hf, "load_weights", lambda *args: pytest.fail("weights read before the data were checked"))
    with pytest.raises(
        trainer_module.CheckpointError,
        match=r"other tokens than this run reads: data settings changed \(data.seq_len: 64 -> 32\)",
    ):
        make_trainer(stopped_run, *RESUMABLE, "optim.lr=1e-2", "data.seq_len=32", "resume=auto")


def test_resuming_past_max_steps_or_stop_at_is_refused(stopped_run):
    with pytest.raises(trainer_module.ConfigError, match=r"trainer.max_steps=1: raise it above 2"):
        make_trainer(stopped_run, *RESUMABLE, "optim.lr=1e-2", "trainer.max_steps=1", "resume=auto")
    with pytest.raises(trainer_module.ConfigError, match=r"trainer.stop_at=2: raise it above 2, or drop it"):
        make_trainer(stopped_run, *RESUMABLE, "optim.lr=1e-2", "trainer.stop_at=2", "resume=auto")


def test_resuming_at_max_steps_trains_nothing_and_says_why(stopped_run, caplog):
    before = (stopped_run / "metrics.jsonl").read_text()
    with caplog.at_level(logging.INFO):
        t = make_trainer(stopped_run, *RESUMABLE, "optim.lr=1e-2", "trainer.max_steps=2", "resume=auto")
        assert t.fit() == {} and t.step == 2
    assert "is at trainer.max_steps=2 already: nothing to train (raise trainer.max_steps" in caplog.text
    assert (stopped_run / "metrics.jsonl").read_text() == before
    assert [p.name for p in (stopped_run / "checkpoints").iterdir()] == ["step_0000002"]


def test_a_run_without_checkpoints_is_not_overwritten_by_another_with_resume_auto(tmp_path):
    """resume=auto finds no checkpoint and starts at step 0: it must not write over another run's files."""
    make_trainer(tmp_path, "trainer.max_steps=2", "trainer.checkpoint_every=0", "trainer.eval_every=0").fit()
    for ckpt in (tmp_path / "checkpoints").iterdir():  # a run that died before its first checkpoint
        trainer_module.shutil.rmtree(ckpt)
    before = (tmp_path / "metrics.jsonl").read_text()
    with pytest.raises(trainer_module.RunDirError, match=r"model.n_layers: 2 -> 3\) and no checkpoint"):
        make_trainer(tmp_path, "trainer.max_steps=2", "model.n_layers=3", "resume=auto")
    assert (tmp_path / "metrics.jsonl").read_text() == before


def test_switching_to_or_from_habanas_fused_adam_on_resume_is_refused(tmp_path):
    """optim.habana_fused=true keeps Habana FusedAdamW's state, false AdamWFp8's (block scales): neither loads the
    other's, so the switch must be named before anything loads."""
    written = compose([*SMALL, "optim=adamw_fp8"])
    (tmp_path / "config.yaml").write_text(trainer_module.config_yaml(written))
    with pytest.raises(trainer_module.CheckpointError, match=r"optim.habana_fused: false -> true"):
        trainer_module.check_resume_settings(tmp_path, compose([*SMALL, "optim=adamw_fp8", "optim.habana_fused=true"]))
    trainer_module.check_resume_settings(tmp_path, compose([*SMALL, "optim=adamw_fp8", "optim.lr=1e-4"]))


@pytest.mark.parametrize(
    "written, resumed, refused",
    [
        # settings the run does not use may change: AdamWFp8's with optim=adamw, FP8's with a bf16 or fp32 recipe,
        # the blocks of AdamWFp8 with Habana's fused Adam (one scale per tensor), init_std (the weights are loaded)
        ("optim=adamw", "optim=adamw optim.block_size=64 optim.m_format=e5m2 optim.fp8_min_numel=0", None),
        ("precision=bf16", "precision=bf16 precision.amax_history_len=32 precision.profile=gaudi2", None),
        ("precision=fp32", "precision=fp32 precision.scaling=current precision.linears=[q_proj]", None),
        ("optim=adamw_fp8 optim.habana_fused=true", "optim=adamw_fp8 optim.habana_fused=true optim.block_size=8", None),
        ("model.init_std=0.02", "model.init_std=0.01", None),
        # the same FP8 linears listed in another order (or one twice) are the same precision
        (
            "precision=fp8",
            "precision=fp8 precision.linears=[down_proj,up_proj,gate_proj,o_proj,v_proj,k_proj,q_proj]",
            None,
        ),
        (
            "precision=fp8 precision.linears=[q_proj,k_proj]",
            "precision=fp8 precision.linears=[k_proj,q_proj,k_proj]",
            None,
        ),
        # ... and the ones it uses may not
        ("optim=adamw_fp8", "optim=adamw_fp8 optim.block_size=64", "optim.block_size: 128 -> 64"),
        ("optim=adamw", "optim=adamw_fp8 optim.block_size=64", "optim.name: adamw -> adamw_fp8; optim.block_size"),
        ("precision=fp8", "precision=fp8 precision.amax_history_len=32", "precision.amax_history_len: 16 -> 32"),
        ("precision=bf16", "precision=fp8 precision.amax_history_len=32", "precision.amax_history_len: 16 -> 32"),
        ("optim=adamw_fp8", "optim=adamw_fp8 optim.m_format=e5m2", "optim.m_format: e4m3 -> e5m2"),
        ("precision=fp8", "precision=fp8 precision.linears=[o_proj,q_proj]", "precision.linears: [q_proj,k_proj"),
    ],
)
def test_resume_compares_only_the_settings_in_effect(tmp_path, written, resumed, refused):
    (tmp_path / "config.yaml").write_text(trainer_module.config_yaml(compose([*SMALL, *written.split()])))
    if refused is None:
        trainer_module.check_resume_settings(tmp_path, compose([*SMALL, *resumed.split()]))
        return
    with pytest.raises(trainer_module.CheckpointError) as err:
        trainer_module.check_resume_settings(tmp_path, compose([*SMALL, *resumed.split()]))
    assert all(part in str(err.value) for part in refused.split("; "))


def test_in_a_multirun_the_advice_names_hydra_sweep_dir(stopped_run, monkeypatch):
    # A multirun job ignores hydra.run.dir: advice to choose a new directory, or to continue, names the sweep folder.
    monkeypatch.setattr(trainer_module, "multirun_sweep_dir", lambda: "/runs/sweep")
    with pytest.raises(trainer_module.CheckpointError) as taken:
        make_trainer(stopped_run, *RESUMABLE, "optim.lr=1e-2")  # resume=none in a run dir with checkpoints
    with pytest.raises(trainer_module.CheckpointError) as changed:
        make_trainer(stopped_run, *RESUMABLE, "optim.lr=1e-2", "model.n_layers=3", "resume=auto")
    for err in (taken, changed):
        assert "hydra.sweep.dir" in str(err.value) and "hydra.run.dir" not in str(err.value)
    t = make_trainer(stopped_run, *RESUMABLE, "optim.lr=1e-2", "resume=auto")
    for err in (t.divergence_error(), t.compile_error(RuntimeError("PassManager::run failed"))):
        assert "hydra.sweep.dir=/runs/sweep resume=auto" in str(err) and "hydra.run.dir" not in str(err)


def test_a_resumed_run_that_fails_before_its_first_checkpoint_names_the_one_it_resumed_from(stopped_run):
    # torch.compile failing at the first resumed step: the state of step 2 is still on disk and resume=auto takes it.
    t = make_trainer(stopped_run, *RESUMABLE, "optim.lr=1e-2", "resume=auto")
    message = str(t.compile_error(RuntimeError("PassManager::run failed")))
    assert f"The last checkpoint, {stopped_run / 'checkpoints' / 'step_0000002'}, is intact" in message
    assert f"hydra.run.dir={stopped_run} resume=auto backend.compile=false" in message


def test_starting_over_in_a_run_dir_ignores_settings_neither_run_reads(tmp_path):
    # A run that died before its first checkpoint may start over with the same settings; one it does not read
    # (optim.block_size with optim=adamw) is not another run.
    (tmp_path / "config.yaml").write_text(trainer_module.config_yaml(compose([*SMALL, "optim=adamw"])))
    trainer_module.check_run_dir(tmp_path, compose([*SMALL, "optim=adamw", "optim.block_size=64"]), resuming=False)
    with pytest.raises(trainer_module.RunDirError, match=r"optim.lr: 0.001 -> 0.002"):
        trainer_module.check_run_dir(tmp_path, compose([*SMALL, "optim=adamw", "optim.lr=2e-3"]), resuming=False)


def test_starting_over_in_a_run_dir_takes_fp8_linears_in_any_order(tmp_path):
    # precision.linears says which linears are FP8; the order they are listed in changes nothing.
    (tmp_path / "config.yaml").write_text(trainer_module.config_yaml(compose([*SMALL, "precision=fp8"])))
    reordered = "precision.linears=[v_proj,q_proj,k_proj,o_proj,up_proj,gate_proj,down_proj]"
    trainer_module.check_run_dir(tmp_path, compose([*SMALL, "precision=fp8", reordered]), resuming=False)
    with pytest.raises(trainer_module.RunDirError, match=r"precision.linears: \[q_proj,.*\] -> \[q_proj\]"):
        trainer_module.check_run_dir(tmp_path, compose([*SMALL, "precision=fp8", "precision.linears=[q_proj]"]), False)


def test_a_run_started_from_weights_resumes_after_they_are_deleted(stopped_run, tmp_path):
    """A resume takes its weights from its own checkpoint: the model.init_from folder it started from, still on its
    command line, may be gone (a scratch copy, a deleted import), while a fresh start still needs it."""
    weights = tmp_path / "weights"
    shutil.copytree(stopped_run / "checkpoints" / "step_0000002", weights)
    (weights / "tokenizer.json").write_text((stopped_run / "tokenizer.json").read_text())
    start = (*RESUMABLE, "optim.lr=1e-2", f"model.init_from={weights}")
    make_trainer(tmp_path / "second", *start, "trainer.stop_at=4").fit()
    shutil.rmtree(weights)
    assert make_trainer(tmp_path / "second", *start, "resume=auto").step == 4
    with pytest.raises(trainer_module.ConfigError, match=r"model.init_from=.*weights: needs a folder with model"):
        make_trainer(tmp_path / "fresh", *start, "resume=auto")  # no checkpoint to continue from: a fresh start


def test_weights_of_a_superseded_checkpoint_come_with_their_runs_tokenizer(tmp_path):
    # model.init_from checks the tokenizer saved beside the weights; a checkpoint a resume set aside in
    # checkpoints/superseded/ belongs to the same run directory and tokenizer as the others.
    (tmp_path / "tokenizer.json").write_text("{}")
    for ckpt in ("checkpoints/step_0000003", "checkpoints/superseded/after_step_0000001_20260101-000000/step_0000003"):
        (tmp_path / ckpt).mkdir(parents=True)
        assert trainer_module.tokenizer_beside(tmp_path / ckpt) == tmp_path / "tokenizer.json"


def test_weights_named_by_a_relative_path_come_with_their_runs_tokenizer(tmp_path, monkeypatch):
    # model.init_from=step_0000003 typed from inside RUN/checkpoints: the run is found by the folder's real parents.
    (tmp_path / "tokenizer.json").write_text("{}")
    (tmp_path / "checkpoints" / "step_0000003").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "checkpoints")
    assert trainer_module.tokenizer_beside(Path("step_0000003")).resolve() == tmp_path / "tokenizer.json"


@pytest.mark.parametrize("precision", ["fp8_smooth", "fp8_smooth_channel", "fp8_smooth_gaudi2"])
def test_evaluation_leaves_fp8_scaling_state_and_the_monitor_as_training_left_them(tmp_path, precision):
    """A validation pass between steps must not feed its amaxes into the delayed scales of the next step, nor
    count FP8 statistics or record outliers: every buffer (amax histories, scales, counters) and outliers.jsonl
    are what they were, and the next training step is the one it would have been without the pass."""
    runs = []
    for name in ("with_eval", "without"):
        t = Trainer(compose([*SMALL, f"precision={precision}", "monitor.interval=2"]), tmp_path / name)
        t.train_step()
        t.step += 1
        before = {k: v.clone() for k, v in t.model.state_dict().items()}
        outliers = (tmp_path / name / "outliers.jsonl").read_text()
        if name == "with_eval":
            t.evaluate()
            for k, v in t.model.state_dict().items():
                assert torch.equal(v, before[k]), k
            assert (tmp_path / name / "outliers.jsonl").read_text() == outliers
        runs.append((t.train_step()[0].item(), t.model.state_dict()))
        t.monitor.close()
    (loss_a, state_a), (loss_b, state_b) = runs
    assert loss_a == loss_b
    for k, v in state_a.items():
        assert torch.equal(v, state_b[k]), k


def test_a_resumed_run_draws_no_random_weights_and_trains_as_an_unbroken_run(tmp_path, monkeypatch):
    """A resumed model is built on the meta device and takes the checkpoint's weights: a random init first would
    cost a 7B model minutes and a second copy. Its losses and weights are those of a run that never stopped."""
    from tests.unit.test_export import no_random_init

    fp8 = ("precision=fp8_smooth", "optim=adamw_fp8", "optim.fused=false", "optim.lr=1e-2", *RESUMABLE)
    make_trainer(tmp_path / "unbroken", *fp8, "trainer.max_steps=4").fit()
    make_trainer(tmp_path / "resumed", *fp8, "trainer.max_steps=4", "trainer.stop_at=2").fit()
    no_random_init(monkeypatch)
    resumed = make_trainer(tmp_path / "resumed", *fp8, "trainer.max_steps=4", "resume=auto")
    monkeypatch.undo()
    assert resumed.step == 2
    tied = resumed.model.lm_head.weight is resumed.model.embed_tokens.weight
    assert tied == resumed.cfg.model.tie_embeddings  # one parameter, as build_model makes it
    resumed.fit()
    losses = [[m["loss"] for m in read_jsonl(tmp_path / run / "metrics.jsonl") if "loss" in m] for run in
              ("unbroken", "resumed")]  # fmt: skip
    assert len(losses[0]) == 4 and losses[0] == losses[1]
    unbroken, after = (load_file(tmp_path / run / "checkpoints/step_0000004/model.safetensors") for run in
                       ("unbroken", "resumed"))  # fmt: skip
    assert unbroken.keys() == after.keys() and all(torch.equal(v, after[k]) for k, v in unbroken.items())


@pytest.mark.parametrize("fails_in", ["build_monitor", "RunLogger"])
def test_a_trainer_that_fails_to_start_releases_the_run_dir_lock_its_files_and_wandb(tmp_path, monkeypatch, fails_in):
    """A Trainer built from Python whose start fails (here once the logger is built, or in wandb.init) leaves no
    open wandb run, metrics.jsonl handle or run directory lock behind: the next Trainer may start in that place."""
    import fcntl
    import os

    import wandb

    from fp8train import loggers

    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb"))
    opened, json_lines = [], loggers.JsonLines
    monkeypatch.setattr(loggers, "JsonLines", lambda *a, **kw: opened.append(json_lines(*a, **kw)) or opened[-1])

    def fail(*args, **kwargs):
        raise RuntimeError("injected")

    if fails_in == "build_monitor":
        monkeypatch.setattr(trainer_module, "build_monitor", fail)
    else:
        monkeypatch.setattr(wandb, "init", fail)
    run_dir = tmp_path / "run"
    with pytest.raises(RuntimeError, match="injected"):
        make_trainer(run_dir, "trainer.max_steps=2", "logger.wandb.mode=offline")
    assert wandb.run is None
    assert [f._file.closed for f in opened] == [True]
    fd = os.open(run_dir / trainer_module.RUN_DIR_LOCK, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # BlockingIOError while a failed start still holds it
    finally:
        os.close(fd)
