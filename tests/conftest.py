"""Test configuration.

``TRITON_INTERPRET=1`` must be set before any Triton kernel module is imported, so that on a
machine without CUDA the real Triton kernels run in the interpreter on CPU tensors.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

HAS_CUDA = torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _no_backend_env(monkeypatch):
    """Tests choose backends explicitly; an exported QLTY_GPU_BACKEND must not leak in."""
    monkeypatch.delenv("QLTY_GPU_BACKEND", raising=False)
    torch.manual_seed(0)
