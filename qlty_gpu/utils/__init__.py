"""Utilities (image stacks to Zarr / OME-Zarr)."""
