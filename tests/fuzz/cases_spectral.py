"""Fuzz strategies of the spectral family's ops (registered into cases.STRATEGIES on import)."""
import torch
from hypothesis import strategies as st

from cases import FLOATS, Call, _maybe_mutated, laid_out, strategy, tame, values
from vitkernels.reference import spectral as sref


def _vjp(fn, inputs, grads, *rest):
    """The float64 reference's vector-Jacobian product: what a backward op must return (its first
    output is the gradient of the first input; ``rest`` are further, constant arguments)."""
    leaves = [t.detach().double().requires_grad_(True) for t in inputs]
    outs = fn(*leaves, *rest)
    outs = outs if isinstance(outs, tuple) else (outs,)
    return torch.autograd.grad(outs, leaves, [g.double() for g in grads])


@st.composite
def _image(draw, even=False):
    B, C = draw(st.integers(0, 2)), draw(st.integers(1, 3))
    H, W = draw(st.integers(1, 9)), draw(st.integers(1, 9))
    if even:
        H, W = H + H % 2, W + W % 2
    dtype = draw(st.sampled_from(FLOATS + (torch.float64,)))
    return draw(laid_out(draw(values((B, C, H, W), dtype))))


def _bands(draw, low):
    B, C, H, W = low.shape
    return draw(laid_out(draw(values((B, C, 6, H // 2, W // 2, 2), low.dtype))))


@strategy("dtcwt2d", "idtcwt2d_backward")
def _analysis(op):
    @st.composite
    def draw_call(draw):
        x = draw(_image(even=op == "idtcwt2d_backward"))
        if op == "dtcwt2d":
            call = Call((x,), reference=lambda x: sref.dtcwt2d(x.double()), exact_ok=tame(x), grads=[0])
            return _maybe_mutated(draw, call, ["x"])
        call = Call((x,), reference=lambda g: _vjp(sref.idtcwt2d, _zeros_like_bands(g), (g,)), exact_ok=tame(x))
        return _maybe_mutated(draw, call, ["grad_output"])
    return draw_call()


def _zeros_like_bands(g):
    B, C, H, W = g.shape
    return (torch.zeros(B, C, H, W, dtype=torch.float64), torch.zeros(B, C, 6, H // 2, W // 2, 2, dtype=torch.float64))


@strategy("idtcwt2d", "dtcwt2d_backward")
def _synthesis(op):
    @st.composite
    def draw_call(draw):
        low = draw(_image(even=True))
        high = _bands(draw, low)
        if op == "idtcwt2d":
            call = Call((low, high), reference=lambda lo, hi: sref.idtcwt2d(lo.double(), hi.double()),
                        exact_ok=tame(low, high), grads=[0, 1])
            return _maybe_mutated(draw, call, ["lowpass", "highpass"])
        size = [low.shape[2] - draw(st.integers(0, 1)), low.shape[3] - draw(st.integers(0, 1))]
        x0 = torch.zeros(low.shape[0], low.shape[1], *size, dtype=torch.float64)
        call = Call((low, high, size), reference=lambda lo, hi, s: _vjp(sref.dtcwt2d, (x0,), (lo, hi)),
                    exact_ok=tame(low, high))
        return _maybe_mutated(draw, call, ["grad_lowpass", "grad_highpass", "input_size"],
                              {"input_size": lambda draw, s: [s[0] + 2, s[1]]})
    return draw_call()


@strategy("svt_spectral_mix", "svt_spectral_mix_backward")
def _svt(op):
    names = ["x", "weight_ll", "weight_1", "bias_1", "weight_2", "bias_2"]

    @st.composite
    def draw_call(draw):
        B, H, W = draw(st.integers(0, 2)), 2 * draw(st.integers(1, 4)), 2 * draw(st.integers(1, 4))
        nb, bs = draw(st.integers(1, 3)), draw(st.integers(1, 4))
        C = nb * bs
        dtype = draw(st.sampled_from(FLOATS + (torch.float64,)))
        pdtype = draw(st.sampled_from((dtype, torch.float32)))
        x = draw(laid_out(draw(values((B, H, W, C), dtype))))
        params = [draw(laid_out(draw(values(shape, pdtype)))) for shape in
                  ((C, H, W), (2, nb, bs, bs), (2, nb, bs), (2, nb, bs, bs), (2, nb, bs))]
        if op == "svt_spectral_mix":
            call = Call((x, *params), reference=lambda *a: sref.svt_spectral_mix(*(t.double() for t in a)),
                        exact_ok=tame(x, *params), grads=[0, 1, 2, 3, 4, 5])
            return _maybe_mutated(draw, call, names)
        g = draw(laid_out(draw(values((B, H, W, C), dtype))))
        call = Call((g, x, *params), reference=lambda g, *a: _vjp(sref.svt_spectral_mix, a, (g,)),
                    exact_ok=tame(g, x, *params))
        return _maybe_mutated(draw, call, ["grad_output"] + names)
    return draw_call()


def _input_and_filter(draw, x_shape, w_shape):
    """An input of a float dtype and a filter of that dtype or fp32, each in a drawn layout."""
    dtype = draw(st.sampled_from(FLOATS + (torch.float64,)))
    x = draw(laid_out(draw(values(x_shape, dtype))))
    w = draw(laid_out(draw(values(w_shape, draw(st.sampled_from((dtype, torch.float32)))))))
    return x, w, dtype


@strategy("global_filter", "global_filter_backward")
def _global_filter(op):
    @st.composite
    def draw_call(draw):
        B, H, W, C = draw(st.integers(0, 2)), draw(st.integers(1, 8)), draw(st.integers(1, 8)), draw(st.integers(1, 5))
        x, w, dtype = _input_and_filter(draw, (B, H, W, C), (H, W // 2 + 1, C, 2))
        if op == "global_filter":
            call = Call((x, w), reference=lambda x, w: sref.global_filter(x.double(), w.double()),
                        exact_ok=tame(x, w), grads=[0, 1])
            return _maybe_mutated(draw, call, ["x", "weight"])
        g = draw(laid_out(draw(values((B, H, W, C), dtype))))
        flags = (draw(st.booleans()), draw(st.booleans()))
        call = Call((g, x, w, *flags),
                    reference=(lambda g, x, w, *_: _vjp(sref.global_filter, (x, w), (g,))) if flags[0] else None,
                    exact_ok=tame(g, x, w) and flags[0])
        return _maybe_mutated(draw, call, ["grad_output", "x", "weight", "x_grad", "weight_grad"])
    return draw_call()


def _direct_fftconv2d(u, k, D=None):
    """fftconv2d as the direct sum over the taps in float64: the same products as the kernels, so a
    NaN or an infinity reaches the same outputs (Hyena's FFT would spread it over the plane)."""
    u, k = u.double(), k.double()
    H, W = u.shape[-2:]
    y = torch.zeros_like(u)
    for a in range(H):
        for q in range(W):
            y[..., a:, q:] = y[..., a:, q:] + k[:, a, q, None, None] * u[..., :H - a, :W - q]
    return y if D is None else y + u * D.double()[:, None, None]


@strategy("fftconv2d", "fftconv2d_backward")
def _fftconv2d(op):
    @st.composite
    def draw_call(draw):
        B, C, H, W = draw(st.integers(0, 2)), draw(st.integers(1, 20)), draw(st.integers(1, 9)), draw(st.integers(1, 9))
        u, k, dtype = _input_and_filter(draw, (B, C, H, W), (C, H, W))
        D = draw(values((C,), dtype)) if draw(st.booleans()) else None
        if op == "fftconv2d":
            call = Call((u, k, D), reference=_direct_fftconv2d, exact_ok=tame(u, k, D), grads=[0, 1, 2])
            return _maybe_mutated(draw, call, ["u", "k", "D"])
        g = draw(laid_out(draw(values((B, C, H, W), dtype))))
        flags = (draw(st.booleans()), draw(st.booleans()), draw(st.booleans()))
        call = Call((g, u, k, D, *flags),
                    reference=(lambda g, u, k, D, *_: _vjp(_direct_fftconv2d, (u, k), (g,), D)) if flags[0] else None,
                    exact_ok=tame(g, u, k, D) and flags[0])
        return _maybe_mutated(draw, call, ["grad_output", "u", "k", "D", "u_grad", "k_grad", "D_grad"])
    return draw_call()
