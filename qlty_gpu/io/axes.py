"""Axis orders of stored stacks: one helper to permute, index and size by axis letters.

A stack is computed as ``(Z, C, Y, X)`` (``"ZCYX"``, ``C == 1`` for single-channel data)
and stored in any permutation of ``ZCYX``, or as ``ZYX`` for single-channel data.

Example:
    >>> import numpy as np
    >>> a = np.zeros((5, 3, 8, 9))                 # ZCYX
    >>> transpose(a, "ZCYX", "CZYX").shape
    (3, 5, 8, 9)
    >>> transpose(np.zeros((5, 1, 8, 9)), "ZCYX", "ZYX").shape
    (5, 8, 9)
    >>> index("CZYX", Z=slice(0, 2))
    (slice(None, None, None), slice(0, 2, None), slice(None, None, None), slice(None, None, None))
    >>> sizes("CZYX", Z=5, C=3, Y=8, X=9)
    (3, 5, 8, 9)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from ..errors import QltyError, QltyTypeError

__all__ = ["CANONICAL", "normalize_axis_order", "transpose", "index", "sizes", "pick"]

#: The order batches are computed in.
CANONICAL = "ZCYX"


def normalize_axis_order(axis_order: str, has_channels: bool) -> str:
    """Validate ``axis_order`` (a permutation of ``ZCYX``); single channel is always ``ZYX``.

    Example:
        >>> normalize_axis_order("czyx", True), normalize_axis_order("CZYX", False)
        ('CZYX', 'ZYX')
    """
    if not isinstance(axis_order, str):
        raise QltyTypeError(f"axis_order must be a string such as 'ZCYX', got {axis_order!r}")
    order = axis_order.upper()
    if not has_channels:
        return "ZYX"
    if sorted(order) != sorted(CANONICAL):
        raise QltyError(
            f"axis_order must contain exactly Z, C, Y, X. Got: {axis_order!r} "
            "(expected a permutation such as 'ZCYX' or 'CZYX')"
        )
    return order


def transpose(a: np.ndarray, src: str, dst: str) -> np.ndarray:
    """Permute ``a`` (axes labelled by ``src``) to ``dst`` (a view where possible).

    A ``C`` axis present in only one of the orders is added (length 1) or dropped (it
    must have length 1), so ``ZYX`` and ``ZCYX`` data convert both ways.
    """
    if "C" in src and "C" not in dst:
        a = a[(slice(None),) * src.index("C") + (0,)]  # a view, not a copy
        src = src.replace("C", "")
    elif "C" in dst and "C" not in src:
        a = np.expand_dims(a, len(src))
        src = src + "C"
    if src == dst:
        return a
    return np.transpose(a, [src.index(ax) for ax in dst])


def index(order: str, **selection: Any) -> tuple:
    """An index tuple for an array in ``order``: ``selection[axis]`` or ``slice(None)``."""
    return tuple(selection.get(ax, slice(None)) for ax in order)


def sizes(order: str, **size: int) -> tuple[int, ...]:
    """The shape of an array in ``order`` from per-axis sizes (``C`` defaults to 1)."""
    return tuple(int(size.get(ax, 1)) for ax in order)


def pick(order: str, values: Sequence[int], axes: str = "ZYX", default: int = 1) -> tuple:
    """Per-axis ``values`` (in ``order``) re-read for ``axes`` (``default`` when absent).

    Example:
        >>> pick("CZYX", (1, 2, 4, 4))
        (2, 4, 4)
    """
    d = dict(zip(order, values))
    return tuple(d.get(ax, default) for ax in axes)
