"""Plain eager PyTorch references: the ground truth every backend is tested against."""
from . import codebook, lowbit, masked_attention, quant_attention, shiftadd, spectral, window_attention  # noqa: F401
