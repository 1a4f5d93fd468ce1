"""Quantized attention of post-training-quantized ViTs (RepQ-ViT, AdaLog, DopQ-ViT, ...).

torch.ops.vitk.quant_attention(q, k, v, q_scale, k_scale, v_scale, *, q_zero=0, k_zero=0, v_zero=0,
                               attn_bits=4, attn_base=√2, attn_delta=1.0, scale=None) -> out

q, k [B, N, heads, d] and v [B, Nk, heads, dv] (k and v may hold a different number of tokens Nk),
any strides (views of one packed qkv projection are read in place), float32 / bfloat16 / float16.
q, k and v are quantized per tensor to int8 with zero points, the softmax probabilities on a log grid
of 2^attn_bits levels below attn_delta (base √2: RepQ-ViT's log√2 quantizer; 2: the log2 quantizer;
a learned base: AdaLog's), and out = P̂ v̂ is not renormalized. Semantics:
vitkernels/reference/quant_attention.py; CPU kernel: csrc/cpu/quant_attention.cpp. Inference only:
asking for a gradient raises.
"""
import math
from typing import Optional

import torch

from ..dispatch import FLOAT_DTYPES
from . import _checks as check
from ._define import cpp, define, triton

MAX_HEAD_DIM = 32768     # d * 255 * 255 stays inside the int32 accumulator


def _positive(name, x):
    if not isinstance(x, (int, float)) or not math.isfinite(x) or x <= 0:
        raise ValueError(f"{name}: expected a positive finite value, got {x}")


def _zero(name, z):
    if not -128 <= z <= 127:
        raise ValueError(f"{name}: expected an int8 zero point in [-128, 127], got {z}")


def _check_quant_attention(q, k, v, q_scale, k_scale, v_scale, q_zero, k_zero, v_zero, attn_bits, attn_base,
                           attn_delta, scale):
    for name, t in (("q", q), ("k", k), ("v", v)):
        check.tensor(name, t, dtypes=FLOAT_DTYPES, dims=4, layout="[B, N, heads, head_dim]", like=("q", q))
        check.same_dtype(name, t, "q", q)
    B, _, H, d = q.shape
    if k.shape[0] != B or k.shape[2] != H or k.shape[3] != d:
        raise ValueError(f"k: expected shape [{B}, Nk, {H}, {d}] (q's batch, heads and head_dim), got {list(k.shape)}")
    if k.shape[1] < 1:
        raise ValueError(f"k: expected at least one key, got shape {list(k.shape)}")
    if tuple(v.shape[:3]) != tuple(k.shape[:3]):
        raise ValueError(f"v: expected shape [{B}, {k.shape[1]}, {H}, head_dim_v] (k's batch, keys and heads), "
                         f"got {list(v.shape)}")
    check.nonempty_head_dims(q, v)
    if d > MAX_HEAD_DIM:
        raise ValueError(f"q: expected head_dim <= {MAX_HEAD_DIM} (the int32 accumulator's range), got {d}")
    for name, s in (("q_scale", q_scale), ("k_scale", k_scale), ("v_scale", v_scale)):
        _positive(name, s)
    for name, z in (("q_zero", q_zero), ("k_zero", k_zero), ("v_zero", v_zero)):
        _zero(name, z)
    if not 1 <= attn_bits <= 8:
        raise ValueError(f"attn_bits: expected 1 to 8 bits, got {attn_bits}")
    if not math.isfinite(attn_base) or attn_base <= 1:
        raise ValueError(f"attn_base: expected a finite base > 1, got {attn_base}")
    _positive("attn_delta", attn_delta)
    if scale is not None:
        _positive("scale", scale)


def _no_backward(ctx, grad_out):
    raise RuntimeError("quant_attention: has no gradient (it is an inference op: the quantizers' rounding has no "
                       "useful derivative); run it under torch.no_grad() / torch.inference_mode(), or train the "
                       "float model and quantize it afterwards")


def _setup(ctx, inputs, keyword_only_inputs, output):
    pass


define("quant_attention", check=_check_quant_attention,
       fake=lambda q, k, v, *_: check.out_like(q, v),
       backends=[cpp("cpu"), triton("quant_attention")], autograd=(_no_backward, _setup))


def quant_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_scale: float, k_scale: float,
                    v_scale: float, *, q_zero: int = 0, k_zero: int = 0, v_zero: int = 0, attn_bits: int = 4,
                    attn_base: float = math.sqrt(2.0), attn_delta: float = 1.0,
                    scale: Optional[float] = None) -> torch.Tensor:
    """Attention with int8 q, k, v and log-grid quantized softmax probabilities (not renormalized); see the op."""
    return torch.ops.vitk.quant_attention(q, k, v, q_scale, k_scale, v_scale, q_zero=q_zero, k_zero=k_zero,
                                          v_zero=v_zero, attn_bits=attn_bits, attn_base=attn_base,
                                          attn_delta=attn_delta, scale=scale)
