"""Fuzz strategies of the shiftadd family (see cases.py for what a strategy draws)."""
import torch
from hypothesis import strategies as st

from cases import FLOATS, Call, _maybe_mutated, backward_strategy, d64, laid_out, strategy, tame, values
from vitkernels.reference import shiftadd as sref


@strategy("binary_linear_attention", "binary_linear_attention_fwd")
def _binary(op):
    @st.composite
    def draw_call(draw):
        B, N, heads = draw(st.integers(0, 2)), draw(st.integers(0, 12)), draw(st.integers(1, 2))
        d = draw(st.sampled_from([1, 3, 16, 65]))
        dv = draw(st.sampled_from([d, 5]))
        dtype = draw(st.sampled_from(FLOATS))
        q = draw(laid_out(draw(values((B, N, heads, d), dtype))))
        k = draw(laid_out(draw(values((B, N, heads, d), dtype))))
        v = draw(laid_out(draw(values((B, N, heads, dv), dtype))))
        args = (q, k, v) if op == "binary_linear_attention" else (q, k, v, True)
        # A broadcast row or a repeated value can sit exactly at the mean, where fp32 and float64 means
        # may round to different sides: values are held to the reference only for float32 inputs.
        call = Call(args, reference=lambda q, k, v, *_: sref.binary_linear_attention(*d64(q, k, v)),
                    exact_ok=tame(q, k, v) and dtype == torch.float32, grads=[0, 1, 2])
        return _maybe_mutated(draw, call, ["q", "k", "v", "save_for_backward"][:len(args)])
    return draw_call()


backward_strategy("binary_linear_attention_bwd", "binary_linear_attention_fwd",
                  lambda a, o, g, draw: ((g, *a[:3], o[0], o[1], o[2], o[3]),
                                         ["grad_out", "q", "k", "v", "out", "codes", "norms", "state"]))


def _expert_breaker(draw, idx):
    out = idx.clone() if idx.numel() else torch.zeros(1, dtype=torch.int64)
    out[0] = draw(st.sampled_from([-1, 2**40]))
    return out


@strategy("expert_dispatch")
def _dispatch(op):
    @st.composite
    def draw_call(draw):
        T, C, E = draw(st.integers(0, 40)), draw(st.integers(0, 7)), draw(st.integers(1, 4))
        x = draw(laid_out(draw(values((T, C), draw(st.sampled_from(FLOATS + (torch.float64,)))))))
        skew = draw(st.sampled_from(["uniform", "one", "strided"]))
        idx = torch.randint(0, E, (T,)) if skew != "one" else torch.full((T,), E - 1)
        if skew == "strided":
            idx = torch.stack([idx, idx], 1)[:, 0]
        call = Call((x, idx, E), reference=lambda x, i, e: sref.expert_dispatch(x.double(), i, e), grads=[0])
        return _maybe_mutated(draw, call, ["x", "expert_index", "num_experts"],
                              {"expert_index": _expert_breaker, "num_experts": lambda draw, e: 0})
    return draw_call()


def _order_breaker(draw, order):
    if order.numel() < 2:
        return torch.tensor([5, 5][:max(1, order.numel())])
    out = order.clone()
    out[0] = draw(st.sampled_from([out[1].item(), -1, order.numel()]))
    return out


@strategy("expert_combine")
def _combine(op):
    @st.composite
    def draw_call(draw):
        T, C = draw(st.integers(0, 40)), draw(st.integers(0, 7))
        dtype = draw(st.sampled_from(FLOATS + (torch.float64,)))
        y = draw(laid_out(draw(values((T, C), dtype))))
        order = torch.randperm(T)
        gate = draw(values((T,), draw(st.sampled_from([dtype, torch.float32]))))
        call = Call((y, order, gate), reference=lambda y, o, g: sref.expert_combine(*d64(y), o, g.double()),
                    exact_ok=tame(y, gate), grads=[0, 2])
        return _maybe_mutated(draw, call, ["y_sorted", "order", "gate"], {"order": _order_breaker})
    return draw_call()


@strategy("expert_combine_bwd")
def _combine_bwd(op):
    @st.composite
    def draw_call(draw):
        fwd = draw(STRATEGY_COMBINE.filter(lambda c: not c.mutated))
        y, order, gate = fwd.args
        go = draw(values(tuple(y.shape), y.dtype))
        call = Call((go, y, order, gate, draw(st.booleans()), draw(st.booleans())), exact_ok=fwd.exact_ok)
        return _maybe_mutated(draw, call, ["grad_out", "y_sorted", "order", "gate", "y_grad", "gate_grad"],
                              {"order": _order_breaker})
    return draw_call()


STRATEGY_COMBINE = _combine("expert_combine")
