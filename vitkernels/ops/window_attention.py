"""Shifted-window attention (Swin, Swin-V2, CoSwin, StyleSwin) and packed varlen attention (Qwen2.5-VL).

torch.ops.vitk.window_attention(q, k, v, window_size, shift_size=[0,0], rel_pos_bias=None, scale=None)
torch.ops.vitk.varlen_attention(q, k, v, cu_seqlens, max_seqlen, scale=None)

Both public ops are composites (csrc/composites.cpp) over a forward op that also returns the
log-sum-exp, which autograd saves (with q, k, v and the output) for the backward op: nothing of size
N x N is ever stored. This module declares the forward and backward ops (ops/_define.py); their CPU
kernels are in csrc/cpu/window_attention/, declared in csrc/include/vitk/window_attention.h.
"""
from typing import Optional, Sequence, Union

import torch

from ..dispatch import ALL_FLOAT_DTYPES
from . import _checks as check
from ._define import Limit, cpp, define, triton

# vitk::cpu::kMaxWindowTokens: the CPU kernels' largest window.
MAX_CPU_WINDOW_TOKENS = 4096


# ---------------------------------------------------------------- window attention
def _check_window(q, k, v, window_size, shift_size, rel_pos_bias, scale):
    check.image_qkv(q, k, v)
    wh, ww = check.pair(window_size, "window_size")
    sh, sw = check.pair(shift_size, "shift_size")
    if wh < 1 or ww < 1:
        raise ValueError(f"window_size: expected positive sizes, got {(wh, ww)}")
    if not (0 <= sh < wh and 0 <= sw < ww):
        raise ValueError(f"shift_size: expected 0 <= shift < window per axis, got {(sh, sw)} for window {(wh, ww)}")
    if rel_pos_bias is not None:
        check.tensor("rel_pos_bias", rel_pos_bias, dtypes=ALL_FLOAT_DTYPES, like=("q", q))
        want = ((2 * wh - 1) * (2 * ww - 1), q.shape[3])
        if tuple(rel_pos_bias.shape) != want:
            raise ValueError(f"rel_pos_bias: expected shape [(2*{wh}-1)*(2*{ww}-1), heads] = {list(want)}, "
                             f"got {list(rel_pos_bias.shape)}")


def _window_limit(position: int) -> Limit:
    """The CPU kernels' window limit, measured on the window_size at argument ``position``."""
    def tokens(*args):
        wh, ww = check.pair(args[position], "window_size")
        return wh * ww
    return Limit("tokens per window", MAX_CPU_WINDOW_TOKENS, tokens)


def _wfwd_fake(q, k, v, window_size, shift_size, rel_pos_bias, scale):
    return check.out_like(q, v), check.lse_of(q)


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


define("window_attention_fwd", check=_check_window, fake=_wfwd_fake, autograd=(_wfwd_backward, _wfwd_setup),
       backends=[cpp("cpu", limits=[_window_limit(3)]), triton("window_attention")])


def _check_window_bwd(grad_out, q, k, v, out, lse, window_size, shift_size, rel_pos_bias, scale, bias_grad):
    _check_window(q, k, v, window_size, shift_size, rel_pos_bias, scale)
    check.like("grad_out", grad_out, q, (*q.shape[:-1], v.shape[-1]))
    check.like("out", out, q, (*q.shape[:-1], v.shape[-1]))
    check.lse_like(lse, q, q.shape[:-1])


def _wbwd_fake(grad_out, q, k, v, out, lse, window_size, shift_size, rel_pos_bias, scale, bias_grad):
    dbias = check.grad_like(rel_pos_bias) if (bias_grad and rel_pos_bias is not None) else check.empty(q)
    return check.grad_like(q), check.grad_like(k), check.grad_like(v), dbias


define("window_attention_bwd", check=_check_window_bwd, fake=_wbwd_fake, device_arg=1,
       backends=[cpp("cpu", limits=[_window_limit(6)]), triton("window_attention")])


# ---------------------------------------------------------------- varlen attention
def _check_varlen(q, k, v, cu_seqlens, max_seqlen, scale):
    check.qkv(q, k, v, 3, "[total, heads, head_dim]")
    check.tensor("cu_seqlens", cu_seqlens, dtypes={torch.int32}, dims=1, layout="[segments + 1]", like=("q", q))
    if cu_seqlens.numel() < 1:
        raise ValueError("cu_seqlens: expected at least one entry (0)")
    if int(max_seqlen) < 0:
        raise ValueError(f"max_seqlen: expected a non-negative integer, got {max_seqlen}")


def check_cu_values(cu_seqlens: torch.Tensor, total: int, max_seqlen: int) -> None:
    """The offsets themselves, which index q, k, v: 0 = cu[0] <= ... <= cu[-1] = total, no segment longer
    than max_seqlen. Data-dependent, so it runs on real tensors only (a Triton guard; the C++ kernels
    check while they plan)."""
    cu = cu_seqlens.cpu().long()
    if cu[0].item() != 0 or cu[-1].item() != total:
        raise ValueError(f"cu_seqlens: expected to start at 0 and end at total={total}, "
                         f"got {cu[0].item()}..{cu[-1].item()}")
    lens = cu[1:] - cu[:-1]
    if lens.numel() and lens.min().item() < 0:
        i = int((lens < 0).nonzero()[0, 0]) + 1
        raise ValueError(f"cu_seqlens: expected non-decreasing offsets, got cu_seqlens[{i}]={cu[i].item()} "
                         f"< cu_seqlens[{i - 1}]={cu[i - 1].item()}")
    if lens.numel() and lens.max().item() > max_seqlen:
        raise ValueError(f"max_seqlen: expected at least the longest segment ({lens.max().item()}), got {max_seqlen}")


def _vfwd_fake(q, k, v, cu_seqlens, max_seqlen, scale):
    return check.out_like(q, v), check.lse_of(q)


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


define("varlen_attention_fwd", check=_check_varlen, fake=_vfwd_fake, autograd=(_vfwd_backward, _vfwd_setup),
       backends=[cpp("cpu"), triton("window_attention", guard=lambda q, k, v, cu, max_seqlen, scale:
                                    check_cu_values(cu, q.shape[0], max_seqlen))])


def _check_varlen_bwd(grad_out, q, k, v, out, lse, cu_seqlens, max_seqlen, scale):
    _check_varlen(q, k, v, cu_seqlens, max_seqlen, scale)
    check.like("grad_out", grad_out, q, (*q.shape[:-1], v.shape[-1]))
    check.like("out", out, q, (*q.shape[:-1], v.shape[-1]))
    check.lse_like(lse, q, q.shape[:-1])


def _vbwd_fake(grad_out, q, k, v, out, lse, cu_seqlens, max_seqlen, scale):
    return check.grad_like(q), check.grad_like(k), check.grad_like(v)


define("varlen_attention_bwd", check=_check_varlen_bwd, fake=_vbwd_fake, device_arg=1,
       backends=[cpp("cpu"), triton("window_attention", guard=lambda g, q, k, v, o, l, cu, max_seqlen, scale:
                                    check_cu_values(cu, q.shape[0], max_seqlen))])


# ---------------------------------------------------------------- Python API
def window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window_size: Union[int, Sequence[int]],
                     shift_size: Union[int, Sequence[int]] = (0, 0), rel_pos_bias: Optional[torch.Tensor] = None,
                     scale: Optional[float] = None) -> torch.Tensor:
    """Swin's shifted-window attention on per-token q, k, v [B, H, W, heads, head_dim]; see the op. An int
    window or shift size means the same on both axes, as in timm."""
    return torch.ops.vitk.window_attention(q, k, v, check.pair(window_size, "window_size"),
                                           check.pair(shift_size, "shift_size"), rel_pos_bias, scale)


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                     max_seqlen: int, scale: Optional[float] = None) -> torch.Tensor:
    """Block-diagonal attention over packed segments [total, heads, head_dim]; see the op."""
    return torch.ops.vitk.varlen_attention(q, k, v, cu_seqlens, max_seqlen, scale)
