"""Attention blocks of PPMA, RMT, GMM-ViT, PVTv2 and S2AFormer on the masked_attention ops.

- PathEmbeding2D, RotaryPositionEmbedding2D, DWConv2d, MambaAttentionAllDouble (PPMA "whole") and
  MambaAttentionChunkDouble (PPMA "chunk"): PPMA's classification/models/PPMA.py.
- RetNetRelPos2d, VisionRetentionAll: RMT's Manhattan self-attention (MaSA, whole form).
- GaussianMixtureMask, GMMAttention: the Gaussian-mixture-mask ViT attention of "RetNet viewed
  through convolution" (its models/gmm.py and models/vit.py names); GMMViTAttention: the same mask
  on a timm-style ViT Attention (qkv, proj).
- SpatialReductionAttention: timm's PVTv2 Attention (q, kv, sr, norm, proj; linear mode too).
- StripSelfAttention, HybridPerceptionBlock: S2AFormer (no official code; see their docstrings).

Module structure and parameter names are the papers' (timm's for PVTv2), so the papers' state dicts
load unchanged; buffers the originals store that the fused ops compute on the fly are either kept
(small: RoPE angles, RMT's per-head decay) or dropped on load (GMM's [1, 1, N, N] distance table).

Every block has ``use_reference``: True swaps the fused torch.ops.vitk call for the eager reference
of vitkernels.reference.masked_attention with the same signature (which builds the dense N x N masks
as the papers' code does), so one set of weights runs both ways. The fused ops accept fp32, fp16 and
bf16; the reference also runs in float64.

Layout: the image blocks take x [B, H, W, C] as their papers do (PVTv2 and the GMM blocks: [B, N, C]
with the grid size), project q, k, v once each and hand [B, H, W, heads, d] views to the op; no mask,
score or probability tensor exists outside the reference path.
"""
import math
from typing import Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..ops import masked_attention as _ops
from ..reference import masked_attention as _ref


def _pick(use_reference: bool, name: str):
    return getattr(_ref if use_reference else _ops, name)


def _grid(feat_size, n: int) -> Tuple[int, int]:
    if feat_size is None:
        side = math.isqrt(n)
        if side * side != n:
            raise ValueError(f"feat_size: x has {n} tokens, not a square grid; pass feat_size=(H, W)")
        return side, side
    H, W = (int(s) for s in feat_size)
    if H * W != n:
        raise ValueError(f"feat_size: expected H * W = {n} tokens (every token on the grid, no class token), "
                         f"got {H} x {W}")
    return H, W


# ---------------------------------------------------------------- shared layers (PPMA / RMT names)
def rotate_every_two(x: torch.Tensor) -> torch.Tensor:
    """(x0, x1, x2, x3, ...) -> (-x1, x0, -x3, x2, ...) along the last dim: the 90-degree rotation of
    each consecutive channel pair that RoPE multiplies by sin."""
    pairs = x.unflatten(-1, (-1, 2))
    return torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)


def theta_shift(x: torch.Tensor, sin: torch.Tensor, cos: torch.Tensor) -> torch.Tensor:
    """RoPE of x [B, H, W, heads, d] with sin, cos [H, W, d] (one angle table for every head)."""
    sin, cos = sin[:, :, None, :], cos[:, :, None, :]
    return x * cos + rotate_every_two(x) * sin


class DWConv2d(nn.Module):
    """Depth-wise convolution on x [B, H, W, C] (PPMA / RMT: LePE and the block's positional conv)."""

    def __init__(self, dim: int, kernel_size: int, stride: int, padding: int):
        super().__init__()
        self.conv = nn.Conv2d(dim, dim, kernel_size, stride, padding, groups=dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)


def _rope_tables(angle: torch.Tensor, slen: Sequence[int]) -> Tuple[torch.Tensor, torch.Tensor]:
    # PPMA and RMT rotate by the row-major token index h * W + w, one 1-D position per token.
    H, W = int(slen[0]), int(slen[1])
    phase = torch.arange(H * W, device=angle.device, dtype=angle.dtype)[:, None] * angle[None, :]
    return phase.sin().reshape(H, W, -1), phase.cos().reshape(H, W, -1)


def _rope_angle(embed_dim: int, num_heads: int) -> torch.Tensor:
    angle = 1.0 / (10000 ** torch.linspace(0, 1, embed_dim // num_heads // 2))
    return angle.repeat_interleave(2)


class _RotaryAngles(nn.Module):
    """The constructor PPMA's and RMT's position modules share: their arguments and the persistent
    RoPE ``angle`` buffer of their checkpoints."""

    def __init__(self, embed_dim: int, num_heads: int, initial_value: float, heads_range: float):
        super().__init__()
        self.initial_value = initial_value
        self.heads_range = heads_range
        self.num_heads = num_heads
        self.register_buffer("angle", _rope_angle(embed_dim, num_heads))


class RotaryPositionEmbedding2D(_RotaryAngles):
    """PPMA's rotary table: forward((H, W)) -> (sin, cos), each [H, W, key_dim]. ``angle`` is a
    persistent buffer, as in PPMA's checkpoints."""

    def forward(self, slen: Sequence[int], activate_recurrent: bool = False):
        if activate_recurrent:
            raise NotImplementedError("activate_recurrent: PPMA's recurrent form is not implemented "
                                      "(PPMA's own would fail: it reads a decay it never defines)")
        return _rope_tables(self.angle, slen)


class PathEmbeding2D(nn.Module):
    """PPMA's path embedding (its spelling): per token and head, the decays along the two polyline
    directions, log_alpha (along a row) and log_beta (down a column), each [B, H, W, heads]:

        (dt_alpha, dt_beta) = dt_linear(x of that head)            (head_dim -> 2, shared by all heads)
        log_alpha = softplus(dt_alpha + dt_bias[head]) * -exp(A_log[head])       (and likewise beta)

    PPMA turns them into dense [B, heads, N, N] (whole) or per-row / per-column (chunk) masks; here
    they go to the ops as they are. Parameters dt_linear, dt_bias, A_log, initialized as PPMA does.
    """

    def __init__(self, embed_dim: int, nheads: int, A_init_range=(1, 1.1), dt_min: float = 0.001,
                 dt_max: float = 0.1, dt_init_floor: float = 1e-4, bias: bool = False,
                 chunkwise_recurrent: bool = False):
        super().__init__()
        self.nheads = nheads
        self.chunkwise_recurrent = chunkwise_recurrent
        self.dt_linear = nn.Linear(embed_dim // nheads, 2, bias=bias)
        # dt log-uniform in [dt_min, dt_max] (floored), stored as softplus^-1(dt) so softplus(dt_bias) = dt.
        dt = torch.exp(torch.rand(nheads) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        dt = dt.clamp(min=dt_init_floor)
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))
        self.dt_bias._no_weight_decay = True
        if not (A_init_range[0] > 0 and A_init_range[1] >= A_init_range[0]):
            raise ValueError(f"A_init_range: expected 0 < low <= high, got {A_init_range}")
        self.A_log = nn.Parameter(torch.empty(nheads).uniform_(*A_init_range).log())
        self.A_log._no_weight_decay = True

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """x [B, H, W, C] -> (log_alpha, log_beta), each [B, H, W, heads]."""
        dt = self.dt_linear(x.unflatten(-1, (self.nheads, -1)))          # [B, H, W, heads, 2]
        A = -torch.exp(self.A_log)
        log_alpha = F.softplus(dt[..., 0] + self.dt_bias) * A
        log_beta = F.softplus(dt[..., 1] + self.dt_bias) * A
        return log_alpha, log_beta


class _RetentionProjections(nn.Module):
    """q_proj, k_proj, v_proj, lepe, out_proj and the init PPMA and RMT share (value_factor as theirs;
    their code supports only 1 for the LePE conv and the chunk form, and so does this)."""

    def __init__(self, embed_dim: int, num_heads: int, value_factor: int = 1, use_reference: bool = False):
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim: expected a multiple of num_heads ({num_heads}), got {embed_dim}")
        if value_factor != 1:
            raise ValueError(f"value_factor: expected 1 (the LePE conv has embed_dim channels), got {value_factor}")
        self.factor = value_factor
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.head_dim = embed_dim * value_factor // num_heads
        self.key_dim = embed_dim // num_heads
        self.scaling = self.key_dim ** -0.5
        self.use_reference = use_reference
        self.q_proj = nn.Linear(embed_dim, embed_dim, bias=True)
        self.k_proj = nn.Linear(embed_dim, embed_dim, bias=True)
        self.v_proj = nn.Linear(embed_dim, embed_dim * value_factor, bias=True)
        self.lepe = DWConv2d(embed_dim, 5, 1, 2)
        self.out_proj = nn.Linear(embed_dim * value_factor, embed_dim, bias=True)

    def reset_parameters(self):
        nn.init.xavier_normal_(self.q_proj.weight, gain=2 ** -2.5)
        nn.init.xavier_normal_(self.k_proj.weight, gain=2 ** -2.5)
        nn.init.xavier_normal_(self.v_proj.weight, gain=2 ** -2.5)
        nn.init.xavier_normal_(self.out_proj.weight)
        nn.init.constant_(self.out_proj.bias, 0.0)

    def _qkv(self, x, sin, cos):
        """q, k with RoPE [B, H, W, heads, key_dim]; v [B, H, W, heads, head_dim]; LePE of v.

        PPMA and RMT multiply k by scaling before the rotation; RoPE is linear, so that is the op's
        scale on the scores, and k goes in unscaled (one multiply fewer, same logits)."""
        v = self.v_proj(x)
        lepe = self.lepe(v)
        q = theta_shift(self.q_proj(x).unflatten(-1, (self.num_heads, -1)), sin, cos)
        k = theta_shift(self.k_proj(x).unflatten(-1, (self.num_heads, -1)), sin, cos)
        return q, k, v.unflatten(-1, (self.num_heads, -1)), lepe

    def _out(self, o, lepe):
        return self.out_proj(o.flatten(-2) + lepe)


# ---------------------------------------------------------------- PPMA
class _PolylinePathAttention(_RetentionProjections):
    """What PPMA's two forms share: the projections, LePE and out_proj, the path embedding of the
    decays, and forward(x, rel_pos) with rel_pos = (sin, cos) from RotaryPositionEmbedding2D. A
    form says which path embedding it has (chunkwise_recurrent, as PPMA names it) and how q, k, v
    attend under the decays (_attend)."""
    _chunkwise_recurrent = False

    def __init__(self, embed_dim: int, num_heads: int, value_factor: int = 1, use_reference: bool = False):
        super().__init__(embed_dim, num_heads, value_factor, use_reference)
        self.path_embed = PathEmbeding2D(embed_dim, num_heads, chunkwise_recurrent=self._chunkwise_recurrent)
        self.reset_parameters()

    def forward(self, x: torch.Tensor, rel_pos) -> torch.Tensor:
        sin, cos = rel_pos
        log_alpha, log_beta = self.path_embed(x)
        q, k, v, lepe = self._qkv(x, sin, cos)
        return self._out(self._attend(q, k, v, log_alpha, log_beta), lepe)


class MambaAttentionAllDouble(_PolylinePathAttention):
    """PPMA's "whole" attention on x [B, H, W, C]: the symmetric polyline-path masked attention,
    0.5 softmax(q k^T s + logM) v + 0.5 softmax(q k^T s + logM^T) v, on
    torch.ops.vitk.polyline_attention (the [B, heads, N, N] mask is never built), then + LePE(v)
    and out_proj. forward(x, rel_pos) with rel_pos = (sin, cos) from RotaryPositionEmbedding2D."""

    def _attend(self, q, k, v, log_alpha, log_beta):
        return _pick(self.use_reference, "polyline_attention")(q, k, v, log_alpha, log_beta, self.scaling, True)


class MambaAttentionChunkDouble(_PolylinePathAttention):
    """PPMA's "chunk" (criss-cross) attention on x [B, H, W, C]: with A_w attention within each row
    (decays log_alpha) and A_h within each column (log_beta), 0.5 A_h(A_w v) + 0.5 A_w(A_h v), on
    torch.ops.vitk.axial_decay_attention, then + LePE(v) and out_proj. Same contract as the whole form."""
    _chunkwise_recurrent = True

    def _attend(self, q, k, v, log_alpha, log_beta):
        return _pick(self.use_reference, "axial_decay_attention")(q, k, v, log_alpha, log_beta, self.scaling)


# ---------------------------------------------------------------- RMT
def rmt_decay(num_heads: int, initial_value: float, heads_range: float) -> torch.Tensor:
    """RMT's per-head log decay log(1 - 2^(-initial_value - heads_range * h / num_heads)), fp32 as RMT."""
    h = torch.arange(num_heads, dtype=torch.float)
    return torch.log(1 - 2 ** (-initial_value - heads_range * h / num_heads))


class RetNetRelPos2d(_RotaryAngles):
    """RMT's relative position: buffers ``angle`` (RoPE) and ``decay`` (log gamma per head), both
    persistent as in RMT's checkpoints. forward((H, W)) -> ((sin, cos), decay): RMT returns the dense
    [heads, N, N] Manhattan mask there; the fused block needs only the [heads] decay it is made of."""

    def __init__(self, embed_dim: int, num_heads: int, initial_value: float, heads_range: float):
        super().__init__(embed_dim, num_heads, initial_value, heads_range)
        self.register_buffer("decay", rmt_decay(num_heads, initial_value, heads_range))

    def forward(self, slen: Sequence[int], activate_recurrent: bool = False, chunkwise_recurrent: bool = False):
        if activate_recurrent or chunkwise_recurrent:
            raise NotImplementedError("only RMT's whole (parallel) form is implemented")
        return _rope_tables(self.angle, slen), self.decay


class VisionRetentionAll(_RetentionProjections):
    """RMT's Manhattan self-attention (whole form) on x [B, H, W, C]:
    softmax(q k^T s + log_gamma_h (|dy| + |dx|)) v + LePE(v), out_proj, on the polyline op with a
    per-head constant decay (vitkernels.manhattan_attention). rel_pos = ((sin, cos), decay) with
    decay the [heads] log gamma of RetNetRelPos2d (not RMT's dense [heads, N, N] mask)."""

    def __init__(self, embed_dim: int, num_heads: int, value_factor: int = 1, use_reference: bool = False):
        super().__init__(embed_dim, num_heads, value_factor, use_reference)
        self.reset_parameters()

    def forward(self, x: torch.Tensor, rel_pos, chunkwise_recurrent: bool = False, incremental_state=None):
        if chunkwise_recurrent or incremental_state is not None:
            raise NotImplementedError("only RMT's whole (parallel) form is implemented")
        (sin, cos), decay = rel_pos
        if decay.dim() != 1 or decay.shape[0] != self.num_heads:
            raise ValueError(f"rel_pos: expected the [heads] = [{self.num_heads}] log decay of RetNetRelPos2d, "
                             f"got a tensor of shape {list(decay.shape)} (RMT's dense mask is not accepted)")
        q, k, v, lepe = self._qkv(x, sin, cos)
        o = _pick(self.use_reference, "manhattan_attention")(q, k, v, decay.to(q.dtype), self.scaling)
        return self._out(o, lepe)


# ---------------------------------------------------------------- Gaussian-mixture mask (GMM-ViT)
class GaussianMixtureMask(nn.Module):
    """The mixture of "RetNet viewed through convolution" (its Gaussian_Mixture_Mask): parameters
    ``alpha`` and ``sigma`` [num_kernals, heads, 1, 1] (its shapes and init), mask
    G_h = sum_m alpha[m, h] exp(-d^2 / (2 (sigma[m, h]^2 + 1e-5))), d the grid distance. The
    original also holds its [1, 1, N, N] distance table as a parameter ``mask``; that is recomputed
    on the fly by the op, and dropped from incoming state dicts."""

    def __init__(self, num_heads: int, num_kernals: int):
        super().__init__()
        self.num_kernals = num_kernals
        self.sigma = nn.Parameter(torch.randn(num_kernals, num_heads, 1, 1) * 10 + 10)
        self.alpha = nn.Parameter(torch.randn(num_kernals, num_heads, 1, 1) * 2)

    def mixture(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """(mix_weight, mix_sigma), each [heads, M], as the op takes them (views, no copy)."""
        return self.alpha.flatten(1).t(), self.sigma.flatten(1).t()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        state_dict.pop(prefix + "mask", None)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def _gmm_attention(use_reference, q, k, v, mix_weight, mix_sigma, scale):
    return _pick(use_reference, "gaussian_mask_attention")(q, k, v, mix_weight, mix_sigma, scale)


class GMMAttention(nn.Module):
    """The GMM-ViT attention of "RetNet viewed through convolution" (its models/vit.py Attention with
    is_GMM=True): to_qkv (no bias), to_out (Linear + Dropout, or Identity for one head of the full
    width), mask (GaussianMixtureMask). softmax((q k^T / sqrt(dim_head)) * G_h) v on
    torch.ops.vitk.gaussian_mask_attention.

    Class token: the paper's GMM models have none (its ViT drops the class token when the mask is on
    and mean-pools), and neither does this block: x [B, N, C] holds exactly the H x W grid tokens,
    row-major; forward(x, feat_size=None) takes the grid from feat_size or sqrt(N) as the paper does.
    Its attention dropout is absent there too."""

    def __init__(self, dim: int, num_patches: Optional[int] = None, heads: int = 8, dim_head: int = 64,
                 dropout: float = 0.0, num_kernals: int = 3, use_reference: bool = False):
        super().__init__()
        inner_dim = dim_head * heads
        project_out = not (heads == 1 and dim_head == dim)
        self.num_kernals = num_kernals
        self.num_patches = num_patches
        self.heads = heads
        self.scale = dim_head ** -0.5
        self.dim = dim
        self.inner_dim = inner_dim
        self.use_reference = use_reference
        self.to_qkv = nn.Linear(dim, inner_dim * 3, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner_dim, dim), nn.Dropout(dropout)) if project_out else nn.Identity()
        self.mask = GaussianMixtureMask(num_heads=heads, num_kernals=num_kernals)

    def forward(self, x: torch.Tensor, feat_size: Optional[Sequence[int]] = None) -> torch.Tensor:
        B, N, _ = x.shape
        H, W = _grid(feat_size, N)
        # The paper chunks to_qkv's output into q | k | v, each (heads, dim_head) channel-major.
        q, k, v = self.to_qkv(x).view(B, H, W, 3, self.heads, -1).unbind(3)
        weight, sigma = self.mask.mixture()
        o = _gmm_attention(self.use_reference, q, k, v, weight, sigma, self.scale)
        return self.to_out(o.reshape(B, N, self.inner_dim))


def _check_heads(dim: int, num_heads: int, attn_drop: float) -> None:
    if dim % num_heads:
        raise ValueError(f"dim: expected a multiple of num_heads ({num_heads}), got {dim}")
    if attn_drop:
        raise NotImplementedError(f"attn_drop={attn_drop}: the fused op has no attention dropout")


class GMMViTAttention(nn.Module):
    """A timm ViT Attention (qkv, q_norm, k_norm, attn_drop, proj, proj_drop; timm's names, so a
    timm checkpoint's attention weights load) with a Gaussian-mixture mask multiplying the scaled
    scores: parameters ``mix_weight`` and ``mix_sigma`` [heads, M] (M = num_kernals), initialized
    as the paper's alpha and sigma. New parameters, so a plain timm checkpoint loads with strict=False.

    Class token: the op covers the grid tokens only (the mask is defined between grid positions);
    this block takes x [B, H*W, C] without class or register tokens and raises otherwise. A ViT
    with a class token needs a rule for it that no paper here defines, so none is invented.
    """

    def __init__(self, dim: int, num_heads: int = 8, num_kernals: int = 5, qkv_bias: bool = False,
                 qk_norm: bool = False, attn_drop: float = 0.0, proj_drop: float = 0.0,
                 norm_layer=nn.LayerNorm, use_reference: bool = False):
        super().__init__()
        _check_heads(dim, num_heads, attn_drop)
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.use_reference = use_reference
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.q_norm = norm_layer(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = norm_layer(self.head_dim) if qk_norm else nn.Identity()
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.mix_weight = nn.Parameter(torch.randn(num_heads, num_kernals) * 2)
        self.mix_sigma = nn.Parameter(torch.randn(num_heads, num_kernals) * 10 + 10)

    def forward(self, x: torch.Tensor, feat_size: Optional[Sequence[int]] = None) -> torch.Tensor:
        B, N, C = x.shape
        H, W = _grid(feat_size, N)
        q, k, v = self.qkv(x).view(B, H, W, 3, self.num_heads, self.head_dim).unbind(3)
        q, k = self.q_norm(q), self.k_norm(k)
        o = _gmm_attention(self.use_reference, q, k, v, self.mix_weight, self.mix_sigma, self.scale)
        return self.proj_drop(self.proj(o.reshape(B, N, C)))


# ---------------------------------------------------------------- PVTv2
class SpatialReductionAttention(nn.Module):
    """timm's PVTv2 Attention (pvt_v2.py): q, kv, attn_drop, proj, proj_drop, and for sr_ratio > 1
    sr (Conv2d, kernel = stride = sr_ratio) + norm; with linear_attn, pool (adaptive average to 7 x 7)
    + sr (1 x 1 conv) + norm + act. Attention of every query against the reduced keys on
    torch.ops.vitk.reduced_attention. forward(x [B, N, C], feat_size (H, W)) -> [B, N, C]."""

    def __init__(self, dim: int, num_heads: int = 8, sr_ratio: int = 1, linear_attn: bool = False,
                 qkv_bias: bool = True, attn_drop: float = 0.0, proj_drop: float = 0.0, use_reference: bool = False):
        super().__init__()
        _check_heads(dim, num_heads, attn_drop)
        self.dim = dim
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.use_reference = use_reference
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, dim * 2, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        if not linear_attn:
            self.pool = None
            if sr_ratio > 1:
                self.sr = nn.Conv2d(dim, dim, kernel_size=sr_ratio, stride=sr_ratio)
                self.norm = nn.LayerNorm(dim)
            else:
                self.sr = None
                self.norm = None
            self.act = None
        else:
            self.pool = nn.AdaptiveAvgPool2d(7)
            self.sr = nn.Conv2d(dim, dim, kernel_size=1, stride=1)
            self.norm = nn.LayerNorm(dim)
            self.act = nn.GELU()

    def _reduced(self, x, H, W):
        if self.sr is None:
            return x
        img = x.transpose(1, 2).unflatten(-1, (H, W))
        if self.pool is not None:
            img = self.pool(img)
        r = self.norm(self.sr(img).flatten(2).transpose(1, 2))
        return self.act(r) if self.act is not None else r

    def forward(self, x: torch.Tensor, feat_size: Sequence[int]) -> torch.Tensor:
        B, N, C = x.shape
        H, W = _grid(feat_size, N)
        q = self.q(x).unflatten(-1, (self.num_heads, self.head_dim))
        k, v = self.kv(self._reduced(x, H, W)).unflatten(-1, (2, self.num_heads, self.head_dim)).unbind(2)
        o = _pick(self.use_reference, "reduced_attention")(q, k, v, self.scale)
        return self.proj_drop(self.proj(o.reshape(B, N, C)))


# ---------------------------------------------------------------- S2AFormer
class StripSelfAttention(nn.Module):
    """S2AFormer's strip self-attention (SSA) on x [B, H, W, C], following the paper (arXiv
    2505.22195); no official code exists, so these are assumptions, each chosen as the simplest
    reading of the paper's text and figure:

    - Spatial reduction of k and v: a depth-wise Conv2d with kernel = stride = sr_ratio (``sr``;
      the paper reduces "by convolution" and ablates it against pooling), then LayerNorm (``norm``),
      PVT's pattern. sr_ratio = 1 skips both.
    - Channel compression of q and k: 1 x 1 convolutions, i.e. per-token linear maps (``q``, ``k``),
      from C to heads * dqk channels; q from the full-resolution x, k from the reduced map. dqk
      (``qk_dim`` per head) is small, 1 in the paper's "strip" extreme; default 8.
    - v: a linear map (``v``) of the reduced map to the full C channels, dv = C / heads per head.
    - Scores q k^T * dqk^-0.5 (the scale of the compressed dim), softmax over the Nk = (H // sr) x (W // sr)
      reduced tokens (the conv drops a remainder row / column), times v; heads concatenated, then
      ``proj`` (Linear C -> C).
    - Biases on q, k, v, proj; no dropout.
    The attention itself is torch.ops.vitk.reduced_attention (dqk != dv). forward(x) -> [B, H, W, C].
    """

    def __init__(self, dim: int, num_heads: int = 1, qk_dim: int = 8, sr_ratio: int = 8, use_reference: bool = False):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim: expected a multiple of num_heads ({num_heads}), got {dim}")
        self.dim = dim
        self.num_heads = num_heads
        self.qk_dim = qk_dim
        self.sr_ratio = sr_ratio
        self.scale = qk_dim ** -0.5
        self.use_reference = use_reference
        self.q = nn.Linear(dim, num_heads * qk_dim)
        self.k = nn.Linear(dim, num_heads * qk_dim)
        self.v = nn.Linear(dim, dim)
        if sr_ratio > 1:
            self.sr = nn.Conv2d(dim, dim, kernel_size=sr_ratio, stride=sr_ratio, groups=dim)
            self.norm = nn.LayerNorm(dim)
        else:
            self.sr = None
            self.norm = None
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        q = self.q(x).reshape(B, H * W, self.num_heads, self.qk_dim)
        r = x if self.sr is None else self.norm(self.sr(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1))
        r = r.reshape(B, -1, C)
        k = self.k(r).unflatten(-1, (self.num_heads, self.qk_dim))
        v = self.v(r).unflatten(-1, (self.num_heads, -1))
        o = _pick(self.use_reference, "reduced_attention")(q, k, v, self.scale)
        return self.proj(o.reshape(B, H, W, C))


class LocalInteractionModule(nn.Module):
    """S2AFormer's LIM, as assumed here: 3 x 3 depth-wise conv (``dwconv``), GELU, 1 x 1 conv
    (``pwconv``, a Linear), on x [B, H, W, C]. The paper describes it as a light local-mixing module
    that keeps boundary detail; its exact layers are not published."""

    def __init__(self, dim: int):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 3, 1, 1, groups=dim)
        self.act = nn.GELU()
        self.pwconv = nn.Linear(dim, dim)

    def forward(self, x):
        return self.pwconv(self.act(self.dwconv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)))


class HybridPerceptionBlock(nn.Module):
    """S2AFormer's hybrid perception block (HPB) on x [B, H, W, C], the paper's four residual steps:

        x = x + DWConv(x)                 (``dwconv``: 3 x 3 depth-wise)
        x = x + SSA(LN(x))                (``norm1``, ``attn``: StripSelfAttention)
        x = x + LIM(LN(x))                (``norm2``, ``lim``: LocalInteractionModule, assumed layers)
        x = x + MLP(LN(x))                (``norm3``, ``mlp``: fc1, GELU, fc2; hidden = mlp_ratio * C)

    Assumed beyond the paper's equations: LayerNorm eps 1e-6, mlp_ratio 4, no drop path, no layer
    scale. use_reference is the attention's (``block.attn.use_reference``).
    """

    def __init__(self, dim: int, num_heads: int = 1, qk_dim: int = 8, sr_ratio: int = 8, mlp_ratio: float = 4.0,
                 use_reference: bool = False):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 3, 1, 1, groups=dim)
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = StripSelfAttention(dim, num_heads, qk_dim, sr_ratio, use_reference)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.lim = LocalInteractionModule(dim)
        self.norm3 = nn.LayerNorm(dim, eps=1e-6)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential()
        self.mlp.add_module("fc1", nn.Linear(dim, hidden))
        self.mlp.add_module("act", nn.GELU())
        self.mlp.add_module("fc2", nn.Linear(hidden, dim))

    @property
    def use_reference(self) -> bool:
        return self.attn.use_reference

    @use_reference.setter
    def use_reference(self, value: bool):
        self.attn.use_reference = value

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.dwconv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        x = x + self.attn(self.norm1(x))
        x = x + self.lim(self.norm2(x))
        return x + self.mlp(self.norm3(x))


__all__ = ["rotate_every_two", "theta_shift", "DWConv2d", "RotaryPositionEmbedding2D", "PathEmbeding2D",
           "MambaAttentionAllDouble", "MambaAttentionChunkDouble", "rmt_decay", "RetNetRelPos2d",
           "VisionRetentionAll", "GaussianMixtureMask", "GMMAttention", "GMMViTAttention",
           "SpatialReductionAttention", "StripSelfAttention", "LocalInteractionModule", "HybridPerceptionBlock"]
