"""Preparation for the Dask executor: client, source and model checks, region size, scratch.

Split from :mod:`qlty_gpu.stream.dask_executor` (which runs the tasks):

* :func:`check_client`, :func:`source_ref`, :func:`model_payload`: what the workers will
  need, checked on the client with clear errors (a closed client, data only this process
  can read, a model that cannot be pickled).
* :func:`task_bytes` / :func:`choose_region`: ``region="auto"`` — the largest region whose
  task fits a memory budget.
* :func:`scratch_path` / :func:`open_scratch`: the scratch store for halo tails next to the
  output (reused by ``resume=True`` when its settings match, never deleted when foreign).
"""

from __future__ import annotations

import math
import os
import shutil
from typing import Any

import numpy as np
import torch

from ..errors import QltyError, QltyTypeError, describe, require
from .dask_worker import ModelPayload, Scratch, SourceRef, payload_key
from .regions import RegionLayout

__all__ = ["check_client", "source_ref", "model_payload", "task_bytes", "choose_region",
           "default_budget", "scratch_path", "open_scratch", "is_memory_store"]

SCRATCH_KIND = "qlty_gpu.stream.scratch"


def check_client(client: Any) -> Any:
    require("distributed", "dask")
    from distributed import Client

    if not isinstance(client, Client):
        raise QltyTypeError(f"client must be a dask.distributed.Client, got {describe(client)}")
    if client.status != "running":
        raise QltyError(
            f"client is {client.status!r}, not running: the Dask client was closed or lost its "
            "scheduler; connect a new Client (resume=True continues a killed run)"
        )
    try:
        info = client.scheduler_info()
    except Exception as exc:  # noqa: BLE001 - any comm failure means the scheduler is gone
        raise QltyError(f"the Dask scheduler of {client!r} cannot be reached: {exc}") from exc
    if not info.get("workers"):
        try:
            client.wait_for_workers(1, timeout=60)
        except Exception as exc:  # noqa: BLE001 - timeout or comm failure
            raise QltyError(f"the Dask cluster of {client!r} has no workers (waited 60 s)") from exc
        info = client.scheduler_info()
    return info


def is_memory_store(store: Any) -> bool:
    return type(store).__name__ in ("MemoryStore", "GpuMemoryStore")


def model_payload(model: Any) -> ModelPayload:
    import inspect

    import cloudpickle

    if isinstance(model, (str, os.PathLike)):
        path = os.path.abspath(os.fspath(model))
        if not path.endswith(".pt2") or not os.path.isfile(path):
            raise QltyError(
                f"model given as a path must be an existing torch.export .pt2 file, got {path!r}"
            )
        with open(path, "rb") as f:
            key = payload_key(f.read())
        return ModelPayload("pt2", key, path, os.path.basename(path))
    if not callable(model):
        raise QltyTypeError(
            f"model must be an nn.Module, a callable, a zero-argument factory or a .pt2 path; "
            f"got {describe(model)}"
        )
    kind = "pickle"
    if not isinstance(model, torch.nn.Module):
        try:
            sig = inspect.signature(model)
            required = [p for p in sig.parameters.values()
                        if p.default is p.empty and p.kind in (p.POSITIONAL_ONLY,
                                                               p.POSITIONAL_OR_KEYWORD)]
            if not required and not any(p.kind == p.VAR_POSITIONAL
                                        for p in sig.parameters.values()):
                kind = "factory"
        except (TypeError, ValueError):
            pass
    try:
        data = cloudpickle.dumps(model)
    except Exception as exc:  # noqa: BLE001 - whatever pickling raises
        raise QltyError(
            f"model {describe(model)} cannot be pickled for the Dask workers "
            f"({type(exc).__name__}: {exc}); pass a zero-argument factory that builds it on "
            "each worker, or a torch.export .pt2 path"
        ) from exc
    name = getattr(model, "__qualname__", type(model).__qualname__)
    return ModelPayload(kind, payload_key(data), data, name)


def source_ref(x: Any) -> tuple[SourceRef, Any, Any]:
    """(reference the workers open, client-side view, OME metadata)."""
    import cloudpickle

    from .ome_io import open_input
    from .sources import as_source

    if isinstance(x, (torch.Tensor, np.ndarray)) or type(x).__module__.startswith("h5py"):
        raise QltyTypeError(
            f"x must be data every Dask worker can open — a Zarr / OME-Zarr path on a shared "
            f"file system, or a Zarr array on such a store — got {describe(x)}; write it to "
            "Zarr first (qlty_gpu.infer without client= takes in-memory data)"
        )
    obj, ome = open_input(x)
    src = as_source(obj, "x")
    if isinstance(x, (str, os.PathLike)):
        path = os.path.abspath(os.fspath(x))
        return SourceRef(f"path:{path}", tuple(src.shape), path=path, name=repr(path)), src, ome
    if is_memory_store(getattr(x, "store", None)):
        raise QltyError(
            f"x is a Zarr array in this process's memory ({describe(x)}); Dask workers cannot "
            "read it: write it to a store every worker can reach"
        )
    try:
        data = cloudpickle.dumps(x)
    except Exception as exc:  # noqa: BLE001
        raise QltyError(
            f"x ({describe(x)}) cannot be shipped to the Dask workers ({type(exc).__name__}: "
            f"{exc}); pass a Zarr path or a Zarr array on a shared store"
        ) from exc
    return SourceRef(f"obj:{payload_key(data)}", tuple(src.shape), obj=x, name=describe(x)), src, ome


# ------------------------------------------------------------------ region size
def task_bytes(layout: RegionLayout, channels: int, k: int, in_itemsize: int,
               acc_itemsize: int, batch_size: int) -> int:
    """Estimated peak bytes of one region task (input block, accumulator, core and tails
    copies, one batch of windows and outputs). The model's own activations come on top.
    """
    plan = layout.plan
    ext = [r + w for r, w in zip(layout.region, plan.window)]
    blk = [int((r + w) * f) for r, w, f in zip(layout.region, plan.window, layout.scale)]
    w_out = [int(w * f) for w, f in zip(plan.window, layout.scale)]
    n = layout.n_block
    inp = n * channels * math.prod(ext) * in_itemsize
    acc = n * k * math.prod(blk) * acc_itemsize
    batch = batch_size * (channels * math.prod(plan.window) + k * math.prod(w_out)) * 4
    return inp + 2 * acc + 2 * batch


def choose_region(plan_out_shape, chunks, base: tuple[int, ...], fits) -> tuple[int, ...]:
    """Grow ``base`` (chunks per region) one chunk at a time, the axis with the smallest
    extent first, while ``fits(region_chunks)`` holds and the region fits in the volume.

    Example:
        >>> choose_region((64, 48), (8, 8), (1, 1), lambda rc: rc[0] * rc[1] <= 6)
        (2, 3)
    """
    cur = list(base)
    limit = [max(1, -(-d // c)) for d, c in zip(plan_out_shape, chunks)]
    while True:
        order = sorted(range(len(cur)), key=lambda a: (cur[a] * chunks[a], -a))
        for ax in order:
            if cur[ax] >= limit[ax]:
                continue
            trial = list(cur)
            trial[ax] += 1
            if fits(tuple(trial)):
                cur = trial
                break
        else:
            return tuple(cur)


def default_budget(info: dict) -> int:
    per = []
    for w in info.get("workers", {}).values():
        lim = int(w.get("memory_limit") or 0)
        if lim:
            per.append(lim // max(1, int(w.get("nthreads", 1))))
    return max(64 << 20, min(per) // 4) if per else 1 << 30


# ------------------------------------------------------------------ scratch
def scratch_path(out: Any, given: Any) -> str:
    if given is not None:
        if not isinstance(given, (str, os.PathLike)):
            raise QltyTypeError(f"scratch must be a path every worker can reach, got {describe(given)}")
        return os.path.abspath(os.fspath(given))
    if isinstance(out, (str, os.PathLike)):
        return os.path.abspath(os.fspath(out)).rstrip(os.sep) + ".qlty-scratch"
    root = getattr(out.store, "root", None)
    if type(out.store).__name__ != "LocalStore" or root is None:
        raise QltyError(
            f"out is a Zarr array on {type(out.store).__name__}; pass scratch= (a path every "
            "worker can reach) for the halo tails"
        )
    base = os.path.join(os.fspath(root), out.path) if out.path else os.fspath(root)
    return base.rstrip(os.sep) + ".qlty-scratch"


def open_scratch(path: str, fingerprint: dict, resume: bool) -> tuple[Scratch, dict]:
    import zarr

    from .store import fingerprint_diff

    if os.path.lexists(path):
        mark = None
        try:
            mark = dict(zarr.open_group(path, mode="r").attrs).get(SCRATCH_KIND)
        except Exception:  # noqa: BLE001 - not a Zarr group: foreign
            mark = None
        if not isinstance(mark, dict):
            raise QltyError(
                f"scratch path {path!r} exists and is not a qlty_gpu scratch store; it is never "
                "deleted: remove it or pass scratch= elsewhere"
            )
        if resume and not fingerprint_diff(mark.get("fingerprint", {}), fingerprint):
            g = zarr.open_group(path, mode="r+")
            s = Scratch(g.store, "")
            return s, s.markers()
        shutil.rmtree(path)
    g = zarr.open_group(path, mode="w", attributes={SCRATCH_KIND: {"fingerprint": fingerprint}})
    return Scratch(g.store, ""), {}
