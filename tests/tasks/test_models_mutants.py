"""The built-in models (fl_sparse/tasks/models.py) layer by layer, against the architectures written
out by hand from the module docstring and the papers' descriptions, plus the argument checks.

Written to kill the survivors of a mutation run over models.py (docs/testing.md, "Scored
2026-11-27: fl_sparse/tasks/models.py and fl_sparse/tasks/builtin.py"). Small inputs and odd sizes
on purpose: a layer built from the wrong size or with the wrong padding shows in a state_dict
shape or in a forward pass compared with torch.nn.functional. ResNet-18 and VGG-19 are built
once each (module fixtures); VGG-19's own code is also run on a two-block stand-in config.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fl_sparse.tasks import models
from fl_sparse.tasks.models import build_model, count_parameters


def _shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _kaiming_fan_out_std(weight: torch.Tensor) -> float:
    """kaiming_normal_(mode="fan_out", nonlinearity="relu"): std = sqrt(2 / (out_channels * kh * kw))."""
    return math.sqrt(2.0 / (weight.shape[0] * weight.shape[2] * weight.shape[3]))


# ------------------------------------------------------------ count_parameters


def test_count_parameters_counts_trainable_ones_unless_told_otherwise():
    m = nn.Linear(3, 2)  # 6 weights, 2 biases
    m.bias.requires_grad_(False)
    assert count_parameters(m) == 6
    assert count_parameters(m, trainable_only=True) == 6
    assert count_parameters(m, trainable_only=False) == 8
    m.weight.requires_grad_(False)
    assert count_parameters(m) == 0


# ------------------------------------------------------------ build_model's arguments


@pytest.mark.parametrize("arg", ["num_classes", "in_channels", "image_size"])
@pytest.mark.parametrize("value", [0, -1, True, False, 2.0, "3", None])
def test_a_bad_size_argument_is_named(arg, value):
    with pytest.raises(ValueError) as info:
        build_model("cnn-fmnist", **{arg: value})
    assert str(info.value) == f"{arg} must be a positive integer, got {value!r}"


def test_size_arguments_are_checked_in_order_and_before_the_name():
    with pytest.raises(ValueError, match=r"^num_classes must be"):
        build_model("cnn-fmnist", num_classes=0, in_channels=0, image_size=0)
    with pytest.raises(ValueError, match=r"^in_channels must be"):
        build_model("cnn-fmnist", in_channels=0, image_size=0)
    with pytest.raises(ValueError, match=r"^image_size must be"):
        build_model("no-such-model", image_size=0)


def test_one_is_a_positive_integer():
    m = build_model("cnn-fmnist", num_classes=1, in_channels=1, seed=0)
    assert m.fc.out_features == 1 and m.layer1[0].in_channels == 1
    # image_size=1 passes the positivity check and meets the model's own bound instead
    with pytest.raises(ValueError, match=r"^cnn-fmnist needs image_size >= 4, got 1$"):
        build_model("cnn-fmnist", image_size=1)


def test_an_unknown_name_lists_the_known_ones():
    with pytest.raises(ValueError) as info:
        build_model("resnet50")
    assert str(info.value) == (
        "unknown model 'resnet50'; expected one of ['logreg-784-10', 'mlp-784-64-10', "
        "'mlp-784-256-128-64-10', 'cnn-mnist', 'cnn-fmnist', 'resnet18', 'vgg19']"
    )


def test_without_seed_the_global_rng_draws_the_initialization():
    torch.manual_seed(5)
    a = build_model("mlp-784-64-10")
    after = torch.random.get_rng_state()
    b = build_model("mlp-784-64-10", seed=5)  # the same draws, from a private copy seeded alike
    for (k, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), k
    torch.manual_seed(5)
    assert not torch.equal(torch.random.get_rng_state(), after)  # the unseeded build advanced it


def test_seed_zero_is_a_seed():
    torch.manual_seed(123)
    a = build_model("logreg-784-10", seed=0)
    torch.manual_seed(0)
    b = build_model("logreg-784-10")
    assert torch.equal(a[1].weight, b[1].weight)


# ------------------------------------------------------------ the input-shape check


def test_the_shape_check_says_what_it_expected_and_what_it_got():
    model = build_model("cnn-fmnist", in_channels=2, image_size=8, seed=0)
    assert model.input_shape == (2, 8, 8)
    for bad in ((1, 2, 8, 9), (1, 1, 8, 8), (2, 8, 8), (1, 1, 2, 8, 8)):
        with pytest.raises(ValueError) as info:
            model(torch.zeros(bad))
        assert str(info.value) == (
            f"model 'cnn-fmnist' was built for inputs of shape N x 2 x 8 x 8, got {bad}; "
            "pass build_model(..., in_channels=, image_size=) matching the dataset"
        )
    model.eval()
    for n in (1, 3):
        assert model(torch.zeros(n, 2, 8, 8)).shape == (n, 10)


def test_the_shape_check_names_each_model():
    for name in ("logreg-784-10", "cnn-mnist"):
        with pytest.raises(ValueError, match=rf"^model '{name}' was built for inputs of shape N x 1 x 28 x 28, got \(1, 1, 28, 27\)"):
            build_model(name, seed=0)(torch.zeros(1, 1, 28, 27))


# ------------------------------------------------------------ the MLPs


MLP_LAYERS = {
    "logreg-784-10": [("Flatten",), ("Linear", 784, 10)],
    "mlp-784-64-10": [("Flatten",), ("Linear", 784, 64), ("ReLU",), ("Linear", 64, 10)],
    "mlp-784-256-128-64-10": [
        ("Flatten",), ("Linear", 784, 256), ("ReLU",), ("Linear", 256, 128), ("ReLU",),
        ("Linear", 128, 64), ("ReLU",), ("Linear", 64, 10),
    ],
}


@pytest.mark.parametrize("name", list(MLP_LAYERS))
def test_mlp_layers_and_forward(name):
    model = build_model(name, seed=0)
    layers = [
        (type(m).__name__, m.in_features, m.out_features) if isinstance(m, nn.Linear) else (type(m).__name__,)
        for m in model
    ]
    assert layers == MLP_LAYERS[name]
    x = torch.randn(3, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    h = x.reshape(3, 784)
    linears = [m for m in model if isinstance(m, nn.Linear)]
    for i, lin in enumerate(linears):
        h = h @ lin.weight.T + lin.bias
        if i < len(linears) - 1:
            h = h.clamp_min(0)
    torch.testing.assert_close(model(x), h)


@pytest.mark.parametrize("name", list(MLP_LAYERS))
def test_an_mlp_refuses_other_inputs_and_class_counts(name):
    with pytest.raises(ValueError) as info:
        build_model(name, num_classes=9)
    assert str(info.value) == (
        f"model {name!r} takes 784 input features (1x28x28) and has 10 classes; got 1x28x28 = "
        "784 features and num_classes=9. Use a CNN, 'resnet18' or 'vgg19' for other inputs."
    )
    with pytest.raises(ValueError) as info:
        build_model(name, in_channels=3, image_size=16)
    assert "got 3x16x16 = 768 features and num_classes=10." in str(info.value)
    with pytest.raises(ValueError, match="got 1x29x29 = 841 features"):
        build_model(name, image_size=29)


# ------------------------------------------------------------ cnn-mnist (Keras mnist_cnn)


def test_cnn_mnist_layers_from_the_keras_description():
    # conv32 3x3, conv64 3x3, maxpool 2, dropout .25, fc128, dropout .5, fc(classes); 2 channels, 11x11, 7 classes:
    # 11 -> 9 -> 7 (valid 3x3 convolutions) -> 3 (2x2 pool, floor)
    model = build_model("cnn-mnist", in_channels=2, image_size=11, num_classes=7, seed=0)
    assert _shapes(model) == {
        "features.0.weight": (32, 2, 3, 3), "features.0.bias": (32,),
        "features.2.weight": (64, 32, 3, 3), "features.2.bias": (64,),
        "classifier.1.weight": (128, 64 * 3 * 3), "classifier.1.bias": (128,),
        "classifier.4.weight": (7, 128), "classifier.4.bias": (7,),
    }
    assert count_parameters(model) == (2 * 9 * 32 + 32) + (32 * 9 * 64 + 64) + (576 * 128 + 128) + (128 * 7 + 7)
    f, c = model.features, model.classifier
    assert [type(m).__name__ for m in f] == ["Conv2d", "ReLU", "Conv2d", "ReLU", "MaxPool2d", "Dropout"]
    assert [type(m).__name__ for m in c] == ["Flatten", "Linear", "ReLU", "Dropout", "Linear"]
    for conv in (f[0], f[2]):
        assert (conv.kernel_size, conv.stride, conv.padding) == ((3, 3), (1, 1), (0, 0))
    assert (f[4].kernel_size, f[4].stride) == (2, 2)
    assert f[5].p == 0.25 and c[3].p == 0.5

    model.eval()  # dropout off: the forward pass is the layers above, in order
    x = torch.randn(2, 2, 11, 11, generator=torch.Generator().manual_seed(1))
    h = F.relu(F.conv2d(x, f[0].weight, f[0].bias))
    h = F.max_pool2d(F.relu(F.conv2d(h, f[2].weight, f[2].bias)), 2)
    h = F.relu(F.linear(h.flatten(1), c[1].weight, c[1].bias))
    torch.testing.assert_close(model(x), F.linear(h, c[4].weight, c[4].bias))


def test_cnn_mnist_smallest_input():
    model = build_model("cnn-mnist", image_size=6, seed=0).eval()  # 6 -> 4 -> 2 -> 1
    assert model.classifier[1].in_features == 64
    assert model(torch.zeros(1, 1, 6, 6)).shape == (1, 10)
    with pytest.raises(ValueError) as info:
        build_model("cnn-mnist", image_size=5)
    assert str(info.value) == "cnn-mnist needs image_size >= 6, got 5"


# ------------------------------------------------------------ cnn-fmnist (CNNFashion_Mnist)


def test_cnn_fmnist_layers_from_the_description():
    # [conv 5x5 pad 2, BN, ReLU, maxpool 2] x 2 with 16 and 32 channels, then one linear layer;
    # 2 channels, 13x13 (-> 6 -> 3, floor), 7 classes
    model = build_model("cnn-fmnist", in_channels=2, image_size=13, num_classes=7, seed=0)
    bn = lambda p, c: {f"{p}.weight": (c,), f"{p}.bias": (c,), f"{p}.running_mean": (c,),  # noqa: E731
                       f"{p}.running_var": (c,), f"{p}.num_batches_tracked": ()}
    assert _shapes(model) == {
        "layer1.0.weight": (16, 2, 5, 5), "layer1.0.bias": (16,), **bn("layer1.1", 16),
        "layer2.0.weight": (32, 16, 5, 5), "layer2.0.bias": (32,), **bn("layer2.1", 32),
        "fc.weight": (7, 32 * 3 * 3), "fc.bias": (7,),
    }
    for block in (model.layer1, model.layer2):
        assert [type(m).__name__ for m in block] == ["Conv2d", "BatchNorm2d", "ReLU", "MaxPool2d"]
        conv, pool = block[0], block[3]
        assert (conv.kernel_size, conv.stride, conv.padding) == ((5, 5), (1, 1), (2, 2))
        assert (pool.kernel_size, pool.stride) == (2, 2)

    g = torch.Generator().manual_seed(2)
    with torch.no_grad():  # running statistics other than (0, 1), so that eval mode uses them visibly
        for block in (model.layer1, model.layer2):
            block[1].running_mean.copy_(torch.randn(block[1].num_features, generator=g))
            block[1].running_var.copy_(torch.rand(block[1].num_features, generator=g) + 0.5)
    model.eval()
    x = torch.randn(2, 2, 13, 13, generator=g)
    h = x
    for block in (model.layer1, model.layer2):
        conv, norm = block[0], block[1]
        h = F.conv2d(h, conv.weight, conv.bias, padding=2)
        h = F.batch_norm(h, norm.running_mean, norm.running_var, norm.weight, norm.bias, False, 0.0, norm.eps)
        h = F.max_pool2d(F.relu(h), 2)
    torch.testing.assert_close(model(x), F.linear(h.flatten(1), model.fc.weight, model.fc.bias))


def test_cnn_fmnist_smallest_input():
    model = build_model("cnn-fmnist", image_size=4, seed=0).eval()  # 4 -> 2 -> 1
    assert model.fc.in_features == 32
    assert model(torch.zeros(1, 1, 4, 4)).shape == (1, 10)
    with pytest.raises(ValueError) as info:
        build_model("cnn-fmnist", image_size=3)
    assert str(info.value) == "cnn-fmnist needs image_size >= 4, got 3"


# ------------------------------------------------------------ resnet18 (CIFAR stem)


@pytest.fixture(scope="module")
def resnet():
    return build_model("resnet18", in_channels=2, image_size=9, num_classes=7, seed=0)


def test_resnet18_cifar_stem(resnet):
    stem = resnet.conv1
    assert (stem.in_channels, stem.out_channels) == (2, 64)
    assert (stem.kernel_size, stem.stride, stem.padding) == ((3, 3), (1, 1), (1, 1))
    assert stem.bias is None
    assert isinstance(resnet.maxpool, nn.Identity)
    assert (resnet.fc.in_features, resnet.fc.out_features) == (512, 7)
    # the paper count (3 input channels, 10 classes) with this stem and this head instead
    assert count_parameters(resnet) == 11_173_962 - 64 * 3 * 9 + 64 * 2 * 9 - (512 * 10 + 10) + (512 * 7 + 7)


def test_resnet18_stem_keeps_torchvisions_fan_out_init(resnet):
    w = resnet.conv1.weight
    assert abs(w.mean().item()) < 0.01
    assert w.std().item() == pytest.approx(_kaiming_fan_out_std(w), rel=0.1)  # 0.059; fan_in would be 0.33


def test_resnet18_smallest_input(resnet):
    resnet.eval()
    assert resnet(torch.zeros(2, 2, 9, 9)).shape == (2, 7)
    resnet.train()  # a batch of one trains: layer 4 runs on 2x2 maps, so BatchNorm sees 4 values per channel
    resnet(torch.randn(1, 2, 9, 9)).sum().backward()
    resnet.zero_grad()
    with pytest.raises(ValueError) as info:  # at 8 layer 4 runs on 1x1 maps, and BatchNorm refuses a batch of one
        build_model("resnet18", image_size=8)
    assert str(info.value) == "resnet18 needs image_size >= 9, got 8"


# ------------------------------------------------------------ vgg19


# VGG-19 (configuration "E" of Simonyan & Zisserman): conv channels, "M" a 2x2 max-pool
VGG19_E = [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512, "M"]


@pytest.fixture(scope="module")
def vgg():
    return build_model("vgg19", in_channels=1, image_size=17, num_classes=7, seed=0)


def _check_vgg_layers(model: nn.Module, in_channels: int, config: list) -> None:
    layers, channels, expected = list(model.features), in_channels, []
    for v in config:
        if v == "M":
            expected.append(("MaxPool2d", 2, 2, 0, True))
        else:
            expected += [("Conv2d", channels, v, (3, 3), (1, 1), (1, 1), True), ("BatchNorm2d", v), ("ReLU",)]
            channels = v
    got = []
    for m in layers:
        if isinstance(m, nn.Conv2d):
            got.append(("Conv2d", m.in_channels, m.out_channels, m.kernel_size, m.stride, m.padding, m.bias is not None))
        elif isinstance(m, nn.BatchNorm2d):
            got.append(("BatchNorm2d", m.num_features))
        elif isinstance(m, nn.MaxPool2d):
            got.append(("MaxPool2d", m.kernel_size, m.stride, m.padding, m.ceil_mode))
        else:
            got.append((type(m).__name__,))
    assert got == expected
    assert isinstance(model.pool, nn.AdaptiveAvgPool2d) and model.pool.output_size == 1


def _check_vgg_init(model: nn.Module) -> None:
    """torchvision's VGG init: kaiming (fan_out) convs with zero biases, BN (1, 0), N(0, 0.01) linear, zero bias."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            assert m.weight.std().item() == pytest.approx(_kaiming_fan_out_std(m.weight), rel=0.1)
            assert torch.count_nonzero(m.bias) == 0
        elif isinstance(m, nn.BatchNorm2d):
            assert torch.all(m.weight == 1) and torch.count_nonzero(m.bias) == 0
        elif isinstance(m, nn.Linear):
            assert m.weight.std().item() == pytest.approx(0.01, rel=0.1) and abs(m.weight.mean().item()) < 0.002
            assert torch.count_nonzero(m.bias) == 0


def test_vgg19_layers_and_init(vgg):
    _check_vgg_layers(vgg, 1, VGG19_E)
    assert (vgg.classifier.in_features, vgg.classifier.out_features) == (512, 7)
    _check_vgg_init(vgg)


def test_vgg19_smallest_input_reaches_a_1x1_map_and_trains_a_batch_of_one(vgg):
    # ceil-mode pools: 17 -> 9 -> 5 -> 3 -> 2 -> 1 (floor pools would reach 0)
    vgg.train()
    x = torch.randn(1, 1, 17, 17, generator=torch.Generator().manual_seed(3))
    features = vgg.features(x)
    assert features.shape == (1, 512, 1, 1)
    vgg.eval()
    with torch.no_grad():
        features = vgg.features(x)
        out = vgg(x)
    torch.testing.assert_close(out, F.linear(features.flatten(1), vgg.classifier.weight, vgg.classifier.bias))
    with pytest.raises(ValueError) as info:
        build_model("vgg19", image_size=16)
    assert str(info.value) == "vgg19 needs image_size >= 17, got 16"


SMALL_CONFIG = [8, "M", 512, "M"]


@pytest.fixture
def small_vgg_config(monkeypatch):
    """VGG19's own code (first-conv swap, pools, init, head) on a two-block stand-in for configuration "E"."""
    from torchvision.models import vgg as tv_vgg

    monkeypatch.setitem(tv_vgg.cfgs, "E", SMALL_CONFIG)


@pytest.mark.parametrize("in_channels", [1, 3, 4])
def test_vgg19_code_on_a_small_config(small_vgg_config, in_channels):
    torch.manual_seed(0)
    model = models.VGG19(in_channels, 9, 5)
    _check_vgg_layers(model, in_channels, SMALL_CONFIG)
    assert (model.classifier.in_features, model.classifier.out_features) == (512, 5)
    _check_vgg_init(model)
    # ceil-mode pools: 9 -> 5 -> 3, then the average over the 3x3 map
    model.eval()
    x = torch.randn(2, in_channels, 9, 9, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        features = model.features(x)
        out = model(x)
    assert features.shape == (2, 512, 3, 3)
    torch.testing.assert_close(out, F.linear(features.mean((2, 3)), model.classifier.weight, model.classifier.bias))
