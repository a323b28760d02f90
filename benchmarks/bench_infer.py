"""Streaming inference benchmark: ``qlty_gpu.infer`` against MONAI and bare copies.

Cases (issue 11, item 7): 2D (4, 8, 512, 512) window 64 step 32 and 3D (1, 2, 128^3) window
32 step 16, batch size 16, models ``identity`` and ``conv`` (one 3x3(x3) convolution C -> C),
weights ``constant`` and ``gaussian``. Providers, each in a fresh interpreter:

* ``qlty_gpu``: :func:`qlty_gpu.infer`.
* ``monai``: ``monai.inferers.sliding_window_inference`` (same batch size, overlap 0.5,
  the same blend mode).
* ``clone``: ``x.clone()`` — one read and one write of the input.
* ``window-copy``: the least work any sliding-window inference does: every window copied
  out of the input in batches and added back into an output (plain torch slicing, no
  model, no weights, no normalisation).

Zarr case: a (1, 2, 128^3) volume stored as Zarr, chunks 32^3, regions of 2 x 2 x 2 chunks
(the volume is 8 regions, the region block ~1/4 of the volume with its halo), written to
Zarr; against MONAI's ``PatchInferer`` + ``SlidingWindowSplitter`` + ``ZarrAvgMerger``
(input in memory, output and counts in Zarr).

Reported: best-of-``reps`` ms (the CPU machine is shared; written to the CSV's median_ms
column), the ratio to ``window-copy``, and the peak RSS of the child process.

Usage: ``python benchmarks/bench_infer.py [--device cpu] [--reps 3] [--quick]``
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

CASES = {
    "2d_4x8x512x512_w64_s32": dict(shape=(4, 8, 512, 512), window=64, step=32),
    "3d_1x2x128^3_w32_s16": dict(shape=(1, 2, 128, 128, 128), window=32, step=16),
}
ZARR_CASE = "zarr_3d_1x2x128^3_w32_s16"
BATCH = 16


def _model(kind: str, nd: int, c: int, device: str):
    if kind == "identity":
        return torch.nn.Identity()
    torch.manual_seed(0)
    conv = (torch.nn.Conv2d if nd == 2 else torch.nn.Conv3d)(c, c, 3, padding=1)
    return conv.to(device).eval()


def _window_copy(x, window, step):
    from qlty_gpu.geometry import QuiltPlan

    nd = x.dim() - 2
    plan = QuiltPlan(tuple(x.shape[2:]), window, step)
    org = plan.origins().tolist()
    out = torch.zeros_like(x)
    for n in range(x.shape[0]):
        for a in range(0, len(org), BATCH):
            idx = org[a : a + BATCH]
            sl = [(n, slice(None), *[slice(o, o + plan.window[d]) for d, o in enumerate(p)])
                  for p in idx]
            batch = torch.stack([x[s] for s in sl])
            for j, s in enumerate(sl):
                out[s] += batch[j]
    del nd
    return out


def append_rows(rows: list[dict], device: str) -> Path:
    """Our rows go to ``results/infer-<device>.csv`` (the shared CSV stays the op benches')."""
    path = harness.csv_path(device)
    return harness.append_rows(rows, path=path.with_name("infer-" + path.name))


def make_fn(case: str, provider: str, model_kind: str, weight: str, device: str, tmp: Path):
    """The callable one provider runs for one case (inputs built once, outside it)."""
    zarr_case = case == ZARR_CASE
    cfg = CASES["3d_1x2x128^3_w32_s16"] if zarr_case else CASES[case]
    shape, w, s = cfg["shape"], cfg["window"], cfg["step"]
    nd = len(shape) - 2
    torch.manual_seed(0)
    x = torch.randn(shape, device=device)
    model = _model(model_kind, nd, shape[1], device)
    if provider == "clone":
        fn = x.clone
    elif provider == "window-copy":
        def fn():
            return _window_copy(x, w, s)
    elif provider == "qlty_gpu" and not zarr_case:
        from qlty_gpu import infer

        def fn():
            return infer(model, x, w, s, batch_size=BATCH, weight=weight)
    elif provider == "monai" and not zarr_case:
        from monai.inferers import sliding_window_inference

        def fn():
            with torch.no_grad():
                return sliding_window_inference(x, (w,) * nd, BATCH, model, overlap=0.5,
                                                mode=weight)
    elif provider == "qlty_gpu" and zarr_case:
        import zarr

        from qlty_gpu import infer

        src = zarr.create_array(store=str(tmp / "in.zarr"), shape=shape,
                                chunks=(1, shape[1], 32, 32, 32), dtype="float32")
        src[...] = x.cpu().numpy()

        def fn():
            shutil.rmtree(tmp / "out.zarr", ignore_errors=True)
            return infer(model, src, w, s, batch_size=BATCH, weight=weight,
                         out=str(tmp / "out.zarr"), chunks=(32, 32, 32), region_chunks=2,
                         device=device)
    elif provider == "monai" and zarr_case:
        from monai.inferers import PatchInferer, SlidingWindowSplitter
        from monai.inferers.merger import ZarrAvgMerger

        def fn():
            for p in ("m.zarr", "v.zarr", "c.zarr"):
                shutil.rmtree(tmp / p, ignore_errors=True)
            inferer = PatchInferer(
                splitter=SlidingWindowSplitter(w, overlap=0.5), merger_cls=ZarrAvgMerger,
                batch_size=BATCH, store=str(tmp / "m.zarr"), value_store=str(tmp / "v.zarr"),
                count_store=str(tmp / "c.zarr"),
            )
            with torch.no_grad():
                return inferer(x, model)
    else:
        raise SystemExit(f"unknown provider {provider} for {case}")
    return fn


def child(case: str, provider: str, model_kind: str, weight: str, device: str, reps: int) -> dict:
    tmp = Path(tempfile.mkdtemp())
    fn = make_fn(case, provider, model_kind, weight, device, tmp)
    fn()  # warm-up
    times = []
    for _ in range(reps):  # best of reps: the shared CPU machine is noisy
        t0 = time.perf_counter()
        fn()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    shutil.rmtree(tmp, ignore_errors=True)
    return {"median_ms": round(min(times) * 1e3, 2), "peak_rss_mb": round(harness.peak_rss_mb(), 1)}


def interleaved(cases, models, weights, device: str, reps: int) -> list[dict]:
    """All providers of a case in one process, round-robin, best of ``reps`` wall and CPU
    time: on a shared machine the load changes between isolated runs more than the
    providers differ."""
    rows = []
    for case in cases:
        tmp = Path(tempfile.mkdtemp())
        jobs = [("clone", "-", "-"), ("window-copy", "-", "-")]
        jobs += [(p, m, w) for m in models for w in weights for p in ("qlty_gpu", "monai")]
        fns = {}
        for j in jobs:
            sub = tmp / "-".join(j)
            sub.mkdir()
            fns[j] = make_fn(case, j[0], j[1] if j[1] != "-" else "identity",
                             j[2] if j[2] != "-" else "constant", device, sub)
        best = {j: [float("inf"), float("inf")] for j in jobs}
        with torch.no_grad():
            for f in fns.values():
                f()
            for _ in range(reps):
                for j, f in fns.items():
                    t0, c0 = time.perf_counter(), time.process_time()
                    f()
                    if device.startswith("cuda"):
                        torch.cuda.synchronize()
                    best[j][0] = min(best[j][0], time.perf_counter() - t0)
                    best[j][1] = min(best[j][1], time.process_time() - c0)
        wc = best[("window-copy", "-", "-")][0]
        for j in jobs:
            ms, cpu = best[j][0] * 1e3, best[j][1] * 1e3
            rows.append({"case": case, "provider": j[0], "backend": f"{j[1]}/{j[2]}",
                         "median_ms": round(ms, 1), "cpu_ms": round(cpu, 1),
                         "notes": f"x window-copy {ms / (wc * 1e3):.2f}"})
            print(f"{case:28s} {j[0]:12s} {j[1]:9s} {j[2]:9s} {ms:10.1f} ms  cpu {cpu:10.1f} ms",
                  flush=True)
        shutil.rmtree(tmp, ignore_errors=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--child", action="store_true")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="conv model and gaussian only")
    ap.add_argument("--cases", default="", help="comma-separated case names (default all)")
    ap.add_argument("--models", default="identity,conv")
    ap.add_argument("--weights", default="constant,gaussian")
    ap.add_argument("rest", nargs="*")
    ap.add_argument("--interleaved", action="store_true",
                    help="providers round-robin in one process (timings; no RSS)")
    args = ap.parse_args()
    if args.interleaved:
        cases = args.cases.split(",") if args.cases else list(CASES) + [ZARR_CASE]
        rows = interleaved(cases, args.models.split(","), args.weights.split(","),
                           args.device, args.reps)
        stamp = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
        for r in rows:
            r.update(timestamp=stamp, device=harness.device_name(args.device), op="infer",
                     notes=r["notes"] + f"; cpu {r.pop('cpu_ms')} ms; interleaved best of "
                     f"{args.reps}")
        append_rows(rows, args.device)
        print(harness.markdown_table(rows, ["case", "provider", "backend", "median_ms", "notes"]))
        return
    if args.child:
        case, prov, model, weight, dev, reps = args.rest
        print(json.dumps(child(case, prov, model, weight, dev, int(reps))))
        return
    dev = args.device
    stamp = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    rows = []
    models = ("conv",) if args.quick else tuple(args.models.split(","))
    weights = ("gaussian",) if args.quick else tuple(args.weights.split(","))
    jobs = []
    cases = args.cases.split(",") if args.cases else list(CASES) + [ZARR_CASE]
    for case in cases:
        for prov in ("clone", "window-copy"):
            jobs.append((case, prov, "-", "-"))
        for model in models:
            for weight in weights:
                for prov in ("qlty_gpu", "monai"):
                    jobs.append((case, prov, model, weight))
    base: dict = {}
    for case, prov, model, weight in jobs:
        t0 = time.perf_counter()
        r = harness.run_isolated(__file__, case, prov, model if model != "-" else "identity",
                                 weight if weight != "-" else "constant", dev, str(args.reps))
        if prov in ("clone", "window-copy"):
            base[(case, prov)] = r["median_ms"]
        row = {"timestamp": stamp, "device": harness.device_name(dev), "case": case,
               "op": "infer", "provider": prov, "backend": f"{model}/{weight}",
               "median_ms": r["median_ms"], "peak_rss_mb": r["peak_rss_mb"], "notes": ""}
        rows.append(row)
        print(f"{case:28s} {prov:12s} {model:9s} {weight:9s} {r['median_ms']:10.1f} ms "
              f"rss {r['peak_rss_mb']:8.1f} MB  ({time.perf_counter() - t0:.0f} s)", flush=True)
    for row in rows:
        wc = base.get((row["case"], "window-copy"))
        row["notes"] = f"x window-copy {row['median_ms'] / wc:.2f}" if wc else ""
    append_rows(rows, dev)
    print()
    print(harness.markdown_table(rows, ["case", "provider", "backend", "median_ms",
                                        "peak_rss_mb", "notes"]))


if __name__ == "__main__":
    main()
