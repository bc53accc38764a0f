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
    "hard-threshold",
    "adaptive-topk",
    "adaptive-topk-no-ec",
    "ssgd-mv",
    "ssgd-mv-ad",
    "ssgd-mv-rs",
)


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
    **common: Any,
) -> SparseFedAvg:
    """The strategy called ``name`` (one of :data:`STRATEGY_NAMES`), configured.

    ``common`` goes to every strategy (fraction_train, seed, diagnostics, ...).
    ``value_bits`` < 32 quantizes values with the fractional q-bit scheme.
    """
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"ratio must be in (0, 1], got {ratio}")
    values = "fp32" if value_bits >= 32 else f"q{int(value_bits)}"
    wire = dict(uplink_values=values, downlink_values=values, uplink_positions=positions, downlink_positions=positions)
    if name == "fedavg":
        return DenseFedAvg(**common)
    if name == "topk":
        return TopKSGD(ratio=ratio, **wire, **common)
    if name == "bidirectional-topk":
        return BidirectionalTopKSGD(ratio=ratio, downlink_ratio=downlink_ratio or ratio, **wire, **common)
    if name == "rtopk":
        return RTopKSGD(ratio=ratio, **wire, **common)
    if name == "hard-threshold":
        return HardThresholdSGD(threshold=threshold, ratio=ratio, **wire, **common)
    if name in ("adaptive-topk", "adaptive-topk-no-ec"):
        return AdaptiveTopKSGD(
            ratio=ratio, num_rounds=num_rounds, error_feedback=name == "adaptive-topk", lr=lr, **wire, **common
        )
    if name.startswith("ssgd-mv"):
        from fl_sparse.strategies.ssgd_mv import build_ssgd_mv

        return build_ssgd_mv(
            name, ratio=ratio, add_drop_ratio=add_drop_ratio, value_bits=value_bits, positions=positions, **common
        )
    raise ValueError(f"unknown strategy {name!r}; choose one of {', '.join(STRATEGY_NAMES)}")
