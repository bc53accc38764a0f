"""``fl-sparse simulate``: flags, errors, and what a run writes."""

from __future__ import annotations

import csv
import json
import math

import pytest

from fl_sparse.cli import build_parser, main
from fl_sparse.server_app import RunConfig

REQUIRED = (
    "round",
    "test_accuracy",
    "test_loss",
    "train_loss",
    "uplink_bytes",
    "downlink_bytes",
    "density",
    "client_error_norm",
    "server_error_norm",
    "cumulative_total_error",
    "q_loc_up",
    "q_val_up",
    "q_loc_down",
    "q_val_down",
)


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--ratio", "0"], "ratio"),
        (["--ratio", "1.5"], "ratio"),
        (["--clients", "0"], "clients"),
        (["--fraction", "1.2"], "fraction"),
        (["--lr", "nan"], "lr"),
        (["--value-bits", "1"], "value-bits"),
        (["--alpha", "-1"], "alpha"),
    ],
)
def test_bad_flags_exit_2_with_a_message(argv, message, capsys):
    assert main(["simulate", *argv]) == 2
    assert message in capsys.readouterr().err


def test_unknown_choice_is_rejected_by_the_parser(capsys):
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(["simulate", "--strategy", "gossip"])
    assert exc.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


def test_cli_defaults_mean_what_the_flower_app_defaults_mean():
    """``fl-sparse simulate`` with no flags and ``flwr run .`` with pyproject's run config: one run config.

    The CLI's defaults come from RunConfig; the Flower app's from pyproject's
    ``[tool.flwr.app.config]``, read through ``RunConfig.from_run_config``
    (where e.g. ``threshold = 0.0`` and ``downlink-ratio = -1`` stand for "unset").
    """
    import tomllib
    from dataclasses import fields
    from pathlib import Path

    pyproject = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    app = RunConfig.from_run_config(pyproject["tool"]["flwr"]["app"]["config"])
    names = {f.name for f in fields(RunConfig)}
    args = vars(build_parser().parse_args(["simulate"]))
    cli = RunConfig(**{k: v for k, v in args.items() if k in names})
    machine_only = {"num_cpus", "num_gpus", "quiet"}  # not run settings: how this machine runs it
    differ = {n: (getattr(cli, n), getattr(app, n)) for n in names - machine_only if getattr(cli, n) != getattr(app, n)}
    assert not differ, differ


@pytest.mark.slow
def test_simulate_writes_metrics_json_and_csv_with_diagnostics(tmp_path, capsys):
    out = tmp_path / "run"
    rc = main(
        [
            "simulate",
            "--strategy", "bidirectional-topk",
            "--clients", "3",
            "--rounds", "3",
            "--local-steps", "2",
            "--ratio", "0.02",
            "--diagnostics",
            "--out", str(out),
        ]
    )
    assert rc == 0
    err = capsys.readouterr().err
    assert "round 3/3" in err  # the progress display
    rows = json.loads((out / "metrics.json").read_text())
    assert [r["round"] for r in rows] == [1, 2, 3]
    for r in rows:
        missing = [k for k in REQUIRED if k not in r]
        assert not missing, missing
        assert 0 < r["density"] <= 0.021
        assert r["uplink_bytes"] > 0 and r["downlink_bytes"] > 0
        # rho: bidirectional paper's Assumption 3.5, rho-hat: 3.6 — both finite, non-negative
        assert math.isfinite(r["rho"]) and r["rho"] >= 0
        assert math.isfinite(r["rho_hat"]) and r["rho_hat"] >= 0
    totals = [r["cumulative_total_error"] for r in rows]
    assert totals == sorted(totals) and totals[0] > 0
    # Round 1 sends the dense model to everyone; later rounds only sparse updates.
    assert rows[0]["downlink_bytes"] > 10 * rows[1]["downlink_bytes"]
    with open(out / "metrics.csv") as fh:
        csv_rows = list(csv.DictReader(fh))
    assert len(csv_rows) == 3
    assert float(csv_rows[-1]["test_accuracy"]) == pytest.approx(rows[-1]["test_accuracy"])
    assert (out / "model.pt").exists()


def test_pyproject_run_config_maps_onto_run_config():
    """Every `[tool.flwr.app.config]` key is understood: `flwr run .` reads them via RunConfig."""
    import tomllib
    from pathlib import Path

    pyproject = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    app_config = pyproject["tool"]["flwr"]["app"]["config"]
    cfg = RunConfig.from_run_config(app_config)
    assert cfg.rounds == app_config["num-rounds"] and cfg.strategy == app_config["strategy"]
    assert cfg.out is None and cfg.state_dir is None and cfg.downlink_ratio is None
    with pytest.raises(ValueError, match="unknown run-config key 'rounds-total'"):
        RunConfig.from_run_config({**app_config, "rounds-total": 3})
    with pytest.raises(ValueError, match="ratio"):
        RunConfig.from_run_config({**app_config, "ratio": 2.0})
