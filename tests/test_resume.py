"""Checkpoint and resume: a stopped run continued to round T ends where an uninterrupted run ends.

The oracle is the uninterrupted run itself (same seed, same code, one go):
a run stopped after round 3 and resumed to round 6 must end with the very
same model (``torch.equal``) and the same per-round metrics (timing aside).
The resumed part runs on a *new* grid with another Flower run id and other
node ids (partition ids stay), after the process-global RNGs were disturbed:
nothing may depend on a node id, a run id or hidden RNG state. The fast tests
drive ``run_server`` (the real ServerApp logic) and the built-in ClientApp
(``SparseMod`` + train) through the in-process Grid; one slow test goes
through ``fl-sparse simulate`` (Ray) twice.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Context, RecordDict

from fl_sparse import checkpoint, protocol
from fl_sparse.checkpoint import CheckpointError
from fl_sparse.clients.app import app as client_app
from fl_sparse.compressors import torch_threads
from fl_sparse.server_app import (
    RunConfig,
    RunInterrupted,
    _initial_model,
    _train_config,
    resume_config,
    run_server,
    stop_requested,
    strategy_from_config,
)
from fl_sparse.simulations.reference import client_threads
from inprocess import InProcessGrid

BASE = RunConfig(
    model="mlp-784-64-10", clients=6, rounds=6, local_steps=1, batch_size=10, lr=0.05, ratio=0.01, seed=3,
    quiet=True, partition="dirichlet", alpha=0.5, fraction=0.5, eval_every=3,
)
STRATEGIES = ("bidirectional-topk", "ssgd-mv-ad", "adaptive-topk")
TIMING = {"round_seconds", "elapsed_seconds"}


class _Killed(BaseException):
    """The server process dies (not an Exception: nothing may catch it)."""


def _grid(*, run_id: int = 7, reverse_ids: bool = False, kill_at: int | None = None, stop_after: int | None = None):
    """An in-process grid of BASE.clients nodes.

    ``reverse_ids``: node ids descend with the partition id (a new run's ids);
    ``kill_at``: the process dies when the server sends the first message of
    that round (no client has seen it); ``stop_after``: Ctrl-C during that
    round (``stop_requested`` set when its replies arrive).
    """

    def tamper(node, reply):
        if stop_after is not None and not reply.has_error():
            if protocol.Report.read(reply.content).server_round == stop_after:
                stop_requested.set()
        return reply

    class Grid(InProcessGrid):
        def send_and_receive(self, messages, *, timeout=None):
            messages = list(messages)
            if kill_at is not None:
                for msg in messages:
                    instr = protocol.Instruction.read(msg.content)
                    if instr is not None and instr.server_round >= kill_at:
                        raise _Killed(f"killed at round {instr.server_round}")
            return super().send_and_receive(messages, timeout=timeout)

    grid = Grid(client_app, BASE.clients, run_id=run_id, tamper=tamper)
    if reverse_ids:
        old = grid.node_ids
        grid.node_ids = [9000 - 11 * i for i in range(len(old))]
        grid.contexts = {
            new: Context(run_id=run_id, node_id=new, node_config=dict(grid.contexts[o].node_config), state=RecordDict(), run_config={})
            for o, new in zip(old, grid.node_ids)
        }
        grid.online = set(grid.node_ids)
    return grid


def _model(out) -> dict[str, torch.Tensor]:
    return torch.load(Path(out) / "model.pt", weights_only=True)


def _assert_same_model(a, b) -> None:
    assert list(a) == list(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def _differing(row_a: dict, row_b: dict, ignore=frozenset()) -> list[str]:
    def same(x, y):
        if isinstance(x, float) and isinstance(y, float) and math.isnan(x) and math.isnan(y):
            return True
        return type(x) is type(y) and x == y

    keys = (set(row_a) | set(row_b)) - TIMING - set(ignore)
    return sorted(k for k in keys if not same(row_a.get(k), row_b.get(k)))


def _disturb_global_rngs() -> None:
    """Whatever hidden RNG state a resumed run might lean on is not the uninterrupted run's."""
    torch.manual_seed(987654)
    torch.rand(1000)
    random.seed(55)
    random.random()
    np.random.seed(66)
    np.random.rand(10)


@pytest.fixture(autouse=True)
def _no_stop_left_behind():
    stop_requested.clear()
    yield
    stop_requested.clear()


# ---------------------------------------------------------------- runs, cached per module
_CACHE: dict = {}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Uninterrupted 6-round runs, and runs stopped after round 3, computed once per module."""

    def uninterrupted(strategy: str):
        key = ("full", strategy)
        if key not in _CACHE:
            out = tmp_path_factory.mktemp(f"full-{strategy}")
            rows = run_server(_grid(), replace(BASE, strategy=strategy, out=str(out)))
            _CACHE[key] = (out, rows)
        return _CACHE[key]

    def stopped(strategy: str, mode: str) -> Path:
        """A copy (the caller may resume it) of a run stopped after round 3 by ``mode``."""
        key = ("stopped", strategy, mode)
        if key not in _CACHE:
            out = tmp_path_factory.mktemp(f"stopped-{strategy}-{mode}")
            if mode == "rounds":  # a complete 3-round run, continued with a larger T
                run_server(_grid(), replace(BASE, strategy=strategy, rounds=3, out=str(out)))
            elif mode == "interrupt":  # Ctrl-C during round 3 of 6: stops after it
                with pytest.raises(RunInterrupted, match="after round 3 of 6"):
                    run_server(_grid(stop_after=3), replace(BASE, strategy=strategy, out=str(out)))
                stop_requested.clear()
            elif mode == "killed":  # the process dies before round 4 reaches any client
                with pytest.raises(_Killed):
                    run_server(_grid(kill_at=4), replace(BASE, strategy=strategy, out=str(out)))
            else:
                raise AssertionError(mode)
            _CACHE[key] = out
        copy = tmp_path_factory.mktemp(f"copy-{strategy}-{mode}")
        shutil.copytree(_CACHE[key], copy, dirs_exist_ok=True)
        return copy

    class Runs:
        pass

    r = Runs()
    r.uninterrupted, r.stopped = uninterrupted, stopped
    return r


# ---------------------------------------------------------------- the key test
@pytest.mark.parametrize(
    "strategy,mode",
    [
        ("bidirectional-topk", "rounds"),
        ("ssgd-mv-ad", "rounds"),
        ("bidirectional-topk", "interrupt"),
        ("ssgd-mv-ad", "interrupt"),
        # AdapTop-K plans its budget over T: only a run of T = 6 stopped early can equal a 6-round run.
        ("adaptive-topk", "interrupt"),
    ],
)
def test_stopped_after_round_3_and_resumed_equals_the_uninterrupted_run(runs, strategy, mode):
    full_out, full_rows = runs.uninterrupted(strategy)
    out = runs.stopped(strategy, mode)
    saved = checkpoint.load(out)
    assert saved["round"] == 3 and [r["round"] for r in saved["rows"]] == [1, 2, 3]
    assert not checkpoint.was_running(out)  # a clean stop: the checkpoint is where the clients are

    _disturb_global_rngs()
    cfg = resume_config(out, rounds=6)
    assert (cfg.strategy, cfg.rounds, cfg.out, cfg.resume) == (strategy, 6, str(out), str(out))
    # A new Flower run: another run id (client state folder) and other node ids.
    rows = run_server(_grid(run_id=8, reverse_ids=True), cfg)

    _assert_same_model(_model(out), _model(full_out))
    assert [r["round"] for r in rows] == [1, 2, 3, 4, 5, 6]
    for a, b in zip(rows, full_rows):
        assert not _differing(a, b), (a["round"], _differing(a, b))
    # Partial participation happened and clients caught up without a dense resend: they kept their state.
    assert all(r["accepted"] == 3 for r in rows)
    assert {m for r in rows[3:] for m in r["sync_modes"]} - {"dense"}
    assert json.loads((out / "metrics.json").read_text())[-1]["round"] == 6
    assert checkpoint.load(out)["round"] == 6 and not checkpoint.was_running(out)
    if strategy == "adaptive-topk":
        assert saved["strategy"]["adaptive_topk"]["t_hat"] is not None  # t̂ was estimated before the stop
    if strategy == "ssgd-mv-ad":
        assert int(saved["strategy"]["ssgd_mv"]["m_sum"].sum()) > 0


def test_a_killed_run_resumes_from_its_last_checkpoint_with_a_dense_resync(runs):
    """The process died after round 3's checkpoint: clients may be past it, so each gets the dense model once.

    Here no client saw round 4, so the model still ends exactly as the
    uninterrupted run's; only the downlink differs: each client's first
    message after the resume carries the dense model, once.
    """
    full_out, full_rows = runs.uninterrupted("bidirectional-topk")
    out = runs.stopped("bidirectional-topk", "killed")
    assert checkpoint.load(out)["round"] == 3 and checkpoint.was_running(out)

    rows = run_server(_grid(run_id=9), resume_config(out, rounds=6))

    _assert_same_model(_model(out), _model(full_out))
    assert rows[3]["sync_modes"] == {"dense": 3} != full_rows[3]["sync_modes"]
    assert rows[3]["downlink_bytes"] > full_rows[3]["downlink_bytes"]
    assert sum(r["sync_modes"].get("dense", 0) for r in rows[3:]) <= BASE.clients  # at most once per client
    # the resync is counted as first contact: the server does not know what the clients hold
    assert rows[3]["downlink_first_contact_bytes"] == rows[3]["downlink_bytes"]
    downlink = {"sync_modes", "downlink_bytes", "cumulative_downlink_bytes", "downlink_first_contact_bytes",
                "downlink_last_update_bytes", "downlink_catch_up_bytes"}
    for a, b in zip(rows, full_rows):
        ignore = downlink if a["round"] >= 4 else set()
        assert not _differing(a, b, ignore), (a["round"], _differing(a, b, ignore))
    assert not checkpoint.was_running(out)


# ---------------------------------------------------------------- atomic writes
def test_checkpoint_write_is_atomic_a_failed_rename_keeps_the_previous_one(tmp_path, monkeypatch):
    checkpoint.save(tmp_path, {"round": 1, "config": {}, "rows": [{"round": 1}], "strategy": {"w": torch.ones(3)}})
    real_replace = os.replace

    def failing_replace(src, dst, *args, **kwargs):
        if Path(dst).name == checkpoint.CHECKPOINT:
            raise OSError(28, "No space left on device")
        return real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(checkpoint.os, "replace", failing_replace)
    with pytest.raises(OSError, match="No space"):
        checkpoint.save(tmp_path, {"round": 2, "config": {}, "rows": [], "strategy": {"w": torch.zeros(3)}})
    data = checkpoint.load(tmp_path)
    assert data["round"] == 1 and torch.equal(data["strategy"]["w"], torch.ones(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == [checkpoint.CHECKPOINT]  # no temporary file left


def test_a_run_whose_checkpoint_write_fails_can_resume_from_the_previous_one(tmp_path, monkeypatch, runs):
    """Round 3's checkpoint cannot be renamed into place: the run stops, round 2's checkpoint stands.

    The clients did round 3, the server's state is of round 2: the resumed
    run resyncs them densely (no sync errors), redoes round 3 and goes on.
    """
    _, full_rows = runs.uninterrupted("bidirectional-topk")
    real_replace = os.replace
    writes = []

    def replace_failing_at_round_3(src, dst, *args, **kwargs):
        if Path(dst).name == checkpoint.CHECKPOINT:
            writes.append(dst)
            if len(writes) == 3:
                raise OSError(5, "Input/output error")
        return real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(checkpoint.os, "replace", replace_failing_at_round_3)
    with pytest.raises(OSError, match="Input/output"):
        run_server(_grid(), replace(BASE, strategy="bidirectional-topk", out=str(tmp_path)))
    monkeypatch.setattr(checkpoint.os, "replace", real_replace)

    saved = checkpoint.load(tmp_path)
    assert saved["round"] == 2 and checkpoint.was_running(tmp_path)
    for a, b in zip(saved["rows"], full_rows[:2]):
        assert not _differing(a, b)
    rows = run_server(_grid(run_id=8), resume_config(tmp_path, rounds=6))
    assert [r["round"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert rows[2]["sync_modes"] == {"dense": 3}
    assert all(r["failures"] == 0 and r["accepted"] == 3 for r in rows)


# ---------------------------------------------------------------- strategy state
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_state_dict_survives_save_and_load_unchanged(runs, strategy):
    out, _ = runs.uninterrupted(strategy)
    state = checkpoint.load(out)["strategy"]
    fresh = strategy_from_config(replace(BASE, strategy=strategy))
    fresh.load_state_dict(state)
    again = fresh.state_dict()
    _assert_equal_nested(again, state)
    assert fresh.state.round == 6 and fresh.state.generation == state["generation"] != ""
    if strategy == "ssgd-mv-ad":
        fresh.check_vote_invariants()
        assert len(fresh.votes) >= 3


def _assert_equal_nested(a, b, path="") -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), path
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), (path, set(a) ^ set(b))
        for k in a:
            _assert_equal_nested(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_equal_nested(x, y, f"{path}[{i}]")
    elif isinstance(a, float) and math.isnan(a):
        assert isinstance(b, float) and math.isnan(b), path
    else:
        assert a == b, (path, a, b)


def test_start_translates_flowers_rounds_and_keys_the_result_by_them(runs, tmp_path):
    full_out, _ = runs.uninterrupted("bidirectional-topk")
    out = tmp_path / "run"
    shutil.copytree(full_out, out)
    state = checkpoint.load(out)["strategy"]  # the state after round 6
    strategy = strategy_from_config(replace(BASE, strategy="bidirectional-topk"))
    strategy.load_state_dict(state)
    seen = {"configure": [], "aggregate": [], "evaluate": []}
    configure, aggregate = strategy.configure_train, strategy.aggregate_train
    strategy.configure_train = lambda r, *a: seen["configure"].append(r) or configure(r, *a)
    strategy.aggregate_train = lambda r, *a: seen["aggregate"].append(r) or aggregate(r, *a)
    grid = _grid(run_id=8, reverse_ids=True)
    cfg = replace(BASE, strategy="bidirectional-topk")
    strategy.client_state_dir = str(Path(out) / "client-state")
    # Another Flower run id (8, was 7): the clients find their files by the generation.
    result = strategy.start(
        grid, strategy.current_arrays(), num_rounds=8, train_config=_train_config(cfg),
        evaluate_fn=lambda r, arrays: seen["evaluate"].append(r), first_round=7,
    )
    assert seen == {"configure": [7, 8], "aggregate": [7, 8], "evaluate": [6, 7, 8]}
    assert all(r["failures"] == 0 for r in (strategy.state.round_metrics[7], strategy.state.round_metrics[8]))
    assert sorted(result.train_metrics_clientapp) == [7, 8]
    assert strategy.state.round == 8 and strategy.state.version == 8
    assert sorted(strategy.state.round_metrics) == list(range(1, 9))
    # A continued round reaches the clients with the continued round number and the same generation.
    instr = [protocol.Instruction.read(m.content) for m in grid.sent]
    assert {i.server_round for i in instr if i.phase == protocol.PHASE_TRAIN} == {7, 8}
    assert {i.generation for i in instr if i.phase == protocol.PHASE_TRAIN} == {state["generation"]}


def test_start_refuses_to_continue_from_the_wrong_state(runs):
    out, _ = runs.uninterrupted("bidirectional-topk")
    state = checkpoint.load(out)["strategy"]
    strategy = strategy_from_config(replace(BASE, strategy="bidirectional-topk"))
    grid = _grid()
    with pytest.raises(RuntimeError, match="needs the state of round 3"):
        strategy.start(grid, strategy_arrays(), num_rounds=6, first_round=4)  # nothing loaded
    strategy.load_state_dict(state)
    with pytest.raises(RuntimeError, match="needs the state of round 3.*round 6"):
        strategy.start(grid, strategy.current_arrays(), num_rounds=6, first_round=4)
    with pytest.raises(ValueError, match="initial_arrays must be the model"):
        strategy.start(grid, strategy_arrays(), num_rounds=8, first_round=7)


def strategy_arrays():
    from flwr.app import ArrayRecord

    return ArrayRecord(_initial_model(BASE).state_dict())


def test_a_checkpoint_of_another_strategy_settings_or_model_is_refused(runs, tmp_path):
    from fl_sparse.strategies import BidirectionalTopKSGD, TopKSGD

    out, _ = runs.uninterrupted("bidirectional-topk")
    state = checkpoint.load(out)["strategy"]
    with pytest.raises(ValueError, match="strategy 'fl_sparse.strategies.named.BidirectionalTopKSGD'"):
        TopKSGD(ratio=0.01, seed=3, fraction_train=0.5).load_state_dict(state)
    with pytest.raises(ValueError, match="other settings.*uplink"):
        BidirectionalTopKSGD(ratio=0.02, seed=3, fraction_train=0.5).load_state_dict(state)
    with pytest.raises(ValueError, match="other settings.*seed"):
        BidirectionalTopKSGD(ratio=0.01, seed=4, fraction_train=0.5).load_state_dict(state)
    with pytest.raises(ValueError, match="version"):
        strategy_from_config(replace(BASE, strategy="bidirectional-topk")).load_state_dict({**state, "state_version": 99})

    # The run's settings may not change on resume; only how far and how it runs.
    with pytest.raises(CheckpointError, match="ratio cannot change"):
        resume_config(out, rounds=8, ratio=0.5)
    with pytest.raises(CheckpointError, match="at round 6; give rounds > 6"):
        resume_config(out, rounds=6)
    with pytest.raises(CheckpointError, match="another run.*strategy: saved 'bidirectional-topk', given 'topk'"):
        run_server(_grid(), replace(resume_config(out, rounds=8), strategy="topk"))

    # Another file format version, and not a checkpoint at all.
    data = checkpoint.load(out)
    (tmp_path / "v2").mkdir()
    torch.save({**data, "version": 2}, tmp_path / "v2" / checkpoint.CHECKPOINT)
    with pytest.raises(CheckpointError, match="version 2 checkpoint"):
        resume_config(tmp_path / "v2", rounds=8)
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / checkpoint.CHECKPOINT).write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        resume_config(tmp_path / "junk", rounds=8)
    with pytest.raises(CheckpointError, match="no checkpoint"):
        resume_config(tmp_path / "nothing-here", rounds=8)

    # A checkpoint whose model is not the model its config builds now.
    other = tmp_path / "other-model"
    other.mkdir()
    checkpoint.save(other, {k: v for k, v in data.items() if k not in ("format", "version", "fl_sparse")}
                    | {"config": {**data["config"], "model": "mlp-784-256-128-64-10"}})
    with pytest.raises(CheckpointError, match="another model than 'mlp-784-256-128-64-10'"):
        run_server(_grid(), resume_config(other, rounds=8))

    # A damaged saved state is named by preflight, before Ray would start (not by run_server after).
    from fl_sparse.server_app import preflight

    saved = {k: v for k, v in data.items() if k not in ("format", "version", "fl_sparse")}
    model = data["strategy"]["model"]
    for name, strategy_state, message in [
        ("nan-model", {**data["strategy"], "model": torch.full_like(model, float("nan"))}, "the saved model is not finite"),
        ("short-model", {**data["strategy"], "model": model[:10]}, f"the saved model is not a vector of {model.numel()} entries"),
        ("no-history", {k: v for k, v in data["strategy"].items() if k != "history"}, "not a complete strategy state"),
    ]:
        damaged = tmp_path / name
        damaged.mkdir()
        checkpoint.save(damaged, saved | {"strategy": strategy_state})
        with pytest.raises(CheckpointError, match=f"cannot continue the run saved in {damaged}: {message}"):
            preflight(resume_config(damaged, rounds=8))


def test_nothing_is_written_after_the_last_round_and_the_marker_is_gone(runs):
    out, rows = runs.uninterrupted("bidirectional-topk")
    saved = checkpoint.load(out)
    assert saved["round"] == 6 and len(saved["rows"]) == 6 and saved["config"]["rounds"] == 6
    for a, b in zip(saved["rows"], rows):
        assert not _differing(a, b)
    assert not checkpoint.was_running(out)
    # persistent beside the checkpoint, keyed by the strategy's generation (not Flower's run id)
    assert (Path(out) / "client-state" / f"gen-{saved['strategy']['generation']}").is_dir()
    _assert_same_model(_model(out), dict(strategy_from_model(saved)))


def strategy_from_model(saved):
    strategy = strategy_from_config(replace(BASE, strategy="bidirectional-topk"))
    strategy.load_state_dict(saved["strategy"])
    layout = strategy.state.layout
    return layout.to_state_dict(strategy.state.model)


def test_checkpoint_every_n_rounds(tmp_path, monkeypatch):
    saved_rounds = []
    real_save = checkpoint.save

    def spy(directory, payload):
        saved_rounds.append(payload["round"])
        return real_save(directory, payload)

    monkeypatch.setattr(checkpoint, "save", spy)
    cfg = replace(BASE, strategy="topk", rounds=4, checkpoint_every=3, out=str(tmp_path), fraction=1.0, clients=3)
    run_server(InProcessGrid(client_app, 3), cfg)
    assert saved_rounds == [3, 4]  # every 3 rounds, and the last
    saved_rounds.clear()
    run_server(InProcessGrid(client_app, 3), replace(cfg, checkpoint_every=0))
    assert saved_rounds == [4]


# ---------------------------------------------------------------- ServerApp (flwr run) and CLI
def test_server_app_main_resumes_from_the_run_config(runs, caplog):
    """``flwr run . --run-config "resume='DIR'"``: the saved settings, to the later of num-rounds and the saved T."""
    import tomllib

    from fl_sparse.server_app import main

    full_out, full_rows = runs.uninterrupted("bidirectional-topk")
    out = runs.stopped("bidirectional-topk", "interrupt")  # a T = 6 run stopped after round 3
    pyproject = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    # how the run goes on is this flwr run's config (it was dropped: the saved values were used)
    how = {"checkpoint-every": 2, "max-failed-rounds": 7, "quiet": True}
    run_config = {**pyproject["tool"]["flwr"]["app"]["config"], "resume": str(out), "num-rounds": 4, **how,
                  "ratio": 0.5}  # not this run's to change: said, and the saved ratio used
    assert RunConfig.from_run_config(pyproject["tool"]["flwr"]["app"]["config"]).resume is None
    assert json.loads((out / "config.json").read_text())["checkpoint_every"] == 1
    grid = _grid(run_id=11, reverse_ids=True)
    with caplog.at_level(logging.WARNING, logger="flwr"):
        main(grid, Context(run_id=11, node_id=0, node_config={}, state=RecordDict(), run_config=run_config))
    said = [r.getMessage() for r in caplog.records if "the saved run's settings are used" in r.getMessage()]
    assert len(said) == 1 and "ratio=0.5 (saved 0.01)" in said[0]  # with pyproject's other defaults
    assert "checkpoint-every" not in caplog.text and "num-rounds" not in caplog.text
    rows = json.loads((out / "metrics.json").read_text())
    assert [r["round"] for r in rows] == [1, 2, 3, 4, 5, 6]  # the saved T = 6, later than num-rounds = 4
    resumed = json.loads((out / "config.json").read_text())
    assert (resumed["checkpoint_every"], resumed["max_failed_rounds"], resumed["quiet"]) == (2, 7, True)
    _assert_same_model(_model(out), _model(full_out))


def test_cli_resume_refuses_settings_that_would_change_the_run(runs, capsys):
    from fl_sparse.cli import main

    out, _ = runs.uninterrupted("bidirectional-topk")
    assert main(["simulate", "--resume", str(out), "--rounds", "8", "--ratio", "0.5"]) == 2
    assert "ratio cannot change" in capsys.readouterr().err
    assert main(["simulate", "--resume", str(out), "--rounds", "6"]) == 2
    assert "give rounds > 6" in capsys.readouterr().err
    assert main(["simulate", "--resume", str(out / "missing")]) == 2
    assert "no checkpoint" in capsys.readouterr().err


@pytest.mark.slow
def test_cli_resume_through_ray_continues_the_run(tmp_path, capsys, monkeypatch):
    """``fl-sparse simulate --out DIR`` then ``--resume DIR --rounds 4``: a new Ray run (new run and node ids)
    whose clients find their state, ending on an uninterrupted in-process run's model.

    With ``FL_SPARSE_STATE_DIR`` left set in the shell: the clients still keep their state in
    ``DIR/client-state``, as ``--out`` says, and the variable is back after the run."""
    from fl_sparse.cli import main

    stray = tmp_path / "stray-state"
    monkeypatch.setenv("FL_SPARSE_STATE_DIR", str(stray))
    out = tmp_path / "run"
    flags = ["--clients", "3", "--local-steps", "2", "--ratio", "0.02", "--seed", "5", "--quiet",
             "--partition", "dirichlet", "--fraction", "1.0", "--strategy", "bidirectional-topk"]
    assert main(["simulate", *flags, "--rounds", "2", "--out", str(out)]) == 0
    assert checkpoint.load(out)["round"] == 2
    assert main(["simulate", "--resume", str(out), "--rounds", "4", "--quiet"]) == 0
    rows = json.loads((out / "metrics.json").read_text())
    assert [r["round"] for r in rows] == [1, 2, 3, 4]
    # Every client took part in every round: after round 1 nobody needed the dense model, resumed rounds included.
    assert all(set(r["sync_modes"]) == {"delta"} for r in rows[1:]), [r["sync_modes"] for r in rows]
    assert all(r["accepted"] == 3 and r["failures"] == 0 for r in rows)
    assert sorted(p.name for p in (out / "client-state").glob("gen-*/*.state")) == [
        "client-0.state", "client-1.state", "client-2.state"]
    assert not stray.exists()
    assert "FL_SPARSE_STATE_DIR=" in capsys.readouterr().err
    assert os.environ["FL_SPARSE_STATE_DIR"] == str(stray)

    cfg = RunConfig(strategy="bidirectional-topk", clients=3, local_steps=2, ratio=0.02, seed=5, quiet=True,
                    partition="dirichlet", fraction=1.0, rounds=4, out=str(tmp_path / "one-go"))
    with torch_threads(client_threads(cfg.num_cpus)):  # a Ray client's threads: results may depend on them
        run_server(InProcessGrid(client_app, 3), cfg)
    ours, theirs = _model(out), _model(tmp_path / "one-go")
    for k in ours:
        torch.testing.assert_close(ours[k], theirs[k], rtol=0, atol=1e-6)
