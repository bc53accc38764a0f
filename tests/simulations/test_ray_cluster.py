"""Joining an existing Ray cluster (``RAY_ADDRESS`` / ``--ray-address``; docs/ray-cluster.md).

Fast tests: the refusal logic (:func:`check_cluster`) on made-up ``ray.nodes()``
lists, an unreachable address (no Ray), the run config / CLI plumbing. The
slow ones start real Ray nodes with ``ray start --block`` in a private
``--temp-dir`` (never ``ray stop``, which would stop every Ray on the machine,
and never ``ray.cluster_utils.Cluster``, which points ``/tmp/ray``'s
"current cluster" file, and so every bare ``ray.init()`` on the machine, at
its cluster), and stop them by signalling their process group: a head node
that a 3-client run joins through ``RAY_ADDRESS``, then a second node added to
it, on which a run without ``--state-dir`` is refused before any training.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import pytest

from fl_sparse.server_app import RunConfig, preflight
from fl_sparse.simulations import runner
from fl_sparse.simulations.runner import ClusterInfo, RayClusterError, check_cluster

SMALL = RunConfig(model="mlp-784-64-10", clients=3, rounds=2, local_steps=10, batch_size=32, ratio=0.1, seed=1,
                  quiet=True)


def _node(ip: str = "10.0.0.1", cpus: float = 4, gpus: float = 0, alive: bool = True) -> dict:
    """One entry as ``ray.nodes()`` lists it (the keys fl-sparse reads)."""
    resources = {"CPU": cpus, "memory": 1e9, **({"GPU": gpus} if gpus else {})}
    return {"NodeID": f"id-{ip}", "Alive": alive, "NodeManagerAddress": ip, "Resources": resources if alive else {}}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------ fast: no Ray
def test_one_alive_node_runs_without_a_state_dir_dead_nodes_do_not_count():
    check_cluster(SMALL, [_node("10.0.0.1"), _node("10.0.0.2", alive=False)], "10.0.0.1:6379")


def test_several_nodes_without_a_state_dir_are_refused_with_what_to_do():
    nodes = [_node("10.0.0.1"), _node("10.0.0.2"), _node("10.0.0.3")]
    with pytest.raises(RayClusterError) as exc:
        check_cluster(SMALL, nodes, "10.0.0.1:6379")
    message = str(exc.value)
    assert "on a Ray cluster of 3 nodes (10.0.0.1:6379)" in message
    assert "pass --state-dir /shared/path" in message and "every node mounts" in message
    # --out alone is not enough: its client-state folder is on the driver's machine.
    with pytest.raises(RayClusterError, match=r"--out alone keeps it in /runs/a/client-state.*--state-dir /runs/a/client-state"):
        check_cluster(replace(SMALL, out="/runs/a"), nodes, "10.0.0.1:6379")
    with pytest.raises(RayClusterError, match="must be an absolute path"):
        check_cluster(replace(SMALL, state_dir="shared/state"), nodes, "10.0.0.1:6379")
    check_cluster(replace(SMALL, state_dir="/shared/state"), nodes, "10.0.0.1:6379")


def test_a_client_must_fit_on_some_node():
    nodes = [_node("10.0.0.1", cpus=2), _node("10.0.0.2", cpus=2, gpus=1)]
    check_cluster(replace(SMALL, num_cpus=2, num_gpus=0.25, state_dir="/s"), nodes, "a:1")
    with pytest.raises(RayClusterError, match=r"no node of the Ray cluster at a:1 has the 4 CPUs one client"):
        check_cluster(replace(SMALL, num_cpus=4, state_dir="/s"), nodes, "a:1")
    with pytest.raises(RayClusterError, match=r"1 CPUs and 0.5 GPUs"):
        check_cluster(replace(SMALL, num_gpus=0.5), [_node(cpus=8)], "a:1")
    with pytest.raises(RayClusterError, match="no alive node"):
        check_cluster(SMALL, [_node(alive=False)], "a:1")


def test_cluster_info_line_counts_alive_nodes():
    info = ClusterInfo.from_nodes("10.0.0.1:6379", [_node("10.0.0.1", 4), _node("10.0.0.2", 8, 2), _node("x", alive=False)])
    assert info.line() == "fl-sparse: joined Ray cluster at 10.0.0.1:6379: 2 nodes, 12 CPUs, 2 GPUs"
    assert info.as_dict() == {"address": "10.0.0.1:6379", "nodes": 2, "cpus": 12.0, "gpus": 2.0,
                              "node_ips": ["10.0.0.1", "10.0.0.2"]}
    assert ClusterInfo.from_nodes("h:1", [_node()]).line().endswith(": 1 node, 4 CPUs, 0 GPUs")


def test_an_unreachable_address_is_named_and_nothing_starts(monkeypatch, capsys):
    import flwr.simulation

    def never(*args, **kwargs):
        raise AssertionError("Flower's simulation started")

    monkeypatch.setattr(flwr.simulation, "run_simulation", never)
    address = f"127.0.0.1:{_free_port()}"
    with pytest.raises(RayClusterError, match=rf"cannot reach the Ray cluster at {address}: .*ray start --head"):
        runner.simulate(replace(SMALL, ray_address=address))
    from fl_sparse.cli import main

    assert main(["simulate", "--clients", "3", "--rounds", "1", "--quiet", "--ray-address", address]) == 2
    err = capsys.readouterr().err
    assert f"fl-sparse simulate: error: cannot reach the Ray cluster at {address}" in err
    assert "Traceback" not in err


class _Listener:
    """A TCP server on 127.0.0.1 answering each connection with ``answer`` (None: says nothing), then closing."""

    def __init__(self, answer: bytes | None):
        import threading

        self.sock = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self.sock.getsockname()[1]}"
        self.answer, self.held = answer, []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            if self.answer is None:
                self.held.append(conn)  # open and silent
            else:
                conn.sendall(self.answer)
                conn.close()

    def close(self):
        self.sock.close()
        for conn in self.held:
            conn.close()


@pytest.mark.parametrize("answer, seen", [(b"HTTP/1.1 400 Bad Request\r\n\r\n", "HTTP/1.1 "),
                                          (b"", "it closed the connection")])
def test_a_port_that_is_not_ray_is_refused_at_once_not_retried(monkeypatch, capsys, answer, seen):
    """A dashboard or any other service on the port: refused by its answer to an HTTP/2 preface, before
    ray.init (which would retry it for minutes)."""
    import ray

    def never(*args, **kwargs):
        raise AssertionError("ray.init was called")

    monkeypatch.setattr(ray, "init", never)
    monkeypatch.delenv("RAY_USE_TLS", raising=False)
    listener = _Listener(answer)
    try:
        with pytest.raises(RayClusterError, match=rf"{listener.address} answers but is not a Ray head's GCS port "
                                                  rf"\(it does not speak gRPC: '{seen}"):
            runner.simulate(replace(SMALL, ray_address=listener.address))
        from fl_sparse.cli import main

        started = time.monotonic()
        assert main(["simulate", "--clients", "3", "--rounds", "1", "--quiet", "--ray-address",
                     f"ray://{listener.address}"]) == 2
        assert time.monotonic() - started < 30
        err = capsys.readouterr().err
        assert "is not a Ray head's GCS port" in err and "6379 by default" in err and "Traceback" not in err
    finally:
        listener.close()


def test_a_grpc_server_passes_the_port_check_and_a_silent_one_is_left_to_ray():
    """What Ray's GCS and Ray Client's server are, a gRPC server, passes; a port that accepts and says
    nothing is no proof either way (a busy head may be slow): it passes too, and Ray decides."""
    import grpc
    from concurrent import futures

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=1))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    silent = _Listener(None)
    try:
        runner._check_reachable(f"127.0.0.1:{port}")
        runner._check_reachable(f"ray://127.0.0.1:{port}")
        with socket.create_connection(("127.0.0.1", int(silent.address.rsplit(":", 1)[1]))) as conn:
            assert runner._http2_answer(conn, timeout=0.2) is None
    finally:
        server.stop(None)
        silent.close()


def test_ray_address_comes_from_the_config_or_the_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert runner.ray_address(SMALL) is None
    assert "_system_config" in runner.backend_config(SMALL)["init_args"]  # a local Ray of our own
    # ...even where `ray start --head` ran on this machine: ray.init() without an address would join it
    assert runner.backend_config(SMALL)["init_args"]["address"] == "local"
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    assert runner.ray_address(SMALL) == "10.0.0.1:6379"
    assert runner.ray_address(replace(SMALL, ray_address="10.0.0.2:6379")) == "10.0.0.2:6379"
    assert "_system_config" not in runner.backend_config(SMALL)["init_args"]  # ray.init refuses it on a cluster
    assert "address" not in runner.backend_config(SMALL)["init_args"]  # the runner joins it itself
    assert RunConfig.from_run_config({"ray-address": ""}).ray_address is None
    # The clients run on the cluster's nodes: this machine's CPU count is not the limit (the runner checks the nodes).
    preflight(replace(SMALL, num_cpus=(os.cpu_count() or 1) + 1, state_dir=str(tmp_path / "state")))
    assert (tmp_path / "state").is_dir()
    monkeypatch.delenv("RAY_ADDRESS")
    with pytest.raises(ValueError, match="this machine has"):
        preflight(replace(SMALL, num_cpus=(os.cpu_count() or 1) + 1))


# ------------------------------------------------------------------ slow: real Ray nodes on this machine
class _RayNodes:
    """Ray nodes started with ``ray start --block`` in one private temp dir; :meth:`stop` ends only them."""

    def __init__(self) -> None:
        self.temp_dir = tempfile.mkdtemp(prefix="flr", dir="/tmp")  # short: Ray's socket paths live under it
        self.port = _free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.procs: list[subprocess.Popen] = []

    def start(self, *args: str, timeout: float = 120) -> subprocess.Popen:
        ray_cli = str(Path(sys.executable).with_name("ray"))
        proc = subprocess.Popen(
            [ray_cli if os.path.exists(ray_cli) else "ray", "start", "--block", f"--temp-dir={self.temp_dir}",
             "--disable-usage-stats", "--node-ip-address=127.0.0.1", "--num-gpus=0", *args],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
        )
        self.procs.append(proc)
        deadline, seen = time.monotonic() + timeout, []
        for line in proc.stdout:  # "Ray runtime started." once the node is up (it then blocks)
            seen.append(line)
            if "Ray runtime started" in line:
                return proc
            if time.monotonic() > deadline:
                break
        raise RuntimeError("ray start failed:\n" + "".join(seen[-30:]))

    def stop(self, proc: subprocess.Popen) -> None:
        """SIGTERM to the node's own process group (its GCS, raylet and workers); SIGKILL to what is left."""
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                proc.poll()
                os.killpg(proc.pid, 0)  # ProcessLookupError once the whole group is gone
                time.sleep(0.2)
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
        if proc.stdout:
            proc.stdout.close()

    def stop_all(self) -> None:
        for proc in reversed(self.procs):
            self.stop(proc)
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def _disconnect() -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()


@pytest.fixture(scope="module")
def head():
    nodes = _RayNodes()
    try:
        nodes.start("--head", f"--port={nodes.port}", "--num-cpus=2", "--include-dashboard=false")
        yield nodes
    finally:
        _disconnect()
        nodes.stop_all()


@pytest.mark.slow
def test_a_run_joins_a_head_node_through_ray_address(head, tmp_path, monkeypatch, capsys):
    import ray

    monkeypatch.setenv("RAY_ADDRESS", head.address)
    calls = []
    real_init = ray.init

    def counting_init(*args, **kwargs):
        calls.append(kwargs)
        return real_init(*args, **kwargs)

    monkeypatch.setattr(ray, "init", counting_init)
    try:
        rows = runner.simulate(replace(SMALL, out=str(tmp_path / "run")))
    finally:
        _disconnect()
    err = capsys.readouterr().err
    joined = [line for line in err.splitlines() if line.startswith("fl-sparse: joined Ray cluster at ")]
    assert len(joined) == 1 and joined[0].endswith(": 1 node, 2 CPUs, 0 GPUs"), err[-3000:]
    assert [r["round"] for r in rows] == [1, 2]
    assert rows[-1]["test_accuracy"] > 0.5 and all(r["accepted"] == 3 for r in rows)
    meta = json.loads((tmp_path / "run" / "config.json").read_text())
    assert meta["ray_cluster"]["nodes"] == 1 and meta["ray_cluster"]["cpus"] == 2
    assert joined[0] == f"fl-sparse: joined Ray cluster at {meta['ray_cluster']['address']}: 1 node, 2 CPUs, 0 GPUs"
    # One ray.init, the runner's (without _system_config): Flower's backend used that connection.
    assert [c.get("address") for c in calls] == [head.address] and "_system_config" not in calls[0]
    assert not ray.is_initialized()  # disconnected at the end...
    assert head.procs[0].poll() is None  # ...and the cluster it joined still runs


@pytest.mark.slow
def test_a_second_node_needs_a_shared_state_dir(head, tmp_path, monkeypatch):
    import flwr.simulation
    import ray

    worker = head.start(f"--address={head.address}", "--num-cpus=1")  # returns once the node is registered
    try:
        # With a state folder both nodes see (one machine: every path is shared), it may start.
        state = tmp_path / "state"
        state.mkdir()
        info = runner.join_ray_cluster(replace(SMALL, state_dir=str(state)), head.address)
        assert (info.nodes, info.cpus) == (2, 3)
        assert ray.is_initialized() and list(state.iterdir()) == []  # the marker file is gone
        with monkeypatch.context() as m:  # a folder the nodes cannot see: the driver's marker file never shows there
            m.setattr(Path, "write_bytes", lambda self, data: len(data))
            with pytest.raises(RayClusterError, match=rf"the state folder {state} is not shared: nodes .* cannot see"):
                runner._check_state_dir_shared(str(state), ray.nodes(), head.address)

        def never(*args, **kwargs):
            raise AssertionError("Flower's simulation started")

        monkeypatch.setattr(flwr.simulation, "run_simulation", never)
        # Without one it is refused; Ray already initialised (as a user may have done): that connection is inspected.
        with pytest.raises(RayClusterError, match=r"on a Ray cluster of 2 nodes .* pass --state-dir /shared/path"):
            runner.simulate(replace(SMALL, ray_address=head.address, out=str(tmp_path / "run")))
        assert not ray.is_initialized()  # refused: disconnected again
        assert not (tmp_path / "run" / "config.json").exists()  # no run started
    finally:
        _disconnect()
        head.stop(worker)
