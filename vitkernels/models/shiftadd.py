"""ShiftAddViT's blocks (pvt/pvt_v2.py, pvt/fmoe_fc.py, pvt/fmoe_new.py) on the shiftadd ops, with the
official module structure and parameter names, so the official state dicts load unchanged.

- LinAngularAttention_binary: qkv, the binary MatAdd core (binary_linear_attention), the depthwise
  (res_kernel_size, 1) convolution `dconv` of v as a residual, proj.
- NaiveGate (top-k of a Linear `gate`; top-1 gates are 1) and NoisyGate (w_gate, w_noise, noisy top-k
  with the cv^2 importance and load losses, expert 0's and expert 1's terms weighted 6 and 4 as in the
  official code, here the arguments mult_weight and shift_weight).
- PyTorchFMoE_FC: a mixture of a multiplication expert (nn.Linear) and a shift expert, routed per
  token: expert_dispatch, each expert on its contiguous range of rows, expert_combine with the gate.
  The official SparseDispatcher combines in log space (log(exp(y) * gate + eps)), which is y * gate
  up to that eps (and overflows for y > 88 in float32); here the combine is y * gate.
- Mlp_FMoE (fc1, dwconv, act, fc2 as MoE layers), Block and PVTv2Stage: a PVTv2-b0 stage (patch
  embedding, blocks, norm) built from them.

The shift expert is given as a factory ``shift_expert(in_features, out_features, bias) -> nn.Module``;
the default, ``shift_linear_expert``, is DeepShift-PS's LinearShift as the official code trains it: a
trainable ``ShiftLinear`` (vitkernels.models.lowbit: ``shift`` and ``sign`` parameters, rounded
straight-through), started from nn.Linear's initialization. ``freeze_shift_experts(model)`` packs every
one of them into 4-bit shift codes for inference (the same function of x, run by the shift_linear op).

``shift_ratio`` (the share of tokens routed to the shift expert, expert 1, in the last forward) is kept
as a tensor, so that a compiled forward does not synchronize; the gates, MoE layers, MLPs, blocks and
stages report it as a float (a mean over their MoE layers). The official NaiveGate counts the sorted
indices of every expert, which always gives 1.0; here both gates count the chosen experts as NoisyGate
does.
"""
import math
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..ops import shiftadd as _ops
from ..reference import shiftadd as _ref
from .lowbit import ShiftLinear
from .window_attention import DropPath

ExpertFactory = Callable[[int, int, bool], nn.Module]


def shift_linear_expert(in_features: int, out_features: int, bias: bool = True) -> ShiftLinear:
    """The default shift expert: a trainable ShiftLinear (DeepShift-PS) whose signed powers of two and
    per-channel scale round nn.Linear's default initialization."""
    return ShiftLinear.from_float(nn.Linear(in_features, out_features, bias=bias), trainable=True)


def freeze_shift_experts(model: nn.Module) -> nn.Module:
    """Packs every trainable ShiftLinear of model into its inference form (4-bit codes, shift_linear op), in
    place; returns model."""
    for m in model.modules():
        if isinstance(m, ShiftLinear):
            m.freeze()
    return model


def mean_shift_ratio(model: nn.Module) -> Optional[float]:
    """The mean shift_ratio over model's gates that routed in their last forward (None: none did)."""
    ratios = [m.shift_ratio for m in model.modules() if isinstance(m, _Gate)]
    ratios = [r for r in ratios if r is not None]
    return sum(ratios) / len(ratios) if ratios else None


class LinAngularAttention_binary(nn.Module):  # noqa: N801 - the official name
    def __init__(self, dim, num_heads=8, qkv_bias=False, qk_scale=None, attn_drop=0.0, proj_drop=0.0,
                 res_kernel_size=9, sr_ratio=1, linear=False, use_reference=False):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim: expected a multiple of num_heads={num_heads}, got {dim}")
        self.num_heads = num_heads
        head_dim = dim // num_heads
        self.scale = head_dim ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.dconv = nn.Conv2d(num_heads, num_heads, kernel_size=(res_kernel_size, 1),
                               padding=(res_kernel_size // 2, 0), bias=False, groups=num_heads)
        self.use_reference = use_reference

    def forward(self, x, H, W):
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).unbind(2)
        attend = _ref.binary_linear_attention if self.use_reference else _ops.binary_linear_attention
        out = attend(q, k, v)                                         # [B, N, heads, d]
        out = out + self.dconv(v.transpose(1, 2)).transpose(1, 2)     # the conv runs along the tokens
        return self.proj_drop(self.proj(out.reshape(B, N, C)))


# ---------------------------------------------------------------- gates
class _Gate(nn.Module):
    def __init__(self, num_expert, world_size, top_k):
        super().__init__()
        if top_k != 1:
            raise ValueError(f"top_k: expected 1 (ShiftAddViT routes each token to one expert), got {top_k}")
        self.num_expert = num_expert
        self.world_size = world_size
        self.tot_expert = num_expert * world_size
        self.top_k = top_k
        self.loss = None
        self._shift_ratio = None

    def set_loss(self, loss):
        self.loss = loss

    def get_loss(self, clear=True):
        loss = self.loss
        if clear:
            self.loss = None
        return loss

    @property
    def has_loss(self):
        return self.loss is not None

    @property
    def shift_ratio(self) -> Optional[float]:
        return None if self._shift_ratio is None else float(self._shift_ratio)

    def forward(self, inp):
        """The official interface: dense gates [T, E], the chosen expert's gate in each row."""
        index, gate = self.route(inp)
        return torch.zeros(inp.shape[0], self.tot_expert, dtype=gate.dtype, device=inp.device).scatter(
            1, index[:, None], gate[:, None])

    def _chosen(self, index):
        self._shift_ratio = (index != 0).sum() / max(index.shape[0], 1)


class NaiveGate(_Gate):
    def __init__(self, d_model, num_expert, world_size=1, top_k=1, _print=False):
        super().__init__(num_expert, world_size, top_k)
        self.gate = nn.Linear(d_model, self.tot_expert)
        self.d_model = d_model

    def route(self, inp):
        """(expert index [T] int64, gate [T]): the highest logit's expert (the first among equal ones), gate 1."""
        index = self.gate(inp).argmax(-1)
        self._chosen(index)
        return index, torch.ones(index.shape, dtype=torch.float32, device=inp.device)


def cv_squared(x: torch.Tensor) -> torch.Tensor:
    """The squared coefficient of variation of x (0 for a single value), as the official gate computes it."""
    if x.shape[0] == 1:
        return torch.zeros((), device=x.device)
    return x.float().var() / (x.float().mean() ** 2 + 1e-10)


class NoisyGate(_Gate):
    def __init__(self, d_model, num_expert, world_size=1, top_k=1, _print=False, mult_weight=6.0, shift_weight=4.0):
        super().__init__(num_expert, world_size, top_k)
        self.w_gate = nn.Parameter(torch.zeros(d_model, self.tot_expert))
        self.w_noise = nn.Parameter(torch.zeros(d_model, self.tot_expert))
        self.softplus = nn.Softplus()
        self.softmax = nn.Softmax(1)
        self.noise_epsilon = 1e-2
        self.mult_weight, self.shift_weight = mult_weight, shift_weight
        nn.init.kaiming_uniform_(self.w_gate, a=math.sqrt(5))
        nn.init.kaiming_uniform_(self.w_noise, a=math.sqrt(5))

    def _latency_weighted(self, x):
        w = torch.ones_like(x)
        w[0], w[1] = self.mult_weight, self.shift_weight
        return x * w

    def route(self, inp):
        """Noisy top-1 routing; sets the load-balancing loss cv^2(importance) + cv^2(load), both weighted per
        expert by latency (mult_weight, shift_weight)."""
        clean_logits = inp @ self.w_gate
        noise_stddev = self.softplus(inp @ self.w_noise) + self.noise_epsilon
        noisy_logits = clean_logits + torch.randn_like(clean_logits) * noise_stddev
        m = min(self.top_k + 1, self.tot_expert)
        top_logits, top_indices = noisy_logits.topk(m, dim=1)
        gate = self.softmax(top_logits[:, :1]).squeeze(1)
        index = top_indices[:, 0]
        self._chosen(index)
        importance = torch.zeros_like(clean_logits).scatter(1, index[:, None], gate[:, None]).sum(0)
        if self.top_k < self.tot_expert:
            # The probability of each expert being in the top k under fresh noise (the official helper).
            threshold_in = top_logits[:, self.top_k:self.top_k + 1]
            threshold_out = top_logits[:, self.top_k - 1:self.top_k]
            is_in = noisy_logits > threshold_in
            prob_in = torch.special.ndtr((clean_logits - threshold_in) / noise_stddev)
            prob_out = torch.special.ndtr((clean_logits - threshold_out) / noise_stddev)
            load = torch.where(is_in, prob_in, prob_out).sum(0)
        else:
            load = (importance > 0).sum(0).float()
        self.set_loss(cv_squared(self._latency_weighted(importance)) + cv_squared(self._latency_weighted(load)))
        return index, gate


# ---------------------------------------------------------------- mixture-of-experts layers
class PyTorchFMoE_FC(nn.Module):  # noqa: N801 - the official name
    """A Linear whose tokens are routed to a multiplication expert (experts[0], nn.Linear) or a shift
    expert (experts[1], from ``shift_expert``): dispatch, each expert on its contiguous rows, combine."""

    def __init__(self, d_model, d_hidden, num_expert=2, bias=True, world_size=1, top_k=1, gate=NaiveGate,
                 _print=False, shift_expert: Optional[ExpertFactory] = None, use_reference=False):
        super().__init__()
        if num_expert != 2:
            raise ValueError(f"num_expert: expected 2 (a multiplication and a shift expert), got {num_expert}")
        shift_expert = shift_linear_expert if shift_expert is None else shift_expert
        if not callable(shift_expert):
            raise ValueError("shift_expert: expected a factory (in_features, out_features, bias) -> nn.Module, "
                             f"got {type(shift_expert).__name__}")
        self.num_expert = num_expert
        self.d_model, self.d_hidden = d_model, d_hidden
        self.gate_type = gate
        self.gate = gate(d_model, num_expert, world_size, top_k, _print=_print)
        self.top_k = top_k
        self.experts = nn.ModuleList([nn.Linear(d_model, d_hidden, bias=bias), shift_expert(d_model, d_hidden, bias)])
        self.use_reference = use_reference

    def forward(self, inp, shift_ratio=None):
        B, N, C = inp.shape
        x = inp.reshape(-1, self.d_model)
        index, gate = self.gate.route(x)
        ops = _ref if self.use_reference else _ops
        x_sorted, offsets, order = ops.expert_dispatch(x, index, self.num_expert)
        # The first and last offsets are 0 and T; the inner ones are data (unbacked sizes under
        # torch.compile), checked to be ordered, so the experts' row counts add up to T symbolically.
        T = x_sorted.shape[0]
        bounds = [0] + [offsets[e].item() for e in range(1, self.num_expert)] + [T]
        ys = []
        for e, expert in enumerate(self.experts):
            lo, hi = bounds[e], bounds[e + 1]
            torch._check(lo >= 0)
            torch._check(hi >= lo)
            torch._check(hi <= T)
            ys.append(expert(x_sorted.narrow(0, lo, hi - lo)))
        y = ops.expert_combine(torch.cat(ys), order, gate.to(x.dtype))
        return y.reshape(B, N, self.d_hidden)

    @property
    def shift_ratio(self) -> Optional[float]:
        return self.gate.shift_ratio


class DWConv(nn.Module):
    def __init__(self, dim=768):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 3, 1, 1, bias=True, groups=dim)

    def forward(self, x, H, W):
        B, N, C = x.shape
        x = self.dwconv(x.transpose(1, 2).reshape(B, C, H, W))
        return x.flatten(2).transpose(1, 2)


class Mlp_FMoE(nn.Module):  # noqa: N801 - the official name
    def __init__(self, d_model, d_hidden=None, out_features=None, activation=nn.GELU, drop=0.0, linear=False,
                 world_size=1, top_k=1, gate=NoisyGate, shift_expert: Optional[ExpertFactory] = None,
                 use_reference=False):
        super().__init__()
        out_features = out_features or d_model
        d_hidden = d_hidden or d_model
        kw = dict(gate=gate, shift_expert=shift_expert, use_reference=use_reference)
        self.fc1 = PyTorchFMoE_FC(d_model, d_hidden, **kw)
        self.dwconv = DWConv(d_hidden)
        self.act = activation()
        self.fc2 = PyTorchFMoE_FC(d_hidden, out_features, **kw)
        self.drop = nn.Dropout(drop)
        self.linear = linear
        if linear:
            self.relu = nn.ReLU(inplace=True)

    def forward(self, x, H, W):
        x = self.fc1(x)
        if self.linear:
            x = self.relu(x)
        x = self.drop(self.act(self.dwconv(x, H, W)))
        return self.drop(self.fc2(x))

    def gate_loss(self):
        """The sum of both layers' load-balancing losses (NoisyGate), clearing them; None with NaiveGate."""
        losses = [loss for loss in (self.fc1.gate.get_loss(), self.fc2.gate.get_loss()) if loss is not None]
        return sum(losses) if losses else None

    @property
    def shift_ratio(self) -> Optional[float]:
        return mean_shift_ratio(self)


class Block(nn.Module):
    """A ShiftAddViT block: binary linear attention and the MoE MLP (NaiveGate, as the official Block)."""

    def __init__(self, dim, num_heads, mlp_ratio=4.0, qkv_bias=False, qk_scale=None, drop=0.0, attn_drop=0.0,
                 drop_path=0.0, act_layer=nn.GELU, norm_layer=nn.LayerNorm, sr_ratio=1, linear=False,
                 gate=NaiveGate, shift_expert: Optional[ExpertFactory] = None, use_reference=False):
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = LinAngularAttention_binary(dim, num_heads=num_heads, qkv_bias=qkv_bias, qk_scale=qk_scale,
                                               attn_drop=attn_drop, proj_drop=drop, sr_ratio=sr_ratio, linear=linear,
                                               use_reference=use_reference)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp_FMoE(d_model=dim, d_hidden=int(dim * mlp_ratio), activation=act_layer, drop=drop,
                            linear=linear, gate=gate, shift_expert=shift_expert, use_reference=use_reference)

    def forward(self, x, H, W):
        x = x + self.drop_path(self.attn(self.norm1(x), H, W))
        return x + self.drop_path(self.mlp(self.norm2(x), H, W))

    @property
    def shift_ratio(self) -> Optional[float]:
        return mean_shift_ratio(self)


class OverlapPatchEmbed(nn.Module):
    def __init__(self, patch_size=7, stride=4, in_chans=3, embed_dim=768):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=stride, padding=patch_size // 2)
        self.norm = nn.LayerNorm(embed_dim)

    def forward(self, x):
        x = self.proj(x)
        _, _, H, W = x.shape
        return self.norm(x.flatten(2).transpose(1, 2)), H, W


class PVTv2Stage(nn.Module):
    """Stage i of PyramidVisionTransformerV2 as the official model registers it (patch_embed{i},
    block{i}, norm{i}), here under the names patch_embed, block and norm: [B, C_in, H, W] ->
    [B, C, H / stride, W / stride]. PVTv2-b0: embed_dims 32, 64, 160, 256, heads 1, 2, 5, 8, depths 2, 2,
    2, 2, mlp ratio 8; stage 1 has patch 7 and stride 4, the others patch 3 and stride 2."""

    def __init__(self, in_chans, embed_dim, num_heads, depth, mlp_ratio=8.0, first=False, qkv_bias=True,
                 drop_path=(), gate=NaiveGate, shift_expert: Optional[ExpertFactory] = None, use_reference=False):
        super().__init__()
        self.patch_embed = OverlapPatchEmbed(7 if first else 3, 4 if first else 2, in_chans, embed_dim)
        dpr = list(drop_path) or [0.0] * depth
        self.block = nn.ModuleList([
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias=qkv_bias, drop_path=dpr[j], gate=gate,
                  shift_expert=shift_expert, use_reference=use_reference)
            for j in range(depth)])
        self.norm = nn.LayerNorm(embed_dim)

    def forward(self, x):
        x, H, W = self.patch_embed(x)
        for blk in self.block:
            x = blk(x, H, W)
        x = self.norm(x)
        return x.reshape(x.shape[0], H, W, -1).permute(0, 3, 1, 2).contiguous()

    @property
    def shift_ratio(self) -> Optional[float]:
        return mean_shift_ratio(self)


PVT_V2_B0 = dict(embed_dims=(32, 64, 160, 256), num_heads=(1, 2, 5, 8), depths=(2, 2, 2, 2), mlp_ratios=(8, 8, 4, 4))


def pvt_v2_b0_stage(i: int, shift_expert: Optional[ExpertFactory] = None, **kw) -> PVTv2Stage:
    """Stage i (1 to 4) of PVTv2-b0 as ShiftAddViT builds it."""
    c = PVT_V2_B0
    return PVTv2Stage(3 if i == 1 else c["embed_dims"][i - 2], c["embed_dims"][i - 1], c["num_heads"][i - 1],
                      c["depths"][i - 1], c["mlp_ratios"][i - 1], first=i == 1, shift_expert=shift_expert, **kw)


__all__ = ["LinAngularAttention_binary", "NaiveGate", "NoisyGate", "PyTorchFMoE_FC", "Mlp_FMoE", "Block",
           "PVTv2Stage", "pvt_v2_b0_stage", "cv_squared", "shift_linear_expert", "freeze_shift_experts",
           "mean_shift_ratio"]
