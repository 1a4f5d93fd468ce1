"""gaussian_mask_attention: every backend against vitkernels.reference.masked_attention in float64."""
import pytest
import torch

import vitkernels  # noqa: F401
from vitkernels.reference import masked_attention as ref

from attention_checks import TOL, close as _close, grads as _grads, packed_qkv as _packed_qkv  # noqa: F401
from attention_checks import bad_inputs, check_grads, raises_named
from conftest import backend_params

FWD = backend_params("gaussian_mask_attention_fwd")


def _mixture(heads, M, device, lo=0.3, hi=3.0, dtype=torch.float32):
    w = torch.randn(heads, M, device=device).to(dtype)
    sigma = (lo + (hi - lo) * torch.rand(heads, M, device=device)).to(dtype)
    return w, sigma


def _ref(q, k, v, w, s, scale=None):
    return ref.gaussian_mask_attention(q.double(), k.double(), v.double(), w.double(), s.double(), scale)


def _small_for_interpreter(backend, device, B, H, W):
    return backend == "triton" and device == "cpu" and B * H * W > 300


GRIDS = [(1, 1), (1, 9), (4, 1), (5, 7), (8, 8), (16, 16)]


@pytest.mark.parametrize("backend,device", FWD)
@pytest.mark.parametrize("grid", GRIDS, ids=lambda g: f"{g[0]}x{g[1]}")
@pytest.mark.parametrize("M", [1, 3, 5])
def test_gaussian_forward(backend, device, grid, M, run_on):
    H, W = grid
    B = 2
    if _small_for_interpreter(backend, device, B, H, W):
        B = 1
    q, k, v = _packed_qkv(B, H, W, 2, 16, torch.float32, device)
    w, s = _mixture(2, M, device)
    out = run_on(backend, torch.ops.vitk.gaussian_mask_attention, q, k, v, w, s, None)
    assert out.shape == q.shape and out.is_contiguous() and out.dtype == q.dtype
    _close(out, _ref(q, k, v, w, s), torch.float32)


# sigma near 0: the mask becomes a delta (only the query's own token keeps a nonzero score);
# large sigma: the mask is nearly constant; negative weights flip the sign of the scores.
MIXTURES = {
    "delta": (torch.tensor([[1e-4, 2e-3], [1e-3, 1e-4]]), torch.tensor([[1.0, 0.5], [2.0, -1.0]])),
    "wide": (torch.tensor([[50.0, 300.0], [1e3, 80.0]]), torch.tensor([[0.7, 0.3], [1.0, 2.0]])),
    "negative": (torch.tensor([[0.5, 2.0], [1.5, 0.8]]), torch.tensor([[-1.0, -0.5], [-2.0, 0.4]])),
}


@pytest.mark.parametrize("backend,device", FWD)
@pytest.mark.parametrize("kind", list(MIXTURES))
def test_gaussian_forward_extreme_mixtures(backend, device, kind, run_on):
    sigma, w = (t.to(device) for t in MIXTURES[kind])
    q, k, v = _packed_qkv(1, 6, 7, 2, 16, torch.float32, device)
    out = run_on(backend, torch.ops.vitk.gaussian_mask_attention, q, k, v, w, sigma, 0.5)
    _close(out, _ref(q, k, v, w, sigma, 0.5), torch.float32)


@pytest.mark.parametrize("backend,device", FWD)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("param_dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_gaussian_forward_dtypes_and_dv(backend, device, dtype, param_dtype, run_on):
    q, k, v = _packed_qkv(1, 6, 5, 2, 16, dtype, device, dv=24)
    w, s = _mixture(2, 3, device, dtype=param_dtype)
    out = run_on(backend, torch.ops.vitk.gaussian_mask_attention, q, k, v, w, s, 0.3)
    assert out.shape == (1, 6, 5, 2, 24) and out.dtype == dtype
    _close(out, _ref(q, k, v, w, s, 0.3), dtype)


# (B, H, W, heads, d, dv, M); the 23 x 24 grid is a single long problem, which the CPU kernel
# splits into key and query passes.
BWD_CASES = [
    (2, 5, 7, 2, 16, 16, 3),
    (1, 1, 9, 1, 8, 8, 1),
    (2, 4, 1, 2, 8, 12, 2),
    (2, 16, 16, 2, 32, 32, 5),
    (1, 23, 24, 1, 8, 8, 2),
]


@pytest.mark.parametrize("backend,device", FWD)
@pytest.mark.parametrize("case", BWD_CASES, ids=lambda c: "B{}-{}x{}-h{}-d{}-dv{}-M{}".format(*c))
def test_gaussian_backward(backend, device, case, run_on):
    B, H, W, nh, d, dv, M = case
    if backend == "triton" and device == "cpu" and B * H * W > 100:
        pytest.skip("interpreter: small shapes only")
    q, k, v = _packed_qkv(B, H, W, nh, d, torch.float32, device, dv=dv)
    w, s = _mixture(nh, M, device)
    go = torch.randn(B, H, W, nh, dv, device=device)
    fn = lambda a, b, c, x, y: torch.ops.vitk.gaussian_mask_attention(a, b, c, x, y)  # noqa: E731
    got = run_on(backend, _grads, fn, (q, k, v, w, s), go)
    check_grads(got, ref.gaussian_mask_attention, (q, k, v, w, s), go, ("dq", "dk", "dv", "dmix_weight", "dmix_sigma"))
    assert got[3].dtype == w.dtype and got[4].shape == s.shape


def test_gaussian_backward_deterministic_and_thread_independent():
    q, k, v = _packed_qkv(3, 8, 9, 3, 16, torch.float32, "cpu")
    w, s = _mixture(3, 4, "cpu")
    go = torch.randn(3, 8, 9, 3, 16)
    fn = lambda a, b, c, x, y: torch.ops.vitk.gaussian_mask_attention(a, b, c, x, y)  # noqa: E731
    threads = torch.get_num_threads()
    try:
        a = _grads(fn, (q, k, v, w, s), go)
        b = _grads(fn, (q, k, v, w, s), go)
        torch.set_num_threads(1)
        c = _grads(fn, (q, k, v, w, s), go)
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert all(torch.equal(x, y) for x, y in zip(a, c))


def test_gaussian_only_mixture_grad_when_asked():
    q, k, v = _packed_qkv(1, 4, 5, 2, 8, torch.float32, "cpu")
    w, s = _mixture(2, 2, "cpu")
    go = torch.randn(1, 4, 5, 2, 8)
    out, lse = torch.ops.vitk.gaussian_mask_attention_fwd(q, k, v, w, s, 0.35)
    dq, dk, dv, dw, ds = torch.ops.vitk.gaussian_mask_attention_bwd(go, q, k, v, w, s, out, lse, 0.35, False)
    assert dw.numel() == 0 and ds.numel() == 0
    expect = _grads(lambda a, b, c: ref.gaussian_mask_attention(a, b, c, w.double(), s.double(), 0.35),
                    (q.double(), k.double(), v.double()), go.double())
    for name, g, e in zip(("dq", "dk", "dv"), (dq, dk, dv), expect):
        _close(g, e, torch.float32, name)


def test_gaussian_gradcheck():
    torch.manual_seed(3)
    q, k, v = (t.double() for t in _packed_qkv(1, 2, 3, 2, 3, torch.float32, "cpu", dv=4))
    w, s = _mixture(2, 2, "cpu", lo=0.6, hi=2.0, dtype=torch.float64)
    # The kernels compute in fp32, so gradcheck's float64 finite differences need fp32-sized steps;
    # the mixture parameters go in as float64 (the kernel accepts any float dtype for them).
    fn = lambda a, b, c, x, y: torch.ops.vitk.gaussian_mask_attention(a.float(), b.float(), c.float(),  # noqa: E731
                                                                      x, y).double()
    inputs = tuple(t.detach().requires_grad_(True) for t in (q, k, v, w, s))
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-3, atol=2e-3, rtol=2e-3)


def test_gaussian_zero_batch():
    q, k, v = _packed_qkv(0, 4, 5, 2, 8, torch.float32, "cpu")
    w, s = _mixture(2, 3, "cpu")
    leaves = [t.detach().requires_grad_(True) for t in (q, k, v, w, s)]
    out = torch.ops.vitk.gaussian_mask_attention(*leaves)
    assert out.shape == (0, 4, 5, 2, 8)
    grads = torch.autograd.grad(out, leaves, torch.zeros_like(out))
    assert grads[3].shape == w.shape and torch.equal(grads[3], torch.zeros_like(w))


def test_gaussian_saves_only_qkv_out_lse():
    q, k, v = _packed_qkv(1, 14, 14, 2, 16, torch.float32, "cpu")
    q, k, v = (t.detach().requires_grad_(True) for t in (q, k, v))
    w, s = (t.requires_grad_(True) for t in _mixture(2, 5, "cpu"))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        torch.ops.vitk.gaussian_mask_attention(q, k, v, w, s)
    numel = sum(t.numel() for t in saved)
    # q, k, v (views of their own storage), out, lse and the mixture: nothing N x N.
    assert numel <= 4 * q.numel() + q.numel() // q.shape[-1] + w.numel() + s.numel()


def test_gaussian_opcheck():
    q, k, v = _packed_qkv(1, 5, 6, 2, 8, torch.float32, "cpu", dv=12)
    w, s = _mixture(2, 3, "cpu")
    args = [t.detach().requires_grad_(True) for t in (q, k, v, w, s)]
    torch.library.opcheck(torch.ops.vitk.gaussian_mask_attention_fwd.default, (*args, 0.25))
    torch.library.opcheck(torch.ops.vitk.gaussian_mask_attention.default, (q, k, v, w, s, None))


BAD = [
    (dict(w=lambda w, s: w[:1]), "mix_weight"),                      # heads mismatch
    (dict(w=lambda w, s: w[:, None]), "mix_weight"),                 # three dimensions
    (dict(w=lambda w, s: w[:, :0]), "mix_weight"),                   # M = 0
    (dict(s=lambda w, s: torch.rand(2, 4)), "mix_sigma"),            # shapes differ
    (dict(s=lambda w, s: s.to(torch.int64)), "mix_sigma"),
    (dict(w=lambda w, s: w.to(torch.int32)), "mix_weight"),
    (dict(w=lambda w, s: torch.empty(w.shape, device="meta")), "mix_weight"),
    (dict(q=lambda q: q.to(torch.int32)), "q"),
    (dict(k=lambda q: q[:, :, :-1]), "k"),
    (dict(v=lambda q: q.to(torch.float16)), "v"),
    (dict(q=lambda q: q[0]), "q"),
]


@bad_inputs(BAD)
def test_gaussian_bad_input(change, name):
    q, k, v = _packed_qkv(1, 5, 6, 2, 8, torch.float32, "cpu")
    w, s = _mixture(2, 3, "cpu")
    args = dict(q=q, k=k, v=v, w=w, s=s)
    for key, fn in change.items():
        args[key] = fn(args["w"], args["s"]) if key in ("w", "s") else fn(q)
    with raises_named(name):
        torch.ops.vitk.gaussian_mask_attention(args["q"], args["k"], args["v"], args["w"], args["s"])


def test_gaussian_cpu_kernel_checks_its_arguments():
    q, k, v = _packed_qkv(1, 5, 6, 2, 8, torch.float32, "cpu")
    w, s = _mixture(2, 3, "cpu")
    with pytest.raises(ValueError, match="^mix_sigma:"):
        torch.ops.vitk.gaussian_mask_attention_fwd(q, k, v, w, s[:, :2], 0.3)
    with pytest.raises(ValueError, match="^mix_weight:"):
        torch.ops.vitk.gaussian_mask_attention_fwd(q, k, v, w[:1], s[:1], 0.3)
