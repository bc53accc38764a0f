"""The cheaper per-message paths (issue 11) compute exactly what the slower ones did.

Each test pins one change: the 128-bit model hash, the numpy finiteness
checks (flat and codec), the single error norm of ``client_compress``, the
record byte count, the protocol's record building and the cached layouts.
"""

from __future__ import annotations

import dataclasses

import math

import numpy as np
import pytest
import torch
import xxhash
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from hypothesis import given, settings
from hypothesis import strategies as st

from fl_sparse import algorithms, codec, protocol
from fl_sparse.compressors import TopK
from fl_sparse.flat import FlatLayout, all_finite, vector_hash
from fl_sparse.memory import ErrorFeedback
from fl_sparse.protocol import Instruction, ProtocolError, Report, UplinkMetrics
from fl_sparse.sparse import SparseTensor

_FLOAT_DTYPES = st.sampled_from([torch.float32, torch.float64, torch.float16])
_BAD = st.sampled_from([math.nan, math.inf, -math.inf])


# ====================================================================== hash
@given(n=st.integers(1, 300), seed=st.integers(0, 2**16), data=st.data())
@settings(max_examples=100, deadline=None)
def test_vector_hash_changes_with_any_single_bit_of_any_entry(n, seed, data):
    x = torch.randn(n, generator=torch.Generator().manual_seed(seed))
    i = data.draw(st.integers(0, n - 1), label="entry")
    bit = data.draw(st.integers(0, 31), label="bit")
    flipped = x.clone()
    flipped.view(torch.int32)[i] ^= np.int32(np.uint32(1 << bit).view(np.int32)).item()
    assert vector_hash(x) != vector_hash(flipped)


def test_vector_hash_is_128_bit_xxh3_of_the_float32_bytes():
    x = torch.arange(7, dtype=torch.float32) / 3
    digest = vector_hash(x)
    assert len(digest) == 32 and int(digest, 16) >= 0  # 128 bits as hex
    assert digest == xxhash.xxh3_128_hexdigest(x.numpy().tobytes())
    assert vector_hash(x.double()) == digest  # hashed as float32 whatever the input dtype
    assert vector_hash(torch.stack([x, x], 1)[:, 0]) == digest  # a strided view: its values


# ====================================================================== finiteness
@given(n=st.integers(1, 200), dtype=_FLOAT_DTYPES, seed=st.integers(0, 2**16), data=st.data())
@settings(max_examples=200, deadline=None)
def test_all_finite_is_torch_isfinite_all(n, dtype, seed, data):
    x = (torch.randn(n, generator=torch.Generator().manual_seed(seed)) * 100).to(dtype)
    bad = data.draw(st.lists(st.tuples(st.integers(0, n - 1), _BAD), max_size=3), label="planted")
    for i, v in bad:
        x[i] = v
    step = data.draw(st.integers(1, 3), label="stride")
    for view in (x, x[::step]):
        assert all_finite(view) == bool(torch.isfinite(view).all())


def test_all_finite_on_huge_finite_values_and_empty_vectors():
    big = torch.full((1000,), 3e38)  # a sum would overflow to inf; every entry is finite
    assert all_finite(big) and all_finite(-big) and all_finite(torch.empty(0))
    assert not all_finite(torch.tensor([3e38, -3e38, math.inf]))


@given(k=st.integers(1, 40), code=st.sampled_from(["fp32", "fp16"]), bad=_BAD, data=st.data())
@settings(max_examples=60, deadline=None)
def test_encode_and_lossy_roundtrip_refuse_any_non_finite_value(k, code, bad, data):
    values = torch.randn(k)
    values[data.draw(st.integers(0, k - 1), label="at")] = bad
    sparse = SparseTensor(torch.arange(k), values, 100)
    with pytest.raises(ValueError, match="NaN or Inf"):
        codec.encode(sparse, values=code)
    with pytest.raises(ValueError, match="NaN or Inf"):
        codec.lossy_roundtrip(sparse, values=code)
    with pytest.raises(ValueError, match="NaN or Inf"):
        codec.encode_values(values, values=code)


def test_codec_values_checks_keep_their_type_and_shape_errors():
    with pytest.raises(ValueError, match="flat 1-D"):
        codec.lossy_values(torch.zeros(2, 2))
    with pytest.raises(ValueError, match="floating"):
        codec.lossy_values(torch.zeros(3, dtype=torch.int64))
    assert codec.lossy_values(torch.tensor([1.5], dtype=torch.float64)).dtype == torch.float32


# ====================================================================== client_compress
@given(seed=st.integers(0, 2**16), rounds=st.integers(1, 4), k=st.integers(1, 20))
@settings(max_examples=40, deadline=None)
def test_client_compress_reports_the_norm_of_the_new_error_once(seed, rounds, k):
    gen = torch.Generator().manual_seed(seed)
    memory = ErrorFeedback(64)
    for _ in range(rounds):
        result = algorithms.client_compress(torch.randn(64, generator=gen), memory, TopK(k=k))
        assert result.error_norm == memory.norm()
        assert memory.norm() == pytest.approx(float(torch.linalg.vector_norm(memory.error.double())), rel=1e-6)
        assert result.compression_error == result.error_norm**2


# ====================================================================== record bytes
@given(
    n=st.integers(1, 400),
    density=st.floats(0.0, 1.0),
    values=st.sampled_from(codec.VALUE_CODES),
    positions=st.sampled_from(codec.POSITION_CODES),
    seed=st.integers(0, 2**16),
)
@settings(max_examples=80, deadline=None)
def test_record_bytes_is_wire_size_total(n, density, values, positions, seed):
    gen = torch.Generator().manual_seed(seed)
    idx = torch.nonzero(torch.rand(n, generator=gen) < density).flatten()
    record = codec.encode(SparseTensor(idx, torch.randn(idx.numel(), generator=gen), n), values, positions)
    assert codec.record_bytes(record) == codec.wire_size(record).total_bytes


# ====================================================================== protocol records
_INSTRUCTIONS = st.builds(
    Instruction,
    server_round=st.integers(0, 10**6),
    generation=st.from_regex(r"[A-Za-z0-9_-]{0,12}", fullmatch=True),
    nonce=st.text(max_size=20),
    model_version=st.integers(-1, 10**6),
    sync_mode=st.sampled_from(protocol.SYNC_MODES),
    error_feedback=st.booleans(),
    seed=st.integers(0, 2**31),
    vote_k=st.integers(0, 100),
)


@given(instr=_INSTRUCTIONS)
@settings(max_examples=60, deadline=None)
def test_instruction_record_round_trip_keeps_every_field_and_type(instr):
    record = instr.to_record()
    # On the wire: server-round and every field away from its default (the reader fills in the rest).
    at_default = {f.name for f in dataclasses.fields(Instruction)
                  if f.default is not dataclasses.MISSING and type(getattr(instr, f.name)) is type(f.default)
                  and getattr(instr, f.name) == f.default}
    assert set(record.keys()) == {f.replace("_", "-") for f in instr.__dataclass_fields__ if f not in at_default}
    assert "server-round" in record
    back = Instruction.read(RecordDict({protocol.RECORD: record}))
    assert back == instr
    assert all(type(getattr(back, f)) is type(getattr(instr, f)) for f in instr.__dataclass_fields__)


def test_records_refuse_unknown_and_missing_fields_and_wrong_types():
    record = Instruction(server_round=2).to_record()
    record["no-such-field"] = 1
    with pytest.raises(ProtocolError, match="unknown field.*no-such-field"):
        Instruction.from_record(record)
    with pytest.raises(ProtocolError, match="lacks the field 'server-round'"):
        Report.from_record(ConfigRecord({"nonce": "x"}))
    with pytest.raises(ProtocolError, match="'vote-k' must be int"):
        Instruction.from_record(ConfigRecord({"server-round": 1, "vote-k": True}))
    metrics = UplinkMetrics(uplink_bytes=3, density=0.5, error_norm=1.0, compression_error=1.0)
    assert UplinkMetrics.read(RecordDict({protocol.METRICS: metrics.to_record()})) == metrics


def test_only_a_config_record_under_the_protocol_key_is_an_instruction_or_report():
    assert Instruction.read(RecordDict({"config": ConfigRecord({"a": 1})})) is None
    assert Instruction.read(RecordDict({protocol.RECORD: ArrayRecord()})) is None
    assert Instruction.read(RecordDict({protocol.RECORD: MetricRecord({"server-round": 1})})) is None
    with pytest.raises(ProtocolError, match="no 'fl-sparse' ConfigRecord"):
        Report.read(RecordDict({protocol.RECORD: MetricRecord({"server-round": 1})}))
    report = Report(server_round=4, nonce="n", client_key="client-1", partition_id=1)
    assert Report.read(RecordDict({protocol.RECORD: report.to_record()})) == report


# ====================================================================== cached layouts
def test_from_json_is_parsed_once_and_its_zero_arrays_are_read_only():
    text = '[["w","flat",[2,3],"float32"],["steps","exact",[],"int64"],["b","flat",[3],"float16"]]'
    first, again = FlatLayout.from_json(text), FlatLayout.from_json(text)
    assert first is again
    zeros = dict(first.passthrough)["steps"]
    with pytest.raises(ValueError, match="read-only"):
        zeros[...] = 5
    record = first.unflatten(torch.arange(9, dtype=torch.float32))
    assert record["steps"].numpy() == 0 and record["b"].numpy().dtype == np.float16
    newer = first.with_exact(ArrayRecord({"steps": record["steps"].__class__(np.array(7, np.int64))}))
    assert int(dict(newer.passthrough)["steps"]) == 7 and int(dict(first.passthrough)["steps"]) == 0
