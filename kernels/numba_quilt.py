"""Old module name of :mod:`qlty_gpu.kernels.quilt_numba` (kept importable)."""

from .quilt_numba import *  # noqa: F401,F403
from .quilt_numba import SERIAL, __all__  # noqa: F401
