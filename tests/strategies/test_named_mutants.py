"""Tests written to kill mutants of the named strategies (``fl_sparse/strategies/named.py``).

What each strategy passes on to :class:`SparseFedAvg` (FedAvg's positional parameters, the
exact uplink spec clients are told, the ``options`` a checkpoint is checked against), the
edges of rTop-k's pool size and of AdapTop-K's budget, and the exact words of their refusals
and warnings. See docs/testing.md ("The named strategies").
"""

from __future__ import annotations

import json
import logging
import math

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord
from flwr.common.logger import FLOWER_LOGGER

from inprocess import mock_grid

from fl_sparse.compressors import TopK, adaptive_k_rounds
from fl_sparse.protocol import Instruction
from fl_sparse.strategies import (
    AdaptiveTopKSGD,
    BidirectionalTopKSGD,
    DenseFedAvg,
    HardThresholdSGD,
    RandomKSGD,
    RTopKSGD,
    TopKSGD,
)
from fl_sparse.strategies import named

FLOWER_LOGGER.setLevel(logging.WARNING)

NUMEL = 2_000

pytestmark = pytest.mark.usefixtures("task_identity")  # tests/strategies/conftest.py


def zeros(numel: int = NUMEL) -> ArrayRecord:
    return ArrayRecord({"w": Array(np.zeros(numel, dtype=np.float32))})


def told(strategy, server_round: int, clients: int = 3, numel: int = NUMEL, config: dict | None = None) -> dict:
    """The uplink spec every sampled client is told in this round's train messages."""
    messages = list(strategy.configure_train(server_round, zeros(numel), ConfigRecord(config or {}), mock_grid(clients)))
    specs = [Instruction.read(m.content).uplink_spec() for m in messages]
    assert specs and all(s == specs[0] for s in specs)
    return specs[0]


def base_options(**changes) -> dict:
    """SparseFedAvg's options with the defaults, as a named strategy reports them."""
    return {
        "downlink": "None", "uplink_values": "fp32", "uplink_positions": "raw", "downlink_values": "fp32",
        "downlink_positions": "raw", "server_error_feedback": True, "client_error_feedback": True,
        "exact_arrays": [], "seed": 0, "fraction_train": 1.0, "weighted_by_key": "num-examples", **changes,
    }


# ------------------------------------------------------------- FedAvg's parameters
@pytest.mark.parametrize("make", [
    lambda *a: DenseFedAvg(*a),
    lambda *a: TopKSGD(*a, k=7),
    lambda *a: BidirectionalTopKSGD(*a, k=7),
    lambda *a: RTopKSGD(*a, k=7),
    lambda *a: RandomKSGD(*a, k=7),
    lambda *a: HardThresholdSGD(*a, threshold=0.1),
    lambda *a: AdaptiveTopKSGD(*a, num_rounds=4),
], ids=["dense", "topk", "bidirectional", "rtopk", "randomk", "hard-threshold", "adaptive"])
def test_fedavgs_positional_parameters_reach_the_strategy(make):
    """A named strategy takes FedAvg's parameters in FedAvg's order, as Flower's own strategies do."""
    strategy = make(0.5, 0.25, 3, 4, 5, "weight")
    assert (strategy.fraction_train, strategy.fraction_evaluate, strategy.min_train_nodes,
            strategy.min_evaluate_nodes, strategy.min_available_nodes, strategy.weighted_by_key) == (
        0.5, 0.25, 3, 4, 5, "weight")


# ------------------------------------------------------------- what clients are told
def test_each_strategy_tells_its_clients_the_exact_canonical_spec():
    """The spec in the instruction is the wire contract: canonical names, nothing extra."""
    k = TopK(ratio=0.01).k_for(NUMEL)
    assert told(DenseFedAvg(), 1) == {"name": "none"}
    assert told(TopKSGD(ratio=0.01), 1) == {"name": "topk", "ratio": 0.01}
    assert told(RandomKSGD(k=9), 1) == {"name": "randomk", "k": 9}
    assert told(RTopKSGD(k=9), 1) == {"name": "rtopk", "k": 9, "n_workers": 3}
    assert told(RTopKSGD(k=9, r=40), 1) == {"name": "rtopk", "k": 9, "r": 40}
    assert told(AdaptiveTopKSGD(ratio=0.01, num_rounds=4, t_hat=4), 1) == {"name": "topk", "k": round(1.5 * k)}
    assert told(HardThresholdSGD(threshold=0.3), 1, config={"lr": 0.5}) == {"name": "hard-threshold", "lam": 0.15}
    # the downlink of the unidirectional ones: the aggregate as is
    for strategy in (DenseFedAvg(), TopKSGD(), RTopKSGD(k=9), RandomKSGD(k=9), HardThresholdSGD(),
                     AdaptiveTopKSGD(num_rounds=3)):
        assert strategy.downlink is None


def test_options_a_checkpoint_is_checked_against():
    """``options()`` decides whether a saved run may be continued: its keys and values are fixed."""
    assert RTopKSGD(k=5).options() == base_options(
        uplink=json.dumps({"k": 5, "n_workers": 1, "name": "rtopk"}), r=None, r_ratio=None)
    assert RTopKSGD(ratio=0.01, r_ratio=0.25).options() == base_options(
        uplink=json.dumps({"n_workers": 1, "name": "rtopk", "ratio": 0.01}), r=None, r_ratio=0.25)
    assert HardThresholdSGD(threshold=0.3, ratio=0.02, lr=0.1).options() == base_options(
        uplink=json.dumps({"lam": 0.3, "name": "hard-threshold"}), threshold=0.3, ratio=0.02, lr=0.1,
        threshold_on="a/lr")
    assert AdaptiveTopKSGD(ratio=0.01, num_rounds=5).options() == base_options(
        uplink=json.dumps({"name": "topk", "ratio": 0.01}), gamma=0.5, t_hat=None,
        # the estimate's documented defaults (changing them changes every run that relies on them)
        estimate={"eta": 0.05, "mu": 0.01, "L": 1.0, "sigma_sq": 1.0})
    assert AdaptiveTopKSGD(ratio=0.01, num_rounds=5, gamma=1.0, t_hat=2, lr=0.2, mu=0.3, L=4.0,
                           sigma_sq=5.0).options() == base_options(
        uplink=json.dumps({"name": "topk", "ratio": 0.01}), gamma=1.0, t_hat=2,
        estimate={"eta": 0.2, "mu": 0.3, "L": 4.0, "sigma_sq": 5.0})


# ------------------------------------------------------------- rTop-k's pool
def test_rtopk_pool_is_at_least_k_and_follows_the_sampled_clients():
    assert told(RTopKSGD(k=50, r=10), 1)["r"] == 50  # r < k: the pool is k (rTop-k needs k <= r)
    assert told(RTopKSGD(ratio=0.001, r=1), 1)["r"] == 1  # with a ratio the clients clip r to k themselves
    assert told(RTopKSGD(k=5, min_train_nodes=1, min_available_nodes=1), 1, clients=1)["n_workers"] == 1
    assert told(RTopKSGD(k=5, fraction_train=0.5, min_train_nodes=1), 1, clients=8)["n_workers"] == 4


def test_rtopk_pool_from_r_ratio_is_the_ceiling_of_the_exact_product():
    """r = ⌈r_ratio·d⌉ as TopK's k: 0.14 · 2,194,400 is 307,216 exactly, 307,216.00000000006 in floats."""
    numel = 2_194_400
    strategy = RTopKSGD(k=1, r_ratio=0.14)
    strategy.initialize(zeros(numel))
    assert strategy.uplink_spec(1, 3)["r"] == TopK(ratio=0.14).k_for(numel) == 307_216


# ------------------------------------------------------------- AdapTop-K's budget
def test_adaptive_rounds_past_num_rounds_send_k():
    T, k = 3, TopK(ratio=0.01).k_for(NUMEL)
    strategy = AdaptiveTopKSGD(ratio=0.01, num_rounds=T, t_hat=T)
    ks = [told(strategy, t)["k"] for t in range(1, T + 1)]
    assert ks == adaptive_k_rounds(T, k, 0.5, T) and sum(ks) == T * k
    assert [told(strategy, t) for t in (T + 1, T + 2)] == [{"name": "topk", "k": k}] * 2


def test_adaptive_k_t_is_never_more_than_the_model():
    """(1+γ)k can exceed d: a round never asks for more entries than there are."""
    strategy = AdaptiveTopKSGD(ratio=0.9, num_rounds=4, gamma=0.5, t_hat=4)
    assert told(strategy, 1, numel=100)["k"] == 100


def test_adaptive_uplink_before_a_model_is_the_ratio():
    assert AdaptiveTopKSGD(ratio=0.02, num_rounds=4).uplink_spec(1, 3) == {"name": "topk", "ratio": 0.02}


@pytest.mark.parametrize("ratio,k,high,played,num_rounds,needed", [
    (0.01, 20, 30, 3, 4, 5),    # spent 90: 91 entries need 5 rounds of 20
    (0.01, 20, 30, 4, 5, 7),    # spent 120, a multiple of k: 121 need 7
    (0.0035, 7, 11, 5, 7, 8),   # spent 55 = 8·7 − 1: 56 need 8
])
def test_adaptive_resumed_with_a_spent_budget_names_the_rounds_needed(ratio, k, high, played, num_rounds, needed):
    """A state whose rounds spent the budget of a shorter run: the error says exactly what is needed."""
    assert TopK(ratio=ratio).k_for(NUMEL) == k
    first = AdaptiveTopKSGD(ratio=ratio, num_rounds=100)  # no round-1 loss known: every round high, 1.5k
    for t in range(1, played + 1):
        told(first, t)
    spent = sum(first.planned.values())
    assert list(first.planned.values()) == [high] * played and spent == played * high
    shorter = AdaptiveTopKSGD(ratio=ratio, num_rounds=num_rounds)
    shorter.load_state_dict(first.state_dict())
    with pytest.raises(ValueError) as info:
        told(shorter, played + 1)
    assert str(info.value) == (
        f"AdapTop-K: rounds 1..{played} already sent {spent} entries per client, the whole budget "
        f"num_rounds * k = {num_rounds} * {k} = {num_rounds * k}: a resumed run needs num_rounds >= {needed} "
        f"(round {played + 1} would send no entry)"
    )
    assert (needed - 1) * k <= spent < needed * k  # the least num_rounds whose budget has an entry left


@pytest.mark.parametrize("kwargs,message", [
    ({"gamma": 1.5}, "gamma must be in [0, 1], got 1.5"),
    ({"gamma": True}, "gamma must be in [0, 1], got True"),
    ({"ratio": 2}, "ratio must be a number in (0, 1], got 2"),
    ({"mu": 0.0}, "mu must be a finite number > 0, got 0.0"),
    ({"L": -1.0}, "L must be a finite number > 0, got -1.0"),
    ({"sigma_sq": math.inf}, "sigma_sq must be a finite number > 0, got inf"),
    ({"lr": 0}, "lr must be a finite number > 0, got 0"),
])
def test_adaptive_refusals_name_the_argument(kwargs, message):
    with pytest.raises(ValueError) as info:
        AdaptiveTopKSGD(num_rounds=5, **kwargs)
    assert str(info.value) == message


def test_adaptive_gamma_one_is_allowed():
    """γ = 1 is the paper's extreme: 2k in the high phases, (almost) nothing in the low one."""
    strategy = AdaptiveTopKSGD(ratio=0.01, num_rounds=4, gamma=1.0, t_hat=4)
    assert strategy.gamma == 1.0 and told(strategy, 1)["k"] == 2 * TopK(ratio=0.01).k_for(NUMEL)


def _with_round_one_loss(strategy, loss: float):
    """The strategy after round 1 (configured) with the clients' mean train loss ``loss`` recorded."""
    told(strategy, 1)
    strategy.state.round_metrics[1] = {"round": 1, "train_loss": loss}
    return strategy


def test_adaptive_estimate_is_recorded_in_the_round_it_is_made(monkeypatch):
    monkeypatch.setattr(named, "adaptive_k_t_hat", lambda **kw: 2)
    strategy = _with_round_one_loss(AdaptiveTopKSGD(ratio=0.01, num_rounds=6), 1.5)
    told(strategy, 2)
    assert (strategy.state.round_metrics[2]["round"], strategy.state.round_metrics[2]["t_hat"]) == (2, 2)
    assert strategy.state_dict()["adaptive_topk"]["t_hat_estimate"] == 2


def test_adaptive_nan_round_one_loss_gives_no_estimate(monkeypatch, caplog):
    """F(w_0) = NaN is not a loss: t̂ stays provisional (T), nothing is estimated, stored or logged."""
    calls = []
    monkeypatch.setattr(named, "adaptive_k_t_hat", lambda **kw: calls.append(kw) or 2)
    strategy = _with_round_one_loss(AdaptiveTopKSGD(ratio=0.01, num_rounds=6), math.nan)
    with caplog.at_level(logging.WARNING, logger="flwr"):
        told(strategy, 2)
    assert calls == [] and not caplog.records
    assert "t_hat" not in strategy.state.round_metrics[2]
    assert strategy.state_dict()["adaptive_topk"]["t_hat_estimate"] is None


def test_adaptive_warning_without_a_late_phase_in_full(monkeypatch, caplog):
    monkeypatch.setattr(named, "adaptive_k_t_hat", lambda **kw: 12_345_678)
    strategy = _with_round_one_loss(AdaptiveTopKSGD(ratio=0.01, num_rounds=6, mu=0.5, L=2.0, sigma_sq=3.0), 1.5)
    with caplog.at_level(logging.WARNING, logger="flwr"):
        told(strategy, 2)
    assert [r.getMessage() for r in caplog.records] == [
        "AdapTop-K: the estimated t_hat is 12345678 >= num_rounds (6), so k_t = (1+gamma)k for the first half "
        "of the rounds and (1-gamma)k after, with no late high phase. The estimate's constants (mu=0.5, L=2, "
        "sigma_sq=3) are rough guesses: pass t_hat= to choose the turning point"
    ]


@pytest.mark.parametrize("t_hat", [None, 2])
def test_adaptive_state_round_trips_with_and_without_t_hat(t_hat):
    first = AdaptiveTopKSGD(ratio=0.01, num_rounds=6, t_hat=t_hat)
    told(first, 1)
    state = first.state_dict()
    assert state["adaptive_topk"]["t_hat"] == t_hat and state["adaptive_topk"]["t_hat_estimate"] is None
    second = AdaptiveTopKSGD(ratio=0.01, num_rounds=6, t_hat=t_hat)
    second.load_state_dict(state)
    assert (second.t_hat, second._t_hat_estimate, second.planned) == (t_hat, None, first.planned)
    assert [told(second, t)["k"] for t in range(2, 7)] == [told(first, t)["k"] for t in range(2, 7)]


def test_adaptive_incomplete_state_names_what_is_missing():
    first = AdaptiveTopKSGD(ratio=0.01, num_rounds=6, t_hat=2)
    told(first, 1)
    state = first.state_dict()
    del state["adaptive_topk"]["planned"]
    with pytest.raises(ValueError) as info:
        AdaptiveTopKSGD(ratio=0.01, num_rounds=6, t_hat=2).load_state_dict(state)
    assert str(info.value) == "not a complete AdapTop-K state: KeyError: 'planned'"


# ------------------------------------------------------------- hard threshold's learning rate
def test_hard_threshold_before_any_round_tells_lambda_as_given():
    assert HardThresholdSGD(threshold=0.3).uplink_spec(1, 3) == {"name": "hard-threshold", "lam": 0.3}
    # with lr= given the threshold is on a = e + Δ from the start: γ·λ
    assert HardThresholdSGD(threshold=0.3, lr=0.1).uplink_spec(1, 3)["lam"] == pytest.approx(0.03)


def test_hard_threshold_without_a_train_config_says_how_to_give_lr():
    with pytest.raises(ValueError) as info:
        HardThresholdSGD(threshold=0.3).prepare_round(1, 3, None)
    assert str(info.value) == (
        "HardThresholdSGD needs the clients' learning rate: the paper's threshold applies to "
        "(error + lr * gradient) / lr, in gradient units. Pass lr=... to HardThresholdSGD, "
        "or put 'lr' in the train config"
    )


def test_hard_threshold_with_lr_given_does_not_read_the_train_configs():
    """With lr= given, the train config's "lr" (even one that is no number) is not read."""
    strategy = HardThresholdSGD(threshold=0.3, lr=0.1)
    assert told(strategy, 1, config={"lr": "not a number"})["lam"] == pytest.approx(0.03)


def test_hard_threshold_zero_sends_everything_and_none_waits_for_the_model():
    """λ = 0 is allowed (every entry passes); without λ the paper's rule needs d, so the spec says 0 until then."""
    assert told(HardThresholdSGD(threshold=0.0), 1, config={"lr": 0.5}) == {"name": "hard-threshold", "lam": 0.0}
    assert HardThresholdSGD().options()["uplink"] == json.dumps({"lam": 0.0, "name": "hard-threshold"})
    assert HardThresholdSGD(threshold=0.0).options()["threshold"] == 0.0


@pytest.mark.parametrize("make,message", [
    (lambda: HardThresholdSGD(threshold=0.1, lr=-1), "lr must be a finite number > 0, got -1"),
    (lambda: TopKSGD(ratio=None), "give exactly one of ratio or k"),
    (lambda: RandomKSGD(ratio=None, k=None), "give exactly one of ratio or k"),
])
def test_refusals_in_full(make, message):
    with pytest.raises(ValueError) as info:
        make()
    assert str(info.value) == message
