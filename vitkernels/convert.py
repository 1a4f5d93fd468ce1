"""convert_: the fused window attention for the Swin blocks of an existing model, in place.

    model = timm.create_model("swin_tiny_patch4_window7_224", pretrained=True)
    vitkernels.convert.convert_(model)          # or convert_(model, inplace=False) for a converted copy
    print(model.vitk_report)                    # what was converted, what was not and why

Instances are patched, not classes (torchao's ``quantize_`` is the model): every supported block gets
an instance attribute that shadows one method of its class and computes the attention with
torch.ops.vitk.window_attention from the block's own parameters. Parameters, buffers, state dict,
optimizer state and hooks are untouched, so a converted model trains, saves and loads as before;
other instances of the same class are unaffected. ``revert_`` removes the patches.

Supported blocks, recognised by class name and attributes (timm need not be importable):

- timm ``SwinTransformerBlock`` (Swin-V1, timm >= 0.9, NHWC ``_attn``): ``_attn`` is replaced.
- timm ``SwinTransformerBlock`` of timm < 0.9 (Swin-V1, ``forward`` on [B, L, C] with a fixed
  ``input_resolution`` and one ``drop_path``): ``forward`` is replaced.
- timm ``SwinTransformerV2Block`` (and the v2 ``SwinTransformerBlock`` of older timm, whose
  ``_attn`` takes [B, L, C]): ``_attn`` is replaced; cosine attention, logit scale and continuous
  position bias as in vitkernels.models.window_attention.swin_v2_attention.
- StyleSwin's ``StyleSwinTransformerBlock`` (microsoft/StyleSwin): ``forward`` is replaced, with the
  double attention of vitkernels.models.window_attention.double_window_attention.

The blocks' ``attn`` submodules (which in timm take partitioned windows) are bypassed, not removed.
A converted block differs from the original only when H or W is not a multiple of the window: the
original attends to zero-padded tokens (non-zero keys through the qkv bias), the op treats padded
positions as absent. A block whose attention dropout is non-zero runs its original code while in
training mode (the op has no dropout), and the fused path in eval mode.
"""
import copy
import logging
import types
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import torch
import torch.nn as nn

from .models import window_attention as _wa

_logger = logging.getLogger(__name__)

_MARK = "_vitk_fused"              # instance attribute: the kind of conversion applied
_PATCHED = "_vitk_patched_method"  # instance attribute: the method name shadowed

_BLOCK_CLASSES = ("SwinTransformerBlock", "SwinTransformerV2Block", "StyleSwinTransformerBlock")


@dataclass
class ConversionReport:
    """converted: {module name: kind}; skipped: {module name: reason}; already_fused: module names
    that were vitkernels modules or converted by an earlier call."""
    converted: Dict[str, str] = field(default_factory=dict)
    skipped: Dict[str, str] = field(default_factory=dict)
    already_fused: List[str] = field(default_factory=list)

    def __str__(self):
        lines = [f"vitkernels.convert_: {len(self.converted)} converted, {len(self.skipped)} skipped, "
                 f"{len(self.already_fused)} already fused"]
        lines += [f"  converted {name or '<root>'}: {kind}" for name, kind in self.converted.items()]
        lines += [f"  skipped   {name or '<root>'}: {why}" for name, why in self.skipped.items()]
        return "\n".join(lines)


# ---------------------------------------------------------------- the replacement methods
def _attn_dropout_active(block, attn_modules) -> bool:
    return block.training and any(getattr(getattr(a, "attn_drop", None), "p", 0.0) > 0 for a in attn_modules)


def _fused_attn_v1(self, x: torch.Tensor) -> torch.Tensor:
    if _attn_dropout_active(self, (self.attn,)):
        return type(self)._attn(self, x)
    return _call_on_grid(self, x, _wa.swin_v1_attention)


def _fused_attn_v2(self, x: torch.Tensor) -> torch.Tensor:
    if _attn_dropout_active(self, (self.attn,)):
        return type(self)._attn(self, x)
    return _call_on_grid(self, x, _wa.swin_v2_attention)


def _call_on_grid(block, x, attention):
    win, shift = _wa.to_2tuple(block.window_size), _wa.to_2tuple(block.shift_size)
    if x.dim() == 3:
        # Older timm v2 blocks carry tokens [B, L, C] of the fixed input_resolution.
        B, L, C = x.shape
        H, W = _wa.to_2tuple(block.input_resolution)
        return attention(block.attn, x.view(B, H, W, C), win, shift).reshape(B, L, C)
    return attention(block.attn, x, win, shift)


def _fused_forward_v1_legacy(self, x: torch.Tensor) -> torch.Tensor:
    if _attn_dropout_active(self, (self.attn,)):
        return type(self).forward(self, x)
    H, W = _wa.to_2tuple(self.input_resolution)
    B, L, C = x.shape
    if L != H * W:
        raise ValueError(f"x: expected {H}*{W} tokens (input_resolution), got {L}")
    y = _wa.swin_v1_attention(self.attn, self.norm1(x).view(B, H, W, C), _wa.to_2tuple(self.window_size),
                              _wa.to_2tuple(self.shift_size))
    x = x + self.drop_path(y.reshape(B, L, C))
    return x + self.drop_path(self.mlp(self.norm2(x)))


def _fused_forward_styleswin(self, x: torch.Tensor, style: torch.Tensor) -> torch.Tensor:
    if _attn_dropout_active(self, tuple(self.attn)):
        return type(self).forward(self, x, style)
    H, W = _wa.to_2tuple(self.input_resolution)
    B, L, C = x.shape
    if L != H * W:
        raise ValueError(f"x: expected {H}*{W} tokens (input_resolution), got {L}")
    shortcut = x
    x = self.norm1(x.transpose(-1, -2), style).transpose(-1, -2)
    x = _wa.double_window_attention(self.qkv, self.proj, self.attn, self.num_heads, x.reshape(B, H, W, C),
                                    _wa.to_2tuple(self.window_size), _wa.to_2tuple(self.shift_size))
    x = shortcut + x.reshape(B, L, C)
    return x + self.mlp(self.norm2(x.transpose(-1, -2), style).transpose(-1, -2))


# ---------------------------------------------------------------- recognising blocks
def _has(m, *names):
    return all(hasattr(m, n) for n in names)


def _window_checks(block, table_fits: Callable[[int, int], bool]) -> Optional[str]:
    try:
        (wh, ww), (sh, sw) = _wa.to_2tuple(block.window_size), _wa.to_2tuple(block.shift_size)
    except (TypeError, ValueError):
        return f"window_size / shift_size not integers or pairs ({block.window_size!r}, {block.shift_size!r})"
    if not (0 <= sh < wh and 0 <= sw < ww):
        return f"shift_size {(sh, sw)} outside [0, window {(wh, ww)})"
    if not table_fits(wh, ww):
        return f"bias table for a window other than the block's {(wh, ww)}"
    return None


def _classify(m: nn.Module):
    """(kind, method name, replacement) for a supported block, (None, reason) for a Swin-named
    block that cannot be converted, None for anything else."""
    cls = type(m).__name__
    if cls not in _BLOCK_CLASSES:
        return None
    attn = getattr(m, "attn", None)
    if cls == "StyleSwinTransformerBlock":
        if not (_has(m, "qkv", "proj", "norm1", "norm2", "mlp", "num_heads", "input_resolution", "window_size",
                     "shift_size") and isinstance(attn, nn.ModuleList) and len(attn) == 2
                and all(_has(a, "relative_position_bias_table", "scale", "num_heads") for a in attn)):
            return None, "StyleSwin-named block without StyleSwin's attributes"
        half = m.num_heads // 2
        if m.num_heads < 2 or any(a.num_heads != half for a in attn) or m.qkv.out_features % (6 * half):
            return None, "branch head counts are not num_heads // 2 over half the channels"
        why = _window_checks(m, lambda wh, ww: all(
            tuple(a.relative_position_bias_table.shape) == ((2 * wh - 1) * (2 * ww - 1), half) for a in attn))
        return (None, why) if why else ("styleswin", "forward", _fused_forward_styleswin)
    if attn is None or not _has(m, "window_size", "shift_size", "norm1", "norm2", "mlp"):
        return None, "Swin-named block without timm's attributes"
    if _has(attn, "logit_scale", "cpb_mlp", "relative_coords_table", "qkv", "proj", "num_heads"):
        if not hasattr(m, "_attn"):
            return None, "Swin-V2 block without an _attn method (unsupported timm version)"
        if attn.qkv.out_features % (3 * attn.num_heads):
            return None, "qkv width not a multiple of 3 * num_heads"
        why = _window_checks(m, lambda wh, ww: tuple(attn.relative_coords_table.shape[1:3]) == (2 * wh - 1, 2 * ww - 1))
        return (None, why) if why else ("timm-swin-v2", "_attn", _fused_attn_v2)
    if _has(attn, "relative_position_bias_table", "qkv", "proj", "num_heads", "scale"):
        if attn.qkv.out_features % (3 * attn.num_heads):
            return None, "qkv width not a multiple of 3 * num_heads"
        why = _window_checks(m, lambda wh, ww: tuple(attn.relative_position_bias_table.shape) == (
            (2 * wh - 1) * (2 * ww - 1), attn.num_heads))
        if why:
            return None, why
        if hasattr(m, "_attn"):
            return "timm-swin-v1", "_attn", _fused_attn_v1
        if _has(m, "input_resolution", "drop_path"):
            return "timm-swin-v1-legacy", "forward", _fused_forward_v1_legacy
        return None, "Swin-V1 block with neither _attn nor timm < 0.9's layout"
    return None, "attention module of an unknown kind"


# ---------------------------------------------------------------- public API
def convert_(model: nn.Module, *, inplace: bool = True,
             filter_fn: Optional[Callable[[nn.Module, str], bool]] = None) -> nn.Module:
    """Replaces, in place, the attention of every supported Swin block of ``model`` (timm Swin-V1,
    Swin-V2, StyleSwin; see the module docstring) with the fused op, keeping the same parameters.

    inplace=False converts a deep copy and leaves ``model`` alone. filter_fn(module, name), if given,
    picks which supported blocks to convert. Returns the (converted) model; its ``vitk_report``
    attribute is a ConversionReport of what was converted, what was skipped and why. Converting
    twice is harmless: converted blocks are recognised and left as they are.
    """
    if not inplace:
        model = copy.deepcopy(model)
    report = ConversionReport()
    for name, m in model.named_modules():
        if type(m).__module__ == _wa.__name__:
            if isinstance(m, (_wa.SwinTransformerBlock, _wa.SwinTransformerV2Block, _wa.DoubleWindowAttention)):
                report.already_fused.append(name)
            continue
        if getattr(m, _MARK, None):
            report.already_fused.append(name)
            continue
        found = _classify(m)
        if found is None:
            continue
        if found[0] is None:
            report.skipped[name] = found[1]
            continue
        if filter_fn is not None and not filter_fn(m, name):
            report.skipped[name] = "excluded by filter_fn"
            continue
        kind, method, fn = found
        setattr(m, method, types.MethodType(fn, m))
        setattr(m, _MARK, kind)
        setattr(m, _PATCHED, method)
        report.converted[name] = kind
    model.vitk_report = report
    _logger.info("%s", report)
    return model


def revert_(model: nn.Module) -> nn.Module:
    """Undoes convert_ on ``model`` in place: the blocks run their class's methods again."""
    for m in model.modules():
        if getattr(m, _MARK, None):
            m.__dict__.pop(m.__dict__.pop(_PATCHED), None)
            del m.__dict__[_MARK]
    model.__dict__.pop("vitk_report", None)
    return model


def is_converted(module: nn.Module) -> bool:
    """True for a block that convert_ patched (and that revert_ has not restored)."""
    return bool(getattr(module, _MARK, None))


__all__ = ["convert_", "revert_", "is_converted", "ConversionReport"]
