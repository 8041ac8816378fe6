"""The benchmark scripts, run as their docs say at a CPU size: they finish, and their JSON holds sane numbers.

Their numbers are for GPUs (benchmarks/RESULTS.md); what is checked here is that the scripts work, so that a GPU's
time is not spent finding out that one does not.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

from tests.helpers import ROOT

pytestmark = pytest.mark.slow


def run_bench(script: str, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(ROOT / "benchmarks" / script), *args]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=os.environ.copy())
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    return out


def positive(x) -> bool:
    return isinstance(x, float) and math.isfinite(x) and x > 0


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
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import bench_step
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    assert bench_step.kind_of(name) == kind


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
