"""Tests written to kill mutants of :mod:`fl_sparse.quantize` that the main suite let live.

Mostly what ``decode`` refuses (a receiver decodes what a peer sent, so every
documented check matters on its own, with its own message) and the reprs.
See docs/testing.md.
"""

from __future__ import annotations

import re
import warnings

import pytest
import torch

import fl_sparse.quantize as Q
from fl_sparse.quantize import FractionalQuantizer, ScaledSign


def _raises(message: str):
    return pytest.raises(ValueError, match="^" + re.escape(message) + "$")


@pytest.fixture(params=["numpy", "torch"])
def quantizer_path(request, monkeypatch):
    """Run a test on each implementation: numpy (CPU tensors) and torch (accelerators, here on CPU)."""
    if request.param == "torch":
        monkeypatch.setattr(Q, "_numpy_path", lambda device: False)
    return request.param


def test_reprs():
    """The reprs name the class and, for FractionalQuantizer, the bit budget."""
    assert repr(ScaledSign()) == "ScaledSign()"
    assert repr(FractionalQuantizer(5)) == "FractionalQuantizer(bits=5)"


# ====================================================================== FractionalQuantizer.decode
@pytest.mark.usefixtures("quantizer_path")
@pytest.mark.parametrize(
    "codes",
    [
        torch.tensor([1.0, 2.0]),  # floating codes, even integral ones
        torch.tensor([1, 2], dtype=torch.int16).reshape(1, 2),  # 2-D integer codes
        torch.tensor([True, False]),  # bool is not an integer code
        torch.tensor(3, dtype=torch.uint8),  # 0-d
    ],
    ids=["float", "2-D", "bool", "0-d"],
)
def test_decode_refuses_codes_that_are_not_a_1d_integer_tensor(codes):
    """Each of the three conditions (1-D, not floating, not bool) refuses on its own, by message."""
    q = FractionalQuantizer(4)
    _, means = q.encode(torch.tensor([1.0, -2.0, 0.5]))
    with _raises(f"codes must be a 1-D integer tensor, got {codes.dtype} {tuple(codes.shape)}"):
        q.decode(codes, means)


@pytest.mark.usefixtures("quantizer_path")
def test_decode_refuses_negative_or_non_finite_means_by_message():
    """Means must be finite and non-negative: a negative entry alone is refused, by message; all-zero means are valid."""
    q = FractionalQuantizer(3)  # L = 4 means
    codes, means = q.encode(torch.tensor([1.0, -2.0, 0.5, 4.0]))
    for bad in (means - means.max() - 1.0, torch.tensor([0.0, 0.0, -1e-30, 0.0]), torch.full((4,), float("inf"))):
        with _raises("means must be finite and non-negative"):
            q.decode(codes, bad)
    # zeros are valid means (empty intervals)
    assert q.decode(codes, torch.zeros(4)).abs().max() == 0


@pytest.mark.parametrize("bits", [2, 4, 9])
def test_decode_names_the_code_range_in_its_error(bits):
    """Codes outside ``[0, 2**bits)`` are refused with the range ``[0, 2**bits)`` and the codes' span."""
    q = FractionalQuantizer(bits)
    means = torch.ones(q.levels)
    with _raises(f"codes must lie in [0, {2**bits}), got [0, {2**bits}]"):
        q.decode(torch.tensor([0, 2**bits]), means)
    with _raises(f"codes must lie in [0, {2**bits}), got [-1, 1]"):
        q.decode(torch.tensor([-1, 1]), means)
    # the largest code is valid: a negative value of the last interval
    assert q.decode(torch.tensor([2**bits - 1]), means).tolist() == [-1.0]


# ====================================================================== ScaledSign.decode
@pytest.mark.parametrize(
    "negative",
    [torch.tensor([1, 0]), torch.tensor([[True, False]]), torch.tensor(True)],
    ids=["integer 1-D", "bool 2-D", "bool 0-d"],
)
def test_scaled_sign_decode_needs_a_1d_bool_mask(negative):
    """Either condition (bool dtype, 1-D) refuses on its own, by message."""
    with _raises(f"negative must be a 1-D bool tensor, got {negative.dtype} {tuple(negative.shape)}"):
        ScaledSign().decode(negative, torch.tensor(1.0))


# ====================================================================== interval means (CPU)
def test_interval_means_are_exact_per_interval_means_whatever_the_order_of_magnitudes():
    """``_interval_means`` on CPU: the float64 mean of each interval's magnitudes, 0 for an empty one.

    Intervals of index above the largest used one are empty too (their means 0, the result still
    ``levels`` long), and each interval's mean is its own: a huge magnitude in another interval
    does not leak into it (a prefix-sum difference, the CUDA path's method, would cancel the two
    ones of interval 0 against 2**53 here).
    """
    mags = torch.tensor([3.0, 1.0, 2.0], dtype=torch.float64)
    means = Q._interval_means(mags, torch.tensor([0, 1, 1]), 4)
    assert means.dtype == torch.float32
    assert means.tolist() == [3.0, 1.5, 0.0, 0.0]
    mags = torch.tensor([2.0**53, 1.0, 1.0], dtype=torch.float64)
    means = Q._interval_means(mags, torch.tensor([1, 0, 0]), 2)
    assert means.tolist() == [1.0, 2.0**53]


# ====================================================================== FractionalQuantizer.encode
@pytest.mark.usefixtures("quantizer_path")
@pytest.mark.parametrize("bits", [2, 4, 16])
@pytest.mark.parametrize("ratio", [1.5, 2.0, 2.7, 3.0, 1e6])
def test_two_magnitudes_are_each_reconstructed_exactly(bits, ratio):
    """Two distinct magnitudes: ``v_max`` is alone in interval 0 and ``v_min`` in the last one (the
    clamp of ``t = L``), so each interval's mean is its own magnitude, also for a small dynamic range
    (``log(v_max / v_min) <= 1``: the intervals are still cut, ``log_range > 0``)."""
    q = FractionalQuantizer(bits)
    v = torch.tensor([1.0, -ratio, ratio, -1.0, 1.0])
    codes, means = q.encode(v)
    assert torch.equal(q.decode(codes, means), v)
    interval = (codes.to(torch.int64) & (q.levels - 1)).tolist()
    assert interval == [q.levels - 1, 0, 0, q.levels - 1, q.levels - 1]


@pytest.mark.usefixtures("quantizer_path")
@pytest.mark.parametrize("v", [[0.0, 0.0, -0.0], [0.0, 1.0, -2.0, 0.0]], ids=["all zero", "some zero"])
def test_encoding_zeros_emits_no_warning(v):
    """Exact zeros have no logarithm; encoding them (alone or among non-zeros) warns about nothing."""
    q = FractionalQuantizer(4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = q(torch.tensor(v))
    assert [abs(a) for a in out.tolist()][: 1] == [0.0] and out[-1] == 0.0


@pytest.mark.usefixtures("quantizer_path")
def test_decode_gives_float32_whatever_the_dtype_of_the_means():
    """``decode`` reconstructs float32 values (as documented) even from float64 means, with the same values."""
    q = FractionalQuantizer(4)
    codes, means = q.encode(torch.tensor([1.0, -2.0, 0.0, 3.5]))
    out = q.decode(codes, means.double())
    assert out.dtype == torch.float32
    assert torch.equal(out, q.decode(codes, means))


def test_default_budget_is_four_bits():
    """``FractionalQuantizer()`` is the 4-bit quantizer (8 intervals, uint8 codes)."""
    q = FractionalQuantizer()
    assert q.bits == 4 and q.levels == 8 and q.code_dtype == torch.uint8


@pytest.mark.parametrize("quantizer", [FractionalQuantizer(4), ScaledSign()], ids=repr)
def test_a_non_tensor_is_refused_by_its_type_name(quantizer):
    """A non-tensor is refused with TypeError naming its type."""
    with pytest.raises(TypeError, match=r"^expected a torch\.Tensor, got list$"):
        quantizer.encode([1.0, 2.0])


@pytest.mark.usefixtures("quantizer_path")
def test_non_finite_values_are_refused_with_the_documented_message():
    """NaN/Inf, including a finite float64 that overflows float32, are refused with the exact documented message."""
    with _raises("values contain NaN or Inf (after casting to float32)"):
        FractionalQuantizer(4).encode(torch.tensor([1.0, float("nan")]))
    with _raises("values contain NaN or Inf (after casting to float32)"):
        ScaledSign().encode(torch.tensor([1e300], dtype=torch.float64))  # finite, but not in float32


@pytest.mark.usefixtures("quantizer_path")
def test_a_float32_tensor_that_requires_grad_is_quantized_without_error():
    """Values are detached first (a leaf with ``requires_grad`` cannot be read through numpy)."""
    v = torch.tensor([1.0, -2.0, 0.0, 4.0], requires_grad=True)
    assert torch.equal(FractionalQuantizer(4)(v), FractionalQuantizer(4)(v.detach()))
    assert torch.equal(ScaledSign()(v), ScaledSign()(v.detach()))
