"""Which backend runs each op, and why the others cannot.

Each op's backends declare what they can run as data (device types, dtypes) plus a check of what
this installation has (compiled CUDA library, importable Triton, interpreter mode). The router bound
to the op's dispatch keys asks :func:`choose` for an implementation on every call, so a forced
backend (``VITK_BACKEND=cpu|cuda|triton`` or :func:`use_backend`) takes effect immediately, and one
that cannot run raises with its reasons instead of silently falling back.
"""
import contextlib
import contextvars
import importlib.util
import os
from dataclasses import dataclass
from typing import Callable, Dict, FrozenSet, List, Optional, Tuple

import torch

BACKENDS = ("cpu", "cuda", "triton")

FLOAT_DTYPES = frozenset({torch.float32, torch.float16, torch.bfloat16})
ALL_FLOAT_DTYPES = FLOAT_DTYPES | {torch.float64}

_forced: contextvars.ContextVar[Optional[str]] = contextvars.ContextVar("vitk_backend", default=None)


@dataclass(frozen=True)
class Impl:
    op: str
    backend: str
    fn: Callable
    devices: Tuple[str, ...]
    dtypes: FrozenSet[torch.dtype]


_IMPLS: Dict[str, List[Impl]] = {}
_BUILD_INFO: dict = {}


def _set_build_info(info):
    _BUILD_INFO.clear()
    _BUILD_INFO.update(info)


def register(op: str, backend: str, fn: Callable, *, devices, dtypes) -> None:
    """Declare that ``backend`` implements ``op`` for these devices and dtypes. Registration order is
    the order of preference when nothing is forced."""
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
    _IMPLS.setdefault(op, []).append(Impl(op, backend, fn, tuple(devices), frozenset(dtypes)))


def _triton_reasons(device_type: str) -> List[str]:
    if importlib.util.find_spec("triton") is None:
        return ["triton is not installed (pip install 'vitkernels[triton]')"]
    if device_type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        return ["Triton runs on CPU tensors only under the interpreter (TRITON_INTERPRET=1, slow: for tests)"]
    return []


def _install_reasons(backend: str, device_type: str) -> List[str]:
    if device_type == "cuda" and not torch.cuda.is_available():
        return ["no CUDA device is available"]
    if backend == "cuda":
        if not _BUILD_INFO.get("cuda"):
            why = _BUILD_INFO.get("why_no_cuda") or "unknown reason"
            return [f"the CUDA kernels were not compiled ({why})"]
    if backend == "triton":
        return _triton_reasons(device_type)
    return []


def why_not(impl: Impl, device_type: str, dtype: Optional[torch.dtype] = None) -> List[str]:
    """Every reason ``impl`` cannot run on this device and dtype; empty when it can."""
    reasons = []
    if device_type not in impl.devices:
        reasons.append(f"does not run on {device_type} tensors (runs on: {', '.join(impl.devices)})")
    if dtype is not None and dtype not in impl.dtypes:
        names = ", ".join(sorted(str(d).replace("torch.", "") for d in impl.dtypes))
        reasons.append(f"does not support {str(dtype).replace('torch.', '')} (supports: {names})")
    reasons += _install_reasons(impl.backend, device_type)
    return reasons


def forced_backend() -> Optional[str]:
    name = _forced.get()
    source = "use_backend"
    if name is None:
        name = os.environ.get("VITK_BACKEND") or None
        source = "VITK_BACKEND"
    if name is not None and name not in BACKENDS:
        raise ValueError(f"{source}: expected one of {', '.join(BACKENDS)}, got {name!r}")
    return name


def choose(op: str, device_type: str, dtype: Optional[torch.dtype] = None) -> Impl:
    """The implementation of ``op`` to run: the forced backend if one is set, else the first that can run."""
    impls = _IMPLS.get(op, [])
    forced = forced_backend()
    if forced is not None:
        for impl in impls:
            if impl.backend == forced:
                reasons = why_not(impl, device_type, dtype)
                if reasons:
                    raise RuntimeError(
                        f"vitk::{op}: backend {forced!r} was forced but cannot run here: " + "; ".join(reasons))
                return impl
        have = ", ".join(i.backend for i in impls) or "none"
        raise RuntimeError(f"vitk::{op}: backend {forced!r} was forced but {op} has no such backend (has: {have})")
    rejected = []
    for impl in impls:
        reasons = why_not(impl, device_type, dtype)
        if not reasons:
            return impl
        rejected.append(f"{impl.backend}: " + "; ".join(reasons))
    raise RuntimeError(f"vitk::{op}: no backend can run on {device_type}"
                       + (f" with {dtype}" if dtype is not None else "") + ". " + " | ".join(rejected))


@contextlib.contextmanager
def use_backend(name: Optional[str]):
    """Force ``name`` ('cpu', 'cuda' or 'triton') for every vitk op inside the block (None: automatic)."""
    if name is not None and name not in BACKENDS:
        raise ValueError(f"name: expected one of {', '.join(BACKENDS)} or None, got {name!r}")
    token = _forced.set(name)
    try:
        yield
    finally:
        _forced.reset(token)


def backends(device=None, *, print_table: bool = True) -> Dict[str, Dict[str, List[str]]]:
    """Per op and backend, the reasons it cannot run on ``device`` (default: cuda if available, else cpu);
    an empty list means it can. Prints a table unless ``print_table=False``."""
    device_type = torch.device(device).type if device is not None else ("cuda" if torch.cuda.is_available() else "cpu")
    report = {op: {impl.backend: why_not(impl, device_type) for impl in impls} for op, impls in sorted(_IMPLS.items())}
    if print_table:
        forced = forced_backend()
        print(f"vitkernels backends for {device_type} tensors"
              + (f" (forced: {forced})" if forced else "") + f"; build: {_BUILD_INFO}")
        width = max(len(op) for op in report) if report else 10
        for op, per in report.items():
            for backend, reasons in per.items():
                state = "ok" if not reasons else "no: " + "; ".join(reasons)
                print(f"  {op:<{width}}  {backend:<7} {state}")
    return report
