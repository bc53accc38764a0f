"""Flower strategies (Message API) for sparse, error-compensated federated learning.

``build_strategy(name, ...)`` maps the CLI / run-config names to classes.
"""

from __future__ import annotations

from typing import Any

from fl_sparse.strategies.base import ClientUpdate, ServerState, SparseFedAvg
from fl_sparse.strategies.named import (
    AdaptiveTopKSGD,
    BidirectionalTopKSGD,
    DenseFedAvg,
    HardThresholdSGD,
    RandomKSGD,
    RTopKSGD,
    TopKSGD,
)
from fl_sparse.strategies.ssgd_mv import SSGDMajorityVote

__all__ = [
    "SparseFedAvg",
    "ServerState",
    "ClientUpdate",
    "SSGDMajorityVote",
    "DenseFedAvg",
    "TopKSGD",
    "BidirectionalTopKSGD",
    "RTopKSGD",
    "RandomKSGD",
    "HardThresholdSGD",
    "AdaptiveTopKSGD",
    "STRATEGY_NAMES",
    "build_strategy",
]

STRATEGY_NAMES = (
    "fedavg",
    "topk",
    "bidirectional-topk",
    "rtopk",
    "randomk",
    "hard-threshold",
    "adaptive-topk",
    "adaptive-topk-no-ec",
    "ssgd-mv",
    "ssgd-mv-ad",
    "ssgd-mv-rs",
)
ADAPTIVE_NAMES = ("adaptive-topk", "adaptive-topk-no-ec")  # the AdaptiveTopKSGD names, with and without EC


def build_strategy(
    name: str,
    *,
    ratio: float,
    downlink_ratio: float | None = None,
    threshold: float | None = None,
    num_rounds: int = 1,
    value_bits: int = 32,
    add_drop_ratio: float = 0.001,
    positions: str = "raw",
    lr: float = 0.05,
    error_feedback: bool = True,
    r_ratio: float | None = None,
    t_hat: int | None = None,
    **common: Any,
) -> SparseFedAvg:
    """The strategy called ``name`` (one of :data:`STRATEGY_NAMES`), configured.

    ``common`` goes to every strategy (fraction_train, seed, diagnostics, ...).
    ``value_bits`` < 32 quantizes values with the fractional q-bit scheme.
    ``error_feedback=False`` runs a sparse strategy without error compensation:
    clients drop what they did not send (and bidirectional top-K's server keeps
    no δ); ``adaptive-topk-no-ec`` is always without. It is ignored by
    ``fedavg``, which sends everything. ``r_ratio`` sets rTop-k's pool
    r = ⌈r_ratio·d⌉ (default: the paper's k/r = 1/n, n the clients sampled);
    any other strategy refuses it. ``t_hat`` is AdapTop-K's turning point
    (default: estimated after round 1); any other strategy refuses it.
    ``lr`` is AdapTop-K's η for that estimate (hard threshold reads each
    round's train config ``"lr"`` instead).
    """
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"ratio must be in (0, 1], got {ratio}")
    if name not in STRATEGY_NAMES:
        raise ValueError(f"unknown strategy {name!r}; choose one of {', '.join(STRATEGY_NAMES)}")
    if r_ratio is not None and name != "rtopk":
        raise ValueError(f"r_ratio is rTop-k's pool size; strategy {name!r} does not take it")
    if downlink_ratio is not None and name != "bidirectional-topk":
        raise ValueError(f"downlink_ratio is bidirectional top-K's downlink K; strategy {name!r} does not take it")
    if t_hat is not None and name not in ADAPTIVE_NAMES:
        raise ValueError(f"t_hat is AdapTop-K's turning point; strategy {name!r} does not take it")
    if threshold is not None and name != "hard-threshold":
        raise ValueError(f"threshold is the hard-threshold sparsifier's lambda; strategy {name!r} does not take it")
    if value_bits < 32 and name == "fedavg":
        raise ValueError("value_bits quantizes the sparse strategies' values; fedavg sends float32")
    error_feedback = bool(error_feedback)
    values = "fp32" if value_bits >= 32 else f"q{int(value_bits)}"
    wire = dict(uplink_values=values, downlink_values=values, uplink_positions=positions, downlink_positions=positions)
    if name == "fedavg":
        return DenseFedAvg(**common)
    sparse = dict(client_error_feedback=error_feedback, **common)
    if name == "topk":
        return TopKSGD(ratio=ratio, **wire, **sparse)
    if name == "bidirectional-topk":
        return BidirectionalTopKSGD(
            ratio=ratio, downlink_ratio=downlink_ratio or ratio, server_error_feedback=error_feedback, **wire, **sparse
        )
    if name == "rtopk":
        return RTopKSGD(ratio=ratio, r_ratio=r_ratio, **wire, **sparse)
    if name == "randomk":
        return RandomKSGD(ratio=ratio, **wire, **sparse)
    if name == "hard-threshold":
        return HardThresholdSGD(threshold=threshold, ratio=ratio, **wire, **sparse)
    if name in ADAPTIVE_NAMES:
        return AdaptiveTopKSGD(
            ratio=ratio, num_rounds=num_rounds, error_feedback=error_feedback and name == "adaptive-topk", lr=lr,
            t_hat=t_hat, **wire, **common,
        )
    from fl_sparse.strategies.ssgd_mv import build_ssgd_mv

    return build_ssgd_mv(
        name, ratio=ratio, add_drop_ratio=add_drop_ratio, value_bits=value_bits, positions=positions, **sparse
    )
