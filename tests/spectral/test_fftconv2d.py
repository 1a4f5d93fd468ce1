"""fftconv2d: every backend against Hyena's FFT formulation in float64 (the reference), a direct sum,
gradients, NaN locality, compile, bad input."""
import pytest
import torch
import torch.nn.functional as F

import vitkernels
from vitkernels.ops import spectral as ops
from vitkernels.reference import spectral as ref

from conftest import backend_params
from spectral_checks import assert_rejects, skip_unless_supported

FC = backend_params("fftconv2d")
SIZES = [(1, 1), (2, 2), (3, 5), (7, 7), (14, 14), (9, 16), (15, 8), (28, 28)]
TOL = {torch.float32: 2e-5, torch.float16: 5e-3, torch.bfloat16: 4e-2, torch.float64: 1e-12}
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
DTYPE_IDS = ["fp32", "bf16", "fp16", "fp64"]


def _direct(u, k, D=None):
    """The same convolution as a depthwise conv2d over the zero-padded input (an independent check
    of the reference's FFT: y[i, j] = sum_{a <= i, q <= j} k[a, q] u[i - a, j - q])."""
    C, H, W = k.shape
    y = F.conv2d(F.pad(u, (W - 1, 0, H - 1, 0)), k.flip(-1, -2)[:, None], groups=C)
    return y if D is None else y + u * D[:, None, None]


def _close(got, want, dtype):
    torch.testing.assert_close(got.double(), want, rtol=0, atol=TOL[dtype] * max(1.0, want.abs().max().item()))


@pytest.mark.parametrize("size", [(3, 5), (14, 14)], ids=["3x5", "14x14"])
def test_reference_is_the_linear_convolution(size):
    u, k, D = torch.randn(2, 3, *size, dtype=torch.float64), torch.randn(3, *size, dtype=torch.float64), \
        torch.randn(3, dtype=torch.float64)
    torch.testing.assert_close(ref.fftconv2d(u, k, D), _direct(u, k, D), rtol=0, atol=1e-12)


@pytest.mark.parametrize("backend,device", FC)
@pytest.mark.parametrize("size", SIZES, ids=[f"{h}x{w}" for h, w in SIZES])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("with_D", [True, False], ids=["D", "noD"])
def test_matches_reference(backend, device, size, dtype, with_D, run_on):
    skip_unless_supported("fftconv2d", backend, dtype, size)
    H, W = size
    C = 19 if H * W < 300 else 5          # more channels than one vector block, and a ragged last block
    u = torch.randn(2, C, H, W).to(dtype)
    k = torch.randn(C, H, W).to(dtype)
    D = torch.randn(C).to(dtype) if with_D else None
    y = run_on(backend, torch.ops.vitk.fftconv2d, u, k, D)
    want = ref.fftconv2d(u.double(), k.double(), None if D is None else D.double())
    assert y.dtype == dtype and y.shape == u.shape
    _close(y, want, dtype)


@pytest.mark.parametrize("backend,device", FC)
def test_strided_inputs_and_mixed_dtypes(backend, device, run_on):
    u = torch.randn(2, 9, 11, 6).permute(0, 3, 1, 2)                # [B, C, H, W], channels innermost
    k = torch.randn(9, 6, 11).permute(1, 0, 2).double()            # non-contiguous, another dtype
    D = torch.randn(12)[::2]
    y = run_on(backend, torch.ops.vitk.fftconv2d, u, k, D)
    _close(y, ref.fftconv2d(u.double(), k.double(), D.double()), torch.float32)


@pytest.mark.parametrize("size", [(4, 6), (5, 5), (3, 2), (9, 1)])
@pytest.mark.parametrize("with_D", [True, False], ids=["D", "noD"])
def test_gradcheck(size, with_D):
    H, W = size
    u = torch.randn(2, 3, H, W, dtype=torch.float64, requires_grad=True)
    k = torch.randn(3, H, W, dtype=torch.float64, requires_grad=True)
    D = torch.randn(3, dtype=torch.float64, requires_grad=True) if with_D else None
    assert torch.autograd.gradcheck(vitkernels.fftconv2d, (u, k, D), fast_mode=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_backward_matches_reference(dtype):
    u = torch.randn(3, 21, 14, 14).to(dtype).requires_grad_(True)
    k = torch.randn(21, 14, 14).to(dtype).requires_grad_(True)
    D = torch.randn(21).to(dtype).requires_grad_(True)
    leaves = [t.detach().double().requires_grad_(True) for t in (u, k, D)]
    g = torch.randn(3, 21, 14, 14, dtype=torch.float64)
    vitkernels.fftconv2d(u, k, D).backward(g.to(dtype))
    ref.fftconv2d(*leaves).backward(g)
    for got, want in zip((u.grad, k.grad, D.grad), (t.grad for t in leaves)):
        assert got.dtype == dtype
        _close(got, want, dtype if dtype != torch.float32 else torch.float16)  # sums of ~600 products


def test_backward_partial():
    u, k = torch.randn(2, 3, 5, 4), torch.randn(3, 5, 4)
    D = torch.randn(3)
    g = torch.randn_like(u)
    gu, gk, gd = torch.ops.vitk.fftconv2d_backward(g, u, k, D, False, True, False)
    assert gu.numel() == 0 and gd.numel() == 0 and gk.shape == k.shape
    _, gk_none, gd_none = torch.ops.vitk.fftconv2d_backward(g, u, k, None, True, False, True)
    assert gk_none.numel() == 0 and gd_none.numel() == 0


@pytest.mark.parametrize("backend,device", FC)
def test_nan_stays_in_its_quadrant(backend, device, run_on):
    """A NaN at (p, q) reaches exactly the outputs (i >= p, j >= q): every backend computes the direct
    sum, not an FFT that would spread it over the plane."""
    u, k = torch.randn(1, 3, 7, 6), torch.randn(3, 7, 6)
    u[0, 1, 2, 3] = float("nan")
    y = run_on(backend, torch.ops.vitk.fftconv2d, u, k, torch.randn(3))
    want = torch.zeros(1, 3, 7, 6, dtype=torch.bool)
    want[0, 1, 2:, 3:] = True
    assert torch.equal(torch.isnan(y), want)


def test_empty_batch():
    u, k, D = torch.randn(0, 3, 4, 4, requires_grad=True), torch.randn(3, 4, 4, requires_grad=True), \
        torch.randn(3, requires_grad=True)
    y = vitkernels.fftconv2d(u, k, D)
    assert y.shape == u.shape
    y.sum().backward()
    assert torch.equal(k.grad, torch.zeros_like(k)) and torch.equal(D.grad, torch.zeros_like(D))


def test_opcheck():
    u, k, D = torch.randn(2, 4, 7, 6), torch.randn(4, 7, 6), torch.randn(4)
    torch.library.opcheck(torch.ops.vitk.fftconv2d.default, (u, k, D))
    torch.library.opcheck(torch.ops.vitk.fftconv2d.default, (u, k, None))
    g = torch.randn_like(u)
    torch.library.opcheck(torch.ops.vitk.fftconv2d_backward.default, (g, u, k, D, True, True, True))
    torch.library.opcheck(torch.ops.vitk.fftconv2d_backward.default, (g, u, k, None, False, True, False))


def test_compile_fullgraph():
    torch._dynamo.reset()
    k = torch.randn(4, 7, 6, requires_grad=True)
    D = torch.randn(4, requires_grad=True)
    fn = lambda u: vitkernels.fftconv2d(u.relu(), k, D) * 2  # noqa: E731
    u = torch.randn(2, 4, 7, 6, requires_grad=True)
    with torch._dynamo.config.patch(error_on_recompile=True):
        y = torch.compile(fn, fullgraph=True)(u)
    y.sum().backward()
    torch.testing.assert_close(y, fn(u))
    assert k.grad is not None and D.grad is not None


BAD = [
    ("u", lambda: (torch.randn(3, 7, 7), torch.randn(3, 7, 7), None)),
    ("u", lambda: (torch.randn(1, 3, 7, 7, dtype=torch.complex64), torch.randn(3, 7, 7), None)),
    ("u", lambda: (torch.randn(1, 3, 0, 7), torch.randn(3, 0, 7), None)),
    ("k", lambda: (torch.randn(1, 3, 7, 7), torch.randn(3, 7, 6), None)),
    ("k", lambda: (torch.randn(1, 3, 7, 7), torch.randn(4, 7, 7), None)),
    ("k", lambda: (torch.randn(1, 3, 7, 7), torch.randn(3, 7, 7, dtype=torch.complex64), None)),
    ("D", lambda: (torch.randn(1, 3, 7, 7), torch.randn(3, 7, 7), torch.randn(4))),
    ("D", lambda: (torch.randn(1, 3, 7, 7), torch.randn(3, 7, 7), torch.randn(3, 1))),
    ("D", lambda: (torch.randn(1, 3, 7, 7), torch.randn(3, 7, 7), torch.ones(3, dtype=torch.int32))),
]


@pytest.mark.parametrize("name,make", BAD, ids=[f"{n}-{i}" for i, (n, _) in enumerate(BAD)])
def test_bad_input(name, make):
    assert_rejects(torch.ops.vitk.fftconv2d, ops._check_fftconv2d, name, make())


def test_bad_grad_output():
    u, k = torch.randn(1, 3, 5, 5), torch.randn(3, 5, 5)
    for g in (torch.randn(1, 3, 5, 4), torch.randn(1, 3, 5, 5).double()):
        args = (g, u, k, None, True, True, False)
        assert_rejects(torch.ops.vitk.fftconv2d_backward, ops._check_fftconv2d_backward, "grad_output", args)
