"""The ClientApp's train handler, called in-process with real Flower Messages.

Checks the client side of the protocol: exact sync (dense, delta, set),
refusal to train on the wrong model, error feedback that loses nothing
(also when the server did not accept an update), and state that survives a
"restart" (a new process would only see the state folder).
"""

from __future__ import annotations

import json
import time

import pytest
import torch
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.app.metadata import Metadata

from fl_sparse import codec
from fl_sparse.clients.app import SyncError, local_update, run_train
from fl_sparse.clients import state as state_module
from fl_sparse.clients.state import ClientState, ClientStateStore, StateCorruptError
from fl_sparse.tasks.builtin import TaskSpec, get_task
from fl_sparse.flat import vector_hash
from fl_sparse.sparse import SparseTensor

NUM_PARTITIONS = 4


def _context(tmp_path, pid=1) -> Context:
    return Context(
        run_id=42,
        node_id=1000 + pid,
        node_config={"partition-id": pid, "num-partitions": NUM_PARTITIONS, "state-dir": str(tmp_path)},
        state=RecordDict(),
        run_config={},
    )


def _message(config: dict, sync=None) -> Message:
    content = RecordDict({"config": ConfigRecord(config)})
    if sync is not None:
        content["sync"] = sync
    meta = Metadata(
        run_id=42, message_id="m", src_node_id=0, dst_node_id=1001, reply_to_message_id="",
        group_id="1", created_at=time.time(), ttl=60.0, message_type="train",
    )
    return Message(content=content, metadata=meta)


def _task():
    return get_task(TaskSpec("fashion-mnist", "mlp-784-64-10", "iid", 0.5, NUM_PARTITIONS, 1, 0))


def _config(w: torch.Tensor, server_round: int, version: int, mode: str, base: int, **extra) -> dict:
    cfg = {
        "dataset": "fashion-mnist", "model": "mlp-784-64-10", "partition": "iid",
        "num-partitions": NUM_PARTITIONS, "seed": 0, "local-steps": 2, "batch-size": 10, "lr": 0.05,
        "server-round": server_round, "uplink": json.dumps({"name": "topk", "ratio": 0.01}),
        "uplink-values": "fp32", "uplink-positions": "rice", "model-version": version,
        "model-hash": vector_hash(w), "sync-mode": mode, "base-version": base, "accepted-round": -1,
    }
    cfg.update(extra)
    return cfg


def _w0() -> torch.Tensor:
    task = _task()
    return task.layout.flatten_state_dict(task.model.state_dict()).clone()


def test_error_feedback_keeps_everything_that_was_not_sent(tmp_path):
    ctx = _context(tmp_path)
    w0 = _w0()
    reply = run_train(_message(_config(w0, 1, 0, "dense", -1), codec.encode_dense(w0)), ctx)
    sent = codec.decode(reply.content.array_records["update"], w0.numel())
    store = ClientStateStore(tmp_path / "run-42")
    state = store.load("client-1")
    # e_1 = a_1 - s_1 and s_1 = Top_K(a_1): together they are the whole step, nothing lost.
    assert sent.nnz == int(torch.tensor(0.01 * w0.numel()).ceil())
    assert torch.all(state.error[sent.indices] == 0)
    a1 = state.error + sent.to_dense()
    assert float(a1.abs().max()) > 0
    kept = a1.abs()[state.error != 0]
    assert float(kept.max()) <= float(sent.values.abs().min())  # top-K really took the largest
    assert reply.content.config_records["client"]["model-hash"] == vector_hash(w0)
    assert state.steps_done == 2 and state.model_version == 0


def test_delta_and_set_syncs_reproduce_the_server_model_bit_for_bit(tmp_path):
    ctx = _context(tmp_path)
    w0 = _w0()
    run_train(_message(_config(w0, 1, 0, "dense", -1), codec.encode_dense(w0)), ctx)
    # The server applies an update ĝ_1 (here: some top-K vector) and sends it as a delta.
    g1 = SparseTensor.from_dense(torch.where(torch.rand(w0.numel()) < 0.01, torch.randn(w0.numel()), 0.0))
    w1 = w0.clone()
    g1.add_(w1, alpha=-1.0)
    reply = run_train(_message(_config(w1, 2, 1, "delta", 0, **{"accepted-round": 1}), codec.encode(g1)), ctx)
    assert reply.content.config_records["client"]["model-hash"] == vector_hash(w1)
    # Two rounds later it missed: overwrite the changed positions with the server's values.
    w3 = w1.clone()
    changed = torch.unique(torch.randint(0, w0.numel(), (500,)))
    w3[changed] += 0.5
    overwrite = SparseTensor(changed, w3[changed], w0.numel())
    reply = run_train(_message(_config(w3, 4, 3, "set", 1, **{"accepted-round": 2}), codec.encode(overwrite)), ctx)
    assert reply.content.config_records["client"]["model-hash"] == vector_hash(w3)


def test_client_refuses_a_sync_for_a_version_it_does_not_hold(tmp_path):
    ctx = _context(tmp_path)
    w0 = _w0()
    run_train(_message(_config(w0, 1, 0, "dense", -1), codec.encode_dense(w0)), ctx)
    g = SparseTensor(torch.tensor([0, 5]), torch.tensor([1.0, 2.0]), w0.numel())
    with pytest.raises(SyncError, match="version"):
        run_train(_message(_config(w0, 5, 4, "delta", 3), codec.encode(g)), ctx)
    with pytest.raises(SyncError, match="hash"):
        run_train(_message({**_config(w0, 2, 0, "none", 0), "model-hash": "bogus"}), ctx)


def test_an_update_the_server_did_not_accept_goes_back_into_the_error(tmp_path):
    ctx = _context(tmp_path)
    w0 = _w0()
    reply = run_train(_message(_config(w0, 1, 0, "dense", -1), codec.encode_dense(w0)), ctx)
    sent1 = codec.decode(reply.content.array_records["update"], w0.numel()).to_dense()
    store = ClientStateStore(tmp_path / "run-42")
    e1 = store.load("client-1").error.clone()
    # Round 2: the server says the last accepted round is -1 (round 1's reply was lost).
    reply2 = run_train(_message(_config(w0, 2, 0, "none", 0, **{"accepted-round": -1})), ctx)
    sent2 = codec.decode(reply2.content.array_records["update"], w0.numel()).to_dense()
    e2 = store.load("client-1").error
    # a_2 = (e_1 + s_1) + Δ_2, so e_2 + s_2 - Δ_2 == e_1 + s_1 (up to float rounding).
    task = _task()
    delta2 = e2 + sent2 - e1 - sent1
    assert float(delta2.abs().max()) > 0
    # Δ_2, recomputed independently from the same model and data order.

    step, _ = local_update(task, w0, ConfigRecord(_config(w0, 2, 0, "none", 0)), 2, torch.device("cpu"))
    torch.testing.assert_close(delta2, step, rtol=0, atol=1e-6)


def test_state_store_is_atomic_and_reports_corruption(tmp_path, monkeypatch):
    store = ClientStateStore(tmp_path)
    good = ClientState(model=torch.ones(3), model_version=2, error=torch.zeros(3), steps_done=5)
    store.save("c", good)

    def torn_write(state):  # half a file, then the disk fills up
        yield state_module.MAGIC
        raise OSError("disk full")

    monkeypatch.setattr(state_module, "encode_state", torn_write)
    with pytest.raises(OSError, match="disk full"):
        store.save("c", ClientState(model=torch.zeros(3), model_version=3))
    monkeypatch.undo()
    state_module._CACHE.drop(store.path("c"))  # read the file itself, not this process's cache
    loaded = store.load("c")
    assert loaded.model_version == 2 and torch.equal(loaded.model, torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["c.state"]  # no temp files left behind
    store.path("c").write_bytes(b"not a state file")
    with pytest.raises(StateCorruptError, match="c.state.*bad magic"):
        store.load("c")
    assert store.load("never-seen").model is None
