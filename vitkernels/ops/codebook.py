"""The codebook family (VQ tokenizers): nearest-code search and code lookup.

torch.ops.vitk.codebook_argmin(z, codebook, *, cosine=False, exact=False) -> (indices, distances)
torch.ops.vitk.codebook_lookup(indices, codebook) -> Tensor            (differentiable in codebook)
torch.ops.vitk.codebook_lookup_backward(grad_output, indices, codebook_shape) -> Tensor

Schemas in csrc/vitk.cpp, C++ kernels in csrc/cpu/codebook.cpp and csrc/cuda/codebook.cpp; this
module declares the rest (checks, fakes, backends, autograd) through ops/_define.py.
"""
from typing import List

import torch

from ..dispatch import ALL_FLOAT_DTYPES, FLOAT_DTYPES
from . import _checks as check
from ._define import Limit, cpp, define, triton

# The CPU search keeps block indices in int32 lanes (vitk::cpu::kMaxCodes).
MAX_CPU_CODES = (2**31 - 1) // 2
INDEX_DTYPES = {torch.int64, torch.int32}


def _codebook(name, codebook, ref_name, ref):
    check.tensor(name, codebook, dims=None, like=(ref_name, ref))
    if codebook.dim() not in (2, 3):
        raise ValueError(f"{name}: expected 2 dimensions [K, D] or 3 dimensions [G, K, D], "
                         f"got shape {tuple(codebook.shape)}")
    if codebook.shape[-2] == 0:
        raise ValueError(f"{name}: expected at least one code, got an empty codebook of shape {tuple(codebook.shape)}")


# ---------------------------------------------------------------- codebook_argmin
def _check_argmin(z, codebook, cosine, exact):
    check.tensor("z", z, dtypes=FLOAT_DTYPES)
    _codebook("codebook", codebook, "z", z)
    check.same_dtype("codebook", codebook, "z", z)
    K, D = codebook.shape[-2], codebook.shape[-1]
    if D == 0:
        raise ValueError(f"codebook: expected a non-empty code dimension D, got shape {tuple(codebook.shape)}")
    if z.dim() < 1 or z.shape[-1] != D:
        raise ValueError(f"z: expected last dimension D={D} to match codebook {tuple(codebook.shape)}, "
                         f"got shape {tuple(z.shape)}")
    if codebook.dim() == 3 and (z.dim() < 2 or z.shape[-2] != codebook.shape[0]):
        raise ValueError(f"z: expected shape [..., G={codebook.shape[0]}, D={D}] for a grouped codebook "
                         f"{tuple(codebook.shape)}, got {tuple(z.shape)}")


def _argmin_fake(z, codebook, cosine, exact):
    shape = z.shape[:-1]
    return z.new_empty(shape, dtype=torch.int64), z.new_empty(shape, dtype=torch.float32)


define("codebook_argmin", check=_check_argmin, fake=_argmin_fake, backends=[
    cpp("cpu", limits=[Limit("codes", MAX_CPU_CODES, lambda z, codebook, cosine, exact: codebook.shape[-2])]),
    triton("codebook"),
])


# ---------------------------------------------------------------- codebook_lookup
def _check_lookup(indices, codebook):
    check.tensor("indices", indices, dtypes=INDEX_DTYPES)
    _codebook("codebook", codebook, "indices", indices)
    if not codebook.dtype.is_floating_point:
        raise ValueError(f"codebook: expected a floating-point dtype, got {codebook.dtype}")
    if codebook.dim() == 3 and (indices.dim() < 1 or indices.shape[-1] != codebook.shape[0]):
        raise ValueError(f"indices: expected shape [..., G={codebook.shape[0]}] for a grouped codebook "
                         f"{tuple(codebook.shape)}, got {tuple(indices.shape)}")


def check_index_range(indices: torch.Tensor, num_codes: int) -> None:
    """Out-of-range indices raise IndexError, as the C++ kernels do. GPU kernels cannot raise, so their
    launchers pay this one reduction (and a sync) instead of reading out of bounds."""
    if indices.numel():
        lo, hi = torch.aminmax(indices)
        lo, hi = int(lo), int(hi)
        if lo < 0 or hi >= num_codes:
            raise IndexError(f"indices: expected values in [0, {num_codes}), got {lo if lo < 0 else hi}")


def _lookup_fake(indices, codebook):
    return codebook.new_empty((*indices.shape, codebook.shape[-1]))


def _lookup_setup_context(ctx, inputs, output):
    indices, codebook = inputs
    ctx.save_for_backward(indices)
    ctx.codebook_shape = list(codebook.shape)


def _lookup_backward(ctx, grad_output):
    (indices,) = ctx.saved_tensors
    grad_codebook = None
    if ctx.needs_input_grad[1]:
        grad_codebook = torch.ops.vitk.codebook_lookup_backward(grad_output, indices, ctx.codebook_shape)
    return None, grad_codebook


define("codebook_lookup", check=_check_lookup, fake=_lookup_fake, device_arg=1,
       autograd=(_lookup_backward, _lookup_setup_context), backends=[
           cpp("cpu", dtypes=ALL_FLOAT_DTYPES),
           cpp("cuda", dtypes=ALL_FLOAT_DTYPES),
           triton("codebook", dtypes=ALL_FLOAT_DTYPES,
                  guard=lambda indices, codebook: check_index_range(indices, codebook.shape[-2])),
       ])


# ---------------------------------------------------------------- codebook_lookup_backward
def _check_lookup_backward(grad_output, indices, codebook_shape):
    check.tensor("grad_output", grad_output, dtypes=ALL_FLOAT_DTYPES)
    check.tensor("indices", indices, dtypes=INDEX_DTYPES, like=("grad_output", grad_output))
    shape = list(codebook_shape)
    if len(shape) not in (2, 3) or any(s < 0 for s in shape):
        raise ValueError(f"codebook_shape: expected [K, D] or [G, K, D] of non-negative sizes, got {shape}")
    if tuple(grad_output.shape) != (*indices.shape, shape[-1]):
        raise ValueError(f"grad_output: expected shape {(*indices.shape, shape[-1])} (indices.shape + [D]), "
                         f"got {tuple(grad_output.shape)}")
    if len(shape) == 3 and (indices.dim() < 1 or indices.shape[-1] != shape[0]):
        raise ValueError(f"indices: expected shape [..., G={shape[0]}], got {tuple(indices.shape)}")


def _lookup_backward_fake(grad_output, indices, codebook_shape):
    return grad_output.new_empty(list(codebook_shape))


define("codebook_lookup_backward", check=_check_lookup_backward, fake=_lookup_backward_fake, backends=[
    cpp("cpu", dtypes=ALL_FLOAT_DTYPES),
    cpp("cuda", dtypes=ALL_FLOAT_DTYPES),
    triton("codebook", dtypes=ALL_FLOAT_DTYPES,
           guard=lambda grad_output, indices, shape: check_index_range(indices, shape[-2])),
])


# ---------------------------------------------------------------- Python API
def codebook_argmin(z: torch.Tensor, codebook: torch.Tensor, *, cosine: bool = False, exact: bool = False):
    """The nearest code of every vector, without an N x K matrix: (indices int64, distances float32),
    each of shape z.shape[:-1].

    z [..., D] with codebook [K, D], or z [..., G, D] with codebook [G, K, D] (group g is searched in
    sub-codebook g only). The distance is ||z - e||^2, or with cosine=True 2 - 2 cos of the vectors
    normalized as F.normalize does, x / max(||x||, 1e-12). Ties go to the lowest index. distances
    holds the returned code's distance evaluated directly in float64, rounded to float32 (never the
    cancellation-prone expansion).

    exact=False ranks the codes by the fp32 expansion ||e||^2 - 2 z.e (cosine: -z.e of the normalized
    vectors), as the VQ papers' code does. Its rounding error is about D * 2^-24 * (||z||^2 + ||e||^2),
    so of two codes whose distances to z differ by less, the farther may be returned: with codes far
    from the origin (around +100, say) that is no longer rare. A row of z is ranked by its direction
    alone in cosine mode, and both norms are computed overflow- and underflow-safe, so rows and codes
    of any finite magnitude (subnormal to 1e38) keep their precision.

    exact=True returns the code whose distance evaluated in float64 is lowest, ties in that value to the
    lowest index, and that value (rounded to float32) as the distance. The evaluation: (z_d - e_d)^2 summed
    over d in order with fused multiply-adds; cosine ranks by -z.e / max(||e||, 1e-12), dot products and
    the norm's sum of squares summed the same way. For L2 this value is within (D + 2) * 2^-53 (relative)
    of the true squared distance, and equal to it (so the returned code is the true nearest, true ties to
    the lowest index) when every coordinate of z and of the codes is a multiple of one power of two 2^-k
    and every |z_d - e_d| is below 2^(26.5 - k) / sqrt(D) (e.g. fp32 values all in [64, 128), multiples
    of 2^-17, at any D <= 128; integer-valued data of |x| < 2^25 / sqrt(D)). Cosine codes that are
    positive power-of-two multiples of each other tie exactly. How: the same fp32 scan on data centred on
    the group's mean code (cosine: on the normalized vectors), keeping each row's two best scores; a
    rigorous bound on the scan's rounding error says whether the best is certainly the nearest, and
    where it is not (a tie or a near-tie), every code within the bound is compared in float64. Where a
    row's or a code's centred squared norm exceeds 2^100 (|x - mean| beyond about 1e15), the row is
    compared with every code in float64: slow, but still exact. Cost: see the README.

    Non-finite values: a row of z holding a NaN or an infinity gets index 0 (no code is nearer to it than
    another) and its distance to code 0 (NaN, or inf); a code holding one is never returned unless every
    code of its group holds one, and then the index is 0. (torch.argmin would let one NaN code capture
    every row of the batch.)
    """
    return torch.ops.vitk.codebook_argmin(z, codebook, cosine=cosine, exact=exact)


def codebook_lookup(indices: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """codebook rows at indices (per group for a [G, K, D] codebook); differentiable in codebook."""
    return torch.ops.vitk.codebook_lookup(indices, codebook)


__all__: List[str] = ["codebook_argmin", "codebook_lookup"]
