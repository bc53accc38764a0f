"""Tests written to kill mutants of SparseFedAvg's membership, sync and checkpoint state.

The constructor's argument checks, sampling (``sample``, ``_order``), the
nodes' stable keys (``identify``, ``reidentify``, ``_learn_key``,
``_await_gone_clients``, ``move_clients``), the per-node sync payloads
(``configure_train``, ``messages_with_sync``, ``sync_for``, ``sync_payload``,
``_prune_history``), the model it holds (``initialize``, ``adopt``,
``_holds``, ``current_arrays``) and the checkpoint (``options``,
``state_dict``, ``load_state_dict``), plus ``_RoundOffset`` and
``with_fedavg_signature``. Replies come from the real :class:`SparseMod` on
the in-process grid (``tests/inprocess.py``); the oracles are written here
(``random.Random`` for the draw, a numpy copy of each client's model for the
syncs). See docs/testing.md.
"""

from __future__ import annotations

import inspect
import logging
import random
import re

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.common.logger import FLOWER_LOGGER
from inprocess import InProcessGrid, scratch_folder, step_app
from inprocess import node_id as node

from fl_sparse import codec, protocol
from fl_sparse.compressors import TopK
from fl_sparse.protocol import Instruction, Report
from fl_sparse.strategies import BidirectionalTopKSGD, SparseFedAvg, TopKSGD
from fl_sparse.strategies import base as base_module
from fl_sparse.strategies.base import _RoundOffset, _remap, with_fedavg_signature

FLOWER_LOGGER.setLevel(logging.WARNING)

SHAPE = (4, 6)
D = 24


def _model(seed: int = 5) -> ArrayRecord:
    rng = np.random.default_rng(seed)
    return ArrayRecord({"w": Array(rng.standard_normal(SHAPE).astype(np.float32))})


def _step(pid: int, rnd: int) -> np.ndarray:
    return np.random.default_rng(100 * pid + rnd).standard_normal(SHAPE).astype(np.float32)


def _grid(n: int = 4, **kwargs) -> InProcessGrid:
    folder = scratch_folder()
    return InProcessGrid(step_app(_step, lambda pid: float(pid + 1)), n,
                         node_config=lambda i: {"state-dir": folder}, **kwargs)


def _instructions(messages) -> dict[int, Instruction]:
    return {m.metadata.dst_node_id: Instruction.read(m.content) for m in messages}


def _play(strategy, grid, rnd: int, arrays: ArrayRecord, config: ConfigRecord | None = None):
    messages = list(strategy.configure_train(rnd, arrays, config or ConfigRecord(), grid))
    replies = list(grid.send_and_receive(messages, timeout=60))
    out, _ = strategy.aggregate_train(rnd, replies)
    return messages, (arrays if out is None else out)


def _topk(**kw) -> TopKSGD:
    kw.setdefault("fraction_evaluate", 0.0)
    kw.setdefault("min_available_nodes", 1)
    kw.setdefault("min_train_nodes", 1)
    return TopKSGD(k=3, **kw)


def _exactly(message: str) -> str:
    return "^" + re.escape(message) + "$"


# ====================================================================== __init__
@pytest.mark.parametrize("kwargs,message", [
    ({"fraction_train": 1.5}, "fraction_train must be in [0, 1], got 1.5"),
    ({"fraction_train": -0.5}, "fraction_train must be in [0, 1], got -0.5"),
    ({"fraction_evaluate": 1.01}, "fraction_evaluate must be in [0, 1], got 1.01"),
    ({"fraction_evaluate": -0.01}, "fraction_evaluate must be in [0, 1], got -0.01"),
    ({"min_train_nodes": True}, "min_train_nodes must be an int >= 0, got True"),
    ({"min_train_nodes": -1}, "min_train_nodes must be an int >= 0, got -1"),
    ({"min_evaluate_nodes": -1}, "min_evaluate_nodes must be an int >= 0, got -1"),
    ({"min_evaluate_nodes": False}, "min_evaluate_nodes must be an int >= 0, got False"),
    ({"min_available_nodes": 2.0}, "min_available_nodes must be an int >= 0, got 2.0"),
    ({"min_available_nodes": -3}, "min_available_nodes must be an int >= 0, got -3"),
    ({"weighted_by_key": ""}, "weighted_by_key must be a non-empty str not starting with 'fl-sparse', got ''"),
    ({"weighted_by_key": "fl-sparse"}, "weighted_by_key must be a non-empty str not starting with 'fl-sparse', got 'fl-sparse'"),
    ({"arrayrecord_key": "fl-sparse.x"},
     "arrayrecord_key must be a non-empty str not starting with 'fl-sparse', got 'fl-sparse.x'"),
    ({"configrecord_key": 3}, "configrecord_key must be a non-empty str not starting with 'fl-sparse', got 3"),
    ({"uplink_values": "q1"}, f"unknown value code 'q1'; expected one of {codec.VALUE_CODES}"),
    ({"downlink_values": "fp8"}, f"unknown value code 'fp8'; expected one of {codec.VALUE_CODES}"),
    ({"uplink_positions": "zip"}, f"unknown position code 'zip'; expected one of {codec.POSITION_CODES}"),
    ({"downlink_positions": "gzip"}, f"unknown position code 'gzip'; expected one of {codec.POSITION_CODES}"),
    ({"error_memory_dtype": "float64"},
     f"error_memory_dtype must be one of {protocol.ERROR_MEMORY_DTYPES}, got 'float64'"),
    ({"server_error_feedback": 1}, "server_error_feedback must be True or False, got 1"),
    ({"client_error_feedback": None}, "client_error_feedback must be True or False, got None"),
    ({"exact_arrays": 5}, "exact_arrays must be an array name or a list of them, got 5"),
    ({"exact_running_stats": "yes"}, "exact_running_stats must be True or False, got 'yes'"),
    ({"seed": -1}, "seed must be an integer >= 0, got -1"),
    ({"diagnostics": 0}, "diagnostics must be True or False, got 0"),
    ({"client_state_fsync": 2}, "client_state_fsync must be True or False, got 2"),
    ({"max_weight_ratio": 0}, "max_weight_ratio must be a finite number > 0 or None, got 0"),
    ({"max_weight_ratio": float("nan")}, "max_weight_ratio must be a finite number > 0 or None, got nan"),
    ({"update_norm_bound": float("inf")}, "update_norm_bound must be a finite number > 0 or None, got inf"),
    ({"update_norm_bound": -1.0}, "update_norm_bound must be a finite number > 0 or None, got -1.0"),
    ({"update_norm_bound_ratio": "2"}, "update_norm_bound_ratio must be a finite number > 0 or None, got '2'"),
    ({"update_norm_bound_ratio": 0.0}, "update_norm_bound_ratio must be a finite number > 0 or None, got 0.0"),
])
def test_a_bad_constructor_argument_is_refused_with_its_exact_message(kwargs, message):
    with pytest.raises(ValueError, match=_exactly(message)):
        SparseFedAvg(**kwargs)


def test_boundary_arguments_are_accepted_and_every_argument_is_kept():
    for fraction in (0.0, 1.0):
        s = SparseFedAvg(fraction_train=fraction, fraction_evaluate=fraction, min_train_nodes=0,
                         min_evaluate_nodes=0, min_available_nodes=0, max_weight_ratio=1e-300,
                         update_norm_bound=5e-324, update_norm_bound_ratio=1)
        assert (s.fraction_train, s.fraction_evaluate, s.min_available_nodes) == (fraction, fraction, 0)

    def train_aggr(records, key):  # pragma: no cover - only kept
        raise AssertionError

    def eval_aggr(records, key):  # pragma: no cover
        raise AssertionError

    uplink = {"name": "topk", "k": 3}
    down = TopK(k=2)
    s = SparseFedAvg(0.5, 0.25, 3, 4, 5, "n", "arr", "cfg", train_aggr, eval_aggr,
                     uplink=uplink, downlink=down, uplink_values="fp16", uplink_positions="rice",
                     downlink_values="q8", downlink_positions="block", server_error_feedback=False,
                     client_error_feedback=False, exact_arrays=["b*"], exact_running_stats=False, seed=7,
                     diagnostics=True, client_state_dir="/somewhere", client_state_fsync=False,
                     error_memory_dtype="bfloat16", max_weight_ratio=3.0, update_norm_bound=2.0,
                     update_norm_bound_ratio=4.0)
    assert (s.fraction_train, s.fraction_evaluate, s.min_train_nodes, s.min_evaluate_nodes,
            s.min_available_nodes) == (0.5, 0.25, 3, 4, 5)
    assert (s.weighted_by_key, s.arrayrecord_key, s.configrecord_key) == ("n", "arr", "cfg")
    assert s.train_metrics_aggr_fn is train_aggr and s.evaluate_metrics_aggr_fn is eval_aggr
    assert s.uplink == uplink and s.uplink is not uplink and s.downlink is down
    assert (s.uplink_values, s.uplink_positions, s.downlink_values, s.downlink_positions) == (
        "fp16", "rice", "q8", "block")
    assert (s.server_error_feedback, s.client_error_feedback, s.exact_running_stats, s.diagnostics,
            s.client_state_fsync) == (False, False, False, True, False)
    assert tuple(s.exact_arrays) == ("b*",) and s.exact_patterns == ("b*",)
    assert (s.seed, s.client_state_dir, s.error_memory_dtype) == (7, "/somewhere", "bfloat16")
    assert (s.max_weight_ratio, s.update_norm_bound, s.update_norm_bound_ratio) == (3.0, 2.0, 4.0)


def test_the_defaults():
    s = SparseFedAvg()
    assert (s.fraction_train, s.fraction_evaluate, s.min_train_nodes, s.min_evaluate_nodes, s.min_available_nodes) == (
        1.0, 1.0, 2, 2, 2)
    assert (s.weighted_by_key, s.arrayrecord_key, s.configrecord_key) == ("num-examples", "arrays", "config")
    from flwr.serverapp.strategy import FedAvg

    ours, flowers = inspect.signature(SparseFedAvg.__init__).parameters, inspect.signature(FedAvg.__init__).parameters
    assert list(ours)[:11] == list(flowers) and all(ours[n].default == flowers[n].default for n in flowers)
    assert s.uplink == {"name": "none"} and s.downlink is None
    assert (s.uplink_values, s.uplink_positions, s.downlink_values, s.downlink_positions) == (
        "fp32", "raw", "fp32", "raw")
    assert (s.server_error_feedback, s.client_error_feedback, s.exact_running_stats, s.diagnostics,
            s.client_state_fsync) == (True, True, True, False, True)
    assert s.exact_patterns == ("*running_mean", "*running_var")
    assert (s.seed, s.client_state_dir, s.error_memory_dtype) == (0, "", "float32")
    assert (s.max_weight_ratio, s.update_norm_bound, s.update_norm_bound_ratio) == (None, None, None)
    assert s.last_downlink_split == {"last_update": 0, "catch_up": 0, "first_contact": 0}
    assert s.first_error is None and s.node_keys == {} and s.state.model is None
    assert s.uplink_spec(1, 3) == {"name": "none"}
    spec = s.uplink_spec(1, 3)
    spec["name"] = "topk"
    assert s.uplink == {"name": "none"}, "uplink_spec hands out a copy"


# ====================================================================== options, state_dict
def test_options_are_the_settings_a_state_must_match():
    s = TopKSGD(k=3, downlink_positions="rice", exact_arrays=["b"], seed=4, fraction_train=0.5,
                weighted_by_key="n")
    assert s.options() == {
        "uplink": '{"k": 3, "name": "topk"}', "downlink": "None", "uplink_values": "fp32",
        "uplink_positions": "raw", "downlink_values": "fp32", "downlink_positions": "rice",
        "server_error_feedback": True, "client_error_feedback": True, "exact_arrays": ["b"], "seed": 4,
        "fraction_train": 0.5, "weighted_by_key": "n",
    }
    off = TopKSGD(k=3, exact_running_stats=False, server_error_feedback=False, client_error_feedback=False,
                  fraction_train=1)
    options = off.options()
    assert options["exact_running_stats"] is False
    assert options["server_error_feedback"] is False and options["client_error_feedback"] is False
    assert type(options["fraction_train"]) is float
    assert _bidirectional().options()["downlink"] == repr(TopK(k=4)) != "None"


def _run(strategy, grid, rounds, arrays=None):
    arrays = arrays or _model()
    sampled, modes = {}, {}
    for t in rounds:
        messages, arrays = _play(strategy, grid, t, arrays)
        sampled[t] = sorted(m.metadata.dst_node_id for m in messages)
        modes[t] = {n: i.sync_mode for n, i in _instructions(messages).items()}
    return arrays, sampled, modes


def _nested_equal(a, b, path="") -> None:
    assert type(a) is type(b), path
    if isinstance(a, dict):
        assert list(a) == list(b), path
        for k in a:
            _nested_equal(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _nested_equal(x, y, f"{path}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b), path
    elif isinstance(a, float) and a != a:
        assert b != b, path
    else:
        assert a == b, path


def _bidirectional(**kw):
    return BidirectionalTopKSGD(k=3, downlink_k=4, fraction_train=0.5, seed=11, fraction_evaluate=0.0,
                                min_available_nodes=1, min_train_nodes=1, **kw)


def test_a_state_dict_resumes_exactly_where_the_run_was():
    """Rounds 1-3, state_dict through torch.save, a new strategy loads it and runs 4-6: the same
    clients, syncs, models and round metrics as the run that never stopped."""
    import io

    straight = _bidirectional()
    arrays_a, sampled_a, modes_a = _run(straight, _grid(5), range(1, 7))

    first, grid = _bidirectional(), _grid(5)
    arrays, sampled_b, modes_b = _run(first, grid, range(1, 4))
    saved = first.state_dict()
    buffer = io.BytesIO()
    torch.save(saved, buffer)
    buffer.seek(0)
    second = _bidirectional()
    second.load_state_dict(torch.load(buffer, weights_only=True))
    _nested_equal(second.state_dict(), saved)
    assert second.state.layout.to_json() == first.state.layout.to_json()
    arrays, more_sampled, more_modes = _run(second, grid, range(4, 7), arrays)
    sampled_b.update(more_sampled)
    modes_b.update(more_modes)
    assert sampled_a == sampled_b and modes_a == modes_b
    assert np.array_equal(arrays_a["w"].numpy(), arrays["w"].numpy())

    def metrics(s):
        return {t: {k: v for k, v in m.items() if k != "round_seconds"} for t, m in s.state.round_metrics.items()}

    a, b = metrics(straight), metrics(second)
    assert list(a) == list(b) == [1, 2, 3, 4, 5, 6]
    _nested_equal(a, b)
    assert torch.equal(straight.state.server_error.error, second.state.server_error.error)
    assert straight.state.client_versions == second.state.client_versions
    assert straight.state.accepted == second.state.accepted
    assert list(straight.state.history) == list(second.state.history)
    assert straight.state.update_base == second.state.update_base
    assert straight.state.cumulative_total_error == second.state.cumulative_total_error


def test_state_dict_holds_copies_of_every_field():
    s, grid = _bidirectional(), _grid(5)
    with pytest.raises(RuntimeError, match=_exactly("state_dict() before the strategy has a model (start a run first)")):
        s.state_dict()
    s.identify(grid)
    _run(s, grid, range(1, 4))
    s.first_error = "round 2: something"
    sd = s.state_dict()
    st = s.state
    assert list(sd) == ["strategy", "state_version", "options", "layout", "model", "version", "round", "generation",
                        "server_error", "exact", "last_update_record", "update_base", "history", "client_versions",
                        "accepted", "cumulative_total_error", "round_metrics", "node_keys", "nonces", "first_error"]
    assert sd["strategy"] == "fl_sparse.strategies.named.BidirectionalTopKSGD" and sd["state_version"] == 1
    assert sd["options"] == s.options()
    assert (sd["version"], sd["round"], sd["generation"], sd["update_base"]) == (
        st.version, 3, st.generation, st.update_base)
    assert sd["version"] == 3 and sd["update_base"] == 2
    assert torch.equal(sd["model"], st.model) and sd["model"] is not st.model
    assert sd["server_error"]["numel"] == D and torch.equal(sd["server_error"]["error"], st.server_error.error)
    assert sd["server_error"]["error"] is not st.server_error.error
    assert [v for v, _ in sd["history"]] == list(st.history) == [1, 2, 3]
    assert all(idx is not st.history[v] and torch.equal(idx, st.history[v]) for v, idx in sd["history"])
    assert sd["client_versions"] == st.client_versions and sd["client_versions"] is not st.client_versions
    assert sd["accepted"] == st.accepted and sd["accepted"] is not st.accepted
    assert sd["node_keys"] == {node(p): (p, node(p)) for p in range(5)}
    assert sd["nonces"] == s._nonces and len(sd["nonces"]) == 2
    assert sd["first_error"] == "round 2: something"
    assert isinstance(sd["cumulative_total_error"], float)
    sd["round_metrics"][3]["clients"] = 99
    assert st.round_metrics[3]["clients"] == 2, "a deep copy"
    fresh = _topk()
    fresh.initialize(_model())
    assert fresh.state_dict()["server_error"]["error"] is None


def _saved(**kw):
    s = _topk(**kw)
    _run(s, _grid(2), range(1, 3))
    return s, s.state_dict()


@pytest.mark.parametrize("change,message", [
    (lambda sd: "not a dict", "a strategy state must be a dict (from state_dict())"),
    (lambda sd: {**sd, "strategy": "x.Y"},
     "the saved state is of strategy 'x.Y', this strategy is 'fl_sparse.strategies.named.TopKSGD'"),
    (lambda sd: {k: v for k, v in sd.items() if k != "strategy"},
     "the saved state is of strategy None, this strategy is 'fl_sparse.strategies.named.TopKSGD'"),
    (lambda sd: {**sd, "state_version": 2}, "the saved state has version 2; TopKSGD reads version 1"),
    (lambda sd: {k: v for k, v in sd.items() if k != "state_version"},
     "the saved state has version None; TopKSGD reads version 1"),
    (lambda sd: {**sd, "options": {**sd["options"], "seed": 9, "uplink_values": "fp16"}},
     "the saved state was made with other settings (seed: saved 9, now 0, uplink_values: saved 'fp16', now 'fp32')"),
    (lambda sd: {**sd, "options": {**sd["options"], "extra": 1}},
     "the saved state was made with other settings (extra: saved 1, now None)"),
    (lambda sd: {k: v for k, v in sd.items() if k != "options"},
     "the saved state was made with other settings (client_error_feedback: saved None, now True, downlink: saved "
     "None, now 'None', downlink_positions: saved None, now 'raw', downlink_values: saved None, now 'fp32', "
     "exact_arrays: saved None, now [], fraction_train: saved None, now 1.0, seed: saved None, now 0, "
     "server_error_feedback: saved None, now True, uplink: saved None, now '{\"k\": 3, \"name\": \"topk\"}', "
     "uplink_positions: saved None, now 'raw', uplink_values: saved None, now 'fp32', weighted_by_key: saved None, "
     "now 'num-examples')"),
    (lambda sd: {**sd, "model": sd["model"][:-1]}, "the saved model is not a vector of 24 entries"),
    (lambda sd: {**sd, "model": sd["model"].reshape(4, 6)}, "the saved model is not a vector of 24 entries"),
    (lambda sd: {**sd, "model": sd["model"].numpy()}, "the saved model is not a vector of 24 entries"),
    (lambda sd: {**sd, "model": sd["model"].to(torch.int32)}, "the saved model is not finite"),
    (lambda sd: {**sd, "model": torch.cat([sd["model"][:-1], torch.tensor([float("inf")])])},
     "the saved model is not finite"),
    (lambda sd: {**sd, "server_error": {"numel": 23, "error": None}}, "state holds numel 23, the memory holds 24"),
    (lambda sd: {**sd, "server_error": {"numel": None, "error": torch.zeros(23)}},
     "state['error'] has 23 entries, expected 24"),
    (lambda sd: {k: v for k, v in sd.items() if k != "accepted"}, "not a complete strategy state: KeyError: 'accepted'"),
    (lambda sd: {k: v for k, v in sd.items() if k != "round"}, "not a complete strategy state: KeyError: 'round'"),
    (lambda sd: {**sd, "history": 5}, "not a complete strategy state: TypeError: 'int' object is not iterable"),
    (lambda sd: {**sd, "node_keys": {1: ()}}, "not a complete strategy state: IndexError: tuple index out of range"),
    (lambda sd: {**sd, "client_versions": [1]},
     "not a complete strategy state: AttributeError: 'list' object has no attribute 'items'"),
])
def test_a_refused_state_names_why_and_leaves_the_strategy_as_it_was(change, message):
    s, sd = _saved()
    before = dict(vars(s))
    with pytest.raises(ValueError, match=_exactly(message)):
        s.load_state_dict(change(sd))
    assert vars(s) == before and all(vars(s)[k] is v for k, v in before.items())


class _Failing(TopKSGD):
    def _load_state(self, state):
        super()._load_state(state)
        raise KeyboardInterrupt


def test_a_load_interrupted_after_the_base_loaded_leaves_the_strategy_as_it_was():
    s = _Failing(k=3, fraction_evaluate=0.0, min_available_nodes=1, min_train_nodes=1)
    _run(s, _grid(2), range(1, 3))
    sd = s.state_dict()
    sd = {**sd, "strategy": f"{_Failing.__module__}._Failing"}
    state, keys = s.state, s.node_keys
    with pytest.raises(KeyboardInterrupt):
        s.load_state_dict(sd)
    assert s.state is state and s.node_keys is keys


def test_a_loaded_state_replaces_everything_the_run_holds():
    s, sd = _saved()
    sd = {**sd, "nonces": {str(node(0)): 123}, "first_error": "round 1: x", "node_keys": {str(node(1)): ["4", 9]},
          "client_versions": {str(node(1)): "2"}, "accepted": {str(node(1)): 1.0},
          "history": [("1", sd["history"][0][1])], "model": sd["model"].double(), "version": "2", "round": 2.0,
          "generation": 77}
    t = _topk()
    t._returned, t._sync_cache = _model(), {None: ("dense", None)}
    t.load_state_dict(sd)
    st = t.state
    assert t._nonces == {node(0): "123"} and t.first_error == "round 1: x"
    assert t.node_keys == {node(1): (4, 9)}
    assert st.client_versions == {node(1): 2} and st.accepted == {node(1): 1}
    assert list(st.history) == [1] and torch.equal(st.history[1], sd["history"][0][1])
    assert st.history[1] is not sd["history"][0][1]
    assert st.model.dtype == torch.float32 and torch.equal(st.model, sd["model"].float())
    assert (st.version, st.round, st.generation) == (2, 2, "77")
    assert t._returned is None and t._sync_cache == {}
    # a checkpoint written before update_base: the base its delta sync assumed
    old = {k: v for k, v in sd.items() if k != "update_base"}
    t.load_state_dict(old)
    assert t.state.update_base == 1
    t.load_state_dict({**sd, "update_base": 0})  # after a round without an update: not version - 1
    assert t.state.update_base == 0
    # nonces, first_error: optional
    t.load_state_dict({k: v for k, v in sd.items() if k not in ("nonces", "first_error")})
    assert t._nonces == {} and t.first_error is None


def test_current_arrays_is_the_model_held():
    s = _topk()
    with pytest.raises(RuntimeError, match=_exactly("no model yet")):
        s.current_arrays()
    s.initialize(_model())
    assert np.array_equal(s.current_arrays()["w"].numpy(), _model()["w"].numpy())


# ====================================================================== who holds what
def test_resync_clients_sends_every_client_the_dense_model_next():
    s, grid = _topk(), _grid(3)
    arrays, _, _ = _run(s, grid, range(1, 3))
    assert s.sync_for(node(0))[0] == "delta"
    s.resync_clients()
    assert s.state.client_versions == {}
    assert s.sync_for(node(0))[0] == "dense"
    messages, _ = _play(s, grid, 3, arrays)
    assert {n: i.sync_mode for n, i in _instructions(messages).items()} == dict.fromkeys(map(node, range(3)), "dense")
    assert all(i.base_version == -1 for i in _instructions(messages).values())


def test_remap_renames_the_mapped_entries_and_drops_those_whose_id_is_taken():
    entries = {1: "a", 2: "b", 3: "c", 4: "d"}
    assert _remap(entries, {1: 3, 2: 5}) == {3: "a", 5: "b", 4: "d"}
    assert _remap(entries, {}) == entries
    assert _remap(entries, {1: 2, 2: 1}) == {2: "a", 1: "b", 3: "c", 4: "d"}
    assert _remap(entries, {9: 4}) == {1: "a", 2: "b", 3: "c"}


def test_move_clients_moves_versions_accepted_rounds_and_nonces():
    s, grid = _topk(), _grid(3)
    _run(s, grid, range(1, 3))
    st = s.state
    st.client_versions = {1: 1, 2: 2, 3: 0}
    st.accepted = {1: 1, 2: 2, 3: 2}
    s._nonces = {1: "x", 2: "y", 3: "z"}
    s._sync_cache = {None: ("dense", None)}
    s.move_clients({1: 3})
    assert st.client_versions == {3: 1, 2: 2} and st.accepted == {3: 1, 2: 2} and s._nonces == {3: "x", 2: "y"}
    assert s._sync_cache == {}


# ====================================================================== sampling
def _reversed_grid(n: int) -> InProcessGrid:
    """Partition ``n-1-i`` on node ``node(i)``: the order by key is not the order by node id."""
    grid = _grid(n)
    for i, nid in enumerate(grid.node_ids):
        grid.contexts[nid].node_config["partition-id"] = n - 1 - i
    return grid


def test_sample_draws_with_the_seed_from_the_nodes_ordered_by_partition_id():
    grid = _reversed_grid(7)
    s = _topk(fraction_train=0.5, seed=3)
    s.identify(grid)
    assert s.node_keys == {node(i): (6 - i, node(i)) for i in range(7)}
    by_key = [node(6 - p) for p in range(7)]
    for rnd in (1, 2, 5):
        assert s.sample(rnd, grid) == random.Random(3 * 1_000_003 + rnd).sample(by_key, 3)
    s.min_train_nodes = 5
    assert s.sample(4, grid) == random.Random(3 * 1_000_003 + 4).sample(by_key, 5)
    s.fraction_train, s.min_train_nodes = 1.0, 0
    assert s.sample(1, grid) == random.Random(3 * 1_000_003 + 1).sample(by_key, 7)


def test_nodes_without_a_key_are_ordered_after_the_others_by_node_id():
    grid = _reversed_grid(6)
    s = _topk(fraction_train=1.0, seed=0)
    s.identify(grid)
    for nid in (node(1), node(4)):
        del s.node_keys[nid]
        s._keyless.add(nid)  # answered without a partition id: not asked again
    order = [node(5), node(3), node(2), node(0), node(1), node(4)]
    assert sorted(grid.get_node_ids(), key=s._order) == order
    assert s.sample(2, grid) == random.Random(2).sample(order, 6)


def test_sample_waits_for_enough_nodes_and_takes_the_fraction_of_those_connected_then(monkeypatch, caplog):
    grid = _grid(6)
    grid.online = set(grid.node_ids[:2])
    waits = []

    def sleep(seconds):
        waits.append(seconds)
        grid.online |= set(grid.node_ids[:len(grid.online) + 2])

    monkeypatch.setattr(base_module.time, "sleep", sleep)
    s = _topk(fraction_train=0.5, min_available_nodes=6, min_train_nodes=1)
    s.identify(grid)
    with caplog.at_level(logging.INFO, logger="flwr"):
        picked = s.sample(1, grid)
    assert waits == [1, 1]
    assert [r.getMessage() for r in caplog.records if "Waiting" in r.getMessage()] == [
        "Waiting for nodes to connect: 2 connected (minimum required: 6).",
        "Waiting for nodes to connect: 4 connected (minimum required: 6)."]
    assert len(picked) == 3  # half of the 6 connected once the wait is over, not of the 2 before it
    # min_train_nodes above min_available_nodes: waits for min_train_nodes
    grid.online = set(grid.node_ids[:2])
    waits.clear()
    s = _topk(fraction_train=0.1, min_available_nodes=1, min_train_nodes=4)
    assert len(s.sample(1, grid)) == 4 and waits == [1]


def test_nodes_connected_only_after_start_are_identified_by_the_first_sample():
    grid = _recording_grid(3)
    grid.online = set()
    s = _topk()
    s.identify(grid)
    assert grid.calls == [] and s.node_keys == {}
    grid.online = set(grid.node_ids)
    s.sample(1, grid)
    assert len(grid.calls) == 1 and s.node_keys == {node(p): (p, node(p)) for p in range(3)}
    s.sample(2, grid)
    assert len(grid.calls) == 1


# ====================================================================== identify
class _RecordingGrid(InProcessGrid):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.calls = []

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        self.calls.append(([m.metadata.dst_node_id for m in messages], timeout))
        return super().send_and_receive(messages, timeout=timeout)


def _recording_grid(n: int, **kwargs) -> _RecordingGrid:
    folder = scratch_folder()
    return _RecordingGrid(step_app(_step, lambda pid: float(pid + 1)), n, node_config=lambda i: {"state-dir": folder},
                          **kwargs)


def test_identify_asks_each_new_node_once_with_one_small_message():
    grid = _recording_grid(3)
    s = _topk()
    s.identify(grid)
    assert grid.calls == [([node(0), node(1), node(2)], 3600.0)]
    for msg in grid.sent:
        assert msg.metadata.message_type == "train" and list(msg.content.keys()) == [protocol.RECORD]
        instr = Instruction.read(msg.content)
        assert (instr.phase, instr.server_round) == (protocol.PHASE_IDENTIFY, 0)
    assert s.node_keys == {node(p): (p, node(p)) for p in range(3)}
    s.identify(grid)
    assert len(grid.calls) == 1
    grid.node_ids.append(node(3))
    grid.contexts[node(3)] = grid.contexts[node(2)]
    grid.online.add(node(3))
    s._timeout = 12.5
    s.identify(grid)
    assert grid.calls[1] == ([node(3)], 12.5)


def test_a_node_without_a_partition_id_is_not_asked_again():
    grid = _recording_grid(2)
    del grid.contexts[node(1)].node_config["partition-id"]
    s = _topk()
    s._learn_key(node(1), Report(server_round=0))
    s.identify(grid)
    assert grid.calls[0][0] == [node(0)]
    assert node(1) not in s.node_keys
    s.identify(grid)
    assert len(grid.calls) == 1


def _fail_identify(codes):
    """A tamper: the identify replies of the nodes in ``codes`` become error replies (code, as Flower's)."""
    from flwr.app import Error

    def tamper(nid, reply):
        if nid not in codes or protocol.UPDATE in reply.content:
            return reply
        code = codes[nid]
        if code is None:  # a reply without a report
            return Message(RecordDict(), reply_to=_inbound(reply, nid))
        return Message(Error(code=code, reason="r" * 400), reply_to=_inbound(reply, nid))

    return tamper


def _inbound(reply, nid):
    """A stand-in for the message ``reply`` answers, sent to node ``nid``."""
    from flwr.app.metadata import Metadata

    md = Metadata(run_id=reply.metadata.run_id, message_id=reply.metadata.reply_to_message_id, src_node_id=0,
                  dst_node_id=nid, reply_to_message_id="", group_id="", created_at=reply.metadata.created_at,
                  ttl=3600.0, message_type="train")
    return Message(RecordDict(), metadata=md)


def test_identify_names_unavailable_nodes_apart_from_nodes_without_the_mod(caplog):
    from flwr.common.constant import ErrorCode

    codes = {node(1): ErrorCode.NODE_UNAVAILABLE, node(2): ErrorCode.REPLY_MESSAGE_UNAVAILABLE,
             node(3): ErrorCode.MESSAGE_UNAVAILABLE, node(4): 0, node(5): None}
    folder = scratch_folder()
    grid = InProcessGrid(step_app(_step, lambda pid: 1.0), 6, node_config=lambda i: {"state-dir": folder},
                         tamper=_fail_identify(codes))
    s = _topk()
    with caplog.at_level(logging.WARNING, logger="flwr"):
        s.identify(grid)
    lines = [r.getMessage() for r in caplog.records if "identify" in r.getMessage()]
    assert lines == [
        f"3 of 6 nodes were unavailable for fl-sparse's identify message or did not reply in time (node {node(1)}: "
        f"error {ErrorCode.NODE_UNAVAILABLE}: " + "r" * (300 - len(f"error {ErrorCode.NODE_UNAVAILABLE}: ")) + "): "
        "stopped or unreachable SuperNodes (Flower drops them after 2 heartbeat intervals) or a slow ClientApp; "
        "each is asked again by its first train message",
        f"2 of 6 nodes did not answer fl-sparse's identify message (node {node(4)}: error 0: "
        + "r" * (300 - len("error 0: ")) + "). Is SparseMod in their ClientApp's mods? (ClientApp(mods=[SparseMod()]))",
    ]
    assert s.node_keys == {node(0): (0, node(0))} and s._keyless == set()
    caplog.clear()
    s = _topk()
    with caplog.at_level(logging.WARNING, logger="flwr"):
        s.identify(InProcessGrid(grid.client_app, 6, node_config=lambda i: {"state-dir": folder},
                                 tamper=_fail_identify({node(5): None})))
    (line,) = [r.getMessage() for r in caplog.records if "identify" in r.getMessage()]
    assert line == (f"1 of 6 nodes did not answer fl-sparse's identify message (node {node(5)}: reply has no "
                    f"'fl-sparse' ConfigRecord (is SparseMod in the ClientApp's mods?)). Is SparseMod in their ClientApp's mods? (ClientApp(mods=[SparseMod()]))")
    assert len(s.node_keys) == 5


# ====================================================================== node ids that change
def _renumber(grid: InProcessGrid, new_ids: dict[int, int]) -> None:
    """The nodes of ``new_ids`` come back under new ids (a new run or a restarted SuperNode)."""
    grid.node_ids = [new_ids.get(n, n) for n in grid.node_ids]
    grid.contexts = {new_ids.get(n, n): ctx for n, ctx in grid.contexts.items()}
    grid.online = {new_ids.get(n, n) for n in grid.online}
    for nid, ctx in grid.contexts.items():
        ctx.node_id = nid


def test_reidentify_moves_each_clients_state_to_its_new_node_and_waits_for_the_absent():
    s, grid = _topk(fraction_train=1.0), _grid(4)
    s.identify(grid)
    arrays, _, _ = _run(s, grid, range(1, 3))
    versions, accepted = dict(s.state.client_versions), dict(s.state.accepted)
    s._nonces = {node(p): f"n{p}" for p in range(4)}
    # partition 0 keeps its node id, 1 and 2 come back under new ones, 3 is not there yet
    _renumber(grid, {node(1): 5001, node(2): 5002})
    grid.online.discard(node(3))
    s.reidentify(grid)
    assert s.node_keys == {node(0): (0, node(0)), 5001: (1, 5001), 5002: (2, 5002), node(3): (3, node(3))}
    assert s.state.client_versions == {node(0): versions[node(0)], 5001: versions[node(1)],
                                       5002: versions[node(2)], node(3): versions[node(3)]}
    assert s.state.accepted == {node(0): accepted[node(0)], 5001: accepted[node(1)], 5002: accepted[node(2)],
                                node(3): accepted[node(3)]}
    assert s._nonces == {node(0): "n0", 5001: "n1", 5002: "n2", node(3): "n3"}
    assert s._pending_keys == {3: node(3)}
    # partition 3 connects under a new id: its first sample identifies it and it inherits the state
    _renumber(grid, {node(3): 5003})
    grid.online.add(5003)
    messages, arrays = _play(s, grid, 3, arrays)
    instr = _instructions(messages)
    assert {n: i.sync_mode for n, i in instr.items()} == {node(0): "delta", 5001: "delta", 5002: "delta",
                                                         5003: "delta"}
    assert instr[5003].base_version == versions[node(3)] and instr[5003].accepted_round == accepted[node(3)]
    assert s._pending_keys == {} and node(3) not in s.node_keys and s.node_keys[5003] == (3, 5003)
    assert sorted(s.state.client_versions) == [node(0), 5001, 5002, 5003]


def test_two_nodes_claiming_one_partition_id_inherit_nothing_and_are_named(caplog):
    s, grid = _topk(fraction_train=1.0), _grid(4)
    s.identify(grid)
    _run(s, grid, range(1, 3))
    versions = dict(s.state.client_versions)
    _renumber(grid, {node(p): 5000 + p for p in range(4)})
    grid.contexts[5001].node_config["partition-id"] = 0  # 5000 and 5001 both say "partition 0"
    grid.online.discard(5002)
    with caplog.at_level(logging.WARNING, logger="flwr"):
        s.reidentify(grid)
    assert [r.getMessage() for r in caplog.records if "claim" in r.getMessage()] == [
        "nodes [5000, 5001] all claim partition id 0: none inherits its saved state"]
    # partition 0's saved state stays under its old node and waits for nobody; 1 and 2 are not here
    assert s._pending_keys == {1: node(1), 2: node(2)}
    assert s.state.client_versions == {node(0): versions[node(0)], node(1): versions[node(1)],
                                       node(2): versions[node(2)], 5003: versions[node(3)]}
    assert s.node_keys == {5000: (0, 5000), 5001: (0, 5001), 5003: (3, 5003), node(0): (0, node(0)),
                           node(1): (1, node(1)), node(2): (2, node(2))}


def test_a_node_back_under_its_own_id_keeps_its_state_and_nobody_else_takes_it():
    s, grid = _topk(fraction_train=1.0), _grid(3)
    s.identify(grid)
    arrays, _, _ = _run(s, grid, range(1, 2))
    grid.online.discard(node(2))
    grid.node_ids.append(6000)
    grid.contexts[6000] = grid.contexts[node(0)]  # a stranger node that is not yet identified: partition 0
    grid.online.add(6000)
    s.sample(2, grid)
    # partition 2's node is gone: waits for its partition id; partition 0 is claimed by a connected node
    assert s._pending_keys == {2: node(2)} and s.node_keys[6000] == (0, 6000)
    grid.online.add(node(2))
    grid.node_ids.remove(6000)
    grid.online.discard(6000)
    del grid.contexts[6000]
    s._keyless.add(6000)
    s._await_gone_clients(list(grid.get_node_ids()))
    assert s._pending_keys == {}, "back under its own id: nobody else inherits its state"
    assert s.state.client_versions[node(2)] == 0


def test_a_gone_clients_state_waits_for_an_unidentified_node_only_once_one_connects():
    s, grid = _topk(fraction_train=1.0), _grid(3)
    s.identify(grid)
    _run(s, grid, range(1, 2))
    grid.online.discard(node(2))
    s.sample(2, grid)
    assert s._pending_keys == {}, "every connected node is known: nobody to hand partition 2's state to"
    grid.node_ids.append(8000)
    grid.contexts[8000] = grid.contexts[node(1)]
    grid.online.add(8000)
    s._keyless.add(8000)
    s.sample(3, grid)
    assert s._pending_keys == {}, "a node that answered without a partition id is not asked again"
    s._keyless.clear()
    s.sample(4, grid)
    assert s._pending_keys == {2: node(2)} and s.node_keys[8000] == (1, 8000)


def test_await_gone_clients_waits_only_for_unclaimed_partition_ids():
    s = _topk()
    s.node_keys = {1: (0, 1), 2: (1, 2), 3: (2, 3), 4: (-1, 4), 5: (1, 5)}
    s._await_gone_clients([1, 5])
    assert s._pending_keys == {2: 3}  # 2 (partition 1) is claimed by node 5; node 4 has no partition id
    s._pending_keys = {0: 9, 2: 3, 1: 5}
    s.node_keys[9] = (7, 9)
    s._await_gone_clients([1, 3, 5, 9])
    assert s._pending_keys == {0: 9}  # nodes 3 and 5 are back with their own partition ids; 9 holds another
    s._await_gone_clients([1, 3, 5])
    assert s._pending_keys == {0: 9, 7: 9}
    s._pending_keys = {}
    s._await_gone_clients([2, 3, 5, 9])  # partition 0's node is gone
    assert s._pending_keys == {0: 1}


def test_learn_key_hands_a_waiting_clients_state_to_the_node_that_reports_its_partition_id():
    s, grid = _topk(), _grid(3)
    s.identify(grid)
    _run(s, grid, range(1, 2))
    versions = dict(s.state.client_versions)
    s._pending_keys = {2: node(2)}
    s._learn_key(7000, Report(server_round=2, partition_id=2))
    assert s._pending_keys == {} and s.node_keys[7000] == (2, 7000) and node(2) not in s.node_keys
    assert s.state.client_versions[7000] == versions[node(2)] and node(2) not in s.state.client_versions
    # the waiting client's own node reports: it keeps its state, nothing moves
    s._pending_keys = {1: node(1)}
    s._learn_key(node(1), Report(server_round=2, partition_id=1))
    assert s._pending_keys == {} and s.state.client_versions[node(1)] == versions[node(1)]
    # another node already claims the id: the state goes to neither, the client keeps waiting
    s._pending_keys = {0: 4242}
    s.node_keys[4242] = (0, 4242)
    s.state.client_versions[4242] = 0
    s.state.client_versions[7001] = 1
    s._learn_key(7001, Report(server_round=2, partition_id=0))
    assert s._pending_keys == {0: 4242} and s.state.client_versions[4242] == 0 and s.state.client_versions[7001] == 1
    assert s.node_keys[7001] == (0, 7001)
    s._learn_key(7002, Report(server_round=2, partition_id=-1))
    assert 7002 in s._keyless and 7002 not in s.node_keys
    s._learn_key(7003, Report(server_round=2, partition_id=0 + 5))
    assert s.node_keys[7003] == (5, 7003) and 7003 not in s._keyless


# ====================================================================== what each node is sent
def test_partial_participation_sends_each_node_the_sync_its_version_needs():
    """Four nodes, two a round, six rounds: each message's sync mode, base version, accepted round,
    layout and bytes follow from what that node last received; every client checks its model."""
    s, grid = _topk(fraction_train=0.5, seed=5), _grid(4)
    s.identify(grid)
    held: dict[int, int] = {}  # node -> version it trained from (= the round it last trained in - 1)
    arrays = _model()
    seen_modes = set()
    for t in range(1, 7):
        dense_bytes = codec.wire_size(codec.encode_dense(s.state.model)).total_bytes if t > 1 else None
        messages = list(s.configure_train(t, arrays, ConfigRecord({"lr": 0.1}), grid))
        instr = _instructions(messages)
        split = dict.fromkeys(("last_update", "catch_up", "first_contact"), 0)
        total = 0
        for m in messages:
            n, i = m.metadata.dst_node_id, instr[m.metadata.dst_node_id]
            assert set(m.content.keys()) <= {"config", protocol.RECORD, protocol.SYNC}
            assert m.content["config"]["server-round"] == t and m.content["config"]["lr"] == 0.1
            assert i.base_version == held.get(n, -1) and i.accepted_round == (held[n] + 1 if n in held else -1)
            assert i.nonce == s._nonces[n] and re.fullmatch("[0-9a-f]{16}", i.nonce)
            expected = "dense" if n not in held else "delta" if held[n] == t - 2 else None
            if expected:
                assert i.sync_mode == expected, (t, n)
            else:
                assert i.sync_mode in ("set", "dense")
            assert i.layout == (s.state.layout.to_json() if i.sync_mode == "dense" else "")
            sent = codec.wire_size(m.content[protocol.SYNC]).total_bytes
            if i.sync_mode == "set":
                assert sent < dense_bytes
            kind = "first_contact" if n not in held else "last_update" if i.sync_mode == "delta" else "catch_up"
            split[kind] += sent
            total += sent
            seen_modes.add(i.sync_mode)
        assert len({i.nonce for i in instr.values()}) == len(instr) == 2
        assert s.last_downlink_split == split
        metrics = s.state.round_metrics[t]
        assert metrics["round"] == t and metrics["clients"] == 2 and metrics["downlink_bytes"] == total
        assert metrics["sync_modes"] == {mode: [i.sync_mode for i in instr.values()].count(mode)
                                         for mode in {i.sync_mode for i in instr.values()}}
        assert {k: metrics[f"downlink_{k}_bytes"] for k in split} == split
        replies = list(grid.send_and_receive(messages, timeout=60))
        arrays, _ = s.aggregate_train(t, replies)
        assert s.state.round_metrics[t]["failures"] == 0 and s.state.round_metrics[t]["accepted"] == 2
        for n in instr:
            held[n] = t - 1
    assert seen_modes >= {"dense", "delta", "set"}


def test_exact_arrays_ride_along_and_count_as_downlink():
    s = _topk(fraction_train=1.0, exact_arrays=["e"])
    arrays = ArrayRecord({"w": Array(np.ones(SHAPE, np.float32)), "e": Array(np.arange(3, dtype=np.float32))})
    messages = list(s.configure_train(1, arrays, ConfigRecord(), _grid(2)))
    for m in messages:
        assert np.array_equal(m.content[protocol.EXACT]["e"].numpy(), np.arange(3, dtype=np.float32))
    sync = sum(codec.wire_size(m.content[protocol.SYNC]).total_bytes for m in messages)
    exact = len(s.state.exact["e"].data)
    assert s.state.round_metrics[1]["downlink_bytes"] == sync + 2 * exact
    assert s.last_downlink_split == {"last_update": 0, "catch_up": 0, "first_contact": sync + 2 * exact}


def test_the_instruction_carries_the_strategys_settings():
    s = TopKSGD(k=2, fraction_evaluate=0.0, min_available_nodes=1, min_train_nodes=1, arrayrecord_key="arr",
                uplink_values="fp16", uplink_positions="rice", client_error_feedback=False,
                error_memory_dtype="float16", seed=9, diagnostics=True, client_state_dir="/d", client_state_fsync=False)
    arrays = ArrayRecord({"w": Array(np.ones(SHAPE, np.float32))})
    (m,) = s.configure_train(4, arrays, ConfigRecord({"local-steps": 3}), _grid(1))
    i = Instruction.read(m.content)
    from fl_sparse.flat import vector_hash

    assert (i.server_round, i.phase, i.model_version, i.model_hash, i.generation) == (
        4, protocol.PHASE_TRAIN, 0, vector_hash(s.state.model), s.state.generation)
    assert (i.arrays_key, i.uplink_values, i.uplink_positions, i.error_feedback, i.error_memory_dtype) == (
        "arr", "fp16", "rice", False, "float16")
    assert (i.seed, i.diagnostics, i.state_dir, i.state_fsync) == (9, True, "/d", False)
    assert i.uplink == '{"k": 2, "name": "topk"}'
    assert s._local_steps == 3 and s._sent == [m.metadata]
    assert s.instruction(5, phase=protocol.PHASE_TRAIN).server_round == 5


def test_fraction_train_zero_sends_nothing_and_keeps_no_model():
    s = _topk(fraction_train=0.0)
    assert s.configure_train(1, _model(), ConfigRecord(), _grid(2)) == []
    assert s.state.model is None and s.state.round_metrics == {}


class _NoName(SparseFedAvg):
    def uplink_spec(self, server_round, num_clients):
        return {}


def test_prepare_round_starts_the_round_afresh():
    s = _NoName()
    s.initialize(_model())
    s._nonces, s._sent, s._sync_cache = {1: "x"}, [object()], {None: ("dense", None)}
    spec = s.prepare_round(3, 2, ConfigRecord({"local-steps": 5}))
    assert spec == {"name": "none"} and s._nonces == {} and s._sent == [] and s._sync_cache == {}
    assert s._local_steps == 5 and s._round_compressor is not None
    assert s._round_started > 0
    assert base_module._with_defaults({"name": "topk", "k": 1}) == {"name": "topk", "k": 1}
    given = {"k": 1}
    assert base_module._with_defaults(given) == {"k": 1, "name": "none"} and given == {"k": 1}


class _Spec(SparseFedAvg):
    def uplink_spec(self, server_round, num_clients):
        self.asked = (server_round, num_clients)
        return {"name": "topk", "k": server_round}


def test_the_round_spec_comes_from_uplink_spec_with_the_round_and_the_number_of_clients():
    s = _Spec(fraction_evaluate=0.0, min_available_nodes=1, min_train_nodes=1, fraction_train=0.5)
    messages = s.configure_train(2, _model(), ConfigRecord(), _grid(4))
    assert s.asked == (2, 2)
    assert {Instruction.read(m.content).uplink for m in messages} == {'{"k": 2, "name": "topk"}'}
    assert s._round_compressor.k_for(D) == 2


# ====================================================================== sync payloads
def test_sync_payload_for_every_version_a_client_can_hold():
    s, grid = _topk(fraction_train=1.0), _grid(1)
    arrays = _model()
    for t in range(1, 4):
        _, arrays = _play(s, grid, t, arrays)
    st = s.state
    assert (st.version, st.update_base) == (3, 2)
    assert s.sync_payload(3) == ("none", None)
    for have in (None, -1, 4, 7):
        mode, payload = s.sync_payload(have)
        assert mode == "dense" and torch.equal(codec.decode_dense(payload, D), st.model)
    mode, payload = s.sync_payload(2)
    assert mode == "delta" and payload is st.last_update_record
    st.last_update_record = None
    assert s.sync_payload(2)[0] == "set"
    for have in (0, 1, 2):
        mode, payload = s.sync_payload(have)
        assert mode == "set"
        got = codec.decode(payload, D, segments=codec.segments_of(st.layout))
        changed = torch.unique(torch.cat([st.history[v] for v in st.history if v > have]))
        assert torch.equal(got.indices, changed) and torch.equal(got.values, st.model[changed])
    # history from version 2 on: a client at version 0 lacks update 1, which is gone
    del st.history[1]
    assert s.sync_payload(0)[0] == "dense" and s.sync_payload(1)[0] == "set"
    # a catch-up no smaller than the dense model is sent dense
    st.history[3] = torch.arange(D)
    assert s.sync_payload(1)[0] == "dense"


def test_sync_for_caches_one_payload_per_version():
    s, grid = _topk(fraction_train=1.0), _grid(2)
    _run(s, grid, range(1, 3))
    s._sync_cache = {}
    s.state.client_versions = {node(0): 1, node(1): 1, 5: 0}
    first = s.sync_for(node(0))
    assert s.sync_for(node(1)) is first and first[0] == "delta"
    assert s.sync_for(5)[0] == "set" and s.sync_for(77)[0] == "dense"
    assert set(s._sync_cache) == {1, 0, None}


def test_prune_history_keeps_the_newest_updates_that_cover_fewer_than_all_positions():
    s = _topk()
    s.initialize(_model())
    h = s.state.history

    def fill(sizes):
        h.clear()
        for v, n in sizes.items():
            h[v] = torch.arange(n)

    fill({1: 4, 2: 10, 3: 10, 4: 4})  # 4 + 10 + 10 = 24 = numel: still useful
    s._prune_history()
    assert list(h) == [2, 3, 4]
    fill({1: 10, 2: 10, 3: 10, 4: 5})
    s._prune_history()
    assert list(h) == [3, 4]
    fill({1: 3, 2: 3})
    s._prune_history()
    assert list(h) == [1, 2]
    fill({5: 30, 6: 1})
    s._prune_history()
    assert list(h) == [6]


# ====================================================================== the model held
def test_initialize_starts_a_new_run_from_the_arrays():
    s, grid = _bidirectional(), _grid(4)
    _run(s, grid, range(1, 4))
    old_generation, old_error = s.state.generation, s.state.server_error
    s._returned = object()
    s.initialize(_model(9))
    st = s.state
    assert torch.equal(st.model, torch.from_numpy(_model(9)["w"].numpy().reshape(-1)))
    assert (st.version, st.round, st.update_base, st.last_update_record) == (0, 0, -1, None)
    assert re.fullmatch("[0-9a-f]{16}", st.generation) and st.generation != old_generation
    assert st.server_error is not old_error and st.server_error.state_dict() == {"numel": D, "error": None}
    assert len(st.history) == 0 and st.client_versions == {} and st.accepted == {}
    assert s._returned is None
    assert list(st.exact.keys()) == [] and tuple(st.layout.names) == ("w",)


def test_arrays_wider_than_float32_are_named_once():
    arrays = ArrayRecord({f"a{i}": Array(np.full(2, i, np.float64)) for i in range(6)})
    arrays["f"] = Array(np.zeros(2, np.float32))
    s = _topk()
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    FLOWER_LOGGER.addHandler(handler)
    try:
        s.initialize(arrays)
        s2 = _topk()
        s2.initialize(ArrayRecord({"b": Array(np.zeros(2, np.float64)), "g": Array(np.zeros(2, np.float32)),
                                   "h": Array(np.zeros(2, np.float16))}))
        s3 = _topk()
        s3.initialize(ArrayRecord({f"c{i}": Array(np.zeros(2, np.float64)) for i in range(5)}))
        _topk().initialize(_model())
    finally:
        FLOWER_LOGGER.removeHandler(handler)
    lines = [r.getMessage() for r in records if "float64" in r.getMessage()]
    tail = (": fl-sparse keeps, sends and aggregates the model in float32 (about 7 significant digits), so their "
            "values are rounded to float32 and changes below float32's resolution of a weight are lost")
    assert lines == ["arrays 'a0', 'a1', 'a2', 'a3', 'a4' ... are float64" + tail, "arrays 'b' are float64" + tail,
                     "arrays 'c0', 'c1', 'c2', 'c3', 'c4' are float64" + tail]


def test_adopt_keeps_the_run_for_its_own_model_and_starts_anew_otherwise(caplog):
    s, grid = _topk(fraction_train=1.0), _grid(2)
    arrays, _, _ = _run(s, grid, range(1, 3))
    generation = s.state.generation
    s.adopt(arrays)  # what aggregate_train returned
    s.adopt(s.current_arrays())  # equal values
    assert s.state.generation == generation and s.state.version == 2
    changed = s.current_arrays()
    changed["w"] = Array(changed["w"].numpy() + 1)
    with caplog.at_level(logging.WARNING, logger="flwr"):
        s.adopt(changed)
    assert s.state.generation != generation and s.state.version == 0
    assert [r.getMessage() for r in caplog.records if "starting a new run" in r.getMessage()] == [
        "the arrays given for this round are not the model this strategy returned after round 2 (did a wrapper or "
        "the caller change them?): starting a new run from them, so every client gets the dense model and client "
        "and server error memories start empty"]
    caplog.clear()
    fresh = _topk()
    with caplog.at_level(logging.WARNING, logger="flwr"):
        fresh.adopt(_model())
        fresh.adopt(_model(7))  # round 0: nothing was returned yet, no warning
    assert fresh.state.model is not None and not [r for r in caplog.records if "new run" in r.getMessage()]
    assert torch.equal(fresh.state.model, torch.from_numpy(_model(7)["w"].numpy().reshape(-1)))


def test_holds_compares_values_in_each_arrays_own_dtype_and_the_exact_arrays():
    arrays = ArrayRecord({"h": Array(np.linspace(-1, 1, 6).astype(np.float16)),
                          "w": Array(np.linspace(0, 1, 4).astype(np.float32)),
                          "count": Array(np.array([3], np.int64))})
    s = _topk()
    s.initialize(arrays)
    assert s._holds(arrays) and s._holds(s.current_arrays())
    s.state.model = s.state.model + 1e-4  # w_t between float16 steps: handed out rounded
    out = s.current_arrays()
    assert s._holds(out)
    not_w = ArrayRecord(dict(out.items()))
    not_w["w"] = Array(out["w"].numpy() + np.float32(1e-4))
    assert not s._holds(not_w)
    other_count = ArrayRecord(dict(out.items()))
    other_count["count"] = Array(np.array([4], np.int64))
    assert not s._holds(other_count)
    assert not s._holds(ArrayRecord({"h": out["h"], "w": out["w"]}))  # the exact array missing
    assert not s._holds(ArrayRecord({"h": out["h"], "w": Array(np.zeros(5, np.float32)), "count": out["count"]}))
    # float32 arrays only: the value must be w_t itself
    t = _topk()
    t.initialize(_model())
    t.state.model = t.state.model + 1e-3
    assert t._holds(t.current_arrays()) and not t._holds(_model())
    assert np.array_equal(s.current_arrays()["count"].numpy(), [3])


def test_tied_arrays_are_named_and_constant_or_single_ones_are_not(caplog):
    rng = np.random.default_rng(0)
    a = rng.standard_normal((2, 3)).astype(np.float32)
    pairs = {f"p{i}": rng.standard_normal((i + 1, 5)).astype(np.float32) for i in range(6)}
    arrays = {"solo": rng.standard_normal((3, 3)).astype(np.float32), "z1": np.zeros((2, 3), np.float32),
              "a": a, "b": a.copy(), "c": a.reshape(3, 2).copy(), "z2": np.zeros((2, 3), np.float32),
              "s1": np.ones(1, np.float32), "s2": np.ones(1, np.float32),
              "t1": np.array([1.0, 2.0], np.float32), "t2": np.array([1.0, 2.0], np.float32)}
    with caplog.at_level(logging.WARNING, logger="flwr"):
        s = _topk()
        s.initialize(ArrayRecord({k: Array(v) for k, v in arrays.items()}))
    lines = [r.getMessage() for r in caplog.records if "hold the same values" in r.getMessage()]
    assert lines == [
        "arrays 'a' and 'b'; 't1' and 't2' hold the same values: if they are one tensor under two keys (tied weights), fl-sparse "
        "compresses them as two arrays and their copies drift apart; return one key per tensor and tie them again "
        "after loading"]
    caplog.clear()
    many = {}
    for name, v in pairs.items():
        many[name], many[name + "x"] = v, v.copy()
    with caplog.at_level(logging.WARNING, logger="flwr"):
        _topk().initialize(ArrayRecord({k: Array(v) for k, v in many.items()}))
    (line,) = [r.getMessage() for r in caplog.records if "hold the same values" in r.getMessage()]
    assert line.startswith("arrays 'p0' and 'p0x'; 'p1' and 'p1x'; 'p2' and 'p2x'; 'p3' and 'p3x'; 'p4' and 'p4x' hold")
    caplog.clear()
    three = {"x": a, "y": a.copy(), "v": a + 1, "u": (a + 1).copy()}
    with caplog.at_level(logging.WARNING, logger="flwr"):
        _topk().initialize(ArrayRecord({k: Array(v) for k, v in three.items()}))
    (line,) = [r.getMessage() for r in caplog.records if "hold the same values" in r.getMessage()]
    assert line.startswith("arrays 'x' and 'y'; 'v' and 'u' hold")


# ====================================================================== _RoundOffset, with_fedavg_signature
class _Calls(TopKSGD):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.calls = []

    def configure_train(self, server_round, *args, **kwargs):
        self.calls.append(("configure_train", server_round, args, kwargs))
        return "ct"

    def aggregate_train(self, server_round, *args, **kwargs):
        self.calls.append(("aggregate_train", server_round, args, kwargs))
        return "at"

    def configure_evaluate(self, server_round, *args, **kwargs):
        self.calls.append(("configure_evaluate", server_round, args, kwargs))
        return "ce"

    def aggregate_evaluate(self, server_round, *args, **kwargs):
        self.calls.append(("aggregate_evaluate", server_round, args, kwargs))
        return "ae"


def test_the_round_offset_view_adds_the_offset_and_forwards_everything_else():
    s = _Calls(k=2, seed=8)
    view = _RoundOffset(s, 3)
    assert view.__class__ is _Calls and isinstance(view, TopKSGD) and view.seed == 8 and view.uplink is s.uplink
    assert view.configure_train(1, "a", grid="g") == "ct"
    assert view.aggregate_train(2, "r", x=1) == "at"
    assert view.configure_evaluate(1, "a", "c", grid="g") == "ce"
    assert view.aggregate_evaluate(5, "q", replies="r") == "ae"
    assert s.calls == [("configure_train", 4, ("a",), {"grid": "g"}), ("aggregate_train", 5, ("r",), {"x": 1}),
                       ("configure_evaluate", 4, ("a", "c"), {"grid": "g"}),
                       ("aggregate_evaluate", 8, ("q",), {"replies": "r"})]
    assert _RoundOffset(s, 0).configure_train(1) == "ct" and s.calls[-1][1] == 1


def test_with_fedavg_signature_writes_out_fedavgs_and_the_bases_parameters():
    @with_fedavg_signature
    class Mine(SparseFedAvg):
        """Mine's doc."""

        fixed_options = {"seed": "my_seed= (the seed)"}

        def __init__(self, *args, my_seed: int = 1, uplink_values: str = "fp16", **kwargs):
            super().__init__(*args, uplink={"name": "topk", "k": 2}, downlink=None, seed=my_seed,
                             uplink_values=uplink_values, **kwargs)

    base = inspect.signature(SparseFedAvg.__init__).parameters
    params = list(inspect.signature(Mine).parameters.values())
    fedavg = ["fraction_train", "fraction_evaluate", "min_train_nodes", "min_evaluate_nodes", "min_available_nodes",
              "weighted_by_key", "arrayrecord_key", "configrecord_key", "train_metrics_aggr_fn",
              "evaluate_metrics_aggr_fn"]
    assert [p.name for p in params[:10]] == fedavg and all(p == base[p.name] for p in params[:10])
    keyword = [p.name for p in params[10:]]
    assert keyword[:2] == ["my_seed", "uplink_values"] and params[11].default == "fp16"
    assert keyword[2:] == [n for n, p in base.items() if p.kind is inspect.Parameter.KEYWORD_ONLY
                           and n not in ("uplink", "downlink", "seed", "uplink_values")]
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in params[10:])
    assert Mine.__init__.__name__ == "__init__" and Mine.__init__.__doc__ is None
    assert Mine.__init__.__qualname__.endswith("Mine.__init__")
    m = Mine(0.5, 0.0, uplink_values="q8", my_seed=4, min_available_nodes=1)
    assert (m.fraction_train, m.fraction_evaluate, m.seed, m.uplink_values, m.min_available_nodes) == (
        0.5, 0.0, 4, "q8", 1)
    for kwargs, message in (({"seed": 3}, "Mine sets seed itself: use my_seed= (the seed)"),
                            ({"downlink": None}, "Mine sets downlink itself: use the strategy's own arguments"),
                            ({"uplink": {}, "downlink": None}, "Mine sets uplink itself: use the strategy's own arguments")):
        with pytest.raises(TypeError, match=_exactly(message)):
            Mine(**kwargs)

    @with_fedavg_signature
    class OwnDownlink(SparseFedAvg):
        def __init__(self, *args, downlink=None, **kwargs):
            super().__init__(*args, downlink=downlink, **kwargs)

    down = TopK(k=1)
    assert OwnDownlink(downlink=down).downlink is down
    names = list(inspect.signature(OwnDownlink).parameters)
    assert names.count("downlink") == 1 and "uplink" not in names
    assert names[10] == "downlink"


def test_a_loaded_state_owns_its_tensors_and_keeps_the_exact_arrays():
    arrays = ArrayRecord({"w": Array(np.linspace(0, 1, 6).astype(np.float32)), "count": Array(np.array([3], np.int64)),
                          "e": Array(np.array([1.5, 2.5], np.float32))})
    s = _topk(exact_arrays=["e"])
    s.initialize(arrays)
    s.state.history[1] = torch.tensor([0, 2])
    s.state.round_metrics[1] = {"clients": 2}
    sd = s.state_dict()
    t = _topk(exact_arrays=["e"])
    t.load_state_dict(sd)
    out = t.current_arrays()
    assert list(out.keys()) == list(arrays.keys())
    for name in arrays:
        assert np.array_equal(out[name].numpy(), arrays[name].numpy()) and out[name].dtype == arrays[name].dtype
    assert t._holds(arrays) and t.state.layout.exact_names == s.state.layout.exact_names
    sd["model"].add_(1.0)
    sd["history"][0][1].add_(1)
    sd["round_metrics"][1]["clients"] = 5
    assert torch.equal(t.state.model, s.state.model) and t.state.history[1].tolist() == [0, 2]
    assert t.state.round_metrics[1] == {"clients": 2}


def test_configure_train_logs_the_round_and_per_node_fields_reach_each_instruction(caplog):
    s, grid = _topk(fraction_train=1.0), _grid(2)
    with caplog.at_level(logging.INFO, logger="flwr"):
        messages = s.configure_train(1, _model(), ConfigRecord(), grid)
    sent = sum(codec.wire_size(m.content[protocol.SYNC]).total_bytes for m in messages)
    assert [r.getMessage() for r in caplog.records if r.getMessage().startswith("configure_train")] == [
        f"configure_train: 2 clients, downlink {sent} B, sync {{'dense': 2}}"]
    instr = s.instruction(1, phase=protocol.PHASE_TRAIN)
    messages, modes, total = s.messages_with_sync([node(1), node(0)], ConfigRecord(), instr,
                                                  per_node=lambda n: {"mask_round": n - 990})
    assert [Instruction.read(m.content).mask_round for m in messages] == [node(1) - 990, node(0) - 990]
    assert [m.metadata.dst_node_id for m in messages] == [node(1), node(0)]
    assert modes == {"dense": 2} and total == sent


def test_adopt_after_round_one_names_round_one(caplog):
    s, grid = _topk(fraction_train=1.0), _grid(1)
    _run(s, grid, range(1, 2))
    with caplog.at_level(logging.WARNING, logger="flwr"):
        s.adopt(_model(3))
    assert any(r.getMessage().startswith("the arrays given for this round are not the model this strategy returned "
                                         "after round 1 ") for r in caplog.records)


def test_a_catch_up_is_encoded_with_the_downlink_positions_and_the_layouts_segments():
    arrays = ArrayRecord({"a": Array(np.linspace(0, 1, 1000).astype(np.float32)),
                          "b": Array(np.linspace(1, 2, 24).astype(np.float32))})
    s = _topk(downlink_positions="rice")
    s.initialize(arrays)
    st = s.state
    st.version, st.update_base = 3, 2
    st.history.update({1: torch.tensor([1001, 1003]), 2: torch.tensor([1004, 1007]), 3: torch.tensor([1015, 1010])})
    mode, record = s.sync_payload(0)
    from fl_sparse.sparse import SparseTensor

    positions = torch.tensor([1001, 1003, 1004, 1007, 1010, 1015])
    sparse = SparseTensor(positions, st.model[positions], 1024)
    expected = codec.encode(sparse, values="fp32", positions="rice", segments=(1000, 24))
    plain = codec.encode(sparse, values="fp32", positions="rice")  # the segmented code is shorter here
    assert codec.wire_size(expected).total_bytes < codec.wire_size(plain).total_bytes
    assert mode == "set" and list(record.keys()) == list(expected.keys())
    for key in expected:
        assert record[key].data == expected[key].data


def test_a_fresh_strategy_asks_nothing_and_builds_messages_before_any_round():
    grid = _recording_grid(2)
    s = _topk(fraction_train=1.0)
    assert sorted(s.sample(1, grid)) == [node(0), node(1)]
    assert grid.calls == [], "nodes connected: no identify message outside start()"
    s.initialize(_model())
    assert s.sync_for(node(0))[0] == "dense"
    messages, modes, _ = s.messages_with_sync([node(0)], ConfigRecord(), s.instruction(1, phase=protocol.PHASE_TRAIN))
    assert modes == {"dense": 1} and s._sent == [messages[0].metadata]
