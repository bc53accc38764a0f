"""Run-level review: the run folder's files, the settings checked before a run starts.

Each test here proved a bug (it failed before the fix that came with it). The
runs are tiny (2 clients, 1-2 rounds, 1-2 local steps) on the in-process grid
with the built-in ClientApp, so each test takes seconds.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from fl_sparse import checkpoint
from fl_sparse.clients.app import app as builtin_app
from fl_sparse.server_app import RunConfig, preflight, resume_config, run_server, strategy_from_config
from inprocess import InProcessGrid

# cnn-fmnist has BatchNorm: integer buffers (num_batches_tracked) travel as exact arrays.
BN = RunConfig(model="cnn-fmnist", clients=2, rounds=1, local_steps=2, batch_size=8, lr=0.02, seed=1, quiet=True)


@pytest.fixture(autouse=True)
def _quiet_flower():
    logger = logging.getLogger("flwr")
    level = logger.level
    logger.setLevel(logging.ERROR)
    yield
    logger.setLevel(level)


def _saved_global_model(out: Path, cfg: RunConfig, strategy=None) -> dict[str, torch.Tensor]:
    """The global model the run's checkpoint holds, every array (exact ones included)."""
    strategy = strategy or strategy_from_config(cfg)
    strategy.load_state_dict(checkpoint.load(out)["strategy"])
    return strategy.current_arrays().to_torch_state_dict()


def _assert_same_state_dict(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert sorted(got) == sorted(want)
    for name in want:
        assert got[name].dtype == want[name].dtype, name
        assert torch.equal(got[name], want[name]), name


# ------------------------------------------------------------------ model.pt
def test_model_pt_holds_the_global_models_batchnorm_counters(tmp_path):
    """model.pt is the final global model: its integer BatchNorm buffers are the aggregated ones.

    It was written from the initial model's layout, whose integer arrays are
    the values of round 0: ``num_batches_tracked`` stayed 0 in model.pt while
    the global model (and the checkpoint) counted the clients' local steps.
    """
    cfg = replace(BN, out=str(tmp_path))
    run_server(InProcessGrid(builtin_app, cfg.clients), cfg)
    saved = torch.load(tmp_path / "model.pt", weights_only=True)
    want = _saved_global_model(tmp_path, cfg)
    counters = [name for name in want if name.endswith("num_batches_tracked")]
    assert counters and all(int(want[name]) > 0 for name in counters)  # the clients' steps were counted
    _assert_same_state_dict(saved, want)


def test_a_strategy_with_exact_float_arrays_ends_with_its_model_saved(tmp_path):
    """A strategy of one's own (``strategy=``) that keeps float arrays exact: the run ends and saves its model.

    The final model.pt was unpacked with the initial model's layout, which
    has those arrays in the flat vector: the strategy's shorter vector did not
    fit it and the run failed with "vector has shape ..." after its last round.
    """
    from fl_sparse.strategies import BidirectionalTopKSGD

    cfg = replace(BN, out=str(tmp_path))

    def strategy():
        return BidirectionalTopKSGD(ratio=0.01, fraction_evaluate=0.0, min_available_nodes=1, min_train_nodes=1,
                                    seed=cfg.seed, exact_arrays=("*.running_var",))

    rows = run_server(InProcessGrid(builtin_app, cfg.clients), cfg, strategy())
    assert [r["round"] for r in rows] == [1] and rows[0]["accepted"] == cfg.clients
    _assert_same_state_dict(torch.load(tmp_path / "model.pt", weights_only=True),
                            _saved_global_model(tmp_path, cfg, strategy()))


# ------------------------------------------------------------------ settings
@pytest.mark.parametrize("seed", [2**63, 2**64])
def test_a_seed_the_clients_cannot_use_is_refused_before_the_run(seed):
    """Seeds reach int64 fields (the train config, the batch order's hash): larger ones are named up front.

    2**63 passed every check and then failed in every client ("int too large
    to convert"), rounds into the run; 2**64 failed in torch.manual_seed.
    """
    cfg = replace(BN, model="mlp-784-64-10", seed=seed)
    with pytest.raises(ValueError, match=r"seed must be an integer in \[0, 2\*\*63\)"):
        cfg.validate()
    with pytest.raises(ValueError, match="seed must be"):
        preflight(cfg)
    assert replace(cfg, seed=2**63 - 1).validate().seed == 2**63 - 1


def test_an_unknown_model_or_dataset_is_named_as_such():
    """``flwr run``'s run config and the Python API reach the checks without the CLI's choices.

    An unknown model was reported only as "has no default learning rate; give
    lr", and with lr given passed preflight (the simulation engine started
    before run_server named it); an unknown dataset passed validate().
    """
    with pytest.raises(ValueError, match="no default learning rate; give lr .*not a built-in model: .*resnet18"):
        RunConfig(model="resnet-18").validate()
    with pytest.raises(ValueError, match="unknown model 'resnet-18'"):
        preflight(RunConfig(model="resnet-18", lr=0.1, quiet=True))
    with pytest.raises(ValueError, match="unknown dataset 'fmnist'; choose one of .*fashion-mnist"):
        RunConfig(dataset="fmnist").validate()


def test_a_model_that_does_not_take_the_datasets_images_is_refused_by_preflight():
    """An MLP of 784 inputs on CIFAR-10: named before the simulation engine starts (it failed in run_server)."""
    with pytest.raises(ValueError, match="takes 784 input features"):
        preflight(RunConfig(dataset="cifar10", model="mlp-784-64-10", quiet=True))


@pytest.mark.parametrize(
    "change,message",
    [
        ({"partition": "dirichlet", "alpha": float("inf")}, "alpha must be a finite number > 0"),
        ({"add_drop_ratio": float("nan")}, r"add-drop-ratio must be in \(0, 1\]"),
        ({"add_drop_ratio": 0.0}, r"add-drop-ratio must be in \(0, 1\]"),
    ],
)
def test_run_server_refuses_a_non_finite_setting_before_any_message(change, message, tmp_path):
    """``flwr run`` goes to run_server without the CLI's preflight: validate() is all it checks up front.

    alpha = inf passed validate() and failed in every client (3 rounds, then
    RunFailed); add-drop-ratio = NaN passed for strategies that do not use it,
    and a resume of that run was refused ("saved nan, given nan": NaN != NaN).
    """
    grid = InProcessGrid(builtin_app, 2)
    with pytest.raises(ValueError, match=message):
        run_server(grid, replace(BN, model="mlp-784-64-10", out=str(tmp_path), **change))
    assert grid.sent == [] and not any(tmp_path.iterdir())


# ------------------------------------------------------------------ resume after a kill
class _Killed(BaseException):
    """The server process dies (not an Exception: nothing may catch it)."""


def _grid_killed_after_replies_of(server_round: int | None, *, run_id: int = 7, exchange: int = 1) -> InProcessGrid:
    """The in-process grid; with ``server_round`` the process dies once that round's replies are in.

    The clients have trained that round and saved their state (error memory,
    the update they sent); the server has not aggregated it nor checkpointed.
    ``exchange``: die after the round's n-th exchange (SSGD-MV's are the votes, then the values).
    """
    from fl_sparse import protocol

    seen = [0]

    class Grid(InProcessGrid):
        def send_and_receive(self, messages, *, timeout=None):
            replies = super().send_and_receive(messages, timeout=timeout)
            if server_round is not None and any(
                not r.has_error() and protocol.Report.read(r.content).server_round == server_round for r in replies
            ):
                seen[0] += 1
                if seen[0] == exchange:
                    raise _Killed(f"killed in round {server_round}, exchange {exchange}")
            return replies

    return Grid(builtin_app, KILLED.clients, run_id=run_id)


KILLED = RunConfig(model="mlp-784-64-10", clients=3, rounds=4, local_steps=1, batch_size=10, lr=0.05, ratio=0.01,
                   seed=2, quiet=True, eval_every=4)


@pytest.mark.parametrize("strategy, exchange", [
    ("bidirectional-topk", 1),
    ("rtopk", 1),  # a random compressor: the retried round draws what the first try drew
    ("adaptive-topk-no-ec", 1),  # no error memory: the retried round trains afresh (its step is not zeroed)
    ("ssgd-mv", 1),  # died after the votes: the clients hold a = e + Δ as their vote-phase state
    ("ssgd-mv-ad", 2),  # died after the values: the clients' sent values are pending
])
def test_a_run_killed_after_its_clients_trained_a_round_resumes_to_the_uninterrupted_model(strategy, exchange, tmp_path):
    """The round the server died in is run again; each client that trained it already must not take its step twice.

    It did: told "last accepted: the round before", a client put the update it had sent
    back into its error memory (e_before + Δ) and then trained the same round again from
    the same model (+ Δ), so the round counted twice and the run left the uninterrupted one.
    """
    cfg = replace(KILLED, strategy=strategy)
    full, killed = tmp_path / "full", tmp_path / "killed"
    run_server(_grid_killed_after_replies_of(None), replace(cfg, out=str(full)))
    with pytest.raises(_Killed):
        run_server(_grid_killed_after_replies_of(3, exchange=exchange), replace(cfg, out=str(killed)))
    assert checkpoint.load(killed)["round"] == 2 and checkpoint.was_running(killed)

    run_server(_grid_killed_after_replies_of(None, run_id=8), resume_config(killed, rounds=cfg.rounds))
    _assert_same_state_dict(torch.load(killed / "model.pt", weights_only=True),
                            torch.load(full / "model.pt", weights_only=True))


# ------------------------------------------------------------------ data
@pytest.mark.parametrize("kind", ["missing", "file"])
def test_a_data_folder_that_is_not_there_is_named_before_the_run(kind, tmp_path, monkeypatch):
    """$FL_SPARSE_DATA naming no folder (a typo): named by preflight, not searched past.

    It was skipped silently: the run used whatever the system folders or the
    cache held, or tried a download, and an offline failure only listed it
    among the folders searched.
    """
    from fl_sparse.tasks import data

    named = tmp_path / "fashoin-mnist"
    if kind == "file":
        named.write_bytes(b"")
    monkeypatch.setenv("FL_SPARSE_DATA", str(named))
    monkeypatch.setattr(data, "_DATASET_CACHE", {})
    reason = "is a file, not a folder" if kind == "file" else "does not exist"
    with pytest.raises(ValueError, match=rf"data folder {named} \(\$FL_SPARSE_DATA\) {reason}"):
        preflight(replace(BN, model="mlp-784-64-10"))
    with pytest.raises(data.DatasetUnavailableError, match=rf"data folder {named} \(the root argument\) {reason}"):
        data.load_dataset("fashion-mnist", root=named)


# ------------------------------------------------------------------ Ctrl-C between runs
@pytest.fixture
def _no_stop_left_behind():
    from fl_sparse.server_app import stop_requested

    stop_requested.clear()
    yield stop_requested
    stop_requested.clear()


def test_a_stop_requested_in_a_plans_last_round_of_a_run_starts_no_further_run(tmp_path, _no_stop_left_behind):
    """``fl-sparse reproduce``: Ctrl-C while a run's last round runs ends the plan after that (complete) run.

    The run ends normally (a stop request acts between rounds); the request
    stayed set and the next planned run was started, ran one round and
    stopped, leaving a folder to continue for nothing.
    """
    from fl_sparse import protocol
    from fl_sparse.simulations.reproduce import expand, run_plan, run_status

    stop_requested = _no_stop_left_behind
    plan = expand("tiny", out=tmp_path, overrides={"quiet": True})
    assert len(plan) == 2
    started = []

    def runner(cfg):
        started.append(cfg.out)

        def ctrl_c_in_the_last_round(node, reply):
            if not reply.has_error() and protocol.Report.read(reply.content).server_round == cfg.rounds:
                stop_requested.set()
            return reply

        preflight(cfg)
        return run_server(InProcessGrid(builtin_app, cfg.clients, tamper=ctrl_c_in_the_last_round), cfg)

    outcome = run_plan(plan, runner=runner, log=lambda m: None)
    assert started == [str(plan[0].path)] and outcome.ran == [plan[0]]
    assert run_status(plan[0])[0] == "complete"
    assert outcome.interrupted == plan[1] and not plan[1].path.exists()


def test_a_stop_request_left_by_an_earlier_command_does_not_stop_the_next(tmp_path, monkeypatch, _no_stop_left_behind):
    """``fl_sparse.cli.main`` called again in one process (a script, a notebook) after a Ctrl-C in a run's
    last round: the request was never cleared, so the next run stopped after its first round."""
    from fl_sparse import cli
    from fl_sparse.simulations import runner

    stop_requested = _no_stop_left_behind
    seen = []

    def fake_simulate(cfg):  # what run_server would see: a set request stops the run after round 1
        seen.append(stop_requested.is_set())
        stop_requested.set()  # Ctrl-C during this run's last round
        return [{"round": r, "test_accuracy": 0.5} for r in range(1, cfg.rounds + 1)]

    monkeypatch.setattr(runner, "simulate", fake_simulate)
    argv = ["simulate", "--model", "logreg-784-10", "--clients", "2", "--rounds", "2", "--quiet"]
    assert cli.main(argv) == 0 and cli.main(argv) == 0
    assert seen == [False, False]


@pytest.mark.parametrize("partition", ["iid", "shards"])
@pytest.mark.parametrize("option", [{"min_partition_size": 50}, {"self_balancing": True}])
def test_dirichlet_options_are_refused_for_the_other_partitions(partition, option):
    """``--partition shards --min-partition-size 50`` ran with partitions of any size: the option was ignored.

    An option the run would not use is refused, as the strategies' options
    are (RunConfig.validate); the Dirichlet split takes both.
    """
    with pytest.raises(ValueError, match=f"options of the dirichlet partition; leave them unset for {partition}"):
        RunConfig(partition=partition, **option).validate()
    RunConfig(partition="dirichlet", **option).validate()
