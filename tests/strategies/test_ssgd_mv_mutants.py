"""Tests written to kill mutants of SSGD-MV's vote logic (``tally_votes``, ``_apply_vote``, ...).

Real strategy, real :class:`SparseMod`, the in-process grid; replies are
tampered with on their way back. Oracles: counts of what was sent, the
FedAvg average of the exact (integer) arrays in numpy, the module
docstring's storage contract for the clients' votes. See docs/testing.md.
"""

from __future__ import annotations

import dataclasses
import math
import logging

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.logger import FLOWER_LOGGER
from inprocess import InProcessGrid, node_id, scratch_folder

from fl_sparse import codec, protocol
from fl_sparse.clients import SparseMod
from fl_sparse.protocol import Instruction, Report
from fl_sparse.strategies import SSGDMajorityVote

FLOWER_LOGGER.setLevel(logging.WARNING)


def _weight(pid: int) -> float:
    return float(2 + 3 * pid)


def _app(numel: int) -> ClientApp:
    app = ClientApp(mods=[SparseMod()])

    @app.train()
    def train(msg: Message, context) -> Message:
        pid = int(context.node_config["partition-id"])
        rnd = int(msg.content["config"]["server-round"])
        arrays = msg.content["arrays"]
        step = (torch.randn(numel, generator=torch.Generator().manual_seed(100 * pid + rnd)) ** 3).numpy()
        out = ArrayRecord({"w": Array(arrays["w"].numpy() - step.astype(np.float32))})
        if "count" in arrays:
            out["count"] = Array(arrays["count"].numpy() + (pid + 1))
        metrics = MetricRecord({"num-examples": _weight(pid)})
        return Message(RecordDict({"arrays": out, "metrics": metrics}), reply_to=msg)

    return app


class _Bench:
    def __init__(self, strategy, numel, clients, *, with_count=False, tamper=None):
        self.strategy = strategy
        self.tamper = tamper
        self.phases: list[tuple[int, str]] = []
        folder = scratch_folder()
        self.grid = InProcessGrid(_app(numel), clients, node_config=lambda i: {"state-dir": folder}, tamper=self._tamper)
        arrays = {"w": Array(np.linspace(-1, 1, numel, dtype=np.float32))}
        if with_count:
            arrays["count"] = Array(np.array([10, -4], dtype=np.int64))
        self.arrays = ArrayRecord(arrays)
        strategy.initialize(self.arrays)
        strategy.identify(self.grid)

    def _tamper(self, node, reply):
        instr = Instruction.read(self.grid.sent[-1].content)
        if self.tamper is not None and not reply.has_error():
            return self.tamper(instr.phase, (node - 1000) // 7, reply)
        return reply

    def round(self, server_round):
        messages = list(self.strategy.configure_train(server_round, self.arrays, ConfigRecord({"local-steps": 1}), self.grid))
        replies = self.grid.send_and_receive(messages)
        arrays, metrics = self.strategy.aggregate_train(server_round, replies)
        if arrays is not None:
            self.arrays = arrays
        return messages, metrics


def _lost(reply: Message) -> Message:
    return Message(error=Error(code=2, reason="reply lost on the way"), metadata=reply.metadata)


def _report_with(reply: Message, **changes) -> Message:
    report = dataclasses.replace(Report.read(reply.content), **changes)
    reply.content[protocol.RECORD] = report.to_record()
    return reply


def test_each_failed_or_rejected_vote_is_counted_logged_and_left_out(caplog):
    """Five voters: two error replies, one on the right model hash but another version, one without its vote.

    vote_failures counts all four; each gets its own log line with the reason; only the good
    client is asked for values; a right hash does not excuse a wrong version.
    """

    def tamper(phase, pid, reply):
        if phase != protocol.PHASE_VOTE:
            return reply
        if pid in (0, 1):
            return _lost(reply)
        if pid == 2:
            return _report_with(reply, model_version=Report.read(reply.content).model_version + 1)
        if pid == 3:
            del reply.content[protocol.VOTE]
        return reply

    strategy = SSGDMajorityVote(ratio=0.2, min_available_nodes=5, min_train_nodes=5, fraction_evaluate=0.0)
    bench = _Bench(strategy, 40, 5, tamper=tamper)
    with caplog.at_level(logging.WARNING, logger="flwr"):
        messages, metrics = bench.round(1)
    rm = strategy.state.round_metrics[1]
    assert rm["vote_failures"] == 4 and rm["vote_accepted"] == 1
    assert [m.metadata.dst_node_id for m in messages] == [node_id(4)]
    assert metrics is not None and rm["failures"] == 4
    lines = [r.getMessage() for r in caplog.records]
    for pid in (0, 1):
        assert f"round 1: client {node_id(pid)} failed to vote: reply lost on the way" in lines, lines
    assert f"round 1: rejected vote from client {node_id(2)}: the client trained from a different model" in lines, lines
    assert f"round 1: rejected vote from client {node_id(3)}: full vote has no {protocol.VOTE!r} ArrayRecord" in lines, lines
    # the clients that did not vote are re-synced densely next round
    for pid in (0, 1, 2, 3):
        assert node_id(pid) not in strategy.state.client_versions


@pytest.mark.parametrize("add_drop", [False, True])
def test_exact_arrays_of_the_voters_are_averaged_as_fedavg_does(add_drop):
    """An integer array rides along exactly: w_exact = rint(Σ p_q x_q) over the clients of the values phase."""
    kwargs = dict(add_drop_k=2) if add_drop else {}
    strategy = SSGDMajorityVote(k=6, min_available_nodes=3, min_train_nodes=3, fraction_evaluate=0.0, **kwargs)
    bench = _Bench(strategy, 30, 3, with_count=True)
    count = np.array([10, -4], dtype=np.int64)
    for rnd in (1, 2, 3):
        _, metrics = bench.round(rnd)
        assert metrics is not None
        total = sum(_weight(pid) for pid in range(3))
        count = np.rint(sum(_weight(pid) / total * (count + pid + 1) for pid in range(3))).astype(np.int64)
        np.testing.assert_array_equal(bench.arrays["count"].numpy(), count)
        assert bench.arrays["count"].numpy().dtype == np.int64


def test_uplink_bytes_count_the_exact_arrays_the_voters_sent():
    """The same rounds with and without an integer array riding along: uplink bytes differ by exactly
    the bytes of the exact arrays the three voters sent (as downlink bytes count those sent down)."""
    runs = {}
    for with_count in (False, True):
        strategy = SSGDMajorityVote(k=6, min_available_nodes=3, min_train_nodes=3, fraction_evaluate=0.0)
        bench = _Bench(strategy, 30, 3, with_count=with_count)
        runs[with_count] = [bench.round(rnd)[1]["uplink_bytes"] for rnd in (1, 2)]
    one = len(Array(np.array([10, -4], dtype=np.int64)).data)
    assert [b - a for a, b in zip(runs[False], runs[True])] == [3 * one, 3 * one]


def test_add_drop_votes_are_stored_as_int32():
    """Module docstring: the server keeps each client's current vote at 4 bytes per position (int32)."""
    strategy = SSGDMajorityVote(k=10, add_drop_k=3, min_available_nodes=3, min_train_nodes=3, fraction_evaluate=0.0)
    bench = _Bench(strategy, 200, 3)
    for rnd in (1, 2):
        bench.round(rnd)
        assert sorted(strategy.votes) == [node_id(pid) for pid in range(3)]
        for node, (vote_round, vote) in strategy.votes.items():
            assert vote_round == rnd and vote.dtype == torch.int32 and vote.numel() == 10, node
        strategy.check_vote_invariants()


# ====================================================================== malformed votes
def _set_vote(reply, numel, *, kind, vote=None, adds=None, drops=None, base_round=None):
    """Rewrite a vote reply: its report's vote kind (and base round) and its vote records."""
    for key in (protocol.VOTE, protocol.VOTE_ADD, protocol.VOTE_DROP):
        if key in reply.content.array_records:
            del reply.content[key]
    for key, positions in ((protocol.VOTE, vote), (protocol.VOTE_ADD, adds), (protocol.VOTE_DROP, drops)):
        if positions is not None:
            t = torch.tensor(sorted(positions), dtype=torch.int64)
            reply.content[key] = codec.encode_positions(t, numel, positions="raw")
    changes = {"vote_kind": kind} | ({} if base_round is None else {"vote_base_round": base_round})
    return _report_with(reply, **changes)


NUMEL, K_VOTE, K_AD = 60, 6, 2


def _outside(vote):
    return [p for p in range(NUMEL) if p not in vote]


FULL_VOTE_CASES = {
    "no vote record": (lambda v: dict(kind="full"), f"full vote has no {protocol.VOTE!r} ArrayRecord"),
    "K - 1 positions": (lambda v: dict(kind="full", vote=range(K_VOTE - 1)), f"a vote must have exactly K={K_VOTE} positions, got {K_VOTE - 1}"),
    "K + 1 positions": (lambda v: dict(kind="full", vote=range(K_VOTE + 1)), f"payload declares nnz={K_VOTE + 1}, more than the allowed {K_VOTE}"),
    "add-drop to a full-vote strategy": (lambda v: dict(kind="add-drop", adds=[1], drops=[2], base_round=-1), "add-drop vote, but this strategy takes full votes"),
    "unknown kind": (lambda v: dict(kind="bogus", vote=range(K_VOTE)), "unknown vote-kind 'bogus'"),
}

ADD_DROP_CASES = {
    "no drop record": (
        lambda v: dict(kind="add-drop", adds=_outside(v)[:1], base_round=1),
        f"add-drop vote needs {protocol.VOTE_ADD!r} and {protocol.VOTE_DROP!r} records",
    ),
    "no add record": (
        lambda v: dict(kind="add-drop", drops=v[:1], base_round=1),
        f"add-drop vote needs {protocol.VOTE_ADD!r} and {protocol.VOTE_DROP!r} records",
    ),
    "1 add, 2 drops": (lambda v: dict(kind="add-drop", adds=_outside(v)[:1], drops=v[:2], base_round=1), "1 adds but 2 drops"),
    "another base round": (
        lambda v: dict(kind="add-drop", adds=_outside(v)[:1], drops=v[:1], base_round=5),
        "add-drop relative to vote of round 5, which the server does not hold",
    ),
    "add already voted": (lambda v: dict(kind="add-drop", adds=v[:1], drops=v[1:2], base_round=1), "an added position is already in the client's vote"),
    "drop not voted": (
        lambda v: dict(kind="add-drop", adds=_outside(v)[:1], drops=_outside(v)[1:2], base_round=1),
        "a dropped position is not in the client's vote",
    ),
    # each record is capped at K_ad on its own header (the other one alone would not catch it)
    "K_ad + 1 adds": (
        lambda v: dict(kind="add-drop", adds=_outside(v)[: K_AD + 1], drops=v[:K_AD], base_round=1),
        f"payload declares nnz={K_AD + 1}, more than the allowed {K_AD}",
    ),
    "K_ad + 1 drops": (
        lambda v: dict(kind="add-drop", adds=_outside(v)[:K_AD], drops=v[: K_AD + 1], base_round=1),
        f"payload declares nnz={K_AD + 1}, more than the allowed {K_AD}",
    ),
    "K_ad + 1 adds and drops": (
        lambda v: dict(kind="add-drop", adds=_outside(v)[: K_AD + 1], drops=v[: K_AD + 1], base_round=1),
        f"payload declares nnz={K_AD + 1}, more than the allowed {K_AD}",
    ),
}


def _assert_client_0_vote_rejected(strategy, server_round, messages, caplog, reason):
    """Counted once, logged with its reason, and client 0 is not asked for values."""
    assert strategy.state.round_metrics[server_round]["vote_failures"] == 1
    assert sorted(m.metadata.dst_node_id for m in messages) == [node_id(1), node_id(2)]
    lines = [r.getMessage() for r in caplog.records]
    assert f"round {server_round}: rejected vote from client {node_id(0)}: {reason}" in lines, lines


@pytest.mark.parametrize("case", sorted(FULL_VOTE_CASES))
def test_a_malformed_full_vote_is_rejected_with_its_reason(case, caplog):
    rewrite, reason = FULL_VOTE_CASES[case]

    def tamper(phase, pid, reply):
        if phase == protocol.PHASE_VOTE and pid == 0:
            return _set_vote(reply, NUMEL, **rewrite(None))
        return reply

    strategy = SSGDMajorityVote(k=K_VOTE, positions="raw", min_available_nodes=3, min_train_nodes=3, fraction_evaluate=0.0)
    bench = _Bench(strategy, NUMEL, 3, tamper=tamper)
    with caplog.at_level(logging.WARNING, logger="flwr"):
        messages, _ = bench.round(1)
    _assert_client_0_vote_rejected(strategy, 1, messages, caplog, reason)


@pytest.mark.parametrize("case", sorted(ADD_DROP_CASES))
def test_a_malformed_add_drop_vote_is_rejected_and_the_standing_vote_stays(case, caplog):
    rewrite, reason = ADD_DROP_CASES[case]
    strategy = SSGDMajorityVote(
        k=K_VOTE, add_drop_k=K_AD, positions="raw", min_available_nodes=3, min_train_nodes=3, fraction_evaluate=0.0
    )

    def tamper(phase, pid, reply):
        if phase == protocol.PHASE_VOTE and pid == 0 and Report.read(reply.content).server_round == 2:
            standing = strategy.votes[node_id(0)][1].tolist()
            return _set_vote(reply, NUMEL, **rewrite(standing))
        return reply

    bench = _Bench(strategy, NUMEL, 3, tamper=tamper)
    bench.round(1)
    standing = strategy.votes[node_id(0)][1].clone()
    with caplog.at_level(logging.WARNING, logger="flwr"):
        messages, _ = bench.round(2)
    _assert_client_0_vote_rejected(strategy, 2, messages, caplog, reason)
    # M_sum still holds client 0's round-1 vote, unchanged
    assert strategy.votes[node_id(0)][0] == 1 and torch.equal(strategy.votes[node_id(0)][1], standing)
    strategy.check_vote_invariants()


# ====================================================================== select_mask
def _fresh(**kwargs) -> SSGDMajorityVote:
    strategy = SSGDMajorityVote(min_available_nodes=1, **kwargs)
    strategy.initialize(ArrayRecord({"w": Array(np.zeros(NUMEL, np.float32))}))
    return strategy


def test_random_tie_break_is_random_and_index_tie_break_takes_the_lowest():
    """Every position gets one vote: the K-th count is tied everywhere (Alg. 1 l. 14 leaves the choice open)."""
    votes = [torch.arange(i * K_VOTE, (i + 1) * K_VOTE) for i in range(5)]  # 30 distinct positions, one vote each
    lowest = list(range(K_VOTE))
    index = _fresh(k=K_VOTE, tie_break="index")
    assert all(index.select_mask(t, votes).tolist() == lowest for t in range(1, 6))
    randomised = _fresh(k=K_VOTE, tie_break="random", seed=3)
    masks = [tuple(randomised.select_mask(t, votes).tolist()) for t in range(1, 9)]
    assert len(set(masks)) > 4 and tuple(lowest) not in masks, masks
    assert all(set(m) <= set(range(5 * K_VOTE)) and len(m) == K_VOTE for m in masks)
    # reproducible: the same seed and round give the same mask
    again = _fresh(k=K_VOTE, tie_break="random", seed=3)
    assert [tuple(again.select_mask(t, votes).tolist()) for t in range(1, 9)] == masks


@pytest.mark.parametrize("selection", ["majority", "weighted"])
def test_mask_vote_share_is_the_fraction_of_votes_on_the_mask(selection):
    strategy = _fresh(k=3, selection=selection, tie_break="index")
    votes = [torch.tensor([0, 1, 2]), torch.tensor([0, 1, 3]), torch.tensor([0, 4, 5])]
    mask = strategy.select_mask(7, votes)  # no round entry yet: select_mask creates it
    counts = {0: 3, 1: 2, 2: 1, 3: 1, 4: 1, 5: 1}
    share = sum(counts[p] for p in mask.tolist()) / 9
    assert strategy.state.round_metrics[7] == {"round": 7, "mask_vote_share": pytest.approx(share)}
    if selection == "majority":
        assert mask.tolist() == [0, 1, 2] and share == pytest.approx(6 / 9)
    # no votes at all: the share is undefined (NaN), the mask is still K positions
    mask = strategy.select_mask(8, [])
    assert mask.numel() == 3 and math.isnan(strategy.state.round_metrics[8]["mask_vote_share"])


def test_a_client_whose_vote_never_arrives_is_synced_densely_next_time():
    """Asked to vote, no reply at all: it may have applied the sync, so the server forgets which model it holds."""

    def tamper(phase, pid, reply):
        lost = phase == protocol.PHASE_VOTE and pid == 0 and Report.read(reply.content).server_round == 2
        return None if lost else reply

    strategy = SSGDMajorityVote(k=K_VOTE, min_available_nodes=3, min_train_nodes=3, fraction_evaluate=0.0)
    bench = _Bench(strategy, NUMEL, 3, tamper=tamper)
    bench.round(1)
    assert node_id(0) in strategy.state.client_versions
    bench.round(2)
    assert node_id(0) not in strategy.state.client_versions
    assert node_id(1) in strategy.state.client_versions and node_id(2) in strategy.state.client_versions
    bench.round(3)
    votes3 = [Instruction.read(m.content) for m in bench.grid.sent]
    sync = {
        m.metadata.dst_node_id: i.sync_mode
        for m, i in zip(bench.grid.sent, votes3)
        if i.server_round == 3 and i.phase == protocol.PHASE_VOTE
    }
    assert sync[node_id(0)] == "dense" and sync[node_id(1)] != "dense", sync


def test_the_vote_invariant_check_catches_a_corrupted_vote_sum():
    """check_vote_invariants (run by the tests after every add-drop round) must fail on a wrong M_sum."""
    strategy = SSGDMajorityVote(k=K_VOTE, add_drop_k=2, min_available_nodes=3, min_train_nodes=3, fraction_evaluate=0.0)
    bench = _Bench(strategy, NUMEL, 3)
    for t in (1, 2):
        bench.round(t)
        strategy.check_vote_invariants()  # holds after honest rounds
    strategy.m_sum[int(strategy.votes[node_id(1)][1][0])] += 1
    with pytest.raises(AssertionError, match="^M_sum differs from the sum of the clients' votes"):
        strategy.check_vote_invariants()


def test_k_ad_is_zero_without_add_drop_and_at_most_k_with_it():
    assert SSGDMajorityVote(k=7).k_ad_for(1000) == 0
    assert SSGDMajorityVote(k=7, add_drop_k=3).k_ad_for(1000) == 3
    # never more changes than the vote holds: refused when both are counts, capped when the vote is a ratio
    with pytest.raises(ValueError, match="add_drop_k must be <= k"):
        SSGDMajorityVote(k=7, add_drop_k=30)
    assert SSGDMajorityVote(ratio=0.007, add_drop_k=30).k_ad_for(1000) == 7
