"""The worker side of the Dask executor: model and source caches, the scratch store, tasks.

Everything here runs inside Dask worker processes (and is importable without
``distributed``). The client (:mod:`qlty_gpu.stream.dask_executor`) scatters two objects
to every worker once: a :class:`ModelPayload` (the pickled model, a zero-argument factory
or a ``torch.export`` ``.pt2`` path) and a :class:`TaskContext` (layout, runner settings,
output spec, where to read, write and keep tails). Tasks receive both and a region id.

* **Model once per worker**: :func:`load_model` keeps the loaded model in a per-process
  cache keyed by ``(payload hash, device)``; every later task of that worker reuses it.
  The probe (one model call on zero windows that fixes the output's shape and dtype) is
  cached the same way, per model, device, settings, geometry and input channels / dtype.
* **Scratch store** (:class:`Scratch`): halo tails and deferred cores as raw little-endian
  bytes under keys of a Zarr store (``tail/<src>/<offset>``, ``core/<rid>``), plus one
  marker per region (``ran/<rid>``: its outgoing tails are all there; value ``core`` when
  its core waits there too). A marker is set only after the data it vouches for, and the
  local store writes files atomically, so a killed task never leaves a key that looks done.
* **Tasks**: :func:`compute_task` runs a region's patches once, stores its outgoing tails,
  and finishes the region at once if every tail it waits for is already there (else it
  leaves its core in the scratch store for :func:`finish_task`). A region is finished by
  the fixed-order sum of :func:`~qlty_gpu.stream.regions.finish_core`, written as whole
  output chunks and then recorded in the output's manifest. Both tasks first look at the
  manifest, so a task that runs twice (a worker died after it finished) changes nothing.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch

from ..errors import QltyError, describe
from .regions import RegionLayout, RegionResult, finish_core, run_region
from .runner import OutputSpec, PatchRunner
from .sources import ArraySource, as_source
from .store import ZarrSink, unit_key

__all__ = [
    "ModelPayload", "SourceRef", "TaskContext", "Scratch", "load_model", "compute_task",
    "finish_task", "probe_task", "worker_device",
]

_LOCK = threading.Lock()
_MODELS: OrderedDict = OrderedDict()  # (payload key, device) -> model
_SOURCES: OrderedDict = OrderedDict()  # source key -> ArraySource
_PROBES: OrderedDict = OrderedDict()  # probe key -> (specs, structure, model fingerprint)
_KEEP = 2  # models / sources kept per worker process
LOADS = {"models": 0}  # per-process count of model loads (reported per worker)


def _sync(coro):
    from zarr.core.sync import sync

    return sync(coro)


def _where() -> str:
    """The current worker's address (or the pid outside Dask)."""
    try:
        from distributed import get_worker

        return str(get_worker().address)
    except (ImportError, ValueError):
        return f"pid {os.getpid()}"


# ----------------------------------------------------------------- model
@dataclass(frozen=True)
class ModelPayload:
    """A model as shipped to the workers.

    Attributes:
        kind: ``"pickle"`` (a pickled callable / nn.Module), ``"factory"`` (a pickled
            zero-argument callable returning the model) or ``"pt2"`` (a path to a
            ``torch.export`` program every worker can read).
        key: sha256 of the payload (the per-worker cache key).
        data: the pickled bytes, or the path.
        name: a short description for messages.
    """

    kind: str
    key: str
    data: Any
    name: str


def worker_device(requested: Optional[str]) -> torch.device:
    """The device a worker runs the model on: ``requested``, else its GPU, else the CPU."""
    if requested is not None:
        return torch.device(requested)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _build(payload: ModelPayload) -> Any:
    import cloudpickle

    if payload.kind == "pt2":
        return torch.export.load(payload.data).module()
    obj = cloudpickle.loads(payload.data)
    if payload.kind == "factory":
        obj = obj()
        if not callable(obj):
            raise QltyError(f"the model factory {payload.name} returned {describe(obj)}, not a "
                            "callable model")
    return obj


def load_model(payload: ModelPayload, device: torch.device) -> Any:
    """The payload's model on ``device``, loaded at most once per worker process."""
    key = (payload.key, str(device))
    with _LOCK:
        if key in _MODELS:
            _MODELS.move_to_end(key)
            return _MODELS[key]
        try:
            model = _build(payload)
            if isinstance(model, torch.nn.Module):
                model = model.to(device)
        except QltyError:
            raise
        except Exception as exc:  # noqa: BLE001 - any loader failure is reported as ours
            raise QltyError(
                f"worker {_where()} could not load the model ({payload.kind}: {payload.name}): "
                f"{type(exc).__name__}: {exc}"
            ) from exc
        _MODELS[key] = model
        LOADS["models"] += 1
        while len(_MODELS) > _KEEP:
            _MODELS.popitem(last=False)
        return model


# ----------------------------------------------------------------- source
@dataclass(frozen=True)
class SourceRef:
    """Where the workers read the input.

    Attributes:
        key: identity of the source (for the per-worker cache).
        shape: the ``(N, C, *S)`` shape the client saw.
        path: a Zarr / OME-Zarr path the workers open themselves, or None.
        obj: an object shipped to the workers (a Zarr array on a shared store...), or None.
        name: a short description for messages.
    """

    key: str
    shape: tuple
    path: Optional[str] = None
    obj: Any = None
    name: str = "x"

    def open(self) -> ArraySource:
        """The source as seen on this worker (cached per process)."""
        with _LOCK:
            if self.key in _SOURCES:
                return _SOURCES[self.key]
        try:
            if self.path is not None:
                from .ome_io import open_input

                src = as_source(open_input(self.path)[0], "x")
            else:
                src = as_source(self.obj, "x")
            shape = tuple(src.shape)
            src.read(tuple(slice(0, 1) for _ in shape))  # can this worker read it?
        except Exception as exc:  # noqa: BLE001 - the worker cannot open what the client can
            raise QltyError(
                f"worker {_where()} cannot open the source {self.name}: "
                f"{type(exc).__name__}: {exc}; the workers must reach it (a Zarr/OME-Zarr path "
                "on a shared file system or a store URL every worker can open)"
            ) from exc
        if shape != tuple(self.shape):
            raise QltyError(
                f"worker {_where()} sees the source {self.name} with shape {shape}, the client "
                f"saw {tuple(self.shape)}; the workers must read the same data"
            )
        with _LOCK:
            _SOURCES[self.key] = src
            while len(_SOURCES) > _KEEP:
                _SOURCES.popitem(last=False)
        return src


# ----------------------------------------------------------------- scratch
class Scratch:
    """Raw tensors under keys of a Zarr store, with per-region markers (module docstring).

    Args:
        store: a Zarr store every worker can reach (pickled to them).
        prefix: key prefix inside the store (``""`` or ``"path/"``).
    """

    def __init__(self, store: Any, prefix: str = "") -> None:
        self.store = store
        self.prefix = prefix

    @staticmethod
    def tail_key(src: Sequence[int], offset: Sequence[int]) -> str:
        return f"tail/{unit_key(tuple(src))}/{unit_key(tuple(offset))}"

    @staticmethod
    def core_key(rid: Sequence[int]) -> str:
        return f"core/{unit_key(tuple(rid))}"

    def put(self, key: str, t: torch.Tensor) -> int:
        from zarr.core.buffer import default_buffer_prototype

        a = t.detach().to("cpu").contiguous().numpy()
        data = a.astype(a.dtype.newbyteorder("<"), copy=False).tobytes()
        _sync(self.store.set(self.prefix + key,
                             default_buffer_prototype().buffer.from_bytes(data)))
        return len(data)

    def get(self, key: str, shape: Sequence[int], dtype: torch.dtype) -> Optional[torch.Tensor]:
        from zarr.core.buffer import default_buffer_prototype

        buf = _sync(self.store.get(self.prefix + key, prototype=default_buffer_prototype()))
        if buf is None:
            return None
        npd = torch.empty(0, dtype=dtype).numpy().dtype.newbyteorder("<")
        a = np.frombuffer(buf.to_bytes(), dtype=npd)
        if a.size != int(np.prod(shape)):
            raise QltyError(f"scratch key {key!r} holds {a.size} values, expected shape {tuple(shape)}")
        return torch.from_numpy(a.astype(npd.newbyteorder("="), copy=True).reshape(tuple(shape)))

    def put_raw(self, key: str, data: bytes) -> None:
        from zarr.core.buffer import default_buffer_prototype

        _sync(self.store.set(self.prefix + key, default_buffer_prototype().buffer.from_bytes(data)))

    def get_raw(self, key: str) -> Optional[bytes]:
        from zarr.core.buffer import default_buffer_prototype

        buf = _sync(self.store.get(self.prefix + key, prototype=default_buffer_prototype()))
        return None if buf is None else buf.to_bytes()

    def delete(self, key: str) -> None:
        _sync(self.store.delete(self.prefix + key))

    def mark(self, rid: Sequence[int], value: bytes) -> None:
        from zarr.core.buffer import default_buffer_prototype

        _sync(self.store.set(self.prefix + f"ran/{unit_key(tuple(rid))}",
                             default_buffer_prototype().buffer.from_bytes(value)))

    def marker(self, rid: Sequence[int]) -> Optional[bytes]:
        from zarr.core.buffer import default_buffer_prototype

        buf = _sync(self.store.get(self.prefix + f"ran/{unit_key(tuple(rid))}",
                                   prototype=default_buffer_prototype()))
        return None if buf is None else buf.to_bytes()

    def markers(self) -> dict[str, bytes]:
        """Every region marker (read once by the client on resume)."""
        from zarr.core.buffer import default_buffer_prototype

        pre = self.prefix + "ran/"

        async def collect():
            keys = [k async for k in self.store.list_prefix(pre)]
            out = {}
            for k in keys:
                buf = await self.store.get(k, prototype=default_buffer_prototype())
                if buf is not None:
                    out[k[len(pre):]] = buf.to_bytes()
            return out

        return _sync(collect())


# ----------------------------------------------------------------- output
class _WorkerSink(ZarrSink):
    """Writes and records units of an existing qlty_gpu output (opened by the client).

    The client's :class:`ZarrSink` created or resumed the output and checked it; a worker
    only writes whole chunks and sets manifest keys, so nothing is re-read or re-checked.
    """

    def __init__(self, array: Any) -> None:  # noqa: D107 - no checks on purpose
        from .device_io import ChunkWriter

        self.array = array
        self.path = None
        self.shape = tuple(int(d) for d in array.shape)
        self.dtype = np.dtype(array.dtype)
        self.chunks = tuple(int(c) for c in array.chunks)
        self.fingerprint = {}
        self.writer = ChunkWriter()
        self.fsync = False
        self.resumed = True
        self._finished = set()

    def has(self, unit: Any) -> bool:
        """True if the manifest records ``unit`` (looked up in the store, not cached)."""
        return bool(_sync(self.array.store.exists(self._prefix() + unit_key(unit))))


# ----------------------------------------------------------------- tasks
@dataclass
class TaskContext:
    """What every task needs besides the model and the region id (scattered once).

    Attributes:
        layout: the region layout (its plan is the input geometry).
        settings: the :func:`qlty_gpu.infer.make_runner` keywords (weight, batch_size...).
        device: the requested model device, or None (each worker's GPU, else its CPU).
        source: where to read the input.
        out: the output Zarr array (the array written, OME level 0 included).
        keep: which of ``(N, K, *S)`` the stored output has (OME outputs), or None.
        k_out: output channels after ``reduce``.
        dtype: the stored dtype.
        reduce: the reduction applied to each finished region.
        scratch: the scratch store.
        specs: the model's output specs (from the probe; None before it).
        structure: the model's output structure (from the probe).
    """

    layout: RegionLayout
    settings: dict
    device: Optional[str]
    source: SourceRef
    out: Any
    keep: Optional[tuple]
    k_out: int
    dtype: Optional[torch.dtype]
    reduce: Any
    scratch: Optional[Scratch]
    specs: Optional[list] = None
    structure: Optional[tuple] = None
    token: str = ""

    def fence(self) -> None:
        """Refuse to write for a run that is no longer the current one.

        The client stores its run token in the scratch store; a task of an earlier, failed
        run that is still executing (Dask cannot stop a running task) finds another token
        (or none) and writes nothing into a store a later run now owns.
        """
        if self.scratch.get_raw("run") != self.token.encode():
            raise QltyError(f"task of an earlier run ({self.token}) stopped before writing: "
                            "a newer run owns the output")

    @property
    def spec(self) -> OutputSpec:
        return self.specs[0]

    def make_runner(self, payload: ModelPayload) -> tuple[PatchRunner, list]:
        """A runner around this worker's cached model; the list counts model calls."""
        from ..infer import make_runner

        dev = worker_device(self.device)
        model = load_model(payload, dev)
        settings = dict(self.settings, device=str(dev))
        runner = make_runner(model, self.layout.plan, self.layout.n_img,
                             source_device=torch.device("cpu"), grad=False, **settings)
        runner.specs, runner.structure = self.specs, self.structure
        calls = [0]
        forward = runner.forward

        def counted(batch):
            calls[0] += 1
            return forward(batch)

        runner.forward = counted
        return runner, calls


def _itemsize(dtype: Any) -> int:
    if isinstance(dtype, torch.dtype):
        return torch.empty(0, dtype=dtype).element_size()
    return np.dtype(dtype).itemsize


def _clock() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


def _stats(rid, kind: str, status: str, t0: tuple, **kw: Any) -> dict:
    out = {"rid": tuple(rid), "kind": kind, "status": status, "worker": _where(),
           "pid": os.getpid(), "seconds": time.perf_counter() - t0[0],
           "cpu_seconds": time.process_time() - t0[1], "model_loads": LOADS["models"],
           "patches": 0, "model_calls": 0, "bytes_read": 0, "bytes_written": 0,
           "scratch_written": 0, "scratch_read": 0, "scratch_deleted": 0, "block_bytes": 0}
    out.update(kw)
    return out


def _write_region(ctx: TaskContext, sink: _WorkerSink, rid, core: torch.Tensor) -> int:
    from ..infer import apply_reduce

    block = apply_reduce(core, ctx.reduce)
    n0, n1 = ctx.layout.nrange(rid)
    region = (slice(n0, n1), slice(0, ctx.k_out),
              *[slice(lo, hi) for lo, hi in ctx.layout.core_out(rid)])
    if ctx.keep is not None:
        region = tuple(r for r, k in zip(region, ctx.keep) if k)
        block = block.reshape([s for s, k in zip(block.shape, ctx.keep) if k])
    block = block.to(ctx.dtype)
    sink.write(region, block, unit=rid)
    return block.numel() * block.element_size()


def _incoming(ctx: TaskContext, rid) -> tuple[Optional[list], int]:
    """Tails owed to ``rid`` from the scratch store (None if one is missing)."""
    lay, spec = ctx.layout, ctx.spec
    out, nbytes = [], 0
    n = lay.nrange(rid)[1] - lay.nrange(rid)[0]
    for o, src in lay.backward_neighbours(rid):
        box = lay.tail_box(src, o)
        shape = (n, spec.channels, *[hi - lo for lo, hi in box])
        t = ctx.scratch.get(Scratch.tail_key(src, o), shape, spec.acc_dtype)
        if t is None:
            return None, nbytes
        nbytes += t.numel() * t.element_size()
        out.append((o, (box, t)))
    return out, nbytes


def _drop_incoming(ctx: TaskContext, rid) -> int:
    gone = 0
    n = ctx.layout.nrange(rid)[1] - ctx.layout.nrange(rid)[0]
    for o, src in ctx.layout.backward_neighbours(rid):
        box = ctx.layout.tail_box(src, o)
        ctx.scratch.delete(Scratch.tail_key(src, o))
        gone += n * ctx.spec.channels * int(np.prod([hi - lo for lo, hi in box])) * (
            _itemsize(ctx.spec.acc_dtype))
    return gone


def compute_task(ctx: TaskContext, payload: ModelPayload, rid: tuple, mode: str = "full") -> dict:
    """Run region ``rid``'s patches once; store its tails; finish it now if it can.

    Args:
        ctx: the scattered task context.
        payload: the scattered model payload.
        rid: the region id.
        mode: ``"full"``, or ``"tails"`` to rebuild only the outgoing tails of a region
            that is already finished (resume after the scratch store was lost).

    Returns:
        A stats dict; ``status`` is ``"finished"`` (written and recorded), ``"core"`` (its
        core waits in the scratch store for :func:`finish_task`), ``"tails"`` (tails only)
        or ``"skipped"`` (already finished: a task that ran twice).
    """
    t0 = _clock()
    rid = tuple(int(v) for v in rid)
    sink = _WorkerSink(ctx.out)
    if mode == "full" and sink.has(rid):
        return _stats(rid, mode, "skipped", t0)
    source = ctx.source.open()
    runner, calls = ctx.make_runner(payload)
    ext = ctx.layout.extent_in(rid)
    n0, n1 = ctx.layout.nrange(rid)
    in_bytes = 0
    if ext is not None:
        in_bytes = (n1 - n0) * source.shape[1] * int(np.prod([hi - lo for lo, hi in ext])) * (
            _itemsize(source.dtype))
    res = run_region(source, rid, ctx.layout, runner, tails_only=(mode == "tails"))
    ctx.fence()
    written = 0
    for o, (_, t) in sorted(res.tails.items()):
        written += ctx.scratch.put(Scratch.tail_key(rid, o), t)
    blk = ctx.layout.block_out(rid)
    acc_bytes = (n1 - n0) * ctx.spec.channels * int(np.prod([hi - lo for lo, hi in blk])) * (
        _itemsize(ctx.spec.acc_dtype))
    common = dict(patches=res.patches, model_calls=calls[0], bytes_read=in_bytes,
                  block_bytes=in_bytes + 2 * acc_bytes)
    if mode == "tails":
        ctx.scratch.mark(rid, b"tails")
        return _stats(rid, mode, "tails", t0, scratch_written=written, **common)
    back = ctx.layout.backward_neighbours(rid)
    if all(ctx.scratch.marker(src) is not None for _, src in back):
        tails_in, got = _incoming(ctx, rid)
        if tails_in is not None:
            ctx.scratch.mark(rid, b"tails")
            ctx.fence()
            core = finish_core(res, tails_in, ctx.layout, ctx.spec)
            nbytes = _write_region(ctx, sink, rid, core)
            gone = _drop_incoming(ctx, rid)
            return _stats(rid, mode, "finished", t0, bytes_written=nbytes,
                          scratch_written=written, scratch_read=got, scratch_deleted=gone,
                          **common)
        if sink.has(rid):  # a twin of this task finished it meanwhile
            return _stats(rid, mode, "skipped", t0, **common)
    written += ctx.scratch.put(Scratch.core_key(rid), res.core)
    ctx.scratch.mark(rid, b"core")
    return _stats(rid, mode, "core", t0, scratch_written=written, **common)


def finish_task(ctx: TaskContext, rid: tuple) -> dict:
    """Finish a region whose core waits in the scratch store (all its tails are there)."""
    t0 = _clock()
    rid = tuple(int(v) for v in rid)
    sink = _WorkerSink(ctx.out)
    if sink.has(rid):
        return _stats(rid, "finish", "skipped", t0)
    lay, spec = ctx.layout, ctx.spec
    n0, n1 = lay.nrange(rid)
    shape = (n1 - n0, spec.channels, *[hi - lo for lo, hi in lay.core_out(rid)])
    core = ctx.scratch.get(Scratch.core_key(rid), shape, spec.acc_dtype)
    tails_in, got = _incoming(ctx, rid)
    if core is None or tails_in is None:
        if sink.has(rid):
            return _stats(rid, "finish", "skipped", t0)
        raise QltyError(
            f"region {rid}: its {'core' if core is None else 'tails'} are missing from the "
            f"scratch store {ctx.scratch.store}; it was changed or removed during the run"
        )
    ctx.fence()
    core_bytes = core.numel() * core.element_size()
    total = finish_core(RegionResult(rid, core, {}, 0), tails_in, lay, spec)
    nbytes = _write_region(ctx, sink, rid, total)
    gone = _drop_incoming(ctx, rid) + core_bytes
    ctx.scratch.delete(Scratch.core_key(rid))
    got += core_bytes
    return _stats(rid, "finish", "finished", t0, bytes_written=nbytes, scratch_read=got,
                  scratch_deleted=gone)


def probe_task(ctx: TaskContext, payload: ModelPayload) -> dict:
    """Load the model on a worker, open the source, and fix the runner's output specs.

    Returns:
        ``specs``, ``structure``, the model fingerprint, the device types and the source's
        torch dtype, for the client to build the output.
    """
    from .executor import model_fingerprint, probe, run_settings

    source = ctx.source.open()
    runner, _ = ctx.make_runner(payload)
    nd = len(source.shape) - 2
    in_dtype = source.read((slice(0, 1), slice(0, 1), *[slice(0, 1)] * nd)).dtype
    plan = ctx.layout.plan
    # one model call per worker per (model, device, settings, geometry, input): a
    # long-lived cluster running many volumes does not pay it on every call
    key = (payload.key, str(runner.device), repr(sorted(ctx.settings.items(), key=str)),
           tuple(plan.shape), tuple(plan.window), tuple(plan.step), int(source.shape[1]),
           str(in_dtype))
    with _LOCK:
        hit = _PROBES.get(key)
    if hit is None:
        runner.specs = None
        probe(runner, source.shape[1], in_dtype)
        hit = (runner.specs, runner.structure, model_fingerprint(runner.model))
        with _LOCK:
            _PROBES[key] = hit
            while len(_PROBES) > 16:
                _PROBES.popitem(last=False)
    specs, structure, fp = hit
    return {"specs": specs, "structure": structure, "in_dtype": in_dtype,
            "worker": _where(), **run_settings(runner, fp)}


def payload_key(data: bytes) -> str:
    """sha256 (16 hex digits) of a payload."""
    return hashlib.sha256(data).hexdigest()[:16]
