"""All-or-nothing stores: write under a temporary name, rename into place when complete.

* :func:`atomic_store` / :func:`atomic_zarr_store` write ``<name>.partial-<pid>`` and rename
  it to ``<name>`` on success. On failure they wait for every write still in flight (zarr
  writes chunks concurrently; after a disk-full error the others would otherwise recreate
  chunks after the removal), then remove the partial store.
* Partial stores left by a process that died (killed, power cut) are removed on the next
  run when their writer mark says they are ours (this host, a process that is gone), and
  listed in a warning otherwise.
* :func:`check_output` refuses an output that is, contains or lies inside an input, and a
  folder that is not a store qlty_gpu wrote unless told to overwrite.

Example:
    >>> import tempfile, pathlib
    >>> target = pathlib.Path(tempfile.mkdtemp()) / "s.zarr"
    >>> with atomic_store(target) as tmp:
    ...     _ = tmp.mkdir()
    >>> target.is_dir()
    True
"""

from __future__ import annotations

import contextlib
import errno
import glob
import json
import os
import shutil
import socket
import threading
import warnings
from collections.abc import Collection, Iterable, Iterator
from pathlib import Path

from ..errors import QltyError

__all__ = [
    "atomic_store",
    "atomic_zarr_store",
    "partial_name",
    "mark_writer",
    "is_own_store",
    "check_output",
    "GuardedStore",
    "StalePartialWarning",
]

#: File inside a partial store naming its writer (host, pid); removed before the rename.
WRITER_MARK = ".qlty_gpu-writer.json"
#: Seconds to wait for in-flight writes after a failure before removing the partial store.
DRAIN_TIMEOUT = 120.0


class StalePartialWarning(UserWarning):
    """A partial store of another (possibly running) conversion sits next to the output."""


def partial_name(path: str | os.PathLike) -> Path:
    """The temporary sibling a store is written under before it is renamed into place.

    Example:
        >>> partial_name("/data/a.ome.zarr").name.startswith("a.ome.zarr.partial-")
        True
    """
    path = Path(path)
    return path.with_name(f"{path.name}.partial-{os.getpid()}")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        with contextlib.suppress(OSError):
            path.unlink()


def mark_writer(tmp: str | os.PathLike) -> None:
    """Record this host and process in a partial store (so a later run can clean it up)."""
    with contextlib.suppress(OSError):
        Path(tmp, WRITER_MARK).write_text(
            json.dumps({"host": socket.gethostname(), "pid": os.getpid()})
        )


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # exists, owned by someone else
    return True


def _clean_stale_partials(path: Path) -> None:
    """Remove our dead partial stores of ``path``; warn about any other one."""
    listed = []
    for cand in map(Path, glob.glob(glob.escape(str(path)) + ".partial-*")):
        pid_text = cand.name.rsplit("-", 1)[-1]
        if not pid_text.isdigit():
            continue
        pid = int(pid_text)
        mine = pid == os.getpid()
        if not mine:
            try:
                mark = json.loads((cand / WRITER_MARK).read_text())
                mine = mark.get("host") == socket.gethostname() and not _pid_alive(pid)
            except (OSError, ValueError, AttributeError):
                mine = False
        if mine:
            _remove(cand)
        else:
            listed.append(cand)
    if listed:
        names = ", ".join(str(p) for p in listed)
        warnings.warn(
            f"partial store(s) {names} of another conversion found next to {path}: remove "
            "them if no conversion is writing there (they are not read or replaced)",
            StalePartialWarning,
            stacklevel=4,
        )


@contextlib.contextmanager
def atomic_store(path: str | os.PathLike) -> Iterator[Path]:
    """Write a store under a temporary sibling name and rename it to ``path`` on success.

    On any exception (including ``KeyboardInterrupt``) the partial store is removed and
    ``path`` is left as it was; a process killed outright leaves only a
    ``*.partial-<pid>`` folder, never something named like a finished store, and the next
    run removes it. An existing ``path`` is replaced only once the new store is complete.

    Args:
        path: Final location of the store.

    Yields:
        The temporary path to write to.
    """
    path = Path(path)
    tmp = partial_name(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _clean_stale_partials(path)
    _remove(tmp)
    try:
        yield tmp
    except BaseException:
        _remove(tmp)
        raise
    with contextlib.suppress(OSError):
        (tmp / WRITER_MARK).unlink()
    old = None
    if path.exists() or path.is_symlink():
        old = path.with_name(f"{path.name}.old-{os.getpid()}")
        _remove(old)
        os.replace(path, old)
    try:
        os.replace(tmp, path)
    except BaseException:
        if old is not None:
            os.replace(old, path)
        _remove(tmp)
        raise
    if old is not None:
        _remove(old)


# --------------------------------------------------------------------------------------
# A zarr LocalStore that knows its writes in flight
# --------------------------------------------------------------------------------------


class _Gate:
    """Counts store operations in flight; once closed, new ones fail at once."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.active = 0
        self.closed = False

    def enter(self) -> None:
        with self.cond:
            if self.closed:
                raise OSError(errno.ECANCELED, "the store was closed after a failed write")
            self.active += 1

    def leave(self) -> None:
        with self.cond:
            self.active -= 1
            self.cond.notify_all()

    def close(self) -> None:
        """Refuse new operations (those running continue)."""
        with self.cond:
            self.closed = True

    def close_and_drain(self, timeout: float = DRAIN_TIMEOUT) -> bool:
        """Refuse new operations and wait until none is running; ``False`` on timeout."""
        with self.cond:
            self.closed = True
            return self.cond.wait_for(lambda: self.active == 0, timeout)


def _guarded_store_class():
    from zarr.storage import LocalStore

    class GuardedStore(LocalStore):
        """A ``zarr.storage.LocalStore`` whose writes can be drained and refused.

        Zarr writes the chunks of one assignment concurrently; when one fails (disk full)
        the assignment raises while the others still run. :meth:`drain` closes the store to
        new writes and waits for the running ones, so a partial store can be removed
        without chunks reappearing after the removal.
        """

        def __init__(self, root, *, read_only: bool = False, gate: _Gate | None = None):
            super().__init__(root, read_only=read_only)
            self.gate = gate if gate is not None else _Gate()

        def with_read_only(self, read_only: bool = False):
            return type(self)(self.root, read_only=read_only, gate=self.gate)

        async def set(self, key, value) -> None:
            self.gate.enter()
            try:
                return await super().set(key, value)
            finally:
                self.gate.leave()

        async def set_if_not_exists(self, key, value) -> None:
            self.gate.enter()
            try:
                return await super().set_if_not_exists(key, value)
            finally:
                self.gate.leave()

        async def delete(self, key) -> None:
            self.gate.enter()
            try:
                return await super().delete(key)
            finally:
                self.gate.leave()

        def drain(self, timeout: float = DRAIN_TIMEOUT) -> bool:
            """Refuse new writes and wait for those in flight (``False`` on timeout)."""
            return self.gate.close_and_drain(timeout)

    return GuardedStore


_GUARDED: list = []


def GuardedStore(root, **kwargs):  # noqa: N802 - a class, built on first use (zarr import)
    """A :class:`zarr.storage.LocalStore` at ``root`` with :meth:`drain` (see module doc)."""
    if not _GUARDED:
        _GUARDED.append(_guarded_store_class())
    return _GUARDED[0](root, **kwargs)


def _settle_zarr_loop(timeout: float = DRAIN_TIMEOUT) -> None:
    """Wait until zarr's I/O event loop has no task left.

    When one chunk write of an assignment fails, zarr raises at once and leaves the other
    chunk tasks of that assignment pending on its I/O loop; left alone they run (or are
    destroyed at exit, printing "Task was destroyed but it is pending" per task). With the
    store closed they fail at once, so waiting for them is short. Uses zarr's I/O loop
    (``zarr.core.sync.loop``, zarr 3.0/3.1); does nothing if that is not found.
    """
    import asyncio

    try:
        from zarr.core import sync as zsync

        loop = zsync.loop[0]
    except (ImportError, AttributeError, IndexError, TypeError):
        return
    if loop is None or not loop.is_running():
        return

    async def settle() -> None:
        me = asyncio.current_task()
        for _ in range(100):  # tasks may start others; stop when none is left
            pending = [t for t in asyncio.all_tasks() if t is not me and not t.done()]
            if not pending:
                return
            await asyncio.wait(pending, timeout=timeout)

    with contextlib.suppress(Exception):
        asyncio.run_coroutine_threadsafe(settle(), loop).result(timeout + 5)


@contextlib.contextmanager
def atomic_zarr_store(path: str | os.PathLike) -> Iterator:
    """:func:`atomic_store` yielding a :func:`GuardedStore` on the temporary path.

    On failure the store is closed to new writes, zarr's pending chunk tasks and every write
    in flight are waited for, and only then is the partial store removed.
    """
    with atomic_store(path) as tmp:
        store = GuardedStore(tmp)
        try:
            yield store
        except BaseException:
            store.gate.close()
            _settle_zarr_loop()
            store.drain()
            raise
        store.drain()


# --------------------------------------------------------------------------------------
# Where an output may go
# --------------------------------------------------------------------------------------


def is_own_store(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a complete Zarr store written by qlty_gpu (safe to replace)."""
    meta = Path(path) / "zarr.json"
    try:
        attrs = json.loads(meta.read_text()).get("attributes", {})
    except (OSError, ValueError, AttributeError):
        return False
    mark = attrs.get("qlty_gpu") if isinstance(attrs, dict) else None
    return isinstance(mark, dict) and mark.get("complete") is True


def _inside(child: Path, parent: Path) -> bool:
    return child == parent or parent in child.parents


def check_output(
    out: str | os.PathLike,
    *,
    files: Collection[str | os.PathLike] = (),
    folders: Iterable[str | os.PathLike] = (),
    stores: Iterable[str | os.PathLike] = (),
    overwrite: bool = False,
    name: str = "output",
) -> None:
    """Refuse an output store that would destroy an input or a folder that is not ours.

    Args:
        out: The store to be written (replaced if it exists).
        files: Input files (absolute paths; a set is used as is): ``out`` must not be one
            of them. Pass their folders in ``folders`` so ``out`` cannot contain them.
        folders: Input folders: ``out`` must not be one or contain one (it may lie inside,
            as the default output of a stack conversion does).
        stores: Input stores: ``out`` must not be, contain or lie inside one.
        overwrite: Replace an existing ``out`` that is not a complete qlty_gpu store.
        name: The argument to name in messages.

    Raises:
        QltyError: Naming the output, the input it collides with and what to do.
    """
    o = Path(os.path.abspath(out)).resolve()
    for s in stores:
        sp = Path(os.path.abspath(s)).resolve()
        if _inside(o, sp) or _inside(sp, o):
            raise QltyError(
                f"{name} {out} is, contains or lies inside the input {s}: writing it would "
                "destroy the input; choose an output outside the input"
            )
    for f in folders:
        fp = Path(os.path.abspath(f)).resolve()
        if _inside(fp, o):
            raise QltyError(
                f"{name} {out} is or contains the input folder {f}: writing it would delete "
                "the input images; choose another output_dir or output_naming"
            )
    file_set = files if isinstance(files, (set, frozenset)) else {Path(f) for f in files}
    if file_set and (Path(os.path.abspath(out)) in file_set or o in file_set):
        raise QltyError(f"{name} {out} is an input file; choose another output")
    p = Path(out)
    if (p.exists() or p.is_symlink()) and not overwrite and not is_own_store(p):
        kind = "folder" if p.is_dir() else "file"
        raise QltyError(
            f"{name} {out} exists and is a {kind} that is not a store written by qlty_gpu; "
            "it is not replaced: remove it, choose another output, or pass overwrite=True"
        )
