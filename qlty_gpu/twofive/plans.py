"""Extraction and stitching plans of the 2.5D quilt (data only, JSON-serialisable).

Same dataclasses, fields and serialised form as qlty 1.5.0 (spec §2.7). Patch starts come
from :class:`qlty_gpu.geometry.QuiltPlan`; colour groups are checked to hold no two
overlapping patches (qlty's ``create_non_overlapping_colored_plan`` can put the clamped last
patch next to an overlapping one).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from ..geometry import QuiltPlan

__all__ = ["PatchExtraction", "ExtractionPlan", "StitchingPlan", "safe_colour_mod", "grid_2d"]


@dataclass
class PatchExtraction:
    """One patch of an :class:`ExtractionPlan` (``y_start`` None: the whole image)."""

    patch_idx: int
    n: int
    z0: int
    y_start: Optional[int] = None
    y_stop: Optional[int] = None
    x_start: Optional[int] = None
    x_stop: Optional[int] = None
    color_y_idx: int = 0
    color_x_idx: int = 0
    required_z_indices: list[int] = field(default_factory=list)


_FIELDS = ("patch_idx", "n", "z0", "y_start", "y_stop", "x_start", "x_stop", "color_y_idx",
           "color_x_idx", "required_z_indices")


def _colour_key(k: str) -> tuple[int, int]:
    a, b = k.split(",")
    return (int(a), int(b))


@dataclass
class ExtractionPlan:
    """Patches to extract, grouped by colour ``(cy, cx)`` -> list of ``patch_idx``."""

    patches: list[PatchExtraction]
    color_groups: dict[tuple[int, int], list[int]]
    total_patches: int

    def get_patches_for_color(self, color_y: int, color_x: int) -> list[PatchExtraction]:
        """Patches of one colour group (``[]`` when there are none)."""
        return [self.patches[i] for i in self.color_groups.get((color_y, color_x), [])]

    def serialize(self) -> dict:
        """``{"patches": [...], "color_groups": {"cy,cx": [...]}, "total_patches": int}``."""
        return {
            "patches": [{f: getattr(p, f) for f in _FIELDS} for p in self.patches],
            "color_groups": {f"{k[0]},{k[1]}": list(v) for k, v in self.color_groups.items()},
            "total_patches": self.total_patches,
        }

    @classmethod
    def deserialize(cls, data: dict) -> ExtractionPlan:
        """Inverse of :meth:`serialize`."""
        patches = [
            PatchExtraction(**{f: p.get(f, [] if f == "required_z_indices" else None)
                               for f in _FIELDS})
            for p in data["patches"]
        ]
        for p in patches:
            p.color_y_idx = p.color_y_idx or 0
            p.color_x_idx = p.color_x_idx or 0
        groups = {_colour_key(k): list(v) for k, v in data["color_groups"].items()}
        return cls(patches=patches, color_groups=groups, total_patches=data["total_patches"])


@dataclass
class StitchingPlan:
    """Where each patch goes: ``patch_idx -> {n, y_start, y_stop, x_start, x_stop, z_idx}``."""

    output_shape: tuple[int, ...]
    patch_mappings: dict[int, dict]
    color_groups: dict[tuple[int, int], list[int]]

    def get_stitch_order(self, color_y: int, color_x: int) -> list[int]:
        """Patch indices of one colour group (``[]`` when there are none)."""
        return self.color_groups.get((color_y, color_x), [])

    def serialize(self) -> dict:
        """JSON-ready dict (a JSON round trip turns ``patch_mappings`` keys into strings)."""
        return {
            "output_shape": list(self.output_shape),
            "patch_mappings": self.patch_mappings,
            "color_groups": {f"{k[0]},{k[1]}": list(v) for k, v in self.color_groups.items()},
        }

    @classmethod
    def deserialize(cls, data: dict) -> StitchingPlan:
        """Inverse of :meth:`serialize` (string ``patch_mappings`` keys become ints again)."""
        mappings = {
            (int(k) if isinstance(k, str) and k.lstrip("-").isdigit() else k): v
            for k, v in data["patch_mappings"].items()
        }
        groups = {_colour_key(k): list(v) for k, v in data["color_groups"].items()}
        return cls(output_shape=tuple(data["output_shape"]), patch_mappings=mappings,
                   color_groups=groups)


def grid_2d(Y: int, X: int, window, step) -> QuiltPlan:
    """The 2-D patch grid (validated, clamped last start) from the one geometry."""
    return QuiltPlan((Y, X), tuple(window), tuple(step))


def safe_colour_mod(starts: tuple[int, ...], window: int, start_mod: int) -> int:
    """Smallest colour modulus ``>= start_mod`` whose groups hold no overlapping patches.

    ``start_mod`` is qlty's ``ceil(window / step)``; it only grows when the clamped last
    patch would overlap another of its colour.

    Example:
        >>> safe_colour_mod((0, 2, 4, 6, 7), 4, 2)  # Y=11, w=4, s=2: qlty's 2 puts 4 and 7 together
        3
    """
    m = max(1, start_mod)
    while m < len(starts):
        if all(starts[i + m] - starts[i] >= window for i in range(len(starts) - m)):
            return m
        m += 1
    return max(1, min(m, len(starts)))
