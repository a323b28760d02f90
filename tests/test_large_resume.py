"""Kill-and-resume: a run killed at any point, resumed with ``resume=True``, equals an
uninterrupted run bit for bit; a store is never left looking complete."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
import zarr

from qlty_gpu import LargeNCYXQuilt, LargeNCZYXQuilt, QltyError

GEOS = {
    "2d": dict(cls=LargeNCYXQuilt, N=2, shape=(41, 37), window=(8, 7), step=(5, 4),
               border=(1, 1), chunks=(9, 10), C=2),
    "3d": dict(cls=LargeNCZYXQuilt, N=1, shape=(17, 14, 15), window=(6, 5, 4), step=(4, 3, 3),
               border=(1, 1, 1), chunks=(5, 6, 7), C=2),
}


def _data(g):
    return torch.from_numpy(
        np.random.default_rng(3).standard_normal((g["N"], g["C"], *g["shape"])).astype(np.float32)
    )


def _quilt(g, path, **kw):
    return g["cls"](path, g["N"], *g["shape"], window=g["window"], step=g["step"],
                    border=g["border"], chunks=g["chunks"], **kw)


def _model(p):
    return torch.tanh(p) * 3 + p * p


def _run(g, path, batch=5, **kw):
    q = _quilt(g, path, **kw)
    x = _data(g)
    for idx, p in q.iter_patches(x, batch):
        q.stitch(_model(p), idx, patch_var=p.abs())
    return q, q.return_mean(std=True)


@pytest.mark.parametrize("key", list(GEOS))
@pytest.mark.parametrize("fail_after", [3, 14])  # std+mean per chunk: after mean, after std
def test_failure_mid_run_then_resume_equals_uninterrupted(key, fail_after, tmp_path, monkeypatch):
    g = GEOS[key]
    _, (ref_m, ref_s) = _run(g, str(tmp_path / "ref"))
    path = str(tmp_path / "run")
    q = _quilt(g, path)
    x = _data(g)
    from qlty_gpu.stream import store

    real = store.ZarrSink.write
    calls = {"n": 0}

    def dying(self, region, data, unit=None):
        calls["n"] += 1
        if calls["n"] > fail_after:
            raise OSError("simulated crash while writing a chunk")
        return real(self, region, data, unit)

    monkeypatch.setattr(store.ZarrSink, "write", dying)
    with pytest.raises(OSError, match="simulated crash"):
        for idx, p in q.iter_patches(x, 3):
            q.stitch(_model(p), idx, patch_var=p.abs())
    monkeypatch.setattr(store.ZarrSink, "write", real)
    assert not zarr.open_array(path + "_mean.zarr").attrs["qlty_gpu"]["complete"]
    with pytest.raises(QltyError, match="already exists"):
        _quilt(g, path)
    r, (m, s) = _run(g, path, batch=4, resume=True)
    assert r.skipped == 0 and 0 < len(r._prev_done) < r._acc.total_chunks
    assert r.pending_indices().size == 0
    np.testing.assert_array_equal(m, ref_m)
    np.testing.assert_array_equal(s, ref_s)
    assert zarr.open_array(path + "_mean.zarr").attrs["qlty_gpu"]["complete"]


def test_resume_skips_finished_work_and_checks_settings(tmp_path):
    g = GEOS["2d"]
    path = str(tmp_path / "run")
    q = _quilt(g, path)
    x = _data(g)
    order = list(range(q.N_chunks))
    for i in order[: q.N_chunks // 2]:
        q.stitch(_model(q.unstitch(x, i)), i, patch_var=q.unstitch(x, i).abs())
    done = set(q._acc.done)
    assert done
    del q  # "killed"
    with pytest.raises(QltyError, match=r"step: stored \[5, 4\], now \[5, 5\]"):
        g["cls"](path, g["N"], *g["shape"], window=g["window"], step=(5, 5), border=g["border"],
                 chunks=g["chunks"], resume=True)
    r = _quilt(g, path, resume=True)
    assert r._prev_done == done
    pending = r.pending_indices()
    assert 0 < len(pending) < r.N_chunks
    assert not r.needed(0) and r.needed(r.N_chunks - 1)
    # the qlty loop still works: patches whose chunks are all written are skipped
    for _ in range(r.N_chunks):
        i, p = r.unstitch_next(x)
        r.stitch(_model(p.unsqueeze(0)), i, patch_var=p.abs())
    assert r.skipped == r.N_chunks - len(pending)
    _, (ref_m, _) = _run(g, str(tmp_path / "ref"))
    np.testing.assert_allclose(r.return_mean(), ref_m, rtol=1e-6, atol=1e-6)
    # patches must match the stored run
    r2 = _quilt(g, str(tmp_path / "ref"), resume=True)
    with pytest.raises(QltyError, match="C: stored 2, now 3"):
        r2.stitch(torch.zeros(1, 3, *g["window"]), 0, patch_var=torch.zeros(1, 3, *g["window"]))


CHILD = textwrap.dedent(
    """
    import sys, numpy as np, torch
    sys.path.insert(0, {tests!r})
    from test_large_resume import GEOS, _data, _model, _quilt
    g = GEOS[{key!r}]
    q = _quilt(g, {path!r}, resume={resume})
    x = _data(g)
    for k, (idx, p) in enumerate(q.iter_patches(x, 3)):
        q.stitch(_model(p), idx, patch_var=p.abs())
        print("batch", k, flush=True)
    q.return_mean(std=True)
    print("done", flush=True)
    """
)


@pytest.mark.slow
@pytest.mark.parametrize("key", list(GEOS))
def test_sigkill_then_resume_equals_uninterrupted(key, tmp_path):
    g = GEOS[key]
    _, (ref_m, ref_s) = _run(g, str(tmp_path / "ref"))
    path = str(tmp_path / "run")
    tests = os.path.dirname(os.path.abspath(__file__))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for kill_at in (2, 9):
        code = CHILD.format(tests=tests, key=key, path=path, resume=kill_at != 2)
        child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                                 env=env)
        for line in child.stdout:
            if line.startswith(f"batch {kill_at}") or line.startswith("done"):
                child.send_signal(signal.SIGKILL)  # lands anywhere in the next batch
                break
        child.wait()
        assert child.returncode == -signal.SIGKILL
        assert not zarr.open_array(path + "_mean.zarr").attrs["qlty_gpu"]["complete"]
    code = CHILD.format(tests=tests, key=key, path=path, resume=True)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    m = zarr.open_array(path + "_mean.zarr")
    assert m.attrs["qlty_gpu"]["complete"]
    np.testing.assert_array_equal(m[:], ref_m)
    np.testing.assert_array_equal(zarr.open_array(path + "_std.zarr")[:], ref_s)
