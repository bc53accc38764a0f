"""A client's own work per message, in-process: SparseMod around a train function, at MLP size.

Plays rounds of bidirectional top-K (1 %) on an in-process Grid (``tests/inprocess.py``: real
Messages, the real ClientApp and mod, no Ray) with 10 and 100 clients, all sampled, and splits
each message's time in the ClientApp into

* ``user``: the user's train function (here: add a fixed random step to the model, about what
  unpacking and repacking an ArrayRecord costs a real train function);
* ``top-k``: the compressor;
* ``overhead``: everything else the mod does (sync, hash check, state load/save, error
  feedback, encoding, the report) -- the issue's target is at most 0.5 ms;

beside, measured in the same run on the same messages,

* ``floor``: a no-op ClientApp that replies at once (Flower's own per-message cost in-process:
  building, dispatching and answering the Message);
* ``plain``: the same ClientApp and train function without the mod;
* ``relay``: the same ClientApp behind a mod that does only what any mod rewriting a train reply
  must do with Flower's objects, and nothing sparse: read a 12-field instruction, hand the train
  function the model (cached ``Array`` bytes, as SparseMod does) in a new Message, read the
  trained arrays (numpy views), and answer with a new Message holding the user's records, a small
  update ``ArrayRecord``, a report ``ConfigRecord`` and a ``MetricRecord``, built with
  :mod:`fl_sparse.records` (the cheapest way known here). Its overhead (``relay``: its time minus
  the train function's) is Flower's floor for such a mod; ``ovh-relay`` is what the mod's own work
  (state, sync, hash, error feedback, encoding) adds on top.

Each number is the median over the messages of rounds 3.. (rounds 1-2: dense syncs, warm-up),
pooled over ``--repeat`` interleaved runs, in two clocks: ``cpu`` (the process's CPU time:
what the work costs, barely moved by other processes on the machine) and ``wall``.
``--baseline DIR`` measures another checkout (e.g. ``git archive HEAD``) in subprocesses
interleaved with this one's runs, and prints both with the ratio.

    python benchmarks/bench_client_overhead.py [--clients 10 100] [--rounds 8] [--repeat 3]
        [--threads 1] [--baseline DIR] [--state-folder simulation|own|memory] [--model NAME]

``--model logreg-784-10`` (d = 7,850) or ``mlp-784-256-128-64-10`` (d = 242,762) beside the
default ``mlp-784-64-10`` (d = 50,890) shows how much of the overhead grows with the model.

Not a timed test: numbers depend on the machine (the load is printed).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# FL_SPARSE_BENCH_ROOT: measure another checkout with this script (see --baseline).
ROOT = Path(os.environ.get("FL_SPARSE_BENCH_ROOT") or Path(__file__).resolve().parents[1])
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import numpy as np  # noqa: E402
import torch  # noqa: E402
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict  # noqa: E402
from flwr.clientapp import ClientApp  # noqa: E402
from flwr.common.logger import FLOWER_LOGGER  # noqa: E402
from inprocess import InProcessGrid  # noqa: E402

from fl_sparse import compressors  # noqa: E402
from fl_sparse.clients import SparseMod  # noqa: E402
from fl_sparse.clients.state import ClientState, ClientStateStore  # noqa: E402
from fl_sparse.flat import array_to_numpy  # noqa: E402
from fl_sparse.records import array_record, config_record, metric_record, record_dict, wire_array  # noqa: E402
from fl_sparse.strategies import BidirectionalTopKSGD  # noqa: E402
from fl_sparse.tasks.models import build_model, count_parameters  # noqa: E402


VARIANTS = ("floor", "plain", "relay", "mod")
PARTS = ("total", "user", "topk", "overhead")
MODELS = ("logreg-784-10", "mlp-784-64-10", "mlp-784-256-128-64-10")
DEFAULT_MODEL = "mlp-784-64-10"
# A 12-field instruction, about what a top-K round's fl-sparse instruction carries.
RELAY_INSTRUCTION = {"server-round": 0, "model-version": 1, "base-version": 0, "sync-mode": "delta",
                     "model-hash": "0" * 32, "nonce": "0" * 16, "generation": "0" * 16, "uplink": '{"name":"topk"}',
                     "uplink-values": "float32", "uplink-positions": "auto", "accepted-round": 0, "seed": 0}


def relay_mod(init: ArrayRecord):
    """The ``relay`` variant's mod (see the module docstring): Flower's objects only, nothing sparse."""
    model = {k: (a.dtype, tuple(a.shape), a.stype, a.data) for k, a in init.items()}
    update = {"positions": ("uint8", (600,), "raw", bytes(600)), "values": ("float32", (509,), "raw", bytes(2036))}

    def relay(msg, context, call_next):
        instruction = msg.content["config"]
        fields = [instruction.get(k) for k in RELAY_INSTRUCTION]
        user_in = record_dict({"arrays": array_record({k: wire_array(*v) for k, v in model.items()}),
                               "config": instruction})
        reply = call_next(Message(content=user_in, metadata=msg.metadata), context)
        trained = reply.content["arrays"]
        views = [array_to_numpy(trained[k]) for k in model]
        content = {key: record for key, record in reply.content.items() if key != "arrays"}
        content["update"] = array_record({k: wire_array(*v) for k, v in update.items()})
        content["report"] = config_record({"server-round": fields[0], "nonce": fields[5], "model-version": fields[1],
                                           "model-hash": fields[4], "client-key": "client-0", "partition-id": 0,
                                           "steps": len(views)})
        content["uplink-metrics"] = metric_record({"uplink-bytes": 2644, "density": 0.01, "error-norm": 1.0,
                                                   "compression-error": 1.0})
        return Message(content=record_dict(content), reply_to=msg)

    return relay


def measure(
    clients: int, rounds: int, variant: str, folder_kind: str = "simulation", model_name: str = DEFAULT_MODEL
) -> dict[str, list[float]]:
    """Per-message samples (ms) of rounds 3..: ``{clock/part: [...]}``, clock ``wall`` or ``cpu``; model ``model_name``.

    ``folder_kind``: where the clients keep their state. ``"simulation"``: the folder the
    strategy names (``client_state_dir``, no fsync), as ``fl-sparse simulate`` runs it: all
    clients in one folder, model copies shared per version (see :mod:`fl_sparse.clients.state`).
    ``"own"``: a folder given in each node's config, as on a SuperNode (the mod then keeps
    every client's model copy in its own state file; fsync off here as well).
    ``"memory"``: a diagnostic, not a mode of the package: as ``"simulation"``, but the state
    store's load and save are replaced by a dict in this process (a load returns copies unless
    the caller asks for shared tensors, as the real one does; no model versions are cached, so
    the mod's shortcut to a version another client synced to does not apply), so the overhead
    shows what is left without any file I/O.
    """
    model = build_model(model_name, num_classes=10, seed=0)
    init = ArrayRecord(model.state_dict())
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    steps = {k: (np.random.default_rng(1).standard_normal(s) * 0.01).astype(np.float32) for k, s in shapes.items()}
    with_mod = variant == "mod"
    clock = {"wall": time.perf_counter, "cpu": time.process_time}
    user = dict.fromkeys(clock, 0.0)
    topk = dict.fromkeys(clock, 0.0)
    own = folder_kind == "own"
    if with_mod:
        app = ClientApp(mods=[SparseMod(durable=False) if own else SparseMod()])
    else:
        app = ClientApp(mods=[relay_mod(init)] if variant == "relay" else [])

    if variant == "floor":

        @app.train()
        def noop(msg, context):
            return Message(RecordDict({"metrics": MetricRecord({"num-examples": 10})}), reply_to=msg)

    else:

        @app.train()
        def train(msg, context):
            t = {c: f() for c, f in clock.items()}
            arrays = msg.content["arrays"]
            out = ArrayRecord({k: Array(arrays[k].numpy() - steps[k]) for k in arrays.keys()})
            reply = Message(RecordDict({"arrays": out, "metrics": MetricRecord({"num-examples": 10})}), reply_to=msg)
            for c, f in clock.items():
                user[c] += f() - t[c]
            return reply

    folder = tempfile.mkdtemp(dir="/dev/shm" if Path("/dev/shm").is_dir() else None)
    grid = InProcessGrid(app, clients, node_config=(lambda i: {"state-dir": folder}) if own else None)
    inner = grid.client_app
    samples: dict[str, list[float]] = {f"{c}/{p}": [] for c in clock for p in PARTS}
    recording = [False]

    def timed(msg, ctx):
        for c in clock:
            user[c] = topk[c] = 0.0
        t = {c: f() for c, f in clock.items()}
        reply = inner(msg, ctx)
        if recording[0]:
            for c, f in clock.items():
                total = 1e3 * (f() - t[c])
                samples[f"{c}/total"].append(total)
                samples[f"{c}/user"].append(1e3 * user[c])
                samples[f"{c}/topk"].append(1e3 * topk[c])
                samples[f"{c}/overhead"].append(total - 1e3 * (user[c] + topk[c]))
        return reply

    grid.client_app = timed
    real_call = compressors.TopK.__call__

    def timed_topk(self, x, *a, **k):
        t = {c: f() for c, f in clock.items()}
        out = real_call(self, x, *a, **k)
        for c, f in clock.items():
            topk[c] += f() - t[c]
        return out

    compressors.TopK.__call__ = timed_topk
    real_store = (ClientStateStore.load, ClientStateStore.save)
    if folder_kind == "memory":
        held: dict = {}

        def load_from_memory(self, key, *, reset_corrupt=True, shared=False):
            st = held.get((str(self.root), key))
            if st is None:
                return ClientState()
            own = lambda t: t if shared or t is None else t.clone()  # noqa: E731  (as the real store)
            return ClientState(own(st.model), st.model_version, own(st.error), st.steps_done,
                               {k: own(v) for k, v in st.extra.items()})

        def save_to_memory(self, key, state, *, model_hash=None):
            held[(str(self.root), key)] = state

        ClientStateStore.load, ClientStateStore.save = load_from_memory, save_to_memory
    try:
        strategy = BidirectionalTopKSGD(ratio=0.01, fraction_evaluate=0.0, min_train_nodes=clients,
                                        min_available_nodes=clients, client_state_dir=None if own else folder,
                                        client_state_fsync=False)
        strategy.initialize(init)
        if with_mod:
            strategy.identify(grid)
        arrays = init
        for t in range(1, rounds + 1):
            recording[0] = t >= 3  # rounds 1-2: dense first syncs, caches warming up
            config = ConfigRecord({"server-round": t})
            if with_mod:
                messages = list(strategy.configure_train(t, arrays, config, grid))
                arrays, _ = strategy.aggregate_train(t, list(grid.send_and_receive(messages)))
            else:
                if variant == "relay":
                    config = ConfigRecord(dict(RELAY_INSTRUCTION, **{"server-round": t}))
                messages = [Message(RecordDict({"arrays": init, "config": config}), message_type="train",
                                    dst_node_id=n) for n in grid.node_ids]
                list(grid.send_and_receive(messages))
    finally:
        compressors.TopK.__call__ = real_call
        ClientStateStore.load, ClientStateStore.save = real_store
        shutil.rmtree(folder, ignore_errors=True)
    return samples


def collect(
    clients: list[int], rounds: int, repeat: int, baseline: str | None, threads: int, folder_kind: str = "simulation",
    model_name: str = DEFAULT_MODEL,
) -> dict:
    """``{label: {clients: {variant: {clock/part: [samples]}}}}``: label "current" (and "baseline"), runs interleaved."""
    out: dict = {"current": {}}
    if baseline:
        out["baseline"] = {}
    for n in clients:
        for label in out:
            out[label][n] = {v: {} for v in VARIANTS}
        for _ in range(repeat):
            for label in out:
                if label == "baseline":
                    got = _subprocess_run(baseline, n, rounds, threads, folder_kind, model_name)
                else:
                    got = {v: measure(n, rounds, v, folder_kind, model_name) for v in VARIANTS}
                for v, samples in got.items():
                    for key, values in samples.items():
                        out[label][n][v].setdefault(key, []).extend(values)
    return out


def _subprocess_run(root: str, clients: int, rounds: int, threads: int, folder_kind: str, model_name: str) -> dict:
    env = dict(os.environ, FL_SPARSE_BENCH_ROOT=str(Path(root).resolve()))
    cmd = [sys.executable, __file__, "--json", "--clients", str(clients), "--rounds", str(rounds),
           "--repeat", "1", "--threads", str(threads), "--state-folder", folder_kind, "--model", model_name]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])["current"][str(clients)]


def medians(samples: dict[str, list[float]]) -> dict[str, float]:
    return {k: statistics.median(v) if v else float("nan") for k, v in samples.items()}


def table(results: dict, clock: str = "cpu") -> list[str]:
    """Rows: per client count, per checkout, ms per message (median) and ratios."""
    lines = [
        f"{'clients':>7} {'code':>8} {'floor':>7} {'plain':>7} {'relay':>7} {'mod':>7} {'user':>7} {'top-k':>7} "
        f"{'overhead':>9} {'ovh-relay':>9} {'ovh/floor':>9} {'ovh/plain':>9} {'ovh/base':>8}"
    ]
    labels = list(results)
    for n in results["current"]:
        base = None
        for label in reversed(labels):  # the baseline first, when there is one
            r = {v: medians(s) for v, s in results[label][n].items()}
            floor, plain, mod = r["floor"][f"{clock}/total"], r["plain"][f"{clock}/total"], r["mod"]
            relay = r["relay"][f"{clock}/overhead"] if r.get("relay") else float("nan")
            ovh = mod[f"{clock}/overhead"]
            vs_base = f"{ovh / base:8.2f}" if base else f"{'':8}"
            if label == "baseline":
                base = ovh
            lines.append(
                f"{n:>7} {label:>8} {floor:7.3f} {plain:7.3f} {relay:7.3f} {mod[f'{clock}/total']:7.3f} "
                f"{mod[f'{clock}/user']:7.3f} {mod[f'{clock}/topk']:7.3f} {ovh:9.3f} {ovh - relay:9.3f} "
                f"{ovh / floor:9.2f} {ovh / plain:9.2f} {vs_base}"
            )
    return lines


def print_tables(results: dict) -> None:
    for clock, what in (("cpu", "CPU time of this process"), ("wall", "wall clock")):
        print(f"ms per message, median ({what}); overhead = mod - user - top-k; target: overhead <= 0.5 ms; "
              "relay: a mod's floor in Flower's objects (its time - user)")
        for line in table(results, clock):
            print(line)
        print()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", type=int, nargs="+", default=[10, 100])
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--repeat", type=int, default=3, help="interleaved runs per client count, samples pooled")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (0: torch's default)")
    ap.add_argument("--baseline", default=None, help="another checkout to measure in the same run")
    ap.add_argument("--state-folder", choices=["simulation", "own", "memory"], default="simulation",
                    help="simulation: the folder the strategy names, shared model copies (fl-sparse simulate); "
                         "own: a folder per node config, each state file with its model copy (a SuperNode); "
                         "memory: a diagnostic without file I/O (load and save replaced by a dict)")
    ap.add_argument("--model", choices=MODELS, default=DEFAULT_MODEL,
                    help="the model (default mlp-784-64-10, d = 50,890): how much of the overhead grows with d")
    ap.add_argument("--json", action="store_true", help=argparse.SUPPRESS)  # raw samples, for --baseline
    args = ap.parse_args(argv)
    FLOWER_LOGGER.setLevel("ERROR")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.json:
        print(json.dumps(collect(args.clients, args.rounds, args.repeat, None, args.threads, args.state_folder,
                                 args.model)))
        return 0
    numel = count_parameters(build_model(args.model, num_classes=10, seed=0))
    print(f"load average at start: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs; {args.model} (d = {numel:,}), "
          f"bidirectional top-K 1 %, {torch.get_num_threads()} torch thread(s), {args.repeat} run(s) per row, "
          f"state folder: {args.state_folder}")
    results = collect(args.clients, args.rounds, args.repeat, args.baseline, args.threads, args.state_folder,
                      args.model)
    print_tables(results)
    print(f"load average at end: {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
