"""Tests written to kill mutants of SparseFedAvg's read path (``aggregate_train``, ``read_replies``, ...).

The server's side of a round after the replies are in: reading and checking
each reply (``read_replies``, ``read_report``, ``read_update``,
``_read_exact``), dropping and logging the bad ones (``drop_reply``,
``exception_reason``), the round's numbers (``round_metrics``,
``train_metrics``, ``_weighted_metric``, ``_rho_estimates``) and the
evaluate replies (``aggregate_evaluate``). Replies are real ones from the
real :class:`SparseMod` on the in-process grid, or hand-made
:class:`ClientUpdate` where a metric needs exact inputs; the expected
numbers are computed here independently (numpy, ``math``). Weights are
unequal throughout, so a uniform average or a wrong weight shows. See
docs/testing.md.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict
from flwr.common.logger import FLOWER_LOGGER
from inprocess import InProcessGrid, _metadata, scratch_folder, step_app
from inprocess import node_id as node
from oracles import topk_np

from fl_sparse import codec, protocol
from fl_sparse.compressors import TopK
from fl_sparse.protocol import Report, UplinkMetrics
from fl_sparse.sparse import SparseTensor
from fl_sparse.strategies import BidirectionalTopKSGD, SparseFedAvg, TopKSGD
from fl_sparse.strategies import base
from fl_sparse.strategies.base import ClientUpdate

FLOWER_LOGGER.setLevel(logging.WARNING)

D, K = 24, 4
WEIGHTS = {0: 3.0, 1: 1.0, 2: 6.0, 3: 2.0}
LOSSES = {0: 0.5, 1: 2.0, 2: 1.25, 3: 4.0}


def _model() -> ArrayRecord:
    rng = np.random.default_rng(5)
    return ArrayRecord({"w": Array(rng.standard_normal((4, 6)).astype(np.float32))})


def _step(pid: int, rnd: int) -> np.ndarray:
    return np.random.default_rng(100 * pid + rnd).standard_normal((4, 6)).astype(np.float32)


def _grid(n: int = 3, tamper=None, metrics=None) -> InProcessGrid:
    folder = scratch_folder()
    app = step_app(_step, WEIGHTS.__getitem__, metrics)
    return InProcessGrid(app, n, node_config=lambda i: {"state-dir": folder}, tamper=tamper)


def _replies(strategy, grid, server_round: int = 1, arrays=None):
    if arrays is None:
        arrays = strategy.current_arrays() if strategy.state.model is not None else _model()
    messages = list(strategy.configure_train(server_round, arrays, ConfigRecord(), grid))
    return list(grid.send_and_receive(messages, timeout=60))


def _play(strategy, grid, server_round: int, arrays=None):
    replies = _replies(strategy, grid, server_round, arrays)
    return replies, strategy.aggregate_train(server_round, replies)


def _topk(strategy_n: int = 3, **kw) -> TopKSGD:
    return TopKSGD(k=K, min_available_nodes=strategy_n, min_train_nodes=strategy_n, fraction_evaluate=0.0, **kw)


def _warnings(caplog) -> list[str]:
    """The WARNING lines fl-sparse's strategy logged (Flower's own, e.g. about fraction_evaluate, left out)."""
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and r.filename == "base.py"]


def _with_report(reply: Message, **fields) -> Message:
    report = Report.read(reply.content)
    reply.content[protocol.RECORD] = dataclasses.replace(report, **fields).to_record()
    return reply


def _update(node_id: int, weight: float, values=(1.0,), *, metrics=None, uplink=None, pos=0, val=0, nbytes=0):
    idx = torch.arange(len(values))
    content = RecordDict({"metrics": MetricRecord(metrics)}) if metrics is not None else RecordDict()
    return ClientUpdate(
        node=node_id, update=SparseTensor(idx, torch.tensor(values, dtype=torch.float32), D), weight=weight,
        user_content=content, uplink=uplink or UplinkMetrics(), position_bits=pos, value_bits=val, total_bytes=nbytes,
    )


def _strategy_at(w=None, **kw) -> TopKSGD:
    strategy = TopKSGD(k=2, fraction_evaluate=0.0, **kw)
    strategy.initialize(ArrayRecord({"w": Array((np.zeros(D) if w is None else w).astype(np.float32))}))
    return strategy


# ====================================================================== read_replies / drop_reply
def test_bad_replies_are_dropped_with_their_reasons_and_the_rest_is_read(caplog):
    """Four clients: one crashes (an error reply), one answers for another round, one is lost on the
    way, one is good. Exact log lines, failures, accepted, the versions the server forgets."""
    crash = {"on": False}

    def step(pid, rnd):
        if crash["on"] and pid == 1:
            raise RuntimeError("out of memory")
        return _step(pid, rnd)

    def tamper(n, reply):
        if not crash["on"]:
            return reply
        if n == node(2):
            return _with_report(reply, server_round=7)
        if n == node(3):
            return None
        return reply

    folder = scratch_folder()
    grid = InProcessGrid(step_app(step, WEIGHTS.__getitem__), 4, node_config=lambda i: {"state-dir": folder},
                         tamper=tamper)
    strategy = _topk(4)
    _play(strategy, grid, 1)  # every client holds version 1 now
    st = strategy.state
    assert st.client_versions == {node(p): 0 for p in range(4)} and st.accepted == {node(p): 1 for p in range(4)}
    assert strategy.first_error is None
    crash["on"] = True
    with caplog.at_level(logging.WARNING, logger="flwr"):
        replies = _replies(strategy, grid, 2)
        updates = strategy.read_replies(2, replies)
    assert [u.node for u in updates] == [node(0)]
    failed = f"round 2: client {node(1)} failed: RuntimeError: out of memory"
    rejected = f"round 2: rejected reply from client {node(2)}: reply for round 7"
    assert _warnings(caplog) == [failed, rejected]
    assert strategy.first_error == failed
    assert st.round_metrics[2]["failures"] == 2
    assert st.accepted == {node(0): 2, node(1): 1, node(2): 1, node(3): 1}
    # the good client holds version 1; the others' models are unknown now (dense sync next time)
    assert st.client_versions == {node(0): 1}
    # the first error stays the first one
    strategy.drop_reply(3, "client %d: %s", node(0), "later")
    assert strategy.first_error == failed
    assert node(0) not in st.client_versions


def test_drop_reply_formats_the_first_error_with_every_argument(caplog):
    strategy = _strategy_at()
    strategy.state.client_versions.update({5: 3, 6: 3})
    with caplog.at_level(logging.WARNING, logger="flwr"):
        strategy.drop_reply(4, "client %d sent %s of %d", 5, "x", 9)
    assert strategy.first_error == "round 4: client 5 sent x of 9"
    assert _warnings(caplog) == ["round 4: client 5 sent x of 9"]
    assert strategy.state.client_versions == {6: 3}
    strategy.drop_reply(4, "client %d", 7)  # a node it knew nothing about: nothing raised
    assert strategy.first_error == "round 4: client 5 sent x of 9"


def test_a_second_reply_from_a_client_is_refused_and_the_first_is_kept(caplog):
    strategy = _topk(2)
    grid = _grid(2)
    replies = _replies(strategy, grid)
    twice = replies + [replies[0]]
    with caplog.at_level(logging.WARNING, logger="flwr"):
        updates = strategy.read_replies(1, twice)
    assert [u.node for u in updates] == [node(0), node(1)]
    assert _warnings(caplog) == [
        f"round 1: rejected reply from client {node(0)}: a second reply from the same client this round"]
    assert strategy.state.round_metrics[1]["failures"] == 1


def test_read_report_checks_round_and_nonce_and_marks_the_node_seen():
    strategy = _topk(2)
    replies = _replies(strategy, _grid(2))
    r0, r1 = replies
    seen: set[int] = set()
    report = strategy.read_report(1, node(0), r0, seen)
    assert seen == {node(0)} and report == Report.read(r0.content)
    with pytest.raises(protocol.ProtocolError, match=r"^a second reply from the same client this round$"):
        strategy.read_report(1, node(0), r0, seen)
    with pytest.raises(protocol.ProtocolError, match=r"^reply for round 1$"):
        strategy.read_report(2, node(1), r1, set())
    # another node's nonce, and a node that was not asked
    with pytest.raises(protocol.ProtocolError, match=r"^reply does not echo the nonce of this round's message "
                                                     r"\(replayed or not asked\)$"):
        strategy.read_report(1, node(1), r0, set())
    with pytest.raises(protocol.ProtocolError, match=r"nonce"):
        strategy.read_report(1, node(5), r0, set())
    assert strategy.read_report(1, node(1), r1, set()).nonce == strategy._nonces[node(1)]
    # the node's key is learnt from its report
    assert strategy.node_keys[node(1)][0] == 1


def test_exception_reason_names_the_type_unless_it_is_a_payload_error():
    assert base.exception_reason(codec.PayloadError("bad header")) == "bad header"
    assert base.exception_reason(protocol.ProtocolError("no nonce")) == "no nonce"
    assert base.exception_reason(KeyError("w")) == "KeyError: 'w'"
    assert base.exception_reason(ValueError("x")) == "ValueError: x"


def test_an_exception_that_is_not_a_payload_error_is_logged_with_its_type(caplog):
    class Crashing(TopKSGD):
        def user_content(self, server_round, node_id, msg):
            raise KeyError("metrics")

    strategy = Crashing(k=K, min_available_nodes=1, min_train_nodes=1, fraction_evaluate=0.0)
    replies = _replies(strategy, _grid(1))
    with caplog.at_level(logging.WARNING, logger="flwr"):
        assert strategy.read_replies(1, replies) == []
    assert _warnings(caplog) == [f"round 1: rejected reply from client {node(0)}: KeyError: 'metrics'"]


def test_replies_are_read_in_client_order_whatever_order_they_arrive_in():
    strategy = _topk(3)
    replies = _replies(strategy, _grid(3))
    ordered = [u.node for u in strategy.read_replies(1, list(reversed(replies)))]
    assert ordered == [node(0), node(1), node(2)]
    # the order is the clients' keys, not the node ids: give partition 2 the smallest key
    strategy2 = _topk(3)
    replies = _replies(strategy2, _grid(3))
    strategy2.node_keys[node(2)] = (-1, node(2))
    pairs = strategy2.replies_by_node(replies)
    assert [n for n, _ in pairs] == [node(2), node(0), node(1)]
    assert [m.metadata.src_node_id for _, m in pairs] == [node(2), node(0), node(1)]


# ====================================================================== read_update / _read_exact
def test_read_update_fills_every_field_from_the_reply():
    strategy = _topk(3)
    replies = _replies(strategy, _grid(3, metrics=lambda pid: {"train-loss": LOSSES[pid]}))
    st = strategy.state
    from fl_sparse.flat import vector_hash

    expected_hash = vector_hash(st.model)
    for reply in replies:
        n = reply.metadata.src_node_id
        report = strategy.read_report(1, n, reply, set())
        u = strategy.read_update(1, n, reply, report, expected_hash)
        record = reply.content[protocol.UPDATE]
        size = codec.wire_size(record)
        decoded = codec.decode(record, D)
        assert u.node == n and u.weight == WEIGHTS[(n - 1000) // 7]
        assert torch.equal(u.update.indices, decoded.indices) and torch.equal(u.update.values, decoded.values)
        assert u.update.nnz == K
        assert (u.position_bits, u.value_bits, u.total_bytes) == (size.position_bits, size.value_bits, size.total_bytes)
        assert u.position_bits > 0 and u.value_bits == 32 * K
        assert u.uplink == UplinkMetrics.read(reply.content) and u.uplink.density == K / D
        assert dict(u.user_content["metrics"]) == {"num-examples": WEIGHTS[(n - 1000) // 7],
                                                   "train-loss": LOSSES[(n - 1000) // 7]}
        assert not any(protocol.is_protocol_key(k) for k in u.user_content.keys())
        assert u.exact is None and u.diagnostics is None
        assert st.client_versions[n] == 0


@pytest.mark.parametrize("extra", [0, 1])
def test_a_reply_with_more_entries_than_the_rounds_k_is_refused(extra, caplog):
    """The cap on declared entries is the round's k exactly (min(numel, k)): k entries pass, k + 1 do not."""
    strategy = _topk(1)
    replies = _replies(strategy, _grid(1))
    x = torch.arange(1, D + 1, dtype=torch.float32)
    idx = torch.arange(K + extra)
    replies[0].content[protocol.UPDATE] = codec.encode(SparseTensor(idx, x[idx], D), values="fp32", positions="raw")
    with caplog.at_level(logging.WARNING, logger="flwr"):
        updates = strategy.read_replies(1, replies)
    assert len(updates) == 1 - extra
    assert bool(_warnings(caplog)) == bool(extra)
    assert strategy._max_uplink_nnz(D) == K
    assert strategy._max_uplink_nnz(K - 1) == K - 1  # never more than the model has


def test_max_uplink_nnz_without_a_round_compressor_or_k_is_the_model_size():
    strategy = _strategy_at()
    assert strategy._round_compressor is None
    assert strategy._max_uplink_nnz(D) == D

    class NoK:
        pass

    class FloatK:
        def k_for(self, numel):
            return 2.9

    strategy._round_compressor = NoK()
    assert strategy._max_uplink_nnz(D) == D
    strategy._round_compressor = FloatK()
    assert strategy._max_uplink_nnz(D) == 2
    strategy._round_compressor = TopK(30)
    assert strategy._max_uplink_nnz(D) == D


def _exact_bench(n=3, tamper=None):
    from flwr.clientapp import ClientApp

    from fl_sparse.clients import SparseMod

    app = ClientApp(mods=[SparseMod()])

    @app.train()
    def train(msg: Message, context) -> Message:
        pid = int(context.node_config["partition-id"])
        arrays = msg.content["arrays"]
        out = ArrayRecord({"w": Array(arrays["w"].numpy() - 0.1 * (pid + 1)),
                           "scale": Array(arrays["scale"].numpy() + 0.5 * (pid + 1)),
                           "steps": Array(arrays["steps"].numpy() + (pid + 1))})
        return Message(RecordDict({"arrays": out, "metrics": MetricRecord({"num-examples": WEIGHTS[pid]})}),
                       reply_to=msg)

    folder = scratch_folder()
    grid = InProcessGrid(app, n, node_config=lambda i: {"state-dir": folder}, tamper=tamper)
    arrays = ArrayRecord({"w": Array(np.zeros(D, np.float32)), "scale": Array(np.array([1.0, 2.0], np.float32)),
                          "steps": Array(np.array([5], np.int64))})
    strategy = TopKSGD(k=K, exact_arrays=["scale"], min_available_nodes=n, min_train_nodes=n, fraction_evaluate=0.0)
    return strategy, grid, arrays


def test_exact_arrays_are_read_counted_and_checked(caplog):
    bad = {}

    def tamper(n, reply):
        if n in bad:
            reply.content[protocol.EXACT] = bad[n]
        return reply

    strategy, grid, arrays = _exact_bench(3, tamper)
    messages = list(strategy.configure_train(1, arrays, ConfigRecord(), grid))
    replies = list(grid.send_and_receive(messages))
    updates = strategy.read_replies(1, replies)
    for u, reply in zip(updates, replies):
        pid = (u.node - 1000) // 7
        np.testing.assert_allclose(u.exact["scale"].numpy(), np.array([1.0, 2.0]) + 0.5 * (pid + 1))
        np.testing.assert_array_equal(u.exact["steps"].numpy(), [5 + pid + 1])
        exact_bytes = sum(len(a.data) for a in reply.content[protocol.EXACT].values())
        assert exact_bytes == base._record_bytes(reply.content[protocol.EXACT]) > 0
        assert strategy.exact_bytes(reply.content, u.exact) == exact_bytes
        assert strategy.exact_bytes(reply.content, None) == 0
        assert u.total_bytes == codec.wire_size(reply.content[protocol.UPDATE]).total_bytes + exact_bytes

    # round 2: a NaN scale, a missing exact record, a wrong shape, an int array with any value (not checked)
    n0, n1, n2 = (node(p) for p in range(3))
    arrays, _ = strategy.aggregate_train(1, replies)
    bad.update({
        n0: ArrayRecord({"scale": Array(np.array([np.nan, 1.0], np.float32)), "steps": Array(np.array([1], np.int64))}),
        n1: None,
        n2: ArrayRecord({"scale": Array(np.array([1.0, 2.0, 3.0], np.float32)), "steps": Array(np.array([1], np.int64))}),
    })

    def tamper2(n, reply):
        if n == n1:
            del reply.content[protocol.EXACT]
        elif n in bad:
            reply.content[protocol.EXACT] = bad[n]
        return reply

    grid.tamper = tamper2
    messages = list(strategy.configure_train(2, arrays, ConfigRecord(), grid))
    with caplog.at_level(logging.WARNING, logger="flwr"):
        assert strategy.read_replies(2, list(grid.send_and_receive(messages))) == []
    lines = _warnings(caplog)
    assert lines[0] == f"round 2: rejected reply from client {n0}: exact array 'scale' is not finite"
    assert lines[1] == f"round 2: rejected reply from client {n1}: reply has no {protocol.EXACT!r} ArrayRecord"
    assert lines[2].startswith(f"round 2: rejected reply from client {n2}: ") and "scale" in lines[2]
    assert "ValueError" not in lines[2]  # a ProtocolError, not the layout's ValueError


def test_an_integer_exact_array_is_not_checked_for_finiteness():
    strategy, grid, arrays = _exact_bench(1)
    messages = list(strategy.configure_train(1, arrays, ConfigRecord(), grid))
    (reply,) = list(grid.send_and_receive(messages))
    reply.content[protocol.EXACT] = ArrayRecord({"scale": Array(np.array([1.5, -2.0], np.float32)),
                                                 "steps": Array(np.array([-(2**62)], np.int64))})
    exact = strategy._read_exact(reply.content)
    assert exact["steps"].numpy().tolist() == [-(2**62)] and exact["scale"].numpy().tolist() == [1.5, -2.0]
    reply.content[protocol.EXACT] = ArrayRecord({"scale": Array(np.array([1.0, np.inf], np.float32)),
                                                 "steps": Array(np.array([1], np.int64))})
    with pytest.raises(protocol.ProtocolError, match=r"^exact array 'scale' is not finite$"):
        strategy._read_exact(reply.content)


def test_without_exact_arrays_nothing_is_read():
    strategy = _topk(1)
    (reply,) = _replies(strategy, _grid(1))
    reply.content[protocol.EXACT] = ArrayRecord({"x": Array(np.array([np.nan], np.float32))})
    assert strategy._read_exact(reply.content) is None


# ====================================================================== aggregate_train
def test_aggregate_train_before_any_model_names_the_problem():
    with pytest.raises(RuntimeError, match=r"^aggregate_train before configure_train: no global model yet$"):
        _topk(1).aggregate_train(1, [])


def test_a_round_without_a_valid_reply_logs_once_and_records_empty_metrics(caplog):
    strategy = BidirectionalTopKSGD(k=K, min_available_nodes=2, min_train_nodes=2, fraction_evaluate=0.0)
    grid = _grid(2)
    _play(strategy, grid, 1)  # the server error is not zero now
    delta_norm = strategy.state.server_error.norm()
    assert delta_norm > 0
    before = strategy.state.model.clone()
    replies = _replies(strategy, grid, 2)
    for r in replies:
        _with_report(r, nonce="0" * 16)
    with caplog.at_level(logging.WARNING, logger="flwr"):
        assert strategy.aggregate_train(2, replies) == (None, None)
    assert _warnings(caplog)[-1] == "round 2: no valid update; global model unchanged"
    rm = strategy.state.round_metrics[2]
    assert rm["round"] == 2 and rm["accepted"] == 0 and rm["failures"] == 2
    assert rm["uplink_bytes"] == 0 and rm["downlink_update_bytes"] == 0 and rm["density"] == 0.0
    assert math.isnan(rm["train_loss"]) and math.isnan(rm["client_error_norm"])
    assert rm["server_error_norm"] == delta_norm
    assert rm["cumulative_total_error"] == strategy.state.cumulative_total_error > 0
    assert strategy.state.round == 2 and torch.equal(strategy.state.model, before)


def test_empty_round_metrics_are_exactly_these():
    strategy = _strategy_at()
    strategy.state.cumulative_total_error = 2.5
    strategy.state.server_error.load_state_dict({"numel": D, "error": torch.ones(D)})  # not used without a downlink
    rm = strategy._empty_round_metrics()
    assert set(rm) == {"train_loss", "uplink_bytes", "downlink_update_bytes", "density", "client_error_norm",
                       "server_error_norm", "cumulative_total_error"}
    assert math.isnan(rm["train_loss"]) and math.isnan(rm["client_error_norm"])
    assert (rm["uplink_bytes"], rm["downlink_update_bytes"], rm["density"], rm["server_error_norm"],
            rm["cumulative_total_error"]) == (0, 0, 0.0, 0.0, 2.5)
    assert type(rm["uplink_bytes"]) is int and type(rm["density"]) is float
    # with a downlink compressor, the server error's norm (here set by hand)
    bi = BidirectionalTopKSGD(k=2, fraction_evaluate=0.0)
    bi.initialize(ArrayRecord({"w": Array(np.zeros(D, np.float32))}))
    err = torch.zeros(D)
    err[[1, 5]] = torch.tensor([3.0, 4.0])
    bi.state.server_error.load_state_dict({"numel": D, "error": err})
    assert bi._empty_round_metrics()["server_error_norm"] == pytest.approx(5.0)


def test_a_rejected_round_restores_the_server_error_and_forgets_the_accepted_rounds(caplog):
    """Bidirectional: round 1 leaves δ ≠ 0; round 2's aggregate cannot be sent in fp16 and is rejected;
    δ, the model and the clients' accepted rounds stay as after round 1."""
    size = {"step": 0.5}

    def step(pid, rnd):
        return np.full((4, 6), size["step"] * (pid + 1), np.float32) + _step(pid, rnd) * 0.1

    folder = scratch_folder()
    grid = InProcessGrid(step_app(step, WEIGHTS.__getitem__), 2, node_config=lambda i: {"state-dir": folder})
    strategy = BidirectionalTopKSGD(k=K, downlink_values="fp16", min_available_nodes=2, min_train_nodes=2,
                                    fraction_evaluate=0.0)
    _play(strategy, grid, 1)
    st = strategy.state
    delta = st.server_error.state_dict()["error"].clone()
    assert float(delta.abs().sum()) > 0
    model, accepted = st.model.clone(), dict(st.accepted)
    size["step"] = 1e6
    with caplog.at_level(logging.WARNING, logger="flwr"):
        replies, result = _play(strategy, grid, 2)
    assert result == (None, None)
    assert _warnings(caplog) == ["round 2: the aggregate is not finite (or not representable in the downlink value "
                                 "code fp16); round rejected, global model unchanged"]
    assert torch.equal(st.server_error.state_dict()["error"], delta)
    assert torch.equal(st.model, model) and accepted == {node(0): 1, node(1): 1}
    assert st.accepted == {}  # round 2's acceptance is taken back: the clients put their updates back
    rm = st.round_metrics[2]
    assert rm["accepted"] == 0 and rm["rejected_round"] == 1 and rm["uplink_bytes"] == 0
    assert math.isnan(rm["client_error_norm"]) and rm["round"] == 2


def test_a_rejected_first_round_leaves_no_server_error(caplog):
    folder = scratch_folder()
    grid = InProcessGrid(step_app(lambda pid, rnd: np.full((4, 6), 1e6, np.float32), WEIGHTS.__getitem__), 2,
                         node_config=lambda i: {"state-dir": folder})
    strategy = BidirectionalTopKSGD(k=K, downlink_values="fp16", min_available_nodes=2, min_train_nodes=2,
                                    fraction_evaluate=0.0)
    _, result = _play(strategy, grid, 1)
    assert result == (None, None)
    assert strategy.state.server_error.state_dict()["error"] is None
    assert strategy.state.accepted == {}


def test_aggregate_train_returns_the_weighted_average_model_and_metrics_over_rounds():
    """Three rounds, partial participation (3 of 4 sampled), unequal weights: the model against a numpy
    replay of top-K with error feedback; the returned metrics are the round's own numbers."""
    strategy = TopKSGD(k=K, fraction_train=0.75, min_available_nodes=4, min_train_nodes=1, fraction_evaluate=0.0)
    grid = _grid(4, metrics=lambda pid: {"train-loss": LOSSES[pid]})
    w = _model()["w"].numpy().ravel().astype(np.float64)
    error = {p: np.zeros(D) for p in range(4)}
    arrays = _model()
    for rnd in (1, 2, 3):
        messages = list(strategy.configure_train(rnd, arrays, ConfigRecord(), grid))
        sampled = sorted((m.metadata.dst_node_id - 1000) // 7 for m in messages)
        assert len(sampled) == 3
        replies = list(grid.send_and_receive(messages, timeout=60))
        arrays, metrics = strategy.aggregate_train(rnd, replies)
        total = sum(WEIGHTS[p] for p in sampled)
        g = np.zeros(D)
        for p in sampled:
            a = error[p] + _step(p, rnd).ravel().astype(np.float64)
            sent = topk_np(a, K)
            error[p] = a - sent
            g += WEIGHTS[p] / total * sent
        w = w - g
        np.testing.assert_allclose(arrays["w"].numpy().ravel(), w, rtol=1e-5, atol=1e-6)
        assert strategy._returned is arrays
        rm = strategy.state.round_metrics[rnd]
        assert rm["accepted"] == 3 and rm["round"] == rnd and strategy.state.round == rnd
        assert metrics["train-loss"] == pytest.approx(sum(WEIGHTS[p] * LOSSES[p] for p in sampled) / total)
        assert metrics["train_loss"] == pytest.approx(sum(WEIGHTS[p] * LOSSES[p] for p in sampled) / total)
        assert metrics["num_examples"] == int(total)
        assert metrics["accepted"] == 3 and metrics["uplink_bytes"] == rm["uplink_bytes"]
        assert metrics["aggregate_density"] == pytest.approx(np.count_nonzero(g) / D)
        assert "sync_modes" not in metrics and "round" in metrics


def test_rho_is_computed_only_when_every_reply_has_diagnostics():
    strategy = _topk(3, diagnostics=True)
    grid = _grid(3)

    def tamper(n, reply):
        if n == node(1):
            del reply.content[protocol.DIAGNOSTICS]
        return reply

    _play(strategy, grid, 1)
    assert "rho_hat" in strategy.state.round_metrics[1] and "rho" not in strategy.state.round_metrics[1]
    grid.tamper = tamper
    _play(strategy, grid, 2)
    assert strategy.state.round_metrics[2]["accepted"] == 3
    assert "rho_hat" not in strategy.state.round_metrics[2]


def test_bidirectional_rho_and_rho_hat_against_numpy_over_two_rounds():
    """ρ = ‖Top_K(δ + Σ p a) − Top_K(δ + g)‖ / ‖Σ p step‖ with δ the server error before the round
    (0 in round 1), ρ̂ = ‖Top_K(Σ p a) − g‖ / ‖Σ p step‖."""
    kd = 6  # the downlink's K, not the uplink's: ρ and ρ̂ use the downlink compressor
    strategy = BidirectionalTopKSGD(k=K, downlink_k=kd, min_available_nodes=3, min_train_nodes=3,
                                    fraction_evaluate=0.0, diagnostics=True)
    grid = _grid(3)
    for rnd in (1, 2):
        delta = strategy.state.server_error.state_dict()["error"]
        delta = np.zeros(D) if delta is None else delta.double().numpy()
        replies = _replies(strategy, grid, rnd)
        updates = strategy.read_replies(rnd, list(replies))
        total = sum(u.weight for u in updates)
        a = sum(u.weight / total * u.diagnostics["a"].numpy().ravel().astype(np.float64) for u in updates)
        step = sum(u.weight / total * u.diagnostics["step"].numpy().ravel().astype(np.float64) for u in updates)
        g = sum(u.weight / total * u.update.to_dense().double().numpy() for u in updates)
        strategy.state.accepted.clear()
        strategy.state.client_versions.clear()
        strategy.aggregate_train(rnd, replies)  # reads the same replies again
        rm = strategy.state.round_metrics[rnd]
        assert rm["accepted"] == 3
        norm = np.linalg.norm(step)
        assert rm["rho_hat"] == pytest.approx(np.linalg.norm(topk_np(a, kd) - g) / norm, rel=1e-4)
        assert rm["rho"] == pytest.approx(np.linalg.norm(topk_np(delta + a, kd) - topk_np(delta + g, kd)) / norm,
                                          rel=1e-4)
        assert rm["rho_hat"] != pytest.approx(np.linalg.norm(topk_np(a, K) - g) / norm, rel=1e-3)
        if rnd == 2:
            assert np.abs(delta).sum() > 0


def test_rho_estimates_ignore_bad_or_zero_diagnostics(caplog):
    strategy = _strategy_at()
    p = [0.25, 0.75]
    agg = SparseTensor(torch.tensor([0]), torch.tensor([1.0]), D)
    good = ArrayRecord({"a": Array(np.ones(D, np.float32)), "step": Array(np.ones(D, np.float32))})
    with caplog.at_level(logging.WARNING, logger="flwr"):
        assert strategy._rho_estimates([good, ArrayRecord({"a": Array(np.ones(D, np.float32))})], p, None, agg) == {}
        assert strategy._rho_estimates([good, ArrayRecord({"a": Array(np.ones(3, np.float32)),
                                                           "step": Array(np.ones(D, np.float32))})], p, None, agg) == {}
    assert _warnings(caplog) == ["diagnostics ignored: no 'step'", f"diagnostics ignored: 'a' has 3 entries, expected {D}"]
    zero = ArrayRecord({"a": Array(np.ones(D, np.float32)), "step": Array(np.zeros(D, np.float32))})
    assert strategy._rho_estimates([zero, zero], p, None, agg) == {}
    inf = ArrayRecord({"a": Array(np.ones(D, np.float32)), "step": Array(np.full(D, np.inf, np.float32))})
    assert strategy._rho_estimates([inf, good], p, None, agg) == {}
    # a 2-d array is read flat, float64 as float32
    flat = ArrayRecord({"a": Array(np.ones((4, 6), np.float64)), "step": Array(np.full((4, 6), 2.0, np.float32))})
    out = strategy._rho_estimates([flat, good], p, None, agg)
    # the uplink spec's top-2 of Σ p a = ones: entries 0 and 1; g = e_0
    step_norm = np.linalg.norm(0.25 * np.full(D, 2.0) + 0.75 * np.ones(D))
    assert out == {"rho_hat": pytest.approx(1.0 / step_norm)}


def test_dense_names_the_missing_key_and_the_wrong_size():
    record = ArrayRecord({"a": Array(np.arange(6, dtype=np.float64).reshape(2, 3))})
    x = base._dense(record, "a", 6)
    assert x.dtype == torch.float32 and x.tolist() == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]
    with pytest.raises(ValueError, match=r"^no 'b'$"):
        base._dense(record, "b", 6)
    with pytest.raises(ValueError, match=r"^'a' has 6 entries, expected 7$"):
        base._dense(record, "a", 7)


# ====================================================================== round_metrics
def test_round_metrics_are_exact_for_hand_made_updates():
    strategy = _strategy_at()
    strategy._local_steps = 3
    strategy._round_started = time.perf_counter()
    strategy.state.cumulative_total_error = 1.0
    # a server error left in the state (no downlink compressor uses it): not reported
    strategy.state.server_error.load_state_dict({"numel": D, "error": torch.ones(D)})
    updates = [
        _update(1, 2.0, metrics={"train_loss": 1.0}, uplink=UplinkMetrics(10, 0.25, 3.0, 4.0), pos=40, val=64, nbytes=100),
        _update(2, 6.0, metrics={"train-loss": 5.0}, uplink=UplinkMetrics(10, 0.5, 1e200, 1e305), pos=80, val=128,
                nbytes=250),
    ]
    p = [0.25, 0.75]
    agg = SparseTensor(torch.tensor([0, 3, 7]), torch.tensor([1.0, 2.0, 3.0]), D)
    record = codec.encode(agg, values="fp32", positions="raw")
    down = codec.wire_size(record)
    rm = strategy.round_metrics(1, updates, p, agg, record)
    d_h = D * 3
    assert rm["uplink_bytes"] == 350
    assert rm["downlink_update_bytes"] == down.total_bytes
    assert rm["density"] == pytest.approx(0.375)
    assert rm["aggregate_density"] == pytest.approx(3 / D)
    assert rm["client_error_norm"] == pytest.approx(math.sqrt(0.25 * 9.0 + 0.75 * 1e300))
    assert rm["server_error_norm"] == 0.0
    assert rm["cumulative_total_error"] == pytest.approx(1.0 + 0.25 * 4.0 + 0.75 * 1e300)
    assert strategy.state.cumulative_total_error == rm["cumulative_total_error"]
    assert rm["q_loc_up"] == pytest.approx(60 / d_h) and rm["q_val_up"] == pytest.approx(96 / d_h)
    assert rm["q_loc_down"] == pytest.approx(down.position_bits / d_h)
    assert rm["q_val_down"] == pytest.approx(down.value_bits / d_h) and down.value_bits == 96
    assert rm["num_examples"] == 8 and type(rm["num_examples"]) is int
    assert rm["train_loss"] == pytest.approx(0.25 * 1.0 + 0.75 * 5.0)
    assert 0 <= rm["round_seconds"] < 3600  # since the round started, not the clock's origin
    assert set(rm) == {"uplink_bytes", "downlink_update_bytes", "density", "aggregate_density", "client_error_norm",
                       "server_error_norm", "cumulative_total_error", "q_loc_up", "q_val_up", "q_loc_down",
                       "q_val_down", "num_examples", "train_loss", "round_seconds"}
    # the client's numbers are capped: 1e200² would be inf, 1e305 · 0.75 summed twice too
    assert math.isfinite(rm["client_error_norm"])
    rm2 = strategy.round_metrics(2, updates, p, agg, record)
    assert rm2["cumulative_total_error"] == pytest.approx(1.0 + 2 * (1.0 + 0.75 * 1e300))
    # weights by another key: no num_examples
    other = SparseFedAvg(weighted_by_key="samples", fraction_evaluate=0.0)
    other.initialize(ArrayRecord({"w": Array(np.zeros(D, np.float32))}))
    assert other.round_metrics(1, updates, p, agg, record)["num_examples"] is None


def test_round_metrics_server_error_norm_with_a_downlink_compressor():
    bi = BidirectionalTopKSGD(k=2, fraction_evaluate=0.0)
    bi.initialize(ArrayRecord({"w": Array(np.zeros(D, np.float32))}))
    err = torch.zeros(D)
    err[[1, 5]] = torch.tensor([6.0, 8.0])
    bi.state.server_error.load_state_dict({"numel": D, "error": err})
    agg = SparseTensor(torch.tensor([0]), torch.tensor([1.0]), D)
    record = codec.encode(agg, values="fp32", positions="raw")
    rm = bi.round_metrics(1, [_update(1, 1.0)], [1.0], agg, record)
    assert rm["server_error_norm"] == pytest.approx(10.0)


@pytest.mark.parametrize("value, steps", [(3, 3), (3.0, 3), ("4", 1), ("auto", 1), (2.5, 1), (0, 1), (-2, 1),
                                          (float("inf"), 1), (float("nan"), 1), (True, 1), (None, 1), (1, 1)])
def test_local_steps_reads_a_whole_number_or_falls_back_to_one(value, steps):
    assert base._local_steps(value) == steps


# ====================================================================== _weighted_metric / train_metrics
def test_weighted_metric_takes_the_first_finite_number_under_the_keys():
    keys = ("train-loss", "train_loss")
    updates = [
        _update(1, 1.0, metrics={"train-loss": 2.0, "train_loss": 100.0}),  # the first key wins
        _update(2, 1.0, metrics={"train-loss": float("nan"), "train_loss": 4.0}),  # NaN skipped: the second
        _update(3, 1.0, metrics={"train-loss": [1.0]}),  # no number: not counted
        _update(4, 1.0),  # no metrics
        _update(5, 1.0, metrics={"train_loss": 8.0}),
    ]
    p = [0.1, 0.2, 0.3, 0.15, 0.25]
    expected = (0.1 * 2.0 + 0.2 * 4.0 + 0.25 * 8.0) / (0.1 + 0.2 + 0.25)
    assert base._weighted_metric(updates, p, keys) == pytest.approx(expected)
    assert math.isnan(base._weighted_metric(updates[2:4], p[2:4], keys))
    assert math.isnan(base._weighted_metric([], [], keys))
    # two metric records: the first that holds one counts
    two = _update(6, 1.0)
    two.user_content = RecordDict({"a": MetricRecord({"other": 1.0}), "b": MetricRecord({"train_loss": 3.0}),
                                   "c": MetricRecord({"train-loss": 9.0})})
    assert base._weighted_metric([two], [0.5], keys) == 3.0
    inf = _update(7, 1.0, metrics={"train_loss": float("inf")})
    assert base._weighted_metric([inf, updates[0]], [0.5, 0.5], keys) == 2.0


def test_train_metrics_merges_the_users_aggregate_and_the_rounds_numbers(caplog):
    strategy = _strategy_at()
    strategy.state.round_metrics[3] = {"round": 3, "uplink_bytes": 10, "density": 0.5, "sync_modes": {"dense": 2},
                                       "flag": True, "train_loss": 7.0, "name": "x", "accepted": 2}
    updates = [_update(1, 1.0, metrics={"num-examples": 1, "train_loss": 1.0}),
               _update(2, 3.0, metrics={"num-examples": 3, "train_loss": 5.0})]
    merged = strategy.train_metrics(3, updates)
    assert dict(merged) == {"train_loss": pytest.approx(4.0), "round": 3, "uplink_bytes": 10,
                            "density": 0.5, "accepted": 2}

    def raising(contents, key):
        raise ValueError("lists of different lengths")

    strategy.train_metrics_aggr_fn = raising
    with caplog.at_level(logging.WARNING, logger="flwr"):
        merged = strategy.train_metrics(3, updates)
    assert _warnings(caplog) == ["round 3: client metrics not aggregated: ValueError: lists of different lengths"]
    assert dict(merged) == {"round": 3, "uplink_bytes": 10, "density": 0.5, "train_loss": 7.0, "accepted": 2}
    strategy.train_metrics_aggr_fn = lambda contents, key: None
    assert dict(strategy.train_metrics(3, updates)) == dict(merged)
    got = {}

    def recording(contents, key):
        got["key"], got["contents"] = key, contents
        return MetricRecord({"mine": 1.5})

    strategy.train_metrics_aggr_fn = recording
    assert strategy.train_metrics(3, updates)["mine"] == 1.5
    assert got["key"] == "num-examples" and [c is u.user_content for c, u in zip(got["contents"], updates)] == [True] * 2


def test_weighed_content_is_the_clients_own_unless_the_weight_was_capped():
    strategy = _strategy_at()
    u = _update(1, 4.0, metrics={"num-examples": 4, "acc": 0.5})
    assert strategy._weighed_content(u) is u.user_content
    no_weight = _update(2, 4.0, metrics={"acc": 0.5})
    assert strategy._weighed_content(no_weight) is no_weight.user_content
    capped = _update(3, 2.5)
    capped.user_content = RecordDict({"cfg": ConfigRecord({"x": 1}), "other": MetricRecord({"acc": 1.0}),
                                      "metrics": MetricRecord({"num-examples": 9, "acc": 0.5})})
    out = strategy._weighed_content(capped)
    assert out is not capped.user_content
    assert dict(out["metrics"]) == {"num-examples": 2.5, "acc": 0.5}
    assert dict(out["other"]) == {"acc": 1.0} and dict(out["cfg"]) == {"x": 1}
    assert list(out.keys()) == ["cfg", "other", "metrics"]
    assert capped.user_content["metrics"]["num-examples"] == 9


def test_non_finite_aggregated_metrics_name_the_clients_that_sent_them(caplog):
    updates = [_update(1, 1.0, metrics={"loss": float("nan"), "acc": 1.0}),
               _update(2, 1.0, metrics={"loss": 1.0, "acc": float("inf")}),
               _update(3, 1.0, metrics={"loss": 2.0, "acc": 1.0})]
    with caplog.at_level(logging.WARNING, logger="flwr"):
        base._warn_non_finite_metrics(4, MetricRecord({"loss": float("nan"), "acc": float("inf"), "ok": 1.0}), updates)
        base._warn_non_finite_metrics(4, MetricRecord({"loss": 1.0}), updates)
        base._warn_non_finite_metrics(5, MetricRecord({"big": float("inf")}), updates)
    assert _warnings(caplog) == [
        "round 4: the clients' 'loss', 'acc' aggregated to a non-finite value; reported by node(s) 1, 2",
        "round 5: the clients' 'big' aggregated to a non-finite value; reported by node(s) none (the aggregation)",
    ]


def test_non_finite_metric_warnings_are_bounded(caplog):
    names = [f"m{i}" for i in range(7)]
    updates = [_update(n, 1.0, metrics={name: float("nan") for name in names}) for n in range(12, 0, -1)]
    with caplog.at_level(logging.WARNING, logger="flwr"):
        base._warn_non_finite_metrics(1, MetricRecord({name: float("nan") for name in names}), updates)
    assert _warnings(caplog) == [
        "round 1: the clients' 'm0', 'm1', 'm2', 'm3', 'm4' aggregated to a non-finite value; "
        "reported by node(s) 1, 2, 3, 4, 5, 6, 7, 8, 9, 10"]


def test_a_client_metric_that_makes_the_aggregate_nan_is_named_in_the_round(caplog):
    strategy = _topk(3)
    grid = _grid(3, metrics=lambda pid: {"loss": float("nan") if pid == 2 else 1.0})
    with caplog.at_level(logging.WARNING, logger="flwr"):
        _, (arrays, metrics) = _play(strategy, grid, 1)
    assert arrays is not None and math.isnan(metrics["loss"])
    assert _warnings(caplog) == [
        f"round 1: the clients' 'loss' aggregated to a non-finite value; reported by node(s) {node(2)}"]


# ====================================================================== aggregate_evaluate
def _eval_reply(node_id: int, content: RecordDict | None = None, error: Error | None = None) -> Message:
    inbound = Message(content=RecordDict(), metadata=_metadata(7, node_id, "evaluate"))
    if error is not None:
        return Message(error, reply_to=inbound)
    return Message(content, reply_to=inbound)


def _metrics(**values) -> RecordDict:
    return RecordDict({"metrics": MetricRecord(values)})


def test_evaluate_replies_aggregate_weighted_and_bad_ones_are_named(caplog):
    strategy = _strategy_at()
    replies = [
        _eval_reply(1, _metrics(**{"num-examples": 1, "acc": 0.2})),
        _eval_reply(2, _metrics(**{"num-examples": 3, "acc": 0.6})),
        _eval_reply(3, RecordDict({"metrics": MetricRecord({"num-examples": 1, "acc": 0.1}),
                                   "more": MetricRecord({"num-examples": 1})})),
        _eval_reply(4, _metrics(acc=0.9)),
        _eval_reply(5, _metrics(**{"num-examples": -1, "acc": 0.9})),
        _eval_reply(7, _metrics(**{"num-examples": float(2**53) * 2, "acc": 0.9})),
        _eval_reply(8, error=Error(code=0, reason="x")),
        _eval_reply(9, _metrics(**{"num-examples": 0, "acc": 0.9})),  # 0 is allowed, counts for nothing
        _eval_reply(10, RecordDict({"cfg": ConfigRecord({"a": 1})})),
        _eval_reply(11, _metrics(**{"num-examples": float(2**53), "acc": 0.0})),
    ]
    with caplog.at_level(logging.WARNING, logger="flwr"):
        result = strategy.aggregate_evaluate(5, replies)
    expected = (1 * 0.2 + 3 * 0.6 + 2**53 * 0.0) / (1 + 3 + 2**53)
    assert dict(result) == {"acc": pytest.approx(expected), "num-examples": pytest.approx(4 + 2**53)} or \
        dict(result) == {"acc": pytest.approx(expected)}
    one = "an evaluate reply must carry exactly one MetricRecord"
    weight = "weight 'num-examples' must be a number in [0, 2**53], got "
    assert _warnings(caplog) == [
        f"round 5: rejected evaluate reply from client 3: {one}",
        f"round 5: rejected evaluate reply from client 4: {weight}None",
        f"round 5: rejected evaluate reply from client 5: {weight}-1",
        f"round 5: rejected evaluate reply from client 7: {weight}{float(2**54)!r}",
        f"round 5: rejected evaluate reply from client 10: {one}",
    ]


def test_evaluate_keeps_the_most_common_metric_shape(caplog):
    strategy = SparseFedAvg(fraction_evaluate=1.0)
    replies = [
        _eval_reply(1, _metrics(**{"num-examples": 2, "acc": 0.5, "loss": [1.0, 2.0]})),
        _eval_reply(2, _metrics(**{"num-examples": 1, "acc": 1.0})),
        _eval_reply(3, _metrics(**{"num-examples": 2, "acc": 0.25, "loss": [3.0, 4.0]})),
        _eval_reply(4, _metrics(**{"num-examples": 4, "acc": 0.0, "loss": [1.0]})),
        _eval_reply(5, RecordDict({"other": MetricRecord({"num-examples": 2, "acc": 0.5, "loss": [1.0, 2.0]})})),
        _eval_reply(6, error=Error(code=0, reason="gone")),
    ]
    with caplog.at_level(logging.INFO, logger="flwr"):
        result = strategy.aggregate_evaluate(2, replies)
    assert dict(result) == {"acc": pytest.approx(0.375), "loss": pytest.approx([2.0, 3.0])}
    # the error reply is passed on to FedAvg, which counts (and logs) it
    assert "aggregate_evaluate: Received 2 results and 1 failures" in [r.getMessage() for r in caplog.records]
    common = "'metrics': acc, loss[2], num-examples"
    assert _warnings(caplog) == [
        f"round 2: rejected evaluate reply from client 2: its metrics 'metrics': acc, num-examples differ from "
        f"the other clients' {common}",
        f"round 2: rejected evaluate reply from client 4: its metrics 'metrics': acc, loss[1], num-examples differ "
        f"from the other clients' {common}",
        f"round 2: rejected evaluate reply from client 5: its metrics 'other': acc, loss[2], num-examples differ "
        f"from the other clients' {common}",
    ]


def test_evaluate_ties_keep_the_first_shape_seen(caplog):
    strategy = SparseFedAvg(fraction_evaluate=1.0)
    replies = [_eval_reply(1, _metrics(**{"num-examples": 1, "b": 1.0})),
               _eval_reply(2, _metrics(**{"num-examples": 1, "a": 3.0}))]
    with caplog.at_level(logging.WARNING, logger="flwr"):
        assert dict(strategy.aggregate_evaluate(1, replies)) == {"b": 1.0}
    assert _warnings(caplog) == ["round 1: rejected evaluate reply from client 2: its metrics 'metrics': a, "
                                 "num-examples differ from the other clients' 'metrics': b, num-examples"]


def test_evaluate_with_only_errors_or_nothing_is_none(caplog):
    strategy = SparseFedAvg(fraction_evaluate=1.0)
    assert strategy.aggregate_evaluate(1, []) is None
    with caplog.at_level(logging.WARNING, logger="flwr"):
        assert strategy.aggregate_evaluate(1, [_eval_reply(1, error=Error(code=0, reason="x"))]) is None
    assert _warnings(caplog) == []


def test_evaluate_metrics_that_fail_to_aggregate_are_logged_not_raised(caplog):
    def raising(contents, key):
        raise ZeroDivisionError("all weights are 0")

    strategy = SparseFedAvg(fraction_evaluate=1.0, evaluate_metrics_aggr_fn=raising)
    with caplog.at_level(logging.WARNING, logger="flwr"):
        assert strategy.aggregate_evaluate(3, [_eval_reply(1, _metrics(**{"num-examples": 0, "acc": 1.0}))]) is None
    assert _warnings(caplog) == ["round 3: evaluate metrics not aggregated: ZeroDivisionError: all weights are 0"]


def test_evaluate_reads_the_weight_under_the_strategys_key(caplog):
    strategy = SparseFedAvg(fraction_evaluate=1.0, weighted_by_key="n")
    replies = [_eval_reply(1, _metrics(n=1, acc=1.0)), _eval_reply(2, _metrics(n=3, acc=0.0)),
               _eval_reply(3, _metrics(**{"num-examples": 3, "acc": 0.0}))]
    with caplog.at_level(logging.WARNING, logger="flwr"):
        result = strategy.aggregate_evaluate(1, replies)
    assert dict(result) == {"acc": pytest.approx(0.25)}
    assert _warnings(caplog) == ["round 1: rejected evaluate reply from client 3: weight 'n' must be a number in "
                                 "[0, 2**53], got None"]


def test_metric_names_lists_the_record_and_its_metrics_sorted():
    shape = ("m", frozenset({("z", None), ("a", 3), ("k", None), ("q", None), ("b", 1), ("y", None), ("c", None),
                             ("x", 2)}))
    assert base._metric_names(shape) == "'m': a[3], b[1], c, k, q, x[2], y, z"
    assert base._metric_names(("x", frozenset())) == "'x': "


# ====================================================================== the layered position code
def test_an_update_in_the_segmented_position_code_is_decoded_with_the_layouts_segments():
    """uplink_positions="rice" lets a client send the layer-aware (segmented) code when it is shorter;
    the server decodes it with the segments of the layout both sides hold."""
    from flwr.clientapp import ClientApp

    from fl_sparse.clients import SparseMod

    sizes = {"a": 200, "b": 8, "c": 200}
    app = ClientApp(mods=[SparseMod()])

    @app.train()
    def train(msg: Message, context) -> Message:
        arrays = msg.content["arrays"]
        out = {}
        for name in sizes:
            step = np.zeros(sizes[name], np.float32)
            if name == "c":  # every entry sent is in the last layer: the segmented code is shorter
                step[::10] = np.arange(1, 21, dtype=np.float32)
            out[name] = Array(arrays[name].numpy() - step)
        return Message(RecordDict({"arrays": ArrayRecord(out), "metrics": MetricRecord({"num-examples": 2})}),
                       reply_to=msg)

    folder = scratch_folder()
    grid = InProcessGrid(app, 1, node_config=lambda i: {"state-dir": folder})
    strategy = TopKSGD(k=20, uplink_positions="rice", min_available_nodes=1, min_train_nodes=1,
                       fraction_evaluate=0.0)
    arrays = ArrayRecord({name: Array(np.zeros(n, np.float32)) for name, n in sizes.items()})
    messages = list(strategy.configure_train(1, arrays, ConfigRecord(), grid))
    (reply,) = list(grid.send_and_receive(messages))
    record = reply.content[protocol.UPDATE]
    with pytest.raises(codec.PayloadError):  # the segmented code: not decodable without the segments
        codec.decode(record, 408)
    (u,) = strategy.read_replies(1, [reply])
    expected = np.zeros(408)
    expected[208::10] = np.arange(1, 21)
    np.testing.assert_array_equal(u.update.to_dense().numpy(), expected)


# ====================================================================== the hooks' arguments
class _Hooks(TopKSGD):
    """Records which round (and which weights) each hook of aggregate_train was handed."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.calls: list[tuple] = []

    def bound_influence(self, server_round, updates):
        self.calls.append(("bound_influence", server_round, [u.node for u in updates]))
        return super().bound_influence(server_round, updates)

    def aggregate_updates(self, server_round, updates, weights):
        self.calls.append(("aggregate_updates", server_round, list(weights)))
        return super().aggregate_updates(server_round, updates, weights)

    def compress_downlink(self, server_round, aggregate):
        self.calls.append(("compress_downlink", server_round, aggregate.nnz))
        return super().compress_downlink(server_round, aggregate)

    def round_metrics(self, server_round, updates, p, aggregate, record):
        self.calls.append(("round_metrics", server_round, list(p)))
        return super().round_metrics(server_round, updates, p, aggregate, record)

    def train_metrics(self, server_round, updates):
        self.calls.append(("train_metrics", server_round, len(updates)))
        return super().train_metrics(server_round, updates)


def test_every_hook_of_aggregate_train_gets_the_round_and_the_normalised_weights():
    strategy = _Hooks(k=K, min_available_nodes=3, min_train_nodes=3, fraction_evaluate=0.0)
    grid = _grid(3)
    _play(strategy, grid, 1)
    strategy.calls.clear()
    replies, (arrays, metrics) = _play(strategy, grid, 2)
    p = [WEIGHTS[0] / 10, WEIGHTS[1] / 10, WEIGHTS[2] / 10]
    names = [c[0] for c in strategy.calls]
    assert names == ["bound_influence", "aggregate_updates", "compress_downlink", "round_metrics", "train_metrics"]
    assert all(c[1] == 2 for c in strategy.calls)
    assert strategy.calls[0][2] == [node(0), node(1), node(2)]
    assert strategy.calls[1][2] == pytest.approx(p, abs=0) and strategy.calls[3][2] == strategy.calls[1][2]
    assert strategy.calls[4][2] == 3
    assert set(strategy.state.round_metrics) == {1, 2}  # nothing filed under another round
    assert strategy.state.round_metrics[2]["clipped"] == 0 and metrics["clipped"] == 0
    assert strategy.state.version == 2 and strategy.state.round == 2


def test_a_lost_first_reply_is_forgotten_without_error_and_a_learnt_key_is_kept():
    """A node asked for the first time whose reply is lost: nothing to forget, nothing raised."""
    grid = _grid(3, tamper=lambda n, reply: None if n == node(1) else reply)
    strategy = _topk(3)
    _, (arrays, _) = _play(strategy, grid, 1)
    assert arrays is not None
    st = strategy.state
    assert st.client_versions == {node(0): 0, node(2): 0} and st.accepted == {node(0): 1, node(2): 1}
    assert st.round_metrics[1]["accepted"] == 2 and st.round_metrics[1]["failures"] == 0


def test_read_report_learns_the_replying_nodes_key():
    strategy = _topk(2)
    r0, r1 = _replies(strategy, _grid(2))
    strategy.node_keys.pop(node(1), None)
    assert node(1) not in strategy.node_keys
    strategy.read_report(1, node(1), r1, set())
    assert strategy.node_keys[node(1)] == (1, node(1)) and None not in strategy.node_keys


def test_every_failed_reply_counts(caplog):
    def step(pid, rnd):
        raise ValueError(f"no data on partition {pid}")

    folder = scratch_folder()
    grid = InProcessGrid(step_app(step, WEIGHTS.__getitem__), 3, node_config=lambda i: {"state-dir": folder})
    strategy = _topk(3)
    with caplog.at_level(logging.WARNING, logger="flwr"):
        assert _play(strategy, grid, 1)[1] == (None, None)
    assert strategy.state.round_metrics[1]["failures"] == 3 and strategy.state.round_metrics[1]["accepted"] == 0
    assert _warnings(caplog) == [f"round 1: client {node(p)} failed: ValueError: no data on partition {p}"
                                 for p in range(3)] + ["round 1: no valid update; global model unchanged"]
    assert strategy.first_error == f"round 1: client {node(0)} failed: ValueError: no data on partition 0"


def test_read_replies_files_the_rounds_row_itself():
    """read_replies called for a round configure_train did not file (a subclass's own round, a test)."""
    strategy = _topk(2)
    replies = _replies(strategy, _grid(2))
    strategy.state.round_metrics.clear()
    assert len(strategy.read_replies(1, replies)) == 2
    assert strategy.state.round_metrics == {1: {"round": 1, "failures": 0, "clipped": 0}}
