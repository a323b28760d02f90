"""The in-process executor of the region engine: Zarr (or any array) in -> Zarr out.

:func:`infer_to_store` probes the model once (one batch of zero windows) to learn its
output geometry, opens the output through :class:`~qlty_gpu.stream.store.ZarrSink`
(overwrite policy, manifest, settings fingerprint, completion marker), and runs the region
tasks of :mod:`qlty_gpu.stream.regions` in raster order: after each task, the region is
finished (own core + tails of earlier neighbours, in a fixed order, / weight sum),
reduced if asked, written once as whole chunks and recorded in the manifest. Tails owed
to later regions wait in a dict — one slab of regions' worth of halo.

Resume (``resume=True``): finished regions are skipped. The tails that finished regions
owe to unfinished ones died with the killed process; they are rebuilt by re-running those
finished regions' tasks (the same pure function, so the same bits), and the number of
patches that ran again is reported (``attrs['qlty_gpu']['patches_rerun']`` and a log
line). A resumed run is bit-identical to an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import time
from collections.abc import Sequence
from typing import Any, Optional

import numpy as np
import torch

from ..errors import QltyError, QltyTypeError, describe
from .ome_io import open_input, write_ome_group
from .regions import RegionLayout, finish_core, run_region
from .runner import PatchRunner, is_oom
from .sources import as_source

__all__ = ["infer_to_store", "probe", "model_fingerprint"]

log = logging.getLogger("qlty_gpu.infer")


def model_fingerprint(model: Any) -> str:
    """sha256 (16 hex digits) of a model's type and parameters/buffers, or of its code."""
    h = hashlib.sha256()
    target = getattr(model, "_orig_mod", model)  # torch.compile wrappers
    h.update(f"{type(target).__module__}.{type(target).__qualname__}".encode())
    state = None
    if isinstance(target, torch.nn.Module):
        state = target.state_dict()
    elif hasattr(target, "state_dict") and callable(target.state_dict):
        try:
            state = dict(target.state_dict)
        except TypeError:
            state = None
    if state:
        for k in sorted(state):
            t = state[k]
            if isinstance(t, torch.Tensor):
                t = t.detach().to("cpu").contiguous()
                h.update(f"{k}:{tuple(t.shape)}:{t.dtype}".encode())
                h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    else:
        code = getattr(target, "__code__", None)
        if code is not None:
            h.update(getattr(target, "__qualname__", "").encode())
            h.update(code.co_code)
            h.update(repr(code.co_consts).encode())
    return h.hexdigest()[:16]


def probe(runner: PatchRunner, channels: int, dtype: torch.dtype) -> None:
    """Fix ``runner.specs`` by running the model once on zero windows.

    One window (``batch_size`` with ``pad_last_batch``, so a compiled model sees its single
    shape); the zeros are not patches of the data, so each real patch still runs once.
    """
    if runner.specs is not None:
        return
    b = runner.batch_size if runner.pad_last_batch else 1
    zeros = torch.zeros((b, channels, *runner.plan.window), dtype=dtype)
    try:
        items = runner.forward(zeros)
    except Exception as exc:
        if isinstance(exc, QltyError) or is_oom(exc):
            raise
        raise QltyError(
            f"the model failed on a batch of windows of shape {tuple(zeros.shape)} "
            f"(B, C, *window) {zeros.dtype}: {type(exc).__name__}: "
            f"{str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ''}; check "
            f"--window/window, the input channels and (for an exported model) its batch size"
        ) from exc
    runner.specs = runner.make_specs(items, b)


def _out_unit(out: Any, full_shape: tuple) -> tuple[tuple[int, ...], int]:
    """(spatial extent, images) of the unit a region owns in a given output array: its
    chunks, or its shards when it is sharded (so a shard is written once, by one region,
    never read-modified-written per chunk or by two tasks: zarr #3682); checks the shape and
    one chunk along channels."""
    if tuple(out.shape) != tuple(full_shape):
        raise QltyError(f"out has shape {tuple(out.shape)}, but this model and input give "
                        f"{tuple(full_shape)} (N, K, *spatial)")
    k_out = int(full_shape[1])
    unit = tuple(getattr(out, "shards", None) or out.chunks)
    if int(unit[1]) != k_out or int(out.chunks[1]) != k_out:
        raise QltyError(f"out must have one chunk along channels ({k_out}), got {out.chunks}")
    return tuple(int(c) for c in unit[2:]), int(unit[0])


def _np_dtype(dtype: torch.dtype) -> np.dtype:
    try:
        return torch.empty(0, dtype=dtype).numpy().dtype
    except TypeError as exc:
        raise QltyError(f"a Zarr output cannot hold {dtype}; pass out_dtype=torch.float32") from exc


def _store_dtype(reduce, k: int, acc: torch.dtype, nd: int, out_dtype) -> tuple[int, torch.dtype]:
    from ..infer import apply_reduce

    probe_t = torch.zeros((1, k, *([1] * nd)), dtype=acc)
    r = apply_reduce(probe_t, reduce)
    dtype = r.dtype
    if reduce == "argmax":
        dtype = torch.uint8 if k <= 256 else (torch.int16 if k <= 32767 else torch.int32)
    return int(r.shape[1]), out_dtype or dtype


def _spatial_chunks(chunks, nd: int, plan_out) -> tuple[int, ...]:
    from .chunks import default_chunks

    if chunks is None:
        return default_chunks(plan_out)
    if isinstance(chunks, int):
        chunks = (chunks,) * nd
    chunks = tuple(chunks)
    if len(chunks) == nd + 2:
        chunks = chunks[2:]
    if len(chunks) != nd or not all(isinstance(c, (int, np.integer)) and c >= 1 for c in chunks):
        raise QltyError(f"chunks must be {nd} positive ints (spatial chunk shape), got {chunks!r}")
    return tuple(int(c) for c in chunks)


def _check_out(out: Any) -> bool:
    """True when ``out`` is a path; else it must be a Zarr array (QltyTypeError)."""
    is_path = isinstance(out, (str, os.PathLike))
    if not is_path and not (type(out).__module__.startswith("zarr") and hasattr(out, "attrs")):
        raise QltyTypeError(f"out must be a path or a Zarr array, got {describe(out)}")
    return is_path


def _region_chunks(region_chunks: Any, nd: int, default: tuple[int, ...]) -> tuple[int, ...]:
    """Output chunks per region per axis: None -> ``default``, an int -> every axis."""
    if region_chunks is None:
        region_chunks = default
    elif isinstance(region_chunks, int):
        region_chunks = (region_chunks,) * nd
    region_chunks = tuple(int(r) for r in region_chunks)
    if len(region_chunks) != nd or min(region_chunks) < 1:
        raise QltyError(f"region_chunks must be {nd} positive ints, got {region_chunks!r}")
    return region_chunks


def _region_in(region_chunks: Sequence[int], cs: Sequence[int], scale) -> tuple[int, ...]:
    """Input pixels per region per axis: ``region_chunks * cs`` output pixels at ``scale``."""
    region_in = []
    for ax, (r, c, f) in enumerate(zip(region_chunks, cs, scale)):
        v = r * c / f
        if v.denominator != 1:
            raise QltyError(
                f"region of {r} x {c} output pixels on axis {ax} is not a whole number of "
                f"input pixels at output scale {f}; choose chunks divisible by the scale"
            )
        region_in.append(int(v))
    return tuple(region_in)


def run_settings(runner: PatchRunner, model_fp: str) -> dict:
    """The runner settings an output's fingerprint records (JSON-able); ``model_fp`` is
    :func:`model_fingerprint` of the model."""
    return {"model": model_fp, "batch_size": runner.batch_size,
            "pad_last_batch": runner.pad_last_batch, "amp": str(runner.amp),
            "model_dtype": str(runner.model_dtype), "device": runner.device.type,
            "accumulate_device": runner.accumulate_device.type,
            "backend": runner.backend or "auto"}


def _fingerprint(source, plan, full_shape, dtype, cs, spec, layout, reduce, run: dict) -> dict:
    """The settings fingerprint of a stored output (``run`` from :func:`run_settings`)."""
    from .. import __version__

    fp = {
        "qlty_gpu_version": __version__,
        "input_shape": list(source.shape), "input_dtype": str(source.dtype),
        "window": list(plan.window), "step": list(plan.step),
        "output_shape": list(full_shape), "output_dtype": str(dtype), "chunks": list(cs),
        "weight": spec.weight.fingerprint(), "layout": layout.describe(),
    }
    for k in ("model", "batch_size", "pad_last_batch", "amp", "model_dtype", "device",
              "accumulate_device"):
        fp[k] = run[k]
    fp["reduce"] = reduce if reduce is None or isinstance(reduce, str) else \
        f"callable:{getattr(reduce, '__qualname__', type(reduce).__name__)}"
    fp["backend"] = run["backend"]
    return fp


def _sink_args(out, full_shape, unit_chunks, keep) -> tuple:
    """``(target, shape, chunks)`` of the output's :class:`~qlty_gpu.stream.store.ZarrSink`:
    ``out`` itself, or with ``keep`` (OME-Zarr input, path output) the array ``0`` of an
    OME-Zarr group at ``out``, without the singleton axes ``keep`` drops; ``chunks`` is
    ``unit_chunks`` at a path, None (the array's own) for a given array."""
    is_path = isinstance(out, (str, os.PathLike))
    target, stored_shape, stored_chunks = out, full_shape, unit_chunks
    if keep is not None:
        target = os.path.join(os.fspath(out), "0")
        if os.path.lexists(out) and not os.path.exists(os.path.join(os.fspath(out), "zarr.json")):
            raise QltyError(f"output {os.fspath(out)!r} exists and is not a Zarr group; not touched")
        stored_shape = tuple(s for s, k in zip(full_shape, keep) if k)
        stored_chunks = tuple(s for s, k in zip(stored_chunks, keep) if k)
    return target, stored_shape, stored_chunks if is_path else None


def _open_sink(out, full_shape, unit_chunks, dtype, fingerprint, *, ome, keep, scale,
               overwrite, resume, compressors):
    """Create (or reopen, ``resume``) the output store and, with ``keep``, write the
    OME-Zarr group metadata around it (see :func:`_sink_args`)."""
    from .store import ZarrSink

    sink = ZarrSink(*_sink_args(out, full_shape, unit_chunks, keep), dtype=_np_dtype(dtype),
                    fingerprint=fingerprint, overwrite=overwrite, resume=resume,
                    compressors=compressors)
    if keep is not None:
        write_ome_group(out, ome, keep, scale, full_shape[1])
    return sink


def infer_to_store(
    model: Any,
    x: Any,
    window: Any,
    step: Any = None,
    *,
    out: Any = None,
    chunks: Any = None,
    region_chunks: Any = None,
    resume: bool = False,
    overwrite: bool = False,
    reduce: Any = None,
    out_dtype: Optional[torch.dtype] = None,
    progress: bool = False,
    grad: bool = False,
    compressors: Any = "auto",
    **settings: Any,
) -> Any:
    """Region-by-region inference from any array-like into a Zarr array.

    Args:
        model, window, step: as in :func:`qlty_gpu.infer`.
        x: ``(N, C, *S)`` source: tensor, numpy/memmap, Zarr array, h5py dataset, any
            array-like, or a path to a Zarr array or OME-Zarr group (its axes are mapped to
            ``(N, C, *S)``: ``t`` -> N, ``c`` -> C).
        out: a Zarr array (with chunks aligned as it is) or a path; ``None`` returns an
            in-memory tensor read from ``x`` region by region (same engine).
        chunks: spatial output chunk shape for a new store (default: aligned to the step,
            about 512 px in 2D, 128 in 3D).
        region_chunks: output chunks per region per axis (int or tuple; default enough
            chunks to span a window). Memory is bounded by one region block plus one slab
            of tails, never by the volume.
        resume: continue a killed run (settings must match; see module docstring).
        overwrite: replace an existing qlty_gpu output.
        reduce: ``None``, ``"argmax"``, ``"softmax"`` or a callable, applied per finished
            region (so a 100-class model writes one channel).
        out_dtype: stored dtype (default float32; argmax: the smallest int holding K).
        progress: tqdm bar over patches.
        grad: not supported here (raises).
        compressors: Zarr compressors for a new store.
        **settings: the remaining :func:`qlty_gpu.infer` keywords (batch_size, weight,
            sigma, border, border_weight, device, accumulate_device, amp, model_dtype,
            pad_last_batch, backend).

    Returns:
        The output Zarr array (its ``attrs['qlty_gpu']`` holds the settings fingerprint,
        ``complete``, and the patch counts of the run).
    """
    from ..infer import _progress, apply_reduce, check_reduce, make_plan, make_runner

    if grad:
        raise QltyError("grad=True is only supported in memory (x a tensor, out=None)")
    reduce = check_reduce(reduce)
    src_obj, ome = open_input(x)
    source = as_source(src_obj, "x")
    if len(source.shape) not in (4, 5):
        raise QltyError(f"x must have shape (N, C, Y, X) or (N, C, Z, Y, X), got {describe(src_obj)}")
    n_img, n_ch = source.shape[:2]
    nd = len(source.shape) - 2
    plan = make_plan(source.shape[2:], window, step)
    src_dev = src_obj.device if isinstance(src_obj, torch.Tensor) else torch.device("cpu")
    runner = make_runner(model, plan, n_img, source_device=src_dev, grad=False, **settings)
    in_dtype = source.read((slice(0, 1), slice(0, 1), *[slice(0, 1)] * nd)).dtype
    probe(runner, n_ch, in_dtype)
    if len(runner.specs) != 1:
        raise QltyError(
            f"writing to a store needs a model with one output tensor, got a {runner.structure[0]} "
            f"of {len(runner.specs)}; wrap the model to select one output"
        )
    spec = runner.specs[0]
    k_out, dtype = _store_dtype(reduce, spec.channels, spec.acc_dtype, nd, out_dtype)
    if out is None:
        raise QltyError("out must be a Zarr array or a path (in-memory results: pass a tensor)")
    is_path = _check_out(out)
    layout_keep = ome.keep_axes(k_out) if (ome is not None and is_path) else None
    full_shape = (n_img, k_out, *spec.plan.shape)
    if is_path:
        cs = _spatial_chunks(chunks, nd, spec.plan)
        n_chunk = 1
    else:
        cs, n_chunk = _out_unit(out, full_shape)
    base = tuple(max(1, -(-w // c)) for w, c in zip(spec.plan.window, cs))
    region_chunks = _region_chunks(region_chunks, nd, base)
    layout = RegionLayout(plan, n_img, _region_in(region_chunks, cs, spec.scale), spec.scale,
                          n_block=n_chunk)
    fingerprint = _fingerprint(source, plan, full_shape, dtype, cs, spec, layout, reduce,
                               run_settings(runner, model_fingerprint(model)))
    sink = _open_sink(out, full_shape, (n_chunk, k_out, *cs), dtype, fingerprint, ome=ome,
                      keep=layout_keep, scale=spec.scale, overwrite=overwrite, resume=resume,
                      compressors=compressors)

    def write(rid, block: torch.Tensor) -> None:
        n0, n1 = layout.nrange(rid)
        region = (slice(n0, n1), slice(0, k_out),
                  *[slice(lo, hi) for lo, hi in layout.core_out(rid)])
        if layout_keep is not None:
            region = tuple(r for r, k in zip(region, layout_keep) if k)
            block = block.reshape([s for s, k in zip(block.shape, layout_keep) if k])
        sink.write(region, block.to(dtype), unit=rid)

    t0 = time.perf_counter()
    done = {tuple(int(v) for v in key.split(".")) for key in sink.finished}
    pending: dict = {}  # target rid -> [(offset, (box, tail))]
    rerun = 0
    peak_tails = peak_block = 0
    total = n_img * plan.patches_per_image
    with _progress(progress, total, "infer") as bar:
        runner.progress = bar
        try:
            if done:  # rebuild the tails finished regions owe to unfinished ones
                for rid in layout.region_ids():
                    if rid not in done:
                        continue
                    owes = [o for o in layout.offsets()
                            if (t := layout.neighbour(rid, o)) is not None and t not in done
                            and layout.tail_box(rid, o) is not None]
                    if not owes:
                        continue
                    res = run_region(source, rid, layout, runner, tails_only=True)
                    rerun += res.patches
                    for o in owes:
                        pending.setdefault(layout.neighbour(rid, o), []).append((o, res.tails[o]))
                if bar is not None:
                    bar.update(sum(layout.n_patches(r) for r in done) - rerun)
            for rid in layout.region_ids():
                if rid in done:
                    continue
                res = run_region(source, rid, layout, runner)
                for o, tail in res.tails.items():
                    tgt = layout.neighbour(rid, o)
                    if tgt not in done:
                        pending.setdefault(tgt, []).append((o, tail))
                core = finish_core(res, pending.pop(rid, []), layout, spec)
                held = sum(t.numel() * t.element_size()
                           for lst in pending.values() for _, (_, t) in lst)
                peak_tails = max(peak_tails, held)
                peak_block = max(peak_block, math.prod(
                    [layout.nrange(rid)[1] - layout.nrange(rid)[0], spec.channels,
                     *[hi - lo for lo, hi in layout.block_out(rid)]]) * core.element_size())
                write(rid, apply_reduce(core, reduce))
        finally:
            runner.progress = None
    runner.finish()
    ran = runner.patches_run
    sink.finish(expected_units=layout.count(), patches_run=ran, patches_rerun=rerun,
                patches_total=total, seconds=round(time.perf_counter() - t0, 3),
                resumed=bool(done), peak_tail_bytes=peak_tails, region_block_bytes=peak_block)
    if done:
        log.info("resumed: %d regions were finished; %d patches ran again to rebuild their "
                 "tails", len(done), rerun)
    return sink.array

