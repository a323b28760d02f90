"""The built wheel ships ``kernels/*.py`` as ``qlty_gpu.kernels`` and every qlty_gpu module.

The source tree keeps device code in a top-level ``kernels/`` folder that setuptools maps to
``qlty_gpu.kernels`` (``package-dir`` in pyproject.toml); a wheel missing them imports fine
until the first stitch. The build runs on a copy of the sources so that it leaves nothing
(``build/``, ``*.egg-info``) in the shared working tree.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow  # builds a wheel (make test-fast skips it)


def _copy_sources(dst: Path) -> None:
    for name in ("pyproject.toml", "README.md", "LICENSE", "setup.py", "setup.cfg", "MANIFEST.in"):
        if (ROOT / name).exists():
            shutil.copy2(ROOT / name, dst / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.nbi", "*.nbc")
    for pkg in ("qlty_gpu", "kernels"):
        shutil.copytree(ROOT / pkg, dst / pkg, ignore=ignore)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    src = tmp_path_factory.mktemp("src")
    out = tmp_path_factory.mktemp("wheel")
    _copy_sources(src)
    env = {**os.environ, "PIP_NO_INPUT": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(out), str(src)],
        capture_output=True, text=True, env=env, timeout=300,
    )
    if proc.returncode != 0:
        pytest.fail(f"wheel build failed:\n{proc.stdout}\n{proc.stderr}")
    wheels = list(out.glob("qlty_gpu-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


def _names(wheel: Path) -> set[str]:
    with zipfile.ZipFile(wheel) as z:
        return set(z.namelist())


def test_wheel_ships_every_kernel_module(wheel):
    names = _names(wheel)
    kernels = sorted(p.name for p in (ROOT / "kernels").glob("*.py"))
    assert "numba_quilt.py" in kernels and "__init__.py" in kernels
    for k in kernels:
        assert f"qlty_gpu/kernels/{k}" in names, f"kernels/{k} missing from {wheel.name}"
    assert not any(n.startswith("kernels/") for n in names), "kernels/ must not be top level"


def test_wheel_ships_every_qlty_gpu_module(wheel):
    names = _names(wheel)
    for path in sorted((ROOT / "qlty_gpu").rglob("*.py")):
        if "__pycache__" in path.parts:
            continue
        rel = path.relative_to(ROOT).as_posix()
        assert rel in names, f"{rel} missing from {wheel.name} (package not listed?)"
    assert "qlty_gpu/py.typed" in names
    assert not any(n.startswith(("tests/", "benchmarks/")) for n in names)


def test_installed_wheel_imports_its_kernels(wheel, tmp_path):
    target = tmp_path / "site"
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "-q",
         "--target", str(target), str(wheel)],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    code = (
        "import qlty_gpu, qlty_gpu.kernels.numba_quilt as k, torch;"
        f"assert qlty_gpu.__file__.startswith({str(target)!r}), qlty_gpu.__file__;"
        f"assert k.__file__.startswith({str(target)!r}), k.__file__;"
        "q = qlty_gpu.NCYXQuilt(9, 9, (4, 4), (3, 3), 1, 0.5);"
        "x = torch.randn(1, 2, 9, 9);"
        "y, _ = q.stitch(q.unstitch(x, backend='torch'), backend='torch');"
        "assert torch.allclose(x, y, atol=1e-6)"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(target)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=tmp_path, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_wheel_metadata_has_the_test_extra_with_the_reference(wheel):
    with zipfile.ZipFile(wheel) as z:
        meta_name = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        meta = z.read(meta_name).decode()
    assert "Provides-Extra: test" in meta
    reqs = [line for line in meta.splitlines() if line.startswith("Requires-Dist:")]
    assert any("qlty==1.5.0" in r and 'extra == "test"' in r for r in reqs), reqs
    for dep in ("torch", "numpy", "numba"):
        assert any(r.split(":", 1)[1].strip().startswith(dep) and "extra ==" not in r
                   for r in reqs), dep
