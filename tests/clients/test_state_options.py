"""The state options end to end: the Instruction field, the strategy, RunConfig / CLI, the mod's defaults,
and a real simulation that leaves one model file per version held, not one per client."""

from __future__ import annotations

import json
import struct
from dataclasses import replace
from pathlib import Path

import pytest
from flwr.app import Context, RecordDict

from fl_sparse import protocol
from fl_sparse.cli import build_parser
from fl_sparse.clients import SparseMod
from fl_sparse.clients import mod as mod_module
from fl_sparse.clients import state as state_module
from fl_sparse.protocol import Instruction, ProtocolError
from fl_sparse.server_app import RunConfig, strategy_from_config
from fl_sparse.strategies import TopKSGD


# ====================================================================== the Instruction field
def test_instruction_error_memory_dtype_defaults_to_float32_and_round_trips():
    assert Instruction(server_round=1).error_memory_dtype == "float32"
    for dtype in protocol.ERROR_MEMORY_DTYPES:
        instr = Instruction(server_round=1, error_memory_dtype=dtype)
        assert Instruction.from_record(instr.to_record()).error_memory_dtype == dtype
    assert protocol.ERROR_MEMORY_DTYPES == state_module.ERROR_DTYPES  # one list on both sides


@pytest.mark.parametrize("bad", ["float64", "fp16", "", "FLOAT16", "int8"])
def test_instruction_refuses_an_unknown_error_memory_dtype(bad):
    with pytest.raises(ProtocolError, match=r"unknown error-memory-dtype .*float32.*float16.*bfloat16"):
        Instruction(server_round=1, error_memory_dtype=bad)
    record = Instruction(server_round=1).to_record()
    record["error-memory-dtype"] = bad
    with pytest.raises(ProtocolError, match="error-memory-dtype"):
        Instruction.from_record(record)
    record["error-memory-dtype"] = 16
    with pytest.raises(ProtocolError, match="must be str"):
        Instruction.from_record(record)


# ====================================================================== strategy, RunConfig, CLI
def test_the_strategy_puts_its_dtype_in_every_instruction():
    import numpy as np
    from flwr.app import Array, ArrayRecord

    strategy = TopKSGD(ratio=0.1, error_memory_dtype="bfloat16")
    strategy.initialize(ArrayRecord({"w": Array(np.zeros(10, dtype=np.float32))}))
    assert strategy.instruction(1).error_memory_dtype == "bfloat16"
    assert TopKSGD(ratio=0.1).error_memory_dtype == "float32"
    with pytest.raises(ValueError, match="error_memory_dtype must be one of"):
        TopKSGD(ratio=0.1, error_memory_dtype="half")


def test_run_config_and_cli_flag():
    assert RunConfig().error_memory_dtype == "float32"
    args = vars(build_parser().parse_args(["simulate", "--error-memory-dtype", "float16"]))
    assert args["error_memory_dtype"] == "float16"
    cfg = RunConfig(error_memory_dtype="float16").validate()
    assert strategy_from_config(cfg).error_memory_dtype == "float16"
    assert strategy_from_config(replace(cfg, strategy="ssgd-mv")).error_memory_dtype == "float16"
    with pytest.raises(ValueError, match="error-memory-dtype must be float32, float16 or bfloat16"):
        RunConfig(error_memory_dtype="float64").validate()
    with pytest.raises(SystemExit):
        build_parser().parse_args(["simulate", "--error-memory-dtype", "float64"])
    assert RunConfig.from_run_config({"error-memory-dtype": "bfloat16"}).error_memory_dtype == "bfloat16"


# ====================================================================== the mod's defaults
def _context(node_config: dict) -> Context:
    return Context(run_id=7, node_id=3, node_config={"partition-id": 3, **node_config}, state=RecordDict(), run_config={})


def _store(mod: SparseMod, node_config: dict, **fields):
    instr = Instruction(server_round=1, sync_mode="dense", generation="g1", **fields)
    return mod._open(_context(node_config), instr).store


def test_the_mod_shares_models_in_the_servers_folder_only(tmp_path, monkeypatch):
    monkeypatch.delenv("FL_SPARSE_STATE_DIR", raising=False)
    hint = dict(state_dir=str(tmp_path / "hint"), state_fsync=False)
    assert _store(SparseMod(), {}, **hint).share_models  # the simulation's folder: many clients
    assert not _store(SparseMod(), {"state-dir": str(tmp_path / "node")}, **hint).share_models  # a SuperNode's own
    assert not _store(SparseMod(state_dir=tmp_path / "mod"), {}, **hint).share_models
    monkeypatch.setenv("FL_SPARSE_STATE_DIR", str(tmp_path / "env"))
    assert not _store(SparseMod(), {}, **hint).share_models
    assert _store(SparseMod(share_models=True), {"state-dir": str(tmp_path / "node")}).share_models  # the option wins
    assert not _store(SparseMod(share_models=False), {}, **hint).share_models


def test_the_mods_folder_order_ends_in_the_xdg_cache(tmp_path, monkeypatch):
    """mod option > node config > $FL_SPARSE_STATE_DIR > server's hint > $XDG_CACHE_HOME/fl-sparse/state > ~/.cache."""
    monkeypatch.delenv("FL_SPARSE_STATE_DIR", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)

    def root(mod=None, node=None, **fields):
        return _store(mod or SparseMod(), node or {}, **fields).root.parent

    assert root() == Path(str(mod_module.DEFAULT_STATE_DIR))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert root() == tmp_path / "xdg" / "fl-sparse" / "state"
    assert root(state_dir=str(tmp_path / "hint")) == tmp_path / "hint"
    monkeypatch.setenv("FL_SPARSE_STATE_DIR", str(tmp_path / "env"))
    assert root(state_dir=str(tmp_path / "hint")) == tmp_path / "env"
    assert root(node={"state-dir": str(tmp_path / "node")}, state_dir=str(tmp_path / "hint")) == tmp_path / "node"
    assert root(SparseMod(state_dir=tmp_path / "mod"), {"state-dir": str(tmp_path / "node")}) == tmp_path / "mod"


def test_the_mod_stores_the_error_in_the_servers_dtype_unless_told(tmp_path):
    node = {"state-dir": str(tmp_path)}
    assert _store(SparseMod(), node).error_dtype == "float32"
    assert _store(SparseMod(), node, error_memory_dtype="float16").error_dtype == "float16"
    assert _store(SparseMod(error_dtype="bfloat16"), node, error_memory_dtype="float16").error_dtype == "bfloat16"
    with pytest.raises(ValueError, match="error memory dtype"):
        SparseMod(error_dtype="float64")


# ====================================================================== a real simulation
def _header(path: Path) -> dict:
    raw = path.read_bytes()
    (n,) = struct.unpack_from("<I", raw, len(state_module.MAGIC))
    return json.loads(raw[len(state_module.MAGIC) + 4 : len(state_module.MAGIC) + 4 + n])


@pytest.mark.slow
def test_a_simulation_keeps_one_model_file_per_version_and_a_float16_memory(tmp_path):
    from fl_sparse.simulations.runner import simulate

    state_dir = tmp_path / "state"
    cfg = RunConfig(
        strategy="topk", dataset="fashion-mnist", model="mlp-784-64-10", clients=6, fraction=0.5, rounds=4,
        local_steps=1, batch_size=10, lr=0.05, ratio=0.01, seed=3, quiet=True,
        error_memory_dtype="float16", state_dir=str(state_dir),  # a folder we name: it stays after the run
    )
    rows = simulate(cfg)
    assert len(rows) == 4 and all(r["accepted"] == r["clients"] == 3 for r in rows)
    (folder,) = state_dir.glob("gen-*")
    states = sorted(folder.glob("client-*.state"))
    assert len(states) >= 4  # 3 of 6 sampled per round: most clients trained at some point
    held: dict[str, int] = {}
    for path in states:
        header = _header(path)
        assert [e[0] for e in header["tensors"]].count("model") == 0  # no client keeps its own copy
        (error,) = [e for e in header["tensors"] if e[0] == "error"]
        assert error[1] == "float16" and header["casts"] == {"error": "float32"}
        digest = header["model_ref"][0]
        held[digest] = held.get(digest, 0) + 1
        assert (folder / "models" / f"{path.stem}.{digest}.model").is_file()
    canonical = {p.stem: p.stat() for p in (folder / "models").glob("*.model") if state_module._CANONICAL.match(p.name)}
    assert set(canonical) == set(held)  # one file per version some client holds, none for any other
    assert {h: s.st_nlink - 1 for h, s in canonical.items()} == held
    assert len(canonical) < len(states) and max(held.values()) >= 3  # the last round's 3 clients share one
    assert not list(folder.rglob("*.tmp"))
    d = 50_890
    assert sum(s.st_size for s in canonical.values()) == 4 * d * len(canonical)
    assert all(p.stat().st_size < 2 * d + 16_384 for p in states)  # the fp16 memory, the last update sent, the layout
