"""Tests written to kill mutmut survivors of ``fl_sparse/flat.py`` (docs/testing.md, "Mutation testing").

They pin what the module promises and the suite left open: ``array_to_numpy``'s fast path gives a
read-only view of the Array's own bytes (no copy) and leaves any other stype to Flower;
``numpy_to_array`` writes Flower's bytes for every dtype and a C-ordered .npy whatever the memory
layout (so the receiver's fast path applies); a layout's JSON is compact and parsed once per text;
every refusal names what it refused; the flat vector, its hash and the finiteness test take any
float dtype (bfloat16 included) as the float32 vector it stands for.
"""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord
from hypothesis import given, settings
from hypothesis import strategies as st

from fl_sparse.flat import FlatLayout, all_finite, array_to_numpy, numpy_to_array, vector_hash

_REAL = [np.float32, np.float16, np.float64, np.int64, np.int32, np.uint8, np.int8, np.bool_]


def _record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({name: Array(np.asarray(a)) for name, a in arrays.items()})


def _layout() -> tuple[FlatLayout, dict[str, np.ndarray]]:
    arrays = {
        "w": np.arange(6, dtype=np.float32).reshape(2, 3) / 7,
        "b": np.array([0.5, -1.25], np.float32),
        "step": np.array(3, np.int64),
    }
    return FlatLayout.from_arrayrecord(_record(arrays)), arrays


def _payload(array: Array) -> np.ndarray:
    return np.frombuffer(array.data, dtype=np.uint8)


# ------------------------------------------------------------------ array_to_numpy
@given(
    dtype=st.sampled_from(_REAL),
    shape=st.lists(st.integers(1, 4), min_size=0, max_size=3).map(tuple),
    seed=st.integers(0, 2**16),
    ours=st.booleans(),
)
@settings(max_examples=60, deadline=None)
def test_array_to_numpy_is_a_read_only_view_of_the_arrays_bytes(dtype, shape, seed, ours):
    """A plain C-ordered .npy (as Flower and numpy_to_array write it) is read in place, not copied."""
    nd = np.asarray(np.random.default_rng(seed).standard_normal(shape) * 100).astype(dtype)
    array = numpy_to_array(nd) if ours else Array(nd)
    out = array_to_numpy(array)
    assert out.dtype == nd.dtype and out.shape == nd.shape and np.array_equal(out, nd)
    assert not out.flags.writeable
    assert np.shares_memory(out, _payload(array))  # no copy: the Array's bytes themselves
    with pytest.raises(ValueError):
        out.reshape(-1)[0] = 1


@pytest.mark.parametrize("dtype", [np.float32, np.int64, np.uint8, np.bool_, np.float16, np.float64])
def test_array_to_numpy_view_per_dtype(dtype):
    """The same, one deterministic case per dtype (a 2x3 array: several entries, items of 1 to 8 bytes)."""
    nd = (np.arange(6).reshape(2, 3) % 3).astype(dtype)
    array = Array(nd)
    out = array_to_numpy(array)
    assert np.array_equal(out, nd) and out.dtype == nd.dtype
    assert not out.flags.writeable and np.shares_memory(out, _payload(array))


def test_array_to_numpy_leaves_another_stype_to_flower():
    """.npy bytes under another stype are not ours to read: Flower's numpy() refuses them, and so do we."""
    plain = Array(np.arange(4, dtype=np.float32))
    other = Array(dtype=plain.dtype, shape=plain.shape, stype="fl_sparse.raw-le", data=plain.data)
    with pytest.raises(TypeError, match="Unsupported serialization type"):
        other.numpy()
    with pytest.raises(TypeError, match="Unsupported serialization type"):
        array_to_numpy(other)


# ------------------------------------------------------------------ numpy_to_array
@pytest.mark.parametrize(
    "nd",
    [
        np.array(["2020-01-01", "2021-06-30"], dtype="datetime64[D]"),
        np.array([1, 3], dtype="timedelta64[s]"),
        np.array([1 + 2j, -3j], dtype=np.complex64),
        np.array(["ab", "c"]),
    ],
    ids=["datetime64", "timedelta64", "complex64", "str"],
)
def test_numpy_to_array_of_other_dtypes_is_flowers_array(nd):
    """Not only real arrays: any dtype Flower's Array takes gives Flower's bytes (its own path)."""
    theirs, ours = Array(nd), numpy_to_array(nd)
    assert ours.data == theirs.data and ours.dtype == theirs.dtype and tuple(ours.shape) == tuple(theirs.shape)


def test_numpy_to_array_refuses_object_arrays_as_flower_does():
    """No pickles and no raw pointers on the wire: an object array is refused, as Array(nd) refuses it."""
    nd = np.array([1, "x"], dtype=object)
    with pytest.raises(ValueError, match="allow_pickle"):
        Array(nd)
    with pytest.raises(ValueError, match="allow_pickle"):
        numpy_to_array(nd)


@given(
    dtype=st.sampled_from(_REAL),
    shape=st.lists(st.integers(2, 4), min_size=2, max_size=3).map(tuple),
    seed=st.integers(0, 2**16),
)
@settings(max_examples=40, deadline=None)
def test_numpy_to_array_bytes_depend_on_the_values_only(dtype, shape, seed):
    """A Fortran-ordered or strided array is written as the C-ordered .npy of its values.

    So equal models give equal bytes, and the receiver reads them with array_to_numpy's fast path
    (which leaves Fortran-ordered payloads to Flower's copy).
    """
    nd = np.asarray(np.random.default_rng(seed).standard_normal(shape) * 100).astype(dtype)
    c_bytes = numpy_to_array(nd).data
    for other in (np.asfortranarray(nd), nd.T.copy().T, np.repeat(nd, 2, axis=-1)[..., ::2]):
        assert np.array_equal(other, nd)
        array = numpy_to_array(other)
        assert array.data == c_bytes
        back = array_to_numpy(array)
        assert np.array_equal(back, nd) and not back.flags.writeable and np.shares_memory(back, _payload(array))


def test_exact_record_writes_c_ordered_arrays():
    """The exact arrays leave exact_record as C-ordered .npy, whatever order the train function's arrays had."""
    bias = np.arange(6, dtype=np.float32)
    counts = np.asfortranarray(np.arange(6, dtype=np.int64).reshape(2, 3))
    layout = FlatLayout.from_arrayrecord(_record({"b": bias, "counts": counts}))
    record = ArrayRecord({"b": Array(bias), "counts": Array(counts)})
    assert b"'fortran_order': True" in record["counts"].data  # Flower keeps the order it was given
    out = layout.exact_record(record)
    assert out["counts"].data == Array(np.ascontiguousarray(counts)).data
    assert np.array_equal(array_to_numpy(out["counts"]), counts)


# ------------------------------------------------------------------ refusals name what they refuse
def test_from_arrayrecord_refusals():
    with pytest.raises(ValueError) as info:
        FlatLayout.from_arrayrecord(_record({"w": np.zeros(2, np.float32), "z": np.zeros(2, np.complex64)}))
    message = str(info.value)
    assert message.startswith("array 'z' is complex64: fl-sparse handles real arrays only (float, integer or bool); ")
    assert message.endswith("; a complex parameter can travel as two real arrays (torch.view_as_real)")
    with pytest.raises(ValueError, match=r"^the ArrayRecord holds no floating-point arrays to compress$"):
        FlatLayout.from_arrayrecord(_record({"step": np.array(3, np.int64)}))


@pytest.mark.parametrize(
    "entry, reason",
    [
        (["w", "flat", [-1], "float32"], "bad entry ['w', 'flat', [-1], 'float32']"),
        (["w", "dense", [2], "float32"], "bad entry ['w', 'dense', [2], 'float32']"),
        (["w", "flat", [2], "int32"], "flat array 'w' has dtype int32"),
    ],
)
def test_from_json_refusals_name_the_entry(entry, reason):
    text = json.dumps([entry, ["b", "flat", [1], "float32"]])
    with pytest.raises(ValueError, match=rf"^malformed layout: {re.escape(reason)}$"):
        FlatLayout.from_json(text)


def test_from_json_refuses_layouts_without_flat_arrays_or_with_a_name_twice():
    for arrays in ([["s", "exact", [], "int64"]], [["w", "flat", [1], "float32"], ["w", "exact", [], "int64"]]):
        with pytest.raises(ValueError, match=r"^malformed layout: no flat arrays, or a name twice$"):
            FlatLayout.from_json(json.dumps(arrays))


def test_name_at_beyond_the_vector():
    layout, _ = _layout()
    assert layout.name_at(layout.numel - 1) == "b"
    with pytest.raises(IndexError, match=rf"^entry {layout.numel} is beyond the vector's {layout.numel} entries$"):
        layout.name_at(layout.numel)


def test_flatten_refuses_a_complex_array_by_name():
    layout, arrays = _layout()
    bad = dict(arrays, w=arrays["w"].astype(np.complex64))
    with pytest.raises(ValueError, match=r"^array 'w' is complex64, expected a real \(float\) array$"):
        layout.flatten(_record(bad))


def test_flatten_state_dict_refuses_a_misshapen_tensor_by_name():
    layout, arrays = _layout()
    state = {name: torch.from_numpy(a) for name, a in arrays.items()}
    state["w"] = state["w"].reshape(-1)
    with pytest.raises(ValueError, match=r"^tensor 'w' has shape \(6,\), expected \(2, 3\)$"):
        layout.flatten_state_dict(state)


def test_to_state_dict_refuses_a_vector_of_another_shape():
    layout, _ = _layout()
    n = layout.numel
    for vector in (torch.zeros(n + 1), torch.zeros(n - 1), torch.zeros(1, n), torch.zeros(n, 1)):
        shape = tuple(vector.shape)
        with pytest.raises(ValueError, match=rf"^vector has shape {re.escape(str(shape))}, expected \({n},\)$"):
            layout.to_state_dict(vector)
    assert list(layout.to_state_dict(torch.zeros(n))) == ["w", "b", "step"]


# ------------------------------------------------------------------ the layout's JSON
def test_to_json_is_compact():
    """The layout travels with every message: its JSON carries no whitespace between tokens."""
    layout, _ = _layout()
    text = layout.to_json()
    assert text == json.dumps(json.loads(text), separators=(",", ":"))
    assert not re.search(r"\s", text)


def test_from_json_parses_each_text_once_and_keeps_subclasses():
    layout, _ = _layout()
    text = layout.to_json()
    first = FlatLayout.from_json(text)
    assert FlatLayout.from_json(text) is first  # cached: "parsed once per text and process"

    class Tagged(FlatLayout):
        pass

    tagged = Tagged.from_json(text)
    assert type(tagged) is Tagged
    assert (tagged.names, tagged.shapes, tagged.dtypes, tagged.order) == (first.names, first.shapes, first.dtypes, first.order)
    assert tagged.exact_names == first.exact_names == ("step",)


def test_from_json_exact_zeros_are_read_only():
    """The parsed layout is shared by every caller of the cache: its exact arrays cannot be written."""
    layout, _ = _layout()
    zeros = dict(FlatLayout.from_json(layout.to_json()).passthrough)["step"]
    assert zeros == 0 and zeros.dtype == np.int64
    assert not zeros.flags.writeable
    with pytest.raises(ValueError):
        zeros[...] = 5


# ------------------------------------------------------------------ other float dtypes
_VECTOR_DTYPES = st.sampled_from([torch.float64, torch.float16, torch.bfloat16])


@given(dtype=_VECTOR_DTYPES, seed=st.integers(0, 2**16))
@settings(max_examples=30, deadline=None)
def test_step_and_flat_arrays_take_any_float_vector_as_float32(dtype, seed):
    layout, arrays = _layout()
    rng = np.random.default_rng(seed)
    vector = torch.from_numpy(rng.standard_normal(layout.numel).astype(np.float32)).to(dtype)
    as32 = vector.float()
    assert torch.equal(layout.step(vector, _record(arrays)), layout.step(as32, _record(arrays)))
    ours, ref = layout.flat_arrays(vector), layout.flat_arrays(as32)
    assert list(ours) == list(ref) == ["w", "b"]
    for name in ours:
        assert ours[name].dtype == "float32" and ours[name].data == ref[name].data
    assert vector_hash(vector) == vector_hash(as32)


@given(
    dtype=st.sampled_from([torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.uint8]),
    values=st.lists(st.sampled_from([0.0, 1.5, -2.0, 7.0, float("nan"), float("inf"), float("-inf")]), min_size=1, max_size=6),
)
@settings(max_examples=80, deadline=None)
def test_all_finite_of_any_dtype(dtype, values):
    if not dtype.is_floating_point:
        values = [v for v in values if np.isfinite(v)] or [0.0]
    vector = torch.tensor(values).to(dtype)
    assert all_finite(vector) is bool(np.all(np.isfinite(np.asarray(values, dtype=np.float64))))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_a_device_the_vector_is_read_on_the_host():
    """A model, vector or update on the GPU gives what its CPU copy gives (differs only on an accelerator)."""
    layout, arrays = _layout()
    vector = torch.linspace(-1, 1, layout.numel)
    gpu = vector.cuda()
    assert torch.equal(layout.step(gpu, _record(arrays)), layout.step(vector, _record(arrays)))
    assert all(a.data == b.data for a, b in zip(layout.flat_arrays(gpu).values(), layout.flat_arrays(vector).values()))
    assert vector_hash(gpu) == vector_hash(vector)
    assert all_finite(gpu) and not all_finite(torch.tensor([1.0, float("nan")], device="cuda"))
