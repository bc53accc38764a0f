"""A TLS deployment on 127.0.0.1 with real Flower processes, offline (docs/deployment.md, section 3).

Certificates come from ``openssl`` exactly as the docs write them (a CA, and a
server certificate for ``IP:127.0.0.1`` and ``DNS:localhost``). A TLS
SuperLink and three ``flower-supernode --root-certificates`` run the repo's
app through ``flwr run`` (``root-certificates`` in ``$FLWR_HOME/config.toml``);
SuperNode 2 is killed with SIGKILL after round 2 and restarted on a fresh port.
The run must finish with sane metrics, the restarted node's update must be
aggregated again, and its state file (keyed by partition id) must have kept
its error memory and model version across the kill.

Process handling, the offline environment and the metric checks are
``tests/test_deployment.py``'s.
"""

from __future__ import annotations

import shutil
import signal
import socket
import ssl
import subprocess
from pathlib import Path

import pytest
from test_deployment import (  # noqa: F401  (procs is a fixture)
    Procs,
    _check_metrics,
    _finish,
    _flwr_run,
    _free_port,
    _read_metrics,
    _wait_for,
    logs_on_failure,
    procs,
)

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        shutil.which("flower-superlink") is None or shutil.which("flwr") is None,
        reason="Flower CLI (flwr, flower-superlink, flower-supernode) not installed",
    ),
    pytest.mark.skipif(
        shutil.which("openssl") is None,
        reason="openssl not on PATH: the test makes its TLS certificates with the openssl CLI, as the docs do",
    ),
]

NODES = 3
ROUNDS = 5
KILLED = 2  # partition id of the SuperNode that is killed and restarted

# The commands of docs/deployment.md, section 3 ("Certificates"), run in the certificate folder.
SERVER_EXT = (
    "subjectAltName=IP:127.0.0.1,DNS:localhost\n"
    "basicConstraints=CA:FALSE\n"
    "keyUsage=digitalSignature,keyEncipherment\n"
    "extendedKeyUsage=serverAuth\n"
)
OPENSSL_COMMANDS = [
    ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-sha256", "-days", "365",
     "-subj", "/CN=fl-sparse test CA",
     "-addext", "basicConstraints=critical,CA:TRUE",
     "-addext", "keyUsage=critical,keyCertSign,cRLSign",
     "-keyout", "ca.key", "-out", "ca.crt"],
    ["openssl", "req", "-newkey", "rsa:2048", "-nodes", "-sha256", "-subj", "/CN=localhost",
     "-keyout", "server.key", "-out", "server.csr"],
    ["openssl", "x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
     "-CAcreateserial", "-days", "365", "-sha256", "-extfile", "server.ext", "-out", "server.pem"],
]


def make_certificates(folder: Path) -> Path:
    """A CA and a CA-signed server certificate for 127.0.0.1 / localhost in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "server.ext").write_text(SERVER_EXT)
    for args in OPENSSL_COMMANDS:
        done = subprocess.run(args, cwd=folder, capture_output=True, text=True)
        assert done.returncode == 0, f"{' '.join(args)} failed:\n{done.stderr}"
    return folder


def _tls_handshake(port: int, cafile: Path | None, server_hostname: str) -> None:
    """Handshake with the SuperLink's port, verifying its certificate (raises ssl.SSLError on failure)."""
    ctx = ssl.create_default_context(cafile=str(cafile) if cafile else None)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        with ctx.wrap_socket(sock, server_hostname=server_hostname):
            pass


def test_tls_deployment_supernode_restart(procs: Procs, tmp_path: Path):
    """TLS SuperLink + 3 TLS SuperNodes; SuperNode 2 is SIGKILLed after round 2 and comes back."""
    with logs_on_failure(procs):
        _tls_deployment(procs, tmp_path)


def _tls_deployment(procs: Procs, tmp_path: Path) -> None:
    import torch

    from fl_sparse.clients.state import decode_state

    certs = make_certificates(tmp_path / "certs")
    port = _free_port()
    home = Path(procs.env["FLWR_HOME"])
    (home / "config.toml").write_text(
        '[superlink]\ndefault = "local-tls"\n\n'
        f'[superlink.local-tls]\naddress = "127.0.0.1:{port}"\n'
        f'root-certificates = "{certs / "ca.crt"}"\n'
    )

    _, superlink_log = procs.start(
        "superlink",
        [
            "flower-superlink",
            "--ssl-ca-certfile", str(certs / "ca.crt"),
            "--ssl-certfile", str(certs / "server.pem"),
            "--ssl-keyfile", str(certs / "server.key"),
            "--isolation", "subprocess", "--disable-runtime-dependency-installation",
            "--host", "127.0.0.1", "--port", str(port),
            "--database", str(tmp_path / "superlink-state.db"),
        ],
    )
    log_text = lambda: superlink_log.read_text(errors="replace")  # noqa: E731
    _wait_for(lambda: "Uvicorn running on" in log_text(), 60, "SuperLink startup", procs)
    assert f"Uvicorn running on https://127.0.0.1:{port}" in log_text()

    # The port speaks TLS with a certificate that verifies for 127.0.0.1 and localhost
    # against our CA only (not against the system's trust store).
    _tls_handshake(port, certs / "ca.crt", "127.0.0.1")
    _tls_handshake(port, certs / "ca.crt", "localhost")
    with pytest.raises(ssl.SSLCertVerificationError):
        _tls_handshake(port, None, "127.0.0.1")

    node_ports = [_free_port() for _ in range(NODES)]

    def start_node(k: int, tag: str = "") -> subprocess.Popen:
        proc, _ = procs.start(
            f"supernode{k}{tag}",
            [
                "flower-supernode", "--root-certificates", str(certs / "ca.crt"),
                "--superlink", f"127.0.0.1:{port}",
                "--port", str(node_ports[k]), "--isolation", "subprocess",
                "--node-config",
                f"partition-id={k} num-partitions={NODES} state-dir='{tmp_path / f'node{k}'}'",
            ],
        )
        return proc

    nodes = [start_node(k) for k in range(NODES)]
    _wait_for(lambda: log_text().count("Activated node_id") >= NODES, 90, "all SuperNodes to register", procs)

    out = tmp_path / "out"
    run_proc, run_log = _flwr_run(
        procs, "local-tls",
        f"num-rounds={ROUNDS} local-steps=1 strategy='bidirectional-topk' clients={NODES} out='{out}'",
    )

    _wait_for(lambda: len(_read_metrics(out)) >= 2, 360, "round 2", procs)
    state_files = lambda: sorted((tmp_path / f"node{KILLED}").glob(f"gen-*/client-{KILLED}.state"))  # noqa: E731
    assert state_files(), f"SuperNode {KILLED} wrote no state file under its node-config state-dir"
    before = decode_state(state_files()[0].read_bytes())
    procs.kill(nodes[KILLED], signal.SIGKILL)
    rounds_at_kill = len(_read_metrics(out))
    node_ports[KILLED] = _free_port()  # the old port may linger in TIME_WAIT
    nodes[KILLED] = start_node(KILLED, "-restarted")
    _wait_for(
        lambda: log_text().count("Activated node_id") >= NODES + 1,
        90, "the restarted SuperNode to register", procs,
    )

    _finish(procs, run_proc, run_log, timeout=600)
    rows = _read_metrics(out)
    _check_metrics(rows, ROUNDS)
    accepted = [int(r.get("accepted") or 0) for r in rows]
    assert all(1 <= a <= NODES for a in accepted), accepted
    assert accepted[0] == NODES, accepted  # all three took part before the kill
    # The restarted node's update was aggregated again in a later round.
    assert max(accepted[rounds_at_kill:]) == NODES, (rounds_at_kill, accepted)

    # Same file (keyed by partition id, not by the new node id), still counting:
    # its error memory and model copy survived the SIGKILL and moved on.
    files = state_files()
    assert len(files) == 1, files
    after = decode_state(files[0].read_bytes())
    for state in (before, after):
        assert state.model is not None and state.error is not None
        assert torch.isfinite(state.model).all() and torch.isfinite(state.error).all()
        assert float(state.error.abs().sum()) > 0.0  # top-k keeps a residual: memory is non-zero
    assert before.steps_done == 2 * 1, before.steps_done  # 2 rounds x local-steps=1 before the kill
    assert after.steps_done > before.steps_done, (before.steps_done, after.steps_done)
    assert after.model_version > before.model_version, (before.model_version, after.model_version)
    assert not torch.equal(after.error, before.error)  # memory was used and updated after the restart
    print(
        f"rounds at kill: {rounds_at_kill}; accepted per round: {accepted}; "
        f"client-{KILLED} steps {before.steps_done} -> {after.steps_done}, "
        f"version {before.model_version} -> {after.model_version}, "
        f"|e| {float(before.error.norm()):.4f} -> {float(after.error.norm()):.4f}"
    )
