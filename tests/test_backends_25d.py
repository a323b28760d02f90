"""Backends of the 2.5D quilt: every backend against the in-memory tensor, qlty's shapes,
laziness and error messages."""

from __future__ import annotations

import gc
import os

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qlty_gpu import NCZYX25DQuilt, QltyError
from qlty_gpu.backends_2_5D import (
    DataSource3DBackend,
    HDF5Backend,
    InMemoryBackend,
    MemoryMappedBackend,
    TensorLike3D,
    ZarrBackend,
    from_hdf5,
    from_memmap,
    from_zarr,
)
from qlty_gpu.errors import QltyDependencyError, QltyTypeError

zarr = pytest.importorskip("zarr")
h5py = pytest.importorskip("h5py")


def _data(shape, seed=0, dtype=np.float32):
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


def _make(kind, arr, tmp_path):
    """A TensorLike3D of ``kind`` holding the 3-, 4- or 5-D numpy ``arr``."""
    if kind == "memory":
        t = torch.from_numpy(arr.reshape((1,) * (5 - arr.ndim) + arr.shape).copy())
        return TensorLike3D(InMemoryBackend(t))
    if kind in ("zarr2", "zarr3"):
        path = str(tmp_path / f"{kind}.zarr")
        z = zarr.open(path, mode="w", shape=arr.shape, dtype=arr.dtype,
                      chunks=tuple(max(1, s // 2) for s in arr.shape),
                      zarr_format=int(kind[-1]))
        z[...] = arr
        return from_zarr(path)
    if kind == "hdf5":
        path = str(tmp_path / "d.h5")
        with h5py.File(path, "w") as f:
            f.create_dataset("g/data", data=arr, chunks=True)
        return from_hdf5(path, "/g/data")
    if kind == "memmap":
        path = str(tmp_path / "d.raw")
        full = arr.reshape((1,) * (5 - arr.ndim) + arr.shape)
        full.tofile(path)
        return from_memmap(path, arr.dtype, full.shape)
    raise AssertionError(kind)


KINDS = ["memory", "zarr2", "zarr3", "hdf5", "memmap"]


def _axis_slice(draw, size):
    a = draw(st.integers(0, size - 1))
    b = draw(st.integers(a + 1, size))
    return slice(a, b)


@settings(max_examples=15, deadline=None)
@given(st.data())
def test_read_block_matches_the_tensor_every_backend(tmp_path_factory, data):
    ndim = data.draw(st.sampled_from([3, 4, 5]))
    shape = tuple(data.draw(st.integers(1, 4)) for _ in range(ndim))
    arr = _data(shape, seed=data.draw(st.integers(0, 99)))
    full = torch.from_numpy(arr.reshape((1,) * (5 - ndim) + shape))
    tmp = tmp_path_factory.mktemp("b")
    region = [_axis_slice(data.draw, s) for s in full.shape]  # windows of 1 .. full axis
    for kind in KINDS:
        if kind == "memmap" and ndim != 5:
            continue
        tl = _make(kind, arr, tmp)
        assert tl.shape == tuple(full.shape)
        got = tl.read_block(*region)
        assert torch.equal(got, full[tuple(region)]), kind
        got_int = tl.read_block(0, 0, full.shape[2] - 1)  # ints keep their axis
        assert torch.equal(got_int, full[:1, :1, -1:]), kind
        tl.close()


@pytest.mark.parametrize("kind", KINDS)
def test_quilt_on_every_backend_equals_in_memory(kind, tmp_path):
    arr = _data((2, 2, 6, 5, 4), seed=1)
    spec = {"identity": [-1, 0, 2], "mean": [[-2, -1]], "std": [[0, 1, 2]]}
    want = NCZYX25DQuilt(torch.from_numpy(arr), spec, "reflect").convert()
    with _make(kind, arr, tmp_path) as tl:
        for slab in (None, 1):
            got = NCZYX25DQuilt(tl, spec, "reflect").convert(slab_bytes=slab)
            torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["zarr2", "zarr3", "hdf5"])
@pytest.mark.parametrize("ndim", [3, 4])
def test_3d_and_4d_stores_convert(kind, ndim, tmp_path):
    # qlty: HDF5 3-D/4-D datasets fail in convert() with "not enough values to unpack"
    arr = _data((3, 5, 4, 3)[4 - ndim:], seed=2)
    want = NCZYX25DQuilt(torch.from_numpy(arr.reshape((1,) * (5 - ndim) + arr.shape)),
                         {"identity": [-1, 0], "mean": [[0, 1]]}).convert()
    with _make(kind, arr, tmp_path) as tl:
        q = NCZYX25DQuilt(tl, {"identity": [-1, 0], "mean": [[0, 1]]})
        torch.testing.assert_close(q.convert(), want, rtol=0, atol=0)
        p = q.create_extraction_plan(window=(2, 2), step=(1, 1)).patches[-1]
        torch.testing.assert_close(q.extract_patch_from_plan(p),
                                   want[-1][:, p.y_start:p.y_stop, p.x_start:p.x_stop])


LOAD_KEYS = [
    dict(n=0, c=0, z=2), dict(n=0, c=0, z=slice(1, 4)), dict(z=2), dict(z=slice(1, 3)),
    dict(c=0, z=2), dict(c=0, z=slice(0, 2)), dict(n=0), dict(n=slice(0, 1)), dict(),
    dict(n=0, c=0, z=2, y=slice(1, 3), x=1), dict(z=1, y=2, x=slice(0, 2)),
]


@pytest.mark.parametrize("ndim", [3, 4, 5])
def test_load_slice_shapes_and_values_match_qlty(ndim, tmp_path):
    qb = pytest.importorskip("qlty.backends_2_5D")
    arr = _data((1, 2, 5, 4, 3)[5 - ndim:], seed=3)
    z = zarr.open(str(tmp_path / "z.zarr"), mode="w", shape=arr.shape, dtype=arr.dtype)
    z[...] = arr
    path = str(tmp_path / "h.h5")
    with h5py.File(path, "w") as f:
        f.create_dataset("d", data=arr)
    with h5py.File(path, "r") as f:
        pairs = [(ZarrBackend(z), qb.ZarrBackend(z)), (HDF5Backend(f["d"]), qb.HDF5Backend(f["d"]))]
        if ndim == 5:
            t = torch.from_numpy(arr)
            pairs.append((InMemoryBackend(t), qb.InMemoryBackend(t)))
        for ours, ref in pairs:
            assert ours.get_shape() == tuple(ref.get_shape())
            assert ours.get_dtype() == ref.get_dtype()
            for key in LOAD_KEYS:
                if ndim == 3 and "c" in key and key["c"] != 0:
                    continue
                a, b = ours.load_slice(**key), ref.load_slice(**key)
                assert a.shape == b.shape, (type(ours).__name__, key)
                assert torch.equal(a, b), key
            assert torch.equal(ours.get_z_slices(0, 0, [3, 1]), ref.get_z_slices(0, 0, [3, 1]))


def test_tensorlike_indexing_matches_qlty():
    qb = pytest.importorskip("qlty.backends_2_5D")
    t = torch.randn(2, 3, 4, 5, 6)
    ours, ref = TensorLike3D(InMemoryBackend(t)), qb.TensorLike3D(qb.InMemoryBackend(t))
    for key in (0, -1, slice(0, 1), (1,), (0, 2), (1, 2, 3), (0, 1, slice(1, 3), 2),
                (0, 1, 2, slice(1, 4), slice(2, 5)), (0, 1, 2, 3, 4, 99), (0, [0, 2])):
        assert torch.equal(ours[key], ref[key]), key
    for bad in ("x", 1.5, Ellipsis, [0], np.int64(0), torch.tensor(0)):
        with pytest.raises(TypeError, match="Unsupported indexing type"):
            ours[bad]
    assert len(ours) == 2 and ours.device == torch.device("cpu")
    assert "InMemoryBackend" in repr(ours) and "TensorLike3D" in repr(ours)


def test_dtype_conversion_and_byte_order(tmp_path):
    arr = (np.arange(2 * 3 * 4 * 5) % 1000).reshape(2, 3, 4, 5).astype(">u2")  # big-endian
    z = zarr.open(str(tmp_path / "be.zarr"), mode="w", shape=arr.shape, dtype=arr.dtype,
                  zarr_format=2)
    z[...] = arr
    tl = from_zarr(str(tmp_path / "be.zarr"))
    assert tl.dtype == torch.uint16
    assert torch.equal(tl.read_block(), torch.from_numpy(arr.astype(np.int32)).to(torch.uint16)[None])
    tl32 = from_zarr(str(tmp_path / "be.zarr"), dtype=torch.float32)
    assert tl32[0, 1, 2].dtype == torch.float32
    # uint16 sources with MEAN convert to float32 (qlty: RuntimeError in mean())
    out = NCZYX25DQuilt(tl, {"mean": [[0, 1]]}).convert()
    assert out.dtype == torch.float32
    mm = np.memmap(str(tmp_path / "m.raw"), dtype="float64", mode="w+", shape=(1, 1, 2, 2, 2))
    mm[:] = 1.5
    mm.flush()
    b = MemoryMappedBackend(np.memmap(str(tmp_path / "m.raw"), dtype="float64", mode="r",
                                      shape=(1, 1, 2, 2, 2)), dtype=torch.float32)
    assert b.load_slice(n=0, c=0, z=0).dtype == torch.float32


def test_from_zarr_groups(tmp_path):
    arr = _data((1, 1, 3, 4, 4), seed=4)
    g = zarr.open_group(str(tmp_path / "ome.zarr"), mode="w")
    g.create_array("0", shape=arr.shape, dtype=arr.dtype)[...] = arr
    g.create_array("1", shape=(1, 1, 3, 2, 2), dtype=arr.dtype)
    g.attrs["ome"] = {"multiscales": [{"datasets": [{"path": "0"}, {"path": "1"}]}]}
    assert torch.equal(from_zarr(str(tmp_path / "ome.zarr")).read_block(), torch.from_numpy(arr))
    one = zarr.open_group(str(tmp_path / "one.zarr"), mode="w")
    one.create_array("vol", shape=(3, 4, 4), dtype="float32")
    assert from_zarr(str(tmp_path / "one.zarr")).shape == (1, 1, 3, 4, 4)
    many = zarr.open_group(str(tmp_path / "many.zarr"), mode="w")
    many.create_array("a", shape=(3, 4, 4), dtype="float32")
    many.create_array("b", shape=(3, 4, 4), dtype="float32")
    with pytest.raises(QltyError, match=r"group with arrays \['a', 'b'\]"):
        from_zarr(str(tmp_path / "many.zarr"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        from_zarr(str(tmp_path / "missing.zarr"))


def test_from_hdf5_closes_its_file(tmp_path):
    path = str(tmp_path / "c.h5")
    with h5py.File(path, "w") as f:
        f.create_dataset("d", data=_data((1, 1, 2, 3, 3)))
        f.create_group("grp")
    tl = from_hdf5(path, "d")
    fid = tl.backend.h5_dataset.file
    tl.close()
    assert not fid  # closed (qlty leaks the handle)
    with from_hdf5(path, "/d") as tl2:
        fid2 = tl2.backend.h5_dataset.file
    assert not fid2
    tl3 = from_hdf5(path, "/d")
    fid3 = tl3.backend.h5_dataset.file
    del tl3
    gc.collect()
    assert not fid3
    with pytest.raises(QltyError, match=r"not a dataset .* holds \['/d'\]"):
        from_hdf5(path, "nope")
    with pytest.raises(QltyError, match="is a group"):
        from_hdf5(path, "grp")
    with pytest.raises(FileNotFoundError):
        from_hdf5(str(tmp_path / "missing.h5"), "d")


def test_from_memmap_checks(tmp_path):
    path = str(tmp_path / "s.raw")
    np.zeros(10, dtype=np.float32).tofile(path)
    with pytest.raises(QltyError, match="holds 40 bytes, fewer than the 64"):
        from_memmap(path, np.float32, (1, 1, 2, 2, 4))
    with pytest.raises(QltyError, match=r"shape must be 5D"):
        from_memmap(path, np.float32, (10,))
    with pytest.raises(QltyError, match="mode must be"):
        from_memmap(path, np.float32, (1, 1, 1, 2, 5), mode="w+")
    with pytest.raises(FileNotFoundError):
        from_memmap(str(tmp_path / "missing"), np.float32, (1, 1, 1, 1, 1))


def test_virtual_axes_reject_other_images(tmp_path):
    # qlty returns image 0 for any n (and channel 0 for any c) of a 3-D/4-D array
    z3 = zarr.open(str(tmp_path / "a.zarr"), mode="w", shape=(3, 4, 4), dtype="float32")
    z4 = zarr.open(str(tmp_path / "b.zarr"), mode="w", shape=(2, 3, 4, 4), dtype="float32")
    with pytest.raises(QltyError, match=r"n=1 is out of range: this 3-D Zarr array holds a single image"):
        ZarrBackend(z3).load_slice(n=1)
    with pytest.raises(QltyError, match=r"c=2 is out of range"):
        ZarrBackend(z3).load_slice(n=0, c=2)
    with pytest.raises(QltyError, match=r"n=3 is out of range"):
        ZarrBackend(z4).load_slice(n=3, c=1)
    with pytest.raises(QltyError, match="out of range for size 2"):
        ZarrBackend(z4).read_block(c=2)


@pytest.mark.parametrize("module, cls", [("zarr", "ZarrBackend"), ("h5py", "HDF5Backend")])
def test_missing_dependency_names_the_extra(monkeypatch, module, cls):
    import builtins

    real = builtins.__import__

    def fake(name, *a, **k):
        if name == module:
            raise ImportError(f"No module named {module!r}")
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", fake)

    class Arr:
        shape, dtype = (1, 1, 1, 1, 1), np.dtype("float32")

    backend = {"ZarrBackend": ZarrBackend, "HDF5Backend": HDF5Backend}[cls]
    with pytest.raises(QltyDependencyError, match=rf"{module} is required for {cls}: pip install 'qlty_gpu\[io\]'"):
        backend(Arr())


def test_bad_arguments():
    with pytest.raises(ValueError, match=r"Tensor must be 5D"):
        InMemoryBackend(torch.zeros(2, 2))
    with pytest.raises(QltyTypeError, match="dtype must be a torch.dtype"):
        MemoryMappedBackend(np.zeros((1, 1, 1, 1, 1)), dtype="float32")
    with pytest.raises(QltyTypeError, match="backend must be a DataSource3DBackend"):
        TensorLike3D(torch.zeros(1, 1, 1, 1, 1))
    with pytest.raises(QltyTypeError, match="no torch equivalent"):
        MemoryMappedBackend(np.zeros((1, 1, 1, 1, 1), dtype="U3"))
    with pytest.raises(QltyError, match="z_indices must name at least one"):
        InMemoryBackend(torch.zeros(1, 1, 1, 1, 1)).get_z_slices(0, 0, [])


def test_custom_backend_uses_default_read_block():
    class Custom(DataSource3DBackend):
        def __init__(self, t):
            self.t = t

        def get_shape(self):
            return tuple(self.t.shape)

        def get_dtype(self):
            return self.t.dtype

        def load_slice(self, n=None, c=None, z=None, y=None, x=None):
            return self.t[tuple(slice(None) if i is None else i for i in (n, c, z, y, x))]

        @property
        def supports_batch_loading(self):
            return False

    t = torch.randn(1, 2, 5, 3, 3)
    got = NCZYX25DQuilt(TensorLike3D(Custom(t)), {"identity": [-1, 1]}).convert()
    torch.testing.assert_close(got, NCZYX25DQuilt(t, {"identity": [-1, 1]}).convert())

    class Broken(Custom):
        def load_slice(self, n=None, c=None, z=None, y=None, x=None):
            return self.t[0, 0]

    with pytest.raises(QltyError, match="override read_block"):
        NCZYX25DQuilt(TensorLike3D(Broken(t)), {"identity": [0]}).convert()


def test_seed_readme_backend_paths(tmp_path):
    """The seed README's backend example with its own file names."""
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        zarr.open("data.zarr", mode="w", shape=(2, 1, 6, 8, 8), dtype="float32")[...] = 1.0
        with h5py.File("data.h5", "w") as f:
            f.create_dataset("/images/stack", data=np.ones((2, 1, 6, 8, 8), np.float32))
        from qlty_gpu.backends_2_5D import from_hdf5 as fh
        from qlty_gpu.backends_2_5D import from_zarr as fz

        data = fz("data.zarr")
        data = fh("data.h5", "/images/stack")
        quilt = NCZYX25DQuilt(data_source=data, channel_spec={"identity": [0]})
        assert quilt.convert().shape == (12, 1, 8, 8)
        data.close()
    finally:
        os.chdir(cwd)
