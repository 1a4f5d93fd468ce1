"""The codebook family (VQ tokenizers): nearest-code search and code lookup.

torch.ops.vitk.codebook_argmin(z, codebook, *, cosine=False) -> (indices, distances)
torch.ops.vitk.codebook_lookup(indices, codebook) -> Tensor            (differentiable in codebook)
torch.ops.vitk.codebook_lookup_backward(grad_output, indices, codebook_shape) -> Tensor

Schemas live in csrc/vitk.cpp; this module binds each op's CPU and CUDA dispatch keys to a router
that validates the arguments (the same checks the fake kernels run under torch.compile) and calls
the backend vitkernels.dispatch.choose picks: the C++ CPU kernel, the CUDA kernel, or Triton.
"""
from typing import List

import torch

from .. import dispatch
from .._lib import load as _load

_C, _ = _load()

_ARGMIN, _LOOKUP, _LOOKUP_BWD = "codebook_argmin", "codebook_lookup", "codebook_lookup_backward"


def _triton():
    from ..triton import codebook as tk
    return tk


# ---------------------------------------------------------------- argument checks
def _check_argmin_args(z: torch.Tensor, codebook: torch.Tensor) -> None:
    if not isinstance(z, torch.Tensor):
        raise TypeError(f"z: expected a Tensor, got {type(z).__name__}")
    if not isinstance(codebook, torch.Tensor):
        raise TypeError(f"codebook: expected a Tensor, got {type(codebook).__name__}")
    if codebook.dim() not in (2, 3):
        raise ValueError(f"codebook: expected 2 dimensions [K, D] or 3 dimensions [G, K, D], got shape {tuple(codebook.shape)}")
    if z.dtype not in dispatch.FLOAT_DTYPES:
        raise ValueError(f"z: expected dtype float32, float16 or bfloat16, got {z.dtype}")
    if codebook.dtype != z.dtype:
        raise ValueError(f"codebook: expected the same dtype as z ({z.dtype}), got {codebook.dtype}")
    if codebook.device != z.device:
        raise ValueError(f"codebook: expected a tensor on z's device ({z.device}), got one on {codebook.device}")
    K, D = codebook.shape[-2], codebook.shape[-1]
    if K == 0:
        raise ValueError(f"codebook: expected at least one code, got an empty codebook of shape {tuple(codebook.shape)}")
    if D == 0:
        raise ValueError(f"codebook: expected a non-empty code dimension D, got shape {tuple(codebook.shape)}")
    if z.dim() < 1 or z.shape[-1] != D:
        raise ValueError(f"z: expected last dimension D={D} to match codebook {tuple(codebook.shape)}, got shape {tuple(z.shape)}")
    if codebook.dim() == 3 and (z.dim() < 2 or z.shape[-2] != codebook.shape[0]):
        raise ValueError(f"z: expected shape [..., G={codebook.shape[0]}, D={D}] for a grouped codebook "
                         f"{tuple(codebook.shape)}, got {tuple(z.shape)}")


def _check_lookup_args(indices: torch.Tensor, codebook: torch.Tensor) -> None:
    if not isinstance(indices, torch.Tensor):
        raise TypeError(f"indices: expected a Tensor, got {type(indices).__name__}")
    if not isinstance(codebook, torch.Tensor):
        raise TypeError(f"codebook: expected a Tensor, got {type(codebook).__name__}")
    if indices.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"indices: expected dtype int64 or int32, got {indices.dtype}")
    if codebook.dim() not in (2, 3):
        raise ValueError(f"codebook: expected 2 dimensions [K, D] or 3 dimensions [G, K, D], got shape {tuple(codebook.shape)}")
    if not codebook.dtype.is_floating_point:
        raise ValueError(f"codebook: expected a floating-point dtype, got {codebook.dtype}")
    if codebook.device != indices.device:
        raise ValueError(f"codebook: expected a tensor on indices' device ({indices.device}), got one on {codebook.device}")
    if codebook.shape[-2] == 0:
        raise ValueError(f"codebook: expected at least one code, got an empty codebook of shape {tuple(codebook.shape)}")
    if codebook.dim() == 3 and (indices.dim() < 1 or indices.shape[-1] != codebook.shape[0]):
        raise ValueError(f"indices: expected shape [..., G={codebook.shape[0]}] for a grouped codebook "
                         f"{tuple(codebook.shape)}, got {tuple(indices.shape)}")


def _check_index_range(indices: torch.Tensor, num_codes: int) -> None:
    # The C++ CPU kernel checks while it copies; GPU kernels cannot raise, so their callers pay one
    # reduction (and a sync) here rather than read out of bounds.
    if indices.numel():
        lo, hi = int(indices.min()), int(indices.max())
        if lo < 0 or hi >= num_codes:
            bad = lo if lo < 0 else hi
            raise IndexError(f"indices: expected values in [0, {num_codes}), got {bad}")


# ---------------------------------------------------------------- codebook_argmin
@torch.library.register_fake(f"vitk::{_ARGMIN}")
def _argmin_fake(z, codebook, *, cosine=False):
    _check_argmin_args(z, codebook)
    shape = z.shape[:-1]
    return z.new_empty(shape, dtype=torch.int64), z.new_empty(shape, dtype=torch.float32)


def _argmin_router(z, codebook, *, cosine=False):
    _check_argmin_args(z, codebook)
    impl = dispatch.choose(_ARGMIN, z.device.type, z.dtype)
    return impl.fn(z, codebook, cosine)


# ---------------------------------------------------------------- codebook_lookup
def _lookup_shape(indices, codebook):
    return (*indices.shape, codebook.shape[-1])


@torch.library.register_fake(f"vitk::{_LOOKUP}")
def _lookup_fake(indices, codebook):
    _check_lookup_args(indices, codebook)
    return codebook.new_empty(_lookup_shape(indices, codebook))


def _lookup_router(indices, codebook):
    _check_lookup_args(indices, codebook)
    impl = dispatch.choose(_LOOKUP, codebook.device.type, codebook.dtype)
    if impl.backend != "cpu":
        _check_index_range(indices, codebook.shape[-2])
    return impl.fn(indices, codebook)


# ---------------------------------------------------------------- codebook_lookup_backward
def _check_lookup_backward_args(grad_output, indices, codebook_shape):
    shape = list(codebook_shape)
    if len(shape) not in (2, 3):
        raise ValueError(f"codebook_shape: expected [K, D] or [G, K, D], got {shape}")
    if tuple(grad_output.shape) != (*indices.shape, shape[-1]):
        raise ValueError(f"grad_output: expected shape {(*indices.shape, shape[-1])} (indices.shape + [D]), "
                         f"got {tuple(grad_output.shape)}")
    if len(shape) == 3 and (indices.dim() < 1 or indices.shape[-1] != shape[0]):
        raise ValueError(f"indices: expected shape [..., G={shape[0]}], got {tuple(indices.shape)}")
    if indices.device != grad_output.device:
        raise ValueError(f"indices: expected a tensor on grad_output's device ({grad_output.device}), got {indices.device}")


@torch.library.register_fake(f"vitk::{_LOOKUP_BWD}")
def _lookup_backward_fake(grad_output, indices, codebook_shape):
    _check_lookup_backward_args(grad_output, indices, codebook_shape)
    return grad_output.new_empty(list(codebook_shape))


def _lookup_backward_router(grad_output, indices, codebook_shape):
    _check_lookup_backward_args(grad_output, indices, codebook_shape)
    impl = dispatch.choose(_LOOKUP_BWD, grad_output.device.type, grad_output.dtype)
    return impl.fn(grad_output, indices, list(codebook_shape))


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


torch.library.register_autograd(f"vitk::{_LOOKUP}", _lookup_backward, setup_context=_lookup_setup_context)

for _op, _router in ((_ARGMIN, _argmin_router), (_LOOKUP, _lookup_router), (_LOOKUP_BWD, _lookup_backward_router)):
    torch.library.register_kernel(f"vitk::{_op}", ("cpu", "cuda"), _router)


# ---------------------------------------------------------------- backends, in order of preference
dispatch.register(_ARGMIN, "cpu", _C.codebook_argmin_cpu, devices=("cpu",), dtypes=dispatch.FLOAT_DTYPES)
dispatch.register(_ARGMIN, "triton", lambda z, cb, cos: _triton().codebook_argmin(z, cb, cos),
                  devices=("cuda", "cpu"), dtypes=dispatch.FLOAT_DTYPES)

dispatch.register(_LOOKUP, "cpu", _C.codebook_lookup_cpu, devices=("cpu",), dtypes=dispatch.ALL_FLOAT_DTYPES)
dispatch.register(_LOOKUP_BWD, "cpu", _C.codebook_lookup_backward_cpu, devices=("cpu",),
                  dtypes=dispatch.ALL_FLOAT_DTYPES)
if hasattr(_C, "codebook_lookup_cuda"):
    dispatch.register(_LOOKUP, "cuda", _C.codebook_lookup_cuda, devices=("cuda",), dtypes=dispatch.ALL_FLOAT_DTYPES)
    dispatch.register(_LOOKUP_BWD, "cuda", _C.codebook_lookup_backward_cuda, devices=("cuda",),
                      dtypes=dispatch.ALL_FLOAT_DTYPES)
else:
    # Declared so backends() can say why it cannot run; choose() rejects it on the build check.
    def _not_built(*args):
        raise RuntimeError("the CUDA kernels were not compiled")
    dispatch.register(_LOOKUP, "cuda", _not_built, devices=("cuda",), dtypes=dispatch.ALL_FLOAT_DTYPES)
    dispatch.register(_LOOKUP_BWD, "cuda", _not_built, devices=("cuda",), dtypes=dispatch.ALL_FLOAT_DTYPES)
dispatch.register(_LOOKUP, "triton", lambda idx, cb: _triton().codebook_lookup(idx, cb),
                  devices=("cuda", "cpu"), dtypes=dispatch.ALL_FLOAT_DTYPES)
dispatch.register(_LOOKUP_BWD, "triton", lambda g, idx, shape: _triton().codebook_lookup_backward(g, idx, shape),
                  devices=("cuda", "cpu"), dtypes=dispatch.ALL_FLOAT_DTYPES)


# ---------------------------------------------------------------- Python API
def codebook_argmin(z: torch.Tensor, codebook: torch.Tensor, *, cosine: bool = False):
    """Nearest code per vector without an N x K matrix. See torch.ops.vitk.codebook_argmin."""
    return torch.ops.vitk.codebook_argmin(z, codebook, cosine=cosine)


def codebook_lookup(indices: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """codebook rows at indices (per group for a [G, K, D] codebook); differentiable in codebook."""
    return torch.ops.vitk.codebook_lookup(indices, codebook)


__all__: List[str] = ["codebook_argmin", "codebook_lookup"]
