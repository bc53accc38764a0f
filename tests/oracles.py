"""Numpy oracles the strategy tests check fl-sparse against (independent of its torch code)."""

from __future__ import annotations

import numpy as np


def topk_np(x: np.ndarray, k: int) -> np.ndarray:
    """The papers' Top_K(x): the k entries of largest magnitude kept, the rest zero (ties: lower index first)."""
    out = np.zeros_like(x)
    idx = np.argsort(-np.abs(x), kind="stable")[:k]
    out[idx] = x[idx]
    return out
