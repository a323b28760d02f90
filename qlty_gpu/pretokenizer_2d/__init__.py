"""Pre-tokenizer for 2D patches (qlty 1.5.0's ``qlty.pretokenizer_2d``, spec §2.12).

Example:
    >>> import torch
    >>> from qlty_gpu.pretokenizer_2d import tokenize_patch
    >>> tokens, coords = tokenize_patch(torch.randn(2, 10, 10), patch_size=4)
    >>> tokens.shape, coords.shape
    (torch.Size([16, 32]), torch.Size([16, 2]))
"""

from .sequences import build_sequence_pair, tokenize_patch

__all__ = ["build_sequence_pair", "tokenize_patch"]
