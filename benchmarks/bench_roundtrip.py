"""Round-trip benchmark: unstitch + stitch, against qlty 1.5.0, torch fold/unfold and MONAI.

Cases (issue 2): 2D (4, 8, 512, 512) window 64 step 32 border 8; 3D (1, 2, 128, 128, 128)
window 32 step 16 border 4; plus one single-channel volume (1, 1, 192, 192, 192) window 48
step 24 border 6; border weight 0.1. Every provider does the same job: split
into weighted overlapping patches and merge them back into the weighted mean (MONAI:
``sliding_window_inference`` with an identity predictor and our weight map as
``roi_weight_map``; torch: ``F.unfold``/``F.fold``, 2D only and exact here because the
grids divide evenly). Each measurement runs in a fresh interpreter.

Bytes that must move: read the images, write the patches, read the patches, write the
images: ``2 * (image bytes + patch bytes)``; GB/s and the fraction of the machine's measured
copy bandwidth follow from that.

Usage: ``python benchmarks/bench_roundtrip.py [--device cuda] [--reps 7]``
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

CASES = {
    "2d_4x8x512x512_w64_s32": dict(shape=(4, 8, 512, 512), window=(64, 64), step=(32, 32), border=8),
    "3d_1x2x128^3_w32_s16": dict(shape=(1, 2, 128, 128, 128), window=(32,) * 3, step=(16,) * 3, border=4),
    # one single-channel volume (tomography): parallelism must come from inside the plane
    "3d_1x1x192^3_w48_s24": dict(shape=(1, 1, 192, 192, 192), window=(48,) * 3, step=(24,) * 3, border=6),
}
BW = 0.1


def providers(device: str) -> list[str]:
    if device.startswith("cuda"):
        return ["qlty_gpu[triton]", "qlty_gpu[torch]", "monai", "torch-fold"]
    return ["qlty_gpu[numba]", "qlty_gpu[numba]-nopool", "qlty_gpu[torch]", "qlty", "monai",
            "torch-fold"]


def _job(case: str, provider: str, device: str):
    """Return (fn, check) for one provider: fn() does the round trip, check() its max error."""
    spec = CASES[case]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(spec["shape"], generator=g).to(device)
    nd = len(spec["window"])
    spatial = spec["shape"][2:]

    if provider.endswith("-nopool"):
        # plain torch.empty outputs: what every call costs without the huge-page pool
        os.environ["QLTY_GPU_HUGEPAGES"] = "0"
        provider = provider[: -len("-nopool")]
    if provider.startswith("qlty_gpu"):
        import qlty_gpu

        backend = provider[len("qlty_gpu[") : -1]
        cls = qlty_gpu.NCYXQuilt if nd == 2 else qlty_gpu.NCZYXQuilt
        q = cls(*spatial, window=spec["window"], step=spec["step"], border=spec["border"],
                border_weight=BW)

        def fn():
            return q.stitch(q.unstitch(x, backend=backend), backend=backend)[0]

    elif provider == "qlty":
        import qlty

        cls = qlty.NCYXQuilt if nd == 2 else qlty.NCZYXQuilt
        q = cls(*spatial, window=spec["window"], step=spec["step"], border=spec["border"],
                border_weight=BW)

        def fn():
            return q.stitch(q.unstitch(x))[0]

    elif provider == "monai":
        from monai.inferers import sliding_window_inference

        import qlty_gpu

        w = qlty_gpu.QuiltPlan(spatial, spec["window"], spec["step"], spec["border"], BW).weight(device)
        overlap = [1 - s / wi for s, wi in zip(spec["step"], spec["window"])]

        def fn():
            with torch.no_grad():
                return sliding_window_inference(
                    x, spec["window"], 64, lambda t: t, overlap=overlap, mode="constant",
                    roi_weight_map=w,
                )

    elif provider == "torch-fold":
        if nd != 2:
            return None
        import torch.nn.functional as F

        import qlty_gpu

        w = qlty_gpu.QuiltPlan(spatial, spec["window"], spec["step"], spec["border"], BW).weight(device)
        n, c = spec["shape"][:2]
        wflat = w.reshape(1, 1, -1, 1)
        norm = F.fold(
            w.reshape(1, -1, 1).expand(1, -1, math.prod(
                (d - k) // s + 1 for d, k, s in zip(spatial, spec["window"], spec["step"]))),
            spatial, spec["window"], stride=spec["step"],
        )

        def fn():
            p = F.unfold(x, spec["window"], stride=spec["step"])  # (N, C*wy*wx, L)
            p = (p.reshape(n, c, -1, p.shape[-1]) * wflat).reshape(n, -1, p.shape[-1])
            return F.fold(p, spatial, spec["window"], stride=spec["step"]) / norm

    else:
        raise SystemExit(f"unknown provider {provider}")
    return fn, lambda: (fn() - x).abs().max().item()


def child(case: str, provider: str, device: str, reps: int) -> None:
    torch.set_num_threads(os.cpu_count() or 1)
    job = _job(case, provider, device)
    if job is None:
        print(json.dumps({"skip": True}))
        return
    fn, check = job
    err = check()
    t = harness.median_time(fn, warmup=2, reps=reps, device=device)
    print(json.dumps({"median_s": t, "max_err": err, "peak_rss_mb": harness.peak_rss_mb()}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--child", nargs=4, metavar=("CASE", "PROVIDER", "DEVICE", "REPS"))
    args = ap.parse_args()
    if args.child:
        case, prov, dev, reps = args.child
        child(case, prov, dev, int(reps))
        return

    dev = args.device
    bw = harness.copy_bandwidth(device=dev)
    name = harness.device_name(dev)
    print(f"device: {name}; measured copy bandwidth {bw:.1f} GB/s (read + write)")
    stamp = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    rows = []
    for case, spec in CASES.items():
        plan_counts = [
            -(-(d - w) // s) + 1 for d, w, s in zip(spec["shape"][2:], spec["window"], spec["step"])
        ]
        n, c = spec["shape"][:2]
        img_b = 4 * math.prod(spec["shape"])
        pat_b = 4 * n * c * math.prod(plan_counts) * math.prod(spec["window"])
        moved = 2 * (img_b + pat_b)
        res = {}
        for prov in providers(dev):
            r = harness.run_isolated(__file__, case, prov, dev, str(args.reps))
            if r.get("skip"):
                continue
            res[prov] = r
            gbps = moved / r["median_s"] / 1e9
            rows.append(dict(
                timestamp=stamp, device=name, case=case, op="roundtrip", provider=prov,
                backend=prov.split("[")[-1].split("]")[0] if "[" in prov else "",
                median_ms=round(r["median_s"] * 1e3, 2), gbytes=round(moved / 1e9, 4),
                gbps=round(gbps, 2), frac_copy_bw=round(gbps / bw, 3),
                peak_rss_mb=round(r["peak_rss_mb"], 1), notes=f"max_err={r['max_err']:.1e}",
            ))
            print(f"{case:28s} {prov:18s} {r['median_s'] * 1e3:9.2f} ms  {gbps:7.2f} GB/s  "
                  f"{gbps / bw:6.1%} of copy bw  max_err {r['max_err']:.1e}")
        best = min((v["median_s"], k) for k, v in res.items()
                   if k.startswith("qlty_gpu") and not k.endswith("-nopool"))
        for ref in ("qlty", "monai", "torch-fold"):
            if ref in res:
                print(f"  {best[1]} is {res[ref]['median_s'] / best[0]:.2f}x faster than {ref}")
    path = harness.append_rows(rows, dev)
    print(f"\nappended {len(rows)} rows to {path}\n")
    print(harness.markdown_table(
        rows, ["case", "provider", "median_ms", "gbps", "frac_copy_bw", "notes"]))


if __name__ == "__main__":
    main()
