"""Checks the spectral family's tests share."""
import pytest


def assert_rejects(op, python_check, name, args):
    """The C++ kernel (through the dispatcher) and the Python check both refuse ``args`` with a
    ValueError whose message starts with the offending argument's name."""
    with pytest.raises(ValueError, match=f"^{name}:"):
        op(*args)
    with pytest.raises(ValueError, match=f"^{name}:"):
        python_check(*args)


def skip_unless_supported(op, backend, dtype, size=None):
    """Skip a (backend, dtype) pair the backend does not declare, and grids above 10 x 10 for Triton
    on the CPU, where the interpreter runs it (small shapes there; every shape on a GPU)."""
    import torch
    from vitkernels import dispatch
    if backend == "triton" and size is not None and size[0] * size[1] > 100 and not torch.cuda.is_available():
        pytest.skip("Triton under the interpreter: small grids only")
    for impl in dispatch.impls(op):
        if impl.backend == backend and dtype not in impl.dtypes:
            pytest.skip(f"{op}'s {backend} backend does not take {dtype}")


def interpreted(backend, device) -> bool:
    """Triton kernels run by the interpreter on the CPU, where every case costs seconds."""
    return backend == "triton" and device == "cpu"


def same_nonfinite(got, want):
    """Every output of ``got`` has NaN and infinities exactly where ``want``'s has them."""
    import torch
    got = got if isinstance(got, (tuple, list)) else (got,)
    want = want if isinstance(want, (tuple, list)) else (want,)
    for g, w in zip(got, want, strict=True):
        g = g.cpu()
        assert torch.equal(torch.isnan(g), torch.isnan(w)), f"NaN at {int(torch.isnan(g).sum())} outputs, " \
            f"expected {int(torch.isnan(w).sum())}"
        assert torch.equal(torch.isinf(g), torch.isinf(w)), "infinities differ"
