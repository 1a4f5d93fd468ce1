"""masked_attention family, Triton backend (under TRITON_INTERPRET=1 on CPU tensors): every op through
the public op interface with the backend forced, forward and every gradient against the float64
eager references of vitkernels.reference.masked_attention.

The interpreter runs each program in numpy, so grids are tiny (1x1 to 4x4); the mask arithmetic is
exercised all the same (rows, columns, both path directions, padding of partial tiles). The other
backends' tests of the family also parametrize over triton; this file is the Triton kernels' own.
"""
import pytest
import torch

import vitkernels  # noqa: F401
from vitkernels.ops import masked_attention as ops
from vitkernels.reference import masked_attention as ref

from attention_checks import check_nonfinite, same_values


TOL_OUT = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}
TOL_GRAD = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 6e-2}
GRIDS = [(1, 1), (2, 3), (3, 4), (4, 4)]


def _close(got, expect, tol, what):
    assert got.shape == expect.shape, f"{what}: shape {tuple(got.shape)} != {tuple(expect.shape)}"
    err = (got.double() - expect.double()).abs().max().item() if got.numel() else 0.0
    scale = max(1.0, expect.double().abs().max().item()) if expect.numel() else 1.0
    assert err <= tol * scale, f"{what}: max error {err:.3g} > {tol * scale:.3g}"


def _check(run_on, op, reference, leaves, make_args, dtype, names):
    """op(*make_args(leaves)) on triton in `dtype` against reference(*make_args(leaves in float64)),
    output and the gradients of every leaf for one random output gradient."""
    ours = [t.detach().to(dtype).requires_grad_() for t in leaves]
    theirs = [t.detach().to(dtype).double().requires_grad_() for t in ours]
    expect = reference(*make_args(theirs))
    grad_out = torch.randn_like(expect)
    expect_grads = torch.autograd.grad(expect, theirs, grad_out)

    def run():
        out = op(*make_args(ours))
        return out, torch.autograd.grad(out, ours, grad_out.to(out.dtype))

    out, grads = run_on("triton", run)
    assert out.dtype == dtype and out.is_contiguous()
    _close(out, expect, TOL_OUT[dtype], "output")
    for name, g, e in zip(names, grads, expect_grads):
        assert g.dtype == dtype
        _close(g, e, TOL_GRAD[dtype], f"d{name}")


def _qkv(B, H, W, heads, d, dv=None):
    """A packed [B, H, W, 3, heads, d] projection (q, k, v are strided slices of it), or with dv != d
    a packed q/k pair and a v cut out of a wider tensor."""
    if dv is None:
        return [torch.randn(B, H, W, 3, heads, d, dtype=torch.float64)]
    return [torch.randn(B, H, W, 2, heads, d, dtype=torch.float64),
            torch.randn(B, H, W, heads, dv + 2, dtype=torch.float64)]


def _split(packed):
    if len(packed) == 1:
        qkv, = packed
        return qkv[..., 0, :, :], qkv[..., 1, :, :], qkv[..., 2, :, :]
    qk, v = packed
    return qk[..., 0, :, :], qk[..., 1, :, :], v[..., 1:-1]


def _decay(B, H, W, heads, kind):
    if kind == "rand":
        return -2.0 * torch.rand(B, H, W, heads, dtype=torch.float64)
    if kind == "-30":
        return torch.full((B, H, W, heads), -30.0, dtype=torch.float64) + 0.1 * torch.randn(B, H, W, heads,
                                                                                              dtype=torch.float64)
    raise ValueError(kind)


# ---------------------------------------------------------------------------- polyline
@pytest.mark.parametrize("grid", GRIDS, ids=lambda g: f"{g[0]}x{g[1]}")
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "plain"])
def test_polyline(grid, symmetric, run_on):
    H, W = grid
    B, heads, d = 2, 2, 8
    packed = _qkv(B, H, W, heads, d, dv=None if H != 3 else 12)
    leaves = packed + [_decay(B, H, W, heads, "rand"), _decay(B, H, W, heads, "rand") - 0.5]
    n = len(packed)

    def args(ls):
        return (*_split(ls[:n]), ls[n], ls[n + 1], 0.4, symmetric)

    _check(run_on, torch.ops.vitk.polyline_attention, ref.polyline_attention, leaves, args, torch.float32,
           ["qkv"] * n + ["log_alpha", "log_beta"])


@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "plain"])
def test_polyline_decay_minus30(symmetric, run_on):
    # exp(-30) underflows nothing in fp32 but makes every off-diagonal weight ~1e-13: the output is
    # v itself up to that, and the decay gradients are tiny but must still match.
    B, H, W, heads, d = 1, 3, 4, 2, 8
    packed = _qkv(B, H, W, heads, d)
    leaves = packed + [_decay(B, H, W, heads, "-30"), _decay(B, H, W, heads, "rand")]

    def args(ls):
        return (*_split(ls[:1]), ls[1], ls[2], None, symmetric)

    _check(run_on, torch.ops.vitk.polyline_attention, ref.polyline_attention, leaves, args, torch.float32,
           ["qkv", "log_alpha", "log_beta"])


@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "plain"])
def test_polyline_zero_stride_decay_is_rmt(symmetric, run_on):
    """log_alpha = log_beta = log gamma_h passed as zero-stride broadcast views: RMT's Manhattan
    attention (gamma^(|dy| + |dx|) added as a log), in both mask directions."""
    B, H, W, heads, d = 2, 3, 4, 3, 8
    packed = _qkv(B, H, W, heads, d)
    log_gamma = ref.log_gamma_rmt(heads).double()

    def args(ls):
        decay = ls[1].expand(B, H, W, heads)
        return (*_split(ls[:1]), decay, decay, None, symmetric)

    def manhattan(q, k, v, la, lb, scale, sym):
        return ref.manhattan_attention(q, k, v, la[0, 0, 0], scale)

    _check(run_on, torch.ops.vitk.polyline_attention, manhattan, packed + [log_gamma], args, torch.float32,
           ["qkv", "log_gamma"])
    # The Python API's RMT entry point is the same op.
    q, k, v = (t.float() for t in _split(packed))
    out = run_on("triton", ops.manhattan_attention, q, k, v, log_gamma.float())
    _close(out, ref.manhattan_attention(*_split(packed), log_gamma), TOL_OUT[torch.float32], "manhattan")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_polyline_half(dtype, run_on):
    B, H, W, heads, d = 1, 3, 4, 2, 16
    packed = _qkv(B, H, W, heads, d)
    leaves = packed + [_decay(B, H, W, heads, "rand"), _decay(B, H, W, heads, "rand")]

    def args(ls):
        return (*_split(ls[:1]), ls[1], ls[2], None, True)

    _check(run_on, torch.ops.vitk.polyline_attention, ref.polyline_attention, leaves, args, dtype,
           ["qkv", "log_alpha", "log_beta"])


@pytest.mark.parametrize("op", ["polyline", "gaussian"])
def test_multi_tile(op, run_on):
    """5x7 = 35 tokens: more than one 32-token tile of queries and of keys (fp32 tiles are 32 wide),
    so the key loop, the per-key gradient scatters and partial last tiles all run more than once."""
    B, H, W, heads, d = 1, 5, 7, 1, 8
    packed = _qkv(B, H, W, heads, d)
    if op == "polyline":
        leaves = packed + [_decay(B, H, W, heads, "rand"), _decay(B, H, W, heads, "rand")]
        fn, reference, args = torch.ops.vitk.polyline_attention, ref.polyline_attention, \
            (lambda ls: (*_split(ls[:1]), ls[1], ls[2], None, True))
        names = ["qkv", "log_alpha", "log_beta"]
    else:
        leaves = packed + [torch.randn(heads, 2, dtype=torch.float64), 1 + torch.rand(heads, 2, dtype=torch.float64)]
        fn, reference, args = torch.ops.vitk.gaussian_mask_attention, ref.gaussian_mask_attention, \
            (lambda ls: (*_split(ls[:1]), ls[1], ls[2], None))
        names = ["qkv", "mix_weight", "mix_sigma"]
    _check(run_on, fn, reference, leaves, args, torch.float32, names)


# ---------------------------------------------------------------------------- axial decay
@pytest.mark.parametrize("grid", GRIDS, ids=lambda g: f"{g[0]}x{g[1]}")
def test_axial(grid, run_on):
    H, W = grid
    B, heads, d = (2 if H == 2 else 1), 2, 8
    packed = _qkv(B, H, W, heads, d, dv=None if W != 4 else 6)
    n = len(packed)
    leaves = packed + [_decay(B, H, W, heads, "rand"), _decay(B, H, W, heads, "-30" if H == 3 else "rand")]

    def args(ls):
        return (*_split(ls[:n]), ls[n], ls[n + 1], 0.3)

    _check(run_on, torch.ops.vitk.axial_decay_attention, ref.axial_decay_attention, leaves, args, torch.float32,
           ["qkv"] * n + ["log_alpha", "log_beta"])


def test_axial_zero_stride_fp16(run_on):
    B, H, W, heads, d = 1, 3, 4, 2, 16
    packed = _qkv(B, H, W, heads, d)
    leaves = packed + [-torch.rand(heads, dtype=torch.float64), -torch.rand(heads, dtype=torch.float64)]

    def args(ls):
        return (*_split(ls[:1]), ls[1].expand(B, H, W, heads), ls[2].expand(B, H, W, heads), None)

    _check(run_on, torch.ops.vitk.axial_decay_attention, ref.axial_decay_attention, leaves, args, torch.float16,
           ["qkv", "log_alpha", "log_beta"])


# ---------------------------------------------------------------------------- Gaussian mixture
@pytest.mark.parametrize("grid", GRIDS, ids=lambda g: f"{g[0]}x{g[1]}")
@pytest.mark.parametrize("sigma", ["small", "large"])
def test_gaussian(grid, sigma, run_on):
    H, W = grid
    B, heads, d, M = 2, 2, 8, 3
    packed = _qkv(B, H, W, heads, d)
    weight = torch.randn(heads, M, dtype=torch.float64)
    # small: 0.3 keeps the nearest neighbours' weight e^-5.6 away from zero in the gradient;
    # large: a mask that barely decays over the grid.
    base = 0.3 if sigma == "small" else 4.0
    sig = base * (1 + 0.2 * torch.rand(heads, M, dtype=torch.float64))

    def args(ls):
        return (*_split(ls[:1]), ls[1], ls[2], None)

    _check(run_on, torch.ops.vitk.gaussian_mask_attention, ref.gaussian_mask_attention, packed + [weight, sig], args,
           torch.float32, ["qkv", "mix_weight", "mix_sigma"])


def test_gaussian_dv_bf16(run_on):
    B, H, W, heads, d, M = 1, 3, 4, 2, 16, 2
    packed = _qkv(B, H, W, heads, d, dv=24)
    leaves = packed + [torch.randn(heads, M, dtype=torch.float64), 0.5 + torch.rand(heads, M, dtype=torch.float64)]

    def args(ls):
        return (*_split(ls[:2]), ls[2], ls[3], 0.2)

    _check(run_on, torch.ops.vitk.gaussian_mask_attention, ref.gaussian_mask_attention, leaves, args,
           torch.bfloat16, ["qk", "v", "mix_weight", "mix_sigma"])


# ---------------------------------------------------------------------------- reduced
@pytest.mark.parametrize("shape", [(2, 7, 3, 1, 1, 5), (1, 12, 5, 2, 8, 16), (2, 5, 1, 1, 16, 16),
                                   (1, 40, 9, 2, 8, 8)],
                         ids=lambda s: "B{}-q{}-k{}-h{}-dqk{}-dv{}".format(*s))
def test_reduced(shape, run_on):
    B, Nq, Nk, heads, dqk, dv = shape
    q = torch.randn(B, Nq, heads, dqk + 1, dtype=torch.float64)          # q is a strided slice
    if dv == dqk:
        kv = [torch.randn(B, Nk, 2, heads, dqk, dtype=torch.float64)]    # packed k/v
    else:
        kv = [torch.randn(B, Nk, heads, dqk, dtype=torch.float64), torch.randn(B, Nk, heads, dv, dtype=torch.float64)]

    def args(ls):
        k, v = (ls[1][:, :, 0], ls[1][:, :, 1]) if len(ls) == 2 else (ls[1], ls[2])
        return ls[0][..., 1:], k, v, None

    _check(run_on, torch.ops.vitk.reduced_attention, ref.reduced_attention, [q] + kv, args, torch.float32,
           ["q"] + ["kv"] * len(kv))


def test_reduced_fp16(run_on):
    leaves = [torch.randn(2, 20, 2, 8, dtype=torch.float64), torch.randn(2, 6, 2, 8, dtype=torch.float64),
              torch.randn(2, 6, 2, 32, dtype=torch.float64)]
    _check(run_on, torch.ops.vitk.reduced_attention, ref.reduced_attention, leaves, lambda ls: (*ls, 0.5),
           torch.float16, ["q", "k", "v"])


# ---------------------------------------------------------------------------- edges
def test_zero_batch(run_on):
    q = torch.randn(0, 3, 4, 2, 8, requires_grad=True)
    la = torch.randn(0, 3, 4, 2, requires_grad=True)
    mw = torch.randn(2, 3, requires_grad=True)

    def run():
        outs = [torch.ops.vitk.polyline_attention(q, q, q, la, la, None, True),
                torch.ops.vitk.axial_decay_attention(q, q, q, la, la, None),
                torch.ops.vitk.gaussian_mask_attention(q, q, q, mw, mw.abs(), None),
                torch.ops.vitk.reduced_attention(q[:, 0], q[:, 0], q[:, 0], None)]
        loss = sum(o.sum() for o in outs)
        return outs, torch.autograd.grad(loss, [q, la, mw])

    outs, grads = run_on("triton", run)
    assert [tuple(o.shape) for o in outs] == [(0, 3, 4, 2, 8)] * 3 + [(0, 4, 2, 8)]
    assert grads[0].shape == q.shape and grads[1].shape == la.shape
    assert torch.equal(grads[2], torch.zeros_like(mw))


# ---------------------------------------------------------------------------- non-finite values
# The rules (the references' semantics): a NaN anywhere a row reads gives that row NaN, the same way
# eager softmax(scores) @ v does; a row whose keys all score -inf is 0 / 0, NaN (output and lse); NaN
# in v reaches every row that includes its key, however small the key's weight (0 * NaN); the decay
# masks are sums over the path only (see the decay tests below).
NAN, INF = float("nan"), float("inf")


def _poison(t, index, value):
    t = t.clone()
    t[index] = value
    return t


def test_reduced_rows_of_minus_inf_scores_are_nan(run_on):
    """Batch 0's keys all score -inf (q > 0, k = -inf, d = 1): eager's 0 / 0, NaN output and lse, and
    NaN gradients wherever the reference's autograd has them; batch 1 is untouched."""
    q = torch.rand(2, 3, 1, 1) + 0.5
    k = _poison(torch.randn(2, 4, 1, 1), 0, -INF)
    v = torch.randn(2, 4, 1, 3)
    out, lse = run_on("triton", torch.ops.vitk.reduced_attention_fwd, q, k, v, 1.0)
    assert out[0].isnan().all() and lse[0].isnan().all()
    assert torch.isfinite(out[1]).all() and torch.isfinite(lse[1]).all()
    check_nonfinite(run_on, lambda q, k, v: torch.ops.vitk.reduced_attention(q, k, v, 1.0),
                     lambda q, k, v: ref.reduced_attention(q, k, v, 1.0), [q, k, v], "qkv")


def test_core_without_keys_is_zero(run_on):
    """A group with no keys at all is the empty sum: output 0, lse -inf (the op layer refuses Nk = 0
    for reduced attention, so the core is called directly)."""
    from vitkernels.triton import attention_core as core
    q, k, v = torch.randn(2, 3, 1, 4), torch.randn(2, 0, 1, 4), torch.randn(2, 0, 1, 5)

    def run():
        out, lse = core.new_outputs(q, v)
        st = (lambda t: (t.stride(0), 0, *t.stride()[1:]))
        core.attention_forward(core.DENSE, q, k, v, out, lse, dict(q=st(q), k=st(k), v=st(v), o=st(out), l=st(lse)),
                               2, 1, 3, 0.5, dict(NQ=3, NK=0), n_k_max=0)
        return out, lse

    out, lse = run_on("triton", run)
    assert torch.equal(out, torch.zeros_like(out)) and torch.equal(lse, torch.full_like(lse, -INF))


def _image_leaves(H=3, W=3, heads=2, d=4):
    return [torch.randn(1, H, W, heads, d) for _ in range(3)]


# Each site puts a NaN (or, for "v_underflow", a NaN in v at a key whose weight underflows to 0).
_SITES = ["q", "k", "v_underflow", "scale"]


def _sited(site, q, k, v):
    if site == "q":
        q = _poison(q, (0, 1, 1, 0, 2), NAN)
    if site == "k":
        k = _poison(k, (0, 2, 1, 1, 0), NAN)
    if site == "v_underflow":
        # Scores ~60x larger than usual: most weights are exactly 0 in fp32 and in float64 alike.
        q = q * 60
        v = _poison(v, (0, 0, 1, 0, 1), NAN)
    return q, k, v, (NAN if site == "scale" else None)


@pytest.mark.parametrize("site", _SITES + ["mix_sigma", "mix_weight"])
def test_gaussian_nan_propagates(site, run_on):
    q, k, v = _image_leaves()
    q, k, v, scale = _sited(site, q, k, v)
    w, s = torch.randn(2, 2).abs() + 1, 0.5 + torch.rand(2, 2)
    if site == "mix_sigma":
        s = _poison(s, (1, 0), NAN)
    if site == "mix_weight":
        w = _poison(w, (0, 1), NAN)
    check_nonfinite(run_on, lambda *a: torch.ops.vitk.gaussian_mask_attention(*a, scale),
                     lambda *a: ref.gaussian_mask_attention(*a, scale), [q, k, v, w, s],
                     ["q", "k", "v", "mix_weight", "mix_sigma"])


@pytest.mark.parametrize("site", _SITES)
def test_reduced_nan_propagates(site, run_on):
    q, k, v = _image_leaves()
    q, k, v, scale = _sited(site, q, k, v)
    flat = [t.reshape(1, 9, 2, -1) for t in (q, k, v)]
    check_nonfinite(run_on, lambda *a: torch.ops.vitk.reduced_attention(*a, scale),
                     lambda *a: ref.reduced_attention(*a, scale), flat, "qkv")


@pytest.mark.parametrize("op", ["polyline_sym", "polyline", "axial"])
@pytest.mark.parametrize("site", _SITES)
def test_decayed_nan_propagates(op, site, run_on):
    q, k, v = _image_leaves()
    q, k, v, scale = _sited(site, q, k, v)
    la, lb = -torch.rand(1, 3, 3, 2), -torch.rand(1, 3, 3, 2)
    if op == "axial":
        fn, reference = torch.ops.vitk.axial_decay_attention, ref.axial_decay_attention
        extra = ()
    else:
        fn, reference = torch.ops.vitk.polyline_attention, ref.polyline_attention
        extra = (op == "polyline_sym",)
    check_nonfinite(run_on, lambda *a: fn(*a, scale, *extra), lambda *a: reference(*a, scale, *extra),
                     [q, k, v, la, lb], ["q", "k", "v", "log_alpha", "log_beta"])


# ---------------------------------------------------------------------------- decay masks
# The log-mask between two tokens sums the log-decays on the path between them, (min, max] along a
# line: the first cell of a line is on no path, the empty path (the diagonal) is 0 whatever the
# decays hold, and nothing off the path may change a mask, even by cancellation in a prefix sum.
def _decay_ops(la, lb, symmetric_too=True):
    """(name, fn(q, k, v)) for every decayed op on the decays la, lb."""
    yield "polyline_sym", lambda q, k, v: torch.ops.vitk.polyline_attention(q, k, v, la, lb, None, True)
    yield "polyline", lambda q, k, v: torch.ops.vitk.polyline_attention(q, k, v, la, lb, None, False)
    yield "axial", lambda q, k, v: torch.ops.vitk.axial_decay_attention(q, k, v, la, lb, None)


def test_decay_cells_off_every_path_change_nothing(run_on):
    """log_alpha[:, :, 0] (before every row's first segment) and log_beta[:, 0] (before every column's)
    are on no path: -1e6, -inf or NaN there leaves every output bit as it was. An fp32 prefix-sum
    difference moved the outputs by ~0.03 for -1e6 and made them NaN for -inf."""
    q, k, v = _image_leaves(3, 4)
    la, lb = -torch.rand(1, 3, 4, 2), -torch.rand(1, 3, 4, 2)
    for value in (-1e6, -INF, NAN):
        la2 = _poison(la, (slice(None), slice(None), 0), value)
        lb2 = _poison(lb, (slice(None), 0), value)
        for (name, plain), (_, poisoned_fn) in zip(_decay_ops(la, lb), _decay_ops(la2, lb2)):
            expect = run_on("triton", plain, q, k, v)
            got = run_on("triton", poisoned_fn, q, k, v)
            assert torch.equal(got, expect), f"{name}, {value} off the path: outputs changed"


def test_decay_far_cells_do_not_cancel(run_on):
    """-1e6 in the middle of a line: paths that cross it are cut off (weight e^-1e6), the others must
    keep fp32 accuracy, which a prefix difference of magnitude 1e6 (ulp 0.06) cannot."""
    q, k, v = _image_leaves(4, 4)
    la = _poison(-torch.rand(1, 4, 4, 2), (0, slice(None), 1), -1e6)
    lb = _poison(-torch.rand(1, 4, 4, 2), (0, 1, slice(None)), -1e6)
    for (name, fn), reference in zip(_decay_ops(la, lb), (
            lambda *a: ref.polyline_attention(*a, la.double(), lb.double(), None, True),
            lambda *a: ref.polyline_attention(*a, la.double(), lb.double(), None, False),
            lambda *a: ref.axial_decay_attention(*a, la.double(), lb.double(), None))):
        _close(run_on("triton", fn, q, k, v), reference(*(t.double() for t in (q, k, v))),
               TOL_OUT[torch.float32], name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_minus_inf_decays_give_v(dtype, run_on):
    """All decays -inf: every off-diagonal path holds a -inf, the diagonal's is empty, so each query
    attends to itself alone and out == v exactly (symmetric and plain polyline, axial, and RMT's
    Manhattan form with log_gamma = -inf). The other keys are still in every row with weight 0, so a
    NaN in v reaches its head and channel of every token (0 * NaN), as in eager."""
    q, k, v = (t.to(dtype) for t in _image_leaves(3, 4))
    ninf = torch.full((1, 3, 4, 2), -INF)
    fns = list(_decay_ops(ninf, ninf))
    fns.append(("manhattan", lambda q, k, v: ops.manhattan_attention(q, k, v, torch.full((2,), -INF))))
    for name, fn in fns:
        assert torch.equal(run_on("triton", fn, q, k, v), v), name
        out = run_on("triton", fn, q, k, _poison(v, (0, 2, 1, 1, 3), NAN))
        assert out[..., 1, 3].isnan().all(), name
        assert torch.equal(out[..., 1, :3], v[..., 1, :3]) and torch.equal(out[..., 0, :], v[..., 0, :]), name


def test_no_gradient_reaches_a_nonfinite_decay(run_on):
    """A NaN or +inf cell is counted, not summed, into the masks: its own gradient is 0 (the
    reference's), though the NaN rows it causes would carry NaN to it through the prefix sum."""
    q, k, v = _image_leaves(3, 3)
    la = _poison(-torch.rand(1, 3, 3, 2), (0, 1, 2, 0), NAN).requires_grad_()
    lb = _poison(-torch.rand(1, 3, 3, 2), (0, 2, 1, 1), INF).requires_grad_()
    for name, fn in _decay_ops(la, lb):
        dla, dlb = run_on("triton", lambda: torch.autograd.grad(fn(q, k, v).sum(), [la, lb]))
        assert dla[0, 1, 2, 0] == 0 and dlb[0, 2, 1, 1] == 0, name
