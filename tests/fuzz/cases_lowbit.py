"""Fuzz strategies of the lowbit family: random sizes (K odd where the format allows it), every
activation, bias or not, x in any layout with specials; gradients are tested in tests/lowbit."""
import torch
from hypothesis import strategies as st

from cases import FLOATS, Call, _maybe_mutated, laid_out, strategy, tame, values
from vitkernels import lowbit as pack
from vitkernels.reference import lowbit as ref

ACTS = ["none", "relu", "gelu", "gelu_tanh"]


@st.composite
def _sizes(draw, even_k=False):
    lead = tuple(draw(st.lists(st.integers(0, 3), min_size=1, max_size=2)))
    K = draw(st.integers(1, 40)) * (2 if even_k else 1)
    return lead, K, draw(st.integers(1, 40))


def _weight(N, K, seed):
    return torch.randn(N, K, generator=torch.Generator().manual_seed(seed))


@strategy("quantize_per_token", "int8_linear", "dynamic_int8_linear", "int4_linear", "int4_int8_linear",
          "shift_linear")
def _lowbit(op):
    @st.composite
    def draw_call(draw):
        even = op in ("int4_linear", "int4_int8_linear", "shift_linear")
        lead, K, N = draw(_sizes(even))
        x = draw(laid_out(draw(values(lead + (K,), draw(st.sampled_from(FLOATS))))))
        w = _weight(N, K, draw(st.integers(0, 2**31 - 1)))
        act = draw(st.sampled_from(ACTS))
        bias = torch.randn(N) if draw(st.booleans()) else None
        sym = draw(st.booleans())
        if op == "quantize_per_token":
            args, names = (x, sym), ["x", "symmetric"]
            reference = lambda x, s: ref.quantize_per_token(x, s)  # noqa: E731
        elif op in ("int8_linear", "dynamic_int8_linear"):
            wq, ws = pack.pack_int8(w)
            if draw(st.booleans()):
                wq = pack.block_int8(wq)
            if op == "dynamic_int8_linear":
                args, names = (x, wq, ws, bias, act, sym), ["x", "w_q", "w_scale", "bias", "activation", "symmetric"]
                reference = ref.dynamic_int8_linear
            else:
                q, s, z = ref.quantize_per_token(x, sym)
                args = (q, s, None if sym else z, wq, ws, bias, act, None)
                names = ["x_q", "x_scale", "x_zero_point", "w_q", "w_scale", "bias", "activation", "out_dtype"]
                reference = ref.int8_linear
        elif op == "int4_linear":
            gs = draw(st.sampled_from([g for g in (32, 64, 128, K) if K % g == 0]))
            wp, sc, z = pack.pack_int4(w, gs, sym)
            args, names = (x, wp, sc, z, gs, bias, act), ["x", "w_packed", "w_scale", "w_zero", "group_size", "bias",
                                                          "activation"]
            reference = ref.int4_linear
        elif op == "int4_int8_linear":
            wp, sc, _ = pack.pack_int4(w, K, True)
            args, names = (x, wp, sc.view(-1), bias, act), ["x", "w_packed", "w_scale", "bias", "activation"]
            reference = ref.int4_int8_linear
        else:
            wp, sc = pack.pack_shift(w)
            args, names = (x, wp, sc if sym else None, bias, act), ["x", "w_packed", "w_scale", "bias", "activation"]
            reference = ref.shift_linear
        call = Call(args, reference=reference, exact_ok=tame(x) and x.dtype == torch.float32)
        return _maybe_mutated(draw, call, names,
                              {"activation": lambda draw, a: draw(st.sampled_from(["swish", "GELU", ""]))})
    return draw_call()
