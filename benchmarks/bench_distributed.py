"""Distributed inference (issue 12): 1 vs 2 Dask worker processes on one volume.

A 3-D conv model over a volume of ~8 region budgets (8 regions), Zarr in -> Zarr out:

* the in-process executor (the same region layout; the reference bits),
* a ``LocalCluster`` of 1 worker process and of 2 worker processes (1 thread each; torch
  uses 1 thread per worker, so the 1-worker run is the 1-CPU baseline).

Reported per run: wall time (both clusters started and warmed up first, as long-lived
clusters would be; then ``--repeats`` rounds, each running the 1-worker and then the
2-worker cluster, so load from other jobs hits both alike; the median), scaling efficiency ``T1 / (N * TN)``, model calls vs patches, scratch
bytes (written in all, held at most), bytes read / written, and that the output is
bit-identical to the in-process run. Rows go to ``benchmarks/results/cpu.csv``.

Then, on paper, the expected scaling on N GPUs for a 2048^3 volume (arithmetic printed,
labelled "on paper": no GPU was used).

Run: ``.venv/bin/python benchmarks/bench_distributed.py [--size 144] [--region 72] [--repeats 5]``.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from datetime import datetime, timezone

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


class Sleepy(torch.nn.Module):
    """Stands in for a model running on an accelerator: waits ``ms`` per call (the CPU is
    free meanwhile, as it is while a GPU computes) and returns ``x / 2``."""

    def __init__(self, ms: float) -> None:
        super().__init__()
        self.ms = ms

    def forward(self, b: torch.Tensor) -> torch.Tensor:
        time.sleep(self.ms / 1e3)
        return b * 0.5


def make_model(width: int = 8) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv3d(1, width, 3, padding=1), torch.nn.ReLU(),
        torch.nn.Conv3d(width, width, 3, padding=1), torch.nn.ReLU(),
        torch.nn.Conv3d(width, 1, 3, padding=1),
    ).eval()


MALLOC: dict = {}


def run_clusters(sizes, model, src: str, warm_src: str, out: str, kw: dict, repeats: int):
    """Start one cluster per size in ``sizes``, warm each (model loaded, kernels compiled) on
    a small volume with the same settings, then time ``repeats`` rounds that run every
    cluster in turn, each run to a fresh output (a long-lived cluster's steady state; load
    from other jobs on a shared machine hits every size alike). Returns, per size, the
    report of its median run and its start + warm-up seconds."""
    import contextlib

    import dask
    from distributed import Client, LocalCluster

    from qlty_gpu.stream.dask_executor import infer_distributed

    if MALLOC:  # see README: Dask's default trims glibc's heap after every free
        dask.config.set({f"distributed.nanny.pre-spawn-environ.{k}": v for k, v in MALLOC.items()})
    with contextlib.ExitStack() as stack:
        clients, start = {}, {}
        for n in sizes:
            t = time.perf_counter()
            cl = stack.enter_context(LocalCluster(n_workers=n, threads_per_worker=1,
                                                  processes=True, dashboard_address=None,
                                                  silence_logs=logging.ERROR))
            clients[n] = stack.enter_context(Client(cl))
            infer_distributed(model, warm_src, client=clients[n], out=f"{out}{n}.warm", **kw)
            start[n] = time.perf_counter() - t
        reps: dict = {n: [] for n in sizes}
        for i in range(repeats):
            for n in sizes:
                reps[n].append(infer_distributed(model, src, client=clients[n],
                                                 out=f"{out}{n}.{i}", **kw))
    result = {}
    for n in sizes:
        reps[n].sort(key=lambda r: r.seconds)
        result[n] = (reps[n][len(reps[n]) // 2], start[n])
    return result


def on_paper() -> list[str]:
    """Expected N-GPU scaling for a 2048^3 volume, with the arithmetic (no GPU used)."""
    side, w, s, region = 2048, 128, 96, 512
    per_axis = -(-(side - w) // s) + 1
    patches = per_axis ** 3
    regions = (side // region) ** 3
    t_patch = 0.020  # s per 128^3 patch of a mid-size 3-D U-Net (fp16, one modern GPU): assumed
    t_model = patches * t_patch
    vol_in = side ** 3 * 4  # fp32 input
    vol_out = side ** 3 * 4
    halo = ((region + w) ** 3 - region ** 3) / region ** 3  # tail bytes per core byte
    scratch = vol_out * halo  # each tail written once, read once
    fs_bw = 5e9  # shared-FS bandwidth, bytes/s, assumed (parallel file system)
    io = (vol_in * (1 + halo) + vol_out + 2 * scratch) / fs_bw
    task_overhead = 0.005  # s per task (scheduler + scratch keys), assumed
    lines = [
        "on paper (no GPU used; assumptions marked):",
        f"  volume {side}^3, window {w}, step {s}: {per_axis}^3 = {patches} patches, "
        f"regions {region}^3: {regions} tasks (+ deferred finishes)",
        f"  model: {patches} x {t_patch * 1e3:.0f} ms (assumed per 128^3 patch) = {t_model:.0f} s "
        "on one GPU",
        f"  I/O: input x (1 + halo {halo:.2f}) + output + 2 x scratch = "
        f"{(vol_in * (1 + halo) + vol_out + 2 * scratch) / 1e9:.0f} GB at {fs_bw / 1e9:.0f} GB/s "
        f"(assumed shared FS) = {io:.0f} s in all, shared by every worker",
    ]
    for n in (1, 2, 4, 8, 16, 64):
        waves = -(-regions // n)
        t_n = max(waves * (t_model / regions), io) + waves * task_overhead
        lines.append(f"  N={n:3d} GPUs: max({waves} waves x {t_model / regions:.1f} s, "
                     f"I/O {io:.0f} s) + overhead = {t_n:6.1f} s, speed-up "
                     f"{(t_model + task_overhead * regions) / t_n:5.1f}x, efficiency "
                     f"{(t_model + task_overhead * regions) / t_n / n:4.0%}")
    lines.append("  -> compute-bound until N ~ model time / I/O time "
                 f"= {t_model / io:.0f} GPUs; beyond that the shared file system sets the pace")
    return lines


def main() -> None:
    import zarr
    from harness import append_rows, device_name

    import qlty_gpu

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", type=int, default=144, help="volume side (voxels)")
    ap.add_argument("--window", type=int, default=32)
    ap.add_argument("--step", type=int, default=24)
    ap.add_argument("--region", type=int, default=72, help="region side (output voxels)")
    ap.add_argument("--width", type=int, default=8, help="model channels")
    ap.add_argument("--sleep-ms", type=float, default=0.0,
                    help="use a model that waits this long per call instead of the conv "
                         "(simulated device time: measures the executor, not CPU contention)")
    ap.add_argument("--repeats", type=int, default=5,
                    help="timed runs per configuration; the median is reported")
    ap.add_argument("--no-csv", action="store_true")
    ap.add_argument("--dask-malloc", action="store_true",
                    help="keep Dask's default MALLOC_TRIM_THRESHOLD_=65536 in the workers")
    a = ap.parse_args()
    if not a.dask_malloc:
        MALLOC.update(MALLOC_TRIM_THRESHOLD_=str(1 << 30), MALLOC_MMAP_THRESHOLD_=str(1 << 30))

    torch.set_num_threads(1)  # the in-process run: one CPU, like one worker
    d = tempfile.mkdtemp(prefix="bench_dist_")
    x = torch.randn(1, 1, a.size, a.size, a.size)
    src = os.path.join(d, "in.zarr")
    arr = zarr.create_array(store=src, shape=x.shape, chunks=(1, 1, 32, 32, 32), dtype="f4")
    arr[:] = x.numpy()
    warm_src = os.path.join(d, "warm.zarr")
    w = zarr.create_array(store=warm_src, shape=(1, 1, a.region, a.region, a.region),
                          chunks=(1, 1, 32, 32, 32), dtype="f4")
    w[:] = 0.5
    model = Sleepy(a.sleep_ms) if a.sleep_ms else make_model(a.width)
    chunk = a.region // 2
    kw = dict(window=a.window, step=a.step, chunks=(chunk,) * 3, region_chunks=2,
              batch_size=4, weight="gaussian")
    qlty_gpu.infer(model, warm_src, out=os.path.join(d, "warm.out.zarr"), **kw)
    times = []
    for i in range(a.repeats):
        t = time.perf_counter()
        ref = qlty_gpu.infer(model, src, out=os.path.join(d, f"ref{i}.zarr"), **kw)
        times.append(time.perf_counter() - t)
    t_inproc = float(np.median(times))
    results = {}
    runs = run_clusters((1, 2), model, src, warm_src, os.path.join(d, "out"), kw, a.repeats)
    for n, (rep, start) in runs.items():
        results[n] = (rep, start, bool(np.array_equal(rep.array[:], ref[:])))
    t1 = results[1][0].seconds
    what = (f"simulated device model ({a.sleep_ms:g} ms per call)" if a.sleep_ms
            else f"model Conv3d x3 width {a.width}")
    print(f"volume {a.size}^3, window {a.window}, step {a.step}, region {a.region}^3 "
          f"({results[1][0].regions} regions), {what}, 1 thread/worker, "
          f"median of {a.repeats} rounds alternating the clusters")
    print(f"{'run':<14}{'wall s':>8}{'speed-up':>10}{'effic.':>8}{'patches':>9}{'calls':>7}"
          f"{'scratch MB':>12}{'peak MB':>9}{'read MB':>9}{'write MB':>9}  bits")
    print(f"{'in-process':<14}{t_inproc:8.2f}")
    rows = []
    stamp = datetime.now(timezone.utc).isoformat(timespec="seconds")
    for n, (rep, start, same) in results.items():
        eff = t1 / (n * rep.seconds)
        print(f"{f'dask {n} worker':<14}{rep.seconds:8.2f}{t1 / rep.seconds:10.2f}{eff:8.0%}"
              f"{rep.patches_run:>5}/{rep.patches_total:<3}{rep.model_calls:>7}"
              f"{rep.scratch_written / 1e6:12.2f}{rep.scratch_peak / 1e6:9.2f}"
              f"{rep.bytes_read / 1e6:9.1f}{rep.bytes_written / 1e6:9.1f}  "
              f"{'identical' if same else 'DIFFER'}  (cluster start + warm-up {start:.1f} s)")
        for addr, w in sorted(rep.workers.items()):
            print(f"    {addr}: {w['tasks']} tasks, {w['patches']} patches, busy {w['seconds']:.2f} s, "
                  f"process CPU {w['cpu_seconds']:.2f} s, model loads {w['model_loads']}")
        rows.append({"timestamp": stamp, "device": device_name(), "op": "infer_distributed",
                     "case": f"3d_{a.size}^3_w{a.window}_s{a.step}_r{a.region}"
                             + (f"_sleep{a.sleep_ms:g}ms" if a.sleep_ms else f"_conv{a.width}"),
                     "provider": f"qlty_gpu[dask x{n}]", "backend": "auto",
                     "median_ms": round(rep.seconds * 1e3, 1),
                     "notes": f"speedup_vs_1={t1 / rep.seconds:.2f};eff={eff:.2f};"
                              f"patches={rep.patches_run}/{rep.patches_total};"
                              f"calls={rep.model_calls};scratch_mb={rep.scratch_written / 1e6:.2f};"
                              f"bit_identical={same};load={os.getloadavg()[0]:.1f};"
                              f"malloc={'tuned' if MALLOC else 'dask-default'}"})
    print(f"machine load average (1 min): {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs; "
          f"worker malloc env: {MALLOC or 'Dask default'}")
    print()
    print("\n".join(on_paper()))
    if not a.no_csv:
        print("rows ->", append_rows(rows))


if __name__ == "__main__":
    main()
