"""SSGD-MV / -RS / -AD ([OOG] Algorithms 1 and 2) end to end, in process.

The real strategy (:class:`~fl_sparse.strategies.SSGDMajorityVote`: vote
phase inside ``configure_train``, values phase through ``aggregate_train``)
talks through :class:`inprocess.InProcessGrid` to a real ``ClientApp`` made
of :class:`~fl_sparse.clients.SparseMod` in front of a plain, deterministic
user train function (``w ← w − Δ(partition, round)``). Client state is
read back from the clients' state files (:class:`ClientStateStore`).

Oracles are written here from the paper: each client's ``a = e + Δ``,
vote ``supp Top_K(|a|)``, the mask (top-K of the vote counts), the weighted
aggregate on the mask, ``e ← a − a[M]``, the server error δ of a lossy
downlink, and the add-drop ``M_sum`` rebuilt from the vote replies on the
wire. The Flower (Ray) simulation is exercised by the ``slow`` test at the end.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import math
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MessageType, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.logger import FLOWER_LOGGER
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from inprocess import InProcessGrid

from fl_sparse import codec, protocol
from fl_sparse.clients import SparseMod
from fl_sparse.clients.mod import _stored_vote
from fl_sparse.clients.state import ClientStateStore
from fl_sparse.compressors import TopK
from fl_sparse.protocol import Instruction, Report
from fl_sparse.sparse import SparseTensor
from fl_sparse.strategies import SSGDMajorityVote, build_strategy

FLOWER_LOGGER.setLevel(logging.WARNING)

VOTE, VALUES = protocol.PHASE_VOTE, protocol.PHASE_VALUES


def node_of(pid: int) -> int:
    return 1000 + 7 * pid  # InProcessGrid's node ids


def pid_of(node: int) -> int:
    return (node - 1000) // 7


def heavy_step(pid: int, server_round: int, numel: int) -> torch.Tensor:
    """A client's local step Δ: heavy-tailed (no ties in |a|), fixed by (partition, round)."""
    gen = torch.Generator().manual_seed(1_000 * pid + server_round)
    return torch.randn(numel, generator=gen) ** 3 * 1e-2


# ====================================================================== harness
class Bench:
    """A strategy, an InProcessGrid and a real ClientApp (SparseMod + a plain train function).

    ``lose`` holds (partition, phase) pairs whose reply is turned into an
    error reply on its way back (the client ran and saved its state). Every
    reply the server receives is logged with the request it answers.
    """

    def __init__(self, root, strategy, *, numel, clients, step=None, weight=None, loss=None):
        self.root = Path(root)
        self.numel = numel
        self.strategy = strategy
        self.step = step or (lambda pid, t: heavy_step(pid, t, numel))
        self.weight = weight or (lambda pid, t: 10 + 7 * pid)
        self.loss = loss or (lambda pid, t: 1.0)
        self.calls: dict[tuple[int, int], np.ndarray] = {}  # (pid, round) -> the w the user got
        self.lose: set[tuple[int, str]] = set()
        self.rewrite = None  # (instruction, pid, reply) -> the reply the server gets instead
        self.log: list[tuple[int, str, int, Message, Message]] = []  # round, phase, pid, request, reply
        self.models: dict[int, torch.Tensor] = {}  # server model per version

        app = ClientApp(mods=[SparseMod()])

        @app.train()
        def train(msg: Message, context) -> Message:
            pid = int(context.node_config["partition-id"])
            server_round = int(msg.content["config"]["server-round"])
            w = msg.content["arrays"]["w"].numpy()
            assert (pid, server_round) not in self.calls, "the user's train function runs once per round"
            self.calls[(pid, server_round)] = w.copy()
            trained = w - self.step(pid, server_round).numpy()
            metrics = MetricRecord({"num-examples": self.weight(pid, server_round), "train-loss": self.loss(pid, server_round)})
            return Message(RecordDict({"arrays": ArrayRecord({"w": Array(trained)}), "metrics": metrics}), reply_to=msg)

        self.grid = InProcessGrid(app, clients, node_config=lambda i: {"state-dir": str(self.root)}, tamper=self._tamper)
        self.arrays = ArrayRecord({"w": Array(np.linspace(-1, 1, numel, dtype=np.float32))})
        strategy.initialize(self.arrays)
        # the mod's folder for this strategy run (clients.mod.state_folder_name)
        self.store = ClientStateStore(self.root / f"gen-{strategy.state.generation}", durable=False)
        strategy.identify(self.grid)
        self.models[0] = strategy.state.model.clone()

    def _tamper(self, node: int, reply: Message) -> Message:
        request = self.grid.sent[-1]  # send_and_receive calls tamper right after the request it answers
        instr = Instruction.read(request.content)
        pid = pid_of(node)
        if (pid, instr.phase) in self.lose and not reply.has_error():
            reply = Message(error=Error(code=2, reason="reply lost"), metadata=reply.metadata)
        if self.rewrite is not None and not reply.has_error():
            reply = self.rewrite(instr, pid, reply)
        self.log.append((instr.server_round, instr.phase, pid, request, reply))
        return reply

    # ------------------------------------------------------------- rounds
    def round(self, server_round: int, config: dict | None = None, between=None):
        """One Flower round as Strategy.start runs it; ``between()`` runs between the two phases."""
        cfg = ConfigRecord(dict(config or {"local-steps": 1}))
        messages = list(self.strategy.configure_train(server_round, self.arrays, cfg, self.grid))
        if between is not None:
            between()
        replies = self.grid.send_and_receive(messages)
        arrays, metrics = self.strategy.aggregate_train(server_round, replies)
        if arrays is not None:
            self.arrays = arrays
        self.models[self.strategy.state.version] = self.strategy.state.model.clone()
        return metrics

    # ------------------------------------------------------------- reading
    def entries(self, server_round: int, phase: str):
        return [(pid, req, rep) for t, ph, pid, req, rep in self.log if t == server_round and ph == phase]

    def voters(self, server_round: int) -> list[int]:
        """Partitions asked to vote in the round."""
        return sorted(pid for pid, _, _ in self.entries(server_round, VOTE))

    def mask(self, server_round: int) -> torch.Tensor:
        """The mask M_t as sent to the clients (decoded from a values-phase request)."""
        masks = [codec.decode_positions(req.content.array_records[protocol.MASK], self.numel)
                 for _, req, _ in self.entries(server_round, VALUES)]
        assert masks and all(torch.equal(m, masks[0]) for m in masks)
        return masks[0]

    def delta(self, pid: int, server_round: int) -> torch.Tensor:
        """Δ as the mod computes it from the user's reply: w − (w − step), in float32."""
        w = self.calls[(pid, server_round)]
        return torch.from_numpy(w) - torch.from_numpy(w - self.step(pid, server_round).numpy())

    def state(self, pid: int):
        return self.store.load(f"client-{pid}")

    def lose_state(self, pid: int) -> None:
        self.store.delete(f"client-{pid}")


def topk_oracle(a: torch.Tensor, k: int) -> list[int]:
    return sorted(np.argsort(-np.abs(a.double().numpy()), kind="stable")[:k].tolist())


def majority_oracle(votes, k: int) -> list[int]:
    """Top-k positions by vote count, ties to the lowest position (``tie_break="index"``)."""
    counts = collections.Counter(p for v in votes for p in v)
    return sorted(sorted(counts, key=lambda p: (-counts[p], p))[:k])


def assert_majority(mask: torch.Tensor, counts: dict[int, int], k: int) -> None:
    """``mask`` holds K positions and no position outside it has more votes than one inside."""
    inside = [counts.get(p, 0) for p in mask.tolist()]
    outside = [c for p, c in counts.items() if p not in set(mask.tolist())]
    assert mask.numel() == k
    if outside:
        assert min(inside) >= max(outside)


def zero_on(a: torch.Tensor, mask) -> torch.Tensor:
    e = a.clone()
    e[torch.as_tensor(mask, dtype=torch.int64)] = 0
    return e


# ====================================================================== model, weights, errors
WEIGHTS = {0: [1, 30, 7, 2], 1: [40, 2, 7, 25], 2: [7, 5, 60, 1]}  # num-examples per partition and round


@pytest.mark.parametrize("fraction, values", [(1.0, "fp32"), (0.67, "fp32"), (1.0, "q4")])
def test_round_moves_the_model_by_the_vote_phase_weighted_mean_on_the_majority_mask(tmp_path, fraction, values):
    """Alg. 1 with unequal weights taken from the vote phase, checked against an oracle over 4 rounds.

    The values phase does not call the user's function: the weights (and
    train loss) the server uses come from the vote phase of the same round.
    With quantized values the client sends Q(a[M]) and keeps a − Q(a[M]).
    """
    numel, k = 500, 20
    strategy = SSGDMajorityVote(ratio=0.04, tie_break="index", fraction_train=fraction, fraction_evaluate=0.0, seed=4,
                                uplink_values=values)
    bench = Bench(
        tmp_path, strategy, numel=numel, clients=3,
        weight=lambda pid, t: WEIGHTS[pid][t - 1], loss=lambda pid, t: float(pid + 10 * t),
    )
    w = strategy.state.model.clone().double()
    e = {pid: torch.zeros(numel) for pid in range(3)}
    for t in range(1, 5):
        w_before = strategy.state.model.clone()
        metrics = bench.round(t)
        rm = strategy.state.round_metrics[t]
        voters = bench.voters(t)
        assert len(voters) == (3 if fraction == 1.0 else 2)
        assert rm["failures"] == 0 and rm["accepted"] == len(voters)
        a, votes = {}, {}
        for pid in voters:
            assert torch.equal(torch.from_numpy(bench.calls[(pid, t)]), w_before)  # the user trained on w_{t-1}
            a[pid] = e[pid] + bench.delta(pid, t)
            votes[pid] = topk_oracle(a[pid], k)
        for pid, _, reply in bench.entries(t, VOTE):
            assert codec.decode_positions(reply.content.array_records[protocol.VOTE], numel).tolist() == votes[pid]
        mask = majority_oracle(votes.values(), k)
        assert bench.mask(t).tolist() == mask
        n = {pid: WEIGHTS[pid][t - 1] for pid in voters}
        p = {pid: n[pid] / sum(n.values()) for pid in voters}
        sent = {pid: codec.lossy_values(a[pid][mask], values) for pid in voters}  # Q(a[M])
        if values != "fp32":
            assert not torch.equal(sent[voters[0]], a[voters[0]][mask])
        g = sum(p[pid] * sent[pid].double() for pid in voters)
        w[mask] -= g
        torch.testing.assert_close(strategy.state.model.double(), w, rtol=0, atol=2e-6)
        # the test can tell: the unweighted mean is far off
        assert float((g - sum(sent[pid].double() for pid in voters) / len(voters)).abs().max()) > 1e-3
        assert rm["train_loss"] == pytest.approx(sum(p[pid] * (pid + 10 * t) for pid in voters))
        assert metrics["num_examples"] == sum(n.values())
        for pid in voters:
            e[pid] = a[pid].clone()
            e[pid][mask] = a[pid][mask] - sent[pid]  # e ← a − Q(a[M])
        for pid in range(3):
            state = bench.state(pid)
            if state.error is not None:
                assert torch.equal(state.error, e[pid]), (t, pid)
                assert torch.equal(state.model, bench.models[state.model_version])  # exact copy of a server version
        if fraction == 1.0 and t > 1:
            assert rm["sync_modes"] == {"values": 3}  # the last round's clients get values only


def test_partial_participation_catch_up_and_values_lost_go_back_to_the_error(tmp_path):
    """Half the clients per round; a values reply lost (round 3) and a values message that never arrives (round 5).

    The client's error memory, read from its state file, is checked exactly
    every round against the oracle: nothing the server did not aggregate is lost.
    """
    numel, k = 400, 20
    strategy = SSGDMajorityVote(ratio=0.05, fraction_train=0.5, fraction_evaluate=0.0, seed=5)
    bench = Bench(tmp_path, strategy, numel=numel, clients=4, weight=lambda pid, t: 3 + 11 * pid + t)
    e_eff = {pid: torch.zeros(numel) for pid in range(4)}  # the error each client will compensate with next time
    stored = {pid: None for pid in range(4)}  # what its state file holds now
    w = strategy.state.model.clone().double()
    modes = collections.Counter()
    lost_reply, no_values = None, None
    for t in range(1, 10):
        sampled = strategy.sample(t, bench.grid)  # configure_train draws the same (seed, round) sample
        pids = sorted(pid_of(n) for n in sampled)
        bench.lose = set()
        if t == 3:
            lost_reply = pids[0]
            bench.lose = {(lost_reply, VALUES)}
        offline = set()
        if t == 5:
            no_values = pids[-1]
            offline = {node_of(no_values)}

        def between():
            bench.grid.online -= offline

        bench.round(t, between=between)
        bench.grid.online |= offline
        rm = strategy.state.round_metrics[t]
        assert bench.voters(t) == pids
        mask = bench.mask(t)
        accepted = [pid for pid in pids if pid != (lost_reply if t == 3 else None) and pid != (no_values if t == 5 else None)]
        assert rm["vote_failures"] == 0 and rm["accepted"] == len(accepted)
        assert rm["failures"] == (1 if t == 3 else 0)
        modes.update(rm["sync_modes"])
        # the mask is a majority of this round's votes
        a = {pid: e_eff[pid] + bench.delta(pid, t) for pid in pids}
        counts = collections.Counter(p for pid in pids for p in topk_oracle(a[pid], k))
        assert_majority(mask, counts, k)
        # the model moved by the accepted clients' weighted values on the mask
        n = {pid: 3 + 11 * pid + t for pid in accepted}
        w[mask] -= sum(n[pid] / sum(n.values()) * a[pid][mask].double() for pid in accepted)
        torch.testing.assert_close(strategy.state.model.double(), w, rtol=0, atol=2e-6)
        for pid in pids:
            if t == 5 and pid == no_values:
                # voted, never got the mask: nothing of a was sent, the client will use all of a
                e_eff[pid] = a[pid]  # (its file still holds the old error and a, kept for the values phase)
                assert bench.state(pid).extra["ssgd_a"].equal(a[pid])
                continue
            stored[pid] = zero_on(a[pid], mask)  # the client sent a[M] and kept the rest
            # a reply the server never took: the client is told next time and puts a[M] back
            e_eff[pid] = a[pid] if (t == 3 and pid == lost_reply) else stored[pid]
        for pid in range(4):
            if stored[pid] is not None:
                assert torch.equal(bench.state(pid).error, stored[pid]), (t, pid)
    assert lost_reply is not None and no_values is not None
    # each lost client took part again later and its error is exactly the oracle's (checked above); catch-up:
    assert modes["dense"] >= 4 + 1  # first contacts, then the client whose values reply failed
    assert modes["values"] + modes["set"] + modes["delta"] > 0
    assert any((t > 3 and lost_reply in bench.voters(t)) for t in range(4, 10))
    assert any((t > 5 and no_values in bench.voters(t)) for t in range(6, 10))


def test_values_phase_without_vote_state_is_refused(tmp_path):
    numel = 300
    strategy = SSGDMajorityVote(ratio=0.05, fraction_evaluate=0.0)
    bench = Bench(tmp_path, strategy, numel=numel, clients=2)
    bench.lose = {(1, VALUES)}
    bench.round(1)
    bench.lose = set()
    bench.round(2)
    assert strategy.state.round_metrics[2]["failures"] == 0
    assert strategy.state.round_metrics[2]["sync_modes"] == {"dense": 1, "values": 1}  # re-sync after the failure
    # e after round 2 = (a1 + Δ2) without M_2: nothing of a1 was lost
    a2 = bench.delta(1, 1) + bench.delta(1, 2)
    assert torch.equal(bench.state(1).error, zero_on(a2, bench.mask(2)))
    # a values request for a round without vote state: the client refuses (error reply)
    instr = strategy.instruction(99, phase=VALUES, vote_k=15)
    mask = codec.encode_positions(torch.arange(15), numel)
    msg = Message(RecordDict({protocol.RECORD: instr.to_record(), protocol.MASK: mask}), dst_node_id=node_of(1),
                  message_type=MessageType.TRAIN)
    (reply,) = bench.grid.send_and_receive([msg])
    assert reply.has_error() and "no vote-phase state" in reply.error.reason


@pytest.mark.parametrize("feedback", [True, False])
def test_lossy_downlink_keeps_the_server_error(tmp_path, feedback):
    """δ_t = (g_t + δ_{t−1}) − Q(g_t + δ_{t−1}) on M_t, over 5 rounds; w_t = w_{t−1} − Q(·) exactly."""
    numel, k = 400, 20
    captured: dict[int, SparseTensor] = {}

    class Capture(SSGDMajorityVote):
        def aggregate_updates(self, server_round, updates, weights):
            g = super().aggregate_updates(server_round, updates, weights)
            captured[server_round] = g
            return g

    strategy = Capture(ratio=0.05, downlink_values="q4", server_error_feedback=feedback, fraction_evaluate=0.0, seed=2)
    bench = Bench(tmp_path, strategy, numel=numel, clients=3, weight=lambda pid, t: 2 + 9 * pid)
    delta = torch.zeros(numel)
    e = {pid: torch.zeros(numel) for pid in range(3)}
    for t in range(1, 6):
        w_before = strategy.state.model.clone()
        bench.round(t)
        rm = strategy.state.round_metrics[t]
        assert rm["failures"] == 0 and rm["accepted"] == 3
        if t > 1:
            assert rm["sync_modes"] == {"values": 3}  # clients applied Q(·) and matched the server's hash
        mask = bench.mask(t)
        # g_t: the weighted mean of the clients' a on M_t (independent float64 check)
        a = {pid: e[pid] + bench.delta(pid, t) for pid in range(3)}
        n = {pid: 2 + 9 * pid for pid in range(3)}
        g_ref = sum(n[pid] / sum(n.values()) * a[pid][mask].double() for pid in range(3))
        g = captured[t]
        assert torch.equal(g.indices, mask)
        torch.testing.assert_close(g.values.double(), g_ref, rtol=0, atol=1e-6)
        # what went down, and δ
        c = g.values + delta[mask] if feedback else g.values.clone()
        q = codec.lossy_roundtrip(SparseTensor(mask, c, numel), values="q4").values
        assert not torch.equal(q, c)  # q4 really loses something
        if feedback:
            delta[mask] = c - q
            assert torch.equal(strategy.state.server_error.error, delta)
            assert rm["server_error_norm"] == pytest.approx(float(delta.norm()), rel=1e-6)
        else:
            assert strategy.state.server_error.norm() == 0.0 and rm["server_error_norm"] == 0.0
        w_expected = w_before.clone()
        w_expected[mask] -= q
        assert torch.equal(strategy.state.model, w_expected)
        for pid in range(3):
            e[pid] = zero_on(a[pid], mask)
    if feedback:  # δ accumulates outside the current mask too
        assert int((delta != 0).sum()) > k


def test_same_votes_profile_rs_draws_differ_from_majority_and_per_round_and_seed(tmp_path):
    """SSGD-MV-RS really draws ∝ votes: 2 seeds × 3 rounds through the grid, each run twice.

    Votes (every round, by construction): clients 0-2 vote 0..9, client 3
    votes 10..19, K = 10. Majority: exactly 0..9. Weighted: usually some of
    10..19 (P(0..9) ≈ 0.2 %), a fresh draw per round and per seed, the same
    draws again for the same seed.
    """
    numel, k = 100, 10

    def step(pid, t):
        s = torch.full((numel,), 1e-4)
        hot = slice(0, 10) if pid < 3 else slice(10, 20)
        s[hot] = 1.0 + 0.01 * torch.arange(10)  # dominant: the vote every round, whatever the error holds
        return s

    def run(selection, seed, sub):
        strategy = SSGDMajorityVote(k=k, selection=selection, fraction_evaluate=0.0, seed=seed, positions="raw")
        bench = Bench(tmp_path / f"{selection}-{seed}-{sub}", strategy, numel=numel, clients=4, step=step)
        strategy.start(bench.grid, bench.arrays, num_rounds=3, train_config=ConfigRecord({"local-steps": 1}))
        for t in (1, 2, 3):
            for pid, _, reply in bench.entries(t, VOTE):
                vote = codec.decode_positions(reply.content.array_records[protocol.VOTE], numel).tolist()
                assert vote == (list(range(10)) if pid < 3 else list(range(10, 20)))
        return [tuple(bench.mask(t).tolist()) for t in (1, 2, 3)]

    majority = run("majority", 0, 0)
    assert majority == [tuple(range(10))] * 3
    draws = {}
    for seed in (0, 1):
        first, again = run("weighted", seed, 0), run("weighted", seed, 1)
        assert first == again, "a fixed seed repeats the draws"
        draws[seed] = first
        for mask in first:
            assert len(mask) == k and set(mask) <= set(range(20))
            assert mask != tuple(range(10)), "RS must not be the majority mask"
        assert len(set(first)) == 3, "a fresh draw every round"
    assert draws[0] != draws[1], "another seed, other draws"


def test_rs_strategy_selects_positions_with_probability_proportional_to_votes():
    """K = 1 through the strategy's own select_mask: P(i) = votes_i / Σ votes, one draw per round."""
    strategy = SSGDMajorityVote(k=1, selection="weighted", seed=9)
    strategy.initialize(ArrayRecord({"w": Array(np.zeros(30, dtype=np.float32))}))
    votes = [torch.tensor([0, 3]), torch.tensor([3, 7]), torch.tensor([3, 7, 12]), torch.tensor([7, 20]), torch.tensor([7])]
    counts = {0: 1, 3: 3, 7: 4, 12: 1, 20: 1}
    trials = 4000
    hits = collections.Counter(int(strategy.select_mask(t, votes)) for t in range(1, trials + 1))
    assert set(hits) <= set(counts)
    total = sum(counts.values())
    chi2 = sum((hits[p] - trials * c / total) ** 2 / (trials * c / total) for p, c in counts.items())
    assert chi2 < 18.5, hits  # 4 degrees of freedom, 0.999 quantile; fixed seed: deterministic
    # majority on the same votes always takes position 7
    mv = SSGDMajorityVote(k=1, seed=9)
    mv.initialize(ArrayRecord({"w": Array(np.zeros(30, dtype=np.float32))}))
    assert {int(mv.select_mask(t, votes)) for t in range(1, 50)} == {7}


# ====================================================================== add-drop invariants
EVENTS = st.sampled_from(["ok", "ok", "ok", "offline", "vote_lost", "values_lost", "state_lost"])


def _vote_change(reply: Message, numel: int):
    report = Report.read(reply.content)
    arrays = reply.content.array_records
    if report.vote_kind == "full":
        return "full", codec.decode_positions(arrays[protocol.VOTE], numel), None
    assert report.vote_kind == "add-drop"
    return "add-drop", codec.decode_positions(arrays[protocol.VOTE_ADD], numel), codec.decode_positions(arrays[protocol.VOTE_DROP], numel)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(schedule=st.lists(st.lists(EVENTS, min_size=4, max_size=4), min_size=1, max_size=7), seed=st.integers(0, 99))
def test_add_drop_m_sum_is_the_sum_of_current_votes_under_dropout_and_rejoin(schedule, seed):
    """M_sum equals the sum of the clients' current votes, rebuilt from the vote replies on the wire.

    Drop-outs, lost vote / values replies and lost client state in any
    order; every stored vote has K distinct positions; the server's record
    of a client's vote is the vote that client will build on.
    """
    numel, k, k_ad = 300, 15, 3
    with tempfile.TemporaryDirectory() as root:
        strategy = SSGDMajorityVote(
            ratio=0.05, add_drop_ratio=0.01, seed=seed, fraction_evaluate=0.0, min_train_nodes=1, min_available_nodes=1
        )
        bench = Bench(root, strategy, numel=numel, clients=4)
        current: dict[int, set[int]] = {}  # the oracle's record of each client's standing vote
        lost_at: dict[int, int] = {}
        for server_round, events in enumerate(schedule, start=1):
            online = {node_of(pid) for pid, ev in enumerate(events) if ev != "offline"} or {node_of(0)}
            bench.grid.online = online
            bench.lose = {(pid, VOTE) for pid, ev in enumerate(events) if ev == "vote_lost"}
            bench.lose |= {(pid, VALUES) for pid, ev in enumerate(events) if ev == "values_lost"}
            for pid, ev in enumerate(events):
                if ev == "state_lost":
                    bench.lose_state(pid)
                    lost_at[pid] = server_round
            bench.round(server_round)
            rm = strategy.state.round_metrics[server_round]

            accepted_votes = 0
            for pid, _, reply in bench.entries(server_round, VOTE):
                if reply.has_error():
                    continue
                kind, x, y = _vote_change(reply, numel)
                if kind == "full":
                    assert x.numel() == k
                    current[pid] = set(x.tolist())
                else:
                    assert x.numel() == y.numel() <= k_ad
                    assert set(y.tolist()) <= current[pid] and not set(x.tolist()) & current[pid]
                    current[pid] = (current[pid] - set(y.tolist())) | set(x.tolist())
                accepted_votes += 1
            assert rm["vote_accepted"] == accepted_votes  # every vote that arrived was valid

            # M_sum == Σ of the standing votes (independent of the server's own bookkeeping)
            expected = torch.zeros(numel, dtype=torch.int64)
            for vote in current.values():
                assert len(vote) == k
                expected[list(vote)] += 1
            assert torch.equal(strategy.m_sum.to(torch.int64), expected)
            assert {pid_of(n) for n in strategy.votes} == set(current)
            strategy.check_vote_invariants()
            # the mask is the top-K of M_sum
            if bench.entries(server_round, VALUES):
                assert_majority(bench.mask(server_round), {i: int(c) for i, c in enumerate(expected) if c}, k)
            # the server's record of each vote is the one the client will build on
            for node, (vote_round, vote) in strategy.votes.items():
                assert set(vote.tolist()) == current[pid_of(node)]
                mine = _stored_vote(bench.state(pid_of(node)), vote_round)
                if mine is not None:
                    assert torch.equal(mine.to(torch.int64), vote.to(torch.int64))
                else:  # only a client that lost its state since may have forgotten it (it will send a full vote)
                    assert lost_at.get(pid_of(node), -1) > vote_round
            injected = sum(ev in ("vote_lost", "values_lost", "state_lost") for pid, ev in enumerate(events)
                           if node_of(pid) in online)
            assert rm["failures"] <= injected, (events, rm["failures"])


def test_rejoining_client_sends_add_drop_against_its_standing_vote(tmp_path):
    strategy = SSGDMajorityVote(ratio=0.05, add_drop_ratio=0.01, fraction_evaluate=0.0)
    bench = Bench(tmp_path, strategy, numel=300, clients=3)

    def kinds(t):
        return {pid: Report.read(rep.content).vote_kind for pid, _, rep in bench.entries(t, VOTE) if not rep.has_error()}

    bench.round(1)
    assert kinds(1) == {0: "full", 1: "full", 2: "full"}
    assert all(v[0] == 1 for v in strategy.votes.values())
    bench.grid.online = {node_of(0), node_of(1)}  # client 2 is away; its round-1 vote stands
    bench.round(2)
    assert strategy.votes[node_of(2)][0] == 1 and strategy.votes[node_of(0)][0] == 2
    strategy.check_vote_invariants()
    bench.grid.online = set(bench.grid.node_ids)
    bench.round(3)
    assert kinds(3) == {0: "add-drop", 1: "add-drop", 2: "add-drop"}
    assert strategy.state.round_metrics[3]["failures"] == 0
    strategy.check_vote_invariants()
    # a client whose state is lost cannot apply the values-only sync: it fails, gets a dense sync next time
    bench.lose_state(1)
    bench.round(4)
    assert strategy.state.round_metrics[4]["failures"] == 1 and strategy.votes[node_of(1)][0] == 3
    strategy.check_vote_invariants()  # its round-3 vote still stands
    for t, expected in ((5, "full"), (6, "add-drop")):
        bench.round(t)
        assert kinds(t)[1] == expected and kinds(t)[0] == kinds(t)[2] == "add-drop"
        assert strategy.state.round_metrics[t]["failures"] == 0
        assert strategy.votes[node_of(1)][0] == t
        strategy.check_vote_invariants()  # the stale vote left M_sum when the full one came in


def test_malformed_add_drop_votes_are_rejected_without_touching_m_sum(tmp_path):
    """Client 0's real add-drop vote reply is rewritten into a malformed one, one kind per round.

    The reply keeps the client's own report (round, model hash, ...) and only
    its vote changes, so each rejection is for that fault alone; client 1
    votes honestly meanwhile. Last round: client 0's honest vote is taken.
    """
    numel = 300
    strategy = SSGDMajorityVote(ratio=0.05, add_drop_ratio=0.01, fraction_evaluate=0.0)
    bench = Bench(tmp_path, strategy, numel=numel, clients=2)
    bench.round(1)

    def outside(vote):
        return torch.tensor(sorted(set(range(numel)) - set(vote.tolist()))[:2])

    faults = [
        ("adds already in the vote", lambda v: (v[:2], v[2:4], None, None)),
        ("drops not in the vote", lambda v: (outside(v), outside(v), None, None)),
        ("2 adds, 1 drop", lambda v: (outside(v), v[:1], None, None)),
        ("unknown base vote", lambda v: (outside(v)[:1], v[:1], 7, None)),
        ("more than K_ad = 3 changes", lambda v: (torch.tensor(sorted(set(range(numel)) - set(v.tolist()))[:10]), v[:10], None, None)),
        ("unknown vote kind", lambda v: (outside(v)[:1], v[:1], None, "maybe")),
    ]
    for t, (what, fault) in enumerate(faults, start=2):
        standing = strategy.votes[node_of(0)][1].to(torch.int64)
        before = strategy.m_sum.clone()

        def rewrite(instr, pid, reply, fault=fault, standing=standing):
            if pid != 0 or instr.phase != VOTE:
                return reply
            adds, drops, base, kind = fault(standing)
            report = Report.read(reply.content)
            assert report.vote_kind == "add-drop"
            content = RecordDict({k: v for k, v in reply.content.items() if k not in (protocol.VOTE_ADD, protocol.VOTE_DROP)})
            content[protocol.RECORD] = dataclasses.replace(
                report, vote_kind=kind or report.vote_kind,
                vote_base_round=report.vote_base_round if base is None else base,
            ).to_record()
            content[protocol.VOTE_ADD] = codec.encode_positions(adds, numel)
            content[protocol.VOTE_DROP] = codec.encode_positions(drops, numel)
            return Message(content=content, metadata=reply.metadata)

        bench.rewrite = rewrite
        bench.round(t)
        rm = strategy.state.round_metrics[t]
        assert rm["vote_failures"] == 1 and rm["vote_accepted"] == 1, what
        assert torch.equal(strategy.votes[node_of(0)][1].to(torch.int64), standing), what
        # M_sum moved by client 1's honest changes only
        (_, _, honest), = [e for e in bench.entries(t, VOTE) if e[0] == 1]
        kind, adds, drops = _vote_change(honest, numel)
        expected = before.clone()
        if kind == "add-drop":
            expected[adds] += 1
            expected[drops] -= 1
        assert torch.equal(strategy.m_sum, expected), what
        strategy.check_vote_invariants()
    bench.rewrite = None
    t = len(faults) + 2
    bench.round(t)  # client 0 (re-synced densely) votes add-drop against its standing vote again: taken
    rm = strategy.state.round_metrics[t]
    assert rm["vote_failures"] == 0 and rm["vote_accepted"] == 2 and rm["failures"] == 0
    assert {Report.read(rep.content).vote_kind for _, _, rep in bench.entries(t, VOTE)} == {"add-drop"}
    assert strategy.votes[node_of(0)][0] == t
    strategy.check_vote_invariants()


# ====================================================================== bit accounting
@pytest.mark.parametrize("positions", ["block", "rice", "raw"])
@pytest.mark.parametrize("variant", ["ssgd-mv", "ssgd-mv-ad", "ssgd-mv-rs"])
def test_q_metrics_are_the_encoded_payload_bits_per_parameter_per_local_step(tmp_path, variant, positions):
    numel, H = 2_000, 4
    strategy = build_strategy(variant, ratio=0.02, add_drop_ratio=0.002, value_bits=4, positions=positions, seed=3,
                              fraction_evaluate=0.0)
    bench = Bench(tmp_path, strategy, numel=numel, clients=3)
    k = TopK(ratio=0.02).k_for(numel)
    previous_values = None
    for t in (1, 2, 3):
        bench.round(t, {"local-steps": H})
        rm = strategy.state.round_metrics[t]
        votes, values = bench.entries(t, VOTE), bench.entries(t, VALUES)
        assert rm["failures"] == 0 and rm["accepted"] == 3
        vote_bits = [sum(codec.wire_size(rec).position_bits for rec in rep.content.array_records.values()) for _, _, rep in votes]
        value_bits = [codec.wire_size(rep.content.array_records[protocol.UPDATE]).value_bits for _, _, rep in values]
        mask_record = values[0][1].content.array_records[protocol.MASK]
        assert rm["q_loc_up"] == pytest.approx(sum(vote_bits) / 3 / (numel * H), rel=1e-12)
        assert rm["q_val_up"] == pytest.approx(sum(value_bits) / 3 / (numel * H), rel=1e-12)
        assert rm["q_loc_down"] == pytest.approx(codec.wire_size(mask_record).position_bits / (numel * H), rel=1e-12)
        assert rm["q_val_down"] == pytest.approx(codec.wire_size(strategy.values_record).value_bits / (numel * H), rel=1e-12)
        # bytes: every array record that went over the wire this round
        up = sum(codec.wire_size(rec).total_bytes for _, _, rep in votes + values for rec in rep.content.array_records.values())
        down = sum(codec.wire_size(rec).total_bytes for _, req, _ in votes + values for rec in req.content.array_records.values())
        assert rm["uplink_bytes"] == up and rm["downlink_bytes"] == down
        assert value_bits == [4 * k + 32 * 8] * 3  # q4: 4 bits per value + 2^(4-1) = 8 float32 interval means
        assert rm["q_val_down"] == pytest.approx(32 * k / (numel * H))  # the paper's downlink keeps fp32
        if variant == "ssgd-mv-ad" and t > 1:
            k_ad = TopK(ratio=0.002).k_for(numel)
            assert all(Report.read(rep.content).vote_kind == "add-drop" for _, _, rep in votes)
            assert rm["q_loc_up"] < rm["q_loc_down"]
            assert rm["vote_changes"] <= k_ad
        if t > 1:  # clients of the last round get the aggregate as values only
            syncs = [Instruction.read(req.content).sync_mode for _, req, _ in votes]
            assert syncs == ["values"] * 3
            assert all(req.content.array_records[protocol.SYNC] is previous_values for _, req, _ in votes)
        previous_values = strategy.values_record


@pytest.mark.parametrize("kw", [{}, {"selection": "weighted"}, {"add_drop_ratio": 0.01}])
def test_same_seed_same_masks_and_model(tmp_path, kw):
    runs = []
    for run in range(2):
        strategy = SSGDMajorityVote(ratio=0.05, fraction_train=0.75, seed=11, fraction_evaluate=0.0, **kw)
        bench = Bench(tmp_path / str(run), strategy, numel=300, clients=4)
        for t in (1, 2, 3):
            bench.round(t)
        runs.append(([bench.mask(t) for t in (1, 2, 3)], strategy.state.model.clone()))
    assert all(torch.equal(a, b) for a, b in zip(runs[0][0], runs[1][0]))
    assert torch.equal(runs[0][1], runs[1][1])


def test_build_ssgd_mv_names():
    mv = build_strategy("ssgd-mv", ratio=0.01, value_bits=32, positions="block")
    rs = build_strategy("ssgd-mv-rs", ratio=0.01, value_bits=4, positions="rice")
    ad = build_strategy("ssgd-mv-ad", ratio=0.01, add_drop_ratio=0.001, value_bits=4, positions="block")
    assert isinstance(mv, SSGDMajorityVote) and mv.selection == "majority" and not mv.add_drop
    assert rs.selection == "weighted" and rs.uplink_values == "q4" and rs.positions == "rice"
    assert ad.add_drop and ad.k_ad_for(11_173_962) == 11_174 and ad.k_for(11_173_962) == 111_740
    assert ad.downlink_values == "fp32"
    from flwr.serverapp.strategy import FedAvg

    assert isinstance(ad, FedAvg)
    with pytest.raises(ValueError):
        build_strategy("ssgd-mv-ad", ratio=0.001, add_drop_ratio=0.01)


# ====================================================================== Flower simulation
@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ssgd-mv", "ssgd-mv-ad", "ssgd-mv-rs"])
def test_flower_simulation(tmp_path, strategy):
    from fl_sparse.server_app import RunConfig
    from fl_sparse.simulations.runner import simulate

    cfg = RunConfig(
        strategy=strategy, dataset="fashion-mnist", model="mlp-784-64-10", clients=3, rounds=2, local_steps=2,
        batch_size=32, lr=0.1, ratio=0.05, add_drop_ratio=0.01, positions="block", seed=1, quiet=True, out=str(tmp_path),
    )
    rows = simulate(cfg)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert [r["round"] for r in metrics] == [1, 2]
    for r in metrics:
        for key in ("q_loc_up", "q_val_up", "q_loc_down", "q_val_down"):
            assert isinstance(r[key], float) and math.isfinite(r[key]) and r[key] > 0, (key, r)
        assert r["failures"] == 0 and r["accepted"] == 3
        assert r["q_val_up"] == pytest.approx(32 * 0.05 / 2, rel=0.01)  # fp32 values of K = ⌈φ d⌉, per local step
    assert metrics[1]["sync_modes"] == {"values": 3}
    assert metrics[-1]["test_accuracy"] > 0.10
    assert rows[-1]["test_accuracy"] == metrics[-1]["test_accuracy"]
    if strategy == "ssgd-mv-ad":
        assert metrics[1]["q_loc_up"] < metrics[0]["q_loc_up"]  # add-drop vote after the first full one
