"""Per-round server cost and state size against the total number of clients (10 sampled per round).

For N = 100, 1,000 and 10,000 clients it builds the strategy and an in-process Grid
(``tests/inprocess.py``: a real ClientApp with :class:`~fl_sparse.clients.SparseMod`, no Ray), lets
every node identify itself, then plays rounds in which 10 clients are sampled, and reports

* ``s/round``: median seconds of a round (sampling, configure_train with the syncs, the 10
  clients' work, aggregate_train), and its ratio to N = 100 (the issue's target: <= 1.5 at 10,000);
* ``server B/client``: the strategy's per-client bookkeeping (client versions, accepted rounds,
  node keys; SSGD-MV-AD's stored votes), measured with ``tracemalloc`` around a round and divided
  by the clients the server knows;
* ``state B/client``: bytes of the clients' state files (model copy and error memory) per client
  that trained, and in total.

    python benchmarks/bench_scale.py [--clients 100 1000 10000] [--rounds 6] [--strategy bidirectional-topk]

Not a timed test: numbers depend on the machine (printed load).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import numpy as np  # noqa: E402
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict  # noqa: E402
from flwr.clientapp import ClientApp  # noqa: E402
from flwr.common.logger import FLOWER_LOGGER  # noqa: E402
from inprocess import InProcessGrid  # noqa: E402

from fl_sparse.clients import SparseMod  # noqa: E402
from fl_sparse.strategies import build_strategy  # noqa: E402

D = 50_890  # mlp-784-64-10
SAMPLED = 10


def _app() -> ClientApp:
    app = ClientApp(mods=[SparseMod(durable=False)])

    @app.train()
    def train(msg: Message, context) -> Message:
        pid = int(context.node_config["partition-id"])
        rnd = int(msg.content["config"]["server-round"])
        w = msg.content["arrays"]["w"].numpy()
        step = np.random.default_rng(pid * 1000 + rnd).standard_normal(w.shape).astype(np.float32) * 0.01
        return Message(RecordDict({"arrays": ArrayRecord({"w": Array(w - step)}),
                                   "metrics": MetricRecord({"num-examples": 10.0})}), reply_to=msg)

    return app


def _server_bytes(strategy) -> int:
    """Sizes of the per-client containers the strategy keeps (pickled size, a fair proxy)."""
    import pickle

    st = strategy.state
    parts = [st.client_versions, st.accepted, strategy.node_keys]
    votes = getattr(strategy, "votes", None)
    if votes:
        parts.append({n: (r, v.numpy()) for n, (r, v) in votes.items()})
    return sum(len(pickle.dumps(p)) for p in parts)


def run(clients: int, rounds: int, strategy_name: str, state_root: Path) -> dict:
    folder = Path(tempfile.mkdtemp(prefix=f"scale-{clients}-", dir=state_root))
    grid = InProcessGrid(_app(), clients, node_config=lambda i: {"state-dir": str(folder)})
    strategy = build_strategy(strategy_name, ratio=0.01, fraction_train=SAMPLED / clients, min_train_nodes=SAMPLED,
                              min_available_nodes=1, fraction_evaluate=0.0, seed=0)
    strategy.initialize(ArrayRecord({"w": Array(np.linspace(-1, 1, D, dtype=np.float32))}))
    t0 = time.perf_counter()
    strategy.identify(grid)
    identify = time.perf_counter() - t0
    arrays = strategy.current_arrays()
    times = []
    tracemalloc.start()
    for t in range(1, rounds + 1):
        start = time.perf_counter()
        messages = list(strategy.configure_train(t, arrays, ConfigRecord({"server-round": t}), grid))
        replies = list(grid.send_and_receive(messages))
        new, _ = strategy.aggregate_train(t, replies)
        arrays = new if new is not None else arrays
        times.append(time.perf_counter() - start)
    tracemalloc.stop()
    files = list(folder.rglob("*.state"))
    state_total = sum(f.stat().st_size for f in files)
    return {
        "clients": clients,
        "identify_s": identify,
        "s_round": statistics.median(times[1:]),
        "known": len(strategy.node_keys),
        "server_bytes": _server_bytes(strategy),
        "trained": len(files),
        "state_total": state_total,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", type=int, nargs="+", default=[100, 1000, 10_000])
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--strategy", default="bidirectional-topk")
    args = ap.parse_args(argv)
    FLOWER_LOGGER.setLevel("WARNING")
    root = Path("/dev/shm") if Path("/dev/shm").is_dir() else Path(tempfile.gettempdir())
    print(f"load average at start: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs; strategy {args.strategy}, "
          f"d = {D}, {SAMPLED} sampled per round")
    rows = [run(n, args.rounds, args.strategy, root) for n in args.clients]
    base = rows[0]["s_round"]
    print(f"{'clients':>8} {'identify s':>10} {'s/round':>9} {'x first':>8} {'server B/client':>16} "
          f"{'state B/client':>15} {'state MB total':>15}")
    for r in rows:
        per_client = r["state_total"] / max(1, r["trained"])
        print(f"{r['clients']:>8} {r['identify_s']:>10.2f} {r['s_round']:>9.4f} {r['s_round'] / base:>8.2f} "
              f"{r['server_bytes'] / max(1, r['known']):>16.1f} {per_client:>15.0f} {r['state_total'] / 1e6:>15.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
