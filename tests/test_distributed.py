"""Distributed inference on Dask (issue 12): one LocalCluster of 2 worker processes.

The reference for every result is the in-process Zarr executor with the same region
layout (bit for bit) and the in-memory ``infer`` (1e-5). The test models are defined here;
the worker processes import this module (pytest puts tests/ on sys.path and spawned
workers inherit it).
"""

from __future__ import annotations

import json
import logging
import os
import threading

import numpy as np
import pytest
import torch

import qlty_gpu
from qlty_gpu.errors import QltyError

distributed = pytest.importorskip("distributed")
zarr = pytest.importorskip("zarr")

from qlty_gpu.stream.dask_executor import infer_distributed  # noqa: E402


def _warm() -> int:
    import qlty_gpu as q

    q.infer(torch.nn.Identity(), torch.zeros(1, 1, 9, 9), window=4, step=3, weight="gaussian")
    q.infer(torch.nn.Identity(), torch.zeros(1, 1, 5, 5, 5), window=3, step=2, weight="border")
    return os.getpid()


@pytest.fixture(scope="module")
def client():
    from distributed import Client, LocalCluster

    cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                           dashboard_address=None, silence_logs=logging.ERROR)
    c = Client(cluster)
    try:
        c.run(_warm)
        yield c
    finally:
        c.close()
        cluster.close()


def _to_zarr(path, x: torch.Tensor, chunks) -> str:
    a = zarr.create_array(store=str(path), shape=tuple(x.shape), chunks=chunks, dtype="f4")
    a[:] = x.numpy()
    return str(path)


def _conv(cin, cout, nd=2, seed=0):
    torch.manual_seed(seed)
    m = (torch.nn.Conv2d if nd == 2 else torch.nn.Conv3d)(cin, cout, 3, padding=1)
    return m.eval()


# ------------------------------------------------------------------ models
class PatchLog(torch.nn.Module):
    """Doubles its input; logs the start id (channel 0, top-left pixel) of every window."""

    def __init__(self, log_dir: str) -> None:
        super().__init__()
        self.log_dir = log_dir

    def forward(self, b: torch.Tensor) -> torch.Tensor:
        ids = b[:, 0].reshape(b.shape[0], -1)[:, 0].to(torch.int64).tolist()
        with open(os.path.join(self.log_dir, f"{os.getpid()}.txt"), "a") as f:
            f.write("".join(f"{i}\n" for i in ids if i > 0))
        return 2 * b


class KillOnce(torch.nn.Module):
    """A conv that kills its own worker process the first time it sees ``trigger``."""

    def __init__(self, marker: str, trigger: float) -> None:
        super().__init__()
        self.conv = _conv(2, 3)
        self.marker, self.trigger, self.home = marker, trigger, os.getpid()

    def forward(self, b):
        if os.getpid() != self.home and (b == self.trigger).any() and not os.path.exists(
                self.marker):
            open(self.marker, "w").close()
            os._exit(1)
        return self.conv(b)


class FailWhileFlag(torch.nn.Module):
    """A conv that raises on windows holding ``trigger`` while the ``flag`` file exists."""

    def __init__(self, flag: str, trigger: float) -> None:
        super().__init__()
        self.conv = _conv(2, 3)
        self.flag, self.trigger = flag, trigger

    def forward(self, b):
        if (b == self.trigger).any() and os.path.exists(self.flag):
            raise RuntimeError("interrupted on purpose")
        return self.conv(b)


class Unpicklable(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lock = threading.Lock()

    def forward(self, b):
        return b


class ClientOnly:
    """An array-like only the process that made it can read (a local handle)."""

    def __init__(self, a: np.ndarray) -> None:
        self.a, self.pid = a, os.getpid()
        self.shape, self.dtype = a.shape, a.dtype

    def __getitem__(self, idx):
        if os.getpid() != self.pid:
            raise OSError("handle not valid in this process")
        return self.a[idx]


class Factory:
    """A zero-argument factory that logs each call (one file per call)."""

    def __init__(self, log_dir: str) -> None:
        self.log_dir = log_dir

    def __call__(self):
        open(os.path.join(self.log_dir, f"{os.getpid()}-{os.urandom(4).hex()}"), "w").close()
        return _conv(2, 3)


class WriteLog(zarr.storage.WrapperStore):
    """Logs every key set through it with the process that set it."""

    def __init__(self, store, log: str) -> None:
        super().__init__(store)
        self.log = log

    def __getstate__(self):
        return {"store": self._store, "log": self.log}

    def __setstate__(self, state):
        self.__init__(state["store"], state["log"])

    def _with_store(self, store):
        return type(self)(store, self.log)

    async def set(self, key, value):
        with open(self.log, "a") as f:
            f.write(json.dumps([key, os.getpid()]) + "\n")
        await self._store.set(key, value)


# ------------------------------------------------------------------ results
@pytest.mark.parametrize("weight", ["gaussian", "border"])
def test_2d_bit_identical_to_in_process_and_close_to_memory(client, tmp_path, weight):
    x = torch.randn(3, 2, 45, 37)
    src = _to_zarr(tmp_path / "in.zarr", x, (1, 2, 16, 16))
    conv = _conv(2, 3)
    kw = dict(window=(8, 7), step=(5, 4), weight=weight, border=1, border_weight=0.2,
              batch_size=5, chunks=(8, 8), region_chunks=(2, 1))
    ref = qlty_gpu.infer(conv, src, out=str(tmp_path / "a.zarr"), **kw)
    out = str(tmp_path / "b.zarr")
    got = qlty_gpu.infer(conv, src, out=out, client=client, **kw)
    assert np.array_equal(got[:], ref[:])
    mem = qlty_gpu.infer(conv, x, kw["window"], kw["step"], weight=weight, border=1,
                         border_weight=0.2)
    np.testing.assert_allclose(got[:], mem.numpy(), atol=1e-5, rtol=1e-5)
    meta = dict(got.attrs)["qlty_gpu"]
    assert meta["complete"] and meta["report"]["patches_run"] == meta["patches_total"]
    assert not os.path.exists(out + ".qlty-scratch")  # scratch removed after a full run
    # the settings fingerprint is the in-process one (a run can resume the other's output)
    assert meta["fingerprint"] == dict(ref.attrs)["qlty_gpu"]["fingerprint"]


def test_3d_odd_shape_zarr_array_in_and_out(client, tmp_path):
    x = torch.randn(1, 2, 13, 11, 9)
    src = zarr.open_array(_to_zarr(tmp_path / "in.zarr", x, (1, 2, 8, 8, 8)), mode="r")
    conv = _conv(2, 3, nd=3)
    kw = dict(window=5, step=(3, 4, 2), weight="gaussian", batch_size=4, chunks=(4, 4, 4),
              region_chunks=(1, 2, 1))
    ref = qlty_gpu.infer(conv, src, out=str(tmp_path / "a.zarr"), **kw)
    out = zarr.create_array(store=str(tmp_path / "b.zarr"), shape=ref.shape, chunks=ref.chunks,
                            dtype="f4")
    rep = infer_distributed(conv, src, 5, (3, 4, 2), client=client, out=out,
                            weight="gaussian", batch_size=4, region_chunks=(1, 2, 1))
    assert np.array_equal(rep.array[:], ref[:])
    mem = qlty_gpu.infer(conv, x, 5, (3, 4, 2), weight="gaussian")
    np.testing.assert_allclose(rep.array[:], mem.numpy(), atol=1e-5, rtol=1e-5)
    assert rep.regions == 4 * 2 * 3 and rep.regions_run == rep.regions


def test_each_patch_runs_once_across_workers(client, tmp_path):
    n, y, xx = 2, 29, 23
    ids = torch.arange(1, n * y * xx + 1, dtype=torch.float32).reshape(n, 1, y, xx)
    x = torch.cat([ids, torch.randn(n, 1, y, xx)], 1)
    src = _to_zarr(tmp_path / "in.zarr", x, (1, 2, 8, 8))
    logs = tmp_path / "logs"
    logs.mkdir()
    model = PatchLog(str(logs))
    rep = infer_distributed(model, src, 6, 4, client=client, out=str(tmp_path / "o.zarr"),
                            chunks=(4, 4), region_chunks=(2, 2), batch_size=3)
    seen = [int(v) for p in logs.iterdir() for v in p.read_text().split()]
    plan = qlty_gpu.geometry.QuiltPlan((y, xx), 6, 4)
    want = sorted(int(ids[i, 0, sy, sx]) for i in range(n)
                  for sy in plan.starts[0] for sx in plan.starts[1])
    assert sorted(seen) == want  # every patch exactly once, cluster-wide
    assert rep.patches_run == len(want) == rep.patches_total
    assert rep.model_calls >= -(-len(want) // 3)
    assert sum(w["patches"] for w in rep.workers.values()) == len(want)
    assert rep.bytes_written == rep.array.nbytes
    np.testing.assert_allclose(rep.array[:], 2 * x.numpy(), rtol=1e-6)


def _sharded_case(tmp_path):
    """A Zarr source, a conv, and a sharded output (shards of 2x2 chunks) whose store logs
    every key set (to ``log``, emptied) with the writing process."""
    x = torch.randn(2, 2, 26, 30)
    src = _to_zarr(tmp_path / "in.zarr", x, (1, 2, 13, 15))
    log = str(tmp_path / "writes.jsonl")
    store = WriteLog(zarr.storage.LocalStore(str(tmp_path / "o.zarr")), log)
    out = zarr.create_array(store=store, shape=(2, 3, 26, 30), chunks=(1, 3, 4, 5),
                            shards=(1, 3, 8, 10), dtype="f4", compressors=None)
    open(log, "w").close()
    return src, _conv(2, 3), log, out


def test_no_output_chunk_written_by_two_tasks_sharded(client, tmp_path):
    src, conv, log, out = _sharded_case(tmp_path)
    rep = infer_distributed(conv, src, 6, 4, client=client, out=out,
                            scratch=str(tmp_path / "scr"), region_chunks=(1, 1))
    assert rep.region_chunks == (1, 1) and rep.regions == 2 * 4 * 3  # regions = shards
    writers: dict = {}
    for line in open(log):
        key, pid = json.loads(line)
        if key.startswith("c/"):
            writers.setdefault(key, []).append(pid)
    # every shard written exactly once (so never by two tasks), all by worker processes
    assert len(writers) == 2 * 4 * 3
    assert all(len(p) == 1 and p[0] != os.getpid() for p in writers.values()), writers
    ref = qlty_gpu.infer(conv, src, 6, 4, out=str(tmp_path / "a.zarr"), chunks=(8, 10),
                         region_chunks=1)
    assert np.array_equal(rep.array[:], ref[:])


def test_in_process_sharded_output_writes_each_shard_once(tmp_path):
    """The in-process executor also makes regions of whole shards (it used chunks: each
    shard was rewritten once per chunk), and gives the Dask executor's bits."""
    src, conv, log, out = _sharded_case(tmp_path)
    got = qlty_gpu.infer(conv, src, 6, 4, out=out, region_chunks=(1, 1))
    writes: dict = {}
    for line in open(log):
        key = json.loads(line)[0]
        if key.startswith("c/"):
            writes[key] = writes.get(key, 0) + 1
    assert len(writes) == 2 * 4 * 3 and set(writes.values()) == {1}, writes
    ref = qlty_gpu.infer(conv, src, 6, 4, out=str(tmp_path / "a.zarr"), chunks=(8, 10),
                         region_chunks=1)
    assert np.array_equal(got[:], ref[:])


def test_bounded_graph_and_model_loaded_once_per_worker(client, tmp_path):
    x = torch.randn(1, 2, 40, 33)
    src = _to_zarr(tmp_path / "in.zarr", x, (1, 2, 16, 16))
    logs = tmp_path / "loads"
    logs.mkdir()
    rep = infer_distributed(Factory(str(logs)), src, 4, 3, client=client,
                            out=str(tmp_path / "o.zarr"), chunks=(4, 4), region_chunks=1,
                            max_in_flight=3)
    assert rep.regions == 10 * 9 and rep.max_in_flight <= 3
    assert len(list(logs.iterdir())) <= 2  # one load per worker process, not per task
    ref = qlty_gpu.infer(_conv(2, 3), src, 4, 3, out=str(tmp_path / "a.zarr"), chunks=(4, 4),
                         region_chunks=1)
    assert np.array_equal(rep.array[:], ref[:])


def _exported_conv(tmp_path):
    """A conv (2 -> 3 channels) and its ``torch.export`` program saved as ``m.pt2``
    (dynamic batch size)."""
    conv = _conv(2, 3)
    ep = torch.export.export(conv, (torch.zeros(4, 2, 6, 6),),
                             dynamic_shapes=({0: torch.export.Dim("b", min=1, max=64)},))
    path = str(tmp_path / "m.pt2")
    torch.export.save(ep, path)
    return conv, path


@pytest.mark.slow
def test_torch_export_pt2_model(client, tmp_path):
    x = torch.randn(1, 2, 21, 19)
    src = _to_zarr(tmp_path / "in.zarr", x, (1, 2, 8, 8))
    conv, path = _exported_conv(tmp_path)
    rep = infer_distributed(path, src, 6, 4, client=client, out=str(tmp_path / "o.zarr"),
                            chunks=(4, 4), batch_size=4)
    mem = qlty_gpu.infer(conv, x, 6, 4)
    np.testing.assert_allclose(rep.array[:], mem.numpy(), atol=1e-5, rtol=1e-5)


def test_region_auto_says_what_it_chose(client, tmp_path, caplog):
    x = torch.randn(1, 2, 64, 48)
    src = _to_zarr(tmp_path / "in.zarr", x, (1, 2, 16, 16))
    conv = _conv(2, 3)
    with caplog.at_level(logging.INFO, logger="qlty_gpu.infer"):
        rep = infer_distributed(conv, src, 8, 6, client=client, out=str(tmp_path / "o.zarr"),
                                chunks=(8, 8), region="auto", memory_budget=60_000)
    assert "auto" in rep.region_choice and "region='auto' chose" in caplog.text
    assert 0 < rep.block_bytes_max <= 60_000  # the blocks the tasks held fit the budget
    assert rep.region_chunks != (1, 1)
    lay = rep.array.attrs["qlty_gpu"]["fingerprint"]["layout"]
    assert lay["region"] == [8 * r for r in rep.region_chunks]
    ref = qlty_gpu.infer(conv, src, 8, 6, out=str(tmp_path / "a.zarr"), chunks=(8, 8),
                         region_chunks=rep.region_chunks)
    assert np.array_equal(rep.array[:], ref[:])
    small = infer_distributed(conv, src, 8, 6, client=client, out=str(tmp_path / "s.zarr"),
                              chunks=(8, 8), region="auto", memory_budget=1)
    assert small.region_chunks == (1, 1) and "exceeds the budget" in small.region_choice


# ------------------------------------------------------------------ faults and resume
def test_worker_killed_mid_run_gives_the_same_result(client, tmp_path):
    x = torch.randn(2, 2, 33, 27)
    x[1, 0, 20, 14] = 1234.5
    src = _to_zarr(tmp_path / "in.zarr", x, (1, 2, 16, 16))
    model = KillOnce(str(tmp_path / "killed"), 1234.5)
    kw = dict(chunks=(8, 8), region_chunks=1, batch_size=4)
    ref = qlty_gpu.infer(model, src, 8, 5, out=str(tmp_path / "a.zarr"), **kw)
    rep = infer_distributed(model, src, 8, 5, client=client, out=str(tmp_path / "b.zarr"), **kw)
    assert os.path.exists(tmp_path / "killed")  # a worker process did die
    assert np.array_equal(rep.array[:], ref[:])
    assert rep.array.attrs["qlty_gpu"]["complete"]
    client.wait_for_workers(2, timeout=120)  # the nanny restarts it for the next tests


@pytest.mark.parametrize("keep_scratch", [True, False])
def test_resume_after_interrupted_run(client, tmp_path, keep_scratch):
    x = torch.randn(1, 2, 41, 35)
    x[0, 1, 30, 25] = 777.25
    src = _to_zarr(tmp_path / "in.zarr", x, (1, 2, 16, 16))
    flag = tmp_path / "flag"
    flag.touch()
    model = FailWhileFlag(str(flag), 777.25)
    out = str(tmp_path / "b.zarr")
    kw = dict(chunks=(8, 8), region_chunks=1, batch_size=4)
    with pytest.raises(QltyError, match="interrupted on purpose"):
        infer_distributed(model, src, 8, 5, client=client, out=out, max_in_flight=2, **kw)
    assert not zarr.open_array(out).attrs["qlty_gpu"]["complete"]
    flag.unlink()
    if not keep_scratch:
        import shutil

        shutil.rmtree(out + ".qlty-scratch")
    rep = infer_distributed(model, src, 8, 5, client=client, out=out, resume=True, **kw)
    assert 0 < rep.regions_run < rep.regions  # finished regions were skipped
    ref = qlty_gpu.infer(model, src, 8, 5, out=str(tmp_path / "a.zarr"), **kw)
    assert np.array_equal(rep.array[:], ref[:])
    if not keep_scratch:
        assert rep.patches_rerun > 0 and rep.tasks.get("tails", 0) > 0
    else:
        assert rep.patches_run < rep.patches_total


def test_rerun_with_other_layout_or_model_is_refused(client, tmp_path):
    x = torch.randn(1, 2, 20, 20)
    src = _to_zarr(tmp_path / "in.zarr", x, (1, 2, 16, 16))
    out = str(tmp_path / "o.zarr")
    infer_distributed(_conv(2, 3), src, 6, 4, client=client, out=out, chunks=(4, 4))
    with pytest.raises(QltyError, match="layout"):
        infer_distributed(_conv(2, 3), src, 6, 4, client=client, out=out, chunks=(4, 4),
                          region_chunks=3, resume=True)
    with pytest.raises(QltyError, match="model"):
        infer_distributed(_conv(2, 3, seed=1), src, 6, 4, client=client, out=out,
                          chunks=(4, 4), resume=True)
    with pytest.raises(QltyError, match="window"):
        infer_distributed(_conv(2, 3), src, 8, 4, client=client, out=out, chunks=(4, 4),
                          resume=True)


# ------------------------------------------------------------------ errors
def test_source_the_workers_cannot_open(client, tmp_path):
    src = ClientOnly(np.zeros((1, 2, 12, 12), np.float32))
    with pytest.raises(QltyError, match="cannot open the source"):
        infer_distributed(_conv(2, 3), src, 6, 4, client=client, out=str(tmp_path / "o.zarr"))
    with pytest.raises(QltyError, match="Dask worker can open"):
        infer_distributed(_conv(2, 3), np.zeros((1, 2, 12, 12), np.float32), 6, 4,
                          client=client, out=str(tmp_path / "o.zarr"))
    mem = zarr.create_array(store=zarr.storage.MemoryStore(), shape=(1, 2, 12, 12),
                            chunks=(1, 2, 12, 12), dtype="f4")
    with pytest.raises(QltyError, match="memory"):
        infer_distributed(_conv(2, 3), mem, 6, 4, client=client, out=str(tmp_path / "o.zarr"))


def test_model_that_cannot_be_pickled(client, tmp_path):
    src = _to_zarr(tmp_path / "in.zarr", torch.zeros(1, 1, 12, 12), (1, 1, 12, 12))
    with pytest.raises(QltyError, match="cannot be pickled.*factory"):
        infer_distributed(Unpicklable(), src, 6, 4, client=client, out=str(tmp_path / "o.zarr"))


def test_client_that_is_gone(tmp_path):
    from distributed import Client, LocalCluster

    src = _to_zarr(tmp_path / "in.zarr", torch.zeros(1, 1, 12, 12), (1, 1, 12, 12))
    with LocalCluster(n_workers=0, processes=False, dashboard_address=None) as cluster:
        c = Client(cluster)
        c.close()
    with pytest.raises(QltyError, match="closed"):
        qlty_gpu.infer(_conv(1, 1), src, 6, 4, client=c, out=str(tmp_path / "o.zarr"))
    with pytest.raises(QltyError, match="Client"):
        qlty_gpu.infer(_conv(1, 1), src, 6, 4, client="tcp://nowhere:1",
                       out=str(tmp_path / "o.zarr"))


def test_cli_scheduler(client, tmp_path, capsys):
    from qlty_gpu.cli import main

    x = torch.randn(1, 2, 23, 21)
    src = _to_zarr(tmp_path / "in.zarr", x, (1, 2, 8, 8))
    conv, path = _exported_conv(tmp_path)
    args = [path, src, "--window", "6", "--step", "4", "--chunks", "4,4", "--weight", "hann", "-q"]
    assert main(["infer", *args[:2], str(tmp_path / "a.zarr"), *args[2:], "--device",
                 "cpu"]) == 0
    assert main(["infer", *args[:2], str(tmp_path / "b.zarr"), *args[2:], "--scheduler",
                 client.scheduler.address]) == 0
    a, b = zarr.open_array(str(tmp_path / "a.zarr")), zarr.open_array(str(tmp_path / "b.zarr"))
    assert np.array_equal(a[:], b[:])
    assert b.attrs["qlty_gpu"]["report"]["patches_run"] == b.attrs["qlty_gpu"]["patches_total"]
    assert main(["infer", str(tmp_path / "nope.pt2"), *args[1:2], str(tmp_path / "c.zarr"),
                 *args[2:], "--scheduler", client.scheduler.address]) == 1
    assert "does not exist" in capsys.readouterr().err


def test_quilt_infer_with_client_and_progress(client, tmp_path, capsys):
    x = torch.randn(2, 2, 19, 22)
    src = zarr.open_array(_to_zarr(tmp_path / "in.zarr", x, (1, 2, 8, 8)), mode="r")
    quilt = qlty_gpu.NCYXQuilt(19, 22, window=(6, 8), step=(4, 5), border=(1, 1),
                               border_weight=0.3)
    conv = _conv(2, 3)
    got = quilt.infer(conv, src, out=str(tmp_path / "b.zarr"), client=client, chunks=(4, 4),
                      progress=True, region=(8, 4))
    ref = quilt.infer(conv, src, out=str(tmp_path / "a.zarr"), chunks=(4, 4),
                      region_chunks=(2, 1))
    assert np.array_equal(got[:], ref[:])
    np.testing.assert_allclose(got[:], quilt.infer(conv, x).numpy(), atol=1e-5, rtol=1e-5)
    assert "infer (dask)" in capsys.readouterr().err  # the client's progress bar
    with pytest.raises(QltyError, match="multiples of the chunk"):
        quilt.infer(conv, src, out=str(tmp_path / "c.zarr"), client=client, chunks=(4, 4),
                    region=(6, 4))


def test_missing_distributed_names_the_extra(monkeypatch, tmp_path):
    import sys

    from qlty_gpu.errors import QltyDependencyError

    monkeypatch.setitem(sys.modules, "distributed", None)
    with pytest.raises(QltyDependencyError, match=r"qlty_gpu\[dask\]"):
        qlty_gpu.infer(_conv(1, 1), str(tmp_path), 6, 4, client=object(),
                       out=str(tmp_path / "o.zarr"))


def test_client_needs_an_output_the_workers_can_write(client, tmp_path):
    src = _to_zarr(tmp_path / "in.zarr", torch.zeros(1, 1, 12, 12), (1, 1, 12, 12))
    with pytest.raises(QltyError, match="needs out="):
        qlty_gpu.infer(_conv(1, 1), src, 6, 4, client=client)
    mem = zarr.create_array(store=zarr.storage.MemoryStore(), shape=(1, 1, 12, 12),
                            chunks=(1, 1, 4, 4), dtype="f4")
    with pytest.raises(QltyError, match="cannot write it"):
        qlty_gpu.infer(_conv(1, 1), src, 6, 4, client=client, out=mem)
    with pytest.raises(QltyError, match="unknown keyword"):
        infer_distributed(_conv(1, 1), src, 6, 4, client=client, out=str(tmp_path / "o.zarr"),
                          bogus=1)


def test_deferred_and_inline_finishes_give_the_same_bits(tmp_path):
    """The tasks without Dask, in reverse raster order: regions whose tails are not there
    yet defer (core to scratch) and are finished later; the bits do not change."""
    from fractions import Fraction

    from qlty_gpu.infer import make_plan
    from qlty_gpu.stream.dask_executor import _runner_settings
    from qlty_gpu.stream.dask_prep import model_payload, open_scratch, source_ref
    from qlty_gpu.stream.dask_worker import (
        TaskContext,
        compute_task,
        finish_task,
        probe_task,
    )
    from qlty_gpu.stream.regions import RegionLayout
    from qlty_gpu.stream.store import ZarrSink

    x = torch.randn(1, 2, 29, 27)
    src = _to_zarr(tmp_path / "in.zarr", x, (1, 2, 16, 16))
    conv = _conv(2, 3)
    ref = qlty_gpu.infer(conv, src, 6, 4, out=str(tmp_path / "a.zarr"), chunks=(4, 4),
                         region_chunks=1, weight="gaussian")
    sref, _, _ = source_ref(src)
    payload = model_payload(conv)
    settings = _runner_settings({"weight": "gaussian"})
    plan = make_plan((29, 27), 6, 4)
    pr = probe_task(TaskContext(RegionLayout(plan, 1, plan.shape, (Fraction(1),) * 2),
                                settings, None, sref, None, None, 0, None, None, None), payload)
    layout = RegionLayout(plan, 1, (4, 4), pr["specs"][0].scale)
    out = zarr.create_array(store=str(tmp_path / "b.zarr"), shape=ref.shape, chunks=ref.chunks,
                            dtype="f4")
    ZarrSink(out, ref.shape, fingerprint={}, overwrite=True)
    scr, _ = open_scratch(str(tmp_path / "scr"), {}, False)
    scr.put_raw("run", b"t")
    ctx = TaskContext(layout, settings, None, sref, out, None, 3, torch.float32, None, scr,
                      pr["specs"], pr["structure"], "t")
    status = {rid: compute_task(ctx, payload, rid)["status"]
              for rid in reversed(list(layout.region_ids()))}
    assert "core" in status.values() and "finished" in status.values()
    for rid in layout.region_ids():
        if status[rid] == "core":
            assert finish_task(ctx, rid)["status"] == "finished"
    assert np.array_equal(out[:], ref[:])
    left = [p.relative_to(tmp_path / "scr").parts[0] for p in (tmp_path / "scr").rglob("*")
            if p.is_file()]
    assert "tail" not in left and "core" not in left  # every tail and core was consumed
    assert compute_task(ctx, payload, (0, 0, 0))["status"] == "skipped"  # idempotent
    scr.put_raw("run", b"newer")  # a later run owns the store: a stale task writes nothing
    with pytest.raises(QltyError, match="earlier run"):
        compute_task(ctx, payload, (0, 3, 3), mode="tails")


@pytest.mark.gpu
def test_workers_run_the_model_on_their_gpu(client, tmp_path):
    x = torch.randn(1, 2, 40, 36)
    src = _to_zarr(tmp_path / "in.zarr", x, (1, 2, 16, 16))
    conv = _conv(2, 3)
    rep = infer_distributed(conv, src, 8, 6, client=client, out=str(tmp_path / "o.zarr"),
                            chunks=(8, 8), weight="gaussian", accumulate_device="cuda")
    assert rep.array.attrs["qlty_gpu"]["fingerprint"]["device"] == "cuda"
    mem = qlty_gpu.infer(conv, x, 8, 6, weight="gaussian")
    np.testing.assert_allclose(rep.array[:], mem.numpy(), atol=1e-4, rtol=1e-4)


def test_distributed_resumes_an_interrupted_in_process_run(client, tmp_path):
    x = torch.randn(1, 2, 33, 29)
    x[0, 0, 25, 20] = 555.5
    src = _to_zarr(tmp_path / "in.zarr", x, (1, 2, 16, 16))
    flag = tmp_path / "flag"
    flag.touch()
    model = FailWhileFlag(str(flag), 555.5)
    kw = dict(chunks=(8, 8), region_chunks=1, batch_size=4, weight="hann")
    out = str(tmp_path / "b.zarr")
    with pytest.raises(RuntimeError, match="interrupted on purpose"):
        qlty_gpu.infer(model, src, 8, 5, out=out, **kw)  # in-process, killed part-way
    flag.unlink()
    rep = infer_distributed(model, src, 8, 5, client=client, out=out, resume=True, **kw)
    assert 0 < rep.regions_run < rep.regions and rep.patches_rerun > 0
    ref = qlty_gpu.infer(model, src, 8, 5, out=str(tmp_path / "a.zarr"), **kw)
    assert np.array_equal(rep.array[:], ref[:])


def test_probe_is_cached_per_worker(tmp_path, monkeypatch):
    """The probe's model call runs once per worker for the same model, settings and
    geometry; another window probes again."""
    from fractions import Fraction

    import zarr

    from qlty_gpu.infer import make_plan
    from qlty_gpu.stream import dask_worker as dw
    from qlty_gpu.stream import executor
    from qlty_gpu.stream.dask_executor import _runner_settings
    from qlty_gpu.stream.dask_prep import model_payload, source_ref
    from qlty_gpu.stream.regions import RegionLayout

    calls = []
    real = executor.probe

    def counting(runner, *a):
        calls.append(runner.plan.window)
        return real(runner, *a)

    monkeypatch.setattr(executor, "probe", counting)
    src = zarr.create_array(store=str(tmp_path / "in.zarr"), shape=(1, 1, 16, 16),
                            chunks=(1, 1, 8, 8), dtype="f4")
    src[:] = 1.0
    ref, _, _ = source_ref(src)
    payload = model_payload(torch.nn.Conv2d(1, 3, 3, padding=1))
    monkeypatch.setattr(dw, "_PROBES", type(dw._PROBES)())
    for window, n_calls in (((8, 8), 1), ((8, 8), 1), ((4, 4), 2)):
        plan = make_plan((16, 16), window, None)
        ctx = dw.TaskContext(RegionLayout(plan, 1, plan.shape, (Fraction(1),) * 2),
                             _runner_settings({"batch_size": 2}), "cpu", ref, None, None, 0,
                             None, None, None)
        out = dw.probe_task(ctx, payload)
        assert len(calls) == n_calls
        assert out["specs"][0].channels == 3 and out["model"]
