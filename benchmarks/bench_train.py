"""Training-data utilities against qlty 1.5.0: patch pairs, overlapping pixels, metadata,
build_sequence_pair and UMAP false colour (issue 14).

Cases (same inputs for both providers, each measured in a fresh interpreter):

* ``pairs``: ``extract_patch_pairs`` on 16 images (3, 128, 128), 64 pairs each, window 32,
  delta_range (8, 16), without and with rotations (0, 1, 2, 3);
* ``overlap``: ``extract_overlapping_pixels`` of 1024 such pairs (with rotations), plain
  tensors and tensors that require grad (our differentiable torch path);
* ``metadata``: ``extract_patch_pairs_metadata`` of the same 1024 pairs (qlty with
  ``num_workers=1``, its fastest setting here);
* ``sequence``: ``build_sequence_pair`` of 64 pairs (3, 32, 32), patch_size 4, stride 2
  (qlty's numba batch path);
* ``false_colour``: a (1, 1, 256, 256) image, window 32, step 8: construct, train on the
  image, colour it (each provider with its default settings).

Usage: ``python benchmarks/bench_train.py [--reps 5] [--rounds 1] [--threads N] [--only CASE ...]``
(results are appended to ``benchmarks/results/cpu_train.csv``). With ``--rounds R`` each case
runs ``R`` rounds of (qlty_gpu child, qlty child), alternating, and reports each provider's
best round median, so load from other jobs on a shared machine hits both alike. (Fresh
processes rather than alternating calls in one interpreter: qlty's parallel numba kernels
leave OpenMP worker threads spinning after each call, which slows whatever runs next in that
process.)
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

CASES = ["pairs", "pairs_rot", "overlap", "overlap_grad", "metadata", "sequence", "false_colour"]
SLOW = {"false_colour"}  # UMAP: fewer repetitions


def _inputs():
    g = torch.Generator().manual_seed(0)
    return torch.randn(16, 3, 128, 128, generator=g)


def _job(case: str, provider: str):
    """fn() for one case and provider ('qlty_gpu' or 'qlty')."""
    warnings.filterwarnings("ignore")
    if provider == "qlty":
        import qlty.patch_pairs_2d as pp
        import qlty.pretokenizer_2d.sequences as seq
        from qlty.utils.false_color_2D import FalseColorGenerator
    else:
        import qlty_gpu.patch_pairs_2d as pp
        import qlty_gpu.pretokenizer_2d.sequences as seq
        from qlty_gpu.utils.false_color_2D import FalseColorGenerator
    x = _inputs()
    args = (x, (32, 32), 64, (8.0, 16.0))
    if case == "pairs":
        return lambda: pp.extract_patch_pairs(*args, random_seed=0)
    if case == "pairs_rot":
        return lambda: pp.extract_patch_pairs(*args, random_seed=0, rotation_choices=(0, 1, 2, 3))
    import qlty_gpu.patch_pairs_2d as ours

    p1, p2, d, r = ours.extract_patch_pairs(*args, random_seed=0, rotation_choices=(0, 1, 2, 3))
    if case == "overlap":
        return lambda: pp.extract_overlapping_pixels(p1, p2, d, r)
    if case == "overlap_grad":
        a, b = p1.clone().requires_grad_(True), p2.clone().requires_grad_(True)
        return lambda: pp.extract_overlapping_pixels(a, b, d, r)
    if case == "metadata":
        kw = {"num_workers": 1} if provider == "qlty" else {}
        return lambda: pp.extract_patch_pairs_metadata(*args, random_seed=0, **kw)
    if case == "sequence":
        s1, s2 = p1[:64].contiguous(), p2[:64].contiguous()
        return lambda: seq.build_sequence_pair(s1, s2, d[:64, 0], d[:64, 1], r[:64], 4, 2)
    if case == "false_colour":
        img = torch.randn(1, 1, 256, 256, generator=torch.Generator().manual_seed(1))

        def fn():
            gen = FalseColorGenerator(img.shape, window_size=32, step_size=8)
            gen.train_reducer(img)
            return gen(img)

        return fn
    raise SystemExit(f"unknown case {case}")


def child(case: str, provider: str, reps: int, threads: int) -> None:
    torch.set_num_threads(threads)
    fn = _job(case, provider)
    slow = case in SLOW
    t = harness.median_time(fn, warmup=1 if slow else 2, reps=min(reps, 3) if slow else reps)
    print(json.dumps({"median_s": t, "peak_rss_mb": harness.peak_rss_mb()}))


def _append(rows: list[dict]) -> Path:
    """Rows go to ``results/cpu_train.csv`` (harness columns), apart from the round trips."""
    return harness.append_rows(rows, path=harness.RESULTS / "cpu_train.csv")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=1,
                    help="alternating (qlty_gpu, qlty) child rounds per case; best round counts")
    ap.add_argument("--only", nargs="*", choices=CASES)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                    help="torch intra-op threads for both providers (default: all cores)")
    ap.add_argument("--child", nargs=4, metavar=("CASE", "PROVIDER", "REPS", "THREADS"))
    args = ap.parse_args()
    if args.child:
        case, prov, reps, threads = args.child
        child(case, prov, int(reps), int(threads))
        return
    name = harness.device_name("cpu")
    stamp = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    print(f"device: {name}; load average {os.getloadavg()[0]:.1f}; {args.threads} torch threads")
    rows, table = [], []
    for case in args.only or CASES:
        res = {}
        for _ in range(max(1, args.rounds)):
            for prov in ("qlty_gpu", "qlty"):
                r = harness.run_isolated(__file__, case, prov, str(args.reps), str(args.threads))
                if prov not in res or r["median_s"] < res[prov]["median_s"]:
                    res[prov] = r
        for prov in ("qlty_gpu", "qlty"):
            rows.append(dict(
                timestamp=stamp, device=name, case=case, op="train", provider=prov,
                median_ms=round(res[prov]["median_s"] * 1e3, 2),
                peak_rss_mb=round(res[prov]["peak_rss_mb"], 1),
                backend=f"threads={args.threads}",
                notes=f"load={os.getloadavg()[0]:.1f}; best of {max(1, args.rounds)} rounds",
            ))
        ratio = res["qlty"]["median_s"] / res["qlty_gpu"]["median_s"]
        table.append(dict(case=case, qlty_gpu_ms=round(res["qlty_gpu"]["median_s"] * 1e3, 1),
                          qlty_ms=round(res["qlty"]["median_s"] * 1e3, 1),
                          speedup=f"{ratio:.1f}x"))
        print(f"{case:14s} qlty_gpu {res['qlty_gpu']['median_s'] * 1e3:9.1f} ms   "
              f"qlty {res['qlty']['median_s'] * 1e3:9.1f} ms   {ratio:5.1f}x")
    path = _append(rows)
    print(f"\nappended {len(rows)} rows to {path}\n")
    print(harness.markdown_table(table, ["case", "qlty_gpu_ms", "qlty_ms", "speedup"]))


if __name__ == "__main__":
    main()
