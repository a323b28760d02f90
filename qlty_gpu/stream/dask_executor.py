"""The Dask distributed executor of the region engine: one volume, many workers (and GPUs).

:func:`infer_distributed` (reached through ``qlty_gpu.infer(..., client=...)`` and
``quilt.infer(..., client=...)``) runs the region tasks of :mod:`qlty_gpu.stream.regions`
as Dask tasks — one per region of whole output chunks (whole shards for a sharded
output), never one per patch and never ``dask.array.map_overlap``:

1. **Model shipping**: an ``nn.Module`` or callable (pickled), a zero-argument factory
   (called on each worker), or a ``torch.export`` ``.pt2`` path; scattered once and loaded
   once per worker process (a cache keyed by the payload's hash), on the worker's GPU when
   it has one. A probe task on one worker learns the model's output geometry.
2. **Each patch once**: a region task reads its region plus halo, runs its patches through
   the model once, writes the halo *tails* it owes later regions to a scratch store next to
   the output, and finishes its region at once when every tail it waits for is there;
   otherwise its core waits in the scratch store and a small finish task completes it as
   soon as the neighbours' tails arrive. The scratch store is removed after a complete run.
3. **Bounded graph**: tasks are submitted in waves (``as_completed``, at most
   ``max_in_flight`` at once), so a 10^5-region volume never builds a 10^5-node graph.
4. **Faults and resume**: output chunks are written whole by the one task that owns them
   and recorded in the manifest afterwards; tasks consult the manifest first, so a retry
   (a worker died) changes nothing. ``resume=True`` continues a killed run, reusing the
   tails in the scratch store (or re-running the finished regions that owe tails when it
   is gone); other settings are refused, naming what changed.
5. **Same bits**: a region's sum is its core, then the tails in sorted neighbour-offset
   order, whoever ran them — bit-identical to the in-process executor for the same layout.

Returns a :class:`DistributedReport` (regions, patches, model calls, bytes, scratch, time
per worker). See README "Distributed inference (Dask)".
"""

from __future__ import annotations

import logging
import shutil
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any, Optional

import numpy as np
import torch

from ..errors import QltyError, describe
from .dask_prep import (
    check_client,
    choose_region,
    default_budget,
    is_memory_store,
    model_payload,
    open_scratch,
    scratch_path,
    source_ref,
    task_bytes,
)
from .dask_worker import (
    TaskContext,
    compute_task,
    finish_task,
    probe_task,
)
from .regions import RegionLayout

__all__ = ["infer_distributed", "DistributedReport"]

log = logging.getLogger("qlty_gpu.infer")


@dataclass
class DistributedReport:
    """What a distributed run did (also kept in ``array.attrs['qlty_gpu']['report']``).

    Attributes:
        array: the output Zarr array.
        regions: regions in the layout; regions_run: finished by this run.
        region_chunks: output chunks (shards) per region per axis; region_choice: how.
        patches_total: patches of the volume; patches_run: patches through the model in
            this run (each once, plus ``patches_rerun`` to rebuild tails on resume).
        model_calls: model calls (batches) in this run.
        bytes_read / bytes_written: input read and output written by the tasks.
        scratch_written / scratch_peak: scratch bytes written in all / held at most.
        block_bytes_max: the largest input block + 2 x accumulator block of one task
            (accounted from the layout, the quantity ``region="auto"`` budgets; the
            model's activations and one batch come on top).
        tasks: tasks run by kind; finished_inline: regions finished by their own task.
        max_in_flight: most tasks submitted at once (the graph size bound).
        seconds: wall time of the run.
        workers: per worker address: tasks, busy seconds, CPU seconds of its process
            during them, patches, model loads.
    """

    array: Any = None
    regions: int = 0
    regions_run: int = 0
    region_chunks: tuple = ()
    region_choice: str = ""
    patches_total: int = 0
    patches_run: int = 0
    patches_rerun: int = 0
    model_calls: int = 0
    bytes_read: int = 0
    bytes_written: int = 0
    scratch_written: int = 0
    scratch_peak: int = 0
    block_bytes_max: int = 0
    tasks: dict = field(default_factory=dict)
    finished_inline: int = 0
    max_in_flight: int = 0
    seconds: float = 0.0
    workers: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        """JSON-able copy (without the array)."""
        d = {k: v for k, v in self.__dict__.items() if k != "array"}
        d["region_chunks"] = list(self.region_chunks)
        return d


# ------------------------------------------------------------------ main
_RUNNER_KEYS = ("batch_size", "weight", "sigma", "border", "border_weight", "device",
                "accumulate_device", "amp", "model_dtype", "pad_last_batch", "backend")


def _runner_settings(given: dict) -> dict:
    """The runner keywords with :func:`qlty_gpu.infer`'s defaults filled in."""
    import inspect

    from ..infer import infer

    unknown = sorted(set(given) - set(_RUNNER_KEYS))
    if unknown:
        raise QltyError(f"unknown keyword arguments for distributed infer: {unknown}")
    params = inspect.signature(infer).parameters
    return {k: given.get(k, params[k].default) for k in _RUNNER_KEYS}


def _error(exc: BaseException, what: str) -> QltyError:
    name = type(exc).__name__
    if isinstance(exc, QltyError):
        return exc
    if name == "KilledWorker":
        return QltyError(f"{what} killed its worker process repeatedly (Dask gave up: {exc}); "
                         "finished regions are recorded: fix the cause and rerun with resume=True")
    if name in ("CancelledError", "ClosedClientError", "CommClosedError") or isinstance(
            exc, (OSError, TimeoutError)):
        return QltyError(f"lost the Dask client or scheduler during {what} ({name}: {exc}); "
                         "finished regions are recorded: rerun with resume=True")
    return QltyError(f"{what} failed on a Dask worker: {name}: {exc}")


def infer_distributed(
    model: Any,
    x: Any,
    window: Any,
    step: Any = None,
    *,
    client: Any,
    out: Any,
    chunks: Any = None,
    region: Any = None,
    region_chunks: Any = None,
    memory_budget: Optional[int] = None,
    scratch: Any = None,
    resume: bool = False,
    overwrite: bool = False,
    reduce: Any = None,
    out_dtype: Optional[torch.dtype] = None,
    progress: bool = False,
    grad: bool = False,
    compressors: Any = "auto",
    max_in_flight: Optional[int] = None,
    **settings: Any,
) -> DistributedReport:
    """Region-by-region inference on a Dask cluster, Zarr in -> Zarr out (module docstring).

    Args:
        model: an ``nn.Module`` or callable ``(B, C, *window) -> (B, K, *window')`` (pickled
            to the workers), a zero-argument factory returning one (called once per worker),
            or a path to a ``torch.export`` ``.pt2`` program every worker can read.
        x: ``(N, C, *S)`` input every worker can open: a Zarr / OME-Zarr path on a shared
            file system, or a Zarr array on a shared store.
        window, step: as in :func:`qlty_gpu.infer`.
        client: a running ``dask.distributed.Client``.
        out: the output Zarr array or path (see
            :func:`~qlty_gpu.stream.executor.infer_to_store`); a sharded array is written in
            whole shards.
        chunks: spatial output chunk shape for a new store.
        region: ``"auto"`` (the largest region whose task fits ``memory_budget``), or the
            region's output extent per spatial axis (multiples of the chunk shape).
        region_chunks: output chunks per region per axis (as in-process); exclusive with
            ``region``. Default: enough chunks to span a window.
        memory_budget: bytes one task may hold for ``region="auto"`` (default: a quarter of
            the smallest worker's memory limit per thread; on GPU workers pass your share of
            the GPU memory).
        scratch: where the halo tails go (default ``<out>.qlty-scratch`` next to the output);
            removed after a complete run, kept for ``resume=True`` after a failure.
        resume, overwrite, reduce, out_dtype, compressors: as in-process.
        progress: a tqdm bar over patches on the client.
        grad: not supported (raises).
        max_in_flight: most tasks submitted at once (default 2 per worker thread, >= 4).
        **settings: batch_size, weight, sigma, border, border_weight, device (default: each
            worker's GPU, else its CPU), accumulate_device, amp, model_dtype,
            pad_last_batch, backend.

    Returns:
        The :class:`DistributedReport`; ``report.array`` is the output.

    Raises:
        QltyError: a closed client, a source or model the workers cannot use, bad settings,
            ``resume=True`` with other settings (naming them), or a region that failed.
    """
    from ..infer import _progress, check_reduce, make_plan, make_runner
    from .executor import (
        _check_out,
        _fingerprint,
        _np_dtype,
        _open_sink,
        _out_unit,
        _region_chunks,
        _region_in,
        _sink_args,
        _spatial_chunks,
        _store_dtype,
    )
    from .store import ZarrSink

    t_start = time.perf_counter()
    if grad:
        raise QltyError("grad=True is not supported with client= (inference only)")
    info = check_client(client)
    reduce = check_reduce(reduce)
    if out is None:
        raise QltyError("client= needs out= (a Zarr path or array every worker can write)")
    is_path = _check_out(out)
    if not is_path:
        if is_memory_store(out.store):
            raise QltyError(f"out is a Zarr array in this process's memory ({describe(out)}); "
                            "Dask workers cannot write it: use a path or a shared store")
    src_ref, source, ome = source_ref(x)
    if len(source.shape) not in (4, 5):
        raise QltyError(f"x must have shape (N, C, Y, X) or (N, C, Z, Y, X), got {source.shape}")
    n_img, n_ch = source.shape[:2]
    nd = len(source.shape) - 2
    plan = make_plan(source.shape[2:], window, step)
    settings = _runner_settings(settings)
    device = settings["device"]
    # validate every setting on the client (the model is loaded on the workers only)
    make_runner(lambda b: b, plan, n_img, source_device=torch.device("cpu"), grad=False,
                **settings)
    payload = model_payload(model)
    base_ctx = TaskContext(RegionLayout(plan, n_img, plan.shape, (Fraction(1),) * nd), settings,
                           None if device is None else str(device), src_ref, None, None, 0,
                           None, reduce, None)
    pay_f = client.scatter(payload, broadcast=True, hash=False)
    futures: dict = {}
    bar = ctx_f = token = None
    ok = False
    try:
        try:
            pr = client.submit(probe_task, base_ctx, pay_f, pure=False).result()
        except Exception as exc:  # noqa: BLE001
            raise _error(exc, "loading the model and opening the source") from exc
        specs = pr["specs"]
        if len(specs) != 1:
            raise QltyError(f"writing to a store needs a model with one output tensor, got "
                            f"{len(specs)}; wrap the model to select one output")
        spec = specs[0]
        k_out, dtype = _store_dtype(reduce, spec.channels, spec.acc_dtype, nd, out_dtype)
        keep = ome.keep_axes(k_out) if (ome is not None and is_path) else None
        full_shape = (n_img, k_out, *spec.plan.shape)
        if is_path:
            cs, n_chunk = _spatial_chunks(chunks, nd, spec.plan), 1
        else:
            cs, n_chunk = _out_unit(out, full_shape)  # whole shards when sharded
        in_item = torch.empty(0, dtype=pr["in_dtype"]).element_size()
        acc_item = torch.empty(0, dtype=spec.acc_dtype).element_size()
        base = tuple(max(1, -(-w // c)) for w, c in zip(spec.plan.window, cs))

        def layout_of(rc) -> RegionLayout:
            return RegionLayout(plan, n_img, _region_in(rc, cs, spec.scale), spec.scale,
                                n_block=n_chunk)

        def est(rc) -> int:
            return task_bytes(layout_of(rc), n_ch, spec.channels, in_item, acc_item,
                              pr["batch_size"])

        if region is not None and region_chunks is not None:
            raise QltyError("pass region= or region_chunks=, not both")
        choice = "default (a window's span)"
        if isinstance(region, str):
            if region != "auto":
                raise QltyError(f"region must be 'auto', an int or a tuple, got {region!r}")
            budget = int(memory_budget or default_budget(info))
            region_chunks = choose_region(spec.plan.shape, cs, base, lambda rc: est(rc) <= budget)
            choice = (f"auto: {region_chunks} chunks of {cs} = "
                      f"{tuple(r * c for r, c in zip(region_chunks, cs))} output px, "
                      f"~{est(region_chunks) / 2**20:.1f} MiB per task (budget "
                      f"{budget / 2**20:.1f} MiB)")
            if est(region_chunks) > budget:
                choice += "; the smallest region exceeds the budget"
            log.info("region='auto' chose %s", choice)
        elif region is not None:
            ext = (region,) * nd if isinstance(region, int) else tuple(region)
            if len(ext) != nd or any(not isinstance(e, (int, np.integer)) or e < 1 or e % c
                                     for e, c in zip(ext, cs)):
                raise QltyError(f"region must be {nd} positive multiples of the chunk shape {cs} "
                                f"(output pixels), got {region!r}")
            region_chunks = tuple(int(e) // c for e, c in zip(ext, cs))
            choice = f"region={tuple(ext)} output px"
        region_chunks = _region_chunks(region_chunks, nd, base)
        layout = layout_of(region_chunks)
        fingerprint = _fingerprint(source, plan, full_shape, dtype, cs, spec, layout, reduce, pr)
        sink = _open_sink(out, full_shape, (n_chunk, k_out, *cs), dtype, fingerprint, ome=ome,
                          keep=keep, scale=spec.scale, overwrite=overwrite, resume=resume,
                          compressors=compressors)
        scr_path = scratch_path(out, scratch)
        scr, markers = open_scratch(scr_path, fingerprint, resume)
        token = uuid.uuid4().hex[:12]
        scr.put_raw("run", token.encode())
        ctx = TaskContext(layout, settings, base_ctx.device, src_ref, sink.array, keep, k_out,
                          dtype, reduce, scr, specs, pr["structure"], token)
        ctx_f = client.scatter(ctx, broadcast=True, hash=False)
        rep = DistributedReport(regions=layout.count(), region_chunks=region_chunks,
                                region_choice=choice,
                                patches_total=n_img * plan.patches_per_image)
        done = {tuple(int(v) for v in k.split(".")) for k in sink.finished}
        ready = {tuple(int(v) for v in k.split(".")) for k in markers}
        waiting = {r for r in (tuple(int(v) for v in k.split(".")) for k, m in markers.items()
                               if m == b"core") if r not in done}
        todo: deque = deque()
        # wavefront order (image block, then index sum): regions on one anti-diagonal never
        # feed each other tails, so tasks running side by side rarely leave a core waiting
        for rid in sorted(layout.region_ids(), key=lambda r: (r[0], sum(r[1:]), r)):
            if rid in done:
                owes = any((t := layout.neighbour(rid, o)) is not None and t not in done
                           and layout.tail_box(rid, o) is not None for o in layout.offsets())
                if owes and rid not in ready:
                    todo.appendleft((rid, "tails"))
            elif rid not in waiting:
                todo.append((rid, "full"))
        limit = max_in_flight or max(4, 2 * sum(int(w.get("nthreads", 1))
                                                for w in info["workers"].values()))
        scratch_level = 0
        from distributed import as_completed

        ac = as_completed([])

        def submit(fn, rid, kind, *args, priority=0):
            key = f"qlty-{kind}-{unit_str(rid)}-{token}"  # the token: see _running
            f = client.submit(fn, ctx_f, *args, key=key, priority=priority)
            futures[f.key] = (f, rid, kind)
            ac.add(f)
            rep.max_in_flight = max(rep.max_in_flight, len(futures))

        def unit_str(rid):
            return ".".join(map(str, rid))

        def try_finish(cands):
            for c in sorted(cands):
                if c in waiting and all(s in ready for _, s in layout.backward_neighbours(c)):
                    waiting.discard(c)
                    submit(finish_task, c, "finish", c, priority=1)

        def top_up():
            while todo and len(futures) < limit:
                rid, mode = todo.popleft()
                submit(compute_task, rid, mode, pay_f, rid, mode)

        bar_ctx = _progress(progress, rep.patches_total, "infer (dask)")
        bar = bar_ctx.__enter__()
        if bar is not None:
            bar.update(sum(layout.n_patches(r) for r in done))
        try_finish(set(waiting))
        top_up()
        if not futures and (todo or waiting):
            raise QltyError("internal: regions wait for tails that no task produces")
        for fut in ac:
            _, rid, kind = futures.pop(fut.key)
            try:
                st = fut.result()
            except Exception as exc:  # noqa: BLE001
                raise _error(exc, f"region {rid} ({kind})") from exc
            fut.release()
            _account(rep, st)
            scratch_level += st["scratch_written"] - st["scratch_deleted"]
            rep.scratch_peak = max(rep.scratch_peak, scratch_level)
            if st["status"] in ("finished", "skipped"):
                done.add(rid)
            if kind != "finish":
                ready.add(rid)
                if st["status"] == "core":
                    waiting.add(rid)
                if kind == "full" and bar is not None:
                    bar.update(st["patches"])
                fwd = [t for o in layout.offsets() if (t := layout.neighbour(rid, o)) is not None]
                try_finish({rid, *fwd})
            top_up()
            if not futures and (todo or waiting):
                raise QltyError(f"internal: {len(waiting)} regions wait for tails that no task "
                                "produces")
        final = ZarrSink(*_sink_args(out, full_shape, (n_chunk, k_out, *cs), keep),
                         dtype=_np_dtype(dtype), fingerprint=fingerprint, resume=True)
        rep.regions_run = len(final.finished) - len(sink.finished)
        rep.seconds = round(time.perf_counter() - t_start, 3)
        final.finish(expected_units=layout.count(), patches_run=rep.patches_run,
                     patches_rerun=rep.patches_rerun, patches_total=rep.patches_total,
                     seconds=rep.seconds, resumed=bool(sink.finished), executor="dask",
                     report=rep.to_dict())
        shutil.rmtree(scr_path, ignore_errors=True)
        rep.array = final.array
        if sink.finished:
            log.info("resumed: %d regions were finished; %d patches ran again to rebuild tails",
                     len(sink.finished), rep.patches_rerun)
        ok = True
        return rep
    finally:
        if bar is not None:
            bar.close()
        live = [f for f, _, _ in futures.values()]
        if live and client.status == "running":
            try:
                client.cancel(live)
            except Exception:  # noqa: BLE001 - best effort on the way out
                pass
        if not ok and token is not None and client.status == "running":
            _drain(client, token)
        for f in (pay_f, ctx_f):
            if f is not None:
                try:
                    f.release()
                except Exception:  # noqa: BLE001
                    pass


def _running(token: str, dask_worker: Any = None) -> int:
    """Tasks of run ``token`` still executing on this worker (run via ``client.run``)."""
    st = dask_worker.state
    return sum(token in str(ts.key) for ts in (st.executing | st.long_running))


def _drain(client: Any, token: str, timeout: float = 60.0) -> None:
    """After a failure, wait until the cancelled tasks still running on workers are done,
    so nothing of this run writes after the error reaches the caller (they are fenced too).
    """
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            busy = sum(client.run(_running, token).values())
        except Exception:  # noqa: BLE001 - a gone cluster has nothing running
            return
        if not busy:
            return
        time.sleep(0.1)
    log.warning("tasks of the failed run %s still run after %.0f s; they are fenced and will "
                "not write into a newer run's output", token, timeout)


def _account(rep: DistributedReport, st: dict) -> None:
    kind = st["kind"]
    rep.tasks[kind] = rep.tasks.get(kind, 0) + 1
    rep.patches_run += st["patches"]
    if kind == "tails":
        rep.patches_rerun += st["patches"]
    if kind == "full" and st["status"] == "finished":
        rep.finished_inline += 1
    rep.model_calls += st["model_calls"]
    rep.bytes_read += st["bytes_read"]
    rep.bytes_written += st["bytes_written"]
    rep.scratch_written += st["scratch_written"]
    rep.block_bytes_max = max(rep.block_bytes_max, st["block_bytes"])
    w = rep.workers.setdefault(st["worker"], {"tasks": 0, "seconds": 0.0, "cpu_seconds": 0.0,
                                              "patches": 0, "model_loads": 0})
    w["tasks"] += 1
    w["seconds"] = round(w["seconds"] + st["seconds"], 4)
    w["cpu_seconds"] = round(w["cpu_seconds"] + st["cpu_seconds"], 4)
    w["patches"] += st["patches"]
    w["model_loads"] = max(w["model_loads"], st["model_loads"])
