"""Region engine: Zarr -> Zarr equals in memory, each patch once, fixed order, resume."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from qlty_gpu import QltyError, infer
from qlty_gpu.geometry import QuiltPlan
from qlty_gpu.ops import unstitch
from qlty_gpu.stream.executor import probe
from qlty_gpu.stream.regions import RegionLayout, finish_core, run_region
from qlty_gpu.stream.sources import as_source

REPO = Path(__file__).resolve().parents[1]


class Counting(torch.nn.Module):
    """A conv that records the pixel sum of every real window it sees (zeros are probes or
    padding). With positive integer inputs the sums are exact fingerprints of the windows."""

    def __init__(self, nd: int, cin: int, cout: int):
        super().__init__()
        torch.manual_seed(0)
        self.conv = (torch.nn.Conv2d if nd == 2 else torch.nn.Conv3d)(cin, cout, 3, padding=1)
        self.seen: list[float] = []

    def forward(self, t):
        s = t.double().flatten(1).sum(1)
        self.seen += [float(v) for v in s if v != 0]
        return self.conv(t)


def window_sums(x, window, step):
    p = unstitch(x.double(), window, step)
    return sorted(float(v) for v in p.flatten(1).sum(1))


CASES = [
    # (shape, window, step, chunks, region_chunks)
    ((2, 2, 37, 29), (8, 6), (5, 4), (8, 6), 1),  # 5 x 5 regions x 2 image blocks
    ((1, 1, 30, 33), (9, 7), (4, 3), (4, 4), (1, 2)),  # regions smaller than the window
    ((1, 2, 17, 14, 19), (5, 4, 6), (3, 3, 4), (4, 5, 6), 1),  # 3-D, 5 x 3 x 4 regions
    ((1, 1, 26, 21), (4, 3), (7, 5), (6, 4), 1),  # step > window: gaps, empty regions
]


@pytest.mark.parametrize("case", CASES)
def test_zarr_to_zarr_equals_in_memory_each_patch_once(tmp_path, case):
    shape, window, step, chunks, rc = case
    x = torch.randint(1, 50, shape).float()
    nd = len(window)
    model = Counting(nd, shape[1], 3)
    src = zarr.create_array(store=str(tmp_path / "in.zarr"), shape=shape, chunks=(1, 1, *chunks),
                            dtype="float32")
    src[...] = x.numpy()
    ref = infer(model.conv, x, window, step, batch_size=7, weight="gaussian")
    out = infer(model, src, window, step, batch_size=7, weight="gaussian",
                out=str(tmp_path / "out.zarr"), chunks=chunks, region_chunks=rc)
    got = torch.from_numpy(out[...])
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5, equal_nan=True)
    assert sorted(model.seen) == window_sums(x, window, step)  # every patch exactly once
    marker = dict(out.attrs)["qlty_gpu"]
    assert marker["complete"] and marker["patches_run"] == len(model.seen)
    assert marker["patches_rerun"] == 0
    lay = marker["fingerprint"]["layout"]
    assert lay["regions"] > 4


def _layout_and_runner(x, window, step, region, model):
    from qlty_gpu.infer import make_runner

    plan = QuiltPlan(x.shape[2:], window, step)
    runner = make_runner(model, plan, x.shape[0], source_device=torch.device("cpu"),
                         weight="hann", sigma=0.125, border=None, border_weight=1.0,
                         batch_size=5, device=None, accumulate_device=None, amp=False,
                         model_dtype=None, pad_last_batch=False, grad=False, backend=None)
    probe(runner, x.shape[1], x.dtype)
    return RegionLayout(plan, x.shape[0], region, runner.specs[0].scale), runner


def test_region_tasks_in_any_order_give_the_same_bits():
    """The executor seam: tasks run in a shuffled order (as a cluster would) and finished
    as soon as their backward neighbours are done give the in-process bits."""
    x = torch.randn(1, 2, 31, 27, dtype=torch.float32)
    net = Counting(2, 2, 2)
    layout, runner = _layout_and_runner(x, (7, 6), (3, 4), (5, 6), net)
    source = as_source(x)
    spec = runner.specs[0]

    def run(order):
        results = {rid: run_region(source, rid, layout, runner) for rid in order}
        out = torch.empty(1, 2, 31, 27)
        for rid in reversed(order):  # finish in another order again
            tails = [(o, results[src].tails[o]) for o, src in layout.backward_neighbours(rid)]
            core = finish_core(results[rid], tails, layout, spec)
            out[(slice(None), slice(None), *[slice(a, b) for a, b in layout.core_out(rid)])] = core
        return out

    ids = list(layout.region_ids())
    a = run(ids)
    shuffled = ids[:]
    random.Random(0).shuffle(shuffled)
    b = run(shuffled)
    assert torch.equal(a, b)
    ref = infer(net.conv, x, (7, 6), (3, 4), batch_size=5, weight="hann")
    torch.testing.assert_close(a, ref, rtol=1e-5, atol=1e-5)


def test_upsampling_model_to_zarr(tmp_path):
    x = torch.rand(1, 1, 24, 20)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 1), torch.nn.Upsample(scale_factor=2))
    ref = infer(model, x, (8, 6), (4, 2), batch_size=6, weight="gaussian")
    out = infer(model, x, (8, 6), (4, 2), batch_size=6, weight="gaussian",
                out=str(tmp_path / "up.zarr"), chunks=(8, 6), region_chunks=1)
    assert out.shape == (1, 2, 48, 40)
    torch.testing.assert_close(torch.from_numpy(out[...]), ref, rtol=1e-5, atol=1e-5)


def test_argmax_to_zarr_equals_argmax_of_full_result(tmp_path):
    x = torch.randn(2, 3, 9, 12, 10)
    net = torch.nn.Conv3d(3, 6, 3, padding=1)
    full = infer(net, x, (4, 5, 4), (3, 3, 3), batch_size=9, weight="gaussian")
    out = infer(net, x, (4, 5, 4), (3, 3, 3), batch_size=9, weight="gaussian", reduce="argmax",
                out=str(tmp_path / "cls.zarr"), chunks=(3, 4, 5))
    assert out.shape == (2, 1, 9, 12, 10) and out.dtype == np.uint8
    assert np.array_equal(out[...], full.argmax(1, keepdim=True).numpy())
    sm = infer(net, x, (4, 5, 4), (3, 3, 3), batch_size=9, weight="gaussian", reduce="softmax",
               out=str(tmp_path / "sm.zarr"), chunks=(3, 4, 5))
    torch.testing.assert_close(torch.from_numpy(sm[...]), full.softmax(1), rtol=1e-5, atol=1e-6)


def test_sources_and_existing_array(tmp_path):
    h5py = pytest.importorskip("h5py")
    x = torch.rand(1, 2, 19, 23)
    net = torch.nn.Conv2d(2, 2, 3, padding=1)
    ref = infer(net, x, 6, 4, batch_size=4)
    with h5py.File(tmp_path / "in.h5", "w") as f:
        f["x"] = x.numpy()
    mm = np.lib.format.open_memmap(tmp_path / "in.npy", mode="w+", dtype=np.float32, shape=x.shape)
    mm[...] = x.numpy()
    with h5py.File(tmp_path / "in.h5", "r") as f:
        out = infer(net, f["x"], 6, 4, batch_size=4, out=str(tmp_path / "a.zarr"), chunks=(8, 8))
        torch.testing.assert_close(torch.from_numpy(out[...]), ref, rtol=1e-5, atol=1e-5)
    arr = zarr.create_array(store=str(tmp_path / "b.zarr"), shape=(1, 2, 19, 23),
                            chunks=(1, 2, 5, 7), dtype="float32")
    out = infer(net, mm, 6, 4, batch_size=4, out=arr)
    torch.testing.assert_close(torch.from_numpy(arr[...]), ref, rtol=1e-5, atol=1e-5)
    assert out.chunks == (1, 2, 5, 7)
    # a path input without out= comes back in memory
    torch.testing.assert_close(infer(net, str(tmp_path / "b.zarr"), 6, 4, batch_size=4),
                               infer(net, torch.from_numpy(arr[...]), 6, 4, batch_size=4))


def test_store_errors(tmp_path):
    x = torch.rand(1, 1, 16, 16)
    net = torch.nn.Conv2d(1, 2, 1)
    path = str(tmp_path / "o.zarr")
    infer(net, x, 8, 4, out=path, chunks=(8, 8))
    with pytest.raises(QltyError, match="already exists"):
        infer(net, x, 8, 4, out=path, chunks=(8, 8))
    with pytest.raises(QltyError, match="resume=True refused.*weight"):
        infer(net, x, 8, 4, out=path, chunks=(8, 8), resume=True, weight="hann")
    other = torch.nn.Conv2d(1, 2, 1)
    with pytest.raises(QltyError, match="resume=True refused.*model"):
        infer(other, x, 8, 4, out=path, chunks=(8, 8), resume=True)
    again = infer(net, x, 8, 4, out=path, chunks=(8, 8), resume=True)  # nothing left to do
    assert dict(again.attrs)["qlty_gpu"]["patches_run"] == 0
    infer(net, x, 8, 4, out=path, chunks=(8, 8), overwrite=True)
    with pytest.raises(QltyError, match="one output tensor"):
        infer(lambda t: (t, t), x, 8, 4, out=str(tmp_path / "t.zarr"), chunks=(8, 8))
    bad = zarr.create_array(store={}, shape=(1, 3, 16, 16), chunks=(1, 3, 8, 8), dtype="float32")
    with pytest.raises(QltyError, match="out has shape"):
        infer(net, x, 8, 4, out=bad)
    with pytest.raises(QltyError, match="grad=True"):
        infer(net, x, 8, 4, out=str(tmp_path / "g.zarr"), grad=True)
    with pytest.raises(QltyError, match="does not exist"):
        infer(net, str(tmp_path / "missing.zarr"), 8, 4)


def test_ome_zarr_in_ome_zarr_out(tmp_path):
    vol = np.random.default_rng(0).random((2, 9, 12, 10)).astype(np.float32)  # c z y x
    g = zarr.open_group(str(tmp_path / "in.ome.zarr"), mode="w")
    g.create_array("0", shape=vol.shape, chunks=(1, 5, 6, 5), dtype="float32")[...] = vol
    axes = [{"name": "c", "type": "channel"}] + [
        {"name": n, "type": "space", "unit": "micrometer"} for n in "zyx"]
    g.update_attributes({"ome": {"version": "0.5", "multiscales": [{
        "name": "cells", "axes": axes,
        "datasets": [{"path": "0", "coordinateTransformations": [
            {"type": "scale", "scale": [1.0, 2.0, 0.5, 0.5]}]}]}]}})
    net = torch.nn.Conv3d(2, 3, 1)
    out = infer(net, str(tmp_path / "in.ome.zarr"), (4, 6, 5), (2, 3, 3), batch_size=6,
                out=str(tmp_path / "out.ome.zarr"), chunks=(5, 6, 5))
    assert out.shape == (3, 9, 12, 10)  # c z y x, like the input
    ref = infer(net, torch.from_numpy(vol)[None], (4, 6, 5), (2, 3, 3), batch_size=6)
    torch.testing.assert_close(torch.from_numpy(out[...]), ref[0], rtol=1e-5, atol=1e-5)
    meta = dict(zarr.open_group(str(tmp_path / "out.ome.zarr"), mode="r").attrs)["ome"]
    ms = meta["multiscales"][0]
    assert ms["axes"] == axes and ms["name"] == "cells"
    assert ms["datasets"][0]["coordinateTransformations"][0]["scale"] == [1.0, 2.0, 0.5, 0.5]
    fp = dict(out.attrs)["qlty_gpu"]["fingerprint"]
    for key in ("window", "step", "weight", "layout", "model", "qlty_gpu_version"):
        assert key in fp
    # argmax of a single-channel-less input: no channel axis in, 1 class map out
    g2 = zarr.open_group(str(tmp_path / "zyx.ome.zarr"), mode="w")
    g2.create_array("0", shape=vol.shape[1:], chunks=(5, 6, 5), dtype="float32")[...] = vol[0]
    g2.update_attributes({"ome": {"version": "0.5", "multiscales": [{
        "axes": axes[1:], "datasets": [{"path": "0", "coordinateTransformations": [
            {"type": "scale", "scale": [2.0, 0.5, 0.5]}]}]}]}})
    cls = infer(torch.nn.Conv3d(1, 4, 1), str(tmp_path / "zyx.ome.zarr"), 4, 2, reduce="argmax",
                out=str(tmp_path / "cls.ome.zarr"), chunks=(5, 6, 5))
    assert cls.shape == (9, 12, 10)
    ms2 = dict(zarr.open_group(str(tmp_path / "cls.ome.zarr"), mode="r").attrs)["ome"]
    assert [a["name"] for a in ms2["multiscales"][0]["axes"]] == ["z", "y", "x"]


KILL_SCRIPT = textwrap.dedent("""
    import os, signal, sys, torch, zarr
    sys.path.insert(0, {repo!r})
    from qlty_gpu import infer
    out, stop_after = sys.argv[1], int(sys.argv[2])
    torch.manual_seed(0)
    net = torch.nn.Conv2d(2, 3, 3, padding=1)
    done = os.path.join(out, "qlty_gpu_done")

    def kill_between_regions(module, args):
        if os.path.isdir(done) and len(os.listdir(done)) >= stop_after:
            os.kill(os.getpid(), signal.SIGKILL)  # region stop_after-1 written, next started

    net.register_forward_pre_hook(kill_between_regions)
    src = zarr.open_array({src!r}, mode="r")
    infer(net, src, (8, 7), (5, 4), batch_size=6, weight="gaussian", out=out,
          chunks=(8, 8), region_chunks=1)
""")


@pytest.mark.slow
def test_kill_and_resume_is_bit_identical(tmp_path):
    x = np.random.default_rng(1).random((1, 2, 41, 37)).astype(np.float32)
    src = zarr.create_array(store=str(tmp_path / "in.zarr"), shape=x.shape, chunks=(1, 2, 16, 16),
                            dtype="float32")
    src[...] = x
    torch.manual_seed(0)
    net = torch.nn.Conv2d(2, 3, 3, padding=1)
    kw = dict(batch_size=6, weight="gaussian", chunks=(8, 8), region_chunks=1)
    full = infer(net, src, (8, 7), (5, 4), out=str(tmp_path / "full.zarr"), **kw)
    script = tmp_path / "kill.py"
    script.write_text(KILL_SCRIPT.format(repo=str(REPO), src=str(tmp_path / "in.zarr")))
    out = str(tmp_path / "killed.zarr")
    proc = subprocess.run([sys.executable, str(script), out, "7"], capture_output=True,
                          timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    left = zarr.open_array(out, mode="r")
    assert dict(left.attrs)["qlty_gpu"]["complete"] is False
    assert len(os.listdir(os.path.join(out, "qlty_gpu_done"))) == 7  # regions (0,0,0..6)
    with pytest.raises(QltyError, match="already exists"):
        infer(net, src, (8, 7), (5, 4), out=out, **kw)
    resumed = infer(net, src, (8, 7), (5, 4), out=out, resume=True, **kw)
    marker = dict(resumed.attrs)["qlty_gpu"]
    assert marker["complete"] and marker["resumed"]
    assert np.array_equal(resumed[...], full[...])  # bit for bit
    plan = QuiltPlan((41, 37), (8, 7), (5, 4))
    # row 0 (5 regions) + 2 of row 1 were finished; regions that owe tails to unfinished
    # ones ran again, nothing else did
    assert 0 < marker["patches_rerun"] < plan.patches_per_image
    assert marker["patches_run"] == (plan.patches_per_image - _finished_patches(7)
                                     + marker["patches_rerun"])


def _finished_patches(n_regions: int) -> int:
    lay = RegionLayout(QuiltPlan((41, 37), (8, 7), (5, 4)), 1, (8, 8), (1, 1))
    ids = list(lay.region_ids())[:n_regions]
    return sum(lay.n_patches(r) for r in ids)


def test_memory_is_bounded_by_the_region_not_the_volume(tmp_path):
    """Tails held at once: one row of regions' worth, whatever the number of rows."""
    net = torch.nn.Conv2d(1, 2, 1)
    peaks = []
    for rows in (40, 160):  # 4x more regions along the slow axis
        x = torch.rand(1, 1, rows, 48)
        out = infer(net, x, (8, 8), (4, 4), out=str(tmp_path / f"{rows}.zarr"),
                    chunks=(8, 8), region_chunks=1)
        m = dict(out.attrs)["qlty_gpu"]
        peaks.append((m["peak_tail_bytes"], m["region_block_bytes"]))
    assert peaks[0] == peaks[1] and peaks[0][0] > 0
    # one row of 6 regions leaves 6 bottom tails (4 x 8 px) + 5 corners + a right tail
    assert peaks[0][0] <= (6 * 4 * 8 + 6 * 4 * 4 + 8 * 4) * 2 * 4
