"""Tests written to kill mutants of the sparsifiers in :mod:`fl_sparse.compressors` that the main suite let live.

TopK, HardThreshold, RTopK, RandomK and the numpy CPU top-k helpers they use:
the error each bad input raises (by its message: the compressor names itself),
the +-Inf check at exactly ``key(inf)``, the reprs, and the contracts of the
private helpers where the main suite only reaches them through an exact
selection that hides the difference. See docs/testing.md.
"""

from __future__ import annotations

import math
import re
from fractions import Fraction

import numpy as np
import pytest
import torch

from fl_sparse import compressors as C
from fl_sparse.compressors import HardThreshold, RandomK, RTopK, TopK


def _raises(message: str, exc: type[Exception] = ValueError):
    return pytest.raises(exc, match="^" + re.escape(message))


@pytest.fixture(params=["numpy", "torch"])
def cpu_path(request, monkeypatch):
    """Run a test on each CPU implementation of the selections (see ``C._cpu_threads_for``)."""
    threads = torch.get_num_threads() if request.param == "torch" else 0
    monkeypatch.setattr(C, "_cpu_threads_for", lambda numel: threads)
    return request.param


# ====================================================================== reprs
def test_reprs_name_the_budget_and_the_pool_that_were_given():
    """Each repr shows the budget as given (k or ratio), RTopK's pool (r or n_workers), and the seed."""
    assert repr(TopK(k=5)) == "TopK(k=5)"
    assert repr(TopK(ratio=0.25)) == "TopK(ratio=0.25)"
    assert repr(RandomK(k=3, seed=1)) == "RandomK(k=3, seed=1)"
    assert repr(RandomK(ratio=0.5)) == "RandomK(ratio=0.5, seed=None)"
    assert repr(RTopK(k=2, r=4, seed=0)) == "RTopK(k=2, r=4, seed=0)"
    assert repr(RTopK(ratio=0.1, n_workers=3)) == "RTopK(ratio=0.1, n_workers=3, seed=None)"
    assert repr(HardThreshold(0.5)) == "HardThreshold(lam=0.5)"


# ====================================================================== HardThreshold
def test_hard_threshold_names_itself_in_input_errors():
    """A non-tensor, a 2-D or an integer input is refused with a message that starts with 'HardThreshold'."""
    with _raises("HardThreshold expects a torch.Tensor, got list", TypeError):
        HardThreshold(0.5)([1.0, 2.0])
    with _raises("HardThreshold expects a flat 1-D tensor, got shape (2, 2)"):
        HardThreshold(0.5)(torch.zeros(2, 2))
    with _raises("HardThreshold expects a floating tensor, got torch.int64"):
        HardThreshold(0.5)(torch.arange(3))


@pytest.mark.parametrize("lam", ["0.1", None, True, [0.5]])
def test_hard_threshold_lam_must_be_a_number_by_message(lam):
    """A non-number ``lam`` (a string, None, a bool, a list) is refused by its own check, naming the value."""
    with _raises(f"HardThreshold: lam must be a number, got {lam!r}"):
        HardThreshold(lam)


@pytest.mark.parametrize("params", [{}, {"lam": 0.1, "k": 4}])
def test_hard_threshold_config_needs_exactly_one_of_lam_and_k(params):
    """The config form takes exactly one of ``lam`` and ``k``; neither or both is refused by message."""
    with _raises("hard-threshold: give exactly one of lam (threshold) or k (lam = 1/(2 sqrt k))"):
        HardThreshold.from_config(**params)


@pytest.mark.usefixtures("cpu_path")
@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")])
@pytest.mark.parametrize("d", [10, 200_000])
def test_hard_threshold_rejects_infinities_as_well_as_nan(bad, d):
    """+-Inf has the key exactly ``key(inf)`` (NaN's is above): the check is ``>= key(inf)``, by name."""
    x = torch.zeros(d)
    x[d // 2] = bad
    with _raises("HardThreshold: input contains NaN or Inf"):
        HardThreshold(1.0)(x)
    # without the check, the non-finite entry is simply kept (it passes every finite threshold)
    s = HardThreshold(1.0, check_finite=False)(x)
    assert s.indices.tolist() == [d // 2]


# ====================================================================== TopK / RTopK name themselves
@pytest.mark.parametrize(
    "make, who",
    [(lambda: TopK(k=1), "TopK"), (lambda: RTopK(k=1, r=2), "RTopK")],
    ids=["TopK", "RTopK"],
)
def test_input_errors_name_the_compressor(make, who):
    """TopK and RTopK check their input themselves: the message starts with the compressor's name."""
    with _raises(f"{who} expects a flat 1-D tensor, got shape (2, 2)"):
        make()(torch.zeros(2, 2))
    with _raises(f"{who} expects a floating tensor, got torch.int64"):
        make()(torch.arange(3))


def test_budget_errors_name_the_compressor():
    """Budget errors (``k`` / ``ratio``) start with the compressor's name, for TopK and RTopK alike."""
    with _raises("TopK: k must be >= 1, got 0"):
        TopK(k=0)
    with _raises("RTopK: k must be >= 1, got 0"):
        RTopK(k=0, r=2)
    with _raises("RTopK: give exactly one of k (count) or ratio (fraction)"):
        RTopK(r=2)


# ====================================================================== RTopK pool
@pytest.mark.parametrize("r", [0, -2, 2.5, 3.0, True, "3"])
def test_rtopk_r_must_be_an_int_of_at_least_one(r):
    """``r`` is refused by its own check (an int >= 1), not later by ``k <= r``."""
    with _raises(f"RTopK: r must be an int >= 1, got {r!r}"):
        RTopK(k=1, r=r)


@pytest.mark.parametrize("k, pool", [(1, {"r": 1}), (3, {"r": 3}), (3, {"n_workers": 1}), (1, {"n_workers": 1})])
def test_rtopk_with_a_pool_of_exactly_k_is_top_k(k, pool):
    """``r = k`` (given, or ``n_workers = 1``) is allowed (``1 <= k <= r``): rTop-k of the top-k is Top-k."""
    comp = RTopK(k=k, seed=0, **pool)
    x = torch.tensor([0.5, -4.0, 1.0, 3.0, -2.0, 0.25])
    assert comp.r_for(x.numel()) == k
    assert torch.equal(comp(x).indices, TopK(k=k)(x).indices)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_rtopk_check_finite_false_is_passed_on_to_the_top_r_selection(bad):
    """With ``check_finite=False`` a non-finite entry is ranked (first), not refused; with the default, refused."""
    x = torch.tensor([1.0, bad, -3.0, 2.0])
    s = RTopK(k=1, r=1, check_finite=False, seed=0)(x)
    assert s.indices.tolist() == [1]
    with _raises("TopK: input contains NaN or Inf"):
        RTopK(k=1, r=1, seed=0)(x)


# ====================================================================== the threshold sample
def test_sample_positions_are_cached_per_size_and_device(monkeypatch):
    """One draw per ``(numel, device)``: a second call returns the cached tensor itself, and each
    device gets positions on that device (``meta`` stands in for an accelerator)."""
    monkeypatch.setattr(C, "_sample_positions_cache", {})
    cpu = C._sample_positions(10_000, torch.device("cpu"))
    assert C._sample_positions(10_000, torch.device("cpu")) is cpu
    meta = C._sample_positions(10_000, torch.device("meta"))
    assert meta.device.type == "meta" and meta.shape == cpu.shape
    assert C._sample_positions(10_000, torch.device("cpu")) is cpu


def test_sample_positions_come_from_their_own_fixed_generator(monkeypatch):
    """The sample (hence the threshold estimate, hence the running time) is the same in every process:
    it does not depend on, nor advance, torch's global RNG. ``m = numel // 32`` sorted positions."""
    monkeypatch.setattr(C, "_sample_positions_cache", {})
    torch.manual_seed(1)
    state = torch.get_rng_state()
    first = C._sample_positions(64_000, torch.device("cpu")).clone()
    assert torch.equal(torch.get_rng_state(), state)
    monkeypatch.setattr(C, "_sample_positions_cache", {})
    torch.manual_seed(2)
    again = C._sample_positions(64_000, torch.device("cpu"))
    assert torch.equal(first, again)
    expected = torch.randint(64_000, (2_000,), generator=torch.Generator().manual_seed(C._SAMPLE_SEED)).sort().values
    assert torch.equal(first, expected)


def test_sample_positions_cache_holds_at_most_16_sizes(monkeypatch):
    """The sample cache is bounded: at most 16 ``(numel, device)`` entries, the oldest evicted first."""
    monkeypatch.setattr(C, "_sample_positions_cache", {})
    for numel in range(1_000, 1_020):
        C._sample_positions(numel, torch.device("cpu"))
        assert len(C._sample_positions_cache) <= 16
    assert len(C._sample_positions_cache) == 16
    assert (1_019, "cpu") in C._sample_positions_cache and (1_000, "cpu") not in C._sample_positions_cache


# ====================================================================== the threaded CPU path's thread count
@pytest.mark.parametrize(
    "threads, others, expected",
    [(4, 0, 4), (8, 4, 4), (8, 5, 0), (3, 0, 0)],
    ids=["4 torch threads", "4 free cores", "3 free cores", "3 torch threads"],
)
def test_threaded_path_needs_exactly_the_minimum_of_four_threads(monkeypatch, threads, others, expected):
    """``_THREADED_MIN_THREADS`` (4) is itself enough, as torch threads and as free cores; 3 is not."""
    assert C._THREADED_MIN_THREADS == 4
    monkeypatch.setattr(C.torch, "get_num_threads", lambda: threads)
    monkeypatch.setattr(C.os, "cpu_count", lambda: 8)
    monkeypatch.setattr(C, "_runnable_elsewhere", lambda: others)
    assert C._cpu_threads_for(C._THREADED_MIN_NUMEL) == expected


# ====================================================================== RandomK names itself
def test_randomk_names_itself_in_its_errors():
    """RandomK's input and budget errors start with its name."""
    with _raises("RandomK expects a flat 1-D tensor, got shape (2, 2)"):
        RandomK(k=1)(torch.zeros(2, 2))
    with _raises("RandomK: k must be >= 1, got 0"):
        RandomK(k=0)


# ====================================================================== numpy top-k: large inputs
D = 100_000  # above _NP_SAMPLE_MIN_NUMEL: the sampled-threshold path


def _reference_topk(x: torch.Tensor, k: int) -> list[int]:
    """Top-k by magnitude, ties to lower index: a stable descending sort of |x| (float64)."""
    order = torch.sort(x.double().abs(), descending=True, stable=True).indices
    return sorted(order[:k].tolist())


@pytest.mark.usefixtures("cpu_path")
@pytest.mark.parametrize("bad", [float("inf"), float("-inf")])
@pytest.mark.parametrize("share", [1.0, 0.5])
def test_topk_rejects_a_vector_mostly_of_infinities(bad, share):
    """When the sampled threshold is itself ``key(inf)`` (the sample is mostly +-Inf, a big tie group
    at the top key), every Inf is a candidate and is found: ValueError by name, never k Infs."""
    x = torch.randn(D, generator=torch.Generator().manual_seed(3))
    x[: int(D * share)] = bad
    with _raises("TopK: input contains NaN or Inf"):
        TopK(k=10)(x)
    s = TopK(k=10, check_finite=False)(x)
    assert s.indices.tolist() == list(range(10))  # a tie among the Infs: lowest positions


@pytest.mark.usefixtures("cpu_path")
@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")])
@pytest.mark.parametrize("k", [3, 50])
def test_topk_rejects_a_non_finite_entry_of_a_mostly_zero_vector(bad, k):
    """Mostly zeros: a tie group at the sampled threshold, so the entries strictly above it are taken
    apart; an Inf among them (key exactly ``key(inf)``) is refused like a NaN, by name."""
    x = torch.zeros(D)
    x[torch.arange(7, D, D // 20)] = torch.linspace(1.0, 2.0, 20)
    x[D // 3] = bad
    with _raises("TopK: input contains NaN or Inf"):
        TopK(k=k)(x)


@pytest.mark.usefixtures("cpu_path")
@pytest.mark.parametrize("tie", [0.0, 0.5, -3.0])
@pytest.mark.parametrize("k", [2, 5])
def test_topk_keeps_an_entry_one_ulp_above_a_large_tie_group(tie, k):
    """A large tie group at ``t`` (sampled as the threshold) and an entry of the very next magnitude
    (``key(t) + 1``, a subnormal above zero): that entry is strictly above ``t`` and must be kept."""
    x = torch.full((D,), tie)
    nxt = torch.nextafter(torch.tensor(abs(tie)), torch.tensor(math.inf))
    x[D - 5] = -nxt
    x[D // 2] = 10.0
    idx = TopK(k=k)(x).indices.tolist()
    assert D - 5 in idx and D // 2 in idx
    assert idx == _reference_topk(x, k)


@pytest.mark.usefixtures("cpu_path")
def test_topk_names_itself_for_nan_among_the_candidates():
    """A NaN in a continuous vector is found among the candidates ``{key >= t}``: refused by name."""
    x = torch.randn(D, generator=torch.Generator().manual_seed(4))
    x[D - 1] = float("nan")
    with _raises("TopK: input contains NaN or Inf"):
        TopK(k=20)(x)


# ====================================================================== random subsets
@pytest.mark.parametrize("n", [2, 7, 1_000])
def test_a_budget_of_one_keeps_exactly_one_entry(n):
    """k = 1 is a valid budget: RandomK and RTopK keep exactly one entry (RTopK's from the top r)."""
    x = torch.arange(1.0, n + 1.0)
    for seed in range(5):
        s = RandomK(k=1, seed=seed)(x)
        assert s.nnz == 1
        s = RTopK(k=1, r=min(n, 2), seed=seed)(x)
        assert s.nnz == 1 and int(s.indices) >= n - 2


@pytest.mark.parametrize("n, k", [(5, 5), (5, 9), (5, 0), (5, -1), (0, 0)])
def test_uniform_subset_without_a_choice_draws_nothing(n, k):
    """``k >= n`` (everything) and ``k <= 0`` (nothing) involve no chance: the result is fixed
    (sorted int64 positions, empty for ``k <= 0``) and the generator is not advanced, so a seeded
    compressor's later masks do not depend on such calls."""
    gen = torch.Generator().manual_seed(11)
    before = gen.get_state()
    expected = list(range(n)) if k >= n else []
    got = C._uniform_subset(n, k, torch.device("cpu"), gen)
    assert got.dtype == torch.int64 and got.shape == (len(expected),)
    assert got.tolist() == expected
    assert torch.equal(gen.get_state(), before)


def test_magnitude_topk_indices_names_itself_in_input_errors():
    """Called directly, ``magnitude_topk_indices`` names itself in its input errors."""
    with _raises("magnitude_topk_indices expects a flat 1-D tensor, got shape (2, 2)"):
        C.magnitude_topk_indices(torch.zeros(2, 2), 1)


def test_the_refill_draws_of_a_seeded_randomk_come_from_its_generator(monkeypatch):
    """The sparse sampler's refill loop (forced here) draws from the seeded generator too: equal
    seeds give equal masks whatever torch's global RNG does in between."""
    monkeypatch.setattr(C, "_OVERSAMPLE", 0.05)
    monkeypatch.setattr(C, "_EXTRA_DRAWS", 1)
    x = torch.zeros(400)
    masks = []
    for global_seed in (1, 2):
        torch.manual_seed(global_seed)
        comp = RandomK(k=100, seed=5)
        masks.append([comp(x).indices for _ in range(3)])
    for a, b in zip(*masks):
        assert a.numel() == 100 and torch.equal(a, b)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"k": 2.5}, "RandomK: k must be an int, got 2.5"),
        ({"k": -3}, "RandomK: k must be >= 1, got -3"),
        ({"ratio": "0.1"}, "RandomK: ratio must be a number, got '0.1'"),
        ({"ratio": True}, "RandomK: ratio must be a number, got True"),
        ({"k": 3, "seed": 1.5}, "seed must be an int or None, got 1.5"),
        ({"k": 3, "seed": "7"}, "seed must be an int or None, got '7'"),
    ],
)
def test_budget_and_seed_errors_by_message(kwargs, message):
    """Each budget / seed check of RandomK refuses with its own message (type of k, k >= 1, ratio a number, seed an int)."""
    with _raises(message):
        RandomK(**kwargs)


# ====================================================================== k from a ratio
@pytest.mark.parametrize("d", [70_000, 100_000, 3_000_000])
def test_k_for_a_large_integral_product_is_not_rounded_up(d):
    """``ratio * d`` that is an integer in exact arithmetic (0.07 * 100,000 = 7,000) but a few ulps
    above it in floats (7000.000000000001) is that integer: the tolerance is relative (1e-9 * product)."""
    exact = Fraction("0.07") * d
    assert exact.denominator == 1 and 0.07 * d != exact  # the float product is off
    assert TopK(ratio=0.07).k_for(d) == int(exact)


def test_k_for_a_product_just_above_one_is_rounded_up():
    """A product 1.5e-9 above 1 (relatively more than the 1e-9 float tolerance) is not an integer up to
    rounding: ``k = ceil(product) = 2``; 0.5e-9 above 1 is (k = 1)."""
    assert TopK(ratio=(1 + 1.5e-9) / 2).k_for(2) == 2
    assert TopK(ratio=(1 + 0.5e-9) / 2).k_for(2) == 1


# ====================================================================== numpy helpers, directly
def _raw(values) -> tuple[np.ndarray, int]:
    x = torch.tensor(values, dtype=torch.float32)
    raw, abs_mask, _ = C._key_view(x)
    return raw.numpy(), abs_mask


def test_np_tied_positions_lists_up_to_need_lowest_positions_of_the_key():
    """``_np_tied_positions``: the (up to) ``need`` lowest positions whose magnitude key is exactly ``key``,
    as int64; none at all is an empty int64 array (TopK never asks for an absent key, a caller may)."""
    raw, mask = _raw([1.0, -2.0, 2.0, 3.0, -2.0, 2.0])
    key2 = int(torch.tensor(2.0).view(torch.int32))
    assert C._np_tied_positions(raw, mask, key2, 2).tolist() == [1, 2]
    assert C._np_tied_positions(raw, mask, key2, 10).tolist() == [1, 2, 4, 5]
    absent = C._np_tied_positions(raw, mask, int(torch.tensor(5.0).view(torch.int32)), 3)
    assert absent.dtype == np.int64 and absent.shape == (0,)


@pytest.mark.parametrize("numel", [-1, 2.5, "3", None])
def test_k_for_needs_a_non_negative_int_length(numel):
    """``k_for`` refuses a negative or non-integer length by message instead of returning a budget for it."""
    with _raises(f"numel must be a non-negative int, got {numel!r}"):
        TopK(k=3).k_for(numel)


@pytest.mark.usefixtures("cpu_path")
@pytest.mark.parametrize("bad", [float("nan"), float("-inf")])
def test_small_topk_names_itself_for_non_finite_input(bad):
    """Below the sampling size the selection is direct over all keys: a NaN/Inf is refused by name."""
    with _raises("TopK: input contains NaN or Inf"):
        TopK(k=2)(torch.tensor([1.0, bad, -3.0, 0.5]))


def test_magnitude_topk_indices_checks_finiteness_by_default():
    """``check_finite`` defaults to True for a direct call too; with False a NaN ranks first."""
    x = torch.tensor([1.0, float("nan"), -3.0])
    with _raises("TopK: input contains NaN or Inf"):
        C.magnitude_topk_indices(x, 1)
    assert C.magnitude_topk_indices(x, 1, check_finite=False).tolist() == [1]  # NaN ranks first


def test_rtopk_n_workers_error_by_message():
    """``n_workers < 1`` is refused by its own message."""
    with _raises("RTopK: n_workers must be an int >= 1, got 0"):
        RTopK(k=2, n_workers=0)


@pytest.mark.usefixtures("cpu_path")
@pytest.mark.parametrize("lam", [0.7, 1e-3, 123.456])
def test_hard_threshold_float64_boundary_is_exact_in_a_chunked_scan(lam):
    """float64 keys are 63-bit integers: the chunked numpy scan of a long vector (more than one
    ``_SCAN_CHUNK``) compares them exactly, so the entry one ulp below ``lam`` is dropped, ``lam``
    and the entry one ulp above are kept (a float64 copy of the keys would round them together)."""
    d = 2 * C._SCAN_CHUNK + 5
    x = torch.zeros(d, dtype=torch.float64)
    at = torch.tensor(lam, dtype=torch.float64)
    x[10] = torch.nextafter(at, torch.tensor(0.0, dtype=torch.float64))
    x[C._SCAN_CHUNK + 3] = -at
    x[d - 1] = torch.nextafter(at, torch.tensor(math.inf, dtype=torch.float64))
    assert HardThreshold(lam)(x).indices.tolist() == [C._SCAN_CHUNK + 3, d - 1]
