"""What :class:`lipreg.LipschitzCallback` bounds: the network and its input in a batch.

:func:`find_network` picks the module (the LightningModule or ``model_attr``, compiled
wrappers removed); :func:`infer_input` finds its input among the tensors of a training batch
by checking candidates against a real forward (eval mode, no grad, modes and global RNG
restored). Whatever prevents the callback from running raises :class:`SwitchOff`, whose
message says what was expected, what was found and what to do; the callback turns it into one
warning and switches itself off for the fit (it never breaks training).
"""

from __future__ import annotations

import dataclasses
import inspect
import itertools
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from lipreg.functional.evaluation import evaluation_mode
from lipreg.functional.trace import has_forward, unwrap_compiled

__all__ = [
    "MAX_MESSAGE",
    "SwitchOff",
    "at_path",
    "batch_tensors",
    "check_given_input",
    "describe",
    "describe_candidates",
    "device_type",
    "find_network",
    "infer_input",
    "required_inputs",
    "signature_text",
    "subnetworks_hint",
    "try_forward",
]

MAX_MESSAGE = 1500  # long core messages (one line per unsupported node) are cut here


class SwitchOff(Exception):
    """The callback cannot run for this fit; ``str(self)`` says why and what to do."""


# ---------------------------------------------------------------------- networks
def find_network(root: nn.Module, model_attr: str | None) -> nn.Module:
    """The module to bound: ``root`` itself (``model_attr=None``) or its dotted attribute
    ``model_attr``, compiled wrappers removed (``_orig_mod``), with a ``forward`` of ONE
    required input. Raises :class:`SwitchOff` naming the sub-networks to pick otherwise."""
    root = unwrap_compiled(root)
    owner_name = type(root).__name__
    if model_attr is None:
        net, what = root, f"{owner_name} (the LightningModule)"
    else:
        net = root
        for part in model_attr.split("."):
            net = getattr(unwrap_compiled(net), part, None)
            if net is None:
                break
        if not isinstance(net, nn.Module):
            found = "nothing" if net is None else f"a {type(net).__name__}"
            raise SwitchOff(
                f"model_attr={model_attr!r}: expected an nn.Module attribute of "
                f"{owner_name}, found {found}. {subnetworks_hint(root)}"
            )
        net = unwrap_compiled(net)
        what = f"{owner_name}.{model_attr} ({type(net).__name__})"
    if not has_forward(net):
        raise SwitchOff(
            f"{what} has no forward(), so there is no single network to bound. "
            f"{subnetworks_hint(net)}"
        )
    n_inputs = required_inputs(net)
    if n_inputs is not None and n_inputs != 1:
        raise SwitchOff(
            f"{what}.forward takes {n_inputs} required inputs ({signature_text(net)}); a "
            "Lipschitz bound is for a network of ONE tensor input. Set model_attr= to a "
            "one-input sub-network, or wrap the network in a one-input nn.Module (fixing the "
            f"other inputs). {subnetworks_hint(root)}"
        )
    return net  # compiled submodules are traced through their eager code


def required_inputs(module: nn.Module) -> int | None:
    """Number of inputs ``forward`` requires (``None``: cannot tell, e.g. ``*args``)."""
    try:
        params = list(inspect.signature(module.forward).parameters.values())
    except (TypeError, ValueError):
        return None
    kinds = inspect.Parameter
    if any(p.kind is kinds.VAR_POSITIONAL for p in params):
        return None
    return sum(
        1
        for p in params
        if p.default is kinds.empty
        and p.kind in (kinds.POSITIONAL_ONLY, kinds.POSITIONAL_OR_KEYWORD, kinds.KEYWORD_ONLY)
    )


def signature_text(module: nn.Module) -> str:
    """``forward(x, y)``: the parameter names of ``forward`` (annotations left out)."""
    try:
        params = inspect.signature(module.forward).parameters.values()
    except (TypeError, ValueError):
        return "forward(...)"
    names = [
        ("*" if p.kind is p.VAR_POSITIONAL else "**" if p.kind is p.VAR_KEYWORD else "") + p.name
        for p in params
    ]
    return f"forward({', '.join(names)})"


def subnetworks_hint(module: nn.Module) -> str:
    """One sentence listing the sub-networks with parameters and the ``model_attr`` to pick."""
    subs = [
        (name, unwrap_compiled(child))
        for name, child in module.named_children()
        if any(True for _ in child.parameters())
    ]
    if not subs:
        return "It has no sub-network with parameters; pass a module that computes the network."
    described = ", ".join(
        f"{name} ({type(child).__name__}, {sum(p.numel() for p in child.parameters()):,} "
        "parameters)"
        for name, child in subs
    )
    return (
        f"Its sub-networks: {described}. Pick one with "
        f"LipschitzCallback(model_attr={subs[0][0]!r})."
    )


def device_type(module: nn.Module) -> str:
    """``"cpu"``/``"cuda"``...: where the first parameter or buffer lives (``"cpu"`` if none)."""
    # (a generator: this runs at every monitoring step, listing the parameters would not)
    first = next(itertools.chain(module.parameters(), module.buffers()), None)
    return first.device.type if first is not None else "cpu"


# ---------------------------------------------------------------------- batches and inputs
def batch_tensors(
    batch: Any, path: tuple[Any, ...] = ()
) -> Iterator[tuple[tuple[Any, ...], Tensor]]:
    """Every tensor of a batch with its path (keys/indices/attribute names), in order."""
    if isinstance(batch, Tensor):
        yield path, batch
    elif isinstance(batch, Mapping):
        for key, value in batch.items():
            yield from batch_tensors(value, (*path, key))
    elif isinstance(batch, list | tuple):
        for i, value in enumerate(batch):
            yield from batch_tensors(value, (*path, i))
    elif dataclasses.is_dataclass(batch) and not isinstance(batch, type):
        for f in dataclasses.fields(batch):
            yield from batch_tensors(getattr(batch, f.name), (*path, f"@{f.name}"))


def at_path(batch: Any, path: tuple[Any, ...]) -> Any:
    """The element of ``batch`` at ``path`` (from :func:`batch_tensors`), ``None`` if absent."""
    for key in path:
        try:
            if isinstance(key, str) and key.startswith("@") and not isinstance(batch, Mapping):
                batch = getattr(batch, key[1:])
            else:
                batch = batch[key]
        except (KeyError, IndexError, TypeError, AttributeError):
            return None
    return batch


def path_text(path: tuple[Any, ...]) -> str:
    """``batch['x'][0].field``: a path as the user would write it."""
    text = "batch"
    for key in path:
        if isinstance(key, str) and key.startswith("@"):
            text += f".{key[1:]}"
        else:
            text += f"[{key!r}]"
    return text


def describe_candidates(candidates: list[tuple[tuple[Any, ...], Tensor]]) -> str:
    """``batch[0]: float32 (4, 6), ...``: the tensors of a batch, for messages."""
    if not candidates:
        return "no tensor"
    return ", ".join(
        f"{path_text(p)}: {str(t.dtype).replace('torch.', '')} {tuple(t.shape)}"
        for p, t in candidates
    )


def try_forward(network: nn.Module, x: Tensor) -> str | None:
    """Call ``network`` on one sample of ``x`` (eval mode, no grad, modes and global RNG
    restored); ``None`` if it returns a tensor, else what went wrong."""
    first = next(iter(list(network.parameters()) + list(network.buffers())), None)
    dtype = first.dtype if first is not None and first.is_floating_point() else x.dtype
    device = first.device if first is not None else x.device
    cuda = [device.index or 0] if device.type == "cuda" else []
    sample = x[:1].detach().to(dtype=dtype, device=device)
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=cuda), evaluation_mode(network):
            out = network(sample)
    except Exception as exc:
        return f"forward raised {describe(exc, limit=300)}"
    if not isinstance(out, Tensor):
        return f"forward returned a {type(out).__name__}, not a tensor"
    return None


def check_given_input(
    network: nn.Module,
    input_shape: tuple[int, ...],
    candidates: list[tuple[tuple[Any, ...], Tensor]],
) -> None:
    """Raise :class:`SwitchOff` when ``network`` does not accept ``input_shape``."""
    problem = try_forward(network, torch.zeros(1, *input_shape))
    if problem is not None:
        raise SwitchOff(
            f"input_shape={input_shape} does not fit {type(network).__name__}: on an input "
            f"of shape {(1, *input_shape)} its {problem}. The training batch holds "
            f"{describe_candidates(candidates)}. Pass the shape of ONE input without the "
            "batch dimension, or omit input_shape to infer it from the batch."
        )


def infer_input(
    network: nn.Module, candidates: list[tuple[tuple[Any, ...], Tensor]]
) -> tuple[tuple[Any, ...], tuple[int, ...]]:
    """Path and per-sample shape of the first batch tensor the network accepts.

    Candidates (from :func:`batch_tensors`, in order) are checked against a real forward:
    a floating-point tensor with a per-sample shape, on one sample of which the network (in
    eval mode under ``torch.no_grad()``, every module's ``training`` flag and the global RNG
    restored; :func:`try_forward`) returns a tensor. Raises :class:`SwitchOff` listing every
    candidate and why it was rejected.
    """
    tried: list[str] = []
    for path, x in candidates:
        where = f"{path_text(path)} ({str(x.dtype).replace('torch.', '')} {tuple(x.shape)})"
        if not x.is_floating_point():
            tried.append(f"{where}: not floating-point (a label or token ids?)")
            continue
        if x.ndim < 2 or x.shape[0] == 0:
            tried.append(f"{where}: no per-sample shape (a (B,) vector or an empty batch)")
            continue
        problem = try_forward(network, x)
        if problem is not None:
            tried.append(f"{where}: {problem}")
            continue
        return path, tuple(int(s) for s in x.shape[1:])
    found = "\n  - ".join(tried) if tried else "the batch holds no tensor"
    raise SwitchOff(
        f"could not find the input of {type(network).__name__} in the training batch: a "
        "floating-point tensor on which forward() returns a tensor. Tried:\n  - "
        f"{found}\nPass input_shape=(...) (one sample, no batch dimension), and model_attr= "
        "if the network to bound is a sub-network."
    )


def describe(exc: BaseException, limit: int = MAX_MESSAGE) -> str:
    """``Type: message`` of an exception, cut to ``limit`` characters."""
    text = f"{type(exc).__name__}: {exc}".strip()
    return text if len(text) <= limit else text[: limit - 5] + " [...]"
