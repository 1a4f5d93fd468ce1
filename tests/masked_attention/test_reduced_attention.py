"""reduced_attention (PVT spatial reduction, S2AFormer strips): every backend against
vitkernels.reference.masked_attention in float64."""
import pytest
import torch

import vitkernels  # noqa: F401
from vitkernels.reference import masked_attention as ref

from attention_checks import TOL, close as _close, grads as _grads  # noqa: F401
from attention_checks import bad_inputs, check_grads, raises_named
from conftest import backend_params

FWD = backend_params("reduced_attention_fwd")


def _inputs(B, Nq, Nk, heads, dqk, dv, dtype, device):
    """q as a slice of a wider projection; k and v as slices of one packed kv projection, as PVT's
    `kv = self.kv(x_).reshape(B, -1, 2, heads, d)` produces them (here with dqk != dv allowed)."""
    q = torch.randn(B, Nq, heads, dqk + 2, device=device).to(dtype)[..., 1:dqk + 1]
    kv = torch.randn(B, Nk, 2, heads, max(dqk, dv), device=device).to(dtype)
    return q, kv[:, :, 0, :, :dqk], kv[:, :, 1, :, :dv]


# (B, Nq, Nk, heads, dqk, dv)
CASES = [
    (2, 100, 7, 2, 64, 64),
    (2, 100, 7, 1, 8, 64),       # strip form: compressed q/k channels
    (1, 5, 1, 2, 1, 8),          # a single key, dqk = 1
    (1, 1, 1, 1, 1, 1),
    (2, 37, 11, 2, 8, 8),
    (1, 37, 11, 1, 1, 16),
    (1, 1100, 49, 1, 8, 16),     # several query chunks: dk/dv from chunk partials
    (1, 600, 530, 1, 4, 4),      # many keys: online softmax over several key tiles
]


def _ids(c):
    return "B{}-{}x{}-h{}-dqk{}-dv{}".format(*c)


def _interpreter_skip(backend, device, B, Nq, Nk):
    if backend == "triton" and device == "cpu" and B * Nq * Nk > 6000:
        pytest.skip("interpreter: small shapes only")


@pytest.mark.parametrize("backend,device", FWD)
@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_reduced_forward_backward(backend, device, case, run_on):
    B, Nq, Nk, nh, dqk, dv = case
    _interpreter_skip(backend, device, B, Nq, Nk)
    q, k, v = _inputs(B, Nq, Nk, nh, dqk, dv, torch.float32, device)
    out = run_on(backend, torch.ops.vitk.reduced_attention, q, k, v, None)
    assert out.shape == (B, Nq, nh, dv) and out.is_contiguous() and out.dtype == q.dtype
    _close(out, ref.reduced_attention(q.double(), k.double(), v.double()), torch.float32)
    go = torch.randn(B, Nq, nh, dv, device=device)
    got = run_on(backend, _grads, torch.ops.vitk.reduced_attention, (q, k, v), go)
    expect = _grads(ref.reduced_attention, (q.double(), k.double(), v.double()), go.double())
    for name, g, e, t in zip(("dq", "dk", "dv"), got, expect, (q, k, v)):
        assert g.shape == t.shape and g.dtype == t.dtype
        _close(g, e, torch.float32, name)


@pytest.mark.parametrize("backend,device", FWD)
def test_reduced_forward_pvt_stage1(backend, device, run_on):
    # PVTv2 stage 1: 56 x 56 queries against the 7 x 7 reduced keys, 1 head x 64.
    if backend == "triton" and device == "cpu":
        pytest.skip("interpreter: small shapes only")
    q, k, v = _inputs(1, 3136, 49, 1, 64, 64, torch.float32, device)
    out = run_on(backend, torch.ops.vitk.reduced_attention, q, k, v, None)
    _close(out, ref.reduced_attention(q.double(), k.double(), v.double()), torch.float32)


@pytest.mark.parametrize("backend,device", FWD)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
def test_reduced_dtypes(backend, device, dtype, run_on):
    q, k, v = _inputs(2, 50, 9, 2, 8, 24, dtype, device)
    out = run_on(backend, torch.ops.vitk.reduced_attention, q, k, v, 0.4)
    assert out.dtype == dtype
    _close(out, ref.reduced_attention(q.double(), k.double(), v.double(), 0.4), dtype)
    go = torch.randn(out.shape, device=device).to(dtype)
    got = run_on(backend, _grads, lambda a, b, c: torch.ops.vitk.reduced_attention(a, b, c, 0.4), (q, k, v), go)
    assert all(g.dtype == dtype for g in got)
    check_grads(got, lambda a, b, c: ref.reduced_attention(a, b, c, 0.4), (q, k, v), go, ("dq", "dk", "dv"), dtype)


def test_reduced_backward_deterministic_and_thread_independent():
    q, k, v = _inputs(2, 1200, 49, 2, 8, 16, torch.float32, "cpu")
    go = torch.randn(2, 1200, 2, 16)
    threads = torch.get_num_threads()
    try:
        a = _grads(torch.ops.vitk.reduced_attention, (q, k, v), go)
        b = _grads(torch.ops.vitk.reduced_attention, (q, k, v), go)
        torch.set_num_threads(1)
        c = _grads(torch.ops.vitk.reduced_attention, (q, k, v), go)
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert all(torch.equal(x, y) for x, y in zip(a, c))


def test_reduced_gradcheck():
    torch.manual_seed(3)
    q, k, v = (t.double() for t in _inputs(1, 6, 3, 2, 2, 3, torch.float32, "cpu"))
    # The kernels compute in fp32, so gradcheck's float64 finite differences need fp32-sized steps.
    fn = lambda a, b, c: torch.ops.vitk.reduced_attention(a.float(), b.float(), c.float()).double()  # noqa: E731
    inputs = tuple(t.detach().requires_grad_(True) for t in (q, k, v))
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-3, atol=2e-3, rtol=2e-3)


def test_reduced_zero_queries_and_batch():
    for B, Nq in ((0, 10), (2, 0)):
        q, k, v = (t.detach().requires_grad_(True) for t in _inputs(B, Nq, 4, 2, 8, 8, torch.float32, "cpu"))
        out = torch.ops.vitk.reduced_attention(q, k, v)
        assert out.shape == (B, Nq, 2, 8)
        dq, dk, dv = torch.autograd.grad(out, (q, k, v), torch.zeros_like(out))
        assert dk.shape == k.shape and torch.equal(dk, torch.zeros_like(dk)) and torch.equal(dv, torch.zeros_like(dv))


def test_reduced_saves_only_qkv_out_lse():
    q, k, v = (t.detach().requires_grad_(True) for t in _inputs(1, 400, 25, 2, 16, 16, torch.float32, "cpu"))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        torch.ops.vitk.reduced_attention(q, k, v)
    numel = sum(t.numel() for t in saved)
    # q, k, v, out and lse: nothing Nq x Nk.
    assert numel <= 2 * q.numel() + k.numel() + v.numel() + q.numel() // q.shape[-1]


def test_reduced_opcheck():
    q, k, v = _inputs(2, 20, 5, 2, 4, 8, torch.float32, "cpu")
    args = [t.detach().requires_grad_(True) for t in (q, k, v)]
    torch.library.opcheck(torch.ops.vitk.reduced_attention_fwd.default, (*args, 0.3))
    torch.library.opcheck(torch.ops.vitk.reduced_attention.default, (q, k, v, None))


BAD = [
    (dict(k=lambda k: k[:1]), "k"),                                        # batch mismatch
    (dict(k=lambda k: k[:, :, :1]), "k"),                                  # heads mismatch
    (dict(k=lambda k: k[..., :3]), "k"),                                   # head_dim mismatch
    (dict(k=lambda k: k[:, :0]), "k"),                                     # zero keys
    (dict(v=lambda v: v[:, :4]), "v"),                                     # k vs v token count
    (dict(v=lambda v: v[:, :, :1]), "v"),                                  # k vs v heads
    (dict(q=lambda q: q.to(torch.int32)), "q"),
    (dict(v=lambda v: v.to(torch.float16)), "v"),
    (dict(k=lambda k: torch.empty(k.shape, device="meta")), "k"),
    (dict(q=lambda q: q[0]), "q"),
]


@bad_inputs(BAD)
def test_reduced_bad_input(change, name):
    q, k, v = _inputs(2, 20, 5, 2, 4, 8, torch.float32, "cpu")
    args = dict(q=q, k=k, v=v)
    for key, fn in change.items():
        args[key] = fn(args[key])
    with raises_named(name):
        torch.ops.vitk.reduced_attention(args["q"], args["k"], args["v"])


def test_reduced_cpu_kernel_checks_its_arguments():
    q, k, v = _inputs(2, 20, 5, 2, 4, 8, torch.float32, "cpu")
    with pytest.raises(ValueError, match="^k:"):
        torch.ops.vitk.reduced_attention_fwd(q, k[:, :0], v[:, :0], 0.3)
    with pytest.raises(ValueError, match="^v:"):
        torch.ops.vitk.reduced_attention_fwd(q, k, v[:, :3], 0.3)
