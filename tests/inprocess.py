"""A Flower Grid that runs a real ClientApp in this process: the strategies' fast test bench.

Messages are real :class:`flwr.app.Message` objects with real metadata, the
ClientApp (mods included) is called as Flower's engine calls it, and an
exception in it becomes an error reply as in Flower's simulation. No Ray, no
network: a round takes milliseconds, so tests can run many rounds and many
configurations. ``tamper`` lets a test rewrite a reply, or lose it by returning None.
"""

from __future__ import annotations

import itertools
import tempfile
import time
from collections.abc import Callable, Iterable
from unittest.mock import Mock

from flwr.app import Context, Error, Message, RecordDict
from flwr.app.metadata import Metadata
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

_ids = itertools.count(1)

# Removed when the test process exits (a TemporaryDirectory's finalizer): the state folders
# tests make with scratch_folder() do not pile up under /tmp, run after run.
_SCRATCH = tempfile.TemporaryDirectory(prefix="fl-sparse-tests-")


def mock_grid(n: int) -> Mock:
    """A Grid whose nodes 1..n are connected: a Mock, so a test can check what it was asked to send."""
    grid = Mock(spec=Grid)
    grid.get_node_ids.return_value = list(range(1, n + 1))
    return grid


def scratch_folder(prefix: str = "state-") -> str:
    """A new empty folder for one test bench's client states, gone when the test process ends."""
    return tempfile.mkdtemp(prefix=prefix, dir=_SCRATCH.name)


def node_id(partition_id: int) -> int:
    """The node id :class:`InProcessGrid` gives the node holding ``partition_id`` (not the partition id,
    so that tests tell the two apart)."""
    return 1000 + 7 * partition_id


class InProcessGrid(Grid):
    """``num_nodes`` nodes, node ``i`` (id :func:`node_id` ``(i)``) holding partition ``i``."""

    def __init__(
        self,
        client_app,
        num_nodes: int,
        *,
        node_config: Callable[[int], dict] | None = None,
        run_id: int = 7,
        tamper: Callable[[int, Message], Message | None] | None = None,
    ) -> None:
        self.client_app = client_app
        self.run_id = run_id
        # What a ServerApp's runtime sets before the strategy builds messages.
        TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = run_id, 0, 0
        self.node_ids = [node_id(i) for i in range(num_nodes)]
        self.contexts = {
            node: Context(
                run_id=run_id,
                node_id=node,
                node_config={"partition-id": i, "num-partitions": num_nodes, **(node_config(i) if node_config else {})},
                state=RecordDict(),
                run_config={},
            )
            for i, node in enumerate(self.node_ids)
        }
        self.online = set(self.node_ids)
        self.tamper = tamper
        self.sent: list[Message] = []

    # -------------------------------------------------------------- Grid API
    def set_run(self, run) -> None:  # pragma: no cover - the strategies never call it
        self._run = run

    @property
    def run(self):  # pragma: no cover
        return getattr(self, "_run", None)

    def get_node_ids(self) -> Iterable[int]:
        return [n for n in self.node_ids if n in self.online]

    def push_messages(self, messages):  # pragma: no cover - send_and_receive is what strategies use
        raise NotImplementedError

    def pull_messages(self, message_ids):  # pragma: no cover
        raise NotImplementedError

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):  # pragma: no cover
        return Message(content=content, message_type=message_type, dst_node_id=dst_node_id, group_id=group_id)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        replies = []
        for msg in messages:
            node = msg.metadata.dst_node_id
            self.sent.append(msg)
            if node not in self.online:
                continue
            inbound = Message(content=msg.content, metadata=_metadata(self.run_id, node, msg.metadata.message_type))
            try:
                reply = self.client_app(inbound, self.contexts[node])
            except Exception as exc:  # noqa: BLE001 - Flower turns any ClientApp exception into an error reply
                reply = Message(Error(code=0, reason=f"{type(exc).__name__}: {exc}"), reply_to=inbound)
            if self.tamper is not None:
                reply = self.tamper(node, reply)
                if reply is None:
                    continue
            replies.append(reply)
        return replies


def _metadata(run_id: int, node: int, message_type: str) -> Metadata:
    return Metadata(
        run_id=run_id,
        message_id=f"m{next(_ids)}",
        src_node_id=0,
        dst_node_id=node,
        reply_to_message_id="",
        group_id="",
        created_at=time.time(),
        ttl=3600.0,
        message_type=message_type,
    )


def step_app(step, weight, metrics=None):
    """A ClientApp (SparseMod in front) whose train function subtracts ``step(pid, round)`` from array ``w``.

    ``weight(pid)`` is the reply's ``num-examples``; ``metrics(pid)`` adds more
    metrics. The strategies' fast tests use it as a client with a known update.
    """
    from flwr.app import Array, ArrayRecord, MetricRecord
    from flwr.clientapp import ClientApp

    from fl_sparse.clients import SparseMod

    app = ClientApp(mods=[SparseMod()])

    @app.train()
    def train(msg: Message, context) -> Message:
        pid = int(context.node_config["partition-id"])
        t = int(msg.content["config"]["server-round"])
        w = msg.content["arrays"]["w"].numpy()
        values = {"num-examples": weight(pid), **(metrics(pid) if metrics else {})}
        return Message(RecordDict({"arrays": ArrayRecord({"w": Array(w - step(pid, t))}),
                                   "metrics": MetricRecord(values)}), reply_to=msg)

    return app
