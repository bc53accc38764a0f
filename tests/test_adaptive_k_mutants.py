"""Tests written to kill mutants of the AdapTop-K and hard-threshold rules in :mod:`fl_sparse.compressors`.

``hard_threshold_for_topk`` (hard-threshold paper, Appendix D, eq. (29)) and
``adaptive_k_t_hat`` (AdapTop-K, Lemmas 2/3 and 7/8): the formulas are
re-derived here independently (the turning point by bisection on the
derivative of the coefficient, not by the closed form), and every argument
check is probed on both sides of its boundary. See docs/testing.md.
"""

from __future__ import annotations

import math
import re

import pytest

from fl_sparse.compressors import adaptive_k_t_hat, hard_threshold_for_topk


# ====================================================================== hard threshold, eq. (29)
def _eq29(k, sigma, zeta_sq, d, m):
    return 2.0 / math.sqrt(k) * math.sqrt((2.0 * d / k + m) * zeta_sq + sigma**2)


def test_hard_threshold_m_defaults_to_zero_and_d_equal_to_k_is_allowed():
    # M (Assumption 3) defaults to 0: only 2d/k multiplies zeta^2
    assert hard_threshold_for_topk(100, zeta_sq=0.01, d=10_000) == pytest.approx(_eq29(100, 0.25, 0.01, 10_000, 0.0))
    # d == k (Top-k of everything) is a valid model size
    assert hard_threshold_for_topk(100, zeta_sq=0.01, d=100) == pytest.approx(_eq29(100, 0.25, 0.01, 100, 0.0))
    # no noise and homogeneous data: lambda = 0 (sigma = 0 is allowed)
    assert hard_threshold_for_topk(4, sigma=0.0) == 0.0
    assert hard_threshold_for_topk(4, sigma=0.0, zeta_sq=0.0, m=0.0) == 0.0


@pytest.mark.parametrize(
    "kwargs",
    [dict(sigma=-0.1), dict(zeta_sq=-0.1, d=1000), dict(m=-1.0), dict(sigma=-0.1, m=2.0)],
)
def test_hard_threshold_rejects_each_negative_constant(kwargs):
    with pytest.raises(ValueError, match=r"^hard_threshold_for_topk: sigma, zeta_sq and m must be >= 0"):
        hard_threshold_for_topk(10, **kwargs)


@pytest.mark.parametrize("d", [None, 5, 99.5, 200.0, "200"])
def test_hard_threshold_heterogeneity_needs_an_integer_d_at_least_k(d):
    """zeta_sq > 0 needs the model size d: an int >= k (a float, even a large one, is not a size)."""
    with pytest.raises(ValueError, match=r"^hard_threshold_for_topk: zeta_sq > 0 needs the model size d >= k"):
        hard_threshold_for_topk(10, zeta_sq=0.1, d=d)


@pytest.mark.parametrize("k", [0, -3, 2.0, True])
def test_hard_threshold_k_must_be_a_positive_int(k):
    with pytest.raises(ValueError, match=r"^hard_threshold_for_topk: k must be an int >= 1"):
        hard_threshold_for_topk(k)


# ====================================================================== AdapTop-K turning point
GOOD = dict(d=10_000, k=100, eta=0.05, mu=0.5, L=2.0, sigma_sq=0.5, f0=3.0)


def _constants(d, k, eta, mu, L, sigma_sq, f0, ec):
    """Lemma 2 (no EC) / Lemma 7 (EC), written out."""
    if ec:
        return 2 * d * eta * f0 / k, d * sigma_sq * eta**2 * (eta * L + 1) / k, 1 - eta * mu / 2
    return 2 * d * f0 / (k * eta), d * sigma_sq * (eta * L + 1) / k, 1 - eta * mu * k / d


def _turning_point(alpha, beta, B):
    """Root of d/dt [log(alpha/t + beta) + (T-1-t) log B] by bisection (no closed form)."""

    def slope(t):
        return -alpha / (t * (alpha + beta * t)) - math.log(B)

    lo, hi = 1e-12, 1.0
    while slope(hi) < 0:
        hi *= 2
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if slope(mid) < 0 else (lo, mid)
    return (lo + hi) / 2


@pytest.mark.parametrize("ec", [True, False])
@pytest.mark.parametrize(
    "params",
    [
        GOOD,
        dict(GOOD, L=10.0),  # eta L far from eta / L
        dict(GOOD, L=0.5, eta=0.2),
        dict(d=5_000, k=50, eta=0.1, mu=0.2, L=30.0, sigma_sq=2.0, f0=1.0),
    ],
)
def test_t_hat_is_the_floor_of_the_coefficient_minimum(params, ec):
    alpha, beta, B = _constants(**params, ec=ec)
    t_star = _turning_point(alpha, beta, B)
    got = adaptive_k_t_hat(**params, error_compensation=ec)
    assert got == math.floor(t_star), (got, t_star)


def test_t_hat_boundary_values_are_accepted():
    # d = 1 and L = 0 are valid (L >= 0, d >= 1)
    for ec in (True, False):
        params = dict(GOOD, d=1, k=1, L=0.0) if ec else dict(GOOD, d=1000, L=0.0)
        alpha, beta, B = _constants(**params, ec=ec)
        assert adaptive_k_t_hat(**params, error_compensation=ec) == math.floor(_turning_point(alpha, beta, B))
    # f0 = 0 (already optimal): A_t = beta is flat, B^(T-1-t) grows with t, so the minimum is at t = 0
    assert adaptive_k_t_hat(**dict(GOOD, f0=0.0)) == 0
    assert adaptive_k_t_hat(**dict(GOOD, f0=0.0), error_compensation=False) == 0
    # L = 0.5 (between 0 and 1) is fine too
    adaptive_k_t_hat(**dict(GOOD, L=0.5))


@pytest.mark.parametrize("ec", [True, False])
@pytest.mark.parametrize(
    "bad, named",
    [
        (dict(d=0), "d >= 1"),
        (dict(k=0), "k > 0"),
        (dict(k=-1.0), "k > 0"),
        (dict(eta=0.0), "eta > 0"),
        (dict(eta=-0.1), "eta > 0"),
        (dict(mu=0.0), "mu > 0"),
        (dict(L=-1.0), "L >= 0"),
        (dict(sigma_sq=-0.5), "sigma_sq >= 0"),
        (dict(f0=-1.0), "f0 >= 0"),
    ],
)
def test_t_hat_rejects_each_bad_constant_by_name(bad, named, ec):
    with pytest.raises(ValueError, match=r"^adaptive_k_t_hat: need ") as info:
        adaptive_k_t_hat(**dict(GOOD, **bad), error_compensation=ec)
    assert named in str(info.value)


def test_t_hat_rejects_a_contraction_factor_outside_0_1():
    # eta mu / 2 = 1: B = 0 exactly; eta mu / 2 > 1: B < 0
    for eta, mu in ((2.0, 1.0), (10.0, 1.0)):
        with pytest.raises(ValueError, match=r"^adaptive_k_t_hat: need 0 < B < 1 for the contraction factor"):
            adaptive_k_t_hat(**dict(GOOD, eta=eta, mu=mu))
    # eta mu so small that B rounds to 1.0 in floating point: not a contraction either
    with pytest.raises(ValueError, match=r"^adaptive_k_t_hat: need 0 < B < 1 for the contraction factor"):
        adaptive_k_t_hat(**dict(GOOD, eta=1e-10, mu=1e-10))


# ====================================================================== AdapTop-K schedule and re-planning
from fractions import Fraction  # noqa: E402

from fl_sparse.compressors import _adaptive_k_tail_sum, adaptive_k_budgeted, adaptive_k_rounds, adaptive_k_schedule  # noqa: E402


def test_odd_T_the_neutral_round_sits_at_the_middle_late_boundary():
    """Odd T: exactly one round gets k, one next to (t_hat + T) / 2 -- or, with t_hat = T (no late phase), the last early one."""
    k, gamma = 10, 0.5
    for T in range(1, 40, 2):
        for t_hat in range(T + 1):
            rounds = adaptive_k_rounds(T, k, gamma, t_hat)
            neutral = [t for t, v in enumerate(rounds) if v == k]
            assert len(neutral) == 1, (T, t_hat, rounds)
            boundary = math.ceil((t_hat + T) / 2)  # first round of the late phase, eq. (21)
            if t_hat < T:
                assert neutral[0] in (boundary - 1, boundary), (T, t_hat, rounds)
            else:  # t_hat = T: no late phase, the early phase has the extra round
                assert neutral[0] == math.ceil(T / 2) - 1, (T, t_hat, rounds)


def test_tail_sum_is_the_sum_of_the_remaining_schedule():
    for T in range(1, 14):
        for k in (1, 3, 10):
            for gamma in (0.0, 0.3, 0.5, 1.0):
                for t_hat in range(T + 1):
                    rounds = adaptive_k_rounds(T, k, gamma, t_hat)
                    for t in range(T):
                        assert _adaptive_k_tail_sum(t, T, k, gamma, t_hat) == sum(rounds[t:]), (T, k, gamma, t_hat, t)


def _budgeted_oracle(t, T, k, gamma, t_hat, spent, d=None):
    """adaptive_k_budgeted's docstring, written out with fractions and a brute-force sum of the schedule."""
    cap = 2 * k if d is None else min(2 * k, d)
    left, budget = T - t, T * k - spent
    if budget <= 0:
        return 0
    if budget < left:
        return 1
    weights = [adaptive_k_schedule(s, T, k, gamma, t_hat) for s in range(t, T)]
    w, total = weights[0], sum(weights)
    if total == 0:  # every remaining round has weight 0: split evenly
        w, total = 1, left
    share = math.floor(Fraction(budget * w, total) + Fraction(1, 2))  # round half up
    return min(max(share, max(1, budget - cap * (left - 1))), min(cap, budget - (left - 1)))


def test_budgeted_share_is_the_documented_proportional_rule():
    for T in range(1, 9):
        for k in (1, 2, 5):
            for gamma in (0.0, 0.5, 0.9, 1.0):
                for t_hat in range(T + 1):
                    for t in range(T):
                        for spent in range(0, T * k + 3):
                            for d in (None, k, 2 * k + 1):
                                got = adaptive_k_budgeted(t, T, k, gamma, t_hat, spent, d=d)
                                want = _budgeted_oracle(t, T, k, gamma, t_hat, spent, d)
                                assert got == want, (t, T, k, gamma, t_hat, spent, d)


def test_budgeted_checks_spent_and_d_by_name():
    with pytest.raises(ValueError, match=r"^AdapTop-K: spent must be an int >= 0, got -1$"):
        adaptive_k_budgeted(0, 5, 10, 0.5, 2, -1)
    with pytest.raises(ValueError, match=r"^AdapTop-K: d must be an int >= k = 10, got 9$"):
        adaptive_k_budgeted(0, 5, 10, 0.5, 2, 0, d=9)
    # d == k is a valid model size: every round then sends exactly k
    assert [adaptive_k_budgeted(t, 5, 10, 0.5, 2, 10 * t, d=10) for t in range(5)] == [10] * 5


@pytest.mark.parametrize(
    "T,k,match",
    [(0, 5, "T must be an int >= 1, got 0"), (2.5, 5, "T must be an int >= 1, got 2.5"),
     (4, 0, "k must be an int >= 1, got 0"), (4, 1.5, "k must be an int >= 1, got 1.5")],
)
def test_the_schedule_names_a_bad_T_or_k(T, k, match):
    with pytest.raises(ValueError, match=re.escape(f"AdapTop-K: {match}")):
        adaptive_k_schedule(0, T, k, 0.5, 0)


@pytest.mark.parametrize("gamma", [True, 1.5, -0.1, "0.5"])
def test_the_schedule_names_a_bad_gamma(gamma):
    with pytest.raises((ValueError, TypeError), match=re.escape("AdapTop-K: gamma must be in [0, 1]")):
        adaptive_k_schedule(0, 4, 5, gamma, 0)


def test_the_schedule_names_a_bad_t_hat_or_round():
    with pytest.raises(ValueError, match=re.escape("AdapTop-K: t_hat must be an int in [0, T=4], got 5")):
        adaptive_k_schedule(0, 4, 5, 0.5, 5)
    with pytest.raises(ValueError, match=re.escape("AdapTop-K: round t must be an int in [0, T=4), got 4")):
        adaptive_k_schedule(4, 4, 5, 0.5, 0)
