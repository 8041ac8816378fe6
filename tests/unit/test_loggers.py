"""metrics.jsonl and wandb run identity."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import os
from collections.abc import Iterator

import pytest

from fp8train.config import compose
from fp8train.errors import Fp8trainError
from fp8train.loggers import RunLogger, drop_unwritable_log_files, read_metrics
from tests.helpers import damage_jsonl


def test_metrics_lines_and_non_finite_values(tmp_path):
    cfg = compose(["logger.wandb.mode=disabled"])
    logger = RunLogger(cfg, tmp_path)
    logger.log({"loss": 2.5, "lr": 1e-3}, step=1)
    logger.log({"val_loss": math.nan}, step=1)
    logger.finish()
    assert read_metrics(tmp_path) == [{"step": 1, "loss": 2.5, "lr": 1e-3}, {"step": 1, "val_loss": "nan"}]


def test_resume_drops_the_lines_of_steps_that_will_be_redone(tmp_path):
    cfg = compose(["logger.wandb.mode=disabled"])
    (tmp_path / "metrics.jsonl").write_text(
        "".join(json.dumps({"step": s, "loss": s}) + "\n" for s in range(1, 8)) + '{"step": 8, "lo'
    )  # a torn line from a killed run
    logger = RunLogger(cfg, tmp_path, resume_step=5)
    logger.log({"loss": 60.0}, step=6)
    logger.finish()
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3, 4, 5, 6]
    assert read_metrics(tmp_path)[-1]["loss"] == 60.0


def test_resume_keeps_the_lines_that_are_no_steps_record_as_they_were(tmp_path, caplog):
    """A note added by hand, or another tool's line, belongs to no step the resumed run redoes: it stays, word for
    word (a "step" that is no number once stopped the run with a TypeError); only later steps and a torn line go."""
    kept = ['{"step": 1, "loss": 1.0}', "# lowered optim.lr here", '{"note": "node 3 replaced"}',
            '{"step": "7", "by": "another tool"}', '{"step": null}', "[1, 2]", '{"step":5,"loss":5.0}']  # fmt: skip
    path = tmp_path / "metrics.jsonl"
    path.write_text("\n".join([*kept, '{"step": 6, "loss": 6.0}']) + '\n{"step": 7, "lo')
    with caplog.at_level(logging.INFO):
        RunLogger(compose(["logger.wandb.mode=disabled"]), tmp_path, resume_step=5).finish()
    assert path.read_text() == "\n".join(kept) + "\n"
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 5]  # what compare reads: the step records
    assert "metrics.jsonl: 5 lines that are no step's record (line 2: # lowered optim.lr here) are kept" in caplog.text


def test_resume_cuts_a_linked_metrics_file_where_it_lies_and_keeps_the_link(tmp_path):
    """A metrics.jsonl linked to a file elsewhere (a shared dashboard folder): the cut replaced the link by a copy,
    and the file it pointed to stopped getting the run's lines."""
    elsewhere = tmp_path / "shared" / "run.jsonl"
    elsewhere.parent.mkdir()
    elsewhere.write_text("".join(json.dumps({"step": s, "loss": s}) + "\n" for s in range(1, 5)))
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.jsonl").symlink_to(elsewhere)
    logger = RunLogger(compose(["logger.wandb.mode=disabled"]), tmp_path / "run", resume_step=2)
    logger.log({"loss": 30.0}, step=3)
    logger.finish()
    assert (tmp_path / "run" / "metrics.jsonl").is_symlink()
    assert [r["step"] for r in read_metrics(tmp_path / "run")] == [1, 2, 3] and elsewhere.read_text().count("\n") == 3


def test_wandb_run_is_named_after_the_precision_and_grouped(tmp_path):
    cfg = compose(["logger.wandb.mode=offline", "precision=fp32", "logger.wandb.group=compare"])
    logger = RunLogger(cfg, tmp_path)
    try:
        assert logger.wandb.name == "tiny-fp32-s1234"
        assert logger.wandb.group == "compare"
        assert logger.wandb.config["precision"]["recipe"] == "fp32"
        run_id = logger.wandb.id
    finally:
        logger.finish()
    assert (tmp_path / "wandb_id").read_text() == run_id
    resumed = RunLogger(cfg, tmp_path)
    try:
        assert resumed.wandb.id == run_id  # a resumed run continues the same wandb run
    finally:
        resumed.finish()


def test_non_main_ranks_write_nothing(tmp_path):
    logger = RunLogger(compose([]), tmp_path, enabled=False)
    logger.log({"loss": 1.0}, step=1)
    logger.finish()
    assert not (tmp_path / "metrics.jsonl").exists() and not (tmp_path / "wandb").exists()


def test_wandb_online_without_a_login_is_a_message_naming_offline(tmp_path, monkeypatch):
    """No API key and no stdin to ask for one: wandb raises; the user gets the fix, not a traceback."""
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc holding a key
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb_config"))
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    cfg = compose(["logger.wandb.mode=online"])
    with pytest.raises(Fp8trainError, match=r"logger.wandb.mode=online: .*logger.wandb.mode=offline"):
        RunLogger(cfg, tmp_path)


def test_wandb_online_without_a_network_is_a_message_naming_offline(tmp_path, monkeypatch):
    """No route to the wandb server: wandb.init gives up with a CommError; the user gets the fix, not a traceback."""
    import wandb

    def unreachable(**kwargs):
        raise wandb.errors.CommError("Failed to get resume status for run x: context deadline exceeded\nwhile ...")

    monkeypatch.setattr(wandb, "init", unreachable)
    cfg = compose(["logger.wandb.mode=online"])
    with pytest.raises(Fp8trainError) as e:
        RunLogger(cfg, tmp_path)
    message = str(e.value)
    assert message.startswith("logger.wandb.mode=online: wandb could not start (Failed to get resume status")
    assert "logger.wandb.mode=offline" in message and "\n" not in message


@pytest.mark.parametrize("damage", ["binary", "directory", "not objects"])
def test_resuming_over_a_damaged_metrics_file_is_one_message(tmp_path, damage):
    # A run directory whose metrics.jsonl is no JSON-lines file (a disk error, another tool's output): resume=auto
    # names the file and what to do instead of ending in a traceback, and leaves it as it was.
    path = tmp_path / "metrics.jsonl"
    damage_jsonl(path, damage, '{"step": 1, "loss": 2.0}\n123\n[1, 2]\n{"step": 9, "loss": 1.0}\n')
    if damage == "not objects":  # JSON values that are no records are dropped like a torn line, the rest kept
        RunLogger(compose(["logger.wandb.mode=disabled"]), tmp_path, resume_step=5).finish()
        assert read_metrics(tmp_path) == [{"step": 1, "loss": 2.0}]
        return
    with pytest.raises(Fp8trainError) as e:
        RunLogger(compose(["logger.wandb.mode=disabled"]), tmp_path, resume_step=5)
    message = str(e.value)
    assert message.startswith(f"{path} cannot be read (") and "Move it out of the run directory" in message
    assert path.is_dir() if damage == "directory" else path.read_bytes() == b"\xff\xfe\x00garbage\n"


@contextlib.contextmanager
def on_the_root_logger(handlers: list[logging.Handler]) -> Iterator[None]:
    """``handlers`` on the root logger for the block, removed after it (also any the block appends to the list)."""
    root = logging.getLogger()
    for handler in handlers:
        root.addHandler(handler)
    try:
        yield
    finally:
        for handler in handlers:
            root.removeHandler(handler)


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full, a file every write to fails: ENOSPC")
def test_a_log_file_on_a_full_disk_is_named_once_not_a_traceback_per_line(capsys):
    # Hydra's RUN_DIR/train.log on a full disk: logging printed "--- Logging error ---" and a traceback for every
    # line logged (200 lines before the run's own message about the disk).
    console = io.StringIO()
    with on_the_root_logger([logging.FileHandler("/dev/full"), logging.StreamHandler(console)]):
        drop_unwritable_log_files()
        for n in range(3):
            logging.getLogger("fp8train").warning("line %d", n)
    err = capsys.readouterr().err
    assert err == "fp8train: /dev/full cannot be written (No space left on device): the log goes to the console only\n"
    assert console.getvalue() == "line 0\nline 1\nline 2\n"


def test_a_console_closed_under_the_log_is_named_once_not_a_traceback_per_line(capsys):
    # python train.py | head: every line logged after head exited printed logging's traceback (BrokenPipeError).
    read, write = os.pipe()
    os.close(read)  # head has exited
    closed = os.fdopen(write, "w")
    train_log = io.StringIO()
    handlers = [logging.StreamHandler(closed), logging.StreamHandler(train_log)]
    try:
        with on_the_root_logger(handlers):
            drop_unwritable_log_files()
            for n in range(2):
                logging.getLogger("fp8train").warning("line %d", n)
            handlers.append(logging.StreamHandler(closed))  # as tqdm's, over the same stream, during training
            logging.getLogger().addHandler(handlers[-1])
            logging.getLogger("fp8train").warning("line 2")
    finally:
        closed.close()
    err = capsys.readouterr().err
    assert err == (
        f"fp8train: {closed.name} cannot be written (Broken pipe): the log goes on in the run directory's train.log\n"
    )
    assert train_log.getvalue() == "line 0\nline 1\nline 2\n"
