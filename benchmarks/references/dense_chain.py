"""A plain ``nn.Sequential`` as a dense chain: float64 matrices and activation slopes.

The references take ``f(x) = W_L φ_{L-1}(⋯ φ_1(W_1 x))`` as a list of ``n_k × n_{k-1}``
matrices and one slope interval ``[a_k, b_k]`` per hidden layer. Biases do not change a
global Lipschitz constant, so they are dropped. Each linear module's matrix is its exact
Jacobian: the module applied (without bias, in float64) to the standard basis of its input.
Supported: ``Linear``, ``Conv2d``, ``Flatten`` (a reshape: no matrix) and ``ReLU`` (slopes
``[0, 1]``) / ``LeakyReLU`` (``[s, 1]``); anything else raises.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def _linear_part(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    if isinstance(module, nn.Linear):
        return F.linear(x, module.weight.double())
    if isinstance(module, nn.Conv2d):
        if module.padding_mode != "zeros" or isinstance(module.padding, str):
            raise ValueError(f"dense_chain: only numeric zero padding is supported ({module})")
        return F.conv2d(
            x,
            module.weight.double(),
            None,
            module.stride,
            module.padding,
            module.dilation,
            module.groups,
        )
    raise TypeError(f"not a linear module: {module}")


def _slopes(module: nn.Module) -> tuple[float, float]:
    if isinstance(module, nn.ReLU):
        return (0.0, 1.0)
    if isinstance(module, nn.LeakyReLU):
        s = float(module.negative_slope)
        return (min(s, 1.0), max(s, 1.0))
    raise TypeError(f"dense_chain: unsupported activation {module}")


def dense_chain(
    model: nn.Sequential, input_shape: tuple[int, ...]
) -> tuple[list[np.ndarray], list[tuple[float, float]]]:
    """``(weights, slopes)`` of ``model``: consecutive linear modules are multiplied into one
    matrix, each activation closes one; the chain must start and end with a linear map."""
    shape = tuple(input_shape)
    current: np.ndarray | None = None  # product of the linear maps since the last activation
    weights: list[np.ndarray] = []
    slopes: list[tuple[float, float]] = []
    with torch.no_grad():
        for module in model:
            if isinstance(module, nn.Flatten):
                shape = (math.prod(shape),)
            elif isinstance(module, nn.Linear | nn.Conv2d):
                n = math.prod(shape)
                basis = torch.eye(n, dtype=torch.float64).reshape(n, *shape)
                out = _linear_part(module, basis)
                shape = tuple(out.shape[1:])
                mat = out.reshape(n, -1).T.numpy().copy()  # column j = image of e_j
                current = mat if current is None else mat @ current
            else:
                if current is None:
                    raise ValueError("dense_chain: an activation before any linear map")
                slopes.append(_slopes(module))
                weights.append(current)
                current = None
    if current is None:
        raise ValueError("dense_chain: the network must end with a linear map")
    weights.append(current)
    return weights, slopes
