"""Backend selection on a CPU-only machine, and the errors for devices that are not there."""

from __future__ import annotations

import importlib.abc
import importlib.util
import os
import types

import pytest
import torch
import torch.nn.functional as F

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


# Habana's bridge as its documentation describes it (Gaudi software 1.19-1.24), for the hpu backend's calls into it:
# the documented signatures, with plain PyTorch doing what each is documented to do.
FUSED_SDPA = "q, k, v, attn_mask, dropout_p, is_causal, scale, softmax_mode, recompute_mode"
FUSED_RMS_NORM = "x, weight, eps"
# FusedAdamW: the documented order; its defaults other than moments_dtype are not documented (the groups carry
# weight_decay), so they are left open here.
FUSED_ADAMW = "params, lr=None, betas=None, eps=None, weight_decay=None, bias_correction=True, moments_dtype=None"


class FakeHabana(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Imports of habana_frameworks.* served from stand-ins; records PT_HPU_LAZY_MODE (and PT_TE_CUSTOM_OP) at each
    import."""

    def __init__(self):
        from tests.helpers import documented_op

        self.imported, self.calls, self.mark_steps = {}, [], 0
        self.te_custom_op = {}

        def sdpa(q, k, v, attn_mask, dropout_p, is_causal, scale, softmax_mode, recompute_mode):
            assert softmax_mode in ("None", "fast") and recompute_mode in (True, False)
            return F.scaled_dot_product_attention(
                q, k, v, attn_mask, dropout_p, is_causal, scale=scale, enable_gqa=q.shape[1] != k.shape[1]
            )

        def rms_norm(x, weight, eps):
            assert x.dtype == weight.dtype, "FusedRMSNorm takes x and weight in one dtype"
            return weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)

        def adamw(params, lr, betas, eps, weight_decay, bias_correction, moments_dtype):
            return types.SimpleNamespace(param_groups=params, lr=lr, betas=betas, eps=eps, moments_dtype=moments_dtype)

        def mark_step():
            self.mark_steps += 1

        apply = staticmethod
        self.attrs = {
            "habana_frameworks.torch.core": {"mark_step": mark_step},
            "habana_frameworks.torch.hpex.kernels": {
                "FusedSDPA": type("FusedSDPA", (), {"apply": apply(documented_op(FUSED_SDPA, sdpa, self.calls))})
            },
            "habana_frameworks.torch.hpex.normalization": {
                "FusedRMSNorm": type(
                    "FusedRMSNorm", (), {"apply": apply(documented_op(FUSED_RMS_NORM, rms_norm, self.calls))}
                )
            },
            "habana_frameworks.torch.hpex.optimizers": {"FusedAdamW": documented_op(FUSED_ADAMW, adamw, self.calls)},
        }

    def find_spec(self, name, path=None, target=None):
        if name == "habana_frameworks" or name.startswith("habana_frameworks."):
            return importlib.util.spec_from_loader(name, self, is_package=True)
        return None

    def create_module(self, spec):
        return None

    def exec_module(self, module):
        self.imported[module.__name__] = os.environ.get("PT_HPU_LAZY_MODE")
        self.te_custom_op[module.__name__] = os.environ.get("PT_TE_CUSTOM_OP")
        module.__path__ = []
        for key, value in self.attrs.get(module.__name__, {}).items():
            setattr(module, key, value)


@pytest.fixture
def habana(monkeypatch):
    import sys

    fake = FakeHabana()
    for name in [m for m in sys.modules if m.startswith("habana_frameworks")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setattr(sys, "meta_path", [fake, *sys.meta_path])
    hpu = types.SimpleNamespace(is_available=lambda: True, get_device_name=lambda: "GAUDI2")
    monkeypatch.setattr(torch, "hpu", hpu, raising=False)
    monkeypatch.delenv("PT_HPU_LAZY_MODE", raising=False)
    yield fake
    for name in [m for m in sys.modules if m.startswith("habana_frameworks")]:
        del sys.modules[name]


@pytest.mark.parametrize("compile_, mode", [(False, "1"), (True, "0")])
def test_hpu_mode_is_chosen_before_habana_is_imported_and_hccl_is_registered(habana, compile_, mode):
    from fp8train.backends.hpu import HpuBackend

    backend = HpuBackend(name="hpu", device=torch.device("cpu"), dist_backend="hccl", eager=compile_)
    assert habana.imported["habana_frameworks.torch.core"] == mode  # PT_HPU_LAZY_MODE set before the import
    assert "habana_frameworks.torch.distributed.hccl" in habana.imported  # registers the hccl backend
    backend.mark_step()
    assert habana.mark_steps == (1 if mode == "1" else 0)  # mark_step only in lazy mode
    assert backend.describe() == f"hpu (GAUDI2, {'lazy' if mode == '1' else 'eager'} mode)"


@pytest.mark.parametrize("compile_, custom_op", [(False, None), (True, "1")])
def test_compiled_runs_get_habana_tes_custom_ops_before_habana_is_imported(habana, monkeypatch, compile_, custom_op):
    # Habana TE under torch.compile needs PT_TE_CUSTOM_OP=1 (docs/gaudi.md), like the mode: set with it, unless set.
    from fp8train.backends.hpu import HpuBackend

    monkeypatch.setenv("PT_TE_CUSTOM_OP", "restored at teardown")
    monkeypatch.delenv("PT_TE_CUSTOM_OP")
    HpuBackend(name="hpu", device=torch.device("cpu"), dist_backend="hccl", eager=compile_)
    assert habana.te_custom_op["habana_frameworks.torch.core"] == custom_op
    assert os.environ.get("PT_TE_CUSTOM_OP") == custom_op
    monkeypatch.setenv("PT_TE_CUSTOM_OP", "0")
    HpuBackend(name="hpu", device=torch.device("cpu"), dist_backend="hccl", eager=compile_)
    assert os.environ["PT_TE_CUSTOM_OP"] == "0"  # a value already in the environment wins


def test_a_mode_already_in_the_environment_wins(habana, monkeypatch):
    from fp8train.backends.hpu import HpuBackend

    monkeypatch.setenv("PT_HPU_LAZY_MODE", "0")
    HpuBackend(name="hpu", device=torch.device("cpu"), dist_backend="hccl", eager=False)
    assert habana.imported["habana_frameworks.torch.core"] == "0"


def test_habana_fused_kernels_take_their_documented_arguments(habana):
    # fuse() swaps in FusedRMSNorm and FusedSDPA with positional arguments; called with Habana's documented order
    # and meaning, the fused model computes what the plain one does (GQA and causal masking included).
    from fp8train.backends.hpu import HpuBackend

    backend = HpuBackend(name="hpu", device=torch.device("cpu"), dist_backend="hccl")
    torch.manual_seed(0)
    plain = build_model(compose([*SMALL, "model.vocab_size=256"]).model)
    fused = backend.fuse(build_model(compose([*SMALL, "model.vocab_size=256"]).model))
    fused.load_state_dict(plain.state_dict())
    tokens = torch.randint(0, 256, (2, 32))
    torch.testing.assert_close(fused(tokens), plain(tokens), rtol=1e-5, atol=1e-5)
    sdpa = next(c for c in habana.calls if "q" in c)
    assert sdpa["is_causal"] is True and sdpa["dropout_p"] == 0.0 and sdpa["attn_mask"] is None


def test_habana_fused_adamw_gets_fp8_moment_dtypes(habana):
    from fp8train.backends.hpu import HpuBackend

    backend = HpuBackend(name="hpu", device=torch.device("cpu"), dist_backend="hccl")
    groups = [{"params": [torch.nn.Parameter(torch.ones(2))], "weight_decay": 0.1}]
    opt = backend.fused_fp8_adamw(groups, 3e-4, (0.9, 0.95), 1e-8, "e4m3", "e5m2")
    assert opt.moments_dtype == (torch.float8_e4m3fn, torch.float8_e5m2)  # (m, v), as documented
    assert (opt.lr, opt.betas, opt.eps) == (3e-4, (0.9, 0.95), 1e-8) and opt.param_groups is groups


def test_compile_in_lazy_mode_is_refused_when_the_backend_starts(habana, monkeypatch):
    # Before the model, DeepSpeed and the data are built (minutes for a large model on many cards), not after.
    from fp8train.backends.hpu import HpuBackend
    from fp8train.errors import BackendError

    monkeypatch.setenv("PT_HPU_LAZY_MODE", "1")
    with pytest.raises(BackendError, match="backend.compile=true on hpu needs eager mode.*PT_HPU_LAZY_MODE=0"):
        HpuBackend(name="hpu", device=torch.device("cpu"), dist_backend="hccl", eager=True)
