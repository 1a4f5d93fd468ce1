"""Plain eager PyTorch references: the ground truth every backend is tested against."""
from . import codebook  # noqa: F401
