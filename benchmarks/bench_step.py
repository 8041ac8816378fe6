"""Tokens/s of a full training step (forward, backward, AdamW step) for each precision, in one process.

    python benchmarks/bench_step.py --shape 1b --out benchmarks/results/step_1b.json        # H100: Llama-1B class
    python benchmarks/bench_step.py --shape 7b_layers --out benchmarks/results/step_7b.json # 7B layer shape, 4 layers
    python benchmarks/bench_step.py --shape cpu_tiny --device cpu --no-compile              # proves the script runs
    python benchmarks/bench_step.py --shape 1b --compile-scope block   # each block compiled, once for all of them
    python benchmarks/bench_step.py --shape 1b --profile 3 --no-per-linear  # + where each step's time goes

Variants: bf16, fp8 (plain SwiGLU), fp8_smooth (token), fp8_smooth_channel, and torchao's float8 training
(tensorwise) when torchao is importable. Every variant runs the same model shape, data and optimizer; results
are reported as ratios to bf16 measured in the same run. ``--per-linear`` also times each linear shape alone.
``--profile N`` then runs N more steps of each variant under torch.profiler and splits their time by kernel kind:
the GEMMs FP8 speeds up, attention, the compiler's fused kernels (casts, amaxes, norms, SwiGLU, loss), the
optimizer and the rest; on a GPU also the time it sat idle (launch and host overhead).
A variant that cannot run is said and kept in the JSON: torchao not installed under "skipped", anything else
(out of memory, a compiler error) as its "error", after which the other variants still run and the exit status is
1. "fp8_matmul" names the FP8 GEMM fp8train's variants used: scaled_mm, or emulated (the CPU, GPUs below sm_89).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import re
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fp8train import backends, precision  # noqa: E402
from fp8train.config import (  # noqa: E402
    BackendConfig,
    CompileScope,
    ModelConfig,
    PrecisionConfig,
    Recipe,
    SmoothSwiGLU,
    compose,
)
from fp8train.errors import Fp8trainError  # noqa: E402
from fp8train.model import build_model  # noqa: E402

# name: (overrides of conf/model, micro batch, seq_len); the model shapes come from the config files themselves.
SHAPES = {
    "1b": (["model=llama_1b"], 8, 2048),
    "7b_layers": (["model=llama2_7b", "model.n_layers=4"], 2, 4096),
    "cpu_tiny": (["model=tiny", "model.vocab_size=2048", "model.n_layers=2", "model.max_seq_len=256"], 4, 128),
}


def model_config(shape: str) -> ModelConfig:
    overrides, _, seq_len = SHAPES[shape]
    cfg = compose([*overrides, f"data.seq_len={seq_len}"]).model
    return dataclasses.replace(cfg, vocab_size=cfg.vocab_size or 32000)


VARIANTS = {
    "bf16": PrecisionConfig(name="bf16", recipe=Recipe.bf16),
    "fp8": PrecisionConfig(name="fp8", recipe=Recipe.fp8),
    "fp8_smooth": PrecisionConfig(name="fp8_smooth", recipe=Recipe.fp8, smooth_swiglu=SmoothSwiGLU.token),
    "fp8_smooth_channel": PrecisionConfig(
        name="fp8_smooth_channel", recipe=Recipe.fp8, smooth_swiglu=SmoothSwiGLU.channel
    ),
}


def convert(variant: str, model: torch.nn.Module, backend, fast_accum: bool = True) -> torch.nn.Module:
    """The plain model in the variant's precision: fp8train's converter, or torchao's for torchao_tensorwise."""
    if variant != "torchao_tensorwise":
        return precision.convert(model, dataclasses.replace(VARIANTS[variant], fast_accum=fast_accum), backend)
    from torchao.float8 import convert_to_float8_training

    # Same filter as fp8train's converter: lm_head stays in bf16, dims must be multiples of 16.
    return convert_to_float8_training(
        model,
        module_filter_fn=lambda m, fqn: fqn != "lm_head" and m.in_features % 16 == 0 and m.out_features % 16 == 0,
    )


def build(variant: str, model_cfg: ModelConfig, backend, compile_model: bool, fast_accum: bool = True):
    torch.manual_seed(0)
    model = convert(variant, build_model(model_cfg).to(backend.device), backend, fast_accum)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=backend.has_fused_adamw())
    forward = backend.compile(model) if compile_model else model
    return model, forward, opt


def timed(fn, backend, args) -> tuple[float, float, float]:
    """(first call, all args.warmup calls, median over args.steps calls after them) of fn()'s wall time, synchronised
    on both sides. The first call includes torch.compile's compilation; the warm-up also the second one, when the
    FP8 scales got their amax history (TensorScaler.history_ready)."""
    times = []
    for _ in range(args.warmup + args.steps):
        backend.synchronize()
        t0 = time.perf_counter()
        fn()
        backend.synchronize()
        times.append(time.perf_counter() - t0)
    return times[0], sum(times[: args.warmup]), statistics.median(times[args.warmup :])


# Kernel kinds by name: CUDA kernels on a GPU (Triton, cuBLAS / CUTLASS GEMMs, flash or cuDNN attention, the fused
# AdamW's multi-tensor kernels), torch ops on the CPU. First match wins: Triton kernels are named after the ops they
# fuse, which may include attention's.
KINDS = {
    "fused": re.compile(r"^triton_|cpp_fused|Torch-Compiled Region", re.I),
    "gemm": re.compile(r"gemm|nvjet|cutlass|xmma|cublas|aten::(mm|addmm|bmm|_scaled_mm)$", re.I),
    "attention": re.compile(r"flash|fmha|sdpa|attention", re.I),
    "optimizer": re.compile(r"adam|multi_tensor_apply|foreach", re.I),
}


def kind_of(name: str) -> str:
    return next((kind for kind, pattern in KINDS.items() if pattern.search(name)), "other")


def profile_steps(step, backend, n: int, step_ms: float) -> dict:
    """Busy time per step by kernel kind over ``n`` profiled steps, in ms, and the 12 costliest kernels. On a GPU
    the kernels' own durations (``idle``: the median step's wall time they leave uncovered); on the CPU the torch
    ops' self times."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    on_gpu = backend.device.type == "cuda"
    activities = [ProfilerActivity.CPU, ProfilerActivity.CUDA] if on_gpu else [ProfilerActivity.CPU]
    backend.synchronize()
    with profile(activities=activities) as prof:
        for _ in range(n):
            step()
        backend.synchronize()
    us_by_name = Counter()
    if on_gpu:  # kernel events only: a CPU op's device time is its kernels' again
        for e in prof.events():
            if e.device_type == DeviceType.CUDA:
                us_by_name[e.name] += e.device_time_total
    else:
        for e in prof.key_averages():
            us_by_name[e.key] += e.self_cpu_time_total
    ms_by_kind = Counter()
    for name, us in us_by_name.items():
        ms_by_kind[kind_of(name)] += us / 1e3 / n
    result = {"steps": n, "ms_per_step": {k: ms_by_kind[k] for k in [*KINDS, "other"]}}
    if on_gpu:
        result["ms_per_step"]["idle"] = max(step_ms - sum(ms_by_kind.values()), 0.0)
    result["top"] = [
        {"name": name[:160], "kind": kind_of(name), "ms_per_step": us / 1e3 / n}
        for name, us in us_by_name.most_common(12)
    ]
    return result


def time_steps(variant, model_cfg, batch, seq_len, backend, args) -> dict:
    from fp8train.fp8.scaling import step_scalers

    model, forward, opt = build(variant, model_cfg, backend, args.compile, args.fast_accum)
    tokens = torch.randint(0, model_cfg.vocab_size, (batch, seq_len + 1), device=backend.device)
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    losses = []

    def step():
        with backend.autocast(torch.bfloat16):
            logits = forward(inputs)
        loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        step_scalers(model)
        losses.append(loss.detach())

    backend.reset_peak_memory()
    first_s, warmup_s, step_s = timed(step, backend, args)
    result = {
        "step_ms": step_s * 1e3,
        "first_step_s": first_s,
        "warmup_s": warmup_s,
        "tokens_per_s": batch * seq_len / step_s,
        "loss": losses[-1].item(),
        "peak_mem_gb": backend.peak_memory_bytes() / 2**30,
    }
    if args.profile:
        result["profile"] = profile_steps(step, backend, args.profile, step_s * 1e3)
    return result


def time_linears(model_cfg, tokens, backend, args) -> list[dict]:
    """Forward+backward of each distinct linear shape alone: bf16 nn.Linear vs fp8train's Fp8Linear."""
    from fp8train.fp8.linear import Fp8Linear
    from fp8train.fp8.scaling import ScalingConfig, step_scalers

    d, f, kv = model_cfg.d_model, model_cfg.ffn_dim, model_cfg.kv_heads * model_cfg.head_dim
    backend = dataclasses.replace(backend, compile_scope="model")  # a linear alone has no blocks: compiled whole
    rows = []
    for name, (k, n) in {"q/o_proj": (d, d), "k/v_proj": (d, kv), "gate/up_proj": (d, f), "down_proj": (f, d)}.items():
        x = torch.randn(tokens, k, device=backend.device, requires_grad=True)
        result = {"linear": name, "shape": f"{tokens}x{k} @ {k}x{n}"}
        for label in ("bf16", "fp8"):
            lin = torch.nn.Linear(k, n, bias=False, device=backend.device)
            if label == "fp8":
                lin = Fp8Linear.from_linear(
                    lin, scaling=ScalingConfig(recipe="delayed"), ops=backend.fp8_ops(), fast_accum=args.fast_accum
                )
            fn = backend.compile(lin) if args.compile else lin

            def fwd_bwd(fn=fn, x=x, lin=lin):
                with backend.autocast(torch.bfloat16):
                    y = fn(x)
                y.float().sum().backward()
                step_scalers(lin)  # as a training step ends: from the second call on, the scales have a history

            try:
                result[f"{label}_ms"] = timed(fwd_bwd, backend, args)[2] * 1e3
            except Exception as e:  # one linear that does not compile must not cost the whole-step results
                first_line = (str(e).strip().splitlines() or [""])[0]
                result["error"] = f"{label}: {type(e).__name__}: {first_line}"
                break
        if "error" not in result:
            result["fp8_speedup"] = result["bf16_ms"] / result["fp8_ms"]
        rows.append(result)
    return rows


def fp8_matmul_note(backend, variants: list[str]) -> str | None:
    """A warning when fp8train's FP8 variants would time the emulation on a GPU (below sm_89): their numbers would
    read as FP8 speed. None on the CPU, which emulates by design, and when no such variant runs."""
    if backend.device.type == "cpu" or not set(variants) & {*VARIANTS} - {"bf16"}:
        return None
    if backend.fp8_ops().name != "emulated":
        return None
    return (
        f"note: {backend.describe()} has no FP8 matmuls (sm_89+), so fp8train's FP8 variants run emulated here: "
        "their times are those of the emulation, not of FP8 hardware."
    )


def release_memory() -> None:
    """Free what the variant just timed held (its model, optimizer state and compiled graphs) before the next."""
    torch._dynamo.reset()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=sorted(SHAPES), default="1b")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--variants", default="bf16,fp8,fp8_smooth,fp8_smooth_channel,torchao_tensorwise")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--batch", type=int, help="micro batch (default: the shape's)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--compile-scope", choices=["model", "block"], default="model", help="backend.compile_scope")
    p.add_argument("--per-linear", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument(
        "--fast-accum",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="precision.fast_accum of fp8train's variants (torchao's forward GEMM always uses it)",
    )
    p.add_argument("--profile", type=int, default=0, metavar="N", help="profile N more steps of each variant")
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    variants = [v for v in args.variants.split(",") if v]  # --variants '' times the linears only
    unknown = [v for v in variants if v not in {*VARIANTS, "torchao_tensorwise"}]
    if unknown:
        p.error(f"--variants {','.join(unknown)}: choose from {', '.join([*VARIANTS, 'torchao_tensorwise'])}")
    if args.steps < 1:
        p.error(f"--steps {args.steps}: at least 1 timed step is needed")
    if args.warmup < 0:
        p.error(f"--warmup {args.warmup}: must be >= 0")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error(
            f"--device cuda: no CUDA device is visible (torch.cuda.is_available() is False, torch "
            f"{torch.__version__}). Use --device cpu, or a CUDA build of torch."
        )
    try:
        backend = backends.select(BackendConfig(name=args.device, compile_scope=CompileScope(args.compile_scope)))
    except Fp8trainError as e:
        p.error(str(e))
    _, batch, seq_len = SHAPES[args.shape]
    model_cfg = model_config(args.shape)
    batch = args.batch or batch
    results = {
        "shape": args.shape,
        "model": dataclasses.asdict(model_cfg),
        "batch": batch,
        "seq_len": seq_len,
        "device": backend.describe(),
        "torch": torch.__version__,
        "compile": args.compile,
        "compile_scope": args.compile_scope,
        "fast_accum": args.fast_accum,
        "fp8_matmul": backend.fp8_ops().name,  # scaled_mm (FP8 hardware) or emulated
        "variants": {},
        "skipped": {},
    }
    print(
        f"{args.shape}: {model_cfg.n_layers} layers, d {model_cfg.d_model}, batch {batch} x {seq_len} on "
        f"{backend.describe()}, compile={args.compile} ({args.compile_scope})"
    )
    if note := fp8_matmul_note(backend, variants):
        print(note)

    def save() -> None:  # after every variant, so a run cut short keeps what it measured
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(results, indent=2))

    for variant in variants:
        print(f"  {variant:20s} building{' and compiling' if args.compile else ''} ...", flush=True)
        try:
            r = time_steps(variant, model_cfg, batch, seq_len, backend, args)
        except ImportError as e:  # torchao not installed: said, and kept in the results, but not a failure
            results["skipped"][variant] = str(e)
            print(f"  {variant:20s} skipped ({e})")
            save()
            continue
        except Exception as e:  # one variant that fails (a compiler error, out of memory) must not cost the others
            first_line = (str(e).strip().splitlines() or [""])[0]
            results["variants"][variant] = {"error": f"{type(e).__name__}: {first_line}"}
            print(f"  {variant:20s} failed: {type(e).__name__}: {first_line}", flush=True)
            save()
            continue
        finally:
            release_memory()
        results["variants"][variant] = r
        print(
            f"  {variant:20s} {r['tokens_per_s']:>12,.0f} tok/s  {r['step_ms']:8.1f} ms/step  "
            f"{r['peak_mem_gb']:6.2f} GB  loss {r['loss']:.3f}  "
            f"(first step {r['first_step_s']:.1f} s, warm-up {r['warmup_s']:.1f} s)",
            flush=True,
        )
        if "profile" in r:
            parts = ", ".join(f"{k} {ms:.1f}" for k, ms in r["profile"]["ms_per_step"].items())
            print(f"  {'':20s} ms per step: {parts}", flush=True)
        save()
    timed_ok = {k: v for k, v in results["variants"].items() if "tokens_per_s" in v}
    base = timed_ok.get("bf16")
    if base:
        print(
            "ratios to bf16:",
            ", ".join(f"{k} {v['tokens_per_s'] / base['tokens_per_s']:.3f}x" for k, v in timed_ok.items()),
        )
    if "fp8" in timed_ok and "fp8_smooth" in timed_ok:
        overhead = timed_ok["fp8"]["tokens_per_s"] / timed_ok["fp8_smooth"]["tokens_per_s"] - 1
        print(f"Smooth-SwiGLU (token) overhead over plain FP8: {overhead * 100:+.1f}%")
    if args.per_linear:
        results["linears"] = time_linears(model_cfg, batch * seq_len, backend, args)
        for r in results["linears"]:
            if "error" in r:
                print(f"  {r['linear']:13s} {r['shape']:24s} failed: {r['error']}")
                continue
            print(
                f"  {r['linear']:13s} {r['shape']:24s} bf16 {r['bf16_ms']:7.3f} ms  fp8 {r['fp8_ms']:7.3f} ms  "
                f"{r['fp8_speedup']:.2f}x"
            )
    save()
    if args.out:
        print(f"wrote {args.out}")
    failed = [k for k, v in results["variants"].items() if "error" in v]
    failed += [f"{r['linear']} ({r['error']})" for r in results.get("linears", []) if "error" in r]
    if failed:  # what was measured is printed and saved, but the run did not do all it was asked
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
