"""Properties of the value quantizers (fl_sparse.quantize).

The interval checks recompute the paper's geometry independently in float64
numpy (v_max, v_min, alpha, interval index) rather than trusting the
implementation's own arithmetic.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import fl_sparse.quantize as Q
from fl_sparse.quantize import FractionalQuantizer, ScaledSign, _interval_sums_by_sorting

# quantizer_path below is function-scoped and constant across a test's examples: nothing to reset
SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(params=["numpy", "torch"])
def quantizer_path(request, monkeypatch):
    """Run a test on each implementation: numpy (CPU tensors) and torch (accelerators, here on CPU)."""
    if request.param == "torch":
        monkeypatch.setattr(Q, "_numpy_path", lambda device: False)
    return request.param

finite_float32 = st.floats(width=32, allow_nan=False, allow_infinity=False)
float32_vectors = hnp.arrays(np.float32, st.integers(0, 300), elements=finite_float32)
# vectors with many repeated / zero entries, to hit ties and the zero slot
few_distinct_vectors = hnp.arrays(
    np.float32, st.integers(1, 200),
    elements=st.sampled_from([0.0, -0.0, 1.0, -1.0, 2.5, -3e-30, 7e20, 1e-45]),
)
bit_budgets = st.integers(2, 16)

# Index-space tolerance of the independent recomputation (float64 logs of
# values as close as one float32 ulp amplified by up to 2**15 intervals).
INDEX_TOL = 1e-2


def expected_geometry(v: np.ndarray, bits: int):
    """(n_intervals, v_max, v_min, t) with t[i] the fractional interval position of |v_i|."""
    a = np.abs(v.astype(np.float64))
    nonzero = a > 0
    levels = 2 ** (bits - 1)
    n_intervals = levels - 1 if (~nonzero).any() else levels
    if not nonzero.any():
        return n_intervals, 0.0, 0.0, None
    v_max, v_min = a.max(), a[nonzero].min()
    log_range = math.log(v_max) - math.log(v_min)
    with np.errstate(divide="ignore"):
        t = (math.log(v_max) - np.log(a)) * (n_intervals / log_range) if log_range > 0 else np.zeros_like(a)
    return n_intervals, v_max, v_min, t


def check_fractional(v: np.ndarray, bits: int, codes: torch.Tensor, means: torch.Tensor, recon: torch.Tensor) -> None:
    """Every documented property of FractionalQuantizer for input v."""
    levels = 2 ** (bits - 1)
    codes_np = codes.cpu().numpy().astype(np.int64)
    means_np = means.cpu().numpy()
    recon_np = recon.cpu().numpy()
    assert codes.shape == (v.size,) and means.shape == (levels,) and recon.shape == (v.size,)
    assert means.dtype == torch.float32 and recon.dtype == torch.float32
    assert ((codes_np >= 0) & (codes_np < 2**bits)).all()
    assert np.isfinite(means_np).all() and (means_np >= 0).all()

    interval = codes_np & (levels - 1)
    negative = (codes_np >> (bits - 1)) & 1
    # signs: reconstruction has exactly the sign of the input, zeros stay zero
    assert np.array_equal(np.sign(recon_np), np.sign(v))
    assert np.array_equal(negative.astype(bool), v < 0)
    # reconstruction is sign * mean of the coded interval
    assert np.array_equal(np.abs(recon_np), means_np[interval])

    a = np.abs(v.astype(np.float64))
    zero = a == 0
    n_intervals, v_max, v_min, t = expected_geometry(v, bits)
    if zero.any():  # reserved zero slot holds zeros and only zeros
        assert (interval[zero] == levels - 1).all()
        assert (interval[~zero] < levels - 1).all()
        assert means_np[levels - 1] == 0
    if (~zero).any():
        r = np.abs(recon_np[~zero]).astype(np.float64)
        # both the value and its reconstruction lie in [v_min, v_max] ...
        assert (r >= v_min).all() and (r <= v_max).all()
        if v_max == v_min:  # single magnitude: one interval, exact reconstruction
            assert (interval[~zero] == 0).all()
            assert np.array_equal(recon_np[~zero], v[~zero])
        else:
            # ... and in the same interval I_l = [v_max/alpha^(l+1), v_max/alpha^l]
            l = interval[~zero]
            t_orig = t[~zero]
            assert (t_orig >= l - INDEX_TOL).all() and (t_orig <= l + 1 + INDEX_TOL).all()
            t_recon = (math.log(v_max) - np.log(r)) * (n_intervals / (math.log(v_max) - math.log(v_min)))
            assert (t_recon >= l - INDEX_TOL).all() and (t_recon <= l + 1 + INDEX_TOL).all()
            # the interval index is floor(t) away from (numerically ambiguous) boundaries
            clear = np.abs(t_orig - np.round(t_orig)) > INDEX_TOL
            expected = np.minimum(np.floor(t_orig), n_intervals - 1)
            assert np.array_equal(l[clear], expected[clear])
            # relative error bounded by alpha - 1
            alpha = (v_max / v_min) ** (1 / n_intervals)
            rel = np.abs(r - a[~zero]) / a[~zero]
            assert (rel <= (alpha - 1) * (1 + 1e-6) + 1e-6).all()
    # each used mean lies between the smallest and largest magnitude it replaces
    for l in np.unique(interval):
        members = a[interval == l]
        assert members.min() <= means_np[l] <= members.max()
    unused = np.setdiff1d(np.arange(levels), interval)
    assert (means_np[unused] == 0).all()


# ------------------------------------------------------------ FractionalQuantizer
@pytest.mark.parametrize("bits", [0, 1, 17, 32, -3, 4.0, True, "4", None])
def test_rejects_bad_bit_budgets(bits):
    with pytest.raises(ValueError, match="bits"):
        FractionalQuantizer(bits)


@pytest.mark.usefixtures("quantizer_path")
@SETTINGS
@given(v=float32_vectors | few_distinct_vectors, bits=bit_budgets)
def test_fractional_properties(v, bits):
    q = FractionalQuantizer(bits)
    codes, means = q.encode(torch.from_numpy(v))
    expected_dtype = torch.uint8 if bits <= 8 else torch.int16 if bits <= 15 else torch.int32
    assert codes.dtype == expected_dtype
    recon = q(torch.from_numpy(v))
    assert torch.equal(recon, q.decode(codes, means))
    check_fractional(v, bits, codes, means, recon)


@pytest.mark.usefixtures("quantizer_path")
@SETTINGS
@given(v=float32_vectors, bits=bit_budgets)
def test_fractional_is_permutation_equivariant(v, bits):
    """The code of an entry depends on its value and the vector's value set, not on positions or memory layout."""
    q = FractionalQuantizer(bits)
    perm = torch.from_numpy(np.random.default_rng(len(v)).permutation(len(v)))
    x = torch.from_numpy(v)
    codes, means = q.encode(x)
    codes_p, means_p = q.encode(x[perm])  # a permuted, non-contiguous copy
    assert torch.equal(codes_p, codes[perm])
    assert torch.equal(means_p, means)


@pytest.mark.usefixtures("quantizer_path")
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(2, 3000), spread=st.floats(0.0, 6.0))
def test_error_non_increasing_in_bits(seed, n, spread):
    """q -> q+1 halves every interval (on a zero-free input), so the squared error cannot grow."""
    rng = np.random.default_rng(seed)
    v = (rng.standard_normal(n) * np.exp(spread * rng.standard_normal(n))).astype(np.float32)
    assume((v != 0).all())
    sse = []
    for bits in range(2, 17):
        recon = FractionalQuantizer(bits)(torch.from_numpy(v)).numpy().astype(np.float64)
        sse.append(float(((recon - v) ** 2).sum()))
    scale = float((v.astype(np.float64) ** 2).sum())
    for coarse, fine in zip(sse, sse[1:]):
        # slack only for float32 rounding of the means
        assert fine <= coarse * (1 + 1e-3) + 1e-12 * scale
    if len(np.unique(np.abs(v))) > 2 ** 15:  # 16 bits cannot be exact: it must have improved
        assert sse[-1] < sse[0]


@pytest.mark.usefixtures("quantizer_path")
def test_error_decreases_on_average():
    rng = np.random.default_rng(1234)
    mean_sse = np.zeros(15)
    for _ in range(20):
        v = (rng.standard_normal(2000) * np.exp(2 * rng.standard_normal(2000))).astype(np.float32)
        for i, bits in enumerate(range(2, 17)):
            recon = FractionalQuantizer(bits)(torch.from_numpy(v)).numpy()
            mean_sse[i] += float(((recon.astype(np.float64) - v) ** 2).sum())
    # strictly better with every extra bit until the error is (nearly) zero
    assert (np.diff(mean_sse[:8]) < 0).all()
    assert mean_sse[-1] < 1e-6 * mean_sse[0]


@pytest.mark.usefixtures("quantizer_path")
@pytest.mark.parametrize("bits", [2, 4, 9, 16])
def test_fractional_edge_cases(bits):
    q = FractionalQuantizer(bits)
    levels = 2 ** (bits - 1)
    # empty
    codes, means = q.encode(torch.empty(0))
    assert codes.numel() == 0 and means.shape == (levels,) and q(torch.empty(0)).numel() == 0
    # all zeros come back as exact zeros
    assert torch.equal(q(torch.zeros(5)), torch.zeros(5))
    # a single value and all-equal magnitudes are exact
    assert torch.equal(q(torch.tensor([-3.25])), torch.tensor([-3.25]))
    v = torch.tensor([2.0, -2.0, 2.0, 0.0, -2.0])
    assert torch.equal(q(v), v)
    # zeros next to non-zeros stay zero, non-zeros keep their sign
    v = torch.tensor([0.0, 1e-3, -5.0, 0.0, 7.0])
    out = q(v)
    assert out[0] == 0 and out[3] == 0 and out[1] > 0 and out[2] < 0 and out[4] > 0
    # other float dtypes are accepted and give float32
    assert q(torch.tensor([1.0, -2.0], dtype=torch.float64)).dtype == torch.float32


@pytest.mark.usefixtures("quantizer_path")
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_fractional_rejects_non_finite(bad):
    v = torch.tensor([1.0, bad, 2.0])
    with pytest.raises(ValueError, match="NaN or Inf"):
        FractionalQuantizer(4).encode(v)
    with pytest.raises(ValueError, match="NaN or Inf"):
        FractionalQuantizer(4)(v)


@pytest.mark.usefixtures("quantizer_path")
def test_fractional_rejects_bad_inputs():
    q = FractionalQuantizer(4)
    with pytest.raises(ValueError, match="1-D"):
        q.encode(torch.ones(2, 2))
    with pytest.raises(ValueError, match="floating"):
        q.encode(torch.ones(3, dtype=torch.int64))
    with pytest.raises(ValueError, match="overflow|NaN or Inf"):  # float64 beyond float32 range
        q.encode(torch.tensor([1e300], dtype=torch.float64))
    codes, means = q.encode(torch.randn(10))
    with pytest.raises(ValueError, match="means"):
        q.decode(codes, means[:-1])
    with pytest.raises(ValueError, match="means"):
        q.decode(codes, torch.full_like(means, float("nan")))
    with pytest.raises(ValueError, match="codes"):
        q.decode(torch.tensor([16]), means)


@pytest.mark.parametrize("bits", [2, 4, 9, 16])
def test_numpy_and_torch_paths_agree(monkeypatch, bits):
    """The numpy CPU path codes, averages and reconstructs as the torch path does (continuous
    data: no value sits on an interval boundary, where the two logs could round apart)."""
    rng = np.random.default_rng(bits)
    q = FractionalQuantizer(bits)
    for n, zeros in [(509, 0), (5_000, 40), (3, 1)]:
        v = (rng.standard_normal(n) * np.exp(2 * rng.standard_normal(n))).astype(np.float32)
        v[rng.choice(n, zeros, replace=False)] = 0.0
        x = torch.from_numpy(v)
        by_numpy = q.encode(x), q(x)
        with monkeypatch.context() as m:
            m.setattr(Q, "_numpy_path", lambda device: False)
            by_torch = q.encode(x), q(x)
        assert torch.equal(by_numpy[0][0], by_torch[0][0])  # codes
        assert torch.equal(by_numpy[0][1], by_torch[0][1])  # means
        assert torch.equal(by_numpy[1], by_torch[1])  # reconstruction
        assert by_numpy[0][0].dtype == by_torch[0][0].dtype


def test_sorting_sums_match_index_add():
    """The atomics-free interval sums used on CUDA agree with CPU index_add_."""
    rng = np.random.default_rng(7)
    mags = torch.from_numpy(np.abs(rng.standard_normal(50_000) * np.exp(3 * rng.standard_normal(50_000))))
    interval = torch.from_numpy(rng.integers(0, 64, 50_000))
    sums, counts = _interval_sums_by_sorting(mags, interval, 64)
    ref = torch.zeros(64, dtype=torch.float64).index_add_(0, interval, mags)
    assert torch.equal(counts, torch.bincount(interval, minlength=64).double())
    assert torch.allclose(sums, ref, rtol=1e-12, atol=0)


# ------------------------------------------------------------ ScaledSign
@SETTINGS
@given(v=float32_vectors)
def test_scaled_sign_properties(v):
    s = ScaledSign()
    negative, scale = s.encode(torch.from_numpy(v))
    assert negative.dtype == torch.bool and scale.dtype == torch.float32 and scale.dim() == 0
    recon = s(torch.from_numpy(v)).numpy()
    assert np.array_equal(recon, s.decode(negative, scale).numpy())
    assert np.array_equal(negative.numpy(), v < 0)
    if v.size:
        l1 = float(np.abs(v.astype(np.float64)).sum())
        # every entry is +-scale, scale = ||v||_1 / d, so the L1 norm is preserved
        assert np.array_equal(np.abs(recon), np.full(v.size, float(scale), dtype=np.float32))
        assert math.isclose(float(np.abs(recon.astype(np.float64)).sum()), l1, rel_tol=1e-6, abs_tol=1e-30)  # tiny: subnormal scale
        nonzero = v != 0
        assert np.array_equal(np.sign(recon[nonzero]), np.sign(v[nonzero]))
        assert (recon[~nonzero] >= 0).all()  # zeros are sent as '+'
    else:
        assert recon.size == 0 and float(scale) == 0


def test_scaled_sign_keeps_the_signs_of_a_vector_whose_mean_magnitude_rounds_to_zero():
    """||v||_1 / d of [1e-45, 0] is below float32's smallest subnormal: the scale would be 0 and the sign
    of the non-zero entry lost (hypothesis found it)."""
    negative, scale = ScaledSign().encode(torch.tensor([1e-45, 0.0, -0.0]))
    assert float(scale) == np.finfo(np.float32).smallest_subnormal
    assert ScaledSign()(torch.tensor([-1e-45, 0.0])).tolist()[0] < 0
    assert float(ScaledSign().encode(torch.zeros(3))[1]) == 0.0


def test_scaled_sign_rejects_nan_and_bad_scale():
    with pytest.raises(ValueError, match="NaN or Inf"):
        ScaledSign().encode(torch.tensor([1.0, float("nan")]))
    with pytest.raises(ValueError, match="scale"):
        ScaledSign().decode(torch.tensor([True]), torch.tensor(-1.0))


# ------------------------------------------------------------ CUDA
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


@cuda
@settings(max_examples=40, deadline=None)
@given(v=float32_vectors | few_distinct_vectors, bits=bit_budgets)
def test_fractional_on_cuda(v, bits):
    q = FractionalQuantizer(bits)
    x = torch.from_numpy(v).cuda()
    codes, means = q.encode(x)
    assert codes.is_cuda and means.is_cuda
    recon = q(x)
    assert recon.is_cuda
    check_fractional(v, bits, codes, means, recon)
    c2, m2 = q.encode(x)  # deterministic on the GPU too (no float atomics)
    assert torch.equal(codes, c2) and torch.equal(means, m2)


@cuda
def test_scaled_sign_on_cuda():
    v = torch.randn(1000)
    out = ScaledSign()(v.cuda())
    assert out.is_cuda
    assert torch.allclose(out.cpu(), ScaledSign()(v), rtol=1e-6)
