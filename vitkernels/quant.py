"""From a float ViT to a real post-training-quantized one: calibrate, RepQ-ViT's LayerNorm
reparameterization, and ``quantize_`` (torchao-style: a config object, in place, with a report).

    state = calibrate(model, batches)                          # observers on a few float batches
    reparameterize_layernorm_(model, state)                    # optional, RepQ-ViT: no float output changes
    report = quantize_(model, Int8DynamicConfig(attn_bits=4), state)

Linear layers become the lowbit modules (vitkernels.models.lowbit): Int8DynamicConfig -> Int8Linear
(W8A8, activations per token), Int4WeightConfig -> Int4Linear, Int4Int8Config -> Int4Int8Linear,
ShiftWeightConfig -> ShiftLinear. With ``attn_bits`` set, every recognized dense attention (the
``Attention`` of vitkernels.models.vision_transformer and timm's ViT/DeiT ``Attention``: qkv, proj,
num_heads, identity q/k norms) runs ``quant_attention`` with the calibrated int8 scales and zero
points of q, k, v and the calibrated δ of the softmax quantizer. Swin's windowed attention keeps the
float ``window_attention`` (quant_attention has no window form): its linear layers are quantized and
the report says so. An MLP's activation (timm's ``Mlp``: fc1, act, drop, fc2) whose fc1 became a lowbit
module runs in fc1's epilogue (``activation="gelu"``, ``"gelu_tanh"`` or ``"relu"``), and ``act`` becomes
an Identity.

``simulate=True`` builds the fake-quant float model instead, from the references (what the papers
run): the same quantized weights, activations quantized by the reference quantizers, and the
reference quant_attention. The real model's logits match it up to fp32 rounding (tests/quant).
"""
import copy
import math
import types
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, Optional, Tuple

import torch
import torch.nn as nn

from .models import lowbit as lb
from .ops import quant_attention as _qa
from .reference import lowbit as _ref_lowbit
from .reference import quant_attention as _ref_qa

__all__ = ["QuantState", "QuantReport", "Int8DynamicConfig", "Int4WeightConfig", "Int4Int8Config", "ShiftWeightConfig",
           "calibrate", "reparameterize_layernorm_", "quantize_", "AttnQuantParams"]

ATTN_BASES = {"log_sqrt2": math.sqrt(2.0), "log2": 2.0}


# ---------------------------------------------------------------- configs
@dataclass(frozen=True)
class Int8DynamicConfig:
    """W8A8 linear layers (int8 weights per channel, activations int8 per token, dynamic); with
    ``attn_bits`` set, quantized attention too (needs a calibrated state). ``attn_quantizer`` picks the
    softmax quantizer: log_sqrt2 (RepQ-ViT), log2, or adalog with its learned base ``attn_base``."""
    attn_bits: Optional[int] = None
    attn_quantizer: str = "log_sqrt2"
    attn_base: Optional[float] = None
    symmetric: bool = True

    def base(self) -> float:
        if self.attn_quantizer in ATTN_BASES:
            return ATTN_BASES[self.attn_quantizer]
        if self.attn_quantizer != "adalog":
            raise ValueError(f"attn_quantizer: expected one of log_sqrt2, log2, adalog, got {self.attn_quantizer!r}")
        if self.attn_base is None or not self.attn_base > 1:
            raise ValueError(f"attn_base: adalog needs its learned base > 1, got {self.attn_base}")
        return float(self.attn_base)


@dataclass(frozen=True)
class Int4WeightConfig:
    """W4A16: 4-bit weights with a scale per group of ``group_size`` input channels."""
    group_size: int = 128
    symmetric: bool = True


@dataclass(frozen=True)
class Int4Int8Config:
    """W4A8: 4-bit weights per output channel, activations int8 per token."""


@dataclass(frozen=True)
class ShiftWeightConfig:
    """Power-of-two weights (DeepShift-PS, ShiftAddViT's shift layers)."""


# ---------------------------------------------------------------- state and report
@dataclass
class AttnQuantParams:
    """Per-tensor int8 scales and zero points of one attention's q, k, v, and δ of its softmax quantizer."""
    q_scale: float
    k_scale: float
    v_scale: float
    q_zero: int
    k_zero: int
    v_zero: int
    delta: float

    def as_tensor(self) -> torch.Tensor:
        return torch.tensor([self.q_scale, self.k_scale, self.v_scale, self.q_zero, self.k_zero, self.v_zero,
                             self.delta], dtype=torch.float64)

    @classmethod
    def from_tensor(cls, t: torch.Tensor) -> "AttnQuantParams":
        v = t.tolist()
        return cls(v[0], v[1], v[2], int(v[3]), int(v[4]), int(v[5]), v[6])


@dataclass
class QuantState:
    """What ``calibrate`` observed. attn: {attention module name: AttnQuantParams};
    layernorm: {LayerNorm name: (per-channel min, per-channel max) of its output}."""
    attn: Dict[str, AttnQuantParams] = field(default_factory=dict)
    layernorm: Dict[str, Tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    method: str = "minmax"


@dataclass
class QuantReport:
    """converted: {module name: what it became}; skipped: {module name: why not}."""
    converted: Dict[str, str] = field(default_factory=dict)
    skipped: Dict[str, str] = field(default_factory=dict)

    def __str__(self):
        lines = [f"vitkernels.quant.quantize_: {len(self.converted)} converted, {len(self.skipped)} skipped"]
        lines += [f"  converted {n or '<root>'}: {k}" for n, k in self.converted.items()]
        lines += [f"  skipped   {n or '<root>'}: {w}" for n, w in self.skipped.items()]
        if not self.converted and not self.skipped:
            lines.append("  (nothing to quantize: no nn.Linear and no recognized attention)")
        return "\n".join(lines)


# ---------------------------------------------------------------- recognizing attention
def _dense_attention_reason(m: nn.Module) -> Optional[str]:
    """None for a ViT-style dense attention quantize_ can run on quant_attention, else why not; a module
    that is no such attention at all gives ''."""
    if type(m).__name__ != "Attention" or not all(hasattr(m, a) for a in ("qkv", "proj", "num_heads")):
        return ""
    if not isinstance(m.qkv, nn.Module) or not hasattr(m.qkv, "out_features"):
        return "qkv is not a linear layer"
    if m.qkv.out_features % (3 * m.num_heads):
        return "qkv width not a multiple of 3 * num_heads"
    for norm in ("q_norm", "k_norm"):
        if not isinstance(getattr(m, norm, nn.Identity()), nn.Identity):
            return f"{norm} is not Identity (quant_attention quantizes q and k as projected)"
    if getattr(getattr(m, "attn_drop", None), "p", 0.0):
        return "attention dropout is non-zero"
    return None


def _head_dim(m) -> int:
    return m.qkv.out_features // (3 * m.num_heads)


def _softmax_scale(m) -> float:
    return float(getattr(m, "scale", _head_dim(m) ** -0.5))


def _split_qkv(m, x):
    B, N, _ = x.shape
    return m.qkv(x).view(B, N, 3, m.num_heads, _head_dim(m)).unbind(2)


# ---------------------------------------------------------------- calibration
class _Range:
    def __init__(self, method: str, percentile: float):
        self.method, self.pct, self.lo, self.hi = method, percentile, None, None

    def _stat(self, x: torch.Tensor, dim: Optional[int]):
        if self.method == "minmax":
            return (x.amin(), x.amax()) if dim is None else (x.amin(dim), x.amax(dim))
        flat = x.reshape(-1) if dim is None else x
        n = flat.shape[0]
        if n > (1 << 16):                        # torch.quantile's size limit: an even subsample
            flat = flat[torch.linspace(0, n - 1, 1 << 16).long()]
        p = self.pct / 100
        return torch.quantile(flat, 1 - p, dim=dim or 0), torch.quantile(flat, p, dim=dim or 0)

    def add(self, x: torch.Tensor, dim: Optional[int] = None):
        lo, hi = self._stat(x.detach().float(), dim)
        self.lo = lo if self.lo is None else torch.minimum(self.lo, lo)
        self.hi = hi if self.hi is None else torch.maximum(self.hi, hi)


def int8_params(lo: float, hi: float) -> Tuple[float, int]:
    """(scale, zero point) of an asymmetric int8 quantizer covering [lo, hi] (and 0):
    codes clamp(round(x / s) + z, -128, 127) span it."""
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    s = (hi - lo) / 255 if hi > lo else 1.0
    z = -128 - round(lo / s)
    return s, int(min(127, max(-128, z)))


@torch.no_grad()
def calibrate(model: nn.Module, batches: Iterable, *, method: str = "minmax", percentile: float = 99.99) -> QuantState:
    """Runs the float ``model`` on ``batches`` (tensors, or tuples of positional arguments) with observers,
    and returns the per-tensor int8 scales and zero points of q, k, v and δ (the largest softmax
    probability, or its ``percentile``) of every recognized attention, and the per-channel ranges of
    every LayerNorm's output (for reparameterize_layernorm_)."""
    if method not in ("minmax", "percentile"):
        raise ValueError(f"method: expected 'minmax' or 'percentile', got {method!r}")
    if not 0 < percentile <= 100:
        raise ValueError(f"percentile: expected a value in (0, 100], got {percentile}")
    obs: Dict[str, Dict[str, _Range]] = {}
    ln_obs: Dict[str, _Range] = {}
    hooks = []

    def attn_hook(name):
        def hook(m, args):
            q, k, v = _split_qkv(m, args[0])
            o = obs.setdefault(name, {t: _Range(method, percentile) for t in ("q", "k", "v", "p")})
            o["q"].add(q)
            o["k"].add(k)
            o["v"].add(v)
            s = _softmax_scale(m) * (q.transpose(1, 2) @ k.transpose(1, 2).transpose(-1, -2))
            o["p"].add(torch.softmax(s.float(), -1))
        return hook

    def ln_hook(name):
        def hook(m, args, out):
            ln_obs.setdefault(name, _Range(method, percentile)).add(out.reshape(-1, out.shape[-1]), dim=0)
        return hook

    for name, m in model.named_modules():
        if _dense_attention_reason(m) is None:
            hooks.append(m.register_forward_pre_hook(attn_hook(name)))
        if isinstance(m, nn.LayerNorm):
            hooks.append(m.register_forward_hook(ln_hook(name)))
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            model(*batch) if isinstance(batch, (tuple, list)) else model(batch)
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    state = QuantState(method=method)
    for name, o in obs.items():
        (qs, qz), (ks, kz), (vs, vz) = (int8_params(o[t].lo, o[t].hi) for t in ("q", "k", "v"))
        state.attn[name] = AttnQuantParams(qs, ks, vs, qz, kz, vz, max(float(o["p"].hi), 1e-30))
    for name, r in ln_obs.items():
        state.layernorm[name] = (r.lo, r.hi)
    return state


# ---------------------------------------------------------------- RepQ-ViT reparameterization
def _layernorm_consumers(model: nn.Module):
    """(norm name, norm, next linear) for the pre-norm blocks: norm1 -> attn.qkv, norm2 -> mlp.fc1."""
    for name, m in model.named_modules():
        for norm_attr, path in (("norm1", ("attn", "qkv")), ("norm2", ("mlp", "fc1"))):
            norm = getattr(m, norm_attr, None)
            nxt = m
            for p in path:
                nxt = getattr(nxt, p, None)
            if isinstance(norm, nn.LayerNorm) and isinstance(nxt, nn.Linear) and norm.elementwise_affine:
                yield (f"{name}.{norm_attr}" if name else norm_attr), norm, nxt


@torch.no_grad()
def reparameterize_layernorm_(model: nn.Module, state: QuantState) -> nn.Module:
    """RepQ-ViT's scale reparameterization, in place: each post-LayerNorm activation X with per-channel
    quantizer scales s_c and zero points z_c (from its calibrated range) becomes X' = (X + s ⊙ r2) / r1,
    r1 = s / mean(s), r2 = z − mean(z), so one per-tensor scale mean(s) and zero point mean(z) quantize
    it; the LayerNorm's affine absorbs the change (γ' = γ / r1, β' = (β + s ⊙ r2) / r1) and the next
    linear layer undoes it (W' = W diag(r1), b' = b − W (s ⊙ r2)). No float output changes beyond
    fp32 rounding. The state's ranges for these LayerNorms are updated to the reparameterized ones."""
    for name, norm, lin in _layernorm_consumers(model):
        if name not in state.layernorm:
            continue
        lo, hi = (t.double() for t in state.layernorm[name])
        lo, hi = lo.clamp(max=0), hi.clamp(min=0)
        s = ((hi - lo) / 255).clamp(min=1e-8)
        z = torch.round(-lo / s)
        r1 = s / s.mean()
        r2 = z - z.mean()
        shift = s * r2
        w = lin.weight.double()
        if lin.bias is None:
            lin.bias = nn.Parameter(torch.zeros(lin.out_features, dtype=lin.weight.dtype, device=lin.weight.device))
        lin.bias.copy_(lin.bias.double() - w @ shift.to(w.device))
        lin.weight.copy_(w * r1.to(w.device))
        norm.weight.copy_(norm.weight.double() / r1.to(norm.weight.device))
        beta = norm.bias.double() if norm.bias is not None else torch.zeros_like(r1)
        new_beta = (beta + shift.to(beta.device)) / r1.to(beta.device)
        if norm.bias is None:
            norm.bias = nn.Parameter(new_beta.to(norm.weight.dtype))
        else:
            norm.bias.copy_(new_beta)
        state.layernorm[name] = (((lo + shift) / r1).float(), ((hi + shift) / r1).float())
    return model


# ---------------------------------------------------------------- simulated (fake-quant) modules
_REF_FORWARD = {
    lb.Int8Linear: lambda m, x: _ref_lowbit.dynamic_int8_linear(x, m.w_q, m.w_scale, m.bias, m.activation,
                                                                m.symmetric),
    lb.Int4Linear: lambda m, x: _ref_lowbit.int4_linear(x, m.w_packed, m.w_scale, m.w_zero, m.group_size, m.bias,
                                                        m.activation),
    lb.Int4Int8Linear: lambda m, x: _ref_lowbit.int4_int8_linear(x, m.w_packed, m.w_scale, m.bias, m.activation),
    lb.ShiftLinear: lambda m, x: _ref_lowbit.shift_linear(x, m.w_packed, m.w_scale, m.bias, m.activation),
}


def _simulated_linear_forward(self, x):
    return _REF_FORWARD[type(self)](self, x).to(x.dtype)


# ---------------------------------------------------------------- attention forwards
def _quant_attention_forward(self, x: torch.Tensor) -> torch.Tensor:
    B, N, C = x.shape
    q, k, v = _split_qkv(self, x)
    p = self._vitk_attn_params
    fn = _ref_qa.quant_attention if self._vitk_simulate else _qa.quant_attention
    o = fn(q, k, v, p.q_scale, p.k_scale, p.v_scale, q_zero=p.q_zero, k_zero=p.k_zero, v_zero=p.v_zero,
           attn_bits=self._vitk_attn_bits, attn_base=self._vitk_attn_base, attn_delta=p.delta,
           scale=_softmax_scale(self))
    return self.proj_drop(self.proj(o.reshape(B, N, C))) if hasattr(self, "proj_drop") else self.proj(
        o.reshape(B, N, C))


def _refresh_params(module, incompatible_keys):
    module._vitk_attn_params = AttnQuantParams.from_tensor(module.vitk_attn_qparams)


def _quantize_attention(m: nn.Module, params: AttnQuantParams, bits: int, base: float, simulate: bool):
    m.register_buffer("vitk_attn_qparams", params.as_tensor())
    m._vitk_attn_params = params
    m._vitk_attn_bits, m._vitk_attn_base, m._vitk_simulate = bits, base, simulate
    m.forward = types.MethodType(_quant_attention_forward, m)
    m.register_load_state_dict_post_hook(_refresh_params)


# ---------------------------------------------------------------- quantize_
def _linear_module(linear: nn.Linear, config):
    """(lowbit module, description) or (None, why not)."""
    K = linear.in_features
    if isinstance(config, Int8DynamicConfig):
        return lb.Int8Linear.from_float(linear, symmetric=config.symmetric), "Int8Linear (W8A8)"
    if isinstance(config, Int4WeightConfig):
        if K % 2 or K % config.group_size:
            return None, f"in_features {K} not a multiple of group_size {config.group_size} (and of 2)"
        return (lb.Int4Linear.from_float(linear, group_size=config.group_size, symmetric=config.symmetric),
                f"Int4Linear (W4A16, group {config.group_size})")
    if isinstance(config, Int4Int8Config):
        if K % 2:
            return None, f"in_features {K} is odd (4-bit codes are packed in pairs)"
        return lb.Int4Int8Linear.from_float(linear), "Int4Int8Linear (W4A8)"
    return lb.ShiftLinear.from_float(linear), "ShiftLinear (power-of-two weights)"


def _reads_weight_directly(parent: nn.Module, attr: str) -> bool:
    # Swin-V2's attention adds its q/v biases in F.linear(x, qkv.weight, ...): its qkv must stay float.
    return attr == "qkv" and hasattr(parent, "logit_scale")


@torch.no_grad()
def quantize_(model: nn.Module, config, state: Optional[QuantState] = None, *, simulate: bool = False,
              filter_fn: Optional[Callable[[nn.Module, str], bool]] = None) -> QuantReport:
    """Quantizes ``model`` in place per ``config`` (see the module docstring) and returns a QuantReport of
    what was converted and what was skipped, and why. ``state`` (from calibrate) is required when the
    config quantizes attention. ``simulate=True`` builds the fake-quant float model from the references
    instead of the real kernels. ``filter_fn(module, name)``, if given, picks the linear layers and
    attention blocks to convert."""
    if not isinstance(config, (Int8DynamicConfig, Int4WeightConfig, Int4Int8Config, ShiftWeightConfig)):
        raise TypeError(f"config: expected one of Int8DynamicConfig, Int4WeightConfig, Int4Int8Config, "
                        f"ShiftWeightConfig, got {type(config).__name__}")
    attn_bits = getattr(config, "attn_bits", None)
    if attn_bits is not None:
        if not 1 <= attn_bits <= 8:
            raise ValueError(f"attn_bits: expected None or 1 to 8 bits, got {attn_bits}")
        base = config.base()
        if state is None:
            raise ValueError(f"state: {type(config).__name__}(attn_bits={attn_bits}) quantizes attention with "
                             "calibrated scales; run state = vitkernels.quant.calibrate(model, batches) first and "
                             "pass it")
    report = QuantReport()
    modules = dict(model.named_modules())
    # Attention first (it reads attn.qkv's out_features, which the lowbit modules keep).
    for name, m in modules.items():
        why = _dense_attention_reason(m)
        if why == "" and type(m).__name__ == "WindowAttention" and attn_bits is not None:
            report.skipped[name] = ("windowed attention keeps the float window_attention (quant_attention has no "
                                    "window form); its linear layers are quantized")
        if why == "" or attn_bits is None:
            continue
        if why is None and filter_fn is not None and not filter_fn(m, name):
            why = "excluded by filter_fn"
        if why is None and name not in state.attn:
            why = "no calibrated scales in state (calibrate saw no call of this module)"
        if why:
            report.skipped[name] = why
            continue
        _quantize_attention(m, state.attn[name], attn_bits, base, simulate)
        report.converted[name] = (f"{'simulated ' if simulate else ''}quant_attention ({attn_bits}-bit "
                                  f"{config.attn_quantizer}, int8 q/k/v)")
    for name, m in modules.items():
        if not isinstance(m, nn.Linear):
            continue
        parent_name, _, attr = name.rpartition(".")
        parent = modules[parent_name]
        if isinstance(parent, nn.MultiheadAttention):
            report.skipped[name] = "nn.MultiheadAttention reads out_proj.weight directly: kept float"
            continue
        if _reads_weight_directly(parent, attr):
            report.skipped[name] = "its module reads qkv.weight directly (Swin-V2 attention): kept float"
            continue
        if filter_fn is not None and not filter_fn(m, name):
            report.skipped[name] = "excluded by filter_fn"
            continue
        if m.weight.device.type != "cpu":
            report.skipped[name] = f"on {m.weight.device}: the lowbit kernels run on CPU"
            continue
        new, what = _linear_module(m, config)
        if new is None:
            report.skipped[name] = what
            continue
        if isinstance(new, lb.ShiftLinear):
            new.freeze()
        if simulate:
            new.forward = types.MethodType(_simulated_linear_forward, new)
            what = "simulated " + what
        setattr(parent, attr, new)
        report.converted[name] = what
    _fuse_mlp_activations(modules, report)
    model.vitk_quant_report = report
    return report


def _mlp_activation(m: nn.Module) -> Optional[str]:
    """The lowbit activation equal to an Mlp's ``act`` (timm's and this package's Mlp run fc1, act,
    drop1, norm, fc2, drop2), or None when it has no such form."""
    act = getattr(m, "act", None)
    if isinstance(act, nn.ReLU):
        return "relu"
    if isinstance(act, nn.GELU):
        return "gelu" if act.approximate == "none" else "gelu_tanh"
    return None


def _fuse_mlp_activations(modules, report: QuantReport) -> None:
    # The GELU between an MLP's two linear layers runs in fc1's epilogue instead of as its own pass over
    # the [tokens, 4 * dim] hidden activations (12% of a W8A8 Swin-T forward, measured with it unfused).
    for name, m in modules.items():
        if type(m).__name__ != "Mlp" or not isinstance(getattr(m, "norm", nn.Identity()), nn.Identity):
            continue
        fc1, act = getattr(m, "fc1", None), _mlp_activation(m)
        if act is None or not isinstance(fc1, lb._LowBit) or fc1.activation != "none":
            continue
        fc1.activation = act
        m.act = nn.Identity()
        report.converted[f"{name}.act" if name else "act"] = f"fused into fc1's epilogue (activation={act!r})"


def quantized_copy(model: nn.Module, config, state: Optional[QuantState] = None, *, simulate: bool = False):
    """(a quantized deep copy of ``model``, its QuantReport); ``model`` is left as it is."""
    model = copy.deepcopy(model)
    return model, quantize_(model, config, state, simulate=simulate)
