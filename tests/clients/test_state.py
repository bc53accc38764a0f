"""The client state file: exact round trips, and clear errors for torn or foreign files."""

from __future__ import annotations

import errno
import logging
import os
import signal
import struct
import subprocess
import sys
import time
import zlib

import pytest
import torch
import xxhash
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


def _raw(header: bytes, data: bytes = b"\0" * 4) -> bytes:
    """A hand-built version 3 file with a valid checksum: the header checks run past the checksum."""
    body = state_module.MAGIC + struct.pack("<I", len(header)) + header + data
    return body + struct.pack("<Q", xxhash.xxh3_64_intdigest(body))


def _as_version_2(v3: bytes) -> bytes:
    """The same state as the version 2 format wrote it: v2 magic, CRC-32 trailer."""
    body = state_module.MAGIC_V2 + v3[len(state_module.MAGIC) : -8]
    return body + struct.pack("<I", zlib.crc32(body))


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
def test_flipped_bytes_are_always_rejected(state, data):
    raw = bytearray(_file(state))
    for _ in range(data.draw(st.integers(1, 4))):
        pos = data.draw(st.integers(0, len(raw) - 1))
        raw[pos] ^= data.draw(st.integers(1, 255))
    if bytes(raw) == _file(state):  # two flips of one byte undid each other
        return
    # The XXH3-64 trailer: no changed byte, tensor bytes included, goes unnoticed.
    with pytest.raises(ValueError):
        decode_state(raw)


def test_header_lengths_cannot_make_the_reader_allocate():
    header = b'{"model_version":1,"steps_done":0,"tensors":[["model","float32",[1000000000],0]],"data_bytes":4}'
    with pytest.raises(ValueError, match="runs past the data section"):
        decode_state(_raw(header))
    huge = state_module.MAGIC + struct.pack("<I", 2**31) + b"{}"
    with pytest.raises(ValueError, match="header of 2147483648 bytes"):
        decode_state(huge)


def test_unsupported_entries_are_named():
    with pytest.raises(TypeError, match="'error'.*complex64"):
        encode_state(ClientState(error=torch.zeros(2, dtype=torch.complex64)))
    header = b'{"model_version":1,"steps_done":0,"tensors":[["momentum","float32",[1],0]],"data_bytes":4}'
    with pytest.raises(ValueError, match="unknown tensor entry 'momentum'"):
        decode_state(_raw(header))


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
        decode_state(_raw(header))


# ====================================================================== a corrupt file in the store
def _saved(tmp_path, state: ClientState, key: str = "client-1") -> tuple[ClientStateStore, bytes]:
    store = ClientStateStore(tmp_path, durable=False)
    store.save(key, state)
    return store, store.path(key).read_bytes()


def _replace_file(store: ClientStateStore, key: str, raw: bytes) -> None:
    """What another process (or the disk) leaves there; this process's cache must not hide it."""
    state_module._CACHE.drop(store.path(key))
    store.path(key).write_bytes(raw)


def _assert_reset(store: ClientStateStore, key: str, loaded: ClientState, corrupt_bytes: bytes) -> None:
    assert loaded.reset_reason is not None and store.path(key).name in loaded.reset_reason
    assert loaded.model is None and loaded.error is None and loaded.extra == {}
    assert loaded.model_version == -1 and loaded.steps_done == 0
    assert not store.path(key).exists()  # moved aside: the next load starts clean
    aside = store.corrupt_files(key)
    assert aside and aside[-1].read_bytes() == corrupt_bytes  # kept, byte for byte
    assert aside[-1].parent == store.path(key).parent
    assert aside[-1].name.startswith(store.path(key).name + ".corrupt-")
    again = store.load(key)
    assert again.reset_reason is None and again.model is None


@given(states(), st.data())
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_single_bit_flips_never_load_wrong_data(tmp_path_factory, state, data):
    store, raw = _saved(tmp_path_factory.mktemp("s"), state)
    bit = data.draw(st.integers(0, 8 * len(raw) - 1), label="bit")
    flipped = bytearray(raw)
    flipped[bit // 8] ^= 1 << (bit % 8)
    _replace_file(store, "client-1", bytes(flipped))
    loaded = store.load("client-1")
    if loaded.reset_reason is None:  # the only other allowed outcome: exactly what was saved
        assert _same(loaded, state)
    else:
        _assert_reset(store, "client-1", loaded, bytes(flipped))
    assert loaded.reset_reason is not None  # CRC-32 catches every single-bit error


@given(states(), st.data())
@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_truncated_files_are_moved_aside_and_reset(tmp_path_factory, state, data):
    store, raw = _saved(tmp_path_factory.mktemp("s"), state)
    cut = data.draw(st.integers(0, len(raw) - 1), label="cut")
    _replace_file(store, "client-1", raw[:cut])
    _assert_reset(store, "client-1", store.load("client-1"), raw[:cut])


@given(st.binary(min_size=0, max_size=300) | st.builds(lambda b: state_module.MAGIC + b, st.binary(max_size=200)))
@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_garbage_is_moved_aside_and_reset(tmp_path_factory, garbage):
    store, _ = _saved(tmp_path_factory.mktemp("s"), ClientState(model=torch.ones(3), model_version=4))
    _replace_file(store, "client-1", garbage)
    _assert_reset(store, "client-1", store.load("client-1"), garbage)


def test_an_intact_file_loads_exactly_after_a_reset_elsewhere(tmp_path):
    """Resetting one client's state touches no other client's file."""
    store = ClientStateStore(tmp_path, durable=False)
    a = ClientState(model=torch.arange(5.0), model_version=3, error=torch.full((5,), 0.5), steps_done=2)
    store.save("client-0", a)
    store.save("client-1", ClientState(model=torch.ones(5), model_version=3))
    _replace_file(store, "client-1", b"nonsense")
    assert store.load("client-1").reset_reason is not None
    state_module._CACHE.drop(store.path("client-0"))
    assert _same(store.load("client-0"), a)
    assert store.corrupt_files("client-0") == []


def test_reset_is_logged_at_warning_naming_file_and_reason(tmp_path, caplog):
    store, raw = _saved(tmp_path, ClientState(model=torch.ones(8), model_version=2, error=torch.zeros(8)))
    _replace_file(store, "client-1", raw[:-10])
    with caplog.at_level(logging.WARNING, logger="flwr"):
        store.load("client-1")
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and r.name.startswith("flwr")]
    assert len(warnings) == 1
    text = warnings[0].getMessage()
    assert str(store.path("client-1")) in text and "data section" in text
    assert store.corrupt_files("client-1")[0].name in text


def test_checksum_mismatch_is_the_reason_given(tmp_path):
    store, raw = _saved(tmp_path, ClientState(model=torch.ones(8), model_version=2, error=torch.zeros(8)))
    flipped = bytearray(raw)
    flipped[-5] ^= 0x40  # the last byte of the error memory (the 4 after it are the CRC)
    _replace_file(store, "client-1", bytes(flipped))
    assert "checksum mismatch" in store.load("client-1").reset_reason


def test_strict_load_raises_and_leaves_the_file(tmp_path):
    store, raw = _saved(tmp_path, ClientState(model=torch.ones(8), model_version=2))
    _replace_file(store, "client-1", raw[:-1])
    with pytest.raises(StateCorruptError, match="client-1.state"):
        store.load("client-1", reset_corrupt=False)
    assert store.path("client-1").read_bytes() == raw[:-1] and store.corrupt_files("client-1") == []


def test_unreadable_file_is_reset_but_a_transient_error_is_not(tmp_path, monkeypatch):
    store, raw = _saved(tmp_path, ClientState(model=torch.ones(8), model_version=2))
    state_module._CACHE.drop(store.path("client-1"))
    real_open = open

    def failing_open(code):
        def fake(path, *args, **kwargs):
            if str(path) == str(store.path("client-1")):
                raise OSError(code, os.strerror(code), str(path))
            return real_open(path, *args, **kwargs)

        return fake

    monkeypatch.setattr(state_module, "open", failing_open(errno.EMFILE), raising=False)
    with pytest.raises(OSError):  # this process is out of file handles: says nothing about the file
        store.load("client-1")
    assert store.path("client-1").read_bytes() == raw
    monkeypatch.setattr(state_module, "open", failing_open(errno.EIO), raising=False)
    loaded = store.load("client-1")
    assert loaded.reset_reason is not None and "cannot read" in loaded.reset_reason
    monkeypatch.undo()
    assert store.corrupt_files("client-1")[0].read_bytes() == raw


def test_at_most_keep_corrupt_files_per_client_newest_kept(tmp_path, monkeypatch):
    store = ClientStateStore(tmp_path, durable=False)
    store.save("client-10", ClientState(model=torch.ones(2)))  # "client-1" is a prefix of it: untouched
    _replace_file(store, "client-10", b"other client's garbage")
    assert store.load("client-10").reset_reason is not None
    clock = iter(range(1_700_000_000, 1_700_000_100, 7))
    monkeypatch.setattr(state_module.time, "time", lambda: next(clock))
    n = state_module.KEEP_CORRUPT + 3
    for i in range(n):
        _replace_file(store, "client-1", f"garbage {i}".encode())
        assert store.load("client-1").reset_reason is not None
    kept = store.corrupt_files("client-1")
    assert [p.read_bytes() for p in kept] == [f"garbage {i}".encode() for i in range(n - state_module.KEEP_CORRUPT, n)]
    assert [p.read_bytes() for p in store.corrupt_files("client-10")] == [b"other client's garbage"]


def test_two_resets_in_one_second_keep_both_files(tmp_path, monkeypatch):
    store = ClientStateStore(tmp_path, durable=False)
    monkeypatch.setattr(state_module.time, "time", lambda: 1_700_000_000.5)
    for i in range(2):
        _replace_file(store, "client-1", f"bad {i}".encode())
        store.load("client-1")
    assert [p.read_bytes() for p in store.corrupt_files("client-1")] == [b"bad 0", b"bad 1"]


def test_version_1_files_are_still_read(tmp_path):
    """The format before the checksum: same layout, v1 magic, no trailer."""
    state = ClientState(model=torch.arange(6.0), model_version=9, error=torch.ones(6), steps_done=4,
                        extra={"layout": torch.tensor([1, 2, 3], dtype=torch.uint8)})
    v3 = _file(state)
    v1 = state_module.MAGIC_V1 + v3[len(state_module.MAGIC) : -8]
    assert _same(decode_state(v1), state)
    store = ClientStateStore(tmp_path, durable=False)
    store.root.mkdir(exist_ok=True)
    store.path("client-1").write_bytes(v1)
    assert _same(store.load("client-1"), state)
    store.save("client-1", store.load("client-1"))  # the next save writes version 3
    assert store.path("client-1").read_bytes() == v3
    with pytest.raises(ValueError, match="data section"):  # a checksummed file is never read as v1
        decode_state(state_module.MAGIC_V1 + v3[len(state_module.MAGIC) :])


@given(states(), st.data())
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_version_2_files_are_read_and_verified(state, data):
    """The CRC-32 format before XXH3: read, checked against its CRC, rewritten as version 3."""
    v2 = _as_version_2(_file(state))
    assert _same(decode_state(v2), state)
    flipped = bytearray(v2)
    pos = data.draw(st.integers(len(state_module.MAGIC), len(v2) - 1))  # past the magic: still a v2 file
    flipped[pos] ^= data.draw(st.integers(1, 255))
    with pytest.raises(ValueError):
        decode_state(flipped)
    with pytest.raises(ValueError):  # a v3 file is never read with a v2 trailer, nor the reverse
        decode_state(state_module.MAGIC + v2[len(state_module.MAGIC_V2) :])


def test_a_version_2_file_is_rewritten_as_version_3(tmp_path):
    state = ClientState(model=torch.arange(6.0), model_version=9, error=torch.ones(6), steps_done=4)
    store = ClientStateStore(tmp_path, durable=False)
    store.root.mkdir(exist_ok=True)
    store.path("client-1").write_bytes(_as_version_2(_file(state)))
    loaded = store.load("client-1")
    assert _same(loaded, state)
    store.save("client-1", loaded)
    assert store.path("client-1").read_bytes() == _file(state)


# ====================================================================== temporary files
def _age(path, seconds: float) -> None:
    t = time.time() - seconds
    os.utime(path, (t, t))


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _reopen(root, durable=False) -> ClientStateStore:
    """A new process opening the folder: it has not swept it yet."""
    state_module._swept.pop(str(root), None)
    return ClientStateStore(root, durable=durable)


def test_stale_temp_files_are_removed_when_a_store_opens_the_folder(tmp_path):
    store = ClientStateStore(tmp_path, durable=False)
    store.save("client-1", ClientState(model=torch.ones(4), model_version=1))
    good = store.path("client-1").read_bytes()
    host, me, dead = state_module._HOST, os.getpid(), _dead_pid()
    files = {
        # older versions' names (no host, no pid): the age rule alone
        "client-1.statek2j4x_9a.tmp": (120, "removed"),
        "client-2.stateabcdefgh.tmp": (5, "kept"),
        # this host, a process that no longer runs: at once
        f"client-1.state.{host}.{dead}.q1w2e3r4.tmp": (0, "removed"),
        # this host, a live writer (this process: another thread's save)
        f"client-3.state.{host}.{me}.zzzzzzzz.tmp": (0, "kept"),
        f"client-3.state.{host}.{me}.yyyyyyyy.tmp": (3600, "removed"),  # unless it stopped writing long ago
        # another host sharing the folder: its pids mean nothing here
        f"client-4.state.otherhost.{dead}.aaaaaaaa.tmp": (10, "kept"),
        f"client-4.state.otherhost.{dead}.bbbbbbbb.tmp": (61, "removed"),
        # not ours
        "notes.tmp": (3600, "kept"),
        "client-1.state.corrupt-1700000000": (3600, "kept"),
        "client-9.state": (3600, "kept"),
    }
    for name, (age, _) in files.items():
        (tmp_path / name).write_bytes(b"x" * 100)
        _age(tmp_path / name, age)
    _reopen(tmp_path)
    left = {p.name for p in tmp_path.iterdir()}
    assert left == {"client-1.state"} | {n for n, (_, fate) in files.items() if fate == "kept"}
    assert store.path("client-1").read_bytes() == good


def test_a_folder_is_swept_once_per_interval_per_process(tmp_path):
    _reopen(tmp_path)
    stale = tmp_path / "client-1.stateabcdefgh.tmp"
    stale.write_bytes(b"x")
    _age(stale, 120)
    ClientStateStore(tmp_path, durable=False)  # same process, just swept: no listing per message
    assert stale.exists()
    assert ClientStateStore(tmp_path, durable=False).remove_stale_temp_files() == [stale]
    assert not stale.exists()


_KILLED_SAVER = """
import os, sys, time, torch
from fl_sparse.clients import state as s
os.replace = lambda *a, **k: (print("written", flush=True), time.sleep(600))
s.ClientStateStore(sys.argv[1], durable=True).save("client-1", s.ClientState(model=torch.zeros(1000), model_version=99))
"""


def test_a_save_killed_before_its_rename_leaves_the_old_state_and_no_temp_file(tmp_path):
    store = ClientStateStore(tmp_path, durable=False)
    state = ClientState(model=torch.ones(1000), model_version=98, error=torch.ones(1000))
    store.save("client-1", state)
    for _ in range(2):
        proc = subprocess.Popen([sys.executable, "-c", _KILLED_SAVER, str(tmp_path)], stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "written"  # the temporary file is complete, the rename hangs
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        # Each killed saver's store removed its dead predecessor's files when it opened the folder
        # (the new state, and the name it gave the file it was replacing, the next spare).
        left = list(tmp_path.glob("*.tmp"))
        assert left and {p.name.split(".")[-3] for p in left} == {str(proc.pid)}, left
    reopened = _reopen(tmp_path)  # the next process on this folder
    assert list(tmp_path.glob("*.tmp")) == []
    state_module._CACHE.drop(reopened.path("client-1"))
    assert _same(reopened.load("client-1"), state)


# ====================================================================== the spare: in-place rewrites
def _state(version: int, numel: int = 1000, seed: int = 0) -> ClientState:
    gen = torch.Generator().manual_seed(seed)
    return ClientState(model=torch.randn(numel, generator=gen), model_version=version,
                       error=torch.randn(numel, generator=gen), steps_done=version)


def test_the_third_save_rewrites_the_first_saves_file_in_place(tmp_path):
    store = ClientStateStore(tmp_path, durable=False)
    path = store.path("client-1")
    spare = tmp_path / f"client-1.state{state_module.SPARE_SUFFIX}"
    store.save("client-1", _state(1))
    first = os.stat(path).st_ino
    assert not spare.exists()  # nothing replaced yet
    store.save("client-1", _state(2, seed=2))
    assert os.stat(spare).st_ino == first and os.stat(path).st_ino != first
    store.save("client-1", _state(3, seed=3))
    assert os.stat(path).st_ino == first  # the spare, rewritten, is the state file again
    state_module._CACHE.drop(path)
    assert _same(store.load("client-1"), _state(3, seed=3))
    assert list(tmp_path.glob("*.tmp")) == []


def test_a_spare_from_a_larger_state_keeps_no_stale_tail(tmp_path):
    store = ClientStateStore(tmp_path, durable=False)
    for version, numel in enumerate([5000, 5000, 10, 7, 3000, 1], start=1):
        store.save("client-1", _state(version, numel, seed=version))
        path = store.path("client-1")
        assert os.stat(path).st_size == sum(len(bytes(c)) for c in encode_state(_state(version, numel, seed=version)))
        state_module._CACHE.drop(path)
        assert _same(store.load("client-1", reset_corrupt=False), _state(version, numel, seed=version))


def test_states_above_the_spare_limit_get_no_spare(tmp_path, monkeypatch):
    monkeypatch.setattr(state_module, "SPARE_MAX_BYTES", 1000)
    store = ClientStateStore(tmp_path, durable=False)
    for version in range(1, 4):
        store.save("client-1", _state(version, 1000))  # about 8 kB
    assert sorted(p.name for p in tmp_path.iterdir()) == ["client-1.state"]
    state_module._CACHE.drop(store.path("client-1"))
    assert _same(store.load("client-1"), _state(3, 1000))


def test_a_spare_swept_away_during_the_save_is_written_anew(tmp_path, monkeypatch):
    store = ClientStateStore(tmp_path, durable=False)
    for version in (1, 2):
        store.save("client-1", _state(version, seed=version))
    real_claim, taken = state_module._claim_spare, []

    def claim_then_lose_it(spare, path):
        fd, tmp = real_claim(spare, path)
        if fd is not None:
            os.unlink(tmp)  # what another process's sweep does to a temporary file it judges stale
            taken.append(tmp)
        return fd, tmp

    monkeypatch.setattr(state_module, "_claim_spare", claim_then_lose_it)
    store.save("client-1", _state(3, seed=3))
    assert taken  # the spare was claimed, and lost
    state_module._CACHE.drop(store.path("client-1"))
    assert _same(store.load("client-1", reset_corrupt=False), _state(3, seed=3))
    assert list(tmp_path.glob("*.tmp")) == []


def test_delete_removes_the_spare_too(tmp_path):
    store = ClientStateStore(tmp_path, durable=False)
    for version in (1, 2):
        store.save("client-1", _state(version))
    store.delete("client-1")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("share_models", [False, True])
def test_a_shared_load_hands_out_the_cached_tensors_and_a_plain_load_copies(tmp_path, share_models):
    store = ClientStateStore(tmp_path, durable=False, share_models=share_models)
    store.save("client-1", _state(1))
    one, two = store.load("client-1", shared=True), store.load("client-1", shared=True)
    assert one.model.data_ptr() == two.model.data_ptr() and one.error.data_ptr() == two.error.data_ptr()
    mine = store.load("client-1")
    assert mine.model.data_ptr() != one.model.data_ptr() and mine.error.data_ptr() != one.error.data_ptr()
    mine.model.add_(1.0)
    mine.error.zero_()
    assert _same(store.load("client-1"), _state(1))  # a plain load's tensors are the caller's to change


_TWO_SAVES = """
import sys, torch
from fl_sparse.clients import state as s
store = s.ClientStateStore(sys.argv[1], durable=False)
for version in (2, 3):
    gen = torch.Generator().manual_seed(version)
    store.save("client-1", s.ClientState(model=torch.randn(1000, generator=gen), model_version=version,
                                         error=torch.randn(1000, generator=gen), steps_done=version))
"""


def test_a_cached_state_is_not_taken_for_another_processs_rewrite_of_its_inode(tmp_path):
    """Inode, size and (on a coarse clock) mtime can all repeat when a spare is rewritten: the digest tells."""
    store = ClientStateStore(tmp_path, durable=False)
    store.save("client-1", _state(1, seed=1))  # this process caches it
    path = store.path("client-1")
    before = os.stat(path)
    subprocess.run([sys.executable, "-c", _TWO_SAVES, str(tmp_path)], check=True)
    after = os.stat(path)
    assert after.st_ino == before.st_ino and after.st_size == before.st_size  # the spare came back
    os.utime(path, ns=(after.st_atime_ns, before.st_mtime_ns))  # a clock too coarse to tell the two writes apart
    assert state_module._signature(os.stat(path)) == state_module._signature(before)
    loaded = store.load("client-1", reset_corrupt=False)
    gen = torch.Generator().manual_seed(3)
    assert loaded.model_version == 3 and torch.equal(loaded.model, torch.randn(1000, generator=gen))


# ====================================================================== durability
def _trace(monkeypatch) -> list[tuple]:
    """Record os.open of folders, fsync (of which path) and replace, in order."""
    events, fd_path = [], {}
    real_open, real_fsync, real_replace = os.open, os.fsync, os.replace

    def traced_open(path, flags, *args, **kwargs):
        fd = real_open(path, flags, *args, **kwargs)
        fd_path[fd] = ("dir", os.path.realpath(path)) if os.path.isdir(path) else ("file", os.path.realpath(path))
        return fd

    def traced_fsync(fd):
        fd = fd if isinstance(fd, int) else fd.fileno()
        events.append(("fsync", fd_path.get(fd, ("file", "?"))))
        return real_fsync(fd)

    def traced_replace(src, dst, *args, **kwargs):
        events.append(("replace", os.path.realpath(src), os.path.realpath(dst)))
        return real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "open", traced_open)
    monkeypatch.setattr(os, "fsync", traced_fsync)
    monkeypatch.setattr(os, "replace", traced_replace)
    return events


def test_durable_save_fsyncs_file_then_renames_then_fsyncs_the_folder(tmp_path, monkeypatch):
    root = tmp_path / "run-7"
    events = _trace(monkeypatch)
    store = ClientStateStore(root, durable=True)
    store.save("client-1", ClientState(model=torch.ones(4)))
    folder, parent = os.path.realpath(root), os.path.realpath(tmp_path)
    target = os.path.realpath(store.path("client-1"))
    # New folder: its entry in the parent is made durable; then the file's data, the rename, the folder.
    assert [e[0] for e in events] == ["fsync", "fsync", "replace", "fsync"], events
    tmp = events[2][1]
    assert events == [
        ("fsync", ("dir", parent)),
        ("fsync", ("file", tmp)),  # the temporary file's data, before it gets the name
        ("replace", tmp, target),
        ("fsync", ("dir", folder)),  # the rename itself
    ], events
    assert tmp.endswith(".tmp") and os.path.dirname(tmp) == folder
    events.clear()
    store.save("client-1", ClientState(model=torch.zeros(4)))
    assert [(e[0], e[1][0] if e[0] == "fsync" else e[2]) for e in events] == [
        ("fsync", "file"), ("replace", target), ("fsync", "dir")
    ], events
    assert events[2][1] == ("dir", folder)


def test_non_durable_save_never_fsyncs(tmp_path, monkeypatch):
    events = _trace(monkeypatch)
    store = ClientStateStore(tmp_path / "run-7", durable=False)
    store.save("client-1", ClientState(model=torch.ones(4)))
    assert [e for e in events if e[0] == "fsync"] == []


@given(st.lists(st.binary(max_size=40), max_size=12), st.integers(1, 50))
@settings(max_examples=80, deadline=None)
def test_writes_resume_after_short_writes(tmp_path_factory, chunks, most):
    """``writev`` may write less than asked (signals, pipes, huge files): the rest follows, in order."""
    real = os.writev
    calls = []

    def short_writev(fd, buffers):
        calls.append(len(buffers))
        if len(calls) > 2000:  # a writer that never advances would loop forever
            raise AssertionError("writev called 2000 times for at most 480 bytes")
        data = b"".join(bytes(b) for b in buffers)[:most]
        return real(fd, [data]) if data else 0

    path = tmp_path_factory.mktemp("short") / "f"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT)
    try:
        os.writev = short_writev
        state_module._write_all(fd, chunks)
    finally:
        os.writev = real
        os.close(fd)
    assert path.read_bytes() == b"".join(chunks)
    assert all(n >= 1 for n in calls)
