"""Local SGD, evaluation and the flat-vector / ArrayRecord conversions."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flwr.app import ArrayRecord

from fl_sparse.flat import FlatLayout
from fl_sparse.tasks.data import (
    BatchStream,
    DatasetUnavailableError,
    load_dataset,
    partition_indices,
)
from fl_sparse.tasks.models import build_model
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


@pytest.fixture(scope="module")
def fmnist():
    try:
        return load_dataset("fashion-mnist")
    except DatasetUnavailableError as exc:  # pragma: no cover
        pytest.skip(f"Fashion-MNIST not available: {exc}")


@pytest.fixture(scope="module")
def client_data(fmnist):
    """One client's share of real Fashion-MNIST (2,000 examples of a 30-way IID split)."""
    train, _ = fmnist
    part = partition_indices("fashion-mnist", train.labels, "iid", 30, 4, seed=0)
    return train.images, train.labels, part


# ------------------------------------------------------------ local SGD


def test_local_sgd_reduces_loss_on_real_data(client_data, fmnist):
    images, labels, part = client_data
    test = fmnist[1]
    model = build_model("mlp-784-64-10", seed=0)
    loss0, acc0 = evaluate(model, images[part], labels[part])
    stream = BatchStream(part, 32, seed=0, partition_id=4)
    out = local_sgd(model, images, labels, stream.window(0), steps=150, lr=0.1)
    loss1, acc1 = evaluate(model, images[part], labels[part])
    # 2,000 examples / 32 = 62 full batches + one of 16 per epoch; 150 steps cross two epoch ends
    assert part.numel() == 2000
    assert out["num_steps"] == 150 and out["num_examples"] == 150 * 32 - 2 * 16
    assert loss1 < 0.6 * loss0 and acc1 > 0.7 > acc0
    assert math.isfinite(out["train_loss"]) and out["train_loss"] < loss0
    # it generalizes a bit, too
    assert evaluate(model, test.images[:2000], test.labels[:2000])[1] > 0.65


def test_local_sgd_is_plain_sgd(client_data):
    """H steps of local_sgd == a hand-written w <- w - lr * grad loop on the same batches."""
    images, labels, part = client_data
    stream = BatchStream(part, 10, seed=1, partition_id=4)
    a = build_model("mlp-784-64-10", seed=2)
    b = build_model("mlp-784-64-10", seed=2)
    local_sgd(a, images, labels, stream.window(7), steps=12, lr=0.05)
    for h in range(12):
        idx = stream(7 + h)
        loss = F.cross_entropy(b(images[idx]), labels[idx])
        grads = torch.autograd.grad(loss, list(b.parameters()))
        with torch.no_grad():
            for p, g in zip(b.parameters(), grads):
                p.add_(g, alpha=-0.05)
    torch.testing.assert_close(model_to_vector(a), model_to_vector(b), rtol=0, atol=1e-6)


def test_local_sgd_momentum_weight_decay_match_torch_sgd(client_data):
    images, labels, part = client_data
    stream = BatchStream(part, 16, seed=3, partition_id=4)
    a = build_model("cnn-fmnist", seed=5)
    b = build_model("cnn-fmnist", seed=5)
    local_sgd(a, images, labels, stream.window(0), steps=5, lr=0.02, momentum=0.9, weight_decay=5e-4)
    opt = torch.optim.SGD(b.parameters(), lr=0.02, momentum=0.9, weight_decay=5e-4)
    b.train()
    for h in range(5):
        idx = stream(h)
        opt.zero_grad()
        F.cross_entropy(b(images[idx]), labels[idx]).backward()
        opt.step()
    assert torch.equal(model_to_vector(a), model_to_vector(b))  # BN running stats included


def test_local_sgd_deterministic_with_dropout(client_data):
    images, labels, part = client_data
    stream = BatchStream(part, 8, seed=0, partition_id=4)
    vecs = []
    for _ in range(2):
        torch.manual_seed(123 + len(vecs))  # different global RNG each time
        m = build_model("cnn-mnist", seed=0)
        local_sgd(m, images, labels, stream.window(0), steps=3, lr=0.05, seed=42)
        vecs.append(model_to_vector(m))
    assert torch.equal(vecs[0], vecs[1])
    # the seed does matter (dropout masks)
    m = build_model("cnn-mnist", seed=0)
    local_sgd(m, images, labels, stream.window(0), steps=3, lr=0.05, seed=43)
    assert not torch.equal(model_to_vector(m), vecs[0])


def test_local_sgd_accepts_iterables_and_validates(client_data):
    images, labels, part = client_data
    stream = BatchStream(part, 10, seed=0, partition_id=4)
    a = build_model("logreg-784-10", seed=0)
    b = build_model("logreg-784-10", seed=0)
    ra = local_sgd(a, images, labels, stream.window(3), steps=6, lr=0.1)
    rb = local_sgd(b, images, labels, [stream(3 + h) for h in range(6)], steps=6, lr=0.1)
    assert torch.equal(model_to_vector(a), model_to_vector(b)) and ra == rb
    with pytest.raises(ValueError, match="ran out"):
        local_sgd(b, images, labels, [stream(0)], steps=2, lr=0.1)
    with pytest.raises(ValueError, match="steps"):
        local_sgd(b, images, labels, stream.window(0), steps=-1, lr=0.1)
    with pytest.raises(ValueError):
        local_sgd(b, images, labels, stream.window(0), steps=1, lr=-0.1)
    before = model_to_vector(b)
    res = local_sgd(b, images, labels, stream.window(0), steps=0, lr=0.1)
    assert res["num_examples"] == 0 and math.isnan(res["train_loss"])
    assert torch.equal(model_to_vector(b), before)


def test_evaluate_known_model():
    model = build_model("logreg-784-10")
    lin = model[1]
    with torch.no_grad():
        lin.weight.zero_()
        lin.bias.copy_(torch.log(torch.tensor([0.5] + [0.5 / 9] * 9)))
    labels = torch.tensor([0, 0, 0, 3, 7])
    images = torch.randn(5, 1, 28, 28)
    model.train()
    loss, acc = evaluate(model, images, labels, batch_size=2)
    expected = (3 * -math.log(0.5) + 2 * -math.log(0.5 / 9)) / 5
    assert acc == pytest.approx(0.6) and loss == pytest.approx(expected, rel=1e-6)
    assert model.training  # mode restored
    with pytest.raises(ValueError):
        evaluate(model, images[:0], labels[:0])


# -------------------------------------------------------- flat vectors


@pytest.mark.parametrize("name", ["mlp-784-64-10", "cnn-fmnist"])
def test_vector_round_trip(name):
    src = build_model(name, seed=1)
    dst = build_model(name, seed=2)
    params_before = [id(p) for p in dst.parameters()]
    vec = model_to_vector(src)
    assert vec.dtype == torch.float32 and vec.dim() == 1
    float_entries = [(k, v) for k, v in src.state_dict().items() if v.is_floating_point()]
    assert vec.numel() == sum(v.numel() for _, v in float_entries)
    # order: state_dict order, each entry flattened
    first_name, first = float_entries[0]
    assert torch.equal(vec[: first.numel()], first.reshape(-1))
    vector_to_model_(dst, vec)
    assert [id(p) for p in dst.parameters()] == params_before  # in place
    for (k, v), (k2, v2) in zip(src.state_dict().items(), dst.state_dict().items()):
        assert k == k2
        if v.is_floating_point():
            assert torch.equal(v, v2), k
    # the vector is a copy, not a view
    vec.zero_()
    assert not torch.equal(model_to_vector(src), vec)


def test_integer_buffers_are_excluded_and_untouched():
    m = build_model("cnn-fmnist", seed=0)
    m.layer1[1].num_batches_tracked.fill_(17)
    layout = state_layout(m)
    assert all("num_batches_tracked" not in n for n in layout.names)
    assert [n for n, _ in layout.passthrough] == ["layer1.1.num_batches_tracked", "layer2.1.num_batches_tracked"]
    vec = model_to_vector(m)
    vector_to_model_(m, vec + 1)
    assert int(m.layer1[1].num_batches_tracked) == 17
    torch.testing.assert_close(m.layer1[1].running_var, torch.full((16,), 2.0))


def test_state_layout_is_the_layout_of_the_models_record_keys_in_state_dict_order():
    """As its docstring says: equal to FlatLayout.from_state_dict, so a record made from it lists the
    integer buffers where the state_dict has them, not after the float arrays."""
    m = build_model("cnn-fmnist", seed=0)
    assert state_layout(m) == FlatLayout.from_state_dict(m.state_dict())
    record = vector_to_arrayrecord(model_to_vector(m), state_layout(m))
    assert list(record.keys()) == list(m.state_dict().keys())


def test_vector_length_validation():
    m = build_model("mlp-784-64-10", seed=0)
    vec = model_to_vector(m)
    with pytest.raises(ValueError, match="50890"):
        vector_to_model_(m, vec[:-1])
    with pytest.raises(ValueError):
        vector_to_model_(m, vec.view(2, -1))
    with pytest.raises(ValueError, match="floating"):
        vector_to_model_(m, vec.long())


def test_arrayrecord_conversions_match_model_vector():
    m = build_model("cnn-fmnist", seed=4)
    with torch.no_grad():  # non-trivial BN statistics
        m.layer2[1].running_mean.uniform_()
    vec = model_to_vector(m)
    record = model_to_arrayrecord(m)
    assert isinstance(record, ArrayRecord) and list(record.keys()) == list(m.state_dict().keys())
    assert torch.equal(arrayrecord_to_vector(record), vec)
    assert torch.equal(arrayrecord_to_vector(ArrayRecord(m.state_dict())), vec)
    # the shared FlatLayout agrees with the model-derived one
    from_record = FlatLayout.from_arrayrecord(record)
    layout = state_layout(m)
    assert (from_record.names, from_record.shapes, from_record.dtypes) == (
        layout.names, layout.shapes, layout.dtypes)
    assert torch.equal(arrayrecord_to_vector(record, layout), vec)

    # vector -> record -> fresh model
    new = vec * 0.5 - 1
    rec2 = vector_to_arrayrecord(new, m)
    other = build_model("cnn-fmnist", seed=9)
    load_arrayrecord_(other, rec2)
    assert torch.equal(model_to_vector(other), new)
    assert int(other.layer1[1].num_batches_tracked) == 0
    # also via to_torch_state_dict directly, as a Flower client would
    third = build_model("cnn-fmnist", seed=10)
    third.load_state_dict(rec2.to_torch_state_dict())
    assert torch.equal(model_to_vector(third), new)
    with pytest.raises(ValueError):
        vector_to_arrayrecord(new[:-3], layout)
    # a record for another architecture is rejected when a layout is given
    with pytest.raises(ValueError):
        arrayrecord_to_vector(model_to_arrayrecord(build_model("mlp-784-64-10")), layout)


def test_arrayrecord_round_trip_float_exact():
    m = build_model("resnet18", in_channels=1, image_size=28, seed=0)
    vec = model_to_vector(m)
    record = vector_to_arrayrecord(vec, state_layout(m))
    back = arrayrecord_to_vector(record)
    assert torch.equal(back, vec)
    assert np.array_equal(record["conv1.weight"].numpy(), m.conv1.weight.detach().numpy())


# ------------------------------------------------------------ PlainSGD == torch.optim.SGD
@pytest.mark.parametrize("momentum,weight_decay", [(0.0, 0.0), (0.9, 0.0), (0.0, 5e-4), (0.9, 5e-4)])
def test_plain_sgd_equals_torch_optim_sgd_bit_for_bit(momentum, weight_decay):
    """Five steps of a small MLP (one parameter without a gradient) under both optimizers."""
    torch.manual_seed(3)
    ours = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3))
    frozen = torch.nn.Parameter(torch.randn(4))  # no gradient: both leave it alone
    theirs = copy.deepcopy(ours)
    frozen_theirs = torch.nn.Parameter(frozen.detach().clone())
    plain = PlainSGD([*ours.parameters(), frozen], lr=0.1, momentum=momentum, weight_decay=weight_decay)
    reference = torch.optim.SGD(
        [*theirs.parameters(), frozen_theirs], lr=0.1, momentum=momentum, weight_decay=weight_decay, foreach=False
    )
    for step in range(5):
        x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
        for model, opt in ((ours, plain), (theirs, reference)):
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
            opt.step()
        for a, b in zip(ours.parameters(), theirs.parameters()):
            assert torch.equal(a, b), step
    assert torch.equal(frozen, frozen_theirs)
