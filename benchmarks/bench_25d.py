"""2.5D convert benchmark: qlty_gpu vs qlty 1.5.0, in memory and from Zarr, and peak memory.

Cases (each measurement in a fresh interpreter, see ``harness.run_isolated``):

* ``mem``: ``NCZYX25DQuilt(vol, spec).convert()`` on an in-memory ``(2, 1, 64, 256, 256)``
  float32 tensor, spec = 3 identity + 2 mean + 1 std channels, boundary 'clamp';
* ``zarr``: the same volume in a Zarr v3 store (one chunk per z-slice), read through
  ``from_zarr``;
* ``stream``: a ``(2, 1, 128, 256, 256)`` Zarr source (64 MiB) converted into a Zarr output
  with ``slab_bytes`` = source / 10; reports the peak RSS growth of the process during the
  conversion against the budget.

Bytes that must move = source read once + output written once; ``frac_copy_bw`` compares
that rate with the machine's copy bandwidth. Usage::

    python benchmarks/bench_25d.py            # all cases, appends to results/<device>.csv
    python benchmarks/bench_25d.py --reps 3
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import harness  # noqa: E402
import torch  # noqa: E402

SPEC = {"identity": [-1, 0, 1], "mean": [[-2, -1], [1, 2]], "std": [[-1, 0, 1]]}
SHAPE = (2, 1, 64, 256, 256)
STREAM_SHAPE = (1, 1, 256, 256, 256)


def _volume(shape):
    g = torch.Generator().manual_seed(0)
    return torch.randn(*shape, generator=g)


def _zarr_source(path: str, vol: torch.Tensor) -> None:
    import zarr

    z = zarr.open(path, mode="w", shape=vol.shape, dtype="float32",
                  chunks=(1, 1, 1, *vol.shape[3:]))
    z[...] = vol.numpy()


def _status_mb(key: str) -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"{key} not in /proc/self/status")


def _reset_peak() -> None:
    """Reset the kernel's peak-RSS mark (VmHWM) to the current RSS (Linux >= 4.0)."""
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")


def child(case: str, provider: str, reps: int) -> dict:
    torch.set_num_threads(os.cpu_count() or 1)
    if provider == "qlty":
        from qlty.backends_2_5D import from_zarr
        from qlty.qlty2_5D import NCZYX25DQuilt
    else:
        from qlty_gpu import NCZYX25DQuilt, from_zarr
    backend = provider.split("[")[1].rstrip("]") if "[" in provider else None
    device = "cuda" if backend == "triton" else "cpu"
    tmp = tempfile.mkdtemp(prefix="bench25d_")
    if case == "stream":
        import zarr

        vol = _volume(STREAM_SHAPE)
        src_path = os.path.join(tmp, "src.zarr")
        _zarr_source(src_path, vol)
        budget = vol.numel() * 4 // 10
        ref = NCZYX25DQuilt(vol[:, :, :12], SPEC).convert()
        del vol
        src = from_zarr(src_path)
        q = NCZYX25DQuilt(src, SPEC)
        sink = zarr.open(os.path.join(tmp, "out.zarr"), mode="w", shape=q.output_shape,
                         dtype="float32", chunks=(1, 1, *q.output_shape[2:]))
        # warm-up outside the measurement: numba kernel load, zarr codec imports and pools
        wq = NCZYX25DQuilt(src, SPEC, z_slices=[0, 1])
        warm = zarr.open(os.path.join(tmp, "warm.zarr"), mode="w", shape=wq.output_shape,
                         dtype="float32", chunks=(1, 1, *wq.output_shape[2:]))
        wq.convert(out=warm, slab_bytes=budget, backend=backend)
        import gc

        gc.collect()
        _reset_peak()
        base = _status_mb("VmRSS")
        t0 = dt.datetime.now()
        q.convert(out=sink, slab_bytes=budget, backend=backend)
        secs = (dt.datetime.now() - t0).total_seconds()
        peak = _status_mb("VmHWM")
        got = torch.from_numpy(sink[0:10])  # image 0, z0 = 0..9
        err = float((got - ref[:10]).abs().max())
        src_mb = src.shape[0] * src.shape[2] * src.shape[3] * src.shape[4] * 4 / 2**20
        return {"median_ms": secs * 1e3, "peak_growth_mb": peak - base, "budget_mb": budget / 2**20,
                "source_mb": src_mb, "max_err": err,
                "gbytes": (src_mb * 2**20 + sink.nbytes) / 1e9}
    vol = _volume(SHAPE)
    if case == "zarr":
        path = os.path.join(tmp, "vol.zarr")
        _zarr_source(path, vol)
        data = from_zarr(path)
    else:
        data = vol.to(device)
    q = NCZYX25DQuilt(data, SPEC)
    kw = {} if provider == "qlty" else {"backend": backend}
    out = q.convert(**kw)
    secs = harness.median_time(lambda: q.convert(**kw), warmup=0 if provider == "qlty" else 1,
                               reps=reps, device=device)
    out_bytes = out.numel() * out.element_size()
    return {"median_ms": secs * 1e3, "gbytes": (vol.numel() * 4 + out_bytes) / 1e9,
            "checksum": float(out.double().sum()), "peak_rss_mb": harness.peak_rss_mb()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--child", action="store_true")
    ap.add_argument("args", nargs="*")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--cases", default="mem,zarr,stream")
    a = ap.parse_args()
    if a.child:
        case, provider, reps = a.args
        print(json.dumps(child(case, provider, int(reps))))
        return
    providers = ["qlty_gpu[numba]", "qlty_gpu[torch]", "qlty"]
    if torch.cuda.is_available():
        providers.insert(0, "qlty_gpu[triton]")
    bw = harness.copy_bandwidth()
    stamp = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    rows, table = [], []
    for case in a.cases.split(","):
        provs = ["qlty_gpu[numba]"] if case == "stream" else providers
        base_ms = None
        results = {}
        for prov in provs:
            reps = 1 if prov == "qlty" else a.reps
            results[prov] = harness.run_isolated(__file__, case, prov, str(reps))
        base_ms = results.get("qlty", {}).get("median_ms")
        for prov, r in results.items():
            gbps = r["gbytes"] / (r["median_ms"] / 1e3)
            notes = ""
            if case == "stream":
                notes = (f"peak_growth={r['peak_growth_mb']:.1f}MiB budget={r['budget_mb']:.1f}MiB "
                         f"source={r['source_mb']:.0f}MiB max_err={r['max_err']:.1e}")
            elif base_ms:
                notes = f"speedup_vs_qlty={base_ms / r['median_ms']:.1f}x"
            row = {"timestamp": stamp, "device": harness.device_name(), "case": f"25d_{case}",
                   "op": "convert", "provider": prov,
                   "backend": prov.split("[")[1].rstrip("]") if "[" in prov else "qlty",
                   "median_ms": round(r["median_ms"], 2), "gbytes": round(r["gbytes"], 3),
                   "gbps": round(gbps, 2), "frac_copy_bw": round(gbps / bw, 3),
                   "peak_rss_mb": round(r.get("peak_rss_mb", 0), 1), "notes": notes}
            rows.append(row)
            table.append(row)
    path = harness.append_rows(rows)
    print(f"copy bandwidth {bw:.1f} GB/s; appended {len(rows)} rows to {path}")
    print(harness.markdown_table(table, ["case", "provider", "median_ms", "gbps", "frac_copy_bw",
                                         "notes"]))


if __name__ == "__main__":
    main()
