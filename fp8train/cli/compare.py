"""``fp8train compare RUN_DIR...``: loss curves of several runs on one PNG, and a table of the gaps to bf16.

Reads each run's metrics.jsonl and config.yaml (no wandb account needed); a Hydra sweep folder stands for the
runs in it. The reference is the run whose precision is bf16 (else the first run given). Gaps are taken at the
steps both runs logged, so runs of different lengths compare over what they share. Runs that differ in model,
data, batch, validation set, seed, lr schedule or optimizer settings are still plotted, but the table says they
are not comparable and names the settings that differ; runs that stopped early, skipped steps or have no
validation points say so in the notes.
"""

from __future__ import annotations

import math
import statistics
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from fp8train.cli import writing_into
from fp8train.config import first_line
from fp8train.errors import Fp8trainError
from fp8train.loggers import is_count, is_number, read_metrics

# What must be equal for two loss curves to be compared step by step: per reason, the settings it covers, each
# under the name a user types (or, for what config.yaml does not hold, a description).
COMPARABLE = {
    "model": lambda run: {f"model.{k}": v for k, v in OmegaConf.to_container(run.config.model).items()},
    "data": lambda run: {
        "data.name": run.config.data.name,
        "data.sources": OmegaConf.to_container(run.config.data.sources),
        "data.seq_len": run.config.data.seq_len,
        **{f"data.tokenizer.{k}": v for k, v in OmegaConf.to_container(run.config.data.tokenizer).items()},
        "data.val_fraction": run.config.data.get("val_fraction"),  # moves the split between training and validation
    },
    # Tokens per step, from metrics.jsonl: it holds the data-parallel world size, which config.yaml does not. Step k
    # trains on the same sequences however they are split into micro batches, accumulation steps and ranks.
    "batch": lambda run: {
        "tokens per step": int(run.tokens_per_step) if math.isfinite(run.tokens_per_step) else "unknown",
    },
    # eval_batches global batches of windows from the start of each val split: with the same global batch (above)
    # the same windows, however the runs split it.
    "validation set": lambda run: {"trainer.eval_batches": run.config.trainer.get("eval_batches")},
    "seed": lambda run: {"trainer.seed": run.config.trainer.seed},
    # the loss at a step depends on the learning rate that step had
    "lr schedule": lambda run: lr_schedule(run.config),
    "optimizer": lambda run: {f"optim.{k}": run.config.optim.get(k) for k in OPTIMIZER_SETTINGS},
}
# AdamW settings every optimizer kind shares (the FP8 moments' layout is what adamw_fp8 arms compare)
OPTIMIZER_SETTINGS = ("betas", "eps", "weight_decay", "grad_clip")


def lr_schedule(cfg) -> dict:
    """The settings that fix a run's lr at every step; a cosine decays to optim.min_lr over optim.decay_steps, or,
    when that is null, over trainer.max_steps (a constant lr reads neither)."""
    optim = cfg.optim
    settings = {f"optim.{k}": optim.get(k) for k in ("lr", "warmup_steps", "schedule")}
    if optim.get("schedule", "cosine") == "cosine":
        decay = optim.get("decay_steps")
        settings["optim.min_lr"] = optim.get("min_lr")
        settings.update(
            {"optim.decay_steps": decay} if decay is not None else {"trainer.max_steps": cfg.trainer.max_steps}
        )
    return settings


@dataclass
class Run:
    path: Path
    label: str
    train: dict[int, float]  # step -> loss
    val: dict[int, float]  # step -> val_loss
    tokens_per_s: float
    tokens_per_step: float
    last_step: int
    skipped_steps: int  # optimizer steps skipped for a non-finite loss or gradient
    config: object

    @classmethod
    def load(cls, path: Path) -> Run:
        if not is_run_dir(path):
            raise Fp8trainError(f"{path}: not an fp8train run directory (needs metrics.jsonl and config.yaml).")
        cfg = read_config(path / "config.yaml")
        try:
            rows = [r for r in read_metrics(path) if isinstance(r, dict)]  # lines of other JSON values are no records
        except (OSError, UnicodeDecodeError) as e:
            raise Fp8trainError(
                f"{path / 'metrics.jsonl'} cannot be read ({first_line(e)}); compare the runs whose metrics.jsonl "
                f"train.py wrote, or leave this one out."
            ) from None
        lines, evals = last_per_step(rows, "loss"), last_per_step(rows, "val_loss")
        train = {s: r["loss"] for s, r in lines.items() if is_number(r["loss"])}
        val = {s: r["val_loss"] for s, r in evals.items() if is_number(r["val_loss"])}
        # The median of the logged windows after the first: each start (the first, every resume) compiles and fills
        # caches in its first window, as a monitored step compiles its graph, and metrics.jsonl does not say which
        # windows those were; a mean counted them, a resumed run's tokens/s then far below its steady speed.
        speeds = [r["tokens_per_s"] for r in lines.values() if is_number(r.get("tokens_per_s"))][1:]
        first = next((r for r in rows if is_number(r.get("tokens")) and is_count(r.get("step")) and r["step"]), None)
        label = cfg.precision.name + ("+adamw_fp8" if cfg.optim.name == "adamw_fp8" else "")
        return cls(
            path,
            label,
            train,
            val,
            statistics.median(speeds) if speeds else math.nan,
            first["tokens"] / first["step"] if first else math.nan,
            max((r["step"] for r in rows if is_count(r.get("step"))), default=0),
            max((r["bad_steps"] for r in lines.values() if is_count(r.get("bad_steps"))), default=0),
            cfg,
        )

    def notes(self) -> list[str]:
        """What a reader of the table must know before trusting this run's numbers."""
        notes = []
        max_steps = self.config.trainer.max_steps
        if self.last_step < max_steps:
            notes.append(f"stopped at step {self.last_step} of {max_steps}")
        if self.skipped_steps:
            n = self.skipped_steps
            notes.append(f"{n} step{'' if n == 1 else 's'} skipped (non-finite loss or gradients)")
        if not self.val:
            notes.append("no validation points")
        return notes


def last_per_step(rows: list[dict], key: str) -> dict[int, dict]:
    """step -> the last line holding ``key`` at that step, in step order. A step logged twice (a killed run's lines
    after its checkpoint, then the resumed run's) counts as its later line says, a non-finite value included, as
    in ``fp8train report``: an earlier line's finite loss must not stand in for the resumed run's NaN."""
    found = {r["step"]: r for r in rows if key in r and is_count(r.get("step"))}
    return dict(sorted(found.items()))


# The settings compare reads from a run's config.yaml.
REQUIRED = (
    "model",
    "data.name",
    "data.sources",
    "data.seq_len",
    "data.tokenizer",
    "trainer.max_steps",
    "trainer.seed",
    "optim.name",
    "precision.name",
)


def read_config(file: Path) -> DictConfig:
    """A run's config.yaml; an Fp8trainError naming the file if it is not an fp8train run's (another tool's run
    directory can hold a config.yaml and a metrics.jsonl too)."""
    try:
        cfg = OmegaConf.load(file)
    except Exception as e:  # not YAML, or not text
        problem = f"it cannot be read as YAML ({first_line(e).rstrip('.')})"
    else:
        missing = [k for k in REQUIRED if not isinstance(cfg, DictConfig) or OmegaConf.select(cfg, k) is None]
        if not missing:
            return cfg
        problem = f"it has no {', '.join(missing)}"
    raise Fp8trainError(
        f"{file}: not the config.yaml of an fp8train run: {problem}. Compare run directories that train.py wrote, "
        f"or leave this one out."
    )


def is_run_dir(path: Path) -> bool:
    return (path / "metrics.jsonl").is_file() and (path / "config.yaml").is_file()


NOT_A_RUN = "not an fp8train run directory (needs metrics.jsonl and config.yaml)"


def load_runs(paths: list[Path]) -> tuple[list[Run], list[str]]:
    """(runs, notes on what was skipped) from what the user named: run directories, or folders holding runs (a
    Hydra multirun's sweep folder). A named run directory that cannot be read is an error; in a folder of runs, a
    folder that is not one (submitit's .submitit, notes, a job that died before logging, another tool's run) is
    skipped with a note, as is a named path that is neither (a sweep's multirun.yaml or compare/ through a glob)."""
    runs, skipped, unreadable = [], [], []
    for path in paths:
        inner = sorted(p for p in path.iterdir() if p.is_dir()) if path.is_dir() and not is_run_dir(path) else []
        if is_run_dir(path):
            runs.append(Run.load(path))
        elif any(is_run_dir(p) for p in inner):
            for p in inner:
                if not is_run_dir(p):
                    skipped.append(f"skipped {p}: {NOT_A_RUN}")
                    continue
                try:
                    runs.append(Run.load(p))
                except Fp8trainError as e:
                    skipped.append(f"skipped {p}: {e}")
                    unreadable.append(str(e))
        else:
            skipped.append(f"skipped {path}: not a run directory")
    # A run named twice (a sweep folder and one of its runs) is one run: its first mention counts.
    seen: set[Path] = set()
    runs = [r for r in runs if not (r.path.resolve() in seen or seen.add(r.path.resolve()))]
    if not runs:
        names = ", ".join(map(str, paths))
        raise Fp8trainError(" ".join([f"{names}: {NOT_A_RUN}, nor a folder of them.", *unreadable]))
    return runs, skipped


def incomparable(ref: Run, run: Run) -> str:
    """Why ``run``'s curves cannot be compared with ``ref``'s ("" if they can): the reasons, then each differing
    setting with the run's value and the reference's, e.g. "seed (trainer.seed 7 vs 1234)"."""
    reasons, settings = [], []
    for name, key in COMPARABLE.items():
        ours, theirs = key(run), key(ref)
        # "unknown" (a run with no logged step yet has no tokens per step) is no difference
        differ = [
            k
            for k in {**theirs, **ours}
            if ours.get(k) != theirs.get(k) and "unknown" not in (ours.get(k), theirs.get(k))
        ]
        if differ:
            reasons.append(name)
            # a setting only one run reads (a cosine's min_lr beside a constant lr) says nothing the others don't
            differ = [k for k in differ if k in ours and k in theirs] or differ
            settings += [f"{k} {_shown(ours.get(k))} vs {_shown(theirs.get(k))}" for k in differ]
    return f"{', '.join(reasons)} ({', '.join(settings)})" if reasons else ""


def _shown(value) -> str:
    """A setting's value in a table cell: numbers as typed, long lists (data.sources) cut short."""
    text = str(value)
    return text if len(text) <= 40 else text[:37] + "..."


def relative_gap(ref: dict[int, float], other: dict[int, float]) -> dict[int, float]:
    """(other - ref) / ref at the steps both have, but where ref is 0 (a loss learnt to 0.0: no relative gap)."""
    return {s: (other[s] - ref[s]) / ref[s] for s in sorted(ref.keys() & other.keys()) if ref[s]}


def _gap_cells(ref: dict[int, float], other: dict[int, float], last_step: int) -> tuple[str, str]:
    """(final gap, largest gap) as table cells; a final gap taken before the run's own last step says where."""
    gaps = relative_gap(ref, other)
    if not gaps:
        return "n/a", "n/a"
    final_step = max(gaps)
    worst_step = max(gaps, key=lambda s: abs(gaps[s]))
    final = f"{gaps[final_step]:+.2%}" + (f" (step {final_step})" if final_step != last_step else "")
    return final, f"{gaps[worst_step]:+.2%} (step {worst_step})"


def _last(values: dict[int, float], last_step: int) -> str:
    """The last value, with its step when that is not the run's last (the steps after it logged NaN, say)."""
    if not values:
        return "n/a"
    step = max(values)
    return f"{values[step]:.4f}" + (f" (step {step})" if step != last_step else "")


def _speed(tokens_per_s: float) -> str:
    """tokens/s as a table cell; "-" for a run that logged no line after the first (which holds the warm-up)."""
    return f"{tokens_per_s:,.0f}" if math.isfinite(tokens_per_s) else "-"


def disambiguate(runs: list[Run]) -> None:
    """Two bf16 runs (seeds, say) must not share a legend entry or a table row: add the run directory's name, and
    as many of its parent folders as it takes (two sweeps name their arms' folders alike)."""
    repeated = Counter(r.label for r in runs)
    for label in [label for label, n in repeated.items() if n > 1]:
        same = [r for r in runs if r.label == label]
        resolved = [r.path.resolve() for r in same]
        depth = 1
        while depth < max(len(p.parts) for p in resolved) and len({p.parts[-depth:] for p in resolved}) < len(same):
            depth += 1
        for r, p in zip(same, resolved, strict=True):
            r.label = f"{label} ({'/'.join(p.parts[-depth:])})"


def compare(run_dirs: list[Path], out: Path) -> str:
    """Draw out/compare.png and return the table (also written to out/compare.md)."""
    runs, skipped = load_runs([Path(p) for p in run_dirs])
    disambiguate(runs)
    ref = next((r for r in runs if r.config.precision.name == "bf16"), runs[0])
    lines = [f"reference: {ref.label} ({ref.path})"]
    lines += skipped
    lines += [
        "",
        "| run | steps | final loss | final val_loss | val gap to ref | largest val gap | train gap to ref "
        "| tokens/s | comparable | notes |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for run in runs:
        val_gap, worst_val_gap = _gap_cells(ref.val, run.val, run.last_step)
        train_gap, _ = _gap_cells(ref.train, run.train, run.last_step)
        diff = incomparable(ref, run)
        final_loss, final_val = _last(run.train, run.last_step), _last(run.val, run.last_step)
        notes = run.notes()
        if run.val and ref.val and not run.val.keys() & ref.val.keys():  # why its val gaps are n/a
            notes.append("no validation step in common with the reference")
        lines.append(
            f"| {run.label} | {run.last_step} | {final_loss} | {final_val} | {val_gap} | {worst_val_gap} "
            f"| {train_gap} | {_speed(run.tokens_per_s)} | {'yes' if not diff else 'no: different ' + diff} "
            f"| {'; '.join(notes)} |"
        )
    table = "\n".join(lines)
    with writing_into(out, "comparison"):
        out.mkdir(parents=True, exist_ok=True)
        (out / "compare.md").write_text(table + "\n")
        plot(runs, ref, out / "compare.png")
    return table


def plot(runs: list[Run], ref: Run, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only: works on machines without a display
    import matplotlib.pyplot as plt

    fig, (ax_train, ax_val, ax_gap) = plt.subplots(1, 3, figsize=(16, 4.5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, run in enumerate(runs):
        style = {"label": run.label, "color": colors[i % len(colors)]}  # one colour per run in every panel
        # A legend entry only where the run has a curve: a run with no validation point yet has none to point at.
        steps = sorted(run.train)
        if steps:  # a lone point is a line of no length: it takes a marker to be seen
            marker = "o" if len(steps) == 1 else None
            ax_train.plot(steps, [run.train[s] for s in steps], linewidth=1, marker=marker, **style)
        vsteps = sorted(run.val)
        if vsteps:
            ax_val.plot(vsteps, [run.val[s] for s in vsteps], marker="o", **style)
        gaps = relative_gap(ref.val, run.val) if run is not ref else {}
        if gaps:
            ax_gap.plot(list(gaps), [100 * g for g in gaps.values()], marker="o", **style)
    ax_train.set(title="train loss", xlabel="step", ylabel="loss")
    ax_val.set(title="validation loss", xlabel="step", ylabel="val_loss")
    ax_gap.set(title=f"val_loss gap to {ref.label}", xlabel="step", ylabel="%")
    ax_gap.axhline(0, color="gray", linewidth=0.8)
    for ax in (ax_train, ax_val, ax_gap):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:  # no curve (the gap of a single run): no legend, no warning
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
