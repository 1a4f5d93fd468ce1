"""What every family's launchers do around a Triton launch: pick the device, and wrap the kernel.

The launchers run inside the implementations of opaque custom ops (torch.ops.vitk.*, whose fake
kernels live in vitkernels/ops). torch.compile sees only the op and its fake kernel; it never
traces into a launcher or a kernel.
"""
import contextlib
import functools

import torch


@functools.lru_cache(maxsize=None)
def launcher(kernel):
    """kernel behind torch.library.wrap_triton, which outside of tracing launches it as it is.

    Nothing traces these launches today (see the module docstring); the wrapper costs one check per
    launch and would let a launcher move into a torch.library.triton_op unchanged. Under
    TRITON_INTERPRET=1 @triton.jit yields an InterpretedFunction, which torch >= 2.12's wrap_triton
    hands back as is and older versions reject; then the kernel is launched directly.
    """
    try:
        return torch.library.wrap_triton(kernel)
    except RuntimeError:
        return kernel


def device_ctx(t: torch.Tensor):
    # Triton launches on the current device; make it the tensors' device.
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def is_interpreted(kernel) -> bool:
    """True when TRITON_INTERPRET=1 was set before triton was imported (kernels run on the CPU)."""
    return type(kernel).__name__ == "InterpretedFunction"
