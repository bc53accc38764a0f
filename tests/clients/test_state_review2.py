"""The state store under crashes and failing system calls (a second adversarial review).

Each test sees the folder as a new process would (empty cache, not swept yet, hard links
believed to work). "A kill at every step" runs the save in a forked child that is stopped at
its k-th system call and killed with SIGKILL; "a failure at every step" makes the k-th system
call of a save raise in this process.
"""

from __future__ import annotations

import errno
import os
import select
import signal
import time

import pytest
import torch
import xxhash

from fl_sparse.clients import state as state_module
from fl_sparse.clients.state import ClientState, ClientStateStore, StateCorruptError, model_hash

N = 500
# The os functions a save or load calls (each looked up on the os module at call time).
_SYSCALLS = ("rename", "replace", "link", "unlink", "writev", "ftruncate", "fsync", "open", "close", "stat", "pread", "mkdir")


@pytest.fixture(autouse=True)
def _fresh_process(monkeypatch):
    monkeypatch.setattr(state_module, "_CACHE", state_module._StateCache())
    monkeypatch.setattr(state_module, "_no_links", set())
    monkeypatch.setattr(state_module, "_swept", {})


def _as_new_process() -> None:
    state_module._CACHE.clear()
    state_module._swept.clear()
    state_module._no_links.clear()


def _model(v: int) -> torch.Tensor:
    return torch.randn(N, generator=torch.Generator().manual_seed(1000 + v))


def _error(v: int) -> torch.Tensor:
    return torch.randn(N, generator=torch.Generator().manual_seed(v))


def _state(v: int) -> ClientState:
    return ClientState(model=_model(v), model_version=v, error=_error(v), steps_done=v)


def _is(got: ClientState, v: int) -> bool:
    return (
        got.reset_reason is None and got.model_version == v and got.steps_done == v
        and torch.equal(got.error, _error(v)) and torch.equal(got.model, _model(v))
    )


def _files(root) -> set[str]:
    names = set(os.listdir(root))
    if os.path.isdir(os.path.join(root, "models")):
        names |= {f"models/{n}" for n in os.listdir(os.path.join(root, "models"))}
    return names


def _minimal(share: bool, v: int, clients=("c", "d")) -> set[str]:
    """What a folder of clients that saved at least twice, all at version ``v``, holds after a sweep."""
    names = {f"{c}.state" for c in clients} | {f"{c}.state.spare" for c in clients}
    if share:
        h = model_hash(_model(v))
        names |= {"models", f"models/{h}.model"} | {f"models/{c}.{h}.model" for c in clients}
    return names


def _sweep_long_after(store: ClientStateStore) -> None:
    """Two sweeps as if minutes had passed (a link freed by the first is a version file for the second)."""
    store.remove_stale_temp_files(now=time.time() + 3 * state_module.STALE_TMP_SECONDS)
    store.remove_stale_temp_files(now=time.time() + 6 * state_module.STALE_TMP_SECONDS)


def _folder(tmp_path, share: bool, name: str = "f"):
    """Client c saved at versions 0, 1, 2 and d at 0, 1 (each has a spare; c alone holds version 2)."""
    root = tmp_path / name
    store = ClientStateStore(root, durable=False, share_models=share)  # (fsyncs only where they are looked at)
    for v in (0, 1, 2):
        store.save("c", _state(v))
        if v < 2:
            store.save("d", _state(v))
    _as_new_process()
    return root


# ====================================================================== kills
def _killed_save(root, share: bool, k: int, after: bool) -> str:
    """Save client c at version 3 in a forked child stopped at its k-th system call (before it, or just
    after it returns) and killed there; what it was doing ("done" if the save finished first)."""
    model, error = _model(3), _error(3)  # made here: the child runs no torch random generator
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            os.close(r)
            store = ClientStateStore(root, durable=True, share_models=share)
            store.load("c", reset_corrupt=False)
            calls = [0]
            real = {name: getattr(os, name) for name in _SYSCALLS}

            def hooked(name):
                def call(*args, **kwargs):
                    calls[0] += 1
                    me = calls[0]
                    if me == k and not after:
                        real["writev"](w, [f"{name}\n".encode()])
                        time.sleep(600)
                    try:
                        return real[name](*args, **kwargs)
                    finally:
                        if me == k and after:
                            real["writev"](w, [f"after {name}\n".encode()])
                            time.sleep(600)
                return call

            for name in _SYSCALLS:
                setattr(os, name, hooked(name))
            store.save("c", ClientState(model=model, model_version=3, error=error, steps_done=3))
            for name in _SYSCALLS:
                setattr(os, name, real[name])
            os.write(w, b"done\n")
        finally:
            os._exit(0)
    os.close(w)
    try:
        ready, _, _ = select.select([r], [], [], 15)
        line = os.read(r, 200).decode().strip() if ready else "timeout"
    finally:
        os.close(r)
        if line != "done":
            os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    return line


@pytest.mark.skipif(not hasattr(os, "fork") or os.name != "posix", reason="kills a forked child")
@pytest.mark.parametrize("share", [True, False], ids=["model-store", "inline"])
def test_a_save_killed_at_any_system_call_leaves_one_whole_state_and_nothing_that_lasts(tmp_path, share):
    """SIGKILL before or just after each system call of a save (claiming the spare, writing it,
    linking the replaced file, the replace, the folder fsync, making and releasing model links):
    a new process loads the previous state or the new one, whole, never a reset; once it has
    saved again and the folder is swept, nothing the killed save made is left."""
    seen = set()
    for after in (False, True):
        for k in range(1, 200):
            root = _folder(tmp_path, share, f"{int(after)}-{k}")
            what = _killed_save(root, share, k, after)
            assert what != "timeout"
            seen.add(what)
            _as_new_process()
            store = ClientStateStore(root, durable=False, share_models=share)  # sweeps the dead child's files
            got = store.load("c", reset_corrupt=False)
            assert _is(got, 2) or _is(got, 3), (what, got.model_version)
            assert what != "done" or _is(got, 3)
            assert _is(store.load("d", reset_corrupt=False), 1)
            for v in (4, 5):
                store.save("c", _state(v))
                store.save("d", _state(v))
            _as_new_process()
            assert _is(store.load("c", reset_corrupt=False), 5), what
            _sweep_long_after(store)
            assert _files(root) == _minimal(share, 5), what
            if what == "done":
                break
        else:  # pragma: no cover
            pytest.fail("the save never finished")
    assert {"rename", "replace", "writev", "ftruncate", "after replace"} <= seen
    if share:
        assert {"link", "unlink", "after unlink"} <= seen


# ====================================================================== failing system calls
def _failing_at(mp: pytest.MonkeyPatch, k: int, exc: BaseException, after: bool = False) -> list:
    """The k-th call of the os functions a save uses raises ``exc`` (before it runs, or after it ran)."""
    calls, hit = [0], []
    real = {name: getattr(os, name) for name in _SYSCALLS}

    def hooked(name):
        def call(*args, **kwargs):
            calls[0] += 1
            me = calls[0]
            if me == k and not after:
                hit.append(name)
                raise exc
            result = real[name](*args, **kwargs)
            if me == k:
                hit.append(f"after {name}")
                raise exc
            return result
        return call

    for name in _SYSCALLS:
        mp.setattr(os, name, hooked(name))
    return hit


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EIO, errno.EDQUOT])
@pytest.mark.parametrize("share", [True, False], ids=["model-store", "inline"])
def test_a_save_whose_system_call_fails_before_the_replace_keeps_the_previous_state(tmp_path, share, code):
    """A full disk, a quota or an I/O error at any system call up to the replace of the state file:
    the save either raises that error (the previous state loads whole, in this process and in a
    new one) or succeeds without that call (a model link that could not be made: the model
    inline); no spare is left torn for a later save to trust, and nothing is left that lasts."""
    for k in range(1, 200):
        root = _folder(tmp_path, share, f"{code}-{k}")
        store = ClientStateStore(root, durable=True, share_models=share)
        assert _is(store.load("c", shared=True), 2)  # cached, as the mod leaves it
        raised = None
        with pytest.MonkeyPatch.context() as mp:
            hit = _failing_at(mp, k, OSError(code, os.strerror(code)))
            try:
                store.save("c", _state(3))
            except OSError as exc:
                raised = exc
        state_module._no_links.clear()
        if not hit:
            assert raised is None
            break
        if hit[0] == "replace":
            break  # the replace and what follows it: see the tests below
        assert raised is None or raised.errno == code, (hit, raised)
        expected = 2 if raised is not None else 3
        assert _is(store.load("c", reset_corrupt=False), expected), hit  # this process, its cache
        _as_new_process()
        store = ClientStateStore(root, durable=True, share_models=share)
        assert _is(store.load("c", reset_corrupt=False), expected), hit
        for v in (4, 5):  # the next saves reuse the spare, if one is left: it must not be half of a state
            store.save("c", _state(v))
            store.save("d", _state(v))
            _as_new_process()
            assert _is(store.load("c", reset_corrupt=False), v), hit
        _sweep_long_after(store)
        assert _files(root) == _minimal(share, 5), hit
    else:  # pragma: no cover
        pytest.fail("the save never got to its replace")


def _fsync_dir_interrupted_for(root):
    real = state_module._fsync_dir

    def fsync_dir(path, **kwargs):
        if os.path.realpath(path) == os.path.realpath(root):  # the state file's folder, after the replace
            raise KeyboardInterrupt  # what a signal handler raises when SIGINT lands during the fsync
        return real(path, **kwargs)

    return fsync_dir


@pytest.mark.parametrize("failure", ["interrupted-folder-fsync", "replace-reports-an-error-it-did", "folder-close-fails"])
def test_a_save_that_fails_after_its_state_file_is_in_place_keeps_the_model_that_file_names(tmp_path, failure):
    """The save raises after ``os.replace`` put the new state file in place: a KeyboardInterrupt
    (Ctrl-C, or SystemExit from a SIGTERM handler) during the folder fsync, the slowest step
    after the replace; a rename that NFS carried out but reported failed (its reply lost, the
    retransmission finds no source); an error closing the folder. The new state file names the
    new model version, so the save must not remove the client's link to it (nor, as here where
    the client is its only holder, the version file): the state on disk must load whole."""
    root = tmp_path / "f"
    store = ClientStateStore(root, durable=True, share_models=True)
    store.save("c", _state(1))
    store.save("c", _state(2))
    assert _is(store.load("c", shared=True), 2)
    mp = pytest.MonkeyPatch()
    if failure == "interrupted-folder-fsync":
        mp.setattr(state_module, "_fsync_dir", _fsync_dir_interrupted_for(root))
        expected = KeyboardInterrupt
    elif failure == "replace-reports-an-error-it-did":
        real_replace = os.replace

        def replace(src, dst):
            real_replace(src, dst)
            raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), src)

        mp.setattr(os, "replace", replace)
        expected = FileNotFoundError
    else:
        real_close = os.close

        def close(fd):
            try:
                target = os.readlink(f"/proc/self/fd/{fd}")
            except OSError:
                target = None
            real_close(fd)
            if target == str(root):  # the state file's folder, opened to fsync the replace
                raise OSError(errno.EIO, os.strerror(errno.EIO))

        mp.setattr(os, "close", close)
        expected = OSError
    try:
        with pytest.raises(expected):
            store.save("c", _state(3))
    finally:
        mp.undo()
    _as_new_process()
    store = ClientStateStore(root, durable=True, share_models=True)
    try:
        got = store.load("c", reset_corrupt=False)
    except StateCorruptError as exc:
        pytest.fail(f"the client's state no longer loads: {exc}")
    assert _is(got, 2) or _is(got, 3)


def test_a_durable_save_whose_folder_fsync_fails_with_an_io_error_says_so(tmp_path):
    """``durable=True`` promises the new state survives a power cut once ``save`` returns. An EIO
    from fsync of the folder means the rename may not be on the disk (and fsync reports a
    writeback error once: a later fsync succeeds though the entry was lost), yet the save
    returns normally; the replaced file then becomes the spare and the next save rewrites it in
    place, though after a power cut it may still be the state file on the disk."""
    root = tmp_path / "f"
    store = ClientStateStore(root, durable=True)
    store.save("c", _state(1))
    real_fsync = os.fsync

    def fsync(fd):
        if os.path.isdir(f"/proc/self/fd/{fd}") and os.readlink(f"/proc/self/fd/{fd}") == str(root):
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        return real_fsync(fd)

    if not os.path.isdir("/proc/self/fd"):  # pragma: no cover
        pytest.skip("needs /proc to tell a folder's descriptor")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(os, "fsync", fsync)
        with pytest.raises(OSError) as raised:
            store.save("c", _state(2))
    assert raised.value.errno == errno.EIO
    _as_new_process()
    got = ClientStateStore(root, durable=True).load("c", reset_corrupt=False)
    assert _is(got, 1) or _is(got, 2)


@pytest.mark.parametrize("code", [errno.EMFILE, errno.EIO])
def test_a_sweep_that_cannot_read_a_state_file_keeps_the_model_it_names(tmp_path, code):
    """Client c holds version 1, which no other client holds any more (it has not trained since),
    and a killed save left it a link to version 2 (the kill test above shows such a link). Long
    after, a sweep looks at c's two links and reads c's state file to tell which one it names;
    that read fails (out of file descriptors in this Ray actor; an I/O error). A load treats such
    errors as "try again" (EMFILE) or as a bad file, yet the sweep takes them to mean "names no
    model" and removes both links, and a later sweep the version file: c's next load finds no
    model copy and resets c (its error memory is lost)."""
    root = tmp_path / "f"
    store = ClientStateStore(root, durable=False, share_models=True)
    store.save("c", _state(1))
    store._link("c", model_hash(_model(2)), _model(2))  # what a save killed after its link leaves
    _as_new_process()
    store = ClientStateStore(root, durable=False, share_models=True)
    import builtins

    def open_(path, *args, **kwargs):
        if os.path.basename(str(path)) == "c.state":
            raise OSError(code, os.strerror(code), str(path))
        return builtins.open(path, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(state_module, "open", open_, raising=False)
        store.remove_stale_temp_files(now=time.time() + 3 * state_module.STALE_TMP_SECONDS)
    store.remove_stale_temp_files(now=time.time() + 6 * state_module.STALE_TMP_SECONDS)
    _as_new_process()
    try:
        got = ClientStateStore(root, durable=False, share_models=True).load("c", reset_corrupt=False)
    except StateCorruptError as exc:
        pytest.fail(f"the client's state no longer loads: {exc}")
    assert _is(got, 1)


def test_a_state_file_of_a_newer_format_is_named_as_such_and_left_in_place(tmp_path):
    """Going back to an older fl-sparse (a SuperNode rolled back, a run resumed from ``--out`` with
    the previous release) must not silently drop every client's error memory: the file is not
    corrupt, this version just cannot read it. The load must say so and leave the file where the
    newer version will find it again (moved aside, it is lost to that version too, and the
    rotation of corrupt files deletes it after three more resets)."""
    store = ClientStateStore(tmp_path, durable=False)
    store.save("c", _state(1))
    raw = store.path("c").read_bytes()
    body = b"FLSPARSE-STATE-4\n" + raw[len(state_module.MAGIC):-8]  # whatever a format 4 holds,
    newer = body + xxhash.xxh3_64_digest(body)[::-1]  # with a checksum of its own (little-endian)
    store.path("c").write_bytes(newer)
    _as_new_process()
    got = None
    with pytest.raises(Exception, match=r"(?i)newer|format 4|version 4"):
        got = ClientStateStore(tmp_path, durable=False).load("c")
    assert got is None
    assert store.path("c").read_bytes() == newer and store.corrupt_files("c") == []


def test_a_version_3_file_whose_version_digit_flipped_is_corrupt_not_newer(tmp_path):
    """One bit turns FLSPARSE-STATE-3 into -7: its checksum still holds with the 3 put back, so it is
    a damaged file (moved aside, the client reset), not a newer format that blocks the client."""
    store = ClientStateStore(tmp_path, durable=False)
    store.save("c", _state(1))
    raw = bytearray(store.path("c").read_bytes())
    raw[len(state_module.MAGIC) - 2] ^= 0x04  # "3" -> "7"
    assert bytes(raw[: len(state_module.MAGIC)]) == b"FLSPARSE-STATE-7\n"
    store.path("c").write_bytes(bytes(raw))
    _as_new_process()
    got = ClientStateStore(tmp_path, durable=False).load("c")
    assert got.reset_reason is not None and "damaged version number" in got.reset_reason
    assert not store.path("c").exists() and len(store.corrupt_files("c")) == 1


def test_a_failed_save_at_the_version_the_client_holds_keeps_that_version(tmp_path):
    """Client c holds version 1 alone, but its link is gone (what the sweep above removes; the
    version file is still there). c saves again at version 1 (SSGD-MV's values phase keeps the
    model) from a process whose cache holds the version, so no load re-made the link: the save
    makes it (a new link), then its write fails (a full disk). Releasing that link then removes
    the version file too, and the state file in place, which names version 1, no longer loads."""
    root = tmp_path / "f"
    store = ClientStateStore(root, durable=False, share_models=True)
    store.save("c", _state(1))
    h1 = model_hash(_model(1))
    os.unlink(store.model_path("c", h1))
    assert _is(store.load("c", shared=True), 1)  # from this process's cache
    with pytest.MonkeyPatch.context() as mp:
        def full(fd, chunks):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        mp.setattr(os, "writev", full)
        with pytest.raises(OSError):
            store.save("c", ClientState(model=_model(1), model_version=1, error=_error(2), steps_done=2))
    _as_new_process()
    try:
        got = ClientStateStore(root, durable=False, share_models=True).load("c", reset_corrupt=False)
    except StateCorruptError as exc:
        pytest.fail(f"the client's state no longer loads: {exc}")
    assert _is(got, 1)


# ====================================================================== processes taking turns
_ROUNDS, _CLIENTS, _PROCS = 8, 10, 2


def _plan(r: int) -> tuple[list[int], list[int]]:
    """Round ``r``: which process handles each client, and which clients train (a fixed draw)."""
    import random

    rnd = random.Random(r)
    return [rnd.randrange(_PROCS) for _ in range(_CLIENTS)], [c for c in range(_CLIENTS) if rnd.random() < 0.7]


def _last_trained(c: int, before: int) -> int:
    return next((r for r in range(before - 1, 0, -1) if c in _plan(r)[1]), 0)


def _client_error(c: int, r: int) -> torch.Tensor:
    return _error(100 * c + r)


def _turns(root, me: int, barrier, models: dict) -> list:
    """One Ray actor: each round, load and save the clients the plan gives it, sweeping before each message."""
    wrong = []
    store = ClientStateStore(root, durable=False, share_models=True)
    for r in range(1, _ROUNDS + 1):
        owner, trained = _plan(r)
        for c in trained:
            if owner[c] != me:
                continue
            state_module._swept.clear()
            store.sweep_if_due()
            got = store.load(f"client-{c}", shared=True)
            last = _last_trained(c, r)
            if last == 0:
                ok = got.model is None and got.reset_reason is None
            else:
                ok = (got.reset_reason is None and got.model_version == last and torch.equal(got.model, models[last])
                      and torch.equal(got.error, _client_error(c, last)))
            if not ok:
                wrong.append((r, c, last, got.model_version, got.reset_reason))
            store.save(f"client-{c}", ClientState(model=models[r], model_version=r, error=_client_error(c, r)))
        barrier.wait(30)
    return wrong


@pytest.mark.skipif(not hasattr(os, "fork"), reason="forks the second process")
def test_clients_moving_between_processes_each_round_always_load_their_last_state(tmp_path):
    """Two processes (Ray actors) share a folder with the model store; each round the clients
    that train are handed to either process, so a process meets clients another one saved since
    its own last save of them (the spare gives the file back an inode this process cached), and
    each process sweeps the folder before every message. Every load must be the client's state
    of the last round it trained, never an older cached one, never a reset; and in the end the
    folder holds one version file per version still held, one link per client, no temporary file."""
    import multiprocessing

    ctx = multiprocessing.get_context("fork")
    barrier = ctx.Barrier(_PROCS)
    models = {r: _model(r) for r in range(1, _ROUNDS + 1)}
    for c in range(_CLIENTS):  # errors made here: the forked child runs no random generator
        for r in range(1, _ROUNDS + 1):
            _client_error(c, r)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the second process
        code = 1
        try:
            os.close(r)
            state_module._CACHE.clear()
            wrong = _turns(tmp_path, 1, barrier, models)
            os.write(w, repr(wrong).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(w)
    try:
        wrong = _turns(tmp_path, 0, barrier, models)
    finally:
        _, status = os.waitpid(pid, 0)
        theirs = os.read(r, 1 << 16).decode()
        os.close(r)
    assert status == 0 and theirs == "[]" and wrong == []
    _as_new_process()
    store = ClientStateStore(tmp_path, durable=False, share_models=True)
    held = {}
    for c in range(_CLIENTS):
        last = _last_trained(c, _ROUNDS + 1)
        got = store.load(f"client-{c}", reset_corrupt=False)
        assert last == 0 or (got.model_version == last and torch.equal(got.error, _client_error(c, last)))
        if last:
            held[c] = model_hash(models[last])
    names = _files(tmp_path)
    assert not [n for n in names if n.endswith(".tmp")]
    assert {n for n in names if n.startswith("models/client-")} == {f"models/client-{c}.{h}.model" for c, h in held.items()}
    assert {n for n in names if state_module._CANONICAL.match(n.removeprefix("models/"))} == {
        f"models/{h}.model" for h in set(held.values())}


@pytest.mark.parametrize("share", [False, True], ids=["inline", "model-store"])
def test_a_state_file_this_process_may_not_read_is_an_error_not_a_reset(tmp_path, share):
    """A SuperNode restarted as another user (a systemd unit after a manual run as root, a
    container with another uid on the same volume) cannot open the client's state file (mode
    0600) or its model version: permission denied says nothing about the file's bytes, like the
    out-of-descriptors errors a load already raises. The load must raise it and leave the files,
    not move the state aside and start the client empty (its error memory lost to the right
    user too, once three more resets rotate the moved file out)."""
    import builtins

    store = ClientStateStore(tmp_path, durable=False, share_models=share)
    store.save("c", _state(1))
    _as_new_process()
    denied = {"c.state"} if not share else {f"c.{model_hash(_model(1))}.model", f"{model_hash(_model(1))}.model"}

    def open_(path, *args, **kwargs):
        if os.path.basename(str(path)) in denied:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        return builtins.open(path, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(state_module, "open", open_, raising=False)
        with pytest.raises(PermissionError):
            ClientStateStore(tmp_path, durable=False, share_models=share).load("c")
    assert store.corrupt_files("c") == []
    _as_new_process()
    assert _is(ClientStateStore(tmp_path, durable=False, share_models=share).load("c", reset_corrupt=False), 1)


def test_a_version_released_by_its_last_holder_and_then_held_again_is_written_again(tmp_path):
    """Client c, version 1's last holder, moves to version 2: the version file goes. A process that
    still caches version 1 (it saved client d there earlier, and the sweep removed d's files
    meanwhile) saves d at version 1 again: the version file is written again from memory, both
    clients load whole in a new process, and a later move of d releases it once more."""
    root = tmp_path / "f"
    store = ClientStateStore(root, durable=False, share_models=True)
    store.save("d", _state(1))
    store.delete("d")
    store.save("c", _state(1))
    store.save("c", _state(2))
    h1 = model_hash(_model(1))
    assert not store.canonical_model_path(h1).exists()
    assert store.shared_model(h1, N) is None  # dropped from this process's cache with the file
    other = ClientStateStore(root, durable=False, share_models=True)
    other.save("d", _state(1))  # what a sync from the cache (SparseMod._synced_elsewhere) saves
    assert store.canonical_model_path(h1).exists()
    _as_new_process()
    assert _is(other.load("d", reset_corrupt=False), 1) and _is(other.load("c", reset_corrupt=False), 2)
    other.save("d", _state(3))
    assert not store.canonical_model_path(h1).exists()
    _as_new_process()
    assert _is(other.load("d", reset_corrupt=False), 3)


def test_a_client_linking_a_version_while_its_last_holder_releases_it_keeps_a_whole_copy(tmp_path):
    """The release race between two processes: c releases version 1 and finds the version file's
    link count 1 (no other holder); before it removes the file, d links it (another process's
    save). d then holds the only copy under its own name: it must load whole in a new process,
    survive sweeps, and be freed (no file left) when d moves on."""
    root = tmp_path / "f"
    store = ClientStateStore(root, durable=False, share_models=True)
    other = ClientStateStore(root, durable=False, share_models=True)
    store.save("c", _state(1))
    h1 = model_hash(_model(1))
    canonical = str(store.canonical_model_path(h1))
    real_stat, raced = os.stat, []

    def stat(path, *args, **kwargs):
        result = real_stat(path, *args, **kwargs)
        if str(path) == canonical and not raced and result.st_nlink == 1:
            raced.append(1)  # between c's look at the link count and its unlink: d links the version
            other.save("d", _state(1))
        return result

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(os, "stat", stat)
        store.save("c", _state(2))
    assert raced and not os.path.exists(canonical)
    assert store.model_path("d", h1).exists()  # d's own name of the copy
    _as_new_process()
    assert _is(other.load("d", reset_corrupt=False), 1) and _is(other.load("c", reset_corrupt=False), 2)
    _sweep_long_after(other)
    _as_new_process()
    assert _is(other.load("d", reset_corrupt=False), 1)
    other.save("d", _state(2))
    other.save("c", _state(2))
    _sweep_long_after(other)
    assert not [n for n in _files(root) if h1 in n]
    assert {n for n in _files(root) if n.startswith("models/")} == {
        f"models/{model_hash(_model(2))}.model", f"models/c.{model_hash(_model(2))}.model",
        f"models/d.{model_hash(_model(2))}.model"}
