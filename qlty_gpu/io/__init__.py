"""I/O: image files, Zarr / OME-Zarr stores (compute modules take arrays, not paths).

* :mod:`qlty_gpu.io.images` reads TIFF/PNG slices (tifffile/Pillow, imported lazily).
* :mod:`qlty_gpu.io.stacks` finds files and groups them into stacks.
* :mod:`qlty_gpu.io.ome` builds OME-NGFF 0.5 metadata and writes stores atomically.
"""

from .images import ImageReadError, probe_image, read_image, read_image_cyx
from .ome import atomic_store, multiscales_metadata, ngff_conformant
from .stacks import Stack, find_stacks

__all__ = [
    "ImageReadError",
    "probe_image",
    "read_image",
    "read_image_cyx",
    "atomic_store",
    "multiscales_metadata",
    "ngff_conformant",
    "Stack",
    "find_stacks",
]
