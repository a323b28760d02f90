"""Every backend against an independent loop oracle on random 2-D and 3-D geometries.

Issue 8.1: no backend test drew a window of 1, so the deterministic Triton stitch ignoring
the z patch when the z window is 1 went unnoticed. The strategies here force the edge cases
often on every axis: window 1, window == image, odd sizes, steps of 1, == window and beyond
it (gaps: pixels no patch covers). The oracle cuts and sums patches with plain numpy loops
(patch starts from qlty's rule, nothing taken from the production code).

Checked per geometry and backend: unstitch exactly (and with a weight map), stitch without
weight, with weight, and with weight and norm (NaN where no patch covers a pixel, as qlty),
the gradient of unstitch against the oracle's adjoint and the gradient of stitch.

Backends: numba, torch, and Triton under the interpreter in its 'deterministic' and
'atomic' modes (tiny shapes, few examples: the interpreter is slow).
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from qlty_gpu.ops import available_backends, stitch, unstitch

MAX_SIZE = 7  # numba and torch; Triton's interpreter runs every program in Python: 5


# ------------------------------------------------------------------ oracle (numpy loops)
def _starts(size: int, window: int, step: int) -> list[int]:
    count = -(-(size - window) // step) + 1
    return [min(i * step, size - window) for i in range(count)]


def _origins(shape, window, step):
    return list(itertools.product(*[_starts(d, w, s) for d, w, s in zip(shape, window, step)]))


def oracle_unstitch(x: np.ndarray, window, step, weight=None) -> np.ndarray:
    orgs = _origins(x.shape[2:], window, step)
    out = np.empty((x.shape[0] * len(orgs), x.shape[1], *window), dtype=np.float64)
    for n in range(x.shape[0]):
        for k, org in enumerate(orgs):
            sl = tuple(slice(o, o + w) for o, w in zip(org, window))
            patch = x[(n, slice(None), *sl)].astype(np.float64)
            out[n * len(orgs) + k] = patch if weight is None else patch * weight
    return out


def oracle_stitch(p: np.ndarray, shape, step, weight=None, norm=None) -> np.ndarray:
    window = p.shape[2:]
    orgs = _origins(shape, window, step)
    n_img = p.shape[0] // len(orgs)
    out = np.zeros((n_img, p.shape[1], *shape), dtype=np.float64)
    for n in range(n_img):
        for k, org in enumerate(orgs):
            sl = tuple(slice(o, o + w) for o, w in zip(org, window))
            q = p[n * len(orgs) + k].astype(np.float64)
            out[(n, slice(None), *sl)] += q if weight is None else q * weight
    if norm is not None:
        with np.errstate(invalid="ignore", divide="ignore"):
            out = out / norm  # 0 / 0 = NaN where no patch covers a pixel
    return out


def oracle_norm(shape, window, step, weight) -> np.ndarray:
    norm = np.zeros(shape, dtype=np.float64)
    for org in _origins(shape, window, step):
        norm[tuple(slice(o, o + w) for o, w in zip(org, window))] += weight
    return norm


# ------------------------------------------------------------------ strategies
@st.composite
def axis(draw, size=None, window=None, max_size=MAX_SIZE):
    """(size, window, step) of one axis; window 1 and window == size come up often."""
    if size is None:
        odd = [d for d in (1, 3, 5, 7) if d <= max_size]
        size = draw(st.one_of(st.sampled_from(odd), st.integers(1, max_size)))
    if window is None:
        window = draw(st.one_of(st.just(1), st.just(size), st.integers(1, size)))
    step = draw(st.one_of(st.just(1), st.just(window), st.integers(1, window + 2)))
    return size, window, step


@st.composite
def geometry(draw, family: str, max_size: int = MAX_SIZE, max_n: int = 2):
    """(N, C, shape, window, step, dtype) of one family of geometries.

    ``2d``: any 2-D geometry. ``3d-zwin1``: 3-D with a z window of 1 on more than one
    slice (issue 8.1). ``3d``: every other 3-D geometry (z window > 1, or Z == 1).
    """
    yx = [draw(axis(max_size=max_size)), draw(axis(max_size=max_size))]
    max_z = min(5, max_size)
    if family == "2d":
        axes = yx
    elif family == "3d-zwin1":
        axes = [draw(axis(size=draw(st.integers(2, max_z)), window=1)), *yx]
    else:
        z = draw(st.integers(1, max_z))
        zw = 1 if z == 1 else draw(st.one_of(st.just(z), st.integers(2, z)))
        axes = [draw(axis(size=z, window=zw)), *yx]
    shape, window, step = (tuple(a[i] for a in axes) for i in range(3))
    n = draw(st.integers(1, max_n))
    c = draw(st.integers(1, 2))
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    return n, c, shape, window, step, dtype


# ------------------------------------------------------------------ the check
def _check(backend: str, mode: str, geom, seed: int) -> None:
    n, c, shape, window, step, dtype = geom
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((n, c, *shape), generator=g, dtype=dtype)
    w = torch.rand(window, generator=g, dtype=dtype) + 0.25
    w64 = w.double().numpy()
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
    kw = dict(backend=backend)

    # unstitch: a copy, exact; with a weight map, one multiply
    p = unstitch(x, window, step, **kw)
    want_p = oracle_unstitch(x.numpy(), window, step)
    assert p.dtype == dtype and p.shape == want_p.shape
    np.testing.assert_array_equal(p.double().numpy(), want_p)
    pw = unstitch(x, window, step, weight=w, **kw)
    np.testing.assert_allclose(pw.double().numpy(), oracle_unstitch(x.numpy(), window, step, w64),
                               **tol)

    # stitch: plain sum, weighted sum, weighted mean (NaN where nothing covers a pixel)
    y = torch.randn(p.shape, generator=g, dtype=dtype)
    yn = y.numpy()
    norm = torch.from_numpy(oracle_norm(shape, window, step, w64)).to(dtype)
    for weight, nrm in ((None, None), (w, None), (w, norm)):
        got = stitch(y, shape, step, weight=weight, norm=nrm, mode=mode, **kw)
        want = oracle_stitch(yn, shape, step, None if weight is None else w64,
                             None if nrm is None else nrm.double().numpy())
        assert got.dtype == dtype and got.shape == want.shape
        np.testing.assert_allclose(got.double().numpy(), want, equal_nan=True, **tol)

    # gradients: unstitch's is the oracle's adjoint (a plain stitch), stitch's an unstitch.
    # unstitch's backward stitches in the default mode ('deterministic' on Triton): checked
    # with that mode only, so an 'atomic' failure means the atomic kernel.
    if mode != "atomic":
        xg = x.clone().requires_grad_()
        (unstitch(xg, window, step, **kw) * y).sum().backward()
        np.testing.assert_allclose(xg.grad.double().numpy(), oracle_stitch(yn, shape, step),
                                   **tol)
    yg = y.clone().requires_grad_()
    out = stitch(yg, shape, step, weight=w, mode=mode, **kw)
    gout = torch.randn(out.shape, generator=g, dtype=dtype)
    (out * gout).sum().backward()
    np.testing.assert_allclose(yg.grad.double().numpy(),
                               oracle_unstitch(gout.numpy(), window, step, w64), **tol)


# ------------------------------------------------------------------ parametrisation
_HERE = available_backends("stitch", "cpu", torch.float32)
_CASES = [("numba", "auto", 40), ("torch", "auto", 40),
          ("triton", "deterministic", 6), ("triton", "atomic", 6)]
_FAMILIES = ("2d", "3d", "3d-zwin1")


def _params():
    for (backend, mode, examples), family in itertools.product(_CASES, _FAMILIES):
        marks = []
        if backend not in _HERE:
            marks.append(pytest.mark.skip(reason=f"backend {backend!r} cannot run here"))
        if backend == "triton":
            marks.append(pytest.mark.slow)
        yield pytest.param(backend, mode, family, examples, marks=marks,
                           id=f"{backend}-{mode}-{family}")


@pytest.mark.parametrize("backend,mode,family,examples", list(_params()))
def test_backend_matches_loop_oracle(backend, mode, family, examples):
    interp = backend == "triton"
    # the interpreter: smaller images, one image, and no shrinking (minutes per failure)
    phases = (Phase.explicit, Phase.generate) if interp else tuple(Phase)

    @settings(max_examples=examples, deadline=None, derandomize=True, database=None,
              phases=phases,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(geom=geometry(family, max_size=5 if interp else MAX_SIZE, max_n=1 if interp else 2),
           seed=st.integers(0, 2**16))
    def run(geom, seed):
        _check(backend, mode, geom, seed)

    run()


def test_oracle_by_hand():
    """The oracle against counts done by hand (guards the guard)."""
    assert _starts(7, 2, 3) == [0, 3, 5]
    assert _starts(5, 5, 2) == [0] and _starts(1, 1, 3) == [0]
    assert _starts(6, 4, 1) == [0, 1, 2]
    np.testing.assert_array_equal(oracle_norm((7,), (2,), (3,), np.ones(2)),
                                  [1, 1, 0, 1, 1, 1, 1])
    x = np.arange(12.0).reshape(1, 1, 3, 4)
    p = oracle_unstitch(x, (2, 2), (1, 2))
    assert p.shape == (4, 1, 2, 2) and p[3, 0].tolist() == [[6, 7], [10, 11]]
    np.testing.assert_array_equal(oracle_stitch(p, (3, 4), (1, 2))[0, 0],
                                  x[0, 0] * np.array([[1], [2], [1]]))
