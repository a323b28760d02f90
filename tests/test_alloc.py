"""Pooled huge-page CPU output buffers (qlty_gpu._alloc)."""

import gc
import pickle
import subprocess
import sys

import pytest
import torch

from qlty_gpu import _alloc

BIG = (1 << 22,)  # 16 MiB of float32: above the 8 MiB threshold


@pytest.fixture(autouse=True)
def _fresh_pool(monkeypatch):
    monkeypatch.delenv("QLTY_GPU_HUGEPAGES", raising=False)
    monkeypatch.delenv("QLTY_GPU_CPU_CACHE_MB", raising=False)
    _alloc.empty_cache()
    yield
    _alloc.empty_cache()


def test_small_outputs_are_plain_torch_tensors():
    assert _alloc.cached_bytes() == 0
    t = _alloc.empty_cpu((10, 10), torch.float32)
    del t
    assert _alloc.cached_bytes() == 0


def test_buffer_returns_to_pool_only_when_every_view_is_gone():
    a = _alloc.zeros_cpu(BIG, torch.float32)
    view = a[1000:2000]
    del a
    gc.collect()
    assert _alloc.cached_bytes() == 0  # the view still uses the memory
    del view
    assert _alloc.cached_bytes() > 0


def test_reused_buffer_is_zeroed_by_zeros_cpu():
    a = _alloc.zeros_cpu(BIG, torch.float32)
    a.fill_(7)
    del a
    b = _alloc.zeros_cpu(BIG, torch.float32)
    assert _alloc.cached_bytes() == 0  # taken from the pool
    assert b.abs().sum().item() == 0


def test_numpy_view_keeps_the_buffer_alive():
    a = _alloc.empty_cpu(BIG, torch.float32)
    n = a.numpy()
    del a
    assert _alloc.cached_bytes() == 0
    n[:] = 1
    del n
    assert _alloc.cached_bytes() > 0


def test_switches(monkeypatch):
    monkeypatch.setenv("QLTY_GPU_CPU_CACHE_MB", "0")
    a = _alloc.empty_cpu(BIG, torch.float32)
    del a
    assert _alloc.cached_bytes() == 0  # cap 0: unmapped, not pooled
    monkeypatch.setenv("QLTY_GPU_HUGEPAGES", "0")
    t, fresh = _alloc._alloc(BIG, torch.float32)
    assert not fresh and t.is_contiguous()


def test_pooled_tensors_pickle_and_share_memory():
    a = _alloc.empty_cpu(BIG, torch.float32).uniform_()
    b = pickle.loads(pickle.dumps(a))
    assert torch.equal(a, b)
    c = a.clone()
    a.share_memory_()
    assert a.is_shared() and torch.equal(a, c)


def test_spawned_dataloader_workers_return_pooled_outputs(tmp_path):
    script = tmp_path / "spawn_loader.py"
    script.write_text(
        "import torch\n"
        "from torch.utils.data import DataLoader, Dataset\n"
        "from qlty_gpu import NCYXQuilt\n"
        "q = NCYXQuilt(384, 384, (64, 64), (32, 32), 8, 0.1)\n"
        "torch.manual_seed(0)\n"
        "imgs = torch.randn(2, 8, 384, 384)\n"
        "class DS(Dataset):\n"
        "    def __len__(self):\n"
        "        return 2\n"
        "    def __getitem__(self, i):\n"
        "        return q.unstitch(imgs[i:i + 1])  # 121 patches x 8 ch x 64 x 64: 16 MB, pooled\n"
        "if __name__ == '__main__':\n"
        "    dl = DataLoader(DS(), batch_size=None, num_workers=2, multiprocessing_context='spawn')\n"
        "    got = list(dl)\n"
        "    assert all(torch.equal(g, q.unstitch(imgs[i:i + 1])) for i, g in enumerate(got))\n"
        "    print('ok', len(got))\n"
    )
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0 and "ok 2" in proc.stdout, proc.stderr[-1500:]
