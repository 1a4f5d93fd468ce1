"""Which backend runs each op, and why the others cannot.

Each op's backends are declared as data (vitkernels/ops/_define.py): device types, dtypes, limits
(e.g. the CPU kernels' largest window), plus a check of what this installation has (compiled CUDA
library, importable Triton, interpreter mode). The default C++ kernels are registered with the
dispatcher in C++ and run with no Python in between; a forced backend (``VITK_BACKEND=cpu|cuda|triton``
or :func:`use_backend`), a call outside a kernel's limits, or a device with no C++ kernel reaches the
Python router, which asks :func:`choose` for an implementation: the forced one if it can run (else an
error with its reasons), otherwise the first that can. The forced backend lives in the C++ library
(per thread), so the C++ kernels see it on every call.
"""
import contextlib
import importlib.util
import os
from dataclasses import dataclass
from typing import Callable, Dict, FrozenSet, List, Optional, Tuple

import torch

BACKENDS = ("cpu", "cuda", "triton")
_CODES = {None: -1, "cpu": 1, "cuda": 2, "triton": 3}
_NAMES = {0: None, 1: "cpu", 2: "cuda", 3: "triton"}

LIMIT_PREFIX = "exceeds its limit of"

FLOAT_DTYPES = frozenset({torch.float32, torch.float16, torch.bfloat16})
ALL_FLOAT_DTYPES = FLOAT_DTYPES | {torch.float64}


@dataclass(frozen=True)
class Limit:
    """A bound on one quantity of a call that a backend can run: ``measure(*args)`` (the op's arguments in
    schema order) gives the quantity (None when it does not apply to this call), at most ``value``."""
    what: str                      # e.g. "tokens per window"
    value: int
    measure: Callable[..., Optional[int]]

    def reason(self, args) -> Optional[str]:
        got = self.measure(*args)
        if got is None or got <= self.value:
            return None
        return f"{LIMIT_PREFIX} {self.value} {self.what} (got {got})"


@dataclass(frozen=True)
class Impl:
    op: str
    backend: str
    kernel: Optional[Callable]     # None: the C++ kernel registered with the dispatcher for this device
    devices: Tuple[str, ...]
    dtypes: FrozenSet[torch.dtype]
    limits: Tuple[Limit, ...] = ()

    @property
    def native(self) -> bool:
        return self.kernel is None


_IMPLS: Dict[str, List[Impl]] = {}
_BUILD_INFO: dict = {}
_LIB = None


def _set_library(lib, info) -> None:
    global _LIB
    _LIB = lib
    _BUILD_INFO.clear()
    _BUILD_INFO.update(info)


def register(impl: Impl) -> None:
    """Declare a backend of ``impl.op``. Registration order is the order of preference."""
    if impl.backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {impl.backend!r}")
    _IMPLS.setdefault(impl.op, []).append(impl)


def impls(op: str) -> List[Impl]:
    return list(_IMPLS.get(op, []))


def native_built(backend: str) -> bool:
    """Whether this build compiled the C++ kernels of ``backend`` ('cpu' always, 'cuda' when built)."""
    return backend == "cpu" or (backend == "cuda" and bool(_BUILD_INFO.get("cuda")))


def _triton_reasons(device_type: str) -> List[str]:
    if importlib.util.find_spec("triton") is None:
        return ["triton is not installed (pip install 'vitkernels[triton]')"]
    if device_type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        return ["Triton runs on CPU tensors only under the interpreter (TRITON_INTERPRET=1, slow: for tests)"]
    return []


def _install_reasons(impl: Impl, device_type: str) -> List[str]:
    if device_type == "cuda" and not torch.cuda.is_available():
        return ["no CUDA device is available"]
    if impl.native and not native_built(impl.backend):
        why = _BUILD_INFO.get("why_no_cuda") or "unknown reason"
        return [f"the CUDA kernels were not compiled ({why})"]
    if impl.backend == "triton":
        return _triton_reasons(device_type)
    return []


def why_not(impl: Impl, device_type: str, dtype: Optional[torch.dtype] = None, args=None) -> List[str]:
    """Every reason ``impl`` cannot run on this device and dtype (and, given the call's arguments, within
    its limits); empty when it can."""
    reasons = []
    if device_type not in impl.devices:
        reasons.append(f"does not run on {device_type} tensors (runs on: {', '.join(impl.devices)})")
    if dtype is not None and dtype not in impl.dtypes:
        names = ", ".join(sorted(str(d).replace("torch.", "") for d in impl.dtypes))
        reasons.append(f"does not support {str(dtype).replace('torch.', '')} (supports: {names})")
    if args is not None:
        reasons += [r for r in (lim.reason(args) for lim in impl.limits) if r]
    reasons += _install_reasons(impl, device_type)
    return reasons


def forced_backend() -> Optional[str]:
    """The backend forced for this thread (innermost use_backend block, else VITK_BACKEND), or None."""
    return _NAMES[_LIB.forced_backend()]


class BackendError(RuntimeError):
    """No backend can run the call (a forced one cannot, or none can); the message has every reason."""


class LimitError(BackendError, ValueError):
    """The call is outside the limits of every backend that could otherwise run it."""


def _only_limits(reasons: List[str]) -> bool:
    return all(r.startswith(LIMIT_PREFIX) for r in reasons)


def choose(op: str, device_type: str, dtype: Optional[torch.dtype] = None, args=None) -> Impl:
    """The implementation of ``op`` to run: the forced backend if one is set, else the first that can run."""
    candidates = _IMPLS.get(op, [])
    forced = forced_backend()
    if forced is not None:
        for impl in candidates:
            if impl.backend == forced:
                reasons = why_not(impl, device_type, dtype, args)
                if reasons:
                    raise (LimitError if _only_limits(reasons) else BackendError)(
                        f"vitk::{op}: backend {forced!r} was forced but cannot run here: " + "; ".join(reasons))
                return impl
        have = ", ".join(i.backend for i in candidates) or "none"
        raise BackendError(f"vitk::{op}: backend {forced!r} was forced but {op} has no such backend (has: {have})")
    rejected, limited = [], False
    for impl in candidates:
        reasons = why_not(impl, device_type, dtype, args)
        if not reasons:
            return impl
        limited |= _only_limits(reasons)
        rejected.append(f"{impl.backend}: " + "; ".join(reasons))
    raise (LimitError if limited else BackendError)(
        f"vitk::{op}: no backend can run on {device_type}" + (f" with {dtype}" if dtype is not None else "")
        + ". " + " | ".join(rejected))


@contextlib.contextmanager
def use_backend(name: Optional[str]):
    """Force ``name`` ('cpu', 'cuda' or 'triton') for every vitk op this thread calls inside the block
    (None: no override, VITK_BACKEND applies)."""
    if name not in _CODES:
        raise ValueError(f"name: expected one of {', '.join(BACKENDS)} or None, got {name!r}")
    prev = _LIB.set_thread_backend(_CODES[name])
    try:
        yield
    finally:
        _LIB.set_thread_backend(prev)


class BackendReport(dict):
    """{op: {backend: [reasons it cannot run; empty when it can]}} for one device type. Its repr is the
    table, so a REPL shows ``vitkernels.backends()`` readably; ``.limits`` holds each backend's limits."""

    def __init__(self, device_type: str, report: dict, limits: dict, forced: Optional[str]):
        super().__init__(report)
        self.device_type, self.limits, self.forced = device_type, limits, forced

    def __repr__(self) -> str:
        head = f"vitkernels backends for {self.device_type} tensors" + (f" (forced: {self.forced})" if self.forced
                                                                         else "")
        build = (f"build: CPU -march={_BUILD_INFO.get('cpu_arch')}, CUDA "
                 + ("sm " + ", ".join(_BUILD_INFO.get("cuda_archs", ())) if _BUILD_INFO.get("cuda")
                    else f"not built ({_BUILD_INFO.get('why_no_cuda')})"))
        width = max((len(op) for op in self), default=10)
        lines = [head, build]
        for op, per in self.items():
            for backend, reasons in per.items():
                state = "ok" if not reasons else "no: " + "; ".join(reasons)
                lim = self.limits[op][backend]
                if lim and not reasons:
                    state += " (limits: " + ", ".join(lim) + ")"
                lines.append(f"  {op:<{width}}  {backend:<7} {state}")
        return "\n".join(lines)

    def _repr_pretty_(self, printer, cycle):  # IPython's display hook
        printer.text(repr(self))


def backends(device=None) -> BackendReport:
    """Per op and backend, the reasons it cannot run on ``device`` (default: cuda if available, else cpu);
    an empty list means it can. The returned object's repr is a table."""
    device_type = torch.device(device).type if device is not None else ("cuda" if torch.cuda.is_available() else "cpu")
    report, limits = {}, {}
    for op, op_impls in sorted(_IMPLS.items()):
        report[op] = {impl.backend: why_not(impl, device_type) for impl in op_impls}
        limits[op] = {impl.backend: [f"{lim.what} <= {lim.value}" for lim in impl.limits] for impl in op_impls}
    return BackendReport(device_type, report, limits, forced_backend())
