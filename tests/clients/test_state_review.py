"""The state store under races, short reads and hostile headers (an adversarial review's findings)."""

from __future__ import annotations

import builtins
import os
import struct
import threading

import pytest
import torch
import xxhash

from fl_sparse.clients import state as state_module
from fl_sparse.clients.state import ClientState, ClientStateStore, decode_state


@pytest.fixture(autouse=True)
def _fresh_cache():
    state_module._CACHE.clear()
    yield
    state_module._CACHE.clear()


def _state(v: int, n: int = 1000) -> ClientState:
    return ClientState(error=torch.full((n,), float(v)), model_version=v, steps_done=v)


def _spare(store: ClientStateStore, key: str) -> str:
    return f"{store.path(key)}{state_module.SPARE_SUFFIX}"


def test_racing_saves_of_one_client_never_make_the_spare_the_state_file(tmp_path, monkeypatch):
    """Save A claims the spare and links the state file to its temporary name; save B (another
    process) replaces the state file and stops before renaming the file it replaced to the spare;
    A finishes, and saves again through the spare, which is that very file (B's name still holds
    it) and becomes the state file; then B renames its name of it to the spare. The spare must not
    be the state file: the next save would write the live file in place."""
    store = ClientStateStore(tmp_path, durable=False)
    store.save("c", _state(0))
    store.save("c", _state(1))  # a state file and a spare
    path, spare = store.path("c"), _spare(store, "c")
    a_may_go, b_may_go, b_started = threading.Event(), threading.Event(), threading.Event()
    paused = set()
    replace, rename = os.replace, os.rename

    def hooked_replace(src, dst):
        if threading.current_thread().name == "A" and "A" not in paused:
            paused.add("A")  # A: claimed the spare, linked the state file: B runs now
            b_started.set()
            assert a_may_go.wait(10)
        return replace(src, dst)

    def hooked_rename(src, dst):
        if threading.current_thread().name == "B" and str(dst) == spare and "B" not in paused:
            paused.add("B")  # B: replaced the state file; A runs now
            a_may_go.set()
            assert b_may_go.wait(10)
        return rename(src, dst)

    monkeypatch.setattr(os, "replace", hooked_replace)
    monkeypatch.setattr(os, "rename", hooked_rename)
    errors = []

    def run_a():
        try:
            store.save("c", _state(10))
            store.save("c", _state(11))
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)
        finally:
            b_may_go.set()

    def run_b():
        try:
            assert b_started.wait(10)
            store.save("c", _state(20))
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)
        finally:
            a_may_go.set()

    threads = [threading.Thread(target=run_a, name="A"), threading.Thread(target=run_b, name="B")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    monkeypatch.undo()
    assert not errors and paused == {"A", "B"}
    assert os.path.exists(spare)
    assert not os.path.samefile(path, spare), "the spare is the live state file"
    state_module._CACHE.clear()
    assert store.load("c").model_version == 11  # the last save to replace the state file


def test_a_spare_that_is_also_the_state_file_is_never_written_in_place(tmp_path, monkeypatch):
    """What the race above leaves (the spare another name of the state file): a save that dies
    while writing must still leave the last complete state."""
    store = ClientStateStore(tmp_path, durable=False)
    store.save("c", _state(1))
    os.link(store.path("c"), _spare(store, "c"))
    real = state_module._write_all

    def dies_halfway(fd, chunks):
        data = b"".join(bytes(memoryview(c).cast("B")) for c in chunks)
        real(fd, [data[: len(data) // 2]])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(state_module, "_write_all", dies_halfway)
    with pytest.raises(OSError):
        store.save("c", _state(2))
    monkeypatch.undo()
    state_module._CACHE.clear()
    got = store.load("c")
    assert got.reset_reason is None
    assert got.model_version == 1 and torch.equal(got.error, _state(1).error)


class _FileWrapper:
    """An open file whose ``readinto`` a test replaces (the store reads through ``open``)."""

    def __init__(self, fh):
        self.fh = fh

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.fh.close()

    def fileno(self):
        return self.fh.fileno()


def test_a_load_overlapping_two_saves_of_its_client_is_not_taken_for_corruption(tmp_path, monkeypatch):
    """A load has the state file open; meanwhile another process saves the client twice, and the
    second save rewrites that file in place (it became the spare, then was claimed) and renames it
    back. The torn read must not move the new, intact state aside and reset the client."""
    store = ClientStateStore(tmp_path, durable=False)
    n = 50_000
    store.save("c", _state(0, n))
    store.save("c", _state(1, n))
    state_module._CACHE.clear()
    other = ClientStateStore(tmp_path, durable=False)
    reads = []

    class SlowFile(_FileWrapper):
        def readinto(self, buf):
            view = memoryview(buf).cast("B")
            if reads:  # later reads: as they are
                return self.fh.readinto(view)
            reads.append(1)
            got = self.fh.readinto(view[:4096])
            other.save("c", _state(2, n))
            other.save("c", _state(3, n))
            state_module._CACHE.clear()
            return got + self.fh.readinto(view[4096:])

    monkeypatch.setattr(state_module, "open", lambda *a, **k: SlowFile(builtins.open(*a, **k)), raising=False)
    got = store.load("c")
    monkeypatch.undo()
    assert got.reset_reason is None and got.model_version == 3
    assert store.corrupt_files("c") == []
    state_module._CACHE.clear()
    assert store.load("c").model_version == 3


@pytest.mark.parametrize("share_models", [False, True])
def test_reads_resume_after_short_reads(tmp_path, monkeypatch, share_models):
    """One read(2) returns at most 2 GiB - 4 kB on Linux: a larger state file (or model version)
    comes back in several reads, and must not be taken for a torn file."""
    store = ClientStateStore(tmp_path, durable=False, share_models=share_models)
    state = ClientState(model=torch.randn(5000), model_version=4, error=torch.randn(5000), steps_done=2)
    store.save("c", state)
    state_module._CACHE.clear()

    class ShortReads(_FileWrapper):
        def readinto(self, buf):
            return self.fh.readinto(memoryview(buf).cast("B")[:4096])

    monkeypatch.setattr(state_module, "open", lambda *a, **k: ShortReads(builtins.open(*a, **k)), raising=False)
    got = store.load("c")
    monkeypatch.undo()
    assert got.reset_reason is None
    assert torch.equal(got.model, state.model) and torch.equal(got.error, state.error)


def _deep_header_file() -> bytes:
    header = b"[" * 100_000 + b"]" * 100_000
    body = state_module.MAGIC + struct.pack("<I", len(header)) + header
    return body + struct.pack("<Q", xxhash.xxh3_64_intdigest(body))


def test_a_deeply_nested_header_is_a_value_error_a_reset_and_no_obstacle_to_saves(tmp_path):
    data = _deep_header_file()
    with pytest.raises(ValueError, match="unreadable header"):
        decode_state(data)
    store = ClientStateStore(tmp_path, durable=False, share_models=True)
    store.save("other", ClientState(model=torch.ones(8)))  # a model store in the folder
    store.path("c").write_bytes(data)
    got = store.load("c")
    assert got.reset_reason is not None and "unreadable header" in got.reset_reason
    store.path("c").write_bytes(data)
    store.save("c", ClientState(model=torch.zeros(8), model_version=1))  # reads the old header
    assert store.load("c").model_version == 1
    # The sweep reads the header of a client holding two links: it must not fail on such a file.
    store.save("c", ClientState(model=torch.full((8,), 2.0), model_version=2))
    os.link(store.canonical_model_path(state_module.model_hash(torch.ones(8))),
            store.model_path("c", state_module.model_hash(torch.ones(8))))
    store.path("c").write_bytes(data)
    store.remove_stale_temp_files()


@pytest.mark.parametrize("value", ["lots", "-1", "nan", "inf"])
def test_a_bad_state_cache_size_is_refused_by_name_before_anything_is_written(tmp_path, monkeypatch, value):
    monkeypatch.setenv("FL_SPARSE_STATE_CACHE_MB", value)
    with pytest.raises(ValueError, match=r"FL_SPARSE_STATE_CACHE_MB must be a number of megabytes >= 0, got"):
        ClientStateStore(tmp_path / "states")
    assert not (tmp_path / "states").exists() or not any((tmp_path / "states").iterdir())


def test_a_state_cache_size_of_zero_still_saves_and_loads(tmp_path, monkeypatch):
    monkeypatch.setenv("FL_SPARSE_STATE_CACHE_MB", "0")
    store = ClientStateStore(tmp_path / "states")
    store.save("c", ClientState(error=torch.arange(4.0)))
    assert torch.equal(ClientStateStore(tmp_path / "states").load("c").error, torch.arange(4.0))


def test_a_save_that_cannot_encode_its_state_leaves_no_link_to_the_new_model_version(tmp_path):
    """The model version is linked before the state is encoded; a state the file format cannot hold
    (a complex tensor among the extras) must not leave the new version linked (and stored) by no state
    file, and the client's previous state must still load."""
    store = ClientStateStore(tmp_path, durable=False, share_models=True)
    store.save("c", ClientState(model=torch.zeros(64), model_version=1, error=torch.ones(64)))
    before = sorted(os.listdir(store.models))
    bad = ClientState(model=torch.full((64,), 2.0), model_version=2, error=torch.ones(64),
                      extra={"z": torch.zeros(3, dtype=torch.complex64)})
    with pytest.raises(TypeError, match="'extra/z'.*complex64"):
        store.save("c", bad)
    assert sorted(os.listdir(store.models)) == before  # neither the client's link nor the version file
    state_module._CACHE.clear()
    loaded = store.load("c")
    assert loaded.model_version == 1 and torch.equal(loaded.model, torch.zeros(64))
