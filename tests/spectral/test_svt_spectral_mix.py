"""svt_spectral_mix: against SVT's own layer (on pytorch_wavelets), the float64 reference and the unfused ops."""
import pytest
import torch
import torch.nn.functional as F

import vitkernels
from vitkernels.ops import spectral as ops
from vitkernels.reference import spectral as ref

from conftest import backend_params
from spectral_checks import assert_rejects, interpreted, same_nonfinite
from pytorch_wavelets_peer import transforms

SVT = backend_params("svt_spectral_mix")
TOL = {torch.float32: 2e-5, torch.float16: 1e-2, torch.bfloat16: 6e-2, torch.float64: 1e-12}


def _params(C, H, W, nb, dtype=torch.float32, scale=0.3):
    bs = C // nb
    return [torch.randn(C, H, W, dtype=dtype), torch.randn(2, nb, bs, bs, dtype=dtype) * scale,
            torch.randn(2, nb, bs, dtype=dtype) * scale, torch.randn(2, nb, bs, bs, dtype=dtype) * scale,
            torch.randn(2, nb, bs, dtype=dtype) * scale]


def svt_channel_mixing(x, weight_ll, w1, b1, w2, b2, xfm, ifm):
    """SVT's SVT_channel_mixing.forward, transcribed (x [B, H, W, C] instead of [B, N, C] with H, W)."""
    B, H, W, C = x.shape
    nb, bs = w1.shape[1], w1.shape[2]
    mul = lambda a, m: torch.einsum("...bd,bdk->...bk", a, m)  # noqa: E731
    xl, xh = xfm(x.permute(0, 3, 1, 2))
    xl = xl * weight_ll
    h = xh[0].permute(5, 0, 2, 3, 4, 1)
    h = h.reshape(*h.shape[:5], nb, bs)
    xr, xi = h[0], h[1]
    r1 = F.relu(mul(xr, w1[0]) - mul(xi, w1[1]) + b1[0])
    i1 = F.relu(mul(xr, w1[1]) + mul(xi, w1[0]) + b1[1])
    r2 = mul(r1, w2[0]) - mul(i1, w2[1]) + b2[0]
    i2 = mul(r1, w2[1]) + mul(i1, w2[0]) + b2[1]
    h = torch.stack([r2, i2], dim=-1).reshape(B, *h.shape[2:5], C, 2).permute(0, 4, 1, 2, 3, 5)
    return ifm((xl, [h])).permute(0, 2, 3, 1)


@pytest.mark.parametrize("shape", [(2, 14, 14, 8, 2), (1, 6, 10, 12, 4), (1, 28, 28, 16, 4)])
def test_matches_svt_layer(shape):
    try:
        xfm, ifm = transforms(torch.float64)
    except ImportError as e:
        pytest.skip(f"pytorch_wavelets is not importable here: {e}")
    B, H, W, C, nb = shape
    x = torch.randn(B, H, W, C, dtype=torch.float64)
    p = _params(C, H, W, nb, torch.float64)
    torch.testing.assert_close(vitkernels.svt_spectral_mix(x, *p), svt_channel_mixing(x, *p, xfm, ifm),
                               rtol=0, atol=2e-5)


# The last one has channel groups of the CPU kernel's staging (16 fp32 or 8 fp64 channels) and a
# partial last group.
SHAPES = [(1, 2, 2, 4, 2), (2, 4, 6, 6, 3), (2, 14, 14, 8, 2), (1, 18, 30, 8, 1), (1, 56, 56, 16, 4), (2, 6, 8, 40, 5)]
# Triton on the CPU runs under the interpreter, seconds a case: the first four shapes in fp32, the
# other dtypes at one shape.
INTERPRETED_CASES = [(s, torch.float32) for s in SHAPES[:4]] + \
    [(SHAPES[1], torch.bfloat16), (SHAPES[1], torch.float16), (SHAPES[1], torch.float64)]


@pytest.mark.parametrize("backend,device", SVT)
@pytest.mark.parametrize("shape", SHAPES, ids=[f"{s[1]}x{s[2]}c{s[3]}nb{s[4]}" for s in SHAPES])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64],
                         ids=["fp32", "bf16", "fp16", "fp64"])
def test_matches_reference(backend, device, shape, dtype, run_on):
    if interpreted(backend, device) and (shape, dtype) not in INTERPRETED_CASES:
        pytest.skip("Triton under the interpreter: a subset of the cases")
    B, H, W, C, nb = shape
    x = torch.randn(B, H, W, C).to(device, dtype)
    p = [t.to(device, dtype) for t in _params(C, H, W, nb)]
    y = run_on(backend, torch.ops.vitk.svt_spectral_mix, x, *p)
    want = ref.svt_spectral_mix(x.double(), *[t.double() for t in p])
    assert y.dtype == dtype
    torch.testing.assert_close(y.double(), want, rtol=0, atol=TOL[dtype] * max(1.0, want.abs().max().item()))


@pytest.mark.parametrize("backend,device", SVT)
def test_strided_inputs_and_fp32_weights(backend, device, run_on):
    x = torch.randn(2, 8, 10, 12, device=device).transpose(1, 2).contiguous().transpose(1, 2)  # [B, H, W, C] strided
    p = [t.to(device) for t in _params(12, 8, 10, 3)]
    p[0] = torch.randn(12, 10, 8, device=device).transpose(1, 2)
    xb = x.to(torch.bfloat16)
    y = run_on(backend, torch.ops.vitk.svt_spectral_mix, xb, *p)      # bf16 activations, fp32 parameters
    want = ref.svt_spectral_mix(xb.double(), *[t.double() for t in p])
    torch.testing.assert_close(y.double(), want, rtol=0, atol=6e-2 * want.abs().max().item())


def test_matches_the_unfused_ops():
    B, H, W, C, nb = 2, 14, 14, 8, 2
    x = torch.randn(B, H, W, C)
    weight_ll, w1, b1, w2, b2 = _params(C, H, W, nb)
    low, high = vitkernels.dtcwt2d(x.permute(0, 3, 1, 2))
    z = high.permute(0, 2, 3, 4, 1, 5).reshape(B, 6, H // 2, W // 2, nb, C // nb, 2)
    r, i = ref.complex_block_mlp(z[..., 0], z[..., 1], w1, b1, w2, b2)
    high = torch.stack([r, i], -1).reshape(B, 6, H // 2, W // 2, C, 2).permute(0, 4, 1, 2, 3, 5)
    want = vitkernels.idtcwt2d(low * weight_ll, high).permute(0, 2, 3, 1)
    torch.testing.assert_close(vitkernels.svt_spectral_mix(x, weight_ll, w1, b1, w2, b2), want, rtol=0, atol=1e-5)


@pytest.mark.parametrize("backend,device", SVT)
def test_gradcheck(backend, device):
    """Forced, the backend also runs the backward: its transforms are the registered ops. Under the
    interpreter, Triton is checked in x, weight_ll and weight_1 (every transform of the backward;
    each further input costs more calls)."""
    x = torch.randn(1, 4, 6, 6, dtype=torch.float64, device=device, requires_grad=True)
    p = [t.to(device).requires_grad_(True) for t in _params(6, 4, 6, 2, torch.float64)]
    n = 3 if interpreted(backend, device) else 6
    fn = lambda *a: vitkernels.svt_spectral_mix(*a, *p[n - 1:])  # noqa: E731
    with vitkernels.use_backend(backend):
        assert torch.autograd.gradcheck(fn, (x, *p[:n - 1]), fast_mode=True)


@pytest.mark.parametrize("backend,device", SVT)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_backward_matches_reference(backend, device, dtype):
    B, H, W, C, nb = 2, 8, 6, 8, 2
    x = torch.randn(B, H, W, C).to(device, dtype).requires_grad_(True)
    p = [t.to(device, dtype).requires_grad_(True) for t in _params(C, H, W, nb)]
    x64 = x.detach().double().requires_grad_(True)
    p64 = [t.detach().double().requires_grad_(True) for t in p]
    g = torch.randn(B, H, W, C, dtype=torch.float64, device=device)
    with vitkernels.use_backend(backend):
        vitkernels.svt_spectral_mix(x, *p).backward(g.to(dtype))
    ref.svt_spectral_mix(x64, *p64).backward(g)
    tol = 1e-4 if dtype == torch.float32 else 8e-2
    for got, want in zip([x, *p], [x64, *p64]):
        assert got.grad.dtype == dtype
        torch.testing.assert_close(got.grad.double(), want.grad, rtol=0, atol=tol * max(1.0, want.grad.abs().max().item()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_cpu_backward_channel_groups(dtype):
    """The CPU backward stages channels in groups (16 fp32, 8 fp64): several groups and a partial one."""
    B, H, W, C, nb = 2, 6, 8, 40, 5
    x = torch.randn(B, H, W, C, dtype=dtype, requires_grad=True)
    p = [t.requires_grad_(True) for t in _params(C, H, W, nb, dtype)]
    x64 = x.detach().double().requires_grad_(True)
    p64 = [t.detach().double().requires_grad_(True) for t in p]
    g = torch.randn(B, H, W, C, dtype=torch.float64)
    vitkernels.svt_spectral_mix(x, *p).backward(g.to(dtype))
    ref.svt_spectral_mix(x64, *p64).backward(g)
    tol = 1e-4 if dtype == torch.float32 else 1e-10
    for got, want in zip([x, *p], [x64, *p64]):
        torch.testing.assert_close(got.grad.double(), want.grad, rtol=0, atol=tol * max(1.0, want.grad.abs().max().item()))


@pytest.mark.parametrize("backend,device", SVT)
def test_nan_propagates_like_the_reference(backend, device, run_on):
    x = torch.randn(1, 14, 14, 4, device=device)
    x[0, 3, 4, 1] = float("nan")
    p = [t.to(device) for t in _params(4, 14, 14, 2)]
    y, want = run_on(backend, torch.ops.vitk.svt_spectral_mix, x, *p), \
        ref.svt_spectral_mix(x.double(), *[t.double() for t in p])
    assert torch.equal(torch.isnan(y), torch.isnan(want))


@pytest.mark.parametrize("backend,device", [p for p in SVT if p.values[0] != "cpu"])
def test_infinity_reaches_what_it_reaches_on_the_cpu(backend, device, run_on):
    x = torch.randn(1, 8, 10, 6)
    x[0, 3, 4, 1] = float("inf")
    p = _params(6, 8, 10, 2)
    got = run_on(backend, torch.ops.vitk.svt_spectral_mix, x.to(device), *[t.to(device) for t in p])
    same_nonfinite(got, torch.ops.vitk.svt_spectral_mix(x, *p))


def test_opcheck():
    x = torch.randn(2, 6, 4, 6)
    torch.library.opcheck(torch.ops.vitk.svt_spectral_mix.default, (x, *_params(6, 6, 4, 2)))


def test_compile_fullgraph():
    torch._dynamo.reset()
    x = torch.randn(2, 6, 4, 6, requires_grad=True)
    p = _params(6, 6, 4, 2)
    fn = lambda x: vitkernels.svt_spectral_mix(x, *p).relu()  # noqa: E731
    with torch._dynamo.config.patch(error_on_recompile=True):
        y = torch.compile(fn, fullgraph=True)(x)
    y.sum().backward()
    torch.testing.assert_close(y, fn(x))


def _bad(x_shape=(1, 4, 6, 8), C=8, H=4, W=6, nb=2, **override):
    args = dict(zip(["weight_ll", "weight_1", "bias_1", "weight_2", "bias_2"], _params(C, H, W, nb)))
    args.update(override)
    return (torch.randn(x_shape), *args.values())


BAD = [
    ("x", lambda: _bad(x_shape=(4, 6, 8))),
    ("x", lambda: _bad(x_shape=(1, 5, 6, 8), H=5)),
    ("x", lambda: (torch.randn(1, 4, 6, 8, dtype=torch.complex64), *_bad()[1:])),
    ("weight_ll", lambda: _bad(weight_ll=torch.randn(8, 6, 4))),
    ("weight_ll", lambda: _bad(weight_ll=torch.randn(8, 4, 6, dtype=torch.complex64))),
    ("weight_1", lambda: _bad(weight_1=torch.randn(2, 3, 4, 4))),
    ("weight_1", lambda: _bad(weight_1=torch.randn(2, 2, 4))),
    ("bias_1", lambda: _bad(bias_1=torch.randn(2, 2, 3))),
    ("weight_2", lambda: _bad(weight_2=torch.randn(2, 2, 4, 3))),
    ("bias_2", lambda: _bad(bias_2=torch.randn(2, 2, 4, 1))),
]


@pytest.mark.parametrize("name,make", BAD, ids=[f"{n}-{i}" for i, (n, _) in enumerate(BAD)])
def test_bad_input(name, make):
    assert_rejects(torch.ops.vitk.svt_spectral_mix, ops._check_svt, name, make())
