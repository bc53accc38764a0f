"""examples/sparse-quickstart: a plain Flower app made sparse by SparseMod + BidirectionalTopKSGD.

* the app's pyproject parses and names components that import (the ClientApp
  carries a SparseMod, the config defaults match the ServerApp's);
* fast: the real ServerApp and ClientApp, run in this process on
  :class:`inprocess.InProcessGrid` (no Ray), with partial participation;
* slow: the same apps through ``flwr.simulation.run_simulation`` (Ray).

The oracles are independent of the library: the model must beat chance on the
synthetic data (10 classes: 0.1), and the bytes each client sends per round
must fit ``k = ceil(ratio * d)`` raw (int32 position, fp32 value) pairs plus a
small header, ``d`` counted here from the model's float arrays.
"""

from __future__ import annotations

import importlib
import json
import math
import sys
import tomllib
from pathlib import Path

import pytest
import torch

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "sparse-quickstart"
if str(EXAMPLE) not in sys.path:
    sys.path.insert(0, str(EXAMPLE))

from flwr.app import Context, RecordDict  # noqa: E402
from flwr.clientapp import ClientApp  # noqa: E402
from flwr.serverapp import ServerApp  # noqa: E402
from inprocess import InProcessGrid  # noqa: E402

from fl_sparse import protocol  # noqa: E402
from fl_sparse.clients import SparseMod  # noqa: E402
from fl_sparse.protocol import Instruction  # noqa: E402
from sparse_quickstart import server_app as server_module  # noqa: E402
from sparse_quickstart.client_app import app as client_app  # noqa: E402
from sparse_quickstart.server_app import app as server_app  # noqa: E402
from sparse_quickstart.task import NUM_CLASSES, Net, load_centralized_dataset, load_data  # noqa: E402
from sparse_quickstart.task import test as evaluate_model  # noqa: E402

CHANCE = 1.0 / NUM_CLASSES
HEADER_BYTES = 512  # generous bound on a payload's header (JSON) per message


def _pyproject() -> dict:
    return tomllib.loads((EXAMPLE / "pyproject.toml").read_text())


def _dense_entries() -> int:
    """d: the number of float entries of the model (what top-K chooses from)."""
    return sum(t.numel() for t in Net().state_dict().values() if t.is_floating_point())


def _running_stats() -> tuple[int, int]:
    """(entries, bytes as Flower arrays) of BatchNorm's running means and variances: sent whole by default."""
    from flwr.app import ArrayRecord

    stats = {n: t for n, t in Net().state_dict().items() if n.endswith(("running_mean", "running_var"))}
    assert stats  # the example's model has BatchNorm
    return sum(t.numel() for t in stats.values()), sum(len(a.data) for a in ArrayRecord(stats).values())


def _check_results(results: dict, *, rounds: int, clients: int, ratio: float) -> None:
    """Learning and bytes, against oracles computed here."""
    d = _dense_entries()
    assert results["dense_bytes"] == 4 * d
    exact_entries, exact_bytes = _running_stats()
    k = math.ceil(ratio * (d - exact_entries))  # top-K chooses among the compressed entries
    rows = results["rounds"]
    assert [r["round"] for r in rows] == list(range(1, rounds + 1))
    for r in rows:
        assert r["clients"] == clients, r
        # Each client sends exactly k (position, value) pairs of 4 + 4 bytes, the running statistics, a header.
        low = 8 * k + exact_bytes
        assert clients * low <= r["uplink_bytes"] <= clients * (low + HEADER_BYTES), (r, k)
        assert r["uplink_fraction"] == pytest.approx(r["uplink_bytes"] / (clients * 4 * d))
        assert r["uplink_fraction"] <= 2 * ratio + (exact_bytes + HEADER_BYTES) / (4 * d), r
        assert math.isfinite(r["train_loss"]), r
    # After round 1 the clients that took part hold the model: the downlink is sparse too
    # (top-K of the aggregate, plus catch-up for a client that missed a round).
    for r in rows[1:]:
        assert r["downlink_bytes"] < clients * 4 * d, r
    # The model learns: the server's held-out accuracy rises well above chance and above w_0's.
    assert results["initial_accuracy"] < 0.3
    assert rows[-1]["accuracy"] > 0.4, rows
    assert rows[-1]["accuracy"] > results["initial_accuracy"] + 0.2, rows
    assert rows[-1]["federated_accuracy"] > 0.4, rows
    assert rows[-1]["train_loss"] < rows[0]["train_loss"], rows


def _check_final_model(path: Path, expected_accuracy: float) -> None:
    model = Net()
    model.load_state_dict(torch.load(path))
    _, acc = evaluate_model(model, load_centralized_dataset(0), "cpu")
    assert acc == pytest.approx(expected_accuracy)


# ------------------------------------------------------------------ the app
def test_pyproject_names_components_that_import():
    meta = _pyproject()
    app = meta["tool"]["flwr"]["app"]
    assert app["publisher"]
    components = app["components"]
    loaded = {}
    for name in ("serverapp", "clientapp"):
        module, attr = components[name].split(":")
        loaded[name] = getattr(importlib.import_module(module), attr)
    assert isinstance(loaded["serverapp"], ServerApp) and loaded["serverapp"] is server_app
    assert isinstance(loaded["clientapp"], ClientApp) and loaded["clientapp"] is client_app
    # The only sparse thing on the client: exactly one mod, a SparseMod.
    assert [type(m) for m in client_app._mods] == [SparseMod]
    # run_simulation passes no run config: the ServerApp's defaults must be pyproject's.
    assert app["config"] == server_module.DEFAULT_CONFIG
    deps = " ".join(meta["project"]["dependencies"])
    for dep in ("fl-sparse", "flwr", "torch"):
        assert dep in deps


def test_synthetic_data_is_deterministic_and_per_partition():
    (a, _), (b, _), (c, _) = load_data(0, 3, 32), load_data(0, 3, 32), load_data(1, 3, 32)
    xa, ya = a.dataset.tensors
    xb, yb = b.dataset.tensors
    xc, _ = c.dataset.tensors
    assert xa.shape == (256, 1, 12, 12) and torch.equal(xa, xb) and torch.equal(ya, yb)
    assert not torch.equal(xa, xc)
    assert set(ya.tolist()) == set(range(NUM_CLASSES))


# ------------------------------------------------------------- in-process
@pytest.mark.parametrize("ratio", [0.05, 0.2])
def test_example_apps_in_process(tmp_path: Path, monkeypatch, ratio: float):
    """The example's own ServerApp and ClientApp, 3 nodes in this process, 2 sampled per round."""
    monkeypatch.chdir(tmp_path)  # final_model.pt
    state = tmp_path / "state"
    grid = InProcessGrid(client_app, 3, node_config=lambda i: {"state-dir": str(state)})
    rounds = 3
    run_config = {
        "num-server-rounds": rounds,
        "fraction-train": 0.6,  # max(int(3 * 0.6), min_train_nodes=2) = 2 of 3 nodes per round
        "ratio": ratio,
        "results": str(tmp_path / "results.json"),
    }
    server_app(grid, Context(run_id=grid.run_id, node_id=0, node_config={}, state=RecordDict(), run_config=run_config))

    results = json.loads((tmp_path / "results.json").read_text())
    _check_results(results, rounds=rounds, clients=2, ratio=ratio)
    _check_final_model(tmp_path / "final_model.pt", results["rounds"][-1]["accuracy"])
    # 2 of the 3 nodes got a train instruction each round; exactly those keep a state file.
    trained = [
        (instr.server_round, msg.metadata.dst_node_id)
        for msg in grid.sent
        if (instr := Instruction.read(msg.content)) is not None and instr.phase == protocol.PHASE_TRAIN
    ]
    assert sorted(r for r, _ in trained) == [t for t in range(1, rounds + 1) for _ in range(2)]
    partitions = {grid.node_ids.index(node) for _, node in trained}
    files = sorted(p.name for p in next(state.glob("gen-*")).glob("*.state"))
    assert files == [f"client-{i}.state" for i in sorted(partitions)], (files, trained)


# ------------------------------------------------------------- simulation
@pytest.mark.slow
def test_example_apps_in_run_simulation(tmp_path: Path, monkeypatch):
    """The same apps in Flower's simulation engine (Ray), 3 SuperNodes, all sampled."""
    from flwr.simulation import run_simulation

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("FL_SPARSE_STATE_DIR", str(tmp_path / "state"))  # inherited by the Ray workers
    rounds = 3
    # run_simulation passes no run config; the ServerApp runs in this process and reads its defaults.
    monkeypatch.setitem(server_module.DEFAULT_CONFIG, "num-server-rounds", rounds)
    monkeypatch.setitem(server_module.DEFAULT_CONFIG, "results", str(tmp_path / "results.json"))
    run_simulation(
        server_app=server_app,
        client_app=client_app,
        num_supernodes=3,
        backend_config={"client_resources": {"num_cpus": 1}},
    )
    results = json.loads((tmp_path / "results.json").read_text())
    _check_results(results, rounds=rounds, clients=3, ratio=server_module.DEFAULT_CONFIG["ratio"])
    _check_final_model(tmp_path / "final_model.pt", results["rounds"][-1]["accuracy"])
    runs = list((tmp_path / "state").glob("gen-*"))
    assert len(runs) == 1 and len(list(runs[0].glob("client-*.state"))) == 3
