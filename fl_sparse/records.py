"""Flower records built without re-checking every item: the same objects, a fraction of the cost.

Flower's record constructors check each item as it goes in: ``ConfigRecord``
and ``MetricRecord`` run two Python checks per key (about 2.5 us a field) and
``Array(dtype=..., shape=..., stype=..., data=...)`` sorts out which of its
three signatures it was called with (about 6 us). ``RecordDict`` checks each record's type
(about 4 us a record). The client mod builds about a dozen of these per
message, and the 70-odd microseconds they took were 5 % of its own work at
MLP size.

These functions build *fresh* records whose items the caller has already
typed (protocol fields, wire arrays). They check what Flower checks, in a
single cheap test per item (the exact type, from the same closed set), and
hand anything else to Flower's own constructor, so a bad item gets Flower's
error. They fill the record's storage directly, which is Flower's private
layout (``TypedDict.__dict__["_data"]``, the ``Array`` fields in its
``__dict__``): at import the module builds one record of each kind both ways
and uses the fast path only if the two are equal field for field; on any
other Flower it falls back to the public constructors for good (``FAST`` says
which). ``tests/test_records.py`` compares both ways on generated items.
"""

from __future__ import annotations

from typing import Any

from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

__all__ = ["array_record", "config_record", "metric_record", "record_dict", "wire_array", "FAST"]

# What Flower's checks accept as a scalar (bool is not a metric; lists take the slow path).
_CONFIG_SCALARS = frozenset({int, float, str, bool, bytes})
_METRIC_SCALARS = frozenset({int, float})
_RECORDS = frozenset({ArrayRecord, ConfigRecord, MetricRecord})
_ARRAYS = frozenset({Array})


def _typed_record(cls, items: dict[str, Any], allowed: frozenset):
    """``cls(items)``: filled directly when every key is a str and every value's type is in ``allowed``."""
    if FAST:
        for key, value in items.items():
            if type(key) is not str or type(value) not in allowed:
                break
        else:
            record = cls()  # fresh: nothing cached on it yet (object id, dirty flags)
            record.__dict__["_data"].update(items)
            return record
    return cls(items)  # Flower's own checks, and its error for a bad item


def config_record(items: dict[str, Any]) -> ConfigRecord:
    """``ConfigRecord(items)``."""
    return _typed_record(ConfigRecord, items, _CONFIG_SCALARS)


def metric_record(items: dict[str, Any]) -> MetricRecord:
    """``MetricRecord(items)``."""
    return _typed_record(MetricRecord, items, _METRIC_SCALARS)


def array_record(arrays: dict[str, Array]) -> ArrayRecord:
    """``ArrayRecord(arrays)`` from ``Array`` values (about 5 us an item through Flower's ``__setitem__``)."""
    record = _typed_record(ArrayRecord, arrays, _ARRAYS)
    if arrays and "_is_dirty" not in record.__dict__:
        record.__dict__["_is_dirty"] = True  # what Flower's __setitem__ leaves: not yet serialized
    return record


def record_dict(records: dict[str, Any]) -> RecordDict:
    """``RecordDict(records)`` (about 4 us a record through Flower's checks)."""
    return _typed_record(RecordDict, records, _RECORDS)


def wire_array(dtype: str, shape: tuple[int, ...], stype: str, data: bytes) -> Array:
    """``Array(dtype=dtype, shape=shape, stype=stype, data=data)``."""
    if FAST and type(dtype) is str and type(stype) is str and type(data) is bytes and type(shape) is tuple:
        for n in shape:
            if type(n) is not int:
                break
        else:
            array = object.__new__(Array)
            # What Array.__init__'s four assignments leave: the fields, marked dirty (no object id yet).
            array.__dict__.update(_is_dirty=True, dtype=dtype, shape=shape, stype=stype, data=data)
            return array
    return Array(dtype=dtype, shape=shape, stype=stype, data=data)


def _same_as_flowers() -> bool:
    """True if this Flower's records are laid out as the fast paths assume (see the module docstring)."""
    global FAST
    previous, FAST = FAST, True  # the fast paths on for the comparison, and as they were after it
    try:
        config = {"i": 1, "f": 0.5, "s": "x", "b": True, "y": b"\x00"}
        metric = {"i": 1, "f": 0.5}
        pairs = [
            (config_record(config), ConfigRecord(config)),
            (metric_record(metric), MetricRecord(metric)),
            (record_dict({"c": ConfigRecord(config)}), RecordDict({"c": ConfigRecord(config)})),
            (array_record({"a": Array(dtype="int32", shape=(2,), stype="raw", data=b"\x00" * 8)}),
             ArrayRecord({"a": Array(dtype="int32", shape=(2,), stype="raw", data=b"\x00" * 8)})),
            (wire_array("int32", (2,), "raw", b"\x00" * 8), Array(dtype="int32", shape=(2,), stype="raw", data=b"\x00" * 8)),
        ]
        return all(type(a) is type(b) and vars(a) == vars(b) and a == b for a, b in pairs)
    except Exception:  # any other layout: the public constructors it is
        return False
    finally:
        FAST = previous


FAST = False
FAST = _same_as_flowers()
