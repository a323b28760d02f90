"""Bounded memory: RSS growth while a Large quilt streams a result ~11x its chunk budget
stays within the budget plus one batch (measured in a fresh process)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

CHILD = textwrap.dedent(
    """
    import json, os, sys, threading, time, warnings
    import numpy as np, psutil, torch
    from qlty_gpu import LargeNCYXQuilt

    class Synthetic:
        '''A lazy (1, C, Y, X) source: values computed from coordinates, nothing stored.'''
        def __init__(self, shape):
            self.shape, self.dtype = shape, np.dtype("float32")
        def __getitem__(self, key):
            n, c, ys, xs = key
            y = np.arange(ys.start, ys.stop, dtype=np.float32)[:, None]
            x = np.arange(xs.start, xs.stop, dtype=np.float32)[None, :]
            base = np.sin(y / 37.0) + np.cos(x / 23.0)
            return np.stack([base * (k + 1) for k in range(c.stop - c.start)])

    C, Y, X, B = 2, 4096, 4096, 256
    q = LargeNCYXQuilt(sys.argv[1], 1, Y, X, window=(64, 64), step=(48, 48), border=4,
                       chunks=(128, 128), max_memory=None)
    budget = q.memory_bound(C, batch_size=B)
    q.max_memory = budget
    src = Synthetic((1, C, Y, X))
    proc = psutil.Process()
    it = q.iter_patches(src, batch_size=B)
    idx, p = next(it)            # warm up: imports, first batch, first accumulators
    q.stitch(p, idx)
    base = proc.memory_info().rss
    peak = [base]
    stop = False
    def watch():
        while not stop:
            peak[0] = max(peak[0], proc.memory_info().rss)
            time.sleep(0.005)
    t = threading.Thread(target=watch); t.start()
    for idx, p in it:
        q.stitch(p, idx)
    stop = True; t.join()
    out = q.return_mean(as_zarr=True)
    print(json.dumps({"growth": peak[0] - base, "budget": budget,
                      "batch_bytes": B * C * 64 * 64 * 4, "result_bytes": C * Y * X * 4,
                      "acc_peak": q._acc.peak_bytes, "n_patches": q.N_chunks}))
    """
)


@pytest.mark.slow
def test_rss_growth_is_bounded_by_the_chunk_budget(tmp_path):
    pytest.importorskip("psutil")
    r = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path / "big")], capture_output=True,
                       text=True, env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    assert r.returncode == 0, r.stderr[-3000:]
    m = json.loads(r.stdout.strip().splitlines()[-1])
    assert m["result_bytes"] >= 10 * m["budget"]  # the result is ~11x the budget
    assert m["acc_peak"] <= m["budget"]
    # accumulators + one batch (read box, patches, model copy) + Zarr/zstd working buffers
    allowed = m["budget"] + 4 * m["batch_bytes"] + 48 * 2**20
    assert m["growth"] <= allowed, m
    assert m["growth"] < m["result_bytes"] / 2, m
    print(m)
