"""References of the lowbit family: the quantization papers' simulated quantization written plainly
(round, clamp, dequantize, F.linear), in float64 where the arithmetic is not part of the format.

The per-token quantizer is evaluated in float32, as the stored scale is a float32 and every backend
divides by it in float32: its integer codes are then the same on every backend, bit for bit. Integer
products summed in float64 are exact at these sizes (|sum| < 2^53).
"""
from typing import Optional

import torch
import torch.nn.functional as F

from .. import lowbit as pack

ACTIVATIONS = ("none", "relu", "gelu", "gelu_tanh")


def activate(v: torch.Tensor, activation: str) -> torch.Tensor:
    if activation == "relu":
        return torch.relu(v)
    if activation == "gelu":
        return F.gelu(v)
    if activation == "gelu_tanh":
        return F.gelu(v, approximate="tanh")
    return v


def quantize_per_token(x: torch.Tensor, symmetric: bool = True):
    """(q, scale, zero_point): see vitkernels.ops.lowbit.quantize_per_token."""
    xf = x.float()
    finite = torch.isfinite(xf).all(-1)
    if symmetric:
        scale = xf.abs().amax(-1) / 127
        scale = torch.where(scale == 0, torch.ones_like(scale), scale)
        zp = torch.zeros_like(scale)
        q = torch.clamp(torch.round(xf / scale[..., None]), -127, 127)
    else:
        lo, hi = xf.amin(-1).clamp(max=0), xf.amax(-1).clamp(min=0)
        scale = (hi - lo) / 255
        scale = torch.where(scale == 0, torch.ones_like(scale), scale)
        zp = torch.clamp(torch.round(-lo / scale), 0, 255)
        q = torch.clamp(torch.round(xf / scale[..., None]) + zp[..., None], 0, 255)
    q = torch.where(finite[..., None], q, torch.zeros_like(q)).to(torch.int8 if symmetric else torch.uint8)
    scale = torch.where(finite, scale, torch.full_like(scale, float("nan")))
    zp = torch.where(finite, zp, torch.zeros_like(zp)).to(torch.int32)
    return q, scale, zp


def _weights_int8(w_q: torch.Tensor, N: int, K: int) -> torch.Tensor:
    return pack.unblock_int8(w_q, N, K) if w_q.dim() == 3 else w_q


def _epilogue(acc, x_scale, w_scale, bias, activation):
    out = acc * x_scale.double()[..., None] * w_scale.double()
    if bias is not None:
        out = out + bias.double()
    return activate(out, activation)


def int8_linear(x_q, x_scale, x_zero_point, w_q, w_scale, bias=None, activation="none", out_dtype=None):
    """act((x_q - x_zp) @ w_q.T * x_scale * w_scale + bias), the integer sum exact; float64 out."""
    xi = x_q.double()
    if x_zero_point is not None:
        xi = xi - x_zero_point.double()[..., None]
    w = _weights_int8(w_q, w_scale.shape[0], x_q.shape[-1]).double()
    return _epilogue(xi @ w.T, x_scale, w_scale, bias, activation)


def dynamic_int8_linear(x, w_q, w_scale, bias=None, activation="none", symmetric=True):
    q, s, zp = quantize_per_token(x, symmetric)
    return int8_linear(q, s, None if symmetric else zp, w_q, w_scale, bias, activation)


def int4_linear(x, w_packed, w_scale, w_zero, group_size, bias=None, activation="none"):
    w = pack.unpack_int4(w_packed, w_scale, w_zero, group_size, torch.float64)
    return activate(F.linear(x.double(), w, None if bias is None else bias.double()), activation)


def int4_int8_linear(x, w_packed, w_scale, bias=None, activation="none"):
    q, s, _ = quantize_per_token(x, True)
    codes = pack.int4_codes(w_packed, signed=True).double()
    return _epilogue(q.double() @ codes.T, s, w_scale, bias, activation)


def shift_linear(x, w_packed, w_scale=None, bias=None, activation="none"):
    w = pack.unpack_shift(w_packed, w_scale, torch.float64)
    return activate(F.linear(x.double(), w, None if bias is None else bias.double()), activation)


def decoded_weight(op: str, args, dtype=torch.float64) -> Optional[torch.Tensor]:
    """The [N, K] float weights a call of ``op`` multiplies by (for gradients)."""
    if op == "dynamic_int8_linear":
        x, w_q, w_scale = args[:3]
        return _weights_int8(w_q, w_scale.shape[0], x.shape[-1]).to(dtype) * w_scale.to(dtype)[:, None]
    if op == "int4_linear":
        return pack.unpack_int4(args[1], args[2], args[3], args[4], dtype)
    if op == "shift_linear":
        return pack.unpack_shift(args[1], args[2], dtype)
    return None
