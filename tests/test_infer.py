"""In-memory streaming inference against unstitch -> model -> stitch (reference ops)."""

from __future__ import annotations

import warnings

import pytest
import torch

import qlty_gpu
from qlty_gpu import NCYXQuilt, NCZYXQuilt, QltyError, infer
from qlty_gpu.geometry import QuiltPlan
from qlty_gpu.ops import stitch_reference, unstitch_reference
from qlty_gpu.weights import resolve_weight

SCHEMES = ["constant", "border", "gaussian", "hann", "tensor"]
GEOMS = [  # (shape (N, C, *S), window, step)
    ((2, 3, 23, 18), (8, 6), (5, 4)),
    ((1, 2, 9, 11, 10), (4, 5, 3), (3, 3, 2)),
    ((3, 1, 7, 5), (7, 1), (2, 1)),  # window == image on Y, window 1 on X
    ((1, 1, 6, 5, 9), (1, 5, 9), (1, 2, 4)),  # window 1 / == image
]


class Recorder(torch.nn.Module):
    """Wraps a model; records the batch sizes it saw."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.batches: list[int] = []

    def forward(self, x):
        self.batches.append(x.shape[0])
        return self.inner(x)


def conv(nd: int, cin: int, cout: int, seed: int = 0, dtype=torch.float32):
    torch.manual_seed(seed)
    cls = torch.nn.Conv2d if nd == 2 else torch.nn.Conv3d
    return cls(cin, cout, 3, padding=1).to(dtype)


def weight_spec(scheme, window):
    if scheme == "tensor":
        return torch.rand(window, generator=torch.Generator().manual_seed(3)) + 0.05
    return scheme


def oracle(model, x, window, step, scheme, **wkw):
    """unstitch -> model (all patches at once) -> weighted stitch / weight sum, float64."""
    p = unstitch_reference(x, list(window), list(step))
    with torch.no_grad():
        y = model(p).double()
    w_out = tuple(y.shape[2:])
    f = [wo / wi for wo, wi in zip(w_out, window)]
    shape = [round(d * s) for d, s in zip(x.shape[2:], f)]
    step_o = [round(s * g) for s, g in zip(step, f)]
    W = resolve_weight(weight_spec(scheme, w_out), w_out, **wkw).tensor(dtype=torch.float64)
    plan = QuiltPlan(tuple(shape), w_out, tuple(step_o))
    num = stitch_reference(y, shape, step_o, weight=W)
    den = stitch_reference(W.expand(plan.patches_per_image, 1, *w_out).contiguous(), shape, step_o)
    return num / den[0, 0]


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("geom", GEOMS)
def test_infer_equals_unstitch_model_stitch(geom, scheme):
    shape, window, step = geom
    x = torch.randn(shape)
    nd = len(window)
    model = Recorder(conv(nd, shape[1], 4))  # channel-changing model
    ref = oracle(model.inner, x, window, step, scheme, border=1, border_weight=0.3)
    plan = QuiltPlan(shape[2:], window, step)
    total = shape[0] * plan.patches_per_image
    for bs in sorted({1, 3, 7, total, total + 5}):  # 3, 7: do not divide the patch count
        model.batches.clear()
        got = infer(model, x, window, step, batch_size=bs, weight=weight_spec(scheme, window),
                    border=1, border_weight=0.3)
        assert got.dtype == torch.float32 and got.shape == ref.shape
        torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-5)
        assert max(model.batches) <= bs and sum(model.batches) == total  # never all at once


@pytest.mark.parametrize("modes", [("unstitch", "stitch"), ("views", "stitch"),
                                   ("unstitch", "windows")])
@pytest.mark.parametrize("geom", GEOMS[:2])
def test_gather_and_scatter_modes(monkeypatch, geom, modes):
    """The fused-op paths (CUDA's default scatter) give the same result as the CPU paths."""
    from qlty_gpu.stream import runner

    shape, window, step = geom
    x = torch.randn(shape)
    model = conv(len(window), shape[1], 2)
    base = infer(model, x, window, step, batch_size=5, weight="gaussian")
    monkeypatch.setattr(runner, "GATHER_MODE", modes[0])
    monkeypatch.setattr(runner, "SCATTER_MODE", modes[1])
    got = infer(model, x, window, step, batch_size=5, weight="gaussian")
    torch.testing.assert_close(got, base, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.double(), oracle(model, x, window, step, "gaussian"),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cls,shape,window,step", [
    (NCYXQuilt, (2, 3, 29, 21), (8, 8), (5, 6)),
    (NCZYXQuilt, (1, 2, 11, 9, 10), (4, 4, 5), (3, 2, 3)),
])
def test_quilt_infer_matches_quilt_stitch(cls, shape, window, step):
    q = cls(*shape[2:], window=window, step=step, border=1, border_weight=0.2)
    x = torch.randn(shape)
    model = conv(len(window), shape[1], 2)
    with torch.no_grad():
        ref, _ = q.stitch(model(q.unstitch(x)))
    got = q.infer(model, x, batch_size=5)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    q.weight = torch.rand(window) + 0.1  # an edited weight map is honoured
    with torch.no_grad():
        ref2, _ = q.stitch(model(q.unstitch(x)))
    torch.testing.assert_close(q.infer(model, x, batch_size=4), ref2, rtol=1e-5, atol=1e-5)
    with pytest.raises(QltyError, match="must have shape"):
        q.infer(model, x[..., :-1])


def test_numpy_input_and_default_step():
    x = torch.randn(1, 2, 15, 12)
    model = conv(2, 2, 3)
    got = infer(model, x.numpy(), 6, batch_size=4)
    torch.testing.assert_close(got.double(), oracle(model, x, (6, 6), (3, 3), "constant"),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("factor", [2, 0.5])
def test_spatial_scale_changes(factor):
    x = torch.randn(2, 3, 24, 20)
    torch.manual_seed(0)
    head = torch.nn.Conv2d(3, 2, 1)
    if factor == 2:
        model = torch.nn.Sequential(head, torch.nn.Upsample(scale_factor=2, mode="bilinear"))
    else:
        model = torch.nn.Sequential(head, torch.nn.AvgPool2d(2))
    for scheme in ("constant", "gaussian", "border"):
        got = infer(model, x, (8, 6), (4, 2), batch_size=5, weight=scheme, border=1,
                    border_weight=0.5)
        ref = oracle(model, x, (8, 6), (4, 2), scheme, border=1, border_weight=0.5)
        assert got.shape == (2, 2, int(24 * factor), int(20 * factor))
        torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-5)


def test_scale_that_misses_pixels_is_refused():
    model = torch.nn.AvgPool2d(2)
    with pytest.raises(QltyError, match="whole pixels"):
        infer(model, torch.randn(1, 1, 21, 20), (8, 8), (4, 4))  # 21 / 2
    with pytest.raises(QltyError, match="must have shape"):
        infer(lambda t: t[:, :, 0], torch.randn(1, 1, 12, 12), 4, 2)
    with pytest.raises(QltyError, match="tensor"):
        infer(lambda t: [1, 2], torch.randn(1, 1, 12, 12), 4, 2)


def test_tuple_and_dict_outputs():
    x = torch.randn(1, 2, 17, 13)
    a, b = conv(2, 2, 3, 1), conv(2, 2, 1, 2)
    tup = infer(lambda t: (a(t), b(t)), x, (6, 5), (4, 3), batch_size=3, weight="hann")
    dic = infer(lambda t: {"seg": a(t), "aux": b(t)}, x, (6, 5), (4, 3), batch_size=3,
                weight="hann")
    assert isinstance(tup, tuple) and list(dic) == ["seg", "aux"]
    for m, t, d in ((a, tup[0], dic["seg"]), (b, tup[1], dic["aux"])):
        ref = oracle(m, x, (6, 5), (4, 3), "hann")
        torch.testing.assert_close(t.double(), ref, rtol=1e-5, atol=1e-5)
        assert torch.equal(t, d)


def test_dtypes():
    x = torch.randn(1, 2, 14, 10, dtype=torch.float64)
    m64 = conv(2, 2, 2, dtype=torch.float64)
    got = infer(m64, x, 5, 3)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, oracle(m64, x, (5, 5), (3, 3), "constant"))
    half = infer(conv(2, 2, 2), x.float(), 5, 3, out_dtype=torch.float16)
    assert half.dtype == torch.float16
    labels = infer(lambda t: (t[:, :1] > 0).to(torch.uint8), x.float(), 5, 3)
    assert labels.dtype == torch.float32 and float(labels.max()) <= 1.0


def test_mixed_precision_keeps_fp32_accumulation():
    # 8 x 8 = 64 windows cover each interior pixel: a bf16 accumulator would be off by
    # ~64 * 2^-8 relative to the values; fp32 accumulation of bf16 outputs stays within
    # the bf16 rounding of a single output (2^-8 relative).
    x = torch.rand(1, 1, 24, 24) * 100 + 200
    ref = x.clone()
    for kw in (dict(model_dtype=torch.bfloat16), dict(amp=torch.bfloat16)):
        to_bf16 = "amp" in kw

        def model(t, to_bf16=to_bf16):
            return t.to(torch.bfloat16) if to_bf16 else t

        got = infer(model, x, 8, 1, batch_size=9, weight="gaussian", **kw)
        assert got.dtype == torch.float32
        err = (got - ref).abs().max().item()
        assert err <= 2**-8 * ref.abs().max().item(), err
    # the bound is tight enough to catch low-precision accumulation
    bad = x.to(torch.bfloat16)
    acc = torch.zeros_like(bad)
    for _ in range(64):
        acc += bad
    assert ((acc.float() / 64) - ref).abs().max().item() > 2**-8 * ref.abs().max().item()


def test_amp_runs_model_under_autocast():
    seen = []

    def model(t):
        seen.append(torch.is_autocast_enabled("cpu"))
        return t * 2

    infer(model, torch.randn(1, 1, 8, 8), 4, 2, amp=True)
    assert seen and all(seen)
    seen.clear()
    infer(model, torch.randn(1, 1, 8, 8), 4, 2)
    assert seen and not any(seen)


def test_pad_last_batch_compiles_once():
    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append(tuple(example_inputs[0].shape) if example_inputs else ())
        return gm.forward

    x = torch.randn(1, 2, 20, 17)
    net = conv(2, 2, 3)
    total = QuiltPlan((20, 17), (8, 8), (4, 3)).patches_per_image
    assert total % 6 != 0
    torch._dynamo.reset()
    compiled = torch.compile(net, fullgraph=True, backend=counting_backend)
    got = infer(compiled, x, 8, (4, 3), batch_size=6, pad_last_batch=True)
    assert len(graphs) == 1
    torch.testing.assert_close(got.double(), oracle(net, x, (8, 8), (4, 3), "constant"),
                               rtol=1e-5, atol=1e-5)
    graphs.clear()
    torch._dynamo.reset()
    compiled = torch.compile(net, fullgraph=True, backend=counting_backend)
    infer(compiled, x, 8, (4, 3), batch_size=6)  # without padding the last batch recompiles
    assert len(graphs) == 2
    torch._dynamo.reset()


def test_grad_flows_to_model_parameters():
    x = torch.randn(1, 2, 13, 11)
    net = conv(2, 2, 2)
    y = infer(net, x, 5, 3, batch_size=4, weight="gaussian", grad=True)
    assert y.requires_grad
    y.square().mean().backward()
    g = net.weight.grad.clone()
    net.zero_grad()
    p = unstitch_reference(x, [5, 5], [3, 3])
    W = resolve_weight("gaussian", (5, 5)).tensor()
    plan = QuiltPlan((13, 11), (5, 5), (3, 3))
    den = stitch_reference(W.expand(plan.patches_per_image, 1, 5, 5).contiguous(), [13, 11], [3, 3])
    ref = stitch_reference(net(p), [13, 11], [3, 3], weight=W) / den[0, 0]
    ref.square().mean().backward()
    torch.testing.assert_close(g, net.weight.grad, rtol=1e-4, atol=1e-6)
    assert not infer(net, x, 5, 3).requires_grad  # no_grad by default


def test_oom_fallback_halves_batch_and_is_remembered():
    x = torch.randn(2, 1, 16, 16)

    class Fussy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = torch.nn.Parameter(torch.tensor(2.0))
            self.batches = []

        def forward(self, t):
            self.batches.append(t.shape[0])
            if t.shape[0] > 3:  # what the CUDA caching allocator raises
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
            return t * self.scale

    model = Fussy()
    with pytest.warns(RuntimeWarning, match="out of memory.*batch_size=3") as rec:
        got = infer(model, x, 8, 4, batch_size=13)
    assert len(rec) == 1  # warned once
    assert model.batches[:3] == [13, 6, 3]
    torch.testing.assert_close(got, 2 * x)
    model.batches.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = infer(model, x, 8, 4, batch_size=13)  # remembered: no OOM, no warning
    assert max(model.batches) == 3
    torch.testing.assert_close(again, got)

    def always(t):
        raise torch.OutOfMemoryError("CUDA out of memory.")

    with pytest.raises(torch.OutOfMemoryError):
        infer(always, x, 8, 4, batch_size=2)

    def broken(t):
        raise RuntimeError("something else")

    with pytest.raises(RuntimeError, match="something else"):
        infer(broken, x, 8, 4)


@pytest.mark.parametrize("nd", [2, 3])
def test_reductions(nd):
    shape = (2, 2, 19, 14) if nd == 2 else (1, 2, 9, 10, 7)
    window = (7, 5) if nd == 2 else (4, 5, 3)
    step = (4, 3) if nd == 2 else (2, 3, 2)
    x = torch.randn(shape)
    net = conv(nd, 2, 5)
    full = infer(net, x, window, step, batch_size=5, weight="gaussian")
    am = infer(net, x, window, step, batch_size=5, weight="gaussian", reduce="argmax")
    assert am.shape == (shape[0], 1, *shape[2:]) and am.dtype == torch.int64
    assert torch.equal(am, full.argmax(1, keepdim=True))
    sm = infer(net, x, window, step, batch_size=5, weight="gaussian", reduce="softmax")
    torch.testing.assert_close(sm, full.softmax(1))
    top2 = infer(net, x, window, step, batch_size=5, weight="gaussian",
                 reduce=lambda t: t[:, :2] * 2)
    torch.testing.assert_close(top2, full[:, :2] * 2)
    with pytest.raises(QltyError, match="reduce"):
        infer(net, x, window, step, reduce="max")
    with pytest.raises(QltyError, match="reduce callable"):
        infer(net, x, window, step, reduce=lambda t: t.sum())


def test_progress_bar(capsys):
    pytest.importorskip("tqdm")
    infer(torch.nn.Identity(), torch.randn(1, 1, 12, 12), 4, 2, progress=True)
    assert "patch" in capsys.readouterr().err


def test_bad_arguments():
    x = torch.randn(1, 1, 12, 12)
    net = torch.nn.Identity()
    with pytest.raises(QltyError, match="batch_size"):
        infer(net, x, 4, 2, batch_size=0)
    with pytest.raises(QltyError, match="weight must be one of"):
        infer(net, x, 4, 2, weight="box")
    with pytest.raises(QltyError, match="window"):
        infer(net, x, 13, 2)
    with pytest.raises(QltyError, match="shape"):
        infer(net, torch.randn(12, 12), 4, 2)
    with pytest.raises(QltyError, match="callable"):
        infer("model", x, 4, 2)
    with pytest.raises(QltyError, match="amp"):
        infer(net, x, 4, 2, amp="yes")
    with pytest.raises(QltyError, match="device"):
        infer(net, x, 4, 2, device="gpu0")
    with pytest.raises(QltyError, match="only apply when writing"):
        infer(net, x, 4, 2, resume=True)
    with pytest.raises(QltyError, match="window shape"):
        infer(net, x, 4, 2, weight=torch.ones(3, 3))


def test_public_name():
    assert qlty_gpu.infer is infer and "infer" in qlty_gpu.__all__


@pytest.mark.gpu
def test_cuda_devices_and_accumulate_on_cpu():  # pragma: no cover - needs CUDA
    x = torch.randn(2, 3, 70, 65)
    net = conv(2, 3, 4)
    ref = infer(net, x, 16, 8, batch_size=7, weight="gaussian")
    net_cuda = conv(2, 3, 4).cuda()
    got = infer(net_cuda, x.cuda(), 16, 8, batch_size=7, weight="gaussian")
    assert got.is_cuda
    torch.testing.assert_close(got.cpu(), ref, rtol=1e-4, atol=1e-4)
    got = infer(net_cuda, x, 16, 8, batch_size=7, weight="gaussian", accumulate_device="cpu")
    assert got.device.type == "cpu"
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    got = infer(net_cuda, x, 16, 8, batch_size=7, amp=True)
    assert got.dtype == torch.float32


@pytest.mark.gpu
def test_cuda_oom_moves_accumulation_to_cpu_first():  # pragma: no cover - needs CUDA
    x = torch.randn(1, 2, 40, 40, device="cuda")
    calls = []

    def model(t):
        calls.append(t.shape[0])
        if len(calls) == 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.00 GiB")
        return t * 3

    with pytest.warns(RuntimeWarning, match="accumulating on the CPU"):
        got = infer(model, x, 8, 4, batch_size=8)
    assert got.device.type == "cpu" and calls[1] == calls[2] == 8  # same batch retried
    torch.testing.assert_close(got, 3 * x.cpu())
