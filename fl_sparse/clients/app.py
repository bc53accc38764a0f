"""The fl-sparse ClientApp: H local SGD steps, error feedback, compression, encoding.

The same ClientApp runs in Flower's simulation engine and on real SuperNodes.
Per train message (see :mod:`fl_sparse.strategies.base` for the protocol)::

    w      <- sync(w_stored, message)          exact copy of the server's w_{t-1}
    Δ      =  w - SGD_H(w)                     H local steps on the local partition
    a      =  e + Δ                            error compensation
    s      =  C(a)                             the round's uplink compressor
    e      <- a - decode(encode(s))            what was not sent stays local
    reply     encode(s), metrics, hash(w)

State between rounds (model copy, error memory, step counter) lives in a
:class:`~fl_sparse.clients.state.ClientStateStore`, not in ``context.state``.
"""

from __future__ import annotations

import inspect
import json
import os
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fl_sparse import codec
from fl_sparse.clients.state import ClientState, ClientStateStore
from fl_sparse.tasks.builtin import ClientTask, TaskSpec, get_task
from fl_sparse.compressors import build_compressor
from fl_sparse.flat import vector_hash
from fl_sparse.memory import ErrorFeedback
from fl_sparse.tasks import data as data_lib
from fl_sparse.tasks import training
from fl_sparse.sparse import SparseTensor

__all__ = ["app", "SyncError", "state_store_for", "client_key", "run_train", "client_generator_seed", "takes_generator", "ClientRound"]

app = ClientApp()

DEFAULT_STATE_DIR = Path.home() / ".cache" / "fl-sparse" / "state"


class SyncError(RuntimeError):
    """The client's stored model is not the version the server's sync assumes."""


# ----------------------------------------------------------------- plumbing
def state_store_for(context: Context, config: ConfigRecord) -> ClientStateStore:
    """Pick the state folder: node config > $FL_SPARSE_STATE_DIR > server's hint > default.

    Only a folder the server names may skip the fsync of each save, and only
    when the server says it is throw-away (``state-fsync = False``: the
    simulation's temporary folder, removed after the run).
    """
    own = context.node_config.get("state-dir") or os.environ.get("FL_SPARSE_STATE_DIR")
    root = own or config.get("state-dir") or str(DEFAULT_STATE_DIR)
    durable = bool(own) or not config.get("state-dir") or bool(config.get("state-fsync", True))
    return ClientStateStore(Path(str(root)) / f"run-{context.run_id}", durable=durable)


def client_key(context: Context) -> str:
    """Stable name of this client: its partition if it has one, else its node id."""
    pid = context.node_config.get("partition-id")
    return f"client-{pid}" if pid is not None else f"node-{context.node_id}"


def _task(context: Context, config: ConfigRecord) -> ClientTask:
    pid = int(context.node_config.get("partition-id", 0))
    spec = TaskSpec.from_config(config, pid, int(config.get("num-partitions", 1)))
    if "num-partitions" in context.node_config:  # the node's own word wins
        spec = replace(spec, num_partitions=int(context.node_config["num-partitions"]))
    return get_task(spec)


def _device(config: ConfigRecord) -> torch.device:
    name = str(config.get("device", "auto"))
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def apply_sync(state: ClientState, config: ConfigRecord, content: RecordDict, numel: int) -> None:
    """Bring ``state.model`` to the server's ``model-version`` exactly, or raise SyncError."""
    mode = str(config.get("sync-mode", "dense"))
    target = int(config["model-version"])
    if mode == "none":
        if state.model is None or state.model_version != target:
            raise SyncError(f"server assumes version {target}, client holds {state.model_version}")
        return
    if "sync" not in content.array_records:
        raise SyncError(f"sync-mode {mode!r} without a 'sync' payload")
    record = content.array_records["sync"]
    if mode == "dense":
        state.model = codec.decode_dense(record, numel).clone()
    elif mode in ("delta", "set"):
        base = int(config["base-version"])
        if state.model is None or state.model_version != base:
            raise SyncError(f"{mode} sync needs version {base}, client holds {state.model_version}")
        sparse = codec.decode(record, numel)
        if mode == "delta":
            sparse.add_(state.model, alpha=-1.0)  # w <- w - ĝ, the server's exact operation
        else:
            state.model[sparse.indices] = sparse.values
    else:
        raise SyncError(f"unknown sync-mode {mode!r}")
    state.model_version = target


def restore_unaccepted(state: ClientState, config: ConfigRecord) -> None:
    """Put last round's update back into the error if the server did not aggregate it."""
    pending = state.extra.get("pending_indices")
    if pending is None:
        return
    pending_round = int(state.extra["pending_round"].item())
    if int(config.get("accepted-round", -1)) != pending_round and state.error is not None:
        state.error.index_add_(0, pending, state.extra["pending_values"])
    for key in ("pending_indices", "pending_values", "pending_round"):
        state.extra.pop(key, None)


def local_update(task: ClientTask, w: torch.Tensor, config: ConfigRecord, steps_done: int, device):
    """Δ = w - SGD_H(w) on the local partition; returns (Δ, train loss)."""
    model = task.model_at(w, device)
    batch_size = int(config.get("batch-size", 10))
    seed = int(config.get("seed", 0))
    steps = int(config.get("local-steps", 1))
    pid = task.spec.partition_id

    def batches(step: int) -> torch.Tensor:
        return data_lib.batch_indices(task.num_examples, batch_size, seed, pid, steps_done + step)

    result = training.local_sgd(
        model,
        task.images,
        task.labels,
        batches,
        steps=steps,
        lr=float(config.get("lr", 0.05)),
        momentum=float(config.get("momentum", 0.0)),
        weight_decay=float(config.get("weight-decay", 0.0)),
        device=device,
        seed=client_generator_seed(seed, steps_done, pid),  # dropout masks, reproducible
    )
    return w.to(device) - task.model_vector(device), float(result["train_loss"])


@dataclass
class ClientRound:
    """What every train handler opens first: its config, task, state and where to save it."""

    config: ConfigRecord
    task: ClientTask
    device: torch.device
    store: ClientStateStore
    key: str
    state: ClientState

    @classmethod
    def open(cls, msg: Message, context: Context) -> "ClientRound":
        if "config" not in msg.content.config_records:
            raise ValueError("train message has no 'config' ConfigRecord")
        config = msg.content.config_records["config"]
        store = state_store_for(context, config)
        key = client_key(context)
        return cls(config, _task(context, config), _device(config), store, key, store.load(key))

    def save(self) -> None:
        self.store.save(self.key, self.state)


def run_train(msg: Message, context: Context) -> Message:
    """The body of the train handler (importable for tests and subclasses)."""
    rnd = ClientRound.open(msg, context)
    config, task, device, state = rnd.config, rnd.task, rnd.device, rnd.state
    numel = task.layout.numel

    apply_sync(state, config, msg.content, numel)
    model_hash = vector_hash(state.model)  # state.model is not changed below: reported as is
    if model_hash != str(config.get("model-hash", model_hash)):
        raise SyncError("model after sync does not match the server's hash")
    restore_unaccepted(state, config)

    step, loss = local_update(task, state.model, config, state.steps_done, device)
    memory = ErrorFeedback(numel, device=device)
    if state.error is not None and bool(config.get("error-feedback", True)):
        memory.load_state_dict({"numel": numel, "error": state.error.to(device)})
    compensated = memory.compensate(step)
    spec = json.loads(str(config["uplink"]))
    compressor = build_compressor(**spec)
    sparse = _call_compressor(compressor, compensated, config, task)
    values, positions = str(config.get("uplink-values", "fp32")), str(config.get("uplink-positions", "raw"))
    record = codec.encode(sparse, values=values, positions=positions)
    sent = codec.lossy_roundtrip(sparse, values=values)
    memory.update(compensated, sent)
    compression_error = float(memory.norm()) ** 2

    steps = int(config.get("local-steps", 1))
    state.error = memory.error.detach().to("cpu")
    state.steps_done += steps
    state.extra["pending_indices"] = sent.indices.to("cpu")
    state.extra["pending_values"] = sent.values.to("cpu", torch.float32)
    state.extra["pending_round"] = torch.tensor(int(config["server-round"]))
    rnd.save()

    content = RecordDict(
        {
            "update": record,
            "metrics": MetricRecord(
                {
                    "num-examples": task.num_examples,
                    "train-loss": loss,
                    "uplink-bytes": codec.wire_size(record).total_bytes,
                    "density": sparse.density,
                    "error-norm": float(memory.norm()),
                    "compression-error": compression_error,
                    "local-steps": steps,
                }
            ),
            "client": ConfigRecord(
                {"model-hash": model_hash, "model-version": state.model_version}
            ),
        }
    )
    if bool(config.get("diagnostics", False)):
        content["diagnostics"] = ArrayRecord({"a": compensated.cpu(), "step": step.cpu()})
    return Message(content=content, reply_to=msg)


def takes_generator(compressor) -> bool:
    """Random compressors (RandomK, RTopK) take a ``generator`` keyword."""
    try:
        return "generator" in inspect.signature(compressor).parameters
    except (TypeError, ValueError):
        return False


def client_generator_seed(seed: int, server_round: int, partition_id: int) -> int:
    """Seed of a client's random compressor in a round: reproducible, distinct per client."""
    return (int(seed) * 1_000_003 + int(server_round)) * 10_007 + int(partition_id)


def _call_compressor(compressor, x: torch.Tensor, config: ConfigRecord, task: ClientTask) -> SparseTensor:
    """Random compressors get a generator seeded by (seed, round, partition)."""
    if not takes_generator(compressor):
        return compressor(x)
    gen = torch.Generator(device=x.device)
    gen.manual_seed(client_generator_seed(int(config.get("seed", 0)), int(config["server-round"]), task.spec.partition_id))
    return compressor(x, generator=gen)


@app.train()
def train(msg: Message, context: Context) -> Message:
    return run_train(msg, context)


@app.query("identify")
def identify(msg: Message, context: Context) -> Message:
    """Tell the server this client's stable key (partition id), for reproducible sampling."""
    pid = context.node_config.get("partition-id")
    info = ConfigRecord({"partition-id": int(pid) if pid is not None else -1})
    return Message(content=RecordDict({"client": info}), reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Evaluate the dense model in the message on this client's share of the test set."""
    config = msg.content.config_records.get("config", ConfigRecord())
    task = _task(context, config)
    device = _device(config)
    arrays = msg.content.array_records["arrays"]
    w = task.layout.flatten(arrays)
    model = task.model_at(w, device)
    test = data_lib.load_dataset(task.spec.dataset)[1]
    pid, n = task.spec.partition_id, task.spec.num_partitions
    loss, acc = training.evaluate(model, test.images[pid::n], test.labels[pid::n], device=device)
    content = RecordDict(
        {"metrics": MetricRecord({"num-examples": int(test.labels[pid::n].numel()), "eval-loss": loss, "eval-acc": acc})}
    )
    return Message(content=content, reply_to=msg)


from fl_sparse.clients import ssgd_mv as _ssgd_mv  # noqa: E402,F401  registers train.vote/train.values
