"""Structured-mask and reduced attention on the shared attention core.

torch.ops.vitk.polyline_attention(q, k, v, log_alpha, log_beta, scale=None, symmetric=True)   PPMA whole
torch.ops.vitk.axial_decay_attention(q, k, v, log_alpha, log_beta, scale=None)               PPMA chunk
torch.ops.vitk.gaussian_mask_attention(q, k, v, mix_weight, mix_sigma, scale=None)           GMM mask
torch.ops.vitk.reduced_attention(q, k, v, scale=None)                                        PVT / S2AFormer

Semantics: vitkernels/reference/masked_attention.py. q, k, v are [B, H, W, heads, d] (reduced:
[B, N, heads, d]), any strides; v's head dim may differ from q/k's. The masks are computed inside
the kernels' online-softmax loop from O(N) data (prefix sums of the decays, grid positions, a
[heads, H, W] table of the mixture); nothing N x N is ever stored, forward or backward.

The public ops are composites over *_fwd ops whose extra outputs autograd saves for *_bwd:
  polyline   lse [P, B, H, W, heads] fp32, P = 2 with symmetric (one softmax per mask direction),
             and for symmetric the two halves of the output, parts [2, B, H, W, heads, dv] in q's dtype
             (each half's backward needs its own rowsum(dO * O)); out = (parts[0] + parts[1]) / 2.
  axial      PPMA's criss-cross form is 0.5 A_h(A_w v) + 0.5 A_w(A_h v). axial_decay_attention_fwd
             computes it in one pass (each row's and each column's softmax once) and returns what
             the backward needs: parts [2, B, H, W, heads, dv] = [A_h y_w, A_w y_h], mids = [y_w, y_h]
             = [A_w v, A_h v] (q's dtype) and lse [2, B, H, W, heads] fp32 (row, column softmax). Its
             backward is three calls of the one-axis primitive's axial_attention_bwd, the chain rule
             through the two chained attentions of each half (the two row attentions share one call
             as two value streams). When no gradient is wanted the public op passes
             save_for_backward=False: parts and mids come back empty and only out is stored.
  gaussian   lse [B, H, W, heads].
  reduced    lse [B, Nq, heads].
"""
from typing import Optional

import torch

from .. import dispatch
from .._lib import load as _load
from .window_attention import _check_qkv, _scale

_C, _ = _load()

DECAY_DTYPES = dispatch.ALL_FLOAT_DTYPES


def _triton():
    from ..triton import masked_attention as tk
    return tk


# ---------------------------------------------------------------- argument checks
def _check_image_tensor(name, t, q, dtypes=DECAY_DTYPES):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a Tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        raise ValueError(f"{name}: expected a floating-point tensor, got {t.dtype}")
    if tuple(t.shape) != tuple(q.shape[:4]):
        raise ValueError(f"{name}: expected shape [B, H, W, heads] = {list(q.shape[:4])} (broadcast views with "
                         f"zero strides are fine), got {list(t.shape)}")
    if t.device != q.device:
        raise ValueError(f"{name}: expected a tensor on q's device ({q.device}), got one on {t.device}")


def _check_image_qkv(q, k, v):
    _check_qkv(q, k, v, 5, "[B, H, W, heads, head_dim]")


def _check_polyline(q, k, v, log_alpha, log_beta):
    _check_image_qkv(q, k, v)
    _check_image_tensor("log_alpha", log_alpha, q)
    _check_image_tensor("log_beta", log_beta, q)


def _check_axial(q, k, v, log_decay, axis):
    _check_image_qkv(q, k, v)
    _check_image_tensor("log_decay", log_decay, q)
    if int(axis) not in (1, 2):
        raise ValueError(f"axis: expected 1 (attention along H, within columns) or 2 (along W, within rows), "
                         f"got {axis}")


def _check_gaussian(q, k, v, mix_weight, mix_sigma):
    _check_image_qkv(q, k, v)
    heads = q.shape[3]
    for name, t in (("mix_weight", mix_weight), ("mix_sigma", mix_sigma)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: expected a Tensor, got {type(t).__name__}")
        if t.dtype not in DECAY_DTYPES:
            raise ValueError(f"{name}: expected a floating-point tensor, got {t.dtype}")
        if t.dim() != 2 or t.shape[0] != heads or t.shape[1] < 1:
            raise ValueError(f"{name}: expected shape [heads, M] = [{heads}, M] with M >= 1, got {list(t.shape)}")
        if t.device != q.device:
            raise ValueError(f"{name}: expected a tensor on q's device ({q.device}), got one on {t.device}")
    if mix_sigma.shape != mix_weight.shape:
        raise ValueError(f"mix_sigma: expected the shape of mix_weight {list(mix_weight.shape)}, "
                         f"got {list(mix_sigma.shape)}")


def _check_reduced(q, k, v):
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: expected a Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name}: expected 4 dimensions [B, N, heads, head_dim], got shape {tuple(t.shape)}")
        if t.dtype not in dispatch.FLOAT_DTYPES:
            raise ValueError(f"{name}: expected dtype float32, float16 or bfloat16, got {t.dtype}")
        if t.dtype != q.dtype:
            raise ValueError(f"{name}: expected the same dtype as q ({q.dtype}), got {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"{name}: expected a tensor on q's device ({q.device}), got one on {t.device}")
    B, _, heads, dqk = q.shape
    if k.shape[0] != B or k.shape[2] != heads or k.shape[3] != dqk:
        raise ValueError(f"k: expected shape [{B}, Nk, {heads}, {dqk}] (q's batch, heads and head_dim), "
                         f"got {list(k.shape)}")
    if k.shape[1] < 1:
        raise ValueError(f"k: expected at least one key, got shape {list(k.shape)}")
    if tuple(v.shape[:3]) != tuple(k.shape[:3]):
        raise ValueError(f"v: expected shape {list(k.shape[:3])} + [head_dim_v], got {list(v.shape)}")
    if dqk == 0 or v.shape[3] == 0:
        raise ValueError(f"q: expected a non-empty head_dim, got q {tuple(q.shape)} and v {tuple(v.shape)}")


def _image_out(q, v):
    return q.new_empty((*q.shape[:-1], v.shape[-1]))


def _lse(q, *lead):
    return q.new_empty((*lead, *q.shape[:-1]), dtype=torch.float32)


def _grad_like(t):
    return torch.empty_like(t, memory_format=torch.contiguous_format)


def _register(op, router, fake):
    torch.library.register_fake(f"vitk::{op}")(fake)
    torch.library.register_kernel(f"vitk::{op}", ("cpu", "cuda"), router)


def _route(op, q):
    return dispatch.choose(op, q.device.type, q.dtype).fn


# ---------------------------------------------------------------- polyline (PPMA whole, RMT)
def _wants_grad(*tensors):
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def _polyline_attention(q, k, v, log_alpha, log_beta, scale=None, symmetric=True):
    # Inference skips the saved halves of the symmetric form: the kernel then stores only the output.
    save = _wants_grad(q, k, v, log_alpha, log_beta)
    out, _, _ = torch.ops.vitk.polyline_attention_fwd(q, k, v, log_alpha, log_beta, _scale(q, scale), bool(symmetric),
                                                      save)
    return out


torch.library.impl("vitk::polyline_attention", "CompositeImplicitAutograd")(_polyline_attention)


def _pfwd_fake(q, k, v, log_alpha, log_beta, scale, symmetric, save_for_backward=True):
    _check_polyline(q, k, v, log_alpha, log_beta)
    saved = symmetric and save_for_backward
    parts = q.new_empty((2, *q.shape[:-1], v.shape[-1])) if saved else q.new_empty((0,))
    return _image_out(q, v), _lse(q, 2 if symmetric else 1), parts


def _pfwd_router(q, k, v, log_alpha, log_beta, scale, symmetric, save_for_backward=True):
    _check_polyline(q, k, v, log_alpha, log_beta)
    return _route("polyline_attention_fwd", q)(q, k, v, log_alpha, log_beta, float(scale), bool(symmetric),
                                               bool(save_for_backward))


def _pbwd_fake(grad_out, q, k, v, log_alpha, log_beta, out, parts, lse, scale, symmetric, decay_grad):
    da = _grad_like(log_alpha) if decay_grad else q.new_empty((0,))
    db = _grad_like(log_beta) if decay_grad else q.new_empty((0,))
    return _grad_like(q), _grad_like(k), _grad_like(v), da, db


def _pbwd_router(grad_out, q, k, v, log_alpha, log_beta, out, parts, lse, scale, symmetric, decay_grad):
    _check_polyline(q, k, v, log_alpha, log_beta)
    return _route("polyline_attention_bwd", q)(grad_out, q, k, v, log_alpha, log_beta, out, parts, lse,
                                               float(scale), bool(symmetric), bool(decay_grad))


def _pfwd_setup(ctx, inputs, output):
    q, k, v, log_alpha, log_beta, scale, symmetric, save = inputs
    out, lse, parts = output
    ctx.save_for_backward(q, k, v, log_alpha, log_beta, out, parts, lse)
    ctx.args = (scale, symmetric)
    ctx.lean = symmetric and not save


def _refuse_lean(ctx, op):
    if ctx.lean:
        raise RuntimeError(f"{op}: called with save_for_backward=False, so its backward has none of the "
                           "intermediate results it needs; call it with save_for_backward=True when a gradient "
                           "is wanted")


def _pfwd_backward(ctx, grad_out, grad_lse, grad_parts):
    _refuse_lean(ctx, "polyline_attention_fwd")
    q, k, v, log_alpha, log_beta, out, parts, lse = ctx.saved_tensors
    scale, symmetric = ctx.args
    decay_grad = ctx.needs_input_grad[3] or ctx.needs_input_grad[4]
    dq, dk, dv, da, db = torch.ops.vitk.polyline_attention_bwd(grad_out, q, k, v, log_alpha, log_beta, out, parts,
                                                               lse, scale, symmetric, decay_grad)
    return (dq, dk, dv, da if ctx.needs_input_grad[3] else None, db if ctx.needs_input_grad[4] else None,
            None, None, None)


torch.library.register_autograd("vitk::polyline_attention_fwd", _pfwd_backward, setup_context=_pfwd_setup)


# ---------------------------------------------------------------- axial decay (PPMA chunk)
def _axial_decay_attention(q, k, v, log_alpha, log_beta, scale=None):
    # Inference skips the four saved tensors: the kernel then stores only the output.
    save = _wants_grad(q, k, v, log_alpha, log_beta)
    return torch.ops.vitk.axial_decay_attention_fwd(q, k, v, log_alpha, log_beta, _scale(q, scale), save)[0]


torch.library.impl("vitk::axial_decay_attention", "CompositeImplicitAutograd")(_axial_decay_attention)


def _adfwd_fake(q, k, v, log_alpha, log_beta, scale, save_for_backward=True):
    _check_polyline(q, k, v, log_alpha, log_beta)
    halves = q.new_empty((2, *q.shape[:-1], v.shape[-1]) if save_for_backward else (0,))
    return _image_out(q, v), halves, q.new_empty(halves.shape), _lse(q, 2)


def _adfwd_router(q, k, v, log_alpha, log_beta, scale, save_for_backward=True):
    _check_polyline(q, k, v, log_alpha, log_beta)
    return _route("axial_decay_attention_fwd", q)(q, k, v, log_alpha, log_beta, float(scale),
                                                  bool(save_for_backward))


def _adfwd_setup(ctx, inputs, output):
    q, k, v, log_alpha, log_beta, scale, save = inputs
    _, parts, mids, lse = output
    ctx.save_for_backward(q, k, v, log_alpha, log_beta, parts, mids, lse)
    ctx.scale = scale
    ctx.lean = not save
    ctx.mark_non_differentiable(lse)


def _adfwd_backward(ctx, grad_out, grad_parts, grad_mids, grad_lse):
    """The chain rule through o_wh = C(y_w), y_w = R(v) and o_hw = R(y_h), y_h = C(v) (R: attention
    along rows with log_alpha, axis 2; C: along columns with log_beta, axis 1)."""
    _refuse_lean(ctx, "axial_decay_attention_fwd")
    q, k, v, log_alpha, log_beta, parts, mids, lse = ctx.saved_tensors
    s = ctx.scale
    want_a, want_b = ctx.needs_input_grad[3], ctx.needs_input_grad[4]
    g_wh = g_hw = 0.5 * grad_out
    if grad_parts is not None:
        g_wh, g_hw = g_wh + grad_parts[0], g_hw + grad_parts[1]
    bwd = torch.ops.vitk.axial_attention_bwd
    # Three passes: y_w's gradient is complete after the first, so the two row attentions (o_hw over
    # y_h, y_w over v) share one pass as two value streams; y_h's gradient comes out of it.
    dq, dk, dyw, db = bwd(g_wh, q, k, mids[0], log_beta, parts[0], lse[1], 1, s, want_b)[:4]
    if grad_mids is not None:
        dyw = dyw + grad_mids[0]
    dq2, dk2, dyh, da, dv = bwd(g_hw, q, k, mids[1], log_alpha, parts[1], lse[0], 2, s, want_a, dyw, v, mids[0])
    if grad_mids is not None:
        dyh = dyh + grad_mids[1]
    dq3, dk3, dv3, db2 = bwd(dyh, q, k, v, log_beta, mids[1], lse[1], 1, s, want_b)[:4]
    # Summed in place into the first call's fresh outputs: no new O(N) tensors.
    dq = dq.add_(dq2).add_(dq3)
    dk = dk.add_(dk2).add_(dk3)
    return (dq, dk, dv.add_(dv3), da if want_a else None, db.add_(db2) if want_b else None, None, None)


torch.library.register_autograd("vitk::axial_decay_attention_fwd", _adfwd_backward, setup_context=_adfwd_setup)


def _afwd_fake(q, k, v, log_decay, axis, scale):
    _check_axial(q, k, v, log_decay, axis)
    return _image_out(q, v), _lse(q)


def _afwd_router(q, k, v, log_decay, axis, scale):
    _check_axial(q, k, v, log_decay, axis)
    return _route("axial_attention_fwd", q)(q, k, v, log_decay, int(axis), float(scale))


def _check_second_stream(v, grad_out2, v2, out2):
    given = [t is not None for t in (grad_out2, v2, out2)]
    if any(given) and not all(given):
        raise ValueError("grad_out2, v2, out2: expected all three (a second value stream) or none")
    if all(given):
        for name, t in (("grad_out2", grad_out2), ("v2", v2), ("out2", out2)):
            if t.shape != v.shape or t.dtype != v.dtype or t.device != v.device:
                raise ValueError(f"{name}: expected v's shape {tuple(v.shape)}, dtype {v.dtype} and device "
                                 f"{v.device}, got {tuple(t.shape)}, {t.dtype}, {t.device}")
    return all(given)


def _abwd_fake(grad_out, q, k, v, log_decay, out, lse, axis, scale, decay_grad, grad_out2=None, v2=None,
               out2=None):
    two = _check_second_stream(v, grad_out2, v2, out2)
    dd = _grad_like(log_decay) if decay_grad else q.new_empty((0,))
    return _grad_like(q), _grad_like(k), _grad_like(v), dd, _grad_like(v) if two else q.new_empty((0,))


def _abwd_router(grad_out, q, k, v, log_decay, out, lse, axis, scale, decay_grad, grad_out2=None, v2=None,
                 out2=None):
    _check_axial(q, k, v, log_decay, axis)
    _check_second_stream(v, grad_out2, v2, out2)
    return _route("axial_attention_bwd", q)(grad_out, q, k, v, log_decay, out, lse, int(axis), float(scale),
                                            bool(decay_grad), grad_out2, v2, out2)


def _afwd_setup(ctx, inputs, output):
    q, k, v, log_decay, axis, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, log_decay, out, lse)
    ctx.args = (axis, scale)


def _afwd_backward(ctx, grad_out, grad_lse):
    q, k, v, log_decay, out, lse = ctx.saved_tensors
    axis, scale = ctx.args
    decay_grad = ctx.needs_input_grad[3]
    dq, dk, dv, dd, _ = torch.ops.vitk.axial_attention_bwd(grad_out, q, k, v, log_decay, out, lse, axis, scale,
                                                           decay_grad)
    return dq, dk, dv, (dd if decay_grad else None), None, None


torch.library.register_autograd("vitk::axial_attention_fwd", _afwd_backward, setup_context=_afwd_setup)


# ---------------------------------------------------------------- Gaussian-mixture mask
def _gaussian_mask_attention(q, k, v, mix_weight, mix_sigma, scale=None):
    return torch.ops.vitk.gaussian_mask_attention_fwd(q, k, v, mix_weight, mix_sigma, _scale(q, scale))[0]


torch.library.impl("vitk::gaussian_mask_attention", "CompositeImplicitAutograd")(_gaussian_mask_attention)


def _gfwd_fake(q, k, v, mix_weight, mix_sigma, scale):
    _check_gaussian(q, k, v, mix_weight, mix_sigma)
    return _image_out(q, v), _lse(q)


def _gfwd_router(q, k, v, mix_weight, mix_sigma, scale):
    _check_gaussian(q, k, v, mix_weight, mix_sigma)
    return _route("gaussian_mask_attention_fwd", q)(q, k, v, mix_weight, mix_sigma, float(scale))


def _gbwd_fake(grad_out, q, k, v, mix_weight, mix_sigma, out, lse, scale, mix_grad):
    dw = _grad_like(mix_weight) if mix_grad else q.new_empty((0,))
    ds = _grad_like(mix_sigma) if mix_grad else q.new_empty((0,))
    return _grad_like(q), _grad_like(k), _grad_like(v), dw, ds


def _gbwd_router(grad_out, q, k, v, mix_weight, mix_sigma, out, lse, scale, mix_grad):
    _check_gaussian(q, k, v, mix_weight, mix_sigma)
    return _route("gaussian_mask_attention_bwd", q)(grad_out, q, k, v, mix_weight, mix_sigma, out, lse,
                                                    float(scale), bool(mix_grad))


def _gfwd_setup(ctx, inputs, output):
    q, k, v, mix_weight, mix_sigma, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, mix_weight, mix_sigma, out, lse)
    ctx.scale = scale


def _gfwd_backward(ctx, grad_out, grad_lse):
    q, k, v, mix_weight, mix_sigma, out, lse = ctx.saved_tensors
    mix_grad = ctx.needs_input_grad[3] or ctx.needs_input_grad[4]
    dq, dk, dv, dw, ds = torch.ops.vitk.gaussian_mask_attention_bwd(grad_out, q, k, v, mix_weight, mix_sigma, out,
                                                                    lse, ctx.scale, mix_grad)
    return (dq, dk, dv, dw if ctx.needs_input_grad[3] else None, ds if ctx.needs_input_grad[4] else None, None)


torch.library.register_autograd("vitk::gaussian_mask_attention_fwd", _gfwd_backward, setup_context=_gfwd_setup)


# ---------------------------------------------------------------- reduced (PVT spatial reduction, S2AFormer strips)
def _reduced_attention(q, k, v, scale=None):
    return torch.ops.vitk.reduced_attention_fwd(q, k, v, _scale(q, scale))[0]


torch.library.impl("vitk::reduced_attention", "CompositeImplicitAutograd")(_reduced_attention)


def _rfwd_fake(q, k, v, scale):
    _check_reduced(q, k, v)
    return q.new_empty((*q.shape[:-1], v.shape[-1])), _lse(q)


def _rfwd_router(q, k, v, scale):
    _check_reduced(q, k, v)
    return _route("reduced_attention_fwd", q)(q, k, v, float(scale))


def _rbwd_fake(grad_out, q, k, v, out, lse, scale):
    return _grad_like(q), _grad_like(k), _grad_like(v)


def _rbwd_router(grad_out, q, k, v, out, lse, scale):
    _check_reduced(q, k, v)
    return _route("reduced_attention_bwd", q)(grad_out, q, k, v, out, lse, float(scale))


def _rfwd_setup(ctx, inputs, output):
    q, k, v, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.scale = scale


def _rfwd_backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse = ctx.saved_tensors
    dq, dk, dv = torch.ops.vitk.reduced_attention_bwd(grad_out, q, k, v, out, lse, ctx.scale)
    return dq, dk, dv, None


torch.library.register_autograd("vitk::reduced_attention_fwd", _rfwd_backward, setup_context=_rfwd_setup)


# ---------------------------------------------------------------- kernels and backends
_OPS = {
    "polyline_attention_fwd": (_pfwd_router, _pfwd_fake),
    "polyline_attention_bwd": (_pbwd_router, _pbwd_fake),
    "axial_attention_fwd": (_afwd_router, _afwd_fake),
    "axial_attention_bwd": (_abwd_router, _abwd_fake),
    "axial_decay_attention_fwd": (_adfwd_router, _adfwd_fake),
    "gaussian_mask_attention_fwd": (_gfwd_router, _gfwd_fake),
    "gaussian_mask_attention_bwd": (_gbwd_router, _gbwd_fake),
    "reduced_attention_fwd": (_rfwd_router, _rfwd_fake),
    "reduced_attention_bwd": (_rbwd_router, _rbwd_fake),
}


def _cpu_kernel(name):
    return lambda *args: getattr(_C, f"{name}_cpu")(*args)


def _triton_kernel(name):
    return lambda *args: getattr(_triton(), name)(*args)


for _op, (_router, _fake) in _OPS.items():
    _register(_op, _router, _fake)
    # Preference order: the C++ kernel on CPU tensors, Triton on GPUs (and on CPU under the interpreter).
    dispatch.register(_op, "cpu", _cpu_kernel(_op), devices=("cpu",), dtypes=dispatch.FLOAT_DTYPES)
    dispatch.register(_op, "triton", _triton_kernel(_op), devices=("cuda", "cpu"), dtypes=dispatch.FLOAT_DTYPES)


# ---------------------------------------------------------------- Python API
def polyline_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_alpha: torch.Tensor,
                       log_beta: torch.Tensor, scale: Optional[float] = None, symmetric: bool = True) -> torch.Tensor:
    """PPMA's polyline-path masked attention over [B, H, W, heads, d] tokens; see the op."""
    return torch.ops.vitk.polyline_attention(q, k, v, log_alpha, log_beta, scale, symmetric)


def manhattan_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_gamma: torch.Tensor,
                        scale: Optional[float] = None) -> torch.Tensor:
    """RMT's Manhattan self-attention: polyline attention with log_alpha = log_beta = log_gamma[head]."""
    if not isinstance(log_gamma, torch.Tensor) or log_gamma.dim() != 1 or log_gamma.shape[0] != q.shape[3]:
        raise ValueError(f"log_gamma: expected a [heads] = [{q.shape[3]}] tensor, got "
                         f"{list(getattr(log_gamma, 'shape', []))}")
    decay = log_gamma.to(q.device).expand(*q.shape[:4])
    # The Manhattan mask is symmetric, so both mask directions give the same softmax: one suffices.
    return torch.ops.vitk.polyline_attention(q, k, v, decay, decay, scale, False)


def axial_decay_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_alpha: torch.Tensor,
                          log_beta: torch.Tensor, scale: Optional[float] = None) -> torch.Tensor:
    """PPMA's criss-cross (chunk) attention 0.5 A_h(A_w v) + 0.5 A_w(A_h v); see the op."""
    return torch.ops.vitk.axial_decay_attention(q, k, v, log_alpha, log_beta, scale)


def gaussian_mask_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mix_weight: torch.Tensor,
                            mix_sigma: torch.Tensor, scale: Optional[float] = None) -> torch.Tensor:
    """softmax((q k^T scale) * Gaussian-mixture mask) v over [B, H, W, heads, d] tokens; see the op."""
    return torch.ops.vitk.gaussian_mask_attention(q, k, v, mix_weight, mix_sigma, scale)


def reduced_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      scale: Optional[float] = None) -> torch.Tensor:
    """Dense attention of q [B, Nq, heads, dqk] against a shorter k/v [B, Nk, heads, dqk|dv]; see the op."""
    return torch.ops.vitk.reduced_attention(q, k, v, scale)
