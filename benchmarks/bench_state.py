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

Not a timed test: numbers depend on the machine and its filesystems.
"""

from __future__ import annotations

import argparse
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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=200)
    args = ap.parse_args(argv)
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
