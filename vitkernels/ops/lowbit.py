"""The lowbit family: linear layers on int8, int4 and power-of-two weights that run as integer or
decoded-weight GEMMs, with quantize, bias and activation fused.

torch.ops.vitk.quantize_per_token(x, *, symmetric=True) -> (q, scale, zero_point)
torch.ops.vitk.int8_linear(x_q, x_scale, x_zero_point, w_q, w_scale, bias=None, *, activation="none", out_dtype=None)
torch.ops.vitk.dynamic_int8_linear(x, w_q, w_scale, bias=None, *, activation="none", symmetric=True)   (grad: x)
torch.ops.vitk.int4_linear(x, w_packed, w_scale, w_zero, group_size, bias=None, *, activation="none")  (grad: x)
torch.ops.vitk.int4_int8_linear(x, w_packed, w_scale, bias=None, *, activation="none")
torch.ops.vitk.shift_linear(x, w_packed, w_scale=None, bias=None, *, activation="none")                (grad: x)

``activation`` is one of none, relu, gelu (erf), gelu_tanh, applied after the bias. Weight formats and
their packing helpers: vitkernels.lowbit. Schemas in csrc/vitk.cpp, CPU kernels in csrc/cpu/lowbit/.
"""
from typing import List, Optional

import torch

from .. import lowbit as pack
from ..dispatch import FLOAT_DTYPES
from . import _checks as check
from ._define import cpp, define, triton

ACTIVATIONS = ("none", "relu", "gelu", "gelu_tanh")
INT8_DTYPES = frozenset({torch.int8, torch.uint8})
MAX_K = 65536          # the int32 accumulator's range with uint8 x int8 products
GROUP_SIZES = (32, 64, 128)


def _activation(activation):
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation: expected one of {', '.join(ACTIVATIONS)}, got {activation!r}")


def _rows(name, x, dtypes):
    check.tensor(name, x, dtypes=dtypes)
    if x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError(f"{name}: expected shape [..., K] with K >= 1, got {tuple(x.shape)}")
    return x.shape[-1]


def _max_k(name, K):
    if K > MAX_K:
        raise ValueError(f"{name}: expected at most {MAX_K} columns K (the int32 accumulator's range), got K={K}")


def _channel_vector(name, t, N, x, dtypes=FLOAT_DTYPES):
    if t is None:
        return
    check.tensor(name, t, dtypes=dtypes, like=("x", x))
    if tuple(t.shape) != (N,):
        raise ValueError(f"{name}: expected shape [N] = [{N}], got {tuple(t.shape)}")


def _w_scale_1d(w_scale, x):
    check.tensor("w_scale", w_scale, dtypes={torch.float32}, like=("x", x))
    if w_scale.dim() != 1:
        raise ValueError(f"w_scale: expected shape [N], got {tuple(w_scale.shape)}")
    return w_scale.shape[0]


def _w_q(w_q, N, K, x):
    check.tensor("w_q", w_q, dtypes={torch.int8}, like=("x", x))
    NB, KQ = -(-N // 16), -(-K // 4)
    if w_q.dim() == 3:
        if tuple(w_q.shape) != (NB, KQ + 1, 64):
            raise ValueError(f"w_q: expected the blocked layout [ceil(N/16), ceil(K/4) + 1, 64] = [{NB}, {KQ + 1}, 64] "
                             f"for N={N} and K={K}, got {tuple(w_q.shape)}")
        return
    if w_q.dim() != 2:
        raise ValueError(f"w_q: expected shape [N, K] or the blocked layout [ceil(N/16), ceil(K/4) + 1, 64], "
                         f"got {tuple(w_q.shape)}")
    if tuple(w_q.shape) != (N, K):
        raise ValueError(f"w_q: expected shape [N, K] = [{N}, {K}] (N from w_scale, K from x), got {tuple(w_q.shape)}")


def _packed4(w_packed, x, K):
    check.tensor("w_packed", w_packed, dtypes={torch.uint8}, like=("x", x))
    if K % 2:
        raise ValueError(f"x: expected an even last dimension K for 4-bit packed weights, got K={K}")
    if w_packed.dim() != 2 or w_packed.shape[1] != K // 2:
        raise ValueError(f"w_packed: expected shape [N, K/2] = [N, {K // 2}] (two 4-bit codes per byte), "
                         f"got {tuple(w_packed.shape)}")
    return w_packed.shape[0]


def _out(x, N, dtype=None):
    return x.new_empty((*x.shape[:-1], N), dtype=dtype or x.dtype)


# ---------------------------------------------------------------- quantize_per_token
def _check_quantize(x, symmetric):
    _rows("x", x, FLOAT_DTYPES)


def _quantize_fake(x, symmetric):
    lead = x.shape[:-1]
    return (x.new_empty(x.shape, dtype=torch.int8 if symmetric else torch.uint8),
            x.new_empty(lead, dtype=torch.float32), x.new_empty(lead, dtype=torch.int32))


define("quantize_per_token", check=_check_quantize, fake=_quantize_fake, backends=[
    cpp("cpu"), triton("lowbit"),
])


# ---------------------------------------------------------------- int8_linear
def _check_int8_linear(x_q, x_scale, x_zero_point, w_q, w_scale, bias, activation, out_dtype):
    K = _rows("x_q", x_q, INT8_DTYPES)
    _activation(activation)
    if out_dtype is not None and out_dtype not in FLOAT_DTYPES:
        raise ValueError(f"out_dtype: expected one of float32, bfloat16, float16, got {out_dtype}")
    lead = tuple(x_q.shape[:-1])
    check.tensor("x_scale", x_scale, dtypes={torch.float32}, like=("x_q", x_q))
    if tuple(x_scale.shape) != lead:
        raise ValueError(f"x_scale: expected shape x_q.shape[:-1] = {list(lead)}, got {list(x_scale.shape)}")
    if x_zero_point is not None:
        check.tensor("x_zero_point", x_zero_point, dtypes={torch.int32}, like=("x_q", x_q))
        if tuple(x_zero_point.shape) != lead:
            raise ValueError(f"x_zero_point: expected shape x_q.shape[:-1] = {list(lead)}, "
                             f"got {list(x_zero_point.shape)}")
    _max_k("x_q", K)
    N = _w_scale_1d(w_scale, x_q)
    _w_q(w_q, N, K, x_q)
    _channel_vector("bias", bias, N, x_q)


define("int8_linear", check=_check_int8_linear, backends=[
    cpp("cpu", dtypes=INT8_DTYPES), triton("lowbit", dtypes=INT8_DTYPES),
], fake=lambda x_q, x_scale, x_zero_point, w_q, w_scale, bias, activation, out_dtype:
    _out(x_q, w_scale.shape[0], out_dtype or torch.float32))


# ---------------------------------------------------------------- backward wrt x (the float ops)
def dequantized_weight(op: str, args, dtype) -> torch.Tensor:
    """The [N, K] float weights a call multiplies x by (dynamic_int8_linear: the quantizer taken as identity)."""
    if op == "dynamic_int8_linear":
        x, w_q, w_scale = args[:3]
        w = pack.unblock_int8(w_q, w_scale.shape[0], x.shape[-1]) if w_q.dim() == 3 else w_q
        return w.to(dtype) * w_scale.to(dtype)[:, None]
    if op == "int4_linear":
        return pack.unpack_int4(args[1], args[2], args[3], args[4], dtype)
    return pack.unpack_shift(args[1], args[2], dtype)


def _grad_wrt_x(op: str, activation_pos: int):
    def setup_context(ctx, inputs, keyword_only_inputs, output):
        schema = getattr(torch.ops.vitk, op).default._schema
        inputs = tuple(inputs) + tuple(keyword_only_inputs[a.name] for a in schema.arguments[len(inputs):])
        ctx.inputs = [None if isinstance(t, torch.Tensor) else t for t in inputs]
        ctx.save_for_backward(*[t if isinstance(t, torch.Tensor) else None for t in inputs])

    def backward(ctx, grad):
        saved = ctx.saved_tensors
        args = [s if s is not None else a for s, a in zip(saved, ctx.inputs)]
        activation = args[activation_pos]
        x = args[0]
        g = grad
        if activation != "none":
            call = list(args)
            call[activation_pos] = "none"
            pre = _call(op, call)
            if activation == "relu":
                g = torch.where(pre > 0, grad, torch.zeros_like(grad))
            else:
                g = torch.ops.aten.gelu_backward(grad, pre, approximate="tanh" if activation == "gelu_tanh" else "none")
        w = dequantized_weight(op, args, torch.float32)
        gx = (g.float() @ w).to(x.dtype)
        return (gx,) + (None,) * (activation_pos - 1)   # activation is the first keyword-only argument

    return backward, setup_context


def _call(op, args):
    schema = getattr(torch.ops.vitk, op).default._schema
    pos = [a for a, s in zip(args, schema.arguments) if not s.kwarg_only]
    kw = {s.name: a for a, s in zip(args, schema.arguments) if s.kwarg_only}
    return getattr(torch.ops.vitk, op)(*pos, **kw)


# ---------------------------------------------------------------- dynamic_int8_linear
def _check_dynamic(x, w_q, w_scale, bias, activation, symmetric):
    K = _rows("x", x, FLOAT_DTYPES)
    _activation(activation)
    _max_k("x", K)
    N = _w_scale_1d(w_scale, x)
    _w_q(w_q, N, K, x)
    _channel_vector("bias", bias, N, x)


define("dynamic_int8_linear", check=_check_dynamic, autograd=_grad_wrt_x("dynamic_int8_linear", 4), backends=[
    cpp("cpu"), triton("lowbit"),
], fake=lambda x, w_q, w_scale, bias, activation, symmetric: _out(x, w_scale.shape[0]))


# ---------------------------------------------------------------- int4_linear
def _check_int4(x, w_packed, w_scale, w_zero, group_size, bias, activation):
    K = _rows("x", x, FLOAT_DTYPES)
    _activation(activation)
    N = _packed4(w_packed, x, K)
    if group_size not in (*GROUP_SIZES, K):
        raise ValueError(f"group_size: expected 32, 64, 128 or K={K}, got {group_size}")
    if K % group_size:
        raise ValueError(f"group_size: expected a divisor of K={K}, got {group_size}")
    check.tensor("w_scale", w_scale, dtypes=FLOAT_DTYPES, like=("x", x))
    if tuple(w_scale.shape) != (N, K // group_size):
        raise ValueError(f"w_scale: expected shape [N, K/group_size] = [{N}, {K // group_size}], "
                         f"got {list(w_scale.shape)}")
    if w_zero is not None:
        check.tensor("w_zero", w_zero, like=("x", x))
        check.same_dtype("w_zero", w_zero, "w_scale", w_scale)
        if w_zero.shape != w_scale.shape:
            raise ValueError(f"w_zero: expected the shape of w_scale {list(w_scale.shape)}, got {list(w_zero.shape)}")
    _channel_vector("bias", bias, N, x)


define("int4_linear", check=_check_int4, autograd=_grad_wrt_x("int4_linear", 6), backends=[
    cpp("cpu"), triton("lowbit"),
], fake=lambda x, w_packed, w_scale, w_zero, group_size, bias, activation: _out(x, w_packed.shape[0]))


# ---------------------------------------------------------------- int4_int8_linear
def _check_int4_int8(x, w_packed, w_scale, bias, activation):
    K = _rows("x", x, FLOAT_DTYPES)
    _activation(activation)
    _max_k("x", K)
    N = _packed4(w_packed, x, K)
    if _w_scale_1d(w_scale, x) != N:
        raise ValueError(f"w_scale: expected shape [N] = [{N}] (N from w_packed), got {list(w_scale.shape)}")
    _channel_vector("bias", bias, N, x)


define("int4_int8_linear", check=_check_int4_int8, backends=[
    cpp("cpu"), triton("lowbit"),
], fake=lambda x, w_packed, w_scale, bias, activation: _out(x, w_packed.shape[0]))


# ---------------------------------------------------------------- shift_linear
def _check_shift(x, w_packed, w_scale, bias, activation):
    K = _rows("x", x, FLOAT_DTYPES)
    _activation(activation)
    N = _packed4(w_packed, x, K)
    _channel_vector("w_scale", w_scale, N, x, dtypes={torch.float32})
    _channel_vector("bias", bias, N, x)


define("shift_linear", check=_check_shift, autograd=_grad_wrt_x("shift_linear", 4), backends=[
    cpp("cpu"), triton("lowbit"),
], fake=lambda x, w_packed, w_scale, bias, activation: _out(x, w_packed.shape[0]))


# ---------------------------------------------------------------- Python API
def quantize_per_token(x: torch.Tensor, *, symmetric: bool = True):
    """Per-row dynamic quantization of x [..., K] (fp32/bf16/fp16) -> (q, scale [...] fp32, zero_point [...] int32).

    symmetric: scale = amax|row| / 127, q = clamp(round(x / scale), -127, 127) int8, zero_point 0.
    Otherwise the range [min(row, 0), max(row, 0)] (it always holds 0, as fbgemm's): scale = range / 255,
    zero_point = clamp(round(-lo / scale), 0, 255), q = clamp(round(x / scale) + zero_point, 0, 255) uint8.
    round is half to even; the scale is computed and divided by in float32. A scale that would be 0 (a row
    of zeros, or values so small that it underflows) is 1. A row holding NaN or an infinity gets q = 0,
    zero_point 0 and scale NaN, so the outputs computed from it are NaN."""
    return torch.ops.vitk.quantize_per_token(x, symmetric=symmetric)


def int8_linear(x_q, x_scale, x_zero_point, w_q, w_scale, bias=None, *, activation: str = "none",
                out_dtype: Optional[torch.dtype] = None):
    """act(((x_q - x_zero_point) @ w_q.T) * x_scale * w_scale + bias), the integer sum exact (int32), the
    zero point folded into a per-channel correction. x_q [..., K] int8, or uint8 with x_zero_point [...];
    w_q [N, K] int8 (or vitkernels.lowbit.block_int8(w_q), which the kernels read without re-blocking);
    w_scale [N] fp32. fp32 out unless out_dtype is bf16 / fp16."""
    return torch.ops.vitk.int8_linear(x_q, x_scale, x_zero_point, w_q, w_scale, bias, activation=activation,
                                      out_dtype=out_dtype)


def dynamic_int8_linear(x, w_q, w_scale, bias=None, *, activation: str = "none", symmetric: bool = True):
    """quantize_per_token(x) then int8_linear, bit for bit, with the quantization fused into the GEMM's
    packing of x; out in x's dtype. Differentiable in x, the quantizer taken as identity (straight-through)."""
    return torch.ops.vitk.dynamic_int8_linear(x, w_q, w_scale, bias, activation=activation, symmetric=symmetric)


def int4_linear(x, w_packed, w_scale, w_zero, group_size: int, bias=None, *, activation: str = "none"):
    """W4A16: x @ W.T with W = (code - w_zero) * w_scale per group of group_size along K (w_zero None:
    signed codes -8..7). w_packed [N, K/2] uint8 (low nibble = even k), w_scale / w_zero [N, K/group_size];
    fp32 accumulation, out in x's dtype. Differentiable in x."""
    return torch.ops.vitk.int4_linear(x, w_packed, w_scale, w_zero, group_size, bias, activation=activation)


def int4_int8_linear(x, w_packed, w_scale, bias=None, *, activation: str = "none"):
    """W4A8: signed 4-bit weights with a scale per output channel, x quantized per token (symmetric) on the
    fly as dynamic_int8_linear does; the integer products exact."""
    return torch.ops.vitk.int4_int8_linear(x, w_packed, w_scale, bias, activation=activation)


def shift_linear(x, w_packed, w_scale=None, bias=None, *, activation: str = "none"):
    """Power-of-two weights (DeepShift-PS, ShiftAddViT): codes 1..7 are 2^-(c-1), 9..15 are -2^-(c-9), 0 and 8
    zero, times w_scale[n] (default 1). Equals F.linear(x, decoded, bias) within fp32 summation order.
    Differentiable in x."""
    return torch.ops.vitk.shift_linear(x, w_packed, w_scale, bias, activation=activation)


__all__: List[str] = ["quantize_per_token", "int8_linear", "dynamic_int8_linear", "int4_linear", "int4_int8_linear",
                      "shift_linear"]
