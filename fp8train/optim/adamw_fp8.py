"""AdamW whose moments live in FP8: m in E4M3, v in E5M2, one fp32 scale per block of elements.

Per parameter tensor of N elements the state is

    exp_avg_fp8     (n_blocks, block) m_format codes   flattened tensor, zero-padded to n_blocks * block
    exp_avg_scale   (n_blocks, 1) fp32                 q = saturate(m * scale), m ~= q / scale
    exp_avg_sq_fp8, exp_avg_sq_scale                   the same for v, in v_format
    step            () fp32 on the CPU                 as torch.optim.AdamW keeps it
    master          fp32 copy of a bf16/fp16 parameter (its updates are far below a bf16 ulp)

so 2 bytes per element plus 8 bytes of scales per block: 2.0625 bytes/param at block 128, against 8 for fp32 AdamW.

A step dequantizes m and v, runs fp32 AdamW (decoupled weight decay, bias correction: torch.optim.AdamW's math),
updates the parameter from the fresh fp32 moments, and re-quantizes them with scales from each block's fresh
amax (scale = fp8_max / amax): nothing is delayed, so a block never saturates, and its largest entry is stored
to FP8's relative precision (2^-4 for E4M3, 2^-3 for E5M2).

Why E5M2 for v: v ~ grad^2 squares the gradient's dynamic range. Within one block E4M3 keeps values down to
amax * 2^-10 / 448 ~ 2e-6 * amax (half its smallest subnormal, 2^-9, rounds to zero), E5M2 down to
amax * 2^-17 / 57344 ~ 1.3e-10 * amax. A gradient entry 1000x below its block's outlier has v 1e-6 below:
E4M3 would flush it to zero, E5M2 keeps it. m is linear in the gradient and signed, so E4M3's extra mantissa
bit is worth more there than range. Even E5M2 flushes v of entries more than ~1e5x below their block's largest
gradient, where E4M3 still keeps m: such an m is dropped with its v (``_adamw_fp8_update``), or a later zero
gradient would divide it by eps alone. Where the gradient is zero, m is stored one code closer to zero whenever
rounding to nearest would not shrink it: beta1 * m rounds back to m near the bottom of the grid, and the weight would
go on moving by m / sqrt(v) every step, where torch's AdamW comes to rest.

Tensors under ``min_numel`` elements and 1-D tensors (norms, biases) keep fp32 m and v: they are a negligible
share of the memory and the most sensitive to noise. A param group may decide for all its tensors with
``fp8_moments=True/False``: DeepSpeed's ZeRO hands the optimizer flat 1-D partitions of many parameters, whose
shape no longer tells a matrix from a norm, so ``optim.build`` sorts parameters into groups by their own shapes.
On CUDA the per-tensor update is one ``torch.compile``d function (a handful of fused kernels, no Python loop
over blocks); on the CPU it runs eagerly.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from itertools import chain
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fp8train.errors import CheckpointError
from fp8train.fp8.formats import PROFILES, dequantize, fp8_dtype, quantize, scale_from_amax

_LOW_PRECISION = (torch.bfloat16, torch.float16)
# Largest gradient magnitude the update takes as it is: its square, 2^126, and v's lerp towards it stay finite in fp32
# (2^128 is inf). torch's AdamW turns a larger gradient's v into inf and freezes that weight for the rest of the run;
# here an inf v would become NaN (FP8 casts make inf NaN, and lerp from inf gives NaN) and the weight with it. Adam's
# step hardly depends on the gradient's scale, so a finite gradient beyond 2^63 is taken as +-2^63: one step of ~lr.
_GRAD_LIMIT = 2.0**63
FP8_MOMENTS = ("exp_avg_fp8", "exp_avg_scale", "exp_avg_sq_fp8", "exp_avg_sq_scale")


class AdamWFp8(torch.optim.Optimizer):
    """torch.optim.AdamW with m and v stored in block-scaled FP8 (see the module docstring)."""

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.95),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        m_format: str = "e4m3",
        v_format: str = "e5m2",
        block_size: int | None = 128,
        min_numel: int = 4096,
        compile: bool | None = None,
        profile: str = "ocp",
    ):
        problems = []
        if not lr >= 0.0:
            problems.append(f"lr={lr} must be >= 0")
        if not eps >= 0.0:
            problems.append(f"eps={eps} must be >= 0")
        if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
            problems.append(f"betas={list(betas)} must be two numbers in [0, 1)")
        if not weight_decay >= 0.0:
            problems.append(f"weight_decay={weight_decay} must be >= 0")
        if block_size is not None and block_size < 1:
            problems.append(f"block_size={block_size} must be a positive integer or None (one scale per tensor)")
        for name, fmt in (("m_format", m_format), ("v_format", v_format)):
            try:
                fp8_dtype(fmt)
            except ValueError as e:
                problems.append(f"{name}: {e}")
        if profile not in PROFILES:
            problems.append(f"profile={profile!r} is not one of {PROFILES}")
        if problems:
            raise ValueError("AdamWFp8: " + "; ".join(problems))
        defaults = dict(
            lr=lr,
            betas=tuple(betas),
            eps=eps,
            weight_decay=weight_decay,
            m_format=m_format,
            v_format=v_format,
            block_size=block_size,
            min_numel=min_numel,
            fp8_moments=None,  # None: by each tensor's shape and size; True/False: for every tensor of the group
        )
        super().__init__(params, defaults)
        self.compile = compile  # None: compile the per-tensor update on CUDA only
        # The device's FP8 range the moments are scaled into: Gaudi2's casts saturate E4M3 at 240, so a block scaled
        # to OCP's 448 would lose its largest values there. Not in the param groups: a checkpoint resumes on any
        # device (codes / scale is the moment whatever the range was).
        self.profile = profile

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("compile", None)  # Optimizer.__getstate__ keeps only defaults, state and groups
        self.__dict__.setdefault("profile", "ocp")

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        """One AdamW step on every parameter that has a gradient."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            hyper_cache: dict[tuple, Tensor] = {}  # one host-to-device copy per (device, step) in a group
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse or p.is_complex():
                    raise RuntimeError("AdamWFp8 supports dense real parameters and gradients only")
                state = self.state[p]
                if not state:
                    self._init_state(p, state, group)
                state["step"] += 1
                key = (p.device, state["step"].item())
                if key not in hyper_cache:
                    hyper_cache[key] = _hyperparams(group, key[1], p.device)
                hyper = hyper_cache[key]
                # Plain tensors (detach() shares the storage): torch.compile keeps an nn.Parameter's shape static, so
                # passing the Parameter itself would compile the update once per parameter shape.
                weight = state["master"] if "master" in state else p.detach()
                out = p.detach() if "master" in state else None
                if "exp_avg_fp8" in state:
                    self._update_fn(_adamw_fp8_update, p)(
                        weight,
                        p.grad,
                        out,
                        state["exp_avg_fp8"],
                        state["exp_avg_scale"],
                        state["exp_avg_sq_fp8"],
                        state["exp_avg_sq_scale"],
                        hyper,
                        group["m_format"],
                        group["v_format"],
                        self.profile,
                    )
                else:
                    self._update_fn(_adamw_fp32_update, p)(
                        weight, p.grad, out, state["exp_avg"], state["exp_avg_sq"], hyper
                    )
        return loss

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load as torch does, then put back every saved state tensor with its own dtype.

        Optimizer.load_state_dict casts each floating-point state tensor but "step" to its parameter's dtype; that
        would turn FP8 codes into fp32 (or bf16) values and round a bf16 parameter's fp32 master. The cast is in
        ``Optimizer._process_value_according_to_param_policy``, which torch 2.13 calls through the base class, so a
        subclass cannot override it: the saved tensors are re-copied here instead, only moved to the param's device.

        State of another optimizer is refused: torch would load torch.optim.AdamW's fp32 moments (and its groups,
        without the FP8 formats) and the run would go on as a plain AdamW one.
        """
        if any("m_format" not in g for g in state_dict["param_groups"]):
            raise CheckpointError(
                "AdamWFp8 cannot load this optimizer state: it is another optimizer's, torch.optim.AdamW's fp32 "
                "moments (a checkpoint written with optim=adamw) or Habana's FusedAdamW's (optim.habana_fused=true). "
                "Resume with optim=adamw, or optim.habana_fused=true, as it was written, or start a new run directory "
                "from its weights alone (fresh FP8 optimizer state) with model.init_from=CHECKPOINT."
            )
        for pid, saved in state_dict["state"].items():
            if not (set(FP8_MOMENTS) <= saved.keys() or {"exp_avg", "exp_avg_sq"} <= saved.keys()):
                raise CheckpointError(
                    f"AdamWFp8 cannot load this optimizer state: parameter {pid} has neither FP8 nor fp32 moments "
                    f"(it holds {sorted(saved)}). Resume with the optim= setting the checkpoint was written with."
                )
        super().load_state_dict(state_dict)
        saved_ids = chain.from_iterable(g["params"] for g in state_dict["param_groups"])
        params = chain.from_iterable(g["params"] for g in self.param_groups)
        for pid, p in zip(saved_ids, params):
            saved = state_dict["state"].get(pid)
            if saved is None:
                continue
            self.state[p] = {
                k: v.to(device=v.device if k == "step" else p.device, copy=True) if isinstance(v, Tensor) else v
                for k, v in saved.items()
            }

    def state_bytes(self) -> int:
        """Bytes of every state tensor held (FP8 codes, scales, fp32 moments, masters, steps)."""
        return optimizer_state_bytes(self)

    def _init_state(self, p: Tensor, state: dict[str, Tensor], group: dict[str, Any]) -> None:
        state["step"] = torch.tensor(0.0, dtype=torch.float32)
        if p.dtype in _LOW_PRECISION:
            state["master"] = p.detach().float().clone(memory_format=torch.contiguous_format)
        fp8 = group.get("fp8_moments")
        if fp8 is None:
            fp8 = p.ndim >= 2 and p.numel() >= group["min_numel"]
        if fp8:
            block = group["block_size"] or max(p.numel(), 1)  # an empty tensor: no block of 0
            n_blocks = math.ceil(p.numel() / block)
            for name, fmt in (("exp_avg", group["m_format"]), ("exp_avg_sq", group["v_format"])):
                state[f"{name}_fp8"] = torch.zeros(n_blocks, block, dtype=fp8_dtype(fmt), device=p.device)
                state[f"{name}_scale"] = torch.ones(n_blocks, 1, dtype=torch.float32, device=p.device)
        else:
            state["exp_avg"] = torch.zeros(p.shape, dtype=torch.float32, device=p.device)
            state["exp_avg_sq"] = torch.zeros(p.shape, dtype=torch.float32, device=p.device)

    def _update_fn(self, fn: Callable, p: Tensor) -> Callable:
        use_compile = p.is_cuda if self.compile is None else self.compile
        return _compiled(fn) if use_compile else fn


def _hyperparams(group: dict[str, Any], step: float, device: torch.device) -> Tensor:
    """The step's scalars as one fp32 tensor on ``device``, computed in float64 as torch's AdamW does.

    A tensor, not Python floats, so that a compiled update is not re-specialised for every lr and step.
    """
    lr, wd, eps = float(group["lr"]), group["weight_decay"], group["eps"]
    beta1, beta2 = group["betas"]
    values = [
        1.0 - lr * wd,  # decoupled weight decay factor
        1.0 - beta1,
        1.0 - beta2,
        lr / (1.0 - beta1**step),  # step size with bias correction of m
        math.sqrt(1.0 - beta2**step),  # bias correction of v, under the square root
        eps,
    ]
    hyper = torch.tensor(values, dtype=torch.float32)
    if device.type == "cuda":  # pinned + non_blocking: no host sync in the middle of the step
        return hyper.pin_memory().to(device, non_blocking=True)
    return hyper.to(device)


def _adamw_fp8_update(
    weight: Tensor,
    grad: Tensor,
    out: Tensor | None,
    m_codes: Tensor,
    m_scale: Tensor,
    v_codes: Tensor,
    v_scale: Tensor,
    hyper: Tensor,
    m_format: str,
    v_format: str,
    profile: str = "ocp",
) -> None:
    """One AdamW step of one tensor whose moments are block-scaled FP8; writes weight, out, codes and scales."""
    decay, one_minus_beta1, one_minus_beta2, step_size, bias_correction2_sqrt, eps = hyper.unbind()
    n_blocks, block = m_codes.shape
    numel = weight.numel()
    grad_NB = _bounded(grad).reshape(-1)  # (n_blocks, block) once padded; N = n_blocks, B = block
    if n_blocks * block != numel:
        grad_NB = F.pad(grad_NB, (0, n_blocks * block - numel))  # zero padding keeps padded m, v at zero
    grad_NB = grad_NB.view(n_blocks, block)
    m_old = dequantize(m_codes, m_scale)
    m_NB = m_old.lerp(grad_NB, one_minus_beta1)
    v_NB = dequantize(v_codes, v_scale).lerp(grad_NB * grad_NB, one_minus_beta2)

    # The parameter sees the fresh fp32 moments; only what is carried to the next step is rounded to FP8.
    m, v = m_NB.view(-1)[:numel], v_NB.view(-1)[:numel]
    denom = v.sqrt() / bias_correction2_sqrt + eps
    new_weight = weight.reshape(-1) * decay - step_size * (m / denom)
    weight.copy_(new_weight.view(weight.shape))
    if out is not None:
        out.copy_(weight)  # bf16 parameter = master rounded to nearest

    v_flushed = _requantize(v_NB, v_codes, v_scale, v_format, profile).float() == 0
    # Where v flushed to zero m must go too: E4M3 keeps m down to ~2e-6 of its block's largest, E5M2 keeps v only
    # down to ~1.3e-10 of its block's, 1.2e-5 in gradient units. An m kept over a zero v would, at a step whose
    # gradient is zero (a rare token's embedding row), be divided by eps alone: an update of ~m/eps, hundreds of
    # times lr. Dropped together, the element's moments restart from zero, as at its first step.
    # Where the gradient is 0, m must shrink as beta1 * m does: rounded to nearest it stops at 1 to 4 subnormal steps
    # above zero (beta1 * m rounds back to m), and the weight would move by m / sqrt(v) every step for good.
    _requantize(
        m_NB.masked_fill(v_flushed, 0.0), m_codes, m_scale, m_format, profile, (grad_NB == 0) & (m_old != 0), m_old
    )


def _requantize(
    moment_NB: Tensor,
    codes: Tensor,
    scale: Tensor,
    fmt: str,
    profile: str,
    shrink: Tensor | None = None,
    prev: Tensor | None = None,
) -> Tensor:
    """Store an fp32 moment in FP8 with a fresh scale per block (its amax: nothing saturates); returns the codes.

    Where ``shrink`` holds, a value that rounding to nearest left at or above ``prev`` in magnitude is stored one
    code closer to zero: a decaying moment then reaches zero instead of stalling on the FP8 grid."""
    new_scale = scale_from_amax(moment_NB.abs().amax(dim=1, keepdim=True), fmt, profile)  # amax 0 -> scale 1
    q = quantize(moment_NB, fmt, new_scale, profile)
    if shrink is not None:
        # FP8 codes are sign-magnitude, so code - 1 is the next value toward zero (|q| >= |prev| > 0: q is not 0)
        stalled = shrink & (dequantize(q, new_scale).abs() >= prev.abs())
        bits = q.view(torch.uint8)
        q = torch.where(stalled, bits - 1, bits).view(q.dtype)
    codes.copy_(q)
    scale.copy_(new_scale)
    return codes


def _adamw_fp32_update(weight: Tensor, grad: Tensor, out: Tensor | None, m: Tensor, v: Tensor, hyper: Tensor) -> None:
    """Plain fp32 AdamW of one tensor (small and 1-D tensors); writes weight, out, m and v."""
    decay, one_minus_beta1, one_minus_beta2, step_size, bias_correction2_sqrt, eps = hyper.unbind()
    grad = _bounded(grad)
    m.lerp_(grad, one_minus_beta1)
    v.lerp_(grad * grad, one_minus_beta2)
    denom = v.sqrt() / bias_correction2_sqrt + eps
    weight.copy_(weight * decay - step_size * (m / denom))
    if out is not None:
        out.copy_(weight)


def _bounded(grad: Tensor) -> Tensor:
    """The gradient in fp32 with finite entries beyond +-_GRAD_LIMIT clamped to it; inf and NaN stay as they are."""
    grad = grad.float()
    return torch.where(grad.isinf(), grad, grad.clamp(-_GRAD_LIMIT, _GRAD_LIMIT))


_COMPILED: dict[Callable, Callable] = {}


def _compiled(fn: Callable) -> Callable:
    """fn under torch.compile, built once per process (shapes go dynamic after the first new one)."""
    if fn not in _COMPILED:
        _COMPILED[fn] = torch.compile(fn, fullgraph=True)
    return _COMPILED[fn]


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of all tensors in ``optimizer.state``, looking inside tensor subclasses (e.g. torchao's FP8 state)."""
    return sum(_tensor_bytes(v) for s in optimizer.state.values() for v in s.values() if isinstance(v, Tensor))


def state_bytes_per_param(optimizer: torch.optim.Optimizer, model_or_params: nn.Module | Iterable[Tensor]) -> float:
    """Optimizer state bytes per parameter element of ``model_or_params`` (8.0 for fp32 AdamW, ~2.06 here). Under
    ZeRO-3 a parameter holds only this rank's shard, and ``ds_numel`` its whole size."""
    params = model_or_params.parameters() if isinstance(model_or_params, nn.Module) else model_or_params
    numel = sum(getattr(p, "ds_numel", p.numel()) for p in {id(p): p for p in params}.values())
    return optimizer_state_bytes(optimizer) / numel if numel else math.nan


def _tensor_bytes(t: Tensor) -> int:
    if type(t) is not Tensor and type(t) is not nn.Parameter and hasattr(t, "__tensor_flatten__"):
        names, _ = t.__tensor_flatten__()  # wrapper subclass: its inner tensors hold the memory
        return sum(_tensor_bytes(getattr(t, n)) for n in names)
    return t.numel() * t.element_size()
