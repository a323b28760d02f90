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
from .infer import infer
from .large import LargeNCYXQuilt, LargeNCZYXQuilt
from .quilt import NCYXQuilt, NCZYXQuilt

# Image-stack conversion pulls in zarr and image readers: imported on first use.
_LAZY = {
    "stack_files_to_zarr": "qlty_gpu.utils.stack_to_zarr",
    "stack_files_to_ome_zarr": "qlty_gpu.utils.stack_to_zarr",
    "stack_files_to_ome_zarr_laplacian": "qlty_gpu.utils.stack_to_zarr",
    "reconstruct_from_laplacian_pyramid": "qlty_gpu.utils.stack_to_zarr",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'qlty_gpu' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_LAZY))


__all__ = [
    "LargeNCYXQuilt",
    "LargeNCZYXQuilt",
    "reconstruct_from_laplacian_pyramid",
    "stack_files_to_ome_zarr",
    "stack_files_to_ome_zarr_laplacian",
    "stack_files_to_zarr",
    "NCYXQuilt",
    "NCZYXQuilt",
    "QltyError",
    "QuiltPlan",
    "infer",
    "weed_sparse_classification_training_pairs_2D",
    "weed_sparse_classification_training_pairs_3D",
]
