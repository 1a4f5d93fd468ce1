"""Triton kernels of the spectral family's wavelet ops: the one-level 2-D dual-tree complex wavelet
transform (near_sym_b), its inverse, their adjoints, and SVT's spectral layer.

Plain functions called by vitkernels/ops/spectral.py after it has validated the arguments:

    dtcwt2d(x) -> (lowpass, highpass)
    dtcwt2d_backward(grad_lowpass, grad_highpass, input_size) -> Tensor
    idtcwt2d(lowpass, highpass) -> Tensor
    idtcwt2d_backward(grad_output) -> (grad_lowpass, grad_highpass)
    svt_spectral_mix(x, weight_ll, weight_1, bias_1, weight_2, bias_2) -> Tensor
    svt_spectral_mix_backward(grad_output, x, weight_ll, weight_1, bias_1, weight_2, bias_2)
        -> (grad_x, grad_weight_ll, grad_weight_1, grad_bias_1, grad_weight_2, grad_bias_2)

The plan is the CPU kernels' (csrc/include/vitk/dtcwt_plane.h): one analysis and one synthesis filter
bank, each told its filter pair, serve all four transforms, because every 1-D filtering over the
half-sample symmetric extension is a symmetric matrix: dtcwt2d is analysis(h0, h1), its adjoint
synthesis(h0, h1); idtcwt2d is synthesis(g0, g1), its adjoint analysis(g0, g1). Every launch is a 1-D
grid over blocks of rows of all the image planes taken together (row g is row g % H of plane g // H,
so the small planes of ViT grids fill whole tiles), each program looping over column tiles, so planes
of any size work:

  analysis   1. every row filtered with the lowpass and the highpass (the odd-size padding and the
                extension read as indices: the last row / column repeated, then reflected) into a
                scratch [planes, 2, H, W] in the accumulation type;
             2. per block of rows (an even number, so a quad's two rows share it), the column filters
                of both scratch planes (ll, lh; hl, hh); ll is stored (times weight_ll for
                svt_spectral_mix), the other three are split into their quads in registers
                (reshape, permute, split) and mapped straight into the six orientations.
  synthesis  1. the lh, hl and hh planes rebuilt from their orientation pairs by the complex-to-quad
                map, into a scratch [planes, 3, H, W];
             2. per block of rows, the column filters summed into a low row (the lowpass input, read
                through its strides, with the lowpass filter, plus lh with the highpass) and a high
                row (hl plus hh), into a scratch [planes, 2, H, W];
             3. the two rows filtered and summed into the output row; for dtcwt2d_backward with an
                odd input size the padded last row / column is added into the one before it.

Every 1-D filter accumulates in the CPU kernel's order (centre tap, then x[j - d] + x[j + d] per tap
pair) in fp32 (fp64 for fp64 inputs) and applies every tap of its support, zeros included, and the
quad maps are the CPU kernel's sums and differences: a NaN or an infinity reaches exactly the outputs
it reaches on the CPU. Inputs are read, and outputs written, through their strides.

svt_spectral_mix is not one fused kernel: it runs the analysis bank on x as [B, C, H, W] (a strided
view of the channels-last input) with the lowpass weighting fused into its column pass, then one
kernel for the complex block MLP over channels, then the synthesis bank, which writes the
[B, H, W, C] output. The whole highpass is materialized between them, in fp32 (fp64 for fp64
inputs), position-major ([B, 6, H/2, W/2, C, 2] behind a [B, C, 6, H/2, W/2, 2] view) so each
position's channel block is contiguous, and the MLP rewrites it in place; the weighted lowpass is
materialized too, in the same precision. (The CPU kernel avoids both by working one image at a time.)

svt_spectral_mix_backward recomputes the forward analysis of x, runs grad_output through the
adjoint of the inverse, and does the block MLP's backward as batched matrix products (torch.bmm,
one batch entry per channel block) on the real [2 bs, 2 bs] form [[Wr, Wi], [-Wi, Wr]] of each
complex block weight, before the adjoint of the forward analysis gives grad_x: the transforms are
these kernels, the products are the GPU's GEMMs. Both highpasses are materialized.

The kernels also run on the CPU under TRITON_INTERPRET=1 (set before triton is imported), which is
how they are tested on machines without a GPU.
"""
import functools
from typing import Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl

from ..reference.spectral import G0, G1, H0, H1
from ._launch import device_ctx, is_interpreted, launcher
from .spectral import _acc, _acc_torch

_MAX_HALF = tl.constexpr(9)       # the longer filter of either bank has 19 taps
_TAPS_ROW = tl.constexpr(10)      # a filter in the taps table: its centre tap, then 9 side taps
_INV_SQRT2 = tl.constexpr(0.7071067811865476)


# ------------------------------------------------------------------------------- shared pieces
@triton.jit
def _reflect(p, n):
    """Index p of the half-sample symmetric extension of a length-n line, with repeated reflections
    for any p. % truncates on the GPU and floors under the interpreter: both signs are handled."""
    period = 2 * n
    p = p % period
    p = tl.where(p < 0, p + period, p)
    return tl.where(p < n, p, period - 1 - p)


# ------------------------------------------------------------------------------- analysis bank
@triton.jit
def _row_value(src, s_w, c, W, W0, m, ACC: tl.constexpr):
    """x[c] of a row over its extension: reflected in the padded length W, the padding repeating the
    last column W0 - 1."""
    return tl.load(src + tl.minimum(_reflect(c, W), W0 - 1)[None, :] * s_w, mask=m, other=0.0).to(ACC)


@triton.jit
def _analysis_rows_kernel(x, x_b, x_c, x_h, x_w, C, H0, W0, H, W, ROWS, taps, scratch,
                          LO_HALF: tl.constexpr, HI_HALF: tl.constexpr, BR: tl.constexpr, BC: tl.constexpr,
                          ACC: tl.constexpr):
    """scratch[p, 0 / 1, r, :] (contiguous [P, 2, H, W]) = row r of plane p filtered with the lowpass /
    highpass, for the block of rows g = p H + r of every plane; plane p is x[p // C, p % C], its rows
    past H0 repeating row H0 - 1."""
    g = tl.program_id(0).to(tl.int64) * BR + tl.arange(0, BR)
    p = g // H
    r = g % H
    src = (x + (p // C) * x_b + (p % C) * x_c + tl.minimum(r, H0 - 1) * x_h)[:, None]
    out = (scratch + (2 * p * H + r) * W)[:, None]
    t_lo = tl.load(taps)
    t_hi = tl.load(taps + _TAPS_ROW)
    for c0 in range(0, W, BC):
        c = c0 + tl.arange(0, BC)
        m = (g < ROWS)[:, None] & (c < W)[None, :]
        centre = _row_value(src, x_w, c, W, W0, m, ACC)
        lo = t_lo * centre
        hi = t_hi * centre
        for d in tl.static_range(1, _MAX_HALF + 1):
            s = _row_value(src, x_w, c - d, W, W0, m, ACC) + _row_value(src, x_w, c + d, W, W0, m, ACC)
            if d <= LO_HALF:
                lo += tl.load(taps + d) * s
            if d <= HI_HALF:
                hi += tl.load(taps + _TAPS_ROW + d) * s
        tl.store(out + c[None, :], lo, mask=m)
        tl.store(out + H * W + c[None, :], hi, mask=m)


@triton.jit
def _column_pair(plane, r, c, H, W, m, taps, LO_HALF: tl.constexpr, HI_HALF: tl.constexpr):
    """The lowpass and the highpass of a contiguous H x W plane's columns at rows r and columns c."""
    centre = tl.load(plane + r * W + c, mask=m, other=0.0)
    lo = tl.load(taps) * centre
    hi = tl.load(taps + _TAPS_ROW) * centre
    for d in tl.static_range(1, _MAX_HALF + 1):
        s = tl.load(plane + _reflect(r - d, H) * W + c, mask=m, other=0.0) + \
            tl.load(plane + _reflect(r + d, H) * W + c, mask=m, other=0.0)
        if d <= LO_HALF:
            lo += tl.load(taps + d) * s
        if d <= HI_HALF:
            hi += tl.load(taps + _TAPS_ROW + d) * s
    return lo, hi


@triton.jit
def _store_band(high, o1: tl.constexpr, o2: tl.constexpr, h_o, h_r, band, m, BI: tl.constexpr, BJ: tl.constexpr):
    """A [2 BI, 2 BJ] tile of a band (even first row and column) as its two orientations: per quad
    a b / c d, o1 = (a - d) + i(b + c) and o2 = (a + d) + i(b - c); ``high`` points at the quads'
    (i, j) in the orientation planes."""
    # (i, k, j, l) for row 2i + k and column 2j + l, then k and l last to split them off
    q = tl.permute(tl.reshape(band, [BI, 2, BJ, 2]), [0, 2, 3, 1])
    top, bottom = tl.split(q)
    a, b = tl.split(top)
    c, d = tl.split(bottom)
    e = high.dtype.element_ty
    tl.store(high + o1 * h_o, ((a - d) * _INV_SQRT2).to(e), mask=m)
    tl.store(high + o1 * h_o + h_r, ((b + c) * _INV_SQRT2).to(e), mask=m)
    tl.store(high + o2 * h_o, ((a + d) * _INV_SQRT2).to(e), mask=m)
    tl.store(high + o2 * h_o + h_r, ((b - c) * _INV_SQRT2).to(e), mask=m)


@triton.jit
def _store_low(low, l_h, l_w, wll, w_h, w_w, r, c, v, m, HAS_WLL: tl.constexpr):
    if HAS_WLL:
        v = v * tl.load(wll + r * w_h + c * w_w, mask=m, other=0.0).to(v.dtype)
    tl.store(low + r * l_h + c * l_w, v.to(low.dtype.element_ty), mask=m)


@triton.jit
def _analysis_columns_kernel(scratch, H, W, C, ROWS, taps, low, l_b, l_c, l_h, l_w,
                             high, h_b, h_c, h_o, h_i, h_j, h_r, wll, w_c, w_h, w_w,
                             HAS_WLL: tl.constexpr, LO_HALF: tl.constexpr, HI_HALF: tl.constexpr,
                             BR: tl.constexpr, BC: tl.constexpr):
    """The block of rows g = p H + r of every plane p (BR even, so each quad's two rows share it): the
    four column filterings ll, lh, hl, hh; ll into low (times wll[p % C] with HAS_WLL), the quads of
    the others into the six orientations of high (order 15, 45, 75, 105, 135, 165 degrees: lh first,
    hh first, hl first, hl second, hh second, lh second)."""
    g = tl.program_id(0).to(tl.int64) * BR + tl.arange(0, BR)
    p = (g // H)[:, None]
    r = (g % H)[:, None]
    L = scratch + 2 * p * H * W
    Hh = L + H * W
    low_p = low + (p // C) * l_b + (p % C) * l_c
    wll_p = wll + (p % C) * w_c
    gq = tl.program_id(0).to(tl.int64) * (BR // 2) + tl.arange(0, BR // 2)
    pq = (gq // (H // 2))[:, None]
    hp = high + (pq // C) * h_b + (pq % C) * h_c + (gq % (H // 2))[:, None] * h_i
    for c0 in range(0, W, BC):
        c = (c0 + tl.arange(0, BC))[None, :]
        m = (g < ROWS)[:, None] & (c < W)
        ll, lh = _column_pair(L, r, c, H, W, m, taps, LO_HALF, HI_HALF)
        hl, hh = _column_pair(Hh, r, c, H, W, m, taps, LO_HALF, HI_HALF)
        _store_low(low_p, l_h, l_w, wll_p, w_h, w_w, r, c, ll, m, HAS_WLL)
        j = (c0 // 2 + tl.arange(0, BC // 2))[None, :]
        mq = (gq < ROWS // 2)[:, None] & (j < W // 2)
        _store_band(hp + j * h_j, 0, 5, h_o, h_r, lh, mq, BR // 2, BC // 2)
        _store_band(hp + j * h_j, 2, 3, h_o, h_r, hl, mq, BR // 2, BC // 2)
        _store_band(hp + j * h_j, 1, 4, h_o, h_r, hh, mq, BR // 2, BC // 2)


# ------------------------------------------------------------------------------- synthesis bank
@triton.jit
def _synthesis_quads_kernel(high, h_b, h_c, h_o, h_i, h_j, h_r, C, H, W, ROWS, quads,
                            BI: tl.constexpr, BJ: tl.constexpr, ACC: tl.constexpr):
    """quads[p, 0 / 1 / 2] (contiguous [P, 3, H, W]) = the lh, hl and hh planes rebuilt from their
    orientation pairs (0, 5), (2, 3) and (1, 4), for the block of quad rows g = p H/2 + i of every
    plane p: the quad a b / c d of z1 = p + iq and z2 = u + iv is (p + u, q + v / q - v, u - p) / sqrt(2)."""
    g = tl.program_id(0).to(tl.int64) * BI + tl.arange(0, BI)
    h = H // 2
    w = W // 2
    p = (g // h)[:, None]
    i = (g % h)[:, None]
    src = high + (p // C) * h_b + (p % C) * h_c + i * h_i
    dst = quads + (3 * p * H + 2 * i) * W
    for j0 in range(0, w, BJ):
        j = (j0 + tl.arange(0, BJ))[None, :]
        m = (g < ROWS)[:, None] & (j < w)
        for band in tl.static_range(3):
            # lh, hl, hh: orientations (0, 5), (2, 3), (1, 4)
            o1 = (2 * band) % 3
            o2 = 5 - o1
            z = src + j * h_j
            re1 = tl.load(z + o1 * h_o, mask=m, other=0.0).to(ACC)
            im1 = tl.load(z + o1 * h_o + h_r, mask=m, other=0.0).to(ACC)
            re2 = tl.load(z + o2 * h_o, mask=m, other=0.0).to(ACC)
            im2 = tl.load(z + o2 * h_o + h_r, mask=m, other=0.0).to(ACC)
            q = dst + band * H * W + 2 * j
            tl.store(q, (re1 + re2) * _INV_SQRT2, mask=m)
            tl.store(q + 1, (im1 + im2) * _INV_SQRT2, mask=m)
            tl.store(q + W, (im1 - im2) * _INV_SQRT2, mask=m)
            tl.store(q + W + 1, (re2 - re1) * _INV_SQRT2, mask=m)


@triton.jit
def _column_sum(a, a_h, a_w, b, b_h, b_w, r, c, H, m, taps, LO_HALF: tl.constexpr, HI_HALF: tl.constexpr,
                ACC: tl.constexpr):
    """Plane a's columns filtered with the lowpass plus plane b's with the highpass, at rows r and
    columns c (both planes H rows high, read through their row and column strides)."""
    y = tl.load(taps) * tl.load(a + r * a_h + c * a_w, mask=m, other=0.0).to(ACC) + \
        tl.load(taps + _TAPS_ROW) * tl.load(b + r * b_h + c * b_w, mask=m, other=0.0).to(ACC)
    for d in tl.static_range(1, LO_HALF + 1):
        y += tl.load(taps + d) * (tl.load(a + _reflect(r - d, H) * a_h + c * a_w, mask=m, other=0.0).to(ACC) +
                                  tl.load(a + _reflect(r + d, H) * a_h + c * a_w, mask=m, other=0.0).to(ACC))
    for d in tl.static_range(1, HI_HALF + 1):
        y += tl.load(taps + _TAPS_ROW + d) * (
            tl.load(b + _reflect(r - d, H) * b_h + c * b_w, mask=m, other=0.0).to(ACC) +
            tl.load(b + _reflect(r + d, H) * b_h + c * b_w, mask=m, other=0.0).to(ACC))
    return y


@triton.jit
def _synthesis_columns_kernel(low, l_b, l_c, l_h, l_w, quads, C, H, W, ROWS, taps, scratch,
                              LO_HALF: tl.constexpr, HI_HALF: tl.constexpr, BR: tl.constexpr,
                              BC: tl.constexpr, ACC: tl.constexpr):
    """For the block of rows g = p H + r of every plane p: scratch[p, 0, r, :] = ll + lh and
    scratch[p, 1, r, :] = hl + hh, each column-filtered, ll and hl with the lowpass (ll is the
    lowpass input, read through its strides; the others are the planes in quads)."""
    g = tl.program_id(0).to(tl.int64) * BR + tl.arange(0, BR)
    p = (g // H)[:, None]
    r = (g % H)[:, None]
    lp = low + (p // C) * l_b + (p % C) * l_c
    lh = quads + 3 * p * H * W
    out = scratch + (2 * p * H + r) * W
    for c0 in range(0, W, BC):
        c = (c0 + tl.arange(0, BC))[None, :]
        m = (g < ROWS)[:, None] & (c < W)
        lo = _column_sum(lp, l_h, l_w, lh, W, 1, r, c, H, m, taps, LO_HALF, HI_HALF, ACC)
        hi = _column_sum(lh + H * W, W, 1, lh + 2 * H * W, W, 1, r, c, H, m, taps, LO_HALF, HI_HALF, ACC)
        tl.store(out + c, lo, mask=m)
        tl.store(out + H * W + c, hi, mask=m)


@triton.jit
def _synth_row(lo, hi, r, c, W, m, taps, LO_HALF: tl.constexpr, HI_HALF: tl.constexpr):
    """lo's row r filtered with the lowpass plus hi's row r with the highpass (both contiguous W-wide
    planes), at columns c, over the rows' extensions."""
    y = tl.load(taps) * tl.load(lo + r * W + c, mask=m, other=0.0) + \
        tl.load(taps + _TAPS_ROW) * tl.load(hi + r * W + c, mask=m, other=0.0)
    for d in tl.static_range(1, LO_HALF + 1):
        y += tl.load(taps + d) * (tl.load(lo + r * W + _reflect(c - d, W), mask=m, other=0.0) +
                                  tl.load(lo + r * W + _reflect(c + d, W), mask=m, other=0.0))
    for d in tl.static_range(1, HI_HALF + 1):
        y += tl.load(taps + _TAPS_ROW + d) * (tl.load(hi + r * W + _reflect(c - d, W), mask=m, other=0.0) +
                                              tl.load(hi + r * W + _reflect(c + d, W), mask=m, other=0.0))
    return y


@triton.jit
def _synthesis_rows_kernel(scratch, H, W, C, ROWS, taps, out, o_b, o_c, o_h, o_w, OUT_H, OUT_W,
                           FOLD_H: tl.constexpr, FOLD_W: tl.constexpr, LO_HALF: tl.constexpr,
                           HI_HALF: tl.constexpr, BR: tl.constexpr, BC: tl.constexpr):
    """Output rows g = p OUT_H + r of every plane p, into out[p // C, p % C, r, :] through its strides,
    from the column-filtered rows in scratch. With FOLD_H (FOLD_W) the output is one row (column)
    short of the H x W synthesis, the adjoint of repeating the input's last row (column): synthesized
    row H - 1 is added into row H - 2, in the CPU kernel's order (rows first, then columns)."""
    g = tl.program_id(0).to(tl.int64) * BR + tl.arange(0, BR)
    p = (g // OUT_H)[:, None]
    r = (g % OUT_H)[:, None]
    gm = (g < ROWS)[:, None]
    lo = scratch + 2 * p * H * W
    hi = lo + H * W
    dst = out + (p // C) * o_b + (p % C) * o_c + r * o_h
    last_r = r * 0 + (H - 1)
    last_c = tl.zeros([1, 1], dtype=tl.int32) + (W - 1)
    fold_r = r == H - 2
    for c0 in range(0, OUT_W, BC):
        c = (c0 + tl.arange(0, BC))[None, :]
        m = gm & (c < OUT_W)
        y = _synth_row(lo, hi, r, c, W, m, taps, LO_HALF, HI_HALF)
        if FOLD_H:
            y = tl.where(fold_r, y + _synth_row(lo, hi, last_r, c, W, m, taps, LO_HALF, HI_HALF), y)
        if FOLD_W:
            yc = _synth_row(lo, hi, r, last_c, W, gm, taps, LO_HALF, HI_HALF)
            if FOLD_H:
                yc = tl.where(fold_r, yc + _synth_row(lo, hi, last_r, last_c, W, gm, taps, LO_HALF, HI_HALF), yc)
            y = tl.where(c == W - 2, y + yc, y)
        tl.store(dst + c * o_w, y.to(out.dtype.element_ty), mask=m)


# ------------------------------------------------------------------------------- SVT's block MLP
@triton.jit
def _block_mlp_kernel(z, z_b, z_c, z_o, z_i, z_j, z_r, NPOS, hw, w, bs,
                      w1, w1_0, w1_1, w1_2, w1_3, b1, b1_0, b1_1, b1_2,
                      w2, w2_0, w2_1, w2_2, w2_3, b2, b2_0, b2_1, b2_2,
                      BP: tl.constexpr, BS: tl.constexpr, ACC: tl.constexpr):
    """In place on the highpass z [B, C, 6, h, w, 2] (through its strides), for positions (o, i, j) of
    block program_id(0), image program_id(1), channel block n = program_id(2) of bs channels:
    layer 1 (zr + i zi)(W1r + i W1i) + (b1r + i b1i), ReLU on the real and imaginary parts, layer 2
    the same with W2, b2 and no ReLU. Layer 1 is formed one output channel d at a time (a reduction
    over the block's channels), which is at once the rank-one update of layer 2's accumulators, so
    only [BP, BS] tiles are held."""
    pos = tl.program_id(0) * BP + tl.arange(0, BP)
    b = tl.program_id(1).to(tl.int64)
    n = tl.program_id(2)
    o = pos // hw
    i = (pos % hw) // w
    j = pos % w
    k = tl.arange(0, BS)
    km = k < bs
    m = (pos < NPOS)[:, None] & km[None, :]
    ptr = z + b * z_b + (o * z_o + i * z_i + j * z_j)[:, None] + (n * bs + k)[None, :] * z_c
    zr = tl.load(ptr, mask=m, other=0.0)
    zi = tl.load(ptr + z_r, mask=m, other=0.0)
    yr = tl.zeros([BP, BS], dtype=ACC) + tl.load(b2 + n * b2_1 + k * b2_2, mask=km, other=0.0).to(ACC)[None, :]
    yi = tl.zeros([BP, BS], dtype=ACC) + tl.load(b2 + b2_0 + n * b2_1 + k * b2_2, mask=km, other=0.0).to(ACC)[None, :]
    w1p = w1 + n * w1_1 + k * w1_2
    w2p = w2 + n * w2_1 + k * w2_3
    for d in range(0, bs):
        # column d of the block's layer-1 weights, over the input channels k
        ar = tl.load(w1p + d * w1_3, mask=km, other=0.0).to(ACC)[None, :]
        ai = tl.load(w1p + w1_0 + d * w1_3, mask=km, other=0.0).to(ACC)[None, :]
        hr = tl.load(b1 + n * b1_1 + d * b1_2).to(ACC) + tl.sum(zr * ar - zi * ai, axis=1)
        hi = tl.load(b1 + b1_0 + n * b1_1 + d * b1_2).to(ACC) + tl.sum(zr * ai + zi * ar, axis=1)
        # max(v, 0) that keeps a NaN, as torch.relu and the CPU kernel do
        hr = tl.where(hr < 0, 0.0, hr)[:, None]
        hi = tl.where(hi < 0, 0.0, hi)[:, None]
        # row d of layer 2's weights, over the output channels k
        cr = tl.load(w2p + d * w2_2, mask=km, other=0.0).to(ACC)[None, :]
        ci = tl.load(w2p + w2_0 + d * w2_2, mask=km, other=0.0).to(ACC)[None, :]
        yr += hr * cr - hi * ci
        yi += hr * ci + hi * cr
    tl.store(ptr, yr.to(z.dtype.element_ty), mask=m)
    tl.store(ptr + z_r, yi.to(z.dtype.element_ty), mask=m)


# ------------------------------------------------------------------------------- launchers
_INTERPRETED = is_interpreted(_analysis_rows_kernel)


@functools.lru_cache(maxsize=16)
def _bank(synthesis_filters: bool, device: torch.device, dtype: torch.dtype):
    """(taps [2, _TAPS_ROW]: the lowpass' then the highpass' centre and side taps, zero-padded, in the
    accumulation type; the two half-lengths). analysis: (h0, h1); synthesis: (g0, g1)."""
    filters = (G0, G1) if synthesis_filters else (H0, H1)
    table = torch.zeros(2, _TAPS_ROW.value, dtype=torch.float64)
    for row, f in enumerate(filters):
        half = len(f) // 2
        table[row, :half + 1] = torch.tensor(f[half:], dtype=torch.float64)
    return table.to(dtype).to(device), len(filters[0]) // 2, len(filters[1]) // 2


def _tile(n: int, most: int) -> int:
    if _INTERPRETED:
        most = max(most, 256)
    return min(triton.next_power_of_2(max(n, 1)), most)


def _rows_tile(rows: int, most: int = 16) -> int:
    """Rows of all planes (plane-major) per program: the interpreter pays per operation, not per
    element, so it takes them in large blocks."""
    return _tile(rows, 256 if _INTERPRETED else most)


def _workspace(t: torch.Tensor, synthesis_filters: bool, planes: int, H: int, W: int, *counts: int):
    """The bank's taps and half-lengths in t's accumulation type, and a scratch [planes, n, H, W] of that
    type for each n in counts."""
    acc = _acc_torch(t.dtype)
    taps, lo_half, hi_half = _bank(synthesis_filters, t.device, acc)
    return taps, lo_half, hi_half, [torch.empty((planes, n, H, W), dtype=acc, device=t.device) for n in counts]


def _analysis(x: torch.Tensor, synthesis_filters: bool, low: torch.Tensor, high: torch.Tensor,
              weight_ll: Optional[torch.Tensor] = None) -> None:
    """The analysis bank of every plane of x [B, C, H0, W0] (odd sides padded by repeating the last row /
    column) into low [B, C, H, W] and high [B, C, 6, H/2, W/2, 2], written through their strides;
    low is multiplied by weight_ll [C, H, W] if given."""
    B, C, H0, W0 = x.shape
    H, W = low.shape[2], low.shape[3]
    if B * C == 0:
        return
    taps, lo_half, hi_half, (scratch,) = _workspace(x, synthesis_filters, B * C, H, W, 2)
    planes = B * C
    wll = weight_ll if weight_ll is not None else taps
    w_strides = weight_ll.stride() if weight_ll is not None else (0, 0, 0)
    BR, BC = _rows_tile(planes * H), _tile(W, 64)
    with device_ctx(x):
        launcher(_analysis_rows_kernel)[(triton.cdiv(planes * H, BR),)](
            x, *x.stride(), C, H0, W0, H, W, planes * H, taps, scratch,
            LO_HALF=lo_half, HI_HALF=hi_half, BR=BR, BC=BC, ACC=_acc(x.dtype))
        launcher(_analysis_columns_kernel)[(triton.cdiv(planes * H, BR),)](
            scratch, H, W, C, planes * H, taps, low, *low.stride(), high, *high.stride(), wll, *w_strides,
            HAS_WLL=weight_ll is not None, LO_HALF=lo_half, HI_HALF=hi_half, BR=BR, BC=BC)


def _synthesis(low: torch.Tensor, high: torch.Tensor, synthesis_filters: bool, out: torch.Tensor) -> None:
    """The synthesis bank of low [B, C, H, W] and high [B, C, 6, H/2, W/2, 2] into out [B, C, OUT_H, OUT_W]
    through its strides, OUT_H in {H - 1, H} (the fold of the odd-size padding) and the same for OUT_W."""
    B, C, H, W = low.shape
    out_h, out_w = out.shape[2], out.shape[3]
    if B * C == 0:
        return
    taps, lo_half, hi_half, (quads, scratch) = _workspace(low, synthesis_filters, B * C, H, W, 3, 2)
    planes = B * C
    BR, BC, BI, BJ = _rows_tile(planes * H), _tile(W, 64), _rows_tile(planes * H // 2), _tile(W // 2, 32)
    with device_ctx(low):
        launcher(_synthesis_quads_kernel)[(triton.cdiv(planes * H // 2, BI),)](
            high, *high.stride(), C, H, W, planes * H // 2, quads, BI=BI, BJ=BJ, ACC=_acc(low.dtype))
        launcher(_synthesis_columns_kernel)[(triton.cdiv(planes * H, BR),)](
            low, *low.stride(), quads, C, H, W, planes * H, taps, scratch,
            LO_HALF=lo_half, HI_HALF=hi_half, BR=BR, BC=BC, ACC=_acc(low.dtype))
        launcher(_synthesis_rows_kernel)[(triton.cdiv(planes * out_h, BR),)](
            scratch, H, W, C, planes * out_h, taps, out, *out.stride(), out_h, out_w,
            FOLD_H=out_h < H, FOLD_W=out_w < W, LO_HALF=lo_half, HI_HALF=hi_half, BR=BR, BC=BC)


def _transform_outputs(t: torch.Tensor, H: int, W: int, dtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor]:
    B, C = t.shape[:2]
    return (torch.empty((B, C, H, W), dtype=dtype, device=t.device),
            torch.empty((B, C, 6, H // 2, W // 2, 2), dtype=dtype, device=t.device))


def dtcwt2d(x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    low, high = _transform_outputs(x, x.shape[2] + x.shape[2] % 2, x.shape[3] + x.shape[3] % 2, x.dtype)
    _analysis(x, False, low, high)
    return low, high


def idtcwt2d_backward(grad_output: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    low, high = _transform_outputs(grad_output, grad_output.shape[2], grad_output.shape[3], grad_output.dtype)
    _analysis(grad_output, True, low, high)
    return low, high


def idtcwt2d(lowpass: torch.Tensor, highpass: torch.Tensor) -> torch.Tensor:
    out = torch.empty(lowpass.shape, dtype=lowpass.dtype, device=lowpass.device)
    _synthesis(lowpass, highpass, True, out)
    return out


def dtcwt2d_backward(grad_lowpass: torch.Tensor, grad_highpass: torch.Tensor,
                     input_size: Sequence[int]) -> torch.Tensor:
    B, C = grad_lowpass.shape[:2]
    out = torch.empty((B, C, int(input_size[0]), int(input_size[1])), dtype=grad_lowpass.dtype,
                      device=grad_lowpass.device)
    _synthesis(grad_lowpass, grad_highpass, False, out)
    return out


def svt_spectral_mix(x: torch.Tensor, weight_ll: torch.Tensor, weight_1: torch.Tensor, bias_1: torch.Tensor,
                     weight_2: torch.Tensor, bias_2: torch.Tensor) -> torch.Tensor:
    B, H, W, C = x.shape
    out = torch.empty((B, H, W, C), dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    nb, bs = weight_1.shape[1], weight_1.shape[2]
    acc = _acc_torch(x.dtype)
    h, w = H // 2, W // 2
    low = torch.empty((B, C, H, W), dtype=acc, device=x.device)
    # position-major, so that the MLP reads each position's channel block contiguously
    high = torch.empty((B, 6, h, w, C, 2), dtype=acc, device=x.device).permute(0, 4, 1, 2, 3, 5)
    _analysis(x.permute(0, 3, 1, 2), False, low, high, weight_ll)
    npos = 6 * h * w
    BS = triton.next_power_of_2(bs)
    BP = _tile(npos, max(1, 2048 // BS))
    with device_ctx(x):
        launcher(_block_mlp_kernel)[(triton.cdiv(npos, BP), B, nb)](
            high, *high.stride(), npos, h * w, w, bs, weight_1, *weight_1.stride(), bias_1, *bias_1.stride(),
            weight_2, *weight_2.stride(), bias_2, *bias_2.stride(), BP=BP, BS=BS, ACC=_acc(x.dtype))
    _synthesis(low, high, True, out.permute(0, 3, 1, 2))
    return out


def _real_form(w: torch.Tensor) -> torch.Tensor:
    """[2, nb, bs, bs] (real, imaginary) -> [nb, 2 bs, 2 bs] = [[Wr, Wi], [-Wi, Wr]]: z (Wr + i Wi) as
    the real product [re | im] times it."""
    re, im = w[0], w[1]
    return torch.cat([torch.cat([re, im], 2), torch.cat([-im, re], 2)], 1)


def _fold_real_form(g: torch.Tensor, bs: int) -> torch.Tensor:
    """The gradient of a real form back to [2, nb, bs, bs]: Wr appears twice, Wi once with each sign."""
    return torch.stack([g[:, :bs, :bs] + g[:, bs:, bs:], g[:, :bs, bs:] - g[:, bs:, :bs]])


def svt_spectral_mix_backward(grad_output: torch.Tensor, x: torch.Tensor, weight_ll: torch.Tensor,
                              weight_1: torch.Tensor, bias_1: torch.Tensor, weight_2: torch.Tensor,
                              bias_2: torch.Tensor) -> Tuple[torch.Tensor, ...]:
    B, H, W, C = x.shape
    nb, bs = weight_1.shape[1], weight_1.shape[2]
    h, w = H // 2, W // 2
    acc = _acc_torch(x.dtype)
    low, high = dtcwt2d(x.permute(0, 3, 1, 2).to(acc))
    g_low, g_high = idtcwt2d_backward(grad_output.permute(0, 3, 1, 2).to(acc))

    def blocks(t):  # [B, C, 6, h, w, 2] -> [nb, B 6 h w, 2 bs], each block's (re | im) row
        t = t.permute(0, 2, 3, 4, 1, 5).reshape(-1, nb, bs, 2).transpose(2, 3)
        return t.reshape(-1, nb, 2 * bs).transpose(0, 1)

    z, gy = blocks(high), blocks(g_high)
    r1, r2 = _real_form(weight_1.to(acc)), _real_form(weight_2.to(acc))
    b1 = bias_1.to(acc).permute(1, 0, 2).reshape(nb, 1, 2 * bs)
    pre = torch.baddbmm(b1, z, r1)
    g_r2 = torch.bmm(pre.relu().transpose(1, 2), gy)
    # The ReLU's gradient as a product with its 0/1 mask, so a NaN gradient stays NaN where it is cut.
    g_pre = torch.bmm(gy, r2.transpose(1, 2)) * (pre > 0)
    g_r1 = torch.bmm(z.transpose(1, 2), g_pre)
    g_z = torch.bmm(g_pre, r1.transpose(1, 2))
    g_z = g_z.transpose(0, 1).reshape(B, 6, h, w, nb, 2, bs).transpose(5, 6).reshape(B, 6, h, w, C, 2)
    g_x = dtcwt2d_backward(g_low * weight_ll.to(acc), g_z.permute(0, 4, 1, 2, 3, 5), [H, W])
    bias_grad = lambda g, like: g.reshape(nb, 2, bs).transpose(0, 1).to(like.dtype).contiguous()  # noqa: E731
    return (g_x.permute(0, 2, 3, 1).to(x.dtype).contiguous(),
            (g_low * low).sum(0).to(weight_ll.dtype),
            _fold_real_form(g_r1, bs).to(weight_1.dtype).contiguous(),
            bias_grad(g_pre.sum(1), bias_1),
            _fold_real_form(g_r2, bs).to(weight_2.dtype).contiguous(),
            bias_grad(gy.sum(1), bias_2))
