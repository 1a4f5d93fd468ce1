"""Spectral token mixers on the fused spectral ops, with the papers' parameter names so their
checkpoints load unchanged.

- SVT_channel_mixing: the Scattering Vision Transformer's spectral layer (Patro et al., 2023), with
  its parameter names, so an SVT checkpoint loads unchanged: one level of the dual-tree complex
  wavelet transform, a per-channel weight on the lowpass (complex_weight_ll [C, H, W]), a complex
  block MLP over the six highpass orientations (complex_weight_lh_1 / _2 [2, nb, bs, bs],
  complex_weight_lh_b1 / _b2 [2, nb, bs]) and the inverse transform. forward(x [B, N, C], H, W).

- GlobalFilter and GFNetBlock: GFNet's global filter layer (Rao et al., 2021; complex_weight
  [h, w, dim, 2], w = W // 2 + 1) and its block, x + mlp(norm2(filter(norm1(x)))).
- SpectralGatingNetwork and SpectFormerBlock: SpectFormer's spectral layer and block (Patro et al.,
  2023), GFNet's filter computed in fp32 and returned in the input's dtype.
- HyenaOperator2d: Multi-Dimensional Hyena's operator (Zimerman and Wolf, 2023) in its direct
  parametrization (filter [order, d_model, l_max, l_max] and bias [order, d_model] as parameters):
  in_proj, a 3 x 3 depthwise short_filter, the order-2 gated long convolution, out_proj; the
  1/(2 l_max) filter scaling and the optional four-direction flips ("4dir", mixed by linear_mix) are
  applied here, around the plain fftconv2d op.

``use_reference=True`` runs the plain-PyTorch reference (vitkernels.reference.spectral) instead of the
fused op: the same parameters and result, for comparison.
"""
import math
from typing import Callable, Optional, Tuple

import torch
import torch.nn as nn

from ..ops.spectral import fftconv2d, global_filter, svt_spectral_mix
from ..reference import spectral as ref
from .window_attention import DropPath, Mlp


class SVT_channel_mixing(nn.Module):  # noqa: N801 - the paper's class name, so its checkpoints load
    """SVT's spectral layer for a dim-channel, H x W token grid (H and W even), num_blocks channel
    blocks (SVT uses 4)."""

    def __init__(self, dim: int, H: int, W: int, num_blocks: int = 4, use_reference: bool = False):
        super().__init__()
        if dim % num_blocks:
            raise ValueError(f"dim: expected a multiple of num_blocks={num_blocks}, got {dim}")
        self.hidden_size, self.num_blocks, self.block_size = dim, num_blocks, dim // num_blocks
        self.use_reference = use_reference
        bs = self.block_size
        self.complex_weight_ll = nn.Parameter(torch.randn(dim, H, W) * 0.02)
        self.complex_weight_lh_1 = nn.Parameter(torch.randn(2, num_blocks, bs, bs) * 0.02)
        self.complex_weight_lh_2 = nn.Parameter(torch.randn(2, num_blocks, bs, bs) * 0.02)
        self.complex_weight_lh_b1 = nn.Parameter(torch.randn(2, num_blocks, bs) * 0.02)
        self.complex_weight_lh_b2 = nn.Parameter(torch.randn(2, num_blocks, bs) * 0.02)

    def forward(self, x: torch.Tensor, H: int, W: int) -> torch.Tensor:
        B, N, C = x.shape
        mix = ref.svt_spectral_mix if self.use_reference else svt_spectral_mix
        # SVT casts to fp32 before its transform; the fused op accumulates in fp32 for any float input.
        y = mix(x.reshape(B, H, W, C), self.complex_weight_ll, self.complex_weight_lh_1, self.complex_weight_lh_b1,
                self.complex_weight_lh_2, self.complex_weight_lh_b2)
        return y.reshape(B, N, C)


class GlobalFilter(nn.Module):
    """GFNet's global filter on x [B, N, C] over an h x (2 (w - 1) or 2 w - 1) grid (square by default):
    irfft2(rfft2(x) * complex_weight) with norm="ortho", in fp32 as GFNet computes it."""

    out_dtype_of_input = False  # GFNet returns fp32; SpectFormer casts back to the input's dtype

    def __init__(self, dim: int, h: int = 14, w: int = 8, use_reference: bool = False):
        super().__init__()
        self.complex_weight = nn.Parameter(torch.randn(h, w, dim, 2, dtype=torch.float32) * 0.02)
        self.h, self.w = h, w
        self.use_reference = use_reference

    def forward(self, x: torch.Tensor, spatial_size: Optional[Tuple[int, int]] = None) -> torch.Tensor:
        B, N, C = x.shape
        a, b = spatial_size if spatial_size is not None else (math.isqrt(N), math.isqrt(N))
        gf = ref.global_filter if self.use_reference else global_filter
        y = gf(x.reshape(B, a, b, C).float(), self.complex_weight).reshape(B, N, C)
        return y.to(x.dtype) if self.out_dtype_of_input else y


class SpectralGatingNetwork(GlobalFilter):
    """SpectFormer's spectral gating: GFNet's global filter, returned in the input's dtype."""

    out_dtype_of_input = True


class GFNetBlock(nn.Module):
    """GFNet's block: x + drop_path(mlp(norm2(filter(norm1(x)))))."""

    filter_class: Callable = GlobalFilter

    def __init__(self, dim: int, mlp_ratio: float = 4.0, drop: float = 0.0, drop_path: float = 0.0,
                 act_layer: Callable = nn.GELU, norm_layer: Callable = nn.LayerNorm, h: int = 14, w: int = 8,
                 use_reference: bool = False):
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.filter = self.filter_class(dim, h=h, w=w, use_reference=use_reference)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(in_features=dim, hidden_features=int(dim * mlp_ratio), act_layer=act_layer, drop=drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.drop_path(self.mlp(self.norm2(self.filter(self.norm1(x)))))


class SpectFormerBlock(GFNetBlock):
    """SpectFormer's spectral block (its early stages): the GFNet block on SpectralGatingNetwork."""

    filter_class = SpectralGatingNetwork


def _four_directions(v: torch.Tensor) -> torch.Tensor:
    """[B, ...] -> [4B, ...]: v, v flipped in both axes, in the last one, in the second last."""
    return torch.cat((v, v.flip(-1, -2), v.flip(-1), v.flip(-2)), dim=0)


class HyenaOperator2d(nn.Module):
    """Multi-Dimensional Hyena's 2-D operator, direct parametrization, on x [B, L, L, C] or [B, L * L, C].

    u = in_proj(x) as [B, 3C, L, L]; short_filter (3 x 3 depthwise); split into x0, x1, v; then
    v = fftconv2d(v * x1, filter[0] / (2 L), bias[0]) and y = out_proj(v * x0) (order 2). The 1/(2L)
    is Hyena's FFT-size normalization of the filter; with directional_mode="4dir" the gated inputs are
    stacked with their three flips, convolved, flipped back and mixed by linear_mix (Linear(4, 1))."""

    def __init__(self, d_model: int, l_max: int, order: int = 2, dropout: float = 0.0,
                 directional_mode: str = "standard", use_reference: bool = False):
        super().__init__()
        if order != 2:
            raise ValueError(f"order: only Hyena's order 2 is implemented, got {order}")
        if directional_mode not in ("standard", "4dir"):
            raise ValueError(f"directional_mode: expected 'standard' or '4dir', got {directional_mode!r}")
        self.d_model, self.l_max, self.order = d_model, l_max, order
        self.directional_mode, self.use_reference = directional_mode, use_reference
        inner_width = d_model * (order + 1)
        self.dropout = nn.Dropout(dropout)
        self.in_proj = nn.Linear(d_model, inner_width)
        self.out_proj = nn.Linear(d_model, d_model)
        self.short_filter = nn.Conv2d(inner_width, inner_width, 3, padding=1, groups=inner_width)
        if directional_mode == "4dir":
            self.linear_mix = nn.Linear(4, 1)
        self.filter = nn.Parameter(torch.randn(order, d_model, l_max, l_max))
        self.bias = nn.Parameter(torch.randn(order, d_model))

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        tokens = u.dim() == 3
        B = u.shape[0]
        L = self.l_max
        if tokens:
            u = u.reshape(B, L, L, u.shape[-1])
        if u.shape[1] != L or u.shape[2] != L:
            raise ValueError(f"u: expected a {L} x {L} grid, got shape {tuple(u.shape)}")
        z = self.short_filter(self.in_proj(u).permute(0, 3, 1, 2))
        x0, x1, v = z.split(self.d_model, dim=1)
        four = self.directional_mode == "4dir"
        if four:
            x0, x1, v = _four_directions(x0), _four_directions(x1), _four_directions(v)
        conv = ref.fftconv2d if self.use_reference else fftconv2d
        v = conv(self.dropout(v * x1), self.filter[0] / (2 * L), self.bias[0])
        y = (v * x0).permute(0, 2, 3, 1)  # [B', L, L, C]
        if four:
            y = torch.stack([y[:B], y[B:2 * B].flip(1, 2), y[2 * B:3 * B].flip(2), y[3 * B:].flip(1)], dim=-1)
            y = self.linear_mix(y).squeeze(-1)
        y = self.out_proj(y)
        return y.reshape(B, L * L, self.d_model) if tokens else y
