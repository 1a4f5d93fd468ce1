"""The one way to give a torch.ops.vitk op its Python side: one ``define(...)`` call per op.

An op's schema lives in csrc/vitk.cpp and its C++ kernels register themselves with the dispatcher
(VITK_IMPL in csrc/cpu/<family>, csrc/cuda/<family>.cpp), so the default CPU and CUDA paths need no
Python. ``define`` adds, from plain data:

  check      the argument check (raises ValueError / TypeError / IndexError naming the argument);
             it runs before the fake kernel and before every Python-routed call
  fake       the output's shapes, dtypes and strides for torch.compile / torch.export (after check)
  backends   the implementations in order of preference, each with its devices, dtypes and limits:
             ``cpp("cpu")`` / ``cpp("cuda")`` for the registered C++ kernels, ``triton(module)`` for a
             function of vitkernels.triton.<module> with the op's own signature
  autograd   optionally (backward, setup_context), as torch.library.register_autograd takes them

and wires the router: a Python kernel that runs ``check``, asks vitkernels.dispatch.choose for a
backend and calls it. It is registered as the kernel of ``vitk_route::<op>`` (the twin the C++ kernels
hand a call to when another backend is forced or the call is outside their limits) and as the op's
own kernel on every device that has no built C++ kernel (Triton on a GPU, for the attention ops).
"""
import importlib
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence, Tuple

import torch

from .. import dispatch
from ..dispatch import FLOAT_DTYPES, Impl, Limit

__all__ = ["Backend", "Limit", "cpp", "triton", "define"]

# Holds the vitk_route::* twins; one library object for the process (a second would be an error).
_ROUTE_LIB = torch.library.Library("vitk_route", "DEF")


@dataclass(frozen=True)
class Backend:
    name: str                                   # "cpu" | "cuda" | "triton"
    devices: Tuple[str, ...]
    dtypes: frozenset
    kernel: Optional[Callable] = None           # None: the registered C++ kernel
    limits: Tuple[Limit, ...] = field(default=())


def cpp(backend: str = "cpu", *, dtypes=FLOAT_DTYPES, limits: Sequence[Limit] = ()) -> Backend:
    """The C++ kernel registered for ``backend``'s device ('cpu' or 'cuda'), with its limits as data.
    The kernel enforces the same limits itself (a test holds the two to each other)."""
    return Backend(backend, (backend,), frozenset(dtypes), None, tuple(limits))


def triton(module: str, function: Optional[str] = None, *, dtypes=FLOAT_DTYPES, limits: Sequence[Limit] = (),
           guard: Optional[Callable] = None) -> Backend:
    """``vitkernels.triton.<module>.<function>`` (default: the op's name), imported on first use; it
    runs on GPUs, and on CPU tensors under TRITON_INTERPRET=1. ``guard(*args)`` runs first: a check
    that needs the data (e.g. an index range), which the C++ kernels do while they work but a GPU
    kernel cannot report."""
    return Backend("triton", ("cuda", "cpu"), frozenset(dtypes), _Lazy(module, function, guard), tuple(limits))


class _Lazy:
    """A Triton launcher imported on its first call (importing triton costs ~1 s)."""

    def __init__(self, module: str, function: Optional[str], guard: Optional[Callable]):
        self.module, self.function, self.guard, self.fn = module, function, guard, None

    def bind(self, op: str) -> "_Lazy":
        return _Lazy(self.module, self.function or op, self.guard)

    def __call__(self, *args, **kwargs):
        if self.guard is not None:
            self.guard(*args, **kwargs)
        if self.fn is None:
            self.fn = getattr(importlib.import_module(f"vitkernels.triton.{self.module}"), self.function)
        return self.fn(*args, **kwargs)


def positional(schema, args, kwargs) -> tuple:
    """Every argument of a call in schema order, keyword-only ones and defaults included: the one calling
    convention of checks, fakes and Python kernels (the dispatcher omits defaulted keyword arguments)."""
    out = list(args)
    for info in schema.arguments[len(args):]:
        out.append(kwargs[info.name] if info.name in kwargs else info.default_value)
    return tuple(out)


def define(name: str, *, check: Callable, fake: Callable, backends: Sequence[Backend],
           autograd: Optional[Tuple[Callable, Callable]] = None, device_arg: int = 0) -> None:
    """Declare op ``vitk::<name>`` (schema in csrc/vitk.cpp); see the module docstring. ``check``, ``fake``
    and the Python kernels are called with every argument positionally, in schema order. ``device_arg``
    is the position of the tensor whose device and dtype choose the backend."""
    qualname = f"vitk::{name}"
    for b in backends:
        kernel = b.kernel.bind(name) if isinstance(b.kernel, _Lazy) else b.kernel
        dispatch.register(Impl(name, b.name, kernel, b.devices, b.dtypes, b.limits))

    schema = getattr(torch.ops.vitk, name).default._schema

    def fake_kernel(*args, **kwargs):
        args = positional(schema, args, kwargs)
        check(*args)
        return fake(*args)

    def route(*args, **kwargs):
        args = positional(schema, args, kwargs)
        check(*args)
        t = args[device_arg]
        impl = dispatch.choose(name, t.device.type, t.dtype, args)
        if impl.native:
            # choose() returns a C++ backend only where its kernel would have run without routing.
            raise RuntimeError(f"{qualname}: internal error: the router chose the registered {impl.backend} "
                               "kernel, which should have run without it")
        return impl.kernel(*args)

    torch.library.register_fake(qualname, fake_kernel)
    _ROUTE_LIB.define(str(schema).split("::", 1)[1])
    _ROUTE_LIB.impl(name, route, "CompositeExplicitAutograd")
    unserved = [dev for dev in ("cpu", "cuda")
                if not any(b.kernel is None and dev in b.devices and dispatch.native_built(b.name) for b in backends)]
    if unserved:
        torch.library.register_kernel(qualname, tuple(unserved), route)
    if autograd is not None:
        backward, setup_context = autograd
        torch.library.register_autograd(qualname, backward, setup_context=setup_context)
