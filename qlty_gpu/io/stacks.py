"""Finding image files in a directory and grouping them into stacks.

A *stack* is the set of files whose names match ``pattern`` with the same first group (the
basename); the second group is an integer counter that orders the slices.

Example:
    >>> import tempfile, pathlib
    >>> d = pathlib.Path(tempfile.mkdtemp())
    >>> for i in (0, 1, 3):
    ...     _ = (d / f"cells_{i:03d}.tif").write_bytes(b"")
    >>> [s.basename for s in find_stacks(d, ".tif", r"(.+)_(\\d+)\\.tif$")]
    ['cells']
    >>> find_stacks(d, "tif", r"(.+)_(\\d+)\\.tif$")[0].missing
    [2]
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import QltyError, QltyTypeError

__all__ = ["Stack", "find_stacks", "normalize_extension", "compile_pattern"]


@dataclass
class Stack:
    """Files of one stack, in slice order.

    Attributes:
        basename: Group 1 of the pattern.
        counters: Integer counter of each file, in slice order.
        files: The files, in slice order.
    """

    basename: str
    counters: list[int] = field(default_factory=list)
    files: list[Path] = field(default_factory=list)

    @property
    def counter_range(self) -> tuple[int, int]:
        """``(min, max)`` of the counters."""
        return (min(self.counters), max(self.counters))

    @property
    def missing(self) -> list[int]:
        """Counters between min and max that have no file (gaps), sorted."""
        lo, hi = self.counter_range
        return sorted(set(range(lo, hi + 1)) - set(self.counters))

    @property
    def duplicates(self) -> list[int]:
        """Counters that occur more than once (e.g. ``a_1.tif`` and ``a_01.tif``)."""
        seen: set[int] = set()
        dup: set[int] = set()
        for c in self.counters:
            (dup if c in seen else seen).add(c)
        return sorted(dup)


def normalize_extension(extension: str) -> str:
    """Lower-case ``extension`` and give it a leading dot.

    Example:
        >>> normalize_extension("TIF")
        '.tif'
    """
    if not isinstance(extension, str) or not extension.strip("."):
        raise QltyTypeError(
            f"extension must be a non-empty string such as '.tif', got {extension!r}"
        )
    if not extension.startswith("."):
        extension = "." + extension
    return extension.lower()


def compile_pattern(pattern: str | re.Pattern) -> re.Pattern:
    """Compile ``pattern`` and check it has at least two groups (basename, counter).

    Example:
        >>> compile_pattern(r"(.+)_(\\d+)").groups
        2
    """
    if isinstance(pattern, str):
        try:
            pattern = re.compile(pattern)
        except re.error as exc:
            raise QltyError(
                f"pattern {pattern!r} is not a valid regular expression: {exc}"
            ) from exc
    elif not isinstance(pattern, re.Pattern):
        raise QltyTypeError(
            f"pattern must be a regex string or compiled pattern, got {type(pattern).__name__}"
        )
    if pattern.groups == 0:
        raise QltyError(
            "Pattern must have at least 2 groups (basename, counter). Pattern has no groups. "
            f"Got pattern {pattern.pattern!r}; example: r'(.+)_(\\d+)\\.tif$'"
        )
    if pattern.groups < 2:
        raise QltyError(
            "Pattern must have at least 2 groups (basename, counter). "
            f"Got {pattern.groups} groups in pattern {pattern.pattern!r}; "
            "example: r'(.+)_(\\d+)\\.tif$'"
        )
    return pattern


def find_stacks(
    directory: str | os.PathLike,
    extension: str,
    pattern: str | re.Pattern,
    sort_by_counter: bool = True,
) -> list[Stack]:
    """Scan the top level of ``directory`` for matching files and group them into stacks.

    Matching follows qlty: regular files only, ``Path.suffix.lower() == extension``,
    ``pattern.match(name)`` (anchored at the start), group 1 = basename, group 2 = counter
    (files whose counter is not an integer are skipped).

    Args:
        directory: Directory to scan (not recursive).
        extension: File extension, with or without the dot, any case.
        pattern: Regex with two groups ``(basename, counter)``.
        sort_by_counter: Sort slices by integer counter (default). When ``False`` the slices
            keep file-name order (qlty used the arbitrary directory order).

    Returns:
        Stacks sorted by basename. Empty if nothing matches.

    Raises:
        QltyError: ``directory`` is not a directory (``Directory does not exist``), or the
            pattern has fewer than two groups.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise QltyError(
            f"Directory does not exist: {directory} (directory must be an existing folder "
            "of image files)"
        )
    extension = normalize_extension(extension)
    regex = compile_pattern(pattern)
    stacks: dict[str, Stack] = {}
    for path in sorted(directory.iterdir()):
        if path.suffix.lower() != extension or not path.is_file():
            continue
        match = regex.match(path.name)
        if not match:
            continue
        try:
            counter = int(match.group(2))
        except (TypeError, ValueError):
            continue
        stack = stacks.setdefault(match.group(1), Stack(match.group(1)))
        stack.counters.append(counter)
        stack.files.append(path)
    out = []
    for name in sorted(stacks):
        st = stacks[name]
        if sort_by_counter:
            order = sorted(range(len(st.files)), key=lambda i: (st.counters[i], st.files[i].name))
            st.counters = [st.counters[i] for i in order]
            st.files = [st.files[i] for i in order]
        out.append(st)
    return out


def describe_no_match(directory: str | os.PathLike, extension: str, pattern: re.Pattern) -> str:
    """A message explaining why no file matched (used when a search finds no stack)."""
    directory = Path(directory)
    with_ext = sorted(
        p.name for p in directory.iterdir() if p.suffix.lower() == extension and p.is_file()
    )
    if not with_ext:
        return (
            f"no files matching: no file in {directory} has extension {extension!r} "
            "(check extension)"
        )
    examples = ", ".join(with_ext[:3])
    return (
        f"no files matching: {len(with_ext)} file(s) in {directory} have extension "
        f"{extension!r} (e.g. {examples}) but none matches pattern {pattern.pattern!r} "
        "with an integer counter in group 2"
    )
