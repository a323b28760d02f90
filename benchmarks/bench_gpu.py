"""GPU benchmark of the Triton kernels: unstitch, stitch (deterministic and atomic).

On a CUDA machine::

    python benchmarks/bench_gpu.py            # both standard cases, appends to the CSV
    python benchmarks/bench_gpu.py --quick    # fewer repetitions

times every op with ``triton.testing.do_bench`` (median), samples GPU utilisation and
memory with NVML (``pynvml``) or ``nvidia-smi`` while it runs, measures the device's copy
bandwidth (``dst.copy_(src)`` of 1 GiB: read + write bytes / time) and reports, per op, the
bytes that must move, GB/s and the fraction of the copy bandwidth. Rows are appended to
``benchmarks/results/<gpu-name>.csv`` (columns of ``harness.COLUMNS``).

Without a GPU it says so and runs the Triton kernels' correctness smoke under the
interpreter (``TRITON_INTERPRET=1``) on tiny shapes instead; nothing is written.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

# (name, image shape, window, step): the standard cases of benchmarks/GPU.md
CASES = [
    ("2d_4x8x512x512_w64_s32", (4, 8, 512, 512), (64, 64), (32, 32)),
    ("3d_1x2x128x128x128_w32_s16", (1, 2, 128, 128, 128), (32, 32, 32), (16, 16, 16)),
]


# ------------------------------------------------------------------ sampling
class GpuSampler:
    """Samples GPU utilisation (%) and used memory (MiB) every ``period`` s in a thread."""

    def __init__(self, index: int = 0, period: float = 0.05):
        self.index, self.period = index, period
        self.util, self.mem = [], []
        self._stop = threading.Event()
        self._thread = None
        self._nvml = None
        self.source = "none"
        try:
            import pynvml

            pynvml.nvmlInit()
            self._nvml = (pynvml, pynvml.nvmlDeviceGetHandleByIndex(index))
            self.source = "nvml"
        except Exception:  # noqa: BLE001 - optional dependency, any failure means no NVML
            if shutil.which("nvidia-smi"):
                self.source = "nvidia-smi"

    def _sample(self):
        if self._nvml is not None:
            nv, h = self._nvml
            self.util.append(nv.nvmlDeviceGetUtilizationRates(h).gpu)
            self.mem.append(nv.nvmlDeviceGetMemoryInfo(h).used / 2**20)
        elif self.source == "nvidia-smi":
            out = subprocess.run(
                ["nvidia-smi", f"--id={self.index}", "--query-gpu=utilization.gpu,memory.used",
                 "--format=csv,noheader,nounits"], capture_output=True, text=True, check=False,
            ).stdout.strip()
            if out:
                u, m = out.splitlines()[0].split(",")
                self.util.append(float(u))
                self.mem.append(float(m))

    def _run(self):
        while not self._stop.is_set():
            self._sample()
            time.sleep(self.period)

    def __enter__(self):
        if self.source != "none":
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._stop.clear()

    def summary(self) -> str:
        if not self.util:
            return f"util=n/a ({self.source})"
        return (f"util_max={max(self.util):.0f}% util_mean={sum(self.util) / len(self.util):.0f}%"
                f" mem_max={max(self.mem):.0f}MiB ({self.source})")


# ------------------------------------------------------------------ GPU run
def bytes_moved(op: str, x_shape, n_patches_total: int, window, esize: int) -> int:
    """Bytes that must cross DRAM at least once (see GPU.md, 'bytes moved per op')."""
    import math

    n, c = x_shape[:2]
    spatial = math.prod(x_shape[2:])
    image = n * c * spatial * esize
    patches = n_patches_total * c * math.prod(window) * esize
    if op == "unstitch":
        return image + patches  # read the image once, write every patch
    norm = spatial * esize  # the per-plan weight sum, read once per pixel tile
    return patches + image + norm  # read every patch, write the image


def _copy_bandwidth(rep: int) -> float:
    """Device copy bandwidth in GB/s: (read + write bytes) / median time of a 1 GiB copy."""
    import torch
    from triton.testing import do_bench

    src = torch.empty(2**28, dtype=torch.float32, device="cuda").fill_(1.0)
    dst = torch.empty_like(src)
    t_ms = do_bench(lambda: dst.copy_(src), warmup=25, rep=rep, return_mode="median")
    return 2 * src.numel() * 4 / (t_ms * 1e-3) / 1e9


def _case_ops(x, patches, plan, shape, window, step):
    """{(op, backend): callable} for one case, and the stitch reference result."""
    from qlty_gpu.ops import quilt as q

    dev = x.device
    w, norm = plan.weight(dev), plan.norm(dev)
    ops = {
        ("unstitch", "triton"): lambda: q.unstitch(x, window, step, backend="triton"),
        ("unstitch", "torch"): lambda: q.unstitch(x, window, step, backend="torch"),
    }
    for mode in ("deterministic", "atomic"):
        ops[(f"stitch_{mode}", "triton")] = (
            lambda mode=mode: q.stitch(patches, shape[2:], step, weight=w, norm=norm,
                                       mode=mode, backend="triton"))
    ops[("stitch", "torch")] = lambda: q.stitch(patches, shape[2:], step, weight=w, norm=norm,
                                                backend="torch")
    return ops, q.stitch_reference(patches, list(shape[2:]), list(step), w, norm)


def run_gpu(quick: bool) -> int:
    import torch
    import triton
    from harness import append_rows, device_name, peak_rss_mb
    from triton.testing import do_bench

    from qlty_gpu.geometry import QuiltPlan
    from qlty_gpu.ops import quilt as q

    dev = "cuda"
    name = device_name(dev)
    rep = 50 if quick else 200
    copy_bw = _copy_bandwidth(rep)
    print(f"{name}: torch {torch.__version__}, triton {triton.__version__}; "
          f"copy bandwidth {copy_bw:.0f} GB/s")
    stamp = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    rows = []
    for case, shape, window, step in CASES:
        plan = QuiltPlan(shape[2:], window, step, border=tuple(w // 8 for w in window),
                         border_weight=0.1)
        x = torch.randn(shape, device=dev)
        patches = q.unstitch(x, window, step, backend="triton")
        m = patches.shape[0]
        ops, ref = _case_ops(x, patches, plan, shape, window, step)
        for (op, backend), fn in ops.items():
            notes = []
            if op.startswith("stitch"):
                err = (fn() - ref).abs().max().item()
                notes.append(f"max_err={err:.1e}")
            torch.cuda.synchronize()
            with GpuSampler() as smp:
                ms = do_bench(fn, warmup=25, rep=rep, return_mode="median")
            nbytes = bytes_moved("unstitch" if op == "unstitch" else "stitch", shape, m, window,
                                 4)
            gbps = nbytes / (ms * 1e-3) / 1e9
            notes.append(smp.summary())
            row = {
                "timestamp": stamp, "device": name, "case": case, "op": op,
                "provider": f"qlty_gpu[{backend}]", "backend": backend,
                "median_ms": round(ms, 4), "gbytes": round(nbytes / 1e9, 4),
                "gbps": round(gbps, 1), "frac_copy_bw": round(gbps / copy_bw, 3),
                "peak_rss_mb": round(peak_rss_mb(), 1), "notes": " ".join(notes),
            }
            rows.append(row)
            print(f"{case:28s} {op:22s} {backend:7s} {ms:8.4f} ms {gbps:7.0f} GB/s "
                  f"{gbps / copy_bw:6.1%} of copy  {' '.join(notes)}")
        x = patches = ops = ref = None
        torch.cuda.empty_cache()
    path = append_rows(rows, device=dev)
    print(f"appended {len(rows)} rows to {path}")
    return 0


# ------------------------------------------------------------------ CPU smoke
def run_interpreter_smoke() -> int:
    """Correctness of every Triton kernel on tiny shapes, in the interpreter (no timing)."""
    import torch

    from qlty_gpu.geometry import QuiltPlan
    from qlty_gpu.ops import quilt as q

    ok = True
    for shape, window, step in (((2, 3, 13, 11), (5, 4), (3, 3)),
                                ((1, 2, 7, 9, 6), (3, 4, 4), (2, 3, 3))):
        x = torch.randn(shape)
        plan = QuiltPlan(shape[2:], window, step, border=1, border_weight=0.3)
        w, n = plan.weight(), plan.norm()
        got = q.unstitch(x, window, step, weight=w, positions="absolute", backend="triton")
        ref = q.unstitch_reference(x, list(window), list(step), w, None, None, 0.0, "absolute")
        good = torch.equal(got, ref)
        print(f"  unstitch {tuple(shape)} window {window} step {step}: "
              f"{'exact' if good else 'MISMATCH'}")
        ok &= good
        p = q.unstitch_reference(x, list(window), list(step))
        sref = q.stitch_reference(p, list(shape[2:]), list(step), w, n)
        for mode in ("deterministic", "atomic"):
            s = q.stitch(p, shape[2:], step, weight=w, norm=n, mode=mode, backend="triton")
            err = (s - sref).abs().max().item()
            good = err <= 1e-5
            print(f"  stitch {mode:13s} {tuple(shape)}: max |err| {err:.1e}"
                  f"{'' if good else '  MISMATCH'}")
            ok &= good
    print("interpreter smoke:", "OK" if ok else "FAILED")
    return 0 if ok else 1


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer repetitions")
    a = ap.parse_args(argv)
    import torch

    if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        return run_gpu(a.quick)
    if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        env = dict(os.environ, TRITON_INTERPRET="1")  # must be set before triton is imported
        return subprocess.call([sys.executable, __file__, *(argv or sys.argv[1:])], env=env)
    print("No CUDA GPU present (torch.cuda.is_available() is False): nothing to time, no CSV "
          "written.\nRunning the Triton kernels' correctness smoke under the interpreter "
          "instead (TRITON_INTERPRET=1, tiny shapes):")
    return run_interpreter_smoke()


if __name__ == "__main__":
    raise SystemExit(main())
