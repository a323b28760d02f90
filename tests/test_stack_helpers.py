"""Shared helpers for the stack-conversion tests (no tests here).

``write_stack`` writes slices, ``convert`` runs one of the three converters with the
defaults the tests share (pattern ``name_<counter>.tif``, no progress bar, two pyramid
levels), and ``no_partials`` checks a folder for leftovers of an atomic write.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import tifffile

from qlty_gpu.utils.stack_to_zarr import (
    stack_files_to_ome_zarr,
    stack_files_to_ome_zarr_laplacian,
    stack_files_to_zarr,
)

PAT = r"(.+)_(\d+)\.tif$"
PNG_PAT = r"(.+)_(\d+)\.png$"

#: converter name -> function (``zarr``, ``ome``, ``laplacian``)
CONVERTERS = {
    "zarr": stack_files_to_zarr,
    "ome": stack_files_to_ome_zarr,
    "laplacian": stack_files_to_ome_zarr_laplacian,
}


def write_stack(folder: Path, name: str, images, ext: str = ".tif", pad: int = 0, counters=None):
    """Write slices ``images[z]`` as ``name_<counter>.<ext>``; returns the paths."""
    folder.mkdir(parents=True, exist_ok=True)
    counters = list(range(len(images))) if counters is None else counters
    paths = []
    for c, img in zip(counters, images):
        p = folder / f"{name}_{c:0{pad}d}{ext}"
        if ext.lower() in (".tif", ".tiff") or ext.lower().endswith((".tif", ".tiff")):
            rgb = img.ndim == 3 and img.shape[-1] in (3, 4) and img.shape[0] > 4
            tifffile.imwrite(p, img, photometric="rgb" if rgb else "minisblack")
        else:
            from PIL import Image

            Image.fromarray(img).save(p)
        paths.append(p)
    return paths


def rand(shape, dtype=np.uint16, seed=0):
    """Random test data of ``shape`` and ``dtype`` (floats in [0, 1), ints below 60000)."""
    rng = np.random.default_rng(seed)
    if np.dtype(dtype).kind == "f":
        return rng.random(shape).astype(dtype)
    hi = min(np.iinfo(dtype).max, 60000)
    return rng.integers(0, hi, shape).astype(dtype)


def no_partials(folder: Path) -> bool:
    """Whether ``folder`` holds no ``*.partial-<pid>`` / ``*.old-<pid>`` leftovers."""
    if not folder.exists():
        return True
    return not any(".partial-" in p.name or ".old-" in p.name for p in folder.iterdir())


def convert(kind: str, folder: Path, pattern: str = PAT, extension: str = ".tif", **kw):
    """Run converter ``kind`` on ``folder`` with the tests' defaults; returns its result.

    Pyramids get ``pyramid_levels=2`` (pass ``None`` for the automatic choice) and no
    progress bar; ``pyramid_levels`` is dropped for the plain converter.
    """
    fn = CONVERTERS[kind]
    if kind == "zarr":
        kw.pop("pyramid_levels", None)  # callers may pass pyramid options to every kind
    else:
        kw.setdefault("pyramid_levels", 2)
        kw.setdefault("verbose", False)
    return fn(folder, extension, pattern, **kw)
