"""Seconds per round of ``fl-sparse simulate`` (Flower + Ray) against the plain loop.

For each strategy (dense FedAvg first, then every sparse one) and each client
count it runs ``simulate(RunConfig(..., quiet=True))`` and reports

* ``s/round``  -- median ``round_seconds`` over the rounds after the first
  (warm-up: Ray actors start, data loads, dense first sync). ``round_seconds``
  is measured by the strategy from ``configure_train`` to the end of
  ``aggregate_train``; Flower's ``Strategy.start`` calls ``send_and_receive``
  in between, so it covers the message round trip with Flower's polling waits.
* ``wall/round`` -- median gap between the ends of consecutive rounds (taken in
  the server's ``evaluate_fn`` callback): everything a round costs end to end,
  central evaluation (every ``--eval-every`` rounds) and the empty federated
  evaluation step included.
* ``vs dense``  -- s/round divided by dense FedAvg's at the same client count
  (target <= 1.0);
* ``scan/round`` -- seconds per round the simulation engine's dispatcher
  spent in ``InMemoryLinkState.get_message_ins`` (measured by wrapping it,
  behaviour unchanged). Flower's dispatcher thread asks the link state for
  each node's next message every 0.1 s, and each ask walks every stored
  message: O(nodes x messages in flight) under the GIL, in the process that
  also runs the server and the Ray calls. It is Flower's cost, not ours; the
  column shows how much of a round it takes.
* ``vs plain``  -- s/round divided by the plain loop
  (:func:`fl_sparse.simulations.reference.reference_run`) doing the same work
  per round (target <= 3 at 100 clients). Strategies without a reference loop
  are compared with the plain loop of top-K.

Before the simulations it prints the client's own cost per message, measured
in-process without Ray (:mod:`bench_client_overhead`): the mod's overhead
(everything but the train function and the compressor; target <= 0.5 ms)
beside Flower's floor (a no-op ClientApp) and the plain ClientApp without
the mod, at the same client counts, with ratios; the per-message cost of the
plain loop (plain s/round / clients) is in the summary beside it.

    python benchmarks/bench_rounds.py [--clients 10 100] [--rounds 8] [--quick]
    python benchmarks/bench_rounds.py --client-overhead-only [--overhead-baseline DIR]

Not a timed test: numbers depend on the machine (Ray actors share its cores).
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(1, str(Path(__file__).resolve().parent))  # bench_client_overhead

from fl_sparse.server_app import RunConfig  # noqa: E402

STRATEGIES = ["fedavg", "topk", "bidirectional-topk", "rtopk", "hard-threshold", "adaptive-topk"]
REFERENCE = {"fedavg", "topk", "bidirectional-topk", "rtopk", "hard-threshold"}


# Rounds that sit at the engine's floor (10 clients: one 0.1 s dispatcher tick
# per message exchange) differ from dense FedAvg by timing noise only; flag a
# strategy as dearer than dense beyond 5 %. SSGD-MV needs two exchanges per
# round (vote, then values), so at the floor it costs two ticks.
DENSE_TOLERANCE = 1.05


def _strategies() -> list[str]:
    names = list(STRATEGIES)
    if importlib.util.find_spec("fl_sparse.strategies.ssgd_mv") is not None:
        names.append("ssgd-mv")
    return names


def _extra(strategy: str) -> dict:
    return {"threshold": 0.002} if strategy == "hard-threshold" else {}


class ScanMeter:
    """Cumulative seconds spent in ``InMemoryLinkState.get_message_ins`` (wrapped, same result)."""

    seconds = 0.0

    @classmethod
    def install(cls) -> None:
        from flwr.server.superlink.linkstate.in_memory_linkstate import InMemoryLinkState

        original = InMemoryLinkState.get_message_ins
        if getattr(original, "_scan_meter", False):
            return

        def metered(self, *args, **kwargs):
            start = time.perf_counter()
            try:
                return original(self, *args, **kwargs)
            finally:
                cls.seconds += time.perf_counter() - start

        metered._scan_meter = True
        InMemoryLinkState.get_message_ins = metered


def time_flower(cfg: RunConfig) -> tuple[float, float, float, list[dict]]:
    """(median round_seconds, median wall s/round, median scan s/round, rows), rounds after the first.

    Wall time per round: gaps between the ends of consecutive aggregate_train
    calls, i.e. everything between two rounds (evaluation and Flower's own
    steps included).
    """
    ends: list[float] = []
    scans: list[float] = []
    rows = _simulate_with_timestamps(cfg, ends, scans)
    rs = [float(r["round_seconds"]) for r in rows if "round_seconds" in r][1:]
    walls = [b - a for a, b in zip(ends, ends[1:])]
    scan = [b - a for a, b in zip(scans, scans[1:])]
    nan = float("nan")
    return (
        statistics.median(rs),
        statistics.median(walls) if walls else nan,
        statistics.median(scan) if scan else nan,
        rows,
    )


def _simulate_with_timestamps(cfg: RunConfig, ends: list[float], scans: list[float]) -> list[dict]:
    from fl_sparse.simulations.runner import simulate
    from fl_sparse.server_app import strategy_from_config

    strategy = strategy_from_config(cfg)
    aggregate_train = strategy.aggregate_train

    def timed_aggregate(server_round, replies):
        out = aggregate_train(server_round, replies)
        ends.append(time.perf_counter())
        scans.append(ScanMeter.seconds)
        return out

    strategy.aggregate_train = timed_aggregate
    return simulate(cfg, strategy=strategy)


def time_plain(cfg: RunConfig) -> float:
    from fl_sparse.simulations.reference import reference_run

    strategy = cfg.strategy if cfg.strategy in REFERENCE else "topk"
    ref = replace(cfg, strategy=strategy, **({"threshold": 0.002} if strategy == "hard-threshold" else {}))
    reference_run(replace(ref, rounds=1))  # warm-up: data, partitions, models
    start = time.perf_counter()
    reference_run(ref)
    return (time.perf_counter() - start) / cfg.rounds


def time_flower_floor(clients: int, rounds: int, num_cpus: float) -> float:
    """Median seconds per round of a no-op ClientApp on the same engine and settings.

    Every message goes server -> Ray actor -> server and the client replies at
    once: what Flower's simulation costs per round before any work is done.
    Compare the strategies' s/round with it to see which part is ours.
    """
    from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp
    from flwr.serverapp import Grid, ServerApp
    from flwr.simulation import run_simulation

    from fl_sparse.server_app import SIMULATION_PULL_INTERVAL
    from fl_sparse.simulations.runner import backend_config

    noop = ClientApp()

    @noop.train()
    def _reply(msg, context):
        return Message(content=RecordDict({"metrics": MetricRecord({"num-examples": 1})}), reply_to=msg)

    server = ServerApp()
    seconds: list[float] = []

    @server.main()
    def _main(grid: Grid, context) -> None:
        grid.pull_interval = SIMULATION_PULL_INTERVAL  # as run_server sets it for the simulation
        while len(nodes := sorted(grid.get_node_ids())) < clients:
            time.sleep(0.2)
        for r in range(rounds):
            start = time.perf_counter()
            msgs = [
                Message(content=RecordDict({"config": ConfigRecord({"r": r})}), message_type="train", dst_node_id=n)
                for n in nodes
            ]
            list(grid.send_and_receive(msgs, timeout=600))
            seconds.append(time.perf_counter() - start)

    run_simulation(
        server_app=server,
        client_app=noop,
        num_supernodes=clients,
        backend_config=backend_config(RunConfig(clients=clients, num_cpus=num_cpus)),
    )
    return statistics.median(seconds[1:]) if len(seconds) > 1 else float("nan")


def client_overhead(clients: list[int], rounds: int, repeat: int, baseline: str | None) -> dict:
    """The in-process per-message table (see :mod:`bench_client_overhead`), printed; returns the samples."""
    import bench_client_overhead as overhead
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as bench_client_overhead runs it (and its --baseline subprocesses)
    try:
        results = overhead.collect(clients, rounds, repeat, baseline, threads=1)
    finally:
        torch.set_num_threads(threads)
    print("client work per message, in-process (real Messages, ClientApp and SparseMod; no Ray), "
          "mlp-784-64-10, bidirectional top-K 1 %, 1 torch thread")
    print("floor: no-op ClientApp; plain: the same ClientApp without the mod; relay: a mod doing only Flower's "
          "part; ratios against them (and against --overhead-baseline), measured in the same run")
    overhead.print_tables(results)
    return results


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, nargs="+", default=[10, 100])
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--model", default="mlp-784-64-10", choices=["mlp-784-64-10", "mlp-784-256-128-64-10"])
    ap.add_argument("--local-steps", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=10)
    ap.add_argument("--ratio", type=float, default=0.01)
    ap.add_argument("--eval-every", type=int, default=10**9, help="central evaluation every N rounds")
    ap.add_argument("--num-cpus", type=float, default=None, help="Ray CPUs per client (default: RunConfig's)")
    ap.add_argument("--strategies", nargs="+", default=None)
    ap.add_argument("--quick", action="store_true", help="4 rounds, fedavg/topk/bidirectional-topk only")
    ap.add_argument("--client-overhead-only", action="store_true", help="only the in-process per-message table")
    ap.add_argument("--no-client-overhead", action="store_true", help="skip the in-process per-message table")
    ap.add_argument("--overhead-repeat", type=int, default=3, help="interleaved runs per row of that table")
    ap.add_argument("--overhead-baseline", default=None, help="another checkout to compare in that table")
    args = ap.parse_args(argv)
    overhead = None
    if not args.no_client_overhead:
        overhead = client_overhead(args.clients, args.rounds, args.overhead_repeat, args.overhead_baseline)
        if args.client_overhead_only:
            return 0
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    logging.getLogger("flwr").setLevel(logging.WARNING)

    ScanMeter.install()
    strategies = args.strategies or (["fedavg", "topk", "bidirectional-topk"] if args.quick else _strategies())
    rounds = 4 if args.quick else args.rounds
    results = []
    floors: dict[int, float] = {}
    for n in args.clients:
        floors[n] = time_flower_floor(n, rounds, args.num_cpus if args.num_cpus is not None else RunConfig().num_cpus)
        print(f"  {'(no-op ClientApp)':20s} clients={n:4d}  {floors[n]:.4f} s/round", file=sys.stderr, flush=True)
        dense = None
        for name in strategies:
            base = RunConfig(
                strategy=name,
                model=args.model,
                clients=n,
                rounds=rounds,
                local_steps=args.local_steps,
                batch_size=args.batch_size,
                ratio=args.ratio,
                eval_every=args.eval_every,
                quiet=True,
                **_extra(name),
            )
            if args.num_cpus is not None:
                base = replace(base, num_cpus=args.num_cpus)
            t0 = time.perf_counter()
            try:
                s_round, wall, scan, _ = time_flower(base)
            except Exception as exc:  # one broken strategy must not lose the others' numbers
                print(f"  {name:20s} clients={n:4d}  FAILED: {exc}", file=sys.stderr, flush=True)
                continue
            total = time.perf_counter() - t0
            plain = time_plain(base)
            if name == "fedavg":
                dense = s_round
            row = (name, n, s_round, wall, scan, plain, s_round / dense if dense else float("nan"), s_round / plain, total)
            results.append(row)
            print(
                f"  {name:20s} clients={n:4d}  {s_round:.4f} s/round  wall {wall:.4f}  scan {scan:.4f}  plain {plain:.4f}  "
                f"({total:.1f} s run)",
                file=sys.stderr,
                flush=True,
            )

    print()
    print(f"model {args.model}, H={args.local_steps}, batch {args.batch_size}, {rounds} rounds (median of rounds 2..)")
    header = (
        f"{'strategy':20s} {'clients':>7s} {'s/round':>9s} {'wall/round':>10s} {'scan/round':>10s} "
        f"{'plain s/r':>9s} {'vs dense':>8s} {'vs plain':>8s}"
    )
    print(header)
    print("-" * len(header))
    bad = []
    for name, n, s, wall, scan, plain, vs_dense, vs_plain, _ in results:
        flag = ""
        if name != "fedavg" and vs_dense > DENSE_TOLERANCE:
            flag += " >dense"
        if n >= 100 and vs_plain > 3.0:
            flag += " >3x plain"
        if flag:
            bad.append(name)
        print(f"{name:20s} {n:7d} {s:9.4f} {wall:10.4f} {scan:10.4f} {plain:9.4f} {vs_dense:8.2f} {vs_plain:8.2f}{flag}")
    for n, floor in floors.items():
        print(f"{'flower floor (no-op)':20s} {n:7d} {floor:9.4f}")
    if overhead is not None:
        import bench_client_overhead as client

        print()
        print("per message (ms): the mod's own overhead in-process (CPU time, median) beside the plain loop's")
        print("  flower floor: no-op ClientApp in-process; ray floor: the simulation's no-op s/round / clients")
        print(f"{'clients':>7s} {'mod overhead':>12s} {'flower floor':>12s} {'ray floor':>9s} {'plain loop':>10s} "
              f"{'ovh/plain loop':>14s}")
        for n in args.clients:
            mod = client.medians(overhead["current"][n]["mod"])["cpu/overhead"]
            floor = client.medians(overhead["current"][n]["floor"])["cpu/total"]
            plain = [row[5] for row in results if row[1] == n and row[0] == "bidirectional-topk"]  # plain s/round
            per = 1e3 * plain[0] / n if plain else float("nan")
            ray_floor = 1e3 * floors[n] / n
            print(f"{n:7d} {mod:12.3f} {floor:12.3f} {ray_floor:9.3f} {per:10.3f} {mod / per:14.2f}")
    print(f"targets: vs dense <= 1.0 (sparse strategies; flagged above {DENSE_TOLERANCE}), vs plain <= 3.0 at 100 clients")
    print("flower floor: the same engine and settings with a ClientApp that replies at once")
    print("scan/round: time Flower's dispatcher spent walking its message store (see the docstring)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
