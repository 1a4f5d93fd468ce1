"""Triton launcher of quant_attention: int8 q, k, v and log-grid quantized softmax probabilities.

    quant_attention(q, k, v, q_scale, k_scale, v_scale, q_zero, k_zero, v_zero, attn_bits, attn_base,
                    attn_delta, scale) -> out

Called by vitkernels/ops/quant_attention.py after it has validated the arguments. Semantics:
vitkernels/reference/quant_attention.py. The kernel is the shared attention core's two-pass quantized
forward (attention_core._attn_fwd_quant) with the DENSE geometry: a group is one batch element of
[B, N, heads, d] tensors, N queries against Nk keys, read in place through their strides (views of a
packed qkv projection are never copied). Its numerics follow the CPU kernel (csrc/cpu/quant_attention.cpp)
step by step: the same int8 codes (fp64 quotient, round half to even), the same exact integer logits
and fp32 multiply, and the same one fused multiply-add per key for the log-grid code, so the two
backends differ only where a probability lies within fp32 rounding of a code boundary (the row
denominators are summed in different orders and with different exponentials).
"""
import math

import torch

from . import attention_core as core


def quant_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_scale: float, k_scale: float,
                    v_scale: float, q_zero: int, k_zero: int, v_zero: int, attn_bits: int, attn_base: float,
                    attn_delta: float, scale) -> torch.Tensor:
    """out [B, N, heads, dv], contiguous, in q's dtype."""
    B, N, heads, d = q.shape
    Nk = k.shape[1]
    out = torch.empty((B, N, heads, v.shape[-1]), dtype=q.dtype, device=q.device)
    if out.numel() == 0:
        return out
    # The CPU kernel's default, 1 / sqrt(d) in double (d ** -0.5 can differ in the last bit).
    sc = 1.0 / math.sqrt(d) if scale is None else float(scale)
    t = core.dense_token_strides
    strides = dict(q=t(q), k=t(k), v=t(v), o=t(out))
    core.quant_attention_forward(core.DENSE, q, k, v, out, strides, B, heads, N, Nk, q_scale, k_scale, v_scale,
                                 (q_zero, k_zero, v_zero), attn_bits, attn_base, attn_delta, sc,
                                 dict(NQ=N, NK=Nk))
    return out
