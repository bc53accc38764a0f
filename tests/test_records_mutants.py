"""Tests written to kill mutmut survivors of fl_sparse/records.py (the fast Flower records).

The one survivor of the run (``_same_as_flowers`` leaving ``FAST = True`` behind it instead of
``False``) showed that the layout check overwrote the switch it guards: called again after import
(``tests/test_records.py`` does, to check the fallback), it left ``FAST`` False for the rest of
the process, so every later test in a pytest session built its records through Flower's slow
constructors and the fast paths went untested. The check now leaves ``FAST`` as it found it; the
module assigns its result once, at import.
"""

from __future__ import annotations

import pytest
from flwr.app import Array

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
