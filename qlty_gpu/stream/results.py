"""Finished outputs, chunk by chunk: eps correction, channel normalisation, derived stores.

The Large quilts write ``mean = sum / (norm + eps0)`` once per chunk. Asking for another
``eps`` or for a channel normalisation afterwards never loads the whole result: each chunk
is read, corrected (``mean * (norm + eps0) / (norm + eps)``, std by the square root of that
factor) and normalised (divided by its sum over channels), and either copied into a numpy
result or written to a derived store beside the original. Memory: one chunk.

Example:
    >>> import zarr, numpy as np
    >>> from qlty_gpu.geometry import QuiltPlan
    >>> from qlty_gpu.stream import ChunkGrid
    >>> grid = ChunkGrid(QuiltPlan((4, 4), 2, 2), (2, 2))
    >>> a = zarr.create_array(store={}, shape=(1, 2, 4, 4), chunks=(1, 2, 2, 2), dtype="f4")
    >>> a[:] = 1.0
    >>> [float(m.sum(axis=1).max()) for _, m, _ in
    ...  transformed_chunks(a, None, grid, 1, 1e-8, 1e-8, True)][:2]
    [1.0, 1.0]
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Optional

import numpy as np
import torch

from .chunks import ChunkGrid
from .store import ZarrSink

__all__ = ["transformed_chunks", "derived_stores", "zeros_store"]


def transformed_chunks(
    mean_arr: Any,
    std_arr: Any,
    grid: ChunkGrid,
    images: int,
    eps0: float,
    eps: float,
    normalize: bool,
    weight: Optional[torch.Tensor] = None,
) -> Iterator[tuple[tuple, np.ndarray, Optional[np.ndarray]]]:
    """Yield ``(region, mean_chunk, std_chunk)`` float64, corrected to ``eps`` and, with
    ``normalize``, divided by the sum over channels (axis 1)."""
    for n in range(images):
        for cidx in grid.all_chunks():
            region = (slice(n, n + 1), slice(None), *grid.chunk_slices(cidx))
            m = mean_arr[region].astype(np.float64)
            s = std_arr[region].astype(np.float64) if std_arr is not None else None
            if eps != eps0:
                norm = grid.norm(cidx, dtype=torch.float64, weight=weight).numpy()
                m *= (norm + eps0) / (norm + eps)
                if s is not None:
                    s *= np.sqrt((norm + eps0) / (norm + eps))
            if normalize:
                tot = m.sum(axis=1, keepdims=True)
                m /= tot
                if s is not None:
                    s /= tot
            yield region, m, s


def derived_stores(filename: str, tag: str, mean_sink: ZarrSink, std_sink: Optional[ZarrSink],
                   chunks: Iterator) -> tuple[Any, Any]:
    """Write ``filename + "_mean" + tag + ".zarr"`` (and ``_std``) from ``chunks``; return the
    arrays. A derived store is ours and is replaced on every call."""
    fp = {**mean_sink.marker.get("fingerprint", {}), "derived": tag}
    kw = dict(dtype=mean_sink.dtype, fingerprint=fp, overwrite=True)
    m = ZarrSink(f"{filename}_mean{tag}.zarr", mean_sink.shape, mean_sink.chunks, **kw)
    s = None
    if std_sink is not None:
        s = ZarrSink(f"{filename}_std{tag}.zarr", mean_sink.shape, mean_sink.chunks, **kw)
    for region, cm, cs in chunks:
        if s is not None:
            s.write(region, cs)
        m.write(region, cm)
    for sink in (s, m):
        if sink is not None:
            sink.finish()
    return m.array, (s.array if s is not None else None)


def zeros_store(path: str, like: ZarrSink) -> Any:
    """A complete all-zero store shaped like ``like`` (nothing written: the fill value)."""
    sink = ZarrSink(path, like.shape, like.chunks, dtype=like.dtype,
                    fingerprint={"derived": "zero std"}, overwrite=True)
    sink.finish()
    return sink.array
