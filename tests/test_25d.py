"""NCZYX25DQuilt against qlty 1.5.0 (where qlty is right) and an independent oracle.

The oracle pads the volume along z with ``np.pad`` (``edge`` = clamp, ``symmetric`` =
half-sample reflect, ``constant`` = zero) and reads ``z0 + offset`` from the padded volume,
one pixel plane at a time in float64: nothing is shared with the implementation.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qlty_gpu import NCZYX25DQuilt, QltyError, ZOperation
from qlty_gpu.backends_2_5D import InMemoryBackend, TensorLike3D
from qlty_gpu.qlty2_5D import apply_boundary_mode, parse_channel_spec

PAD_MODE = {"clamp": "edge", "reflect": "symmetric", "zero": "constant"}


def _groups(spec):
    """[(op_type_name, [group, ...])] in spec order (identity offsets as 1-groups)."""
    out = []
    for key, value in spec.items():
        name = key.name if isinstance(key, ZOperation) else key.upper()
        out.append((name, [(o,) for o in value] if name == "IDENTITY" else [tuple(g) for g in value]))
    return out


def oracle(vol, spec, mode, z_indices, acc="2d"):
    """float64 oracle of convert(): op -> input channel -> group, volume-relative."""
    v = vol.double().numpy()
    N, C, Z, Y, X = v.shape
    P = 2 * Z + 8
    if mode == "skip":
        padded = None
    elif mode == "reflect":
        # repeated half-sample mirroring: tile the symmetric period [0..Z-1, Z-1..0]
        period = np.concatenate([v, v[:, :, ::-1]], axis=2)
        reps = -(-(2 * P + Z) // (2 * Z)) + 2
        tiled = np.concatenate([period] * reps, axis=2)
        start = (-P) % (2 * Z)
        padded = tiled[:, :, start:start + Z + 2 * P]
    else:
        padded = np.pad(v, ((0, 0), (0, 0), (P, P), (0, 0), (0, 0)), mode=PAD_MODE[mode])
    rows = []
    for n in range(N):
        for z0 in z_indices:
            chans = []
            for name, groups in _groups(spec):
                for c in range(C):
                    for g in groups:
                        if mode == "skip":
                            members = [v[n, c, z0 + o] for o in g if 0 <= z0 + o < Z]
                        else:
                            members = [padded[n, c, z0 + o + P] for o in g]
                        s = np.stack(members)
                        chans.append(s[0] if name == "IDENTITY" else
                                     s.mean(0) if name == "MEAN" else s.std(0))
            rows.append(np.stack(chans))
    out = torch.from_numpy(np.stack(rows))  # (N*J, C', Y, X)
    if acc == "3d":
        J = len(z_indices)
        out = out.reshape(N, J, *out.shape[1:]).transpose(1, 2)
    return out


SPEC = {"identity": [-1, 0, 1], "mean": [[-1, 1], [-2, 2]], "std": [[-1, 0, 1]]}


def _vol(N=2, C=2, Z=7, Y=5, X=6, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(N, C, Z, Y, X, generator=g).to(dtype)


# ------------------------------------------------------------------ against qlty
qlty25 = pytest.importorskip("qlty.qlty2_5D")


@pytest.mark.parametrize("mode", ["clamp", "zero"])
@pytest.mark.parametrize("acc", ["2d", "3d"])
@pytest.mark.parametrize("z_slices", [None, [4, 0, 4], slice(1, None, 2)])
def test_matches_qlty_where_qlty_is_right(mode, acc, z_slices):
    """Offsets straddling 0 with clamp/zero: qlty's window-relative boundaries are right."""
    vol = _vol()
    ours = NCZYX25DQuilt(vol, SPEC, mode, acc, z_slices).convert()
    ref = qlty25.NCZYX25DQuilt(vol, SPEC, mode, acc, z_slices).convert()
    assert ours.shape == ref.shape and ours.dtype == ref.dtype
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)


def test_matches_qlty_through_tensorlike_and_enum_keys():
    vol = _vol(N=1, C=3, Z=6, Y=4, X=3, seed=3)
    spec = {ZOperation.MEAN: ((-1, 0, 1),), "identity": [0], ZOperation.STD: ((0, 1),)}
    tl = TensorLike3D(InMemoryBackend(vol))
    ours = NCZYX25DQuilt(tl, spec, "clamp", "3d").convert()
    qspec = {qlty25.ZOperation[k.name] if isinstance(k, ZOperation) else k: v
             for k, v in spec.items()}
    ref = qlty25.NCZYX25DQuilt(vol, qspec, "clamp", "3d").convert()
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
    # qlty's own enum keys are accepted too
    torch.testing.assert_close(NCZYX25DQuilt(tl, qspec, "clamp", "3d").convert(), ours)


def test_constructor_attributes_match_qlty():
    vol = _vol()
    for kw in ({}, {"accumulation_mode": "3d", "z_slices": [3, 1]}):
        a = NCZYX25DQuilt(vol, SPEC, **kw)
        b = qlty25.NCZYX25DQuilt(vol, SPEC, **kw)
        for attr in ("N", "C", "Z", "Y", "X", "z_indices", "output_channels", "output_shape",
                     "boundary_mode", "accumulation_mode", "group_by_operation"):
            assert getattr(a, attr) == getattr(b, attr), attr
        assert [(o.op_type.name, o.offsets, o.output_channels, o.name) for o in a.operations] == \
               [(o.op_type.name, o.offsets, o.output_channels, o.name) for o in b.operations]


def test_apply_boundary_mode_matches_qlty_in_its_range():
    for mode in ("clamp", "zero", "reflect", "skip"):
        for z in range(-9, 19):
            assert apply_boundary_mode(z, 0, 10, mode) == qlty25.apply_boundary_mode(z, 0, 10, mode)
    # beyond one reflection qlty leaves the range; ours keeps mirroring
    assert qlty25.apply_boundary_mode(-25, 0, 10, "reflect") == 24
    assert apply_boundary_mode(-25, 0, 10, "reflect") == 4


# ------------------------------------------------------------------ oracle: fixed bugs
def _ramp(Z=5):
    return torch.arange(float(Z)).reshape(1, 1, Z, 1, 1).repeat(1, 1, 1, 2, 3)


@pytest.mark.parametrize("spec, mode, want", [
    ({"identity": [3]}, "clamp", [3, 4, 4, 4, 4]),  # qlty: [3, 4, 2, 3, 4]
    ({"mean": [[2, 3]]}, "clamp", [2.5, 3.5, 4, 4, 4]),  # qlty: [2.5, 3.5, 4, 3, 4]
    ({"identity": [-3]}, "clamp", [0, 0, 0, 0, 1]),
    ({"identity": [3]}, "zero", [3, 4, 0, 0, 0]),
    ({"mean": [[-2, -1, 0]]}, "reflect", [1 / 3, 1 / 3, 1, 2, 3]),  # qlty: IndexError at z0=0
    ({"mean": [[1, 2]]}, "skip", [1.5, 2.5, 3.5, 4, float("nan")]),
])
def test_one_sided_offsets_are_volume_relative(spec, mode, want):
    vol = _ramp()
    if want[-1] != want[-1]:  # the last centre has no member left: skip must raise
        with pytest.raises(QltyError, match="produced no valid channels"):
            NCZYX25DQuilt(vol, spec, mode).convert()
        got = NCZYX25DQuilt(vol, spec, mode, z_slices=[0, 1, 2, 3]).convert()[:, 0, 0, 0]
        want = want[:-1]
    else:
        got = NCZYX25DQuilt(vol, spec, mode).convert()[:, 0, 0, 0]
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float32))


def test_reflect_identity_at_the_top_is_half_sample():
    # qlty silently gives [4, 4]; the pinned convention maps Z+1 -> Z-2
    got = NCZYX25DQuilt(_ramp(), {"identity": [0, 2]}, "reflect", z_slices=[4]).convert()
    assert got[0, :, 0, 0].tolist() == [4.0, 3.0]


def test_skip_never_duplicates_a_channel():
    # qlty broadcasts the one remaining channel: [z0, z0] at z0 = Z-1
    q = NCZYX25DQuilt(_ramp(), {"identity": [0, 2]}, "skip")
    with pytest.raises(QltyError, match=r"produced no valid channels.*z0=3"):
        q.convert()
    ok, msgs = q.validate_spec()
    assert not ok and "produced no valid channels" in msgs[0]
    # inside the volume skip is exact
    got = NCZYX25DQuilt(_ramp(), {"identity": [0, 2]}, "skip", z_slices=[0, 2]).convert()
    assert got[:, :, 0, 0].tolist() == [[0.0, 2.0], [2.0, 4.0]]


@settings(max_examples=30, deadline=None)
@given(
    st.sampled_from(["clamp", "zero", "reflect", "skip"]),
    st.sampled_from(["2d", "3d"]),
    st.integers(1, 6), st.integers(1, 2), st.integers(1, 2),
    st.lists(st.integers(-7, 7), min_size=1, max_size=3),
    st.lists(st.lists(st.integers(-7, 7), min_size=1, max_size=3), min_size=1, max_size=2),
    st.integers(0, 1000),
)
def test_oracle_any_geometry(mode, acc, Z, N, C, ident, groups, seed):
    vol = _vol(N=N, C=C, Z=Z, Y=3, X=2, seed=seed)
    spec = {"mean": groups, "identity": ident, "std": groups[:1]}
    z_idx = list(range(Z))
    if mode == "skip":  # keep centres whose identity offsets stay inside and groups non-empty
        z_idx = [z for z in z_idx if all(0 <= z + o < Z for o in ident)
                 and all(any(0 <= z + o < Z for o in g) for g in groups)]
        if not z_idx:
            return
    got = NCZYX25DQuilt(vol, spec, mode, acc, z_idx).convert()
    want = oracle(vol, spec, mode, z_idx, acc)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    # streaming one centre at a time gives the same bits
    got_stream = NCZYX25DQuilt(vol, spec, mode, acc, z_idx).convert(slab_bytes=1)
    torch.testing.assert_close(got_stream, got, rtol=0, atol=0)


# ------------------------------------------------------------------ channel order, metadata
def test_metadata_describes_convert_channels():
    vol = _vol(N=1, C=2, Z=6, seed=5)
    spec = {"identity": [-1, 0, 1], "mean": [[-1, 1], [-2, 2]], "std": [[-1, 0, 1]]}
    q = NCZYX25DQuilt(vol, spec, "reflect", z_slices=[0, 3, 5])
    out = q.convert()
    meta = q.get_channel_metadata()
    assert [m["channel_index"] for m in meta] == list(range(out.shape[1]))
    for m in meta:
        one = {m["operation"]: [list(m["offsets"])] if m["operation_type"] != "IDENTITY"
               else list(m["offsets"])}
        single = NCZYX25DQuilt(vol[:, m["input_channel"]:m["input_channel"] + 1], one, "reflect",
                               z_slices=[0, 3, 5]).convert()
        torch.testing.assert_close(out[:, m["channel_index"]], single[:, 0], rtol=0, atol=0)
    # qlty's order was [id c0 x3, id c1 x3, mean c0 x2, mean c1 x2, std c0, std c1]
    assert [(m["operation_type"], m["input_channel"]) for m in meta] == (
        [("IDENTITY", 0)] * 3 + [("IDENTITY", 1)] * 3 + [("MEAN", 0)] * 2 + [("MEAN", 1)] * 2
        + [("STD", 0), ("STD", 1)])


def test_group_by_operation_merges_operations_of_one_type():
    vol = _vol(N=1, C=2, Z=5, seed=7)
    spec = {"mean": [[0, 1]], "identity": [0], ZOperation.MEAN: ((-1, 0),)}
    plain = NCZYX25DQuilt(vol, spec).convert()
    grouped_q = NCZYX25DQuilt(vol, spec, group_by_operation=True)
    grouped = grouped_q.convert()
    meta = grouped_q.get_channel_metadata()
    assert [(m["operation_type"], m["input_channel"], m["offsets"]) for m in meta] == [
        ("IDENTITY", 0, (0,)), ("IDENTITY", 1, (0,)),
        ("MEAN", 0, (0, 1)), ("MEAN", 0, (-1, 0)), ("MEAN", 1, (0, 1)), ("MEAN", 1, (-1, 0))]
    # spec order: mean c0, mean c1, id c0, id c1, MEAN c0, MEAN c1
    perm = [2, 3, 0, 4, 1, 5]
    torch.testing.assert_close(grouped, plain[:, perm], rtol=0, atol=0)


# ------------------------------------------------------------------ dtypes
def test_integer_sources():
    vol = (torch.arange(2 * 5 * 3 * 4) % 7).reshape(1, 2, 5, 3, 4).to(torch.int16)
    ident = NCZYX25DQuilt(vol, {"identity": [-1, 0]}).convert()
    assert ident.dtype == torch.int16  # identity-only keeps the dtype, exactly
    assert torch.equal(ident, qlty25.NCZYX25DQuilt(vol, {"identity": [-1, 0]}).convert())
    mixed = NCZYX25DQuilt(vol, SPEC, "zero").convert()
    assert mixed.dtype == torch.float32  # qlty: RuntimeError in mean()
    torch.testing.assert_close(mixed, NCZYX25DQuilt(vol.float(), SPEC, "zero").convert())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_float_dtypes_follow_the_source(dtype):
    vol = _vol(N=1, C=1, Z=5, seed=2)
    got = NCZYX25DQuilt(vol.to(dtype), SPEC, "reflect").convert()
    assert got.dtype == dtype
    want = oracle(vol.to(dtype).float(), SPEC, "reflect", list(range(5)))
    tol = {torch.float16: 2e-3, torch.bfloat16: 2e-2, torch.float64: 1e-12}[dtype]
    torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol)


# ------------------------------------------------------------------ laziness and streaming
class CountingBackend(InMemoryBackend):
    """Counts z-slices read from 'storage' (copies, like a real backend)."""

    def __init__(self, tensor):
        super().__init__(tensor)
        self.reads: list[int] = []

    def load_slice(self, n=None, c=None, z=None, y=None, x=None):
        zs = range(self.get_shape()[2])[z] if isinstance(z, slice) else [z]
        self.reads.extend(zs if z is not None else range(self.get_shape()[2]))
        return super().load_slice(n, c, z, y, x).clone()

    def read_block(self, n=None, c=None, z=None, y=None, x=None):
        zs = range(self.get_shape()[2])[z if z is not None else slice(None)]
        self.reads.extend(zs)
        return super().read_block(n, c, z, y, x).clone()


@pytest.mark.parametrize("slab_bytes", [None, 1, 3000])
def test_each_slice_read_once(slab_bytes):
    vol = _vol(N=2, C=1, Z=9, seed=4)
    be = CountingBackend(vol)
    got = NCZYX25DQuilt(TensorLike3D(be), SPEC, "clamp").convert(slab_bytes=slab_bytes)
    assert sorted(be.reads) == list(range(9))  # qlty reads each slice up to 5 times here
    torch.testing.assert_close(got, NCZYX25DQuilt(vol, SPEC, "clamp").convert(), rtol=0, atol=0)


def test_only_needed_slices_are_read():
    vol = _vol(N=1, C=1, Z=30, seed=4)
    be = CountingBackend(vol)
    q = NCZYX25DQuilt(TensorLike3D(be), {"identity": [-10, 0, 10]}, z_slices=[12, 13])
    q.convert()
    assert sorted(be.reads) == [2, 3, 12, 13, 22, 23]
    be.reads.clear()
    q.to_ncyx_quilt(window=(4, 4), step=(2, 2), border=None)
    assert be.reads == []  # qlty runs (and discards) a full convert here


@pytest.mark.parametrize("zarr_format", [2, 3])
@pytest.mark.parametrize("acc", ["2d", "3d"])
def test_convert_into_zarr(tmp_path, zarr_format, acc):
    zarr = pytest.importorskip("zarr")
    vol = _vol(N=2, C=2, Z=7, seed=6)
    q = NCZYX25DQuilt(vol, SPEC, "reflect", acc, z_slices=[5, 1, 2, 6])
    want = q.convert()
    sink = zarr.open(str(tmp_path / "o.zarr"), mode="w", shape=q.output_shape,
                     dtype="float32", chunks=(1,) * (len(q.output_shape) - 2) + (5, 6),
                     zarr_format=zarr_format)
    src = TensorLike3D(CountingBackend(vol))
    NCZYX25DQuilt(src, SPEC, "reflect", acc, z_slices=[5, 1, 2, 6]).convert(out=sink,
                                                                           slab_bytes=1)
    np.testing.assert_array_equal(sink[...], want.numpy())
    assert sink.attrs["qlty_gpu_complete"] is True
    ro = zarr.open(str(tmp_path / "o.zarr"), mode="r")
    with pytest.raises(QltyError, match="out is read-only"):
        q.convert(out=ro)


def test_iter_convert_blocks_cover_the_output():
    vol = _vol(N=2, C=1, Z=6, seed=8)
    q = NCZYX25DQuilt(vol, SPEC, z_slices=[3, 0, 5], accumulation_mode="3d")
    full = q.convert()
    seen = []
    for pos, block in q.iter_convert(slab_bytes=1):
        assert block.shape == (2, len(pos), q.output_channels, 5, 6)
        torch.testing.assert_close(block, full[:, :, pos].transpose(1, 2), rtol=0, atol=0)
        seen += pos
    assert sorted(seen) == [0, 1, 2]


def test_convert_into_given_tensor():
    vol = _vol(N=1, C=1, Z=4, seed=9)
    q = NCZYX25DQuilt(vol, SPEC)
    out = torch.full(q.output_shape, float("nan"))
    assert q.convert(out=out) is out
    torch.testing.assert_close(out, q.convert(), rtol=0, atol=0)
    with pytest.raises(QltyError, match="out must have shape"):
        q.convert(out=torch.empty(1, 2))
    with pytest.raises(QltyError, match="out must be None, a tensor or an array"):
        q.convert(out=[1, 2, 3])


# ------------------------------------------------------------------ plans
def test_extract_patch_from_plan_equals_convert_crops():
    vol = _vol(N=2, C=2, Z=6, Y=11, X=9, seed=10)
    be = CountingBackend(vol)
    q = NCZYX25DQuilt(TensorLike3D(be), {"identity": [3], "mean": [[-2, -1]]}, "clamp",
                      z_slices=[0, 5])
    full = NCZYX25DQuilt(vol, {"identity": [3], "mean": [[-2, -1]]}, "clamp",
                         z_slices=[0, 5]).convert()
    plan = q.create_extraction_plan(window=(4, 5), step=(3, 2))
    assert plan.total_patches == 2 * 2 * 4 * 3
    for p in plan.patches:
        be.reads.clear()
        got = q.extract_patch_from_plan(p)
        img = full[p.n * 2 + [0, 5].index(p.z0)]
        torch.testing.assert_close(got, img[:, p.y_start:p.y_stop, p.x_start:p.x_stop],
                                   rtol=0, atol=0)
        assert sorted(be.reads) == p.required_z_indices  # only what the patch needs
    # the whole-image plan (no window)
    p0 = q.create_extraction_plan().patches[1]
    assert p0.y_start is None and p0.required_z_indices == [3, 4, 5]
    torch.testing.assert_close(q.extract_patch_from_plan(p0), full[1], rtol=0, atol=0)


@pytest.mark.parametrize("Y, w, s", [(11, 4, 2), (20, 10, 5), (9, 3, 3), (13, 5, 4), (7, 7, 2)])
def test_non_overlapping_colour_groups_really_do_not_overlap(Y, w, s):
    q = NCZYX25DQuilt(torch.zeros(1, 1, 3, Y, Y), {"identity": [0]}, z_slices=[1])
    plan = q.create_non_overlapping_colored_plan(window=(w, w), step=(s, s))
    for members in plan.color_groups.values():
        boxes = [plan.patches[i] for i in members]
        for i, a in enumerate(boxes):
            for b in boxes[i + 1:]:
                assert (a.y_stop <= b.y_start or b.y_stop <= a.y_start
                        or a.x_stop <= b.x_start or b.x_stop <= a.x_start), (a, b)
    ref = qlty25.NCZYX25DQuilt(torch.zeros(1, 1, 3, Y, Y), {"identity": [0]}, z_slices=[1])
    ref_plan = ref.create_non_overlapping_colored_plan(window=(w, w), step=(s, s))
    assert [(p.y_start, p.x_start) for p in plan.patches] == \
           [(p.y_start, p.x_start) for p in ref_plan.patches]


def test_plans_round_trip_and_match_qlty_layout():
    import json

    vol = torch.zeros(2, 1, 5, 20, 20)
    for acc in ("2d", "3d"):
        q = NCZYX25DQuilt(vol, {"identity": [0]}, accumulation_mode=acc, z_slices=[0, 2])
        r = qlty25.NCZYX25DQuilt(vol, {"identity": [0]}, accumulation_mode=acc, z_slices=[0, 2])
        for kw in ({}, {"window": (10, 10), "step": (5, 5)}):
            a, b = q.create_extraction_plan(**kw), r.create_extraction_plan(**kw)
            assert a.serialize() == b.serialize()
            back = type(a).deserialize(json.loads(json.dumps(a.serialize())))
            assert back.serialize() == a.serialize()
            sa, sb = q.create_stitching_plan(a), r.create_stitching_plan(b)
            assert sa.serialize() == sb.serialize()
            sback = type(sa).deserialize(json.loads(json.dumps(sa.serialize())))
            assert sback.patch_mappings == sa.patch_mappings


def test_to_ncyx_quilt():
    q = NCZYX25DQuilt(_vol(), SPEC)
    nq = q.to_ncyx_quilt(window=(4, 4), step=(2, 2), border=(1, 1), border_weight=0.5)
    assert (nq.Y, nq.X, nq.window) == (5, 6, (4, 4))
    with pytest.raises(QltyError, match="accumulation_mode='2d'"):
        NCZYX25DQuilt(_vol(), SPEC, accumulation_mode="3d").to_ncyx_quilt(window=(4, 4))


# ------------------------------------------------------------------ errors
@pytest.mark.parametrize("kwargs, exc, match", [
    ({"data_source": np.zeros((1, 1, 2, 2, 2))}, TypeError, "must be torch.Tensor or TensorLike3D"),
    ({"data_source": torch.zeros(1, 2, 2, 2)}, ValueError, r"must be 5D \(N, C, Z, Y, X\)"),
    ({"accumulation_mode": "2D"}, ValueError, "accumulation_mode must be '2d' or '3d'"),
    ({"boundary_mode": "wrap"}, ValueError, "boundary_mode must be 'clamp', 'zero'"),
    ({"z_slices": range(2)}, ValueError, "z_slices must be slice, list, or None"),
    ({"z_slices": [0, 9]}, ValueError, "z_slices contains invalid index 9"),
    ({"z_slices": slice(5, 2)}, ValueError, "z_slices results in empty list"),
    ({"channel_spec": {}}, ValueError, "Channel specification cannot be empty"),
    ({"channel_spec": [0]}, TypeError, "channel_spec must be a dict"),
    ({"channel_spec": {"direct": [0]}}, ValueError, "Unknown operation 'direct'"),
    ({"channel_spec": {"identity": [[0]]}}, TypeError, "IDENTITY offsets must be ints"),
    ({"channel_spec": {"mean": [[]]}}, ValueError, "MEAN operation offset groups cannot be empty"),
    ({"channel_spec": {"std": [1]}}, ValueError, "STD operation offset groups must be lists"),
])
def test_errors(kwargs, exc, match):
    args = {"data_source": torch.zeros(1, 1, 4, 2, 2), "channel_spec": {"identity": [0]}}
    args.update(kwargs)
    with pytest.raises(exc, match=match) as info:
        NCZYX25DQuilt(**args)
    assert isinstance(info.value, QltyError)


def test_parse_channel_spec_names_and_types():
    ops = parse_channel_spec({"Mean": [[1, 2]], ZOperation.IDENTITY: (0.7,)})
    assert [(o.name, o.offsets) for o in ops] == [("Mean", ((1, 2),)), (None, (0,))]
    with pytest.raises(ValueError, match="Unknown boundary_mode"):
        apply_boundary_mode(-1, 0, 3, "wrap")


@pytest.mark.parametrize("backend", ["torch", None])
def test_uint16_identity_is_exact_on_every_cpu_backend(backend):
    v = ((torch.arange(60) % 9) * 7000).reshape(1, 1, 5, 3, 4).to(torch.uint16)
    got = NCZYX25DQuilt(v, {"identity": [-1, 0, 9]}, "zero").convert(backend=backend)
    assert got.dtype == torch.uint16
    want = oracle(v.to(torch.int64), {"identity": [-1, 0, 9]}, "zero", list(range(5)))
    assert torch.equal(got.to(torch.int64), want.to(torch.int64))


def test_progress_bar_and_budget_errors(capsys):
    pytest.importorskip("tqdm")
    q = NCZYX25DQuilt(_vol(N=1, C=1, Z=4, seed=11), SPEC)
    q.convert(slab_bytes=1, progress=True)
    assert "2.5D convert" in capsys.readouterr().err
    with pytest.raises(QltyError, match="slab_bytes must be a positive number of bytes"):
        q.convert(slab_bytes=0)


def test_patch_pair_helpers_need_2d_mode_and_the_2d_module():
    q3 = NCZYX25DQuilt(_vol(), SPEC, accumulation_mode="3d")
    for meth in ("extract_patch_pairs", "extract_overlapping_pixels"):
        with pytest.raises(QltyError, match=f"{meth} requires accumulation_mode='2d'"):
            getattr(q3, meth)(window=(2, 2), num_patches=1, delta_range=(1.0, 2.0))
    try:
        import qlty_gpu.patch_pairs_2d  # noqa: F401
    except ImportError:
        with pytest.raises(QltyError, match="need qlty_gpu.patch_pairs_2d"):
            NCZYX25DQuilt(_vol(), SPEC).extract_patch_pairs((2, 2), 1, (1.0, 2.0))


def test_a_failed_conversion_does_not_look_complete(tmp_path):
    zarr = pytest.importorskip("zarr")

    class Failing(CountingBackend):
        def read_block(self, n=None, c=None, z=None, y=None, x=None):
            if z is not None and z.stop > 5:
                raise OSError("disk gone")
            return super().read_block(n, c, z, y, x)

    vol = _vol(N=1, C=1, Z=8, seed=12)
    q = NCZYX25DQuilt(TensorLike3D(Failing(vol)), SPEC)
    sink = zarr.open(str(tmp_path / "f.zarr"), mode="w", shape=q.output_shape, dtype="float32")
    with pytest.raises(OSError, match="disk gone"):
        q.convert(out=sink, slab_bytes=1)
    assert sink.attrs["qlty_gpu_complete"] is False
