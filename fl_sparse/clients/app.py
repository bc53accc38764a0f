"""The built-in experiments' ClientApp: a plain Flower train function behind :class:`SparseMod`.

Nothing here is sparse. The train function is written as any Flower user
writes one: it loads the global model from ``msg.content["arrays"]``, runs H
local SGD steps on this client's partition of the built-in dataset (chosen by
name in the train config, :mod:`fl_sparse.tasks`), and returns the trained
model and its metrics. :class:`~fl_sparse.clients.SparseMod` turns that into
a compressed, error-compensated update for whichever fl-sparse strategy the
server runs.

Train config keys (the server's ``train_config``): ``dataset``, ``model``,
``partition``, ``alpha``, ``min-partition-size`` (-1: automatic),
``self-balancing``, ``num-partitions``, ``seed``, ``local-steps``,
``batch-size``, ``lr``, ``momentum``, ``weight-decay``, ``device``
(``"auto"``: CUDA when there is one; a node config ``device`` wins, as the
node knows its hardware). The minibatches of round ``t`` are steps
``(t−1)·H .. t·H−1`` of the client's seeded data order
(:func:`fl_sparse.tasks.data.batch_indices`), so a run is a pure function of
its seed.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fl_sparse.clients.mod import SparseMod, client_generator_seed, node_int
from fl_sparse.tasks import data as data_lib
from fl_sparse.tasks import training
from fl_sparse.tasks.builtin import ClientTask, TaskSpec, get_task

__all__ = ["app", "train", "evaluate", "builtin_task", "local_training"]

app = ClientApp(mods=[SparseMod()])


def builtin_task(context: Context, config: ConfigRecord) -> ClientTask:
    """This node's task: its partition (node config ``partition-id``) of the configured dataset and model."""
    pid = node_int(context, "partition-id")
    spec = TaskSpec.from_config(config, 0 if pid is None else pid, int(config.get("num-partitions", 1)))
    nodes = node_int(context, "num-partitions", minimum=1)
    if nodes is not None:  # the node's own word wins
        spec = replace(spec, num_partitions=nodes)
    if pid is None and spec.num_partitions > 1:  # every such node would train on partition 0
        raise ValueError(
            f"this node has no partition-id in its node config, and the data is split into "
            f"{spec.num_partitions} partitions; start the SuperNode with "
            f"--node-config \"partition-id=K num-partitions={spec.num_partitions}\""
        )
    return get_task(spec)


_DEVICE_NAMES = "'auto', 'cpu', 'cuda' or 'cuda:N'"


def _device(config: ConfigRecord, context: Context | None = None) -> torch.device:
    """Where this node trains: its node config's ``device`` when it has one (the node knows its own
    hardware: ``--node-config "device='cpu'"`` keeps a busy GPU free), else the train config's, else
    ``"auto"`` (CUDA when there is one)."""
    node_value = context.node_config.get("device") if context is not None else None
    if node_value is not None:
        source, name = "node config", node_value
    else:
        source, name = "train config", config.get("device", "auto")
    if not isinstance(name, str):
        raise ValueError(f"{source} device={name!r} is not a device name ({_DEVICE_NAMES})")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"{source} device={name!r} is not a device name ({_DEVICE_NAMES})") from None
    if device.type == "cuda":
        # Named here: torch's own error comes from the first tensor moved, deep in training.
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0 or (device.index is not None and device.index >= count):
            raise ValueError(f"{source} device={name!r}, but this node has {count} CUDA device(s)")
        if device.index is None:
            # Tensors report their device with its index ("cuda:0"), and torch.device("cuda") compares
            # unequal to it: local training would move the model (a walk of every module) on each message.
            device = torch.device("cuda", torch.cuda.current_device())
    return device


def local_training(task: ClientTask, config: ConfigRecord, server_round: int, device: torch.device) -> float:
    """H local SGD steps on ``task.model`` (already holding the global model); returns the train loss."""
    batch_size = int(config.get("batch-size", 10))
    seed = int(config.get("seed", 0))
    steps = int(config.get("local-steps", 1))
    pid = task.spec.partition_id
    start = (int(server_round) - 1) * steps
    result = training.local_sgd(
        task.model,
        task.images,
        task.labels,
        lambda h: data_lib.batch_indices(task.num_examples, batch_size, seed, pid, start + h),
        steps=steps,
        lr=float(config.get("lr", 0.05)),
        momentum=float(config.get("momentum", 0.0)),
        weight_decay=float(config.get("weight-decay", 0.0)),
        device=device,
        seed=client_generator_seed(seed, start, pid),  # dropout masks, reproducible
    )
    return float(result["train_loss"])


def _load(task: ClientTask, arrays: ArrayRecord, device: torch.device) -> torch.nn.Module:
    """``task.model`` holding ``arrays``: float arrays copied in place, integer buffers too."""
    model = task.model_at(task.layout.flatten(arrays), device)
    if task.layout.passthrough:  # e.g. BatchNorm's num_batches_tracked: the server's value, not the last client's
        state = model.state_dict()
        with torch.no_grad():
            for name in task.layout.exact_names:
                state[name].copy_(torch.from_numpy(arrays[name].numpy()))
    return model


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Load the global model, train H local steps, return the model and metrics."""
    config = msg.content["config"]
    task = builtin_task(context, config)
    device = _device(config, context)
    model = _load(task, msg.content["arrays"], device)
    loss = local_training(task, config, int(config.get("server-round", 1)), device)
    content = RecordDict(
        {
            "arrays": ArrayRecord(model.state_dict()),
            "metrics": MetricRecord({"num-examples": task.num_examples, "train-loss": loss}),
        }
    )
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Evaluate the dense model in the message on this client's share of the test set."""
    config = msg.content.config_records.get("config", ConfigRecord())
    task = builtin_task(context, config)
    device = _device(config, context)
    model = _load(task, msg.content["arrays"], device)
    test = data_lib.load_dataset(task.spec.dataset)[1]
    pid, n = task.spec.partition_id, task.spec.num_partitions
    images, labels = test.images[pid::n], test.labels[pid::n]
    num_examples = int(labels.numel())
    if num_examples:
        loss, acc = training.evaluate(model, images, labels, device=device)
    else:
        # More clients than test examples: this shard is empty. Weight 0 and finite metrics of the
        # same names as the others' (a NaN would poison the weighted average, even at weight 0).
        loss, acc = 0.0, 0.0
    content = RecordDict({"metrics": MetricRecord({"num-examples": num_examples, "eval-loss": loss, "eval-acc": acc})})
    return Message(content=content, reply_to=msg)
