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

import bisect
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import QltyError, QltyTypeError

__all__ = [
    "Stack",
    "StackGapWarning",
    "Gaps",
    "find_stacks",
    "normalize_extension",
    "compile_pattern",
    "has_extension",
]

#: Gap reports list every missing counter up to this many, else summarise the ranges.
LIST_LIMIT = 50


class StackGapWarning(UserWarning):
    """A stack's counters have gaps (``missing counters``)."""


class Gaps(Sequence):
    """The counters missing between a stack's first and last counter, stored as ranges.

    Memory and printing cost grow with the number of files, not with the counter span (two
    files whose counters are timestamps 1e8 apart make one range). Behaves as the sorted
    list of missing counters (``len``, indexing, ``in``, iteration, ``== [2, 4]``); its
    ``repr`` is that list when it has at most ``LIST_LIMIT`` entries, else a summary.

    Example:
        >>> g = Gaps([(2, 2), (4, 9)])
        >>> len(g), g[1], 7 in g, g == [2, 4, 5, 6, 7, 8, 9]
        (7, 4, True, True)
        >>> Gaps([(1, 4), (6, 99_999_999)])
        1..4, 6..99999999 (99999998 missing counters in 2 gaps)
    """

    def __init__(self, ranges: Sequence[tuple[int, int]] = ()):
        self.ranges: list[tuple[int, int]] = [(int(a), int(b)) for a, b in ranges]
        self._offsets: list[int] = []
        total = 0
        for a, b in self.ranges:
            self._offsets.append(total)
            total += b - a + 1
        self._len = total

    @classmethod
    def between(cls, counters: Sequence[int]) -> Gaps:
        """The gaps of ``counters`` (any order, duplicates allowed), in O(n log n)."""
        uniq = sorted(set(counters))
        return cls([(a + 1, b - 1) for a, b in zip(uniq, uniq[1:]) if b > a + 1])

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[k] for k in range(*i.indices(self._len))]
        if i < 0:
            i += self._len
        if not 0 <= i < self._len:
            raise IndexError("Gaps index out of range")
        r = bisect.bisect_right(self._offsets, i) - 1
        return self.ranges[r][0] + i - self._offsets[r]

    def __iter__(self) -> Iterator[int]:
        for a, b in self.ranges:
            yield from range(a, b + 1)

    def __contains__(self, value: object) -> bool:
        if not isinstance(value, int):
            return False
        r = bisect.bisect_right([a for a, _ in self.ranges], value) - 1
        return r >= 0 and self.ranges[r][0] <= value <= self.ranges[r][1]

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Gaps):
            return self.ranges == other.ranges
        if isinstance(other, (list, tuple)):
            return len(other) == self._len and all(a == b for a, b in zip(self, other))
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def summary(self) -> str:
        """``"1..4, 6..99999999 (99999998 missing counters in 2 gaps)"``."""
        parts = ", ".join(str(a) if a == b else f"{a}..{b}" for a, b in self.ranges)
        n = len(self.ranges)
        return f"{parts} ({self._len} missing counters in {n} gap{'s' if n != 1 else ''})"

    def __repr__(self) -> str:
        if self._len <= LIST_LIMIT:
            return repr(list(self))
        return self.summary()

    def to_json(self) -> list[int] | None:
        """The full list when it has at most 10000 entries (for metadata), else ``None``."""
        return list(self) if self._len <= 10_000 else None


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
    def missing(self) -> Gaps:
        """Counters between min and max that have no file (gaps), sorted, as :class:`Gaps`."""
        return Gaps.between(self.counters)

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


def has_extension(name: str, extension: str) -> bool:
    """Whether file ``name`` ends with ``extension`` (normalised; ``".ome.tif"`` works).

    Example:
        >>> has_extension("a_1.OME.TIF", ".ome.tif"), has_extension("a_1.tif", ".ome.tif")
        (True, False)
    """
    low = name.lower()
    return low.endswith(extension) and len(low) > len(extension)


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

    Matching follows qlty: regular files only, whose name ends with ``extension`` (any
    case; multi-dot extensions such as ``".ome.tif"`` work, qlty compared the last suffix),
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
        if not has_extension(path.name, extension) or not path.is_file():
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
        p.name for p in directory.iterdir() if has_extension(p.name, extension) and p.is_file()
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
