"""A strategy built with a wrong argument says which argument, at construction (fl_sparse.strategies.arguments)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fl_sparse.strategies import (
    AdaptiveTopKSGD,
    BidirectionalTopKSGD,
    HardThresholdSGD,
    RandomKSGD,
    RTopKSGD,
    SSGDMajorityVote,
    TopKSGD,
)

BAD = [
    (HardThresholdSGD, {"ratio": math.nan}, "ratio must be a number in \\(0, 1\\], got nan"),
    (HardThresholdSGD, {"ratio": 5}, "ratio must be a number in \\(0, 1\\], got 5"),
    (HardThresholdSGD, {"threshold": "0.1"}, "threshold must be a finite number >= 0, got '0.1'"),
    (TopKSGD, {"ratio": "0.1"}, "ratio must be a number in \\(0, 1\\], got '0.1'"),
    (TopKSGD, {"ratio": True}, "ratio must be a number"),
    (RandomKSGD, {"k": 2.5}, "k must be an integer >= 1, got 2.5"),
    (RTopKSGD, {"r": 0}, "r must be an integer >= 1, got 0"),
    (RTopKSGD, {"r": 40.0}, "r must be an integer >= 1, got 40.0"),
    (RTopKSGD, {"r": True}, "r must be an integer >= 1, got True"),
    (RTopKSGD, {"r_ratio": True}, "r_ratio must be a number in \\(0, 1\\], got True"),
    (RTopKSGD, {"r_ratio": math.nan}, "r_ratio must be a number in \\(0, 1\\], got nan"),
    (RTopKSGD, {"r_ratio": 1.5}, "r_ratio must be a number in \\(0, 1\\], got 1.5"),
    (RTopKSGD, {"r": 40, "r_ratio": 0.1}, "give at most one of r and r_ratio"),
    (TopKSGD, {"k": 0}, "k must be an integer >= 1, got 0"),
    (BidirectionalTopKSGD, {"downlink_ratio": 2}, "downlink_ratio must be a number in \\(0, 1\\], got 2"),
    (BidirectionalTopKSGD, {"downlink_k": 0}, "downlink_k must be an integer >= 1, got 0"),
    (SSGDMajorityVote, {"add_drop_k": -1}, "add_drop_k must be an integer >= 1, got -1"),
    (SSGDMajorityVote, {"k": 10, "add_drop_k": 100}, "add_drop_k must be <= k \\(10\\), got 100"),
    (SSGDMajorityVote, {"ratio": None}, "ratio must be a number in \\(0, 1\\], got None"),
    (SSGDMajorityVote, {"add_drop_ratio": "0.001"}, "add_drop_ratio must be in \\(0, ratio\\]"),
    (AdaptiveTopKSGD, {"num_rounds": 5.5}, "num_rounds must be an integer >= 1, got 5.5"),
    (AdaptiveTopKSGD, {"num_rounds": 5, "t_hat": 2.5}, "t_hat must be an integer >= 0, got 2.5"),
    (AdaptiveTopKSGD, {"num_rounds": 5, "t_hat": 6}, "t_hat must be in \\[0, num_rounds\\], got 6"),
    (AdaptiveTopKSGD, {"num_rounds": 5, "lr": math.nan}, "lr must be a finite number > 0, got nan"),
    (AdaptiveTopKSGD, {"num_rounds": 5, "sigma_sq": -1.0}, "sigma_sq must be a finite number > 0"),
    (AdaptiveTopKSGD, {"num_rounds": 5, "error_feedback": "false"}, "error_feedback must be True or False"),
    (TopKSGD, {"client_error_feedback": "no"}, "client_error_feedback must be True or False, got 'no'"),
    (BidirectionalTopKSGD, {"server_error_feedback": 1}, "server_error_feedback must be True or False, got 1"),
    (TopKSGD, {"diagnostics": None}, "diagnostics must be True or False"),
    (TopKSGD, {"seed": "abc"}, "seed must be an integer >= 0, got 'abc'"),
    (TopKSGD, {"seed": -1}, "seed must be an integer >= 0, got -1"),
    (TopKSGD, {"exact_arrays": 5}, "exact_arrays must be an array name or a list of them, got 5"),
    (TopKSGD, {"exact_arrays": ["bn.running_mean", 3]}, "exact_arrays must be an array name or a list of them"),
]


@pytest.mark.parametrize("cls,kwargs,message", BAD, ids=[f"{c.__name__}-{sorted(k)}-{i}" for i, (c, k, _) in enumerate(BAD)])
def test_a_wrong_argument_is_named_at_construction(cls, kwargs, message):
    with pytest.raises(ValueError, match=message):
        cls(**kwargs)


def test_good_arguments_keep_their_meaning():
    assert TopKSGD(k=np.int64(7)).uplink == {"name": "topk", "k": 7}  # numpy integers are integers
    assert TopKSGD(ratio=1).uplink == {"name": "topk", "ratio": 1.0}
    assert TopKSGD(exact_arrays="bn.running_mean").exact_arrays == ("bn.running_mean",)
    assert TopKSGD(exact_arrays=["a", "b"], seed=np.int32(3)).exact_arrays == ("a", "b")
    assert TopKSGD(seed=np.int32(3)).seed == 3
    # numpy's numbers (a run config read with numpy, a sweep over np.arange) are numbers here too
    assert RTopKSGD(k=5, r=np.int64(40)).options()["r"] == 40
    assert RTopKSGD(k=5, r_ratio=np.float32(0.5)).options()["r_ratio"] == 0.5
    assert SSGDMajorityVote(k=10, add_drop_k=10).add_drop_compressor.k == 10
    assert AdaptiveTopKSGD(num_rounds=5, t_hat=0, error_feedback=False).client_error_feedback is False
    assert BidirectionalTopKSGD(ratio=0.01, downlink_ratio=0.02).downlink.ratio == 0.02


@pytest.mark.parametrize(
    "name,option,message",
    [
        ("topk", {"threshold": 0.1}, "threshold is the hard-threshold sparsifier's lambda; strategy 'topk'"),
        ("ssgd-mv", {"downlink_ratio": 0.01}, "downlink_ratio is bidirectional top-K's downlink K; strategy 'ssgd-mv'"),
        ("fedavg", {"value_bits": 4}, "value_bits quantizes the sparse strategies' values; fedavg sends float32"),
        ("topk", {"t_hat": 2, "num_rounds": 4}, "t_hat is AdapTop-K's turning point; strategy 'topk'"),
    ],
)
def test_build_strategy_refuses_an_option_the_strategy_would_ignore(name, option, message):
    from fl_sparse.strategies import build_strategy

    with pytest.raises(ValueError, match=message):
        build_strategy(name, ratio=0.01, **option)
    owner = {"threshold": "hard-threshold", "downlink_ratio": "bidirectional-topk", "value_bits": "topk",
             "t_hat": "adaptive-topk"}[next(iter(option))]
    build_strategy(owner, ratio=0.01, **option)  # the strategy whose option it is takes it


def test_t_hat_reaches_adaptive_topk_from_the_run_config_and_the_cli():
    """--t-hat / t-hat in pyproject (< 0: unset) / RunConfig.t_hat -> AdaptiveTopKSGD(t_hat=...)."""
    from fl_sparse.cli import build_parser
    from fl_sparse.server_app import RunConfig, strategy_from_config

    args = build_parser().parse_args(["simulate", "--strategy", "adaptive-topk", "--rounds", "10", "--t-hat", "4"])
    cfg = RunConfig(strategy=args.strategy, rounds=args.rounds, t_hat=args.t_hat)
    assert strategy_from_config(cfg).t_hat == 4
    assert strategy_from_config(RunConfig(strategy="adaptive-topk", rounds=10)).t_hat is None  # estimated
    assert RunConfig.from_run_config({"strategy": "adaptive-topk", "t-hat": -1}).t_hat is None
    assert RunConfig.from_run_config({"strategy": "adaptive-topk", "num-rounds": 30, "t-hat": 7}).t_hat == 7
