"""qlty_gpu: GPU-native unstitch/stitch of large 2D/3D tensors; a drop-in for qlty 1.5.0.

Switch from qlty by changing the import::

    from qlty_gpu import NCYXQuilt
"""

__version__ = "0.1.0"

from .cleanup import (
    weed_sparse_classification_training_pairs_2D,
    weed_sparse_classification_training_pairs_3D,
)
from .errors import QltyError
from .geometry import QuiltPlan
from .quilt import NCYXQuilt, NCZYXQuilt

__all__ = [
    "NCYXQuilt",
    "NCZYXQuilt",
    "QltyError",
    "QuiltPlan",
    "weed_sparse_classification_training_pairs_2D",
    "weed_sparse_classification_training_pairs_3D",
]
