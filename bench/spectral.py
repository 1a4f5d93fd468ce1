"""Spectral family at the papers' shapes, batch 8.

SVT-S, fp32:

  dtcwt2d     torch.ops.vitk.dtcwt2d, x [8, C, H, W]                     (forward)
  idtcwt2d    torch.ops.vitk.idtcwt2d, from dtcwt2d's outputs            (forward)
  roundtrip   idtcwt2d(dtcwt2d(x)), forward+backward (both adjoints)
  svt         torch.ops.vitk.svt_spectral_mix, SVT's whole spectral layer, forward and forward+backward
              (leaves: x and the five parameters)

at SVT-S stage 1 (56 x 56, C = 64, 4 blocks of 16) and stage 2 (28 x 28, C = 128, 4 blocks of 32).

GFNet, fp32 and bf16 (GFNet's complex_weight stays fp32, as in its model):
  global_filter   torch.ops.vitk.global_filter, x [8, H, W, C], forward and forward+backward (x, weight)
at GFNet-S (14 x 14, C = 384) and GFNet-H stage 1 (56 x 56, C = 96). The eager reference is GFNet's
own rfft2 / irfft2 (in fp32, cast back to bf16 for a bf16 input, as SpectFormer does).

Multi-Dimensional Hyena, fp32:
  fftconv2d   torch.ops.vitk.fftconv2d, u [8, C, H, W], k [C, H, W], D [C], forward and forward+backward
at 14 x 14 and 28 x 28, C = 192. The eager reference is Hyena's 2H x 2W zero-padded rfft2 product.

Contenders: vitk; the float64-correct eager reference (vitkernels.reference.spectral, conv1d filter
banks) and torch.compile of it; and the peer, pytorch_wavelets 1.3.0 (what SVT runs: DTCWTForward(J=1,
near_sym_b, qshift_b) / DTCWTInverse, and for svt SVT's SVT_channel_mixing forward, transcribed, on
them). The peer's modules are built outside the timed region.

Bytes: the transforms are bandwidth-bound: x once, the lowpass (x's size) and the highpass (1.5 x's
size... 6 orientations of a quarter-size complex plane: 3 x x's size) once each; the inverse reads
both and writes x's size; the roundtrip's forward+backward does that twice. svt: x read once, the
output written once, the parameters (weight_ll is x's size per image) once; backward adds grad_out and
one gradient per leaf. FLOPs: the useful filter-bank multiply-adds (13 + 19 taps per row pass, twice
that per column pass, per input pixel, 2 FLOPs each) and the block MLP's 8 * bs FLOPs per channel
and position per layer. global_filter: x read, y written, the filter once (backward: grad_out and x
read, both gradients written); FLOPs of the kernel's FFTs over channel vectors. fftconv2d: u read, y written, k and D once
(backward: grad_out and u read, the three gradients written); FLOPs of the direct sum,
2 (H(H+1)/2)(W(W+1)/2) per plane (the backward twice that).
"""
import math
import sys
from pathlib import Path

import torch

from harness import Case, Family, Peer
from harness.checks import rel_error

CHECK_TOL = 1e-4        # max |error| / max |fp64 value|
FP32 = 4.0
BATCH = 8
# Per input pixel: row pass 13 + 19 taps, column pass 2 x (13 + 19), a multiply-add each.
TRANSFORM_FLOPS = 2.0 * 3 * (13 + 19)


def _pywt():
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "spectral"))
    from pytorch_wavelets_peer import transforms
    return transforms


def _case(name, kind, H, C, nb, backward=False):
    px = BATCH * C * H * H
    x = px * FP32
    if kind == "dtcwt2d" or kind == "idtcwt2d":
        bytes_, flops = x * 5, px * TRANSFORM_FLOPS
    elif kind == "roundtrip":
        bytes_, flops = x * 5 * 2 * (2 if backward else 1), px * TRANSFORM_FLOPS * 2 * (2 if backward else 1)
    else:
        bs = C // nb
        params = (C * H * H + 4 * nb * bs * bs + 4 * nb * bs) * FP32
        bytes_ = 2 * x + params + ((2 * x + params) if backward else 0)
        mlp = 2 * (6 * (H // 2) ** 2) * BATCH * C * 8 * bs
        flops = (2 * px * TRANSFORM_FLOPS + mlp) * (3 if backward else 1)
    return Case(name=f"{name}-{kind}" + ("-fwd+bwd" if backward else "-fwd"),
                shape=f"B={BATCH} C={C} {H}x{H}" + (f" nb={nb}" if kind == "svt" else ""),
                params=dict(kind=kind, H=H, C=C, nb=nb), flops=flops, bytes=bytes_, backward=backward)


def _radices(n):
    """The radices spectral_fft.h's LaneFft takes n apart into: 4s, then 2s, then odd primes."""
    out = []
    for r in (4, 2):
        while n % r == 0:
            out.append(r)
            n //= r
    p = 3
    while n > 1:
        while n % p == 0:
            out.append(p)
            n //= p
        p += 2
    return out


def _fft_flops(n):
    """Real FLOPs per lane of one n-point complex LaneFft: per stage, n / R butterflies of R - 1
    twiddle rotations (6 FLOPs) and the R-point DFT (radix 2: 4, radix 4: 16, odd R in its symmetric
    form with P = (R - 1) / 2: 6P for the sums and differences, P (8P + 4) for the outputs)."""
    total = 0
    for R in _radices(n):
        P = (R - 1) // 2
        dft = {2: 4, 4: 16}.get(R, 6 * P + P * (8 * P + 4))
        total += n // R * (6 * (R - 1) + dft)
    return total


def _global_filter_flops(H, W):
    """FLOPs per image and channel of the CPU kernel (csrc/cpu/spectral/global_filter.cpp): the real
    FFT along W (even W: a W/2-point complex one and the split, 20 FLOPs per frequency), both FFTs
    along H per spectrum column and the filter product (6 FLOPs), the inverse real FFT along W."""
    K = W // 2 + 1
    row = _fft_flops(W // 2) + 20 * K if W % 2 == 0 else _fft_flops(W)
    return 2 * H * row + K * (2 * _fft_flops(H) + 6 * H)


def _gf_case(name, H, C, dtype, backward):
    x = BATCH * H * H * C * (2.0 if dtype == "bf16" else FP32)
    K = H // 2 + 1
    w = H * K * C * 2 * FP32
    flops = float(BATCH * C * _global_filter_flops(H, H))
    bytes_ = 2 * x + w + ((3 * x + 2 * w) if backward else 0)
    return Case(name=f"{name}-global_filter-{dtype}" + ("-fwd+bwd" if backward else "-fwd"),
                shape=f"B={BATCH} {H}x{H} C={C} {dtype}", params=dict(kind="global_filter", H=H, C=C, dtype=dtype),
                flops=flops * (3 if backward else 1), bytes=bytes_, backward=backward)


def _hyena_case(H, C, backward):
    u = BATCH * C * H * H * FP32
    flops = BATCH * C * (2.0 * (H * (H + 1) // 2) ** 2 + 2 * H * H)
    params = (C * H * H + C) * FP32
    bytes_ = 2 * u + params + ((3 * u + 2 * params) if backward else 0)
    return Case(name=f"Hyena-{H}-fftconv2d" + ("-fwd+bwd" if backward else "-fwd"), shape=f"B={BATCH} C={C} {H}x{H}",
                params=dict(kind="fftconv2d", H=H, C=C, dtype="fp32"), flops=flops * (3 if backward else 1),
                bytes=bytes_, backward=backward)


CASES = [c for name, H, C in (("SVT-S-s1", 56, 64), ("SVT-S-s2", 28, 128))
         for c in (_case(name, "dtcwt2d", H, C, 4), _case(name, "idtcwt2d", H, C, 4),
                   _case(name, "roundtrip", H, C, 4, backward=True),
                   _case(name, "svt", H, C, 4), _case(name, "svt", H, C, 4, backward=True))]
CASES += [_gf_case(name, H, C, dtype, backward) for name, H, C in (("GFNet-S", 14, 384), ("GFNet-H-s1", 56, 96))
          for dtype in ("fp32", "bf16") for backward in (False, True)]
CASES += [_hyena_case(H, 192, backward) for H in (14, 28) for backward in (False, True)]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def make_inputs(case, gen):
    p = case.params
    if p["kind"] in ("global_filter", "fftconv2d"):
        return _transform_inputs(case, gen)
    H, C, nb = p["H"], p["C"], p["nb"]
    bs = C // nb
    if p["kind"] == "svt":
        x = {"x": torch.randn(BATCH, H, H, C, generator=gen),
             "weight_ll": torch.randn(C, H, H, generator=gen) * 0.02,
             "weight_1": torch.randn(2, nb, bs, bs, generator=gen) * 0.02,
             "bias_1": torch.randn(2, nb, bs, generator=gen) * 0.02,
             "weight_2": torch.randn(2, nb, bs, bs, generator=gen) * 0.02,
             "bias_2": torch.randn(2, nb, bs, generator=gen) * 0.02}
        if case.backward:
            for t in x.values():
                t.requires_grad_(True)
            x["grad_out"] = torch.randn(BATCH, H, H, C, generator=gen)
        return x
    x = {"x": torch.randn(BATCH, C, H, H, generator=gen)}
    if p["kind"] == "idtcwt2d":
        import vitkernels  # noqa: F401
        x["low"], x["high"] = (t.contiguous() for t in torch.ops.vitk.dtcwt2d(x["x"]))
    if case.backward:
        x["x"].requires_grad_(True)
        x["grad_out"] = torch.randn(BATCH, C, H, H, generator=gen)
    return x


def _transform_inputs(case, gen):
    p = case.params
    H, C = p["H"], p["C"]
    if p["kind"] == "global_filter":
        x = {"x": torch.randn(BATCH, H, H, C, generator=gen).to(DTYPES[p["dtype"]]),
             "weight": torch.randn(H, H // 2 + 1, C, 2, generator=gen) * 0.02}
    else:
        x = {"u": torch.randn(BATCH, C, H, H, generator=gen), "k": torch.randn(C, H, H, generator=gen) / (2 * H),
             "D": torch.randn(C, generator=gen)}
    if case.backward:
        for t in x.values():
            t.requires_grad_(True)
        first = next(iter(x.values()))
        x["grad_out"] = torch.randn(first.shape, generator=gen).to(first.dtype)
    return x


_SVT_ARGS = ("x", "weight_ll", "weight_1", "bias_1", "weight_2", "bias_2")
_ARGS = {"svt": _SVT_ARGS, "global_filter": ("x", "weight"), "fftconv2d": ("u", "k", "D")}


def _call(ops, case, x):
    kind = case.params["kind"]
    if kind == "dtcwt2d":
        return ops.dtcwt2d, (x["x"],), {}
    if kind == "idtcwt2d":
        return ops.idtcwt2d, (x["low"], x["high"]), {}
    if kind == "roundtrip":
        return (lambda t: ops.idtcwt2d(*ops.dtcwt2d(t))), (x["x"],), {}
    fn = {"svt": ops.svt_spectral_mix, "global_filter": ops.global_filter, "fftconv2d": ops.fftconv2d}[kind]
    return fn, tuple(x[n] for n in _ARGS[kind]), {}


def _gfnet_global_filter(x, weight):
    """GFNet's forward: the FFTs in fp32 (torch.fft has no bf16 on the CPU), back to the input's dtype."""
    from vitkernels.reference import spectral
    return spectral.global_filter(x.float(), weight).to(x.dtype)


def vitk(case, x):
    import vitkernels
    return _call(vitkernels, case, x)


def reference(case, x):
    from vitkernels.reference import spectral
    if case.params["kind"] == "global_filter":
        return _gfnet_global_filter, (x["x"], x["weight"]), {}
    return _call(spectral, case, x)


# ---------------------------------------------------------------- peer: pytorch_wavelets
def _pywt_label():
    import pytorch_wavelets
    return f"pytorch_wavelets {getattr(pytorch_wavelets, '__version__', '1.3.0')} (SVT's own code path)"


def _svt_layer(x, weight_ll, w1, b1, w2, b2, xfm, ifm):
    """SVT's SVT_channel_mixing.forward on [B, H, W, C] (its view/permute of [B, N, C] is free)."""
    B, H, W, C = x.shape
    nb, bs = w1.shape[1], w1.shape[2]
    mul = lambda a, m: torch.einsum("...bd,bdk->...bk", a, m)  # noqa: E731
    xl, xh = xfm(x.permute(0, 3, 1, 2).to(torch.float32))
    xl = xl * weight_ll
    h = xh[0].permute(5, 0, 2, 3, 4, 1)
    h = h.reshape(*h.shape[:5], nb, bs)
    r1 = torch.relu(mul(h[0], w1[0]) - mul(h[1], w1[1]) + b1[0])
    i1 = torch.relu(mul(h[0], w1[1]) + mul(h[1], w1[0]) + b1[1])
    r2 = mul(r1, w2[0]) - mul(i1, w2[1]) + b2[0]
    i2 = mul(r1, w2[1]) + mul(i1, w2[0]) + b2[1]
    h = torch.stack([r2, i2], dim=-1).reshape(B, *h.shape[2:5], C, 2).permute(0, 4, 1, 2, 3, 5)
    return ifm((xl, [h])).permute(0, 2, 3, 1)


def _pywt_setup(case, x):
    kind = case.params["kind"]
    if kind in ("global_filter", "fftconv2d"):
        import pytest
        pytest.skip("pytorch_wavelets has no Fourier filters")
    xfm, ifm = _pywt()(torch.float32)
    if kind == "dtcwt2d":
        return lambda: xfm(x["x"])
    if kind == "idtcwt2d":
        return lambda: ifm((x["low"], [x["high"]]))
    if kind == "roundtrip":
        return lambda: ifm(xfm(x["x"]))
    args = tuple(x[n] for n in _SVT_ARGS)
    return lambda: _svt_layer(*args, xfm, ifm)


PEER = Peer(name="pytorch_wavelets", label=_pywt_label, setup=_pywt_setup, devices=("cpu",))


# ---------------------------------------------------------------- correctness gate
def _tol(case):
    return 2e-2 if case.params.get("dtype") == "bf16" else CHECK_TOL


def _exact(case, x, cache):
    if "want" not in cache:
        from vitkernels.reference import spectral
        kind = case.params["kind"]
        leaves = {}
        if kind in _ARGS:
            args = [x[n].detach().double().requires_grad_(case.backward) for n in _ARGS[kind]]
            leaves = dict(zip(_ARGS[kind], args))
            fn = {"svt": spectral.svt_spectral_mix, "global_filter": spectral.global_filter,
                  "fftconv2d": spectral.fftconv2d}[kind]
            out = fn(*args)
        elif kind == "idtcwt2d":
            out = spectral.idtcwt2d(x["low"].double(), x["high"].double())
        else:
            t = x["x"].detach().double().requires_grad_(case.backward)
            leaves = {"x": t}
            out = spectral.dtcwt2d(t) if kind == "dtcwt2d" else spectral.idtcwt2d(*spectral.dtcwt2d(t))
        grads = {}
        if case.backward:
            out.backward(x["grad_out"].double())
            grads = {n: t.grad for n, t in leaves.items()}
        cache["want"] = (tuple(o.detach() for o in out) if isinstance(out, tuple) else out.detach(), grads)
    return cache["want"]


def check(case, x, contender, out, cache):
    want, want_grads = _exact(case, x, cache)
    out, grads = out if case.backward else (out, None)
    tol = _tol(case)
    if case.params["kind"] == "dtcwt2d":
        low, high = out[0], (out[1][0] if isinstance(out[1], list) else out[1])   # the peer returns [highpass]
        facts = {"tol": tol, "lowpass_error": rel_error(low, want[0], "lowpass", tol),
                 "highpass_error": rel_error(high, want[1], "highpass", tol)}
    else:
        facts = {"tol": tol, "out_error": rel_error(out.detach(), want, "output", tol)}
    if case.backward:
        assert len(grads) == len(want_grads), f"{len(grads)} gradients, expected {list(want_grads)}"
        for (name, w), g in zip(want_grads.items(), grads):
            facts[f"d{name}_error"] = rel_error(g, w, f"d{name}", tol)
    return facts


FAMILY = Family("spectral", CASES, make_inputs, vitk=vitk, reference=reference, check=check, peer=PEER)
test_spectral = FAMILY.pytest_function()
