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


def _check_argmin(z, cb, cosine, idx, dist, *, exact_when_separated=True, exact=False):
    """dist equals the reference minimum, idx is a true argmin, and rows with no near-tie match exactly
    (exact=True: every row matches the float64 reference's exact choice, and its distance to fp32
    rounding)."""
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
    if exact:
        want_idx, want_dist = ref.codebook_argmin(z64, cb64, cosine=cosine, exact=True)
        assert torch.equal(idx.cpu(), want_idx), f"{int((idx.cpu() != want_idx).sum())} rows differ from the exact choice"
        torch.testing.assert_close(dist.cpu().double(), want_dist, rtol=2e-7, atol=1e-6 if cosine else 0)


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
@pytest.mark.parametrize("exact", [False, True], ids=["fast", "exact"])
def test_argmin_matches_reference(backend, device, zs, cs, cosine, exact, run_on):
    z, cb = _inputs(zs, cs, torch.float32, device)
    idx, dist = run_on(backend, torch.ops.vitk.codebook_argmin, z, cb, cosine=cosine, exact=exact)
    _check_argmin(z, cb, cosine, idx, dist, exact=exact)


@pytest.mark.parametrize("backend,device", ARGMIN)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("noncontig", [False, True], ids=["contig", "strided"])
@pytest.mark.parametrize("exact", [False, True], ids=["fast", "exact"])
def test_argmin_dtypes_and_strides(backend, device, dtype, noncontig, exact, run_on):
    for zs, cs in [((37, 19), (45, 19)), ((11, 2, 8), (2, 70, 8))]:
        z, cb = _inputs(zs, cs, dtype, device, noncontig)
        assert noncontig == (not z.is_contiguous())
        for cosine in (False, True):
            idx, dist = run_on(backend, torch.ops.vitk.codebook_argmin, z, cb, cosine=cosine, exact=exact)
            # Inputs convert exactly to fp32, so the float64 reference on them is the truth.
            _check_argmin(z, cb, cosine, idx, dist, exact=exact)


@pytest.mark.parametrize("backend,device", ARGMIN)
@pytest.mark.parametrize("exact", [False, True], ids=["fast", "exact"])
def test_argmin_large_codebook(backend, device, exact, run_on):
    # VQGAN-LC's 100,000 codes; few rows so the Triton interpreter stays quick, and the CPU kernel
    # takes its split-K path (rows fewer than threads x tile).
    n = 3 if backend == "triton" and device == "cpu" else 300
    z, cb = _inputs((n, 8), (100_000, 8), torch.float32, device)
    idx, dist = run_on(backend, torch.ops.vitk.codebook_argmin, z, cb, exact=exact)
    _check_argmin(z, cb, False, idx, dist, exact=exact)


@pytest.mark.parametrize("backend,device", ARGMIN)
@pytest.mark.parametrize("cosine", [False, True], ids=["l2", "cos"])
@pytest.mark.parametrize("exact", [False, True], ids=["fast", "exact"])
def test_argmin_ties_go_to_lowest_index(backend, device, cosine, exact, run_on):
    if backend == "triton" and device == "cpu" and not exact:
        # Equal codes tie only if their cross terms z.e round alike. The interpreter runs tl.dot as
        # numpy's BLAS sgemm, whose edge micro-kernels sum a tile's columns in different orders (seen on
        # AVX2 OpenBLAS): the fast path's ties then fall to rounding. The exact path re-ranks directly.
        pytest.skip("fast ties need a per-element fixed summation order, which the interpreter's tl.dot lacks")
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
    idx, dist = run_on(backend, torch.ops.vitk.codebook_argmin, z, cb, cosine=cosine, exact=exact)
    assert idx.tolist()[:3] == [3, 41, 7]
    assert idx[3].item() == 3
    assert dist[:3].abs().max().item() < 1e-5


@pytest.mark.parametrize("backend,device", ARGMIN)
@pytest.mark.parametrize("exact", [False, True], ids=["fast", "exact"])
def test_argmin_grouped_searches_own_subcodebook(backend, device, exact, run_on):
    # Group 1's codebook holds group 0's exact vector at index 5; group 1 must not find group 0's.
    G, K, D = 2, 20, 4
    cb = torch.randn(G, K, D, device=device)
    z = torch.stack([cb[0, 11], cb[1, 5]]).unsqueeze(0)           # [1, G, D]
    idx, _ = run_on(backend, torch.ops.vitk.codebook_argmin, z, cb, exact=exact)
    assert idx.tolist() == [[11, 5]]


# Every size that can be zero or one: no rows (N = 0, flat and grouped), no groups (G = 0, which
# once divided by zero in the CPU tiling plan), one code, one dimension. Sizes a kernel divides by.
DEGENERATE = [  # (z shape, codebook shape)
    ((0, 5), (9, 5)),
    ((0, 2, 4), (2, 10, 4)),
    ((3, 0, 2, 4), (2, 10, 4)),
    ((5, 0, 4), (0, 10, 4)),
    ((0, 0, 4), (0, 10, 4)),
    ((7, 3), (1, 3)),
    ((4, 2, 3), (2, 1, 3)),
    ((40, 1), (33, 1)),
    ((6, 3, 1), (3, 20, 1)),
    ((1, 1), (1, 1)),
]


@pytest.mark.parametrize("backend,device", ARGMIN)
@pytest.mark.parametrize("zs,cs", DEGENERATE, ids=[f"{z}x{c}" for z, c in DEGENERATE])
@pytest.mark.parametrize("cosine", [False, True], ids=["l2", "cos"])
@pytest.mark.parametrize("exact", [False, True], ids=["fast", "exact"])
def test_argmin_degenerate_sizes(backend, device, zs, cs, cosine, exact, run_on):
    z, cb = _inputs(zs, cs, torch.float32, device)
    idx, dist = run_on(backend, torch.ops.vitk.codebook_argmin, z, cb, cosine=cosine, exact=exact)
    assert idx.shape == z.shape[:-1] and dist.shape == z.shape[:-1]
    want_idx, want_dist = ref.codebook_argmin(z.double().cpu(), cb.double().cpu(), cosine=cosine, exact=True)
    # D = 1 with cosine ties every code of one sign: the lowest index wins on every backend.
    assert torch.equal(idx.cpu(), want_idx)
    torch.testing.assert_close(dist.cpu().double(), want_dist, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend,device", ARGMIN)
def test_argmin_empty_code_dimension_is_refused(backend, device, run_on):
    with pytest.raises(ValueError, match="^codebook:"):
        run_on(backend, torch.ops.vitk.codebook_argmin, torch.randn(4, 0, device=device), torch.randn(9, 0, device=device))


# ------------------------------------------------------------------ exact choice, extreme values
def _ties_and_offsets(dtype, grouped):
    """Codes around +96 with exact duplicates (at higher indices) and near-duplicates two units in the
    last place apart in one coordinate, and rows of z at codes, exactly between a code and its
    near-duplicate (a true tie), and one or a few units off those midpoints. The fp32 expansion's
    rounding (|z|^2 ~ 8e4) is far larger than any of these gaps; every value lies on the dtype's grid
    at 100, so the float64 evaluation of the distances is exact and the reference's choice is the
    true nearest code."""
    ulp = {torch.float32: 2.0**-17, torch.float16: 2.0**-4, torch.bfloat16: 2.0**-1}[dtype]
    g = torch.Generator().manual_seed(5)
    K0, D = 24, 8
    # In [64, 128), where each dtype's grid is one unit in the last place.
    base = 96 + torch.round(torch.randn(K0, D, generator=g, dtype=torch.float64) * 4).clamp(-6, 6) * ulp * 4
    near = base.clone()
    near[:, 0] += 2 * ulp
    cb = torch.cat([base, near, base])                    # [3 K0, D]: exact duplicates last
    mid = base.clone()
    mid[:, 0] += ulp
    jitter = torch.randint(-2, 3, mid.shape, generator=g).double() * ulp
    z = torch.cat([base, near, mid, mid + jitter, mid + jitter.roll(1, 0)])
    if grouped:                                           # two groups, the second a permutation
        perm = torch.randperm(cb.shape[0], generator=g)
        cb = torch.stack([cb, cb[perm]])
        z = torch.stack([z, z.flip(0)], 1)
    assert torch.equal(cb.to(dtype).double(), cb) and torch.equal(z.to(dtype).double(), z)
    return z.to(dtype), cb.to(dtype)


@pytest.mark.parametrize("backend,device", ARGMIN)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("grouped", [False, True], ids=["flat", "grouped"])
def test_exact_resolves_ties_and_near_ties_far_from_the_origin(backend, device, dtype, grouped, run_on):
    z, cb = _ties_and_offsets(dtype, grouped)
    want_idx, want_dist = ref.codebook_argmin(z.double(), cb.double(), exact=True)
    idx, dist = run_on(backend, torch.ops.vitk.codebook_argmin, z.to(device), cb.to(device), exact=True)
    assert torch.equal(idx.cpu(), want_idx), f"{int((idx.cpu() != want_idx).sum())} of {idx.numel()} rows"
    assert torch.equal(dist.cpu(), want_dist.float())     # exact distances, rounded once
    # The default path may pick a farther code here, but one within its documented rounding bound.
    idx, dist = run_on(backend, torch.ops.vitk.codebook_argmin, z.to(device), cb.to(device))
    chosen = ref.codebook_lookup(idx.cpu(), cb.double())
    d_chosen = ((z.double() - chosen) ** 2).sum(-1)
    bound = cb.shape[-1] * 2.0**-24 * 2 * (z.double() ** 2).sum(-1)
    assert (d_chosen - want_dist <= bound).all()
    torch.testing.assert_close(dist.cpu().double(), d_chosen, rtol=2e-7, atol=0)


@pytest.mark.parametrize("backend,device", ARGMIN)
@pytest.mark.parametrize("grouped", [False, True], ids=["flat", "grouped"])
def test_exact_cosine_ties(backend, device, grouped, run_on):
    """Integer-valued vectors: dot products and squared norms are exact in float64, so every backend and
    the reference evaluate the ranking to the same bits. Codes that are power-of-two multiples of one
    another tie exactly (lowest index wins); odd multiples tie up to one rounding of the norm."""
    g = torch.Generator().manual_seed(7)
    base = torch.randint(-20, 21, (30, 6), generator=g).double()
    cb = torch.cat([base, 2 * base, 4 * base, 3 * base, base + torch.eye(6).repeat(5, 1)])
    z = torch.cat([base, 8 * base, base * 2 + 1, torch.randint(-60, 61, (40, 6), generator=g).double()])
    if grouped:
        cb = torch.stack([cb, cb.flip(0)])
        z = torch.stack([z, z.roll(3, 0)], 1)
    z, cb = z.float(), cb.float()
    want_idx, want_dist = ref.codebook_argmin(z.double(), cb.double(), cosine=True, exact=True)
    idx, dist = run_on(backend, torch.ops.vitk.codebook_argmin, z.to(device), cb.to(device), cosine=True, exact=True)
    assert torch.equal(idx.cpu(), want_idx), f"{int((idx.cpu() != want_idx).sum())} of {idx.numel()} rows"
    torch.testing.assert_close(dist.cpu().double(), want_dist, rtol=0, atol=1e-6)


def _direction_cases(scale_z, scale_e, device):
    """z near the directions of well-separated codes, at scale_z; codes at scale_e (one or the other may
    be far outside fp32's safe range for a sum of squares)."""
    g = torch.Generator().manual_seed(11)
    D, K = 8, 40
    cb = torch.nn.functional.normalize(torch.randn(K, D, generator=g, dtype=torch.float64), dim=-1)
    pick = torch.randint(0, K, (64,), generator=g)
    z = cb[pick] + 0.05 * torch.randn(64, D, generator=g, dtype=torch.float64)
    return (z * scale_z).float().to(device), (cb * scale_e).float().to(device)


def _check_direction_choice(z, cb, idx, dist):
    """idx is the reference's choice wherever the best cosine beats the second by 1e-4; dist is the
    reference's 2 - 2 cos (F.normalize's eps) of the chosen code."""
    z64, cb64 = z.double().cpu(), cb.double().cpu()
    want_idx, _ = ref.codebook_argmin(z64, cb64, cosine=True, exact=True)
    # Rows by direction (any length), codes as F.normalize has them (shorter than 1 below eps).
    sim = (z64 / z64.norm(dim=-1, keepdim=True)) @ torch.nn.functional.normalize(cb64, dim=-1).T
    top = sim.topk(2, dim=-1).values
    clear = (top[:, 0] - top[:, 1]) > 1e-4 * top[:, 0].abs()
    assert clear.float().mean() > 0.9
    assert torch.equal(idx.cpu()[clear], want_idx[clear])
    chosen = cb64[idx.cpu()]
    expect = 2 - 2 * (torch.nn.functional.normalize(z64, dim=-1) * torch.nn.functional.normalize(chosen, dim=-1)).sum(-1)
    torch.testing.assert_close(dist.cpu().double(), expect.clamp_min(0), rtol=0, atol=2e-6)


# ||x||^2 overflows fp32 from |x| ~ 1.8e19 and underflows (or loses its digits to subnormals) below
# |x| ~ 1e-19; the float64 reference does neither. A row shorter than F.normalize's eps is still ranked
# by its direction; codes shorter than eps are divided by eps, as F.normalize does.
EXTREME_NORMS = {"big-z": (1e19, 1.0), "big-codes": (1.0, 1e19), "both-big": (1e19, 1e19), "huge-z": (3e37, 1e-3),
                 "z-1e-20": (1e-20, 1.0), "z-1e-30": (1e-30, 1.0), "z-subnormal": (1e-40, 1.0),
                 "codes-1e-20": (1.0, 1e-20), "both-1e-25": (1e-25, 1e-25)}


@pytest.mark.parametrize("backend,device", ARGMIN)
@pytest.mark.parametrize("scales", list(EXTREME_NORMS.values()), ids=list(EXTREME_NORMS))
@pytest.mark.parametrize("exact", [False, True], ids=["fast", "exact"])
def test_cosine_survives_extreme_norms(backend, device, scales, exact, run_on):
    z, cb = _direction_cases(*scales, device)
    idx, dist = run_on(backend, torch.ops.vitk.codebook_argmin, z, cb, cosine=True, exact=exact)
    _check_direction_choice(z, cb, idx, dist)


@pytest.mark.parametrize("backend,device", ARGMIN)
def test_cosine_tiny_code_among_normal_ones(backend, device, run_on):
    # A code shorter than eps is divided by eps (F.normalize), so it is not a unit vector and loses to
    # any code with a positive cosine, even when it points exactly along z.
    cb = torch.tensor([[1.0, 0.0], [0.6, 0.8], [1e-20, 0.0]], device=device)
    z = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]], device=device)
    for exact in (False, True):
        idx, dist = run_on(backend, torch.ops.vitk.codebook_argmin, z, cb, cosine=True, exact=exact)
        want_idx, want_dist = ref.codebook_argmin(z.double().cpu(), cb.double().cpu(), cosine=True, exact=True)
        assert idx.tolist() == want_idx.tolist() == [0, 1, 2]
        torch.testing.assert_close(dist.cpu().double(), want_dist, rtol=0, atol=1e-6)


# ------------------------------------------------------------------------------------ NaN and inf
NAN, INF = float("nan"), float("inf")


def _poisoned(kind):
    """(z [6, D], codebook [5, D]) with one kind of non-finite value placed; rows and codes otherwise
    well separated, so every backend's choice is unambiguous."""
    g = torch.Generator().manual_seed(3)
    cb = torch.randn(5, 4, generator=g) * 3
    z = cb[[4, 3, 2, 1, 0, 2]] + 0.01 * torch.randn(6, 4, generator=g)
    if kind == "nan-in-z":
        z[1, 2] = NAN
    elif kind == "inf-in-z":
        z[2, 0], z[4, 3] = INF, -INF
    elif kind == "nan-in-a-code":
        cb[2, 1] = NAN                  # rows 2 and 5 sat on code 2: they move to their next nearest
    elif kind == "inf-in-a-code":
        cb[3, 0] = -INF
    elif kind == "every-code-bad":
        cb[:, 0] = torch.tensor([NAN, INF, -INF, NAN, INF])
    elif kind == "nan-everywhere":
        z[:], cb[:] = NAN, NAN
    elif kind == "mixed":
        z[0, 0], cb[0, 1], cb[4, 2], z[3, 3] = NAN, INF, NAN, -INF
    return z, cb


POISON = ["nan-in-z", "inf-in-z", "nan-in-a-code", "inf-in-a-code", "every-code-bad", "nan-everywhere", "mixed"]


@pytest.mark.parametrize("backend,device", ARGMIN)
@pytest.mark.parametrize("kind", POISON)
@pytest.mark.parametrize("cosine", [False, True], ids=["l2", "cos"])
@pytest.mark.parametrize("exact", [False, True], ids=["fast", "exact"])
@pytest.mark.parametrize("grouped", [False, True], ids=["flat", "grouped"])
def test_argmin_non_finite_rule(backend, device, kind, cosine, exact, grouped, run_on):
    """A row of z holding a NaN or an infinity gets code 0 and its distance to it; a code holding one is
    never chosen unless every code of its group does (then code 0). Same on every backend and in the
    reference; distances NaN, inf or a number exactly where the reference's are."""
    z, cb = _poisoned(kind)
    if grouped:                        # group 1 is clean, so only group 0 may be affected
        z = torch.stack([z, z.nan_to_num(0.0, 0.0, 0.0)], 1)
        cb = torch.stack([cb, cb.nan_to_num(0.0, 0.0, 0.0)])
    want_idx, want_dist = ref.codebook_argmin(z.double(), cb.double(), cosine=cosine, exact=exact)
    idx, dist = run_on(backend, torch.ops.vitk.codebook_argmin, z.to(device), cb.to(device), cosine=cosine,
                       exact=exact)
    assert torch.equal(idx.cpu(), want_idx)
    dist = dist.cpu().double()
    assert torch.equal(dist.isnan(), want_dist.isnan()) and torch.equal(dist.isinf(), want_dist.isinf())
    fin = want_dist.isfinite()
    torch.testing.assert_close(dist[fin], want_dist[fin], rtol=1e-5, atol=1e-5)
    bad_rows = ~torch.isfinite(z).all(-1)
    assert (idx.cpu()[bad_rows] == 0).all()


def test_reference_non_finite_rule():
    # The rule spelled out once against the reference itself, so a change to either is a decision.
    z, cb = _poisoned("nan-in-a-code")
    idx, dist = ref.codebook_argmin(z.double(), cb.double())
    assert idx.tolist()[:5] == [4, 3, idx[2].item(), 1, 0] and idx[2].item() != 2 and idx[5].item() != 2
    z, cb = _poisoned("nan-in-z")
    idx, dist = ref.codebook_argmin(z.double(), cb.double())
    assert idx[1] == 0 and dist[1].isnan() and dist[[0, 2, 3, 4, 5]].isfinite().all()
    z, cb = _poisoned("every-code-bad")
    idx, dist = ref.codebook_argmin(z.double(), cb.double())
    assert (idx == 0).all() and dist.isnan().all()


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
@pytest.mark.parametrize("exact", [False, True])
def test_opcheck_argmin(cosine, exact):
    for z, cb in [(torch.randn(6, 5), torch.randn(9, 5)), (torch.randn(3, 2, 4), torch.randn(2, 7, 4))]:
        torch.library.opcheck(torch.ops.vitk.codebook_argmin.default, (z, cb), {"cosine": cosine, "exact": exact})


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
