"""fl_sparse.records: the fast constructors build exactly what Flower's own do, and refuse what they refuse."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from hypothesis import given
from hypothesis import strategies as st

from fl_sparse import records

keys = st.text(max_size=12)
config_values = st.one_of(
    st.integers(-(2**63), 2**63 - 1), st.floats(allow_nan=False), st.text(max_size=8), st.booleans(), st.binary(max_size=8),
    st.lists(st.integers(0, 9), max_size=3),  # lists take Flower's own path
)
metric_values = st.one_of(st.integers(-(2**63), 2**63 - 1), st.floats(allow_nan=False), st.lists(st.floats(allow_nan=False), max_size=3))


def _same(fast, flowers) -> bool:
    return type(fast) is type(flowers) and vars(fast) == vars(flowers) and fast == flowers


def test_this_flowers_records_take_the_fast_path():
    assert records.FAST  # the import-time check passed on the Flower this package pins


@given(st.dictionaries(keys, config_values, max_size=8))
def test_config_record_equals_flowers(items):
    assert _same(records.config_record(dict(items)), ConfigRecord(dict(items)))


@given(st.dictionaries(keys, metric_values, max_size=8))
def test_metric_record_equals_flowers(items):
    assert _same(records.metric_record(dict(items)), MetricRecord(dict(items)))


@given(st.sampled_from(["float32", "int64", "uint8"]), st.lists(st.integers(0, 4), max_size=3), st.binary(max_size=16))
def test_wire_array_equals_flowers(dtype, shape, data):
    shape = tuple(shape)
    assert _same(records.wire_array(dtype, shape, "raw", data), Array(dtype=dtype, shape=shape, stype="raw", data=data))


def test_record_dict_equals_flowers():
    items = {"c": ConfigRecord({"a": 1}), "m": MetricRecord({"b": 2.0}), "a": ArrayRecord({"x": Array(np.ones(2))})}
    assert _same(records.record_dict(dict(items)), RecordDict(dict(items)))


@pytest.mark.parametrize(
    "build, items",
    [
        (records.config_record, {"a": object()}),
        (records.config_record, {1: 2}),
        (records.metric_record, {"a": True}),  # bool is not a metric for Flower either
        (records.metric_record, {"a": "x"}),
        (records.record_dict, {"a": {"not": "a record"}}),
    ],
)
def test_what_flower_refuses_gets_flowers_error(build, items):
    flowers = {records.config_record: ConfigRecord, records.metric_record: MetricRecord, records.record_dict: RecordDict}[build]
    with pytest.raises(TypeError) as theirs:
        flowers(dict(items))
    with pytest.raises(TypeError) as ours:
        build(dict(items))
    assert str(ours.value) == str(theirs.value)


def test_bad_array_fields_get_flowers_error():
    with pytest.raises(TypeError) as theirs:
        Array(dtype="float32", shape=(2.0,), stype="raw", data=b"")
    with pytest.raises(TypeError) as ours:
        records.wire_array("float32", (2.0,), "raw", b"")
    assert str(ours.value) == str(theirs.value)


def test_a_flower_with_another_layout_gets_the_public_constructors(monkeypatch):
    """Were Flower's Array to carry one more field, the import-time check must turn the fast paths off."""
    real_init = Array.__init__

    def init_with_a_new_field(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        self.__dict__["_new_field"] = 0

    monkeypatch.setattr(Array, "__init__", init_with_a_new_field)
    assert records._same_as_flowers() is False
    monkeypatch.setattr(records, "FAST", False)
    built = records.wire_array("uint8", (1,), "raw", b"\x01")
    assert vars(built)["_new_field"] == 0  # built by Flower's constructor


@given(st.dictionaries(keys, st.sampled_from(["float32", "int64"]), max_size=5))
def test_array_record_equals_flowers(dtypes):
    arrays = {k: Array(np.zeros(3, dtype=d)) for k, d in dtypes.items()}
    assert _same(records.array_record(dict(arrays)), ArrayRecord(dict(arrays)))


def test_array_record_refuses_what_flower_refuses():
    with pytest.raises(TypeError) as theirs:
        ArrayRecord({"a": Array(np.ones(2)), "b": np.ones(2)})
    with pytest.raises(TypeError) as ours:
        records.array_record({"a": Array(np.ones(2)), "b": np.ones(2)})
    assert str(ours.value) == str(theirs.value)
