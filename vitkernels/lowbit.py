"""Packing float weights into the lowbit ops' formats, and back (the inverses are for tests and checks).

    w_q, w_scale = pack_int8(weight)                        # int8 per output channel, symmetric
    w_blocked = block_int8(w_q)                              # the same weights as the CPU kernels read them
    w_packed, w_scale, w_zero = pack_int4(weight, 128)       # 4-bit codes, one scale (and zero) per group
    w_packed, w_scale = pack_shift(weight)                   # signed powers of two (DeepShift-PS)

4-bit codes are packed two per byte along K, the low nibble holding the even k.
"""
from typing import Optional, Tuple

import torch

__all__ = ["pack_int8", "unpack_int8", "block_int8", "unblock_int8", "pack_int4", "unpack_int4", "pack_nibbles",
           "unpack_nibbles", "pack_shift", "unpack_shift", "shift_values", "SHIFT_EXPONENTS"]

# Exponents a shift code holds for each sign: 2^0 .. 2^-6.
SHIFT_EXPONENTS = 7


def _row_scale(amax: torch.Tensor, levels: float) -> torch.Tensor:
    scale = amax / levels
    return torch.where(scale == 0, torch.ones_like(scale), scale)


# ---------------------------------------------------------------- int8
def pack_int8(weight: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """[N, K] float -> (w_q [N, K] int8 in -127..127, w_scale [N] fp32), scale = amax|row| / 127 (1 for a zero row)."""
    w = weight.detach().float()
    scale = _row_scale(w.abs().amax(1), 127.0)
    q = torch.clamp(torch.round(w / scale[:, None]), -127, 127).to(torch.int8)
    return q, scale


def unpack_int8(w_q: torch.Tensor, w_scale: torch.Tensor) -> torch.Tensor:
    return w_q.float() * w_scale[:, None].float()


def block_int8(w_q: torch.Tensor) -> torch.Tensor:
    """[N, K] int8 -> the layout the CPU int8 kernels read ([ceil(N/16), ceil(K/4) + 1, 64] int8): per block
    of 16 output channels, one 64-byte row per 4 values of k (channel j's 4 bytes at 4j), then the 16
    channels' int32 row sums (little-endian), which fold the activations' zero point into one correction.
    int8_linear and dynamic_int8_linear take it in place of w_q and then skip blocking the weights per call."""
    N, K = w_q.shape
    NB, KQ = -(-N // 16), -(-K // 4)
    w = torch.zeros(NB * 16, KQ * 4, dtype=torch.int8, device=w_q.device)
    w[:N, :K] = w_q
    blocks = w.view(NB, 16, KQ, 4).permute(0, 2, 1, 3).reshape(NB, KQ, 64)
    sums = w.sum(1, dtype=torch.int32).view(NB, 16).contiguous().view(torch.int8).view(NB, 1, 64)
    return torch.cat([blocks, sums], 1).contiguous()


def unblock_int8(w_blocked: torch.Tensor, N: int, K: int) -> torch.Tensor:
    NB, KQ1, _ = w_blocked.shape
    KQ = KQ1 - 1
    w = w_blocked[:, :KQ].reshape(NB, KQ, 16, 4).permute(0, 2, 1, 3).reshape(NB * 16, KQ * 4)
    return w[:N, :K].contiguous()


# ---------------------------------------------------------------- nibbles
def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """[N, K] integer codes 0..15 (K even) -> [N, K/2] uint8, low nibble = even k."""
    c = codes.to(torch.uint8)
    return (c[:, 0::2] | (c[:, 1::2] << 4)).contiguous()


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """[N, K/2] uint8 -> [N, K] int64 codes 0..15."""
    p = packed.to(torch.int64)
    return torch.stack([p & 15, p >> 4], -1).reshape(p.shape[0], -1)


# ---------------------------------------------------------------- int4
def pack_int4(weight: torch.Tensor, group_size: int, symmetric: bool = True
              ) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """[N, K] float -> (w_packed [N, K/2] uint8, w_scale [N, K/group_size] fp32, w_zero or None).

    symmetric: signed codes -7..7 (two's complement nibbles), scale = amax|group| / 7, w_zero None.
    Otherwise codes 0..15 over [min(group, 0), max(group, 0)], scale = range / 15 and an integer zero
    point in code units: value = (code - zero) * scale."""
    w = weight.detach().float()
    N, K = w.shape
    if K % group_size or K % 2:
        raise ValueError(f"group_size: expected a divisor of an even K={K}, got {group_size}")
    g = w.view(N, K // group_size, group_size)
    if symmetric:
        scale = _row_scale(g.abs().amax(-1), 7.0)
        q = torch.clamp(torch.round(g / scale[..., None]), -7, 7).to(torch.int64)
        return pack_nibbles((q & 15).view(N, K)), scale, None
    lo, hi = g.amin(-1).clamp(max=0), g.amax(-1).clamp(min=0)
    scale = _row_scale(hi - lo, 15.0)
    zero = torch.clamp(torch.round(-lo / scale), 0, 15)
    q = torch.clamp(torch.round(g / scale[..., None]) + zero[..., None], 0, 15).to(torch.int64)
    return pack_nibbles(q.view(N, K)), scale, zero


def int4_codes(w_packed: torch.Tensor, signed: bool) -> torch.Tensor:
    c = unpack_nibbles(w_packed)
    return torch.where(c >= 8, c - 16, c) if signed else c


def unpack_int4(w_packed: torch.Tensor, w_scale: torch.Tensor, w_zero: Optional[torch.Tensor], group_size: int,
                dtype=torch.float32) -> torch.Tensor:
    """The [N, K] weights the int4 formats stand for: (code - zero) * scale per group, or signed code * scale."""
    c = int4_codes(w_packed, w_zero is None).to(dtype)
    s = w_scale.to(dtype).repeat_interleave(group_size, 1)
    if w_zero is not None:
        c = c - w_zero.to(dtype).repeat_interleave(group_size, 1)
    return c * s


# ---------------------------------------------------------------- shift (powers of two)
def shift_values(dtype=torch.float32, device=None) -> torch.Tensor:
    """The 16 values of a shift code: 0 and 8 are zero, 1..7 are 2^-(c-1), 9..15 are -2^-(c-9)."""
    c = torch.arange(16, device=device)
    mag = c % 8
    v = torch.pow(2.0, -(mag - 1).to(torch.float64)) * torch.where(c < 8, 1.0, -1.0)
    return torch.where(mag == 0, torch.zeros_like(v), v).to(dtype)


def pack_shift(weight: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """[N, K] float (K even) -> (w_packed [N, K/2] uint8, w_scale [N] fp32), DeepShift-PS's rounding relative to
    the row's scale s = amax|row|: sign(w) and round(log2(|w| / s)) clamped to 0..-6; zeros stay zero."""
    w = weight.detach().float()
    scale = _row_scale(w.abs().amax(1), 1.0)
    r = w.abs() / scale[:, None]
    e = torch.clamp(torch.round(torch.log2(r.clamp(min=2.0 ** -126))), -(SHIFT_EXPONENTS - 1), 0).to(torch.int64)
    code = torch.where(w > 0, 1 - e, 9 - e)
    code = torch.where(w == 0, torch.zeros_like(code), code)
    return pack_nibbles(code), scale


def unpack_shift(w_packed: torch.Tensor, w_scale: Optional[torch.Tensor] = None, dtype=torch.float32) -> torch.Tensor:
    w = shift_values(dtype, w_packed.device)[unpack_nibbles(w_packed)]
    return w if w_scale is None else w * w_scale.to(dtype)[:, None]
