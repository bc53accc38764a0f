"""The model store: clients at one model version share one file (hard links), and a version no one holds is removed."""

from __future__ import annotations

import errno
import logging
import os
import subprocess
import sys
import time

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fl_sparse.clients import state as state_module
from fl_sparse.clients.state import ClientState, ClientStateStore, StateCorruptError, decode_state, model_hash
from fl_sparse.flat import vector_hash

D = 257


@pytest.fixture(autouse=True)
def _fresh_process_state(monkeypatch):
    """Each test as a new process: an empty cache, hard links believed to work."""
    monkeypatch.setattr(state_module, "_CACHE", state_module._StateCache())
    monkeypatch.setattr(state_module, "_no_links", set())


def _store(root, **kw) -> ClientStateStore:
    return ClientStateStore(root, durable=kw.pop("durable", False), share_models=kw.pop("share_models", True), **kw)


def _model(version: int, d: int = D) -> torch.Tensor:
    return torch.randn(d, generator=torch.Generator().manual_seed(1000 + version))


def _state(version: int, d: int = D, **kw) -> ClientState:
    gen = torch.Generator().manual_seed(version)
    return ClientState(model=_model(version, d), model_version=version, error=torch.randn(d, generator=gen), **kw)


def _canonical(store: ClientStateStore) -> dict[str, os.stat_result]:
    if not store.models.is_dir():
        return {}
    return {p.name.removesuffix(".model"): p.stat() for p in store.models.iterdir() if state_module._CANONICAL.match(p.name)}


def _links(store: ClientStateStore) -> set[str]:
    if not store.models.is_dir():
        return set()
    return {p.name for p in store.models.iterdir() if state_module._LINK.match(p.name) and not state_module._CANONICAL.match(p.name)}


def _as_file_reader(store: ClientStateStore) -> None:
    """Forget everything this process cached: the next load reads the files (another Ray actor)."""
    state_module._CACHE.clear()


def _equal(a: ClientState, b: ClientState) -> bool:
    def eq(x, y):
        if x is None or y is None:
            return x is None and y is None
        return x.dtype == y.dtype and x.shape == y.shape and torch.equal(x, y)

    return (
        eq(a.model, b.model) and eq(a.error, b.error) and a.model_version == b.model_version
        and a.steps_done == b.steps_done and a.extra.keys() == b.extra.keys()
        and all(eq(a.extra[k], b.extra[k]) for k in a.extra)
    )


# ====================================================================== the format
def test_the_file_name_is_the_servers_vector_hash():
    w = _model(3)
    assert model_hash(w) == vector_hash(w)


@st.composite
def shared_states(draw):
    dtype = draw(st.sampled_from([torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.bool]))
    shape = draw(st.lists(st.integers(1, 6), min_size=0, max_size=3))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    raw = torch.randn(shape, generator=gen, dtype=torch.float64) * 50
    model = raw > 0 if dtype == torch.bool else raw.to(dtype)
    error = draw(st.none() | st.just(torch.randn(7, generator=gen)))
    extra = {"layout": torch.tensor([1, 2, 3], dtype=torch.uint8)} if draw(st.booleans()) else {}
    return ClientState(model=model, model_version=draw(st.integers(-1, 2**40)), error=error,
                       steps_done=draw(st.integers(0, 99)), extra=extra)


@given(shared_states(), st.booleans())
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_round_trip_with_shared_models_is_exact(tmp_path_factory, state, from_file):
    store = _store(tmp_path_factory.mktemp("s"))
    store.save("client-1", state)
    if from_file:
        _as_file_reader(store)
    loaded = store.load("client-1")
    assert loaded.reset_reason is None and _equal(loaded, state)
    raw = store.path("client-1").read_bytes()
    if state.model.dtype == torch.float32:
        # The state file holds no model: decoded alone it has none, and it names the version instead.
        assert decode_state(bytearray(raw)).model is None
        assert model_hash(state.model).encode() in raw
        assert set(_canonical(store)) == {model_hash(state.model)}
    else:  # the model store keeps the mod's float32 models only
        assert decode_state(bytearray(raw)).model is not None and _canonical(store) == {}


def test_loads_are_copies_and_never_change_the_shared_version(tmp_path):
    store = _store(tmp_path)
    for key in ("client-0", "client-1"):
        store.save(key, _state(1))
    for from_file in (False, True):
        if from_file:
            _as_file_reader(store)
        first = store.load("client-0")
        first.model += 5  # the mod syncs state.model in place
        assert torch.equal(store.load("client-1").model, _model(1))
        assert torch.equal(store.load("client-0").model, _model(1))


def test_a_caller_changing_its_tensor_after_save_does_not_change_the_shared_version(tmp_path):
    store = _store(tmp_path)
    state = _state(1)
    store.save("client-0", state)
    state.model += 1  # against save's contract for this client, but no other client may see it
    store.save("client-1", _state(1))
    assert torch.equal(store.load("client-1").model, _model(1))


# ====================================================================== sharing and the GC rule
def test_two_clients_at_one_version_share_one_file(tmp_path):
    store = _store(tmp_path)
    store.save("client-0", _state(4))
    store.save("client-1", _state(4))
    digest = model_hash(_model(4))
    canonical = _canonical(store)
    assert list(canonical) == [digest]
    assert canonical[digest].st_nlink == 3  # its own name and one link per client
    assert canonical[digest].st_size == D * 4
    assert _links(store) == {f"client-0.{digest}.model", f"client-1.{digest}.model"}
    inodes = {os.stat(store.model_path(k, digest)).st_ino for k in ("client-0", "client-1")}
    assert inodes == {canonical[digest].st_ino}  # one file on disk
    inline = ClientStateStore(tmp_path / "inline", durable=False)
    inline.save("client-0", _state(4))
    shared, whole = store.path("client-0").stat().st_size, inline.path("client-0").stat().st_size
    assert abs(shared - (whole - D * 4)) <= 128  # the model's bytes gone (give or take header and padding)
    _as_file_reader(store)
    for key in ("client-0", "client-1"):
        assert _equal(store.load(key), _state(4))


def test_a_client_moving_to_a_new_version_frees_the_old_file_when_no_one_holds_it(tmp_path):
    store = _store(tmp_path)
    store.save("client-0", _state(1))
    store.save("client-0", _state(2))
    assert set(_canonical(store)) == {model_hash(_model(2))}
    assert _links(store) == {f"client-0.{model_hash(_model(2))}.model"}
    assert _canonical(store)[model_hash(_model(2))].st_nlink == 2


def test_a_client_moving_away_keeps_the_old_file_while_another_holds_it(tmp_path):
    store = _store(tmp_path)
    v1, v2 = model_hash(_model(1)), model_hash(_model(2))
    store.save("client-0", _state(1))
    store.save("client-1", _state(1))
    store.save("client-0", _state(2))
    canonical = _canonical(store)
    assert set(canonical) == {v1, v2} and canonical[v1].st_nlink == 2 and canonical[v2].st_nlink == 2
    _as_file_reader(store)
    assert _equal(store.load("client-1"), _state(1))
    # A third client reaching version 1 now links the kept file; it is not written again.
    store.save("client-2", _state(1))
    assert _canonical(store)[v1].st_ino == canonical[v1].st_ino and _canonical(store)[v1].st_nlink == 3
    store.save("client-1", _state(2))
    store.save("client-2", _state(2))
    assert set(_canonical(store)) == {v2} and _canonical(store)[v2].st_nlink == 4


def test_saving_again_at_the_same_version_keeps_the_link(tmp_path):
    """SSGD-MV's vote and values phases save twice at one version."""
    store = _store(tmp_path)
    store.save("client-0", _state(1, steps_done=1))
    ino = os.stat(store.model_path("client-0", model_hash(_model(1)))).st_ino
    _as_file_reader(store)  # the old version is then read from the state file's header, not the cache
    store.save("client-0", _state(1, steps_done=2))
    assert os.stat(store.model_path("client-0", model_hash(_model(1)))).st_ino == ino
    assert _canonical(store)[model_hash(_model(1))].st_nlink == 2
    assert store.load("client-0").steps_done == 2


def test_delete_and_a_state_without_a_model_release_the_version(tmp_path):
    store = _store(tmp_path)
    store.save("client-0", _state(1))
    store.save("client-1", _state(1))
    store.delete("client-0")
    assert _canonical(store)[model_hash(_model(1))].st_nlink == 2
    store.save("client-1", ClientState(model=None, model_version=-1))
    assert _canonical(store) == {} and _links(store) == set()


@st.composite
def histories(draw):
    """Saves (client, version) and deletes, as a sampled simulation makes them."""
    steps = draw(st.lists(st.tuples(st.integers(0, 4), st.integers(-1, 5)), min_size=1, max_size=25))
    return steps  # version -1: delete the client


@given(histories(), st.booleans())
@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_one_file_per_version_held_and_none_for_versions_no_one_holds(tmp_path_factory, history, reopen):
    """After every save or delete: the version files are exactly the versions some client holds,
    each linked once per holder, and every client loads its own model exactly."""
    root = tmp_path_factory.mktemp("s")
    store = _store(root)
    held: dict[str, int] = {}
    for client, version in history:
        key = f"client-{client}"
        if reopen:  # another actor: nothing cached, the old version comes from the state file
            _as_file_reader(store)
        if version < 0:
            store.delete(key)
            held.pop(key, None)
        else:
            store.save(key, _state(version, d=16))
            held[key] = version
        want = {}
        for v in held.values():
            want[model_hash(_model(v, 16))] = want.get(model_hash(_model(v, 16)), 0) + 1
        canonical = _canonical(store)
        assert {h: s.st_nlink - 1 for h, s in canonical.items()} == want
        assert _links(store) == {f"{k}.{model_hash(_model(v, 16))}.model" for k, v in held.items()}
    _as_file_reader(store)
    for key, version in held.items():
        assert _equal(store.load(key), _state(version, d=16))


# ====================================================================== damaged or missing model files
def test_a_missing_link_is_repaired_from_the_version_file(tmp_path):
    store = _store(tmp_path)
    store.save("client-0", _state(1))
    store.save("client-1", _state(1))
    store.model_path("client-0", model_hash(_model(1))).unlink()
    _as_file_reader(store)
    loaded = store.load("client-0")
    assert loaded.reset_reason is None and _equal(loaded, _state(1))
    assert _canonical(store)[model_hash(_model(1))].st_nlink == 3  # linked again


def test_a_deleted_model_file_loses_only_the_model_copy(tmp_path, caplog):
    store = _store(tmp_path)
    store.save("client-0", _state(1))
    digest = model_hash(_model(1))
    store.model_path("client-0", digest).unlink()
    store.canonical_model_path(digest).unlink()
    _as_file_reader(store)
    with caplog.at_level(logging.WARNING, logger="flwr"):
        loaded = store.load("client-0")
    assert loaded.model_lost is not None and "missing" in loaded.model_lost and loaded.reset_reason is None
    assert loaded.model is None and loaded.model_version == -1  # the mod asks for a dense sync
    assert torch.equal(loaded.error, _state(1).error)  # the error memory is kept
    assert store.path("client-0").exists() and store.corrupt_files("client-0") == []  # not moved aside
    assert any("lost its model copy" in r.getMessage() for r in caplog.records)
    store.save("client-0", _state(2))  # after the dense sync's save, all is as usual
    assert _equal(store.load("client-0"), _state(2))


@pytest.mark.parametrize("damage", ["flip", "truncate", "grow"])
def test_a_corrupt_version_file_loses_each_holders_model_and_is_not_handed_out_again(tmp_path, damage):
    store = _store(tmp_path)
    store.save("client-0", _state(1))
    store.save("client-1", _state(1))
    digest = model_hash(_model(1))
    path = store.canonical_model_path(digest)
    raw = bytearray(path.read_bytes())
    if damage == "flip":
        raw[100] ^= 0x10
    elif damage == "truncate":
        raw = raw[:-4]
    else:
        raw += b"\0" * 4
    with open(path, "r+b") as fh:  # in place: every link sees it (the same file)
        fh.truncate(0)
        fh.write(raw)
    _as_file_reader(store)
    for key in ("client-0", "client-1"):
        loaded = store.load(key)
        assert loaded.model_lost is not None and "model file" in loaded.model_lost, loaded.model_lost
        assert loaded.model is None and loaded.error is not None and store.corrupt_files(key) == []
    assert _canonical(store) == {} and _links(store) == set()  # the bad bytes are gone
    store.save("client-2", _state(1))  # a new holder writes the version afresh
    _as_file_reader(store)
    assert _equal(store.load("client-2"), _state(1))


def test_strict_load_of_a_corrupt_model_raises_and_leaves_the_files(tmp_path):
    store = _store(tmp_path)
    store.save("client-0", _state(1))
    digest = model_hash(_model(1))
    store.canonical_model_path(digest).unlink()
    store.model_path("client-0", digest).unlink()
    _as_file_reader(store)
    with pytest.raises(StateCorruptError, match="missing"):
        store.load("client-0", reset_corrupt=False)
    assert store.path("client-0").exists() and store.corrupt_files("client-0") == []


def test_a_transient_error_reading_the_model_is_raised_not_a_reset(tmp_path, monkeypatch):
    store = _store(tmp_path)
    store.save("client-0", _state(1))
    _as_file_reader(store)

    def out_of_files(path, ref):
        raise OSError(errno.EMFILE, "Too many open files")

    monkeypatch.setattr(ClientStateStore, "_read_model", staticmethod(out_of_files))
    with pytest.raises(OSError):
        store.load("client-0")
    monkeypatch.undo()
    assert _equal(store.load("client-0"), _state(1))


# ====================================================================== the cache
def test_clients_of_one_process_share_one_read_of_a_version(tmp_path, monkeypatch):
    store = _store(tmp_path)
    for i in range(5):
        store.save(f"client-{i}", _state(1))
    _as_file_reader(store)
    reads = []
    real = ClientStateStore._read_model

    def counting(path, ref):
        reads.append(path.name)
        return real(path, ref)

    monkeypatch.setattr(ClientStateStore, "_read_model", staticmethod(counting))
    for i in range(5):
        assert _equal(store.load(f"client-{i}"), _state(1))
    assert len(reads) == 1


# ====================================================================== no hard links here
def test_without_hard_links_the_model_is_stored_inline(tmp_path, monkeypatch, caplog):
    def no_links(src, dst, *a, **k):
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_links)
    store = _store(tmp_path)
    with caplog.at_level(logging.WARNING, logger="flwr"):
        store.save("client-0", _state(1))
        store.save("client-1", _state(1))
    assert sum("hard links do not work" in r.getMessage() for r in caplog.records) == 1  # said once
    assert decode_state(bytearray(store.path("client-0").read_bytes())).model is not None
    assert _canonical(store) == {} and _links(store) == set()
    assert not list(store.models.glob("*.tmp"))
    _as_file_reader(store)
    assert _equal(store.load("client-0"), _state(1)) and _equal(store.load("client-1"), _state(1))


def test_a_client_going_inline_releases_its_shared_version(tmp_path, monkeypatch):
    store = _store(tmp_path)
    store.save("client-0", _state(1))
    monkeypatch.setattr(os, "link", lambda *a, **k: (_ for _ in ()).throw(OSError(errno.EXDEV, "cross-device")))
    store.save("client-0", _state(2))
    assert _canonical(store) == {} and _links(store) == set()
    assert _equal(store.load("client-0"), _state(2))


def test_too_many_links_to_one_file_stores_that_save_inline_only(tmp_path, monkeypatch):
    real = os.link
    calls = {"n": 0}

    def once_emlink(src, dst, *a, **k):
        calls["n"] += 1
        if calls["n"] == 1:
            raise OSError(errno.EMLINK, "Too many links")
        return real(src, dst, *a, **k)

    store = _store(tmp_path)
    store.save("client-0", _state(1))
    monkeypatch.setattr(os, "link", once_emlink)
    store.save("client-1", _state(1))
    assert decode_state(bytearray(store.path("client-1").read_bytes())).model is not None
    store.save("client-2", _state(1))  # later saves link again
    assert decode_state(bytearray(store.path("client-2").read_bytes())).model is None
    assert _canonical(store)[model_hash(_model(1))].st_nlink == 3


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EIO, errno.EDQUOT])
def test_a_passing_link_failure_stores_that_save_inline_only_and_says_so(tmp_path, monkeypatch, caplog, code):
    real = os.link
    calls = {"n": 0}

    def fails_once(src, dst, *a, **k):
        calls["n"] += 1
        if calls["n"] == 1:
            raise OSError(code, os.strerror(code))
        return real(src, dst, *a, **k)

    store = _store(tmp_path)
    store.save("client-0", _state(1))
    monkeypatch.setattr(os, "link", fails_once)
    with caplog.at_level(logging.WARNING, logger="flwr"):
        store.save("client-1", _state(1))
    messages = [r.getMessage() for r in caplog.records]
    assert any("cannot link a model version" in m and "this save keeps its model" in m for m in messages)
    assert not any("hard links do not work" in m for m in messages)
    assert decode_state(bytearray(store.path("client-1").read_bytes())).model is not None
    store.save("client-2", _state(1))  # the store is still on: later saves link again
    assert decode_state(bytearray(store.path("client-2").read_bytes())).model is None
    assert _canonical(store)[model_hash(_model(1))].st_nlink == 3


# ====================================================================== races
@pytest.mark.parametrize("times", [1, 1000])
def test_a_version_removed_while_linking_is_written_again(tmp_path, monkeypatch, times):
    """Another process removes the version file between our look and our link: we hold the bytes.

    Once: we write it again and link it. Every time: after a few tries the model goes inline.
    """
    store = _store(tmp_path)
    store.save("client-0", _state(1))
    real = os.link
    digest = model_hash(_model(1))
    canonical = store.canonical_model_path(digest)
    races = {"left": times}

    def racing(src, dst, *a, **k):
        if str(src) == str(canonical) and canonical.exists() and races["left"]:
            races["left"] -= 1
            canonical.unlink()  # the other process's GC, just before our link
        return real(src, dst, *a, **k)

    monkeypatch.setattr(os, "link", racing)
    store.save("client-1", _state(1))
    monkeypatch.undo()
    inline = decode_state(bytearray(store.path("client-1").read_bytes())).model is not None
    assert inline == (times > 1)
    if not inline:
        assert _canonical(store)[digest].st_nlink == 2  # the new version file and client-1's link
    assert not list(store.models.glob("*.tmp"))
    _as_file_reader(store)
    assert _equal(store.load("client-0"), _state(1)) and _equal(store.load("client-1"), _state(1))


def test_a_version_written_by_another_process_meanwhile_is_used(tmp_path, monkeypatch):
    store = _store(tmp_path)
    digest = model_hash(_model(1))
    real_write = ClientStateStore._write_canonical

    def two_writers(self, canonical, flat):
        real_write(self, canonical, flat)  # the other process wins
        real_write(self, canonical, flat)  # ours: FileExistsError, dropped

    monkeypatch.setattr(ClientStateStore, "_write_canonical", two_writers)
    store.save("client-0", _state(1))
    assert _canonical(store)[digest].st_nlink == 2 and not list(store.models.glob("*.tmp"))


_WORKER = """
import sys, torch
from fl_sparse.clients.state import ClientState, ClientStateStore
root, me, rounds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
store = ClientStateStore(root, durable=False, share_models=True)
for r in range(rounds):
    for c in range(6):
        v = (r + c) % 3  # clients of all processes move between three versions at once
        model = torch.randn(300, generator=torch.Generator().manual_seed(v))
        store.save(f"client-{me}-{c}", ClientState(model=model, model_version=v, steps_done=r))
"""


def test_processes_saving_at_once_lose_no_model(tmp_path):
    procs = [subprocess.Popen([sys.executable, "-c", _WORKER, str(tmp_path), str(i), "12"]) for i in range(3)]
    assert [p.wait(timeout=300) for p in procs] == [0, 0, 0]
    store = _store(tmp_path)
    _as_file_reader(store)
    for i in range(3):
        for c in range(6):
            v = (11 + c) % 3
            loaded = store.load(f"client-{i}-{c}")
            assert loaded.reset_reason is None and loaded.model_version == v
            assert torch.equal(loaded.model, torch.randn(300, generator=torch.Generator().manual_seed(v)))
    # Each version file present is held; a race may have left a holder on its own copy, never a loss.
    assert all(s.st_nlink >= 2 for s in _canonical(store).values())
    assert len(_links(store)) == 18 and not list(store.models.glob("*.tmp"))


# ====================================================================== what a killed save leaves
def test_the_sweep_removes_links_and_versions_a_killed_save_left(tmp_path):
    store = _store(tmp_path)
    store.save("client-0", _state(1))
    store.save("client-1", _state(1))
    v1, v2, v3 = (model_hash(_model(v)) for v in (1, 2, 3))
    # client-0's save of version 2 was killed after its link, before its state file: an extra link.
    store._link("client-0", v2, _model(2).view(torch.uint8))
    # a client whose state file is gone (moved aside unreadable) still links version 3
    store._link("client-9", v3, _model(3).view(torch.uint8))
    # a version file whose last holder was killed before removing it
    store.models.joinpath(f"{model_hash(_model(4))}.model").write_bytes(_model(4).numpy().tobytes())
    assert store.remove_stale_temp_files() == []  # all fresh: a live save may be about to name them
    later = time.time() + 2 * state_module.STALE_TMP_SECONDS
    removed = {p.name for p in store.remove_stale_temp_files(now=later)}
    assert removed == {f"client-0.{v2}.model", f"client-9.{v3}.model", f"{v2}.model", f"{v3}.model",
                       f"{model_hash(_model(4))}.model"}
    assert set(_canonical(store)) == {v1}
    assert _links(store) == {f"client-0.{v1}.model", f"client-1.{v1}.model"}
    _as_file_reader(store)
    assert _equal(store.load("client-0"), _state(1)) and _equal(store.load("client-1"), _state(1))


def test_temporary_files_of_the_model_store_are_swept(tmp_path):
    store = _store(tmp_path)
    store.save("client-0", _state(1))
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    name = f"{model_hash(_model(2))}.model.{state_module._HOST}.{dead.pid}.abcd1234.tmp"
    store.models.joinpath(name).write_bytes(b"x")
    assert [p.name for p in store.remove_stale_temp_files()] == [name]


def test_a_save_given_the_model_hash_does_not_hash_the_model_again(tmp_path, monkeypatch):
    """The mod checks the model's hash on every message and hands it to the save (one hash per message)."""
    store = _store(tmp_path)
    state = _state(1)
    digest = vector_hash(state.model)
    hashed = []
    real = state_module.vector_hash
    monkeypatch.setattr(state_module, "vector_hash", lambda v: hashed.append(v) or real(v))
    store.save("client-0", state, model_hash=digest)
    assert hashed == []
    assert store.model_path("client-0", digest).exists() and _links(store) == {f"client-0.{digest}.model"}
    store.save("client-1", _state(1))  # no hash given: hashed here
    assert len(hashed) == 1
    _as_file_reader(store)
    assert _equal(store.load("client-0"), state)  # read from the file, its bytes checked against the name


_SAVE_ONE = """
import sys, torch
from fl_sparse.clients.state import ClientState, ClientStateStore
store = ClientStateStore(sys.argv[1], durable=False, share_models=True)
gen = torch.Generator().manual_seed(int(sys.argv[2]))
model = torch.randn(int(sys.argv[3]), generator=torch.Generator().manual_seed(1000 + int(sys.argv[2])))
store.save("client-0", ClientState(model=model, model_version=int(sys.argv[2]), error=torch.randn(int(sys.argv[3]), generator=gen)))
"""


def test_a_save_after_another_process_saved_the_client_meanwhile_loses_nothing(tmp_path):
    """A save trusts the entry its load cached (no stat): if another process saved the client in between
    (the server never asks for that), the new state is still whole and the stale link is swept later."""
    store = _store(tmp_path)
    store.save("client-0", _state(1))
    assert _equal(store.load("client-0"), _state(1))  # cached: version 1
    done = subprocess.run([sys.executable, "-c", _SAVE_ONE, str(tmp_path), "2", str(D)], timeout=120)
    assert done.returncode == 0
    store.save("client-0", _state(3))  # released version 1 (the other process had), not version 2
    v2, v3 = model_hash(_model(2)), model_hash(_model(3))
    assert _links(store) == {f"client-0.{v2}.model", f"client-0.{v3}.model"}
    _as_file_reader(store)
    assert _equal(store.load("client-0"), _state(3))
    later = time.time() + 2 * state_module.STALE_TMP_SECONDS
    assert {p.name for p in store.remove_stale_temp_files(now=later)} == {f"client-0.{v2}.model", f"{v2}.model"}
    assert set(_canonical(store)) == {v3} and _links(store) == {f"client-0.{v3}.model"}
    _as_file_reader(store)
    assert _equal(store.load("client-0"), _state(3))
