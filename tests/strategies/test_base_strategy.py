"""SparseFedAvg's server side against the real SparseMod, in process (``tests/inprocess.py``).

A bad reply -- a malformed payload, NaN, out-of-range indices, the wrong
size, a missing record, a missing / non-positive / NaN / bool weight, a reply
for another round, a client on the wrong model, an error reply -- is dropped
on its own: the global model moves by exactly the other clients' weighted
updates, the round metrics count the failure, the bad client is re-synced
densely and told its update was not taken, and (client side, through the
real mod) puts that update back into its error memory: nothing is lost.

The oracle (:class:`Reference`) is written here from the papers' equations
in numpy, independently of :mod:`fl_sparse.algorithms`.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import tempfile
from collections.abc import Callable

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.logger import FLOWER_LOGGER
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from inprocess import InProcessGrid
from inprocess import node_id as node
from oracles import topk_np

from fl_sparse import codec, protocol
from fl_sparse.clients import SparseMod
from fl_sparse.protocol import Instruction, Report
from fl_sparse.sparse import SparseTensor
from fl_sparse.strategies import BidirectionalTopKSGD, DenseFedAvg, SparseFedAvg, TopKSGD

FLOWER_LOGGER.setLevel(logging.WARNING)

# A tiny model: two float arrays (flattened, compressed) and one integer array (sent exactly).
SHAPES = {"w": (4, 6), "b": (6,)}
FLOATS = tuple(SHAPES)
D = sum(int(np.prod(s)) for s in SHAPES.values())  # 30
K = 5


def initial_model(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    model = {name: rng.standard_normal(shape).astype(np.float32) for name, shape in SHAPES.items()}
    model["count"] = np.array([10], dtype=np.int64)
    return model


def record_of(model: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({name: Array(np.ascontiguousarray(x)) for name, x in model.items()})


def model_of(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {name: record[name].numpy().copy() for name in record.keys()}


def local_step(pid: int, server_round: int = 1) -> dict[str, np.ndarray]:
    """What client ``pid`` subtracts in a round: fixed, different per client and round."""
    rng = np.random.default_rng(1000 * pid + server_round)
    return {name: rng.standard_normal(shape).astype(np.float32) for name, shape in SHAPES.items()}


def toy_app(weights: dict[int, float], *, key: str = "num-examples", fail: Callable[[int, int], bool] | None = None):
    """SparseMod + a plain user train function (quickstart style) that takes a fixed step."""
    app = ClientApp(mods=[SparseMod()])

    @app.train()
    def train(msg: Message, context) -> Message:
        pid = int(context.node_config["partition-id"])
        server_round = int(msg.content["config"]["server-round"])
        if fail is not None and fail(server_round, pid):
            raise RuntimeError(f"client {pid} crashed in round {server_round}")
        arrays = msg.content["arrays"]
        step = local_step(pid, server_round)
        out = ArrayRecord()
        for name in arrays.keys():
            x = arrays[name].numpy()
            out[name] = Array(x - step[name] if name in step else x + (pid + 1))
        metrics = MetricRecord({key: weights[pid], "train-loss": 1.0 + pid})
        return Message(RecordDict({"arrays": out, "metrics": metrics}), reply_to=msg)

    return app


def flat(model: dict[str, np.ndarray]) -> np.ndarray:
    return np.concatenate([model[name].ravel() for name in FLOATS])


def unflat(vec: np.ndarray) -> dict[str, np.ndarray]:
    out, at = {}, 0
    for name, shape in SHAPES.items():
        n = int(np.prod(shape))
        out[name] = vec[at : at + n].reshape(shape)
        at += n
    return out


def topk(x: np.ndarray, k: int | None) -> np.ndarray:
    """Keep the k entries of largest magnitude (all of them for k=None)."""
    return x.copy() if k is None else topk_np(x, k)


class Reference:
    """Algorithms 1/2 of the bidirectional top-K paper, per client, in numpy.

    ``w`` is float32 like the server's model; ``e[q]`` is client q's error;
    ``delta`` the server error. A reply dropped after the client compressed
    puts its sent update back into the client's error (the client is told
    next round); a client that crashed keeps its state as it was.
    """

    def __init__(self, model0, weights, k=K, down_k=None, ef=True):
        self.w = flat(model0).astype(np.float32)
        self.count = model0["count"].astype(np.int64)
        self.weights, self.k, self.down_k, self.ef = weights, k, down_k, ef
        self.e: dict[int, np.ndarray] = {}
        self.delta = np.zeros(D)

    def round(self, server_round, sampled, dropped=(), crashed=()):
        sent, exact = {}, {}
        for q in sampled:
            if q in crashed:
                continue
            step = flat(local_step(q, server_round))
            delta_q = (self.w - (self.w - step)).astype(np.float64)  # the client's float32 step, exactly
            a = self.e.get(q, 0.0) + delta_q if self.ef else delta_q
            s = topk(a, self.k)
            self.e[q] = a if q in dropped else a - s
            if q not in dropped:
                sent[q] = s
                exact[q] = self.count + (q + 1)
        if not sent:
            return False
        total = math.fsum(self.weights[q] for q in sent)
        g = sum(self.weights[q] / total * s for q, s in sent.items())
        if self.down_k is not None:
            g = g + self.delta
            ghat = topk(g, self.down_k)
            self.delta = g - ghat
            g = ghat
        self.w = (self.w - g).astype(np.float32)
        self.count = np.rint(sum(self.weights[q] / total * exact[q] for q in sent)).astype(np.int64)
        return True

    def model(self) -> dict[str, np.ndarray]:
        return {**unflat(self.w), "count": self.count}


def assert_model(record: ArrayRecord, expected: dict[str, np.ndarray], atol=1e-5) -> None:
    got = model_of(record)
    assert list(got) == list(expected)
    for name in FLOATS:
        np.testing.assert_allclose(got[name], expected[name], rtol=0, atol=atol, err_msg=name)
    np.testing.assert_array_equal(got["count"], expected["count"])


def play(strategy, grid, server_round, arrays, config=None):
    """One round as Flower's loop plays it; returns (messages, replies, (arrays, metrics))."""
    messages = list(strategy.configure_train(server_round, arrays, config or ConfigRecord(), grid))
    replies = list(grid.send_and_receive(messages, timeout=60))
    return messages, replies, strategy.aggregate_train(server_round, replies)


def instructions(messages) -> dict[int, Instruction]:
    return {m.metadata.dst_node_id: Instruction.read(m.content) for m in messages}


# --------------------------------------------------------------------- corruptions
def _wire(a: np.ndarray) -> Array:
    a = np.ascontiguousarray(a.ravel())
    return Array(dtype=str(a.dtype), shape=(int(a.size),), stype=codec.STYPE, data=a.tobytes())


def _raw(record: ArrayRecord, key: str) -> np.ndarray:
    return np.frombuffer(record[key].data, dtype=record[key].dtype).copy()


def _update(reply: Message) -> ArrayRecord:
    return reply.content.array_records[protocol.UPDATE]


def _sent(reply: Message) -> SparseTensor:
    return codec.decode(_update(reply), D)


def _replace_report(reply: Message, **changes) -> None:
    """Rewrite the mod's Report; a callable change gets the Report and returns the new value."""
    report = Report.from_record(reply.content.config_records[protocol.RECORD])
    changes = {k: (v(report) if callable(v) else v) for k, v in changes.items()}
    reply.content[protocol.RECORD] = dataclasses.replace(report, **changes).to_record()


def _set_weight(reply: Message, value) -> None:
    record = reply.content.metric_records["metrics"]
    record._data["num-examples"] = value  # smuggled past MetricRecord's type check (a hostile client)


def _garbage_header(reply):
    reply.content.array_records[protocol.UPDATE]["header"] = _wire(np.array([1, 2, 3], dtype=np.int64))


def _nan_value(reply):
    record = _update(reply)
    values = _raw(record, "values")
    values[2] = np.nan
    record["values"] = _wire(values)


def _index_out_of_range(reply):
    record = _update(reply)
    positions = _raw(record, "positions")
    positions[-1] = D + 5
    record["positions"] = _wire(positions)


def _unsorted_indices(reply):
    record = _update(reply)
    positions = _raw(record, "positions")
    positions[0], positions[1] = positions[1], positions[0]
    record["positions"] = _wire(positions)


def _truncated_rice(reply):
    record = codec.encode(_sent(reply), positions="rice")
    stream = _raw(record, "positions")
    record["positions"] = _wire(stream[: max(1, len(stream) // 2)])
    reply.content[protocol.UPDATE] = record


def _too_many_entries(reply):  # declares D > K entries
    reply.content[protocol.UPDATE] = codec.encode(SparseTensor.from_dense(torch.arange(1.0, D + 1)))


def _wrong_model_size(reply):
    s = _sent(reply)
    reply.content[protocol.UPDATE] = codec.encode(SparseTensor(s.indices, s.values, D + 7))


def _values_fewer_than_positions(reply):
    record = _update(reply)
    record["values"] = _wire(_raw(record, "values")[:-1])


def _drop(key):
    def tamper(reply):
        del reply.content[key]

    return tamper


def _exact_wrong_shape(reply):
    reply.content.array_records[protocol.EXACT]["count"] = Array(np.array([1, 2], dtype=np.int64))


def _negative_uplink_metric(reply):
    record = reply.content.metric_records[protocol.METRICS]
    record["error-norm"] = -1.0


def _weight_missing(reply):
    reply.content["metrics"] = MetricRecord({"train-loss": 1.0})


def _unknown_report_field(reply):
    reply.content.config_records[protocol.RECORD]["surprise"] = 1


CORRUPTIONS: dict[str, Callable[[Message], None]] = {
    "garbage header": _garbage_header,
    "NaN value": _nan_value,
    "index out of range": _index_out_of_range,
    "unsorted indices": _unsorted_indices,
    "truncated rice stream": _truncated_rice,
    "more entries than k": _too_many_entries,
    "update for another model size": _wrong_model_size,
    "fewer values than positions": _values_fewer_than_positions,
    "update record missing": _drop(protocol.UPDATE),
    "report missing": _drop(protocol.RECORD),
    "uplink metrics missing": _drop(protocol.METRICS),
    "uplink metric negative": _negative_uplink_metric,
    "exact arrays missing": _drop(protocol.EXACT),
    "exact array of the wrong shape": _exact_wrong_shape,
    "user metrics missing": _drop("metrics"),
    "weight missing": _weight_missing,
    "weight zero": lambda r: _set_weight(r, 0),
    "weight negative": lambda r: _set_weight(r, -3.0),
    "weight NaN": lambda r: _set_weight(r, float("nan")),
    "weight infinite": lambda r: _set_weight(r, float("inf")),
    "weight bool": lambda r: _set_weight(r, True),
    "reply for the next round": lambda r: _replace_report(r, server_round=lambda rep: rep.server_round + 1),
    "reply for the previous round": lambda r: _replace_report(r, server_round=lambda rep: rep.server_round - 1),
    "client on another model": lambda r: _replace_report(r, model_hash="0" * 64),
    "unknown report field": _unknown_report_field,
}

WEIGHTS = {0: 5.0, 1: 2.0, 2: 9.0}


def _bench(tmp_path, weights=WEIGHTS, tamper=None, fail=None, **grid_kw):
    app = toy_app(weights, fail=fail)
    return InProcessGrid(app, len(weights), node_config=lambda i: {"state-dir": str(tmp_path)}, tamper=tamper, **grid_kw)


def _topk_strategy(**kw):
    kw.setdefault("fraction_evaluate", 0.0)
    return TopKSGD(k=K, **kw)


# --------------------------------------------------------------------- tests
@pytest.mark.parametrize("kind", [*CORRUPTIONS, "error reply"])
def test_a_bad_reply_is_dropped_alone_and_its_update_is_not_lost(tmp_path, kind):
    bad = 1
    good_records: dict[int, ArrayRecord] = {}
    good_exact_bytes: dict[int, int] = {}  # the integer array "count" rides along, counted as uplink too

    def tamper(n, reply):
        if reply.has_error():
            return reply
        if reply.content.config_records[protocol.RECORD].get("server-round") == 1:
            if n == node(bad) and kind != "error reply":
                CORRUPTIONS[kind](reply)
            elif n != node(bad):
                good_records[n] = _update(reply)
                good_exact_bytes[n] = sum(len(a.data) for a in reply.content[protocol.EXACT].values())
        return reply

    crash = (lambda t, pid: t == 1 and pid == bad) if kind == "error reply" else None
    grid = _bench(tmp_path, tamper=tamper, fail=crash)
    strategy = _topk_strategy()
    strategy.identify(grid)
    model0 = initial_model()
    ref = Reference(model0, WEIGHTS)

    _, replies, (arrays, metrics) = play(strategy, grid, 1, record_of(model0))
    assert len(replies) == 3
    ref.round(1, [0, 1, 2], crashed={bad} if kind == "error reply" else (), dropped={bad} if kind != "error reply" else ())
    # Only the two good updates, weighted 5 : 9 between themselves.
    assert arrays is not None
    assert_model(arrays, ref.model())
    torch.testing.assert_close(strategy.state.model, torch.from_numpy(ref.w), rtol=0, atol=1e-5)
    rm = strategy.state.round_metrics[1]
    assert (rm["accepted"], rm["failures"]) == (2, 1)
    assert (metrics["accepted"], metrics["failures"]) == (2, 1)
    assert metrics["uplink_bytes"] == sum(codec.wire_size(r).total_bytes for r in good_records.values()) + sum(
        good_exact_bytes.values())
    assert rm["q_val_up"] == pytest.approx(32 * K / D)  # fp32, H = 1, mean over the accepted replies
    assert rm["q_loc_up"] == pytest.approx(np.mean([codec.wire_size(r).position_bits for r in good_records.values()]) / D)
    assert strategy.state.accepted == {node(0): 1, node(2): 1}
    assert node(bad) not in strategy.state.client_versions

    # Next round: the bad client gets the dense model and learns its update was not taken;
    # the mod puts that update back into its error, so round 2 matches the reference exactly.
    messages, replies, (arrays2, metrics2) = play(strategy, grid, 2, arrays)
    instr = instructions(messages)
    assert (instr[node(bad)].sync_mode, instr[node(bad)].accepted_round) == ("dense", -1)
    for q in (0, 2):
        assert (instr[node(q)].sync_mode, instr[node(q)].accepted_round) == ("delta", 1)
    assert metrics2["failures"] == 0 and metrics2["accepted"] == 3
    ref.round(2, [0, 1, 2])
    assert_model(arrays2, ref.model())


def test_every_reply_bad_returns_none_and_leaves_the_model_alone(tmp_path):
    kinds = ["NaN value", "client on another model", "weight NaN"]

    def tamper(n, reply):
        CORRUPTIONS[kinds[(n - 1000) // 7]](reply)
        return reply

    grid = _bench(tmp_path, tamper=tamper)
    strategy = _topk_strategy()
    model0 = initial_model()
    _, _, result = play(strategy, grid, 1, record_of(model0))
    assert result == (None, None)
    assert strategy.state.version == 0
    assert torch.equal(strategy.state.model, torch.from_numpy(flat(model0)))
    assert strategy.state.round_metrics[1]["accepted"] == 0
    assert strategy.state.round_metrics[1]["failures"] == 3
    assert strategy.state.accepted == {} and strategy.state.client_versions == {}


HYP = settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@HYP
@given(
    weights=st.lists(st.integers(1, 50), min_size=3, max_size=5),
    bad=st.lists(st.tuples(st.integers(1, 3), st.integers(0, 4), st.sampled_from(sorted(CORRUPTIONS))), max_size=4),
    crash=st.sets(st.tuples(st.integers(1, 3), st.integers(0, 4)), max_size=2),
    fraction=st.sampled_from([0.5, 0.8, 1.0]),
    bidirectional=st.booleans(),
)
def test_several_rounds_partial_participation_bad_replies_match_the_reference(weights, bad, crash, fraction, bidirectional):
    n = len(weights)
    w = {q: float(x) for q, x in enumerate(weights)}
    bad = {(t, q): kind for t, q, kind in bad if q < n}
    crash = {(t, q) for t, q in crash if q < n and (t, q) not in bad}
    with tempfile.TemporaryDirectory() as tmp:

        def tamper(node_id, reply):
            key = (int(Report.read(reply.content).server_round), (node_id - 1000) // 7) if not reply.has_error() else None
            if key in bad:
                CORRUPTIONS[bad[key]](reply)
            return reply

        app = toy_app(w, fail=lambda t, q: (t, q) in crash)
        grid = InProcessGrid(app, n, node_config=lambda i: {"state-dir": tmp}, tamper=tamper)
        common = dict(fraction_train=fraction, fraction_evaluate=0.0, min_train_nodes=1, min_available_nodes=1, seed=3)
        if bidirectional:
            strategy = BidirectionalTopKSGD(k=K, downlink_k=3, **common)
        else:
            strategy = TopKSGD(k=K, **common)
        strategy.identify(grid)
        model0 = initial_model(seed=len(weights))
        ref = Reference(model0, w, down_k=3 if bidirectional else None)
        arrays = record_of(model0)
        for t in (1, 2, 3):
            messages, replies, (new, metrics) = play(strategy, grid, t, arrays)
            sampled = sorted((m.metadata.dst_node_id - 1000) // 7 for m in messages)
            dropped = {q for q in sampled if (t, q) in bad}
            crashed = {q for q in sampled if (t, q) in crash}
            applied = ref.round(t, sampled, dropped=dropped, crashed=crashed)
            failures = len(dropped) + len(crashed)
            assert strategy.state.round_metrics[t]["failures"] == failures
            assert strategy.state.round_metrics[t]["accepted"] == len(sampled) - failures
            if not applied:
                assert (new, metrics) == (None, None)
                continue
            assert metrics["failures"] == failures
            assert_model(new, ref.model(), atol=2e-5)
            if bidirectional:
                np.testing.assert_allclose(strategy.state.server_error.error.numpy(), ref.delta, atol=2e-5)
            arrays = new


def test_bidirectional_server_error_feedback_loses_nothing(tmp_path):
    """δ_t + ĝ_t == g_t + δ_{t−1}: what the server does not send it keeps (two rounds)."""
    grid = _bench(tmp_path)
    strategy = BidirectionalTopKSGD(k=K, downlink_k=3, fraction_evaluate=0.0)
    model0 = initial_model()
    ref = Reference(model0, WEIGHTS, down_k=3)
    arrays = record_of(model0)
    for t in (1, 2):
        before = strategy.state.server_error.error.clone() if t > 1 else torch.zeros(D)
        w_before = strategy.state.model.clone() if t > 1 else torch.from_numpy(flat(model0))
        _, replies, (arrays, _) = play(strategy, grid, t, arrays)
        ref.round(t, [0, 1, 2])
        g = sum(WEIGHTS[(r.metadata.src_node_id - 1000) // 7] * _sent(r).to_dense() for r in replies) / sum(WEIGHTS.values())
        sent = w_before - strategy.state.model
        assert int((sent != 0).sum()) <= 3
        torch.testing.assert_close(sent + strategy.state.server_error.error, g + before, rtol=0, atol=1e-5)
        assert_model(arrays, ref.model())


@pytest.mark.parametrize("have", [None, -1, 0, 1, 2, 3])
def test_catch_up_payload_brings_any_version_to_the_servers_model(tmp_path, have):
    """One client, rice positions: a catch-up of ≤ 3 top-5 updates is cheaper as 'set' than dense."""
    grid = _bench(tmp_path, weights={0: 1.0})
    strategy = _topk_strategy(min_available_nodes=1, min_train_nodes=1, downlink_positions="rice")
    model0 = initial_model()
    snapshots = {0: torch.from_numpy(flat(model0))}
    arrays = record_of(model0)
    for t in (1, 2, 3):
        _, _, (arrays, _) = play(strategy, grid, t, arrays)
        snapshots[t] = strategy.state.model.clone()
    mode, payload = strategy.sync_payload(have)
    client = None if have in (None, -1) else snapshots[have].clone()
    segments = codec.segments_of(strategy.state.layout)  # a client holds the layout: rice may be segmented
    if mode == "dense":
        client = codec.decode_dense(payload, D)
    elif mode == "delta":
        codec.decode(payload, D, segments=segments).add_(client, alpha=-1.0)
    elif mode == "set":
        s = codec.decode(payload, D, segments=segments)
        client[s.indices] = s.values
    else:
        assert mode == "none" and payload is None
    assert torch.equal(client, strategy.state.model)
    assert mode == {None: "dense", -1: "dense", 2: "delta", 3: "none"}.get(have, "set")
    if mode == "set":
        assert codec.wire_size(payload).total_bytes < codec.wire_size(codec.encode_dense(strategy.state.model)).total_bytes


def test_a_client_that_misses_rounds_is_caught_up_and_its_update_counts(tmp_path):
    """Client 2 is away for rounds 2-3; in round 4 it gets a 'set' sync, trains on the right model."""
    grid = _bench(tmp_path)
    strategy = _topk_strategy(min_available_nodes=1, min_train_nodes=1)
    strategy.identify(grid)
    model0 = initial_model()
    ref = Reference(model0, WEIGHTS)
    arrays = record_of(model0)
    for t in (1, 2, 3, 4):
        if t == 2:
            grid.online.discard(node(2))
        if t == 4:
            grid.online.add(node(2))
        messages, _, (arrays, metrics) = play(strategy, grid, t, arrays)
        sampled = sorted((m.metadata.dst_node_id - 1000) // 7 for m in messages)
        assert sampled == ([0, 1] if t in (2, 3) else [0, 1, 2])
        ref.round(t, sampled)
        assert metrics["failures"] == 0
        assert_model(arrays, ref.model())
    assert instructions(messages)[node(2)].sync_mode in ("set", "dense")
    assert instructions(messages)[node(2)].base_version == 0  # it trained from w_0 in round 1


def test_a_client_that_lost_its_state_is_refused_then_resynced(tmp_path):
    grid = _bench(tmp_path)
    strategy = _topk_strategy()
    model0 = initial_model()
    arrays = record_of(model0)
    _, _, (arrays, _) = play(strategy, grid, 1, arrays)
    for f in (tmp_path / f"gen-{strategy.state.generation}").glob("client-1*"):
        f.unlink()
    messages, replies, (arrays2, metrics) = play(strategy, grid, 2, arrays)
    assert instructions(messages)[node(1)].sync_mode == "delta"
    assert [r.has_error() for r in replies].count(True) == 1
    assert metrics["failures"] == 1 and metrics["accepted"] == 2
    messages, _, (_, metrics) = play(strategy, grid, 3, arrays2)
    assert instructions(messages)[node(1)].sync_mode == "dense"
    assert metrics["failures"] == 0


def test_weights_are_the_users_num_examples_not_uniform(tmp_path):
    """Dense path: w_1 = Σ_q (n_q / Σ n) w_q exactly as FedAvg averages the trained models."""
    weights = {0: 1.0, 1: 30.0, 2: 4.0}
    grid = _bench(tmp_path, weights=weights)
    strategy = DenseFedAvg(fraction_evaluate=0.0)
    model0 = initial_model()
    _, _, (arrays, metrics) = play(strategy, grid, 1, record_of(model0))
    total = sum(weights.values())
    trained = [{k: model0[k] - local_step(q)[k] for k in FLOATS} for q in range(3)]
    for name in FLOATS:
        expected = sum(weights[q] / total * trained[q][name].astype(np.float64) for q in range(3))
        np.testing.assert_allclose(arrays[name].numpy(), expected, rtol=0, atol=1e-6)
    # The integer array: FedAvg's weighted average, rounded.
    count = np.rint(sum(weights[q] / total * (10 + q + 1) for q in range(3)))
    assert arrays["count"].numpy().tolist() == [int(count)]
    assert metrics["num_examples"] == 35
    assert metrics["train-loss"] == pytest.approx(sum(weights[q] / total * (1.0 + q) for q in range(3)))


def test_bad_config_is_refused_at_construction():
    with pytest.raises(ValueError, match="value code"):
        TopKSGD(ratio=0.01, uplink_values="q99")
    with pytest.raises(ValueError, match="position code"):
        TopKSGD(ratio=0.01, uplink_positions="zip")
    with pytest.raises(ValueError):
        TopKSGD(ratio=1.5)
    with pytest.raises(ValueError, match="fraction_train"):
        TopKSGD(ratio=0.01, fraction_train=1.5)
    with pytest.raises(ValueError, match="fraction_evaluate"):
        TopKSGD(ratio=0.01, fraction_evaluate=-0.1)
    with pytest.raises(ValueError, match="min_train_nodes"):
        TopKSGD(ratio=0.01, min_train_nodes=True)
    with pytest.raises(ValueError, match="min_available_nodes"):
        TopKSGD(ratio=0.01, min_available_nodes=-1)
    for key in ("weighted_by_key", "arrayrecord_key", "configrecord_key"):
        with pytest.raises(ValueError, match=key):
            SparseFedAvg(**{key: protocol.RECORD})
        with pytest.raises(ValueError, match=key):
            SparseFedAvg(**{key: protocol.UPDATE})
        with pytest.raises(ValueError, match=key):
            SparseFedAvg(**{key: ""})
    with pytest.raises(ValueError):
        SparseFedAvg(uplink={"name": "no-such-compressor"})
    # fraction_train = 0 is allowed, as in FedAvg: it skips training.
    assert TopKSGD(ratio=0.01, fraction_train=0.0).min_train_nodes == 0


def test_aggregate_train_before_configure_train_is_an_error():
    with pytest.raises(RuntimeError, match="configure_train"):
        TopKSGD(ratio=0.01).aggregate_train(1, [])


def test_two_nodes_claiming_one_partition_id_on_resume_inherit_nothing(tmp_path, caplog):
    """Partition ids are self-reported: a duplicate claim must not hand a saved client's state to anyone."""
    grid = _bench(tmp_path)
    strategy = _topk_strategy()
    arrays = record_of(initial_model())
    for t in (1, 2):
        _, _, (arrays, _) = play(strategy, grid, t, arrays)
    saved_versions = dict(strategy.state.client_versions)
    assert sorted(saved_versions) == [node(p) for p in range(len(WEIGHTS))]

    # A new run: new node ids; the node of partition 2 and another both say "partition 0".
    new_ids = {node(p): 5000 + p for p in range(len(WEIGHTS))}
    grid.node_ids = [new_ids[n] for n in grid.node_ids]
    grid.contexts = {new_ids[n]: ctx for n, ctx in grid.contexts.items()}
    grid.online = set(grid.node_ids)
    for n, ctx in grid.contexts.items():
        ctx.node_id = n
    grid.contexts[5002].node_config["partition-id"] = 0
    with caplog.at_level(logging.WARNING, logger="flwr"):
        strategy.reidentify(grid)
    assert "[5000, 5002] all claim partition id 0" in caplog.text
    versions = strategy.state.client_versions
    assert 5000 not in versions and 5002 not in versions  # neither inherits partition 0's model version
    # the undisputed client moved; partition 0's entry stays under its old node id
    assert versions[5001] == saved_versions[node(1)] and versions[node(0)] == saved_versions[node(0)]
    # A later reply claiming partition 0 does not take the saved state either.
    strategy._learn_key(5002, Report(server_round=3, partition_id=0))
    assert strategy.state.client_versions.get(5002) is None and versions[node(0)] == saved_versions[node(0)]

    messages, replies, (arrays3, metrics) = play(strategy, grid, 3, arrays)
    sync = {n: i.sync_mode for n, i in instructions(messages).items()}
    assert sync[5000] == sync[5002] == "dense" and sync[5001] != "dense"
    assert metrics["failures"] == 0 and metrics["accepted"] == len(WEIGHTS)
    assert all(np.isfinite(x).all() for x in model_of(arrays3).values())


@pytest.mark.parametrize("exact_running_stats", [True, False])
def test_batchnorm_running_statistics_are_sent_exactly_by_default(exact_running_stats):
    """Local training replaces running statistics: error feedback would pile up the same difference."""
    import torch.nn as nn

    net = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    strategy = TopKSGD(ratio=0.5, exact_running_stats=exact_running_stats, exact_arrays=["0.bias"])
    strategy.initialize(ArrayRecord(net.state_dict()))
    layout = strategy.state.layout
    stats = {"1.running_mean", "1.running_var"}
    assert ("1.num_batches_tracked" in layout.exact_names) and ("0.bias" in layout.exact_names)  # always / asked
    assert (stats <= set(layout.exact_names)) == exact_running_stats
    assert (stats <= set(layout.names)) == (not exact_running_stats)
    assert {"0.weight", "1.weight", "1.bias"} <= set(layout.names)
    options = strategy.options()
    assert ("exact_running_stats" in options) == (not exact_running_stats)  # old checkpoints: the default
