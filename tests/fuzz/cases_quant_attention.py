"""Fuzz strategy of quant_attention: random sizes (odd token counts and head dims, Nk != N, dv != d),
every float dtype and layout with specials (NaN / inf) in q, k, v, random scales, zero points, bits,
bases and δ; broken tensors and out-of-range quantizer parameters. Values are held to the reference
only for NaN placement: a probability on a code boundary may round to the neighbouring code, which
tests/quant_attention bounds and counts."""
import math

from hypothesis import strategies as st

from cases import FLOATS, Call, _maybe_mutated, laid_out, strategy, values
from vitkernels.reference import quant_attention as ref


@strategy("quant_attention")
def _quant_attention(op):
    @st.composite
    def draw_call(draw):
        B, N, Nk, H = draw(st.integers(0, 2)), draw(st.integers(0, 9)), draw(st.integers(1, 9)), draw(st.integers(1, 3))
        d, dv = draw(st.sampled_from([1, 3, 8, 17])), draw(st.sampled_from([1, 5, 16]))
        dtype = draw(st.sampled_from(FLOATS))
        q = draw(laid_out(draw(values((B, N, H, d), dtype))))
        k = draw(laid_out(draw(values((B, Nk, H, d), dtype))))
        v = draw(laid_out(draw(values((B, Nk, H, dv), dtype))))
        scales = [draw(st.sampled_from([0.01, 0.05, 0.3])) for _ in range(3)]
        zeros = [draw(st.integers(-10, 10)) for _ in range(3)]
        bits = draw(st.integers(1, 8))
        base = draw(st.sampled_from([math.sqrt(2.0), 2.0, 1.3]))
        delta = draw(st.sampled_from([1.0, 0.2, 1e-3, 1e6]))
        scale = draw(st.sampled_from([None, 0.37]))
        args = (q, k, v, *scales, *zeros, bits, base, delta, scale)
        names = ["q", "k", "v", "q_scale", "k_scale", "v_scale", "q_zero", "k_zero", "v_zero", "attn_bits",
                 "attn_base", "attn_delta", "scale"]
        call = Call(args, reference=ref.quant_attention, exact_ok=False)
        return _maybe_mutated(draw, call, names, {
            "attn_bits": lambda draw, a: draw(st.sampled_from([0, 9, -1])),
            "attn_base": lambda draw, a: draw(st.sampled_from([1.0, 0.5, float("inf")])),
            "attn_delta": lambda draw, a: draw(st.sampled_from([0.0, -1.0, float("nan")])),
            "q_scale": lambda draw, a: draw(st.sampled_from([0.0, -0.1, float("inf")])),
            "v_zero": lambda draw, a: draw(st.sampled_from([128, -129])),
        })
    return draw_call()
