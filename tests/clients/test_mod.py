"""SparseMod, the client side of the fl-sparse protocol, driven with real Flower Messages.

The mod is called as Flower calls a client mod, ``SparseMod()(msg, context,
call_next)``, in front of a user train function written in Flower's
quickstart style (its own small torch model with a BatchNorm layer, so the
state holds the integer buffer ``num_batches_tracked``). The server's side is
written out in this file (its model vector, versions and sync payloads), and
every expectation comes from an independent oracle computed here: the step is
``w − w_trained`` from the arrays the user function really returned, top-K is
``torch.topk`` of ``|a|``, the error memory is replayed by hand.
"""

from __future__ import annotations

import itertools
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Error, Message, MessageType, MetricRecord, RecordDict
from flwr.app.metadata import Metadata
from flwr.clientapp import ClientApp
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from fl_sparse import codec, protocol
from fl_sparse.clients import state as state_module
from fl_sparse.clients.mod import SparseMod, SyncError, client_key
from fl_sparse.clients.state import ClientStateStore
from fl_sparse.flat import FlatLayout, vector_hash
from fl_sparse.protocol import Instruction, Report, UplinkMetrics
from fl_sparse.sparse import SparseTensor

RUN_ID = 11
PID = 3
K = 6
TOPK = {"name": "topk", "k": K}
IDENTITY = {"name": "none"}
_ids = itertools.count(1)


# ====================================================================== the user's side
class Net(nn.Module):
    """A user's model: float weights, float BatchNorm buffers and an int64 ``num_batches_tracked``."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(5, 8)
        self.bn = nn.BatchNorm1d(8)
        self.fc2 = nn.Linear(8, 3)

    def forward(self, x):
        return self.fc2(torch.relu(self.bn(self.fc1(x))))


D = sum(p.numel() for n, p in Net().state_dict().items() if p.is_floating_point())  # 107 floats


class QuickstartTrain:
    """A plain Flower train function (nothing sparse), recording what it saw and returned.

    Its data depend on the round and the partition unless ``fixed_data`` is set.
    """

    def __init__(self, *, steps: int = 2, examples: int = 24, fixed_data: bool = False) -> None:
        self.steps, self.examples, self.fixed_data = steps, examples, fixed_data
        self.received: list[Message] = []
        self.returned: list[Message] = []
        self.rounds: list[int] = []  # the config's server-round at call time

    def __call__(self, msg: Message, context: Context) -> Message:
        self.received.append(msg)
        config = msg.content["config"]
        self.rounds.append(int(config["server-round"]))
        model = Net()
        model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
        model.train()
        seed = 99 if self.fixed_data else 1000 * int(config["server-round"]) + int(context.node_config["partition-id"])
        gen = torch.Generator().manual_seed(seed)
        x = torch.randn(self.examples, 5, generator=gen)
        y = torch.randint(0, 3, (self.examples,), generator=gen)
        optimizer = torch.optim.SGD(model.parameters(), lr=float(config["lr"]))
        for _ in range(self.steps):
            loss = nn.functional.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        content = RecordDict(
            {
                "arrays": ArrayRecord(model.state_dict()),
                "metrics": MetricRecord({"num-examples": self.examples, "train-loss": loss.item()}),
            }
        )
        reply = Message(content=content, reply_to=msg)
        self.returned.append(reply)
        return reply

    @property
    def calls(self) -> int:
        return len(self.received)

    def last_step(self, w: torch.Tensor) -> torch.Tensor:
        """Oracle Δ = w − w_trained of the last call, from the arrays the function returned."""
        return w - flat(self.returned[-1].content["arrays"])


def _array(nd: np.ndarray) -> Array:
    return Array(np.require(nd, requirements="C"))


def initial_arrays(seed: int = 0) -> ArrayRecord:
    torch.manual_seed(seed)
    return ArrayRecord(Net().state_dict())


# ====================================================================== the server's side (written out)
def flat(record: ArrayRecord) -> torch.Tensor:
    """Oracle flat vector: the float arrays in record order, as float32."""
    parts = [
        torch.from_numpy(np.asarray(a.numpy(), dtype=np.float32).copy()).reshape(-1)
        for a in record.values()
        if np.issubdtype(a.numpy().dtype, np.floating)
    ]
    return torch.cat(parts)


def exact_arrays(record: ArrayRecord) -> ArrayRecord:
    """The integer arrays of a record (what the server sends whole)."""
    return ArrayRecord({k: a for k, a in record.items() if not np.issubdtype(a.numpy().dtype, np.floating)})


def user_config(server_round: int, **extra) -> ConfigRecord:
    return ConfigRecord({"lr": 0.3, "server-round": server_round, "note": "mine", "sizes": [1, 2, 3], **extra})


def metadata(message_type: str = MessageType.TRAIN) -> Metadata:
    return Metadata(
        run_id=RUN_ID,
        message_id=f"msg-{next(_ids)}",
        src_node_id=0,
        dst_node_id=500 + PID,
        reply_to_message_id="",
        group_id="g",
        created_at=time.time(),
        ttl=600.0,
        message_type=message_type,
    )


class Server:
    """The server's model vector ``w``, its version and the messages it sends (as a strategy would)."""

    def __init__(self, arrays: ArrayRecord) -> None:
        self.arrays = arrays
        self.layout_json = FlatLayout.from_arrayrecord(arrays).to_json()
        self.w = flat(arrays)
        self.exact = exact_arrays(arrays)
        self.version = 0

    def instruction(self, server_round: int, *, sync_mode: str = "none", uplink=TOPK, **fields) -> Instruction:
        return Instruction(
            server_round=server_round,
            model_version=self.version,
            model_hash=vector_hash(self.w),
            sync_mode=sync_mode,
            layout=self.layout_json if sync_mode == "dense" else "",
            uplink=json.dumps(uplink),
            **fields,
        )

    def message(self, server_round: int, *, sync_mode: str = "none", sync: ArrayRecord | None = None, config=None, **fields):
        instr = self.instruction(server_round, sync_mode=sync_mode, **fields)
        if sync_mode == "dense" and sync is None:
            sync = codec.encode_dense(self.w)
        content = RecordDict({"config": config or user_config(server_round), protocol.RECORD: instr.to_record()})
        if sync is not None:
            content[protocol.SYNC] = sync
        if len(self.exact):
            content[protocol.EXACT] = self.exact
        return Message(content=content, metadata=metadata())

    def values_message(self, server_round: int, mask: torch.Tensor, *, vote_k: int = K) -> Message:
        instr = Instruction(
            server_round=server_round,
            phase=protocol.PHASE_VALUES,
            model_version=self.version,
            model_hash=vector_hash(self.w),
            vote_k=vote_k,
        )
        content = RecordDict({protocol.RECORD: instr.to_record(), protocol.MASK: codec.encode_positions(mask, D)})
        return Message(content=content, metadata=metadata())

    def subtract(self, g: SparseTensor) -> ArrayRecord:
        """w ← w − g (the server's exact operation); returns the delta payload."""
        record = codec.encode(g)
        decoded = codec.decode(record, D)
        self.w = self.w.clone()
        self.w[decoded.indices] -= decoded.values
        self.version += 1
        return record


class Client:
    """One node: its context (partition PID, its own state folder), a SparseMod and the user's function."""

    def __init__(self, state_dir: Path, train=None, *, pid: int = PID, mod: SparseMod | None = None) -> None:
        self.state_dir = Path(state_dir)
        self.context = Context(
            run_id=RUN_ID,
            node_id=500 + pid,
            node_config={"partition-id": pid, "num-partitions": 8, "state-dir": str(state_dir)},
            state=RecordDict(),
            run_config={},
        )
        self.train = train or QuickstartTrain()
        self.mod = mod or SparseMod()

    def send(self, msg: Message) -> Message:
        return self.mod(msg, self.context, self.train)

    def stored(self):
        return ClientStateStore(self.state_dir / f"run-{RUN_ID}").load(client_key(self.context))

    def state_file(self) -> Path:
        return self.state_dir / f"run-{RUN_ID}" / f"{client_key(self.context)}.state"


def sent_update(reply: Message) -> SparseTensor:
    assert not reply.has_error(), reply.error
    return codec.decode(reply.content.array_records[protocol.UPDATE], D)


def topk_oracle(a: torch.Tensor, k: int = K) -> torch.Tensor:
    return torch.topk(a.abs(), k).indices.sort().values


def bits(x: torch.Tensor) -> torch.Tensor:
    """The float32 bit patterns (so -0.0 and 0.0 differ): bit-for-bit comparisons."""
    return x.contiguous().view(torch.int32)


def assert_bitwise(x: torch.Tensor, y: torch.Tensor) -> None:
    assert x.shape == y.shape and x.dtype == y.dtype == torch.float32
    assert torch.equal(bits(x), bits(y)), f"max |diff| {float((x - y).abs().max())}"


@pytest.fixture
def server():
    return Server(initial_arrays())


@pytest.fixture
def client(tmp_path):
    return Client(tmp_path)


# ====================================================================== sync
def test_dense_sync_hands_the_user_the_servers_model_bit_for_bit(server, client):
    # The server's w is not the user's fresh init: it can only have come from the sync payload.
    server.w = server.w + torch.linspace(-1, 1, D)
    server.exact = ArrayRecord({"bn.num_batches_tracked": _array(np.array(5, np.int64))})
    reply = client.send(server.message(1, sync_mode="dense"))
    got = client.train.received[0].content["arrays"]
    assert_bitwise(flat(got), server.w)
    assert got["bn.num_batches_tracked"].numpy() == 5
    report = Report.read(reply.content)
    assert report == Report(
        server_round=1, model_version=0, model_hash=vector_hash(server.w), client_key=f"client-{PID}", partition_id=PID
    )
    assert client.state_file().is_file()
    state = client.stored()
    assert state.model_version == 0 and torch.equal(state.model, server.w)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_delta_and_set_syncs_reproduce_the_servers_model_bit_for_bit(server, tmp_path, seed):
    client = Client(tmp_path)
    rng = torch.Generator().manual_seed(seed)
    client.send(server.message(1, sync_mode="dense"))
    # delta: the client holds version 0, the server moved to version 1 by ĝ_1
    positions = torch.randperm(D, generator=rng)[:9].sort().values
    g1 = SparseTensor(positions, torch.randn(9, generator=rng) * 1e-3, D)
    delta = server.subtract(g1)
    reply = client.send(server.message(2, sync_mode="delta", sync=delta, base_version=0, accepted_round=1))
    assert_bitwise(flat(client.train.received[-1].content["arrays"]), server.w)
    assert Report.read(reply.content).model_version == server.version == 1
    # set: the client missed two versions; the server overwrites the positions that changed
    base = server.version
    changed = torch.randperm(D, generator=rng)[:20].sort().values
    w3 = server.w.clone()
    w3[changed] = torch.randn(20, generator=rng)
    server.w, server.version = w3, 3
    payload = codec.encode(SparseTensor(changed, w3[changed], D))
    reply = client.send(server.message(4, sync_mode="set", sync=payload, base_version=base, accepted_round=2))
    assert_bitwise(flat(client.train.received[-1].content["arrays"]), w3)
    assert Report.read(reply.content).model_hash == vector_hash(w3)
    assert client.stored().model_version == 3


def test_a_client_takes_the_version_another_client_in_its_process_synced_to(server, tmp_path, monkeypatch):
    """Shared model store (the simulation's): the second client's sync is not decoded again, the result is the same."""
    clients = [Client(tmp_path, pid=p, mod=SparseMod(share_models=True, durable=False)) for p in (1, 2, 3)]
    for c in clients:
        c.send(server.message(1, sync_mode="dense"))
    delta = server.subtract(SparseTensor(torch.tensor([0, 7, 30]), torch.tensor([0.5, -0.25, 0.125]), D))
    decoded, real_decode = [], codec.decode
    monkeypatch.setattr(codec, "decode", lambda record, *a, **k: decoded.append(record) or real_decode(record, *a, **k))
    for c in clients[:2]:
        reply = c.send(server.message(2, sync_mode="delta", sync=delta, base_version=0, accepted_round=1))
        assert_bitwise(flat(c.train.received[-1].content["arrays"]), server.w)
        assert Report.read(reply.content).model_hash == vector_hash(server.w)
    assert sum(record is delta for record in decoded) == 1  # the first client decoded it, the second took its copy
    # A client that does not hold the sync's base version is refused as before, though the target is at hand.
    w1 = server.w.clone()
    delta2 = server.subtract(SparseTensor(torch.tensor([3]), torch.tensor([1.0]), D))
    clients[0].send(server.message(3, sync_mode="delta", sync=delta2, base_version=1, accepted_round=2))
    with pytest.raises(SyncError, match="version 1, client holds 0"):
        clients[2].send(server.message(3, sync_mode="delta", sync=delta2, base_version=1, accepted_round=1))
    # The shared copies were only read: each version still hashes to its name.
    store = ClientStateStore(tmp_path / f"run-{RUN_ID}", share_models=True)
    for w in (w1, server.w):
        assert vector_hash(store.shared_model(vector_hash(w), D)) == vector_hash(w)


def test_clients_in_one_process_share_the_models_bytes_not_their_records(server, tmp_path):
    """Shared folder: a round's clients get Arrays whose bytes are made once; what one train function changes, no other sees."""

    class Meddling(QuickstartTrain):
        def __init__(self) -> None:
            super().__init__()
            self.models, self.buffers = [], []

        def __call__(self, msg, context):
            arrays = msg.content["arrays"]
            self.models.append(flat(arrays))
            floats = [name for name in arrays.keys() if np.issubdtype(np.dtype(arrays[name].dtype), np.floating)]
            self.buffers.append([id(arrays[name].data) for name in floats])
            reply = super().__call__(msg, context)
            for name in list(arrays.keys()):
                arrays[name].data = b"meddled"  # an Array changed in place
            del arrays[next(iter(arrays.keys()))]  # and the record itself
            return reply

    mod = SparseMod(share_models=True, durable=False)  # one mod: the clients of one process
    clients = [Client(tmp_path, Meddling(), pid=p, mod=mod) for p in (1, 2, 3)]
    for c in clients:
        c.send(server.message(1, sync_mode="dense"))
    w0 = server.w.clone()
    delta = server.subtract(SparseTensor(torch.tensor([0, 7, 30]), torch.tensor([0.5, -0.25, 0.125]), D))
    for c in clients:
        reply = c.send(server.message(2, sync_mode="delta", sync=delta, base_version=0, accepted_round=1))
        assert not reply.has_error()
    for t, w in enumerate((w0, server.w)):
        for c in clients:
            assert_bitwise(c.train.models[t], w)
        buffers = [c.train.buffers[t] for c in clients]
        assert buffers[0] == buffers[1] == buffers[2]  # the float arrays' bytes: made once per version


def test_a_sync_from_the_wrong_base_version_raises_and_changes_nothing(server, client):
    client.send(server.message(1, sync_mode="dense"))  # the client holds version 0
    w0 = server.w.clone()
    g = SparseTensor(torch.tensor([0, 7]), torch.tensor([0.5, -0.25]), D)
    wrong = [  # (mode, fields, the server's version, what the error must say)
        ("delta", dict(sync=codec.encode(g), base_version=1), 2, "version 1.*holds 0"),  # delta from version 1
        ("set", dict(sync=codec.encode(g), base_version=2), 3, "version 2.*holds 0"),
        ("none", {}, 5, "version 5.*holds 0"),  # "you hold version 5"
        ("delta", {}, 1, "payload"),  # no payload
        ("dense", dict(sync=None), 1, "payload"),
        ("values", dict(sync=codec.encode_values(torch.ones(2)), base_version=0, mask_round=1), 1, "mask"),
    ]
    calls = client.train.calls
    for mode, fields, version, reason in wrong:
        server.version = version
        msg = server.message(2, sync_mode=mode, **fields)
        if mode == "dense":
            del msg.content[protocol.SYNC]
        with pytest.raises(SyncError, match=reason):  # refused for that reason, not only by the hash check
            client.send(msg)
    assert client.train.calls == calls  # never trained on a wrong model
    # the failures left the stored state as it was: version 0 still syncs with "none"
    server.w, server.version = w0, 0
    client.send(server.message(2, accepted_round=1))
    assert_bitwise(flat(client.train.received[-1].content["arrays"]), w0)


def test_a_fresh_client_needs_a_dense_sync(server, client):
    with pytest.raises(SyncError, match="dense sync"):
        client.send(server.message(1, sync_mode="none"))
    g = SparseTensor(torch.tensor([1]), torch.tensor([1.0]), D)
    with pytest.raises(SyncError):
        client.send(server.message(1, sync_mode="delta", sync=codec.encode(g), base_version=0))
    assert client.train.calls == 0 and not client.state_file().exists()


def test_a_model_hash_mismatch_raises(server, client):
    msg = server.message(1, sync_mode="dense")
    instr = Instruction.read(msg.content)
    ulp = torch.nextafter(server.w, torch.full_like(server.w, 10.0))
    msg.content[protocol.RECORD] = Instruction(**{**instr.__dict__, "model_hash": vector_hash(ulp)}).to_record()
    with pytest.raises(SyncError, match="hash"):
        client.send(msg)
    assert client.train.calls == 0
    # a delta that does not lead to the server's model is refused too
    client.send(server.message(1, sync_mode="dense"))
    g = SparseTensor(torch.tensor([3]), torch.tensor([0.125]), D)
    payload = codec.encode(g)
    server.subtract(SparseTensor(torch.tensor([3]), torch.tensor([0.25]), D))  # not what the payload says
    with pytest.raises(SyncError, match="hash"):
        client.send(server.message(2, sync_mode="delta", sync=payload, base_version=0))


# ====================================================================== what the user sees
def test_the_user_sees_the_servers_arrays_and_its_own_records_only(server, client):
    initial = server.arrays
    config = user_config(1)
    extra = MetricRecord({"mine": 1.5})
    msg = server.message(1, sync_mode="dense", config=config)
    msg.content["user-extra"] = extra
    client.send(msg)
    (seen,) = client.train.received
    assert set(seen.content.keys()) == {"config", "user-extra", "arrays"}
    assert not any(protocol.is_protocol_key(k) for k in seen.content.keys())
    assert seen.content["config"] == ConfigRecord({"lr": 0.3, "server-round": 1, "note": "mine", "sizes": [1, 2, 3]})
    assert dict(seen.content["user-extra"]) == {"mine": 1.5}
    assert seen.metadata.message_type == MessageType.TRAIN and seen.metadata.message_id == msg.metadata.message_id
    arrays = seen.content["arrays"]
    assert list(arrays.keys()) == list(initial.keys())
    for name in initial:
        got, want = arrays[name].numpy(), initial[name].numpy()
        assert got.shape == want.shape and got.dtype == want.dtype, name
        assert got.tobytes() == want.tobytes(), name
    assert arrays["bn.num_batches_tracked"].numpy().dtype == np.int64
    assert arrays["bn.num_batches_tracked"].numpy().shape == ()
    # the message the mod received is not changed
    assert protocol.RECORD in msg.content and "arrays" not in msg.content


def test_the_arrays_key_is_the_servers_choice(server, tmp_path):
    returned = []

    def train(msg, context):
        assert "arrays" not in msg.content
        arrays = msg.content["weights"]
        shifted = {k: (a.numpy() - 0.5 if a.numpy().dtype.kind == "f" else a.numpy()) for k, a in arrays.items()}
        returned.append(ArrayRecord({k: _array(v) for k, v in shifted.items()}))
        return Message(RecordDict({"weights": returned[-1], "metrics": MetricRecord({"num-examples": 2})}), reply_to=msg)

    reply = Client(tmp_path, train).send(server.message(1, sync_mode="dense", arrays_key="weights", uplink=IDENTITY))
    assert "weights" not in reply.content and protocol.UPDATE in reply.content
    assert_bitwise(sent_update(reply).to_dense(), server.w - flat(returned[0]))


# ====================================================================== the reply
def test_the_reply_carries_the_update_the_exact_arrays_and_the_users_metrics(server, client):
    server.exact = ArrayRecord({"bn.num_batches_tracked": _array(np.array(5, np.int64))})
    reply = client.send(server.message(1, sync_mode="dense"))
    returned = client.train.returned[0].content
    content = reply.content
    assert "arrays" not in content
    assert set(content.keys()) == {"metrics", protocol.UPDATE, protocol.METRICS, protocol.EXACT, protocol.RECORD}
    assert content["metrics"] == returned["metrics"]  # the user's metrics, unchanged
    assert dict(content["metrics"]) == {"num-examples": 24, "train-loss": returned["metrics"]["train-loss"]}
    # the integer buffer comes back whole: the server sent 5, the user trained 2 steps
    exact = content[protocol.EXACT]
    assert list(exact.keys()) == ["bn.num_batches_tracked"]
    nbt = exact["bn.num_batches_tracked"].numpy()
    assert nbt.dtype == np.int64 and nbt.shape == () and int(nbt) == 7
    # the update holds the float arrays only, compressed
    step = client.train.last_step(server.w)
    sent = sent_update(reply)
    assert sent.numel == D and sent.nnz == K
    assert torch.equal(sent.indices, topk_oracle(step))
    assert_bitwise(sent.values, step[sent.indices])
    m = UplinkMetrics.read(content)
    assert m.density == K / D
    assert m.uplink_bytes == sum(len(a.data) for a in content[protocol.UPDATE].values())
    rest = step.clone()
    rest[sent.indices] = 0
    assert m.error_norm == pytest.approx(float(rest.norm()), rel=1e-6)
    assert m.compression_error == pytest.approx(float(rest.norm()) ** 2, rel=1e-6)


def test_the_reply_echoes_the_nonce(server, client):
    reply = client.send(server.message(1, sync_mode="dense", nonce="n-42"))
    assert Report.read(reply.content).nonce == "n-42"
    values = client.send(server.message(2, accepted_round=1, phase=protocol.PHASE_VOTE, vote_k=K, nonce="n-43"))
    assert Report.read(values.content).nonce == "n-43"
    instr = Instruction(server_round=0, phase=protocol.PHASE_IDENTIFY, nonce="n-44")
    ident = client.send(Message(RecordDict({protocol.RECORD: instr.to_record()}), metadata=metadata()))
    assert Report.read(ident.content).nonce == "n-44"


@pytest.mark.parametrize("same_run", [True, False])
def test_a_new_strategy_run_starts_with_an_empty_error_memory(server, client, same_run):
    """``generation`` names the strategy's run: a new one forgets the error and the unconfirmed update."""
    r1 = client.send(server.message(1, sync_mode="dense", generation="run-a"))
    a1 = client.train.last_step(server.w)
    assert float((a1 - sent_update(r1).to_dense()).abs().sum()) > 0
    # round 1's reply was never accepted: within the same run all of a_1 comes back into the error
    r2 = client.send(server.message(2, sync_mode="dense", generation="run-a" if same_run else "run-b", uplink=IDENTITY))
    step = client.train.last_step(server.w)
    assert_bitwise(sent_update(r2).to_dense(), step + a1 if same_run else step)


def test_a_resumed_run_under_a_new_flower_run_id_keeps_the_error_memory(server, client):
    """State is keyed by the strategy's generation: a resumed ``flwr run`` (new run id) finds it."""
    r1 = client.send(server.message(1, sync_mode="dense", generation="g1"))
    a1 = client.train.last_step(server.w)
    assert (client.state_dir / "gen-g1" / f"{client_key(client.context)}.state").is_file()
    client.context.run_id = RUN_ID + 1  # the server process died; `flwr run` again with --resume
    r2 = client.send(server.message(2, sync_mode="dense", generation="g1", uplink=IDENTITY))
    step = client.train.last_step(server.w)
    # round 1's update was never accepted, so all of a_1 comes back: the memory was found
    assert_bitwise(sent_update(r2).to_dense(), step + a1)
    assert sorted(p.name for p in client.state_dir.iterdir()) == ["gen-g1"]
    del r1


def test_a_round_sent_again_gets_the_first_tries_update_and_leaves_the_error_memory_as_one_try(server, tmp_path):
    """A server resumed from a checkpoint taken before the round it died in sends that round again.

    A client that trained it already sends the update it sent the first time (the round's
    step is in its error memory: taking it again counted the round twice), and then goes on
    exactly as a client that trained the round once.
    """
    once, twice = Client(tmp_path / "once"), Client(tmp_path / "twice")
    r1 = once.send(server.message(1, sync_mode="dense"))
    first = sent_update(twice.send(server.message(1, sync_mode="dense")))
    again = twice.send(server.message(1, sync_mode="dense"))  # the resumed server: dense model, nothing accepted
    assert twice.train.calls == 2 and again.content["metrics"] == twice.train.returned[1].content["metrics"]
    assert torch.equal(sent_update(again).indices, first.indices)
    assert_bitwise(sent_update(again).values, first.values)
    delta = server.subtract(sent_update(r1))
    r2_once = once.send(server.message(2, sync_mode="delta", sync=delta, base_version=0, accepted_round=1))
    r2_twice = twice.send(server.message(2, sync_mode="delta", sync=delta, base_version=0, accepted_round=1))
    assert torch.equal(sent_update(r2_twice).indices, sent_update(r2_once).indices)
    assert_bitwise(sent_update(r2_twice).values, sent_update(r2_once).values)
    assert_bitwise(twice.stored().error, once.stored().error)


@pytest.mark.parametrize("uplink, message", [
    ({"name": "no-such-compressor"}, "unknown compressor 'no-such-compressor'"),
    ({"name": "topk", "ratio": 2.0}, "compressor 'topk'"),
])
def test_a_bad_uplink_spec_is_named_before_the_user_trains(server, client, uplink, message):
    """The round's compressor is built before the train function runs: training for nothing is not done."""
    client.send(server.message(1, sync_mode="dense"))
    before = client.stored()
    with pytest.raises(ValueError, match=message):
        client.send(server.message(2, sync_mode="dense", uplink=uplink))
    assert client.train.calls == 1
    after = client.stored()
    assert after.steps_done == before.steps_done and torch.equal(after.error, before.error)


def test_extra_user_records_in_the_reply_pass_through(server, tmp_path):
    train = QuickstartTrain()

    def with_notes(msg, context):
        reply = train(msg, context)
        reply.content["notes"] = ConfigRecord({"device": "cpu"})
        reply.content["more-metrics"] = MetricRecord({"acc": 0.5})
        return reply

    reply = Client(tmp_path, with_notes).send(server.message(1, sync_mode="dense"))
    assert reply.content["notes"] == ConfigRecord({"device": "cpu"})
    assert reply.content["more-metrics"] == MetricRecord({"acc": 0.5})
    assert reply.content["metrics"] == train.returned[0].content["metrics"]


def test_float16_models_work_and_the_update_is_computed_in_float32(tmp_path):
    torch.manual_seed(0)
    model = Net().half()
    sd = model.state_dict()
    sd["fc1.weight"][0, 0] = 1000.0  # float16 spacing here is 0.5
    initial = ArrayRecord(sd)
    server = Server(initial)
    trained_fc1 = np.float16(2.0**-10)  # 1000 - 2**-10 is not a float16, but is a float32

    def train(msg, context):
        arrays = msg.content["arrays"]
        for name in initial:
            got = arrays[name].numpy()
            assert got.dtype == initial[name].numpy().dtype and got.tobytes() == initial[name].numpy().tobytes()
        rng = np.random.default_rng(0)
        out = {}
        for name, a in arrays.items():
            nd = a.numpy().copy()
            if nd.dtype == np.float16:  # a float16 "training step", distinct magnitudes (no top-k ties)
                nd = (nd - rng.uniform(-0.1, 0.1, nd.shape).astype(np.float16)).astype(np.float16)
            out[name] = nd
        out["fc1.weight"][0, 0] = trained_fc1
        out["bn.num_batches_tracked"] = out["bn.num_batches_tracked"] + 1
        return Message(RecordDict({"arrays": ArrayRecord({k: _array(v) for k, v in out.items()}),
                                   "metrics": MetricRecord({"num-examples": 1})}), reply_to=msg)

    client = Client(tmp_path, train)
    returned = []
    reply = client.mod(server.message(1, sync_mode="dense"), client.context,
                       lambda m, c: returned.append(train(m, c)) or returned[-1])
    step = server.w - flat(returned[0].content["arrays"])  # float32 arithmetic on the widened float16 values
    sent = sent_update(reply)
    assert sent.values.dtype == torch.float32
    assert torch.equal(sent.indices, topk_oracle(step))
    assert_bitwise(sent.values, step[sent.indices])
    assert float(sent.to_dense()[0]) == 1000.0 - 2.0**-10  # float16 arithmetic would give 1000.0
    assert int(reply.content[protocol.EXACT]["bn.num_batches_tracked"].numpy()) == 1


def _bad_train(mutate):
    base = QuickstartTrain()

    def train(msg, context):
        reply = base(msg, context)
        arrays = {k: a.numpy().copy() for k, a in reply.content["arrays"].items()}
        mutate(arrays)
        reply.content["arrays"] = ArrayRecord({k: _array(v) for k, v in arrays.items()})
        return reply

    return train


BAD_ARRAYS = {
    "wrong shape": ("fc1.weight", lambda a: a.__setitem__("fc1.weight", np.zeros((5, 8), np.float32))),
    "wrong size": ("fc2.bias", lambda a: a.__setitem__("fc2.bias", np.zeros(4, np.float32))),
    "missing float": ("fc2.bias", lambda a: a.pop("fc2.bias")),
    "missing integer": ("bn.num_batches_tracked", lambda a: a.pop("bn.num_batches_tracked")),
    "integer as float": ("bn.num_batches_tracked", lambda a: a.__setitem__("bn.num_batches_tracked", np.array(2.0))),
    "integer reshaped": ("bn.num_batches_tracked", lambda a: a.__setitem__("bn.num_batches_tracked", np.array([2]))),
}


@pytest.mark.parametrize("case", sorted(BAD_ARRAYS))
def test_arrays_that_do_not_match_the_model_give_an_error_naming_the_array(server, tmp_path, case):
    name, mutate = BAD_ARRAYS[case]
    client = Client(tmp_path, _bad_train(mutate))
    with pytest.raises(ValueError, match=f"'{name}'"):
        client.send(server.message(1, sync_mode="dense"))
    assert not client.state_file().exists()  # nothing was saved


@pytest.mark.parametrize("returned", [None, {"arrays": "not a Message"}])
def test_a_train_function_that_returns_no_message_is_named(server, tmp_path, returned):
    client = Client(tmp_path, lambda msg, context: returned)
    with pytest.raises(TypeError, match=f"the train function must return a Message, got {type(returned).__name__}"):
        client.send(server.message(1, sync_mode="dense"))
    assert not client.state_file().exists()


NON_FINITE = {
    "nan": ("bn.running_var", lambda a: a["bn.running_var"].__setitem__(2, np.nan)),
    "inf": ("fc1.bias", lambda a: a["fc1.bias"].__setitem__(0, np.inf)),
}


@pytest.mark.parametrize("case", sorted(NON_FINITE))
def test_non_finite_arrays_are_refused(server, tmp_path, case):
    _, mutate = NON_FINITE[case]
    client = Client(tmp_path, _bad_train(mutate))
    with pytest.raises(ValueError, match="non-finite"):
        client.send(server.message(1, sync_mode="dense"))
    assert not client.state_file().exists()


@pytest.mark.parametrize("case", sorted(NON_FINITE))
def test_non_finite_arrays_error_names_the_array(server, tmp_path, case):
    name, mutate = NON_FINITE[case]
    with pytest.raises(ValueError, match=f"'?{name}'?"):
        Client(tmp_path, _bad_train(mutate)).send(server.message(1, sync_mode="dense"))


def test_a_failed_message_leaves_the_state_for_a_retry(server, tmp_path):
    good = QuickstartTrain()
    bad = _bad_train(BAD_ARRAYS["wrong shape"][1])
    client = Client(tmp_path, good)
    client.send(server.message(1, sync_mode="dense"))
    e1 = client.stored().error.clone()
    with pytest.raises(ValueError):
        client.mod(server.message(2, accepted_round=1), client.context, bad)
    reply = client.send(server.message(2, accepted_round=1, uplink=IDENTITY))
    assert_bitwise(sent_update(reply).to_dense(), good.last_step(server.w) + e1)


@pytest.mark.parametrize("share_models", [False, True])
def test_a_failed_message_changes_nothing_the_store_caches(server, tmp_path, share_models):
    """The mod loads its state shared with the store's cache: a sync, a restored update or a failing
    train function must leave the cached state exactly as the file is (it replaces tensors, never edits one)."""
    bad = _bad_train(BAD_ARRAYS["wrong shape"][1])
    client = Client(tmp_path, mod=SparseMod(share_models=share_models, durable=False))
    client.send(server.message(1, sync_mode="dense"))  # leaves a pending update
    delta = server.subtract(SparseTensor(torch.tensor([1, 9]), torch.tensor([0.5, -2.0]), D))
    with pytest.raises(ValueError):  # after the delta sync and the put-back of round 1's unaccepted update
        client.mod(server.message(2, sync_mode="delta", sync=delta, base_version=0, accepted_round=-1), client.context, bad)
    store = ClientStateStore(tmp_path / f"run-{RUN_ID}", share_models=share_models)
    cached = store.load(client_key(client.context))
    state_module._CACHE.clear()
    from_file = store.load(client_key(client.context))
    assert cached.model_version == from_file.model_version == 0
    assert_bitwise(cached.model, from_file.model)
    assert_bitwise(cached.error, from_file.error)
    assert cached.extra.keys() == from_file.extra.keys()
    assert all(torch.equal(cached.extra[k], from_file.extra[k]) for k in cached.extra)


def test_an_error_reply_from_the_user_passes_through_and_saves_nothing(server, tmp_path):
    def failing(msg, context):
        return Message(Error(code=7, reason="out of memory"), reply_to=msg)

    client = Client(tmp_path, failing)
    reply = client.send(server.message(1, sync_mode="dense"))
    assert reply.has_error() and reply.error.reason == "out of memory"
    assert not client.state_file().exists()


@pytest.mark.parametrize("message_type", [MessageType.EVALUATE, MessageType.QUERY, MessageType.TRAIN])
def test_messages_without_an_instruction_and_evaluate_messages_pass_through(server, client, message_type):
    content = RecordDict({"arrays": server.arrays, "config": user_config(1)})
    if message_type != MessageType.TRAIN:  # even carrying an instruction, an evaluate message is the user's
        content[protocol.RECORD] = server.instruction(1, sync_mode="dense").to_record()
    msg = Message(content=content, metadata=metadata(message_type))
    snapshot = {k: v for k, v in msg.content.items()}
    reply = client.send(msg)
    (seen,) = client.train.received
    assert list(seen.content.keys()) == list(snapshot)
    for key, record in snapshot.items():
        assert seen.content[key] == record
    assert seen.metadata.message_type == message_type
    assert reply.content == client.train.returned[0].content  # the user's reply, as it was
    assert "arrays" in reply.content and protocol.UPDATE not in reply.content
    assert not (client.state_dir / f"run-{RUN_ID}").exists()


# ====================================================================== error feedback
def test_round_one_loses_nothing(server, client):
    reply = client.send(server.message(1, sync_mode="dense"))
    a1 = client.train.last_step(server.w)  # e_0 = 0
    s1 = sent_update(reply)
    assert torch.equal(s1.indices, topk_oracle(a1))
    e1 = client.stored().error
    assert_bitwise(e1 + s1.to_dense(), a1)  # e_1 + s_1 == a_1: nothing lost
    unsent = torch.ones(D, dtype=torch.bool)
    unsent[s1.indices] = False
    assert torch.all(e1[s1.indices] == 0)
    assert_bitwise(e1[unsent], a1[unsent])
    assert_bitwise(s1.values, a1[s1.indices])


def test_round_two_adds_the_memory(server, client):
    client.send(server.message(1, sync_mode="dense"))
    a1 = client.train.last_step(server.w)
    e1 = a1.clone()
    e1[topk_oracle(a1)] = 0
    reply = client.send(server.message(2, accepted_round=1))
    a2 = client.train.last_step(server.w) + e1
    s2 = sent_update(reply)
    assert torch.equal(s2.indices, topk_oracle(a2))
    assert_bitwise(s2.values, a2[s2.indices])
    e2 = a2.clone()
    e2[s2.indices] = 0
    assert_bitwise(client.stored().error, e2)


def test_diagnostics_carry_the_step_and_a_while_the_error_memory_is_the_same(server, tmp_path):
    """With diagnostics on, the mod keeps Δ and a = e + Δ to send them (it computes them in place otherwise)."""
    plain, diag = Client(tmp_path / "plain"), Client(tmp_path / "diag")
    for c in (plain, diag):
        c.send(server.message(1, sync_mode="dense"))
    e1 = diag.stored().error
    replies = [c.send(server.message(2, accepted_round=1, diagnostics=c is diag)) for c in (plain, diag)]
    step = diag.train.last_step(server.w)
    record = replies[1].content[protocol.DIAGNOSTICS]
    assert_bitwise(torch.from_numpy(record["step"].numpy().copy()), step)
    assert_bitwise(torch.from_numpy(record["a"].numpy().copy()), e1 + step)
    assert protocol.DIAGNOSTICS not in replies[0].content
    assert_bitwise(sent_update(replies[0]).to_dense(), sent_update(replies[1]).to_dense())
    assert_bitwise(plain.stored().error, diag.stored().error)


def test_error_feedback_off_sends_the_top_k_of_the_step_alone(server, client):
    client.send(server.message(1, sync_mode="dense"))
    e1 = client.stored().error.clone()
    assert float(e1.abs().sum()) > 0
    reply = client.send(server.message(2, accepted_round=1, error_feedback=False))
    step2 = client.train.last_step(server.w)
    s2 = sent_update(reply)
    assert torch.equal(s2.indices, topk_oracle(step2))
    assert_bitwise(s2.values, step2[s2.indices])
    with_memory = step2 + e1
    assert not torch.equal(with_memory[s2.indices], step2[s2.indices])  # the two rules differ here


@pytest.mark.parametrize("accepted", [True, False])
def test_an_update_the_server_did_not_accept_goes_back_into_the_error(server, client, accepted):
    r1 = client.send(server.message(1, sync_mode="dense"))
    a1 = client.train.last_step(server.w)
    s1 = sent_update(r1)
    e1 = a1 - s1.to_dense()
    assert not torch.equal(e1, a1)
    # round 2 with the identity compressor: the reply reveals a_2 = e + Δ_2 entirely
    r2 = client.send(server.message(2, accepted_round=1 if accepted else -1, uplink=IDENTITY))
    step2 = client.train.last_step(server.w)
    memory = e1 if accepted else a1  # not accepted: s_1 goes back, exactly
    assert_bitwise(sent_update(r2).to_dense(), step2 + memory)
    # round 2 is not accepted either: its s_2 (all of a_2, identity) returns, and s_1 is not put back twice
    r3 = client.send(server.message(3, accepted_round=1 if accepted else -1, uplink=IDENTITY))
    a2 = step2 + memory
    assert_bitwise(sent_update(r3).to_dense(), client.train.last_step(server.w) + a2)


def test_an_accepted_update_is_not_put_back_after_a_skipped_round(server, client):
    """Partial participation: the client sits out round 2; round 3 says round 1 was taken."""
    r1 = client.send(server.message(1, sync_mode="dense"))
    s1 = sent_update(r1)
    e1 = client.train.last_step(server.w) - s1.to_dense()
    server.subtract(s1)  # round 1 aggregated ...
    base = server.version
    g2 = SparseTensor(torch.tensor([4, 50, 90]), torch.tensor([0.1, -0.2, 0.3]), D)
    server.subtract(g2)  # ... and round 2 from other clients
    changed = torch.unique(torch.cat([s1.indices, g2.indices]))
    payload = codec.encode(SparseTensor(changed, server.w[changed], D))
    r3 = client.send(server.message(3, sync_mode="set", sync=payload, base_version=base - 1, accepted_round=1,
                                    uplink=IDENTITY))
    assert_bitwise(flat(client.train.received[-1].content["arrays"]), server.w)
    assert_bitwise(sent_update(r3).to_dense(), client.train.last_step(server.w) + e1)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    rounds=st.lists(
        st.tuples(st.booleans(), st.booleans()),  # (this client takes part, the server accepts its reply)
        min_size=2,
        max_size=6,
    ),
    error_feedback=st.booleans(),
    k=st.integers(min_value=1, max_value=20),
)
def test_error_memory_over_rounds_matches_a_hand_replay(rounds, error_feedback, k):
    """Several rounds, partial participation, lost replies: the mod equals the papers' rule replayed here."""
    server = Server(initial_arrays(1))
    uplink = {"name": "topk", "k": k}
    with tempfile.TemporaryDirectory() as tmp:
        client = Client(Path(tmp))
        e = torch.zeros(D)  # the oracle's memory
        pending = None  # (positions, values, round) the server has not yet confirmed
        held = None  # version the client holds
        accepted_round = -1
        sent_total, step_total = torch.zeros(D, dtype=torch.float64), torch.zeros(D, dtype=torch.float64)
        for t, (takes_part, accepts) in enumerate(rounds, start=1):
            if not takes_part:
                server.subtract(SparseTensor(torch.tensor([t, 2 * t + 40]), torch.tensor([0.01 * t, -0.02]), D))
                continue
            if held is None:
                msg = server.message(t, sync_mode="dense", uplink=uplink, accepted_round=accepted_round,
                                     error_feedback=error_feedback)
            elif held == server.version:
                msg = server.message(t, uplink=uplink, accepted_round=accepted_round, error_feedback=error_feedback)
            else:
                msg = server.message(t, sync_mode="dense", base_version=held, uplink=uplink,
                                     accepted_round=accepted_round, error_feedback=error_feedback)
            reply = client.send(msg)
            held = server.version
            step = client.train.last_step(server.w)
            # the oracle: put back what the server did not take, compensate, top-k, remember
            if pending is not None and accepted_round != pending[2]:
                e[pending[0]] += pending[1]
            a = step + e if error_feedback else step.clone()
            idx = topk_oracle(a, k)
            sent = sent_update(reply)
            assert torch.equal(sent.indices, idx), t
            assert_bitwise(sent.values, a[idx])
            e = a.clone()
            e[idx] = 0
            pending = (idx, a[idx].clone(), t)
            step_total += step.double()
            if accepts:
                accepted_round = t
                sent_total += sent.to_dense().double()
                server.subtract(sent)
        if held is not None:
            assert_bitwise(client.stored().error, e)
            if error_feedback:  # nothing lost: Σ accepted s + e + (unconfirmed s) = Σ Δ
                unconfirmed = torch.zeros(D, dtype=torch.float64)
                if pending is not None and accepted_round != pending[2]:
                    unconfirmed[pending[0]] = pending[1].double()
                torch.testing.assert_close(sent_total + e.double() + unconfirmed, step_total, rtol=0, atol=1e-5)


def test_state_survives_a_restart(server, tmp_path, monkeypatch):
    first = Client(tmp_path)
    r1 = first.send(server.message(1, sync_mode="dense"))
    e1 = first.train.last_step(server.w) - sent_update(r1).to_dense()
    # a new process: a fresh mod, a fresh context, nothing cached in memory
    monkeypatch.setattr(state_module, "_CACHE", state_module._StateCache())
    second = Client(tmp_path, mod=SparseMod())
    assert second.mod is not first.mod and second.context is not first.context
    r2 = second.send(server.message(2, accepted_round=1, uplink=IDENTITY))  # sync "none": the model is on disk
    assert_bitwise(flat(second.train.received[0].content["arrays"]), server.w)
    assert_bitwise(sent_update(r2).to_dense(), second.train.last_step(server.w) + e1)


def test_state_folder_precedence(server, tmp_path, monkeypatch):
    def run(mod, node_dir, env_dir, hint_dir):
        if env_dir:
            monkeypatch.setenv("FL_SPARSE_STATE_DIR", str(env_dir))
        else:
            monkeypatch.delenv("FL_SPARSE_STATE_DIR", raising=False)
        client = Client(tmp_path / "unused", mod=mod)
        if node_dir is None:
            del client.context.node_config["state-dir"]
        else:
            client.context.node_config["state-dir"] = str(node_dir)
        client.send(server.message(1, sync_mode="dense", state_dir=str(hint_dir), state_fsync=False))
        return {p.parent.parent.name for p in tmp_path.rglob("*.state")}

    assert run(SparseMod(state_dir=tmp_path / "mod"), tmp_path / "node", tmp_path / "env", tmp_path / "hint") == {"mod"}
    assert run(SparseMod(), tmp_path / "node", tmp_path / "env", tmp_path / "hint") == {"mod", "node"}
    assert run(SparseMod(), None, tmp_path / "env", tmp_path / "hint") == {"mod", "node", "env"}
    assert run(SparseMod(), None, None, tmp_path / "hint") == {"mod", "node", "env", "hint"}
    for folder in ("mod", "node", "env", "hint"):
        assert (tmp_path / folder / f"run-{RUN_ID}" / f"client-{PID}.state").is_file()


@pytest.mark.parametrize("kwargs,message", [
    ({"durable": "no"}, "SparseMod: durable must be True, False or None, got 'no'"),
    ({"share_models": "false"}, "SparseMod: share_models must be True, False or None, got 'false'"),
    ({"durable": 0}, "SparseMod: durable must be True, False or None, got 0"),
    ({"state_dir": 5}, "SparseMod: state_dir must be a folder's path \\(str or os.PathLike\\), got 5"),
])
def test_a_wrong_mod_argument_is_named_at_construction(kwargs, message):
    # A truthy string would otherwise turn fsync or the shared model store on, silently.
    with pytest.raises(ValueError, match=f"^{message}$"):
        SparseMod(**kwargs)


def test_good_mod_arguments_keep_their_meaning(tmp_path):
    mod = SparseMod(state_dir=str(tmp_path), durable=False, share_models=True)
    assert (mod.state_dir, mod.durable, mod.share_models) == (tmp_path, False, True)
    assert SparseMod(state_dir=tmp_path).state_dir == tmp_path


# ====================================================================== identify
def test_identify_returns_the_partition_without_training(server, client):
    instr = Instruction(server_round=0, phase=protocol.PHASE_IDENTIFY)
    reply = client.send(Message(RecordDict({protocol.RECORD: instr.to_record()}), metadata=metadata()))
    assert client.train.calls == 0
    assert list(reply.content.keys()) == [protocol.RECORD]
    report = Report.read(reply.content)
    assert report.partition_id == PID and report.client_key == f"client-{PID}" and report.server_round == 0
    assert not client.state_file().exists()
    # a node without a partition is named by its node id
    del client.context.node_config["partition-id"]
    report = Report.read(client.send(Message(RecordDict({protocol.RECORD: instr.to_record()}), metadata=metadata())).content)
    assert report.partition_id == -1 and report.client_key == f"node-{500 + PID}"


# ====================================================================== SSGD-MV
def _vote(reply: Message, record=protocol.VOTE) -> torch.Tensor:
    return codec.decode_positions(reply.content.array_records[record], D)


def test_vote_and_values_phases(server, client):
    reply = client.send(server.message(1, sync_mode="dense", phase=protocol.PHASE_VOTE, vote_k=K))
    assert client.train.calls == 1
    a1 = client.train.last_step(server.w)
    vote = _vote(reply)
    assert torch.equal(vote, topk_oracle(a1))
    assert Report.read(reply.content).vote_kind == "full"
    assert protocol.UPDATE not in reply.content
    assert reply.content["metrics"] == client.train.returned[0].content["metrics"]
    # values phase on a common mask that is not this client's vote: no training, a on the mask
    others = torch.tensor([i for i in range(D) if i not in set(vote.tolist())][:3])
    mask = torch.cat([vote[:3], others]).sort().values
    reply = client.send(server.values_message(1, mask))
    assert client.train.calls == 1
    values = codec.decode_values(reply.content.array_records[protocol.UPDATE], K)
    assert_bitwise(values, a1[mask])
    assert Report.read(reply.content).server_round == 1
    e1 = a1.clone()
    e1[mask] = 0
    assert_bitwise(client.stored().error, e1)
    # next round: a "values" sync applies the server's aggregate on that mask
    aggregate = torch.linspace(-0.01, 0.02, K)
    server.w = server.w.clone()
    server.w[mask] -= aggregate
    server.version = 1
    reply = client.send(
        server.message(2, sync_mode="values", sync=codec.encode_values(aggregate), base_version=0, mask_round=1,
                       accepted_round=1, uplink=IDENTITY)
    )
    assert_bitwise(flat(client.train.received[-1].content["arrays"]), server.w)
    assert_bitwise(sent_update(reply).to_dense(), client.train.last_step(server.w) + e1)


def test_a_values_phase_without_its_vote_is_refused(server, client):
    with pytest.raises(SyncError, match="vote-phase"):
        client.send(server.values_message(1, torch.arange(K)))
    client.send(server.message(1, sync_mode="dense", phase=protocol.PHASE_VOTE, vote_k=K))
    with pytest.raises(SyncError, match="vote-phase"):
        client.send(server.values_message(2, torch.arange(K)))  # for a round it did not vote in
    assert client.train.calls == 1


def test_a_vote_whose_values_phase_never_came_returns_to_the_error(server, client):
    r1 = client.send(server.message(1, sync_mode="dense"))
    e1 = client.train.last_step(server.w) - sent_update(r1).to_dense()
    r2 = client.send(server.message(2, accepted_round=1, phase=protocol.PHASE_VOTE, vote_k=K))
    a2 = client.train.last_step(server.w) + e1
    assert torch.equal(_vote(r2), topk_oracle(a2))
    # round 3 (the values phase of round 2 was lost): the error is a_2, all of it
    r3 = client.send(server.message(3, accepted_round=1, uplink=IDENTITY))
    assert_bitwise(sent_update(r3).to_dense(), client.train.last_step(server.w) + a2)


def _add_drop_oracle(a, previous, k_ad):
    top = topk_oracle(a)
    prev = set(previous.tolist())
    new = [i for i in top.tolist() if i not in prev]
    old = [i for i in previous.tolist() if i not in set(top.tolist())]
    n = min(k_ad, len(new), len(old))
    adds = sorted(sorted(new, key=lambda i: -float(a[i].abs()))[:n])
    drops = sorted(sorted(old, key=lambda i: float(a[i].abs()))[:n])
    vote = sorted((prev - set(drops)) | set(adds))
    return torch.tensor(vote), torch.tensor(adds, dtype=torch.int64), torch.tensor(drops, dtype=torch.int64)


def _two_add_drop_rounds(server, client, k_ad):
    """Round 1: a full vote V1 (values on mask V1); round 2: add-drop relative to V1 (values on V2)."""
    r1 = client.send(server.message(1, sync_mode="dense", phase=protocol.PHASE_VOTE, vote_k=K, add_drop_k=k_ad))
    a1 = client.train.last_step(server.w)
    v1 = _vote(r1)
    assert torch.equal(v1, topk_oracle(a1)) and Report.read(r1.content).vote_kind == "full"
    client.send(server.values_message(1, v1))
    e1 = a1.clone()
    e1[v1] = 0
    r2 = client.send(server.message(2, accepted_round=1, phase=protocol.PHASE_VOTE, vote_k=K, add_drop_k=k_ad,
                                    vote_round=1))
    a2 = client.train.last_step(server.w) + e1
    v2, adds, drops = _add_drop_oracle(a2, v1, k_ad)
    assert adds.numel() > 0  # the test means something: the vote changed
    report = Report.read(r2.content)
    assert report.vote_kind == "add-drop" and report.vote_base_round == 1
    assert protocol.VOTE not in r2.content
    assert torch.equal(_vote(r2, protocol.VOTE_ADD), adds)
    assert torch.equal(_vote(r2, protocol.VOTE_DROP), drops)
    client.send(server.values_message(2, v2))
    e2 = a2.clone()
    e2[v2] = 0
    return v1, v2, e2


@pytest.mark.parametrize("base_round", [2, 1, 7, -1])
def test_add_drop_votes_are_relative_to_the_vote_the_server_holds(server, tmp_path, base_round):
    k_ad = 2
    client = Client(tmp_path)
    v1, v2, e2 = _two_add_drop_rounds(server, client, k_ad)
    r3 = client.send(server.message(3, accepted_round=2, phase=protocol.PHASE_VOTE, vote_k=K, add_drop_k=k_ad,
                                    vote_round=base_round))
    a3 = client.train.last_step(server.w) + e2
    report = Report.read(r3.content)
    if base_round in (1, 2):  # the last vote sent, or the one before (the server missed the last)
        base = v2 if base_round == 2 else v1
        _, adds, drops = _add_drop_oracle(a3, base, k_ad)
        assert report.vote_kind == "add-drop" and report.vote_base_round == base_round
        assert torch.equal(_vote(r3, protocol.VOTE_ADD), adds)
        assert torch.equal(_vote(r3, protocol.VOTE_DROP), drops)
    else:  # a vote the client does not hold (or none): a full vote
        assert report.vote_kind == "full"
        assert torch.equal(_vote(r3), topk_oracle(a3))


# ====================================================================== random compressors
def test_random_compressors_are_reproducible_per_seed_round_and_partition(server, tmp_path):
    uplink = {"name": "rtopk", "k": 4, "r": 40}

    def positions(name, server_round, pid=PID, seed=5):
        client = Client(tmp_path / name, QuickstartTrain(fixed_data=True), pid=pid)
        reply = client.send(server.message(server_round, sync_mode="dense", uplink=uplink, seed=seed))
        a = client.train.last_step(server.w)
        sent = sent_update(reply)
        assert sent.nnz == 4
        assert set(sent.indices.tolist()) <= set(topk_oracle(a, 40).tolist())  # drawn from the top-r
        assert_bitwise(sent.values, a[sent.indices])
        return sent.indices.tolist(), a

    first, a = positions("a", 1)
    again, a_again = positions("b", 1)
    assert torch.equal(a, a_again)  # the same step: only the compressor's draw can differ
    assert first == again
    assert positions("c", 2)[0] != first  # another round
    assert positions("d", 1, pid=PID + 1)[0] != first  # another client
    assert positions("e", 1, seed=6)[0] != first  # another seed


def test_one_mod_keeps_builtin_compressors_and_builds_a_users_per_message(server, tmp_path):
    """The package's compressors are kept per spec (their draws still depend on seed, round and
    partition alone); a user's registered class may keep state, so it is built for each message."""
    from fl_sparse.compressors import COMPRESSORS, register_compressor

    @register_compressor("test-alternating")
    class Alternating:  # a stateful compressor: even positions on its first call, odd on its second
        def __init__(self) -> None:
            self.calls = 0

        def k_for(self, numel: int) -> int:
            return (numel + 1 - self.calls % 2) // 2

        def __call__(self, x, *, generator=None):
            idx = torch.arange(self.calls % 2, x.numel(), 2)
            self.calls += 1
            return SparseTensor(idx, x[idx], x.numel())

    try:
        mod = SparseMod()
        c = Client(tmp_path / "user", pid=PID, mod=mod)
        for t in (1, 2):
            reply = c.send(server.message(t, sync_mode="dense", uplink={"name": "test-alternating"}))
            assert sent_update(reply).indices.tolist() == list(range(0, D, 2))  # a fresh instance each time
    finally:
        COMPRESSORS.pop("test-alternating", None)
    uplink = {"name": "rtopk", "k": 4, "r": 40}
    drawn = []
    for name, m in (("a", mod), ("b", mod), ("fresh", SparseMod())):  # the kept instance twice, then a new one
        client = Client(tmp_path / name, QuickstartTrain(fixed_data=True), pid=PID, mod=m)
        drawn.append(sent_update(client.send(server.message(1, sync_mode="dense", uplink=uplink, seed=5))).indices.tolist())
    assert drawn[0] == drawn[1] == drawn[2]


# ====================================================================== the ClientApp on a grid
def test_a_user_clientapp_behind_the_mod_runs_a_strategy_on_the_in_process_grid(tmp_path):
    """Three nodes with unequal data, two of three sampled per round, three rounds: the global model
    equals the papers' rule (top-K with error feedback, weighted mean) replayed from what the users returned."""
    from inprocess import InProcessGrid

    from fl_sparse.strategies import TopKSGD

    trains = {}

    def make_train(pid):
        trains[pid] = QuickstartTrain(examples=10 * (pid + 1))
        return trains[pid]

    app = ClientApp(mods=[SparseMod()])

    @app.train()
    def train(msg, context):
        pid = int(context.node_config["partition-id"])
        return (trains.get(pid) or make_train(pid))(msg, context)

    grid = InProcessGrid(app, 3, node_config=lambda i: {"state-dir": str(tmp_path)})
    # the replay compresses every float entry, BatchNorm's running statistics too (not the default)
    strategy = TopKSGD(fraction_train=0.67, fraction_evaluate=0.0, min_available_nodes=3, k=K, seed=3,
                       exact_running_stats=False)
    initial = initial_arrays(2)
    result = strategy.start(grid, initial, num_rounds=3, train_config=ConfigRecord({"lr": 0.3}))
    # (with this seed a client sits out a round and comes back: its sync then skips a version)
    assert any(tr.rounds == [1, 3] for tr in trains.values()), "sampling changed: pick a seed with a gap"

    # replay: which clients trained in which round, from what they saw and returned
    w = flat(initial)
    errors = {pid: torch.zeros(D) for pid in trains}
    for t in (1, 2, 3):
        sent, weights = [], []
        for pid, tr in sorted(trains.items()):
            for seen_round, seen, returned in zip(tr.rounds, tr.received, tr.returned):
                if seen_round != t:
                    continue
                torch.testing.assert_close(flat(seen.content["arrays"]), w, rtol=0, atol=1e-6)
                assert list(seen.content["arrays"].keys()) == list(initial.keys())
                a = flat(seen.content["arrays"]) - flat(returned.content["arrays"]) + errors[pid]
                idx = topk_oracle(a)
                s = torch.zeros(D)
                s[idx] = a[idx]
                errors[pid] = a - s
                sent.append(s)
                weights.append(float(returned.content["metrics"]["num-examples"]))
        assert len(sent) == 2  # partial participation: two of three
        p = torch.tensor(weights) / sum(weights)
        w = w - sum(pi * si for pi, si in zip(p, sent))
    final = result.arrays
    assert list(final.keys()) == list(initial.keys())
    torch.testing.assert_close(flat(final), w, rtol=0, atol=1e-5)
    assert final["bn.num_batches_tracked"].numpy().dtype == np.int64
