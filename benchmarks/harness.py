"""Small shared benchmark harness (design §6).

* ``median_time`` times a callable (warm-up first; CUDA synchronised when needed).
* ``copy_bandwidth`` measures the machine's memory copy bandwidth with a large
  ``dst.copy_(src)`` (bytes read + written / time), the yardstick every result is compared
  with: ``frac_copy_bw = (bytes that must move / time) / copy bandwidth``.
* ``append_rows`` appends to ``benchmarks/results/<device>.csv``.
* ``run_isolated`` runs one measurement in a fresh interpreter, so providers do not share
  allocator state, numba thread pools or caches.
"""

from __future__ import annotations

import csv
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import torch

RESULTS = Path(__file__).resolve().parent / "results"
COLUMNS = [
    "timestamp", "device", "case", "op", "provider", "backend", "median_ms", "gbytes", "gbps",
    "frac_copy_bw", "peak_rss_mb", "notes",
]


def device_name(device: str = "cpu") -> str:
    """Human-readable device name: the CPU model, or the CUDA device name."""
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} x{os.cpu_count()}"
    except OSError:
        pass
    return platform.processor() or "cpu"


def csv_path(device: str = "cpu") -> Path:
    """``results/cpu.csv`` on CPU, ``results/<gpu-name>.csv`` on CUDA."""
    if device.startswith("cuda"):
        name = "".join(c if c.isalnum() else "-" for c in device_name(device)).strip("-")
        return RESULTS / f"{name}.csv"
    return RESULTS / "cpu.csv"


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def median_time(fn, *, warmup: int = 2, reps: int = 7, device: str = "cpu") -> float:
    """Median wall time of ``fn()`` in seconds."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def copy_bandwidth(nbytes: int = 256 << 20, device: str = "cpu") -> float:
    """Copy bandwidth in GB/s: (read + write bytes) / median time of ``dst.copy_(src)``."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    t = median_time(lambda: dst.copy_(src), warmup=3, reps=11, device=device)
    return 2 * nbytes / t / 1e9


def peak_rss_mb() -> float:
    """Peak resident set size of this process in MiB."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def append_rows(rows: list[dict], device: str = "cpu", path: Optional[Path] = None,
                columns: Optional[list[str]] = None) -> Path:
    """Append result rows to ``path`` (default: the per-device CSV) with ``columns``
    (default: ``COLUMNS``; missing values empty); the header is written once."""
    path = csv_path(device) if path is None else Path(path)
    columns = COLUMNS if columns is None else columns
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists()
    with path.open("a", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=columns)
        if new:
            w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k, "") for k in columns})
    return path


def run_isolated(script: str, *args: str) -> dict:
    """Run ``script --child args...`` in a fresh interpreter and parse its last JSON line."""
    out = subprocess.run(
        [sys.executable, script, "--child", *args], capture_output=True, text=True, check=False
    )
    if out.returncode != 0:
        raise RuntimeError(f"child {args} failed:\n{out.stdout}\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def markdown_table(rows: list[dict], cols: list[str]) -> str:
    """Rows as a GitHub markdown table."""
    head = "| " + " | ".join(cols) + " |\n|" + "---|" * len(cols) + "\n"
    return head + "".join("| " + " | ".join(str(r.get(c, "")) for c in cols) + " |\n" for r in rows)
