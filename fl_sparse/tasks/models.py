"""The models of the seed papers' experiments, by name.

==========================  ===========  ====================================================
name                        parameters   source
==========================  ===========  ====================================================
``logreg-784-10``                 7,850  softmax regression; closest to AdapTop-K's MNIST
                                         "fully-connected network" (its Table I says d = 785,
                                         which no 10-class model on 784 pixels has)
``mlp-784-64-10``                50,890  bidirectional top-K, MNIST MLP
``mlp-784-256-128-64-10``       242,762  bidirectional top-K, Fashion-MNIST MLP
``cnn-mnist``                 1,199,882  bidirectional top-K, MNIST CNN (Keras ``mnist_cnn``:
                                         conv32 3x3, conv64 3x3, maxpool 2, dropout .25,
                                         fc128, dropout .5, fc10)
``cnn-fmnist``                   29,034  bidirectional top-K, Fashion-MNIST CNN (the
                                         ``CNNFashion_Mnist`` of Federated-Learning-PyTorch:
                                         [conv 5x5 pad 2, BN, ReLU, maxpool 2] x 2 with 16 and
                                         32 channels, fc 1568 -> 10)
``resnet18``                 11,173,962  rTop-k, hard threshold, SSGD-MV, AdapTop-K: CIFAR
                                         ResNet-18 (3x3 stride-1 stem, no max-pool)
``vgg19``                    20,040,522  bidirectional top-K, CIFAR VGG-19 with BatchNorm
                                         (torchvision ``vgg19_bn`` features + Linear(512, 10))
==========================  ===========  ====================================================

Counts are trainable parameters for the paper's input (1x28x28 for the MNIST
models, 3x32x32 for ResNet-18 / VGG-19) and 10 classes. The CNNs adapt to
``in_channels`` / ``image_size`` (ResNet-18 and VGG-19 also run on 1x28x28
Fashion-MNIST); the MLPs' names fix their shape, so other inputs are
rejected. Every model checks the shape of its input batch and says what it
expected. BatchNorm running statistics are float buffers (part of the flat
model vector); ``num_batches_tracked`` is an integer buffer (not part of it).
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["MODEL_NAMES", "PAPER_PARAM_COUNTS", "build_model", "count_parameters"]

MODEL_NAMES: tuple[str, ...] = (
    "logreg-784-10",
    "mlp-784-64-10",
    "mlp-784-256-128-64-10",
    "cnn-mnist",
    "cnn-fmnist",
    "resnet18",
    "vgg19",
)

# Trainable parameters for the paper configuration (see the module docstring).
PAPER_PARAM_COUNTS: dict[str, int] = {
    "logreg-784-10": 7_850,
    "mlp-784-64-10": 50_890,
    "mlp-784-256-128-64-10": 242_762,
    "cnn-mnist": 1_199_882,
    "cnn-fmnist": 29_034,
    "resnet18": 11_173_962,
    "vgg19": 20_040_522,
}

_MLP_WIDTHS = {
    "logreg-784-10": (784, 10),
    "mlp-784-64-10": (784, 64, 10),
    "mlp-784-256-128-64-10": (784, 256, 128, 64, 10),
}


def count_parameters(model: nn.Module, *, trainable_only: bool = True) -> int:
    """Number of (trainable) parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


class _InputShapeCheck:
    """Forward pre-hook: a clear error when a batch is not N x C x H x W as built.

    A module-level class (not a closure) so the model stays picklable.
    """

    def __init__(self, name: str, shape: tuple[int, int, int]) -> None:
        self.name = name
        self.shape = shape

    def __call__(self, module: nn.Module, args: tuple) -> None:
        x = args[0]
        if x.dim() != 4 or tuple(x.shape[1:]) != self.shape:
            c, h, w = self.shape
            raise ValueError(
                f"model {self.name!r} was built for inputs of shape N x {c} x {h} x {w}, "
                f"got {tuple(x.shape)}; pass build_model(..., in_channels=, image_size=) "
                f"matching the dataset"
            )


def _mlp(widths: tuple[int, ...]) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Flatten()]
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(widths) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class CNNMnist(nn.Module):
    """Keras ``mnist_cnn`` (1,199,882 parameters on 1x28x28, 10 classes)."""

    def __init__(self, in_channels: int, image_size: int, num_classes: int) -> None:
        super().__init__()
        side = (image_size - 4) // 2
        if side < 1:
            raise ValueError(f"cnn-mnist needs image_size >= 6, got {image_size}")
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 32, 3),
            nn.ReLU(),
            nn.Conv2d(32, 64, 3),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Dropout(0.25),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(64 * side * side, 128),
            nn.ReLU(),
            nn.Dropout(0.5),
            nn.Linear(128, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class CNNFashionMnist(nn.Module):
    """Two [conv 5x5 pad 2, BN, ReLU, maxpool 2] blocks + one linear layer (29,034 params)."""

    def __init__(self, in_channels: int, image_size: int, num_classes: int) -> None:
        super().__init__()
        side = image_size // 4
        if side < 1:
            raise ValueError(f"cnn-fmnist needs image_size >= 4, got {image_size}")
        self.layer1 = nn.Sequential(
            nn.Conv2d(in_channels, 16, kernel_size=5, padding=2),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.layer2 = nn.Sequential(
            nn.Conv2d(16, 32, kernel_size=5, padding=2),
            nn.BatchNorm2d(32),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.fc = nn.Linear(32 * side * side, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.layer2(self.layer1(x)), 1))


def _resnet18(in_channels: int, image_size: int, num_classes: int) -> nn.Module:
    from torchvision.models import resnet18

    if image_size < 9:  # layer 4 on 2x2 maps at least: on 1x1 maps BatchNorm cannot train on a batch of one
        raise ValueError(f"resnet18 needs image_size >= 9, got {image_size}")
    model = resnet18(weights=None, num_classes=num_classes)
    # CIFAR stem: 3x3 stride-1 convolution and no max-pool (He et al., Sec. 4.2).
    model.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()
    # torchvision initializes conv weights with kaiming_normal_(fan_out); keep that for the new stem.
    nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
    return model


class VGG19(nn.Module):
    """CIFAR VGG-19 with BatchNorm: torchvision ``vgg19_bn`` features + ``Linear(512, classes)``.

    The max-pools use ``ceil_mode=True`` (identical on 32x32, where every map
    is even) so 28x28 inputs reach a 1x1 map too; the adaptive average pool is
    then a no-op, like the ``AvgPool2d(1)`` of the usual CIFAR implementation.
    """

    def __init__(self, in_channels: int, image_size: int, num_classes: int) -> None:
        super().__init__()
        try:  # torchvision's own layer config "E" (VGG-19) and builder, without the
            # 120M-parameter ImageNet classifier that vgg19_bn() would allocate.
            from torchvision.models.vgg import cfgs, make_layers

            features = make_layers(cfgs["E"], batch_norm=True)
        except ImportError:  # pragma: no cover - older/newer torchvision layouts
            from torchvision.models import vgg19_bn

            features = vgg19_bn(weights=None).features
        if in_channels != 3:
            first = features[0]
            features[0] = nn.Conv2d(in_channels, first.out_channels, kernel_size=3, padding=1)
        for i, layer in enumerate(features):
            if isinstance(layer, nn.MaxPool2d):
                features[i] = nn.MaxPool2d(kernel_size=2, stride=2, ceil_mode=True)
        self.features = features
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(512, num_classes)
        # torchvision's VGG init: kaiming conv weights, zero biases, BN (1, 0), N(0, 0.01) linear.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


def _build(name: str, in_channels: int, image_size: int, num_classes: int) -> nn.Module:
    if name in _MLP_WIDTHS:
        widths = _MLP_WIDTHS[name]
        features = in_channels * image_size * image_size
        if features != widths[0] or num_classes != widths[-1]:
            raise ValueError(
                f"model {name!r} takes {widths[0]} input features (1x28x28) and has "
                f"{widths[-1]} classes; got {in_channels}x{image_size}x{image_size} = "
                f"{features} features and num_classes={num_classes}. Use a CNN, "
                f"'resnet18' or 'vgg19' for other inputs."
            )
        return _mlp(widths)
    if name == "cnn-mnist":
        return CNNMnist(in_channels, image_size, num_classes)
    if name == "cnn-fmnist":
        return CNNFashionMnist(in_channels, image_size, num_classes)
    if name == "resnet18":
        return _resnet18(in_channels, image_size, num_classes)
    if name == "vgg19":
        if image_size < 17:  # the last block on 2x2 maps at least (four ceil-mode pools): as resnet18's bound
            raise ValueError(f"vgg19 needs image_size >= 17, got {image_size}")
        return VGG19(in_channels, image_size, num_classes)
    raise ValueError(f"unknown model {name!r}; expected one of {list(MODEL_NAMES)}")


def build_model(
    name: str,
    *,
    num_classes: int = 10,
    in_channels: int = 1,
    image_size: int = 28,
    seed: int | None = None,
) -> nn.Module:
    """A freshly initialized model by name (see :data:`MODEL_NAMES`).

    With ``seed`` the initialization is drawn from a private RNG state seeded
    with it (the global torch RNG is left untouched): the same seed gives
    bit-identical parameters. Without ``seed`` the global RNG is used.
    The returned model carries ``input_shape`` (C, H, W) and rejects batches of
    another shape with a clear error.
    """
    for arg, value in (("num_classes", num_classes), ("in_channels", in_channels), ("image_size", image_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{arg} must be a positive integer, got {value!r}")
    if name not in MODEL_NAMES:
        raise ValueError(f"unknown model {name!r}; expected one of {list(MODEL_NAMES)}")
    if seed is None:
        model = _build(name, in_channels, image_size, num_classes)
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(seed))
            model = _build(name, in_channels, image_size, num_classes)
    shape = (in_channels, image_size, image_size)
    model.input_shape = shape  # type: ignore[attr-defined]
    model.register_forward_pre_hook(_InputShapeCheck(name, shape))
    return model
