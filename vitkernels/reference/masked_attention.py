"""Eager references of the masked_attention family, built the way the papers' own code builds them.

Every function here materializes the dense masks and score matrices ([B, heads, N, N] for the
whole-image forms, [B, H, heads, W, W] and [B, W, heads, H, H] for the axial form): that is what the
kernels in vitkernels.ops.masked_attention replace, and what they are tested against. Layout is the
package's image layout, heads last: q, k, v [B, H, W, heads, d] (v's d may differ from q/k's).

    polyline_attention       PPMA's "whole" attention (2-D polyline path decay mask)
    axial_decay_attention    PPMA's "chunk" criss-cross attention (row and column decay masks)
    manhattan_attention      RMT's Manhattan self-attention (gamma^(|dy| + |dx|), added as a log)
    gaussian_mask_attention  the Gaussian-mixture mask of "RetNet viewed through convolution"
    reduced_attention        dense attention against a shorter k/v (PVT's spatial reduction, S2AFormer's strips)
"""
from typing import Optional

import torch


def _heads_first(t: torch.Tensor) -> torch.Tensor:
    """[B, H, W, heads, d] -> [B, heads, H*W, d]."""
    B, H, W, nh, d = t.shape
    return t.reshape(B, H * W, nh, d).transpose(1, 2)


def _image_out(o: torch.Tensor, H: int, W: int) -> torch.Tensor:
    """[B, heads, H*W, d] -> [B, H, W, heads, d], contiguous."""
    B, nh, N, d = o.shape
    return o.transpose(1, 2).reshape(B, H, W, nh, d).contiguous()


def _scale(q: torch.Tensor, scale: Optional[float]) -> float:
    return q.shape[-1] ** -0.5 if scale is None else float(scale)


def segment_sums(x: torch.Tensor) -> torch.Tensor:
    """[..., L] -> [..., L, L] with out[..., i, j] = sum of x[..., t] for t in (min(i, j), max(i, j)].

    PPMA's 1-D structured mask: the log-decay summed along the path between two positions, so
    x[..., 0] never enters and the diagonal (the empty path) is exactly 0. It is built as PPMA does,
    from pairwise differences of a cumulative sum, but of the finite values only: a non-finite
    decay is counted instead of summed, so that a -inf ("no path") or NaN cell changes only the
    pairs whose path crosses it. The pair's value is then the IEEE sum over its path: -inf when the
    path holds -inf, +inf when it holds +inf, NaN when it holds NaN or both infinities.
    """
    finite = torch.isfinite(x)
    xf = torch.where(finite, x, torch.zeros((), dtype=x.dtype, device=x.device))
    # The prefix sum starts after x[..., 0], which no path holds: its gradient is then exactly 0, not
    # the residue (or NaN, when a pair's dS is NaN) of a difference that cancels it.
    c = torch.cat([torch.zeros_like(xf[..., :1]), torch.cumsum(xf[..., 1:], dim=-1)], dim=-1)
    diff = c[..., :, None] - c[..., None, :]
    L = x.shape[-1]
    lower = torch.ones(L, L, dtype=torch.bool, device=x.device).tril()
    out = torch.where(lower, diff, -diff)

    def on_path(cells):  # how many of ``cells`` lie on each pair's path: exact integer differences
        n = torch.cumsum(cells.to(torch.int32), dim=-1)
        return (n[..., :, None] - n[..., None, :]).abs() > 0

    neg, pos, nan = on_path(x == float("-inf")), on_path(x == float("inf")), on_path(x.isnan())
    inf = torch.tensor(float("inf"), dtype=x.dtype, device=x.device)
    out = torch.where(neg, -inf, torch.where(pos, inf, out))
    return torch.where(nan | (neg & pos), torch.full_like(out, float("nan")), out)


def polyline_mask(log_alpha: torch.Tensor, log_beta: torch.Tensor) -> torch.Tensor:
    """The dense [B, heads, N, N] polyline log-mask of PPMA, N = H*W, tokens row-major.

    logM[(i1, j1), (i2, j2)] = sum_{c in (min j, max j]} log_alpha[i1, c]
                             + sum_{r in (min i, max i]} log_beta[r, j2]
    built as PPMA does: a [W, W] segment-sum matrix per row from log_alpha, an [H, H] one per column
    from log_beta, each repeated over the other axis into [B, heads, H, H, W, W] and summed.
    """
    B, H, W, nh = log_alpha.shape
    mw = segment_sums(log_alpha.permute(0, 3, 1, 2))          # [B, heads, H(i1), W(j1), W(j2)]
    mh = segment_sums(log_beta.permute(0, 3, 2, 1))           # [B, heads, W(j2), H(i1), H(i2)]
    mw = mw[:, :, :, None, :, :].expand(B, nh, H, H, W, W)    # [b, h, i1, i2, j1, j2]
    mh = mh.permute(0, 1, 3, 4, 2)[:, :, :, :, None, :].expand(B, nh, H, H, W, W)
    mask = (mw + mh).permute(0, 1, 2, 4, 3, 5)                 # [b, h, i1, j1, i2, j2]
    return mask.reshape(B, nh, H * W, H * W)


def polyline_attention(q, k, v, log_alpha, log_beta, scale: Optional[float] = None, symmetric: bool = True):
    """softmax(q k^T scale + logM) v, or with symmetric the mean of that and softmax(... + logM^T) v."""
    B, H, W, nh, _ = q.shape
    qh, kh, vh = _heads_first(q), _heads_first(k), _heads_first(v)
    scores = (qh @ kh.transpose(-1, -2)) * _scale(q, scale)
    mask = polyline_mask(log_alpha.to(scores.dtype), log_beta.to(scores.dtype))
    probs = torch.softmax(scores + mask, dim=-1)
    if symmetric:
        probs = 0.5 * probs + 0.5 * torch.softmax(scores + mask.transpose(-1, -2), dim=-1)
    return _image_out(probs @ vh, H, W)


def manhattan_decay(H: int, W: int, log_gamma: torch.Tensor) -> torch.Tensor:
    """RMT's 2-D decay mask [heads, N, N]: (|y1 - y2| + |x1 - x2|) * log_gamma[head]."""
    ys, xs = torch.meshgrid(torch.arange(H, device=log_gamma.device), torch.arange(W, device=log_gamma.device),
                            indexing="ij")
    grid = torch.stack([ys.reshape(-1), xs.reshape(-1)], dim=-1).to(log_gamma.dtype)
    dist = (grid[:, None, :] - grid[None, :, :]).abs().sum(-1)
    # dist steps of log_gamma each; the empty path (the diagonal) is 0 even for a -inf or NaN gamma.
    return torch.where(dist[None] == 0, torch.zeros((), dtype=log_gamma.dtype, device=log_gamma.device),
                       dist[None] * log_gamma[:, None, None])


def manhattan_attention(q, k, v, log_gamma: torch.Tensor, scale: Optional[float] = None):
    """RMT's MaSA (whole form): softmax(q k^T scale + Manhattan decay mask) v. log_gamma: [heads]."""
    B, H, W, nh, _ = q.shape
    qh, kh, vh = _heads_first(q), _heads_first(k), _heads_first(v)
    scores = (qh @ kh.transpose(-1, -2)) * _scale(q, scale)
    probs = torch.softmax(scores + manhattan_decay(H, W, log_gamma.to(scores.dtype)), dim=-1)
    return _image_out(probs @ vh, H, W)


def axial_decay_attention(q, k, v, log_alpha, log_beta, scale: Optional[float] = None):
    """PPMA's chunk attention: 0.5 A_h (A_w v) + 0.5 A_w (A_h v).

    A_w: attention within each row i over its W tokens, scores + segment sums of log_alpha[i, :];
    A_h: within each column j over its H tokens, scores + segment sums of log_beta[:, j].
    """
    s = _scale(q, scale)
    qw, kw, vw = (t.permute(0, 1, 3, 2, 4) for t in (q, k, v))        # [B, H, heads, W, d]
    qc, kc, vc = (t.permute(0, 2, 3, 1, 4) for t in (q, k, v))        # [B, W, heads, H, d]
    mask_w = segment_sums(log_alpha.permute(0, 1, 3, 2).to(q.dtype))  # [B, H, heads, W, W]
    mask_h = segment_sums(log_beta.permute(0, 2, 3, 1).to(q.dtype))   # [B, W, heads, H, H]
    a_w = torch.softmax((qw @ kw.transpose(-1, -2)) * s + mask_w, dim=-1)
    a_h = torch.softmax((qc @ kc.transpose(-1, -2)) * s + mask_h, dim=-1)
    # Rows first, then columns.
    y = (a_w @ vw).permute(0, 3, 2, 1, 4)                              # [B, W, heads, H, d]
    out_wh = (a_h @ y).permute(0, 3, 1, 2, 4)                          # [B, H, W, heads, d]
    # Columns first, then rows.
    y = (a_h @ vc).permute(0, 3, 2, 1, 4)                              # [B, H, heads, W, d]
    out_hw = (a_w @ y).permute(0, 1, 3, 2, 4)                          # [B, H, W, heads, d]
    return (0.5 * out_wh + 0.5 * out_hw).contiguous()


def gaussian_mixture_mask(H: int, W: int, mix_weight: torch.Tensor, mix_sigma: torch.Tensor) -> torch.Tensor:
    """[heads, N, N]: sum_m mix_weight[h, m] * exp(-d^2 / (2 (mix_sigma[h, m]^2 + 1e-5))), d the grid distance."""
    ys, xs = torch.meshgrid(torch.arange(H, device=mix_weight.device), torch.arange(W, device=mix_weight.device),
                            indexing="ij")
    grid = torch.stack([ys.reshape(-1), xs.reshape(-1)], dim=-1).to(mix_weight.dtype)
    d2 = ((grid[:, None, :] - grid[None, :, :]) ** 2).sum(-1)                       # [N, N]
    denom = 2.0 * (mix_sigma ** 2 + 1e-5)                                             # [heads, M]
    g = mix_weight[:, :, None, None] * torch.exp(-d2[None, None] / denom[:, :, None, None])
    return g.sum(1)


def gaussian_mask_attention(q, k, v, mix_weight, mix_sigma, scale: Optional[float] = None):
    """softmax((q k^T scale) * G_h) v: the mask multiplies the scores, as in the paper's code."""
    B, H, W, nh, _ = q.shape
    qh, kh, vh = _heads_first(q), _heads_first(k), _heads_first(v)
    scores = (qh @ kh.transpose(-1, -2)) * _scale(q, scale)
    g = gaussian_mixture_mask(H, W, mix_weight.to(scores.dtype), mix_sigma.to(scores.dtype))
    probs = torch.softmax(scores * g[None], dim=-1)
    return _image_out(probs @ vh, H, W)


def reduced_attention(q, k, v, scale: Optional[float] = None):
    """Dense attention of q [B, Nq, heads, dqk] against k [B, Nk, heads, dqk], v [B, Nk, heads, dv]."""
    s = _scale(q, scale)
    qh, kh, vh = (t.transpose(1, 2) for t in (q, k, v))
    attn = torch.softmax((qh @ kh.transpose(-1, -2)) * s, dim=-1)
    return (attn @ vh).transpose(1, 2).contiguous()


def log_gamma_rmt(num_heads: int, initial_value: float = 2.0, heads_range: float = 4.0) -> torch.Tensor:
    """RMT's per-head decay: log(1 - 2^(-initial_value - heads_range * h / num_heads))."""
    h = torch.arange(num_heads, dtype=torch.float64)
    return torch.log(1 - 2 ** (-initial_value - heads_range * h / num_heads)).float()


__all__ = ["segment_sums", "polyline_mask", "polyline_attention", "manhattan_decay", "manhattan_attention",
           "axial_decay_attention", "gaussian_mixture_mask", "gaussian_mask_attention", "reduced_attention",
           "log_gamma_rmt"]
