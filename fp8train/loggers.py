"""Where metrics go: RUN_DIR/metrics.jsonl (the file fp8train's own tools read), wandb, and the console.

Only the main process logs. metrics.jsonl holds one JSON object per line: training lines carry ``loss``,
``lr``, ``grad_norm``, ``tokens_per_s``...; evaluation lines carry ``val_loss`` and ``val_ppl``. Every line
has ``step``, the number of optimizer steps completed.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import os
import secrets
import sys
from pathlib import Path

from omegaconf import OmegaConf

from fp8train.config import Config, WandbMode, first_line
from fp8train.errors import Fp8trainError

log = logging.getLogger("fp8train")

METRICS_FILE = "metrics.jsonl"
OUTLIERS_FILE = "outliers.jsonl"  # the outlier monitor's records (fp8train/monitor), one line per monitored step


class RunLogger:
    """metrics.jsonl + wandb for one run; ``resume_step`` drops metric lines of steps that will be redone."""

    def __init__(self, cfg: Config, run_dir: Path, enabled: bool = True, resume_step: int = 0):
        self.enabled = enabled
        self.metrics_path = run_dir / METRICS_FILE
        self.wandb = None
        if not enabled:
            return
        self._file = JsonLines(self.metrics_path, resume_step)
        if cfg.logger.wandb.mode != WandbMode.disabled:
            try:
                self.wandb = _init_wandb(cfg, run_dir)
            except BaseException:  # no RunLogger to finish: the file would stay open
                self._file.close()
                raise

    def log(self, metrics: dict, step: int) -> None:
        if not self.enabled:
            return
        self._file.write({"step": step, **metrics})
        if self.wandb is not None:
            self.wandb.log(metrics, step=step)

    def log_wandb(self, metrics: dict, step: int) -> None:
        """To wandb only: for the many per-layer values metrics.jsonl should not be flooded with."""
        if self.enabled and self.wandb is not None:
            self.wandb.log(metrics, step=step)

    def alert(self, title: str, text: str) -> None:
        """A wandb alert (an e-mail or Slack message in online mode); never fails the run."""
        if not self.enabled or self.wandb is None:
            return
        try:
            self.wandb.alert(title=title, text=text, level="WARN")
        except Exception as e:  # offline runs, old wandb versions: the alert is in the console and files anyway
            log.debug("wandb alert not sent: %s", e)

    def summary(self, values: dict) -> None:
        if self.wandb is not None:
            self.wandb.summary.update(values)

    def finish(self, failed: bool = False, exit_code: int = 1) -> None:
        """Close the files and the wandb run; a run that ended in an error shows as failed in wandb, with
        ``exit_code``."""
        if not self.enabled:
            return
        self._file.close()
        if self.wandb is not None:
            self.wandb.finish(exit_code=exit_code if failed else 0)
            self.wandb = None


def finish_open_wandb(exit_code: int) -> None:
    """Finish the wandb run an error left open (the trainer closes its own), as wandb's exit hook would: os._exit
    skips that hook, leaving an offline run's .wandb file without a single record, and in a multirun the next job's
    wandb.init would return the open run and log into it."""
    wandb = sys.modules.get("wandb")
    run = getattr(wandb, "run", None)
    if run is None:
        return
    try:
        run.finish(exit_code=exit_code)
    except (Exception, KeyboardInterrupt) as e:  # ending on an error already (or a second Ctrl-C): give it up
        log.warning("wandb run %s not finished: %s", run.id, first_line(e) or type(e).__name__)


class JsonLines:
    """An append-only JSON-lines file of one run (metrics.jsonl, outliers.jsonl), one object per line.

    ``resume_step`` first drops the lines of steps after it: a resumed run rewrites what came after its checkpoint.
    Line-buffered, so a killed run keeps every line it wrote.
    """

    def __init__(self, path: Path, resume_step: int = 0):
        self.path = Path(path)
        _truncate_after(self.path, resume_step)
        self._file = open(self.path, "a", buffering=1)

    def write(self, row: dict) -> None:
        self._file.write(json.dumps({k: _jsonable(v) for k, v in row.items()}) + "\n")

    def close(self) -> None:
        self._file.close()


def read_metrics(run_dir: Path) -> list[dict]:
    """The lines of a run's metrics.jsonl; a torn last line from a killed run and lines of no step (a note added by
    hand, another tool's line whose "step" is no number) are skipped."""
    return [r for r in read_jsonl(Path(run_dir) / METRICS_FILE) if step_of(r) is not None]


def step_of(row) -> int | float | None:
    """The step a line of metrics.jsonl or outliers.jsonl records, or None for a line of no step."""
    step = row.get("step") if isinstance(row, dict) else None
    return step if is_number(step) else None


def is_record(row) -> bool:
    """Whether a line of outliers.jsonl is one monitored step's statistics; other lines (hand edits, another
    tool's output in the file) are skipped rather than read as one. It checks the structure its readers walk: a
    value in it that is no number (a hand edit's null or text) is read as no value."""
    return (
        isinstance(row, dict)
        and is_count(row.get("step"))
        and isinstance(row.get("layers"), list)
        and all(_is_layer_record(entry) for entry in row["layers"])
        and isinstance(row.get("alerts", []), list)
        and all(_is_alert_record(a) for a in row.get("alerts", []))
    )


def is_number(value) -> bool:
    """A JSON number: true and false are ints to Python, but a hand edit's ``"loss": true`` is no loss of 1.0."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def is_count(value) -> bool:
    """An integer as train.py writes a step, a layer or a count (not 2.5, 1e308 or true)."""
    return isinstance(value, int) and not isinstance(value, bool)


def _is_layer_record(entry) -> bool:
    """One layer's statistics: its index, and its FP8 tensors' statistics (name -> stat -> value) if any."""
    fp8 = entry.get("fp8", {}) if isinstance(entry, dict) else None
    return (
        isinstance(entry, dict)
        and is_count(entry.get("layer"))
        and isinstance(fp8, dict)
        and all(isinstance(stats, dict) for stats in fp8.values())
    )


def _is_alert_record(alert) -> bool:
    """An alert as Alert.to_json() writes it: where it fired, on which tensor, in words."""
    return (
        isinstance(alert, dict)
        and is_count(alert.get("step"))
        and is_count(alert.get("layer"))
        and all(isinstance(alert.get(k), str) for k in ("tensor", "kind", "message"))
    )


def read_jsonl(path: Path, numbers: bool = False) -> list[dict]:
    """All objects of a JSON-lines file (a torn last line from a killed run is skipped); [] if there is none.
    ``numbers``: the strings JsonLines writes for NaN and inf read back as floats (:func:`from_jsonable`)."""
    path = Path(path)
    return _parsed(path.read_text().splitlines() if path.exists() else [], numbers)


def _parsed(lines: list[str], numbers: bool = False) -> list[dict]:
    """The JSON objects among ``lines``; other JSON values (hand edits) and text are no lines of a run."""
    return [r for r in (_parse(line, numbers) for line in lines) if isinstance(r, dict)]


# How JsonLines writes the non-finite floats (as JSON strings): a line holding none of them needs no from_jsonable,
# a walk over every value of the line that took most of the time `fp8train report` spent reading a long run.
_NON_FINITE_TEXT = ('"nan"', '"inf"', '"-inf"')


def _parse(line: str, numbers: bool = False):
    try:
        row = json.loads(line)
    except json.JSONDecodeError:
        return None
    if numbers and any(text in line for text in _NON_FINITE_TEXT):
        return from_jsonable(row)
    return row


def read_to_resume(path: Path) -> list[dict]:
    """``read_jsonl`` for a run that continues the file; one that cannot be read stops it with what to do."""
    return _parsed(_lines_to_resume(path))


def _lines_to_resume(path: Path) -> list[str]:
    """The lines of a file a run continues (newlines kept); one that cannot be read stops it with what to do."""
    try:
        return path.read_text().splitlines(keepends=True) if path.exists() else []
    except (OSError, UnicodeDecodeError) as e:  # binary garbage, a folder, no permission
        raise Fp8trainError(
            f"{path} cannot be read ({first_line(e)}), so the run cannot continue it. Move it out of the run "
            f"directory and run again: the run writes a new {path.name} from its checkpoint on."
        ) from None


def setup_console(level: int = logging.INFO) -> None:
    """Console logging for runs started outside Hydra (Hydra configures its own, plus RUN_DIR/train.log)."""
    if not logging.getLogger().handlers:
        logging.basicConfig(level=level, format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")


def drop_unwritable_log_files() -> None:
    """A log destination that cannot be written (RUN_DIR/train.log on a full disk, the console piped into a
    ``head`` that has exited) is named once and dropped, the other keeping the log, instead of logging's traceback
    for every line."""
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.StreamHandler):  # FileHandler included
            handler.handleError = functools.partial(_drop_log_stream, handler, handler.handleError)


def _drop_log_stream(handler: logging.StreamHandler, handle_error, record: logging.LogRecord) -> None:
    error = sys.exc_info()[1]
    if not isinstance(error, OSError):  # a bug (a message and its arguments that do not match): logging's traceback
        return handle_error(record)
    handler.setLevel(logging.CRITICAL + 1)  # not removed: the logger may be going through its list of handlers now
    if isinstance(error, BrokenPipeError) and hasattr(handler.stream, "fileno"):
        # The reader is gone: what is written there from now on (tqdm's handler takes this stream over during
        # training, and the interpreter flushes it at exit) goes to /dev/null rather than failing again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, handler.stream.fileno())
        os.close(devnull)
    if isinstance(handler, logging.FileHandler):
        where, rest = handler.baseFilename, "the log goes to the console only"
    else:
        where, rest = getattr(handler.stream, "name", "the console"), "the log goes on in the run directory's train.log"
    try:
        print(f"fp8train: {where} cannot be written ({error.strerror or first_line(error)}): {rest}", file=sys.stderr)
    except OSError:  # stderr itself is the one closed
        pass


def use_progress_bar(cfg: Config) -> bool:
    return cfg.logger.progress and sys.stderr.isatty()


def _init_wandb(cfg: Config, run_dir: Path):
    import wandb

    # One wandb run per run dir: a resumed run continues the same wandb run (its id is kept in the run dir).
    id_file = run_dir / "wandb_id"
    run_id = id_file.read_text().strip() if id_file.exists() else secrets.token_hex(6)
    id_file.write_text(run_id)
    os.environ.setdefault("WANDB_SILENT", "true")
    w = cfg.logger.wandb
    try:
        return wandb.init(
            project=w.project,
            entity=w.entity,
            group=cfg.run_group,
            name=cfg.run_name,
            tags=list(w.tags) or None,
            mode=w.mode.value,
            dir=str(run_dir),
            id=run_id,
            resume="allow",
            config=OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True),
        )
    except wandb.errors.Error as e:  # online without a login (UsageError) or a network (CommError): a message
        raise Fp8trainError(
            f"logger.wandb.mode={w.mode.value}: wandb could not start ({first_line(e)}). Log in with `wandb login` "
            f"or set WANDB_API_KEY and check that this machine reaches the wandb server, or run with "
            f"logger.wandb.mode=offline and upload later with `wandb sync`."
        ) from None


def _truncate_after(path: Path, step: int) -> None:
    """Drop the records of steps after ``step`` (a resumed run rewrites what came after its checkpoint) and the torn
    last line of a killed run. Every other line (a note added by hand, another tool's output) belongs to no step the
    run redoes: it is kept as it was."""
    lines = _lines_to_resume(path)
    if not lines:
        return
    if not lines[-1].endswith("\n") and _parse(lines[-1]) is None:
        lines.pop()  # torn
    steps = [step_of(_parse(line)) for line in lines]
    kept = [line for line, s in zip(lines, steps) if s is None or s <= step]
    if None in steps:
        first = steps.index(None)
        log.info(
            "%s: %d lines that are no step's record (line %d: %s) are kept as they are; fp8train's tools skip them",
            path.name,
            steps.count(None),
            first + 1,
            lines[first].strip()[:80],
        )
    path = path.resolve()  # a link to a file elsewhere stays a link: the file it points to is cut
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(line if line.endswith("\n") else line + "\n" for line in kept))
    os.replace(tmp, path)


def _jsonable(v):
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)  # JSON has no NaN/inf; keep them visible as strings
    if dataclasses.is_dataclass(v):
        return _jsonable(dataclasses.asdict(v))
    if isinstance(v, dict):
        return {k: _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    return v


def from_jsonable(node):
    """The inverse of what JsonLines writes for non-finite values: the strings "nan", "inf" and "-inf" back to
    floats, in a line read from metrics.jsonl or outliers.jsonl, so that every statistic is a number."""
    if isinstance(node, dict):
        return {k: from_jsonable(v) for k, v in node.items()}
    if isinstance(node, list):
        return [from_jsonable(v) for v in node]
    return float(node) if node in ("nan", "inf", "-inf") else node
