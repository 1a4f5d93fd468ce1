"""Triton launchers of the window_attention family: shifted-window (Swin) and packed varlen attention.

Plain functions called by vitkernels/ops/window_attention.py after it has validated the arguments:

    window_attention_fwd(q, k, v, window_size, shift_size, rel_pos_bias, scale) -> (out, lse)
    window_attention_bwd(grad_out, q, k, v, out, lse, window_size, shift_size, rel_pos_bias, scale,
                         bias_grad) -> (dq, dk, dv, dbias)
    varlen_attention_fwd(q, k, v, cu_seqlens, max_seqlen, scale) -> (out, lse)
    varlen_attention_bwd(grad_out, q, k, v, out, lse, cu_seqlens, max_seqlen, scale) -> (dq, dk, dv)

The semantics are vitkernels/reference/window_attention.py's. The kernels are the shared
online-softmax core in attention_core.py with the WINDOW and VARLEN modifier kinds. q, k, v are read
in place through their strides (a typical q is a strided slice of a packed [B, H, W, 3, heads, hd]
qkv tensor): the cyclic shift, the padding to whole windows and the window partition all happen in
the kernels' address arithmetic, so no rolled, padded or partitioned copy is ever made.

A program owns BLOCK_M queries of one (window or segment, head); the grid is one flat axis over
(group, query block, head), heads fastest. Outputs are contiguous: out [B, H, W, heads, dv] in q's
dtype, lse float32 [B, H, W, heads] (natural log), and for varlen [total, heads, dv], [total, heads].
The launchers trust the op layer's checks (0 <= shift < window, matching shapes, dtypes and
devices, cu_seqlens non-decreasing from 0 to total with no segment longer than max_seqlen).

On CPU tensors the kernels run under TRITON_INTERPRET=1 (set before triton is imported), which is
how they are tested on machines without a GPU.
"""
from typing import Optional, Sequence, Tuple

import torch
import triton

from ..reference.window_attention import relative_position_index
from . import attention_core as core

def _strides5(t: torch.Tensor) -> Tuple[int, ...]:
    """(s0, s1, s2, s_head, s_dim) of an image-layout [B, H, W, heads, d] tensor."""
    return tuple(t.stride())


def _strides5_packed(t: torch.Tensor) -> Tuple[int, ...]:
    """The same for a packed [total, heads, d] tensor, whose rows are the kernels' i2 coordinate."""
    return (0, 0, t.stride(0), t.stride(1), t.stride(2))


def _lse_strides(t: torch.Tensor) -> Tuple[int, ...]:
    return tuple(t.stride()) if t.dim() == 4 else (0, 0, t.stride(0), t.stride(1))


class _Geometry:
    """Where the windows are: everything the WINDOW kind's helpers need, computed once per call."""

    def __init__(self, H: int, W: int, window_size: Sequence[int], shift_size: Sequence[int]):
        wh, ww = (int(x) for x in window_size)
        sh, sw = (int(x) for x in shift_size)
        Hp, Wp = triton.cdiv(H, wh) * wh, triton.cdiv(W, ww) * ww
        self.wh, self.ww, self.N = wh, ww, wh * ww
        self.nwx = Wp // ww
        self.nw = (Hp // wh) * self.nwx
        self.shifted = sh != 0 or sw != 0
        # Region thresholds per axis (see core._window_region); an unshifted axis is one region.
        ty = (Hp - wh, Hp - sh) if sh else (Hp, Hp)
        tx = (Wp - ww, Wp - sw) if sw else (Wp, Wp)
        self.args = dict(H=H, W=W, SH=sh, SW=sw, NWX=self.nwx, NW=self.nw,
                         TY1=ty[0], TY2=ty[1], TX1=tx[0], TX2=tx[1])


def _window_modifier(geo: "_Geometry", rel_pos_bias: Optional[torch.Tensor]) -> dict:
    mod = dict(geo.args, WH=geo.wh, WW=geo.ww, SHIFTED=geo.shifted, HAS_BIAS=rel_pos_bias is not None)
    if rel_pos_bias is not None:
        mod.update(BIAS=rel_pos_bias, s_bias_r=rel_pos_bias.stride(0), s_bias_h=rel_pos_bias.stride(1))
    return mod


# ------------------------------------------------------------------------ window attention
def window_attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window_size: Sequence[int],
                         shift_size: Sequence[int], rel_pos_bias: Optional[torch.Tensor],
                         scale: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """Shifted-window attention over [B, H, W, heads, d] q, k, v (any strides; v's d may differ).

    Returns out [B, H, W, heads, dv] (contiguous, q's dtype) and lse [B, H, W, heads] (float32, the
    natural log-sum-exp of each query's scores, for the backward).
    """
    B, H, W, heads, _ = q.shape
    out, lse = core.new_outputs(q, v)
    if out.numel() == 0:
        return out, lse
    geo = _Geometry(H, W, window_size, shift_size)
    strides = dict(q=_strides5(q), k=_strides5(k), v=_strides5(v), o=_strides5(out), l=_lse_strides(lse))
    core.attention_forward(core.WINDOW, q, k, v, out, lse, strides, B * geo.nw, heads, geo.N, scale,
                           _window_modifier(geo, rel_pos_bias))
    return out, lse


def window_attention_bwd(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                         out: torch.Tensor, lse: torch.Tensor, window_size: Sequence[int],
                         shift_size: Sequence[int], rel_pos_bias: Optional[torch.Tensor], scale: float,
                         bias_grad: bool, _replicas: Optional[int] = None):
    """(dq, dk, dv, dbias): contiguous image-layout gradients in q's dtype; dbias is the gradient of
    the [(2wh-1)(2ww-1), heads] table in its dtype when bias_grad (and a table) is given, else an
    empty tensor.

    The table gradient is gathered in two steps: the dQ kernel atomically adds dS of every window
    into an fp32 [replicas, heads, N, N] buffer (N = wh*ww; replicas > 1 on a GPU only, to spread
    contention between concurrently running windows), then a tiny O(N^2 * heads) torch sum +
    index_add folds it onto the table by relative position. Being atomic, its fp32 rounding order
    varies from run to run on a GPU (dq, dk, dv do not).
    """
    B, H, W, heads, _ = q.shape
    dq, dk, dv = core.new_input_grads(q, k, v)
    want_dbias = bool(bias_grad) and rel_pos_bias is not None
    empty = torch.empty(0, dtype=q.dtype if rel_pos_bias is None else rel_pos_bias.dtype, device=q.device)
    geo = _Geometry(H, W, window_size, shift_size)
    groups = B * geo.nw
    if dq.numel() == 0 or dv.numel() == 0:
        dq.zero_(), dk.zero_(), dv.zero_()
        return dq, dk, dv, (torch.zeros_like(rel_pos_bias) if want_dbias else empty)
    buf, replicas = None, 1
    if want_dbias:
        replicas = _replicas or core.gradient_replicas(groups, heads * geo.N * geo.N * 4, q.device)
        buf = torch.zeros((replicas, heads, geo.N, geo.N), dtype=torch.float32, device=q.device)
    lse = lse.contiguous()
    strides = dict(q=_strides5(q), k=_strides5(k), v=_strides5(v), g=_strides5(grad_out), o=_strides5(out),
                   l=_lse_strides(lse), dq=_strides5(dq), dk=_strides5(dk), dv=_strides5(dv))
    core.attention_backward(core.WINDOW, grad_out, q, k, v, out, lse, dq, dk, dv, strides, groups, heads,
                            geo.N, scale, _window_modifier(geo, rel_pos_bias), buf, replicas)
    if not want_dbias:
        return dq, dk, dv, empty
    per_pair = buf.sum(0) if replicas > 1 else buf[0]                          # [heads, N, N]
    idx = relative_position_index(geo.wh, geo.ww, q.device).reshape(-1)
    table = torch.zeros((rel_pos_bias.shape[0], heads), dtype=torch.float32, device=q.device)
    table.index_add_(0, idx, per_pair.permute(1, 2, 0).reshape(-1, heads))
    return dq, dk, dv, table.to(rel_pos_bias.dtype)


# ------------------------------------------------------------------------ varlen attention
def _segments(cu_seqlens: torch.Tensor, max_seqlen: int) -> Tuple[torch.Tensor, int]:
    """The offsets as the kernels index them (contiguous int32: a strided view would be read as if it
    were dense) and the longest real segment, which sizes the grid: max_seqlen is only a bound, and a
    legal 2**31 - 1 would launch billions of empty programs."""
    seq = cu_seqlens.to(torch.int32).contiguous()
    longest = int((seq[1:] - seq[:-1]).max()) if seq.numel() > 1 else 0
    return seq, min(int(max_seqlen), longest)


def varlen_attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                         max_seqlen: int, scale: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """Block-diagonal attention within segments [cu_seqlens[s], cu_seqlens[s+1]) of packed
    [total, heads, d] q, k, v (any strides). Returns out [total, heads, dv] (q's dtype) and lse
    [total, heads] (float32). max_seqlen must bound every segment length (rows past it would be
    left unwritten); rows outside [cu_seqlens[0], cu_seqlens[-1]) are left unwritten.
    """
    heads = q.shape[1]
    out, lse = core.new_outputs(q, v)
    segments = cu_seqlens.shape[0] - 1
    if out.numel() == 0 or segments <= 0 or max_seqlen <= 0:
        return out, lse
    seq, longest = _segments(cu_seqlens, max_seqlen)
    if longest <= 0:
        return out, lse
    p = _strides5_packed
    strides = dict(q=p(q), k=p(k), v=p(v), o=p(out), l=_lse_strides(lse))
    core.attention_forward(core.VARLEN, q, k, v, out, lse, strides, segments, heads, longest, scale,
                           dict(SEQ=seq))
    return out, lse


def varlen_attention_bwd(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                         out: torch.Tensor, lse: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int,
                         scale: float) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv), contiguous [total, heads, d] in q's dtype. Rows outside every segment get zero
    gradients (they take no part in the attention)."""
    heads = q.shape[1]
    dq, dk, dv = core.new_input_grads(q, k, v, zeros=True)
    segments = cu_seqlens.shape[0] - 1
    if dq.numel() == 0 or dv.numel() == 0 or segments <= 0 or max_seqlen <= 0:
        return dq, dk, dv
    seq, longest = _segments(cu_seqlens, max_seqlen)
    if longest <= 0:
        return dq, dk, dv
    lse = lse.contiguous()
    p = _strides5_packed
    strides = dict(q=p(q), k=p(k), v=p(v), g=p(grad_out), o=p(out), l=_lse_strides(lse),
                   dq=p(dq), dk=p(dk), dv=p(dv))
    core.attention_backward(core.VARLEN, grad_out, q, k, v, out, lse, dq, dk, dv, strides, segments, heads,
                            longest, scale, dict(SEQ=seq))
    return dq, dk, dv
