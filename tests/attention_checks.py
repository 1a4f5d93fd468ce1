"""Helpers shared by the attention families' tests: inputs laid out as the models produce them, and
comparisons against the float64 references with per-dtype tolerances, and the checks every family
repeats: gradients, empty batches, bad arguments, torch.compile of a model block."""
import pytest
import torch

# Max |error| relative to max(1, max |expected|), per input dtype (the kernels accumulate in fp32).
TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


def packed_qkv(B, H, W, heads, d, dtype, device="cpu", dv=None):
    """q, k, v [B, H, W, heads, d] as strided views into one packed projection, as a ViT block
    produces them; with dv, v is a strided slice of its own wider tensor."""
    if dv is None or dv == d:
        qkv = torch.randn(B, H, W, 3, heads, d, device=device).to(dtype)
        return qkv[..., 0, :, :], qkv[..., 1, :, :], qkv[..., 2, :, :]
    qk = torch.randn(B, H, W, 2, heads, d, device=device).to(dtype)
    v = torch.randn(B, H, W, heads, dv + 3, device=device).to(dtype)[..., 1:dv + 1]
    return qk[..., 0, :, :], qk[..., 1, :, :], v


def randomize(module, std, **by_leaf):
    """Redraws every parameter of module in place (default inits, zero biases and unit norms, hide
    wiring mistakes): norm weights 1 + N(0, 0.2), a parameter whose last name is a key of by_leaf by
    that function, the rest N(0, std). Returns module."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if "norm" in name and leaf == "weight":
                p.copy_(1 + 0.2 * torch.randn_like(p))
            elif leaf in by_leaf:
                by_leaf[leaf](p)
            else:
                p.normal_(0, std)
    return module


def close_to(out, expect, tol, what="output"):
    """Max |out - expect| within tol * max(1, max |expect|)."""
    err = (out.double() - expect.double()).abs().max().item() if out.numel() else 0.0
    scale = max(1.0, expect.double().abs().max().item()) if expect.numel() else 1.0
    assert err <= tol * scale, f"{what}: max error {err:.3g} > {tol * scale:.3g}"


def close(out, expect, dtype, what="output"):
    close_to(out, expect, TOL[dtype], what)


def grads(fn, inputs, grad_out):
    """Gradients of fn(*inputs) against grad_out, with the inputs as fresh leaves."""
    leaves = [t.detach().requires_grad_(True) for t in inputs]
    out = fn(*leaves)
    return torch.autograd.grad(out, leaves, grad_out)


def check_grads(got, reference, inputs, grad_out, names, dtype=torch.float32):
    """got, an op's gradients at inputs against grad_out, match those of reference computed in
    float64 (grad_out None: both functions return a scalar loss), each with its input's shape and
    within dtype's tolerance."""
    expect = grads(reference, tuple(t.double() for t in inputs), None if grad_out is None else grad_out.double())
    for name, g, e in zip(names, got, expect):
        assert g.shape == e.shape, f"{name}: shape {tuple(g.shape)}, expected {tuple(e.shape)}"
        close(g, e, dtype, name)


def check_empty_batch(op, inputs, out_shape):
    """op on inputs with an empty batch returns out_shape and a gradient of every input's shape."""
    leaves = [t.detach().requires_grad_(True) for t in inputs]
    out = op(*leaves)
    assert out.shape == out_shape
    got = torch.autograd.grad(out.sum(), leaves)
    assert [g.shape for g in got] == [t.shape for t in leaves]


def bad_inputs(bad):
    """Parametrizes a test over (change, name) pairs: a change to the arguments, and the name of the
    argument the error must start with; a case's id is that name and its position."""
    return pytest.mark.parametrize("change,name", bad, ids=[n + str(i) for i, (_, n) in enumerate(bad)])


def raises_named(name):
    """The error a bad argument must raise: its message starts with the argument's name."""
    return pytest.raises((ValueError, RuntimeError, TypeError), match=rf"^{name}:")


# Bad arguments of an op over q, k, v [B, H, W, heads, d] and two decays [B, H, W, heads] (la, lb):
# each is computed from q.
BAD_DECAY_ARGS = [
    (dict(la=lambda q: torch.randn(q.shape[:3])), "log_alpha"),
    (dict(lb=lambda q: torch.randn(*q.shape[:3], q.shape[3] + 1)), "log_beta"),
    (dict(la=lambda q: torch.zeros(q.shape[:4], dtype=torch.int32)), "log_alpha"),
    (dict(lb=lambda q: torch.empty(q.shape[:4], device="meta")), "log_beta"),
    (dict(q=lambda q: q.to(torch.int32)), "q"),
    (dict(k=lambda q: q[:, :, :-1]), "k"),
    (dict(v=lambda q: q.to(torch.float16)), "v"),
    (dict(q=lambda q: q[0]), "q"),
]


def check_bad_decay_args(op, q, k, v, log_alpha, log_beta, change, name):
    args = dict(q=q, k=k, v=v, la=log_alpha, lb=log_beta)
    for key, val in change.items():
        args[key] = val(q)
    with raises_named(name):
        op(args["q"], args["k"], args["v"], args["la"], args["lb"])


def check_compiles_without_recompiles(module, token_shape):
    """torch.compile(module, fullgraph=True) on inputs [batch, *token_shape] of two batch sizes (the
    first marked dynamic) compiles once, and output and input gradient match eager's."""
    torch._dynamo.reset()
    compiled = torch.compile(module, fullgraph=True)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for batch in (2, 3):
            x = torch.randn(batch, *token_shape, requires_grad=True)
            if batch == 2:
                torch._dynamo.mark_dynamic(x, 0)
            out = compiled(x)
            out.square().sum().backward()
            x_eager = x.detach().clone().requires_grad_(True)
            expect = module(x_eager)
            expect.square().sum().backward()
            close_to(out, expect, 1e-5)
            close_to(x.grad, x_eager.grad, 1e-4, "grad x")
    torch._dynamo.reset()


def saves_only_when_grad_is_wanted(public, lean_fwd, args, trained):
    """public(*args) takes the lean path (save_for_backward=False) exactly when no gradient is wanted,
    with the same output either way; a gradient through lean_fwd(*args)'s output is refused with an
    error naming save_for_backward. args[trained] is made a leaf that requires grad."""
    with torch.no_grad():
        lean = public(*args)
    leaf = args[trained].requires_grad_(True)
    out = public(*args)
    assert torch.equal(out.detach(), lean)
    out.sum().backward()
    assert leaf.grad is not None and torch.isfinite(leaf.grad).all()
    out = lean_fwd(*args)[0]
    with pytest.raises(RuntimeError, match="save_for_backward=False"):
        out.sum().backward()


def same_values(got, expect, tol, what="output"):
    """NaN and +-inf exactly where expect has them (the non-finite semantics every backend shares),
    the finite values within tol."""
    got, expect = got.double(), expect.double()
    assert got.shape == expect.shape, f"{what}: shape {tuple(got.shape)} != {tuple(expect.shape)}"
    assert torch.equal(got.isnan(), expect.isnan()), (
        f"{what}: {int(got.isnan().sum())} NaN, the reference {int(expect.isnan().sum())}")
    assert torch.equal(got.isinf(), expect.isinf()) and torch.equal(got[got.isinf()], expect[expect.isinf()]), (
        f"{what}: infinities differ from the reference")
    fin = torch.isfinite(expect)
    close_to(got[fin], expect[fin], tol, what)


def check_nonfinite(run_on, op, reference, leaves, names, backend="triton", grad_tol=1e-4):
    """op(*leaves) on backend in fp32 against reference(*leaves in float64), output and every leaf's
    gradient for one random output gradient, NaN for NaN (same_values)."""
    ours = [t.detach().float().requires_grad_() for t in leaves]
    theirs = [t.detach().double().requires_grad_() for t in ours]
    expect = reference(*theirs)
    grad_out = torch.randn_like(expect)
    expect_grads = torch.autograd.grad(expect, theirs, grad_out)

    def run():
        out = op(*ours)
        return out, torch.autograd.grad(out, ours, grad_out.float())

    out, got = run_on(backend, run)
    same_values(out, expect, TOL[torch.float32])
    for name, g, e in zip(names, got, expect_grads):
        same_values(g, e, grad_tol, f"d{name}")
