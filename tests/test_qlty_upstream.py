"""qlty 1.5.0's own test suite, run against qlty_gpu.

The tests come from qlty's source distribution on PyPI (BSD-3-Clause; fetched, never
committed): every ``qlty`` module name in them is rewritten to ``qlty_gpu`` and the files
run in a child pytest. Each upstream file is one item here, so
``pytest tests/test_qlty_upstream.py -k patch_pairs`` runs just those.

Every upstream test must pass, except those in ``DIFFERS`` (they pin a qlty [BUG] we fixed,
or a qlty internal we chose not to copy; each with its reason, listed in the README's "what
differs" table), which must fail. Files in ``PENDING`` test modules that do not exist yet;
they are skipped with the issue that builds them, and the list shrinks to nothing.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tarfile
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SDIST_DIR = ROOT / "build" / "qlty-sdist"
QLTY_VERSION = "1.5.0"

UPSTREAM_FILES = [
    "test_backends_2_5D.py",
    "test_backends_2_5D_coverage.py",
    "test_base.py",
    "test_cleanup.py",
    "test_cleanup_coverage.py",
    "test_edge_cases.py",
    "test_false_color_2D.py",
    "test_laplacian_pyramid.py",
    "test_numba_mock.py",
    "test_patch_pairs.py",
    "test_patch_pairs_3d.py",
    "test_patch_pairs_3d_gradient.py",
    "test_patch_pairs_gradient.py",
    "test_patch_pairs_positions.py",
    "test_pretokenizer_2d.py",
    "test_qlty.py",
    "test_qlty2DLarge_coverage.py",
    "test_qlty2D_coverage.py",
    "test_qlty2_5D.py",
    "test_qlty2_5D_backend_integration.py",
    "test_qlty2_5D_convenience.py",
    "test_qlty2_5D_coverage.py",
    "test_qlty2_5D_overlapping.py",
    "test_qlty2_5D_plans.py",
    "test_qlty3DLarge_coverage.py",
    "test_qlty_large.py",
    "test_stack_to_zarr.py",
    "test_stitch_parallel.py",
]

# file -> the issue that builds what it tests. Remove a line when that lands.
PENDING = {
}

# "file::test" (parametrised ids included) -> why it is expected to fail against qlty_gpu.
DIFFERS = {
    "test_patch_pairs_3d.py::test_extract_patch_pairs_3d_exhausts_invalid_displacements": (
        "displacements are drawn in one vectorised call from the annulus lattice points that "
        "fit the volume; the per-vector _sample_displacement_vector_3d is kept (its own tests "
        "pass) but the extractor does not call it, so patching it has no effect"
    ),
    "test_qlty2DLarge_coverage.py::test_return_mean_with_normalize": (
        "[BUG] LargeNCYXQuilt.return_mean(normalize=True) normalises over channels, as qlty "
        "documents (qlty's code sums over images, axis 0, which this test pins)"
    ),
    "test_qlty2DLarge_coverage.py::test_return_mean_normalize_with_std": (
        "[BUG] LargeNCYXQuilt.return_mean(normalize=True) normalises over channels, as qlty "
        "documents (qlty's code sums over images, axis 0, which this test pins)"
    ),
    "test_stack_to_zarr.py::test_stack_files_to_zarr_no_matching_files": (
        "no matching files raises QltyError naming the folder and extension (qlty returns {})"
    ),
    "test_stack_to_zarr.py::test_stack_files_to_zarr_wrong_extension": (
        "no matching files raises QltyError naming the folder and extension (qlty returns {})"
    ),
    "test_stack_to_zarr.py::test_stack_files_to_zarr_empty_directory": (
        "no matching files raises QltyError naming the folder and extension (qlty returns {})"
    ),
    "test_stack_to_zarr.py::test_stack_files_to_ome_zarr_single_channel": (
        "[BUG] NGFF version: OME-NGFF 0.5 on Zarr v3 keeps multiscales under attrs['ome']"
    ),
    "test_stack_to_zarr.py::test_stack_files_to_ome_zarr_multiscales_metadata": (
        "[BUG] NGFF version: OME-NGFF 0.5 on Zarr v3 keeps multiscales under attrs['ome']"
    ),
    "test_stack_to_zarr.py::test_stack_files_to_ome_zarr_metadata_zcyx_axes": (
        "[BUG] NGFF version: a ZCYX store is not valid NGFF; its multiscales live under "
        "attrs['qlty_gpu']"
    ),
    "test_stack_to_zarr.py::test_stack_files_to_ome_zarr_downsample_mode_3d": (
        "downsample_mode='3d' is implemented (qlty raises ValueError: not implemented)"
    ),
}


def _sdist_tests() -> Path:
    """The upstream tests folder, downloaded (pip, from PyPI) and unpacked on first use."""
    tests = SDIST_DIR / f"qlty-{QLTY_VERSION}" / "tests"
    if tests.is_dir():
        return tests
    SDIST_DIR.mkdir(parents=True, exist_ok=True)
    tgz = SDIST_DIR / f"qlty-{QLTY_VERSION}.tar.gz"
    if not tgz.exists():
        r = subprocess.run(
            [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
             "-d", str(SDIST_DIR), f"qlty=={QLTY_VERSION}"],
            capture_output=True, text=True,
        )
        if r.returncode != 0 or not tgz.exists():
            pytest.fail(f"could not download the qlty {QLTY_VERSION} sdist:\n{r.stderr[-2000:]}")
    with tarfile.open(tgz) as tf:
        members = [m for m in tf.getmembers() if "/tests/" in m.name and m.isfile()]
        tf.extractall(SDIST_DIR, members=members, filter="data")
    return tests


_QLTY = re.compile(r"\bqlty\b")


def _rewrite(src: Path, dst: Path) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.suffix == ".py":
            (dst / f.name).write_text(_QLTY.sub("qlty_gpu", f.read_text()))


@pytest.fixture(scope="session")
def upstream_results(request, tmp_path_factory) -> dict:
    """{file: {test id: 'passed' | 'failed' | 'skipped'}} for the files this session selected."""
    wanted = sorted({
        item.callspec.params["upstream_file"]
        for item in request.session.items
        if getattr(item, "originalname", None) == "test_upstream_file" and hasattr(item, "callspec")
    } - set(PENDING))
    if not wanted:
        return {}
    work = tmp_path_factory.mktemp("qlty_upstream")
    _rewrite(_sdist_tests(), work / "tests")
    junit = work / "junit.xml"
    env = dict(os.environ)
    env.pop("QLTY_GPU_BACKEND", None)
    subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:randomly",
         "--rootdir", str(work), "-o", "addopts=", f"--junitxml={junit}",
         *[str(work / "tests" / f) for f in wanted]],
        cwd=work, env=env, capture_output=True, text=True, timeout=1200,
    )
    results: dict = {f: {} for f in wanted}
    if not junit.exists():
        pytest.fail("the upstream pytest run wrote no report")
    for case in ET.parse(junit).getroot().iter("testcase"):
        file = case.get("classname", "").split(".")[-1] + ".py"
        key = f"{file}::{case.get('name')}"
        if case.find("skipped") is not None:
            state = "skipped"
        elif case.find("failure") is not None or case.find("error") is not None:
            node = case.find("failure") if case.find("failure") is not None else case.find("error")
            state = "failed: " + (node.get("message") or "")[:300]
        else:
            state = "passed"
        results.setdefault(file, {})[key] = state
    return results


@pytest.mark.slow
@pytest.mark.parametrize("upstream_file", UPSTREAM_FILES)
def test_upstream_file(upstream_file, upstream_results):
    if upstream_file in PENDING:
        pytest.skip(f"pending: {PENDING[upstream_file]}")
    got = upstream_results.get(upstream_file)
    assert got, f"no upstream test of {upstream_file} ran (collection error?)"
    unexpected_fail = {k: v for k, v in got.items() if v.startswith("failed") and k not in DIFFERS}
    unexpected_pass = [k for k, v in got.items() if v == "passed" and k in DIFFERS]
    assert not unexpected_fail, "upstream tests failing against qlty_gpu:\n" + "\n".join(
        f"  {k}: {v}" for k, v in unexpected_fail.items())
    assert not unexpected_pass, (
        "upstream tests listed in DIFFERS now pass (remove them from DIFFERS): "
        + ", ".join(unexpected_pass))


def test_differs_entries_name_known_files():
    for key, why in DIFFERS.items():
        assert key.split("::")[0] in UPSTREAM_FILES, key
        assert why.strip(), key
