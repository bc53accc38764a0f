"""The papers' per-round math in :mod:`fl_sparse.algorithms`, against hand-written oracles.

[ZDL] Algorithms 1/2 (client error feedback, server error δ), the weighted
aggregate, and [OOG]'s vote counting, majority / vote-weighted mask
selection and add-drop votes. Oracles are plain Python / NumPy loops
written from the papers, not calls into the code under test.
"""

from __future__ import annotations

import collections

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fl_sparse import algorithms, codec
from fl_sparse.algorithms import (
    add_drop,
    client_compress,
    is_member,
    select_majority,
    select_weighted,
    server_compress,
    vote_counts,
    weighted_sum,
)
from fl_sparse.memory import ErrorFeedback
from fl_sparse.sparse import SparseTensor

QUANTIZERS = {
    "exact": None,
    "fp16": lambda s: codec.lossy_roundtrip(s, values="fp16"),
    "q4": lambda s: codec.lossy_roundtrip(s, values="q4"),
}


def _quantizer(name: str):
    """The value code ``name`` of QUANTIZERS and client_compress's keyword arguments for it."""
    q = QUANTIZERS[name]
    return q, ({} if q is None else {"quantize": q})


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _topk_oracle(x: torch.Tensor, k: int) -> SparseTensor:
    """Top-k by magnitude, written out: sort |x| descending (float64), keep the first k."""
    order = np.argsort(-np.abs(x.double().numpy()), kind="stable")[:k]
    idx = torch.from_numpy(np.sort(order)).to(torch.int64)
    return SparseTensor(idx, x[idx].clone(), x.numel())


def _heavy(numel: int, seed: int) -> torch.Tensor:
    """Continuous heavy-tailed values: no ties in |x|, so top-k is unique."""
    return torch.randn(numel, generator=_gen(seed)) ** 3


# ====================================================================== [ZDL] client side
@settings(max_examples=60, deadline=None)
@given(
    numel=st.integers(1, 300),
    data=st.data(),
    quant=st.sampled_from(sorted(QUANTIZERS)),
    seed=st.integers(0, 2**31 - 1),
)
def test_client_compress_keeps_everything_it_did_not_send(numel, data, quant, seed):
    k = data.draw(st.integers(1, numel))
    rounds = data.draw(st.integers(1, 4))
    q, kwargs = _quantizer(quant)
    memory = ErrorFeedback(numel)
    e = torch.zeros(numel, dtype=torch.float64)  # the oracle's e, in float64
    for t in range(rounds):
        step = _heavy(numel, seed + t) * 1e-2
        before = memory.error.clone()
        out = client_compress(step, memory, lambda a: _topk_oracle(a, k), **kwargs)
        # a = e + Δ
        assert torch.equal(out.compensated, before + step)
        # s = Q(C(a)): the top-k positions of a, values (quantized) of a there
        expected_c = _topk_oracle(out.compensated, k)
        assert torch.equal(out.compressed.indices, expected_c.indices)  # C(a), before the value code
        assert torch.equal(out.compressed.values, expected_c.values)
        assert torch.equal(out.sent.indices, expected_c.indices)
        if q is None:
            assert torch.equal(out.sent.values, expected_c.values)
        else:
            assert torch.equal(out.sent.values, q(expected_c).values)
        # e <- a - s: nothing lost, e + s == a
        sent = out.sent.to_dense()
        e_new = memory.error
        if q is None:
            assert torch.equal(e_new + sent, out.compensated)  # exact: e is 0 on the support
            assert bool((e_new[out.sent.indices] == 0).all())
        else:
            torch.testing.assert_close(e_new + sent, out.compensated, rtol=1e-6, atol=1e-6)
        keep = torch.ones(numel, dtype=torch.bool)
        keep[out.sent.indices] = False
        assert torch.equal(e_new[keep], out.compensated[keep])
        # compression error: ||a - s||^2
        assert out.compression_error == pytest.approx(float(((out.compensated.double() - sent.double()) ** 2).sum()), rel=1e-5, abs=1e-12)
        # float64 oracle of the whole recursion (error feedback over rounds)
        a64 = e + step.double()
        e = a64 - sent.double()
        torch.testing.assert_close(e_new.double(), e, rtol=1e-5, atol=1e-6)


@settings(max_examples=40, deadline=None)
@given(numel=st.integers(1, 200), data=st.data(), quant=st.sampled_from(sorted(QUANTIZERS)), seed=st.integers(0, 2**31 - 1))
def test_client_compress_with_a_zero_memory_is_plain_compression(numel, data, quant, seed):
    k = data.draw(st.integers(1, numel))
    q, kwargs = _quantizer(quant)
    for t in range(3):  # a fresh (zero) memory every round: nothing carried over
        step = _heavy(numel, seed + t)
        out = client_compress(step, ErrorFeedback(numel), lambda a: _topk_oracle(a, k), **kwargs)
        plain = _topk_oracle(step, k)
        plain = plain if q is None else q(plain)
        assert torch.equal(out.compensated, step)
        assert torch.equal(out.sent.indices, plain.indices) and torch.equal(out.sent.values, plain.values)


@settings(max_examples=40, deadline=None)
@given(numel=st.integers(1, 200), data=st.data(), quant=st.sampled_from(sorted(QUANTIZERS)), seed=st.integers(0, 2**31 - 1))
def test_client_compress_in_place_is_the_same_round_in_the_step_s_memory(numel, data, quant, seed):
    """in_place=True: what is sent and the new e are the copying round's, bit for bit; e lives in the step's buffer."""
    k = data.draw(st.integers(1, numel))
    q, kwargs = _quantizer(quant)
    # a compressor whose values view its input, as a user's might: the sent values must be a's, not e's
    viewing = lambda a: SparseTensor(torch.arange(k), a[:k], numel)  # noqa: E731
    compress = data.draw(st.sampled_from([lambda a: _topk_oracle(a, k), viewing]))
    copying, in_place = ErrorFeedback(numel), ErrorFeedback(numel)
    for t in range(3):
        step = _heavy(numel, seed + t) * 1e-2
        mine = step.clone()
        want = client_compress(step, copying, compress, **kwargs)
        got = client_compress(mine, in_place, compress, **kwargs, in_place=True)
        assert got.compensated is None
        assert in_place.error.data_ptr() == mine.data_ptr()
        for name in ("compressed", "sent"):
            assert torch.equal(getattr(got, name).indices, getattr(want, name).indices)
            assert torch.equal(getattr(got, name).values, getattr(want, name).values)
        assert torch.equal(in_place.error, copying.error)
        assert got.error_norm == want.error_norm and got.compression_error == want.compression_error


def test_client_compress_carries_the_error_into_the_next_round():
    # a position too small to be sent in round 1 is sent in round 2 once its error has grown
    step = torch.tensor([1.0, 0.625, 0.0, 0.0])  # dyadic values: the sums below are exact
    memory = ErrorFeedback(4)
    r1 = client_compress(step, memory, lambda a: _topk_oracle(a, 1))
    assert r1.sent.indices.tolist() == [0] and memory.error.tolist() == [0.0, 0.625, 0.0, 0.0]
    r2 = client_compress(torch.tensor([0.5, 0.5, 0.0, 0.0]), memory, lambda a: _topk_oracle(a, 1))
    assert r2.sent.indices.tolist() == [1] and r2.sent.values.tolist() == [1.125]
    assert memory.error.tolist() == [0.5, 0.0, 0.0, 0.0]


# ====================================================================== aggregate
@settings(max_examples=60, deadline=None)
@given(numel=st.integers(1, 200), n=st.integers(1, 6), data=st.data(), seed=st.integers(0, 2**31 - 1))
def test_weighted_sum_is_the_weighted_dense_sum_on_the_union_of_supports(numel, n, data, seed):
    gen = _gen(seed)
    parts, weights = [], []
    for _ in range(n):
        k = int(torch.randint(0, numel + 1, (1,), generator=gen))
        idx = torch.randperm(numel, generator=gen)[:k].sort().values
        parts.append(SparseTensor(idx, torch.randn(k, generator=gen), numel))
        weights.append(data.draw(st.floats(0.01, 10.0)))
    total = sum(weights)
    p = [w / total for w in weights]
    out = weighted_sum(parts, p)
    dense = sum(pq * part.to_dense().double() for part, pq in zip(parts, p))
    torch.testing.assert_close(out.to_dense().double(), dense, rtol=1e-5, atol=1e-6)
    union = sorted(set().union(*(set(part.indices.tolist()) for part in parts)))
    assert out.indices.tolist() == union  # exact cancellations keep their position


def test_weighted_sum_keeps_exact_cancellations_and_unequal_weights():
    a = SparseTensor(torch.tensor([0, 3]), torch.tensor([1.0, 2.0]), 5)
    b = SparseTensor(torch.tensor([3, 4]), torch.tensor([-2.0, 8.0]), 5)
    out = weighted_sum([a, b], [0.5, 0.5])
    assert out.indices.tolist() == [0, 3, 4] and out.values.tolist() == [0.5, 0.0, 4.0]
    out = weighted_sum([a, b], [0.75, 0.25])
    assert out.values.tolist() == [0.75, 1.0, 2.0]


# ====================================================================== [ZDL] server side
def _random_aggregate(numel: int, seed: int, density: float = 0.3) -> SparseTensor:
    gen = _gen(seed)
    k = max(1, int(numel * density))
    idx = torch.randperm(numel, generator=gen)[:k].sort().values
    return SparseTensor(idx, torch.randn(k, generator=gen) ** 3, numel)


@pytest.mark.parametrize("quant", sorted(QUANTIZERS))
def test_server_compress_algorithm_1_sends_the_aggregate(quant):
    """Algorithm 1: the aggregate goes down as it is (the value code, Q, is applied when it is encoded)."""
    q, kwargs = _quantizer(quant)
    memory = ErrorFeedback(50)
    for t in range(3):
        g = _random_aggregate(50, t)
        out = server_compress(g, memory, None, **kwargs)
        assert torch.equal(out.indices, g.indices) and torch.equal(out.values, g.values)
        assert memory.norm() == 0.0  # Algorithm 1: the server keeps no error


@pytest.mark.parametrize("quant", sorted(QUANTIZERS))
@pytest.mark.parametrize("keep_error", [True, False])
def test_server_compress_algorithm_2_matches_a_hand_written_loop(quant, keep_error):
    """g = g_t + δ_{t-1};  Top_K(g) goes down (encoded: ĝ_t = Q(Top_K(g)));  δ_t = g − ĝ_t."""
    numel, k = 120, 7
    q, kwargs = _quantizer(quant)
    memory = ErrorFeedback(numel) if keep_error else None
    delta = torch.zeros(numel)
    for t in range(6):
        g_t = _random_aggregate(numel, 100 + t)
        out = server_compress(g_t, memory, lambda x: _topk_oracle(x, k), **kwargs)
        g = g_t.to_dense() + delta  # same float32 additions as any implementation of the formula
        top = _topk_oracle(g, k)
        assert torch.equal(out.indices, top.indices), t
        assert torch.equal(out.values, top.values), t
        if keep_error:
            g_hat = top if q is None else q(top)  # what the clients decode
            delta = g.clone()
            delta[g_hat.indices] -= g_hat.values
            assert torch.equal(memory.error, delta), t
            assert float(delta.abs().sum()) > 0
            if q is not None:
                assert bool((delta[top.indices] != 0).any())  # δ keeps what Q lost on the support


# ====================================================================== [OOG] votes
@settings(max_examples=60, deadline=None)
@given(st.lists(st.lists(st.integers(0, 60), unique=True, max_size=20), max_size=7))
def test_vote_counts_counts_every_vote(votes):
    positions, counts = vote_counts([torch.tensor(sorted(v), dtype=torch.int32) for v in votes])
    expected = collections.Counter(p for v in votes for p in v)
    assert positions.tolist() == sorted(expected)
    assert counts.tolist() == [expected[p] for p in sorted(expected)]
    assert positions.dtype == torch.int64


@settings(max_examples=80, deadline=None)
@given(st.lists(st.integers(0, 500), max_size=40), st.lists(st.integers(-5, 505), max_size=40))
def test_is_member_is_set_membership(sorted_set, x):
    s = torch.tensor(sorted(set(sorted_set)), dtype=torch.int64)
    xt = torch.tensor(x, dtype=torch.int64)
    assert is_member(xt, s).tolist() == [v in set(sorted_set) for v in x]


def _majority_oracle(votes: list[list[int]], k: int, numel: int) -> list[int]:
    """Top-k by count, ties to the lowest position; filled with the lowest unvoted positions."""
    counts = collections.Counter(p for v in votes for p in v)
    ranked = sorted(counts, key=lambda p: (-counts[p], p))[:k]
    fill = [p for p in range(numel) if p not in counts][: max(0, k - len(ranked))]
    return sorted(ranked + fill)


def test_majority_picks_the_most_voted_positions_and_breaks_ties_by_seed():
    numel, k = 50, 4
    votes = [[1, 5, 7, 9], [1, 5, 7, 20], [1, 5, 30, 40], [1, 2, 3, 4]]
    positions, counts = vote_counts([torch.tensor(v) for v in votes])
    # counts: 1→4, 5→3, 7→2, then ties at 1 vote: lowest index without a generator
    assert select_majority(positions, counts, k, numel, generator=None).tolist() == [1, 2, 5, 7]
    masks = [tuple(select_majority(positions, counts, k, numel, generator=_gen(s)).tolist()) for s in range(400)]
    assert all({1, 5, 7} <= set(m) and len(m) == k for m in masks)
    # the 4th position is one of the 7 single-vote positions, each equally likely (not biased to low indices)
    tied = [2, 3, 4, 9, 20, 30, 40]
    fourth = collections.Counter(next(p for p in m if p not in (1, 5, 7)) for m in masks)
    assert set(fourth) == set(tied)
    expected = len(masks) / len(tied)
    chi2 = sum((fourth[p] - expected) ** 2 / expected for p in tied)
    assert chi2 < 22.5, fourth  # 6 degrees of freedom, 0.999 quantile; fixed seeds: deterministic
    # reproducible for a seed
    assert torch.equal(
        select_majority(positions, counts, k, numel, generator=_gen(3)),
        select_majority(positions, counts, k, numel, generator=_gen(3)),
    )


def test_majority_fills_up_when_fewer_than_k_positions_got_votes():
    positions, counts = torch.tensor([3, 8]), torch.tensor([2, 1])
    assert select_majority(positions, counts, 5, 20, generator=None).tolist() == [0, 1, 2, 3, 8]
    fills = set()
    for s in range(30):
        mask = select_majority(positions, counts, 5, 20, generator=_gen(s))
        assert mask.numel() == 5 and {3, 8} <= set(mask.tolist()) and len(set(mask.tolist())) == 5
        fills.add(tuple(sorted(set(mask.tolist()) - {3, 8})))
        mask = select_weighted(positions, counts, 5, 20, generator=_gen(s))
        assert mask.numel() == 5 and {3, 8} <= set(mask.tolist()) and len(set(mask.tolist())) == 5
    assert len(fills) > 1, "a seeded fill draws unvoted positions at random"
    assert select_majority(positions, counts, 50, 20, generator=None).tolist() == list(range(20))  # K clipped to d


@settings(max_examples=80, deadline=None)
@given(numel=st.integers(5, 300), data=st.data())
def test_both_selections_return_k_distinct_sorted_positions(numel, data):
    k = data.draw(st.integers(1, numel))
    n_votes = data.draw(st.integers(1, 6))
    seed = data.draw(st.integers(0, 2**31 - 1))
    gen = _gen(seed)
    votes = [torch.randperm(numel, generator=gen)[:k].sort().values for _ in range(n_votes)]
    positions, counts = vote_counts(votes)
    assert int(counts.sum()) == n_votes * k
    for mask in (
        select_majority(positions, counts, k, numel, generator=_gen(seed)),
        select_majority(positions, counts, k, numel, generator=None),
        select_weighted(positions, counts, k, numel, generator=_gen(seed)),
    ):
        assert mask.numel() == k and mask.dtype == torch.int64
        assert bool((mask[1:] > mask[:-1]).all()) and 0 <= int(mask[0]) and int(mask[-1]) < numel
        if positions.numel() >= k:
            assert bool(torch.isin(mask, positions).all()), "only voted positions when there are enough"
    # majority (any tie-break): no unselected position has more votes than a selected one
    for gen in (None, _gen(seed)):
        mask = select_majority(positions, counts, k, numel, generator=gen)
        chosen = torch.isin(positions, mask)
        if chosen.any() and (~chosen).any():
            assert int(counts[chosen].min()) >= int(counts[~chosen].max())
    # without a generator: exactly the oracle (ties to the lowest positions)
    mask = select_majority(positions, counts, k, numel, generator=None)
    assert mask.tolist() == _majority_oracle([v.tolist() for v in votes], k, numel)
    # the same generator seed, the same masks
    assert torch.equal(
        select_weighted(positions, counts, k, numel, generator=_gen(seed)),
        select_weighted(positions, counts, k, numel, generator=_gen(seed)),
    )


def test_weighted_selection_is_proportional_to_votes():
    """K = 1: P(i) = w_i / Σw exactly; K = 2: the inclusion probabilities of sampling without replacement."""
    positions = torch.arange(6) * 3
    counts = torch.tensor([1, 2, 3, 4, 5, 10])
    p = counts / counts.sum()
    trials = 6000
    hits1 = torch.zeros(6)
    hits2 = torch.zeros(6)
    for s in range(trials):
        m1 = select_weighted(positions, counts, 1, 20, generator=_gen(s))
        hits1[positions.tolist().index(int(m1))] += 1
        m2 = select_weighted(positions, counts, 2, 20, generator=_gen(10**6 + s))
        assert m2.numel() == 2 and m2[0] != m2[1]
        hits2 += torch.isin(positions, m2).float()
    # chi-square, 5 degrees of freedom: 20.5 is the 0.999 quantile (fixed seeds: deterministic)
    chi2 = float((((hits1 - trials * p) ** 2) / (trials * p)).sum())
    assert chi2 < 20.5, (chi2, hits1.tolist())
    incl = torch.tensor([p[i] + sum(p[j] * p[i] / (1 - p[j]) for j in range(6) if j != i) for i in range(6)])
    sd = torch.sqrt(trials * incl * (1 - incl))
    assert bool(((hits2 - trials * incl).abs() < 4 * sd).all()), (hits2 / trials, incl)
    assert float(hits2.sum()) == 2 * trials


def test_weighted_selection_differs_from_majority():
    """Three votes on 0..9, one on 10..19, K = 10: majority is 0..9, the weighted draw rarely is."""
    positions, counts = torch.arange(20), torch.tensor([3] * 10 + [1] * 10)
    majority = select_majority(positions, counts, 10, 100, generator=None).tolist()
    assert majority == list(range(10))
    draws = [tuple(select_weighted(positions, counts, 10, 100, generator=_gen(s)).tolist()) for s in range(200)]
    assert sum(d == tuple(majority) for d in draws) < 10  # P = Π 3j/(3j+10), j = 1..10 ≈ 0.2 %
    minority = sum(sum(p >= 10 for p in d) for d in draws) / len(draws)
    assert 1.0 < minority < 4.0  # on average ~2.3 single-vote positions per mask


# ====================================================================== [OOG] add-drop
@settings(max_examples=100, deadline=None)
@given(numel=st.integers(10, 400), data=st.data())
def test_add_drop_keeps_k_positions_and_changes_at_most_k_ad(numel, data):
    k = data.draw(st.integers(1, numel))
    k_ad = data.draw(st.integers(0, k))
    seed = data.draw(st.integers(0, 2**31 - 1))
    gen = _gen(seed)
    previous = torch.randperm(numel, generator=gen)[:k].sort().values
    a = torch.randn(numel, generator=gen)
    top = _topk_oracle(a, k).indices
    vote, adds, drops = add_drop(a, previous, top, k_ad)
    for x in (vote, adds, drops):
        assert x.dtype == torch.int64 and bool((x[1:] > x[:-1]).all())
    assert vote.numel() == k and torch.unique(vote).numel() == k
    assert adds.numel() == drops.numel() <= k_ad
    prev_set, top_set = set(previous.tolist()), set(top.tolist())
    assert set(adds.tolist()) <= top_set - prev_set
    assert set(drops.tolist()) <= prev_set - top_set
    assert set(vote.tolist()) == (prev_set - set(drops.tolist())) | set(adds.tolist())
    assert adds.numel() == min(k_ad, len(top_set - prev_set))
    # Alg. 2 l. 12-14: the largest |a| of Top_K \ previous are added, the smallest |a| of previous \ Top_K dropped
    mags = a.abs().tolist()
    new = sorted(top_set - prev_set, key=lambda i: (-mags[i], i))
    old = sorted(prev_set - top_set, key=lambda i: (mags[i], i))
    assert adds.tolist() == sorted(new[: adds.numel()])
    assert drops.tolist() == sorted(old[: drops.numel()])


def test_add_drop_without_changes():
    a = torch.tensor([5.0, 4.0, 0.1, 0.2, 3.0])
    prev = torch.tensor([0, 1, 4])
    vote, adds, drops = add_drop(a, prev, prev, 2)
    assert vote.tolist() == [0, 1, 4] and adds.numel() == 0 and drops.numel() == 0
    vote, adds, drops = add_drop(a, torch.tensor([0, 2, 3]), torch.tensor([0, 1, 4]), 0)  # K_ad = 0: vote frozen
    assert vote.tolist() == [0, 2, 3] and adds.numel() == drops.numel() == 0
    vote, adds, drops = add_drop(a, torch.tensor([0, 2, 3]), torch.tensor([0, 1, 4]), 1)
    assert adds.tolist() == [1] and drops.tolist() == [2] and vote.tolist() == [0, 1, 3]


def test_reexports_are_the_compressor_schedules():
    from fl_sparse import compressors

    for name in ("adaptive_k_schedule", "adaptive_k_t_hat", "hard_threshold_for_topk"):
        assert getattr(algorithms, name) is getattr(compressors, name)
