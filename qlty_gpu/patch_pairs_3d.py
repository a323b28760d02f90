"""Pairs of displaced 3D patches (qlty 1.5.0's ``qlty.patch_pairs_3d``, spec §2.11).

Vectorised like :mod:`qlty_gpu.patch_pairs_2d`: every pair is drawn at once on the input's
device, patches are gathered with one advanced-indexing call, and
:func:`extract_overlapping_pixels_3d` is differentiable. ``deltas`` are float32
``(dx, dy, dz)``; ``window = (U, V, W)`` are the (z, y, x) sizes. No rotations, no positions.

Example:
    >>> import torch
    >>> v = torch.randn(1, 1, 24, 24, 24)
    >>> p1, p2, d = extract_patch_pairs_3d(v, (8, 8, 8), 4, (3.0, 5.0), random_seed=0)
    >>> p1.shape, d.shape
    (torch.Size([4, 1, 8, 8, 8]), torch.Size([4, 3]))
    >>> o1, o2 = extract_overlapping_pixels_3d(p1, p2, d)
    >>> bool(torch.equal(o1, o2))
    True
"""

from __future__ import annotations

from typing import Optional

import torch

from . import _pairs
from .errors import QltyError
from .patch_pairs_2d import _check_overlap_args

__all__ = ["extract_patch_pairs_3d", "extract_overlapping_pixels_3d"]


def extract_patch_pairs_3d(
    tensor: torch.Tensor,
    window: tuple[int, int, int],
    num_patches: int,
    delta_range: tuple[float, float],
    random_seed: Optional[int] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Draw ``num_patches`` pairs of displaced patches from every volume.

    Args:
        tensor: volumes ``(N, C, Z, Y, X)``.
        window: patch size ``(U, V, W)`` along (z, y, x).
        num_patches: pairs per volume ``P``.
        delta_range: ``(low, high)`` bounds of ``sqrt(dx**2 + dy**2 + dz**2)``, within
            ``[max(window)//4, 3*max(window)//4]``.
        random_seed: seed of a generator on ``tensor.device``; None uses the global RNG.

    Returns:
        ``(patches1, patches2, deltas)``: ``(N*P, C, U, V, W)`` each and float32 ``(N*P, 3)``
        = ``(dx, dy, dz)``; ``patches2[i]`` starts at ``(z + dz, y + dy, x + dx)``.

    Raises:
        QltyError: (a ``ValueError``) on a bad shape, ``delta_range`` or volume size.
    """
    window, low, high = _pairs.validate_pair_request(tensor, window, delta_range, 3)
    if isinstance(num_patches, bool) or not isinstance(num_patches, int) or num_patches < 0:
        raise QltyError(f"num_patches must be an int >= 0, got {num_patches!r}")
    image, start, disp, _ = _pairs.draw_pairs(
        tensor.shape[0], num_patches, tuple(tensor.shape[2:]), window, low, high,
        tensor.device, random_seed,
    )
    p1 = _pairs.gather_windows(tensor, image, start, window)
    p2 = _pairs.gather_windows(tensor, image, start + disp, window)
    return p1, p2, disp.flip(1).to(torch.float32)


def extract_overlapping_pixels_3d(
    patches1: torch.Tensor, patches2: torch.Tensor, deltas: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Voxels the two patches of each pair share, in corresponding order.

    Args:
        patches1, patches2: ``(M, C, U, V, W)``.
        deltas: ``(M, 3)`` = ``(dx, dy, dz)``, truncated towards zero.

    Returns:
        ``(o1, o2)``, each ``(K, C)``: pairs in order, voxels in (z, y, x) raster order inside
        each overlap. Differentiable with respect to both patch tensors.
    """
    disp, _ = _check_overlap_args(patches1, patches2, deltas, None, 3)
    return _pairs.overlap_pixels(patches1, patches2, disp, None)


def _sample_displacement_vector_3d(
    low: float,
    high: float,
    generator: Optional[torch.Generator] = None,
    device: Optional[torch.device] = None,
) -> tuple[int, int, int]:
    """qlty's per-vector sampler ``(dx, dy, dz)`` (compatibility; the extractor draws every
    pair at once from the annulus lattice and does not call this)."""
    return _pairs.sample_displacement_scalar(3, low, high, generator, device)
