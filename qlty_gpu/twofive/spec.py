"""Channel specification of the 2.5D quilt and its volume-relative gather table.

``parse_channel_spec``, ``apply_boundary_mode`` and ``compute_channel_count`` keep qlty
1.5.0's behaviour and messages (spec §2.7). :func:`build_table` is new: it resolves every
``z0 + offset`` against the **volume** ``[0, Z)`` (qlty resolves against the window it
happened to load, which is wrong for one-sided offsets) into one int64 table that the
aggregation op (:mod:`qlty_gpu.ops.zagg`) consumes.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Union

import torch

from ..errors import QltyError, QltyTypeError, describe

__all__ = [
    "ZOperation",
    "ChannelOperation",
    "parse_channel_spec",
    "apply_boundary_mode",
    "compute_channel_count",
    "resolve_z",
    "ChannelTable",
    "build_table",
    "BOUNDARY_MODES",
    "ZERO",
    "PAD",
]

BOUNDARY_MODES = ("clamp", "zero", "reflect", "skip")
ZERO = -1  # table entry: a zero slice that counts in MEAN/STD (boundary_mode='zero')
PAD = -2  # table entry: nothing (unused group member, or a slice dropped by 'skip')
KIND_IDENTITY, KIND_MEAN, KIND_STD = 0, 1, 2


class ZOperation(Enum):
    """Operations that turn z-neighbours into channels."""

    IDENTITY = 1
    MEAN = 3
    STD = 4


_KIND = {ZOperation.IDENTITY: KIND_IDENTITY, ZOperation.MEAN: KIND_MEAN, ZOperation.STD: KIND_STD}


@dataclass
class ChannelOperation:
    """One operation of a channel spec.

    Args:
        op_type: the :class:`ZOperation`.
        offsets: IDENTITY: a tuple of z offsets; MEAN/STD: a tuple of offset groups.
        output_channels: channels produced per input channel.
        name: the spec key when it was a string.
    """

    op_type: ZOperation
    offsets: Union[tuple[int, ...], tuple[tuple[int, ...], ...]]
    output_channels: int
    name: Union[str, None] = None

    def groups(self) -> list[tuple[int, ...]]:
        """Offsets as groups: one 1-element group per IDENTITY offset."""
        if self.op_type == ZOperation.IDENTITY:
            return [(int(o),) for o in self.offsets]
        return [tuple(int(o) for o in g) for g in self.offsets]

    def get_required_z_range(self, z0: int) -> tuple[int, int]:
        """``(z0 + min offset, z0 + max offset + 1)`` before any boundary handling."""
        flat = [o for g in self.groups() for o in g]
        return (z0 + min(flat), z0 + max(flat) + 1)


def _offsets(what: str, value) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in value)
    except (TypeError, ValueError) as exc:
        raise QltyTypeError(f"{what} offsets must be ints, got {describe(value)} ({exc})") from exc


def parse_channel_spec(spec) -> list[ChannelOperation]:
    """Parse ``{'identity': [...], 'mean': [[...]], 'std': [[...]]}`` (or ZOperation keys).

    The dict's order is the operation order. Errors raise :class:`QltyError` (a
    ``ValueError``) with qlty's messages.

    Example:
        >>> [(o.op_type.name, o.output_channels) for o in
        ...  parse_channel_spec({"identity": [-1, 0, 1], "mean": [[-2, 2]]})]
        [('IDENTITY', 3), ('MEAN', 1)]
    """
    if not spec:
        raise QltyError("Channel specification cannot be empty")
    if not isinstance(spec, dict):
        raise QltyTypeError(
            f"channel_spec must be a dict such as {{'identity': [-1, 0, 1]}}, got {describe(spec)}"
        )
    names = {"identity": ZOperation.IDENTITY, "mean": ZOperation.MEAN, "std": ZOperation.STD}
    ops = []
    for key, value in spec.items():
        if isinstance(key, str):
            if key.lower() not in names:
                raise QltyError(
                    f"Unknown operation '{key}'. Supported operations: {list(names)}"
                )
            op_type = names[key.lower()]
        elif isinstance(key, ZOperation):
            op_type = key
        elif isinstance(key, Enum) and type(key).__name__ == "ZOperation" and key.name in ZOperation.__members__:
            op_type = ZOperation[key.name]  # qlty's own enum: same members
        else:
            raise QltyError(f"Invalid key type: {type(key)}. Must be str or ZOperation enum")
        label = op_type.name
        if op_type == ZOperation.IDENTITY:
            if not isinstance(value, (list, tuple)):
                raise QltyError(f"IDENTITY operation requires list/tuple of ints, got {type(value)}")
            offsets = _offsets("IDENTITY", value)
            if not offsets:
                raise QltyError("IDENTITY operation must have at least one offset")
            ops.append(ChannelOperation(op_type, offsets, len(offsets),
                                        key if isinstance(key, str) else None))
            continue
        if not isinstance(value, (list, tuple)):
            raise QltyError(f"{label} operation requires list/tuple of lists, got {type(value)}")
        if not value:
            raise QltyError(f"{label} operation must have at least one offset group")
        groups = []
        for group in value:
            if not isinstance(group, (list, tuple)):
                raise QltyError(
                    f"{label} operation offset groups must be lists/tuples, got {type(group)}"
                )
            g = _offsets(label, group)
            if not g:
                raise QltyError(f"{label} operation offset groups cannot be empty")
            groups.append(g)
        ops.append(ChannelOperation(op_type, tuple(groups), len(groups),
                                    key if isinstance(key, str) else None))
    return ops


def resolve_z(z: int, z_min: int, z_max: int, mode: str) -> int:
    """Resolve index ``z`` against ``[z_min, z_max)``: the index, :data:`ZERO` or :data:`PAD`.

    ``clamp`` clips; ``reflect`` mirrors half-sample symmetrically (``-1 -> 0``,
    ``Z -> Z-1``), repeatedly, so it always lands inside; ``zero`` gives :data:`ZERO`;
    ``skip`` gives :data:`PAD`.
    """
    if z_min <= z < z_max:
        return z
    if mode == "clamp":
        return min(max(z, z_min), z_max - 1)
    if mode == "reflect":
        size = z_max - z_min
        m = (z - z_min) % (2 * size)
        return z_min + (m if m < size else 2 * size - 1 - m)
    if mode == "zero":
        return ZERO
    if mode == "skip":
        return PAD
    raise QltyError(f"Unknown boundary_mode: {mode!r}; expected one of {BOUNDARY_MODES}")


def apply_boundary_mode(z_index: int, z_min: int, z_max: int, boundary_mode: str = "clamp") -> int:
    """qlty's helper: ``z_index`` inside ``[z_min, z_max)``, or -1 for 'zero' and 'skip'.

    ``reflect`` is half-sample symmetric (qlty's convention) and, unlike qlty, repeats
    until the index is inside, so far overshoots stay in range.

    Example:
        >>> [apply_boundary_mode(z, 0, 10, "reflect") for z in (-1, -2, 10, 11, -5, 15, 25)]
        [0, 1, 9, 8, 4, 4, 5]
    """
    r = resolve_z(int(z_index), int(z_min), int(z_max), boundary_mode)
    return -1 if r < 0 else r


def compute_channel_count(operations: list[ChannelOperation], input_channels: int) -> int:
    """``input_channels * sum(op.output_channels)``."""
    return input_channels * sum(op.output_channels for op in operations)


@dataclass(frozen=True)
class ChannelTable:
    """Gather table of one batch of centre slices (what the aggregation op consumes).

    Attributes:
        idx: int64 ``(J, K, G)``: for centre row j and slot k, the source z of each group
            member, :data:`ZERO` or :data:`PAD`.
        kind: int64 ``(K,)``: 0 identity, 1 mean, 2 std.
        chan_base: int64 ``(K,)``; output channel of input channel c in slot k is
            ``chan_base[k] + c * chan_cstride[k]``.
        chan_cstride: int64 ``(K,)``.
    """

    idx: torch.Tensor
    kind: torch.Tensor
    chan_base: torch.Tensor
    chan_cstride: torch.Tensor


def slots(ops: list[ChannelOperation], n_channels: int) -> list[tuple[int, tuple[int, ...], int, int]]:
    """Per slot: (kind, offsets, chan_base, chan_cstride) in qlty's order op -> c -> group."""
    out, base = [], 0
    for op in ops:
        for i, g in enumerate(op.groups()):
            out.append((_KIND[op.op_type], g, base + i, op.output_channels))
        base += n_channels * op.output_channels
    return out


def build_table(slot_list, centres: list[int], Z: int, mode: str) -> ChannelTable:
    """Resolve every centre/slot/member against the volume ``[0, Z)``.

    Raises:
        QltyError: under ``skip`` when an IDENTITY offset, or every member of a MEAN/STD
            group, falls outside the volume (a channel cannot be dropped: every image has
            the same channels).
    """
    G = max(len(s[1]) for s in slot_list)
    rows = []
    for z0 in centres:
        row = []
        for kind, offs, _, _ in slot_list:
            members = [resolve_z(z0 + o, 0, Z, mode) for o in offs]
            if all(m == PAD for m in members):
                what = "identity offset" if kind == KIND_IDENTITY else "offset group"
                raise QltyError(
                    f"boundary_mode='skip' produced no valid channels for {what} "
                    f"{offs[0] if kind == KIND_IDENTITY else list(offs)} at z0={z0}: z="
                    f"{[z0 + o for o in offs]} is outside the volume [0, {Z}), and 'skip' "
                    f"cannot drop a channel (every image has the same channels); restrict "
                    f"z_slices, or use boundary_mode 'clamp', 'reflect' or 'zero'"
                )
            row.append(members + [PAD] * (G - len(members)))
        rows.append(row)
    return ChannelTable(
        idx=torch.tensor(rows, dtype=torch.int64).reshape(len(centres), len(slot_list), G),
        kind=torch.tensor([s[0] for s in slot_list], dtype=torch.int64),
        chan_base=torch.tensor([s[2] for s in slot_list], dtype=torch.int64),
        chan_cstride=torch.tensor([s[3] for s in slot_list], dtype=torch.int64),
    )
