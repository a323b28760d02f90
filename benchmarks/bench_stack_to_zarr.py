"""Benchmark: image stack (uint16 TIFF slices) to OME-Zarr, qlty_gpu vs qlty 1.5.0.

Each run happens in a fresh subprocess, so the reported peak RSS (``ru_maxrss`` of that
child) belongs to one conversion. Rows are appended to ``benchmarks/results/cpu.csv``.

Usage::

    python benchmarks/bench_stack_to_zarr.py                    # 16 and 64 slices, 1024^2, 4 levels
    python benchmarks/bench_stack_to_zarr.py --slices 64 --size 1024 --repeats 3
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import append_rows, device_name, markdown_table  # noqa: E402

HERE = Path(__file__).resolve().parent
CHILD = r"""
import json, resource, sys, time, warnings, io, contextlib
provider, src, out, levels, workers = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5]
workers = None if workers == "None" else int(workers)
warnings.simplefilter("ignore")
if provider == "qlty":
    from qlty.utils.stack_to_zarr import stack_files_to_ome_zarr
    kw = {}
else:
    from qlty_gpu.utils.stack_to_zarr import stack_files_to_ome_zarr
    kw = {}
import numpy, zarr, torch, tifffile  # imported before timing for both
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t0 = time.perf_counter()
with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
    stack_files_to_ome_zarr(src, ".tif", r"(.+)_(\d+)\.tif$", output_dir=out,
                            pyramid_levels=levels, num_workers=workers, verbose=False, **kw)
t1 = time.perf_counter()
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"seconds": t1 - t0, "peak_rss_mb": peak / 1024, "import_rss_mb": base / 1024}))
"""


def make_stack(folder: Path, slices: int, size: int) -> int:
    import numpy as np
    import tifffile

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:size, 0:size]
    pattern = ((np.sin(yy / 37.0) + np.cos(xx / 23.0)) * 8000 + 20000).astype(np.uint16)
    nbytes = 0
    for z in range(slices):
        img = pattern + rng.integers(0, 2000, (size, size), dtype=np.uint16)
        tifffile.imwrite(folder / f"bench_{z:04d}.tif", img)
        nbytes += img.nbytes
    return nbytes


def run_child(provider: str, src: Path, levels: int, workers: int | None) -> dict:
    out = Path(tempfile.mkdtemp(prefix=f"out_{provider}_"))
    try:
        env = dict(os.environ)
        env["PYTHONPATH"] = str(HERE.parent) + os.pathsep + env.get("PYTHONPATH", "")
        proc = subprocess.run(
            [sys.executable, "-c", CHILD, provider, str(src), str(out), str(levels), str(workers)],
            capture_output=True,
            text=True,
            env=env,
            check=False,
        )
        if proc.returncode != 0:
            raise RuntimeError(f"{provider} failed:\n{proc.stderr[-3000:]}")
        return json.loads(proc.stdout.strip().splitlines()[-1])
    finally:
        shutil.rmtree(out, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--slices", type=int, nargs="+", default=[16, 64])
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--levels", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument(
        "--workers", default="None", help="num_workers for both (default: their default)"
    )
    ap.add_argument("--providers", nargs="+", default=["qlty_gpu", "qlty"])
    ap.add_argument("--csv", default=str(HERE / "results" / "cpu.csv"))
    ap.add_argument("--no-csv", action="store_true")
    args = ap.parse_args(argv)
    workers = None if args.workers == "None" else int(args.workers)
    device = device_name("cpu")
    rows = []
    for n in args.slices:
        src = Path(tempfile.mkdtemp(prefix="bench_stack_"))
        try:
            nbytes = make_stack(src, n, args.size)
            for provider in args.providers:
                runs = [run_child(provider, src, args.levels, workers) for _ in range(args.repeats)]
                med = statistics.median(r["seconds"] for r in runs)
                rss = max(r["peak_rss_mb"] for r in runs)
                imp = max(r["import_rss_mb"] for r in runs)
                row = {
                    "timestamp": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                    "device": device,
                    "case": f"{n}x{args.size}x{args.size} uint16 tif, {args.levels} levels",
                    "op": "stack_files_to_ome_zarr",
                    "provider": provider,
                    "backend": "cpu",
                    "median_ms": f"{med * 1e3:.1f}",
                    "gbytes": f"{nbytes / 1e9:.4f}",
                    "gbps": f"{nbytes / 1e9 / med:.3f}",
                    "frac_copy_bw": "",
                    "peak_rss_mb": f"{rss:.0f}",
                    "notes": f"repeats={args.repeats} workers={args.workers} rss_after_imports={imp:.0f}MB",
                }
                rows.append(row)
                print(
                    f"{row['case']:<40} {provider:<9} {med:7.2f} s  peak RSS {rss:6.0f} MB "
                    f"(after imports {imp:.0f} MB)",
                    flush=True,
                )
        finally:
            shutil.rmtree(src, ignore_errors=True)
    if not args.no_csv:
        path = append_rows(rows, "cpu")
        print(f"appended {len(rows)} rows to {path}")
    print(markdown_table(rows, ["case", "provider", "median_ms", "peak_rss_mb", "notes"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
