"""Review of SSGD-MV ([OOG] Algorithms 1 and 2): one test per bug found, each failing before its fix.

Real strategy, real :class:`~fl_sparse.clients.SparseMod`, the in-process
grid (:mod:`inprocess`); replies are lost or rewritten on their way back.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.logger import FLOWER_LOGGER
from inprocess import InProcessGrid, scratch_folder

from fl_sparse import codec, protocol
from fl_sparse.clients import SparseMod
from fl_sparse.protocol import Instruction
from fl_sparse.strategies import SSGDMajorityVote



@pytest.fixture(autouse=True)
def _flower_warnings():
    """Flower's log at WARNING for this module's tests only (a level set at import stays for the session)."""
    level = FLOWER_LOGGER.level
    FLOWER_LOGGER.setLevel(logging.WARNING)
    yield
    FLOWER_LOGGER.setLevel(level)

VOTE, VALUES = protocol.PHASE_VOTE, protocol.PHASE_VALUES


def node_of(pid: int) -> int:
    return 1000 + 7 * pid  # InProcessGrid's node ids


def step_of(pid: int, server_round: int, numel: int) -> np.ndarray:
    """A client's local step: heavy-tailed (no ties in |a|), fixed by (partition, round)."""
    gen = torch.Generator().manual_seed(1_000 * pid + server_round)
    return ((torch.randn(numel, generator=gen) ** 3) * 1e-2).numpy()


class Bench:
    """A strategy, an InProcessGrid of ``clients`` real ClientApps (SparseMod + a plain train function).

    ``lose`` holds (partition, phase) pairs whose reply becomes an error reply
    on its way back (the client ran and saved its state); ``log`` every
    (round, phase, partition, request, reply) the server saw.
    """

    def __init__(self, strategy: SSGDMajorityVote, *, numel: int, clients: int, weight=lambda pid: 3 + 5 * pid):
        self.strategy = strategy
        self.numel = numel
        self.lose: set[tuple[int, str]] = set()
        self.log: list[tuple[int, str, int, Message, Message]] = []
        app = ClientApp(mods=[SparseMod()])

        @app.train()
        def train(msg: Message, context) -> Message:
            pid = int(context.node_config["partition-id"])
            server_round = int(msg.content["config"]["server-round"])
            w = msg.content["arrays"]["w"].numpy()
            trained = ArrayRecord({"w": Array(w - step_of(pid, server_round, numel))})
            return Message(RecordDict({"arrays": trained, "metrics": MetricRecord({"num-examples": weight(pid)})}),
                           reply_to=msg)

        folder = scratch_folder()
        self.grid = InProcessGrid(app, clients, node_config=lambda i: {"state-dir": folder}, tamper=self._tamper)
        self.arrays = ArrayRecord({"w": Array(np.linspace(-1, 1, numel, dtype=np.float32))})
        strategy.initialize(self.arrays)
        strategy.identify(self.grid)

    def _tamper(self, node: int, reply: Message) -> Message:
        request = self.grid.sent[-1]  # send_and_receive calls tamper right after the request it answers
        instr = Instruction.read(request.content)
        pid = (node - 1000) // 7
        if (pid, instr.phase) in self.lose and not reply.has_error():
            reply = Message(error=Error(code=2, reason="reply lost"), metadata=reply.metadata)
        self.log.append((instr.server_round, instr.phase, pid, request, reply))
        return reply

    def round(self, server_round: int):
        """One Flower round as Strategy.start runs it."""
        cfg = ConfigRecord({"local-steps": 1})
        messages = list(self.strategy.configure_train(server_round, self.arrays, cfg, self.grid))
        replies = self.grid.send_and_receive(messages)
        arrays, metrics = self.strategy.aggregate_train(server_round, replies)
        if arrays is not None:
            self.arrays = arrays
        return metrics

    def entries(self, server_round: int, phase: str):
        return [(pid, req, rep) for t, ph, pid, req, rep in self.log if t == server_round and ph == phase]


def vote_bytes(replies) -> int:
    """Bytes of the vote records of ``replies`` as they arrived (full votes, or adds and drops)."""
    keys = (protocol.VOTE, protocol.VOTE_ADD, protocol.VOTE_DROP)
    return sum(codec.wire_size(rep.content.array_records[key]).total_bytes
               for rep in replies for key in keys if key in rep.content.array_records)


# ====================================================================== mask selection
@pytest.mark.parametrize("selection", ["majority", "weighted"])
@pytest.mark.parametrize("seed", [2**32, 2**64 + 3])
def test_any_seed_selects_a_reproducible_mask(selection, seed):
    """The base takes any seed >= 0; the mask's generator overflowed ``manual_seed`` for seeds >= ~2.3e9.

    The server then raised in ``configure_train`` after the vote phase had run. Now a round
    runs, and the same seed draws the same masks (random tie-break / weighted draws).
    """
    masks = []
    for _ in range(2):
        strategy = SSGDMajorityVote(k=20, selection=selection, seed=seed, fraction_evaluate=0.0, positions="raw")
        bench = Bench(strategy, numel=200, clients=3)
        bench.round(1)
        bench.round(2)
        assert strategy.state.round_metrics[2]["accepted"] == 3
        masks.append([codec.decode_positions(req.content.array_records[protocol.MASK], 200)
                      for t in (1, 2) for _, req, _ in bench.entries(t, VALUES)[:1]])
    assert all(torch.equal(a, b) for a, b in zip(*masks))


# ====================================================================== round metrics
def test_a_round_without_update_counts_the_vote_phases_failures_and_bytes():
    """Client 0's vote and clients 1 and 2's values are lost: 3 failures, the 2 accepted votes' bytes up.

    ``round_metrics`` adds the vote phase's failures and bytes to the values phase's, but it only
    runs for a round with an update; without one, ``failures`` said 2 and ``uplink_bytes`` 0.
    """
    strategy = SSGDMajorityVote(ratio=0.05, fraction_evaluate=0.0, add_drop_ratio=0.01)
    bench = Bench(strategy, numel=300, clients=3)
    bench.lose = {(0, VOTE), (1, VALUES), (2, VALUES)}
    bench.round(1)
    rm = strategy.state.round_metrics[1]
    assert rm["vote_failures"] == 1 and rm["vote_accepted"] == 2 and rm["accepted"] == 0
    assert rm["failures"] == 3
    accepted_votes = [rep for pid, _, rep in bench.entries(1, VOTE) if not rep.has_error()]
    assert len(accepted_votes) == 2
    assert rm["uplink_bytes"] == vote_bytes(accepted_votes) > 0
    # every vote lost: no values phase at all
    bench.lose = {(pid, VOTE) for pid in range(3)}
    bench.round(2)
    rm = strategy.state.round_metrics[2]
    assert not bench.entries(2, VALUES)
    assert rm["failures"] == 3 and rm["uplink_bytes"] == 0
    # a round with an update: the same sums (round_metrics)
    bench.lose = {(0, VOTE)}
    bench.round(3)
    rm = strategy.state.round_metrics[3]
    assert rm["accepted"] == 2 and rm["failures"] == 1


# ====================================================================== values sync
@pytest.mark.parametrize("checkpoint", [False, True])
def test_values_sync_after_a_round_without_update(checkpoint):
    """Round 2 has no update (every values reply lost), so round 3's voters hold version 1 and w_3 = w_1 − g_3.

    Round 4 must send them g_3 as values only. The check was ``have == version − 1`` (= 2, a
    version that never existed): every client got the dense model instead, about d/K times
    the bytes. ``checkpoint``: the strategy continues round 4 from its saved state.
    """
    numel = 300
    options = dict(ratio=0.05, fraction_evaluate=0.0, seed=1)
    strategy = SSGDMajorityVote(**options)
    bench = Bench(strategy, numel=numel, clients=3)
    bench.round(1)
    bench.lose = {(pid, VALUES) for pid in range(3)}
    bench.round(2)
    assert strategy.state.version == 1
    bench.lose = set()
    bench.round(3)
    assert strategy.state.version == 3 and strategy.state.round_metrics[3]["accepted"] == 3
    if checkpoint:
        restored = SSGDMajorityVote(**options)
        restored.load_state_dict(strategy.state_dict())
        bench.strategy = strategy = restored
    bench.round(4)
    rm = strategy.state.round_metrics[4]
    assert rm["sync_modes"] == {"values": 3}
    assert rm["failures"] == 0 and rm["accepted"] == 3  # the clients reached w_3 exactly (hash checked)
    assert rm["downlink_bytes"] < numel * 4  # less than one dense model for all three


def test_base_delta_sync_after_a_round_without_update():
    """The same gap in :meth:`SparseFedAvg.sync_payload`: round 3's clients hold w_1, the last update is w_1 → w_3."""
    from fl_sparse.strategies.base import SparseFedAvg

    strategy = SparseFedAvg(uplink={"name": "topk", "k": 15}, fraction_evaluate=0.0, seed=1)
    bench = Bench(strategy, numel=300, clients=3)
    bench.round(1)
    bench.lose = {(pid, protocol.PHASE_TRAIN) for pid in range(3)}
    bench.round(2)
    bench.lose = set()
    bench.round(3)
    assert strategy.state.version == 3 and strategy.state.round_metrics[3]["accepted"] == 3
    bench.round(4)
    assert strategy.state.round_metrics[4]["sync_modes"] == {"delta": 3}


# ====================================================================== checkpoint
@pytest.mark.parametrize("position", [-1, 300])
def test_a_saved_vote_outside_the_model_is_named_on_load(position):
    """A damaged checkpoint whose stored add-drop vote names a position outside the model: a ValueError that
    says so (it was an IndexError from the invariant check's index_add, not a state error)."""
    options = dict(ratio=0.05, add_drop_ratio=0.01, fraction_evaluate=0.0, seed=1)
    strategy = SSGDMajorityVote(**options)
    bench = Bench(strategy, numel=300, clients=2)
    bench.round(1)
    saved = strategy.state_dict()
    node, (vote_round, vote) = next(iter(saved["ssgd_mv"]["votes"].items()))
    bad = vote.clone()
    bad[-1] = position
    saved["ssgd_mv"]["votes"][node] = (vote_round, bad)
    with pytest.raises(ValueError, match=rf"inconsistent SSGD-MV state: client {node}: .*outside \[0, 300\)"):
        SSGDMajorityVote(**options).load_state_dict(saved)


def test_a_saved_mask_outside_the_model_is_named_on_load():
    options = dict(ratio=0.05, fraction_evaluate=0.0, seed=1)
    strategy = SSGDMajorityVote(**options)
    Bench(strategy, numel=300, clients=2).round(1)
    saved = strategy.state_dict()
    saved["ssgd_mv"]["mask"] = saved["ssgd_mv"]["mask"].clone()
    saved["ssgd_mv"]["mask"][0] = 300
    with pytest.raises(ValueError, match=r"inconsistent SSGD-MV state: mask positions outside \[0, 300\)"):
        SSGDMajorityVote(**options).load_state_dict(saved)


@pytest.mark.parametrize("damage", ["vote", "mask", "m_sum"])
def test_a_refused_state_leaves_the_strategy_as_it_was(damage):
    """load_state_dict is all or nothing: the base's part of a damaged state was loaded before SSGD-MV's
    checks refused the rest, leaving a strategy with one run's model and another's votes."""
    options = dict(ratio=0.05, add_drop_ratio=0.01, fraction_evaluate=0.0, seed=1)
    other = SSGDMajorityVote(**options)
    Bench(other, numel=300, clients=2).round(1)
    saved = other.state_dict()
    if damage == "vote":
        node, (vote_round, vote) = next(iter(saved["ssgd_mv"]["votes"].items()))
        saved["ssgd_mv"]["votes"][node] = (vote_round, torch.full_like(vote, 300))
    elif damage == "mask":
        saved["ssgd_mv"]["mask"] = torch.full_like(saved["ssgd_mv"]["mask"], 300)
    else:
        saved["ssgd_mv"]["m_sum"] = saved["ssgd_mv"]["m_sum"] + 1
    strategy = SSGDMajorityVote(**options)
    bench = Bench(strategy, numel=300, clients=2)
    bench.round(1)
    bench.round(2)
    before = strategy.state_dict()
    with pytest.raises(ValueError, match="SSGD-MV state"):
        strategy.load_state_dict(saved)
    after = strategy.state_dict()
    assert after["version"] == before["version"] == 2 and after["round"] == 2
    assert torch.equal(after["model"], before["model"]) and not torch.equal(after["model"], saved["model"])
    assert torch.equal(after["ssgd_mv"]["m_sum"], before["ssgd_mv"]["m_sum"])
    assert torch.equal(after["ssgd_mv"]["mask"], before["ssgd_mv"]["mask"])
    assert after["ssgd_mv"]["votes"].keys() == before["ssgd_mv"]["votes"].keys()
    bench.round(3)  # and the run goes on from where it was
    assert strategy.state.version == 3
