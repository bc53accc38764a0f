"""Review of three methods against their papers (shared/papers): hard threshold, rTop-k, AdapTop-K.

Each test pins a place where the code deviated from the paper's text (or from
its own docstring's account of it).
"""

from __future__ import annotations

import math
from decimal import Decimal, getcontext

import pytest

from fl_sparse.compressors import adaptive_k_t_hat


# ====================================================================== AdapTop-K t_hat
def _papers_t_hat(alpha: float, beta: float, B: float) -> int:
    """adaptive-topk.txt Lemma 3 / Lemma 8, in 80-digit arithmetic:
    floor((-alpha + sqrt(Delta)) / (2 beta)), Delta = alpha^2 - 4 alpha beta / ln B."""
    getcontext().prec = 80
    a, b, lnb = Decimal(alpha), Decimal(beta), Decimal(B).ln()
    delta = a * a - 4 * a * b / lnb
    return int(((-a + delta.sqrt()) / (2 * b)).to_integral_value(rounding="ROUND_FLOOR"))


@pytest.mark.parametrize("ec", [True, False])
@pytest.mark.parametrize("sigma_sq", [1.0, 1e-4, 1e-12, 1e-16, 1e-20])
def test_t_hat_is_the_papers_formula_also_when_alpha_dwarfs_beta(sigma_sq, ec):
    """-alpha + sqrt(alpha^2 + c) cancels when c << alpha^2 (little gradient noise): the float formula
    gave t_hat = 0 (EC) or 433,092 (no EC, above the limit -1/ln B = 199,999) at sigma^2 = 1e-20,
    while the paper's value tends to floor(-1/ln B) (and sigma^2 = 0 already gave that)."""
    d, k, eta, mu, L, f0 = 10_000, 100, 0.05, 0.01, 1.0, 2.0
    if ec:
        alpha, beta, B = 2 * d * eta * f0 / k, d * sigma_sq * eta**2 * (eta * L + 1) / k, 1 - eta * mu / 2
    else:
        alpha, beta, B = 2 * d * f0 / (k * eta), d * sigma_sq * (eta * L + 1) / k, 1 - eta * mu * k / d
    got = adaptive_k_t_hat(d=d, k=k, eta=eta, mu=mu, L=L, sigma_sq=sigma_sq, f0=f0, error_compensation=ec)
    assert got == _papers_t_hat(alpha, beta, B)
    assert got <= math.floor(-1 / math.log(B))


def test_t_hat_of_a_huge_or_tiny_loss_is_finite():
    """alpha^2 overflowed to inf for F(w_0) = 1e300 (OverflowError); the paper's value is floor(-1/ln B)."""
    kw = dict(d=10**7, k=10**4, eta=0.05, mu=0.01, L=1.0, sigma_sq=1e-3)
    assert adaptive_k_t_hat(**kw, f0=1e300) == math.floor(-1 / math.log(1 - 0.05 * 0.01 / 2))
    assert adaptive_k_t_hat(**kw, f0=1e-300) == 0
