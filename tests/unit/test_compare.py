"""fp8train compare on hand-written run directories: sweep folders, unequal lengths, diverged and
incomparable runs. (tests/integration/test_compare.py trains the real four arms.)"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from fp8train.cli.compare import compare
from fp8train.config import compose
from fp8train.errors import Fp8trainError
from fp8train.trainer import config_yaml
from tests.helpers import ROOT, SMALL, saved_figures

TOKENS_PER_STEP = 8 * 64


def make_run(
    path: Path,
    losses: dict[int, float | str],
    val: dict[int, float],
    overrides: tuple[str, ...] = (),
    max_steps: int = 10,
    world: int = 1,
    bad_steps: int = 0,
) -> Path:
    """A run directory as the trainer leaves it: config.yaml and metrics.jsonl (non-finite values as strings)."""
    path.mkdir(parents=True)
    cfg = compose([*SMALL, f"trainer.max_steps={max_steps}", *overrides])
    (path / "config.yaml").write_text(config_yaml(cfg))
    rows = [
        {"step": s, "loss": loss, "tokens": s * TOKENS_PER_STEP * world, "tokens_per_s": 1000.0, "bad_steps": bad_steps}
        for s, loss in losses.items()
    ]
    rows += [{"step": s, "val_loss": v} for s, v in val.items()]
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in sorted(rows, key=lambda r: r["step"])))
    return path


def rows_of(table: str) -> dict[str, dict[str, str]]:
    lines = [ln for ln in table.splitlines() if ln.startswith("| ")]
    head = [c.strip() for c in lines[0].strip("|").split("|")]
    return {
        cells[0]: dict(zip(head, cells, strict=True))
        for cells in ([c.strip() for c in ln.strip("|").split("|")] for ln in lines[1:])
    }


def curve(start: float, steps: range, factor: float = 1.0) -> dict[int, float]:
    return {s: factor * start / math.sqrt(s) for s in steps}


def test_a_sweep_folder_stands_for_its_runs_and_its_other_files_are_skipped(tmp_path):
    sweep = tmp_path / "multirun"
    make_run(sweep / "0_bf16", curve(8, range(1, 11)), curve(9, (5, 10)), ["precision=bf16"])
    val = {5: 9 / math.sqrt(5) * 1.03, 10: 9 / math.sqrt(10) * 1.02}
    make_run(sweep / "1_fp8", curve(8, range(1, 11), 1.01), val, ["precision=fp8"])
    (sweep / "multirun.yaml").write_text("hydra: {}\n")
    table = compare([sweep], sweep / "compare")
    rows = rows_of(table)
    assert list(rows) == ["bf16", "fp8"]
    assert rows["fp8"]["val gap to ref"] == "+2.00%" and rows["fp8"]["train gap to ref"] == "+1.00%"
    assert rows["fp8"]["largest val gap"] == "+3.00% (step 5)"
    # A shell glob over the sweep brings its multirun.yaml and the compare/ output of the last call: skipped, said.
    again = compare(sorted(sweep.iterdir()), tmp_path / "again")
    assert list(rows_of(again)) == ["bf16", "fp8"]
    assert f"skipped {sweep / 'multirun.yaml'}: not a run directory" in again
    assert f"skipped {sweep / 'compare'}: not a run directory" in again


def test_runs_of_different_lengths_compare_at_their_common_steps_and_say_where(tmp_path):
    ref = make_run(tmp_path / "bf16", curve(8, range(1, 21)), curve(9, (10, 20)), ["precision=bf16"], max_steps=20)
    short_val = {10: 9 / math.sqrt(10) * 1.03}
    short = make_run(tmp_path / "fp8", curve(8, range(1, 13), 0.99), short_val, ["precision=fp8"], max_steps=20)
    rows = rows_of(compare([ref, short], tmp_path / "out"))
    fp8 = rows["fp8"]
    assert fp8["steps"] == "12" and fp8["val gap to ref"] == "+3.00% (step 10)"
    assert fp8["train gap to ref"] == "-1.00%"  # at step 12, its last: no step named
    assert fp8["notes"] == "stopped at step 12 of 20"
    assert rows["bf16"]["notes"] == ""


def test_a_diverged_run_is_marked_not_passed_off_as_finished(tmp_path):
    ref = make_run(tmp_path / "bf16", curve(8, range(1, 11)), curve(9, (5, 10)), ["precision=bf16"])
    losses: dict[int, float | str] = {**curve(8, range(1, 4)), 4: "nan", 5: "inf", 6: 7.62}
    diverged = make_run(tmp_path / "fp8", losses, {}, ["precision=fp8"], bad_steps=2)
    fp8 = rows_of(compare([ref, diverged], tmp_path / "out"))["fp8"]
    assert fp8["final val_loss"] == "n/a" and fp8["val gap to ref"] == "n/a" and fp8["largest val gap"] == "n/a"
    assert (
        fp8["notes"] == "stopped at step 6 of 10; 2 steps skipped (non-finite loss or gradients); no validation points"
    )


@pytest.mark.parametrize(
    "overrides, world, reason",
    [
        (["data.val_fraction=0.2"], 1, "data"),
        ([], 2, "batch"),  # two data-parallel ranks: twice the tokens per step, same config.yaml
        (["trainer.eval_batches=2"], 1, "validation set"),
        (["trainer.seed=7"], 1, "seed"),
        (["model.n_layers=3"], 1, "model"),
    ],
)
def test_runs_that_differ_in_what_the_curves_depend_on_are_not_comparable(tmp_path, overrides, world, reason):
    ref = make_run(tmp_path / "bf16", curve(8, range(1, 11)), curve(9, (5, 10)), ["precision=bf16"])
    other = make_run(
        tmp_path / "fp8", curve(8, range(1, 11)), curve(9, (5, 10)), ["precision=fp8", *overrides], world=world
    )
    rows = rows_of(compare([ref, other], tmp_path / "out"))
    assert rows["fp8"]["comparable"].startswith(f"no: different {reason} (")
    assert rows["bf16"]["comparable"] == "yes"


@pytest.mark.parametrize(
    "overrides, max_steps, cell",
    [
        (["optim.lr=0.002"], 10, "no: different lr schedule (optim.lr 0.002 vs 0.001)"),
        (["optim.warmup_steps=2"], 10, "no: different lr schedule (optim.warmup_steps 2 vs 30)"),
        (["optim.schedule=constant"], 10, "no: different lr schedule (optim.schedule constant vs cosine)"),
        (
            ["optim.decay_steps=40"],
            10,
            "no: different lr schedule (trainer.max_steps None vs 10, optim.decay_steps 40 vs None)",
        ),
        # the cosine decays over trainer.max_steps: another length is another lr at every step after warmup
        ([], 20, "no: different lr schedule (trainer.max_steps 20 vs 10)"),
        (
            ["optim.weight_decay=0.0", "optim.grad_clip=0.5"],
            10,
            "no: different optimizer (optim.weight_decay 0.0 vs 0.1, optim.grad_clip 0.5 vs 1.0)",
        ),
        (["trainer.seed=7"], 10, "no: different seed (trainer.seed 7 vs 1234)"),
        (["data.seq_len=32"], 10, "no: different data, batch (data.seq_len 32 vs 64, tokens per step 256 vs 512)"),
    ],
)
def test_a_run_not_comparable_says_which_settings_differ(tmp_path, overrides, max_steps, cell):
    """The loss at a step depends on the learning rate that step had: runs trained with other lr, schedule or
    optimizer settings are not comparable either; and the cell names the settings, so nobody diffs configs."""
    ref = make_run(tmp_path / "bf16", curve(8, range(1, 11)), curve(9, (5, 10)), ["precision=bf16"])
    tokens = 8 * int(next((o.split("=")[1] for o in overrides if o.startswith("data.seq_len")), 64))
    other = make_run(
        tmp_path / "fp8",
        curve(8, range(1, 11)),
        curve(9, (5, 10)),
        ["precision=fp8", *overrides],
        max_steps=max_steps,
        world=tokens / TOKENS_PER_STEP,
    )
    rows = rows_of(compare([ref, other], tmp_path / "out"))
    assert rows["fp8"]["comparable"] == cell
    assert rows["bf16"]["comparable"] == "yes"


def test_nothing_to_compare_is_one_clear_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(Fp8trainError, match="not an fp8train run directory"):
        compare([tmp_path / "empty"], tmp_path / "out")
    result = subprocess.run(
        [sys.executable, "-m", "fp8train.cli.main", "compare", str(tmp_path / "empty")],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2 and "not an fp8train run directory" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_run_with_no_logged_step_yet_is_not_called_a_different_batch(tmp_path):
    """Killed before its first logged step, a run's tokens per step is unknown, not different."""
    ref = make_run(tmp_path / "bf16", curve(8, range(1, 11)), curve(9, (5, 10)), ["precision=bf16"])
    empty = make_run(tmp_path / "fp8", {}, {}, ["precision=fp8"])
    fp8 = rows_of(compare([ref, empty], tmp_path / "out"))["fp8"]
    assert fp8["comparable"] == "yes" and fp8["final loss"] == "n/a"
    assert fp8["notes"] == "stopped at step 0 of 10; no validation points"


def test_a_folder_whose_config_is_not_fp8trains_is_one_clear_error(tmp_path, capsys):
    from fp8train.cli.main import main

    ref = make_run(tmp_path / "bf16", curve(8, range(1, 11)), curve(9, (5, 10)), ["precision=bf16"])
    other = make_run(tmp_path / "other", curve(8, range(1, 11)), {}, ["precision=fp8"])
    (other / "config.yaml").write_text("lr: 0.1\nmodel: resnet\n")  # another tool's run: same file names
    with pytest.raises(SystemExit) as exit_:
        main(["compare", str(ref), str(other), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert exit_.value.code == 2
    assert f"{other / 'config.yaml'}: not the config.yaml of an fp8train run" in err and "precision" in err


def test_two_sweeps_with_the_same_arm_folders_are_told_apart(tmp_path):
    """Two multiruns of compare_bf16_fp8 (two seeds, say) name their arms' folders alike: the labels then carry the
    sweep's folder as well, or the table would hold two rows of the same name."""
    for sweep in ("seed1", "seed2"):
        make_run(tmp_path / sweep / "0_bf16", curve(8, range(1, 11)), curve(9, (5, 10)), ["precision=bf16"])
        make_run(tmp_path / sweep / "1_fp8", curve(8, range(1, 11)), curve(9, (5, 10)), ["precision=fp8"])
    rows = rows_of(compare([tmp_path / "seed1", tmp_path / "seed2"], tmp_path / "out"))
    assert list(rows) == ["bf16 (seed1/0_bf16)", "fp8 (seed1/1_fp8)", "bf16 (seed2/0_bf16)", "fp8 (seed2/1_fp8)"]


def test_a_final_loss_from_before_the_runs_last_step_names_its_step(tmp_path):
    """A run whose last logged losses are NaN shows its last finite loss: the cell says which step that was, as the
    gap cells do, so a diverged arm's 'final loss' is not read as where it ended."""
    ref = make_run(tmp_path / "bf16", curve(8, range(1, 11)), curve(9, (5, 10)), ["precision=bf16"])
    losses: dict[int, float | str] = {**curve(8, range(1, 9)), 9: "nan", 10: "nan"}
    diverged = make_run(tmp_path / "fp8", losses, {5: 4.2}, ["precision=fp8"], bad_steps=2)
    fp8 = rows_of(compare([ref, diverged], tmp_path / "out"))["fp8"]
    assert fp8["steps"] == "10"
    assert fp8["final loss"] == f"{8 / math.sqrt(8):.4f} (step 8)" and fp8["final val_loss"] == "4.2000 (step 5)"
    assert rows_of(compare([ref, diverged], tmp_path / "out"))["bf16"]["final loss"] == f"{8 / math.sqrt(10):.4f}"


def test_the_same_global_batch_split_otherwise_is_comparable(tmp_path):
    """Step k trains on the same sequences however its global batch is split (micro batch x accumulation x
    ranks): a 2-rank run of micro batch 4 compares with one process of micro batch 8, or of 4 x 2 accumulated."""
    ref = make_run(tmp_path / "bf16", curve(8, range(1, 11)), curve(9, (5, 10)), ["precision=bf16"])
    ranks = make_run(
        tmp_path / "fp8", curve(8, range(1, 11)), curve(9, (5, 10)), ["precision=fp8", "trainer.micro_batch_size=4"]
    )
    ranks_tokens = json.loads((ranks / "metrics.jsonl").read_text().splitlines()[0])["tokens"]
    assert ranks_tokens == TOKENS_PER_STEP  # make_run's world=1 default: as two ranks of 4 would log
    accum = make_run(
        tmp_path / "fp8_smooth",
        curve(8, range(1, 11)),
        curve(9, (5, 10)),
        ["precision=fp8_smooth", "trainer.micro_batch_size=4", "trainer.grad_accum_steps=2"],
    )
    rows = rows_of(compare([ref, ranks, accum], tmp_path / "out"))
    assert rows["fp8"]["comparable"] == "yes" and rows["fp8_smooth"]["comparable"] == "yes"


def test_tokens_per_s_of_a_run_with_one_logged_line_is_a_dash_not_nan(tmp_path):
    # The first logged window holds the warm-up and is left out of the mean: a run that logged one line (one step, or
    # logger.log_every as long as the run) has no speed to show.
    ref = make_run(tmp_path / "bf16", curve(8, range(1, 4)), {}, ["precision=bf16"], max_steps=3)
    short = make_run(tmp_path / "fp8", {1: 8.0}, {1: 9.0}, ["precision=fp8"], max_steps=1)
    rows = rows_of(compare([ref, short], tmp_path / "out"))
    assert rows["bf16"]["tokens/s"] == "1,000" and rows["fp8"]["tokens/s"] == "-"


def test_folders_in_a_sweep_that_are_not_runs_are_skipped_with_a_note(tmp_path):
    # A sweep folder also holds submitit's .submitit/, a user's notes, another tool's run, a job that died before it
    # logged: each is named as skipped, and the runs are compared.
    sweep = tmp_path / "multirun"
    make_run(sweep / "0_bf16", curve(8, range(1, 11)), curve(9, (5, 10)), ["precision=bf16"])
    make_run(sweep / "1_fp8", curve(8, range(1, 11), 1.01), curve(9, (5, 10)), ["precision=fp8"])
    (sweep / ".submitit" / "123_0").mkdir(parents=True)
    (sweep / ".submitit" / "123_0" / "123_0_submitted.pkl").write_bytes(b"\x80\x04")
    (sweep / "notes").mkdir()
    (sweep / "notes" / "todo.txt").write_text("try lr 3e-4\n")
    other = make_run(sweep / "other_tool", curve(8, range(1, 11)), {}, ["precision=fp8"])
    (other / "config.yaml").write_text("lr: 0.1\nmodel: resnet\n")
    (sweep / "2_died" / ".hydra").mkdir(parents=True)
    (sweep / "3_bad_lines").mkdir()
    (sweep / "3_bad_lines" / "config.yaml").write_text((sweep / "0_bf16" / "config.yaml").read_text())
    (sweep / "3_bad_lines" / "metrics.jsonl").write_bytes(b"\xff\xfe\x00garbage\n")
    table = compare([sweep], tmp_path / "out")
    assert list(rows_of(table)) == ["bf16", "fp8"]
    for name in (".submitit", "notes", "2_died"):
        assert f"skipped {sweep / name}: not an fp8train run directory (needs metrics.jsonl and config.yaml)" in table
    assert f"skipped {other}: {other / 'config.yaml'}: not the config.yaml of an fp8train run" in table
    assert f"skipped {sweep / '3_bad_lines'}: {sweep / '3_bad_lines' / 'metrics.jsonl'} cannot be read" in table
    # a sweep folder with no run at all is still one clear error, naming why its run-like folders are none
    (tmp_path / "nothing" / "notes").mkdir(parents=True)
    with pytest.raises(Fp8trainError, match="not an fp8train run directory"):
        compare([tmp_path / "nothing"], tmp_path / "out2")
    shutil.move(other, tmp_path / "nothing")
    with pytest.raises(Fp8trainError, match="not the config.yaml of an fp8train run"):
        compare([tmp_path / "nothing"], tmp_path / "out2")


def test_one_run_compares_without_a_matplotlib_warning(tmp_path, recwarn):
    # The gap panel of a single run has no curve: a legend call there printed "No artists with labels found".
    only = make_run(tmp_path / "bf16", curve(8, range(1, 11)), curve(9, (5, 10)), ["precision=bf16"])
    compare([only], tmp_path / "out")
    assert not [w for w in recwarn if "legend" in str(w.message)]
    assert (tmp_path / "out" / "compare.png").stat().st_size > 10_000


def test_a_run_named_twice_is_one_row(tmp_path):
    # `fp8train compare SWEEP SWEEP/0_bf16` (or a glob that overlaps) named one run twice: two rows with the same
    # numbers, labelled by their whole path.
    sweep = tmp_path / "multirun"
    ref = make_run(sweep / "0_bf16", curve(8, range(1, 11)), curve(9, (5, 10)), ["precision=bf16"])
    make_run(sweep / "1_fp8", curve(8, range(1, 11), 1.01), curve(9, (5, 10)), ["precision=fp8"])
    rows = rows_of(compare([sweep, ref, sweep / "1_fp8" / ".." / "1_fp8"], tmp_path / "out"))
    assert list(rows) == ["bf16", "fp8"]


def test_a_step_logged_twice_counts_its_last_line_whatever_its_value(tmp_path):
    # A metrics.jsonl that holds a killed run's lines after the checkpoint and then the resumed run's for the same
    # steps: the resumed lines win, as in `fp8train report`, even where they are non-finite (the resumed run
    # diverged), and the replaced lines count for nothing else either (tokens/s, skipped steps).
    ref = make_run(tmp_path / "bf16", curve(8, range(1, 11)), curve(9, (5, 10)), ["precision=bf16"])
    run = make_run(tmp_path / "fp8", curve(8, range(1, 11)), curve(9, (5, 10)), ["precision=fp8"])
    killed = (run / "metrics.jsonl").read_text()
    resumed = [
        {
            "step": s,
            "loss": 8 / math.sqrt(s) if s < 7 else "nan",
            "tokens": s * TOKENS_PER_STEP,
            "tokens_per_s": 3000.0,
            "bad_steps": max(0, s - 6),
        }
        for s in range(4, 11)
    ]
    resumed.append({"step": 10, "val_loss": "nan"})
    (run / "metrics.jsonl").write_text(killed + "".join(json.dumps(r) + "\n" for r in resumed))
    fp8 = rows_of(compare([ref, run], tmp_path / "out"))["fp8"]
    assert fp8["final loss"] == f"{8 / math.sqrt(6):.4f} (step 6)"
    assert fp8["final val_loss"] == f"{9 / math.sqrt(5):.4f} (step 5)"
    assert fp8["tokens/s"] == "3,000"  # steps 2-3 at 1000, then 4-10 at 3000 (with the replaced lines: 2,000)
    assert fp8["notes"] == "4 steps skipped (non-finite loss or gradients)"
    # one killed run's step logged twice with finite values: the later line counts
    (run / "metrics.jsonl").write_text(killed + json.dumps({"step": 10, "loss": 1.5, "tokens_per_s": 1000.0}) + "\n")
    assert rows_of(compare([ref, run], tmp_path / "out2"))["fp8"]["final loss"] == "1.5000"


def test_the_plot_names_each_run_where_it_has_a_curve(tmp_path, monkeypatch):
    # A run with no validation point at a step the reference has (not evaluated yet, or on other steps) has no gap
    # curve: the gap panel's legend listed it all the same, beside no line.
    ref = make_run(tmp_path / "bf16", curve(8, range(1, 11)), curve(9, (5, 10)), ["precision=bf16"])
    fp8 = make_run(tmp_path / "fp8", curve(8, range(1, 11)), curve(9, (5, 10)), ["precision=fp8"])
    early = make_run(tmp_path / "fp8_smooth", curve(8, range(1, 5)), {}, ["precision=fp8_smooth"])
    figures = saved_figures(monkeypatch)
    compare([ref, fp8, early], tmp_path / "out")
    train, val, gap = figures["compare.png"].axes
    assert [t.get_text() for t in train.get_legend().get_texts()] == ["bf16", "fp8", "fp8_smooth"]
    assert [t.get_text() for t in val.get_legend().get_texts()] == ["bf16", "fp8"]
    assert [t.get_text() for t in gap.get_legend().get_texts()] == ["fp8"]
    assert (train.get_xlabel(), train.get_ylabel(), gap.get_ylabel()) == ("step", "loss", "%")


def test_tokens_per_s_of_a_resumed_run_leaves_out_the_warm_up_of_each_start(tmp_path):
    # Each start of a run (the first, then every resume) compiles and fills caches in its first logged window, and
    # a monitored step compiles a second graph: a run resumed twice logged three such slow windows (as a compiled run
    # stopped at step 32 and resumed logged 150 and 177 tokens/s among ~5,800). The steady speed is the run's speed.
    ref = make_run(tmp_path / "bf16", curve(8, range(1, 11)), curve(9, (5, 10)), ["precision=bf16"], max_steps=20)
    run = make_run(tmp_path / "fp8", curve(8, range(1, 21)), curve(9, (10, 20)), ["precision=fp8"], max_steps=20)
    speeds = {1: 20.0, 8: 150.0, 15: 177.0}  # the first window of each start
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    for r in rows:
        if "loss" in r:
            r["tokens_per_s"] = speeds.get(r["step"], 1000.0 + r["step"])
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    fp8 = rows_of(compare([ref, run], tmp_path / "out"))["fp8"]
    assert fp8["tokens/s"] == "1,010"  # the median of the 19 windows after step 1's: 150, 177, 1002..1020


def test_a_run_with_one_logged_loss_is_drawn(tmp_path):
    # A run that logged one training line (logger.log_every as long as the run, or killed after its first line) was
    # a line of one point in the train panel: nothing drawn, its legend entry beside no curve.
    import numpy as np
    from PIL import Image

    ref = make_run(tmp_path / "bf16", curve(8, range(1, 11)), curve(9, (5, 10)), ["precision=bf16"])
    one = make_run(tmp_path / "fp8", {10: 2.0}, {10: 2.5}, ["precision=fp8"])
    compare([ref, one], tmp_path / "out")
    image = np.asarray(Image.open(tmp_path / "out" / "compare.png").convert("RGB")).astype(int)
    train_panel = image[:, : image.shape[1] // 3]
    orange = np.abs(train_panel - [0xFF, 0x7F, 0x0E]).sum(axis=-1) < 60  # fp8's colour, the cycle's second
    assert orange.sum() > 50  # its point (the legend's thin line alone has none of the exact colour)


def test_a_reference_loss_of_zero_has_no_gap_rather_than_a_crash(tmp_path):
    # A tiny corpus learnt by heart reaches a loss of exactly 0.0 in float32: no relative gap to it exists there.
    ref = make_run(tmp_path / "bf16", {**curve(8, range(1, 10)), 10: 0.0}, {5: 2.0, 10: 0.0}, ["precision=bf16"])
    run = make_run(tmp_path / "fp8", curve(8, range(1, 11)), {5: 2.2, 10: 0.1}, ["precision=fp8"])
    fp8 = rows_of(compare([ref, run], tmp_path / "out"))["fp8"]
    assert fp8["val gap to ref"] == "+10.00% (step 5)" and fp8["largest val gap"] == "+10.00% (step 5)"
    assert fp8["train gap to ref"] == "+0.00% (step 9)"


def test_a_constant_lr_does_not_depend_on_min_lr(tmp_path):
    # optim.min_lr is where a cosine ends; a constant schedule never reads it (nor trainer.max_steps).
    constant = ["optim.schedule=constant"]
    ref = make_run(tmp_path / "bf16", curve(8, range(1, 11)), curve(9, (5, 10)), ["precision=bf16", *constant])
    other = make_run(
        tmp_path / "fp8", curve(8, range(1, 11)), curve(9, (5, 10)), ["precision=fp8", *constant, "optim.min_lr=0"]
    )
    longer = make_run(tmp_path / "fp8_smooth", curve(8, range(1, 11)), {}, ["precision=fp8_smooth", *constant], 20)
    rows = rows_of(compare([ref, other, longer], tmp_path / "out"))
    assert rows["fp8"]["comparable"] == "yes" and rows["fp8_smooth"]["comparable"] == "yes"


def test_a_run_validated_at_other_steps_than_the_reference_says_why_it_has_no_gap(tmp_path):
    # Gaps are taken at the steps both runs validated: with trainer.eval_every 3 against 5, and stopped before the last
    # step, there is none, and "n/a" alone read as a run that never validated.
    ref = make_run(tmp_path / "bf16", curve(8, range(1, 11)), curve(9, (5, 10)), ["precision=bf16"])
    other = make_run(tmp_path / "fp8", curve(8, range(1, 8)), curve(9, (3, 6)), ["precision=fp8"])
    fp8 = rows_of(compare([ref, other], tmp_path / "out"))["fp8"]
    assert fp8["val gap to ref"] == "n/a" and fp8["final val_loss"] == f"{9 / math.sqrt(6):.4f} (step 6)"
    assert fp8["notes"] == "stopped at step 7 of 10; no validation step in common with the reference"


@pytest.mark.parametrize(
    "line",
    [
        {"step": 11, "loss": True},  # was read as a loss of 1.0
        {"step": 10, "loss": 2.0, "bad_steps": True},  # was "True step skipped"
        {"step": 1e308, "loss": 1.0},  # the steps column read 1e+308
        {"step": True, "loss": 1.0},
        {"step": 2.5, "loss": 1.0},
    ],
)
def test_a_hand_edited_value_of_another_json_type_is_not_read_as_a_number(tmp_path, line):
    from fp8train.cli.compare import Run

    losses = {s: 3.0 - 0.1 * s for s in range(1, 11)}
    clean = Run.load(make_run(tmp_path / "clean", losses, {10: 2.5}))
    path = make_run(tmp_path / "edited", losses, {10: 2.5})
    with open(path / "metrics.jsonl", "a") as f:
        f.write(json.dumps(line) + "\n")
    edited = Run.load(path)
    assert edited.train == clean.train
    assert edited.skipped_steps == clean.skipped_steps == 0
    if not isinstance(line["step"], int) or isinstance(line["step"], bool):  # no step at all
        assert edited.last_step == clean.last_step == 10
