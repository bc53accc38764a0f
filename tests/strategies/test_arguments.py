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
    (RTopKSGD, {"r": 40, "r_ratio": 0.1}, "^give at most one of r and r_ratio$"),
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


# ----------------------------------------------------------- the checks themselves (each edge once)
def test_is_number_takes_reals_and_not_bools():
    from fl_sparse.strategies.arguments import is_number

    assert [is_number(v) for v in (0, 2.5, np.float32(1), np.int64(3), math.nan)] == [True] * 5
    assert [is_number(v) for v in (True, False, np.bool_(True), "1", None, 1j)] == [False] * 6


def test_ratio_argument_is_open_at_zero_and_closed_at_the_top():
    from fl_sparse.strategies.arguments import ratio_argument

    assert ratio_argument("r", 1) == 1.0 and type(ratio_argument("r", np.float32(0.5))) is float
    assert ratio_argument("r", 1e-300) == 1e-300
    assert ratio_argument("r", 3, upper=4.0) == 3.0 and ratio_argument("r", 4, upper=4.0) == 4.0
    for bad, upper, shown in ((0, 1.0, "0"), (0.0, 1.0, "0.0"), (1.0000001, 1.0, "1.0000001"), (4.5, 4.0, "4.5")):
        with pytest.raises(ValueError) as info:
            ratio_argument("the ratio", bad, upper=upper)
        assert str(info.value) == f"the ratio must be a number in (0, {upper:g}], got {shown}"


def test_count_argument_takes_integers_from_the_minimum():
    from fl_sparse.strategies.arguments import count_argument

    assert count_argument("n", 1) == 1 and type(count_argument("n", np.int64(7))) is int
    assert count_argument("n", 0, minimum=0) == 0 and count_argument("n", 5, minimum=5) == 5
    for bad, minimum in ((0, 1), (4, 5), (True, 0), (2.0, 1), ("3", 1)):
        with pytest.raises(ValueError) as info:
            count_argument("the count", bad, minimum=minimum)
        assert str(info.value) == f"the count must be an integer >= {minimum}, got {bad!r}"


def test_flag_argument_takes_only_bools():
    from fl_sparse.strategies.arguments import flag_argument

    assert flag_argument("f", True) is True and flag_argument("f", False) is False
    for bad in (1, 0, "true", None):
        with pytest.raises(ValueError) as info:
            flag_argument("the flag", bad)
        assert str(info.value) == f"the flag must be True or False, got {bad!r}"


def test_names_argument_takes_one_name_or_several():
    from fl_sparse.strategies.arguments import names_argument

    assert names_argument("n", "bn.running_mean") == ("bn.running_mean",)
    assert names_argument("n", ["a", "b"]) == ("a", "b") and names_argument("n", (n for n in "xy")) == ("x", "y")
    assert names_argument("n", []) == ()
    for bad in (5, None, ["a", 3], [b"a"]):
        with pytest.raises(ValueError) as info:
            names_argument("the names", bad)
        assert str(info.value) == f"the names must be an array name or a list of them, got {bad!r}"
