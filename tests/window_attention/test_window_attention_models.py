"""Swin, Swin-V2 and StyleSwin modules of vitkernels.models.window_attention, and vitkernels.convert.

The ground truth is an eager transcription, written here, of timm's (>= 0.9) and StyleSwin's code:
roll, pad, window partition, per-window attention with the gathered bias table and the -100 mask,
window reverse, crop, roll back. The transcriptions live in "timm-like" mock modules that carry
timm's class and attribute names, so the same mocks check parameter-name compatibility (state dicts
load both ways with strict=True) and serve as the models convert_ is run on (timm itself is not
importable everywhere; the tests against real timm are skipped without it).
"""
import copy
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import vitkernels  # noqa: F401
from vitkernels.convert import ConversionReport, convert_, is_converted, revert_
from vitkernels.models import window_attention as wa
from vitkernels.reference import window_attention as ref

from attention_checks import check_compiles_without_recompiles, close_to as _close, randomize

try:
    import timm
    HAS_TIMM = True
except Exception:  # noqa: BLE001 -- timm fails in several ways without torchvision
    HAS_TIMM = False


def _logit_scale(p):
    p.copy_(math.log(10) + 0.5 * torch.randn_like(p))
    p.view(-1)[0] = 5.0                     # above log(100): exercises the clamp


def _randomize(module):
    # 0.02-std tables and identity v2 blocks hide mistakes as well as zero biases and unit norms.
    return randomize(module, 0.3, logit_scale=_logit_scale, relative_position_bias_table=lambda p: p.normal_())


# ---------------------------------------------------------------- eager transcriptions of timm
def _pair(x):
    return tuple(x) if isinstance(x, (tuple, list)) else (x, x)


def _rel_index(wh, ww):
    coords = torch.stack(torch.meshgrid([torch.arange(wh), torch.arange(ww)], indexing="ij"))
    coords_flatten = torch.flatten(coords, 1)
    rel = (coords_flatten[:, :, None] - coords_flatten[:, None, :]).permute(1, 2, 0).contiguous()
    rel[:, :, 0] += wh - 1
    rel[:, :, 1] += ww - 1
    rel[:, :, 0] *= 2 * ww - 1
    return rel.sum(-1)


def _coords_table(ws, pretrained_ws=(0, 0)):
    h = torch.arange(-(ws[0] - 1), ws[0]).to(torch.float32)
    w = torch.arange(-(ws[1] - 1), ws[1]).to(torch.float32)
    table = torch.stack(torch.meshgrid([h, w], indexing="ij")).permute(1, 2, 0).contiguous().unsqueeze(0)
    div = pretrained_ws if pretrained_ws[0] > 0 else ws
    table[:, :, :, 0] /= (div[0] - 1)
    table[:, :, :, 1] /= (div[1] - 1)
    table *= 8
    return torch.sign(table) * torch.log2(torch.abs(table) + 1.0) / math.log2(8)


def _partition(x, ws):
    B, H, W, C = x.shape
    x = x.view(B, H // ws[0], ws[0], W // ws[1], ws[1], C)
    return x.permute(0, 1, 3, 2, 4, 5).contiguous().view(-1, ws[0] * ws[1], C)


def _reverse(windows, ws, H, W):
    C = windows.shape[-1]
    x = windows.view(-1, H // ws[0], W // ws[1], ws[0], ws[1], C)
    return x.permute(0, 1, 3, 2, 4, 5).contiguous().view(-1, H, W, C)


def _timm_mask(Hp, Wp, ws, ss):
    if not any(ss):
        return None
    img = torch.zeros((1, Hp, Wp, 1))
    cnt = 0
    for h in ((0, -ws[0]), (-ws[0], -ss[0]), (-ss[0], None)):
        for w in ((0, -ws[1]), (-ws[1], -ss[1]), (-ss[1], None)):
            img[:, h[0]:h[1], w[0]:w[1], :] = cnt
            cnt += 1
    mw = _partition(img, ws).squeeze(-1)
    mask = mw.unsqueeze(1) - mw.unsqueeze(2)
    return mask.masked_fill(mask != 0, float(-100.0)).masked_fill(mask == 0, float(0.0))


def _add_mask_softmax(attn, mask, heads, N):
    if mask is not None:
        nW = mask.shape[0]
        attn = attn.view(-1, nW, heads, N, N) + mask.to(attn).unsqueeze(1).unsqueeze(0)
        attn = attn.view(-1, heads, N, N)
    return attn.softmax(-1)


def timm_v1_window_attn(attn, x, mask=None):
    """timm's WindowAttention.forward (non-fused path) on windows [B_, N, C]."""
    B_, N, C = x.shape
    ws = _pair(attn.window_size)
    qkv = attn.qkv(x).reshape(B_, N, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    a = (q * attn.scale) @ k.transpose(-2, -1)
    bias = attn.relative_position_bias_table[_rel_index(*ws).view(-1)].view(N, N, -1).permute(2, 0, 1)
    a = _add_mask_softmax(a + bias.unsqueeze(0), mask, attn.num_heads, N)
    x = (attn.attn_drop(a) @ v).transpose(1, 2).reshape(B_, N, -1)
    return attn.proj_drop(attn.proj(x))


def timm_v2_window_attn(attn, x, mask=None):
    """timm's Swin-V2 WindowAttention.forward on windows [B_, N, C]."""
    B_, N, C = x.shape
    ws = _pair(attn.window_size)
    bias = None
    if attn.q_bias is not None:
        bias = torch.cat((attn.q_bias, torch.zeros_like(attn.v_bias), attn.v_bias))
    qkv = F.linear(x, attn.qkv.weight, bias).reshape(B_, N, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    a = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)
    a = a * torch.clamp(attn.logit_scale, max=math.log(1.0 / 0.01)).exp()
    table = attn.cpb_mlp(_coords_table(ws, _pair(attn.pretrained_window_size)).to(x)).view(-1, attn.num_heads)
    rpb = 16 * torch.sigmoid(table[_rel_index(*ws).view(-1)].view(N, N, -1).permute(2, 0, 1))
    a = _add_mask_softmax(a + rpb.unsqueeze(0), mask, attn.num_heads, N)
    x = (attn.attn_drop(a) @ v).transpose(1, 2).reshape(B_, N, C)
    return attn.proj_drop(attn.proj(x))


def timm_shifted_attn(block, x, window_attn):
    """timm's SwinTransformerBlock._attn on x [B, H, W, C]: roll, pad, partition, attend, reverse."""
    B, H, W, C = x.shape
    ws, ss = _pair(block.window_size), _pair(block.shift_size)
    xs = torch.roll(x, shifts=(-ss[0], -ss[1]), dims=(1, 2)) if any(ss) else x
    ph, pw = (ws[0] - H % ws[0]) % ws[0], (ws[1] - W % ws[1]) % ws[1]
    xs = F.pad(xs, (0, 0, 0, pw, 0, ph))
    Hp, Wp = xs.shape[1], xs.shape[2]
    out = window_attn(block.attn, _partition(xs, ws), _timm_mask(Hp, Wp, ws, ss))
    xs = _reverse(out, ws, Hp, Wp)[:, :H, :W, :].contiguous()
    return torch.roll(xs, shifts=ss, dims=(1, 2)) if any(ss) else xs


def _calc_window_shift(res, ws, ss):
    ws, ss = _pair(ws), _pair(ss)
    win = tuple(r if r <= w else w for r, w in zip(res, ws))
    return win, tuple(0 if r <= w else s for r, w, s in zip(res, win, ss))


class TimmMlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1, self.act, self.drop1 = nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(0.0)
        self.norm, self.fc2, self.drop2 = nn.Identity(), nn.Linear(hidden, dim), nn.Dropout(0.0)

    def forward(self, x):
        return self.drop2(self.fc2(self.norm(self.drop1(self.act(self.fc1(x))))))


class WindowAttention(nn.Module):
    """timm's Swin-V1 WindowAttention (>= 0.9 names)."""

    def __init__(self, dim, num_heads, window_size, qkv_bias=True, attn_drop=0.0, persistent=False):
        super().__init__()
        self.dim, self.num_heads = dim, num_heads
        self.window_size = _pair(window_size)
        self.scale = (dim // num_heads) ** -0.5
        wh, ww = self.window_size
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * wh - 1) * (2 * ww - 1), num_heads))
        self.register_buffer("relative_position_index", _rel_index(wh, ww), persistent=persistent)
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop, self.proj, self.proj_drop = nn.Dropout(attn_drop), nn.Linear(dim, dim), nn.Dropout(0.0)
        self.softmax = nn.Softmax(dim=-1)

    def forward(self, x, mask=None):
        return timm_v1_window_attn(self, x, mask)


class SwinTransformerBlock(nn.Module):
    """timm (>= 0.9) Swin-V1 block, pre-norm, NHWC, with _attn."""

    def __init__(self, dim, input_resolution, num_heads, window_size=7, shift_size=0, mlp_ratio=4.0, attn_drop=0.0):
        super().__init__()
        self.dim, self.input_resolution = dim, _pair(input_resolution)
        self.window_size, self.shift_size = _calc_window_shift(self.input_resolution, window_size, shift_size)
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, num_heads, self.window_size, attn_drop=attn_drop)
        self.drop_path1, self.norm2 = nn.Identity(), nn.LayerNorm(dim)
        self.mlp, self.drop_path2 = TimmMlp(dim, int(dim * mlp_ratio)), nn.Identity()
        self.register_buffer("attn_mask", _timm_mask(*self.input_resolution, self.window_size, self.shift_size)
                             if all(r % w == 0 for r, w in zip(self.input_resolution, self.window_size)) else None,
                             persistent=False)

    def _attn(self, x):
        return timm_shifted_attn(self, x, timm_v1_window_attn)

    def forward(self, x):
        B, H, W, C = x.shape
        x = x + self.drop_path1(self._attn(self.norm1(x)))
        x = x.reshape(B, -1, C)
        x = x + self.drop_path2(self.mlp(self.norm2(x)))
        return x.reshape(B, H, W, C)


class _LegacySwinBlock(nn.Module):
    """timm < 0.9 Swin-V1 block: tokens [B, L, C], int window/shift, one drop_path, persistent buffers."""

    def __init__(self, dim, input_resolution, num_heads, window_size=7, shift_size=0):
        super().__init__()
        self.input_resolution = input_resolution
        self.window_size, self.shift_size = window_size, shift_size
        if min(input_resolution) <= window_size:
            self.shift_size, self.window_size = 0, min(input_resolution)
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, num_heads, self.window_size, persistent=True)
        self.drop_path, self.norm2 = nn.Identity(), nn.LayerNorm(dim)
        self.mlp = TimmMlp(dim, 4 * dim)
        self.register_buffer("attn_mask", _timm_mask(*input_resolution, _pair(self.window_size),
                                                     _pair(self.shift_size)))

    def forward(self, x):
        H, W = self.input_resolution
        B, L, C = x.shape
        y = timm_shifted_attn(self, self.norm1(x).view(B, H, W, C), timm_v1_window_attn).view(B, L, C)
        x = x + self.drop_path(y)
        return x + self.drop_path(self.mlp(self.norm2(x)))


_LegacySwinBlock.__name__ = "SwinTransformerBlock"


class TimmWindowAttentionV2(nn.Module):
    """timm's Swin-V2 WindowAttention."""

    def __init__(self, dim, window_size, num_heads, qkv_bias=True, pretrained_window_size=(0, 0)):
        super().__init__()
        self.dim, self.window_size, self.num_heads = dim, _pair(window_size), num_heads
        self.pretrained_window_size = _pair(pretrained_window_size)
        self.logit_scale = nn.Parameter(torch.log(10 * torch.ones((num_heads, 1, 1))))
        self.cpb_mlp = nn.Sequential(nn.Linear(2, 512, bias=True), nn.ReLU(inplace=True),
                                     nn.Linear(512, num_heads, bias=False))
        self.register_buffer("relative_coords_table", _coords_table(self.window_size, self.pretrained_window_size),
                             persistent=False)
        self.register_buffer("relative_position_index", _rel_index(*self.window_size), persistent=False)
        self.qkv = nn.Linear(dim, dim * 3, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(dim)) if qkv_bias else None
        self.register_buffer("k_bias", torch.zeros(dim) if qkv_bias else None, persistent=False)
        self.v_bias = nn.Parameter(torch.zeros(dim)) if qkv_bias else None
        self.attn_drop, self.proj, self.proj_drop = nn.Dropout(0.0), nn.Linear(dim, dim), nn.Dropout(0.0)

    def forward(self, x, mask=None):
        return timm_v2_window_attn(self, x, mask)


class SwinTransformerV2Block(nn.Module):
    """timm's Swin-V2 block, res-post-norm, NHWC."""

    def __init__(self, dim, input_resolution, num_heads, window_size=7, shift_size=0, pretrained_window_size=0):
        super().__init__()
        self.input_resolution = _pair(input_resolution)
        self.window_size, self.shift_size = _calc_window_shift(self.input_resolution, window_size, shift_size)
        self.attn = TimmWindowAttentionV2(dim, self.window_size, num_heads,
                                          pretrained_window_size=_pair(pretrained_window_size))
        self.norm1, self.drop_path1 = nn.LayerNorm(dim), nn.Identity()
        self.mlp, self.norm2, self.drop_path2 = TimmMlp(dim, 4 * dim), nn.LayerNorm(dim), nn.Identity()

    def _attn(self, x):
        return timm_shifted_attn(self, x, timm_v2_window_attn)

    def forward(self, x):
        B, H, W, C = x.shape
        x = x + self.drop_path1(self.norm1(self._attn(x)))
        x = x.reshape(B, -1, C)
        x = x + self.drop_path2(self.norm2(self.mlp(x)))
        return x.reshape(B, H, W, C)


# ---------------------------------------------------------------- eager transcription of StyleSwin
class StyleSwinWindowAttention(nn.Module):
    """StyleSwin's per-branch WindowAttention: q, k, v windows in, no projection."""

    def __init__(self, dim, window_size, num_heads, qk_scale=None):
        super().__init__()
        self.dim, self.window_size, self.num_heads = dim, window_size, num_heads
        self.head_dim = dim // num_heads
        self.scale = qk_scale or self.head_dim ** -0.5
        self.relative_position_bias_table = nn.Parameter(
            torch.zeros((2 * window_size[0] - 1) * (2 * window_size[1] - 1), num_heads))
        self.register_buffer("relative_position_index", _rel_index(*window_size))   # persistent, as in StyleSwin
        self.attn_drop = nn.Dropout(0.0)

    def forward(self, q, k, v, mask=None):
        B_, N, C = q.shape
        q, k, v = (t.reshape(B_, N, self.num_heads, C // self.num_heads).permute(0, 2, 1, 3) for t in (q, k, v))
        a = (q * self.scale) @ k.transpose(-2, -1)
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)].view(N, N, -1)
        a = _add_mask_softmax(a + bias.permute(2, 0, 1).unsqueeze(0), mask, self.num_heads, N)
        return (self.attn_drop(a) @ v).transpose(1, 2).reshape(B_, N, C)


class AdaptiveInstanceNorm(nn.Module):
    def __init__(self, in_channel, style_dim):
        super().__init__()
        self.norm = nn.InstanceNorm1d(in_channel)
        self.style = nn.Linear(style_dim, in_channel * 2)

    def forward(self, x, style):
        gamma, beta = self.style(style).unsqueeze(-1).chunk(2, 1)
        return gamma * self.norm(x) + beta


class StyleSwinTransformerBlock(nn.Module):
    """StyleSwin's generator block (microsoft/StyleSwin models/generator.py), with double attention."""

    def __init__(self, dim, input_resolution, num_heads, window_size=8, style_dim=16):
        super().__init__()
        self.dim, self.input_resolution, self.num_heads = dim, input_resolution, num_heads
        self.window_size, self.shift_size = window_size, window_size // 2
        if min(input_resolution) <= window_size:
            self.shift_size, self.window_size = 0, min(input_resolution)
        self.norm1 = AdaptiveInstanceNorm(dim, style_dim)
        self.qkv, self.proj = nn.Linear(dim, dim * 3), nn.Linear(dim, dim)
        ws = (self.window_size, self.window_size)
        self.attn = nn.ModuleList([StyleSwinWindowAttention(dim // 2, ws, num_heads // 2) for _ in range(2)])
        mask2 = _timm_mask(*input_resolution, ws, (self.shift_size,) * 2) if self.shift_size else None
        self.register_buffer("attn_mask1", None)
        self.register_buffer("attn_mask2", mask2)
        self.norm2 = AdaptiveInstanceNorm(dim, style_dim)
        self.mlp = TimmMlp(dim, 4 * dim)

    def forward(self, x, style):
        H, W = self.input_resolution
        B, L, C = x.shape
        ws, s = self.window_size, self.shift_size
        shortcut = x
        x = self.norm1(x.transpose(-1, -2), style).transpose(-1, -2)
        qkv = self.qkv(x).reshape(B, -1, 3, C).permute(2, 0, 1, 3).reshape(3 * B, H, W, C)
        qkv_1 = qkv[:, :, :, :C // 2].reshape(3, B, H, W, C // 2)
        qkv_2 = qkv[:, :, :, C // 2:]
        if s > 0:
            qkv_2 = torch.roll(qkv_2, shifts=(-s, -s), dims=(1, 2))
        qkv_2 = qkv_2.reshape(3, B, H, W, C // 2)
        w1 = [_partition(t, (ws, ws)) for t in qkv_1]
        w2 = [_partition(t, (ws, ws)) for t in qkv_2]
        x1 = _reverse(self.attn[0](*w1, self.attn_mask1), (ws, ws), H, W)
        x2 = _reverse(self.attn[1](*w2, self.attn_mask2), (ws, ws), H, W)
        if s > 0:
            x2 = torch.roll(x2, shifts=(s, s), dims=(1, 2))
        x = torch.cat([x1.reshape(B, H * W, C // 2), x2.reshape(B, H * W, C // 2)], dim=2)
        x = shortcut + self.proj(x)
        return x + self.mlp(self.norm2(x.transpose(-1, -2), style).transpose(-1, -2))


# ---------------------------------------------------------------- (1)-(3) blocks against timm
# (dim, heads, H, W, window, shift, input_resolution)
V1_CASES = [
    (32, 2, 8, 8, 4, 0, (8, 8)),
    (32, 2, 8, 8, 4, 2, (8, 8)),
    (24, 3, 14, 14, 7, 3, (14, 14)),
    (16, 2, 8, 16, (4, 8), (2, 4), (8, 16)),        # non-square window
    (16, 2, 4, 4, 7, 3, (4, 4)),                    # resolution <= window: one unshifted window
]


def _blocks_v1(dim, heads, win, shift, res):
    ours = _randomize(wa.SwinTransformerBlock(dim, res, num_heads=heads, window_size=win, shift_size=shift))
    mock = SwinTransformerBlock(dim, res, heads, window_size=win, shift_size=shift)
    mock.load_state_dict(ours.state_dict(), strict=True)
    assert (ours.window_size, ours.shift_size) == (mock.window_size, mock.shift_size)
    return ours, mock


def _blocks_v2(dim, heads, win, shift, res, pretrained=0):
    ours = _randomize(wa.SwinTransformerV2Block(dim, res, num_heads=heads, window_size=win, shift_size=shift,
                                                pretrained_window_size=pretrained))
    mock = SwinTransformerV2Block(dim, res, heads, window_size=win, shift_size=shift, pretrained_window_size=pretrained)
    mock.load_state_dict(ours.state_dict(), strict=True)
    return ours, mock


@pytest.mark.parametrize("dim,heads,H,W,win,shift,res", V1_CASES)
def test_swin_block_matches_timm(dim, heads, H, W, win, shift, res):
    ours, mock = _blocks_v1(dim, heads, win, shift, res)
    x = torch.randn(2, H, W, dim)
    with torch.no_grad():
        _close(ours(x), copy.deepcopy(mock).double()(x.double()), 1e-5)


V2_CASES = [
    (32, 2, 8, 8, 4, 0, (8, 8), 0),
    (32, 2, 8, 8, 4, 2, (8, 8), 0),
    (24, 3, 16, 16, 8, 4, (16, 16), 6),             # pretrained window != window (log-spaced coords rescaled)
    (16, 2, 8, 16, (4, 8), (2, 4), (8, 16), 0),
]


@pytest.mark.parametrize("dim,heads,H,W,win,shift,res,pretrained", V2_CASES)
def test_swinv2_block_matches_timm(dim, heads, H, W, win, shift, res, pretrained):
    ours, mock = _blocks_v2(dim, heads, win, shift, res, pretrained)
    x = torch.randn(2, H, W, dim)
    with torch.no_grad():
        _close(ours(x), copy.deepcopy(mock).double()(x.double()), 1e-5)


def _grads(block, x, g):
    x = x.clone().requires_grad_(True)
    block.zero_grad()
    (block(x) * g).sum().backward()
    return x.grad, {n: p.grad for n, p in block.named_parameters()}


@pytest.mark.parametrize("version", ["v1", "v2"])
@pytest.mark.parametrize("shift", [0, 2])
def test_block_gradients_match_timm(version, shift):
    make = _blocks_v1 if version == "v1" else _blocks_v2
    ours, mock = make(32, 2, 4, shift, (8, 8))
    mock = copy.deepcopy(mock).double()
    x, g = torch.randn(2, 8, 8, 32), torch.randn(2, 8, 8, 32)
    dx, dp = _grads(ours, x, g)
    dx_ref, dp_ref = _grads(mock, x.double(), g.double())
    assert dp.keys() == dp_ref.keys()
    _close(dx, dx_ref, 1e-4, "grad x")
    for name in dp:
        assert dp[name] is not None, name
        _close(dp[name], dp_ref[name], 1e-4, f"grad {name}")


def test_block_partial_windows_treat_padding_as_absent():
    # H, W not multiples of the window: our deliberate difference from timm (see the module docstring).
    ours = _randomize(wa.SwinTransformerBlock(16, (9, 11), num_heads=2, window_size=4, shift_size=2))
    x = torch.randn(1, 9, 11, 16)
    with torch.no_grad():
        h = ours.norm1(x)
        q, k, v = ours.attn.qkv(h).unflatten(-1, (3, 2, 8)).unbind(-3)
        a = ref.window_attention(q, k, v, (4, 4), (2, 2), ours.attn.relative_position_bias_table)
        y = x + ours.attn.proj(a.flatten(-2))
        _close(ours(x), y + ours.mlp(ours.norm2(y)), 1e-5)


def test_double_window_attention_matches_styleswin():
    block = _randomize(StyleSwinTransformerBlock(32, (8, 8), num_heads=4, window_size=4))
    ours = wa.DoubleWindowAttention(32, num_heads=4, window_size=4, input_resolution=(8, 8))
    # StyleSwin's persistent masks and index buffers are in the state dict; they must be dropped.
    sub = {k: v for k, v in block.state_dict().items() if k.split(".")[0] in ("qkv", "proj", "attn", "attn_mask2")}
    assert "attn_mask2" in sub and "attn.0.relative_position_index" in sub
    ours.load_state_dict(sub, strict=True)
    x = torch.randn(2, 8, 8, 32)
    with torch.no_grad():
        ref_block = copy.deepcopy(block).double()
        xd = x.double()
        qkv = ref_block.qkv(xd.view(2, 64, 32)).reshape(2, -1, 3, 32).permute(2, 0, 1, 3).reshape(6, 8, 8, 32)
        w1 = [_partition(t, (4, 4)) for t in qkv[..., :16].reshape(3, 2, 8, 8, 16)]
        w2 = [_partition(t, (4, 4)) for t in torch.roll(qkv[..., 16:], (-2, -2), (1, 2)).reshape(3, 2, 8, 8, 16)]
        x1 = _reverse(ref_block.attn[0](*w1, None), (4, 4), 8, 8)
        x2 = torch.roll(_reverse(ref_block.attn[1](*w2, ref_block.attn_mask2), (4, 4), 8, 8), (2, 2), (1, 2))
        expect = ref_block.proj(torch.cat([x1, x2], -1))
        _close(ours(x), expect, 1e-5)


def test_q_k_v_reach_the_op_as_views_of_one_projection(monkeypatch):
    seen = []
    op = wa.window_attention

    def spy(q, k, v, *args):
        seen.append((q, k, v))
        return op(q, k, v, *args)

    monkeypatch.setattr(wa, "window_attention", spy)
    x = torch.randn(2, 8, 8, 32)
    _blocks_v1(32, 2, 4, 2, (8, 8))[0](x)
    wa.DoubleWindowAttention(32, num_heads=4, window_size=4)(x)
    _blocks_v2(32, 2, 4, 2, (8, 8))[0](x)
    assert len(seen) == 4
    for q, k, v in seen[:3]:        # v1 and both StyleSwin halves: q, k, v all alias the qkv output
        assert q._base is not None and q._base is k._base is v._base
        assert q.shape == (2, 8, 8, 2, 16 if q is seen[0][0] else 8) and not q.is_contiguous()
    q, k, v = seen[3]               # v2: q and k are normalized (new tensors), v is still a view
    assert v._base is not None and not v.is_contiguous()


def test_patch_merging_matches_original_concat_order():
    pm = _randomize(wa.PatchMerging(8))
    x = torch.randn(2, 6, 4, 8)
    cat = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], -1)
    with torch.no_grad():
        _close(pm(x), pm.reduction(pm.norm(cat)), 1e-6)
        pm2 = _randomize(wa.PatchMergingV2(8))
        _close(pm2(x), pm2.norm(pm2.reduction(cat)), 1e-6)


def test_state_dicts_with_derived_buffers_load():
    # timm < 0.9 stores relative_position_index and attn_mask; they are recomputed, not loaded.
    legacy = _randomize(_LegacySwinBlock(16, (8, 8), 2, window_size=4, shift_size=2))
    assert "attn_mask" in legacy.state_dict() and "attn.relative_position_index" in legacy.state_dict()
    ours = wa.SwinTransformerBlock(16, (8, 8), num_heads=2, window_size=4, shift_size=2)
    ours.load_state_dict(legacy.state_dict(), strict=True)
    x = torch.randn(1, 8, 8, 16)
    with torch.no_grad():
        _close(ours(x).view(1, 64, 16), legacy(x.view(1, 64, 16)), 1e-5)


# ---------------------------------------------------------------- (4) torch.compile
@pytest.mark.parametrize("version", ["v1", "v2"])
def test_block_compiles_without_graph_breaks_or_recompiles(version):
    make = _blocks_v1 if version == "v1" else _blocks_v2
    block, _ = make(16, 2, 4, 2, (8, 8))
    check_compiles_without_recompiles(block, (8, 8, 16))


# ---------------------------------------------------------------- (5) whole models
TINY = dict(img_size=32, patch_size=4, embed_dim=16, depths=(2, 2), num_heads=(1, 2), window_size=4,
            num_classes=10)


@pytest.mark.parametrize("make", [wa.SwinTransformer, wa.SwinTransformerV2], ids=["v1", "v2"])
def test_tiny_swin_runs_and_backprops(make):
    model = _randomize(make(**TINY))
    blocks = [b for b in model.modules() if isinstance(b, (wa.SwinTransformerBlock, wa.SwinTransformerV2Block))]
    # grid 8 -> stage 0 windows 4 shifted by 2; stage 1 (4 x 4) one unshifted window.
    assert [(b.window_size, b.shift_size) for b in blocks] == [((4, 4), (0, 0)), ((4, 4), (2, 2)),
                                                               ((4, 4), (0, 0)), ((4, 4), (0, 0))]
    x = torch.randn(2, 3, 32, 32, requires_grad=True)
    out = model(x)
    assert out.shape == (2, 10)
    out.square().mean().backward()
    assert torch.isfinite(x.grad).all()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name

    # Same model with every block's attention computed by the eager timm transcription (in eval
    # mode: drop_path_rate defaults to timm's 0.1).
    model.eval()
    eager = copy.deepcopy(model).double()
    window_attn = timm_v1_window_attn if make is wa.SwinTransformer else timm_v2_window_attn
    for b in eager.modules():
        if isinstance(b, (wa.SwinTransformerBlock, wa.SwinTransformerV2Block)):
            b._attn = (lambda blk: (lambda t: timm_shifted_attn(blk, t, window_attn)))(b)
    with torch.no_grad():
        _close(model(x), eager(x.double()), 1e-5)


def test_swin_configurations_match_timm_shapes():
    with torch.device("meta"):     # structure only: skips initializing ~200M parameters
        t, s, b = wa.swin_t(), wa.swin_s(), wa.swin_b(img_size=384, window_size=12)
        v2 = wa.swinv2_t()
    assert [len(st.blocks) for st in s.layers] == [2, 2, 18, 2]
    assert t.patch_embed.proj.out_channels == 96 and b.patch_embed.proj.out_channels == 128
    assert [st.blocks[0].attn.num_heads for st in b.layers] == [4, 8, 16, 32]
    assert b.layers[3].blocks[1].window_size == (12, 12) and b.layers[3].blocks[1].shift_size == (0, 0)
    assert t.layers[2].blocks[1].shift_size == (3, 3) and t.layers[3].blocks[1].shift_size == (0, 0)
    # 28.29M parameters, as timm's swin_tiny_patch4_window7_224.
    assert sum(p.numel() for p in t.parameters()) == 28288354
    assert v2.layers[3].blocks[1].window_size == (8, 8) and v2.layers[0].blocks[1].shift_size == (4, 4)
    assert round(sum(p.numel() for p in v2.parameters()) / 1e4) == 2835          # timm: 28.35M


# ---------------------------------------------------------------- (6) convert_ on timm-like modules
class _Toy(nn.Module):
    """Every supported block kind, as timm and StyleSwin build them."""

    def __init__(self):
        super().__init__()
        self.v1 = nn.Sequential(SwinTransformerBlock(16, (8, 8), 2, window_size=4, shift_size=0),
                                SwinTransformerBlock(16, (8, 8), 2, window_size=4, shift_size=2))
        self.legacy = _LegacySwinBlock(16, (8, 8), 2, window_size=4, shift_size=2)
        self.v2 = nn.ModuleList([SwinTransformerV2Block(16, (8, 8), 2, window_size=4, shift_size=s) for s in (0, 2)])
        self.style = StyleSwinTransformerBlock(16, (8, 8), num_heads=4, window_size=4)

    def forward(self, x, style):
        B, H, W, C = x.shape
        x = self.v1(x)
        x = self.legacy(x.reshape(B, H * W, C)).reshape(B, H, W, C)
        for blk in self.v2:
            x = blk(x)
        return self.style(x.reshape(B, H * W, C), style)


def test_convert_timm_like_modules():
    model = _randomize(_Toy()).eval()
    conv = convert_(model, inplace=False)
    report = conv.vitk_report
    assert isinstance(report, ConversionReport)
    assert report.converted == {"v1.0": "timm-swin-v1", "v1.1": "timm-swin-v1", "legacy": "timm-swin-v1-legacy",
                                "v2.0": "timm-swin-v2", "v2.1": "timm-swin-v2", "style": "styleswin"}
    assert not report.skipped and not any(is_converted(m) for m in model.modules())
    assert all(p is not q for p, q in zip(model.parameters(), conv.parameters()))   # a copy
    assert conv.state_dict().keys() == model.state_dict().keys()

    x, style = torch.randn(2, 8, 8, 16), torch.randn(2, 16)
    xg = x.clone().requires_grad_(True)
    out = conv(xg, style)
    x2 = x.clone().requires_grad_(True)
    expect = model(x2, style)
    # Both sides in fp32 through six blocks with large random weights: rounding differences grow.
    _close(out, expect, 1e-4)
    g = torch.randn_like(out)
    (out * g).sum().backward()
    (expect * g).sum().backward()
    _close(xg.grad, x2.grad, 1e-3, "grad x")
    for (n, p), q in zip(conv.named_parameters(), model.parameters()):
        _close(p.grad, q.grad, 1e-3, f"grad {n}")

    # In place and idempotent; revert_ restores the class methods.
    again = convert_(conv)
    assert again is conv and not again.vitk_report.converted and len(again.vitk_report.already_fused) == 6
    revert_(conv)
    assert not any(is_converted(m) for m in conv.modules())
    with torch.no_grad():
        _close(conv(x, style), expect, 1e-6)


def test_convert_skips_and_filters():
    model = _Toy().eval()
    model.v2[0].attn.relative_coords_table = torch.zeros(1, 3, 3, 2)      # table of another window
    conv = convert_(model, filter_fn=lambda m, name: name != "style")
    assert conv is model
    assert "v2.0" in conv.vitk_report.skipped and conv.vitk_report.skipped["style"] == "excluded by filter_fn"
    assert set(conv.vitk_report.converted) == {"v1.0", "v1.1", "legacy", "v2.1"}
    ours = convert_(wa.SwinTransformer(**TINY))
    assert not ours.vitk_report.converted and len(ours.vitk_report.already_fused) == 4


def test_convert_falls_back_with_attention_dropout_in_training():
    blk = _randomize(SwinTransformerBlock(16, (8, 8), 2, window_size=4, shift_size=2, attn_drop=0.5))
    conv = convert_(copy.deepcopy(blk))
    x = torch.randn(1, 8, 8, 16)
    torch.manual_seed(1)
    a = conv.train()(x)
    torch.manual_seed(1)
    _close(a, blk.train()(x), 1e-6)
    with torch.no_grad():
        _close(conv.eval()(x), blk.eval()(x), 1e-5)


# ---------------------------------------------------------------- (7) real timm
def _perturb_norms(model):
    # timm's Swin-V2 zero-inits its post-norms, which makes every block the identity.
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.LayerNorm):
                m.weight.copy_(1 + 0.2 * torch.randn_like(m.weight))
                m.bias.normal_(0, 0.1)


@pytest.mark.skipif(not HAS_TIMM, reason="timm is not importable")
@pytest.mark.parametrize("name,ours", [("swin_tiny_patch4_window7_224", wa.swin_t),
                                       ("swinv2_tiny_window8_256", wa.swinv2_t)])
def test_timm_models(name, ours):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tm = timm.create_model(name, pretrained=False).to(device).eval()
    _perturb_norms(tm)
    size = tuple(tm.patch_embed.img_size)
    x = torch.randn(2, 3, *size, device=device)
    g = torch.randn(2, tm.num_classes, device=device)

    def run(model):
        xi = x.clone().requires_grad_(True)
        model.zero_grad()
        out = model(xi)
        (out * g).sum().backward()
        return out.detach(), xi.grad, {n: p.grad.clone() for n, p in model.named_parameters()}

    expect, dx, dp = run(tm)
    conv = convert_(tm, inplace=False)
    assert len(conv.vitk_report.converted) == 12 and not conv.vitk_report.skipped, str(conv.vitk_report)
    out, dx2, dp2 = run(conv)
    _close(out, expect, 1e-3)
    _close(dx2, dx, 1e-3, "grad x")
    for n in dp:
        _close(dp2[n], dp[n], 1e-3, f"grad {n}")

    mine = ours()
    mine.load_state_dict(tm.state_dict(), strict=True)
    mine = mine.to(device).eval()
    with torch.no_grad():
        _close(mine(x), expect, 1e-3)
