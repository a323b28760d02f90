"""``qlty-gpu infer MODEL IN OUT``: sliding-window inference of a saved model, Zarr to Zarr.

MODEL is a ``torch.export`` program (``.pt2``, saved with :func:`torch.export.save`) or a
TorchScript file (``torch.jit.save``); IN a Zarr array or OME-Zarr group, ``(N, C, *S)``
or NGFF ``[t][c](z)yx``; OUT the Zarr (OME-Zarr for an OME input) output path.

Example (shell)::

    qlty-gpu infer unet.pt2 scan.ome.zarr seg.ome.zarr --window 64,64,64 --step 32 \\
        --batch-size 8 --weight gaussian --reduce argmax --device cuda
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from .errors import QltyError

__all__ = ["add_infer_parser", "load_model"]


def _ints(text: str) -> Any:
    try:
        vals = tuple(int(v) for v in text.split(","))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected an int or comma-separated ints, got {text!r}") from exc
    return vals[0] if len(vals) == 1 else vals


def load_model(path: str, device: Any = None) -> Any:
    """Load a ``.pt2`` exported program (as a module) or a TorchScript file.

    Raises:
        QltyError: a missing file, or one that is neither format.
    """
    import torch

    if not os.path.isfile(path):
        raise QltyError(f"MODEL {path!r} does not exist")
    errors = []
    if path.endswith(".pt2"):
        try:
            module = torch.export.load(path).module()
        except Exception as exc:  # noqa: BLE001 - report which loaders failed
            raise QltyError(f"cannot load {path!r} as a torch.export program: {exc}") from exc
        return module.to(device) if device is not None else module
    try:
        return torch.jit.load(path, map_location=device)
    except Exception as exc:  # noqa: BLE001
        errors.append(f"TorchScript: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
    try:
        module = torch.export.load(path).module()
        return module.to(device) if device is not None else module
    except Exception as exc:  # noqa: BLE001
        errors.append(f"torch.export: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
    raise QltyError(
        f"MODEL {path!r} is neither a torch.export program (.pt2) nor a TorchScript file ("
        + "; ".join(errors) + ")"
    )


def add_infer_parser(sub: argparse._SubParsersAction) -> None:
    """Add the ``infer`` subcommand."""
    p = sub.add_parser(
        "infer",
        help="sliding-window inference of a .pt2 / TorchScript model, Zarr in -> Zarr out",
        description=(
            "Run MODEL over every window of IN (a Zarr array (N, C, [Z,] Y, X) or an "
            "OME-Zarr group), blend the overlapping predictions and write OUT region by "
            "region (memory bounded by the region size; --resume continues a killed run)."
        ),
    )
    p.add_argument("model", metavar="MODEL", help="torch.export program (.pt2) or TorchScript file")
    p.add_argument("input", metavar="IN", help="input Zarr array or OME-Zarr group")
    p.add_argument("output", metavar="OUT", help="output path (OME-Zarr for an OME input)")
    p.add_argument("--window", type=_ints, required=True, help="window, e.g. 64 or 32,64,64")
    p.add_argument("--step", type=_ints, default=None, help="step (default window // 2)")
    p.add_argument("--batch-size", type=int, default=8, help="windows per model call (8)")
    p.add_argument("--weight", choices=("constant", "gaussian", "hann"), default="gaussian",
                   help="blending weight (default gaussian)")
    p.add_argument("--sigma", type=float, default=0.125, help="gaussian sigma / window")
    p.add_argument("--reduce", choices=("argmax", "softmax"), default=None,
                   help="write class maps (argmax) or probabilities instead of logits")
    p.add_argument("--device", default=None, help="model device, e.g. cuda (default: cuda if "
                   "available, else cpu)")
    p.add_argument("--amp", action="store_true", help="run the model under autocast")
    p.add_argument("--chunks", type=_ints, default=None, help="output spatial chunk shape")
    p.add_argument("--region-chunks", type=_ints, default=None, help="output chunks per region")
    p.add_argument("--out-dtype", default=None, help="stored dtype, e.g. float16")
    p.add_argument("--no-pad", action="store_true",
                   help="do not pad the last batch (padding keeps one batch shape, which a "
                   ".pt2 exported with a static batch size needs)")
    p.add_argument("--resume", action="store_true", help="continue a killed run")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    p.add_argument("--scheduler", metavar="ADDRESS", default=None,
                   help="run the regions on a Dask cluster (e.g. tcp://host:8786); IN, OUT "
                        "and MODEL must be on storage every worker reaches")
    p.set_defaults(func=run_infer)


def _script_factory(path: str) -> Any:
    """Zero-argument factory shipped to Dask workers for a TorchScript MODEL."""
    model = load_model(path)
    return model.eval() if hasattr(model, "eval") else model


def _dask(args: argparse.Namespace) -> tuple:
    """(client, device, model) for ``--scheduler``: the workers load MODEL themselves."""
    import functools

    from .errors import require

    distributed = require("distributed", "dask")
    if not os.path.isfile(args.model):
        raise QltyError(f"MODEL {args.model!r} does not exist")
    try:
        client = distributed.Client(args.scheduler, timeout=30)
    except Exception as exc:  # noqa: BLE001 - any connection failure
        raise QltyError(f"--scheduler {args.scheduler!r}: cannot connect to a Dask scheduler "
                        f"({type(exc).__name__}: {exc})") from exc
    path = os.path.abspath(args.model)
    model = path if path.endswith(".pt2") else functools.partial(_script_factory, path)
    return client, args.device, model  # device None: each worker's GPU, else its CPU


def run_infer(args: argparse.Namespace) -> int:
    """Run the ``infer`` subcommand."""
    import torch

    from .infer import infer

    client = None
    if getattr(args, "scheduler", None):
        client, device, model = _dask(args)
    else:
        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        model = load_model(args.model, device)
        if isinstance(model, torch.jit.ScriptModule):
            model.eval()  # an exported program's module keeps the mode it was exported in
    out_dtype = None
    if args.out_dtype is not None:
        out_dtype = getattr(torch, args.out_dtype, None)
        if not isinstance(out_dtype, torch.dtype):
            raise QltyError(f"--out-dtype must be a torch dtype name such as float16, got {args.out_dtype!r}")
    try:
        out = infer(
            model, args.input, args.window, args.step, out=args.output,
            batch_size=args.batch_size, weight=args.weight, sigma=args.sigma,
            reduce=args.reduce, device=device, amp=args.amp, chunks=args.chunks,
            region_chunks=args.region_chunks, out_dtype=out_dtype,
            pad_last_batch=not args.no_pad, resume=args.resume, overwrite=args.overwrite,
            progress=not args.quiet, **({"client": client} if client is not None else {}),
        )
    finally:
        if client is not None:
            client.close()
    info = dict(out.attrs).get("qlty_gpu", {})
    line = (f"{args.input} -> {args.output}: shape {tuple(out.shape)} {out.dtype}, "
            f"{info.get('patches_run', '?')} patches in {info.get('seconds', '?')} s")
    if info.get("resumed"):
        line += f" (resumed; {info.get('patches_rerun', 0)} patches ran again to rebuild tails)"
    print(line)
    sys.stdout.flush()
    return 0
