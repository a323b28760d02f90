"""Patch pairs 2D/3D: differential tests against qlty 1.5.0 on the same sampled positions,
an independent slicing oracle, gradients, determinism and errors."""

from __future__ import annotations

import pytest
import torch

qpp = pytest.importorskip("qlty.patch_pairs_2d")
qpp3 = pytest.importorskip("qlty.patch_pairs_3d")

from qlty_gpu import patch_pairs_2d as pp  # noqa: E402
from qlty_gpu import patch_pairs_3d as pp3  # noqa: E402
from qlty_gpu.errors import QltyError  # noqa: E402

CASES = [  # (N, C, Y, X, window, delta_range, rotations)
    (2, 3, 37, 53, (9, 9), (3.0, 6.0), (0, 1, 2, 3)),
    (1, 1, 21, 30, (8, 12), (3.0, 9.0), (0, 2)),
    (3, 2, 16, 16, (8, 8), (2.0, 6.0), None),
]


def _slice_oracle(x, image, pos, window, rot=None):
    u, v = window
    out = []
    for i in range(image.shape[0]):
        y, x0 = pos[i].tolist()
        p = x[int(image[i]), :, y : y + u, x0 : x0 + v]
        if rot is not None:
            p = torch.rot90(p, int(rot[i]), dims=(-2, -1))
        out.append(p)
    return torch.stack(out)


@pytest.mark.parametrize("case", CASES)
def test_pairs_match_slicing_and_qlty_on_same_positions(case):
    n, c, y, x, window, dr, rots = case
    t = torch.randn(n, c, y, x, dtype=torch.float64)
    p1, p2, d, r, a, b = pp.extract_patch_pairs(
        t, window, 7, dr, random_seed=3, rotation_choices=rots, return_positions=True,
        include_n_position=True,
    )
    assert p1.shape == (n * 7, c, *window) and p1.dtype == t.dtype
    assert d.dtype == torch.float32 and r.dtype == torch.int64 and a.dtype == torch.int64
    # oracle: plain slicing at the returned positions
    assert torch.equal(p1, _slice_oracle(t, a[:, 0], a[:, 1:], window))
    assert torch.equal(p2, _slice_oracle(t, b[:, 0], b[:, 1:], window, r))
    # layouts: deltas (dx, dy), positions [n, y, x], pos2 - pos1 == (dy, dx)
    assert torch.equal((b - a)[:, 1:], d.flip(1).long())
    dist = d.pow(2).sum(1).sqrt()
    assert bool(((dist >= dr[0]) & (dist <= dr[1])).all())
    # differential: qlty re-slices the same positions from our metadata
    meta = pp.extract_patch_pairs_metadata(t, window, 7, dr, random_seed=3, rotation_choices=rots)
    sel = list(range(n * 7))[::-1]
    ours = pp.extract_patches_from_metadata(t, meta, sel, return_positions=True)
    ref = qpp.extract_patches_from_metadata(t, meta, sel, return_positions=True)
    for o, q in zip(ours, ref):
        assert torch.equal(o, q)
    # metadata draws exactly the pairs extract_patch_pairs draws
    assert torch.equal(meta["patch1_y"], a[:, 1]) and torch.equal(meta["rotation"], r)
    assert torch.allclose(meta["mean2"], p2.flatten(1).float().mean(1), atol=1e-5)
    assert torch.allclose(meta["sigma1"], p1.flatten(1).std(1).float(), atol=1e-5)


def test_determinism_and_global_rng():
    t = torch.randn(2, 1, 40, 40)
    a = pp.extract_patch_pairs(t, (16, 16), 5, (4.0, 8.0), random_seed=11)
    b = pp.extract_patch_pairs(t, (16, 16), 5, (4.0, 8.0), random_seed=11)
    c = pp.extract_patch_pairs(t, (16, 16), 5, (4.0, 8.0), random_seed=12)
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    assert not torch.equal(a[2], c[2])
    torch.manual_seed(5)
    g1 = pp.extract_patch_pairs(t, (16, 16), 5, (4.0, 8.0))
    torch.manual_seed(5)
    g2 = pp.extract_patch_pairs(t, (16, 16), 5, (4.0, 8.0))
    assert torch.equal(g1[2], g2[2])


def test_every_valid_start_is_drawable():
    # window 8 in a 12x12 image with |d| in [2, 6]: the start range ends at 12-8-|d| inclusive
    t = torch.randn(1, 1, 12, 12)
    _, _, d, _, a, b = pp.extract_patch_pairs(t, (8, 8), 4000, (2.0, 4.0), random_seed=0,
                                             return_positions=True)
    ends = torch.maximum(a, b) + 8
    assert int(ends.max()) == 12  # qlty never draws the last position (exclusive bound)
    assert int(torch.minimum(a, b).min()) == 0


@pytest.mark.parametrize("path", ["numba", "torch"])
@pytest.mark.parametrize("rot", [None, "rand"])
def test_overlapping_pixels_match_qlty_and_gradients(rot, path, monkeypatch):
    if path == "torch":
        monkeypatch.setenv("QLTY_GPU_PAIRS_NUMBA", "0")
    g = torch.Generator().manual_seed(0)
    m, c, s = 40, 3, 9
    p1 = torch.randn(m, c, s, s, dtype=torch.float64, generator=g, requires_grad=True)
    p2 = torch.randn(m, c, s, s, dtype=torch.float64, generator=g, requires_grad=True)
    d = torch.randint(-11, 12, (m, 2), generator=g).float()
    d[:5] += 0.7  # fractional deltas truncate towards zero
    d[5:8] -= 0.7
    r = None if rot is None else torch.randint(0, 4, (m,), generator=g)
    o1, o2 = pp.extract_overlapping_pixels(p1, p2, d, r)
    q1, q2 = qpp.extract_overlapping_pixels(p1, p2, d, r)
    assert torch.equal(o1, q1) and torch.equal(o2, q2)
    w = torch.randn_like(o1)
    ga = torch.autograd.grad((o1 * w).sum() + (o2 * w).sum() ** 2, (p1, p2))
    gb = torch.autograd.grad((q1 * w).sum() + (q2 * w).sum() ** 2, (p1, p2))
    assert all(torch.allclose(x, y) for x, y in zip(ga, gb))


def test_overlap_of_extracted_pairs_is_exact():
    t = torch.randn(3, 2, 40, 40)
    p1, p2, d, r = pp.extract_patch_pairs(t, (12, 12), 20, (3.0, 9.0), random_seed=1,
                                          rotation_choices=(0, 1, 2, 3))
    o1, o2 = pp.extract_overlapping_pixels(p1, p2, d, r)
    assert o1.shape[0] == int(((12 - d.abs()).prod(1)).sum())
    assert torch.equal(o1, o2)


@pytest.mark.parametrize("path", ["numba", "torch"])
def test_gradcheck_overlap(path, monkeypatch):
    if path == "torch":
        monkeypatch.setenv("QLTY_GPU_PAIRS_NUMBA", "0")
    p1 = torch.randn(3, 1, 4, 4, dtype=torch.float64, requires_grad=True)
    p2 = torch.randn(3, 1, 4, 4, dtype=torch.float64, requires_grad=True)
    d = torch.tensor([[1.0, -2.0], [0.0, 0.0], [-3.0, 1.0]])
    r = torch.tensor([1, 2, 3])
    assert torch.autograd.gradcheck(
        lambda a, b: pp.extract_overlapping_pixels(a, b, d, r), (p1, p2)
    )


def test_overlap_empty_and_errors():
    p = torch.randn(2, 3, 4, 4)
    o1, o2 = pp.extract_overlapping_pixels(p, p, torch.tensor([[4.0, 0.0], [0.0, -9.0]]))
    assert o1.shape == (0, 3) and o2.shape == (0, 3)
    with pytest.raises(ValueError, match="must be 4D"):
        pp.extract_overlapping_pixels(p[0], p[0], torch.zeros(2, 2))
    with pytest.raises(ValueError, match="Number of deltas"):
        pp.extract_overlapping_pixels(p, p, torch.zeros(3, 2))
    with pytest.raises(ValueError, match="Number of rotations"):
        pp.extract_overlapping_pixels(p, p, torch.zeros(2, 2), torch.zeros(3, dtype=torch.long))
    q = torch.randn(2, 1, 4, 6)
    with pytest.raises(QltyError, match="square"):
        pp.extract_overlapping_pixels(q, q, torch.zeros(2, 2), torch.tensor([0, 1]))


def test_sampling_errors():
    t = torch.randn(1, 1, 32, 40)
    with pytest.raises(ValueError, match="Input tensor must be 4D"):
        pp.extract_patch_pairs(t[0], (8, 8), 1, (2.0, 4.0))
    with pytest.raises(ValueError, match="delta_range must satisfy"):
        pp.extract_patch_pairs(t, (8, 8), 1, (1.0, 4.0))
    with pytest.raises(ValueError, match="low .* must be <= high"):
        pp.extract_patch_pairs(t, (8, 8), 1, (5.0, 4.0))
    with pytest.raises(ValueError, match="too small"):
        pp.extract_patch_pairs(torch.randn(1, 1, 10, 40), (8, 8), 1, (2.0, 4.0))
    with pytest.raises(QltyError, match="square window"):
        pp.extract_patch_pairs(t, (8, 12), 1, (3.0, 6.0), rotation_choices=(1,))
    with pytest.raises(QltyError, match="no integer displacement"):
        pp.extract_patch_pairs(t, (8, 8), 1, (2.5, 2.6))
    out = pp.extract_patch_pairs(t, (8, 8), 0, (2.0, 4.0))
    assert out[0].shape == (0, 1, 8, 8) and out[2].shape == (0, 2)


def test_stratified_samplers_match_qlty_bins():
    g = torch.Generator().manual_seed(0)
    means = torch.randn(500, generator=g)
    sig = torch.rand(500, generator=g) ** 2
    means[:7] = means[0]  # ties at the edges
    for ours, ref in ((pp.stratified_sample_by_histogram, qpp.stratified_sample_by_histogram),
                      (pp.stratified_sample_by_quantiles, qpp.stratified_sample_by_quantiles)):
        a = ours(means, sig, n_bins=6, samples_per_bin=4, random_seed=1)
        b = ref(means, sig, n_bins=6, samples_per_bin=4, random_seed=1)
        assert a.shape == b.shape and len(set(a.tolist())) == a.numel()
        assert torch.equal(a, ours(means, sig, n_bins=6, samples_per_bin=4, random_seed=1))
    assert pp.stratified_sample_by_histogram(torch.zeros(0), torch.zeros(0)).numel() == 0
    with pytest.raises(ValueError, match="same shape"):
        pp.stratified_sample_by_histogram(means, sig[:3])
    with pytest.raises(ValueError, match="1D"):
        pp.stratified_sample_by_quantiles(means[None], sig[None])


def test_stratified_cell_counts_equal_qlty():
    g = torch.Generator().manual_seed(2)
    means, sig = torch.randn(300, generator=g), torch.randn(300, generator=g).abs()
    edges_m = torch.linspace(means.min().item(), means.max().item(), 6)
    edges_s = torch.linspace(sig.min().item(), sig.max().item(), 6)

    def cells(idx):
        bm = torch.bucketize(means[idx], edges_m[1:-1], right=True)
        bs = torch.bucketize(sig[idx], edges_s[1:-1], right=True)
        return torch.bincount(bm * 5 + bs, minlength=25)

    a = pp.stratified_sample_by_histogram(means, sig, n_bins=5, samples_per_bin=3, random_seed=0)
    b = qpp.stratified_sample_by_histogram(means, sig, n_bins=5, samples_per_bin=3, random_seed=0)
    assert torch.equal(cells(a), cells(b))
    # grouped by cell, mean bin outer, as qlty
    ca = torch.bucketize(means[a], edges_m[1:-1], right=True) * 5 + torch.bucketize(
        sig[a], edges_s[1:-1], right=True)
    assert bool((ca[1:] >= ca[:-1]).all())


def test_metadata_errors_and_index_error():
    t = torch.randn(2, 1, 32, 32)
    meta = pp.extract_patch_pairs_metadata(t, (8, 8), 3, (2.0, 6.0), random_seed=0)
    with pytest.raises(IndexError):
        pp.extract_patches_from_metadata(t, meta, [6])
    with pytest.raises(ValueError, match="must contain 'window' key"):
        pp.extract_patches_from_metadata(t, {k: v for k, v in meta.items() if k != "window"}, [0])
    last = pp.extract_patches_from_metadata(t, meta, [-1])
    assert torch.equal(last[0], pp.extract_patches_from_metadata(t, meta, [5])[0])


def test_zarr_export_and_dataset(tmp_path):
    t = torch.randn(2, 3, 30, 30)
    meta = pp.extract_patch_pairs_metadata(t, (8, 8), 5, (2.0, 6.0), random_seed=0,
                                           rotation_choices=(0, 1, 2, 3))
    sel = [9, 0, 3, 3, 7]
    g = pp.extract_patches_to_zarr(t, meta, sel, str(tmp_path / "p.zarr"), zarr_chunks=(2, 3, 8, 8),
                                   store_positions=True, include_n_position=True)
    assert g["patches1"].chunks == (2, 3, 8, 8) and g.attrs["num_patches"] == 5
    ref = qpp.extract_patches_from_metadata(t, meta, sel, return_positions=True,
                                            include_n_position=True)
    ds = pp.ZarrPatchPairDataset(str(tmp_path / "p.zarr"))
    assert len(ds) == 5 and isinstance(ds, torch.utils.data.Dataset)
    for i in range(5):
        item = ds[i]
        assert len(item) == 6
        for got, want in zip(item, ref):
            assert torch.equal(got, want[i])
    loader = torch.utils.data.DataLoader(ds, batch_size=2)
    assert next(iter(loader))[0].shape == (2, 3, 8, 8)
    with pytest.raises(QltyError, match="not a patch-pair group"):
        import zarr

        pp.ZarrPatchPairDataset(zarr.open_group(str(tmp_path / "empty.zarr"), mode="w"))


def test_pairs_3d_match_slicing_and_qlty_overlap():
    t = torch.randn(2, 2, 19, 23, 21, dtype=torch.float64)
    p1, p2, d = pp3.extract_patch_pairs_3d(t, (6, 8, 7), 6, (2.0, 6.0), random_seed=4)
    assert p1.shape == (12, 2, 6, 8, 7) and d.shape == (12, 3) and d.dtype == torch.float32
    o1, o2 = pp3.extract_overlapping_pixels_3d(p1, p2, d)
    assert torch.equal(o1, o2)
    dist = d.pow(2).sum(1).sqrt()
    assert bool(((dist >= 2.0) & (dist <= 6.0)).all())
    a = pp3.extract_patch_pairs_3d(t, (6, 8, 7), 6, (2.0, 6.0), random_seed=4)
    assert all(torch.equal(u, v) for u, v in zip((p1, p2, d), a))
    # differential on arbitrary pairs, gradients included
    g = torch.Generator().manual_seed(1)
    q1 = torch.randn(10, 2, 5, 6, 4, dtype=torch.float64, generator=g, requires_grad=True)
    q2 = torch.randn(10, 2, 5, 6, 4, dtype=torch.float64, generator=g, requires_grad=True)
    dd = torch.randint(-6, 7, (10, 3), generator=g).float()
    ours = pp3.extract_overlapping_pixels_3d(q1, q2, dd)
    ref = qpp3.extract_overlapping_pixels_3d(q1, q2, dd)
    assert all(torch.equal(x, y) for x, y in zip(ours, ref))
    ga = torch.autograd.grad(ours[0].sum() + (ours[1] ** 2).sum(), (q1, q2))
    gb = torch.autograd.grad(ref[0].sum() + (ref[1] ** 2).sum(), (q1, q2))
    assert all(torch.equal(x, y) for x, y in zip(ga, gb))
    with pytest.raises(ValueError, match="Volume dimensions"):
        pp3.extract_patch_pairs_3d(torch.randn(1, 1, 8, 30, 30), (6, 6, 6), 1, (2.0, 4.0))
    with pytest.raises(ValueError, match="5D"):
        pp3.extract_patch_pairs_3d(t[0], (6, 6, 6), 1, (2.0, 4.0))


def test_scalar_sampler_compat():
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        dx, dy = pp._sample_displacement_vector(3.0, 6.0, g)
        assert 3.0 <= (dx * dx + dy * dy) ** 0.5 <= 6.0
        v = pp3._sample_displacement_vector_3d(3.0, 6.0, g)
        assert 3.0 <= sum(x * x for x in v) ** 0.5 <= 6.0


@pytest.mark.gpu
def test_cuda_pairs_stay_on_device():
    t = torch.randn(2, 3, 40, 40, device="cuda")
    p1, p2, d, r, a, b = pp.extract_patch_pairs(t, (12, 12), 16, (3.0, 9.0), random_seed=0,
                                                rotation_choices=(0, 1, 2, 3),
                                                return_positions=True, include_n_position=True)
    assert p1.is_cuda and d.is_cuda and r.is_cuda and a.is_cuda
    assert torch.equal(p2.cpu(), _slice_oracle(t.cpu(), b[:, 0].cpu(), b[:, 1:].cpu(),
                                               (12, 12), r.cpu()))
    o1, o2 = pp.extract_overlapping_pixels(p1, p2, d, r)
    assert o1.is_cuda and torch.equal(o1, o2)
    q1, q2 = qpp.extract_overlapping_pixels(p1.cpu(), p2.cpu(), d.cpu(), r.cpu())
    assert torch.equal(o1.cpu(), q1)


def test_gather_paths_agree_and_autograd_flows():
    t = torch.randn(2, 3, 30, 34, dtype=torch.float64)
    ref = pp.extract_patch_pairs(t, (9, 9), 6, (3.0, 6.0), random_seed=2, rotation_choices=(0, 3))
    # non-contiguous input and autograd input take the unfold path
    nc = t.transpose(-1, -2).contiguous().transpose(-1, -2)
    assert not nc.is_contiguous()
    got = pp.extract_patch_pairs(nc, (9, 9), 6, (3.0, 6.0), random_seed=2, rotation_choices=(0, 3))
    leaf = t.clone().requires_grad_(True)
    grad = pp.extract_patch_pairs(leaf, (9, 9), 6, (3.0, 6.0), random_seed=2,
                                  rotation_choices=(0, 3))
    for a, b, c in zip(ref, got, grad):
        assert torch.equal(a, b) and torch.equal(a, c.detach())
    (grad[0].sum() + grad[1].sum()).backward()
    assert float(leaf.grad.sum()) == 2 * 6 * 2 * 3 * 81


@pytest.mark.parametrize("nd", [2, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.int64, torch.float16])
def test_numba_and_torch_paths_equal_qlty(nd, dtype, monkeypatch):
    g = torch.Generator().manual_seed(nd)
    win = (7, 7) if nd == 2 else (4, 6, 5)
    p1 = torch.randint(-50, 50, (30, 2, *win), generator=g).to(dtype)
    p2 = torch.randint(-50, 50, (30, 2, *win), generator=g).to(dtype)
    d = torch.randint(-8, 9, (30, nd), generator=g).float()
    if nd == 2:
        r = torch.randint(-3, 8, (30,), generator=g)
        ref = qpp.extract_overlapping_pixels(p1, p2, d, r)
        fast = pp.extract_overlapping_pixels(p1, p2, d, r)  # numba unless float16
        monkeypatch.setenv("QLTY_GPU_PAIRS_NUMBA", "0")
        slow = pp.extract_overlapping_pixels(p1, p2, d, r)
    else:
        ref = qpp3.extract_overlapping_pixels_3d(p1, p2, d)
        fast = pp3.extract_overlapping_pixels_3d(p1, p2, d)
        monkeypatch.setenv("QLTY_GPU_PAIRS_NUMBA", "0")
        slow = pp3.extract_overlapping_pixels_3d(p1, p2, d)
    for a, b, c in zip(fast, slow, ref):
        assert a.dtype == dtype and torch.equal(a, c) and torch.equal(b, c)


@pytest.mark.parametrize("window,choices", [((6, 6), (0, 1, 2, 3)), ((6, 6), (1,)),
                                            ((6, 6), (3, 2)), ((6, 6), (3,)), ((5, 7), (0, 2)),
                                            ((5, 7), (2,))])
def test_rotated_row_gather_matches_oracle(window, choices):
    # many pairs on a small image: the flipped/transposed row buffers are used
    t = torch.randn(2, 2, 17, 19)
    p1, p2, d, r, a, b = pp.extract_patch_pairs(t, window, 40, (2.0, 3.0), random_seed=9,
                                                rotation_choices=choices, return_positions=True,
                                                include_n_position=True)
    assert set(r.tolist()) <= {c % 4 for c in choices}
    assert torch.equal(p2, _slice_oracle(t, b[:, 0], b[:, 1:], window, r))
    meta = pp.extract_patch_pairs_metadata(t, window, 40, (2.0, 3.0), random_seed=9,
                                           rotation_choices=choices)
    again = pp.extract_patches_from_metadata(t, meta, range(80))
    assert torch.equal(again[1], p2)


@pytest.mark.parametrize("rots", [None, (0, 1, 2, 3)])
def test_pooled_outputs_match_oracle_and_are_not_shared(rots):
    """Outputs >= 8 MiB come from the huge-page pool (qlty_gpu._alloc): right values, and a
    later call never hands out memory a live result still uses."""
    from qlty_gpu import _alloc

    t = torch.randn(16, 3, 128, 128)
    kw = dict(random_seed=0, rotation_choices=rots, return_positions=True,
              include_n_position=True)
    first = pp.extract_patch_pairs(t, (32, 32), 64, (8.0, 16.0), **kw)
    keep = [x.clone() for x in first[:2]]
    assert first[0].numel() * 4 >= 8 << 20 and _alloc._enabled()
    for _ in range(2):  # recycled buffers: the live result must stay intact
        again = pp.extract_patch_pairs(t, (32, 32), 64, (8.0, 16.0), **kw)
        assert torch.equal(again[0], keep[0]) and torch.equal(again[1], keep[1])
        del again
    assert torch.equal(first[0], keep[0]) and torch.equal(first[1], keep[1])
    p1, p2, d, r, a, b = first
    assert torch.equal(p1, _slice_oracle(t, a[:, 0], a[:, 1:], (32, 32)))
    assert torch.equal(p2, _slice_oracle(t, b[:, 0], b[:, 1:], (32, 32),
                                         None if rots is None else r))
