"""Deployment round time: where a round goes with a SuperLink and three SuperNodes on 127.0.0.1.

Starts ``flower-superlink`` (insecure, ``--isolation subprocess``, runtime
dependency installation off) and three ``flower-supernode`` processes on
loopback, with ``FLWR_HOME`` in a temporary folder (outside any app folder),
and times rounds of

* ``noop``   -- a no-op Flower app this script writes to a temporary folder: the
  ClientApp replies at once; the ServerApp sends N rounds of train messages to
  the three nodes with ``grid.send_and_receive`` and records each round's
  seconds. This is Flower's own floor on the setup.
* ``torch-min`` -- a minimal torch ClientApp (imports torch, one hand-written
  SGD step of the same MLP on a random batch, replies with its top 1%): what any
  torch ClientApp pays in Flower's one-process-per-message model.
* ``repo``   -- the repo's app exactly as ``flwr run`` runs it (default MLP,
  ``strategy='bidirectional-topk'``, ``local-steps=1``); a round's wall time is
  the gap between two rows of its ``metrics.jsonl`` (watched from here), its
  ``round_seconds`` is the strategy's configure_train -> aggregate_train time.
* ``repo-traced`` -- the same ServerApp/ClientApp wrapped by this script's app:
  the wrapper times every ``send_and_receive`` and, in each ClientApp process,
  process start, the import of ``fl_sparse.clients.app`` (torch included),
  the dataset load and the rest of the train call (the split itself comes
  from fl-sparse's disk cache of partitions, so ``datasets`` and
  ``flwr_datasets`` are not imported per message any more). The wrapper changes nothing in fl-sparse.

Knobs measured (see docs/deployment.md, "Deployment round time"):

* ``fast`` -- the ServerApp replaces ``grid.send_and_receive`` (Flower's HTTP
  Grid sleeps a fixed 3 s between polls for replies) by ``push_messages`` +
  ``pull_messages`` polled every 0.05 s: something a ServerApp can do itself.
* ``superexec-poll`` -- ``FLWR_SUPEREXEC_TASK_POLL_INTERVAL=0.05`` for the
  SuperNodes' SuperExec (default 1 s between task polls).
* ``process`` -- ``flower-supernode --isolation process`` with a separately
  started ``flower-superexec`` per node instead of ``subprocess``.
* ``nostream`` -- ``flwr run`` without ``--stream``.

    python benchmarks/bench_deployment.py [--rounds 6] [--setups noop,repo,...] [--json out.json]

Also printed: the CPUs an idle cluster keeps busy (polling and heartbeats).
Every process started here runs in its own session and is killed at the end.
Not a timed test: numbers depend on the machine and on its load (printed).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

APP_DIR = Path(__file__).resolve().parents[1]
NODES = 3
FAST_POLL = 0.05

# ------------------------------------------------------------------ the benchmark's own Flower app
BENCH_PYPROJECT = """\
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "deploybench"
version = "1.0.0"
description = "fl-sparse deployment round-time benchmark app"
license = "Apache-2.0"
dependencies = []

[tool.hatch.build.targets.wheel]
packages = ["deploybench"]

[tool.flwr.app]
publisher = "bench"

[tool.flwr.app.components]
serverapp = "deploybench.server_app:app"
clientapp = "deploybench.{client}:app"

[tool.flwr.app.config]
mode = "noop"          # noop | repo
nodes = 3
fast-poll = 0.0        # > 0: poll for replies every this many seconds instead of send_and_receive's 3 s
trace = ""             # JSON-lines file the processes append their timestamps to
{repo_config}
"""


def _repo_run_config() -> str:
    """The repo app's [tool.flwr.app.config] as TOML lines (mode=repo passes them to fl-sparse)."""
    import tomllib

    config = tomllib.loads((APP_DIR / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    config.setdefault("num-rounds", 5)
    config.setdefault("out", "")
    return "\n".join(f"{key} = {json.dumps(value)}" for key, value in config.items())

TRACE_PY = '''\
"""Timestamps of this process, appended as JSON lines to the run's trace file."""
import json
import os
import time


def process_start() -> float:
    """Wall-clock start of this process (from /proc: 10 ms resolution)."""
    try:
        ticks = int(open("/proc/self/stat").read().rsplit(")", 1)[1].split()[19])
        btime = next(int(l.split()[1]) for l in open("/proc/stat") if l.startswith("btime"))
        return btime + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return float("nan")


def write(path: str, record: dict) -> None:
    if path:
        with open(path, "a") as fh:
            fh.write(json.dumps(record) + "\\n")


def client(context, server_round: int, imports: tuple, ds0: float, ds1: float, load1: float, call0: float,
           call1: float) -> None:
    """One ClientApp message's timestamps (``imports``: before and after the app module's imports)."""
    write(str(context.run_config.get("trace", "")), {
        "kind": "client", "node": int(context.node_config.get("partition-id", -1)), "round": int(server_round),
        "pid": os.getpid(), "proc": process_start(), "imp0": imports[0], "imp1": imports[1],
        "ds0": ds0, "ds1": ds1, "load1": load1, "call0": call0, "call1": call1,
    })
'''

NOOP_CLIENT_PY = '''\
"""A ClientApp that replies at once (plus its timestamps)."""
import time

T_IMPORT0 = time.time()
from flwr.app import Context, Message, MetricRecord, RecordDict  # noqa: E402
from flwr.clientapp import ClientApp  # noqa: E402

from deploybench import trace  # noqa: E402

T_IMPORT1 = time.time()
app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    t0 = time.time()
    reply = Message(RecordDict({"metrics": MetricRecord({"num-examples": 1})}), reply_to=msg)
    trace.client(context, msg.content["config"]["server-round"], (T_IMPORT0, T_IMPORT1), t0, t0, t0, t0, time.time())
    return reply
'''

TORCH_CLIENT_PY = '''\
"""A minimal torch ClientApp: import torch, one SGD step of the MLP on a random batch, top-1% reply."""
import time

T_IMPORT0 = time.time()
import torch  # noqa: E402
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict  # noqa: E402
from flwr.clientapp import ClientApp  # noqa: E402

from deploybench import trace  # noqa: E402

T_IMPORT1 = time.time()
app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    t0 = time.time()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))
    x, y = torch.randn(10, 1, 28, 28), torch.randint(0, 10, (10,))
    torch.nn.functional.cross_entropy(model(x), y).backward()
    with torch.no_grad():
        for p in model.parameters():  # plain SGD by hand: torch.optim.SGD() imports torch._dynamo
            p.add_(p.grad, alpha=-0.05)
        flat = torch.cat([p.reshape(-1) for p in model.parameters()])
        top = torch.topk(flat.abs(), max(1, flat.numel() // 100))
    reply = Message(RecordDict({"arrays": ArrayRecord([top.indices.numpy(), flat[top.indices].numpy()]),
                                "metrics": MetricRecord({"num-examples": 10})}), reply_to=msg)
    trace.client(context, msg.content["config"]["server-round"], (T_IMPORT0, T_IMPORT1), t0, t0, t0, t0, time.time())
    return reply
'''

REPO_CLIENT_PY = '''\
"""fl-sparse's ClientApp, unchanged, with timestamps around its parts."""
import time

T_IMPORT0 = time.time()
from flwr.app import Context, Message  # noqa: E402
from flwr.clientapp import ClientApp  # noqa: E402

from fl_sparse.clients.app import app as inner  # noqa: E402  (imports torch)
from deploybench import trace  # noqa: E402

T_IMPORT1 = time.time()
app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    t0 = t1 = t2 = time.time()
    config = msg.content["config"] if "config" in msg.content else None  # None: fl-sparse's identify message
    if config is not None:
        # The split comes from fl-sparse's disk cache (no datasets/flwr_datasets import);
        # ds0..ds1 is kept as a column so older traces compare.
        t1 = time.time()
        from fl_sparse.tasks.data import load_dataset
        load_dataset(str(config["dataset"]))  # cached per process: the inner call reuses it
        t2 = time.time()
    reply = inner(msg, context)
    t3 = time.time()
    server_round = config.get("server-round", 0) if config is not None else 0
    trace.client(context, server_round, (T_IMPORT0, T_IMPORT1), t0, t1, t2, t2, t3)
    return reply
'''

SERVER_PY = '''\
"""mode=noop: N rounds of no-op train messages; mode=repo: fl-sparse's run_server on a timed Grid."""
import json
import time

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

from deploybench import trace

app = ServerApp()


def send_and_receive(grid, messages, fast_poll: float, timeout: float = 900.0):
    """grid.send_and_receive, or the same through push/pull polled every fast_poll seconds."""
    if fast_poll <= 0:
        return list(grid.send_and_receive(messages, timeout=timeout))
    ids = set(grid.push_messages(messages))
    replies, end = [], time.monotonic() + timeout
    while ids and time.monotonic() < end:
        got = list(grid.pull_messages(ids))
        replies += got
        ids -= {m.metadata.reply_to_message_id for m in got}
        if ids:
            time.sleep(fast_poll)
    return replies


class TimedGrid:
    """Delegates to Flower's Grid; times (and optionally fast-polls) send_and_receive."""

    def __init__(self, grid, fast_poll: float, trace_path: str) -> None:
        self._grid, self._fast, self._trace = grid, fast_poll, trace_path

    def __getattr__(self, name):
        return getattr(self._grid, name)

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        rounds = {m.content["config"].get("server-round", 0) for m in messages if "config" in m.content}
        t0 = time.time()
        replies = send_and_receive(self._grid, messages, self._fast, timeout or 900.0)
        trace.write(self._trace, {"kind": "server", "round": int(max(rounds, default=0)), "n": len(messages),
                                  "replies": len(replies), "ok": sum(not m.has_error() for m in replies),
                                  "push": t0, "recv": time.time()})
        return replies


def _wait_nodes(grid, n: int) -> list[int]:
    while len(nodes := sorted(grid.get_node_ids())) < n:
        time.sleep(0.5)
    return nodes


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = dict(context.run_config)
    mode, rounds, fast = str(cfg.pop("mode")), int(cfg["num-rounds"]), float(cfg.pop("fast-poll"))
    trace_path, nodes = str(cfg.pop("trace")), int(cfg.pop("nodes"))
    if mode == "repo":
        from fl_sparse.server_app import RunConfig, run_server
        run_server(TimedGrid(grid, fast, trace_path), RunConfig.from_run_config(cfg))
        return
    ids = _wait_nodes(grid, nodes)
    timed = TimedGrid(grid, fast, trace_path)
    for r in range(1, rounds + 1):
        msgs = [Message(RecordDict({"config": ConfigRecord({"server-round": r})}), dst_node_id=n,
                        message_type="train", group_id=str(r)) for n in ids]
        t0 = time.perf_counter()
        replies = timed.send_and_receive(msgs)
        bad = [m for m in replies if m.has_error()]
        print(f"round {r}: {time.perf_counter() - t0:.2f} s, {len(replies) - len(bad)}/{len(ids)} replies", flush=True)
'''


def write_bench_app(folder: Path, client: str) -> Path:
    """The benchmark's Flower app (client = noop_client | torch_client | repo_client) in ``folder``."""
    pkg = folder / "deploybench"
    pkg.mkdir(parents=True, exist_ok=True)
    (folder / "pyproject.toml").write_text(BENCH_PYPROJECT.format(client=client, repo_config=_repo_run_config()))
    (pkg / "__init__.py").write_text("")
    (pkg / "trace.py").write_text(TRACE_PY)
    (pkg / "noop_client.py").write_text(NOOP_CLIENT_PY)
    (pkg / "repo_client.py").write_text(REPO_CLIENT_PY)
    (pkg / "torch_client.py").write_text(TORCH_CLIENT_PY)
    (pkg / "server_app.py").write_text(SERVER_PY)
    return folder


# ------------------------------------------------------------------ processes
def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Cluster:
    """SuperLink + NODES SuperNodes on 127.0.0.1, each in its own session (killed with its group)."""

    def __init__(self, tmp: Path, name: str, env: dict[str, str], isolation: str = "subprocess") -> None:
        self.dir = tmp / name
        self.dir.mkdir(parents=True)
        self.env, self.isolation = env, isolation
        self.procs: list[subprocess.Popen] = []
        self.port = free_port()

    def _start(self, name: str, args: list[str], env: dict[str, str] | None = None) -> Path:
        log = self.dir / f"{name}.log"
        with open(log, "wb") as fh:
            self.procs.append(subprocess.Popen(args, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                               env=env or self.env, cwd=self.dir, start_new_session=True))
        return log

    def start(self, node_env: dict[str, str]) -> None:
        link_log = self._start("superlink", [
            "flower-superlink", "--insecure", "--isolation", "subprocess", "--disable-runtime-dependency-installation",
            "--host", "127.0.0.1", "--port", str(self.port), "--database", str(self.dir / "state.db")])
        self._wait(lambda: "Uvicorn running on" in link_log.read_text(errors="replace"), 120, "SuperLink")
        env = {**self.env, **node_env}
        for k in range(NODES):
            node_port = free_port()
            self._start(f"supernode{k}", [
                "flower-supernode", "--insecure", "--superlink", f"127.0.0.1:{self.port}", "--port", str(node_port),
                "--isolation", self.isolation,
                "--node-config", f"partition-id={k} num-partitions={NODES} state-dir='{self.dir / f'node{k}'}'"], env)
            if self.isolation == "process":
                self._start(f"superexec{k}", ["flower-superexec", "--insecure",
                                              "--runtime-api-address", f"127.0.0.1:{node_port}"], env)
        self._wait(lambda: link_log.read_text(errors="replace").count("Activated node_id") >= NODES, 180, "SuperNodes")

    def cpu_seconds(self) -> float:
        """CPU seconds used so far by every live process of the cluster (children included)."""
        tick = os.sysconf("SC_CLK_TCK")
        stats: dict[int, tuple[int, float]] = {}
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                    stats[int(entry.name)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / tick)
                except (OSError, ValueError, IndexError):
                    continue
        todo, total, seen = [p.pid for p in self.procs], 0.0, set()
        while todo:
            pid = todo.pop()
            if pid in seen or pid not in stats:
                continue
            seen.add(pid)
            total += stats[pid][1]
            todo += [c for c, (ppid, _) in stats.items() if ppid == pid]
        return total

    def idle_cpu(self, seconds: float = 20.0) -> float:
        """Mean CPUs the idle cluster keeps busy (polling, heartbeats) over ``seconds``."""
        before = self.cpu_seconds()
        time.sleep(seconds)
        return (self.cpu_seconds() - before) / seconds

    def _wait(self, predicate, timeout: float, what: str) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if predicate():
                return
            if any(p.poll() is not None for p in self.procs):
                raise RuntimeError(f"a process exited while waiting for {what}; logs in {self.dir}")
            time.sleep(0.2)
        raise RuntimeError(f"timed out waiting for {what}; logs in {self.dir}")

    def stop(self) -> None:
        for proc in reversed(self.procs):
            for sig in (signal.SIGTERM, signal.SIGKILL):
                try:
                    os.killpg(proc.pid, sig)
                except (ProcessLookupError, PermissionError):
                    break
                try:
                    proc.wait(timeout=5)
                    break
                except subprocess.TimeoutExpired:
                    continue

    def flwr_run(self, app: Path, run_config: str, *, stream: bool, watch: Path | None, timeout: float) -> dict:
        """``flwr run``; returns wall time and, with ``watch``, when each metrics.jsonl row appeared."""
        (Path(self.env["FLWR_HOME"]) / "config.toml").write_text(
            f'[superlink]\ndefault = "bench"\n\n[superlink.bench]\naddress = "127.0.0.1:{self.port}"\ninsecure = true\n')
        args = ["flwr", "run", str(app), "bench", "--run-config", run_config] + (["--stream"] if stream else [])
        log = self.dir / f"flwr-run-{time.monotonic_ns()}.log"
        t0 = time.time()
        with open(log, "wb") as fh:
            proc = subprocess.Popen(args, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    env=self.env, cwd=self.dir, start_new_session=True)
        rows_at: list[float] = []
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if watch is not None:
                n = _row_count(watch)
                while len(rows_at) < n:
                    rows_at.append(time.time())
            if proc.poll() is not None:
                break
            time.sleep(0.05)
        else:
            os.killpg(proc.pid, signal.SIGKILL)
            raise RuntimeError(f"flwr run timed out; log {log}")
        if watch is not None and len(rows_at) < _row_count(watch):
            rows_at.append(time.time())  # written just before flwr run returned
        if proc.returncode != 0:
            raise RuntimeError(f"flwr run exited {proc.returncode}; log {log}")
        return {"start": t0, "end": time.time(), "rows_at": rows_at, "log": str(log)}


def _row_count(path: Path) -> int:
    """Complete lines of a metrics.jsonl (the run appends one per round)."""
    try:
        return path.read_text().count("\n")
    except OSError:
        return 0


# ------------------------------------------------------------------ analysis
def read_trace(path: Path) -> tuple[list[dict], list[dict]]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
    return [r for r in rows if r["kind"] == "server"], [r for r in rows if r["kind"] == "client"]


def breakdown(server: list[dict], clients: list[dict], skip_first: bool = True) -> dict:
    """Mean seconds per part of a round, over rounds (the first skipped) and nodes."""
    parts: dict[str, list[float]] = {k: [] for k in (
        "round", "deliver+launch", "clientapp boot", "app import", "datasets import", "dataset load",
        "train call", "return (last node)")}
    by_round = {r["round"]: r for r in server if r["n"] and r["round"] > 0}
    for rnd, srv in sorted(by_round.items()):
        if skip_first and rnd == min(by_round):
            continue
        cs = [c for c in clients if c["round"] == rnd and srv["push"] <= c["call1"] <= srv["recv"] + 1]
        if not cs:
            continue
        parts["round"].append(srv["recv"] - srv["push"])
        for c in cs:
            parts["deliver+launch"].append(c["proc"] - srv["push"])
            parts["clientapp boot"].append(c["imp0"] - c["proc"])
            parts["app import"].append(c["imp1"] - c["imp0"])
            parts["datasets import"].append(c["ds1"] - c["ds0"])
            parts["dataset load"].append(c["load1"] - c["ds1"])
            parts["train call"].append(c["call1"] - c["call0"])
        parts["return (last node)"].append(srv["recv"] - max(c["call1"] for c in cs))
    return {k: (statistics.mean(v) if v else float("nan")) for k, v in parts.items()}


def round_times_from_trace(server: list[dict]) -> list[float]:
    return [r["recv"] - r["push"] for r in sorted(server, key=lambda r: r["push"]) if r["n"] and r["round"] > 0]


def _median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


# ------------------------------------------------------------------ setups
SETUPS = {
    # name: (cluster, app, fast_poll, stream)
    "noop": ("default", "noop", 0.0, True),
    "noop-nostream": ("default", "noop", 0.0, False),
    "noop-fast": ("default", "noop", FAST_POLL, True),
    "torch-min": ("default", "torch-min", 0.0, True),
    "repo": ("default", "repo", 0.0, True),
    "repo-traced": ("default", "repo-traced", 0.0, True),
    "repo-traced-fast": ("default", "repo-traced", FAST_POLL, True),
    "noop+superexec-poll": ("superexec-poll", "noop", 0.0, True),
    "noop-fast+superexec-poll": ("superexec-poll", "noop", FAST_POLL, True),
    "repo-traced-fast+superexec-poll": ("superexec-poll", "repo-traced", FAST_POLL, True),
    "noop-process": ("process", "noop", 0.0, True),
}
CLUSTERS = {
    "default": ({}, "subprocess"),
    "superexec-poll": ({"FLWR_SUPEREXEC_TASK_POLL_INTERVAL": str(FAST_POLL)}, "subprocess"),
    "process": ({}, "process"),
}


def run_setup(cluster: Cluster, tmp: Path, name: str, rounds: int) -> dict:
    _, app, fast, stream = SETUPS[name]
    work = tmp / "runs" / name
    work.mkdir(parents=True)
    trace = work / "trace.jsonl"
    out = work / "out"
    if app == "repo":
        cfg = f"num-rounds={rounds} local-steps=1 strategy='bidirectional-topk' clients={NODES} out='{out}'"
        res = cluster.flwr_run(APP_DIR, cfg, stream=stream, watch=out / "metrics.jsonl", timeout=60 * rounds + 600)
        rows = json.loads((out / "metrics.json").read_text())
        walls = [b - a for a, b in zip(res["rows_at"], res["rows_at"][1:])]  # round 2.. (row r-1 -> row r)
        return {"setup": name, "round_s": walls, "strategy_round_s": [r.get("round_seconds") for r in rows[1:]],
                "parts": None, "wall": res["end"] - res["start"]}
    client = {"noop": "noop_client", "torch-min": "torch_client"}.get(app, "repo_client")
    folder = write_bench_app(tmp / "apps" / name, client)
    if app in ("noop", "torch-min"):
        cfg = f"mode='noop' num-rounds={rounds} nodes={NODES} fast-poll={fast} trace='{trace}'"
    else:
        cfg = (f"mode='repo' num-rounds={rounds} nodes={NODES} fast-poll={fast} trace='{trace}' "
               f"local-steps=1 strategy='bidirectional-topk' clients={NODES} out='{out}'")
    res = cluster.flwr_run(folder, cfg, stream=stream, watch=None, timeout=60 * rounds + 600)
    if not stream:  # flwr run returned after submitting: wait for the rounds in the trace
        end = time.monotonic() + 60 * rounds + 300
        while len([s for s in read_trace(trace)[0] if s["round"] > 0]) < rounds and time.monotonic() < end:
            time.sleep(0.2)
        time.sleep(1.0)
    server, clients = read_trace(trace)
    failed = [r for r in server if r["ok"] < r["n"]]
    if failed:
        raise RuntimeError(f"{name}: error replies in rounds {[r['round'] for r in failed]}; logs in {cluster.dir}")
    return {"setup": name, "round_s": round_times_from_trace(server)[1:], "parts": breakdown(server, clients),
            "wall": res["end"] - res["start"]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=6, help="rounds per run; the first is left out of the numbers")
    ap.add_argument("--setups", default=",".join(SETUPS), help=f"comma-separated, from: {', '.join(SETUPS)}")
    ap.add_argument("--json", default="", help="write the results here too")
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder (logs)")
    args = ap.parse_args(argv)
    names = [s for s in args.setups.split(",") if s]
    unknown = [s for s in names if s not in SETUPS]
    if unknown:
        ap.error(f"unknown setups {unknown}")
    for tool in ("flower-superlink", "flower-supernode", "flwr"):
        if shutil.which(tool) is None:
            print(f"{tool} not on PATH", file=sys.stderr)
            return 2

    tmp = Path(tempfile.mkdtemp(prefix="fl-sparse-bench-deploy-"))
    env = dict(os.environ)
    env.update({"FLWR_HOME": str(tmp / "flwr-home"), "FLWR_DISABLE_UPDATE_CHECK": "1",
                "FLWR_TELEMETRY_ENABLED": "0", "PYTHONUNBUFFERED": "1"})
    env.pop("FL_SPARSE_STATE_DIR", None)
    # Flower's processes import fl_sparse (repo-traced) from this checkout, whatever is pip-installed.
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(APP_DIR), env.get("PYTHONPATH", "")]))
    Path(env["FLWR_HOME"]).mkdir()
    print(f"load average at start: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs; logs in {tmp}", flush=True)
    results: list[dict] = []
    try:
        for cname in dict.fromkeys(SETUPS[n][0] for n in names):
            node_env, isolation = CLUSTERS[cname]
            cluster = Cluster(tmp, cname, env, isolation)
            try:
                cluster.start(node_env)
                time.sleep(5)
                idle = cluster.idle_cpu()
                print(f"cluster {cname}: idle SuperLink + {NODES} SuperNodes keep {idle:.3f} CPUs busy", flush=True)
                results.append({"setup": f"cluster:{cname}", "idle_cpus": idle, "round_s": [], "parts": None})
                for name in (n for n in names if SETUPS[n][0] == cname):
                    t0 = time.monotonic()
                    res = run_setup(cluster, tmp, name, args.rounds)
                    res["load"] = os.getloadavg()[0]
                    results.append(res)
                    print(f"{name:34s} median round {_median(res['round_s']):6.2f} s  "
                          f"rounds {[round(x, 2) for x in res['round_s']]}  ({time.monotonic() - t0:.0f} s, "
                          f"load {res['load']:.1f})", flush=True)
            finally:
                cluster.stop()
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)

    base = {(SETUPS[r["setup"]][0], SETUPS[r["setup"]][2]): _median(r["round_s"])
            for r in results if r["setup"] in SETUPS and SETUPS[r["setup"]][1] == "noop" and SETUPS[r["setup"]][3]}
    print("\nsetup                              median s/round   x no-op app (same cluster, same reply polling)")
    for r in results:
        if r["setup"] not in SETUPS:
            continue
        cname, _, fast, _ = SETUPS[r["setup"]]
        ref = base.get((cname, fast), float("nan"))
        print(f"{r['setup']:34s} {_median(r['round_s']):10.2f}   {_median(r['round_s']) / ref:8.2f}")
    traced = [r for r in results if r.get("parts")]
    if traced:
        keys = list(traced[0]["parts"])
        print("\nwhere a round goes (mean s; per node except round / return):")
        print(f"{'part':22s}" + "".join(f"{r['setup'][:22]:>24s}" for r in traced))
        for k in keys:
            print(f"{k:22s}" + "".join(f"{r['parts'][k]:24.2f}" for r in traced))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
