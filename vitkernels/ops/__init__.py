"""Python APIs of the op families; importing a family binds its torch.ops.vitk.* kernels."""
from . import codebook, window_attention  # noqa: F401
