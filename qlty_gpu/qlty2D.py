"""qlty-compatible module path ``qlty.qlty2D``."""

from .quilt import NCYXQuilt

__all__ = ["NCYXQuilt"]
