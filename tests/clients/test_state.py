"""The client state file: exact round trips, and clear errors for torn or foreign files."""

from __future__ import annotations

import os
import struct

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fl_sparse.clients import state as state_module
from fl_sparse.clients.state import (
    ClientState,
    ClientStateStore,
    StateCorruptError,
    decode_state,
    encode_state,
)

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32, torch.uint8, torch.bool]


@st.composite
def tensors(draw, max_numel=64):
    dtype = draw(st.sampled_from(DTYPES))
    shape = draw(st.lists(st.integers(0, 5), min_size=0, max_size=3))
    numel = 1
    for n in shape:
        numel *= n
    if numel > max_numel:
        shape = [max_numel]
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    t = torch.randn(shape, generator=gen, dtype=torch.float64) * 100
    return t.to(dtype) if dtype != torch.bool else t > 0


@st.composite
def states(draw):
    return ClientState(
        model=draw(st.none() | tensors()),
        model_version=draw(st.integers(-1, 2**40)),
        error=draw(st.none() | tensors()),
        steps_done=draw(st.integers(0, 2**40)),
        extra=draw(st.dictionaries(st.text(min_size=1, max_size=8), tensors(), max_size=3)),
    )


def _file(state: ClientState) -> bytes:
    return b"".join(bytes(chunk) for chunk in encode_state(state))


def _same(a: ClientState, b: ClientState) -> bool:
    def eq(x, y):
        if x is None or y is None:
            return x is None and y is None
        return x.dtype == y.dtype and x.shape == y.shape and torch.equal(x.view(-1).view(torch.uint8), y.reshape(-1).contiguous().view(torch.uint8))

    return (
        eq(a.model, b.model)
        and eq(a.error, b.error)
        and a.model_version == b.model_version
        and a.steps_done == b.steps_done
        and a.extra.keys() == b.extra.keys()
        and all(eq(a.extra[k], b.extra[k]) for k in a.extra)
    )


@given(states())
@settings(max_examples=150, deadline=None)
def test_round_trip_is_bit_exact(state):
    decoded = decode_state(bytearray(_file(state)))
    assert _same(decoded, state)
    if decoded.model is not None and decoded.model.numel():  # writable and not sharing the buffer
        decoded.model.view(-1)[0] = decoded.model.view(-1)[0]


@given(states(), st.data())
@settings(max_examples=150, deadline=None)
def test_truncated_or_grown_files_are_rejected(state, data):
    raw = _file(state)
    cut = data.draw(st.integers(0, len(raw) - 1))
    with pytest.raises(ValueError):
        decode_state(raw[:cut])
    with pytest.raises(ValueError, match="data section"):
        decode_state(raw + b"\0" * data.draw(st.integers(1, 70)))


@given(states(), st.data())
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_flipped_bytes_give_value_error_or_a_valid_state(state, data):
    raw = bytearray(_file(state))
    for _ in range(data.draw(st.integers(1, 4))):
        pos = data.draw(st.integers(0, len(raw) - 1))
        raw[pos] ^= data.draw(st.integers(1, 255))
    try:
        decoded = decode_state(raw)
    except ValueError:
        return  # what the store turns into StateCorruptError
    assert isinstance(decoded, ClientState)  # a flip inside tensor bytes changes values only


def test_header_lengths_cannot_make_the_reader_allocate():
    header = b'{"model_version":1,"steps_done":0,"tensors":[["model","float32",[1000000000],0]],"data_bytes":4}'
    raw = state_module.MAGIC + struct.pack("<I", len(header)) + header + b"\0" * 4
    with pytest.raises(ValueError, match="runs past the data section"):
        decode_state(raw)
    huge = state_module.MAGIC + struct.pack("<I", 2**31) + b"{}"
    with pytest.raises(ValueError, match="header of 2147483648 bytes"):
        decode_state(huge)


def test_unsupported_entries_are_named():
    with pytest.raises(TypeError, match="'error'.*complex64"):
        encode_state(ClientState(error=torch.zeros(2, dtype=torch.complex64)))
    header = b'{"model_version":1,"steps_done":0,"tensors":[["momentum","float32",[1],0]],"data_bytes":4}'
    with pytest.raises(ValueError, match="unknown tensor entry 'momentum'"):
        decode_state(state_module.MAGIC + struct.pack("<I", len(header)) + header + b"\0" * 4)


def test_cache_never_serves_a_state_another_process_replaced(tmp_path):
    """Two stores on one folder stand for two Ray actors: each sees the other's saves."""
    a, b = ClientStateStore(tmp_path, durable=False), ClientStateStore(tmp_path, durable=False)
    a.save("c", ClientState(model=torch.zeros(4), model_version=1))
    assert b.load("c").model_version == 1
    # Another process writes the file: simulate it by writing behind the cache's back.
    other = ClientState(model=torch.ones(4), model_version=2)
    tmp = tmp_path / "elsewhere"
    tmp.write_bytes(_file(other))
    os.replace(tmp, a.path("c"))
    loaded = a.load("c")
    assert loaded.model_version == 2 and torch.equal(loaded.model, torch.ones(4))


def test_loads_are_copies(tmp_path):
    store = ClientStateStore(tmp_path, durable=False)
    store.save("c", ClientState(model=torch.zeros(4), model_version=1, error=torch.zeros(4)))
    first = store.load("c")
    first.model += 5  # a handler that changes its state and then fails
    first.error += 5
    again = store.load("c")
    assert torch.equal(again.model, torch.zeros(4)) and torch.equal(again.error, torch.zeros(4))


@pytest.mark.parametrize(
    "header",
    [
        b'{"model_version":1e400,"steps_done":0,"tensors":[],"data_bytes":0}',
        b'{"model_version":1,"steps_done":0,"tensors":7,"data_bytes":0}',
        b'{"model_version":1,"steps_done":0,"tensors":[["model","float32",[1e400],0]],"data_bytes":0}',
        b'{"model_version":1,"steps_done":0,"tensors":[[["model"],"float32",[1],0]],"data_bytes":4}',
        b'[1, 2]',
    ],
)
def test_malformed_headers_are_value_errors(header):
    with pytest.raises(ValueError):
        decode_state(state_module.MAGIC + struct.pack("<I", len(header)) + header + b"\0" * 4)
