"""Python APIs of the op families; importing a family binds its torch.ops.vitk.* kernels."""
from . import codebook, lowbit, masked_attention, quant_attention, shiftadd, spectral, window_attention  # noqa: F401
