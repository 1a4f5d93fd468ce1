"""Triton kernels of the codebook family (VQ tokenizers): nearest-code search and code lookup.

Plain functions called by vitkernels/ops/codebook.py after it has validated the arguments:

    codebook_argmin(z, codebook, cosine, exact) -> (indices int64, distances float32)
    codebook_lookup(indices, codebook) -> Tensor
    codebook_lookup_backward(grad_output, indices, codebook_shape) -> Tensor

A [G, K, D] codebook is factorized: z is [..., G, D] and group g is searched (or gathered, or
scattered) only in sub-codebook g; every group runs in the same launch, on its own grid axis.

The search keeps the CPU kernel's rules (csrc/cpu/codebook.cpp explains them): the same scores, the
same treatment of rows and codes holding a NaN or an infinity, the same overflow-safe cosine, the
same exact path with the same error bounds, and distances evaluated the same way in float64 (sums
over d in order, fused multiply-adds), so the backends agree wherever the choice is exact.

The kernels also run on the CPU under TRITON_INTERPRET=1 (set before triton is imported), which
is how they are tested on machines without a GPU; there they use one fixed configuration, while on
a GPU the search kernel autotunes over a small set.
"""
import functools
import math
from typing import List, Sequence, Tuple

import torch
import triton
import triton.language as tl

from ._launch import device_ctx, is_interpreted, launcher

_EPS = tl.constexpr(1e-12)  # F.normalize's default eps
_U = 2.0 ** -24         # fp32's unit roundoff
_FLT_MIN = 2.0 ** -126
# Centred squared norms beyond this send the exact path to its direct comparison, so that no fp32
# score it relies on can overflow (as kExactMaxSq in the CPU kernel).
_EXACT_MAX_SQ = 2.0 ** 100
# Larger than any code index, so it loses every lowest-index tie break.
_BIG_INDEX = tl.constexpr(2**31 - 1)


# ------------------------------------------------------------------------------------- helpers
@triton.jit
def _pow2_scale(m):
    """A power of two s with m * s in [1, 4) for m >= FLT_MIN (below, m * s < 2): scaling by it is exact,
    and squares and dot products of scaled values can neither overflow nor underflow fp32."""
    e = (m.to(tl.int32, bitcast=True) >> 23) & 0xFF
    e = tl.minimum(e, 253)
    return ((254 - e) << 23).to(tl.float32, bitcast=True)


@triton.jit
def _row_scales(z_ptr, z_row, row_mask, s_zd, D, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """Per row of z, the power of two that brings its largest |component| near 1: a cosine search ranks a
    row by its direction alone, and scaled rows keep their precision whatever their length."""
    m = tl.zeros([BLOCK_M], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        zt = tl.load(z_ptr + z_row[:, None] + d[None, :] * s_zd, mask=row_mask[:, None] & (d < D)[None, :],
                     other=0.0)
        m = tl.maximum(m, tl.max(tl.abs(zt.to(tl.float32)), axis=1))
    return _pow2_scale(m)


@triton.jit
def _rows_tile(z_ptr, z_row, row_mask, s_zd, d, D, center_g, zscale,
               CENTRED: tl.constexpr, COSINE: tl.constexpr, F32: tl.constexpr):
    """z[rows, d] as the search multiplies it: centred on the group's mean code (exact L2) or scaled by the
    row's power of two (cosine); fp32 when F32, else in z's dtype (scaling by a power of two is exact)."""
    d_mask = d < D
    zt = tl.load(z_ptr + z_row[:, None] + d[None, :] * s_zd, mask=row_mask[:, None] & d_mask[None, :], other=0.0)
    if CENTRED:
        zt = zt.to(tl.float32) - tl.load(center_g + d, mask=d_mask, other=0.0)[None, :]
    elif COSINE:
        zs = zt.to(tl.float32) * zscale[:, None]
        if F32:
            zt = zs
        else:
            zt = zs.to(zt.dtype)
    elif F32:
        zt = zt.to(tl.float32)
    return zt


@triton.jit
def _codes_tile(cb_g, e_row, col_mask, s_cd, d, D, center_g, CENTRED: tl.constexpr, F32: tl.constexpr):
    """codebook[cols, d] as the search multiplies it: centred (exact L2), fp32 when F32. (Cosine codes
    come scaled by _code_factors_kernel: scaling the tile here would cost the fp32 kernel half its
    registers.)"""
    d_mask = d < D
    et = tl.load(cb_g + e_row[:, None] + d[None, :] * s_cd, mask=col_mask[:, None] & d_mask[None, :], other=0.0)
    if CENTRED:
        et = et.to(tl.float32) - tl.load(center_g + d, mask=d_mask, other=0.0)[None, :]
    elif F32:
        et = et.to(tl.float32)
    return et


@triton.jit
def _dot_nt(a, b, acc, IEEE: tl.constexpr, UPCAST: tl.constexpr):
    """acc + a @ b^T with fp32 accumulation.

    IEEE (fp32 inputs): exact fp32 products, so near-ties rank as fp32 arithmetic says (TF32 would
    not). UPCAST: compute in fp32 from 16-bit inputs; only set under TRITON_INTERPRET=1 for bf16,
    whose tl.dot the interpreter gets wrong (numpy has no bfloat16). On a GPU, 16-bit inputs go to
    the tensor cores natively.
    """
    if UPCAST:
        acc = tl.dot(a.to(tl.float32), tl.trans(b.to(tl.float32)), acc, input_precision="ieee")
    elif IEEE:
        acc = tl.dot(a, tl.trans(b), acc, input_precision="ieee")
    else:
        acc = tl.dot(a, tl.trans(b), acc)
    return acc


@triton.jit
def _score_tile(z_res, z_ptr, z_row, row_mask, s_zd, zscale, cb_g, cols, col_mask, s_ck, s_cd, D,
                center_g, cinv_g,
                CENTRED: tl.constexpr, COSINE: tl.constexpr, F32: tl.constexpr, Z_RESIDENT: tl.constexpr,
                IEEE: tl.constexpr, UPCAST: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """fp32 scores of BLOCK_M rows against the codes cols: ||e||^2 - 2 z.e (||z||^2 is the same for every
    code of a row; of the centred vectors for exact L2), or for cosine -z.e / max(||e||, eps) of the
    scaled vectors (for cosine, cb_g, s_ck and s_cd address _code_factors_kernel's scaled codes). +inf
    for an absent code, a code holding a NaN or an infinity, and a NaN score, so the strict compares
    never pick one. z_res: the rows' only D chunk, when Z_RESIDENT."""
    e_row = cols.to(tl.int64) * s_ck
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    e2 = tl.zeros([BLOCK_N], dtype=tl.float32)
    if Z_RESIDENT:
        e = _codes_tile(cb_g, e_row, col_mask, s_cd, tl.arange(0, BLOCK_D), D, center_g, CENTRED, F32)
        acc = _dot_nt(z_res, e, acc, IEEE, UPCAST)
        if not COSINE:
            ef = e.to(tl.float32)
            e2 += tl.sum(ef * ef, axis=1)
    else:
        for d0 in range(0, D, BLOCK_D):
            d = d0 + tl.arange(0, BLOCK_D)
            zt = _rows_tile(z_ptr, z_row, row_mask, s_zd, d, D, center_g, zscale, CENTRED, COSINE, F32)
            e = _codes_tile(cb_g, e_row, col_mask, s_cd, d, D, center_g, CENTRED, F32)
            acc = _dot_nt(zt, e, acc, IEEE, UPCAST)
            if not COSINE:
                ef = e.to(tl.float32)
                e2 += tl.sum(ef * ef, axis=1)
    if COSINE:
        # NaN marks a code holding a NaN or an infinity (_code_factors_kernel).
        inv = tl.load(cinv_g + cols, mask=col_mask, other=float("nan"))
        score = -acc * inv[None, :]
        ok = col_mask & (inv == inv)
    else:
        score = e2[None, :] - 2.0 * acc
        ok = col_mask & (e2 < float("inf"))
    return tl.where(ok[None, :] & (score == score), score, float("inf"))


@triton.jit
def _row_offsets(rows, n1, n2, s_z0, s_z1, s_z2):
    """Element offset of flat row n of z, whose leading dims collapse to at most three (n0, n1, n2)."""
    i2 = rows % n2
    t = rows // n2
    i1 = t % n1
    i0 = t // n1
    return i0.to(tl.int64) * s_z0 + i1.to(tl.int64) * s_z1 + i2.to(tl.int64) * s_z2


@triton.jit
def _load64(ptr, mask):
    return tl.load(ptr, mask=mask, other=0.0).to(tl.float32).to(tl.float64)


@triton.jit
def _rank_tile(z_ptr, z_row, row_mask, s_zd, cb_g, cols, col_mask, s_ck, s_cd, D,
               COSINE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """What the exact path minimizes, in float64 from the inputs, as the CPU kernel's rank64: ||z - e||^2, or
    -z.e / max(||e||, eps) (the cosine times ||z||), summed over d in order with fused multiply-adds. A code
    holding a NaN or an infinity ranks NaN or +-inf."""
    e_row = cols.to(tl.int64) * s_ck
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float64)
    ee = tl.zeros([BLOCK_N], dtype=tl.float64)
    for d in range(0, D):
        zc = _load64(z_ptr + z_row + d * s_zd, row_mask)
        ec = _load64(cb_g + e_row + d * s_cd, col_mask)
        if COSINE:
            acc = tl.fma(zc[:, None], ec[None, :], acc)
            ee = tl.fma(ec, ec, ee)
        else:
            t = zc[:, None] - ec[None, :]
            acc = tl.fma(t, t, acc)
    if COSINE:
        acc = -acc / tl.maximum(tl.sqrt(ee), tl.full([BLOCK_N], _EPS, tl.float64))[None, :]
    return acc


@triton.jit
def _distance64(z_ptr, z_row, row_mask, s_zd, cb_g, idx, s_ck, s_cd, D,
                COSINE: tl.constexpr, BLOCK_M: tl.constexpr):
    """(distance in float64, whether the row holds a NaN or an infinity) of each row to code idx: ||z - e||^2
    or 2 - 2 cos (F.normalize's eps, clamped at 0), summed over d in order with fused multiply-adds as the
    CPU kernel's distance64."""
    e_row = idx.to(tl.int64) * s_ck
    acc = tl.zeros([BLOCK_M], dtype=tl.float64)
    zz = tl.zeros([BLOCK_M], dtype=tl.float64)
    ee = tl.zeros([BLOCK_M], dtype=tl.float64)
    nonfinite = tl.zeros([BLOCK_M], dtype=tl.int32)
    for d in range(0, D):
        zc = _load64(z_ptr + z_row + d * s_zd, row_mask)
        ec = _load64(cb_g + e_row + d * s_cd, row_mask)
        nonfinite |= ((zc * 0.0) != 0.0).to(tl.int32)
        if COSINE:
            acc = tl.fma(zc, ec, acc)
            zz = tl.fma(zc, zc, zz)
            ee = tl.fma(ec, ec, ee)
        else:
            t = zc - ec
            acc = tl.fma(t, t, acc)
    if COSINE:
        eps = tl.full([BLOCK_M], _EPS, tl.float64)
        acc = 2.0 - 2.0 * (acc / (tl.maximum(tl.sqrt(zz), eps) * tl.maximum(tl.sqrt(ee), eps)))
        acc = tl.where(acc < 0.0, 0.0, acc)  # rounding can put cos a hair above 1; NaN stays NaN
    return acc, nonfinite


@triton.jit
def _finish_rows(z_ptr, z_row, rows, row_mask, s_zd, cb_g, idx, s_ck, s_cd, D, G, g, idx_out_ptr, dist_out_ptr,
                 COSINE: tl.constexpr, BLOCK_M: tl.constexpr):
    """Stores each row's final index and distance (fp32): idx, or code 0 for a row holding a NaN or an
    infinity (no code is nearer to it than another). Such rows are rare, so their distance is evaluated
    again rather than every row's twice."""
    dist, nonfinite = _distance64(z_ptr, z_row, row_mask, s_zd, cb_g, idx, s_ck, s_cd, D, COSINE, BLOCK_M)
    if tl.max(nonfinite, axis=0) > 0:
        idx = tl.where(nonfinite > 0, 0, idx)
        dist, nonfinite = _distance64(z_ptr, z_row, row_mask, s_zd, cb_g, idx, s_ck, s_cd, D, COSINE, BLOCK_M)
    out = rows.to(tl.int64) * G + g
    tl.store(idx_out_ptr + out, idx.to(tl.int64), mask=row_mask)
    tl.store(dist_out_ptr + out, dist.to(tl.float32), mask=row_mask)


@triton.jit
def _group_codes(cb_ptr, center_ptr, cbs_ptr, cinv_ptr, g, K, D, s_cg, s_ck, s_cd, COSINE: tl.constexpr):
    """Group g's codebook, its centre (exact L2) and cosine factors, and the codes the search multiplies
    with their strides: the codebook itself, or for cosine _code_factors_kernel's [G, K, D] output."""
    cb_g = cb_ptr + g * s_cg
    if COSINE:
        search_g, s_sk, s_sd = cbs_ptr + g * K * D, D, 1
    else:
        search_g, s_sk, s_sd = cb_g, s_ck, s_cd
    return cb_g, center_ptr + g * D, cinv_ptr + g * K, search_g, s_sk, s_sd


@triton.jit
def _search_rows(z_ptr, z_row, row_mask, s_zd, D, center_g, CENTRED: tl.constexpr, COSINE: tl.constexpr,
                 F32: tl.constexpr, Z_RESIDENT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """(the rows' power-of-two scales, 1 unless cosine; the rows as the search multiplies them when D fits
    one chunk, which is then loaded once and reused against every code tile)."""
    if COSINE:
        zscale = _row_scales(z_ptr, z_row, row_mask, s_zd, D, BLOCK_M, BLOCK_D)
    else:
        zscale = tl.full([BLOCK_M], 1.0, tl.float32)
    if Z_RESIDENT:
        z_res = _rows_tile(z_ptr, z_row, row_mask, s_zd, tl.arange(0, BLOCK_D), D, center_g, zscale,
                           CENTRED, COSINE, F32)
    else:
        z_res = zscale
    return zscale, z_res


# ------------------------------------------------------------------------------ codebook_argmin
@triton.jit
def _code_factors_kernel(cb_ptr, out_ptr, inv_ptr, GK, K, D, s_cg, s_ck, s_cd, EPS,
                         NORMALIZE: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    """The codes a cosine search multiplies, into out ([G, K, D] contiguous), and a factor per code, inv
    ([G, K] fp32), such that -z.e * inv is F.normalize's cosine times the scaled row's length, with
    nothing in it able to overflow or underflow: each code is scaled by the power of two that brings its
    largest |component| near 1 (exact), then either divided by max(||e||, eps) there (NORMALIZE, fp32:
    the CPU kernel's arithmetic, so that parallel codes tie as exactly there as here) with inv = 1, or
    stored as is (16-bit codes for the tensor cores) with inv = 1 / max(||e||, eps). inv is NaN for a
    code holding a NaN or an infinity, which then never wins."""
    i = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    i_mask = i < GK
    base = (i // K).to(tl.int64) * s_cg + (i % K).to(tl.int64) * s_ck
    m = tl.zeros([BLOCK_K], dtype=tl.float32)
    bad = tl.zeros([BLOCK_K], dtype=tl.int32)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        e = tl.load(cb_ptr + base[:, None] + d[None, :] * s_cd, mask=i_mask[:, None] & (d < D)[None, :],
                    other=0.0).to(tl.float32)
        m = tl.maximum(m, tl.max(tl.abs(e), axis=1))
        bad = tl.maximum(bad, tl.max(((e * 0.0) != 0.0).to(tl.int32), axis=1))
    scale = _pow2_scale(m)
    ss = tl.zeros([BLOCK_K], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        e = tl.load(cb_ptr + base[:, None] + d[None, :] * s_cd, mask=i_mask[:, None] & (d < D)[None, :],
                    other=0.0).to(tl.float32) * scale[:, None]
        ss += tl.sum(e * e, axis=1)
    denom = tl.maximum(tl.sqrt_rn(ss), EPS * scale)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        m2 = i_mask[:, None] & (d < D)[None, :]
        e = tl.load(cb_ptr + base[:, None] + d[None, :] * s_cd, mask=m2, other=0.0).to(tl.float32) * scale[:, None]
        if NORMALIZE:
            e = tl.div_rn(e, tl.broadcast_to(denom[:, None], [BLOCK_K, BLOCK_D]))
        tl.store(out_ptr + i.to(tl.int64)[:, None] * D + d[None, :], e.to(out_ptr.dtype.element_ty), mask=m2)
    if NORMALIZE:
        inv = tl.full([BLOCK_K], 1.0, tl.float32)
    else:
        inv = tl.div_rn(tl.full([BLOCK_K], 1.0, tl.float32), denom)
    inv = tl.where(bad > 0, float("nan"), inv)
    tl.store(inv_ptr + i, inv, mask=i_mask)


@triton.jit
def _argmin_kernel(
    z_ptr, cb_ptr, center_ptr, cbs_ptr, cinv_ptr,
    idx_out_ptr, dist_out_ptr, part_val_ptr, part_idx_ptr, part_sec_ptr,
    N, K, D, G, n1, n2,
    s_z0, s_z1, s_z2, s_zg, s_zd,
    s_cg, s_ck, s_cd,
    K_PER_SPLIT,
    COSINE: tl.constexpr, EXACT: tl.constexpr, CENTRED: tl.constexpr, F32: tl.constexpr, SPLIT: tl.constexpr,
    Z_RESIDENT: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """One program: BLOCK_M rows of group pid(1) against codes [pid(2) * K_PER_SPLIT, +K_PER_SPLIT).

    Keeps a running (min score, argmin) per row over BLOCK_N-code tiles, so memory is O(N), never
    N x K; EXACT also keeps the second-lowest score of any other code. SPLIT=False: the program covers
    all K and writes the final index and distance. SPLIT=True: it writes its partial result for
    _argmin_combine_kernel (or, EXACT, for _exact_finish_kernel).
    """
    pid_m = tl.program_id(0)
    g = tl.program_id(1).to(tl.int64)
    pid_s = tl.program_id(2)

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < N
    z_row = _row_offsets(rows, n1, n2, s_z0, s_z1, s_z2) + g * s_zg
    cb_g, center_g, cinv_g, search_g, s_sk, s_sd = _group_codes(cb_ptr, center_ptr, cbs_ptr, cinv_ptr, g, K, D,
                                                                s_cg, s_ck, s_cd, COSINE)
    zscale, z_res = _search_rows(z_ptr, z_row, row_mask, s_zd, D, center_g, CENTRED, COSINE, F32, Z_RESIDENT,
                                 BLOCK_M, BLOCK_D)
    k_start = pid_s * K_PER_SPLIT
    k_end = tl.minimum(k_start + K_PER_SPLIT, K)

    best_val = tl.full([BLOCK_M], float("inf"), dtype=tl.float32)
    second = tl.full([BLOCK_M], float("inf"), dtype=tl.float32)
    best_idx = tl.zeros([BLOCK_M], dtype=tl.int32)
    for k0 in range(k_start, k_end, BLOCK_N):
        cols = k0 + tl.arange(0, BLOCK_N)
        col_mask = cols < k_end
        score = _score_tile(z_res, z_ptr, z_row, row_mask, s_zd, zscale, search_g, cols, col_mask, s_sk, s_sd, D,
                            center_g, cinv_g, CENTRED, COSINE, F32, Z_RESIDENT, IEEE, UPCAST,
                            BLOCK_M, BLOCK_N, BLOCK_D)
        tile_min = tl.min(score, axis=1)
        # Lowest index among the tile's minima (torch.argmin's rule); the strict < below keeps an
        # earlier tile's index on a tie across tiles.
        tile_arg = tl.min(tl.where(score == tile_min[:, None], cols[None, :], _BIG_INDEX), axis=1)
        better = tile_min < best_val
        if EXACT:
            # The best score of any code but the winner: the old best when the tile wins, else the
            # tile's own best.
            tile_sec = tl.min(tl.where(cols[None, :] == tile_arg[:, None], float("inf"), score), axis=1)
            second = tl.where(better, tl.minimum(best_val, tile_sec), tl.minimum(second, tile_min))
        best_val = tl.where(better, tile_min, best_val)
        best_idx = tl.where(better, tile_arg, best_idx)

    if SPLIT:
        part = (g * tl.num_programs(2) + pid_s) * N + rows
        tl.store(part_val_ptr + part, best_val, mask=row_mask)
        tl.store(part_idx_ptr + part, best_idx, mask=row_mask)
        if EXACT:
            tl.store(part_sec_ptr + part, second, mask=row_mask)
    else:
        _finish_rows(z_ptr, z_row, rows, row_mask, s_zd, cb_g, best_idx, s_ck, s_cd, D, G, g, idx_out_ptr,
                     dist_out_ptr, COSINE, BLOCK_M)


@triton.jit
def _merge_partials(part_val_ptr, part_idx_ptr, part_sec_ptr, g, S, N, rows, row_mask, TOP2: tl.constexpr,
                    BLOCK_M: tl.constexpr):
    """(best score, its code, and with TOP2 the best score of any other code) of each row over the S
    partial results of a split search. Splits cover increasing code ranges, so merging in split order
    with a strict < keeps the lowest index on ties, exactly as one unsplit pass would."""
    best = tl.full([BLOCK_M], float("inf"), dtype=tl.float32)
    second = tl.full([BLOCK_M], float("inf"), dtype=tl.float32)
    idx = tl.zeros([BLOCK_M], dtype=tl.int32)
    for s in range(0, S):
        part = (g * S + s) * N + rows
        v = tl.load(part_val_ptr + part, mask=row_mask, other=float("inf"))
        i = tl.load(part_idx_ptr + part, mask=row_mask, other=0)
        better = v < best
        if TOP2:
            sc = tl.load(part_sec_ptr + part, mask=row_mask, other=float("inf"))
            second = tl.where(better, tl.minimum(best, sc), tl.minimum(second, v))
        best = tl.where(better, v, best)
        idx = tl.where(better, i, idx)
    return best, idx, second


@triton.jit
def _argmin_combine_kernel(
    z_ptr, cb_ptr, idx_out_ptr, dist_out_ptr, part_val_ptr, part_idx_ptr,
    N, D, G, S, n1, n2,
    s_z0, s_z1, s_z2, s_zg, s_zd,
    s_cg, s_ck, s_cd,
    COSINE: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """Merges the S partial results of a split search, then writes index and distance."""
    pid_m = tl.program_id(0)
    g = tl.program_id(1).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < N

    best_val, best_idx, _ = _merge_partials(part_val_ptr, part_idx_ptr, part_val_ptr, g, S, N, rows, row_mask,
                                            False, BLOCK_M)
    z_row = _row_offsets(rows, n1, n2, s_z0, s_z1, s_z2) + g * s_zg
    _finish_rows(z_ptr, z_row, rows, row_mask, s_zd, cb_ptr + g * s_cg, best_idx, s_ck, s_cd, D, G, g, idx_out_ptr,
                 dist_out_ptr, COSINE, BLOCK_M)


@triton.jit
def _exact_finish_kernel(
    z_ptr, cb_ptr, center_ptr, cbs_ptr, cinv_ptr, far_ptr,
    idx_out_ptr, dist_out_ptr, part_val_ptr, part_idx_ptr, part_sec_ptr,
    N, K, D, G, S, n1, n2,
    s_z0, s_z1, s_z2, s_zg, s_zd,
    s_cg, s_ck, s_cd,
    SLACK, MAX_SQ,
    COSINE: tl.constexpr, CENTRED: tl.constexpr, Z_RESIDENT: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """The exact path's second half, as exact_pick in csrc/cpu/codebook.cpp: merges the S partial
    (best, index, second-best) in split order; keeps the best code of each row that the error bound
    separates from every other; for the others (a tie or a near-tie), rescans the group and compares
    in float64 every code whose fp32 score is within the bound of the best (every code, for a row or
    group whose centred squared norms exceed MAX_SQ). Programs without such a row scan nothing."""
    pid_m = tl.program_id(0)
    g = tl.program_id(1).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < N
    z_row = _row_offsets(rows, n1, n2, s_z0, s_z1, s_z2) + g * s_zg
    cb_g, center_g, cinv_g, search_g, s_sk, s_sd = _group_codes(cb_ptr, center_ptr, cbs_ptr, cinv_ptr, g, K, D,
                                                                s_cg, s_ck, s_cd, COSINE)

    best, idx, second = _merge_partials(part_val_ptr, part_idx_ptr, part_sec_ptr, g, S, N, rows, row_mask, True,
                                        BLOCK_M)

    # The rows as the scan saw them, their squared norm (Z for exact L2) and whether they are finite.
    zscale, z_res = _search_rows(z_ptr, z_row, row_mask, s_zd, D, center_g, CENTRED, COSINE, True, Z_RESIDENT,
                                 BLOCK_M, BLOCK_D)
    zn2 = tl.zeros([BLOCK_M], dtype=tl.float32)
    nonfinite = tl.zeros([BLOCK_M], dtype=tl.int32)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        zt = _rows_tile(z_ptr, z_row, row_mask, s_zd, d, D, center_g, zscale, CENTRED, COSINE, True)
        zn2 += tl.sum(zt * zt, axis=1)
        nonfinite = tl.maximum(nonfinite, tl.max(((zt * 0.0) != 0.0).to(tl.int32), axis=1))

    # The bounds of the CPU kernel's exact_pick, in float64.
    slack = tl.zeros([BLOCK_M], dtype=tl.float64) + SLACK
    u = 5.9604644775390625e-08  # 2^-24
    Df = tl.zeros([BLOCK_M], dtype=tl.float64) + D   # (an int argument equal to 1 arrives as a constant)
    b64 = best.to(tl.float64)
    s64 = second.to(tl.float64)
    Z = zn2.to(tl.float64)
    if COSINE:
        # The scaled row's length times (2D + 8)u: the dot's (D)u, inv's (D/2 + 3)u, the product's u.
        E = (2.0 * Df + 8.0) * u * tl.sqrt(Z) + slack
        sure = (s64 - E > b64 + E) | (zn2 == 0.0)   # a zero row ties with every code; the scan kept the lowest
        thr = b64 + 2.0 * E
        full = rows < 0
    else:
        c = (2.0 * Df + 8.0) * u
        hi = b64 + c * (9.0 * Z + 5.0 * tl.maximum(b64 + Z, 0.0)) + slack
        s64 = tl.where(second < float("inf"), s64, 0.0)   # no other finite code: sure, below
        sure = (second == float("inf")) | (s64 - (c * (9.0 * Z + 5.0 * tl.maximum(s64 + Z, 0.0)) + slack) > hi)
        thr = tl.maximum((hi + 14.0 * c * Z + slack) / (1.0 - 5.0 * c), hi + 9.0 * c * Z + slack)
        far = tl.load(far_ptr + g) != 0
        full = far | (c > 1.0 / 64) | ~(Z <= MAX_SQ)
    found = best < float("inf")
    need = row_mask & (nonfinite == 0) & (full | (found & ~sure))

    r_best = tl.full([BLOCK_M], float("inf"), dtype=tl.float64)
    r_idx = idx
    if tl.max(need.to(tl.int32), axis=0) > 0:
        for k0 in range(0, K, BLOCK_N):
            cols = k0 + tl.arange(0, BLOCK_N)
            col_mask = cols < K
            score = _score_tile(z_res, z_ptr, z_row, row_mask, s_zd, zscale, search_g, cols, col_mask, s_sk, s_sd,
                                D, center_g, cinv_g, CENTRED, COSINE, True, Z_RESIDENT, True, UPCAST,
                                BLOCK_M, BLOCK_N, BLOCK_D)
            cand = need[:, None] & col_mask[None, :] & (full[:, None] | (score.to(tl.float64) <= thr[:, None]))
            if tl.max(tl.max(cand.to(tl.int32), axis=1), axis=0) > 0:
                r = _rank_tile(z_ptr, z_row, row_mask, s_zd, cb_g, cols, col_mask, s_ck, s_cd, D, COSINE,
                               BLOCK_M, BLOCK_N)
                ok = cand & (tl.abs(r) < float("inf"))   # NaN fails too
                r = tl.where(ok, r, float("inf"))
                t_min = tl.min(r, axis=1)
                t_arg = tl.min(tl.where(ok & (r == t_min[:, None]), cols[None, :], _BIG_INDEX), axis=1)
                better = t_min < r_best   # strict: an earlier tile keeps a tie
                r_best = tl.where(better, t_min, r_best)
                r_idx = tl.where(better, t_arg, r_idx)
    idx = tl.where(need, tl.where(r_best < float("inf"), r_idx, 0), idx)
    idx = tl.where(need | found, idx, 0)   # no finite code in the group: code 0
    _finish_rows(z_ptr, z_row, rows, row_mask, s_zd, cb_g, idx, s_ck, s_cd, D, G, g, idx_out_ptr, dist_out_ptr,
                 COSINE, BLOCK_M)


# ------------------------------------------------------------------- lookup and its backward
@triton.jit
def _rows_and_codes(idx_ptr, R, K, D, s_i, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """This program's flat rows (int64) and columns, their masks, each row's code index and whether
    the row is valid: present, with an index in [0, K). The op layer range-checks indices, but a
    kernel must never address outside the codebook on its own say-so: an invalid row's code is
    clamped to 0 and every codebook access through it is masked off (lookup writes it as zeros)."""
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    r_mask = r < R
    r64 = r.to(tl.int64)
    k = tl.load(idx_ptr + r64 * s_i, mask=r_mask, other=0).to(tl.int64)
    valid = r_mask & (k >= 0) & (k < K)
    return r64, d, r_mask, d < D, tl.where(valid, k, 0), valid


@triton.jit
def _lookup_kernel(idx_ptr, cb_ptr, out_ptr, R, G, K, D, s_i, s_cg, s_ck, s_cd,
                   BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """out[r, :] = codebook[r % G, indices[r], :] for BLOCK_R flat rows and BLOCK_D columns."""
    r64, d, r_mask, d_mask, k, valid = _rows_and_codes(idx_ptr, R, K, D, s_i, BLOCK_R, BLOCK_D)
    src = cb_ptr + (r64 % G)[:, None] * s_cg + k[:, None] * s_ck + d[None, :] * s_cd
    vals = tl.load(src, mask=valid[:, None] & d_mask[None, :], other=0.0)
    tl.store(out_ptr + r64[:, None] * D + d[None, :], vals, mask=r_mask[:, None] & d_mask[None, :])


@triton.jit
def _lookup_backward_kernel(grad_ptr, idx_ptr, acc_ptr, R, G, K, D, s_gr, s_gd, s_i,
                            BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """acc[r % G, indices[r], :] += grad[r, :] with atomics (acc is fp32, or fp64 for fp64 grads)."""
    r64, d, _, d_mask, k, valid = _rows_and_codes(idx_ptr, R, K, D, s_i, BLOCK_R, BLOCK_D)
    m = valid[:, None] & d_mask[None, :]
    vals = tl.load(grad_ptr + r64[:, None] * s_gr + d[None, :] * s_gd, mask=m, other=0.0)
    dst = acc_ptr + ((r64 % G) * K + k)[:, None] * D + d[None, :]
    # Relaxed: only the sums matter, nothing is ordered against them within the launch.
    tl.atomic_add(dst, vals.to(acc_ptr.dtype.element_ty), mask=m, sem="relaxed")


# ------------------------------------------------------------------------------ host side
_IS_INTERPRETED = is_interpreted(_argmin_kernel)

# A small autotune set for the search on a GPU, keyed by the work per program; the interpreter has
# nothing to time and runs one fixed configuration. The sets were chosen from ptxas's register and
# spill counts on sm_90: fp32 goes through tl.dot's exact FMA path (IEEE), which holds operands in
# registers, so it gets narrower D chunks and 8 warps; 16-bit inputs use the tensor cores (wgmma).
_ARGMIN_CONFIGS_FP32 = [
    triton.Config({"BLOCK_N": 64}, num_warps=8, num_stages=2),
    triton.Config({"BLOCK_N": 64}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_N": 128}, num_warps=8, num_stages=2),
    triton.Config({"BLOCK_N": 64}, num_warps=4, num_stages=2),
]
_ARGMIN_CONFIGS_16BIT = [
    triton.Config({"BLOCK_N": 64}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_N": 128}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_N": 128}, num_warps=8, num_stages=4),
    triton.Config({"BLOCK_N": 64}, num_warps=4, num_stages=3),
]
_ARGMIN_KEY = ["K_PER_SPLIT", "D", "COSINE", "EXACT", "Z_RESIDENT"]
_argmin_fp32_autotuned = (None if _IS_INTERPRETED else
                          triton.autotune(configs=_ARGMIN_CONFIGS_FP32, key=_ARGMIN_KEY)(_argmin_kernel))
_argmin_16bit_autotuned = (None if _IS_INTERPRETED else
                           triton.autotune(configs=_ARGMIN_CONFIGS_16BIT, key=_ARGMIN_KEY)(_argmin_kernel))
_MAX_BLOCK_D = {torch.float32: 32, torch.float16: 64, torch.bfloat16: 64}

_BLOCK_M = 64
_COMBINE_BLOCK_M = 128
_FINISH_BLOCK_N = 64
_FACTORS_BLOCK_K = 64


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _collapse_dims(sizes: Sequence[int], strides: Sequence[int]) -> List[Tuple[int, int]]:
    """(size, stride) pairs addressing the same elements with as few dims as possible (outer first).

    A permuted conv feature map [B, C, H, W] -> [B, H, W, C] collapses to (B, H*W): two dims, which
    the kernels index directly instead of copying z to make it one.
    """
    out: List[Tuple[int, int]] = []
    for size, stride in zip(sizes, strides):
        if size == 1:
            continue
        if out and out[-1][1] == size * stride:
            out[-1] = (out[-1][0] * size, stride)
        else:
            out.append((size, stride))
    return out


def _next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def _split_count(N: int, G: int, K: int, device: torch.device) -> int:
    """How many code ranges to split the search into, so that a small N still fills the GPU."""
    if device.type != "cuda":
        return 1
    programs = triton.cdiv(N, _BLOCK_M) * G
    target = 2 * _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    if programs >= target:
        return 1
    # Each split should still sweep several code tiles, or the partial round trip costs more than
    # the parallelism buys.
    return max(1, min(triton.cdiv(target, programs), K // 512))


def _cosine_factors(cb: torch.Tensor, dtype: torch.dtype, block_d: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """(the codes the search multiplies, [G, K, D] in dtype, inv [G, K] fp32): see _code_factors_kernel;
    fp32 codes come normalized."""
    G, K, D = cb.shape
    codes = torch.empty((G, K, D), dtype=dtype, device=cb.device)
    inv = torch.empty((G, K), dtype=torch.float32, device=cb.device)
    with device_ctx(cb):
        launcher(_code_factors_kernel)[(triton.cdiv(G * K, _FACTORS_BLOCK_K),)](
            cb, codes, inv, G * K, K, D, *cb.stride(), _EPS.value,
            NORMALIZE=dtype == torch.float32, BLOCK_K=_FACTORS_BLOCK_K, BLOCK_D=block_d,
        )
    return codes, inv


def _centres(cb: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """The exact L2 path's centre per group, the mean of its finite codes ([G, D] fp32, summed in float64;
    any centre is correct, the mean keeps the centred values and so the scores' rounding small), and
    whether a group holds a finite code whose centred squared norm is near _EXACT_MAX_SQ ([G] int32:
    half of it, a margin far beyond the fp32 rounding of the kernels' own sums)."""
    e = cb.double()
    finite = torch.isfinite(e).all(-1, keepdim=True)                        # [G, K, 1]
    e = torch.where(finite, e, 0.0)
    centre = (e.sum(1) / finite.sum(1).clamp_min(1)).float()                # [G, D]
    sq = ((e - centre.double().unsqueeze(1)) ** 2).sum(-1).masked_fill(~finite[..., 0], 0.0)
    far = (sq > _EXACT_MAX_SQ / 2).any(-1).to(torch.int32)
    return centre.contiguous(), far


def _argmin_impl(z: torch.Tensor, codebook: torch.Tensor, cosine: bool, exact: bool, split: int):
    grouped = codebook.dim() == 3
    G = codebook.shape[0] if grouped else 1
    K, D = codebook.shape[-2], codebook.shape[-1]
    out_shape = z.shape[:-1]
    lead = z.shape[:-2] if grouped else z.shape[:-1]
    N = math.prod(lead)
    indices = torch.empty(out_shape, dtype=torch.int64, device=z.device)
    distances = torch.empty(out_shape, dtype=torch.float32, device=z.device)
    if N == 0 or G == 0:
        return indices, distances

    s_zg = z.stride(-2) if grouped else 0
    s_zd = z.stride(-1)
    dims = _collapse_dims(lead, z.stride()[: len(lead)])
    if len(dims) > 3:
        # Rare: leading dims that no three (size, stride) pairs can address. Pay one copy.
        z = z.contiguous()
        s_zg = z.stride(-2) if grouped else 0
        s_zd = z.stride(-1)
        dims = _collapse_dims(lead, z.stride()[: len(lead)])
    dims = [(1, 0)] * (3 - len(dims)) + dims
    (_, s_z0), (n1, s_z1), (n2, s_z2) = dims

    cb = codebook if grouped else codebook.unsqueeze(0)
    s_cg, s_ck, s_cd = cb.stride()

    # The exact path multiplies fp32 operands (centred, or scaled and compared against a bound that
    # assumes fp32 products) whatever the input dtype.
    f32 = exact or z.dtype == torch.float32
    # tl.dot needs every dim >= 16; small D is padded with masked zeros.
    BLOCK_D = min(max(_next_pow2(D), 16), _MAX_BLOCK_D[torch.float32 if f32 else z.dtype])
    z_resident = D <= BLOCK_D
    upcast = _IS_INTERPRETED and z.dtype == torch.bfloat16 and not f32
    centred = exact and not cosine
    if cosine:
        # fp32 for the exact path, whose bound assumes fp32 codes.
        cbs, cinv = _cosine_factors(cb, torch.float32 if f32 else z.dtype, BLOCK_D)
    else:
        cbs = cinv = distances                      # unused
    if centred:
        centre, far = _centres(cb)
    else:
        centre, far = distances, indices            # unused
    split = max(1, min(int(split), K))
    # Whole 128-code ranges per split: every split but the last then sweeps only full BLOCK_N tiles.
    k_per_split = triton.cdiv(triton.cdiv(K, split), 128) * 128 if split > 1 else K
    split = triton.cdiv(K, k_per_split)

    partial = split > 1 or exact
    if partial:
        part_val = torch.empty((G, split, N), dtype=torch.float32, device=z.device)
        part_idx = torch.empty((G, split, N), dtype=torch.int32, device=z.device)
    else:
        part_val, part_idx = distances, indices     # unused when SPLIT is False
    part_sec = torch.empty((G, split, N), dtype=torch.float32, device=z.device) if exact else part_val

    common = dict(COSINE=bool(cosine), EXACT=bool(exact), CENTRED=centred, F32=f32, SPLIT=partial,
                  Z_RESIDENT=z_resident, IEEE=f32, UPCAST=upcast, BLOCK_M=_BLOCK_M, BLOCK_D=BLOCK_D)
    if _IS_INTERPRETED:
        kernel, meta = _argmin_kernel, dict(BLOCK_N=64)
    else:
        kernel, meta = (_argmin_fp32_autotuned if f32 else _argmin_16bit_autotuned), {}
    strides = (s_z0, s_z1, s_z2, s_zg, s_zd, s_cg, s_ck, s_cd)
    with device_ctx(z):
        launcher(kernel)[(triton.cdiv(N, _BLOCK_M), G, split)](
            z, cb, centre, cbs, cinv, indices, distances, part_val, part_idx, part_sec,
            N, K, D, G, n1, n2, *strides, k_per_split,
            **common, **meta,
        )
        if exact:
            launcher(_exact_finish_kernel)[(triton.cdiv(N, _BLOCK_M), G)](
                z, cb, centre, cbs, cinv, far, indices, distances, part_val, part_idx, part_sec,
                N, K, D, G, split, n1, n2, *strides,
                (4 * D + 8) * _FLT_MIN, _EXACT_MAX_SQ,
                COSINE=bool(cosine), CENTRED=centred, Z_RESIDENT=z_resident, UPCAST=False,
                BLOCK_M=_BLOCK_M, BLOCK_N=_FINISH_BLOCK_N, BLOCK_D=BLOCK_D,
                **({} if _IS_INTERPRETED else dict(num_warps=8)),
            )
        elif split > 1:
            launcher(_argmin_combine_kernel)[(triton.cdiv(N, _COMBINE_BLOCK_M), G)](
                z, cb, indices, distances, part_val, part_idx,
                N, D, G, split, n1, n2, *strides,
                COSINE=bool(cosine), BLOCK_M=_COMBINE_BLOCK_M,
            )
    return indices, distances


def codebook_argmin(z: torch.Tensor, codebook: torch.Tensor, cosine: bool,
                    exact: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """Nearest code per vector: (indices int64, distances float32), each of shape z.shape[:-1].

    z [..., D] with codebook [K, D], or z [..., G, D] with codebook [G, K, D]; the op's documentation
    (vitkernels.codebook_argmin) states what cosine and exact mean and what they guarantee. z may be
    any strided view; no N x K matrix is ever formed.
    """
    grouped = codebook.dim() == 3
    N = math.prod(z.shape[:-2] if grouped else z.shape[:-1])
    split = _split_count(N, codebook.shape[0] if grouped else 1, codebook.shape[-2], z.device)
    return _argmin_impl(z, codebook, cosine, exact, split)


def _flat_indices(indices: torch.Tensor) -> torch.Tensor:
    # A view where the layout allows one (any 1-D stride is fine); the integer copy otherwise is
    # D times smaller than the rows it addresses.
    return indices.reshape(-1)


def _lookup_blocks(D: int) -> Tuple[int, int]:
    block_d = min(_next_pow2(D), 256)
    return max(16, 4096 // block_d), block_d


def codebook_lookup(indices: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """codebook rows at indices: [...] with [K, D] -> [..., D]; [..., G] with [G, K, D] -> [..., G, D].

    Contiguous output in the codebook's dtype. Out-of-range indices (which the op layer rejects
    before calling) yield zero rows rather than out-of-bounds reads.
    """
    grouped = codebook.dim() == 3
    cb = codebook if grouped else codebook.unsqueeze(0)
    G, K, D = cb.shape
    out = torch.empty((*indices.shape, D), dtype=codebook.dtype, device=codebook.device)
    flat = _flat_indices(indices)
    R = flat.numel()
    if R == 0 or D == 0:
        return out
    BLOCK_R, BLOCK_D = _lookup_blocks(D)
    grid = (triton.cdiv(R, BLOCK_R), triton.cdiv(D, BLOCK_D))
    with device_ctx(codebook):
        launcher(_lookup_kernel)[grid](
            flat, cb, out, R, G, K, D, flat.stride(0), *cb.stride(),
            BLOCK_R=BLOCK_R, BLOCK_D=BLOCK_D,
        )
    return out


def codebook_lookup_backward(grad_output: torch.Tensor, indices: torch.Tensor,
                             codebook_shape: List[int]) -> torch.Tensor:
    """Index-add of grad_output rows into zeros of codebook_shape (per group for [G, K, D]).

    Accumulates with atomics in fp32 (fp64 for fp64 grads) and casts to grad_output.dtype. On a GPU
    the order of the atomic adds varies between runs, so fp32 results can differ in the last bits
    from run to run (not deterministic; torch's own index_add_ on CUDA is not either).
    """
    shape = [int(s) for s in codebook_shape]
    G, K, D = (shape if len(shape) == 3 else [1, *shape])
    dtype = grad_output.dtype
    acc_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    acc = torch.zeros((G, K, D), dtype=acc_dtype, device=grad_output.device)
    flat = _flat_indices(indices)
    R = flat.numel()
    if R > 0 and D > 0:
        grad = grad_output.reshape(R, D)  # a view unless the layout forbids one
        BLOCK_R, BLOCK_D = _lookup_blocks(D)
        grid = (triton.cdiv(R, BLOCK_R), triton.cdiv(D, BLOCK_D))
        with device_ctx(grad_output):
            launcher(_lookup_backward_kernel)[grid](
                grad, flat, acc, R, G, K, D, grad.stride(0), grad.stride(1), flat.stride(0),
                BLOCK_R=BLOCK_R, BLOCK_D=BLOCK_D,
            )
    return acc.to(dtype).reshape(shape)
