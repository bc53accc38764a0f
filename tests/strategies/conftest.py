"""Fixtures of the strategy tests."""

from __future__ import annotations

import pytest
from flwr.supercore.task_identity import TaskIdentity


@pytest.fixture
def task_identity(monkeypatch):
    """What a ServerApp's runtime sets before a strategy builds Messages (for tests that call a
    strategy's ``configure_train`` directly, on a Mock grid). Used with
    ``pytestmark = pytest.mark.usefixtures("task_identity")``."""
    for name, value in (("_run_id", 7), ("_node_id", 0), ("_task_id", 0)):
        monkeypatch.setattr(TaskIdentity, name, value)
