"""CPU time of the end-of-step scaler update for a Llama-1B's 336 FP8 tensors: step_scalers (grouped by format
and config, stepped as (N, L) tensors) against one TensorScaler.step() per tensor.

    python benchmarks/bench_scalers.py --out benchmarks/results/scalers_cpu.json

Each round first writes a fresh amax into every scaler's current slot, as the forward and backward passes do;
that write is timed alone too and taken out. One thread; the median of --rounds rounds.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fp8train.fp8.formats import E4M3, E5M2  # noqa: E402
from fp8train.fp8.scaling import ScalingConfig, TensorScaler, step_scalers  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--linears", type=int, default=112, help="FP8 linears (Llama-1B: 16 layers x 7)")
    p.add_argument("--rounds", type=int, default=50)
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    for name in ("linears", "rounds"):
        if getattr(args, name) < 1:
            p.error(f"--{name} {getattr(args, name)}: must be >= 1")
    torch.set_num_threads(1)
    cfg = ScalingConfig(recipe="delayed")  # one config per linear in the converter; equal configs group together
    scalers = nn.ModuleList(
        TensorScaler(fmt, ScalingConfig(**vars(cfg))) for _ in range(args.linears) for fmt in (E4M3, E4M3, E5M2)
    )
    amax = torch.rand(len(scalers)) * 10

    def record():
        for s, a in zip(scalers, amax):
            s.amax_history[0] = a

    def one_by_one():
        record()
        for s in scalers:
            s.step()

    def grouped():
        record()
        step_scalers(scalers)

    def median_ms(fn) -> float:
        fn()
        times = []
        for _ in range(args.rounds):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return statistics.median(times) * 1e3

    writes = median_ms(record)
    results = {"scalers": len(scalers), "torch": torch.__version__, "slot_writes_ms": writes}
    for name, fn in (("one_by_one", one_by_one), ("step_scalers", grouped)):
        results[f"{name}_ms"] = median_ms(fn) - writes
        print(f"{name:13s} {results[f'{name}_ms']:6.2f} ms for {len(scalers)} scalers (slot writes taken out)")
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
