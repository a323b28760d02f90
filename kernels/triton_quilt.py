"""Old module name of :mod:`qlty_gpu.kernels.quilt_triton` (kept importable)."""

from .quilt_triton import *  # noqa: F401,F403
from .quilt_triton import __all__  # noqa: F401
