"""qlty-compatible module path ``qlty.qlty3D``."""

from .quilt import NCZYXQuilt

__all__ = ["NCZYXQuilt"]
