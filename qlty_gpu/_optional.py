"""Optional dependencies: one way to import them ("our error names the extra").

Heavy or optional packages (tifffile, Pillow, tqdm, dask, h5py, umap, cuml, kvikio, ...)
are imported where they are used, through :func:`require` (the feature cannot work without
the package: raise :class:`~qlty_gpu.errors.QltyDependencyError` naming the pip extra) or
:func:`optional` (the package is one of several ways to do the job: ``None`` when missing).

Example:
    >>> require("json", "io").dumps([1])
    '[1]'
    >>> optional("no_such_module_xyz") is None
    True
"""

from __future__ import annotations

import importlib
from types import ModuleType

from .errors import QltyDependencyError

__all__ = ["require", "optional"]


def require(module: str, extra: str) -> ModuleType:
    """Import ``module`` or raise :class:`~qlty_gpu.errors.QltyDependencyError`.

    Args:
        module: Dotted module name, e.g. ``"dask.array"``.
        extra: The ``qlty_gpu`` pip extra that installs it, e.g. ``"io"``.

    Returns:
        The imported module.

    Raises:
        QltyDependencyError: (an ``ImportError``) naming the module and
            ``pip install 'qlty_gpu[<extra>]'``.
    """
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise QltyDependencyError(
            f"this feature needs the optional package {module!r}: "
            f"pip install 'qlty_gpu[{extra}]' ({exc})"
        ) from exc


def optional(module: str) -> ModuleType | None:
    """Import ``module``, or return ``None`` when it is not installed.

    For packages that are one of several ways to do a job (tifffile or Pillow for TIFF,
    tqdm for a progress bar); the caller raises (via :func:`require`'s message style) only
    when no way is left.
    """
    try:
        return importlib.import_module(module)
    except ImportError:
        return None
