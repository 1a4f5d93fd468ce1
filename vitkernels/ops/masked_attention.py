"""Structured-mask and reduced attention on the shared attention core.

torch.ops.vitk.polyline_attention(q, k, v, log_alpha, log_beta, scale=None, symmetric=True)   PPMA whole
torch.ops.vitk.axial_decay_attention(q, k, v, log_alpha, log_beta, scale=None)               PPMA chunk
torch.ops.vitk.gaussian_mask_attention(q, k, v, mix_weight, mix_sigma, scale=None)           GMM mask
torch.ops.vitk.reduced_attention(q, k, v, scale=None)                                        PVT / S2AFormer

Semantics: vitkernels/reference/masked_attention.py; CPU kernels: csrc/cpu/masked_attention/, declared
in csrc/include/vitk/masked_attention.h. q, k, v are [B, H, W, heads, d] (reduced:
[B, N, heads, d]), any strides; v's head dim may differ from q/k's. The masks are computed inside
the kernels' online-softmax loop from O(N) data (prefix sums of the decays, grid positions, a
[heads, H, W] table of the mixture); nothing N x N is ever stored, forward or backward.

The public ops are composites (csrc/composites.cpp) over *_fwd ops whose extra outputs autograd saves
for *_bwd:
  polyline   lse [P, B, H, W, heads] fp32, P = 2 with symmetric (one softmax per mask direction),
             and for symmetric the two halves of the output, parts [2, B, H, W, heads, dv] in q's dtype
             (each half's backward needs its own rowsum(dO * O)); out = (parts[0] + parts[1]) / 2.
  axial      PPMA's criss-cross form is 0.5 A_h(A_w v) + 0.5 A_w(A_h v). axial_decay_attention_fwd
             computes it in one pass (each row's and each column's softmax once) and returns what
             the backward needs: parts [2, B, H, W, heads, dv] = [A_h y_w, A_w y_h], mids = [y_w, y_h]
             = [A_w v, A_h v] (q's dtype) and lse [2, B, H, W, heads] fp32 (row, column softmax). Its
             backward is three calls of the one-axis primitive's axial_attention_bwd, the chain rule
             through the two chained attentions of each half (the two row attentions share one call
             as two value streams).
  gaussian   lse [B, H, W, heads].
  reduced    lse [B, Nq, heads].
When no gradient is wanted the composites pass save_for_backward=False to the polyline and axial
forwards: their extra outputs come back empty and only out is stored.
"""
from typing import Optional

import torch

from ..dispatch import ALL_FLOAT_DTYPES, FLOAT_DTYPES
from . import _checks as check
from ._define import cpp, define, triton

_BACKENDS = [cpp("cpu"), triton("masked_attention")]


# ---------------------------------------------------------------- argument checks
def _check_polyline(q, k, v, log_alpha, log_beta, *_):
    check.image_qkv(q, k, v)
    check.image_param("log_alpha", log_alpha, q)
    check.image_param("log_beta", log_beta, q)


def _check_axial(q, k, v, log_decay, axis, *_):
    check.image_qkv(q, k, v)
    check.image_param("log_decay", log_decay, q)
    if int(axis) not in (1, 2):
        raise ValueError(f"axis: expected 1 (attention along H, within columns) or 2 (along W, within rows), "
                         f"got {axis}")


def _check_gaussian(q, k, v, mix_weight, mix_sigma, *_):
    check.image_qkv(q, k, v)
    heads = q.shape[3]
    for name, t in (("mix_weight", mix_weight), ("mix_sigma", mix_sigma)):
        check.tensor(name, t, dtypes=ALL_FLOAT_DTYPES, like=("q", q))
        if t.dim() != 2 or t.shape[0] != heads or t.shape[1] < 1:
            raise ValueError(f"{name}: expected shape [heads, M] = [{heads}, M] with M >= 1, got {list(t.shape)}")
    if mix_sigma.shape != mix_weight.shape:
        raise ValueError(f"mix_sigma: expected the shape of mix_weight {list(mix_weight.shape)}, "
                         f"got {list(mix_sigma.shape)}")


def _check_reduced(q, k, v, *_):
    for name, t in (("q", q), ("k", k), ("v", v)):
        check.tensor(name, t, dtypes=FLOAT_DTYPES, dims=4, layout="[B, N, heads, head_dim]", like=("q", q))
        check.same_dtype(name, t, "q", q)
    B, _, heads, dqk = q.shape
    if k.shape[0] != B or k.shape[2] != heads or k.shape[3] != dqk:
        raise ValueError(f"k: expected shape [{B}, Nk, {heads}, {dqk}] (q's batch, heads and head_dim), "
                         f"got {list(k.shape)}")
    if k.shape[1] < 1:
        raise ValueError(f"k: expected at least one key, got shape {list(k.shape)}")
    if tuple(v.shape[:3]) != tuple(k.shape[:3]):
        raise ValueError(f"v: expected shape {list(k.shape[:3])} + [head_dim_v], got {list(v.shape)}")
    check.nonempty_head_dims(q, v)


def _check_backward_of(check_fwd, lse_lead=()):
    """The check of a backward op (grad_out, q, k, v, <forward's other inputs>, ..., out, lse): the
    forward's check plus grad_out, out and lse shaped as the forward returned them."""
    def check_bwd(grad_out, q, k, v, *rest, out, lse):
        check_fwd(q, k, v, *rest)
        shape = (*q.shape[:-1], v.shape[-1])
        check.like("grad_out", grad_out, q, shape)
        check.like("out", out, q, shape)
        check.lse_like(lse, q, (*lse_lead, *q.shape[:-1]))
    return check_bwd


# ---------------------------------------------------------------- polyline (PPMA whole, RMT)
def _pfwd_fake(q, k, v, log_alpha, log_beta, scale, symmetric, save_for_backward=True):
    parts = check.out_like(q, v, 2) if symmetric and save_for_backward else check.empty(q)
    return check.out_like(q, v), check.lse_of(q, 2 if symmetric else 1), parts


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


define("polyline_attention_fwd", check=_check_polyline, fake=_pfwd_fake, backends=_BACKENDS,
       autograd=(_pfwd_backward, _pfwd_setup))


def _check_pbwd(grad_out, q, k, v, log_alpha, log_beta, out, parts, lse, scale, symmetric, decay_grad):
    _check_backward_of(_check_polyline, (2 if symmetric else 1,))(grad_out, q, k, v, log_alpha, log_beta,
                                                                   out=out, lse=lse)
    if symmetric:
        check.like("parts", parts, q, (2, *q.shape[:-1], v.shape[-1]))


def _pbwd_fake(grad_out, q, k, v, log_alpha, log_beta, out, parts, lse, scale, symmetric, decay_grad):
    da = check.grad_like(log_alpha) if decay_grad else check.empty(q)
    db = check.grad_like(log_beta) if decay_grad else check.empty(q)
    return check.grad_like(q), check.grad_like(k), check.grad_like(v), da, db


define("polyline_attention_bwd", check=_check_pbwd, fake=_pbwd_fake, backends=_BACKENDS, device_arg=1)


# ---------------------------------------------------------------- axial decay (PPMA chunk)
def _adfwd_fake(q, k, v, log_alpha, log_beta, scale, save_for_backward=True):
    halves = check.out_like(q, v, 2) if save_for_backward else check.empty(q)
    return check.out_like(q, v), halves, q.new_empty(halves.shape), check.lse_of(q, 2)


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


define("axial_decay_attention_fwd", check=_check_polyline, fake=_adfwd_fake, backends=_BACKENDS,
       autograd=(_adfwd_backward, _adfwd_setup))


def _afwd_fake(q, k, v, log_decay, axis, scale):
    return check.out_like(q, v), check.lse_of(q)


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


define("axial_attention_fwd", check=_check_axial, fake=_afwd_fake, backends=_BACKENDS,
       autograd=(_afwd_backward, _afwd_setup))


def _second_stream(v, grad_out2, v2, out2) -> bool:
    given = [t is not None for t in (grad_out2, v2, out2)]
    if any(given) and not all(given):
        raise ValueError("grad_out2, v2, out2: expected all three (a second value stream) or none")
    if all(given):
        for name, t in (("grad_out2", grad_out2), ("v2", v2), ("out2", out2)):
            check.tensor(name, t, like=("v", v))
            if t.shape != v.shape or t.dtype != v.dtype:
                raise ValueError(f"{name}: expected v's shape {tuple(v.shape)} and dtype {v.dtype}, "
                                 f"got {tuple(t.shape)}, {t.dtype}")
    return all(given)


def _check_abwd(grad_out, q, k, v, log_decay, out, lse, axis, scale, decay_grad, grad_out2=None, v2=None,
                out2=None):
    _check_backward_of(_check_axial)(grad_out, q, k, v, log_decay, axis, out=out, lse=lse)
    _second_stream(v, grad_out2, v2, out2)


def _abwd_fake(grad_out, q, k, v, log_decay, out, lse, axis, scale, decay_grad, grad_out2=None, v2=None,
               out2=None):
    two = grad_out2 is not None
    dd = check.grad_like(log_decay) if decay_grad else check.empty(q)
    return (check.grad_like(q), check.grad_like(k), check.grad_like(v), dd,
            check.grad_like(v) if two else check.empty(q))


define("axial_attention_bwd", check=_check_abwd, fake=_abwd_fake, backends=_BACKENDS, device_arg=1)


# ---------------------------------------------------------------- Gaussian-mixture mask
def _gfwd_fake(q, k, v, mix_weight, mix_sigma, scale):
    return check.out_like(q, v), check.lse_of(q)


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


define("gaussian_mask_attention_fwd", check=_check_gaussian, fake=_gfwd_fake, backends=_BACKENDS,
       autograd=(_gfwd_backward, _gfwd_setup))


def _check_gbwd(grad_out, q, k, v, mix_weight, mix_sigma, out, lse, scale, mix_grad):
    _check_backward_of(_check_gaussian)(grad_out, q, k, v, mix_weight, mix_sigma, out=out, lse=lse)


def _gbwd_fake(grad_out, q, k, v, mix_weight, mix_sigma, out, lse, scale, mix_grad):
    dw = check.grad_like(mix_weight) if mix_grad else check.empty(q)
    ds = check.grad_like(mix_sigma) if mix_grad else check.empty(q)
    return check.grad_like(q), check.grad_like(k), check.grad_like(v), dw, ds


define("gaussian_mask_attention_bwd", check=_check_gbwd, fake=_gbwd_fake, backends=_BACKENDS, device_arg=1)


# ---------------------------------------------------------------- reduced (PVT spatial reduction, S2AFormer strips)
def _rfwd_fake(q, k, v, scale):
    return check.out_like(q, v), check.lse_of(q)


def _rfwd_setup(ctx, inputs, output):
    q, k, v, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.scale = scale


def _rfwd_backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse = ctx.saved_tensors
    dq, dk, dv = torch.ops.vitk.reduced_attention_bwd(grad_out, q, k, v, out, lse, ctx.scale)
    return dq, dk, dv, None


define("reduced_attention_fwd", check=_check_reduced, fake=_rfwd_fake, backends=_BACKENDS,
       autograd=(_rfwd_backward, _rfwd_setup))


def _check_rbwd(grad_out, q, k, v, out, lse, scale):
    _check_backward_of(_check_reduced)(grad_out, q, k, v, out=out, lse=lse)


def _rbwd_fake(grad_out, q, k, v, out, lse, scale):
    return check.grad_like(q), check.grad_like(k), check.grad_like(v)


define("reduced_attention_bwd", check=_check_rbwd, fake=_rbwd_fake, backends=_BACKENDS, device_arg=1)


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
