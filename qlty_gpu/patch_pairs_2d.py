"""Pairs of displaced 2D patches for self-supervised and registration-style training.

qlty 1.5.0's ``qlty.patch_pairs_2d`` API (spec §2.11), vectorised: all pairs are drawn in a
handful of tensor calls on the input's device (no per-pair Python loop, no device->host sync
while sampling), patches are gathered with one advanced-indexing call, and
:func:`extract_overlapping_pixels` stays differentiable.

Conventions (as qlty): ``deltas`` are float32 ``(dx, dy)`` (X first); positions are int64
``[y, x]`` (``[n, y, x]`` with ``include_n_position``), so ``pos2 - pos1 == (dy, dx)``; the
second patch is rotated by ``torch.rot90(p2, k, dims=(-2, -1))`` (counter-clockwise).

What differs from qlty (see the README): one random stream serves every image, so
:func:`extract_patch_pairs_metadata` and :func:`extract_patch_pairs` draw the same pairs for
the same seed (qlty: only image 0 agrees); the last valid start position is drawable (qlty's
upper bound is exclusive); displacement vectors are drawn directly from the annulus lattice
points that fit the image (same distribution as qlty's rejection sampler, never fails).

Example:
    >>> import torch
    >>> x = torch.randn(2, 3, 64, 64)
    >>> p1, p2, d, r = extract_patch_pairs(x, (16, 16), 8, (4.0, 8.0), random_seed=0)
    >>> p1.shape, d.shape, r.dtype
    (torch.Size([16, 3, 16, 16]), torch.Size([16, 2]), torch.int64)
    >>> o1, o2 = extract_overlapping_pixels(p1, p2, d, r)
    >>> bool(torch.equal(o1, o2))
    True
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Optional, Union

import torch

from . import _pairs
from .errors import QltyError, describe

__all__ = [
    "extract_patch_pairs",
    "extract_overlapping_pixels",
    "extract_patch_pairs_metadata",
    "stratified_sample_by_histogram",
    "stratified_sample_by_quantiles",
    "extract_patches_from_metadata",
    "extract_patches_to_zarr",
    "ZarrPatchPairDataset",
]

_STAT_CHUNK = 4096  # pairs per block when computing patch statistics


class QltyIndexError(QltyError, IndexError):
    """A selected index outside the metadata (qlty raised ``IndexError``)."""


def _rotation_choices(rotation_choices, window) -> tuple[int, ...]:
    if rotation_choices is None:
        return (0,)
    choices = tuple(int(c) % 4 for c in rotation_choices)
    choices = choices or (0,)
    if window[0] != window[1] and any(c % 2 for c in choices):
        raise QltyError(
            f"rotation_choices {tuple(rotation_choices)!r} contain quarter turns (1 or 3), which "
            f"need a square window; got window {tuple(window)!r} (use 0 and 2 only)"
        )
    return choices


def _sample(tensor, window, num_patches, delta_range, random_seed, rotation_choices):
    """Validated draw shared by :func:`extract_patch_pairs` and the metadata function."""
    window, low, high = _pairs.validate_pair_request(tensor, window, delta_range, 2)
    if isinstance(num_patches, bool) or not isinstance(num_patches, int) or num_patches < 0:
        raise QltyError(f"num_patches must be an int >= 0, got {num_patches!r}")
    choices = _rotation_choices(rotation_choices, window)
    allow = any(c != 0 for c in choices)
    n = tensor.shape[0]
    image, start, disp, pick = _pairs.draw_pairs(
        n, num_patches, tuple(tensor.shape[2:]), window, low, high, tensor.device,
        random_seed, len(choices) if allow else 0,
    )
    if allow:
        rot = torch.as_tensor(choices, dtype=torch.int64, device=tensor.device)[pick]
    else:
        rot = torch.zeros(image.shape[0], dtype=torch.int64, device=tensor.device)
    return window, image, start, disp, rot, allow


def _patches(tensor, window, image, start, disp, rot, allow, kinds=(0, 1, 2, 3)):
    p1 = _pairs.gather_windows(tensor, image, start, window)
    if allow:
        p2 = _pairs.gather_rotated(tensor, image, start + disp, window, rot, kinds)
    else:
        p2 = _pairs.gather_windows(tensor, image, start + disp, window)
    return p1, p2


def _positions(image, start, include_n):
    if include_n:
        return torch.cat([image[:, None], start], dim=1)
    return start.clone()


def extract_patch_pairs(
    tensor: torch.Tensor,
    window: tuple[int, int],
    num_patches: int,
    delta_range: tuple[float, float],
    random_seed: Optional[int] = None,
    rotation_choices: Optional[Sequence[int]] = None,
    return_positions: bool = False,
    include_n_position: bool = False,
):
    """Draw ``num_patches`` pairs of displaced patches from every image.

    Args:
        tensor: images ``(N, C, Y, X)``, any device and dtype.
        window: patch size ``(U, V)``.
        num_patches: pairs per image ``P``.
        delta_range: ``(low, high)`` bounds of the displacement length
            ``sqrt(dx**2 + dy**2)``; ``max(U, V)//4 <= low <= high <= 3*max(U, V)//4``.
        random_seed: seed of a generator on ``tensor.device``; None uses the global RNG.
        rotation_choices: quarter turns drawn per pair for the second patch (odd turns need a
            square window); None means no rotation.
        return_positions: also return the patch starts.
        include_n_position: prepend the image index to the positions.

    Returns:
        ``(patches1, patches2, deltas, rotations[, positions1, positions2])``: patches
        ``(N*P, C, U, V)`` in the input dtype, ``deltas`` float32 ``(N*P, 2)`` = ``(dx, dy)``,
        ``rotations`` int64 ``(N*P,)``, positions int64 ``(N*P, 2)`` = ``[y, x]`` (or
        ``(N*P, 3)`` = ``[n, y, x]``). ``patches2[i]`` is the window at
        ``(y + dy, x + dx)`` rotated by ``torch.rot90(., rotations[i])``.

    Raises:
        QltyError: (a ``ValueError``) on a bad shape, ``delta_range`` or image size.
    """
    window, image, start, disp, rot, allow = _sample(
        tensor, window, num_patches, delta_range, random_seed, rotation_choices
    )
    kinds = _rotation_choices(rotation_choices, window)
    p1, p2 = _patches(tensor, window, image, start, disp, rot, allow, kinds)
    deltas = disp.flip(1).to(torch.float32)
    if return_positions:
        pos1 = _positions(image, start, include_n_position)
        pos2 = _positions(image, start + disp, include_n_position)
        return p1, p2, deltas, rot, pos1, pos2
    return p1, p2, deltas, rot


def _check_overlap_args(patches1, patches2, deltas, rotations, nd: int):
    shape = "(N*P, C, U, V)" if nd == 2 else "(N*P, C, U, V, W)"
    for name, t in (("patches1", patches1), ("patches2", patches2), ("deltas", deltas)):
        if not isinstance(t, torch.Tensor):
            raise QltyError(f"{name} must be a torch.Tensor, got {describe(t)}")
    if patches1.dim() != nd + 2 or patches2.dim() != nd + 2:
        raise QltyError(
            f"Both patches1 and patches2 must be {nd + 2}D tensors {shape}, "
            f"got shapes {patches1.shape} and {patches2.shape}"
        )
    if patches1.shape != patches2.shape:
        raise QltyError(
            f"patches1 and patches2 must have the same shape, "
            f"got {patches1.shape} and {patches2.shape}"
        )
    if deltas.dim() != 2 or deltas.shape[1] != nd:
        raise QltyError(f"deltas must be 2D tensor of shape (N*P, {nd}), got {deltas.shape}")
    if deltas.shape[0] != patches1.shape[0]:
        raise QltyError(
            f"Number of deltas ({deltas.shape[0]}) must match number of patch pairs "
            f"({patches1.shape[0]})"
        )
    if rotations is not None:
        if not isinstance(rotations, torch.Tensor):
            rotations = torch.as_tensor(rotations)
        if rotations.dim() != 1 or rotations.shape[0] != patches1.shape[0]:
            raise QltyError(
                f"Number of rotations ({rotations.shape[0] if rotations.dim() else rotations.numel()}) "
                f"must match number of patch pairs ({patches1.shape[0]})"
            )
    # deltas.int() truncates towards zero (qlty); axis order (dy, dx) / (dz, dy, dx)
    disp = deltas.to(device=patches1.device).int().long().flip(1)
    return disp, rotations


def extract_overlapping_pixels(
    patches1: torch.Tensor,
    patches2: torch.Tensor,
    deltas: torch.Tensor,
    rotations: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixels the two patches of each pair share, in corresponding order.

    Args:
        patches1: ``(M, C, U, V)``.
        patches2: ``(M, C, U, V)``, patch 2 at ``(y + dy, x + dx)``, possibly rotated.
        deltas: ``(M, 2)`` = ``(dx, dy)``, truncated towards zero.
        rotations: optional ``(M,)`` quarter turns applied to ``patches2`` (undone here).

    Returns:
        ``(o1, o2)``, each ``(K, C)`` with ``K = sum((U - |dy|)+ * (V - |dx|)+)``: pairs in
        order, pixels row-major inside the overlap. Differentiable with respect to both
        patch tensors. One device->host read (``K``) decides the output size.
    """
    disp, rotations = _check_overlap_args(patches1, patches2, deltas, rotations, 2)
    if rotations is not None:
        rotations = rotations.to(device=patches1.device).long().remainder(4)
        u, v = patches1.shape[2:]
        if u != v and bool((rotations % 2 == 1).any()):
            raise QltyError(
                f"rotations contain quarter turns (1 or 3), which need square patches; "
                f"got patches of shape {tuple(patches1.shape)}"
            )
    return _pairs.overlap_pixels(patches1, patches2, disp, rotations)


def extract_patch_pairs_metadata(
    tensor: torch.Tensor,
    window: tuple[int, int],
    num_patches: int,
    delta_range: tuple[float, float],
    random_seed: Optional[int] = None,
    rotation_choices: Optional[Sequence[int]] = None,
    num_workers: Optional[int] = None,
) -> dict:
    """Dry run of :func:`extract_patch_pairs`: locations and per-patch statistics.

    Draws exactly the pairs :func:`extract_patch_pairs` draws for the same arguments and
    seed. Statistics come from summed-area tables of each image (float64, centred), so no
    patch is gathered and memory stays at a few image-sized buffers.

    Args:
        tensor, window, num_patches, delta_range, random_seed, rotation_choices: as for
            :func:`extract_patch_pairs`.
        num_workers: accepted for compatibility and ignored (the work is vectorised).

    Returns:
        dict of ``(N*P,)`` tensors on ``tensor.device``: int64 ``image_idx, patch1_y,
        patch1_x, patch2_y, patch2_x, rotation``; float32 ``dx, dy, mean1, sigma1, mean2,
        sigma2`` (mean and unbiased std over all channels and pixels; patch 2 after
        rotation), and ``"window": (U, V)``.
    """
    del num_workers
    window, image, start, disp, rot, allow = _sample(
        tensor, window, num_patches, delta_range, random_seed, rotation_choices
    )
    (mean1, sigma1), (mean2, sigma2) = _pairs.window_stats(
        tensor, image, [start, start + disp], window, num_patches
    )
    stats = {"mean1": mean1, "sigma1": sigma1, "mean2": mean2, "sigma2": sigma2}
    return {
        "image_idx": image,
        "patch1_y": start[:, 0].contiguous(),
        "patch1_x": start[:, 1].contiguous(),
        "patch2_y": (start[:, 0] + disp[:, 0]).contiguous(),
        "patch2_x": (start[:, 1] + disp[:, 1]).contiguous(),
        "dx": disp[:, 1].to(torch.float32),
        "dy": disp[:, 0].to(torch.float32),
        "rotation": rot,
        **stats,
        "window": window,
    }


def _stratified(means, sigmas, n_bins, samples_per_bin, random_seed, edges_fn):
    for name, t in (("means", means), ("sigmas", sigmas)):
        if not isinstance(t, torch.Tensor):
            raise QltyError(f"{name} must be a torch.Tensor, got {describe(t)}")
    if means.shape != sigmas.shape:
        raise QltyError(
            f"means and sigmas must have the same shape, got {means.shape} and {sigmas.shape}"
        )
    if means.dim() != 1:
        raise QltyError(f"means and sigmas must be 1D tensors, got shape {means.shape}")
    if isinstance(n_bins, bool) or not isinstance(n_bins, int) or n_bins < 1:
        raise QltyError(f"n_bins must be an int >= 1, got {n_bins!r}")
    if isinstance(samples_per_bin, bool) or not isinstance(samples_per_bin, int) or samples_per_bin < 0:
        raise QltyError(f"samples_per_bin must be an int >= 0, got {samples_per_bin!r}")
    dev = means.device
    if means.numel() == 0:
        return torch.empty(0, dtype=torch.long, device=dev)
    bins = []
    ok = torch.ones_like(means, dtype=torch.bool)
    for v in (means, sigmas):
        e = edges_fn(v).to(v.dtype)  # (n_bins + 1,)
        # half-open bins [e_i, e_i+1), the last one closed (qlty)
        b = torch.bucketize(v, e[1:-1].contiguous(), right=True)
        ok &= (v >= e[0]) & (v <= e[-1])
        bins.append(b)
    key = bins[0] * n_bins + bins[1]
    key = torch.where(ok, key, torch.full_like(key, n_bins * n_bins))  # out of every bin
    gen = None
    if random_seed is not None:
        gen = torch.Generator()
        gen.manual_seed(int(random_seed))
    noise = torch.rand(means.shape[0], generator=gen).to(dev)
    order = torch.argsort(noise)  # random order, then stable by bin
    order = order[torch.argsort(key[order], stable=True)]
    k_sorted = key[order]
    first = torch.searchsorted(k_sorted, k_sorted, right=False)
    rank = torch.arange(k_sorted.numel(), device=dev) - first
    keep = (rank < samples_per_bin) & (k_sorted < n_bins * n_bins)
    return order[keep]


def _linear_edges(n_bins):
    def edges(v):
        # qlty's float32 edges exactly (two host reads; not on a hot path)
        lo, hi = v.min().item(), v.max().item()
        if lo == hi:
            lo, hi = lo - 0.5, hi + 0.5
        return torch.linspace(lo, hi, n_bins + 1).to(v.device)
    return edges


def _quantile_edges(n_bins):
    def edges(v):
        q = torch.linspace(0, 1, n_bins + 1, device=v.device, dtype=v.dtype)
        return torch.quantile(v, q)
    return edges


def stratified_sample_by_histogram(
    means: torch.Tensor,
    sigmas: torch.Tensor,
    n_bins: int = 20,
    samples_per_bin: int = 10,
    random_seed: Optional[int] = None,
) -> torch.Tensor:
    """Pick up to ``samples_per_bin`` random members of each cell of an ``n_bins x n_bins``
    linear (mean, sigma) grid.

    Args:
        means, sigmas: 1-D, same shape (e.g. ``metadata["mean1"]``, ``metadata["sigma1"]``).
        n_bins: bins per variable over ``[min, max]`` (+-0.5 when constant); half-open
            bins, the last one closed.
        samples_per_bin: most members taken per cell.
        random_seed: seed of a CPU generator; None uses the global RNG.

    Returns:
        int64 indices, grouped by cell (mean bin outer, sigma bin inner).

    Example:
        >>> m = torch.arange(10.); s = torch.zeros(10)
        >>> stratified_sample_by_histogram(m, s, n_bins=2, samples_per_bin=1, random_seed=0).shape
        torch.Size([2])
    """
    return _stratified(means, sigmas, n_bins, samples_per_bin, random_seed, _linear_edges(n_bins))


def stratified_sample_by_quantiles(
    means: torch.Tensor,
    sigmas: torch.Tensor,
    n_bins: int = 20,
    samples_per_bin: int = 10,
    random_seed: Optional[int] = None,
) -> torch.Tensor:
    """As :func:`stratified_sample_by_histogram` with ``torch.quantile`` bin edges."""
    return _stratified(
        means, sigmas, n_bins, samples_per_bin, random_seed, _quantile_edges(n_bins)
    )


def _selected(metadata, selected_indices, device) -> tuple:
    if not isinstance(metadata, dict) or "window" not in metadata:
        raise QltyError(
            "metadata must contain 'window' key. Use extract_patch_pairs_metadata() to "
            "generate metadata."
        )
    window = tuple(int(w) for w in metadata["window"])
    idx = torch.as_tensor(selected_indices, dtype=torch.int64).reshape(-1).to(device)
    total = int(metadata["image_idx"].shape[0])
    if idx.numel() and bool(((idx < -total) | (idx >= total)).any()):
        bad = idx[(idx < -total) | (idx >= total)][0].item()
        raise QltyIndexError(
            f"selected_indices contains {bad}, outside the {total} pairs of the metadata"
        )
    idx = idx.remainder(max(total, 1))

    def col(k):
        return torch.as_tensor(metadata[k]).to(device)[idx]

    image = col("image_idx").long()
    start1 = torch.stack([col("patch1_y"), col("patch1_x")], 1).long()
    start2 = torch.stack([col("patch2_y"), col("patch2_x")], 1).long()
    deltas = torch.stack([col("dx"), col("dy")], 1).to(torch.float32)
    rot = col("rotation").long().remainder(4)
    return window, image, start1, start2, deltas, rot


def _from_selected(tensor, window, image, start1, start2, rot):
    p1 = _pairs.gather_windows(tensor, image, start1, window)
    if window[0] == window[1]:
        p2 = _pairs.gather_rotated(tensor, image, start2, window, rot)
    elif bool((rot % 2 == 1).any()):
        raise QltyError(f"metadata holds quarter turns, which need a square window, not {window}")
    else:
        p2 = _pairs.gather_rotated(tensor, image, start2, window, rot, (0, 2))
    return p1, p2


def extract_patches_from_metadata(
    tensor: torch.Tensor,
    metadata: dict,
    selected_indices: Union[torch.Tensor, Sequence[int]],
    return_positions: bool = False,
    include_n_position: bool = False,
):
    """Gather the pairs ``selected_indices`` of ``metadata`` from ``tensor``.

    Returns:
        The 4- or 6-tuple of :func:`extract_patch_pairs` for the selected pairs.

    Raises:
        QltyError: ``metadata`` without ``"window"``; an ``IndexError`` subclass for an
            index outside the metadata.
    """
    if not isinstance(tensor, torch.Tensor) or tensor.dim() != 4:
        raise QltyError(f"tensor must be a 4D tensor (N, C, Y, X), got {describe(tensor)}")
    window, image, start1, start2, deltas, rot = _selected(metadata, selected_indices, tensor.device)
    p1, p2 = _from_selected(tensor, window, image, start1, start2, rot)
    if return_positions:
        return (p1, p2, deltas, rot, _positions(image, start1, include_n_position),
                _positions(image, start2, include_n_position))
    return p1, p2, deltas, rot


def extract_patches_to_zarr(
    tensor: torch.Tensor,
    metadata: dict,
    selected_indices: Union[torch.Tensor, Sequence[int]],
    zarr_path,
    zarr_chunks: Optional[tuple[int, ...]] = None,
    store_positions: bool = False,
    include_n_position: bool = False,
):
    """Write the selected pairs to a Zarr group (arrays ``patches1, patches2, deltas,
    rotations[, positions1, positions2]``; attributes ``window, num_patches, num_channels,
    patch_shape``).

    Pairs are gathered and written a block of whole chunks at a time. The attributes are
    written last, so a group without them is an unfinished export.

    Args:
        tensor: the images the metadata was drawn from, ``(N, C, Y, X)``.
        metadata: from :func:`extract_patch_pairs_metadata`.
        selected_indices: pairs to export.
        zarr_path: a path (opened with mode ``"w"``) or an open ``zarr.Group``.
        zarr_chunks: chunks of the patch arrays (default ``(1, C, U, V)``); the other arrays
            use ``zarr_chunks[0]`` pairs per chunk.
        store_positions, include_n_position: also store the positions.

    Returns:
        The ``zarr.Group``.
    """
    import zarr

    if not isinstance(tensor, torch.Tensor) or tensor.dim() != 4:
        raise QltyError(f"tensor must be a 4D tensor (N, C, Y, X), got {describe(tensor)}")
    window, image, start1, start2, deltas, rot = _selected(metadata, selected_indices, tensor.device)
    u, v = window
    c = tensor.shape[1]
    k = image.shape[0]
    if isinstance(zarr_path, (str, os.PathLike)):
        group = zarr.open_group(str(zarr_path), mode="w")
    else:
        group = zarr_path
    if zarr_chunks is None:
        patch_chunks = (1, c, u, v)
    else:
        patch_chunks = tuple(int(x) for x in zarr_chunks)
        if len(patch_chunks) != 4 or min(patch_chunks) < 1:
            raise QltyError(f"zarr_chunks must be 4 ints >= 1 (k, C, U, V), got {zarr_chunks!r}")
    pc = patch_chunks[0]
    pos_dim = 3 if include_n_position else 2
    np_dtype = torch.empty(0, dtype=tensor.dtype).numpy().dtype
    arrays = {
        "patches1": ((k, c, u, v), patch_chunks, np_dtype),
        "patches2": ((k, c, u, v), patch_chunks, np_dtype),
        "deltas": ((k, 2), (pc, 2), "float32"),
        "rotations": ((k,), (pc,), "int64"),
    }
    if store_positions:
        arrays["positions1"] = ((k, pos_dim), (pc, pos_dim), "int64")
        arrays["positions2"] = ((k, pos_dim), (pc, pos_dim), "int64")
    out = {name: group.create_array(name, shape=s, chunks=ch, dtype=dt, overwrite=True)
           for name, (s, ch, dt) in arrays.items()}
    block = max(pc, (_STAT_CHUNK // pc) * pc)
    for i in range(0, k, block):
        sl = slice(i, min(k, i + block))
        p1, p2 = _from_selected(tensor, window, image[sl], start1[sl], start2[sl], rot[sl])
        out["patches1"][sl] = p1.detach().cpu().numpy()
        out["patches2"][sl] = p2.detach().cpu().numpy()
        out["deltas"][sl] = deltas[sl].cpu().numpy()
        out["rotations"][sl] = rot[sl].cpu().numpy()
        if store_positions:
            out["positions1"][sl] = _positions(image[sl], start1[sl], include_n_position).cpu().numpy()
            out["positions2"][sl] = _positions(image[sl], start2[sl], include_n_position).cpu().numpy()
    group.attrs.update(
        {"window": window, "num_patches": k, "num_channels": c, "patch_shape": (u, v)}
    )
    return group


class ZarrPatchPairDataset(torch.utils.data.Dataset):
    """Map-style dataset over a group written by :func:`extract_patches_to_zarr`.

    ``dataset[i]`` is ``(patch1 (C, U, V), patch2, delta (2,), rotation int64 scalar)`` plus
    ``(position1, position2)`` when the group stores positions. ``transform(p1, p2, delta,
    rotation)`` is applied if given (returned positions are ignored, as in qlty).

    Args:
        zarr_path: a path (opened read-only) or an open ``zarr.Group``.
        transform: optional callable.
    """

    def __init__(self, zarr_path, transform=None):
        import zarr

        if isinstance(zarr_path, (str, os.PathLike)):
            self.zarr_group = zarr.open_group(str(zarr_path), mode="r")
        else:
            self.zarr_group = zarr_path
        missing = [k for k in ("patches1", "patches2", "deltas", "rotations")
                   if k not in self.zarr_group]
        if missing:
            raise QltyError(
                f"zarr_path {zarr_path!r} is not a patch-pair group: missing arrays {missing} "
                f"(write it with extract_patches_to_zarr)"
            )
        self.patches1 = self.zarr_group["patches1"]
        self.patches2 = self.zarr_group["patches2"]
        self.deltas = self.zarr_group["deltas"]
        self.rotations = self.zarr_group["rotations"]
        self.has_positions = "positions1" in self.zarr_group and "positions2" in self.zarr_group
        if self.has_positions:
            self.positions1 = self.zarr_group["positions1"]
            self.positions2 = self.zarr_group["positions2"]
        self.transform = transform

    def __len__(self) -> int:
        return int(self.patches1.shape[0])

    def __getitem__(self, idx: int):
        p1 = torch.from_numpy(self.patches1[idx])
        p2 = torch.from_numpy(self.patches2[idx])
        delta = torch.from_numpy(self.deltas[idx])
        rotation = torch.tensor(self.rotations[idx], dtype=torch.int64)
        if self.transform is not None:
            res = self.transform(p1, p2, delta, rotation)
            p1, p2, delta, rotation = res[:4]
        if self.has_positions:
            return (p1, p2, delta, rotation, torch.from_numpy(self.positions1[idx]),
                    torch.from_numpy(self.positions2[idx]))
        return p1, p2, delta, rotation


def _sample_displacement_vector(
    low: float,
    high: float,
    generator: Optional[torch.Generator] = None,
    device: Optional[torch.device] = None,
) -> tuple[int, int]:
    """qlty's per-vector sampler ``(dx, dy)`` (compatibility; the extractors draw every pair
    at once from the annulus lattice and do not call this)."""
    return _pairs.sample_displacement_scalar(2, low, high, generator, device)
