"""qlty-compatible module path ``qlty.qlty3DLarge``."""

from .large import LargeNCZYXQuilt

__all__ = ["LargeNCZYXQuilt"]
