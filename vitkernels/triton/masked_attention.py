"""Triton launchers of the masked_attention family: polyline (PPMA whole, RMT), axial decay (PPMA chunk),
Gaussian-mixture mask and reduced (PVT / S2AFormer) attention.

Plain functions called by vitkernels/ops/masked_attention.py after it has validated the arguments;
arguments and results are exactly those of the op layer's fake kernels:

    polyline_attention_fwd(q, k, v, log_alpha, log_beta, scale, symmetric, save_for_backward) -> (out, lse, parts)
    polyline_attention_bwd(grad_out, q, k, v, log_alpha, log_beta, out, parts, lse, scale, symmetric,
                           decay_grad) -> (dq, dk, dv, dlog_alpha, dlog_beta)
    axial_attention_fwd(q, k, v, log_decay, axis, scale) -> (out, lse)
    axial_attention_bwd(grad_out, q, k, v, log_decay, out, lse, axis, scale, decay_grad[, grad_out2, v2, out2])
        -> (dq, dk, dv, dlog_decay, dv2)
    axial_decay_attention_fwd(q, k, v, log_alpha, log_beta, scale, save_for_backward) -> (out, parts, mids, lse)
    gaussian_mask_attention_fwd(q, k, v, mix_weight, mix_sigma, scale) -> (out, lse)
    gaussian_mask_attention_bwd(grad_out, q, k, v, mix_weight, mix_sigma, out, lse, scale, mix_grad)
        -> (dq, dk, dv, dmix_weight, dmix_sigma)
    reduced_attention_fwd(q, k, v, scale) -> (out, lse)
    reduced_attention_bwd(grad_out, q, k, v, out, lse, scale) -> (dq, dk, dv)

Semantics: vitkernels/reference/masked_attention.py. All run on the shared online-softmax core
(attention_core.py) with the POLYLINE, AXIAL, GAUSS and DENSE modifier kinds; q, k, v are read in
place through their strides. What the launchers compute in torch is O(N) (or O(heads * H * W * M)):
the decays' prefix tables and their reverse cumulative sums for the gradients, the mixture's
[heads, H, W] mask table and the mixture-parameter gradients from its gradient. Nothing N x N exists
anywhere.

The polyline mask of a query (i1, j1) and key (i2, j2) is the sum of the decays on the path,
    logM = sgn(j1 - j2) (A[i1, j1] - A[i1, j2]) + sgn(i1 - i2) (C[i1, j2] - C[i2, j2]),
A the prefix of log_alpha along each row, C that of log_beta down each column, kept as double-float
pairs of the finite cells plus exact counts of the non-finite ones (core.segment_tables), so that no
cell off the path changes the mask: the empty path is 0, -inf on it gives -inf, NaN or +inf and -inf
NaN, +inf +inf (vitkernels/reference/masked_attention.py, segment_sums). The symmetric form runs
the core twice, the second time with TRANSPOSE (the path starts at the key), keeping each direction's
normalized output (parts) and lse; its backward is two ordinary attention backwards with dO / 2.
"""
from typing import Optional, Tuple

import torch

from . import attention_core as core

def _empty(q: torch.Tensor) -> torch.Tensor:
    # What the fake kernels return for a parameter gradient that was not asked for.
    return q.new_empty((0,))


def _image_strides(t: torch.Tensor, transpose: bool = False):
    """Token-coordinate strides of an image-layout tensor ([B, H, W, heads(, d)]); transpose swaps the
    image axes, which turns attention along columns into attention along (the view's) rows."""
    st = list(t.stride())
    if transpose:
        st[1], st[2] = st[2], st[1]
    return tuple(st)


def _table_args(t: torch.Tensor) -> dict:
    """Kernel strides of a [B, heads, rows, cols] fp32 table: (batch, row, column, head)."""
    return dict(s_t0=t.stride(0), s_t1=t.stride(2), s_t2=t.stride(3), s_th=t.stride(1))


def _path_cell_grad(x: torch.Tensor, dim: int) -> torch.Tensor:
    """The decay cells' gradient from that of their prefix sums along dim: y[i] = sum_{t >= i} x[t],
    except y[0] = 0. A path covers (min, max], so a line's first cell is on none: its gradient is
    exactly 0, not the residue (or NaN, when some pair's dS is NaN) of a sum that cancels."""
    y = torch.flip(torch.cumsum(torch.flip(x, (dim,)), dim), (dim,))
    y.narrow(dim, 0, 1).zero_()
    return y


def _decay_grad(grad: torch.Tensor, decay: torch.Tensor) -> torch.Tensor:
    """The gradient of the decays in their layout and dtype. A non-finite cell is counted, not
    summed, into the masks (core.segment_tables): no gradient reaches it, as in the reference,
    where a NaN dS of a pair would otherwise reach it through the prefix sum."""
    return torch.where(torch.isfinite(decay), grad, 0.0).to(decay.dtype).contiguous()


# ------------------------------------------------------------------------ polyline attention
def _polyline_tables(log_alpha: torch.Tensor, log_beta: torch.Tensor) -> dict:
    """The segment tables (core.segment_tables) of log_alpha along rows and of log_beta down columns,
    [B, heads, H, W] each, as kernel arguments."""
    A, KA, fa = core.segment_tables(log_alpha.permute(0, 3, 1, 2), 3)
    C, KC, fc = core.segment_tables(log_beta.permute(0, 3, 1, 2), 2)
    return dict(TA=A, TC=C, KA=KA, KC=KC, NF=torch.maximum(fa, fc), **_table_args(A))


def _polyline_modifier(tables: dict, H, W, transpose):
    return dict(H=H, W=W, TRANSPOSE=bool(transpose), **tables)


def polyline_attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_alpha: torch.Tensor,
                           log_beta: torch.Tensor, scale: float, symmetric: bool, save_for_backward: bool = True):
    """(out [B, H, W, heads, dv], lse [P, B, H, W, heads] fp32, parts [2, B, H, W, heads, dv] or empty),
    P = 2 with symmetric. out = (parts[0] + parts[1]) / 2 with symmetric. Without save_for_backward
    parts comes back empty (the two launches still write it)."""
    B, H, W, heads, _ = q.shape
    dv = v.shape[-1]
    P = 2 if symmetric else 1
    out = torch.empty((B, H, W, heads, dv), dtype=q.dtype, device=q.device)
    lse = torch.empty((P, B, H, W, heads), dtype=torch.float32, device=q.device)
    parts = (torch.empty((2, B, H, W, heads, dv), dtype=q.dtype, device=q.device) if symmetric else _empty(q))
    if out.numel() == 0:
        return out, lse, parts if save_for_backward else _empty(q)
    tables = _polyline_tables(log_alpha, log_beta)
    for p in range(P):
        o = parts[p] if symmetric else out
        strides = dict(q=_image_strides(q), k=_image_strides(k), v=_image_strides(v), o=_image_strides(o),
                       l=_image_strides(lse[p]))
        core.attention_forward(core.POLYLINE, q, k, v, o, lse[p], strides, B, heads, H * W, scale,
                               _polyline_modifier(tables, H, W, p == 1))
    if symmetric:
        out.copy_((parts[0].float() + parts[1].float()) * 0.5)
    if not save_for_backward:
        parts = _empty(q)
    return out, lse, parts


def polyline_attention_bwd(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                           log_alpha: torch.Tensor, log_beta: torch.Tensor, out: torch.Tensor,
                           parts: torch.Tensor, lse: torch.Tensor, scale: float, symmetric: bool,
                           decay_grad: bool):
    """(dq, dk, dv, dlog_alpha, dlog_beta); the decay gradients are empty unless decay_grad.

    Each mask direction is an attention of its own with output parts[p] and gradient dO / 2, so each
    pass runs the core's backward with its own Drow = rowsum(dO / 2 * parts[p]); the passes' dq, dk,
    dv land in fp32 buffers that are summed once. The dQ kernel scatters dS into dA, dC (the
    gradients of the prefix tables; atomics, since many programs hit one entry), and reverse
    cumulative sums turn those into the decays' gradients.
    """
    B, H, W, heads, dqk = q.shape
    dvd = v.shape[-1]
    P = 2 if symmetric else 1
    if q.numel() == 0 or grad_out.numel() == 0:
        zeros = [torch.zeros((B, H, W, heads, d), dtype=q.dtype, device=q.device) for d in (dqk, dqk, dvd)]
        if not decay_grad:
            return (*zeros, _empty(q), _empty(q))
        return (*zeros, torch.zeros(log_alpha.shape, dtype=log_alpha.dtype, device=q.device),
                torch.zeros(log_beta.shape, dtype=log_beta.dtype, device=q.device))
    tables = _polyline_tables(log_alpha, log_beta)
    # The gradients of the tables' (finite) prefixes, laid out like them.
    dA = torch.zeros(tables["TA"].shape, dtype=torch.float32, device=q.device) if decay_grad else None
    dC = torch.zeros(tables["TC"].shape, dtype=torch.float32, device=q.device) if decay_grad else None
    acc_dtype = torch.float32 if symmetric else q.dtype
    grads = [torch.empty((P, B, H, W, heads, d), dtype=acc_dtype, device=q.device) for d in (dqk, dqk, dvd)]
    g = grad_out * 0.5 if symmetric else grad_out
    for p in range(P):
        o = parts[p] if symmetric else out
        dq, dk, dv = (t[p] for t in grads)
        lse_p = lse[p].contiguous()
        strides = dict(q=_image_strides(q), k=_image_strides(k), v=_image_strides(v), g=_image_strides(g),
                       o=_image_strides(o), l=_image_strides(lse_p), dq=_image_strides(dq),
                       dk=_image_strides(dk), dv=_image_strides(dv))
        core.attention_backward(core.POLYLINE, g, q, k, v, o, lse_p, dq, dk, dv, strides, B, heads, H * W,
                                scale, _polyline_modifier(tables, H, W, p == 1), dA, 1, dC)
    if symmetric:
        dq, dk, dv = ((t[0] + t[1]).to(q.dtype) for t in grads)
    else:
        dq, dk, dv = (t[0] for t in grads)
    if not decay_grad:
        return dq, dk, dv, _empty(q), _empty(q)
    dla = _decay_grad(_path_cell_grad(dA, 3).permute(0, 2, 3, 1), log_alpha)
    dlb = _decay_grad(_path_cell_grad(dC, 2).permute(0, 2, 3, 1), log_beta)
    return dq, dk, dv, dla, dlb


# ------------------------------------------------------------------------ axial attention
def _axial_modifier(log_decay: torch.Tensor, axis: int, lines: int, length: int) -> dict:
    """The segment tables of log_decay along the attention axis, [B, heads, lines, length] in the
    view's order (rows for axis 2, columns for axis 1), as kernel arguments."""
    t = log_decay.permute(0, 3, 1, 2) if axis == 2 else log_decay.permute(0, 3, 2, 1)
    table, counts, flag = core.segment_tables(t, 3)
    return dict(H=lines, W=length, TA=table, KA=counts, NF=flag, **_table_args(table))


def _axial_fwd_into(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_decay: torch.Tensor, axis: int,
                    scale: float, out: torch.Tensor, lse: torch.Tensor) -> None:
    B, H, W, heads, _ = q.shape
    tr = int(axis) == 1
    lines, length = (W, H) if tr else (H, W)
    strides = dict(q=_image_strides(q, tr), k=_image_strides(k, tr), v=_image_strides(v, tr),
                   o=_image_strides(out, tr), l=_image_strides(lse, tr))
    core.attention_forward(core.AXIAL, q, k, v, out, lse, strides, B * lines, heads, length, scale,
                           _axial_modifier(log_decay, int(axis), lines, length))


def axial_attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_decay: torch.Tensor, axis: int,
                        scale: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """Attention within each row (axis 2) or column (axis 1) of every image, scores plus the segment
    sums of log_decay along the line. (out [B, H, W, heads, dv], lse [B, H, W, heads] fp32)."""
    out, lse = core.new_outputs(q, v)
    if out.numel() == 0:
        return out, lse
    _axial_fwd_into(q, k, v, log_decay, axis, scale, out, lse)
    return out, lse


def axial_decay_attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_alpha: torch.Tensor,
                              log_beta: torch.Tensor, scale: float, save_for_backward: bool = True):
    """PPMA's criss-cross form 0.5 A_h(A_w v) + 0.5 A_w(A_h v) as four launches of the one-axis kernel,
    each one fused attention; (out, parts = [A_h y_w, A_w y_h], mids = [y_w, y_h], lse = [rows, columns]).
    The second launch along an axis recomputes that axis's softmax, so it writes the same lse again.
    Without save_for_backward the returned parts and mids are empty (the launches still need them)."""
    B, H, W, heads, _ = q.shape
    dv = v.shape[-1]
    parts = torch.empty((2, B, H, W, heads, dv), dtype=q.dtype, device=q.device)
    mids = torch.empty_like(parts)
    lse = torch.empty((2, B, H, W, heads), dtype=torch.float32, device=q.device)
    if parts.numel() == 0:
        out = parts[0].clone()
    else:
        _criss_cross_into(q, k, v, log_alpha, log_beta, scale, parts, mids, lse)
        out = torch.add(parts[0], parts[1]).mul_(0.5)
    if not save_for_backward:
        parts, mids = parts.new_empty((0,)), mids.new_empty((0,))
    return out, parts, mids, lse


def _criss_cross_into(q, k, v, log_alpha, log_beta, scale, parts, mids, lse):
    _axial_fwd_into(q, k, v, log_alpha, 2, scale, mids[0], lse[0])
    _axial_fwd_into(q, k, v, log_beta, 1, scale, mids[1], lse[1])
    _axial_fwd_into(q, k, mids[0], log_beta, 1, scale, parts[0], lse[1])
    _axial_fwd_into(q, k, mids[1], log_alpha, 2, scale, parts[1], lse[0])


def axial_attention_bwd(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        log_decay: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, axis: int, scale: float,
                        decay_grad: bool, grad_out2: Optional[torch.Tensor] = None, v2: Optional[torch.Tensor] = None,
                        out2: Optional[torch.Tensor] = None):
    """(dq, dk, dv, dlog_decay, dv2); dlog_decay is empty unless decay_grad, dv2 unless a second value
    stream (grad_out2, v2, out2) is given. Its gradients are linear in dS, so the second stream is
    its own launch and its dq, dk and dlog_decay are added to the first's."""
    dq, dk, dv, dd = _axial_bwd_one(grad_out, q, k, v, log_decay, out, lse, axis, scale, decay_grad)
    if grad_out2 is None:
        return dq, dk, dv, dd, _empty(q)
    dq2, dk2, dv2, dd2 = _axial_bwd_one(grad_out2, q, k, v2, log_decay, out2, lse, axis, scale, decay_grad)
    return dq.add_(dq2), dk.add_(dk2), dv, dd.add_(dd2) if decay_grad else dd, dv2


def _axial_bwd_one(grad_out, q, k, v, log_decay, out, lse, axis, scale, decay_grad):
    B, H, W, heads, _ = q.shape
    dq, dk, dv = core.new_input_grads(q, k, v)
    if dq.numel() == 0 or dv.numel() == 0:
        dq.zero_(), dk.zero_(), dv.zero_()
        dd = torch.zeros(log_decay.shape, dtype=log_decay.dtype, device=q.device) if decay_grad else _empty(q)
        return dq, dk, dv, dd
    axis = int(axis)
    tr = axis == 1
    lines, length = (W, H) if tr else (H, W)
    mod = _axial_modifier(log_decay, axis, lines, length)
    dT = torch.zeros(mod["TA"].shape, dtype=torch.float32, device=q.device) if decay_grad else None
    lse = lse.contiguous()
    strides = dict(q=_image_strides(q, tr), k=_image_strides(k, tr), v=_image_strides(v, tr),
                   g=_image_strides(grad_out, tr), o=_image_strides(out, tr), l=_image_strides(lse, tr),
                   dq=_image_strides(dq, tr), dk=_image_strides(dk, tr), dv=_image_strides(dv, tr))
    core.attention_backward(core.AXIAL, grad_out, q, k, v, out, lse, dq, dk, dv, strides, B * lines, heads,
                            length, scale, mod, dT)
    if not decay_grad:
        return dq, dk, dv, _empty(q)
    dd = _path_cell_grad(dT, 3)                                   # [B, heads, lines, length]
    dd = dd.permute(0, 2, 3, 1) if axis == 2 else dd.permute(0, 3, 2, 1)
    return dq, dk, dv, _decay_grad(dd, log_decay)


# ------------------------------------------------------------------------ Gaussian-mixture mask
def _mixture(H: int, W: int, mix_weight: torch.Tensor, mix_sigma: torch.Tensor):
    """(G [heads, H, W] fp32, e [heads, M, H, W], d2 [H, W], s [heads, M]): the mask as a function of
    (|dy|, |dx|), with the pieces its parameter gradients need."""
    dev = mix_weight.device
    dy = torch.arange(H, device=dev, dtype=torch.float32)
    dx = torch.arange(W, device=dev, dtype=torch.float32)
    d2 = dy[:, None] ** 2 + dx[None, :] ** 2
    w = mix_weight.to(torch.float32)
    s = mix_sigma.to(torch.float32) ** 2 + 1e-5
    e = torch.exp(-d2[None, None] / (2.0 * s[:, :, None, None]))
    G = (w[:, :, None, None] * e).sum(1).contiguous()
    return G, e, d2, s


def _gauss_modifier(G: torch.Tensor, H: int, W: int) -> dict:
    return dict(H=H, W=W, TA=G, s_t0=0, s_t1=G.stride(1), s_t2=G.stride(2), s_th=G.stride(0))


def gaussian_mask_attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mix_weight: torch.Tensor,
                                mix_sigma: torch.Tensor, scale: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """softmax((q k^T scale) * G_h) v. (out [B, H, W, heads, dv], lse [B, H, W, heads] fp32)."""
    B, H, W, heads, _ = q.shape
    out, lse = core.new_outputs(q, v)
    if out.numel() == 0:
        return out, lse
    G = _mixture(H, W, mix_weight, mix_sigma)[0]
    strides = dict(q=_image_strides(q), k=_image_strides(k), v=_image_strides(v), o=_image_strides(out),
                   l=_image_strides(lse))
    core.attention_forward(core.GAUSS, q, k, v, out, lse, strides, B, heads, H * W, scale,
                           _gauss_modifier(G, H, W))
    return out, lse


def gaussian_mask_attention_bwd(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                mix_weight: torch.Tensor, mix_sigma: torch.Tensor, out: torch.Tensor,
                                lse: torch.Tensor, scale: float, mix_grad: bool):
    """(dq, dk, dv, dmix_weight, dmix_sigma); the mixture gradients are empty unless mix_grad.

    The dQ kernel adds dS * raw into dG [replicas, heads, H, W] (atomics: every pair at one offset
    shares an entry); then d/dw = sum dG e and d/dsigma = sum dG w e d^2 sigma / s^2,
    e = exp(-d^2 / (2 s)), s = sigma^2 + 1e-5.
    """
    B, H, W, heads, _ = q.shape
    dq, dk, dv = core.new_input_grads(q, k, v)
    if dq.numel() == 0 or dv.numel() == 0:
        dq.zero_(), dk.zero_(), dv.zero_()
        if not mix_grad:
            return dq, dk, dv, _empty(q), _empty(q)
        return dq, dk, dv, torch.zeros_like(mix_weight), torch.zeros_like(mix_sigma)
    G, e, d2, s = _mixture(H, W, mix_weight, mix_sigma)
    buf, replicas = None, 1
    if mix_grad:
        replicas = core.gradient_replicas(B, heads * H * W * 4, q.device)
        buf = torch.zeros((replicas, heads, H, W), dtype=torch.float32, device=q.device)
    lse = lse.contiguous()
    strides = dict(q=_image_strides(q), k=_image_strides(k), v=_image_strides(v), g=_image_strides(grad_out),
                   o=_image_strides(out), l=_image_strides(lse), dq=_image_strides(dq), dk=_image_strides(dk),
                   dv=_image_strides(dv))
    core.attention_backward(core.GAUSS, grad_out, q, k, v, out, lse, dq, dk, dv, strides, B, heads, H * W,
                            scale, _gauss_modifier(G, H, W), buf, replicas)
    if not mix_grad:
        return dq, dk, dv, _empty(q), _empty(q)
    dG = buf.sum(0)[:, None]                                            # [heads, 1, H, W]
    dw = (dG * e).sum((2, 3))
    sigma = mix_sigma.to(torch.float32)
    w = mix_weight.to(torch.float32)
    dsig = (dG * e * d2).sum((2, 3)) * w * sigma / (s * s)
    return dq, dk, dv, dw.to(mix_weight.dtype), dsig.to(mix_sigma.dtype)


# ------------------------------------------------------------------------ reduced attention
def _token_strides(t: torch.Tensor):
    """Kernel token coordinates (batch, -, token) of a [B, N, heads(, d)] tensor."""
    st = t.stride()
    return (st[0], 0, *st[1:])


def reduced_attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                          scale: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """Dense attention of q [B, Nq, heads, dqk] against k [B, Nk, heads, dqk], v [B, Nk, heads, dv].
    (out [B, Nq, heads, dv], lse [B, Nq, heads] fp32)."""
    B, Nq, heads, _ = q.shape
    Nk = k.shape[1]
    out, lse = core.new_outputs(q, v)
    if out.numel() == 0:
        return out, lse
    t = _token_strides
    strides = dict(q=t(q), k=t(k), v=t(v), o=t(out), l=t(lse))
    core.attention_forward(core.DENSE, q, k, v, out, lse, strides, B, heads, Nq, scale, dict(NQ=Nq, NK=Nk),
                           n_k_max=Nk)
    return out, lse


def reduced_attention_bwd(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                          out: torch.Tensor, lse: torch.Tensor,
                          scale: float) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv), contiguous, q's dtype."""
    B, Nq, heads, _ = q.shape
    Nk = k.shape[1]
    dq, dk, dv = core.new_input_grads(q, k, v)
    if dq.numel() == 0 or dk.numel() == 0 or dv.numel() == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    lse = lse.contiguous()
    t = _token_strides
    strides = dict(q=t(q), k=t(k), v=t(v), g=t(grad_out), o=t(out), l=t(lse), dq=t(dq), dk=t(dk), dv=t(dv))
    core.attention_backward(core.DENSE, grad_out, q, k, v, out, lse, dq, dk, dv, strides, B, heads, Nq, scale,
                            dict(NQ=Nq, NK=Nk), n_k_max=Nk)
    return dq, dk, dv
