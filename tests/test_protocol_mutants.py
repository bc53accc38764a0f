"""Tests written to kill mutmut survivors of fl_sparse/protocol.py (the message records).

Each pins a behaviour the other protocol tests left open: the refusal messages name the record
as well as the field, a reply's Report record carries no field at its default (Flower's
``count_bytes`` refuses empty strings), the metrics record carries every metric, even at zero,
and a malformed value in a metric is a ProtocolError, never a bare TypeError.
"""

from __future__ import annotations

import pytest
from flwr.app import ConfigRecord, MetricRecord, RecordDict
from hypothesis import given, settings
from hypothesis import strategies as st

from fl_sparse import protocol
from fl_sparse.protocol import Instruction, ProtocolError, Report, UplinkMetrics

METRIC_KEYS = ("uplink-bytes", "density", "error-norm", "compression-error")


# ------------------------------------------------------------------ what the refusals say
def test_array_record_names_the_message_by_default():
    with pytest.raises(ProtocolError, match=r"^message has no 'fl-sparse\.sync' ArrayRecord$"):
        protocol.array_record(RecordDict(), protocol.SYNC)


def test_array_record_names_what_the_caller_says():
    with pytest.raises(ProtocolError, match=r"^reply has no 'x' ArrayRecord$"):
        protocol.array_record(RecordDict(), "x", what="reply")


@pytest.mark.parametrize(
    ("reader", "what"),
    [(Instruction.from_record, "instruction"), (Report.from_record, "client report")],
)
def test_a_missing_round_is_refused_naming_the_record(reader, what):
    with pytest.raises(ProtocolError, match=rf"^{what} lacks the field 'server-round'$"):
        reader(ConfigRecord({"nonce": "n"}))


@pytest.mark.parametrize(
    ("reader", "what"),
    [(Instruction.from_record, "instruction"), (Report.from_record, "client report")],
)
def test_unknown_fields_are_refused_naming_the_record(reader, what):
    with pytest.raises(ProtocolError, match=rf"^{what} has unknown field\(s\) \['bogus', 'zz'\]$"):
        reader(ConfigRecord({"server-round": 1, "zz": 1, "bogus": "x"}))


def test_uplink_metrics_refusals_name_the_record():
    content = RecordDict({protocol.METRICS: MetricRecord({"density": 0.5, "bogus": 1.0})})
    with pytest.raises(ProtocolError, match=r"^uplink metrics has unknown field\(s\) \['bogus'\]$"):
        UplinkMetrics.read(content)


def test_an_unknown_error_memory_dtype_is_named_in_the_message():
    record = ConfigRecord({"server-round": 1, "error-memory-dtype": "float64"})
    with pytest.raises(ProtocolError, match=r"unknown error-memory-dtype 'float64'; expected one of"):
        Instruction.from_record(record)


# ------------------------------------------------------------------ metric values
@pytest.mark.parametrize("key", ["density", "error-norm", "compression-error"])
@pytest.mark.parametrize("value", [[0.5], [1, 2], []])
def test_a_list_in_a_float_metric_is_a_protocol_error_naming_it(key, value):
    # MetricRecord accepts lists of numbers; a metric is one number. A hostile reply must get a
    # ProtocolError (the server drops it), not a TypeError out of float().
    content = RecordDict({protocol.METRICS: MetricRecord({key: value})})
    with pytest.raises(ProtocolError, match=rf"^protocol field '{key}' must be float, got \["):
        UplinkMetrics.read(content)


def test_a_list_in_the_byte_count_is_a_protocol_error():
    content = RecordDict({protocol.METRICS: MetricRecord({"uplink-bytes": [3]})})
    with pytest.raises(ProtocolError, match=r"'uplink-bytes' must be int, got \[3\]"):
        UplinkMetrics.read(content)


# ------------------------------------------------------------------ what the writers put in a record
@settings(max_examples=50, deadline=None)
@given(
    uplink_bytes=st.integers(0, 2**40),
    density=st.floats(0, 1),
    error_norm=st.floats(0, 1e30),
    compression_error=st.floats(0, 1e30),
)
def test_the_metrics_record_carries_every_metric_even_at_zero(uplink_bytes, density, error_norm, compression_error):
    # A metric at 0 is a measurement, not a missing one: every reply's MetricRecord has the same
    # keys (Flower aggregates metric records key by key across replies).
    m = UplinkMetrics(uplink_bytes, density, error_norm, compression_error)
    record = m.to_record()
    assert tuple(record.keys()) == METRIC_KEYS
    assert dict(record) == {
        "uplink-bytes": uplink_bytes,
        "density": density,
        "error-norm": error_norm,
        "compression-error": compression_error,
    }
    assert UplinkMetrics.read(RecordDict({protocol.METRICS: record})) == m


def test_an_all_zero_metrics_record_is_not_empty():
    assert dict(UplinkMetrics().to_record()) == {
        "uplink-bytes": 0,
        "density": 0.0,
        "error-norm": 0.0,
        "compression-error": 0.0,
    }


def test_a_default_report_record_holds_only_the_round():
    record = Report(server_round=3).to_record()
    assert dict(record) == {"server-round": 3}
    record.count_bytes()  # Flower refuses empty strings here; a default Report has none to send
    assert Report.from_record(record) == Report(server_round=3)


@settings(max_examples=50, deadline=None)
@given(
    nonce=st.sampled_from(["", "n1"]),
    model_version=st.sampled_from([-1, 0, 4]),
    client_key=st.sampled_from(["", "client-2"]),
    partition_id=st.sampled_from([-1, 0, 2]),
)
def test_a_report_record_leaves_out_exactly_the_fields_at_their_default(nonce, model_version, client_key, partition_id):
    report = Report(
        server_round=1, nonce=nonce, model_version=model_version, client_key=client_key, partition_id=partition_id
    )
    record = report.to_record()
    expected = {"server-round": 1}
    for key, value, default in (
        ("nonce", nonce, ""),
        ("model-version", model_version, -1),
        ("client-key", client_key, ""),
        ("partition-id", partition_id, -1),
    ):
        if value != default:
            expected[key] = value
    assert dict(record) == expected
    assert "" not in record.values()
    record.count_bytes()
    assert Report.from_record(record) == report


def test_a_report_without_a_round_is_not_written():
    # server-round has no default: a Report built without a real one must not become a record that
    # silently lacks the field.
    with pytest.raises((TypeError, ProtocolError)):
        Report(server_round=None).to_record()  # type: ignore[arg-type]
