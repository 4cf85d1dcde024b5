"""Networks of the experiments (thin wrappers around lipreg.models for Hydra configs)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from lipreg.models import mlp

__all__ = ["alexnet", "image_mlp", "paper_mlp"]


def image_mlp(
    input_shape: Sequence[int], hidden: Sequence[int] = (256, 256), num_classes: int = 10
) -> nn.Sequential:
    """Flatten + ReLU MLP for image classification."""
    return nn.Sequential(nn.Flatten(), *mlp(math.prod(input_shape), tuple(hidden), num_classes))


def paper_mlp(depth: int = 4, width: int = 20, in_features: int = 2) -> nn.Sequential:
    """The paper's regression MLP: ``depth`` linear layers, ``width`` ReLU units, 1 output."""
    if depth < 2:
        raise ValueError(f"depth counts linear layers and must be >= 2, got {depth}.")
    return mlp(in_features, (width,) * (depth - 1), 1)


def alexnet(num_classes: int = 1000, weights: str | None = None) -> nn.Module:
    """torchvision's AlexNet, random (``weights=None``), pretrained on ImageNet
    (``"imagenet"``, downloaded by torchvision) or loaded from a local state_dict file.

    With pretrained weights and ``num_classes != 1000`` the last layer is replaced by a fresh
    one (fine-tuning). Raises a clear error when the weights cannot be had.
    """
    import torchvision

    if weights is None:
        return torchvision.models.alexnet(weights=None, num_classes=num_classes)
    net = torchvision.models.alexnet(weights=None, num_classes=1000)
    if weights == "imagenet":
        try:
            state = torchvision.models.AlexNet_Weights.IMAGENET1K_V1.get_state_dict(progress=False)
        except Exception as exc:  # URLError, OSError, RuntimeError from the hub
            raise RuntimeError(
                "could not download torchvision's pretrained AlexNet weights "
                f"({type(exc).__name__}: {exc}). Without network access, download "
                "alexnet-owt-7be5be79.pth elsewhere and pass model.net.weights=/path/to/it, "
                "or use model.net.weights=null for random weights."
            ) from exc
    else:
        path = Path(weights)
        if not path.is_file():
            raise FileNotFoundError(
                f"AlexNet weights file {str(path)!r} not found. Pass the path of a torchvision "
                "AlexNet state_dict (e.g. alexnet-owt-7be5be79.pth), model.net.weights="
                "imagenet to download it, or null for random weights."
            )
        state = torch.load(path, map_location="cpu", weights_only=True)
    net.load_state_dict(state)
    if num_classes != 1000:
        net.classifier[6] = nn.Linear(net.classifier[6].in_features, num_classes)
    return net
