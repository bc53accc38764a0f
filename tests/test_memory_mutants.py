"""Tests written to kill mutants of :class:`fl_sparse.memory.ErrorFeedback` that the main suite let live.

Mostly ``load_state_dict``: what a checkpoint may hold (``numel`` a
non-negative int or None, ``error`` a 1-D tensor of that length or None),
the error each bad state raises, and where the loaded residual lives (the
memory's device and dtype, a copy). The ``meta`` device stands in for a
second device on a CPU-only machine. See docs/testing.md.
"""

from __future__ import annotations

import re

import pytest
import torch

from fl_sparse.memory import ErrorFeedback


def _raises(message: str):
    return pytest.raises(ValueError, match="^" + re.escape(message) + "$")


@pytest.mark.parametrize("state", [None, [], {"numel": 3}, {"error": None}, {"numel": None, "err": None}])
def test_a_state_without_both_keys_is_refused_by_name(state):
    with _raises("state must be a dict with keys 'numel' and 'error'"):
        ErrorFeedback(3).load_state_dict(state)


@pytest.mark.parametrize("numel", [-1, True, False, "3", 3.0])
def test_numel_must_be_a_non_negative_int_or_none(numel):
    with _raises(f"state['numel'] must be a non-negative int or None, got {numel!r}"):
        ErrorFeedback().load_state_dict({"numel": numel, "error": None})


def test_numel_zero_and_none_are_valid():
    mem = ErrorFeedback()
    mem.load_state_dict({"numel": 0, "error": None})
    assert mem.numel == 0 and mem.error is not None and mem.error.numel() == 0
    mem = ErrorFeedback()
    mem.load_state_dict({"numel": None, "error": None})
    assert mem.numel is None and mem.error is None
    mem = ErrorFeedback()
    mem.load_state_dict({"numel": None, "error": torch.arange(4.0)})  # the length comes from the tensor
    assert mem.numel == 4 and torch.equal(mem.error, torch.arange(4.0))


def test_a_state_for_another_length_is_refused():
    with _raises("state holds numel 7, the memory holds 6"):
        ErrorFeedback(6).load_state_dict({"numel": 7, "error": None})


@pytest.mark.parametrize("error", [torch.zeros(2, 3), torch.tensor(1.0), [0.0, 0.0, 0.0], "e"])
def test_error_must_be_a_1d_tensor(error):
    with _raises("state['error'] must be a 1-D tensor or None"):
        ErrorFeedback().load_state_dict({"numel": None, "error": error})


@pytest.mark.parametrize(
    "memory_numel, state, expected",
    [
        (None, {"numel": 5, "error": torch.zeros(4)}, 5),  # the state's own numel
        (5, {"numel": None, "error": torch.zeros(4)}, 5),  # else the memory's
        (5, {"numel": 5, "error": torch.zeros(6)}, 5),
    ],
)
def test_error_length_must_match_the_numel_in_force(memory_numel, state, expected):
    got = state["error"].numel()
    with _raises(f"state['error'] has {got} entries, expected {expected}"):
        ErrorFeedback(memory_numel).load_state_dict(state)


def test_loaded_error_takes_the_memorys_device_and_dtype():
    # a memory with no device yet adopts the tensor's device
    fresh = ErrorFeedback()
    fresh.load_state_dict({"numel": 3, "error": torch.ones(3, dtype=torch.float64)})
    assert fresh.device == torch.device("cpu")
    assert fresh.error.dtype == torch.float32  # the memory's dtype, not the state's
    x = torch.tensor([1.0, 2.0, 3.0])
    assert torch.equal(fresh.compensate(x), x + 1)
    # a memory with a device keeps it: the residual is moved there
    meta = ErrorFeedback(3, device="meta", dtype=torch.float64)
    meta.load_state_dict({"numel": 3, "error": torch.ones(3)})
    assert meta.error.device.type == "meta" and meta.device == torch.device("meta")
    assert meta.error.dtype == torch.float64


# ====================================================================== construction and checks
def test_constructor_checks_numel_and_dtype_by_name():
    for numel in (-1, True, 2.0, "3"):
        with _raises(f"numel must be a non-negative int or None, got {numel!r}"):
            ErrorFeedback(numel)
    with _raises("dtype must be a floating torch.dtype, got torch.int64"):
        ErrorFeedback(3, dtype=torch.int64)
    assert ErrorFeedback(0).numel == 0 and ErrorFeedback(0).error.numel() == 0
    assert ErrorFeedback(None).numel is None
    assert ErrorFeedback(3, device="meta").device == torch.device("meta")
    assert ErrorFeedback(3, device="meta").error.device.type == "meta"


def test_bad_vectors_are_named_in_the_error():
    from fl_sparse.sparse import SparseTensor

    def mem():
        return ErrorFeedback(3, device="cpu")

    with pytest.raises(TypeError, match=r"^x must be a torch\.Tensor, got list$"):
        mem().compensate([0.0, 0.0, 0.0])
    with pytest.raises(TypeError, match=r"^compensated must be a torch\.Tensor, got list$"):
        mem().update([0.0, 0.0, 0.0], torch.zeros(3))
    with _raises("x must be floating point, got torch.int64"):
        mem().compensate(torch.zeros(3, dtype=torch.int64))
    with _raises("compensated must be floating point, got torch.int64"):
        mem().update(torch.zeros(3, dtype=torch.int64), torch.zeros(3))
    with _raises("x must be a flat 1-D tensor, got shape (3, 1)"):
        mem().compensate(torch.zeros(3, 1))
    with _raises("x has 4 entries, the memory holds 3"):
        mem().compensate(torch.zeros(4))
    with _raises("x is on meta, the memory is on cpu"):
        mem().compensate(torch.zeros(3, device="meta"))
    with _raises("compensated is on meta, the memory is on cpu"):
        mem().update(torch.zeros(3, device="meta"), torch.zeros(3, device="meta"))
    with _raises("sent has numel 4, the memory holds 3"):
        mem().update(torch.zeros(3), SparseTensor(torch.tensor([0, 1]), torch.zeros(2), 4))
    with _raises("sent is on meta, the memory is on cpu"):
        mem().update(torch.zeros(3), SparseTensor(torch.tensor([0, 1], device="meta"), torch.zeros(2, device="meta"), 3))
    with _raises("sent is on meta, the memory is on cpu"):
        mem().update(torch.zeros(3), torch.zeros(3, device="meta"))
    with _raises("sent has shape (2,), compensated has (3,)"):
        mem().update(torch.zeros(3), torch.zeros(2))
    with pytest.raises(TypeError, match=r"^sent must be a SparseTensor or torch\.Tensor, got list$"):
        mem().update(torch.zeros(3), [0.0, 0.0, 0.0])


@pytest.mark.parametrize("sparse", [True, False])
def test_the_residual_is_kept_in_the_memorys_dtype(sparse):
    """e = a - sent in the memory's dtype, whatever the dtypes of a and sent (float64 here, float32 memory)."""
    from fl_sparse.sparse import SparseTensor

    a = torch.tensor([0.1, 0.2, 0.3], dtype=torch.float64)
    if sparse:
        sent = SparseTensor(torch.tensor([1]), torch.tensor([0.2], dtype=torch.float64), 3)
        expected = torch.tensor([0.1, 0.0, 0.3], dtype=torch.float64)
    else:
        sent = torch.tensor([0.0, 0.2, 0.05], dtype=torch.float64)
        expected = a - sent
    for dtype in (torch.float32, torch.float64):
        mem = ErrorFeedback(3, dtype=dtype)
        mem.update(a, sent)
        assert mem.error.dtype == dtype
        assert torch.allclose(mem.error.double(), expected, atol=1e-7)
    # float32 compensated and float64 sent values into a float32 memory
    mem = ErrorFeedback(3)
    mem.update(a.float(), sent)
    assert mem.error.dtype == torch.float32


# ---------------------------------------------------------------- shares_memory, compensate(out=)
def test_shares_memory_is_exact_at_the_edges_of_two_storages():
    """Two storages side by side in one buffer do not overlap, in either order; an empty view
    shares no memory even with the tensor it views."""
    from fl_sparse.memory import shares_memory

    buf = bytearray(24)
    first = torch.frombuffer(buf, dtype=torch.float32, count=3, offset=0)
    second = torch.frombuffer(buf, dtype=torch.float32, count=3, offset=12)
    assert first.untyped_storage().data_ptr() + 12 == second.untyped_storage().data_ptr()  # adjacent
    assert not shares_memory(first, second) and not shares_memory(second, first)
    both = torch.frombuffer(buf, dtype=torch.float32, count=4, offset=4)  # the last of first, the first of second
    assert shares_memory(both, first) and shares_memory(second, both)
    x = torch.arange(5.0)
    assert not shares_memory(x[2:2], x) and not shares_memory(x, x[2:2])
    assert not shares_memory(torch.empty(0), torch.empty(0))
    assert shares_memory(x[1:3], x[3:]) and shares_memory(x, x)  # whole storages: views of one tensor overlap


def test_compensate_into_out_without_an_error_copies_x_and_refuses_the_memorys_own_tensor():
    memory = ErrorFeedback(3)
    x, out = torch.tensor([1.0, -2.0, 3.0]), torch.full((3,), 9.0)
    assert memory.compensate(x, out=out) is out
    assert out.tolist() == [1.0, -2.0, 3.0] and x.tolist() == [1.0, -2.0, 3.0]
    assert memory.compensate(x, out=x) is x and x.tolist() == [1.0, -2.0, 3.0]
    memory.load_state_dict({"numel": 3, "error": torch.tensor([0.5, 0.5, 0.5])})
    with _raises("out must not be the memory's own tensor"):
        memory.compensate(x, out=memory.error)
    empty = ErrorFeedback(0)  # a model without float entries: nothing to share
    empty.load_state_dict({"numel": 0, "error": torch.zeros(0)})
    z = torch.zeros(0)
    assert empty.compensate(z, out=z).numel() == 0
