"""Tests for fl_sparse.compressors: exact selections, randomness, budget rules, factory."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import time
from fractions import Fraction

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fl_sparse import compressors as C
from fl_sparse.compressors import (
    COMPRESSORS,
    Compressor,
    HardThreshold,
    Identity,
    RandomK,
    RTopK,
    TopK,
    adaptive_k_rounds,
    adaptive_k_schedule,
    adaptive_k_t_hat,
    build_compressor,
    hard_threshold_for_topk,
    magnitude_topk_indices,
    register_compressor,
)
from fl_sparse.sparse import SparseTensor

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
HYP = settings(
    max_examples=60, deadline=None,
    # cpu_path below is function-scoped and constant across a test's examples: nothing to reset
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


@pytest.fixture(params=["numpy", "torch"])
def cpu_path(request, monkeypatch):
    """Run a test on each CPU implementation of the selections (see ``C._cpu_threads_for``)."""
    threads = torch.get_num_threads() if request.param == "torch" else 0
    monkeypatch.setattr(C, "_cpu_threads_for", lambda numel: threads)
    return request.param


# ----------------------------------------------------------------- helpers
def reference_topk(x: torch.Tensor, k: int) -> torch.Tensor:
    """Top-k by magnitude, ties to lower index: a stable descending sort of |x| (float64)."""
    order = torch.sort(x.double().abs(), descending=True, stable=True).indices
    return order[:k].sort().values


def assert_well_formed(s: SparseTensor, x: torch.Tensor) -> None:
    assert isinstance(s, SparseTensor)
    assert s.numel == x.numel()
    assert s.indices.dtype == torch.int64
    assert s.values.dtype == x.dtype
    s.validate()  # sorted, unique, in range
    assert torch.equal(s.values, x[s.indices])


def assert_same_magnitudes_as_torch_topk(x: torch.Tensor, idx: torch.Tensor, k: int) -> None:
    """Same multiset of magnitudes as torch.topk: equal up to ties at the k-th magnitude."""
    expected = torch.topk(x.abs(), k).values.sort().values
    got = x[idx].abs().sort().values
    assert torch.equal(got, expected)


vectors = st.lists(
    st.one_of(
        st.sampled_from([0.0, -0.0, 1.0, -1.0, 2.5, -2.5, 1e-30, -7.0]),  # duplicates / ties / zeros
        st.floats(-1e6, 1e6, allow_nan=False, allow_infinity=False, width=32),
    ),
    min_size=1,
    max_size=200,
)


# --------------------------------------------------------------- TopK exact
@pytest.mark.usefixtures("cpu_path")
@HYP
@given(values=vectors, data=st.data())
def test_topk_matches_torch_topk_small(values, data):
    x = torch.tensor(values, dtype=torch.float32)
    k = data.draw(st.integers(1, x.numel()))
    s = TopK(k)(x)
    assert_well_formed(s, x)
    assert s.nnz == k
    assert_same_magnitudes_as_torch_topk(x, s.indices, k)
    assert torch.equal(s.indices, reference_topk(x, k))  # ties -> lowest indices


@pytest.mark.usefixtures("cpu_path")
@pytest.mark.parametrize(
    "kind",
    [
        "normal", "cauchy", "all_equal", "few_nonzero", "many_zero", "discrete_ties", "sample_trap",
        "hidden_above_tie", "sample_tie_trap", "negative", "ramp",
    ],
)
@pytest.mark.parametrize("ratio", [0.001, 0.01, 0.2])
def test_topk_large_adversarial_inputs(kind, ratio):
    d = 100_003  # not a multiple of the block size: exercises the tail
    g = torch.Generator().manual_seed(7)
    if kind == "normal":
        x = torch.randn(d, generator=g)
    elif kind == "cauchy":
        x = torch.empty(d).cauchy_(generator=g)
    elif kind == "all_equal":
        x = torch.full((d,), -0.5)
    elif kind == "few_nonzero":  # fewer non-zeros than k
        x = torch.zeros(d)
        x[torch.randint(d, (20,), generator=g)] = torch.randn(20, generator=g)
    elif kind == "many_zero":
        x = torch.zeros(d)
        pos = torch.randperm(d, generator=g)[: d // 10]
        x[pos] = torch.randn(pos.numel(), generator=g)
    elif kind == "discrete_ties":  # huge tie groups at every magnitude
        x = torch.randint(-3, 4, (d,), generator=g).float()
    elif kind == "sample_trap":
        # large values exactly at the threshold-estimation sample positions:
        # the estimate overshoots, the candidate set is too small, the retry
        # path has to lower the threshold
        x = torch.randn(d, generator=g) * 1e-3
        pos = C._sample_positions(d, torch.device("cpu"))
        x[pos] = 1000.0 + torch.arange(pos.numel(), dtype=torch.float32)
    elif kind == "hidden_above_tie":
        # one big tie group, and more than k larger entries none of which is
        # sampled: the sample sees only the tie, the population has >= k above it
        x = torch.ones(d)
        sampled = torch.zeros(d, dtype=torch.bool)
        sampled[C._sample_positions(d, torch.device("cpu"))] = True
        free = torch.nonzero(~sampled).flatten()
        x[free[torch.randperm(free.numel(), generator=g)[: int(ratio * d) + 50]]] = 2.0
    elif kind == "sample_tie_trap":
        # the sample is all one value that is rare in the population: the tie
        # path finds too few equal entries and has to fall back
        x = torch.rand(d, generator=g) * 0.5
        x[C._sample_positions(d, torch.device("cpu"))] = 1.0
    elif kind == "negative":
        x = -torch.rand(d, generator=g)
    else:  # increasing magnitudes: the top-k is one contiguous block at the end
        x = torch.linspace(-1.0, 2.0, d)
    top = TopK(ratio=ratio)
    k = top.k_for(d)
    s = top(x)
    assert_well_formed(s, x)
    assert s.nnz == k
    assert_same_magnitudes_as_torch_topk(x, s.indices, k)
    assert torch.equal(s.indices, reference_topk(x, k))


@pytest.mark.parametrize("lam_quantile", [0.0, 0.5, 0.99, 0.999, 1.0])
@pytest.mark.parametrize("chunk_bytes", [4 * 1000, 4 * 4096 + 4])
def test_candidate_pass_chunked_and_blocked_agree(monkeypatch, lam_quantile, chunk_bytes):
    """Every exact pass (torch: several chunks, blocked rows with a tail; numpy: chunked) lists {i : |x_i| >= t}."""
    monkeypatch.setattr(C, "_CHUNK_BYTES", chunk_bytes)
    d = 50_001
    x = torch.randn(d, generator=torch.Generator().manual_seed(11))
    x[::97] = 0.0
    t = float(torch.quantile(x.abs()[:10_000].double(), lam_quantile))
    t_key = C._key_of_threshold(t, torch.float32)
    expected = torch.nonzero(x.double().abs() >= C._key_to_float(t_key, torch.float32)).flatten()
    chunked = C._torch_positions_at_least(x, t_key, density_hint=1.0)
    blocked = C._torch_positions_at_least(x, t_key, density_hint=0.0)
    assert torch.equal(chunked, expected)
    assert torch.equal(blocked, expected)
    raw = x.view(torch.int32).numpy()
    for scan_chunk in (1000, 4096, 1 << 16):  # several chunks, a short tail, one chunk
        monkeypatch.setattr(C, "_SCAN_CHUNK", scan_chunk)
        assert torch.equal(torch.from_numpy(C._np_positions_at_least(raw, 0x7FFF_FFFF, t_key)), expected)
        tie_key = int(torch.bitwise_and(x.view(torch.int32), 0x7FFF_FFFF)[0])  # x[0] = 0: a tie group of zeros
        zeros = torch.nonzero(x == 0).flatten()
        for need in (1, 7, 20, zeros.numel() // 2, zeros.numel() + 1):  # the lowest `need` (some span chunks)
            assert torch.equal(torch.from_numpy(C._np_tied_positions(raw, 0x7FFF_FFFF, tie_key, need)), zeros[:need])
    # and TopK through the multi-chunk pass (dense candidate sets)
    s = TopK(ratio=0.05)(x)
    assert torch.equal(s.indices, reference_topk(x, s.nnz))


@pytest.mark.usefixtures("cpu_path")
@pytest.mark.parametrize("d", [32_768, 65_536 + 17, 300_000])
@pytest.mark.parametrize("k", [1, 7, 300, 5_000])
def test_topk_fast_path_equals_torch_topk_set(d, k):
    x = torch.randn(d, generator=torch.Generator().manual_seed(d + k))
    idx = magnitude_topk_indices(x, k)
    expected = torch.topk(x.abs(), k).indices.sort().values
    assert torch.equal(idx, expected)  # continuous data: no ties, identical sets


tie_heavy = st.lists(
    st.one_of(
        st.sampled_from([0.0, -0.0, 1.0, -1.0, 2.5, -2.5, 1e-30, float("nan"), float("inf")]),
        st.floats(-1e6, 1e6, allow_nan=False, allow_infinity=False, width=32),
    ),
    min_size=1,
    max_size=600,
)


@HYP
@given(values=tie_heavy, data=st.data())
def test_numpy_and_torch_paths_select_the_same_set(monkeypatch, values, data):
    """The numpy CPU path (sampled threshold, tie groups, widening retries, chunked scans) equals the
    torch path and the reference, NaN/Inf included, on inputs small enough to hit every branch."""
    monkeypatch.setattr(C, "_NP_SAMPLE_MIN_NUMEL", 8)
    monkeypatch.setattr(C, "_FAST_MIN_NUMEL", 8)
    monkeypatch.setattr(C, "_SCAN_CHUNK", data.draw(st.sampled_from([16, 100, 1 << 16])))
    x = torch.tensor(values, dtype=torch.float32)
    k = data.draw(st.integers(1, x.numel()))
    xw = C._widen(x)
    raw, abs_mask, inf_key = C._key_view(xw)
    finite = bool(torch.isfinite(x).all())
    if not finite:
        with pytest.raises(ValueError, match="NaN or Inf"):
            C._np_magnitude_topk(raw.numpy(), abs_mask, inf_key, k, True)
    by_numpy = torch.from_numpy(C._np_magnitude_topk(raw.numpy(), abs_mask, inf_key, k, False))
    by_torch = C._torch_magnitude_topk(xw, raw, abs_mask, inf_key, k, False)
    assert torch.equal(by_numpy, by_torch)
    if finite:
        assert torch.equal(by_numpy, reference_topk(x, k))
    else:  # NaN ranks above inf, inf above every finite value: the reference on the keys
        keys = torch.bitwise_and(raw, abs_mask).double()
        assert torch.equal(by_numpy, reference_topk(keys, k))


@pytest.mark.parametrize("kind", ["normal", "all_equal", "discrete_ties", "sample_trap", "mostly_zero"])
def test_numpy_path_selects_from_a_small_candidate_set(monkeypatch, kind):
    """Tie groups at the sampled threshold, a sample that overshoots (retried with a lower
    threshold) and a zero threshold never make the exact selection run over the whole vector."""
    d, k = 100_003, 101
    g = torch.Generator().manual_seed(3)
    x = {
        "normal": lambda: torch.randn(d, generator=g),
        "all_equal": lambda: torch.full((d,), 0.5),
        "discrete_ties": lambda: torch.randint(-3, 4, (d,), generator=g).float(),
        "sample_trap": lambda: torch.randn(d, generator=g) * 1e-3,
        "mostly_zero": lambda: torch.randn(d, generator=g) * (torch.rand(d, generator=g) < 0.001),
    }[kind]()
    if kind == "sample_trap":  # large values exactly at the sample positions: the estimate overshoots
        pos = C._sample_positions(d, torch.device("cpu"))
        x[pos] = 1000.0 + torch.arange(pos.numel(), dtype=torch.float32)
    sizes = []
    select = C._np_largest_lowest_index
    monkeypatch.setattr(C, "_np_largest_lowest_index", lambda keys, k: sizes.append(keys.size) or select(keys, k))
    monkeypatch.setattr(C, "_cpu_threads_for", lambda numel: 0)
    assert torch.equal(TopK(k)(x).indices, reference_topk(x, k))
    assert max(sizes, default=0) < d // 20


def test_threaded_cpu_path_only_for_large_vectors_on_free_cores(monkeypatch):
    big = C._THREADED_MIN_NUMEL
    monkeypatch.setattr(C.os, "cpu_count", lambda: 8)
    monkeypatch.setattr(C, "_runnable_elsewhere", lambda: 0)
    with C.torch_threads(8):
        assert C._cpu_threads_for(big) == 8
        assert C._cpu_threads_for(big - 1) == 0  # small: numpy wins on any core count
        monkeypatch.setattr(C, "_runnable_elsewhere", lambda: 3)  # 5 cores left: 5 threads, none waits
        assert C._cpu_threads_for(big) == 5
        monkeypatch.setattr(C, "_runnable_elsewhere", lambda: 8 - C._THREADED_MIN_THREADS + 1)
        assert C._cpu_threads_for(big) == 0  # too few cores left: numpy
        monkeypatch.setattr(C, "_runnable_elsewhere", lambda: 30)  # oversubscribed
        assert C._cpu_threads_for(big) == 0
        monkeypatch.setattr(C, "_runnable_elsewhere", lambda: None)  # cannot tell: trust the cores
        assert C._cpu_threads_for(big) == 8
    with C.torch_threads(C._THREADED_MIN_THREADS - 1):
        monkeypatch.setattr(C, "_runnable_elsewhere", lambda: 0)
        assert C._cpu_threads_for(big) == 0


@pytest.mark.parametrize("cores_left", [0, 5])
def test_threaded_path_runs_on_the_threads_it_was_given(monkeypatch, cores_left):
    """TopK at a large size takes the torch path on the free cores only, and restores the thread count."""
    monkeypatch.setattr(C, "_THREADED_MIN_NUMEL", 1000)
    monkeypatch.setattr(C.os, "cpu_count", lambda: 8)
    monkeypatch.setattr(C, "_runnable_elsewhere", lambda: 8 - cores_left)
    seen = []
    torch_path = C._torch_magnitude_topk
    monkeypatch.setattr(C, "_torch_magnitude_topk", lambda *a: seen.append(torch.get_num_threads()) or torch_path(*a))
    x = torch.randn(50_000, generator=torch.Generator().manual_seed(2))
    with C.torch_threads(8):
        assert torch.equal(TopK(k=50)(x).indices, reference_topk(x, 50))
        assert seen == ([5] if cores_left == 5 else [])  # no free cores: numpy, no torch path
        assert torch.get_num_threads() == 8


def test_runnable_elsewhere_does_not_count_this_process(tmp_path):
    """Our own runnable threads (an OpenMP pool still spinning) are not load from others."""
    loadavg = tmp_path / "loadavg"
    loadavg.write_text("0.50 0.40 0.30 19/812 4242\n")
    tasks = tmp_path / "task"
    states = {101: "R", 102: "R", 103: "S", 104: "R", 105: "D"}
    for tid, state in states.items():
        (tasks / str(tid)).mkdir(parents=True)
        # a thread name may hold spaces and parentheses: the state follows the last ")"
        (tasks / str(tid) / "stat").write_text(f"{tid} (pt_main (x) y) {state} 1 2 3\n")
    assert C._runnable_elsewhere(str(loadavg), str(tasks)) == 19 - 3
    loadavg.write_text("0.50 0.40 0.30 2/812 4242\n")
    assert C._runnable_elsewhere(str(loadavg), str(tasks)) == 0  # never below zero
    assert C._runnable_elsewhere(str(tmp_path / "missing"), str(tasks)) is None


@pytest.mark.skipif(not os.path.exists("/proc/loadavg"), reason="Linux /proc")
def test_runnable_elsewhere_sees_a_busy_process():
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        deadline = time.monotonic() + 10
        while C._runnable_elsewhere() < 1:  # the spinner runs (or waits for a core): runnable
            assert time.monotonic() < deadline, "a spinning process never counted as runnable"
            time.sleep(0.05)
    finally:
        spinner.kill()
        spinner.wait()


@pytest.mark.usefixtures("cpu_path")
def test_topk_k_equals_numel_and_tiny_inputs():
    x = torch.tensor([3.0, -1.0, 0.0, 2.0])
    s = TopK(k=4)(x)
    assert torch.equal(s.indices, torch.arange(4))
    assert torch.equal(TopK(k=10)(x).indices, torch.arange(4))  # k clipped to numel
    one = torch.tensor([-5.0])
    assert TopK(k=1)(one).indices.tolist() == [0]
    empty = TopK(ratio=0.5)(torch.empty(0))
    assert empty.nnz == 0 and empty.numel == 0


@pytest.mark.usefixtures("cpu_path")
@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("d", [1_000, 100_000])
def test_topk_other_dtypes(dtype, d):
    x = torch.randn(d, generator=torch.Generator().manual_seed(3)).to(dtype)
    k = max(1, d // 500)
    s = TopK(k)(x)
    assert_well_formed(s, x)
    assert torch.equal(s.indices, reference_topk(x, k))


@pytest.mark.usefixtures("cpu_path")
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("d", [50, 200_000])
def test_topk_rejects_non_finite(bad, d):
    x = torch.randn(d, generator=torch.Generator().manual_seed(0))
    x[d // 3] = bad
    with pytest.raises(ValueError, match="NaN or Inf"):
        TopK(ratio=0.001)(x)
    with pytest.raises(ValueError, match="NaN or Inf"):
        RTopK(ratio=0.001, n_workers=4, seed=0)(x)
    TopK(ratio=0.001, check_finite=False)(x)  # opt-out: no error


@pytest.mark.usefixtures("cpu_path")
def test_topk_non_finite_even_when_sample_holds_nan():
    d = 200_000
    x = torch.randn(d, generator=torch.Generator().manual_seed(1))
    x[C._sample_positions(d, torch.device("cpu"))[:50]] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        TopK(ratio=0.01)(x)


@pytest.mark.usefixtures("cpu_path")
def test_topk_half_of_a_mostly_zero_vector():
    # k above the non-zero count with a sampled threshold of exactly 0 (direct selection)
    d = 100_000
    g = torch.Generator().manual_seed(8)
    x = torch.randn(d, generator=g) * (torch.rand(d, generator=g) < 0.3)
    s = TopK(ratio=0.5)(x)
    assert torch.equal(s.indices, reference_topk(x, d // 2))


@pytest.mark.usefixtures("cpu_path")
def test_topk_without_finite_check_ranks_nan_first():
    d = 100_000
    x = torch.randn(d, generator=torch.Generator().manual_seed(4))
    nan_at = C._sample_positions(d, torch.device("cpu")).unique()
    x[nan_at] = float("nan")
    k = nan_at.numel() + 10
    idx = TopK(k, check_finite=False)(x).indices
    assert idx.numel() == k and torch.unique(idx).numel() == k
    assert set(nan_at.tolist()) <= set(idx.tolist())
    finite = idx[~torch.isnan(x[idx])]
    assert torch.equal(finite, reference_topk(torch.nan_to_num(x, nan=0.0), 10))


def test_topk_rejects_bad_input():
    with pytest.raises(ValueError, match="1-D"):
        TopK(k=1)(torch.zeros(2, 2))
    with pytest.raises(ValueError, match="floating"):
        TopK(k=1)(torch.arange(5))


@pytest.mark.usefixtures("cpu_path")
def test_topk_is_deterministic_and_ignores_autograd():
    x = torch.randn(200_000, generator=torch.Generator().manual_seed(5), requires_grad=True)
    a, b = TopK(ratio=0.001)(x), TopK(ratio=0.001)(x)
    assert torch.equal(a.indices, b.indices)
    assert not a.values.requires_grad


# ---------------------------------------------------------------- budgets
@pytest.mark.parametrize(
    "kwargs",
    [{}, {"k": 1, "ratio": 0.1}, {"k": 0}, {"k": -3}, {"k": 2.5}, {"k": True}, {"ratio": 0.0}, {"ratio": 1.5},
     {"ratio": -0.1}, {"ratio": float("nan")}, {"ratio": "0.1"}],
)
def test_topk_budget_validation(kwargs):
    with pytest.raises(ValueError):
        TopK(**kwargs)


def test_k_for_ratio_rounding():
    assert TopK(ratio=0.001).k_for(11_173_962) == 11_174
    assert TopK(ratio=0.07).k_for(100) == 7  # 0.07 * 100 = 7.000000000000001 in floats
    assert TopK(ratio=1e-9).k_for(10) == 1  # at least one
    assert TopK(ratio=1.0).k_for(10) == 10
    assert TopK(k=50).k_for(10) == 10  # at most numel
    assert TopK(ratio=0.5).k_for(0) == 0


@pytest.mark.parametrize("d", [1, 7, 999, 1_000, 1_001, 242_762, 1_199_882, 11_173_962])
def test_k_for_matches_bidirectional_paper_definition(d):
    # bidirectional-topk-downlink-compression.txt: K = d - floor((1 - 0.001) d)
    paper_k = d - math.floor((1 - Fraction(1, 1000)) * d)
    assert TopK(ratio=0.001).k_for(d) == max(1, paper_k)


# ----------------------------------------------------------------- RandomK
def test_randomk_exact_count_sorted_and_seeded():
    x = torch.randn(10_000, generator=torch.Generator().manual_seed(0))
    a, b = RandomK(ratio=0.01, seed=42), RandomK(ratio=0.01, seed=42)
    seq_a = [a(x).indices for _ in range(3)]
    seq_b = [b(x).indices for _ in range(3)]
    for sa, sb in zip(seq_a, seq_b):
        assert torch.equal(sa, sb)  # same seed -> same sequence
        assert sa.numel() == 100
    assert not torch.equal(seq_a[0], seq_a[1])  # successive masks differ
    s = a(x)
    assert_well_formed(s, x)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert torch.equal(a(x, generator=g1).indices, b(x, generator=g2).indices)


@pytest.mark.parametrize("n,k", [(40, 4), (40, 30), (12, 12)])
def test_randomk_uniform(n, k):
    """Chi-square on position counts, plus pair counts for the subset law, fixed seed."""
    x = torch.ones(n)
    comp = RandomK(k=k, seed=1234)
    trials = 4_000
    counts = torch.zeros(n)
    pair01 = 0
    for _ in range(trials):
        idx = comp(x).indices
        assert idx.numel() == k and torch.unique(idx).numel() == k
        counts[idx] += 1
        pair01 += int(bool((idx == 0).any() and (idx == 1).any()))
    expected = trials * k / n
    if k < n:
        chi2 = float(((counts - expected) ** 2 / expected).sum())
        # n-1 = 39 dof: mean 39, sd ~8.8; 100 is > 6 sd (loose, deterministic seed)
        assert chi2 < 100, chi2
        p_pair = k * (k - 1) / (n * (n - 1))  # uniform k-subset: P(0 and 1 both chosen)
        assert abs(pair01 / trials - p_pair) < 6 * math.sqrt(p_pair * (1 - p_pair) / trials)
    else:
        assert torch.all(counts == trials)


def test_randomk_rejection_refill_stays_uniform(monkeypatch):
    # force the "not enough distinct draws yet" loop of the sparse sampler
    monkeypatch.setattr(C, "_OVERSAMPLE", 0.05)
    monkeypatch.setattr(C, "_EXTRA_DRAWS", 1)
    n, k, trials = 40, 10, 3_000
    comp = RandomK(k=k, seed=99)
    counts = torch.zeros(n)
    for _ in range(trials):
        idx = comp(torch.zeros(n)).indices
        assert idx.numel() == k and torch.unique(idx).numel() == k
        counts[idx] += 1
    expected = trials * k / n
    assert float(((counts - expected) ** 2 / expected).sum()) < 100


def test_randomk_large_sparse_path():
    d = 2_000_003
    s = RandomK(ratio=0.001, seed=0)(torch.zeros(d))
    assert s.nnz == TopK(ratio=0.001).k_for(d)
    s.validate()
    # rough spread check: each half gets about half of the picks
    low = int((s.indices < d // 2).sum())
    assert abs(low - s.nnz / 2) < 6 * math.sqrt(s.nnz / 4)


# ------------------------------------------------------------------- RTopK
def test_rtopk_support_in_top_r_and_count():
    x = torch.randn(50_000, generator=torch.Generator().manual_seed(9))
    comp = RTopK(k=50, n_workers=5, seed=0)
    assert comp.r_for(x.numel()) == 250  # paper: k / r = 1 / n
    top_r = set(torch.topk(x.abs(), 250).indices.tolist())
    for _ in range(5):
        s = comp(x)
        assert_well_formed(s, x)
        assert s.nnz == 50
        assert set(s.indices.tolist()) <= top_r


def test_rtopk_seeded_and_uniform_over_top_r():
    x = torch.arange(1, 101, dtype=torch.float32)  # top-20 = indices 80..99
    a, b = RTopK(k=5, r=20, seed=7), RTopK(k=5, r=20, seed=7)
    counts = torch.zeros(100)
    trials = 3_000
    for _ in range(trials):
        ia, ib = a(x).indices, b(x).indices
        assert torch.equal(ia, ib)
        counts[ia] += 1
    assert counts[:80].sum() == 0
    expected = trials * 5 / 20
    chi2 = float(((counts[80:] - expected) ** 2 / expected).sum())
    assert chi2 < 70, chi2  # 19 dof


def test_rtopk_r_capped_and_validation():
    x = torch.randn(30)
    comp = RTopK(k=10, n_workers=8, seed=0)  # r = 80 > 30
    assert comp.r_for(30) == 30
    assert comp(x).nnz == 10
    with pytest.raises(ValueError, match="r .*n_workers"):
        RTopK(k=5)
    with pytest.raises(ValueError, match="exactly one"):
        RTopK(k=5, r=10, n_workers=2)
    with pytest.raises(ValueError, match="k <= r"):
        RTopK(k=5, r=3)
    with pytest.raises(ValueError):
        RTopK(k=5, n_workers=0)


# ---------------------------------------------------------- HardThreshold
@pytest.mark.usefixtures("cpu_path")
@HYP
@given(values=vectors, lam=st.floats(0.0, 10.0, allow_nan=False))
def test_hard_threshold_exact_set(values, lam):
    x = torch.tensor(values, dtype=torch.float32)
    s = HardThreshold(lam)(x)
    assert_well_formed(s, x)
    expected = torch.nonzero(x.double().abs() >= lam).flatten()
    assert torch.equal(s.indices, expected)


@pytest.mark.usefixtures("cpu_path")
@pytest.mark.parametrize("lam", [0.0, 1.5, 2.9, 3.3, 5.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_hard_threshold_large(lam, dtype):
    d = 300_001
    x = torch.randn(d, generator=torch.Generator().manual_seed(2)).to(dtype)
    s = HardThreshold(lam)(x)
    assert_well_formed(s, x)
    assert torch.equal(s.indices, torch.nonzero(x.double().abs() >= lam).flatten())


@pytest.mark.usefixtures("cpu_path")
def test_hard_threshold_boundary_is_exact_in_real_arithmetic():
    lam = 0.7
    below = torch.tensor(lam, dtype=torch.float32)  # float32(0.7) = 0.69999998... < 0.7
    assert below.double() < lam
    x = torch.stack([below, -below, torch.nextafter(below, torch.tensor(1.0)), torch.tensor(0.0)])
    assert HardThreshold(lam)(x).indices.tolist() == [2]
    assert HardThreshold(0.5)(torch.tensor([0.5, -0.5, 0.25])).indices.tolist() == [0, 1]
    assert HardThreshold(0.0)(torch.tensor([0.0, -0.0, 1.0])).nnz == 3  # |x| >= 0: everything


@pytest.mark.usefixtures("cpu_path")
def test_hard_threshold_validation_and_non_finite():
    for bad in (-1.0, float("nan"), float("inf"), "0.1", True):
        with pytest.raises(ValueError):
            HardThreshold(bad)
    for d in (10, 200_000):
        x = torch.zeros(d)
        x[d - 1] = float("nan")
        with pytest.raises(ValueError, match="NaN or Inf"):
            HardThreshold(1.0)(x)


def test_hard_threshold_rule_from_paper():
    # hard-threshold-total-error.txt Appendix D: lambda = 1 / (2 sqrt(k))
    for k in (1, 4, 100, 11_174):
        assert hard_threshold_for_topk(k) == pytest.approx(1 / (2 * math.sqrt(k)), rel=1e-12)
    # Table 5: ResNet-18 / CIFAR-10, k_min = 0.1 % of d = 11,173,962 -> 4.73e-3
    k_min = TopK(ratio=0.001).k_for(11_173_962)
    assert round(hard_threshold_for_topk(k_min), 5) == 0.00473
    # eq. (29) in general: (2 / sqrt k) sqrt((2d/k + M) zeta^2 + sigma^2)
    got = hard_threshold_for_topk(100, sigma=0.5, zeta_sq=0.01, d=10_000, m=3.0)
    assert got == pytest.approx(2 / 10 * math.sqrt((200 + 3) * 0.01 + 0.25))
    with pytest.raises(ValueError):
        hard_threshold_for_topk(0)
    with pytest.raises(ValueError):
        hard_threshold_for_topk(10, zeta_sq=0.1)  # needs d


# --------------------------------------------------------------- AdapTop-K
@pytest.mark.parametrize("gamma", [0.0, 0.25, 0.5, 1.0])
@pytest.mark.parametrize("k", [1, 7, 100])
def test_adaptive_schedule_spends_exactly_the_budget(gamma, k):
    for T in range(1, 41):
        for t_hat in range(0, T + 1):
            rounds = adaptive_k_rounds(T, k, gamma, t_hat)
            assert sum(rounds) == T * k, (T, t_hat)
            assert all(v >= 0 for v in rounds)


@pytest.mark.parametrize("T,t_hat", [(10, 4), (3000, 700), (7000, 0), (24, 24), (100, 37)])
def test_adaptive_schedule_follows_eq21_for_even_T(T, t_hat):
    k, gamma = 1000, 0.5
    for t in range(T):
        low = t_hat / 2 <= t < (t_hat + T) / 2  # eq. (21), real-valued bounds
        assert adaptive_k_schedule(t, T, k, gamma, t_hat) == (500 if low else 1500), t


def test_adaptive_schedule_more_early_and_late():
    T, k, t_hat = 101, 50, 30
    rounds = adaptive_k_rounds(T, k, 0.5, t_hat)
    early, middle, late = rounds[: t_hat // 2], rounds[t_hat // 2 + 1 : (t_hat + T) // 2 - 1], rounds[-10:]
    assert min(early) > max(middle) and min(late) > max(middle)
    assert set(rounds) <= {25, 50, 75}
    assert rounds.count(50) == 1  # odd T: the one unpaired round gets exactly k


def test_adaptive_schedule_validation():
    with pytest.raises(ValueError):
        adaptive_k_schedule(5, 5, 10, 0.5, 2)  # t out of range
    with pytest.raises(ValueError):
        adaptive_k_schedule(0, 5, 10, 1.5, 2)  # gamma > 1
    with pytest.raises(ValueError):
        adaptive_k_schedule(0, 5, 10, 0.5, 6)  # t_hat > T
    with pytest.raises(ValueError):
        adaptive_k_schedule(0, 5, 0, 0.5, 2)  # k < 1


@pytest.mark.parametrize("ec", [True, False])
def test_adaptive_t_hat_is_the_minimum_of_the_coefficient(ec):
    d, k, eta, mu, L, sigma_sq, f0, T = 10_000, 100, 0.05, 0.5, 2.0, 0.5, 3.0, 4_000
    t_hat = adaptive_k_t_hat(d=d, k=k, eta=eta, mu=mu, L=L, sigma_sq=sigma_sq, f0=f0, error_compensation=ec)
    if ec:
        alpha, beta, B = 2 * d * eta * f0 / k, d * sigma_sq * eta**2 * (eta * L + 1) / k, 1 - eta * mu / 2
    else:
        alpha, beta, B = 2 * d * f0 / (k * eta), d * sigma_sq * (eta * L + 1) / k, 1 - eta * mu * k / d

    def coef(t):  # A_t B_t up to the constant B^(T-1), in logs to avoid underflow
        return math.log(alpha / t + beta) - t * math.log(B)

    # Lemma 3 / 8: decreasing before t_hat, non-decreasing from t_hat on
    assert 1 <= t_hat < T
    assert all(coef(t + 1) < coef(t) for t in range(1, t_hat))
    assert all(coef(t + 1) >= coef(t) for t in range(t_hat + 1, min(T, t_hat + 200)))
    assert adaptive_k_t_hat(d=d, k=k, eta=eta, mu=mu, L=L, sigma_sq=sigma_sq, f0=f0, T=5, error_compensation=ec) <= 5
    # no gradient noise (beta = 0): A_t B_t ~ B^(-t) / t is smallest at floor(-1 / ln B)
    t0 = adaptive_k_t_hat(d=d, k=k, eta=eta, mu=mu, L=L, sigma_sq=0.0, f0=f0, error_compensation=ec)
    assert t0 == math.floor(-1 / math.log(B))
    with pytest.raises(ValueError):
        adaptive_k_t_hat(d=d, k=k, eta=10.0, mu=1.0, L=L, sigma_sq=sigma_sq, f0=f0)  # B <= 0


# ------------------------------------------------------------------ factory
def test_build_compressor_from_config_values():
    top = build_compressor("topk", ratio="0.001")
    assert isinstance(top, TopK) and top.ratio == 0.001
    assert build_compressor("Top_K", k=10.0).k == 10
    rk = build_compressor("randomk", k="5", seed=3)
    assert isinstance(rk, RandomK) and rk.k == 5 and rk.seed == 3
    rt = build_compressor("rtopk", ratio=0.01, n_workers=4, seed="")
    assert isinstance(rt, RTopK) and rt.n_workers == 4 and rt.seed is None
    ht = build_compressor("hard-threshold", lam="0.01")
    assert isinstance(ht, HardThreshold) and ht.lam == 0.01
    assert build_compressor("hard_threshold", k=100).lam == pytest.approx(0.05)
    ident = build_compressor("none")
    x = torch.tensor([0.0, 1.0, -2.0])
    assert isinstance(ident, Identity) and torch.equal(ident(x).to_dense(), x)


@pytest.mark.parametrize(
    "name,params,match",
    [
        ("top-kk", {}, "unknown compressor"),
        (3, {}, "name must be a string"),
        ("topk", {}, "exactly one"),
        ("topk", {"k": 5, "ratio": 0.1}, "exactly one"),
        ("topk", {"kk": 5}, "kk"),
        ("topk", {"k": "five"}, "'k'"),
        ("topk", {"k": 2.5}, "'k'"),
        ("topk", {"k": True}, "'k'"),
        ("topk", {"ratio": 2}, "ratio"),
        ("randomk", {"ratio": "abc"}, "'ratio'"),
        ("rtopk", {"k": 5}, "n_workers"),
        ("hard-threshold", {}, "exactly one"),
        ("hard-threshold", {"lam": -1}, "lam"),
        ("hard-threshold", {"lam": 0.1, "k": 5}, "exactly one"),
        ("none", {"k": 5}, "does not take"),
    ],
)
def test_build_compressor_rejects_bad_config(name, params, match):
    with pytest.raises(ValueError, match=match):
        build_compressor(name, **params)


# ----------------------------------------------------------------- registry
BUILTIN_CONFIGS = {
    "topk": {"ratio": 0.1},
    "randomk": {"ratio": 0.1, "seed": 0},
    "rtopk": {"ratio": 0.1, "n_workers": 3},
    "hard-threshold": {"lam": 0.5},
    "none": {},
}


@pytest.fixture
def every_other():
    """A compressor defined here, registered for the test and unregistered after it."""

    @register_compressor("test-every-other")
    class EveryOther:
        def __init__(self, offset: int = 0) -> None:
            if offset not in (0, 1):
                raise ValueError(f"offset must be 0 or 1, got {offset!r}")
            self.offset = offset

        def k_for(self, numel: int) -> int:
            return max(0, (numel - self.offset + 1) // 2)

        def __call__(self, x, *, generator=None):
            idx = torch.arange(self.offset, x.numel(), 2, device=x.device)
            return SparseTensor(idx, x[idx], x.numel())

    try:
        yield EveryOther
    finally:
        COMPRESSORS.pop("test-every-other", None)


def test_registry_holds_the_builtins_and_names():
    assert {n: COMPRESSORS[n] for n in BUILTIN_CONFIGS} == {
        "topk": TopK, "randomk": RandomK, "rtopk": RTopK, "hard-threshold": HardThreshold, "none": Identity,
    }
    assert set(BUILTIN_CONFIGS) <= set(C.COMPRESSOR_NAMES)
    for alias, cls in [("top-k", TopK), ("Random_K", RandomK), ("rtop-k", RTopK), ("r-topk", RTopK),
                       ("threshold", HardThreshold), ("HardThreshold", HardThreshold), ("identity", Identity),
                       ("dense", Identity)]:
        params = BUILTIN_CONFIGS[next(n for n, c in COMPRESSORS.items() if c is cls)]
        assert type(build_compressor(alias, **params)) is cls, alias
    assert {"COMPRESSORS", "register_compressor", "Compressor", "adaptive_k_budgeted"} <= set(C.__all__)


@pytest.mark.parametrize(
    "obj",
    [TopK(ratio=0.1), TopK(k=3), RandomK(ratio=0.1), RTopK(ratio=0.1, n_workers=2), HardThreshold(0.1), Identity()],
    ids=repr,
)
def test_builtins_satisfy_the_protocol(obj):
    assert isinstance(obj, Compressor)
    x = torch.randn(50, generator=torch.Generator().manual_seed(0))
    s = obj(x, generator=torch.Generator().manual_seed(1))
    assert_well_formed(s, x)
    assert s.nnz <= obj.k_for(50)
    assert not isinstance(object(), Compressor)


def test_hard_threshold_and_identity_k_for_is_numel():
    assert HardThreshold(0.1).k_for(17) == 17 and Identity().k_for(17) == 17
    assert HardThreshold(0.0).k_for(0) == 0 and Identity().k_for(0) == 0


def test_registered_class_is_built_by_name(every_other):
    comp = build_compressor(name="test-every-other", offset=1)
    assert isinstance(comp, every_other) and isinstance(comp, Compressor)
    x = torch.arange(7, dtype=torch.float32)
    s = comp(x)
    assert s.indices.tolist() == [1, 3, 5] and s.nnz == comp.k_for(7)
    assert build_compressor("TEST_every_other").offset == 0  # names normalised; None/absent -> default
    assert build_compressor("test-every-other", offset=None).offset == 0
    assert "test-every-other" in C.COMPRESSOR_NAMES
    with pytest.raises(ValueError, match="'test-every-other'.*offset must be 0 or 1"):
        build_compressor("test-every-other", offset=5)
    with pytest.raises(ValueError, match="stride.*takes \\['offset'\\]"):
        build_compressor("test-every-other", stride=2)


def test_registration_does_not_leak():
    assert "test-every-other" not in COMPRESSORS
    assert "test-every-other" not in C.COMPRESSOR_NAMES


def test_duplicate_registration_raises_unless_replace(every_other):
    class Other:
        def k_for(self, numel):
            return numel

        def __call__(self, x, *, generator=None):
            return Identity()(x)

    with pytest.raises(ValueError, match="already registered"):
        register_compressor("test-every-other")(Other)
    with pytest.raises(ValueError, match="already registered"):
        register_compressor("TOPK")(Other)  # normalised names collide too
    with pytest.raises(ValueError, match="already registered"):
        register_compressor("identity")(Other)  # an alias is taken as well
    assert COMPRESSORS["test-every-other"] is every_other and COMPRESSORS["topk"] is TopK
    register_compressor("test-every-other", replace=True)(Other)
    assert COMPRESSORS["test-every-other"] is Other


def test_registration_requires_the_protocol_methods():
    class NoKFor:
        def __call__(self, x, *, generator=None):
            return Identity()(x)

    class NoCall:
        def k_for(self, numel):
            return numel

    for cls in (NoKFor, NoCall):
        with pytest.raises(TypeError, match="lacks"):
            register_compressor("test-bad")(cls)
    assert "test-bad" not in COMPRESSORS


def test_unknown_name_lists_the_registered_names(every_other):
    with pytest.raises(ValueError, match="unknown compressor 'nope'") as info:
        build_compressor("nope")
    for name in (*BUILTIN_CONFIGS, "test-every-other"):
        assert name in str(info.value)
    # A user's compressor registered in the server's script only: the clients' error says where it must be.
    assert "exists only in the processes that ran the registration" in str(info.value)
    assert "a module that the ClientApp's module imports" in str(info.value)


@pytest.mark.parametrize("name", sorted(COMPRESSORS))
@HYP
@given(d=st.integers(0, 3_000), seed=st.integers(0, 2**31 - 1), scale=st.sampled_from([1e-3, 1.0, 1e3]))
def test_every_registered_compressor_takes_generator_and_respects_k_for(name, d, seed, scale):
    params = BUILTIN_CONFIGS.get(name, {})
    try:
        comp = build_compressor(name, **params)
    except ValueError:
        pytest.skip(f"no sample config for {name!r}")
    x = torch.randn(d, generator=torch.Generator().manual_seed(seed)) * scale
    a = comp(x, generator=torch.Generator().manual_seed(seed + 1))
    assert_well_formed(a, x)
    bound = comp.k_for(d)
    assert a.nnz <= (d if bound is None else bound)
    # random ones are reproducible given the generator (equal states -> equal results)
    b = comp(x, generator=torch.Generator().manual_seed(seed + 1))
    assert torch.equal(a.indices, b.indices)


def test_quantizers_reexported_when_available():
    quantize = pytest.importorskip("fl_sparse.quantize")
    from fl_sparse.compressors import FractionalQuantizer, ScaledSign

    assert FractionalQuantizer is quantize.FractionalQuantizer
    assert ScaledSign is quantize.ScaledSign


def test_unknown_attribute_still_raises():
    with pytest.raises(AttributeError):
        C.no_such_thing  # noqa: B018


# --------------------------------------------------------------------- CUDA
@needs_cuda
def test_cuda_topk_matches_cpu_magnitudes():
    x = torch.randn(1_000_003, generator=torch.Generator().manual_seed(0))
    k = 1_000
    s = TopK(k)(x.cuda())
    assert s.device.type == "cuda"
    s.validate()
    assert torch.equal(s.indices.cpu(), TopK(k)(x).indices)  # continuous data: no ties
    bad = x.clone()
    bad[5] = float("nan")
    with pytest.raises(ValueError):
        TopK(k)(bad.cuda())


@needs_cuda
def test_cuda_randomk_rtopk_hard_threshold():
    x = torch.randn(100_000, device="cuda")
    s = RandomK(k=100, seed=0)(x)
    s.validate()
    assert s.nnz == 100 and s.device.type == "cuda"
    assert torch.equal(s.indices, RandomK(k=100, seed=0)(x).indices)
    r = RTopK(k=10, n_workers=3, seed=0)(x)
    assert set(r.indices.tolist()) <= set(torch.topk(x.abs(), 30).indices.tolist())
    h = HardThreshold(2.0)(x)
    assert torch.equal(h.indices, torch.nonzero(x.double().abs() >= 2.0).flatten())
