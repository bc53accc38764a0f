"""A user's own app with Flower's other pieces and unusual models (README, "With Flower's other pieces").

Each case is one a Flower user meets outside the built-in experiments: Flower's own client mods
in front of SparseMod, a train function that returns its model under another key, a train config
the strategy does not know, a ClientApp that lacks the mod, arrays fl-sparse cannot average
exactly, and a model changed between rounds by someone else.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.mod import message_size_mod
from inprocess import InProcessGrid

from fl_sparse import protocol
from fl_sparse.clients import SparseMod
from fl_sparse.compressors import adaptive_k_t_hat
from fl_sparse.strategies import AdaptiveTopKSGD, BidirectionalTopKSGD, TopKSGD

SHAPE = (40,)


def _step(pid: int, server_round: int) -> np.ndarray:
    return np.random.default_rng(10 * pid + server_round).standard_normal(SHAPE).astype(np.float32)


def _app(mods, *, key: str = "arrays", metrics=lambda pid: {}) -> ClientApp:
    """A train function subtracting a known step from ``w``, returning the model under ``key``."""
    app = ClientApp(mods=mods)

    @app.train()
    def train(msg: Message, context) -> Message:
        pid = int(context.node_config["partition-id"])
        t = int(msg.content["config"]["server-round"])
        w = msg.content["arrays"]["w"].numpy()
        return Message(RecordDict({key: ArrayRecord({"w": Array(w - _step(pid, t))}),
                                   "metrics": MetricRecord({"num-examples": 1 + pid, **metrics(pid)})}), reply_to=msg)

    return app


def _w0() -> ArrayRecord:
    return ArrayRecord({"w": Array(np.linspace(-1, 1, SHAPE[0]).astype(np.float32))})


def _start(strategy, app, tmp_path, *, rounds=3, clients=3, config=None, tamper=None):
    grid = InProcessGrid(app, clients, node_config=lambda i: {"state-dir": str(tmp_path)}, tamper=tamper)
    result = strategy.start(grid=grid, initial_arrays=_w0(), num_rounds=rounds,
                            train_config=ConfigRecord(config if config is not None else {}))
    return result, grid


def _dense_mean_run(rounds: int, clients: int) -> np.ndarray:
    """What the model becomes when every client's whole step is averaged (ratio 1 top-K = FedAvg)."""
    w = _w0()["w"].numpy().astype(np.float64)
    weights = [1 + q for q in range(clients)]
    for t in range(1, rounds + 1):
        w = w - sum(p * _step(q, t) for q, p in enumerate(weights)) / sum(weights)
    return w


def test_flowers_message_size_mod_in_front_of_sparse_mod_keeps_every_reply(tmp_path):
    """message_size_mod counts the reply's bytes; Flower's count_bytes() refuses an empty string,
    and the client's report used to carry one (its unused vote-kind): every reply was dropped."""
    strategy = TopKSGD(ratio=1.0, fraction_evaluate=0.0, min_available_nodes=3, min_train_nodes=3)
    result, _ = _start(strategy, _app([message_size_mod, SparseMod()]), tmp_path)
    assert [result.train_metrics_clientapp[t]["accepted"] for t in (1, 2, 3)] == [3, 3, 3]
    np.testing.assert_allclose(result.arrays["w"].numpy(), _dense_mean_run(3, 3), atol=1e-5)


def test_the_report_holds_no_empty_string(tmp_path):
    replies = []

    def keep(node, reply):
        replies.append(reply)
        return reply

    _start(TopKSGD(ratio=0.5, fraction_evaluate=0.0), _app([SparseMod()]), tmp_path, rounds=1, tamper=keep)
    reports = [r.content[protocol.RECORD] for r in replies if protocol.RECORD in r.content]
    assert reports and all("" not in dict(rec).values() for rec in reports)
    for rec in reports:
        rec.count_bytes()  # what message_size_mod calls


def test_a_model_returned_under_another_key_goes_up_compressed_only(tmp_path):
    """The mod takes the train function's only ArrayRecord when it is not under "arrays"; that record
    must not travel up too (it did: the dense model beside the sparse update, uncounted)."""
    replies = []

    def keep(node, reply):
        replies.append(reply)
        return reply

    strategy = TopKSGD(ratio=0.1, fraction_evaluate=0.0)
    result, _ = _start(strategy, _app([SparseMod()], key="model"), tmp_path, rounds=2, tamper=keep)
    trained = [r for r in replies if protocol.UPDATE in r.content]
    assert trained and all("model" not in r.content and "arrays" not in r.content for r in trained)
    assert result.train_metrics_clientapp[2]["accepted"] == 3


@pytest.mark.parametrize("local_steps,expected_h", [("auto", 1), (b"x", 1), ([1, 2], 1), (True, 1), (2.5, 1),
                                                    (float("inf"), 1), (4, 4), (4.0, 4), (0, 1)])
def test_the_users_local_steps_config_never_stops_the_server(tmp_path, local_steps, expected_h):
    """train_config is the user's, passed through; its "local-steps" only scales the q_* metrics."""
    strategy = TopKSGD(ratio=0.1, fraction_evaluate=0.0)
    result, _ = _start(strategy, _app([SparseMod()]), tmp_path, rounds=1, config={"local-steps": local_steps})
    m = result.train_metrics_clientapp[1]
    assert m["accepted"] == 3
    unscaled = TopKSGD(ratio=0.1, fraction_evaluate=0.0)
    base, _ = _start(unscaled, _app([SparseMod()]), tmp_path / "b", rounds=1)
    assert m["q_loc_up"] == pytest.approx(base.train_metrics_clientapp[1]["q_loc_up"] / expected_h)


def test_a_client_app_without_sparse_mod_is_named_in_the_log(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="flwr"):
        result, _ = _start(TopKSGD(ratio=0.1, fraction_evaluate=0.0), _app([]), tmp_path, rounds=1)
    lines = [r.getMessage() for r in caplog.records]
    assert any("3 of 3 nodes did not answer fl-sparse's identify message" in line
               and "Is SparseMod in their ClientApp's mods?" in line for line in lines), lines
    np.testing.assert_array_equal(result.arrays["w"].numpy(), _w0()["w"].numpy())  # nothing accepted, nothing changed


def test_a_client_app_with_sparse_mod_gets_no_such_warning(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="flwr"):
        _start(TopKSGD(ratio=0.1, fraction_evaluate=0.0), _app([SparseMod()]), tmp_path, rounds=1)
    assert not [r for r in caplog.records if "identify" in r.getMessage()]


def test_complex_arrays_are_refused_with_their_name():
    arrays = ArrayRecord({"w": Array(np.zeros(3, np.float32)), "phase": Array(np.array([1 + 2j, 3 - 1j], np.complex64))})
    with pytest.raises(ValueError, match=r"array 'phase' is complex64: fl-sparse handles real arrays only"):
        TopKSGD(ratio=0.5).initialize(arrays)


def test_float64_arrays_are_named_in_a_warning_and_rounded_to_float32(caplog):
    arrays = ArrayRecord({"w": Array(np.array([1.0 + 1e-12, 2.0], np.float64)), "b": Array(np.zeros(2, np.float32))})
    strategy = TopKSGD(ratio=0.5)
    with caplog.at_level(logging.WARNING, logger="flwr"):
        strategy.initialize(arrays)
    lines = [r.getMessage() for r in caplog.records]
    assert any("arrays 'w' are float64" in line and "float32" in line for line in lines), lines
    assert strategy.current_arrays()["w"].numpy().tolist() == [1.0, 2.0]  # what the warning says
    with caplog.at_level(logging.WARNING, logger="flwr"):
        caplog.clear()
        TopKSGD(ratio=0.5).initialize(ArrayRecord({"w": Array(np.zeros(2, np.float32))}))
    assert not caplog.records


def test_arrays_changed_between_rounds_start_a_new_run_and_say_so(tmp_path, caplog):
    """As Flower's DifferentialPrivacyClientSideFixedClipping does with noise: the strategy is handed
    a model it did not return; it starts over from it (dense, no error memory) and logs why."""
    strategy = BidirectionalTopKSGD(ratio=0.2, fraction_evaluate=0.0)
    grid = InProcessGrid(_app([SparseMod()]), 3, node_config=lambda i: {"state-dir": str(tmp_path)})
    strategy.initialize(_w0())
    arrays = _w0()
    for t in (1, 2):
        replies = grid.send_and_receive(list(strategy.configure_train(t, arrays, ConfigRecord({}), grid)))
        arrays, _ = strategy.aggregate_train(t, replies)
    generation = strategy.state.generation
    noised = ArrayRecord({"w": Array(arrays["w"].numpy() + np.float32(1e-3))})
    with caplog.at_level(logging.WARNING, logger="flwr"):
        messages = list(strategy.configure_train(3, noised, ConfigRecord({}), grid))
    assert any("not the model this strategy returned after round 2" in r.getMessage() for r in caplog.records)
    assert strategy.state.generation != generation
    assert {protocol.Instruction.read(m.content).sync_mode for m in messages} == {"dense"}
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="flwr"):  # the model it returned: no new run, no warning
        replies = grid.send_and_receive(messages)
        arrays, _ = strategy.aggregate_train(3, replies)
        list(strategy.configure_train(4, arrays, ConfigRecord({}), grid))
    assert not [r for r in caplog.records if "not the model" in r.getMessage()]


@pytest.mark.parametrize("key", ["train-loss", "train_loss"])
def test_adaptive_topk_reads_f0_from_either_train_loss_name(tmp_path, key):
    """Flower's examples (and the README's app) report "train_loss", the built-in client "train-loss":
    F(w_0) for the t̂ estimate comes from either, and the round's train_loss column too."""
    losses = {0: 1.0, 1: 4.0, 2: 2.0}
    estimate = dict(lr=0.5, mu=0.01, L=1.0, sigma_sq=100.0)
    strategy = AdaptiveTopKSGD(ratio=0.2, num_rounds=10, fraction_evaluate=0.0, **estimate)
    app = _app([SparseMod()], metrics=lambda pid: {key: losses[pid]})
    _start(strategy, app, tmp_path, rounds=2)
    weights = {q: 1 + q for q in losses}
    f0 = sum(weights[q] * losses[q] for q in losses) / sum(weights.values())
    assert strategy.state.round_metrics[1]["train_loss"] == pytest.approx(f0)
    expected = adaptive_k_t_hat(d=SHAPE[0], k=8, f0=f0, T=10, eta=0.5, mu=0.01, L=1.0, sigma_sq=100.0)
    assert expected < 10 and strategy.t_hat == expected  # estimated from F(w_0), not the fallback t̂ = T


def test_a_float64_exact_array_from_the_train_function_is_taken_as_float32(tmp_path):
    """As for the compressed arrays: a train function that trains in float64 returns float64 arrays."""
    app = ClientApp(mods=[SparseMod()])

    @app.train()
    def train(msg: Message, context) -> Message:
        pid = int(context.node_config["partition-id"])
        arrays = msg.content["arrays"]
        w = arrays["w"].numpy().astype(np.float64) - _step(pid, 1)
        scale = np.full(2, 1.0 + pid, np.float64)  # an exact (uncompressed) array, trained to 1 + pid
        return Message(RecordDict({"arrays": ArrayRecord({"w": Array(w), "scale": Array(scale)}),
                                   "metrics": MetricRecord({"num-examples": 1 + pid})}), reply_to=msg)

    strategy = TopKSGD(ratio=0.5, fraction_evaluate=0.0, exact_arrays=["scale"])
    grid = InProcessGrid(app, 3, node_config=lambda i: {"state-dir": str(tmp_path)})
    initial = ArrayRecord({"w": Array(np.zeros(SHAPE, np.float32)), "scale": Array(np.zeros(2, np.float32))})
    result = strategy.start(grid=grid, initial_arrays=initial, num_rounds=1, train_config=ConfigRecord({}))
    assert result.train_metrics_clientapp[1]["accepted"] == 3
    scale = result.arrays["scale"].numpy()
    assert scale.dtype == np.float32
    np.testing.assert_allclose(scale, (1 * 1 + 2 * 2 + 3 * 3) / 6)  # Σ p_q (1 + q), p_q ∝ 1 + q


def test_an_array_the_global_model_lacks_is_named_once_not_dropped_silently(tmp_path, caplog, monkeypatch):
    from fl_sparse.clients import mod

    monkeypatch.setattr(mod, "_EXTRA_ARRAYS_WARNED", set())  # said once per process: a fresh "process"
    app = ClientApp(mods=[SparseMod()])

    @app.train()
    def train(msg: Message, context) -> Message:
        w = msg.content["arrays"]["w"].numpy()
        return Message(RecordDict({"arrays": ArrayRecord({"w": Array(w - 0.1), "new_buffer": Array(np.ones(2))}),
                                   "metrics": MetricRecord({"num-examples": 1})}), reply_to=msg)

    with caplog.at_level(logging.WARNING, logger="flwr"):
        result, _ = _start(TopKSGD(ratio=0.5, fraction_evaluate=0.0), app, tmp_path, rounds=2)
    lines = [r.getMessage() for r in caplog.records if "does not have" in r.getMessage()]
    assert len(lines) == 1 and "'new_buffer'" in lines[0], lines  # once, not per message
    assert list(result.arrays.keys()) == ["w"] and result.train_metrics_clientapp[2]["accepted"] == 3


def test_a_non_finite_client_metric_is_named_in_a_warning_and_the_update_still_counts(tmp_path, caplog):
    """One client's train loss is NaN in round 2 (its step is finite): Flower's default aggregation
    makes the round's train_loss NaN, as FedAvg's would, and the log names that node; the update is
    taken as usual (ratio 1 top-K: the model is the weighted mean of every step)."""
    calls = {pid: 0 for pid in range(3)}

    def counting(pid):  # client 1's second round
        calls[pid] += 1
        return {"train_loss": float("nan") if (pid, calls[pid]) == (1, 2) else 1.0 + pid}

    strategy = TopKSGD(ratio=1.0, fraction_evaluate=0.0)
    with caplog.at_level(logging.WARNING):
        result, grid = _start(strategy, _app([SparseMod()], metrics=counting), tmp_path, rounds=2)
    warnings = [r.getMessage() for r in caplog.records if "non-finite value" in r.getMessage()]
    assert warnings == [f"round 2: the clients' 'train_loss' aggregated to a non-finite value; "
                        f"reported by node(s) {grid.node_ids[1]}"]
    assert np.isnan(result.train_metrics_clientapp[2]["train_loss"])
    assert result.train_metrics_clientapp[1]["train_loss"] == pytest.approx((1 * 1 + 2 * 2 + 3 * 3) / 6)
    # fl-sparse's own column averages the finite reports only: clients 0 and 2
    assert strategy.state.round_metrics[2]["train_loss"] == pytest.approx((1 * 1 + 3 * 3) / 4)
    np.testing.assert_allclose(result.arrays["w"].numpy(), _dense_mean_run(2, 3), rtol=1e-5, atol=1e-6)


def test_tied_weights_are_named_at_initialize_and_look_alikes_by_chance_are_not(caplog):
    """One tensor under two keys (an embedding tied to the output layer) is two arrays to fl-sparse:
    a warning names the pair. Equal constant arrays (zero biases, BatchNorm's ones) and arrays that
    differ in one entry are not named."""
    rng = np.random.default_rng(0)
    emb = rng.standard_normal((50, 8)).astype(np.float32)
    near = emb.copy()
    near[3, 4] += 1.0
    arrays = {"emb.weight": emb, "zeros.a": np.zeros(8, np.float32), "zeros.b": np.zeros(8, np.float32),
              "bn.weight": np.ones(8, np.float32), "bn2.weight": np.ones(8, np.float32), "near.weight": near,
              "out.weight": emb.copy(), "out.bias": rng.standard_normal(50).astype(np.float32)}
    with caplog.at_level(logging.WARNING):
        TopKSGD(ratio=0.1).initialize(ArrayRecord({k: Array(v) for k, v in arrays.items()}))
    named = [r.getMessage() for r in caplog.records if "hold the same values" in r.getMessage()]
    assert len(named) == 1 and named[0].startswith("arrays 'emb.weight' and 'out.weight' hold the same values")
    caplog.clear()
    del arrays["out.weight"]
    with caplog.at_level(logging.WARNING):
        TopKSGD(ratio=0.1).initialize(ArrayRecord({k: Array(v) for k, v in arrays.items()}))
    assert not [r for r in caplog.records if "hold the same values" in r.getMessage()]


def test_unavailable_nodes_are_counted_apart_from_apps_without_the_mod(tmp_path, caplog):
    """Flower answers for a dead SuperNode itself: an error reply NODE_UNAVAILABLE whose sender is the
    SuperLink (node id 1 here), not the node. Those were counted as one node "1" that did not answer,
    with the hint that SparseMod may be missing from the ClientApp."""
    from flwr.app import Error
    from flwr.common.constant import ErrorCode

    def dead(node, reply):
        if node == 1007 and protocol.UPDATE not in reply.content:  # not a train reply: the identify round trip
            gone = Message(Error(code=ErrorCode.NODE_UNAVAILABLE, reason="Node Unavailable"), reply_to=reply)
            gone.metadata.__dict__["_src_node_id"] = 1  # as Flower's SuperLink writes it (no public setter)
            return gone
        return reply

    with caplog.at_level(logging.WARNING, logger="flwr"):
        _start(TopKSGD(ratio=0.1, fraction_evaluate=0.0), _app([SparseMod()]), tmp_path, rounds=1, tamper=dead)
    lines = [r.getMessage() for r in caplog.records]
    assert any("1 of 3 nodes were unavailable for fl-sparse's identify message or did not reply in time" in line for line in lines), lines
    assert not any("Is SparseMod in their ClientApp's mods?" in line for line in lines), lines
