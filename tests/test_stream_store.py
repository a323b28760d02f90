"""ZarrSink: overwrite policy, whole-chunk writes, manifest, fingerprint, completion."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import zarr

from qlty_gpu.errors import QltyError, QltyTypeError
from qlty_gpu.stream.store import MARKER, ZarrSink, fingerprint_diff, unit_key

FP = {"window": [2, 3], "step": [1, 2], "model": "abc"}


def _sink(path, **kw):
    kw.setdefault("fingerprint", FP)
    return ZarrSink(path, shape=(5, 7), chunks=(2, 3), **kw)


def test_create_write_manifest_finish(tmp_path):
    path = str(tmp_path / "o.zarr")
    s = _sink(path)
    assert not s.complete and s.finished == frozenset()
    s.write_chunk((2, 2), np.full((1, 1), 3.0), unit=(2, 2))  # short edge chunk
    s.write((slice(0, 2), slice(0, 6)), torch.ones(2, 6), unit="row0")
    assert s.is_finished((2, 2)) and s.is_finished("row0") and not s.is_finished((0, 0))
    a = zarr.open_array(path, mode="r")
    assert a[4, 6] == 3.0 and a[:2, :6].sum() == 12 and a.dtype == np.float32
    assert dict(a.attrs)[MARKER]["complete"] is False
    # manifest keys do not disturb reading the array
    assert sorted(os.listdir(tmp_path / "o.zarr" / "qlty_gpu_done")) == ["2.2", "row0"]
    with pytest.raises(QltyError, match="2 of 3 units"):
        s.finish(expected_units=3)
    assert not s.complete
    s.finish(expected_units=2, seconds=1.5)
    assert s.complete and s.marker["seconds"] == 1.5


def test_existing_output_never_silently_clobbered(tmp_path):
    path = str(tmp_path / "o.zarr")
    s = _sink(path)
    s.write_chunk((0, 0), np.ones((2, 3)), unit=(0, 0))
    s.finish()
    with pytest.raises(QltyError, match="already exists; pass overwrite=True"):
        _sink(path)
    with pytest.raises(QltyError, match="exclude each other"):
        _sink(path, overwrite=True, resume=True)
    s2 = _sink(path, overwrite=True)
    assert s2.finished == frozenset() and not s2.complete
    assert zarr.open_array(path)[0, 0] == 0  # old data gone


@pytest.mark.parametrize("kind", ["dir", "file", "foreign_zarr"])
def test_foreign_things_are_never_deleted(tmp_path, kind):
    path = tmp_path / "o.zarr"
    if kind == "dir":
        path.mkdir()
        (path / "precious.txt").write_text("keep")
    elif kind == "file":
        path.write_text("keep")
    else:
        zarr.create_array(store=str(path), shape=(5, 7), chunks=(2, 3), dtype="float32")
    for kw in ({"overwrite": True}, {"resume": True}, {}):
        with pytest.raises(QltyError, match="not written by qlty_gpu|not a qlty_gpu output|already exists"):
            _sink(str(path), **kw)
    assert path.exists()
    if kind == "dir":
        assert (path / "precious.txt").read_text() == "keep"


def test_resume_keeps_manifest_and_checks_fingerprint(tmp_path):
    path = str(tmp_path / "o.zarr")
    s = _sink(path)
    s.write_chunk((0, 0), np.ones((2, 3)), unit=(0, 0))
    s.write_chunk((0, 1), np.ones((2, 3)), unit=(0, 1))
    r = _sink(path, resume=True)
    assert r.resumed and r.finished == {"0.0", "0.1"}
    with pytest.raises(QltyError, match=r"model: stored \"abc\", now \"xyz\"") as e:
        _sink(path, resume=True, fingerprint={**FP, "model": "xyz"})
    assert "window" not in str(e.value)
    with pytest.raises(QltyError, match="shape"):
        ZarrSink(path, shape=(5, 8), chunks=(2, 3), fingerprint=FP, resume=True)
    with pytest.raises(QltyError, match="chunks"):
        ZarrSink(path, shape=(5, 7), chunks=(2, 2), fingerprint=FP, resume=True)
    with pytest.raises(QltyError, match="dtype"):
        ZarrSink(path, shape=(5, 7), chunks=(2, 3), fingerprint=FP, resume=True, dtype="float64")
    # resume with nothing there starts fresh
    fresh = _sink(str(tmp_path / "new.zarr"), resume=True)
    assert not fresh.resumed and fresh.finished == frozenset()


def test_overwrite_marks_old_store_incomplete_before_deleting(tmp_path, monkeypatch):
    import shutil

    path = str(tmp_path / "o.zarr")
    s = _sink(path)
    s.finish()

    def killed(p):  # the process dies while deleting
        raise KeyboardInterrupt

    monkeypatch.setattr(shutil, "rmtree", killed)
    with pytest.raises(KeyboardInterrupt):
        _sink(path, overwrite=True)
    monkeypatch.undo()
    assert dict(zarr.open_array(path).attrs)[MARKER]["complete"] is False


def test_given_array(tmp_path):
    a = zarr.create_array(store={}, shape=(5, 7), chunks=(2, 3), dtype="float32")
    s = ZarrSink(a, shape=(5, 7), fingerprint=FP)
    s.write_chunk((1, 1), np.ones((2, 3)), unit=(1, 1))
    assert a[2:4, 3:6].sum() == 6
    assert ZarrSink(a, shape=(5, 7), fingerprint=FP, resume=True).finished == {"1.1"}
    with pytest.raises(QltyError, match="already holds a qlty_gpu output"):
        ZarrSink(a, shape=(5, 7), fingerprint=FP)
    over = ZarrSink(a, shape=(5, 7), fingerprint=FP, overwrite=True)
    assert over.finished == frozenset()
    assert ZarrSink(a, shape=(5, 7), fingerprint=FP, resume=True).finished == frozenset()
    user = zarr.create_array(store={}, shape=(5, 7), chunks=(2, 3), dtype="float32")
    user[0, 0] = 1
    with pytest.raises(QltyError, match="already holds data"):
        ZarrSink(user, shape=(5, 7), fingerprint=FP)
    ZarrSink(user, shape=(5, 7), fingerprint=FP, overwrite=True)
    with pytest.raises(QltyError, match="shape"):
        ZarrSink(user, shape=(5, 8), fingerprint=FP, overwrite=True)
    with pytest.raises(QltyTypeError, match="target must be a path"):
        ZarrSink(np.zeros((5, 7)), shape=(5, 7))


def test_writes_must_be_whole_chunks(tmp_path):
    s = _sink(str(tmp_path / "o.zarr"))
    with pytest.raises(QltyError, match="not chunk-aligned on axis 1"):
        s.write((slice(0, 2), slice(1, 4)), np.ones((2, 3)))
    with pytest.raises(QltyError, match="not chunk-aligned on axis 0"):
        s.write((slice(0, 1), slice(0, 3)), np.ones((1, 3)))
    with pytest.raises(QltyError, match="needs"):
        s.write((slice(0, 2), slice(0, 3)), np.ones((2, 2)))
    with pytest.raises(QltyError, match="region must be 2 slices"):
        s.write((slice(0, 2),), np.ones((2, 7)))
    assert s.finished == frozenset()


def test_unit_is_recorded_only_after_the_write(tmp_path, monkeypatch):
    s = _sink(str(tmp_path / "o.zarr"))

    def failing(array, region, data, chunk_coords=None):
        raise OSError("disk full")

    monkeypatch.setattr(s.writer, "write", failing)
    with pytest.raises(OSError):
        s.write_chunk((0, 0), np.ones((2, 3)), unit=(0, 0))
    assert not s.is_finished((0, 0))
    assert _sink(str(tmp_path / "o.zarr"), resume=True).finished == frozenset()


def test_unit_keys_and_diff():
    assert unit_key([1, 2]) == "1.2"
    for bad in ("", "a/b", ".x", 1.5, (1, "a"), True):
        with pytest.raises(QltyError):
            unit_key(bad)
    assert fingerprint_diff({"a": (1, 2)}, {"a": [1, 2]}) == []


def test_fsync_syncs_chunk_files_before_recording(tmp_path, monkeypatch):
    s = _sink(str(tmp_path / "o.zarr"), fsync=True)
    synced = []
    monkeypatch.setattr(ZarrSink, "_fsync", staticmethod(lambda p: synced.append(p.as_posix())))
    s.write((slice(0, 4), slice(3, 6)), np.ones((4, 3)), unit="u")
    assert [p.split("o.zarr/")[1] for p in synced] == ["c/0/1", "c/1/1", "qlty_gpu_done/u"]
    assert all(os.path.exists(p) for p in synced)
