"""Low-bit linear layers on the lowbit ops, each built from an nn.Linear with ``.from_float(linear, ...)``.

Int8Linear       W8A8: int8 weights per output channel, activations quantized per token on the fly
Int4Linear       W4A16: 4-bit weights with a scale (and zero point) per group along K
Int4Int8Linear   W4A8: 4-bit weights per output channel, activations quantized per token
ShiftLinear      power-of-two weights (DeepShift-PS / ShiftAddViT's shift experts); trainable form
                 (``shift`` and ``sign`` parameters, straight-through rounding) packed by ``freeze()``

Weights live in buffers in the ops' packed formats (Int8Linear keeps them blocked for the CPU
kernels, packed once here), so ``state_dict`` round-trips and nothing is repacked per call.
"""
import torch
import torch.nn.functional as F
from torch import nn

from .. import lowbit as pack
from ..ops import lowbit as ops

__all__ = ["Int8Linear", "Int4Linear", "Int4Int8Linear", "ShiftLinear"]


def _bias(linear: nn.Linear):
    return None if linear.bias is None else linear.bias.detach().float().clone()


class _LowBit(nn.Module):
    format = ""

    def __init__(self, in_features: int, out_features: int, activation: str):
        super().__init__()
        if activation not in ops.ACTIVATIONS:
            raise ValueError(f"activation: expected one of {', '.join(ops.ACTIVATIONS)}, got {activation!r}")
        self.in_features, self.out_features, self.activation = in_features, out_features, activation

    def weight_bytes(self) -> int:
        return sum(b.numel() * b.element_size() for n, b in self.named_buffers() if n != "bias" and b is not None)

    def extra_repr(self) -> str:
        fp32 = 4 * self.in_features * self.out_features
        return (f"in_features={self.in_features}, out_features={self.out_features}, format={self.format}, "
                f"activation={self.activation}, weight_bytes={self.weight_bytes()} ({self.weight_bytes() / fp32:.3f} "
                f"of fp32's {fp32})")


class Int8Linear(_LowBit):
    format = "int8 per channel (VNNI-blocked), activations int8 per token"

    def __init__(self, in_features, out_features, bias=True, activation="none", symmetric=True):
        super().__init__(in_features, out_features, activation)
        self.symmetric = symmetric
        nb, kq = -(-out_features // 16), -(-in_features // 4)
        self.register_buffer("w_q", torch.zeros(nb, kq + 1, 64, dtype=torch.int8))
        self.register_buffer("w_scale", torch.ones(out_features))
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)

    @classmethod
    def from_float(cls, linear: nn.Linear, activation="none", symmetric=True):
        m = cls(linear.in_features, linear.out_features, linear.bias is not None, activation, symmetric)
        w_q, w_scale = pack.pack_int8(linear.weight)
        m.w_q.copy_(pack.block_int8(w_q))
        m.w_scale.copy_(w_scale)
        if m.bias is not None:
            m.bias.copy_(_bias(linear))
        return m

    def forward(self, x):
        return ops.dynamic_int8_linear(x, self.w_q, self.w_scale, self.bias, activation=self.activation,
                                       symmetric=self.symmetric)


class Int4Linear(_LowBit):
    format = "int4 per group, fp activations"

    def __init__(self, in_features, out_features, bias=True, activation="none", group_size=128, symmetric=True):
        super().__init__(in_features, out_features, activation)
        self.group_size = group_size
        g = in_features // group_size
        self.register_buffer("w_packed", torch.zeros(out_features, in_features // 2, dtype=torch.uint8))
        self.register_buffer("w_scale", torch.ones(out_features, g))
        self.register_buffer("w_zero", None if symmetric else torch.zeros(out_features, g))
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)

    @classmethod
    def from_float(cls, linear: nn.Linear, group_size=128, symmetric=True, activation="none"):
        group_size = min(group_size, linear.in_features)
        m = cls(linear.in_features, linear.out_features, linear.bias is not None, activation, group_size, symmetric)
        w_packed, w_scale, w_zero = pack.pack_int4(linear.weight, group_size, symmetric)
        m.w_packed.copy_(w_packed)
        m.w_scale.copy_(w_scale)
        if w_zero is not None:
            m.w_zero.copy_(w_zero)
        if m.bias is not None:
            m.bias.copy_(_bias(linear))
        return m

    def forward(self, x):
        return ops.int4_linear(x, self.w_packed, self.w_scale, self.w_zero, self.group_size, self.bias,
                               activation=self.activation)


class Int4Int8Linear(_LowBit):
    format = "int4 per channel, activations int8 per token"

    def __init__(self, in_features, out_features, bias=True, activation="none"):
        super().__init__(in_features, out_features, activation)
        self.register_buffer("w_packed", torch.zeros(out_features, in_features // 2, dtype=torch.uint8))
        self.register_buffer("w_scale", torch.ones(out_features))
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)

    @classmethod
    def from_float(cls, linear: nn.Linear, activation="none"):
        m = cls(linear.in_features, linear.out_features, linear.bias is not None, activation)
        w_packed, w_scale, _ = pack.pack_int4(linear.weight, linear.in_features, True)
        m.w_packed.copy_(w_packed)
        m.w_scale.copy_(w_scale.view(-1))
        if m.bias is not None:
            m.bias.copy_(_bias(linear))
        return m

    def forward(self, x):
        return ops.int4_int8_linear(x, self.w_packed, self.w_scale, self.bias, activation=self.activation)


class _RoundSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return torch.round(x)

    @staticmethod
    def backward(ctx, g):
        return g


class ShiftLinear(_LowBit):
    """Inference form: ``w_packed`` shift codes and ``w_scale`` per channel. Trainable form (``trainable=True``):
    DeepShift-PS's ``shift`` (exponent, clamped to 0..-6) and ``sign`` (rounded to -1, 0, 1) parameters with
    straight-through rounding, times the fixed ``w_scale``; ``freeze()`` packs them into the inference form."""
    format = "signed powers of two (4-bit shift codes) per channel scale"

    def __init__(self, in_features, out_features, bias=True, activation="none", trainable=False):
        super().__init__(in_features, out_features, activation)
        self.register_buffer("w_scale", torch.ones(out_features))
        if trainable:
            self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        else:
            self.register_buffer("bias", torch.zeros(out_features) if bias else None)
        if trainable:
            self.shift = nn.Parameter(torch.zeros(out_features, in_features))
            self.sign = nn.Parameter(torch.zeros(out_features, in_features))
            self.register_buffer("w_packed", None)
            # A fresh trainable layer starts where nn.Linear's initialization would, rounded to powers of
            # two (DeepShift-PS converts an initialized float layer the same way), not at all-zero weights.
            self._load_float(nn.Linear(in_features, out_features, bias))
        else:
            self.shift = self.sign = None
            self.register_buffer("w_packed", torch.zeros(out_features, in_features // 2, dtype=torch.uint8))

    @classmethod
    def from_float(cls, linear: nn.Linear, activation="none", trainable=False):
        m = cls(linear.in_features, linear.out_features, linear.bias is not None, activation, trainable)
        m._load_float(linear)
        return m

    @torch.no_grad()
    def _load_float(self, linear: nn.Linear) -> None:
        w_packed, w_scale = pack.pack_shift(linear.weight)
        self.w_scale.copy_(w_scale)
        if self.shift is not None:
            w = linear.weight.detach().float() / w_scale[:, None]
            self.shift.copy_(torch.log2(w.abs().clamp(min=2.0 ** -126)).clamp(1 - pack.SHIFT_EXPONENTS, 0))
            self.sign.copy_(torch.sign(w))
        else:
            self.w_packed.copy_(w_packed)
        if self.bias is not None:
            self.bias.copy_(_bias(linear))

    def weight(self) -> torch.Tensor:
        """The trainable form's weights: sign(round(sign)) * 2^round(shift) * w_scale, rounding straight-through."""
        shift = _RoundSTE.apply(self.shift.clamp(1 - pack.SHIFT_EXPONENTS, 0))
        sign = _RoundSTE.apply(self.sign.clamp(-1, 1))
        return sign * torch.pow(2.0, shift) * self.w_scale[:, None]

    def forward(self, x):
        if self.shift is not None:
            out = F.linear(x, self.weight().to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))
            return _act(out, self.activation)
        return ops.shift_linear(x, self.w_packed, self.w_scale, self.bias, activation=self.activation)

    @torch.no_grad()
    def freeze(self) -> "ShiftLinear":
        """Packs the trainable form into the inference form in place (the same function of x)."""
        if self.shift is None:
            return self
        w = self.weight() / self.w_scale[:, None]
        e = torch.round(torch.log2(w.abs().clamp(min=2.0 ** -126))).clamp(1 - pack.SHIFT_EXPONENTS, 0).long()
        code = torch.where(w > 0, 1 - e, 9 - e)
        code = torch.where(w == 0, torch.zeros_like(code), code)
        bias = None if self.bias is None else self.bias.detach().clone()
        del self.shift, self.sign, self.bias
        self.shift = self.sign = None
        self.register_buffer("w_packed", pack.pack_nibbles(code))
        self.register_buffer("bias", bias)
        return self


def _act(v, activation):
    if activation == "relu":
        return F.relu(v)
    if activation in ("gelu", "gelu_tanh"):
        return F.gelu(v, approximate="tanh" if activation == "gelu_tanh" else "none")
    return v
