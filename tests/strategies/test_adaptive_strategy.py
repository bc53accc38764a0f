"""AdapTop-K at the strategy level: the budget T·k holds whatever t̂ turns out to be.

The strategy sizes round 1 before it can estimate t̂ (the paper's formula
needs F(w_0), the round-1 loss) and re-plans afterwards. Driven through
``uplink_spec`` with the round-1 loss set as the aggregation would set it,
for any model size, ratio, T, γ and loss, the uplink budgets of the T rounds
add up to exactly T·k (an earlier version spent 1,200 instead of 1,000 at
d = 20,000, ratio 0.01, T = 5).
"""

from __future__ import annotations


import torch
from flwr.app import ArrayRecord
from hypothesis import given, settings
from hypothesis import strategies as st

from fl_sparse.compressors import TopK, adaptive_k_schedule, adaptive_k_t_hat
from fl_sparse.strategies import AdaptiveTopKSGD


def _budgets(d: int, ratio: float, T: int, gamma: float, f0: float, error_feedback: bool = True, t_hat=None):
    strategy = AdaptiveTopKSGD(
        ratio=ratio, num_rounds=T, gamma=gamma, t_hat=t_hat, error_feedback=error_feedback,
        min_available_nodes=1, min_train_nodes=1, fraction_evaluate=0.0,
    )
    strategy.initialize(ArrayRecord({"w": torch.zeros(d)}))
    ks = []
    for t in range(1, T + 1):
        ks.append(strategy.uplink_spec(t, num_clients=3)["k"])
        if t == 1:  # what aggregate_train records after round 1: the clients' mean training loss
            strategy.state.round_metrics[1] = {"round": 1, "train_loss": f0}
    return strategy, ks


@settings(max_examples=200, deadline=None)
@given(
    d=st.integers(100, 100_000),
    ratio=st.floats(1e-3, 0.5),
    T=st.integers(1, 40),
    gamma=st.floats(0.0, 1.0),
    f0=st.floats(1e-3, 1e3),
    error_feedback=st.booleans(),
)
def test_estimated_t_hat_spends_exactly_the_budget(d, ratio, T, gamma, f0, error_feedback):
    strategy, ks = _budgets(d, ratio, T, gamma, f0, error_feedback)
    k = TopK(ratio=ratio).k_for(d)
    assert sum(ks) == T * k
    assert all(1 <= k_t <= d for k_t in ks)
    if T > 1:  # t̂ was estimated from the round-1 loss with the paper's formula and the EC flag
        expected = adaptive_k_t_hat(
            d=d, k=k, f0=f0, T=T, error_compensation=error_feedback, **strategy.estimate
        )
        assert strategy.t_hat == expected


def test_the_reported_overspend_case():
    """d = 20,000, ratio 0.01, T = 5 and a round-1 loss that makes t̂ = 0: 1,000 entries, not 1,200."""
    k = TopK(ratio=0.01).k_for(20_000)
    strategy, ks = _budgets(20_000, 0.01, 5, 0.5, f0=1e-6)
    assert strategy.t_hat == 0
    assert ks[0] == adaptive_k_schedule(0, 5, k, 0.5, 5)  # round 1: the early high phase
    assert sum(ks) == 5 * k == 1000


@settings(max_examples=50, deadline=None)
@given(d=st.integers(1_000, 50_000), T=st.integers(2, 30), gamma=st.floats(0.0, 0.9), t_hat=st.integers(0, 30))
def test_given_t_hat_is_the_papers_schedule(d, T, gamma, t_hat):
    """With t̂ given, nothing is re-planned: k_t is the paper's schedule, round by round."""
    t_hat = min(t_hat, T)
    k = TopK(ratio=0.01).k_for(d)
    _, ks = _budgets(d, 0.01, T, gamma, f0=1.0, t_hat=t_hat)
    schedule = [adaptive_k_schedule(t, T, k, gamma, t_hat) for t in range(T)]
    if all(1 <= s <= d for s in schedule):
        assert ks == schedule
    assert sum(ks) == T * k


def test_a_refused_state_leaves_the_strategy_as_it_was():
    """load_state_dict is all or nothing: the base's part of a state whose AdapTop-K part is incomplete
    was loaded before the refusal, leaving another run's model in this strategy."""
    import numpy as np
    import pytest
    from flwr.app import Array

    def started(value):
        strategy = AdaptiveTopKSGD(ratio=0.1, num_rounds=4, fraction_evaluate=0.0)
        strategy.initialize(ArrayRecord({"w": Array(np.full(20, value, dtype=np.float32))}))
        return strategy

    other = started(2.0).state_dict()
    del other["adaptive_topk"]["planned"]
    strategy = started(1.0)
    generation = strategy.state.generation
    with pytest.raises(ValueError, match="not a complete AdapTop-K state"):
        strategy.load_state_dict(other)
    assert strategy.state.generation == generation != other["generation"]
    assert torch.equal(strategy.state.model, torch.ones(20))
