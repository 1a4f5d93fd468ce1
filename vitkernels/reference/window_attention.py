"""Plain eager PyTorch ground truth for shifted-window attention (Swin) and packed varlen attention.

``window_attention`` is a transcription of timm's SwinTransformerBlock attention path applied to
per-token q, k, v: cyclic shift, pad to whole windows, partition, scores plus the relative-position
bias gathered from the table and the -100 shifted-window region mask, softmax, times v, reverse
partition, crop, shift back. One deliberate difference, for H or W not a multiple of the window:
the padded positions are absent keys (they get no probability), where timm attends to zero-padded
tokens (which its qkv bias turns into non-zero keys and values). For H, W multiples of the window
the two are identical.
"""
from typing import Optional, Sequence

import torch
import torch.nn.functional as F


def relative_position_index(win_h: int, win_w: int, device=None) -> torch.Tensor:
    """timm's [N, N] index into the [(2wh-1)(2ww-1), heads] bias table (N = wh*ww, row-major tokens).

    The package's one copy: the models register it as timm's buffer of that name, and the Triton
    backward folds its per-pair bias gradient onto the table with it.
    """
    coords = torch.stack(torch.meshgrid(torch.arange(win_h, device=device), torch.arange(win_w, device=device),
                                        indexing="ij")).flatten(1)          # [2, N]
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0)         # [N, N, 2]
    return (rel[..., 0] + win_h - 1) * (2 * win_w - 1) + (rel[..., 1] + win_w - 1)


def shift_region_mask(Hp: int, Wp: int, window_size: Sequence[int], shift_size: Sequence[int],
                      device=None) -> torch.Tensor:
    """timm's [num_windows, N, N] mask (0 or -100) on the padded grid Hp x Wp, built with its 3 x 3
    slices (0, -w), (-w, -s), (-s, None) per axis; an axis with s = 0 is one region."""
    wh, ww = window_size
    img = torch.zeros(Hp, Wp, device=device)
    cnt = 0
    for h in ((0, -wh), (-wh, -shift_size[0]), (-shift_size[0], None)):
        for w in ((0, -ww), (-ww, -shift_size[1]), (-shift_size[1], None)):
            img[h[0]:h[1], w[0]:w[1]] = cnt
            cnt += 1
    win = img.view(Hp // wh, wh, Wp // ww, ww).permute(0, 2, 1, 3).reshape(-1, wh * ww)
    diff = win.unsqueeze(1) - win.unsqueeze(2)
    return torch.zeros_like(diff).masked_fill(diff != 0, -100.0)


def _partition(x: torch.Tensor, wh: int, ww: int) -> torch.Tensor:
    """[B, Hp, Wp, heads, d] -> [B * windows, heads, N, d]"""
    B, Hp, Wp, nh, d = x.shape
    x = x.view(B, Hp // wh, wh, Wp // ww, ww, nh, d).permute(0, 1, 3, 5, 2, 4, 6)
    return x.reshape(-1, nh, wh * ww, d)


def _reverse(x: torch.Tensor, B: int, Hp: int, Wp: int, wh: int, ww: int) -> torch.Tensor:
    nh, d = x.shape[1], x.shape[-1]
    x = x.view(B, Hp // wh, Wp // ww, nh, wh, ww, d).permute(0, 1, 4, 2, 5, 3, 6)
    return x.reshape(B, Hp, Wp, nh, d)


def window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window_size: Sequence[int],
                     shift_size: Sequence[int] = (0, 0), rel_pos_bias: Optional[torch.Tensor] = None,
                     scale: Optional[float] = None) -> torch.Tensor:
    """q, k, v: [B, H, W, heads, head_dim] -> [B, H, W, heads, head_dim] (computed in >= fp32)."""
    B, H, W, nh, d = q.shape
    wh, ww = window_size
    sh, sw = shift_size
    scale = d ** -0.5 if scale is None else scale
    out_dtype = q.dtype
    acc = torch.promote_types(q.dtype, torch.float32)
    q, k, v = q.to(acc), k.to(acc), v.to(acc)
    shifted = any(shift_size)
    if shifted:
        q, k, v = (torch.roll(t, shifts=(-sh, -sw), dims=(1, 2)) for t in (q, k, v))
    ph, pw = (wh - H % wh) % wh, (ww - W % ww) % ww
    Hp, Wp = H + ph, W + pw
    q, k, v = (F.pad(t, (0, 0, 0, 0, 0, pw, 0, ph)) for t in (q, k, v))
    qw, kw, vw = (_partition(t, wh, ww) for t in (q, k, v))                  # [B*nW, nh, N, d]
    attn = (qw * scale) @ kw.transpose(-2, -1)                               # [B*nW, nh, N, N]
    N = wh * ww
    if rel_pos_bias is not None:
        idx = relative_position_index(wh, ww, device=q.device)
        bias = rel_pos_bias.to(acc)[idx.reshape(-1)].view(N, N, nh).permute(2, 0, 1)
        attn = attn + bias.unsqueeze(0)
    nW = (Hp // wh) * (Wp // ww)
    if shifted:
        mask = shift_region_mask(Hp, Wp, window_size, shift_size, device=q.device).to(acc)
        attn = (attn.view(B, nW, nh, N, N) + mask.view(1, nW, 1, N, N)).view(-1, nh, N, N)
    if ph or pw:
        valid = torch.zeros(Hp, Wp, dtype=torch.bool, device=q.device)
        valid[:H, :W] = True
        valid = valid.view(Hp // wh, wh, Wp // ww, ww).permute(0, 2, 1, 3).reshape(nW, N)
        absent = ~valid.view(1, nW, 1, 1, N)
        attn = attn.view(B, nW, nh, N, N).masked_fill(absent, float("-inf")).view(-1, nh, N, N)
    out = attn.softmax(-1) @ vw
    out = _reverse(out, B, Hp, Wp, wh, ww)[:, :H, :W]
    if shifted:
        out = torch.roll(out, shifts=(sh, sw), dims=(1, 2))
    return out.to(out_dtype).contiguous()


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                     max_seqlen: int, scale: Optional[float] = None) -> torch.Tensor:
    """Block-diagonal attention over packed segments: q, k, v [total, heads, d], segment s is rows
    cu_seqlens[s]:cu_seqlens[s+1]. The loop of one attention call per segment that Qwen2.5-VL's
    vision encoder runs on the CPU."""
    d = q.shape[-1]
    scale = d ** -0.5 if scale is None else scale
    acc = torch.promote_types(q.dtype, torch.float32)
    # split + cat as Qwen's code does: slicing into a preallocated output would make autograd build
    # one full-size gradient per segment.
    lens = (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()
    outs = []
    for qs, ks, vs in zip(q.split(lens), k.split(lens), v.split(lens)):
        qs, ks, vs = (t.to(acc).transpose(0, 1) for t in (qs, ks, vs))      # [heads, n, d]
        p = ((qs * scale) @ ks.transpose(-2, -1)).softmax(-1)
        outs.append((p @ vs).transpose(0, 1))
    if not outs:
        return q.new_zeros((*q.shape[:-1], v.shape[-1]))
    return torch.cat(outs).to(q.dtype)
