"""Tests that kill mutmut survivors of the client state file format (fl_sparse/clients/state.py).

mutmut ran on ``encode_state``, ``_is_damaged_v3``, ``decode_state``, ``_decode``, ``ClientState``'s
payload methods, ``_ModelRef``, ``_narrow_array``, ``_widen`` and ``error_dtype_name`` with the state
tests (docs/testing.md, "The client state file"); these pin what those survivors showed untested:
the exact bound of the damaged-version-digit check, the model_ref refusals and their message, an
empty model in the model store, bfloat16's round-half-to-even and a NaN's bits, an error memory
cast back to a dtype other than float32, the canonical error dtype names, and the payload dicts.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import struct
import warnings

import numpy as np
import pytest
import torch
import xxhash

from fl_sparse.clients import state as state_module
from fl_sparse.clients.state import (
    ERROR_DTYPES,
    ClientState,
    ClientStateStore,
    StateFormatError,
    decode_state,
    encode_state,
    error_dtype_name,
)

MAGIC = state_module.MAGIC
NEWER = b"FLSPARSE-STATE-7\n"  # what one flipped bit makes of MAGIC's "3"


@pytest.fixture(autouse=True)
def _fresh_cache(monkeypatch):
    monkeypatch.setattr(state_module, "_CACHE", state_module._StateCache())


def _file(state: ClientState, **kwargs) -> bytes:
    return b"".join(bytes(chunk) for chunk in encode_state(state, **kwargs))


def _xxh(data: bytes) -> bytes:
    return struct.pack("<Q", xxhash.xxh3_64_intdigest(data))


def _raw(header: dict, data: bytes = b"") -> bytes:
    """A hand-built version 3 file with a valid checksum, data section unpadded."""
    text = json.dumps(header).encode()
    body = MAGIC + struct.pack("<I", len(text)) + text + data
    return body + _xxh(body)


def _bits32(t: torch.Tensor) -> list[int]:
    return [int(v) for v in t.contiguous().view(torch.int32).numpy().view(np.uint32)]


# ------------------------------------------------------------------ _is_damaged_v3: its length bound
def test_the_shortest_version_3_layout_with_a_flipped_digit_is_damaged_not_newer():
    """Magic, header length and checksum, nothing else (29 bytes): long enough to be checked."""
    body = MAGIC + struct.pack("<I", 0)
    damaged = NEWER + struct.pack("<I", 0) + _xxh(body)
    assert len(damaged) == len(MAGIC) + 4 + 8
    with pytest.raises(ValueError) as info:
        decode_state(damaged)
    assert str(info.value) == "bad magic: a version 3 file with a damaged version number"
    assert not isinstance(info.value, StateFormatError)


@pytest.mark.parametrize("tail", [b"", struct.pack("<I", 0), _xxh(MAGIC)])
def test_a_newer_file_shorter_than_any_version_3_file_is_newer(tail):
    """Shorter than magic + header length + checksum: not a version 3 file, whatever its last bytes
    (here, with ``_xxh(MAGIC)``, they even are the version 3 checksum of the magic alone)."""
    with pytest.raises(StateFormatError) as info:
        decode_state(NEWER + tail)
    assert str(info.value) == (
        "written by a newer fl-sparse (state format 7; this version reads formats 1 to 3): "
        "run the newer fl-sparse, or move the file away to start this client from an empty state"
    )


# ------------------------------------------------------------------ _ModelRef.from_json
HASH = "0123456789abcdef"


@pytest.mark.parametrize(
    "ref",
    [
        [HASH, "float32", [-1]],          # a negative dimension
        [HASH, "float64", [4]],           # the model store keeps float32 only
        ["not-a-hash", "float32", [4]],   # not a hex digest
        ["0123", "float32", [4]],         # too short for vector_hash
        [HASH, "complex64", [4]],         # no such dtype in the format
        [HASH, "float32"],                # not [hash, dtype, shape]
    ],
)
def test_a_bad_model_ref_is_refused_by_name(ref):
    header = {"model_version": 1, "steps_done": 0, "tensors": [], "data_bytes": 0, "model_ref": ref}
    with pytest.raises(ValueError, match=r"unreadable header: .*bad model_ref") as info:
        decode_state(_raw(header))
    assert repr(ref)[:10] in str(info.value)
    with pytest.raises(ValueError, match=r"^bad model_ref \["):
        state_module._ModelRef.from_json(ref)


def test_model_refs_of_empty_and_zero_sized_shapes_are_accepted():
    for shape in ([0], [3, 0], []):
        ref = state_module._ModelRef.from_json([HASH, "float32", shape])
        assert ref.shape == tuple(shape) and ref.dtype == torch.float32 and ref.hash == HASH
        assert ref.to_json() == [HASH, "float32", shape]


def test_an_empty_model_round_trips_through_the_model_store(tmp_path):
    store = ClientStateStore(tmp_path, durable=False, share_models=True)
    store.save("c", ClientState(model=torch.zeros(0), model_version=4, error=torch.ones(3), steps_done=1))
    state_module._CACHE.clear()
    loaded = ClientStateStore(tmp_path, durable=False, share_models=True).load("c")
    assert loaded.reset_reason is None and loaded.model_lost is None
    assert loaded.model is not None and loaded.model.shape == (0,) and loaded.model.dtype == torch.float32
    assert loaded.model_version == 4 and torch.equal(loaded.error, torch.ones(3))


# ------------------------------------------------------------------ error_dtype_name
@pytest.mark.parametrize("name", ["torch.float16", "torch.bfloat16", "torch.float32", "Float16", "half"])
def test_only_the_canonical_names_are_error_dtypes(name):
    """The wire and the node config carry the names of ERROR_DTYPES; a torch.dtype's str is not one."""
    with pytest.raises(ValueError, match=rf"float32, float16, bfloat16, got '{name}'"):
        error_dtype_name(name)


def test_error_dtype_names_and_dtypes_map_to_the_names():
    for name in ERROR_DTYPES:
        assert error_dtype_name(name) == name
        assert error_dtype_name(getattr(torch, name)) == name
    with pytest.raises(ValueError, match="got torch.float64"):
        error_dtype_name(torch.float64)


# ------------------------------------------------------------------ bfloat16 rounding (_narrow_array)
def _float32(*words: int) -> torch.Tensor:
    return torch.from_numpy(np.array(words, dtype=np.uint32).view(np.float32).copy())


# Every rounding case of the low 16 bits (below, at and above half) for an even and an odd top
# half, with bit 1 of the top set and clear, a carry into the exponent, negative values.
_TIES = _float32(
    0x3F808000, 0x3F818000, 0x3F828000, 0x3F838000,  # exact ties: even tops stay, odd tops round up
    0x3F807FFF, 0x3F817FFF, 0x3F808001, 0x3F818001,  # just below / above half
    0x3F80FFFF, 0x3FFF8000, 0x3FFFFFFF, 0x7F7F8000,  # carries into the exponent (the last: to inf)
    0xBF818000, 0xBF808000, 0x00008000, 0x00018000,  # negative ties; subnormal ties
)


@pytest.mark.parametrize("from_file", [False, True])
def test_bfloat16_memory_rounds_half_to_even_as_torch_does(tmp_path, from_file):
    store = ClientStateStore(tmp_path, durable=False, error_dtype="bfloat16")
    error = torch.cat([_TIES[:11], _TIES[12:]])  # not 0x7F7F8000: the store clamps what torch rounds to inf
    store.save("c", ClientState(error=error))
    if from_file:
        state_module._CACHE.clear()
    loaded = store.load("c").error
    assert _bits32(loaded) == _bits32(error.to(torch.bfloat16).to(torch.float32))


def test_narrow_array_matches_torch_bit_for_bit():
    got = state_module._narrow_array(_TIES.numpy(), torch.bfloat16)
    want = _TIES.to(torch.bfloat16)
    assert got.dtype == torch.bfloat16
    assert got.view(torch.int16).tolist() == want.view(torch.int16).tolist()


@pytest.mark.parametrize("from_file", [False, True])
def test_a_nan_in_a_bfloat16_memory_comes_back_as_the_same_nan(tmp_path, from_file):
    """NaN and the infinities are representable in bfloat16: they come back bit for bit."""
    error = torch.tensor([float("nan"), float("inf"), float("-inf"), -0.0, 1.5])
    assert _bits32(error)[0] == 0x7FC00000
    store = ClientStateStore(tmp_path, durable=False, error_dtype="bfloat16")
    store.save("c", ClientState(error=error))
    if from_file:
        state_module._CACHE.clear()
    assert _bits32(store.load("c").error) == _bits32(error)


def test_float16_overflow_is_inf_without_a_warning():
    """``_narrow_array`` gives inf beyond float16's range, as torch does, and says nothing (numpy would
    warn "overflow encountered in cast"); the store clamps before it and warns itself."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = state_module._narrow_array(np.array([1e6, -1e6, 2.0], dtype=np.float32), torch.float16)
    assert got.dtype == torch.float16 and got.tolist() == [float("inf"), float("-inf"), 2.0]


# ------------------------------------------------------------------ the error memory cast back (_widen)
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("from_file", [False, True])
def test_a_float64_memory_stored_narrow_comes_back_float64(tmp_path, dtype, from_file):
    """The memory is cast back to the dtype it had, not to float32 whatever it was."""
    error = torch.tensor([0.1, -2.5, 1e-3, 300.0], dtype=torch.float64)
    store = ClientStateStore(tmp_path, durable=False, error_dtype=dtype)
    store.save("c", ClientState(error=error))
    if from_file:
        state_module._CACHE.clear()
    loaded = store.load("c").error
    half = getattr(torch, dtype)
    assert loaded.dtype == torch.float64
    assert torch.equal(loaded, error.to(half).to(torch.float64))


def _error_file(error: torch.Tensor, cast: str) -> bytearray:
    return bytearray(_file(ClientState(error=error), casts={"error": cast}))


@pytest.mark.parametrize("stored", [torch.float16, torch.bfloat16])
def test_decode_casts_a_narrow_memory_to_float64_when_the_header_says_so(stored):
    error = torch.tensor([0.5, -3.0, 1024.0, 2.0**-10]).to(stored)
    got = decode_state(_error_file(error, "float64")).error
    assert got.dtype == torch.float64 and torch.equal(got, error.to(torch.float64))


@pytest.mark.parametrize("stored", [torch.float64, torch.float32])
def test_decode_casts_a_wide_memory_to_float32_when_the_header_says_so(stored):
    error = torch.tensor([0.1, -7.25, 3e5, 1e-30], dtype=torch.float64).to(stored)
    got = decode_state(_error_file(error, "float32")).error
    assert got.dtype == torch.float32 and got.shape == error.shape
    assert torch.equal(got, error.to(torch.float32))


def test_widen_always_returns_a_new_tensor():
    """Its callers rely on it: a load's memory is the caller's own, never the cache's."""
    for t, dtype in [
        (torch.ones(3, dtype=torch.float16), torch.float16),
        (torch.ones(3, dtype=torch.float16), torch.float32),
        (torch.ones(3, dtype=torch.bfloat16), torch.float32),
        (torch.ones(3), torch.float32),
        (torch.ones(3, dtype=torch.float64), torch.float64),
    ]:
        out = state_module._widen(t, dtype)
        assert out.dtype == dtype and torch.equal(out, t.to(dtype))
        out += 1
        assert torch.equal(t, torch.ones(3, dtype=t.dtype))


# ------------------------------------------------------------------ ClientState's payload dicts
def test_to_payload_names_every_field():
    state = ClientState(model=torch.ones(2), model_version=5, error=torch.zeros(2), steps_done=3,
                        extra={"v": torch.arange(2)})
    payload = state.to_payload()
    assert payload == {"model": state.model, "model_version": 5, "error": state.error, "steps_done": 3,
                       "extra": state.extra}
    assert payload["model"] is state.model and payload["error"] is state.error


def test_from_payload_reads_every_field_and_converts_the_counts():
    model, error, extra = torch.ones(2), torch.zeros(2), {"v": torch.arange(2)}
    state = ClientState.from_payload(
        {"model": model, "model_version": torch.tensor(5), "error": error, "steps_done": 3.0, "extra": extra}
    )
    assert state.model is model and state.error is error
    assert state.model_version == 5 and type(state.model_version) is int
    assert state.steps_done == 3 and type(state.steps_done) is int
    assert state.extra == extra and state.extra is not extra  # the state's own dict
    assert state.reset_reason is None and state.model_lost is None
    back = ClientState.from_payload(state.to_payload())
    assert back.model is model and back.error is error and back.model_version == 5 and back.steps_done == 3


@pytest.mark.parametrize("payload", [{}, {"extra": None}, {"model": None, "error": None, "extra": {}}])
def test_from_payload_defaults_are_an_empty_state(payload):
    state = ClientState.from_payload(payload)
    assert state.model is None and state.error is None
    assert state.model_version == -1 and state.steps_done == 0 and state.extra == {}


# ------------------------------------------------------------------ _decode: what a short or foreign file is told
@pytest.mark.parametrize("raw", [b"", b"PK\x03\x04 a zip archive, torch.save's", b"FLSPARSE-STATE-0\n" + bytes(40),
                                 b"FLSPARSE-STATE-3\r\n" + bytes(40), b"FLSPARSE-STATE-x\n" + bytes(40)])
def test_a_foreign_file_is_bad_magic(raw):
    with pytest.raises(ValueError) as info:
        decode_state(raw)
    assert str(info.value) == "not an fl-sparse client state file (bad magic)"
    assert not isinstance(info.value, StateFormatError)


@pytest.mark.parametrize("cut", [0, 1, 3])
def test_a_file_cut_inside_the_header_length_says_so(cut):
    with pytest.raises(ValueError) as info:
        decode_state(MAGIC + struct.pack("<I", 2)[:cut])
    assert str(info.value) == "truncated before the header length"


def test_a_file_that_ends_right_after_the_header_length_is_judged_by_its_header():
    with pytest.raises(ValueError, match=r"^unreadable header: JSONDecodeError"):
        decode_state(MAGIC + struct.pack("<I", 0))
    with pytest.raises(ValueError) as info:
        decode_state(MAGIC + struct.pack("<I", 5))
    assert str(info.value) == "header of 5 bytes runs past the end of the file"


@pytest.mark.parametrize("extra", [1, 2, 60])
def test_a_header_length_past_the_end_is_named_whatever_the_overshoot(extra):
    header = b'{"model_version":1,"steps_done":0,"tensors":[],"data_bytes":0}'
    raw = MAGIC + struct.pack("<I", len(header) + extra) + header
    with pytest.raises(ValueError) as info:
        decode_state(raw)
    assert str(info.value) == f"header of {len(header) + extra} bytes runs past the end of the file"


def test_a_version_1_file_of_a_state_without_tensors_ends_at_its_header_and_is_read():
    """Version 1 has no trailer: a state without tensors is magic, length and header, nothing after."""
    v3 = _file(ClientState(model_version=7, steps_done=2))
    v1 = state_module.MAGIC_V1 + v3[len(MAGIC) : -8]
    (n,) = struct.unpack_from("<I", v1, len(MAGIC))
    assert len(v1) == len(MAGIC) + 4 + n
    got = decode_state(v1)
    assert (got.model, got.error, got.extra, got.model_version, got.steps_done) == (None, None, {}, 7, 2)


@pytest.mark.parametrize("tensors", [7, {"model": 1}, "model"])
def test_a_tensors_field_that_is_not_a_list_is_named(tensors):
    header = {"model_version": 1, "steps_done": 0, "tensors": tensors, "data_bytes": 0}
    with pytest.raises(ValueError) as info:
        decode_state(_raw(header))
    assert str(info.value) == "unreadable header: TypeError(\"'tensors' is not a list\")"


@pytest.mark.parametrize("change", [-3, -1, 1, 5])
def test_a_data_section_of_another_length_gives_both_lengths(change):
    header = {"model_version": 1, "steps_done": 0, "tensors": [["error", "float32", [2], 0]], "data_bytes": 8}
    raw = _raw(header, bytes(8 + change))
    with pytest.raises(ValueError) as info:
        decode_state(raw)
    assert str(info.value) == f"data section is {8 + change} bytes, the header says 8 (truncated or grown file)"


def test_a_version_2_checksum_mismatch_gives_both_crcs():
    import zlib

    v3 = _file(ClientState(error=torch.arange(4.0)))
    body = bytearray(state_module.MAGIC_V2 + v3[len(MAGIC) : -8])
    stored = zlib.crc32(body)
    body[-1] ^= 0x01  # a bit of the error memory
    actual = zlib.crc32(body)
    with pytest.raises(ValueError) as info:
        decode_state(bytes(body) + struct.pack("<I", stored))
    assert str(info.value) == f"checksum mismatch (CRC-32 {actual:08x}, the file says {stored:08x})"


@pytest.mark.parametrize("entry", [["error", "float32", [1]], ["error", "float32", [1], 0, 9], ["error", "float80", [1], 0],
                                   ["error", "float32", [None], 0], ["error", "float32", [1], "zero"]])
def test_a_bad_tensor_entry_is_quoted(entry):
    header = {"model_version": 1, "steps_done": 0, "tensors": [entry], "data_bytes": 4}
    with pytest.raises(ValueError) as info:
        decode_state(_raw(header, bytes(4)))
    assert str(info.value) == f"bad tensor entry {entry!r}"


@pytest.mark.parametrize("shape, offset", [([1], -4), ([2], -8), ([-1], 0), ([-1, -1], 0), ([-2], 4)])
def test_a_negative_shape_or_offset_is_refused_by_name(shape, offset):
    """A negative offset alone would read the header's last bytes as the tensor."""
    header = {"model_version": 1, "steps_done": 0, "tensors": [["error", "float32", shape, offset]], "data_bytes": 8}
    with pytest.raises(ValueError) as info:
        decode_state(_raw(header, bytes(8)))
    assert str(info.value) == "tensor 'error': negative shape or offset"


def _at(raw: bytes, misalign: int) -> np.ndarray:
    """``raw`` in a writable uint8 array whose first byte is ``misalign`` bytes past a 64-byte boundary."""
    store = np.zeros(len(raw) + 128, dtype=np.uint8)
    start = (-store.ctypes.data) % 64 + misalign
    buf = store[start : start + len(raw)]
    buf[:] = np.frombuffer(raw, dtype=np.uint8)
    assert buf.ctypes.data % 64 == misalign
    return buf


def test_a_writable_aligned_buffer_is_decoded_in_place():
    """decode_state's promise: a writable buffer's tensors are views of it (the caller hands it over)."""
    error, model = torch.arange(16.0), torch.arange(8, dtype=torch.float64)
    buf = _at(_file(ClientState(model=model, error=error)), 0)
    got = decode_state(buf)
    assert torch.equal(got.error, error) and torch.equal(got.model, model)
    lo, hi = buf.ctypes.data, buf.ctypes.data + len(buf)
    for t in (got.error, got.model):
        assert lo <= t.data_ptr() < hi
    got.error[0] = 42.0
    at = got.error.data_ptr() - buf.ctypes.data
    assert buf[at : at + 4].view(np.float32)[0] == 42.0  # the buffer's own bytes


@pytest.mark.parametrize("misalign", [1, 8, 32])
def test_a_misaligned_buffer_is_copied_to_aligned_memory(misalign):
    error = torch.arange(16.0)
    buf = _at(_file(ClientState(error=error)), misalign)
    got = decode_state(buf)
    assert torch.equal(got.error, error)
    assert got.error.data_ptr() % 64 == 0
    assert not (buf.ctypes.data <= got.error.data_ptr() < buf.ctypes.data + len(buf))


def test_a_model_tensor_beside_a_model_ref_is_refused_by_name():
    header = {"model_version": 1, "steps_done": 0, "tensors": [["model", "float32", [1], 0]], "data_bytes": 4,
              "model_ref": [HASH, "float32", [1]]}
    with pytest.raises(ValueError) as info:
        decode_state(_raw(header, bytes(4)))
    assert str(info.value) == "a model tensor beside a model_ref"


# ------------------------------------------------------------------ encode_state
def test_encode_refuses_a_model_beside_a_model_ref_by_name():
    ref = state_module._ModelRef(HASH, torch.float32, (2,))
    with pytest.raises(ValueError) as info:
        encode_state(ClientState(model=torch.zeros(2)), model_ref=ref)
    assert str(info.value) == "a state with a model_ref stores no model tensor"


def test_every_tensor_starts_on_a_64_byte_boundary_and_is_used_in_place():
    """The header is padded so the data section starts aligned, and each tensor after an odd-sized one
    is padded to the next boundary: from an aligned buffer, no tensor needs a copy."""
    state = ClientState(model=torch.arange(3.0), model_version=2, error=torch.arange(5.0, dtype=torch.float64),
                        extra={"a": torch.arange(7, dtype=torch.uint8), "b": torch.ones(3, dtype=torch.bool),
                               "c": torch.arange(3).to(torch.bfloat16)})
    raw = _file(state)
    (n,) = struct.unpack_from("<I", raw, len(MAGIC))
    assert (len(MAGIC) + 4 + n) % 64 == 0
    header = json.loads(raw[len(MAGIC) + 4 : len(MAGIC) + 4 + n])
    offsets = [entry[3] for entry in header["tensors"]]
    assert offsets == [0, 64, 128, 192, 256]
    assert header["data_bytes"] == 256 + 3 * 2
    buf = _at(raw, 0)
    got = decode_state(buf)
    for t in (got.model, got.error, *got.extra.values()):
        assert buf.ctypes.data <= t.data_ptr() < buf.ctypes.data + len(buf)  # not copied
    assert torch.equal(got.model, state.model) and torch.equal(got.error, state.error)
    assert all(torch.equal(got.extra[k], v) for k, v in state.extra.items())


def test_a_small_state_is_encoded_byte_for_byte():
    """The file format, pinned: magic, the header's length (uint32 LE), the compact JSON header padded
    with spaces to a 64-byte boundary, the tensors, the XXH3-64 of it all (uint64 LE)."""
    header = b'{"model_version":3,"steps_done":1,"tensors":[["error","float32",[2],0]],"data_bytes":8}'
    assert len(header) == 87
    header += b" " * 20  # 17 + 4 + 107 = 128
    body = b"FLSPARSE-STATE-3\n" + struct.pack("<I", 107) + header + struct.pack("<2f", 1.0, 2.0)
    expected = body + struct.pack("<Q", xxhash.xxh3_64_intdigest(body))
    assert _file(ClientState(error=torch.tensor([1.0, 2.0]), model_version=3, steps_done=1)) == expected


def test_the_optional_header_keys_come_last_in_the_compact_form():
    ref = state_module._ModelRef(HASH, torch.float32, (2,))
    raw = _file(ClientState(), model_ref=ref, casts={"error": "float32"})
    header = (b'{"model_version":-1,"steps_done":0,"tensors":[],"data_bytes":0,'
              b'"model_ref":["0123456789abcdef","float32",[2]],"casts":{"error":"float32"}}')
    assert len(header) == 138
    assert raw[len(MAGIC) :] == struct.pack("<I", 138 + 33) + header + b" " * 33 + raw[-8:]


# ------------------------------------------------------------------ ClientStateStore.load and _model_lost
def _flwr_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and r.name.startswith("flwr")]


def _shared_state(seed: int = 0) -> ClientState:
    gen = torch.Generator().manual_seed(seed)
    return ClientState(model=torch.randn(40, generator=gen), model_version=3, error=torch.randn(40, generator=gen),
                       steps_done=5)


def test_a_corrupt_version_is_unnamed_at_once_while_other_clients_still_link_it(tmp_path):
    """The first load that finds a version corrupt removes its canonical name, so no client links the bad
    bytes again, even while others still hold them (GC alone would wait for the last holder)."""
    store = ClientStateStore(tmp_path, durable=False, share_models=True)
    for key in ("a", "b"):
        store.save(key, _shared_state())
    digest = state_module.model_hash(_shared_state().model)
    canonical = store.canonical_model_path(digest)
    raw = bytearray(canonical.read_bytes())
    raw[10] ^= 0x01
    with open(canonical, "r+b") as fh:  # in place: the clients' links see it too
        fh.write(raw)
    state_module._CACHE.clear()
    loaded = store.load("a")
    assert loaded.model_lost is not None and "corrupt" in loaded.model_lost
    assert not canonical.exists()
    assert store.model_path("b", digest).exists()  # b's own link: b finds out on its own load


def test_a_lost_model_copy_is_logged_in_full(tmp_path, caplog):
    store = ClientStateStore(tmp_path, durable=False, share_models=True)
    store.save("a", _shared_state())
    digest = state_module.model_hash(_shared_state().model)
    store.model_path("a", digest).unlink()
    store.canonical_model_path(digest).unlink()
    state_module._CACHE.clear()
    with caplog.at_level(logging.WARNING, logger="flwr"):
        loaded = store.load("a")
    reason = f"its model copy models/a.{digest}.model is missing"
    assert loaded.model_lost == f"a.state: {reason}"
    assert _flwr_warnings(caplog) == [
        f"client state {store.path('a')}: lost its model copy ({reason}); the client keeps its error memory "
        "and the rest of its state, and needs a dense sync"
    ]


def test_an_io_error_reading_the_model_copy_loses_the_model_and_says_so(tmp_path, monkeypatch):
    store = ClientStateStore(tmp_path, durable=False, share_models=True)
    saved = _shared_state()
    store.save("a", saved)
    state_module._CACHE.clear()

    def broken(path, ref):
        raise OSError(errno.EIO, "Input/output error", str(path))

    monkeypatch.setattr(ClientStateStore, "_read_model", staticmethod(broken))
    loaded = store.load("a")
    assert loaded.model is None and loaded.model_version == -1
    assert loaded.model_lost is not None and loaded.model_lost.startswith("a.state: cannot read its model copy: ")
    assert "Input/output error" in loaded.model_lost
    assert torch.equal(loaded.error, saved.error) and loaded.steps_done == 5
    with pytest.raises(state_module.StateCorruptError, match="cannot read its model copy"):
        store.load("a", reset_corrupt=False)


def test_a_short_read_is_the_reason_given(tmp_path, monkeypatch):
    store = ClientStateStore(tmp_path, durable=False)
    store.save("a", ClientState(error=torch.ones(4)))
    size = store.path("a").stat().st_size
    state_module._CACHE.clear()
    monkeypatch.setattr(state_module, "_read_all", lambda fh, buf: len(buf) - 3)
    loaded = store.load("a")
    assert loaded.reset_reason == f"a.state: short read ({size - 3} of {size} bytes)"


def test_a_file_that_does_not_decode_is_read_exactly_twice(tmp_path, monkeypatch):
    """Once more in case the read overlapped two saves by other processes; not a third time."""
    store = ClientStateStore(tmp_path, durable=False)
    store.root.mkdir(exist_ok=True)
    store.path("a").write_bytes(b"not a state file at all")
    reads = []
    real = state_module._read_all
    monkeypatch.setattr(state_module, "_read_all", lambda fh, buf: reads.append(fh.name) or real(fh, buf))
    loaded = store.load("a")
    assert loaded.reset_reason is not None and "bad magic" in loaded.reset_reason
    assert reads == [str(store.path("a"))] * 2


def test_a_load_from_the_file_warns_about_nothing(tmp_path):
    store = ClientStateStore(tmp_path, durable=False)
    store.save("a", ClientState(error=torch.ones(4), model_version=2))
    state_module._CACHE.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loaded = store.load("a")
    assert torch.equal(loaded.error, torch.ones(4)) and loaded.model_version == 2


def test_a_state_file_removed_by_another_process_leaves_nothing_in_the_cache(tmp_path):
    store = ClientStateStore(tmp_path, durable=False)
    store.save("a", ClientState(error=torch.ones(1000)))
    assert state_module._CACHE.peek(store.path("a")) is not None
    os.unlink(store.path("a"))
    loaded = store.load("a")
    assert loaded.error is None and loaded.reset_reason is None
    assert state_module._CACHE.peek(store.path("a")) is None  # its memory is freed


def test_a_cached_state_whose_model_copy_is_lost_leaves_the_cache(tmp_path):
    store = ClientStateStore(tmp_path, durable=False, share_models=True)
    store.save("a", _shared_state())
    digest = state_module.model_hash(_shared_state().model)
    store.model_path("a", digest).unlink()
    store.canonical_model_path(digest).unlink()
    state_module._CACHE.drop((store._models_key, digest))
    assert state_module._CACHE.peek(store.path("a")) is not None
    assert store.load("a").model_lost is not None
    assert state_module._CACHE.peek(store.path("a")) is None


# ------------------------------------------------------------------ _StateCache's byte count
def test_the_state_cache_holds_exactly_its_limit(monkeypatch):
    monkeypatch.setenv("FL_SPARSE_STATE_CACHE_MB", str(2.0**-10))  # 1024 bytes
    cache = state_module._StateCache()
    assert cache.limit() == 1024
    for _ in range(2):
        cache.put("a", None, "A", 512)
        cache.put("b", None, "B", 512)
        assert cache.get("a", None) == "A" and cache.get("b", None) == "B"  # 1024 bytes: both kept
        cache.put("c", None, "C", 1)
        assert cache.get("a", None) is None and cache.get("c", None) == "C"  # 1025: the oldest goes
        cache.clear()
        assert cache.get("b", None) is None and cache.get("c", None) is None
    cache.put("whole", None, "W", 1024)
    assert cache.get("whole", None) == "W"


def test_a_corrupt_file_replaced_after_its_last_read_is_not_moved_aside(tmp_path, monkeypatch, caplog):
    """Another process saved the client between this load's reads and its judgement: the new file is
    not the one found corrupt, and stays where it is."""
    store = ClientStateStore(tmp_path, durable=False)
    store.save("a", ClientState(error=torch.full((4,), 2.0), model_version=8))
    good = store.path("a").read_bytes()
    state_module._CACHE.clear()
    store.path("a").write_bytes(b"torn")  # in place: the old inode, now corrupt
    real, calls = state_module._decode, []

    def decode_then_replace(buf):
        calls.append(1)
        try:
            return real(buf)
        finally:
            if len(calls) == 2:  # after the second read: another process's save lands
                tmp = tmp_path / "other.tmp"
                tmp.write_bytes(good)
                os.replace(tmp, store.path("a"))

    monkeypatch.setattr(state_module, "_decode", decode_then_replace)
    with caplog.at_level(logging.WARNING, logger="flwr"):
        loaded = store.load("a")
    assert loaded.reset_reason is not None and "bad magic" in loaded.reset_reason
    assert store.path("a").read_bytes() == good and store.corrupt_files("a") == []
    assert any("since replaced" in m for m in _flwr_warnings(caplog))
    monkeypatch.setattr(state_module, "_decode", real)
    again = store.load("a")
    assert again.model_version == 8 and torch.equal(again.error, torch.full((4,), 2.0))


def test_a_state_saved_again_replaces_its_cache_entry_and_its_bytes(monkeypatch):
    monkeypatch.setenv("FL_SPARSE_STATE_CACHE_MB", str(2.0**-10))  # 1024 bytes
    cache = state_module._StateCache()
    cache.put("a", None, "A1", 512)
    cache.put("b", None, "B", 512)
    cache.put("a", None, "A2", 512)  # the client saved again: 1024 bytes still, "a" now the newest
    assert cache.get("b", None) == "B" and cache.get("a", None) == "A2"
    cache.put("a", None, "A3", 512)
    cache.put("c", None, "C", 512)  # the least recently used ("b") goes, not the re-saved "a"
    assert cache.get("b", None) is None and cache.get("a", None) == "A3" and cache.get("c", None) == "C"


def test_a_dropped_entry_gives_back_exactly_its_bytes(monkeypatch):
    monkeypatch.setenv("FL_SPARSE_STATE_CACHE_MB", str(2.0**-10))  # 1024 bytes
    cache = state_module._StateCache()
    for key, size in (("a", 100), ("b", 200), ("c", 300)):
        cache.put(key, None, key.upper(), size)
    cache.drop("b")  # 400 bytes left
    cache.put("d", None, "D", 624)  # 1024: all kept
    assert [cache.peek(k) for k in "acd"] == ["A", "C", "D"]
    cache.put("e", None, "E", 1)  # 1025: the oldest ("a") goes
    assert cache.peek("a") is None and [cache.peek(k) for k in "cde"] == ["C", "D", "E"]


# ------------------------------------------------------------------ ClientStateStore.save
def test_a_state_of_exactly_the_spare_limit_gets_a_spare(tmp_path, monkeypatch):
    store = ClientStateStore(tmp_path, durable=False)
    state = ClientState(error=torch.ones(1000))
    store.save("a", state)
    size = store.path("a").stat().st_size
    spare = tmp_path / ("a.state" + state_module.SPARE_SUFFIX)
    store.delete("a")
    monkeypatch.setattr(state_module, "SPARE_MAX_BYTES", size)
    store.save("a", state)
    store.save("a", state)
    assert spare.exists()
    monkeypatch.setattr(state_module, "SPARE_MAX_BYTES", size - 1)
    store.delete("a")
    store.save("a", state)
    store.save("a", state)
    assert not spare.exists()
