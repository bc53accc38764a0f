"""The fl-sparse ServerApp: builds the strategy from the run config, evaluates centrally.

``flwr run .`` starts :data:`app`; ``fl-sparse simulate`` builds the same
:func:`run_server` with its own config. Per round it updates the progress
display (one self-updating line on a terminal, a plain line per round
otherwise; a line with the totals at the end).

The run folder (``out``): ``out/config.json`` is written when the run starts
(every :class:`RunConfig` setting, the model's parameter count, package
versions, the git commit, the device, the machine's CPU count, the start time:
:func:`run_metadata`); each round's row is appended to ``out/metrics.jsonl``
(one JSON object per line) and ``out/metrics.csv`` (the columns of
:data:`METRIC_COLUMNS`) as soon as the round ends, so a long run can be
watched and an interrupted one keeps its rounds; at the end the whole list
goes to ``out/metrics.json`` and the final global model to ``out/model.pt``
(a torch state_dict).

Checkpoint and resume: with ``out`` set, ``out/checkpoint.pt``
(:mod:`fl_sparse.checkpoint`) is written atomically every ``checkpoint_every``
rounds, at the last round and at an early stop (Ctrl-C via
:data:`stop_requested`, ``max_failed_rounds``), and the clients keep their
state in ``out/client-state`` (unless ``state_dir`` names a folder) instead of
a temporary folder. ``resume_config(DIR, rounds=T)`` (``fl-sparse simulate
--resume DIR --rounds T``; ``resume = "DIR"`` in the run config of ``flwr
run``) continues it: the saved settings, the strategy's state
(:meth:`~fl_sparse.strategies.SparseFedAvg.load_state_dict`), the metrics rows,
and the clients' state folder (its ``gen-<generation>`` sub-folder is found again
under the new Flower run id, as the checkpoint keeps the generation; clients are
matched to their new node ids by partition id) are taken over, and
``strategy.start(..., first_round=k+1)`` runs rounds k+1..T. Sampling,
tie-breaks and client randomness are seeded by (seed, round), so no RNG state
is saved and the run ends exactly where an uninterrupted T-round one would
(AdapTop-K's budget spans T: raising T re-plans the rounds left). A
checkpoint of another strategy, other settings, another model or another
format version is refused (:class:`~fl_sparse.checkpoint.CheckpointError`).
"""

from __future__ import annotations

import csv
import json
import logging
import math
import numbers
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import typing
from dataclasses import asdict, dataclass, fields, replace
from datetime import datetime, timezone
from logging import WARNING
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp

from fl_sparse import checkpoint
from fl_sparse.checkpoint import CheckpointError
from fl_sparse.clients.state import SPARE_MAX_BYTES
from fl_sparse.flat import FlatLayout
from fl_sparse.strategies import ADAPTIVE_NAMES, STRATEGY_NAMES, build_strategy
from fl_sparse.strategies.arguments import is_number

__all__ = [
    "RunConfig",
    "RUN_FILES",
    "check_new_run_folder",
    "MODEL_LR",
    "METRIC_COLUMNS",
    "MetricsLog",
    "RunFailed",
    "RunInterrupted",
    "CheckpointError",
    "stop_requested",
    "app",
    "preflight",
    "resume_config",
    "run_metadata",
    "run_server",
    "strategy_from_config",
    "write_metrics",
]


class RunFailed(RuntimeError):
    """A run that stopped because no client update was accepted (``str()`` is the summary line)."""


class RunInterrupted(RuntimeError):
    """A run stopped on request (Ctrl-C) after a round; its metrics and model were saved."""


# Set (e.g. by the CLI's SIGINT handler) to end a run after the round in progress.
stop_requested = threading.Event()

# The local SGD learning rate a model gets when ``lr`` is left unset (None).
# Measured with the default run (bidirectional top-K, 1 % both ways, 10 iid
# clients, H = 20, batch 32) on Fashion-MNIST, 5 rounds, test accuracy:
# cnn-fmnist 64 % at lr 0.1, 70 % at 0.05, 73 % at 0.02, 71 % at 0.01 (82 % after
# 20 rounds at 0.02; it diverged at 0.1 and 0.05 under the earlier defaults,
# H = 5 and batch 10); cnn-mnist 70 % at 0.1, 66 % at
# 0.05, 64 % at 0.02; mlp-784-256-128-64-10 64 % at 0.1, 44 % at 0.05. resnet18
# and vgg19 (CIFAR-10, not measured here) get usual values for plain SGD.
MODEL_LR: dict[str, float] = {
    "logreg-784-10": 0.1,
    "mlp-784-64-10": 0.1,
    "mlp-784-256-128-64-10": 0.1,
    "cnn-mnist": 0.1,
    "cnn-fmnist": 0.02,
    "resnet18": 0.05,
    "vgg19": 0.02,
}


@dataclass
class RunConfig:
    """Everything a run needs; field names match the CLI flags and pyproject run config."""

    strategy: str = "bidirectional-topk"
    dataset: str = "fashion-mnist"
    model: str = "mlp-784-64-10"
    clients: int = 10
    fraction: float = 1.0
    partition: str = "iid"
    alpha: float = 0.5
    min_partition_size: int | None = None  # Dirichlet: flwr-datasets' minimum; None: automatic
    self_balancing: bool = False  # Dirichlet: flwr-datasets' self-balancing
    rounds: int = 20
    local_steps: int = 20
    batch_size: int = 32
    lr: float | None = None  # None: the model's own (MODEL_LR)
    momentum: float = 0.0
    weight_decay: float = 0.0
    ratio: float = 0.01
    downlink_ratio: float | None = None
    threshold: float | None = None
    value_bits: int = 32
    add_drop_ratio: float = 0.001
    positions: str = "rice"
    error_feedback: bool = True
    error_memory_dtype: str = "float32"  # how clients store their error memory: float32 | float16 | bfloat16
    r_ratio: float | None = None
    t_hat: int | None = None  # AdapTop-K's turning point t̂ (0-based round); None: estimated after round 1
    seed: int = 0
    out: str | None = None
    diagnostics: bool = False
    eval_every: int = 1
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    state_dir: str | None = None
    ray_address: str | None = None  # join this Ray cluster (as $RAY_ADDRESS); None: $RAY_ADDRESS or a local Ray
    max_failed_rounds: int = 3
    checkpoint_every: int = 1
    resume: str | None = None
    quiet: bool = False

    def __post_init__(self) -> None:
        for folder in ("out", "state_dir", "resume"):  # a pathlib.Path is as good as its text
            value = getattr(self, folder)
            if isinstance(value, os.PathLike):
                setattr(self, folder, os.fspath(value))

    def validate(self) -> "RunConfig":
        for f in fields(self):
            problem = _type_problem(getattr(self, f.name), _FIELD_TYPES[f.name])
            if problem:
                raise ValueError(f"{f.name.replace('_', '-')} {problem}")
        for field in _NAMING_FIELDS:
            _refuse_blank(field, getattr(self, field))
        if self.strategy not in STRATEGY_NAMES:
            raise ValueError(f"unknown strategy {self.strategy!r}; choose one of {', '.join(STRATEGY_NAMES)}")
        from fl_sparse.tasks.data import DATASETS
        from fl_sparse.tasks.models import MODEL_NAMES

        if self.dataset not in DATASETS:
            raise ValueError(f"unknown dataset {self.dataset!r}; choose one of {', '.join(DATASETS)}")
        checks = [
            (self.clients >= 1, "clients must be >= 1"),
            # The seed travels in int64 fields (the clients' train config, the batch order's hash).
            (0 <= self.seed < 2**63, f"seed must be an integer in [0, 2**63), got {self.seed}"),
            (0.0 < self.fraction <= 1.0, "fraction must be in (0, 1]"),
            (self.rounds >= 1, "rounds must be >= 1"),
            (self.local_steps >= 1, "local-steps must be >= 1"),
            (self.batch_size >= 1, "batch-size must be >= 1"),
            (self.lr is None or (self.lr > 0 and math.isfinite(self.lr)), "lr must be a positive finite number"),
            (
                self.lr is not None or self.model in MODEL_LR,
                f"model {self.model!r} has no default learning rate; give lr"
                # Every built-in model has one: without it the name is most likely a typo.
                + ("" if self.model in MODEL_NAMES else f" (it is not a built-in model: {', '.join(MODEL_NAMES)})"),
            ),
            (math.isfinite(self.momentum) and 0.0 <= self.momentum < 1.0, "momentum must be in [0, 1)"),
            (math.isfinite(self.weight_decay) and self.weight_decay >= 0.0, "weight-decay must be a finite number >= 0"),
            (0.0 < self.ratio <= 1.0, "ratio must be in (0, 1]"),
            (self.downlink_ratio is None or 0.0 < self.downlink_ratio <= 1.0, "downlink-ratio must be in (0, 1]"),
            (self.min_partition_size is None or self.min_partition_size >= 0,
             "min-partition-size must be >= 0 (or unset: chosen automatically)"),
            (self.r_ratio is None or 0.0 < self.r_ratio <= 1.0, "r-ratio must be in (0, 1] (or unset for the paper's rule)"),
            (self.r_ratio is None or self.strategy == "rtopk", "r-ratio is rtopk's r/d; leave it unset for other strategies"),
            (self.t_hat is None or 0 <= self.t_hat <= self.rounds,
             "t-hat must be in [0, rounds] (or unset: estimated after round 1)"),
            (self.t_hat is None or self.strategy in ADAPTIVE_NAMES,
             "t-hat is adaptive-topk's turning point; leave it unset for other strategies"),
            (self.positions in ("raw", "block", "rice"), "positions must be raw, block or rice"),
            (self.error_memory_dtype in ("float32", "float16", "bfloat16"),
             "error-memory-dtype must be float32, float16 or bfloat16"),
            (math.isfinite(self.alpha) and self.alpha > 0, "alpha must be a finite number > 0"),
            (math.isfinite(self.add_drop_ratio) and 0.0 < self.add_drop_ratio <= 1.0, "add-drop-ratio must be in (0, 1]"),
            (self.partition in ("iid", "dirichlet", "shards"), "partition must be iid, dirichlet or shards"),
            (self.partition == "dirichlet" or (self.min_partition_size is None and not self.self_balancing),
             f"min-partition-size and self-balancing are options of the dirichlet partition; leave them unset for "
             f"{self.partition}"),
            (2 <= self.value_bits <= 16 or self.value_bits == 32, "value-bits must be 2..16 (q-bit values) or 32 (none)"),
            (
                self.threshold is None or (math.isfinite(self.threshold) and self.threshold >= 0),
                "threshold must be a finite number >= 0 (or unset for the paper's 1/(2 sqrt(k)))",
            ),
            (0.0 < self.num_cpus and math.isfinite(self.num_cpus), "num-cpus must be > 0"),
            (0.0 <= self.num_gpus and math.isfinite(self.num_gpus), "num-gpus must be >= 0"),
            (self.eval_every >= 1, "eval-every must be >= 1"),
            (self.max_failed_rounds >= 1, "max-failed-rounds must be >= 1"),
            (self.checkpoint_every >= 0, "checkpoint-every must be >= 0 (0: only at the end and at a stop)"),
            # An option the strategy would not use is refused, not ignored: the run would not be the one asked for.
            (self.downlink_ratio is None or self.strategy == "bidirectional-topk",
             "downlink-ratio is bidirectional-topk's downlink K; leave it unset for other strategies"),
            (self.threshold is None or self.strategy == "hard-threshold",
             "threshold is hard-threshold's lambda; leave it unset for other strategies"),
            (self.value_bits == 32 or self.strategy != "fedavg",
             "value-bits quantizes the sparse strategies' values; fedavg sends float32 (leave it at 32)"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        return self

    @property
    def effective_lr(self) -> float:
        """``lr``, or the model's default (:data:`MODEL_LR`) when it is unset."""
        if self.lr is not None:
            return float(self.lr)
        try:
            return MODEL_LR[self.model]
        except KeyError:
            raise ValueError(f"model {self.model!r} has no default learning rate; give lr") from None

    @classmethod
    def from_run_config(cls, run_config: dict[str, Any]) -> "RunConfig":
        """From Flower's run config (pyproject keys use dashes)."""
        known = {f.name: f for f in fields(cls)}
        values: dict[str, Any] = {}
        for key, value in run_config.items():
            name = key.replace("-", "_")
            if name == "num_rounds":
                name = "rounds"
            if name == "num_supernodes":
                name = "clients"
            if name not in known:
                raise ValueError(f"unknown run-config key {key!r}; known: {', '.join(sorted(k.replace('_', '-') for k in known))}")
            values[name] = value
        # pyproject cannot hold None: for these a number < 0 means unset (as the flag left out); for threshold
        # 0 means lambda = 0. Anything else that is not a number is left for validate() to name.
        for unset_below_zero in ("downlink_ratio", "threshold", "lr", "r_ratio", "min_partition_size", "t_hat"):
            value = values.get(unset_below_zero)
            if is_number(value) and value < 0:
                values[unset_below_zero] = None
        for optional in _NAMING_FIELDS:
            if values.get(optional) == "":
                values[optional] = None
        return cls(**values).validate()


_FIELD_TYPES = typing.get_type_hints(RunConfig)

# The RunConfig fields that name a folder or an address: unset is None (``""`` in a flwr run config).
_NAMING_FIELDS = {"out": "a folder", "state_dir": "a folder", "resume": "a folder", "ray_address": "an address"}


def _refuse_blank(field: str, value: str | None) -> None:
    """ValueError for an empty or blank name: most likely an unset shell variable (``--resume "$DIR"``),
    to which a new run, or no run folder at all, would be the wrong answer."""
    if value is not None and not value.strip():
        raise ValueError(f"{field.replace('_', '-')} must name {_NAMING_FIELDS[field]}, got {value!r} "
                         "(leave it out for none)")


def _type_problem(value: Any, hint: Any) -> str | None:
    """What is wrong with the type of ``value`` for a RunConfig field typed ``hint`` (None: nothing).

    A bool is not taken for an int or a float (True would be 1), nor anything else for a
    bool ("false" would be read as true); an int is a float.
    """
    args = typing.get_args(hint)
    optional = type(None) in args
    base = next((a for a in args if a is not type(None)), hint) if args else hint
    if value is None:
        return None if optional else "must be set (got None)"
    if base is bool:
        ok, kind = isinstance(value, bool), "true or false"
    elif base is int:
        ok, kind = isinstance(value, numbers.Integral) and not isinstance(value, bool), "an integer"
    elif base is float:
        ok, kind = is_number(value), "a number"
    else:
        ok, kind = isinstance(value, base), "a string" if base is str else base.__name__
    return None if ok else f"must be {kind}{' (or unset)' if optional else ''}, got {value!r}"


# ------------------------------------------------------------------ metrics
# The columns of metrics.csv, in order (README "Run folders and comparing runs"
# gives each one's unit). A row may hold more (``sync_modes``, SSGD-MV's
# ``q_loc_up`` ...): those go to metrics.jsonl and metrics.json only.
METRIC_COLUMNS = (
    "round",
    "test_accuracy",
    "test_loss",
    "train_loss",
    "uplink_bytes",
    "downlink_bytes",
    "downlink_update_bytes",
    "downlink_last_update_bytes",
    "downlink_catch_up_bytes",
    "downlink_first_contact_bytes",
    "cumulative_uplink_bytes",
    "cumulative_downlink_bytes",
    "density",
    "downlink_density",
    "client_error_norm",
    "server_error_norm",
    "cumulative_total_error",
    "rho",
    "rho_hat",
    "clients",
    "accepted",
    "failures",
    "round_seconds",
    "elapsed_seconds",
)


def _strict(value: Any) -> Any:
    """``value`` as strict JSON can hold it: non-finite floats become None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _strict(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_strict(v) for v in value]
    return value


def _json_line(row: dict[str, Any]) -> str:
    return json.dumps(_strict(row), allow_nan=False, default=str)


def _csv_value(value: Any) -> Any:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return ""
    return value


class MetricsLog:
    """Appends one row per round to ``out/metrics.jsonl`` and ``out/metrics.csv``.

    Creating it rewrites both files from ``rows`` (none for a new run; a
    resumed run's checkpoint rows), the CSV header included;
    :meth:`append` then adds one line to each and flushes it to the
    operating system, so a reader sees every finished round and nothing is
    rewritten. The CSV has the fixed columns :data:`METRIC_COLUMNS` (a value a
    row lacks is empty); every key of a row goes to the JSON line.
    """

    def __init__(self, out: str | Path, rows: list[dict[str, Any]] = ()) -> None:
        self.out = Path(out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.jsonl = self.out / "metrics.jsonl"
        self.csv = self.out / "metrics.csv"
        with open(self.jsonl, "w") as fh:
            fh.writelines(_json_line(r) + "\n" for r in rows)
        with open(self.csv, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=METRIC_COLUMNS, extrasaction="ignore")
            writer.writeheader()
            writer.writerows({k: _csv_value(v) for k, v in r.items()} for r in rows)

    def append(self, row: dict[str, Any]) -> None:
        line = _json_line(row)  # before opening anything: a row that cannot be written touches no file
        with open(self.jsonl, "a") as fh:
            fh.write(line + "\n")
        with open(self.csv, "a", newline="") as fh:
            csv.DictWriter(fh, fieldnames=METRIC_COLUMNS, extrasaction="ignore").writerow(
                {k: _csv_value(v) for k, v in row.items()}
            )


def _write_metrics_json(rows: list[dict[str, Any]], out: str | Path) -> None:
    out = Path(out)
    tmp = out / "metrics.json.tmp"
    tmp.write_text(json.dumps(_strict(rows), indent=1, allow_nan=False, default=str))
    tmp.replace(out / "metrics.json")


def write_metrics(rows: list[dict[str, Any]], out: str | Path) -> None:
    """All of ``rows`` at once: ``out/metrics.json`` (a list), ``out/metrics.jsonl`` and ``out/metrics.csv``."""
    MetricsLog(out, rows)
    _write_metrics_json(rows, out)


def add_cumulative_bytes(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Give every row ``cumulative_uplink_bytes`` / ``cumulative_downlink_bytes`` (running sums), in place.

    Rows that have them keep theirs; a row without them (an older run's), or
    with null there, continues from the row before it.
    """
    up = down = 0
    for r in rows:
        if r.get("cumulative_uplink_bytes") is None:
            r["cumulative_uplink_bytes"] = up + int(r.get("uplink_bytes") or 0)
        if r.get("cumulative_downlink_bytes") is None:
            r["cumulative_downlink_bytes"] = down + int(r.get("downlink_bytes") or 0)
        up, down = r["cumulative_uplink_bytes"], r["cumulative_downlink_bytes"]
    return rows


def _git_commit(directory: Path) -> str | None:
    """``git rev-parse HEAD`` of the checkout at ``directory`` (None: not a checkout, no git, too slow)."""
    if not (directory / ".git").exists():  # only the package's own checkout, not a repository it sits in
        return None
    try:
        done = subprocess.run(
            ["git", "-C", str(directory), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=3, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    commit = done.stdout.strip()
    return commit if done.returncode == 0 and len(commit) >= 40 else None


def _version(distribution: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def run_metadata(cfg: RunConfig, *, num_params: int, device: torch.device | str) -> dict[str, Any]:
    """What ``out/config.json`` holds: every setting of ``cfg`` and what the run ran on.

    Keys: every :class:`RunConfig` field (``lr`` as given: None means the
    model's default), then ``lr_used`` (the learning rate the clients use),
    ``num_params`` (d, the model's parameter count), ``clients_per_round``
    (how many clients are sampled each round), ``versions`` (fl_sparse, flwr,
    torch, flwr_datasets, python), ``git_commit`` (of the checkout the package
    runs from; None when it is not one), ``device`` ("cpu" or the CUDA
    device's name), ``cpu_count`` and ``started_at`` (ISO 8601, UTC).
    """
    import fl_sparse

    device = torch.device(device)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = str(device.type)
    return {
        **asdict(cfg),
        "lr_used": cfg.effective_lr,
        "num_params": int(num_params),
        "clients_per_round": min(max(int(cfg.clients * cfg.fraction), 1), cfg.clients),
        "versions": {
            "fl_sparse": getattr(fl_sparse, "__version__", None),
            "flwr": _version("flwr"),
            "torch": torch.__version__,
            "flwr_datasets": _version("flwr-datasets"),
            "python": platform.python_version(),
        },
        "git_commit": _git_commit(Path(fl_sparse.__file__).resolve().parent.parent),
        "device": name,
        "cpu_count": os.cpu_count(),
        "started_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def _write_config_json(out: str | Path, meta: dict[str, Any]) -> None:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    previous = out / "config.json"
    if meta.get("resume"):
        # A continued run: keep when the run first started, and list each resume.
        try:
            old = json.loads(previous.read_text())
            meta = {**meta, "started_at": old.get("started_at", meta["started_at"]),
                    "resumed_at": [*old.get("resumed_at", []), meta["started_at"]]}
        except (OSError, ValueError, AttributeError):
            pass
    tmp = out / "config.json.tmp"
    tmp.write_text(json.dumps(_strict(meta), indent=1, allow_nan=False, default=str) + "\n")
    tmp.replace(previous)


# ------------------------------------------------------------------ running
def _initial_model(cfg: RunConfig):
    from fl_sparse.tasks.builtin import _dataset_shape
    from fl_sparse.tasks.models import build_model

    return build_model(cfg.model, num_classes=10, seed=cfg.seed, **_dataset_shape(cfg.dataset))


def _train_config(cfg: RunConfig, *, local_clients: bool = False) -> ConfigRecord:
    """The built-in ClientApp's train config (:mod:`fl_sparse.clients.app`).

    With ``local_clients`` (this process's simulation runs every client) and
    ``cfg.num_gpus`` 0, it also says ``device='cpu'``: the clients reserved no
    GPU, so they must not train on one they can see. Otherwise each client
    picks its own device ("auto", or its node config's ``device``).
    """
    device = {"device": "cpu"} if local_clients and cfg.num_gpus == 0 else {}
    return ConfigRecord(
        {
            "dataset": cfg.dataset,
            "model": cfg.model,
            "partition": cfg.partition,
            "alpha": float(cfg.alpha),
            "min-partition-size": -1 if cfg.min_partition_size is None else int(cfg.min_partition_size),
            "self-balancing": bool(cfg.self_balancing),
            "num-partitions": int(cfg.clients),
            "seed": int(cfg.seed),
            "local-steps": int(cfg.local_steps),
            "batch-size": int(cfg.batch_size),
            "lr": float(cfg.effective_lr),
            "momentum": float(cfg.momentum),
            "weight-decay": float(cfg.weight_decay),
            **device,
        }
    )


SIMULATION_PULL_INTERVAL = 0.005  # seconds between the simulation Grid's polls for replies


def simulation_state_dir(numel: int, clients: int, shm: str = "/dev/shm") -> str:
    """A new temporary folder for the clients' state files; in RAM when there is room.

    Every client saves its state after every message: its error memory
    (``4 * numel`` bytes; SSGD-MV also keeps its ``a``, as much again, between
    its phases), a hard link to the model version it holds (one file per
    version for all clients: the model store), and a spare copy of the state
    file where it is at most :data:`fl_sparse.clients.state.SPARE_MAX_BYTES`;
    the estimate is ``8 * numel`` bytes per client plus the spare. On ``/dev/shm`` (tmpfs) creating
    and renaming those files costs a fraction of what it costs on a disk
    filesystem, which shows at MLP size where the save is a good part of a
    client's work. The folder goes there only if the states of all
    ``clients`` fit in a quarter of its free space: the rest is left to Ray's
    object store, which lives there too. Otherwise (ResNet-18 x 100 clients
    are estimated at ~9 GB) it goes to the system's temporary folder on disk.
    """
    error_bytes = 4 * int(numel)
    per_client = 2 * error_bytes + (error_bytes if error_bytes <= SPARE_MAX_BYTES else 0)
    need = per_client * int(clients) + 2**20
    try:
        if os.path.isdir(shm) and os.access(shm, os.W_OK) and shutil.disk_usage(shm).free >= 4 * need:
            return tempfile.mkdtemp(prefix="fl-sparse-state-", dir=shm)
    except OSError:
        pass
    return tempfile.mkdtemp(prefix="fl-sparse-state-")


def preflight(cfg: RunConfig, *, local_clients: bool = True) -> str:
    """Everything checkable before Flower or Ray start; raises ValueError naming the problem.

    Returns one line of partition-size statistics (printed at the start of a run).

    The settings themselves (:meth:`RunConfig.validate`), the model (built: it
    must take the dataset's images), the output and state
    folders (created and written to), the checkpoint a resumed run continues
    (readable, of this run, before the last round), the dataset (on disk), the data split (every
    partition non-empty) and, for a simulation on this machine (no Ray cluster
    to join: ``ray_address`` and ``$RAY_ADDRESS`` unset), the CPUs and GPUs
    asked for per client.
    """
    from fl_sparse.tasks.data import DatasetUnavailableError, load_dataset, partition_indices, partition_sizes_summary

    cfg.validate()
    flwr_logger = logging.getLogger("flwr")
    level = flwr_logger.level
    flwr_logger.setLevel(logging.ERROR)  # FedAvg's warnings about settings the run chose on purpose
    try:
        strategy = strategy_from_config(cfg)  # the strategy's own checks of its settings
    except ValueError as exc:
        raise ValueError(f"strategy {cfg.strategy}: {exc}") from None
    finally:
        flwr_logger.setLevel(level)
    # The model as the run builds it: a model that does not take the dataset's images (an MLP on
    # CIFAR-10) is named now, not by run_server once the simulation engine has started.
    _initial_model(cfg)
    if cfg.resume:
        ckpt = checkpoint.load(cfg.resume, mmap=True)
        _check_resumable(cfg, ckpt)
        try:  # what run_server does first, here before Ray starts: a damaged saved state is named now
            strategy.load_state_dict(ckpt.get("strategy"))
        except ValueError as exc:
            raise CheckpointError(f"cannot continue the run saved in {cfg.resume}: {exc}") from None
    check_new_run_folder(cfg)
    for what, folder in (("output folder", cfg.out), ("state folder", cfg.state_dir)):
        if not folder:
            continue
        try:
            Path(folder).mkdir(parents=True, exist_ok=True)
            probe = Path(folder) / ".fl-sparse-write-test"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            raise ValueError(f"{what} {folder!r} is not writable: {exc.strerror or exc}") from None
    try:
        train, _ = load_dataset(cfg.dataset)
    except DatasetUnavailableError as exc:
        raise ValueError(str(exc)) from None
    sizes = []
    for pid in range(cfg.clients):
        try:
            sizes.append(int(partition_indices(
                cfg.dataset, train.labels, cfg.partition, cfg.clients, pid, alpha=cfg.alpha, seed=cfg.seed,
                min_partition_size=cfg.min_partition_size, self_balancing=cfg.self_balancing,
            ).numel()))
        except Exception as exc:  # noqa: BLE001 - the partitioner's own words name the problem
            raise ValueError(f"cannot split {cfg.dataset} into {cfg.clients} {cfg.partition} partitions: {exc}") from None
    if min(sizes) == 0:
        raise ValueError(f"the {cfg.partition} split leaves partition {sizes.index(0)} empty; use fewer clients")
    summary = partition_sizes_summary(sizes, cfg.batch_size)
    # On a Ray cluster the clients run on its nodes, not (only) here: the simulation runner checks
    # their CPUs/GPUs once it has joined (fl_sparse.simulations.runner.check_cluster).
    if local_clients and not (cfg.ray_address or os.environ.get("RAY_ADDRESS")):
        cpus = os.cpu_count() or 1
        if cfg.num_cpus > cpus:
            raise ValueError(f"num-cpus {cfg.num_cpus:g} per client, but this machine has {cpus} CPUs")
        if cfg.num_gpus > 0:
            gpus = torch.cuda.device_count()
            if gpus == 0:
                raise ValueError(f"num-gpus {cfg.num_gpus:g} per client, but no CUDA GPU is visible")
            if cfg.num_gpus > gpus:
                raise ValueError(f"num-gpus {cfg.num_gpus:g} per client, but this machine has {gpus} GPUs")
    return summary


# ------------------------------------------------------------------ resume
# What a continued run may change; every other setting is the saved run's.
RESUME_OVERRIDES = ("rounds", "eval_every", "checkpoint_every", "max_failed_rounds", "num_cpus", "num_gpus", "quiet",
                    "ray_address")
# What a run continued by `flwr run` takes from its own run config: the flwr run's config always holds
# them (pyproject's defaults or --run-config), so the saved values cannot be told from a choice. The
# simulation's resources (num_cpus, num_gpus, ray_address) belong to `fl-sparse simulate`, not to flwr run.
FLWR_RUN_RESUME_KEYS = ("eval_every", "checkpoint_every", "max_failed_rounds", "quiet")
# Not compared when a run continues: how far and how it runs, not what it computes.
_NOT_COMPARED = set(RESUME_OVERRIDES) | {"out", "resume"}


def _saved_config(ckpt: dict[str, Any]) -> RunConfig:
    known = {f.name for f in fields(RunConfig)}
    try:
        return RunConfig(**{k: v for k, v in dict(ckpt["config"]).items() if k in known})
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"the checkpoint's run config is unreadable: {exc}") from None


def resume_config(directory: str | os.PathLike, **overrides: Any) -> RunConfig:
    """The :class:`RunConfig` that continues the run saved in ``directory`` (``fl-sparse simulate --resume``).

    The saved run's settings, with ``overrides`` of :data:`RESUME_OVERRIDES`
    only (``rounds``: the new last round T, which must be past the checkpoint's
    round). ``out`` and ``resume`` are ``directory``. Raises
    :class:`~fl_sparse.checkpoint.CheckpointError` (a ValueError) naming the problem.
    """
    try:
        _refuse_blank("resume", os.fspath(directory))  # before any file is looked for under that name
    except ValueError as exc:
        raise CheckpointError(str(exc)) from None
    bad = sorted(set(overrides) - set(RESUME_OVERRIDES))
    if bad:
        raise CheckpointError(
            f"a resumed run keeps the saved run's settings; {', '.join(b.replace('_', '-') for b in bad)} cannot change "
            f"(allowed: {', '.join(o.replace('_', '-') for o in RESUME_OVERRIDES)})"
        )
    ckpt = checkpoint.load(directory, mmap=True)
    # Where to run is not saved: a Ray cluster to join is given again (or $RAY_ADDRESS).
    cfg = replace(_saved_config(ckpt), **{"ray_address": None, **overrides}, out=str(directory), resume=str(directory))
    try:
        cfg.validate()
    except ValueError as exc:
        raise CheckpointError(str(exc)) from None
    _check_resumable(cfg, ckpt)
    return cfg


# What a run writes to its folder (any one of them: the folder holds a run).
RUN_FILES = ("config.json", checkpoint.CHECKPOINT, "metrics.jsonl", "metrics.json")


def check_new_run_folder(cfg: RunConfig) -> None:
    """A new run (not ``cfg.resume``) must not write over a run already in ``cfg.out``: ValueError.

    A new run rewrites config.json and the metrics, replaces the checkpoint and clears
    ``client-state``, so the run there could no longer be continued or compared.
    """
    if not cfg.out or cfg.resume:
        return
    held = [name for name in RUN_FILES if (Path(cfg.out) / name).exists()]
    if held:
        raise ValueError(
            f"output folder {cfg.out!r} already holds a run ({', '.join(held)}): continue it with resume "
            f"(fl-sparse simulate --resume {cfg.out}; under flwr run: --run-config \"resume='{cfg.out}'\"), "
            "or remove it or choose another output folder"
        )


def _differing_settings(a: RunConfig, b: RunConfig) -> list[str]:
    """The settings (RunConfig fields) in which ``a`` and ``b`` compute different runs."""
    return [f.name for f in fields(RunConfig) if f.name not in _NOT_COMPARED and getattr(a, f.name) != getattr(b, f.name)]


def _check_resumable(cfg: RunConfig, ckpt: dict[str, Any]) -> None:
    """``cfg`` continues the checkpoint's run: same settings (but :data:`RESUME_OVERRIDES`), a later last round."""
    saved = _saved_config(ckpt)
    differ = _differing_settings(cfg, saved)
    if differ:
        detail = ", ".join(f"{n.replace('_', '-')}: saved {getattr(saved, n)!r}, given {getattr(cfg, n)!r}" for n in differ)
        raise CheckpointError(f"the checkpoint in {cfg.resume} is of another run ({detail}); "
                              "use resume_config(DIR, rounds=T) / fl-sparse simulate --resume DIR --rounds T")
    if cfg.out is not None and Path(cfg.out).resolve() != Path(cfg.resume).resolve():
        raise CheckpointError(f"a resumed run writes to the folder it continues ({cfg.resume}), not {cfg.out}")
    done = int(ckpt["round"])
    if cfg.rounds <= done:
        raise CheckpointError(f"the checkpoint in {cfg.resume} is at round {done}; give rounds > {done} to continue it")


def strategy_from_config(cfg: RunConfig):
    """The strategy ``cfg.strategy`` names, configured from ``cfg``."""
    return build_strategy(
        cfg.strategy,
        ratio=cfg.ratio,
        downlink_ratio=cfg.downlink_ratio,
        threshold=cfg.threshold,
        num_rounds=cfg.rounds,
        value_bits=cfg.value_bits,
        add_drop_ratio=cfg.add_drop_ratio,
        positions=cfg.positions,
        lr=cfg.effective_lr,
        error_feedback=cfg.error_feedback,
        r_ratio=cfg.r_ratio,
        t_hat=cfg.t_hat,
        fraction_train=cfg.fraction,
        # Evaluation is central (evaluate_fn); every connected client may train.
        fraction_evaluate=0.0,
        min_train_nodes=1,
        min_evaluate_nodes=0,
        min_available_nodes=1,
        seed=cfg.seed,
        diagnostics=cfg.diagnostics,
        error_memory_dtype=cfg.error_memory_dtype,
    )


def run_server(grid: Grid, cfg: RunConfig, strategy=None, *, local_clients: bool = False,
               metadata: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Run ``cfg`` on ``grid``; returns (and writes, if ``cfg.out``) the per-round metrics.

    ``strategy`` overrides the one ``cfg.strategy`` names (e.g. your own
    :class:`~fl_sparse.strategies.SparseFedAvg` subclass). ``local_clients``
    says every client runs in this process's simulation engine: the temporary
    state folder may then go to RAM (:func:`simulation_state_dir`), the
    Grid polls for replies every :data:`SIMULATION_PULL_INTERVAL` seconds and,
    with ``cfg.num_gpus`` 0, the clients are told to train on the CPU.
    ``metadata`` adds keys to ``out/config.json`` (the simulation runner's
    ``ray_cluster``: the cluster it joined).

    With ``cfg.out`` the run is checkpointed (:mod:`fl_sparse.checkpoint`)
    every ``cfg.checkpoint_every`` rounds, at its last round and when it stops
    early, and the clients keep their state in ``out/client-state`` (unless
    ``cfg.state_dir`` names a folder). With ``cfg.resume`` (see
    :func:`resume_config`) it continues the run saved there: the strategy's
    state, the metrics rows and the clients' state folder are taken over and
    rounds ``k+1 .. cfg.rounds`` run, ending exactly where an uninterrupted
    run would (sampling and every random draw are seeded by seed and round).
    """
    from fl_sparse.tasks.builtin import test_split
    from fl_sparse.tasks.training import evaluate

    cfg.validate()
    ckpt = None
    if cfg.resume:
        if cfg.out is None:
            cfg = replace(cfg, out=cfg.resume)
        ckpt = checkpoint.load(cfg.resume)
        _check_resumable(cfg, ckpt)
    if local_clients and hasattr(grid, "pull_interval"):
        # The in-process simulation's Grid polls an in-memory store for replies,
        # by default every 0.1 s: up to 0.1 s lost per round, when a 100-client
        # MLP round takes about 0.3 s. Polling that store is cheap.
        grid.pull_interval = SIMULATION_PULL_INTERVAL
    torch.manual_seed(cfg.seed)
    model = _initial_model(cfg)
    initial = ArrayRecord(model.state_dict())
    layout = FlatLayout.from_arrayrecord(initial)
    strategy = strategy or strategy_from_config(cfg)
    first_round = 1
    rows: list[dict[str, Any]] = []
    if ckpt is not None:
        try:
            strategy.load_state_dict(ckpt["strategy"])
        except ValueError as exc:
            raise CheckpointError(f"cannot continue the run saved in {cfg.resume}: {exc}") from None
        built = FlatLayout.from_arrayrecord(initial, exact=getattr(strategy, "exact_patterns", ()))
        if strategy.state.layout.to_json() != built.to_json():
            raise CheckpointError(
                f"the checkpoint in {cfg.resume} holds another model than {cfg.model!r} as built now, or other "
                "arrays sent exactly (BatchNorm's running statistics are sent exactly by default since 2026-11-27: "
                "exact_running_stats)"
            )
        initial = strategy.current_arrays()
        first_round = int(ckpt["round"]) + 1
        rows = add_cumulative_bytes([dict(r) for r in ckpt["rows"]])
    test = test_split(cfg.dataset)
    device = torch.device("cuda" if torch.cuda.is_available() and cfg.num_gpus > 0 else "cpu")
    metrics_log = None
    if cfg.out:
        _write_config_json(cfg.out, {**run_metadata(cfg, num_params=layout.numel, device=device), **(metadata or {})})
        metrics_log = MetricsLog(cfg.out, rows)  # a resumed run's files start again from the checkpoint's rows
    # Running sums and the wall clock go on from the rows a resumed run continues.
    cumulative_up = int(rows[-1]["cumulative_uplink_bytes"]) if rows else 0
    cumulative_down = int(rows[-1]["cumulative_downlink_bytes"]) if rows else 0
    elapsed_before = float(rows[-1].get("elapsed_seconds") or 0.0) if rows else 0.0
    started = time.perf_counter()
    failed_in_a_row = 0
    for r in reversed(rows):  # a continued run counts the saved run's failed rounds at its end
        if r.get("accepted"):
            break
        failed_in_a_row += 1

    own_state_dir = cfg.state_dir is None and not cfg.out
    if cfg.state_dir:
        state_dir = cfg.state_dir
    elif cfg.out:
        # Persistent, beside the checkpoint: a resumed run's clients find their error memory there.
        state_dir = str(Path(cfg.out) / "client-state")
        if ckpt is None:
            shutil.rmtree(state_dir, ignore_errors=True)  # a new run: the last run's client states are of no use
        Path(state_dir).mkdir(parents=True, exist_ok=True)
    elif local_clients:
        state_dir = simulation_state_dir(layout.numel, cfg.clients)
    else:
        state_dir = tempfile.mkdtemp(prefix="fl-sparse-state-")
    strategy.client_state_dir = state_dir
    # Only a folder the user named is fsynced per save (it may have to survive a power loss);
    # out/client-state is written atomically, and a torn file there costs that client a dense sync and its
    # error memory (it starts empty).
    strategy.client_state_fsync = bool(cfg.state_dir)
    # Where the clients' files are, as the checkpoint records it: beside the checkpoint
    # (the run folder may have been moved or copied since), or in the user's state dir.
    saved_state_dir = None if cfg.state_dir else "out/client-state"
    if ckpt is not None and (checkpoint.was_running(cfg.out) or ckpt.get("client_state_dir") != saved_state_dir):
        # The clients may have gone past the checkpoint (the process died after it), or
        # keep their state elsewhere now: start each one from the dense model. Otherwise
        # they find their state by the strategy's generation, which the checkpoint keeps
        # (clients.mod.state_folder_name), under any new Flower run id.
        strategy.resync_clients()
    if cfg.out:
        checkpoint.mark_running(cfg.out)

    def save_checkpoint(server_round: int) -> None:
        checkpoint.save(
            cfg.out,
            {
                "round": server_round,
                "config": asdict(cfg),
                "rows": rows,
                "strategy": strategy.state_dict(),
                "client_state_dir": saved_state_dir,
            },
        )

    def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        nonlocal failed_in_a_row, cumulative_up, cumulative_down
        if server_round < first_round:  # the starting model (round 0, or the checkpoint's round)
            return None
        row = dict(strategy.state.round_metrics.get(server_round, {"round": server_round}))
        failed_in_a_row = failed_in_a_row + 1 if not row.get("accepted") else 0
        if server_round % cfg.eval_every == 0 or server_round == cfg.rounds:
            model.load_state_dict(layout.to_state_dict(layout.flatten(arrays)), strict=True)
            loss, acc = evaluate(model, test.images, test.labels, device=device)
            row["test_loss"], row["test_accuracy"] = float(loss), float(acc)
        cumulative_up += int(row.get("uplink_bytes") or 0)
        cumulative_down += int(row.get("downlink_bytes") or 0)
        row["cumulative_uplink_bytes"], row["cumulative_downlink_bytes"] = cumulative_up, cumulative_down
        row["elapsed_seconds"] = elapsed_before + (time.perf_counter() - started)
        rows.append(row)
        stop = None
        if server_round < cfg.rounds:
            if stop_requested.is_set():
                stop = "interrupted"
            elif failed_in_a_row >= cfg.max_failed_rounds:
                stop = f"{failed_in_a_row} rounds in a row accepted no client update"
        last = stop is not None or server_round == cfg.rounds
        if metrics_log is not None:
            metrics_log.append(row)
        if cfg.out:
            if last or (cfg.checkpoint_every and server_round % cfg.checkpoint_every == 0):
                save_checkpoint(server_round)
            if last:
                checkpoint.clear_running(cfg.out)
        if progress is not None:
            progress.update(row)
        if stop is not None:
            raise _Stop(stop)
        keep = {k: v for k, v in row.items() if k in ("test_loss", "test_accuracy")}
        return MetricRecord(keep) if keep else None

    stopped = None
    progress = None if cfg.quiet else _Progress(cfg.rounds, first_round)
    try:
        strategy.start(
            grid=grid,
            initial_arrays=initial,
            num_rounds=cfg.rounds,
            train_config=_train_config(cfg, local_clients=local_clients),
            evaluate_fn=evaluate_fn,
            first_round=first_round,
        )
    except _Stop as exc:
        stopped = str(exc)
    finally:
        if progress is not None:
            progress.close(rows)
        if own_state_dir:
            shutil.rmtree(state_dir, ignore_errors=True)
        if cfg.out:
            _write_metrics_json(rows, cfg.out)
            if strategy.state.model is not None:
                _save_model(strategy.current_arrays(), cfg.out)
    accepted = sum(int(r.get("accepted") or 0) for r in rows)
    if stopped == "interrupted":
        raise RunInterrupted(f"interrupted after round {len(rows)} of {cfg.rounds}")
    if stopped or accepted == 0:
        first = getattr(strategy, "first_error", None) or "no reply arrived"
        why = stopped or f"no client update was accepted in {len(rows)} rounds"
        raise RunFailed(f"run stopped after round {len(rows)}: {why}; first client error: {first}")
    return rows


class _Stop(Exception):
    """Raised from the per-round callback to end Flower's round loop early."""


def _save_model(arrays: ArrayRecord, out: str | Path) -> None:
    """``out/model.pt``: the global model as a torch state_dict, every array (exact ones too), atomically.

    From the strategy's record, not from the initial model's layout: that one
    holds the integer arrays (BatchNorm's ``num_batches_tracked``) of round 0
    and puts a strategy's exact float arrays in the flat vector.
    """
    out = Path(out)
    tmp = out / "model.pt.tmp"
    torch.save(dict(arrays.to_torch_state_dict()), tmp)
    tmp.replace(out / "model.pt")


def _mb(num_bytes: float) -> str:
    return f"{num_bytes / 1e6:,.2f} MB"


def _accuracy(row: dict[str, Any]) -> float | None:
    acc = row.get("test_accuracy")
    return float(acc) if isinstance(acc, (int, float)) and math.isfinite(acc) else None


def _stderr_is_terminal(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


class _Progress:
    """The progress display: one self-updating line on a terminal, a plain line per round otherwise.

    Each update shows round r/T, the test accuracy (of the last evaluated
    round), the round's train loss, the cumulative uplink and downlink MB,
    seconds per round (over the rounds this process ran) and the time left.
    :meth:`close` ends the live line and prints the totals: rounds, final and
    best test accuracy, total uplink and downlink MB and wall time.
    On a terminal (or with ``console``, a :class:`rich.console.Console`) the
    line is a :class:`rich.live.Live` display refreshed once per round.
    """

    WIDTH = 20

    def __init__(self, total: int, first_round: int = 1, *, stream=None, console=None) -> None:
        self.total, self.first_round = int(total), int(first_round)
        self.stream = stream if stream is not None else sys.stderr
        self.started = time.perf_counter()
        self.first_done: float | None = None  # when the first round of this process ended
        self.last_accuracy: float | None = None
        self.live = None
        if console is None and _stderr_is_terminal(self.stream):
            from rich.console import Console

            console = Console(file=self.stream, highlight=False)
        if console is not None:
            from rich.live import Live

            self.console = console
            # Refreshed only on update: between rounds nothing redraws over other output.
            self.live = Live(console=console, auto_refresh=False, transient=False,
                             redirect_stdout=False, redirect_stderr=False)
            self.live.start()

    def _fields(self, row: dict[str, Any]) -> dict[str, str]:
        r = int(row["round"])
        acc = _accuracy(row)
        if acc is not None:
            self.last_accuracy = acc
        now = time.perf_counter()
        if self.first_done is None or r <= self.first_round:
            # The first round also pays for starting the clients: from the second on it is left out.
            self.first_done = now
            per_round = now - self.started
        else:
            per_round = (now - self.first_done) / (r - self.first_round)
        eta = per_round * max(0, self.total - r)
        done = int(self.WIDTH * min(r, self.total) / self.total)
        loss = row.get("train_loss")
        return {
            "bar": f"[{'#' * done}{'.' * (self.WIDTH - done)}]",
            "round": f"round {r}/{self.total}",
            "acc": f"acc {self.last_accuracy:6.2%}" if self.last_accuracy is not None else "acc    -  ",
            "loss": f"loss {loss:.4f}" if isinstance(loss, (int, float)) else "loss    -  ",
            "bytes": f"up {_mb(row.get('cumulative_uplink_bytes', 0))}  down {_mb(row.get('cumulative_downlink_bytes', 0))}",
            "speed": f"{per_round:.2f} s/round",
            "eta": f"ETA {eta:,.0f} s",
        }

    def line(self, row: dict[str, Any]) -> str:
        """The plain progress line of ``row``."""
        f = self._fields(row)
        return f"{f['bar']} {f['round']}  {f['acc']}  {f['loss']}  {f['bytes']}  {f['speed']}  {f['eta']}"

    def terminal_line(self, row: dict[str, Any], width: int) -> str:
        """The live line: what matters most first (it is cut at the terminal's width), the bar if there is room."""
        f = self._fields(row)
        text = f"{f['round']}  {f['eta']}  {f['acc']}  {f['loss']}  {f['bytes']}  {f['speed']}"
        return f"{f['bar']} {text}" if len(text) + self.WIDTH + 3 <= width else text

    def update(self, row: dict[str, Any]) -> None:
        if self.live is not None:
            from rich.text import Text

            text = self.terminal_line(row, self.console.width)
            self.live.update(Text(text, no_wrap=True, overflow="ellipsis"), refresh=True)
        else:
            print(self.line(row), file=self.stream, flush=True)

    @staticmethod
    def totals(rows: list[dict[str, Any]]) -> str:
        accs = [a for a in map(_accuracy, rows) if a is not None]
        last = rows[-1]
        acc_s = f"final test accuracy {accs[-1]:.2%}, best {max(accs):.2%}" if accs else "no test accuracy"
        return (
            f"{len(rows)} rounds: {acc_s}; uplink {_mb(last.get('cumulative_uplink_bytes', 0))}, "
            f"downlink {_mb(last.get('cumulative_downlink_bytes', 0))} in total; "
            f"wall time {float(last.get('elapsed_seconds') or 0.0):,.1f} s"
        )

    def close(self, rows: list[dict[str, Any]]) -> None:
        """End the live line (if any) and print the totals of ``rows`` (nothing if there are none)."""
        if self.live is not None:
            self.live.stop()
            self.live = None
            if rows:
                self.console.print(self.totals(rows), highlight=False, markup=False, soft_wrap=True)
        elif rows:
            print(self.totals(rows), file=self.stream, flush=True)


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Entry point for ``flwr run .``: the run config comes from pyproject / --run-config.

    ``resume = "<dir>"`` continues the run checkpointed in ``<dir>`` with its
    saved settings, to ``num-rounds`` if that is later than the saved run's
    last round (see :func:`resume_config`). How this run goes on
    (:data:`FLWR_RUN_RESUME_KEYS`: ``eval-every``, ``checkpoint-every``,
    ``max-failed-rounds``, ``quiet``) is this run's config, as for any run.
    """
    cfg = RunConfig.from_run_config(dict(context.run_config))
    if cfg.resume:
        # Continue the run saved there, to num-rounds or to the saved run's last round, whichever is later.
        saved = _saved_config(checkpoint.load(cfg.resume, mmap=True))
        how = {name: getattr(cfg, name) for name in FLWR_RUN_RESUME_KEYS}
        given = cfg
        cfg = resume_config(cfg.resume, rounds=max(cfg.rounds, saved.rounds), **how)
        # This run config always holds every key (pyproject's defaults at least), so a value that
        # differs from the saved run's is said, not refused: the saved run's settings are used.
        differ = _differing_settings(given, cfg)
        if differ:
            log(WARNING, "resume %s: the saved run's settings are used, not this run config's %s",
                cfg.resume, ", ".join(f"{n.replace('_', '-')}={getattr(given, n)!r} (saved {getattr(cfg, n)!r})"
                                      for n in differ))
    check_new_run_folder(cfg)
    run_server(grid, cfg)
