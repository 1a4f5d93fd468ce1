"""Helpers shared by the attention families' tests: inputs laid out as the models produce them, and
comparisons against the float64 references with per-dtype tolerances."""
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


def close(out, expect, dtype, what="output"):
    tol = TOL[dtype]
    err = (out.double() - expect.double()).abs().max().item() if out.numel() else 0.0
    scale = max(1.0, expect.double().abs().max().item()) if expect.numel() else 1.0
    assert err <= tol * scale, f"{what}: max error {err:.3g} > {tol * scale:.3g}"


def grads(fn, inputs, grad_out):
    """Gradients of fn(*inputs) against grad_out, with the inputs as fresh leaves."""
    leaves = [t.detach().requires_grad_(True) for t in inputs]
    out = fn(*leaves)
    return torch.autograd.grad(out, leaves, grad_out)


def saves_only_when_grad_is_wanted(public, lean_fwd, args, trained):
    """public(*args) takes the lean path (save_for_backward=False) exactly when no gradient is wanted,
    with the same output either way; a gradient through lean_fwd(*args)'s output is refused with an
    error naming save_for_backward. args[trained] is made a leaf that requires grad."""
    import pytest
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
