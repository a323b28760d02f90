"""Image stacks to Zarr / OME-Zarr / Laplacian pyramids (issue 4).

Regression tests named ``test_bug_*`` pin each [BUG]/weakness listed for
``qlty.utils.stack_to_zarr`` in the behaviour spec (§2.9, §3.3 item 13, §4.2).
"""

from __future__ import annotations

import itertools
import re
import tracemalloc
import warnings
from pathlib import Path

import numpy as np
import pytest
import tifffile
import zarr
from test_stack_helpers import CONVERTERS, PAT, PNG_PAT, convert, no_partials, rand, write_stack

import qlty_gpu.io.pipeline as pipeline
import qlty_gpu.io.plan as planning
import qlty_gpu.io.pyramid as pyramid
import qlty_gpu.utils.stack_to_zarr as s2z
from qlty_gpu.errors import QltyDependencyError, QltyError
from qlty_gpu.io.images import ImageReadError
from qlty_gpu.utils.stack_to_zarr import (
    NGFFConformanceWarning,
    StackGapWarning,
    reconstruct_from_laplacian_pyramid,
    stack_files_to_ome_zarr,
    stack_files_to_ome_zarr_laplacian,
    stack_files_to_zarr,
)


def block_mean_ref(a: np.ndarray, f: tuple[int, ...]) -> np.ndarray:
    """Mean of f-sized blocks; edge blocks average only existing elements (float64)."""
    out_shape = tuple(-(-s // k) for s, k in zip(a.shape, f))
    out = np.zeros(out_shape)
    for idx in itertools.product(*(range(n) for n in out_shape)):
        sl = tuple(slice(i * k, (i + 1) * k) for i, k in zip(idx, f))
        out[idx] = a[sl].astype(np.float64).mean()
    return out


# ------------------------------------------------------------------------------------------
# imports and basics
# ------------------------------------------------------------------------------------------


def test_import_paths():
    import qlty_gpu.utils as u

    assert u.stack_files_to_zarr is stack_files_to_zarr
    assert u.stack_files_to_ome_zarr is stack_files_to_ome_zarr
    assert "stack_files_to_zarr" in u.__all__ and "stack_files_to_ome_zarr" in u.__all__


def test_zarr_single_channel_tiff(tmp_path):
    imgs = [rand((16, 12), seed=i) for i in range(5)]
    write_stack(tmp_path / "in", "cells", imgs)
    r = stack_files_to_zarr(tmp_path / "in", ".tif", PAT, output_dir=tmp_path / "out")
    info = r["cells"]
    assert set(info) >= {
        "zarr_path",
        "shape",
        "dtype",
        "file_count",
        "files",
        "counter_range",
        "axis_order",
    }
    assert info["shape"] == (5, 16, 12) and info["dtype"] == np.uint16
    assert (
        info["file_count"] == 5 and info["counter_range"] == (0, 4) and info["axis_order"] == "ZYX"
    )
    arr = zarr.open_array(info["zarr_path"], mode="r")
    assert arr.metadata.zarr_format == 3
    np.testing.assert_array_equal(arr[:], np.stack(imgs))
    assert arr.chunks == (1, 16, 12)
    attrs = dict(arr.attrs)
    for key in (
        "basename",
        "file_count",
        "counter_range",
        "axis_order",
        "files",
        "pattern",
        "extension",
    ):
        assert key in attrs
    assert attrs["qlty_gpu"]["complete"] is True
    assert list(arr.metadata.dimension_names) == ["z", "y", "x"]
    assert no_partials(tmp_path / "out")


def test_default_output_dir_is_input_dir(tmp_path):
    write_stack(tmp_path, "a", [rand((8, 8))] * 2)
    r = stack_files_to_zarr(tmp_path, "tif", PAT)
    assert Path(r["a"]["zarr_path"]) == tmp_path / "a.zarr"
    r = stack_files_to_zarr(tmp_path, "tif", PAT, output_naming=lambda b: f"{b}_stack.zarr")
    assert Path(r["a"]["zarr_path"]).name == "a_stack.zarr"


def test_png_inputs_gray_rgb_and_16bit(tmp_path):
    gray = [rand((10, 9), np.uint8, i) for i in range(3)]
    rgb = [rand((10, 9, 3), np.uint8, 10 + i) for i in range(3)]
    g16 = [rand((10, 9), np.uint16, 20 + i) for i in range(3)]
    write_stack(tmp_path, "gray", gray, ext=".png")
    write_stack(tmp_path, "rgb", rgb, ext=".png")
    write_stack(tmp_path, "deep", g16, ext=".png")
    r = stack_files_to_zarr(tmp_path, ".png", PNG_PAT, output_dir=tmp_path / "o")
    np.testing.assert_array_equal(zarr.open_array(r["gray"]["zarr_path"])[:], np.stack(gray))
    np.testing.assert_array_equal(zarr.open_array(r["deep"]["zarr_path"])[:], np.stack(g16))
    assert r["deep"]["dtype"] == np.uint16
    # RGB (Y, X, 3) -> ZCYX
    np.testing.assert_array_equal(
        zarr.open_array(r["rgb"]["zarr_path"])[:], np.stack(rgb).transpose(0, 3, 1, 2)
    )
    assert r["rgb"]["shape"] == (3, 3, 10, 9) and r["rgb"]["axis_order"] == "ZCYX"


def test_extension_case_dirs_and_anchored_match(tmp_path):
    write_stack(tmp_path, "a", [rand((8, 8))] * 2, ext=".TIF")
    (tmp_path / "a_7.tif").mkdir()  # a directory is skipped
    (tmp_path / "xa_1.txt").write_text("not an image")
    r = stack_files_to_zarr(tmp_path, ".TIF", PAT.replace("tif", "TIF"), output_dir=tmp_path / "o")
    assert r["a"]["file_count"] == 2


def test_counter_sorting_ignores_padding(tmp_path):
    imgs = [np.full((4, 4), c, np.uint16) for c in (10, 2, 1)]
    folder = tmp_path / "in"
    folder.mkdir()
    tifffile.imwrite(folder / "s_10.tif", imgs[0])
    tifffile.imwrite(folder / "s_002.tif", imgs[1])
    tifffile.imwrite(folder / "s_1.tif", imgs[2])
    with pytest.warns(StackGapWarning):
        r = stack_files_to_zarr(folder, ".tif", PAT, output_dir=tmp_path / "o")
    assert zarr.open_array(r["s"]["zarr_path"])[:, 0, 0].tolist() == [1, 2, 10]
    with pytest.warns(StackGapWarning):
        r = stack_files_to_zarr(
            folder, ".tif", PAT, output_dir=tmp_path / "o2", sort_by_counter=False
        )
    # deterministic file-name order (qlty used the arbitrary directory order)
    assert zarr.open_array(r["s"]["zarr_path"])[:, 0, 0].tolist() == [2, 1, 10]


def test_multiple_stacks_each_complete(tmp_path):
    write_stack(tmp_path, "a", [rand((8, 8), seed=i) for i in range(3)])
    write_stack(tmp_path, "b", [rand((6, 5), seed=9 + i) for i in range(4)])
    r = stack_files_to_zarr(tmp_path, ".tif", PAT, output_dir=tmp_path / "o")
    assert r["a"]["shape"] == (3, 8, 8) and r["b"]["shape"] == (4, 6, 5)


@pytest.mark.parametrize("order", ["".join(p) for p in itertools.permutations("ZCYX")])
def test_all_axis_orders_plain_zarr(tmp_path, order):
    imgs = [rand((3, 7, 9), seed=i) for i in range(4)]  # (C, Y, X) since last dim > 4
    write_stack(tmp_path, "m", imgs)
    r = stack_files_to_zarr(
        tmp_path, ".tif", PAT, output_dir=tmp_path / "o", axis_order=order.lower()
    )
    zcyx = np.stack(imgs)
    expect = np.transpose(zcyx, ["ZCYX".index(a) for a in order])
    arr = zarr.open_array(r["m"]["zarr_path"])
    np.testing.assert_array_equal(arr[:], expect)
    assert r["m"]["axis_order"] == order and r["m"]["shape"] == expect.shape
    assert arr.chunks[order.index("Z")] == 1
    assert list(arr.metadata.dimension_names) == list(order.lower())


def test_tiff_planar_cyx_with_small_x_uses_header(tmp_path):
    # qlty's rule (last dim <= 4 means YXC) would misread this planar (C, Y, X) image.
    imgs = [rand((3, 16, 4), seed=i) for i in range(2)]
    for i, img in enumerate(imgs):
        tifffile.imwrite(tmp_path / f"p_{i}.tif", img, photometric="minisblack")
    r = stack_files_to_zarr(tmp_path, ".tif", PAT, output_dir=tmp_path / "o")
    assert r["p"]["shape"] == (2, 3, 16, 4)
    np.testing.assert_array_equal(zarr.open_array(r["p"]["zarr_path"])[:], np.stack(imgs))


def test_custom_chunks_and_bad_chunks(tmp_path):
    write_stack(tmp_path, "a", [rand((16, 16), seed=i) for i in range(6)])
    r = stack_files_to_zarr(
        tmp_path, ".tif", PAT, output_dir=tmp_path / "o", zarr_chunks=(4, 8, 8), batch_size=1
    )
    arr = zarr.open_array(r["a"]["zarr_path"])
    assert arr.chunks == (4, 8, 8)
    np.testing.assert_array_equal(arr[:], np.stack([rand((16, 16), seed=i) for i in range(6)]))
    with pytest.raises(QltyError, match="zarr_chunks must have 3 positive entries"):
        stack_files_to_zarr(tmp_path, ".tif", PAT, output_dir=tmp_path / "o", zarr_chunks=(1, 8))


def test_dtype_conversion_rounds_and_clips(tmp_path):
    imgs = [np.array([[0, 100, 300, 65535]], np.uint16).repeat(2, 0)] * 2
    write_stack(tmp_path, "a", imgs)
    r = stack_files_to_zarr(tmp_path, ".tif", PAT, output_dir=tmp_path / "o", dtype=np.uint8)
    assert zarr.open_array(r["a"]["zarr_path"])[0, 0].tolist() == [0, 100, 255, 255]
    fl = [np.array([[0.4, 0.6, -3.0, 1e9]], np.float32).repeat(2, 0)] * 2
    write_stack(tmp_path / "f", "f", fl)
    r = stack_files_to_zarr(tmp_path / "f", ".tif", PAT, output_dir=tmp_path / "o", dtype="uint16")
    assert zarr.open_array(r["f"]["zarr_path"])[0, 0].tolist() == [0, 1, 0, 65535]


def test_dry_run_writes_nothing(tmp_path):
    write_stack(tmp_path, "a", [rand((8, 8))] * 3)
    r = stack_files_to_zarr(tmp_path, ".tif", PAT, output_dir=tmp_path / "o", dry_run=True)
    assert r["a"]["shape"] == (3, 8, 8)
    assert not (tmp_path / "o").exists()
    r = stack_files_to_ome_zarr(
        tmp_path,
        ".tif",
        PAT,
        output_dir=tmp_path / "o",
        dry_run=True,
        pyramid_levels=2,
        verbose=False,
    )
    assert r["a"]["pyramid_levels"] == 2 and not (tmp_path / "o").exists()


@pytest.mark.parametrize("workers", [0, 1, 3, None])
def test_num_workers_same_result(tmp_path, workers):
    imgs = [rand((9, 11), seed=i) for i in range(7)]
    write_stack(tmp_path, "a", imgs)
    r = stack_files_to_ome_zarr(
        tmp_path,
        ".tif",
        PAT,
        output_dir=tmp_path / "o",
        num_workers=workers,
        pyramid_levels=2,
        batch_size=2,
        verbose=False,
    )
    g = zarr.open_group(r["a"]["zarr_path"], mode="r")
    np.testing.assert_array_equal(g["0"][:], np.stack(imgs))


def test_gaps_warn_record_and_fill(tmp_path, capsys):
    imgs = [np.full((4, 4), c, np.uint16) for c in (0, 1, 4)]
    write_stack(tmp_path, "gap", imgs, counters=[0, 1, 4])
    with pytest.warns(StackGapWarning, match=r"gap.*missing counters: \[2, 3\]"):
        r = stack_files_to_zarr(tmp_path, ".tif", PAT, output_dir=tmp_path / "o")
    assert r["gap"]["missing_counters"] == [2, 3] and r["gap"]["shape"] == (3, 4, 4)
    arr = zarr.open_array(r["gap"]["zarr_path"])
    assert arr.attrs["qlty_gpu"]["missing_counters"] == [2, 3]
    with pytest.warns(StackGapWarning):
        r = stack_files_to_zarr(tmp_path, ".tif", PAT, output_dir=tmp_path / "f", fill_gaps=True)
    arr = zarr.open_array(r["gap"]["zarr_path"])
    assert arr.shape == (5, 4, 4) and arr[:, 0, 0].tolist() == [0, 1, 0, 0, 4]
    assert "missing counters: [2, 3]" in capsys.readouterr().out  # qlty printed it; kept


def test_fill_gaps_rejects_duplicate_counters(tmp_path):
    tifffile.imwrite(tmp_path / "d_1.tif", np.zeros((4, 4), np.uint8))
    tifffile.imwrite(tmp_path / "d_01.tif", np.zeros((4, 4), np.uint8))
    with pytest.raises(QltyError, match="duplicate counters"):
        stack_files_to_zarr(tmp_path, ".tif", PAT, fill_gaps=True)


# ------------------------------------------------------------------------------------------
# errors
# ------------------------------------------------------------------------------------------


def test_error_directory_missing(tmp_path):
    for kind in CONVERTERS:
        with pytest.raises(QltyError, match="Directory does not exist"):
            convert(kind, tmp_path / "nope")


def test_error_pattern_groups(tmp_path):
    write_stack(tmp_path, "a", [rand((4, 4))])
    with pytest.raises(
        ValueError, match="Pattern must have at least 2 groups.*Pattern has no groups"
    ):
        stack_files_to_zarr(tmp_path, ".tif", r".+\.tif$")
    with pytest.raises(ValueError, match="Pattern must have at least 2 groups.*Got 1 groups"):
        stack_files_to_zarr(tmp_path, ".tif", r"(.+)_\d+\.tif$")


def test_error_no_files_matching(tmp_path):
    write_stack(tmp_path, "a", [rand((4, 4))])
    with pytest.raises(QltyError, match="no files matching.*none matches pattern"):
        stack_files_to_zarr(tmp_path, ".tif", r"(zz)_(\d+)\.tif$")
    with pytest.raises(QltyError, match="no files matching.*extension '.png'"):
        stack_files_to_ome_zarr(tmp_path, ".png", PNG_PAT, verbose=False)


def test_error_unsupported_dimensions(tmp_path):
    tifffile.imwrite(
        tmp_path / "v_0.tif", np.zeros((2, 3, 8, 8), np.uint8), photometric="minisblack"
    )
    with pytest.raises(QltyError, match="Unsupported image dimensions: 4D"):
        stack_files_to_zarr(tmp_path, ".tif", PAT)


def test_error_mismatched_shapes_names_file_and_writes_nothing(tmp_path):
    paths = write_stack(tmp_path, "a", [rand((8, 8)), rand((8, 8)), rand((8, 9))])
    with pytest.raises(QltyError, match=f"{re.escape(str(paths[2]))} has shape"):
        stack_files_to_ome_zarr(tmp_path, ".tif", PAT, output_dir=tmp_path / "o", verbose=False)
    assert not (tmp_path / "o" / "a.ome.zarr").exists()


def test_error_axis_order(tmp_path):
    write_stack(tmp_path, "a", [rand((3, 8, 8))] * 2)
    with pytest.raises(QltyError, match="axis_order must contain exactly"):
        stack_files_to_zarr(tmp_path, ".tif", PAT, axis_order="ZCY")


def test_error_downsample_mode_and_method(tmp_path):
    write_stack(tmp_path, "a", [rand((8, 8))] * 2)
    with pytest.raises(QltyError, match="Invalid downsample_mode.*Must be '2d'"):
        stack_files_to_ome_zarr(tmp_path, ".tif", PAT, downsample_mode="4d")
    with pytest.raises(QltyError, match="Unknown downsample_method"):
        stack_files_to_ome_zarr(tmp_path, ".tif", PAT, downsample_method="lanczos")
    with pytest.raises(QltyError, match="downsample_axes must be a subset"):
        stack_files_to_ome_zarr(tmp_path, ".tif", PAT, downsample_axes=("c",))


def test_error_bad_scale_factors(tmp_path):
    write_stack(tmp_path, "a", [rand((12, 12))] * 2)
    with pytest.raises(QltyError, match="multiple of the previous"):
        stack_files_to_ome_zarr(
            tmp_path, ".tif", PAT, pyramid_scale_factors=[(1, 2, 2), (1, 3, 3)], verbose=False
        )
    with pytest.raises(QltyError, match="must have 3 entries"):
        stack_files_to_ome_zarr(
            tmp_path, ".tif", PAT, pyramid_scale_factors=[(2, 2)], verbose=False
        )


def test_error_corrupt_file_names_file(tmp_path):
    write_stack(tmp_path, "a", [rand((8, 8))] * 3)
    (tmp_path / "a_1.tif").write_bytes(b"this is not a tiff")
    with pytest.raises(QltyError, match=r"a_1\.tif.*unreadable or corrupt"):
        stack_files_to_zarr(tmp_path, ".tif", PAT, output_dir=tmp_path / "o")
    assert not (tmp_path / "o" / "a.zarr").exists()


def test_load_image_no_library_runtime_error(tmp_path, monkeypatch):
    p = write_stack(tmp_path, "a", [rand((4, 4))])[0]
    monkeypatch.setattr(s2z, "tifffile", None, raising=False)
    monkeypatch.setattr(s2z, "Image", None, raising=False)
    with pytest.raises(RuntimeError, match="Cannot load image.*No suitable library"):
        s2z._load_image(p)
    with pytest.raises(QltyDependencyError, match=r"No suitable library.*qlty_gpu\[io\]"):
        stack_files_to_zarr(tmp_path, ".tif", PAT)


def test_pil_fallback_when_tifffile_disabled(tmp_path, monkeypatch):
    img = rand((6, 5), np.uint8)
    write_stack(tmp_path, "a", [img] * 2)
    monkeypatch.setattr(s2z, "tifffile", None, raising=False)
    r = stack_files_to_zarr(tmp_path, ".tif", PAT, output_dir=tmp_path / "o")
    np.testing.assert_array_equal(zarr.open_array(r["a"]["zarr_path"])[0], img)


# ------------------------------------------------------------------------------------------
# interrupted / failed conversions leave no complete-looking store
# ------------------------------------------------------------------------------------------


def test_interrupted_conversion_leaves_no_complete_store(tmp_path):
    from PIL import Image

    imgs = [rand((32, 32), np.uint8, i) for i in range(8)]
    write_stack(tmp_path, "s", imgs, ext=".png")
    bad = tmp_path / "s_5.png"
    data = bad.read_bytes()
    bad.write_bytes(data[: len(data) // 2])  # header intact, pixel data truncated
    assert Image.open(bad).size == (32, 32)
    out = tmp_path / "o"
    for kind, workers in itertools.product(CONVERTERS, (1, 3)):
        with pytest.raises(QltyError, match=r"s_5\.png"):
            convert(kind, tmp_path, PNG_PAT, ".png", output_dir=out, batch_size=2,
                    num_workers=workers)
        assert not list(out.glob("*.zarr")), list(out.iterdir())
        assert no_partials(out)


def test_failed_rewrite_keeps_previous_store(tmp_path):
    imgs = [rand((8, 8), seed=i) for i in range(4)]
    write_stack(tmp_path, "a", imgs)
    out = tmp_path / "o"
    stack_files_to_zarr(tmp_path, ".tif", PAT, output_dir=out)
    (tmp_path / "a_3.tif").write_bytes(b"garbage")
    with pytest.raises(QltyError, match=r"a_3\.tif"):
        stack_files_to_zarr(tmp_path, ".tif", PAT, output_dir=out)
    np.testing.assert_array_equal(zarr.open_array(out / "a.zarr")[:], np.stack(imgs))
    assert no_partials(out)


def test_keyboard_interrupt_removes_partial(tmp_path, monkeypatch):
    write_stack(tmp_path, "a", [rand((8, 8), seed=i) for i in range(6)])
    real = pipeline.read_image
    calls = {"n": 0}

    def flaky(path, **kw):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return real(path, **kw)

    monkeypatch.setattr(pipeline, "read_image", flaky)  # the slice reader
    monkeypatch.setattr(planning, "read_image", flaky)  # header fallback
    out = tmp_path / "o"
    with pytest.raises(KeyboardInterrupt):
        stack_files_to_ome_zarr(
            tmp_path,
            ".tif",
            PAT,
            output_dir=out,
            batch_size=1,
            num_workers=1,
            pyramid_levels=2,
            verbose=False,
        )
    assert not list(out.glob("*.zarr")) and no_partials(out)


# ------------------------------------------------------------------------------------------
# OME-Zarr / NGFF 0.5
# ------------------------------------------------------------------------------------------


def _validate_ngff(path):
    from ome_zarr_models.v05.image import Image

    g = zarr.open_group(path, mode="r")
    assert g.metadata.zarr_format == 3
    Image.from_zarr(g)  # raises on invalid metadata
    return g


@pytest.mark.parametrize(
    "case",
    [
        dict(img=(16, 16), kw=dict()),
        dict(img=(3, 16, 16), kw=dict(axis_order="CZYX")),
        dict(
            img=(16, 20),
            kw=dict(downsample_mode="3d", unit="micrometer", voxel_size=(2.0, 0.5, 0.5)),
        ),
        dict(
            img=(3, 16, 16),
            kw=dict(axis_order="CZYX", downsample_axes=("z", "y", "x"), unit="nanometer"),
        ),
    ],
)
def test_ngff_schema_validation(tmp_path, case):
    write_stack(tmp_path, "a", [rand(case["img"], seed=i) for i in range(5)])
    r = stack_files_to_ome_zarr(
        tmp_path,
        ".tif",
        PAT,
        output_dir=tmp_path / "o",
        pyramid_levels=3,
        verbose=False,
        **case["kw"],
    )
    g = _validate_ngff(r["a"]["zarr_path"])
    ome = g.attrs["ome"]
    assert ome["version"] == "0.5"
    ms = ome["multiscales"][0]
    order = r["a"]["axis_order"]
    assert [a["name"] for a in ms["axes"]] == list(order.lower())
    assert [d["path"] for d in ms["datasets"]] == ["0", "1", "2"]
    for lvl, d in enumerate(ms["datasets"]):
        assert list(g[str(lvl)].metadata.dimension_names) == list(order.lower())
        assert d["coordinateTransformations"][0]["type"] == "scale"
        assert g[str(lvl)].shape == tuple(r["a"]["level_shapes"][lvl])
    if "unit" in case["kw"]:
        assert all(a.get("unit") == case["kw"]["unit"] for a in ms["axes"] if a["type"] == "space")


def test_ome_pyramid_values_match_reference(tmp_path):
    imgs = [rand((13, 11), np.float32, i) for i in range(5)]
    write_stack(tmp_path, "a", imgs)
    r = stack_files_to_ome_zarr(
        tmp_path,
        ".tif",
        PAT,
        output_dir=tmp_path / "o",
        pyramid_levels=3,
        downsample_mode="3d",
        batch_size=4,
        verbose=False,
    )
    g = zarr.open_group(r["a"]["zarr_path"], mode="r")
    vol = np.stack(imgs).astype(np.float64)
    lvl1 = block_mean_ref(vol, (2, 2, 2))
    np.testing.assert_allclose(g["1"][:], lvl1, rtol=1e-5)
    np.testing.assert_allclose(g["2"][:], block_mean_ref(lvl1, (2, 2, 2)), rtol=1e-5)
    ms = g.attrs["ome"]["multiscales"][0]
    assert ms["datasets"][2]["coordinateTransformations"] == [
        {"type": "scale", "scale": [4.0, 4.0, 4.0]},
        {"type": "translation", "translation": [1.5, 1.5, 1.5]},
    ]


@pytest.mark.parametrize("batch", [1, 2, 3, None])
def test_streaming_batches_give_identical_pyramids(tmp_path, batch):
    imgs = [rand((3, 10, 9), np.uint16, i) for i in range(9)]
    write_stack(tmp_path, "a", imgs)
    kw = dict(
        output_dir=tmp_path / "o",
        pyramid_levels=3,
        axis_order="CZYX",
        downsample_mode="3d",
        verbose=False,
    )
    ref = stack_files_to_ome_zarr(tmp_path, ".tif", PAT, batch_size=64, **kw)
    ref_levels = [zarr.open_group(ref["a"]["zarr_path"])[str(i)][:] for i in range(3)]
    kw["output_dir"] = tmp_path / f"b{batch}"
    r = stack_files_to_ome_zarr(tmp_path, ".tif", PAT, batch_size=batch, **kw)
    g = zarr.open_group(r["a"]["zarr_path"])
    for i in range(3):
        np.testing.assert_array_equal(g[str(i)][:], ref_levels[i])


def test_ome_auto_levels_and_naming(tmp_path):
    assert [pyramid.num_levels(d, d, None, None) for d in (200, 257, 512, 513, 1024, 4096, 9000)] == [
        1,
        2,
        2,
        2,
        3,
        5,
        5,
    ]
    write_stack(tmp_path, "a", [rand((8, 8))] * 2)
    r = stack_files_to_ome_zarr(
        tmp_path,
        ".tif",
        PAT,
        output_dir=tmp_path / "o",
        verbose=False,
        output_naming=lambda b: f"{b}_x.zarr",
    )
    assert r["a"]["pyramid_levels"] == 1 and r["a"]["zarr_path"].endswith("a_x.ome.zarr")
    _validate_ngff(r["a"]["zarr_path"])


def test_ome_custom_scale_factors(tmp_path):
    write_stack(tmp_path, "a", [rand((12, 12), seed=i) for i in range(2)])
    r = stack_files_to_ome_zarr(
        tmp_path,
        ".tif",
        PAT,
        output_dir=tmp_path / "o",
        verbose=False,
        pyramid_scale_factors=[(1, 2, 2), (1, 6, 6)],
    )
    g = _validate_ngff(r["a"]["zarr_path"])
    assert g["1"].shape == (2, 6, 6) and g["2"].shape == (2, 2, 2)
    np.testing.assert_array_equal(g["2"][:], np.rint(block_mean_ref(g["0"][:], (1, 6, 6))))


def test_ome_readable_with_dask(tmp_path):
    da = pytest.importorskip("dask.array")
    imgs = [rand((3, 16, 16), seed=i) for i in range(3)]
    write_stack(tmp_path, "a", imgs)
    r = stack_files_to_ome_zarr(
        tmp_path,
        ".tif",
        PAT,
        output_dir=tmp_path / "o",
        axis_order="CZYX",
        pyramid_levels=2,
        verbose=False,
    )
    x = da.from_zarr(zarr.open_group(r["a"]["zarr_path"], mode="r")["0"])
    np.testing.assert_array_equal(x.compute(), np.stack(imgs).transpose(1, 0, 2, 3))


def test_ome_chunks_apply_to_all_levels(tmp_path):
    write_stack(tmp_path, "a", [rand((16, 16), seed=i) for i in range(4)])
    r = stack_files_to_ome_zarr(
        tmp_path,
        ".tif",
        PAT,
        output_dir=tmp_path / "o",
        verbose=False,
        pyramid_levels=3,
        zarr_chunks=(2, 8, 8),
        batch_size=1,
    )
    g = zarr.open_group(r["a"]["zarr_path"])
    assert g["0"].chunks == (2, 8, 8) and g["1"].chunks == (2, 8, 8) and g["2"].chunks == (2, 4, 4)
    np.testing.assert_array_equal(g["0"][:], np.stack([rand((16, 16), seed=i) for i in range(4)]))


# ------------------------------------------------------------------------------------------
# [BUG] regressions (spec §2.9, §3.3 item 13, §4.2)
# ------------------------------------------------------------------------------------------


def test_bug_dtype_does_not_leak_between_stacks(tmp_path):
    write_stack(tmp_path, "a", [rand((8, 8), np.uint16)] * 2)
    write_stack(tmp_path, "b", [rand((8, 8), np.uint8)] * 2)
    for kind in ("zarr", "ome"):
        r = convert(kind, tmp_path, output_dir=tmp_path / kind, pyramid_levels=None)
        assert r["a"]["dtype"] == np.uint16 and r["b"]["dtype"] == np.uint8
        path = Path(r["b"]["zarr_path"])
        arr = zarr.open_array(path) if kind == "zarr" else zarr.open_group(path)["0"]
        assert arr.dtype == np.uint8


def test_bug_chunks_do_not_leak_between_stacks(tmp_path):
    write_stack(tmp_path, "a", [rand((37, 41))] * 2)
    write_stack(tmp_path, "b", [rand((16, 16))] * 2)
    r = stack_files_to_zarr(tmp_path, ".tif", PAT, output_dir=tmp_path / "o")
    assert zarr.open_array(r["a"]["zarr_path"]).chunks == (1, 37, 41)
    assert zarr.open_array(r["b"]["zarr_path"]).chunks == (1, 16, 16)


def test_bug_scale_factors_do_not_leak_between_stacks(tmp_path):
    write_stack(tmp_path, "a", [rand((3, 16, 16))] * 2)
    write_stack(tmp_path, "b", [rand((16, 16))] * 2)
    r = stack_files_to_ome_zarr(
        tmp_path,
        ".tif",
        PAT,
        output_dir=tmp_path / "o",
        axis_order="CZYX",
        pyramid_levels=2,
        verbose=False,
    )
    ga = _validate_ngff(r["a"]["zarr_path"])
    gb = _validate_ngff(r["b"]["zarr_path"])
    sa = ga.attrs["ome"]["multiscales"][0]["datasets"][1]["coordinateTransformations"][0]["scale"]
    sb = gb.attrs["ome"]["multiscales"][0]["datasets"][1]["coordinateTransformations"][0]["scale"]
    assert sa == [1.0, 1.0, 2.0, 2.0] and sb == [1.0, 2.0, 2.0]


def test_bug_normalize_integer_does_not_wrap(tmp_path):
    imgs = [rand((16, 16), np.uint16, i) for i in range(3)]
    write_stack(tmp_path, "a", imgs)
    r = stack_files_to_zarr(tmp_path, ".tif", PAT, output_dir=tmp_path / "o", normalize=True)
    assert r["a"]["dtype"] == np.float32
    out = zarr.open_array(r["a"]["zarr_path"])[:]
    vol = np.stack(imgs).astype(np.float64)
    np.testing.assert_allclose(out, (vol - vol.mean()) / vol.std(), rtol=1e-4, atol=1e-4)
    # OME: per image when no statistics are given
    r = stack_files_to_ome_zarr(
        tmp_path, ".tif", PAT, output_dir=tmp_path / "p", normalize=True, verbose=False
    )
    lvl0 = zarr.open_group(r["a"]["zarr_path"])["0"][:]
    np.testing.assert_allclose(lvl0.mean(axis=(1, 2)), 0, atol=1e-4)
    np.testing.assert_allclose(lvl0.std(axis=(1, 2)), 1, atol=1e-3)
    with pytest.raises(QltyError, match="float dtype"):
        stack_files_to_zarr(tmp_path, ".tif", PAT, normalize=True, dtype=np.uint16)


def test_bug_czyx_channels_not_corrupted(tmp_path):
    imgs = [np.stack([np.full((8, 8), 10 * c + z, np.uint16) for c in range(3)]) for z in range(4)]
    write_stack(tmp_path, "a", imgs)
    r = stack_files_to_ome_zarr(
        tmp_path,
        ".tif",
        PAT,
        output_dir=tmp_path / "o",
        axis_order="CZYX",
        pyramid_levels=2,
        verbose=False,
    )
    g = zarr.open_group(r["a"]["zarr_path"])
    np.testing.assert_array_equal(g["0"][:], np.stack(imgs).transpose(1, 0, 2, 3))
    assert g["1"][:, 0].max(axis=(1, 2)).tolist() == [0, 10, 20]  # qlty: [0, 0, 0] after channel 0
    assert g["1"][:, 3, 0, 0].tolist() == [3, 13, 23]


def test_bug_nonstandard_axis_order_downsamples_y_not_c(tmp_path):
    imgs = [rand((3, 33, 35), np.float32, z) for z in range(3)]
    write_stack(tmp_path, "a", imgs)
    with pytest.warns(NGFFConformanceWarning):
        r = stack_files_to_ome_zarr(
            tmp_path,
            ".tif",
            PAT,
            output_dir=tmp_path / "o",
            axis_order="ZYCX",
            pyramid_levels=2,
            verbose=False,
        )
    g = zarr.open_group(r["a"]["zarr_path"])
    assert g["1"].shape == (3, 17, 3, 18)  # qlty: (3, 33, 2, 18)
    zcyx = np.stack(imgs).astype(np.float64)
    ref = block_mean_ref(zcyx, (1, 1, 2, 2)).transpose(0, 2, 1, 3)
    np.testing.assert_allclose(g["1"][:], ref, rtol=1e-5)


def test_bug_axes_metadata_follows_axis_order(tmp_path):
    write_stack(tmp_path, "a", [rand((3, 8, 8))] * 2)
    with pytest.warns(NGFFConformanceWarning, match="CZYX"):
        r = stack_files_to_ome_zarr(
            tmp_path,
            ".tif",
            PAT,
            output_dir=tmp_path / "o",
            axis_order="ZYCX",
            pyramid_levels=2,
            verbose=False,
        )
    g = zarr.open_group(r["a"]["zarr_path"])
    assert "ome" not in g.attrs  # never claim NGFF for a layout NGFF forbids
    ms = g.attrs["qlty_gpu"]["multiscales"][0]
    assert [a["name"] for a in ms["axes"]] == ["z", "y", "c", "x"]
    assert ms["datasets"][1]["coordinateTransformations"][0]["scale"] == [1.0, 2.0, 1.0, 2.0]
    assert r["a"]["ngff_conformant"] is False


def test_bug_z_in_downsample_axes_downsamples_z(tmp_path):
    imgs = [np.full((37, 41), z, np.float32) for z in range(3)]
    write_stack(tmp_path, "a", imgs)
    r = stack_files_to_ome_zarr(
        tmp_path,
        ".tif",
        PAT,
        output_dir=tmp_path / "o",
        pyramid_levels=2,
        downsample_axes=("z", "y", "x"),
        verbose=False,
    )
    g = _validate_ngff(r["a"]["zarr_path"])
    assert g["1"].shape == (2, 19, 21)  # qlty: (3, 19, 21) while claiming scale [2, 2, 2]
    assert g["1"][:, 0, 0].tolist() == [0.5, 2.0]


def test_bug_ngff_version_matches_zarr_format(tmp_path):
    write_stack(tmp_path, "a", [rand((8, 8))] * 2)
    r = stack_files_to_ome_zarr(tmp_path, ".tif", PAT, output_dir=tmp_path / "o", verbose=False)
    g = _validate_ngff(r["a"]["zarr_path"])
    assert g.attrs["ome"]["version"] == "0.5" and "multiscales" not in g.attrs  # not 0.4-style


def test_bug_per_image_errors_are_raised_not_swallowed(tmp_path, monkeypatch):
    paths = write_stack(tmp_path, "a", [rand((8, 8), seed=i) for i in range(12)])
    real = pipeline.read_image

    def failing(path, **kw):
        if Path(path) == paths[7]:
            raise OSError("disk on fire")
        return real(path, **kw)

    monkeypatch.setattr(pipeline, "read_image", failing)  # the slice reader
    monkeypatch.setattr(planning, "read_image", failing)  # header fallback
    for workers in (1, 4):
        with pytest.raises(QltyError, match=rf"{re.escape(str(paths[7]))}.*OSError: disk on fire"):
            stack_files_to_ome_zarr(
                tmp_path,
                ".tif",
                PAT,
                output_dir=tmp_path / "o",
                num_workers=workers,
                verbose=False,
                batch_size=3,
            )
        assert not (tmp_path / "o" / "a.ome.zarr").exists()


def test_bug_downsample_method_not_ignored(tmp_path):
    imgs = [rand((16, 16), np.float32, i) for i in range(2)]
    write_stack(tmp_path, "a", imgs)
    out = {}
    for m in ("dask_coarsen", "scipy_zoom"):
        r = stack_files_to_ome_zarr(
            tmp_path,
            ".tif",
            PAT,
            output_dir=tmp_path / m,
            pyramid_levels=2,
            downsample_method=m,
            verbose=False,
        )
        g = zarr.open_group(r["a"]["zarr_path"])
        out[m] = g["1"][:]
        assert g.attrs["ome"]["multiscales"][0]["metadata"]["method"] in (
            "block mean",
            "antialiased bilinear (y, x)",
        )
    assert out["dask_coarsen"].shape == out["scipy_zoom"].shape
    assert not np.allclose(out["dask_coarsen"], out["scipy_zoom"])


def test_bug_edge_blocks_not_zero_padded(tmp_path):
    imgs = [np.full((5, 5), 500, np.uint16)] * 2
    write_stack(tmp_path, "a", imgs)
    r = stack_files_to_ome_zarr(
        tmp_path, ".tif", PAT, output_dir=tmp_path / "o", pyramid_levels=2, verbose=False
    )
    lvl1 = zarr.open_group(r["a"]["zarr_path"])["1"][:]
    assert lvl1.shape == (2, 3, 3) and (lvl1 == 500).all()  # qlty: last row/col 250 or 125


def test_bug_integer_pyramid_rounds_not_truncates(tmp_path):
    imgs = [np.array([[1, 2], [2, 2]], np.uint8)] * 2  # mean 1.75
    write_stack(tmp_path, "a", imgs)
    r = stack_files_to_ome_zarr(
        tmp_path, ".tif", PAT, output_dir=tmp_path / "o", pyramid_levels=2, verbose=False
    )
    assert zarr.open_group(r["a"]["zarr_path"])["1"][:].ravel().tolist() == [2, 2]  # qlty: 1


def test_bug_laplacian_integer_roundtrip_exact(tmp_path):
    imgs = [rand((19, 23), np.uint16, i) for i in range(3)]
    write_stack(tmp_path, "a", imgs)
    r = stack_files_to_ome_zarr_laplacian(
        tmp_path,
        ".tif",
        PAT,
        output_dir=tmp_path / "o",
        pyramid_levels=3,
        verbose=False,
        batch_size=2,
    )
    g = zarr.open_group(r["a"]["zarr_path"])
    assert g["diff_0"][:].min() < 0  # negative differences survive (qlty clipped them to 0)
    rec = reconstruct_from_laplacian_pyramid(r["a"]["zarr_path"])
    assert rec.dtype == np.uint16
    np.testing.assert_array_equal(rec, np.stack(imgs))


def test_bug_laplacian_invalid_interpolation_mode_raises(tmp_path):
    write_stack(tmp_path, "a", [rand((8, 8))] * 2)
    with pytest.raises(QltyError, match="interpolation_mode must be one of"):
        stack_files_to_ome_zarr_laplacian(
            tmp_path, ".tif", PAT, interpolation_mode="lanczos", verbose=False
        )
    assert not (tmp_path / "a.ome.zarr").exists()


def test_bug_laplacian_has_metadata(tmp_path):
    write_stack(tmp_path, "a", [rand((16, 16))] * 2)
    r = stack_files_to_ome_zarr_laplacian(
        tmp_path,
        ".tif",
        PAT,
        output_dir=tmp_path / "o",
        pyramid_levels=3,
        interpolation_mode="bicubic",
        verbose=False,
    )
    g = zarr.open_group(r["a"]["zarr_path"])
    meta = g.attrs["laplacian_pyramid"]
    assert (
        meta["levels"] == 3 and meta["base_level"] == "2" and meta["diffs"] == ["diff_0", "diff_1"]
    )
    assert meta["interpolation_mode"] == "bicubic" and "interpolate" in meta["reconstruction"]
    assert g.attrs["basename"] == "a" and g.attrs["qlty_gpu"]["complete"] is True
    assert g["2"].shape == (2, 4, 4) and g["2"].chunks == (1, 4, 4)  # chunks of its own shape


def test_bug_laplacian_czyx_and_zycx_roundtrip(tmp_path):
    imgs = [rand((3, 17, 15), np.uint8, i) for i in range(3)]
    write_stack(tmp_path, "a", imgs)
    zcyx = np.stack(imgs)
    for order in ("CZYX", "ZYCX", "ZCYX"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            r = stack_files_to_ome_zarr_laplacian(
                tmp_path,
                ".tif",
                PAT,
                output_dir=tmp_path / order,
                axis_order=order,
                pyramid_levels=3,
                verbose=False,
            )
        rec = reconstruct_from_laplacian_pyramid(r["a"]["zarr_path"])
        np.testing.assert_array_equal(rec, np.transpose(zcyx, ["ZCYX".index(a) for a in order]))


def test_bug_laplacian_store_base_level_false_clear_error(tmp_path):
    write_stack(tmp_path, "a", [rand((8, 8))] * 2)
    with pytest.warns(UserWarning, match="cannot be reconstructed"):
        r = stack_files_to_ome_zarr_laplacian(
            tmp_path,
            ".tif",
            PAT,
            output_dir=tmp_path / "o",
            pyramid_levels=2,
            store_base_level=False,
            verbose=False,
        )
    with pytest.raises(QltyError, match="Base level not found.*store_base_level=False"):
        reconstruct_from_laplacian_pyramid(r["a"]["zarr_path"])


def test_bug_laplacian_z_downsampling_rejected(tmp_path):
    write_stack(tmp_path, "a", [rand((8, 8))] * 2)
    with pytest.raises(QltyError, match="y and x only"):
        stack_files_to_ome_zarr_laplacian(
            tmp_path, ".tif", PAT, downsample_mode="3d", verbose=False
        )


# ------------------------------------------------------------------------------------------
# Laplacian round trips
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.uint8, np.int16])
@pytest.mark.parametrize("mode", ["bilinear", "bicubic"])
def test_laplacian_roundtrip_exact(tmp_path, dtype, mode):
    imgs = [rand((21, 18), dtype, i) for i in range(3)]
    if np.dtype(dtype).kind == "f":
        imgs = [(i * 1000 - 300).astype(dtype) for i in imgs]
    write_stack(tmp_path, "a", imgs)
    r = stack_files_to_ome_zarr_laplacian(
        tmp_path,
        ".tif",
        PAT,
        output_dir=tmp_path / "o",
        pyramid_levels=4,
        interpolation_mode=mode,
        verbose=False,
    )
    rec = reconstruct_from_laplacian_pyramid(r["a"]["zarr_path"])
    assert rec.dtype == dtype
    np.testing.assert_array_equal(rec, np.stack(imgs))  # bit-exact
    one = reconstruct_from_laplacian_pyramid(r["a"]["zarr_path"], z_idx=-1)
    np.testing.assert_array_equal(one, imgs[-1])


def test_laplacian_target_level_output_zarr_and_mode_check(tmp_path):
    imgs = [rand((16, 16), np.float32, i) for i in range(3)]
    write_stack(tmp_path, "a", imgs)
    r = stack_files_to_ome_zarr_laplacian(
        tmp_path, ".tif", PAT, output_dir=tmp_path / "o", pyramid_levels=3, verbose=False
    )
    path = r["a"]["zarr_path"]
    lvl1 = reconstruct_from_laplacian_pyramid(path, target_level=1)
    np.testing.assert_allclose(
        lvl1, block_mean_ref(np.stack(imgs), (1, 2, 2)), rtol=1e-5, atol=1e-6
    )
    out = reconstruct_from_laplacian_pyramid(
        path, output_zarr_path=tmp_path / "rec.zarr", batch_size=2
    )
    assert out == str(tmp_path / "rec.zarr")
    np.testing.assert_array_equal(zarr.open_array(out)[:], np.stack(imgs))
    with pytest.raises(QltyError, match="does not match"):
        reconstruct_from_laplacian_pyramid(path, interpolation_mode="bicubic")
    with pytest.raises(QltyError, match="target_level"):
        reconstruct_from_laplacian_pyramid(path, target_level=5)


def test_reconstruct_qlty_written_pyramid_matches_qlty(tmp_path):
    """A pyramid written by qlty 1.5.0 (no metadata) decodes like qlty decodes it."""
    qs = pytest.importorskip("qlty.utils.stack_to_zarr")
    imgs = [rand((16, 16), np.float32, i) for i in range(3)]
    write_stack(tmp_path, "a", imgs)
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        r = qs.stack_files_to_ome_zarr_laplacian(
            str(tmp_path),
            ".tif",
            PAT,
            output_dir=str(tmp_path / "q"),
            pyramid_levels=2,
            num_workers=1,
            verbose=False,
        )
        theirs = qs.reconstruct_from_laplacian_pyramid(r["a"]["zarr_path"], num_workers=1)
    ours = reconstruct_from_laplacian_pyramid(r["a"]["zarr_path"])
    np.testing.assert_allclose(ours, theirs, rtol=1e-6, atol=1e-6)


def test_reconstruct_errors(tmp_path):
    with pytest.raises(QltyError, match="does not exist"):
        reconstruct_from_laplacian_pyramid(tmp_path / "none.zarr")
    g = zarr.open_group(str(tmp_path / "empty.zarr"), mode="w")
    s2z._create_zarr_array(g, "diff_0", shape=(1, 4, 4), dtype="float32")
    with pytest.raises(QltyError, match="Base level not found"):
        reconstruct_from_laplacian_pyramid(tmp_path / "empty.zarr")
    g = zarr.open_group(str(tmp_path / "nodiff.zarr"), mode="w")
    s2z._create_zarr_array(g, "1", data=np.zeros((1, 4, 4), np.float32))
    with pytest.raises(QltyError, match="No difference maps"):
        reconstruct_from_laplacian_pyramid(tmp_path / "nodiff.zarr")


# ------------------------------------------------------------------------------------------
# compatibility with qlty 1.5.0 where qlty is right
# ------------------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore::qlty_gpu.utils.stack_to_zarr.NGFFConformanceWarning")
def test_matches_qlty_where_qlty_is_right(tmp_path):
    qs = pytest.importorskip("qlty.utils.stack_to_zarr")
    import contextlib
    import io

    imgs = [rand((3, 16, 16), np.float32, i) for i in range(4)]
    single = [rand((16, 16), np.uint16, i) for i in range(4)]
    # one stack per call: qlty leaks chunks/dtype between stacks of one call
    for name, stack in (("m", imgs), ("s", single)):
        src = tmp_path / f"in_{name}"
        write_stack(src, name, stack)
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            q = qs.stack_files_to_zarr(
                str(src), ".tif", PAT, output_dir=str(tmp_path / "q"), num_workers=1
            )
            qo = qs.stack_files_to_ome_zarr(
                str(src),
                ".tif",
                PAT,
                output_dir=str(tmp_path / "qo"),
                num_workers=1,
                pyramid_levels=2,
                verbose=False,
            )
        o = stack_files_to_zarr(src, ".tif", PAT, output_dir=tmp_path / "o")
        oo = stack_files_to_ome_zarr(
            src, ".tif", PAT, output_dir=tmp_path / "oo", pyramid_levels=2, verbose=False
        )
        assert set(q[name]) <= set(o[name])
        for key in ("shape", "dtype", "file_count", "counter_range", "axis_order"):
            assert q[name][key] == o[name][key]
        np.testing.assert_array_equal(
            zarr.open_array(q[name]["zarr_path"])[:], zarr.open_array(o[name]["zarr_path"])[:]
        )
        qa = dict(zarr.open_array(q[name]["zarr_path"]).attrs)
        oa = dict(zarr.open_array(o[name]["zarr_path"]).attrs)
        assert {k: v for k, v in oa.items() if k in qa} == qa
        assert (
            set(qo[name]) <= set(oo[name])
            and qo[name]["pyramid_levels"] == oo[name]["pyramid_levels"]
        )
        # level 0 always agrees; level 1 too for divisible float ZCYX data (qlty is right there)
        np.testing.assert_array_equal(
            zarr.open_group(qo[name]["zarr_path"])["0"][:],
            zarr.open_group(oo[name]["zarr_path"])["0"][:],
        )
        if name == "m":
            np.testing.assert_allclose(
                zarr.open_group(qo[name]["zarr_path"])["1"][:],
                zarr.open_group(oo[name]["zarr_path"])["1"][:],
                rtol=1e-6,
            )


def test_private_helpers_compat():
    data = np.arange(2 * 3 * 4 * 5).reshape(2, 3, 4, 5)
    out, shape = s2z._apply_axis_order(data, data.shape, "CZYX")
    assert shape == (3, 2, 4, 5) and out.shape == shape
    assert s2z._normalize_axis_order("zcyx", False) == "ZYX"
    img = np.arange(16, dtype=np.float32).reshape(4, 4)
    assert s2z._downsample_with_torch(img, 2, 2).shape == (2, 2)
    assert s2z._upsample_with_torch(img, (8, 8)).shape == (8, 8)
    with pytest.raises(ValueError, match="mode must be"):
        s2z._upsample_with_torch(img, (8, 8), mode="area")
    assert isinstance(ImageReadError("x"), RuntimeError)


# ------------------------------------------------------------------------------------------
# streaming: peak memory does not grow with the number of slices
# ------------------------------------------------------------------------------------------


def _peak_bytes(folder: Path, out: Path, kind: str) -> int:
    tracemalloc.start()
    try:
        convert(kind, folder, output_dir=out, num_workers=1, batch_size=4, pyramid_levels=3)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("which", list(CONVERTERS))
def test_peak_memory_independent_of_depth(tmp_path, which):
    peaks = {}
    for n in (8, 32):
        write_stack(tmp_path / f"s{n}", "a", [rand((128, 128), np.uint16, i % 4) for i in range(n)])
    convert(which, tmp_path / "s8", output_dir=tmp_path / "warm", num_workers=1, batch_size=4,
            pyramid_levels=3)
    for n in (8, 32):
        peaks[n] = _peak_bytes(tmp_path / f"s{n}", tmp_path / f"o{n}", which)
    stack_bytes_32 = 32 * 128 * 128 * 2
    print(which, peaks)
    assert peaks[32] < 1.3 * peaks[8], peaks
    assert peaks[32] < stack_bytes_32 * 1.5, peaks  # less than the stack itself (plus pyramid)


# ------------------------------------------------------------------------------------------
# more [BUG]/weakness regressions (spec §4.2)
# ------------------------------------------------------------------------------------------


def test_bug_quiet_runs_print_nothing(tmp_path, capfd):
    write_stack(tmp_path, "a", [rand((8, 8))] * 2)
    stack_files_to_zarr(tmp_path, ".tif", PAT, output_dir=tmp_path / "o")
    stack_files_to_ome_zarr(tmp_path, ".tif", PAT, output_dir=tmp_path / "o", verbose=False)
    stack_files_to_ome_zarr(
        tmp_path, ".tif", PAT, output_dir=tmp_path / "d", verbose=False, dry_run=True
    )
    stack_files_to_ome_zarr_laplacian(
        tmp_path, ".tif", PAT, output_dir=tmp_path / "l", verbose=False, pyramid_levels=2
    )
    out, err = capfd.readouterr()
    assert out == "" and err == ""


def test_bug_each_image_decoded_once(tmp_path, monkeypatch):
    write_stack(tmp_path, "a", [rand((8, 8), seed=i) for i in range(6)])
    real = pipeline.read_image
    calls = []

    def counting(path, **kw):
        calls.append(Path(path).name)
        return real(path, **kw)

    monkeypatch.setattr(pipeline, "read_image", counting)  # the slice reader
    monkeypatch.setattr(planning, "read_image", counting)  # header fallback
    stack_files_to_ome_zarr(
        tmp_path, ".tif", PAT, output_dir=tmp_path / "o", pyramid_levels=3, verbose=False
    )
    assert sorted(calls) == sorted(f"a_{i}.tif" for i in range(6))  # qlty: 2-3 reads per file


def test_bug_reconstruct_axis_order_from_metadata_not_shape(tmp_path):
    # Z=2 < C=3 in ZCYX: qlty guessed CZYX from the shape and mixed up the axes.
    imgs = [rand((3, 12, 10), np.uint16, i) for i in range(2)]
    write_stack(tmp_path, "a", imgs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NGFFConformanceWarning)
        r = stack_files_to_ome_zarr_laplacian(
            tmp_path,
            ".tif",
            PAT,
            output_dir=tmp_path / "o",
            axis_order="ZCYX",
            pyramid_levels=2,
            verbose=False,
        )
    rec = reconstruct_from_laplacian_pyramid(r["a"]["zarr_path"])
    np.testing.assert_array_equal(rec, np.stack(imgs))
    np.testing.assert_array_equal(
        reconstruct_from_laplacian_pyramid(r["a"]["zarr_path"], z_idx=1), imgs[1]
    )


def test_bug_multi_z_chunks_with_workers_are_race_free(tmp_path):
    imgs = [rand((12, 12), np.uint16, i) for i in range(9)]
    write_stack(tmp_path, "a", imgs)
    r = stack_files_to_ome_zarr_laplacian(
        tmp_path,
        ".tif",
        PAT,
        output_dir=tmp_path / "o",
        zarr_chunks=(4, 3, 3),
        num_workers=4,
        pyramid_levels=2,
        batch_size=1,
        verbose=False,
    )
    g = zarr.open_group(r["a"]["zarr_path"])
    assert g["1"].chunks == (4, 3, 3)
    np.testing.assert_array_equal(
        reconstruct_from_laplacian_pyramid(r["a"]["zarr_path"]), np.stack(imgs)
    )
    r = stack_files_to_ome_zarr(
        tmp_path,
        ".tif",
        PAT,
        output_dir=tmp_path / "p",
        zarr_chunks=(4, 6, 6),
        num_workers=4,
        batch_size=1,
        pyramid_levels=2,
        verbose=False,
    )
    np.testing.assert_array_equal(zarr.open_group(r["a"]["zarr_path"])["0"][:], np.stack(imgs))


def test_bug_single_level_laplacian_reconstructs(tmp_path):
    imgs = [rand((8, 8), seed=i) for i in range(2)]
    write_stack(tmp_path, "a", imgs)
    r = stack_files_to_ome_zarr_laplacian(
        tmp_path, ".tif", PAT, output_dir=tmp_path / "o", pyramid_levels=1, verbose=False
    )
    np.testing.assert_array_equal(
        reconstruct_from_laplacian_pyramid(r["a"]["zarr_path"]), np.stack(imgs)
    )


def test_bug_nearest_interpolation_supported(tmp_path):
    imgs = [rand((11, 9), np.uint8, i) for i in range(2)]
    write_stack(tmp_path, "a", imgs)
    r = stack_files_to_ome_zarr_laplacian(
        tmp_path,
        ".tif",
        PAT,
        output_dir=tmp_path / "o",
        pyramid_levels=3,
        interpolation_mode="nearest",
        verbose=False,
    )
    g = zarr.open_group(r["a"]["zarr_path"])
    assert np.abs(g["diff_0"][:]).max() > 0  # qlty: all-zero diffs after a swallowed error
    np.testing.assert_array_equal(
        reconstruct_from_laplacian_pyramid(r["a"]["zarr_path"]), np.stack(imgs)
    )


def test_bug_no_invalid_omero_block(tmp_path):
    write_stack(tmp_path, "a", [rand((8, 8))] * 2)
    r = stack_files_to_ome_zarr(tmp_path, ".tif", PAT, output_dir=tmp_path / "o", verbose=False)
    g = zarr.open_group(r["a"]["zarr_path"])
    assert "omero" not in g.attrs and "omero" not in g.attrs["ome"]  # qlty: omero without channels


def test_ome_zarr_py_reader_opens_store(tmp_path):
    """ome-zarr-py (the reference NGFF reader) opens the store as NGFF 0.5 (skipped if absent)."""
    pytest.importorskip("ome_zarr.reader")
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Reader

    imgs = [rand((2, 20, 24), seed=i) for i in range(3)]
    write_stack(tmp_path, "a", imgs)
    r = stack_files_to_ome_zarr(
        tmp_path,
        ".tif",
        PAT,
        output_dir=tmp_path / "o",
        axis_order="CZYX",
        pyramid_levels=2,
        unit="micrometer",
        verbose=False,
    )
    loc = parse_url(r["a"]["zarr_path"])
    assert loc.fmt.version == "0.5"
    node = list(Reader(loc)())[0]
    assert [a["name"] for a in node.metadata["axes"]] == ["c", "z", "y", "x"]
    np.testing.assert_array_equal(np.asarray(node.data[0]), np.stack(imgs).transpose(1, 0, 2, 3))
    assert tuple(node.data[1].shape) == (2, 3, 10, 12)


def test_normalize_with_given_and_global_statistics(tmp_path):
    imgs = [rand((8, 8), np.uint16, i) for i in range(3)]
    write_stack(tmp_path, "a", imgs)
    vol = np.stack(imgs).astype(np.float64)
    r = stack_files_to_ome_zarr(
        tmp_path,
        ".tif",
        PAT,
        output_dir=tmp_path / "o",
        normalize=True,
        normalize_mean=1000.0,
        normalize_std=10.0,
        verbose=False,
    )
    lvl0 = zarr.open_group(r["a"]["zarr_path"])["0"][:]
    np.testing.assert_allclose(lvl0, (vol - 1000.0) / 10.0, rtol=1e-5)
    # only the mean given: the std is the pooled std of the whole stack
    r = stack_files_to_ome_zarr(
        tmp_path,
        ".tif",
        PAT,
        output_dir=tmp_path / "p",
        normalize=True,
        normalize_mean=0.0,
        verbose=False,
    )
    lvl0 = zarr.open_group(r["a"]["zarr_path"])["0"][:]
    np.testing.assert_allclose(lvl0, vol / vol.std(), rtol=1e-5)
    with pytest.raises(QltyError, match="normalize_std must be non-zero"):
        stack_files_to_zarr(
            tmp_path, ".tif", PAT, output_dir=tmp_path / "q", normalize=True, normalize_std=0
        )


def test_gap_report_goes_to_stdout_like_qlty(tmp_path, capsys):
    """qlty's pinned behaviour (spec §5): the gap report is printed and says 'missing counters'."""
    import numpy as np
    import tifffile

    from qlty_gpu.utils.stack_to_zarr import StackGapWarning, stack_files_to_zarr

    for i in (0, 1, 4):
        tifffile.imwrite(tmp_path / f"s_{i:03d}.tif", np.full((8, 8), i, dtype=np.uint16))
    with pytest.warns(StackGapWarning):
        stack_files_to_zarr(str(tmp_path), ".tif", r"(.+)_(\d+)\.tif$", output_dir=str(tmp_path / "o"))
    out = capsys.readouterr().out
    assert "missing counters" in out and "[2, 3]" in out
