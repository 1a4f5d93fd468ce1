"""Every load and store a Triton kernel makes under the interpreter, checked against the memory of the
tensors it was launched with.

On a GPU an out-of-bounds access faults or is caught by compute-sanitizer; the interpreter instead
reads and writes the addresses as given, so a wrong mask corrupts the test process's heap and the crash
surfaces tests later, in unrelated code. With this check on (tests/conftest.py installs it whenever the
interpreter runs), the access that leaves its tensors fails the launch that made it, naming the kernel.
"""
import numpy as np

class OutOfBounds(AssertionError):
    """Not one of the error kinds an op may raise for bad input, so no comparison can mistake it for one."""


_LAUNCHES = []  # per active launch: (kernel name, [[start, end)] byte ranges of its tensors' storages)


def _storages(arg, out):
    if hasattr(arg, "untyped_storage"):
        s = arg.untyped_storage()
        if s.nbytes():
            out.append((s.data_ptr(), s.data_ptr() + s.nbytes()))
    elif isinstance(arg, (tuple, list)):
        for a in arg:
            _storages(a, out)
    elif hasattr(arg, "base") and hasattr(arg, "block_shape"):  # a TensorDescriptor
        _storages(arg.base, out)


def _check(what, ptrs, mask, itemsize):
    if not _LAUNCHES:
        return
    name, ranges = _LAUNCHES[-1]
    ptrs, mask = np.broadcast_arrays(ptrs, mask)
    p = ptrs if mask.all() else ptrs[mask]
    if p.size == 0:
        return
    lo, hi = int(p.min()), int(p.max()) + itemsize
    if any(start <= lo and hi <= end for start, end in ranges):  # the usual case: one tensor holds them all
        return
    p = p.astype(np.uint64, copy=False)
    inside = np.zeros(p.shape, dtype=bool)
    for start, end in ranges:
        inside |= (p >= start) & (p + itemsize <= end)
    if not inside.all():
        bad = int(p[~inside][0])
        raise OutOfBounds(f"{name}: {what} of {int((~inside).sum())} element(s) outside every tensor argument "
                         f"(first at address {bad:#x}; arguments span "
                         + ", ".join(f"[{a:#x}, {b:#x})" for a, b in ranges) + ")")


def install():
    """Wraps the interpreter's launch, masked load and masked store (idempotent; nothing without triton)."""
    try:
        from triton.runtime import interpreter as ti
    except ImportError:
        return

    if getattr(ti.GridExecutor, "_vitk_bounds", False):
        return
    launch = ti.GridExecutor.__call__
    load = ti.InterpreterBuilder.create_masked_load
    store = ti.InterpreterBuilder.create_masked_store

    def checked_launch(self, *args, **kwargs):
        ranges = []
        for a in list(args) + list(kwargs.values()):
            _storages(a, ranges)
        _LAUNCHES.append((getattr(self.fn, "__name__", "kernel"), ranges))
        try:
            return launch(self, *args, **kwargs)
        finally:
            _LAUNCHES.pop()

    def checked_load(self, ptrs, mask, other, cache_policy, is_volatile):
        _check("a load", ptrs.data, mask.data, np.dtype(ti._get_np_dtype(ptrs.get_element_ty())).itemsize)
        return load(self, ptrs, mask, other, cache_policy, is_volatile)

    def checked_store(self, ptrs, value, mask, cache_policy):
        _check("a store", ptrs.data, mask.data, np.dtype(ti._get_np_dtype(ptrs.get_element_ty())).itemsize)
        return store(self, ptrs, value, mask, cache_policy)

    ti.GridExecutor.__call__ = checked_launch
    ti.InterpreterBuilder.create_masked_load = checked_load
    ti.InterpreterBuilder.create_masked_store = checked_store
    ti.GridExecutor._vitk_bounds = True
