"""Typed configuration of a run: one dataclass per Hydra group, validated once, before any work.

Hydra composes ``conf/`` into a plain DictConfig; :func:`to_typed` merges it key by key into the dataclass
schema below (also registered in Hydra's ConfigStore as ``fp8train_schema``) and then checks every value.
All problems are collected and raised together as one :class:`ConfigError`, each written the way the user
types the fix: ``optim.lr=-1: must be > 0``. Nothing reads a file, builds a model or touches a device
before this passes.
"""

from __future__ import annotations

import dataclasses
import enum
import glob
import math
import os
import re
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from fp8train.errors import ConfigError

if TYPE_CHECKING:
    from hydra.core.override_parser.overrides_parser import OverridesParser

PROJECT_ROOT = Path(__file__).resolve().parent.parent
CONF_DIR = PROJECT_ROOT / "conf"
GROUPS = (
    "model",
    "precision",
    "optim",
    "data",
    "backend",
    "parallel",
    "logger",
    "monitor",
    "variant",
    "experiment",
    "debug",
)


class BackendName(str, enum.Enum):
    auto = "auto"  # hpu if Habana's stack is importable, else cuda if available, else cpu
    cpu = "cpu"
    cuda = "cuda"
    hpu = "hpu"


class CompileScope(str, enum.Enum):
    model = "model"  # one torch.compile of the whole model: fusions across blocks; compile time grows with depth
    block = "block"  # each transformer block compiled in place: one compilation serves every block alike


class Recipe(str, enum.Enum):
    bf16 = "bf16"  # fp32 master weights, matmuls under bf16 autocast
    fp32 = "fp32"  # everything in fp32: a numerical reference, slow on accelerators
    fp8 = "fp8"  # selected linears in FP8 (E4M3 forward, E5M2 gradients), the rest as bf16


class SmoothSwiGLU(str, enum.Enum):
    none = "none"  # plain SwiGLU: h = silu(g) * u goes to the FP8 down projection as is
    token = "token"  # per-token s_t = max_j |u_tj| (the paper's code): quantize silu(g) * u / s_t, multiply y by s_t
    channel = "channel"  # per-channel s_j = max_t |h_tj| (the paper's text): Q(h / s) . Q(W_down diag(s))^T
    bf16_down = "bf16_down"  # keep the down projection (its input h) in bf16


class ScalingRecipe(str, enum.Enum):
    current = "current"  # scale from this tensor's amax now (just-in-time)
    delayed = "delayed"  # scale from an amax history of earlier steps (Transformer Engine's default)


class AmaxAlgo(str, enum.Enum):
    max = "max"  # max over the history window (NVIDIA TE default)
    most_recent = "most_recent"  # the previous step's amax only (Habana TE default)


class Fp8Profile(str, enum.Enum):
    ocp = "ocp"  # OCP FP8: E4M3 max 448 (H100, CPU emulation)
    gaudi2 = "gaudi2"  # Gaudi2 hardware: E4M3 saturates at 240


# The largest precision.margin per profile: 2^-margin must leave a tensor's amax a normal E4M3 number
# (fp8_max * 2^-margin >= 2^-6), or most of the tensor flushes to zero, and far beyond, the scale underflows to 0
# and every loss is NaN. floor(log2(fp8_max)) + 6 with fp8_max of fp8train/fp8/formats.py (448, 240), kept here
# without torch so that a bad value is reported before torch loads.
MAX_MARGIN = {Fp8Profile.ocp: 14, Fp8Profile.gaudi2: 13}

# The longest precision.amax_history_len: 16x NVIDIA TE's default of 1024. Every FP8 tensor holds its whole history
# and every optimizer step reduces and rolls all of them, so memory and step time grow with it; a mistyped length
# (10^11) was a 400 GB allocation and a traceback.
MAX_AMAX_HISTORY_LEN = 16384


# The largest data.tokenizer.vocab_size: 4x the largest vocabularies in use (256k). Hugging Face's BPE trainer
# allocates for the whole vocabulary up front, whatever the text gives: 10^8 took 150 MB for a 28-token vocabulary,
# and a mistyped 10^11 aborted the process with a Rust allocation backtrace.
MAX_TOKENIZER_VOCAB = 2**20


class OptimName(str, enum.Enum):
    adamw = "adamw"
    adamw_fp8 = "adamw_fp8"  # AdamW with moments stored in FP8 (m in E4M3, v in E5M2), block-scaled


class ScheduleName(str, enum.Enum):
    cosine = "cosine"  # linear warmup, then cosine from lr down to min_lr at decay_steps
    constant = "constant"  # linear warmup, then lr


class ParallelName(str, enum.Enum):
    single = "single"  # one process, one device
    deepspeed = "deepspeed"  # data parallel over processes and nodes through DeepSpeed (ZeRO stages 0-3)


class Fp8Engine(str, enum.Enum):
    native = "native"  # fp8train's Fp8Linear with the backend's FP8 ops (emulated on CPU, _scaled_mm, torch.ops.hpu)
    te = "te"  # Habana Transformer Engine's te.Linear over the same weights (backend.name=hpu only)


class WandbMode(str, enum.Enum):
    online = "online"
    offline = "offline"  # files only, no network; `wandb sync RUN_DIR/wandb/offline-run-*` uploads later
    disabled = "disabled"


@dataclass
class ModelConfig:
    """A Llama-style decoder (see fp8train/model/llama.py)."""

    name: str = "tiny"  # shows in run names and the run directory
    vocab_size: int | None = None  # null: the tokenizer's vocabulary, rounded up to a multiple of 64
    d_model: int = 256  # residual width
    n_layers: int = 4
    n_heads: int = 4  # query heads; head_dim = d_model / n_heads
    n_kv_heads: int | None = None  # key/value heads for grouped-query attention; null = n_heads
    ffn_dim: int = 768  # SwiGLU hidden width (the width of u, g and h)
    max_seq_len: int = 512  # longest sequence the RoPE tables are built for
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = False  # share the input embedding with lm_head
    init_std: float = 0.02  # std of every weight at init; residual projections get init_std / sqrt(2 * n_layers)
    init_from: str | None = None  # start from these weights: a `fp8train import-hf` folder or a checkpoint folder

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    def check(self, at: str) -> list[str]:
        p = _Problems(at, self)
        for name in ("d_model", "n_layers", "n_heads", "ffn_dim", "max_seq_len"):
            p.positive(name)
        p.positive("vocab_size", optional=True)
        p.positive("n_kv_heads", optional=True)
        p.positive("rope_theta")
        p.positive("norm_eps")
        p.positive("init_std")
        if self.n_heads > 0 and self.d_model > 0:
            if self.d_model % self.n_heads:
                p.add("n_heads", f"must divide model.d_model={self.d_model}")
            elif self.head_dim % 2:
                p.add("n_heads", f"gives an odd head_dim {self.head_dim}; RoPE needs an even one")
            if self.n_kv_heads and self.n_kv_heads > 0 and self.n_heads % self.n_kv_heads:
                p.add("n_kv_heads", f"must divide model.n_heads={self.n_heads}")
        return p.found


def init_from_problem(model: ModelConfig) -> str | None:
    """What is wrong with ``model.init_from`` as weights to start from, in override syntax; None when usable."""
    if (resolve_path(model.init_from) / "model.safetensors").is_file():
        return None
    return (
        f"model.init_from={model.init_from}: needs a folder with model.safetensors (fp8train import-hf output or a "
        "checkpoint)"
    )


@dataclass
class SourceConfig:
    """One local UTF-8 text file."""

    path: str = ""  # required; relative paths are taken from the directory you launch from
    name: str | None = None  # label of its validation loss (val_loss/NAME); null = the file's stem


@dataclass
class TokenizerConfig:
    """Where the tokenizer comes from."""

    path: str | None = None  # a tokenizer.json or a Hugging Face tokenizer folder; null = train one locally
    vocab_size: int = 2048  # size of the byte-level BPE trained when path is null


@dataclass
class DataConfig:
    """Local text -> tokenizer -> token cache on disk -> batches deterministic in (seed, step, rank)."""

    name: str = "tinyshakespeare"
    sources: list[SourceConfig] = field(
        default_factory=lambda: [SourceConfig(path="data/tinyshakespeare.txt", name="shakespeare")]
    )
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    seq_len: int = 128  # tokens per training sequence
    val_fraction: float = 0.05  # the last fraction of every source is held out for validation
    cache_dir: str = "${oc.env:FP8TRAIN_CACHE_DIR,.cache/fp8train}"  # tokenizer and token caches

    def check(self, at: str) -> list[str]:
        p = _Problems(at, self)
        p.positive("seq_len")
        if not 0.0 < self.val_fraction < 0.5:
            p.add("val_fraction", "must be > 0 and < 0.5")
        if self.tokenizer.path is None and self.tokenizer.vocab_size < 260:
            p.add("tokenizer.vocab_size", "must be >= 260 (256 bytes plus special tokens)")
        elif self.tokenizer.path is None and self.tokenizer.vocab_size > MAX_TOKENIZER_VOCAB:
            p.add(
                "tokenizer.vocab_size",
                f"must be <= {MAX_TOKENIZER_VOCAB}: the BPE trainer allocates for the whole vocabulary up front "
                "(the largest vocabularies in use hold 256k tokens)",
            )
        if not self.sources:
            p.add("sources", "needs at least one text file")
        names = [source_name(s) for s in self.sources]
        for i, s in enumerate(self.sources):
            if not s.path:
                p.add(f"sources.{i}.path", "a text file is required: data.sources=[{path: FILE}]")
            elif resolve_path(s.path).is_dir():
                folder = s.path.rstrip("/")
                p.add(
                    f"sources.{i}.path",
                    f"is a folder; sources are text files, one entry each: "
                    f"data.sources=[{{path: {folder}/a.txt}}, {{path: {folder}/b.txt}}]",
                )
            elif not resolve_path(s.path).exists() and any(c in s.path for c in "*?["):
                matches = sorted(glob.glob(str(Path(s.path).expanduser())))
                found = f"{len(matches)} file{'s' if len(matches) != 1 else ''}" if matches else "no file"
                listed = ", ".join(f"{{path: {m}}}" for m in (matches or ["a.txt", "b.txt"])[:2])
                p.add(
                    f"sources.{i}.path",
                    f"is a pattern (it matches {found}); patterns are not expanded, each file is its own entry: "
                    f"data.sources=[{listed}{', ...' if len(matches) > 2 else ''}]",
                )
            elif not resolve_path(s.path).exists():
                p.add(f"sources.{i}.path", f"no such file ({resolve_path(s.path)})")
            elif not resolve_path(s.path).is_file():  # a pipe such as <(zcat x.gz): runs must read it again
                p.add(
                    f"sources.{i}.path",
                    f"{resolve_path(s.path)} is not a regular file (a pipe or a device); write the text to a file "
                    "and point the source at that",
                )
            if names.count(names[i]) > 1:
                p.add(f"sources.{i}.name", f"'{names[i]}' names two sources; give each a distinct name")
        if not self.cache_dir.strip():  # as a path it would be the launch directory
            p.add(
                "cache_dir",
                "empty; name a folder for the tokenizer and token caches (an empty FP8TRAIN_CACHE_DIR= gives this too)",
            )
        if self.tokenizer.path is not None and not resolve_path(self.tokenizer.path).exists():
            p.add("tokenizer.path", f"no such file or folder ({resolve_path(self.tokenizer.path)})")
        return p.found


@dataclass
class PrecisionConfig:
    """Number formats of the matmuls (the converter in fp8train/precision applies it)."""

    name: str = "bf16"  # shows in run names and run directories (fp8_smooth, fp8_smooth_channel, ...)
    recipe: Recipe = Recipe.bf16
    smooth_swiglu: SmoothSwiGLU = SmoothSwiGLU.none  # fp8 only
    scaling: ScalingRecipe = ScalingRecipe.delayed  # fp8 only
    amax_history_len: int = 16  # delayed scaling: steps of amax history per tensor (1 to MAX_AMAX_HISTORY_LEN)
    amax_compute_algo: AmaxAlgo = AmaxAlgo.max
    margin: int = 0  # scales are divided by 2^margin: headroom against growth between steps
    pow2_scales: bool = False  # round scales down to powers of two (exact rescaling, as Habana TE does)
    profile: Fp8Profile = Fp8Profile.ocp  # gaudi2: emulate Gaudi2's E4M3 range (max 240) on any device
    stochastic_grad_rounding: bool = False  # E5M2 gradients rounded stochastically (Gaudi's default)
    # Forward GEMM only, cuda: Hopper's fast FP8 accumulation (no periodic promotion to fp32), as torchao's and
    # NVIDIA TE's forward GEMMs use; the gradient GEMMs always accumulate in fp32. No effect on cpu and hpu.
    fast_accum: bool = True
    engine: Fp8Engine = Fp8Engine.native  # fp8 only: who runs the FP8 linears
    linears: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )  # which linears go to FP8

    def check(self, at: str) -> list[str]:
        p = _Problems(at, self)
        p.positive("amax_history_len")
        if self.amax_history_len > MAX_AMAX_HISTORY_LEN:
            p.add(
                "amax_history_len",
                f"must be <= {MAX_AMAX_HISTORY_LEN}: every FP8 tensor keeps its whole amax history and each optimizer "
                f"step reduces all of them (NVIDIA TE's default is 1024, Habana TE's 1)",
            )
        p.non_negative("margin")
        if self.margin > MAX_MARGIN[self.profile]:
            p.add(
                "margin",
                f"must be <= {MAX_MARGIN[self.profile]} for precision.profile={self.profile.value}: scales are divided "
                f"by 2^margin, and beyond that even a tensor's largest element lands below E4M3's smallest normal "
                f"number, so most of it flushes to zero (Transformer Engine's default is 0)",
            )
        known = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
        unknown = [n for n in self.linears if n not in known]
        if unknown:
            p.add("linears", f"unknown linear(s) {', '.join(unknown)}; choose from {', '.join(known)}")
        in_fp8 = set(self.linears) - ({"down_proj"} if self.smooth_swiglu == SmoothSwiGLU.bf16_down else set())
        if self.recipe == Recipe.fp8 and not in_fp8:
            p.add(
                "linears",
                "precision.recipe=fp8 needs at least one linear in FP8 (with smooth_swiglu=bf16_down, one besides "
                "down_proj); list some of q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, or use precision=bf16",
            )
        smoothing = self.smooth_swiglu in (SmoothSwiGLU.token, SmoothSwiGLU.channel)
        if self.recipe == Recipe.fp8 and in_fp8 and smoothing and "down_proj" not in self.linears:
            p.add(
                "smooth_swiglu",
                "rescales the input of the FP8 down projection, but precision.linears leaves down_proj in bf16, so "
                "it would only cost time; add down_proj to precision.linears or set precision.smooth_swiglu=none",
            )
        if self.recipe != Recipe.fp8 and self.smooth_swiglu != SmoothSwiGLU.none:
            p.add("smooth_swiglu", f"only applies to precision.recipe=fp8 (recipe is {self.recipe.value})")
        if self.engine == Fp8Engine.te:
            if self.recipe != Recipe.fp8:
                p.add("engine", f"only applies to precision.recipe=fp8 (recipe is {self.recipe.value})")
            if self.smooth_swiglu in (SmoothSwiGLU.channel, SmoothSwiGLU.bf16_down):
                p.add(
                    "engine",
                    "Habana TE supports precision.smooth_swiglu=token or none (channel needs fp8train's "
                    "own Fp8Linear: precision.engine=native)",
                )
            if self.scaling != ScalingRecipe.delayed:
                p.add("engine", "Habana TE only does delayed scaling: set precision.scaling=delayed")
        return p.found


@dataclass
class OptimConfig:
    """AdamW with decoupled weight decay, warmup and a decay schedule."""

    name: OptimName = OptimName.adamw
    lr: float = 1e-3  # peak learning rate, reached at the end of warmup
    min_lr: float = 1e-4  # floor of the cosine schedule
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    weight_decay: float = 0.1  # applied to matrices only, never to norms
    warmup_steps: int = 30  # linear from optim.lr / warmup_steps up to optim.lr
    schedule: ScheduleName = ScheduleName.cosine
    decay_steps: int | None = None  # cosine length in steps; null = trainer.max_steps
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping
    fused: bool | None = None  # torch's fused AdamW kernel; null = wherever the device has it
    m_format: str = "e4m3"  # adamw_fp8: FP8 format of the first moment
    v_format: str = "e5m2"  # adamw_fp8: FP8 format of the second moment (needs E5M2's range)
    block_size: int | None = 128  # adamw_fp8: elements per scale; null = one scale per tensor
    fp8_min_numel: int = 4096  # adamw_fp8: smaller tensors and 1-D params keep fp32 moments
    habana_fused: bool = False  # adamw_fp8 on hpu: Habana's FusedAdamW(moments_dtype=...) instead of AdamWFp8

    def check(self, at: str) -> list[str]:
        p = _Problems(at, self)
        p.positive("lr")
        p.positive("eps")
        p.positive("decay_steps", optional=True)
        p.non_negative("min_lr")
        p.non_negative("weight_decay")
        p.non_negative("warmup_steps")
        p.non_negative("grad_clip")
        if (
            self.schedule == ScheduleName.cosine
            and self.decay_steps is not None
            and self.decay_steps <= self.warmup_steps
        ):
            p.add(
                "decay_steps",
                f"must be > optim.warmup_steps={self.warmup_steps}: the cosine runs from the end of warmup to "
                f"step decay_steps (as given, lr would drop from optim.lr to optim.min_lr in one step)",
            )
        if self.min_lr > self.lr > 0:
            p.add("min_lr", f"must be <= optim.lr={self.lr}")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            p.add("betas", "must be two numbers in [0, 1)")
        for name in ("m_format", "v_format"):
            if getattr(self, name) not in ("e4m3", "e5m2"):
                p.add(name, "must be e4m3 or e5m2")
        p.positive("block_size", optional=True)
        if self.habana_fused and self.name != OptimName.adamw_fp8:
            p.add("habana_fused", "only applies to optim=adamw_fp8")
        p.non_negative("fp8_min_numel")
        return p.found


@dataclass
class BackendConfig:
    """The device a run uses."""

    name: BackendName = BackendName.auto
    compile: bool = False  # torch.compile the model (cuda, cpu: inductor; hpu: hpu_backend) and AdamWFp8's update
    # torch.compile(options=...) for the model: inductor settings by their torch._inductor.config names, set as
    # +backend.compile_options.max_autotune=true or, around a compiler bug, +backend.compile_options.triton.X=false
    compile_options: dict[str, Any] = field(default_factory=dict)
    # What one torch.compile covers: the whole model, or each transformer block (one compilation for all of them)
    compile_scope: CompileScope = CompileScope.model
    threads: int | None = None  # cpu: torch intra-op threads; null = torch's default (all cores)

    def check(self, at: str) -> list[str]:
        p = _Problems(at, self)
        p.positive("threads", optional=True)
        if self.compile_options and not self.compile:
            p.add("compile_options", "only applies with backend.compile=true")
        if self.compile_scope != CompileScope.model and not self.compile:
            p.add("compile_scope", "only applies with backend.compile=true")
        if self.compile_options and not self._habana():  # hpu_backend has options of its own
            import torch
            import torch._inductor.config as inductor_config

            known = inductor_config.get_config_copy()
            unknown = sorted(k for k in self.inductor_options() if k not in known)
            if unknown:
                p.add(
                    "compile_options",
                    f"not an inductor setting: {', '.join(unknown)} (the names are those of torch._inductor.config, "
                    f"torch {torch.__version__}, e.g. max_autotune or triton.cudagraphs)",
                )
        return p.found

    def inductor_options(self) -> dict[str, Any]:
        """compile_options with nested groups joined into dotted names: {triton: {cudagraphs: x}} ->
        {"triton.cudagraphs": x}, the form torch.compile(options=...) takes."""

        def flat(d: dict, prefix: str = "") -> dict[str, Any]:
            out: dict[str, Any] = {}
            for k, v in d.items():
                name = f"{prefix}{k}"
                out.update(flat(v, f"{name}.") if isinstance(v, dict) else {name: v})
            return out

        return flat(dict(self.compile_options))

    def _habana(self) -> bool:
        """Whether this run compiles with Habana's hpu_backend (hpu, or auto on a machine with Habana's bridge)."""
        import importlib.util

        auto_hpu = self.name == BackendName.auto and importlib.util.find_spec("habana_frameworks") is not None
        return self.name == BackendName.hpu or auto_hpu


@dataclass
class ParallelConfig:
    """How the model is spread over processes. deepspeed: one process per device, started by a launcher
    (deepspeed, torchrun, mpirun: see launch/) that sets RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT."""

    name: ParallelName = ParallelName.single
    zero_stage: int = 1  # deepspeed: 0 plain data parallel, 1 shards optimizer state, 2 + gradients, 3 + weights
    ds_config: str | None = None  # deepspeed: a JSON file merged over the generated ds_config (its keys win)
    # minutes a collective may wait for another rank before the run fails; at a first start the other ranks wait
    # this long at most for rank 0 to tokenize the corpus
    timeout_min: int = 30

    def check(self, at: str) -> list[str]:
        p = _Problems(at, self)
        if self.zero_stage not in (0, 1, 2, 3):
            p.add("zero_stage", "must be 0, 1, 2 or 3")
        if self.ds_config is not None and not resolve_path(self.ds_config).is_file():
            p.add("ds_config", f"no such file ({resolve_path(self.ds_config)})")
        p.positive("timeout_min")
        if self.name == ParallelName.deepspeed:
            p.found += [f"{at}=deepspeed: {problem}" for problem in launch_vars()[1]]
        return p.found


# Where a launcher says which process this is: deepspeed and torchrun set the first name, mpirun the second.
LAUNCH_VARS = {
    "rank": ("RANK", "OMPI_COMM_WORLD_RANK"),
    "local_rank": ("LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_RANK"),
    "world_size": ("WORLD_SIZE", "OMPI_COMM_WORLD_SIZE"),
}


def launch_vars() -> tuple[dict[str, int], list[str]]:
    """The rank, local rank and world size a launcher set in the environment (those it set, keyed as LAUNCH_VARS),
    and why the environment cannot place this process: a value that is no number, several ranks without this one's,
    a rank outside the world."""
    found, named, problems = {}, {}, []
    fix = (
        "a launcher (deepspeed, torchrun, mpirun) sets it for each process it starts: start the run through one, or "
        "unset it for a single process"
    )
    for key, names in LAUNCH_VARS.items():
        name = next((n for n in names if n in os.environ), None)
        if name is None:
            continue
        value = os.environ[name]
        if not value.strip().isdigit():
            what = "a number of processes" if key == "world_size" else "a rank number (0, 1, ...)"
            problems.append(f"{name}={value} in the environment is not {what}; {fix}")
            continue
        found[key], named[key] = int(value), f"{name}={int(value)}"
    world_size = found.get("world_size", 1)
    if "world_size" in found and world_size < 1:
        problems.append(f"{named['world_size']} in the environment: must be >= 1; {fix}")
    elif world_size > 1 and "rank" not in found and not any(p.startswith(LAUNCH_VARS["rank"]) for p in problems):
        problems.append(f"{named['world_size']} in the environment, but no RANK to say which of them this is; {fix}")
    if "rank" in found and found["rank"] >= world_size:
        world = named.get("world_size", "WORLD_SIZE=1")
        problems.append(f"{named['rank']} in the environment is not below {world}; {fix}")
    return found, problems


@dataclass
class WandbConfig:
    """Weights & Biases run settings."""

    mode: WandbMode = WandbMode.offline
    project: str = "fp8train"
    entity: str | None = None
    group: str | None = None  # runs of one comparison share a group; null = "<data>-<model>"
    name: str | None = None  # null = "<model>-<precision>-s<seed>" ("-adamw_fp8" after the precision with FP8 Adam)
    tags: list[str] = field(default_factory=list)


@dataclass
class LoggerConfig:
    """Console, metrics.jsonl and wandb."""

    wandb: WandbConfig = field(default_factory=WandbConfig)
    log_every: int = 10  # steps between metric lines (each costs one device sync)
    progress: bool = True  # progress bar when the console is a terminal

    def check(self, at: str) -> list[str]:
        p = _Problems(at, self)
        p.positive("log_every")
        return p.found


class OnAlert(str, enum.Enum):
    warn = "warn"  # console line, wandb alert, an `alerts` entry in outliers.jsonl; training goes on
    checkpoint = "checkpoint"  # the same, and a checkpoint of the alerting step (kept per trainer.keep_last)
    stop = "stop"  # the same, then stop with a checkpoint; resume=auto continues


@dataclass
class MonitorConfig:
    """Per-layer outlier statistics (fp8train/monitor): RUN_DIR/outliers.jsonl, wandb outliers/..., alerts."""

    enabled: bool = True  # monitor=disabled turns it off
    interval: int = 25  # steps between monitored steps (step 1 is always one); other steps cost nothing
    top_k: int = 4  # channels of h and aligned neurons listed per layer
    alert_factor: float = 4.0  # alert when a layer's h amax exceeds this times its running median
    median_window: int = 20  # monitored steps in that running median
    min_history: int = 3  # monitored steps of history before the amax rule can fire
    overflow_ratio: float = 2.0  # alert on FP8 overflow when a saturating tensor's amax_now / amax_assumed > this
    alerts_after: int = 100  # no alerts up to this step but on inf/NaN (statistics still recorded): early growth
    on_alert: OnAlert = OnAlert.warn

    def check(self, at: str) -> list[str]:
        p = _Problems(at, self)
        for name in ("interval", "top_k", "median_window", "min_history"):
            p.positive(name)
        p.non_negative("alerts_after")
        if not self.alert_factor > 1 or not math.isfinite(self.alert_factor):
            p.add("alert_factor", "must be > 1 (a multiple of the running median)")
        if not self.overflow_ratio >= 1 or not math.isfinite(self.overflow_ratio):
            p.add("overflow_ratio", "must be >= 1 (1: any saturation above the assumed amax alerts)")
        if self.min_history > self.median_window > 0:
            p.add("min_history", f"must be <= monitor.median_window={self.median_window}")
        return p.found


@dataclass
class TrainerConfig:
    """Length, batch, evaluation and checkpoint cadence of a run."""

    max_steps: int = 300  # optimizer steps
    micro_batch_size: int = 16  # sequences per forward pass
    grad_accum_steps: int = 1  # micro-batches per optimizer step
    eval_every: int = 100  # steps between validation passes (and one at the end); 0 = only at the end
    # Validation windows per source and pass, in global batches (micro_batch_size x grad_accum_steps x ranks
    # sequences): the first of the val split, the same set for every split of the global batch; ranks share it.
    eval_batches: int = 8
    checkpoint_every: int = 100  # steps between checkpoints (and one at the end); 0 = only at the end
    keep_last: int = 2  # complete checkpoints kept; older ones are deleted
    seed: int = 1234
    stop_at: int | None = None  # end this invocation after this step with a checkpoint; resume=auto continues
    max_bad_steps: int = 5  # stop (with a checkpoint) after this many consecutive steps with non-finite loss/grads

    def check(self, at: str) -> list[str]:
        p = _Problems(at, self)
        p.positive("stop_at", optional=True)
        for name in ("max_steps", "micro_batch_size", "grad_accum_steps", "eval_batches", "keep_last", "max_bad_steps"):
            p.positive(name)
        p.non_negative("eval_every")
        p.non_negative("checkpoint_every")
        p.non_negative("seed")
        if self.seed >= 2**64:  # torch.manual_seed's limit; beyond it the run ended in a traceback
            p.add("seed", "must be < 2^64 (torch's random generators take 64-bit seeds)")
        return p.found


@dataclass
class Config:
    """A whole run. ``resume``: none | auto (newest complete checkpoint in the run dir) | a checkpoint path."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    backend: BackendConfig = field(default_factory=BackendConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    resume: str = "none"

    def __post_init__(self) -> None:
        problems = [q for name in _SECTIONS for q in getattr(self, name).check(name)]
        if self.data.seq_len > self.model.max_seq_len:
            problems.append(
                f"data.seq_len={self.data.seq_len}: exceeds model.max_seq_len={self.model.max_seq_len} "
                f"of model '{self.model.name}'; lower data.seq_len or raise model.max_seq_len"
            )
        if self.precision.engine == Fp8Engine.te and not self.backend._habana():
            auto = (
                ", which picks cpu or cuda on a machine without habana_frameworks"
                if self.backend.name == "auto"
                else ""
            )
            problems.append(
                f"precision.engine=te: Habana's Transformer Engine needs backend.name=hpu (this run: "
                f"{self.backend.name.value}{auto}); use precision.engine=native on this device"
            )
        # A resume takes its weights from its checkpoint: the folder a run started from may be gone by then (with
        # resume=auto and no checkpoint yet, the trainer checks it before starting from it).
        if self.model.init_from is not None and self.resume == "none" and (problem := init_from_problem(self.model)):
            problems.append(problem)
        if not self.resume.strip():  # as a path it would be the launch directory, taken for a damaged checkpoint
            problems.append("resume=: empty; use resume=none, resume=auto or a checkpoint path")
        elif self.resume not in ("none", "auto") and not resolve_path(self.resume).exists():
            problems.append(f"resume={self.resume}: no such checkpoint; use resume=auto, resume=none or a path")
        if problems:
            raise ConfigError(problems)

    @property
    def run_name(self) -> str:
        """The wandb run name; it always shows the precision."""
        optim = "-adamw_fp8" if self.optim.name == OptimName.adamw_fp8 else ""
        return self.logger.wandb.name or f"{self.model.name}-{self.precision.name}{optim}-s{self.trainer.seed}"

    @property
    def run_group(self) -> str:
        return self.logger.wandb.group or f"{self.data.name}-{self.model.name}"

    @property
    def tokens_per_step(self) -> int:
        """Tokens per optimizer step on one process."""
        t = self.trainer
        return t.micro_batch_size * t.grad_accum_steps * self.data.seq_len


_SECTIONS = ("model", "data", "precision", "optim", "backend", "parallel", "logger", "monitor", "trainer")


def resolve_path(path: str | Path) -> Path:
    """Config paths are relative to the directory a run is launched from (Hydra does not change it)."""
    return Path(path).expanduser().resolve()


def source_name(source: SourceConfig) -> str:
    return source.name or Path(source.path).stem


def register_schema() -> None:
    """Register the schema in Hydra's ConfigStore: ``fp8train_schema`` (typed) and ``fp8train_defaults``.

    conf/config.yaml lists ``fp8train_defaults`` first, the schema's default values as a plain (untyped) node, so
    that every schema key exists and can be overridden without ``+``, while type checking is left to
    :func:`to_typed`, which reports every problem at once instead of stopping at the first.
    """
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    cs.store(name="fp8train_schema", node=Config)
    cs.store(name="fp8train_defaults", node=OmegaConf.to_container(OmegaConf.structured(Config), enum_to_str=True))


# --------------------------------------------------------------------------------------------------------------
# DictConfig -> Config, collecting every problem


def to_typed(raw: DictConfig | dict) -> Config:
    """Validate a composed config and return it as dataclasses; raises one ConfigError listing every problem."""
    raw = OmegaConf.create(OmegaConf.to_container(raw, resolve=False) if isinstance(raw, DictConfig) else raw)
    raw.pop("hydra", None)
    try:
        plain = OmegaConf.to_container(raw, resolve=True)
    except OmegaConfBaseException as e:
        key = re.sub(r"\[(\d+)\]", r".\1", getattr(e, "full_key", None) or "")  # data.sources[0].path -> .0.
        value: Any = OmegaConf.to_container(raw, resolve=False)
        for part in key.split(".") if key else []:
            value = (
                value[int(part)] if isinstance(value, list) else value.get(part) if isinstance(value, dict) else None
            )
        where = f"{key}={format_value(value)}: " if key else ""
        raise ConfigError([f"{where}cannot resolve an interpolation: {first_line(e)}"]) from None
    schema = OmegaConf.structured(Config)
    problems: list[str] = []
    refused: list[str] = []  # settings whose value was refused: they stand at the schema's default below
    for path, value in _leaves(plain, whole=lambda path: typing.get_origin(_hint_at(Config, path)) is dict):
        hint = _hint_at(Config, path)
        if hint is _UNKNOWN:
            problems.append(_unknown_key(path))
        elif value != "???":  # a required value left unset keeps the schema default, which check() reports
            if isinstance(value, str):  # resolved already: a "${" left (in an environment variable) is text
                value = value.replace("${", "\\${")
            try:
                OmegaConf.update(schema, path, value, merge=True, force_add=False)
            except OmegaConfBaseException as e:
                detail = f" ({first_line(e)})" if isinstance(value, list) else ""
                problems.append(f"{path}={format_value(value)}: {_expected(hint)}{detail}")
                refused.append(path)
    # Values of the wrong type kept their defaults above, so the value checks below still run on the rest.
    try:
        cfg = OmegaConf.to_object(schema)  # runs Config.__post_init__, which checks every value
    except ConfigError as e:
        # A check that reads a refused setting reads the schema's default, which neither the user nor conf/ chose
        # (precision.recipe=bf16 under precision=fp8_smooth): its complaint would name a value nobody set.
        problems += [q for q in e.problems if not any(f"{r}=" in q for r in refused)]
    if problems:
        raise ConfigError(problems)
    return cfg


def compose(overrides: list[str] | tuple[str, ...] = (), config_name: str = "config") -> Config:
    """Compose conf/ with Hydra overrides (no run dir, no logging) and validate: for tests and `fp8train check`."""
    raw, problems = compose_untyped(overrides, config_name)
    try:
        cfg = to_typed(raw)
    except ConfigError as e:
        problems += e.problems
    if problems:
        raise ConfigError(problems)
    return cfg


def compose_untyped(
    overrides: list[str] | tuple[str, ...] = (), config_name: str = "config"
) -> tuple[DictConfig, list[str]]:
    """conf/ composed as Hydra composes it, values unchecked, with the overrides it can apply, and the problems of
    the others; a ConfigError naming what stops Hydra if it cannot compose them at all."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import HydraException

    register_schema()
    problems, usable = override_problems(overrides)
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        try:
            return hydra_compose(config_name=config_name, overrides=usable), problems
        except HydraException as e:
            cause = f" ({first_line(e.__cause__)})" if e.__cause__ else ""
            found = _list_index_problems(usable, lambda ok: hydra_compose(config_name=config_name, overrides=ok))
            raise ConfigError([*problems, *(found or [first_line(e) + cause])]) from None


def _list_index_problems(overrides: list[str], compose_with: Callable[[list[str]], DictConfig]) -> list[str]:
    """Overrides that set an entry past the end of a list (data.sources.1.path=b.txt with one source), named with
    the list's length and the whole list that adds the entry: Hydra says only "list index out of range"."""
    from hydra.errors import HydraException

    parser = override_parser()
    indexed = []  # (override, the list's key, index, the entry's value)
    for arg in overrides:
        o = parser.parse_override(arg)
        parts = o.key_or_group.split(".")
        for i, part in enumerate(parts):
            at = ".".join(parts[:i])
            if i and part.isdigit() and typing.get_origin(_unwrap_optional(_hint_at(Config, at))) is list:
                entry = o.value()
                for name in reversed(parts[i + 1 :]):
                    entry = {name: entry}
                indexed.append((arg, at, int(part), entry))
                break
    if not indexed:
        return []
    try:
        raw = compose_with([a for a in overrides if a not in {x[0] for x in indexed}])
    except HydraException:
        return []
    problems = []
    for arg, at, index, entry in indexed:
        current = OmegaConf.select(raw, at)
        current = OmegaConf.to_container(current) if isinstance(current, ListConfig) else None
        if current is not None and index >= len(current):
            n = len(current)
            has = (
                f"has {n} entr{'y' if n == 1 else 'ies'} ({at}.0{f' to {at}.{n - 1}' if n > 1 else ''})"
                if n
                else "is empty"
            )
            problems.append(
                f"{arg}: {at} {has}, so there is no {at}.{index}; to add an entry, set the whole list: "
                f"'{at}={format_value([*current, entry])}'"
            )
    return problems


def override_parser() -> OverridesParser:
    """Hydra's override parser, able to enumerate a glob(...) sweep over the options of a group in conf/."""
    from hydra._internal.config_loader_impl import ConfigLoaderImpl
    from hydra._internal.utils import create_config_search_path
    from hydra.core.override_parser.overrides_parser import OverridesParser

    return OverridesParser.create(ConfigLoaderImpl(config_search_path=create_config_search_path(str(CONF_DIR))))


def override_problems(overrides: list[str] | tuple[str, ...]) -> tuple[list[str], list[str]]:
    """Problems Hydra would stop at one by one (a malformed override, an unknown group option or key), and the
    overrides without them."""
    from hydra.core.override_parser.types import ValueType

    parser = override_parser()
    problems, usable = [], []
    chosen: dict[str, tuple[str, str]] = {}  # group -> (override, option) of each group chosen
    for arg in (a for a in overrides if not a.startswith("-")):
        try:
            o = parser.parse_override(arg)  # parse_overrides would rewrite the message below
            o.config_loader = parser.config_loader  # as parse_overrides sets it, for a glob(...) sweep
        except Exception as e:  # Hydra's parse errors say what is wrong, not in which override
            problems.append(
                f"{arg}: not an override Hydra can parse ({first_line(e)}); write KEY=VALUE, with lists and dicts "
                "in quotes for the shell: 'data.sources=[{path: a.txt}]'"
            )
            continue
        key = o.key_or_group
        # Hydra's messages for these end before the fix ("Ambiguous value for argument ...", "Multiple values for
        # model ..."). A sweep reaches composing only in a single run: a multirun is composed job by job.
        if o.value_type == ValueType.SIMPLE_CHOICE_SWEEP:
            what = "options" if key in GROUPS else "values"
            listed = "" if key in GROUPS else f"; a list is written in brackets: {key}=[{arg.split('=', 1)[1]}]"
            problems.append(f"{arg}: several {what} are a sweep, one job each: add -m (--multirun){listed}")
            continue
        if key in GROUPS and (o.is_add() or o.is_force_add()):
            problems.append(
                f"{arg}: {key} is in conf/config.yaml's defaults already; choose it without +: "
                f"{key}={arg.split('=', 1)[1]}"
            )
            continue
        if o.is_delete() and (key in GROUPS or _hint_at(Config, key) is not _UNKNOWN):
            # as typed: a multirun's jobs carry ~KEY as ~KEY=null
            problems.append(_delete_problem(f"~{key}" if o.value() is None else arg, key))
            continue
        if key in GROUPS and not o.package:
            options = _options(key)
            choices = list(o.sweep_string_iterator()) if o.is_sweep_override() else [o.get_value_element_as_str()]
            bad = [c for c in choices if c not in options]
            problems += [_group_choice_problem(key, c, options) for c in bad]
        elif not key.startswith("hydra") and not o.is_add() and _hint_at(Config, key) is _UNKNOWN:
            free = next((k for k in _prefixes(key) if typing.get_origin(_hint_at(Config, k)) is dict), None)
            problems.append(f"{key}: a new entry of {free} is added with a +: +{arg}" if free else _unknown_key(key))
            bad = [key]
        else:
            bad = []
        if not bad:
            usable.append(arg)
            if key in GROUPS and not o.package and not o.is_sweep_override():
                chosen[key] = (arg, o.get_value_element_as_str())
    # A variant (one arm of a comparison) chooses precision and optim through its defaults, and a choice on the
    # command line wins over it: every arm of experiment=compare_bf16_fp8 would train with the same precision.
    arm = chosen.get("variant", ("", ""))[1]
    for group in _groups_chosen_by(f"variant/{arm}") if arm in _options("variant") else []:
        if group in chosen:
            arg = chosen[group][0]
            problems.append(
                f"{arg}: the chosen variant sets {group} itself (one per arm of a comparison), and {arg} would "
                f"replace it in every arm. Leave {arg} out, or set single values ({group}.NAME=VALUE), which apply to "
                "every arm"
            )
            usable.remove(arg)
    return problems, usable


def _groups_chosen_by(option: str) -> list[str]:
    """The groups a config file of conf/ chooses through ``override /GROUP: OPTION`` in its defaults list."""
    defaults = OmegaConf.load(CONF_DIR / f"{option}.yaml").get("defaults") or []
    return [k.split("/", 1)[1] for entry in defaults if isinstance(entry, DictConfig) for k in entry if "/" in k]


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def _unset_by_default(group: str) -> bool:
    """Whether conf/config.yaml leaves the group unset (variant, experiment, debug)."""
    return any(
        isinstance(entry, DictConfig) and group in entry and entry[group] is None
        for entry in OmegaConf.load(CONF_DIR / "config.yaml").defaults
    )


def _group_choice_problem(group: str, choice: str, options: list[str]) -> str:
    choose = f"choose one of {', '.join(options)}"
    if choice != "null":
        return f"{group}={choice}: unknown option; {choose}"
    # Hydra rejects null for a group on the command line (a ValueError deep in its defaults list), even for a
    # group conf/config.yaml leaves unset, where leaving the override out is what null would mean.
    leave_out = f", or leave {group}= out ({group} is unset unless chosen)" if _unset_by_default(group) else ""
    return f"{group}=null: a config group takes one of its options, not null; {choose}{leave_out}"


def _delete_problem(arg: str, key: str) -> str:
    """``~group`` or ``~key``: Hydra drops it, and the schema's default fills the gap without a word."""
    if key not in GROUPS and _known_keys(Config, key):
        return (
            f"{arg}: deleting a section leaves {key}.* at the schema's built-in defaults, not the values conf/ gives "
            f"them; leave {arg} out, or set a value: {key}.NAME=VALUE"
        )
    if key not in GROUPS:
        return (
            f"{arg}: deleting a setting leaves it at the schema's built-in default, not the value conf/ gives it; "
            f"leave {arg} out, or set the value: {key}=VALUE"
        )
    choose = f"choose one of {', '.join(_options(key))}: {key}=OPTION"
    if _unset_by_default(key):  # a group of # @package _global_ deltas: deleting it undoes an option at most
        return (
            f"{arg}: a config group is chosen, not deleted ({key} is unset unless chosen); leave {arg} out, or {choose}"
        )
    return (
        f"{arg}: deleting a config group leaves {key}.* at the schema's built-in defaults, not an option of "
        f"conf/{key}/; leave {arg} out, or {choose}"
    )


def _unknown_key(path: str) -> str:
    parent = path.rsplit(".", 1)[0] if "." in path else ""
    known = _known_keys(Config, parent)
    return f"{path}: unknown setting" + (f" (known here: {', '.join(known)})" if known else "")


def format_value(value: Any) -> str:
    """A value written as a Hydra override would write it."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, enum.Enum):
        return str(value.value)
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(format_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {format_value(v)}" for k, v in value.items()) + "}"
    return str(value)


class _Problems:
    """Collects `section.field=value: message` lines for one config section."""

    def __init__(self, at: str, obj: Any):
        self.at, self.obj, self.found = at, obj, []

    def add(self, name: str, message: str) -> None:
        value = self.obj
        for part in name.split("."):
            value = value[int(part)] if isinstance(value, (list, ListConfig)) else getattr(value, part, None)
        self.found.append(f"{self.at}.{name}={format_value(value)}: {message}")

    def positive(self, name: str, optional: bool = False) -> None:
        value = getattr(self.obj, name)
        if value is None and optional:
            return
        if value is None or not value > 0 or (isinstance(value, float) and not math.isfinite(value)):
            self.add(name, "must be > 0")

    def non_negative(self, name: str) -> None:
        value = getattr(self.obj, name)
        if not value >= 0 or (isinstance(value, float) and not math.isfinite(value)):
            self.add(name, "must be >= 0")


_UNKNOWN = object()


def _leaves(node: Any, prefix: str = "", whole=lambda path: False):
    """(dotted path, value) for every scalar or list in a nested dict; lists, and dicts at the paths ``whole``
    accepts (free-form settings such as backend.compile_options), are set as a whole."""
    if isinstance(node, dict) and not (prefix and whole(prefix)):
        for k, v in node.items():
            yield from _leaves(v, f"{prefix}.{k}" if prefix else str(k), whole)
    else:
        yield prefix, node


def _hint_at(cls: type, path: str) -> Any:
    hint: Any = cls
    for part in path.split("."):
        hint = _unwrap_optional(hint)
        if typing.get_origin(hint) is list and part.isdigit():  # one entry: data.sources.0.path
            hint = typing.get_args(hint)[0]
            continue
        if not dataclasses.is_dataclass(hint):
            return _UNKNOWN
        hints = typing.get_type_hints(hint)
        if part not in hints:
            return _UNKNOWN
        hint = hints[part]
    return hint


def _prefixes(path: str) -> list[str]:
    """The settings a dotted path lies in, outermost first: a.b.c -> [a, a.b]."""
    parts = path.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def _known_keys(cls: type, path: str) -> list[str]:
    hint = _unwrap_optional(_hint_at(cls, path)) if path else cls
    return [f.name for f in dataclasses.fields(hint)] if dataclasses.is_dataclass(hint) else []


def _is_union(hint: Any) -> bool:
    return typing.get_origin(hint) in (typing.Union, types.UnionType)


def _unwrap_optional(hint: Any) -> Any:
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if _is_union(hint) and len(args) == 1 else hint


def _expected(hint: Any) -> str:
    optional = _is_union(hint) and type(None) in typing.get_args(hint)
    base = _unwrap_optional(hint)
    if isinstance(base, type) and issubclass(base, enum.Enum):
        text = "must be one of " + ", ".join(m.value for m in base)
    elif base is bool:
        text = "expected true or false"
    elif base is int:
        text = "expected an integer"
    elif base is float:
        text = "expected a number"
    elif base is str:
        text = "expected a string"
    elif typing.get_origin(base) is list:
        inner = typing.get_args(base)[0]
        if dataclasses.is_dataclass(inner):
            names = ", ".join(f.name for f in dataclasses.fields(inner))
            text = f"expected a list of {{{names}}} entries"
        else:
            text = f"expected a list of {getattr(inner, '__name__', inner)}"
    elif dataclasses.is_dataclass(base):
        text = "expected a group of settings (" + ", ".join(f.name for f in dataclasses.fields(base)) + ")"
    else:
        text = f"expected {base}"
    return text + (" (or null)" if optional else "")


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (its type name if it has none): enough for a one-paragraph error."""
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
