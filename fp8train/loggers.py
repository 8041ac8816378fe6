"""Where metrics go: RUN_DIR/metrics.jsonl (the file fp8train's own tools read), wandb, and the console.

Only the main process logs. metrics.jsonl holds one JSON object per line: training lines carry ``loss``,
``lr``, ``grad_norm``, ``tokens_per_s``...; evaluation lines carry ``val_loss`` and ``val_ppl``. Every line
has ``step``, the number of optimizer steps completed.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import secrets
import sys
from pathlib import Path

from omegaconf import OmegaConf

from fp8train.config import Config, WandbMode

log = logging.getLogger("fp8train")

METRICS_FILE = "metrics.jsonl"


class RunLogger:
    """metrics.jsonl + wandb for one run; ``resume_step`` drops metric lines of steps that will be redone."""

    def __init__(self, cfg: Config, run_dir: Path, enabled: bool = True, resume_step: int = 0):
        self.enabled = enabled
        self.metrics_path = run_dir / METRICS_FILE
        self.wandb = None
        if not enabled:
            return
        _truncate_after(self.metrics_path, resume_step)
        self._file = open(self.metrics_path, "a", buffering=1)  # line-buffered: a killed run keeps its lines
        if cfg.logger.wandb.mode != WandbMode.disabled:
            self.wandb = _init_wandb(cfg, run_dir)

    def log(self, metrics: dict, step: int) -> None:
        if not self.enabled:
            return
        line = {"step": step, **{k: _jsonable(v) for k, v in metrics.items()}}
        self._file.write(json.dumps(line) + "\n")
        if self.wandb is not None:
            self.wandb.log(metrics, step=step)

    def summary(self, values: dict) -> None:
        if self.wandb is not None:
            self.wandb.summary.update(values)

    def finish(self) -> None:
        if not self.enabled:
            return
        self._file.close()
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None


def read_metrics(run_dir: Path) -> list[dict]:
    """All lines of a run's metrics.jsonl (a torn last line from a killed run is skipped)."""
    path = Path(run_dir) / METRICS_FILE
    rows = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def setup_console(level: int = logging.INFO) -> None:
    """Console logging for runs started outside Hydra (Hydra configures its own, plus RUN_DIR/train.log)."""
    if not logging.getLogger().handlers:
        logging.basicConfig(level=level, format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")


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


def _truncate_after(path: Path, step: int) -> None:
    """Keep only lines of steps <= step: a resumed run rewrites what came after its checkpoint."""
    if not path.exists():
        return
    rows = [r for r in read_metrics(path.parent) if r.get("step", 0) <= step]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    os.replace(tmp, path)


def _jsonable(v):
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)  # JSON has no NaN/inf; keep them visible as strings
    if dataclasses.is_dataclass(v):
        return dataclasses.asdict(v)
    return v
