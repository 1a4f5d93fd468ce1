"""axial_decay_attention (PPMA chunk / criss-cross attention), its fused forward axial_decay_attention_fwd
and the one-axis primitive axial_attention_fwd whose backward the fused op's backward chains: every
backend against vitkernels.reference.masked_attention in float64."""
import pytest
import torch

import vitkernels
from vitkernels.reference import masked_attention as ref

from attention_checks import TOL, close as _close, grads as _grads, packed_qkv as _packed_qkv  # noqa: F401
from attention_checks import (BAD_DECAY_ARGS, bad_inputs, check_bad_decay_args, check_empty_batch, check_grads,
                              saves_only_when_grad_is_wanted)
from conftest import backend_params

AFWD = backend_params("axial_attention_fwd")
DFWD = backend_params("axial_decay_attention_fwd")
ABWD = backend_params("axial_attention_bwd")


def _decay(B, H, W, heads, kind, device="cpu", dtype=torch.float32):
    shape = (B, H, W, heads)
    if kind == "range":      # log-uniform from -1e-3 to -30 (exp underflows past a step)
        t = -torch.exp(torch.empty(shape).uniform_(-6.9, 3.4))
    elif kind == "near0":
        t = -1e-3 * torch.rand(shape)
    elif kind == "steep":    # -30 except one near-zero row and column: huge prefix sums, tiny differences
        t = -30.0 + 0.1 * torch.rand(shape)
        t[:, H // 2] = -1e-3 * torch.rand(B, W, heads)
        t[:, :, W // 2] = -1e-3 * torch.rand(B, H, heads)
    elif kind == "signed":
        t = 0.7 * torch.randn(shape)
    else:
        raise ValueError(kind)
    return t.to(device=device, dtype=dtype)


def axial_reference(q, k, v, log_decay, axis, scale=None):
    """One axis of PPMA's criss-cross attention, built from the reference's own segment sums."""
    s = q.shape[-1] ** -0.5 if scale is None else scale
    perm = (0, 1, 3, 2, 4) if axis == 2 else (0, 2, 3, 1, 4)            # lines, heads, tokens, d
    qs, ks, vs = (t.permute(*perm) for t in (q, k, v))
    mask = ref.segment_sums(log_decay.permute(*perm[:4]).to(q.dtype))  # [B, lines, heads, L, L]
    o = torch.softmax((qs @ ks.transpose(-1, -2)) * s + mask, dim=-1) @ vs
    inv = (0, 1, 3, 2, 4) if axis == 2 else (0, 3, 1, 2, 4)
    return o.permute(*inv).contiguous()


def _axial(q, k, v, ld, axis, scale=None):
    s = q.shape[-1] ** -0.5 if scale is None else scale
    return torch.ops.vitk.axial_attention_fwd(q, k, v, ld, axis, s)[0]


def _expect(q, k, v, la, lb, scale=None):
    return ref.axial_decay_attention(q.double(), k.double(), v.double(), la.double(), lb.double(), scale)


GRIDS = [(1, 1), (1, 7), (5, 1), (3, 4), (7, 7), (6, 9), (14, 14)]
AXES = pytest.mark.parametrize("axis", [1, 2], ids=["cols", "rows"])
GRADS = ("dq", "dk", "dv", "dlog_alpha", "dlog_beta")


def _interpreted(backend, device):
    return backend == "triton" and device == "cpu"


def _small_for_interpreter(backend, device, H, W):
    # The interpreter pays milliseconds per device-function call, so it takes grids up to 3x4 lines
    # (one key tile either way); the GPU run takes every grid.
    if _interpreted(backend, device) and H * W > 32:
        pytest.skip("interpreter: small grids only")


@pytest.mark.parametrize("backend,device", AFWD)
@pytest.mark.parametrize("grid", GRIDS + [(56, 56)], ids=lambda g: f"{g[0]}x{g[1]}")
def test_axial_decay_forward(backend, device, grid, run_on):
    H, W = grid
    _small_for_interpreter(backend, device, H, W)
    q, k, v = _packed_qkv(2, H, W, 3, 16, torch.float32, device)
    la, lb = _decay(2, H, W, 3, "range", device), _decay(2, H, W, 3, "range", device)
    out = run_on(backend, torch.ops.vitk.axial_decay_attention, q, k, v, la, lb, None)
    assert out.shape == q.shape and out.is_contiguous() and out.dtype == q.dtype
    _close(out, _expect(q, k, v, la, lb), torch.float32)


@pytest.mark.parametrize("backend,device", AFWD)
@pytest.mark.parametrize("grid", [(1, 7), (5, 1), (6, 9), (3, 300)], ids=lambda g: f"{g[0]}x{g[1]}")
@AXES
def test_axial_primitive(backend, device, grid, axis, run_on):
    """One call of the primitive along each axis, forward and backward (lines longer than a key tile too)."""
    H, W = grid
    if backend == "triton" and device == "cpu":
        H, W = min(H, 6), min(W, 9)
    q, k, v = _packed_qkv(1, H, W, 2, 8, torch.float32, device, dv=12)
    ld = _decay(1, H, W, 2, "range", device)
    out, lse = run_on(backend, torch.ops.vitk.axial_attention_fwd, q, k, v, ld, axis, 0.4)
    assert lse.shape == (1, H, W, 2) and lse.dtype == torch.float32
    _close(out, axial_reference(q.double(), k.double(), v.double(), ld.double(), axis, 0.4), torch.float32)
    go = torch.randn(1, H, W, 2, 12, device=device)
    got = run_on(backend, _grads, lambda *a: _axial(*a, axis, 0.4), (q, k, v, ld), go)
    check_grads(got, lambda *a: axial_reference(*a, axis, 0.4), (q, k, v, ld), go, ("dq", "dk", "dv", "dlog_decay"))


@pytest.mark.parametrize("backend,device", AFWD)
@pytest.mark.parametrize("kind", ["near0", "steep", "signed"])
def test_axial_decay_regimes(backend, device, kind, run_on):
    H, W = (6, 9) if backend != "triton" or device != "cpu" else (4, 5)
    q, k, v = _packed_qkv(1, H, W, 2, 16, torch.float32, device)
    la, lb = _decay(1, H, W, 2, kind, device), _decay(1, H, W, 2, kind, device)
    out = run_on(backend, torch.ops.vitk.axial_decay_attention, q, k, v, la, lb, 0.3)
    _close(out, _expect(q, k, v, la, lb, 0.3), torch.float32)
    go = torch.randn(1, H, W, 2, 16, device=device)
    got = run_on(backend, _grads, lambda *a: torch.ops.vitk.axial_decay_attention(*a, 0.3), (q, k, v, la, lb), go)
    check_grads(got, lambda *a: ref.axial_decay_attention(*a, 0.3), (q, k, v, la, lb), go, GRADS)


@pytest.mark.parametrize("backend,device", AFWD)
@pytest.mark.parametrize("grid", GRIDS, ids=lambda g: f"{g[0]}x{g[1]}")
def test_axial_decay_backward(backend, device, grid, run_on):
    H, W = grid
    _small_for_interpreter(backend, device, H, W)
    q, k, v = _packed_qkv(2, H, W, 2, 8, torch.float32, device, dv=12)
    la, lb = _decay(2, H, W, 2, "range", device), _decay(2, H, W, 2, "range", device)
    go = torch.randn(2, H, W, 2, 12, device=device)
    got = run_on(backend, _grads, torch.ops.vitk.axial_decay_attention, (q, k, v, la, lb), go)
    assert all(g.dtype == torch.float32 for g in got)
    check_grads(got, ref.axial_decay_attention, (q, k, v, la, lb), go, GRADS)


@pytest.mark.parametrize("backend,device", AFWD)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("dims", [(16, 24), (1, 8)], ids=["dv24", "dqk1"])
def test_axial_decay_dtypes_and_dims(backend, device, dtype, dims, run_on):
    d, dv = dims
    if _interpreted(backend, device) and (dtype == torch.float32) != (d == 1):
        pytest.skip("interpreter: the half types with dv = 24, float32 with d = 1 (the GPU run takes every pair)")
    q, k, v = _packed_qkv(1, 5, 6, 2, d, dtype, device, dv=dv)
    la, lb = _decay(1, 5, 6, 2, "range", device), _decay(1, 5, 6, 2, "range", device)
    out = run_on(backend, torch.ops.vitk.axial_decay_attention, q, k, v, la, lb, 0.5)
    assert out.shape == (1, 5, 6, 2, dv) and out.dtype == dtype
    _close(out, _expect(q, k, v, la, lb, 0.5), dtype)
    go = torch.randn(1, 5, 6, 2, dv, device=device).to(dtype)
    got = run_on(backend, _grads, lambda *a: torch.ops.vitk.axial_decay_attention(*a, 0.5), (q, k, v, la, lb), go)
    check_grads(got, lambda *a: ref.axial_decay_attention(*a, 0.5), (q, k, v, la, lb), go, GRADS, dtype)


@pytest.mark.parametrize("backend,device", AFWD)
@pytest.mark.parametrize("decay_dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
def test_axial_broadcast_decays(backend, device, decay_dtype, run_on):
    """Per-head constants passed as expand()s (zero strides), in any float dtype."""
    if _interpreted(backend, device) and decay_dtype == torch.float32:
        pytest.skip("interpreter: the two cast paths only (float32 decays are every other test's)")
    q, k, v = _packed_qkv(2, 4, 5, 3, 8, torch.float32, device)
    ga = -torch.rand(3, device=device, dtype=decay_dtype) * 3
    gb = -torch.rand(3, device=device, dtype=decay_dtype)
    go = torch.randn(2, 4, 5, 3, 8, device=device)
    fn = lambda a, b, c, x, y: torch.ops.vitk.axial_decay_attention(a, b, c, x.expand(2, 4, 5, 3),  # noqa: E731
                                                                    y.expand(2, 4, 5, 3))
    out = run_on(backend, fn, q, k, v, ga, gb)
    _close(out, _expect(q, k, v, ga.expand(2, 4, 5, 3), gb.expand(2, 4, 5, 3)), torch.float32)
    got = run_on(backend, _grads, fn, (q, k, v, ga, gb), go)
    exp = _grads(lambda a, b, c, x, y: ref.axial_decay_attention(a, b, c, x.expand(2, 4, 5, 3), y.expand(2, 4, 5, 3)),
                 (q.double(), k.double(), v.double(), ga.double(), gb.double()), go.double())
    for name, g, e in zip(("dq", "dk", "dv", "dgamma_a", "dgamma_b"), got, exp):
        _close(g, e, torch.bfloat16 if g.dtype == torch.bfloat16 else torch.float32, name)


def test_axial_backward_deterministic_on_cpu():
    q, k, v = _packed_qkv(2, 14, 14, 3, 16, torch.float32)
    la, lb = _decay(2, 14, 14, 3, "range"), _decay(2, 14, 14, 3, "range")
    go = torch.randn(2, 14, 14, 3, 16)
    a = _grads(torch.ops.vitk.axial_decay_attention, (q, k, v, la, lb), go)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        b = _grads(torch.ops.vitk.axial_decay_attention, (q, k, v, la, lb), go)
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_axial_gradcheck():
    torch.manual_seed(3)
    q, k, v = (t.double() for t in _packed_qkv(1, 3, 4, 2, 4, torch.float32))
    la, lb = (-0.2 - torch.rand(1, 3, 4, 2, dtype=torch.float64) for _ in range(2))
    # The kernels compute in fp32, so gradcheck's float64 finite differences need fp32-sized steps.
    fn = lambda a, b, c, x, y: torch.ops.vitk.axial_decay_attention(  # noqa: E731
        a.float(), b.float(), c.float(), x, y).double()
    inputs = tuple(t.detach().requires_grad_(True) for t in (q, k, v, la, lb))
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-3, atol=2e-3, rtol=2e-3)


def test_axial_saves_only_linear_tensors():
    B, H, W, nh, d = 1, 14, 14, 2, 16
    q, k, v = (t.detach().requires_grad_(True) for t in _packed_qkv(B, H, W, nh, d, torch.float32))
    la, lb = (_decay(B, H, W, nh, "range").requires_grad_(True) for _ in range(2))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        torch.ops.vitk.axial_decay_attention(q, k, v, la, lb)
    # q, k, v, both decays, the two halves, the two intermediate products and two lse: O(N).
    tokens = B * H * W * nh
    assert sum(t.numel() for t in saved) <= 7 * q.numel() + 4 * tokens


def test_axial_empty_batch():
    q, k, v = _packed_qkv(0, 4, 5, 2, 8, torch.float32)
    la, lb = _decay(0, 4, 5, 2, "range"), _decay(0, 4, 5, 2, "range")
    check_empty_batch(torch.ops.vitk.axial_decay_attention, (q, k, v, la, lb), (0, 4, 5, 2, 8))


@AXES
def test_axial_opcheck(axis):
    q, k, v = _packed_qkv(1, 3, 5, 2, 8, torch.float32, dv=4)
    ld = _decay(1, 3, 5, 2, "range")
    args = [t.detach().requires_grad_(True) for t in (q, k, v, ld)]
    torch.library.opcheck(torch.ops.vitk.axial_attention_fwd.default, (*args, axis, 0.3))
    out, lse = torch.ops.vitk.axial_attention_fwd(q, k, v, ld, axis, 0.3)
    torch.library.opcheck(torch.ops.vitk.axial_attention_bwd.default,
                          (torch.randn_like(out), q, k, v, ld, out, lse, axis, 0.3, True))
    v2 = torch.randn_like(v)
    out2 = torch.ops.vitk.axial_attention_fwd(q, k, v2, ld, axis, 0.3)[0]
    torch.library.opcheck(torch.ops.vitk.axial_attention_bwd.default,
                          (torch.randn_like(out), q, k, v, ld, out, lse, axis, 0.3, True, torch.randn_like(out), v2,
                           out2))


@pytest.mark.parametrize("backend,device", ABWD)
@AXES
def test_axial_backward_two_value_streams(backend, device, axis, run_on):
    """Two value streams over the same q, k and decays in one call: dq, dk and the decay gradient are
    the sums of the two single-stream calls', dv and dv2 each stream's own."""
    H, W = (5, 7) if backend != "triton" or device != "cpu" else (3, 4)
    q, k, v = _packed_qkv(2, H, W, 3, 8, torch.float32, device, dv=16)
    v2 = torch.randn(2, H, W, 3, 16, device=device)
    ld = _decay(2, H, W, 3, "signed", device)
    out, lse = torch.ops.vitk.axial_attention_fwd(q, k, v, ld, axis, 0.3)
    out2 = torch.ops.vitk.axial_attention_fwd(q, k, v2, ld, axis, 0.3)[0]
    g, g2 = torch.randn_like(out), torch.randn_like(out)
    bwd = torch.ops.vitk.axial_attention_bwd
    both = run_on(backend, bwd, g, q, k, v, ld, out, lse, axis, 0.3, True, g2, v2, out2)
    one = run_on(backend, bwd, g, q, k, v, ld, out, lse, axis, 0.3, True)
    two = run_on(backend, bwd, g2, q, k, v2, ld, out2, lse, axis, 0.3, True)
    for name, got, exp in (("dq", both[0], one[0] + two[0]), ("dk", both[1], one[1] + two[1]),
                           ("dv", both[2], one[2]), ("dlog_decay", both[3], one[3] + two[3]), ("dv2", both[4], two[2])):
        _close(got, exp, torch.float32, name)
    assert one[4].numel() == 0
    torch.library.opcheck(torch.ops.vitk.axial_decay_attention.default, (q, k, v, ld, ld.flip(1), None))


@bad_inputs(BAD_DECAY_ARGS)
def test_axial_decay_bad_input(change, name):
    q, k, v = _packed_qkv(1, 4, 5, 2, 8, torch.float32)
    check_bad_decay_args(torch.ops.vitk.axial_decay_attention, q, k, v, _decay(1, 4, 5, 2, "range"),
                         _decay(1, 4, 5, 2, "range"), change, name)


def test_axial_bad_axis():
    q, k, v = _packed_qkv(1, 4, 5, 2, 8, torch.float32)
    ld = _decay(1, 4, 5, 2, "range")
    for axis in (0, 3, -1):
        with pytest.raises((ValueError, RuntimeError), match="^axis:"):
            torch.ops.vitk.axial_attention_fwd(q, k, v, ld, axis, 0.3)
        with pytest.raises(ValueError, match="^axis:"):
            torch.ops.vitk.axial_attention_fwd(q, k, v, ld, axis, 0.3)
    with pytest.raises(ValueError, match="^log_decay:"):
        torch.ops.vitk.axial_attention_fwd(q, k, v, ld[..., :1], 2, 0.3)
    out, lse = torch.ops.vitk.axial_attention_fwd(q, k, v, ld, 2, 0.3)
    with pytest.raises(ValueError, match="^lse:"):
        torch.ops.vitk.axial_attention_bwd(out, q, k, v, ld, out, lse[0], 2, 0.3, True, None, None, None)
    with pytest.raises(ValueError, match="^grad_out2, v2, out2:"):
        torch.ops.vitk.axial_attention_bwd(out, q, k, v, ld, out, lse, 2, 0.3, True, out, None, None)
    with pytest.raises(ValueError, match="^v2:"):
        torch.ops.vitk.axial_attention_bwd(out, q, k, v, ld, out, lse, 2, 0.3, True, out, v[:, :1], out)
    with pytest.raises(ValueError, match="^out2:"):
        torch.ops.vitk.axial_attention_bwd(out, q, k, v, ld, out, lse, 2, 0.3, True, out, v, out.double())


# ---------------------------------------------------------------- the fused forward
def _four_calls(q, k, v, la, lb, s):
    """What axial_decay_attention_fwd returns, from four calls of the primitive."""
    yw, lw = torch.ops.vitk.axial_attention_fwd(q, k, v, la, 2, s)
    yh, lh = torch.ops.vitk.axial_attention_fwd(q, k, v, lb, 1, s)
    owh = torch.ops.vitk.axial_attention_fwd(q, k, yw, lb, 1, s)[0]
    ohw = torch.ops.vitk.axial_attention_fwd(q, k, yh, la, 2, s)[0]
    return torch.stack([owh, ohw]), torch.stack([yw, yh]), torch.stack([lw, lh])


@pytest.mark.parametrize("backend,device", DFWD)
@pytest.mark.parametrize("grid", [(1, 1), (1, 7), (5, 1), (6, 9), (3, 40)], ids=lambda g: f"{g[0]}x{g[1]}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_axial_fused_outputs(backend, device, grid, dtype, run_on):
    """out, parts, mids and lse of the fused op against four primitive calls on fp32 copies of the
    inputs (both halves, both intermediate products, both softmaxes), and out against the reference."""
    H, W = grid
    if backend == "triton" and device == "cpu":
        W = min(W, 9)
    q, k, v = _packed_qkv(2, H, W, 3, 8, dtype, device, dv=12)
    la, lb = _decay(2, H, W, 3, "range", device), _decay(2, H, W, 3, "range", device)
    out, parts, mids, lse = run_on(backend, torch.ops.vitk.axial_decay_attention_fwd, q, k, v, la, lb, 0.4)
    assert parts.shape == mids.shape == (2, 2, H, W, 3, 12) and lse.shape == (2, 2, H, W, 3)
    assert out.dtype == parts.dtype == mids.dtype == dtype and lse.dtype == torch.float32
    assert all(t.is_contiguous() for t in (out, parts, mids, lse))
    ep, em, el = _four_calls(*(t.float() for t in (q, k, v)), la, lb, 0.4)
    for name, got, exp in (("parts", parts, ep), ("mids", mids, em), ("lse", lse, el)):
        _close(got, exp, dtype, name)
    _close(out, (parts[0].double() + parts[1].double()) / 2, dtype, "out vs parts")
    _close(out, _expect(q, k, v, la, lb, 0.4), dtype)


@pytest.mark.parametrize("backend,device", DFWD)
def test_axial_fused_gradients(backend, device, run_on):
    """Gradients through every differentiable output of the fused op (out, parts, mids) against
    autograd through the float64 reference's pieces."""
    H, W = (5, 7) if backend != "triton" or device != "cpu" else (3, 4)
    q, k, v = _packed_qkv(1, H, W, 2, 8, torch.float32, device, dv=12)
    la, lb = _decay(1, H, W, 2, "signed", device), _decay(1, H, W, 2, "range", device)
    go, gp, gm = (torch.randn(*lead, 1, H, W, 2, 12, device=device) for lead in ((), (2,), (2,)))

    def loss_fused(*a):
        out, parts, mids, _ = torch.ops.vitk.axial_decay_attention_fwd(*a, 0.4)
        return (out * go).sum() + (parts * gp).sum() + (mids * gm).sum()

    def loss_ref(q, k, v, la, lb):
        yw = axial_reference(q, k, v, la, 2, 0.4)
        yh = axial_reference(q, k, v, lb, 1, 0.4)
        owh = axial_reference(q, k, yw, lb, 1, 0.4)
        ohw = axial_reference(q, k, yh, la, 2, 0.4)
        out = 0.5 * owh + 0.5 * ohw
        return (out * go.double()).sum() + (torch.stack([owh, ohw]) * gp.double()).sum() + \
            (torch.stack([yw, yh]) * gm.double()).sum()

    got = run_on(backend, _grads, loss_fused, (q, k, v, la, lb), None)
    check_grads(got, loss_ref, (q, k, v, la, lb), None, GRADS)


def test_axial_fused_opcheck():
    q, k, v = _packed_qkv(1, 3, 5, 2, 8, torch.float32, dv=4)
    la, lb = _decay(1, 3, 5, 2, "range"), _decay(1, 3, 5, 2, "range")
    args = [t.detach().requires_grad_(True) for t in (q, k, v, la, lb)]
    torch.library.opcheck(torch.ops.vitk.axial_decay_attention_fwd.default, (*args, 0.3))
    torch.library.opcheck(torch.ops.vitk.axial_decay_attention_fwd.default, (q, k, v, la, lb, 0.3))
    torch.library.opcheck(torch.ops.vitk.axial_decay_attention_fwd.default, (q, k, v, la, lb, 0.3, False))


@pytest.mark.parametrize("backend,device", DFWD)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_axial_fused_inference_stores_only_out(backend, device, dtype, run_on):
    """Without save_for_backward: the same out and lse, bit for bit, and empty parts and mids."""
    q, k, v = _packed_qkv(2, 5, 7, 3, 8, dtype, device, dv=16)
    la, lb = _decay(2, 5, 7, 3, "range", device), _decay(2, 5, 7, 3, "signed", device)
    full = run_on(backend, torch.ops.vitk.axial_decay_attention_fwd, q, k, v, la, lb, 0.4, True)
    lean = run_on(backend, torch.ops.vitk.axial_decay_attention_fwd, q, k, v, la, lb, 0.4, False)
    assert lean[1].shape == lean[2].shape == (0,)
    assert torch.equal(lean[0], full[0]) and torch.equal(lean[3], full[3])


def test_axial_public_op_saves_only_when_grad_is_wanted():
    q, k, v = _packed_qkv(1, 4, 6, 2, 8, torch.float32)
    lean_fwd = lambda *a: torch.ops.vitk.axial_decay_attention_fwd(*a, 0.3, False)  # noqa: E731
    saves_only_when_grad_is_wanted(torch.ops.vitk.axial_decay_attention, lean_fwd,
                                   (q, k, v, _decay(1, 4, 6, 2, "range"), _decay(1, 4, 6, 2, "range")), trained=3)


def test_axial_fused_empty_and_bad_input():
    q, k, v = _packed_qkv(0, 4, 5, 2, 8, torch.float32)
    la = _decay(0, 4, 5, 2, "range")
    out, parts, mids, lse = torch.ops.vitk.axial_decay_attention_fwd(q, k, v, la, la, 0.3)
    assert out.shape == (0, 4, 5, 2, 8) and parts.shape == mids.shape == (2, 0, 4, 5, 2, 8)
    assert lse.shape == (2, 0, 4, 5, 2)
    q, k, v = _packed_qkv(1, 4, 5, 2, 8, torch.float32)
    la = _decay(1, 4, 5, 2, "range")
    with pytest.raises(ValueError, match="^log_beta:"):
        torch.ops.vitk.axial_decay_attention_fwd(q, k, v, la, la[..., :1], 0.3, True)
    with pytest.raises(ValueError, match="^v:"):
        torch.ops.vitk.axial_decay_attention_fwd(q, k, v[:, :1], la, la, 0.3, True)
