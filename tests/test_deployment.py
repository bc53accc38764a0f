"""End-to-end runs of the Flower app with real Flower processes, offline.

* ``test_flwr_run_simulation``: ``flwr run`` against a simulation SuperLink
  (``flower-superlink --simulation``), 2 simulated SuperNodes.
* ``test_deployment_supernode_restart``: a deployment SuperLink and two
  ``flower-supernode`` processes on 127.0.0.1; one SuperNode is killed after
  round 2 and restarted with the same node config; the run must finish and the
  restarted client's state file (keyed by partition id) must keep counting.

Every process is started in its own session and killed (with everything it
spawned) at teardown. ``FLWR_HOME`` is a temporary folder; runtime dependency
installation is disabled (no internet). See docs/deployment.md.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        shutil.which("flower-superlink") is None or shutil.which("flwr") is None,
        reason="Flower CLI (flwr, flower-superlink, flower-supernode) not installed",
    ),
]

APP_DIR = Path(__file__).resolve().parents[1]
RUN_TIMEOUT = 170.0  # seconds for one `flwr run --stream`


# ----------------------------------------------------------------- helpers
def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _descendants(pid: int) -> list[int]:
    """All live descendants of ``pid`` (from /proc; no psutil needed)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _tail(path: Path, n: int = 60) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return "<no log>"
    return "\n".join(lines[-n:])


class Procs:
    """Starts processes in new sessions; kills them and their descendants at teardown."""

    def __init__(self, tmp: Path, env: dict[str, str]) -> None:
        self.tmp, self.env = tmp, env
        self.procs: list[tuple[subprocess.Popen, Path]] = []
        self.killed: set[int] = set()  # pids killed on purpose

    def start(self, name: str, args: list[str]) -> tuple[subprocess.Popen, Path]:
        log = self.tmp / f"{name}.log"
        fh = open(log, "ab")
        fh.write(("$ " + " ".join(args) + "\n").encode())
        fh.flush()
        proc = subprocess.Popen(
            args, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env=self.env, cwd=self.tmp, start_new_session=True,
        )
        fh.close()
        self.procs.append((proc, log))
        return proc, log

    def kill(self, proc: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
        """Kill ``proc``, its process group and every descendant (collected first)."""
        self.killed.add(proc.pid)
        if proc.poll() is not None:
            return
        pids = _descendants(proc.pid)
        for target in (lambda: os.killpg(proc.pid, sig), *[(lambda p=p: os.kill(p, sig)) for p in pids]):
            try:
                target()
            except (ProcessLookupError, PermissionError):
                pass
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass

    def stop_all(self) -> None:
        for proc, _ in reversed(self.procs):
            if proc.poll() is None:
                pids = _descendants(proc.pid)
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
                try:
                    proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    pass
                for pid in [proc.pid, *pids]:
                    try:
                        os.killpg(pid, signal.SIGKILL) if pid == proc.pid else os.kill(pid, signal.SIGKILL)
                    except (ProcessLookupError, PermissionError):
                        pass
                try:
                    proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    pass

    def logs(self) -> str:
        return "\n".join(f"===== {log.name} (tail)\n{_tail(log)}" for _, log in self.procs)


@pytest.fixture
def procs(tmp_path: Path):
    env = dict(os.environ)
    env["FLWR_HOME"] = str(tmp_path / "flwr-home")
    env["FLWR_DISABLE_UPDATE_CHECK"] = "1"
    env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] = "1"
    env["PYTHONUNBUFFERED"] = "1"
    env.pop("FL_SPARSE_STATE_DIR", None)  # node config / server hint must decide
    Path(env["FLWR_HOME"]).mkdir()
    manager = Procs(tmp_path, env)
    try:
        yield manager
    finally:
        manager.stop_all()


@contextlib.contextmanager
def logs_on_failure(procs: Procs):
    """Print the tails of every process log when the block fails."""
    try:
        yield
    except BaseException:
        print(procs.logs(), file=sys.stderr)
        raise


def _write_flower_config(home: Path, name: str, port: int) -> None:
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "{name}"\n\n'
        f'[superlink.{name}]\naddress = "127.0.0.1:{port}"\ninsecure = true\n'
    )


def _wait_for(predicate, timeout: float, what: str, procs: Procs, interval: float = 0.3):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        for proc, log in procs.procs:
            if proc.poll() is not None and proc.pid not in procs.killed:
                raise AssertionError(f"{log.name}: process exited ({proc.returncode}) while waiting for {what}")
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def _start_superlink(procs: Procs, port: int, simulation: bool) -> None:
    args = [
        "flower-superlink", "--insecure", "--isolation", "subprocess",
        "--disable-runtime-dependency-installation",
        "--host", "127.0.0.1", "--port", str(port),
        "--database", str(procs.tmp / "superlink-state.db"),
    ]
    if simulation:
        args.insert(2, "--simulation")
    _, log = procs.start("superlink", args)
    _wait_for(lambda: "Uvicorn running on" in log.read_text(errors="replace"), 60, "SuperLink startup", procs)


def _read_metrics(out: Path) -> list[dict]:
    """The rows the run has appended so far (metrics.jsonl; metrics.json is written only at the end)."""
    try:
        text = (out / "metrics.jsonl").read_text()
    except OSError:
        return []
    return [json.loads(line) for line in text.split("\n")[:-1] if line.strip()]  # complete lines only


def _check_metrics(rows: list[dict], rounds: int) -> None:
    assert [int(r["round"]) for r in rows] == list(range(1, rounds + 1))
    for r in rows:
        acc = r.get("test_accuracy")
        assert isinstance(acc, float) and math.isfinite(acc) and 0.0 <= acc <= 1.0, r
        assert math.isfinite(float(r["test_loss"])), r
    # 10 classes: chance is 0.1; a corrupted (NaN / desynced) model would not beat it.
    assert rows[-1]["test_accuracy"] > 0.12, rows[-1]


def _flwr_run(procs: Procs, connection: str, run_config: str, extra: list[str] = ()) -> tuple[subprocess.Popen, Path]:
    return procs.start(
        "flwr-run",
        ["flwr", "run", str(APP_DIR), connection, *extra, "--run-config", run_config, "--stream"],
    )


def _finish(procs: Procs, proc: subprocess.Popen, log: Path, timeout: float = RUN_TIMEOUT) -> str:
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        procs.kill(proc)
        raise AssertionError(f"flwr run did not finish within {timeout:.0f} s")
    text = log.read_text(errors="replace")
    assert proc.returncode == 0, f"flwr run exited with {proc.returncode}"
    assert "Successfully started run" in text
    return text


# ------------------------------------------------------------------- tests
def test_flwr_run_simulation(procs: Procs, tmp_path: Path):
    """``flwr run <app> <connection>`` on a local simulation SuperLink, offline."""
    with logs_on_failure(procs):
        _simulation(procs, tmp_path)


def test_deployment_supernode_restart(procs: Procs, tmp_path: Path):
    """SuperLink + 2 SuperNodes on 127.0.0.1; one SuperNode dies after round 2 and comes back."""
    with logs_on_failure(procs):
        _deployment_restart(procs, tmp_path)


def _simulation(procs: Procs, tmp_path: Path) -> None:
    port = _free_port()
    _write_flower_config(Path(procs.env["FLWR_HOME"]), "local-sim", port)
    _start_superlink(procs, port, simulation=True)

    out = tmp_path / "out"
    proc, log = _flwr_run(
        procs, "local-sim",
        f"num-rounds=2 local-steps=1 strategy='topk' out='{out}'",
        extra=["--federation-config", "num-supernodes=2"],
    )
    _finish(procs, proc, log)
    rows = _read_metrics(out)
    _check_metrics(rows, 2)
    assert all(int(r.get("accepted", 0)) == 2 for r in rows), rows
    assert (out / "model.pt").exists()


def _deployment_restart(procs: Procs, tmp_path: Path) -> None:
    import torch

    from fl_sparse.clients.state import decode_state

    rounds = 5
    port = _free_port()
    _write_flower_config(Path(procs.env["FLWR_HOME"]), "local-deploy", port)
    _start_superlink(procs, port, simulation=False)
    superlink_log = tmp_path / "superlink.log"

    node_ports = [_free_port(), _free_port()]

    def start_node(k: int, tag: str) -> subprocess.Popen:
        proc, _ = procs.start(
            f"supernode{k}{tag}",
            [
                "flower-supernode", "--insecure", "--superlink", f"127.0.0.1:{port}",
                "--port", str(node_ports[k]), "--isolation", "subprocess",
                # Node 0 names its device as docs/deployment.md shows (the node config's string reaches the app).
                "--node-config", f"partition-id={k} num-partitions=2 state-dir='{tmp_path / f'node{k}'}'"
                + (" device='cpu'" if k == 0 else ""),
            ],
        )
        return proc

    nodes = [start_node(0, ""), start_node(1, "")]
    _wait_for(
        lambda: superlink_log.read_text(errors="replace").count("Activated node_id") >= 2,
        60, "both SuperNodes to register", procs,
    )

    out = tmp_path / "out"
    run_proc, run_log = _flwr_run(
        procs, "local-deploy",
        f"num-rounds={rounds} local-steps=1 strategy='bidirectional-topk' model='mlp-784-64-10' out='{out}'",
    )

    # Let two rounds finish, then kill SuperNode 1 (and its ClientApp/SuperExec) hard.
    _wait_for(lambda: len(_read_metrics(out)) >= 2, 120, "round 2", procs)
    state_files = lambda: sorted((tmp_path / "node1").glob("gen-*/client-1.state"))  # noqa: E731
    assert state_files(), "SuperNode 1 wrote no state file under its node-config state-dir"
    before = decode_state(state_files()[0].read_bytes())
    procs.kill(nodes[1], signal.SIGKILL)
    rounds_at_kill = len(_read_metrics(out))
    # A fresh port (the killed node's may linger in TIME_WAIT: "address already in use"),
    # and the run goes on only once the SuperLink has registered the restarted node.
    node_ports[1] = _free_port()
    nodes[1] = start_node(1, "-restarted")
    _wait_for(
        lambda: superlink_log.read_text(errors="replace").count("Activated node_id") >= 3,
        60, "the restarted SuperNode to register", procs,
    )

    _finish(procs, run_proc, run_log)
    rows = _read_metrics(out)
    _check_metrics(rows, rounds)

    # The restarted node rejoined: the file is the same one (keyed by partition id),
    # and it kept counting from where it was killed.
    files = state_files()
    assert len(files) == 1, files
    after = decode_state(files[0].read_bytes())
    assert after.model is not None and after.error is not None
    assert after.steps_done > before.steps_done, (before.steps_done, after.steps_done)
    assert after.model_version > before.model_version
    assert torch.isfinite(after.model).all() and torch.isfinite(after.error).all()
    # The last round aggregated updates (from both clients once node 1 is back).
    assert int(rows[-1].get("accepted", 0)) >= 1, rows[-1]
    print(
        f"rounds at kill: {rounds_at_kill}; per round (accepted, failures): "
        f"{[(r.get('accepted'), r.get('failures')) for r in rows]}; "
        f"client-1 steps {before.steps_done} -> {after.steps_done}, "
        f"version {before.model_version} -> {after.model_version}"
    )
