"""ClientTask.model_at / model_vector: the fast path must equal load_state_dict exactly."""

from __future__ import annotations

import re

import pytest
import torch

from fl_sparse.tasks.builtin import ClientTask, TaskSpec
from fl_sparse.flat import FlatLayout
from fl_sparse.tasks import models as model_lib
from fl_sparse.tasks import training


def _task(name: str) -> ClientTask:
    model = model_lib.build_model(name, num_classes=10, seed=0, in_channels=1, image_size=28)
    layout = FlatLayout.from_state_dict(model.state_dict())
    images, labels = torch.randn(20, 1, 28, 28), torch.randint(0, 10, (20,))
    return ClientTask(TaskSpec(model=name), images, labels, model, layout)


@pytest.mark.parametrize("name", ["mlp-784-64-10", "cnn-fmnist"])  # cnn-fmnist: BatchNorm buffers
def test_model_at_sets_every_float_entry_like_load_state_dict(name):
    task = _task(name)
    cpu = torch.device("cpu")
    w = torch.randn(task.layout.numel, generator=torch.Generator().manual_seed(1))
    model = task.model_at(w, cpu)
    assert torch.equal(task.model_vector(cpu), w)
    reference = model_lib.build_model(name, num_classes=10, seed=5, in_channels=1, image_size=28)
    reference.load_state_dict(task.layout.to_state_dict(w), strict=True)
    for (k, a), (_, b) in zip(model.state_dict().items(), reference.state_dict().items()):
        assert torch.equal(a, b), k


@pytest.mark.parametrize("shape", [(50_889,), (50_891,), (2, 50_890), ()])
def test_model_at_refuses_a_vector_of_another_length_as_to_state_dict_does(shape):
    """A longer vector's tail was ignored and a shorter one failed deep in a view: both are refused, naming it."""
    task = _task("mlp-784-64-10")
    before = task.model_vector(torch.device("cpu")).clone()
    message = rf"^vector has shape {re.escape(str(shape))}, expected \(50890,\)$"
    for refuse in (lambda v: task.model_at(v, torch.device("cpu")), task.layout.to_state_dict):
        with pytest.raises(ValueError, match=message):
            refuse(torch.ones(shape))
    assert torch.equal(task.model_vector(torch.device("cpu")), before)  # the model is left as it was


@pytest.mark.parametrize("name", ["mlp-784-64-10", "cnn-fmnist"])
def test_training_after_model_at_matches_a_fresh_model(name):
    """Buffers and parameters updated by SGD are the ones model_vector reads back."""
    task = _task(name)
    cpu = torch.device("cpu")
    w0 = torch.randn(task.layout.numel, generator=torch.Generator().manual_seed(2)) * 0.05
    task.model_at(torch.zeros_like(w0), cpu)  # a previous client's weights, then this one's
    model = task.model_at(w0, cpu)
    batches = [torch.arange(10), torch.arange(10, 20)]
    training.local_sgd(model, task.images, task.labels, batches, steps=2, lr=0.1, seed=3)
    fast = task.model_vector(cpu)

    fresh = model_lib.build_model(name, num_classes=10, seed=9, in_channels=1, image_size=28)
    fresh.load_state_dict(task.layout.to_state_dict(w0.clone()), strict=True)
    training.local_sgd(fresh, task.images, task.labels, batches, steps=2, lr=0.1, seed=3)
    slow = task.layout.flatten_state_dict(fresh.state_dict())
    assert not torch.equal(fast, w0)
    torch.testing.assert_close(fast, slow, rtol=0, atol=0)


def test_model_vector_is_a_new_tensor():
    task = _task("mlp-784-64-10")
    cpu = torch.device("cpu")
    w = torch.ones(task.layout.numel)
    task.model_at(w, cpu)
    v = task.model_vector(cpu)
    v += 1
    assert torch.equal(task.model_vector(cpu), w)
