"""The built-in task (fl_sparse/tasks/builtin.py): what a client's config turns into, what a client
loads, the flat fast path's cache and checks, the server's test split.

Written to kill the survivors of a mutation run over builtin.py (docs/testing.md, "Scored
2026-11-27: fl_sparse/tasks/models.py and fl_sparse/tasks/builtin.py"). The data module is replaced
by small fakes where only what builtin.py asks of it matters (no dataset is read here).
"""

from __future__ import annotations

import pytest
import torch
from flwr.app import ConfigRecord

from fl_sparse.flat import FlatLayout
from fl_sparse.tasks import builtin
from fl_sparse.tasks import data as data_lib
from fl_sparse.tasks import models as model_lib
from fl_sparse.tasks.builtin import ClientTask, TaskSpec, get_task
from fl_sparse.tasks.data import TensorPair

CPU = torch.device("cpu")


# ------------------------------------------------------------ TaskSpec.from_config


def test_an_empty_config_gives_the_documented_defaults():
    spec = TaskSpec.from_config({}, 3, 7)
    assert spec == TaskSpec(
        dataset="fashion-mnist",
        model="mlp-784-64-10",
        partition="iid",
        alpha=0.5,
        num_partitions=7,  # the caller's count when the config has none
        partition_id=3,
        seed=0,
        min_partition_size=None,
        self_balancing=False,
    )
    assert type(spec.alpha) is float and spec.self_balancing is False and spec.min_partition_size is None


@pytest.mark.parametrize("make", [dict, ConfigRecord], ids=["dict", "ConfigRecord"])
def test_every_config_key_reaches_its_field(make):
    config = make(
        {
            "dataset": "cifar10",
            "model": "resnet18",
            "partition": "dirichlet",
            "alpha": 0.1,
            "num-partitions": 5,
            "seed": 42,
            "min-partition-size": 3,
            "self-balancing": True,
        }
    )
    spec = TaskSpec.from_config(config, 2, 9)
    assert spec == TaskSpec(
        dataset="cifar10",
        model="resnet18",
        partition="dirichlet",
        alpha=0.1,
        num_partitions=5,  # the config's count wins over the caller's 9
        partition_id=2,
        seed=42,
        min_partition_size=3,
        self_balancing=True,
    )


def test_config_values_are_converted_to_the_fields_types():
    config = {"alpha": 1, "num-partitions": 4.0, "seed": "11", "min-partition-size": "6", "self-balancing": 1}
    spec = TaskSpec.from_config(config, "1", 2)
    assert (spec.alpha, spec.num_partitions, spec.partition_id, spec.seed) == (1.0, 4, 1, 11)
    assert type(spec.alpha) is float
    assert all(type(v) is int for v in (spec.num_partitions, spec.partition_id, spec.seed))
    assert spec.min_partition_size == 6 and type(spec.min_partition_size) is int
    assert spec.self_balancing is True
    assert TaskSpec.from_config({"self-balancing": 0}, 0, 1).self_balancing is False


@pytest.mark.parametrize(
    "value, expected",
    [(-1, None), (-7, None), ("-1", None), (0, 0), (1, 1), (20, 20)],
)
def test_min_partition_size_negative_means_automatic(value, expected):
    """The run config writes "automatic" as -1; 0 is a real minimum (no minimum), not automatic."""
    assert TaskSpec.from_config({"min-partition-size": value}, 0, 1).min_partition_size == expected


# ------------------------------------------------------------ ClientTask's flat fast path


def _task(name: str = "mlp-784-64-10") -> ClientTask:
    model = model_lib.build_model(name, seed=0)
    layout = FlatLayout.from_state_dict(model.state_dict())
    return ClientTask(TaskSpec(model=name), torch.zeros(3, 1, 28, 28), torch.tensor([4, 1, 7]), model, layout)


def test_num_examples_is_the_label_count():
    assert _task().num_examples == 3


def test_flat_tensors_are_the_models_own_tensors_in_layout_order_and_cached():
    task = _task("cnn-fmnist")
    tensors = builtin._flat_tensors(task.model, task.layout, CPU)
    state = task.model.state_dict(keep_vars=True)
    assert [tuple(t.shape) for t in tensors] == list(task.layout.shapes)
    assert all(t is state[name] for t, name in zip(tensors, task.layout.names))
    assert "layer1.1.num_batches_tracked" not in task.layout.names  # integer buffer: not flat
    # looked up once per model and device: the same list the second time
    assert builtin._flat_tensors(task.model, task.layout, CPU) is tensors
    assert builtin._FLAT_TENSORS[task.model][0] == CPU


def test_model_at_moves_the_model_to_the_device_it_is_asked_for():
    """``meta`` is a device every machine has: the model must end up there, and the copy with it."""
    task = _task()
    model = task.model_at(torch.zeros(task.layout.numel), torch.device("meta"))
    assert {p.device.type for p in model.parameters()} == {"meta"}
    assert builtin._FLAT_TENSORS[model][0] == torch.device("meta")


def test_model_at_fills_each_tensor_from_its_own_slice():
    task = _task()
    w = torch.arange(task.layout.numel, dtype=torch.float32)
    model = task.model_at(w, CPU)
    offset = 0
    for name, shape in zip(task.layout.names, task.layout.shapes):
        n = torch.Size(shape).numel()
        assert torch.equal(model.state_dict()[name], w[offset : offset + n].view(shape)), name
        offset += n
    assert offset == w.numel()


def test_model_vector_moves_the_model_to_the_device_it_is_asked_for():
    task = _task()
    v = task.model_vector(torch.device("meta"))
    assert v.device.type == "meta" and v.shape == (task.layout.numel,)
    assert {p.device.type for p in task.model.parameters()} == {"meta"}


def test_model_vector_is_float32_and_flat():
    task = _task()
    task.model_at(torch.full((task.layout.numel,), 0.25), CPU)
    v = task.model_vector(CPU)
    assert v.dtype == torch.float32 and v.shape == (task.layout.numel,)
    assert torch.equal(v, torch.full((task.layout.numel,), 0.25))


def test_a_layout_that_does_not_fit_the_model_is_named():
    model = model_lib.build_model("mlp-784-64-10", seed=0)
    names = tuple(model.state_dict())
    shapes = tuple(tuple(t.shape) for t in model.state_dict().values())
    bad = FlatLayout(names, (shapes[0], (64, 783)) + shapes[2:], ("float32",) * len(names))
    task = ClientTask(TaskSpec(), torch.zeros(1, 1, 28, 28), torch.zeros(1, dtype=torch.long), model, bad)
    with pytest.raises(ValueError) as info:
        task.model_vector(CPU)
    assert str(info.value) == "model tensor '1.bias' has shape (64,), layout says (64, 783)"
    assert model not in builtin._FLAT_TENSORS  # nothing half-built is cached


# ------------------------------------------------------------ what a client loads


@pytest.mark.parametrize(
    "dataset, shape",
    [("cifar10", {"in_channels": 3, "image_size": 32}), ("fashion-mnist", {"in_channels": 1, "image_size": 28}),
     ("mnist", {"in_channels": 1, "image_size": 28})],
)
def test_dataset_shape(dataset, shape):
    assert builtin._dataset_shape(dataset) == shape


class _FakeData:
    """``load_dataset`` / ``partition_indices`` stand-ins: 12 training images whose pixels are their index."""

    def __init__(self, split):
        self.split = split  # partition_id -> indices
        self.partition_calls = []
        n = 12
        images = torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1).expand(n, 1, 28, 28).contiguous()
        self.train = TensorPair(images, torch.arange(n) % 10)
        self.test = TensorPair(torch.ones(2, 1, 28, 28), torch.tensor([3, 5]))
        self.loaded = []

    def load_dataset(self, name, root=None):
        self.loaded.append(name)
        return self.train, self.test

    def partition_indices(self, *args, **kwargs):
        self.partition_calls.append((args, kwargs))
        return self.split[args[4]]


@pytest.fixture
def fake_data(monkeypatch):
    fake = _FakeData({0: torch.tensor([5, 0, 9]), 1: torch.tensor([], dtype=torch.long), 2: torch.tensor([11])})
    monkeypatch.setattr(data_lib, "load_dataset", fake.load_dataset)
    monkeypatch.setattr(data_lib, "partition_indices", fake.partition_indices)
    get_task.cache_clear()
    builtin._model.cache_clear()
    yield fake
    get_task.cache_clear()
    builtin._model.cache_clear()


def test_a_client_loads_its_partitions_examples_and_a_seeded_model(fake_data):
    spec = TaskSpec(
        dataset="fashion-mnist", model="logreg-784-10", partition="dirichlet", alpha=0.3,
        num_partitions=4, partition_id=0, seed=4, min_partition_size=2, self_balancing=True,
    )
    task = get_task(spec)
    assert task.spec is spec
    assert fake_data.loaded == ["fashion-mnist"]
    (args, kwargs), = fake_data.partition_calls
    assert args[0] == "fashion-mnist" and args[1] is fake_data.train.labels and args[2:] == ("dirichlet", 4, 0)
    assert kwargs == {"alpha": 0.3, "seed": 4, "min_partition_size": 2, "self_balancing": True}
    # the partition's own examples, in the partition's order
    assert task.images[:, 0, 0, 0].tolist() == [5.0, 0.0, 9.0]
    assert task.labels.tolist() == [5, 0, 9]
    assert task.num_examples == 3
    # the model: built with the spec's seed for 1x28x28 inputs and 10 classes, and its layout
    expected = model_lib.build_model("logreg-784-10", seed=4)
    for (k, a), (_, b) in zip(task.model.state_dict().items(), expected.state_dict().items()):
        assert torch.equal(a, b), k
    assert task.model.input_shape == (1, 28, 28)
    assert task.layout == FlatLayout.from_state_dict(expected.state_dict())
    # cached per spec: the same task, nothing loaded again
    assert get_task(spec) is task and len(fake_data.partition_calls) == 1


def test_a_cifar_client_gets_a_model_for_3x32x32(fake_data):
    task = get_task(TaskSpec(dataset="cifar10", model="cnn-fmnist", num_partitions=3, partition_id=2))
    assert task.model.input_shape == (3, 32, 32) and task.model.fc.out_features == 10
    assert task.labels.tolist() == [1]  # example 11's label
    assert fake_data.loaded == ["cifar10"]
    (args, kwargs), = fake_data.partition_calls
    assert args[0] == "cifar10" and args[2:] == ("iid", 3, 2)


def test_clients_of_one_model_share_its_instance(fake_data):
    a = get_task(TaskSpec(model="logreg-784-10", num_partitions=3, partition_id=0))
    b = get_task(TaskSpec(model="logreg-784-10", num_partitions=3, partition_id=2))
    c = get_task(TaskSpec(model="logreg-784-10", num_partitions=3, partition_id=2, seed=1))
    assert a.model is b.model and a.layout is b.layout
    assert c.model is not a.model


@pytest.mark.parametrize("num_partitions, partition_id", [(3, 3), (3, 4), (3, -1), (0, 0), (-2, 0)])
def test_a_partition_id_out_of_range_is_refused_before_any_data_is_read(fake_data, num_partitions, partition_id):
    with pytest.raises(ValueError) as info:
        get_task(TaskSpec(num_partitions=num_partitions, partition_id=partition_id))
    assert str(info.value) == f"partition-id {partition_id} out of range for {num_partitions} partitions"
    assert fake_data.loaded == []


@pytest.mark.parametrize("num_partitions, partition_id", [(1, 0), (3, 0), (3, 2)])
def test_the_edges_of_the_partition_range_are_accepted(fake_data, num_partitions, partition_id):
    fake_data.split[0] = torch.tensor([1])
    assert get_task(TaskSpec(model="logreg-784-10", num_partitions=num_partitions, partition_id=partition_id)).num_examples == 1


def test_an_empty_partition_is_refused_with_its_id_and_split(fake_data):
    with pytest.raises(ValueError) as info:
        get_task(TaskSpec(model="logreg-784-10", partition="shards", num_partitions=3, partition_id=1))
    assert str(info.value) == "partition 1 of shards split is empty"


def test_the_test_split_is_the_datasets_second_half(fake_data):
    assert builtin.test_split("mnist") is fake_data.test
    assert fake_data.loaded == ["mnist"]
