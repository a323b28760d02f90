"""qlty_gpu: GPU-native unstitch/stitch of large 2D/3D tensors; a drop-in for qlty 1.5.0.

Switch from qlty by changing the import::

    from qlty_gpu import NCYXQuilt
"""

__version__ = "0.1.0"

from .backends_2_5D import (
    DataSource3DBackend,
    HDF5Backend,
    InMemoryBackend,
    MemoryMappedBackend,
    TensorLike3D,
    ZarrBackend,
    from_hdf5,
    from_memmap,
    from_zarr,
)
from .cleanup import (
    weed_sparse_classification_training_pairs_2D,
    weed_sparse_classification_training_pairs_3D,
)
from .errors import QltyError
from .geometry import QuiltPlan
from .infer import infer
from .large import LargeNCYXQuilt, LargeNCZYXQuilt
from .qlty2_5D import NCZYX25DQuilt, ZOperation
from .quilt import NCYXQuilt, NCZYXQuilt

# Image-stack conversion pulls in zarr and image readers: imported on first use.
_LAZY = {
    "stack_files_to_zarr": "qlty_gpu.utils.stack_to_zarr",
    "stack_files_to_ome_zarr": "qlty_gpu.utils.stack_to_zarr",
    "stack_files_to_ome_zarr_laplacian": "qlty_gpu.utils.stack_to_zarr",
    "reconstruct_from_laplacian_pyramid": "qlty_gpu.utils.stack_to_zarr",
    # training-data utilities (zarr / umap imported where used)
    "extract_patch_pairs": "qlty_gpu.patch_pairs_2d",
    "extract_overlapping_pixels": "qlty_gpu.patch_pairs_2d",
    "extract_patch_pairs_metadata": "qlty_gpu.patch_pairs_2d",
    "stratified_sample_by_histogram": "qlty_gpu.patch_pairs_2d",
    "stratified_sample_by_quantiles": "qlty_gpu.patch_pairs_2d",
    "extract_patches_from_metadata": "qlty_gpu.patch_pairs_2d",
    "extract_patches_to_zarr": "qlty_gpu.patch_pairs_2d",
    "ZarrPatchPairDataset": "qlty_gpu.patch_pairs_2d",
    "extract_patch_pairs_3d": "qlty_gpu.patch_pairs_3d",
    "extract_overlapping_pixels_3d": "qlty_gpu.patch_pairs_3d",
    "tokenize_patch": "qlty_gpu.pretokenizer_2d.sequences",
    "build_sequence_pair": "qlty_gpu.pretokenizer_2d.sequences",
    "FalseColorGenerator": "qlty_gpu.utils.false_color_2D",
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
    "build_sequence_pair",
    "extract_overlapping_pixels",
    "extract_overlapping_pixels_3d",
    "extract_patch_pairs",
    "extract_patch_pairs_3d",
    "extract_patch_pairs_metadata",
    "extract_patches_from_metadata",
    "extract_patches_to_zarr",
    "stratified_sample_by_histogram",
    "stratified_sample_by_quantiles",
    "tokenize_patch",
    "FalseColorGenerator",
    "ZarrPatchPairDataset",
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
    "NCZYX25DQuilt",
    "ZOperation",
    "DataSource3DBackend",
    "HDF5Backend",
    "InMemoryBackend",
    "MemoryMappedBackend",
    "TensorLike3D",
    "ZarrBackend",
    "from_hdf5",
    "from_memmap",
    "from_zarr",
]
