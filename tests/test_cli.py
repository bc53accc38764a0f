"""``fl-sparse simulate``: flags, errors, and what a run writes."""

from __future__ import annotations

import csv
import json
import math
import re

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


@pytest.mark.parametrize("flag, name, what", [("--resume", "resume", "a folder"), ("--out", "out", "a folder"),
                                              ("--state-dir", "state-dir", "a folder"),
                                              ("--ray-address", "ray-address", "an address")])
@pytest.mark.parametrize("empty", ["", "  "])
def test_an_empty_folder_or_address_is_refused_not_read_as_unset(flag, name, what, empty, capsys, tmp_path,
                                                                 monkeypatch):
    """``--resume "$DIR"`` with DIR unset started a new default run; ``--out ""`` wrote no run folder."""
    monkeypatch.chdir(tmp_path)  # where a regression's run folder "  " would land
    assert main(["simulate", flag, empty]) == 2
    assert capsys.readouterr().err == (f"fl-sparse simulate: error: {name} must name {what}, got {empty!r} "
                                       "(leave it out for none)\n")
    # flwr run's config cannot hold None: there "" is how a key is left unset
    assert getattr(RunConfig.from_run_config({name: ""}), name.replace("-", "_")) is None


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
    # Through Ray too: the run folder's settings and one appended line per round.
    assert [json.loads(line)["round"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]
    meta = json.loads((out / "config.json").read_text())
    assert (meta["clients"], meta["rounds"], meta["diagnostics"], meta["num_params"]) == (3, 3, True, 50_890)
    assert rows[-1]["cumulative_uplink_bytes"] == sum(r["uplink_bytes"] for r in rows)
    # The summary ends our output. A Ray worker's own late lines ("(ClientAppActor pid=...) WARNING: Manually
    # terminating ClientAppActor", logged by Flower as it stops the actors) may still be forwarded after it.
    ours = [line for line in err.strip().splitlines() if not re.search(r"\((\w+ )?pid=\d+", line)]
    assert ours[-1].startswith("3 rounds: final test accuracy")


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


def test_new_flags_reach_the_run_config():
    args = vars(build_parser().parse_args(["simulate", "--strategy", "rtopk", "--no-error-feedback", "--r-ratio", "0.05"]))
    assert (args["error_feedback"], args["r_ratio"]) == (False, 0.05)
    defaults = vars(build_parser().parse_args(["simulate"]))
    assert (defaults["error_feedback"], defaults["r_ratio"], defaults["lr"], defaults["positions"]) == (True, None, None, "rice")


def test_bad_r_ratio_exits_2_before_ray(capsys):
    assert main(["simulate", "--strategy", "rtopk", "--r-ratio", "2"]) == 2
    assert "r-ratio must be in (0, 1]" in capsys.readouterr().err
    assert main(["simulate", "--strategy", "topk", "--r-ratio", "0.1"]) == 2
    assert "r-ratio is rtopk's" in capsys.readouterr().err


def test_help_says_what_an_unset_lr_means(capsys):
    from fl_sparse.server_app import MODEL_LR

    with pytest.raises(SystemExit):
        main(["simulate", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "the model's own:" in help_text and f"cnn-fmnist {MODEL_LR['cnn-fmnist']:g}" in help_text
    assert "(default: None)" not in help_text and "(default: rice)" in help_text


def test_reproduce_subcommand_is_the_reproduce_modules(monkeypatch, capsys):
    """``fl-sparse reproduce`` takes its arguments and its run from fl_sparse.simulations.reproduce."""
    import sys
    import types

    import fl_sparse.simulations

    calls = []
    fake = types.ModuleType("fl_sparse.simulations.reproduce")
    fake.add_arguments = lambda p: p.add_argument("name")
    fake.run = lambda args: calls.append(args.name) or 7
    monkeypatch.setitem(sys.modules, "fl_sparse.simulations.reproduce", fake)
    monkeypatch.setattr(fl_sparse.simulations, "reproduce", fake, raising=False)
    assert main(["reproduce", "bidirectional-topk"]) == 7
    assert calls == ["bidirectional-topk"]


def test_reproduce_without_its_module_says_so(monkeypatch, capsys):
    import sys

    import fl_sparse.simulations

    monkeypatch.delattr(fl_sparse.simulations, "reproduce", raising=False)
    monkeypatch.setitem(sys.modules, "fl_sparse.simulations.reproduce", None)  # import fails
    assert main(["reproduce", "anything"]) == 2
    assert "fl-sparse reproduce: unavailable" in capsys.readouterr().err
    assert main(["simulate", "--ratio", "0"]) == 2  # the other commands still work
