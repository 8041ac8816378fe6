"""The benchmark scripts, run as their docs say at a CPU size: they finish, and their JSON holds sane numbers.

Their numbers are for GPUs (benchmarks/RESULTS.md); what is checked here is that the scripts work, so that a GPU's
time is not spent finding out that one does not.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from tests.helpers import ROOT

pytestmark = pytest.mark.slow


def run_bench(script: str, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(ROOT / "benchmarks" / script), *args]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=os.environ.copy())
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    return out


def positive(x) -> bool:
    return isinstance(x, float) and math.isfinite(x) and x > 0


def load_bench(name: str):
    """A benchmark script as a module, to call its functions or its main() in this process."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))


def run_main(module, argv: list[str], monkeypatch) -> int:
    """``module.main()`` with ``argv``; its exit status. Any exception other than SystemExit fails the test: a user
    would have seen it as a traceback."""
    monkeypatch.setattr(sys, "argv", [module.__file__, *argv])
    try:
        module.main()
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 1
    return 0


NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="asks for CUDA on a machine without it")


def test_bench_step_times_every_variant_and_linear(tmp_path):
    out_file = tmp_path / "step.json"
    variants = ["bf16", "fp8", "fp8_smooth", "fp8_smooth_channel"]
    run_bench(
        "bench_step.py", "--shape", "cpu_tiny", "--device", "cpu", "--no-compile", "--steps", "2", "--warmup", "1",
        "--variants", ",".join(variants), "--profile", "1", "--out", str(out_file),
    )  # fmt: skip
    result = json.loads(out_file.read_text())
    assert list(result["variants"]) == variants
    for name, r in result["variants"].items():
        assert positive(r["tokens_per_s"]) and positive(r["step_ms"]) and positive(r["warmup_s"]), name
        # Same initial weights and batch in every variant: after 3 steps FP8's loss is bf16's to FP8 rounding.
        assert abs(r["loss"] - result["variants"]["bf16"]["loss"]) < 0.01 * r["loss"], name
        # The profiled step's time by kind: the CPU's matmuls and attention are torch ops of their own.
        kinds = r["profile"]["ms_per_step"]
        assert list(kinds) == ["fused", "gemm", "attention", "optimizer", "other"], name
        assert positive(kinds["gemm"]) and positive(kinds["attention"]) and positive(kinds["optimizer"]), name
        assert {"name": "aten::mm", "kind": "gemm"}.items() <= next(
            t for t in r["profile"]["top"] if t["name"] == "aten::mm"
        ).items()
    shapes = {lin["linear"] for lin in result["linears"]}
    assert shapes == {"q/o_proj", "k/v_proj", "gate/up_proj", "down_proj"}
    assert all(positive(lin["bf16_ms"]) and positive(lin["fp8_ms"]) for lin in result["linears"])


@pytest.mark.parametrize(
    "name,kind",
    [  # kernel names in the forms of cuBLAS (two generations), flash and cuDNN attention, Triton and fused AdamW
        ("sm90_xmma_gemm_e4m3e4m3_e4m3f32_f32_tn_n_tilesize128x128x128_warpgroupsize1x1x1_kernel__5x_cublas", "gemm"),
        ("nvjet_qqtst_128x256_128x6_2x1_v_bz_coopA_NNT", "gemm"),
        ("void pytorch_flash::flash_bwd_dq_dk_dv_loop_seqk_parallel_kernel<Flash_bwd_kernel_traits>", "attention"),
        ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_3_64x64x128_4x1x1_kernel0_0", "attention"),
        ("triton_poi_fused__scaled_dot_product_flash_attention_transpose_3", "fused"),
        ("triton_red_fused__to_copy_abs_amax_clamp_mul_0", "fused"),
        ("void at::native::multi_tensor_apply_kernel<FusedAdamMathFunctor<float, 4>>", "optimizer"),
        ("Memcpy DtoD (Device -> Device)", "other"),
        ("aten::_scaled_mm", "gemm"),
        ("aten::mul", "other"),
    ],
)  # fmt: skip
def test_bench_step_sorts_kernels_by_kind(name, kind):
    assert load_bench("bench_step").kind_of(name) == kind


def test_bench_adam_reports_state_bytes_per_param(tmp_path):
    out_file = tmp_path / "adam.json"
    variants = "adamw_fused,fp8train_block128,fp8train_per_tensor"
    run_bench(
        "bench_adam.py", "--params", "2e6", "--rows", "1024", "--cols", "1024", "--steps", "2", "--warmup", "1",
        "--device", "cpu", "--variants", variants, "--out", str(out_file),
    )  # fmt: skip
    result = json.loads(out_file.read_text())
    state = {name: r["state_bytes_per_param"] for name, r in result["variants"].items()}
    # fp32 m and v: 8 bytes; FP8 m and v: 2 bytes, plus one fp32 scale per 128-element block for each (1/16 byte).
    assert state["adamw_fused"] == pytest.approx(8.0, abs=1e-3)
    assert state["fp8train_block128"] == pytest.approx(2.0 + 2 * 4 / 128, abs=1e-3)
    assert state["fp8train_per_tensor"] == pytest.approx(2.0, abs=1e-3)
    assert all(positive(r["step_ms"]) for r in result["variants"].values())


def test_bench_monitor_samples_both_kinds_of_step(tmp_path):
    out_file = tmp_path / "monitor.json"
    out = run_bench(
        "bench_monitor.py", "--steps", "6", "--warmup", "1", "--out", str(out_file),
        "backend=cpu", "trainer.micro_batch_size=2", "data.seq_len=64",
    )  # fmt: skip
    result = json.loads(out_file.read_text())
    # Monitor at interval 3: the warm-up is step 1; of the timed steps 2..7, 3 and 6 are monitored.
    assert result["samples"] == [6, 4, 2]
    assert result["interval"] == 25  # the default config's, which the overhead is reported at
    assert positive(result["step_s_disabled"]) and positive(result["warmup_s"])
    assert math.isclose(
        result["overhead_at_interval"],
        result["ordinary_step_overhead"] + result["monitored_step_extra"] / 25,
        rel_tol=1e-9,
    )
    assert "warm-up: 1 steps per trainer" in out.stdout


def test_bench_scalers_compares_grouped_and_one_by_one_updates(tmp_path):
    out_file = tmp_path / "scalers.json"
    run_bench("bench_scalers.py", "--linears", "8", "--rounds", "3", "--out", str(out_file))
    result = json.loads(out_file.read_text())
    assert result["scalers"] == 24  # input, weight and gradient per linear
    assert positive(result["one_by_one_ms"]) and positive(result["step_scalers_ms"])


@pytest.mark.parametrize(
    "script,argv,named",
    [
        pytest.param("bench_step", ["--device", "cuda"], "--device cuda", marks=NO_CUDA),
        ("bench_step", ["--steps", "0", "--device", "cpu"], "--steps 0"),
        ("bench_step", ["--warmup", "-1", "--device", "cpu"], "--warmup -1"),
        ("bench_adam", ["--variants", "adamw_fused,nope", "--device", "cpu"], "--variants nope"),
        pytest.param("bench_adam", ["--device", "cuda", "--params", "1e4"], "--device cuda", marks=NO_CUDA),
        ("bench_adam", ["--device", "tpu", "--params", "1e4"], "--device tpu"),
        ("bench_adam", ["--steps", "0", "--device", "cpu", "--params", "1e4"], "--steps 0"),
        ("bench_adam", ["--params", "1e15", "--device", "cpu"], "--params"),  # petabytes: refused before allocating
        ("bench_monitor", ["model=huge"], "model=huge"),
        pytest.param("bench_monitor", ["backend=cuda"], "backend.name=cuda", marks=NO_CUDA),
        ("bench_monitor", ["--steps", "2"], "--steps 2"),
        ("bench_monitor", ["--interval", "0"], "--interval 0"),
        ("bench_scalers", ["--rounds", "0"], "--rounds 0"),
    ],
)  # fmt: skip
def test_bench_cli_mistakes_give_one_message_and_nonzero_exit(script, argv, named, monkeypatch, capsys):
    module = load_bench(script)
    if script == "bench_adam":  # a check that comes too late must not allocate the petabytes
        monkeypatch.setattr(module, "make_params", lambda *a: pytest.fail("allocated the parameters"))
    assert run_main(module, argv, monkeypatch) != 0
    err = capsys.readouterr().err
    assert named in err and "Traceback" not in err


def test_bench_step_records_failed_and_skipped_variants_and_exits_nonzero(monkeypatch, capsys, tmp_path):
    bench_step = load_bench("bench_step")

    def fake_time_steps(variant, *args):
        if variant == "fp8":
            raise RuntimeError("CUDA out of memory. Tried to allocate 20.00 GiB\nmore detail")
        if variant == "torchao_tensorwise":
            raise ImportError("No module named 'torchao'")
        return {"step_ms": 10.0, "first_step_s": 1.0, "warmup_s": 1.0, "tokens_per_s": 51200.0, "loss": 7.0,
                "peak_mem_gb": 0.1}  # fmt: skip

    monkeypatch.setattr(bench_step, "time_steps", fake_time_steps)
    monkeypatch.setattr(bench_step, "release_memory", lambda: None)  # nothing to release; dynamo's import is slow
    out_file = tmp_path / "step.json"
    argv = ["--shape", "cpu_tiny", "--device", "cpu", "--no-per-linear", "--out", str(out_file)]
    code = run_main(bench_step, [*argv, "--variants", "bf16,fp8,torchao_tensorwise"], monkeypatch)
    out = " ".join(capsys.readouterr().out.split())
    result = json.loads(out_file.read_text())
    assert code == 1  # a variant that failed is not a finished benchmark
    assert result["variants"]["bf16"]["tokens_per_s"] == 51200.0
    assert result["variants"]["fp8"] == {"error": "RuntimeError: CUDA out of memory. Tried to allocate 20.00 GiB"}
    assert result["skipped"] == {"torchao_tensorwise": "No module named 'torchao'"}
    assert "fp8 failed: RuntimeError: CUDA out of memory" in out and "torchao_tensorwise skipped" in out
    # Emulated FP8 (the CPU, or a GPU below sm_89) is named in the results, as it times no FP8 hardware.
    assert result["fp8_matmul"] == "emulated"
    # Only skipped: the benchmark did what it could and says what it left out.
    assert run_main(bench_step, [*argv, "--variants", "bf16,torchao_tensorwise"], monkeypatch) == 0


def test_bench_step_warns_when_a_gpu_emulates_fp8():
    from fp8train.fp8.ops import Fp8Ops

    bench_step = load_bench("bench_step")
    old_gpu = SimpleNamespace(device=torch.device("cuda", 0), fp8_ops=Fp8Ops, describe=lambda: "cuda (T4, sm_75)")
    assert "emulated" in bench_step.fp8_matmul_note(old_gpu, ["bf16", "fp8_smooth"])
    assert bench_step.fp8_matmul_note(old_gpu, ["bf16"]) is None  # nothing FP8 timed
    cpu = SimpleNamespace(device=torch.device("cpu"), fp8_ops=Fp8Ops, describe=lambda: "cpu")
    assert bench_step.fp8_matmul_note(cpu, ["fp8"]) is None  # the CPU emulates by design, and says so elsewhere


def test_bench_step_times_linears_under_block_compilation(monkeypatch):
    """--compile-scope block compiles the model's blocks; a linear timed alone has none and is compiled whole."""
    from fp8train import backends
    from fp8train.config import BackendConfig, CompileScope

    bench_step = load_bench("bench_step")
    compiled = []
    monkeypatch.setattr(torch, "compile", lambda model, **kw: compiled.append(type(model).__name__) or model)
    backend = backends.select(BackendConfig(name="cpu", compile_scope=CompileScope.block))
    model_cfg = SimpleNamespace(d_model=32, ffn_dim=64, kv_heads=1, head_dim=16)
    args = argparse.Namespace(compile=True, fast_accum=True, warmup=1, steps=1)
    rows = bench_step.time_linears(model_cfg, 16, backend, args)
    assert [r.get("error") for r in rows] == [None] * 4
    assert all(positive(r["bf16_ms"]) and positive(r["fp8_ms"]) for r in rows)
    assert compiled == ["Linear", "Fp8Linear"] * 4


def test_bench_adam_records_a_failed_variant_and_exits_nonzero(monkeypatch, capsys, tmp_path):
    bench_adam = load_bench("bench_adam")

    def out_of_memory(params, args):
        raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setitem(bench_adam.VARIANTS, "torchao_fp8", out_of_memory)
    out_file = tmp_path / "adam.json"
    argv = ["--params", "1e4", "--rows", "64", "--cols", "64", "--steps", "1", "--warmup", "0", "--device", "cpu"]
    code = run_main(bench_adam, [*argv, "--variants", "adamw_fused,torchao_fp8", "--out", str(out_file)], monkeypatch)
    result = json.loads(out_file.read_text())
    assert code == 1
    assert result["failed"] == {"torchao_fp8": "RuntimeError: CUDA out of memory. Tried to allocate 2.00 GiB"}
    assert result["variants"]["adamw_fused"]["state_bytes_per_param"] == pytest.approx(8.0, abs=0.01)  # + step counters
    assert "torchao_fp8: failed: RuntimeError: CUDA out of memory" in capsys.readouterr().out
