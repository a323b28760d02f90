"""Pooled huge-page CPU output buffers (qlty_gpu._alloc)."""

import gc
import os
import pickle
import subprocess
import sys

import pytest
import torch

from qlty_gpu import _alloc
from qlty_gpu.errors import QltyError

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


def test_min_bytes_lowers_the_threshold():
    t = _alloc.empty_cpu((1 << 19,), torch.float32)  # 2 MiB: plain below the default
    del t
    assert _alloc.cached_bytes() == 0
    t = _alloc.empty_cpu((1 << 19,), torch.float32, min_bytes=1 << 20)
    assert t.shape == (1 << 19,) and t.dtype == torch.float32
    t.fill_(1.0)
    del t
    assert _alloc.cached_bytes() > 0  # pooled


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


# ------------------------------------------------------------ issue 8.15: no deadlock
def _run_script(tmp_path, name: str, body: str, timeout: float = 120) -> None:
    """Run ``body`` in a fresh interpreter; a hang fails the test instead of hanging it."""
    script = tmp_path / name
    script.write_text(body)
    try:
        proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"{name} hung for {timeout} s (deadlock): {exc.stdout!r} {exc.stderr!r}")
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stdout + proc.stderr[-2000:]


_GC_UNDER_LOCK = '''
import gc, threading, torch
from qlty_gpu import _alloc

class GCLock:
    """The pool's lock, with a garbage collection right after every acquisition: what
    happens when an allocation inside the locked region trips the collector."""
    def __init__(self, inner):
        self.inner = inner
        self.collections = 0
    def acquire(self, blocking=True, timeout=-1):
        got = self.inner.acquire(blocking, timeout)
        if got:
            self.collections += 1
            gc.collect()
        return got
    def release(self):
        self.inner.release()
    def __enter__(self):
        self.acquire()
        return self
    def __exit__(self, *exc):
        self.release()

lock = _alloc._LOCK = GCLock(_alloc._LOCK)
BIG = (1 << 22,)
gc.disable()
a = _alloc.empty_cpu(BIG, torch.float32)
b = _alloc.empty_cpu(BIG, torch.float32)
cycle = [b]
cycle.append(cycle)  # b is freed by the collector only
del b, cycle
del a  # a's finaliser takes the lock; the collection under it frees b: b's finaliser runs
assert lock.collections > 0
n = _alloc.cached_bytes()
assert n >= 2 * 16 * 2**20, n  # both buffers were pooled, none lost
c = _alloc.empty_cpu(BIG, torch.float32)
d = _alloc.empty_cpu(BIG, torch.float32)
assert _alloc.cached_bytes() == 0, _alloc.cached_bytes()  # both reused
print("ok")
'''


def test_gc_inside_the_pool_lock_does_not_deadlock(tmp_path):
    """Issue 8.15: a finaliser run by a collection under the lock took the same lock."""
    _run_script(tmp_path, "gc_under_lock.py", _GC_UNDER_LOCK)


def test_threads_and_collections_return_every_buffer(tmp_path):
    """Threads allocate and free pooled buffers, some through reference cycles, with the
    collector running constantly: nothing hangs, and the pool stays within its cap."""
    _run_script(tmp_path, "threads.py", '''
import gc, os, threading, torch
os.environ["QLTY_GPU_CPU_CACHE_MB"] = "64"
from qlty_gpu import _alloc
gc.set_threshold(5, 2, 2)
def work(seed):
    g = torch.Generator().manual_seed(seed)
    for i in range(30):
        n = int(torch.randint(1 << 21, 1 << 22, (1,), generator=g))
        t = _alloc.empty_cpu((n,), torch.float32)
        t[:10] = seed
        if i % 3 == 0:
            c = [t]
            c.append(c)
        del t
threads = [threading.Thread(target=work, args=(s,)) for s in range(4)]
for th in threads:
    th.start()
for th in threads:
    th.join()
gc.collect()
assert 0 < _alloc.cached_bytes() <= 64 << 20, _alloc.cached_bytes()
_alloc.empty_cache()
assert _alloc.cached_bytes() == 0
print("ok")
''')


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_pool_lock_is_recreated_after_fork(tmp_path):
    """A fork while another thread holds the pool lock: the child still allocates/frees."""
    _run_script(tmp_path, "fork.py", '''
import os, signal, threading, time, torch
from qlty_gpu import _alloc
BIG = (1 << 22,)
held, done = threading.Event(), threading.Event()
def holder():
    with _alloc._LOCK:
        held.set()
        done.wait()
th = threading.Thread(target=holder)
th.start()
held.wait()
pid = os.fork()
if pid == 0:
    signal.alarm(60)  # never outlive the test if the lock hangs
    try:
        t = _alloc.empty_cpu(BIG, torch.float32)
        t.fill_(1)
        del t
        ok = _alloc.cached_bytes() > 0
        u = _alloc.empty_cpu(BIG, torch.float32)
        ok = ok and _alloc.cached_bytes() == 0
        os._exit(0 if ok else 3)
    except BaseException:
        os._exit(4)
for _ in range(450):
    got, status = os.waitpid(pid, os.WNOHANG)
    if got:
        break
    time.sleep(0.1)
else:
    os.kill(pid, 9)
    raise SystemExit("child hung on the pool lock inherited from the fork")
done.set()
th.join()
assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, status
print("ok")
''')


# ------------------------------------------------------------ issue 8.17: env values
@pytest.mark.parametrize(
    "var,value",
    [("QLTY_GPU_HUGEPAGES", "flase"), ("QLTY_GPU_HUGEPAGES", "2"),
     ("QLTY_GPU_CPU_CACHE_MB", "1GB"), ("QLTY_GPU_CPU_CACHE_MB", "-5")],
)
@pytest.mark.parametrize("size", [BIG, (10, 10)])
def test_misspelled_env_values_raise_naming_the_variable(monkeypatch, var, value, size):
    monkeypatch.setenv(var, value)
    with pytest.raises(QltyError, match=var):
        _alloc.empty_cpu(size, torch.float32)


@pytest.mark.parametrize("value", ["0", "false", "Off", " no ", "FALSE"])
def test_hugepages_off_spellings(monkeypatch, value):
    monkeypatch.setenv("QLTY_GPU_HUGEPAGES", value)
    t, fresh = _alloc._alloc(BIG, torch.float32)
    del t
    assert not fresh and _alloc.cached_bytes() == 0


@pytest.mark.parametrize("value", ["1", "true", "On", "yes", ""])
def test_hugepages_on_spellings(monkeypatch, value):
    monkeypatch.setenv("QLTY_GPU_HUGEPAGES", value)
    t = _alloc.empty_cpu(BIG, torch.float32)
    del t
    assert _alloc.cached_bytes() > 0 or not _alloc._CAN
