"""What the outlier monitor adds to the training step, at a given monitor.interval.

    python benchmarks/bench_monitor.py                                   # the default run's model, data and batch
    python benchmarks/bench_monitor.py --steps 60 backend.threads=1 precision=fp8

Two trainers with the same config, one with monitor=disabled and one with the monitor on at interval 3 (so that
both kinds of its steps are sampled often), take turns step by step (alternating which goes first), each step
timed on its own (device synchronised on both sides). Then, with medians: ordinary = the monitor's unmonitored step
vs the disabled trainer's step (0 by construction: no hooks, no sync; what it measures is the noise), monitored =
the extra time of a monitored step, and the overhead at --interval K = ordinary + monitored / K, as a fraction of
the disabled trainer's step time.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fp8train.config import compose  # noqa: E402
from fp8train.errors import Fp8trainError  # noqa: E402
from fp8train.loggers import setup_console  # noqa: E402
from fp8train.trainer import Trainer  # noqa: E402


def timed_step(trainer: Trainer) -> float:
    trainer.backend.synchronize()
    t0 = time.perf_counter()
    trainer.train_step()
    trainer.step += 1
    trainer.backend.synchronize()
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=45, help="timed steps per trainer (after --warmup)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--interval", type=int, default=None, help="the interval to report (default: conf's)")
    parser.add_argument("--out", help="write the numbers to this JSON file")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for both trainers, e.g. backend.threads=1")
    args = parser.parse_args()
    # At interval 3, any 3 consecutive steps hold a monitored and an unmonitored one: both medians exist.
    for name, least in (("steps", 3), ("warmup", 0), ("interval", 1)):
        if getattr(args, name) is not None and getattr(args, name) < least:
            parser.error(f"--{name} {getattr(args, name)}: must be >= {least}")
    setup_console()
    base = ["logger.wandb.mode=disabled", "trainer.max_steps=100000", *args.overrides]
    try:
        measure(args, base)
    except Fp8trainError as e:  # a bad override, a device this machine lacks: the message, no traceback
        print(f"bench_monitor: {e}", file=sys.stderr)
        sys.exit(2)


def measure(args: argparse.Namespace, base: list[str]) -> None:
    """Time the two trainers built from the overrides ``base``, print the overhead and write --out."""
    interval = args.interval or compose(["monitor=default", *base]).monitor.interval
    with tempfile.TemporaryDirectory() as tmp:
        off = Trainer(compose([*base, "monitor=disabled"]), Path(tmp) / "off")
        on = Trainer(compose([*base, "monitor=default", "monitor.interval=3"]), Path(tmp) / "on")
        # The warm-up holds the compilations (backend.compile=true): each trainer's graphs at the first steps, the
        # monitored graph at its first monitored step. Minutes on a GPU, so say how long it took.
        t0 = time.perf_counter()
        for _ in range(args.warmup):
            timed_step(off), timed_step(on)
        warmup_s = time.perf_counter() - t0
        print(f"warm-up: {args.warmup} steps per trainer in {warmup_s:.1f} s; timing {args.steps} more", flush=True)
        t_off, t_plain, t_monitored = [], [], []
        for i in range(args.steps):
            first_off = i % 2 == 0  # alternate who goes first, so that neither always runs on a warmer cache
            if first_off:
                t_off.append(timed_step(off))
            seconds = timed_step(on)
            (t_monitored if on.monitor.is_monitored(on.step) else t_plain).append(seconds)
            if not first_off:
                t_off.append(timed_step(off))
        on.monitor.close()
        on.logger.finish()
        off.logger.finish()
    base_s = statistics.median(t_off)
    ordinary = (statistics.median(t_plain) - base_s) / base_s
    monitored = (statistics.median(t_monitored) - statistics.median(t_plain)) / base_s
    result = {
        "step_s_disabled": base_s,
        "step_s_unmonitored": statistics.median(t_plain),
        "step_s_monitored": statistics.median(t_monitored),
        "samples": [len(t_off), len(t_plain), len(t_monitored)],
        "warmup_s": warmup_s,
        "slowest_step_s": max(t_off + t_plain + t_monitored),
        "ordinary_step_overhead": ordinary,
        "monitored_step_extra": monitored,
        "interval": interval,
        "overhead_at_interval": ordinary + monitored / interval,
        "overrides": args.overrides,
    }
    print(
        f"step (median): disabled {base_s * 1e3:.1f} ms, monitor on but step not monitored "
        f"{result['step_s_unmonitored'] * 1e3:.1f} ms ({100 * ordinary:+.2f}%), monitored step "
        f"{result['step_s_monitored'] * 1e3:.1f} ms (+{100 * monitored:.1f}% of a step)\n"
        f"overhead at monitor.interval={interval}: {100 * result['overhead_at_interval']:+.2f}% of step time "
        f"({len(t_plain)} unmonitored and {len(t_monitored)} monitored steps timed)"
    )
    slowest, typical = result["slowest_step_s"], statistics.median(t_off + t_plain + t_monitored)
    if slowest > 5 * typical:  # medians survive one such step, but the user should know it happened
        print(
            f"note: one timed step took {slowest:.2f} s, {slowest / typical:.0f}x the median: a compilation after "
            f"the warm-up? --warmup {args.warmup + 3} would move it out of the timed steps"
        )
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
