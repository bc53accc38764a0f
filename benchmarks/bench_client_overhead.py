"""A client's own work per message, in-process: SparseMod around a train function, at MLP size.

Plays rounds of bidirectional top-K (1 %) on an in-process Grid (``tests/inprocess.py``: real
Messages, the real ClientApp and mod, no Ray) with 10 and 100 clients, all sampled, and splits
each message's time in the ClientApp into

* ``user``: the user's train function (here: add a fixed random step to the model, about what
  unpacking and repacking an ArrayRecord costs a real train function);
* ``top-k``: the compressor;
* ``overhead``: everything else the mod does (sync, hash check, state load/save, error
  feedback, encoding, the report) -- the issue's target is at most 0.5 ms;

beside the same ClientApp without the mod (``plain``: Flower's own per-message cost in-process,
the baseline measured in the same run).

    python benchmarks/bench_client_overhead.py [--clients 10 100] [--rounds 8]

Not a timed test: numbers depend on the machine (the load is printed).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import numpy as np  # noqa: E402
import torch  # noqa: E402
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict  # noqa: E402
from flwr.clientapp import ClientApp  # noqa: E402
from flwr.common.logger import FLOWER_LOGGER  # noqa: E402
from inprocess import InProcessGrid  # noqa: E402

from fl_sparse import compressors  # noqa: E402
from fl_sparse.clients import SparseMod  # noqa: E402
from fl_sparse.strategies import BidirectionalTopKSGD  # noqa: E402
from fl_sparse.tasks.models import build_model  # noqa: E402


def measure(clients: int, rounds: int, with_mod: bool) -> dict[str, float]:
    model = build_model("mlp-784-64-10", num_classes=10, seed=0)
    init = ArrayRecord(model.state_dict())
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    steps = {k: (np.random.default_rng(1).standard_normal(s) * 0.01).astype(np.float32) for k, s in shapes.items()}
    user = [0.0]
    app = ClientApp(mods=[SparseMod(durable=False)] if with_mod else [])

    @app.train()
    def train(msg, context):
        t = time.perf_counter()
        arrays = msg.content["arrays"]
        out = ArrayRecord({k: Array(arrays[k].numpy() - steps[k]) for k in arrays.keys()})
        reply = Message(RecordDict({"arrays": out, "metrics": MetricRecord({"num-examples": 10})}), reply_to=msg)
        user[0] += time.perf_counter() - t
        return reply

    folder = tempfile.mkdtemp(dir="/dev/shm" if Path("/dev/shm").is_dir() else None)
    grid = InProcessGrid(app, clients, node_config=lambda i: {"state-dir": folder})
    inner, spent, calls = grid.client_app, [0.0], [0]

    def timed(msg, ctx):
        t = time.perf_counter()
        reply = inner(msg, ctx)
        spent[0] += time.perf_counter() - t
        calls[0] += 1
        return reply

    grid.client_app = timed
    topk, real_call = [0.0], compressors.TopK.__call__

    def timed_topk(self, x, *a, **k):
        t = time.perf_counter()
        out = real_call(self, x, *a, **k)
        topk[0] += time.perf_counter() - t
        return out

    compressors.TopK.__call__ = timed_topk
    try:
        strategy = BidirectionalTopKSGD(ratio=0.01, fraction_evaluate=0.0, min_train_nodes=clients,
                                        min_available_nodes=clients)
        strategy.initialize(init)
        if with_mod:
            strategy.identify(grid)
        arrays = init
        for t in range(1, rounds + 1):
            if t == 3:  # rounds 1-2: dense first syncs, caches warming up
                spent[0] = user[0] = topk[0] = 0.0
                calls[0] = 0
            config = ConfigRecord({"server-round": t})
            if with_mod:
                messages = list(strategy.configure_train(t, arrays, config, grid))
                arrays, _ = strategy.aggregate_train(t, list(grid.send_and_receive(messages)))
            else:
                messages = [Message(RecordDict({"arrays": init, "config": config}), message_type="train",
                                    dst_node_id=n) for n in grid.node_ids]
                list(grid.send_and_receive(messages))
    finally:
        compressors.TopK.__call__ = real_call
    per = lambda x: 1e3 * x / max(1, calls[0])  # noqa: E731
    return {"total": per(spent[0]), "user": per(user[0]), "topk": per(topk[0]),
            "overhead": per(spent[0] - user[0] - topk[0])}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", type=int, nargs="+", default=[10, 100])
    ap.add_argument("--rounds", type=int, default=8)
    args = ap.parse_args(argv)
    FLOWER_LOGGER.setLevel("WARNING")
    torch.set_num_threads(1)
    print(f"load average at start: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs; mlp-784-64-10 (d = 50,890), "
          f"bidirectional top-K 1 %; ms per message")
    print(f"{'clients':>8} {'plain':>8} {'with mod':>9} {'user':>7} {'top-k':>7} {'overhead':>9} {'overhead/plain':>15}")
    for n in args.clients:
        plain = measure(n, args.rounds, with_mod=False)
        mod = measure(n, args.rounds, with_mod=True)
        print(f"{n:>8} {plain['total']:>8.3f} {mod['total']:>9.3f} {mod['user']:>7.3f} {mod['topk']:>7.3f} "
              f"{mod['overhead']:>9.3f} {mod['overhead'] / plain['total']:>15.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
