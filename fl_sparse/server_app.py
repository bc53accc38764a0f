"""The fl-sparse ServerApp: builds the strategy from the run config, evaluates centrally.

``flwr run .`` starts :data:`app`; ``fl-sparse simulate`` builds the same
:func:`run_server` with its own config. Per round it prints one progress line
and, when ``out`` is set, rewrites ``out/metrics.json`` and ``out/metrics.csv``
(so a long run can be watched and an interrupted one keeps its rounds); at the
end it saves the final global model as ``out/model.pt`` (a torch state_dict).

Checkpoint and resume: with ``out`` set, ``out/checkpoint.pt``
(:mod:`fl_sparse.checkpoint`) is written atomically every ``checkpoint_every``
rounds, at the last round and at an early stop (Ctrl-C via
:data:`stop_requested`, ``max_failed_rounds``), and the clients keep their
state in ``out/client-state`` (unless ``state_dir`` names a folder) instead of
a temporary folder. ``resume_config(DIR, rounds=T)`` (``fl-sparse simulate
--resume DIR --rounds T``; ``resume = "DIR"`` in the run config of ``flwr
run``) continues it: the saved settings, the strategy's state
(:meth:`~fl_sparse.strategies.SparseFedAvg.load_state_dict`), the metrics rows,
and the clients' state folder (renamed to the new Flower run id; clients are
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
import math
import os
import shutil
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp

from fl_sparse import checkpoint
from fl_sparse.checkpoint import CheckpointError
from fl_sparse.flat import FlatLayout
from fl_sparse.strategies import STRATEGY_NAMES, build_strategy

__all__ = [
    "RunConfig",
    "RunFailed",
    "RunInterrupted",
    "CheckpointError",
    "stop_requested",
    "app",
    "preflight",
    "resume_config",
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
    rounds: int = 20
    local_steps: int = 5
    batch_size: int = 10
    lr: float = 0.05
    momentum: float = 0.0
    weight_decay: float = 0.0
    ratio: float = 0.01
    downlink_ratio: float | None = None
    threshold: float | None = None
    value_bits: int = 32
    add_drop_ratio: float = 0.001
    positions: str = "raw"
    seed: int = 0
    out: str | None = None
    diagnostics: bool = False
    eval_every: int = 1
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    state_dir: str | None = None
    max_failed_rounds: int = 3
    checkpoint_every: int = 1
    resume: str | None = None
    quiet: bool = False

    def validate(self) -> "RunConfig":
        if self.strategy not in STRATEGY_NAMES:
            raise ValueError(f"unknown strategy {self.strategy!r}; choose one of {', '.join(STRATEGY_NAMES)}")
        checks = [
            (self.clients >= 1, "clients must be >= 1"),
            (0.0 < self.fraction <= 1.0, "fraction must be in (0, 1]"),
            (self.rounds >= 1, "rounds must be >= 1"),
            (self.local_steps >= 1, "local-steps must be >= 1"),
            (self.batch_size >= 1, "batch-size must be >= 1"),
            (self.lr > 0 and math.isfinite(self.lr), "lr must be a positive finite number"),
            (0.0 < self.ratio <= 1.0, "ratio must be in (0, 1]"),
            (self.downlink_ratio is None or 0.0 < self.downlink_ratio <= 1.0, "downlink-ratio must be in (0, 1]"),
            (self.alpha > 0, "alpha must be > 0"),
            (self.partition in ("iid", "dirichlet", "shards"), "partition must be iid, dirichlet or shards"),
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
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        return self

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
        if values.get("downlink_ratio") is not None and float(values["downlink_ratio"]) < 0:
            values["downlink_ratio"] = None
        if values.get("threshold") is not None and float(values["threshold"]) < 0:
            values["threshold"] = None  # pyproject's "unset" (as --threshold left out); 0 means lambda = 0
        for optional in ("out", "state_dir", "resume"):
            if values.get(optional) == "":
                values[optional] = None
        return cls(**values).validate()


# ------------------------------------------------------------------ metrics
METRIC_COLUMNS = (
    "round",
    "test_accuracy",
    "test_loss",
    "train_loss",
    "uplink_bytes",
    "downlink_bytes",
    "downlink_update_bytes",
    "density",
    "downlink_density",
    "client_error_norm",
    "server_error_norm",
    "cumulative_total_error",
    "rho",
    "rho_hat",
    "accepted",
    "failures",
    "round_seconds",
)


def write_metrics(rows: list[dict[str, Any]], out: str | Path) -> None:
    """``out/metrics.json`` (a list, one object per round) and ``out/metrics.csv``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "metrics.json.tmp"
    tmp.write_text(json.dumps(rows, indent=1, default=_jsonable))
    tmp.replace(out / "metrics.json")
    columns = list(METRIC_COLUMNS) + sorted({k for r in rows for k in r} - set(METRIC_COLUMNS))
    with open(out / "metrics.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        for r in rows:
            writer.writerow({k: (json.dumps(v) if isinstance(v, dict) else v) for k, v in r.items()})


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return str(value)


# ------------------------------------------------------------------ running
def _initial_model(cfg: RunConfig):
    from fl_sparse.tasks.builtin import _dataset_shape
    from fl_sparse.tasks.models import build_model

    return build_model(cfg.model, num_classes=10, seed=cfg.seed, **_dataset_shape(cfg.dataset))


def _train_config(cfg: RunConfig) -> ConfigRecord:
    """The built-in ClientApp's train config (:mod:`fl_sparse.clients.app`)."""
    return ConfigRecord(
        {
            "dataset": cfg.dataset,
            "model": cfg.model,
            "partition": cfg.partition,
            "alpha": float(cfg.alpha),
            "num-partitions": int(cfg.clients),
            "seed": int(cfg.seed),
            "local-steps": int(cfg.local_steps),
            "batch-size": int(cfg.batch_size),
            "lr": float(cfg.lr),
            "momentum": float(cfg.momentum),
            "weight-decay": float(cfg.weight_decay),
        }
    )


SIMULATION_PULL_INTERVAL = 0.005  # seconds between the simulation Grid's polls for replies


def simulation_state_dir(numel: int, clients: int, shm: str = "/dev/shm") -> str:
    """A new temporary folder for the clients' state files; in RAM when there is room.

    Every client saves its state (model copy and error memory: about
    ``8 * numel`` bytes) after every message. On ``/dev/shm`` (tmpfs) creating
    and renaming those files costs a fraction of what it costs on a disk
    filesystem, which shows at MLP size where the save is a good part of a
    client's work. The folder goes there only if the states of all
    ``clients`` fit in a quarter of its free space: the rest is left to Ray's
    object store, which lives there too. Otherwise (ResNet-18 x 100 clients
    needs ~9 GB) it goes to the system's temporary folder on disk.
    """
    need = 8 * int(numel) * int(clients) + 2**20
    try:
        if os.path.isdir(shm) and os.access(shm, os.W_OK) and shutil.disk_usage(shm).free >= 4 * need:
            return tempfile.mkdtemp(prefix="fl-sparse-state-", dir=shm)
    except OSError:
        pass
    return tempfile.mkdtemp(prefix="fl-sparse-state-")


def preflight(cfg: RunConfig, *, local_clients: bool = True) -> None:
    """Everything checkable before Flower or Ray start; raises ValueError naming the problem.

    The settings themselves (:meth:`RunConfig.validate`), the output folder
    (created and written to), the checkpoint a resumed run continues
    (readable, of this run, before the last round), the dataset (on disk), the data split (every
    partition non-empty) and, for a simulation on this machine, the CPUs and
    GPUs asked for per client.
    """
    from fl_sparse.tasks.data import DatasetUnavailableError, load_dataset, partition_indices

    cfg.validate()
    if cfg.resume:
        _check_resumable(cfg, checkpoint.load(cfg.resume, mmap=True))
    if cfg.out:
        out = Path(cfg.out)
        try:
            out.mkdir(parents=True, exist_ok=True)
            probe = out / ".fl-sparse-write-test"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            raise ValueError(f"output folder {cfg.out!r} is not writable: {exc.strerror or exc}") from None
    try:
        train, _ = load_dataset(cfg.dataset)
    except DatasetUnavailableError as exc:
        raise ValueError(str(exc)) from None
    sizes = []
    for pid in range(cfg.clients):
        try:
            sizes.append(int(partition_indices(cfg.dataset, train.labels, cfg.partition, cfg.clients, pid,
                                               alpha=cfg.alpha, seed=cfg.seed).numel()))
        except Exception as exc:  # noqa: BLE001 - the partitioner's own words name the problem
            raise ValueError(f"cannot split {cfg.dataset} into {cfg.clients} {cfg.partition} partitions: {exc}") from None
    if min(sizes) == 0:
        raise ValueError(f"the {cfg.partition} split leaves partition {sizes.index(0)} empty; use fewer clients")
    if local_clients:
        cpus = os.cpu_count() or 1
        if cfg.num_cpus > cpus:
            raise ValueError(f"num-cpus {cfg.num_cpus:g} per client, but this machine has {cpus} CPUs")
        if cfg.num_gpus > 0:
            gpus = torch.cuda.device_count()
            if gpus == 0:
                raise ValueError(f"num-gpus {cfg.num_gpus:g} per client, but no CUDA GPU is visible")
            if cfg.num_gpus > gpus:
                raise ValueError(f"num-gpus {cfg.num_gpus:g} per client, but this machine has {gpus} GPUs")


# ------------------------------------------------------------------ resume
# What a continued run may change; every other setting is the saved run's.
RESUME_OVERRIDES = ("rounds", "eval_every", "checkpoint_every", "max_failed_rounds", "num_cpus", "num_gpus", "quiet")
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
    bad = sorted(set(overrides) - set(RESUME_OVERRIDES))
    if bad:
        raise CheckpointError(
            f"a resumed run keeps the saved run's settings; {', '.join(b.replace('_', '-') for b in bad)} cannot change "
            f"(allowed: {', '.join(o.replace('_', '-') for o in RESUME_OVERRIDES)})"
        )
    ckpt = checkpoint.load(directory, mmap=True)
    cfg = replace(_saved_config(ckpt), **overrides, out=str(directory), resume=str(directory))
    try:
        cfg.validate()
    except ValueError as exc:
        raise CheckpointError(str(exc)) from None
    _check_resumable(cfg, ckpt)
    return cfg


def _check_resumable(cfg: RunConfig, ckpt: dict[str, Any]) -> None:
    """``cfg`` continues the checkpoint's run: same settings (but :data:`RESUME_OVERRIDES`), a later last round."""
    saved = _saved_config(ckpt)
    differ = [f.name for f in fields(RunConfig) if f.name not in _NOT_COMPARED and getattr(cfg, f.name) != getattr(saved, f.name)]
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
        lr=cfg.lr,
        fraction_train=cfg.fraction,
        # Evaluation is central (evaluate_fn); every connected client may train.
        fraction_evaluate=0.0,
        min_train_nodes=1,
        min_evaluate_nodes=0,
        min_available_nodes=1,
        seed=cfg.seed,
        diagnostics=cfg.diagnostics,
    )


def run_server(grid: Grid, cfg: RunConfig, strategy=None, *, local_clients: bool = False) -> list[dict[str, Any]]:
    """Run ``cfg`` on ``grid``; returns (and writes, if ``cfg.out``) the per-round metrics.

    ``strategy`` overrides the one ``cfg.strategy`` names (e.g. your own
    :class:`~fl_sparse.strategies.SparseFedAvg` subclass). ``local_clients``
    says every client runs in this process's simulation engine: the temporary
    state folder may then go to RAM (:func:`simulation_state_dir`) and the
    Grid polls for replies every :data:`SIMULATION_PULL_INTERVAL` seconds.

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
        built = FlatLayout.from_arrayrecord(initial, exact=getattr(strategy, "exact_arrays", ()))
        if strategy.state.layout.to_json() != built.to_json():
            raise CheckpointError(f"the checkpoint in {cfg.resume} holds another model than {cfg.model!r} as built now")
        initial = strategy.current_arrays()
        first_round = int(ckpt["round"]) + 1
        rows = [dict(r) for r in ckpt["rows"]]
    test = test_split(cfg.dataset)
    device = torch.device("cuda" if torch.cuda.is_available() and cfg.num_gpus > 0 else "cpu")
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
    # out/client-state is written atomically, and a torn file there only costs that client a dense sync.
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
        nonlocal failed_in_a_row
        if server_round < first_round:  # the starting model (round 0, or the checkpoint's round)
            return None
        row = dict(strategy.state.round_metrics.get(server_round, {"round": server_round}))
        failed_in_a_row = failed_in_a_row + 1 if not row.get("accepted") else 0
        if server_round % cfg.eval_every == 0 or server_round == cfg.rounds:
            model.load_state_dict(layout.to_state_dict(layout.flatten(arrays)), strict=True)
            loss, acc = evaluate(model, test.images, test.labels, device=device)
            row["test_loss"], row["test_accuracy"] = float(loss), float(acc)
        rows.append(row)
        stop = None
        if server_round < cfg.rounds:
            if stop_requested.is_set():
                stop = "interrupted"
            elif failed_in_a_row >= cfg.max_failed_rounds:
                stop = f"{failed_in_a_row} rounds in a row accepted no client update"
        last = stop is not None or server_round == cfg.rounds
        if cfg.out:
            write_metrics(rows, cfg.out)
            if last or (cfg.checkpoint_every and server_round % cfg.checkpoint_every == 0):
                save_checkpoint(server_round)
            if last:
                checkpoint.clear_running(cfg.out)
        if not cfg.quiet:
            _progress(row, cfg.rounds, time.perf_counter() - started)
        if stop is not None:
            raise _Stop(stop)
        keep = {k: v for k, v in row.items() if k in ("test_loss", "test_accuracy")}
        return MetricRecord(keep) if keep else None

    stopped = None
    try:
        strategy.start(
            grid=grid,
            initial_arrays=initial,
            num_rounds=cfg.rounds,
            train_config=_train_config(cfg),
            evaluate_fn=evaluate_fn,
            first_round=first_round,
        )
    except _Stop as exc:
        stopped = str(exc)
    finally:
        if own_state_dir:
            shutil.rmtree(state_dir, ignore_errors=True)
        if cfg.out and strategy.state.model is not None:
            final = layout.to_state_dict(strategy.state.model.clone())
            torch.save(dict(final), Path(cfg.out) / "model.pt")
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


def _progress(row: dict[str, Any], total: int, elapsed: float) -> None:
    r = int(row["round"])
    width = 20
    done = int(width * r / total)
    per_round = float(row.get("round_seconds", elapsed / r))
    eta = per_round * (total - r)
    acc = row.get("test_accuracy")
    acc_s = f"acc {acc:6.2%}" if isinstance(acc, float) else "acc   -   "
    print(
        f"[{'#' * done}{'.' * (width - done)}] round {r}/{total}  {acc_s}  "
        f"loss {row.get('train_loss', float('nan')):.4f}  "
        f"up {row.get('uplink_bytes', 0) / 1e3:,.1f} kB  down {row.get('downlink_bytes', 0) / 1e3:,.1f} kB  "
        f"{per_round:.2f} s/round  elapsed {elapsed:,.0f} s  ETA {eta:,.0f} s",
        file=sys.stderr,
        flush=True,
    )


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Entry point for ``flwr run .``: the run config comes from pyproject / --run-config.

    ``resume = "<dir>"`` continues the run checkpointed in ``<dir>`` with its
    saved settings, to ``num-rounds`` if that is later than the saved run's
    last round (see :func:`resume_config`).
    """
    cfg = RunConfig.from_run_config(dict(context.run_config))
    if cfg.resume:
        # Continue the run saved there, to num-rounds or to the saved run's last round, whichever is later.
        saved = _saved_config(checkpoint.load(cfg.resume, mmap=True))
        cfg = resume_config(cfg.resume, rounds=max(cfg.rounds, saved.rounds))
    run_server(grid, cfg)
