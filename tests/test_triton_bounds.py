"""The interpreter's bounds check (tests/triton_bounds.py) catches what it is there to catch."""
import pytest
import torch

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402


@triton.jit
def _copy(src, dst, n, extra, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    x = tl.load(src + offs, mask=offs < n + extra, other=0.0)
    tl.store(dst + offs, x, mask=offs < n)


@triton.jit
def _copy_store_past(src, dst, n, extra, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    x = tl.load(src + offs, mask=offs < n, other=0.0)
    tl.store(dst + offs, x, mask=offs < n + extra)


pytestmark = pytest.mark.skipif(not hasattr(triton.runtime.interpreter.GridExecutor, "_vitk_bounds"),
                                reason="the check is installed only under TRITON_INTERPRET=1")


def test_in_bounds_masked_access_passes():
    src, dst = torch.randn(10), torch.full((10,), float("nan"))
    _copy[(1,)](src, dst, 10, 0, BLOCK=16)
    assert torch.equal(dst, src)


@pytest.mark.parametrize("kernel,what", [(_copy, "a load"), (_copy_store_past, "a store")])
def test_access_one_past_the_end_fails_the_launch(kernel, what):
    # Separate storages: one element past either tensor is outside both of them.
    src, dst = torch.randn(10), torch.empty(10)
    with pytest.raises(Exception, match=f"{kernel.fn.__name__}: {what} of 1 element"):
        kernel[(1,)](src, dst, 10, 1, BLOCK=16)
