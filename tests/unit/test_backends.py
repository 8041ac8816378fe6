"""Backend selection on a CPU-only machine, and the errors for devices that are not there."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from fp8train.backends import detect, select
from fp8train.config import BackendConfig, BackendName, compose
from fp8train.errors import BackendError, ConfigError
from fp8train.model import build_model
from tests.helpers import SMALL

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
no_habana = pytest.mark.skipif(importlib.util.find_spec("habana_frameworks") is not None, reason="Gaudi present")


@no_cuda
@no_habana
def test_auto_picks_cpu_here():
    assert detect() == BackendName.cpu
    backend = select(BackendConfig(name=BackendName.auto))
    assert backend.name == "cpu" and backend.device.type == "cpu" and backend.dist_backend == "gloo"


def test_cpu_backend_reports_peak_memory_and_autocast():
    backend = select(BackendConfig(name=BackendName.cpu))
    assert backend.peak_memory_bytes() > 10 * 2**20  # this process already holds torch
    with backend.autocast(torch.bfloat16):
        assert (torch.ones(4, 4) @ torch.ones(4, 4)).dtype == torch.bfloat16
    with backend.autocast(None):
        assert (torch.ones(4, 4) @ torch.ones(4, 4)).dtype == torch.float32


@no_cuda
def test_cuda_without_gpu_names_the_fix():
    with pytest.raises(BackendError, match="backend.name=cuda: no CUDA device is visible.*backend.name=cpu"):
        select(BackendConfig(name=BackendName.cuda))


@no_habana
def test_hpu_without_habana_names_the_docker_image():
    with pytest.raises(BackendError, match="habana_frameworks.*docker/Dockerfile.gaudi.*vault.habana.ai"):
        select(BackendConfig(name=BackendName.hpu))


def test_compile_options_reach_torch_compile_as_dotted_inductor_names(monkeypatch):
    from fp8train.config import compose

    cfg = compose(
        ["backend=cpu", "backend.compile=true"]
        + ["+backend.compile_options.triton.mix_order_reduction=false", "+backend.compile_options.max_autotune=true"]
    )
    calls = []
    monkeypatch.setattr(torch, "compile", lambda model, **kw: calls.append(kw) or model)
    select(cfg.backend).compile(torch.nn.Linear(2, 2))
    assert calls == [{"dynamic": False, "options": {"triton.mix_order_reduction": False, "max_autotune": True}}]

    select(compose(["backend=cpu", "backend.compile=true"]).backend).compile(torch.nn.Linear(2, 2))
    assert calls[-1] == {"dynamic": False, "options": None}  # none given: torch's defaults

    with pytest.raises(ConfigError, match=r"not an inductor setting: max_autotun \(the names are those of"):
        compose(["backend=cpu", "backend.compile=true", "+backend.compile_options.max_autotun=true"])
    with pytest.raises(ConfigError, match=r"compile_options.*only applies with backend.compile=true"):
        compose(["backend=cpu", "+backend.compile_options.max_autotune=true"])


def test_compile_scope_block_compiles_each_block_in_place():
    # backend.compile_scope=block: every block of model.layers compiled in place, so state dict keys (checkpoints,
    # exports) are those of the plain model; the whole model is not wrapped. Without compile it is a config error.
    def model():
        return build_model(compose([*SMALL, "model.vocab_size=256"]).model)

    blocks = model()
    keys = list(blocks.state_dict())
    forward = select(compose([*SMALL, "backend.compile=true", "backend.compile_scope=block"]).backend).compile(blocks)
    assert forward.compiled is blocks and list(blocks.state_dict()) == keys
    assert all(b._compiled_call_impl is not None for b in blocks.layers) and blocks._compiled_call_impl is None
    whole = select(compose([*SMALL, "backend.compile=true"]).backend).compile(model())
    assert isinstance(whole.compiled, torch._dynamo.eval_frame.OptimizedModule)
    with pytest.raises(ConfigError, match=r"backend.compile_scope.*only applies with backend.compile=true"):
        compose([*SMALL, "backend.compile_scope=block"])
