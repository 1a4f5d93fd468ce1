"""dtcwt2d / idtcwt2d and their adjoints: every backend against the float64 reference and pytorch_wavelets."""
import pytest
import torch

import vitkernels
from vitkernels.ops import spectral as ops
from vitkernels.reference import spectral as ref

from conftest import backend_params
from pytorch_wavelets_peer import transforms
from spectral_checks import interpreted, same_nonfinite

FWD = backend_params("dtcwt2d")
INV = backend_params("idtcwt2d")
SIZES = [(2, 2), (4, 6), (14, 14), (18, 30), (56, 56), (1, 1), (7, 9), (3, 2), (5, 12)]
TOL = {torch.float32: 2e-6, torch.float16: 4e-3, torch.bfloat16: 3e-2, torch.float64: 1e-13}


def _close(got, want, dtype):
    assert got.dtype == dtype
    scale = max(1.0, want.abs().max().item())
    torch.testing.assert_close(got.double(), want, rtol=0, atol=TOL[dtype] * 4 * scale)


def _layout(t, kind):
    """t's values contiguous, channels-last (x's planes strided), or sliced out of a wider tensor."""
    if kind == "channels_last":
        return t.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)
    if kind == "sliced":
        wide = torch.randn(*t.shape[:-1], t.shape[-1] + 3, dtype=t.dtype)
        wide[..., 1:-2] = t
        return wide[..., 1:-2]
    return t


@pytest.fixture(scope="module")
def peer():
    try:
        return transforms(torch.float64)
    except ImportError as e:
        pytest.skip(f"pytorch_wavelets is not importable here: {e}")


@pytest.mark.parametrize("size", SIZES, ids=[f"{h}x{w}" for h, w in SIZES])
def test_matches_pytorch_wavelets(size, peer):
    xfm, ifm = peer
    x = torch.randn(2, 3, *size, dtype=torch.float64)
    low, high = vitkernels.dtcwt2d(x)
    want_low, want_high = xfm(x)
    # pytorch_wavelets holds its taps in fp32: agreement to that precision.
    torch.testing.assert_close(low, want_low, rtol=0, atol=1e-6)
    torch.testing.assert_close(high, want_high[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(vitkernels.idtcwt2d(low, high), ifm((want_low, want_high)), rtol=0, atol=2e-6)
    if size == (7, 9):
        assert low.shape[2:] == (8, 10) and high.shape[3:5] == (4, 5)
        assert vitkernels.idtcwt2d(low, high).shape[2:] == (8, 10)


# Every size in fp32 and bf16 in every layout; fp16 and fp64 contiguous, plus two sizes strided.
CASES = [(s, d, lay) for s in SIZES for d in (torch.float32, torch.bfloat16)
         for lay in ("contiguous", "channels_last", "sliced")] + \
        [(s, d, "contiguous") for s in SIZES for d in (torch.float16, torch.float64)] + \
        [(s, d, lay) for s in ((7, 9), (14, 14)) for d in (torch.float16, torch.float64)
         for lay in ("channels_last", "sliced")]


# Triton on the CPU runs under the interpreter, a second a case: fp32 at every size but 56 x 56, 3 x 2
# and 5 x 12 (odd sizes: 7 x 9 and 1 x 1; 5 x 12 in fp16), and each other dtype and strided layout at
# a few sizes.
INTERPRETED_CASES = [(s, torch.float32, "contiguous") for s in SIZES if s not in ((56, 56), (3, 2), (5, 12))] + \
    [((18, 30), torch.float32, "channels_last"), ((7, 9), torch.bfloat16, "channels_last"),
     ((4, 6), torch.bfloat16, "sliced"), ((5, 12), torch.float16, "contiguous"), ((7, 9), torch.float64, "sliced"),
     ((14, 14), torch.float64, "channels_last")]


@pytest.mark.parametrize("backend,device", FWD)
@pytest.mark.parametrize("size,dtype,layout", CASES,
                         ids=[f"{h}x{w}-{str(d)[6:]}-{lay}" for (h, w), d, lay in CASES])
def test_forward_and_inverse_match_reference(backend, device, size, dtype, layout, run_on):
    if interpreted(backend, device) and (size, dtype, layout) not in INTERPRETED_CASES:
        pytest.skip("Triton under the interpreter: a subset of the cases")
    x = _layout(torch.randn(2, 3, *size, device=device).to(dtype), layout)
    low, high = run_on(backend, torch.ops.vitk.dtcwt2d, x)
    want_low, want_high = ref.dtcwt2d(x.double())
    _close(low, want_low, dtype)
    _close(high, want_high, dtype)
    high_in = high.permute(0, 2, 1, 3, 4, 5).contiguous().permute(0, 2, 1, 3, 4, 5) if layout != "contiguous" else high
    y = run_on(backend, torch.ops.vitk.idtcwt2d, _layout(low, layout), high_in)
    _close(y, ref.idtcwt2d(low.double(), high.double()), dtype)


@pytest.mark.parametrize("backend,device", FWD)
@pytest.mark.parametrize("size", [(14, 14), (7, 9), (56, 56)], ids=["14x14", "7x9", "56x56"])
def test_perfect_reconstruction(backend, device, size, run_on):
    if interpreted(backend, device) and size == (56, 56):
        pytest.skip("Triton under the interpreter: small grids only")
    x = torch.randn(2, 4, *size, device=device)
    y = run_on(backend, lambda x: vitkernels.idtcwt2d(*vitkernels.dtcwt2d(x)), x)
    torch.testing.assert_close(y, ref.pad_even(x), rtol=0, atol=2e-6)


def test_odd_sizes_repeat_the_last_row_and_column():
    x = torch.randn(1, 2, 7, 9, dtype=torch.float64)
    low, high = vitkernels.dtcwt2d(x)
    low2, high2 = vitkernels.dtcwt2d(ref.pad_even(x))
    assert torch.equal(low, low2) and torch.equal(high, high2)


@pytest.mark.parametrize("backend,device", FWD)
@pytest.mark.parametrize("size", [(4, 6), (7, 9), (1, 1), (10, 3)])
def test_gradcheck(backend, device, size):
    # Under the interpreter Triton checks one odd size (the padding and its fold), first derivatives:
    # the second derivatives are the same four ops again.
    short = interpreted(backend, device)
    if short and size != (7, 9):
        pytest.skip("Triton under the interpreter: one size")
    with vitkernels.use_backend(backend):
        x = torch.randn(1, 2, *size, dtype=torch.float64, device=device, requires_grad=True)
        assert torch.autograd.gradcheck(vitkernels.dtcwt2d, (x,), fast_mode=True)
        assert short or torch.autograd.gradgradcheck(vitkernels.dtcwt2d, (x,), fast_mode=True)
        H, W = size[0] + size[0] % 2, size[1] + size[1] % 2
        lo = torch.randn(1, 2, H, W, dtype=torch.float64, device=device, requires_grad=True)
        hi = torch.randn(1, 2, 6, H // 2, W // 2, 2, dtype=torch.float64, device=device, requires_grad=True)
        assert torch.autograd.gradcheck(vitkernels.idtcwt2d, (lo, hi), fast_mode=True)
        assert short or torch.autograd.gradgradcheck(vitkernels.idtcwt2d, (lo, hi), fast_mode=True)


@pytest.mark.parametrize("backend,device", FWD)
def test_backward_ops_are_exact_adjoints(backend, device, run_on):
    """<F x, g> = <x, F^T g> to rounding, for both transforms, at an odd size (the padding's fold)."""
    x = torch.randn(2, 3, 9, 13, dtype=torch.float64, device=device)
    low, high = run_on(backend, torch.ops.vitk.dtcwt2d, x)
    gl, gh = torch.randn_like(low), torch.randn_like(high)
    lhs = (low * gl).sum() + (high * gh).sum()
    torch.testing.assert_close(lhs, (x * run_on(backend, torch.ops.vitk.dtcwt2d_backward, gl, gh, [9, 13])).sum())
    y = torch.randn(2, 3, 10, 14, dtype=torch.float64, device=device)
    al, ah = run_on(backend, torch.ops.vitk.idtcwt2d_backward, y)
    torch.testing.assert_close((run_on(backend, torch.ops.vitk.idtcwt2d, gl, gh) * y).sum(),
                               (gl * al).sum() + (gh * ah).sum())


@pytest.mark.parametrize("backend,device", FWD)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_backward_matches_reference(backend, device, dtype):
    x = torch.randn(2, 3, 9, 14, device=device).to(dtype).requires_grad_(True)
    x64 = x.detach().double().requires_grad_(True)
    gl = torch.randn(2, 3, 10, 14, dtype=torch.float64, device=device)
    gh = torch.randn(2, 3, 6, 5, 7, 2, dtype=torch.float64, device=device)
    with vitkernels.use_backend(backend):
        low, high = vitkernels.dtcwt2d(x)
        torch.autograd.backward([low, high], [gl.to(dtype), gh.to(dtype)])
    torch.autograd.backward(list(ref.dtcwt2d(x64)), [gl, gh])
    _close(x.grad, x64.grad, dtype)


@pytest.mark.parametrize("backend,device", FWD)
def test_nan_propagates_like_the_reference(backend, device, run_on):
    x = torch.randn(1, 1, 14, 14, device=device)
    x[0, 0, 5, 6] = float("nan")
    low, high = run_on(backend, torch.ops.vitk.dtcwt2d, x)
    want_low, want_high = ref.dtcwt2d(x.double())
    assert torch.equal(torch.isnan(low), torch.isnan(want_low))
    assert torch.equal(torch.isnan(high), torch.isnan(want_high))


@pytest.mark.parametrize("backend,device", [p for p in FWD if p.values[0] != "cpu"])
@pytest.mark.parametrize("special", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_nonfinite_values_reach_what_they_reach_on_the_cpu(backend, device, special, run_on):
    """NaN and infinities reach the same outputs as in the CPU kernels, which apply every tap of a
    filter's support, zeros included."""
    x = torch.randn(1, 2, 9, 13)
    x[0, 1, 4, 7], x[0, 0, 8, 12] = special, -special
    low = torch.randn(1, 2, 10, 14)
    high = torch.randn(1, 2, 6, 5, 7, 2)
    high[0, 1, 3, 2, 3, 1], low[0, 0, 9, 13] = special, special
    for op, args in ((torch.ops.vitk.dtcwt2d, (x,)), (torch.ops.vitk.idtcwt2d_backward, (x[..., :8, :12],)),
                     (torch.ops.vitk.idtcwt2d, (low, high)), (torch.ops.vitk.dtcwt2d_backward, (low, high, [9, 13]))):
        want = op(*args)
        got = run_on(backend, op, *[a.to(device) if isinstance(a, torch.Tensor) else a for a in args])
        same_nonfinite(got, want)


@pytest.mark.parametrize("backend,device", FWD)
def test_empty_batch(backend, device, run_on):
    low, high = run_on(backend, torch.ops.vitk.dtcwt2d, torch.randn(0, 3, 5, 6, device=device))
    assert low.shape == (0, 3, 6, 6) and high.shape == (0, 3, 6, 3, 3, 2)
    assert run_on(backend, torch.ops.vitk.idtcwt2d, low, high).shape == (0, 3, 6, 6)
    assert run_on(backend, torch.ops.vitk.dtcwt2d_backward, low, high, [5, 6]).shape == (0, 3, 5, 6)


def test_opcheck():
    x = torch.randn(2, 3, 7, 10)
    torch.library.opcheck(torch.ops.vitk.dtcwt2d.default, (x,))
    low, high = vitkernels.dtcwt2d(x)
    torch.library.opcheck(torch.ops.vitk.idtcwt2d.default, (low, high))
    torch.library.opcheck(torch.ops.vitk.dtcwt2d_backward.default, (low, high, [7, 10]))
    torch.library.opcheck(torch.ops.vitk.idtcwt2d_backward.default, (low,))


class _WaveletFilter(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(6, 2))

    def forward(self, x):
        low, high = vitkernels.dtcwt2d(x)
        return vitkernels.idtcwt2d(low * 0.5, high * self.weight[:, None, None, :])


def test_compile_fullgraph():
    torch._dynamo.reset()
    m = _WaveletFilter()
    x = torch.randn(2, 3, 14, 14, requires_grad=True)
    with torch._dynamo.config.patch(error_on_recompile=True):
        y = torch.compile(m, fullgraph=True)(x)
    y.sum().backward()
    torch.testing.assert_close(y, m(x))


BAD = [
    ("x", lambda: (torch.ops.vitk.dtcwt2d, (torch.randn(3, 4, 4),))),
    ("x", lambda: (torch.ops.vitk.dtcwt2d, (torch.randn(1, 1, 4, 4, dtype=torch.complex64),))),
    ("x", lambda: (torch.ops.vitk.dtcwt2d, (torch.randn(1, 1, 0, 4),))),
    ("highpass", lambda: (torch.ops.vitk.idtcwt2d, (torch.randn(1, 2, 4, 4), torch.randn(1, 2, 4, 2, 2, 2)))),
    ("highpass", lambda: (torch.ops.vitk.idtcwt2d, (torch.randn(1, 2, 4, 4), torch.randn(1, 2, 6, 2, 2)))),
    ("highpass", lambda: (torch.ops.vitk.idtcwt2d, (torch.randn(1, 2, 4, 4), torch.randn(1, 2, 6, 2, 3, 2)))),
    ("highpass", lambda: (torch.ops.vitk.idtcwt2d, (torch.randn(1, 2, 4, 4), torch.randn(1, 2, 6, 2, 2, 2).double()))),
    ("lowpass", lambda: (torch.ops.vitk.idtcwt2d, (torch.randn(1, 2, 5, 4), torch.randn(1, 2, 6, 2, 2, 2)))),
    ("lowpass", lambda: (torch.ops.vitk.idtcwt2d, (torch.randn(2, 4, 4), torch.randn(1, 2, 6, 2, 2, 2)))),
    ("input_size", lambda: (torch.ops.vitk.dtcwt2d_backward, (torch.randn(1, 2, 4, 4), torch.randn(1, 2, 6, 2, 2, 2),
                                                              [2, 4]))),
    ("grad_output", lambda: (torch.ops.vitk.idtcwt2d_backward, (torch.randn(1, 2, 3, 4),))),
]
CHECKS = {torch.ops.vitk.dtcwt2d: ops._check_dtcwt, torch.ops.vitk.idtcwt2d: ops._check_idtcwt,
          torch.ops.vitk.dtcwt2d_backward: ops._check_dtcwt_backward,
          torch.ops.vitk.idtcwt2d_backward: ops._check_idtcwt_backward}


@pytest.mark.parametrize("name,make", BAD, ids=[f"{n}-{i}" for i, (n, _) in enumerate(BAD)])
def test_bad_input(name, make):
    op, args = make()
    with pytest.raises(ValueError, match=f"^{name}:"):
        op(*args)                      # the C++ kernel's own check
    with pytest.raises(ValueError, match=f"^{name}:"):
        CHECKS[op](*args)              # the check of the fake kernel and the router
