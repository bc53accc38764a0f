"""SSGD-MV / -RS / -AD: mask selection, add-drop invariants, bit accounting, sync.

Most tests drive the real strategy (``configure_train`` runs the vote phase
on a grid, ``aggregate_train`` the values phase) against in-process clients
that run the real client-side code of :mod:`fl_sparse.clients.ssgd_mv`
(sync, vote / add-drop, values, error feedback) on synthetic local updates.
The Flower simulation itself is exercised by the ``slow`` tests at the end.
"""

from __future__ import annotations

import copy
import json
import math
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fl_sparse import codec
from fl_sparse.clients import ssgd_mv as client_mv
from fl_sparse.clients.state import ClientState
from fl_sparse.compressors import TopK
from fl_sparse.strategies import build_strategy
from fl_sparse.strategies.ssgd_mv import (
    SSGDMajorityVote,
    select_majority,
    select_weighted,
    vote_counts,
)


# ====================================================================== harness
@pytest.fixture(autouse=True)
def _task_identity():
    """Server-side Message() needs a run id outside a running ServerApp."""
    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 0
    yield
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved


class Client:
    """An in-process client: the real SSGD client code on a synthetic local update Δ."""

    def __init__(self, node: int, numel: int, scale: float = 1e-2) -> None:
        self.node, self.numel, self.scale = node, numel, scale
        self.state = ClientState()

    def step(self, server_round: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(1_000 * self.node + server_round)
        # heavy-tailed magnitudes, so the top-K is well defined
        return torch.randn(self.numel, generator=gen) ** 3 * self.scale

    def handle(self, msg: Message) -> Message:
        cfg = msg.content.config_records["config"]
        mtype = msg.metadata.message_type
        state = ClientState.from_payload(copy.deepcopy(self.state.to_payload()))  # like the file store
        if mtype == "train.vote":
            model_hash = client_mv.prepare_vote(state, cfg, msg.content, self.numel)
            content = client_mv.vote_step(state, self.step(int(cfg["server-round"])), cfg, model_hash=model_hash, loss=1.0)
        elif mtype == "train.values":
            content = client_mv.values_step(state, msg.content, cfg, num_examples=10 + self.node)
        else:
            raise AssertionError(mtype)
        self.state = state  # saved only after the handler succeeded
        return Message(content=content, reply_to=msg)


class Grid:
    """A Grid that delivers to in-process clients; can lose replies and take nodes offline."""

    def __init__(self, clients: dict[int, Client]) -> None:
        self.clients = clients
        self.online = set(clients)
        self.lose: set[tuple[int, str]] = set()  # (node, message type): the client runs, its reply is lost
        self.log: list[tuple[Message, Message]] = []

    def get_node_ids(self):
        return sorted(self.online)

    def send_and_receive(self, messages, timeout=None):
        replies = []
        for msg in messages:
            node, mtype = msg.metadata.dst_node_id, msg.metadata.message_type
            if mtype == "query.identify":
                reply = Message(content=RecordDict({"client": ConfigRecord({"partition-id": node})}), reply_to=msg)
            else:
                try:
                    reply = self.clients[node].handle(msg)
                except Exception as exc:  # what Flower does with a raising ClientApp
                    reply = Message(error=Error(code=1, reason=repr(exc)), reply_to=msg)
                if (node, mtype) in self.lose:
                    reply = Message(error=Error(code=2, reason="reply lost"), reply_to=msg)
            self.log.append((msg, reply))
            replies.append(reply)
        return replies


def _arrays(numel: int) -> ArrayRecord:
    return ArrayRecord({"w": Array(torch.linspace(-1, 1, numel).numpy())})


def run_round(strategy, grid, server_round: int, config: ConfigRecord | None = None):
    """One Flower round as Strategy.start does it: configure_train, send, aggregate_train."""
    config = config or ConfigRecord({"local-steps": 1})
    messages = list(strategy.configure_train(server_round, _arrays(grid.numel), config, grid))
    replies = grid.send_and_receive(messages)
    return strategy.aggregate_train(server_round, replies)


def make(numel=400, clients=4, **kw):
    kw.setdefault("ratio", 0.05)
    kw.setdefault("positions", "block")
    strategy = SSGDMajorityVote(**kw)
    grid = Grid({n: Client(n, numel) for n in range(1, clients + 1)})
    grid.numel = numel
    return strategy, grid


# ====================================================================== mask selection
def test_majority_picks_the_most_voted_positions():
    numel, k = 50, 4
    votes = [torch.tensor([1, 5, 7, 9]), torch.tensor([1, 5, 7, 20]), torch.tensor([1, 5, 30, 40]), torch.tensor([1, 2, 3, 4])]
    positions, counts = vote_counts(votes)
    mask = select_majority(positions, counts, k, numel, generator=None)
    # counts: 1→4, 5→3, 7→2, then ties at 1 vote: lowest index first (tie_break="index")
    assert mask.tolist() == [1, 2, 5, 7]
    gen = lambda s: torch.Generator().manual_seed(s)  # noqa: E731
    masks = {tuple(select_majority(positions, counts, k, numel, generator=gen(s)).tolist()) for s in range(40)}
    assert all({1, 5, 7} <= set(m) and len(m) == k for m in masks)
    assert len(masks) > 1, "random tie-breaking should pick different single-vote positions"
    again = select_majority(positions, counts, k, numel, generator=gen(3))
    assert torch.equal(again, select_majority(positions, counts, k, numel, generator=gen(3)))  # reproducible


def test_majority_fills_up_when_fewer_than_k_positions_got_votes():
    mask = select_majority(torch.tensor([3, 8]), torch.tensor([2, 1]), 5, 20, generator=None)
    assert mask.tolist() == [0, 1, 2, 3, 8]
    mask = select_weighted(torch.tensor([3, 8]), torch.tensor([2, 1]), 5, 20, generator=torch.Generator().manual_seed(0))
    assert mask.numel() == 5 and {3, 8} <= set(mask.tolist())


@settings(max_examples=60, deadline=None)
@given(
    numel=st.integers(5, 300),
    data=st.data(),
)
def test_both_selections_return_k_distinct_sorted_positions(numel, data):
    k = data.draw(st.integers(1, numel))
    n_votes = data.draw(st.integers(1, 6))
    seed = data.draw(st.integers(0, 2**31))
    gen = torch.Generator().manual_seed(seed)
    votes = [torch.randperm(numel, generator=gen)[:k].sort().values for _ in range(n_votes)]
    positions, counts = vote_counts(votes)
    assert int(counts.sum()) == n_votes * k
    for mask in (
        select_majority(positions, counts, k, numel, generator=torch.Generator().manual_seed(seed)),
        select_majority(positions, counts, k, numel, generator=None),
        select_weighted(positions, counts, k, numel, generator=torch.Generator().manual_seed(seed)),
    ):
        assert mask.numel() == k
        assert bool((mask[1:] > mask[:-1]).all()) and 0 <= int(mask[0]) and int(mask[-1]) < numel
        if positions.numel() >= k:
            assert bool(torch.isin(mask, positions).all()), "only voted positions when there are enough"
    # majority: no unselected position has more votes than a selected one
    mask = select_majority(positions, counts, k, numel, generator=None)
    chosen = torch.isin(positions, mask)
    if chosen.any() and (~chosen).any():
        assert int(counts[chosen].min()) >= int(counts[~chosen].max())


def test_weighted_selection_is_proportional_to_votes():
    """K = 1: P(i) = w_i / Σw exactly; K = 2: the inclusion probabilities of sampling without replacement."""
    positions = torch.arange(6) * 3
    counts = torch.tensor([1, 2, 3, 4, 5, 10])
    p = counts / counts.sum()
    trials = 6000
    hits1 = torch.zeros(6)
    hits2 = torch.zeros(6)
    for s in range(trials):
        m1 = select_weighted(positions, counts, 1, 20, generator=torch.Generator().manual_seed(s))
        hits1[positions.tolist().index(int(m1))] += 1
        m2 = select_weighted(positions, counts, 2, 20, generator=torch.Generator().manual_seed(10**6 + s))
        assert m2.numel() == 2 and m2[0] != m2[1]
        hits2 += torch.isin(positions, m2).float()
    # chi-square, 5 degrees of freedom: 20.5 is the 0.999 quantile (fixed seeds: deterministic)
    chi2 = float((((hits1 - trials * p) ** 2) / (trials * p)).sum())
    assert chi2 < 20.5, (chi2, hits1.tolist())
    incl = torch.tensor([p[i] + sum(p[j] * p[i] / (1 - p[j]) for j in range(6) if j != i) for i in range(6)])
    sd = torch.sqrt(trials * incl * (1 - incl))
    assert bool(((hits2 - trials * incl).abs() < 4 * sd).all()), (hits2 / trials, incl)
    assert float(hits2.sum()) == 2 * trials


# ====================================================================== client-side add-drop
@settings(max_examples=80, deadline=None)
@given(numel=st.integers(10, 400), data=st.data())
def test_add_drop_keeps_k_positions_and_changes_at_most_k_ad(numel, data):
    k = data.draw(st.integers(1, numel))
    k_ad = data.draw(st.integers(0, k))
    seed = data.draw(st.integers(0, 2**31))
    gen = torch.Generator().manual_seed(seed)
    previous = torch.randperm(numel, generator=gen)[:k].sort().values
    a = torch.randn(numel, generator=gen)
    top = TopK(k)(a).indices
    vote, adds, drops = client_mv.add_drop(a, previous, top, k_ad)
    assert vote.numel() == k and torch.unique(vote).numel() == k
    assert adds.numel() == drops.numel() <= k_ad
    assert not bool(torch.isin(adds, previous).any()) and bool(torch.isin(adds, top).all())
    assert bool(torch.isin(drops, previous).all()) and not bool(torch.isin(drops, top).any())
    expected = set(previous.tolist()) - set(drops.tolist()) | set(adds.tolist())
    assert set(vote.tolist()) == expected
    n_new = len(set(top.tolist()) - set(previous.tolist()))
    assert adds.numel() == min(k_ad, n_new)
    if adds.numel():  # the largest |a| are added, the smallest dropped
        rest_new = torch.tensor(sorted(set(top.tolist()) - set(previous.tolist()) - set(adds.tolist())), dtype=torch.int64)
        if rest_new.numel():
            assert float(a[adds].abs().min()) >= float(a[rest_new].abs().max())
        rest_old = torch.tensor(sorted(set(previous.tolist()) - set(top.tolist()) - set(drops.tolist())), dtype=torch.int64)
        if rest_old.numel():
            assert float(a[drops].abs().max()) <= float(a[rest_old].abs().min())


# ====================================================================== AD invariants under churn
EVENTS = st.sampled_from(["ok", "ok", "ok", "offline", "vote_lost", "values_lost", "state_lost"])


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(schedule=st.lists(st.lists(EVENTS, min_size=4, max_size=4), min_size=1, max_size=7), seed=st.integers(0, 99))
def test_add_drop_m_sum_is_the_sum_of_current_votes_under_dropout_and_rejoin(schedule, seed):
    numel = 300
    strategy, grid = make(numel, clients=4, ratio=0.05, add_drop_ratio=0.01, seed=seed)
    k, k_ad = 15, 3
    lost_at: dict[int, int] = {}
    for server_round, events in enumerate(schedule, start=1):
        grid.online = {n for n, e in zip(sorted(grid.clients), events) if e != "offline"} or {1}
        grid.lose = set()
        for n, e in zip(sorted(grid.clients), events):
            if e == "vote_lost":
                grid.lose.add((n, "train.vote"))
            elif e == "values_lost":
                grid.lose.add((n, "train.values"))
            elif e == "state_lost":
                grid.clients[n].state = ClientState()
                lost_at[n] = server_round
        start = len(grid.log)
        run_round(strategy, grid, server_round)

        strategy.check_vote_invariants()  # M_sum == Σ stored votes, each exactly K positions
        assert int(strategy.m_sum.sum()) == k * len(strategy.votes)
        for msg, reply in grid.log[start:]:
            if msg.metadata.message_type != "train.vote" or reply.has_error():
                continue
            kind = reply.content.config_records["client"]["vote-kind"]
            arrays = reply.content.array_records
            if kind == "full":
                assert codec.decode_positions(arrays["vote"], numel).numel() == k
            else:
                adds = codec.decode_positions(arrays["vote-add"], numel)
                drops = codec.decode_positions(arrays["vote-drop"], numel)
                assert adds.numel() == drops.numel() <= k_ad
        # the server's record of each client's vote is the vote that client will build on
        for node, (vote_round, vote) in strategy.votes.items():
            stored = client_mv._stored_vote(grid.clients[node].state, vote_round)
            if stored is not None:
                assert torch.equal(stored.to(torch.int64), vote.to(torch.int64))
            else:  # only a client that lost its state since may have forgotten it (it will send a full vote)
                assert lost_at.get(node, -1) > vote_round
        rm = strategy.state.round_metrics[server_round]
        injected = sum(e in ("vote_lost", "values_lost", "state_lost") for n, e in zip(sorted(grid.clients), events)
                       if n in grid.online)
        assert rm["failures"] <= injected, (events, rm["failures"])
        if strategy.mask is not None and strategy.mask_round == server_round:
            assert strategy.mask.numel() == k


def test_rejoining_client_sends_add_drop_against_its_standing_vote():
    strategy, grid = make(300, clients=3, ratio=0.05, add_drop_ratio=0.01)
    run_round(strategy, grid, 1)
    assert all(v[0] == 1 for v in strategy.votes.values())
    grid.online = {1, 2}  # client 3 is away; its round-1 vote stands
    run_round(strategy, grid, 2)
    assert strategy.votes[3][0] == 1 and strategy.votes[1][0] == 2
    strategy.check_vote_invariants()
    grid.online = {1, 2, 3}
    start = len(grid.log)
    run_round(strategy, grid, 3)
    kinds = {m.metadata.dst_node_id: r.content.config_records["client"]["vote-kind"]
             for m, r in grid.log[start:] if m.metadata.message_type == "train.vote"}
    assert kinds == {1: "add-drop", 2: "add-drop", 3: "add-drop"}
    assert strategy.state.round_metrics[3]["failures"] == 0
    strategy.check_vote_invariants()
    # a client whose state is lost sends a full vote; its stale vote leaves M_sum
    grid.clients[2].state = ClientState()
    run_round(strategy, grid, 4)  # it cannot apply the values-only sync: fails, gets a dense sync next time
    assert strategy.state.round_metrics[4]["failures"] == 1 and strategy.votes[2][0] == 3
    strategy.check_vote_invariants()  # its round-3 vote still stands
    for server_round, expected in ((5, "full"), (6, "add-drop")):
        start = len(grid.log)
        run_round(strategy, grid, server_round)
        kinds = {m.metadata.dst_node_id: r.content.config_records["client"]["vote-kind"]
                 for m, r in grid.log[start:] if m.metadata.message_type == "train.vote"}
        assert kinds[2] == expected and kinds[1] == kinds[3] == "add-drop"
        assert strategy.state.round_metrics[server_round]["failures"] == 0
        assert strategy.votes[2][0] == server_round
        strategy.check_vote_invariants()  # the stale vote left M_sum when the full one came in


def test_malformed_add_drop_votes_are_rejected_without_touching_m_sum():
    strategy, grid = make(300, clients=2, ratio=0.05, add_drop_ratio=0.01)
    run_round(strategy, grid, 1)
    before = strategy.m_sum.clone()
    vote1 = strategy.votes[1][1].to(torch.int64)
    outside = torch.tensor(sorted(set(range(300)) - set(vote1.tolist()))[:2])

    def reply(adds, drops, base_round=1):
        content = RecordDict({
            "client": ConfigRecord({"model-hash": "x", "model-version": 1, "vote-kind": "add-drop", "vote-base-round": base_round}),
            "vote-add": codec.encode_positions(adds, 300),
            "vote-drop": codec.encode_positions(drops, 300),
        })
        req = Message(content=RecordDict(), message_type="train.vote", dst_node_id=1)
        return Message(content=content, reply_to=req)

    bad = [
        reply(vote1[:2], vote1[2:4]),  # adds already in the vote
        reply(outside, outside),  # drops not in the vote
        reply(outside, vote1[:1]),  # 2 adds, 1 drop
        reply(outside[:1], vote1[:1], base_round=7),  # unknown base vote
        reply(torch.arange(10), vote1[:10]),  # more than K_ad = 3 changes
    ]
    tally = strategy.tally_votes(2, bad)
    assert tally["nodes"] == [] and tally["failures"] == len(bad)
    assert torch.equal(strategy.m_sum, before)
    strategy.check_vote_invariants()


# ====================================================================== bit accounting
@pytest.mark.parametrize("positions", ["block", "rice", "raw"])
@pytest.mark.parametrize("variant", ["ssgd-mv", "ssgd-mv-ad", "ssgd-mv-rs"])
def test_q_metrics_are_the_encoded_payload_bits_per_parameter_per_local_step(variant, positions):
    numel, H = 2_000, 4
    strategy = build_strategy(variant, ratio=0.02, add_drop_ratio=0.002, value_bits=4, positions=positions, seed=3)
    grid = Grid({n: Client(n, numel) for n in (1, 2, 3)})
    grid.numel = numel
    config = ConfigRecord({"local-steps": H})
    previous_values = None
    for server_round in (1, 2, 3):
        start = len(grid.log)
        run_round(strategy, grid, server_round, config)
        log = grid.log[start:]
        rm = strategy.state.round_metrics[server_round]
        votes = [(m, r) for m, r in log if m.metadata.message_type == "train.vote"]
        values = [(m, r) for m, r in log if m.metadata.message_type == "train.values"]
        assert rm["failures"] == 0 and rm["accepted"] == 3
        vote_bits = [sum(codec.wire_size(rec).position_bits for rec in r.content.array_records.values()) for _, r in votes]
        value_bits = [codec.wire_size(r.content.array_records["update"]).value_bits for _, r in values]
        mask_record = values[0][0].content.array_records["mask"]
        assert rm["q_loc_up"] == pytest.approx(sum(vote_bits) / 3 / (numel * H), rel=1e-12)
        assert rm["q_val_up"] == pytest.approx(sum(value_bits) / 3 / (numel * H), rel=1e-12)
        assert rm["q_loc_down"] == pytest.approx(codec.wire_size(mask_record).position_bits / (numel * H), rel=1e-12)
        assert rm["q_val_down"] == pytest.approx(codec.wire_size(strategy.values_record).value_bits / (numel * H), rel=1e-12)
        # bytes: everything that went over the wire this round
        up = sum(codec.wire_size(rec).total_bytes for _, r in votes + values for rec in r.content.array_records.values())
        down = sum(codec.wire_size(rec).total_bytes for m, _ in votes + values for rec in m.content.array_records.values())
        assert rm["uplink_bytes"] == up and rm["downlink_bytes"] == down
        k = TopK(ratio=0.02).k_for(numel)
        assert value_bits == [4 * k + 32 * 8] * 3  # q4: 4 bits per value + 8 float32 interval means
        assert rm["q_val_down"] == pytest.approx(32 * k / (numel * H))  # the paper's downlink keeps fp32
        if variant == "ssgd-mv-ad" and server_round > 1:
            k_ad = TopK(ratio=0.002).k_for(numel)
            assert all(r.content.config_records["client"]["vote-kind"] == "add-drop" for _, r in votes)
            assert rm["q_loc_up"] < rm["q_loc_down"]
            assert rm["vote_changes"] <= k_ad
        if server_round > 1:  # clients of the last round get the aggregate as values only
            syncs = [m.content.config_records["config"]["sync-mode"] for m, _ in votes]
            assert syncs == ["values"] * 3
            assert all(m.content.array_records["sync"] is previous_values for m, _ in votes)
        previous_values = strategy.values_record


def test_round_updates_the_model_by_the_weighted_mean_on_the_mask_and_clients_follow_exactly():
    numel = 500
    strategy, grid = make(numel, clients=3, ratio=0.04, uplink_values="fp32")
    run_round(strategy, grid, 1)
    mask = strategy.mask
    assert mask.numel() == 20
    # every client kept e = a − a on M, and sent a[M]
    a = {n: c.step(1) for n, c in grid.clients.items()}
    weights = {n: 10 + n for n in grid.clients}
    total = sum(weights.values())
    expected = sum(a[n][mask] * weights[n] / total for n in a)
    w1 = torch.linspace(-1, 1, numel)
    w1[mask] -= expected
    torch.testing.assert_close(strategy.state.model, w1, rtol=0, atol=1e-6)
    for n, c in grid.clients.items():
        e = c.state.error
        assert bool((e[mask] == 0).all())
        keep = torch.ones(numel, dtype=torch.bool)
        keep[mask] = False
        assert torch.equal(e[keep], a[n][keep])
    # round 2: values-only sync, every client checks its model hash against the server's
    run_round(strategy, grid, 2)
    assert strategy.state.round_metrics[2]["failures"] == 0
    assert strategy.state.round_metrics[2]["sync_modes"] == {"values": 3}
    for c in grid.clients.values():
        assert c.state.model_version == 1


def test_partial_participation_catch_up_and_values_lost_go_back_to_the_error():
    numel = 400
    strategy, grid = make(numel, clients=4, ratio=0.05, fraction_train=0.5, seed=5)
    modes = {}
    for server_round in range(1, 9):
        grid.lose = {(2, "train.values")} if server_round == 3 else set()
        run_round(strategy, grid, server_round)
        rm = strategy.state.round_metrics[server_round]
        for mode, n in rm["sync_modes"].items():
            modes[mode] = modes.get(mode, 0) + n
        assert rm["failures"] <= (1 if server_round == 3 else 0)
    assert modes.get("dense", 0) >= 4 and modes.get("values", 0) + modes.get("set", 0) + modes.get("delta", 0) > 0


def test_values_phase_without_vote_state_is_refused_and_a_vote_without_values_keeps_a():
    numel = 300
    strategy, grid = make(numel, clients=2, ratio=0.05)
    grid.lose = {(1, "train.values")}
    run_round(strategy, grid, 1)
    # client 1's values reply was lost: the server did not aggregate it, so what it sent returns to e
    grid.lose = set()
    client = grid.clients[1]
    a1 = client.step(1)
    run_round(strategy, grid, 2)
    assert strategy.state.round_metrics[2]["failures"] == 0  # dense re-sync after the lost reply
    # e after round 2 = (a1 + step2) − sent2, i.e. nothing of a1 was lost
    mask2 = strategy.mask
    a2 = a1 + client.step(2)
    expected = a2.clone()
    expected[mask2] = 0
    torch.testing.assert_close(client.state.error, expected, rtol=0, atol=1e-6)
    # a values request for a round without vote state raises SyncError on the client
    cfg = ConfigRecord({"server-round": 99, "vote-k": 15})
    with pytest.raises(client_mv.SyncError):
        client_mv.values_step(client.state, RecordDict(), cfg, num_examples=1)


def test_lossy_downlink_keeps_the_server_error():
    numel = 400
    strategy, grid = make(numel, clients=3, ratio=0.05, downlink_values="q4")
    run_round(strategy, grid, 1)
    run_round(strategy, grid, 2)
    assert strategy.state.round_metrics[2]["failures"] == 0
    assert strategy.state.round_metrics[2]["server_error_norm"] > 0
    # w changed by exactly what the clients applied (their hashes matched), δ keeps the rest
    assert strategy.state.round_metrics[2]["accepted"] == 3


@pytest.mark.parametrize("kw", [{}, {"selection": "weighted"}, {"add_drop_ratio": 0.01}])
def test_same_seed_same_masks_and_model(kw):
    runs = []
    for _ in range(2):
        strategy, grid = make(300, clients=4, ratio=0.05, fraction_train=0.75, seed=11, **kw)
        masks = []
        for server_round in (1, 2, 3):
            run_round(strategy, grid, server_round)
            masks.append(strategy.mask.clone())
        runs.append((masks, strategy.state.model.clone()))
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
        strategy=strategy,
        dataset="fashion-mnist",
        model="mlp-784-64-10",
        clients=3,
        rounds=2,
        local_steps=2,
        batch_size=32,
        lr=0.1,
        ratio=0.05,
        add_drop_ratio=0.01,
        positions="block",
        seed=1,
        quiet=True,
        out=str(tmp_path),
    )
    rows = simulate(cfg)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert [r["round"] for r in metrics] == [1, 2]
    for r in metrics:
        for key in ("q_loc_up", "q_val_up", "q_loc_down", "q_val_down"):
            assert isinstance(r[key], float) and math.isfinite(r[key]) and r[key] > 0, (key, r)
        assert r["failures"] == 0 and r["accepted"] == 3
    assert metrics[1]["sync_modes"] == {"values": 3}
    assert metrics[-1]["test_accuracy"] > 0.10
    assert rows[-1]["test_accuracy"] == metrics[-1]["test_accuracy"]
    if strategy == "ssgd-mv-ad":
        assert metrics[1]["q_loc_up"] < metrics[0]["q_loc_up"]  # add-drop vote after the first full one
