"""Regression tests of issue 8 (items 1-9, 16 and the ops/quilt-level parts of 17).

Each test reproduces the case the issue gives and asserts the correct behaviour (against
qlty 1.5.0, an independent loop oracle written here, or the contract the issue states).
Tests of defects not fixed yet are ``xfail(strict=True)``: they fail today, and the strict
mark turns into a failure the moment the fix lands, so whoever fixes an item removes its
mark. Where the issue allows alternatives ("implement forward mode or raise a clear
error"), either correct outcome passes; a silent wrong value never does.

Only public entry points are used: ``qlty_gpu.ops.unstitch/stitch``, the quilts,
``QuiltPlan`` and ``backend=`` arguments.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from qlty_gpu import NCYXQuilt, NCZYXQuilt
from qlty_gpu.errors import QltyError
from qlty_gpu.geometry import QuiltPlan
from qlty_gpu.ops import stitch, unstitch


def _xfail(item: str, what: str):
    return pytest.mark.xfail(strict=True, reason=f"issue 8.{item}: {what}")


# ------------------------------------------------------------------ loop oracle
# Independent of the production code: starts follow qlty's rule (regular steps, the last
# patch clamped to the edge), patches are cut and summed with plain Python loops.
def _starts(size: int, window: int, step: int) -> list[int]:
    count = -(-(size - window) // step) + 1
    return [min(i * step, size - window) for i in range(count)]


def _origins(shape, window, step) -> list[tuple[int, ...]]:
    return list(itertools.product(*[_starts(d, w, s) for d, w, s in zip(shape, window, step)]))


def oracle_unstitch(x: torch.Tensor, window, step, weight=None) -> torch.Tensor:
    """(N, C, *S) -> (N*P, C, *window), float64, differentiable (torch ops in loops)."""
    out = []
    for n in range(x.shape[0]):
        for org in _origins(x.shape[2:], window, step):
            sl = tuple(slice(o, o + w) for o, w in zip(org, window))
            patch = x[(n, slice(None), *sl)].to(torch.float64)
            if weight is not None:
                patch = patch * weight.to(torch.float64)
            out.append(patch)
    return torch.stack(out)


def oracle_stitch(p: torch.Tensor, shape, step, weight=None, norm=None) -> torch.Tensor:
    """(N*P, C, *window) -> (N, C, *shape), float64, differentiable; divides by ``norm``
    where it is non-zero and gives 0 where it is zero (no patch covers the pixel)."""
    window = tuple(p.shape[2:])
    orgs = _origins(shape, window, step)
    n_img = p.shape[0] // len(orgs)
    rows = []
    for n in range(n_img):
        acc = torch.zeros((p.shape[1], *shape), dtype=torch.float64)
        for k, org in enumerate(orgs):
            sl = tuple(slice(o, o + w) for o, w in zip(org, window))
            q = p[n * len(orgs) + k].to(torch.float64)
            if weight is not None:
                q = q * weight.to(torch.float64)
            pad = torch.zeros_like(acc)
            pad[(slice(None), *sl)] = q
            acc = acc + pad
        rows.append(acc)
    out = torch.stack(rows)
    if norm is not None:
        nd = norm.to(torch.float64)
        out = torch.where(nd != 0, out / torch.where(nd != 0, nd, torch.ones_like(nd)), 0.0)
    return out


def oracle_norm(shape, window, step, weight=None) -> torch.Tensor:
    w = torch.ones(window, dtype=torch.float64) if weight is None else weight.double()
    n_p = len(_origins(shape, window, step))
    return oracle_stitch(w.expand(n_p, 1, *window), shape, step)[0, 0]


# ============================================================ 1. Triton z window 1
def test_1_triton_deterministic_round_trip_z_window_1():
    q = NCZYXQuilt(3, 5, 7, window=(1, 4, 7), step=(1, 1, 7), border=None)
    x = torch.randn(1, 2, 3, 5, 7)
    p = q.unstitch(x, backend="triton")
    y, _ = q.stitch(p, backend="triton", mode="deterministic")
    torch.testing.assert_close(y, x, rtol=1e-6, atol=1e-6)


def test_1_triton_deterministic_stitch_z_window_1_matches_oracle():
    window, step, shape = (1, 4, 7), (1, 1, 7), (3, 5, 7)
    n_p = len(_origins(shape, window, step))
    p = torch.randn(2 * n_p, 2, *window, dtype=torch.float64)
    w = torch.rand(window, dtype=torch.float64) + 0.5
    got = stitch(p, shape, step, weight=w, backend="triton", mode="deterministic")
    torch.testing.assert_close(got, oracle_stitch(p, shape, step, w))


def test_1_triton_unstitch_gradient_z_window_1():
    window, step = (1, 4, 7), (1, 1, 7)
    x = torch.randn(1, 2, 3, 5, 7, requires_grad=True)
    y = unstitch(x, window, step, backend="triton")
    g = torch.randn_like(y)
    (y * g).sum().backward()
    want = oracle_stitch(g, (3, 5, 7), step).float()
    torch.testing.assert_close(x.grad, want, rtol=1e-5, atol=1e-5)


# ============================================================ 2. compile and weight edits
def _quilt2():
    return NCYXQuilt(9, 11, (4, 5), (2, 3), border=1, border_weight=0.2)


def _compiled_matches_eager(q, edit) -> None:
    p = torch.randn(2 * q.plan.patches_per_image, 1, 4, 5)
    f = torch.compile(lambda t: q.stitch(t)[0], backend="eager")
    f(p)  # compiled with the original map
    edit(q)
    try:
        got = f(p)  # before any eager call (an eager stitch would re-examine the map)
    except QltyError:
        return  # "document and raise" is an accepted outcome
    torch.testing.assert_close(got, q.stitch(p)[0])


def test_2_compiled_stitch_sees_in_place_weight_edit():
    torch.manual_seed(1)
    _compiled_matches_eager(_quilt2(), lambda q: q.weight.mul_(torch.rand(4, 5) + 0.5))


def test_2_compiled_stitch_sees_reassigned_weight():
    torch.manual_seed(2)

    def reassign(q):
        q.weight = torch.rand(4, 5) + 0.5

    _compiled_matches_eager(_quilt2(), reassign)


# ============================================================ 3. edits through .numpy()/.data
def _qlty_pair():
    import qlty

    args = (9, 11, (4, 5), (2, 3))
    return NCYXQuilt(*args, border=1, border_weight=0.2), qlty.NCYXQuilt(
        *args, border=1, border_weight=0.2
    )


@pytest.mark.parametrize(
    "how",
    [
        "numpy",
        "data",
    ],
)
def test_3_weight_edits_through_numpy_and_data_count_like_qlty(how):
    ours, ref = _qlty_pair()
    p = torch.randn(2 * ours.plan.patches_per_image, 2, 4, 5)
    ours.stitch(p)  # the map has been examined once before the edit
    new = torch.rand(4, 5) + 0.5
    for q in (ours, ref):
        if how == "numpy":
            q.weight.numpy()[...] = new.numpy()
        else:
            q.weight.data.copy_(new)
    got, got_norm = ours.stitch(p)
    want, want_norm = ref.stitch(p, use_numba=False)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_norm, want_norm.to(got_norm.dtype), rtol=1e-5, atol=1e-5)


# ============================================================ 4. plan hands out its cache
_PLAN_ARGS = ((9, 11), (4, 5), (2, 3), 1, 0.2)


def _try_edit(t: torch.Tensor) -> None:
    try:
        t.mul_(0).add_(3)
    except Exception:  # a read-only result refusing the edit is fine
        pass


@pytest.mark.parametrize(
    "method",
    [
        m
        for m in ("norm", "weight", "origins", "border_mask")
    ],
)
def test_4_plan_tables_survive_user_edits(method):
    plan, fresh = QuiltPlan(*_PLAN_ARGS), QuiltPlan(*_PLAN_ARGS)
    _try_edit(getattr(plan, method)())
    assert torch.equal(getattr(plan, method)(), getattr(fresh, method)())


def test_4_quilt_stitch_survives_edit_of_plan_norm():
    q = _quilt2()
    p = torch.randn(q.plan.patches_per_image, 1, 4, 5)
    want = q.stitch(p)[0].clone()
    _try_edit(q.plan.norm())
    _try_edit(q.plan.weight())
    torch.testing.assert_close(q.stitch(p)[0], want)


# ============================================================ 5. wide integers
@pytest.mark.parametrize(
    "dtype,values",
    [
        (torch.int32, [2**31 - 1, -(2**31), 2**31 - 3, 123456789]),
        (torch.int64, [2**40 + 1, -(2**45) - 1, 2**31 - 1, 3]),
    ],
)
def test_5_weighted_unstitch_keeps_wide_integers(dtype, values):
    q = NCYXQuilt(6, 6, (3, 3), (3, 3), border=None)
    x = torch.tensor(values, dtype=dtype).repeat(9).reshape(1, 1, 6, 6)
    got = q.unstitch(x, weighted=True)  # weight 1 everywhere: the values are exact
    want = oracle_unstitch(x, (3, 3), (3, 3))
    assert torch.equal(got.to(torch.float64), want), "wide integer values were rounded"


@pytest.mark.parametrize("backend", ["numba", "torch", "triton"])
def test_5_ops_weighted_unstitch_int32(backend):
    x = torch.full((1, 1, 5, 5), 2**31 - 1, dtype=torch.int32)
    got = unstitch(x, (3, 3), (2, 2), weight=torch.ones(3, 3), backend=backend)
    assert torch.equal(got.to(torch.float64), oracle_unstitch(x, (3, 3), (2, 2)))


# ============================================================ 6. positions in half precision
@pytest.mark.parametrize("dtype,width", [(torch.bfloat16, 300), (torch.float16, 2100)])
def test_6_unnormalised_positions_are_exact(dtype, width):
    window, step = (2, 4), (2, 4)
    q = NCYXQuilt(2, width, window, step, border=None)
    x = torch.zeros(1, 1, 2, width, dtype=dtype)
    p = q.unstitch(x, add_positional_channels=True, normalize_positions=False)
    orgs = torch.tensor(_origins((2, width), window, step), dtype=torch.float64)
    want_y = orgs[:, 0, None, None] + torch.arange(2.0, dtype=torch.float64)[:, None]
    want_x = orgs[:, 1, None, None] + torch.arange(4.0, dtype=torch.float64)[None, :]
    assert torch.equal(p[:, 1].to(torch.float64), want_y.expand(-1, 2, 4))
    assert torch.equal(p[:, 2].to(torch.float64), want_x.expand(-1, 2, 4))


# ============================================================ 7. autograd
_GAP = ((7, 7), (2, 2), (3, 3))  # shape, window, step: pixels no patch covers


def test_7_double_backward_through_gaps_is_zero_there():
    shape, window, step = _GAP
    n_p = len(_origins(shape, window, step))
    norm = oracle_norm(shape, window, step).float()
    p = torch.randn(n_p, 1, *window, requires_grad=True)
    out = stitch(p, shape, step, norm=norm)
    g = torch.randn_like(out, requires_grad=True)
    (gp,) = torch.autograd.grad(out, p, g, create_graph=True)
    v = torch.randn_like(gp)
    (gg,) = torch.autograd.grad((gp * v).sum(), g)
    # d/dg <unstitch(g / norm), v> = stitch(v) / norm where covered, 0 in the gaps
    want = oracle_stitch(v, shape, step, norm=norm).float()
    assert torch.isfinite(gg).all(), "NaN/inf in the double backward"
    torch.testing.assert_close(gg, want, rtol=1e-5, atol=1e-6)


def _jvp_or_clear_error(f, x, t, want) -> None:
    try:
        _, tangent = torch.func.jvp(f, (x,), (t,))
    except QltyError:
        return
    torch.testing.assert_close(tangent.double(), want, rtol=1e-6, atol=1e-6)


def test_7_jvp_of_unstitch():
    x, t = torch.randn(1, 2, 7, 9), torch.randn(1, 2, 7, 9)
    _jvp_or_clear_error(
        lambda z: unstitch(z, (3, 4), (2, 3)), x, t, oracle_unstitch(t, (3, 4), (2, 3))
    )


def test_7_jvp_of_stitch():
    n_p = len(_origins((7, 9), (3, 4), (2, 3)))
    p, t = torch.randn(n_p, 2, 3, 4), torch.randn(n_p, 2, 3, 4)
    _jvp_or_clear_error(lambda z: stitch(z, (7, 9), (2, 3)), p, t, oracle_stitch(t, (7, 9), (2, 3)))


def test_7_forward_ad_dual_through_unstitch():
    import torch.autograd.forward_ad as fwAD

    x, t = torch.randn(1, 1, 7, 9), torch.randn(1, 1, 7, 9)
    try:
        with fwAD.dual_level():
            out = unstitch(fwAD.make_dual(x, t), (3, 4), (2, 3))
            tangent = fwAD.unpack_dual(out).tangent
    except QltyError:
        return
    assert tangent is not None, "forward-mode AD silently dropped the tangent"
    torch.testing.assert_close(tangent.double(), oracle_unstitch(t, (3, 4), (2, 3)))


def _grad_or_clear_error(run, leaves, want_grads) -> None:
    """``run()`` builds the loss; each leaf must get the oracle's gradient, or we raise."""
    try:
        run().backward()
    except QltyError:
        return
    for leaf, want in zip(leaves, want_grads):
        assert leaf.grad is not None, "a tensor that requires grad got no gradient, silently"
        torch.testing.assert_close(leaf.grad.double(), want, rtol=1e-5, atol=1e-6)


def test_7_stitch_weight_and_norm_get_gradients():
    shape, window, step = (7, 9), (3, 4), (2, 3)
    n_p = len(_origins(shape, window, step))
    p = torch.randn(n_p, 2, *window, dtype=torch.float64)
    g = torch.randn(1, 2, *shape, dtype=torch.float64)
    w0 = torch.rand(window, dtype=torch.float64) + 0.5
    n0 = oracle_norm(shape, window, step, w0)
    w_ref, n_ref = w0.clone().requires_grad_(), n0.clone().requires_grad_()
    (oracle_stitch(p, shape, step, w_ref, n_ref) * g).sum().backward()
    w, n = w0.clone().requires_grad_(), n0.clone().requires_grad_()
    _grad_or_clear_error(
        lambda: (stitch(p, shape, step, weight=w, norm=n) * g).sum(), (w, n),
        (w_ref.grad, n_ref.grad),
    )


def test_7_unstitch_weight_gets_gradient():
    window, step = (3, 4), (2, 3)
    x = torch.randn(2, 2, 7, 9, dtype=torch.float64)
    w0 = torch.rand(window, dtype=torch.float64) + 0.5
    g = torch.randn(2 * len(_origins((7, 9), window, step)), 2, *window, dtype=torch.float64)
    w_ref = w0.clone().requires_grad_()
    (oracle_unstitch(x, window, step, w_ref) * g).sum().backward()
    w = w0.clone().requires_grad_()
    _grad_or_clear_error(
        lambda: (unstitch(x, window, step, weight=w) * g).sum(), (w,), (w_ref.grad,)
    )


# ============================================================ 8. meta-device arguments
_BACKENDS_HERE = ["numba", "torch", "triton"]


@pytest.mark.parametrize("backend", _BACKENDS_HERE)
@pytest.mark.parametrize("arg", ["stitch weight", "stitch norm", "unstitch weight"])
def test_8_meta_device_weight_or_norm_is_refused(backend, arg):
    op, name = arg.split()
    with pytest.raises(QltyError, match=name):
        if op == "stitch":
            meta = torch.ones((3, 3) if name == "weight" else (6, 6), device="meta")
            stitch(torch.randn(4, 1, 3, 3), (6, 6), (3, 3), backend=backend, **{name: meta})
        else:
            unstitch(torch.randn(1, 1, 6, 6), (3, 3), (3, 3), backend=backend,
                     weight=torch.ones(3, 3, device="meta"))


# ============================================================ 9. weighted unstitch map
def test_9_weighted_unstitch_uses_the_replaced_map():
    q = _quilt2()
    x = torch.randn(2, 1, 9, 11)
    new = torch.rand(4, 5) + 0.5
    q.weight = new
    torch.testing.assert_close(q.unstitch(x, weighted=True), q.unstitch(x) * new)


def test_9_weighted_unstitch_sees_in_place_edit():
    q = _quilt2()
    x = torch.randn(2, 1, 9, 11)
    q.weight.mul_(0.5)
    torch.testing.assert_close(q.unstitch(x, weighted=True), q.unstitch(x) * q.weight)


# ============================================================ 16. inductor on meta tensors
def test_16_inductor_compiles_quilt_stitch_on_meta():
    q = NCYXQuilt(9, 11, (3, 4), (2, 3), border=1, border_weight=0.1)  # fresh plan cache
    p = torch.empty(2 * q.plan.patches_per_image, 3, 3, 4, device="meta")
    out = torch.compile(lambda t: q.stitch(t)[0])(p)
    assert out.device.type == "meta" and tuple(out.shape) == (2, 3, 9, 11)


def test_16_inductor_compiles_quilt_round_trip_on_meta():
    q = NCZYXQuilt(5, 9, 11, (2, 3, 4), (2, 2, 3), border=1, border_weight=0.1)
    x = torch.empty(1, 2, 5, 9, 11, device="meta")
    out = torch.compile(lambda t: q.stitch(q.unstitch(t))[0])(x)
    assert out.device.type == "meta" and tuple(out.shape) == (1, 2, 5, 9, 11)


# ============================================================ 17. clear errors
def _correct_or_clear_error(run, check) -> None:
    try:
        got = run()
    except QltyError:
        return
    check(got)


def _exotic_inputs():
    x = torch.randn(1, 2, 9, 11)
    return {
        "float8": (x.to(torch.float8_e4m3fn), lambda t: t.float()),
        "sparse": (x.to_sparse(), lambda t: t.to_dense()),
        "quantized": (torch.quantize_per_tensor(x, 0.05, 128, torch.quint8),
                      lambda t: t.dequantize()),
    }


def _plain(t: torch.Tensor, to_plain) -> torch.Tensor:
    if t.is_quantized or t.layout != torch.strided or t.dtype == torch.float8_e4m3fn:
        return to_plain(t)
    return t


@pytest.mark.parametrize("kind", ["float8", "sparse", "quantized"])
@pytest.mark.parametrize("via", ["ops", "quilt"])
def test_17_exotic_tensor_input_to_unstitch(kind, via):
    x, to_plain = _exotic_inputs()[kind]
    q = NCYXQuilt(9, 11, (3, 4), (2, 3), border=None)

    def run():
        return unstitch(x, (3, 4), (2, 3)) if via == "ops" else q.unstitch(x)

    want = oracle_unstitch(to_plain(x), (3, 4), (2, 3))
    _correct_or_clear_error(
        run, lambda got: torch.testing.assert_close(_plain(got, to_plain).double(), want)
    )


@pytest.mark.parametrize(
    "kind",
    [
        "float8",  # already runs (numba refuses float8 stitch, so the torch backend runs it)
        "sparse",
        "quantized",
    ],
)
def test_17_exotic_tensor_input_to_stitch(kind):
    n_p = len(_origins((9, 11), (3, 4), (2, 3)))
    p0 = torch.rand(n_p, 2, 3, 4)
    p, to_plain = {
        "float8": (p0.to(torch.float8_e4m3fn), lambda t: t.float()),
        "sparse": (p0.to_sparse(), lambda t: t.to_dense()),
        "quantized": (torch.quantize_per_tensor(p0, 0.01, 0, torch.quint8),
                      lambda t: t.dequantize()),
    }[kind]
    want = oracle_stitch(to_plain(p), (9, 11), (2, 3))
    _correct_or_clear_error(
        lambda: stitch(p, (9, 11), (2, 3)),
        lambda got: torch.testing.assert_close(
            _plain(got, to_plain).double(), want, rtol=0.13, atol=0.02),
    )


def _numpy_variants(a: np.ndarray) -> dict:
    return {
        "flipped": a[..., ::-1],
        "big-endian": a.astype(a.dtype.newbyteorder(">")),
        "object": a.astype(object),
    }


@pytest.mark.parametrize("kind", ["flipped", "big-endian", "object"])
@pytest.mark.parametrize("method", ["unstitch", "stitch", "unstitch_data_pair"])
def test_17_awkward_numpy_arrays_to_the_quilt(kind, method):
    q = NCYXQuilt(9, 11, (3, 4), (2, 3), border=None)
    rng = np.random.default_rng(0)
    if method == "stitch":
        a = rng.random((q.plan.patches_per_image, 2, 3, 4)).astype(np.float32)
    else:
        a = rng.random((1, 2, 9, 11)).astype(np.float32)
    odd = _numpy_variants(a)[kind]
    plain = np.ascontiguousarray(odd, dtype=np.float32)

    def call(arr):
        if method == "unstitch":
            return q.unstitch(arr)
        if method == "stitch":
            return q.stitch(torch.as_tensor(arr) if arr is plain else arr)[0]
        return q.unstitch_data_pair(arr, arr)[1]

    want = np.asarray(call(plain), dtype=np.float64)
    _correct_or_clear_error(
        lambda: call(odd),
        lambda got: np.testing.assert_allclose(np.asarray(got, dtype=np.float64), want,
                                               rtol=1e-6),
    )


@pytest.mark.parametrize(
    "kwargs,name",
    [
        (dict(weight=[[1.0] * 4] * 3), "weight"),
        (dict(backend=1), "backend"),
        (dict(out_dtype="float16"), "out_dtype"),
        (dict(fill_mask=[[True] * 4] * 3), "fill_mask"),
    ],
)
def test_17_ops_unstitch_bad_arguments_raise_qlty_error(kwargs, name):
    with pytest.raises(QltyError, match=name):
        unstitch(torch.randn(1, 1, 9, 11), (3, 4), (2, 3), **kwargs)


def test_17_ops_weight_as_nested_list_exact_case():
    with pytest.raises(QltyError, match="weight"):
        unstitch(torch.randn(1, 1, 4, 4), (1, 1), (1, 1), weight=[[1]])


@pytest.mark.parametrize("method", ["unstitch", "stitch"])
def test_17_quilt_backend_not_a_string(method):
    q = NCYXQuilt(9, 11, (3, 4), (2, 3), border=None)
    with pytest.raises(QltyError, match="backend"):
        if method == "unstitch":
            q.unstitch(torch.randn(1, 1, 9, 11), backend=1)
        else:
            q.stitch(torch.randn(q.plan.patches_per_image, 1, 3, 4), backend=1)


@pytest.mark.parametrize(
    "kwargs,name",
    [
        (dict(weight=[[1.0] * 4] * 3), "weight"),
        (dict(norm=np.ones((9, 11))), "norm"),
        (dict(backend=1), "backend"),
    ],
)
def test_17_ops_stitch_bad_arguments_raise_qlty_error(kwargs, name):
    n_p = len(_origins((9, 11), (3, 4), (2, 3)))
    with pytest.raises(QltyError, match=name):
        stitch(torch.randn(n_p, 1, 3, 4), (9, 11), (2, 3), **kwargs)


@pytest.mark.parametrize(
    "call,name",
    [
        ("unstitch window", "window"),
        ("unstitch step", "step"),
        ("stitch shape", "shape"),
        ("stitch step", "step"),
    ],
)
def test_17_float_geometry_is_refused(call, name):
    x = torch.randn(1, 1, 9, 9)
    with pytest.raises(QltyError, match=name):
        if call == "unstitch window":
            unstitch(x, (3.9, 3), (2, 2))
        elif call == "unstitch step":
            unstitch(x, (3, 3), (2.5, 2))
        elif call == "stitch shape":
            stitch(torch.randn(16, 1, 3, 3), (8.9, 9), (2, 2))
        else:
            stitch(torch.randn(16, 1, 3, 3), (9, 9), (2.5, 2))


@pytest.mark.parametrize("value", [np.float32(1.0), np.int64(1), np.bool_(True)])
def test_17_numpy_scalar_fill_value_is_accepted(value):
    x = torch.randn(1, 1, 9, 11)
    mask = torch.zeros(3, 4, dtype=torch.bool)
    mask[0] = True
    got = unstitch(x, (3, 4), (2, 3), fill_mask=mask, fill_value=value)
    want = unstitch(x, (3, 4), (2, 3), fill_mask=mask, fill_value=value.item())
    assert torch.equal(got, want)


@pytest.mark.parametrize("case", ["ops unstitch", "ops stitch", "quilt unstitch"])
def test_17_bad_shape_under_fullgraph_surfaces_our_error(case):
    """Today the QltyError is buried in the 'Developer debug context' of a dynamo
    ``Unsupported`` (a RuntimeError): ``except QltyError`` no longer catches it."""
    q = NCYXQuilt(9, 9, (3, 3), (2, 2), border=None)
    f, x = {
        "ops unstitch": (lambda t: unstitch(t, (20, 20), (1, 1)), torch.randn(1, 1, 9, 9)),
        "ops stitch": (lambda t: stitch(t, (9, 9), (2, 2)), torch.randn(15, 1, 3, 3)),
        "quilt unstitch": (lambda t: q.unstitch(t), torch.randn(1, 1, 8, 9)),
    }[case]
    with pytest.raises(QltyError) as eager:
        f(x)
    with pytest.raises(QltyError) as compiled:
        torch.compile(f, fullgraph=True, backend="eager")(x)
    assert str(eager.value) in str(compiled.value)


def test_17_misspelled_backend_env_value_raises(monkeypatch):
    """QLTY_GPU_BACKEND with a typo already raises (passes today; kept as a guard)."""
    monkeypatch.setenv("QLTY_GPU_BACKEND", "numab")
    with pytest.raises(QltyError, match="QLTY_GPU_BACKEND"):
        unstitch(torch.randn(1, 1, 9, 11), (3, 4), (2, 3))


@pytest.mark.parametrize(
    "var,value", [("QLTY_GPU_HUGEPAGES", "flase"), ("QLTY_GPU_CPU_CACHE_MB", "1GB")]
)
def test_17_misspelled_alloc_env_values_are_not_ignored(monkeypatch, var, value):
    """Fixed in qlty_gpu/_alloc.py (failed before: the values were silently ignored)."""
    monkeypatch.setenv(var, value)
    x = torch.randn(1, 1, 64, 64)
    with pytest.raises(QltyError, match=var):
        # 1089 patches x 8 channels x 32 x 32 float32 = 35 MB: a pooled CPU buffer
        unstitch(x.expand(1, 8, 64, 64), (32, 32), (1, 1))


def test_zz_module_reference():
    """The loop oracle itself against a hand count (guards the guards)."""
    assert _starts(7, 2, 3) == [0, 3, 5] and _starts(5, 5, 2) == [0]
    norm = oracle_norm((7,), (2,), (3,))
    assert norm.tolist() == [1, 1, 0, 1, 1, 1, 1]
    assert math.prod(len(_starts(d, w, s)) for d, w, s in zip((9, 11), (3, 4), (2, 3))) == 16
