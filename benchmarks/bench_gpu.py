"""fl-sparse on a GPU: top-k, the codec and a 100-client simulated round, each against its dense baseline.

Issue 11: "When a session has a GPU machine: the top-k, the codec and a
100-client simulated round on the GPU, with the ratios against torch.topk and
a dense FedAvg round there." Three tables, every baseline measured in the same
run on the same device:

a. **top-k** (``benchmarks/bench_topk.py``'s ``bench()``): d = 1,199,882
   (cnn-mnist) and 11,173,962 (ResNet-18's parameters) at 0.1 % and 1 %,
   median of ``--repeats`` interleaved, synchronized runs of
   ``torch.topk(x.abs(), k)``, ``x.abs()`` and ``TopK(ratio)(x)``, and whether
   TopK selected the same set as torch.topk.
b. **codec**: d = 11,173,962 at 0.1 % and 1 %. The sparse path is what an
   fl-sparse client ships: ``TopK`` on the device, :func:`fl_sparse.codec.encode`
   with the uplink defaults (``positions="rice"`` with the model's segments --
   ResNet-18's parameter tensors -- and ``values="fp32"``; also ``"q4"``,
   4-bit fractional values), then :func:`~fl_sparse.codec.decode` and back onto
   the device as a dense vector. The dense baselines are what a dense FedAvg
   client ships: the full float32 vector copied to the host (``x.cpu()``) and
   back (``.to(device)``), and the same through the codec's dense record
   (``encode_dense`` / ``decode_dense``). Bytes, milliseconds (median,
   synchronized) and ratios; the round trip is checked (exact for fp32, equal to
   :func:`~fl_sparse.codec.lossy_roundtrip` for q4, whose quantization error is
   shown).
c. **simulated rounds**: 100 clients, all of them training every round, model
   ``cnn-fmnist`` on Fashion-MNIST (iid), 20 local steps of batch 32 (the
   default run), through :func:`fl_sparse.server_app.run_server` on the
   in-process Flower grid of ``tests/inprocess.py`` (real Flower Messages, the
   package's own ClientApp ``fl_sparse.clients.app`` with its SparseMod, the
   real strategies). The clients train on the GPU (their train config's
   ``device`` is ``"auto"``). Dense ``fedavg`` against ``bidirectional-topk``
   and ``topk`` at 1 %: median seconds per round over rounds 2.. (round 1 syncs
   every client densely and warms the caches), the ratio to dense, and where
   the round goes: local SGD (the train function's H steps), the rest of the
   ClientApp (model load, state_dict -> ArrayRecord, SparseMod: sync decode,
   error feedback, top-k, encode, client state file), and the server
   (strategy, codec, aggregation).

Not Ray: the GPU machine has no package registry and Ray's wheel is too large
to carry, so the clients run one after another in this process, as the test
suite's in-process grid runs them. Per-round times are therefore the sum of
100 clients' work, not a parallel simulation's wall clock.

Data: Fashion-MNIST's four IDX files are looked up as usual
(:mod:`fl_sparse.tasks.data`); ``$FL_SPARSE_DATA`` defaults to the checkout's
``.gpu/data`` when it holds them (the GPU machine has no network). The data
split needs ``flwr-datasets``; where it cannot be imported, the split is read
from ``.gpu/data/partitions-iid.npz`` (``--write-partitions`` writes it where
flwr-datasets works; it is checked against the labels). Partition cache and
client state go to temporary folders.

    python3 benchmarks/bench_gpu.py [--device cuda] [--quick] [--parts topk,codec,rounds]

``--quick``: smaller sizes (d = 242,762 and 1,199,882; codec at 1,199,882), 10
clients, 3 rounds -- a CPU check of the whole script in about a minute.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# No `pip install -e` on the GPU machine: the checkout itself, the tests' in-process grid, bench_topk.
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "benchmarks")]

DATA = ROOT / ".gpu" / "data"
PARTITIONS_NPZ = DATA / "partitions-iid.npz"
if "FL_SPARSE_DATA" not in os.environ and (DATA / "fashion-mnist").is_dir():
    os.environ["FL_SPARSE_DATA"] = str(DATA)
_OWN_CACHE = None
if "FL_SPARSE_CACHE" not in os.environ:  # the data split's disk cache: a throw-away folder
    _OWN_CACHE = tempfile.mkdtemp(prefix="fl-sparse-cache-")
    os.environ["FL_SPARSE_CACHE"] = _OWN_CACHE
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import bench_topk  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

TOPK_SIZES = (1_199_882, 11_173_962)
QUICK_TOPK_SIZES = (242_762, 1_199_882)
CODEC_SIZE, QUICK_CODEC_SIZE = 11_173_962, 1_199_882
RATIOS = (0.001, 0.01)
VALUE_CODES = ("fp32", "q4")
STRATEGIES = ("fedavg", "bidirectional-topk", "topk")
MODEL = "cnn-fmnist"


def _median_ms(fn, device: str, repeats: int):
    """``(last result, median ms)`` over ``repeats`` calls after one warm-up."""
    out = fn()
    times = []
    for _ in range(repeats):
        out, ms = bench_topk.timed(fn, device)
        times.append(ms)
    return out, statistics.median(times)


def _title(text: str) -> None:
    print(f"\n== {text}", flush=True)


# ------------------------------------------------------------------ a. top-k
def part_topk(device: str, sizes, repeats: int) -> bool:
    _title(f"a. top-k on {device}: TopK against torch.topk(x.abs(), k), median of {repeats} synchronized runs")
    header = (f"{'d':>11} {'density':>7} {'k':>7} {'torch.topk ms':>13} {'x.abs() ms':>10} "
              f"{'TopK ms':>8} {'speedup':>8} {'vs pass':>8} {'same set':>8}")
    print(header)
    print("-" * len(header))
    ok = True
    for d in sizes:
        for ratio in RATIOS:
            r = bench_topk.bench(d, ratio, repeats, device)
            ok &= r["same"] != "NO"
            print(f"{r['d']:>11,} {r['ratio']:>7.1%} {r['k']:>7,} {r['topk']:>13.3f} {r['pass']:>10.3f} "
                  f"{r['ours']:>8.3f} {r['topk'] / r['ours']:>7.2f}x {r['ours'] / r['pass']:>7.2f}x {r['same']:>8}",
                  flush=True)
    print("speedup = torch.topk ms / TopK ms; vs pass = TopK ms / x.abs() ms")
    return ok


# ------------------------------------------------------------------ b. codec
def _segments_for(d: int):
    """The parameter tensors' lengths of the model with ``d`` parameters (the codec's segments), or None."""
    from fl_sparse.tasks.models import build_model

    for name, channels, size in (("cnn-mnist", 1, 28), ("resnet18", 3, 32)):
        model = build_model(name, num_classes=10, seed=0, in_channels=channels, image_size=size)
        lengths = tuple(int(p.numel()) for p in model.parameters())
        if sum(lengths) == d:
            return name, lengths
    return None, None


def part_codec(device: str, d: int, repeats: int) -> bool:
    from fl_sparse import codec
    from fl_sparse.compressors import TopK

    model_name, segments = _segments_for(d)
    where = f"{len(segments)} segments ({model_name}'s parameter tensors)" if segments else "no segments"
    _title(f"b. codec on {device}: d = {d:,}, TopK -> encode(rice, {where}) -> decode -> dense on {device}; "
           f"median of {repeats} synchronized runs")
    x = torch.randn(d, generator=torch.Generator().manual_seed(d)).to(device)
    dense_bytes = 4 * d

    # dense baselines: the raw copy out and back, and the codec's dense record (what the server sends)
    def copy_out():
        return x.cpu()

    host, d2h = _median_ms(copy_out, device, repeats)
    back, h2d = _median_ms(lambda: host.to(device), device, repeats)
    ok = bool(torch.equal(back, x))
    rec_dense, enc_dense = _median_ms(lambda: codec.encode_dense(x), device, repeats)
    back2, dec_dense = _median_ms(lambda: codec.decode_dense(rec_dense, d).to(device), device, repeats)
    ok &= bool(torch.equal(back2, x))
    dense_rec_bytes = codec.record_bytes(rec_dense)
    dense_ms = d2h + h2d

    header = (f"{'path':<24} {'density':>7} {'values':>6} {'bytes':>12} {'x smaller':>9} {'select ms':>9} "
              f"{'encode ms':>9} {'decode ms':>9} {'total ms':>9} {'x dense':>8} {'round trip':>22}")
    print(header)
    print("-" * len(header))
    print(f"{'dense x.cpu()/.to()':<24} {'100%':>7} {'fp32':>6} {dense_bytes:>12,} {1.0:>8.1f}x {'-':>9} "
          f"{d2h:>9.2f} {h2d:>9.2f} {dense_ms:>9.2f} {1.0:>7.2f}x {'exact' if ok else 'DIFFERS':>22}")
    print(f"{'dense encode_dense':<24} {'100%':>7} {'fp32':>6} {dense_rec_bytes:>12,} "
          f"{dense_bytes / dense_rec_bytes:>8.1f}x {'-':>9} {enc_dense:>9.2f} {dec_dense:>9.2f} "
          f"{enc_dense + dec_dense:>9.2f} {(enc_dense + dec_dense) / dense_ms:>7.2f}x "
          f"{'exact' if torch.equal(back2, x) else 'DIFFERS':>22}", flush=True)
    for ratio in RATIOS:
        top = TopK(ratio=ratio)
        sparse, select = _median_ms(lambda: top(x), device, repeats)
        for values in VALUE_CODES:
            record, enc = _median_ms(
                lambda: codec.encode(sparse, values=values, positions="rice", segments=segments), device, repeats)

            def decode_to_device():
                got = codec.decode(record, d, segments=segments)
                return got, got.to(device).to_dense()

            (got, dense_back), dec = _median_ms(decode_to_device, device, repeats)
            nbytes = codec.record_bytes(record)
            # round trip: positions exact; values exact (fp32) or exactly what lossy_roundtrip promises (q4)
            expect = codec.lossy_roundtrip(sparse, values=values).values.cpu()
            same_pos = bool(torch.equal(got.indices, sparse.indices.cpu()))
            same_val = bool(torch.equal(got.values, expect))
            same_dense = bool(torch.equal(dense_back[sparse.indices], expect.to(device)))
            true = sparse.values.cpu().float()
            rel = float((got.values - true).norm() / true.norm()) if true.numel() else 0.0
            good = same_pos and same_val and same_dense
            if values == "fp32":
                good &= bool(torch.equal(got.values, true))
                check = "exact" if good else "DIFFERS"
            else:
                check = f"as promised, err {rel:.1%}" if good else "DIFFERS"
            if not good:
                gap = float((got.values - expect).abs().max()) if got.values.shape == expect.shape else float("nan")
                print(f"   round trip: positions {'equal' if same_pos else 'DIFFER'}, values vs lossy_roundtrip "
                      f"{'equal' if same_val else f'differ (max {gap:.3g})'}, dense on device "
                      f"{'equal' if same_dense else 'differs'}")
            ok &= good
            pos_code = _pcode(record)
            total = select + enc + dec
            print(f"{f'TopK+{pos_code}':<24} {ratio:>7.1%} {values:>6} {nbytes:>12,} {dense_bytes / nbytes:>8.1f}x "
                  f"{select:>9.2f} {enc:>9.2f} {dec:>9.2f} {total:>9.2f} {total / dense_ms:>7.2f}x {check:>22}",
                  flush=True)
    print("x smaller = dense float32 bytes / record bytes; x dense = total ms / (x.cpu() + .to(device)) ms;")
    print("dense rows: 'encode ms' is the copy out (x.cpu() or encode_dense), 'decode ms' the way back")
    if device == "cpu":
        print("note: on CPU x.cpu() and .to('cpu') are no-ops, so the dense baseline is ~0 ms")
    return ok


def _pcode(record) -> str:
    """The position code a record went out with (header field 6)."""
    from fl_sparse import codec

    header = np.frombuffer(record["header"].data, dtype="<i8")
    return {codec.PCODE_RAW: "raw", codec.PCODE_BLOCK: "block", codec.PCODE_RICE: "rice",
            codec.PCODE_SEGMENTED: "segmented-rice", codec.PCODE_NONE: "none"}.get(int(header[codec.H_PCODE]), "?")


# ------------------------------------------------------------------ c. simulated rounds
class _ClientClock:
    """The ClientApp as the grid calls it, timed per round; also times the train function's local SGD."""

    def __init__(self, app) -> None:
        from collections import defaultdict

        self.app = app
        self.app_s: dict[int, float] = defaultdict(float)
        self.sgd_s: dict[int, float] = defaultdict(float)

    def __call__(self, msg, context):
        try:
            rnd = int(msg.content.config_records["config"]["server-round"])
        except (KeyError, TypeError, ValueError):
            rnd = -1  # the strategy's identify messages
        start = time.perf_counter()
        try:
            return self.app(msg, context)
        finally:
            self.app_s[rnd] += time.perf_counter() - start

    def wrap_local_training(self, fn):
        def timed(task, config, server_round, device):
            start = time.perf_counter()
            try:
                return fn(task, config, server_round, device)  # ends with loss.item(): synchronized
            finally:
                self.sgd_s[int(server_round)] += time.perf_counter() - start

        return timed


def _partition_key(labels, clients: int, seed: int):
    from fl_sparse.tasks import data as data_lib

    return ("fashion-mnist", data_lib._labels_fingerprint(labels), "iid", clients, None, int(seed))


def write_partitions(counts=(10, 100), seed: int = 0) -> None:
    """Save the iid splits of Fashion-MNIST (flwr-datasets' IidPartitioner) for a machine without flwr-datasets."""
    from fl_sparse.tasks import data as data_lib

    train, _ = data_lib.load_dataset("fashion-mnist")
    arrays = {"fingerprint": np.array(data_lib._labels_fingerprint(train.labels)), "seed": np.array(seed)}
    for n in counts:
        parts = [data_lib.partition_indices("fashion-mnist", train.labels, "iid", n, i, seed=seed) for i in range(n)]
        arrays[f"offsets_{n}"] = np.concatenate([[0], np.cumsum([p.numel() for p in parts])]).astype(np.int64)
        arrays[f"indices_{n}"] = torch.cat(parts).numpy().astype(np.int64)
    PARTITIONS_NPZ.parent.mkdir(parents=True, exist_ok=True)
    np.savez(PARTITIONS_NPZ, **arrays)
    print(f"wrote {PARTITIONS_NPZ} ({PARTITIONS_NPZ.stat().st_size:,} bytes; iid splits for {counts} clients)")


def _data_split_source(clients: int, seed: int) -> str:
    """'flwr-datasets', or load the carried split into the data module's cache when it cannot be imported."""
    try:
        import datasets  # noqa: F401
        import flwr_datasets.partitioner  # noqa: F401

        return "flwr-datasets"
    except Exception as exc:  # noqa: BLE001 - any import failure: fall back to the carried split
        reason = f"{type(exc).__name__}: {exc}"
    from fl_sparse.tasks import data as data_lib

    if not PARTITIONS_NPZ.is_file():
        raise RuntimeError(f"flwr-datasets unavailable ({reason}) and no {PARTITIONS_NPZ}")
    train, _ = data_lib.load_dataset("fashion-mnist")
    with np.load(PARTITIONS_NPZ) as f:
        if str(f["fingerprint"]) != data_lib._labels_fingerprint(train.labels) or int(f["seed"]) != seed:
            raise RuntimeError(f"{PARTITIONS_NPZ} is of other labels or another seed")
        if f"offsets_{clients}" not in f:
            raise RuntimeError(f"{PARTITIONS_NPZ} has no split for {clients} clients")
        offsets, flat = f[f"offsets_{clients}"], torch.from_numpy(f[f"indices_{clients}"].copy())
    parts = tuple(flat[offsets[i]:offsets[i + 1]] for i in range(clients))
    data_lib._PARTITION_CACHE[_partition_key(train.labels, clients, seed)] = parts
    return f"{PARTITIONS_NPZ.name} (flwr-datasets unavailable: {reason})"


def part_rounds(device: str, clients: int, rounds: int) -> bool:
    import logging

    from flwr.app import ConfigRecord
    from flwr.common.logger import FLOWER_LOGGER
    from inprocess import InProcessGrid

    import fl_sparse.clients.app as client_module
    from fl_sparse.server_app import RunConfig, preflight, run_server

    FLOWER_LOGGER.setLevel(logging.WARNING)
    base = RunConfig(strategy="fedavg", model=MODEL, dataset="fashion-mnist", partition="iid", clients=clients,
                     fraction=1.0, rounds=rounds, ratio=0.01, seed=0, quiet=True,
                     num_gpus=1.0 if device != "cpu" else 0.0)  # num_gpus: the server's test-set evaluation
    source = _data_split_source(clients, base.seed)
    summary = preflight(base, local_clients=False)
    client_device = client_module._device(ConfigRecord())
    _title(f"c. simulated rounds: {clients} clients, all training every round, {MODEL} on fashion-mnist (iid), "
           f"H = {base.local_steps} steps of batch {base.batch_size}, lr {base.effective_lr}, clients train on "
           f"{client_device}; {rounds} rounds, median over rounds 2..{rounds}")
    print(f"data: {os.environ.get('FL_SPARSE_DATA') or 'system folders'}; split from {source}; {summary}")
    header = (f"{'strategy':<19} {'s/round':>8} {'x dense':>8} {'local SGD s':>11} {'client other s':>14} "
              f"{'server s':>8} {'uplink MB':>9} {'x less':>7} {'downlink MB':>11} {'x less':>7} "
              f"{'round 1 s':>9} {'test acc':>8}")
    print(header)
    print("-" * len(header))
    original = client_module.local_training
    dense = None
    ok = True
    for name in STRATEGIES:
        clock = _ClientClock(client_module.app)
        client_module.local_training = clock.wrap_local_training(original)
        try:
            cfg = replace(base, strategy=name)
            rows = run_server(InProcessGrid(clock, clients), cfg)
        finally:
            client_module.local_training = original
        later = [r for r in rows if r["round"] >= 2] or rows
        med = lambda values: statistics.median(list(values))  # noqa: E731
        r = {
            "s": med(float(x["round_seconds"]) for x in later),
            "sgd": med(clock.sgd_s[x["round"]] for x in later),
            "other": med(clock.app_s[x["round"]] - clock.sgd_s[x["round"]] for x in later),
            "server": med(float(x["round_seconds"]) - clock.app_s[x["round"]] for x in later),
            "up": med(int(x["uplink_bytes"]) for x in later),
            "down": med(int(x["downlink_bytes"]) for x in later),
            "first": float(rows[0]["round_seconds"]),
            "acc": rows[-1].get("test_accuracy"),
            "accepted": min(int(x.get("accepted") or 0) for x in rows),
        }
        ok &= r["accepted"] == clients
        dense = dense or r
        acc = f"{r['acc']:.3f}" if r["acc"] is not None else "-"
        print(f"{name:<19} {r['s']:>8.3f} {r['s'] / dense['s']:>7.2f}x {r['sgd']:>11.3f} {r['other']:>14.3f} "
              f"{r['server']:>8.3f} {r['up'] / 1e6:>9.3f} {dense['up'] / max(1, r['up']):>6.1f}x "
              f"{r['down'] / 1e6:>11.3f} {dense['down'] / max(1, r['down']):>6.1f}x {r['first']:>9.3f} {acc:>8}"
              + ("" if r["accepted"] == clients else f"  only {r['accepted']} of {clients} updates accepted"),
              flush=True)
    print("s/round: the strategy's round_seconds (configure_train .. aggregate_train, all clients' work included);")
    print("local SGD: the train function's H steps, summed over the clients; client other: the rest of the ClientApp")
    print("(model load, state_dict -> ArrayRecord, SparseMod); server: s/round - ClientApp time (medians of each)")
    return ok


# ------------------------------------------------------------------ main
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true", help="small sizes, 10 clients, 3 rounds (a CPU check)")
    ap.add_argument("--parts", default="topk,codec,rounds", help="comma-separated: topk, codec, rounds")
    ap.add_argument("--repeats", type=int, default=None, help="timed runs per cell (default 9; 7 with --quick)")
    ap.add_argument("--clients", type=int, default=None, help="simulated clients (default 100; 10 with --quick)")
    ap.add_argument("--rounds", type=int, default=None, help="rounds per strategy (default 4; 3 with --quick)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads (default: torch's own with cuda; 1 with cpu, as Ray gives a simulated "
                         "client, and robust on a shared machine)")
    ap.add_argument("--write-partitions", action="store_true",
                    help=f"write {PARTITIONS_NPZ.relative_to(ROOT)} (needs flwr-datasets) and exit")
    args = ap.parse_args(argv)
    try:
        return _run(ap, args)
    finally:
        if _OWN_CACHE:
            shutil.rmtree(_OWN_CACHE, ignore_errors=True)


def _run(ap: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    if args.write_partitions:
        write_partitions()
        return 0
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device is visible")
    if args.threads or args.device == "cpu":
        torch.set_num_threads(args.threads or 1)
    repeats = args.repeats or (7 if args.quick else 9)
    clients = args.clients or (10 if args.quick else 100)
    rounds = args.rounds or (3 if args.quick else 4)
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = set(parts) - {"topk", "codec", "rounds"}
    if unknown:
        ap.error(f"unknown parts {sorted(unknown)}")

    import platform

    try:
        import flwr

        flwr_version = flwr.__version__ if hasattr(flwr, "__version__") else "?"
    except Exception as exc:  # noqa: BLE001
        flwr_version = f"not importable ({type(exc).__name__}: {exc})"
    name = torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or "CPU"
    print(f"fl-sparse GPU benchmark: device {args.device} ({name}); torch {torch.__version__}, "
          f"python {platform.python_version()}, flwr {flwr_version}, {os.cpu_count()} CPUs, "
          f"{torch.get_num_threads()} torch threads{', quick' if args.quick else ''}", flush=True)
    started = time.perf_counter()
    ok = True
    jobs = {
        "topk": lambda: part_topk(args.device, QUICK_TOPK_SIZES if args.quick else TOPK_SIZES, repeats),
        "codec": lambda: part_codec(args.device, QUICK_CODEC_SIZE if args.quick else CODEC_SIZE, repeats),
        "rounds": lambda: part_rounds(args.device, clients, rounds),
    }
    for part in parts:
        t0 = time.perf_counter()
        try:
            good = jobs[part]()
        except Exception:  # noqa: BLE001 - report and go on with the next table
            traceback.print_exc()
            good = False
        ok &= good
        print(f"[{part}: {time.perf_counter() - t0:.1f} s{'' if good else ', FAILED'}]", flush=True)
    print(f"\ntotal {time.perf_counter() - started:.1f} s; {'all checks passed' if ok else 'SOME CHECKS FAILED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
