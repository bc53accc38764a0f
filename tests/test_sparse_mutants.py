"""Tests written to kill mutmut survivors of fl_sparse/sparse.py (SparseTensor).

Expected values come from numpy/torch oracles written here (a dense loop, ``np.add.at``), never
from SparseTensor itself. Each refusal is checked by its exact message: the message names what
is wrong. The device checks use torch's ``meta`` device, so they run on a CPU-only machine.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fl_sparse.sparse import SparseTensor


def _st(indices, values, numel, dtype=torch.float32) -> SparseTensor:
    return SparseTensor(torch.tensor(indices, dtype=torch.int64), torch.tensor(values, dtype=dtype), numel)


@st.composite
def sparse_vectors(draw, numel=None, dtype=torch.float32):
    n = draw(st.integers(0, 40)) if numel is None else numel
    support = sorted(draw(st.sets(st.integers(0, max(n - 1, 0)), max_size=n)) if n else [])
    values = draw(st.lists(st.floats(-100, 100, width=32), min_size=len(support), max_size=len(support)))
    return _st(support, values, n, dtype)


# ------------------------------------------------------------------ construction refusals
@pytest.mark.parametrize("numel", [-1, True, False, 3.0, "3", None])
def test_numel_must_be_a_non_negative_int(numel):
    with pytest.raises(ValueError, match=rf"^numel must be a non-negative int, got {re.escape(repr(numel))}$"):
        SparseTensor(torch.empty(0, dtype=torch.int64), torch.empty(0), numel)


def test_numel_zero_is_a_valid_length():
    empty = SparseTensor(torch.empty(0, dtype=torch.int64), torch.empty(0), 0)
    assert empty.numel == 0 and empty.nnz == 0 and empty.density == 0.0
    assert empty.to_dense().shape == (0,)


@pytest.mark.parametrize(
    ("indices", "values", "shapes"),
    [
        (torch.zeros(2, 1, dtype=torch.int64), torch.zeros(2), "(2, 1) and (2,)"),
        (torch.zeros(2, dtype=torch.int64), torch.zeros(1, 2), "(2,) and (1, 2)"),
        (torch.tensor(0), torch.zeros(1), "() and (1,)"),
    ],
)
def test_indices_and_values_must_be_one_dimensional(indices, values, shapes):
    with pytest.raises(ValueError, match=rf"^indices and values must be 1-D, got shapes {re.escape(shapes)}$"):
        SparseTensor(indices, values, 4)


@pytest.mark.parametrize("dtype", [torch.int32, torch.int16, torch.uint8, torch.float32])
def test_indices_must_be_int64(dtype):
    with pytest.raises(ValueError, match=rf"^indices must be int64, got {dtype}$"):
        SparseTensor(torch.zeros(1, dtype=dtype), torch.zeros(1), 4)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool])
def test_values_must_be_floating_point(dtype):
    with pytest.raises(ValueError, match=rf"^values must be floating point, got {dtype}$"):
        SparseTensor(torch.zeros(1, dtype=torch.int64), torch.zeros(1, dtype=dtype), 4)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_every_floating_dtype_is_accepted(dtype):
    assert _st([1], [2.0], 4, dtype).dtype == dtype


def test_indices_and_values_must_have_the_same_length():
    with pytest.raises(ValueError, match=r"^indices \(3\) and values \(2\) differ in length$"):
        SparseTensor(torch.arange(3), torch.zeros(2), 4)


def test_indices_and_values_must_be_on_the_same_device():
    with pytest.raises(ValueError, match=r"^indices on meta but values on cpu$"):
        SparseTensor(torch.empty(1, dtype=torch.int64, device="meta"), torch.zeros(1), 4)
    with pytest.raises(ValueError, match=r"^indices on cpu but values on meta$"):
        SparseTensor(torch.zeros(1, dtype=torch.int64), torch.empty(1, device="meta"), 4)


# ------------------------------------------------------------------ basics
def test_nnz_density_device_and_dtype():
    s = _st([0, 3, 7], [1.0, -2.0, 0.5], 10, torch.float64)
    assert s.nnz == 3 and type(s.nnz) is int
    assert s.density == pytest.approx(0.3)
    assert s.device == torch.device("cpu")
    assert s.dtype == torch.float64
    meta = SparseTensor(torch.empty(2, dtype=torch.int64, device="meta"), torch.empty(2, device="meta"), 5)
    assert meta.device == torch.device("meta") and meta.density == pytest.approx(0.4)


def test_repr_is_short_and_names_the_shape():
    s = _st([1, 2], [1.0, 2.0], 9, torch.float16)
    assert repr(s) == "SparseTensor(nnz=2, numel=9, dtype=torch.float16, device=cpu)"


@settings(deadline=None)
@given(sparse_vectors())
def test_to_dense_matches_a_dense_loop(s):
    expected = np.zeros(s.numel, dtype=np.float32)
    for i, v in zip(s.indices.tolist(), s.values.tolist()):
        expected[i] = v
    dense = s.to_dense()
    assert dense.dtype == torch.float32 and dense.shape == (s.numel,)
    np.testing.assert_array_equal(dense.numpy(), expected)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_to_dense_keeps_the_values_dtype_unless_told(dtype):
    s = _st([0, 2], [1.5, -3.0], 4, dtype)
    assert s.to_dense().dtype == dtype
    wide = s.to_dense(torch.float64)
    assert wide.dtype == torch.float64 and wide.tolist() == [1.5, 0.0, -3.0, 0.0]


def test_to_dense_stays_on_the_tensors_device():
    s = SparseTensor(torch.empty(2, dtype=torch.int64, device="meta"), torch.empty(2, device="meta"), 5)
    dense = s.to_dense()
    assert dense.device == torch.device("meta") and dense.shape == (5,) and dense.dtype == torch.float32


def test_to_casts_values_and_keeps_indices():
    s = _st([1, 3], [0.1, 0.2], 5)
    same_place = s.to(dtype=torch.float64)
    assert same_place.indices is s.indices  # no device given: the indices are not touched
    assert same_place.dtype == torch.float64 and same_place.numel == 5
    assert same_place.values.tolist() == s.values.double().tolist()
    moved = s.to("meta")
    assert moved.device == torch.device("meta") and moved.indices.device == torch.device("meta")
    assert moved.dtype == torch.float32 and moved.numel == 5


def test_with_values_keeps_positions_and_length():
    s = _st([1, 3], [0.1, 0.2], 5)
    new = s.with_values(torch.tensor([7.0, 8.0], dtype=torch.float64))
    assert new.indices is s.indices and new.numel == 5 and new.values.tolist() == [7.0, 8.0]


@pytest.mark.parametrize("dtype", [torch.float16, torch.float64])
def test_empty(dtype):
    e = SparseTensor.empty(6, dtype=dtype)
    assert e.numel == 6 and e.nnz == 0 and e.dtype == dtype and e.indices.dtype == torch.int64
    assert e.to_dense().tolist() == [0.0] * 6
    assert SparseTensor.empty(3).dtype == torch.float32
    assert SparseTensor.empty(3, device="meta").device == torch.device("meta")


def test_from_dense_keeps_the_non_zeros():
    x = torch.tensor([0.0, 2.0, 0.0, -1.0, 0.0], dtype=torch.float64)
    s = SparseTensor.from_dense(x)
    assert s.indices.tolist() == [1, 3] and s.values.tolist() == [2.0, -1.0]
    assert s.numel == 5 and s.dtype == torch.float64


def test_from_dense_refuses_a_matrix():
    with pytest.raises(ValueError, match=r"^expected a 1-D tensor, got shape \(2, 2\)$"):
        SparseTensor.from_dense(torch.zeros(2, 2))


def test_gather_sorts_and_widens_the_indices():
    x = torch.tensor([10.0, 11.0, 12.0, 13.0, 14.0])
    s = SparseTensor.gather(x, torch.tensor([4, 0, 2], dtype=torch.int32))
    assert s.indices.dtype == torch.int64 and s.indices.tolist() == [0, 2, 4]
    assert s.values.tolist() == [10.0, 12.0, 14.0] and s.numel == 5
    s.validate()


@given(st.integers(1, 30).flatmap(lambda n: st.tuples(st.just(n), st.lists(st.integers(0, n - 1), max_size=2 * n))))
@settings(max_examples=60, deadline=None)
def test_gather_keeps_each_named_position_once(case):
    n, named = case
    x = torch.arange(n, dtype=torch.float32) * 3 - 7
    s = SparseTensor.gather(x, torch.tensor(named, dtype=torch.int64))
    s.validate()  # sorted and unique, as every SparseTensor must be
    assert s.indices.tolist() == sorted(set(named))
    assert s.values.tolist() == [x[i].item() for i in sorted(set(named))] and s.numel == n


@pytest.mark.parametrize("named, bad", [([0, -1, 2], -1), ([3, 5], 5), ([-4, 9], -4)])
def test_gather_refuses_a_position_outside_the_vector(named, bad):
    with pytest.raises(ValueError, match=rf"^index {bad} is outside \[0, 5\)$"):
        SparseTensor.gather(torch.zeros(5), torch.tensor(named))


def test_gather_refuses_a_matrix():
    with pytest.raises(ValueError, match=r"^expected a 1-D tensor, got shape \(1, 3\)$"):
        SparseTensor.gather(torch.zeros(1, 3), torch.tensor([0]))


# ------------------------------------------------------------------ arithmetic
def test_add_applies_alpha_in_place_in_the_dense_dtype():
    s = _st([0, 2], [1.0, -2.0], 4, torch.float16)
    dense = torch.ones(4, dtype=torch.float64)
    out = s.add_(dense, alpha=0.5)
    assert out is dense and dense.dtype == torch.float64
    assert dense.tolist() == [1.5, 1.0, 0.0, 1.0]
    s.add_(dense)  # alpha defaults to 1
    assert dense.tolist() == [2.5, 1.0, -2.0, 1.0]


@pytest.mark.parametrize("shape", [(3,), (5,), (2, 2)])
def test_add_refuses_a_dense_of_another_shape(shape):
    s = _st([0], [1.0], 4)
    dense = torch.zeros(shape)
    with pytest.raises(ValueError, match=rf"^dense has shape {re.escape(str(shape))}, expected \(4,\)$"):
        s.add_(dense)
    assert not dense.any()


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 30).flatmap(lambda n: st.lists(sparse_vectors(numel=n), min_size=1, max_size=4)), st.data())
def test_weighted_sum_matches_a_dense_oracle(parts, data):
    numel = parts[0].numel
    weights = data.draw(st.lists(st.floats(-4, 4, width=32), min_size=len(parts), max_size=len(parts)))
    total = SparseTensor.sum(parts, weights)
    expected = np.zeros(numel, dtype=np.float64)
    support = set()
    for p, w in zip(parts, weights):
        np.add.at(expected, p.indices.numpy(), p.values.double().numpy() * w)
        support |= set(p.indices.tolist())
    assert total.numel == numel and total.indices.tolist() == sorted(support)  # the union, cancellation or not
    np.testing.assert_allclose(total.to_dense().double().numpy(), expected, rtol=1e-5, atol=1e-3)
    total.validate()


def test_sum_applies_unequal_weights_to_their_own_parts():
    a = _st([0, 2], [1.0, 2.0], 4)
    b = _st([2, 3], [10.0, 20.0], 4)
    total = SparseTensor.sum([a, b], [0.5, 3.0])
    assert total.indices.tolist() == [0, 2, 3]
    assert total.values.tolist() == [0.5, 31.0, 60.0]


def test_sum_without_weights_adds_and_keeps_cancelled_entries():
    a = _st([1, 4], [1.0, 2.0], 5)
    b = _st([1], [-1.0], 5)
    total = SparseTensor.sum([a, b])
    assert total.indices.tolist() == [1, 4] and total.values.tolist() == [0.0, 2.0]
    assert total.dtype == torch.float32 and total.numel == 5


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_sum_keeps_the_values_dtype(dtype):
    a = _st([0, 2], [1.0, 2.0], 4, dtype)
    b = _st([2], [0.5], 4, dtype)
    total = SparseTensor.sum([a, b], [2.0, 4.0])
    assert total.dtype == dtype and total.values.tolist() == [2.0, 6.0]


def test_sum_of_one_part_is_that_part():
    a = _st([3, 1], [1.0, 2.0], 5)  # unsorted on purpose: the sum sorts
    total = SparseTensor.sum([a])
    assert total.indices.tolist() == [1, 3] and total.values.tolist() == [2.0, 1.0]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_sum_of_gpu_parts_stays_on_the_gpu():
    """The sum's output is built on the parts' device (differs only on an accelerator: the meta device
    cannot reach it, torch.unique refuses meta tensors)."""
    a = _st([0, 2], [1.0, 2.0], 4).to("cuda")
    b = _st([2, 3], [10.0, 20.0], 4).to("cuda")
    total = SparseTensor.sum([a, b], [0.5, 3.0])
    assert total.device.type == "cuda" and total.values.device.type == "cuda"
    assert total.indices.tolist() == [0, 2, 3] and total.values.tolist() == [0.5, 31.0, 60.0]


def test_sum_refusals():
    a, b = _st([0], [1.0], 4), _st([0], [1.0], 5)
    with pytest.raises(ValueError, match=r"^need at least one SparseTensor to sum$"):
        SparseTensor.sum([])
    with pytest.raises(ValueError, match=r"^all parts must have the same numel$"):
        SparseTensor.sum([a, b])
    with pytest.raises(ValueError, match=r"^all parts must have the same numel$"):
        SparseTensor.sum([a, a, b])  # a mismatch after the second part too
    with pytest.raises(ValueError, match=r"^weights and parts differ in length$"):
        SparseTensor.sum([a, a], [1.0])
    with pytest.raises(ValueError, match=r"^weights and parts differ in length$"):
        SparseTensor.sum([a], [1.0, 2.0])


# ------------------------------------------------------------------ validate
@pytest.mark.parametrize(
    ("indices", "values", "message"),
    [
        ([-1, 2], [1.0, 1.0], r"^indices out of range \[0, 4\)$"),
        ([0, 4], [1.0, 1.0], r"^indices out of range \[0, 4\)$"),
        ([4], [1.0], r"^indices out of range \[0, 4\)$"),
        ([2, 1, 3], [1.0, 1.0, 1.0], r"^indices are not strictly increasing \(sorted and unique\)$"),
        ([1, 1], [1.0, 1.0], r"^indices are not strictly increasing \(sorted and unique\)$"),
        ([0, 2, 1], [1.0, 1.0, 1.0], r"^indices are not strictly increasing \(sorted and unique\)$"),  # past the first
        ([0, 3, 3], [1.0, 1.0, 1.0], r"^indices are not strictly increasing \(sorted and unique\)$"),
        ([0, 3], [1.0, float("nan")], r"^values contain NaN or Inf$"),
        ([0, 3], [float("inf"), 1.0], r"^values contain NaN or Inf$"),
        ([2], [float("-inf")], r"^values contain NaN or Inf$"),
    ],
)
def test_validate_refuses(indices, values, message):
    with pytest.raises(ValueError, match=message):
        _st(indices, values, 4).validate()


@pytest.mark.parametrize(("indices", "numel"), [([], 0), ([], 4), ([0], 1), ([3], 4), ([0, 3], 4), ([0, 1, 2, 3], 4)])
def test_validate_accepts_and_returns_the_tensor(indices, numel):
    s = _st(indices, [1.0] * len(indices), numel)
    assert s.validate() is s
