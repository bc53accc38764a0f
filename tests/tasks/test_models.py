"""The seed papers' models: exact parameter counts, seeded init, input shapes."""

from __future__ import annotations

import pickle

import pytest
import torch

from fl_sparse.tasks.models import (
    MODEL_NAMES,
    PAPER_PARAM_COUNTS,
    build_model,
    count_parameters,
)
from fl_sparse.tasks.training import model_to_vector

# (in_channels, image_size) of each model's paper configuration
PAPER_INPUT = {
    "logreg-784-10": (1, 28),
    "mlp-784-64-10": (1, 28),
    "mlp-784-256-128-64-10": (1, 28),
    "cnn-mnist": (1, 28),
    "cnn-fmnist": (1, 28),
    "resnet18": (3, 32),
    "vgg19": (3, 32),
}

EXPECTED = {
    "logreg-784-10": 7_850,
    "mlp-784-64-10": 50_890,
    "mlp-784-256-128-64-10": 242_762,
    "cnn-mnist": 1_199_882,
    "cnn-fmnist": 29_034,
    "resnet18": 11_173_962,
    "vgg19": 20_040_522,
}


def test_registry_is_complete():
    assert set(MODEL_NAMES) == set(EXPECTED) == set(PAPER_PARAM_COUNTS) == set(PAPER_INPUT)
    assert PAPER_PARAM_COUNTS == EXPECTED


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_exact_parameter_counts_and_forward(name):
    c, s = PAPER_INPUT[name]
    model = build_model(name, in_channels=c, image_size=s, seed=0)
    assert count_parameters(model) == EXPECTED[name]
    assert count_parameters(model, trainable_only=False) == EXPECTED[name]
    model.eval()
    with torch.no_grad():
        out = model(torch.randn(2, c, s, s))
    assert out.shape == (2, 10)
    assert model.input_shape == (c, s, s)


def test_architecture_details():
    # cnn-fmnist: 2 conv + 2 BN + 2 max-pool + 1 linear; float vector adds the BN running stats
    m = build_model("cnn-fmnist", seed=0)
    kinds = [type(x).__name__ for x in m.modules()]
    assert kinds.count("Conv2d") == 2 and kinds.count("MaxPool2d") == 2
    assert kinds.count("BatchNorm2d") == 2 and kinds.count("Linear") == 1
    assert model_to_vector(m).numel() == 29_034 + 2 * (16 + 32)
    # cnn-mnist: 2 conv + 1 max-pool, dropout, fc128
    m = build_model("cnn-mnist", seed=0)
    kinds = [type(x).__name__ for x in m.modules()]
    assert kinds.count("Conv2d") == 2 and kinds.count("MaxPool2d") == 1 and kinds.count("Dropout") == 2
    # resnet18: CIFAR stem
    r = build_model("resnet18", in_channels=3, image_size=32, seed=0)
    assert r.conv1.kernel_size == (3, 3) and r.conv1.stride == (1, 1)
    assert isinstance(r.maxpool, torch.nn.Identity)
    # vgg19: 16 conv layers with BN and one Linear(512, 10)
    v = build_model("vgg19", in_channels=3, image_size=32, seed=0)
    kinds = [type(x).__name__ for x in v.modules()]
    assert kinds.count("Conv2d") == 16 and kinds.count("BatchNorm2d") == 16
    assert [(l.in_features, l.out_features) for l in v.modules() if isinstance(l, torch.nn.Linear)] == [(512, 10)]


@pytest.mark.parametrize("name", ["cnn-mnist", "cnn-fmnist", "resnet18", "vgg19"])
def test_cnns_adapt_to_other_inputs(name):
    for c, s in ((1, 28), (3, 32)):
        model = build_model(name, in_channels=c, image_size=s, seed=1).eval()
        with torch.no_grad():
            assert model(torch.randn(3, c, s, s)).shape == (3, 10)
    # only the stem changes for grayscale input
    if name == "resnet18":
        gray = build_model(name, in_channels=1, image_size=28)
        assert count_parameters(gray) == 11_173_962 - 2 * 64 * 3 * 3
    if name == "vgg19":
        gray = build_model(name, in_channels=1, image_size=28)
        assert count_parameters(gray) == 20_040_522 - 2 * 64 * 3 * 3


def test_num_classes():
    assert build_model("cnn-fmnist", num_classes=100).fc.out_features == 100
    assert build_model("resnet18", in_channels=3, image_size=32, num_classes=100).fc.out_features == 100


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_seeded_init_is_reproducible(name):
    c, s = PAPER_INPUT[name]
    before = torch.random.get_rng_state()
    a = model_to_vector(build_model(name, in_channels=c, image_size=s, seed=7))
    b = model_to_vector(build_model(name, in_channels=c, image_size=s, seed=7))
    d = model_to_vector(build_model(name, in_channels=c, image_size=s, seed=8))
    assert torch.equal(a, b)
    assert not torch.equal(a, d)
    # seeded construction leaves the global RNG untouched
    assert torch.equal(torch.random.get_rng_state(), before)


def test_shape_mismatches_are_clear():
    with pytest.raises(ValueError, match="784 input features"):
        build_model("mlp-784-64-10", in_channels=3, image_size=32)
    with pytest.raises(ValueError, match="num_classes"):
        build_model("mlp-784-256-128-64-10", num_classes=100)
    model = build_model("resnet18", in_channels=3, image_size=32)
    with pytest.raises(ValueError, match=r"N x 3 x 32 x 32"):
        model(torch.randn(2, 1, 28, 28))
    mlp = build_model("mlp-784-64-10")
    with pytest.raises(ValueError, match=r"N x 1 x 28 x 28"):
        mlp(torch.randn(2, 784))
    with pytest.raises(ValueError, match="unknown model"):
        build_model("resnet50")
    with pytest.raises(ValueError, match="image_size"):
        build_model("cnn-fmnist", image_size=0)
    with pytest.raises(ValueError, match="vgg19 needs"):
        build_model("vgg19", image_size=8)


def test_models_pickle():
    # Ray ships models between processes: the shape-check hook must pickle
    model = build_model("cnn-fmnist", seed=3)
    clone = pickle.loads(pickle.dumps(model))
    assert torch.equal(model_to_vector(clone), model_to_vector(model))
    with pytest.raises(ValueError, match="N x 1 x 28 x 28"):
        clone(torch.randn(1, 3, 32, 32))
