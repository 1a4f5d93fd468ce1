"""Reference of quantized attention: the fake-quant attention the ViT post-training-quantization papers
simulate (RepQ-ViT, AdaLog, DopQ-ViT, APHQ-ViT, ...), written as they write it, in float64.

1. q, k, v are fake-quantized per tensor to int8 with zero points:
       x̂ = s · (clamp(round(x / s) + z, -128, 127) − z)
2. P = softmax(scale · q̂ k̂ᵀ), scale defaulting to d^-1/2;
3. every probability is quantized on a logarithmic grid of 2^bits levels below δ:
       c = round(−log(P / δ) / log(base)),  c < 0 clamped to 0,
       P̂ = δ · base^(−c)  for c < 2^bits;  P̂ = 0 for c ≥ 2^bits or P = 0;
4. out = P̂ v̂, with P̂ not renormalized.

With base = √2 and δ the calibrated maximum this is RepQ-ViT's log√2 quantizer. Its official code
(classification/quant/quantizer.py, LogSqrt2Quantizer.quantize) computes
    x_int = round(−2 · log2(x / δ));  zero where x_int ≥ n_levels;  x_int clamped to [0, n_levels − 1];
    x̂ = 2^(−ceil(x_int / 2)) · (√2 if x_int is odd else 1) · δ
and 2 · log2(y) = log(y) / log(√2), while 2^(−ceil(c/2)) · √2^(c mod 2) = √2^(−c): the same quantizer.
Base 2 is the log2 quantizer (FQ-ViT's, RepQ-ViT's Log2Quantizer); AdaLog learns the base. torch.round
rounds halves to even, as the papers' torch code does. NaN anywhere in q, k or v propagates as the
eager simulation propagates it (a NaN key makes its whole head NaN, a NaN value its output column).
"""
import math
from typing import Optional

import torch

SQRT2 = math.sqrt(2.0)


def fake_quant_int8(x: torch.Tensor, s: float, z: int = 0) -> torch.Tensor:
    """s · (clamp(round(x / s) + z, -128, 127) − z), evaluated in x's dtype."""
    return s * (torch.clamp(torch.round(x / s) + z, -128, 127) - z)


def log_quantize(p: torch.Tensor, bits: int, base: float, delta: float) -> torch.Tensor:
    """The log-grid quantizer of step 3, evaluated in p's dtype."""
    c = torch.round(-torch.log(p / delta) / math.log(base))
    drop = (c >= 2 ** bits) | (p == 0)
    return torch.where(drop, torch.zeros_like(p), delta * torch.pow(base, -torch.clamp(c, min=0)))


def quant_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_scale: float, k_scale: float,
                    v_scale: float, q_zero: int = 0, k_zero: int = 0, v_zero: int = 0, attn_bits: int = 4,
                    attn_base: float = SQRT2, attn_delta: float = 1.0,
                    scale: Optional[float] = None) -> torch.Tensor:
    """q, k [B, N, heads, d], v [B, Nk, heads, dv] (k's N may differ from q's): out [B, N, heads, dv] in q's
    dtype, computed in float64."""
    d = q.shape[-1]
    scale = d ** -0.5 if scale is None else scale
    qh = fake_quant_int8(q.double(), q_scale, q_zero).transpose(1, 2)      # [B, heads, N, d]
    kh = fake_quant_int8(k.double(), k_scale, k_zero).transpose(1, 2)
    vh = fake_quant_int8(v.double(), v_scale, v_zero).transpose(1, 2)
    p = torch.softmax(scale * (qh @ kh.transpose(-1, -2)), dim=-1)
    p_hat = log_quantize(p, attn_bits, attn_base, attn_delta)
    return (p_hat @ vh).transpose(1, 2).to(q.dtype)
