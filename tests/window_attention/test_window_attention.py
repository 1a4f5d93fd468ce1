"""window_attention / varlen_attention: every backend against vitkernels.reference.window_attention."""
import pytest
import torch

import vitkernels  # noqa: F401
from vitkernels.reference import window_attention as ref

from attention_checks import TOL, close as _close, grads as _grads, packed_qkv as _packed_qkv  # noqa: F401
from attention_checks import bad_inputs, check_grads, raises_named
from conftest import backend_params

WFWD = backend_params("window_attention_fwd")
VFWD = backend_params("varlen_attention_fwd")


def _table(win, heads, device, dtype=torch.float32):
    return torch.randn((2 * win[0] - 1) * (2 * win[1] - 1), heads, device=device).to(dtype)


# (B, H, W, heads, d, window, shift): real Swin shapes shrunk, odd ones, partial windows.
CASES = [
    (2, 14, 14, 3, 32, (7, 7), (3, 3)),
    (1, 7, 7, 2, 32, (7, 7), (0, 0)),          # a single window
    (1, 16, 16, 2, 16, (8, 8), (4, 4)),
    (1, 12, 24, 1, 16, (12, 12), (6, 6)),
    (2, 8, 16, 2, 20, (4, 8), (2, 4)),         # non-square window, head_dim not a power of two
    (1, 8, 16, 2, 16, (4, 8), (1, 5)),
    (1, 13, 17, 2, 16, (7, 7), (3, 3)),        # H, W not multiples of the window
    (1, 9, 10, 1, 16, (4, 4), (0, 2)),         # shift along one axis only
    (1, 5, 6, 2, 16, (7, 7), (0, 0)),          # window larger than the image
    (1, 5, 6, 1, 16, (7, 7), (2, 3)),
]


def _ids(c):
    B, H, W, nh, d, win, sh = c
    return f"B{B}-{H}x{W}-h{nh}-d{d}-w{win[0]}x{win[1]}-s{sh[0]}{sh[1]}"


@pytest.mark.parametrize("backend,device", WFWD)
@pytest.mark.parametrize("case", CASES, ids=[_ids(c) for c in CASES])
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "nobias"])
def test_window_forward(backend, device, case, with_bias, run_on):
    B, H, W, nh, d, win, shift = case
    if backend == "triton" and device == "cpu" and H * W * B > 300:
        pytest.skip("interpreter: small shapes only")
    q, k, v = _packed_qkv(B, H, W, nh, d, torch.float32, device)
    bias = _table(win, nh, device) if with_bias else None
    out = run_on(backend, torch.ops.vitk.window_attention, q, k, v, list(win), list(shift), bias, None)
    expect = ref.window_attention(q.double(), k.double(), v.double(), win, shift,
                                  None if bias is None else bias.double())
    assert out.shape == q.shape and out.is_contiguous() and out.dtype == q.dtype
    _close(out, expect, torch.float32)


@pytest.mark.parametrize("backend,device", WFWD)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
def test_window_forward_dtypes_and_dv(backend, device, dtype, run_on):
    q, k, v = _packed_qkv(1, 8, 8, 2, 16, dtype, device, dv=24)
    bias = _table((4, 4), 2, device)
    out = run_on(backend, torch.ops.vitk.window_attention, q, k, v, [4, 4], [2, 2], bias, 0.3)
    expect = ref.window_attention(q.double(), k.double(), v.double(), (4, 4), (2, 2), bias.double(), 0.3)
    assert out.shape == (1, 8, 8, 2, 24) and out.dtype == dtype
    _close(out, expect, dtype)


@pytest.mark.parametrize("backend,device", WFWD)
@pytest.mark.parametrize("case", [CASES[0], CASES[4], CASES[6], CASES[9]], ids=_ids)
def test_window_backward(backend, device, case, run_on):
    B, H, W, nh, d, win, shift = case
    if backend == "triton" and device == "cpu":
        B, H, W = 1, min(H, 9), min(W, 10)
    q, k, v = _packed_qkv(B, H, W, nh, d, torch.float32, device)
    bias = _table(win, nh, device)
    go = torch.randn(B, H, W, nh, d, device=device)[..., :].transpose(1, 2).contiguous().transpose(1, 2)
    got = run_on(backend, _grads, lambda a, b, c, t: torch.ops.vitk.window_attention(a, b, c, list(win), list(shift), t),
                 (q, k, v, bias), go)
    check_grads(got, lambda a, b, c, t: ref.window_attention(a, b, c, win, shift, t), (q, k, v, bias), go,
                ("dq", "dk", "dv", "dbias"))


def test_window_backward_deterministic_on_cpu():
    q, k, v = _packed_qkv(2, 14, 14, 3, 32, torch.float32, "cpu")
    bias = _table((7, 7), 3, "cpu")
    go = torch.randn(2, 14, 14, 3, 32)
    fn = lambda a, b, c, t: torch.ops.vitk.window_attention(a, b, c, [7, 7], [3, 3], t)  # noqa: E731
    a = _grads(fn, (q, k, v, bias), go)
    b = _grads(fn, (q, k, v, bias), go)
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_window_gradcheck():
    torch.manual_seed(3)
    q, k, v = (t.double() for t in _packed_qkv(1, 5, 6, 2, 4, torch.float32, "cpu"))
    bias = _table((4, 4), 2, "cpu").double()
    # The kernels compute in fp32, so gradcheck's float64 finite differences need fp32-sized steps.
    fn = lambda a, b, c, t: torch.ops.vitk.window_attention(a.float(), b.float(), c.float(), [4, 4], [1, 2],  # noqa
                                                            t.float()).double()
    inputs = tuple(t.detach().requires_grad_(True) for t in (q, k, v, bias))
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-3, atol=2e-3, rtol=2e-3)


def test_window_saves_only_qkv_out_lse():
    q, k, v = _packed_qkv(1, 14, 14, 2, 16, torch.float32, "cpu")
    q, k, v = (t.detach().requires_grad_(True) for t in (q, k, v))
    bias = _table((7, 7), 2, "cpu").requires_grad_(True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        torch.ops.vitk.window_attention(q, k, v, [7, 7], [3, 3], bias)
    numel = sum(t.numel() for t in saved)
    # q, k, v (views of their own storage), out, lse and the bias table: nothing N x N.
    assert numel <= 4 * q.numel() + q.numel() // q.shape[-1] + bias.numel()


def test_window_opcheck():
    q, k, v = _packed_qkv(1, 9, 10, 2, 8, torch.float32, "cpu")
    bias = _table((4, 4), 2, "cpu")
    args = [t.detach().requires_grad_(True) for t in (q, k, v, bias)]
    torch.library.opcheck(torch.ops.vitk.window_attention_fwd.default,
                          (args[0], args[1], args[2], [4, 4], [1, 2], args[3], 0.25))
    torch.library.opcheck(torch.ops.vitk.window_attention.default, (q, k, v, [4, 4], [1, 2], bias, None))


BAD = [
    (dict(k=lambda q: q[:, :, :-1]), "k"),
    (dict(window_size=[0, 7]), "window_size"),
    (dict(window_size=[-2, 7]), "window_size"),
    (dict(shift_size=[-1, 0]), "shift_size"),
    (dict(shift_size=[7, 0]), "shift_size"),
    (dict(bias=lambda q: torch.randn(168, 2)), "rel_pos_bias"),
    (dict(q=lambda q: q.to(torch.int32)), "q"),
    (dict(v=lambda q: q.to(torch.float16)), "v"),
    (dict(v=lambda q: torch.empty(q.shape, device="meta")), "v"),
    (dict(q=lambda q: q[0]), "q"),
]


@bad_inputs(BAD)
def test_window_bad_input(change, name):
    q, k, v = _packed_qkv(1, 14, 14, 2, 16, torch.float32, "cpu")
    args = dict(q=q, k=k, v=v, window_size=[7, 7], shift_size=[3, 3], bias=_table((7, 7), 2, "cpu"))
    for key, val in change.items():
        args[key] = val(q) if callable(val) else val
    with raises_named(name):
        torch.ops.vitk.window_attention(args["q"], args["k"], args["v"], args["window_size"], args["shift_size"],
                                        args["bias"])


# ------------------------------------------------------------------------------------ varlen
def _segments(lengths, heads, d, dtype, device):
    total = sum(lengths)
    cu = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0).tolist()), dtype=torch.int32, device=device)
    qkv = torch.randn(total, 3, heads, d, device=device).to(dtype)
    return qkv[:, 0], qkv[:, 1], qkv[:, 2], cu, max(lengths)


@pytest.mark.parametrize("backend,device", VFWD)
@pytest.mark.parametrize("lengths", [[64, 64, 32, 0, 1, 17], [300], [5]], ids=["mixed", "long", "one"])
def test_varlen_forward_backward(backend, device, lengths, run_on):
    if backend == "triton" and device == "cpu":
        lengths = [min(n, 40) for n in lengths]
    q, k, v, cu, mx = _segments(lengths, 2, 16, torch.float32, device)
    go = torch.randn(q.shape, device=device)
    fn = lambda a, b, c: torch.ops.vitk.varlen_attention(a, b, c, cu, mx)  # noqa: E731
    out = run_on(backend, fn, q, k, v)
    expect = ref.varlen_attention(q.double(), k.double(), v.double(), cu, mx)
    _close(out, expect, torch.float32)
    got = run_on(backend, _grads, fn, (q, k, v), go)
    check_grads(got, lambda a, b, c: ref.varlen_attention(a, b, c, cu, mx), (q, k, v), go, ("dq", "dk", "dv"))


def test_varlen_bad_input():
    q, k, v, cu, mx = _segments([4, 5], 2, 8, torch.float32, "cpu")
    with pytest.raises(ValueError, match="^cu_seqlens:"):
        torch.ops.vitk.varlen_attention(q, k, v, cu.long(), mx)
    with pytest.raises(ValueError, match="^cu_seqlens:"):
        torch.ops.vitk.varlen_attention(q, k, v, torch.tensor([0, 4, 8], dtype=torch.int32), mx)
    with pytest.raises(ValueError, match="^max_seqlen:"):
        torch.ops.vitk.varlen_attention(q, k, v, cu, 3)


def test_varlen_opcheck():
    q, k, v, cu, mx = _segments([3, 0, 6], 2, 8, torch.float32, "cpu")
    args = [t.detach().requires_grad_(True) for t in (q, k, v)]
    torch.library.opcheck(torch.ops.vitk.varlen_attention_fwd.default, (*args, cu, mx, 0.3))
