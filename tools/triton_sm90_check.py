"""Compile fp8train's training graphs for an H100 (sm_90) with Triton, on a machine that has no GPU.

A Triton compiler failure ("PassManager::run failed" while building a kernel) happens when inductor compiles its
kernels, before anything runs on the device, so it can be found without one. This script trains a few steps on
the CPU (or runs one step of bench_step.py's model) under a torch.compile backend that keeps the forward and
backward graphs AOT autograd makes, with inductor's decompositions and partitioner, as a CUDA run would get
them: the FP8 linears use the cuda backend's ops (``torch._scaled_mm``, which also runs on the CPU), not the
emulation, so the graphs hold the same casts, transposes and GEMM calls. Each graph is then moved to a stand-in
CUDA device with an H100's properties and handed to inductor, which generates its Triton kernels and compiles
them for sm_90 down to machine code. Nothing is launched.

``--stats`` also prints, per graph, how many Triton kernels inductor generated and the bytes they read and write
by inductor's own count (its scheduler's buffer sizes; the GEMMs and attention are external calls, counted
apart): the memory traffic FP8's casts and amaxes add around the GEMMs, comparable between variants and commits
on a machine with no GPU. It is a count, not a timing.

Needs a CUDA build of torch with Triton, such as the GPU image's torch 2.11 with Triton 3.6, installed on a CPU
machine (``pip install torch==2.11.0`` from PyPI brings both). The stand-ins replace parts of torch.cuda,
inductor's device interface and Triton's driver; they follow torch 2.11's internals and may need changes for
other versions.

    python tools/triton_sm90_check.py precision=fp8 model=llama_125m data=wikitext2 trainer.max_steps=2
    python tools/triton_sm90_check.py precision=fp8 model=llama_125m data=wikitext2 backend.compile_scope=block
    python tools/triton_sm90_check.py --bench 1b fp8_smooth       # bench_step.py's model, 2 of its layers
    python tools/triton_sm90_check.py --stats --bench 1b bf16     # and the kernels' count and bytes per graph

Prints one line per graph; exit status 1 if any fails to compile.
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys
import tempfile
import types
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

H100 = types.SimpleNamespace(
    name="NVIDIA H100 80GB HBM3",
    major=9,
    minor=0,
    multi_processor_count=132,
    total_memory=80 * 2**30,
    max_threads_per_multi_processor=2048,
    max_threads_per_block=1024,
    warp_size=32,
    regs_per_multiprocessor=65536,
    shared_memory_per_block=49152,
    shared_memory_per_block_optin=232448,
    shared_memory_per_multiprocessor=233472,
    L2_cache_size=50 * 2**20,
    clock_rate=1980000,
    memory_clock_rate=2619000,
    memory_bus_width=5120,
    gcnArchName="",
    uuid="0",
    pci_bus_id=0,
    pci_device_id=0,
    pci_domain_id=0,
    is_integrated=False,
    is_multi_gpu_board=False,
)


def pretend_h100() -> None:
    """Make torch, inductor and Triton believe one H100 is present (after the CPU graphs are captured)."""
    import torch._inductor.compile_fx as compile_fx
    import torch._inductor.config as inductor_config
    import torch._inductor.runtime.triton_helpers as triton_helpers
    import torch._subclasses.fake_tensor as fake_tensor
    import torch.cuda.random as cuda_random
    from torch._dynamo.device_interface import CudaInterface
    from torch._inductor.runtime.triton_heuristics import CachingAutotuner
    from triton.backends.compiler import GPUTarget
    from triton.runtime.driver import driver

    def const(value):
        return lambda *args, **kwargs: value

    cuda = torch.cuda
    cuda.is_available, cuda.device_count, cuda.current_device = const(True), const(1), const(0)
    cuda.get_device_properties, cuda.get_device_capability = const(H100), const((9, 0))
    cuda.get_device_name, cuda._lazy_init, cuda.is_initialized = const(H100.name), const(None), const(True)
    cuda.set_device, cuda.synchronize = const(None), const(None)
    cuda._exchange_device, cuda._maybe_exchange_device = const(0), const(0)
    cuda.current_stream = const(types.SimpleNamespace(cuda_stream=0))
    cuda.get_rng_state = cuda_random.get_rng_state = const(torch.zeros(16, dtype=torch.uint8))
    cuda.set_rng_state = cuda_random.set_rng_state = const(None)
    fake_tensor.init_gpu_context = const(None)
    compile_fx.get_cuda_device_context = lambda gm: contextlib.nullcontext()
    for name, value in dict(
        current_device=0, set_device=None, device_count=1, synchronize=None, get_device_properties=H100,
        exchange_device=0, maybe_exchange_device=0, get_compute_capability=90, get_raw_stream=0,
        memory_allocated=0, is_bf16_supported=True,
    ).items():  # fmt: skip
        setattr(CudaInterface, name, staticmethod(const(value)))
    for name, value in dict(get_device_properties=H100, current_device=0, set_device=None).items():
        setattr(CudaInterface.Worker, name, staticmethod(const(value)))
    for module in list(sys.modules.values()):  # has_triton() was cached as False when no GPU was seen
        if getattr(module, "__name__", "").startswith("torch") and hasattr(module, "has_triton"):
            module.has_triton = const(True)

    class H100Driver:
        utils = types.SimpleNamespace(
            get_device_properties=const(
                {"max_shared_mem": 232448, "multiprocessor_count": 132, "max_num_regs": 65536, "warpSize": 32}
            )
        )
        get_current_target = staticmethod(const(GPUTarget("cuda", 90, 32)))
        get_current_device = staticmethod(const(0))
        get_current_stream = staticmethod(const(0))
        get_active_torch_device = staticmethod(const(torch.device("cuda", 0)))
        get_device_interface = staticmethod(const(torch.cuda))
        get_benchmarker = staticmethod(const(None))

    driver.set_active(H100Driver())
    driver._default = driver._active
    triton_helpers.set_driver_to_gpu = const(None)
    CachingAutotuner._make_launchers = const(None)  # compiled to cubin, never loaded
    inductor_config.compile_threads = 1  # in this process, where the stand-ins are


class GraphCapture:
    """A torch.compile backend that keeps AOT autograd's forward and backward graphs and runs them eagerly."""

    def __init__(self) -> None:
        self.graphs: list[tuple[str, torch.fx.GraphModule, list]] = []

    def __call__(self, gm, example_inputs):
        from functorch.compile import make_boxed_func, min_cut_rematerialization_partition
        from torch._functorch.aot_autograd import aot_module_simplified
        from torch._inductor.decomposition import select_decomp_table

        def keep(kind):
            def compiler(graph, inputs):
                self.graphs.append((kind, graph, list(inputs)))
                return make_boxed_func(graph.forward)

            return compiler

        return aot_module_simplified(
            gm,
            example_inputs,
            fw_compiler=keep("forward"),
            bw_compiler=keep("backward"),
            decompositions=select_decomp_table(),
            partition_fn=min_cut_rematerialization_partition,
        )


def on_cuda(graph: torch.fx.GraphModule) -> torch.fx.GraphModule:
    cuda = torch.device("cuda", 0)
    for node in graph.graph.nodes:
        if isinstance(node.kwargs.get("device"), torch.device) and node.kwargs["device"].type == "cpu":
            node.kwargs = {**node.kwargs, "device": cuda}
        node.args = tuple(cuda if isinstance(a, torch.device) and a.type == "cpu" else a for a in node.args)
    graph.recompile()
    return graph


class KernelStats:
    """Inductor's count of what each compiled graph's Triton kernels move (read + write bytes) and of its external
    calls (GEMMs, attention), recorded as each graph is generated."""

    def __init__(self) -> None:
        self.graphs: list[dict] = []

    @contextlib.contextmanager
    def recording(self):
        from torch._inductor.graph import GraphLowering

        original = GraphLowering.compile_to_module
        stats = self

        def compile_to_module(graph):
            module = original(graph)
            row = {"triton_kernels": 0, "triton_bytes": 0, "extern_calls": 0, "extern_bytes": 0}
            for node in graph.scheduler.nodes:  # after codegen: each node is one kernel or one external call
                extern = type(node).__name__ == "ExternKernelSchedulerNode"
                row["extern_calls" if extern else "triton_kernels"] += 1
                row["extern_bytes" if extern else "triton_bytes"] += node.get_read_write_buffers_sizes()
            stats.graphs.append(row)
            return module

        GraphLowering.compile_to_module = compile_to_module
        try:
            yield
        finally:
            GraphLowering.compile_to_module = original


def compile_for_h100(capture: GraphCapture, stats: KernelStats | None = None) -> list[tuple[str, str]]:
    """(kind, "ok" or the failure's lines) for every captured graph, compiled by inductor for sm_90."""
    from torch._inductor.compile_fx import compile_fx_inner
    from torch._subclasses.fake_tensor import FakeTensorMode

    pretend_h100()
    results = []
    for kind, graph, inputs in capture.graphs:
        mode = FakeTensorMode(allow_non_fake_inputs=True)
        with mode:
            fake = [
                torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="cuda") if torch.is_tensor(t) else t
                for t in inputs
            ]
        try:
            with mode, stats.recording() if stats else contextlib.nullcontext():
                compile_fx_inner(on_cuda(graph), fake, is_backward=kind == "backward")
            results.append((kind, "ok"))
        except Exception as e:  # the compiler's own error, reported per graph
            lines = [ln.strip() for ln in str(e).splitlines() if ln.startswith("Name=") or "Error" in ln]
            results.append((kind, "FAILED: " + " | ".join(lines[:3])))
    return results


def use_cuda_ops() -> None:
    """FP8 linears built for the CPU get the cuda backend's ops: torch._scaled_mm, as on an H100."""
    from fp8train.backends.cpu import CpuBackend
    from fp8train.backends.cuda import ScaledMmOps

    CpuBackend.fp8_ops = lambda self: ScaledMmOps()


def capture_training(overrides: list[str], capture: GraphCapture) -> None:
    from fp8train.backends.cpu import CpuBackend
    from fp8train.config import compose
    from fp8train.trainer import Trainer

    # The backend's own compile (model or block scope, eager until the delayed scales have a history), with the
    # capturing compiler in place of inductor: the graphs are those a CUDA run compiles.
    CpuBackend.compile_kwargs = lambda self: {"backend": capture, "dynamic": False}
    defaults = ["backend=cpu", "backend.compile=true", "trainer.max_steps=2", "trainer.eval_every=0"]
    defaults += ["trainer.checkpoint_every=0", "logger.wandb.mode=disabled", "logger.progress=false"]
    with tempfile.TemporaryDirectory() as run_dir:
        Trainer(compose(defaults + overrides), Path(run_dir)).fit()


def capture_bench_step(shape: str, variant: str, capture: GraphCapture) -> None:
    import bench_step
    import torch.nn.functional as F

    from fp8train.backends.cpu import CpuBackend
    from fp8train.fp8.scaling import step_scalers
    from fp8train.model import build_model

    cfg = dataclasses.replace(bench_step.model_config(shape), n_layers=2)  # the kernels of every layer are alike
    _, batch, seq_len = bench_step.SHAPES[shape]
    backend = CpuBackend(name="cpu", device=torch.device("cpu"))
    model = bench_step.convert(variant, build_model(cfg), backend)
    if variant == "torchao_tensorwise":
        # torchao's Float8Linear casts its input to the *GPU* autocast dtype when GPU autocast is on, and ignores
        # the CPU's: do on the CPU what it does on the H100, or its casts would read fp32 activations.
        from torchao.float8.float8_linear import Float8Linear

        def to_autocast_dtype(module, args):
            return (args[0].to(torch.bfloat16),) + args[1:]

        for module in model.modules():
            if isinstance(module, Float8Linear):
                module.register_forward_pre_hook(to_autocast_dtype)
    tokens = torch.randint(0, cfg.vocab_size, (batch, seq_len + 1))

    def step(forward) -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = forward(tokens[:, :-1])
        F.cross_entropy(logits.float().flatten(0, 1), tokens[:, 1:].flatten()).backward()
        step_scalers(model)

    step(model)  # eagerly, as the benchmark's warm-up: the graphs timed are those of scales with a history
    step(torch.compile(model, backend=capture, dynamic=False))


def main() -> int:
    args = sys.argv[1:]
    if not torch.backends.cuda.is_built():
        print("triton_sm90_check: needs a CUDA build of torch (with Triton); this one is", torch.__version__)
        return 2
    stats = KernelStats() if "--stats" in args else None
    args = [a for a in args if a != "--stats"]
    use_cuda_ops()
    capture = GraphCapture()
    if args[:1] == ["--bench"]:
        capture_bench_step(args[1], args[2], capture)
    else:
        capture_training(args, capture)
    results = compile_for_h100(capture, stats)
    for i, (kind, outcome) in enumerate(results):
        print(f"graph {i} ({kind}): {outcome}")
    if stats and stats.graphs:
        total = {key: sum(g[key] for g in stats.graphs) for key in stats.graphs[0]}
        for name, row in [*((f"graph {i}", g) for i, g in enumerate(stats.graphs)), ("all graphs", total)]:
            print(
                f"{name}: {row['triton_kernels']} Triton kernels moving {row['triton_bytes'] / 2**20:,.0f} MiB; "
                f"{row['extern_calls']} external calls (GEMMs, attention) moving {row['extern_bytes'] / 2**20:,.0f} MiB"
            )
    return int(any(outcome != "ok" for _, outcome in results))


if __name__ == "__main__":
    sys.exit(main())
