"""Triton kernels of the shiftadd family (ShiftAddViT): binary linear attention and expert dispatch.

Plain functions called by vitkernels/ops/shiftadd.py after it has validated the arguments, with the
ops' own signatures:

    binary_linear_attention_fwd(q, k, v, save_for_backward) -> (out, codes, norms, state)
    binary_linear_attention_bwd(grad_out, q, k, v, out, codes, norms, state) -> (dq, dk, dv)
    expert_dispatch(x, expert_index, num_experts) -> (x_sorted, offsets, order)
    expert_combine(y_sorted, order, gate) -> Tensor
    expert_combine_bwd(grad_out, y_sorted, order, gate, y_grad, gate_grad) -> (dy_sorted, dgate)

The attention follows the CPU kernel's passes and rules (csrc/cpu/shiftadd/binary_linear_attention.cpp):
programs own fixed chunks of one (image, head) problem's tokens; the norms and the partial sums of the
normalized values come first, in float64; the means are the sums of those partials, which every later
program adds up itself in the same fixed order; the products with the binary codes are masked sums
(tl.where over the set bits, then tl.sum), never multiplications by a code; per-chunk partial states are
added in chunk order by a reduction kernel, so every result is deterministic. Non-finite inputs give
NaN where the CPU kernel (and the official eager code) does.

Dispatch is a stable counting sort: per-chunk counts, offsets laid out by one program (experts in
order, chunks in order within an expert), then each chunk places its tokens by their rank among the
chunk's tokens of the same expert (a cumulative sum of their one-hot rows). Combine writes each
output row once (order is a permutation, which the op layer checks before the launch).

Under TRITON_INTERPRET=1 (set before triton is imported) the kernels run on the CPU, which is how they
are tested without a GPU.
"""
import math
from typing import Tuple

import torch
import triton
import triton.language as tl

from ._launch import device_ctx, is_interpreted, launcher

_INV_PI = 1.0 / math.pi
MAX_EXPERTS = 1024      # one program holds an expert row of this many lanes


def _acc(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _tl(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _block_n(interpreted: bool) -> int:
    return 16 if interpreted else 32


# ------------------------------------------------------------------------------------- helpers
@triton.jit
def _tile(ptr, b, h, n, cols, s0, s1, s2, s3, mask, ACC: tl.constexpr):
    """Rows n of a [B, N, heads, d] view at (b, h), columns cols, in the accumulation type."""
    p = ptr + b * s0 + h * s2 + n[:, None] * s1 + cols[None, :] * s3
    return tl.load(p, mask=mask, other=0.0).to(ACC)


@triton.jit
def _sum_partials(ptr, count, BLOCK: tl.constexpr):
    """The float64 sum of count partials, in a fixed order."""
    total = tl.zeros([BLOCK], dtype=tl.float64)
    for start in range(0, count, BLOCK):
        i = start + tl.arange(0, BLOCK)
        total += tl.load(ptr + i, mask=i < count, other=0.0)
    return tl.sum(total, axis=0)


@triton.jit
def _norms(x, ACC: tl.constexpr):
    """sqrt of the row sums of squares, accumulated in float64 (as the CPU kernel)."""
    x64 = x.to(tl.float64)
    return tl.sqrt(tl.sum(x64 * x64, axis=1)).to(ACC)


@triton.jit
def _store_codes(codes_ptr, row, bits, cols, n_mask, WORDS: tl.constexpr):
    """bits [BLOCK_N, BLOCK_D] packed into WORDS int64 words per row (bit i of word w: column 64 w + i)."""
    shifted = bits.to(tl.int64) << (cols % 64).to(tl.int64)[None, :]
    for w in tl.static_range(WORDS):
        word = tl.sum(tl.where((cols // 64 == w)[None, :], shifted, 0), axis=1)
        tl.store(codes_ptr + row * WORDS + w, word, mask=n_mask)


@triton.jit
def _load_bits(codes_ptr, row, cols, mask, WORDS: tl.constexpr):
    words = tl.load(codes_ptr + row[:, None] * WORDS + (cols // 64)[None, :], mask=mask, other=0)
    return ((words >> (cols % 64).to(tl.int64)[None, :]) & 1) != 0


@triton.jit
def _through_norm(xn, grad, norm, ACC: tl.constexpr):
    """(dxn - xn (dxn . xn)) / ||x|| with dxn zeroed off the clamp's support [0, 1]."""
    grad = tl.where((xn >= 0) & (xn <= 1), grad, 0.0)
    proj = tl.sum(xn * grad, axis=1)
    inv = 1.0 / norm
    return (grad - xn * proj[:, None]) * inv[:, None]


@triton.jit
def _chunk(N, nh, d, dv, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr):
    """This program's problem p = (b, h) and chunk of tokens n, its channel indices and masks."""
    p = tl.program_id(0)
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.arange(0, BLOCK_D)
    vcols = tl.arange(0, BLOCK_DV)
    n_mask = n < N
    mask = n_mask[:, None] & (cols < d)[None, :]
    vmask = n_mask[:, None] & (vcols < dv)[None, :]
    return p, p // nh, p % nh, n, cols, vcols, n_mask, mask, vmask


# ------------------------------------------------------------------------------------- attention kernels
@triton.jit
def _stats_kernel(q_ptr, k_ptr, norms_ptr, sums_ptr, N, nh, d, chunks, plane,
                  qs0, qs1, qs2, qs3, ks0, ks1, ks2, ks3,
                  BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, ACC: tl.constexpr):
    p = tl.program_id(0)
    c = tl.program_id(1)
    b, h = p // nh, p % nh
    n = c * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.arange(0, BLOCK_D)
    n_mask = n < N
    mask = n_mask[:, None] & (cols < d)[None, :]
    x = _tile(q_ptr, b, h, n, cols, qs0, qs1, qs2, qs3, mask, ACC)
    nrm = _norms(x, ACC)
    xn = x * (1.0 / nrm)[:, None]
    tl.store(norms_ptr + p * N + n, nrm, mask=n_mask)
    tl.store(sums_ptr + p * chunks + c, tl.sum(tl.sum(tl.where(mask, xn.to(tl.float64), 0.0), axis=1), axis=0))
    x = _tile(k_ptr, b, h, n, cols, ks0, ks1, ks2, ks3, mask, ACC)
    nrm = _norms(x, ACC)
    xn = x * (1.0 / nrm)[:, None]
    tl.store(norms_ptr + plane + p * N + n, nrm, mask=n_mask)
    tl.store(sums_ptr + tl.num_programs(0) * chunks + p * chunks + c,
             tl.sum(tl.sum(tl.where(mask, xn.to(tl.float64), 0.0), axis=1), axis=0))


@triton.jit
def _kstate_kernel(k_ptr, v_ptr, norms_ptr, sums_ptr, codes_ptr, partial_ptr, flags_ptr, N, nh, d, dv, chunks,
                   count, ks0, ks1, ks2, ks3, vs0, vs1, vs2, vs3,
                   BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, WORDS: tl.constexpr,
                   ACC: tl.constexpr):
    p, b, h, n, cols, vcols, n_mask, mask, vmask = _chunk(N, nh, d, dv, BLOCK_N, BLOCK_D, BLOCK_DV)
    c = tl.program_id(1)
    P = tl.num_programs(0)
    mean = _sum_partials(sums_ptr + P * chunks, P * chunks, 256) / count
    nrm = tl.load(norms_ptr + P * N + p * N + n, mask=n_mask, other=1.0)
    kn = _tile(k_ptr, b, h, n, cols, ks0, ks1, ks2, ks3, mask, ACC) * (1.0 / nrm)[:, None]
    bits = mask & (kn.to(tl.float64) > mean)
    _store_codes(codes_ptr + P * N * WORDS, p * N + n, bits, cols, n_mask, WORDS)
    v = _tile(v_ptr, b, h, n, vcols, vs0, vs1, vs2, vs3, vmask, ACC)
    bad = tl.max(tl.max(tl.where(mask, (kn != kn).to(tl.int32), 0), axis=1), axis=0)
    bad = tl.maximum(bad, tl.max(tl.max(tl.where(vmask, (tl.abs(v) == float("inf")) | (v != v), 0).to(tl.int32),
                                        axis=1), axis=0))
    tl.store(flags_ptr + p * chunks + c, bad)
    # k_b^T v: the v rows of each channel's set bits, summed (a masked sum, no product with a code).
    s = tl.sum(tl.where(bits[:, :, None], v[:, None, :], 0.0), axis=0)
    off = (p * chunks + c) * d * dv + cols[:, None] * dv + vcols[None, :]
    tl.store(partial_ptr + off, s, mask=(cols < d)[:, None] & (vcols < dv)[None, :])


@triton.jit
def _reduce_kernel(partial_ptr, out_ptr, chunks, slot, mult, BLOCK: tl.constexpr, ACC: tl.constexpr):
    p = tl.program_id(0)
    i = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = i < slot
    acc = tl.zeros([BLOCK], dtype=ACC)
    for c in range(0, chunks):
        acc += tl.load(partial_ptr + (p * chunks + c) * slot + i, mask=m, other=0.0)
    tl.store(out_ptr + p * slot + i, acc * mult, mask=m)


@triton.jit
def _out_kernel(q_ptr, v_ptr, norms_ptr, sums_ptr, state_ptr, flags_ptr, codes_ptr, out_ptr, N, nh, d, dv, chunks,
                count, inv_pi, qs0, qs1, qs2, qs3, vs0, vs1, vs2, vs3,
                BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, WORDS: tl.constexpr,
                ACC: tl.constexpr):
    p, b, h, n, cols, vcols, n_mask, mask, vmask = _chunk(N, nh, d, dv, BLOCK_N, BLOCK_D, BLOCK_DV)
    c = tl.program_id(1)
    P = tl.num_programs(0)
    mean = _sum_partials(sums_ptr, P * chunks, 256) / count
    problem_bad = tl.max(tl.load(flags_ptr + p * chunks + tl.arange(0, 1)), axis=0)
    for cc in range(1, chunks):
        problem_bad = tl.maximum(problem_bad, tl.load(flags_ptr + p * chunks + cc))
    nrm = tl.load(norms_ptr + p * N + n, mask=n_mask, other=1.0)
    qn = _tile(q_ptr, b, h, n, cols, qs0, qs1, qs2, qs3, mask, ACC) * (1.0 / nrm)[:, None]
    bits = mask & (qn.to(tl.float64) > mean)
    _store_codes(codes_ptr, p * N + n, bits, cols, n_mask, WORDS)
    row_bad = tl.max(tl.where(mask, (qn != qn).to(tl.int32), 0), axis=1) | problem_bad
    S = tl.load(state_ptr + p * d * dv + cols[:, None] * dv + vcols[None, :],
                mask=(cols < d)[:, None] & (vcols < dv)[None, :], other=0.0)
    # q_b S: the state rows of each token's set bits, summed.
    acc = tl.sum(tl.where(bits[:, :, None], S[None, :, :], 0.0), axis=1)
    v = _tile(v_ptr, b, h, n, vcols, vs0, vs1, vs2, vs3, vmask, ACC)
    u = 0.5 * v + inv_pi * acc
    nu = tl.where(row_bad != 0, float("nan"), _norms(u, ACC))
    tl.store(norms_ptr + 2 * P * N + p * N + n, nu, mask=n_mask)
    o = u * (1.0 / nu)[:, None]
    tl.store(out_ptr + ((b * N + n[:, None]) * nh + h) * dv + vcols[None, :], o.to(out_ptr.dtype.element_ty),
             mask=vmask)


@triton.jit
def _bwd_q_kernel(g_ptr, o_ptr, q_ptr, norms_ptr, state_ptr, codes_ptr, dq_ptr, dv_ptr, partial_ptr,
                  N, nh, d, dv, chunks, inv_pi, gs0, gs1, gs2, gs3, os0, os1, os2, os3, qs0, qs1, qs2, qs3,
                  BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, WORDS: tl.constexpr,
                  ACC: tl.constexpr):
    p, b, h, n, cols, vcols, n_mask, mask, vmask = _chunk(N, nh, d, dv, BLOCK_N, BLOCK_D, BLOCK_DV)
    c = tl.program_id(1)
    P = tl.num_programs(0)
    smask = (cols < d)[:, None] & (vcols < dv)[None, :]
    g = _tile(g_ptr, b, h, n, vcols, gs0, gs1, gs2, gs3, vmask, ACC)
    o = _tile(o_ptr, b, h, n, vcols, os0, os1, os2, os3, vmask, ACC)
    unorm = tl.load(norms_ptr + 2 * P * N + p * N + n, mask=n_mask, other=1.0)
    du = (g - o * tl.sum(g * o, axis=1)[:, None]) * (1.0 / unorm)[:, None]
    du = tl.where(vmask, du, 0.0)
    tl.store(dv_ptr + ((b * N + n[:, None]) * nh + h) * dv + vcols[None, :], (0.5 * du).to(dv_ptr.dtype.element_ty),
             mask=vmask)
    S = tl.load(state_ptr + p * d * dv + cols[:, None] * dv + vcols[None, :], mask=smask, other=0.0)
    grad = inv_pi * tl.sum(S[None, :, :] * du[:, None, :], axis=2)
    nrm = tl.load(norms_ptr + p * N + n, mask=n_mask, other=1.0)
    qn = _tile(q_ptr, b, h, n, cols, qs0, qs1, qs2, qs3, mask, ACC) * (1.0 / nrm)[:, None]
    dq = _through_norm(qn, grad, nrm, ACC)
    tl.store(dq_ptr + ((b * N + n[:, None]) * nh + h) * d + cols[None, :], dq.to(dq_ptr.dtype.element_ty), mask=mask)
    bits = _load_bits(codes_ptr, p * N + n, cols, mask, WORDS)
    ds = tl.sum(tl.where(bits[:, :, None], du[:, None, :], 0.0), axis=0)
    tl.store(partial_ptr + (p * chunks + c) * d * dv + cols[:, None] * dv + vcols[None, :], ds, mask=smask)


@triton.jit
def _bwd_k_kernel(v_ptr, k_ptr, norms_ptr, ds_ptr, codes_ptr, dk_ptr, dv_ptr, N, nh, d, dv,
                  vs0, vs1, vs2, vs3, ks0, ks1, ks2, ks3,
                  BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, WORDS: tl.constexpr,
                  ACC: tl.constexpr):
    p, b, h, n, cols, vcols, n_mask, mask, vmask = _chunk(N, nh, d, dv, BLOCK_N, BLOCK_D, BLOCK_DV)
    c = tl.program_id(1)
    P = tl.num_programs(0)
    dS = tl.load(ds_ptr + p * d * dv + cols[:, None] * dv + vcols[None, :],
                 mask=(cols < d)[:, None] & (vcols < dv)[None, :], other=0.0)
    v = _tile(v_ptr, b, h, n, vcols, vs0, vs1, vs2, vs3, vmask, ACC)
    grad = tl.sum(dS[None, :, :] * v[:, None, :], axis=2)
    nrm = tl.load(norms_ptr + P * N + p * N + n, mask=n_mask, other=1.0)
    kn = _tile(k_ptr, b, h, n, cols, ks0, ks1, ks2, ks3, mask, ACC) * (1.0 / nrm)[:, None]
    dk = _through_norm(kn, grad, nrm, ACC)
    tl.store(dk_ptr + ((b * N + n[:, None]) * nh + h) * d + cols[None, :], dk.to(dk_ptr.dtype.element_ty), mask=mask)
    bits = _load_bits(codes_ptr + P * N * WORDS, p * N + n, cols, mask, WORDS)
    add = tl.sum(tl.where(bits[:, :, None], dS[None, :, :], 0.0), axis=1)
    dvp = dv_ptr + ((b * N + n[:, None]) * nh + h) * dv + vcols[None, :]
    tl.store(dvp, (tl.load(dvp, mask=vmask, other=0.0).to(ACC) + add).to(dv_ptr.dtype.element_ty), mask=vmask)


def _blocks(q, v):
    d, dv = q.shape[-1], v.shape[-1]
    return _block_n(is_interpreted(_stats_kernel)), triton.next_power_of_2(d), triton.next_power_of_2(dv)


def _reduce(partial, out, P, chunks, slot, mult):
    BLOCK = min(1024, triton.next_power_of_2(max(slot, 1)))
    launcher(_reduce_kernel)[(P, triton.cdiv(slot, BLOCK))](partial, out, chunks, slot, mult, BLOCK=BLOCK,
                                                              ACC=_tl(out.dtype))


def binary_linear_attention_fwd(q, k, v, save_for_backward=True):
    B, N, nh, d = q.shape
    dv = v.shape[-1]
    acc = _acc(q)
    words = (d + 63) // 64
    out = torch.empty((B, N, nh, dv), dtype=q.dtype, device=q.device)
    codes = torch.empty((2, B, nh, N, words), dtype=torch.int64, device=q.device)
    norms = torch.empty((3, B, nh, N), dtype=acc, device=q.device)
    state = torch.empty((B, nh, d, dv), dtype=acc, device=q.device)
    P = B * nh
    if out.numel() == 0:
        state.zero_()
    else:
        BLOCK_N, BLOCK_D, BLOCK_DV = _blocks(q, v)
        chunks = triton.cdiv(N, BLOCK_N)
        sums = torch.empty((2, P * chunks), dtype=torch.float64, device=q.device)
        partial = torch.empty((P, chunks, d, dv), dtype=acc, device=q.device)
        flags = torch.empty((P, chunks), dtype=torch.int32, device=q.device)
        count = float(P * N * d)
        ACC = _tl(acc)
        grid = (P, chunks)
        with device_ctx(q):
            launcher(_stats_kernel)[grid](q, k, norms, sums, N, nh, d, chunks, P * N, *q.stride(), *k.stride(),
                                          BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D, ACC=ACC)
            launcher(_kstate_kernel)[grid](k, v, norms, sums, codes, partial, flags, N, nh, d, dv, chunks, count,
                                           *k.stride(), *v.stride(), BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D,
                                           BLOCK_DV=BLOCK_DV, WORDS=words, ACC=ACC)
            _reduce(partial, state, P, chunks, d * dv, 1.0)
            launcher(_out_kernel)[grid](q, v, norms, sums, state, flags, codes, out, N, nh, d, dv, chunks, count,
                                        _INV_PI, *q.stride(), *v.stride(), BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D,
                                        BLOCK_DV=BLOCK_DV, WORDS=words, ACC=ACC)
    if not save_for_backward:
        return out, codes.new_empty((0,)), norms.new_empty((0,)), state.new_empty((0,))
    return out, codes, norms, state


def binary_linear_attention_bwd(grad_out, q, k, v, out, codes, norms, state):
    B, N, nh, d = q.shape
    dv = v.shape[-1]
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    dk = torch.empty(k.shape, dtype=q.dtype, device=q.device)
    dvt = torch.empty(v.shape, dtype=q.dtype, device=q.device)
    if dq.numel() == 0 or dvt.numel() == 0:
        return dq, dk, dvt
    P = B * nh
    BLOCK_N, BLOCK_D, BLOCK_DV = _blocks(q, v)
    chunks = triton.cdiv(N, BLOCK_N)
    acc = _acc(q)
    ACC = _tl(acc)
    codes, norms, state = codes.contiguous(), norms.contiguous(), state.contiguous()
    partial = torch.empty((P, chunks, d, dv), dtype=acc, device=q.device)
    dS = torch.empty((P, d, dv), dtype=acc, device=q.device)
    words = codes.shape[-1]
    grid = (P, chunks)
    with device_ctx(q):
        launcher(_bwd_q_kernel)[grid](grad_out, out, q, norms, state, codes, dq, dvt, partial, N, nh, d, dv, chunks,
                                      _INV_PI, *grad_out.stride(), *out.stride(), *q.stride(), BLOCK_N=BLOCK_N,
                                      BLOCK_D=BLOCK_D, BLOCK_DV=BLOCK_DV, WORDS=words, ACC=ACC)
        _reduce(partial, dS, P, chunks, d * dv, _INV_PI)
        launcher(_bwd_k_kernel)[grid](v, k, norms, dS, codes, dk, dvt, N, nh, d, dv, *v.stride(), *k.stride(),
                                      BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D, BLOCK_DV=BLOCK_DV, WORDS=words, ACC=ACC)
    return dq, dk, dvt


# ------------------------------------------------------------------------------------- expert dispatch
@triton.jit
def _count_kernel(idx_ptr, counts_ptr, T, E, s_idx, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr):
    c = tl.program_id(0)
    t = c * BLOCK_T + tl.arange(0, BLOCK_T)
    e = tl.load(idx_ptr + t * s_idx, mask=t < T, other=-1)
    experts = tl.arange(0, BLOCK_E)
    onehot = (e[:, None] == experts[None, :]).to(tl.int64)
    tl.store(counts_ptr + c * E + experts, tl.sum(onehot, axis=0), mask=experts < E)


@triton.jit
def _offsets_kernel(counts_ptr, slots_ptr, offsets_ptr, E, chunks, BLOCK_E: tl.constexpr):
    """One program: each (chunk, expert)'s first slot, experts in order and chunks in order within one."""
    experts = tl.arange(0, BLOCK_E)
    em = experts < E
    totals = tl.zeros([BLOCK_E], dtype=tl.int64)
    for c in range(0, chunks):
        totals += tl.load(counts_ptr + c * E + experts, mask=em, other=0)
    starts = tl.cumsum(totals, axis=0) - totals
    tl.store(offsets_ptr + experts, starts, mask=em)
    tl.store(offsets_ptr + E + tl.arange(0, 1), tl.sum(totals, axis=0) + tl.zeros([1], dtype=tl.int64))
    running = starts
    for c in range(0, chunks):
        tl.store(slots_ptr + c * E + experts, running, mask=em)
        running += tl.load(counts_ptr + c * E + experts, mask=em, other=0)


@triton.jit
def _place_kernel(idx_ptr, slots_ptr, order_ptr, T, E, s_idx, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr):
    c = tl.program_id(0)
    t = c * BLOCK_T + tl.arange(0, BLOCK_T)
    tm = t < T
    e = tl.load(idx_ptr + t * s_idx, mask=tm, other=-1)
    experts = tl.arange(0, BLOCK_E)
    onehot = (e[:, None] == experts[None, :]).to(tl.int64)
    rank = tl.sum(tl.cumsum(onehot, axis=0) * onehot, axis=1) - 1      # earlier tokens of the same expert
    slot = tl.load(slots_ptr + c * E + e, mask=tm, other=0)
    tl.store(order_ptr + slot + rank, t.to(tl.int64), mask=tm)


@triton.jit
def _gather_kernel(src_ptr, rows_ptr, scale_ptr, dst_ptr, T, C, s_r, s_c, s_scale, SCALED: tl.constexpr,
                   SCATTER: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr, ACC: tl.constexpr):
    """dst[i] = src[rows[i]] (SCATTER: dst[rows[i]] = src[i]), times scale at the token's row when SCALED."""
    i = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    im = i < T
    m = im[:, None] & (cols < C)[None, :]
    r = tl.load(rows_ptr + i, mask=im, other=0)
    src_row = i if SCATTER else r
    dst_row = r if SCATTER else i
    x = tl.load(src_ptr + src_row[:, None] * s_r + cols[None, :] * s_c, mask=m, other=0.0).to(ACC)
    if SCALED:
        x = x * tl.load(scale_ptr + r * s_scale, mask=im, other=0.0).to(ACC)[:, None]
    tl.store(dst_ptr + dst_row[:, None] * C + cols[None, :], x.to(dst_ptr.dtype.element_ty), mask=m)


@triton.jit
def _gate_grad_kernel(g_ptr, y_ptr, order_ptr, dgate_ptr, T, C, gs0, gs1, ys0, ys1,
                      BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
    i = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    im = i < T
    t = tl.load(order_ptr + i, mask=im, other=0)
    acc = tl.zeros([BLOCK_T], dtype=tl.float64)
    for c0 in range(0, C, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        m = im[:, None] & (cols < C)[None, :]
        g = tl.load(g_ptr + t[:, None] * gs0 + cols[None, :] * gs1, mask=m, other=0.0).to(tl.float64)
        y = tl.load(y_ptr + i[:, None] * ys0 + cols[None, :] * ys1, mask=m, other=0.0).to(tl.float64)
        acc += tl.sum(g * y, axis=1)
    tl.store(dgate_ptr + t, acc.to(dgate_ptr.dtype.element_ty), mask=im)


def _gather(src, rows, dst, scale=None, scatter=False):
    T, C = src.shape
    if T == 0 or C == 0:
        return dst
    BLOCK_T, BLOCK_C = 32, min(128, triton.next_power_of_2(C))
    grid = (triton.cdiv(T, BLOCK_T), triton.cdiv(C, BLOCK_C))
    with device_ctx(src):
        launcher(_gather_kernel)[grid](src, rows, scale if scale is not None else src, dst, T, C, *src.stride(),
                                       scale.stride(0) if scale is not None else 0, SCALED=scale is not None,
                                       SCATTER=scatter, BLOCK_T=BLOCK_T, BLOCK_C=BLOCK_C, ACC=_tl(_acc(src)))
    return dst


def expert_dispatch(x, expert_index, num_experts) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    T, C = x.shape
    E = int(num_experts)
    offsets = torch.empty((E + 1,), dtype=torch.int64, device=x.device)
    order = torch.empty((T,), dtype=torch.int64, device=x.device)
    BLOCK_T = 64 if is_interpreted(_count_kernel) else 256
    BLOCK_E = triton.next_power_of_2(E)
    chunks = max(1, triton.cdiv(T, BLOCK_T))
    counts = torch.empty((chunks, E), dtype=torch.int64, device=x.device)
    slots = torch.empty((chunks, E), dtype=torch.int64, device=x.device)
    with device_ctx(x):
        launcher(_count_kernel)[(chunks,)](expert_index, counts, T, E, expert_index.stride(0), BLOCK_T=BLOCK_T,
                                           BLOCK_E=BLOCK_E)
        launcher(_offsets_kernel)[(1,)](counts, slots, offsets, E, chunks, BLOCK_E=BLOCK_E)
        if T:
            launcher(_place_kernel)[(chunks,)](expert_index, slots, order, T, E, expert_index.stride(0),
                                               BLOCK_T=BLOCK_T, BLOCK_E=BLOCK_E)
    x_sorted = _gather(x, order, torch.empty((T, C), dtype=x.dtype, device=x.device))
    return x_sorted, offsets, order


def expert_combine(y_sorted, order, gate):
    order = order.contiguous()
    out = torch.empty(y_sorted.shape, dtype=y_sorted.dtype, device=y_sorted.device)
    return _gather(y_sorted, order, out, scale=gate, scatter=True)


def expert_combine_bwd(grad_out, y_sorted, order, gate, y_grad, gate_grad):
    order = order.contiguous()
    T, C = y_sorted.shape
    dy = torch.empty((T, C) if y_grad else (0,), dtype=y_sorted.dtype, device=y_sorted.device)
    dgate = torch.empty((T if gate_grad else 0,), dtype=gate.dtype, device=gate.device)
    if y_grad:
        _gather(grad_out, order, dy, scale=gate)
    if gate_grad and T:
        BLOCK_T, BLOCK_C = 32, min(128, triton.next_power_of_2(max(C, 1)))
        with device_ctx(y_sorted):
            launcher(_gate_grad_kernel)[(triton.cdiv(T, BLOCK_T),)](grad_out, y_sorted, order, dgate, T, C,
                                                                   *grad_out.stride(), *y_sorted.stride(),
                                                                   BLOCK_T=BLOCK_T, BLOCK_C=BLOCK_C)
    return dy, dgate
