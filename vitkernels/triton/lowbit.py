"""Triton kernels of the lowbit family: int8 / int4 / power-of-two linear layers with the quantization of x,
the dequantization, bias and activation fused.

Plain functions called by vitkernels/ops/lowbit.py after it has validated the arguments, with the ops' own
signatures:

    quantize_per_token(x, symmetric) -> (q, scale, zero_point)
    int8_linear(x_q, x_scale, x_zero_point, w_q, w_scale, bias, activation, out_dtype) -> Tensor
    dynamic_int8_linear(x, w_q, w_scale, bias, activation, symmetric) -> Tensor
    int4_linear(x, w_packed, w_scale, w_zero, group_size, bias, activation) -> Tensor
    int4_int8_linear(x, w_packed, w_scale, bias, activation) -> Tensor
    shift_linear(x, w_packed, w_scale, bias, activation) -> Tensor

Two GEMM kernels, each a tile of BLOCK_M rows of x against BLOCK_N output channels over the whole of K:

* ``_int8_gemm_kernel`` (int8_linear, dynamic_int8_linear, int4_int8_linear): ``tl.dot`` on int8 operands
  into an int32 accumulator, so the integer sum is exact. The x operand is signed: int8 codes as they
  are, uint8 codes (asymmetric) shifted by -128, the shift and the zero point folded into one
  per-channel correction ``acc - (zp - 128) * rowsum(w_q)``, with the row sums added up from the weight
  tiles the loop loads anyway. The weights are int8 [N, K], the CPU kernels' blocked layout
  (vitkernels.lowbit.block_int8, addressed in place: no re-blocking per call), or 4-bit codes unpacked
  in registers (low nibble = even k, two's complement). dynamic_int8_linear and int4_int8_linear
  quantize x inside the kernel: a first pass over each row block finds the rows' ranges, then the
  main loop quantizes each x tile right before its ``tl.dot``, with the same arithmetic as
  ``quantize_per_token`` (an IEEE division by the fp32 scale, round half to even by the 1.5 * 2^23
  trick, clamp), so the codes are bit for bit those of quantize_per_token then int8_linear.
* ``_float_gemm_kernel`` (int4_linear, shift_linear): the 4-bit codes are decoded in registers, int4
  as ``(code - zero) * scale`` per group (signed codes times scale without zeros), shift codes by
  building the power of two's exponent bits directly (no multiplication, no table); fp32 accumulation.
  fp32 x multiplies fp32 weights (``input_precision="ieee"``, no TF32); bf16 / fp16 x runs the tensor
  cores in its own dtype (shift weights are powers of two, exact in either; decoded int4 weights are
  rounded to it once).

The epilogue (both kernels) is ``act(acc * x_scale[m] * w_scale[n] + bias[n])`` in fp32, stored in
the output dtype. ReLU is ``where(v < 0, 0, v)`` and the tanh of gelu_tanh clamps with ``where``, so NaN
stays NaN as on the CPU; a row of x holding NaN or an infinity quantizes to codes 0 with scale NaN,
so its outputs are NaN.

Block sizes are constexpr and chosen per call from M (no autotuning); every edge is masked. Under
TRITON_INTERPRET=1 (set before triton is imported) the kernels run on the CPU, which is how they are
tested without a GPU.
"""
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from ._launch import device_ctx, is_interpreted, launcher

_ACT = {"none": 0, "relu": 1, "gelu": 2, "gelu_tanh": 3}
# x operand of the integer GEMM
_X_INT8, _X_UINT8, _X_QUANT_SYM, _X_QUANT_ASYM = 0, 1, 2, 3
# weights of the integer GEMM
_W_INT8, _W_BLOCKED, _W_INT4 = 0, 1, 2
# weights of the float GEMM
_F_INT4, _F_SHIFT = 0, 1


# ------------------------------------------------------------------------------------- shared pieces
@triton.jit
def _round_half_even(v):
    """torch.round for |v| < 2^22: adding 1.5 * 2^23 leaves no fraction bits, and fp32 addition rounds
    half to even (the CPU kernels use the same trick)."""
    return (v + 12582912.0) - 12582912.0


@triton.jit
def _row_ranges(x_ptr, rows, row_mask, s_xm, s_xk, K, SYM: tl.constexpr, BLOCK_M: tl.constexpr,
                BLOCK_K: tl.constexpr):
    """Per row: (scale fp32, zero point as fp32, non-finite flag) of quantize_per_token, over all of K.

    symmetric: scale = max|x| / 127; asymmetric: [lo, hi] = [min(x, 0), max(x, 0)], scale = (hi - lo) / 255,
    zero point round(-lo / scale) in 0..255. A zero scale is 1; a row holding NaN or an infinity gets
    scale NaN and zero point 0."""
    hi = tl.zeros([BLOCK_M], dtype=tl.float32)
    lo = tl.zeros([BLOCK_M], dtype=tl.float32)
    bad = tl.zeros([BLOCK_M], dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        mask = row_mask[:, None] & (cols < K)[None, :]
        v = tl.load(x_ptr + rows[:, None] * s_xm + cols[None, :] * s_xk, mask=mask, other=0.0).to(tl.float32)
        bad = tl.maximum(bad, tl.max(((v - v) != 0).to(tl.int32), axis=1))   # NaN - NaN, inf - inf: NaN
        hi = tl.maximum(hi, tl.max(v, axis=1))
        lo = tl.minimum(lo, tl.min(v, axis=1))
    if SYM:
        scale = tl.math.div_rn(tl.maximum(hi, -lo), tl.full([BLOCK_M], 127.0, tl.float32))
    else:
        scale = tl.math.div_rn(hi - lo, tl.full([BLOCK_M], 255.0, tl.float32))
    scale = tl.where(scale == 0.0, 1.0, scale)
    if SYM:
        zf = tl.zeros([BLOCK_M], dtype=tl.float32)
    else:
        zf = _round_half_even(tl.math.div_rn(-lo, scale))
        zf = tl.where(zf < 0.0, 0.0, tl.where(zf > 255.0, 255.0, zf))
    is_bad = bad != 0
    scale = tl.where(is_bad, float("nan"), scale)
    zf = tl.where(is_bad, 0.0, zf)
    return scale, zf, is_bad


@triton.jit
def _quantize(v, scale, zf, is_bad, SYM: tl.constexpr):
    """The integer codes (as exact fp32 values) of an fp32 tile v [BLOCK_M, BLOCK_K] with its rows' ranges."""
    r = _round_half_even(tl.math.div_rn(v, scale[:, None])) + zf[:, None]
    if SYM:
        r = tl.where(r < -127.0, -127.0, tl.where(r > 127.0, 127.0, r))
    else:
        r = tl.where(r < 0.0, 0.0, tl.where(r > 255.0, 255.0, r))
    return tl.where(is_bad[:, None], 0.0, r)


@triton.jit
def _activate(v, ACT: tl.constexpr):
    """none / relu / gelu (erf) / gelu_tanh on an fp32 tile; NaN stays NaN through every branch."""
    if ACT == 1:
        v = tl.where(v < 0.0, 0.0, v)
    elif ACT == 2:
        v = 0.5 * v * (1.0 + tl.math.erf(v * 0.7071067811865476))
    elif ACT == 3:
        u = 0.7978845608028654 * (v + 0.044715 * v * v * v)
        u = tl.where(u > 9.0, 9.0, tl.where(u < -9.0, -9.0, u))
        e = tl.exp(2.0 * u)
        v = 0.5 * v * (1.0 + (e - 1.0) / (e + 1.0))
    return v


@triton.jit
def _store_out(out_ptr, acc, row_scale, ws_ptr, b_ptr, rows, cols, M, N, s_om,
               HAS_WS: tl.constexpr, HAS_BIAS: tl.constexpr, ACT: tl.constexpr):
    """act(acc * row_scale[m] * w_scale[n] + bias[n]) in fp32, stored in out's dtype."""
    col_mask = cols < N
    v = acc * row_scale[:, None]
    if HAS_WS:
        v = v * tl.load(ws_ptr + cols, mask=col_mask, other=1.0).to(tl.float32)[None, :]
    if HAS_BIAS:
        v = v + tl.load(b_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    v = _activate(v, ACT)
    mask = (rows < M)[:, None] & col_mask[None, :]
    tl.store(out_ptr + rows[:, None] * s_om + cols[None, :], v.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _nibbles(w_ptr, cols, kk, N, KH, s_wn, s_wk, SIGNED: tl.constexpr, BLOCK_K: tl.constexpr):
    """The 4-bit codes of k in [2 kk, 2 kk + BLOCK_K) for output channels cols, as a [BLOCK_K, BLOCK_N] tile:
    int8 in -8..7 (SIGNED) or 0..15; masked ones 0. Byte j of a row holds k = 2j (low nibble), 2j + 1 (high)."""
    kb = kk + tl.arange(0, BLOCK_K // 2)
    mask = (cols < N)[:, None] & (kb < KH)[None, :]
    b = tl.load(w_ptr + cols[:, None] * s_wn + kb[None, :] * s_wk, mask=mask, other=0)
    if SIGNED:
        lo = (b << 4).to(tl.int8, bitcast=True) >> 4
        hi = b.to(tl.int8, bitcast=True) >> 4
    else:
        lo = (b & 15).to(tl.int8)
        hi = (b >> 4).to(tl.int8)
    return tl.trans(tl.interleave(lo, hi))


@triton.jit
def _tile_order(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Programs walk the output channels of one row block before the next, so the row block (and its
    ranges, for the fused quantization) stays in L2 while the weights stream past."""
    pid = tl.program_id(0)
    num_n = tl.cdiv(N, BLOCK_N)
    rows = (pid // num_n) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = (pid % num_n) * BLOCK_N + tl.arange(0, BLOCK_N)
    return rows, cols


# ------------------------------------------------------------------------------------- kernels
@triton.jit
def _quantize_kernel(x_ptr, q_ptr, scale_ptr, zp_ptr, M, K, s_xm, s_xk,
                     SYM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < M
    scale, zf, is_bad = _row_ranges(x_ptr, rows, row_mask, s_xm, s_xk, K, SYM, BLOCK_M, BLOCK_K)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        mask = row_mask[:, None] & (cols < K)[None, :]
        v = tl.load(x_ptr + rows[:, None] * s_xm + cols[None, :] * s_xk, mask=mask, other=0.0).to(tl.float32)
        codes = _quantize(v, scale, zf, is_bad, SYM).to(tl.int32)
        tl.store(q_ptr + rows[:, None] * K + cols[None, :], codes.to(q_ptr.dtype.element_ty), mask=mask)
    tl.store(scale_ptr + rows, scale, mask=row_mask)
    tl.store(zp_ptr + rows, zf.to(tl.int32), mask=row_mask)


@triton.jit
def _int8_gemm_kernel(x_ptr, xs_ptr, xz_ptr, w_ptr, ws_ptr, b_ptr, out_ptr,
                      M, N, K, s_xm, s_xk, s_wn, s_wk, s_om,
                      X_MODE: tl.constexpr, HAS_XZ: tl.constexpr, W_MODE: tl.constexpr,
                      HAS_BIAS: tl.constexpr, ACT: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    rows, cols = _tile_order(M, N, BLOCK_M, BLOCK_N)
    row_mask = rows < M
    col_mask = cols < N
    FUSED: tl.constexpr = X_MODE >= 2
    SYM: tl.constexpr = X_MODE != 3
    UNSIGNED: tl.constexpr = (X_MODE == 1) or (X_MODE == 3)
    ROWSUM: tl.constexpr = UNSIGNED or HAS_XZ
    if FUSED:
        row_scale, zf, is_bad = _row_ranges(x_ptr, rows, row_mask, s_xm, s_xk, K, SYM, BLOCK_M, BLOCK_K)
    else:
        row_scale = tl.load(xs_ptr + rows, mask=row_mask, other=1.0)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int32)
    rowsum = tl.zeros([BLOCK_N], dtype=tl.int32)
    if W_MODE == 1:
        # blocked: w[n][k] at ((n // 16) * (ceil(K/4) + 1) + k // 4) * 64 + (n % 16) * 4 + k % 4
        w_cols = (cols // 16) * ((tl.cdiv(K, 4) + 1) * 64) + (cols % 16) * 4
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_mask = ks < K
        x_mask = row_mask[:, None] & k_mask[None, :]
        x_ptrs = x_ptr + rows[:, None] * s_xm + ks[None, :] * s_xk
        if FUSED:
            v = tl.load(x_ptrs, mask=x_mask, other=0.0).to(tl.float32)
            codes = _quantize(v, row_scale, zf, is_bad, SYM).to(tl.int32)
            if UNSIGNED:
                codes -= 128
            a = codes.to(tl.int8)
        elif UNSIGNED:
            a = (tl.load(x_ptrs, mask=x_mask, other=0).to(tl.int32) - 128).to(tl.int8)
        else:
            a = tl.load(x_ptrs, mask=x_mask, other=0)
        if W_MODE == 2:
            b = _nibbles(w_ptr, cols, k0 // 2, N, K // 2, s_wn, s_wk, True, BLOCK_K)
        else:
            w_mask = k_mask[:, None] & col_mask[None, :]
            if W_MODE == 1:
                b = tl.load(w_ptr + w_cols[None, :] + ((ks // 4) * 64 + ks % 4)[:, None], mask=w_mask, other=0)
            else:
                b = tl.load(w_ptr + cols[None, :] * s_wn + ks[:, None] * s_wk, mask=w_mask, other=0)
        acc = tl.dot(a, b, acc, out_dtype=tl.int32)
        if ROWSUM:
            rowsum += tl.sum(b.to(tl.int32), axis=0)
    if ROWSUM:
        # sum_k (x - zp) w = sum_k (x - 128) w - (zp - 128) rowsum(w) for the unsigned codes
        if FUSED:
            corr = zf.to(tl.int32)
        elif HAS_XZ:
            corr = tl.load(xz_ptr + rows, mask=row_mask, other=0)
        else:
            corr = tl.zeros([BLOCK_M], dtype=tl.int32)
        if UNSIGNED:
            corr -= 128
        acc -= corr[:, None] * rowsum[None, :]
    _store_out(out_ptr, acc.to(tl.float32), row_scale, ws_ptr, b_ptr, rows, cols, M, N, s_om, True, HAS_BIAS, ACT)


@triton.jit
def _float_gemm_kernel(x_ptr, w_ptr, ws_ptr, wz_ptr, b_ptr, out_ptr,
                       M, N, K, group_size, s_xm, s_xk, s_wn, s_wk, s_sn, s_sg, s_zn, s_zg, s_om,
                       W_MODE: tl.constexpr, HAS_WS: tl.constexpr, HAS_ZERO: tl.constexpr,
                       GROUP_TILED: tl.constexpr, HAS_BIAS: tl.constexpr, ACT: tl.constexpr, IEEE: tl.constexpr,
                       UPCAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    rows, cols = _tile_order(M, N, BLOCK_M, BLOCK_N)
    row_mask = rows < M
    col_mask = cols < N
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_mask = ks < K
        a = tl.load(x_ptr + rows[:, None] * s_xm + ks[None, :] * s_xk, mask=row_mask[:, None] & k_mask[None, :],
                    other=0.0)
        if W_MODE == 0:
            c = _nibbles(w_ptr, cols, k0 // 2, N, K // 2, s_wn, s_wk, not HAS_ZERO, BLOCK_K).to(tl.float32)
            if GROUP_TILED:
                # the whole K tile lies in one group (group_size is a multiple of BLOCK_K)
                g = k0 // group_size
                s = tl.load(ws_ptr + cols * s_sn + g * s_sg, mask=col_mask, other=0.0).to(tl.float32)[None, :]
                if HAS_ZERO:
                    z = tl.load(wz_ptr + cols * s_zn + g * s_zg, mask=col_mask, other=0.0).to(tl.float32)[None, :]
            else:
                gm = k_mask[:, None] & col_mask[None, :]
                g = (ks // group_size)[:, None]
                s = tl.load(ws_ptr + cols[None, :] * s_sn + g * s_sg, mask=gm, other=0.0).to(tl.float32)
                if HAS_ZERO:
                    z = tl.load(wz_ptr + cols[None, :] * s_zn + g * s_zg, mask=gm, other=0.0).to(tl.float32)
            if HAS_ZERO:
                w = (c - z) * s
            else:
                w = c * s
        else:
            kb = k0 // 2 + tl.arange(0, BLOCK_K // 2)
            bmask = col_mask[:, None] & (kb < K // 2)[None, :]
            byte = tl.load(w_ptr + cols[:, None] * s_wn + kb[None, :] * s_wk, mask=bmask, other=0)
            code = tl.trans(tl.interleave(byte & 15, byte >> 4)).to(tl.int32)
            mag = code & 7
            # 2^-(mag - 1) built from its exponent field: (127 - (mag - 1)) << 23, then the sign
            p = ((128 - mag) << 23).to(tl.float32, bitcast=True)
            w = tl.where(mag == 0, 0.0, tl.where(code >= 8, -p, p))
        if IEEE:
            acc = tl.dot(a.to(tl.float32), w, acc, input_precision="ieee")
        elif UPCAST:
            # the interpreter's tl.dot gets bfloat16 wrong (numpy has none): the same rounded operands in fp32
            acc = tl.dot(a.to(tl.float32), w.to(a.dtype).to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(a, w.to(a.dtype), acc)
    ones = tl.full([BLOCK_M], 1.0, tl.float32)
    _store_out(out_ptr, acc, ones, ws_ptr, b_ptr, rows, cols, M, N, s_om, HAS_WS, HAS_BIAS, ACT)


# ------------------------------------------------------------------------------------- launchers
_INTERPRETED = is_interpreted(_int8_gemm_kernel)


def _pow2(n: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, triton.next_power_of_2(max(n, 1))))


def _blocks(M: int, N: int, K: int, x_bytes: int) -> Tuple[int, int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) for an M x N x K problem whose x tiles have
    x_bytes per element (1: int8 codes; 2 or 4: float x, quantized or decoded-weight GEMMs). The K tile
    keeps the pipelined x tiles (num_stages of them) well inside an H100's shared memory."""
    if _INTERPRETED:                               # numpy: fewer, larger tiles are faster
        return _pow2(M, 16, 64), _pow2(N, 16, 64), _pow2(K, 32, 64), 4, 1
    bk = 128 if x_bytes == 1 else 64
    if M <= 16:                                    # decode-like: weight streaming, many N tiles
        return 16, 64, bk, 4, 4
    if M <= 64:
        return 64, 64, bk, 4, 4
    return 128, 128, (bk if x_bytes < 4 else 32), 8, 3


def _rows(x: torch.Tensor) -> torch.Tensor:
    """x [..., K] as [M, K], a view whenever the leading dims allow one (any row and column strides)."""
    return x.reshape(-1, x.shape[-1])


def _output(x: torch.Tensor, N: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.empty((*x.shape[:-1], N), dtype=dtype, device=x.device)


def _vector(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if t is None else t.reshape(-1).contiguous()


def _int8_gemm(x: torch.Tensor, x_scale, x_zp, w: torch.Tensor, w_mode: int, w_scale, bias, activation: str,
               x_mode: int, out_dtype: torch.dtype) -> torch.Tensor:
    K = x.shape[-1]
    N = w_scale.shape[0]
    out = _output(x, N, out_dtype)
    x2 = _rows(x)
    M = x2.shape[0]
    if M == 0:
        return out
    BM, BN, BK, warps, stages = _blocks(M, N, K, x.element_size())
    ws = w_scale.contiguous()
    xs = _vector(x_scale) if x_scale is not None else ws
    xz = _vector(x_zp)
    b = _vector(bias)
    s_wn, s_wk = (w.stride(0), w.stride(1)) if w.dim() == 2 else (0, 0)
    grid = (triton.cdiv(M, BM) * triton.cdiv(N, BN),)
    with device_ctx(x):
        launcher(_int8_gemm_kernel)[grid](
            x2, xs, xz if xz is not None else ws, w, ws, b if b is not None else ws, out,
            M, N, K, x2.stride(0), x2.stride(1), s_wn, s_wk, N,
            X_MODE=x_mode, HAS_XZ=xz is not None, W_MODE=w_mode, HAS_BIAS=b is not None, ACT=_ACT[activation],
            BLOCK_M=BM, BLOCK_N=BN, BLOCK_K=BK, num_warps=warps, num_stages=stages)
    return out


def _int8_weights(w_q: torch.Tensor) -> Tuple[torch.Tensor, int]:
    # The blocked layout is read in place (it is contiguous by construction: block_int8's output).
    return (w_q.contiguous(), _W_BLOCKED) if w_q.dim() == 3 else (w_q, _W_INT8)


def quantize_per_token(x: torch.Tensor, symmetric: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    K = x.shape[-1]
    lead = x.shape[:-1]
    q = torch.empty(x.shape, dtype=torch.int8 if symmetric else torch.uint8, device=x.device)
    scale = torch.empty(lead, dtype=torch.float32, device=x.device)
    zp = torch.empty(lead, dtype=torch.int32, device=x.device)
    x2 = _rows(x)
    M = x2.shape[0]
    if M == 0:
        return q, scale, zp
    BM = 16 if _INTERPRETED else 4
    BK = _pow2(K, 32, 256 if _INTERPRETED else 1024)
    with device_ctx(x):
        launcher(_quantize_kernel)[(triton.cdiv(M, BM),)](
            x2, q, scale, zp, M, K, x2.stride(0), x2.stride(1),
            SYM=bool(symmetric), BLOCK_M=BM, BLOCK_K=BK, num_warps=4)
    return q, scale, zp


def int8_linear(x_q, x_scale, x_zero_point, w_q, w_scale, bias, activation, out_dtype):
    w, w_mode = _int8_weights(w_q)
    x_mode = _X_UINT8 if x_q.dtype == torch.uint8 else _X_INT8
    return _int8_gemm(x_q, x_scale, x_zero_point, w, w_mode, w_scale, bias, activation, x_mode,
                      out_dtype or torch.float32)


def dynamic_int8_linear(x, w_q, w_scale, bias, activation, symmetric):
    w, w_mode = _int8_weights(w_q)
    return _int8_gemm(x, None, None, w, w_mode, w_scale, bias, activation,
                      _X_QUANT_SYM if symmetric else _X_QUANT_ASYM, x.dtype)


def int4_int8_linear(x, w_packed, w_scale, bias, activation):
    return _int8_gemm(x, None, None, w_packed, _W_INT4, w_scale, bias, activation, _X_QUANT_SYM, x.dtype)


def _float_gemm(x, w_packed, w_mode, w_scale, w_zero, group_size, bias, activation):
    K = x.shape[-1]
    N = w_packed.shape[0]
    out = _output(x, N, x.dtype)
    x2 = _rows(x)
    M = x2.shape[0]
    if M == 0:
        return out
    BM, BN, BK, warps, stages = _blocks(M, N, K, x.element_size())
    b = _vector(bias)
    grouped = w_mode == _F_INT4
    if grouped and group_size % BK:
        BK = 32 if group_size % 32 == 0 else BK   # keep a K tile inside one group where the groups allow it
    ws = w_scale if w_scale is not None else w_packed
    wz = w_zero if w_zero is not None else ws
    if not grouped and w_scale is not None:
        ws = ws.contiguous()
    s_sn, s_sg = (ws.stride(0), ws.stride(1)) if grouped else (0, 0)
    s_zn, s_zg = (wz.stride(0), wz.stride(1)) if grouped else (0, 0)
    grid = (triton.cdiv(M, BM) * triton.cdiv(N, BN),)
    with device_ctx(x):
        launcher(_float_gemm_kernel)[grid](
            x2, w_packed, ws, wz, b if b is not None else ws, out,
            M, N, K, group_size, x2.stride(0), x2.stride(1), w_packed.stride(0), w_packed.stride(1),
            s_sn, s_sg, s_zn, s_zg, N,
            W_MODE=w_mode, HAS_WS=(not grouped) and w_scale is not None, HAS_ZERO=w_zero is not None,
            GROUP_TILED=grouped and group_size % BK == 0, HAS_BIAS=b is not None, ACT=_ACT[activation],
            IEEE=x.dtype == torch.float32, UPCAST=_INTERPRETED and x.dtype == torch.bfloat16, BLOCK_M=BM, BLOCK_N=BN, BLOCK_K=BK, num_warps=warps, num_stages=stages)
    return out


def int4_linear(x, w_packed, w_scale, w_zero, group_size, bias, activation):
    return _float_gemm(x, w_packed, _F_INT4, w_scale, w_zero, int(group_size), bias, activation)


def shift_linear(x, w_packed, w_scale, bias, activation):
    return _float_gemm(x, w_packed, _F_SHIFT, w_scale, None, 1, bias, activation)
