"""A client whose state file is damaged between rounds recovers by itself within one round.

Real strategies drive a real ClientApp (``SparseMod`` in front of a plain
train function) through :class:`inprocess.InProcessGrid`. Between rounds the
test damages client 1's state file on disk (truncates it, flips one bit of
its stored error memory, overwrites it with garbage). Expected, from the
protocol alone: the next message to client 1 carries a sparse sync, so the
client (its state reset) refuses it with a SyncError naming the reset; the
server drops that one reply and sends client 1 the dense model the round
after, which it trains on and is accepted. The server's model never sees
the damaged memory (no 1e35 in it), and every damaged file is kept aside.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from torch import nn

from fl_sparse import protocol
from fl_sparse.clients import SparseMod
from fl_sparse.clients.state import MAGIC, ClientStateStore
from fl_sparse.protocol import Instruction
from fl_sparse.strategies import BidirectionalTopKSGD, SSGDMajorityVote
from inprocess import InProcessGrid

N = 4
ROUNDS = 8
VICTIM = 1  # partition id of the client whose file is damaged
CORRUPT_MSG = "client state was corrupt and has been reset; the server must send a dense sync"


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, 16)
        self.bn = nn.BatchNorm1d(16)
        self.fc2 = nn.Linear(16, 3)

    def forward(self, x):
        return self.fc2(torch.relu(self.bn(self.fc1(x))))


def train(msg: Message, context: Context) -> Message:
    """A quickstart-style train function; partitions differ in size (unequal weights)."""
    model = Net()
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    pid = int(context.node_config["partition-id"])
    round_ = int(msg.content["config"]["server-round"])
    gen = torch.Generator().manual_seed(100 * round_ + pid)
    n = 16 + 12 * pid
    x, y = torch.randn(n, 6, generator=gen), torch.randint(0, 3, (n,), generator=gen)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model.train()
    for _ in range(2):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    content = RecordDict({"arrays": ArrayRecord(model.state_dict()), "metrics": MetricRecord({"num-examples": n})})
    return Message(content=content, reply_to=msg)


# ------------------------------------------------------------------ damaging a file (no fl-sparse reader used)
def _tensor_span(raw: bytes, name: str) -> tuple[int, int]:
    """Byte range of tensor ``name`` in a state file, from its header (parsed here, by hand)."""
    (header_len,) = struct.unpack_from("<I", raw, len(MAGIC))
    header = json.loads(raw[len(MAGIC) + 4 : len(MAGIC) + 4 + header_len])
    data = len(MAGIC) + 4 + header_len
    for entry_name, dtype, shape, offset in header["tensors"]:
        if entry_name == name:
            assert dtype == "float32"
            return data + offset, data + offset + 4 * math.prod(shape)
    raise AssertionError(f"no {name!r} in the file")


def truncate(path: Path) -> bytes:
    raw = path.read_bytes()
    return raw[: len(raw) * 2 // 3]


def flip_error_bit(path: Path) -> bytes:
    """Flip the top exponent bit of the error memory's largest entry: 1e-3 becomes ~3e35."""
    raw = bytearray(path.read_bytes())
    start, end = _tensor_span(bytes(raw), "error")
    error = torch.frombuffer(bytearray(raw[start:end]), dtype=torch.float32)
    i = int(error.abs().argmax())
    assert 0 < abs(float(error[i])) < 2  # the flip multiplies it by 2**128
    raw[start + 4 * i + 3] ^= 0x40
    return bytes(raw)


def garbage(path: Path) -> bytes:
    return b"\x00garbage\xff" * 37


class VictimHook:
    """Tamper hook: records client ``VICTIM``'s sync mode and error reason per round, and calls
    :meth:`damage` after each of its replies that ends a round for it (not a vote, not an error)."""

    def __init__(self, grid_ref: list) -> None:
        self.grid_ref = grid_ref
        self.errors: dict[int, str] = {}  # round -> the victim's error reason
        self.syncs: dict[int, str] = {}  # round -> the victim's sync mode (train or vote phase)

    def __call__(self, node: int, reply: Message) -> Message:
        grid = self.grid_ref[0]
        sent = grid.sent[-1]  # the message this reply answers (the grid appends it before the call)
        if grid.contexts[node].node_config["partition-id"] != VICTIM:
            return reply
        instr = Instruction.read(sent.content)
        if instr is None or instr.phase == protocol.PHASE_IDENTIFY:
            return reply
        r = instr.server_round
        if instr.phase != protocol.PHASE_VALUES:
            self.syncs[r] = instr.sync_mode
        if reply.has_error():
            self.errors[r] = reply.error.reason
            return reply
        if instr.phase == protocol.PHASE_VOTE:
            return reply  # damage after the round's last message to the client
        return self.damage(r, reply)

    def damage(self, server_round: int, reply: Message) -> Message:
        return reply


class Damage(VictimHook):
    """After client ``VICTIM``'s reply in round r, write ``plan[r](file)`` over its file."""

    def __init__(self, grid_ref: list, root: Path, plan: dict, *, lose_reply_in: set[int] = frozenset()) -> None:
        super().__init__(grid_ref)
        self.root, self.plan, self.lose_reply_in = root, plan, lose_reply_in
        self.written: list[bytes] = []

    def damage(self, server_round: int, reply: Message) -> Message:
        if server_round in self.plan:
            path = next(self.root.glob(f"gen-*/client-{VICTIM}.state"))
            bad = self.plan[server_round](path)
            path.write_bytes(bad)
            self.written.append(bad)
        if server_round in self.lose_reply_in:
            del reply.content[protocol.UPDATE]  # the server rejects this reply
        return reply


STRATEGIES = {
    "bidirectional-topk": lambda: BidirectionalTopKSGD(
        ratio=0.1, fraction_evaluate=0.0, min_available_nodes=N, seed=3
    ),
    "ssgd-mv-ad": lambda: SSGDMajorityVote(
        ratio=0.1, add_drop_ratio=0.03, fraction_evaluate=0.0, min_available_nodes=N, seed=3
    ),
}


def _run(tmp_path, monkeypatch, make_strategy, plan, **damage_kw):
    # No in-process cache: every load reads the file, as a restarted SuperNode or another Ray actor does.
    monkeypatch.setenv("FL_SPARSE_STATE_CACHE_MB", "0")
    app = ClientApp(mods=[SparseMod()])
    app.train()(train)
    ref: list = []
    damage = Damage(ref, tmp_path, plan, **damage_kw)
    grid = InProcessGrid(app, N, node_config=lambda i: {"state-dir": str(tmp_path)}, tamper=damage)
    ref.append(grid)
    strategy = make_strategy()
    torch.manual_seed(0)
    initial = ArrayRecord(Net().state_dict())
    result = strategy.start(grid, initial, num_rounds=ROUNDS, train_config=ConfigRecord({"lr": 0.1}))
    return strategy, result, damage


def _floats(arrays: ArrayRecord) -> torch.Tensor:
    floats = [a.numpy() for a in arrays.values() if a.numpy().dtype.kind == "f"]
    return torch.cat([torch.as_tensor(f).reshape(-1).double() for f in floats])


@pytest.mark.parametrize("name", list(STRATEGIES))
def test_damaged_state_costs_the_client_one_round_then_it_is_accepted_again(name, tmp_path, monkeypatch):
    plan = {2: truncate, 4: flip_error_bit, 6: garbage}
    strategy, result, damage = _run(tmp_path, monkeypatch, STRATEGIES[name], plan)
    rm = strategy.state.round_metrics
    failed_rounds = {r + 1 for r in plan}  # the round right after each damage
    for r in range(1, ROUNDS + 1):
        if r in failed_rounds:
            assert rm[r]["failures"] == 1 and rm[r]["accepted"] == N - 1, (r, rm[r])
            assert CORRUPT_MSG in damage.errors[r], damage.errors
            assert damage.syncs[r] != "dense"  # the server did not know; the client refused it
        else:
            assert rm[r]["failures"] == 0 and rm[r]["accepted"] == N, (r, rm[r])
            assert r not in damage.errors
    assert sorted(damage.errors) == sorted(failed_rounds)
    # Recovery: the round after each refusal the server sent the dense model (first contact too).
    dense = {r for r, mode in damage.syncs.items() if mode == "dense"}
    assert dense == {1} | {r + 1 for r in failed_rounds if r < ROUNDS}
    # The damaged error memory never reached the server: its model is finite and of ordinary size.
    w0 = _floats(ArrayRecord(Net().state_dict()))
    w = _floats(result.arrays)
    assert torch.isfinite(w).all()
    assert w.abs().max() < 10 * max(1.0, float(w0.abs().max())), float(w.abs().max())
    # Every damaged file is kept aside, byte for byte, next to the live one.
    store = ClientStateStore(next(tmp_path.glob("gen-*")), durable=False)
    assert [p.read_bytes() for p in store.corrupt_files(f"client-{VICTIM}")] == damage.written
    assert store.load(f"client-{VICTIM}").reset_reason is None  # the live file is sound again


def test_with_a_dense_sync_the_reset_client_just_trains(tmp_path, monkeypatch):
    """Its reply was lost the round its file broke: the server already sends dense, so no round fails."""
    plan = {3: garbage}
    strategy, _, damage = _run(
        tmp_path, monkeypatch, STRATEGIES["bidirectional-topk"], plan, lose_reply_in={3}
    )
    rm = strategy.state.round_metrics
    assert rm[3]["failures"] == 1  # the reply the test removed
    assert damage.syncs[4] == "dense"
    assert all(rm[r]["failures"] == 0 and rm[r]["accepted"] == N for r in range(4, ROUNDS + 1)), rm
    assert damage.errors == {}  # the client never refused a message
    store = ClientStateStore(next(tmp_path.glob("gen-*")), durable=False)
    assert [p.read_bytes() for p in store.corrupt_files(f"client-{VICTIM}")] == damage.written


def test_a_sync_payload_of_the_wrong_record_type_is_a_sync_error():
    from flwr.app import ConfigRecord, RecordDict

    from fl_sparse.clients.mod import SyncError, apply_sync
    from fl_sparse.clients.state import ClientState
    from fl_sparse.protocol import SYNC, Instruction

    state = ClientState(model=torch.zeros(4), model_version=1)
    instr = Instruction(server_round=2, sync_mode="delta", base_version=1, model_version=2)
    with pytest.raises(SyncError, match=f"without a {SYNC!r} payload"):
        apply_sync(state, instr, RecordDict({SYNC: ConfigRecord({"x": 1})}), 4)
    assert state.model_version == 1 and torch.equal(state.model, torch.zeros(4))
