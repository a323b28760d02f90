"""Small helpers of the 2.5D streaming path (buffers, progress, sink bookkeeping)."""

from __future__ import annotations

import torch

from .._alloc import empty_cpu


def _runs(values: list[int]) -> list[tuple[int, int]]:
    """Sorted distinct ints -> ``[(start, stop), ...]`` of consecutive runs."""
    runs: list[tuple[int, int]] = []
    for v in values:
        if runs and runs[-1][1] == v:
            runs[-1] = (runs[-1][0], v + 1)
        else:
            runs.append((v, v + 1))
    return runs


def _empty(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Output buffer: pooled huge-page memory for large CPU tensors (no page-fault storm)."""
    if device.type == "cpu":
        return empty_cpu(tuple(shape), dtype)
    return torch.empty(shape, dtype=dtype, device=device)


def _progress(total: int, enabled: bool):
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc="2.5D convert", unit="slice")


def _set_attr(attrs, key, value) -> None:
    if attrs is None:
        return
    try:
        attrs[key] = value
    except Exception:  # read-only or attribute-less sinks: nothing to mark
        pass


def _contiguous(pos: list[int]) -> bool:
    return pos == list(range(pos[0], pos[0] + len(pos)))


def _runs_of_positions(pos: list[int]) -> list[tuple[int, int]]:
    return _runs(sorted(pos))
