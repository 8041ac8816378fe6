"""Optimizer step time and state memory: torch's fused AdamW, torchao's AdamWFp8, fp8train's AdamWFp8.

    python benchmarks/bench_adam.py --out benchmarks/results/adam_1b_h100.json              # GPU: 1e9 fp32 params
    python benchmarks/bench_adam.py --params 2e7 --steps 5 --warmup 2 --device cpu          # proves the script runs

The parameters are fp32 matrices of --rows x --cols (Llama-7B-like 4096x4096 by default) adding up to --params,
the last one shorter; every variant gets the same parameters and gradients, and one at a time holds memory.
Step time is the median of --steps synchronized steps after --warmup (which also absorbs torch.compile).
State bytes/param come from the optimizer's actual state tensors (inside tensor subclasses too); on CUDA the
growth of allocated memory across the first step is reported beside it. Ratios are to fused AdamW in this run.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fp8train.optim.adamw_fp8 import AdamWFp8, optimizer_state_bytes  # noqa: E402

HYPER = dict(lr=1e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)


def _torchao(params):
    from torchao.optim import AdamWFp8 as TorchaoAdamWFp8  # optional: not a dependency of fp8train

    return TorchaoAdamWFp8(params, **HYPER)  # its default: E4M3 m and v, one scale per 256 elements


VARIANTS: dict[str, Callable[[list[torch.Tensor], argparse.Namespace], torch.optim.Optimizer]] = {
    "adamw_fused": lambda params, args: torch.optim.AdamW(params, fused=True, **HYPER),
    "torchao_fp8": lambda params, args: _torchao(params),
    "fp8train_block128": lambda params, args: AdamWFp8(params, block_size=128, compile=args.compile, **HYPER),
    "fp8train_per_tensor": lambda params, args: AdamWFp8(params, block_size=None, compile=args.compile, **HYPER),
}


def make_params(total: int, rows: int, cols: int, device: torch.device) -> list[torch.Tensor]:
    """fp32 parameters with gradients: full rows x cols chunks, then one (k, cols) chunk for the remainder."""
    shapes = [(rows, cols)] * (total // (rows * cols))
    rest = total - len(shapes) * rows * cols
    if rest:
        shapes.append((math.ceil(rest / cols), cols))
    gen = torch.Generator(device=device).manual_seed(0)
    params = []
    for shape in shapes:
        p = torch.nn.Parameter(0.02 * torch.randn(shape, device=device, generator=gen))
        p.grad = torch.randn(shape, device=device, generator=gen) * 1e-3
        params.append(p)
    return params


def bytes_needed(numel: int, variants: list[str]) -> int:
    """Memory the run holds at its peak: the parameters and gradients (fp32), one variant's copies of both, and the
    largest state of the variants (fp32 m and v for fused AdamW, about 2 bytes a parameter for the FP8 ones)."""
    state = 8 if "adamw_fused" in variants else 2.1
    return int(numel * (16 + state))


def bytes_available(device: torch.device) -> int | None:
    """Free memory of the device (CUDA), or the memory Linux says is available (CPU); None where unknown."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            kib = next(int(line.split()[1]) for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return None
    return kib * 1024


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_variant(name: str, params: list[torch.Tensor], device: torch.device, args) -> dict:
    """Time one optimizer on fresh copies of the parameters (same values and gradients for every variant)."""
    copies = []
    for p in params:
        c = torch.nn.Parameter(p.detach().clone())
        c.grad = p.grad.clone()
        copies.append(c)
    numel = sum(p.numel() for p in copies)
    synchronize(device)
    allocated_before = torch.cuda.memory_allocated(device) if device.type == "cuda" else None
    opt = VARIANTS[name](copies, args)
    times = []
    for i in range(args.warmup + args.steps):
        synchronize(device)
        t0 = time.perf_counter()
        opt.step()
        synchronize(device)
        times.append(time.perf_counter() - t0)
        if i == 0 and allocated_before is not None:
            allocated_delta = torch.cuda.memory_allocated(device) - allocated_before
    result = {
        "step_ms": statistics.median(times[args.warmup :]) * 1e3,
        "first_step_ms": times[0] * 1e3,  # includes state allocation and any compilation
        "state_bytes_per_param": optimizer_state_bytes(opt) / numel,
    }
    if allocated_before is not None:
        result["allocated_bytes_per_param"] = allocated_delta / numel
    del opt, copies
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--params", type=float, default=1e9, help="total parameter elements (default 1e9)")
    p.add_argument("--rows", type=int, default=4096)
    p.add_argument("--cols", type=int, default=4096)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="torch.compile fp8train's update (default: on CUDA only, as AdamWFp8 does)",
    )
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    variants = [v for v in args.variants.split(",") if v]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown or not variants:
        p.error(f"--variants {','.join(unknown)}: choose from {', '.join(VARIANTS)}")
    for name, least in (("params", 1), ("rows", 1), ("cols", 1), ("steps", 1), ("warmup", 0)):
        if getattr(args, name) < least:
            p.error(f"--{name} {getattr(args, name)}: must be >= {least}")
    if args.device.split(":")[0] not in ("cpu", "cuda"):
        p.error(f"--device {args.device}: choose cpu or cuda")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error(
            f"--device {args.device}: no CUDA device is visible (torch.cuda.is_available() is False, torch "
            f"{torch.__version__}). Use --device cpu, or a CUDA build of torch."
        )
    device = torch.device(args.device)
    need, have = bytes_needed(int(args.params), variants), bytes_available(device)
    if have is not None and need > have:
        p.error(
            f"--params {args.params:g}: the parameters, their gradients, one variant's copies of both and its state "
            f"need about {need / 2**30:,.1f} GiB, and {device} has {have / 2**30:,.1f} GiB free. Lower --params."
        )
    params = make_params(int(args.params), args.rows, args.cols, device)
    numel = sum(q.numel() for q in params)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    results = {
        "params": numel,
        "tensors": [list(q.shape) for q in params],
        "device": f"{device.type}: {name}",
        "torch": torch.__version__,
        "hyper": HYPER,
        "steps": args.steps,
        "warmup": args.warmup,
        "compile": args.compile,
        "variants": {},
        "skipped": {},
    }
    print(f"{numel:,} fp32 params in {len(params)} tensors of up to {args.rows}x{args.cols} on {results['device']}")
    failed = {}
    for variant in variants:
        try:
            results["variants"][variant] = run_variant(variant, params, device, args)
        except ImportError as e:
            results["skipped"][variant] = str(e)
            print(f"  {variant}: skipped ({e})")
        except Exception as e:  # out of memory, a compiler error: the other variants still run
            failed[variant] = f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}"
            print(f"  {variant}: failed: {failed[variant]}")
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    if failed:
        results["failed"] = failed

    base = results["variants"].get("adamw_fused")
    extra = device.type == "cuda"
    print(
        f"\n| variant | ms/step | state bytes/param |{' allocated bytes/param |' if extra else ''} "
        "time vs fused | memory vs fused |"
    )
    print(f"|---|---|---|{'---|' if extra else ''}---|---|")
    for variant, r in results["variants"].items():
        if base:
            r["time_vs_fused"] = r["step_ms"] / base["step_ms"]
            r["memory_vs_fused"] = r["state_bytes_per_param"] / base["state_bytes_per_param"]
        alloc = f" {r['allocated_bytes_per_param']:.3f} |" if extra else ""
        ratios = f"{r['time_vs_fused']:.3f}x | {r['memory_vs_fused']:.3f}x" if base else "- | -"
        print(f"| {variant} | {r['step_ms']:.2f} | {r['state_bytes_per_param']:.4f} |{alloc} {ratios} |")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2))
        print(f"wrote {args.out}")
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
