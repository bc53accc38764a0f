"""A failed reply names the node that failed, not the SuperLink that answered for it.

When a SuperNode dies, Flower's SuperLink answers for it: an error reply
(``ErrorCode.NODE_UNAVAILABLE``, or ``REPLY_MESSAGE_UNAVAILABLE`` for an
expired reply) whose sender is the SuperLink's own id (1), linked to the
message it answers only by ``reply_to_message_id``. The grid writes a sent
message's id when it pushes it, after ``configure_train`` built it. The grid
here does both as Flower's ``InMemoryGrid`` and ``LinkState`` do, and builds
the error reply with Flower's own function.
"""

from __future__ import annotations

import logging
from uuid import uuid4

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import SUPERLINK_NODE_ID, ErrorCode
from flwr.common.logger import FLOWER_LOGGER
from flwr.server.superlink.linkstate.utils import create_message_error_unavailable_res_message
from inprocess import InProcessGrid

from fl_sparse import protocol
from fl_sparse.clients import SparseMod
from fl_sparse.protocol import Instruction
from fl_sparse.strategies import SSGDMajorityVote, TopKSGD

FLOWER_LOGGER.setLevel(logging.WARNING)


def _app() -> ClientApp:
    app = ClientApp(mods=[SparseMod()])

    @app.train()
    def train(msg: Message, context) -> Message:
        pid = int(context.node_config["partition-id"])
        w = msg.content["arrays"]["w"].numpy()
        return Message(RecordDict({"arrays": ArrayRecord({"w": Array(w - (pid + 1) * 0.1)}),
                                   "metrics": MetricRecord({"num-examples": 1 + pid})}), reply_to=msg)

    return app


class FlowerLikeGrid(InProcessGrid):
    """Ids sent messages as ``InMemoryGrid.push_messages`` does; nodes in ``dead`` are still
    connected (no heartbeat missed yet when sampled) but answered for by the SuperLink."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.dead: dict[int, str] = {}  # node -> Flower's error type ("node_unavail" or "msg_unavail")
        self.dead_in: str | None = None  # only for messages of this phase (None: all)

    def send_and_receive(self, messages, *, timeout=None):
        replies = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = str(uuid4())  # as InMemoryGrid.push_messages
            phase = Instruction.read(msg.content).phase
            if msg.metadata.dst_node_id in self.dead and self.dead_in in (None, phase):
                replies.append(create_message_error_unavailable_res_message(
                    msg.metadata, self.dead[msg.metadata.dst_node_id]))
            else:
                replies.extend(super().send_and_receive([msg], timeout=timeout))
        return replies


def _play(strategy, grid, server_round, arrays):
    messages = list(strategy.configure_train(server_round, arrays, ConfigRecord(), grid))
    replies = list(grid.send_and_receive(messages, timeout=60))
    return replies, strategy.aggregate_train(server_round, replies)


def _bench(tmp_path) -> tuple[FlowerLikeGrid, TopKSGD]:
    grid = FlowerLikeGrid(_app(), 3, node_config=lambda i: {"state-dir": str(tmp_path)})
    return grid, TopKSGD(ratio=0.5, fraction_evaluate=0.0)


def test_a_dead_nodes_failure_names_that_node_not_the_superlink(tmp_path, caplog):
    grid, strategy = _bench(tmp_path)
    dead = grid.node_ids[1]
    assert SUPERLINK_NODE_ID not in grid.node_ids
    arrays = ArrayRecord({"w": Array(np.zeros(8, dtype=np.float32))})
    _, (arrays, _) = _play(strategy, grid, 1, arrays)
    assert set(strategy.state.client_versions) == set(grid.node_ids)

    grid.dead[dead] = "node_unavail"
    with caplog.at_level(logging.WARNING, logger="flwr"):
        replies, (arrays2, metrics) = _play(strategy, grid, 2, arrays)
    error = next(r for r in replies if r.has_error())
    assert error.metadata.src_node_id == SUPERLINK_NODE_ID  # the premise: Flower's reply names the SuperLink

    failed = [r.getMessage() for r in caplog.records if "failed" in r.getMessage()]
    assert failed == [f"round 2: client {dead} failed: {error.error.reason}"], failed
    assert strategy.first_error == failed[0]
    assert arrays2 is not None and (metrics["accepted"], metrics["failures"]) == (2, 1)
    assert dead not in strategy.state.client_versions  # re-synced densely when it comes back
    assert set(strategy.state.client_versions) == set(grid.node_ids) - {dead}
    assert strategy.state.accepted == {n: 1 if n == dead else 2 for n in grid.node_ids}  # its last accepted round


def test_superlink_errors_to_identify_are_counted_per_node(tmp_path, caplog):
    """Expired replies to the identify message, both from the SuperLink's id: two nodes, not one node "1";
    and Flower's own errors, not a ClientApp's, so without the hint that SparseMod may be missing."""
    grid, strategy = _bench(tmp_path)
    grid.dead = {grid.node_ids[0]: "msg_unavail", grid.node_ids[2]: "msg_unavail"}
    with caplog.at_level(logging.WARNING, logger="flwr"):
        strategy.identify(grid)
    lines = [r.getMessage() for r in caplog.records]
    identify = [line for line in lines if "identify message" in line]
    assert len(identify) == 1 and identify[0].startswith(
        f"2 of 3 nodes were unavailable for fl-sparse's identify message or did not reply in time "
        f"(node {grid.node_ids[0]}: error {ErrorCode.REPLY_MESSAGE_UNAVAILABLE}: "), identify
    # An expired reply is Flower's, not the app's: no hint that the mod is missing
    assert not any("Is SparseMod" in line for line in lines), lines


@pytest.mark.parametrize("phase", [protocol.PHASE_VOTE, protocol.PHASE_VALUES])
def test_ssgd_mv_names_a_node_dead_in_either_phase(tmp_path, caplog, phase):
    grid = FlowerLikeGrid(_app(), 3, node_config=lambda i: {"state-dir": str(tmp_path)})
    strategy = SSGDMajorityVote(ratio=0.5, fraction_evaluate=0.0)
    dead = grid.node_ids[1]
    arrays = ArrayRecord({"w": Array(np.zeros(8, dtype=np.float32))})
    _, (arrays, _) = _play(strategy, grid, 1, arrays)
    grid.dead, grid.dead_in = {dead: "node_unavail"}, phase
    with caplog.at_level(logging.WARNING, logger="flwr"):
        _, (arrays2, metrics) = _play(strategy, grid, 2, arrays)
    failed = [r.getMessage() for r in caplog.records if "failed" in r.getMessage()]
    assert len(failed) == 1 and failed[0].startswith(f"round 2: client {dead} failed"), failed
    assert strategy.first_error == failed[0]
    assert arrays2 is not None and metrics["accepted"] == 2
    assert dead not in strategy.state.client_versions
