"""Random-k as a strategy (the rTop-k paper's baseline), through the real SparseMod in-process.

What is checked is read from the clients' encoded replies: how many entries
each sends, which positions, and that the model moves by what error
compensation says it should.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message
from flwr.clientapp import ClientApp
from flwr.common.logger import FLOWER_LOGGER
from inprocess import InProcessGrid, step_app

from fl_sparse import codec, protocol
from fl_sparse.clients.mod import client_generator_seed
from fl_sparse.compressors import RandomK
from fl_sparse.strategies import STRATEGY_NAMES, RandomKSGD, RTopKSGD, build_strategy

FLOWER_LOGGER.setLevel(logging.WARNING)

D = 400
CLIENTS = 3
WEIGHTS = {0: 5.0, 1: 2.0, 2: 9.0}


def local_step(pid: int, server_round: int) -> np.ndarray:
    return np.random.default_rng(100 * pid + server_round).standard_normal(D).astype(np.float32)


def toy_app() -> ClientApp:
    return step_app(local_step, WEIGHTS.__getitem__, lambda pid: {"train_loss": 1.0})


class Recorder:
    """Keeps every reply's decoded update, by (round, partition id)."""

    def __init__(self) -> None:
        self.sent: dict[tuple[int, int], torch.Tensor] = {}
        self.round = 0

    def __call__(self, node: int, reply: Message) -> Message:
        pid = (node - 1000) // 7
        update = codec.decode(reply.content.array_records[protocol.UPDATE], D)
        self.sent[(self.round, pid)] = update
        return reply


def run(tmp_path, strategy, rounds: int):
    """Play ``rounds`` rounds; returns the recorder and the model after each round."""
    recorder = Recorder()
    grid = InProcessGrid(toy_app(), CLIENTS, node_config=lambda i: {"state-dir": str(tmp_path)}, tamper=recorder)
    arrays = ArrayRecord({"w": Array(np.zeros(D, dtype=np.float32))})
    models = []
    for t in range(1, rounds + 1):
        recorder.round = t
        messages = list(strategy.configure_train(t, arrays, ConfigRecord(), grid))
        replies = grid.send_and_receive(messages)
        arrays, _ = strategy.aggregate_train(t, replies)
        models.append(arrays["w"].numpy().copy())
    return recorder, models


def positions(recorder: Recorder, t: int, pid: int) -> list[int]:
    return recorder.sent[(t, pid)].indices.tolist()


def test_random_k_sends_exactly_k_entries_at_positions_that_differ_per_round_and_client(tmp_path):
    ratio = 0.05
    k = math.ceil(ratio * D)
    recorder, _ = run(tmp_path, RandomKSGD(ratio=ratio, fraction_evaluate=0.0, seed=3), rounds=3)
    assert len(recorder.sent) == 3 * CLIENTS
    for update in recorder.sent.values():
        assert update.nnz == k
    sets = {key: frozenset(positions(recorder, *key)) for key in recorder.sent}
    assert len(set(sets.values())) == len(sets)  # every (round, client) its own subset
    # Not top-k: the clients' largest entries are not what they send.
    a = local_step(0, 1)
    assert sets[(1, 0)] != frozenset(np.argsort(-np.abs(a))[:k].tolist())
    # The subset is the one the (seed, round, partition) generator draws: seeded like rTop-k's.
    for (t, pid), chosen in sets.items():
        gen = torch.Generator().manual_seed(client_generator_seed(3, t, pid))
        expected = RandomK(k)(torch.zeros(D), generator=gen).indices.tolist()
        assert sorted(chosen) == expected


def test_random_k_positions_are_reproducible_for_a_seed_and_change_with_it(tmp_path):
    first, models_a = run(tmp_path / "a", RandomKSGD(ratio=0.05, fraction_evaluate=0.0, seed=11), rounds=2)
    again, models_b = run(tmp_path / "b", RandomKSGD(ratio=0.05, fraction_evaluate=0.0, seed=11), rounds=2)
    other, _ = run(tmp_path / "c", RandomKSGD(ratio=0.05, fraction_evaluate=0.0, seed=12), rounds=2)
    for key in first.sent:
        assert positions(first, *key) == positions(again, *key)
    assert all(np.array_equal(a, b) for a, b in zip(models_a, models_b))
    assert any(positions(first, *key) != positions(other, *key) for key in first.sent)


@pytest.mark.parametrize("error_feedback", [True, False])
def test_random_k_error_feedback_carries_what_was_not_sent(tmp_path, error_feedback):
    """Client q sends a_q on its subset S, a_q = e_q + Δ_q with EC (Δ_q without); w ← w − Σ p_q a_q|_S."""
    strategy = build_strategy("randomk", ratio=0.1, seed=5, error_feedback=error_feedback, fraction_evaluate=0.0)
    assert isinstance(strategy, RandomKSGD)
    recorder, models = run(tmp_path, strategy, rounds=3)
    total = sum(WEIGHTS.values())
    e = {q: np.zeros(D) for q in WEIGHTS}
    w = np.zeros(D)
    for t in (1, 2, 3):
        g = np.zeros(D)
        for q in WEIGHTS:
            step = local_step(q, t).astype(np.float64)
            a = e[q] + step if error_feedback else step
            idx = positions(recorder, t, q)
            sent = np.zeros(D)
            sent[idx] = a[idx]
            np.testing.assert_allclose(recorder.sent[(t, q)].values.numpy(), a[idx], rtol=0, atol=1e-5)
            e[q] = a - sent
            g += WEIGHTS[q] / total * sent
        w = w - g
        np.testing.assert_allclose(models[t - 1], w, rtol=0, atol=1e-5)
    # With EC the round-3 values carry earlier rounds' leftovers: they differ from the plain step.
    idx = positions(recorder, 3, 0)
    plain = local_step(0, 3)[idx]
    assert np.allclose(recorder.sent[(3, 0)].values.numpy(), plain, atol=1e-5) != error_feedback


def test_random_k_is_a_named_strategy_with_k_or_ratio():
    assert "randomk" in STRATEGY_NAMES
    assert RandomKSGD(k=7).uplink == {"name": "randomk", "k": 7}
    assert RandomKSGD(ratio=0.01).uplink == {"name": "randomk", "ratio": 0.01}
    with pytest.raises(ValueError):
        RandomKSGD(ratio=0.0)


def test_rtopk_r_ratio_fixes_the_pool_once_d_is_known():
    strategy = build_strategy("rtopk", ratio=0.001, r_ratio=0.005)
    assert isinstance(strategy, RTopKSGD) and strategy.r_ratio == 0.005
    strategy.initialize(ArrayRecord({"w": Array(np.zeros(20_001, dtype=np.float32))}))
    spec = strategy.uplink_spec(1, num_clients=7)
    assert spec["r"] == math.ceil(0.005 * 20_001) and "n_workers" not in spec  # not k·n
    assert build_strategy("rtopk", ratio=0.001).uplink_spec(1, num_clients=7)["n_workers"] == 7
    with pytest.raises(ValueError, match="r_ratio"):
        RTopKSGD(r_ratio=1.5)
    with pytest.raises(ValueError, match="at most one"):
        RTopKSGD(r=10, r_ratio=0.1)
    with pytest.raises(ValueError, match="r_ratio"):
        build_strategy("topk", ratio=0.01, r_ratio=0.1)


@pytest.mark.parametrize("name", [n for n in STRATEGY_NAMES if n != "fedavg"])
def test_error_feedback_flag_reaches_every_sparse_strategy(name):
    on = build_strategy(name, ratio=0.01, num_rounds=3)
    off = build_strategy(name, ratio=0.01, num_rounds=3, error_feedback=False)
    assert on.client_error_feedback == (name != "adaptive-topk-no-ec")
    assert off.client_error_feedback is False
    if name == "bidirectional-topk":
        assert on.server_error_feedback and not off.server_error_feedback


def test_nodes_without_a_partition_id_draw_their_own_subsets(tmp_path):
    """A deployment's SuperNodes need no partition-id: each draws from its node id's stream, so no two
    clients send the same random positions (they all did, from one shared stream, before)."""
    from flwr.app import MetricRecord, RecordDict

    app = ClientApp(mods=[__import__("fl_sparse.clients", fromlist=["SparseMod"]).SparseMod()])

    @app.train()
    def unchanged(msg, context):  # a zero step: random-k's positions do not depend on the values
        return Message(RecordDict({"arrays": msg.content["arrays"], "metrics": MetricRecord({"num-examples": 1})}),
                       reply_to=msg)

    recorder = Recorder()
    grid = InProcessGrid(app, CLIENTS, node_config=lambda i: {"state-dir": str(tmp_path)}, tamper=recorder)
    for context in grid.contexts.values():
        del context.node_config["partition-id"]
    strategy = RandomKSGD(ratio=0.05, fraction_evaluate=0.0, seed=3)
    arrays = ArrayRecord({"w": Array(np.zeros(D, dtype=np.float32))})
    replies = grid.send_and_receive(list(strategy.configure_train(1, arrays, ConfigRecord(), grid)))
    strategy.aggregate_train(1, replies)
    k = math.ceil(0.05 * D)
    by_node = {(node - 1000) // 7: node for node in grid.node_ids}
    drawn = {pid: positions(recorder, 0, pid) for pid in by_node}
    assert len({tuple(p) for p in drawn.values()}) == CLIENTS
    for pid, node in by_node.items():
        gen = torch.Generator().manual_seed(client_generator_seed(3, 1, node))
        assert drawn[pid] == RandomK(k)(torch.zeros(D), generator=gen).indices.tolist()
