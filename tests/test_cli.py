"""The ``qlty-gpu`` command line (``qlty_gpu.cli``)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile
import zarr

from qlty_gpu.cli import COMMANDS, build_parser, main

ROOT = Path(__file__).resolve().parents[1]


def make_slices(folder: Path, name: str = "cells", n: int = 4, shape=(16, 16), counters=None):
    folder.mkdir(parents=True, exist_ok=True)
    counters = list(range(n)) if counters is None else counters
    imgs = []
    for i, c in enumerate(counters):
        img = np.full(shape, 100 * i + 7, np.uint16)
        tifffile.imwrite(folder / f"{name}_{c:03d}.tif", img, photometric="minisblack")
        imgs.append(img)
    return np.stack(imgs)


def test_parser_has_subcommands():
    assert "stack-to-zarr" in COMMANDS
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args([])
    assert exc.value.code == 2


def test_dry_run_prints_stacks_and_writes_nothing(tmp_path, capsys):
    make_slices(tmp_path / "in", "cells", 3)
    make_slices(tmp_path / "in", "nuclei", 2, counters=[0, 2])
    rc = main(
        [
            "stack-to-zarr",
            str(tmp_path / "in"),
            str(tmp_path / "out"),
            "--dry-run",
            "--ome",
            "--levels",
            "2",
        ]
    )
    out, err = capsys.readouterr()
    assert rc == 0
    assert "cells: 3 slices (counters 0..2), shape (3, 16, 16) ZYX uint16" in out
    assert "nuclei: 2 slices" in out and "missing counters [1]" in out and "[2 levels]" in out
    assert "missing counters" in err  # the gap warning
    assert not (tmp_path / "out").exists()


def test_plain_zarr(tmp_path, capsys):
    vol = make_slices(tmp_path / "in")
    rc = main(
        ["stack-to-zarr", str(tmp_path / "in"), str(tmp_path / "out"), "-q", "--chunks", "2,8,8"]
    )
    assert rc == 0
    arr = zarr.open_array(tmp_path / "out" / "cells.zarr", mode="r")
    np.testing.assert_array_equal(arr[:], vol)
    assert arr.chunks == (2, 8, 8)


def test_ome_validates(tmp_path, capsys):
    from ome_zarr_models.v05.image import Image

    vol = make_slices(tmp_path / "in")
    rc = main(
        [
            "stack-to-zarr",
            str(tmp_path / "in"),
            str(tmp_path / "out"),
            "--ome",
            "--levels",
            "3",
            "--unit",
            "micrometer",
            "--voxel-size",
            "2,0.5,0.5",
            "-q",
        ]
    )
    assert rc == 0
    g = zarr.open_group(tmp_path / "out" / "cells.ome.zarr", mode="r")
    Image.from_zarr(g)
    np.testing.assert_array_equal(g["0"][:], vol)
    assert g["2"].shape == (4, 4, 4)
    ms = g.attrs["ome"]["multiscales"][0]
    assert ms["datasets"][1]["coordinateTransformations"][0]["scale"] == [2.0, 1.0, 1.0]


def test_laplacian_round_trip(tmp_path):
    from qlty_gpu.utils.stack_to_zarr import reconstruct_from_laplacian_pyramid

    vol = make_slices(tmp_path / "in", shape=(17, 13))
    rc = main(
        [
            "stack-to-zarr",
            str(tmp_path / "in"),
            str(tmp_path / "out"),
            "--laplacian",
            "--levels",
            "3",
            "--interpolation",
            "bicubic",
            "-q",
        ]
    )
    assert rc == 0
    rec = reconstruct_from_laplacian_pyramid(tmp_path / "out" / "cells.ome.zarr")
    np.testing.assert_array_equal(rec, vol)


def test_errors_exit_1_with_message(tmp_path, capsys):
    rc = main(["stack-to-zarr", str(tmp_path / "missing"), str(tmp_path / "out")])
    assert rc == 1
    assert "Directory does not exist" in capsys.readouterr().err
    make_slices(tmp_path / "in")
    rc = main(["stack-to-zarr", str(tmp_path / "in"), str(tmp_path / "out"), "-e", ".png"])
    assert rc == 1
    assert "no files matching" in capsys.readouterr().err
    rc = main(["stack-to-zarr", str(tmp_path / "in"), str(tmp_path / "out"), "--levels", "2"])
    assert rc == 1 and "add --ome or --laplacian" in capsys.readouterr().err
    (tmp_path / "in" / "cells_002.tif").write_bytes(b"broken")
    rc = main(["stack-to-zarr", str(tmp_path / "in"), str(tmp_path / "out"), "-q"])
    err = capsys.readouterr().err
    assert rc == 1 and "cells_002.tif" in err
    assert not (tmp_path / "out" / "cells.zarr").exists()


def test_custom_pattern_and_multichannel(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    for z in range(3):
        tifffile.imwrite(
            folder / f"z{z}-sample.tif", np.full((2, 8, 8), z, np.uint8), photometric="minisblack"
        )
    rc = main(
        [
            "stack-to-zarr",
            str(folder),
            str(tmp_path / "out"),
            "--pattern",
            r"z(\d+)-(sample)\.tif",
            "-q",
        ]
    )
    assert rc == 1  # group 2 is not an integer -> no file matches
    rc = main(
        [
            "stack-to-zarr",
            str(folder),
            str(tmp_path / "out"),
            "--pattern",
            r"(?P<c>z)(\d+)-sample\.tif",
            "--axis-order",
            "CZYX",
            "--ome",
            "--levels",
            "2",
            "-q",
        ]
    )
    assert rc == 0
    g = zarr.open_group(tmp_path / "out" / "z.ome.zarr", mode="r")
    assert (
        g["0"].shape == (2, 3, 8, 8)
        and g.attrs["ome"]["multiscales"][0]["axes"][0]["type"] == "channel"
    )


@pytest.mark.slow  # a subprocess
def test_subprocess_end_to_end_with_progress_bar(tmp_path):
    vol = make_slices(tmp_path / "in", n=5)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "qlty_gpu.cli",
            "stack-to-zarr",
            str(tmp_path / "in"),
            str(tmp_path / "out"),
            "--ome",
            "--levels",
            "2",
            "--workers",
            "2",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "cells: 5 slices" in proc.stdout
    assert "5/5" in proc.stderr  # tqdm progress bar
    g = zarr.open_group(tmp_path / "out" / "cells.ome.zarr", mode="r")
    np.testing.assert_array_equal(g["0"][:], vol)


def test_foreign_output_refused_unless_overwrite(tmp_path, capsys):
    vol = make_slices(tmp_path / "in")
    store = tmp_path / "out" / "cells.zarr"
    store.mkdir(parents=True)
    (store / "notes.txt").write_text("keep")
    argv = ["stack-to-zarr", str(tmp_path / "in"), str(tmp_path / "out"), "-q"]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "not a store written by qlty_gpu" in err and "overwrite" in err
    assert (store / "notes.txt").exists()
    assert main([*argv, "--overwrite"]) == 0
    np.testing.assert_array_equal(zarr.open_array(store, mode="r")[:], vol)


def test_huge_counter_gap_summarised(tmp_path, capsys):
    make_slices(tmp_path / "in", "t", 2, counters=[0, 10**9])
    rc = main(["stack-to-zarr", str(tmp_path / "in"), str(tmp_path / "out"), "--dry-run", "-q"])
    out, err = capsys.readouterr()
    assert rc == 0
    assert "missing counters 1..999999999 (999999999 missing counters in 1 gap)" in out
    assert len(out) < 500 and len(err) < 1000
