"""Out-of-core quilts: qlty_gpu's Large quilts vs qlty 1.5.0's and MONAI's ZarrAvgMerger.

Cases (issue 10, item 8), model = identity, ``border=None`` (MONAI averages by counts):

* ``2d``: (2, 3, 1024, 1024), window 64, step 32 (1922 patches);
* ``3d``: (1, 1, 256, 256, 256), window 64, step 32 (343 patches);
* ``scale_*``: qlty_gpu batched on a lazy synthetic (1, 1, S, S) source, S = 2048, 4096,
  8192 (window 128, step 96), to show peak memory stays flat as the volume grows.

Providers, each in a fresh interpreter (``torch.set_num_threads(1)`` everywhere: the
benchmark machine is shared, and OpenMP spinning on busy cores makes small ops erratic):

* ``qlty_gpu loop``: qlty's patch-at-a-time loop (``unstitch_next`` + ``stitch``);
* ``qlty_gpu batched``: ``iter_patches(batch_size=64)`` + batched ``stitch``;
* ``qlty loop``: the same loop on qlty 1.5.0's Large class. It runs ~7 ms a patch (more in
  3-D), so only the first ``--qlty-patches`` patches are timed and the loop time is
  extrapolated linearly to all patches (marked ``extrapolated`` in the notes; at most
  ``CAP_S`` seconds of loop); its
  ``return_mean`` is timed in full;
* ``monai``: ``ZarrAvgMerger.aggregate`` per patch (one merger per image, chunks the size of
  a window like qlty's caches; MONAI's default auto-chunking is far slower) + ``finalize``,
  extrapolated the same way when capped.

qlty_gpu's own providers run ``--repeat`` times (fresh process each); the fastest counts.

Reported: total seconds (loop + result), peak RSS of the child, bytes of the stores on disk.
Results append to ``benchmarks/results/large-cpu.csv`` and print as a markdown table.

Run: ``python benchmarks/bench_large.py [--qlty-patches 200] [--cases 2d,3d,scale]``
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

CASES = {
    "2d": dict(shape=(2, 3, 1024, 1024), window=64, step=32),
    "3d": dict(shape=(1, 1, 256, 256, 256), window=64, step=32),
}
CAP_S = 12.0  # qlty / MONAI loops stop after this many seconds (then extrapolate)
SCALE = {f"scale_{s}": dict(shape=(1, 1, s, s), window=128, step=96) for s in (2048, 4096, 8192)}


def _du(paths) -> int:
    total = 0
    for p in paths:
        for root, _, files in os.walk(p):
            total += sum(os.path.getsize(os.path.join(root, f)) for f in files)
    return total


def _peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class Synthetic:
    """Lazy (N, C, *S) float32 source computed from coordinates (nothing held in memory)."""

    def __init__(self, shape):
        import numpy as np

        self.shape, self.dtype, self._np = tuple(shape), np.dtype("float32"), np

    def __getitem__(self, key):
        np = self._np
        grids = np.meshgrid(*[np.arange(s.start, s.stop, dtype=np.float32) for s in key[2:]],
                            indexing="ij", sparse=True)
        base = sum(np.sin(g / (17.0 + 7 * i)) for i, g in enumerate(grids))
        c = key[1]
        return np.stack([base * (k + 1) for k in range(c.start or 0, c.stop)])


def child(case: str, provider: str, qlty_patches: int, tmp: str) -> dict:
    import numpy as np
    import torch

    torch.set_num_threads(1)
    spec = {**CASES, **SCALE}[case]
    shape, w, s = spec["shape"], spec["window"], spec["step"]
    nd = len(shape) - 2
    win, stp = (w,) * nd, (s,) * nd
    base = os.path.join(tmp, "out")
    notes = ""
    if case.startswith("scale"):
        data = Synthetic(shape)
    else:
        data = torch.from_numpy(np.random.default_rng(0).standard_normal(shape).astype(np.float32))
    t0 = time.perf_counter()
    if provider.startswith("qlty_gpu"):
        from qlty_gpu import LargeNCYXQuilt, LargeNCZYXQuilt

        cls = LargeNCYXQuilt if nd == 2 else LargeNCZYXQuilt
        q = cls(base, shape[0], *shape[2:], window=win, step=stp, border=None)
        m = q.N_chunks
        if provider == "qlty_gpu loop":
            for _ in range(m):
                i, p = q.unstitch_next(data)
                q.stitch(p.unsqueeze(0), i)
        else:
            for idx, p in q.iter_patches(data, batch_size=64):
                q.stitch(p, idx)
        t_loop = time.perf_counter() - t0
        t1 = time.perf_counter()
        out = q.return_mean(as_zarr=case.startswith("scale"))
        t_res = time.perf_counter() - t1
        if not case.startswith("scale"):
            err = float(np.abs(out - data.numpy()).max())
            notes = f"max_err={err:.1e}"
        total = t_loop + t_res
        outputs = [q.mean_path]
    elif provider == "qlty loop":
        from qlty import qlty2DLarge, qlty3DLarge

        cls = qlty2DLarge.LargeNCYXQuilt if nd == 2 else qlty3DLarge.LargeNCZYXQuilt
        q = cls(base, shape[0], *shape[2:], window=win, step=stp, border=None)
        m = q.N_chunks
        k = 0
        while k < min(m, qlty_patches) and (k < 10 or time.perf_counter() - t0 < CAP_S):
            i, p = q.unstitch_next(data)
            q.stitch(p.unsqueeze(0), i)
            k += 1
        t_loop = (time.perf_counter() - t0) * m / k
        t1 = time.perf_counter()
        q.return_mean()
        t_res = time.perf_counter() - t1
        total = t_loop + t_res
        notes = f"loop extrapolated from {k} of {m} patches" if k < m else ""
        outputs = [base + sfx for sfx in ("_mean_cache.zarr", "_std_cache.zarr",
                                          "_norma_cache.zarr", "_mean.zarr")]
    elif provider == "monai":
        from monai.inferers import ZarrAvgMerger

        from qlty_gpu.geometry import QuiltPlan

        plan = QuiltPlan(shape[2:], win, stp)
        mergers = [ZarrAvgMerger(merged_shape=(1, *shape[1:]), store=f"{base}_{n}.zarr",
                                 value_store=f"{base}_{n}_v.zarr", count_store=f"{base}_{n}_c.zarr",
                                 chunks=(1, shape[1], *win))  # window chunks, as qlty's caches
                   for n in range(shape[0])]
        m = shape[0] * plan.patches_per_image
        t0 = time.perf_counter()  # the mergers' array creation is setup, not per-patch work
        origins = plan.origins().tolist()
        done = 0
        for n in range(shape[0]):
            for o in origins:
                if done >= min(m, qlty_patches) or (done >= 10 and time.perf_counter() - t0 > CAP_S):
                    break
                reg = (slice(n, n + 1), slice(None), *[slice(a, a + w) for a in o])
                mergers[n].aggregate(data[reg], o)
                done += 1
        k = done
        t_loop = (time.perf_counter() - t0) * m / k
        t1 = time.perf_counter()
        for mg in mergers:
            mg.finalize()
        t_res = time.perf_counter() - t1
        total = t_loop + t_res
        notes = f"loop extrapolated from {k} of {m} patches" if k < m else ""
        outputs = [f"{base}_{n}{sfx}.zarr" for n in range(shape[0]) for sfx in ("", "_v", "_c")]
    else:
        raise SystemExit(f"unknown provider {provider}")
    return {"case": case, "provider": provider, "patches": m, "seconds": round(total, 3),
            "loop_s": round(t_loop, 3), "result_s": round(t_res, 3),
            "ms_per_patch": round(t_loop / m * 1e3, 3), "peak_rss_mb": round(_peak_rss_mb(), 1),
            "disk_mb": round(_du(outputs) / 2**20, 2), "notes": notes}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--child", nargs=3, metavar=("CASE", "PROVIDER", "QLTY_PATCHES"))
    ap.add_argument("--qlty-patches", type=int, default=200)
    ap.add_argument("--cases", default="2d,3d,scale")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    if args.child:
        case, provider, k = args.child
        tmp = tempfile.mkdtemp(prefix="bench_large_")
        try:
            print(json.dumps(child(case, provider, int(k), tmp)))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return
    from harness import append_rows, device_name, markdown_table, run_isolated

    wanted = args.cases.split(",")
    jobs = []
    for case in CASES:
        if case in wanted:
            jobs += [(case, p) for p in ("qlty_gpu loop", "qlty_gpu batched", "qlty loop", "monai")]
    if "scale" in wanted:
        jobs += [(case, "qlty_gpu batched") for case in SCALE]
    rows = []
    for case, provider in jobs:
        reps = args.repeat if provider.startswith("qlty_gpu") and case in CASES else 1
        r = min((run_isolated(__file__, case, provider, str(args.qlty_patches))
                 for _ in range(reps)), key=lambda r: r["seconds"])
        print(json.dumps(r), flush=True)
        rows.append(r)
    for case in CASES:
        ref = {r["provider"]: r["seconds"] for r in rows if r["case"] == case}
        for r in rows:
            if r["case"] == case and "qlty loop" in ref:
                r["vs_qlty"] = f"{ref['qlty loop'] / r['seconds']:.1f}x"
                if "monai" in ref:
                    r["vs_monai"] = f"{ref['monai'] / r['seconds']:.1f}x"
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime())
    out = HERE / "results" / "large-cpu.csv"
    cols = ["timestamp", "device", "case", "provider", "patches", "seconds", "loop_s", "result_s",
            "ms_per_patch", "peak_rss_mb", "disk_mb", "vs_qlty", "vs_monai", "notes"]
    append_rows([{**r, "timestamp": stamp, "device": device_name()} for r in rows], path=out,
                columns=cols)
    print(markdown_table(rows, ["case", "provider", "patches", "seconds", "ms_per_patch",
                                "peak_rss_mb", "disk_mb", "vs_qlty", "vs_monai", "notes"]))


if __name__ == "__main__":
    main()
