"""Mutation-testing survivors of fl_sparse/tasks/training.py (see docs/testing.md).

Tiny hand-built models on synthetic data; every expected value comes from a plain
loop or numpy written here, never from the code under test.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flwr.app import ArrayRecord
from hypothesis import Phase, given, settings
from hypothesis import strategies as st
from torch import nn

from fl_sparse.tasks.training import (
    PlainSGD,
    arrayrecord_to_vector,
    evaluate,
    load_arrayrecord_,
    local_sgd,
    model_to_arrayrecord,
    model_to_vector,
    state_layout,
    vector_to_arrayrecord,
    vector_to_model_,
)


def _net(seed: int = 0, dropout: float = 0.0) -> nn.Sequential:
    torch.manual_seed(seed)
    layers: list[nn.Module] = [nn.Linear(5, 7), nn.ReLU()]
    if dropout:
        layers.append(nn.Dropout(dropout))
    layers.append(nn.Linear(7, 3))
    return nn.Sequential(*layers)


def _data(n: int = 23, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 5, generator=g), torch.randint(0, 3, (n,), generator=g)


def _batches(n: int, sizes: list[int], seed: int = 2) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, n, (s,), generator=g) for s in sizes]


def _reference_sgd(model, images, labels, batches, lr, momentum=0.0, weight_decay=0.0):
    """The textbook update on a copy, and the pre-update losses (float64, summed per example)."""
    params = list(model.parameters())
    bufs = [None] * len(params)
    total, count = 0.0, 0
    for idx in batches:
        loss = F.cross_entropy(model(images[idx]), labels[idx])
        grads = torch.autograd.grad(loss, params)
        total += float(loss.detach().double()) * len(idx)
        count += len(idx)
        with torch.no_grad():
            for i, (p, g) in enumerate(zip(params, grads)):
                d = g + weight_decay * p
                if momentum:
                    bufs[i] = d.clone() if bufs[i] is None else momentum * bufs[i] + d
                    d = bufs[i]
                p -= lr * d
    return total / count, count


# ------------------------------------------------------------ local_sgd


def test_local_sgd_returns_the_mean_pre_update_loss_and_counts_every_example():
    images, labels = _data()
    sizes = [4, 1, 6, 3]  # unequal batches: a mean over examples, not over batches
    batches = _batches(23, sizes)
    ours, ref = _net(), _net()
    out = local_sgd(ours, images, labels, batches, steps=4, lr=0.3)
    ref_loss, ref_count = _reference_sgd(ref, images, labels, batches, lr=0.3)
    assert set(out) == {"train_loss", "num_examples", "num_steps"}
    assert out["num_steps"] == 4 and out["num_examples"] == ref_count == 14
    assert out["train_loss"] == pytest.approx(ref_loss, rel=1e-6)
    assert isinstance(out["train_loss"], float) and isinstance(out["num_examples"], int)
    torch.testing.assert_close(model_to_vector(ours), model_to_vector(ref), rtol=0, atol=1e-6)


def test_local_sgd_accumulates_in_float64():
    """3,000 one-example steps at lr 0: a float32 running sum drifts from the float64 mean."""
    images, labels = _data(50, seed=3)
    batches = [torch.tensor([i % 50]) for i in range(3000)]
    out = local_sgd(_net(), images, labels, batches, steps=3000, lr=0.0)
    model = _net()
    with torch.no_grad():
        per = F.cross_entropy(model(images), labels, reduction="none")
    total = 0.0
    for i in range(3000):
        total += float(per[i % 50].double())
    assert out["train_loss"] == pytest.approx(total / 3000, rel=1e-12, abs=0)


def test_local_sgd_applies_momentum_and_weight_decay_with_a_fresh_buffer():
    images, labels = _data()
    batches = _batches(23, [5, 5, 5])
    ours, ref = _net(4), _net(4)
    local_sgd(ours, images, labels, batches, 3, 0.1, 0.8, 0.05)
    _reference_sgd(ref, images, labels, batches, 0.1, momentum=0.8, weight_decay=0.05)
    torch.testing.assert_close(model_to_vector(ours), model_to_vector(ref), rtol=0, atol=1e-6)


def test_local_sgd_defaults_are_plain_sgd_on_the_cpu():
    images, labels = _data()
    batches = _batches(23, [6, 6])
    ours, ref = _net(5), _net(5)
    local_sgd(ours, images, labels, iter(batches), 2, 0.5)
    _reference_sgd(ref, images, labels, batches, 0.5)
    torch.testing.assert_close(model_to_vector(ours), model_to_vector(ref), rtol=0, atol=1e-6)
    assert all(p.device.type == "cpu" for p in ours.parameters())


def test_local_sgd_calls_a_callable_source_with_step_numbers_from_zero():
    images, labels = _data()
    batches = _batches(23, [3, 4, 5])
    seen = []

    def source(h):
        seen.append(h)
        return batches[h]

    ours, ref = _net(6), _net(6)
    local_sgd(ours, images, labels, source, 3, 0.2)
    _reference_sgd(ref, images, labels, batches, 0.2)
    assert seen == [0, 1, 2]
    torch.testing.assert_close(model_to_vector(ours), model_to_vector(ref), rtol=0, atol=1e-6)


def test_local_sgd_takes_index_lists_and_leaves_the_model_in_training_mode():
    images, labels = _data()
    model = _net(dropout=0.5)
    model.eval()
    local_sgd(model, images, labels, [[0, 1, 2]], 1, 0.1)
    assert model.training and all(m.training for m in model.modules())


def test_local_sgd_reads_any_integer_dtype_as_indices_not_as_a_mask():
    images, labels = _data()
    batch = [0, 3, 5]
    ours, ref = _net(3), _net(3)
    out = local_sgd(ours, images, labels, [torch.tensor(batch, dtype=torch.uint8)], 1, 0.2)
    _reference_sgd(ref, images, labels, [torch.tensor(batch)], 0.2)
    assert out["num_examples"] == 3
    torch.testing.assert_close(model_to_vector(ours), model_to_vector(ref), rtol=0, atol=1e-6)


def test_local_sgd_does_not_move_a_model_already_on_the_device(monkeypatch):
    """Module.to walks every submodule: skipped when every parameter is already there."""
    images, labels = _data()
    model = _net()

    def refuse(*args, **kwargs):
        raise AssertionError("Module.to called for a model already on the device")

    monkeypatch.setattr(model, "to", refuse)
    local_sgd(model, images, labels, [torch.tensor([1, 2])], 1, 0.1, device="cpu")
    local_sgd(model, images, labels, [torch.tensor([1, 2])], 1, 0.1, device=torch.device("cpu"))


def test_local_sgd_with_a_seed_is_a_pure_function_and_restores_the_global_rng():
    images, labels = _data()
    batches = _batches(23, [8, 8, 8])
    ours = _net(7, dropout=0.5)
    torch.manual_seed(99)
    before = torch.get_rng_state()
    local_sgd(ours, images, labels, batches, 3, 0.2, seed=1234)
    assert torch.equal(torch.get_rng_state(), before)
    # oracle: the same loop with the global generator seeded by hand
    ref = _net(7, dropout=0.5)
    torch.manual_seed(1234)
    _reference_sgd(ref, images, labels, batches, 0.2)
    torch.testing.assert_close(model_to_vector(ours), model_to_vector(ref), rtol=0, atol=1e-6)


def test_local_sgd_seeds_only_the_cpu_generator_on_the_cpu(monkeypatch):
    """torch.manual_seed would also (lazily) seed every CUDA/XPU/MTIA generator, outside the forked state."""
    images, labels = _data()
    model = _net()  # (seeds torch itself)

    def refuse(seed):
        raise AssertionError("torch.manual_seed called for a CPU run")

    monkeypatch.setattr(torch, "manual_seed", refuse)
    out = local_sgd(model, images, labels, [torch.tensor([0, 1])], 1, 0.1, seed=3)
    assert out["num_steps"] == 1


def test_local_sgd_without_a_seed_draws_dropout_from_the_global_rng():
    images, labels = _data()
    batches = _batches(23, [8, 8])
    torch.manual_seed(5)
    ours = _net(8, dropout=0.5)
    torch.manual_seed(77)
    local_sgd(ours, images, labels, batches, 2, 0.2)
    ref = _net(8, dropout=0.5)
    torch.manual_seed(77)
    _reference_sgd(ref, images, labels, batches, 0.2)
    torch.testing.assert_close(model_to_vector(ours), model_to_vector(ref), rtol=0, atol=1e-6)


def test_local_sgd_stops_after_steps_and_zero_steps_change_nothing():
    images, labels = _data()
    batches = _batches(23, [2, 3, 4, 5])
    taken = []

    def source(h):
        taken.append(h)
        return batches[h]

    out = local_sgd(_net(), images, labels, source, 2, 0.1)
    assert taken == [0, 1] and out["num_examples"] == 5 and out["num_steps"] == 2
    model = _net()
    before = model_to_vector(model)
    out = local_sgd(model, images, labels, source, 0, 0.1)
    assert taken == [0, 1] and out["num_examples"] == 0 and out["num_steps"] == 0
    assert math.isnan(out["train_loss"]) and torch.equal(model_to_vector(model), before)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(steps=-1), r"^steps must be a non-negative integer, got -1$"),
        (dict(steps=True), r"^steps must be a non-negative integer, got True$"),
        (dict(steps=2.0), r"^steps must be a non-negative integer, got 2\.0$"),
        (dict(lr=-0.5), r"^lr, momentum and weight_decay must be >= 0, got -0\.5, 0\.0, 0\.0$"),
        (dict(momentum=-0.1), r"^lr, momentum and weight_decay must be >= 0, got 0\.1, -0\.1, 0\.0$"),
        (dict(weight_decay=-1e-3), r"^lr, momentum and weight_decay must be >= 0, got 0\.1, 0\.0, -0\.001$"),
    ],
)
def test_local_sgd_validation_messages(kwargs, message):
    images, labels = _data()
    args = dict(steps=1, lr=0.1, momentum=0.0, weight_decay=0.0)
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        local_sgd(_net(), images, labels, [torch.tensor([0])], **args)


def test_local_sgd_accepts_zero_rates_and_refuses_mismatched_and_empty_batches():
    images, labels = _data()
    model = _net()
    before = model_to_vector(model)
    local_sgd(model, images, labels, [torch.tensor([0, 1])], 1, 0.0, 0.0, 0.0)
    assert torch.equal(model_to_vector(model), before)  # lr 0: nothing moves
    with pytest.raises(ValueError, match=r"^23 images but 22 labels$"):
        local_sgd(model, images, labels[:-1], [torch.tensor([0])], 1, 0.1)
    with pytest.raises(ValueError, match=r"^minibatch 1 is empty$"):
        local_sgd(model, images, labels, [torch.tensor([0]), torch.tensor([], dtype=torch.int64)], 2, 0.1)
    with pytest.raises(ValueError, match=r"^batches ran out after 1 of 3 steps$") as info:
        local_sgd(model, images, labels, [torch.tensor([0])], 3, 0.1)
    assert info.value.__cause__ is None and info.value.__suppress_context__


# ------------------------------------------------------------ PlainSGD


@settings(max_examples=25, deadline=None, phases=tuple(p for p in Phase if p is not Phase.explain))  # see test_data_mutants.PHASES
@given(
    lr=st.floats(0.0, 1.0),
    momentum=st.sampled_from([0.0, 0.5, 0.9]),
    weight_decay=st.sampled_from([0.0, 1e-3, 0.1]),
    steps=st.integers(1, 4),
    seed=st.integers(0, 2**16),
)
def test_plain_sgd_matches_a_numpy_update(lr, momentum, weight_decay, steps, seed):
    rng = np.random.default_rng(seed)
    p0 = rng.standard_normal(6).astype(np.float32)
    grads = [rng.standard_normal(6).astype(np.float32) for _ in range(steps)]
    p = torch.tensor(p0, requires_grad=True)
    idle = torch.zeros(3, requires_grad=True)  # never gets a gradient
    opt = PlainSGD([idle, p], lr=lr, momentum=momentum, weight_decay=weight_decay)  # the idle one first
    ref = p0.astype(np.float64)
    buf = None
    for g in grads:
        opt.zero_grad()
        assert p.grad is None
        p.grad = torch.tensor(g)
        opt.step()
        d = g.astype(np.float64) + weight_decay * ref
        if momentum:
            buf = d if buf is None else momentum * buf + d
            d = buf
        ref = ref - lr * d
    np.testing.assert_allclose(p.detach().numpy(), ref, rtol=1e-5, atol=1e-5)
    assert torch.equal(idle, torch.zeros(3)) and idle.grad is None


def test_plain_sgd_stores_floats_and_one_empty_buffer_per_parameter():
    a, b = torch.zeros(2, requires_grad=True), torch.zeros(3, requires_grad=True)
    opt = PlainSGD([a, b], lr=1, momentum=0, weight_decay=0)
    assert (opt.lr, opt.momentum, opt.weight_decay) == (1.0, 0.0, 0.0)
    assert all(type(v) is float for v in (opt.lr, opt.momentum, opt.weight_decay))
    assert opt.buffers == [None, None] and opt.params == [a, b]
    default = PlainSGD([a], lr=0.5)
    assert (default.momentum, default.weight_decay) == (0.0, 0.0)
    a.grad = torch.ones(2)
    opt.zero_grad(set_to_none=False)  # grads are always dropped, whatever is asked
    assert a.grad is None


# ------------------------------------------------------------ evaluate


def _np_loss_acc(model, images, labels):
    with torch.no_grad():
        logits = model(images).double().numpy()
    y = labels.numpy()
    shifted = logits - logits.max(axis=1, keepdims=True)
    logp = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    return float(-logp[np.arange(len(y)), y].mean()), float((logits.argmax(axis=1) == y).mean())


@pytest.mark.parametrize("batch_size", [1, 4, 23, 1000])
def test_evaluate_matches_a_numpy_oracle_in_eval_mode(batch_size):
    images, labels = _data()
    model = _net(9, dropout=0.5)
    model.eval()
    expected_loss, expected_acc = _np_loss_acc(model, images, labels)
    model.train()
    loss, acc = evaluate(model, images, labels, batch_size=batch_size)
    assert loss == pytest.approx(expected_loss, rel=1e-6) and acc == pytest.approx(expected_acc, abs=1e-12)
    assert model.training  # restored
    model.eval()
    assert evaluate(model, images, labels, batch_size) == (loss, acc)
    assert not model.training  # an eval model stays in eval mode


def test_evaluate_sums_in_float64_over_batches_of_the_default_size():
    """Per-example losses summed in float64 (a float32 sum drifts over thousands of batches),
    in batches of 1,000 unless told otherwise."""
    g = torch.Generator().manual_seed(11)
    images, labels = torch.randn(2500, 5, generator=g) * 30, torch.randint(0, 3, (2500,), generator=g)
    model = _net(12)
    sizes = []
    model.register_forward_hook(lambda mod, inp, out: sizes.append(inp[0].shape[0]))
    total = 0.0
    with torch.no_grad():  # one example at a time, as with batch_size=1 (a matmul's rounding depends on its shape)
        for i in range(2500):
            total += float(F.cross_entropy(model(images[i : i + 1]), labels[i : i + 1], reduction="sum"))
    sizes.clear()
    loss, _ = evaluate(model, images, labels)
    assert sizes == [1000, 1000, 500]
    assert loss == pytest.approx(total / 2500, rel=1e-6)
    loss1, _ = evaluate(model, images, labels, batch_size=1)
    assert len(sizes) == 3 + 2500
    assert loss1 == pytest.approx(total / 2500, rel=1e-12, abs=0)


def test_evaluate_validation_messages():
    images, labels = _data()
    model = _net()
    with pytest.raises(ValueError, match=r"^23 images but 20 labels$"):
        evaluate(model, images, labels[:20])
    with pytest.raises(ValueError, match=r"^cannot evaluate on zero examples$"):
        evaluate(model, images[:0], labels[:0])
    with pytest.raises(ValueError, match=r"^batch_size must be >= 1, got 0$"):
        evaluate(model, images, labels, batch_size=0)


# ------------------------------------------------------------ flat vectors


class _BN(nn.Module):
    def __init__(self, dtype=torch.float32):
        super().__init__()
        self.lin = nn.Linear(3, 2).to(dtype)
        self.bn = nn.BatchNorm1d(2).to(dtype)


def test_state_layout_records_each_entrys_own_dtype():
    m = _BN(torch.float64)
    layout = state_layout(m)
    assert layout.dtypes == ("float64",) * 6  # lin.weight, lin.bias, bn.weight, bn.bias, running mean/var
    assert layout.names == ("lin.weight", "lin.bias", "bn.weight", "bn.bias", "bn.running_mean", "bn.running_var")
    assert layout.shapes == ((2, 3), (2,), (2,), (2,), (2,), (2,))
    assert [k for k, _ in layout.passthrough] == ["bn.num_batches_tracked"]
    half = nn.Linear(2, 2).to(torch.float16)
    assert state_layout(half).dtypes == ("float16", "float16")


def test_models_without_floating_point_state_are_refused():
    class IntsOnly(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("count", torch.zeros(3, dtype=torch.int64))

    with pytest.raises(ValueError, match=r"^the model has no floating-point state$"):
        state_layout(IntsOnly())
    with pytest.raises(ValueError, match=r"^the model has no floating-point state$"):
        model_to_vector(IntsOnly())


def test_model_to_vector_casts_to_float32_in_state_dict_order():
    m = _BN(torch.float64)
    with torch.no_grad():
        for i, t in enumerate(m.state_dict().values()):
            if t.is_floating_point():
                t.copy_(torch.arange(t.numel(), dtype=t.dtype).reshape(t.shape) + 10 * i + 0.25)
    expected = np.concatenate(
        [v.numpy().reshape(-1) for v in m.state_dict().values() if v.is_floating_point()]
    ).astype(np.float32)
    vec = model_to_vector(m)
    assert vec.dtype == torch.float32
    np.testing.assert_array_equal(vec.numpy(), expected)


def test_vector_to_model_writes_in_order_and_reports_the_needed_length():
    m = _BN()
    vec = torch.arange(6 + 2 + 2 + 2 + 2 + 2, dtype=torch.float32)
    vector_to_model_(m, vec)
    np.testing.assert_array_equal(m.lin.weight.detach().numpy(), np.arange(6, dtype=np.float32).reshape(2, 3))
    np.testing.assert_array_equal(m.bn.running_var.numpy(), [14.0, 15.0])
    with pytest.raises(ValueError, match=r"^vector has shape \(15,\), the model needs \(16,\)$"):
        vector_to_model_(m, vec[:-1])
    with pytest.raises(ValueError, match=r"^vector must be floating point, got torch\.int64$"):
        vector_to_model_(m, vec.long())


def test_load_arrayrecord_is_strict_unless_told_otherwise():
    src = _BN()
    record = model_to_arrayrecord(src)
    assert list(record.keys()) == list(src.state_dict().keys())
    partial = ArrayRecord({k: v for k, v in src.state_dict().items() if k != "bn.running_var"})
    with pytest.raises(RuntimeError, match="running_var"):
        load_arrayrecord_(_BN(), partial)
    loose = _BN()
    assert load_arrayrecord_(loose, partial, strict=False) is loose
    assert torch.equal(loose.lin.weight, src.lin.weight)
    full = _BN()
    assert load_arrayrecord_(full, record) is full
    assert torch.equal(model_to_vector(full), model_to_vector(src))


def test_arrayrecord_to_vector_and_back_use_the_layout_given():
    m = _BN()
    layout = state_layout(m)
    vec = torch.linspace(-1, 1, 16)
    record = vector_to_arrayrecord(vec, layout)
    assert list(record.keys()) == list(m.state_dict().keys())
    np.testing.assert_array_equal(record["lin.bias"].numpy(), vec[6:8].numpy())
    assert torch.equal(arrayrecord_to_vector(record), vec)
    assert torch.equal(arrayrecord_to_vector(record, layout), vec)
    other = copy.deepcopy(m)
    other.bn.num_batches_tracked.fill_(5)
    from_model = vector_to_arrayrecord(vec, other)
    assert int(from_model["bn.num_batches_tracked"].numpy()) == 5
    with pytest.raises(ValueError):
        arrayrecord_to_vector(model_to_arrayrecord(nn.Linear(3, 2)), layout)
