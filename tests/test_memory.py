"""Tests for fl_sparse.memory.ErrorFeedback."""

from __future__ import annotations

import io

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fl_sparse.compressors import HardThreshold, RandomK, RTopK, TopK
from fl_sparse.memory import ErrorFeedback
from fl_sparse.sparse import SparseTensor

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_compensate_on_empty_memory_is_a_copy():
    mem = ErrorFeedback()
    x = torch.tensor([1.0, -2.0, 3.0])
    out = mem.compensate(x)
    assert torch.equal(out, x)
    out[0] = 100.0
    assert x[0] == 1.0  # new tensor, x untouched
    assert mem.numel == 3 and mem.device == torch.device("cpu")
    assert torch.equal(mem.error, torch.zeros(3))
    assert mem.norm() == 0.0


@settings(max_examples=60, deadline=None)
@given(
    values=st.lists(st.floats(-1e3, 1e3, allow_nan=False, width=32), min_size=1, max_size=64),
    rounds=st.integers(1, 4),
    data=st.data(),
)
def test_invariant_sent_plus_error_equals_compensated(values, rounds, data):
    x = torch.tensor(values, dtype=torch.float32)
    mem = ErrorFeedback(x.numel())
    k = data.draw(st.integers(1, x.numel()))
    compressor = data.draw(
        st.sampled_from([TopK(k), RandomK(k, seed=0), RTopK(k, n_workers=2, seed=0), HardThreshold(1.0)])
    )
    total_in = torch.zeros_like(x, dtype=torch.float64)
    total_sent = torch.zeros_like(x, dtype=torch.float64)
    for r in range(rounds):
        g = x * (r + 1)
        compensated = mem.compensate(g)
        assert torch.equal(compensated, g + mem.error)
        sent = compressor(compensated)
        mem.update(compensated, sent)
        # exact: the sent entries carry the compensated values unchanged
        assert torch.equal(sent.to_dense() + mem.error, compensated)
        assert torch.all(mem.error[sent.indices] == 0)
        total_in += g.double()
        total_sent += sent.to_dense().double()
    # error feedback loses nothing: sum of what was sent + what is left = sum of inputs
    assert torch.allclose(total_sent + mem.error.double(), total_in, rtol=1e-5, atol=1e-3)


def test_sparse_and_dense_sent_agree_and_quantized_values():
    g = torch.Generator().manual_seed(0)
    compensated = torch.randn(1_000, generator=g)
    sent = TopK(50)(compensated)
    quantized = sent.with_values(torch.sign(sent.values) * sent.values.abs().mean())  # lossy values
    for s in (sent, quantized):
        a, b = ErrorFeedback(1_000), ErrorFeedback(1_000)
        a.update(compensated, s)
        b.update(compensated, s.to_dense())
        assert torch.equal(a.error, b.error)
        assert torch.allclose(s.to_dense() + a.error, compensated, atol=1e-6)
    assert not torch.equal(a.error[sent.indices], torch.zeros(50))  # quantization error is kept


def test_update_does_not_alias_compensated():
    mem = ErrorFeedback(4)
    c = torch.tensor([1.0, 2.0, 3.0, 4.0])
    mem.update(c, SparseTensor(torch.tensor([1]), torch.tensor([2.0]), 4))
    c.zero_()
    assert mem.error.tolist() == [1.0, 0.0, 3.0, 4.0]


def test_shape_and_length_mismatch():
    mem = ErrorFeedback(5)
    with pytest.raises(ValueError, match="5"):
        mem.compensate(torch.zeros(4))
    with pytest.raises(ValueError, match="1-D"):
        mem.compensate(torch.zeros(5, 1))
    with pytest.raises(ValueError):
        mem.update(torch.zeros(5), SparseTensor.empty(6))
    with pytest.raises(ValueError, match="shape"):
        mem.update(torch.zeros(5), torch.zeros(6))
    with pytest.raises(TypeError):
        mem.update(torch.zeros(5), [0.0] * 5)
    lazy = ErrorFeedback()
    lazy.compensate(torch.zeros(3))
    with pytest.raises(ValueError):
        lazy.compensate(torch.zeros(7))  # length fixed by the first vector
    with pytest.raises(ValueError):
        ErrorFeedback(-1)
    with pytest.raises(ValueError):
        ErrorFeedback(3, dtype=torch.int64)


def test_norm_reset_and_error_property():
    assert ErrorFeedback().error is None
    mem = ErrorFeedback(3)
    mem.update(torch.tensor([3.0, 4.0, 5.0]), SparseTensor(torch.tensor([2]), torch.tensor([5.0]), 3))
    assert mem.norm() == pytest.approx(5.0)
    mem.reset()
    assert mem.norm() == 0.0
    assert torch.equal(mem.error, torch.zeros(3))
    assert mem.numel == 3


@settings(max_examples=60, deadline=None)
@given(
    values=st.lists(st.floats(-(2.0**50), 2.0**50, allow_nan=False, width=32), min_size=1, max_size=300),
    dtype=st.sampled_from([torch.float32, torch.float64, torch.bfloat16]),
)
def test_norm_is_the_euclidean_norm_of_the_error(values, dtype):
    mem = ErrorFeedback(len(values), dtype=dtype)
    e = torch.tensor(values, dtype=dtype)
    mem.load_state_dict({"numel": len(values), "error": e})
    exact = float(torch.linalg.vector_norm(e.double()))
    # e's own dtype accumulates the squares: a few ulp of it per entry, relatively
    rel = {torch.float32: 1e-5, torch.float64: 1e-12, torch.bfloat16: 5e-2}[dtype]
    assert mem.norm() == pytest.approx(exact, rel=rel)


def test_norm_of_a_finite_error_is_finite_even_when_its_square_overflows(recwarn):
    """A diverging train function leaves entries near float32's limit: e·e overflows float32 (torch's
    own vector_norm says inf), ||e|| does not, and an inf there would make the server reject every
    later reply of that client (its report's error-norm must be finite)."""
    mem = ErrorFeedback(3)
    mem.load_state_dict({"numel": 3, "error": torch.tensor([1e20, 1.0, 0.0])})
    assert float(torch.linalg.vector_norm(mem.error)) == float("inf")  # the overflow this avoids
    assert mem.norm() == pytest.approx(1e20, rel=1e-7)
    mem.load_state_dict({"numel": 3, "error": torch.tensor([3e38, -3e38, 1.0])})
    assert mem.norm() == pytest.approx(3e38 * 2**0.5, rel=1e-7)
    mem.load_state_dict({"numel": 3, "error": torch.tensor([float("inf"), 1.0, 0.0])})
    assert mem.norm() == float("inf")
    mem.load_state_dict({"numel": 3, "error": torch.tensor([float("nan"), 1.0, 0.0])})
    assert mem.norm() != mem.norm()
    assert not [w for w in recwarn if issubclass(w.category, RuntimeWarning)]


def test_state_dict_roundtrip_through_torch_save():
    mem = ErrorFeedback(6)
    c = torch.arange(6, dtype=torch.float32)
    mem.update(c, TopK(2)(c))
    buf = io.BytesIO()
    torch.save(mem.state_dict(), buf)
    buf.seek(0)
    restored = ErrorFeedback()
    restored.load_state_dict(torch.load(buf))
    assert restored.numel == 6
    assert torch.equal(restored.error, mem.error)
    x = torch.ones(6)
    assert torch.equal(restored.compensate(x), mem.compensate(x))
    # loading copies: later updates of the source do not leak
    snapshot = ErrorFeedback(6)
    snapshot.load_state_dict(mem.state_dict())
    mem.update(c, c)
    assert not torch.equal(snapshot.error, mem.error)
    state = {"numel": 6, "error": torch.ones(6)}
    snapshot.load_state_dict(state)
    state["error"].mul_(5)  # the caller's tensor is not the memory's
    assert torch.equal(snapshot.error, torch.ones(6))
    # empty state
    empty = ErrorFeedback()
    empty.load_state_dict(ErrorFeedback(4).state_dict())
    assert empty.numel == 4 and empty.norm() == 0.0


def test_load_state_dict_rejects_mismatch():
    mem = ErrorFeedback(6)
    with pytest.raises(ValueError):
        mem.load_state_dict({"numel": 7, "error": torch.zeros(7)})
    with pytest.raises(ValueError):
        mem.load_state_dict({"numel": 6, "error": torch.zeros(5)})
    with pytest.raises(ValueError):
        mem.load_state_dict({"error": torch.zeros(6)})


def test_dtype_of_memory():
    mem = ErrorFeedback(3, dtype=torch.float64)
    c = torch.tensor([0.1, 0.2, 0.3], dtype=torch.float32)
    out = mem.compensate(c)
    assert out.dtype == torch.float64
    mem.update(out, SparseTensor.empty(3, dtype=torch.float64))
    assert mem.error.dtype == torch.float64
    assert torch.equal(mem.error, c.double())


def test_device_matching_ignores_missing_index():
    from fl_sparse.memory import _same_device

    assert _same_device(torch.device("cuda"), torch.device("cuda:0"))
    assert _same_device(torch.device("cuda:1"), torch.device("cuda"))
    assert not _same_device(torch.device("cuda:0"), torch.device("cuda:1"))
    assert not _same_device(torch.device("cpu"), torch.device("cuda"))
    mem = ErrorFeedback(2, device="cpu")
    assert torch.equal(mem.compensate(torch.ones(2)), torch.ones(2))


@needs_cuda
def test_cuda_memory_and_device_mismatch():
    mem = ErrorFeedback(device="cuda")
    x = torch.randn(1_000, device="cuda")
    c = mem.compensate(x)
    sent = TopK(10)(c)
    mem.update(c, sent)
    assert mem.error.device.type == "cuda"
    assert torch.equal(sent.to_dense() + mem.error, c)
    with pytest.raises(ValueError, match="cuda|cpu"):
        mem.compensate(torch.randn(1_000))


@given(st.integers(1, 200), st.integers(1, 4), st.data())
@settings(max_examples=60, deadline=None)
def test_a_handed_over_error_is_shared_and_never_changed(numel, rounds, data):
    """load_state_dict(copy=False) takes the tensor itself; compensate and update only make new ones."""
    floats = st.floats(-1e3, 1e3, allow_nan=False, width=32)
    given_error = torch.tensor(data.draw(st.lists(floats, min_size=numel, max_size=numel)))
    before = given_error.clone()
    memory = ErrorFeedback(numel)
    memory.load_state_dict({"numel": numel, "error": given_error}, copy=False)
    assert memory.error.data_ptr() == given_error.data_ptr()
    for _ in range(rounds):
        step = torch.tensor(data.draw(st.lists(floats, min_size=numel, max_size=numel)))
        a = memory.compensate(step)
        k = data.draw(st.integers(0, numel))
        idx = torch.randperm(numel, generator=torch.Generator().manual_seed(k))[:k].sort().values
        memory.update(a, SparseTensor(idx, a[idx], numel))
    assert torch.equal(given_error, before)
    copied = ErrorFeedback(numel)
    copied.load_state_dict({"numel": numel, "error": given_error})  # the default copies
    assert copied.error.data_ptr() != given_error.data_ptr() and torch.equal(copied.error, before)


@given(st.integers(1, 200), st.integers(1, 4), st.booleans(), st.data())
@settings(max_examples=60, deadline=None)
def test_in_place_rounds_equal_copying_rounds_and_leave_a_handed_over_error_alone(numel, rounds, handed_over, data):
    """compensate(out=x) and update(in_place=True) give the copying path's e, bit for bit, in x's memory."""
    floats = st.floats(-1e3, 1e3, allow_nan=False, width=32)
    start = torch.tensor(data.draw(st.lists(floats, min_size=numel, max_size=numel)))
    kept = start.clone()
    copying, in_place = ErrorFeedback(numel), ErrorFeedback(numel)
    if handed_over:  # as the client mod does: the store's tensor, which nothing may change
        copying.load_state_dict({"numel": numel, "error": start.clone()})
        in_place.load_state_dict({"numel": numel, "error": start}, copy=False)
    for r in range(rounds):
        step = torch.tensor(data.draw(st.lists(floats, min_size=numel, max_size=numel)))
        mine = step.clone()  # given up to the in-place memory
        a = copying.compensate(step)
        a2 = in_place.compensate(mine, out=mine)
        assert a2.data_ptr() == mine.data_ptr() and torch.equal(a2, a)
        k = data.draw(st.integers(0, numel))
        idx = torch.randperm(numel, generator=torch.Generator().manual_seed(k + r))[:k].sort().values
        copying.update(a, SparseTensor(idx, a[idx] * 0.5, numel))
        in_place.update(a2, SparseTensor(idx, a2[idx] * 0.5, numel), in_place=True)
        assert in_place.error.data_ptr() == mine.data_ptr()  # no copy
        assert torch.equal(in_place.error, copying.error)
    assert torch.equal(start, kept)


def test_in_place_update_copies_when_it_must():
    memory = ErrorFeedback(4)
    memory.load_state_dict({"numel": 4, "error": torch.tensor([1.0, 2.0, 3.0, 4.0])})
    own = memory.error
    with pytest.raises(ValueError, match="memory's own tensor"):
        memory.compensate(torch.ones(4), out=own)
    with pytest.raises(ValueError, match="out must be"):
        memory.compensate(torch.ones(4), out=torch.ones(4, dtype=torch.float64))
    # the memory's own tensor handed back: copied, the old e unchanged
    memory.update(own, SparseTensor(torch.tensor([0]), torch.tensor([1.0]), 4), in_place=True)
    assert own.tolist() == [1.0, 2.0, 3.0, 4.0] and memory.error.tolist() == [0.0, 2.0, 3.0, 4.0]
    # float64 compensated, float32 memory: copied into the memory's dtype
    a = torch.tensor([1.0, 1.0, 1.0, 1.0], dtype=torch.float64)
    memory.update(a, SparseTensor(torch.tensor([3]), torch.tensor([1.0], dtype=torch.float64), 4), in_place=True)
    assert memory.error.dtype == torch.float32 and memory.error.tolist() == [1.0, 1.0, 1.0, 0.0]
    assert a.tolist() == [1.0] * 4
    # values that view the compensated vector itself (a compressor returning a view): read before written
    a = torch.tensor([5.0, 6.0, 7.0, 8.0])
    memory.update(a, SparseTensor(torch.tensor([1, 2]), a[:2], 4), in_place=True)
    assert memory.error.tolist() == [5.0, 1.0, 1.0, 8.0]  # 7 - 6, not 7 - (6 - 5)
