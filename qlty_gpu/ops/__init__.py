"""Registered torch ops (``torch.ops.qlty_gpu.*``) and their validated Python entry points."""

from .backend import BACKENDS, available_backends, choose_backend
from .quilt import (
    STITCH_MODES,
    accumulation_dtype,
    stitch,
    stitch_reference,
    unstitch,
    unstitch_reference,
)

__all__ = [
    "BACKENDS",
    "STITCH_MODES",
    "accumulation_dtype",
    "available_backends",
    "choose_backend",
    "stitch",
    "stitch_reference",
    "unstitch",
    "unstitch_reference",
]
