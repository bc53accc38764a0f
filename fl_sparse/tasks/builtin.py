"""A client's learning task: its data partition and its model, built once per process.

A Ray actor (simulation) or a SuperNode (deployment) runs many messages;
loading Fashion-MNIST or building ResNet-18 per message would dominate a
round, so both are cached here per process, keyed by what defines them.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from functools import lru_cache

import torch

from fl_sparse.flat import FlatLayout
from fl_sparse.tasks import data as data_lib
from fl_sparse.tasks import models as model_lib

__all__ = ["TaskSpec", "ClientTask", "get_task", "test_split"]


@dataclass(frozen=True)
class TaskSpec:
    """What defines a client's task; arrives in every train message's config."""

    dataset: str = "fashion-mnist"
    model: str = "mlp-784-64-10"
    partition: str = "iid"
    alpha: float = 0.5
    num_partitions: int = 1
    partition_id: int = 0
    seed: int = 0
    min_partition_size: int | None = None  # Dirichlet only; None: automatic (see partition_indices)
    self_balancing: bool = False  # Dirichlet only

    @classmethod
    def from_config(cls, config, partition_id: int, num_partitions: int) -> "TaskSpec":
        return cls(
            dataset=str(config.get("dataset", cls.dataset)),
            model=str(config.get("model", cls.model)),
            partition=str(config.get("partition", cls.partition)),
            alpha=float(config.get("alpha", cls.alpha)),
            num_partitions=int(config.get("num-partitions", num_partitions)),
            partition_id=int(partition_id),
            seed=int(config.get("seed", cls.seed)),
            # "-1" (or absent) means automatic, as in the run config
            min_partition_size=None if int(config.get("min-partition-size", -1)) < 0 else int(config["min-partition-size"]),
            self_balancing=bool(config.get("self-balancing", False)),
        )


@dataclass
class ClientTask:
    spec: TaskSpec
    images: torch.Tensor
    labels: torch.Tensor
    model: torch.nn.Module
    layout: FlatLayout

    @property
    def num_examples(self) -> int:
        return int(self.labels.numel())

    def model_at(self, vector: torch.Tensor, device: torch.device) -> torch.nn.Module:
        """The task's model on ``device`` with its flat entries set to ``vector``.

        What ``load_state_dict(layout.to_state_dict(vector))`` does, without
        its per-module walk: the model's float ``state_dict`` tensors (views
        of its parameters and buffers) are looked up once per model and
        device, then filled slice by slice. At MLP size the walk cost more
        than the SGD step it prepares. Move the model only through this method
        (``Module.to`` to another device replaces buffer tensors, which the
        cached list would then miss).
        """
        self.layout.check_vector(vector)  # as to_state_dict refuses it
        tensors = _flat_tensors(self.model, self.layout, device)
        with torch.no_grad():
            offset = 0
            vector = vector.to(device)
            for tensor in tensors:
                n = tensor.numel()
                tensor.copy_(vector[offset : offset + n].view_as(tensor))
                offset += n
        return self.model

    def model_vector(self, device: torch.device) -> torch.Tensor:
        """The task's model as a flat float32 vector (a new tensor)."""
        tensors = _flat_tensors(self.model, self.layout, device)
        return self.layout.flatten_state_dict(dict(zip(self.layout.names, tensors)))


_FLAT_TENSORS: "weakref.WeakKeyDictionary[torch.nn.Module, tuple[torch.device, list[torch.Tensor]]]"
_FLAT_TENSORS = weakref.WeakKeyDictionary()


def _flat_tensors(model: torch.nn.Module, layout: FlatLayout, device: torch.device) -> list[torch.Tensor]:
    """``model``'s float state_dict tensors in layout order, with the model on ``device``."""
    cached = _FLAT_TENSORS.get(model)
    if cached is not None and cached[0] == device:
        return cached[1]
    model.to(device)
    state = model.state_dict(keep_vars=True)
    tensors = []
    for name, shape in zip(layout.names, layout.shapes):
        tensor = state[name]
        if tuple(tensor.shape) != shape:
            raise ValueError(f"model tensor {name!r} has shape {tuple(tensor.shape)}, layout says {shape}")
        tensors.append(tensor)
    _FLAT_TENSORS[model] = (device, tensors)
    return tensors


def _dataset_shape(name: str) -> dict:
    return {"in_channels": 3, "image_size": 32} if name == "cifar10" else {"in_channels": 1, "image_size": 28}


@lru_cache(maxsize=4)
def _model(name: str, dataset: str, seed: int) -> tuple[torch.nn.Module, FlatLayout]:
    model = model_lib.build_model(name, num_classes=10, seed=seed, **_dataset_shape(dataset))
    return model, FlatLayout.from_state_dict(model.state_dict())


@lru_cache(maxsize=256)
def get_task(spec: TaskSpec) -> ClientTask:
    """The (cached) task for ``spec``: partition tensors, a model instance, its layout."""
    if spec.num_partitions < 1 or not 0 <= spec.partition_id < spec.num_partitions:
        raise ValueError(
            f"partition-id {spec.partition_id} out of range for {spec.num_partitions} partitions"
        )
    train, _ = data_lib.load_dataset(spec.dataset)
    idx = data_lib.partition_indices(
        spec.dataset,
        train.labels,
        spec.partition,
        spec.num_partitions,
        spec.partition_id,
        alpha=spec.alpha,
        seed=spec.seed,
        min_partition_size=spec.min_partition_size,
        self_balancing=spec.self_balancing,
    )
    if idx.numel() == 0:
        raise ValueError(f"partition {spec.partition_id} of {spec.partition} split is empty")
    model, layout = _model(spec.model, spec.dataset, spec.seed)
    return ClientTask(spec, train.images[idx], train.labels[idx], model, layout)


def test_split(dataset: str):
    """The dataset's test split (images, labels), cached by the data module."""
    _, test = data_lib.load_dataset(dataset)
    return test
