"""Tests written to kill mutants of SparseFedAvg's hooks (``read_update``, ``compress_downlink``, ...).

The hooks are public (subclasses override them), so they are also called
here directly, on real replies produced by the real :class:`SparseMod` on
the in-process grid. Oracles are numpy (top-k, the bidirectional paper's
δ, the ρ̂ of its Assumption 3.6). See docs/testing.md.
"""

from __future__ import annotations

import dataclasses
import logging
import re

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.logger import FLOWER_LOGGER
from inprocess import InProcessGrid, step_app, scratch_folder
from oracles import topk_np as _topk

from fl_sparse import codec, protocol
from fl_sparse.clients import SparseMod
from fl_sparse.compressors import TopK
from fl_sparse.protocol import Report
from fl_sparse.sparse import SparseTensor
from fl_sparse.strategies import SparseFedAvg, TopKSGD

FLOWER_LOGGER.setLevel(logging.WARNING)

D, K = 24, 4
WEIGHTS = {0: 3.0, 1: 1.0, 2: 6.0}


def _model() -> ArrayRecord:
    rng = np.random.default_rng(5)
    return ArrayRecord({"w": Array(rng.standard_normal((4, 6)).astype(np.float32))})


def _app() -> ClientApp:
    def step(pid: int, rnd: int) -> np.ndarray:
        return np.random.default_rng(100 * pid + rnd).standard_normal((4, 6)).astype(np.float32)

    return step_app(step, WEIGHTS.__getitem__)


def _grid(n: int = 3) -> InProcessGrid:
    folder = scratch_folder()
    return InProcessGrid(_app(), n, node_config=lambda i: {"state-dir": folder})


def _replies(strategy, grid, server_round: int = 1):
    messages = list(strategy.configure_train(server_round, _model(), ConfigRecord(), grid))
    return list(grid.send_and_receive(messages, timeout=60))


def _current(strategy):
    from fl_sparse.flat import vector_hash

    return vector_hash(strategy.state.model)


# ====================================================================== read_update
def test_read_update_rejects_a_client_on_another_model_and_forgets_its_version():
    strategy = TopKSGD(k=K, min_available_nodes=1, min_train_nodes=1, fraction_evaluate=0.0)
    grid = _grid(1)
    (reply,) = _replies(strategy, grid)
    node = reply.metadata.src_node_id
    report = Report.read(reply.content)
    wrong_version = dataclasses.replace(report, model_version=strategy.state.version + 1)
    for rep, expected in ((report, "0" * 64), (wrong_version, _current(strategy))):
        strategy.state.client_versions[node] = 0  # what the server believed the client held
        with pytest.raises(protocol.ProtocolError, match=r"^the client trained from a different model$"):
            strategy.read_update(1, node, reply, rep, expected)
        assert node not in strategy.state.client_versions, "the server must re-sync this client densely"
    # the genuine reply is accepted and records the version the client now holds
    assert strategy.read_update(1, node, reply, report, _current(strategy)).node == node
    assert strategy.state.client_versions[node] == report.model_version
    # a client the server knows nothing about is rejected the same way (and nothing is raised besides)
    with pytest.raises(protocol.ProtocolError):
        strategy.read_update(1, node + 1, reply, report, "0" * 64)
    assert node + 1 not in strategy.state.client_versions


def test_read_update_without_an_update_names_the_reply_and_the_record():
    strategy = TopKSGD(k=K, min_available_nodes=1, min_train_nodes=1, fraction_evaluate=0.0)
    (reply,) = _replies(strategy, _grid(1))
    del reply.content[protocol.UPDATE]
    with pytest.raises(protocol.ProtocolError, match="^" + re.escape(f"reply has no {protocol.UPDATE!r} ArrayRecord") + "$"):
        strategy.read_update(1, reply.metadata.src_node_id, reply, Report.read(reply.content), _current(strategy))


class _Recording(TopKSGD):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.asked: list[tuple[int, int]] = []

    def user_content(self, server_round, node, msg):
        self.asked.append((server_round, node))
        return super().user_content(server_round, node, msg)


def test_read_update_hands_round_and_node_to_user_content_and_keeps_the_sender():
    strategy = _Recording(k=K, min_available_nodes=3, min_train_nodes=3, fraction_evaluate=0.0)
    grid = _grid(3)
    for rnd in (1, 2):
        replies = _replies(strategy, grid, rnd)
        updates = strategy.read_replies(rnd, replies)
        senders = sorted(r.metadata.src_node_id for r in replies)
        assert [u.node for u in updates] == senders
        assert sorted(strategy.asked[-3:]) == [(rnd, n) for n in senders]
        assert [u.weight for u in updates] == [WEIGHTS[(n - 1000) // 7] for n in senders]
        strategy.aggregate_train(rnd, replies)  # the model moves on; the next round reads again


def test_diagnostics_are_kept_only_when_asked_and_give_rho_hat():
    """diagnostics=True: each ClientUpdate carries the client's dense a and step, and ρ̂ is computed from them.

    ρ̂ (bidirectional paper, Assumption 3.6) = ‖Top_K(Σ p a) − Σ p Top_K(a)‖ / ‖Σ p step‖, in numpy.
    """
    strategy = TopKSGD(k=K, min_available_nodes=3, min_train_nodes=3, fraction_evaluate=0.0, diagnostics=True)
    replies = _replies(strategy, _grid(3))
    updates = strategy.read_replies(1, [r for r in replies])
    assert all(u.diagnostics is not None for u in updates)
    a = {u.node: u.diagnostics["a"].numpy().ravel().astype(np.float64) for u in updates}
    step = {u.node: u.diagnostics["step"].numpy().ravel().astype(np.float64) for u in updates}
    sent = {u.node: u.update.to_dense().double().numpy() for u in updates}
    for n in a:  # what the client sent is Top_K of the a it reports (no error memory yet: a = step)
        np.testing.assert_allclose(sent[n], _topk(a[n], K), rtol=0, atol=1e-6)
    total = sum(u.weight for u in updates)
    p = {u.node: u.weight / total for u in updates}
    mean_a = sum(p[n] * a[n] for n in a)
    g = sum(p[n] * sent[n] for n in a)
    rho_hat = np.linalg.norm(_topk(mean_a, K) - g) / np.linalg.norm(sum(p[n] * step[n] for n in a))

    strategy2 = TopKSGD(k=K, min_available_nodes=3, min_train_nodes=3, fraction_evaluate=0.0, diagnostics=True)
    strategy2.aggregate_train(1, _replies(strategy2, _grid(3)))
    assert strategy2.state.round_metrics[1]["rho_hat"] == pytest.approx(rho_hat, rel=1e-5)
    assert rho_hat > 0.01  # the clients disagree: the test can tell ρ̂ from 0

    # not asked for: a diagnostics record a client sends anyway is not kept
    plain = TopKSGD(k=K, min_available_nodes=3, min_train_nodes=3, fraction_evaluate=0.0)
    replies = _replies(plain, _grid(3))
    for r in replies:
        r.content[protocol.DIAGNOSTICS] = ArrayRecord({"a": Array(np.ones(D, np.float32)), "step": Array(np.ones(D, np.float32))})
    assert all(u.diagnostics is None for u in plain.read_replies(1, replies))


# ====================================================================== compress_downlink
def _aggregate(seed: int) -> SparseTensor:
    x = torch.from_numpy(np.random.default_rng(seed).standard_normal(D).astype(np.float32))
    idx = torch.arange(0, D - 4)  # a sparse union of supports
    return SparseTensor(idx, x[idx].clone(), D)


def test_compress_downlink_without_server_error_feedback_keeps_no_delta():
    strategy = SparseFedAvg(min_available_nodes=1, downlink=TopK(3), server_error_feedback=False)
    strategy.initialize(_model())
    for seed in range(4):  # several rounds: nothing carries over
        agg = _aggregate(seed)
        out = strategy.compress_downlink(seed + 1, agg)
        np.testing.assert_array_equal(out.to_dense().numpy(), _topk(agg.to_dense().numpy(), 3))
        assert strategy.state.server_error.norm() == 0.0


@pytest.mark.parametrize("values", ["q4", "fp16"])
def test_compress_downlink_delta_keeps_what_the_value_code_lost(values):
    """Algorithm 2 with a lossy downlink code: δ_t = g − decode(encode(Top_K(g))) -- the quantization error stays in δ."""
    strategy = SparseFedAvg(min_available_nodes=1, downlink=TopK(12), downlink_values=values)
    strategy.initialize(_model())
    delta = np.zeros(D)
    for seed in range(3):
        g = _aggregate(seed).to_dense().double().numpy() + delta
        out = strategy.compress_downlink(seed + 1, _aggregate(seed))
        np.testing.assert_allclose(out.to_dense().numpy(), _topk(g, 12), rtol=0, atol=1e-5)
        decoded = codec.decode(codec.encode(out, values=values), D).to_dense().double().numpy()
        assert np.abs(decoded - out.to_dense().double().numpy()).max() > 0, "the code must be lossy here"
        delta = g - decoded
        np.testing.assert_allclose(strategy.state.server_error.error.double().numpy(), delta, rtol=0, atol=1e-5)


# ====================================================================== weight_of / apply_update / aggregate_exact
def test_weight_of_accepts_up_to_2_pow_53_and_no_more():
    strategy = SparseFedAvg(min_available_nodes=1)

    def weight(value):
        return strategy.weight_of(RecordDict({"metrics": MetricRecord({"num-examples": value})}))

    assert weight(2**53) == float(2**53)  # documented range (0, 2**53]
    assert weight(1) == 1.0 and weight(0.5) == 0.5
    for bad in (2**53 + 2, 0, -1.0, float("inf"), float("nan")):
        with pytest.raises(protocol.ProtocolError, match="^" + re.escape(f"weight 'num-examples' must be a number in (0, 2**53], got {bad!r}") + "$"):
            weight(bad)
    with pytest.raises(protocol.ProtocolError, match=r"^reply metrics lack the weight 'num-examples'$"):
        strategy.weight_of(RecordDict({"metrics": MetricRecord({"examples": 3})}))


@pytest.mark.parametrize("positions", ["rice", "block"])
def test_apply_update_encodes_with_the_downlink_position_code_and_records_the_density(positions):
    """The update record clients get (sync "delta") uses ``downlink_positions``; downlink_density = nnz / d."""
    strategy = SparseFedAvg(min_available_nodes=1, downlink_positions=positions)
    strategy.initialize(_model())
    w0 = strategy.state.model.clone()
    idx = torch.tensor([0, 1, 2, 3, 5, 8, 13, 21])
    sent = SparseTensor(idx, torch.linspace(-1, 1, idx.numel()), D)
    record = strategy.apply_update(1, sent)  # called directly: no round entry exists yet
    ours = codec.wire_size(record)
    assert ours.position_bits == codec.wire_size(codec.encode(sent, positions=positions)).position_bits
    assert ours.position_bits != codec.wire_size(codec.encode(sent, positions="raw")).position_bits
    assert strategy.state.round_metrics[1] == {"downlink_density": idx.numel() / D}
    np.testing.assert_allclose(strategy.state.model.numpy(), (w0 - sent.to_dense()).numpy(), rtol=0, atol=1e-7)
    assert strategy.state.version == 1


def test_float_exact_arrays_are_averaged_without_rounding():
    """FedAvg's average of an exact float array (``exact_arrays``) stays a float average; integers are rounded."""
    app = ClientApp(mods=[SparseMod()])

    @app.train()
    def train(msg: Message, context) -> Message:
        pid = int(context.node_config["partition-id"])
        arrays = msg.content["arrays"]
        out = ArrayRecord(
            {
                "w": Array(arrays["w"].numpy() - 0.1 * (pid + 1)),
                "scale": Array(arrays["scale"].numpy() + 0.3 * (pid + 1)),
                "steps": Array(arrays["steps"].numpy() + (pid + 1)),
            }
        )
        return Message(RecordDict({"arrays": out, "metrics": MetricRecord({"num-examples": WEIGHTS[pid]})}), reply_to=msg)

    folder = scratch_folder()
    grid = InProcessGrid(app, 3, node_config=lambda i: {"state-dir": folder})
    arrays = ArrayRecord(
        {
            "w": Array(np.zeros(D, np.float32)),
            "scale": Array(np.array([1.0, 2.0], np.float32)),
            "steps": Array(np.array([5], np.int64)),
        }
    )
    strategy = TopKSGD(k=K, exact_arrays=["scale"], min_available_nodes=3, min_train_nodes=3, fraction_evaluate=0.0)
    scale, steps = np.array([1.0, 2.0]), np.array([5])
    total = sum(WEIGHTS.values())
    for rnd in (1, 2):
        messages = list(strategy.configure_train(rnd, arrays, ConfigRecord(), grid))
        replies = list(grid.send_and_receive(messages))
        arrays, _ = strategy.aggregate_train(rnd, replies)
        # uplink bytes count the exact arrays that came up, as downlink bytes count those sent down
        exact_up = sum(len(a.data) for r in replies for a in r.content[protocol.EXACT].values())
        assert exact_up > 0 and strategy.state.round_metrics[rnd]["uplink_bytes"] == exact_up + sum(
            codec.wire_size(r.content[protocol.UPDATE]).total_bytes for r in replies)
        scale = sum(WEIGHTS[q] / total * (scale + 0.3 * (q + 1)) for q in range(3))
        steps = np.rint(sum(WEIGHTS[q] / total * (steps + q + 1) for q in range(3)))
        np.testing.assert_allclose(arrays["scale"].numpy(), scale, rtol=1e-6)
        assert arrays["scale"].numpy().dtype == np.float32
        assert not np.allclose(scale, np.rint(scale))  # the test can tell a rounded average
        np.testing.assert_array_equal(arrays["steps"].numpy(), steps.astype(np.int64))


# ====================================================================== finiteness and influence
def _strategy_at(w: np.ndarray, **kw) -> TopKSGD:
    strategy = TopKSGD(k=2, fraction_evaluate=0.0, **kw)
    strategy.initialize(ArrayRecord({"w": Array(w.astype(np.float32))}))
    return strategy


def test_a_step_is_finite_only_if_its_values_and_the_new_model_are():
    w = np.zeros(10, np.float32)
    w[3] = -3e38
    strategy = _strategy_at(w)
    step = lambda i, v: SparseTensor(torch.tensor([i]), torch.tensor([v], dtype=torch.float32), 10)  # noqa: E731
    assert strategy._finite_step(step(3, -1e38))  # w - g = -2e38: fine
    assert not strategy._finite_step(step(3, float("inf")))
    assert not strategy._finite_step(step(3, float("nan")))
    assert not strategy._finite_step(step(3, 3e38))  # w - g = -6e38 overflows float32


def test_a_16_bit_downlink_that_cannot_hold_the_step_rejects_the_round_instead_of_raising():
    """fp16 carries |v| < 65520: a larger (finite) aggregate must not crash aggregate_train."""
    strategy = _strategy_at(np.zeros(10, np.float32), downlink_values="fp16")
    big = SparseTensor(torch.tensor([1]), torch.tensor([1e6]), 10)
    assert not strategy._finite_step(big)
    assert strategy._finite_step(SparseTensor(torch.tensor([1]), torch.tensor([6e4]), 10))


def _update(node: int, weight: float, values: list[float]):
    from fl_sparse.strategies.base import ClientUpdate

    idx = torch.arange(len(values))
    return ClientUpdate(
        node=node, update=SparseTensor(idx, torch.tensor(values, dtype=torch.float32), 10), weight=weight,
        user_content=RecordDict(), uplink=protocol.UplinkMetrics(), position_bits=0, value_bits=0, total_bytes=0,
    )


def test_bound_influence_caps_weights_at_a_multiple_of_the_median_and_clips_norms():
    strategy = _strategy_at(np.zeros(10, np.float32), max_weight_ratio=2.0, update_norm_bound=5.0)
    updates = [_update(1, 1.0, [3.0, 4.0]), _update(2, 3.0, [6.0, 8.0]), _update(3, 100.0, [0.3, 0.4])]
    out = strategy.bound_influence(4, updates)
    assert [u.weight for u in out] == [1.0, 3.0, 6.0]  # median 3, cap 6
    assert [u.update.values.tolist() for u in out] == [[3.0, 4.0], [3.0, 4.0], pytest.approx([0.3, 0.4])]
    assert strategy.state.round_metrics[4]["clipped"] == 1
    assert strategy.bound_influence(5, []) == []


def test_bound_influence_relative_to_the_median_norm():
    strategy = _strategy_at(np.zeros(10, np.float32), update_norm_bound_ratio=2.0)
    updates = [_update(1, 1.0, [3.0, 4.0]), _update(2, 1.0, [0.0, 10.0]), _update(3, 1.0, [0.0, 50.0])]
    out = strategy.bound_influence(1, updates)  # median norm 10: bound 20
    assert [u.update.values.tolist() for u in out] == [[3.0, 4.0], [0.0, 10.0], [0.0, 20.0]]
    assert [u.weight for u in out] == [1.0, 1.0, 1.0]


@pytest.mark.parametrize("bidirectional", [False, True])
def test_an_aggregate_beyond_the_fp16_downlink_is_rejected_not_raised(bidirectional):
    """Clients' finite fp32 updates of 1e6 cannot travel in an fp16 downlink: the round is dropped whole."""
    from fl_sparse.strategies import BidirectionalTopKSGD

    size = {"step": 1e6}
    app = ClientApp(mods=[SparseMod()])

    @app.train()
    def train(msg: Message, context) -> Message:
        w = msg.content["arrays"]["w"].numpy()
        return Message(RecordDict({"arrays": ArrayRecord({"w": Array(w - np.float32(size["step"]))}),
                                   "metrics": MetricRecord({"num-examples": 1.0})}), reply_to=msg)

    folder = scratch_folder()
    grid = InProcessGrid(app, 3, node_config=lambda i: {"state-dir": folder})
    cls = BidirectionalTopKSGD if bidirectional else TopKSGD
    strategy = cls(k=2, downlink_values="fp16", fraction_evaluate=0.0, min_train_nodes=3, min_available_nodes=3)
    strategy.initialize(ArrayRecord({"w": Array(np.zeros(10, np.float32))}))
    strategy.identify(grid)
    before = strategy.state.model.clone()
    messages = list(strategy.configure_train(1, strategy.current_arrays(), ConfigRecord(), grid))
    assert strategy.aggregate_train(1, list(grid.send_and_receive(messages))) == (None, None)
    assert torch.equal(strategy.state.model, before) and strategy.state.version == 0
    assert strategy.state.round_metrics[1]["rejected_round"] == 1
    size["step"] = 0.5  # the clients' error memory still holds the 1e6 steps: the next rounds stay rejected...
    messages = list(strategy.configure_train(2, strategy.current_arrays(), ConfigRecord(), grid))
    strategy.aggregate_train(2, list(grid.send_and_receive(messages)))
    assert torch.isfinite(strategy.state.model).all()  # ...but nothing raises and the model stays finite


def test_downlink_bytes_are_split_into_last_update_catch_up_and_first_contact():
    """Round 1: two new clients. Round 2: one of them, one version behind. Round 3: the other,
    two versions behind (a catch-up), and a third client never seen before."""
    grid = _grid(3)
    strategy = TopKSGD(k=K, fraction_evaluate=0.0, min_available_nodes=1, min_train_nodes=1)
    strategy.initialize(_model())
    strategy.identify(grid)
    kinds = ("last_update", "catch_up", "first_contact")
    n0, n1, n2 = grid.node_ids

    def play(server_round, nodes):
        grid.online = set(nodes)
        messages = list(strategy.configure_train(server_round, strategy.current_arrays(), ConfigRecord(), grid))
        assert {m.metadata.dst_node_id for m in messages} == set(nodes)
        strategy.aggregate_train(server_round, list(grid.send_and_receive(messages, timeout=60)))
        rm = strategy.state.round_metrics[server_round]
        split = {kind: rm[f"downlink_{kind}_bytes"] for kind in kinds}
        assert sum(split.values()) == rm["downlink_bytes"]
        return split

    dense = play(1, [n0, n1])
    assert dense["first_contact"] > 0 and dense["last_update"] == dense["catch_up"] == 0
    one_behind = play(2, [n0])
    assert one_behind["last_update"] > 0 and one_behind["catch_up"] == one_behind["first_contact"] == 0
    mixed = play(3, [n1, n2])
    assert mixed["catch_up"] > 0 and mixed["first_contact"] == dense["first_contact"] // 2 and mixed["last_update"] == 0


def test_bound_influence_takes_the_tighter_of_the_absolute_and_relative_bounds():
    # norms 10, 40, 50: median 40, ratio 0.5 -> relative bound 20; absolute 15 is tighter, 30 is not
    for absolute, expected in ((15.0, [[0.0, 10.0], [0.0, 15.0], [0.0, 15.0]]), (30.0, [[0.0, 10.0], [0.0, 20.0], [0.0, 20.0]])):
        strategy = _strategy_at(np.zeros(10, np.float32), update_norm_bound=absolute, update_norm_bound_ratio=0.5)
        updates = [_update(1, 1.0, [0.0, 10.0]), _update(2, 1.0, [0.0, 40.0]), _update(3, 1.0, [0.0, 50.0])]
        out = strategy.bound_influence(9, updates)
        assert [u.update.values.tolist() for u in out] == [pytest.approx(e, rel=1e-6) for e in expected]
        assert strategy.state.round_metrics[9] == {"round": 9, "clipped": 2}  # a fresh round's row


def test_rho_hat_uses_the_rounds_compressor_not_the_constructors_spec():
    """One client (p = 1): Σ p C(a) = C(a), so ρ̂ = 0 for a deterministic compressor, if ρ̂ uses the
    compressor the client used. Hard threshold's clients threshold at lr·λ, its constructor spec says λ."""
    from fl_sparse.strategies import HardThresholdSGD

    strategy = HardThresholdSGD(threshold=0.5, lr=0.1, min_available_nodes=1, min_train_nodes=1,
                                fraction_evaluate=0.0, diagnostics=True)
    replies = _replies(strategy, _grid(1))
    updates = strategy.read_replies(1, list(replies))
    a = updates[0].diagnostics["a"].numpy().ravel()
    sent = updates[0].update.to_dense().numpy()
    assert set(np.flatnonzero(sent)) == set(np.flatnonzero(np.abs(a) >= 0.05)) != set()  # |a| >= lr·λ was sent
    assert np.count_nonzero(np.abs(a) >= 0.5) < np.count_nonzero(sent)  # λ alone would send fewer
    strategy.aggregate_train(1, list(replies))
    assert strategy.state.round_metrics[1]["rho_hat"] == 0.0


def test_a_users_compressor_whose_k_for_is_none_is_unbounded():
    """The Compressor protocol allows ``k_for(numel) -> None`` ("unbounded"): the server takes such
    updates (every entry here) instead of failing on each reply."""
    from fl_sparse.compressors import COMPRESSORS, register_compressor

    @register_compressor("test-unbounded")
    class Unbounded:
        def k_for(self, numel):
            return None

        def __call__(self, x, *, generator=None):
            return SparseTensor.from_dense(x)

    try:
        strategy = SparseFedAvg(uplink={"name": "test-unbounded"}, min_available_nodes=3, min_train_nodes=3,
                                fraction_evaluate=0.0)
        arrays, _ = strategy.aggregate_train(1, _replies(strategy, _grid(3)))  # all three taken, whole
        steps = {pid: np.random.default_rng(100 * pid + 1).standard_normal((4, 6)) for pid in WEIGHTS}
        total = sum(WEIGHTS.values())
        expected = _model()["w"].numpy() - sum(WEIGHTS[q] / total * steps[q] for q in WEIGHTS)
        np.testing.assert_allclose(arrays["w"].numpy(), expected, rtol=1e-5, atol=1e-6)
    finally:
        COMPRESSORS.pop("test-unbounded", None)


def test_clients_metrics_are_weighed_with_the_capped_weight():
    """A client that claims a huge num-examples is capped in the aggregate; the user's metrics
    aggregation (FedAvg's weighted mean here) must use the capped weight too, not the claim."""
    from flwr.app import MetricRecord

    strategy = _strategy_at(np.zeros(10, np.float32), max_weight_ratio=2.0)
    updates = [_update(1, 10.0, [1.0]), _update(2, 10.0, [1.0]), _update(3, 1e9, [1.0])]
    for u, loss in zip(updates, (1.0, 3.0, 10.0)):
        u.user_content = RecordDict({"metrics": MetricRecord({"num-examples": int(u.weight), "train_loss": loss})})
    claimed = updates[2].user_content
    strategy.state.round_metrics[1] = {"round": 1}
    strategy.bound_influence(1, updates)
    assert [u.weight for u in updates] == [10.0, 10.0, 20.0]
    metrics = strategy.train_metrics(1, updates)
    assert metrics["train_loss"] == pytest.approx((10 * 1.0 + 10 * 3.0 + 20 * 10.0) / 40)
    assert claimed["metrics"]["num-examples"] == 10**9  # the client's own record is not changed
    uncapped = _strategy_at(np.zeros(10, np.float32))
    uncapped.state.round_metrics[1] = {"round": 1}
    assert uncapped.train_metrics(1, updates[:2])["train_loss"] == pytest.approx(2.0)
