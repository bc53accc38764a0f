"""SparseFedAvg's server side, driven with real Flower Messages (no simulation).

Bad replies -- malformed payloads, NaN, out-of-range indices, wrong sizes,
missing records, a client on the wrong model -- must be rejected one by one
without touching the global model or the other clients' updates.
"""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.app.metadata import Metadata

from fl_sparse import codec
from fl_sparse.compressors import TopK
from fl_sparse.flat import vector_hash
from fl_sparse.sparse import SparseTensor
from fl_sparse.strategies import BidirectionalTopKSGD, TopKSGD

NUMEL = 1000


def _arrays() -> ArrayRecord:
    gen = torch.Generator().manual_seed(0)
    return ArrayRecord({"w": Array(torch.randn(NUMEL, generator=gen).numpy())})


def _wire(a: np.ndarray) -> Array:
    """An array in the codec's raw little-endian wire form."""
    return Array(dtype=str(a.dtype), shape=tuple(a.shape), stype=codec.STYPE, data=a.tobytes())


def _read(record: ArrayRecord, key: str, dtype) -> np.ndarray:
    return np.frombuffer(record[key].data, dtype=dtype).copy()


def _reply(node: int, content: RecordDict) -> Message:
    meta = Metadata(
        run_id=1,
        message_id=f"m{node}",
        src_node_id=node,
        dst_node_id=0,
        reply_to_message_id=f"q{node}",
        group_id="1",
        created_at=time.time(),
        ttl=60.0,
        message_type="train",
    )
    return Message(content=content, metadata=meta)


def _content(update: ArrayRecord, model_hash: str, **metric_overrides) -> RecordDict:
    metrics = {
        "num-examples": 10,
        "train-loss": 1.0,
        "uplink-bytes": 100,
        "density": 0.01,
        "error-norm": 0.5,
        "compression-error": 0.25,
    }
    metrics.update(metric_overrides)
    return RecordDict(
        {
            "update": update,
            "metrics": MetricRecord(metrics),
            "client": ConfigRecord({"model-hash": model_hash, "model-version": 0}),
        }
    )


def _strategy(cls=TopKSGD, **kw):
    strategy = cls(ratio=0.01, **kw)
    strategy.initialize(_arrays())
    strategy.prepare_round(1, num_clients=10)
    return strategy


def _valid_update(seed: int) -> SparseTensor:
    gen = torch.Generator().manual_seed(seed)
    return TopK(ratio=0.01)(torch.randn(NUMEL, generator=gen))


def test_bad_replies_are_dropped_and_the_good_one_is_applied_exactly():
    strategy = _strategy()
    w0 = strategy.state.model.clone()
    h = vector_hash(w0)
    good = _valid_update(1)
    good_record = codec.encode(good, positions="rice")

    nan = SparseTensor(good.indices, good.values.clone(), NUMEL)
    nan.values[3] = float("nan")
    nan_record = codec.encode(nan.with_values(torch.zeros_like(nan.values)))
    nan_record["values"] = _wire(nan.values.numpy())  # smuggle NaN past the encoder

    out_of_range = codec.encode(good)
    raw = _read(out_of_range, "positions", np.int32)
    raw[-1] = NUMEL + 5
    out_of_range["positions"] = _wire(raw)

    truncated = codec.encode(good, positions="rice")
    stream = _read(truncated, "positions", np.uint8)
    truncated["positions"] = _wire(stream[: len(stream) // 2])

    too_dense = codec.encode(TopK(ratio=0.5)(torch.randn(NUMEL)))  # declares 500 > k = 10 entries

    replies = [
        _reply(1, _content(good_record, h)),
        _reply(2, _content(nan_record, h)),
        _reply(3, _content(out_of_range, h)),
        _reply(4, _content(truncated, h)),
        _reply(5, _content(too_dense, h)),
        _reply(6, _content(codec.encode(good), "not-the-servers-model")),
        _reply(7, _content(codec.encode(good), h, **{"num-examples": float("nan")})),
        _reply(8, RecordDict({"metrics": MetricRecord({"num-examples": 3})})),
        _reply(9, _content(codec.encode(good), h, **{"error-norm": -1.0})),
        _reply(10, _content(codec.encode(good), h, **{"train-loss": float("inf")})),
    ]
    arrays, metrics = strategy.aggregate_train(1, replies)

    assert arrays is not None
    torch.testing.assert_close(strategy.state.model, w0 - good.to_dense(), rtol=0, atol=0)
    rm = strategy.state.round_metrics[1]
    assert rm["accepted"] == 1 and rm["failures"] == 9
    # Bits per parameter per local step, from the one accepted payload (H = 1 here).
    assert rm["q_loc_up"] == codec.wire_size(good_record).position_bits / NUMEL
    assert rm["q_val_up"] == 32 * good.nnz / NUMEL
    assert rm["uplink_bytes"] == codec.wire_size(good_record).total_bytes
    # Rejected clients are re-synced densely next time; the good one is not.
    assert set(strategy.state.client_versions) == {1}
    assert strategy.state.accepted == {1: 1}
    assert np.isfinite(strategy.state.model.numpy()).all()


def test_no_valid_reply_leaves_the_global_model_untouched():
    strategy = _strategy()
    w0 = strategy.state.model.clone()
    broken = codec.encode(_valid_update(2))
    broken["header"] = _wire(np.array([1, 2, 3], dtype=np.int64))
    arrays, _ = strategy.aggregate_train(1, [_reply(1, _content(broken, vector_hash(w0)))])
    assert arrays is None
    assert torch.equal(strategy.state.model, w0)
    assert strategy.state.version == 0


def test_bidirectional_server_error_feedback_invariant():
    """δ_t + Top_K(g_t + δ_{t-1}) == g_t + δ_{t-1}: nothing the server drops is lost."""
    strategy = _strategy(BidirectionalTopKSGD, downlink_ratio=0.005)
    w0 = strategy.state.model.clone()
    h = vector_hash(w0)
    ups = [_valid_update(s) for s in (10, 11, 12)]
    replies = [_reply(i + 1, _content(codec.encode(u), h)) for i, u in enumerate(ups)]
    strategy.aggregate_train(1, replies)
    g = sum(u.to_dense() for u in ups) / 3
    sent = w0 - strategy.state.model
    assert int((sent != 0).sum()) <= 5  # downlink K = 0.5 % of 1000
    torch.testing.assert_close(sent + strategy.state.server_error.error, g, rtol=0, atol=1e-6)


@pytest.mark.parametrize("have", [None, -1, 0, 1, 2])
def test_catch_up_payload_brings_any_version_to_the_servers_model(have):
    strategy = _strategy()
    snapshots = {0: strategy.state.model.clone()}
    for t in (1, 2, 3):
        strategy.prepare_round(t, num_clients=1)
        h = vector_hash(strategy.state.model)
        strategy.aggregate_train(t, [_reply(1, _content(codec.encode(_valid_update(20 + t)), h))])
        snapshots[t] = strategy.state.model.clone()
    mode, payload = strategy.sync_payload(have)
    client = None if have in (None, -1) else snapshots[have].clone()
    if mode == "dense":
        client = codec.decode_dense(payload, NUMEL)
    elif mode == "delta":
        codec.decode(payload, NUMEL).add_(client, alpha=-1.0)
    elif mode == "set":
        s = codec.decode(payload, NUMEL)
        client[s.indices] = s.values
    assert vector_hash(client) == vector_hash(strategy.state.model)
    expected = {None: "dense", -1: "dense", 2: "delta"}.get(have, "set")
    assert mode == expected


def test_bad_config_is_refused_at_construction():
    with pytest.raises(ValueError, match="value code"):
        TopKSGD(ratio=0.01, uplink_values="q99")
    with pytest.raises(ValueError, match="position code"):
        TopKSGD(ratio=0.01, uplink_positions="zip")
    with pytest.raises(ValueError):
        TopKSGD(ratio=1.5)
    with pytest.raises(ValueError, match="fraction_train"):
        TopKSGD(ratio=0.01, fraction_train=0.0)
