"""Shared test harness: backends to parametrize over, poisoned allocations, tolerances.

Triton kernels run on CPU tensors under the interpreter, which must be switched on before triton is
imported anywhere, hence here.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import contextlib  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

import vitkernels  # noqa: E402
from vitkernels import dispatch as vb  # noqa: E402

if os.environ["TRITON_INTERPRET"] == "1":
    import triton_bounds  # noqa: E402

    triton_bounds.install()

HAS_CUDA = torch.cuda.is_available()
DEVICES = ["cpu"] + (["cuda"] if HAS_CUDA else [])


def runnable_backends(op, device):
    """(backend, device) pairs of ``op`` that can run here; the others are listed as skips with reasons."""
    params = []
    for impl in vb.impls(op):
        reasons = vb.why_not(impl, device)
        marks = [pytest.mark.skip(reason="; ".join(reasons))] if reasons else []
        if device == "cuda":
            marks.append(pytest.mark.cuda)
        params.append(pytest.param(impl.backend, device, id=f"{impl.backend}-{device}", marks=marks))
    return params


def backend_params(op):
    return [p for dev in ["cpu", "cuda"] for p in runnable_backends(op, dev)]


@contextlib.contextmanager
def poisoned():
    """Every torch.empty inside the block is filled with NaN (floats) or the max value (ints), so a
    kernel that leaves part of its output unwritten fails the comparison instead of passing on luck."""
    prev_det = torch.are_deterministic_algorithms_enabled()
    prev_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    prev_fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(prev_det, warn_only=prev_warn)
        torch.utils.deterministic.fill_uninitialized_memory = prev_fill


@pytest.fixture
def run_on():
    """run_on(backend, fn, *args): fn(*args) with ``backend`` forced and allocations poisoned."""
    def call(backend, fn, *args, **kwargs):
        with vitkernels.use_backend(backend), poisoned():
            return fn(*args, **kwargs)
    return call


def pytest_addoption(parser):
    parser.addoption("--fuzz-long", action="store_true", default=False,
                     help="fuzz every op with many more examples (tests/fuzz)")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
