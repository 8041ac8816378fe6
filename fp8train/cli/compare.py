"""``fp8train compare RUN_DIR...``: loss curves of several runs on one PNG, and a table of the gaps to bf16.

Reads each run's metrics.jsonl and config.yaml (no wandb account needed). The reference is the run whose
precision is bf16 (else the first run given). Runs that differ in model, data, batch or seed are still
plotted, but the table says they are not comparable and why.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from omegaconf import OmegaConf

from fp8train.errors import Fp8trainError
from fp8train.loggers import read_metrics

# What must be equal for two loss curves to be compared step by step.
COMPARABLE = {
    "model": lambda c: OmegaConf.to_container(c.model),
    "data": lambda c: [
        c.data.name,
        OmegaConf.to_container(c.data.sources),
        c.data.seq_len,
        OmegaConf.to_container(c.data.tokenizer),
    ],
    "batch": lambda c: [c.trainer.micro_batch_size, c.trainer.grad_accum_steps],
    "seed": lambda c: c.trainer.seed,
}


@dataclass
class Run:
    path: Path
    label: str
    train: dict[int, float]  # step -> loss
    val: dict[int, float]  # step -> val_loss
    tokens_per_s: float
    config: object

    @classmethod
    def load(cls, path: Path) -> Run:
        if not (path / "metrics.jsonl").is_file() or not (path / "config.yaml").is_file():
            raise Fp8trainError(f"{path}: not an fp8train run directory (needs metrics.jsonl and config.yaml).")
        cfg = OmegaConf.load(path / "config.yaml")
        rows = read_metrics(path)
        train = {r["step"]: r["loss"] for r in rows if isinstance(r.get("loss"), (int, float))}
        val = {r["step"]: r["val_loss"] for r in rows if isinstance(r.get("val_loss"), (int, float))}
        speeds = [r["tokens_per_s"] for r in rows if "tokens_per_s" in r][1:]  # the first window holds warm-up
        label = cfg.precision.name + ("+adamw_fp8" if cfg.optim.name == "adamw_fp8" else "")
        return cls(path, label, train, val, sum(speeds) / len(speeds) if speeds else math.nan, cfg)


def incomparable(ref: Run, run: Run) -> list[str]:
    """What differs between two runs' model, data, batch or seed."""
    return [name for name, key in COMPARABLE.items() if key(ref.config) != key(run.config)]


def relative_gap(ref: dict[int, float], other: dict[int, float]) -> dict[int, float]:
    """(other - ref) / ref at the steps both have."""
    return {s: (other[s] - ref[s]) / ref[s] for s in sorted(ref.keys() & other.keys())}


def compare(run_dirs: list[Path], out: Path) -> str:
    """Draw out/compare.png and return the table (also written to out/compare.md)."""
    runs = [Run.load(Path(p)) for p in run_dirs]
    repeated = Counter(r.label for r in runs)
    for r in runs:  # two bf16 runs (seeds, say) must not share a legend entry: add the run directory's name
        if repeated[r.label] > 1:
            r.label = f"{r.label} ({r.path.name})"
    ref = next((r for r in runs if r.config.precision.name == "bf16"), runs[0])
    lines = [
        f"reference: {ref.label} ({ref.path})",
        "",
        "| run | final loss | final val_loss | val gap to ref | largest val gap | tokens/s | comparable |",
        "|---|---|---|---|---|---|---|",
    ]
    for run in runs:
        gaps = relative_gap(ref.val, run.val)
        last_val = run.val[max(run.val)] if run.val else math.nan
        final_gap = gaps[max(gaps)] if gaps else math.nan
        worst = max(gaps.values(), key=abs) if gaps else math.nan
        diff = incomparable(ref, run)
        lines.append(
            f"| {run.label} | {run.train[max(run.train)] if run.train else math.nan:.4f} | {last_val:.4f} | "
            f"{final_gap:+.2%} | {worst:+.2%} | {run.tokens_per_s:,.0f} | "
            f"{'yes' if not diff else 'no: different ' + ', '.join(diff)} |"
        )
    table = "\n".join(lines)
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
        steps = sorted(run.train)
        ax_train.plot(steps, [run.train[s] for s in steps], linewidth=1, **style)
        vsteps = sorted(run.val)
        ax_val.plot(vsteps, [run.val[s] for s in vsteps], marker="o", **style)
        if run is not ref:
            gaps = relative_gap(ref.val, run.val)
            ax_gap.plot(list(gaps), [100 * g for g in gaps.values()], marker="o", **style)
    ax_train.set(title="train loss", xlabel="step", ylabel="loss")
    ax_val.set(title="validation loss", xlabel="step", ylabel="val_loss")
    ax_gap.set(title=f"val_loss gap to {ref.label}", xlabel="step", ylabel="%")
    ax_gap.axhline(0, color="gray", linewidth=0.8)
    for ax in (ax_train, ax_val, ax_gap):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
