"""The tests' one N-d loop oracle of unstitch / stitch (independent of production code).

Starts follow qlty's rule (regular steps, the last patch clamped to the image edge);
patches are cut and summed with plain Python loops in float64. 1 to 3 spatial dims.
"""

from __future__ import annotations

import itertools
import math

import torch


def starts(size: int, window: int, step: int) -> list[int]:
    """Patch starts along one axis (last one clamped).

    >>> starts(10, 4, 3), starts(5, 5, 2)
    ([0, 3, 6], [0])
    """
    return [min(i * step, size - window) for i in range(math.ceil((size - window) / step) + 1)]


def origins(shape, window, step) -> list[tuple[int, ...]]:
    """Patch origins of one image in patch order (z, then y, then x)."""
    return list(itertools.product(*[starts(d, w, s) for d, w, s in zip(shape, window, step)]))


def window_slices(origin, window) -> tuple[slice, ...]:
    return tuple(slice(o, o + w) for o, w in zip(origin, window))


def weight_map(window, border=None, border_weight: float = 1.0) -> torch.Tensor:
    """float64 window-shaped map: 1 inside, ``border_weight`` in a border of ``border``."""
    w = torch.ones(tuple(window), dtype=torch.float64)
    if border is not None and any(border):
        w[:] = max(border_weight, 1e-8)
        w[tuple(slice(b, k - b) if b > 0 else slice(None) for b, k in zip(border, window))] = 1
    return w


def unstitch(x: torch.Tensor, window, step) -> tuple[torch.Tensor, torch.Tensor]:
    """``(N, C, *S)`` -> (patches ``(N*P, C, *window)`` in x's dtype, positions ``(N*P,
    1 + ndim)`` int64 rows ``(n, *origin)``)."""
    out, pos = [], []
    for n in range(x.shape[0]):
        for o in origins(x.shape[2:], window, step):
            out.append(x[(n, slice(None), *window_slices(o, window))])
            pos.append((n, *o))
    return torch.stack(out), torch.tensor(pos, dtype=torch.int64)


def stitch(p: torch.Tensor, shape, step, weight=None, normalise: bool = True
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 (``sum_p scatter(p * W) / norm`` (or the plain sum), ``norm`` = sum of W)."""
    window = tuple(p.shape[2:])
    grid = origins(shape, window, step)
    n_img = p.shape[0] // len(grid)
    w = torch.ones(window, dtype=torch.float64) if weight is None else weight.double()
    acc = torch.zeros((n_img, p.shape[1], *shape), dtype=torch.float64)
    norm = torch.zeros(tuple(shape), dtype=torch.float64)
    for n in range(n_img):
        for i, o in enumerate(grid):
            acc[(n, slice(None), *window_slices(o, window))] += p[n * len(grid) + i].double() * w
            if n == 0:
                norm[window_slices(o, window)] += w
    return (acc / norm if normalise else acc), norm
