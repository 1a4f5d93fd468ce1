"""Swin Transformer (v1 and v2) and StyleSwin's double attention on the fused window-attention op.

- WindowAttention, SwinTransformerBlock, PatchMerging, SwinTransformerStage, SwinTransformer and the
  swin_t / swin_s / swin_b configurations: timm's SwinTransformer (timm >= 0.9, NHWC stages).
- WindowAttentionV2, SwinTransformerV2Block, PatchMergingV2, SwinTransformerV2Stage,
  SwinTransformerV2 and swinv2_t / swinv2_s / swinv2_b: timm's SwinTransformerV2 (cosine attention,
  continuous position bias, post-norm blocks).
- DoubleWindowAttention: StyleSwin's double attention (half of the heads in plain windows, half in
  shifted windows).

Module structure and parameter names are timm's (StyleSwin's for the double attention), so
``model.load_state_dict(timm_model.state_dict())`` works unchanged; the derived buffers that old
checkpoints carry (relative_position_index, relative_coords_table, attn_mask) are dropped on load.

Every block computes q, k, v with one projection of the whole [B, H, W, C] feature map and hands
strided views of it to torch.ops.vitk.window_attention, which does the cyclic shift, the window
partition, the relative-position bias and the shifted-window mask inside the kernel: no rolled,
padded or partitioned copy and no [windows, heads, N, N] tensor is ever built.

One deliberate difference from timm: when H or W is not a multiple of the window, timm pads the
feature map with zeros, which its qkv bias turns into non-zero keys and values that every query of
an edge window attends to. Here the padded positions are absent (they get no attention), so such
shapes give slightly different outputs; for H, W multiples of the window the two are identical.
Attention dropout is not supported (the fused op has none); every timm and StyleSwin pretrained
configuration uses 0.
"""
import math
from typing import Callable, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..ops.window_attention import window_attention
from ..reference.window_attention import relative_position_index

_Size2 = Union[int, Tuple[int, int]]


def to_2tuple(x) -> Tuple[int, int]:
    if isinstance(x, (tuple, list)):
        a, b = x
        return int(a), int(b)
    return int(x), int(x)


def _no_attn_dropout(attn_drop: float):
    if attn_drop:
        raise NotImplementedError(f"attn_drop={attn_drop}: the fused window attention has no attention dropout")


class _DropsDerivedBuffers:
    """Mixin: drops the listed keys from an incoming state dict. They are recomputed from the window
    size, and timm before 0.9, original Swin and StyleSwin checkpoints store them as persistent buffers."""
    _derived_buffers: Tuple[str, ...] = ()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for name in self._derived_buffers:
            state_dict.pop(prefix + name, None)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def relative_coords_table(window_size: Tuple[int, int], pretrained_window_size: Tuple[int, int] = (0, 0)):
    """Swin-V2's log-spaced relative coordinates [1, 2wh-1, 2ww-1, 2], the input of cpb_mlp."""
    wh, ww = window_size
    h = torch.arange(-(wh - 1), wh, dtype=torch.float32)
    w = torch.arange(-(ww - 1), ww, dtype=torch.float32)
    table = torch.stack(torch.meshgrid(h, w, indexing="ij")).permute(1, 2, 0).contiguous().unsqueeze(0)
    ref = pretrained_window_size if pretrained_window_size[0] > 0 else window_size
    # A window of 1 has only the offset 0; timm divides 0 by 0 there (NaN), we keep the 0.
    table[..., 0] /= max(ref[0] - 1, 1)
    table[..., 1] /= max(ref[1] - 1, 1)
    table *= 8
    return torch.sign(table) * torch.log2(table.abs() + 1.0) / math.log2(8)


def calc_window_shift(input_resolution, window_size, shift_size, always_partition=False):
    """timm's rule: an axis no longer than the window gets one window the size of the input, unshifted."""
    window_size, shift_size = to_2tuple(window_size), to_2tuple(shift_size)
    if always_partition:
        return window_size, shift_size
    win = tuple(r if r <= w else w for r, w in zip(input_resolution, window_size))
    shift = tuple(0 if r <= w else s for r, w, s in zip(input_resolution, win, shift_size))
    return win, shift


# ---------------------------------------------------------------- the fused attention paths
# Module-level so that vitkernels.convert can run them on timm's own modules (same attribute names).
def swin_v1_attention(attn: nn.Module, x: torch.Tensor, window_size: Sequence[int],
                      shift_size: Sequence[int] = (0, 0)) -> torch.Tensor:
    """Swin-V1 (shifted) window attention of ``attn`` (a timm-style WindowAttention: qkv, proj,
    relative_position_bias_table, num_heads, scale, proj_drop) on x [B, H, W, C] -> [B, H, W, C]."""
    qkv = attn.qkv(x).unflatten(-1, (3, attn.num_heads, -1))      # [B, H, W, 3, heads, head_dim]
    q, k, v = qkv.unbind(-3)                                        # strided views, no copies
    out = window_attention(q, k, v, window_size, shift_size, attn.relative_position_bias_table, attn.scale)
    return attn.proj_drop(attn.proj(out.flatten(-2)))


def _v2_qkv_bias(attn: nn.Module) -> Optional[torch.Tensor]:
    q_bias = getattr(attn, "q_bias", None)
    bias = None
    if q_bias is not None:
        k_bias = getattr(attn, "k_bias", None)
        if k_bias is None:
            k_bias = torch.zeros_like(attn.v_bias)
        bias = torch.cat((q_bias, k_bias, attn.v_bias))
    if attn.qkv.bias is not None:
        bias = attn.qkv.bias if bias is None else bias + attn.qkv.bias
    return bias


def swin_v2_continuous_bias(attn: nn.Module) -> torch.Tensor:
    """The [(2wh-1)(2ww-1), heads] bias table of Swin-V2: 16 * sigmoid(cpb_mlp(log-spaced coords))."""
    return 16 * torch.sigmoid(attn.cpb_mlp(attn.relative_coords_table).view(-1, attn.num_heads))


def swin_v2_attention(attn: nn.Module, x: torch.Tensor, window_size: Sequence[int],
                      shift_size: Sequence[int] = (0, 0)) -> torch.Tensor:
    """Swin-V2 cosine window attention of ``attn`` (a timm-style v2 WindowAttention) on
    x [B, H, W, C] -> [B, H, W, C]. The per-head logit scale is folded into the normalized q and the
    op runs with scale 1, so cos(q, k) * exp(min(logit_scale, log 100)) + bias is exactly timm's logit."""
    qkv = F.linear(x, attn.qkv.weight, _v2_qkv_bias(attn)).unflatten(-1, (3, attn.num_heads, -1))
    q, k, v = qkv.unbind(-3)
    logit_scale = torch.clamp(attn.logit_scale, max=math.log(1.0 / 0.01)).exp().view(attn.num_heads, 1)
    k = F.normalize(k, dim=-1)
    q = (F.normalize(q, dim=-1) * logit_scale).to(k.dtype)
    out = window_attention(q, k, v, window_size, shift_size, swin_v2_continuous_bias(attn), 1.0)
    return attn.proj_drop(attn.proj(out.flatten(-2)))


def double_window_attention(qkv: nn.Linear, proj: nn.Linear, branches: Sequence[nn.Module], num_heads: int,
                            x: torch.Tensor, window_size: Sequence[int], shift_size: Sequence[int]) -> torch.Tensor:
    """StyleSwin's double attention on x [B, H, W, C]: the first half of the heads attends in plain
    windows (branches[0]'s bias table), the second half in windows shifted by ``shift_size``
    (branches[1]'s table); the two halves are concatenated along channels before ``proj``.
    ``num_heads`` is the block's total; each branch has num_heads // 2 heads over C / 2 channels."""
    # [B, H, W, 3, half, heads/2, head_dim]: StyleSwin splits the channels of q, k, v in halves and
    # each half into its branch's heads; every slice below stays a strided view of this one tensor.
    qkv_out = qkv(x).unflatten(-1, (3, 2, num_heads // 2, -1))
    outs = []
    for half, (branch, shift) in enumerate(((branches[0], (0, 0)), (branches[1], tuple(shift_size)))):
        q, k, v = (qkv_out[..., s, half, :, :] for s in range(3))
        outs.append(window_attention(q, k, v, window_size, shift, branch.relative_position_bias_table, branch.scale))
    return proj(torch.cat(outs, dim=-2).flatten(-2))


# ---------------------------------------------------------------- shared layers (timm's names)
def drop_path(x: torch.Tensor, drop_prob: float = 0.0, training: bool = False) -> torch.Tensor:
    if drop_prob == 0.0 or not training:
        return x
    keep = 1.0 - drop_prob
    mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
    return x * mask.div_(keep) if keep > 0.0 else x * mask


class DropPath(nn.Module):
    """Stochastic depth per sample (timm's DropPath, scale_by_keep=True)."""

    def __init__(self, drop_prob: float = 0.0):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x):
        return drop_path(x, self.drop_prob, self.training)


class Mlp(nn.Module):
    """timm's Mlp: fc1, act, drop1, norm (Identity), fc2, drop2."""

    def __init__(self, in_features: int, hidden_features: Optional[int] = None, out_features: Optional[int] = None,
                 act_layer: Callable = nn.GELU, bias: bool = True, drop: float = 0.0):
        super().__init__()
        hidden_features = hidden_features or in_features
        out_features = out_features or in_features
        self.fc1 = nn.Linear(in_features, hidden_features, bias=bias)
        self.act = act_layer()
        self.drop1 = nn.Dropout(drop)
        self.norm = nn.Identity()
        self.fc2 = nn.Linear(hidden_features, out_features, bias=bias)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x):
        return self.drop2(self.fc2(self.norm(self.drop1(self.act(self.fc1(x))))))


class PatchEmbed(nn.Module):
    """timm's PatchEmbed with output_fmt='NHWC': proj (Conv2d, kernel = stride = patch), norm."""

    def __init__(self, img_size: _Size2 = 224, patch_size: _Size2 = 4, in_chans: int = 3, embed_dim: int = 96,
                 norm_layer: Optional[Callable] = None, strict_img_size: bool = True):
        super().__init__()
        self.img_size, self.patch_size = to_2tuple(img_size), to_2tuple(patch_size)
        self.grid_size = tuple(s // p for s, p in zip(self.img_size, self.patch_size))
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.strict_img_size = strict_img_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=self.patch_size, stride=self.patch_size)
        self.norm = norm_layer(embed_dim) if norm_layer else nn.Identity()

    def forward(self, x):
        H, W = x.shape[-2:]
        if self.strict_img_size and (H, W) != self.img_size:
            raise ValueError(f"x: expected an image of {self.img_size}, got {(H, W)} (strict_img_size=True)")
        if H % self.patch_size[0] or W % self.patch_size[1]:
            raise ValueError(f"x: expected H, W divisible by the patch {self.patch_size}, got {(H, W)}")
        return self.norm(self.proj(x).permute(0, 2, 3, 1))


class ClassifierHead(nn.Module):
    """timm's ClassifierHead for NHWC features: global average pool over H, W, drop, fc."""

    def __init__(self, in_features: int, num_classes: int, pool_type: str = "avg", drop_rate: float = 0.0):
        super().__init__()
        if pool_type not in ("", "avg"):
            raise ValueError(f"pool_type: expected '' or 'avg', got {pool_type!r}")
        self.pool_type = pool_type
        self.drop = nn.Dropout(drop_rate)
        self.fc = nn.Linear(in_features, num_classes) if num_classes > 0 else nn.Identity()

    def forward(self, x, pre_logits: bool = False):
        if self.pool_type == "avg":
            x = x.mean(dim=(1, 2))
        x = self.drop(x)
        return x if pre_logits else self.fc(x)


def _drop_path(p: float) -> nn.Module:
    return DropPath(p) if p > 0.0 else nn.Identity()


def _init_linear(m: nn.Module):
    # timm's init for Swin (init_weights_vit_timm / SwinTransformerV2._init_weights).
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)


class _SwinBlock(_DropsDerivedBuffers, nn.Module):
    """What timm's v1 and v2 blocks share: the window and shift of their input resolution, and the
    attention of ``attn`` run with the block's shift. Subclasses order their layers as timm does."""
    _derived_buffers = ("attn_mask",)

    def _set_windows(self, dim: int, input_resolution: _Size2, window_size: _Size2, shift_size: _Size2,
                     always_partition: bool, dynamic_mask: bool, mlp_ratio: float) -> None:
        self.dim = dim
        self.input_resolution = to_2tuple(input_resolution)
        self.target_shift_size = to_2tuple(shift_size)
        self.always_partition, self.dynamic_mask = always_partition, dynamic_mask
        self.window_size, self.shift_size = calc_window_shift(self.input_resolution, window_size, shift_size,
                                                              always_partition)
        self.window_area = self.window_size[0] * self.window_size[1]
        self.mlp_ratio = mlp_ratio

    def _attn(self, x: torch.Tensor) -> torch.Tensor:
        return self.attn(x, self.shift_size)


# ---------------------------------------------------------------- Swin (v1)
class WindowAttention(_DropsDerivedBuffers, nn.Module):
    """Swin's window attention with a learned relative-position bias (timm's WindowAttention).

    Parameters: ``qkv`` (Linear dim -> 3 * heads * head_dim), ``relative_position_bias_table``
    [(2wh-1)(2ww-1), heads], ``proj``. Unlike timm's, forward takes the whole feature map
    x [B, H, W, C] and a shift, and returns [B, H, W, C]: the op partitions internally.
    """
    _derived_buffers = ("relative_position_index",)

    def __init__(self, dim: int, num_heads: int, head_dim: Optional[int] = None, window_size: _Size2 = 7,
                 qkv_bias: bool = True, attn_drop: float = 0.0, proj_drop: float = 0.0):
        super().__init__()
        _no_attn_dropout(attn_drop)
        self.dim = dim
        self.window_size = to_2tuple(window_size)
        win_h, win_w = self.window_size
        self.window_area = win_h * win_w
        self.num_heads = num_heads
        head_dim = head_dim or dim // num_heads
        attn_dim = head_dim * num_heads
        self.scale = head_dim ** -0.5
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * win_h - 1) * (2 * win_w - 1), num_heads))
        self.register_buffer("relative_position_index", relative_position_index(win_h, win_w), persistent=False)
        self.qkv = nn.Linear(dim, attn_dim * 3, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(attn_dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)

    def forward(self, x: torch.Tensor, shift_size: Sequence[int] = (0, 0)) -> torch.Tensor:
        return swin_v1_attention(self, x, self.window_size, shift_size)


class SwinTransformerBlock(_SwinBlock):
    """timm's pre-norm Swin block on x [B, H, W, C]: x + attn(norm1(x)), then x + mlp(norm2(x)).

    ``window_size`` / ``shift_size`` follow timm's rule: an axis of ``input_resolution`` no longer
    than the window gets a single unshifted window of its size. The shifted-window mask is applied
    by the op for whatever H, W the input has (timm precomputes it for ``input_resolution`` unless
    ``dynamic_mask``; ``dynamic_mask`` is accepted for compatibility and changes nothing here). For
    H, W not multiples of the window see the module docstring (padded positions are absent keys).
    """

    def __init__(self, dim: int, input_resolution: _Size2, num_heads: int = 4, head_dim: Optional[int] = None,
                 window_size: _Size2 = 7, shift_size: _Size2 = 0, always_partition: bool = False,
                 dynamic_mask: bool = False, mlp_ratio: float = 4.0, qkv_bias: bool = True, proj_drop: float = 0.0,
                 attn_drop: float = 0.0, drop_path: float = 0.0, act_layer: Callable = nn.GELU,
                 norm_layer: Callable = nn.LayerNorm):
        super().__init__()
        self._set_windows(dim, input_resolution, window_size, shift_size, always_partition, dynamic_mask, mlp_ratio)
        self.norm1 = norm_layer(dim)
        self.attn = WindowAttention(dim, num_heads=num_heads, head_dim=head_dim, window_size=self.window_size,
                                    qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=proj_drop)
        self.drop_path1 = _drop_path(drop_path)
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, hidden_features=int(dim * mlp_ratio), act_layer=act_layer, drop=proj_drop)
        self.drop_path2 = _drop_path(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path1(self._attn(self.norm1(x)))
        return x + self.drop_path2(self.mlp(self.norm2(x)))


def merge_2x2(x: torch.Tensor) -> torch.Tensor:
    """[B, H, W, C] -> [B, ceil(H/2), ceil(W/2), 4C], odd sizes zero-padded as in timm."""
    B, H, W, C = x.shape
    x = F.pad(x, (0, 0, 0, W % 2, 0, H % 2))
    H, W = x.shape[1], x.shape[2]
    # Channel blocks in the order (0,0), (1,0), (0,1), (1,1): the original x0, x1, x2, x3 concat,
    # which the pretrained reduction weights assume.
    return x.reshape(B, H // 2, 2, W // 2, 2, C).permute(0, 1, 3, 4, 2, 5).flatten(3)


class PatchMerging(nn.Module):
    """timm's Swin-V1 patch merging: 2 x 2 neighbours concatenated (timm's channel order), norm, then
    ``reduction`` (Linear 4C -> out_dim, no bias). Odd H or W are zero-padded as in timm."""

    def __init__(self, dim: int, out_dim: Optional[int] = None, norm_layer: Callable = nn.LayerNorm):
        super().__init__()
        self.dim = dim
        self.out_dim = out_dim or 2 * dim
        self.norm = norm_layer(4 * dim)
        self.reduction = nn.Linear(4 * dim, self.out_dim, bias=False)

    def forward(self, x):
        return self.reduction(self.norm(merge_2x2(x)))


def _build_stage(stage: nn.Module, merging: Callable, block: Callable, dim: int, out_dim: int,
                 input_resolution: _Size2, depth: int, downsample: bool, window_size: _Size2,
                 drop_path: Union[float, Sequence[float]], norm_layer: Callable, **block_kwargs) -> list:
    """What timm's v1 and v2 stages share: sets ``stage``'s resolutions and ``downsample`` (the patch
    merging layer, or Identity when the stage keeps its resolution) and returns its ``depth``
    blocks, unshifted and shifted by window // 2 in turn, block i with drop_path[i]."""
    stage.dim = dim
    stage.input_resolution = to_2tuple(input_resolution)
    stage.output_resolution = (tuple(i // 2 for i in stage.input_resolution) if downsample
                               else stage.input_resolution)
    stage.depth = depth
    if downsample:
        stage.downsample = merging(dim=dim, out_dim=out_dim, norm_layer=norm_layer)
    elif dim != out_dim:
        raise ValueError(f"out_dim: expected dim ({dim}) for a stage without downsampling, got {out_dim}")
    else:
        stage.downsample = nn.Identity()
    window_size = to_2tuple(window_size)
    shift_size = tuple(w // 2 for w in window_size)
    return [block(dim=out_dim, input_resolution=stage.output_resolution, window_size=window_size,
                  shift_size=0 if i % 2 == 0 else shift_size,
                  drop_path=drop_path[i] if isinstance(drop_path, (list, tuple)) else drop_path,
                  norm_layer=norm_layer, **block_kwargs)
            for i in range(depth)]


class SwinTransformerStage(nn.Module):
    """timm's SwinTransformerStage: ``downsample`` (PatchMerging, or Identity for the first stage)
    then ``blocks``, alternating unshifted and shifted (window // 2) blocks."""

    def __init__(self, dim: int, out_dim: int, input_resolution: Tuple[int, int], depth: int,
                 downsample: bool = True, num_heads: int = 4, head_dim: Optional[int] = None,
                 window_size: _Size2 = 7, always_partition: bool = False, dynamic_mask: bool = False,
                 mlp_ratio: float = 4.0, qkv_bias: bool = True, proj_drop: float = 0.0, attn_drop: float = 0.0,
                 drop_path: Union[float, Sequence[float]] = 0.0, norm_layer: Callable = nn.LayerNorm):
        super().__init__()
        self.blocks = nn.Sequential(*_build_stage(
            self, PatchMerging, SwinTransformerBlock, dim, out_dim, input_resolution, depth, downsample,
            window_size, drop_path, norm_layer, num_heads=num_heads, head_dim=head_dim,
            always_partition=always_partition, dynamic_mask=dynamic_mask, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias,
            proj_drop=proj_drop, attn_drop=attn_drop))

    def forward(self, x):
        return self.blocks(self.downsample(x))


def _stage_widths(embed_dim, num_layers):
    if isinstance(embed_dim, (tuple, list)):
        return [int(e) for e in embed_dim]
    return [int(embed_dim * 2 ** i) for i in range(num_layers)]


def _per_stage(x, n):
    return tuple(x) if isinstance(x, (tuple, list)) else (x,) * n


class _SwinNetwork(nn.Module):
    """What timm's SwinTransformer and SwinTransformerV2 share: patch_embed, layers (stage i gets
    per_stage[i] and the common stage_kwargs; every stage after the first halves the resolution),
    norm, head, and timm's Linear init."""

    def __init__(self, stage: Callable, per_stage: Sequence[dict], img_size: _Size2, patch_size: int,
                 in_chans: int, num_classes: int, global_pool: str, embed_dim, depths: Sequence[int],
                 strict_img_size: bool, drop_rate: float, drop_path_rate: float, norm_layer: Callable,
                 **stage_kwargs):
        super().__init__()
        self.num_classes, self.global_pool = num_classes, global_pool
        self.output_fmt = "NHWC"
        self.num_layers = len(depths)
        self.embed_dim = embed_dim
        widths = _stage_widths(embed_dim, self.num_layers)
        self.num_features = self.head_hidden_size = widths[-1]
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, widths[0], norm_layer=norm_layer,
                                      strict_img_size=strict_img_size)
        grid = self.patch_embed.grid_size
        dpr = [x.tolist() for x in torch.linspace(0, drop_path_rate, sum(depths), device="cpu").split(list(depths))]
        layers, in_dim, scale = [], widths[0], 1
        for i in range(self.num_layers):
            layers.append(stage(
                dim=in_dim, out_dim=widths[i], input_resolution=(grid[0] // scale, grid[1] // scale),
                depth=depths[i], downsample=i > 0, dynamic_mask=not strict_img_size, drop_path=dpr[i],
                norm_layer=norm_layer, **per_stage[i], **stage_kwargs))
            in_dim = widths[i]
            if i > 0:
                scale *= 2
        self.layers = nn.Sequential(*layers)
        self.norm = norm_layer(self.num_features)
        self.head = ClassifierHead(self.num_features, num_classes, pool_type=global_pool, drop_rate=drop_rate)
        self.apply(_init_linear)

    def forward_features(self, x):
        return self.norm(self.layers(self.patch_embed(x)))

    def forward_head(self, x, pre_logits: bool = False):
        return self.head(x, pre_logits=pre_logits)

    def forward(self, x):
        return self.forward_head(self.forward_features(x))


class SwinTransformer(_SwinNetwork):
    """timm's SwinTransformer (v1): patch_embed, layers (stages), norm, head (ClassifierHead).

    Same constructor arguments as timm's for the architecture; a timm state dict loads with
    strict=True. Features are NHWC throughout; forward returns logits [B, num_classes].
    """

    def __init__(self, img_size: _Size2 = 224, patch_size: int = 4, in_chans: int = 3, num_classes: int = 1000,
                 global_pool: str = "avg", embed_dim: int = 96, depths: Sequence[int] = (2, 2, 6, 2),
                 num_heads: Sequence[int] = (3, 6, 12, 24), head_dim: Optional[int] = None,
                 window_size: _Size2 = 7, always_partition: bool = False, strict_img_size: bool = True,
                 mlp_ratio: float = 4.0, qkv_bias: bool = True, drop_rate: float = 0.0, proj_drop_rate: float = 0.0,
                 attn_drop_rate: float = 0.0, drop_path_rate: float = 0.1, norm_layer: Callable = nn.LayerNorm):
        n = len(depths)
        # timm's reading: a pair is one (wh, ww) window for every stage, any other sequence is per stage.
        if isinstance(window_size, (tuple, list)) and len(window_size) == 2:
            window_size = (tuple(window_size),) * n
        head_dim, window_size, mlp_ratio = (_per_stage(x, n) for x in (head_dim, window_size, mlp_ratio))
        per_stage = [dict(num_heads=num_heads[i], head_dim=head_dim[i], window_size=window_size[i],
                          mlp_ratio=mlp_ratio[i]) for i in range(n)]
        super().__init__(SwinTransformerStage, per_stage, img_size, patch_size, in_chans, num_classes, global_pool,
                         embed_dim, depths, strict_img_size, drop_rate, drop_path_rate, norm_layer,
                         always_partition=always_partition, qkv_bias=qkv_bias, proj_drop=proj_drop_rate,
                         attn_drop=attn_drop_rate)


def swin_t(**kwargs) -> SwinTransformer:
    """timm's swin_tiny_patch4_window7_224."""
    return SwinTransformer(**{**dict(patch_size=4, window_size=7, embed_dim=96, depths=(2, 2, 6, 2),
                                     num_heads=(3, 6, 12, 24)), **kwargs})


def swin_s(**kwargs) -> SwinTransformer:
    """timm's swin_small_patch4_window7_224."""
    return SwinTransformer(**{**dict(patch_size=4, window_size=7, embed_dim=96, depths=(2, 2, 18, 2),
                                     num_heads=(3, 6, 12, 24)), **kwargs})


def swin_b(img_size: int = 224, window_size: int = 7, **kwargs) -> SwinTransformer:
    """timm's swin_base_patch4_window7_224 (or, with img_size=384, window_size=12,
    swin_base_patch4_window12_384)."""
    return SwinTransformer(**{**dict(img_size=img_size, patch_size=4, window_size=window_size, embed_dim=128,
                                     depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32)), **kwargs})


# ---------------------------------------------------------------- Swin-V2
class WindowAttentionV2(_DropsDerivedBuffers, nn.Module):
    """Swin-V2's cosine window attention with continuous position bias (timm's v2 WindowAttention).

    Parameters: ``qkv`` (Linear dim -> 3 dim, no bias), ``q_bias`` and ``v_bias`` (k has a zero
    bias, the non-persistent buffer ``k_bias``), ``logit_scale`` [heads, 1, 1] (log 10 at init,
    clamped at log 100), ``cpb_mlp`` (Linear(2, 512), ReLU, Linear(512, heads, bias=False)). The
    logit is cos(q, k) * exp(logit_scale) + 16 * sigmoid(cpb_mlp(relative_coords_table))[index].
    forward takes x [B, H, W, C] and a shift, like WindowAttention.
    """
    _derived_buffers = ("relative_coords_table", "relative_position_index", "k_bias")

    def __init__(self, dim: int, window_size: _Size2, num_heads: int, qkv_bias: bool = True, attn_drop: float = 0.0,
                 proj_drop: float = 0.0, pretrained_window_size: _Size2 = (0, 0)):
        super().__init__()
        _no_attn_dropout(attn_drop)
        self.dim = dim
        self.window_size = to_2tuple(window_size)
        self.pretrained_window_size = to_2tuple(pretrained_window_size)
        self.num_heads = num_heads
        self.logit_scale = nn.Parameter(torch.log(10 * torch.ones((num_heads, 1, 1))))
        self.cpb_mlp = nn.Sequential(nn.Linear(2, 512, bias=True), nn.ReLU(inplace=True),
                                     nn.Linear(512, num_heads, bias=False))
        self.register_buffer("relative_coords_table",
                             relative_coords_table(self.window_size, self.pretrained_window_size), persistent=False)
        self.register_buffer("relative_position_index", relative_position_index(*self.window_size), persistent=False)
        self.qkv = nn.Linear(dim, dim * 3, bias=False)
        if qkv_bias:
            self.q_bias = nn.Parameter(torch.zeros(dim))
            self.register_buffer("k_bias", torch.zeros(dim), persistent=False)
            self.v_bias = nn.Parameter(torch.zeros(dim))
        else:
            self.q_bias = self.k_bias = self.v_bias = None
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor, shift_size: Sequence[int] = (0, 0)) -> torch.Tensor:
        return swin_v2_attention(self, x, self.window_size, shift_size)


class SwinTransformerV2Block(_SwinBlock):
    """timm's res-post-norm Swin-V2 block on x [B, H, W, C]: x + norm1(attn(x)), then
    x + norm2(mlp(x)). Window and shift rules, and the non-multiple-of-window caveat, as in
    SwinTransformerBlock."""

    def __init__(self, dim: int, input_resolution: _Size2, num_heads: int, window_size: _Size2 = 7,
                 shift_size: _Size2 = 0, always_partition: bool = False, dynamic_mask: bool = False,
                 mlp_ratio: float = 4.0, qkv_bias: bool = True, proj_drop: float = 0.0, attn_drop: float = 0.0,
                 drop_path: float = 0.0, act_layer: Callable = nn.GELU, norm_layer: Callable = nn.LayerNorm,
                 pretrained_window_size: _Size2 = 0):
        super().__init__()
        self._set_windows(dim, input_resolution, window_size, shift_size, always_partition, dynamic_mask, mlp_ratio)
        self.num_heads = num_heads
        self.attn = WindowAttentionV2(dim, window_size=self.window_size, num_heads=num_heads, qkv_bias=qkv_bias,
                                      attn_drop=attn_drop, proj_drop=proj_drop,
                                      pretrained_window_size=to_2tuple(pretrained_window_size))
        self.norm1 = norm_layer(dim)
        self.drop_path1 = _drop_path(drop_path)
        self.mlp = Mlp(dim, hidden_features=int(dim * mlp_ratio), act_layer=act_layer, drop=proj_drop)
        self.norm2 = norm_layer(dim)
        self.drop_path2 = _drop_path(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path1(self.norm1(self._attn(x)))
        return x + self.drop_path2(self.norm2(self.mlp(x)))


class PatchMergingV2(nn.Module):
    """timm's Swin-V2 patch merging: ``reduction`` first, then ``norm`` (over out_dim)."""

    def __init__(self, dim: int, out_dim: Optional[int] = None, norm_layer: Callable = nn.LayerNorm):
        super().__init__()
        self.dim = dim
        self.out_dim = out_dim or 2 * dim
        self.reduction = nn.Linear(4 * dim, self.out_dim, bias=False)
        self.norm = norm_layer(self.out_dim)

    def forward(self, x):
        return self.norm(self.reduction(merge_2x2(x)))


class SwinTransformerV2Stage(nn.Module):
    """timm's SwinTransformerV2Stage: ``downsample`` (PatchMergingV2 or Identity) then ``blocks``."""

    def __init__(self, dim: int, out_dim: int, input_resolution: Tuple[int, int], depth: int, num_heads: int,
                 window_size: _Size2, always_partition: bool = False, dynamic_mask: bool = False,
                 downsample: bool = False, mlp_ratio: float = 4.0, qkv_bias: bool = True, proj_drop: float = 0.0,
                 attn_drop: float = 0.0, drop_path: Union[float, Sequence[float]] = 0.0,
                 act_layer: Callable = nn.GELU, norm_layer: Callable = nn.LayerNorm,
                 pretrained_window_size: _Size2 = 0):
        super().__init__()
        self.blocks = nn.ModuleList(_build_stage(
            self, PatchMergingV2, SwinTransformerV2Block, dim, out_dim, input_resolution, depth, downsample,
            window_size, drop_path, norm_layer, num_heads=num_heads, always_partition=always_partition,
            dynamic_mask=dynamic_mask, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, proj_drop=proj_drop,
            attn_drop=attn_drop, act_layer=act_layer, pretrained_window_size=pretrained_window_size))

    def forward(self, x):
        x = self.downsample(x)
        for blk in self.blocks:
            x = blk(x)
        return x

    def _init_respostnorm(self):
        # timm starts every post-norm at zero, so each block is the identity at init.
        for blk in self.blocks:
            for norm in (blk.norm1, blk.norm2):
                nn.init.zeros_(norm.weight)
                nn.init.zeros_(norm.bias)


class SwinTransformerV2(_SwinNetwork):
    """timm's SwinTransformerV2: patch_embed, layers, norm, head; a timm state dict loads with strict=True."""

    def __init__(self, img_size: _Size2 = 224, patch_size: int = 4, in_chans: int = 3, num_classes: int = 1000,
                 global_pool: str = "avg", embed_dim: int = 96, depths: Sequence[int] = (2, 2, 6, 2),
                 num_heads: Sequence[int] = (3, 6, 12, 24), window_size: _Size2 = 7, always_partition: bool = False,
                 strict_img_size: bool = True, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 drop_rate: float = 0.0, proj_drop_rate: float = 0.0, attn_drop_rate: float = 0.0,
                 drop_path_rate: float = 0.1, act_layer: Callable = nn.GELU, norm_layer: Callable = nn.LayerNorm,
                 pretrained_window_sizes: Sequence[int] = (0, 0, 0, 0)):
        n = len(depths)
        pretrained_window_sizes = _per_stage(pretrained_window_sizes, n)
        per_stage = [dict(num_heads=num_heads[i], pretrained_window_size=pretrained_window_sizes[i])
                     for i in range(n)]
        super().__init__(SwinTransformerV2Stage, per_stage, img_size, patch_size, in_chans, num_classes, global_pool,
                         embed_dim, depths, strict_img_size, drop_rate, drop_path_rate, norm_layer,
                         window_size=window_size, always_partition=always_partition, mlp_ratio=mlp_ratio,
                         qkv_bias=qkv_bias, proj_drop=proj_drop_rate, attn_drop=attn_drop_rate, act_layer=act_layer)
        for stage in self.layers:
            stage._init_respostnorm()


def swinv2_t(img_size: int = 256, window_size: int = 8, **kwargs) -> SwinTransformerV2:
    """timm's swinv2_tiny_window8_256 (window_size=16: swinv2_tiny_window16_256)."""
    return SwinTransformerV2(**{**dict(img_size=img_size, window_size=window_size, embed_dim=96,
                                       depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24)), **kwargs})


def swinv2_s(img_size: int = 256, window_size: int = 8, **kwargs) -> SwinTransformerV2:
    """timm's swinv2_small_window8_256 (window_size=16: swinv2_small_window16_256)."""
    return SwinTransformerV2(**{**dict(img_size=img_size, window_size=window_size, embed_dim=96,
                                       depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24)), **kwargs})


def swinv2_b(img_size: int = 256, window_size: int = 8, **kwargs) -> SwinTransformerV2:
    """timm's swinv2_base_window8_256 (window_size=16: swinv2_base_window16_256)."""
    return SwinTransformerV2(**{**dict(img_size=img_size, window_size=window_size, embed_dim=128,
                                       depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32)), **kwargs})


# ---------------------------------------------------------------- StyleSwin
class WindowBranch(_DropsDerivedBuffers, nn.Module):
    """One branch of StyleSwin's double attention: what its per-branch ``WindowAttention`` holds
    (``relative_position_bias_table`` [(2w-1)^2, heads], ``scale``), without the computation, which
    the parent runs for both branches on the fused op."""
    _derived_buffers = ("relative_position_index",)

    def __init__(self, dim: int, window_size: Tuple[int, int], num_heads: int, qk_scale: Optional[float] = None):
        super().__init__()
        self.dim, self.window_size, self.num_heads = dim, to_2tuple(window_size), num_heads
        self.head_dim = dim // num_heads
        self.scale = qk_scale or self.head_dim ** -0.5
        wh, ww = self.window_size
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * wh - 1) * (2 * ww - 1), num_heads))
        self.register_buffer("relative_position_index", relative_position_index(wh, ww), persistent=False)
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)


class DoubleWindowAttention(_DropsDerivedBuffers, nn.Module):
    """StyleSwin's double attention (Zhang et al., CVPR 2022) on x [B, H, W, C].

    The heads are split in two: heads [0, num_heads/2) (channels [0, C/2) of q, k, v) attend within
    plain windows, heads [num_heads/2, num_heads) within windows shifted by window // 2; the two
    outputs are concatenated along channels (unshifted half first) and projected by ``proj``. So
    every block sees both window partitions, which enlarges the receptive field without alternating
    blocks.

    Parameters and names follow the official code (microsoft/StyleSwin, models/generator.py,
    StyleSwinTransformerBlock): ``qkv`` (Linear dim -> 3 dim, bias=qkv_bias), ``proj`` (Linear),
    ``attn`` = ModuleList of two branches, each with its own ``relative_position_bias_table``
    [(2w-1)^2, num_heads/2] (``attn.0`` unshifted, ``attn.1`` shifted) and scale
    ``qk_scale or head_dim ** -0.5``. The ``qkv.*``, ``proj.*`` and ``attn.*`` entries of a StyleSwin
    block's state dict load into this module; its persistent ``attn_mask1`` / ``attn_mask2`` and
    ``relative_position_index`` buffers are dropped. The block's AdaIN norms and MLP are not part of
    this module. As in StyleSwin, ``input_resolution`` (if given) no larger than the window makes a
    single window of that size, unshifted in both halves. StyleSwin requires H, W multiples of the
    window; other sizes run here with padded positions absent.
    """
    _derived_buffers = ("attn_mask1", "attn_mask2")

    def __init__(self, dim: int, num_heads: int, window_size: int = 8,
                 input_resolution: Optional[Tuple[int, int]] = None, shift_size: Optional[int] = None,
                 qkv_bias: bool = True, qk_scale: Optional[float] = None, attn_drop: float = 0.0):
        super().__init__()
        _no_attn_dropout(attn_drop)
        if num_heads < 2 or dim % 2 or (dim // 2) % (num_heads // 2):
            raise ValueError(f"num_heads: expected at least 2 heads, num_heads // 2 of them dividing dim // 2, "
                             f"got {num_heads} for dim {dim}")
        self.dim, self.num_heads = dim, num_heads
        self.window_size = int(window_size)
        self.shift_size = self.window_size // 2 if shift_size is None else int(shift_size)
        self.input_resolution = None if input_resolution is None else to_2tuple(input_resolution)
        if self.input_resolution is not None and min(self.input_resolution) <= self.window_size:
            self.shift_size = 0
            self.window_size = min(self.input_resolution)
        if not 0 <= self.shift_size < self.window_size:
            raise ValueError(f"shift_size: expected 0 <= shift < window ({self.window_size}), got {self.shift_size}")
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.attn = nn.ModuleList([
            WindowBranch(dim // 2, to_2tuple(self.window_size), num_heads // 2, qk_scale=qk_scale)
            for _ in range(2)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return double_window_attention(self.qkv, self.proj, self.attn, self.num_heads, x,
                                       to_2tuple(self.window_size), to_2tuple(self.shift_size))


__all__ = [
    "WindowAttention", "SwinTransformerBlock", "PatchMerging", "SwinTransformerStage", "SwinTransformer",
    "swin_t", "swin_s", "swin_b",
    "WindowAttentionV2", "SwinTransformerV2Block", "PatchMergingV2", "SwinTransformerV2Stage", "SwinTransformerV2",
    "swinv2_t", "swinv2_s", "swinv2_b",
    "DoubleWindowAttention", "WindowBranch",
    "swin_v1_attention", "swin_v2_attention", "swin_v2_continuous_bias", "double_window_attention",
    "Mlp", "DropPath", "PatchEmbed", "ClassifierHead",
]
