"""The codebook family (VQ tokenizers): nearest-code search and code lookup.

torch.ops.vitk.codebook_argmin(z, codebook, *, cosine=False) -> (indices, distances)
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
def _check_argmin(z, codebook, cosine):
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


def _argmin_fake(z, codebook, cosine):
    shape = z.shape[:-1]
    return z.new_empty(shape, dtype=torch.int64), z.new_empty(shape, dtype=torch.float32)


define("codebook_argmin", check=_check_argmin, fake=_argmin_fake, backends=[
    cpp("cpu", limits=[Limit("codes", MAX_CPU_CODES, lambda z, codebook, cosine: codebook.shape[-2])]),
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
def codebook_argmin(z: torch.Tensor, codebook: torch.Tensor, *, cosine: bool = False):
    """Nearest code per vector without an N x K matrix. See torch.ops.vitk.codebook_argmin."""
    return torch.ops.vitk.codebook_argmin(z, codebook, cosine=cosine)


def codebook_lookup(indices: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """codebook rows at indices (per group for a [G, K, D] codebook); differentiable in codebook."""
    return torch.ops.vitk.codebook_lookup(indices, codebook)


__all__: List[str] = ["codebook_argmin", "codebook_lookup"]
