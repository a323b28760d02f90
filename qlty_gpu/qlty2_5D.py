"""qlty's ``qlty.qlty2_5D`` module path: the 2.5D quilt and its helpers.

The implementation lives in :mod:`qlty_gpu.twofive` (spec, plans, quilt) and
:mod:`qlty_gpu.ops.zagg` (the fused z-aggregation op).
"""

from .backends_2_5D import TensorLike3D
from .twofive.plans import ExtractionPlan, PatchExtraction, StitchingPlan
from .twofive.quilt import NCZYX25DQuilt
from .twofive.spec import (
    ChannelOperation,
    ZOperation,
    apply_boundary_mode,
    compute_channel_count,
    parse_channel_spec,
)

__all__ = [
    "NCZYX25DQuilt",
    "ZOperation",
    "ChannelOperation",
    "PatchExtraction",
    "ExtractionPlan",
    "StitchingPlan",
    "parse_channel_spec",
    "apply_boundary_mode",
    "compute_channel_count",
    "TensorLike3D",
]
