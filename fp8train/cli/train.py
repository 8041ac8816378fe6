"""Hydra entry point of a training run, shared by ``python train.py`` and ``fp8train train``."""

from __future__ import annotations

import argparse
import os
import socket
import sys
import tempfile
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from fp8train.cli import exit_with, interrupted, interruptible
from fp8train.config import (
    CONF_DIR,
    compose,
    compose_untyped,
    first_line,
    launch_vars,
    override_parser,
    override_problems,
    register_schema,
    to_typed,
)
from fp8train.errors import BackendError, ConfigError, Fp8trainError
from fp8train.loggers import drop_unwritable_log_files, finish_open_wandb

register_schema()


def fail(error: Fp8trainError) -> None:
    """Print a user-fixable problem as a message alone (no traceback) and exit with status 2.

    Every rank of a launch checks the same command line, mostly with the same result: rank 0 prints the message,
    the other ranks one line each naming their rank and host, so that one whose problem differs (its node lacks the
    device, or a file) still shows it, without the same paragraph once per rank."""
    launch = launch_rank()
    if launch is None or launch[0] == 0:
        print(f"fp8train: {error}", file=sys.stderr)
    else:
        text = "; ".join(error.problems) if isinstance(error, ConfigError) else str(error)
        print(
            f"fp8train: rank {launch[0]} of {launch[1]} ({socket.gethostname()}): {' '.join(text.split())}",
            file=sys.stderr,
        )
    exit_with(2)


def launch_rank() -> tuple[int, int] | None:
    """(rank, world size) of a launch of several ranks as its launcher's environment gives them (deepspeed,
    torchrun, mpirun); None for a single process, or an environment that does not say (or contradicts itself)."""
    found, problems = launch_vars()
    rank, world_size = found.get("rank"), found.get("world_size", 1)
    return (rank, world_size) if rank is not None and world_size > 1 and not problems else None


class Sweep:
    """The jobs of the Hydra multirun this process runs, and those that ended in an Fp8trainError.

    A job's Fp8trainError (a diverged run, a kernel the compiler cannot build, unusable data) does not stop the
    sweep: the jobs after it still train (a diverging fp8 arm of compare_bf16_fp8 is a result, and the fp8_smooth
    arms after it are the point), and the sweep ends with a summary of the failures and status 2.
    """

    jobs: dict[int, list[str]] = {}  # job number -> its overrides
    failed: dict[int, tuple[Path, Fp8trainError]] = {}  # job number -> (run dir, error)

    @classmethod
    def reset(cls) -> None:
        cls.jobs, cls.failed = {}, {}

    @classmethod
    def summary(cls, stopped: str = "") -> str | None:
        """One paragraph naming each failed job (its own overrides, run dir) and why, in short, and ``stopped``:
        why the jobs after the last one do not start, if they do not; None if no job failed."""
        if not cls.failed:
            return None
        # A job is named by its overrides that are not every job's (what the sweep varies), with one job by none.
        everywhere = set.intersection(*(set(o) for o in cls.jobs.values())) if cls.jobs else set()
        named = []
        for num, (run_dir, error) in sorted(cls.failed.items()):
            own = " ".join(o for o in cls.jobs.get(num, []) if o not in everywhere)
            named.append(f"#{num}{' ' + own if own else ''} ({run_dir}): {short_reason(error)}")
        n = len(cls.failed)
        return (
            f"fp8train: {n} of {len(cls.jobs)} jobs of this multirun {'so far ' if stopped else ''}failed: "
            f"{'; '.join(named)}. {stopped}"
            f"{'Its message' if n == 1 else 'Their messages'} above say{'s' if n == 1 else ''} what to change"
            + ("; the other jobs' results stand." if n < len(cls.jobs) else ".")
        )


def short_reason(error: Fp8trainError) -> str:
    """The gist of an error's message: its problems for a config error, else its first clause (at most ~200
    characters)."""
    if isinstance(error, ConfigError):
        text = "; ".join(error.problems)
    else:
        text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        text = min((text.split(sep, 1)[0] for sep in ("; ", ". ")), key=len).rstrip(".")
    return text if len(text) <= 200 else text[:199].rstrip() + "…"


def one_process() -> bool:
    """Whether this process trains alone. With several ranks, or a DeepSpeed process group still up after a job
    that failed in it, other ranks may be waiting for this one in a collective: the process must exit, so that
    the launcher stops them, rather than go on to the next job."""
    import torch.distributed as dist

    return launch_vars()[0].get("world_size", 1) <= 1 and not (dist.is_available() and dist.is_initialized())


def preflight(argv: list[str]) -> None:
    """Validate the composed config and an explicit hydra.run.dir before Hydra creates the run directory, so a
    typo leaves nothing behind and a run dir Hydra cannot create is a message, not Hydra's traceback.

    A multirun (-m, or a config that sets hydra.mode=MULTIRUN, as experiment=compare_bf16_fp8 does) has the config
    of every job checked, so that a bad value in one job stops the sweep before any job trains, rather than after
    the jobs before it. With Hydra's flags that show rather than run (--cfg, --info, --help), only what Hydra would
    stop at with a traceback or its own error is checked (flags it cannot combine, overrides it cannot apply), so
    that a config can still be looked at; with another config (--config-dir, ...) Hydra does the work.
    """
    args = hydra_args(argv)
    problems = hydra_flag_problems(args)
    if args.config_path or args.config_name or args.config_dir or args.experimental_rerun:
        if problems:
            fail(ConfigError(problems))
        return
    overrides = args.overrides
    if args.cfg or args.info or args.help or args.hydra_help or args.shell_completion:
        if not args.shell_completion:
            try:
                problems += compose_untyped(overrides)[1]
            except ConfigError as e:
                problems += e.problems
        if args.resolve and args.cfg in ("job", "all") and not problems:
            try:
                compose(overrides)
            except ConfigError as e:  # only the interpolations --resolve fills in; the values are on show
                problems += [p for p in e.problems if "cannot resolve an interpolation" in p]
        if problems:
            fail(ConfigError(problems))
        return
    problems += run_dir_problems(overrides) + chdir_problems(overrides)
    missing_backends = []
    jobs, sweep_problems = sweep_jobs(overrides, multirun=args.multirun)
    problems += sweep_problems
    if jobs is not None:
        problems += run_dir_problems(overrides, "hydra.sweep.dir") + sweep_run_dir_problems(overrides)
        problems += shared_subdir_problems(jobs)
    problems += dir_interpolation_problems(
        overrides, ("hydra.run.dir",) if jobs is None else ("hydra.sweep.dir", "hydra.sweep.subdir")
    )
    for job in jobs or [overrides]:
        try:
            cfg = compose(job)  # hydra.* overrides too: a mistyped one is then a message, not Hydra's error
        except ConfigError as e:
            problems += [p for p in e.problems if p not in problems]
        except Fp8trainError as e:
            fail(e)
        else:
            from fp8train.backends import unavailable  # imports torch, which the run needs next anyway

            if (problem := unavailable(cfg.backend)) and problem not in missing_backends:
                missing_backends.append(problem)
    problems += missing_backends
    if problems:
        fail(ConfigError(problems))


def hydra_args(argv: list[str]) -> argparse.Namespace:
    """The command line as Hydra's own parser reads it. What that parser refuses ends here as Hydra would end it
    (usage and status 2), except overrides after a flag, which it refuses without saying why."""
    from hydra._internal.utils import get_args_parser

    parser = get_args_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and not any(a.startswith("-") for a in extra):
        flag = next(a for a in reversed(argv[: argv.index(extra[0])]) if a.startswith("-"))
        fail(
            Fp8trainError(
                f"{' '.join(extra)}: Hydra takes no overrides after a flag ({flag} here); put the flags "
                f"(-m, --cfg job, ...) before the first override"
            )
        )
    return parser.parse_args(argv) if extra else args


SHELL_COMPLETION = ("install", "uninstall", "query")  # what --shell-completion does, one at a time


def hydra_flag_problems(args: argparse.Namespace) -> list[str]:
    """Hydra's flags used in a way Hydra ends with a traceback, or silently ignores."""
    problems = []
    commands = [
        flag
        for flag, given in (
            ("--run", args.run),
            ("--multirun", args.multirun),
            ("--cfg", args.cfg),
            ("--info", args.info),
            ("--shell-completion", args.shell_completion),
        )
        if given
    ]
    if len(commands) > 1:
        problems.append(
            f"{' and '.join(commands)}: Hydra does one of --run, --multirun, --cfg, --info and "
            "--shell-completion at a time; give only one"
        )
    if args.resolve and not (args.cfg or args.help):
        problems.append("--resolve: only applies with --cfg (the config with its interpolations filled in) or --help")
    if args.cfg == "hydra" and args.resolve:
        problems.append(
            "--cfg hydra --resolve: the run directory's name (hydra.run.dir, hydra.sweep.subdir) is filled in from "
            "model.name, precision.name and data.name, which --cfg hydra leaves out; use --cfg all --resolve"
        )
    if args.package is not None and not args.cfg:
        took = f"; it took the override {args.package} as its value" if "=" in args.package else ""
        problems.append(
            f"--package {args.package}: only applies with --cfg, to show one part of the config, and Hydra ignores "
            f"it otherwise{took}; leave it out, or add --cfg job"
        )
    if args.shell_completion:
        subcommands = [o.split("=", 1)[0] for o in args.overrides if o.split("=", 1)[0] in SHELL_COMPLETION]
        if len(subcommands) != 1:
            problems.append(
                f"--shell-completion: needs one of {', '.join(f'{c}=SHELL' for c in SHELL_COMPLETION)}, e.g. "
                "--shell-completion install=bash"
            )
    if args.experimental_rerun and not Path(args.experimental_rerun).is_file():
        problems.append(
            f"--experimental-rerun {args.experimental_rerun}: no such file (fp8train runs write no Hydra "
            "config.pickle: hydra.output_subdir is null); continue a run with hydra.run.dir=RUN_DIR resume=auto"
        )
    return problems


def sweep_jobs(overrides: list[str], multirun: bool) -> tuple[list[list[str]] | None, list[str]]:
    """The overrides of each job Hydra's basic sweeper would launch (the config's hydra.sweeper.params, then the
    command line's), when ``overrides`` start a multirun (None for a single run), and the sweeps it cannot launch
    (an interval) as config problems. An override Hydra cannot parse goes to every job as it is, for composing to
    name it; an interval it cannot launch is left out of the jobs, so that their other problems are named too."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.types import ValueType
    from omegaconf import OmegaConf

    parser = override_parser()
    parsed, unparsed, intervals = [], [], []
    for arg in overrides:
        try:
            (o,) = parser.parse_overrides([arg])  # which sets the config loader a glob(...) sweep needs
        except Exception:
            unparsed.append(arg)
            continue
        if o.value_type == ValueType.INTERVAL_SWEEP:  # only a sampling sweeper takes it; composing names it alone
            intervals.append(arg)
            unparsed.append(arg)
        else:
            parsed.append(o)
    # The config with each swept value at its first choice, less overrides composing would refuse: whether it is a
    # multirun, and its sweeper's params.
    first = [
        f"{o.get_key_element()}={next(iter(o.sweep_string_iterator()))}" if o.is_sweep_override() else o.input_line
        for o in parsed
    ]
    params, raw = {}, None
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            raw = hydra_compose(config_name="config", overrides=override_problems(first)[1], return_hydra_config=True)
        multirun = multirun or str(OmegaConf.select(raw, "hydra.mode")) == "RunMode.MULTIRUN"
        params = raw.hydra.sweeper.get("params") or {}
    except Exception:  # the config itself does not compose: the jobs' composing names why
        pass
    if not multirun:
        return None, []
    sweeper = str(OmegaConf.select(raw, "hydra.sweeper._target_", default="")) if raw is not None else ""
    problems = []
    if intervals and sweeper.endswith("BasicSweeper"):
        problems = [
            f"{arg}: Hydra's basic sweeper cannot enumerate an interval; choose values "
            f"({arg.split('=', 1)[0]}=A,B,C or range(start,stop,step))"
            for arg in intervals
        ]
        unparsed = [arg for arg in unparsed if arg not in intervals]
    try:
        swept = parser.parse_overrides([f"{k}={v}" for k, v in params.items()]) + parsed
        (jobs,) = BasicSweeper.split_arguments(swept, max_batch_size=None)
    except Exception:  # a sweep the basic sweeper cannot do (an interval): Hydra says so itself
        return None, problems
    return [[*job, *unparsed] for job in jobs], problems


def run_dir_problems(argv: list[str], key: str = "hydra.run.dir") -> list[str]:
    """Why an explicit hydra.run.dir (or a multirun's hydra.sweep.dir, with ``key``) cannot be a run directory (the
    folder of a sweep's run directories): Hydra would fail creating it with a traceback.

    Only the part before the first ``${...}`` is checked (the folder it names, or the folder it ends in),
    so nothing is created and interpolations Hydra fills in at start-up (``${now:...}``) need no resolving.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser

    args = [a for a in argv if f"{key}=" in a]
    try:
        overrides = OverridesParser.create().parse_overrides(args)
    except Exception:  # Hydra reports malformed overrides itself
        return []
    problems = []
    for o in overrides:
        value = o.value()
        if o.key_or_group != key or not isinstance(value, str):
            continue
        if not value:  # Hydra would take the folder the run is started from, its files among the run's
            default = "runs/DATE_..." if key == "hydra.run.dir" else "multirun/DATE"
            problems.append(
                f"{o.input_line}: empty (an unset shell variable?); name the folder, or leave the override out "
                f"for {default}"
            )
            continue
        if value.startswith("~"):  # a folder named ~ in the current one, one `rm -rf ~` from the home folder
            problems.append(
                f"{o.input_line}: Hydra does not expand ~ (it would make a folder named ~ in the current one); "
                "write the home folder out instead ($HOME/..., or what `echo $HOME` prints)"
            )
            continue
        fixed = value.split("${", 1)[0]
        if "${" in value:  # the run dir is a folder yet to be named inside this one
            problem = folder_problem(Path(fixed if fixed.endswith("/") else Path(fixed).parent), inside=True)
        else:
            problem = folder_problem(Path(value))
        if problem:
            what = "a run directory" if key == "hydra.run.dir" else "a sweep folder"
            problems.append(f"{key}={value}: {problem}; choose {what} in a writable folder")
    return problems


def chdir_problems(overrides: list[str]) -> list[str]:
    """hydra.job.chdir=true: Hydra would change into the run directory after the checks, and every relative path of
    the config (the data, its cache, a checkpoint to resume) would be looked for there."""
    parser = override_parser()
    for arg in overrides:
        try:
            (o,) = parser.parse_overrides([arg])
        except Exception:  # composing names it
            continue
        if o.key_or_group == "hydra.job.chdir" and o.value() is True:
            return [
                f"{arg}: fp8train reads the config's relative paths (data.sources, data.cache_dir, resume, "
                "model.init_from) from the folder it is started in, and writes into the run directory by its path: "
                "leave it out"
            ]
    return []


def sweep_run_dir_problems(overrides: list[str]) -> list[str]:
    """A multirun's hydra.run.dir without hydra.sweep.dir: Hydra ignores it, and the jobs would train in
    multirun/DATE/ rather than where the user looks for them."""
    given = {a.split("=", 1)[0].lstrip("+"): a for a in overrides if "=" in a}
    if "hydra.run.dir" not in given or "hydra.sweep.dir" in given:
        return []
    arg = given["hydra.run.dir"]
    return [
        f"{arg}: a multirun puts its jobs in hydra.sweep.dir (one hydra.sweep.subdir each) and ignores "
        f"hydra.run.dir; give hydra.sweep.dir={arg.split('=', 1)[1]} instead"
    ]


def shared_subdir_problems(jobs: list[list[str]]) -> list[str]:
    """Jobs of a multirun whose hydra.sweep.subdir comes out the same: the later one would meet the earlier one's
    run directory after that trained, and stop there. A subdir with ${hydra.job.num} (the default) keeps them apart;
    one with ${now:...} is filled in as each job starts, so it is not compared."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from omegaconf import OmegaConf

    by_subdir: dict[str, list[int]] = {}
    template = None
    for num, job in enumerate(jobs):
        try:
            with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
                raw = hydra_compose(
                    config_name="config",
                    overrides=[*override_problems(job)[1], f"hydra.job.num={num}"],
                    return_hydra_config=True,
                )
            template = str(OmegaConf.to_container(raw.hydra.sweep)["subdir"])  # as written, ${...} unresolved
            if "hydra.job.num" in template or "${now:" in template:
                return []
            by_subdir.setdefault(str(OmegaConf.select(raw, "hydra.sweep.subdir")), []).append(num)
        except Exception:  # a job that does not compose, or an interpolation that fails: named by the other checks
            return []
    return [
        f"hydra.sweep.subdir={template}: jobs {', '.join(f'#{n}' for n in nums[:-1])} and #{nums[-1]} would share "
        f"the run directory {subdir or 'hydra.sweep.dir itself'}, a later one meeting the earlier one's files after "
        "it trained; put what the sweep varies in it, or ${hydra.job.num}"
        for subdir, nums in by_subdir.items()
        if len(nums) > 1
    ]


def dir_interpolation_problems(overrides: list[str], keys: tuple[str, ...]) -> list[str]:
    """Overrides of a run or sweep folder (``keys``) with a ``${...}`` Hydra cannot fill in: a key no config has, a
    resolver that does not exist, an unset environment variable. Hydra would fail creating it, with a traceback.
    Keys Hydra sets only when the job starts (hydra.job.num, ...) pass."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from omegaconf import OmegaConf
    from omegaconf.errors import InterpolationKeyError, InterpolationResolutionError, UnsupportedInterpolationType

    given = {a.split("=", 1)[0].lstrip("+"): a for a in overrides if "=" in a and "${" in a}
    if not any(key in given for key in keys):
        return []
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            raw = hydra_compose(
                config_name="config", overrides=override_problems(overrides)[1], return_hydra_config=True
            )
    except Exception:  # the config itself does not compose: composing it for the run names why
        return []
    problems = []
    for key in (k for k in keys if k in given):
        try:
            OmegaConf.select(raw, key)
        except InterpolationResolutionError as e:
            unset_env = first_line(e).startswith("KeyError raised while resolving")  # oc.env of an unset variable
            if isinstance(e, (InterpolationKeyError, UnsupportedInterpolationType)) or unset_env:
                problems.append(f"{given[key]}: cannot resolve an interpolation: {first_line(e)}")
    return problems


def folder_problem(folder: Path, inside: bool = False) -> str | None:
    """Why ``folder`` can be neither used nor created (``inside``: why no folder can be created in it), or None."""
    existing = folder
    while not existing.exists() and existing != existing.parent:
        if existing.is_symlink():  # mkdir would meet it as a file that exists
            return f"{existing} is a link to {os.readlink(existing)}, which does not exist"
        existing = existing.parent
    if not existing.is_dir():
        return f"{existing} is a file, not a folder"
    if existing == folder and not inside:
        return None if os.access(folder, os.W_OK | os.X_OK) else f"{folder} is not writable"
    # A test folder, removed at once, is the only sure test: as root, os.access says yes to /proc.
    try:
        tempfile.TemporaryDirectory(dir=existing).cleanup()
    except OSError as e:
        return f"cannot create folders in {existing} ({e.strerror or e})"
    return None


@hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")
def hydra_main(raw: DictConfig) -> None:
    from hydra.types import RunMode

    from fp8train.trainer import Trainer, unlock_run_dir

    drop_unwritable_log_files()  # Hydra's RUN_DIR/train.log
    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    if multirun:
        Sweep.jobs[hydra_cfg.job.num] = list(hydra_cfg.overrides.task)
    try:
        cfg = to_typed(raw)
        try:
            Trainer(cfg, run_dir).fit()
        except (MemoryError, RuntimeError) as e:
            if (error := memory_error(e, cfg)) is None:
                raise
            raise error from None
        finally:  # the next job of a multirun, or another process, may use this directory now
            unlock_run_dir(run_dir)
    except Fp8trainError as e:
        if not multirun:
            fail(e)
        # The message as a single run prints it, naming the job; the sweep goes on (see Sweep) where it can.
        print(f"fp8train: job #{hydra_cfg.job.num} of this multirun ({run_dir}) failed: {e}", file=sys.stderr)
        Sweep.failed[hydra_cfg.job.num] = (run_dir, e)
        finish_open_wandb(2)  # an error before the trainer closed it: the next job would log into it
        if not one_process():
            stopped = (
                "The sweep stops here, its later jobs not started: other ranks of this run may be waiting for this "
                "process, and only its exit lets the launcher stop them (a multirun goes on past a failed job only "
                "in a single process with no DeepSpeed process group). "
            )
            print(Sweep.summary(stopped), file=sys.stderr)
            Sweep.reset()
            exit_with(2)


def memory_error(error: BaseException, cfg) -> BackendError | None:
    """A failed allocation (host or device memory) as the settings to lower; None for any other error."""
    import torch

    text = str(error).strip()
    if not (
        isinstance(error, (MemoryError, torch.OutOfMemoryError))
        or (isinstance(error, RuntimeError) and "can't allocate memory" in text)
    ):
        return None
    cause = (text.splitlines()[0] if text else type(error).__name__)[:300]
    m, t = cfg.model, cfg.trainer
    vocab = f", vocab_size={m.vocab_size}" if m.vocab_size else ""
    return BackendError(
        f"out of memory ({cause}). The model (model={m.name}: d_model={m.d_model}, n_layers={m.n_layers}, "
        f"ffn_dim={m.ffn_dim}{vocab}) with trainer.micro_batch_size={t.micro_batch_size} "
        f"sequences of data.seq_len={cfg.data.seq_len} tokens does not fit on backend={cfg.backend.name.value}: lower "
        f"trainer.micro_batch_size (raise trainer.grad_accum_steps to keep the global batch), data.seq_len or the "
        f"model's size."
    )


def without_local_rank(argv: list[str]) -> list[str]:
    """The deepspeed launcher appends ``--local_rank=N`` unless given --no_local_rank; LOCAL_RANK in the
    environment says the same, and Hydra would reject the flag, so it is dropped."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--local_rank":
            skip = True
        elif not a.startswith("--local_rank="):
            out.append(a)
    return out


def main(argv: list[str] | None = None) -> None:
    argv = without_local_rank(sys.argv[1:] if argv is None else argv)
    Sweep.reset()
    try:
        with interruptible():  # also where Ctrl-C leaves a library to fail in its clean-up
            preflight(argv)
        sys.argv = [sys.argv[0], *argv]
        try:
            hydra_main()
        finally:  # also when Hydra ends the sweep with a bug's traceback, or Ctrl-C does
            summary = Sweep.summary()
            Sweep.reset()
            if summary:
                print(summary, file=sys.stderr)
        if summary:
            sys.exit(2)
    except KeyboardInterrupt:
        interrupted()
