"""I/O: image files, Zarr / OME-Zarr stores (compute modules take arrays, not paths).

* :mod:`qlty_gpu.io.images` reads TIFF/PNG slices (tifffile/Pillow, imported lazily).
* :mod:`qlty_gpu.io.stacks` finds files and groups them into stacks.
* :mod:`qlty_gpu.io.ome` builds OME-NGFF 0.5 metadata.
* :mod:`qlty_gpu.io.atomic` writes stores all-or-nothing and checks where outputs may go.
* :mod:`qlty_gpu.io.axes` permutes arrays between axis orders (``ZCYX``, ``CZYX``, ...).
* :mod:`qlty_gpu.io.pyramid` computes pyramid levels and Laplacian differences (arrays in,
  arrays out).
* :mod:`qlty_gpu.io.plan` plans every stack and its output before anything is written.
* :mod:`qlty_gpu.io.pipeline` streams a stack of slices through a writer (``run_stack``).
* :mod:`qlty_gpu.io.laplacian` writes and reconstructs Laplacian pyramid stores.
"""

from .atomic import StalePartialWarning, atomic_store, check_output
from .images import ImageReadError, probe_image, read_image, read_image_cyx
from .ome import multiscales_metadata, ngff_conformant
from .stacks import Gaps, Stack, StackGapWarning, find_stacks

__all__ = [
    "ImageReadError",
    "probe_image",
    "read_image",
    "read_image_cyx",
    "atomic_store",
    "check_output",
    "StalePartialWarning",
    "multiscales_metadata",
    "ngff_conformant",
    "Stack",
    "Gaps",
    "StackGapWarning",
    "find_stacks",
]
