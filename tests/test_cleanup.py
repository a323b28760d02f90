"""weed_sparse_classification_training_pairs_2D/3D (spec §2.6)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from qlty_gpu import (
    NCYXQuilt,
    NCZYXQuilt,
    QltyError,
    weed_sparse_classification_training_pairs_2D,
    weed_sparse_classification_training_pairs_3D,
)
from qlty_gpu.base import compute_border_tensor_numpy
from qlty_gpu.errors import QltyTypeError


def _expected_removed(t_out, label, border):
    """Loop reference: a patch is removed when no interior pixel differs from the label."""
    border = torch.as_tensor(border)
    removed = []
    for m in range(t_out.shape[0]):
        valid = (t_out[m] != label) & (border > 0.5)
        removed.append(not bool(valid.any()))
    return torch.tensor(removed)


def _labels_2d(m=10, c=None, y=8, x=8, missing=-1.0):
    shape = (m, y, x) if c is None else (m, c, y, x)
    t = torch.full(shape, missing)
    idx = (slice(None),) if c is None else (slice(None), 0)
    t[(0, *idx[1:], 4, 4)] = 1  # interior label
    t[(1, *idx[1:], 0, 0)] = 1  # border only
    t[(3, *idx[1:], 2, 5)] = 2  # interior label
    t[5] = 0  # all labelled
    t[(7, *idx[1:], 7, 3)] = 3  # border only
    return t


@pytest.mark.parametrize("with_channels", [False, True])
@pytest.mark.parametrize("as_numpy", [False, True])
def test_weed_2d(with_channels, as_numpy):
    t_out = _labels_2d(c=3 if with_channels else None)
    t_in = torch.arange(10.0).view(10, 1, 1, 1).expand(10, 2, 8, 8).clone()
    border = NCYXQuilt(16, 16, (8, 8), (4, 4), 2).border_tensor()
    if as_numpy:  # the Large quilts' border_tensor() is float64 numpy (qlty raised here)
        border = compute_border_tensor_numpy((8, 8), (2, 2))
    kept_in, kept_out, removed = weed_sparse_classification_training_pairs_2D(
        t_in, t_out, -1, border
    )
    assert removed.dtype == torch.bool and removed.shape == (10,)
    assert removed.tolist() == _expected_removed(t_out, -1, border).tolist()
    assert removed.tolist() == [False, True, True, False, True, False, True, True, True, True]
    assert kept_in[:, 0, 0, 0].tolist() == [0.0, 3.0, 5.0]
    assert torch.equal(kept_out, t_out[~removed])


def test_weed_2d_channel_shaped_border():
    t_out = torch.zeros(4, 2, 6, 6, dtype=torch.int64)
    t_out[1, 1, 3, 3] = 1  # channel 1 interior
    t_out[2, 0, 3, 3] = 1  # channel 0 interior, but channel 0 is masked out below
    border = torch.ones(2, 6, 6)
    border[0] = 0
    _, _, removed = weed_sparse_classification_training_pairs_2D(
        torch.zeros(4, 1, 6, 6), t_out, 0, border
    )
    assert removed.tolist() == [True, False, True, True]


def test_weed_nan_label_never_matches():
    t_out = torch.full((3, 5, 5), float("nan"))
    _, kept, removed = weed_sparse_classification_training_pairs_2D(
        torch.zeros(3, 1, 5, 5), t_out, float("nan"), torch.ones(5, 5)
    )
    assert not bool(removed.any()) and kept.shape[0] == 3


def test_weed_nothing_kept_returns_empty():
    t_in = torch.zeros(3, 1, 5, 5)
    kept_in, kept_out, removed = weed_sparse_classification_training_pairs_2D(
        t_in, torch.full((3, 5, 5), -1), -1, torch.ones(5, 5)
    )
    assert bool(removed.all()) and kept_in.shape == (0, 1, 5, 5) and kept_out.shape == (0, 5, 5)


@pytest.mark.parametrize("with_channels", [False, True])
@pytest.mark.parametrize("border_kind", ["zyx", "czyx", "5d", "numpy"])
def test_weed_3d(with_channels, border_kind):
    q = NCZYXQuilt(8, 8, 8, (4, 4, 4), (2, 2, 2), 1)
    c = 2
    shape = (6, c, 4, 4, 4) if with_channels else (6, 4, 4, 4)
    t_out = torch.zeros(shape)
    ch = (slice(None),) if with_channels else ()
    t_out[(0, *ch, 1, 2, 2)] = 1  # interior
    t_out[(2, *ch, 0, 0, 0)] = 1  # border only
    t_out[(4, *ch, slice(1, 3), slice(1, 3), slice(1, 3))] = 3
    bt = q.border_tensor()
    if border_kind == "czyx":
        bt = bt.expand(c, 4, 4, 4) if with_channels else bt
    elif border_kind == "5d":
        if not with_channels:
            pytest.skip("a 5-D mask needs 5-D targets")
        bt = bt[None, None].expand(1, c, 4, 4, 4)
    elif border_kind == "numpy":
        bt = bt.double().numpy()
    t_in = torch.arange(6.0).view(6, 1, 1, 1, 1).expand(6, 1, 4, 4, 4)
    kept_in, kept_out, removed = weed_sparse_classification_training_pairs_3D(t_in, t_out, 0, bt)
    assert removed.tolist() == [False, True, True, True, False, True]
    assert kept_in[:, 0, 0, 0, 0].tolist() == [0.0, 4.0]
    assert torch.equal(kept_out, t_out[~removed])


def test_weed_pipeline_with_quilt():
    """Example 4 of the README, checked against the loop reference."""
    q = NCYXQuilt(Y=64, X=64, window=(16, 16), step=(8, 8), border=(3, 3))
    x = torch.randn(2, 3, 64, 64)
    labels = torch.full((2, 64, 64), -1.0)
    labels[:, 10:40, 12:30] = 1.0
    pin, pout = q.unstitch_data_pair(x, labels, missing_label=-1)
    bt = q.border_tensor()
    kin, kout, removed = weed_sparse_classification_training_pairs_2D(pin, pout, -1, bt)
    assert removed.tolist() == _expected_removed(pout, -1, bt).tolist()
    assert 0 < kin.shape[0] < pin.shape[0]
    assert torch.equal(kin, pin[~removed]) and torch.equal(kout, pout[~removed])


def test_weed_errors():
    t_in = torch.zeros(3, 1, 5, 5)
    t_out = torch.zeros(3, 5, 5)
    bt = torch.ones(5, 5)
    weed = weed_sparse_classification_training_pairs_2D
    with pytest.raises(QltyTypeError, match=r"tensor_in must be a torch.Tensor.*ndarray"):
        weed(np.zeros((3, 1, 5, 5)), t_out, 0, bt)
    with pytest.raises(QltyTypeError, match="tensor_out must be a torch.Tensor"):
        weed(t_in, [[0]], 0, bt)
    with pytest.raises(QltyTypeError, match=r"border_tensor must be a torch.Tensor or numpy"):
        weed(t_in, t_out, 0, [[1]])
    with pytest.raises(QltyError, match=r"same number of patches, got 3 and 2"):
        weed(t_in, t_out[:2], 0, bt)
    with pytest.raises(QltyError, match=r"tensor_out must have shape \(M, \*\(Y, X\)\)"):
        weed(t_in, torch.zeros(3, 1, 1, 5, 5), 0, bt)
    with pytest.raises(QltyError, match=r"border_tensor must have the patch shape \(5, 5\)"):
        weed(t_in, t_out, 0, torch.ones(4, 5))
    with pytest.raises(QltyError, match=r"\(M, \*\(Z, Y, X\)\)"):
        weed_sparse_classification_training_pairs_3D(t_in, t_out, 0, bt)
