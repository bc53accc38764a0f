"""Real Flower simulations (Ray engine) of the named strategies.

These run the actual ServerApp and ClientApp through ``run_simulation``; no
mocks. Each simulation takes seconds, so the configurations are tiny.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from fl_sparse.flat import FlatLayout
from fl_sparse.server_app import RunConfig, _initial_model
from fl_sparse.simulations.reference import reference_run
from fl_sparse.simulations.runner import simulate
from fl_sparse.strategies import SparseFedAvg

pytestmark = pytest.mark.slow

BASE = RunConfig(
    dataset="fashion-mnist",
    model="mlp-784-64-10",
    clients=3,
    rounds=3,
    local_steps=1,
    batch_size=10,
    lr=0.05,
    ratio=0.01,
    seed=7,
    quiet=True,
)


def _final_vector(out) -> torch.Tensor:
    state = torch.load(out / "model.pt", weights_only=True)
    layout = FlatLayout.from_state_dict(_initial_model(BASE).state_dict())
    return layout.flatten_state_dict(state)


def _metrics(out) -> list[dict]:
    return json.loads((out / "metrics.json").read_text())


@pytest.mark.parametrize(
    "strategy,extra",
    [
        ("topk", {}),
        ("bidirectional-topk", {}),
        ("rtopk", {}),
        ("hard-threshold", {"threshold": 0.04}),  # gradient units: |a| >= lr * 0.04 = 0.002
    ],
)
def test_flower_run_equals_plain_loop_of_the_paper(tmp_path, strategy, extra):
    """H = 1, full participation, batch 10, fixed seed: same parameters as Algorithms 1/2."""
    cfg = replace(BASE, strategy=strategy, out=str(tmp_path), **extra)
    rows = simulate(cfg)
    assert [r["round"] for r in rows] == [1, 2, 3]
    assert all(r["failures"] == 0 and r["accepted"] == 3 for r in rows)
    flower = _final_vector(tmp_path)
    plain = reference_run(replace(cfg, out=None))
    initial = FlatLayout.from_state_dict(_initial_model(cfg).state_dict()).flatten_state_dict(
        _initial_model(cfg).state_dict()
    )
    assert not torch.equal(plain, initial), "the reference loop must have moved the model"
    torch.testing.assert_close(flower, plain, rtol=0, atol=1e-6)


def test_partial_participation_keeps_every_client_on_the_servers_model(tmp_path):
    """Sampled rounds: late joiners get catch-ups; the server verifies every client's model hash."""
    cfg = replace(BASE, strategy="bidirectional-topk", clients=6, fraction=0.5, rounds=8, out=str(tmp_path))
    rows = simulate(cfg)
    # A client that trained from any other model than the server's is counted as a failure.
    assert all(r["failures"] == 0 for r in rows), [r["failures"] for r in rows]
    assert all(r["accepted"] == 3 for r in rows)
    modes = {}
    for r in rows:
        for mode, n in r["sync_modes"].items():
            modes[mode] = modes.get(mode, 0) + n
    # First contact is dense; clients that missed rounds are caught up, not re-sent the model.
    assert modes.get("dense", 0) >= 3
    assert modes.get("delta", 0) + modes.get("set", 0) > 0, modes
    assert rows[0]["downlink_bytes"] > rows[-1]["downlink_bytes"]


def test_same_seed_same_run(tmp_path):
    cfg = replace(BASE, strategy="rtopk", clients=4, fraction=0.5, rounds=3)
    a = simulate(replace(cfg, out=str(tmp_path / "a")))
    b = simulate(replace(cfg, out=str(tmp_path / "b")))
    drop = ("round_seconds", "elapsed_seconds")  # wall-clock columns
    strip = lambda rows: [{k: v for k, v in r.items() if k not in drop} for r in rows]  # noqa: E731
    assert strip(a) == strip(b)
    assert torch.equal(_final_vector(tmp_path / "a"), _final_vector(tmp_path / "b"))


def test_clients_keep_state_in_the_servers_temporary_folder_which_is_removed(tmp_path, monkeypatch):
    import fl_sparse.server_app as server_app

    made, seen = [], []
    choose = server_app.simulation_state_dir

    def spy(numel, clients, shm="/dev/shm"):
        folder = choose(numel, clients, shm=str(tmp_path))  # tmp_path stands in for /dev/shm
        made.append(folder)
        return folder

    monkeypatch.setattr(server_app, "simulation_state_dir", spy)
    cfg = replace(BASE, strategy="topk", clients=2, rounds=2)
    original_start = SparseFedAvg.start

    def start_and_look(self, *args, **kwargs):
        out = original_start(self, *args, **kwargs)
        seen.extend(sorted(p.name for p in Path(made[0]).glob("gen-*/*")))  # before run_server cleans up
        return out

    monkeypatch.setattr(SparseFedAvg, "start", start_and_look)
    rows = simulate(cfg)
    assert len(rows) == 2
    assert len(made) == 1 and Path(made[0]).parent == tmp_path
    # models/: the shared model copies; .spare: each client's state file before last, rewritten in place next time
    assert seen == ["client-0.state", "client-0.state.spare", "client-1.state", "client-1.state.spare", "models"]
    assert not Path(made[0]).exists()


class HalvingTopK(SparseFedAvg):
    """Docstring example of the base class: a ratio that halves every round."""

    def uplink_spec(self, server_round, num_clients):
        return {"name": "topk", "ratio": 0.02 * 0.5 ** (server_round - 1)}


def test_users_extend_the_base_strategy_by_subclassing(tmp_path):
    cfg = replace(BASE, clients=2, rounds=3, out=str(tmp_path))
    rows = simulate(cfg, strategy=HalvingTopK(uplink={"name": "topk", "ratio": 0.02}, seed=cfg.seed))
    densities = [r["density"] for r in rows]
    assert densities[0] > densities[1] > densities[2]
    assert densities[0] == pytest.approx(0.02, rel=0.01)


def test_hundred_noniid_clients_bidirectional_topk(tmp_path):
    """100 Dirichlet(0.3) clients on Fashion-MNIST: accuracy rises, memories are reported."""
    cfg = replace(
        BASE,
        strategy="bidirectional-topk",
        clients=100,
        partition="dirichlet",
        alpha=0.3,
        rounds=4,
        local_steps=5,
        batch_size=32,
        lr=0.1,
        ratio=0.05,
        positions="raw",  # the size oracle below counts 4-byte positions
        out=str(tmp_path),
    )
    rows = simulate(cfg)
    assert len(rows) == 4 and all(r["accepted"] == 100 for r in rows)
    acc = [r["test_accuracy"] for r in rows]
    assert acc[-1] > acc[0] and acc[-1] > 0.3, acc
    assert all(r["client_error_norm"] > 0 and r["server_error_norm"] > 0 for r in rows)
    assert all(r["uplink_bytes"] > 0 and r["downlink_bytes"] > 0 for r in rows)
    assert (tmp_path / "metrics.csv").read_text().count("\n") == 5
    # Unequal Dirichlet partitions: every example of the training set is weighted, every round.
    assert all(r["num_examples"] == 60_000 for r in rows), [r["num_examples"] for r in rows]
    # First contact is the dense model; afterwards every client only needs last round's update.
    assert rows[0]["sync_modes"] == {"dense": 100}
    assert all(r["sync_modes"] == {"delta": 100} for r in rows[1:]), [r["sync_modes"] for r in rows]
    # Each upload carries k = ceil(0.05 d) entries: 4-byte positions + 4-byte values + a small header.
    d = FlatLayout.from_state_dict(_initial_model(cfg).state_dict()).numel
    k = -(-5 * d // 100)
    assert all(8 * k <= r["uplink_bytes"] / 100 <= 8 * k + 256 for r in rows), [r["uplink_bytes"] for r in rows]
