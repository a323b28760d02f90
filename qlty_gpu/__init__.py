"""qlty_gpu: GPU-native unstitch/stitch of large 2D/3D tensors; a drop-in for qlty 1.5.0."""

__version__ = "0.1.0"

from .errors import QltyError
from .geometry import QuiltPlan
