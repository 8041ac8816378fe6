"""The fp8train command and train.py's checks on their arguments: bad input is a message and exit status 2."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from fp8train.cli.main import main
from fp8train.cli.train import preflight, run_dir_problems, sweep_run_dir_problems
from tests.helpers import SMALL


def run_cli(*args) -> int:
    """`fp8train ARGS` in this process; its exit status (0 if it returned)."""
    try:
        main([str(a) for a in args])
    except SystemExit as e:
        return e.code
    return 0


@pytest.fixture
def a_file(tmp_path) -> Path:
    path = tmp_path / "notes.txt"
    path.write_text("a file, not a folder")
    return path


@pytest.mark.parametrize("suffix", ["", "/run", "/run_${model.name}", "/${now:%Y-%m-%d}/run"])
def test_a_run_dir_in_or_at_a_file_is_named(a_file, suffix):
    (problem,) = run_dir_problems([f"hydra.run.dir={a_file}{suffix}", "optim.lr=1e-3"])
    assert problem.startswith(f"hydra.run.dir={a_file}{suffix}: {a_file} is a file, not a folder")


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux's /proc, where no folder can be made")
@pytest.mark.parametrize("value", ["/proc/fp8train_run", "/proc/${now:%H-%M}"])
def test_a_run_dir_that_cannot_be_created_is_named(value):
    (problem,) = run_dir_problems([f"hydra.run.dir={value}"])
    assert "cannot create folders in /proc" in problem


@pytest.mark.parametrize("value", ["new/run", "new/run_${model.name}", "${now:%Y}", "."])
def test_a_run_dir_that_can_be_created_passes_and_nothing_is_made(tmp_path, monkeypatch, value):
    monkeypatch.chdir(tmp_path)
    assert run_dir_problems([f"hydra.run.dir={value}"]) == []
    assert list(tmp_path.iterdir()) == []


def outliers_run(path: Path) -> Path:
    path.mkdir()
    (path / "outliers.jsonl").write_text(json.dumps({"step": 1, "layers": [{"layer": 0, "h_amax": 2.0}]}) + "\n")
    return path


def test_report_into_an_output_that_cannot_be_created_names_out(tmp_path, a_file, capsys):
    run = outliers_run(tmp_path / "run")
    assert run_cli("report", run, "--out", a_file / "report") == 2
    err = capsys.readouterr().err
    assert f"cannot write the report into {a_file / 'report'}" in err and "pass --out" in err
    assert sorted(p.name for p in run.iterdir()) == ["outliers.jsonl"]


def test_compare_into_an_output_that_cannot_be_created_names_out(tmp_path, a_file, capsys):
    from tests.unit.test_compare import curve, make_run

    runs = [
        make_run(tmp_path / p, curve(8, range(1, 11)), curve(9, (5, 10)), [f"precision={p}"]) for p in ("bf16", "fp8")
    ]
    assert run_cli("compare", *runs, "--out", a_file) == 2
    err = capsys.readouterr().err
    assert f"cannot write the comparison into {a_file}" in err and "pass --out" in err


def test_check_refuses_a_backend_this_machine_lacks_as_training_would(monkeypatch, capsys):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert run_cli("check", "backend=cuda") == 2
    out, err = capsys.readouterr()
    assert "backend.name=cuda: no CUDA device is visible" in err and "Use backend.name=cpu" in err
    assert "config is valid" not in out


def test_check_names_the_backend_asked_for_and_the_device_it_gets(monkeypatch, capsys):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert run_cli("check", "backend=cpu") == 0
    assert "; backend cpu -> cpu (" in capsys.readouterr().out


@pytest.mark.parametrize(
    "lines",
    [
        'garbage\n{"step": 1, "layers": [\n',
        '{"step": 1}\n',
        '123\n"text"\n[1, 2]\n{"step": 1, "layers": [3]}\n',
        '{"step": 1, "layers": [], "alerts": []}\n',  # no layer measured: nothing to draw (matplotlib's traceback)
    ],
)
def test_report_on_lines_without_statistics_says_so_rather_than_empty(tmp_path, capsys, lines):
    (tmp_path / "outliers.jsonl").write_text(lines)
    assert run_cli("report", tmp_path) == 2
    err = capsys.readouterr().err
    assert "outliers.jsonl has no per-layer statistics records" in err and "is empty" not in err
    assert not (tmp_path / "report").exists()


def test_report_skips_lines_that_are_not_records(tmp_path, capsys):
    run = outliers_run(tmp_path / "run")
    with open(run / "outliers.jsonl", "a") as f:
        f.write('7\n{"step": 2}\n')
    assert run_cli("report", run, "--out", tmp_path / "report") == 0
    assert "1 monitored steps (1..1), 1 layers" in capsys.readouterr().out


def check_text(tmp_path, content: bytes, *overrides) -> list:
    """`fp8train check` on one source file holding ``content``: the arguments."""
    tmp_path.mkdir(exist_ok=True)
    source = tmp_path / "corpus.txt"
    source.write_bytes(content)
    return [
        "check",
        "backend=cpu",
        "data=text",
        f"data.sources=[{{path: {source}}}]",
        f"data.cache_dir={tmp_path / 'cache'}",
        "data.tokenizer.vocab_size=300",
        "data.seq_len=64",
        "precision=bf16",
        *overrides,
    ]


TEXT = (Path(__file__).resolve().parents[2] / "data" / "tinyshakespeare.txt").read_bytes()[:20_000]


@pytest.mark.parametrize(
    "content, overrides, expected",
    [
        (b"", [], "is empty"),
        (b"\x7fELF\x02\x01\x01\x00" + bytes(range(256)) * 4, [], "looks binary (a NUL byte at byte offset 7)"),
        (b"caf\xe9 au lait\n" * 50, [], "is not valid UTF-8: byte 0xe9"),
        (TEXT[:2000], [], "data.seq_len=64: the validation split of source 'corpus'"),
        (TEXT[:600], ["data.seq_len=500"], "data.seq_len=500: the training split holds only"),
    ],
)
def test_check_reads_the_data_and_reports_what_training_would(tmp_path, capsys, content, overrides, expected):
    """An empty, binary, non-UTF-8 or too short corpus is found by `fp8train check`, not only when training starts,
    with the message the run gives (the same code)."""
    from fp8train.config import compose
    from fp8train.data import build_data
    from fp8train.errors import DataError

    args = check_text(tmp_path, content, *overrides)
    assert run_cli(*args) == 2
    out, err = capsys.readouterr()
    assert expected in err and "config is valid" not in out
    with pytest.raises(DataError) as e:
        build_data(compose(args[1:]).data, seed=0, micro_batch_size=1, grad_accum_steps=1)
    assert err.splitlines()[-1] == f"fp8train: {e.value}"


def test_check_tokenizes_a_small_corpus_and_a_large_one_only_when_cached(tmp_path, capsys, monkeypatch):
    from fp8train.config import compose
    from fp8train.data import build_data, loader

    args = check_text(tmp_path, TEXT)
    assert run_cli(*args) == 0
    out = capsys.readouterr().out
    data = build_data(compose(args[1:]).data, seed=0, micro_batch_size=1, grad_accum_steps=1)  # finds check's cache
    assert f"# data: {data.n_train_tokens:,} train tokens ({data.n_train_windows:,} windows of 64)" in out
    assert f"vocab_size: {-(-data.vocab_size // 64) * 64}" in out  # filled in from the tokenizer, as a run does
    assert run_cli(*args, "model.vocab_size=64") == 2
    assert "model.vocab_size=64: smaller than the tokenizer's" in capsys.readouterr().err

    monkeypatch.setattr(loader, "CHECK_TOKENIZE_CHARS", len(TEXT) - 1)
    assert run_cli(*args) == 0  # cached: counted
    assert f"# data: {data.n_train_tokens:,} train tokens" in capsys.readouterr().out
    big = check_text(tmp_path / "big", TEXT + b"More.\n")
    assert run_cli(*big) == 0
    assert (
        f"# data: 1 source(s) read and checked, {len(TEXT) + 6:,} characters; not tokenized" in capsys.readouterr().out
    )
    assert not (tmp_path / "big" / "cache").exists()


def test_ctrl_c_during_check_is_a_message_and_status_130(tmp_path, capsys, monkeypatch):
    from fp8train.data import tokens

    def ctrl_c(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(tokens, "_write_tokens", ctrl_c)  # while tokenizing
    try:
        status = run_cli(*check_text(tmp_path, TEXT))
    except KeyboardInterrupt:
        status = "KeyboardInterrupt escaped: Python prints its traceback"
    assert status == 130
    assert capsys.readouterr().err == "fp8train: interrupted (Ctrl-C)\n"
    built = [p.name.split("-")[0] for p in (tmp_path / "cache").iterdir() if not p.name.endswith(".lock")]
    assert built == ["tokenizer"]  # no tokens-*, no .tmp-* (the lock files of its builds stay)


def preflight_status(argv: list[str]) -> int:
    try:
        preflight(argv)
    except SystemExit as e:
        return e.code
    return 0


@pytest.mark.parametrize(
    "sweep, named",
    [
        (["-m", "precision=bf16,fp8", "optim.lr=1e-3,-1"], "optim.lr=-1.0: must be > 0"),
        (["--multirun", "precision=bf16,fp9"], "precision=fp9: unknown option"),
        (["-m", "precision=bf16,fp8", "~trainer.max_steps"], "~trainer.max_steps: deleting a setting"),
        # a bad override beside a sweep is named alone, not with Hydra's "Ambiguous value" for the sweep
        (["-m", "precision=bf16,fp8", "optim.lrr=1"], "optim.lrr: unknown setting"),
        (["-m", "precision=bf16,fp8", "optim.lr=[1"], "optim.lr=[1: not an override Hydra can parse"),
        # a config that is a multirun by itself, its arms in hydra.sweeper.params
        (["experiment=compare_bf16_fp8", "trainer.micro_batch_size=0"], "trainer.micro_batch_size=0: must be > 0"),
        (["experiment=compare_bf16_fp8", "hydra.sweeper.params.variant='bf16,fp7'"], "variant=fp7: unknown option"),
    ],
)
def test_a_bad_job_of_a_multirun_is_refused_before_any_job_starts(tmp_path, capsys, sweep, named):
    # Without this check the jobs before the bad one train (hours, on a real sweep) and the sweep stops at it.
    flags = [a for a in sweep if a.startswith("-")]  # Hydra takes them before the overrides
    argv = [*flags, *SMALL, *(a for a in sweep if a not in flags), f"hydra.sweep.dir={tmp_path / 'sweep'}"]
    assert preflight_status(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("fp8train: Invalid configuration (1 problem)") and named in err and "Traceback" not in err
    assert not (tmp_path / "sweep").exists()
    assert preflight_status(["-m", *SMALL, "precision=bf16,fp8", "optim.lr=1e-3,2e-3"]) == 0


def test_a_sweep_folder_in_a_file_is_named_before_hydra_fails_on_it(a_file, capsys):
    argv = ["-m", *SMALL, "precision=bf16,fp32", f"hydra.sweep.dir={a_file}/sweep"]
    assert preflight_status(argv) == 2
    err = capsys.readouterr().err
    assert f"hydra.sweep.dir={a_file}/sweep: {a_file} is a file, not a folder; choose a sweep folder" in err
    assert preflight_status([*SMALL, f"hydra.sweep.dir={a_file}/sweep"]) == 0  # a single run does not use it


def test_an_interval_sweep_is_named_not_a_traceback(capsys):
    # interval(a,b) is a sweep only a sampling sweeper (Optuna, ...) can run: without -m it needs --multirun, with
    # -m Hydra's basic sweeper cannot enumerate it. Both are one message naming the override.
    assert preflight_status([*SMALL, "optim.lr=interval(0.1,0.2)"]) == 2
    err = capsys.readouterr().err
    assert "optim.lr=interval(0.1,0.2)" in err and "--multirun" in err and "Traceback" not in err
    assert preflight_status(["-m", *SMALL, "optim.lr=interval(0.1,0.2)"]) == 2
    err = capsys.readouterr().err
    assert "optim.lr=interval(0.1,0.2): Hydra's basic sweeper cannot enumerate an interval" in err
    assert "choose values" in err and "Traceback" not in err
    # and the sweep's other mistakes are named with it, not one per attempt
    assert preflight_status(["-m", *SMALL, "optim.lr=interval(0.1,0.2)", "trainer.max_steps=-1,2"]) == 2
    err = capsys.readouterr().err
    assert "Invalid configuration (2 problems)" in err and "trainer.max_steps=-1" in err, err


def test_a_glob_sweep_over_a_group_runs_its_checks_not_a_traceback(tmp_path, capsys):
    # glob(...) is Hydra's sweep over a group's options; enumerating it needs the config folder, which the checks
    # before Hydra starts lacked (HydraException: ConfigLoader is not set).
    sweep = f"hydra.sweep.dir={tmp_path / 'sweep'}"
    assert preflight_status(["-m", *SMALL, "precision=glob(fp8_smooth*,exclude=*gaudi2)", sweep]) == 0
    assert preflight_status(["-m", *SMALL, "precision=glob(fp8*)", "precision.margin=14", sweep]) == 2
    err = capsys.readouterr().err  # the one job whose profile allows only 13 is named
    assert "precision.margin=14: must be <= 13 for precision.profile=gaudi2" in err and "Traceback" not in err
    assert preflight_status([*SMALL, "precision=glob(*)"]) == 2
    err = capsys.readouterr().err
    assert "precision=glob(*)" in err and "--multirun" in err and "Traceback" not in err


@pytest.mark.parametrize("override", ["hydra.run.dirr=/tmp/x", "hydra/launcher=nosuch", "hydra.jobb.chdir=true"])
def test_a_mistyped_hydra_setting_is_a_message_and_status_2(capsys, override):
    # Hydra itself would print its error with a hint to set HYDRA_FULL_ERROR and exit 1.
    assert preflight_status([*SMALL, override]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fp8train: Invalid configuration (1 problem)") and override.split("=")[0] in err
    assert preflight_status([*SMALL, "hydra.job.chdir=false", "hydra.verbose=true"]) == 0


@pytest.mark.parametrize("cleanup_fails", [False, True])
def test_ctrl_c_while_composing_the_config_is_a_message_and_status_130(monkeypatch, capsys, cleanup_fails):
    """Ctrl-C before the run starts, also where it leaves a library to fail in its clean-up: omegaconf, restoring
    its flags on a config the interrupt left half-built, raises AttributeError on top of the KeyboardInterrupt."""
    from fp8train.cli import train

    def ctrl_c(overrides):
        try:
            raise KeyboardInterrupt
        finally:
            if cleanup_fails:
                None._invalidate_flags_cache()

    monkeypatch.setattr(train, "compose", ctrl_c)
    try:
        train.main([*SMALL, "hydra.run.dir=/nonexistent/never"])
        status = 0
    except SystemExit as e:
        status = e.code
    except BaseException as e:
        status = f"{type(e).__name__} escaped: Python prints its traceback"
    assert status == 130
    err = capsys.readouterr().err
    assert err.startswith("fp8train: interrupted (Ctrl-C)") and err.count("\n") == 1, err


def test_a_bug_is_not_taken_for_ctrl_c(monkeypatch):
    from fp8train.cli import train

    def bug(overrides):
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt:
            pass  # handled: it has nothing to do with what follows
        raise ValueError("a bug")

    monkeypatch.setattr(train, "compose", bug)
    with pytest.raises(ValueError, match="a bug"):
        train.main([*SMALL])


@pytest.mark.parametrize(
    "argv, named",
    [
        # Hydra's own errors (status 1) and tracebacks, for what it shows rather than runs
        (["--cfg", "job", "optim.lrr=1"], "optim.lrr: unknown setting"),
        (["--cfg", "job", "data.sources.2.path=x"], "data.sources.2.path=x: data.sources has 1 entry"),
        (["--info", "defaults", "model=nope"], "model=nope: unknown option"),
        (["--help", "model=nope"], "model=nope: unknown option"),
        (["--cfg", "job", "--resolve", "data.name=${nope}"], "cannot resolve an interpolation"),
        (["-m", "--cfg", "job"], "--multirun and --cfg: Hydra does one of"),
        (["--run", "--multirun"], "--run and --multirun: Hydra does one of"),
        (["--resolve"], "--resolve: only applies with --cfg"),
        (["--cfg", "hydra", "--resolve"], "which --cfg hydra leaves out; use --cfg all --resolve"),
        (["-sc"], "--shell-completion: needs one of install=SHELL"),
        (["--experimental-rerun", "/nonexistent/config.pickle"], "no such file"),
        # Hydra ignores --package without --cfg, here taking the override after it as its value: the run trained
        # into a run dir named by the date, not the one given
        (["--package", "hydra.run.dir=/tmp/x"], "it took the override hydra.run.dir=/tmp/x as its value"),
        (["-p", "model"], "--package model: only applies with --cfg"),
        # "unrecognized arguments", without a word on why
        (["optim.lr=1e-3", "-m", "precision=bf16,fp8"], "precision=bf16,fp8: Hydra takes no overrides after a flag"),
    ],
)
def test_hydra_flags_used_wrongly_are_a_message_and_status_2(capsys, argv, named):
    assert preflight_status(argv) == 2
    err = capsys.readouterr().err
    assert named in err and err.count("\n") <= 2 and "Traceback" not in err, err


@pytest.mark.parametrize(
    "argv",
    [
        ["--cfg", "job", "optim.lr=-1"],  # a config with a bad value can still be looked at
        ["--cfg", "all", "--resolve"],
        ["--cfg", "job", "-p", "optim"],
        ["--info", "defaults", "model=llama_1b"],
        ["--help"],
        ["-sc", "install=bash"],
        ["-r", *SMALL],
        ["--config-dir", "/nonexistent"],  # another config: Hydra checks it
    ],
)
def test_hydra_flags_used_rightly_pass(argv):
    assert preflight_status(argv) == 0


@pytest.mark.parametrize(
    "argv, named",
    [
        (["hydra.run.dir=/tmp/runs/${nope}"], "hydra.run.dir=/tmp/runs/${nope}: cannot resolve an interpolation"),
        (["hydra.run.dir=/tmp/runs/${oc.env:FP8TRAIN_NO_SUCH_VARIABLE}"], "Environment variable 'FP8TRAIN_NO_SUCH_"),
        (["-m", "hydra.sweep.dir=/tmp/sweep/${nope}", "precision=bf16,fp32"], "hydra.sweep.dir=/tmp/sweep/${nope}: "),
    ],
)
def test_a_run_dir_hydra_cannot_fill_in_is_named_before_its_traceback(capsys, argv, named):
    flags = [a for a in argv if a.startswith("-")]
    assert preflight_status([*flags, *SMALL, *(a for a in argv if a not in flags)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fp8train: Invalid configuration (1 problem)") and named in err, err
    # what Hydra fills in when the job starts passes
    assert preflight_status([*SMALL, "hydra.run.dir=/tmp/runs/${now:%H}_${hydra.job.name}_${data.name}"]) == 0


def test_a_precision_beside_a_comparison_is_named_once_before_any_arm_trains(capsys):
    assert preflight_status(["-m", *SMALL, "experiment=compare_bf16_fp8", "precision=fp32"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fp8train: Invalid configuration (1 problem)") and "precision=fp32: the chosen variant" in err


def test_a_run_dir_given_to_a_multirun_is_refused_naming_the_sweep_folder(tmp_path, capsys):
    # A multirun puts its jobs in hydra.sweep.dir: hydra.run.dir was ignored and the runs went to multirun/<date>/.
    run_dir = tmp_path / "mine"
    for argv in (
        ["-m", *SMALL, "precision=bf16,fp32", f"hydra.run.dir={run_dir}"],
        [*SMALL, "experiment=compare_bf16_fp8", f"hydra.run.dir={run_dir}"],  # a multirun by its config
    ):
        assert preflight_status(argv) == 2
        err = capsys.readouterr().err
        assert f"hydra.run.dir={run_dir}: a multirun puts its jobs in hydra.sweep.dir" in err, err
        assert f"hydra.sweep.dir={run_dir}" in err and err.count("\n") == 2
        assert not run_dir.exists()
    # with the sweep folder given too, the run dir is a leftover the sweep does not need
    assert sweep_run_dir_problems([f"hydra.run.dir={run_dir}", f"hydra.sweep.dir={tmp_path / 's'}"]) == []


@pytest.fixture
def finished_wandb_runs(monkeypatch) -> list:
    """(run id, exit code) of each wandb run finished from now on."""
    from wandb.sdk.wandb_run import Run

    finished, finish = [], Run.finish

    def spy(run, exit_code=None):
        finished.append((run.id, exit_code))
        finish(run, exit_code=exit_code)

    monkeypatch.setattr(Run, "finish", spy)
    yield finished
    import wandb

    if wandb.run is not None:  # left open by a failing test: not to leak into the next one
        finish(wandb.run)


def test_an_error_exit_with_a_process_group_up_finishes_the_wandb_run_first(tmp_path, monkeypatch, finished_wandb_runs):
    # os._exit skips wandb's exit hook: an offline run's .wandb file was left with its 7-byte header alone, every
    # metric logged to it lost.
    import torch.distributed as dist
    import wandb

    from fp8train.cli import train
    from fp8train.config import compose
    from fp8train.loggers import RunLogger

    logger = RunLogger(compose(["logger.wandb.mode=offline"]), tmp_path)
    logger.log({"loss": 2.0}, step=1)
    run_id = logger.wandb.id
    ended = []

    def os_exit(status):
        ended.append((status, wandb.run))
        raise SystemExit(status)

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(train.os, "_exit", os_exit)
    with pytest.raises(SystemExit):
        train.exit_with(2)
    assert ended == [(2, None)] and finished_wandb_runs == [(run_id, 2)]


def test_a_job_of_a_multirun_failing_with_its_wandb_run_open_does_not_lend_it_to_the_next(
    tmp_path, monkeypatch, capsys, finished_wandb_runs
):
    # wandb.init returns the run still open: the next job logged into the failed job's wandb run.
    from fp8train import trainer
    from fp8train.cli import train
    from fp8train.errors import DataError

    def damaged(*args, **kwargs):  # as a resumed job's unreadable outliers.jsonl is, after its wandb run started
        raise DataError("outliers.jsonl cannot be read")

    monkeypatch.setattr(trainer, "build_monitor", damaged)
    root = logging.getLogger()  # Hydra's logging set-up, its console handler on capsys' stream, goes with the test
    monkeypatch.setattr(root, "handlers", list(root.handlers))
    monkeypatch.setattr(root, "level", root.level)
    sweep = tmp_path / "sweep"
    argv = ["-m", *SMALL, "logger.wandb.mode=offline", "precision=bf16,fp32", f"hydra.sweep.dir={sweep}"]
    with pytest.raises(SystemExit) as e:
        train.main(argv)
    assert e.value.code == 2 and "2 of 2 jobs of this multirun failed" in capsys.readouterr().err
    ids = [(job / "wandb_id").read_text() for job in sorted(p for p in sweep.iterdir() if p.is_dir())]
    assert finished_wandb_runs == [(ids[0], 2), (ids[1], 2)] and ids[0] != ids[1]


@pytest.fixture
def no_launcher(monkeypatch):
    """An environment that no launcher set: none of RANK, LOCAL_RANK, WORLD_SIZE and mpirun's."""
    from fp8train.config import LAUNCH_VARS

    for names in LAUNCH_VARS.values():
        for name in names:
            monkeypatch.delenv(name, raising=False)


@pytest.mark.parametrize(
    "env", [{"RANK": "3", "WORLD_SIZE": "16"}, {"OMPI_COMM_WORLD_RANK": "3", "OMPI_COMM_WORLD_SIZE": "16"}]
)
def test_a_config_error_of_a_multi_rank_launch_is_one_paragraph_from_rank_0_and_a_line_from_each_other(
    monkeypatch, capsys, no_launcher, env
):
    # Every rank printed the same paragraph, none saying whose it was: 16 identical paragraphs for 16 ranks.
    import socket

    argv = [*SMALL, "optim.lr=-1", "trainer.max_steps=0"]
    assert preflight_status(argv) == 2
    single = capsys.readouterr().err
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert preflight_status(argv) == 2
    line = capsys.readouterr().err
    assert line == (
        f"fp8train: rank 3 of 16 ({socket.gethostname()}): optim.lr=-1.0: must be > 0; trainer.max_steps=0: must be "
        "> 0\n"
    )
    monkeypatch.setenv(next(iter(env)), "0")
    assert preflight_status(argv) == 2
    assert capsys.readouterr().err == single and single.startswith("fp8train: Invalid configuration (2 problems):\n")


@pytest.mark.parametrize(
    "env, named",
    [
        # ValueError's traceback from int(), after Hydra had created the run dir
        ({"LOCAL_RANK": "abc"}, "parallel=deepspeed: LOCAL_RANK=abc in the environment is not a rank number"),
        ({"RANK": "0", "WORLD_SIZE": " 2x", "LOCAL_RANK": "0"}, "WORLD_SIZE= 2x in the environment is not a number"),
        # DeepSpeed, missing RANK, went looking for MPI: "No module named 'mpi4py'" in a traceback
        ({"WORLD_SIZE": "2"}, "WORLD_SIZE=2 in the environment, but no RANK"),
        ({"RANK": "2", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}, "RANK=2 in the environment is not below WORLD_SIZE=2"),
        ({"OMPI_COMM_WORLD_RANK": "-1", "OMPI_COMM_WORLD_SIZE": "2"}, "OMPI_COMM_WORLD_RANK=-1 in the environment is"),
    ],
)
def test_a_launch_environment_that_names_no_rank_is_a_message_before_the_run_dir_is_made(
    tmp_path, monkeypatch, capsys, no_launcher, env, named
):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    run_dir = tmp_path / "run"
    assert preflight_status([*SMALL, "parallel=deepspeed", f"hydra.run.dir={run_dir}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fp8train: Invalid configuration (1 problem)") and named in err, err
    assert "unset it" in err and not run_dir.exists()
    assert preflight_status([*SMALL, f"hydra.run.dir={run_dir}"]) == 0  # parallel=single does not read it


@pytest.mark.parametrize(
    "argv", [["hydra.run.dir="], ["hydra.run.dir=''"], ["-m", "hydra.sweep.dir=", "precision=bf16,fp32"]]
)
def test_an_empty_run_dir_is_refused_not_taken_for_the_current_folder(capsys, argv):
    # hydra.run.dir=$RUN_DIR with the variable unset: the run wrote config.yaml, metrics.jsonl, checkpoints/, ... in
    # among the files of the folder it was started from.
    flags = [a for a in argv if a.startswith("-")]
    assert preflight_status([*flags, *SMALL, *(a for a in argv if a not in flags)]) == 2
    err = capsys.readouterr().err
    given = argv[1] if flags else argv[0]
    assert f"{given}: empty (an unset shell variable?); name the folder, or leave the override out" in err, err


def test_jobs_of_a_multirun_sharing_a_run_dir_are_refused_before_the_first_trains(tmp_path, capsys):
    # The second job found the first one's checkpoints and failed, after the first had trained; its message named
    # hydra.sweep.dir, not the subdir that made them share.
    from fp8train.cli.train import shared_subdir_problems

    jobs = [[*SMALL, f"optim.lr={lr}"] for lr in (1e-3, 2e-3)]
    (problem,) = shared_subdir_problems([[*job, "hydra.sweep.subdir=${precision.name}"] for job in jobs])
    assert problem.startswith("hydra.sweep.subdir=${precision.name}: jobs #0 and #1 would share the run directory ")
    assert "fp8_smooth," in problem and "put what the sweep varies in it, or ${hydra.job.num}" in problem
    assert shared_subdir_problems([[*job, "hydra.sweep.subdir=${precision.name}_${optim.lr}"] for job in jobs]) == []
    assert shared_subdir_problems([[*job, "hydra.sweep.subdir=${now:%H}"] for job in jobs]) == []  # filled in later
    sweep = ["-m", *SMALL, "optim.lr=1e-3,2e-3", f"hydra.sweep.dir={tmp_path / 's'}", "hydra.sweep.subdir=x"]
    assert preflight_status(sweep) == 2
    assert "hydra.sweep.subdir=x: jobs #0 and #1 would share the run directory x," in capsys.readouterr().err
    assert not (tmp_path / "s").exists()


def test_hydra_changing_into_the_run_dir_is_refused(tmp_path, capsys):
    # Hydra changed into the run dir after the checks: data/tinyshakespeare.txt was then "no such file", looked for
    # in the run dir, which was left behind with a train.log.
    argv = [*SMALL, "hydra.job.chdir=true", f"hydra.run.dir={tmp_path / 'run'}"]
    assert preflight_status(argv) == 2
    err = capsys.readouterr().err
    assert "hydra.job.chdir=true: fp8train reads the config's relative paths (data.sources" in err, err
    assert "leave it out" in err and not (tmp_path / "run").exists()
    assert preflight_status([*SMALL, "hydra.job.chdir=false"]) == 0


def test_ctrl_c_with_a_process_group_up_ends_as_an_error_exit_does(monkeypatch, capsys):
    # sys.exit(130): the interpreter's teardown with gloo's threads running, which could abort it (SIGABRT) instead.
    import torch.distributed as dist

    from fp8train import cli

    def os_exit(status):
        raise SystemExit(f"os._exit({status})")

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(cli.os, "_exit", os_exit)
    with pytest.raises(SystemExit) as e:
        cli.interrupted()
    assert e.value.code == "os._exit(130)" and capsys.readouterr().err.startswith("fp8train: interrupted (Ctrl-C)")


@pytest.mark.parametrize("suffix", ["", "/run", "/${now:%H}"])
def test_a_run_dir_in_or_at_a_link_to_nothing_is_named(tmp_path, suffix):
    # Hydra's mkdir failed on it: FileExistsError's traceback.
    link = tmp_path / "latest"
    link.symlink_to(tmp_path / "deleted")
    (problem,) = run_dir_problems([f"hydra.run.dir={link}{suffix}"])
    assert f"{link} is a link to {tmp_path / 'deleted'}, which does not exist" in problem, problem


@pytest.mark.parametrize("value", ['"~/runs/mine"', "'~/runs/${now:%H}'"])
def test_a_run_dir_under_a_tilde_is_refused_naming_home(value):
    # Hydra expands no ~ (and parses none unquoted): quoted, it made a folder named ~ in the current folder, one
    # `rm -rf ~` away from the home folder.
    for key in ("hydra.run.dir", "hydra.sweep.dir"):
        (problem,) = run_dir_problems([f"{key}={value}"], key)
        assert problem.startswith(f"{key}={value}: Hydra does not expand ~") and "$HOME/" in problem, problem
