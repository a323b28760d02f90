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


def _poisoned_empty(real):
    def empty(shape, dtype, device):
        t = real(shape, dtype, device)
        if dtype.is_floating_point or dtype.is_complex:
            return t.fill_(float("nan"))
        return t.fill_(True if dtype == torch.bool else 123)

    return empty


@pytest.fixture(autouse=True)
def _poison_fresh_outputs(monkeypatch):
    """Every backend's fresh outputs start as NaN (123 for integers): an element a launcher
    or kernel forgets to write cannot pass as a plausible value."""
    from qlty_gpu.ops import _launch

    monkeypatch.setattr(_launch, "new_empty", _poisoned_empty(_launch._empty))


@pytest.fixture(autouse=True)
def _no_backend_env(monkeypatch):
    """Tests choose backends explicitly; an exported QLTY_GPU_BACKEND must not leak in."""
    monkeypatch.delenv("QLTY_GPU_BACKEND", raising=False)
    torch.manual_seed(0)
