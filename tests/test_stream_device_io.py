"""The kvikio / pinned / host seam: selection logic and the raw chunk layout on CPU; the
CUDA paths themselves only under the ``gpu`` marker."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
import zarr

from qlty_gpu.errors import QltyBackendError, QltyError
from qlty_gpu.stream import device_io
from qlty_gpu.stream.device_io import (
    ChunkWriter,
    choose_io_path,
    device_to_host,
    host_to_device,
    raw_chunk_file,
)

CUDA = torch.device("cuda")


def _raw_array(tmp_path, **kw):
    kw.setdefault("compressors", None)
    return zarr.create_array(store=str(tmp_path / "r.zarr"), shape=(5, 7, 6), chunks=(2, 3, 4),
                             dtype="float32", fill_value=0, **kw)


def test_cpu_tensors_take_the_host_path(monkeypatch):
    monkeypatch.delenv("QLTY_GPU_IO", raising=False)
    c = choose_io_path("cpu")
    assert c.path == "host" and "not CUDA" in c.reasons[0]
    with pytest.raises(QltyBackendError, match="'kvikio' was forced but cannot run"):
        choose_io_path("cpu", force="kvikio")
    with pytest.raises(QltyBackendError, match="'pinned' was forced"):
        choose_io_path("cpu", force="pinned")
    with pytest.raises(QltyError, match="must be one of"):
        choose_io_path("cpu", force="gds")
    monkeypatch.setenv("QLTY_GPU_IO", "bogus")
    with pytest.raises(QltyError, match="QLTY_GPU_IO"):
        choose_io_path("cpu")


def test_cuda_selection_logic(tmp_path, monkeypatch):
    monkeypatch.delenv("QLTY_GPU_IO", raising=False)
    raw = _raw_array(tmp_path)
    monkeypatch.setattr(device_io, "kvikio_available", lambda: (False, "kvikio not importable"))
    c = choose_io_path(CUDA, raw)
    assert c.path == "pinned" and c.reasons == ("kvikio not importable",)
    with pytest.raises(QltyBackendError, match="kvikio not importable"):
        choose_io_path(CUDA, raw, force="kvikio")
    monkeypatch.setattr(device_io, "kvikio_available", lambda: (True, ""))
    assert choose_io_path(CUDA, raw).path == "kvikio"
    assert choose_io_path(CUDA, raw, force="pinned").path == "pinned"
    monkeypatch.setenv("QLTY_GPU_IO", "host")
    assert choose_io_path(CUDA, raw).path == "host"
    monkeypatch.delenv("QLTY_GPU_IO")
    compressed = zarr.create_array(store=str(tmp_path / "z.zarr"), shape=(4,), chunks=(2,),
                                   dtype="float32")
    c = choose_io_path(CUDA, compressed)
    assert c.path == "pinned" and "compressed" in c.reasons[0]
    mem = zarr.create_array(store={}, shape=(4,), chunks=(2,), dtype="float32", compressors=None)
    assert "not a local directory" in choose_io_path(CUDA, mem).reasons[0]
    assert choose_io_path(CUDA, None).reasons == ("no destination array given",)


def test_raw_chunk_layout_reads_back_through_zarr(tmp_path):
    """The bytes the kvikio path writes (a whole padded chunk, C order, little-endian) are
    what Zarr reads: written here with plain file I/O instead of kvikio."""
    a = _raw_array(tmp_path)
    path, why = raw_chunk_file(a, (2, 1, 1))
    assert why == "" and path.as_posix().endswith("r.zarr/c/2/1/1")

    def posix(p, t):
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(t.cpu().numpy().astype("<f4").tobytes())

    w = ChunkWriter(force=None, raw_writer=posix)
    ref = np.zeros(a.shape, np.float32)
    rng = np.random.default_rng(0)
    for coords in [(0, 0, 0), (2, 2, 1), (2, 1, 0)]:  # interior and short edge chunks
        reg = tuple(slice(c * e, min((c + 1) * e, d)) for c, e, d in zip(coords, a.chunks, a.shape))
        data = rng.standard_normal(tuple(r.stop - r.start for r in reg)).astype(np.float32)
        w._write_raw(a, coords, torch.from_numpy(data))
        ref[reg] = data
    np.testing.assert_array_equal(zarr.open_array(str(tmp_path / "r.zarr"))[:], ref)
    assert raw_chunk_file(zarr.create_array(store=str(tmp_path / "c.zarr"), shape=(4,),
                                            chunks=(2,), dtype="float32"), (0,))[0] is None


def test_writer_counts_and_reports(tmp_path, caplog):
    a = _raw_array(tmp_path)
    w = ChunkWriter()
    w.write(a, (slice(0, 2), slice(0, 3), slice(0, 4)), torch.ones(2, 3, 4))
    w.write(a, (slice(2, 4), slice(0, 3), slice(0, 4)), np.ones((2, 3, 4), np.float32))
    assert w.bytes == 2 * 24 * 4 and w.paths == {"host": "tensor on cpu, not CUDA"}
    with caplog.at_level(logging.INFO, logger="qlty_gpu.io"):
        line = w.report()
    assert "path=host" in line and "GB/s" in line and line in caplog.text
    assert a[:4, :3, :4].sum() == 48


def test_cpu_copies():
    t = torch.arange(6.0)
    assert np.array_equal(device_to_host(t), np.arange(6.0))
    assert host_to_device(t, "cpu") is t


@pytest.mark.gpu
def test_cuda_pinned_roundtrip_and_write(tmp_path):
    t = torch.randn(3, 4, 5, device="cuda")
    h = device_to_host(t)
    np.testing.assert_array_equal(h, t.cpu().numpy())
    back = host_to_device(torch.from_numpy(h), "cuda")
    assert back.is_cuda and torch.equal(back, t)
    a = zarr.create_array(store=str(tmp_path / "p.zarr"), shape=(3, 4, 5), chunks=(3, 4, 5),
                          dtype="float32")
    w = ChunkWriter(force="pinned")
    w.write(a, (slice(0, 3), slice(0, 4), slice(0, 5)), t, chunk_coords=(0, 0, 0))
    np.testing.assert_array_equal(a[:], h)
    assert "pinned" in w.paths


@pytest.mark.gpu
def test_cuda_kvikio_write(tmp_path):
    pytest.importorskip("kvikio")
    a = _raw_array(tmp_path)
    w = ChunkWriter(force="kvikio")
    t = torch.randn(2, 3, 4, device="cuda")
    w.write(a, (slice(0, 2), slice(0, 3), slice(0, 4)), t, chunk_coords=(0, 0, 0))
    edge = torch.randn(1, 1, 2, device="cuda")
    w.write(a, (slice(4, 5), slice(6, 7), slice(4, 6)), edge, chunk_coords=(2, 2, 1))
    r = zarr.open_array(str(tmp_path / "r.zarr"))
    np.testing.assert_array_equal(r[:2, :3, :4], t.cpu().numpy())
    np.testing.assert_array_equal(r[4:5, 6:7, 4:6], edge.cpu().numpy())
    assert list(w.paths) == ["kvikio"]
