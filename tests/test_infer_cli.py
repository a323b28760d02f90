"""`qlty-gpu infer` end to end with exported (.pt2) and TorchScript models."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import zarr

from qlty_gpu import infer
from qlty_gpu.cli import main


@pytest.fixture
def data(tmp_path):
    x = np.random.default_rng(0).random((1, 2, 21, 18)).astype(np.float32)
    src = zarr.create_array(store=str(tmp_path / "in.zarr"), shape=x.shape,
                            chunks=(1, 2, 8, 8), dtype="float32")
    src[...] = x
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(2, 4, 3, padding=1), torch.nn.ReLU()).eval()
    return tmp_path, torch.from_numpy(x), net


def test_cli_infer_exported_program(data, capsys):
    tmp, x, net = data
    ep = torch.export.export(net, (torch.zeros(5, 2, 8, 8),))  # static batch of 5
    torch.export.save(ep, str(tmp / "net.pt2"))
    rc = main(["infer", str(tmp / "net.pt2"), str(tmp / "in.zarr"), str(tmp / "out.zarr"),
               "--window", "8", "--step", "4,5", "--batch-size", "5", "--weight", "hann",
               "--chunks", "8,8", "--device", "cpu", "--quiet"])
    assert rc == 0, capsys.readouterr().err
    assert "patches" in capsys.readouterr().out
    got = zarr.open_array(str(tmp / "out.zarr"), mode="r")[...]
    ref = infer(net, x, 8, (4, 5), batch_size=5, weight="hann")
    np.testing.assert_allclose(got, ref.numpy(), rtol=1e-5, atol=1e-5)
    # argmax into another store; then resume of a complete store does nothing
    rc = main(["infer", str(tmp / "net.pt2"), str(tmp / "in.zarr"), str(tmp / "cls.zarr"),
               "--window", "8", "--step", "4,5", "--batch-size", "5", "--weight", "hann",
               "--reduce", "argmax", "--device", "cpu", "--quiet"])
    assert rc == 0
    cls = zarr.open_array(str(tmp / "cls.zarr"), mode="r")
    assert cls.dtype == np.uint8
    assert np.array_equal(cls[...], ref.argmax(1, keepdim=True).numpy())
    # an exported program that does not fit the windows: a clear error, exit 1
    rc = main(["infer", str(tmp / "net.pt2"), str(tmp / "in.zarr"), str(tmp / "bad.zarr"),
               "--window", "6", "--batch-size", "5", "--device", "cpu", "--quiet"])
    err = capsys.readouterr().err
    assert rc == 1 and "qlty-gpu infer: error: the model failed on a batch of windows" in err


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_cli_infer_torchscript_and_errors(data, capsys):
    tmp, x, net = data
    torch.jit.save(torch.jit.trace(net, torch.zeros(1, 2, 8, 8)), str(tmp / "net.ts"))
    rc = main(["infer", str(tmp / "net.ts"), str(tmp / "in.zarr"), str(tmp / "o.zarr"),
               "--window", "8,6", "--batch-size", "3", "--no-pad", "--device", "cpu", "-q"])
    assert rc == 0, capsys.readouterr().err
    got = zarr.open_array(str(tmp / "o.zarr"), mode="r")[...]
    ref = infer(net, x, (8, 6), (4, 3), batch_size=3, weight="gaussian")
    np.testing.assert_allclose(got, ref.numpy(), rtol=1e-5, atol=1e-5)
    rc = main(["infer", str(tmp / "net.ts"), str(tmp / "in.zarr"), str(tmp / "o.zarr"),
               "--window", "8,6", "--device", "cpu", "-q"])
    assert rc == 1 and "already exists" in capsys.readouterr().err
    (tmp / "junk.pt").write_bytes(b"not a model")
    rc = main(["infer", str(tmp / "junk.pt"), str(tmp / "in.zarr"), str(tmp / "j.zarr"),
               "--window", "8", "-q"])
    assert rc == 1 and "neither a torch.export program" in capsys.readouterr().err
    rc = main(["infer", str(tmp / "nope.pt2"), str(tmp / "in.zarr"), str(tmp / "j.zarr"),
               "--window", "8", "-q"])
    assert rc == 1 and "does not exist" in capsys.readouterr().err
