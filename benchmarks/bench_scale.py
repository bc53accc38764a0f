"""Per-round server cost and state size against the total number of clients (10 sampled per round).

For N = 100, 1,000 and 10,000 clients it builds the strategy and an in-process Grid
(``tests/inprocess.py``: a real ClientApp with :class:`~fl_sparse.clients.SparseMod`, no Ray), lets
every node identify itself, then plays rounds in which 10 clients are sampled, and reports

* ``s/round``: median seconds of a round (sampling, configure_train with the syncs, the 10
  clients' work, aggregate_train), and its ratio to N = 100 (the issue's target: <= 1.5 at 10,000).
  The setups play their rounds interleaved (round 1 of every N, then round 2, ...), so a load
  spike on a shared machine hits every N alike;
* ``server B/client``: the strategy's per-client bookkeeping (client versions, accepted rounds,
  node keys; SSGD-MV-AD's stored votes), as the pickled size of those containers divided by the
  clients the server knows;
* ``state B/client``: bytes of the clients' state folder (state files, and the shared model
  copies under ``models/``, each hard-linked file counted once) per client that trained, and in
  total.

    python benchmarks/bench_scale.py [--clients 100 1000 10000] [--rounds 12] [--strategy bidirectional-topk]

Not a timed test: numbers depend on the machine (printed load).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import numpy as np  # noqa: E402
from flwr.app import Array, ArrayRecord, ConfigRecord  # noqa: E402
from flwr.common.logger import FLOWER_LOGGER  # noqa: E402
from inprocess import InProcessGrid, step_app  # noqa: E402

from fl_sparse.strategies import build_strategy  # noqa: E402

D = 50_890  # mlp-784-64-10
SAMPLED = 10


def _step(pid: int, rnd: int) -> np.ndarray:
    """The update client ``pid`` makes in round ``rnd``: fixed random noise, so every N sees the same work."""
    return np.random.default_rng(pid * 1000 + rnd).standard_normal(D).astype(np.float32) * 0.01


def _server_bytes(strategy) -> int:
    """Sizes of the per-client containers the strategy keeps (pickled size, a fair proxy)."""
    import pickle

    st = strategy.state
    parts = [st.client_versions, st.accepted, strategy.node_keys]
    votes = getattr(strategy, "votes", None)
    if votes:
        parts.append({n: (r, v.numpy()) for n, (r, v) in votes.items()})
    return sum(len(pickle.dumps(p)) for p in parts)


class Setup:
    """One N: the strategy, its in-process grid of N nodes, the arrays of the last round."""

    def __init__(self, clients: int, strategy_name: str, state_root: Path) -> None:
        self.clients = clients
        self.folder = Path(tempfile.mkdtemp(prefix=f"scale-{clients}-", dir=state_root))
        self.grid = InProcessGrid(step_app(_step, lambda pid: 10.0), clients)
        self.strategy = build_strategy(strategy_name, ratio=0.01, fraction_train=SAMPLED / clients,
                                       min_train_nodes=SAMPLED, min_available_nodes=1, fraction_evaluate=0.0, seed=0)
        # As in the simulation: the server names the (throw-away) state folder, so the clients
        # share model copies there (fl_sparse.clients.state, "the model store").
        self.strategy.client_state_dir = str(self.folder)
        self.strategy.client_state_fsync = False
        self.strategy.initialize(ArrayRecord({"w": Array(np.linspace(-1, 1, D, dtype=np.float32))}))
        t0 = time.perf_counter()
        self.strategy.identify(self.grid)
        self.identify_s = time.perf_counter() - t0
        self.arrays = self.strategy.current_arrays()
        self.times: list[float] = []

    def play(self, t: int) -> None:
        start = time.perf_counter()
        messages = list(self.strategy.configure_train(t, self.arrays, ConfigRecord({"server-round": t}), self.grid))
        replies = list(self.grid.send_and_receive(messages))
        new, _ = self.strategy.aggregate_train(t, replies)
        self.arrays = new if new is not None else self.arrays
        self.times.append(time.perf_counter() - start)

    def result(self) -> dict:
        files = {}
        for f in self.folder.rglob("*"):
            if f.is_file():
                st = f.stat()
                files[(st.st_dev, st.st_ino)] = st.st_size  # a hard-linked model copy counts once
        trained = len(list(self.folder.rglob("*.state")))
        return {
            "clients": self.clients,
            "identify_s": self.identify_s,
            "s_round": statistics.median(self.times[1:]),  # round 1 syncs everyone densely: left out
            "known": len(self.strategy.node_keys),
            "server_bytes": _server_bytes(self.strategy),
            "trained": trained,
            "state_total": sum(files.values()),
        }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", type=int, nargs="+", default=[100, 1000, 10_000])
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--strategy", default="bidirectional-topk")
    args = ap.parse_args(argv)
    FLOWER_LOGGER.setLevel("WARNING")
    root = Path("/dev/shm") if Path("/dev/shm").is_dir() else Path(tempfile.gettempdir())
    print(f"load average at start: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs; strategy {args.strategy}, "
          f"d = {D}, {SAMPLED} sampled per round")
    setups = [Setup(n, args.strategy, root) for n in args.clients]
    for t in range(1, args.rounds + 1):
        for setup in setups:
            setup.play(t)
    rows = [setup.result() for setup in setups]
    for setup in setups:
        shutil.rmtree(setup.folder, ignore_errors=True)
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
