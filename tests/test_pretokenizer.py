"""Pre-tokenizer: tokens vs qlty, token matching vs qlty (qlty's rotation convention), the
rotation regression (torch.rot90 convention) and errors."""

from __future__ import annotations

import pytest
import torch

qseq = pytest.importorskip("qlty.pretokenizer_2d.sequences")

from qlty_gpu import extract_patch_pairs  # noqa: E402
from qlty_gpu.pretokenizer_2d import build_sequence_pair, tokenize_patch  # noqa: E402

KEYS = ("overlap_mask1", "overlap_mask2", "overlap_indices1_to_2", "overlap_indices2_to_1",
        "overlap_pairs")


@pytest.mark.parametrize("shape,ps,stride", [((2, 10, 10), 4, None), ((3, 13, 9), 3, 2),
                                             ((1, 7, 7), 7, 3), ((1, 5, 6), 2, 1)])
def test_tokenize_matches_qlty(shape, ps, stride):
    p = torch.randn(*shape)
    t, c = tokenize_patch(p, ps, stride)
    qt, qc = qseq.tokenize_patch(p, ps, stride)
    assert torch.equal(t, qt) and torch.equal(c, qc) and c.dtype == torch.int64


def _random_case(g, n, s):
    dx = torch.randint(-s, s + 1, (n,), generator=g).float()
    dy = torch.randint(-s, s + 1, (n,), generator=g).float()
    dx[::3] += 0.5  # fractional displacements give fractional areas
    k = torch.randint(0, 4, (n,), generator=g)
    return dx, dy, k


@pytest.mark.parametrize("h,ps,stride", [(16, 4, None), (13, 3, 2), (12, 5, 5)])
def test_matching_equals_qlty_in_qlty_convention(h, ps, stride):
    g = torch.Generator().manual_seed(h)
    n = 8  # > 5: qlty takes its numba batch path
    p1, p2 = torch.randn(n, 2, h, h), torch.randn(n, 2, h, h)
    dx, dy, k = _random_case(g, n, h)
    ours = build_sequence_pair(p1, p2, dx, dy, k, ps, stride, rotation_convention="qlty")
    ref = qseq.build_sequence_pair(p1, p2, dx, dy, k, ps, stride)
    assert set(ours) == set(ref)
    for key in KEYS + ("tokens1", "tokens2", "coords1", "sequence_lengths", "overlap_pair_counts"):
        assert torch.equal(ours[key], ref[key]), key
    assert torch.allclose(ours["overlap_fractions"], ref["overlap_fractions"])
    # single mode: qlty's Python path
    for i in range(3):
        o = build_sequence_pair(p1[i], p2[i], float(dx[i]), float(dy[i]), int(k[i]), ps, stride,
                                rotation_convention="qlty")
        r = qseq.build_sequence_pair(p1[i], p2[i], float(dx[i]), float(dy[i]), int(k[i]), ps,
                                     stride)
        assert set(o) == set(r)
        for key in KEYS:
            assert torch.equal(o[key], r[key]), key
        assert torch.allclose(o["overlap_fractions"], r["overlap_fractions"])


def test_rotation_regression_tokens_hold_the_same_pixels():
    """With patch pairs from extract_patch_pairs, every fully overlapping token pair holds the
    same pixels once token 2 is rotated back. qlty's convention fails this for k = 1, 3."""
    img = torch.arange(64 * 64, dtype=torch.float32).reshape(1, 1, 64, 64)
    p1, p2, d, r = extract_patch_pairs(img, (16, 16), 24, (4.0, 8.0), random_seed=0,
                                       rotation_choices=(1, 2, 3))
    ps = 4
    for convention in ("torch", "qlty"):
        out = build_sequence_pair(p1, p2, d[:, 0], d[:, 1], r, ps, 1,
                                  rotation_convention=convention)
        same = {0: 0, 1: 0}  # full-overlap token pairs holding the same pixels, by k odd
        differ = {0: 0, 1: 0}
        for n in range(p1.shape[0]):
            for i in torch.nonzero(out["overlap_fractions"][n] == 1.0).flatten().tolist():
                j = int(out["overlap_indices1_to_2"][n, i])
                t1 = out["tokens1"][n, i].reshape(1, ps, ps)
                t2 = torch.rot90(out["tokens2"][n, j].reshape(1, ps, ps), -int(r[n]), (-2, -1))
                bucket = same if torch.equal(t1, t2) else differ
                bucket[int(r[n]) % 2] += 1
        if convention == "torch":
            assert same[1] > 20 and same[0] > 20 and differ == {0: 0, 1: 0}
        else:  # qlty's [BUG]: quarter turns match the wrong tokens
            assert differ[1] > 100 and differ[0] == 0


def test_default_convention_is_torch_rot90():
    p = torch.randn(1, 8, 8)
    a = build_sequence_pair(p, torch.rot90(p, 1, (-2, -1)), 0, 0, 1, 2, 2)
    # token (0, 0) of patch 1 lands at the bottom-left of patch 2 after a CCW quarter turn
    assert int(a["overlap_indices1_to_2"][0]) == 12
    assert torch.equal(a["overlap_indices1_to_2"], torch.rot90(
        torch.arange(16).reshape(4, 4), 1, (0, 1)).flatten().argsort())


def test_batch_equals_single_and_scalars_broadcast():
    p1, p2 = torch.randn(4, 1, 12, 12), torch.randn(4, 1, 12, 12)
    b = build_sequence_pair(p1, p2, 3.0, -2.0, 2, 4)
    for i in range(4):
        s = build_sequence_pair(p1[i], p2[i], 3.0, -2.0, 2, 4)
        assert torch.equal(b["overlap_indices1_to_2"][i], s["overlap_indices1_to_2"])
        npairs = int(b["overlap_pair_counts"][i])
        assert torch.equal(b["overlap_pairs"][i, :npairs], s["overlap_pairs"])
    nothing = build_sequence_pair(p1, p2, 40.0, 0.0, 0, 4)
    assert nothing["overlap_pairs"].shape == (4, 0, 2)
    assert build_sequence_pair(p1[0], p2[0], 40.0, 0.0, 0, 4)["overlap_pairs"].shape == (0, 2)


def test_errors():
    p = torch.randn(2, 8, 8)
    with pytest.raises(ValueError, match="patch must be 3D"):
        tokenize_patch(p[0], 2)
    with pytest.raises(ValueError, match="patch_size must be positive"):
        tokenize_patch(p, 0)
    with pytest.raises(ValueError, match="stride must be positive"):
        tokenize_patch(p, 1)
    with pytest.raises(ValueError, match="must be <= patch_size"):
        tokenize_patch(p, 2, 3)
    with pytest.raises(ValueError, match="must be <= patch dimensions"):
        tokenize_patch(p, 9)
    with pytest.raises(ValueError, match="Both patches must be 3D"):
        build_sequence_pair(p, p[None], 0, 0, 0, 2)
    with pytest.raises(ValueError, match="Batch sizes must match"):
        build_sequence_pair(p[None], torch.randn(2, 2, 8, 8), 0, 0, 0, 2)
    with pytest.raises(ValueError, match="Patches must have same shape"):
        build_sequence_pair(p, torch.randn(2, 8, 9), 0, 0, 0, 2)
    with pytest.raises(ValueError, match="must have shape"):
        build_sequence_pair(p[None], p[None], torch.zeros(3), 0, 0, 2)
    with pytest.raises(ValueError, match="rotation_convention"):
        build_sequence_pair(p, p, 0, 0, 0, 2, rotation_convention="cw")


def test_gradients_flow_to_tokens():
    p = torch.randn(2, 1, 8, 8, requires_grad=True)
    out = build_sequence_pair(p, p * 2, 1.0, 0.0, 0, 4)
    out["tokens2"].sum().backward()
    assert p.grad is not None and float(p.grad.abs().sum()) > 0


@pytest.mark.gpu
def test_cuda_batch():
    p1, p2 = torch.randn(6, 2, 16, 16, device="cuda"), torch.randn(6, 2, 16, 16, device="cuda")
    dx, dy, k = torch.tensor([1.0, -3, 0, 2, 5, 0]), torch.zeros(6), torch.arange(6) % 4
    out = build_sequence_pair(p1, p2, dx.cuda(), dy.cuda(), k.cuda(), 4, 2)
    ref = build_sequence_pair(p1.cpu(), p2.cpu(), dx, dy, k, 4, 2)
    assert out["overlap_mask1"].is_cuda
    for key in KEYS:
        assert torch.equal(out[key].cpu(), ref[key]), key
