"""global_filter: every backend against torch.fft (the float64 reference), gradients, compile, bad input."""
import pytest
import torch

import vitkernels
from vitkernels.ops import spectral as ops
from vitkernels.reference import spectral as ref

from conftest import backend_params
from spectral_checks import assert_rejects, skip_unless_supported

GF = backend_params("global_filter")
SIZES = [(1, 1), (2, 2), (7, 7), (14, 14), (6, 9), (5, 2), (28, 28)]
TOL = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 4e-2, torch.float64: 1e-12}


@pytest.mark.parametrize("backend,device", GF)
@pytest.mark.parametrize("size", SIZES, ids=[f"{h}x{w}" for h, w in SIZES])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64],
                         ids=["fp32", "bf16", "fp16", "fp64"])
def test_matches_reference(backend, device, size, dtype, run_on):
    skip_unless_supported("global_filter", backend, dtype, size)
    H, W = size
    x = torch.randn(2, H, W, 6).to(dtype)
    w = torch.randn(H, W // 2 + 1, 6, 2).to(dtype)
    y = run_on(backend, torch.ops.vitk.global_filter, x, w)
    want = ref.global_filter(x.double(), w.double())
    assert y.dtype == dtype and y.shape == x.shape
    torch.testing.assert_close(y.double(), want, rtol=0, atol=TOL[dtype] * max(1.0, want.abs().max().item()))


@pytest.mark.parametrize("backend,device", GF)
def test_strided_inputs(backend, device, run_on):
    x = torch.randn(2, 6, 14, 10).permute(0, 2, 3, 1)                  # [B, H, W, C], channels strided
    w = torch.randn(14, 6, 2, 6).permute(0, 1, 3, 2)                  # non-contiguous weight
    y = run_on(backend, torch.ops.vitk.global_filter, x, w)
    torch.testing.assert_close(y.double(), ref.global_filter(x.double(), w.double()), rtol=0, atol=1e-4)


@pytest.mark.parametrize("size", [(4, 6), (5, 5), (3, 2)])
def test_gradcheck(size):
    H, W = size
    x = torch.randn(2, H, W, 3, dtype=torch.float64, requires_grad=True)
    w = torch.randn(H, W // 2 + 1, 3, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(vitkernels.global_filter, (x, w), fast_mode=True)


def test_backward_matches_reference_bf16():
    x = torch.randn(2, 7, 7, 8).bfloat16().requires_grad_(True)
    w = torch.randn(7, 4, 8, 2).bfloat16().requires_grad_(True)
    x64, w64 = (t.detach().double().requires_grad_(True) for t in (x, w))
    g = torch.randn(2, 7, 7, 8, dtype=torch.float64)
    vitkernels.global_filter(x, w).backward(g.bfloat16())
    ref.global_filter(x64, w64).backward(g)
    for got, want in ((x.grad, x64.grad), (w.grad, w64.grad)):
        torch.testing.assert_close(got.double(), want, rtol=0, atol=4e-2 * want.abs().max().item())


def test_nan_propagates_like_the_reference():
    x = torch.randn(1, 7, 7, 3)
    x[0, 2, 3, 1] = float("nan")
    w = torch.randn(7, 4, 3, 2)
    assert torch.equal(torch.isnan(vitkernels.global_filter(x, w)), torch.isnan(ref.global_filter(x.double(), w.double())))


# The CPU kernel's FFT plans: radices 4, 2, 3, 5, 7 and a larger prime (11, 13), odd and even W
# (the half-length real transform), channel counts with a partial last vector, one image split into
# channel groups, and a 56 x 56 grid whose spectrum takes several groups.
PLANS = [(1, 56, 56, 40), (3, 11, 13, 19), (2, 9, 10, 17), (1, 25, 15, 9), (2, 22, 33, 8), (1, 1, 8, 3),
         (2, 16, 1, 5), (1, 28, 28, 130)]


@pytest.mark.parametrize("shape", PLANS, ids=["x".join(map(str, s)) for s in PLANS])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_cpu_fft_plans_forward_and_backward(shape, dtype):
    B, H, W, C = shape
    x = torch.randn(B, H, W, C, dtype=dtype).requires_grad_(True)
    w = torch.randn(H, W // 2 + 1, C, 2, dtype=dtype).requires_grad_(True)
    g = torch.randn(B, H, W, C, dtype=torch.float64)
    x64, w64 = (t.detach().double().requires_grad_(True) for t in (x, w))
    y = vitkernels.global_filter(x, w)
    want = ref.global_filter(x64, w64)
    tol = TOL[dtype] * 4
    torch.testing.assert_close(y.double(), want, rtol=0, atol=tol * want.abs().max().item())
    y.backward(g.to(dtype))
    want.backward(g)
    for got, exp in ((x.grad, x64.grad), (w.grad, w64.grad)):
        torch.testing.assert_close(got.double(), exp, rtol=0, atol=tol * exp.abs().max().item())


def test_cpu_non_finite_poisons_its_channel():
    """A NaN or an infinity in x makes its image's channel NaN and nothing else; one in weight makes
    that channel NaN in every image. The gradients follow the same rule."""
    x = torch.randn(2, 56, 56, 12, requires_grad=True)
    w = torch.randn(56, 29, 12, 2, requires_grad=True)
    with torch.no_grad():
        x[1, 40, 17, 3] = float("nan")
        x[0, 5, 50, 7] = float("inf")
        w[30, 2, 10, 1] = float("nan")
    y = vitkernels.global_filter(x, w)
    want = torch.zeros_like(y, dtype=torch.bool)
    want[1, :, :, 3] = want[0, :, :, 7] = want[:, :, :, 10] = True
    assert torch.equal(torch.isnan(y), want)
    assert torch.isnan(ref.global_filter(x.double(), w.double()))[want.logical_not()].sum() == 0
    y.backward(torch.randn_like(y))
    assert torch.equal(torch.isnan(x.grad), torch.zeros_like(want).index_fill_(3, torch.tensor([10]), True))
    gw_nan = torch.zeros(56, 29, 12, 2, dtype=torch.bool)
    gw_nan[:, :, [3, 7]] = True
    assert torch.equal(torch.isnan(w.grad), gw_nan)


def test_opcheck():
    x, w = torch.randn(2, 7, 6, 4), torch.randn(7, 4, 4, 2)
    torch.library.opcheck(torch.ops.vitk.global_filter.default, (x, w))
    torch.library.opcheck(torch.ops.vitk.global_filter_backward.default, (torch.randn_like(x), x, w, True, True))
    torch.library.opcheck(torch.ops.vitk.global_filter_backward.default, (torch.randn_like(x), x, w, False, True))


def test_compile_fullgraph():
    torch._dynamo.reset()
    w = torch.randn(7, 4, 4, 2, requires_grad=True)
    fn = lambda x: vitkernels.global_filter(x.relu(), w) * 2  # noqa: E731
    x = torch.randn(2, 7, 6, 4, requires_grad=True)
    with torch._dynamo.config.patch(error_on_recompile=True):
        y = torch.compile(fn, fullgraph=True)(x)
    y.sum().backward()
    torch.testing.assert_close(y, fn(x))


BAD = [
    ("x", lambda: (torch.randn(7, 7, 4), torch.randn(7, 4, 4, 2))),
    ("x", lambda: (torch.randn(1, 7, 7, 4, dtype=torch.complex64), torch.randn(7, 4, 4, 2))),
    ("x", lambda: (torch.randn(1, 0, 7, 4), torch.randn(0, 4, 4, 2))),
    ("weight", lambda: (torch.randn(1, 7, 7, 4), torch.randn(7, 7, 4, 2))),
    ("weight", lambda: (torch.randn(1, 7, 7, 4), torch.randn(7, 4, 3, 2))),
    ("weight", lambda: (torch.randn(1, 7, 7, 4), torch.randn(7, 4, 4, dtype=torch.complex64))),
]


@pytest.mark.parametrize("name,make", BAD, ids=[f"{n}-{i}" for i, (n, _) in enumerate(BAD)])
def test_bad_input(name, make):
    assert_rejects(torch.ops.vitk.global_filter, ops._check_global_filter, name, make())
