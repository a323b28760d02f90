"""Utilities: image stacks to Zarr / OME-Zarr (``qlty.utils`` compatible).

Example:
    >>> from qlty_gpu.utils import stack_files_to_zarr, stack_files_to_ome_zarr
"""

from .stack_to_zarr import (
    reconstruct_from_laplacian_pyramid,
    stack_files_to_ome_zarr,
    stack_files_to_ome_zarr_laplacian,
    stack_files_to_zarr,
)

__all__ = [
    "stack_files_to_ome_zarr",
    "stack_files_to_zarr",
    "stack_files_to_ome_zarr_laplacian",
    "reconstruct_from_laplacian_pyramid",
]
