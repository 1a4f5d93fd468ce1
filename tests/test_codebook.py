"""codebook_argmin / codebook_lookup: every backend against vitkernels.reference.codebook."""
import pytest
import torch

import vitkernels  # noqa: F401
from vitkernels.reference import codebook as ref

from conftest import backend_params

ARGMIN = backend_params("codebook_argmin")
LOOKUP = backend_params("codebook_lookup")
LOOKUP_BWD = backend_params("codebook_lookup_backward")

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _inputs(shape_z, shape_cb, dtype, device, noncontig=False):
    if noncontig:
        # A transposed, strided view: z's rows are neither contiguous nor evenly packed.
        big = torch.randn(shape_z[-1], *shape_z[:-1], 2, dtype=torch.float32, device=device)[..., 0]
        z = big.movedim(0, -1).to(dtype) if dtype != torch.float32 else big.movedim(0, -1)
    else:
        z = torch.randn(shape_z, device=device).to(dtype)
    cb = torch.randn(shape_cb, device=device).to(dtype)
    return z, cb


def _check_argmin(z, cb, cosine, idx, dist, *, exact_when_separated=True):
    """dist equals the reference minimum, idx is a true argmin, and rows with no near-tie match exactly."""
    assert idx.dtype == torch.int64 and dist.dtype == torch.float32
    assert idx.shape == z.shape[:-1] and dist.shape == z.shape[:-1]
    z64, cb64 = z.double().cpu(), cb.double().cpu()
    full = ref.codebook_distances(z64, cb64, cosine)                           # [G, N, K] float64
    G = full.shape[0]
    idx_g = idx.cpu().reshape(-1, G).t() if cb.dim() == 3 else idx.cpu().reshape(1, -1)
    dist_g = dist.cpu().double().reshape(-1, G).t() if cb.dim() == 3 else dist.cpu().double().reshape(1, -1)
    assert (idx_g >= 0).all() and (idx_g < cb.shape[-2]).all(), "index out of range"
    best, _ = full.min(-1)
    chosen = full.gather(-1, idx_g.unsqueeze(-1)).squeeze(-1)
    # fp32 rounding of the expanded distance: a few ulps of ||z||^2 + ||e||^2.
    zn = (z64 * z64).sum(-1).reshape(idx_g.t().shape).t() if not cosine else torch.ones_like(best)
    scale = 1.0 + zn + (cb64 * cb64).sum(-1).max() if not cosine else torch.full_like(best, 4.0)
    tol = 2e-5 * scale
    assert (chosen <= best + tol).all(), f"not an argmin: excess {(chosen - best).max().item()}"
    assert torch.allclose(dist_g, chosen, rtol=1e-5, atol=float(tol.max())), \
        f"distance off by {(dist_g - chosen).abs().max().item()}"
    if exact_when_separated:
        second = full.topk(min(2, full.shape[-1]), largest=False).values[..., -1]
        separated = (second - best) > 4 * tol
        ref_idx = full.argmin(-1)
        assert torch.equal(idx_g[separated], ref_idx[separated])


SHAPES = [  # (z shape, codebook shape)
    ((1, 1), (1, 1)),
    ((5, 3), (7, 3)),
    ((33, 7), (100, 7)),
    ((2, 9, 33), (257, 33)),
    ((3, 64), (1, 64)),
    ((17, 2, 8), (2, 301, 8)),        # grouped (FQGAN)
    ((4, 5, 3, 7), (3, 33, 7)),       # grouped, odd G and D
]


@pytest.mark.parametrize("backend,device", ARGMIN)
@pytest.mark.parametrize("zs,cs", SHAPES, ids=[f"{z}x{c}" for z, c in SHAPES])
@pytest.mark.parametrize("cosine", [False, True], ids=["l2", "cos"])
def test_argmin_matches_reference(backend, device, zs, cs, cosine, run_on):
    z, cb = _inputs(zs, cs, torch.float32, device)
    idx, dist = run_on(backend, torch.ops.vitk.codebook_argmin, z, cb, cosine=cosine)
    _check_argmin(z, cb, cosine, idx, dist)


@pytest.mark.parametrize("backend,device", ARGMIN)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("noncontig", [False, True], ids=["contig", "strided"])
def test_argmin_dtypes_and_strides(backend, device, dtype, noncontig, run_on):
    for zs, cs in [((37, 19), (45, 19)), ((11, 2, 8), (2, 70, 8))]:
        z, cb = _inputs(zs, cs, dtype, device, noncontig)
        assert noncontig == (not z.is_contiguous())
        for cosine in (False, True):
            idx, dist = run_on(backend, torch.ops.vitk.codebook_argmin, z, cb, cosine=cosine)
            # Inputs convert exactly to fp32, so the float64 reference on them is the truth.
            _check_argmin(z, cb, cosine, idx, dist)


@pytest.mark.parametrize("backend,device", ARGMIN)
def test_argmin_large_codebook(backend, device, run_on):
    # VQGAN-LC's 100,000 codes; few rows so the Triton interpreter stays quick, and the CPU kernel
    # takes its split-K path (rows fewer than threads x tile).
    n = 3 if backend == "triton" and device == "cpu" else 300
    z, cb = _inputs((n, 8), (100_000, 8), torch.float32, device)
    idx, dist = run_on(backend, torch.ops.vitk.codebook_argmin, z, cb)
    _check_argmin(z, cb, False, idx, dist)


@pytest.mark.parametrize("backend,device", ARGMIN)
@pytest.mark.parametrize("cosine", [False, True], ids=["l2", "cos"])
def test_argmin_ties_go_to_lowest_index(backend, device, cosine, run_on):
    K, D = 150, 6
    cb = torch.randn(K, D, device=device)
    # Exact duplicates far apart in K (different SIMD lanes, tiles and K-splits) and a scaled copy,
    # which cosine must treat as the same code.
    cb[97] = cb[3]
    cb[140] = cb[3]
    cb[41] = cb[120]
    if cosine:
        cb[130] = 2 * cb[7]
    z = torch.stack([cb[3], cb[120], cb[7] * 0.5 if cosine else cb[7], cb[140] + 1e-3]).to(device)
    idx, dist = run_on(backend, torch.ops.vitk.codebook_argmin, z, cb, cosine=cosine)
    assert idx.tolist()[:3] == [3, 41, 7]
    assert idx[3].item() == 3
    assert dist[:3].abs().max().item() < 1e-5


@pytest.mark.parametrize("backend,device", ARGMIN)
def test_argmin_grouped_searches_own_subcodebook(backend, device, run_on):
    # Group 1's codebook holds group 0's exact vector at index 5; group 1 must not find group 0's.
    G, K, D = 2, 20, 4
    cb = torch.randn(G, K, D, device=device)
    z = torch.stack([cb[0, 11], cb[1, 5]]).unsqueeze(0)           # [1, G, D]
    idx, _ = run_on(backend, torch.ops.vitk.codebook_argmin, z, cb)
    assert idx.tolist() == [[11, 5]]


@pytest.mark.parametrize("backend,device", ARGMIN)
def test_argmin_empty_z(backend, device, run_on):
    z, cb = _inputs((0, 5), (9, 5), torch.float32, device)
    idx, dist = run_on(backend, torch.ops.vitk.codebook_argmin, z, cb)
    assert idx.shape == (0,) and dist.shape == (0,)


# ------------------------------------------------------------------------------------ lookup
@pytest.mark.parametrize("backend,device", LOOKUP)
@pytest.mark.parametrize("dtype", DTYPES + [torch.float64], ids=str)
def test_lookup_matches_reference(backend, device, dtype, run_on):
    for ishape, cshape in [((7,), (5, 3)), ((2, 3, 4), (11, 33)), ((6, 3), (3, 9, 7)), ((0,), (4, 2))]:
        cb = torch.randn(cshape, device=device).to(dtype)
        idx = torch.randint(0, cshape[-2], ishape, device=device)
        for index_dtype in (torch.int64, torch.int32):
            out = run_on(backend, torch.ops.vitk.codebook_lookup, idx.to(index_dtype), cb)
            assert out.is_contiguous()
            assert torch.equal(out, ref.codebook_lookup(idx, cb))


BAD_INDICES = {torch.int64: [30, -1, 2**40, -2**40, 2**63 - 1], torch.int32: [30, -1, 2**31 - 1, -2**31]}


def _bad_index_cases():
    for index_dtype, values in BAD_INDICES.items():
        for bad in values:
            for where in (0, 4, -1):
                yield pytest.param(index_dtype, bad, where, id=f"{str(index_dtype)[6:]}-{bad}-at{where}")


@pytest.mark.parametrize("backend,device", LOOKUP)
@pytest.mark.parametrize("index_dtype,bad,where", list(_bad_index_cases()))
@pytest.mark.parametrize("grouped", [False, True], ids=["flat", "grouped"])
def test_lookup_out_of_range_indices(backend, device, index_dtype, bad, where, grouped, run_on):
    # K = 30: one index past the end, negative, or far out of any range, anywhere in the tensor.
    cb = torch.randn(*((2,) if grouped else ()), 30, 4, device=device)
    idx = torch.randint(0, 30, (6, 2) if grouped else (6,), device=device).to(index_dtype)
    idx.view(-1)[where] = bad
    with pytest.raises(IndexError, match="^indices:"):
        run_on(backend, torch.ops.vitk.codebook_lookup, idx, cb)


@pytest.mark.parametrize("backend,device", LOOKUP_BWD)
@pytest.mark.parametrize("index_dtype,bad,where", list(_bad_index_cases()))
@pytest.mark.parametrize("grouped", [False, True], ids=["flat", "grouped"])
def test_lookup_backward_out_of_range_indices(backend, device, index_dtype, bad, where, grouped, run_on):
    # The backward used to drop such rows silently on one backend; every backend must refuse them.
    shape = [2, 30, 4] if grouped else [30, 4]
    idx = torch.randint(0, 30, (6, 2) if grouped else (6,), device=device).to(index_dtype)
    idx.view(-1)[where] = bad
    grad = torch.randn(*idx.shape, 4, device=device)
    with pytest.raises(IndexError, match="^indices:"):
        run_on(backend, torch.ops.vitk.codebook_lookup_backward, grad, idx, shape)


@pytest.mark.parametrize("backend,device", LOOKUP_BWD)
@pytest.mark.parametrize("grad_dtype", [torch.int32, torch.int64, torch.int8, torch.bool, torch.complex64], ids=str)
def test_lookup_backward_non_float_grad(backend, device, grad_dtype, run_on):
    # The argument is named, on every backend; not a list of backends that could not run it.
    idx = torch.randint(0, 30, (6,), device=device)
    grad = torch.ones(6, 4, device=device).to(grad_dtype)
    with pytest.raises(ValueError, match="^grad_output:"):
        run_on(backend, torch.ops.vitk.codebook_lookup_backward, grad, idx, [30, 4])


@pytest.mark.parametrize("backend,device", LOOKUP_BWD)
@pytest.mark.parametrize("dtype", DTYPES + [torch.float64], ids=str)
def test_lookup_backward_matches_reference(backend, device, dtype, run_on):
    for ishape, cshape in [((50,), (7, 3)), ((4, 9), (20, 33)), ((13, 2), (2, 5, 8))]:
        idx = torch.randint(0, cshape[-2], ishape, device=device)
        g = torch.randn(*ishape, cshape[-1], device=device, dtype=torch.float64)
        # A strided gradient, as autograd may hand over.
        g_strided = torch.cat([g, g], -1)[..., ::2].to(dtype)
        out = run_on(backend, torch.ops.vitk.codebook_lookup_backward, g_strided, idx, list(cshape))
        expect = ref.codebook_lookup_backward(g_strided.double(), idx, cshape)
        tol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 5e-2}[dtype]
        assert out.dtype == dtype and out.shape == cshape
        torch.testing.assert_close(out.double(), expect, rtol=tol, atol=tol * 10)


def test_lookup_backward_deterministic_on_cpu():
    idx = torch.randint(0, 16, (20_000,))
    g = torch.randn(20_000, 32)
    a = torch.ops.vitk.codebook_lookup_backward(g, idx, [16, 32])
    b = torch.ops.vitk.codebook_lookup_backward(g, idx, [16, 32])
    assert torch.equal(a, b)


@pytest.mark.parametrize("backend,device", LOOKUP)
def test_lookup_gradcheck(backend, device):
    with vitkernels.use_backend(backend):
        for ishape, cshape in [((9,), (5, 3)), ((4, 2), (2, 6, 3))]:
            cb = torch.randn(cshape, dtype=torch.float64, device=device, requires_grad=True)
            idx = torch.randint(0, cshape[-2], ishape, device=device)
            assert torch.autograd.gradcheck(lambda c: torch.ops.vitk.codebook_lookup(idx, c), (cb,))


# ------------------------------------------------------------------------------------ opcheck
@pytest.mark.parametrize("cosine", [False, True])
def test_opcheck_argmin(cosine):
    for z, cb in [(torch.randn(6, 5), torch.randn(9, 5)), (torch.randn(3, 2, 4), torch.randn(2, 7, 4))]:
        torch.library.opcheck(torch.ops.vitk.codebook_argmin.default, (z, cb), {"cosine": cosine})


def test_opcheck_lookup():
    cb = torch.randn(9, 5, dtype=torch.float64, requires_grad=True)
    idx = torch.randint(0, 9, (4, 3))
    torch.library.opcheck(torch.ops.vitk.codebook_lookup.default, (idx, cb))
    cbg = torch.randn(2, 9, 5, requires_grad=True)
    torch.library.opcheck(torch.ops.vitk.codebook_lookup.default, (torch.randint(0, 9, (4, 2)), cbg))
    g = torch.randn(4, 3, 5)
    torch.library.opcheck(torch.ops.vitk.codebook_lookup_backward.default, (g, idx, [9, 5]))


# ------------------------------------------------------------------------------------ bad input
BAD_ARGMIN = [
    (lambda: (torch.randn(4, 5), torch.randn(9, 6)), "z"),                                  # D mismatch
    (lambda: (torch.randn(4, 5), torch.randn(9, 5, dtype=torch.float16)), "codebook"),      # dtype mix
    (lambda: (torch.randn(4, 5), torch.randn(0, 5)), "codebook"),                           # empty codebook
    (lambda: (torch.randn(4, 5), torch.randn(9, 5, device="meta")), "codebook"),            # wrong device
    (lambda: (torch.randn(4, 5), torch.randn(5)), "codebook"),                              # 1-D codebook
    (lambda: (torch.randint(0, 3, (4, 5)), torch.randint(0, 3, (9, 5))), "z"),              # integer z
    (lambda: (torch.randn(4, 3, 5), torch.randn(2, 9, 5)), "z"),                            # G mismatch
    (lambda: (torch.randn(4, 5, dtype=torch.float64), torch.randn(9, 5, dtype=torch.float64)), "z"),
]


@pytest.mark.parametrize("make,name", BAD_ARGMIN)
def test_argmin_bad_input(make, name):
    z, cb = make()
    with pytest.raises((ValueError, RuntimeError), match=rf"^{name}:"):
        torch.ops.vitk.codebook_argmin(z, cb)


BAD_LOOKUP = [
    (lambda: (torch.randn(4), torch.randn(9, 5)), "indices"),                               # float indices
    (lambda: (torch.randint(0, 9, (4,)), torch.randn(5)), "codebook"),                      # 1-D codebook
    (lambda: (torch.randint(0, 9, (4,)), torch.randn(0, 5)), "codebook"),                   # empty
    (lambda: (torch.randint(0, 9, (4, 3)), torch.randn(2, 9, 5)), "indices"),               # G mismatch
    (lambda: (torch.randint(0, 9, (4,)), torch.randn(9, 5, device="meta")), "codebook"),    # device
]


@pytest.mark.parametrize("make,name", BAD_LOOKUP)
def test_lookup_bad_input(make, name):
    idx, cb = make()
    with pytest.raises((ValueError, RuntimeError), match=rf"^{name}:"):
        torch.ops.vitk.codebook_lookup(idx, cb)


def test_cpu_kernels_check_arguments_themselves():
    # The compiled entry points validate too, for callers that reach them without the router.
    with pytest.raises(ValueError, match="z"):
        torch.ops.vitk.codebook_argmin(torch.randn(4, 5), torch.randn(9, 6))
    with pytest.raises((RuntimeError, IndexError), match="indices"):
        torch.ops.vitk.codebook_lookup(torch.tensor([12]), torch.randn(9, 6))
