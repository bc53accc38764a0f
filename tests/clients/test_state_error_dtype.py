"""The error memory stored as float16 / bfloat16: computed in float32, rounded when stored, never inf."""

from __future__ import annotations

import json
import logging
import math
import struct

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fl_sparse.clients import state as state_module
from fl_sparse.clients.state import ERROR_DTYPES, ClientState, ClientStateStore, decode_state, encode_state

HALF = {"float16": torch.float16, "bfloat16": torch.bfloat16}


@pytest.fixture(autouse=True)
def _fresh_cache(monkeypatch):
    monkeypatch.setattr(state_module, "_CACHE", state_module._StateCache())


def _header(raw: bytes) -> dict:
    (n,) = struct.unpack_from("<I", raw, len(state_module.MAGIC))
    return json.loads(raw[len(state_module.MAGIC) + 4 : len(state_module.MAGIC) + 4 + n])


errors = st.lists(
    st.floats(min_value=-6e4, max_value=6e4, allow_nan=False, allow_infinity=False, width=32), min_size=0, max_size=80
).map(lambda xs: torch.tensor(xs, dtype=torch.float32))


@given(errors, st.sampled_from(["float16", "bfloat16"]), st.booleans(), st.booleans())
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_round_trip_equals_the_rounded_float32_memory(tmp_path_factory, error, dtype, from_file, share):
    store = ClientStateStore(tmp_path_factory.mktemp("s"), durable=False, error_dtype=dtype, share_models=share)
    model = torch.linspace(-1, 1, 9)
    store.save("client-1", ClientState(model=model, model_version=3, error=error, steps_done=2))
    if from_file:
        state_module._CACHE.clear()
    loaded = store.load("client-1")
    assert loaded.error.dtype == torch.float32  # computed in float32
    assert torch.equal(loaded.error, error.to(HALF[dtype]).to(torch.float32))  # the stored rounding, exactly
    assert torch.equal(loaded.model, model) and loaded.model_version == 3
    again = store.load("client-1")  # the cache and the file give the same memory
    assert torch.equal(again.error, loaded.error)


@pytest.mark.parametrize("dtype", ERROR_DTYPES)
def test_the_file_holds_the_error_in_the_chosen_dtype(tmp_path, dtype):
    d = 1000
    store = ClientStateStore(tmp_path, durable=False, error_dtype=dtype)
    error = torch.randn(d)
    store.save("client-1", ClientState(error=error))
    raw = store.path("client-1").read_bytes()
    header = _header(raw)
    (entry,) = [e for e in header["tensors"] if e[0] == "error"]
    assert entry[1] == dtype
    itemsize = torch.empty(0, dtype=getattr(torch, dtype)).element_size()
    assert header["data_bytes"] == d * itemsize
    if dtype == "float32":
        assert "casts" not in header  # byte for byte today's format
    else:
        assert header["casts"] == {"error": "float32"}
    decoded = decode_state(bytearray(raw))  # the file says what it was: float32 again
    assert decoded.error.dtype == torch.float32


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_out_of_range_entries_are_clamped_with_a_warning_never_inf(tmp_path, dtype, caplog):
    limit = torch.finfo(HALF[dtype]).max
    store = ClientStateStore(tmp_path, durable=False, error_dtype=dtype)
    big = 1e5 if dtype == "float16" else 3.4e38  # beyond 65504 / bfloat16's 3.3895e38
    error = torch.tensor([big, -big, 70000.0 if dtype == "float16" else 1.0, 1.5, float("nan")], dtype=torch.float32)
    with caplog.at_level(logging.WARNING, logger="flwr"):
        store.save("client-1", ClientState(error=error))
    state_module._CACHE.clear()
    loaded = store.load("client-1").error
    assert not torch.isinf(loaded).any()
    assert loaded[0] == limit and loaded[1] == -limit and loaded[3] == 1.5
    assert math.isnan(loaded[4])  # a NaN stays what it is (the mod never stores one)
    (warning,) = [r.getMessage() for r in caplog.records if "error memory" in r.getMessage()]
    assert f"beyond the {dtype} range" in warning and "clamped" in warning
    assert warning.startswith(f"error memory: {3 if dtype == 'float16' else 2} entries")


def test_entries_just_inside_the_float16_range_are_not_touched(tmp_path, caplog):
    store = ClientStateStore(tmp_path, durable=False, error_dtype="float16")
    error = torch.tensor([65504.0, -65504.0, 6e-8, 1e-9])
    with caplog.at_level(logging.WARNING, logger="flwr"):
        store.save("client-1", ClientState(error=error))
    assert not caplog.records
    state_module._CACHE.clear()
    assert torch.equal(store.load("client-1").error, error.to(torch.float16).float())  # 1e-9 underflows to 0


def test_other_dtypes_and_entries_are_stored_as_they_are(tmp_path):
    store = ClientStateStore(tmp_path, durable=False, error_dtype="float16")
    half = torch.randn(5).half()
    store.save("a", ClientState(error=half, extra={"pending_values": torch.randn(3)}))
    loaded = store.load("a")
    assert loaded.error.dtype == torch.float16 and torch.equal(loaded.error, half)  # nothing to cast back
    assert loaded.extra["pending_values"].dtype == torch.float32
    store.save("b", ClientState(error=torch.arange(4)))
    assert torch.equal(store.load("b").error, torch.arange(4))


def test_a_float32_store_reads_a_float16_file_and_back(tmp_path):
    """The dtype is the writer's choice; any store reads any file (the header says what to cast back to)."""
    error = torch.randn(50)
    ClientStateStore(tmp_path, durable=False, error_dtype="bfloat16").save("c", ClientState(error=error))
    state_module._CACHE.clear()
    loaded = ClientStateStore(tmp_path, durable=False).load("c")
    assert torch.equal(loaded.error, error.bfloat16().float())


def test_unknown_dtypes_are_refused():
    with pytest.raises(ValueError, match="float32, float16, bfloat16"):
        ClientStateStore("/nonexistent/never-made", error_dtype="float8")
    assert ClientStateStore("/nonexistent/never-made", error_dtype=torch.bfloat16).error_dtype == "bfloat16"


def test_a_header_with_a_bad_cast_is_refused():
    raw = b"".join(bytes(c) for c in encode_state(ClientState(error=torch.zeros(2, dtype=torch.float16)),
                                                  casts={"error": "int64"}))
    with pytest.raises(ValueError, match="cannot cast"):
        decode_state(bytearray(raw))
    raw = b"".join(bytes(c) for c in encode_state(ClientState(error=torch.zeros(2)), casts={"model": "float32"}))
    with pytest.raises(ValueError, match="casts"):
        decode_state(bytearray(raw))
