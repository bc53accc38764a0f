"""The node config's ``partition-id``: one parser, in SparseMod and in the built-in ClientApp.

The mod read it with ``int()``: ``partition-id=2.7`` was partition 2 (the
same random draws and Report id as the node that really is partition 2),
``True`` was partition 1, ``"abc"`` failed with int()'s "invalid literal"
naming neither the key nor the node config. And the state file's name was
the raw value: ``3.0`` and ``3`` were ``client-3.0`` and ``client-3``, one
client under two names (a SuperNode restarted with the other spelling lost
its error memory). A bad value must reach the server as a failure reply that
names it, the train function not called and nothing stored.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.common.logger import FLOWER_LOGGER
from inprocess import InProcessGrid, _metadata, step_app

from fl_sparse import protocol
from fl_sparse.clients import app as client_app
from fl_sparse.clients import mod as mod_module
from fl_sparse.clients.mod import SparseMod, client_key
from fl_sparse.protocol import Instruction, Report

FLOWER_LOGGER.setLevel(logging.WARNING)

NODE = 501
BAD = [2.7, -0.5, "abc", "", "2.5", True, False, float("nan"), float("inf")]
GOOD = [3, 3.0, "3", " 3 "]


def _context(node_config: dict) -> Context:
    return Context(run_id=1, node_id=NODE, node_config=node_config, state=RecordDict(), run_config={})


def _never(msg, context):  # the train function: identify must not call it
    raise AssertionError("the train function was called")


def _identify(node_config: dict) -> Report:
    instr = Instruction(server_round=0, phase=protocol.PHASE_IDENTIFY).to_record()
    msg = Message(RecordDict({protocol.RECORD: instr}), metadata=_metadata(1, NODE, "train"))
    return Report.read(SparseMod()(msg, _context(node_config), _never).content)


# ------------------------------------------------------------------ the parser
def test_the_parser_takes_integers_in_any_spelling_and_nothing_else():
    from fl_sparse.clients.mod import node_int

    for value in GOOD:
        assert node_int(_context({"partition-id": value}), "partition-id") == 3
    assert node_int(_context({}), "partition-id") is None
    for value in BAD:
        with pytest.raises(ValueError, match="num-partitions") as info:
            node_int(_context({"num-partitions": value}), "num-partitions")
        assert f"num-partitions={value!r}" in str(info.value)


def test_the_built_in_app_uses_the_mods_parser():
    """One parser, in the mod (the app imports the mod, never the other way round)."""
    assert client_app.node_int is mod_module.node_int
    assert not hasattr(client_app, "_node_int")


# ------------------------------------------------------------------ in the mod
@pytest.mark.parametrize("value", GOOD)
def test_integer_spellings_name_the_same_client(value):
    context = _context({"partition-id": value})
    assert client_key(context) == "client-3"  # the state file of an int partition id, unchanged
    report = _identify({"partition-id": value})
    assert (report.partition_id, report.client_key) == (3, "client-3")
    assert mod_module._partition_id(context) == mod_module._random_stream(context) == 3


def test_a_node_without_partition_id_is_its_node_id():
    context = _context({})
    assert client_key(context) == f"node-{NODE}"
    assert mod_module._partition_id(context) == -1
    assert mod_module._random_stream(context) == NODE
    report = _identify({})
    assert (report.partition_id, report.client_key) == (-1, f"node-{NODE}")


@pytest.mark.parametrize("value", BAD, ids=repr)
def test_a_bad_partition_id_is_named_not_truncated(value):
    with pytest.raises(ValueError, match="partition-id") as info:
        _identify({"partition-id": value})
    assert f"partition-id={value!r}" in str(info.value)
    with pytest.raises(ValueError, match="partition-id"):
        client_key(_context({"partition-id": value}))


@pytest.mark.parametrize("value", BAD, ids=repr)
def test_the_mod_and_the_built_in_app_say_the_same(monkeypatch, value):
    monkeypatch.setattr(client_app, "get_task", lambda spec: spec)
    with pytest.raises(ValueError) as from_app:
        client_app.builtin_task(_context({"partition-id": value, "num-partitions": 4}), ConfigRecord({}))
    with pytest.raises(ValueError) as from_mod:
        _identify({"partition-id": value, "num-partitions": 4})
    assert str(from_mod.value) == str(from_app.value)


def test_a_bad_partition_id_is_a_failure_reply_to_the_server_not_a_partition(tmp_path):
    """Through a real ClientApp and strategy: node 1 says ``partition-id=2.7``. It was partition 2
    (node 2's draws, node 2's id in its Report); now its reply is an error naming the value, its
    train function never runs, nothing is stored for it, and the other two clients are aggregated."""
    from fl_sparse.strategies import TopKSGD

    d = 40
    trained: list[int] = []

    def step(pid, server_round):
        trained.append(pid)
        return np.full(d, 0.1 * (pid + 1), dtype=np.float32)

    def node_config(i):
        return {"state-dir": str(tmp_path), **({"partition-id": 2.7} if i == 1 else {})}

    replies: dict[int, Message] = {}
    grid = InProcessGrid(step_app(step, lambda pid: 1.0), 3, node_config=node_config,
                         tamper=lambda node, reply: (replies.__setitem__(node, reply), reply)[1])
    strategy = TopKSGD(k=4, fraction_evaluate=0.0)
    arrays = ArrayRecord({"w": Array(np.zeros(d, dtype=np.float32))})
    messages = list(strategy.configure_train(1, arrays, ConfigRecord(), grid))
    replies.clear()
    got = list(grid.send_and_receive(messages))
    strategy.aggregate_train(1, got)

    bad = replies[1007]
    assert bad.has_error()
    assert "partition-id=2.7" in bad.error.reason and "not an integer" in bad.error.reason
    assert not any(r.has_error() for node, r in replies.items() if node != 1007)
    assert sorted(trained) == [0, 2]
    assert strategy.state.round_metrics[1]["accepted"] == 2
    assert sorted(p.name for p in tmp_path.rglob("*.state")) == ["client-0.state", "client-2.state"]


@pytest.mark.parametrize("value", [-1, "-1", -3.0])
def test_a_negative_partition_id_is_refused(value):
    """-1 is the protocol's "no partition": a node configured with it was named ``client--1`` but
    reported no partition and drew its random numbers from its node id."""
    with pytest.raises(ValueError, match=r"partition-id=.* is below 0"):
        client_key(_context({"partition-id": value}))
    with pytest.raises(ValueError, match="below 0"):
        _identify({"partition-id": value})


def test_num_partitions_must_be_positive():
    from fl_sparse.clients.mod import node_int

    assert node_int(_context({"num-partitions": 1}), "num-partitions", minimum=1) == 1
    with pytest.raises(ValueError, match="num-partitions=0 is below 1"):
        node_int(_context({"num-partitions": 0}), "num-partitions", minimum=1)
    with pytest.raises(ValueError, match="num-partitions=0 is below 1"):
        client_app.builtin_task(_context({"partition-id": 0, "num-partitions": 0}), ConfigRecord({}))
