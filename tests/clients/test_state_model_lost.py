"""A client whose shared model copy is lost keeps everything else: its error memory, steps and bookkeeping.

With ``share_models`` the model copy lives in the model store (a version file
named by its hash, hard-linked per client) and the state file only names it.
If that version file is missing or its bytes do not hash to its name, only
the model copy is unusable: the state file verified fine. The load returns
the state without a model (``model=None``, ``model_version=-1``,
``model_lost`` saying why), leaves the state file where it is, and the mod
refuses a non-dense sync; the server drops that reply, sends the dense model
next time, and the client trains on with the error memory it had.
"""

from __future__ import annotations

import logging
import os

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from torch import nn

from fl_sparse import protocol
from fl_sparse.clients import SparseMod
from fl_sparse.clients import state as state_module
from fl_sparse.clients.mod import SyncError
from fl_sparse.clients.state import ClientState, ClientStateStore, StateCorruptError, model_hash
from fl_sparse.protocol import Instruction
from inprocess import InProcessGrid

# The model store's fixture and helpers (a fresh cache per test, a store sharing models, seeded models)
from test_mod_recovery import STRATEGIES, VictimHook  # noqa: E402  (N = 4 clients and VICTIM = 1 there too)
from test_state_models import D, _fresh_process_state, _model, _store  # noqa: E402,F401  (a fixture)


def _state(version: int, d: int = D) -> ClientState:
    gen = torch.Generator().manual_seed(version)
    return ClientState(
        model=_model(version, d),
        model_version=version,
        error=torch.randn(d, generator=gen),
        steps_done=10 + version,
        extra={
            "pending_indices": torch.tensor([3, 7, 11]),
            "pending_values": torch.randn(3, generator=gen),
            "pending_round": torch.tensor(version),
            "ssgd_mask": torch.arange(0, d, 9),
        },
    )


def _lose(store: ClientStateStore, key: str, digest: str) -> None:
    """Delete the client's link to the version and the version's own name (what a load can read)."""
    store.model_path(key, digest).unlink()
    store.canonical_model_path(digest).unlink()


def _corrupt_in_place(path) -> None:
    raw = bytearray(path.read_bytes())
    raw[100] ^= 0x10
    with open(path, "r+b") as fh:  # in place: every link to the file sees it
        fh.write(raw)


def _assert_kept(loaded: ClientState, saved: ClientState) -> None:
    """Everything but the model copy is as saved; the model is gone and no server version matches."""
    assert loaded.error is not None and torch.equal(loaded.error, saved.error), "error memory lost"
    assert loaded.steps_done == saved.steps_done
    assert loaded.extra.keys() == saved.extra.keys()
    for name, value in saved.extra.items():
        assert torch.equal(loaded.extra[name], value), name
    assert loaded.model is None and loaded.model_version == -1
    assert loaded.reset_reason is None  # not an empty state
    assert loaded.model_lost is not None


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


# ====================================================================== the store
def test_a_missing_version_file_loses_only_the_model_copy(tmp_path, caplog):
    store = _store(tmp_path)
    saved = _state(1)
    store.save("client-0", saved)
    _lose(store, "client-0", model_hash(_model(1)))
    state_module._CACHE.clear()  # another process: the load reads the files
    with caplog.at_level(logging.WARNING, logger="flwr"):
        loaded = store.load("client-0")
    _assert_kept(loaded, saved)
    assert "missing" in loaded.model_lost and "client-0.state" in loaded.model_lost
    path = store.path("client-0")
    assert path.exists() and store.corrupt_files("client-0") == []  # the state file stays
    messages = _warnings(caplog)
    assert any(str(path) in m and "missing" in m for m in messages), messages
    # The mod then dense-syncs and saves: a new, valid model reference, and all is as usual.
    loaded.model, loaded.model_version = _model(2), 2
    store.save("client-0", loaded)
    state_module._CACHE.clear()
    again = store.load("client-0", reset_corrupt=False)
    assert torch.equal(again.model, _model(2)) and again.model_version == 2 and again.model_lost is None
    assert torch.equal(again.error, saved.error) and again.steps_done == saved.steps_done
    assert store.model_path("client-0", model_hash(_model(2))).exists()


def test_a_missing_version_file_with_the_state_cached(tmp_path, caplog):
    """The state is in this process's cache, the version's bytes are not (evicted): the same outcome,
    and the cache hands out nothing stale afterwards."""
    store = _store(tmp_path)
    saved = _state(1)
    store.save("client-0", saved)
    digest = model_hash(_model(1))
    _lose(store, "client-0", digest)
    state_module._CACHE.drop((store._models_key, digest))
    with caplog.at_level(logging.WARNING, logger="flwr"):
        loaded = store.load("client-0", shared=True)
    _assert_kept(loaded, saved)
    assert store.path("client-0").exists() and store.corrupt_files("client-0") == []
    again = store.load("client-0", shared=True)  # nothing was saved: lost again, and says so again
    _assert_kept(again, saved)
    again.model, again.model_version = _model(2), 2
    again.error = again.error + 1  # the mod replaces tensors, never changes them in place
    store.save("client-0", again)
    latest = store.load("client-0")
    assert torch.equal(latest.model, _model(2)) and torch.equal(latest.error, saved.error + 1)
    state_module._CACHE.clear()
    assert torch.equal(store.load("client-0", reset_corrupt=False).error, saved.error + 1)


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_a_corrupt_version_file_loses_only_the_model_copies(tmp_path, caplog, damage):
    store = _store(tmp_path)
    saved = {k: _state(1) for k in ("client-0", "client-1")}
    saved["client-1"].error = saved["client-1"].error * 3
    for key, state in saved.items():
        store.save(key, state)
    digest = model_hash(_model(1))
    canonical = store.canonical_model_path(digest)
    if damage == "flip":
        _corrupt_in_place(canonical)
    else:
        with open(canonical, "r+b") as fh:
            fh.truncate(os.path.getsize(canonical) - 4)
    state_module._CACHE.clear()
    for key, state in saved.items():
        with caplog.at_level(logging.WARNING, logger="flwr"):
            loaded = store.load(key)
        _assert_kept(loaded, state)
        assert "model file" in loaded.model_lost
        assert store.path(key).exists() and store.corrupt_files(key) == []
        assert any(str(store.path(key)) in m and "model file" in m for m in _warnings(caplog))
    # The bad bytes are not handed to anyone again: the version's name and both links are gone.
    assert not canonical.exists()
    assert not any(store.model_path(key, digest).exists() for key in saved)
    store.save("client-2", _state(1))  # a new holder writes the version afresh
    state_module._CACHE.clear()
    assert torch.equal(store.load("client-2", reset_corrupt=False).model, _model(1))


def test_a_corrupt_private_link_leaves_the_version_file_to_its_other_holders(tmp_path):
    store = _store(tmp_path)
    saved = _state(1)
    store.save("client-0", saved)
    store.save("client-1", _state(1))
    digest = model_hash(_model(1))
    link = store.model_path("client-0", digest)
    bad = bytearray(link.read_bytes())
    bad[0] ^= 1
    link.unlink()
    link.write_bytes(bytes(bad))  # a file of its own under client-0's name
    state_module._CACHE.clear()
    _assert_kept(store.load("client-0"), saved)
    assert not link.exists() and store.canonical_model_path(digest).exists()
    assert torch.equal(store.load("client-1").model, _model(1))


def test_the_error_memory_is_widened_as_usual_when_the_model_is_lost(tmp_path):
    store = _store(tmp_path, error_dtype="float16")
    saved = _state(1)
    store.save("client-0", saved)
    _lose(store, "client-0", model_hash(_model(1)))
    state_module._CACHE.clear()
    loaded = store.load("client-0")
    assert loaded.error.dtype == torch.float32
    assert torch.equal(loaded.error, saved.error.half().float())


def test_strict_load_of_a_lost_model_still_raises_and_leaves_the_files(tmp_path):
    store = _store(tmp_path)
    store.save("client-0", _state(1))
    _lose(store, "client-0", model_hash(_model(1)))
    state_module._CACHE.clear()
    with pytest.raises(StateCorruptError, match="missing"):
        store.load("client-0", reset_corrupt=False)
    assert store.path("client-0").exists() and store.corrupt_files("client-0") == []


def test_a_corrupt_state_file_is_still_reset(tmp_path):
    """The other case is unchanged: a state file that does not verify is moved aside, the state empty."""
    store = _store(tmp_path)
    store.save("client-0", _state(1))
    path = store.path("client-0")
    path.write_bytes(path.read_bytes()[:-10])
    state_module._CACHE.clear()
    loaded = store.load("client-0")
    assert loaded.reset_reason is not None and loaded.model_lost is None
    assert loaded.error is None and loaded.model is None and not loaded.extra
    assert not path.exists() and store.corrupt_files("client-0")


# ====================================================================== end to end: strategy, mod, store
N = 4
ROUNDS = 6
VICTIM = 1
LOST_AFTER = 2  # the victim's model version file is damaged after its reply in this round


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, 16)
        self.fc2 = nn.Linear(16, 3)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


class Recording(SparseMod):
    """The real mod; it notes the state each train-phase message found (after the load)."""

    def __init__(self, **kw) -> None:
        super().__init__(**kw)
        self.opened: dict[tuple[int, int, str], ClientState] = {}

    def _open(self, context, instr):
        session = super()._open(context, instr)
        st = session.state
        self.opened[(int(context.node_config["partition-id"]), instr.server_round, instr.phase)] = ClientState(
            model=None if st.model is None else st.model.clone(),
            model_version=st.model_version,
            error=None if st.error is None else st.error.clone(),
            steps_done=st.steps_done,
        )
        return session


def _app(mod: SparseMod, fail: set[tuple[int, int]]) -> ClientApp:
    app = ClientApp(mods=[mod])

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        pid = int(context.node_config["partition-id"])
        round_ = int(msg.content["config"]["server-round"])
        if (pid, round_) in fail:
            raise RuntimeError("this client fails this round")
        model = Net()
        model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
        gen = torch.Generator().manual_seed(100 * round_ + pid)
        n = 16 + 12 * pid  # unequal weights
        x, y = torch.randn(n, 6, generator=gen), torch.randint(0, 3, (n,), generator=gen)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        for _ in range(2):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
        content = RecordDict({"arrays": ArrayRecord(model.state_dict()), "metrics": MetricRecord({"num-examples": n})})
        return Message(content=content, reply_to=msg)

    return app


class Lose(VictimHook):
    """After the victim's last reply of round ``LOST_AFTER``, damage its model version file."""

    def __init__(self, grid_ref: list, root, how: str | None) -> None:
        super().__init__(grid_ref)
        self.root, self.how = root, how
        self.error_before: torch.Tensor | None = None

    def damage(self, server_round: int, reply: Message) -> Message:
        if server_round != LOST_AFTER:
            return reply
        store = ClientStateStore(next(self.root.glob("gen-*")), durable=False, share_models=True)
        key = f"client-{VICTIM}"
        state = store.load(key, reset_corrupt=False)
        self.error_before = state.error.clone()
        digest = model_hash(state.model)
        link = store.model_path(key, digest)
        assert link.exists() and os.stat(link).st_nlink == N + 1  # every client and the version's name
        if self.how == "missing":
            _lose(store, key, digest)
        elif self.how == "corrupt":  # a damaged file of the victim's own under its name
            bad = bytearray(link.read_bytes())
            bad[8] ^= 0x40
            link.unlink()
            link.write_bytes(bytes(bad))
        return reply


def _run(tmp_path, monkeypatch, name: str, how: str | None, fail: set[tuple[int, int]] = frozenset()):
    # No in-process cache: every load reads the files, as another Ray actor does.
    monkeypatch.setenv("FL_SPARSE_STATE_CACHE_MB", "0")
    mod = Recording(share_models=True)  # the model store, as in a simulation
    ref: list = []
    hook = Lose(ref, tmp_path, how)
    grid = InProcessGrid(_app(mod, set(fail)), N, node_config=lambda i: {"state-dir": str(tmp_path)}, tamper=hook)
    ref.append(grid)
    strategy = STRATEGIES[name]()
    torch.manual_seed(0)
    initial = ArrayRecord(Net().state_dict())
    result = strategy.start(grid, initial, num_rounds=ROUNDS, train_config=ConfigRecord({"lr": 0.1}))
    return strategy, result, hook, mod


def _floats(arrays: ArrayRecord) -> torch.Tensor:
    return torch.cat([torch.as_tensor(a.numpy()).reshape(-1).double() for a in arrays.values()])


@pytest.mark.parametrize("how", ["missing", "corrupt"])
@pytest.mark.parametrize("name", list(STRATEGIES))
def test_a_lost_model_copy_costs_one_reply_and_keeps_the_error_memory(name, how, tmp_path, monkeypatch):
    strategy, result, hook, mod = _run(tmp_path / "lost", monkeypatch, name, how)
    failed, recovered = LOST_AFTER + 1, LOST_AFTER + 2
    rm = strategy.state.round_metrics
    for r in range(1, ROUNDS + 1):
        expected = 1 if r == failed else 0
        assert rm[r]["failures"] == expected and rm[r]["accepted"] == N - expected, (r, rm[r])
    # The victim refused the sync it could not apply, saying why, once; then it was sent the dense model.
    assert sorted(hook.errors) == [failed], hook.errors
    assert SyncError.__name__ in hook.errors[failed] and "model copy" in hook.errors[failed], hook.errors
    assert "has been reset" not in hook.errors[failed]
    assert hook.syncs[failed] != "dense" and hook.syncs[recovered] == "dense", hook.syncs
    # At recovery the victim had no model and the error memory of before the loss (nonzero).
    phase = protocol.PHASE_TRAIN if name == "bidirectional-topk" else protocol.PHASE_VOTE
    found = mod.opened[(VICTIM, recovered, phase)]
    assert found.model is None and found.model_version == -1
    assert hook.error_before is not None and hook.error_before.abs().sum() > 0
    assert found.error is not None and torch.equal(found.error, hook.error_before)
    # Its state file was never moved aside, and it holds its model copy through a valid link again.
    key = f"client-{VICTIM}"
    store = ClientStateStore(next((tmp_path / "lost").glob("gen-*")), durable=False, share_models=True)
    assert store.corrupt_files(key) == []
    final = store.load(key, reset_corrupt=False)
    assert final.model is not None and store.model_path(key, model_hash(final.model)).exists()

    # The same run in which the victim simply failed that round ends with exactly the same model,
    # and the victim with exactly the same state.
    _, reference, ref_hook, _ = _run(tmp_path / "reference", monkeypatch, name, None, fail={(VICTIM, failed)})
    assert sorted(ref_hook.errors) == [failed]
    assert torch.equal(_floats(result.arrays), _floats(reference.arrays))
    ref_store = ClientStateStore(next((tmp_path / "reference").glob("gen-*")), durable=False, share_models=True)
    expected = ref_store.load(key, reset_corrupt=False)
    assert final.model_version == expected.model_version and torch.equal(final.model, expected.model)
    assert torch.equal(final.error, expected.error) and final.steps_done == expected.steps_done


def test_the_mod_refuses_a_non_dense_sync_for_a_lost_model(tmp_path, monkeypatch):
    """SparseMod._open, directly: a state whose model copy was lost needs a dense sync."""
    monkeypatch.setenv("FL_SPARSE_STATE_CACHE_MB", "0")
    mod = SparseMod(state_dir=tmp_path, share_models=True, durable=False)
    context = Context(run_id=7, node_id=5, node_config={"partition-id": 0}, state=RecordDict(), run_config={})
    instr = Instruction(server_round=3, sync_mode="delta", base_version=2, model_version=3, generation="g")
    session = mod._open(context, instr)
    saved = _state(2)
    session.state.model, session.state.model_version = saved.model, 2
    session.state.error, session.state.steps_done = saved.error, saved.steps_done
    session.save()
    _lose(session.store, session.key, model_hash(saved.model))
    with pytest.raises(SyncError, match="model copy"):
        mod._open(context, instr)
    dense = Instruction(server_round=3, sync_mode="dense", model_version=3, generation="g")
    reopened = mod._open(context, dense)
    assert reopened.state.model is None and torch.equal(reopened.state.error, saved.error)
    assert session.store.path(session.key).exists()
