"""AdapTop-K with a t_hat that changes mid-run: adaptive_k_budgeted spends exactly T k."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fl_sparse.compressors import TopK, adaptive_k_budgeted, adaptive_k_rounds, adaptive_k_schedule

HYP = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def play(T: int, k: int, gamma: float, t_hats: list[int], d: int | None = None) -> list[int]:
    """k_0..k_{T-1}, round t planned with t_hats[t] and what rounds 0..t-1 actually spent."""
    spent, out = 0, []
    for t in range(T):
        k_t = adaptive_k_budgeted(t, T, k, gamma, t_hats[t], spent, d=d)
        out.append(k_t)
        spent += k_t
    return out


def assert_budget(rounds: list[int], T: int, k: int, d: int) -> None:
    assert len(rounds) == T
    assert sum(rounds) == T * k  # exactly the budget
    assert all(1 <= v <= d for v in rounds), rounds  # T k >= T always here (k >= 1)


budgets = st.tuples(
    st.integers(100, 100_000),  # d
    st.floats(1e-3, 0.5),  # ratio
    st.integers(1, 60),  # T
    st.floats(0.0, 1.0),  # gamma
)


@HYP
@given(budget=budgets, data=st.data())
def test_t_hat_estimated_after_round_0_keeps_the_budget(budget, data):
    d, ratio, T, gamma = budget
    k = TopK(ratio=ratio).k_for(d)
    provisional = data.draw(st.integers(0, T), label="provisional t_hat")  # the strategy uses T
    estimated = data.draw(st.integers(0, T), label="estimated t_hat (any round-1 loss)")
    rounds = play(T, k, gamma, [provisional] + [estimated] * (T - 1), d=d)
    assert_budget(rounds, T, k, d)


@HYP
@given(budget=budgets, data=st.data())
def test_t_hat_changing_at_any_round_keeps_the_budget(budget, data):
    d, ratio, T, gamma = budget
    k = TopK(ratio=ratio).k_for(d)
    t_hats = data.draw(st.lists(st.integers(0, T), min_size=T, max_size=T), label="t_hat per round")
    rounds = play(T, k, gamma, t_hats, d=d)
    assert_budget(rounds, T, k, d)
    # without d the cap is 2k: still exact, at least 1, at most 2k
    free = play(T, k, gamma, t_hats)
    assert sum(free) == T * k and all(1 <= v <= 2 * k for v in free)


@HYP
@given(budget=budgets, data=st.data())
def test_fixed_t_hat_is_the_papers_schedule(budget, data):
    d, ratio, T, gamma = budget
    k = TopK(ratio=ratio).k_for(d)
    t_hat = data.draw(st.integers(0, T), label="t_hat")
    schedule = adaptive_k_rounds(T, k, gamma, t_hat)
    spent = 0
    for t in range(T):
        # spent follows the schedule: each round is the paper's k_t exactly
        if 1 <= min(schedule) and max(schedule) <= d:
            assert adaptive_k_budgeted(t, T, k, gamma, t_hat, spent, d=d) == adaptive_k_schedule(t, T, k, gamma, t_hat)
        if min(schedule) >= 1:  # without d the only condition is k_lo >= 1
            assert adaptive_k_budgeted(t, T, k, gamma, t_hat, spent) == schedule[t]
        spent += schedule[t]
    # and when the schedule has empty rounds (k_lo == 0) the budgeted one still spends T k, >= 1 each
    assert_budget(play(T, k, gamma, [t_hat] * T, d=d), T, k, d)


@pytest.mark.parametrize("T", [1, 2, 3, 4, 5, 10, 11, 24, 37, 100])
@pytest.mark.parametrize("k", [1, 2, 3, 7, 100, 1000])
@pytest.mark.parametrize("gamma", [0.0, 0.25, 0.5, 0.75, 1.0])
def test_fixed_t_hat_grid(T, k, gamma):
    for t_hat in range(T + 1):
        schedule = adaptive_k_rounds(T, k, gamma, t_hat)
        played = play(T, k, gamma, [t_hat] * T)
        if min(schedule) >= 1:
            assert played == schedule, t_hat
        assert sum(played) == T * k and min(played) >= 1


def test_concrete_overspend_case_is_fixed():
    # d = 20,000, ratio 0.01 -> k = 200; T = 5; t_hat provisional T = 5 for round 0, then estimated 0
    d, T, gamma = 20_000, 5, 0.5
    k = TopK(ratio=0.01).k_for(d)
    assert k == 200
    # the bug: the fixed schedule ignores what round 0 already spent
    old = [adaptive_k_schedule(0, T, k, gamma, 5)] + [adaptive_k_schedule(t, T, k, gamma, 0) for t in range(1, T)]
    assert old == [300, 100, 200, 300, 300] and sum(old) == 1_200
    rounds = play(T, k, gamma, [5, 0, 0, 0, 0], d=d)
    assert rounds[0] == 300  # round 0 is what was really sent
    assert sum(rounds) == 1_000
    # the remaining 700 follow the t_hat = 0 shape (low, neutral, high, high) = 100 : 200 : 300 : 300
    assert rounds[1] < rounds[2] < rounds[3] == rounds[4]
    assert rounds == [300, 78, 156, 233, 233]


def test_budget_too_small_edge_cases_and_validation():
    T, k = 5, 10
    assert adaptive_k_budgeted(2, T, k, 0.5, 2, T * k) == 0  # exhausted
    assert adaptive_k_budgeted(2, T, k, 0.5, 2, T * k + 7) == 0  # overspent: never negative
    assert adaptive_k_budgeted(2, T, k, 0.5, 2, T * k - 2) == 1  # fewer entries left than rounds: one each
    assert adaptive_k_budgeted(4, T, k, 0.5, 2, 0) == 2 * k  # more left than fits: capped at 2k
    assert adaptive_k_budgeted(4, T, k, 0.5, 2, 0, d=15) == 15  # ... or at d
    assert adaptive_k_budgeted(4, T, k, 0.5, 2, 37) == T * k - 37  # last round takes what is left
    for bad in [
        dict(t=5), dict(t=-1), dict(spent=-1), dict(spent=1.5), dict(gamma=1.5), dict(t_hat=6), dict(k=0),
        dict(d=9),
    ]:
        args = dict(t=0, T=T, k=k, gamma=0.5, t_hat=2, spent=0) | bad
        d = args.pop("d", None)
        with pytest.raises(ValueError):
            adaptive_k_budgeted(**args, d=d)
