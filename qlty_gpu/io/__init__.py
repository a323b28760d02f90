"""I/O: image files, Zarr / OME-Zarr stores (compute modules take arrays, not paths)."""
