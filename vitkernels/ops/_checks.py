"""Argument checks and fake-output helpers shared by every family's declarations.

The checks run in the fake kernels (torch.compile / export) and before every Python-routed call; the
C++ kernels check the same things in C++ (vitk/checks.h) with the same argument names and the same
kind of error: ValueError for a bad shape, dtype, device or value, TypeError for a non-tensor,
IndexError for an index out of range.
"""
from typing import Optional, Sequence, Tuple

import torch

from ..dispatch import ALL_FLOAT_DTYPES, FLOAT_DTYPES


def _dtype_names(dtypes) -> str:
    return ", ".join(sorted(str(d).replace("torch.", "") for d in dtypes))


def tensor(name: str, t, *, dtypes=None, dims: Optional[int] = None, layout: str = "",
           like: Optional[Tuple[str, torch.Tensor]] = None) -> None:
    """``t`` is a Tensor of one of ``dtypes``, with ``dims`` dimensions (described by ``layout``), and
    on the device of ``like = (its name, it)``."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a Tensor, got {type(t).__name__}")
    if dtypes is not None and t.dtype not in dtypes:
        raise ValueError(f"{name}: expected dtype in {{{_dtype_names(dtypes)}}}, got {t.dtype}")
    if dims is not None and t.dim() != dims:
        raise ValueError(f"{name}: expected {dims} dimensions {layout}, got shape {tuple(t.shape)}".replace("  ", " "))
    if like is not None and t.device != like[1].device:
        raise ValueError(f"{name}: expected a tensor on {like[0]}'s device ({like[1].device}), got one on {t.device}")


def same_dtype(name: str, t: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    if t.dtype != ref.dtype:
        raise ValueError(f"{name}: expected the same dtype as {ref_name} ({ref.dtype}), got {t.dtype}")


def qkv(q, k, v, dims: int, layout: str) -> None:
    """q, k, v of an attention op: float dtypes, ``dims`` dimensions, one dtype and device, k shaped like
    q, v like q but for its head dim, and non-empty head dims."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        tensor(name, t, dtypes=FLOAT_DTYPES, dims=dims, layout=layout, like=("q", q))
        same_dtype(name, t, "q", q)
    if k.shape != q.shape:
        raise ValueError(f"k: expected the shape of q {tuple(q.shape)}, got {tuple(k.shape)}")
    if v.shape[:-1] != q.shape[:-1]:
        raise ValueError(f"v: expected shape {tuple(q.shape[:-1])} + [head_dim_v], got {tuple(v.shape)}")
    nonempty_head_dims(q, v)


def nonempty_head_dims(q, v) -> None:
    if q.shape[-1] == 0:
        raise ValueError(f"q: expected a non-empty head_dim dimension, got shape {tuple(q.shape)}")
    if v.shape[-1] == 0:
        raise ValueError(f"v: expected a non-empty head_dim dimension, got shape {tuple(v.shape)}")


def image_qkv(q, k, v) -> None:
    qkv(q, k, v, 5, "[B, H, W, heads, head_dim]")


def image_param(name: str, t, q) -> None:
    """A per-token parameter of an image-layout op ([B, H, W, heads], any float dtype, any strides)."""
    tensor(name, t, dtypes=ALL_FLOAT_DTYPES, like=("q", q))
    if tuple(t.shape) != tuple(q.shape[:4]):
        raise ValueError(f"{name}: expected shape [B, H, W, heads] = {list(q.shape[:4])} (broadcast views with "
                         f"zero strides are fine), got {list(t.shape)}")


def like(name: str, t, q: torch.Tensor, shape: Sequence[int]) -> None:
    """A backward's grad_out / out: q's device and dtype, exactly ``shape``."""
    tensor(name, t, like=("q", q))
    same_dtype(name, t, "q", q)
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name}: expected shape {list(shape)}, got {list(t.shape)}")


def lse_like(lse, q: torch.Tensor, shape: Sequence[int], name: str = "lse") -> None:
    """A forward's saved log-sum-exp: fp32, on q's device, exactly ``shape``."""
    tensor(name, lse, dtypes={torch.float32}, like=("q", q))
    if tuple(lse.shape) != tuple(shape):
        raise ValueError(f"{name}: expected shape {list(shape)}, got {list(lse.shape)}")


def pair(x, name: str) -> Tuple[int, int]:
    """Two integers from ``x`` (an int means the same on both axes, as timm's window sizes)."""
    if isinstance(x, int):
        return x, x
    try:
        a, b = (int(t) for t in x)
    except (TypeError, ValueError):
        raise ValueError(f"{name}: expected two integers, got {x!r}") from None
    return a, b


# ---------------------------------------------------------------- fake outputs
def grad_like(t: torch.Tensor) -> torch.Tensor:
    """A gradient of ``t``: its shape and dtype, contiguous (what every backward kernel returns)."""
    return torch.empty_like(t, memory_format=torch.contiguous_format)


def empty(t: torch.Tensor) -> torch.Tensor:
    """The empty [0] tensor an op returns in place of an output it was asked not to compute."""
    return t.new_empty((0,))


def out_like(q: torch.Tensor, v: torch.Tensor, *lead: int) -> torch.Tensor:
    """An attention output: q's shape with v's head dim, q's dtype, contiguous; optional leading dims."""
    return q.new_empty((*lead, *q.shape[:-1], v.shape[-1]))


def lse_of(q: torch.Tensor, *lead: int) -> torch.Tensor:
    """fp32 log-sum-exp per query row: q's shape without the head dim, optional leading dims."""
    return q.new_empty((*lead, *q.shape[:-1]), dtype=torch.float32)
