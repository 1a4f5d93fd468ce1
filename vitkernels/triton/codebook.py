"""Triton kernels of the codebook family (VQ tokenizers): nearest-code search and code lookup.

Plain functions called by vitkernels/ops/codebook.py after it has validated the arguments:

    codebook_argmin(z, codebook, cosine) -> (indices int64, distances float32)
    codebook_lookup(indices, codebook) -> Tensor
    codebook_lookup_backward(grad_output, indices, codebook_shape) -> Tensor

A [G, K, D] codebook is factorized: z is [..., G, D] and group g is searched (or gathered, or
scattered) only in sub-codebook g; every group runs in the same launch, on its own grid axis.

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

_EPS = 1e-12           # F.normalize's default eps
# Larger than any code index, so it loses every lowest-index tie break.
_BIG_INDEX = tl.constexpr(2**31 - 1)


# ------------------------------------------------------------------------------------- helpers
@triton.jit
def _exact_distance(z_ptr, z_row, row_mask, s_zd, cb_g_ptr, code, s_ck, s_cd, D, EPS,
                    COSINE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """The reported distance of each row to its chosen code, recomputed from the vectors themselves.

    The search ranks by ||e||^2 - 2 z.e, which cancels badly when z is close to e; the value we hand
    back (a VQ loss is built from it) is the direct sum of squares, in fp32.
    """
    sq = tl.zeros([BLOCK_M], dtype=tl.float32)
    zz = tl.zeros([BLOCK_M], dtype=tl.float32)
    ee = tl.zeros([BLOCK_M], dtype=tl.float32)
    ze = tl.zeros([BLOCK_M], dtype=tl.float32)
    e_row = code.to(tl.int64) * s_ck
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        m = row_mask[:, None] & (d < D)[None, :]
        zt = tl.load(z_ptr + z_row[:, None] + d[None, :] * s_zd, mask=m, other=0.0).to(tl.float32)
        et = tl.load(cb_g_ptr + e_row[:, None] + d[None, :] * s_cd, mask=m, other=0.0).to(tl.float32)
        if COSINE:
            zz += tl.sum(zt * zt, axis=1)
            ee += tl.sum(et * et, axis=1)
            ze += tl.sum(zt * et, axis=1)
        else:
            diff = zt - et
            sq += tl.sum(diff * diff, axis=1)
    if COSINE:
        cos = ze / (tl.maximum(tl.sqrt(zz), EPS) * tl.maximum(tl.sqrt(ee), EPS))
        # 2 - 2cos is a squared distance; rounding can push cos a hair above 1 when z is parallel to
        # its code, so clamp rather than hand a VQ loss a negative value.
        sq = tl.maximum(2.0 - 2.0 * cos, 0.0)
    return sq


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
def _row_offsets(rows, n1, n2, s_z0, s_z1, s_z2):
    """Element offset of flat row n of z, whose leading dims collapse to at most three (n0, n1, n2)."""
    i2 = rows % n2
    t = rows // n2
    i1 = t % n1
    i0 = t // n1
    return i0.to(tl.int64) * s_z0 + i1.to(tl.int64) * s_z1 + i2.to(tl.int64) * s_z2


# ------------------------------------------------------------------------------ codebook_argmin
@triton.jit
def _argmin_kernel(
    z_ptr, cb_ptr, idx_out_ptr, dist_out_ptr, part_val_ptr, part_idx_ptr,
    N, K, D, G, n1, n2,
    s_z0, s_z1, s_z2, s_zg, s_zd,
    s_cg, s_ck, s_cd,
    K_PER_SPLIT, EPS,
    COSINE: tl.constexpr, SPLIT: tl.constexpr, Z_RESIDENT: tl.constexpr, IEEE: tl.constexpr,
    UPCAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """One program: BLOCK_M rows of group pid(1) against codes [pid(2) * K_PER_SPLIT, +K_PER_SPLIT).

    Keeps a running (min score, argmin) per row over BLOCK_N-code tiles, so memory is O(N), never
    N x K. SPLIT=False: the program covers all K and writes the final index and exact distance.
    SPLIT=True: it writes its partial (score, index) for _argmin_combine_kernel.
    """
    pid_m = tl.program_id(0)
    g = tl.program_id(1).to(tl.int64)
    pid_s = tl.program_id(2)

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < N
    z_row = _row_offsets(rows, n1, n2, s_z0, s_z1, s_z2) + g * s_zg
    cb_g = cb_ptr + g * s_cg

    k_start = pid_s * K_PER_SPLIT
    k_end = tl.minimum(k_start + K_PER_SPLIT, K)

    if Z_RESIDENT:
        # D fits one chunk: load this program's z once and reuse it against every code tile.
        dz = tl.arange(0, BLOCK_D)
        z_res = tl.load(z_ptr + z_row[:, None] + dz[None, :] * s_zd,
                        mask=row_mask[:, None] & (dz < D)[None, :], other=0.0)

    best_val = tl.full([BLOCK_M], float("inf"), dtype=tl.float32)
    best_idx = tl.zeros([BLOCK_M], dtype=tl.int32)
    for k0 in range(k_start, k_end, BLOCK_N):
        cols = k0 + tl.arange(0, BLOCK_N)
        col_mask = cols < k_end
        e_row = cols.to(tl.int64) * s_ck
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        e2 = tl.zeros([BLOCK_N], dtype=tl.float32)
        if Z_RESIDENT:
            e = tl.load(cb_g + e_row[:, None] + dz[None, :] * s_cd,
                        mask=col_mask[:, None] & (dz < D)[None, :], other=0.0)
            acc = _dot_nt(z_res, e, acc, IEEE, UPCAST)
            ef = e.to(tl.float32)
            e2 += tl.sum(ef * ef, axis=1)
        else:
            for d0 in range(0, D, BLOCK_D):
                d = d0 + tl.arange(0, BLOCK_D)
                d_mask = d < D
                zt = tl.load(z_ptr + z_row[:, None] + d[None, :] * s_zd,
                             mask=row_mask[:, None] & d_mask[None, :], other=0.0)
                e = tl.load(cb_g + e_row[:, None] + d[None, :] * s_cd,
                            mask=col_mask[:, None] & d_mask[None, :], other=0.0)
                acc = _dot_nt(zt, e, acc, IEEE, UPCAST)
                ef = e.to(tl.float32)
                e2 += tl.sum(ef * ef, axis=1)

        if COSINE:
            # Rank by -z.e / max(||e||, eps). The 1 / max(||z||, eps) factor of cos is the same
            # positive constant along a row, so it cannot change the argmin; leaving it out keeps
            # rounding from merging or splitting near-ties.
            inv_e = 1.0 / tl.maximum(tl.sqrt(e2), EPS)
            score = -acc * inv_e[None, :]
        else:
            # ||z||^2 is constant along a row, so ||e||^2 - 2 z.e ranks codes as ||z - e||^2 does.
            score = e2[None, :] - 2.0 * acc
        score = tl.where(col_mask[None, :], score, float("inf"))

        tile_min = tl.min(score, axis=1)
        # Lowest index among the tile's minima (torch.argmin's rule); the strict < below keeps an
        # earlier tile's index on a tie across tiles.
        tile_arg = tl.min(tl.where(score == tile_min[:, None], cols[None, :], _BIG_INDEX), axis=1)
        better = tile_min < best_val
        best_val = tl.where(better, tile_min, best_val)
        best_idx = tl.where(better, tile_arg, best_idx)

    if SPLIT:
        part = (g * tl.num_programs(2) + pid_s) * N + rows
        tl.store(part_val_ptr + part, best_val, mask=row_mask)
        tl.store(part_idx_ptr + part, best_idx, mask=row_mask)
    else:
        dist = _exact_distance(z_ptr, z_row, row_mask, s_zd, cb_g, best_idx, s_ck, s_cd, D, EPS,
                               COSINE, BLOCK_M, BLOCK_D)
        out = rows.to(tl.int64) * G + g
        tl.store(idx_out_ptr + out, best_idx.to(tl.int64), mask=row_mask)
        tl.store(dist_out_ptr + out, dist, mask=row_mask)


@triton.jit
def _argmin_combine_kernel(
    z_ptr, cb_ptr, idx_out_ptr, dist_out_ptr, part_val_ptr, part_idx_ptr,
    N, D, G, S, n1, n2,
    s_z0, s_z1, s_z2, s_zg, s_zd,
    s_cg, s_ck, s_cd,
    EPS,
    COSINE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Merges the S partial results of a split search, then writes index and exact distance."""
    pid_m = tl.program_id(0)
    g = tl.program_id(1).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < N

    best_val = tl.full([BLOCK_M], float("inf"), dtype=tl.float32)
    best_idx = tl.zeros([BLOCK_M], dtype=tl.int32)
    for s in range(0, S):
        # Splits cover increasing code ranges, so merging in split order with a strict < keeps the
        # lowest index on ties, exactly as one unsplit pass would.
        part = (g * S + s) * N + rows
        v = tl.load(part_val_ptr + part, mask=row_mask, other=float("inf"))
        i = tl.load(part_idx_ptr + part, mask=row_mask, other=0)
        better = v < best_val
        best_val = tl.where(better, v, best_val)
        best_idx = tl.where(better, i, best_idx)

    z_row = _row_offsets(rows, n1, n2, s_z0, s_z1, s_z2) + g * s_zg
    dist = _exact_distance(z_ptr, z_row, row_mask, s_zd, cb_ptr + g * s_cg, best_idx, s_ck, s_cd, D, EPS,
                           COSINE, BLOCK_M, BLOCK_D)
    out = rows.to(tl.int64) * G + g
    tl.store(idx_out_ptr + out, best_idx.to(tl.int64), mask=row_mask)
    tl.store(dist_out_ptr + out, dist, mask=row_mask)


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
_ARGMIN_KEY = ["K_PER_SPLIT", "D", "COSINE", "Z_RESIDENT"]
_argmin_fp32_autotuned = (None if _IS_INTERPRETED else
                          triton.autotune(configs=_ARGMIN_CONFIGS_FP32, key=_ARGMIN_KEY)(_argmin_kernel))
_argmin_16bit_autotuned = (None if _IS_INTERPRETED else
                           triton.autotune(configs=_ARGMIN_CONFIGS_16BIT, key=_ARGMIN_KEY)(_argmin_kernel))
_MAX_BLOCK_D = {torch.float32: 32, torch.float16: 64, torch.bfloat16: 64}

_BLOCK_M = 64
_COMBINE_BLOCK_M = 128


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


def _argmin_impl(z: torch.Tensor, codebook: torch.Tensor, cosine: bool, split: int):
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

    # tl.dot needs every dim >= 16; small D is padded with masked zeros.
    BLOCK_D = min(max(_next_pow2(D), 16), _MAX_BLOCK_D.get(z.dtype, 32))
    z_resident = D <= BLOCK_D
    ieee = z.dtype == torch.float32
    upcast = _IS_INTERPRETED and z.dtype == torch.bfloat16
    split = max(1, min(int(split), K))
    # Whole 128-code ranges per split: every split but the last then sweeps only full BLOCK_N tiles.
    k_per_split = triton.cdiv(triton.cdiv(K, split), 128) * 128 if split > 1 else K
    split = triton.cdiv(K, k_per_split)

    if split > 1:
        part_val = torch.empty((G, split, N), dtype=torch.float32, device=z.device)
        part_idx = torch.empty((G, split, N), dtype=torch.int32, device=z.device)
    else:
        part_val, part_idx = distances, indices  # unused when SPLIT is False

    common = dict(COSINE=bool(cosine), SPLIT=split > 1, Z_RESIDENT=z_resident, IEEE=ieee, UPCAST=upcast,
                  BLOCK_M=_BLOCK_M, BLOCK_D=BLOCK_D)
    if _IS_INTERPRETED:
        kernel, meta = _argmin_kernel, dict(BLOCK_N=64)
    else:
        kernel, meta = (_argmin_fp32_autotuned if ieee else _argmin_16bit_autotuned), {}
    grid = (triton.cdiv(N, _BLOCK_M), G, split)
    with device_ctx(z):
        launcher(kernel)[grid](
            z, cb, indices, distances, part_val, part_idx,
            N, K, D, G, n1, n2,
            s_z0, s_z1, s_z2, s_zg, s_zd,
            s_cg, s_ck, s_cd,
            k_per_split, _EPS,
            **common, **meta,
        )
        if split > 1:
            launcher(_argmin_combine_kernel)[(triton.cdiv(N, _COMBINE_BLOCK_M), G)](
                z, cb, indices, distances, part_val, part_idx,
                N, D, G, split, n1, n2,
                s_z0, s_z1, s_z2, s_zg, s_zd,
                s_cg, s_ck, s_cd,
                _EPS,
                COSINE=bool(cosine), BLOCK_M=_COMBINE_BLOCK_M, BLOCK_D=BLOCK_D,
            )
    return indices, distances


def codebook_argmin(z: torch.Tensor, codebook: torch.Tensor, cosine: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """Nearest code per vector: (indices int64, distances float32), each of shape z.shape[:-1].

    z [..., D] with codebook [K, D], or z [..., G, D] with codebook [G, K, D]. distances is the
    exact ||z - e||^2 of the chosen code (cosine: 2 - 2 cos of the normalized vectors), in fp32.
    Ties go to the lowest index. z may be any strided view; no N x K matrix is ever formed.
    """
    grouped = codebook.dim() == 3
    N = math.prod(z.shape[:-2] if grouped else z.shape[:-1])
    split = _split_count(N, codebook.shape[0] if grouped else 1, codebook.shape[-2], z.device)
    return _argmin_impl(z, codebook, cosine, split)


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
