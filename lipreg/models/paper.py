"""Plain ``torch.nn`` versions of the networks of Scaman & Virmaux (NeurIPS 2018).

Every model except AlexNet is an :class:`torch.nn.Sequential` of standard layers
(``Linear``, ``Conv2d``, ``ReLU``, ``Flatten``) so that it can be traced layer by layer by the
Lipschitz estimators. The weights are freshly initialised: the paper's trained weights are not
public.

Provenance (see ``paper.md`` sections 3.2-3.4):

* :func:`mlp` follows the reference repository's ``models/mlp.py`` (Linear + ReLU blocks and a
  final Linear). The default width 20 is the paper's recollected width, not a verified value.
* :func:`mnist_cnn4` and :func:`mnist_cnn5` are exactly the reference repository's
  ``models/mnist_4.py`` and ``models/mnist_5.py``.
* :func:`mnist_cnn7` and :func:`mnist_cnn10` are **our** designs in the same all-convolutional
  style: the paper's 7- and 10-layer architectures are not recoverable.
* :func:`alexnet` is torchvision's AlexNet (the paper used the pretrained torchvision model).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from torch import nn

from lipreg.models.optional import import_optional

__all__ = [
    "PAPER_INPUT_SHAPES",
    "PAPER_MODELS",
    "alexnet",
    "mlp",
    "mnist_cnn4",
    "mnist_cnn5",
    "mnist_cnn7",
    "mnist_cnn10",
]


def mlp(
    in_features: int = 2,
    hidden: Sequence[int] = (20, 20, 20),
    out_features: int = 1,
    activation: Callable[[], nn.Module] = nn.ReLU,
) -> nn.Sequential:
    """Build a multilayer perceptron ``Linear, act, Linear, act, ..., Linear``.

    This is the structure of the reference repository's ``models/mlp.py``, used for the paper's
    synthetic 2-D regression experiment (section 3.2 of ``paper.md``).

    Args:
        in_features: Input dimension (2 in the paper's experiment).
        hidden: Widths of the hidden layers; one ``Linear`` + activation block per entry. An
            empty sequence gives a single ``Linear(in_features, out_features)``.
        out_features: Output dimension (1 in the paper's experiment).
        activation: Zero-argument factory of the activation module (a class such as
            ``nn.ReLU`` works). A fresh instance is created for every block.

    Returns:
        The network as an ``nn.Sequential``; it has ``len(hidden) + 1`` ``Linear`` layers.
    """
    layers: list[nn.Module] = []
    width = in_features
    for h in hidden:
        layers.append(nn.Linear(width, h))
        layers.append(activation())
        width = h
    layers.append(nn.Linear(width, out_features))
    return nn.Sequential(*layers)


def _conv_relu_stack(convs: Sequence[nn.Conv2d]) -> nn.Sequential:
    """Chain convolutions with a ReLU between consecutive ones, then flatten to ``(B, C)``."""
    layers: list[nn.Module] = []
    for i, conv in enumerate(convs):
        if i > 0:
            layers.append(nn.ReLU())
        layers.append(conv)
    layers.append(nn.Flatten())
    return nn.Sequential(*layers)


def _deep_conv_stack(same_size_convs: int) -> nn.Sequential:
    """Our deeper MNIST CNNs: conv 1->32 (k5, s2), then at each resolution
    ``same_size_convs`` 3x3 stride-1 padding-1 convolutions c->c followed by the downsampling
    convolution (32->64 k3 s2, 64->128 k3 s2, 128->10 k2), ReLU between consecutive ones.
    Layers are created in network order, so a seeded build gives the same weights as the
    explicit listings in :func:`mnist_cnn7` and :func:`mnist_cnn10`."""
    convs = [nn.Conv2d(1, 32, kernel_size=5, stride=2)]
    # (channels, downsampling conv's out channels, kernel, stride), built in network order
    for channels, out, kernel, stride in ((32, 64, 3, 2), (64, 128, 3, 2), (128, 10, 2, 1)):
        for _ in range(same_size_convs):
            convs.append(nn.Conv2d(channels, channels, kernel_size=3, stride=1, padding=1))
        convs.append(nn.Conv2d(channels, out, kernel_size=kernel, stride=stride))
    return _conv_relu_stack(convs)


def mnist_cnn4() -> nn.Sequential:
    """The paper's 4-layer all-convolutional MNIST network (reference ``models/mnist_4.py``).

    Layers (input ``1 x 28 x 28``; spatial sizes 28 -> 12 -> 5 -> 2 -> 1)::

        conv 1->32, k5, s2   (28 -> 12), ReLU
        conv 32->64, k3, s2  (12 -> 5),  ReLU
        conv 64->128, k3, s2 (5 -> 2),   ReLU
        conv 128->10, k2     (2 -> 1)
        flatten -> (B, 10)

    No pooling, no batch normalisation.
    """
    return _conv_relu_stack(
        [
            nn.Conv2d(1, 32, kernel_size=5, stride=2),
            nn.Conv2d(32, 64, kernel_size=3, stride=2),
            nn.Conv2d(64, 128, kernel_size=3, stride=2),
            nn.Conv2d(128, 10, kernel_size=2),
        ]
    )


def mnist_cnn5() -> nn.Sequential:
    """The paper's 5-layer all-convolutional MNIST network (reference ``models/mnist_5.py``).

    Layers (input ``1 x 28 x 28``)::

        conv 1->32, k5, s2        (28 -> 12), ReLU
        conv 32->64, k3, s2       (12 -> 5),  ReLU
        conv 64->64, k3, s1, p1   (5 -> 5),   ReLU
        conv 64->128, k3, s2      (5 -> 2),   ReLU
        conv 128->10, k2          (2 -> 1)
        flatten -> (B, 10)
    """
    return _conv_relu_stack(
        [
            nn.Conv2d(1, 32, kernel_size=5, stride=2),
            nn.Conv2d(32, 64, kernel_size=3, stride=2),
            nn.Conv2d(64, 64, kernel_size=3, stride=1, padding=1),
            nn.Conv2d(64, 128, kernel_size=3, stride=2),
            nn.Conv2d(128, 10, kernel_size=2),
        ]
    )


def mnist_cnn7() -> nn.Sequential:
    """A 7-layer all-convolutional MNIST network. **Our design, not the paper's.**

    The paper reports a 7-layer MNIST CNN but its architecture is not recoverable (it was in
    the unavailable supplementary material). This network follows the style of
    :func:`mnist_cnn4` / :func:`mnist_cnn5`: no pooling, no batch normalisation, ReLU between
    convolutions, stride-2 convolutions to downsample and 3x3 stride-1 padding-1 convolutions to
    add depth, a final convolution to 10 channels at 1x1 spatial size, then flatten. Bounds
    computed on it are not comparable with the paper's 7-layer numbers.

    Layers (input ``1 x 28 x 28``)::

        conv 1->32, k5, s2        (28 -> 12), ReLU
        conv 32->32, k3, s1, p1   (12 -> 12), ReLU
        conv 32->64, k3, s2       (12 -> 5),  ReLU
        conv 64->64, k3, s1, p1   (5 -> 5),   ReLU
        conv 64->128, k3, s2      (5 -> 2),   ReLU
        conv 128->128, k3, s1, p1 (2 -> 2),   ReLU
        conv 128->10, k2          (2 -> 1)
        flatten -> (B, 10)
    """
    return _deep_conv_stack(same_size_convs=1)


def mnist_cnn10() -> nn.Sequential:
    """A 10-layer all-convolutional MNIST network. **Our design, not the paper's.**

    The paper reports a 10-layer MNIST CNN but its architecture is not recoverable. This network
    uses the same style as :func:`mnist_cnn7` with two depth-adding 3x3 convolutions per
    resolution. Bounds computed on it are not comparable with the paper's 10-layer numbers.

    Layers (input ``1 x 28 x 28``)::

        conv 1->32, k5, s2        (28 -> 12), ReLU
        conv 32->32, k3, s1, p1   (12 -> 12), ReLU
        conv 32->32, k3, s1, p1   (12 -> 12), ReLU
        conv 32->64, k3, s2       (12 -> 5),  ReLU
        conv 64->64, k3, s1, p1   (5 -> 5),   ReLU
        conv 64->64, k3, s1, p1   (5 -> 5),   ReLU
        conv 64->128, k3, s2      (5 -> 2),   ReLU
        conv 128->128, k3, s1, p1 (2 -> 2),   ReLU
        conv 128->128, k3, s1, p1 (2 -> 2),   ReLU
        conv 128->10, k2          (2 -> 1)
        flatten -> (B, 10)
    """
    return _deep_conv_stack(same_size_convs=2)


def alexnet(num_classes: int = 1000) -> nn.Module:
    """Torchvision's AlexNet with random weights (``weights=None``).

    The paper used the ImageNet-pretrained torchvision AlexNet (section 3.4 of ``paper.md``);
    load pretrained weights yourself if needed. Input shape ``3 x 224 x 224``.

    torchvision is an optional dependency of lipreg and is imported lazily.

    Args:
        num_classes: Number of output classes.

    Returns:
        ``torchvision.models.AlexNet`` (an ``nn.Module``, not an ``nn.Sequential``: its
        ``features`` and ``classifier`` children are ``nn.Sequential``).

    Raises:
        ImportError: If torchvision is not installed.
    """
    torchvision = import_optional(
        "torchvision",
        "lipreg.models.alexnet",
        "`pip install torchvision` (or `pip install lipreg[experiments]`)",
    )
    return torchvision.models.alexnet(weights=None, num_classes=num_classes)


#: Factories of the paper's models, by name. Each is callable without arguments.
PAPER_MODELS: dict[str, Callable[[], nn.Module]] = {
    "mlp": mlp,
    "mnist_cnn4": mnist_cnn4,
    "mnist_cnn5": mnist_cnn5,
    "mnist_cnn7": mnist_cnn7,
    "mnist_cnn10": mnist_cnn10,
    "alexnet": alexnet,
}

#: Input shape (without the batch dimension) of each model of :data:`PAPER_MODELS` built with
#: its default arguments.
PAPER_INPUT_SHAPES: dict[str, tuple[int, ...]] = {
    "mlp": (2,),
    "mnist_cnn4": (1, 28, 28),
    "mnist_cnn5": (1, 28, 28),
    "mnist_cnn7": (1, 28, 28),
    "mnist_cnn10": (1, 28, 28),
    "alexnet": (3, 224, 224),
}
