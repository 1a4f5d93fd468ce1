"""polyline_attention (PPMA whole attention; RMT's Manhattan attention as its constant-decay case):
every backend against vitkernels.reference.masked_attention in float64."""
import pytest
import torch

import vitkernels
from vitkernels.reference import masked_attention as ref

from attention_checks import TOL, close as _close, grads as _grads, packed_qkv as _packed_qkv  # noqa: F401
from attention_checks import (BAD_DECAY_ARGS, bad_inputs, check_bad_decay_args, check_empty_batch, check_grads,
                              saves_only_when_grad_is_wanted)
from conftest import backend_params

PFWD = backend_params("polyline_attention_fwd")


def _decays(B, H, W, heads, kind, device="cpu", dtype=torch.float32):
    """log_alpha, log_beta of one of the regimes PPMA's softplus(delta) * A can produce, and beyond."""
    shape = (B, H, W, heads)
    if kind == "range":      # log-uniform from -1e-3 (no decay) to -30 (exp underflows past a step)
        mk = lambda: -torch.exp(torch.empty(shape).uniform_(-6.9, 3.4))  # noqa: E731
    elif kind == "near0":
        mk = lambda: -1e-3 * torch.rand(shape)  # noqa: E731
    elif kind == "steep":    # -30 everywhere except one near-zero row: huge prefix sums, tiny differences
        def mk():
            t = -30.0 + 0.1 * torch.rand(shape)
            t[:, H // 2] = -1e-3 * torch.rand(B, W, heads)
            return t
    elif kind == "signed":   # any real value is accepted
        mk = lambda: 0.7 * torch.randn(shape)  # noqa: E731
    else:
        raise ValueError(kind)
    return mk().to(device=device, dtype=dtype), mk().to(device=device, dtype=dtype)


def _expect(q, k, v, la, lb, scale=None, symmetric=True):
    return ref.polyline_attention(q.double(), k.double(), v.double(), la.double(), lb.double(), scale, symmetric)


GRIDS = [(1, 1), (1, 7), (5, 1), (3, 4), (7, 7), (6, 9), (14, 14)]
GRADS = ("dq", "dk", "dv", "dlog_alpha", "dlog_beta")
SYM = pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "onedir"])


def _small_for_interpreter(backend, device, H, W):
    if backend == "triton" and device == "cpu" and H * W > 64:
        pytest.skip("interpreter: small grids only")


@pytest.mark.parametrize("backend,device", PFWD)
@pytest.mark.parametrize("grid", GRIDS, ids=lambda g: f"{g[0]}x{g[1]}")
@SYM
def test_polyline_forward(backend, device, grid, symmetric, run_on):
    H, W = grid
    _small_for_interpreter(backend, device, H, W)
    q, k, v = _packed_qkv(2, H, W, 3, 16, torch.float32, device)
    la, lb = _decays(2, H, W, 3, "range", device)
    out = run_on(backend, torch.ops.vitk.polyline_attention, q, k, v, la, lb, None, symmetric)
    assert out.shape == q.shape and out.is_contiguous() and out.dtype == q.dtype
    _close(out, _expect(q, k, v, la, lb, None, symmetric), torch.float32)


@pytest.mark.parametrize("backend,device", PFWD)
@pytest.mark.parametrize("kind", ["near0", "steep", "signed"])
@SYM
def test_polyline_forward_decay_regimes(backend, device, kind, symmetric, run_on):
    H, W = (6, 9) if backend != "triton" or device != "cpu" else (4, 5)
    q, k, v = _packed_qkv(1, H, W, 2, 16, torch.float32, device)
    la, lb = _decays(1, H, W, 2, kind, device)
    out = run_on(backend, torch.ops.vitk.polyline_attention, q, k, v, la, lb, 0.3, symmetric)
    _close(out, _expect(q, k, v, la, lb, 0.3, symmetric), torch.float32)


def test_polyline_forward_56x56_cpu():
    q, k, v = _packed_qkv(1, 56, 56, 1, 8, torch.float32)
    la, lb = _decays(1, 56, 56, 1, "range")
    for symmetric in (True, False):
        out = torch.ops.vitk.polyline_attention(q, k, v, la, lb, None, symmetric)
        _close(out, _expect(q, k, v, la, lb, None, symmetric), torch.float32)


@pytest.mark.parametrize("backend,device", PFWD)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("dims", [(16, 24), (1, 8), (8, 1)], ids=["dv24", "dqk1", "dv1"])
def test_polyline_forward_dtypes_and_dims(backend, device, dtype, dims, run_on):
    d, dv = dims
    q, k, v = _packed_qkv(1, 5, 6, 2, d, dtype, device, dv=dv)
    la, lb = _decays(1, 5, 6, 2, "range", device)
    out = run_on(backend, torch.ops.vitk.polyline_attention, q, k, v, la, lb, 0.5, True)
    assert out.shape == (1, 5, 6, 2, dv) and out.dtype == dtype
    _close(out, _expect(q, k, v, la, lb, 0.5, True), dtype)


@pytest.mark.parametrize("backend,device", PFWD)
@pytest.mark.parametrize("decay_dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
def test_polyline_broadcast_decays(backend, device, decay_dtype, run_on):
    """A per-head constant passed as an expand() (zero strides), in any float dtype."""
    q, k, v = _packed_qkv(2, 4, 5, 3, 8, torch.float32, device)
    ga = -torch.rand(3, device=device, dtype=decay_dtype) * 3
    gb = -torch.rand(3, device=device, dtype=decay_dtype)
    la, lb = ga.expand(2, 4, 5, 3), gb.expand(2, 4, 5, 3)
    assert la.stride() == (0, 0, 0, 1)
    for symmetric in (True, False):
        out = run_on(backend, torch.ops.vitk.polyline_attention, q, k, v, la, lb, None, symmetric)
        _close(out, _expect(q, k, v, la, lb, None, symmetric), torch.float32)
    go = torch.randn(2, 4, 5, 3, 8, device=device)
    fn = lambda a, b, c, x, y: torch.ops.vitk.polyline_attention(a, b, c, x.expand(2, 4, 5, 3),  # noqa: E731
                                                                 y.expand(2, 4, 5, 3))
    got = run_on(backend, _grads, fn, (q, k, v, ga, gb), go)
    exp = _grads(lambda a, b, c, x, y: ref.polyline_attention(a, b, c, x.expand(2, 4, 5, 3), y.expand(2, 4, 5, 3)),
                 (q.double(), k.double(), v.double(), ga.double(), gb.double()), go.double())
    for name, g, e in zip(("dq", "dk", "dv", "dgamma_a", "dgamma_b"), got, exp):
        assert g.dtype == (decay_dtype if name.startswith("dgamma") else torch.float32)
        _close(g, e, torch.bfloat16 if g.dtype == torch.bfloat16 else torch.float32, name)


@pytest.mark.parametrize("backend,device", PFWD)
def test_manhattan_is_polyline_with_constant_decay(backend, device, run_on):
    """RMT's MaSA (gamma^(|dy|+|dx|) added as a log before softmax) is the constant-decay polyline op."""
    B, H, W, nh, d = 2, 5, 7, 4, 8
    q, k, v = _packed_qkv(B, H, W, nh, d, torch.float32, device)
    log_gamma = ref.log_gamma_rmt(nh).to(device)
    expect = ref.manhattan_attention(q.double(), k.double(), v.double(), log_gamma.double())
    out = run_on(backend, vitkernels.manhattan_attention, q, k, v, log_gamma)
    _close(out, expect, torch.float32)
    decay = log_gamma.expand(B, H, W, nh)
    for symmetric in (True, False):   # the Manhattan mask is symmetric: both forms agree
        out = run_on(backend, torch.ops.vitk.polyline_attention, q, k, v, decay, decay, None, symmetric)
        _close(out, expect, torch.float32)
    go = torch.randn(B, H, W, nh, d, device=device)
    got = run_on(backend, _grads, vitkernels.manhattan_attention, (q, k, v, log_gamma), go)
    check_grads(got, ref.manhattan_attention, (q, k, v, log_gamma), go, ("dq", "dk", "dv", "dlog_gamma"))


@pytest.mark.parametrize("backend,device", PFWD)
@pytest.mark.parametrize("grid", GRIDS, ids=lambda g: f"{g[0]}x{g[1]}")
@SYM
def test_polyline_backward(backend, device, grid, symmetric, run_on):
    H, W = grid
    _small_for_interpreter(backend, device, H, W)
    q, k, v = _packed_qkv(2, H, W, 2, 8, torch.float32, device, dv=12)
    la, lb = _decays(2, H, W, 2, "range", device)
    go = torch.randn(2, H, W, 2, 12, device=device)
    fn = lambda *a: torch.ops.vitk.polyline_attention(*a, None, symmetric)  # noqa: E731
    got = run_on(backend, _grads, fn, (q, k, v, la, lb), go)
    assert all(g.dtype == torch.float32 for g in got)
    check_grads(got, lambda *a: ref.polyline_attention(*a, None, symmetric), (q, k, v, la, lb), go, GRADS)


@pytest.mark.parametrize("backend,device", PFWD)
@pytest.mark.parametrize("kind", ["near0", "steep", "signed"])
@SYM
def test_polyline_backward_decay_regimes(backend, device, kind, symmetric, run_on):
    H, W = (6, 9) if backend != "triton" or device != "cpu" else (4, 5)
    q, k, v = _packed_qkv(1, H, W, 2, 8, torch.float32, device)
    la, lb = _decays(1, H, W, 2, kind, device)
    go = torch.randn(1, H, W, 2, 8, device=device)
    fn = lambda *a: torch.ops.vitk.polyline_attention(*a, None, symmetric)  # noqa: E731
    got = run_on(backend, _grads, fn, (q, k, v, la, lb), go)
    check_grads(got, lambda *a: ref.polyline_attention(*a, None, symmetric), (q, k, v, la, lb), go, GRADS)


@SYM
def test_polyline_backward_few_long_problems_cpu(symmetric):
    """One image, one head, 552 tokens: the backward splits the problem into key and query chunks."""
    q, k, v = _packed_qkv(1, 23, 24, 1, 8, torch.float32, dv=6)
    la, lb = _decays(1, 23, 24, 1, "range")
    go = torch.randn(1, 23, 24, 1, 6)
    fn = lambda *a: torch.ops.vitk.polyline_attention(*a, None, symmetric)  # noqa: E731
    got = _grads(fn, (q, k, v, la, lb), go)
    check_grads(got, lambda *a: ref.polyline_attention(*a, None, symmetric), (q, k, v, la, lb), go, GRADS)


@pytest.mark.parametrize("grid", [(16, 16), (20, 9), (9, 20), (17, 16)], ids=lambda g: f"{g[0]}x{g[1]}")
def test_polyline_symmetric_key_tiles_cpu(grid):
    """The symmetric CPU kernels on both sides of the single key tile (N <= 256 tokens: both passes
    from one score tile; 16x16 is the largest, 20x9 has more than 16 image rows; 17x16 = 272 tokens:
    several key tiles, passes apart): each pass's part, the output and every gradient."""
    H, W = grid
    q, k, v = _packed_qkv(2, H, W, 2, 8, torch.float32, dv=12)
    la, lb = _decays(2, H, W, 2, "range")
    out, lse, parts = torch.ops.vitk.polyline_attention_fwd(q, k, v, la, lb, 0.4, True)
    d = [t.double() for t in (q, k, v, la, lb)]
    # Pass 0 is the one-directional form; pass 1 is it on the transposed image, decays swapped.
    tr = lambda t: t.transpose(1, 2)  # noqa: E731
    part0 = ref.polyline_attention(*d, 0.4, False)
    part1 = tr(ref.polyline_attention(tr(d[0]), tr(d[1]), tr(d[2]), tr(d[4]), tr(d[3]), 0.4, False))
    _close(parts[0], part0, torch.float32, "part 0")
    _close(parts[1], part1, torch.float32, "part 1")
    _close(out, (part0 + part1) / 2, torch.float32)
    go = torch.randn(2, H, W, 2, 12)
    fn = lambda *a: torch.ops.vitk.polyline_attention(*a, 0.4, True)  # noqa: E731
    got = _grads(fn, (q, k, v, la, lb), go)
    exp = _grads(lambda *a: ref.polyline_attention(*a, 0.4, True), tuple(d), go.double())
    for name, g, e in zip(("dq", "dk", "dv", "dlog_alpha", "dlog_beta"), got, exp):
        _close(g, e, torch.float32, name)
    # Without decay gradients the passes' dS are summed as they are formed.
    got = _grads(lambda a, b, c: fn(a, b, c, la, lb), (q, k, v), go)
    for name, g, e in zip(("dq", "dk", "dv"), got, exp):
        _close(g, e, torch.float32, name)


@pytest.mark.parametrize("backend,device", PFWD)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_polyline_backward_half(backend, device, dtype, run_on):
    q, k, v = _packed_qkv(1, 4, 5, 2, 8, dtype, device)
    la, lb = _decays(1, 4, 5, 2, "range", device)
    go = torch.randn(1, 4, 5, 2, 8, device=device).to(dtype)
    got = run_on(backend, _grads, torch.ops.vitk.polyline_attention, (q, k, v, la, lb), go)
    check_grads(got, ref.polyline_attention, (q, k, v, la, lb), go, GRADS, dtype)


@pytest.mark.parametrize("shape", [(2, 3, 14, 14), (1, 1, 23, 24)], ids=["one-sweep", "two-sweep"])
def test_polyline_backward_deterministic_on_cpu(shape):
    """Bitwise equal across runs and thread counts (decay gradients are summed in a fixed order)."""
    B, nh, H, W = shape
    q, k, v = _packed_qkv(B, H, W, nh, 16, torch.float32)
    la, lb = _decays(B, H, W, nh, "range")
    go = torch.randn(B, H, W, nh, 16)
    a = _grads(torch.ops.vitk.polyline_attention, (q, k, v, la, lb), go)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        b = _grads(torch.ops.vitk.polyline_attention, (q, k, v, la, lb), go)
    finally:
        torch.set_num_threads(threads)
    c = _grads(torch.ops.vitk.polyline_attention, (q, k, v, la, lb), go)
    assert all(torch.equal(x, y) and torch.equal(x, z) for x, y, z in zip(a, b, c))


@SYM
def test_polyline_gradcheck(symmetric):
    torch.manual_seed(3)
    q, k, v = (t.double() for t in _packed_qkv(1, 3, 4, 2, 4, torch.float32))
    la, lb = (-0.2 - torch.rand(1, 3, 4, 2, dtype=torch.float64) for _ in range(2))
    # The kernels compute in fp32, so gradcheck's float64 finite differences need fp32-sized steps.
    fn = lambda a, b, c, x, y: torch.ops.vitk.polyline_attention(  # noqa: E731
        a.float(), b.float(), c.float(), x, y, None, symmetric).double()
    inputs = tuple(t.detach().requires_grad_(True) for t in (q, k, v, la, lb))
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-3, atol=2e-3, rtol=2e-3)


def test_polyline_saves_only_linear_tensors():
    B, H, W, nh, d = 1, 14, 14, 2, 16
    q, k, v = (t.detach().requires_grad_(True) for t in _packed_qkv(B, H, W, nh, d, torch.float32))
    la, lb = (t.requires_grad_(True) for t in _decays(B, H, W, nh, "range"))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        torch.ops.vitk.polyline_attention(q, k, v, la, lb)
    numel = sum(t.numel() for t in saved)
    # q, k, v, the decays, out, its two halves and the two log-sum-exps: nothing N x N.
    tokens = B * H * W * nh
    assert numel <= 6 * q.numel() + 4 * tokens


def test_polyline_empty_batch():
    q, k, v = _packed_qkv(0, 4, 5, 2, 8, torch.float32)
    check_empty_batch(torch.ops.vitk.polyline_attention, (q, k, v, *_decays(0, 4, 5, 2, "range")), (0, 4, 5, 2, 8))


@SYM
def test_polyline_opcheck(symmetric):
    q, k, v = _packed_qkv(1, 3, 5, 2, 8, torch.float32, dv=4)
    la, lb = _decays(1, 3, 5, 2, "range")
    args = [t.detach().requires_grad_(True) for t in (q, k, v, la, lb)]
    torch.library.opcheck(torch.ops.vitk.polyline_attention_fwd.default, (*args, 0.3, symmetric))
    torch.library.opcheck(torch.ops.vitk.polyline_attention.default, (q, k, v, la, lb, None, symmetric))
    torch.library.opcheck(torch.ops.vitk.polyline_attention_fwd.default, (q, k, v, la, lb, 0.3, symmetric, False))
    out, lse, parts = torch.ops.vitk.polyline_attention_fwd(q, k, v, la, lb, 0.3, symmetric)
    go = torch.randn_like(out)
    torch.library.opcheck(torch.ops.vitk.polyline_attention_bwd.default,
                          (go, q, k, v, la, lb, out, parts, lse, 0.3, symmetric, True))



@pytest.mark.parametrize("backend,device", PFWD)
@pytest.mark.parametrize("grid", [(5, 7), (17, 16)], ids=["one-tile", "key-tiles"])
@SYM
def test_polyline_inference_stores_only_out(backend, device, grid, symmetric, run_on):
    """Without save_for_backward: the same out and lse, bit for bit, and an empty parts, on both
    sides of the single key tile (past it the CPU kernel still needs the halves internally)."""
    H, W = grid if backend != "triton" or device != "cpu" else (3, 4)
    q, k, v = _packed_qkv(1, H, W, 2, 8, torch.float32, device, dv=16)
    la, lb = _decays(1, H, W, 2, "range", device)
    full = run_on(backend, torch.ops.vitk.polyline_attention_fwd, q, k, v, la, lb, 0.4, symmetric, True)
    lean = run_on(backend, torch.ops.vitk.polyline_attention_fwd, q, k, v, la, lb, 0.4, symmetric, False)
    assert lean[2].shape == (0,)
    assert torch.equal(lean[0], full[0]) and torch.equal(lean[1], full[1])


def test_polyline_public_op_saves_only_when_grad_is_wanted():
    q, k, v = _packed_qkv(1, 4, 6, 2, 8, torch.float32)
    lean_fwd = lambda *a: torch.ops.vitk.polyline_attention_fwd(*a, 0.3, True, False)  # noqa: E731
    saves_only_when_grad_is_wanted(torch.ops.vitk.polyline_attention, lean_fwd,
                                   (q, k, v, *_decays(1, 4, 6, 2, "range")), trained=4)


@bad_inputs(BAD_DECAY_ARGS)
def test_polyline_bad_input(change, name):
    q, k, v = _packed_qkv(1, 4, 5, 2, 8, torch.float32)
    check_bad_decay_args(torch.ops.vitk.polyline_attention, q, k, v, *_decays(1, 4, 5, 2, "range"), change, name)


def test_polyline_cpu_kernel_checks_its_arguments():
    """The C++ entry points validate on their own too (they are reachable without the op layer)."""
    q, k, v = _packed_qkv(1, 4, 5, 2, 8, torch.float32)
    la, lb = _decays(1, 4, 5, 2, "range")
    with pytest.raises(ValueError, match="^log_alpha:"):
        torch.ops.vitk.polyline_attention_fwd(q, k, v, la[..., :1], lb, 0.3, True, True)
    with pytest.raises(ValueError, match="^log_beta:"):
        torch.ops.vitk.polyline_attention_fwd(q, k, v, la, lb.to(torch.int64), 0.3, True, True)
    out, lse, parts = torch.ops.vitk.polyline_attention_fwd(q, k, v, la, lb, 0.3, True, True)
    with pytest.raises(ValueError, match="^lse:"):
        torch.ops.vitk.polyline_attention_bwd(out, q, k, v, la, lb, out, parts, lse[:1], 0.3, True, True)
    with pytest.raises(ValueError, match="^parts:"):
        torch.ops.vitk.polyline_attention_bwd(out, q, k, v, la, lb, out, parts[:1], lse, 0.3, True, True)
