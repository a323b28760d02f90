"""Registered torch ops (``torch.ops.qlty_gpu.*``) and their validated Python entry points.

Layout (one op family per file group, one file per implementation)::

    ops/quilt.py            custom ops, fakes, autograd, validated entry points, dispatch
    ops/quilt_reference.py  the spec: dtype rules and a pure-torch reference
    ops/quilt_torch.py      'torch' launchers (strided copies, any device)
    ops/quilt_numba.py      'numba' launchers   <->  kernels/quilt_numba.py
    ops/quilt_triton.py     'triton' launchers  <->  kernels/quilt_triton.py
    ops/backend.py          the capability table (why_not) and backend choice
    ops/_launch.py          what every family's launchers share
"""

from .backend import BACKENDS, available_backends, choose_backend, why_not
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
    "why_not",
]
