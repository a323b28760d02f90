"""read_region: every source kind, only the region read, errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from qlty_gpu.errors import QltyError, QltyTypeError
from qlty_gpu.stream.sources import as_source, normalize_region, read_region

REGION = (1, slice(None), slice(2, 5), slice(1, 7))


def _data():
    return np.random.default_rng(0).standard_normal((3, 2, 9, 11)).astype(np.float32)


class Counting:
    """An array-like that records every region it is asked for."""

    def __init__(self, arr):
        self.arr, self.reads = arr, []
        self.shape, self.dtype = arr.shape, arr.dtype

    def __getitem__(self, key):
        self.reads.append(key)
        return self.arr[key]


def test_numpy_torch_memmap(tmp_path):
    a = _data()
    ref = torch.from_numpy(a[REGION])
    assert torch.equal(read_region(a, REGION), ref)
    assert torch.equal(read_region(torch.from_numpy(a), REGION), ref)
    mm = np.memmap(tmp_path / "m.dat", dtype=np.float32, mode="w+", shape=a.shape)
    mm[:] = a
    mm.flush()
    ro = np.memmap(tmp_path / "m.dat", dtype=np.float32, mode="r", shape=a.shape)
    assert as_source(ro).kind == "memmap"
    out = read_region(ro, REGION)
    assert torch.equal(out, ref)
    out += 1  # a read-only memmap region comes back as a writable copy


def test_zarr_and_h5py(tmp_path):
    import h5py
    import zarr

    a = _data()
    z = zarr.create_array(store=str(tmp_path / "a.zarr"), shape=a.shape, chunks=(1, 2, 3, 3),
                          dtype="float32")
    z[:] = a
    assert torch.equal(read_region(z, REGION), torch.from_numpy(a[REGION]))
    with h5py.File(tmp_path / "a.h5", "w") as f:
        f["d"] = a
    with h5py.File(tmp_path / "a.h5", "r") as f:
        assert as_source(f["d"]).kind == "h5py"
        assert torch.equal(read_region(f["d"], REGION), torch.from_numpy(a[REGION]))


def test_tensorlike3d_and_generic():
    from qlty.backends_2_5D import InMemoryBackend, TensorLike3D

    v = torch.randn(2, 1, 5, 6, 7)
    tl = TensorLike3D(InMemoryBackend(v))
    assert as_source(tl).kind == "tensorlike3d"
    reg = (1, slice(None), slice(1, 3))
    assert torch.equal(read_region(tl, reg), v[reg])
    c = Counting(_data())
    assert as_source(c).kind == "array-like"
    read_region(c, REGION)
    assert c.reads == [(1, slice(0, 2), slice(2, 5), slice(1, 7))]


def test_only_the_region_is_read_from_zarr(tmp_path):
    import zarr

    a = np.arange(4 * 40 * 40, dtype=np.float32).reshape(4, 40, 40)
    z = zarr.create_array(store=str(tmp_path / "c.zarr"), shape=a.shape, chunks=(1, 10, 10),
                          dtype="float32")
    z[:] = a
    store = z.store
    got = []
    orig = type(store).get

    async def counting_get(self, key, *args, **kw):
        got.append(key)
        return await orig(self, key, *args, **kw)

    type(store).get = counting_get
    try:
        out = read_region(z, (2, slice(12, 18), slice(25, 33)))
    finally:
        type(store).get = orig
    assert torch.equal(out, torch.from_numpy(a[2, 12:18, 25:33]))
    chunk_keys = sorted(k for k in got if "/c/" in f"/{k}")
    assert chunk_keys == ["c/2/1/2", "c/2/1/3"]


def test_dtype_device_and_promotion():
    u16 = (np.arange(12, dtype=np.uint16) * 5000).reshape(3, 4)
    t = read_region(u16, (slice(0, 2),))
    assert t.dtype == torch.int32 and int(t.max()) == 35000
    big = np.arange(6, dtype=">f4").reshape(2, 3)
    assert read_region(big).dtype == torch.float32
    assert torch.equal(read_region(big), torch.arange(6.0).reshape(2, 3))
    t = read_region(_data(), (0,), dtype=torch.float64, device="cpu")
    assert t.dtype == torch.float64 and t.shape == (2, 9, 11)


def test_region_errors():
    a = _data()
    with pytest.raises(QltyError, match="region has 5 entries"):
        read_region(a, (0, 0, 0, 0, 0))
    with pytest.raises(QltyError, match="step 1"):
        read_region(a, (slice(0, 3, 2),))
    with pytest.raises(QltyError, match="outside axis 2 of size 9"):
        read_region(a, (0, 0, slice(5, 12)))
    with pytest.raises(QltyError, match="out of range for axis 0"):
        read_region(a, (3,))
    with pytest.raises(QltyTypeError, match="must be a slice or an int"):
        read_region(a, (0.5,))
    with pytest.raises(QltyTypeError, match="region must be a tuple"):
        read_region(a, "abc")
    assert normalize_region(None, (2, 3)) == (slice(0, 2), slice(0, 3))
    assert normalize_region(1, (2, 3)) == (1, slice(0, 3))


def test_unsupported_source_and_reader_failure():
    with pytest.raises(QltyTypeError, match="must be a torch tensor, numpy array"):
        read_region([1, 2, 3], (0,))
    with pytest.raises(QltyTypeError, match="must be a torch tensor"):
        as_source(object())

    class Broken(Counting):
        def __getitem__(self, key):
            raise OSError("disk on fire")

    with pytest.raises(QltyError, match="disk on fire"):
        read_region(Broken(_data()), (0,))
