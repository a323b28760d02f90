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

import itertools
import math
import os
from functools import lru_cache
from typing import Optional

import numpy as np
import torch

from ._alloc import empty_cpu
from .errors import QltyError, describe

__all__ = [
    "validate_pair_request",
    "displacement_table",
    "draw_pairs",
    "gather_windows",
    "rotate_patches",
    "gather_rotated",
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


def _select_rows(rows: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``rows[idx.reshape(-1)]`` as ``(K, w)``. Large CPU outputs come from the huge-page pool
    (qlty_gpu._alloc): a training loop's next batch reuses the last one's pages instead of
    page-faulting fresh ones (~4x the copy itself for 16 x 64 pairs of 3 x 32 x 32)."""
    idx = idx.reshape(-1)
    if rows.device.type != "cpu":
        return rows.index_select(0, idx)
    out = empty_cpu((idx.numel(), rows.shape[1]), rows.dtype)
    return torch.index_select(rows, 0, idx, out=out)


def gather_windows(
    tensor: torch.Tensor, image: torch.Tensor, start: torch.Tensor, window: tuple[int, ...]
) -> torch.Tensor:
    """``out[i] = tensor[image[i], :, start[i,0]:+w0, start[i,1]:+w1, ...]``, shape (M, C, *window).

    Contiguous input without autograd: one ``index_select`` of whole window rows from an
    overlapping ``(L, w_last)`` row view of the storage (row copies, no per-element index
    arithmetic). Otherwise one advanced-indexing call on the ``unfold`` view (differentiable).
    Neither copies the image.
    """
    m = image.shape[0]
    c = tensor.shape[1]
    if tensor.is_contiguous() and not (tensor.requires_grad and torch.is_grad_enabled()):
        strides = tensor.stride()
        wl = window[-1]
        flat = tensor.reshape(-1)
        rows = flat.as_strided((flat.numel() - wl + 1, wl), (1, 1))
        base = image * strides[0] + (start * torch.as_tensor(strides[2:], device=start.device)).sum(1)
        off = base[:, None] + torch.arange(c, device=start.device)[None, :] * strides[1]  # (M, C)
        for ax in range(len(window) - 1):  # every row of the window: (M, C, w0[, w1])
            r = torch.arange(window[ax], device=start.device) * strides[2 + ax]
            off = off[..., None] + r
        return _select_rows(rows, off).reshape(m, c, *window)
    v = tensor
    for ax, w in enumerate(window):
        v = v.unfold(2 + ax, w, 1)  # (N, C, S0-w0+1, ..., w0, ...)
    idx = (image, slice(None), *start.unbind(1))
    return v[idx]


def gather_rotated(
    tensor: torch.Tensor,
    image: torch.Tensor,
    start: torch.Tensor,
    window: tuple[int, int],
    rot: torch.Tensor,
    kinds: tuple[int, ...] = (0, 1, 2, 3),
) -> torch.Tensor:
    """``torch.rot90`` of the 2D windows at ``start`` by ``rot[i]`` quarter turns, (M, C, U, V).

    Every output row is a forward row of the image, of the image flipped on both axes, or of
    their transposes (k = 0, 2, 1, 3), so the rotation costs one ``index_select`` of rows
    from the buffers ``kinds`` needs instead of a per-element gather. Falls back to gather
    + :func:`rotate_patches` for autograd, non-contiguous input, or when the buffers would
    be much larger than the output.
    """
    n, c, yy, xx = tensor.shape
    u, v = window
    m = image.shape[0]
    kinds = tuple(sorted(set(kinds)))
    dev = tensor.device
    if (not tensor.is_contiguous() or (tensor.requires_grad and torch.is_grad_enabled())
            or tensor.numel() * len(kinds) > 4 * m * c * u * v):
        return rotate_patches(gather_windows(tensor, image, start, window), rot)
    size = tensor.numel()
    # the row buffers and the output: pooled huge pages on the CPU (see _select_rows)
    buf = (empty_cpu((len(kinds) * size,), tensor.dtype) if dev.type == "cpu"
           else torch.empty(len(kinds) * size, dtype=tensor.dtype, device=dev))
    slots = {k: buf[i * size:(i + 1) * size] for i, k in enumerate(kinds)}
    flip = None
    if 2 in kinds or 3 in kinds:
        flip = tensor.flip(-2, -1)
        if 2 in kinds:
            slots[2].view(tensor.shape).copy_(flip)
            flip = slots[2].view(tensor.shape)
    if 0 in kinds:
        slots[0].copy_(tensor.reshape(-1))
    if 1 in kinds:
        slots[1].view(n, c, xx, yy).copy_(tensor.transpose(-2, -1))
    if 3 in kinds:
        slots[3].view(n, c, xx, yy).copy_(flip.transpose(-2, -1))
    rows = buf.as_strided((buf.numel() - v + 1, v), (1, 1))
    slot = torch.full((4,), 0, dtype=torch.int64)
    for i, k in enumerate(kinds):
        slot[k] = i * size
    slot = slot.to(dev)
    k = rot.remainder(4)
    y, x = start[:, 0], start[:, 1]
    r0 = torch.where(k == 0, y, torch.where(k == 2, yy - y - u, torch.where(k == 1, x + v - 1, xx - 1 - x)))
    c0 = torch.where(k == 0, x, torch.where(k == 2, xx - x - v, torch.where(k == 1, y, yy - y - u)))
    su = torch.where(k % 2 == 1, -1, 1)
    rstride = torch.where(k % 2 == 1, yy, xx)
    base = slot[k] + image * (c * yy * xx) + r0 * rstride + c0  # (M,)
    off = (base[:, None, None] + torch.arange(c, device=dev)[None, :, None] * (yy * xx)
           + (su * rstride)[:, None, None] * torch.arange(u, device=dev)[None, None, :])
    return _select_rows(rows, off).reshape(m, c, u, v)


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


def window_stats(
    tensor: torch.Tensor, image: torch.Tensor, starts: list, window: tuple[int, ...],
    per_image: int,
) -> list:
    """Mean and unbiased std over all channels and pixels of each window, float32 ``(M,)``,
    as ``[(mean, sigma)]`` for every start table in ``starts`` (one set of tables for all).

    Pairs are grouped by image (``per_image`` consecutive pairs each, as drawn). For a block
    of images at a time, the channel-summed values and squares, centred on each image's
    mean, are cumulated into float64 summed-area tables; a window is then ``2**ndim`` table
    lookups. No patch is gathered. Rotations change neither statistic.
    """
    m = image.shape[0]
    nd = len(window)
    n_img, c = tensor.shape[:2]
    spatial = tensor.shape[2:]
    count = c * math.prod(window)
    mean = torch.empty((len(starts), m), dtype=torch.float64, device=tensor.device)
    var = torch.empty((len(starts), m), dtype=torch.float64, device=tensor.device)
    corners = list(itertools.product((0, 1), repeat=nd))
    block = max(1, (32 << 20) // max(1, math.prod(spatial)))  # ~256 MB of float64 tables
    with torch.no_grad():
        for n0 in range(0, n_img if per_image else 0, block):
            n1 = min(n_img, n0 + block)
            x = tensor[n0:n1].to(torch.float64)
            shift = x.mean(dim=tuple(range(1, x.dim())))  # (B,)
            x = x - shift.reshape([-1] + [1] * (x.dim() - 1))
            tables = []
            for v in (x.sum(1), (x * x).sum(1)):  # (B, *spatial)
                for ax in range(nd):
                    v = torch.nn.functional.pad(v.cumsum(1 + ax), [0, 0] * (nd - 1 - ax) + [1, 0])
                tables.append(v)
            sl = slice(n0 * per_image, n1 * per_image)
            im = image[sl] - n0
            for i, start in enumerate(starts):
                st = start[sl]
                s1, s2 = (
                    sum(
                        (-1 if (nd - sum(cr)) % 2 else 1)
                        * tab[(im, *(st[:, a] + (window[a] if cr[a] else 0) for a in range(nd)))]
                        for cr in corners
                    )
                    for tab in tables
                )
                mean[i, sl] = s1 / count + shift[im]
                var[i, sl] = (s2 - s1 * s1 / count) / max(count - 1, 1)
    sigma = var.clamp(min=0).sqrt()
    if count == 1:
        sigma = torch.full_like(sigma, float("nan"))  # torch.std of one value
    mean, sigma = mean.to(torch.float32), sigma.to(torch.float32)
    return [(mean[i], sigma[i]) for i in range(len(starts))]


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
    if _numba_ok(p1, p2):
        return _overlap_numba(p1, p2, disp, rotations)
    m, c = p1.shape[:2]
    win = tuple(p1.shape[2:])
    nd = len(win)
    dev = p1.device
    valid = None
    for ax, w in enumerate(win):  # per-axis masks, one broadcast AND per extra axis
        u = torch.arange(w, device=dev)
        d = disp[:, ax : ax + 1]
        ok = (u[None, :] >= d) & (u[None, :] < w + d)  # (M, w)
        shape = [m] + [1] * nd
        shape[1 + ax] = w
        valid = ok.reshape(shape) if valid is None else valid & ok.reshape(shape)
    valid = valid.expand(m, *win)
    per = math.prod(win)
    flat = valid.reshape(-1).nonzero().squeeze(1)  # (K,) one device->host read
    # flat index, within its window, of the matching pixel of the unrotated patch 2:
    # q - shift with shift = sum_a d_a * stride_a (valid pixels stay inside the window)
    wstrides = [math.prod(win[a + 1 :]) for a in range(nd)]
    shift = (disp * torch.as_tensor(wstrides, device=dev)).sum(1)  # (M,)
    q = torch.arange(per, device=dev)[None, :] - shift[:, None]  # (M, per)
    if rotations is not None and nd == 2:
        # p2 = rot90(Q, r): Q.flatten()[q] = p2.flatten()[table[-r % 4, q]]
        table = _rotation_sources(*win).to(dev)[(-rotations).remainder(4)]  # (M, per)
        q = torch.gather(table, 1, q.clamp(0, per - 1))
    src = (q + torch.arange(m, device=dev)[:, None] * per).reshape(-1)[flat]
    o1 = _channels_last_rows(p1).index_select(0, flat)
    o2 = _channels_last_rows(p2).index_select(0, src)
    return o1, o2


_NUMBA_DTYPES = (torch.float32, torch.float64, torch.int32, torch.int64, torch.int16,
                 torch.uint8, torch.int8)


def _numba_ok(p1: torch.Tensor, p2: torch.Tensor) -> bool:
    """CPU tensors of a numba dtype take the numba kernels (forward and backward)."""
    if p1.device.type != "cpu" or p1.dtype not in _NUMBA_DTYPES or p2.dtype != p1.dtype:
        return False
    if (p1.requires_grad or p2.requires_grad) and not p1.dtype.is_floating_point:
        return False
    return os.environ.get("QLTY_GPU_PAIRS_NUMBA", "1") != "0"


def _lifted(disp, rotations, m, win):
    """3-axis displacements, rotations, per-pair output offsets and the total count."""
    lift = 3 - len(win)
    d = torch.cat([torch.zeros((m, lift), dtype=torch.int64), disp.cpu().to(torch.int64)], 1)
    w3 = torch.tensor((1,) * lift + win)
    counts = (w3[None, :] - d.abs()).clamp(min=0).prod(1)  # pixels per pair
    offsets = counts.cumsum(0) - counts
    rot = torch.zeros(m, dtype=torch.int64) if rotations is None else rotations.cpu().to(torch.int64)
    return d.contiguous(), rot.contiguous(), offsets, int(counts.sum()), (1,) * lift + win


class _OverlapNumba(torch.autograd.Function):
    """Numba gather forward, numba scatter backward (the exact adjoint)."""

    @staticmethod
    def forward(ctx, p1, p2, disp, rotations):
        from .kernels.numba_pairs import _overlap_pixels_numba

        m, c = p1.shape[:2]
        win = tuple(p1.shape[2:])
        d, rot, offsets, total, w3 = _lifted(disp, rotations, m, win)
        # pooled pages from 1 MiB on (qlty_gpu._alloc): 1024 pairs of 3 x 32 x 32 give two
        # 7 MB outputs, whose fresh pages cost as much as the copy
        o1 = empty_cpu((total, c), p1.dtype, min_bytes=1 << 20)
        o2 = empty_cpu((total, c), p2.dtype, min_bytes=1 << 20)
        _overlap_pixels_numba(
            p1.detach().contiguous().reshape(m, c, *w3).numpy(),
            p2.detach().contiguous().reshape(m, c, *w3).numpy(),
            d.numpy(), rot.numpy(), offsets.numpy(), o1.numpy(), o2.numpy(),
        )
        ctx.save_for_backward(d, rot, offsets)
        ctx.shape = (m, c, *w3)
        ctx.out_shape = tuple(p1.shape)
        return o1, o2

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g1, g2):
        from .kernels.numba_pairs import _overlap_pixels_backward_numba

        d, rot, offsets = ctx.saved_tensors  # grads are materialised (zeros when unused)
        gp1 = torch.zeros(ctx.shape, dtype=g1.dtype)
        gp2 = torch.zeros(ctx.shape, dtype=g2.dtype)
        _overlap_pixels_backward_numba(
            g1.contiguous().numpy(), g2.contiguous().numpy(),
            d.numpy(), rot.numpy(), offsets.numpy(), gp1.numpy(), gp2.numpy(),
        )
        return gp1.reshape(ctx.out_shape), gp2.reshape(ctx.out_shape), None, None


def _overlap_numba(p1, p2, disp, rotations):
    return _OverlapNumba.apply(p1, p2, disp, rotations)


def _channels_last_rows(p: torch.Tensor) -> torch.Tensor:
    """``(M * prod(W), C)`` rows of pixels (a view when C == 1)."""
    c = p.shape[1]
    return p.movedim(1, -1).reshape(-1, c)


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
