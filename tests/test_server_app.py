"""Server-side plumbing of a simulation: where client state goes, how the Grid polls, Ray settings."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from fl_sparse.server_app import RunConfig, simulation_state_dir
from fl_sparse.simulations.runner import INLINE_OBJECT_BYTES, backend_config


def test_state_dir_goes_to_ram_only_when_all_states_fit_in_a_quarter(tmp_path, monkeypatch):
    shm = tmp_path / "shm"
    shm.mkdir()
    free = 10 * 2**30
    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(free, 0, free))
    fits = simulation_state_dir(numel=50_890, clients=100, shm=str(shm))
    assert Path(fits).parent == shm
    # ResNet-18 x 100 clients: ~9 GB of state, more than a quarter of 10 GiB.
    too_big = simulation_state_dir(numel=11_173_962, clients=100, shm=str(shm))
    assert Path(too_big).parent == Path(tempfile.gettempdir())
    os.rmdir(too_big)
    # 1,000 clients x 200,000 entries: 1.6 GB of model and error, 2.4 GB with the error's spare
    # (states this small keep one): a quarter of 8 GiB holds the first, not the second.
    free = 8 * 2**30
    with_spares = simulation_state_dir(numel=200_000, clients=1000, shm=str(shm))
    assert Path(with_spares).parent == Path(tempfile.gettempdir())
    os.rmdir(with_spares)
    missing = simulation_state_dir(numel=10, clients=1, shm=str(tmp_path / "no-such-dir"))
    assert Path(missing).parent == Path(tempfile.gettempdir())
    os.rmdir(missing)


def test_backend_config_raises_rays_inline_limit_and_keeps_resources(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    cfg = RunConfig(clients=10, num_cpus=0.5, num_gpus=0.25)
    backend = backend_config(cfg)
    assert backend["client_resources"] == {"num_cpus": 0.5, "num_gpus": 0.25}
    assert backend["init_args"]["_system_config"]["max_direct_call_object_size"] == INLINE_OBJECT_BYTES
    # a dense MLP sync (~200 kB) fits; a ResNet-18 one (~45 MB) does not
    assert 4 * 242_762 < INLINE_OBJECT_BYTES < 4 * 11_173_962


def test_backend_config_sends_no_system_settings_to_an_existing_cluster(monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")
    init_args = backend_config(RunConfig())["init_args"]
    assert "_system_config" not in init_args and init_args["include_dashboard"] is False


# ---------------------------------------------------------------- run folders
import csv
import io
import json
import subprocess
from dataclasses import fields, replace
from datetime import datetime

import pytest
import torch

import fl_sparse
import fl_sparse.server_app as server_app
from fl_sparse import checkpoint
from fl_sparse.clients.app import app as builtin_app
from fl_sparse.server_app import (
    METRIC_COLUMNS,
    MODEL_LR,
    MetricsLog,
    _git_commit,
    _Progress,
    _train_config,
    resume_config,
    run_server,
    strategy_from_config,
)
from fl_sparse.tasks.models import MODEL_NAMES
from inprocess import InProcessGrid

SMALL = RunConfig(clients=3, rounds=3, local_steps=1, batch_size=10, ratio=0.02, seed=5, quiet=True)


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _csv(path: Path) -> tuple[list[str], list[dict]]:
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        return list(reader.fieldnames), list(reader)


def _assert_running_sums(rows: list[dict]) -> None:
    up = down = 0
    for r in rows:
        up += r["uplink_bytes"]
        down += r["downlink_bytes"]
        assert (r["cumulative_uplink_bytes"], r["cumulative_downlink_bytes"]) == (up, down), r["round"]


def test_run_folder_config_json_holds_every_setting_and_the_machine(tmp_path):
    out = tmp_path / "run"
    cfg = replace(SMALL, out=str(out))
    run_server(InProcessGrid(builtin_app, 3), cfg)
    meta = json.loads((out / "config.json").read_text())
    for f in fields(RunConfig):
        assert meta[f.name] == getattr(cfg, f.name), f.name
    assert meta["lr"] is None and meta["lr_used"] == MODEL_LR["mlp-784-64-10"] == 0.1  # unset: the model's own
    assert meta["num_params"] == 50_890 and meta["clients_per_round"] == 3
    versions = meta["versions"]
    assert versions["fl_sparse"] == fl_sparse.__version__ and versions["torch"] == torch.__version__
    assert versions["flwr"] and versions["flwr_datasets"] and versions["python"].count(".") == 2
    root = Path(fl_sparse.__file__).resolve().parents[1]
    if (root / ".git").exists():
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
        assert meta["git_commit"] == head and len(head) == 40
    else:
        assert meta["git_commit"] is None
    assert meta["device"] == "cpu" and meta["cpu_count"] == os.cpu_count()
    started = datetime.fromisoformat(meta["started_at"])
    assert started.tzinfo is not None and abs((datetime.now(started.tzinfo) - started).total_seconds()) < 600


def test_git_commit_is_none_outside_a_checkout(tmp_path):
    assert _git_commit(tmp_path) is None


def test_metrics_are_appended_one_line_per_round_not_rewritten(tmp_path, monkeypatch):
    """After each round's append, metrics.jsonl / .csv hold exactly that many rows, the earlier bytes unchanged."""
    out = tmp_path / "run"
    seen = []
    real_append = MetricsLog.append

    def watching_append(self, row):
        before = (self.jsonl.read_bytes(), self.csv.read_bytes())
        real_append(self, row)
        after = (self.jsonl.read_bytes(), self.csv.read_bytes())
        assert after[0].startswith(before[0]) and after[1].startswith(before[1])  # appended, not rewritten
        lines = after[0].decode().splitlines()
        seen.append((row["round"], len(lines), json.loads(lines[-1])["round"], len(after[1].decode().splitlines())))
        assert not (out / "metrics.json").exists()  # the whole list is written once, at the end

    monkeypatch.setattr(MetricsLog, "append", watching_append)
    rows = run_server(InProcessGrid(builtin_app, 3), replace(SMALL, out=str(out)))
    assert seen == [(1, 1, 1, 2), (2, 2, 2, 3), (3, 3, 3, 4)]  # csv: header + one line per round

    lines = _jsonl(out / "metrics.jsonl")
    assert [r["round"] for r in lines] == [1, 2, 3]
    assert lines[-1]["sync_modes"] == rows[-1]["sync_modes"]  # keys beyond the CSV columns are kept in JSON
    header, csv_rows = _csv(out / "metrics.csv")
    assert header == list(METRIC_COLUMNS)
    assert [int(r["cumulative_uplink_bytes"]) for r in csv_rows] == [r["cumulative_uplink_bytes"] for r in rows]
    assert float(csv_rows[-1]["test_accuracy"]) == pytest.approx(rows[-1]["test_accuracy"])
    assert json.loads((out / "metrics.json").read_text()) == lines  # backward compatible, at the end

    _assert_running_sums(rows)
    assert rows[0]["uplink_bytes"] > 0 and rows[1]["downlink_bytes"] > 0
    elapsed = [r["elapsed_seconds"] for r in rows]
    assert 0 < elapsed[0] < elapsed[1] < elapsed[2]


def test_a_resumed_run_rewrites_the_files_from_its_checkpoint_and_continues_the_sums(tmp_path):
    out = tmp_path / "run"
    first = run_server(InProcessGrid(builtin_app, 3), replace(SMALL, out=str(out), rounds=2))
    started = json.loads((out / "config.json").read_text())["started_at"]
    # A round the checkpoint does not have (the process died after writing it): the resume drops it.
    with open(out / "metrics.jsonl", "a") as fh:
        fh.write(json.dumps({"round": 3, "uplink_bytes": 10**9}) + "\n")

    rows = run_server(InProcessGrid(builtin_app, 3, run_id=8), resume_config(out, rounds=4))
    assert [r["round"] for r in rows] == [1, 2, 3, 4]
    assert rows[:2] == first  # the checkpoint's rows, cumulative columns and all
    _assert_running_sums(rows)
    assert rows[2]["elapsed_seconds"] > first[-1]["elapsed_seconds"]  # the wall clock goes on too
    assert _jsonl(out / "metrics.jsonl") == json.loads((out / "metrics.json").read_text())
    assert [r["round"] for r in _jsonl(out / "metrics.jsonl")] == [1, 2, 3, 4]
    assert [int(r["cumulative_downlink_bytes"]) for r in _csv(out / "metrics.csv")[1]] == [
        r["cumulative_downlink_bytes"] for r in rows
    ]
    meta = json.loads((out / "config.json").read_text())
    assert meta["rounds"] == 4 and meta["resume"] == str(out)
    assert meta["started_at"] == started and len(meta["resumed_at"]) == 1


def test_checkpoint_rows_without_cumulative_columns_get_running_sums(tmp_path):
    """A checkpoint of an older fl-sparse: its rows have no cumulative columns; a resume adds them."""
    out = tmp_path / "run"
    run_server(InProcessGrid(builtin_app, 3), replace(SMALL, out=str(out), rounds=2))
    data = checkpoint.load(out)
    for r in data["rows"]:
        del r["cumulative_uplink_bytes"], r["cumulative_downlink_bytes"], r["elapsed_seconds"]
    checkpoint.save(out, data)
    rows = run_server(InProcessGrid(builtin_app, 3, run_id=8), resume_config(out, rounds=3))
    _assert_running_sums(rows)


def test_metrics_log_writes_non_finite_numbers_as_null_and_empty_cells(tmp_path):
    log = MetricsLog(tmp_path, [{"round": 1, "train_loss": float("nan"), "uplink_bytes": 5}])
    log.append({"round": 2, "train_loss": float("inf"), "extra": {"a": float("-inf")}})
    assert _jsonl(tmp_path / "metrics.jsonl") == [
        {"round": 1, "train_loss": None, "uplink_bytes": 5},
        {"round": 2, "train_loss": None, "extra": {"a": None}},
    ]
    _, rows = _csv(tmp_path / "metrics.csv")
    assert [(r["round"], r["train_loss"], r["uplink_bytes"]) for r in rows] == [("1", "", "5"), ("2", "", "")]


# ---------------------------------------------------------------- progress display
ROWS = [
    {"round": 1, "test_accuracy": 0.5, "train_loss": 1.25, "cumulative_uplink_bytes": 1_500_000,
     "cumulative_downlink_bytes": 250_000, "elapsed_seconds": 2.0},
    {"round": 2, "train_loss": 0.75, "cumulative_uplink_bytes": 3_000_000,
     "cumulative_downlink_bytes": 500_000, "elapsed_seconds": 4.0},  # not evaluated: the last accuracy stays
    {"round": 3, "test_accuracy": 0.7, "train_loss": 0.5, "cumulative_uplink_bytes": 4_500_000,
     "cumulative_downlink_bytes": 750_000, "elapsed_seconds": 6.5},
]


def test_progress_prints_a_plain_line_per_round_and_the_totals_when_not_a_terminal():
    stream = io.StringIO()
    progress = _Progress(3, stream=stream)
    assert progress.live is None
    for r in ROWS:
        progress.update(r)
    progress.close(ROWS)
    lines = stream.getvalue().splitlines()
    assert len(lines) == 4
    assert lines[0].startswith("[######..............] round 1/3  acc 50.00%  loss 1.2500  up 1.50 MB  down 0.25 MB")
    assert "round 2/3  acc 50.00%  loss 0.7500  up 3.00 MB  down 0.50 MB" in lines[1]
    assert lines[2].startswith("[####################] round 3/3  acc 70.00%") and lines[2].endswith("ETA 0 s")
    assert "s/round" in lines[0] and "\x1b" not in stream.getvalue()
    assert lines[3] == ("3 rounds: final test accuracy 70.00%, best 70.00%; uplink 4.50 MB, downlink 0.75 MB "
                        "in total; wall time 6.5 s")


def test_progress_totals_report_the_best_accuracy_apart_from_the_final_one():
    rows = [dict(ROWS[0], test_accuracy=0.8), ROWS[1], ROWS[2]]
    assert "final test accuracy 70.00%, best 80.00%" in _Progress.totals(rows)


def test_progress_on_a_terminal_is_one_rich_live_line():
    from rich.console import Console
    from rich.live import Live

    stream = io.StringIO()
    progress = _Progress(3, console=Console(file=stream, force_terminal=True, width=200))
    assert isinstance(progress.live, Live) and progress.live.is_started
    for r in ROWS:
        progress.update(r)
    live = progress.live
    progress.close(ROWS)
    assert not live.is_started and progress.live is None
    text = stream.getvalue()
    assert "\x1b[2K" in text  # the line is erased and redrawn in place...
    assert text.count("\n") == 2  # ...so only the last state and the totals end in a newline
    assert "round 3/3" in text and "3 rounds: final test accuracy 70.00%" in text


def test_progress_picks_rich_when_stderr_is_a_terminal():
    class Tty(io.StringIO):
        def isatty(self):
            return True

    progress = _Progress(2, stream=Tty())
    try:
        assert progress.live is not None
    finally:
        progress.close([])


def test_run_server_progress_lines_when_not_a_terminal(tmp_path, capsys):
    run_server(InProcessGrid(builtin_app, 3), replace(SMALL, quiet=False))
    err = capsys.readouterr().err.splitlines()
    progress = [line for line in err if "] round " in line]
    assert [line.split("] round ")[1].split()[0] for line in progress] == ["1/3", "2/3", "3/3"]
    assert err[-1].startswith("3 rounds: final test accuracy ") and "wall time" in err[-1]


# ---------------------------------------------------------------- defaults and settings
def test_defaults_show_the_method_at_its_best():
    cfg = RunConfig()
    assert (cfg.strategy, cfg.positions, cfg.rounds, cfg.local_steps, cfg.batch_size, cfg.ratio) == (
        "bidirectional-topk", "rice", 20, 20, 32, 0.01)
    assert cfg.lr is None and cfg.effective_lr == 0.1
    assert cfg.error_feedback is True and cfg.r_ratio is None


def test_a_local_simulation_without_gpus_tells_its_clients_to_train_on_the_cpu():
    """Zero GPUs per client reserves none, so a client must not train on one it can see (Ray
    shows every GPU to a zero-GPU actor when RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO=0)."""
    def devices_sent(cfg, **kw):
        grid = InProcessGrid(builtin_app, cfg.clients)  # no node config: the train config decides
        run_server(grid, cfg, **kw)
        configs = [m.content["config"] for m in grid.sent if "config" in m.content]  # the identify calls have none
        assert len(configs) == 2 * 2  # two rounds, two clients sampled in each
        return {config.get("device") for config in configs}

    cfg = RunConfig(model="logreg-784-10", clients=3, rounds=2, fraction=2 / 3, ratio=0.05, quiet=True)
    assert devices_sent(cfg, local_clients=True) == {"cpu"}
    # clients elsewhere (flwr run, real SuperNodes) pick their own device: "auto" or their node config's
    assert devices_sent(cfg) == {None}
    assert "device" not in _train_config(replace(cfg, num_gpus=0.5), local_clients=True)
    assert _train_config(cfg, local_clients=True)["device"] == "cpu"


def test_simulate_pins_ray_hiding_gpus_from_actors_that_reserved_none(monkeypatch):
    from fl_sparse.simulations.runner import set_simulation_environment

    for name in ("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "FLWR_TELEMETRY_ENABLED", "RAY_DEDUP_LOGS"):
        monkeypatch.delenv(name, raising=False)
    set_simulation_environment()
    assert os.environ["RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO"] == "1"  # "0" shows every GPU to every client
    assert os.environ["FLWR_TELEMETRY_ENABLED"] == "0" and os.environ["RAY_DEDUP_LOGS"] == "0"
    monkeypatch.setenv("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    set_simulation_environment()
    assert os.environ["RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO"] == "0"  # the user's own setting is kept


def test_lr_unset_means_the_models_own_and_reaches_the_clients():
    assert set(MODEL_LR) == set(MODEL_NAMES)  # every built-in model has one
    assert RunConfig(model="cnn-fmnist").effective_lr == MODEL_LR["cnn-fmnist"] < 0.05  # diverged at 0.05 and 0.1
    assert RunConfig(model="cnn-fmnist", lr=0.3).effective_lr == 0.3
    assert _train_config(RunConfig(model="cnn-fmnist"))["lr"] == MODEL_LR["cnn-fmnist"]
    assert RunConfig.from_run_config({"lr": -1.0}).lr is None and RunConfig.from_run_config({"lr": 0.2}).lr == 0.2
    with pytest.raises(ValueError, match="model 'mystery' has no default learning rate; give lr"):
        RunConfig(model="mystery").validate()
    RunConfig(model="mystery", lr=0.1).validate()
    with pytest.raises(ValueError, match="lr must be a positive"):
        RunConfig(lr=0.0).validate()


def test_strategy_from_config_passes_error_feedback_and_r_ratio(monkeypatch):
    seen = {}
    monkeypatch.setattr(server_app, "build_strategy", lambda name, **kw: seen.update(kw, name=name) or "built")
    assert strategy_from_config(RunConfig(strategy="rtopk", error_feedback=False, r_ratio=0.05, lr=0.3)) == "built"
    assert (seen["name"], seen["error_feedback"], seen["r_ratio"], seen["lr"]) == ("rtopk", False, 0.05, 0.3)
    strategy_from_config(RunConfig())
    assert (seen["error_feedback"], seen["r_ratio"], seen["lr"]) == (True, None, 0.1)


def test_error_feedback_and_r_ratio_reach_the_real_strategy():
    plain = strategy_from_config(RunConfig(strategy="topk", error_feedback=False))
    assert plain.client_error_feedback is False
    assert strategy_from_config(RunConfig(strategy="topk")).client_error_feedback is True
    assert strategy_from_config(RunConfig(strategy="rtopk", r_ratio=0.05)).r_ratio == 0.05
    assert RunConfig.from_run_config({"r-ratio": -1.0, "error-feedback": False}).r_ratio is None
    assert RunConfig.from_run_config({"strategy": "rtopk", "r-ratio": 0.2}).r_ratio == 0.2
    with pytest.raises(ValueError, match="r-ratio must be in"):
        RunConfig(strategy="rtopk", r_ratio=1.5).validate()
    with pytest.raises(ValueError, match="r-ratio is rtopk's"):
        RunConfig(strategy="topk", r_ratio=0.1).validate()


def test_progress_seconds_per_round_and_eta_leave_out_the_first_rounds_start_up(monkeypatch):
    clock = iter([0.0, 10.0, 12.0, 15.0])
    monkeypatch.setattr(server_app.time, "perf_counter", lambda: next(clock))
    stream = io.StringIO()
    progress = _Progress(3, stream=stream)
    for r in ROWS:
        progress.update(r)
    lines = stream.getvalue().splitlines()
    assert [line.split("  ")[-2:] for line in lines] == [
        ["10.00 s/round", "ETA 20 s"],  # round 1 alone: it includes starting the clients
        ["2.00 s/round", "ETA 2 s"],  # from round 2 on: the rounds after the first
        ["2.50 s/round", "ETA 0 s"],
    ]


def test_progress_live_line_never_wraps_on_a_narrow_terminal():
    from rich.console import Console

    stream = io.StringIO()
    progress = _Progress(3, console=Console(file=stream, force_terminal=True, width=60))
    progress.update(ROWS[0])
    progress.close([])
    import re

    plain = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", stream.getvalue())  # without the control sequences
    drawn = [line for line in plain.replace("\r", "\n").split("\n") if "round 1/3" in line]
    assert drawn and all(len(line) <= 60 for line in drawn)
    assert drawn[-1].startswith("round 1/3  ETA")  # round and time left come first
    wide = _Progress(3, stream=io.StringIO())
    assert wide.terminal_line(ROWS[0], 200).startswith("[######..............] round 1/3")
