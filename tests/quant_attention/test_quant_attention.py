"""quant_attention on every backend against the float64 reference (vitkernels/reference/quant_attention.py).

The kernel's int8 codes and integer dot products are exact, so the only difference from the reference
is fp32 rounding: a probability within fp32 rounding of a code boundary may land in the neighbouring
code (a boundary flip). The tolerance admits exactly that: the reference's own exponent
t = -log(P / δ) / log(base) is computed in float64, the entries with t within fp32 rounding of a
rounding boundary k + 1/2 (k >= 0) are the candidates, and the output may differ from the reference by
the candidates' |P̂(k) - P̂(k + 1)| |v̂| plus fp32 summation error. With v̂ = s_v I the output is P̂
itself, so the flips are counted one by one and each must be a candidate.
"""
import math

import pytest
import torch

import vitkernels
from vitkernels.ops.quant_attention import _check_quant_attention
from vitkernels.reference import quant_attention as ref

from conftest import backend_params

BACKENDS = backend_params("quant_attention")
SQRT2 = math.sqrt(2.0)


def packed_qkv(B, N, H, d, dtype=torch.float32, amp=2.0):
    """q, k, v as strided views of one packed qkv projection [B, N, 3, H, d]."""
    qkv = torch.randn(B, N, 3, H, d, dtype=torch.float64) * amp
    qkv = qkv.to(dtype)
    return qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]


def scale_of(t, z=0, frac=0.8):
    """A per-tensor scale that clamps the largest few values (frac < 1)."""
    return float(t.double().abs().max()) * frac / (127 - abs(z))


def exponents(q, k, args):
    """(t, P) in float64: t = -log(P / δ) / log(base) of every (query, key), [B, H, N, Nk]."""
    (qs, ks, _vs, qz, kz, _vz, bits, base, delta, scale) = args
    d = q.shape[-1]
    scale = d ** -0.5 if scale is None else scale
    qh = ref.fake_quant_int8(q.double(), qs, qz).transpose(1, 2)
    kh = ref.fake_quant_int8(k.double(), ks, kz).transpose(1, 2)
    x = scale * (qh @ kh.transpose(-1, -2))
    p = torch.softmax(x, -1)
    return -torch.log(p / delta) / math.log(base), p, x


def flip_candidates(q, k, args):
    """[B, H, N, Nk] bool: entries whose code an fp32 evaluation may round to the neighbouring code, and
    the |P̂| difference such a flip makes."""
    t, p, x = exponents(q, k, args)
    bits, base, delta = args[6], args[7], args[8]
    m = x.amax(-1, keepdim=True)
    r = 1 / math.log(base)
    eps = 4 * (r * (3e-7 * (m.abs() + x.abs()) + 1e-7 * x.shape[-1] + 1e-6) + 3e-7 * t.abs()) + 1e-6
    lo = torch.floor(t - 0.5)                  # t near lo + 1/2: codes lo and lo + 1
    near = ((t - (lo + 0.5)).abs() < eps) | ((t - (lo + 1.5)).abs() < eps)
    k0 = torch.where((t - (lo + 0.5)).abs() < eps, lo, lo + 1)
    near &= (k0 >= 0) & (p > 0)
    L = 2 ** bits
    w = lambda c: torch.where(c < L, delta * base ** (-c.clamp(0, L)), torch.zeros_like(c))  # noqa: E731
    return near, (w(k0) - w(k0 + 1)).abs() * near


def check_close(out, q, k, v, args, rtol=2e-5):
    """out against the reference, allowing boundary flips only; returns the number of candidates."""
    want = ref.quant_attention(q, k, v, *args[:6], attn_bits=args[6], attn_base=args[7], attn_delta=args[8],
                               scale=args[9]).double()
    near, dw = flip_candidates(q, k, args)
    vh = ref.fake_quant_int8(v.double(), args[2], args[5]).transpose(1, 2).abs()      # [B, H, Nk, dv]
    t, p, x = exponents(q, k, args)
    p_hat = ref.log_quantize(p, args[6], args[7], args[8])
    bound = (dw @ vh + rtol * (p_hat @ vh)).transpose(1, 2) + 1e-30
    err = (out.double() - want).abs()
    assert out.dtype == q.dtype and tuple(out.shape) == tuple(want.shape)
    assert bool((err <= bound).all()), f"max excess {float((err - bound).max()):.3g}, candidates {int(near.sum())}"
    return int(near.sum())


def call(q, k, v, args):
    (qs, ks, vs, qz, kz, vz, bits, base, delta, scale) = args
    return vitkernels.quant_attention(q, k, v, qs, ks, vs, q_zero=qz, k_zero=kz, v_zero=vz, attn_bits=bits,
                                      attn_base=base, attn_delta=delta, scale=scale)


CASES = [  # B, N, H, d, bits, base, delta factor (of the largest probability), zero points
    (2, 1, 3, 32, 4, SQRT2, 1.0, (0, 0, 0)),
    (1, 2, 2, 64, 3, 2.0, 0.5, (3, -5, 7)),
    (2, 50, 3, 80, 4, 1.3, 0.3, (0, 0, 0)),
    (1, 50, 2, 64, 8, SQRT2, 1.0, (-7, 2, -1)),
    (2, 197, 3, 64, 4, SQRT2, 0.5, (0, 0, 0)),
    (1, 197, 2, 32, 8, 1.3, 0.2, (10, 0, -3)),
    (1, 577, 1, 80, 4, 2.0, 0.8, (0, 4, 0)),
]


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("B,N,H,d,bits,base,dfrac,zeros", CASES)
def test_against_reference(backend, device, B, N, H, d, bits, base, dfrac, zeros, run_on):
    if backend == "triton" and device == "cpu" and B * N * H > 400:
        pytest.skip("Triton under the interpreter: small shapes only (the large ones run on a GPU)")
    q, k, v = packed_qkv(B, N, H, d)
    qz, kz, vz = zeros
    # δ below the row maxima (dfrac < 1) makes the clamp to code 0 happen.
    pmax = float(exponents(q, k, (scale_of(q, qz), scale_of(k, kz), 1.0, qz, kz, vz, bits, base, 1.0, None))[1]
                 .amax())
    args = (scale_of(q, qz), scale_of(k, kz), scale_of(v, vz), qz, kz, vz, bits, base, pmax * dfrac, None)
    out = run_on(backend, call, q, k, v, args)
    n = check_close(out, q, k, v, args)
    assert n <= max(2, out.numel() // 100), f"{n} boundary candidates"


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("N,d,bits,base", [(1, 32, 4, SQRT2), (2, 64, 3, 2.0), (50, 64, 8, 1.3), (50, 80, 4, SQRT2),
                                            (31, 32, 8, SQRT2)])
def test_codes_exact(backend, device, N, d, bits, base, run_on):
    """v̂ = I makes the output P̂ itself: every differing probability must be a boundary candidate."""
    B, H = 2, 2
    q, k, _ = packed_qkv(B, N, H, d, amp=3.0)
    v = torch.zeros(B, N, H, d)
    v[:, torch.arange(N), :, torch.arange(N)] = 1.0
    args = (scale_of(q), scale_of(k), 1.0 / 64, 0, 0, 0, bits, base, 0.4, 0.3)
    out = run_on(backend, call, q, k, v, args)
    got = out[..., :N].transpose(1, 2).double()           # v̂ = I: out is P̂ itself, [B, H, N, Nk]
    t, p, _ = exponents(q, k, args)
    want = ref.log_quantize(p, bits, base, 0.4)
    near, _ = flip_candidates(q, k, args)
    differ = (got - want).abs() > 1e-6 * want.abs().clamp(min=1e-30)
    assert not bool((differ & ~near).any()), f"{int((differ & ~near).sum())} flips away from a boundary"
    assert int(differ.sum()) <= int(near.sum())


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_all_probabilities_below_grid(backend, device, run_on):
    """δ far above every probability: every P̂ is 0 and so is the output (no renormalization)."""
    q, k, v = packed_qkv(2, 37, 2, 32)
    args = (scale_of(q), scale_of(k), scale_of(v), 0, 0, 0, 3, 2.0, 1e6, None)
    out = run_on(backend, call, q, k, v, args)
    assert torch.equal(out, torch.zeros_like(out))


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_probabilities_underflow(backend, device, run_on):
    """A huge softmax scale: all but the row maxima underflow to P = 0 exactly, in the reference too."""
    q, k, v = packed_qkv(1, 41, 2, 64)
    args = (scale_of(q), scale_of(k), scale_of(v), 0, 0, 0, 8, 1.01, 1.0, 1e4)
    p = exponents(q, k, args)[1]
    assert float((p == 0).double().mean()) > 0.9
    out = run_on(backend, call, q, k, v, args)
    check_close(out, q, k, v, args)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_dtypes(backend, device, dtype, run_on):
    q, k, v = packed_qkv(2, 23, 2, 64, dtype=dtype)
    args = (scale_of(q), scale_of(k), scale_of(v), 0, 1, 0, 4, SQRT2, 0.3, None)
    out = run_on(backend, call, q, k, v, args)
    want = ref.quant_attention(q, k, v, *args[:6], attn_bits=4, attn_base=SQRT2, attn_delta=0.3)
    assert out.dtype == dtype
    _, dw = flip_candidates(q, k, args)
    vh = ref.fake_quant_int8(v.double(), args[2], 0).transpose(1, 2).abs()
    bound = (dw @ vh).transpose(1, 2) + 1e-2 * want.double().abs() + 1e-3
    assert bool(((out.double() - want.double()).abs() <= bound).all())


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_nan_propagates_as_reference(backend, device, run_on):
    q, k, v = packed_qkv(2, 19, 2, 32)
    q, k, v = q.clone(), k.clone(), v.clone()
    q[0, 3, 1, 5] = float("nan")         # one query row
    k[1, 7, 0, 2] = float("nan")         # a whole head of image 1
    v[0, 11, 0, 9] = float("nan")        # one value column of image 0, head 0
    q[1, 2, 1, 0] = float("inf")         # infinities quantize to the int8 limits
    args = (0.05, 0.05, 0.05, 0, 0, 0, 4, SQRT2, 0.5, None)
    out = run_on(backend, call, q, k, v, args)
    want = ref.quant_attention(q, k, v, *args[:6], attn_bits=4, attn_base=SQRT2, attn_delta=0.5)
    assert torch.equal(torch.isnan(out), torch.isnan(want))
    assert int(torch.isnan(want).sum()) > 0 and int((~torch.isnan(want)).sum()) > 0


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_different_key_count_and_value_dim(backend, device, run_on):
    q = torch.randn(2, 9, 2, 32)
    k = torch.randn(2, 13, 2, 32)
    v = torch.randn(2, 13, 2, 48)[..., ::2].contiguous()[..., :24]
    args = (scale_of(q), scale_of(k), scale_of(v), 0, 0, 0, 4, 2.0, 0.5, 0.2)
    out = run_on(backend, call, q, k, v, args)
    assert tuple(out.shape) == (2, 9, 2, 24)
    check_close(out, q, k, v, args)


BAD = [
    (dict(attn_bits=0), "attn_bits"), (dict(attn_bits=9), "attn_bits"),
    (dict(attn_base=1.0), "attn_base"), (dict(attn_base=0.5), "attn_base"),
    (dict(attn_delta=0.0), "attn_delta"), (dict(q_scale=0.0), "q_scale"), (dict(k_scale=-1.0), "k_scale"),
    (dict(v_scale=float("nan")), "v_scale"), (dict(scale=-0.1), "scale"), (dict(q_zero=200), "q_zero"),
    (dict(k=torch.randn(2, 5, 2, 16)), "k"), (dict(v=torch.randn(2, 4, 2, 8)), "v"),
    (dict(q=torch.randn(2, 5, 32)), "q"), (dict(v=torch.randn(2, 5, 2, 8, dtype=torch.float64)), "v"),
]


@pytest.mark.parametrize("bad,name", BAD)
def test_bad_input(bad, name):
    base = dict(q=torch.randn(2, 5, 2, 32), k=torch.randn(2, 5, 2, 32), v=torch.randn(2, 5, 2, 8), q_scale=0.1,
                k_scale=0.1, v_scale=0.1, q_zero=0, k_zero=0, v_zero=0, attn_bits=4, attn_base=SQRT2, attn_delta=1.0,
                scale=None)
    base.update(bad)
    a = base
    with pytest.raises(ValueError, match=f"^{name}:"):             # the C++ kernel's check
        torch.ops.vitk.quant_attention(a["q"], a["k"], a["v"], a["q_scale"], a["k_scale"], a["v_scale"],
                                       q_zero=a["q_zero"], k_zero=a["k_zero"], v_zero=a["v_zero"],
                                       attn_bits=a["attn_bits"], attn_base=a["attn_base"],
                                       attn_delta=a["attn_delta"], scale=a["scale"])
    with pytest.raises(ValueError, match=f"^{name}:"):             # the Python check (fake kernel, router)
        _check_quant_attention(*a.values())


def test_gradient_refused():
    q, k, v = packed_qkv(1, 7, 2, 32)
    q.requires_grad_(True)
    out = vitkernels.quant_attention(q, k, v, 0.05, 0.05, 0.05)
    with pytest.raises(RuntimeError, match="quant_attention: has no gradient"):
        out.sum().backward()


def test_opcheck():
    q, k, v = packed_qkv(2, 11, 2, 32)
    torch.library.opcheck(torch.ops.vitk.quant_attention.default, (q, k, v, 0.05, 0.06, 0.07),
                          dict(q_zero=1, attn_bits=3, attn_base=2.0, attn_delta=0.5, scale=0.2))
    torch.library.opcheck(torch.ops.vitk.quant_attention.default, (q, k, v, 0.05, 0.06, 0.07))


def test_compile_fullgraph():
    class Attn(torch.nn.Module):
        def __init__(self, H, d):
            super().__init__()
            self.qkv = torch.nn.Linear(H * d, 3 * H * d)
            self.H, self.d = H, d

        def forward(self, x):
            B, N, _ = x.shape
            qkv = self.qkv(x).view(B, N, 3, self.H, self.d)
            o = vitkernels.quant_attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], 0.02, 0.02, 0.02,
                                           attn_bits=4, attn_delta=0.25)
            return o.reshape(B, N, -1)

    m = Attn(3, 32).eval()
    x = torch.randn(2, 17, 96)
    torch._dynamo.reset()
    with torch.no_grad(), torch._dynamo.config.patch(error_on_recompile=True):
        eager = m(x)
        compiled = torch.compile(m, fullgraph=True)
        torch.testing.assert_close(compiled(x), eager)
        y = torch.randn(2, 17, 96)
        torch.testing.assert_close(compiled(y), m(y))     # same shapes: no recompile (it would raise)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("half", [0.5, 3.5, 2.5, 1.5, 100.5])
def test_int8_codes_on_rounding_ties(backend, device, half, run_on):
    """One key, δ = 1: P̂ = 1 and out = v̂ exactly, so v's codes are seen one by one. v_scale makes some
    quotients v / v_scale exact half-integers in double (ties go to even, as torch.round does) and
    others 1 ulp away from one."""
    x0 = 0.7853981633974483
    v = (torch.randn(2, 1, 3, 40) * 2).float()
    v.view(-1)[::3] = x0
    v.view(-1)[1::3] = torch.tensor(x0).float().nextafter(torch.tensor(1.0))
    v.view(-1)[::6] = -x0
    v_scale = float(torch.tensor(x0).float()) / half
    q, k = torch.randn(2, 1, 3, 40), torch.randn(2, 1, 3, 40)
    args = (0.1, 0.1, v_scale, 0, 0, 3, 4, SQRT2, 1.0, None)
    out = run_on(backend, call, q, k, v, args)
    want = ref.quant_attention(q, k, v, *args[:6], attn_delta=1.0)
    assert torch.equal(out, want)
