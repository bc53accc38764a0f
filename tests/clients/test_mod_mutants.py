"""Tests that kill mutmut survivors of the mod's pure steps (fl_sparse/clients/mod.py).

mutmut ran on ``apply_sync``, ``restore_unaccepted``, ``_remember_sent``, ``client_generator_seed``,
``node_int``, ``client_key``, ``_partition_id``, ``_random_stream``, ``_memory`` and ``_stored_vote``
with the client tests (docs/testing.md, "The client mod's steps"); these pin what those survivors
showed untested: the seed contract that keeps earlier runs reproducible, partition 0's own random
stream, a segmented sync payload, what a refused values sync says, the pending update forgotten
once restored, and the pending values kept in float32.
"""

from __future__ import annotations

import pytest
import torch
from flwr.app import Context, RecordDict
from hypothesis import given, settings
from hypothesis import strategies as st

from fl_sparse import codec, protocol
from fl_sparse.clients import mod
from fl_sparse.clients.mod import SyncError, apply_sync, client_generator_seed, node_int, restore_unaccepted
from fl_sparse.clients.state import ClientState
from fl_sparse.protocol import Instruction
from fl_sparse.sparse import SparseTensor

LINEAR = mod._LINEAR_SEED_CLIENTS


# ------------------------------------------------------------------ client_generator_seed
@settings(max_examples=200, deadline=None)
@given(seed=st.integers(0, 2**63 - 1), server_round=st.integers(0, 10**6), pid=st.integers(0, LINEAR - 1))
def test_partitions_below_the_limit_keep_the_linear_seed(seed, server_round, pid):
    """The seeds every run so far used (RESULTS.md's too): changing them changes every seeded result."""
    expected = ((seed * 1_000_003 + server_round) * LINEAR + pid) % (1 << 63)
    assert client_generator_seed(seed, server_round, pid) == expected


@settings(max_examples=200, deadline=None)
@given(seed=st.integers(0, 2**64), server_round=st.integers(0, 10**6), pid=st.integers(-(2**40), 2**40))
def test_every_seed_is_within_manual_seeds_range(seed, server_round, pid):
    value = client_generator_seed(seed, server_round, pid)
    assert 0 <= value < 1 << 63
    torch.Generator().manual_seed(value)  # accepted


def test_ids_at_or_above_the_limit_are_hashed_and_distinct():
    """Hashed from the limit on (and for negative ids, i.e. node ids), where the linear form would collide
    with the next round's partition 0; distinct over rounds and ids, and stable."""
    linear = lambda s, t, p: ((s * 1_000_003 + t) * LINEAR + p) % (1 << 63)  # noqa: E731
    assert client_generator_seed(7, 3, LINEAR) != linear(7, 3, LINEAR)  # == linear(7, 4, 0): a collision
    assert client_generator_seed(7, 3, LINEAR - 1) == linear(7, 3, LINEAR - 1)
    seeds = {client_generator_seed(7, t, p) for t in range(20) for p in [-5, -1, LINEAR, LINEAR + 1, 10**9]}
    assert len(seeds) == 20 * 5
    assert client_generator_seed(7, 3, 10**9) == client_generator_seed(7, 3, 10**9)


def test_partition_zero_is_linear_not_hashed():
    assert client_generator_seed(5, 2, 0) == (5 * 1_000_003 + 2) * LINEAR


# ------------------------------------------------------------------ whose random stream
def _context(node_config: dict, node_id: int = 4242) -> Context:
    return Context(run_id=1, node_id=node_id, node_config=node_config, state=RecordDict(), run_config={})


def test_partition_zero_draws_from_its_partition_not_its_node_id():
    assert mod._random_stream(_context({"partition-id": 0})) == 0
    assert mod._random_stream(_context({"partition-id": 1})) == 1
    assert mod._random_stream(_context({})) == 4242


def test_a_non_integer_node_config_value_is_called_that():
    with pytest.raises(ValueError, match=r"partition-id='x' is not an integer"):
        node_int(_context({"partition-id": "x"}), "partition-id")


# ------------------------------------------------------------------ apply_sync
SEGMENTS = (1000, 10, 1000, 10)
NUMEL = sum(SEGMENTS)


def _segmented_record(indices: list[int]) -> tuple[object, SparseTensor]:
    """A sync payload the rice code sends segmented (clustered in the first layer): it needs the layout."""
    sparse = SparseTensor(torch.tensor(indices, dtype=torch.int64), torch.linspace(-1.0, 1.0, len(indices)), NUMEL)
    record = codec.encode(sparse, "fp32", "rice", segments=SEGMENTS)
    with pytest.raises(codec.PayloadError, match="segmented"):  # the premise: decoding needs the segments
        codec.decode(record, NUMEL)
    return record, sparse


@pytest.mark.parametrize("mode", ["delta", "set"])
def test_a_segmented_sync_is_decoded_with_the_layouts_segments(mode):
    record, sparse = _segmented_record(list(range(60)) + [1015, 1500, 2012])
    model = torch.randn(NUMEL, generator=torch.Generator().manual_seed(0))
    state = ClientState(model=model.clone(), model_version=4)
    instr = Instruction(server_round=5, sync_mode=mode, base_version=4, model_version=5)
    apply_sync(state, instr, RecordDict({protocol.SYNC: record}), NUMEL, segments=SEGMENTS)
    expected = model.clone()
    if mode == "delta":
        expected[sparse.indices] -= sparse.values
    else:
        expected[sparse.indices] = sparse.values
    assert torch.equal(state.model, expected) and state.model_version == 5


def test_a_values_sync_on_another_mask_says_which_round_the_client_holds():
    instr = Instruction(server_round=8, phase=protocol.PHASE_TRAIN, sync_mode="values", base_version=4,
                        model_version=5, mask_round=7)
    content = RecordDict({protocol.SYNC: codec.encode(SparseTensor(torch.arange(3), torch.ones(3), NUMEL))})
    state = ClientState(model=torch.zeros(NUMEL), model_version=4)
    with pytest.raises(SyncError, match=r"mask of round 7, client holds round -1$"):
        apply_sync(state, instr, content, NUMEL)
    state.extra[mod._MASK] = torch.arange(3)
    state.extra[mod._MASK_ROUND] = torch.tensor(6)
    with pytest.raises(SyncError, match=r"mask of round 7, client holds round 6$"):
        apply_sync(state, instr, content, NUMEL)


# ------------------------------------------------------------------ the pending update
def _pending(state: ClientState, server_round: int, values: torch.Tensor) -> None:
    mod._remember_sent(state, SparseTensor(torch.tensor([1, 3]), values, 5), server_round)


def test_a_restored_update_is_forgotten():
    """Put back once: a second message of the same round must not add it to the error again."""
    state = ClientState(error=torch.zeros(5))
    _pending(state, 2, torch.tensor([0.5, -1.0]))
    instr = Instruction(server_round=3, accepted_round=1)  # round 2's update was not accepted
    assert restore_unaccepted(state, instr) is False
    assert torch.equal(state.error, torch.tensor([0.0, 0.5, 0.0, -1.0, 0.0]))
    assert not {mod._PENDING_INDICES, mod._PENDING_VALUES, mod._PENDING_ROUND} & state.extra.keys()
    restore_unaccepted(state, instr)
    assert torch.equal(state.error, torch.tensor([0.0, 0.5, 0.0, -1.0, 0.0]))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_the_pending_values_are_kept_in_float32(dtype):
    """The error memory is float32: the values put back into it are kept as float32 (the state file's
    header names each tensor's dtype, and index_add needs the error's own)."""
    state = ClientState(error=torch.zeros(5))
    _pending(state, 2, torch.tensor([0.5, -1.0], dtype=dtype))
    assert state.extra[mod._PENDING_VALUES].dtype == torch.float32
    assert restore_unaccepted(state, Instruction(server_round=3, accepted_round=1)) is False
    assert torch.equal(state.error, torch.tensor([0.0, 0.5, 0.0, -1.0, 0.0]))


def test_the_hashed_seed_is_xxh3_of_the_ids_in_63_bits():
    """The contract of ids from the limit on (and node ids): XXH3-64 of ``fl-sparse/seed/round/id``,
    its top 63 bits. Pinned like the linear form: a run with 10,007+ clients reproduces across versions."""
    import xxhash

    for seed, server_round, pid in [(0, 1, LINEAR), (3, 7, -2), (2**40, 99, 10**6)]:
        digest = xxhash.xxh3_64_intdigest(f"fl-sparse/{seed}/{server_round}/{pid}".encode())
        assert client_generator_seed(seed, server_round, pid) == digest >> 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_pending_update_sent_from_a_gpu_is_kept_on_the_host():
    """The state file holds host tensors: indices and float32 values moved off the device."""
    state = ClientState(error=torch.zeros(5))
    for dtype in (torch.float32, torch.float16):
        mod._remember_sent(state, SparseTensor(torch.tensor([1, 3], device="cuda"),
                                               torch.tensor([0.5, -1.0], device="cuda", dtype=dtype), 5), 2)
        assert state.extra[mod._PENDING_INDICES].device.type == "cpu"
        values = state.extra[mod._PENDING_VALUES]
        assert values.device.type == "cpu" and values.dtype == torch.float32
