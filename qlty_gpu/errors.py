"""One error family for the whole library.

Every error raised on bad user input is a :class:`QltyError` (a ``ValueError``), with a
message that names the argument, the value received and the form expected. Where qlty 1.5.0
pinned another exception type in its tests, a subclass also derives from that type so code
written against qlty keeps catching it.
"""

from __future__ import annotations

from typing import NoReturn

import torch

__all__ = [
    "QltyError",
    "QltyTypeError",
    "QltyShapeAssertionError",
    "QltyBackendError",
    "QltyDependencyError",
    "describe",
    "fail",
]


class QltyError(ValueError):
    """Base class of every error qlty_gpu raises for bad input or an impossible request."""


class QltyTypeError(QltyError, TypeError):
    """An argument of the wrong type (qlty raised ``TypeError`` here)."""


class QltyShapeAssertionError(QltyError, AssertionError):
    """A shape/count mismatch where qlty raised a bare ``AssertionError``."""


class QltyBackendError(QltyError, RuntimeError):
    """A compute backend was requested that cannot run on these inputs."""


class QltyDependencyError(QltyError, ImportError):
    """An optional dependency is missing; the message names the extra to install."""


def describe(value: object) -> str:
    """Short printable description of a value for error messages."""
    shape = getattr(value, "shape", None)
    if shape is not None and hasattr(value, "dtype"):
        return f"{type(value).__name__} of shape {tuple(shape)} and dtype {value.dtype}"
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def fail(cls: type[BaseException], message: str) -> NoReturn:
    """Raise ``cls(message)``, also from code traced by ``torch.compile(fullgraph=True)``.

    A plain ``raise`` inside traced code reaches the caller as dynamo's ``Unsupported``
    error with our message buried in its debug context. Under tracing, this raises an
    exception that is a ``cls`` *and* an ``AssertionError``, which dynamo lets through
    unchanged, so ``except QltyError`` still catches it and ``str(err)`` is our message.

    Example:
        >>> fail(QltyError, "window must be positive")
        Traceback (most recent call last):
        ...
        qlty_gpu.errors.QltyError: window must be positive
    """
    if torch.compiler.is_compiling():
        _raise_while_tracing(cls, message)
    raise cls(message)


_TRACEABLE: dict = {}


@torch._dynamo.assume_constant_result
def _raise_while_tracing(cls: type[BaseException], message: str) -> NoReturn:
    """Runs eagerly while dynamo traces (not traced itself): raise the pass-through twin."""
    twin = cls
    if not issubclass(cls, AssertionError):
        twin = _TRACEABLE.get(cls)
        if twin is None:
            twin = type(cls.__name__, (cls, AssertionError), {"__module__": cls.__module__})
            _TRACEABLE[cls] = twin
    raise twin(message)


def require(module: str, extra: str):
    """Import an optional dependency or raise :class:`QltyDependencyError` naming the extra.

    The one mechanism lives in :func:`qlty_gpu._optional.require`; this name is kept so
    ``from qlty_gpu.errors import require`` keeps working.
    """
    from ._optional import require as _require

    return _require(module, extra)
