"""The named strategies: what each one tells the clients, and what comes of it.

Everything is read from the messages the strategy sends (the
:class:`~fl_sparse.protocol.Instruction` in each train message), not from
constructor attributes, and AdapTop-K's t̂ is recomputed here from the
round-1 loss with :func:`adaptive_k_t_hat` and the paper's schedule.
"""

from __future__ import annotations

import logging
import math
from unittest.mock import Mock

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord
from flwr.clientapp import ClientApp
from flwr.common.logger import FLOWER_LOGGER
from inprocess import InProcessGrid, mock_grid, step_app
from oracles import topk_np

from fl_sparse.compressors import adaptive_k_budgeted, adaptive_k_rounds, adaptive_k_t_hat, build_compressor
from fl_sparse.protocol import Instruction
from fl_sparse.strategies import (
    AdaptiveTopKSGD,
    BidirectionalTopKSGD,
    DenseFedAvg,
    HardThresholdSGD,
    RandomKSGD,
    RTopKSGD,
    TopKSGD,
    build_strategy,
)

FLOWER_LOGGER.setLevel(logging.WARNING)

NUMEL = 20_000

pytestmark = pytest.mark.usefixtures("task_identity")  # tests/strategies/conftest.py


def k_of(ratio: float, d: int) -> int:
    """The top-K budget of the papers: K = ceil(ratio d), at least 1."""
    return max(1, math.ceil(round(ratio * d, 9)))


def zeros(numel: int = NUMEL) -> ArrayRecord:
    return ArrayRecord({"w": Array(np.zeros(numel, dtype=np.float32))})


def sent_instructions(strategy, server_round: int, grid, arrays) -> list[Instruction]:
    messages = list(strategy.configure_train(server_round, arrays, ConfigRecord(), grid))
    assert messages, "no train messages"
    if isinstance(grid, Mock):
        grid.send_and_receive.assert_not_called()
    return [Instruction.read(m.content) for m in messages]


def uplink_of(strategy, server_round: int, grid, arrays) -> dict:
    """The uplink spec every client is told this round (checked equal across clients)."""
    specs = [i.uplink_spec() for i in sent_instructions(strategy, server_round, grid, arrays)]
    assert all(s == specs[0] for s in specs)
    return specs[0]


# ----------------------------------------------------------- a tiny federation
SHAPE = (30,)
D = 30
WEIGHTS = {0: 5.0, 1: 2.0, 2: 9.0}
LOSSES = {0: 1.0, 1: 4.0, 2: 2.0}


def local_step(pid: int, server_round: int) -> np.ndarray:
    return np.random.default_rng(100 * pid + server_round).standard_normal(SHAPE).astype(np.float32)


def toy_app() -> ClientApp:
    return step_app(local_step, WEIGHTS.__getitem__, lambda pid: {"train-loss": LOSSES[pid]})


def toy_grid(tmp_path) -> InProcessGrid:
    return InProcessGrid(toy_app(), len(WEIGHTS), node_config=lambda i: {"state-dir": str(tmp_path)})


def w0() -> np.ndarray:
    return np.random.default_rng(0).standard_normal(SHAPE).astype(np.float32)


def play(strategy, grid, server_round, arrays):
    messages = list(strategy.configure_train(server_round, arrays, ConfigRecord(), grid))
    replies = grid.send_and_receive(messages)
    arrays, _ = strategy.aggregate_train(server_round, replies)
    return messages, arrays


# ----------------------------------------------------------- AdapTop-K
@pytest.mark.parametrize("t_hat", [0, 3, 6, 10])
def test_adaptive_topk_follows_the_paper_schedule_and_spends_exactly_the_budget(t_hat):
    T, ratio, gamma = 10, 0.01, 0.5
    strategy = AdaptiveTopKSGD(ratio=ratio, num_rounds=T, gamma=gamma, t_hat=t_hat)
    grid, arrays = mock_grid(4), zeros()
    k = k_of(ratio, NUMEL)
    ks = [uplink_of(strategy, t, grid, arrays)["k"] for t in range(1, T + 1)]
    # eq. (21): (1+γ)k for t < t̂/2 and t ≥ (t̂+T)/2, (1−γ)k in between (0-based t = round − 1)
    k_hi, k_lo = round((1 + gamma) * k), 2 * k - round((1 + gamma) * k)
    for t, k_t in enumerate(ks):
        if t < t_hat / 2 or t >= (t_hat + T) / 2:
            assert k_t == k_hi, (t, ks)
        else:
            assert k_t == k_lo, (t, ks)
    assert ks == adaptive_k_rounds(T, k, gamma, t_hat)
    assert sum(ks) == T * k


ESTIMATE = dict(lr=0.5, mu=0.01, L=1.0, sigma_sq=10.0)


@pytest.mark.parametrize("error_feedback", [True, False])
def test_adaptive_topk_estimates_t_hat_from_the_round_one_loss(tmp_path, error_feedback):
    """t̂ = adaptive_k_t_hat(d, k, F(w_0) = Σ p_q loss_q, η, μ, L, σ², EC flag), then the paper's schedule."""
    T, ratio, gamma = 40, 0.2, 0.5
    grid = toy_grid(tmp_path)
    strategy = AdaptiveTopKSGD(
        ratio=ratio, num_rounds=T, gamma=gamma, error_feedback=error_feedback, fraction_evaluate=0.0, **ESTIMATE
    )
    k = k_of(ratio, D)
    total = sum(WEIGHTS.values())
    f0 = sum(WEIGHTS[q] / total * LOSSES[q] for q in WEIGHTS)  # the clients' weighted round-1 loss
    est = dict(d=D, k=k, f0=f0, T=T, eta=ESTIMATE["lr"], mu=ESTIMATE["mu"], L=ESTIMATE["L"], sigma_sq=ESTIMATE["sigma_sq"])
    expected = adaptive_k_t_hat(error_compensation=error_feedback, **est)
    inverted = adaptive_k_t_hat(error_compensation=not error_feedback, **est)
    uniform = adaptive_k_t_hat(error_compensation=error_feedback, **{**est, "f0": sum(LOSSES.values()) / 3})
    # The test can tell the flag and the weighting apart: the schedules they give differ.
    assert adaptive_k_rounds(T, k, gamma, expected)[1:] != adaptive_k_rounds(T, k, gamma, inverted)[1:]
    assert adaptive_k_rounds(T, k, gamma, expected)[1:] != adaptive_k_rounds(T, k, gamma, uniform)[1:]

    messages, arrays = play(strategy, grid, 1, ArrayRecord({"w": Array(w0())}))
    # Round 1: F(w_0) unknown yet, round 1 is in the early high phase.
    k_1 = round((1 + gamma) * k)
    assert {Instruction.read(m.content).uplink_spec()["k"] for m in messages} == {k_1}
    ks = [k_1] + [uplink_of(strategy, t, grid, arrays)["k"] for t in range(2, T + 1)]
    assert strategy.t_hat == expected
    assert strategy.state.round_metrics[2]["t_hat"] == expected
    # Round 1's k is also the high k of the estimated schedule, so the rest is the paper's schedule.
    assert ks == adaptive_k_rounds(T, k, gamma, expected)
    assert sum(ks) == T * k


@pytest.mark.parametrize("estimate,warned", [({}, True), (ESTIMATE, False)])
def test_adaptive_topk_says_when_the_estimate_leaves_no_late_phase(tmp_path, caplog, estimate, warned):
    """With the default constants t̂ comes out >= T: the schedule is high-then-low, which the log says."""
    T = 40
    strategy = AdaptiveTopKSGD(ratio=0.2, num_rounds=T, fraction_evaluate=0.0, **estimate)
    grid = toy_grid(tmp_path)
    _, arrays = play(strategy, grid, 1, ArrayRecord({"w": Array(w0())}))
    with caplog.at_level(logging.WARNING, logger="flwr"):
        uplink_of(strategy, 2, grid, arrays)
    lines = [r.getMessage() for r in caplog.records if "AdapTop-K" in r.getMessage()]
    assert (strategy.t_hat >= T) == warned
    if warned:
        assert len(lines) == 1 and f">= num_rounds ({T})" in lines[0] and "pass t_hat=" in lines[0], lines
    else:
        assert not lines


def _replayed_budget(T, k, gamma, t_hat, first_t_hat):
    """k_t re-planned from what was spent (adaptive_k_budgeted), t̂ known from round 2 on."""
    spent, out = 0, []
    for t in range(T):
        k_t = adaptive_k_budgeted(t, T, k, gamma, first_t_hat if t == 0 else t_hat, spent)
        out.append(k_t)
        spent += k_t
    return out


@pytest.mark.parametrize("sigma_sq", [100.0, 30.0])
def test_adaptive_topk_with_estimated_t_hat_spends_exactly_the_budget(tmp_path, sigma_sq):
    """With t̂ = 0 (σ² = 100) round 1's (1+γ)k is not the schedule's (1−γ)k: the rest is re-planned."""
    T, ratio, gamma = 10, 0.2, 0.5
    est = dict(lr=0.5, mu=0.5, L=1.0, sigma_sq=sigma_sq)
    grid = toy_grid(tmp_path)
    strategy = AdaptiveTopKSGD(ratio=ratio, num_rounds=T, gamma=gamma, fraction_evaluate=0.0, **est)
    k = k_of(ratio, D)
    total = sum(WEIGHTS.values())
    f0 = sum(WEIGHTS[q] / total * LOSSES[q] for q in WEIGHTS)
    t_hat = adaptive_k_t_hat(d=D, k=k, f0=f0, T=T, eta=0.5, mu=0.5, L=1.0, sigma_sq=sigma_sq)
    messages, arrays = play(strategy, grid, 1, ArrayRecord({"w": Array(w0())}))
    ks = [Instruction.read(messages[0].content).uplink_spec()["k"]]
    ks += [uplink_of(strategy, t, grid, arrays)["k"] for t in range(2, T + 1)]
    assert strategy.t_hat == t_hat
    assert sum(ks) == T * k, ks
    assert ks == _replayed_budget(T, k, gamma, t_hat, first_t_hat=T)
    if sigma_sq == 100.0:
        assert t_hat == 0 and ks != adaptive_k_rounds(T, k, gamma, t_hat)  # the case the re-plan is for


@pytest.mark.parametrize(
    "make, error_feedback",
    [
        (lambda: AdaptiveTopKSGD(num_rounds=5, t_hat=2), True),
        (lambda: AdaptiveTopKSGD(num_rounds=5, t_hat=2, error_feedback=False), False),
        (lambda: build_strategy("adaptive-topk", ratio=0.01, num_rounds=5), True),
        (lambda: build_strategy("adaptive-topk-no-ec", ratio=0.01, num_rounds=5), False),
        (lambda: TopKSGD(ratio=0.01), True),
        (lambda: TopKSGD(ratio=0.01, client_error_feedback=False), False),
    ],
    ids=["adaptive", "adaptive-no-ec", "build-adaptive", "build-adaptive-no-ec", "topk", "topk-no-ec"],
)
def test_clients_are_told_whether_to_keep_their_error(make, error_feedback):
    strategy = make()
    instrs = sent_instructions(strategy, 1, mock_grid(3), zeros())
    assert [i.error_feedback for i in instrs] == [error_feedback] * 3


@pytest.mark.parametrize("error_feedback", [True, False])
def test_without_error_compensation_the_clients_drop_what_was_not_sent(tmp_path, error_feedback):
    """Two rounds through the real mod: round 2 sends Top_K(e_1 + Δ_2) with EC, Top_K(Δ_2) without."""
    T, ratio = 4, 0.2
    k = k_of(ratio, D)
    grid = toy_grid(tmp_path)
    strategy = AdaptiveTopKSGD(ratio=ratio, num_rounds=T, gamma=0.0, t_hat=2, error_feedback=error_feedback, fraction_evaluate=0.0)
    w = w0()
    arrays = ArrayRecord({"w": Array(w)})
    total = sum(WEIGHTS.values())
    e = {q: np.zeros(D) for q in WEIGHTS}
    for t in (1, 2):
        _, arrays = play(strategy, grid, t, arrays)
        g = np.zeros(D)
        for q in WEIGHTS:
            step = (w - (w - local_step(q, t))).astype(np.float64)
            a = e[q] + step if error_feedback else step
            s = topk_np(a, k)
            e[q] = a - s
            g += WEIGHTS[q] / total * s
        w = (w - g).astype(np.float32)
        np.testing.assert_allclose(arrays["w"].numpy(), w, rtol=0, atol=1e-5)


# ----------------------------------------------------------- rTop-k
@pytest.mark.parametrize("fraction, sampled", [(1.0, 7), (0.5, 3)])
def test_rtopk_tells_clients_k_over_r_equal_one_over_n(fraction, sampled):
    ratio = 0.01
    strategy = RTopKSGD(ratio=ratio, fraction_train=fraction)
    instrs = sent_instructions(strategy, 1, mock_grid(7), zeros())
    assert len(instrs) == sampled
    spec = instrs[0].uplink_spec()
    assert spec["n_workers"] == sampled
    # What a client builds from it sends k entries drawn from its top r = n k.
    compressor = build_compressor(**spec)
    x = torch.randn(NUMEL, generator=torch.Generator().manual_seed(1))
    out = compressor(x, generator=torch.Generator().manual_seed(0))
    k = k_of(ratio, NUMEL)
    top_r = set(torch.topk(x.abs(), sampled * k).indices.tolist())
    assert out.nnz == k and set(out.indices.tolist()) <= top_r
    assert not set(out.indices.tolist()) <= set(torch.topk(x.abs(), k).indices.tolist())  # not plain top-k


def test_rtopk_with_a_fixed_r_tells_clients_r():
    spec = uplink_of(RTopKSGD(k=50, r=400), 1, mock_grid(3), zeros())
    assert spec["r"] == 400 and spec["k"] == 50 and "n_workers" not in spec


# ----------------------------------------------------------- hard threshold
def uplink_with_config(strategy, server_round: int, config: dict) -> dict:
    messages = list(strategy.configure_train(server_round, zeros(), ConfigRecord(config), mock_grid(2)))
    return Instruction.read(messages[0].content).uplink_spec()


def test_hard_threshold_default_lambda_is_the_papers_rule_in_gradient_units():
    """λ = 1/(2√k) thresholds a/γ (the paper's Δ = γ·C_λ(p/γ)): the clients are told γ·λ."""
    ratio, lr = 0.001, 0.2
    spec = uplink_with_config(HardThresholdSGD(ratio=ratio), 1, {"lr": lr})
    assert spec["name"] == "hard-threshold"
    assert spec["lam"] == pytest.approx(lr / (2 * math.sqrt(k_of(ratio, NUMEL))))
    assert uplink_with_config(HardThresholdSGD(threshold=0.3), 1, {"lr": 0.5})["lam"] == pytest.approx(0.15)
    # lr= in the constructor wins over the train config's
    assert uplink_with_config(HardThresholdSGD(threshold=0.3, lr=0.1), 1, {"lr": 0.5})["lam"] == pytest.approx(0.03)
    # a learning-rate schedule in the train config is followed round by round
    strategy = HardThresholdSGD(threshold=2.0)
    assert [uplink_with_config(strategy, t, {"lr": lr})["lam"] for t, lr in ((1, 0.4), (2, 0.1))] == pytest.approx(
        [0.8, 0.2]
    )
    with pytest.raises(ValueError):
        HardThresholdSGD(threshold=-1.0)
    with pytest.raises(ValueError):
        HardThresholdSGD(threshold=float("nan"))
    with pytest.raises(ValueError, match="lr"):
        HardThresholdSGD(threshold=0.1, lr=0.0)


@pytest.mark.parametrize("config,match", [
    ({}, "needs the clients' learning rate"),
    ({"lr": 0.0}, "'lr' must be a finite number > 0"),
    ({"lr": float("nan")}, "'lr' must be a finite number > 0"),
    ({"lr": True}, "'lr' must be a finite number > 0"),
    ({"lr": "0.1"}, "'lr' must be a finite number > 0"),
])
def test_hard_threshold_without_a_usable_learning_rate_is_refused_before_anything_is_sent(config, match):
    grid = mock_grid(2)
    with pytest.raises(ValueError, match=match):
        list(HardThresholdSGD(threshold=0.1).configure_train(1, zeros(), ConfigRecord(config), grid))
    grid.send_and_receive.assert_not_called()
    grid.push_messages.assert_not_called()


def test_hard_threshold_rounds_follow_the_papers_algorithm_box(tmp_path):
    """Algorithm 1 of the hard-threshold paper, literally: p = e + Δ, sent = γ·C_λ(p/γ), e = p − sent,
    w ← w − Σ p_q sent_q; three rounds, unequal weights, two of three clients sampled per round."""
    lam, lr, rounds = 0.9, 0.5, 3
    strategy = HardThresholdSGD(threshold=lam, fraction_train=2 / 3, min_train_nodes=2, min_available_nodes=3,
                                fraction_evaluate=0.0)
    grid = toy_grid(tmp_path)
    w = w0().astype(np.float64)
    errors = {q: np.zeros(D) for q in WEIGHTS}
    arrays = ArrayRecord({"w": Array(w0())})
    sampled_sets = set()
    for t in range(1, rounds + 1):
        messages = list(strategy.configure_train(t, arrays, ConfigRecord({"lr": lr}), grid))
        pids = [grid.node_ids.index(m.metadata.dst_node_id) for m in messages]
        sampled_sets.add(tuple(sorted(pids)))
        arrays, _ = strategy.aggregate_train(t, grid.send_and_receive(messages))
        total = sum(WEIGHTS[q] for q in pids)
        g = np.zeros(D)
        for q in pids:
            p = errors[q] + local_step(q, t)
            scaled = p / lr
            sent = lr * np.where(np.abs(scaled) >= lam, scaled, 0.0)  # γ·C_λ(p/γ)
            errors[q] = p - sent
            g += WEIGHTS[q] / total * sent
        w = w - g
        np.testing.assert_allclose(arrays["w"].numpy(), w, rtol=0, atol=1e-5)
    assert len(sampled_sets) > 1  # partial participation: the clients left out keep their error
    # the threshold mattered: some entries were held back, so λ on p (not p/γ) would have sent other ones
    assert any(np.abs(e).max() > 0 for e in errors.values())


# ----------------------------------------------------------- top-K, dense
def test_topk_and_dense_tell_clients_their_compressor():
    assert uplink_of(TopKSGD(ratio=0.01), 1, mock_grid(2), zeros()) == {"name": "topk", "ratio": 0.01}
    assert uplink_of(TopKSGD(k=7), 1, mock_grid(2), zeros()) == {"name": "topk", "k": 7}
    assert uplink_of(DenseFedAvg(), 1, mock_grid(2), zeros()) == {"name": "none"}
    assert uplink_of(BidirectionalTopKSGD(k=9), 1, mock_grid(2), zeros()) == {"name": "topk", "k": 9}


def test_bidirectional_downlink_k_defaults_to_the_uplink_k(tmp_path):
    assert BidirectionalTopKSGD(ratio=0.01).downlink.k_for(1000) == 10
    assert BidirectionalTopKSGD(k=4).downlink.k_for(1000) == 4
    assert BidirectionalTopKSGD(k=4, downlink_k=2).downlink.k_for(1000) == 2
    # and it is what reaches the model: at most K entries change per round
    grid = toy_grid(tmp_path)
    strategy = BidirectionalTopKSGD(k=3, fraction_evaluate=0.0)
    before = w0()
    _, arrays = play(strategy, grid, 1, ArrayRecord({"w": Array(before)}))
    assert int((arrays["w"].numpy() != before).sum()) == 3


def test_build_strategy_maps_names_and_wire_codes():
    s = build_strategy("bidirectional-topk", ratio=0.01, downlink_ratio=0.002, value_bits=4, positions="rice")
    assert isinstance(s, BidirectionalTopKSGD)
    instr = sent_instructions(s, 1, mock_grid(2), zeros())[0]
    assert (instr.uplink_values, instr.uplink_positions) == ("q4", "rice")
    assert s.downlink_values == "q4" and s.downlink.k_for(1000) == 2
    assert isinstance(build_strategy("topk", ratio=0.01), TopKSGD)
    assert isinstance(build_strategy("fedavg", ratio=0.01), DenseFedAvg)
    assert isinstance(build_strategy("rtopk", ratio=0.01), RTopKSGD)
    assert isinstance(build_strategy("randomk", ratio=0.01), RandomKSGD)
    assert uplink_of(build_strategy("randomk", ratio=0.01), 1, mock_grid(2), zeros()) == {"name": "randomk", "ratio": 0.01}
    assert isinstance(build_strategy("hard-threshold", ratio=0.01), HardThresholdSGD)
    with pytest.raises(ValueError, match="unknown strategy"):
        build_strategy("gossip", ratio=0.01)
    with pytest.raises(ValueError, match="ratio"):
        build_strategy("topk", ratio=0.0)


def test_named_strategies_reject_bad_parameters():
    with pytest.raises(ValueError):
        AdaptiveTopKSGD(num_rounds=0)
    with pytest.raises(ValueError):
        AdaptiveTopKSGD(num_rounds=5, gamma=1.5)
    with pytest.raises(ValueError):
        AdaptiveTopKSGD(num_rounds=5, t_hat=6)
    with pytest.raises(ValueError):
        TopKSGD(ratio=0.0)
