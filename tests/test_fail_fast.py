"""Commands that fail fast and loud: checks before Ray starts, a stop when no update is accepted."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from flwr.app import ArrayRecord
from flwr.clientapp import ClientApp

from fl_sparse.cli import main
from fl_sparse.clients import SparseMod
from fl_sparse.clients.app import app as builtin_app
from fl_sparse.server_app import RunConfig, RunFailed, RunInterrupted, preflight, run_server, stop_requested
from fl_sparse.tasks.data import load_dataset, partition_indices
from inprocess import InProcessGrid

SMALL = RunConfig(clients=3, rounds=6, local_steps=1, quiet=True)


@pytest.mark.parametrize(
    "change,message",
    [
        ({"value_bits": 20}, "value-bits must be 2..16"),
        ({"threshold": -1.0}, "threshold must be a finite number >= 0"),
        ({"num_cpus": 10_000.0}, "num-cpus 10000 per client, but this machine has"),
        ({"num_gpus": 0.5}, "no CUDA GPU is visible"),
        ({"out": "/proc/fl-sparse-cannot-write-here"}, "is not writable"),
        ({"clients": 500, "partition": "dirichlet", "min_partition_size": 500}, "cannot split fashion-mnist into 500 dirichlet"),
        ({"min_partition_size": -2}, "min-partition-size must be >= 0"),
        ({"max_failed_rounds": 0}, "max-failed-rounds must be >= 1"),
        ({"clients": "3"}, "clients must be an integer, got '3'"),
        ({"rounds": 1.5}, "rounds must be an integer, got 1.5"),
        ({"error_feedback": "false"}, "error-feedback must be true or false, got 'false'"),
        ({"ratio": "0.1"}, "ratio must be a number, got '0.1'"),
        ({"fraction": None}, "fraction must be set"),
        ({"out": 123}, "out must be a string \\(or unset\\), got 123"),
        ({"momentum": -5.0}, "momentum must be in \\[0, 1\\)"),
        ({"momentum": float("nan")}, "momentum must be in \\[0, 1\\)"),
        ({"weight_decay": float("nan")}, "weight-decay must be a finite number >= 0"),
        ({"threshold": 0.1}, "threshold is hard-threshold's lambda; leave it unset"),
        ({"downlink_ratio": 0.1, "strategy": "topk"}, "downlink-ratio is bidirectional-topk's downlink K"),
        ({"value_bits": 4, "strategy": "fedavg"}, "value-bits quantizes the sparse strategies' values"),
        ({"t_hat": 1}, "t-hat is adaptive-topk's turning point; leave it unset"),
        ({"t_hat": 99, "strategy": "adaptive-topk"}, "t-hat must be in \\[0, rounds\\]"),
        ({"t_hat": -1, "strategy": "adaptive-topk"}, "t-hat must be in \\[0, rounds\\]"),
        ({"t_hat": 1.5, "strategy": "adaptive-topk"}, "t-hat must be an integer"),
    ],
)
@pytest.mark.filterwarnings("ignore::UserWarning")  # flwr-datasets retries the impossible split loudly
def test_preflight_names_the_problem(change, message):
    if change.get("num_gpus"):
        import torch

        if torch.cuda.is_available():
            pytest.skip("a GPU is visible here")
    with pytest.raises(ValueError, match=message):
        preflight(replace(SMALL, **change))


def test_run_config_types_are_checked_and_paths_taken_as_text(tmp_path):
    with pytest.raises(ValueError, match="rounds must be an integer, got '3'"):
        RunConfig.from_run_config({"num-rounds": "3"})  # --run-config "num-rounds='3'": a string in TOML
    with pytest.raises(ValueError, match="threshold must be a number \\(or unset\\), got 'abc'"):
        RunConfig.from_run_config({"threshold": "abc"})
    assert RunConfig.from_run_config({"error-feedback": False, "fraction": 1}).validate().error_feedback is False
    assert RunConfig(out=tmp_path / "run").validate().out == str(tmp_path / "run")


def test_a_new_run_does_not_write_over_a_run_in_its_output_folder(tmp_path, capsys, monkeypatch):
    import fl_sparse.simulations.runner as runner

    monkeypatch.setattr(runner, "simulate", lambda *a, **k: pytest.fail("Ray must not start"))
    for name in ("config.json", "checkpoint.pt", "metrics.jsonl", "metrics.json"):
        run = tmp_path / name.replace(".", "-")
        run.mkdir()
        (run / name).write_text("{}")
        with pytest.raises(ValueError, match=f"already holds a run \\({name}\\).*--resume {run}"):
            preflight(replace(SMALL, out=str(run)))
        assert main(["simulate", "--out", str(run)]) == 2
        assert "already holds a run" in capsys.readouterr().err
        assert (run / name).read_text() == "{}"
    (tmp_path / "other-files").mkdir()
    (tmp_path / "other-files" / "notes.txt").write_text("mine")
    preflight(replace(SMALL, out=str(tmp_path / "other-files")))  # not a run: fine, nothing there is replaced


def test_cli_refuses_before_starting_ray(capsys, monkeypatch):
    import fl_sparse.simulations.runner as runner

    monkeypatch.setattr(runner, "simulate", lambda *a, **k: pytest.fail("Ray must not start"))
    assert main(["simulate", "--value-bits", "20"]) == 2
    assert "value-bits must be 2..16" in capsys.readouterr().err
    assert main(["simulate", "--strategy", "ssgd-mv", "--add-drop-ratio", "0.001"]) == 2
    assert "add-drop-ratio is ssgd-mv-ad's phi_ad" in capsys.readouterr().err
    assert main(["simulate", "--strategy", "topk", "--threshold", "0.1"]) == 2
    assert "threshold is hard-threshold's lambda" in capsys.readouterr().err


def test_threshold_zero_means_lambda_zero_everywhere():
    """One meaning per key: --threshold 0 and pyproject threshold = 0.0 are both λ = 0; unset is < 0 / None."""
    assert RunConfig.from_run_config({"threshold": 0.0, "strategy": "hard-threshold"}).threshold == 0.0
    assert RunConfig.from_run_config({"threshold": -1.0}).threshold is None


def _failing_app(state_dir: str) -> ClientApp:
    app = ClientApp(mods=[SparseMod(state_dir=state_dir)])

    @app.train()
    def train(msg, context):
        raise RuntimeError("disk full on this client")

    return app


def test_a_run_whose_every_client_fails_stops_and_names_the_first_error(tmp_path):
    grid = InProcessGrid(_failing_app(str(tmp_path / "state")), 3)
    cfg = replace(SMALL, out=str(tmp_path / "out"), max_failed_rounds=2)
    with pytest.raises(RunFailed, match=r"after round 2: 2 rounds in a row accepted no client update; "
                                         r"first client error: round 1: client \d+ failed: .*disk full"):
        run_server(grid, cfg)
    rows = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert [r["round"] for r in rows] == [1, 2]  # stopped early, metrics kept
    assert (tmp_path / "out" / "model.pt").exists()


def test_a_strategy_whose_every_client_fails_returns_the_model_it_started_from(tmp_path):
    from fl_sparse.strategies import TopKSGD

    model = torch.nn.Linear(4, 2)
    initial = ArrayRecord(model.state_dict())
    strategy = TopKSGD(ratio=0.5, fraction_evaluate=0.0, min_available_nodes=1, min_train_nodes=1)
    result = strategy.start(grid=InProcessGrid(_failing_app(str(tmp_path / "state")), 2),
                            initial_arrays=initial, num_rounds=2)
    assert sorted(result.arrays) == sorted(initial)
    for key in initial:
        assert (result.arrays[key].numpy() == initial[key].numpy()).all()


def test_stop_request_ends_the_run_after_the_round_and_saves(tmp_path):
    grid = InProcessGrid(builtin_app, 3, node_config=lambda i: {"state-dir": str(tmp_path / "state")})
    cfg = replace(SMALL, out=str(tmp_path / "out"))
    calls = {"n": 0}
    from fl_sparse.strategies import BidirectionalTopKSGD

    class StopAfterTwo(BidirectionalTopKSGD):
        def aggregate_train(self, server_round, replies):
            out = super().aggregate_train(server_round, replies)
            calls["n"] += 1
            if server_round == 2:
                stop_requested.set()  # what the CLI's Ctrl-C handler does
            return out

    strategy = StopAfterTwo(ratio=0.01, fraction_evaluate=0.0, min_available_nodes=1, min_train_nodes=1)
    try:
        with pytest.raises(RunInterrupted, match="after round 2 of 6"):
            run_server(grid, cfg, strategy)
    finally:
        stop_requested.clear()
    assert calls["n"] == 2
    assert len(json.loads((tmp_path / "out" / "metrics.json").read_text())) == 2
    assert (tmp_path / "out" / "model.pt").exists()


def test_preflight_reports_the_partition_sizes_it_checked(tmp_path):
    """The split is computed before Ray starts; its statistics are what the CLI prints at the start."""
    line = preflight(RunConfig(clients=200, partition="dirichlet", alpha=0.3, batch_size=32, seed=3))
    sizes = [
        int(partition_indices("fashion-mnist", load_dataset("fashion-mnist")[0].labels, "dirichlet", 200, pid,
                              alpha=0.3, seed=3).numel())
        for pid in range(200)
    ]
    assert line.startswith(f"200 partitions of 60000 examples: min {min(sizes)}, ")
    assert line.endswith(f"{sum(s < 32 for s in sizes)} smaller than a batch of 32 (they train on one smaller batch)")
