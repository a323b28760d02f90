"""UMAP false colour: painting geometry vs qlty's KD-tree, output vs qlty on the same reducer,
range/shape/determinism, PNG, backend choice, the cuML path (gpu) and the CLI (slow)."""

from __future__ import annotations

import sys
import types

import numpy as np
import pytest
import torch

pytest.importorskip("sklearn")
from sklearn.decomposition import PCA  # noqa: E402
from sklearn.preprocessing import MinMaxScaler  # noqa: E402

from qlty_gpu.errors import QltyDependencyError, QltyError  # noqa: E402
from qlty_gpu.utils import false_color_2D as fc  # noqa: E402


def _centres(g):
    return np.stack([g.mean_patch_Y[:, 0].numpy(), g.mean_patch_X[:, 0].numpy()], 1)


@pytest.mark.parametrize("shape,w,s", [((1, 1, 37, 29), 8, 3), ((2, 3, 24, 24), 24, 8),
                                       ((1, 1, 20, 50), 5, 7)])
def test_nearest_patch_is_nearest_centre(shape, w, s):
    g = fc.FalseColorGenerator(shape, window_size=w, step_size=s, reducer=PCA(3))
    h, x = shape[-2:]
    assert g.idx.shape == (h * x,) and g.idx.dtype == np.int64
    pix = np.stack(np.meshgrid(np.arange(h), np.arange(x), indexing="ij"), -1).reshape(-1, 2)
    c = _centres(g)
    d_all = ((pix[:, None, :] - c[None, :, :]) ** 2).sum(-1)
    # same distance as the brute-force nearest centre (ties may pick either centre) ...
    assert np.array_equal(d_all[np.arange(len(pix)), g.idx], d_all.min(1))
    # ... and the first one on ties
    assert np.array_equal(g.idx, d_all.argmin(1))
    assert g.mean_patch_X.shape == (g.patch_X.shape[0], 1)


def _trained_pca(images, w, s):
    g = fc.FalseColorGenerator(images.shape, window_size=w, step_size=s)
    flat = g.qlty_object.unstitch(images).reshape(-1, images.shape[1] * w * w).numpy()
    return PCA(3, random_state=0).fit(flat)


def test_output_matches_qlty_on_the_same_reducer():
    qfc = pytest.importorskip("qlty.utils.false_color_2D")
    img = torch.randn(1, 2, 33, 41)
    red = _trained_pca(img, 9, 5)  # odd centre spacing: ties only next to clamped patches
    ours = fc.FalseColorGenerator(img.shape, 9, 5, reducer=red, scaler=MinMaxScaler())
    ref = qfc.FalseColorGenerator(img.shape, 9, 5, reducer=red, scaler=MinMaxScaler())
    ours.scaler_is_trained = ref.scaler_is_trained = False  # both fit the scaler on the call
    a, b = ours(img), ref(img)
    assert a.shape == b.shape == (33, 41, 3) and a.dtype == np.float32
    same = (ours.idx == ref.idx).reshape(33, 41)
    assert same.mean() > 0.9  # the rest are ties between equidistant centres
    np.testing.assert_allclose(a[same], np.clip(b[same], 0, 1), rtol=1e-5, atol=1e-6)


def test_range_clipped_both_sides_and_deterministic():
    img = torch.randn(1, 1, 30, 30)
    red = _trained_pca(torch.randn(2, 1, 30, 30), 8, 4)
    scaler = MinMaxScaler().fit(np.zeros((2, 3)) + [[0], [1e-3]])  # forces values far outside
    g = fc.FalseColorGenerator(img.shape, 8, 4, reducer=red, scaler=scaler)
    rgb = g(img)
    assert rgb.min() >= 0.0 and rgb.max() <= 1.0 and (rgb == 0).any() and (rgb == 1).any()
    assert np.array_equal(rgb, g(img))
    with pytest.raises(AssertionError):
        g(torch.randn(2, 1, 30, 30))
    with pytest.raises(AssertionError):
        g.train_reducer(torch.randn(1, 30, 30))


def test_user_reducer_keeps_its_settings():
    class Reducer:  # a UMAP-like reducer without set_params
        n_neighbors = 30
        metric = "cosine"

        def fit_transform(self, x):
            self.fitted = x.shape
            return np.asarray(x)[:, :3]

        def transform(self, x):
            return np.asarray(x)[:, :3]

    red = Reducer()
    g = fc.FalseColorGenerator((1, 1, 16, 16), 8, 4, reducer=red)
    g.train_reducer(torch.randn(1, 1, 16, 16))
    assert g.reducer is red and red.metric == "cosine"
    assert red.n_neighbors == 8 and red.fitted == (9, 64)  # 9 patches: lowered to n - 1
    assert g(torch.randn(1, 1, 16, 16)).shape == (16, 16, 3)


def test_png_written_and_readable(tmp_path):
    from PIL import Image

    img = torch.randn(1, 1, 24, 32)
    g = fc.FalseColorGenerator(img.shape, 8, 4, reducer=_trained_pca(img, 8, 4))
    with pytest.raises(QltyError, match="no false-colour image yet"):
        g.save_png(tmp_path / "x.png")
    rgb = g(img)
    path = g.save_png(tmp_path / "x.png")
    back = np.asarray(Image.open(path))
    assert back.shape == (24, 32, 3) and back.dtype == np.uint8
    assert np.abs(back.astype(float) / 255 - rgb).max() <= 0.5 / 255 + 1e-6
    assert not (tmp_path / "x.png.partial").exists()
    with pytest.raises(QltyError, match="rgb must have shape"):
        fc.save_png(tmp_path / "y.png", rgb[..., 0])


def test_backend_choice_reported_and_forceable(monkeypatch):
    monkeypatch.delenv("QLTY_GPU_FALSE_COLOR_BACKEND", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert fc.choose_false_color_backend() == ("umap", "umap-learn on the CPU (no CUDA device)")
    assert fc.choose_false_color_backend("umap") == ("umap", "forced")
    with pytest.raises(QltyDependencyError, match="'cuml' cannot run: no CUDA device"):
        fc.choose_false_color_backend("cuml")
    monkeypatch.setenv("QLTY_GPU_FALSE_COLOR_BACKEND", "cuml")
    with pytest.raises(QltyDependencyError):
        fc.FalseColorGenerator((1, 1, 16, 16), 8, 4)
    monkeypatch.setenv("QLTY_GPU_FALSE_COLOR_BACKEND", "tsne")
    with pytest.raises(QltyError, match="must be one of"):
        fc.choose_false_color_backend()
    # the seam: CUDA plus an importable cuml picks cuML
    monkeypatch.delenv("QLTY_GPU_FALSE_COLOR_BACKEND")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setitem(sys.modules, "cuml", types.ModuleType("cuml"))
    assert fc.choose_false_color_backend()[0] == "cuml"
    assert fc.choose_false_color_backend(device="cpu")[0] == "umap"
    monkeypatch.setitem(sys.modules, "cuml", None)
    assert "cuML not installed" in fc.choose_false_color_backend()[1]


@pytest.fixture(scope="module")
def umap_trained():
    pytest.importorskip("umap")
    img = torch.randn(1, 1, 32, 32)
    g = fc.FalseColorGenerator(img.shape, window_size=8, step_size=4, backend="umap")
    g.train_reducer(img)
    return g, img


@pytest.mark.slow
def test_umap_shape_range_determinism(umap_trained):
    g, img = umap_trained
    rgb = g(img)
    assert rgb.shape == (32, 32, 3) and rgb.dtype == np.float32
    assert rgb.min() >= 0 and rgb.max() <= 1
    assert len(np.unique(rgb.reshape(-1, 3), axis=0)) == g.patch_X.shape[0]
    g2 = fc.FalseColorGenerator(img.shape, window_size=8, step_size=4, backend="umap")
    g2.train_reducer(img)
    assert np.array_equal(rgb, g2(img))
    other = g(torch.randn(1, 1, 32, 32))  # a new image goes through reducer.transform
    assert other.shape == (32, 32, 3) and other.min() >= 0 and other.max() <= 1


@pytest.mark.slow
def test_cli_false_color(tmp_path):
    tifffile = pytest.importorskip("tifffile")
    from PIL import Image

    from qlty_gpu.cli import main

    y, x = np.mgrid[0:40, 0:48]
    tifffile.imwrite(tmp_path / "in.tif", (np.sin(x / 3.0) * (y < 20)).astype(np.float32))
    assert main(["false-color", str(tmp_path / "in.tif"), str(tmp_path / "o.png"),
                 "--window", "8", "--step", "4"]) == 0
    assert np.asarray(Image.open(tmp_path / "o.png")).shape == (40, 48, 3)


@pytest.mark.gpu
def test_cuml_backend_on_cuda():
    pytest.importorskip("cuml")
    img = torch.randn(1, 1, 48, 48, device="cuda")
    g = fc.FalseColorGenerator(img.shape, 8, 4)
    assert g.backend == "cuml" and g.device.type == "cuda"
    g.train_reducer(img)
    rgb = g(img)
    assert rgb.shape == (48, 48, 3) and rgb.min() >= 0 and rgb.max() <= 1
    other = g(torch.randn(1, 1, 48, 48, device="cuda"))
    assert np.isfinite(other).all()


@pytest.mark.parametrize("kind", ["noise", "smooth", "structured"])
def test_principal_axes_keep_the_variance_of_the_exact_ones(kind):
    """The randomized PCA in front of UMAP keeps the variance the exact top-k axes keep
    (1e-4 relative on images with structure, 2 % on white noise: a flat spectrum)."""
    from qlty_gpu import NCYXQuilt

    g = torch.Generator().manual_seed(0)
    if kind == "noise":
        img = torch.randn(1, 1, 128, 128, generator=g)
    elif kind == "smooth":
        img = torch.nn.functional.avg_pool2d(torch.randn(1, 1, 144, 144, generator=g), 17, 1)
    else:
        yy, xx = torch.meshgrid(torch.linspace(0, 8, 128), torch.linspace(0, 8, 128),
                                indexing="ij")
        img = (torch.sin(xx * yy / 3) + 0.1 * torch.randn(128, 128, generator=g))[None, None]
    x = NCYXQuilt(128, 128, window=(16, 16), step=(4, 4), border=None).unstitch(img)
    x = x.reshape(x.shape[0], -1)
    x = x - x.mean(0)
    k = 16
    exact = torch.linalg.svd(x, full_matrices=False)[2][:k].T
    fast = fc.principal_axes(x, k, seed=0)
    assert fast.shape == (256, k)
    assert torch.allclose(fast.T @ fast, torch.eye(k), atol=1e-4)  # orthonormal
    kept = [float((x @ c).pow(2).sum() / x.pow(2).sum()) for c in (exact, fast)]
    assert kept[1] <= kept[0] + 1e-5
    assert kept[1] >= kept[0] * (0.98 if kind == "noise" else 0.9999)
    assert torch.equal(fast, fc.principal_axes(x, k, seed=0))  # deterministic
    small = fc.principal_axes(x[:20], 8)  # 2 * (k + 10) >= min(n, D): the full SVD
    assert torch.allclose(small.abs(), torch.linalg.svd(x[:20], full_matrices=False)[2][:8].T.abs(),
                          atol=1e-5)
