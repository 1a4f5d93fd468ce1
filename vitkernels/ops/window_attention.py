"""Shifted-window attention (Swin, Swin-V2, CoSwin, StyleSwin) and packed varlen attention (Qwen2.5-VL).

torch.ops.vitk.window_attention(q, k, v, window_size, shift_size=[0,0], rel_pos_bias=None, scale=None)
torch.ops.vitk.varlen_attention(q, k, v, cu_seqlens, max_seqlen, scale=None)

Both public ops are composites over a forward op that also returns the log-sum-exp, which autograd
saves (with q, k, v and the output) for the backward op: nothing of size N x N is ever stored.
"""
from typing import Optional, Sequence

import torch

from .. import dispatch
from .._lib import load as _load

_C, _ = _load()

_WFWD, _WBWD, _VFWD, _VBWD = ("window_attention_fwd", "window_attention_bwd",
                              "varlen_attention_fwd", "varlen_attention_bwd")


def _triton():
    from ..triton import window_attention as tk
    return tk


# ---------------------------------------------------------------- argument checks
def _check_qkv(q, k, v, dims: int, layout: str):
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: expected a Tensor, got {type(t).__name__}")
        if t.dim() != dims:
            raise ValueError(f"{name}: expected {dims} dimensions {layout}, got shape {tuple(t.shape)}")
        if t.dtype not in dispatch.FLOAT_DTYPES:
            raise ValueError(f"{name}: expected dtype float32, float16 or bfloat16, got {t.dtype}")
        if t.dtype != q.dtype:
            raise ValueError(f"{name}: expected the same dtype as q ({q.dtype}), got {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"{name}: expected a tensor on q's device ({q.device}), got one on {t.device}")
    if k.shape != q.shape:
        raise ValueError(f"k: expected the shape of q {tuple(q.shape)}, got {tuple(k.shape)}")
    if v.shape[:-1] != q.shape[:-1]:
        raise ValueError(f"v: expected shape {tuple(q.shape[:-1])} + [head_dim_v], got {tuple(v.shape)}")
    if q.shape[-1] == 0 or v.shape[-1] == 0:
        raise ValueError(f"q: expected a non-empty head_dim, got q {tuple(q.shape)} and v {tuple(v.shape)}")


def _pair(x, name):
    try:
        a, b = (int(t) for t in x)
    except (TypeError, ValueError):
        raise ValueError(f"{name}: expected two integers, got {x!r}") from None
    return a, b


def _check_window_args(q, k, v, window_size, shift_size, rel_pos_bias):
    _check_qkv(q, k, v, 5, "[B, H, W, heads, head_dim]")
    wh, ww = _pair(window_size, "window_size")
    sh, sw = _pair(shift_size, "shift_size")
    if wh < 1 or ww < 1:
        raise ValueError(f"window_size: expected positive sizes, got {(wh, ww)}")
    if not (0 <= sh < wh and 0 <= sw < ww):
        raise ValueError(f"shift_size: expected 0 <= shift < window per axis, got {(sh, sw)} for window {(wh, ww)}")
    if rel_pos_bias is not None:
        heads = q.shape[3]
        want = ((2 * wh - 1) * (2 * ww - 1), heads)
        if not isinstance(rel_pos_bias, torch.Tensor) or not rel_pos_bias.dtype.is_floating_point:
            raise ValueError("rel_pos_bias: expected a floating-point tensor")
        if tuple(rel_pos_bias.shape) != want:
            raise ValueError(f"rel_pos_bias: expected shape [(2*{wh}-1)*(2*{ww}-1), heads] = {list(want)}, "
                             f"got {list(rel_pos_bias.shape)}")
        if rel_pos_bias.device != q.device:
            raise ValueError(f"rel_pos_bias: expected a tensor on q's device ({q.device}), got one on {rel_pos_bias.device}")
    return (wh, ww), (sh, sw)


def _check_varlen_args(q, k, v, cu_seqlens, max_seqlen):
    _check_qkv(q, k, v, 3, "[total, heads, head_dim]")
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dtype != torch.int32 or cu_seqlens.dim() != 1:
        raise ValueError(f"cu_seqlens: expected a 1-D int32 tensor [segments + 1], got "
                         f"{getattr(cu_seqlens, 'dtype', type(cu_seqlens))} {tuple(getattr(cu_seqlens, 'shape', ()))}")
    if cu_seqlens.numel() < 1:
        raise ValueError("cu_seqlens: expected at least one entry (0)")
    if cu_seqlens.device != q.device:
        raise ValueError(f"cu_seqlens: expected a tensor on q's device ({q.device}), got one on {cu_seqlens.device}")
    if int(max_seqlen) < 0:
        raise ValueError(f"max_seqlen: expected a non-negative integer, got {max_seqlen}")


def _check_cu_values(cu_seqlens, total, max_seqlen):
    # Data-dependent: runs on real tensors only, before any kernel indexes with them.
    cu = cu_seqlens.cpu()
    if cu[0].item() != 0 or cu[-1].item() != total:
        raise ValueError(f"cu_seqlens: expected to start at 0 and end at total={total}, got {cu[0].item()}..{cu[-1].item()}")
    lens = cu[1:] - cu[:-1]
    if lens.numel() and lens.min().item() < 0:
        raise ValueError("cu_seqlens: expected non-decreasing offsets")
    if lens.numel() and lens.max().item() > max_seqlen:
        raise ValueError(f"max_seqlen: expected at least the longest segment ({lens.max().item()}), got {max_seqlen}")


def _scale(q, scale):
    return float(q.shape[-1] ** -0.5) if scale is None else float(scale)


# ---------------------------------------------------------------- window attention
def _window_attention(q, k, v, window_size, shift_size=(0, 0), rel_pos_bias=None, scale=None):
    out, _ = torch.ops.vitk.window_attention_fwd(q, k, v, list(window_size), list(shift_size), rel_pos_bias,
                                                 _scale(q, scale))
    return out


torch.library.impl("vitk::window_attention", "CompositeImplicitAutograd")(_window_attention)


@torch.library.register_fake(f"vitk::{_WFWD}")
def _wfwd_fake(q, k, v, window_size, shift_size, rel_pos_bias, scale):
    _check_window_args(q, k, v, window_size, shift_size, rel_pos_bias)
    out = q.new_empty((*q.shape[:-1], v.shape[-1]))
    return out, q.new_empty(q.shape[:-1], dtype=torch.float32)


def _wfwd_router(q, k, v, window_size, shift_size, rel_pos_bias, scale):
    win, shift = _check_window_args(q, k, v, window_size, shift_size, rel_pos_bias)
    impl = dispatch.choose(_WFWD, q.device.type, q.dtype)
    return impl.fn(q, k, v, win, shift, rel_pos_bias, scale)


@torch.library.register_fake(f"vitk::{_WBWD}")
def _wbwd_fake(grad_out, q, k, v, out, lse, window_size, shift_size, rel_pos_bias, scale, bias_grad):
    dbias = (torch.empty_like(rel_pos_bias) if (bias_grad and rel_pos_bias is not None)
             else q.new_empty((0,)))
    return torch.empty_like(q, memory_format=torch.contiguous_format), \
        torch.empty_like(k, memory_format=torch.contiguous_format), \
        torch.empty_like(v, memory_format=torch.contiguous_format), dbias


def _wbwd_router(grad_out, q, k, v, out, lse, window_size, shift_size, rel_pos_bias, scale, bias_grad):
    win, shift = _check_window_args(q, k, v, window_size, shift_size, rel_pos_bias)
    impl = dispatch.choose(_WBWD, q.device.type, q.dtype)
    return impl.fn(grad_out, q, k, v, out, lse, win, shift, rel_pos_bias, scale, bool(bias_grad))


def _wfwd_setup(ctx, inputs, output):
    q, k, v, window_size, shift_size, rel_pos_bias, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, rel_pos_bias)
    ctx.args = (list(window_size), list(shift_size), scale)


def _wfwd_backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse, bias = ctx.saved_tensors
    window_size, shift_size, scale = ctx.args
    bias_grad = bias is not None and ctx.needs_input_grad[5]
    dq, dk, dv, dbias = torch.ops.vitk.window_attention_bwd(grad_out, q, k, v, out, lse, window_size, shift_size,
                                                            bias, scale, bias_grad)
    return dq, dk, dv, None, None, (dbias if bias_grad else None), None


torch.library.register_autograd(f"vitk::{_WFWD}", _wfwd_backward, setup_context=_wfwd_setup)


# ---------------------------------------------------------------- varlen attention
def _varlen_attention(q, k, v, cu_seqlens, max_seqlen, scale=None):
    out, _ = torch.ops.vitk.varlen_attention_fwd(q, k, v, cu_seqlens, max_seqlen, _scale(q, scale))
    return out


torch.library.impl("vitk::varlen_attention", "CompositeImplicitAutograd")(_varlen_attention)


@torch.library.register_fake(f"vitk::{_VFWD}")
def _vfwd_fake(q, k, v, cu_seqlens, max_seqlen, scale):
    _check_varlen_args(q, k, v, cu_seqlens, max_seqlen)
    return q.new_empty((*q.shape[:-1], v.shape[-1])), q.new_empty(q.shape[:-1], dtype=torch.float32)


def _vfwd_router(q, k, v, cu_seqlens, max_seqlen, scale):
    _check_varlen_args(q, k, v, cu_seqlens, max_seqlen)
    _check_cu_values(cu_seqlens, q.shape[0], max_seqlen)
    impl = dispatch.choose(_VFWD, q.device.type, q.dtype)
    return impl.fn(q, k, v, cu_seqlens, int(max_seqlen), scale)


@torch.library.register_fake(f"vitk::{_VBWD}")
def _vbwd_fake(grad_out, q, k, v, out, lse, cu_seqlens, max_seqlen, scale):
    return tuple(torch.empty_like(t, memory_format=torch.contiguous_format) for t in (q, k, v))


def _vbwd_router(grad_out, q, k, v, out, lse, cu_seqlens, max_seqlen, scale):
    _check_varlen_args(q, k, v, cu_seqlens, max_seqlen)
    impl = dispatch.choose(_VBWD, q.device.type, q.dtype)
    return impl.fn(grad_out, q, k, v, out, lse, cu_seqlens, int(max_seqlen), scale)


def _vfwd_setup(ctx, inputs, output):
    q, k, v, cu_seqlens, max_seqlen, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, cu_seqlens)
    ctx.args = (max_seqlen, scale)


def _vfwd_backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse, cu_seqlens = ctx.saved_tensors
    max_seqlen, scale = ctx.args
    dq, dk, dv = torch.ops.vitk.varlen_attention_bwd(grad_out, q, k, v, out, lse, cu_seqlens, max_seqlen, scale)
    return dq, dk, dv, None, None, None


torch.library.register_autograd(f"vitk::{_VFWD}", _vfwd_backward, setup_context=_vfwd_setup)

for _op, _router in ((_WFWD, _wfwd_router), (_WBWD, _wbwd_router), (_VFWD, _vfwd_router), (_VBWD, _vbwd_router)):
    torch.library.register_kernel(f"vitk::{_op}", ("cpu", "cuda"), _router)


# ---------------------------------------------------------------- backends, in order of preference
def _cpu_window_fwd(q, k, v, win, shift, bias, scale):
    return _C.window_attention_fwd_cpu(q, k, v, win[0], win[1], shift[0], shift[1], bias, scale)


def _cpu_window_bwd(g, q, k, v, out, lse, win, shift, bias, scale, bias_grad):
    return _C.window_attention_bwd_cpu(g, q, k, v, out, lse, win[0], win[1], shift[0], shift[1], bias, scale,
                                       bias_grad)


dispatch.register(_WFWD, "cpu", _cpu_window_fwd, devices=("cpu",), dtypes=dispatch.FLOAT_DTYPES)
dispatch.register(_WBWD, "cpu", _cpu_window_bwd, devices=("cpu",), dtypes=dispatch.FLOAT_DTYPES)
dispatch.register(_VFWD, "cpu", _C.varlen_attention_fwd_cpu, devices=("cpu",), dtypes=dispatch.FLOAT_DTYPES)
dispatch.register(_VBWD, "cpu", _C.varlen_attention_bwd_cpu, devices=("cpu",), dtypes=dispatch.FLOAT_DTYPES)
dispatch.register(_WFWD, "triton", lambda *a: _triton().window_attention_fwd(*a),
                  devices=("cuda", "cpu"), dtypes=dispatch.FLOAT_DTYPES)
dispatch.register(_WBWD, "triton", lambda *a: _triton().window_attention_bwd(*a),
                  devices=("cuda", "cpu"), dtypes=dispatch.FLOAT_DTYPES)
dispatch.register(_VFWD, "triton", lambda *a: _triton().varlen_attention_fwd(*a),
                  devices=("cuda", "cpu"), dtypes=dispatch.FLOAT_DTYPES)
dispatch.register(_VBWD, "triton", lambda *a: _triton().varlen_attention_bwd(*a),
                  devices=("cuda", "cpu"), dtypes=dispatch.FLOAT_DTYPES)


# ---------------------------------------------------------------- Python API
def window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window_size: Sequence[int],
                     shift_size: Sequence[int] = (0, 0), rel_pos_bias: Optional[torch.Tensor] = None,
                     scale: Optional[float] = None) -> torch.Tensor:
    """Swin's shifted-window attention on per-token q, k, v [B, H, W, heads, head_dim]; see the op."""
    return torch.ops.vitk.window_attention(q, k, v, list(window_size), list(shift_size), rel_pos_bias, scale)


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                     max_seqlen: int, scale: Optional[float] = None) -> torch.Tensor:
    """Block-diagonal attention over packed segments [total, heads, head_dim]; see the op."""
    return torch.ops.vitk.varlen_attention(q, k, v, cu_seqlens, max_seqlen, scale)
