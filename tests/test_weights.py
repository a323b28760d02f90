"""Weight schemes: formulas, exact weight sums over boxes, errors, quilt.stitch(weight=...)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from qlty_gpu import NCYXQuilt, NCZYXQuilt, QltyError
from qlty_gpu.geometry import QuiltPlan
from qlty_gpu.ops import stitch_reference, unstitch_reference
from qlty_gpu.weights import gaussian_1d, hann_1d, resolve_weight

GEOMS = [
    ((10, 9), (4, 3), (2, 2)),
    ((17, 5), (17, 1), (3, 1)),  # window == image on Y, window 1 on X
    ((13, 11, 7), (5, 4, 3), (3, 2, 2)),
    ((6, 7, 8), (1, 7, 3), (1, 2, 5)),  # window 1, window == image, step > window
]


def _oracle_norm(w: torch.Tensor, plan: QuiltPlan) -> torch.Tensor:
    """Weight sum by stitching the tiled map with the pure-torch reference."""
    tiled = w.to(torch.float64).expand(plan.patches_per_image, 1, *plan.window).contiguous()
    return stitch_reference(tiled, list(plan.shape), list(plan.step))[0, 0]


def test_gaussian_formula_and_monai():
    w = (9, 16, 5)
    sigma = 0.2
    got = resolve_weight("gaussian", w, sigma=sigma).tensor(dtype=torch.float64)
    ref = torch.ones(w, dtype=torch.float64)
    for ax, n in enumerate(w):
        i = torch.arange(n, dtype=torch.float64) - (n - 1) / 2
        g = torch.clamp(torch.exp(-(i**2) / (2 * (sigma * n) ** 2)), min=1e-3)
        shape = [1, 1, 1]
        shape[ax] = n
        ref = ref * g.reshape(shape)
    torch.testing.assert_close(got, ref)
    # MONAI's map agrees wherever its clamp is inactive
    from monai.data.utils import compute_importance_map

    monai = compute_importance_map(w, mode="gaussian", sigma_scale=sigma).double()
    keep = monai > 1e-3 * 1.0001
    torch.testing.assert_close(got[keep], monai[keep], rtol=1e-6, atol=0)


def test_gaussian_corners_never_underflow():
    w = resolve_weight("gaussian", (64, 64, 64), sigma=0.01).tensor()
    assert float(w.min()) == pytest.approx(1e-9, rel=1e-4)
    assert float(gaussian_1d(1, 0.125)[0]) == 1.0


def test_hann_formula():
    for n in (1, 2, 3, 8, 33):
        h = hann_1d(n)
        ref = np.array([math.sin(math.pi * (i + 1) / (n + 1)) ** 2 for i in range(n)])
        np.testing.assert_allclose(h, ref, rtol=1e-15)
        assert (h > 0).all()
        np.testing.assert_allclose(h, np.hanning(n + 2)[1:-1], atol=1e-15)
    w = resolve_weight("hann", (4, 6)).tensor(dtype=torch.float64)
    torch.testing.assert_close(w, torch.outer(torch.tensor(hann_1d(4)), torch.tensor(hann_1d(6))))


def test_border_equals_plan_weight():
    for shape, window, step in GEOMS:
        nd = len(shape)
        plan = QuiltPlan(shape, window, step, border=(1,) * nd, border_weight=0.25)
        got = resolve_weight("border", window, border=1, border_weight=0.25).tensor()
        assert torch.equal(got, plan.weight())
    assert torch.equal(resolve_weight("border", (4, 4)).tensor(), torch.ones(4, 4))


@pytest.mark.parametrize("scheme", ["constant", "border", "gaussian", "hann", "tensor"])
@pytest.mark.parametrize("geom", GEOMS)
def test_norm_matches_oracle_on_boxes(scheme, geom):
    shape, window, step = geom
    plan = QuiltPlan(shape, window, step)
    spec = torch.rand(window, generator=torch.Generator().manual_seed(1)) + 0.1
    ww = resolve_weight(spec if scheme == "tensor" else scheme, window, border=1,
                        border_weight=0.3)
    ref = _oracle_norm(ww.tensor(dtype=torch.float64), plan)
    torch.testing.assert_close(ww.norm(plan, dtype=torch.float64), ref)
    rng = np.random.default_rng(0)
    for _ in range(4):
        box = []
        for d in shape:
            lo = int(rng.integers(0, d))
            box.append((lo, int(rng.integers(lo + 1, d + 1))))
        got = ww.norm(plan, box, dtype=torch.float64)
        torch.testing.assert_close(got, ref[tuple(slice(lo, hi) for lo, hi in box)])


def test_weight_errors():
    with pytest.raises(QltyError, match="weight must be one of"):
        resolve_weight("triangle", (4, 4))
    with pytest.raises(QltyError, match="window shape"):
        resolve_weight(torch.ones(3, 4), (4, 4))
    with pytest.raises(QltyError, match=">= 0"):
        resolve_weight(-torch.ones(4, 4), (4, 4))
    with pytest.raises(QltyError, match="zero everywhere"):
        resolve_weight(torch.zeros(4, 4), (4, 4))
    with pytest.raises(QltyError, match="sigma"):
        resolve_weight("gaussian", (4, 4), sigma=0)
    with pytest.raises(QltyError, match="border_weight"):
        resolve_weight("border", (4, 4), border=1, border_weight=2.0)
    with pytest.raises(QltyError, match="weight must be one of"):
        resolve_weight(3, (4, 4))


@pytest.mark.parametrize("scheme", ["constant", "border", "gaussian", "hann", "tensor"])
def test_quilt_stitch_weight_keyword(scheme):
    for quilt, shape in (
        (NCYXQuilt(Y=23, X=18, window=(8, 6), step=(5, 4), border=(1, 2), border_weight=0.2),
         (2, 3, 23, 18)),
        (NCZYXQuilt(Z=9, Y=11, X=10, window=(4, 5, 3), step=(3, 3, 2), border=1), (1, 2, 9, 11, 10)),
    ):
        x = torch.randn(shape, dtype=torch.float64)
        p = quilt.unstitch(x)
        spec = torch.rand(quilt.window, dtype=torch.float64) + 0.5 if scheme == "tensor" else scheme
        res, norma = quilt.stitch(p, weight=spec)
        torch.testing.assert_close(res, x)  # any positive weight averages copies back exactly
        w = resolve_weight(spec, quilt.window, border=quilt.border,
                           border_weight=quilt.border_weight).tensor(dtype=torch.float64)
        torch.testing.assert_close(norma, _oracle_norm(w, quilt.plan))
        # and a non-trivial patch stack against the reference ops
        q = torch.randn_like(p)
        ref = stitch_reference(q, list(quilt.plan.shape), list(quilt.step), weight=w)
        torch.testing.assert_close(quilt.stitch(q, weight=spec)[0], ref / norma)
    if scheme == "border":  # the default stitch is qlty's border frame
        a = quilt.stitch(q)[0]
        torch.testing.assert_close(a, quilt.stitch(q, weight="border")[0])


def test_unstitch_reference_is_an_independent_gather():
    x = torch.arange(2 * 7 * 6.0).reshape(1, 2, 7, 6)
    p = unstitch_reference(x, [3, 4], [2, 2])
    assert torch.equal(p[0, :, 0, 0], x[0, :, 0, 0])


@pytest.mark.parametrize("scheme", ["gaussian", "hann", "border", "constant"])
def test_slab_norm_and_normalize_equal_one_pass_bit_for_bit(scheme, monkeypatch):
    """norm / normalize_ work slab by slab; the bits must not depend on the slab size."""
    import qlty_gpu.weights as wmod

    plan = QuiltPlan((23, 17, 11), (5, 4, 3), (3, 2, 2))
    w = resolve_weight(scheme, plan.window, border=1, border_weight=0.3)
    box = [(2, 21), (0, 17), (1, 9)]
    one = w._slab(plan, box, 0, 19).to(torch.float32)  # one pass, whole box
    acc = torch.randn(2, 3, 19, 17, 8)
    for slab in (1, 17 * 8 * 3 + 5, 1 << 15):
        monkeypatch.setattr(wmod, "_SLAB", slab)
        assert torch.equal(w.norm(plan, box), one)
        assert torch.equal(w.normalize_(acc.clone(), plan, box), acc.clone().div_(one))
