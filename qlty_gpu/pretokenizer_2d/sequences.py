"""Split patches into token sequences and match the tokens of a displaced, rotated pair.

Tokens are the windows of the quilt grid ``QuiltPlan((H, W), ps, stride)`` (last token
clamped to the edge, row-major order), gathered with :func:`qlty_gpu.ops.unstitch`.

**Rotation convention.** ``rot_k90 = k`` means ``patch2 = torch.rot90(P, k, dims=(-2, -1))``
(counter-clockwise), where ``P`` is the window displaced by ``(dx, dy)`` from ``patch1`` --
exactly what :func:`qlty_gpu.extract_patch_pairs` returns, so its ``deltas`` and
``rotations`` can be passed straight in. qlty 1.5.0 maps k=1 and k=3 the other way round
(its [BUG], spec §2.12); ``rotation_convention="qlty"`` reproduces that.

**Overlap rule** (qlty's): token ``i`` of patch 1 is mapped into patch 2's frame (shift by
``(dx, dy)``, then rotate), and matched with the token ``j`` of patch 2 whose box overlaps
the mapped box most (first one on ties); ``overlap_fractions[i]`` is that area over
``ps**2``. Tokens lie on a regular grid, so the area is a product of per-axis overlaps and
the best ``j`` is the per-axis nearest token start (a ``searchsorted`` per axis): ``O(T log n)``
tensor work per pair, vectorised over the batch (qlty: ``O(T**2)`` Python per pair, or
numba on the CPU).

``HAS_NUMBA`` is kept for compatibility (qlty's tests toggle it); nothing here uses numba.
"""

from __future__ import annotations

from typing import Union

import torch

from ..errors import QltyError, describe
from ..geometry import QuiltPlan, plan_for
from ..ops import unstitch

try:  # compatibility flag only (qlty's tests reload this module with numba hidden)
    import numba  # noqa: F401

    HAS_NUMBA = True
except ImportError:
    HAS_NUMBA = False

__all__ = ["tokenize_patch", "build_sequence_pair", "ROTATION_CONVENTIONS"]

ROTATION_CONVENTIONS = ("torch", "qlty")

Number = Union[int, float]


def _check_token_args(patch_size, stride, h: int, w: int) -> int:
    if isinstance(patch_size, bool) or not isinstance(patch_size, int):
        raise QltyError(f"patch_size must be an int, got {patch_size!r}")
    if patch_size <= 0:
        raise QltyError(f"patch_size must be positive, got {patch_size}")
    if stride is None:
        stride = patch_size // 2
    if isinstance(stride, bool) or not isinstance(stride, int):
        raise QltyError(f"stride must be an int or None, got {stride!r}")
    if stride <= 0:
        raise QltyError(f"stride must be positive, got {stride} (patch_size={patch_size})")
    if stride > patch_size:
        raise QltyError(f"stride ({stride}) must be <= patch_size ({patch_size})")
    if patch_size > h or patch_size > w:
        raise QltyError(f"patch_size ({patch_size}) must be <= patch dimensions ({h}, {w})")
    return stride


def _tokens(p: torch.Tensor, plan: QuiltPlan) -> torch.Tensor:
    """``unstitch`` of the token grid. On the CPU with the op's ``torch`` backend: tokens are
    tiny windows (rows of ``ps`` elements), which that backend copies as one strided view
    per edge block, about 2x faster than the numba kernel's per-row copies; and it starts no
    numba/OpenMP parallel region, whose spinning worker threads measured 6 ms -> 25-85 ms
    per 64-pair call on a loaded 2-core machine. Same values either way (a copy)."""
    backend = "torch" if p.device.type == "cpu" else None
    return unstitch(p, plan.window, plan.step, backend=backend)


def _plan(h: int, w: int, patch_size: int, stride: int) -> QuiltPlan:
    """The token grid (cached, so its origins table is built once per geometry and device)."""
    return plan_for((h, w), (patch_size, patch_size), (stride, stride))


def tokenize_patch(
    patch: torch.Tensor, patch_size: int, stride: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Split one patch into square tokens.

    Args:
        patch: ``(C, H, W)``.
        patch_size: token size ``ps`` (``1 <= ps <= min(H, W)``).
        stride: token step, default ``ps // 2`` (must be ``1 <= stride <= ps``).

    Returns:
        ``tokens (T, C*ps*ps)`` in the patch dtype (each token flattened as (C, y, x)) and
        ``coords`` int64 ``(T, 2)`` = top-left ``(y, x)``, row-major.

    Example:
        >>> t, c = tokenize_patch(torch.arange(16.).reshape(1, 4, 4), 2, 2)
        >>> c.tolist()
        [[0, 0], [0, 2], [2, 0], [2, 2]]
        >>> t[1].tolist()
        [2.0, 3.0, 6.0, 7.0]
    """
    if not isinstance(patch, torch.Tensor) or patch.dim() != 3:
        shape = patch.shape if isinstance(patch, torch.Tensor) else describe(patch)
        raise QltyError(f"patch must be 3D (C, H, W), got shape {shape}")
    c, h, w = patch.shape
    stride = _check_token_args(patch_size, stride, h, w)
    plan = _plan(h, w, patch_size, stride)
    tokens = _tokens(patch[None], plan)
    return tokens.reshape(plan.patches_per_image, c * patch_size * patch_size), plan.origins(
        patch.device
    ).clone()


def _batch_values(value, n: int, dtype, device, name: str) -> torch.Tensor:
    if isinstance(value, torch.Tensor) or hasattr(value, "__array__"):
        t = torch.as_tensor(value).to(device)
        if t.dim() == 0:
            return t.to(dtype).expand(n).clone()
        if t.dim() != 1 or t.shape[0] != n:
            raise QltyError(f"{name} must have shape ({n},) or be scalar, got {tuple(t.shape)}")
        return t.to(dtype)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise QltyError(f"{name} must have shape ({n},) or be scalar, got {describe(value)}")
    return torch.full((n,), value, dtype=dtype, device=device)


def _best_axis(lo: torch.Tensor, starts: tuple[int, ...], ps: int) -> tuple:
    """Per box ``[lo, lo + ps)`` (any shape): the largest overlap with a token
    ``[s, s + ps)`` along one axis, ``max(0, ps - |lo - s|)``, and the first token index
    reaching it. Starts are sorted, so the nearest start is a neighbour of ``lo``."""
    s = torch.tensor(starts, dtype=lo.dtype, device=lo.device)
    n = s.numel()
    i = torch.searchsorted(s, lo.contiguous())  # first start >= lo
    below = (i - 1).clamp(min=0)
    above = i.clamp(max=n - 1)
    d_below = (lo - s[below]).abs()
    d_above = (s[above] - lo).abs()
    j = torch.where(d_above < d_below, above, below)  # ties: the lower index
    return (ps - torch.minimum(d_below, d_above)).clamp_(min=0), j


def _match_tokens(coords, plan, dx, dy, k, ps, h, w):
    """Vectorised overlap rule for ``N`` pairs; returns the five ``(N, T)`` tensors."""
    dev = coords.device
    t = coords.shape[0]
    y1 = coords[:, 0].to(torch.float64)[None, :] - dy[:, None]  # (N, T) unrotated frame
    x1 = coords[:, 1].to(torch.float64)[None, :] - dx[:, None]
    # lower corner of the box after patch2 = rot90(P, k): (y, x) -> k1: (W - x, y),
    # k2: (H - y, W - x), k3: (x, H - y); boxes keep the side ps. As a table per k:
    # corner = a * y1 + b * x1 + c
    coef = torch.tensor(
        [[1, 0, 0, 0, 1, 0], [0, -1, w - ps, 1, 0, 0],
         [-1, 0, h - ps, 0, -1, w - ps], [0, 1, 0, -1, 0, h - ps]],
        dtype=torch.float64, device=dev,
    )[k]  # (N, 6)
    by = coef[:, 0:1] * y1 + coef[:, 1:2] * x1 + coef[:, 2:3]
    bx = coef[:, 3:4] * y1 + coef[:, 4:5] * x1 + coef[:, 5:6]
    oy, jy = _best_axis(by, plan.starts[0], ps)
    ox, jx = _best_axis(bx, plan.starts[1], ps)
    frac = oy * ox / float(ps * ps)
    mask1 = frac > 0
    j = jy * len(plan.starts[1]) + jx
    idx12 = torch.where(mask1, j, -1)
    n = dx.shape[0]
    src = torch.arange(t, device=dev).expand(n, t)
    rev = torch.full((n, t + 1), t, dtype=torch.int64, device=dev)
    rev.scatter_reduce_(1, torch.where(mask1, j, t), src, reduce="amin")
    rev = rev[:, :t]
    mask2 = rev < t
    idx21 = torch.where(mask2, rev, -1)
    return mask1, idx12, mask2, idx21, torch.where(mask1, frac, 0.0).to(torch.float32)


def _pairs_padded(mask1: torch.Tensor, idx12: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(N, max_pairs, 2)`` of ``(i, idx12[i])`` for masked ``i``, padded with -1; counts."""
    n, t = mask1.shape
    counts = mask1.sum(dim=1)
    max_pairs = int(counts.max()) if n else 0  # one device->host read: the output size
    out = torch.full((n, max_pairs, 2), -1, dtype=torch.int64, device=mask1.device)
    if max_pairs:
        rows, cols = mask1.nonzero(as_tuple=True)
        slot = (mask1.cumsum(dim=1) - 1)[rows, cols]
        out[rows, slot] = torch.stack([cols, idx12[rows, cols]], dim=1)
    return out, counts


def build_sequence_pair(
    patch1: torch.Tensor,
    patch2: torch.Tensor,
    dx,
    dy,
    rot_k90,
    patch_size: int,
    stride: int | None = None,
    *,
    rotation_convention: str = "torch",
) -> dict:
    """Tokenize a patch pair (or a batch of pairs) and match overlapping tokens.

    Args:
        patch1: ``(C, H, W)`` or ``(N, C, H, W)``.
        patch2: same shape; the window displaced by ``(dx, dy)`` from patch 1, rotated by
            ``torch.rot90(., rot_k90, dims=(-2, -1))``.
        dx, dy: displacement (scalars, or ``(N,)`` tensors / arrays in batch mode);
            fractional values give fractional overlap areas.
        rot_k90: quarter turns (scalar or ``(N,)``).
        patch_size: token size ``ps``.
        stride: token step (default ``ps // 2``).
        rotation_convention: ``"torch"`` (default, consistent with ``torch.rot90`` and
            :func:`qlty_gpu.extract_patch_pairs`) or ``"qlty"`` (qlty 1.5.0's k=1/k=3 swap).

    Returns:
        Single pair: ``tokens1, tokens2 (T, D)``, ``coords1, coords2`` int64 ``(T, 2)``,
        ``overlap_mask1, overlap_mask2`` bool ``(T,)``, ``overlap_indices1_to_2,
        overlap_indices2_to_1`` int64 ``(T,)`` (-1: none; the reverse map keeps the first
        ``i``), ``overlap_fractions`` float32 ``(T,)``, ``overlap_pairs`` int64
        ``(n_pairs, 2)``. Batch: the same with a leading ``N`` (coords are expanded views),
        ``overlap_pairs (N, max_pairs, 2)`` padded with -1, plus ``sequence_lengths`` and
        ``overlap_pair_counts`` ``(N,)``.

    Example:
        >>> p = torch.arange(64.).reshape(1, 8, 8)
        >>> out = build_sequence_pair(p[:, :4, :4], p[:, :4, 2:6], 2, 0, 0, patch_size=2, stride=2)
        >>> out["overlap_pairs"].tolist()
        [[1, 0], [3, 2]]
    """
    if rotation_convention not in ROTATION_CONVENTIONS:
        raise QltyError(
            f"rotation_convention must be one of {ROTATION_CONVENTIONS}, got {rotation_convention!r}"
        )
    for name, p in (("patch1", patch1), ("patch2", patch2)):
        if not isinstance(p, torch.Tensor):
            raise QltyError(f"{name} must be a torch.Tensor, got {describe(p)}")
    batched = patch1.dim() == 4 and patch2.dim() == 4
    if not batched and not (patch1.dim() == 3 and patch2.dim() == 3):
        raise QltyError(
            f"Both patches must be 3D (C, H, W) or 4D (N, C, H, W), "
            f"got shapes {patch1.shape} and {patch2.shape}"
        )
    if batched and patch1.shape[0] != patch2.shape[0]:
        raise QltyError(
            f"Batch sizes must match: patch1 has {patch1.shape[0]} patches, "
            f"patch2 has {patch2.shape[0]}"
        )
    if patch1.shape != patch2.shape:
        raise QltyError(f"Patches must have same shape, got {patch1.shape} and {patch2.shape}")
    p1 = patch1 if batched else patch1[None]
    p2 = patch2 if batched else patch2[None]
    n, c, h, w = p1.shape
    stride = _check_token_args(patch_size, stride, h, w)
    dev = p1.device
    # qlty converts batch values to float32 first; single values stay Python floats
    fdt = torch.float32 if batched else torch.float64
    dxt = _batch_values(dx, n, fdt, dev, "dx").to(torch.float64)
    dyt = _batch_values(dy, n, fdt, dev, "dy").to(torch.float64)
    kt = _batch_values(rot_k90, n, torch.int64, dev, "rot_k90").remainder(4)
    if rotation_convention == "qlty":
        kt = (4 - kt).remainder(4)
    plan = _plan(h, w, patch_size, stride)
    t = plan.patches_per_image
    d = c * patch_size * patch_size
    tok1 = _tokens(p1, plan).reshape(n, t, d)
    tok2 = _tokens(p2, plan).reshape(n, t, d)
    coords = plan.origins(dev).clone()  # the plan caches its table: hand out a copy
    mask1, idx12, mask2, idx21, frac = _match_tokens(coords, plan, dxt, dyt, kt, patch_size, h, w)
    pairs, counts = _pairs_padded(mask1, idx12)
    if not batched:
        return {
            "tokens1": tok1[0],
            "tokens2": tok2[0],
            "coords1": coords.clone(),
            "coords2": coords.clone(),
            "overlap_mask1": mask1[0],
            "overlap_mask2": mask2[0],
            "overlap_indices1_to_2": idx12[0],
            "overlap_indices2_to_1": idx21[0],
            "overlap_fractions": frac[0],
            "overlap_pairs": pairs[0],
        }
    coords_b = coords.unsqueeze(0).expand(n, -1, -1)
    return {
        "tokens1": tok1,
        "tokens2": tok2,
        "coords1": coords_b,
        "coords2": coords_b,
        "overlap_mask1": mask1,
        "overlap_mask2": mask2,
        "overlap_indices1_to_2": idx12,
        "overlap_indices2_to_1": idx21,
        "overlap_fractions": frac,
        "overlap_pairs": pairs,
        "sequence_lengths": torch.full((n,), t, dtype=torch.int64, device=dev),
        "overlap_pair_counts": counts,
    }
