"""``Fp8Linear``: an ``nn.Linear`` whose three matmuls run on FP8 operands.

    forward   y  = Q4(x) . Q4(W)^T (+ b)          Q4: E4M3 (more mantissa: values)
    backward  dX = Q5(g) . Q4(W)                  Q5: E5M2 (more range: gradients), optionally stochastic
              dW = Q5(g)^T . Q4(x)
              db = sum of g over tokens, in fp32

Gaudi2's GEMMs cannot mix E4M3 and E5M2 operands, so with ``hybrid=True`` (Habana TE's HYBRID format; set by
``precision.profile=gaudi2``) the forward also keeps E5M2 copies of x and W and both backward GEMMs run E5M2 x
E5M2. Their scales follow from the E4M3 ones (the same assumed amax), so no extra scaling state is needed.

Output dtypes: y and dX in the compute dtype (bf16 under autocast, else x's), as autocast's own linear gives them;
dX is then cast to x's dtype (compiled, the cast fuses into dX's consumer); dW comes out of the GEMM in W's dtype
(fp32 for fp32 master weights).

Shapes: x (..., K) is flattened to (M, K) tokens; W (N, K); y (..., N). Only the FP8 copies of x and W are saved
for backward (1 byte per element instead of 2 or 4): that is where FP8 saves activation memory. The scales come
from three ``TensorScaler`` submodules (input, weight, grad_output); the matmuls from an ``Fp8Ops`` (emulated
here, ``torch._scaled_mm`` on H100 via the backend).
"""

from __future__ import annotations

import torch
from torch import nn

from fp8train.fp8 import formats
from fp8train.fp8.formats import E4M3, E5M2
from fp8train.fp8.ops import Fp8Ops, amax_of
from fp8train.fp8.scaling import ScalingConfig, TensorScaler


class _Fp8LinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, layer: Fp8Linear, out_dtype: torch.dtype, in_scale: torch.Tensor | None):
        ops = layer.ops
        with torch.autocast(x.device.type, enabled=False):  # the dtypes here are chosen, not autocast's
            x_MK = x.reshape(-1, x.shape[-1])
            qx, sx = layer.input_scaler.quantize(x_MK, ops)
            if in_scale is None:
                qw, sw = layer.weight_scaler.quantize(weight, ops)
                y = ops.scaled_mm(qx, qw, sx, sw, out_dtype, fast_accum=layer.fast_accum)  # (M, N)
            else:
                # W diag(s) changes every step: its delayed history would always lag.
                qws, sws = layer.weight_scaler.quantize(weight * in_scale, ops, force_current=True)
                y = ops.scaled_mm(qx, qws, sx, sws, out_dtype, fast_accum=layer.fast_accum)
                # dX from W itself: in W diag(s) the columns of small s_j flush to zero next to a large one, and
                # their inputs would get no gradient at all (see Fp8Linear.forward).
                qw, sw = _cast(weight, E5M2 if layer.hybrid else E4M3, amax_of(weight), layer.weight_scaler, ops)
            if bias is not None:
                y = y + bias.to(out_dtype)
            if layer.hybrid:  # the backward GEMMs get E5M2 copies (one byte each, as the E4M3 ones would be)
                qx, sx = _as_e5m2(x_MK, sx, layer.input_scaler, ops)
                if in_scale is None:
                    qw, sw = _as_e5m2(weight, sw, layer.weight_scaler, ops)
        ctx.save_for_backward(qx, qw, sx, sw, in_scale)
        ctx.layer = layer
        ctx.x_shape, ctx.x_dtype, ctx.w_dtype, ctx.out_dtype = x.shape, x.dtype, weight.dtype, out_dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        return y.reshape(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, grad_y):
        qx, qw, sx, sw, in_scale = ctx.saved_tensors
        layer = ctx.layer
        ops = layer.ops
        dx = dw = db = None
        with torch.autocast(grad_y.device.type, enabled=False):
            g_MN = grad_y.reshape(-1, grad_y.shape[-1])
            qg, sg = layer.grad_scaler.quantize(g_MN, ops, stochastic=layer.stochastic_grad)
            # The gradient GEMMs always accumulate in full fp32: their sums are long (dW sums over every token)
            # and their errors reach the weights directly.
            if ctx.needs_input_grad[0]:
                # E5M2 x E4M3: H100 has no E5M2 x E5M2 GEMM, and the weight needs no more than E4M3 (hybrid: the
                # saved copies are E5M2, as Gaudi2 requires). Out in the compute dtype, not an fp32 x's (RMSNorm's
                # output): that would double the GEMM's output bytes and its consumer's reads.
                dx = ops.scaled_mm(qg, qw.t(), sg, sw, ctx.out_dtype)
                if in_scale is not None:  # d/dx of x . (W diag(s))^T = g . W diag(s), the scale applied in fp32
                    dx = dx.float() * in_scale
                dx = dx.to(ctx.x_dtype).reshape(ctx.x_shape)
            if ctx.needs_input_grad[1]:
                dw = ops.scaled_mm(qg.t(), qx.t(), sg, sx, ctx.w_dtype)  # (N, M) . (K, M)^T -> (N, K)
                if in_scale is not None:  # d/dW of x . (W diag(s))^T: column j times s_j
                    dw = (dw.float() * in_scale).to(ctx.w_dtype)
            if ctx.needs_input_grad[2]:
                db = g_MN.float().sum(0).to(ctx.bias_dtype)  # summed over all tokens: fp32, not bf16
        return dx, dw, db, None, None, None


def _as_e5m2(
    x: torch.Tensor, scale_e4m3: torch.Tensor, scaler: TensorScaler, ops: Fp8Ops
) -> tuple[torch.Tensor, torch.Tensor]:
    """x in E5M2 with the scale for the amax the E4M3 scale assumed (fp8_max / scale): the same recipe, history
    and margin decide both copies, as in Habana TE's hybrid cast."""
    return _cast(x, E5M2, scaler.fp8_max / scale_e4m3, scaler, ops)


def _cast(
    x: torch.Tensor, fmt: str, amax: torch.Tensor, scaler: TensorScaler, ops: Fp8Ops
) -> tuple[torch.Tensor, torch.Tensor]:
    """x in ``fmt`` with the scale for ``amax`` (no margin: that amax is not a guess), in ``scaler``'s profile and
    power-of-two rule; nothing is recorded in the scaler."""
    c = scaler.cfg
    scale = formats.scale_from_amax(amax, fmt, c.profile, 0, c.pow2)
    q, _ = ops.quantize(x.detach(), fmt, scale, c.profile)
    return q, scale


class Fp8Linear(nn.Linear):
    """A drop-in ``nn.Linear`` computing its forward and backward matmuls in FP8 (see the module docstring)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = False,
        *,
        scaling: ScalingConfig,
        ops: Fp8Ops | None = None,
        stochastic_grad: bool = False,
        hybrid: bool = False,
        fast_accum: bool = False,
        device=None,
        dtype=None,
    ):
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self.scaling = scaling
        self.ops = ops if ops is not None else Fp8Ops()
        self.stochastic_grad = stochastic_grad  # E5M2 gradients rounded stochastically (unbiased; Gaudi's default)
        self.hybrid = hybrid  # backward GEMMs E5M2 x E5M2 (Gaudi2) instead of E5M2 x E4M3
        self.fast_accum = fast_accum  # forward GEMM only: the device's faster, shorter accumulation where it has one
        self._make_scalers(self.weight.device)

    def _make_scalers(self, device: torch.device) -> None:
        self.input_scaler = TensorScaler(E4M3, self.scaling, device=device)
        self.weight_scaler = TensorScaler(E4M3, self.scaling, device=device)
        self.grad_scaler = TensorScaler(E5M2, self.scaling, device=device)

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        *,
        scaling: ScalingConfig,
        ops: Fp8Ops | None = None,
        stochastic_grad: bool = False,
        hybrid: bool = False,
        fast_accum: bool = False,
    ) -> Fp8Linear:
        """An Fp8Linear holding the very Parameter objects of ``linear``, so optimizers and ties stay valid."""
        new = cls(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            scaling=scaling,
            ops=ops,
            stochastic_grad=stochastic_grad,
            hybrid=hybrid,
            fast_accum=fast_accum,
            device="meta",  # no second copy of the weights, not even for a moment
        )
        new.weight = linear.weight
        new.bias = linear.bias
        new._make_scalers(linear.weight.device)
        new.train(linear.training)
        return new

    def forward(self, x: torch.Tensor, in_scale: torch.Tensor | None = None) -> torch.Tensor:
        """``x @ W.T + b`` in FP8, or with ``in_scale`` (K,) ``x @ (W diag(in_scale)).T + b``: x arrives divided by
        ``in_scale`` per input channel (per-channel Smooth-SwiGLU), so the product is ``x_orig @ W.T``.

        The forward GEMM takes ``W diag(in_scale)``, scaled just-in-time; the gradients are those of that
        product with ``in_scale`` a constant, and dX comes from W itself times in_scale: in ``W diag(in_scale)``
        the columns whose scale is small next to the largest flush to zero, and their inputs would get no gradient.
        Output dtype: the autocast dtype when autocast is on for x's device, else x's."""
        device_type = x.device.type
        if torch.is_autocast_enabled(device_type):
            out_dtype = torch.get_autocast_dtype(device_type)
        else:
            out_dtype = x.dtype
        if in_scale is not None:
            in_scale = in_scale.detach()
        return _Fp8LinearFn.apply(x, self.weight, self.bias, self, out_dtype, in_scale)

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, ops={self.ops.name}, stochastic_grad={self.stochastic_grad}, "
            f"hybrid={self.hybrid}, fast_accum={self.fast_accum}"
        )
