"""expert_dispatch / expert_combine: every backend against vitkernels.reference.shiftadd, gradients, and
the cases routing produces (empty experts, every token on one expert, strided indices)."""
import pytest
import torch

import vitkernels  # noqa: F401
from vitkernels.reference import shiftadd as ref

from attention_checks import bad_inputs, close_to, raises_named
from conftest import backend_params

DISPATCH = backend_params("expert_dispatch")
COMBINE = backend_params("expert_combine")
COMBINE_BWD = backend_params("expert_combine_bwd")


def _routing(kind, T, E, device="cpu"):
    if kind == "uniform":
        return torch.randint(0, E, (T,), device=device)
    if kind == "one":                              # every token on the last expert, the others empty
        return torch.full((T,), E - 1, device=device)
    if kind == "skewed":                           # 90/10, as a trained router may leave it
        return (torch.rand(T, device=device) < 0.1).long()
    return torch.stack([torch.randint(0, E, (T,), device=device)] * 2, 1)[:, 1]    # a strided view


KINDS = ["uniform", "one", "skewed", "strided"]


@pytest.mark.parametrize("backend,device", DISPATCH)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("T,C,E", [(1, 3, 1), (37, 5, 2), (300, 16, 4), (9000, 3, 3)], ids=str)
def test_dispatch_matches_reference(backend, device, kind, T, C, E, run_on):
    if backend == "triton" and device == "cpu" and T > 400:
        pytest.skip("interpreter: small shapes only")
    x = torch.randn(C, T, device=device).T                                     # transposed rows
    idx = _routing(kind, T, E, device)
    xs, off, order = run_on(backend, torch.ops.vitk.expert_dispatch, x, idx, E)
    want_xs, want_off, want_order = ref.expert_dispatch(x, idx, E)
    assert torch.equal(order, want_order) and torch.equal(off, want_off)      # stable: the same permutation
    assert torch.equal(xs, want_xs) and xs.is_contiguous()


@pytest.mark.parametrize("backend,device", COMBINE)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("T,C", [(1, 1), (41, 7), (513, 24)], ids=str)
def test_combine_matches_reference(backend, device, dtype, T, C, run_on):
    if backend == "triton" and device == "cpu" and T > 400:
        pytest.skip("interpreter: small shapes only")
    y = torch.randn(T, C + 2, device=device).to(dtype)[:, 1:-1]
    order = torch.randperm(T, device=device)
    gate = torch.rand(T, device=device)
    out = run_on(backend, torch.ops.vitk.expert_combine, y, order, gate)
    assert out.dtype == dtype and out.shape == (T, C)
    close_to(out, ref.expert_combine(y.double(), order, gate.double()), 1e-2 if dtype == torch.bfloat16 else 1e-6)


@pytest.mark.parametrize("backend,device", COMBINE_BWD)
@pytest.mark.parametrize("kind", KINDS)
def test_dispatch_experts_combine_gradients(backend, device, kind, run_on):
    # The MoE MLP's path: dispatch, one Linear per contiguous expert range, combine with the gate.
    T, C, E = 57, 6, 3
    x = torch.randn(T, C, dtype=torch.float64, device=device)
    idx = _routing(kind, T, E, device)
    w = torch.randn(E, 5, C, dtype=torch.float64, device=device)
    gate = torch.rand(T, dtype=torch.float64, device=device)

    def moe(dispatch, combine, x, gate):
        xs, off, order = dispatch(x, idx, E)
        bounds = off.tolist()
        ys = torch.cat([xs[bounds[e]:bounds[e + 1]] @ w[e].T for e in range(E)])
        return combine(ys, order, gate)

    leaves = [t.detach().requires_grad_(True) for t in (x, gate)]
    go = torch.randn(T, 5, dtype=torch.float64, device=device)
    out = run_on(backend, moe, torch.ops.vitk.expert_dispatch, torch.ops.vitk.expert_combine, *leaves)
    got = run_on(backend, torch.autograd.grad, out, leaves, go)
    ref_leaves = [t.detach().requires_grad_(True) for t in (x, gate)]
    expect_out = moe(ref.expert_dispatch, ref.expert_combine, *ref_leaves)
    expect = torch.autograd.grad(expect_out, ref_leaves, go)
    close_to(out, expect_out, 1e-12)
    for name, g, e in zip(("dx", "dgate"), got, expect):
        close_to(g, e, 1e-12, name)


def test_gradcheck():
    T, C = 11, 4
    x = torch.randn(T, C, dtype=torch.float64, requires_grad=True)
    idx = torch.randint(0, 3, (T,))
    gate = torch.rand(T, dtype=torch.float64, requires_grad=True)

    def f(x, gate):
        xs, _, order = torch.ops.vitk.expert_dispatch(x, idx, 3)
        return torch.ops.vitk.expert_combine(xs.sin(), order, gate)
    assert torch.autograd.gradcheck(f, (x, gate))


def test_dispatch_is_deterministic_and_thread_independent():
    x = torch.randn(20000, 8)
    idx = torch.randint(0, 4, (20000,))
    threads = torch.get_num_threads()
    try:
        a = torch.ops.vitk.expert_dispatch(x, idx, 4)
        torch.set_num_threads(1)
        b = torch.ops.vitk.expert_dispatch(x, idx, 4)
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(s, t) for s, t in zip(a, b))


def test_empty_tokens():
    xs, off, order = torch.ops.vitk.expert_dispatch(torch.randn(0, 4), torch.zeros(0, dtype=torch.long), 3)
    assert xs.shape == (0, 4) and off.tolist() == [0, 0, 0, 0] and order.shape == (0,)
    assert torch.ops.vitk.expert_combine(torch.randn(0, 2), order, torch.rand(0)).shape == (0, 2)


def test_opcheck():
    x = torch.randn(13, 4, requires_grad=True)
    idx = torch.randint(0, 2, (13,))
    torch.library.opcheck(torch.ops.vitk.expert_dispatch.default, (x, idx, 2))
    y = torch.randn(13, 5, requires_grad=True)
    gate = torch.rand(13, requires_grad=True)
    order = torch.randperm(13)
    torch.library.opcheck(torch.ops.vitk.expert_combine.default, (y, order, gate))
    torch.library.opcheck(torch.ops.vitk.expert_combine_bwd.default,
                          (torch.randn(13, 5), y.detach(), order, gate.detach(), True, True))


def test_compile_fullgraph():
    def moe(x, idx, gate, w0, w1):
        xs, off, order = torch.ops.vitk.expert_dispatch(x, idx, 2)
        ys = torch.cat([torch.nn.functional.linear(xs, w0), torch.nn.functional.linear(xs, w1)], 1)
        return torch.ops.vitk.expert_combine(ys, order, gate)
    torch._dynamo.reset()
    args = (torch.randn(21, 4, requires_grad=True), torch.randint(0, 2, (21,)), torch.rand(21), torch.randn(3, 4),
            torch.randn(2, 4))
    out = torch.compile(moe, fullgraph=True)(*args)
    close_to(out, moe(*args), 1e-6)
    torch._dynamo.reset()


BAD_DISPATCH = [
    ((lambda x, i: (x, torch.tensor([0, 1, 2, 0, 5]), 3)), "expert_index"),
    ((lambda x, i: (x, torch.tensor([0, -1, 2, 0, 1]), 3)), "expert_index"),
    ((lambda x, i: (x, i[:4], 3)), "expert_index"),
    ((lambda x, i: (x, i.int(), 3)), "expert_index"),
    ((lambda x, i: (x.long(), i, 3)), "x"),
    ((lambda x, i: (x[0], i, 3)), "x"),
    ((lambda x, i: (x, i, 0)), "num_experts"),
]


@bad_inputs(BAD_DISPATCH)
def test_dispatch_bad_input(change, name):
    x, idx = torch.randn(5, 3), torch.tensor([0, 1, 2, 0, 1])
    with pytest.raises((ValueError, IndexError), match=rf"^{name}:"):
        torch.ops.vitk.expert_dispatch(*change(x, idx))


BAD_COMBINE = [
    ((lambda y, o, g: (y, torch.tensor([0, 1, 1, 3, 4]), g)), "order"),
    ((lambda y, o, g: (y, torch.tensor([0, 1, 2, 3, 5]), g)), "order"),
    ((lambda y, o, g: (y, o[:4], g)), "order"),
    ((lambda y, o, g: (y, o.int(), g)), "order"),
    ((lambda y, o, g: (y, o, g[:4])), "gate"),
    ((lambda y, o, g: (y, o, g.long())), "gate"),
    ((lambda y, o, g: (y.int(), o, g)), "y_sorted"),
]


@bad_inputs(BAD_COMBINE)
def test_combine_bad_input(change, name):
    y, order, gate = torch.randn(5, 3), torch.randperm(5), torch.rand(5)
    with pytest.raises((ValueError, IndexError), match=rf"^{name}:"):
        torch.ops.vitk.expert_combine(*change(y, order, gate))
    with raises_named("grad_out"):
        torch.ops.vitk.expert_combine_bwd(torch.randn(4, 3), y, order, gate, True, True)
