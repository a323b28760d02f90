"""Command line interface: ``qlty-gpu <command> ...``.

Commands are registered in :data:`COMMANDS` (name -> function adding a subparser), so new
subcommands only add one entry.

Example:
    >>> import tempfile, pathlib, numpy as np, tifffile
    >>> d = pathlib.Path(tempfile.mkdtemp())
    >>> for i in range(2):
    ...     tifffile.imwrite(d / f"s_{i}.tif", np.zeros((8, 8), np.uint8))
    >>> main(["stack-to-zarr", str(d), str(d / "out"), "--dry-run", "--quiet"])
    s: 2 slices (counters 0..1), shape (2, 8, 8) ZYX uint8 -> ...s.zarr
    0
"""

from __future__ import annotations

import argparse
import contextlib
import io
import sys
import warnings
from collections.abc import Callable, Sequence

from .errors import QltyError

__all__ = ["main", "build_parser", "COMMANDS"]

DEFAULT_PATTERN = r"(.+?)[_-]?(\d+)\.[^.]+$"


def _parse_chunks(text: str) -> tuple[int, ...]:
    try:
        chunks = tuple(int(v) for v in text.split(","))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(
            f"--chunks must be comma-separated ints, got {text!r}"
        ) from exc
    return chunks


def _parse_floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from exc


def _add_stack_to_zarr(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "stack-to-zarr",
        help="convert folders of image slices (TIFF/PNG) to Zarr or OME-Zarr",
        description=(
            "Group the image files in DIR into stacks (by --pattern: group 1 = stack name, "
            "group 2 = slice counter) and write each stack to OUT as a Zarr v3 array, an "
            "OME-Zarr (NGFF 0.5) pyramid with --ome, or a Laplacian pyramid with --laplacian."
        ),
    )
    p.add_argument("directory", metavar="DIR", help="folder of image slices (not recursive)")
    p.add_argument("output", metavar="OUT", help="output folder for the stores")
    p.add_argument("--extension", "-e", default=".tif", help="file extension (default .tif)")
    p.add_argument(
        "--pattern",
        "-p",
        default=DEFAULT_PATTERN,
        help="regex with groups (name, counter), matched at the start of file names "
        f"(default {DEFAULT_PATTERN!r})",
    )
    kind = p.add_mutually_exclusive_group()
    kind.add_argument("--ome", action="store_true", help="write OME-Zarr (NGFF 0.5) pyramids")
    kind.add_argument("--laplacian", action="store_true", help="write Laplacian pyramids")
    p.add_argument("--levels", type=int, default=None, help="pyramid levels (default: automatic)")
    p.add_argument(
        "--axis-order", default="ZCYX", help="order for multi-channel stacks (default ZCYX)"
    )
    p.add_argument("--chunks", type=_parse_chunks, default=None, help="chunk shape, e.g. 1,512,512")
    p.add_argument("--dtype", default=None, help="stored dtype (default: the images')")
    p.add_argument("--downsample", choices=("2d", "3d"), default="2d", help="pyramid axes (OME)")
    p.add_argument(
        "--interpolation",
        choices=("bilinear", "bicubic", "nearest"),
        default="bilinear",
        help="upsampling of the Laplacian pyramid",
    )
    p.add_argument(
        "--voxel-size",
        type=_parse_floats,
        default=None,
        help="physical voxel size per stored axis, e.g. 2,0.5,0.5 (OME)",
    )
    p.add_argument("--unit", default=None, help="NGFF space unit, e.g. micrometer (OME)")
    p.add_argument("--normalize", action="store_true", help="store (x - mean) / std as float32")
    p.add_argument("--fill-gaps", action="store_true", help="z = counter - min; gaps become zeros")
    p.add_argument("--workers", type=int, default=None, help="reader threads (default: up to 8)")
    p.add_argument("--batch-size", type=int, default=None, help="slices per batch")
    p.add_argument("--dry-run", action="store_true", help="print the stacks found; write nothing")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    p.set_defaults(func=_run_stack_to_zarr)


def _run_stack_to_zarr(args: argparse.Namespace) -> int:
    from .utils import stack_to_zarr as s2z

    common = dict(
        output_dir=args.output,
        zarr_chunks=args.chunks,
        dtype=args.dtype,
        axis_order=args.axis_order,
        dry_run=args.dry_run,
        num_workers=args.workers,
        normalize=args.normalize,
        fill_gaps=args.fill_gaps,
        batch_size=args.batch_size,
    )
    verbose = not args.quiet
    if not (args.ome or args.laplacian):
        used = [
            f
            for f, v in (
                ("--levels", args.levels),
                ("--voxel-size", args.voxel_size),
                ("--unit", args.unit),
            )
            if v is not None
        ]
        if used:
            raise QltyError(f"{', '.join(used)} only apply to pyramids: add --ome or --laplacian")
    # the library prints qlty's gap report on stdout (kept for qlty compatibility); the CLI
    # reports gaps itself (warning on stderr, "missing counters" in the summary)
    with warnings.catch_warnings(record=True) as caught, contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("always")
        if args.ome:
            convert = s2z.stack_files_to_ome_zarr
            extra = dict(pyramid_levels=args.levels, downsample_mode=args.downsample,
                         voxel_size=args.voxel_size, unit=args.unit)
        elif args.laplacian:
            convert = s2z.stack_files_to_ome_zarr_laplacian
            extra = dict(pyramid_levels=args.levels, interpolation_mode=args.interpolation)
        else:
            convert, extra = s2z.stack_files_to_zarr, {}
        result = convert(
            args.directory, args.extension, args.pattern, verbose=verbose, **extra, **common
        )
    for w in caught:
        print(f"warning: {w.message}", file=sys.stderr)
    for name, info in result.items():
        lo, hi = info["counter_range"]
        dtype = info["dtype"]
        line = (
            f"{name}: {info['file_count']} slices (counters {lo}..{hi}), shape "
            f"{tuple(info['shape'])} {info['axis_order']} {dtype} -> {info['zarr_path']}"
        )
        if "pyramid_levels" in info:
            line += f" [{info['pyramid_levels']} levels]"
        if info.get("missing_counters"):
            line += f" missing counters {info['missing_counters']}"
        print(line)
    return 0


def _add_infer(sub: argparse._SubParsersAction) -> None:
    """``qlty-gpu infer``: implemented in :mod:`qlty_gpu.infer_cli`."""
    from .infer_cli import add_infer_parser

    add_infer_parser(sub)


#: Subcommand registry: name -> function that adds its subparser.
COMMANDS: dict[str, Callable[[argparse._SubParsersAction], None]] = {
    "stack-to-zarr": _add_stack_to_zarr,
    "infer": _add_infer,
}


def build_parser() -> argparse.ArgumentParser:
    """The ``qlty-gpu`` argument parser with every registered subcommand."""
    parser = argparse.ArgumentParser(prog="qlty-gpu", description="qlty_gpu command line tools")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for add in COMMANDS.values():
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit status (0 ok, 1 error, 2 usage).

    Args:
        argv: Arguments without the program name (default ``sys.argv[1:]``).
    """
    parser = build_parser()
    args = parser.parse_args(None if argv is None else list(argv))
    try:
        return int(args.func(args) or 0)
    except QltyError as exc:
        print(f"qlty-gpu {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"qlty-gpu {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
