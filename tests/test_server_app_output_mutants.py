"""What ``server_app`` prints and writes beside a run, pinned exactly (kills its output mutants).

``preflight``, ``config.json``, the metrics files (``MetricsLog``, ``metrics.json``, the running byte
sums), ``model.pt``, the git commit and the progress display (``_Progress``): each expected value is
written out by hand here (or computed by an independent route: ``git rev-parse`` run by the test,
``importlib.metadata``), never read back from the code under test. docs/testing.md has the score.
No Ray, no simulation: the dataset loader and partitioner are replaced by fakes where the split
itself is not the point.
"""

from __future__ import annotations

import io
import json
import logging
import math
import subprocess
import sys
from dataclasses import replace
from importlib import metadata
from pathlib import Path

import pytest
import torch

import fl_sparse.server_app as server_app
import fl_sparse.tasks.data as data
from fl_sparse.checkpoint import CheckpointError
from fl_sparse.server_app import (
    METRIC_COLUMNS,
    MetricsLog,
    RunConfig,
    _accuracy,
    _git_commit,
    _mb,
    _Progress,
    _save_model,
    _stderr_is_terminal,
    _version,
    _write_config_json,
    _write_metrics_json,
    add_cumulative_bytes,
    preflight,
    write_metrics,
)

HEADER = ",".join(METRIC_COLUMNS) + "\r\n"  # csv's own line ends, as the module writes them


def _raw(path: Path) -> str:
    """The file's text with its line ends as written (read_text would turn "\\r\\n" into "\\n")."""
    return path.read_bytes().decode()


def _empty_cells(n: int) -> str:
    return "," * n


# ---------------------------------------------------------------- metrics files
def test_metrics_log_writes_each_row_as_exact_json_and_csv_lines(tmp_path):
    out = tmp_path / "a" / "b"  # made, parents too
    log = MetricsLog(out, [{"round": 1, "uplink_bytes": 10, "extra": (1.5, float("nan")), 3: "k"}])
    assert (out / "metrics.jsonl").read_text() == '{"round": 1, "uplink_bytes": 10, "extra": [1.5, null], "3": "k"}\n'
    # 24 columns: round first, uplink_bytes the fifth; the extra keys are left out of the CSV.
    assert _raw(out / "metrics.csv") == HEADER + "1,,,,10" + _empty_cells(19) + "\r\n"
    log.append({"round": 2, "train_loss": float("inf"), "test_accuracy": 0.25, "elapsed_seconds": 7.5,
                "path": Path("/x/y")})
    assert (out / "metrics.jsonl").read_text().splitlines() == [
        '{"round": 1, "uplink_bytes": 10, "extra": [1.5, null], "3": "k"}',
        '{"round": 2, "train_loss": null, "test_accuracy": 0.25, "elapsed_seconds": 7.5, "path": "/x/y"}',
    ]
    assert _raw(out / "metrics.csv") == (
        HEADER + "1,,,,10" + _empty_cells(19) + "\r\n" + "2,0.25,,," + _empty_cells(19) + "7.5\r\n"
    )
    log.append({"round": 3, "density": None})
    assert (out / "metrics.jsonl").read_text().endswith('{"round": 3, "density": null}\n')
    assert _raw(out / "metrics.csv").endswith("\r\n3" + _empty_cells(23) + "\r\n")
    assert sorted(p.name for p in out.iterdir()) == ["metrics.csv", "metrics.jsonl"]


def test_a_new_metrics_log_rewrites_both_files_in_an_existing_folder(tmp_path):
    (tmp_path / "metrics.jsonl").write_text("old line\n")
    (tmp_path / "metrics.csv").write_text("old,csv\n")
    MetricsLog(tmp_path)  # a new run: no rows
    assert (tmp_path / "metrics.jsonl").read_text() == ""
    assert _raw(tmp_path / "metrics.csv") == HEADER
    MetricsLog(str(tmp_path), [{"round": 4}, {"round": 5, "clients": 2}])  # a str folder, several rows
    assert (tmp_path / "metrics.jsonl").read_text() == '{"round": 4}\n{"round": 5, "clients": 2}\n'
    clients = METRIC_COLUMNS.index("clients")
    assert _raw(tmp_path / "metrics.csv") == (
        HEADER + "4" + _empty_cells(23) + "\r\n" + "5" + "," * clients + "2" + _empty_cells(23 - clients) + "\r\n"
    )


def test_a_row_that_cannot_be_written_touches_neither_file(tmp_path):
    class Unprintable:
        def __str__(self):
            raise RuntimeError("no text for this")

    log = MetricsLog(tmp_path, [{"round": 1}])
    before = ((tmp_path / "metrics.jsonl").read_text(), _raw(tmp_path / "metrics.csv"))
    with pytest.raises(RuntimeError, match="no text for this"):
        log.append({"round": 2, "bad": Unprintable()})
    assert ((tmp_path / "metrics.jsonl").read_text(), _raw(tmp_path / "metrics.csv")) == before


def test_metrics_json_is_the_whole_list_indented_and_strict(tmp_path):
    rows = [{"round": 1, "x": float("-inf"), "d": {"k": [1, 2.5]}}, {"round": 2, "p": Path("/q")}]
    _write_metrics_json(rows, str(tmp_path))
    assert (tmp_path / "metrics.json").read_text() == (
        '[\n {\n  "round": 1,\n  "x": null,\n  "d": {\n   "k": [\n    1,\n    2.5\n   ]\n  }\n },\n'
        ' {\n  "round": 2,\n  "p": "/q"\n }\n]'
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]  # no temporary file left


def test_write_metrics_writes_all_three_files(tmp_path):
    out = tmp_path / "new"
    write_metrics([{"round": 1, "uplink_bytes": 3}], out)
    assert json.loads((out / "metrics.json").read_text()) == [{"round": 1, "uplink_bytes": 3}]
    assert (out / "metrics.jsonl").read_text() == '{"round": 1, "uplink_bytes": 3}\n'
    assert _raw(out / "metrics.csv") == HEADER + "1,,,,3" + _empty_cells(19) + "\r\n"


def test_add_cumulative_bytes_running_sums_in_place_keeping_given_ones():
    rows = [
        {"uplink_bytes": 10, "downlink_bytes": 3},
        {"uplink_bytes": None},  # no bytes: the sums stay
        {"cumulative_uplink_bytes": 100, "cumulative_downlink_bytes": 50, "uplink_bytes": 1, "downlink_bytes": 1},
        {"uplink_bytes": 5.9, "downlink_bytes": 7},  # a float counts as its integer part
        {"cumulative_downlink_bytes": 1000, "uplink_bytes": 2, "downlink_bytes": 4},
        {"downlink_bytes": 1},
    ]
    same = add_cumulative_bytes(rows)
    assert same is rows
    assert [(r["cumulative_uplink_bytes"], r["cumulative_downlink_bytes"]) for r in rows] == [
        (10, 3), (10, 3), (100, 50), (105, 57), (107, 1000), (107, 1001)
    ]
    assert all(type(r["cumulative_uplink_bytes"]) is int for r in rows)
    assert add_cumulative_bytes([]) == []


def test_add_cumulative_bytes_reads_a_null_sum_as_missing():
    """A hand-edited or merged metrics file with null sums raised a bare TypeError (None + int) on the next row."""
    rows = [{"uplink_bytes": 4, "downlink_bytes": 1},
            {"cumulative_uplink_bytes": None, "cumulative_downlink_bytes": None, "uplink_bytes": 6, "downlink_bytes": 2},
            {"uplink_bytes": 1, "downlink_bytes": 1}]
    add_cumulative_bytes(rows)
    assert [(r["cumulative_uplink_bytes"], r["cumulative_downlink_bytes"]) for r in rows] == [(4, 1), (10, 3), (11, 4)]


# ---------------------------------------------------------------- model.pt, versions, git
def test_save_model_writes_the_state_dict_atomically(tmp_path):
    from flwr.app import ArrayRecord

    state = {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3), "n": torch.tensor(7, dtype=torch.int64)}
    _save_model(ArrayRecord(state), str(tmp_path))
    loaded = torch.load(tmp_path / "model.pt", weights_only=True)
    assert list(loaded) == ["w", "n"]
    assert torch.equal(loaded["w"], state["w"]) and torch.equal(loaded["n"], state["n"])
    assert loaded["n"].dtype == torch.int64
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]


def test_version_of_an_installed_and_a_missing_distribution():
    assert _version("flwr") == metadata.version("flwr")
    assert _version("no-such-distribution-fl-sparse") is None


def _git(*args, cwd):
    return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false", *args],
                          cwd=cwd, capture_output=True, text=True, check=True).stdout.strip()


def test_git_commit_of_a_checkout_and_not_of_a_folder_inside_one(tmp_path):
    _git("init", "-q", cwd=tmp_path)
    (tmp_path / "f").write_text("x")
    _git("add", "f", cwd=tmp_path)
    _git("commit", "-q", "-m", "m", cwd=tmp_path)
    head = _git("rev-parse", "HEAD", cwd=tmp_path)
    assert len(head) == 40
    assert _git_commit(tmp_path) == head  # exactly 40 characters: kept
    (tmp_path / "sub").mkdir()
    assert _git_commit(tmp_path / "sub") is None  # git would answer there; only the checkout's own root counts


def test_git_commit_is_none_when_git_fails_is_missing_or_answers_oddly(tmp_path, monkeypatch):
    (tmp_path / ".git").mkdir()  # not a repository: git exits non-zero
    assert _git_commit(tmp_path) is None
    calls = []

    def fake_run(args, **kw):
        calls.append((args, kw))
        return subprocess.CompletedProcess(args, 0, stdout=" " + "a" * 39 + "\n", stderr="")

    monkeypatch.setattr(server_app.subprocess, "run", fake_run)
    assert _git_commit(tmp_path) is None  # 39 characters: not a commit
    assert calls == [(["git", "-C", str(tmp_path), "rev-parse", "HEAD"],
                      {"capture_output": True, "text": True, "timeout": 3, "check": False})]
    monkeypatch.setattr(server_app.subprocess, "run",
                        lambda args, **kw: subprocess.CompletedProcess(args, 0, stdout="b" * 64 + "\n", stderr=""))
    assert _git_commit(tmp_path) == "b" * 64  # a SHA-256 repository's commit
    monkeypatch.setattr(server_app.subprocess, "run",
                        lambda args, **kw: subprocess.CompletedProcess(args, 1, stdout="c" * 40, stderr=""))
    assert _git_commit(tmp_path) is None  # failed, whatever it printed
    for exc in (FileNotFoundError(2, "no git"), subprocess.TimeoutExpired("git", 3)):
        def raising(args, exc=exc, **kw):
            raise exc

        monkeypatch.setattr(server_app.subprocess, "run", raising)
        assert _git_commit(tmp_path) is None


# ---------------------------------------------------------------- config.json
def test_config_json_of_a_new_run_is_the_metadata_indented_and_strict(tmp_path):
    out = tmp_path / "x" / "y"  # made, parents too
    meta = {"rounds": 3, "resume": None, "lr": float("nan"), "path": Path("/p"), "started_at": "T1"}
    _write_config_json(str(out), meta)
    assert (out / "config.json").read_text() == (
        '{\n "rounds": 3,\n "resume": null,\n "lr": null,\n "path": "/p",\n "started_at": "T1"\n}\n'
    )
    assert sorted(p.name for p in out.iterdir()) == ["config.json"]
    # a new run (resume unset or "") writes over what is there, keeping nothing of it
    (out / "config.json").write_text(json.dumps({"started_at": "T0", "resumed_at": ["T0b"]}))
    _write_config_json(out, {"resume": "", "started_at": "T2"})
    assert json.loads((out / "config.json").read_text()) == {"resume": "", "started_at": "T2"}


def test_config_json_of_a_resumed_run_keeps_the_start_and_lists_each_resume(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"started_at": "T0", "rounds": 2}))
    _write_config_json(tmp_path, {"resume": str(tmp_path), "rounds": 5, "started_at": "T1"})
    first = json.loads((tmp_path / "config.json").read_text())
    assert first == {"resume": str(tmp_path), "rounds": 5, "started_at": "T0", "resumed_at": ["T1"]}
    assert list(first) == ["resume", "rounds", "started_at", "resumed_at"]
    _write_config_json(tmp_path, {"resume": str(tmp_path), "rounds": 9, "started_at": "T2"})
    assert json.loads((tmp_path / "config.json").read_text()) == {
        "resume": str(tmp_path), "rounds": 9, "started_at": "T0", "resumed_at": ["T1", "T2"]
    }
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json"]


def test_config_json_of_a_resumed_run_whose_old_config_lacks_a_start_or_is_unreadable(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"rounds": 2}))  # no started_at: this start is the first known
    _write_config_json(tmp_path, {"resume": "r", "started_at": "T1"})
    assert json.loads((tmp_path / "config.json").read_text()) == {"resume": "r", "started_at": "T1",
                                                                  "resumed_at": ["T1"]}
    for old in ("not json {", "[1, 2]"):  # unreadable, or not an object: written as a new run's
        (tmp_path / "config.json").write_text(old)
        _write_config_json(tmp_path, {"resume": "r", "started_at": "T3"})
        assert json.loads((tmp_path / "config.json").read_text()) == {"resume": "r", "started_at": "T3"}
    missing = tmp_path / "none"
    _write_config_json(missing, {"resume": "r", "started_at": "T4"})  # no old file at all
    assert json.loads((missing / "config.json").read_text()) == {"resume": "r", "started_at": "T4"}


# ---------------------------------------------------------------- preflight
BASE = RunConfig(strategy="topk", clients=3, rounds=2, local_steps=1, batch_size=8, quiet=True)


class _Train:
    labels = torch.zeros(21, dtype=torch.int64)


@pytest.fixture
def fake_split(monkeypatch):
    """load_dataset and partition_indices replaced; returns the partitioner's calls and its sizes."""
    calls, sizes = [], [5, 7, 9]

    def load(name):
        calls.append(("load", name))
        return _Train(), None

    def partition(dataset, labels, partition, clients, pid, **kw):
        calls.append((dataset, labels is _Train.labels, partition, clients, pid, kw))
        return torch.arange(sizes[pid])

    monkeypatch.setattr(data, "load_dataset", load)
    monkeypatch.setattr(data, "partition_indices", partition)
    monkeypatch.setattr(server_app.os, "cpu_count", lambda: 4)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    return calls, sizes


def test_preflight_returns_the_split_summary_and_hands_the_partitioner_every_setting(fake_split):
    calls, _ = fake_split
    cfg = replace(BASE, partition="dirichlet", alpha=0.3, seed=11, min_partition_size=2, self_balancing=True)
    line = preflight(cfg)
    assert line == "3 partitions of 21 examples: min 5, median 7, mean 7.0, max 9; 2 smaller than a batch of 8 " \
                   "(they train on one smaller batch)"
    kw = {"alpha": 0.3, "seed": 11, "min_partition_size": 2, "self_balancing": True}
    assert calls == [("load", "fashion-mnist")] + [("fashion-mnist", True, "dirichlet", 3, pid, kw) for pid in range(3)]


def test_preflight_names_an_empty_partition_and_a_failed_split(fake_split, monkeypatch):
    _, sizes = fake_split
    sizes[:] = [4, 0, 0]
    with pytest.raises(ValueError) as e:
        preflight(BASE)
    assert str(e.value) == "the iid split leaves partition 1 empty; use fewer clients"
    sizes[:] = [1, 1, 1]
    assert preflight(BASE).startswith("3 partitions of 3 examples: min 1,")  # one example each is enough

    def failing(*a, **k):
        raise RuntimeError("cannot do it")

    monkeypatch.setattr(data, "partition_indices", failing)
    with pytest.raises(ValueError) as e:
        preflight(BASE)
    assert str(e.value) == "cannot split fashion-mnist into 3 iid partitions: cannot do it"
    assert e.value.__cause__ is None and e.value.__suppress_context__


def test_preflight_names_a_missing_dataset(fake_split, monkeypatch):
    def missing(name):
        raise data.DatasetUnavailableError("fashion-mnist is not on disk here")

    monkeypatch.setattr(data, "load_dataset", missing)
    with pytest.raises(ValueError) as e:
        preflight(BASE)
    assert str(e.value) == "fashion-mnist is not on disk here" and type(e.value) is ValueError
    assert e.value.__cause__ is None and e.value.__suppress_context__


def test_preflight_checks_the_settings_first(fake_split):
    calls, _ = fake_split
    with pytest.raises(ValueError, match="^rounds must be >= 1"):
        preflight(replace(BASE, rounds=0))
    assert calls == []


def test_preflight_names_the_strategys_refusal_and_restores_flowers_log_level(fake_split, monkeypatch):
    flwr = logging.getLogger("flwr")
    monkeypatch.setattr(flwr, "level", logging.INFO)
    seen = []

    def refusing(cfg):
        seen.append(flwr.level)
        raise ValueError("ratio too small")

    monkeypatch.setattr(server_app, "strategy_from_config", refusing)
    with pytest.raises(ValueError) as e:
        preflight(BASE)
    assert str(e.value) == "strategy topk: ratio too small"
    assert e.value.__cause__ is None and e.value.__suppress_context__
    assert seen == [logging.ERROR] and flwr.level == logging.INFO

    def quiet_ok(cfg):
        seen.append(flwr.level)
        return object()

    monkeypatch.setattr(server_app, "strategy_from_config", quiet_ok)
    preflight(BASE)
    assert seen[-1] == logging.ERROR and flwr.level == logging.INFO


def test_preflight_builds_the_model(fake_split, monkeypatch):
    built = []
    monkeypatch.setattr(server_app, "_initial_model", lambda cfg: built.append(cfg.model))
    preflight(BASE)
    assert built == ["mlp-784-64-10"]


def test_preflight_reads_the_checkpoint_a_resume_continues(fake_split, monkeypatch, tmp_path):
    loads, checked, loaded = [], [], []
    ckpt = {"round": 1, "strategy": {"state": 1}}

    def load(path, **kw):
        loads.append((path, kw))
        return ckpt

    class Strategy:
        def load_state_dict(self, state):
            loaded.append(state)

    monkeypatch.setattr(server_app.checkpoint, "load", load)
    monkeypatch.setattr(server_app, "_check_resumable", lambda cfg, c: checked.append((cfg.resume, c)))
    monkeypatch.setattr(server_app, "strategy_from_config", lambda cfg: Strategy())
    cfg = replace(BASE, resume=str(tmp_path), out=str(tmp_path))
    (tmp_path / "config.json").write_text("{}")  # a run there: a resume may write into it
    preflight(cfg)
    assert loads == [(str(tmp_path), {"mmap": True})]
    assert checked == [(str(tmp_path), ckpt)] and loaded == [{"state": 1}]

    class Damaged:
        def load_state_dict(self, state):
            raise ValueError("the error memory has the wrong length")

    monkeypatch.setattr(server_app, "strategy_from_config", lambda cfg: Damaged())
    with pytest.raises(CheckpointError) as e:
        preflight(cfg)
    assert str(e.value) == f"cannot continue the run saved in {tmp_path}: the error memory has the wrong length"
    assert e.value.__cause__ is None and e.value.__suppress_context__
    # no resume: the checkpoint is not read, and a run already in the output folder is refused
    with pytest.raises(ValueError, match="already holds a run \\(config.json\\)"):
        preflight(replace(cfg, resume=None))
    assert len(loads) == 2


def test_preflight_makes_both_folders_and_leaves_nothing_in_them(fake_split, tmp_path):
    out, state = tmp_path / "o" / "p", tmp_path / "s" / "t"
    preflight(replace(BASE, out=str(out), state_dir=str(state)))
    assert list(out.iterdir()) == [] and list(state.iterdir()) == []
    preflight(replace(BASE, out=str(out), state_dir=str(state)))  # already there: fine
    only_state = tmp_path / "only" / "state"
    preflight(replace(BASE, out=None, state_dir=str(only_state)))  # no output folder: the state one still made
    assert only_state.is_dir()


@pytest.mark.parametrize("what,field", [("output folder", "out"), ("state folder", "state_dir")])
def test_preflight_names_a_folder_it_cannot_make(fake_split, tmp_path, what, field):
    (tmp_path / "file").write_text("")
    folder = str(tmp_path / "file" / "sub")
    with pytest.raises(ValueError) as e:
        preflight(replace(BASE, **{field: folder}))
    assert str(e.value) == f"{what} {folder!r} is not writable: Not a directory"
    assert e.value.__cause__ is None and e.value.__suppress_context__


def test_preflight_names_a_write_error_without_an_errno_by_its_text(fake_split, tmp_path, monkeypatch):
    def refuse(self, data):
        raise OSError("disk says no")

    monkeypatch.setattr(Path, "write_bytes", refuse)
    with pytest.raises(ValueError) as e:
        preflight(replace(BASE, out=str(tmp_path)))
    assert str(e.value) == f"output folder {str(tmp_path)!r} is not writable: disk says no"


def test_preflight_checks_cpus_on_this_machine_only(fake_split, monkeypatch):
    preflight(replace(BASE, num_cpus=4.0))  # all four
    with pytest.raises(ValueError) as e:
        preflight(replace(BASE, num_cpus=4.5))  # default: local clients
    assert str(e.value) == "num-cpus 4.5 per client, but this machine has 4 CPUs"
    preflight(replace(BASE, num_cpus=4.5), local_clients=False)
    preflight(replace(BASE, num_cpus=4.5, ray_address="10.0.0.1:6379"))
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    preflight(replace(BASE, num_cpus=4.5))
    monkeypatch.delenv("RAY_ADDRESS")
    monkeypatch.setattr(server_app.os, "cpu_count", lambda: None)  # unknown: one CPU
    preflight(replace(BASE, num_cpus=1.0))
    with pytest.raises(ValueError) as e:
        preflight(replace(BASE, num_cpus=2.0))
    assert str(e.value) == "num-cpus 2 per client, but this machine has 1 CPUs"


def test_preflight_checks_gpus_on_this_machine_only(fake_split, monkeypatch):
    gpus = {"n": 0}

    def count():
        gpus["asked"] = True
        return gpus["n"]

    monkeypatch.setattr(torch.cuda, "device_count", count)
    preflight(BASE)
    assert "asked" not in gpus  # no GPU asked for: none counted
    with pytest.raises(ValueError) as e:
        preflight(replace(BASE, num_gpus=0.25))
    assert str(e.value) == "num-gpus 0.25 per client, but no CUDA GPU is visible"
    preflight(replace(BASE, num_gpus=0.25), local_clients=False)
    gpus["n"] = 2
    preflight(replace(BASE, num_gpus=2.0))
    with pytest.raises(ValueError) as e:
        preflight(replace(BASE, num_gpus=2.5))
    assert str(e.value) == "num-gpus 2.5 per client, but this machine has 2 GPUs"


def test_preflight_of_a_real_small_split(monkeypatch):
    """Unfaked: the built-in dataset split 3 ways (20,000 examples each)."""
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert preflight(replace(BASE, num_cpus=1.0), local_clients=False) == (
        "3 partitions of 60000 examples: min 20000, median 20000, mean 20000.0, max 20000; "
        "0 smaller than a batch of 8 (they train on one smaller batch)"
    )


# ---------------------------------------------------------------- progress display helpers
def test_mb_accuracy_and_terminal_helpers():
    assert _mb(0) == "0.00 MB"
    assert _mb(1_234_567_890) == "1,234.57 MB"
    assert _mb(5_000) == "0.01 MB"
    assert _accuracy({"test_accuracy": 0.5}) == 0.5
    one = _accuracy({"test_accuracy": 1})
    assert one == 1.0 and type(one) is float
    for row in ({}, {"test_accuracy": None}, {"test_accuracy": "0.5"}, {"test_accuracy": float("nan")},
                {"test_accuracy": float("inf")}, {"test_accuracy": -math.inf}, {"accuracy": 0.5}):
        assert _accuracy(row) is None, row

    class Tty:
        def isatty(self):
            return 1

    class Closed:
        def isatty(self):
            raise ValueError("I/O operation on closed file")

    assert _stderr_is_terminal(Tty()) is True
    assert _stderr_is_terminal(io.StringIO()) is False
    assert _stderr_is_terminal(object()) is False
    assert _stderr_is_terminal(Closed()) is False


class _Clock:
    def __init__(self, *times):
        self.times = list(times)

    def __call__(self):
        return self.times.pop(0)


class _Flushes(io.StringIO):
    flushes = 0

    def flush(self):
        self.flushes += 1
        super().flush()


def _rows(*specs):
    return [dict(zip(("round", "test_accuracy", "train_loss", "cumulative_uplink_bytes",
                      "cumulative_downlink_bytes"), s)) for s in specs]


def test_progress_plain_lines_exactly(monkeypatch):
    monkeypatch.setattr(server_app.time, "perf_counter", _Clock(100.0, 103.0, 104.5, 108.0, 109.0))
    stream = _Flushes()
    p = _Progress(4.0, stream=stream)  # a float total counts as its integer
    assert p.live is None
    p.update({"round": 1, "test_accuracy": 0.05, "train_loss": 2, "cumulative_uplink_bytes": 1_500_000,
              "cumulative_downlink_bytes": 20_000})
    p.update({"round": 2, "train_loss": None})  # not evaluated: the last accuracy stays; no loss, no bytes
    p.update({"round": 3, "test_accuracy": float("nan"), "train_loss": "x"})
    p.update({"round": 4, "test_accuracy": 1.0, "train_loss": 0.123456, "cumulative_uplink_bytes": 2_345_678_901})
    assert stream.getvalue().splitlines() == [
        "[#####...............] round 1/4  acc  5.00%  loss 2.0000  up 1.50 MB  down 0.02 MB  3.00 s/round  ETA 9 s",
        "[##########..........] round 2/4  acc  5.00%  loss    -    up 0.00 MB  down 0.00 MB  1.50 s/round  ETA 3 s",
        "[###############.....] round 3/4  acc  5.00%  loss    -    up 0.00 MB  down 0.00 MB  2.50 s/round  ETA 2 s",
        "[####################] round 4/4  acc 100.00%  loss 0.1235  up 2,345.68 MB  down 0.00 MB  2.00 s/round"
        "  ETA 0 s",
    ]
    assert stream.flushes == 4


def test_progress_line_before_any_accuracy_and_past_the_last_round(monkeypatch):
    monkeypatch.setattr(server_app.time, "perf_counter", _Clock(0.0, 2000.0, 2001.0))
    p = _Progress(3, stream=io.StringIO())
    assert p.line({"round": 1}) == ("[######..............] round 1/3  acc    -    loss    -    up 0.00 MB  "
                                    "down 0.00 MB  2000.00 s/round  ETA 4,000 s")
    # a round past the total: a full bar, no time left
    assert p.line({"round": 5}).startswith("[####################] round 5/3  acc    -  ")
    assert p.line.__doc__  # noqa: the plain line
    assert p.last_accuracy is None


def test_progress_of_a_resumed_run_times_the_rounds_it_ran(monkeypatch):
    monkeypatch.setattr(server_app.time, "perf_counter", _Clock(50.0, 60.0, 64.0, 70.0))
    p = _Progress(10, first_round="7", stream=io.StringIO())  # a text first round counts as its integer
    assert p.first_round == 7 and p.total == 10
    lines = [p.line({"round": r}) for r in (7, 8, 9)]
    assert [ln.split("  ")[-2:] for ln in lines] == [
        ["10.00 s/round", "ETA 30 s"],  # round 7, this process's first: the clients' start-up included
        ["4.00 s/round", "ETA 8 s"],
        ["5.00 s/round", "ETA 5 s"],
    ]
    assert [ln.split("] ")[0] for ln in lines] == ["[##############......", "[################....",
                                                   "[##################.."]


def test_progress_round_at_or_before_the_first_restarts_the_timing(monkeypatch):
    monkeypatch.setattr(server_app.time, "perf_counter", _Clock(0.0, 4.0, 6.0, 9.0, 10.0))
    p = _Progress(5, first_round=2, stream=io.StringIO())
    assert p.line({"round": 2}).endswith("4.00 s/round  ETA 12 s")
    assert p.line({"round": 3}).endswith("2.00 s/round  ETA 4 s")
    assert p.line({"round": 2}).endswith("9.00 s/round  ETA 27 s")  # the first round again: from the start
    assert p.line({"round": 4}).endswith("0.50 s/round  ETA 0 s")


def test_progress_terminal_line_puts_the_bar_last_and_only_where_it_fits(monkeypatch):
    monkeypatch.setattr(server_app.time, "perf_counter", lambda: 0.0)
    p = _Progress(2, stream=io.StringIO())
    row = {"round": 1, "test_accuracy": 0.5, "train_loss": 1.0}
    text = "round 1/2  ETA 0 s  acc 50.00%  loss 1.0000  up 0.00 MB  down 0.00 MB  0.00 s/round"
    assert p.terminal_line(row, 200) == "[##########..........] " + text
    assert p.terminal_line(row, len(text) + 23) == "[##########..........] " + text  # exactly fits
    assert p.terminal_line(row, len(text) + 22) == text


def test_progress_defaults_to_stderr(monkeypatch, capsys):
    monkeypatch.setattr(server_app.time, "perf_counter", lambda: 0.0)
    p = _Progress(1)
    p.update({"round": 1})
    p.close([{"round": 1}])
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("[####################] round 1/1  acc    -  ")
    assert err[1] == "1 rounds: no test accuracy; uplink 0.00 MB, downlink 0.00 MB in total; wall time 0.0 s"


def test_progress_totals_exactly():
    rows = _rows((1, 0.91, 1.0, 10, 20), (2, None, 1.0, 30, 40), (3, 0.875, 1.0, 1_234_567_890, 2_000_000))
    rows[-1]["elapsed_seconds"] = 1234.56
    assert _Progress.totals(rows) == ("3 rounds: final test accuracy 87.50%, best 91.00%; uplink 1,234.57 MB, "
                                      "downlink 2.00 MB in total; wall time 1,234.6 s")
    assert _Progress.totals([{"round": 1, "test_accuracy": float("nan"), "elapsed_seconds": None}]) == (
        "1 rounds: no test accuracy; uplink 0.00 MB, downlink 0.00 MB in total; wall time 0.0 s")
    assert _Progress.totals([{"round": 1, "test_accuracy": 0.1}, {"round": 2, "elapsed_seconds": 3}]) == (
        "2 rounds: final test accuracy 10.00%, best 10.00%; uplink 0.00 MB, downlink 0.00 MB in total; "
        "wall time 3.0 s")


def test_progress_close_prints_the_totals_once_and_nothing_without_rows(monkeypatch):
    stream = _Flushes()
    p = _Progress(2, stream=stream)
    p.close([])
    assert stream.getvalue() == "" and stream.flushes == 0
    p.close([{"round": 1, "test_accuracy": 0.5}])
    assert stream.getvalue() == ("1 rounds: final test accuracy 50.00%, best 50.00%; uplink 0.00 MB, "
                                 "downlink 0.00 MB in total; wall time 0.0 s\n")
    assert stream.flushes == 1


class _Tty(io.StringIO):
    def isatty(self):
        return True


def test_progress_on_a_terminal_stream_is_a_live_line_of_its_own(monkeypatch):
    from rich.live import Live

    stream = _Tty()
    stdout, stderr = sys.stdout, sys.stderr
    p = _Progress(2, stream=stream)
    try:
        assert isinstance(p.live, Live) and p.live.is_started
        assert p.console.file is stream and p.live.console is p.console
        assert p.console._highlight is False
        assert p.live.auto_refresh is False and p.live.transient is False
        assert p.live._refresh_thread is None
        assert sys.stdout is stdout and sys.stderr is stderr  # nothing redirected while it is live
    finally:
        p.close([])
    assert p.live is None


class _FakeLive:
    def __init__(self):
        self.updates, self.stopped = [], 0

    def update(self, renderable, **kw):
        self.updates.append((renderable, kw))

    def stop(self):
        self.stopped += 1


class _FakeConsole:
    width = 60

    def __init__(self):
        self.printed = []

    def print(self, *args, **kw):
        self.printed.append((args, kw))


def test_progress_live_update_and_close(monkeypatch):
    from rich.text import Text

    monkeypatch.setattr(server_app.time, "perf_counter", lambda: 0.0)
    console = _FakeConsole()
    p = _Progress(2, stream=io.StringIO())
    live = _FakeLive()
    p.live, p.console = live, console
    p.update({"round": 1, "test_accuracy": 0.5})
    (text, kw), = live.updates
    assert isinstance(text, Text) and kw == {"refresh": True}
    assert text.plain == "round 1/2  ETA 0 s  acc 50.00%  loss    -    up 0.00 MB  down 0.00 MB  0.00 s/round"
    assert text.no_wrap is True and text.overflow == "ellipsis"
    assert p.stream.getvalue() == ""  # the live line only
    p.close([{"round": 1, "test_accuracy": 0.5}])
    assert live.stopped == 1 and p.live is None
    assert console.printed == [(("1 rounds: final test accuracy 50.00%, best 50.00%; uplink 0.00 MB, downlink "
                                 "0.00 MB in total; wall time 0.0 s",),
                                {"highlight": False, "markup": False, "soft_wrap": True})]
    p.close([{"round": 1}])  # closed: the totals now go to the stream
    assert console.printed[1:] == [] and p.stream.getvalue().startswith("1 rounds: no test accuracy")
    q = _Progress(2, stream=io.StringIO())
    q.live, q.console = _FakeLive(), _FakeConsole()
    q.close([])
    assert q.console.printed == [] and q.live is None


def test_progress_with_a_given_console_uses_it():
    from rich.console import Console

    stream = io.StringIO()
    console = Console(file=stream, force_terminal=True, width=200)
    p = _Progress(2, stream=_Tty(), console=console)  # the console given, not one made for the stream
    try:
        assert p.console is console and p.live.console is console
    finally:
        p.close([])


def test_progress_whose_first_line_is_a_later_round_times_it_from_the_start(monkeypatch):
    monkeypatch.setattr(server_app.time, "perf_counter", _Clock(0.0, 5.0))
    p = _Progress(3, stream=io.StringIO())
    assert p.line({"round": 2}).endswith("5.00 s/round  ETA 5 s")
