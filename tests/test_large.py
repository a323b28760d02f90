"""LargeNCYXQuilt / LargeNCZYXQuilt: against qlty 1.5.0's Large classes, any order, errors."""

from __future__ import annotations

import os
import warnings

import numpy as np
import pytest
import torch
import zarr
from hypothesis import given, settings
from hypothesis import strategies as st

from qlty_gpu import LargeNCYXQuilt, LargeNCZYXQuilt, QltyError
from qlty_gpu import weed_sparse_classification_training_pairs_2D as weed2d
from qlty_gpu import weed_sparse_classification_training_pairs_3D as weed3d

qlty2DLarge = pytest.importorskip("qlty.qlty2DLarge")
qlty3DLarge = pytest.importorskip("qlty.qlty3DLarge")

# odd, non-dividing geometries; chunks smaller than the image so patches straddle chunks
CASES = {
    "2d_border": dict(N=2, C=2, shape=(37, 29), window=(8, 6), step=(5, 4), border=(1, 2),
                      chunks=(10, 9)),
    "2d_noborder": dict(N=1, C=3, shape=(23, 31), window=(7, 9), step=(3, 5), border=None,
                        chunks=(6, 15)),
    "3d_border": dict(N=1, C=2, shape=(13, 15, 11), window=(6, 5, 4), step=(4, 3, 3),
                      border=(1, 1, 1), chunks=(5, 8, 6)),
    "3d_gaps": dict(N=2, C=1, shape=(12, 10, 9), window=(3, 4, 3), step=(4, 4, 2), border=None,
                    chunks=(4, 4, 4)),
}


def _model(p):
    return p * 2 + 1, p * p + 0.5


def _ours(case, tmp_path, name="ours", **kw):
    cls = LargeNCYXQuilt if len(case["shape"]) == 2 else LargeNCZYXQuilt
    return cls(str(tmp_path / name), case["N"], *case["shape"], window=case["window"],
               step=case["step"], border=case["border"], border_weight=0.2,
               chunks=case["chunks"], **kw)


def _data(case, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(case["N"], case["C"], *case["shape"], generator=g)


@pytest.fixture(scope="module")
def qlty_results(tmp_path_factory):
    """qlty 1.5.0's (mean, std) per case (its patch loop, ~7 ms a patch)."""
    out = {}
    for key, case in CASES.items():
        d = tmp_path_factory.mktemp(key)
        cls = qlty2DLarge.LargeNCYXQuilt if len(case["shape"]) == 2 else qlty3DLarge.LargeNCZYXQuilt
        q = cls(str(d / "ref"), case["N"], *case["shape"], window=case["window"],
                step=case["step"], border=case["border"], border_weight=0.2)
        x = _data(case)
        for _ in range(q.N_chunks):
            i, p = q.unstitch_next(x)
            m, v = _model(p.unsqueeze(0))
            q.stitch(m, i, patch_var=v)
        out[key] = q.return_mean(std=True)
    return out


@pytest.mark.parametrize("key", list(CASES))
def test_patch_at_a_time_matches_qlty(key, tmp_path, qlty_results):
    case = CASES[key]
    q = _ours(case, tmp_path)
    x = _data(case)
    for _ in range(q.N_chunks):
        i, p = q.unstitch_next(x)
        m, v = _model(p.unsqueeze(0))
        q.stitch(m, i, patch_var=v)
    with pytest.raises(StopIteration):
        q.unstitch_next(x)
    mean, std = q.return_mean(std=True)
    ref_mean, ref_std = qlty_results[key]
    assert mean.dtype == np.float32 and mean.shape == ref_mean.shape
    np.testing.assert_allclose(mean, ref_mean, rtol=2e-6, atol=2e-6)
    np.testing.assert_allclose(std, ref_std, rtol=2e-6, atol=2e-6)
    # any number of return_mean calls; qlty crashes on the second
    np.testing.assert_array_equal(q.return_mean(), mean)
    # the outputs on disk are complete float32 stores with chunks aligned to the quilt
    a = zarr.open_array(q.mean_path)
    assert a.chunks == (1, case["C"], *case["chunks"]) and a.dtype == np.float32
    assert dict(a.attrs)["qlty_gpu"]["complete"] is True


@pytest.mark.parametrize("mode", ["direct", "fused"])
@pytest.mark.parametrize("key", ["2d_border", "3d_border", "3d_gaps"])
def test_batched_any_order_matches_qlty(key, mode, tmp_path, qlty_results):
    case = CASES[key]
    q = _ours(case, tmp_path, accumulate=mode)
    x = _data(case)
    order = np.random.default_rng(1).permutation(q.N_chunks)
    for b in np.array_split(order, 5):
        p = torch.stack([q.unstitch(x, int(i)) for i in b])
        m, v = _model(p)
        q.stitch(m, torch.from_numpy(b), patch_var=v)
    mean, std = q.return_mean(std=True)
    np.testing.assert_allclose(mean, qlty_results[key][0], rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(std, qlty_results[key][1], rtol=2e-5, atol=2e-5)


@settings(max_examples=12, deadline=None)
@given(st.permutations(list(range(2 * 5 * 4))), st.integers(1, 9),
       st.sampled_from(["direct", "fused"]))
def test_any_patch_order_and_batching(tmp_path_factory, perm, bs, mode):
    d = tmp_path_factory.mktemp("perm")
    x = torch.randn(2, 2, 14, 11)
    q = LargeNCYXQuilt(str(d / "q"), 2, 14, 11, window=(5, 4), step=(3, 2), border=1,
                       chunks=(4, 5), accumulate=mode)
    assert q.N_chunks == len(perm)
    perm = np.array(perm)
    for b0 in range(0, len(perm), bs):
        idx = perm[b0:b0 + bs]
        q.stitch(torch.stack([q.unstitch(x, int(i)) for i in idx]) * 3, idx)
    np.testing.assert_allclose(q.return_mean(), 3 * x.numpy(), rtol=1e-5, atol=1e-5)


def test_iter_patches_progress_and_lazy_reads(tmp_path, capsys):
    class Counting:
        def __init__(self, a):
            self.a, self.shape, self.dtype, self.reads = a, a.shape, a.dtype, []

        def __getitem__(self, key):
            self.reads.append(key)
            return self.a[key]

    x = np.random.default_rng(0).standard_normal((2, 2, 40, 33)).astype(np.float32)
    src = Counting(x)
    q = LargeNCYXQuilt(str(tmp_path / "q"), 2, 40, 33, window=(8, 8), step=(4, 4), border=2,
                       chunks=(12, 12))
    batches = 0
    for idx, p in q.iter_patches(src, batch_size=7, progress=True):
        assert p.shape[1:] == (2, 8, 8)
        q.stitch(p, idx)
        batches += 1
    assert "patches" in capsys.readouterr().err  # the tqdm bar
    assert len(src.reads) == batches + 1  # one read per image within each batch
    # each read is the bounding box of the batch's patches in one image, never the volume
    for key in src.reads:
        assert isinstance(key[0], int) and (key[2].stop - key[2].start) <= 16
    np.testing.assert_allclose(q.return_mean(), x, rtol=1e-5, atol=1e-5)
    # single-patch reads are just the window
    src.reads.clear()
    q.unstitch(src, 5)
    assert src.reads == [(0, slice(0, 2), slice(0, 8), slice(20, 28))]


def test_3d_batch_reads_stay_within_one_z_plane(tmp_path):
    reads = []

    class Counting:
        def __init__(self, a):
            self.a, self.shape, self.dtype = a, a.shape, a.dtype

        def __getitem__(self, key):
            reads.append(key)
            return self.a[key]

    x = np.random.default_rng(0).standard_normal((1, 1, 20, 30, 30)).astype(np.float32)
    q = LargeNCZYXQuilt(str(tmp_path / "q"), 1, 20, 30, 30, (8, 8, 8), (4, 4, 4), None,
                        chunks=(8, 12, 12))
    for idx, p in q.iter_patches(Counting(x), batch_size=10):  # batches straddle z-planes
        q.stitch(p, idx)
    assert all(k[2].stop - k[2].start == 8 for k in reads)  # one plane of patches per read
    assert max((k[3].stop - k[3].start) * (k[4].stop - k[4].start) for k in reads) <= 16 * 30
    np.testing.assert_allclose(q.return_mean(), x, rtol=1e-5, atol=1e-5)


def test_sources_zarr_h5py_memmap(tmp_path):
    import h5py

    x = np.random.default_rng(0).standard_normal((1, 1, 20, 18)).astype(np.float32)
    z = zarr.create_array(store=str(tmp_path / "in.zarr"), shape=x.shape, chunks=(1, 1, 8, 8),
                          dtype="float32")
    z[:] = x
    with h5py.File(tmp_path / "in.h5", "w") as f:
        f["x"] = x
    mm = np.memmap(tmp_path / "in.dat", dtype=np.float32, mode="w+", shape=x.shape)
    mm[:] = x
    with h5py.File(tmp_path / "in.h5", "r") as f:
        for k, src in enumerate([z, f["x"], mm, x, torch.from_numpy(x)]):
            q = LargeNCYXQuilt(str(tmp_path / f"q{k}"), 1, 20, 18, (6, 6), (4, 4), None)
            for idx, p in q.iter_patches(src, batch_size=5):
                q.stitch(p, idx)
            np.testing.assert_allclose(q.return_mean(), x, rtol=1e-5, atol=1e-5)


def test_return_mean_normalize_over_channels_eps_and_zarr(tmp_path):
    x = torch.rand(2, 3, 16, 12) + 0.1
    q = LargeNCYXQuilt(str(tmp_path / "q"), 2, 16, 12, (8, 6), (4, 3), 1, chunks=(8, 6))
    for idx, p in q.iter_patches(x, 10):
        q.stitch(p, idx, patch_var=p * 0 + 0.25)
    m, s = q.return_mean(std=True, normalize=True)
    np.testing.assert_allclose(m.sum(axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(m, (x / x.sum(1, keepdim=True)).numpy(), rtol=1e-5)
    np.testing.assert_allclose(s, (0.5 / x.sum(1, keepdim=True)).expand_as(x).numpy(), rtol=1e-5)
    # eps other than the construction eps is corrected exactly
    norm = q.plan.norm("cpu", torch.float64).numpy()
    m_eps = q.return_mean(eps=1.0)
    np.testing.assert_allclose(m_eps, x.numpy() * norm / (norm + 1.0), rtol=1e-5)
    # over the numpy limit (or asked) the Zarr arrays come back; normalised ones derived
    za, zs = q.return_mean(std=True, as_zarr=True)
    assert isinstance(za, zarr.Array) and za.shape == (2, 3, 16, 12)
    q.return_limit = 10
    zn = q.return_mean(renormalize_channels=True)
    assert isinstance(zn, zarr.Array) and zn.store.root.name == "q_mean_normalized.zarr"
    np.testing.assert_allclose(zn[:], m, rtol=1e-6)


def test_std_without_patch_var_is_zero_with_a_warning(tmp_path):
    q = LargeNCYXQuilt(str(tmp_path / "q"), 1, 10, 10, (5, 5), (5, 5), None)
    x = torch.randn(1, 1, 10, 10)
    for _ in range(q.N_chunks):
        i, p = q.unstitch_next(x)
        q.stitch(p.unsqueeze(0), i)
    with pytest.warns(UserWarning, match="no patch_var"):
        m, s = q.return_mean(std=True)
    assert not s.any() and np.allclose(m, x.numpy(), atol=1e-6)


def test_positions_and_border_tensor(tmp_path):
    q = LargeNCYXQuilt(str(tmp_path / "q"), 2, 20, 17, (8, 8), (6, 6), (2, 2))
    x = torch.randn(2, 3, 20, 17)
    p, pos = q.unstitch(x, 10, return_positions=True, include_n_position=True)
    n, y, xx = pos.tolist()
    assert (n, y, xx) == (1, 0, 6) and torch.equal(p, x[1, :, 0:8, 6:14])
    assert p.data_ptr() == x[1, :, 0:8, 6:14].data_ptr()  # a view, as qlty
    i, p, pos = q.unstitch_next(x, return_positions=True)
    assert isinstance(i, np.integer) and pos.tolist() == [0, 0]
    b = q.border_tensor()
    assert b.dtype == np.float64 and b.sum() == 16 and q.weight.dtype == torch.float64
    q3 = LargeNCZYXQuilt(str(tmp_path / "q3"), 1, 9, 9, 9, (4, 4, 4), (3, 3, 3))
    assert q3.border is None and q3.get_times() == (3, 3, 3)
    assert q3.unstitch(torch.zeros(1, 1, 9, 9, 9), 26).shape == (1, 4, 4, 4)  # clamped last


def test_weed_accepts_the_large_numpy_border_masks(tmp_path):
    """Issue 14 item 4: the Large quilts' numpy border masks work with the weed functions."""
    q = LargeNCYXQuilt(str(tmp_path / "q"), 2, 24, 24, (8, 8), (8, 8), (2, 2))
    x = torch.randn(2, 1, 24, 24)
    lab = torch.full((2, 24, 24), -1.0)
    lab[0, 3, 3] = 1  # interior of patch 0
    lab[1, 8, 8] = 1  # border pixel only: the patch is weeded
    pin = torch.stack([q.unstitch(x, i) for i in range(q.N_chunks)])
    pout = torch.stack([q.unstitch(lab[:, None], i)[0] for i in range(q.N_chunks)])
    kin, kout, removed = weed2d(pin, pout, -1, q.border_tensor())
    assert isinstance(q.border_tensor(), np.ndarray)
    assert (~removed).nonzero().flatten().tolist() == [0] and kin.shape == (1, 1, 8, 8)
    q3 = LargeNCZYXQuilt(str(tmp_path / "q3"), 1, 8, 8, 8, (4, 4, 4), (4, 4, 4), (1, 1, 1))
    p3 = torch.full((8, 4, 4, 4), -1.0)
    p3[5, 1, 2, 1] = 2
    _, _, r3 = weed3d(torch.zeros(8, 1, 4, 4, 4), p3, -1, q3.border_tensor())
    assert (~r3).nonzero().flatten().tolist() == [5]
    # and the quilts' own cleaning agrees with qlty
    ref = qlty2DLarge.LargeNCYXQuilt(str(tmp_path / "r"), 2, 24, 24, (8, 8), (8, 8), (2, 2))
    a_in, a_out = q.unstitch_and_clean_sparse_data_pair(x, lab, -1)
    r_in, r_out = ref.unstitch_and_clean_sparse_data_pair(x, lab, -1)
    assert torch.equal(a_in, r_in) and torch.equal(a_out, r_out)
    none = torch.full((2, 24, 24), -1.0)
    assert q.unstitch_and_clean_sparse_data_pair(x, none, -1) == ([], [])
    assert q3.unstitch_and_clean_sparse_data_pair(torch.zeros(1, 1, 8, 8, 8),
                                                  torch.full((1, 8, 8, 8), -1.0), -1) == ([], [])


def test_clean_sparse_pair_3d_matches_qlty(tmp_path):
    x = torch.randn(2, 2, 10, 9, 11)
    lab = (torch.rand(2, 1, 10, 9, 11) > 0.97).float() * 2 - 1
    q = LargeNCZYXQuilt(str(tmp_path / "q"), 2, 10, 9, 11, (4, 4, 5), (3, 3, 3), (1, 1, 1))
    r = qlty3DLarge.LargeNCZYXQuilt(str(tmp_path / "r"), 2, 10, 9, 11, (4, 4, 5), (3, 3, 3),
                                    (1, 1, 1))
    a, b = q.unstitch_and_clean_sparse_data_pair(x, lab, -1)
    c, d = r.unstitch_and_clean_sparse_data_pair(x, lab, -1)
    assert torch.equal(a, c) and torch.equal(b, d)


# ---------------------------------------------------------------------------- errors
def test_errors(tmp_path):
    q = LargeNCYXQuilt(str(tmp_path / "q"), 2, 20, 16, (8, 8), (4, 4), 1, chunks=(8, 8))
    x = torch.randn(2, 2, 20, 16)
    with pytest.raises(QltyError, match=r"out of range \[0, 24\)"):
        q.unstitch(x, 24)
    with pytest.raises(QltyError, match="out of range"):
        q.stitch(torch.zeros(1, 2, 8, 8), -1)
    with pytest.raises(QltyError, match="patch index must be an int"):
        q.stitch(torch.zeros(1, 2, 8, 8), 1.5)
    with pytest.raises(QltyError, match="window"):
        q.stitch(torch.zeros(1, 2, 8, 7), 0)
    with pytest.raises(QltyError, match=r"must have shape \(3, C, \*window\)"):
        q.stitch(torch.zeros(2, 2, 8, 8), [0, 1, 2])
    with pytest.raises(QltyError, match="spatial shape"):
        q.unstitch(torch.zeros(2, 2, 20, 15), 0)
    with pytest.raises(QltyError, match="more than once"):
        q.stitch(torch.zeros(2, 2, 8, 8), [3, 3])
    with pytest.raises(QltyError, match="does not broadcast"):
        q.stitch(torch.zeros(1, 2, 8, 8), 0, patch_var=torch.zeros(3, 8, 8))
    with pytest.raises(QltyError, match="before any stitch"):
        q.return_mean()
    q.stitch(q.unstitch(x, 0), 0)
    with pytest.raises(QltyError, match="stitched twice"):
        q.stitch(q.unstitch(x, 0), 0)
    with pytest.raises(QltyError, match="channels"):
        q.stitch(torch.zeros(1, 3, 8, 8), 1)
    with pytest.raises(QltyError, match="patch_var must be given for every patch or for none"):
        q.stitch(q.unstitch(x, 1), 1, patch_var=torch.ones(1, 8, 8))
    with pytest.raises(QltyError, match="23 patches not stitched"):
        q.return_mean()
    with pytest.raises(QltyError, match="weight cannot change"):
        q.weight = torch.ones(8, 8)
    # a patch whose chunk is already complete
    q2 = LargeNCYXQuilt(str(tmp_path / "q2"), 1, 8, 16, (8, 8), (4, 4), None, chunks=(8, 4))
    y = torch.randn(1, 1, 8, 16)
    q2.stitch(q2.unstitch(y, 0), 0)
    q2._seen[0] = False  # as if the quilt had forgotten it
    with pytest.raises(QltyError, match="already complete and written"):
        q2.stitch(q2.unstitch(y, 0), 0)
    with pytest.raises(QltyError, match="N \\(number of images\\)"):
        LargeNCYXQuilt(str(tmp_path / "z"), 0, 8, 8, 4, 4, None)
    with pytest.raises(QltyError, match="exclude each other"):
        LargeNCYXQuilt(str(tmp_path / "z"), 1, 8, 8, 4, 4, None, overwrite=True, resume=True)
    with pytest.raises(QltyError, match="batch_size"):
        next(q.iter_patches(x, 0))
    with pytest.raises(QltyError, match="window"):
        LargeNCYXQuilt(str(tmp_path / "z"), 1, 8, 8, 9, 4, None)


def test_existing_outputs_overwrite_and_foreign(tmp_path):
    f = str(tmp_path / "q")
    x = torch.randn(1, 1, 8, 8)

    def run(**kw):
        q = LargeNCYXQuilt(f, 1, 8, 8, (4, 4), (4, 4), None, **kw)
        for i, p in q.iter_patches(x, 4):
            q.stitch(p, i)
        return q.return_mean()

    run()
    with pytest.raises(QltyError, match="already exists; pass overwrite=True"):
        LargeNCYXQuilt(f, 1, 8, 8, (4, 4), (4, 4), None)
    np.testing.assert_allclose(run(overwrite=True), x.numpy(), atol=1e-6)
    foreign = str(tmp_path / "other")
    os.makedirs(foreign + "_mean.zarr")
    for kw in ({"overwrite": True}, {"resume": True}):
        with pytest.raises(QltyError, match="not written by qlty_gpu"):
            LargeNCYXQuilt(foreign, 1, 8, 8, (4, 4), (4, 4), None, **kw)
    assert os.path.isdir(foreign + "_mean.zarr")


def test_max_memory(tmp_path):
    x = torch.randn(1, 2, 64, 64)
    q = LargeNCYXQuilt(str(tmp_path / "q"), 1, 64, 64, (8, 8), (4, 4), None, chunks=(16, 16))
    bound = q.memory_bound(2)
    assert bound == 6 * 16 * 16 * 2 * 4  # a row of 4 chunks and 2 of the next, C=2, float32
    with pytest.raises(QltyError, match="max_memory=1000 bytes is below"):
        next(LargeNCYXQuilt(str(tmp_path / "a"), 1, 64, 64, (8, 8), (4, 4), None,
                            chunks=(16, 16), max_memory=1000).iter_patches(x))
    assert q.memory_bound(2, batch_size=9) > bound
    ok = LargeNCYXQuilt(str(tmp_path / "b"), 1, 64, 64, (8, 8), (4, 4), None, chunks=(16, 16),
                        max_memory=q.memory_bound(2, batch_size=9))
    for i, p in ok.iter_patches(x, 9):
        ok.stitch(p, i)
    assert ok._acc.peak_bytes <= q.memory_bound(2, batch_size=9)
    np.testing.assert_allclose(ok.return_mean(), x.numpy(), atol=1e-6)
    # a random order keeps most chunks alive at once: refused before allocating
    bad = LargeNCYXQuilt(str(tmp_path / "c"), 1, 64, 64, (8, 8), (4, 4), None, chunks=(16, 16),
                         max_memory=bound)
    order = np.random.default_rng(0).permutation(bad.N_chunks).tolist()
    with pytest.raises(QltyError, match="would be exceeded"):
        for i in order:
            bad.stitch(bad.unstitch(x, i), i)


def test_custom_weight_and_float64(tmp_path):
    x = torch.randn(1, 2, 15, 13, dtype=torch.float64)
    q = LargeNCYXQuilt(str(tmp_path / "q"), 1, 15, 13, (5, 5), (3, 4), None, chunks=(6, 6),
                       dtype="float64")
    q.weight = np.outer(np.hanning(7)[1:-1], np.hanning(7)[1:-1])
    for i, p in q.iter_patches(x, 8):
        q.stitch(p, i)
    m = q.return_mean()
    assert m.dtype == np.float64
    np.testing.assert_allclose(m, x.numpy(), rtol=1e-6, atol=1e-9)  # eps=1e-8 vs norm >= 0.06


def test_seed_readme_example_3_small(tmp_path):
    """Example 3's loop (also run verbatim in test_seed_readme)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = LargeNCYXQuilt(str(tmp_path / "my_data"), 3, 64, 64, (32, 32), (16, 16), (10, 10), 0.1)
        data = torch.randn(3, 3, 64, 64)
        for _ in range(q.N_chunks):
            index, patch = q.unstitch_next(data)
            q.stitch(patch.unsqueeze(0), index)
        mean_result = q.return_mean()
        std_result = q.return_mean(std=True)
    np.testing.assert_allclose(mean_result, data.numpy(), atol=1e-5)
    assert isinstance(std_result, tuple) and not std_result[1].any()


# ---------------------------------------------------------------------------- CUDA
@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["auto", "direct", "fused"])
def test_cuda_patches_accumulate_on_the_gpu(tmp_path, mode):
    x = torch.randn(2, 2, 37, 29, device="cuda")
    q = LargeNCYXQuilt(str(tmp_path / "q"), 2, 37, 29, (8, 6), (5, 4), (1, 2), chunks=(10, 9),
                       accumulate=mode)
    for idx, p in q.iter_patches(x, 16):
        assert p.is_cuda
        q.stitch(p * 2, idx, patch_var=p * p)
        assert all(a.is_cuda for a in q._acc._acc.values())
    m, s = q.return_mean(std=True)
    np.testing.assert_allclose(m, 2 * x.cpu().numpy(), rtol=1e-5, atol=1e-5)
    cpu = LargeNCYXQuilt(str(tmp_path / "c"), 2, 37, 29, (8, 6), (5, 4), (1, 2), chunks=(10, 9))
    for idx, p in cpu.iter_patches(x.cpu(), 16):
        cpu.stitch(p * 2, idx, patch_var=p * p)
    np.testing.assert_allclose(s, cpu.return_mean(std=True)[1], rtol=1e-5, atol=1e-5)
    assert set(q._mean_sink.writer.paths) <= {"pinned", "kvikio"}
    assert "GB/s" in q.io_report


@pytest.mark.gpu
def test_cuda_uncompressed_output_goes_through_kvikio(tmp_path):
    pytest.importorskip("kvikio")
    x = torch.randn(1, 1, 3 * 64, 2 * 64 + 5, device="cuda")
    q = LargeNCYXQuilt(str(tmp_path / "q"), 1, *x.shape[2:], (64, 64), (32, 32), None,
                       chunks=(64, 64), compressors=None)
    for idx, p in q.iter_patches(x, 32):
        q.stitch(p, idx)
    np.testing.assert_allclose(q.return_mean(), x.cpu().numpy(), atol=1e-6)
    assert list(q._mean_sink.writer.paths) == ["kvikio"]
