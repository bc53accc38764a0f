"""Tests written to kill mutants of :mod:`fl_sparse.algorithms` that the main suite let live.

Each test states the behaviour that matters (the contract in the docstrings
of :func:`select_majority`, :func:`select_weighted`, :func:`add_drop`) and
checks it against a hand-written oracle. See docs/testing.md for the
mutation run these came from.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fl_sparse.algorithms import add_drop, is_member, select_majority, select_weighted


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


SELECTIONS = {
    "majority": lambda pos, cnt, k, numel, gen: select_majority(pos, cnt, k, numel, generator=gen),
    "weighted": lambda pos, cnt, k, numel, gen: select_weighted(pos, cnt, k, numel, generator=gen),
}


@settings(max_examples=40, deadline=None)
@given(numel=st.integers(2, 60), data=st.data())
def test_fill_tops_up_to_exactly_k_even_when_one_position_is_missing(numel, data):
    """n = k - 1 voted positions: the mask still has k positions (the fill of a single one is not skipped)."""
    k = data.draw(st.integers(1, numel))
    voted = sorted(data.draw(st.sets(st.integers(0, numel - 1), min_size=k - 1, max_size=k - 1)))
    positions = torch.tensor(voted, dtype=torch.int64)
    counts = torch.ones(len(voted), dtype=torch.int64)
    seed = data.draw(st.integers(0, 2**31 - 1))
    for name, select in SELECTIONS.items():
        for gen in ((None, _gen(seed)) if name == "majority" else (_gen(seed),)):
            mask = select(positions, counts, k, numel, gen).tolist()
            assert len(mask) == k == len(set(mask)), (name, mask)
            assert set(voted) <= set(mask) and mask == sorted(mask)
    # no generator: the fill is the lowest unvoted position
    lowest_free = next(p for p in range(numel) if p not in voted)
    assert select_majority(positions, counts, k, numel, generator=None).tolist() == sorted(voted + [lowest_free])


def test_k_zero_selects_nothing():
    """K is clipped to [0, d]: K = 0 is an empty mask, not one position."""
    positions, counts = torch.tensor([1, 4, 6]), torch.tensor([3, 1, 2])
    mask = select_weighted(positions, counts, 0, 10, generator=_gen(0))
    assert mask.numel() == 0 and mask.dtype == torch.int64
    mask = select_weighted(positions, counts, -3, 10, generator=_gen(0))
    assert mask.numel() == 0
    empty = torch.empty(0, dtype=torch.int64)
    assert select_majority(empty, empty, 0, 10, generator=None).numel() == 0
    assert select_majority(empty, empty, 0, 10, generator=_gen(1)).numel() == 0


def test_majority_with_k_zero_and_votes_selects_nothing():
    positions, counts = torch.tensor([1, 4, 6]), torch.tensor([3, 1, 2])
    for gen in (None, _gen(0)):
        mask = select_majority(positions, counts, 0, 10, generator=gen)
        assert mask.numel() == 0 and mask.dtype == torch.int64


def test_seeded_fill_uses_only_the_given_generator():
    """A seeded fill is reproducible from its generator alone and leaves torch's global RNG untouched."""
    positions, counts = torch.tensor([2, 9]), torch.tensor([1, 1])
    for name, select in SELECTIONS.items():
        torch.manual_seed(1234)
        before = torch.get_rng_state()
        masks = [select(positions, counts, 6, 40, _gen(s)).tolist() for s in range(12)]
        assert torch.equal(torch.get_rng_state(), before), f"{name}: the global RNG was used"
        # the same seed gives the same fill, whatever the global RNG state is
        torch.manual_seed(999)
        again = [select(positions, counts, 6, 40, _gen(s)).tolist() for s in range(12)]
        assert masks == again, name
        # the fill is random (not the lowest free positions) and only takes unvoted positions
        fills = {tuple(p for p in m if p not in (2, 9)) for m in masks}
        assert len(fills) > 6, (name, fills)
        assert all({2, 9} <= set(m) and len(set(m)) == 6 for m in masks)


def test_masks_are_int64_whatever_the_positions_dtype():
    """Votes may arrive as int32 (the server stores them so); the mask is always int64."""
    pos32 = torch.tensor([1, 3, 5, 7], dtype=torch.int32)
    counts = torch.tensor([4, 3, 2, 1], dtype=torch.int32)
    for name, select in SELECTIONS.items():
        for k in (2, 4, 6):  # n > k, n == k, n < k
            mask = select(pos32, counts, k, 10, _gen(k))
            assert mask.dtype == torch.int64, (name, k, mask.dtype)
            assert mask.numel() == k
    assert select_majority(pos32, counts, 2, 10, generator=None).tolist() == [1, 3]
    assert select_majority(pos32, counts, 4, 10, generator=None).dtype == torch.int64


def test_add_drop_ties_in_magnitude_go_to_the_lower_position_on_large_votes():
    """All |a| equal: adds are the lowest new positions and drops the lowest old ones (stable order).

    Large enough (thousands of ties) that an unstable sort would reorder them.
    """
    numel, k, k_ad = 8000, 3000, 700
    a = torch.ones(numel)
    a[::2] = -1.0  # equal magnitudes, both signs
    previous = torch.arange(0, k, dtype=torch.int64)  # 0 .. 2999
    top = torch.arange(numel - k, numel, dtype=torch.int64)  # 5000 .. 7999
    vote, adds, drops = add_drop(a, previous, top, k_ad)
    assert adds.tolist() == list(range(numel - k, numel - k + k_ad))
    assert drops.tolist() == list(range(0, k_ad))
    assert vote.tolist() == sorted(set(range(k_ad, k)) | set(adds.tolist()))


def test_add_drop_returns_int64_for_int32_votes():
    """Votes are stored as int32 on the server; add_drop's outputs are int64 whatever came in."""
    a = torch.tensor([5.0, 4.0, 0.1, 0.2, 3.0, 0.0])
    for prev, top, k_ad in (([0, 2, 3], [0, 1, 4], 1), ([0, 1, 4], [0, 1, 4], 2), ([0, 2, 3], [0, 1, 4], 0)):
        vote, adds, drops = add_drop(a, torch.tensor(prev, dtype=torch.int32), torch.tensor(top, dtype=torch.int32), k_ad)
        assert vote.dtype == adds.dtype == drops.dtype == torch.int64, (prev, top, k_ad)
        assert vote.numel() == len(prev)


@pytest.mark.parametrize("n_prev, n_top", [(5, 3), (3, 5)])
def test_add_drop_adds_as_many_as_it_drops_even_for_unequal_sizes(n_prev, n_top):
    """|adds| == |drops|, so the vote keeps its size, also if the previous vote and Top_K differ in size."""
    a = torch.arange(1.0, 21.0)
    previous = torch.arange(0, n_prev, dtype=torch.int64)
    top = torch.arange(20 - n_top, 20, dtype=torch.int64)  # disjoint from previous
    vote, adds, drops = add_drop(a, previous, top, 10)
    m = min(n_prev, n_top)
    assert adds.numel() == drops.numel() == m
    assert vote.numel() == n_prev
    assert adds.tolist() == list(range(20 - m, 20))  # the largest |a| of Top_K \ previous
    assert drops.tolist() == list(range(0, m))  # the smallest |a| of previous \ Top_K


def test_is_member_of_an_empty_set_answers_on_the_device_of_x():
    """No CUDA here: the ``meta`` device stands in for a second device."""
    x = torch.zeros(3, dtype=torch.int64, device="meta")
    out = is_member(x, torch.empty(0, dtype=torch.int64, device="meta"))
    assert out.device.type == "meta" and out.dtype == torch.bool and out.shape == (3,)
    cpu = is_member(torch.tensor([1, 2, 3]), torch.empty(0, dtype=torch.int64))
    assert cpu.tolist() == [False, False, False]


def test_is_member_mixes_int32_and_int64():
    """Stored votes are int32, decoded positions int64: membership works across the two."""
    x64 = torch.tensor([0, 3, 5, 7, 9], dtype=torch.int64)
    set32 = torch.tensor([3, 4, 9], dtype=torch.int32)
    assert is_member(x64, set32).tolist() == [False, True, False, False, True]
    assert is_member(x64.to(torch.int32), set32.to(torch.int64)).tolist() == [False, True, False, False, True]
