"""FlatLayout: one flat float32 vector per model and the exact way back to an ArrayRecord.

Oracles are written here with numpy (concatenate the float arrays in record
order, widen to float32); nothing is compared with output of the code under
test except in round trips.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord
from hypothesis import given, settings
from hypothesis import strategies as st

from fl_sparse.flat import FlatLayout, array_to_numpy, numpy_to_array, vector_hash

FLOAT_DTYPES = ("float16", "float32", "float64")
INT_DTYPES = ("int64", "int32", "uint8", "int8")


def _record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({name: Array(np.asarray(a)) for name, a in arrays.items()})


def _bn_like() -> dict[str, np.ndarray]:
    """A model's state with interleaved float and integer arrays (as a BatchNorm model has)."""
    rng = np.random.default_rng(0)
    return {
        "conv.weight": rng.standard_normal((2, 3, 2)).astype(np.float32),
        "bn.weight": rng.standard_normal(2).astype(np.float32),
        "bn.bias": rng.standard_normal(2).astype(np.float32),
        "bn.running_mean": rng.standard_normal(2).astype(np.float32),
        "bn.running_var": rng.random(2).astype(np.float32),
        "bn.num_batches_tracked": np.array(7, dtype=np.int64),
        "fc.weight": rng.standard_normal((3, 2)).astype(np.float16),
        "fc.bias": rng.standard_normal(3).astype(np.float64),
        "step": np.array(3, dtype=np.int32),
    }


def _oracle_flat(arrays: dict[str, np.ndarray], exact: set[str] = frozenset()) -> np.ndarray:
    parts = [
        a.astype(np.float32).reshape(-1)
        for name, a in arrays.items()
        if np.issubdtype(a.dtype, np.floating) and name not in exact
    ]
    return np.concatenate(parts) if parts else np.zeros(0, np.float32)


# ====================================================================== exact arrays
def test_integer_arrays_are_exact_and_floats_are_flat_in_record_order():
    arrays = _bn_like()
    layout = FlatLayout.from_arrayrecord(_record(arrays))
    assert layout.names == ("conv.weight", "bn.weight", "bn.bias", "bn.running_mean", "bn.running_var", "fc.weight", "fc.bias")
    assert layout.exact_names == ("bn.num_batches_tracked", "step")
    assert layout.order == tuple(arrays)
    assert layout.shapes[0] == (2, 3, 2) and layout.dtypes[-2:] == ("float16", "float64")
    assert layout.numel == 12 + 2 * 4 + 6 + 3
    np.testing.assert_array_equal(layout.flatten(_record(arrays)).numpy(), _oracle_flat(arrays))
    assert layout.flatten(_record(arrays)).dtype == torch.float32
    # the exact arrays' values are kept, not only their shapes
    assert dict(layout.passthrough)["bn.num_batches_tracked"] == 7
    assert dict(layout.passthrough)["step"].dtype == np.int32


@pytest.mark.parametrize(
    "patterns, expected",
    [
        ((), ("bn.num_batches_tracked", "step")),
        (["bn.running_*"], ("bn.running_mean", "bn.running_var", "bn.num_batches_tracked", "step")),
        ("bn.running_mean", ("bn.running_mean", "bn.num_batches_tracked", "step")),  # one pattern as a string
        (["*.bias"], ("bn.bias", "bn.num_batches_tracked", "fc.bias", "step")),
        (["bn.?ias"], ("bn.bias", "bn.num_batches_tracked", "step")),
        (["fc.[wb]*"], ("bn.num_batches_tracked", "fc.weight", "fc.bias", "step")),
        (["BN.*"], ("bn.num_batches_tracked", "step")),  # case-sensitive
        (["bn"], ("bn.num_batches_tracked", "step")),  # a pattern matches the whole name, not a prefix
        (["running_mean"], ("bn.num_batches_tracked", "step")),
        (["*step*"], ("bn.num_batches_tracked", "step")),  # integer arrays are exact anyway
    ],
)
def test_exact_patterns_are_fnmatch_on_the_whole_name(patterns, expected):
    arrays = _bn_like()
    layout = FlatLayout.from_arrayrecord(_record(arrays), exact=patterns)
    assert layout.exact_names == expected  # record order
    assert set(layout.names) == set(arrays) - set(expected)
    np.testing.assert_array_equal(layout.flatten(_record(arrays)).numpy(), _oracle_flat(arrays, set(expected)))
    # exact float arrays come back whole, with their dtype and values
    back = layout.unflatten(layout.flatten(_record(arrays)))
    for name in expected:
        assert back[name].numpy().dtype == arrays[name].dtype
        np.testing.assert_array_equal(back[name].numpy(), arrays[name])


def test_a_record_without_float_arrays_is_refused():
    with pytest.raises(ValueError, match="no floating-point"):
        FlatLayout.from_arrayrecord(_record({"n": np.array(3), "m": np.zeros(2, np.int32)}))
    with pytest.raises(ValueError, match="no floating-point"):
        FlatLayout.from_arrayrecord(_record({"w": np.zeros(2, np.float32)}), exact=["*"])


# ====================================================================== flatten / unflatten
def test_unflatten_preserves_key_order_shapes_dtypes_and_values():
    arrays = _bn_like()
    record = _record(arrays)
    layout = FlatLayout.from_arrayrecord(record)
    back = layout.unflatten(layout.flatten(record))
    assert list(back.keys()) == list(arrays)
    for name, a in arrays.items():
        got = back[name].numpy()
        assert got.shape == a.shape and got.dtype == a.dtype, name
        if a.dtype == np.float64:  # the flat vector is float32: float64 values come back rounded to float32
            np.testing.assert_array_equal(got, a.astype(np.float32).astype(np.float64))
        else:
            np.testing.assert_array_equal(got, a)


def test_unflatten_writes_new_values_in_record_order():
    arrays = _bn_like()
    layout = FlatLayout.from_arrayrecord(_record(arrays))
    vec = torch.arange(layout.numel, dtype=torch.float32)
    back = layout.unflatten(vec)
    np.testing.assert_array_equal(back["conv.weight"].numpy(), np.arange(12, dtype=np.float32).reshape(2, 3, 2))
    np.testing.assert_array_equal(back["bn.weight"].numpy(), [12, 13])
    np.testing.assert_array_equal(back["fc.bias"].numpy(), np.array([26, 27, 28], np.float64))
    np.testing.assert_array_equal(back["fc.weight"].numpy(), np.arange(20, 26, dtype=np.float16).reshape(3, 2))
    assert back["bn.num_batches_tracked"].numpy() == 7  # exact arrays keep their values
    with pytest.raises(ValueError, match="expected"):
        layout.unflatten(torch.zeros(layout.numel + 1))
    with pytest.raises(ValueError, match="expected"):
        layout.unflatten(torch.zeros(1, layout.numel))


def test_float16_widens_exactly_and_comes_back_bit_for_bit():
    x = np.array([65504.0, -6.1e-5, 5.96e-8, 0.1, -0.0, 1000.5], dtype=np.float16)  # max, subnormals, -0
    layout = FlatLayout.from_arrayrecord(_record({"h": x}))
    vec = layout.flatten(_record({"h": x}))
    np.testing.assert_array_equal(vec.numpy(), x.astype(np.float32))
    back = layout.unflatten(vec)["h"].numpy()
    assert back.dtype == np.float16 and back.tobytes() == x.tobytes()  # -0.0 included


def test_zero_d_arrays_stay_zero_d():
    arrays = {"scale": np.array(2.5, np.float32), "count": np.array(4, np.int64), "w": np.ones((2, 2), np.float32)}
    layout = FlatLayout.from_arrayrecord(_record(arrays))
    assert layout.shapes == ((), (2, 2)) and layout.numel == 5
    vec = layout.flatten(_record(arrays))
    np.testing.assert_array_equal(vec.numpy(), [2.5, 1, 1, 1, 1])
    back = layout.unflatten(vec)
    assert back["scale"].numpy().shape == () and back["count"].numpy().shape == ()
    assert back["scale"].numpy() == np.float32(2.5) and back["count"].numpy() == 4
    exact = layout.exact_record(_record(arrays))
    assert exact["count"].numpy().shape == () and exact["count"].numpy().dtype == np.int64
    again = FlatLayout.from_json(layout.to_json())
    assert again.shapes == ((), (2, 2)) and dict(again.passthrough)["count"].shape == ()


def test_flatten_refuses_a_wrong_shape_or_a_missing_array_by_name():
    arrays = _bn_like()
    layout = FlatLayout.from_arrayrecord(_record(arrays))
    bad = dict(arrays)
    bad["bn.bias"] = np.zeros(3, np.float32)
    with pytest.raises(ValueError, match="'bn.bias'"):
        layout.flatten(_record(bad))
    bad = dict(arrays)
    bad["conv.weight"] = arrays["conv.weight"].reshape(3, 2, 2)  # same size, other shape
    with pytest.raises(ValueError, match="'conv.weight'"):
        layout.flatten(_record(bad))
    missing = {k: v for k, v in arrays.items() if k != "fc.weight"}
    with pytest.raises(ValueError, match="'fc.weight'"):
        layout.flatten(_record(missing))


def test_state_dict_views_match_the_record():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 2))
    sd = model.state_dict()
    layout = FlatLayout.from_state_dict(sd)
    record = ArrayRecord(sd)
    assert torch.equal(layout.flatten_state_dict(sd), layout.flatten(record))
    oracle = torch.cat([t.reshape(-1).float() for t in sd.values() if t.is_floating_point()])
    assert torch.equal(layout.flatten(record), oracle)
    assert layout.exact_names == ("1.num_batches_tracked",)
    back = layout.to_state_dict(oracle)
    assert list(back) == [n for n in sd if sd[n].is_floating_point()] + ["1.num_batches_tracked"]
    for name, tensor in sd.items():
        assert torch.equal(back[name], tensor) and back[name].shape == tensor.shape


# ====================================================================== JSON form
NAMES = st.text(min_size=1, max_size=8)
SHAPES = st.lists(st.integers(min_value=0, max_value=3), min_size=0, max_size=3).map(tuple)
ARRAY_SPECS = st.dictionaries(NAMES, st.tuples(SHAPES, st.sampled_from(FLOAT_DTYPES + INT_DTYPES)), min_size=1, max_size=6)


@settings(max_examples=150, deadline=None)
@given(specs=ARRAY_SPECS, data=st.data())
def test_json_round_trip(specs, data):
    if not any(dtype in FLOAT_DTYPES for _, dtype in specs.values()):
        specs = {**specs, "\x00float": ((2,), "float32")}
    rng = np.random.default_rng(len(specs))
    arrays = {name: (rng.standard_normal(shape) * 10).astype(dtype) for name, (shape, dtype) in specs.items()}
    exact = data.draw(st.lists(st.sampled_from(sorted(arrays)), unique=True, max_size=2))
    if all(n in exact or arrays[n].dtype.kind != "f" for n in arrays):
        exact = []
    layout = FlatLayout.from_arrayrecord(_record(arrays), exact=exact)
    text = layout.to_json()
    json.loads(text)  # valid JSON
    again = FlatLayout.from_json(text)
    assert again.names == layout.names and again.shapes == layout.shapes and again.dtypes == layout.dtypes
    assert again.order == tuple(arrays) and again.numel == layout.numel
    assert again.exact_names == layout.exact_names
    for (n1, a1), (n2, a2) in zip(layout.passthrough, again.passthrough):
        assert n1 == n2 and a1.shape == a2.shape and a1.dtype == a2.dtype
        assert not a2.any()  # values are not part of the JSON form: zeros until they arrive
    assert again.to_json() == text
    # with the exact values supplied, the JSON layout rebuilds the record exactly (record order)
    record = _record(arrays)
    rebuilt = again.with_exact(record).unflatten(layout.flatten(record))
    assert list(rebuilt.keys()) == list(arrays)
    for name, a in arrays.items():
        got = rebuilt[name].numpy()
        assert got.shape == a.shape and got.dtype == a.dtype
        expected = a.astype(np.float32).astype(a.dtype) if a.dtype.kind == "f" and name not in layout.exact_names else a
        np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "not json",
        "{",
        "null",
        "3",
        "{}",
        "[]",  # no arrays at all
        '[["a", "exact", [2], "int64"]]',  # no flat array
        '[["a", "flat", [2], "int64"]]',  # a flat array must be floating
        '[["a", "weird", [2], "float32"]]',
        '[["a", "flat", [-1], "float32"]]',
        '[["a", "flat", [2], "float99"]]',
        '[["a", "flat", [2], "float32"], ["a", "flat", [2], "float32"]]',  # a name twice
        '[["a", "flat", [2], "float32"], ["a", "exact", [], "int64"]]',
        '[["a", "flat", [2]]]',  # too short
        '[["a", "flat", [2], "float32", 0]]',  # too long
        '[[1, "flat", [2], "float32"]]',  # name not a string
        '[["a", "flat", 2, "float32"]]',  # shape not a list
        '[["a", "flat", ["x"], "float32"]]',
        '{"a": ["flat", [2], "float32"]}',
        "[1, 2, 3]",
    ],
)
def test_from_json_refuses_malformed_text(text):
    with pytest.raises(ValueError, match="malformed layout"):
        FlatLayout.from_json(text)


@pytest.mark.parametrize(
    "text",
    [
        '[["a", "flat", [2], null]]',  # np.dtype(None) is float64
        '[["a", "flat", "23", "float32"]]',  # read as shape (2, 3)
        '[["a", "flat", [2.7], "float32"]]',  # read as shape (2,)
        '[["a", "flat", [true, 2], "float32"]]',  # read as shape (1, 2)
    ],
)
def test_from_json_refuses_loosely_typed_entries(text):
    with pytest.raises(ValueError, match="malformed layout"):
        FlatLayout.from_json(text)


# ====================================================================== exact_record / with_exact
def test_exact_record_checks_presence_shape_and_dtype():
    arrays = _bn_like()
    layout = FlatLayout.from_arrayrecord(_record(arrays), exact=["bn.running_var"])
    trained = dict(arrays, **{"bn.num_batches_tracked": np.array(9, np.int64), "bn.running_var": np.full(2, 3.0, np.float32)})
    exact = layout.exact_record(_record(trained))
    assert list(exact.keys()) == ["bn.running_var", "bn.num_batches_tracked", "step"]
    assert exact["bn.num_batches_tracked"].numpy() == 9 and exact["bn.num_batches_tracked"].numpy().shape == ()
    np.testing.assert_array_equal(exact["bn.running_var"].numpy(), [3.0, 3.0])
    for name, bad in [
        ("bn.num_batches_tracked", np.array(9, np.int32)),  # dtype
        ("bn.num_batches_tracked", np.array([9], np.int64)),  # 0-d became 1-d
        ("bn.running_var", np.zeros(2, np.float64)),  # float dtype too
        ("bn.running_var", np.zeros(3, np.float32)),
        ("step", np.array(3.0, np.float32)),
    ]:
        with pytest.raises(ValueError, match=f"'{name}'"):
            layout.exact_record(_record(dict(arrays, **{name: bad})))
    with pytest.raises(ValueError, match="'step'.*missing"):
        layout.exact_record(_record({k: v for k, v in arrays.items() if k != "step"}))
    # the client mod takes a train function's float64 array as its float32 (as for the compressed ones)
    wide = layout.exact_record(_record(dict(arrays, **{"bn.running_var": np.array([0.1, 2.5], np.float64)})),
                               cast_floats=True)
    assert wide["bn.running_var"].numpy().dtype == np.float32
    np.testing.assert_array_equal(wide["bn.running_var"].numpy(), np.array([0.1, 2.5], np.float32))
    for name, bad in [("bn.num_batches_tracked", np.array(9, np.int32)), ("bn.running_var", np.zeros(3, np.float64))]:
        with pytest.raises(ValueError, match=f"'{name}'"):  # integers and shapes are still checked
            layout.exact_record(_record(dict(arrays, **{name: bad})), cast_floats=True)


def test_with_exact_takes_the_values_and_leaves_the_layout_unchanged():
    arrays = _bn_like()
    layout = FlatLayout.from_arrayrecord(_record(arrays))
    newer = layout.with_exact(_record(dict(arrays, step=np.array(11, np.int32))))
    assert dict(newer.passthrough)["step"] == 11
    assert dict(layout.passthrough)["step"] == 3  # frozen: the original is untouched
    assert newer.names == layout.names and newer.order == layout.order
    assert newer.unflatten(layout.flatten(_record(arrays)))["step"].numpy() == 11


# ====================================================================== hash
def test_vector_hash_is_bit_exact():
    x = torch.tensor([1.0, 0.0, -2.5])
    assert vector_hash(x) == vector_hash(x.clone())
    assert vector_hash(x) != vector_hash(torch.tensor([1.0, -0.0, -2.5]))  # -0.0 == 0.0 but other bits
    assert vector_hash(x) != vector_hash(torch.nextafter(x, torch.full_like(x, 9.0)))
    assert vector_hash(x) != vector_hash(x[:2])
    assert vector_hash(x[::1]) == vector_hash(torch.tensor([9.0, 1.0, 0.0, -2.5])[1:])  # views hash their values


# ------------------------------------------------------------ Array <-> numpy fast paths
_DTYPES = st.sampled_from([np.float32, np.float16, np.float64, np.int64, np.int32, np.uint8, np.bool_])
_SHAPES = st.lists(st.integers(0, 5), min_size=0, max_size=3).map(tuple)


@given(dtype=_DTYPES, shape=_SHAPES, fortran=st.booleans(), seed=st.integers(0, 2**16))
@settings(max_examples=150, deadline=None)
def test_array_fast_paths_equal_flowers_own(dtype, shape, fortran, seed):
    """numpy_to_array writes Flower's bytes; array_to_numpy reads any Array as Array.numpy() does."""
    nd = np.asarray(np.random.default_rng(seed).standard_normal(shape) * 100).astype(dtype)
    if fortran:
        nd = np.asfortranarray(nd)
    theirs, ours = Array(nd), numpy_to_array(nd)
    if nd.flags.c_contiguous:
        assert ours.data == theirs.data and ours.dtype == theirs.dtype and tuple(ours.shape) == tuple(theirs.shape)
    for array in (theirs, ours):
        back = array_to_numpy(array)
        assert back.dtype == nd.dtype and back.shape == nd.shape
        assert np.array_equal(back, nd)


def test_array_to_numpy_falls_back_on_anything_unusual():
    """A header that is not exactly ours (big-endian here) or a length that does not match goes to Flower's path."""
    big = np.arange(6, dtype=">f4").reshape(2, 3)
    assert np.array_equal(array_to_numpy(Array(big)), big)
    good = Array(np.arange(4, dtype=np.float32))
    torn = Array(dtype=good.dtype, shape=good.shape, stype=good.stype, data=good.data[:-4])
    with pytest.raises(ValueError):
        array_to_numpy(torn)  # Flower's own np.load refuses it too


# ====================================================================== step, shared arrays
@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31 - 1))
def test_step_is_the_model_minus_the_trained_arrays_in_float32(seed):
    rng = np.random.default_rng(seed)
    arrays = _bn_like()
    layout = FlatLayout.from_arrayrecord(_record(arrays))
    model = torch.from_numpy(rng.standard_normal(layout.numel).astype(np.float32))
    trained = {k: (v + rng.standard_normal(v.shape)).astype(v.dtype) for k, v in arrays.items()}
    step = layout.step(model, _record(trained))
    oracle = model.numpy() - _oracle_flat(trained)  # float16 entries widened exactly, then one float32 subtraction
    assert step.dtype == torch.float32
    np.testing.assert_array_equal(step.numpy(), oracle)
    step[0] += 1  # the step is the caller's own buffer: the model is untouched
    np.testing.assert_array_equal(model.numpy() - _oracle_flat(trained), oracle)


def test_step_refuses_what_flatten_refuses_and_a_model_of_another_length():
    arrays = _bn_like()
    layout = FlatLayout.from_arrayrecord(_record(arrays))
    model = torch.zeros(layout.numel)
    bad = dict(arrays)
    bad["bn.bias"] = np.zeros(3, np.float32)
    with pytest.raises(ValueError, match="'bn.bias'"):
        layout.step(model, _record(bad))
    with pytest.raises(ValueError, match="'fc.weight'"):
        layout.step(model, _record({k: v for k, v in arrays.items() if k != "fc.weight"}))
    with pytest.raises(ValueError, match="model has shape"):
        layout.step(torch.zeros(layout.numel + 1), _record(arrays))


def test_records_from_one_set_of_flat_arrays_share_bytes_not_arrays():
    arrays = _bn_like()
    layout = FlatLayout.from_arrayrecord(_record(arrays))
    vec = torch.arange(layout.numel, dtype=torch.float32)
    flat = layout.flat_arrays(vec)
    one, two = layout.record(flat), layout.record(flat)
    expected = layout.unflatten(vec)
    for record in (one, two):
        assert list(record.keys()) == list(expected.keys())  # record order, exact arrays included
        for name in expected.keys():
            assert record[name].numpy().tobytes() == expected[name].numpy().tobytes()
            assert record[name].dtype == expected[name].dtype and list(record[name].shape) == list(expected[name].shape)
    # A train function that changes its record (or an Array in it) changes nobody else's.
    one["conv.weight"].data = b""
    del one["bn.weight"]
    assert two["conv.weight"].numpy().tobytes() == expected["conv.weight"].numpy().tobytes()
    assert "bn.weight" in two and layout.record(flat)["bn.weight"].numpy().tobytes() == expected["bn.weight"].numpy().tobytes()
