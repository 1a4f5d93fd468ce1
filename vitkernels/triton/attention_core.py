"""The shared Triton attention core: one online-softmax loop, many score modifiers.

Every attention family of the package (shifted windows, packed variable-length segments, and later
polyline, decay, Gaussian-mixture and strip/reduced attention) is the same algorithm: a program owns
BLOCK_M queries of one (group, head), where a group is a window or a segment, sweeps the group's keys
BLOCK_N at a time with a running max and sum in fp32 (flash attention), and adds to every score a
term that the family computes on the fly. Only the log-sum-exp is saved for the backward pass,
never the probability matrix. Families differ in two places, each a small @triton.jit helper that
dispatches on the `KIND` constexpr (so a launch compiles only its own branch):

    _group_extent  where the group's tokens are and how many queries / keys it has
    _tokens        the coordinates (i0, i1, i2) of token t of a group, and whether it is present;
                   tensors are addressed as i0*s0 + i1*s1 + i2*s2 + head*s_head + d*s_dim, so any
                   strided view (a slice of a packed qkv tensor) is read in place, never copied
    _score_mod     adds the kind's term for (query i, key j) to a tile of scores; scores are kept in
                   log2 units, so a natural-log term is scaled by log2(e) on the way in

Kinds today:
    WINDOW   a group is one window of one image; i0, i1, i2 = (batch, row, column) of the image;
             the modifier is the relative-position bias gathered from the [(2wh-1)(2ww-1), heads]
             table plus timm's -100 shifted-window region mask; padded positions are absent.
    VARLEN   a group is one segment [cu_seqlens[s], cu_seqlens[s+1]) of packed tokens; i2 is the
             packed row; no modifier, keys outside the segment are absent.
    POLYLINE a group is one image, tokens (b, i, j) row-major; the modifier is PPMA's polyline log
             mask, the sum of log_alpha along row i1 between columns j1 and j2 plus that of log_beta
             down column j2 between rows i1 and i2, each a segment sum (_segment) from O(N) prefix
             tables TA (rows of log_alpha) and TC (columns of log_beta) and their non-finite counts
             KA, KC; TRANSPOSE makes the path start at the key instead (logM^T, the symmetric
             form's second pass).
    AXIAL    a group is one line (row) of one image, tokens (b, line, t); the launcher swaps the
             image axes' strides for attention along columns; the mask is the 1-D segment sum of
             the decay along the line (tables TA, KA).
    GAUSS    a group is one image; multiplicative: the raw score times G_h(|dy|, |dx|) from a
             [heads, H, W] table (TA); the backward turns dS into dS * G and dG += dS * raw.
    DENSE    a group is one batch element of [B, N, heads, d] tensors, NQ queries against NK keys
             (reduced attention); no modifier.
Passes: besides the online-softmax forward (_attn_fwd) and the backward, _attn_fwd_quant is the
two-pass forward of quantized attention (quant_attention): the same programs and geometry helpers,
int8 q, k, v (fake-quant codes with zero points, exact integer q.k via tl.dot on int8 into int32),
pass 1 for the row max and softmax denominator, pass 2 quantizing every probability on a log grid
(one fused multiply-add per key, a 2^bits-entry table) and accumulating P^ v^, not renormalized.
It takes any kind's geometry (DENSE today); score modifiers are not applied in it.
A new kind adds a branch to the three helpers (and, if it needs them, arguments to the kernels,
which the other kinds pass as 0 or a dummy tensor). Head dims need not be powers of two and the
query/key dim may differ from the value dim: both are padded to powers of two >= 16 (tl.dot's
minimum) with masked loads, so a key dim of 1 works too.

Numerics: scores live in the log2 domain (scale * log2(e) folded into one multiply, exp2 on the
hardware's native unit); the saved lse is the natural log, fp32. fp16/bf16 inputs go to the tensor
cores with fp32 accumulation, P cast to the value dtype as in flash attention. fp32 inputs use
tl.dot(input_precision="ieee"), exact fp32 products on the FMA units: several times slower than the
tensor cores on Hopper, but it matches the reference to ~1e-6, which is what the tests hold fp32 to.
FP32_EXACT = False below switches fp32 to TF32 tensor-core dots (errors ~1e-3, tests must loosen).

Backward: the standard two-kernel scheme, deterministic for dq, dk, dv:
    _attn_bwd_preprocess  Drow = rowsum(dO * O), per query, fp32, in the lse layout
    _attn_bwd_dkdv        a program owns BLOCK_N keys and loops over the group's query blocks,
                          recomputing P = exp(S - lse), accumulating dV = P^T dO and dK = dS^T Q
    _attn_bwd_dq          a program owns BLOCK_M queries and loops over key blocks, accumulating
                          dQ = dS K; with BIAS_GRAD it also adds the modifier's parameter
                          gradients atomically into fp32 buffers: WINDOW dS into [replicas, heads,
                          N, N] that the launcher reduces to the table; POLYLINE / AXIAL +-sgn dS
                          into the prefix tables' gradients (per-query terms summed over the key
                          loop first, per-key terms over the tile); GAUSS dS * raw into dG.
Recomputing S in both kernels costs one extra QK^T against an atomic dQ; for window groups (N <=
~256 tokens) that is cheap, and the results do not depend on scheduling.
"""
import functools
import math
import struct

import torch
import triton
import triton.language as tl

from ._launch import device_ctx, is_interpreted, launcher

# Modifier kinds. Plain ints for the launchers, constexpr twins for the kernels.
WINDOW = 1
VARLEN = 2
POLYLINE = 3
AXIAL = 4
GAUSS = 5
DENSE = 6
_WINDOW = tl.constexpr(WINDOW)
_VARLEN = tl.constexpr(VARLEN)
_POLYLINE = tl.constexpr(POLYLINE)
_AXIAL = tl.constexpr(AXIAL)
_GAUSS = tl.constexpr(GAUSS)
_DENSE = tl.constexpr(DENSE)

_LOG2E = tl.constexpr(1.4426950408889634)
_LN2 = tl.constexpr(0.6931471805599453)
# timm's shifted-window mask value. Not -inf: pairs across regions keep a relative weight of ~e^-100,
# exactly as in timm (and the reference), and no row can be left with nothing to normalize.
_REGION_MASK = tl.constexpr(-100.0)
# Decay tables count -inf, +inf and NaN cells in three fields of one int64 (lines under 2^21 cells).
COUNT_BITS = 21
_COUNT_BITS = tl.constexpr(COUNT_BITS)
_COUNT_MASK = tl.constexpr((1 << COUNT_BITS) - 1)


# ------------------------------------------------------------------------ per-kind helpers
@triton.jit
def _group_extent(KIND: tl.constexpr, g, SEQ, H, W, NQ, NK, WH: tl.constexpr, WW: tl.constexpr):
    """(first packed row, number of queries, number of keys) of group g."""
    start64 = tl.zeros([], dtype=tl.int64)
    if KIND == _VARLEN:
        start = tl.load(SEQ + g)
        n = tl.load(SEQ + g + 1) - start
        start64 = start.to(tl.int64)
        n_q = n
        n_k = n
    elif KIND == _POLYLINE or KIND == _GAUSS:
        # The whole H x W image is one group.
        n_q = H * W
        n_k = H * W
    elif KIND == _AXIAL:
        # One line of W tokens (the launcher transposes the view for attention along columns).
        n_q = W
        n_k = W
    elif KIND == _DENSE:
        n_q = NQ
        n_k = NK
    else:
        # WINDOW: tokens are found from window coordinates, the group starts nowhere in particular.
        start64 = tl.zeros([], dtype=tl.int64)
        n_q = WH * WW
        n_k = WH * WW
    return start64, n_q, n_k


@triton.jit
def _window_coords(g, t, NWX, NW, WH: tl.constexpr, WW: tl.constexpr):
    """(batch, y', x') of in-window position t of window group g, on the padded (unshifted) grid."""
    b = g // NW
    w = g - b * NW
    wy = w // NWX
    wx = w - wy * NWX
    yp = wy * WH + t // WW
    xp = wx * WW + t % WW
    return b, yp, xp


@triton.jit
def _tokens(KIND: tl.constexpr, g, t, n, start, H, W, SH, SW, NWX, NW,
            WH: tl.constexpr, WW: tl.constexpr):
    """Coordinates (i0, i1, i2) and presence of the tokens at positions t (a vector) of group g."""
    if KIND == _VARLEN:
        present = t < n
        i0 = t * 0
        i1 = t * 0
        i2 = start + t
    elif KIND == _POLYLINE or KIND == _GAUSS:
        present = t < n
        i0 = t * 0 + g
        i1 = t // W
        i2 = t % W
    elif KIND == _AXIAL:
        # Group g is line g % H of image g // H; i1 indexes lines, i2 the position along the line.
        present = t < n
        i0 = t * 0 + g // H
        i1 = t * 0 + g % H
        i2 = t
    elif KIND == _DENSE:
        present = t < n
        i0 = t * 0 + g
        i1 = t * 0
        i2 = t
    else:
        b, yp, xp = _window_coords(g, t, NWX, NW, WH, WW)
        # Positions past the image on the padded grid are absent: no key weight, no output.
        present = (t < WH * WW) & (yp < H) & (xp < W)
        i0 = t * 0 + b
        # The cyclic shift is folded into the addressing: window row y' reads image row y' + sh.
        i1 = (yp + SH) % H
        i2 = (xp + SW) % W
    return i0, i1, i2, present


@triton.jit
def _offsets(i0, i1, i2, s0, s1, s2):
    return i0.to(tl.int64) * s0 + i1.to(tl.int64) * s1 + i2.to(tl.int64) * s2


@triton.jit
def _load_rows(X, i0, i1, i2, s0, s1, s2, s_h, s_d, head, cols, n_cols, present):
    """The [tokens, cols] tile of one head of X at the tokens' coordinates; absent tokens and the
    columns past n_cols (head-dim padding) read 0."""
    return tl.load(X + _offsets(i0, i1, i2, s0, s1, s2)[:, None] + head * s_h + cols[None, :] * s_d,
                   mask=present[:, None] & (cols < n_cols)[None, :], other=0.0)


@triton.jit
def _store_rows(X, i0, i1, i2, s0, s1, s2, s_h, s_d, head, cols, n_cols, present, tile):
    """Stores a [tokens, cols] tile where _load_rows reads it, in X's dtype."""
    tl.store(X + _offsets(i0, i1, i2, s0, s1, s2)[:, None] + head * s_h + cols[None, :] * s_d,
             tile.to(X.dtype.element_ty), mask=present[:, None] & (cols < n_cols)[None, :])


@triton.jit
def _window_region(p, T1, T2):
    # timm's three slices per axis: [0, Hp-wh), [Hp-wh, Hp-sh), [Hp-sh, Hp). With no shift along the
    # axis the launcher passes T1 = T2 = Hp, which makes the whole axis region 0.
    return (p >= T1).to(tl.int32) + (p >= T2).to(tl.int32)


@triton.jit
def _window_score_mod(s, qi, kj, g, head, BIAS, s_bias_r, s_bias_h, NWX, NW, TY1, TY2, TX1, TX2,
                      HAS_BIAS: tl.constexpr, SHIFTED: tl.constexpr,
                      WH: tl.constexpr, WW: tl.constexpr):
    """s (log2 units) + relative-position bias + region mask, for in-window positions qi, kj.

    qi and kj are broadcastable index tensors ([M, 1] and [1, N], or transposed), so one helper
    serves the forward ([queries, keys] tiles) and the dK/dV kernel ([keys, queries] tiles).
    """
    N: tl.constexpr = WH * WW
    if HAS_BIAS:
        # The table row is separable, (ri - rj + wh-1)(2ww-1) + (ci - cj + ww-1) = a_i - b_j, so the
        # index arithmetic stays on the [M, 1] and [1, N] operands and the full tile pays one
        # subtraction. Positions past N (tile padding) are clamped into the window instead of
        # masked: their scores are discarded anyway, and the load needs no 2-D mask.
        qc = tl.minimum(qi, N - 1)
        kc = tl.minimum(kj, N - 1)
        a = (qc // WW) * (2 * WW - 1) + qc % WW + ((WH - 1) * (2 * WW - 1) + (WW - 1))
        b = (kc // WW) * (2 * WW - 1) + kc % WW
        # int32 offsets (the table is tiny): the compiler hoists the loop-invariant broadcast of
        # the query half out of the key loop and keeps it live in registers; 32-bit lanes rather
        # than 64-bit pointers halve that cost (ptxas: 92 bytes of spills gone for 12x12 windows).
        bias = tl.load(BIAS + head * s_bias_h + (a * s_bias_r - b * s_bias_r))
        s = s + bias.to(tl.float32) * _LOG2E
    if SHIFTED:
        _, yq, xq = _window_coords(g, qi, NWX, NW, WH, WW)
        _, yk, xk = _window_coords(g, kj, NWX, NW, WH, WW)
        rq = _window_region(yq, TY1, TY2) * 3 + _window_region(xq, TX1, TX2)
        rk = _window_region(yk, TY1, TY2) * 3 + _window_region(xk, TX1, TX2)
        s = s + tl.where(rq != rk, _REGION_MASK * _LOG2E, 0.0)
    return s


@triton.jit
def _sgn(x):
    return (x > 0).to(tl.float32) - (x < 0).to(tl.float32)


@triton.jit
def _grid_pos(t, W, n):
    # Tile padding (t >= n) is clamped onto the last token: its scores are discarded anyway, and the
    # table gathers then need no 2-D mask.
    tc = tl.minimum(t, n - 1)
    return tc // W, tc % W


@triton.jit
def _polyline_corners(qi, kj, H, W, TRANSPOSE: tl.constexpr):
    """(a1, b1, a2, b2): the path's start token (a1, b1) and end token (a2, b2).

    logM[(a1,b1),(a2,b2)] runs along row a1 from column b1 to b2, then down column b2 from row a1 to
    a2. The plain mask starts at the query; its transpose (PPMA's second direction) at the key.
    """
    n = H * W
    iq, jq = _grid_pos(qi, W, n)
    ik, jk = _grid_pos(kj, W, n)
    if TRANSPOSE:
        a1, b1, a2, b2 = ik, jk, iq, jq
    else:
        a1, b1, a2, b2 = iq, jq, ik, jk
    return a1, b1, a2, b2


@triton.jit
def _split_word(w):
    """The (hi, lo) fp32 halves of a packed double-float prefix entry (see segment_tables)."""
    hi = (w >> 32).to(tl.int32).to(tl.float32, bitcast=True)
    lo = w.to(tl.int32).to(tl.float32, bitcast=True)
    return hi, lo


@triton.jit
def _segment(T, K, NF, off_a, off_b, sgn):
    """The sum of a line's decays over (min(a, b), max(a, b)], from the entries of positions a and b
    (table offsets off_a, off_b, any broadcastable shapes) and sgn = sgn(a - b).

    T holds the prefix of the finite decays as double-float pairs: the difference of two entries
    loses nothing to cells before min(a, b), however large (a -1e6 there costs ~1e-8, not 0.03 as
    an fp32 prefix would). Non-finite cells count 0 there and are counted in K instead (exact
    integer prefixes of -inf, +inf and NaN cells, packed); K is read only when the launcher's flag
    NF says some cell is non-finite, so finite decays pay a few integer ops per pair for it.
    """
    ha, la = _split_word(tl.load(T + off_a))
    hb, lb = _split_word(tl.load(T + off_b))
    seg = sgn * ((ha - hb) + (la - lb))
    # Masked by a uniform flag rather than branched on: a data-dependent branch inside the key loop
    # cost the polyline kernels up to 14 KB of spills (ptxas, sm_90); predicated-off loads cost none.
    nf = tl.load(NF)
    # off * 0 + nf only gives the flag the offsets' shape (the interpreter wants a full bool mask).
    ka = tl.load(K + off_a, mask=(off_a * 0 + nf) != 0, other=0)
    kb = tl.load(K + off_b, mask=(off_b * 0 + nf) != 0, other=0)
    c = tl.abs(ka - kb)
    neg = (c & _COUNT_MASK) != 0
    pos = ((c >> _COUNT_BITS) & _COUNT_MASK) != 0
    nan = (c >> (2 * _COUNT_BITS)) != 0
    # -inf + inf is NaN, as the sum over a path holding both is.
    seg = seg + (tl.where(neg, float("-inf"), 0.0) + tl.where(pos, float("inf"), 0.0))
    seg = tl.where(nan, float("nan"), seg)
    return seg


@triton.jit
def _polyline_logm(qi, kj, g, head, TA, TC, KA, KC, NF, s_t0, s_t1, s_t2, s_th, H, W,
                   TRANSPOSE: tl.constexpr):
    """The natural-log polyline mask: the row segment of log_alpha along row a1 between columns b1
    and b2, plus the column segment of log_beta down column b2 between rows a1 and a2.

    Of the four table reads, (a1, b1) depends on the path's start only and (a2, b2) on its end
    (vectors); the two at (a1, b2) are real 2-D gathers from O(N) tables that sit in L1/L2.
    """
    a1, b1, a2, b2 = _polyline_corners(qi, kj, H, W, TRANSPOSE)
    base = g.to(tl.int64) * s_t0 + head * s_th
    o12 = base + a1 * s_t1 + b2 * s_t2
    row = _segment(TA, KA, NF, base + a1 * s_t1 + b1 * s_t2, o12, _sgn(b1 - b2))
    col = _segment(TC, KC, NF, o12, base + a2 * s_t1 + b2 * s_t2, _sgn(a1 - a2))
    return row + col


@triton.jit
def _axial_base(g, head, s_t0, s_t1, s_th, H):
    return (g // H).to(tl.int64) * s_t0 + (g % H).to(tl.int64) * s_t1 + head * s_th


@triton.jit
def _gauss_mask(qi, kj, head, TA, s_t1, s_t2, s_th, H, W):
    """G_h(|dy|, |dx|) from the launcher's [heads, H, W] table of the mixture."""
    n = H * W
    iq, jq = _grid_pos(qi, W, n)
    ik, jk = _grid_pos(kj, W, n)
    return tl.load(TA + head * s_th + tl.abs(iq - ik) * s_t1 + tl.abs(jq - jk) * s_t2)


@triton.jit
def _score_mod(KIND: tl.constexpr, s, qi, kj, g, head,
               BIAS, s_bias_r, s_bias_h, NWX, NW, TY1, TY2, TX1, TX2,
               HAS_BIAS: tl.constexpr, SHIFTED: tl.constexpr, WH: tl.constexpr, WW: tl.constexpr,
               TA, TC, KA, KC, NF, s_t0, s_t1, s_t2, s_th, H, W, TRANSPOSE: tl.constexpr):
    if KIND == _WINDOW:
        s = _window_score_mod(s, qi, kj, g, head, BIAS, s_bias_r, s_bias_h, NWX, NW, TY1, TY2, TX1, TX2,
                              HAS_BIAS, SHIFTED, WH, WW)
    elif KIND == _POLYLINE:
        s = s + _polyline_logm(qi, kj, g, head, TA, TC, KA, KC, NF, s_t0, s_t1, s_t2, s_th, H, W,
                               TRANSPOSE) * _LOG2E
    elif KIND == _AXIAL:
        # 1-D segment sums are symmetric, so no TRANSPOSE here. Both gathers are vectors.
        base = _axial_base(g, head, s_t0, s_t1, s_th, H)
        jq = tl.minimum(qi, W - 1)
        jk = tl.minimum(kj, W - 1)
        s = s + _segment(TA, KA, NF, base + jq * s_t2, base + jk * s_t2, _sgn(jq - jk)) * _LOG2E
    elif KIND == _GAUSS:
        # Multiplicative: scaling the log2-unit raw score scales the natural logit alike.
        s = s * _gauss_mask(qi, kj, head, TA, s_t1, s_t2, s_th, H, W)
    return s


@triton.jit
def _score_grad(KIND: tl.constexpr, ds, qi, kj, head, TA, s_t1, s_t2, s_th, H, W):
    """dLogits -> dRaw (the gradient of the scaled q.k product). Identity for additive modifiers."""
    if KIND == _GAUSS:
        ds = ds * _gauss_mask(qi, kj, head, TA, s_t1, s_t2, s_th, H, W)
    return ds


@triton.jit
def _param_grad(KIND: tl.constexpr, ds, s_raw, offs_m, offs_n, q_in, k_in, g, head, HEADS,
                DB, DB2, s_t0, s_t1, s_t2, s_th, H, W, REPLICAS, TRANSPOSE: tl.constexpr,
                BLOCK_M: tl.constexpr):
    """Adds the modifier's parameter gradients of one [queries, keys] dS tile (natural-log units)
    into the fp32 buffers DB, DB2 and returns the per-query part, which the dQ program owns for the
    whole key loop and adds once at the end (see _param_grad_rows).

    POLYLINE, AXIAL: d logM / d table entries are +-sgn(.), so each of the mask's table reads
    scatters +-sgn * dS back to where it read. Per-key terms are column sums of the tile (one
    atomic per key per tile), the (a1, b2) terms of POLYLINE one atomic per pair. GAUSS: dG at
    (|dy|, |dx|) += dS * raw, one atomic per pair into replica g % REPLICAS.
    """
    pair = q_in[:, None] & k_in[None, :]
    row = tl.zeros([BLOCK_M], dtype=tl.float32)
    if KIND == _AXIAL:
        base = _axial_base(g, head, s_t0, s_t1, s_th, H)
        jq = tl.minimum(offs_m, W - 1)
        jk = tl.minimum(offs_n, W - 1)
        sd = _sgn(jq[:, None] - jk[None, :]) * ds
        tl.atomic_add(DB + base + jk * s_t2, -tl.sum(sd, axis=0), mask=k_in, sem="relaxed")
        row = tl.sum(sd, axis=1)
    elif KIND == _POLYLINE:
        a1, b1, a2, b2 = _polyline_corners(offs_m[:, None], offs_n[None, :], H, W, TRANSPOSE)
        base = g.to(tl.int64) * s_t0 + head * s_th
        sj = _sgn(b1 - b2) * ds
        si = _sgn(a1 - a2) * ds
        # A[a1, b2] and C[a1, b2]: one address per pair.
        off12 = base + a1 * s_t1 + b2 * s_t2
        tl.atomic_add(DB + off12, -sj, mask=pair, sem="relaxed")
        tl.atomic_add(DB2 + off12, si, mask=pair, sem="relaxed")
        n = H * W
        ik, jk = _grid_pos(offs_n, W, n)
        if TRANSPOSE:
            # The path starts at the key: +sgn dS into A[key]; the query is its end: -sgn dS into C.
            tl.atomic_add(DB + base + ik * s_t1 + jk * s_t2, tl.sum(sj, axis=0), mask=k_in, sem="relaxed")
            row = -tl.sum(si, axis=1)
        else:
            tl.atomic_add(DB2 + base + ik * s_t1 + jk * s_t2, -tl.sum(si, axis=0), mask=k_in, sem="relaxed")
            row = tl.sum(sj, axis=1)
    elif KIND == _GAUSS:
        n = H * W
        iq, jq = _grid_pos(offs_m[:, None], W, n)
        ik, jk = _grid_pos(offs_n[None, :], W, n)
        off = (g % REPLICAS).to(tl.int64) * HEADS * s_th + head * s_th
        tl.atomic_add(DB + off + tl.abs(iq - ik) * s_t1 + tl.abs(jq - jk) * s_t2, ds * s_raw * _LN2,
                      mask=pair, sem="relaxed")
    return row


@triton.jit
def _param_grad_rows(KIND: tl.constexpr, row, offs_m, q_in, g, head, DB, DB2, s_t0, s_t1, s_t2, s_th, H, W,
                     TRANSPOSE: tl.constexpr):
    """The per-query terms of _param_grad, summed over all keys: A[query] for the plain polyline
    mask and the axial one, C[query] for the transposed mask. Atomic: other programs of the launch
    add their per-pair and per-key terms to the same entries."""
    if KIND == _AXIAL:
        base = _axial_base(g, head, s_t0, s_t1, s_th, H)
        tl.atomic_add(DB + base + tl.minimum(offs_m, W - 1) * s_t2, row, mask=q_in, sem="relaxed")
    elif KIND == _POLYLINE:
        base = g.to(tl.int64) * s_t0 + head * s_th
        iq, jq = _grid_pos(offs_m, W, H * W)
        if TRANSPOSE:
            tl.atomic_add(DB2 + base + iq * s_t1 + jq * s_t2, row, mask=q_in, sem="relaxed")
        else:
            tl.atomic_add(DB + base + iq * s_t1 + jq * s_t2, row, mask=q_in, sem="relaxed")


@triton.jit
def _dot(a, b, acc, IEEE: tl.constexpr, UPCAST: tl.constexpr):
    """acc + a @ b, fp32 accumulation.

    IEEE: exact fp32 products for fp32 inputs (TF32 would cost ~1e-3 relative). UPCAST: fp32 math
    for bf16 inputs, set only under TRITON_INTERPRET=1, whose numpy-backed tl.dot has no bfloat16.
    """
    if UPCAST:
        acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    elif IEEE:
        acc = tl.dot(a, b, acc, input_precision="ieee")
    else:
        acc = tl.dot(a, b, acc)
    return acc


@triton.jit
def _program_ids(HEADS, BLOCKS):
    # One flat grid axis, heads fastest: axis 0 allows 2^31-1 programs where axes 1 and 2 stop at
    # 65535 (a large image has that many windows), and neighbouring programs then read the other
    # heads of the same tokens, which sit next to each other in a packed qkv tensor.
    pid = tl.program_id(0)
    head = pid % HEADS
    rest = pid // HEADS
    blk = rest % BLOCKS
    g = rest // BLOCKS
    return g, blk, head


# ------------------------------------------------------------------------------- forward
@triton.jit
def _attn_fwd(
    Q, K, V, O, LSE,
    s_q0, s_q1, s_q2, s_qh, s_qd,
    s_k0, s_k1, s_k2, s_kh, s_kd,
    s_v0, s_v1, s_v2, s_vh, s_vd,
    s_o0, s_o1, s_o2, s_oh, s_od,
    s_l0, s_l1, s_l2, s_lh,
    SEQ,                                    # VARLEN: int32 cu_seqlens
    BIAS, s_bias_r, s_bias_h,               # WINDOW: relative-position table (dummy without one)
    H, W, SH, SW, NWX, NW, TY1, TY2, TX1, TX2,   # WINDOW geometry (H, W: image or line geometry for all)
    NQ, NK,                                 # DENSE: queries and keys per group
    TA, TC, s_t0, s_t1, s_t2, s_th,         # POLYLINE/AXIAL prefix tables, GAUSS mask table (fp32)
    KA, KC, NF,                             # POLYLINE/AXIAL non-finite counts, and whether any exist
    HEADS, M_BLOCKS, DQK, DV, qk_scale,
    KIND: tl.constexpr, HAS_BIAS: tl.constexpr, SHIFTED: tl.constexpr, TRANSPOSE: tl.constexpr,
    WH: tl.constexpr, WW: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DQK: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    g, mb, head = _program_ids(HEADS, M_BLOCKS)
    start, n_q, n_k = _group_extent(KIND, g, SEQ, H, W, NQ, NK, WH, WW)
    if mb * BLOCK_M >= n_q:
        return
    offs_m = mb * BLOCK_M + tl.arange(0, BLOCK_M)
    qa, qb, qc, q_in = _tokens(KIND, g, offs_m, n_q, start, H, W, SH, SW, NWX, NW, WH, WW)
    dk = tl.arange(0, BLOCK_DQK)
    dv = tl.arange(0, BLOCK_DV)
    q = _load_rows(Q, qa, qb, qc, s_q0, s_q1, s_q2, s_qh, s_qd, head, dk, DQK, q_in)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    for n0 in range(0, n_k, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        ka, kb, kc, k_in = _tokens(KIND, g, offs_n, n_k, start, H, W, SH, SW, NWX, NW, WH, WW)
        kT = tl.load(K + _offsets(ka, kb, kc, s_k0, s_k1, s_k2)[None, :] + head * s_kh + dk[:, None] * s_kd,
                     mask=k_in[None, :] & (dk < DQK)[:, None], other=0.0)
        v = _load_rows(V, ka, kb, kc, s_v0, s_v1, s_v2, s_vh, s_vd, head, dv, DV, k_in)
        s = _dot(q, kT, tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32), IEEE, UPCAST) * qk_scale
        s = _score_mod(KIND, s, offs_m[:, None], offs_n[None, :], g, head,
                       BIAS, s_bias_r, s_bias_h, NWX, NW, TY1, TY2, TX1, TX2, HAS_BIAS, SHIFTED, WH, WW,
                       TA, TC, KA, KC, NF, s_t0, s_t1, s_t2, s_th, H, W, TRANSPOSE)
        s = tl.where(k_in[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        # A row with no present key so far keeps m = -inf; subtracting 0 instead keeps exp2 at 0
        # rather than NaN (future masks can empty whole tiles of a row).
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_use)
        p = tl.exp2(s - m_use[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = _dot(p.to(v.dtype), v, acc * alpha[:, None], IEEE, UPCAST)
        m_i = m_new

    # l_i == 0 has two meanings. A group with no keys at all (reduced attention against Nk = 0) sums
    # nothing: output 0, lse -inf. A row whose present keys all scored -inf is eager's 0 / 0: NaN
    # output and lse, which the division gives by itself (acc is 0 there unless v made it NaN).
    no_keys = n_k == 0
    l_safe = tl.where(no_keys, 1.0, l_i)
    out = acc / l_safe[:, None]
    lse = tl.where(no_keys, float("-inf"),
                   tl.where(l_i == 0.0, float("nan"), (m_i + tl.log2(l_safe)) * _LN2))
    _store_rows(O, qa, qb, qc, s_o0, s_o1, s_o2, s_oh, s_od, head, dv, DV, q_in, out)
    tl.store(LSE + _offsets(qa, qb, qc, s_l0, s_l1, s_l2) + head * s_lh, lse, mask=q_in)


# ------------------------------------------------------------- two-pass forward (quantized)
@triton.jit
def _int8_codes(x, present, s, z):
    """(codes, nan) of an fp tile: clamp(round(x / s) + z, -128, 127) as int8, evaluated in fp64 as the
    reference does (the IEEE quotient, then round half to even by the 1.5 * 2^52 trick, exact for the
    clamped |x / s| <= 1024), so the codes are the reference's bit for bit. s: fp64 scalar, z: int.
    Positions outside `present` (absent tokens, head-dim padding) get code 0, NaN cells code 0 and
    nan True: the int8 codes cannot hold them, the caller propagates them as flags."""
    xd = x.to(tl.float64)
    t = xd / s
    t = tl.minimum(tl.maximum(t, -1024.0), 1024.0)
    r = ((t + 6755399441055744.0) - 6755399441055744.0) + z
    r = tl.minimum(tl.maximum(r, -128.0), 127.0)
    nan = (xd != xd) & present
    r = tl.where(present & ~nan, r, 0.0)
    return r.to(tl.int8), nan


@triton.jit
def _quant_scores(qc, q_sum, K, ka, kb, kc, k_in, s_k0, s_k1, s_k2, s_kh, s_kd, head, dk, DQK,
                  s_k, zq, zk, alpha):
    """(x, knan) of one key tile: x [M, N] = fp32(Σ (cq - zq)(ck - zk)) * alpha, the logits in natural
    units (absent keys -inf), from one int8 dot with int32 accumulation and the zero points expanded:
    Σ cq ck - zk Σ cq - zq Σ ck + d zq zk, all exact in int32. knan: whether the tile holds a NaN key."""
    kT = tl.load(K + _offsets(ka, kb, kc, s_k0, s_k1, s_k2)[None, :] + head * s_kh + dk[:, None] * s_kd,
                 mask=k_in[None, :] & (dk < DQK)[:, None], other=0.0)
    kcode, knan = _int8_codes(kT, k_in[None, :] & (dk < DQK)[:, None], s_k, zk)
    k_sum = tl.sum(kcode.to(tl.int32), axis=0)
    acc = tl.dot(qc, kcode, tl.zeros([qc.shape[0], kcode.shape[1]], dtype=tl.int32))
    acc = acc - zk * q_sum[:, None] - zq * k_sum[None, :] + DQK * zq * zk
    x = acc.to(tl.float32) * alpha
    x = tl.where(k_in[None, :], x, float("-inf"))
    return x, tl.max(tl.max(knan.to(tl.int32), axis=1), axis=0)


@triton.jit
def _f64(bits):
    """An fp64 scalar passed as its int64 bit pattern (Triton passes Python floats as fp32)."""
    return bits.to(tl.int64).to(tl.float64, bitcast=True)


@triton.jit
def _attn_fwd_quant(
    Q, K, V, O, TABLE,
    s_q0, s_q1, s_q2, s_qh, s_qd,
    s_k0, s_k1, s_k2, s_kh, s_kd,
    s_v0, s_v1, s_v2, s_vh, s_vd,
    s_o0, s_o1, s_o2, s_oh, s_od,
    SEQ, H, W, SH, SW, NWX, NW, NQ, NK,
    HEADS, M_BLOCKS, DQK, DV,
    sq_bits, sk_bits, sv_bits, zq, zk, zv, alpha, inv_ln_base, ln_delta_bits, LEVELS,
    KIND: tl.constexpr, WH: tl.constexpr, WW: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DQK: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    """Quantized attention, the two-pass form: int8 q, k, v and log-grid quantized probabilities.

    Pass 1 sweeps the group's keys for each query's row max m and softmax denominator l (online, in
    fp32, natural units: the logits are exact integers times one fp32 multiply, as on the CPU). Pass 2
    sweeps them again and quantizes every probability with one fused multiply-add per key:
        c = rint((m - x) / ln(base) + (ln l + ln δ) / ln(base)),  clamped below at 0,
    P̂ = TABLE[c] = δ base^-c for c < LEVELS (and P > 0: m - x below fp64's underflow), else 0, and
    accumulates P̂ v̂ in fp32 (exact products), not renormalized. No exponential or logarithm per
    element in pass 2. NaN in q, k or v cannot live in int8 codes: it is tracked as flags (a NaN query
    makes its row NaN, a NaN key its whole head, a NaN value its column), as the eager simulation
    propagates it. Geometry (which tokens a group has) is the kind's, as in _attn_fwd.
    """
    g, mb, head = _program_ids(HEADS, M_BLOCKS)
    start, n_q, n_k = _group_extent(KIND, g, SEQ, H, W, NQ, NK, WH, WW)
    if mb * BLOCK_M >= n_q:
        return
    s_q = _f64(sq_bits)
    s_k = _f64(sk_bits)
    s_v = _f64(sv_bits)
    offs_m = mb * BLOCK_M + tl.arange(0, BLOCK_M)
    qa, qb, qc_, q_in = _tokens(KIND, g, offs_m, n_q, start, H, W, SH, SW, NWX, NW, WH, WW)
    dk = tl.arange(0, BLOCK_DQK)
    dv = tl.arange(0, BLOCK_DV)
    q_mask = q_in[:, None] & (dk < DQK)[None, :]
    q = _load_rows(Q, qa, qb, qc_, s_q0, s_q1, s_q2, s_qh, s_qd, head, dk, DQK, q_in)
    qcode, qnan = _int8_codes(q, q_mask, s_q, zq)
    q_sum = tl.sum(qcode.to(tl.int32), axis=1)
    row_nan = tl.max(qnan.to(tl.int32), axis=1)

    # Pass 1: row max and denominator.
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    knan = tl.zeros([], dtype=tl.int32)
    for n0 in range(0, n_k, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        ka, kb, kc, k_in = _tokens(KIND, g, offs_n, n_k, start, H, W, SH, SW, NWX, NW, WH, WW)
        x, tile_nan = _quant_scores(qcode, q_sum, K, ka, kb, kc, k_in, s_k0, s_k1, s_k2, s_kh, s_kd, head, dk,
                                    DQK, s_k, zq, zk, alpha)
        knan = tl.maximum(knan, tile_nan)
        m_new = tl.maximum(m_i, tl.max(x, axis=1))
        l_i = l_i * tl.exp(m_i - m_new) + tl.sum(tl.exp(x - m_new[:, None]), axis=1)
        m_i = m_new

    # k0 = (ln l + ln δ) / ln(base), in fp64 and rounded once to fp32 (as the CPU kernel does).
    k0 = ((tl.log(l_i.to(tl.float64)) + _f64(ln_delta_bits)) * inv_ln_base).to(tl.float32)
    k0 = tl.where(q_in, k0, 0.0)

    # Pass 2: quantize each probability on the log grid and accumulate P̂ v̂.
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    vnan = tl.zeros([BLOCK_DV], dtype=tl.int32)
    for n0 in range(0, n_k, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        ka, kb, kc, k_in = _tokens(KIND, g, offs_n, n_k, start, H, W, SH, SW, NWX, NW, WH, WW)
        x, _ = _quant_scores(qcode, q_sum, K, ka, kb, kc, k_in, s_k0, s_k1, s_k2, s_kh, s_kd, head, dk,
                             DQK, s_k, zq, zk, alpha)
        gap = m_i[:, None] - x
        c = tl.fma(gap, inv_ln_base, k0[:, None])
        c = tl.minimum(c, 4194304.0)                                   # 2^22: rint below stays exact
        c = (c + 12582912.0) - 12582912.0                              # rint, half to even
        c = tl.maximum(c, 0.0)
        # P underflows to exactly 0 in the float64 simulation below e^-745.13.
        keep = (c < LEVELS) & (gap < 745.13) & k_in[None, :] & q_in[:, None]
        p_hat = tl.load(TABLE + tl.where(keep, c, 0.0).to(tl.int32), mask=keep, other=0.0)
        v_mask = k_in[:, None] & (dv < DV)[None, :]
        v = _load_rows(V, ka, kb, kc, s_v0, s_v1, s_v2, s_vh, s_vd, head, dv, DV, k_in)
        vcode, v_is_nan = _int8_codes(v, v_mask, s_v, zv)
        vnan = tl.maximum(vnan, tl.max(v_is_nan.to(tl.int32), axis=0))
        v_hat = tl.where(v_mask, (s_v * (vcode.to(tl.float64) - zv)).to(tl.float32), 0.0)
        acc = tl.dot(p_hat, v_hat, acc, input_precision="ieee")

    nan_rows = (row_nan != 0) | (knan != 0)
    out = acc + tl.where(vnan != 0, float("nan"), 0.0)[None, :] + tl.where(nan_rows, float("nan"), 0.0)[:, None]
    _store_rows(O, qa, qb, qc_, s_o0, s_o1, s_o2, s_oh, s_od, head, dv, DV, q_in, out)


# ------------------------------------------------------------------------------ backward
@triton.jit
def _attn_bwd_preprocess(
    O, DO, DELTA,
    s_o0, s_o1, s_o2, s_oh, s_od,
    s_g0, s_g1, s_g2, s_gh, s_gd,
    s_l0, s_l1, s_l2, s_lh,
    SEQ, H, W, SH, SW, NWX, NW, NQ, NK,
    HEADS, M_BLOCKS, DV,
    KIND: tl.constexpr, WH: tl.constexpr, WW: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    """Drow = rowsum(dO * O) per (query, head), written in the lse layout."""
    g, mb, head = _program_ids(HEADS, M_BLOCKS)
    start, n_q, n_k = _group_extent(KIND, g, SEQ, H, W, NQ, NK, WH, WW)
    if mb * BLOCK_M >= n_q:
        return
    offs_m = mb * BLOCK_M + tl.arange(0, BLOCK_M)
    qa, qb, qc, q_in = _tokens(KIND, g, offs_m, n_q, start, H, W, SH, SW, NWX, NW, WH, WW)
    dv = tl.arange(0, BLOCK_DV)
    o = _load_rows(O, qa, qb, qc, s_o0, s_o1, s_o2, s_oh, s_od, head, dv, DV, q_in)
    do = _load_rows(DO, qa, qb, qc, s_g0, s_g1, s_g2, s_gh, s_gd, head, dv, DV, q_in)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1)
    tl.store(DELTA + _offsets(qa, qb, qc, s_l0, s_l1, s_l2) + head * s_lh, delta, mask=q_in)


@triton.jit
def _load_lse2(LSE, offs, head, s_lh, present):
    # Scores are in log2 units; an absent query (or a row with no keys, lse = -inf) gets +inf so
    # that its recomputed P is exactly 0.
    lse = tl.load(LSE + offs + head * s_lh, mask=present, other=float("inf"))
    return tl.where(lse == float("-inf"), float("inf"), lse) * _LOG2E


@triton.jit
def _attn_bwd_dkdv(
    Q, K, V, DO, LSE, DELTA, DK, DVo,
    s_q0, s_q1, s_q2, s_qh, s_qd,
    s_k0, s_k1, s_k2, s_kh, s_kd,
    s_v0, s_v1, s_v2, s_vh, s_vd,
    s_g0, s_g1, s_g2, s_gh, s_gd,
    s_l0, s_l1, s_l2, s_lh,
    s_dk0, s_dk1, s_dk2, s_dkh, s_dkd,
    s_dv0, s_dv1, s_dv2, s_dvh, s_dvd,
    SEQ,
    BIAS, s_bias_r, s_bias_h,
    H, W, SH, SW, NWX, NW, TY1, TY2, TX1, TX2,
    NQ, NK, TA, TC, KA, KC, NF, s_t0, s_t1, s_t2, s_th,
    HEADS, N_BLOCKS, DQK, DV, qk_scale, sm_scale,
    KIND: tl.constexpr, HAS_BIAS: tl.constexpr, SHIFTED: tl.constexpr, TRANSPOSE: tl.constexpr,
    WH: tl.constexpr, WW: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DQK: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    """dK, dV of BLOCK_N keys; tiles are [keys, queries] so no P^T or dS^T is ever formed."""
    g, nb, head = _program_ids(HEADS, N_BLOCKS)
    start, n_q, n_k = _group_extent(KIND, g, SEQ, H, W, NQ, NK, WH, WW)
    if nb * BLOCK_N >= n_k:
        return
    offs_n = nb * BLOCK_N + tl.arange(0, BLOCK_N)
    ka, kb, kc, k_in = _tokens(KIND, g, offs_n, n_k, start, H, W, SH, SW, NWX, NW, WH, WW)
    dk_ = tl.arange(0, BLOCK_DQK)
    dv_ = tl.arange(0, BLOCK_DV)
    k = _load_rows(K, ka, kb, kc, s_k0, s_k1, s_k2, s_kh, s_kd, head, dk_, DQK, k_in)
    v = _load_rows(V, ka, kb, kc, s_v0, s_v1, s_v2, s_vh, s_vd, head, dv_, DV, k_in)

    acc_k = tl.zeros([BLOCK_N, BLOCK_DQK], dtype=tl.float32)
    acc_v = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)
    for m0 in range(0, n_q, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        qa, qb, qc, q_in = _tokens(KIND, g, offs_m, n_q, start, H, W, SH, SW, NWX, NW, WH, WW)
        q = _load_rows(Q, qa, qb, qc, s_q0, s_q1, s_q2, s_qh, s_qd, head, dk_, DQK, q_in)
        do = _load_rows(DO, qa, qb, qc, s_g0, s_g1, s_g2, s_gh, s_gd, head, dv_, DV, q_in)
        l_off = _offsets(qa, qb, qc, s_l0, s_l1, s_l2)
        lse2 = _load_lse2(LSE, l_off, head, s_lh, q_in)
        delta = tl.load(DELTA + l_off + head * s_lh, mask=q_in, other=0.0)

        sT = _dot(k, tl.trans(q), tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32), IEEE, UPCAST) * qk_scale
        sT = _score_mod(KIND, sT, offs_m[None, :], offs_n[:, None], g, head,
                        BIAS, s_bias_r, s_bias_h, NWX, NW, TY1, TY2, TX1, TX2, HAS_BIAS, SHIFTED, WH, WW,
                       TA, TC, KA, KC, NF, s_t0, s_t1, s_t2, s_th, H, W, TRANSPOSE)
        sT = tl.where(k_in[:, None], sT, float("-inf"))
        pT = tl.exp2(sT - lse2[None, :])
        acc_v = _dot(pT.to(do.dtype), do, acc_v, IEEE, UPCAST)
        dpT = _dot(v, tl.trans(do), tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32), IEEE, UPCAST)
        dsT = pT * (dpT - delta[None, :])
        dsT = _score_grad(KIND, dsT, offs_m[None, :], offs_n[:, None], head, TA, s_t1, s_t2, s_th, H, W)
        acc_k = _dot(dsT.to(q.dtype), q, acc_k, IEEE, UPCAST)

    acc_k = acc_k * sm_scale
    _store_rows(DK, ka, kb, kc, s_dk0, s_dk1, s_dk2, s_dkh, s_dkd, head, dk_, DQK, k_in, acc_k)
    _store_rows(DVo, ka, kb, kc, s_dv0, s_dv1, s_dv2, s_dvh, s_dvd, head, dv_, DV, k_in, acc_v)


@triton.jit
def _attn_bwd_dq(
    Q, K, V, DO, LSE, DELTA, DQ, DB, DB2,
    s_q0, s_q1, s_q2, s_qh, s_qd,
    s_k0, s_k1, s_k2, s_kh, s_kd,
    s_v0, s_v1, s_v2, s_vh, s_vd,
    s_g0, s_g1, s_g2, s_gh, s_gd,
    s_l0, s_l1, s_l2, s_lh,
    s_dq0, s_dq1, s_dq2, s_dqh, s_dqd,
    SEQ,
    BIAS, s_bias_r, s_bias_h,
    H, W, SH, SW, NWX, NW, TY1, TY2, TX1, TX2,
    NQ, NK, TA, TC, KA, KC, NF, s_t0, s_t1, s_t2, s_th,
    HEADS, M_BLOCKS, DQK, DV, qk_scale, sm_scale, REPLICAS,
    KIND: tl.constexpr, HAS_BIAS: tl.constexpr, SHIFTED: tl.constexpr, BIAS_GRAD: tl.constexpr,
    TRANSPOSE: tl.constexpr,
    WH: tl.constexpr, WW: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DQK: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    """dQ of BLOCK_M queries; with BIAS_GRAD also the modifier's parameter gradients.

    WINDOW: dS into DB [REPLICAS, HEADS, N, N] (fp32). dS is the gradient of the score itself, hence
    of any additive bias on it. Window g adds into replica g % REPLICAS, so the many windows that
    run at once share each address REPLICAS times less often; the launcher sums the replicas.
    POLYLINE, AXIAL, GAUSS: see _param_grad (DB, DB2 laid out like the kind's tables).
    """
    g, mb, head = _program_ids(HEADS, M_BLOCKS)
    start, n_q, n_k = _group_extent(KIND, g, SEQ, H, W, NQ, NK, WH, WW)
    if mb * BLOCK_M >= n_q:
        return
    offs_m = mb * BLOCK_M + tl.arange(0, BLOCK_M)
    qa, qb, qc, q_in = _tokens(KIND, g, offs_m, n_q, start, H, W, SH, SW, NWX, NW, WH, WW)
    dk_ = tl.arange(0, BLOCK_DQK)
    dv_ = tl.arange(0, BLOCK_DV)
    q = _load_rows(Q, qa, qb, qc, s_q0, s_q1, s_q2, s_qh, s_qd, head, dk_, DQK, q_in)
    do = _load_rows(DO, qa, qb, qc, s_g0, s_g1, s_g2, s_gh, s_gd, head, dv_, DV, q_in)
    l_off = _offsets(qa, qb, qc, s_l0, s_l1, s_l2)
    lse2 = _load_lse2(LSE, l_off, head, s_lh, q_in)
    delta = tl.load(DELTA + l_off + head * s_lh, mask=q_in, other=0.0)
    if BIAS_GRAD:
        NN: tl.constexpr = WH * WW
        db_base = DB + ((g % REPLICAS).to(tl.int64) * HEADS + head) * (NN * NN)
    row_acc = tl.zeros([BLOCK_M], dtype=tl.float32)

    acc = tl.zeros([BLOCK_M, BLOCK_DQK], dtype=tl.float32)
    for n0 in range(0, n_k, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        ka, kb, kc, k_in = _tokens(KIND, g, offs_n, n_k, start, H, W, SH, SW, NWX, NW, WH, WW)
        k = _load_rows(K, ka, kb, kc, s_k0, s_k1, s_k2, s_kh, s_kd, head, dk_, DQK, k_in)
        v = _load_rows(V, ka, kb, kc, s_v0, s_v1, s_v2, s_vh, s_vd, head, dv_, DV, k_in)
        s_raw = _dot(q, tl.trans(k), tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32), IEEE, UPCAST) * qk_scale
        s = _score_mod(KIND, s_raw, offs_m[:, None], offs_n[None, :], g, head,
                       BIAS, s_bias_r, s_bias_h, NWX, NW, TY1, TY2, TX1, TX2, HAS_BIAS, SHIFTED, WH, WW,
                       TA, TC, KA, KC, NF, s_t0, s_t1, s_t2, s_th, H, W, TRANSPOSE)
        s = tl.where(k_in[None, :], s, float("-inf"))
        p = tl.exp2(s - lse2[:, None])
        dp = _dot(do, tl.trans(v), tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32), IEEE, UPCAST)
        ds = p * (dp - delta[:, None])
        if BIAS_GRAD:
            if KIND == _WINDOW:
                # Absent pairs have dS = 0 exactly; skipping them saves the atomics, not correctness.
                # Relaxed: only the sums matter, nothing is ordered against them within the launch.
                tl.atomic_add(db_base + offs_m[:, None] * NN + offs_n[None, :], ds,
                              mask=q_in[:, None] & k_in[None, :], sem="relaxed")
            else:
                row_acc += _param_grad(KIND, ds, s_raw, offs_m, offs_n, q_in, k_in, g, head, HEADS,
                                       DB, DB2, s_t0, s_t1, s_t2, s_th, H, W, REPLICAS, TRANSPOSE, BLOCK_M)
        ds = _score_grad(KIND, ds, offs_m[:, None], offs_n[None, :], head, TA, s_t1, s_t2, s_th, H, W)
        acc = _dot(ds.to(k.dtype), k, acc, IEEE, UPCAST)

    if BIAS_GRAD:
        _param_grad_rows(KIND, row_acc, offs_m, q_in, g, head, DB, DB2, s_t0, s_t1, s_t2, s_th, H, W, TRANSPOSE)
    acc = acc * sm_scale
    _store_rows(DQ, qa, qb, qc, s_dq0, s_dq1, s_dq2, s_dqh, s_dqd, head, dk_, DQK, q_in, acc)


# ------------------------------------------------------------------------------ host side
IS_INTERPRETED = is_interpreted(_attn_fwd)


# Gradients that many programs add into atomically get up to this many copies on a GPU, so that
# programs running at once collide on an address less often; the copies are summed afterwards.
_MAX_REPLICAS = 16
_REPLICA_BUFFER_BYTES = 64 << 20


def gradient_replicas(groups: int, per_copy_bytes: int, device: torch.device) -> int:
    """How many copies of an atomically accumulated fp32 gradient buffer to spread groups over."""
    if device.type != "cuda":
        return 1
    return max(1, min(_MAX_REPLICAS, groups, _REPLICA_BUFFER_BYTES // max(per_copy_bytes, 1)))


def segment_tables(x: torch.Tensor, dim: int):
    """(T, K, NF): what _segment reads to sum x over (min(a, b), max(a, b)] along dim.

    T: int64, the inclusive prefix of x's finite cells after cell 0 (non-finite ones count 0), in float64
    and stored as a double-float pair, hi = fp32(P) in the upper word and lo = fp32(P - hi) in the
    lower (48 significant bits: the difference of two entries is as exact as the CPU's double).
    K: int64, the prefix counts of -inf, +inf and NaN cells in COUNT_BITS-bit fields (exact
    integers, so cells off the segment cancel exactly). NF: int32 [1], whether any cell is
    non-finite (a device flag: no host sync). T and K are contiguous with x's shape.
    """
    x64 = x.to(torch.float64)
    # Cell 0 of a line is in no segment, (min, max] starting past it: it is left out altogether, so
    # that whatever it holds changes no mask, not even by rounding.
    shape = [1] * x.dim()
    shape[dim] = x.shape[dim]
    inside = (torch.arange(x.shape[dim], device=x.device) > 0).reshape(shape)
    finite = torch.isfinite(x64)
    prefix = torch.cumsum(torch.where(finite & inside, x64, 0.0), dim).contiguous()
    hi = prefix.to(torch.float32)
    lo = (prefix - hi.to(torch.float64)).to(torch.float32)
    table = (hi.view(torch.int32).to(torch.int64) << 32) | (lo.view(torch.int32).to(torch.int64) & 0xFFFFFFFF)
    one = torch.ones((), dtype=torch.int64, device=x.device)
    cell = torch.where(finite | ~inside, 0, torch.where(torch.isnan(x64), one << (2 * COUNT_BITS),
                                                        torch.where(x64 > 0, one << COUNT_BITS, one)))
    counts = torch.cumsum(cell, dim).contiguous()
    flag = (cell != 0).any().to(torch.int32).reshape(1)
    return table, counts, flag


def new_outputs(q: torch.Tensor, v: torch.Tensor):
    """(out, lse) for q's token layout [..., heads, d]: out [..., heads, dv] contiguous in q's dtype,
    lse [..., heads] fp32."""
    out = torch.empty((*q.shape[:-1], v.shape[-1]), dtype=q.dtype, device=q.device)
    lse = torch.empty(q.shape[:-1], dtype=torch.float32, device=q.device)
    return out, lse


def new_input_grads(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, zeros: bool = False):
    """(dq, dk, dv): contiguous, shaped like q, k, v, in q's dtype."""
    new = torch.zeros if zeros else torch.empty
    return tuple(new(t.shape, dtype=q.dtype, device=q.device) for t in (q, k, v))


def head_block(d: int) -> int:
    """Padded head dim: a power of two and at least 16, tl.dot's smallest operand size."""
    return max(16, 1 << max(0, int(d) - 1).bit_length())


# fp32 attention: exact IEEE products (True) or TF32 tensor cores (False). See the module docstring.
FP32_EXACT = True


def dot_flags(dtype: torch.dtype):
    """(IEEE, UPCAST) for the kernels' _dot: exact fp32, and the interpreter's bf16 workaround."""
    return dtype == torch.float32 and FP32_EXACT, IS_INTERPRETED and dtype == torch.bfloat16


def tile_config(n_keys: int, block_dqk: int, block_dv: int, dtype: torch.dtype, backward: bool = False,
                tall: bool = False, pair_gather: bool = False):
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) from the group size, head dims and dtype.

    A heuristic, not autotuned: the choices were checked against ptxas's sm_90 register and spill
    counts, compiled without a GPU. 64-wide tiles waste least on a 7x7 window (49 of 64 rows), and
    8 warps keep the bias gather's loop-invariant half from spilling once the key loop runs more
    than once. fp32 (exact IEEE dots, operands in registers) spills at 64 x 64, so it runs 32 x 32
    with 8 warps. tall: 128-query tiles for long groups in the 16-bit forward, as flash attention
    uses (kinds without a per-element modifier only). pair_gather (POLYLINE, GAUSS: a table read
    per (query, key) pair) holds three to five more fp32 [M, N] tiles, so it takes 8 warps and
    32-key tiles, and 32 x 32 in the backward, where 64 x 32 still spilled.
    """
    wide = max(block_dqk, block_dv)
    pow2 = max(16, 1 << max(0, int(n_keys) - 1).bit_length())
    if dtype == torch.float32:
        block = min(pow2, 32)
        # Backward with 128-wide heads: dK, dV accumulators and K, V tiles all in registers.
        return block, (16 if backward and wide >= 128 else block), 8, 2
    block_m = block_n = min(pow2, 64)
    if backward and wide >= 128:
        # dK and dV (or dQ) accumulators plus resident K, V: halve the key tile.
        block_n = min(block_n, 32)
    if pair_gather:
        block_n = min(block_n, 32)
        if backward:
            block_m = min(block_m, 32)
    if tall and not backward and n_keys >= 256:
        block_m = 128
    warps = 8 if (wide >= 128 or block_m >= 128 or n_keys > block_n or pair_gather) else 4
    return block_m, block_n, warps, 2


# ---------------------------------------------------------------------- generic launches
# Kernel arguments that belong to one kind or another. A family passes the ones its kind reads in
# `modifier`; the rest take these neutral values (tensor slots get a dummy pointer: q).
_MODIFIER_DEFAULTS = dict(H=1, W=1, SH=0, SW=0, NWX=1, NW=1, TY1=0, TY2=0, TX1=0, TX2=0,
                          s_bias_r=0, s_bias_h=0, HAS_BIAS=False, SHIFTED=False, WH=1, WW=1,
                          NQ=0, NK=0, s_t0=0, s_t1=0, s_t2=0, s_th=0, TRANSPOSE=False)
_MODIFIER_TENSORS = ("SEQ", "BIAS", "TA", "TC", "KA", "KC", "NF")
# What _tokens and _group_extent read: all the preprocess kernel needs.
_TOKEN_ARGS = ("SEQ", "H", "W", "SH", "SW", "NWX", "NW", "NQ", "NK", "WH", "WW")
# Kinds whose modifier gathers from a table per (query, key) pair: more live [M, N] temporaries.
_PAIR_GATHER_KINDS = (POLYLINE, GAUSS)


def _strided(prefix: str, strides):
    names = ("0", "1", "2", "h", "d")[: len(strides)]
    return {f"s_{prefix}{n}": int(s) for n, s in zip(names, strides)}


def _modifier_args(modifier: dict, dummy: torch.Tensor) -> dict:
    args = dict(_MODIFIER_DEFAULTS)
    args.update({name: dummy for name in _MODIFIER_TENSORS})
    args.update({k: v for k, v in modifier.items() if v is not None})
    return args


def attention_forward(kind: int, q, k, v, out, lse, strides: dict, groups: int, heads: int, n_max: int,
                      scale: float, modifier: dict, n_k_max: int = None) -> None:
    """Launches _attn_fwd over groups x ceil(n_max / BLOCK_M) x heads programs.

    strides: "q", "k", "v", "o" -> (s0, s1, s2, s_head, s_dim) in the kernels' token coordinates,
    "l" -> (s0, s1, s2, s_head) of lse. n_max bounds the queries and keys of every group (n_k_max,
    when given, the keys). modifier: the kind's own kernel arguments (see _MODIFIER_DEFAULTS).
    """
    dqk, dv = q.shape[-1], v.shape[-1]
    bdqk, bdv = head_block(dqk), head_block(dv)
    n_keys = n_max if n_k_max is None else n_k_max
    block_m, block_n, warps, stages = tile_config(n_keys, bdqk, bdv, q.dtype, tall=kind in (VARLEN, DENSE),
                                                  pair_gather=kind in _PAIR_GATHER_KINDS)
    m_blocks = triton.cdiv(n_max, block_m)
    ieee, upcast = dot_flags(q.dtype)
    with device_ctx(q):
        launcher(_attn_fwd)[(groups * m_blocks * heads,)](
            q, k, v, out, lse,
            **_strided("q", strides["q"]), **_strided("k", strides["k"]), **_strided("v", strides["v"]),
            **_strided("o", strides["o"]), **_strided("l", strides["l"]),
            **_modifier_args(modifier, q),
            HEADS=heads, M_BLOCKS=m_blocks, DQK=dqk, DV=dv, qk_scale=float(scale) * _LOG2E.value,
            KIND=kind, IEEE=ieee, UPCAST=upcast,
            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_DQK=bdqk, BLOCK_DV=bdv,
            num_warps=warps, num_stages=stages,
        )


def attention_backward(kind: int, grad_out, q, k, v, out, lse, dq, dk, dv, strides: dict, groups: int,
                       heads: int, n_max: int, scale: float, modifier: dict,
                       dbias: torch.Tensor = None, replicas: int = 1, dbias2: torch.Tensor = None,
                       n_k_max: int = None) -> None:
    """Preprocess, dK/dV and dQ launches, writing dq, dk, dv (and adding dS into dbias if given).

    strides as for attention_forward plus "g" (grad_out), "dq", "dk", "dv"; lse must be
    contiguous (Drow is allocated like it and read with its strides). dbias: the modifier's fp32
    parameter-gradient buffer, zero-filled by the caller: WINDOW [replicas, heads, N, N]; POLYLINE
    dA (dbias2: dC) and AXIAL dA laid out like their prefix tables; GAUSS [replicas, heads, H, W].
    n_k_max: the keys' bound where it differs from the queries' (DENSE).
    """
    dqk, dvd = q.shape[-1], v.shape[-1]
    bdqk, bdv = head_block(dqk), head_block(dvd)
    n_keys = n_max if n_k_max is None else n_k_max
    block_m, block_n, warps, stages = tile_config(n_keys, bdqk, bdv, q.dtype, backward=True,
                                                  pair_gather=kind in _PAIR_GATHER_KINDS)
    m_blocks, n_blocks = triton.cdiv(n_max, block_m), triton.cdiv(n_keys, block_n)
    ieee, upcast = dot_flags(q.dtype)
    delta = torch.empty(lse.shape, dtype=torch.float32, device=q.device)
    if tuple(lse.stride()) != tuple(delta.stride()):
        raise ValueError("attention_backward: lse must be contiguous")
    mod = _modifier_args(modifier, q)
    qk_scale = float(scale) * _LOG2E.value
    tiles = dict(KIND=kind, IEEE=ieee, UPCAST=upcast, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_DQK=bdqk,
                 BLOCK_DV=bdv, num_warps=warps, num_stages=stages)
    s = {name: _strided(name, st) for name, st in strides.items()}
    with device_ctx(q):
        pre_block = 32 if bdv >= 128 else 64
        pre_blocks = triton.cdiv(n_max, pre_block)
        launcher(_attn_bwd_preprocess)[(groups * pre_blocks * heads,)](
            out, grad_out, delta, **s["o"], **s["g"], **s["l"],
            **{name: mod[name] for name in _TOKEN_ARGS},
            HEADS=heads, M_BLOCKS=pre_blocks, DV=dvd, KIND=kind, BLOCK_M=pre_block, BLOCK_DV=bdv, num_warps=4,
        )
        launcher(_attn_bwd_dkdv)[(groups * n_blocks * heads,)](
            q, k, v, grad_out, lse, delta, dk, dv,
            **s["q"], **s["k"], **s["v"], **s["g"], **s["l"], **s["dk"], **s["dv"], **mod,
            HEADS=heads, N_BLOCKS=n_blocks, DQK=dqk, DV=dvd, qk_scale=qk_scale, sm_scale=float(scale),
            **tiles,
        )
        launcher(_attn_bwd_dq)[(groups * m_blocks * heads,)](
            q, k, v, grad_out, lse, delta, dq, dbias if dbias is not None else delta,
            dbias2 if dbias2 is not None else delta,
            **s["q"], **s["k"], **s["v"], **s["g"], **s["l"], **s["dq"], **mod,
            HEADS=heads, M_BLOCKS=m_blocks, DQK=dqk, DV=dvd, qk_scale=qk_scale, sm_scale=float(scale),
            REPLICAS=replicas, BIAS_GRAD=dbias is not None, **tiles,
        )


def dense_token_strides(t: torch.Tensor):
    """The DENSE kind's token coordinates (batch, -, token) of a [B, N, heads(, d)] tensor."""
    st = t.stride()
    return (st[0], 0, *st[1:])


def _f64_bits(x: float) -> int:
    """x's fp64 bit pattern as an int, for the kernels' _f64 (Triton would pass a Python float as fp32)."""
    return struct.unpack("<q", struct.pack("<d", float(x)))[0]


def _f32(x: float) -> float:
    """x rounded to fp32, as the kernel sees it on a GPU (the interpreter would keep the double)."""
    return struct.unpack("<f", struct.pack("<f", float(x)))[0]


@functools.lru_cache(maxsize=64)
def log_grid_table(bits: int, base: float, delta: float, device: torch.device) -> torch.Tensor:
    """fp32 [2^bits]: δ base^-c for every code c, each evaluated in fp64 and rounded once."""
    return torch.tensor([delta * base ** -c for c in range(1 << bits)], dtype=torch.float32, device=device)


def quant_attention_forward(kind: int, q, k, v, out, strides: dict, groups: int, heads: int, n_max: int,
                            n_k_max: int, q_scale: float, k_scale: float, v_scale: float, zeros, bits: int,
                            base: float, delta: float, scale: float, modifier: dict) -> None:
    """Launches _attn_fwd_quant over groups x ceil(n_max / BLOCK_M) x heads programs.

    strides: "q", "k", "v", "o" as for attention_forward; zeros: (z_q, z_k, z_v); scale: the softmax
    scale (already defaulted); modifier: the kind's geometry arguments (see _TOKEN_ARGS).
    """
    dqk, dv = q.shape[-1], v.shape[-1]
    # The int8 dot's reduction dim: at least 32 (the int8 MMA's k).
    bdqk, bdv = max(32, head_block(dqk)), head_block(dv)
    # fp32 tiles: P̂ v̂ runs as an exact-product fp32 dot, as fp32 attention does (see tile_config).
    block_m, block_n, warps, stages = tile_config(n_k_max, bdqk, bdv, torch.float32)
    if IS_INTERPRETED:
        # The interpreter pays per tile step, not per element: whole rows of up to 128 keys at a time.
        block_m = block_n = max(16, min(128, 1 << max(0, max(n_max, n_k_max) - 1).bit_length()))
    m_blocks = triton.cdiv(n_max, block_m)
    mod = _modifier_args(modifier, q)
    zq, zk, zv = (int(z) for z in zeros)
    table = log_grid_table(int(bits), float(base), float(delta), q.device)
    with device_ctx(q):
        launcher(_attn_fwd_quant)[(groups * m_blocks * heads,)](
            q, k, v, out, table,
            **_strided("q", strides["q"]), **_strided("k", strides["k"]), **_strided("v", strides["v"]),
            **_strided("o", strides["o"]),
            **{name: mod[name] for name in _TOKEN_ARGS},
            HEADS=heads, M_BLOCKS=m_blocks, DQK=dqk, DV=dv,
            sq_bits=_f64_bits(q_scale), sk_bits=_f64_bits(k_scale), sv_bits=_f64_bits(v_scale),
            zq=zq, zk=zk, zv=zv, alpha=_f32(scale * q_scale * k_scale), inv_ln_base=_f32(1.0 / math.log(base)),
            ln_delta_bits=_f64_bits(math.log(delta)), LEVELS=1 << int(bits), KIND=kind,
            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_DQK=bdqk, BLOCK_DV=bdv,
            num_warps=warps, num_stages=stages,
        )
