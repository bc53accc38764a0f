"""Run a configured experiment on Flower's simulation engine (Ray), offline.

``simulate(RunConfig(...))`` is what ``fl-sparse simulate`` calls: it wires
the fl-sparse ServerApp (with this config) and ClientApp into
``flwr.simulation.run_simulation`` with one virtual SuperNode per client.

On a Ray cluster (``cfg.ray_address`` / ``--ray-address``, else
``$RAY_ADDRESS``; docs/ray-cluster.md) it joins the cluster itself before
Flower starts (:func:`join_ray_cluster`), prints what it joined, checks the
cluster can run the clients (:func:`check_cluster`: a node with the CPUs/GPUs
one client asks for; on several nodes, an absolute ``state_dir`` that every
node sees) and refuses with :class:`RayClusterError` otherwise. Flower's Ray
backend then uses that connection: it calls ``ray.init`` only when
``ray.is_initialized()`` is false, and ``ray.shutdown()`` (a disconnect, the
cluster keeps running) at the end.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import uuid
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from fl_sparse.clients.mod import STATE_DIR_VARIABLE
from fl_sparse.server_app import RunConfig, RunFailed, RunInterrupted, preflight, run_server

__all__ = ["simulate", "backend_config", "ClusterInfo", "RayClusterError", "check_cluster", "join_ray_cluster",
           "ray_address"]


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
    joins an existing Ray cluster (:func:`ray_address`: ``--ray-address`` or ``RAY_ADDRESS``).
    """
    resources: dict[str, Any] = {"num_cpus": float(cfg.num_cpus), "num_gpus": float(cfg.num_gpus)}
    init_args: dict[str, Any] = {"include_dashboard": False, "log_to_driver": True, "logging_level": logging.WARNING}
    if not ray_address(cfg):
        # Only a Ray instance started here takes system settings; ray.init refuses
        # them when it joins an existing cluster (RAY_ADDRESS, --ray-address).
        init_args["_system_config"] = {"max_direct_call_object_size": INLINE_OBJECT_BYTES}
        # "local": a Ray of our own even when this machine runs a Ray head (`ray start --head`, as
        # docs/ray-cluster.md sets one up): ray.init() without an address joins the cluster named in
        # /tmp/ray/ray_current_cluster, refuses the _system_config above, and Flower then hung.
        init_args["address"] = "local"
    return {"client_resources": resources, "init_args": init_args}


class RayClusterError(ValueError):
    """The Ray cluster cannot run this simulation: unreachable, too small, or no state folder every node sees.

    Raised by :func:`simulate` before any training starts (the CLI prints it and exits with 2).
    """


def ray_address(cfg: RunConfig) -> str | None:
    """The Ray cluster a run joins: ``cfg.ray_address``, else ``$RAY_ADDRESS``; None: Flower starts a local Ray."""
    return cfg.ray_address or os.environ.get("RAY_ADDRESS") or None


@dataclass(frozen=True)
class ClusterInfo:
    """What :func:`join_ray_cluster` found: the cluster's GCS address and its alive nodes' resources."""

    address: str
    nodes: int
    cpus: float
    gpus: float
    node_ips: tuple[str, ...]

    @classmethod
    def from_nodes(cls, address: str, nodes: list[dict[str, Any]]) -> "ClusterInfo":
        """From ``ray.nodes()`` (dead nodes, which Ray keeps listing, are left out)."""
        alive = [n for n in nodes if n.get("Alive")]
        return cls(
            address=str(address),
            nodes=len(alive),
            cpus=sum(float((n.get("Resources") or {}).get("CPU", 0)) for n in alive),
            gpus=sum(float((n.get("Resources") or {}).get("GPU", 0)) for n in alive),
            node_ips=tuple(str(n.get("NodeManagerAddress", "?")) for n in alive),
        )

    def line(self) -> str:
        """The line :func:`simulate` prints when it has joined."""
        return (f"fl-sparse: joined Ray cluster at {self.address}: {self.nodes} node{'s' * (self.nodes != 1)}, "
                f"{self.cpus:g} CPUs, {self.gpus:g} GPUs")

    def as_dict(self) -> dict[str, Any]:
        """``ray_cluster`` in the run folder's config.json."""
        return {**asdict(self), "node_ips": list(self.node_ips)}


def check_cluster(cfg: RunConfig, nodes: list[dict[str, Any]], address: str) -> None:
    """Refuse (:class:`RayClusterError`) a cluster that cannot run ``cfg``'s clients; ``nodes`` as ``ray.nodes()``.

    * No alive node has the CPUs (and GPUs) one client asks for: no client could start.
    * More than one alive node and no ``cfg.state_dir``: the clients keep their
      state (model copy, error memory) in files, and a client may run on any
      node from one round to the next. The folder the driver would pick
      (``/dev/shm`` or a temporary folder; ``out/client-state`` with ``out``)
      is on the driver's machine only, so an explicit ``state_dir`` on a
      filesystem every node mounts is required, as an absolute path (each node
      would resolve a relative one from its own working folder).
    One alive node runs as on a single machine: it is the driver's (Ray
    connects a driver through a Ray node of its own machine).
    """
    alive = [n for n in nodes if n.get("Alive")]
    if not alive:
        raise RayClusterError(f"the Ray cluster at {address} has no alive node")
    resources = [n.get("Resources") or {} for n in alive]

    def fits(res: dict[str, Any]) -> bool:
        return float(res.get("CPU", 0)) >= cfg.num_cpus and (cfg.num_gpus <= 0 or float(res.get("GPU", 0)) >= cfg.num_gpus)

    if not any(fits(r) for r in resources):
        want = f"{cfg.num_cpus:g} CPUs" + (f" and {cfg.num_gpus:g} GPUs" if cfg.num_gpus > 0 else "")
        have = ", ".join(f"{float(r.get('CPU', 0)):g} CPUs/{float(r.get('GPU', 0)):g} GPUs" for r in resources)
        raise RayClusterError(
            f"no node of the Ray cluster at {address} has the {want} one client asks for (nodes: {have}); "
            "lower --num-cpus/--num-gpus or add a larger node"
        )
    if len(alive) > 1:
        if not cfg.state_dir:
            hint = (f" (--out alone keeps it in {cfg.out}/client-state on this machine; if {cfg.out} is on a shared "
                    f"filesystem, pass --state-dir {Path(cfg.out).absolute() / 'client-state'})") if cfg.out else ""
            raise RayClusterError(
                f"on a Ray cluster of {len(alive)} nodes ({address}) the client state must be on a filesystem every "
                f"node mounts: pass --state-dir /shared/path (RunConfig.state_dir), a folder on a shared filesystem "
                f"mounted at the same path on every node{hint}; see docs/ray-cluster.md"
            )
        if not os.path.isabs(cfg.state_dir):
            raise RayClusterError(
                f"on a Ray cluster of {len(alive)} nodes ({address}) --state-dir must be an absolute path (each node "
                f"would resolve {cfg.state_dir!r} from its own working folder): "
                f"pass --state-dir {Path(cfg.state_dir).absolute()} if every node mounts it there"
            )


def _check_reachable(address: str, timeout: float = 5.0) -> None:
    """A TCP connection to ``HOST:PORT`` that answers like a gRPC server, as Ray's GCS and Ray Client's
    server do (``ray://`` stripped; ``auto`` and other forms are left to Ray), or :class:`RayClusterError`."""
    bare = address.split("://", 1)[-1]
    host, sep, port = bare.rpartition(":")
    if not sep or not port.isdigit():
        return
    try:
        connection = socket.create_connection((host.strip("[]"), int(port)), timeout=timeout)
    except OSError as exc:
        raise RayClusterError(
            f"cannot reach the Ray cluster at {address}: {exc.strerror or exc}; is a head node running there "
            f"(ray start --head --port={port}) and is the port open from this machine?"
        ) from None
    with connection:
        if os.environ.get("RAY_USE_TLS", "0").lower() in ("1", "true"):
            return  # a TLS port answers plain HTTP/2 with an alert: no test here
        answer = _http2_answer(connection)
    if answer is not None and answer[:1] not in (b"\x15", b"\x16") and not _is_http2_settings(answer):
        # Ray would retry such a port for minutes with GCS warnings before giving up.
        seen = answer[:40].decode("ascii", "replace").splitlines()[0] if answer else "it closed the connection"
        raise RayClusterError(
            f"{address} answers but is not a Ray head's GCS port (it does not speak gRPC: {seen!r}); use the "
            f"port 'ray start --head' printed (6379 by default; the dashboard's port is not it)"
        )


# A gRPC server (Ray's GCS, Ray Client's server) speaks HTTP/2: it answers a client's connection
# preface with a SETTINGS frame (RFC 9113 3.4, 6.5), a 9-byte header whose fourth byte is 0x4.
_HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, 0x4, 0, 0, 0, 0, 0])


def _http2_answer(connection: socket.socket, timeout: float = 5.0) -> bytes | None:
    """The first bytes the server sends after an HTTP/2 preface (b"" if it hangs up); None if it stays silent
    or the exchange fails otherwise: no proof either way, so Ray decides."""
    try:
        connection.settimeout(timeout)
        connection.sendall(_HTTP2_PREFACE)
        answer = b""
        while len(answer) < 9:
            chunk = connection.recv(9 - len(answer))
            if not chunk:
                break
            answer += chunk
        return answer
    except (ConnectionResetError, BrokenPipeError):
        return b""  # hung up on the preface: a gRPC server never does
    except OSError:
        return None


def _is_http2_settings(answer: bytes) -> bool:
    return len(answer) == 9 and answer[3] == 0x4


def _check_state_dir_shared(state_dir: str, nodes: list[dict[str, Any]], address: str, timeout: float = 60.0) -> None:
    """Every alive node sees a marker file the driver writes in ``state_dir``, or :class:`RayClusterError`.

    One zero-CPU Ray task per node (hard node affinity) checks that the file
    exists. A node that does not answer within ``timeout`` seconds is reported
    on stderr, not refused: slow is not proof of a private folder.
    """
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    def sees(path: str) -> bool:  # defined here: Ray ships it by value, the nodes need no fl_sparse import for it
        import os as _os

        return _os.path.exists(path)

    alive = [n for n in nodes if n.get("Alive")]
    marker = Path(state_dir) / f".fl-sparse-shared-{uuid.uuid4().hex}"
    try:
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_bytes(b"")
    except OSError as exc:
        raise RayClusterError(f"the state folder {state_dir} is not writable from this machine: {exc.strerror or exc}") from None
    try:
        probe = ray.remote(num_cpus=0, max_retries=0)(sees)
        refs = [
            probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote(str(marker))
            for n in alive
        ]
        done, pending = ray.wait(refs, num_returns=len(refs), timeout=timeout)
        for ref in pending:
            ray.cancel(ref, force=True)
        blind, slow = [], []
        for n, ref in zip(alive, refs):
            if ref in pending:
                slow.append(str(n.get("NodeManagerAddress", n["NodeID"])))
                continue
            try:
                if not ray.get(ref):
                    blind.append(str(n.get("NodeManagerAddress", n["NodeID"])))
            except Exception:  # noqa: BLE001 - a node that cannot run the check: reported below as slow
                slow.append(str(n.get("NodeManagerAddress", n["NodeID"])))
    finally:
        marker.unlink(missing_ok=True)
    if blind:
        raise RayClusterError(
            f"the state folder {state_dir} is not shared: node{'s' * (len(blind) > 1)} {', '.join(blind)} of the Ray "
            f"cluster at {address} cannot see a file this machine wrote there; mount one shared filesystem at the "
            "same path on every node and pass that path as --state-dir"
        )
    if slow:
        print(f"fl-sparse: warning: could not check that node{'s' * (len(slow) > 1)} {', '.join(slow)} see the state "
              f"folder {state_dir} (no answer in {timeout:g} s)", file=sys.stderr, flush=True)


def join_ray_cluster(cfg: RunConfig, address: str) -> ClusterInfo:
    """Connect this process to the Ray cluster at ``address``, check it can run ``cfg``, print what it joined.

    ``ray.init`` gets the arguments Flower's Ray backend would pass
    (:func:`backend_config`'s ``init_args`` and the ``PYTHONPATH`` runtime
    env), so Flower, which calls ``ray.init`` only when Ray is not initialised
    yet, runs on this connection. On any refusal (:func:`check_cluster`, a
    state folder some node cannot see) the connection is closed again and
    :class:`RayClusterError` raised; an unreachable address is one too, naming it.
    """
    import ray

    if not ray.is_initialized():
        _check_reachable(address)
        init_args = dict(backend_config(cfg)["init_args"])
        init_args.pop("_system_config", None)  # ray.init refuses system settings when it joins a cluster
        init_args.pop("address", None)  # "local" (a private Ray) when cfg names no cluster: this joins ``address``
        pythonpath = os.pathsep.join(sys.path)  # as Flower's RayBackend.init_ray sends it to the workers
        if os.environ.get("PYTHONPATH"):
            pythonpath = f"{pythonpath}{os.pathsep}{os.environ['PYTHONPATH']}"
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*accelerator visible devices.*", category=FutureWarning)
                ray.init(address=address, runtime_env={"env_vars": {"PYTHONPATH": pythonpath}}, **init_args)
        except Exception as exc:  # noqa: BLE001 - Ray's own words, after the address
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise RayClusterError(f"cannot join the Ray cluster at {address}: {first}") from None
    try:
        nodes = ray.nodes()
        info = ClusterInfo.from_nodes(ray.get_runtime_context().gcs_address or address, nodes)
        check_cluster(cfg, nodes, info.address)
        if info.nodes > 1:
            _check_state_dir_shared(cfg.state_dir, nodes, info.address)
    except BaseException:
        ray.shutdown()
        raise
    print(info.line(), file=sys.stderr, flush=True)
    return info


def set_simulation_environment() -> None:
    """The environment :func:`simulate` runs Flower and Ray in; a variable already set is kept."""
    # Offline by design: no telemetry, no dependency installation.
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    # Ray hides the GPUs from an actor that reserved none ("1", today's default). Its FutureWarning
    # announces "0" as the future default: every zero-GPU client actor would then see every GPU.
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "1")


def simulate(cfg: RunConfig, strategy=None) -> list[dict[str, Any]]:
    """Run ``cfg`` in Flower's Ray simulation; returns one metrics dict per round.

    ``strategy`` (optional) replaces the strategy ``cfg.strategy`` names.
    With a Ray cluster to join (:func:`ray_address`) it joins before Flower
    starts (:func:`join_ray_cluster`: raises :class:`RayClusterError` when the
    cluster cannot run it) and records the cluster as ``ray_cluster`` in the
    run folder's config.json.
    """
    preflight(cfg)
    set_simulation_environment()
    from flwr.serverapp import Grid, ServerApp
    from flwr.simulation import run_simulation

    from fl_sparse.clients.app import app as client_app

    address = ray_address(cfg)
    joined = join_ray_cluster(cfg, address) if address else None
    metadata = {"ray_cluster": joined.as_dict()} if joined is not None else None
    rows: list[dict[str, Any]] = []
    failed: list[RuntimeError] = []
    server_app = ServerApp()

    @server_app.main()
    def _main(grid: Grid, context) -> None:
        try:
            rows.extend(run_server(grid, cfg, strategy, local_clients=True, metadata=metadata))
        except (RunFailed, RunInterrupted) as exc:  # raised again below, outside Flower's ServerApp runner
            failed.append(exc)

    # The clients keep their state where cfg says (run_server names the folder to them). A
    # FL_SPARSE_STATE_DIR left in the shell for one's own apps would win over that in every
    # Ray worker (for SparseMod it is a node operator's setting, above the server's hint), so
    # the workers this run starts do not inherit it.
    stray_state_dir = os.environ.pop(STATE_DIR_VARIABLE, None)
    if stray_state_dir:
        print(f"{STATE_DIR_VARIABLE}={stray_state_dir} is ignored by this simulation: its clients keep their "
              "state where --state-dir (RunConfig.state_dir) or --out says, else in a temporary folder",
              file=sys.stderr, flush=True)
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
        if stray_state_dir is not None:
            os.environ[STATE_DIR_VARIABLE] = stray_state_dir
        flwr_logger.setLevel(level)
        flwr_logger.removeFilter(noise)
        if joined is not None:
            import ray

            ray.shutdown()  # Flower's backend already disconnects at its end; this covers a failed start
    if failed:
        raise failed[0]
    if len(rows) != cfg.rounds:
        raise RuntimeError(
            f"simulation finished {len(rows)} of {cfg.rounds} rounds; see the log above for the error"
        )
    return rows
