"""qlty-compatible module path ``qlty.qlty2DLarge``."""

from .large import LargeNCYXQuilt

__all__ = ["LargeNCYXQuilt"]
