"""Bugs found by a review of SparseMod and the strategies against users' own Flower apps.

Each test pins one bug (it failed before its fix) by running a small user
ClientApp, written as Flower's examples write one, through SparseMod and a
strategy on the in-process grid, with plain FedAvg's behaviour as the control.
"""

from __future__ import annotations

import copy
import logging
import math

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.logger import FLOWER_LOGGER
from flwr.serverapp.strategy import FedAvg
from inprocess import InProcessGrid

from fl_sparse.clients import SparseMod
from fl_sparse.protocol import Instruction
from fl_sparse.strategies import DenseFedAvg

FLOWER_LOGGER.setLevel(logging.WARNING)

SHAPES = {"w": (3, 4), "b": (4,)}
WEIGHTS = {0: 3, 1: 5, 2: 2}


def initial_arrays() -> ArrayRecord:
    rng = np.random.default_rng(0)
    return ArrayRecord({n: Array(rng.standard_normal(s).astype(np.float32)) for n, s in SHAPES.items()})


def user_step(pid: int, server_round: int) -> dict[str, np.ndarray]:
    """What partition ``pid``'s training moves the model by in a round: fixed, its own per round."""
    rng = np.random.default_rng(100 * pid + server_round)
    return {n: rng.standard_normal(s).astype(np.float32) for n, s in SHAPES.items()}


def user_app() -> ClientApp:
    """Flower's quickstart shape: load the model, train, return it with num-examples. Nothing sparse."""
    app = ClientApp(mods=[SparseMod()])

    @app.train()
    def train(msg: Message, context) -> Message:
        pid = int(context.node_config.get("partition-id", -1)) % len(WEIGHTS)  # none: the last partition
        step = user_step(pid, int(msg.content["config"]["server-round"]))
        arrays = msg.content["arrays"]
        trained = ArrayRecord({n: Array(arrays[n].numpy() - step[n]) for n in arrays.keys()})
        metrics = MetricRecord({"num-examples": WEIGHTS[pid], "train_loss": 1.0 + pid})
        return Message(RecordDict({"arrays": trained, "metrics": metrics}), reply_to=msg)

    return app


def bench(tmp_path) -> InProcessGrid:
    return InProcessGrid(user_app(), len(WEIGHTS), node_config=lambda i: {"state-dir": str(tmp_path)})


def fedavg_round(model: dict[str, np.ndarray], server_round: int, pids) -> dict[str, np.ndarray]:
    """FedAvg's weighted mean of the clients' trained models (float64)."""
    total = math.fsum(WEIGHTS[q] for q in pids)
    return {
        n: sum(WEIGHTS[q] / total * (model[n].astype(np.float64) - user_step(q, server_round)[n]) for q in pids)
        for n in model
    }


def play(strategy, grid: InProcessGrid, server_round: int, arrays: ArrayRecord):
    """One round as Flower's ``Strategy.start`` runs it: configure, send, aggregate."""
    messages = list(strategy.configure_train(server_round, arrays, ConfigRecord({"lr": 0.1}), grid))
    replies = grid.send_and_receive(messages)
    return messages, strategy.aggregate_train(server_round, replies)


def restart_under_new_id(grid: InProcessGrid, old: int, new: int) -> None:
    """The node ``old`` restarts: a SuperNode without fixed keys registers anew and gets a new node
    id; its partition id and its state folder (node config) are the same."""
    grid.node_ids = [new if n == old else n for n in grid.node_ids]
    context = grid.contexts.pop(old)
    context.node_id = new
    grid.contexts[new] = context
    grid.online = (grid.online - {old}) | {new}


# ====================================================================== a client back under a new node id
def test_a_client_back_under_a_new_node_id_does_not_send_an_aggregated_update_again(tmp_path):
    """Bug: a client whose SuperNode restarted mid-run (new node id, same partition and state folder)
    was told ``accepted-round = -1`` in its first message (the server did not yet know who it was), so
    it put its last update, already in the model, back into its error memory and sent it a second
    time: with no compression at all the model was no longer FedAvg's. Now the strategy identifies a
    new node before its message is built when a known client's node is gone, and the client's
    per-client state follows it to the new node id."""
    grid = bench(tmp_path)
    strategy = DenseFedAvg(fraction_evaluate=0.0, min_available_nodes=len(WEIGHTS))
    arrays = initial_arrays()
    strategy.initialize(arrays)
    strategy.identify(grid)
    expected = {n: arrays[n].numpy() for n in arrays.keys()}
    _, (arrays, _) = play(strategy, grid, 1, arrays)
    expected = fedavg_round(expected, 1, WEIGHTS)

    old = grid.node_ids[1]
    restart_under_new_id(grid, old, 9001)
    messages, (arrays, _) = play(strategy, grid, 2, arrays)
    expected = fedavg_round(expected, 2, WEIGHTS)

    back = next(Instruction.read(m.content) for m in messages if m.metadata.dst_node_id == 9001)
    assert back.accepted_round == 1  # its round-1 update is in the model
    for name, value in expected.items():
        np.testing.assert_allclose(arrays[name].numpy(), value, rtol=1e-5, atol=1e-5, err_msg=name)
    assert strategy.node_keys[9001][0] == 1 and old not in strategy.node_keys


def test_a_new_node_while_every_known_node_is_connected_costs_no_message(tmp_path):
    """The identify message is sent only where a known client's node is gone: a steady run (or a
    node that joins without anyone leaving) builds its train messages without network I/O."""
    grid = bench(tmp_path)
    strategy = DenseFedAvg(fraction_evaluate=0.0, min_available_nodes=len(WEIGHTS))
    arrays = initial_arrays()
    strategy.initialize(arrays)
    strategy.identify(grid)
    _, (arrays, _) = play(strategy, grid, 1, arrays)
    before = len(grid.sent)
    messages = list(strategy.configure_train(2, arrays, ConfigRecord(), grid))
    assert len(grid.sent) == before and len(messages) == len(WEIGHTS)



def test_a_node_without_partition_id_is_asked_once_not_every_round(tmp_path):
    """A node without a partition id has no key to learn: once it answered, the identify message that
    a gone client's absence calls for is not sent to it again every round."""
    grid = bench(tmp_path)
    grid.contexts[grid.node_ids[2]].node_config.pop("partition-id")
    strategy = DenseFedAvg(fraction_evaluate=0.0, min_available_nodes=1, min_train_nodes=1)
    arrays = initial_arrays()
    strategy.initialize(arrays)
    strategy.identify(grid)
    _, (arrays, _) = play(strategy, grid, 1, arrays)
    grid.online.discard(grid.node_ids[0])  # a known client's node is gone
    for server_round in (2, 3):
        before = len(grid.sent)
        messages = list(strategy.configure_train(server_round, arrays, ConfigRecord(), grid))
        assert len(grid.sent) == before and len(messages) == 2
        arrays, _ = strategy.aggregate_train(server_round, grid.send_and_receive(messages))


def add_node(grid: InProcessGrid, node: int, partition_id: int) -> None:
    """A node joins with its own context (same state folder as the others)."""
    context = copy.deepcopy(grid.contexts[grid.node_ids[0]])
    context.node_id = node
    context.node_config["partition-id"] = partition_id
    grid.node_ids.append(node)
    grid.contexts[node] = context
    grid.online.add(node)


def test_a_client_back_under_its_own_node_id_keeps_its_state(tmp_path):
    """A client whose node was gone for a while and came back under its own node id stays the owner
    of its state: a node that later claims the same partition id (a misconfigured one) does not take
    it (the absent client's claim is dropped once its node is back)."""
    grid = bench(tmp_path)
    strategy = DenseFedAvg(fraction_evaluate=0.0, min_available_nodes=1, min_train_nodes=1)
    arrays = initial_arrays()
    strategy.initialize(arrays)
    strategy.identify(grid)
    _, (arrays, _) = play(strategy, grid, 1, arrays)
    away = grid.node_ids[1]
    grid.online.discard(away)
    add_node(grid, 8001, partition_id=3)  # a new client joins while partition 1 is away
    _, (arrays, _) = play(strategy, grid, 2, arrays)
    grid.online.add(away)  # partition 1 is back, same node id, and a node claiming it joins
    add_node(grid, 8002, partition_id=1)
    messages = list(strategy.configure_train(3, arrays, ConfigRecord(), grid))
    assert strategy.node_keys[away][0] == 1 and strategy.state.accepted[away] == 1
    instr = {m.metadata.dst_node_id: Instruction.read(m.content) for m in messages}
    assert instr[away].accepted_round == 1 and instr[8002].accepted_round == -1

# ====================================================================== the user's metric aggregation
def test_a_train_metrics_aggr_fn_that_returns_none_does_not_stop_the_run(tmp_path):
    """Bug: a user's ``train_metrics_aggr_fn`` returning None (FedAvg takes it: the round then has no
    client metrics) raised AttributeError in ``aggregate_train`` and ended the run after the model was
    already updated. Now the round's metrics are fl-sparse's own numbers only, and the run goes on."""
    def no_metrics(records, weighted_by_key):
        return None

    arrays = initial_arrays()
    control = FedAvg(fraction_evaluate=0.0, min_available_nodes=len(WEIGHTS), train_metrics_aggr_fn=no_metrics)
    control_result = control.start(bench(tmp_path / "fedavg"), arrays, num_rounds=2)
    assert control_result.train_metrics_clientapp == {}  # FedAvg: rounds without client metrics

    strategy = DenseFedAvg(fraction_evaluate=0.0, min_available_nodes=len(WEIGHTS), train_metrics_aggr_fn=no_metrics)
    result = strategy.start(bench(tmp_path / "ours"), arrays, num_rounds=2)
    for name in SHAPES:
        np.testing.assert_allclose(result.arrays[name].numpy(), control_result.arrays[name].numpy(), rtol=1e-5,
                                   atol=1e-5, err_msg=name)
    for server_round in (1, 2):
        metrics = result.train_metrics_clientapp[server_round]
        assert metrics["accepted"] == len(WEIGHTS) and "num-examples" not in metrics


# ====================================================================== float16 models
def half_arrays() -> ArrayRecord:
    return ArrayRecord({n: Array(a.numpy().astype(np.float16)) for n, a in initial_arrays().items()})


def test_a_float16_model_continues_from_its_checkpoint(tmp_path):
    """Bug: ``start(first_round=k+1, initial_arrays=strategy.current_arrays())`` refused a float16 model
    ("initial_arrays must be the model the strategy holds"): the strategy keeps w in float32, hands it
    out in the arrays' own float16, and compared that rounded copy with its float32 w. A float16
    model could not be resumed as documented."""
    grid = bench(tmp_path)
    first = DenseFedAvg(fraction_evaluate=0.0, min_available_nodes=len(WEIGHTS))
    first.start(grid, half_arrays(), num_rounds=2)
    assert not np.array_equal(first.state.model.numpy(), first.state.model.numpy().astype(np.float16))

    resumed = DenseFedAvg(fraction_evaluate=0.0, min_available_nodes=len(WEIGHTS))
    resumed.load_state_dict(first.state_dict())
    result = resumed.start(grid, resumed.current_arrays(), num_rounds=3, first_round=3)
    assert sorted(result.train_metrics_clientapp) == [3]
    assert result.train_metrics_clientapp[3]["accepted"] == len(WEIGHTS)
    sync = {Instruction.read(m.content).sync_mode for m in grid.sent[-len(WEIGHTS):]}
    assert sync == {"delta"}  # the same run: every client holds w_1 (and its error memory), not a new one


def test_a_float16_model_passed_back_each_round_is_not_a_new_run(tmp_path, caplog):
    """Bug: a round loop that hands ``configure_train`` the arrays of the last round as a new record
    (a copy, a wrapper that rebuilds it) started a new run every round for a float16 model (dense
    model to every client, error memories dropped, a warning): the float16 copy was compared with the
    float32 w it was rounded from."""
    grid = bench(tmp_path)
    strategy = DenseFedAvg(fraction_evaluate=0.0, min_available_nodes=len(WEIGHTS))
    arrays = half_arrays()
    with caplog.at_level(logging.WARNING):
        for server_round in (1, 2, 3):
            messages, (arrays, _) = play(strategy, grid, server_round, arrays)
            arrays = ArrayRecord({n: Array(arrays[n].numpy().copy()) for n in arrays.keys()})
    assert {Instruction.read(m.content).sync_mode for m in messages} == {"delta"}
    assert "starting a new run" not in caplog.text
