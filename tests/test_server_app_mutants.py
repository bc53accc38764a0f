"""Written to kill the mutmut survivors of fl_sparse/server_app.py (docs/testing.md).

Each test pins a behaviour the module's own tests left open: every bound of
``RunConfig.validate`` on both sides with its exact message, the run-config
mapping, the clients' train config, the strategy's arguments, the resume
checks, ``run_metadata``, where the clients' state goes, and the round loop's
evaluation, checkpoint and stop rules (in-process Flower runs, no Ray).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from dataclasses import asdict, fields, replace
from pathlib import Path

import pytest
import torch
from flwr.app import Context, RecordDict
from flwr.clientapp import ClientApp

import fl_sparse.server_app as server_app
from fl_sparse import checkpoint
from fl_sparse.checkpoint import CheckpointError
from fl_sparse.clients import SparseMod
from fl_sparse.clients.app import app as builtin_app
from fl_sparse.clients.state import SPARE_MAX_BYTES
from fl_sparse.server_app import (
    FLWR_RUN_RESUME_KEYS,
    RESUME_OVERRIDES,
    RunConfig,
    RunFailed,
    _check_resumable,
    _differing_settings,
    _train_config,
    resume_config,
    run_metadata,
    run_server,
    simulation_state_dir,
    strategy_from_config,
)
from inprocess import InProcessGrid


def _raises(cfg: RunConfig, message: str) -> None:
    with pytest.raises(ValueError, match="^" + re.escape(message) + "$"):
        cfg.validate()


# ------------------------------------------------------------------ RunConfig.validate: every bound, both sides
# (settings, exact message): each is just past a bound that the same setting one step inside passes (below).
REFUSED = [
    ({"clients": 0}, "clients must be >= 1"),
    ({"seed": -1}, "seed must be an integer in [0, 2**63), got -1"),
    ({"seed": 2**63}, f"seed must be an integer in [0, 2**63), got {2**63}"),
    ({"fraction": 0.0}, "fraction must be in (0, 1]"),
    ({"fraction": 1.0000001}, "fraction must be in (0, 1]"),
    ({"rounds": 0}, "rounds must be >= 1"),
    ({"local_steps": 0}, "local-steps must be >= 1"),
    ({"batch_size": 0}, "batch-size must be >= 1"),
    ({"lr": 0.0}, "lr must be a positive finite number"),
    ({"lr": -0.1}, "lr must be a positive finite number"),
    ({"lr": float("inf")}, "lr must be a positive finite number"),
    ({"momentum": 1.0}, "momentum must be in [0, 1)"),
    ({"momentum": -1e-9}, "momentum must be in [0, 1)"),
    ({"weight_decay": -1e-9}, "weight-decay must be a finite number >= 0"),
    ({"weight_decay": float("inf")}, "weight-decay must be a finite number >= 0"),
    ({"ratio": 0.0}, "ratio must be in (0, 1]"),
    ({"ratio": 1.0000001}, "ratio must be in (0, 1]"),
    ({"downlink_ratio": 0.0}, "downlink-ratio must be in (0, 1]"),
    ({"downlink_ratio": 1.0000001}, "downlink-ratio must be in (0, 1]"),
    ({"partition": "dirichlet", "min_partition_size": -1}, "min-partition-size must be >= 0 (or unset: chosen automatically)"),
    ({"strategy": "rtopk", "r_ratio": 0.0}, "r-ratio must be in (0, 1] (or unset for the paper's rule)"),
    ({"strategy": "rtopk", "r_ratio": 1.0000001}, "r-ratio must be in (0, 1] (or unset for the paper's rule)"),
    ({"strategy": "topk", "r_ratio": 0.5}, "r-ratio is rtopk's r/d; leave it unset for other strategies"),
    ({"strategy": "adaptive-topk", "rounds": 5, "t_hat": 6}, "t-hat must be in [0, rounds] (or unset: estimated after round 1)"),
    ({"strategy": "adaptive-topk", "t_hat": -1}, "t-hat must be in [0, rounds] (or unset: estimated after round 1)"),
    ({"strategy": "topk", "t_hat": 1}, "t-hat is adaptive-topk's turning point; leave it unset for other strategies"),
    ({"positions": "RICE"}, "positions must be raw, block or rice"),
    ({"error_memory_dtype": "float64"}, "error-memory-dtype must be float32, float16 or bfloat16"),
    ({"alpha": 0.0}, "alpha must be a finite number > 0"),
    ({"alpha": float("inf")}, "alpha must be a finite number > 0"),
    ({"alpha": float("nan")}, "alpha must be a finite number > 0"),
    ({"add_drop_ratio": 0.0}, "add-drop-ratio must be in (0, 1]"),
    ({"add_drop_ratio": 1.0000001}, "add-drop-ratio must be in (0, 1]"),
    ({"add_drop_ratio": float("nan")}, "add-drop-ratio must be in (0, 1]"),
    ({"partition": "IID"}, "partition must be iid, dirichlet or shards"),
    ({"partition": "iid", "min_partition_size": 3},
     "min-partition-size and self-balancing are options of the dirichlet partition; leave them unset for iid"),
    ({"partition": "shards", "self_balancing": True},
     "min-partition-size and self-balancing are options of the dirichlet partition; leave them unset for shards"),
    ({"value_bits": 1}, "value-bits must be 2..16 (q-bit values) or 32 (none)"),
    ({"value_bits": 17}, "value-bits must be 2..16 (q-bit values) or 32 (none)"),
    ({"value_bits": 31}, "value-bits must be 2..16 (q-bit values) or 32 (none)"),
    ({"value_bits": 33}, "value-bits must be 2..16 (q-bit values) or 32 (none)"),
    ({"strategy": "hard-threshold", "threshold": -1e-9},
     "threshold must be a finite number >= 0 (or unset for the paper's 1/(2 sqrt(k)))"),
    ({"strategy": "hard-threshold", "threshold": float("inf")},
     "threshold must be a finite number >= 0 (or unset for the paper's 1/(2 sqrt(k)))"),
    ({"num_cpus": 0.0}, "num-cpus must be > 0"),
    ({"num_cpus": float("inf")}, "num-cpus must be > 0"),
    ({"num_gpus": -1e-9}, "num-gpus must be >= 0"),
    ({"num_gpus": float("inf")}, "num-gpus must be >= 0"),
    ({"eval_every": 0}, "eval-every must be >= 1"),
    ({"max_failed_rounds": 0}, "max-failed-rounds must be >= 1"),
    ({"checkpoint_every": -1}, "checkpoint-every must be >= 0 (0: only at the end and at a stop)"),
    ({"strategy": "topk", "downlink_ratio": 0.5},
     "downlink-ratio is bidirectional-topk's downlink K; leave it unset for other strategies"),
    ({"strategy": "topk", "threshold": 0.0}, "threshold is hard-threshold's lambda; leave it unset for other strategies"),
    ({"strategy": "fedavg", "value_bits": 16},
     "value-bits quantizes the sparse strategies' values; fedavg sends float32 (leave it at 32)"),
    # types: the field's name with dashes, what it must be, what it got
    ({"clients": True}, "clients must be an integer, got True"),
    ({"ratio": True}, "ratio must be a number, got True"),
    ({"quiet": 1}, "quiet must be true or false, got 1"),
    ({"dataset": 5}, "dataset must be a string, got 5"),
    ({"t_hat": "1"}, "t-hat must be an integer (or unset), got '1'"),
    ({"lr": "0.1"}, "lr must be a number (or unset), got '0.1'"),
    ({"self_balancing": None}, "self-balancing must be set (got None)"),
    ({"max_failed_rounds": None}, "max-failed-rounds must be set (got None)"),
]


@pytest.mark.parametrize("change,message", REFUSED, ids=[m[:40] + "-" + str(i) for i, (_, m) in enumerate(REFUSED)])
def test_validate_refuses_just_past_each_bound_with_its_exact_message(change, message):
    _raises(RunConfig(**change), message)


# One step inside each bound above: accepted.
ACCEPTED = [
    {"clients": 1},
    {"seed": 0},
    {"seed": 2**63 - 1},
    {"fraction": 1.0},
    {"fraction": 1e-9},
    {"rounds": 1, "local_steps": 1, "batch_size": 1, "eval_every": 1, "max_failed_rounds": 1, "checkpoint_every": 0},
    {"lr": 1e-12},
    {"lr": 3},  # an int is a number
    {"momentum": 0.0},
    {"momentum": 0.999},
    {"weight_decay": 0.0},
    {"ratio": 1.0},
    {"ratio": 1e-9},
    {"downlink_ratio": 1.0},
    {"downlink_ratio": 1e-9},
    {"partition": "dirichlet", "min_partition_size": 0, "self_balancing": True},
    {"strategy": "rtopk", "r_ratio": 1.0},
    {"strategy": "rtopk", "r_ratio": 1e-9},
    {"strategy": "adaptive-topk", "rounds": 5, "t_hat": 5},
    {"strategy": "adaptive-topk", "t_hat": 0},
    {"strategy": "adaptive-topk-no-ec", "t_hat": 3},
    {"positions": "raw"},
    {"positions": "block"},
    {"positions": "rice"},
    {"error_memory_dtype": "float16"},
    {"error_memory_dtype": "bfloat16"},
    {"alpha": 1e-9},
    {"add_drop_ratio": 1.0},
    {"add_drop_ratio": 1e-9},
    {"partition": "shards"},
    {"value_bits": 2},
    {"value_bits": 16},
    {"value_bits": 32},
    {"strategy": "hard-threshold", "threshold": 0.0},
    {"num_cpus": 1e-9},
    {"num_gpus": 0.0},
    {"strategy": "fedavg", "value_bits": 32},
    {"dataset": "mnist"},
    {"dataset": "cifar10", "model": "resnet18"},
]


@pytest.mark.parametrize("change", ACCEPTED, ids=[str(c) for c in ACCEPTED])
def test_validate_accepts_each_bound_and_returns_the_config(change):
    cfg = RunConfig(**change)
    assert cfg.validate() is cfg


def test_validate_names_an_unknown_strategy_and_dataset_with_the_choices():
    _raises(RunConfig(strategy="Topk"),
            "unknown strategy 'Topk'; choose one of fedavg, topk, bidirectional-topk, rtopk, randomk, hard-threshold, "
            "adaptive-topk, adaptive-topk-no-ec, ssgd-mv, ssgd-mv-ad, ssgd-mv-rs")
    _raises(RunConfig(dataset="MNIST"), "unknown dataset 'MNIST'; choose one of fashion-mnist, mnist, cifar10")


def test_validate_says_when_a_model_without_default_lr_is_not_built_in(monkeypatch):
    _raises(RunConfig(model="mlp-typo"),
            "model 'mlp-typo' has no default learning rate; give lr (it is not a built-in model: logreg-784-10, "
            "mlp-784-64-10, mlp-784-256-128-64-10, cnn-mnist, cnn-fmnist, resnet18, vgg19)")
    assert RunConfig(model="mlp-typo", lr=0.2).validate().effective_lr == 0.2
    # A built-in model without a default: the message without the "not a built-in model" part.
    monkeypatch.delitem(server_app.MODEL_LR, "cnn-mnist")
    _raises(RunConfig(model="cnn-mnist"), "model 'cnn-mnist' has no default learning rate; give lr")


def test_type_problem_names_any_other_type_by_its_name():
    # RunConfig's fields are str, int, float and bool; the helper names any other type as Python does
    assert server_app._type_problem(5, bytes) == "must be bytes, got 5"
    assert server_app._type_problem(b"x", bytes) is None


def test_validate_takes_the_first_problem_in_its_order():
    # both clients and rounds are wrong: clients is checked first; a type problem before any bound
    _raises(RunConfig(clients=0, rounds=0), "clients must be >= 1")
    _raises(RunConfig(clients=0, ratio="x"), "ratio must be a number, got 'x'")


# ------------------------------------------------------------------ effective_lr, __post_init__, from_run_config
def test_effective_lr_is_lr_as_a_float_or_the_models_default():
    assert RunConfig(lr=None, model="cnn-fmnist").effective_lr == 0.02
    assert RunConfig(lr=None, model="resnet18").effective_lr == 0.05
    lr = RunConfig(lr=3, model="cnn-fmnist").effective_lr
    assert lr == 3.0 and type(lr) is float
    with pytest.raises(ValueError, match=r"^model 'nope' has no default learning rate; give lr$"):
        RunConfig(model="nope").effective_lr


def test_path_settings_are_taken_as_their_text(tmp_path):
    cfg = RunConfig(out=tmp_path / "o", state_dir=tmp_path / "s", resume=tmp_path / "r")
    assert (cfg.out, cfg.state_dir, cfg.resume) == (str(tmp_path / "o"), str(tmp_path / "s"), str(tmp_path / "r"))
    assert all(type(v) is str for v in (cfg.out, cfg.state_dir, cfg.resume))


def test_from_run_config_maps_flowers_names_and_dashes():
    cfg = RunConfig.from_run_config({"num-rounds": 4, "num-supernodes": 6, "local-steps": 2, "batch_size": 8})
    assert (cfg.rounds, cfg.clients, cfg.local_steps, cfg.batch_size) == (4, 6, 2, 8)
    known = ", ".join(sorted(f.name.replace("_", "-") for f in fields(RunConfig)))
    assert known.startswith("add-drop-ratio, alpha, batch-size, checkpoint-every, clients, dataset")
    with pytest.raises(ValueError, match="^" + re.escape(f"unknown run-config key 'num_round'; known: {known}") + "$"):
        RunConfig.from_run_config({"num_round": 4})


@pytest.mark.parametrize(
    "key,base",
    [
        ("downlink-ratio", {}),
        ("threshold", {"strategy": "hard-threshold"}),
        ("lr", {}),
        ("r-ratio", {"strategy": "rtopk"}),
        ("min-partition-size", {"partition": "dirichlet"}),
        ("t-hat", {"strategy": "adaptive-topk"}),
    ],
)
def test_from_run_config_reads_a_negative_number_as_unset_and_zero_as_zero(key, base):
    name = key.replace("-", "_")
    assert getattr(RunConfig.from_run_config({**base, key: -1}), name) is None
    assert getattr(RunConfig.from_run_config({**base, key: -0.5}), name) is None
    if name in ("threshold", "min_partition_size", "t_hat"):  # 0 is a value of these
        assert getattr(RunConfig.from_run_config({**base, key: 0}), name) == 0
    else:  # and out of range for these: refused, not taken for unset
        with pytest.raises(ValueError, match=" must be "):
            RunConfig.from_run_config({**base, key: 0})


@pytest.mark.parametrize("key", ["out", "state-dir", "ray-address", "resume"])
def test_from_run_config_reads_an_empty_folder_or_address_as_unset(key):
    assert getattr(RunConfig.from_run_config({key: ""}), key.replace("-", "_")) is None
    assert getattr(RunConfig.from_run_config({key: "x"}), key.replace("-", "_")) == "x"


# ------------------------------------------------------------------ the clients' train config
def test_train_config_holds_every_training_setting_typed_for_flower():
    cfg = RunConfig(dataset="mnist", model="cnn-mnist", partition="dirichlet", alpha=2, min_partition_size=7,
                    self_balancing=True, clients=5, seed=9, local_steps=3, batch_size=16, lr=None, momentum=0.5,
                    weight_decay=1e-4)
    expected = {
        "dataset": "mnist", "model": "cnn-mnist", "partition": "dirichlet", "alpha": 2.0, "min-partition-size": 7,
        "self-balancing": True, "num-partitions": 5, "seed": 9, "local-steps": 3, "batch-size": 16,
        "lr": 0.1,  # cnn-mnist's default
        "momentum": 0.5, "weight-decay": 1e-4,
    }
    got = dict(_train_config(cfg))
    assert got == expected
    assert type(got["alpha"]) is float and type(got["self-balancing"]) is bool and type(got["lr"]) is float
    unset = dict(_train_config(RunConfig(lr=0.25, momentum=0, weight_decay=0)))
    assert unset["min-partition-size"] == -1 and unset["self-balancing"] is False and unset["lr"] == 0.25
    assert type(unset["momentum"]) is float and type(unset["weight-decay"]) is float


# ------------------------------------------------------------------ the strategy's arguments
def test_strategy_from_config_passes_every_setting(monkeypatch):
    seen = {}
    monkeypatch.setattr(server_app, "build_strategy", lambda name, **kw: seen.update(name=name, **kw) or "built")
    cfg = RunConfig(strategy="bidirectional-topk", ratio=0.03, downlink_ratio=0.2, rounds=7, value_bits=8,
                    add_drop_ratio=0.004, positions="block", lr=None, model="cnn-fmnist", error_feedback=False,
                    fraction=0.5, seed=11, diagnostics=True, error_memory_dtype="bfloat16")
    assert strategy_from_config(cfg) == "built"
    assert seen == {
        "name": "bidirectional-topk", "ratio": 0.03, "downlink_ratio": 0.2, "threshold": None, "num_rounds": 7,
        "value_bits": 8, "add_drop_ratio": 0.004, "positions": "block", "lr": 0.02, "error_feedback": False,
        "r_ratio": None, "t_hat": None, "fraction_train": 0.5, "fraction_evaluate": 0.0, "min_train_nodes": 1,
        "min_evaluate_nodes": 0, "min_available_nodes": 1, "seed": 11, "diagnostics": True,
        "error_memory_dtype": "bfloat16",
    }
    seen.clear()
    strategy_from_config(RunConfig(strategy="adaptive-topk", t_hat=2, threshold=None))
    assert seen["t_hat"] == 2
    seen.clear()
    strategy_from_config(RunConfig(strategy="hard-threshold", threshold=0.3))
    assert seen["threshold"] == 0.3
    seen.clear()
    strategy_from_config(RunConfig(strategy="rtopk", r_ratio=0.25))
    assert seen["r_ratio"] == 0.25


# ------------------------------------------------------------------ resume checks
def _ckpt(cfg: RunConfig, round_: int) -> dict:
    return {"round": round_, "config": asdict(cfg), "rows": [], "strategy": {}}


def test_resume_overrides_and_flwr_run_keys_are_the_documented_ones():
    assert RESUME_OVERRIDES == ("rounds", "eval_every", "checkpoint_every", "max_failed_rounds", "num_cpus",
                                "num_gpus", "quiet", "ray_address")
    assert FLWR_RUN_RESUME_KEYS == ("eval_every", "checkpoint_every", "max_failed_rounds", "quiet")


def test_differing_settings_compares_what_computes_the_run_only():
    a = RunConfig()
    how = dict(rounds=9, eval_every=3, checkpoint_every=0, max_failed_rounds=9, num_cpus=2.0, num_gpus=1.0, quiet=True,
               ray_address="x:1", out="o", resume="r")
    assert _differing_settings(a, replace(a, **how)) == []
    b = replace(a, seed=4, ratio=0.5, state_dir="s", diagnostics=True)
    assert _differing_settings(a, b) == ["ratio", "seed", "diagnostics", "state_dir"]  # in field order


def test_check_resumable_names_each_difference_the_folder_and_the_round(tmp_path):
    saved = RunConfig(rounds=4, out=str(tmp_path), resume=str(tmp_path))
    ok = replace(saved, rounds=5, eval_every=2)
    _check_resumable(ok, _ckpt(saved, 4))  # a later last round, how it runs changed: fine
    _check_resumable(replace(ok, out=None), _ckpt(saved, 4))  # no out: the resumed folder
    _check_resumable(replace(ok, out=str(tmp_path / ".." / tmp_path.name)), _ckpt(saved, 4))  # the same folder
    with pytest.raises(CheckpointError, match="^" + re.escape(
            f"the checkpoint in {tmp_path} is of another run (ratio: saved 0.01, given 0.5, seed: saved 0, given 3); "
            "use resume_config(DIR, rounds=T) / fl-sparse simulate --resume DIR --rounds T") + "$"):
        _check_resumable(replace(ok, seed=3, ratio=0.5), _ckpt(saved, 4))
    with pytest.raises(CheckpointError, match="^" + re.escape(
            f"the checkpoint in {tmp_path} is of another run (error-memory-dtype: saved 'float32', given 'float16'); "
            "use resume_config(DIR, rounds=T) / fl-sparse simulate --resume DIR --rounds T") + "$"):
        _check_resumable(replace(ok, error_memory_dtype="float16"), _ckpt(saved, 4))
    with pytest.raises(CheckpointError, match="^" + re.escape(
            f"a resumed run writes to the folder it continues ({tmp_path}), not {tmp_path / 'elsewhere'}") + "$"):
        _check_resumable(replace(ok, out=str(tmp_path / "elsewhere")), _ckpt(saved, 4))
    for rounds in (4, 3):
        with pytest.raises(CheckpointError, match="^" + re.escape(
                f"the checkpoint in {tmp_path} is at round 4; give rounds > 4 to continue it") + "$"):
            _check_resumable(replace(ok, rounds=rounds), _ckpt(saved, 4))


def test_check_resumable_reads_an_unreadable_saved_config_as_such():
    for config, why in ((5, "'int' object is not iterable"),
                        ([("clients", 3, 4)], "dictionary update sequence element #0 has length 3; 2 is required")):
        with pytest.raises(CheckpointError, match="^" + re.escape(f"the checkpoint's run config is unreadable: {why}") + "$"):
            _check_resumable(RunConfig(), {"round": 1, "config": config, "rows": [], "strategy": {}})


def test_resume_config_keeps_the_saved_settings_and_takes_the_overrides(tmp_path):
    saved = RunConfig(strategy="topk", ratio=0.05, seed=7, rounds=3, out=str(tmp_path / "old"),
                      ray_address="saved:6379", quiet=False)
    checkpoint.save(tmp_path, {**_ckpt(saved, 3), "config": {**asdict(saved), "from_a_newer_version": 1}})
    cfg = resume_config(tmp_path, rounds=5, quiet=True, num_cpus=2.0)
    assert cfg == replace(saved, rounds=5, quiet=True, num_cpus=2.0, ray_address=None,
                          out=str(tmp_path), resume=str(tmp_path))
    assert resume_config(tmp_path, rounds=4, ray_address="given:1").ray_address == "given:1"
    with pytest.raises(CheckpointError, match="^" + re.escape(
            "a resumed run keeps the saved run's settings; local-steps, ratio cannot change (allowed: rounds, "
            "eval-every, checkpoint-every, max-failed-rounds, num-cpus, num-gpus, quiet, ray-address)") + "$"):
        resume_config(tmp_path, ratio=0.1, rounds=5, local_steps=2)
    with pytest.raises(CheckpointError, match=r"^eval-every must be >= 1$"):
        resume_config(tmp_path, rounds=5, eval_every=0)
    with pytest.raises(CheckpointError, match="^" + re.escape(
            f"the checkpoint in {tmp_path} is at round 3; give rounds > 3 to continue it") + "$"):
        resume_config(tmp_path)  # the saved T: nothing left to run


# ------------------------------------------------------------------ run_metadata
def test_run_metadata_counts_the_clients_per_round_and_names_the_device(monkeypatch):
    meta = run_metadata(RunConfig(clients=10, fraction=0.25, lr=None, model="cnn-fmnist"), num_params=7.0, device="cpu")
    assert meta["clients_per_round"] == 2  # 10 * 0.25 = 2.5, rounded down
    assert meta["lr"] is None and meta["lr_used"] == 0.02 and meta["num_params"] == 7 and type(meta["num_params"]) is int
    assert meta["device"] == "cpu" and meta["cpu_count"] == os.cpu_count()
    assert set(meta["versions"]) == {"fl_sparse", "flwr", "torch", "flwr_datasets", "python"}
    assert meta["versions"]["torch"] == torch.__version__
    assert run_metadata(RunConfig(clients=10, fraction=0.01), num_params=1, device="cpu")["clients_per_round"] == 1
    assert run_metadata(RunConfig(clients=3, fraction=1.0), num_params=1, device="cpu")["clients_per_round"] == 3
    assert run_metadata(RunConfig(clients=7, fraction=0.99), num_params=1, device="cpu")["clients_per_round"] == 6
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device: f"Fake GPU {device.index}")
    assert run_metadata(RunConfig(), num_params=1, device="cuda:1")["device"] == "Fake GPU 1"
    assert run_metadata(RunConfig(), num_params=1, device=torch.device("cpu"))["device"] == "cpu"


def test_version_of_a_missing_distribution_is_none():
    assert server_app._version("fl-sparse-no-such-distribution") is None


# ------------------------------------------------------------------ where the clients' state goes
def test_simulation_state_dir_uses_ram_exactly_when_four_times_the_need_is_free(tmp_path, monkeypatch):
    shm = tmp_path / "shm"
    shm.mkdir()
    free = {"bytes": 0}
    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(free["bytes"], 0, free["bytes"]))

    def where(numel, clients):
        folder = Path(simulation_state_dir(numel, clients, shm=str(shm)))
        assert folder.is_dir() and folder.name.startswith("fl-sparse-state-")
        folder.rmdir()
        return folder.parent

    # 1,000 entries: 4,000 bytes of error memory, twice kept, plus a spare (small): 12,000 bytes a client.
    need = 12_000 * 3 + 2**20
    free["bytes"] = 4 * need
    assert where(1000, 3) == shm
    free["bytes"] = 4 * need - 1
    assert where(1000, 3) == Path(tempfile.gettempdir())
    # At the spare's limit a client still keeps one; one entry more and it keeps none.
    numel = SPARE_MAX_BYTES // 4
    free["bytes"] = 4 * (3 * 4 * numel * 2 + 2**20)
    assert where(numel, 2) == shm
    free["bytes"] = 4 * (3 * 4 * numel * 2 + 2**20) - 1
    assert where(numel, 2) == Path(tempfile.gettempdir())
    free["bytes"] = 4 * (2 * 4 * (numel + 1) * 2 + 2**20)
    assert where(numel + 1, 2) == shm
    # Not writable, or the free space cannot be read: the disk.
    free["bytes"] = 2**40
    monkeypatch.setattr(os, "access", lambda p, mode: False)
    assert where(10, 1) == Path(tempfile.gettempdir())
    monkeypatch.undo()

    def broken(p):
        raise OSError("no statvfs")

    monkeypatch.setattr(shutil, "disk_usage", broken)
    assert where(10, 1) == Path(tempfile.gettempdir())


@pytest.mark.skipif(not (os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK)), reason="no writable /dev/shm")
def test_simulation_state_dir_is_on_dev_shm_by_default(monkeypatch):
    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(2**50, 0, 2**50))
    folder = Path(simulation_state_dir(1000, 2))
    folder.rmdir()
    assert folder.parent == Path("/dev/shm")


# ------------------------------------------------------------------ the round loop (in-process Flower, no Ray)
RUN = RunConfig(model="mlp-784-64-10", clients=4, rounds=3, local_steps=1, batch_size=10, ratio=0.02, seed=5,
                quiet=True, partition="dirichlet", alpha=0.5, fraction=0.5)


def _run(cfg: RunConfig, app=builtin_app, **kw):
    return run_server(InProcessGrid(app, cfg.clients, node_config=lambda i: {"device": "cpu"}), cfg, **kw)


def test_evaluation_every_other_round_and_at_the_last_with_checkpoints_every_other_round(tmp_path, monkeypatch):
    saved = []
    real_save = checkpoint.save
    monkeypatch.setattr(checkpoint, "save", lambda d, payload: saved.append(payload["round"]) or real_save(d, payload))
    cfg = replace(RUN, rounds=5, eval_every=2, checkpoint_every=2, out=str(tmp_path / "out"))
    rows = _run(cfg)
    assert [r["round"] for r in rows] == [1, 2, 3, 4, 5]
    assert [("test_accuracy" in r, "test_loss" in r) for r in rows] == [(False, False), (True, True), (False, False),
                                                                      (True, True), (True, True)]
    assert all(0.0 <= r["test_accuracy"] <= 1.0 for r in rows if "test_accuracy" in r)
    assert saved == [2, 4, 5]  # every 2 rounds, and the last
    assert [r["accepted"] for r in rows] == [2] * 5  # 2 of 4 clients a round
    up = down = 0
    for r in rows:
        up, down = up + r["uplink_bytes"], down + r["downlink_bytes"]
        assert (r["cumulative_uplink_bytes"], r["cumulative_downlink_bytes"]) == (up, down)
    assert all(b["elapsed_seconds"] > a["elapsed_seconds"] > 0 for a, b in zip(rows, rows[1:]))
    assert not checkpoint.was_running(cfg.out)
    assert (tmp_path / "out" / "client-state").is_dir()  # beside the checkpoint, kept for a resume


def test_a_run_without_out_removes_its_own_state_folder(tmp_path, monkeypatch, capsys):
    made = []
    real = tempfile.mkdtemp

    def spy(*a, **kw):
        made.append(real(*a, **kw))
        return made[-1]

    monkeypatch.setattr(tempfile, "mkdtemp", spy)
    rows = _run(replace(RUN, rounds=2, quiet=False))
    assert [r["round"] for r in rows] == [1, 2] and all("test_accuracy" in r for r in rows)
    err = capsys.readouterr().err  # not quiet: a progress line per round (stderr is not a terminal here)
    assert "round 1/2" in err and "round 2/2" in err and "2 rounds: final test accuracy" in err
    states = [m for m in made if Path(m).name.startswith("fl-sparse-state-")]
    assert len(states) == 1 and not Path(states[0]).exists()


def _failing_after(first_good: int, state_dir: str) -> ClientApp:
    """The built-in client for rounds <= first_good, then a client that fails."""
    app = ClientApp(mods=[SparseMod(state_dir=state_dir)])

    @app.train()
    def train(msg, context):
        raise RuntimeError("out of memory")

    def call(message, context):
        if int(message.content["config"]["server-round"]) <= first_good:
            return builtin_app(message, context)
        return app(message, context)

    return call


def test_max_failed_rounds_stops_after_that_many_failed_rounds_in_a_row(tmp_path, capsys):
    cfg = replace(RUN, rounds=6, max_failed_rounds=2, out=str(tmp_path / "out"))
    capsys.readouterr()
    with pytest.raises(RunFailed, match=r"^run stopped after round 3: 2 rounds in a row accepted no client update; "
                                        r"first client error: round 2: client \d+ failed: .*out of memory"):
        _run(cfg, _failing_after(1, str(tmp_path / "s")))
    rows = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert [(r["round"], r["accepted"]) for r in rows] == [(1, 2), (2, 0), (3, 0)]
    assert "round" not in capsys.readouterr().err  # quiet: no progress display
    assert checkpoint.load(cfg.out)["round"] == 3 and not checkpoint.was_running(cfg.out)
    assert (tmp_path / "out" / "model.pt").exists()


def test_failed_rounds_at_the_end_of_the_run_are_not_a_stop(tmp_path):
    # failures in the last round do not stop anything: the run ends there with its accepted rounds
    rows = _run(replace(RUN, rounds=2, max_failed_rounds=1), _failing_after(1, str(tmp_path / "s")))
    assert [(r["round"], r["accepted"]) for r in rows] == [(1, 2), (2, 0)]


def test_a_run_that_never_accepted_an_update_fails_even_at_its_last_round(tmp_path):
    with pytest.raises(RunFailed, match=r"^run stopped after round 2: no client update was accepted in 2 rounds; "
                                        r"first client error: round 1: client \d+ failed: .*out of memory"):
        _run(replace(RUN, rounds=2, max_failed_rounds=5), _failing_after(0, str(tmp_path / "s")))


def test_a_resumed_run_counts_the_saved_runs_failed_rounds_at_its_end(tmp_path):
    out = tmp_path / "out"
    cfg = replace(RUN, rounds=3, max_failed_rounds=3, out=str(out))
    rows = _run(cfg, _failing_after(1, str(tmp_path / "s")))  # rounds 2 and 3 failed, the run ended at T = 3
    assert [r["accepted"] for r in rows] == [2, 0, 0]
    with pytest.raises(RunFailed, match=r"^run stopped after round 4: 3 rounds in a row accepted no client update"):
        _run(resume_config(out, rounds=6, max_failed_rounds=3), _failing_after(0, str(tmp_path / "s")))


def test_main_reads_the_run_config_and_runs(tmp_path, monkeypatch):
    seen = {}
    monkeypatch.setattr(server_app, "run_server", lambda grid, cfg: seen.update(grid=grid, cfg=cfg))
    run_config = {"num-rounds": 2, "num-supernodes": 3, "out": str(tmp_path / "new"), "quiet": True, "lr": -1.0}
    server_app.main("the grid", Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=run_config))
    assert seen["grid"] == "the grid"
    assert seen["cfg"] == RunConfig(rounds=2, clients=3, out=str(tmp_path / "new"), quiet=True, lr=None)
    (tmp_path / "new" / "config.json").parent.mkdir()
    (tmp_path / "new" / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="already holds a run"):
        server_app.main("g", Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=run_config))


def test_main_resumes_to_the_later_last_round_with_this_runs_how(tmp_path, monkeypatch):
    saved = RunConfig(rounds=5, out=str(tmp_path), checkpoint_every=1, quiet=False)
    checkpoint.save(tmp_path, _ckpt(saved, 2))
    seen = []
    monkeypatch.setattr(server_app, "run_server", lambda grid, cfg: seen.append(cfg))
    for num_rounds, expected in ((3, 5), (8, 8)):
        run_config = {"resume": str(tmp_path), "num-rounds": num_rounds, "checkpoint-every": 3, "quiet": True,
                      "eval-every": 2, "max-failed-rounds": 4, "num-cpus": 2.0}
        server_app.main("g", Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=run_config))
        assert seen[-1] == replace(saved, rounds=expected, checkpoint_every=3, quiet=True, eval_every=2,
                                   max_failed_rounds=4, resume=str(tmp_path))  # num-cpus: the saved run's


def test_a_local_simulation_polls_fast_and_keeps_its_state_in_the_folder_it_removes(monkeypatch):
    made = []
    real = server_app.simulation_state_dir
    monkeypatch.setattr(server_app, "simulation_state_dir",
                        lambda numel, clients: made.append((numel, clients, real(numel, clients))) or made[-1][2])
    grid = InProcessGrid(builtin_app, RUN.clients, node_config=lambda i: {"device": "cpu"})
    grid.pull_interval = 0.1  # Flower's default
    strategy = strategy_from_config(replace(RUN, rounds=2))
    run_server(grid, replace(RUN, rounds=2), strategy, local_clients=True)
    assert grid.pull_interval == 0.005
    assert len(made) == 1 and made[0][:2] == (50_890, 4)  # the MLP's d, four clients
    assert strategy.client_state_dir == made[0][2] and not Path(made[0][2]).exists()
    assert strategy.client_state_fsync is False
    # not local: the Grid's polling is left alone
    grid = InProcessGrid(builtin_app, RUN.clients, node_config=lambda i: {"device": "cpu"})
    grid.pull_interval = 0.1
    run_server(grid, replace(RUN, rounds=1))
    assert grid.pull_interval == 0.1 and len(made) == 1


def test_where_the_clients_state_goes_and_what_the_checkpoint_says_of_it(tmp_path):
    out = tmp_path / "out"
    stale = out / "client-state" / "gen-old" / "stale"
    stale.parent.mkdir(parents=True)
    stale.write_text("a state of an earlier run")
    cfg = replace(RUN, rounds=2, out=str(out))
    strategy = strategy_from_config(cfg)
    _run(cfg, strategy=strategy, metadata={"ray_cluster": "none here"})
    assert strategy.client_state_dir == str(out / "client-state") and strategy.client_state_fsync is False
    assert not stale.exists() and (out / "client-state").is_dir()  # a new run starts without the old states
    saved = checkpoint.load(out)
    assert saved["client_state_dir"] == "out/client-state" and saved["round"] == 2
    assert saved["config"] == asdict(cfg) and [r["round"] for r in saved["rows"]] == [1, 2]
    meta = json.loads((out / "config.json").read_text())
    assert meta["ray_cluster"] == "none here" and meta["num_params"] == 50_890 and meta["rounds"] == 2

    named = replace(RUN, rounds=1, out=str(tmp_path / "out2"), state_dir=str(tmp_path / "mine"))
    strategy = strategy_from_config(named)
    _run(named, strategy=strategy)
    assert strategy.client_state_dir == str(tmp_path / "mine") and strategy.client_state_fsync is True
    assert checkpoint.load(named.out)["client_state_dir"] is None
    assert not (tmp_path / "out2" / "client-state").exists()


def test_a_resumed_run_continues_the_rows_sums_and_clock_and_resyncs_only_when_it_must(tmp_path):
    out = tmp_path / "out"
    first = _run(replace(RUN, rounds=2, out=str(out)))
    marker = out / "client-state" / "kept"
    marker.write_text("a client's file")
    resyncs = []

    def resumed(cfg):
        strategy = strategy_from_config(cfg)
        strategy.resync_clients = lambda: resyncs.append(cfg.rounds)
        return _run(cfg, strategy=strategy)

    rows = resumed(resume_config(out, rounds=3))
    assert resyncs == [] and marker.exists()  # a clean stop, the same folder: clients find their state
    assert [r["round"] for r in rows] == [1, 2, 3] and rows[:2] == first
    assert rows[2]["cumulative_uplink_bytes"] == first[1]["cumulative_uplink_bytes"] + rows[2]["uplink_bytes"] > 0
    assert rows[2]["cumulative_downlink_bytes"] == first[1]["cumulative_downlink_bytes"] + rows[2]["downlink_bytes"]
    assert rows[2]["elapsed_seconds"] > first[1]["elapsed_seconds"]
    meta = json.loads((out / "config.json").read_text())
    assert meta["rounds"] == 3 and len(meta["resumed_at"]) == 1
    # a run that died after its checkpoint: the clients may be past it
    checkpoint.mark_running(out)
    resumed(resume_config(out, rounds=4))
    assert resyncs == [4]
    # the checkpoint says the clients' state was elsewhere
    data = checkpoint.load(out)
    checkpoint.save(out, {k: v for k, v in data.items() if k not in ("format", "version", "fl_sparse")}
                    | {"client_state_dir": "elsewhere"})
    resumed(resume_config(out, rounds=5))
    assert resyncs == [4, 5]
    # a resume with out unset writes to the folder it continues
    rows = _run(replace(resume_config(out, rounds=6), out=None))
    assert [r["round"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert [r["round"] for r in json.loads((out / "metrics.json").read_text())] == [1, 2, 3, 4, 5, 6]
    # the files start again from the saved rows; sums and clock run on over every resume
    assert [json.loads(line)["round"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4, 5, 6]
    up = down = 0
    for r in rows:
        up, down = up + r["uplink_bytes"], down + r["downlink_bytes"]
        assert (r["cumulative_uplink_bytes"], r["cumulative_downlink_bytes"]) == (up, down), r["round"]
    assert all(b["elapsed_seconds"] > a["elapsed_seconds"] for a, b in zip(rows, rows[1:]))
    # a saved strategy state that does not load is named with the folder
    data = checkpoint.load(out)
    checkpoint.save(out, {k: v for k, v in data.items() if k not in ("format", "version", "fl_sparse")}
                    | {"strategy": {**data["strategy"], "model": data["strategy"]["model"][:10]}})
    with pytest.raises(CheckpointError, match="^" + re.escape(
            f"cannot continue the run saved in {out}: the saved model is not a vector of 50890 entries")):
        _run(resume_config(out, rounds=7))


def test_a_stop_request_ends_the_run_after_its_first_round_with_a_checkpoint(tmp_path):
    cfg = replace(RUN, rounds=3, checkpoint_every=0, out=str(tmp_path / "out"))
    server_app.stop_requested.set()
    try:
        with pytest.raises(server_app.RunInterrupted, match=r"^interrupted after round 1 of 3$"):
            _run(cfg)
    finally:
        server_app.stop_requested.clear()
    assert checkpoint.load(cfg.out)["round"] == 1 and not checkpoint.was_running(cfg.out)
    assert [r["round"] for r in json.loads((tmp_path / "out" / "metrics.json").read_text())] == [1]
    assert (tmp_path / "out" / "model.pt").exists()


def test_a_resume_builds_the_model_layout_with_the_strategys_exact_arrays(tmp_path):
    out = tmp_path / "out"
    cfg = replace(RUN, rounds=1, out=str(out))

    def with_exact(c):
        strategy = strategy_from_config(c)
        strategy.exact_arrays = ("3.bias",)  # the output layer's bias travels exactly, not in the flat vector
        return strategy

    _run(cfg, strategy=with_exact(cfg))
    resumed = resume_config(out, rounds=2)
    rows = _run(resumed, strategy=with_exact(resumed))  # the same exact arrays: the same layout, continued
    assert [r["round"] for r in rows] == [1, 2]
    # the checkpoint of another model is named exactly
    data = checkpoint.load(out)
    checkpoint.save(out, {k: v for k, v in data.items() if k not in ("format", "version", "fl_sparse")}
                    | {"config": {**data["config"], "model": "logreg-784-10"}})
    with pytest.raises(CheckpointError, match="^" + re.escape(
            f"the checkpoint in {out} holds another model than 'logreg-784-10' as built now, or other arrays sent "
            "exactly (BatchNorm's running statistics are sent exactly by default since 2026-11-27: exact_running_stats)")
            + "$"):
        other = resume_config(out, rounds=3)
        _run(other, strategy=with_exact(other))


def test_each_round_is_appended_to_the_jsonl_and_csv_files(tmp_path):
    out = tmp_path / "out"
    rows = _run(replace(RUN, rounds=2, out=str(out)))
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in lines] == [1, 2] and lines[1]["uplink_bytes"] == rows[1]["uplink_bytes"]
    csv_lines = (out / "metrics.csv").read_text().splitlines()
    assert len(csv_lines) == 3 and csv_lines[0].startswith("round,test_accuracy,test_loss,")


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is visible")
def test_gpus_asked_for_on_a_machine_without_cuda_evaluate_on_the_cpu(tmp_path):
    rows = _run(replace(RUN, rounds=1, num_gpus=0.5, out=str(tmp_path / "out")))
    assert 0.0 <= rows[0]["test_accuracy"] <= 1.0
    assert json.loads((tmp_path / "out" / "config.json").read_text())["device"] == "cpu"


def test_a_round_the_strategy_kept_no_numbers_of_is_a_row_with_its_number(tmp_path):
    cfg = replace(RUN, rounds=3)
    strategy = strategy_from_config(cfg)
    aggregate = strategy.aggregate_train

    def forgetful(server_round, replies):
        result = aggregate(server_round, replies)
        if server_round == 2:
            del strategy.state.round_metrics[server_round]
        return result

    strategy.aggregate_train = forgetful
    rows = _run(cfg, strategy=strategy)
    assert [r["round"] for r in rows] == [1, 2, 3]
    assert "accepted" not in rows[1] and "uplink_bytes" not in rows[1] and "test_accuracy" in rows[1]
    assert rows[1]["cumulative_uplink_bytes"] == rows[0]["cumulative_uplink_bytes"]  # nothing counted in round 2
    assert rows[1]["cumulative_downlink_bytes"] == rows[0]["cumulative_downlink_bytes"]


def test_the_run_clock_starts_at_zero_and_goes_on_from_the_saved_rows(tmp_path, monkeypatch):
    from types import SimpleNamespace

    monkeypatch.setattr(server_app, "time", SimpleNamespace(perf_counter=lambda: 100.0))  # no time passes
    out = tmp_path / "out"
    rows = _run(replace(RUN, rounds=1, out=str(out)))
    assert rows[0]["elapsed_seconds"] == 0.0
    data = {k: v for k, v in checkpoint.load(out).items() if k not in ("format", "version", "fl_sparse")}
    for saved, expected in ((2.5, 2.5), (None, 0.0)):  # an older run's row without the clock: from 0
        rows = [{k: v for k, v in data["rows"][0].items() if k != "elapsed_seconds"}]
        if saved is not None:
            rows[0]["elapsed_seconds"] = saved
        checkpoint.save(out, data | {"rows": rows})
        assert _run(resume_config(out, rounds=2))[1]["elapsed_seconds"] == expected


def test_the_central_evaluation_reaches_flowers_result_for_the_evaluated_rounds_only(tmp_path):
    cfg = replace(RUN, rounds=3, eval_every=2)
    strategy = strategy_from_config(cfg)
    start, results = strategy.start, []
    strategy.start = lambda **kw: results.append(start(**kw)) or results[-1]
    rows = _run(cfg, strategy=strategy)
    central = results[0].evaluate_metrics_serverapp
    assert sorted(central) == [2, 3]  # round 1 was not evaluated (and round 0, the start, never is)
    for r in (2, 3):
        assert dict(central[r]) == {"test_loss": rows[r - 1]["test_loss"], "test_accuracy": rows[r - 1]["test_accuracy"]}


def test_a_resumed_run_sends_the_train_config_for_the_rounds_left_only(tmp_path):
    out = tmp_path / "out"
    _run(replace(RUN, rounds=1, out=str(out)))
    grid = InProcessGrid(builtin_app, RUN.clients, node_config=lambda i: {"device": "cpu"})
    rows = run_server(grid, resume_config(out, rounds=2))
    assert [r["round"] for r in rows] == [1, 2]
    configs = [m.content["config"] for m in grid.sent if "config" in m.content]  # not the nodes' identification
    assert len(configs) == 2 and {int(c["server-round"]) for c in configs} == {2}  # 2 of 4 clients, round 2 only
    for c in configs:  # what _train_config(RUN) holds reaches the clients
        assert (c["partition"], c["batch-size"], c["local-steps"], c["seed"], c["lr"]) == ("dirichlet", 10, 1, 5, 0.1)


def test_a_run_whose_replies_all_get_lost_says_no_reply_arrived():
    grid = InProcessGrid(builtin_app, RUN.clients, tamper=lambda node, reply: None)  # every reply lost on the way
    with pytest.raises(RunFailed, match=r"^run stopped after round 2: no client update was accepted in 2 rounds; "
                                        r"first client error: no reply arrived$"):
        run_server(grid, replace(RUN, rounds=2))


def test_a_resumed_runs_progress_line_times_the_rounds_this_process_ran(tmp_path, monkeypatch, capsys):
    """The s/round and ETA of a run resumed after round 2 count rounds from 3 on: not from round 1,
    which would divide this process's time by rounds it never ran."""
    import time as real_time
    import types

    out = tmp_path / "out"
    _run(replace(RUN, rounds=2, out=str(out)))
    clock = iter(range(1_000, 10_000, 5))  # every reading of the clock is 5 s after the one before
    fake_time = types.SimpleNamespace(**{k: getattr(real_time, k) for k in dir(real_time) if not k.startswith("_")})
    fake_time.perf_counter = lambda: float(next(clock))
    monkeypatch.setattr(server_app, "time", fake_time)
    capsys.readouterr()
    grid = InProcessGrid(builtin_app, RUN.clients, node_config=lambda i: {"device": "cpu"})
    run_server(grid, resume_config(out, rounds=5, quiet=False))
    lines = [line for line in capsys.readouterr().err.splitlines() if " round " in line and "/5" in line]
    assert [re.search(r"round (\d)/5", line).group(1) for line in lines] == ["3", "4", "5"]
    # two clock readings a round (its row's elapsed time, then this line): 10 s a round
    assert "10.00 s/round" in lines[1] and "ETA 10 s" in lines[1]
    assert "10.00 s/round" in lines[2] and "ETA 0 s" in lines[2]
