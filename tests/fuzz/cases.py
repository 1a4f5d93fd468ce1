"""What the fuzz test draws for each op: hypothesis strategies of whole calls.

A strategy draws a *scenario* of its family (sizes including zeros and ones, a dtype, values with
NaN, +-inf, 1e30 and -1e6 decays sprinkled in, every tensor in its own layout: contiguous,
transposed, sliced out of a wider tensor, or broadcast with zero strides) and turns it into a
``Call`` of one op: its arguments in schema order, the float64 reference of its first output where
there is one, and whether the inputs are tame enough to hold the outputs to it. A quarter of the
draws then break one argument (a shape, a dtype, a rank, a value the op must reject), so that every
backend is also held to the same kind of named error.
"""
import math
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import torch
from hypothesis import strategies as st

from vitkernels.reference import codebook as cref
from vitkernels.reference import masked_attention as mref
from vitkernels.reference import window_attention as wref

FLOATS = (torch.float32, torch.float16, torch.bfloat16)


@dataclass
class Call:
    args: tuple
    reference: Optional[Callable[..., object]] = None  # of the op's arguments: float64 ground truth
    exact_ok: bool = True          # inputs tame enough (no 1e30, no non-finite q/k/v) to compare values
    mutated: str = ""              # which argument was broken, if any
    grads: List[int] = field(default_factory=list)   # positions of the differentiable inputs

    def __repr__(self):
        def show(a):
            if isinstance(a, torch.Tensor):
                return f"T{tuple(a.shape)}:{str(a.dtype)[6:]}:s{tuple(a.stride())}"
            return repr(a)
        return f"Call({', '.join(show(a) for a in self.args)}; mutated={self.mutated!r})"


# ---------------------------------------------------------------- values and layouts
SPECIALS = (float("nan"), float("inf"), float("-inf"), 1e30)


@st.composite
def values(draw, shape, dtype, *, specials=SPECIALS, base=None):
    """A tensor of ``shape`` (randn, or ``base(shape)``) with a few entries replaced by specials."""
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    t = torch.randn(shape, generator=g, dtype=torch.float64) if base is None else base(shape, g)
    n = t.numel()
    if n and specials and draw(st.integers(0, 3)) == 0:
        for _ in range(draw(st.integers(1, 2))):
            t.view(-1)[draw(st.integers(0, n - 1))] = draw(st.sampled_from(specials))
    return t.to(dtype)


@st.composite
def laid_out(draw, t: torch.Tensor):
    """``t``'s values in one of the layouts users hand the ops (its values may change for 'broadcast')."""
    kind = draw(st.sampled_from(["contiguous", "transposed", "sliced", "broadcast"]))
    if t.dim() < 2 or t.numel() == 0 or kind == "contiguous":
        return t.contiguous()
    if kind == "transposed":
        a, b = 0, t.dim() - 2
        return t.transpose(a, b).contiguous().transpose(a, b)
    if kind == "sliced":
        wide = torch.zeros(*t.shape[:-1], t.shape[-1] + 3, dtype=t.dtype)
        wide[..., 1:-2] = t
        return wide[..., 1:-2]
    dim = draw(st.integers(0, t.dim() - 2))
    return t.narrow(dim, 0, 1).expand_as(t) if t.shape[dim] else t


def tame(*ts) -> bool:
    return all(bool(torch.isfinite(t).all()) and (t.numel() == 0 or float(t.abs().max()) < 1e20)
               for t in ts if isinstance(t, torch.Tensor) and t.is_floating_point())


def d64(*ts):
    return [t.double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t for t in ts]


# ---------------------------------------------------------------- mutations
def break_tensor(draw, t: torch.Tensor, *, allow_dtype=True):
    """t with a wrong rank, a wrong size, or a wrong dtype."""
    how = draw(st.sampled_from(["rank", "size", "dtype"] if allow_dtype else ["rank", "size"]))
    if how == "rank":
        return t.unsqueeze(0) if draw(st.booleans()) or t.dim() == 0 else t.reshape(-1)
    if how == "size" and t.dim():
        dim = draw(st.integers(0, t.dim() - 1))
        shape = list(t.shape)
        shape[dim] += 1
        return torch.randn(shape).to(t.dtype)
    return t.to(draw(st.sampled_from([torch.float64, torch.int32, torch.int64])))


@st.composite
def mutate(draw, call: Call, names: List[str], breakers: Dict[str, Callable] = None) -> Call:
    """``call`` with one argument broken (a tensor's rank/size/dtype, or by ``breakers[name](draw, v)``)."""
    choices = [i for i, a in enumerate(call.args) if isinstance(a, torch.Tensor) or (breakers and names[i] in breakers)]
    i = draw(st.sampled_from(choices))
    args = list(call.args)
    if breakers and names[i] in breakers:
        args[i] = breakers[names[i]](draw, args[i])
    else:
        args[i] = break_tensor(draw, args[i])
    return Call(tuple(args), mutated=names[i])


# ---------------------------------------------------------------- image attention scenarios
@st.composite
def image_qkv(draw, max_side=5):
    B = draw(st.integers(0, 2))
    H, W = draw(st.integers(0, max_side)), draw(st.integers(0, max_side))
    heads = draw(st.integers(1, 2))
    d = draw(st.sampled_from([1, 3, 8]))
    dv = draw(st.sampled_from([d, 2, 5]))
    dtype = draw(st.sampled_from(FLOATS))
    q = draw(laid_out(draw(values((B, H, W, heads, d), dtype))))
    k = draw(laid_out(draw(values((B, H, W, heads, d), dtype))))
    v = draw(laid_out(draw(values((B, H, W, heads, dv), dtype))))
    return q, k, v


def _decay_base(shape, g):
    return -torch.rand(shape, generator=g, dtype=torch.float64) * 2


DECAY_SPECIALS = (float("-inf"), float("nan"), -1e6, 0.0)


@st.composite
def decays(draw, q):
    shape = tuple(q.shape[:4])
    dtype = draw(st.sampled_from((torch.float32, torch.float64, q.dtype)))
    return draw(laid_out(draw(values(shape, dtype, specials=DECAY_SPECIALS, base=_decay_base))))


def scale_of(draw):
    return draw(st.sampled_from([None, 0.37, float("nan")]))


# ---------------------------------------------------------------- per-op strategies
STRATEGIES: Dict[str, Callable] = {}


def strategy(*ops):
    def deco(fn):
        for op in ops:
            STRATEGIES[op] = fn(op)
        return fn
    return deco


def _maybe_mutated(draw, call: Call, names, breakers=None) -> Call:
    if draw(st.integers(0, 3)) == 0:
        return draw(mutate(call, names, breakers))
    return call


def _shape_pair(draw, _):
    return draw(st.sampled_from([[0, 3], [3], [2, 2, 2], [2, -1]]))


@strategy("window_attention", "window_attention_fwd")
def _window(op):
    @st.composite
    def draw_call(draw):
        q, k, v = draw(image_qkv(max_side=6))
        wh, ww = draw(st.integers(1, 4)), draw(st.integers(1, 4))
        sh, sw = draw(st.integers(0, wh - 1)), draw(st.integers(0, ww - 1))
        bias = None
        if draw(st.booleans()):
            bias = draw(values(((2 * wh - 1) * (2 * ww - 1), q.shape[3]), draw(st.sampled_from(FLOATS))))
        scale = scale_of(draw)
        fwd_scale = (q.shape[-1] ** -0.5 if scale is None else scale)
        args = (q, k, v, [wh, ww], [sh, sw], bias, scale if op == "window_attention" else fwd_scale)
        call = Call(args, reference=lambda q, k, v, ws, ss, bias, _: wref.window_attention(
                        *d64(q, k, v), ws, ss, *d64(bias), fwd_scale),
                    exact_ok=tame(q, k, v, bias) and not math.isnan(fwd_scale), grads=[0, 1, 2, 5])
        names = ["q", "k", "v", "window_size", "shift_size", "rel_pos_bias", "scale"]
        return _maybe_mutated(draw, call, names, {"window_size": _shape_pair, "shift_size": _shape_pair})
    return draw_call()


@strategy("polyline_attention", "polyline_attention_fwd", "axial_decay_attention", "axial_decay_attention_fwd")
def _decayed(op):
    @st.composite
    def draw_call(draw):
        q, k, v = draw(image_qkv())
        la, lb = draw(decays(q)), draw(decays(q))
        scale = scale_of(draw)
        s = q.shape[-1] ** -0.5 if scale is None else scale
        polyline = op.startswith("polyline")
        symmetric = draw(st.booleans())
        if polyline:
            args = (q, k, v, la, lb, scale, symmetric) if op == "polyline_attention" else \
                (q, k, v, la, lb, s, symmetric, draw(st.booleans()))
            ref = lambda q, k, v, la, lb, *_: mref.polyline_attention(*d64(q, k, v, la, lb), s, symmetric)  # noqa: E731
        else:
            args = (q, k, v, la, lb, scale) if op == "axial_decay_attention" else \
                (q, k, v, la, lb, s, draw(st.booleans()))
            ref = lambda q, k, v, la, lb, *_: mref.axial_decay_attention(*d64(q, k, v, la, lb), s)  # noqa: E731
        # A forward called without save_for_backward refuses a gradient (tested elsewhere).
        wants_grad = op in ("polyline_attention", "axial_decay_attention") or args[-1] is True
        call = Call(args, reference=ref, exact_ok=tame(q, k, v) and not math.isnan(s),
                    grads=[0, 1, 2, 3, 4] if wants_grad else [])
        names = ["q", "k", "v", "log_alpha", "log_beta", "scale", "symmetric", "save_for_backward"][:len(args)]
        return _maybe_mutated(draw, call, names)
    return draw_call()


@strategy("axial_attention_fwd")
def _axial_one(op):
    @st.composite
    def draw_call(draw):
        q, k, v = draw(image_qkv())
        ld = draw(decays(q))
        axis = draw(st.sampled_from([1, 2]))
        s = 0.37
        perm = (0, 2, 1, 3, 4) if axis == 1 else (0, 1, 2, 3, 4)

        def ref(q, k, v, ld, *_):
            # Attention along one axis: the axial form's row (axis 2) or column (axis 1) half alone.
            qq, kk, vv = (t.double().permute(*perm) for t in (q, k, v))
            dd = ld.double().permute(*perm[:4])
            B, A, L, nh, _ = qq.shape
            mask = mref.segment_sums(dd.permute(0, 1, 3, 2))                    # [B, A, heads, L, L]
            sc = (qq.permute(0, 1, 3, 2, 4) @ kk.permute(0, 1, 3, 4, 2)) * s + mask
            o = torch.softmax(sc, -1) @ vv.permute(0, 1, 3, 2, 4)
            return o.permute(0, 1, 3, 2, 4).permute(*perm)
        call = Call((q, k, v, ld, axis, s), reference=ref, exact_ok=tame(q, k, v), grads=[0, 1, 2, 3])
        return _maybe_mutated(draw, call, ["q", "k", "v", "log_decay", "axis", "scale"],
                              {"axis": lambda draw, a: draw(st.sampled_from([0, 3, -1]))})
    return draw_call()


@strategy("gaussian_mask_attention", "gaussian_mask_attention_fwd")
def _gauss(op):
    @st.composite
    def draw_call(draw):
        q, k, v = draw(image_qkv())
        M = draw(st.integers(1, 3))
        w = draw(values((q.shape[3], M), draw(st.sampled_from(FLOATS + (torch.float64,)))))
        sig = draw(values((q.shape[3], M), w.dtype,
                          base=lambda sh, g: torch.rand(sh, generator=g, dtype=torch.float64) * 3))
        scale = scale_of(draw)
        s = q.shape[-1] ** -0.5 if scale is None else scale
        args = (q, k, v, w, sig, scale if op == "gaussian_mask_attention" else s)
        call = Call(args, reference=lambda q, k, v, w, sig, _: mref.gaussian_mask_attention(*d64(q, k, v, w, sig), s),
                    exact_ok=tame(q, k, v, w, sig) and not math.isnan(s), grads=[0, 1, 2, 3, 4])
        return _maybe_mutated(draw, call, ["q", "k", "v", "mix_weight", "mix_sigma", "scale"])
    return draw_call()


@strategy("reduced_attention", "reduced_attention_fwd")
def _reduced(op):
    @st.composite
    def draw_call(draw):
        B, Nq, Nk = draw(st.integers(0, 2)), draw(st.integers(0, 20)), draw(st.integers(1, 9))
        heads, dqk, dv = draw(st.integers(1, 2)), draw(st.sampled_from([1, 3, 8])), draw(st.sampled_from([1, 5, 8]))
        dtype = draw(st.sampled_from(FLOATS))
        q = draw(laid_out(draw(values((B, Nq, heads, dqk), dtype))))
        k = draw(laid_out(draw(values((B, Nk, heads, dqk), dtype))))
        v = draw(laid_out(draw(values((B, Nk, heads, dv), dtype))))
        scale = scale_of(draw)
        s = dqk ** -0.5 if scale is None else scale
        call = Call((q, k, v, scale if op == "reduced_attention" else s),
                    reference=lambda q, k, v, _: mref.reduced_attention(*d64(q, k, v), s),
                    exact_ok=tame(q, k, v) and not math.isnan(s), grads=[0, 1, 2])
        return _maybe_mutated(draw, call, ["q", "k", "v", "scale"])
    return draw_call()


def _cu_breaker(draw, cu):
    total = int(cu[-1]) if cu.numel() else 0
    bad = draw(st.sampled_from(["past_end", "decreasing", "not_zero", "int64", "strided"]))
    if bad == "past_end":
        return torch.cat([cu[:-1], torch.tensor([total + 380], dtype=torch.int32)])
    if bad == "decreasing":
        return torch.tensor([0, 5, 3, total], dtype=torch.int32)
    if bad == "not_zero":
        return cu + 1
    if bad == "int64":
        return cu.long()
    return torch.stack([cu, cu], 1)[:, 0]      # a valid strided view: must work, not be rejected


@strategy("varlen_attention", "varlen_attention_fwd")
def _varlen(op):
    @st.composite
    def draw_call(draw):
        lens = draw(st.lists(st.integers(0, 7), min_size=0, max_size=4))
        total = sum(lens)
        heads, d = draw(st.integers(1, 2)), draw(st.sampled_from([1, 3, 8]))
        dv = draw(st.sampled_from([d, 4]))
        dtype = draw(st.sampled_from(FLOATS))
        q = draw(laid_out(draw(values((total, heads, d), dtype))))
        k = draw(laid_out(draw(values((total, heads, d), dtype))))
        v = draw(laid_out(draw(values((total, heads, dv), dtype))))
        cu = torch.tensor([0] + list(torch.tensor(lens, dtype=torch.int64).cumsum(0).tolist()), dtype=torch.int32)
        if draw(st.booleans()):
            cu = torch.stack([cu, cu], 1)[:, 0]
        longest = max(lens, default=0)
        max_seqlen = draw(st.sampled_from([longest, longest + 3, 2**31 - 1]))
        scale = scale_of(draw)
        s = d ** -0.5 if scale is None else scale
        call = Call((q, k, v, cu, max_seqlen, scale if op == "varlen_attention" else s),
                    reference=lambda q, k, v, cu, m, _: wref.varlen_attention(*d64(q, k, v), cu.long(), m, s),
                    exact_ok=tame(q, k, v) and not math.isnan(s), grads=[0, 1, 2])
        return _maybe_mutated(draw, call, ["q", "k", "v", "cu_seqlens", "max_seqlen", "scale"],
                              {"cu_seqlens": _cu_breaker, "max_seqlen": lambda draw, m: -1})
    return draw_call()


# ---------------------------------------------------------------- codebook
def _index_breaker(draw, idx):
    K = draw(st.sampled_from([-1, 2**40 if idx.dtype == torch.int64 else 2**31 - 1]))
    if idx.numel() == 0:
        return torch.tensor([K])
    out = idx.clone()
    out.view(-1)[0] = K
    return out


@strategy("codebook_argmin")
def _argmin(op):
    @st.composite
    def draw_call(draw):
        grouped = draw(st.booleans())
        G, K, D = draw(st.integers(0, 2)) if grouped else 1, draw(st.integers(1, 40)), draw(st.integers(1, 9))
        dtype = draw(st.sampled_from(FLOATS))
        lead = tuple(draw(st.lists(st.integers(0, 4), min_size=1, max_size=2)))
        z = draw(laid_out(draw(values(lead + ((G,) if grouped else ()) + (D,), dtype))))
        cb = draw(laid_out(draw(values(((G,) if grouped else ()) + (K, D), dtype))))
        cosine, exact = draw(st.booleans()), draw(st.booleans())
        call = Call((z, cb, cosine, exact),
                    reference=lambda z, cb, cos, ex: cref.codebook_argmin(*d64(z, cb), cosine=cos, exact=ex),
                    exact_ok=tame(z, cb))
        return _maybe_mutated(draw, call, ["z", "codebook", "cosine", "exact"])
    return draw_call()


@strategy("codebook_lookup")
def _lookup(op):
    @st.composite
    def draw_call(draw):
        grouped = draw(st.booleans())
        G, K, D = draw(st.integers(0, 2)) if grouped else 1, draw(st.integers(1, 30)), draw(st.integers(0, 6))
        lead = tuple(draw(st.lists(st.integers(0, 4), min_size=1, max_size=2)))
        idx = torch.randint(0, K, lead + ((G,) if grouped else ()), dtype=draw(st.sampled_from([torch.int64,
                                                                                                 torch.int32])))
        cb = draw(laid_out(draw(values(((G,) if grouped else ()) + (K, D), draw(st.sampled_from(FLOATS))))))
        call = Call((idx, cb), reference=lambda idx, cb: cref.codebook_lookup(idx, cb.double()), exact_ok=True,
                    grads=[1])
        return _maybe_mutated(draw, call, ["indices", "codebook"], {"indices": _index_breaker})
    return draw_call()


@strategy("codebook_lookup_backward")
def _lookup_bwd(op):
    @st.composite
    def draw_call(draw):
        grouped = draw(st.booleans())
        G, K, D = draw(st.integers(0, 2)) if grouped else 1, draw(st.integers(1, 30)), draw(st.integers(0, 6))
        lead = tuple(draw(st.lists(st.integers(0, 4), min_size=1, max_size=2)))
        idx = torch.randint(0, K, lead + ((G,) if grouped else ()))
        g = draw(laid_out(draw(values(tuple(idx.shape) + (D,), draw(st.sampled_from(FLOATS + (torch.float64,)))))))
        shape = ([G] if grouped else []) + [K, D]
        call = Call((g, idx, shape), reference=lambda g, idx, shape: cref.codebook_lookup_backward(g.double(), idx,
                                                                                                    shape),
                    exact_ok=tame(g))
        return _maybe_mutated(draw, call, ["grad_output", "indices", "codebook_shape"],
                              {"indices": _index_breaker,
                               "codebook_shape": lambda draw, s: draw(st.sampled_from([[3], [2, -1], [1, 1, 1, 1]]))})
    return draw_call()


# ---------------------------------------------------------------- backward ops
def _fwd_outputs(op, args):
    with torch.no_grad():
        return getattr(torch.ops.vitk, op)(*args)


def _grad_like(t, draw):
    # From a drawn seed, so that hypothesis' replays and shrinking see the same grad_out.
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2 ** 31 - 1)))
    return torch.randn(t.shape, dtype=torch.float64, generator=gen).to(t.dtype)


def backward_strategy(bwd_op, fwd_op, build):
    """Calls of ``bwd_op`` from a valid forward call of ``fwd_op`` (its outputs computed by the default
    kernel) and a random grad_out, through ``build(fwd_args, fwd_outputs, grad_out, draw)`` ->
    (bwd args, their names); a quarter of them with one argument broken."""
    @st.composite
    def draw_call(draw):
        fwd = draw(STRATEGIES[fwd_op].filter(lambda c: not c.mutated))
        try:
            outs = _fwd_outputs(fwd_op, fwd.args)
        except (ValueError, RuntimeError):
            # Sizes the forward itself rejects (e.g. a window over the CPU limit): nothing to differentiate.
            from hypothesis import reject
            reject()
        go = _grad_like(outs[0], draw)
        args, names = build(fwd.args, outs, go, draw)
        return _maybe_mutated(draw, Call(args, exact_ok=fwd.exact_ok), names)
    STRATEGIES[bwd_op] = draw_call()


backward_strategy("window_attention_bwd", "window_attention_fwd",
                  lambda a, o, g, draw: ((g, *a[:3], o[0], o[1], a[3], a[4], a[5], a[6], draw(st.booleans())),
                                         ["grad_out", "q", "k", "v", "out", "lse", "window_size", "shift_size",
                                          "rel_pos_bias", "scale", "bias_grad"]))
backward_strategy("varlen_attention_bwd", "varlen_attention_fwd",
                  lambda a, o, g, draw: ((g, *a[:3], o[0], o[1], a[3], a[4], a[5]),
                                         ["grad_out", "q", "k", "v", "out", "lse", "cu_seqlens", "max_seqlen",
                                          "scale"]))
backward_strategy("polyline_attention_bwd", "polyline_attention_fwd",
                  lambda a, o, g, draw: ((g, *a[:5], o[0], o[2], o[1], a[5], a[6], draw(st.booleans())),
                                         ["grad_out", "q", "k", "v", "log_alpha", "log_beta", "out", "parts", "lse",
                                          "scale", "symmetric", "decay_grad"]))
backward_strategy("axial_attention_bwd", "axial_attention_fwd",
                  lambda a, o, g, draw: ((g, *a[:4], o[0], o[1], a[4], a[5], draw(st.booleans())),
                                         ["grad_out", "q", "k", "v", "log_decay", "out", "lse", "axis", "scale",
                                          "decay_grad"]))
backward_strategy("gaussian_mask_attention_bwd", "gaussian_mask_attention_fwd",
                  lambda a, o, g, draw: ((g, *a[:5], o[0], o[1], a[5], draw(st.booleans())),
                                         ["grad_out", "q", "k", "v", "mix_weight", "mix_sigma", "out", "lse", "scale",
                                          "mix_grad"]))
backward_strategy("reduced_attention_bwd", "reduced_attention_fwd",
                  lambda a, o, g, draw: ((g, *a[:3], o[0], o[1], a[3]),
                                         ["grad_out", "q", "k", "v", "out", "lse", "scale"]))


# ---------------------------------------------------------------- other families
# A family's strategies may live in its own ``cases_<family>.py`` beside this file, registered with
# ``strategy`` / ``backward_strategy`` from here; importing them last lets them use everything above.
def _import_family_cases():
    import importlib
    import pathlib
    for path in sorted(pathlib.Path(__file__).parent.glob("cases_*.py")):
        importlib.import_module(path.stem)


_import_family_cases()
