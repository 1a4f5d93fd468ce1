"""Plain eager PyTorch references: the ground truth every backend is tested against."""
from . import codebook, window_attention  # noqa: F401
