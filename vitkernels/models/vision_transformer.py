"""ViT and DeiT (timm's VisionTransformer, class-token models) on vitk ops.

Parameter names and the forward are timm's (patch_embed.proj, cls_token, pos_embed, blocks.i.{norm1,
attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2}, norm, head), so a timm state dict of
vit_base_patch16_224, deit_small_patch16_224 or deit_tiny_patch16_224 loads with strict=True.

Attention is dense, so it runs `reduced_attention` (dense attention is its Nk = Nq case) on the
q, k, v views of the one packed qkv projection, read in place. On this package's reference CPU
(2 cores, AVX-512) at ViT-B/DeiT shapes, B = 8, N = 197, d = 64, it measured 37 ms against 44 ms
for `F.scaled_dot_product_attention` with 12 heads, 19 against 24 with 6, and a tie with 3.
``use_reference=True`` runs the eager softmax(q k^T) v instead, with the same weights.
"""
from typing import Callable

import torch
import torch.nn as nn

from ..ops import masked_attention as _ops
from ..reference import masked_attention as _ref
from .window_attention import DropPath, Mlp, PatchEmbed


class Attention(nn.Module):
    """timm's ViT Attention: one qkv projection, dense attention over all tokens, proj."""

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = False, attn_drop: float = 0.0,
                 proj_drop: float = 0.0, use_reference: bool = False):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"num_heads: expected a divisor of dim={dim}, got {num_heads}")
        if attn_drop:
            raise ValueError("attn_drop: the fused attention has no dropout on probabilities; expected 0")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.use_reference = use_reference
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.q_norm = nn.Identity()
        self.k_norm = nn.Identity()
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.num_heads, self.head_dim).unbind(2)
        q, k = self.q_norm(q), self.k_norm(k)
        attend = _ref.reduced_attention if self.use_reference else _ops.reduced_attention
        x = attend(q, k, v, self.scale)
        return self.proj_drop(self.proj(x.reshape(B, N, C)))


class Block(nn.Module):
    """timm's pre-norm ViT block: x + attn(norm1(x)), then x + mlp(norm2(x))."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = False,
                 proj_drop: float = 0.0, drop_path: float = 0.0, act_layer: Callable = nn.GELU,
                 norm_layer: Callable = nn.LayerNorm, use_reference: bool = False):
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias, proj_drop=proj_drop, use_reference=use_reference)
        self.ls1 = nn.Identity()
        self.drop_path1 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=act_layer, drop=proj_drop)
        self.ls2 = nn.Identity()
        self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x))))
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))


def _layer_norm(dim: int) -> nn.LayerNorm:
    return nn.LayerNorm(dim, eps=1e-6)


class VisionTransformer(nn.Module):
    """timm's VisionTransformer with a class token, learned position embedding (class token
    included), pre-norm blocks, a final norm and the class-token head (global_pool='token')."""

    def __init__(self, img_size: int = 224, patch_size: int = 16, in_chans: int = 3, num_classes: int = 1000,
                 embed_dim: int = 768, depth: int = 12, num_heads: int = 12, mlp_ratio: float = 4.0,
                 qkv_bias: bool = True, drop_rate: float = 0.0, drop_path_rate: float = 0.0,
                 use_reference: bool = False):
        super().__init__()
        self.num_classes = num_classes
        self.num_features = self.embed_dim = embed_dim
        self.num_prefix_tokens = 1
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        num_patches = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.randn(1, num_patches + 1, embed_dim) * 0.02)
        self.pos_drop = nn.Dropout(drop_rate)
        self.norm_pre = nn.Identity()
        rates = torch.linspace(0, drop_path_rate, depth).tolist()
        self.blocks = nn.Sequential(*[
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias=qkv_bias, proj_drop=drop_rate, drop_path=rates[i],
                  norm_layer=_layer_norm, use_reference=use_reference)
            for i in range(depth)])
        self.norm = _layer_norm(embed_dim)
        self.fc_norm = nn.Identity()
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self.apply(_init_weights)
        nn.init.normal_(self.cls_token, std=1e-6)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x).flatten(1, 2)
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1) + self.pos_embed
        return self.norm(self.blocks(self.norm_pre(self.pos_drop(x))))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.head_drop(self.fc_norm(x[:, 0]))
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _init_weights(m: nn.Module):
    # timm's init_weights_vit_timm
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)


def _factory(embed_dim: int, num_heads: int, name: str):
    def build(num_classes: int = 1000, use_reference: bool = False, **kwargs) -> VisionTransformer:
        return VisionTransformer(patch_size=16, embed_dim=embed_dim, depth=12, num_heads=num_heads,
                                 num_classes=num_classes, use_reference=use_reference, **kwargs)
    build.__name__ = name
    build.__doc__ = f"timm's {name}: 16x16 patches, width {embed_dim}, depth 12, {num_heads} heads."
    return build


vit_base_patch16_224 = _factory(768, 12, "vit_base_patch16_224")
deit_small_patch16_224 = _factory(384, 6, "deit_small_patch16_224")
deit_tiny_patch16_224 = _factory(192, 3, "deit_tiny_patch16_224")

__all__ = ["Attention", "Block", "VisionTransformer", "vit_base_patch16_224", "deit_small_patch16_224",
           "deit_tiny_patch16_224"]
