"""Client state save/load: fl-sparse's raw state file against ``torch.save``, on disk and in RAM.

Every client saves its state (model copy, error memory, the last update it
sent) after every message, so at MLP size this I/O is a visible part of a
simulated round. For each model size and folder (the system's temporary
folder, and ``/dev/shm`` where it exists) it prints milliseconds per save and
per load (file read and decoded, the process cache bypassed) of

* ``raw``        -- :class:`fl_sparse.clients.state.ClientStateStore` (JSON header + tensor bytes);
* ``torch.save`` -- the same state as a dict through ``torch.save`` / ``torch.load``
  (``weights_only=True``), written the same atomic way (temp file + ``os.replace``);

and the ratio raw / torch.save (below 1 is faster).

    python benchmarks/bench_state.py [--repeat 200]

``--scale`` measures instead the bytes the clients' state takes on disk at
100, 1,000 and 10,000 clients with 10 sampled per round, for the layouts of
issue 13: the model copy in every state file (today) or once per model
version in the model store (``share_models``), and the error memory in
float32 or float16. Each client saves what :class:`~fl_sparse.clients.SparseMod`
saves (model copy and error memory of d floats, the last update sent at
k = 1 % of d, layout and generation) through a real
:class:`~fl_sparse.clients.state.ClientStateStore`; round r's 10 sampled
clients (seeded draws, as a strategy samples) save at model version r, for
N / 10 rounds. It prints bytes per client that holds a state, the total
(distinct files, a hard-linked file counted once, as the disk counts it),
the model files kept, ms per save, and the ratio of the total to today's
layout measured in the same run:

    python benchmarks/bench_state.py --scale [--clients 100 1000 10000] [--d 50890]

Not a timed test: numbers depend on the machine and its filesystems.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from fl_sparse.clients import state as state_lib  # noqa: E402
from fl_sparse.clients.state import ClientState, ClientStateStore  # noqa: E402

SIZES = {"mlp-784-64-10": 50_890, "mlp-784-256-128-64-10": 242_762, "cnn-mnist": 1_199_882}


def _state(numel: int) -> ClientState:
    k = max(1, numel // 100)
    return ClientState(
        model=torch.randn(numel),
        model_version=12,
        error=torch.randn(numel),
        steps_done=40,
        extra={"pending_indices": torch.arange(k), "pending_values": torch.randn(k), "pending_round": torch.tensor(12)},
    )


def _per_call(fn, repeat: int) -> float:
    fn(0)  # warm-up
    start = time.perf_counter()
    for i in range(repeat):
        fn(i)
    return (time.perf_counter() - start) / repeat * 1e3


def time_raw(root: Path, state: ClientState, repeat: int) -> tuple[float, float]:
    store = ClientStateStore(root, durable=False)
    keys = [f"client-{i}" for i in range(10)]

    def save(i):
        store.save(keys[i % 10], state)

    def load(i):
        state_lib._CACHE.drop(store.path(keys[i % 10]))  # read the file, as another actor would
        store.load(keys[i % 10])

    return _per_call(save, repeat), _per_call(load, repeat)


def time_torch(root: Path, state: ClientState, repeat: int) -> tuple[float, float]:
    paths = [root / f"torch-{i}.pt" for i in range(10)]

    def save(i):
        fd, tmp = tempfile.mkstemp(dir=root, suffix=".tmp")
        with os.fdopen(fd, "wb") as fh:
            torch.save(state.to_payload(), fh)
        os.replace(tmp, paths[i % 10])

    def load(i):
        ClientState.from_payload(torch.load(paths[i % 10], map_location="cpu", weights_only=True))

    return _per_call(save, repeat), _per_call(load, repeat)


# ---------------------------------------------------------------- --scale: bytes on disk
LAYOUTS = {  # name: (share_models, error dtype); the first is today's layout, the baseline
    "today (inline model, fp32 e)": (False, "float32"),
    "inline model, fp16 e": (False, "float16"),
    "shared model, fp32 e": (True, "float32"),
    "shared model, fp16 e": (True, "float16"),
}
SAMPLED = 10


def _disk_bytes(root: Path) -> tuple[int, int, int]:
    """(bytes of distinct files, distinct state files, model version files) under ``root``."""
    seen, total, states, versions = set(), 0, 0, 0
    for folder, _, names in os.walk(root):
        for name in names:
            st = os.stat(os.path.join(folder, name))
            if name.endswith(".state"):
                states += 1
            if state_lib._CANONICAL.match(name):
                versions += 1
            if (st.st_dev, st.st_ino) in seen:  # a hard link of a file counted already
                continue
            seen.add((st.st_dev, st.st_ino))
            total += st.st_size
    return total, states, versions


def scale_run(clients: int, d: int, share: bool, error_dtype: str, parent: str | None) -> dict:
    """Round r: 10 clients drawn (seeded) save their state at model version r, for clients / 10 rounds."""
    import random

    import numpy as np

    root = Path(tempfile.mkdtemp(prefix=f"fl-sparse-scale-{clients}-", dir=parent))
    try:
        store = ClientStateStore(root / "gen-bench", durable=False, share_models=share, error_dtype=error_dtype)
        k = max(1, d // 100)
        layout = torch.frombuffer(bytearray(json.dumps([["w", [d], "float32"]]).encode()), dtype=torch.uint8)
        generation = torch.tensor(list(b"bench"), dtype=torch.uint8)
        rng, model = random.Random(0), torch.from_numpy(np.linspace(-1, 1, d, dtype=np.float32))
        saves, elapsed = 0, 0.0
        for r in range(max(1, clients // SAMPLED)):
            model = model.clone()
            model[r % d] += 1.0  # version r: every round changes the server's model
            for pid in rng.sample(range(clients), SAMPLED):
                gen = torch.Generator().manual_seed(r * 100_003 + pid)
                state = ClientState(
                    model=model.clone(), model_version=r, error=torch.randn(d, generator=gen) * 1e-2, steps_done=r,
                    extra={"layout": layout, "generation": generation,
                           "pending_indices": torch.randint(0, d, (k,), generator=gen),
                           "pending_values": torch.randn(k, generator=gen), "pending_round": torch.tensor(r)},
                )
                start = time.perf_counter()
                store.save(f"client-{pid}", state)
                elapsed += time.perf_counter() - start
                saves += 1
        state_lib._CACHE.clear()  # what the disk holds, not this process's memory
        total, states, versions = _disk_bytes(root)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return {"total": total, "states": states, "versions": versions, "ms_per_save": elapsed / saves * 1e3}


def scale_main(clients: list[int], d: int) -> int:
    parent = None  # the system's temporary folder: 10,000 clients of today's layout take GBs, more than /dev/shm may hold
    print(f"d = {d} floats, k = {max(1, d // 100)}, {SAMPLED} clients sampled per round, clients / {SAMPLED} rounds; "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    header = (f"{'clients':>8} {'layout':30s} {'holding':>8} {'versions':>8} {'B/client':>10} {'total MB':>10} "
              f"{'x today':>8} {'ms/save':>8}")
    print(header)
    print("-" * len(header))
    for n in clients:
        base = None
        for name, (share, dtype) in LAYOUTS.items():
            r = scale_run(n, d, share, dtype, parent)
            base = base or r["total"]
            print(f"{n:>8} {name:30s} {r['states']:>8} {r['versions']:>8} {r['total'] / max(1, r['states']):>10.0f} "
                  f"{r['total'] / 1e6:>10.2f} {r['total'] / base:>8.3f} {r['ms_per_save']:>8.3f}")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=200)
    ap.add_argument("--scale", action="store_true", help="state bytes on disk at 100 / 1,000 / 10,000 clients")
    ap.add_argument("--clients", type=int, nargs="+", default=[100, 1000, 10_000])
    ap.add_argument("--d", type=int, default=SIZES["mlp-784-64-10"], help="model size for --scale")
    args = ap.parse_args(argv)
    if args.scale:
        return scale_main(args.clients, args.d)
    folders = {"tmp (disk)": None}
    if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK):
        folders["/dev/shm"] = "/dev/shm"
    header = (
        f"{'model':24s} {'folder':11s} {'raw save':>9s} {'torch save':>10s} {'ratio':>6s} "
        f"{'raw load':>9s} {'torch load':>10s} {'ratio':>6s}   (ms per call)"
    )
    print(header)
    print("-" * len(header))
    for model, numel in SIZES.items():
        state = _state(numel)
        repeat = max(10, args.repeat * 50_890 // numel)
        for label, parent in folders.items():
            root = Path(tempfile.mkdtemp(prefix="fl-sparse-bench-", dir=parent))
            try:
                raw_save, raw_load = time_raw(root, state, repeat)
                torch_save, torch_load = time_torch(root, state, repeat)
            finally:
                shutil.rmtree(root, ignore_errors=True)
            print(
                f"{model:24s} {label:11s} {raw_save:9.3f} {torch_save:10.3f} {raw_save / torch_save:6.2f} "
                f"{raw_load:9.3f} {torch_load:10.3f} {raw_load / torch_load:6.2f}"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
