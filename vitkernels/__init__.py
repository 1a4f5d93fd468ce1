"""vitkernels: fused kernels for efficient vision transformers, as torch.ops.vitk.* custom ops.

    import vitkernels
    idx, dist = torch.ops.vitk.codebook_argmin(z, codebook)     # or vitkernels.codebook_argmin
    vitkernels.backends()                                        # what can run here, and why not
    with vitkernels.use_backend("triton"): ...                   # force a backend (or VITK_BACKEND=...)
"""
from ._lib import load as _load

_C, BUILD_INFO = _load()

from . import dispatch as _dispatch  # noqa: E402

_dispatch._set_library(_C, BUILD_INFO)

from . import ops, reference  # noqa: E402,F401
from .dispatch import use_backend  # noqa: E402
from .ops.codebook import codebook_argmin, codebook_lookup  # noqa: E402
from .ops.window_attention import varlen_attention, window_attention  # noqa: E402
from .ops.masked_attention import (axial_decay_attention, gaussian_mask_attention, manhattan_attention,  # noqa: E402
                                  polyline_attention, reduced_attention)
from .convert import convert_  # noqa: E402


def backends(device=None) -> "_dispatch.BackendReport":
    """Per op and backend, why it cannot run on ``device`` (empty list: it can), with each backend's
    limits; its repr is a table (so a REPL shows it readably), and it indexes like a dict."""
    return _dispatch.backends(device)


__version__ = "0.1.0"
__all__ = ["backends", "use_backend", "convert_", "codebook_argmin", "codebook_lookup", "window_attention",
           "varlen_attention", "polyline_attention", "manhattan_attention", "axial_decay_attention",
           "gaussian_mask_attention", "reduced_attention", "BUILD_INFO"]
