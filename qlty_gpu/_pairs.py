"""Shared core of the 2D and 3D patch-pair functions (any number of spatial axes).

Everything here is vectorised over pairs and stays on the input's device:

* displacements are drawn uniformly from a table of the integer lattice points of the
  annulus ``low <= |d| <= high`` (the distribution qlty's rejection sampler converges to),
  restricted to the displacements that fit the image, so no draw is ever rejected;
* first-patch starts are drawn uniformly in ``[max(0, -d), min(S - w, S - w - d)]`` per axis
  (both ends included);
* patches are gathered from ``tensor.unfold`` views with one advanced-indexing call;
* rotations of the second patch are one ``gather`` with a per-pair index table;
* overlapping pixels are located with one ``nonzero`` (the only device->host read: the
  number of overlapping pixels decides the output size) and gathered with advanced indexing,
  so gradients flow back to both patch tensors.

Axis order inside this module is the tensor's: ``(y, x)`` or ``(z, y, x)``. The public
functions convert to qlty's ``(dx, dy[, dz])`` delta layout at the boundary.
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Optional

import numpy as np
import torch

from .errors import QltyError, describe

__all__ = [
    "validate_pair_request",
    "displacement_table",
    "draw_pairs",
    "gather_windows",
    "rotate_patches",
    "overlap_pixels",
    "sample_displacement_scalar",
]


def validate_pair_request(tensor, window, delta_range, ndim: int) -> tuple:
    """qlty's argument checks for ``extract_patch_pairs(_3d)`` (spec §2.11), in qlty's order.

    Returns:
        ``(window tuple, low, high)``.
    """
    if not isinstance(tensor, torch.Tensor):
        raise QltyError(f"tensor must be a torch.Tensor, got {describe(tensor)}")
    names = "(N, C, Y, X)" if ndim == 2 else "(N, C, Z, Y, X)"
    if tensor.dim() != ndim + 2:
        raise QltyError(
            f"Input tensor must be {ndim + 2}D {names}, got shape {tensor.shape}"
        )
    try:
        window = tuple(int(w) for w in window)
    except TypeError as exc:
        raise QltyError(f"window must be a tuple of {ndim} ints, got {window!r}") from exc
    if len(window) != ndim or any(w < 1 for w in window):
        raise QltyError(f"window must be a tuple of {ndim} ints >= 1, got {window!r}")
    try:
        low, high = delta_range
        low, high = float(low), float(high)
    except (TypeError, ValueError) as exc:
        raise QltyError(f"delta_range must be a pair (low, high), got {delta_range!r}") from exc
    m = max(window)
    if low < m // 4 or high > 3 * m // 4:
        raise QltyError(
            f"delta_range must satisfy: {m // 4} <= low <= high <= {3 * m // 4}, "
            f"got ({delta_range[0]}, {delta_range[1]})"
        )
    if low > high:
        raise QltyError(f"delta_range low ({delta_range[0]}) must be <= high ({delta_range[1]})")
    spatial = tuple(tensor.shape[2:])
    need = tuple(w + int(high) for w in window)
    if any(n > s for n, s in zip(need, spatial)):
        what = "Image" if ndim == 2 else "Volume"
        axes = "(Y, X)" if ndim == 2 else "(Z, Y, X)"
        raise QltyError(
            f"{what} dimensions {spatial} are too small for window {window} "
            f"and delta_range ({delta_range[0]}, {delta_range[1]}). Minimum required: {need} "
            f"{axes}"
        )
    return window, low, high


@lru_cache(maxsize=256)
def displacement_table(low: float, high: float, limits: tuple[int, ...]) -> np.ndarray:
    """int64 ``(L, ndim)`` lattice displacements (tensor axis order) with ``low <= |d| <= high``
    and ``|d_a| <= limits[a]`` (the second patch must fit next to the first)."""
    m = int(high) + 1
    r = np.arange(-m, m + 1, dtype=np.int64)
    grids = np.meshgrid(*([r] * len(limits)), indexing="ij")
    d = np.stack([g.reshape(-1) for g in grids], axis=1)
    dist = np.sqrt((d.astype(np.float64) ** 2).sum(axis=1))
    keep = (dist >= low) & (dist <= high) & np.all(np.abs(d) <= np.asarray(limits), axis=1)
    return np.ascontiguousarray(d[keep])


def _generator(seed: Optional[int], device: torch.device) -> Optional[torch.Generator]:
    if seed is None:
        return None
    g = torch.Generator(device=device)
    g.manual_seed(int(seed))
    return g


def draw_pairs(
    n_images: int,
    num_patches: int,
    spatial: tuple[int, ...],
    window: tuple[int, ...],
    low: float,
    high: float,
    device: torch.device,
    random_seed: Optional[int] = None,
    n_rotation_choices: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """Draw every pair at once.

    Returns:
        ``image (M,)``, ``start1 (M, ndim)``, ``disp (M, ndim)`` (tensor axis order) and, if
        ``n_rotation_choices > 0``, the index ``(M,)`` of each pair's rotation choice.
        ``M = n_images * num_patches``; all int64 on ``device``.
    """
    limits = tuple(s - w for s, w in zip(spatial, window))
    table = displacement_table(float(low), float(high), limits)
    if len(table) == 0:
        raise QltyError(
            f"Could not find valid patch locations: no integer displacement d with "
            f"{low} <= |d| <= {high} fits a window {window} in an image {spatial}"
        )
    gen = _generator(random_seed, device)
    m = n_images * num_patches
    tab = torch.as_tensor(table, device=device)
    pick = torch.randint(0, len(table), (m,), generator=gen, device=device)
    disp = tab[pick]  # (M, nd)
    u = torch.rand((m, len(spatial)), generator=gen, device=device, dtype=torch.float64)
    lim = torch.as_tensor(limits, device=device)
    lo = (-disp).clamp(min=0)
    count = lim - disp.abs() + 1  # >= 1 by construction of the table
    start = lo + torch.minimum((u * count).long(), count - 1)
    rot = None
    if n_rotation_choices > 0:
        rot = torch.randint(0, n_rotation_choices, (m,), generator=gen, device=device)
    image = torch.arange(n_images, device=device).repeat_interleave(num_patches)
    return image, start, disp, rot


def gather_windows(
    tensor: torch.Tensor, image: torch.Tensor, start: torch.Tensor, window: tuple[int, ...]
) -> torch.Tensor:
    """``out[i] = tensor[image[i], :, start[i,0]:+w0, start[i,1]:+w1, ...]``, shape (M, C, *window).

    One advanced-indexing call on the ``unfold`` view (no copy of the image); differentiable.
    """
    v = tensor
    for ax, w in enumerate(window):
        v = v.unfold(2 + ax, w, 1)  # (N, C, S0-w0+1, ..., w0, ...)
    idx = (image, slice(None), *start.unbind(1))
    return v[idx]


@lru_cache(maxsize=64)
def _rotation_sources(u: int, v: int) -> torch.Tensor:
    """int64 ``(4, u*v)``: ``rot90(p, k).flatten()[q] == p.flatten()[table[k, q]]``."""
    base = torch.arange(u * v).reshape(u, v)
    rows = []
    for k in range(4):
        r = torch.rot90(base, k, dims=(0, 1)) if (k % 2 == 0 or u == v) else base
        rows.append(r.reshape(-1))
    return torch.stack(rows)


def rotate_patches(p: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Per-pair ``torch.rot90(p[i], k[i], dims=(-2, -1))`` as one gather; (M, C, U, V).

    Odd ``k`` needs square patches (the caller checks).
    """
    m, c, u, v = p.shape
    src = _rotation_sources(u, v).to(p.device)[k.remainder(4)]  # (M, U*V)
    out = torch.gather(p.reshape(m, c, u * v), 2, src[:, None, :].expand(m, c, u * v))
    return out.reshape(m, c, u, v)


def overlap_pixels(
    p1: torch.Tensor, p2: torch.Tensor, disp: torch.Tensor, rotations: Optional[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixels of ``p1`` and the matching pixels of ``p2`` (``(K, C)`` each), pair by pair,
    row-major inside each pair (qlty's order).

    Args:
        p1, p2: ``(M, C, *W)``.
        disp: int64 ``(M, ndim)`` displacement of patch 2 in tensor axis order.
        rotations: optional int64 ``(M,)``: ``p2[i]`` was rotated by ``rot90(., k)`` (2D only).
    """
    m, c = p1.shape[:2]
    win = tuple(p1.shape[2:])
    nd = len(win)
    dev = p1.device
    valid = torch.ones((m, *win), dtype=torch.bool, device=dev)
    for ax, w in enumerate(win):
        u = torch.arange(w, device=dev)
        d = disp[:, ax : ax + 1]
        ok = (u[None, :] >= d) & (u[None, :] < w + d)  # (M, w)
        shape = [m] + [1] * nd
        shape[1 + ax] = w
        valid = valid & ok.reshape(shape)
    flat = valid.reshape(-1).nonzero().squeeze(1)  # (K,) one device->host read
    per = math.prod(win)
    pair = flat // per
    rem = flat % per
    coords = []
    for w in reversed(win):
        coords.append(rem % w)
        rem = rem // w
    coords = coords[::-1]  # per axis (K,)
    src = [coords[a] - disp[pair, a] for a in range(nd)]  # in the unrotated patch 2
    if rotations is not None and nd == 2:
        # p2 = rot90(q, r) => q = rot90(p2, -r): q[a, b] = p2[g_(-r)(a, b)]
        r = (-rotations[pair]).remainder(4)
        a, b = src
        hu, wv = win
        ya = torch.where(r == 0, a, torch.where(r == 1, b, torch.where(r == 2, hu - 1 - a, hu - 1 - b)))
        xb = torch.where(r == 0, b, torch.where(r == 1, wv - 1 - a, torch.where(r == 2, wv - 1 - b, a)))
        src = [ya, xb]
    o1 = p1[(pair, slice(None), *coords)]
    o2 = p2[(pair, slice(None), *src)]
    return o1, o2


def sample_displacement_scalar(
    ndim: int,
    low: float,
    high: float,
    generator: Optional[torch.Generator] = None,
    device: Optional[torch.device] = None,
) -> tuple[int, ...]:
    """qlty's per-vector rejection sampler (kept for compatibility; the extractors do not use
    it). Returns ``(dx, dy)`` or ``(dx, dy, dz)``."""
    if device is None:
        device = torch.device("cpu")
    kw = {"device": device} if generator is None else {"generator": generator, "device": device}
    m = int(high) + 1
    for _ in range(1000):
        d = [int(torch.randint(-m, m + 1, (1,), **kw)[0]) for _ in range(ndim)]
        if low <= sum(v * v for v in d) ** 0.5 <= high:
            return tuple(d)
    pi = 3.141592653589793
    theta = torch.rand(1, **kw) * 2 * pi
    if ndim == 3:
        phi = torch.rand(1, **kw) * pi
    dist = float((low + (high - low) * torch.rand(1, **kw))[0])
    ct, st = float(torch.cos(theta)[0]), float(torch.sin(theta)[0])
    if ndim == 2:
        d = [round(dist * ct), round(dist * st)]
    else:
        cp, sp = float(torch.cos(phi)[0]), float(torch.sin(phi)[0])
        d = [round(dist * sp * ct), round(dist * sp * st), round(dist * cp)]
    actual = sum(v * v for v in d) ** 0.5
    if actual < low:
        d = [round(v * (low / actual)) for v in d]
    elif actual > high:
        d = [round(v * (high / actual)) for v in d]
    return tuple(d)
