"""binary_linear_attention (ShiftAddViT's MatAdd core): every backend against
vitkernels.reference.shiftadd in float64, the straight-through gradient against autograd through the
official eager code."""
import pytest
import torch

import vitkernels  # noqa: F401
from vitkernels.reference import shiftadd as ref

from attention_checks import (bad_inputs, check_compiles_without_recompiles, close_to, raises_named,
                              saves_only_when_grad_is_wanted)
from conftest import backend_params

FWD = backend_params("binary_linear_attention_fwd")
TOL = {torch.float64: 1e-12, torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}


def _qkv(B, N, heads, d, dtype=torch.float32, device="cpu", dv=None):
    """q, k, v as strided views of one packed qkv projection, as the model's
    `qkv(x).reshape(B, N, 3, heads, d)` gives them (v a slice of its own wider tensor when dv != d)."""
    qkv = torch.randn(B, N, 3, heads, d, dtype=torch.float64, device=device).to(dtype)
    if dv is None:
        return qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    v = torch.randn(B, N, heads, dv + 3, dtype=torch.float64, device=device).to(dtype)[..., 1:dv + 1]
    return qkv[:, :, 0], qkv[:, :, 1], v


def _ref(q, k, v):
    return ref.binary_linear_attention(q.double(), k.double(), v.double())


def _small_for(backend, device, N):
    if backend == "triton" and device == "cpu" and N > 70:
        pytest.skip("interpreter: small shapes only")


# (B, N, heads, d): odd N from 1, d in {16, 32, 64}, and a d beyond one 64-bit code word.
CASES = [(1, 1, 1, 16), (2, 3, 1, 16), (2, 17, 2, 32), (1, 49, 5, 32), (3, 33, 2, 64), (1, 9, 1, 70),
         (2, 1025, 1, 32)]


@pytest.mark.parametrize("backend,device", FWD)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "B{}-N{}-h{}-d{}".format(*c))
def test_forward_matches_reference(backend, device, case, run_on):
    B, N, nh, d = case
    _small_for(backend, device, N)
    q, k, v = _qkv(B, N, nh, d, device=device)
    out = run_on(backend, torch.ops.vitk.binary_linear_attention, q, k, v)
    assert out.shape == (B, N, nh, d) and out.is_contiguous() and out.dtype == q.dtype
    close_to(out, _ref(q, k, v), TOL[torch.float32])


@pytest.mark.parametrize("backend,device", FWD)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_dtypes_strides_and_dv(backend, device, dtype, run_on):
    q, k, v = _qkv(2, 21, 2, 16, dtype, device, dv=24)
    q = q.transpose(0, 1).contiguous().transpose(0, 1)            # another stride order
    out = run_on(backend, torch.ops.vitk.binary_linear_attention, q, k, v)
    assert out.dtype == dtype and out.shape == (2, 21, 2, 24)
    close_to(out, _ref(q, k, v), TOL[dtype])


@pytest.mark.parametrize("backend,device", FWD)
def test_ties_at_the_mean_fall_to_zero(backend, device, run_on):
    # Every normalized q and k value equals the mean (all-equal rows): no bit is set, so out = v / ||v||.
    for d, value in ((16, 3.0), (3, 0.7)):
        q = torch.full((2, 5, 2, d), value, device=device)
        v = torch.randn(2, 5, 2, d, device=device)
        out = run_on(backend, torch.ops.vitk.binary_linear_attention, q, q.clone(), v)
        close_to(out, v / v.norm(dim=-1, keepdim=True), 2e-6)
    # Values equal to a mean that is not trivial: rows normalized to [0.25 x16], [-0.25 x16], [1, 0 x15] and
    # [-1, 0 x15] have the mean 0 exactly, which thirty of their values equal: those fall to 0 too.
    x = torch.zeros(1, 4, 1, 16)
    x[0, 0, 0], x[0, 1, 0] = 1.0, -1.0
    x[0, 2, 0, 0], x[0, 3, 0, 0] = 1.0, -1.0
    codes = ref.binary_codes(x.transpose(1, 2).double()).transpose(1, 2)[0, :, 0]
    assert codes.sum(-1).tolist() == [16, 0, 1, 0]
    v = torch.randn(1, 4, 1, 16, device=device)
    x = x.to(device)
    out = run_on(backend, torch.ops.vitk.binary_linear_attention, x, x.clone(), v)
    state = v[0, :, 0].double().T @ codes.double()                   # k_b^T v, transposed: [dv, d]
    u = 0.5 * v[0, :, 0].double() + (codes.double() @ state.T) / torch.pi
    close_to(out[0, :, 0], u / u.norm(dim=-1, keepdim=True), 2e-6)


@pytest.mark.parametrize("backend,device", FWD)
def test_nan_in_gives_nan_as_the_official_code(backend, device, run_on):
    q, k, v = (t.contiguous() for t in _qkv(2, 6, 2, 16, device=device))
    for name, where in (("q", (0, 2, 1, 3)), ("k", (1, 4, 0, 0)), ("v", (0, 1, 1, 5)), ("q", (1, 0, 0, 0))):
        args = {"q": q.clone(), "k": k.clone(), "v": v.clone()}
        args[name][where] = float("nan") if where != (1, 0, 0, 0) else float("inf")
        out = run_on(backend, torch.ops.vitk.binary_linear_attention, args["q"], args["k"], args["v"])
        expect = _ref(args["q"], args["k"], args["v"])
        assert torch.equal(torch.isnan(out), torch.isnan(expect)), name
        fin = torch.isfinite(expect)
        close_to(out[fin], expect[fin], TOL[torch.float32])


@pytest.mark.parametrize("backend,device", FWD)
@pytest.mark.parametrize("case", [(2, 9, 2, 16), (1, 33, 1, 32), (2, 5, 1, 64)], ids=str)
def test_straight_through_gradient_matches_eager_autograd(backend, device, case, run_on):
    B, N, nh, d = case
    for dtype in (torch.float64, torch.float32):
        q, k, v = _qkv(B, N, nh, d, dtype, device)
        go = torch.randn(B, N, nh, d, dtype=dtype, device=device)
        leaves = [t.detach().requires_grad_(True) for t in (q, k, v)]
        out = run_on(backend, torch.ops.vitk.binary_linear_attention, *leaves)
        got = torch.autograd.grad(out, leaves, go)
        ref_leaves = [t.detach().double().requires_grad_(True) for t in (q, k, v)]
        expect = torch.autograd.grad(ref.binary_linear_attention(*ref_leaves), ref_leaves, go.double())
        for name, g, e in zip(("dq", "dk", "dv"), got, expect):
            assert g.dtype == dtype and g.shape == e.shape
            close_to(g, e, 1e-10 if dtype == torch.float64 else 1e-4, name)


def test_gradcheck_v_and_backward_op():
    # The output depends on q and k only through their codes (piecewise constant), so the numerical
    # derivative exists for v alone; q's and k's straight-through gradients are held to eager autograd above.
    torch.manual_seed(5)
    q, k, v = (t.contiguous() for t in _qkv(1, 7, 2, 16, torch.float64))
    vv = v.detach().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: torch.ops.vitk.binary_linear_attention(q, k, x), (vv,))
    # The backward op is linear in grad_out: its own gradcheck through autograd is not needed, but its
    # values on a second random grad_out must agree with the eager code's.
    out, codes, norms, state = torch.ops.vitk.binary_linear_attention_fwd(q, k, v)
    go = torch.randn_like(out)
    dq, dk, dv = torch.ops.vitk.binary_linear_attention_bwd(go, q, k, v, out, codes, norms, state)
    leaves = [t.detach().requires_grad_(True) for t in (q, k, v)]
    expect = torch.autograd.grad(ref.binary_linear_attention(*leaves), leaves, go)
    for g, e in zip((dq, dk, dv), expect):
        close_to(g, e, 1e-12)


def test_saved_tensors_hold_no_float_copy_of_the_codes():
    q, k, v = (t.detach().requires_grad_(True) for t in _qkv(2, 301, 2, 32))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        torch.ops.vitk.binary_linear_attention(q, k, v)
    fresh = [t for t in saved if all(t.data_ptr() != x.data_ptr() for x in (q, k, v))]
    # out, codes (one int64 word per token and head, for q and k), norms (3 per token and head), state.
    B, N, nh, d = q.shape
    assert sum(t.numel() * t.element_size() for t in fresh) <= (
        q.numel() * 4 + 2 * B * N * nh * 8 + 3 * B * N * nh * 4 + B * nh * d * d * 4)
    assert not any(t.is_floating_point() and t.shape[-1] == d and t.numel() >= q.numel()
                   and t.data_ptr() != saved[-4].data_ptr() for t in fresh[1:])


def test_inference_saves_nothing_and_lean_forward_refuses_backward():
    q, k, v = _qkv(1, 11, 1, 16)
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    saves_only_when_grad_is_wanted(torch.ops.vitk.binary_linear_attention,
                                   lambda a, b, c: torch.ops.vitk.binary_linear_attention_fwd(a, b, c, False),
                                   [q, k, v], 2)
    with torch.no_grad():
        _, codes, norms, state = torch.ops.vitk.binary_linear_attention_fwd(q, k, v, False)
    assert codes.numel() == norms.numel() == state.numel() == 0


def test_deterministic_and_thread_independent():
    q, k, v = (t.detach().requires_grad_(True) for t in _qkv(2, 1500, 2, 32))
    go = torch.randn(2, 1500, 2, 32)

    def run():
        out = torch.ops.vitk.binary_linear_attention(q, k, v)
        return (out, *torch.autograd.grad(out, (q, k, v), go))
    threads = torch.get_num_threads()
    try:
        a, b = run(), run()
        torch.set_num_threads(1)
        c = run()
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(x, y) and torch.equal(x, z) for x, y, z in zip(a, b, c))


def test_empty_batch_and_tokens():
    for B, N in ((0, 5), (2, 0)):
        q, k, v = (t.detach().requires_grad_(True) for t in _qkv(B, N, 2, 16))
        out = torch.ops.vitk.binary_linear_attention(q, k, v)
        assert out.shape == (B, N, 2, 16)
        grads = torch.autograd.grad(out.sum(), (q, k, v), allow_unused=True)
        assert all(g is None or g.shape == t.shape for g, t in zip(grads, (q, k, v)))


def test_opcheck():
    q, k, v = (t.detach().requires_grad_(True) for t in _qkv(2, 13, 2, 16))
    torch.library.opcheck(torch.ops.vitk.binary_linear_attention_fwd.default, (q, k, v, True))
    torch.library.opcheck(torch.ops.vitk.binary_linear_attention.default, (q, k, v))
    out, codes, norms, state = torch.ops.vitk.binary_linear_attention_fwd(q, k, v)
    torch.library.opcheck(torch.ops.vitk.binary_linear_attention_bwd.default,
                          (torch.randn_like(out), q.detach(), k.detach(), v.detach(), out.detach(), codes, norms,
                           state))


BAD = [
    (dict(k=lambda q, k, v: k[:1]), "k"),
    (dict(k=lambda q, k, v: k[..., :8]), "k"),
    (dict(v=lambda q, k, v: v[:, :4]), "v"),
    (dict(v=lambda q, k, v: v[:, :, :1]), "v"),
    (dict(q=lambda q, k, v: q.to(torch.int32)), "q"),
    (dict(v=lambda q, k, v: v.to(torch.float16)), "v"),
    (dict(k=lambda q, k, v: torch.empty(k.shape, device="meta")), "k"),
    (dict(q=lambda q, k, v: q[0]), "q"),
    (dict(q=lambda q, k, v: q[..., :0], k=lambda q, k, v: k[..., :0]), "q"),
    (dict(v=lambda q, k, v: v[..., :0]), "v"),
]


@bad_inputs(BAD)
def test_bad_input(change, name):
    q, k, v = _qkv(2, 9, 2, 16)
    args = dict(q=q, k=k, v=v)
    for key, fn in change.items():
        args[key] = fn(q, k, v)
    with raises_named(name):
        torch.ops.vitk.binary_linear_attention(args["q"], args["k"], args["v"])


def test_backward_refuses_mismatched_saved_tensors():
    q, k, v = (t.contiguous() for t in _qkv(1, 5, 1, 16))
    out, codes, norms, state = torch.ops.vitk.binary_linear_attention_fwd(q, k, v)
    bwd = torch.ops.vitk.binary_linear_attention_bwd
    for args, name in (((out, q, k, v, out, codes[:1], norms, state), "codes"),
                       ((out, q, k, v, out, codes, norms.double(), state), "norms"),
                       ((out, q, k, v, out, codes, norms, state[..., :3]), "state"),
                       ((out[:, :2], q, k, v, out, codes, norms, state), "grad_out")):
        with raises_named(name):
            bwd(*args)


class _Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv = torch.nn.Linear(32, 96)

    def forward(self, x):
        B, N, _ = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, 2, 16).unbind(2)
        return torch.ops.vitk.binary_linear_attention(q, k, v).reshape(B, N, 32)


def test_compile_fullgraph_no_recompile():
    check_compiles_without_recompiles(_Block(), (19, 32))
