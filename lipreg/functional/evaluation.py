"""How lipreg runs a network: in evaluation mode, node by node, without changing it.

Two pieces every other module uses: :func:`evaluation_mode` (flags off, buffers restored) and
:func:`call_target` (the one place that knows how an fx node's op is called).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["call_target", "evaluation_mode"]


@contextlib.contextmanager
def evaluation_mode(model: nn.Module, *, restore_buffers: bool = True) -> Iterator[None]:
    """Run a block with every submodule of ``model`` in evaluation mode, then restore it.

    The ``training`` flags are set directly (``Module.eval`` may be overridden by user code)
    and restored exactly, each module to its own value. With ``restore_buffers``, every
    buffer the block writes to (a running statistic, a ``spectral_norm`` vector, a counter)
    is put back bit for bit: lipreg never modifies the model it bounds.
    """
    modules = list(model.modules())
    flags = [m.training for m in modules]
    saved: list[tuple[Tensor, int, Tensor]] = []
    if restore_buffers:
        with torch.no_grad():
            saved = [(b, b._version, b.detach().clone()) for b in model.buffers()]
    try:
        for m in modules:
            if m.training:  # Module.__setattr__ is slow: set only the flags that change
                m.training = False
        yield
    finally:
        for m, flag in zip(modules, flags, strict=True):
            if m.training != flag:
                m.training = flag
        with torch.no_grad():
            for buffer, version, copy in saved:
                if buffer._version != version:
                    buffer.copy_(copy)


def call_target(op: str, target: Any, args: tuple, kwargs: dict) -> Any:
    """Call an fx node's target: ``op`` is the node's ``op`` (``call_module``,
    ``call_method`` or ``call_function``) and ``target`` the resolved module, the method name
    or the function. A module's ``forward`` is called directly, so no hook fires: lipreg
    bounds each module's ``forward``."""
    if op == "call_module":
        return target.forward(*args, **kwargs)
    if op == "call_method":
        self_obj, *rest = args
        return getattr(self_obj, target)(*rest, **kwargs)
    return target(*args, **kwargs)
