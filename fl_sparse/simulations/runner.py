"""Run a configured experiment on Flower's simulation engine (Ray), offline.

``simulate(RunConfig(...))`` is what ``fl-sparse simulate`` calls: it wires
the fl-sparse ServerApp (with this config) and ClientApp into
``flwr.simulation.run_simulation`` with one virtual SuperNode per client.
"""

from __future__ import annotations

import logging
import os
import warnings
from typing import Any

from fl_sparse.server_app import RunConfig, RunFailed, RunInterrupted, preflight, run_server

__all__ = ["simulate", "backend_config"]


class _KnownNoise(logging.Filter):
    """Drop Flower warnings that say nothing about this run.

    ``run_simulation`` is deprecated in favour of ``flwr run`` (which needs a
    SuperLink; see docs/deployment.md) and the strategies evaluate centrally on
    purpose; repeating both on every run would hide the warnings that matter
    (rejected replies, failed clients).
    """

    _PATTERNS = ("`run_simulation` function is deprecated", "fraction_evaluate is set to 0.0")

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(p in message for p in self._PATTERNS)


# Ray passes task arguments and results up to this size inline, with the task
# call; larger ones go through its shared-memory object store, which costs a
# few milliseconds per object on a small machine. Ray's default (100 KiB) sits
# just below a dense MLP sync (~200 kB) and the near-dense downlink of
# unidirectional top-K at 100 clients: raising it cut those rounds by about a
# third (benchmarks/bench_rounds.py). ResNet-sized payloads (tens of MB) stay
# above it and keep using the object store, where they belong.
INLINE_OBJECT_BYTES = 4 * 2**20


def backend_config(cfg: RunConfig) -> dict[str, Any]:
    """Ray resources: ``num_cpus``/``num_gpus`` per client (fractional GPUs allowed).

    ``init_args`` go to ``ray.init``; ``_system_config`` raises the size of
    messages Ray sends inline (:data:`INLINE_OBJECT_BYTES`), unless the run
    joins an existing Ray cluster (``RAY_ADDRESS`` set).
    """
    resources: dict[str, Any] = {"num_cpus": float(cfg.num_cpus), "num_gpus": float(cfg.num_gpus)}
    init_args: dict[str, Any] = {"include_dashboard": False, "log_to_driver": True, "logging_level": logging.WARNING}
    if not os.environ.get("RAY_ADDRESS"):
        # Only a Ray instance started here takes system settings; ray.init refuses
        # them when it joins an existing cluster (RAY_ADDRESS).
        init_args["_system_config"] = {"max_direct_call_object_size": INLINE_OBJECT_BYTES}
    return {"client_resources": resources, "init_args": init_args}


def simulate(cfg: RunConfig, strategy=None) -> list[dict[str, Any]]:
    """Run ``cfg`` in Flower's Ray simulation; returns one metrics dict per round.

    ``strategy`` (optional) replaces the strategy ``cfg.strategy`` names.
    """
    preflight(cfg)
    # Offline by design: no telemetry, no dependency installation.
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    from flwr.serverapp import Grid, ServerApp
    from flwr.simulation import run_simulation

    from fl_sparse.clients.app import app as client_app

    rows: list[dict[str, Any]] = []
    failed: list[RuntimeError] = []
    server_app = ServerApp()

    @server_app.main()
    def _main(grid: Grid, context) -> None:
        try:
            rows.extend(run_server(grid, cfg, strategy, local_clients=True))
        except (RunFailed, RunInterrupted) as exc:  # raised again below, outside Flower's ServerApp runner
            failed.append(exc)

    flwr_logger = logging.getLogger("flwr")
    level = flwr_logger.level
    flwr_logger.setLevel(logging.WARNING)  # our progress line replaces Flower's per-round INFO log
    noise = _KnownNoise()
    flwr_logger.addFilter(noise)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.filterwarnings("ignore", message=".*accelerator visible devices.*", category=FutureWarning)
            run_simulation(
                server_app=server_app,
                client_app=client_app,
                num_supernodes=cfg.clients,
                backend_config=backend_config(cfg),
            )
    finally:
        flwr_logger.setLevel(level)
        flwr_logger.removeFilter(noise)
    if failed:
        raise failed[0]
    if len(rows) != cfg.rounds:
        raise RuntimeError(
            f"simulation finished {len(rows)} of {cfg.rounds} rounds; see the log above for the error"
        )
    return rows
