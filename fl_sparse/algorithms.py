r"""The seed papers' per-round math, once, as plain functions on flat tensors.

Nothing here knows Flower or the wire format: the client mod
(:mod:`fl_sparse.clients.mod`), the strategies (:mod:`fl_sparse.strategies`)
and the plain reference loop (:mod:`fl_sparse.simulations.reference`) all
call these functions, so the reference cannot drift from what runs.
Sign convention of the papers: a client's update is the *descent step*
``Δ = w_before − w_after`` and the model moves by ``w ← w − ĝ``.

Papers (full texts in the project's ``shared/papers``):

* [ZDL] W. Zou, H. De Sterck, J. Liu, *Downlink Compression Improves Top_K
  Sparsification* — Algorithm 1 (top-K SGD with error feedback) and
  Algorithm 2 (bidirectional: the server keeps an error δ too):
  :func:`client_compress`, :func:`server_compress`.
* [SDA+] A. N. Sahu, A. Dutta, A. M. Abdelmoniem, T. Banerjee, M. Canini,
  P. Kalnis, *Rethinking gradient sparsification as total error
  minimization* — the hard-threshold sparsifier and its λ = 1/(2√k) rule:
  :func:`hard_threshold_for_topk` (compressor
  :class:`~fl_sparse.compressors.HardThreshold`).
* [BIIO] L. P. Barnes, H. A. Inan, B. Isik, A. Özgür, *rTop-k: A Statistical
  Estimation Approach to Distributed SGD* — compressor
  :class:`~fl_sparse.compressors.RTopK` with k/r = 1/n.
* [RYX+] M. Ruan, G. Yan, Y. Xiao, L. Song, W. Xu, *Adaptive Top-K in SGD
  for Communication-Efficient Distributed Learning in Multi-Robot
  Collaboration* — the k_t schedule and the t̂ estimate:
  :func:`adaptive_k_schedule`, :func:`adaptive_k_t_hat`.
* [OOG] K. Ozfatura, E. Ozfatura, D. Gündüz, *Distributed sparse SGD with
  majority voting* — Algorithm 1 (vote, majority or vote-weighted random
  mask) and Algorithm 2 (add-drop votes): :func:`vote_counts`,
  :func:`select_majority`, :func:`select_weighted`, :func:`add_drop`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from fl_sparse.compressors import adaptive_k_schedule, adaptive_k_t_hat, hard_threshold_for_topk
from fl_sparse.memory import ErrorFeedback, shares_memory
from fl_sparse.sparse import SparseTensor

__all__ = [
    "ClientStep",
    "client_compress",
    "weighted_sum",
    "server_compress",
    "vote_counts",
    "select_majority",
    "select_weighted",
    "add_drop",
    "is_member",
    "adaptive_k_schedule",
    "adaptive_k_t_hat",
    "hard_threshold_for_topk",
]

Quantize = Callable[[SparseTensor], SparseTensor]


def _exact(sparse: SparseTensor) -> SparseTensor:
    return sparse


# ====================================================================== [ZDL] Alg. 1 / 2
@dataclass
class ClientStep:
    """One client round: ``a = e + Δ``, ``s = C(a)``, ``sent = Q(s)``, ``e ← a − sent``."""

    compensated: torch.Tensor | None  # a (None after an in-place round: its memory holds e now)
    compressed: SparseTensor  # C(a): what to encode (the value code applies Q)
    sent: SparseTensor  # Q(C(a)): exactly what the server will decode
    compression_error: float  # ‖a − sent‖², the round's error (hard-threshold paper's "total error" term)
    error_norm: float = 0.0  # ‖e‖ after the round (= ‖a − sent‖ with the memory on): one norm per round


def client_compress(
    step: torch.Tensor,
    memory: ErrorFeedback,
    compress: Callable[[torch.Tensor], SparseTensor],
    quantize: Quantize = _exact,
    *,
    in_place: bool = False,
) -> ClientStep:
    """Worker side of [ZDL] Algorithm 1 (and 2): error-compensated compression.

    ::

        a = e + Δ            (Δ = α g, or w − SGD_H(w) with H local steps)
        s = Q(C(a))          C: top-K, rTop-k, hard threshold, ...; Q: value code
        e ← a − s            nothing is lost, only delayed

    ``memory`` holds ``e`` and is updated in place (a zero memory turns this
    into plain compression: no error feedback).

    ``in_place=True``: the caller gives ``step`` up, and ``a`` and then the new
    ``e`` are computed in its memory, so the round allocates no dense vector
    (``ClientStep.compensated`` is then None).
    """
    a = memory.compensate(step, out=step if in_place and step.dtype == memory.dtype else None)
    compressed = compress(a)
    if in_place and shares_memory(compressed.values, a):  # a compressor whose values view its input
        compressed = SparseTensor(compressed.indices, compressed.values.clone(), compressed.numel)
    sent = quantize(compressed)
    memory.update(a, sent, in_place=in_place)
    norm = memory.norm()
    return ClientStep(None if in_place else a, compressed, sent, norm**2, norm)


def weighted_sum(updates: list[SparseTensor], weights: list[float]) -> SparseTensor:
    """g_t = Σ_q p_q s_q: the server's aggregate of the clients' sparse updates."""
    return SparseTensor.sum(updates, weights)


def server_compress(
    aggregate: SparseTensor,
    memory: ErrorFeedback | None,
    compress: Callable[[torch.Tensor], SparseTensor] | None,
    quantize: Quantize = _exact,
) -> SparseTensor:
    """Server side of [ZDL]: what goes down, before the value code: ĝ_t = Q(returned).

    Algorithm 1 (``compress is None``): the aggregate g_t itself, the union of
    the uplink supports. Algorithm 2: ``g = g_t + δ_{t−1}``, returns
    ``Top_K(g)`` and keeps ``δ_t = g − Q(Top_K(g))`` (``memory`` holds δ;
    ``None`` drops it). The caller encodes the result; the value code applies
    ``Q``, so the model moves by exactly what the clients decode.
    """
    if compress is None:
        return aggregate
    dense = aggregate.to_dense()
    if memory is None:
        return compress(dense)
    g = memory.compensate(dense)
    compressed = compress(g)
    memory.update(g, quantize(compressed))
    return compressed


# ====================================================================== [OOG] voting
def is_member(x: torch.Tensor, sorted_set: torch.Tensor) -> torch.Tensor:
    """``x[i] in sorted_set`` for a sorted 1-D ``sorted_set`` (binary search; faster than isin)."""
    if sorted_set.numel() == 0:
        return torch.zeros(x.shape, dtype=torch.bool, device=x.device)
    s = sorted_set.to(torch.int64)
    pos = torch.searchsorted(s, x.to(torch.int64)).clamp_(max=s.numel() - 1)
    return s[pos] == x


def vote_counts(votes: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(positions, counts) of a list of votes: sorted distinct positions and how many votes each got."""
    if not votes:
        empty = torch.empty(0, dtype=torch.int64)
        return empty, empty
    return torch.unique(torch.cat([v.to(torch.int64) for v in votes]), sorted=True, return_counts=True)


def _fill(chosen: torch.Tensor, voted: torch.Tensor, k: int, numel: int, generator: torch.Generator | None) -> torch.Tensor:
    """``chosen`` plus ``k − len(chosen)`` positions that got no vote (random, or lowest without a generator)."""
    need = k - chosen.numel()
    if need <= 0:
        return chosen.sort().values
    free = torch.ones(numel, dtype=torch.bool)
    free[voted] = False
    candidates = torch.nonzero(free).flatten()
    if generator is not None:
        keys = torch.rand(candidates.numel(), generator=generator)
        candidates = candidates[torch.topk(keys, need, largest=False).indices]
    else:
        candidates = candidates[:need]
    return torch.cat([chosen, candidates]).sort().values


def select_majority(
    positions: torch.Tensor,
    counts: torch.Tensor,
    k: int,
    numel: int,
    *,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """[OOG] Alg. 1 l. 14 / Alg. 2 l. 22: sorted int64 mask of the ``k`` positions with the most votes.

    ``positions`` are the voted positions (sorted, distinct), ``counts`` their
    vote counts (> 0). Ties at the k-th count: a random subset drawn with
    ``generator`` (seeded by the caller: reproducible), or the lowest
    positions if ``generator`` is None. Fewer than ``k`` voted positions:
    filled up with unvoted ones the same way.
    """
    k = max(0, min(int(k), numel))
    n = positions.numel()
    if k == 0:
        return torch.empty(0, dtype=torch.int64)
    if n <= k:
        return _fill(positions.to(torch.int64), positions, k, numel, generator)
    counts = counts.to(torch.int64)
    kth = torch.kthvalue(counts, n - k + 1).values
    above = positions[counts > kth]
    tied = positions[counts == kth]
    need = k - above.numel()
    if generator is not None:
        tied = tied[torch.randperm(tied.numel(), generator=generator)[:need]]
    else:
        tied = tied[:need]
    return torch.cat([above, tied]).to(torch.int64).sort().values


def select_weighted(
    positions: torch.Tensor,
    counts: torch.Tensor,
    k: int,
    numel: int,
    *,
    generator: torch.Generator,
) -> torch.Tensor:
    """[OOG] Alg. 1 l. 15 (SSGD-MV-RS): ``k`` distinct positions drawn ∝ votes, without replacement.

    Exponential race: position ``i`` gets the key ``E_i = −log(U_i) / w_i``
    (``E_i ~ Exp(w_i)``); the ``k`` smallest keys are the first ``k`` draws of
    sequential sampling without replacement with probabilities ∝ ``w``.
    Returns a sorted int64 mask.
    """
    k = max(0, min(int(k), numel))
    n = positions.numel()
    if n <= k:
        return _fill(positions.to(torch.int64), positions, k, numel, generator)
    w = counts.to(torch.float64)
    u = torch.rand(n, generator=generator, dtype=torch.float64)
    keys = -torch.log(u) / w  # u == 0 gives +inf: never drawn (probability 2**-53)
    chosen = positions[torch.topk(keys, k, largest=False, sorted=False).indices]
    return chosen.to(torch.int64).sort().values


def add_drop(a: torch.Tensor, previous: torch.Tensor, top: torch.Tensor, k_ad: int):
    """[OOG] Algorithm 2, lines 11-15: ``(vote, adds, drops)``, all sorted int64.

    ``previous`` is the last vote (K sorted positions), ``top`` = supp
    Top_K(|a|). Adds: the ``n`` positions of ``top \\ previous`` with the
    largest ``|a|``; drops: the ``n`` positions of ``previous \\ top`` with the
    smallest ``|a|``; ``n = min(k_ad, |top \\ previous|)`` (= ``|previous \\ top|``
    when both have K positions), so the new vote has K positions again. Ties
    in ``|a|`` go to the lower position.
    """
    previous = previous.to(torch.int64)
    top = top.to(torch.int64)
    new_candidates = top[~is_member(top, previous)]
    old_candidates = previous[~is_member(previous, top)]
    n = min(int(k_ad), new_candidates.numel(), old_candidates.numel())
    if n == 0:
        empty = torch.empty(0, dtype=torch.int64, device=a.device)
        return previous, empty, empty
    mag_new = a[new_candidates].abs()
    mag_old = a[old_candidates].abs()
    # stable sorts: equal magnitudes keep position order (candidates are sorted)
    adds = new_candidates[torch.sort(mag_new, descending=True, stable=True).indices[:n]].sort().values
    drops = old_candidates[torch.sort(mag_old, stable=True).indices[:n]].sort().values
    keep = previous[~is_member(previous, drops)]
    vote = torch.cat([keep, adds]).sort().values
    return vote, adds, drops
