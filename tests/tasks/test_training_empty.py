"""Federated evaluation with more clients than test examples: an empty test shard.

The built-in ClientApp evaluates on ``test[pid::n]``; with ``n`` above the
test set's size (10,000 for Fashion-MNIST) the last clients' shards are
empty, and their evaluate raised "cannot evaluate on zero examples": a
failure reply every round. Such a client has nothing to say: it replies
with weight 0 and finite metrics of the same names as everyone else's (the
strategy keeps only replies whose metric names are the most common, and a
NaN times weight 0 is still NaN in the weighted average).
"""

from __future__ import annotations

import math

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from inprocess import _metadata

from fl_sparse.clients import app as client_app
from fl_sparse.flat import FlatLayout
from fl_sparse.tasks import data as data_lib
from fl_sparse.tasks import models as model_lib
from fl_sparse.tasks import training
from fl_sparse.tasks.builtin import ClientTask

NUM_TEST = 3
NODES = 5  # partitions 3 and 4 have no test example


@pytest.fixture
def tiny_data(monkeypatch):
    """A 3-example test split and a small train partition per client, no files read."""
    gen = torch.Generator().manual_seed(0)
    test = data_lib.TensorPair(torch.randn(NUM_TEST, 1, 28, 28, generator=gen), torch.tensor([1, 4, 7]))
    train = data_lib.TensorPair(torch.randn(8, 1, 28, 28, generator=gen), torch.arange(8) % 10)
    monkeypatch.setattr(data_lib, "load_dataset", lambda name, root=None: (train, test))

    def get_task(spec):
        model = model_lib.build_model(spec.model, num_classes=10, seed=spec.seed, in_channels=1, image_size=28)
        return ClientTask(spec, train.images, train.labels, model, FlatLayout.from_state_dict(model.state_dict()))

    monkeypatch.setattr(client_app, "get_task", get_task)
    return test


def _evaluate(pid: int) -> Message:
    """The built-in ClientApp (SparseMod in front), as Flower calls it, on an evaluate message."""
    model = model_lib.build_model("mlp-784-64-10", num_classes=10, seed=1, in_channels=1, image_size=28)
    content = RecordDict({"arrays": ArrayRecord(model.state_dict()), "config": ConfigRecord({"device": "cpu"})})
    msg = Message(content, metadata=_metadata(1, 100 + pid, "evaluate"))
    context = Context(run_id=1, node_id=100 + pid, node_config={"partition-id": pid, "num-partitions": NODES},
                      state=RecordDict(), run_config={})
    return client_app.app(msg, context)


def test_a_client_without_test_examples_replies_with_weight_zero(tiny_data):
    reply = _evaluate(4)
    assert not reply.has_error()
    metrics = dict(reply.content["metrics"])
    assert metrics == {"num-examples": 0, "eval-loss": 0.0, "eval-acc": 0.0}
    # the same metric names as a client that has test examples
    assert set(dict(_evaluate(0).content["metrics"])) == set(metrics)


def test_empty_shards_do_not_change_the_federated_average(tiny_data):
    from fl_sparse.strategies import TopKSGD

    replies = [_evaluate(pid) for pid in range(NODES)]
    assert [int(r.content["metrics"]["num-examples"]) for r in replies] == [1, 1, 1, 0, 0]
    averaged = TopKSGD(k=4).aggregate_evaluate(1, replies)
    assert averaged is not None
    model = model_lib.build_model("mlp-784-64-10", num_classes=10, seed=1, in_channels=1, image_size=28)
    loss, acc = training.evaluate(model, tiny_data.images, tiny_data.labels)  # the whole test set at once
    assert math.isfinite(averaged["eval-loss"]) and averaged["eval-loss"] == pytest.approx(loss, rel=1e-6)
    assert averaged["eval-acc"] == pytest.approx(acc)


def test_evaluate_itself_still_refuses_zero_examples():
    """The central evaluation (server_app) calls it on the whole test set: an empty one is a mistake there."""
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 10))
    with pytest.raises(ValueError, match="zero examples"):
        training.evaluate(model, torch.zeros(0, 4), torch.zeros(0, dtype=torch.int64))
