"""Tests written to kill mutmut survivors of fl_sparse/records.py (the fast Flower records).

The one survivor of the run (``_same_as_flowers`` leaving ``FAST = True`` behind it instead of
``False``) showed that the layout check overwrote the switch it guards: called again after import
(``tests/test_records.py`` does, to check the fallback), it left ``FAST`` False for the rest of
the process, so every later test in a pytest session built its records through Flower's slow
constructors and the fast paths went untested. The check now leaves ``FAST`` as it found it; the
module assigns its result once, at import.

The other survivors: the fast path must actually be taken for typed items (two mutants sent every
record through Flower's per-item checks, which build the same record, only slower), and a Flower
whose records the layout check cannot even build the fast way must get the public constructors.
"""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from fl_sparse import records


@pytest.mark.parametrize("before", [True, False])
def test_the_layout_check_leaves_the_switch_as_it_found_it(monkeypatch, before):
    monkeypatch.setattr(records, "FAST", before)
    assert records._same_as_flowers() is True  # this Flower's layout, whatever the switch said
    assert records.FAST is before


@pytest.mark.parametrize("before", [True, False])
def test_a_failed_layout_check_does_not_touch_the_switch_either(monkeypatch, before):
    real_init = Array.__init__

    def init_with_a_new_field(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        self.__dict__["_new_field"] = 0

    monkeypatch.setattr(Array, "__init__", init_with_a_new_field)
    monkeypatch.setattr(records, "FAST", before)
    assert records._same_as_flowers() is False
    assert records.FAST is before


def test_the_fast_path_is_on_after_the_layout_checks_ran():
    """What the rest of a pytest session sees: the checks above and in test_records.py ran first."""
    records._same_as_flowers()
    assert records.FAST is True
    built = records.wire_array("uint8", (1,), "raw", b"\x01")
    assert vars(built) == {"_is_dirty": True, "dtype": "uint8", "shape": (1,), "stype": "raw", "data": b"\x01"}


class _OtherLayout(dict):
    """A record class without Flower's ``_data`` storage: building it the fast way raises."""


def test_a_layout_check_that_raises_means_the_public_constructors(monkeypatch):
    monkeypatch.setattr(records, "ConfigRecord", _OtherLayout)
    assert records._same_as_flowers() is False


def _count_item_checks(monkeypatch, cls) -> list:
    calls = []
    real = cls.__setitem__

    def setitem(self, key, value):
        calls.append(key)
        return real(self, key, value)

    monkeypatch.setattr(cls, "__setitem__", setitem)
    return calls


@pytest.mark.parametrize(
    ("build", "cls", "items", "untyped"),
    [
        (records.config_record, ConfigRecord, {"i": 1, "f": 0.5, "s": "x", "b": True, "y": b"\x00"}, [1, 2]),
        (records.metric_record, MetricRecord, {"i": 1, "f": 0.5}, [0.5]),
        (records.array_record, ArrayRecord, {"a": Array(np.ones(2)), "b": Array(np.zeros(3, dtype=np.int64))}, None),
        (records.record_dict, RecordDict, {"c": ConfigRecord({"a": 1}), "m": MetricRecord({"b": 2.0})}, None),
    ],
)
def test_typed_items_skip_flowers_item_checks(monkeypatch, build, cls, items, untyped):
    """The point of the module: typed items go in without Flower's per-item checks (``__setitem__``)."""
    assert records.FAST
    flowers = cls(dict(items))
    calls = _count_item_checks(monkeypatch, cls)
    built = build(dict(items))
    assert calls == []
    assert type(built) is cls and vars(built) == vars(flowers) and built == flowers
    if untyped is not None:  # a list value takes Flower's own path, item by item
        slow = build({**items, "z": untyped})
        assert calls == [*items, "z"] and slow["z"] == untyped
