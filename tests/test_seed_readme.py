"""Every in-memory example of the seed README (qlty 1.5.0's) runs with ``qlty`` -> ``qlty_gpu``.

The examples are copied verbatim below (and checked against the seed file when it is
available); ``your_model``, ``model`` and ``criterion`` are the only names we supply.
The 2.5D/backend/stack examples belong to other issues.
"""

from __future__ import annotations

import os
import re

import pytest
import torch

# the seed lives in ../shared next to the project root (CI clones with shared/ beside it)
SEED = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..", "shared", "seed",
    "qlty-README.md",
)

# fmt: off
EXAMPLES = {
    'basic_usage': (
        'Basic Usage',
        '''\
import torch
from qlty import NCYXQuilt

# Create a quilt object for 128x128 images
quilt = NCYXQuilt(
    Y=128, X=128,
    window=(32, 32),      # Patch size
    step=(16, 16),        # Step size (50% overlap)
    border=(5, 5),        # Border region to downweight
    border_weight=0.1     # Weight for border pixels
)

# Split data into patches
data = torch.randn(10, 3, 128, 128)  # (N, C, Y, X)
patches = quilt.unstitch(data)       # Returns (M, C, 32, 32)

# Process patches (e.g., with a neural network)
processed_patches = your_model(patches)

# Stitch back together
reconstructed, weights = quilt.stitch(processed_patches)
''',
    ),
    'example_1': (
        'Example 1: 2D Image Processing',
        '''\
import torch
from qlty import NCYXQuilt

# Create quilt object
quilt = NCYXQuilt(
    Y=256, X=256,
    window=(64, 64),
    step=(32, 32),
    border=(8, 8),
    border_weight=0.1
)

# Load your data
images = torch.randn(20, 3, 256, 256)  # 20 RGB images

# Split into patches
patches = quilt.unstitch(images)
print(f"Patches shape: {patches.shape}")  # (M, 3, 64, 64)

# Process with your model
output_patches = your_model(patches)

# Stitch back together
reconstructed, weights = quilt.stitch(output_patches)
print(f"Reconstructed shape: {reconstructed.shape}")  # (20, C, 256, 256)
''',
    ),
    'example_2': (
        'Example 2: Training Data Pairs',
        '''\
from qlty import NCYXQuilt

quilt = NCYXQuilt(Y=128, X=128, window=(32, 32), step=(16, 16), border=(4, 4))

# Input and target tensors
input_data = torch.randn(10, 3, 128, 128)   # Input images
target_data = torch.randn(10, 128, 128)      # Target labels

# Unstitch both together
input_patches, target_patches = quilt.unstitch_data_pair(input_data, target_data)

# Train your model
for inp, tgt in zip(input_patches, target_patches):
    loss = criterion(model(inp), tgt)
    # ...
''',
    ),
    'example_3': (
        'Example 3: Large Dataset with Disk Caching',
        '''\
from qlty import LargeNCYXQuilt
import tempfile
import os

# Create temporary identityory for cache
temp_dir = tempfile.mkdtemp()
filename = os.path.join(temp_dir, "my_data")

# Create Large quilt object
quilt = LargeNCYXQuilt(
    filename=filename,
    N=100,           # 100 images
    Y=512, X=512,   # Image size
    window=(128, 128),
    step=(64, 64),
    border=(10, 10),
    border_weight=0.1
)

# Process data in chunks
data = torch.randn(100, 3, 512, 512)

for i in range(quilt.N_chunks):
    index, patch = quilt.unstitch_next(data)

    # Process patch
    processed = your_model(patch.unsqueeze(0))

    # Accumulate result
    quilt.stitch(processed, index)

# Get final result
mean_result = quilt.return_mean()
std_result = quilt.return_mean(std=True)
''',
    ),
    'example_4': (
        'Example 4: Handling Missing Data',
        '''\
from qlty import NCYXQuilt, weed_sparse_classification_training_pairs_2D

quilt = NCYXQuilt(Y=128, X=128, window=(32, 32), step=(16, 16), border=(5, 5))

# Data with missing labels (marked as -1)
input_data = torch.randn(10, 3, 128, 128)
labels = torch.ones(10, 128, 128) * (-1)  # All missing initially
labels[:, 20:108, 20:108] = 1.0            # Some valid data

# Unstitch with missing label handling
input_patches, label_patches = quilt.unstitch_data_pair(
    input_data, labels, missing_label=-1
)

# Filter out patches with no valid data
border_tensor = quilt.border_tensor()
valid_input, valid_labels, mask = weed_sparse_classification_training_pairs_2D(
    input_patches, label_patches, missing_label=-1, border_tensor=border_tensor
)

# Only valid patches remain
print(f"Valid patches: {valid_input.shape[0]}")
''',
    ),
    'example_5': (
        'Example 5: 3D Volume Processing',
        '''\
from qlty import NCZYXQuilt

# Create 3D quilt
quilt = NCZYXQuilt(
    Z=64, Y=64, X=64,
    window=(32, 32, 32),
    step=(16, 16, 16),
    border=(4, 4, 4),
    border_weight=0.1
)

# 3D volume data
volume = torch.randn(5, 1, 64, 64, 64)  # (N, C, Z, Y, X)

# Process
patches = quilt.unstitch(volume)
processed = your_model(patches)
reconstructed, weights = quilt.stitch(processed)
''',
    ),
    'cleanup_functions': (
        'Cleanup Functions',
        '''\
from qlty import weed_sparse_classification_training_pairs_2D, weed_sparse_classification_training_pairs_3D

# Filter out patches with no valid data
valid_in, valid_out, mask = weed_sparse_classification_training_pairs_2D(
    tensor_in, tensor_out, missing_label, border_tensor
)
''',
    ),
}
# fmt: on


def _port(code: str) -> str:
    """The only change a user makes: import qlty_gpu instead of qlty."""
    return re.sub(r"\bqlty\b", "qlty_gpu", code)


def _run(key: str, **names):
    _, code = EXAMPLES[key]
    ns = {"torch": torch, **names}
    exec(compile(_port(code), f"<README {key}>", "exec"), ns)  # noqa: S102
    return ns


def identity(x):
    return x


def test_examples_are_verbatim_copies_of_the_seed():
    if not os.path.exists(SEED):
        pytest.skip("seed README not available on this machine")
    text = open(SEED, encoding="utf-8").read()
    for key, (heading, code) in EXAMPLES.items():
        assert heading in text, key
        assert "```python\n" + code + "```" in text, key


def test_port_only_renames_the_package():
    assert _port("from qlty import NCYXQuilt") == "from qlty_gpu import NCYXQuilt"
    assert _port("import qlty.cleanup") == "import qlty_gpu.cleanup"


def test_basic_usage_identity_round_trip():
    ns = _run("basic_usage", your_model=identity)
    assert ns["patches"].shape == (10 * 49, 3, 32, 32)
    torch.testing.assert_close(ns["reconstructed"], ns["data"], rtol=1e-5, atol=1e-5)
    assert ns["weights"].shape == (128, 128)


def test_basic_usage_with_a_conv_model():
    conv = torch.nn.Conv2d(3, 3, 3, padding=1)
    ns = _run("basic_usage", your_model=conv)
    rec = ns["reconstructed"]
    assert rec.shape == (10, 3, 128, 128) and rec.requires_grad
    rec.mean().backward()
    assert conv.weight.grad is not None


def test_example_1(capsys):
    ns = _run("example_1", your_model=identity)
    out = capsys.readouterr().out
    assert "Patches shape: torch.Size([980, 3, 64, 64])" in out
    assert "Reconstructed shape: torch.Size([20, 3, 256, 256])" in out
    torch.testing.assert_close(ns["reconstructed"], ns["images"], rtol=1e-5, atol=1e-5)


def test_example_2():
    seen = []

    def model(x):
        seen.append(tuple(x.shape))
        return x.mean(0)

    ns = _run("example_2", model=model, criterion=torch.nn.MSELoss())
    assert ns["input_patches"].shape == (490, 3, 32, 32)
    assert ns["target_patches"].shape == (490, 32, 32)
    assert len(seen) == 490 and seen[0] == (3, 32, 32)
    assert torch.isfinite(ns["loss"])


@pytest.mark.slow
def test_example_3():
    """100 x 3 x 512 x 512 (4900 patches, one at a time): the Large quilt's verbatim loop."""
    import shutil
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # std without patch_var is zero, with a warning
        ns = _run("example_3", your_model=identity)
    try:
        torch.testing.assert_close(torch.from_numpy(ns["mean_result"]), ns["data"],
                                   rtol=1e-5, atol=1e-5)
        mean, std = ns["std_result"]
        assert mean.shape == std.shape == (100, 3, 512, 512) and not std.any()
    finally:
        shutil.rmtree(ns["temp_dir"], ignore_errors=True)


def test_example_4(capsys):
    ns = _run("example_4")
    out = capsys.readouterr().out
    mask = ns["mask"]
    assert mask.dtype == torch.bool and mask.shape == (490,)
    assert f"Valid patches: {int((~mask).sum())}" in out
    label_patches = ns["label_patches"]
    assert bool((label_patches[:, ns["border_tensor"] < 0.5] == -1).all())
    assert ns["valid_input"].shape[0] == ns["valid_labels"].shape[0] == int((~mask).sum())


def test_example_5():
    ns = _run("example_5", your_model=identity)
    assert ns["patches"].shape == (5 * 27, 1, 32, 32, 32)
    torch.testing.assert_close(ns["reconstructed"], ns["volume"], rtol=1e-5, atol=1e-5)
    assert ns["weights"].shape == (64, 64, 64)


def test_example_5_with_a_conv_model():
    ns = _run("example_5", your_model=torch.nn.Conv3d(1, 2, 3, padding=1))
    assert ns["reconstructed"].shape == (5, 2, 64, 64, 64)


def test_cleanup_functions_snippet():
    tensor_in = torch.randn(4, 1, 8, 8)
    tensor_out = torch.full((4, 8, 8), -1.0)
    tensor_out[2, 4, 4] = 1
    border_tensor = torch.ones(8, 8)
    ns = _run("cleanup_functions", tensor_in=tensor_in, tensor_out=tensor_out,
              missing_label=-1, border_tensor=border_tensor)
    assert ns["mask"].tolist() == [True, True, False, True]
    assert ns["valid_in"].shape == (1, 1, 8, 8)
