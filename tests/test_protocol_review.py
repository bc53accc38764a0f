"""Bugs found by an adversarial review of the protocol between SparseMod and the strategies.

Each test pins one bug (it failed before its fix): what the server believes a
client holds after a resumed run's late node, hostile evaluate replies, and the
client's own checks of what a train function returns.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Message, MetricRecord, RecordDict
from flwr.common.logger import FLOWER_LOGGER

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "strategies"))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "clients"))

from test_base_strategy import (  # noqa: E402
    WEIGHTS,
    _topk_strategy,
    initial_model,
    instructions,
    model_of,
    node,
    play,
    record_of,
    toy_app,
)
from inprocess import InProcessGrid  # noqa: E402

from fl_sparse.clients.state import ClientStateStore  # noqa: E402

FLOWER_LOGGER.setLevel(logging.WARNING)


# ====================================================================== a resumed run's late node
def _renumber(grid: InProcessGrid, offset: int) -> dict[int, int]:
    """The nodes of a new run (restarted SuperNodes): same partitions, new node ids."""
    new_ids = {n: offset + i for i, n in enumerate(grid.node_ids)}
    grid.node_ids = [new_ids[n] for n in grid.node_ids]
    grid.contexts = {new_ids[n]: ctx for n, ctx in grid.contexts.items()}
    for n, ctx in grid.contexts.items():
        ctx.node_id = n
    grid.online = set(grid.node_ids)
    return new_ids


def _resumed_run(tmp_path: Path, late: bool):
    """Two rounds, a checkpoint, then a new run on new node ids from it; partition 2's node connects
    only after the new run's ``start`` identified the nodes (``late``) or before it."""
    grid = InProcessGrid(toy_app(WEIGHTS), len(WEIGHTS), node_config=lambda i: {"state-dir": str(tmp_path)})
    strategy = _topk_strategy()
    arrays = record_of(initial_model())
    for t in (1, 2):
        _, _, (arrays, _) = play(strategy, grid, t, arrays)
    assert strategy.state.accepted[node(2)] == 2  # partition 2's round-2 update is in the model
    saved = strategy.state_dict()

    _renumber(grid, 5000)
    resumed = _topk_strategy()
    resumed.load_state_dict(saved)
    if late:
        grid.online.discard(5002)
    resumed.reidentify(grid)  # what start(first_round=3) does first
    grid.online.add(5002)
    messages, _, (arrays, _) = play(resumed, grid, 3, arrays)
    store = ClientStateStore(tmp_path / f"gen-{resumed.state.generation}")
    return instructions(messages)[5002], store.load("client-2").error, model_of(arrays)


def test_a_node_that_connects_after_a_resumed_runs_identify_keeps_its_accepted_round(tmp_path):
    """Bug: the late node's first message said ``accepted-round = -1`` (the server did not yet know it
    was partition 2), so the client put its round-2 update, already in the model, back into its error
    memory and sent it a second time. Now the strategy identifies such a node before sampling."""
    late_instr, late_error, late_model = _resumed_run(tmp_path / "late", late=True)
    instr, error, model = _resumed_run(tmp_path / "on-time", late=False)
    assert late_instr.accepted_round == instr.accepted_round == 2
    assert late_instr.base_version == instr.base_version  # its model version followed it too: no dense sync
    assert torch.equal(late_error, error)
    for name in model:
        np.testing.assert_array_equal(late_model[name], model[name])


# ====================================================================== hostile evaluate replies
EVAL_WEIGHTS = {0: 1.0, 1: 2.0, 2: 5.0}
EVAL_ACC = {0: 0.25, 1: 0.5, 2: 0.75}
BAD_EVALUATE = {
    "weight missing": lambda m: MetricRecord({"acc": 0.0}),
    "weight negative": lambda m: MetricRecord({"num-examples": -4, "acc": 0.0}),
    "weight NaN": lambda m: MetricRecord({"num-examples": float("nan"), "acc": 0.0}),
    "another metric": lambda m: MetricRecord({"num-examples": 4, "acc": 0.0, "extra": 1.0}),
    "a list": lambda m: MetricRecord({"num-examples": 4, "acc": [0.0, 1.0]}),
}


def _evaluate_app():
    app = toy_app(WEIGHTS)

    @app.evaluate()
    def evaluate(msg: Message, context) -> Message:
        pid = int(context.node_config["partition-id"])
        metrics = MetricRecord({"num-examples": EVAL_WEIGHTS[pid], "acc": EVAL_ACC[pid]})
        return Message(RecordDict({"metrics": metrics}), reply_to=msg)

    return app


@pytest.mark.parametrize("case", [*sorted(BAD_EVALUATE), "two metric records"])
def test_a_malformed_evaluate_reply_is_dropped_not_raised(tmp_path, case, caplog):
    """Bug: FedAvg's aggregate_evaluate raised InconsistentMessageReplies on one malformed evaluate
    reply, which ended ``strategy.start`` (the threat model says a client's reply never does)."""
    bad = node(1)

    def tamper(node_id: int, reply: Message) -> Message:
        if node_id == bad and reply.metadata.message_type == "evaluate" and not reply.has_error():
            if case == "two metric records":
                reply.content["more"] = MetricRecord({"num-examples": 3, "acc": 1.0})
            else:
                reply.content["metrics"] = BAD_EVALUATE[case](reply)
        return reply

    grid = InProcessGrid(_evaluate_app(), 3, node_config=lambda i: {"state-dir": str(tmp_path)}, tamper=tamper)
    strategy = _topk_strategy(fraction_evaluate=1.0, min_evaluate_nodes=1)
    with caplog.at_level(logging.WARNING, logger="flwr"):
        result = strategy.start(grid, record_of(initial_model()), num_rounds=2)
    honest = (0, 2)
    expected = sum(EVAL_WEIGHTS[p] * EVAL_ACC[p] for p in honest) / sum(EVAL_WEIGHTS[p] for p in honest)
    for server_round in (1, 2):
        assert dict(result.evaluate_metrics_clientapp[server_round]) == pytest.approx({"acc": expected})
    assert f"rejected evaluate reply from client {bad}" in caplog.text


@pytest.mark.parametrize("zero", [None, 1])
def test_well_formed_evaluate_replies_aggregate_as_fedavgs(tmp_path, zero):
    """Unchanged for well-formed replies; a weight of 0 (an empty test set) counts for nothing, as in FedAvg."""
    weights = {**EVAL_WEIGHTS, **({zero: 0} if zero is not None else {})}

    def tamper(node_id: int, reply: Message) -> Message:
        pid = (node_id - 1000) // 7
        if reply.metadata.message_type == "evaluate" and pid == zero:
            reply.content["metrics"] = MetricRecord({"num-examples": 0, "acc": EVAL_ACC[pid]})
        return reply

    grid = InProcessGrid(_evaluate_app(), 3, node_config=lambda i: {"state-dir": str(tmp_path)}, tamper=tamper)
    result = _topk_strategy(fraction_evaluate=1.0).start(grid, record_of(initial_model()), num_rounds=1)
    expected = sum(weights[p] * EVAL_ACC[p] for p in weights) / sum(weights.values())
    assert dict(result.evaluate_metrics_clientapp[1]) == pytest.approx({"acc": expected})


# ====================================================================== what a train function returns
from test_mod import Client, Server, _bad_train  # noqa: E402
from test_mod import initial_arrays as net_arrays  # noqa: E402

from fl_sparse.flat import FlatLayout  # noqa: E402


def _server_with_a_float_exact_array() -> Server:
    """The quickstart model with BatchNorm's running variance sent exactly (``exact_arrays``)."""
    arrays = net_arrays()
    server = Server(arrays)
    layout = FlatLayout.from_arrayrecord(arrays, exact=["bn.running_var"])
    server.layout_json = layout.to_json()
    server.w = layout.flatten(arrays)
    server.exact = layout.exact_record(arrays)
    return server


@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_non_finite_values_in_a_float_exact_array_are_refused_by_the_client(tmp_path, value):
    """Bug: the mod refused non-finite values in the compressed arrays only; a float array sent
    exactly went up with its NaN, the client saved the round (error memory, pending update) and only
    the server, dropping the reply, said why."""
    client = Client(tmp_path, _bad_train(lambda a: a["bn.running_var"].__setitem__(2, value)))
    with pytest.raises(ValueError, match="non-finite values in array 'bn.running_var'"):
        client.send(_server_with_a_float_exact_array().message(1, sync_mode="dense"))
    assert not client.state_file().exists()


def test_a_float_exact_array_that_is_finite_goes_up_whole(tmp_path):
    client = Client(tmp_path)
    reply = client.send(_server_with_a_float_exact_array().message(1, sync_mode="dense"))
    assert not reply.has_error()
    sent = reply.content.array_records["fl-sparse.exact"]
    assert sorted(sent.keys()) == ["bn.num_batches_tracked", "bn.running_var"]
    assert np.isfinite(sent["bn.running_var"].numpy()).all()


def test_a_complex_array_returned_for_a_float_one_is_named(tmp_path):
    """Bug: numpy's UFuncTypeError ("Cannot cast ufunc 'subtract' input 1 from complex64 ...") came
    out of the mod, a TypeError naming no array."""
    client = Client(tmp_path, _bad_train(lambda a: a.__setitem__("fc1.bias", a["fc1.bias"].astype(np.complex64))))
    with pytest.raises(ValueError, match="do not match the global model: array 'fc1.bias' is complex64"):
        client.send(Server(net_arrays()).message(1, sync_mode="dense"))
    assert not client.state_file().exists()
