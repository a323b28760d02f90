"""Streaming sliding-window inference: windows -> model -> fused weighted accumulate.

:func:`infer` runs a model over every window of an image batch (or of a Zarr / HDF5 /
memmap volume) and blends the overlapping predictions with a weight scheme, without ever
holding all patches: ``batch_size`` windows are gathered with the fused unstitch op, the
model runs on them, and its outputs are weighted and summed into an fp32 accumulator with
the fused stitch op; at the end each pixel is divided by its weight sum (see
:mod:`qlty_gpu.weights` for the schemes and their exact sums).

In memory this is the region engine of :mod:`qlty_gpu.stream` with a single region; with
``out=`` (a Zarr array or path) or a non-tensor source it runs region by region through
:func:`qlty_gpu.stream.executor.infer_to_store`, so memory is bounded by the region size.

Example:
    >>> import torch
    >>> from qlty_gpu import infer
    >>> x = torch.randn(2, 3, 40, 30)
    >>> conv = torch.nn.Conv2d(3, 5, 3, padding=1)
    >>> y = infer(conv, x, window=16, step=8, batch_size=7, weight="gaussian")
    >>> y.shape, y.dtype
    (torch.Size([2, 5, 40, 30]), torch.float32)
"""

from __future__ import annotations

import contextlib
import numbers
from collections.abc import Callable
from typing import Any, Optional, Union

import numpy as np
import torch

from .errors import QltyError, QltyTypeError, describe, require
from .geometry import QuiltPlan
from .stream.runner import PatchRunner, unflatten

__all__ = ["infer", "apply_reduce", "REDUCTIONS"]

REDUCTIONS = ("argmax", "softmax")
Reduce = Union[None, str, Callable[[torch.Tensor], torch.Tensor]]


def _device(name: str, value: Any) -> Optional[torch.device]:
    if value is None:
        return None
    try:
        return torch.device(value)
    except (RuntimeError, TypeError) as exc:
        raise QltyError(f"{name} must be a torch device such as 'cuda' or 'cpu', got {value!r}") from exc


def _model_device(model: Any) -> Optional[torch.device]:
    if isinstance(model, torch.nn.Module):
        for p in model.parameters():
            return p.device
        for b in model.buffers():
            return b.device
    return None


def _amp_dtype(amp: Any, device: torch.device) -> Optional[torch.dtype]:
    if amp is None or amp is False:
        return None
    if amp is True:
        return torch.float16 if device.type == "cuda" else torch.bfloat16
    if isinstance(amp, torch.dtype) and amp in (torch.float16, torch.bfloat16):
        return amp
    raise QltyError(f"amp must be a bool, torch.float16 or torch.bfloat16, got {amp!r}")


def check_reduce(reduce: Reduce) -> Reduce:
    """Validate a ``reduce`` argument (None, 'argmax', 'softmax' or a callable)."""
    if reduce is None or callable(reduce) or reduce in REDUCTIONS:
        return reduce
    raise QltyError(
        f"reduce must be None, one of {REDUCTIONS} or a callable on (n, K, *chunk) tensors, "
        f"got {reduce!r}"
    )


def apply_reduce(t: torch.Tensor, reduce: Reduce) -> torch.Tensor:
    """Apply a reduction to a normalised block ``(n, K, *spatial)``.

    ``"argmax"`` gives ``(n, 1, *spatial)`` int64 class indices, ``"softmax"`` the class
    probabilities over the channel axis, a callable whatever it returns (it must keep ``n``
    and the spatial shape).
    """
    if reduce is None:
        return t
    if reduce == "argmax":
        return t.argmax(dim=1, keepdim=True)
    if reduce == "softmax":
        return torch.softmax(t, dim=1)
    r = reduce(t)
    if not isinstance(r, torch.Tensor) or r.dim() != t.dim() or r.shape[0] != t.shape[0] or (
        r.shape[2:] != t.shape[2:]
    ):
        raise QltyError(
            f"reduce callable must return a tensor (n, K', *spatial) for a block of shape "
            f"{tuple(t.shape)}, got {describe(r)}"
        )
    return r


def _progress(progress: bool, total: int, desc: str):
    if not progress:
        return contextlib.nullcontext(None)
    tqdm = require("tqdm", "io")
    return tqdm.tqdm(total=total, desc=desc, unit="patch")


def make_runner(
    model: Callable,
    plan: QuiltPlan,
    n_img: int,
    *,
    source_device: torch.device,
    weight: Any,
    sigma: float,
    border: Any,
    border_weight: float,
    batch_size: int,
    device: Any,
    accumulate_device: Any,
    amp: Any,
    model_dtype: Optional[torch.dtype],
    pad_last_batch: bool,
    grad: bool,
    backend: Optional[str],
) -> PatchRunner:
    """Validate the common inference settings and build a :class:`PatchRunner`."""
    if not callable(model):
        raise QltyTypeError(f"model must be callable (B, C, *window) -> (B, K, ...), got {describe(model)}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral) or batch_size < 1:
        raise QltyError(f"batch_size must be an int >= 1, got {batch_size!r}")
    dev = _device("device", device) or _model_device(model) or source_device
    acc_dev = _device("accumulate_device", accumulate_device) or source_device
    if model_dtype is not None and not (
        isinstance(model_dtype, torch.dtype) and model_dtype.is_floating_point
    ):
        raise QltyError(f"model_dtype must be a floating torch dtype or None, got {model_dtype!r}")
    kwargs = dict(border=border, border_weight=border_weight, sigma=sigma)
    from .weights import resolve_weight

    if not isinstance(weight, (torch.Tensor, np.ndarray)):  # tensors: checked per output
        resolve_weight(weight, plan.window, **kwargs)
    key = (plan, int(n_img), str(dev), str(acc_dev), weight if isinstance(weight, str) else "t")
    return PatchRunner(
        model, plan, weight, kwargs, int(batch_size), dev, acc_dev,
        amp=_amp_dtype(amp, dev), model_dtype=model_dtype, pad_last_batch=bool(pad_last_batch),
        grad=bool(grad), backend=backend, remember_key=key,
    )


def infer(
    model: Callable,
    x: Any,
    window: Union[int, tuple[int, ...]],
    step: Union[int, tuple[int, ...], None] = None,
    *,
    batch_size: int = 8,
    weight: Any = "constant",
    sigma: float = 0.125,
    border: Any = None,
    border_weight: float = 1.0,
    device: Any = None,
    accumulate_device: Any = None,
    amp: Any = False,
    model_dtype: Optional[torch.dtype] = None,
    out_dtype: Optional[torch.dtype] = None,
    pad_last_batch: bool = False,
    progress: bool = False,
    grad: bool = False,
    reduce: Reduce = None,
    out: Any = None,
    backend: Optional[str] = None,
    client: Any = None,
    **store_options: Any,
) -> Any:
    """Sliding-window inference of ``model`` over ``x`` with weighted blending.

    Args:
        model: callable taking windows ``(B, C, *window)`` and returning ``(B, K,
            *window')`` — ``K`` channels, any dtype, and a spatial scale ``window' /
            window`` that maps the patch grid onto whole pixels — or a tuple / dict of such
            tensors (the result is then a tuple / dict).
        x: images ``(N, C, Y, X)`` or volumes ``(N, C, Z, Y, X)``: a torch tensor or numpy
            array (in memory), or any array-like (Zarr, HDF5, memmap) for the region path.
        window: window size, an int or one per spatial axis.
        step: step between windows (default ``window // 2``, at least 1); the last window
            on each axis is clamped to the edge.
        batch_size: windows per model call.
        weight: ``"constant"`` (default), ``"border"``, ``"gaussian"``, ``"hann"`` or a
            window-shaped tensor (see :mod:`qlty_gpu.weights`).
        sigma: gaussian sigma as a fraction of the window.
        border, border_weight: qlty's frame for ``weight="border"``.
        device: where windows go and the model runs (default: the model's parameters'
            device, else the input's).
        accumulate_device: where the output is accumulated (default: the input's device).
        amp: run the model under ``torch.autocast`` (True: float16 on CUDA, bfloat16 on
            CPU; or that dtype); accumulation stays float32.
        model_dtype: cast windows to this dtype before the model (for a ``.half()`` model).
        out_dtype: result dtype (default: the accumulation dtype, float32 — float64 for a
            float64 model).
        pad_last_batch: pad a short last batch with zero windows to ``batch_size`` so the
            model (``torch.compile``, CUDA graphs) sees a single shape.
        progress: show a tqdm progress bar (needs the ``io`` extra).
        grad: keep autograd on (gradients flow to the model's parameters); default off.
        reduce: ``None``, ``"argmax"`` (int64 ``(N, 1, *S)`` class map), ``"softmax"``, or a
            callable applied to each normalised block ``(n, K, *s)``.
        out: a Zarr array or path: write there region by region (see
            :func:`qlty_gpu.stream.executor.infer_to_store` for ``store_options`` such as
            ``chunks``, ``region_chunks``, ``resume``, ``overwrite``).
        backend: force a compute backend for the unstitch/stitch ops.
        client: a ``dask.distributed.Client``: run the regions as Dask tasks on its workers
            (needs ``out=``; ``x`` a Zarr/OME-Zarr path or array the workers can open; see
            :func:`qlty_gpu.stream.dask_executor.infer_distributed` for ``region="auto"``,
            ``memory_budget``, ``scratch``, ``max_in_flight``). Returns the output array;
            its ``attrs['qlty_gpu']['report']`` holds the run's report.

    Returns:
        The blended result ``(N, K, *S')`` (``S' = S * scale``), a tuple or dict of them for
        such models; with ``out=``, the output Zarr array.

    Raises:
        QltyError: bad arguments, or a model output that does not fit the window grid.
    """
    if client is not None:
        from .stream.dask_executor import infer_distributed

        return infer_distributed(
            model, x, window, step, client=client, out=out, batch_size=batch_size,
            weight=weight, sigma=sigma, border=border, border_weight=border_weight,
            device=device, accumulate_device=accumulate_device, amp=amp,
            model_dtype=model_dtype, out_dtype=out_dtype, pad_last_batch=pad_last_batch,
            progress=progress, grad=grad, reduce=reduce, backend=backend, **store_options,
        ).array
    if out is None and not isinstance(x, (torch.Tensor, np.ndarray)):
        from .stream.ome_io import open_input
        from .stream.sources import as_source

        x = as_source(open_input(x)[0], "x").read()
    if out is not None:
        from .stream.executor import infer_to_store

        return infer_to_store(
            model, x, window, step, out=out, batch_size=batch_size, weight=weight,
            sigma=sigma, border=border, border_weight=border_weight, device=device,
            accumulate_device=accumulate_device, amp=amp, model_dtype=model_dtype,
            out_dtype=out_dtype, pad_last_batch=pad_last_batch, progress=progress, grad=grad,
            reduce=reduce, backend=backend, **store_options,
        )
    if store_options:
        raise QltyError(
            f"{sorted(store_options)} only apply when writing to a store (out=...); unknown "
            f"keyword arguments for in-memory infer"
        )
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(x)
    if x.dim() not in (4, 5):
        raise QltyError(f"x must have shape (N, C, Y, X) or (N, C, Z, Y, X), got {describe(x)}")
    plan = make_plan(x.shape[2:], window, step)
    reduce = check_reduce(reduce)
    runner = make_runner(
        model, plan, x.shape[0], source_device=x.device, weight=weight, sigma=sigma,
        border=border, border_weight=border_weight, batch_size=batch_size, device=device,
        accumulate_device=accumulate_device, amp=amp, model_dtype=model_dtype,
        pad_last_batch=pad_last_batch, grad=grad, backend=backend,
    )
    return run_in_memory(runner, x, reduce=reduce, out_dtype=out_dtype, progress=progress)


def make_plan(spatial, window, step) -> QuiltPlan:
    """The input plan; ``step=None`` means half the window (at least 1)."""
    nd = len(spatial)
    if step is None:
        if isinstance(window, numbers.Integral) and not isinstance(window, bool):
            step = max(1, int(window) // 2)
        elif isinstance(window, (tuple, list)):
            step = tuple(max(1, int(w) // 2) if isinstance(w, numbers.Integral) else w for w in window)
    plan = QuiltPlan(tuple(int(d) for d in spatial), window, step)
    if plan.ndim != nd:  # pragma: no cover - QuiltPlan enforces it
        raise QltyError(f"window must have {nd} elements")
    return plan


def run_in_memory(
    runner: PatchRunner,
    x: torch.Tensor,
    *,
    reduce: Reduce = None,
    out_dtype: Optional[torch.dtype] = None,
    progress: bool = False,
) -> Any:
    """The in-memory path: the whole image batch is one region (no tails)."""
    plan = runner.plan
    n_img = x.shape[0]

    def alloc(specs):
        accs = [runner.zeros((n_img, s.channels, *s.plan.shape), s.acc_dtype) for s in specs]
        return accs, [(0,) * plan.ndim] * len(specs)

    with _progress(progress, n_img * plan.patches_per_image, "infer") as bar:
        runner.progress = bar
        try:
            accs = runner.accumulate(
                x, (0,) * plan.ndim, (0, n_img), [(0, c) for c in plan.counts], alloc
            )
        finally:
            runner.progress = None
    runner.finish()
    results = []
    for acc, spec in zip(accs, runner.specs):
        if runner.grad:
            res = acc / spec.weight.norm(spec.plan, device=acc.device, dtype=acc.dtype)
        else:
            res = spec.weight.normalize_(acc, spec.plan)
        res = apply_reduce(res, reduce)
        if out_dtype is not None and res.dtype != out_dtype:
            res = res.to(out_dtype)
        results.append(res)
    return unflatten(results, runner.structure)
