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
from .ops.lowbit import (dynamic_int8_linear, int4_int8_linear, int4_linear, int8_linear,  # noqa: E402
                         quantize_per_token, shift_linear)
from .ops.quant_attention import quant_attention  # noqa: E402
from .ops.spectral import dtcwt2d, fftconv2d, global_filter, idtcwt2d, svt_spectral_mix  # noqa: E402
from .ops.shiftadd import binary_linear_attention, expert_combine, expert_dispatch  # noqa: E402
from .convert import convert_  # noqa: E402


def backends(device=None) -> "_dispatch.BackendReport":
    """Per op and backend, why it cannot run on ``device`` (empty list: it can), with each backend's
    limits; its repr is a table (so a REPL shows it readably), and it indexes like a dict."""
    return _dispatch.backends(device)


__version__ = "0.1.0"
__all__ = ["backends", "use_backend", "convert_", "codebook_argmin", "codebook_lookup", "window_attention",
           "varlen_attention", "polyline_attention", "manhattan_attention", "axial_decay_attention",
           "gaussian_mask_attention", "reduced_attention", "quantize_per_token", "int8_linear",
           "dynamic_int8_linear", "int4_linear", "int4_int8_linear", "shift_linear", "quant_attention", "dtcwt2d",
           "idtcwt2d", "svt_spectral_mix", "global_filter", "fftconv2d", "binary_linear_attention", "expert_dispatch",
           "expert_combine", "BUILD_INFO"]
