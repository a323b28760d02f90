"""The region engine's shared parts: sources, chunk geometry, output sink, device I/O.

* :mod:`~qlty_gpu.stream.sources`: read a region of any array-like (tensor, numpy, memmap,
  Zarr, h5py, ``TensorLike3D``) into a tensor, reading only that region.
* :mod:`~qlty_gpu.stream.chunks`: :class:`ChunkGrid`, the output chunk grid related to a
  :class:`~qlty_gpu.geometry.QuiltPlan`'s patches (which patches touch a chunk, which chunks a
  patch touches, which patches a chunk owns, a chunk's weight sum).
* :mod:`~qlty_gpu.stream.store`: :class:`ZarrSink`, a Zarr v3 output written in whole chunks
  with a manifest of finished units, a settings fingerprint and a completion marker.
* :mod:`~qlty_gpu.stream.device_io`: the kvikio / pinned-host seam and its GB/s report.

Example:
    >>> import numpy as np, tempfile, os
    >>> from qlty_gpu.geometry import QuiltPlan
    >>> plan = QuiltPlan((10, 12), window=4, step=3)
    >>> grid = ChunkGrid(plan, chunks=(6, 6))
    >>> sink = ZarrSink(os.path.join(tempfile.mkdtemp(), "o.zarr"), shape=(1, 1, 10, 12),
    ...                 chunks=(1, 1, 6, 6), fingerprint={"plan": repr(plan)})
    >>> for cidx in grid.all_chunks():
    ...     region = (slice(0, 1), slice(0, 1)) + grid.chunk_slices(cidx)
    ...     data = read_region(np.ones((1, 1, 10, 12), np.float32), region)
    ...     sink.write(region, data, unit=cidx)
    >>> sink.finish(expected_units=grid.chunks_per_image); sink.complete
    True
"""

from .chunks import ChunkGrid, default_chunks
from .device_io import ChunkWriter, IOChoice, choose_io_path
from .sources import ArraySource, as_source, normalize_region, read_region
from .store import MARKER, ZarrSink, fingerprint_diff, unit_key

__all__ = [
    "ArraySource",
    "ChunkGrid",
    "ChunkWriter",
    "IOChoice",
    "MARKER",
    "ZarrSink",
    "as_source",
    "choose_io_path",
    "default_chunks",
    "fingerprint_diff",
    "normalize_region",
    "read_region",
    "unit_key",
]
