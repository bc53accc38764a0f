"""The message contract (fl_sparse.protocol): typed records, strict readers, record names.

Every reader must refuse a malformed record with a ProtocolError that names
the offending field, so either side can say why a message was dropped.
"""

from __future__ import annotations

import math
from dataclasses import MISSING, fields, replace

import pytest
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from flwr.common import serde
from hypothesis import given, settings
from hypothesis import strategies as st

from fl_sparse import protocol
from fl_sparse.codec import PayloadError
from fl_sparse.protocol import Instruction, ProtocolError, Report, UplinkMetrics

ALL_RECORD_NAMES = (
    protocol.RECORD,
    protocol.SYNC,
    protocol.EXACT,
    protocol.MASK,
    protocol.UPDATE,
    protocol.VOTE,
    protocol.VOTE_ADD,
    protocol.VOTE_DROP,
    protocol.METRICS,
    protocol.DIAGNOSTICS,
)

INT64 = st.integers(min_value=-(2**63), max_value=2**63 - 1)
NON_NEG_INT = st.integers(min_value=0, max_value=2**63 - 1)
TEXT = st.text(max_size=40)


def _wire(record):
    """The record after Flower's protobuf serialisation (what really crosses the network)."""
    if isinstance(record, ConfigRecord):
        return serde.config_record_from_proto(serde.config_record_to_proto(record))
    return serde.metric_record_from_proto(serde.metric_record_to_proto(record))


def _key(name: str) -> str:
    return name.replace("_", "-")


# ====================================================================== round trips
INSTRUCTION_FIELDS = dict(
    server_round=NON_NEG_INT,
    phase=st.sampled_from(protocol.PHASES),
    generation=st.from_regex(r"[A-Za-z0-9_-]{0,64}", fullmatch=True),
    nonce=TEXT,
    model_version=INT64,
    model_hash=TEXT,
    sync_mode=st.sampled_from(protocol.SYNC_MODES),
    base_version=INT64,
    accepted_round=INT64,
    layout=TEXT,
    arrays_key=TEXT,
    uplink=TEXT,
    uplink_values=TEXT,
    uplink_positions=TEXT,
    error_feedback=st.booleans(),
    seed=INT64,
    diagnostics=st.booleans(),
    state_dir=TEXT,
    state_fsync=st.booleans(),
    error_memory_dtype=st.sampled_from(protocol.ERROR_MEMORY_DTYPES),
    vote_k=NON_NEG_INT,
    add_drop_k=NON_NEG_INT,
    vote_round=INT64,
    vote_positions=TEXT,
    mask_round=INT64,
)
instructions = st.builds(Instruction, **INSTRUCTION_FIELDS)

REPORT_FIELDS = dict(
    server_round=INT64,
    nonce=TEXT,
    model_version=INT64,
    model_hash=TEXT,
    client_key=TEXT,
    partition_id=INT64,
    vote_kind=TEXT,
    vote_base_round=INT64,
)
reports = st.builds(Report, **REPORT_FIELDS)

FINITE_NON_NEG = st.floats(min_value=0.0, allow_nan=False, allow_infinity=False)
METRICS_FIELDS = dict(
    uplink_bytes=NON_NEG_INT,
    density=FINITE_NON_NEG,
    error_norm=FINITE_NON_NEG,
    compression_error=FINITE_NON_NEG,
)
metrics = st.builds(UplinkMetrics, **METRICS_FIELDS)


def test_strategies_cover_every_field():
    """The round-trip strategies above must not silently miss a field added later."""
    for cls, covered in ((Instruction, INSTRUCTION_FIELDS), (Report, REPORT_FIELDS), (UplinkMetrics, METRICS_FIELDS)):
        assert {f.name for f in fields(cls)} == set(covered), f"{cls.__name__} changed: extend the strategies"


def _differs(value, default) -> bool:
    return default is MISSING or type(value) is not type(default) or value != default


@settings(max_examples=150, deadline=None)
@given(instructions)
def test_instruction_round_trip(instr):
    record = instr.to_record()
    assert isinstance(record, ConfigRecord)
    # Every field not at its default is on the wire; those at their default are left out.
    assert set(record) == {_key(f.name) for f in fields(Instruction) if _differs(getattr(instr, f.name), f.default)}
    assert Instruction.from_record(record) == instr
    assert Instruction.from_record(_wire(record)) == instr
    content = RecordDict({protocol.RECORD: _wire(record), "config": ConfigRecord({"lr": 0.1})})
    assert Instruction.read(content) == instr
    # A server before fields at their default were left out sent every field: still read.
    assert Instruction.from_record(ConfigRecord(protocol._to_items(instr))) == instr


@settings(max_examples=100, deadline=None)
@given(reports)
def test_report_round_trip(report):
    record = _wire(report.to_record())
    assert Report.from_record(record) == report
    assert Report.read(RecordDict({protocol.RECORD: record})) == report


@settings(max_examples=100, deadline=None)
@given(metrics)
def test_uplink_metrics_round_trip(m):
    record = m.to_record()
    assert isinstance(record, MetricRecord)
    back = UplinkMetrics.read(RecordDict({protocol.METRICS: _wire(record)}))
    assert back == m
    assert isinstance(back.uplink_bytes, int) and isinstance(back.density, float)


def test_uplink_metrics_accept_an_int_where_a_float_is_due():
    record = MetricRecord({"uplink-bytes": 12, "density": 1, "error-norm": 0, "compression-error": 3})
    back = UplinkMetrics.read(RecordDict({protocol.METRICS: record}))
    assert back == UplinkMetrics(12, 1.0, 0.0, 3.0)
    assert isinstance(back.density, float) and isinstance(back.compression_error, float)


def test_defaults_fill_missing_optional_fields():
    instr = Instruction.from_record(ConfigRecord({"server-round": 4}))
    assert instr == Instruction(server_round=4)
    assert instr.phase == protocol.PHASE_TRAIN and instr.sync_mode == "none" and instr.error_feedback is True
    assert Report.from_record(ConfigRecord({"server-round": 2})) == Report(server_round=2)


def test_read_returns_none_without_an_instruction():
    assert Instruction.read(RecordDict({"config": ConfigRecord({"server-round": 1})})) is None
    with pytest.raises(ProtocolError, match="SparseMod"):
        Report.read(RecordDict({"metrics": MetricRecord({"num-examples": 3})}))
    with pytest.raises(ProtocolError, match=protocol.METRICS):
        UplinkMetrics.read(RecordDict({"metrics": MetricRecord({"num-examples": 3})}))


# ====================================================================== refusals
def _instruction_record(**override) -> ConfigRecord:
    items = dict(Instruction(server_round=3, phase=protocol.PHASE_VOTE, vote_k=4).to_record())
    items.update(override)
    return ConfigRecord(items)


@pytest.mark.parametrize(
    "key, value",
    [
        ("server-round", True),  # bool is not an int here
        ("server-round", "3"),
        ("server-round", 3.0),
        ("model-version", False),
        ("seed", "0"),
        ("vote-k", 4.0),
        ("accepted-round", [1, 2]),
        ("error-feedback", 1),  # an int is not a bool
        ("diagnostics", "yes"),
        ("state-fsync", 0),
        ("phase", 1),
        ("sync-mode", b"dense"),
        ("model-hash", 12),
        ("uplink", 1.5),
    ],
)
def test_instruction_refuses_wrong_types_naming_the_field(key, value):
    with pytest.raises(ProtocolError, match=f"'{key}'"):
        Instruction.from_record(_instruction_record(**{key: value}))


@pytest.mark.parametrize(
    "key, value",
    [("server-round", True), ("partition-id", "1"), ("vote-base-round", 2.0), ("client-key", 7), ("model-hash", False)],
)
def test_report_refuses_wrong_types_naming_the_field(key, value):
    items = dict(Report(server_round=2, partition_id=1, client_key="client-1").to_record())
    items[key] = value
    with pytest.raises(ProtocolError, match=f"'{key}'"):
        Report.from_record(ConfigRecord(items))


@pytest.mark.parametrize(
    "key, value",
    [
        ("density", math.nan),
        ("error-norm", math.inf),
        ("compression-error", -math.inf),
        ("uplink-bytes", 3.0),  # a count is an int
        ("uplink-bytes", 2.5),
    ],
)
def test_uplink_metrics_refuse_bad_values_naming_the_field(key, value):
    items = dict(UplinkMetrics(10, 0.5, 1.0, 2.0).to_record())
    items[key] = value
    with pytest.raises(ProtocolError, match=f"'{key}'"):
        UplinkMetrics.read(RecordDict({protocol.METRICS: MetricRecord(items)}))


@pytest.mark.parametrize("key", ["uplink-bytes", "density", "error-norm", "compression-error"])
def test_negative_metrics_are_refused(key):
    items = dict(UplinkMetrics(10, 0.5, 1.0, 2.0).to_record())
    items[key] = -1 if key == "uplink-bytes" else -1e-30
    with pytest.raises(ProtocolError, match=f"'{key}'"):
        UplinkMetrics.read(RecordDict({protocol.METRICS: MetricRecord(items)}))
    with pytest.raises(ProtocolError, match=f"'{key}'"):
        UplinkMetrics(**{**UplinkMetrics(10, 0.5, 1.0, 2.0).__dict__, key.replace("-", "_"): -1})


@pytest.mark.parametrize(
    "reader, python_name",
    [
        (lambda extra: Instruction.from_record(_instruction_record(**extra)), "server_round"),
        (lambda extra: Report.from_record(ConfigRecord({**Report(server_round=1).to_record(), **extra})), "partition_id"),
        (
            lambda extra: UplinkMetrics.read(
                RecordDict({protocol.METRICS: MetricRecord({**UplinkMetrics().to_record(), **extra})})
            ),
            "uplink_bytes",
        ),
    ],
    ids=["instruction", "report", "metrics"],
)
def test_unknown_fields_are_refused_by_name(reader, python_name):
    with pytest.raises(ProtocolError, match="future-field"):
        reader({"future-field": 1})
    # the Python spelling ('_') of a real field is not its wire name ('-')
    with pytest.raises(ProtocolError, match=python_name):
        reader({python_name: 1})


@pytest.mark.parametrize("cls", [Instruction, Report])
def test_missing_required_field(cls):
    with pytest.raises(ProtocolError, match="'server-round'"):
        cls.from_record(ConfigRecord({"model-version": 1}))


@pytest.mark.parametrize(
    "key, value, name",
    [
        ("phase", "training", "phase"),
        ("phase", "", "phase"),
        ("sync-mode", "full", "sync-mode"),
        ("sync-mode", "Dense", "sync-mode"),
        ("server-round", -1, "server-round"),
        ("vote-k", -3, "vote-k"),
        ("add-drop-k", -1, "add-drop-k"),
    ],
)
def test_bad_values_are_refused_naming_the_field(key, value, name):
    with pytest.raises(ProtocolError, match=name):
        Instruction.from_record(_instruction_record(**{key: value}))
    kwargs = {f.name: getattr(Instruction(server_round=1), f.name) for f in fields(Instruction)}
    kwargs[key.replace("-", "_")] = value
    with pytest.raises(ProtocolError, match=name):
        Instruction(**kwargs)


@pytest.mark.parametrize(
    "uplink",
    ["{", "", "not json", "[1, 2]", '"topk"', "{}", '{"name": 3}', '{"k": 5}', "null", "NaN"],
)
def test_malformed_uplink_spec_is_refused(uplink):
    instr = Instruction.from_record(_instruction_record(uplink=uplink))  # read lazily: a string is a string
    with pytest.raises(ProtocolError, match="uplink"):
        instr.uplink_spec()


def test_uplink_spec_parses_an_object():
    instr = Instruction(server_round=1, uplink='{"name": "topk", "k": 5}')
    assert instr.uplink_spec() == {"name": "topk", "k": 5}
    assert Instruction(server_round=1).uplink_spec()["name"] == "none"


def test_protocol_error_is_a_payload_error():
    assert issubclass(ProtocolError, PayloadError) and issubclass(ProtocolError, ValueError)


# ====================================================================== record names
def test_record_names_are_distinct_and_all_protocol_keys():
    assert len(set(ALL_RECORD_NAMES)) == len(ALL_RECORD_NAMES)
    for name in ALL_RECORD_NAMES:
        assert protocol.is_protocol_key(name), name


@pytest.mark.parametrize(
    "key",
    [
        "config",
        "arrays",
        "metrics",
        "",
        protocol.PREFIX + "ly",  # shares the prefix but is not in its namespace
        protocol.PREFIX + "-extra",
        protocol.PREFIX + "_x",
        protocol.PREFIX.upper(),
        protocol.PREFIX.upper() + ".sync",
        "x." + protocol.PREFIX,
        " " + protocol.PREFIX,
        protocol.PREFIX[:-1],
    ],
)
def test_keys_outside_the_namespace_are_user_keys(key):
    assert not protocol.is_protocol_key(key)


@given(st.text(max_size=20))
def test_every_dotted_child_of_the_prefix_is_a_protocol_key(suffix):
    assert protocol.is_protocol_key(protocol.PREFIX + "." + suffix)
    assert protocol.is_protocol_key(protocol.PREFIX)


@settings(max_examples=100, deadline=None)
@given(
    user=st.lists(
        st.one_of(
            st.sampled_from(["config", "arrays", "metrics", protocol.PREFIX + "ly", protocol.PREFIX.upper()]),
            st.text(min_size=1, max_size=12).filter(lambda k: not k.lower().startswith(protocol.PREFIX[:3])),
        ),
        unique=True,
        max_size=5,
    ),
    ours=st.lists(st.sampled_from(ALL_RECORD_NAMES), unique=True, max_size=len(ALL_RECORD_NAMES)),
)
def test_user_records_removes_exactly_the_protocol_records(user, ours):
    content = RecordDict()
    originals = {}
    for i, key in enumerate(user):
        record = [ConfigRecord({"i": i}), MetricRecord({"m": float(i)}), ArrayRecord()][i % 3]
        content[key] = record
        originals[key] = record
    for key in ours:
        content[key] = ConfigRecord({"ours": 1})
    before = list(content.keys())
    kept = protocol.user_records(content)
    assert list(kept.keys()) == [k for k in before if k in originals]  # same order, only the user's
    for key, record in originals.items():
        assert kept[key] is record  # untouched, not copied
    assert list(content.keys()) == before  # the original is not changed
    assert kept is not content


def test_array_record_names_the_missing_key():
    arrays = ArrayRecord()
    content = RecordDict({protocol.MASK: arrays, "config": ConfigRecord({"a": 1})})
    assert protocol.array_record(content, protocol.MASK) is arrays
    with pytest.raises(ProtocolError, match=f"reply has no '{protocol.EXACT}'"):
        protocol.array_record(content, protocol.EXACT, what="reply")
    with pytest.raises(ProtocolError, match="'config'"):  # present, but not an ArrayRecord
        protocol.array_record(content, "config")


def test_phases_and_sync_modes():
    assert set(protocol.PHASES) == {
        protocol.PHASE_TRAIN,
        protocol.PHASE_VOTE,
        protocol.PHASE_VALUES,
        protocol.PHASE_IDENTIFY,
    }
    assert len(set(protocol.PHASES)) == 4
    assert set(protocol.SYNC_MODES) == {"none", "dense", "delta", "set", "values"}
    for phase in protocol.PHASES:
        assert Instruction(server_round=0, phase=phase).phase == phase
    for mode in protocol.SYNC_MODES:
        assert replace(Instruction(server_round=0), sync_mode=mode).sync_mode == mode


@pytest.mark.parametrize("generation", ["../up", "a/b", "x" * 65, "gen id", "\x00"])
def test_a_generation_that_is_not_a_folder_name_is_refused(generation):
    """The generation names the clients' state folder: nothing that could leave it or break it."""
    with pytest.raises(ProtocolError, match="generation"):
        Instruction(server_round=1, generation=generation)


@pytest.mark.parametrize("present", ["absent", "config", "metric"])
def test_a_record_of_the_wrong_kind_is_named_not_used(present):
    """A reply whose update (or metrics) key holds another record type is refused as missing."""
    other = {"absent": None, "config": ConfigRecord({"a": 1}), "metric": MetricRecord({"a": 1})}[present]
    content = RecordDict({protocol.UPDATE: other, protocol.METRICS: other} if other is not None else {})
    with pytest.raises(ProtocolError, match=f"reply has no {protocol.UPDATE!r} ArrayRecord"):
        protocol.array_record(content, protocol.UPDATE, what="reply")
    if present != "metric":
        with pytest.raises(ProtocolError, match=f"reply has no {protocol.METRICS!r} MetricRecord"):
            UplinkMetrics.read(content)
    good = ArrayRecord()
    assert protocol.array_record(RecordDict({protocol.UPDATE: good}), protocol.UPDATE) is good
