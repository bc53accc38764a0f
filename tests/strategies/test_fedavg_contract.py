"""FedAvg's contract, kept by our strategies: every check runs FedAvg beside them as the control.

In the style of Flower's own strategy tests (``flwr/serverapp/strategy/
fedavgm_test.py``, ``fedmedian_test.py``: prepare replies, execute
``aggregate_train``, assert against the average computed in the test).
Flower 1.42's wheel ships no ``*_test.py`` to import, and its repository has
no ``fedavg_test.py``; the weighted example below is the one of
``fedavgm_test._prepare_strategy``.

Our strategies need SparseMod in the ClientApp, so the replies come from a
real user ClientApp (``ClientApp(mods=[SparseMod()])`` + a quickstart-style
train function) run in process by :class:`InProcessGrid`. SparseMod passes
FedAvg's messages (no fl-sparse instruction) through untouched, so FedAvg
runs against the very same ClientApp.
"""

from __future__ import annotations

import inspect
import logging
import math
from unittest.mock import Mock

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.logger import FLOWER_LOGGER
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from flwr.serverapp.strategy import strategy_utils as flower_strategy_utils
from inprocess import InProcessGrid
from oracles import topk_np as topk

import fl_sparse.strategies.base as base_module
from fl_sparse import protocol
from fl_sparse.clients import SparseMod
from fl_sparse.protocol import Instruction
from fl_sparse.strategies import BidirectionalTopKSGD, DenseFedAvg, SparseFedAvg, TopKSGD

FLOWER_LOGGER.setLevel(logging.WARNING)

K = 3
CLASSES = [FedAvg, DenseFedAvg, TopKSGD, BidirectionalTopKSGD]
OURS = CLASSES[1:]
FEDAVG_PARAMS = list(inspect.signature(FedAvg.__init__).parameters.values())[1:11]

pytestmark = pytest.mark.usefixtures("task_identity")  # tests/strategies/conftest.py


def make(cls, *args, **kw):
    """The class with the test's budget (K entries up and down) where it has one."""
    if cls in (TopKSGD, BidirectionalTopKSGD):
        kw.setdefault("k", K)
    return cls(*args, **kw)


def kind_of(cls) -> str:
    return {FedAvg: "dense", DenseFedAvg: "dense", TopKSGD: "topk", BidirectionalTopKSGD: "bidi"}[cls]


def ours(cls) -> bool:
    return issubclass(cls, SparseFedAvg)


# ------------------------------------------------------------ a user ClientApp
def user_app(
    trained, weights, *, arrays_key="arrays", config_key="config", weight_key="num-examples", seen=None, fail=False, decoy=None
):
    """SparseMod + a plain train function: ``trained(pid, server_round, model, cfg) -> model``."""
    app = ClientApp(mods=[SparseMod()])

    @app.train()
    def train(msg: Message, context) -> Message:
        pid = int(context.node_config["partition-id"])
        if seen is not None:
            seen.append((pid, sorted(msg.content.keys()), dict(msg.content[config_key])))
        if fail:
            raise RuntimeError("the user's training crashed")
        cfg = msg.content[config_key]
        model = {name: msg.content[arrays_key][name].numpy() for name in msg.content[arrays_key].keys()}
        out = trained(pid, int(cfg["server-round"]), model, cfg)
        metrics = MetricRecord({weight_key: weights[pid], "loss": 0.5 + pid, **({"num-examples": decoy[pid]} if decoy else {})})
        return Message(RecordDict({arrays_key: ArrayRecord({n: Array(v) for n, v in out.items()}), "metrics": metrics}), reply_to=msg)

    return app


def bench(tmp_path, app, n) -> InProcessGrid:
    return InProcessGrid(app, n, node_config=lambda i: {"state-dir": str(tmp_path)})


def steps(shapes, seed=0):
    """Client pid subtracts a fixed vector of its own, different each round."""

    def trained(pid, server_round, model, cfg):
        rng = np.random.default_rng(seed + 100 * pid + server_round)
        lr = float(cfg.get("lr", 1.0))
        return {n: (model[n] - np.float32(lr) * rng.standard_normal(shapes[n]).astype(np.float32)) for n in model}

    return trained


def flat(model) -> np.ndarray:
    return np.concatenate([np.asarray(v, dtype=np.float32).ravel() for v in model.values()])


def unflat(vec, like) -> dict[str, np.ndarray]:
    out, at = {}, 0
    for name, v in like.items():
        out[name] = vec[at : at + v.size].reshape(v.shape)
        at += v.size
    return out


class Reference:
    """FedAvg / Algorithm 1 / Algorithm 2 of the bidirectional top-K paper, in numpy."""

    def __init__(self, kind, model0, weights, trained, k=K):
        self.kind, self.weights, self.trained, self.k = kind, weights, trained, k
        self.like = model0
        self.w = flat(model0)
        self.e: dict[int, np.ndarray] = {}
        self.delta = 0.0

    def round(self, server_round, sampled, cfg=None):
        cfg = cfg or ConfigRecord({"server-round": server_round})
        total = math.fsum(self.weights[q] for q in sampled)
        g = np.zeros(self.w.size)
        for q in sampled:
            after = flat(self.trained(q, server_round, unflat(self.w.copy(), self.like), cfg))
            step = (self.w - after).astype(np.float64)
            a = self.e.get(q, 0.0) + step
            s = a if self.kind == "dense" else topk(a, self.k)
            self.e[q] = a - s
            g += self.weights[q] / total * s
        if self.kind == "bidi":
            g = g + self.delta
            ghat = topk(g, self.k)
            self.delta, g = g - ghat, ghat
        self.w = (self.w - g).astype(np.float32)
        return unflat(self.w, self.like)


def assert_arrays(record: ArrayRecord, expected: dict, atol=1e-6):
    assert list(record.keys()) == list(expected)
    for name, value in expected.items():
        np.testing.assert_allclose(record[name].numpy(), value, rtol=1e-6, atol=atol, err_msg=name)


def sampled_pids(grid: InProcessGrid, since: int) -> list[int]:
    """Partition ids that got a train message (not an identify query) after ``since`` sends."""
    out = []
    for m in grid.sent[since:]:
        instr = Instruction.read(m.content) if protocol.RECORD in m.content.config_records else None
        if instr is None or instr.phase == protocol.PHASE_TRAIN:
            out.append((m.metadata.dst_node_id - 1000) // 7)
    return sorted(out)


# ------------------------------------------------------------ constructor
@pytest.mark.parametrize(
    "cls",
    [
        FedAvg,
        SparseFedAvg,
        *OURS,
    ],
)
def test_signature_has_fedavgs_first_ten_parameters_in_order_with_its_defaults(cls):
    params = list(inspect.signature(cls.__init__).parameters.values())[1:11]
    assert [(p.name, p.kind, p.default) for p in params] == [(p.name, p.kind, p.default) for p in FEDAVG_PARAMS]


def _named_strategies():
    from fl_sparse.strategies import AdaptiveTopKSGD, HardThresholdSGD, RandomKSGD, RTopKSGD, SSGDMajorityVote

    required = {AdaptiveTopKSGD: {"num_rounds": 3}}
    return [(c, required.get(c, {})) for c in (DenseFedAvg, TopKSGD, BidirectionalTopKSGD, RTopKSGD, RandomKSGD,
                                               HardThresholdSGD, AdaptiveTopKSGD, SSGDMajorityVote)]


@pytest.mark.parametrize("cls, required", _named_strategies())
def test_every_option_the_signature_shows_is_accepted_and_the_others_are_named(cls, required):
    """help() and IDEs show what a strategy takes: each keyword option of the signature is accepted at
    its default, and a base option the strategy sets itself is refused with what to use instead."""
    params = inspect.signature(cls.__init__).parameters
    for name, param in params.items():
        if param.kind is inspect.Parameter.KEYWORD_ONLY and param.default is not inspect.Parameter.empty:
            cls(**{**required, name: param.default})
    base = inspect.signature(SparseFedAvg.__init__).parameters
    hidden = [n for n, p in base.items() if p.kind is inspect.Parameter.KEYWORD_ONLY and n not in params]
    assert {"uplink", "downlink"} <= set(hidden)
    for name in hidden:
        with pytest.raises(TypeError, match=rf"^{cls.__name__} sets {name} itself: use "):
            cls(**{**required, name: base[name].default})


@pytest.mark.parametrize("cls", CLASSES)
def test_defaults_and_positional_order_equal_fedavgs(cls):
    """Same attributes as FedAvg's, by default and when the ten are passed positionally."""
    names = [p.name for p in FEDAVG_PARAMS]
    control, ours_ = FedAvg(), make(cls)
    for name in names:
        assert getattr(ours_, name) == getattr(control, name), name
    aggr = lambda records, key: MetricRecord()  # noqa: E731
    values = (0.5, 0.25, 3, 4, 5, "w", "model", "cfg", aggr, aggr)
    control, ours_ = FedAvg(*values), make(cls, *values)
    for name, value in zip(names, values):
        assert getattr(ours_, name) == getattr(control, name) == value, name


# ------------------------------------------------------------ aggregation
# fedavgm_test._prepare_strategy: two clients, num_examples 1 and 2.
FLOWER_A = {"w": np.array([[1, 2, 3], [4, 5, 6]], dtype=np.float32), "v": np.array([7, 8, 9, 10], dtype=np.float32)}
FLOWER_B = {"w": np.array([[29, 23, 19], [17, 13, 11]], dtype=np.float32), "v": np.array([7, 5, 3, 2], dtype=np.float32)}
FLOWER_ZERO = {"w": np.zeros((2, 3), dtype=np.float32), "v": np.zeros(4, dtype=np.float32)}


@pytest.mark.parametrize("cls", CLASSES)
@pytest.mark.parametrize("key", ["num-examples", "w"])
def test_aggregate_train_is_the_weighted_average_of_flowers_example(tmp_path, cls, key):
    """Flower's FedAvgM test data: expected (A·1 + B·2)/3 for FedAvg; the sparse ones average Top_K(Δ)."""
    app = user_app(lambda pid, t, model, cfg: (FLOWER_A, FLOWER_B)[pid], {0: 1, 1: 2}, weight_key=key)
    grid = bench(tmp_path, app, 2)
    strategy = make(cls, weighted_by_key=key, fraction_evaluate=0.0)
    result = strategy.start(grid, ArrayRecord({n: Array(v) for n, v in FLOWER_ZERO.items()}), num_rounds=1)
    p = np.array([1, 2]) / 3
    delta = [flat(FLOWER_ZERO) - flat(FLOWER_A), flat(FLOWER_ZERO) - flat(FLOWER_B)]
    if kind_of(cls) == "dense":
        expected = {n: (FLOWER_A[n] * 1 + FLOWER_B[n] * 2) / 3 for n in FLOWER_A}  # as fedavgm_test has it
    else:
        g = p[0] * topk(delta[0], K) + p[1] * topk(delta[1], K)
        if kind_of(cls) == "bidi":
            g = topk(g, K)
        expected = unflat(flat(FLOWER_ZERO) - g, FLOWER_ZERO)
    assert_arrays(result.arrays, expected)
    # The user metrics: averaged with the same weights, as FedAvg's aggregate_metricrecords does.
    assert result.train_metrics_clientapp[1]["loss"] == pytest.approx(p[0] * 0.5 + p[1] * 1.5)


@pytest.mark.parametrize("cls", CLASSES)
@pytest.mark.parametrize("decoy", [False, True], ids=["no-num-examples", "decoy-num-examples"])
def test_weighted_by_a_custom_key_gives_the_exact_weighted_average(tmp_path, cls, decoy):
    """weighted_by_key="w", unequal weights, fp32: new model == Σ p_q w_q to 1e-6 (dense) / its top-K analogue.

    The replies carry no "num-examples", or one with other values that must be ignored.
    """
    shapes = {"a": (3, 4), "b": (5,)}
    weights = {0: 0.5, 1: 7.25, 2: 2.0, 3: 11.0}
    model0 = {n: np.random.default_rng(1).standard_normal(s).astype(np.float32) for n, s in shapes.items()}
    trained = steps(shapes)
    app = user_app(trained, weights, weight_key="w", decoy={0: 9, 1: 1, 2: 30, 3: 2} if decoy else None)
    grid = bench(tmp_path, app, 4)
    strategy = make(cls, weighted_by_key="w", fraction_evaluate=0.0)
    result = strategy.start(grid, ArrayRecord({n: Array(v) for n, v in model0.items()}), num_rounds=1)
    total = sum(weights.values())
    if kind_of(cls) == "dense":  # computed as FedAvg computes it: Σ_q (w_q / Σ w) · trained_q
        cfg = ConfigRecord({"server-round": 1})
        expected = {n: sum(weights[q] / total * trained(q, 1, model0, cfg)[n].astype(np.float64) for q in weights) for n in shapes}
    else:
        expected = Reference(kind_of(cls), model0, weights, trained).round(1, list(weights))
    assert_arrays(result.arrays, expected)
    assert 1 in result.train_metrics_clientapp


@pytest.mark.parametrize("cls", CLASSES)
def test_unequal_num_examples_several_rounds_partial_participation(tmp_path, cls):
    """3 rounds, 3 of 4 clients a round: w_t = w_{t−1} − Σ_q p_q C(e_q + Δ_q), p_q = n_q / Σ_{sampled} n."""
    shapes = {"a": (4, 4), "b": (4,)}
    weights = {0: 1, 1: 40, 2: 3, 3: 12}
    model0 = {n: np.random.default_rng(2).standard_normal(s).astype(np.float32) for n, s in shapes.items()}
    trained = steps(shapes, seed=5)
    grid = bench(tmp_path, user_app(trained, weights), 4)
    strategy = make(cls, fraction_train=0.75, fraction_evaluate=0.0)
    if ours(cls):
        strategy.identify(grid)
    ref = Reference(kind_of(cls), model0, weights, trained)
    arrays = ArrayRecord({n: Array(v) for n, v in model0.items()})
    for t in (1, 2, 3):
        before = len(grid.sent)
        messages = list(strategy.configure_train(t, arrays, ConfigRecord(), grid))
        arrays, _ = strategy.aggregate_train(t, grid.send_and_receive(messages))
        sampled = sampled_pids(grid, before)
        assert len(sampled) == 3
        assert_arrays(arrays, ref.round(t, sampled), atol=2e-6)


@pytest.mark.parametrize("cls", CLASSES)
def test_train_metrics_aggr_fn_is_called_and_its_result_returned(tmp_path, cls):
    calls = []

    def aggr(records: list[RecordDict], weighting_key: str) -> MetricRecord:
        calls.append((records, weighting_key))
        return MetricRecord({"custom": 42.0, "replies": len(records)})

    shapes = {"a": (6,)}
    grid = bench(tmp_path, user_app(steps(shapes), {0: 3, 1: 1, 2: 2}), 3)
    strategy = make(cls, train_metrics_aggr_fn=aggr, fraction_evaluate=0.0)
    result = strategy.start(grid, ArrayRecord({"a": Array(np.ones(6, dtype=np.float32))}), num_rounds=2)
    assert [key for _, key in calls] == ["num-examples", "num-examples"]
    for records, _ in calls:
        assert len(records) == 3
        for record in records:
            assert record["metrics"]["num-examples"] in (1, 2, 3)
            assert not any(protocol.is_protocol_key(k) for k in record.keys())
    for t in (1, 2):
        metrics = result.train_metrics_clientapp[t]
        assert metrics["custom"] == 42.0 and metrics["replies"] == 3
        if ours(cls):
            assert metrics["uplink_bytes"] > 0 and metrics["downlink_bytes"] > 0
        else:
            assert set(metrics.keys()) == {"custom", "replies"}


# ------------------------------------------------------------ sampling
def growing_grid(small=3, large=8, after=2) -> Mock:
    """A Grid reporting ``small`` nodes for the first ``after`` calls, ``large`` from then on."""
    grid = Mock(spec=Grid)
    calls = {"n": 0}

    def get_node_ids():
        calls["n"] += 1
        return list(range(100, 100 + (small if calls["n"] <= after else large)))

    grid.get_node_ids.side_effect = get_node_ids
    return grid


@pytest.mark.parametrize("cls", CLASSES)
def test_min_train_nodes_is_waited_for(monkeypatch, cls):
    slept = []
    monkeypatch.setattr(flower_strategy_utils, "sleep", slept.append)
    monkeypatch.setattr(base_module.time, "sleep", slept.append)
    grid = growing_grid()
    strategy = make(cls, fraction_train=0.5, min_train_nodes=5)
    arrays = ArrayRecord({"a": Array(np.zeros(10, dtype=np.float32))})
    messages = list(strategy.configure_train(1, arrays, ConfigRecord(), grid))
    assert slept, "did not wait for the nodes"
    dst = [m.metadata.dst_node_id for m in messages]
    assert len(dst) == len(set(dst)) == 5
    assert set(dst) <= set(range(100, 108))
    grid.send_and_receive.assert_not_called()


@pytest.mark.parametrize("cls", CLASSES)
def test_configure_train_does_no_network_io(cls):
    grid = Mock(spec=Grid)
    grid.get_node_ids.return_value = [11, 22, 33]
    strategy = make(cls)
    messages = list(strategy.configure_train(1, ArrayRecord({"a": Array(np.ones(5, dtype=np.float32))}), ConfigRecord(), grid))
    assert sorted(m.metadata.dst_node_id for m in messages) == [11, 22, 33]
    assert all(m.metadata.message_type == "train" for m in messages)
    grid.send_and_receive.assert_not_called()
    grid.push_messages.assert_not_called()
    grid.pull_messages.assert_not_called()


@pytest.mark.parametrize("cls", CLASSES)
def test_fraction_train_zero_skips_training(tmp_path, monkeypatch, caplog, cls):
    """configure_train returns [] at once: it does not even wait for min_available_nodes; no warning per round."""

    def no_waiting(seconds):
        raise AssertionError("waited for nodes although training is skipped")

    monkeypatch.setattr(flower_strategy_utils, "sleep", no_waiting)
    monkeypatch.setattr(base_module.time, "sleep", no_waiting)
    grid = Mock(spec=Grid)
    grid.get_node_ids.return_value = []  # nobody connected yet
    strategy = make(cls, fraction_train=0.0)
    assert strategy.min_train_nodes == FedAvg(fraction_train=0.0).min_train_nodes == 0
    assert list(strategy.configure_train(1, ArrayRecord({"a": Array(np.ones(5, dtype=np.float32))}), ConfigRecord(), grid)) == []
    grid.send_and_receive.assert_not_called()
    # and a whole run trains nothing
    grid = bench(tmp_path, user_app(steps({"a": (5,)}), {0: 1, 1: 1}), 2)
    with caplog.at_level(logging.WARNING, logger="flwr"):
        result = make(cls, fraction_train=0.0, fraction_evaluate=0.0).start(
            grid, ArrayRecord({"a": Array(np.ones(5, dtype=np.float32))}), num_rounds=2)
    assert result.train_metrics_clientapp == {}
    assert "no valid update" not in caplog.text  # skipping by design is not a failed round
    assert not any(Instruction.read(m.content) is None or Instruction.read(m.content).phase == protocol.PHASE_TRAIN for m in grid.sent)


@pytest.mark.parametrize("cls", CLASSES)
def test_a_round_with_no_valid_reply_returns_none_none(tmp_path, caplog, cls):
    grid = bench(tmp_path, user_app(steps({"a": (5,)}), {0: 1, 1: 1}, fail=True), 2)
    strategy = make(cls, fraction_evaluate=0.0)
    messages = list(strategy.configure_train(1, ArrayRecord({"a": Array(np.ones(5, dtype=np.float32))}), ConfigRecord(), grid))
    replies = list(grid.send_and_receive(messages))
    assert len(replies) == 2 and all(r.has_error() for r in replies)
    with caplog.at_level(logging.WARNING, logger="flwr"):
        assert strategy.aggregate_train(1, replies) == (None, None)
    if cls is not FedAvg:  # ours says the round changed nothing
        assert "round 1: no valid update; global model unchanged" in caplog.text


# ------------------------------------------------------------ start twice
def _second_start(tmp_path, cls):
    shapes = {"a": (3, 3), "b": (3,)}
    weights = {0: 2, 1: 5, 2: 1}
    trained = steps(shapes, seed=9)
    grid = bench(tmp_path, user_app(trained, weights), 3)
    strategy = make(cls, fraction_evaluate=0.0)
    first = {n: np.zeros(s, dtype=np.float32) for n, s in shapes.items()}
    strategy.start(grid, ArrayRecord({n: Array(v) for n, v in first.items()}), num_rounds=2)
    second = {n: np.full(s, 3.0, dtype=np.float32) for n, s in shapes.items()}
    before = len(grid.sent)
    result = strategy.start(grid, ArrayRecord({n: Array(v) for n, v in second.items()}), num_rounds=1)
    expected = Reference(kind_of(cls), second, weights, trained).round(1, list(weights))
    return grid, before, result, expected


@pytest.mark.parametrize("cls", CLASSES)
def test_a_second_start_with_a_new_initial_model_runs(tmp_path, cls):
    grid, before, result, _ = _second_start(tmp_path, cls)
    assert len(result.arrays) == 2 and result.arrays["a"].numpy().shape == (3, 3)
    assert result.train_metrics_clientapp[1] is not None
    if ours(cls):
        sent = [Instruction.read(m.content) for m in grid.sent[before:]]
        assert [i.sync_mode for i in sent if i.phase == protocol.PHASE_TRAIN] == ["dense"] * 3
        assert result.train_metrics_clientapp[1]["failures"] == 0  # no SyncError on any client


@pytest.mark.parametrize(
    "cls",
    [
        FedAvg,
        *OURS,
    ],
)
def test_a_second_start_begins_from_the_new_model_with_clean_clients(tmp_path, cls):
    _, _, result, expected = _second_start(tmp_path, cls)
    assert_arrays(result.arrays, expected, atol=2e-6)


# ------------------------------------------------------------ custom record keys
@pytest.mark.parametrize("cls", CLASSES)
def test_custom_configrecord_and_arrayrecord_keys_reach_the_users_train_function(tmp_path, cls):
    shapes = {"a": (2, 5)}
    weights = {0: 4, 1: 1, 2: 2}
    trained = steps(shapes, seed=3)  # uses cfg["lr"]: the user's config must arrive under "cfg"
    seen = []
    app = user_app(trained, weights, arrays_key="model", config_key="cfg", seen=seen)
    grid = bench(tmp_path, app, 3)
    strategy = make(cls, arrayrecord_key="model", configrecord_key="cfg", fraction_evaluate=0.0)
    model0 = {"a": np.linspace(-1, 1, 10, dtype=np.float32).reshape(2, 5)}
    cfg = ConfigRecord({"lr": 0.25})
    result = strategy.start(grid, ArrayRecord({"a": Array(model0["a"])}), num_rounds=2, train_config=cfg)
    ref = Reference(kind_of(cls), model0, weights, trained)
    for t in (1, 2):
        expected = ref.round(t, list(weights), ConfigRecord({"lr": 0.25, "server-round": t}))
    assert_arrays(result.arrays, expected, atol=2e-6)
    assert len(seen) == 6
    for _, keys, config in seen:
        assert keys == ["cfg", "model"]  # the user sees their two records, nothing of ours
        assert config["lr"] == 0.25 and config["server-round"] in (1, 2)
