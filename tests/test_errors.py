"""Every error of the public entry points: a QltyError subclass whose message names the
argument, the value received and the expected form (design §4)."""

from __future__ import annotations

import re

import pytest
import torch

import qlty_gpu
from qlty_gpu import NCYXQuilt, NCZYXQuilt, QltyError
from qlty_gpu.errors import (
    QltyBackendError,
    QltyDependencyError,
    QltyShapeAssertionError,
    QltyTypeError,
    describe,
    require,
)
from qlty_gpu.ops import stitch, unstitch


def test_error_family():
    assert issubclass(QltyError, ValueError)
    assert issubclass(QltyTypeError, QltyError) and issubclass(QltyTypeError, TypeError)
    assert issubclass(QltyShapeAssertionError, QltyError)
    assert issubclass(QltyShapeAssertionError, AssertionError)
    assert issubclass(QltyBackendError, QltyError) and issubclass(QltyBackendError, RuntimeError)
    assert issubclass(QltyDependencyError, QltyError)
    assert issubclass(QltyDependencyError, ImportError)
    assert qlty_gpu.QltyError is QltyError


def test_describe_and_require():
    assert describe(torch.zeros(2, 3)) == "Tensor of shape (2, 3) and dtype torch.float32"
    assert describe([1, 2]) == "[1, 2]"
    assert describe("x" * 200).endswith("...") and len(describe("x" * 200)) == 80
    assert require("math", "none").sqrt(4) == 2
    with pytest.raises(QltyDependencyError, match=r"qlty_gpu\[io\]") as e:
        require("no_such_module_qlty_gpu_test", "io")
    assert isinstance(e.value, ImportError) and "no_such_module_qlty_gpu_test" in str(e.value)


Q2 = dict(Y=20, X=16, window=(8, 8), step=(4, 4), border=1)

# (callable, exception class, regex fragments that must all be in the message)
CONSTRUCTOR_CASES = {
    "window larger than image": (
        lambda: NCYXQuilt(10, 10, (11, 4), (2, 2), None), QltyError,
        [r"window \(11, 4\)", r"image \(10, 10\)", "axis Y", r"1 <= window <= image size"]),
    "window larger than image 3d": (
        lambda: NCZYXQuilt(8, 8, 8, (4, 9, 4), (2, 2, 2), None), QltyError,
        [r"window \(4, 9, 4\)", "axis Y", r"9 > 8"]),
    "step zero": (
        lambda: NCYXQuilt(10, 10, (4, 4), (0, 2), None), QltyError,
        [r"step\[0\]", ">= 1", "got 0", r"step=\(0, 2\)"]),
    "step negative": (
        lambda: NCYXQuilt(10, 10, (4, 4), (2, -3), None), QltyError,
        [r"step\[1\]", ">= 1", "got -3"]),
    "window zero": (
        lambda: NCYXQuilt(10, 10, (0, 4), (2, 2), None), QltyError,
        [r"window\[0\]", ">= 1", "got 0"]),
    "window too long": (
        lambda: NCYXQuilt(10, 10, (4, 4, 4), (2, 2), None), QltyError,
        ["window must have 2 elements", "got 3", r"\(4, 4, 4\)"]),
    "window too short": (
        lambda: NCYXQuilt(10, 10, (4,), (2, 2), None), QltyError,
        ["window must have 2 elements", "got 1"]),
    "window 3d too short": (
        lambda: NCZYXQuilt(8, 8, 8, (4, 4), 2, 1), QltyError,
        ["window must have 3 elements", "Z", "got 2"]),
    "step wrong length": (
        lambda: NCYXQuilt(10, 10, (4, 4), (2, 2, 2), None), QltyError,
        ["step must have 2 elements", "got 3"]),
    "window float": (
        lambda: NCYXQuilt(10, 10, 4.0, (2, 2), None), QltyTypeError,
        ["window must be an int or a tuple of 2 ints", "4.0", "float"]),
    "window float entry": (
        lambda: NCYXQuilt(10, 10, (4, 2.5), (2, 2), None), QltyTypeError,
        [r"window\[1\] must be an int", "2.5"]),
    "step string": (
        lambda: NCYXQuilt(10, 10, 4, "2", None), QltyTypeError,
        ["step must be an int or a tuple of 2 ints", "'2'"]),
    "size float": (
        lambda: NCYXQuilt(10.5, 10, 4, 2, None), QltyTypeError, ["Y", "10.5"]),
    "size zero": (
        lambda: NCYXQuilt(10, 0, 1, 1, None), QltyError, ["X", ">= 1", "0"]),
    "border list": (
        lambda: NCYXQuilt(10, 10, 4, 2, [1, 1]), QltyTypeError,
        ["border must be int, tuple, or None", "list", r"\[1, 1\]"]),
    "border float": (
        lambda: NCYXQuilt(10, 10, 4, 2, 1.0), QltyTypeError,
        ["border must be int, tuple, or None", "float", "1.0"]),
    "border float entry": (
        lambda: NCYXQuilt(10, 10, 4, 2, (1, 1.5)), QltyTypeError,
        [r"border\[1\] must be an int", "1.5"]),
    "border negative": (
        lambda: NCYXQuilt(10, 10, 4, 2, -2), QltyError, ["border must be >= 0", "-2"]),
    "border negative entry": (
        lambda: NCZYXQuilt(8, 8, 8, 4, 2, (1, -1, 1)), QltyError,
        [r"border\[1\] must be >= 0", "-1", r"\(1, -1, 1\)"]),
    "border tuple length 2d": (
        lambda: NCYXQuilt(10, 10, 4, 2, (1, 1, 1)), QltyError,
        ["border tuple must have 2 elements for 2D data, got 3"]),
    "border tuple length 3d": (
        lambda: NCZYXQuilt(8, 8, 8, 4, 2, (1, 1)), QltyError,
        ["border tuple must have 3 elements for 3D data, got 2"]),
    "border_weight above": (
        lambda: NCYXQuilt(10, 10, 4, 2, 1, 1.5), QltyError,
        [r"border_weight must be in \[0.0, 1.0\]", "1.5"]),
    "border_weight below": (
        lambda: NCZYXQuilt(8, 8, 8, 4, 2, 1, -0.25), QltyError,
        [r"border_weight must be in \[0.0, 1.0\]", "-0.25"]),
    "border_weight nan": (
        lambda: NCYXQuilt(10, 10, 4, 2, 1, float("nan")), QltyError,
        ["border_weight", "nan"]),
    "border_weight None": (
        lambda: NCYXQuilt(10, 10, 4, 2, 1, None), QltyTypeError,
        ["border_weight must be a float", "None"]),
    "border_weight bool": (
        lambda: NCYXQuilt(10, 10, 4, 2, 1, True), QltyTypeError, ["border_weight", "True"]),
}


def _check(fn, exc, fragments):
    with pytest.raises(exc) as info:
        fn()
    assert isinstance(info.value, QltyError), type(info.value)
    msg = str(info.value)
    for frag in fragments:
        assert re.search(frag, msg), (frag, msg)
    return info.value


@pytest.mark.parametrize("case", list(CONSTRUCTOR_CASES), ids=list(CONSTRUCTOR_CASES))
def test_constructor_errors(case):
    fn, exc, frags = CONSTRUCTOR_CASES[case]
    err = _check(fn, exc, frags)
    if exc is QltyTypeError:
        assert isinstance(err, TypeError)


def _q2():
    return NCYXQuilt(**Q2)


def _q3():
    return NCZYXQuilt(8, 9, 10, (4, 4, 4), (2, 3, 3), 1)


METHOD_CASES = {
    "unstitch not a tensor": (
        lambda: _q2().unstitch([[1.0]]), QltyTypeError,
        ["tensor must be a torch.Tensor or numpy.ndarray", r"\[\[1.0\]\]"]),
    "unstitch wrong X": (
        lambda: _q2().unstitch(torch.zeros(2, 1, 20, 17)), QltyError,
        [r"tensor must have shape \(N, C, Y, X\) with Y=20, X=16", r"\(2, 1, 20, 17\)"]),
    "unstitch larger Y": (
        lambda: _q2().unstitch(torch.zeros(1, 1, 40, 16)), QltyError,
        ["Y=20, X=16", r"\(1, 1, 40, 16\)"]),
    "unstitch rank": (
        lambda: _q2().unstitch(torch.zeros(20, 16)), QltyError,
        [r"\(N, C, Y, X\)", r"\(20, 16\)"]),
    "unstitch 3d rank": (
        lambda: _q3().unstitch(torch.zeros(1, 8, 9, 10)), QltyError,
        [r"\(N, C, Z, Y, X\) with Z=8, Y=9, X=10", r"\(1, 8, 9, 10\)"]),
    "position_mode": (
        lambda: _q2().unstitch(torch.zeros(1, 1, 20, 16), add_positional_channels=True,
                               position_mode="bogus"), QltyError,
        ["position_mode", "'absolute', 'relative'", "'bogus'"]),
    "stitch not a tensor": (
        lambda: _q2().stitch("patches"), QltyTypeError,
        ["ml_tensor must be a torch.Tensor or numpy.ndarray", "'patches'"]),
    "stitch window": (
        lambda: _q2().stitch(torch.zeros(12, 1, 8, 7)), QltyError,
        [r"ml_tensor must have shape \(M, C, wy, wx\) = \(M, C, 8, 8\)", r"\(12, 1, 8, 7\)"]),
    "stitch rank": (
        lambda: _q2().stitch(torch.zeros(12, 8, 8)), QltyError, [r"\(M, C, wy, wx\)"]),
    "stitch count": (
        lambda: _q2().stitch(torch.zeros(13, 1, 8, 8)), QltyShapeAssertionError,
        ["ml_tensor holds 13 patches", "multiple of the 12 patches per image", r"4 x 3"]),
    "stitch count 3d": (
        lambda: _q3().stitch(torch.zeros(5, 1, 4, 4, 4)), QltyShapeAssertionError,
        ["5 patches", "per image"]),
    "stitch backend": (
        lambda: _q2().stitch(torch.zeros(12, 1, 8, 8), backend="gpu"), QltyError,
        ["unknown backend 'gpu'", "backend=", "'triton', 'numba', 'torch'"]),
    "stitch mode": (
        lambda: _q2().stitch(torch.zeros(12, 1, 8, 8), mode="fast"), QltyError,
        ["mode must be one of", "'fast'"]),
    "pair N": (
        lambda: _q2().unstitch_data_pair(torch.zeros(2, 1, 20, 16), torch.zeros(1, 20, 16)),
        QltyShapeAssertionError, ["same number of images N", "got 2 and 1"]),
    "pair target shape": (
        lambda: _q2().unstitch_data_pair(torch.zeros(2, 1, 20, 16), torch.zeros(2, 20, 15)),
        QltyError, [r"tensor_out must have shape \(N, C, Y, X\)", r"\(2, 1, 20, 15\)"]),
    "pair input shape": (
        lambda: _q2().unstitch_data_pair(torch.zeros(2, 1, 20), torch.zeros(2, 20, 16)),
        QltyError, [r"tensor_in must have shape", r"\(2, 1, 20\)"]),
    "pair input type": (
        lambda: _q2().unstitch_data_pair([1], torch.zeros(2, 20, 16)), QltyTypeError,
        ["tensor_in must be a torch.Tensor"]),
    "pair missing_label string": (
        lambda: _q2().unstitch_data_pair(torch.zeros(2, 1, 20, 16), torch.zeros(2, 20, 16),
                                         missing_label="x"), QltyError,
        ["missing_label", "torch.float32", "'x'"]),
    "pair missing_label nan int": (
        lambda: _q2().unstitch_data_pair(torch.zeros(2, 1, 20, 16),
                                         torch.zeros(2, 20, 16, dtype=torch.int64),
                                         missing_label=float("nan")), QltyError,
        ["missing_label nan", "integer", "torch.int64"]),
    "pair 3d N": (
        lambda: _q3().unstitch_data_pair(torch.zeros(2, 1, 8, 9, 10), torch.zeros(1, 8, 9, 10)),
        QltyShapeAssertionError, ["got 2 and 1"]),
}


@pytest.mark.parametrize("case", list(METHOD_CASES), ids=list(METHOD_CASES))
def test_method_errors(case):
    fn, exc, frags = METHOD_CASES[case]
    err = _check(fn, exc, frags)
    if exc is QltyShapeAssertionError:
        assert isinstance(err, AssertionError)


def test_missing_label_out_of_range_for_target_dtype():
    with pytest.raises(QltyError, match="missing_label"):
        _q2().unstitch_data_pair(torch.zeros(2, 1, 20, 16),
                                 torch.zeros(2, 20, 16, dtype=torch.int8), missing_label=300)


OPS_CASES = {
    "unstitch x type": (lambda: unstitch([1], (2, 2), (1, 1)), ["x must be a torch.Tensor", r"\[1\]"]),
    "unstitch x rank": (
        lambda: unstitch(torch.zeros(3, 3), (2, 2), (1, 1)),
        [r"x must have shape \(N, C, \*spatial\)", r"\(3, 3\)"]),
    "unstitch window": (
        lambda: unstitch(torch.zeros(1, 1, 3, 3), (4, 2), (1, 1)),
        ["1 <= window <= image size", r"window=\[4, 2\]", r"image=\(3, 3\)"]),
    "unstitch step": (
        lambda: unstitch(torch.zeros(1, 1, 3, 3), (2, 2), (0, 1)), ["step >= 1", r"step=\[0, 1\]"]),
    "unstitch lengths": (
        lambda: unstitch(torch.zeros(1, 1, 3, 3), (2, 2, 2), (1, 1)),
        [r"window \[2, 2, 2\]", "must have 2 elements", r"spatial shape \(3, 3\)"]),
    "unstitch weight": (
        lambda: unstitch(torch.zeros(1, 1, 3, 3), (2, 2), (1, 1), weight=torch.ones(3, 3)),
        [r"weight must have the window shape \(2, 2\)", r"\(3, 3\)"]),
    "unstitch fill_mask": (
        lambda: unstitch(torch.zeros(1, 1, 3, 3), (2, 2), (1, 1), fill_mask=torch.ones(3)),
        [r"fill_mask must have the window shape \(2, 2\)", r"\(3,\)"]),
    "unstitch positions": (
        lambda: unstitch(torch.zeros(1, 1, 3, 3), (2, 2), (1, 1), positions="rel"),
        ["positions must be", "'absolute'", "'rel'"]),
    "stitch patches type": (lambda: stitch([1], (3, 3), (1, 1)), ["patches must be a torch.Tensor"]),
    "stitch dims": (
        lambda: stitch(torch.zeros(4, 1, 2, 2), (3, 3, 3), (1, 1, 1)),
        [r"patches must have shape \(M, C, \*window\) with 3 window dims", r"\(4, 1, 2, 2\)"]),
    "stitch window > image": (
        lambda: stitch(torch.zeros(4, 1, 4, 2), (3, 3), (1, 1)),
        ["1 <= window <= image size", r"window=\[4, 2\]"]),
    "stitch step length": (
        lambda: stitch(torch.zeros(4, 1, 2, 2), (3, 3), (1,)), [r"step \[1\]", "2 elements"]),
    "stitch weight": (
        lambda: stitch(torch.zeros(4, 1, 2, 2), (3, 3), (1, 1), weight=torch.ones(3, 2)),
        [r"weight must have the window shape \(2, 2\)", r"\(3, 2\)"]),
    "stitch norm": (
        lambda: stitch(torch.zeros(4, 1, 2, 2), (3, 3), (1, 1), norm=torch.ones(3, 2)),
        [r"norm must have the spatial shape \(3, 3\)", r"\(3, 2\)"]),
    "stitch mode": (
        lambda: stitch(torch.zeros(4, 1, 2, 2), (3, 3), (1, 1), mode="x"), ["mode must be one of"]),
}


@pytest.mark.parametrize("case", list(OPS_CASES), ids=list(OPS_CASES))
def test_ops_errors(case):
    fn, frags = OPS_CASES[case]
    _check(fn, QltyError, frags)


def test_ops_stitch_count_is_assertion():
    err = _check(lambda: stitch(torch.zeros(5, 1, 2, 2), (3, 3), (1, 1)),
                 QltyShapeAssertionError, ["5 patches", "multiple of the 4 patches per image"])
    assert isinstance(err, AssertionError)


def test_backend_errors(monkeypatch):
    err = _check(
        lambda: stitch(torch.zeros(4, 1, 2, 2, dtype=torch.complex64), (3, 3), (1, 1),
                       backend="numba"),
        QltyBackendError, ["backend 'numba' cannot run stitch", "torch.complex64", "float32"],
    )
    assert isinstance(err, RuntimeError)
    monkeypatch.setenv("QLTY_GPU_BACKEND", "cuda")
    _check(lambda: _q2().stitch(torch.zeros(12, 1, 8, 8)), QltyError,
           ["unknown backend 'cuda'", "QLTY_GPU_BACKEND", "'auto'"])
    monkeypatch.setenv("QLTY_GPU_BACKEND", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    _check(lambda: _q2().unstitch(torch.zeros(1, 1, 20, 16)), QltyBackendError,
           ["backend 'triton' cannot run unstitch"])


def test_missing_required_border_is_a_plain_type_error():
    """``border`` has no default (qlty's signature); Python's own TypeError is fine here."""
    with pytest.raises(TypeError, match="border"):
        NCYXQuilt(10, 10, 4, 2)  # type: ignore[call-arg]
    with pytest.raises(TypeError, match="border"):
        NCZYXQuilt(10, 10, 10, 4, 2)  # type: ignore[call-arg]
