"""Per-round behaviour of the named strategies (no simulation needed)."""

from __future__ import annotations

import math

import pytest
import torch
from flwr.app import Array, ArrayRecord

from fl_sparse.compressors import TopK, adaptive_k_rounds, build_compressor
from fl_sparse.strategies import (
    AdaptiveTopKSGD,
    BidirectionalTopKSGD,
    HardThresholdSGD,
    RTopKSGD,
    TopKSGD,
    build_strategy,
)

NUMEL = 20_000


def _init(strategy):
    strategy.initialize(ArrayRecord({"w": Array(torch.zeros(NUMEL).numpy())}))
    return strategy


@pytest.mark.parametrize("t_hat", [0, 3, 6, 10])
def test_adaptive_topk_follows_the_paper_schedule_and_spends_exactly_the_budget(t_hat):
    T, ratio = 10, 0.01
    strategy = _init(AdaptiveTopKSGD(ratio=ratio, num_rounds=T, gamma=0.5, t_hat=t_hat))
    k = TopK(ratio=ratio).k_for(NUMEL)
    ks = [strategy.prepare_round(t, num_clients=4)["k"] for t in range(1, T + 1)]
    assert ks == adaptive_k_rounds(T, k, 0.5, t_hat)
    assert sum(ks) == T * k
    if 0 < t_hat < T - 1:
        assert ks[0] > k and ks[-1] > k and min(ks) < k  # more early and late, less in between


def test_adaptive_topk_estimates_t_hat_after_round_one():
    T = 50
    strategy = _init(AdaptiveTopKSGD(ratio=0.01, num_rounds=T, lr=0.1, mu=0.05, L=1.0, sigma_sq=0.5))
    first = strategy.prepare_round(1, num_clients=2)["k"]
    assert first > TopK(ratio=0.01).k_for(NUMEL)  # round 1 is in the early, high phase
    strategy.state.round_metrics[1] = {"round": 1, "train_loss": 2.3}
    strategy.prepare_round(2, num_clients=2)
    assert isinstance(strategy.t_hat, int) and 0 <= strategy.t_hat <= T
    assert strategy.state.round_metrics[2]["t_hat"] == strategy.t_hat


def test_adaptive_without_error_compensation_tells_clients_to_drop_the_error():
    assert AdaptiveTopKSGD(num_rounds=5, error_feedback=False).client_error_feedback is False
    assert build_strategy("adaptive-topk-no-ec", ratio=0.01, num_rounds=5).client_error_feedback is False
    assert build_strategy("adaptive-topk", ratio=0.01, num_rounds=5).client_error_feedback is True


def test_rtopk_uses_k_over_r_equal_one_over_n():
    strategy = _init(RTopKSGD(ratio=0.01))
    spec = strategy.prepare_round(1, num_clients=7)
    assert spec["n_workers"] == 7
    compressor = build_compressor(**spec)
    x = torch.randn(NUMEL)
    out = compressor(x, generator=torch.Generator().manual_seed(0))
    k = TopK(ratio=0.01).k_for(NUMEL)
    top_r = set(torch.topk(x.abs(), 7 * k).indices.tolist())
    assert out.nnz == k and set(out.indices.tolist()) <= top_r


def test_hard_threshold_default_lambda_is_the_papers_rule():
    strategy = _init(HardThresholdSGD(ratio=0.001))
    spec = strategy.prepare_round(1, num_clients=2)
    k = TopK(ratio=0.001).k_for(NUMEL)
    assert spec["lam"] == pytest.approx(1 / (2 * math.sqrt(k)))
    fixed = _init(HardThresholdSGD(threshold=0.3))
    assert fixed.prepare_round(1, num_clients=2)["lam"] == 0.3
    with pytest.raises(ValueError):
        HardThresholdSGD(threshold=-1.0)


def test_build_strategy_maps_names_and_wire_codes():
    s = build_strategy("bidirectional-topk", ratio=0.01, downlink_ratio=0.002, value_bits=4, positions="rice")
    assert isinstance(s, BidirectionalTopKSGD)
    assert s.uplink_values == s.downlink_values == "q4" and s.uplink_positions == "rice"
    assert s.downlink.k_for(1000) == 2
    assert isinstance(build_strategy("topk", ratio=0.01), TopKSGD)
    with pytest.raises(ValueError, match="unknown strategy"):
        build_strategy("gossip", ratio=0.01)
    with pytest.raises(ValueError, match="ratio"):
        build_strategy("topk", ratio=0.0)
