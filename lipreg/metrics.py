"""torchmetrics metrics for monitoring the Lipschitz constant of a network during training.

This module imports ``torchmetrics`` (the ``train`` extra); :mod:`lipreg.functional` does not.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torchmetrics import Metric

from lipreg.functional.jacobian import jacobian_norms
from lipreg.functional.lower_bound import DifferenceQuotients
from lipreg.functional.trace import check_finite_parameters, eval_function

__all__ = ["LipschitzLowerBound"]

LOCAL_STEPS = (1e-3, 1e-4, 1e-5, 1e-6, 1e-7)
"""Relative steps of the metric's quotients: small, so that the value describes the network at
the evaluated samples (``lipreg.lower_bound`` also tries larger steps)."""


class LipschitzLowerBound(Metric):
    r"""Data-dependent certified lower bound of the l2 Lipschitz constant of ``model``.

    For the evaluated samples :math:`x_1, \dots, x_N` (all batches passed to :meth:`update`
    since the last :meth:`reset`, on all processes)

    .. math::

        \widehat{L} = \max_{i \in S} \max_{t}
        \frac{\lVert f(x_i + h_{i,t}) - f(x_i) \rVert_2 - \text{margin}}
             {\lVert h_{i,t} \rVert_2} \le L(f),

    difference quotients evaluated in float64 (:class:`lipreg.functional.lower_bound.
    DifferenceQuotients`, with the rounding model documented in
    :mod:`lipreg.functional.lower_bound`) along ``h_{i,t} = ±t·max(‖x_i‖, 1)·v_i``. The
    direction :math:`v_i` and the set :math:`S` (the ``n_certify`` samples of each batch with
    the largest ``‖J_f(x_i) v_i‖``) come from ``n_iter`` steps of batched power iteration on
    :math:`J_f(x_i)^\top J_f(x_i)` (autograd, :func:`lipreg.functional.jacobian.
    jacobian_norms`); the Jacobian only guides, it is never reported.

    **Guarantee.** Every value is a certified *lower* bound on the l2 Lipschitz constant of
    the network in evaluation mode, by definition of the constant (any two points), at kinks
    too, never an upper bound: the true constant can be much larger than what the data reveal.
    A non-finite output raises ``ValueError`` ("non-finite").

    The model is evaluated with evaluation semantics (BatchNorm running statistics, dropout
    off) through :func:`lipreg.functional.trace.eval_function`, whatever its current mode,
    and is never modified (the float64 evaluation runs on a deep copy when the model is not
    float64): no parameter, buffer (BatchNorm running statistics), ``.grad``, train/eval flag
    or global RNG state changes. :meth:`update` works inside ``torch.no_grad()`` and
    ``torch.inference_mode()`` (as in Lightning's validation loop).

    Args:
        model: the network, a map from a batch ``(B, *input_shape)`` to a batch of outputs
            that treats samples independently. Only a reference is kept: the model is not a
            submodule of the metric (see *Notes*).
        n_iter: power iterations per update (per-sample Jacobian norms).
        n_certify: samples per update whose difference quotients are certified (those with
            the largest Jacobian norms).
        tol: relative tolerance at which power iteration stops early.
        max_samples_per_update: if given, each :meth:`update` evaluates a random subset of at
            most this many samples of the batch (drawn with the private generator).
        seed: seed of the metric's private ``torch.Generator`` (CPU), used for the power
            iteration start vectors and the subsampling; the global RNG is never used.
        kwargs: additional keyword arguments of :class:`torchmetrics.Metric`.

    Notes:
        * State ``value``: a float32 scalar reduced with ``max`` across processes (values are
          non-negative, so the default 0 is neutral). float32 is torchmetrics' convention,
          works on every device (MPS has no float64) and is ample for logging; the certified
          quotients are computed in float64 and rounded *down* when stored, so storing never
          inflates the bound. Use ``metric.set_dtype(torch.float64)`` to keep
          float64.
        * The model is held as a plain attribute, not registered as a submodule: otherwise the
          parameters of a LightningModule owning both the network and the metric would appear
          twice in its ``state_dict`` and ``parameters()``, and ``metric.to(...)`` would move
          the network. ``copy.deepcopy`` / pickling of an owner that holds both keep the
          shared reference (memoised); ``metric.clone()`` alone copies the model too.
        * The model is re-traced at every update, so that changes of weights, buffers,
          devices or Python attributes between updates are always seen.
        * ``update(x)`` casts ``x`` to the device and floating dtype of the model's first
          floating parameter or buffer.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from lipreg.metrics import LipschitzLowerBound
        >>> model = nn.Linear(4, 3)
        >>> metric = LipschitzLowerBound(model)
        >>> metric.update(torch.randn(8, 4))
        >>> exact = torch.linalg.matrix_norm(model.weight.detach(), 2)  # L of an affine map
        >>> bool(torch.isclose(metric.compute(), exact, rtol=1e-4))
        True
    """

    is_differentiable = False
    higher_is_better = None  # a property of the model, neither good nor bad
    full_state_update = False
    plot_lower_bound = 0.0

    value: Tensor

    def __init__(
        self,
        model: nn.Module,
        *,
        n_iter: int = 30,
        n_certify: int = 4,
        tol: float = 1e-6,
        max_samples_per_update: int | None = None,
        seed: int = 0,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}.")
        if not _is_int(n_iter) or n_iter < 1:
            raise ValueError(f"n_iter must be a positive int, got {n_iter!r}.")
        if not _is_int(n_certify) or n_certify < 1:
            raise ValueError(f"n_certify must be a positive int, got {n_certify!r}.")
        if isinstance(tol, bool) or not isinstance(tol, int | float) or not tol >= 0:
            raise ValueError(f"tol must be a non-negative float, got {tol!r}.")
        if max_samples_per_update is not None and (
            not _is_int(max_samples_per_update) or max_samples_per_update < 1
        ):
            raise ValueError(
                f"max_samples_per_update must be None or a positive int, got "
                f"{max_samples_per_update!r}."
            )
        if not _is_int(seed):
            raise TypeError(f"seed must be an int, got {type(seed).__name__}.")
        # object.__setattr__ bypasses nn.Module.__setattr__, which would register the model as
        # a submodule (duplicated state_dict/parameters in the owner, .to() moving the model).
        object.__setattr__(self, "_model", model)
        self.n_iter = int(n_iter)
        self.n_certify = int(n_certify)
        self.tol = float(tol)
        self.max_samples_per_update = (
            None if max_samples_per_update is None else int(max_samples_per_update)
        )
        self.seed = int(seed)
        self._generator = torch.Generator().manual_seed(self.seed)
        self._sample_ndim: int | None = None
        self.add_state(
            "value", default=torch.tensor(0.0, dtype=torch.float32), dist_reduce_fx="max"
        )

    @property
    def model(self) -> nn.Module:
        """The monitored network (a reference, not a submodule)."""
        return self._model

    def update(self, x: Tensor) -> None:
        """Add the best certified difference quotient at the batch ``x`` (``(B, *in_shape)``)."""
        if not isinstance(x, Tensor):
            raise TypeError(
                f"update() expects a tensor batch of model inputs (B, *input_shape), got "
                f"{type(x).__name__}. For a DataLoader batch (x, y) pass x only."
            )
        if x.is_complex() or x.dtype == torch.bool:
            raise TypeError(f"update() expects real-valued inputs, got dtype {x.dtype}.")
        if x.ndim < 2:
            raise ValueError(
                f"update() expects a batch of shape (B, *input_shape) with at least 2 "
                f"dimensions, got shape {tuple(x.shape)}. For a single sample use x[None]; for "
                "scalar inputs use x[:, None]."
            )
        if self._sample_ndim is not None and x.ndim - 1 != self._sample_ndim:
            raise ValueError(
                f"update() got a batch of shape {tuple(x.shape)} ({x.ndim} dimensions), but "
                f"earlier batches had {self._sample_ndim + 1} dimensions (B, *input_shape). Did "
                "you drop or add the batch dimension? Use a new metric for inputs of another rank."
            )
        if x.shape[0] == 0:
            return
        model = self._model
        device, dtype = _device_and_dtype(model, x)
        gen = self._generator
        with torch.inference_mode(False):
            # Outside inference mode, so that x is a normal tensor autograd can use; copy=True
            # also turns an inference tensor given by the caller into a normal one.
            x = x.detach()
            k = self.max_samples_per_update
            if k is not None and x.shape[0] > k:
                idx = torch.randperm(x.shape[0], generator=gen)[:k]
                x = x[idx.to(x.device)]
            x = x.to(device=device, dtype=dtype, copy=True)
            if not bool(torch.isfinite(x).all()):
                raise ValueError("update() got non-finite (NaN/Inf) inputs.")
            v0 = torch.randn(x.shape, generator=gen, dtype=dtype).to(device)
            fn, _ = eval_function(model)

            def fn_tensor(z: Tensor) -> Tensor:
                out = fn(z)
                if not isinstance(out, Tensor):
                    raise TypeError(
                        f"the model's output is a {type(out).__name__}, not a tensor: wrap the "
                        "model so that forward() returns the tensor whose Lipschitz constant "
                        "you want."
                    )
                return out

            with torch.enable_grad():
                try:
                    sigma, v = jacobian_norms(fn_tensor, x, v0=v0, n_iter=self.n_iter, tol=self.tol)
                except RuntimeError as exc:
                    raise RuntimeError(
                        f"evaluating the model's Jacobian on a batch of shape {tuple(x.shape)} "
                        f"failed: {exc}\nupdate() expects a batch (B, *input_shape) of inputs "
                        "of the model."
                    ) from exc
            if not bool(torch.isfinite(sigma).all()):
                check_finite_parameters(model)
                raise ValueError(
                    "the model's Jacobian norm is non-finite (NaN/Inf) at some inputs: the "
                    "network overflows on this batch."
                )
            top = torch.argsort(sigma, descending=True, stable=True)[: self.n_certify]
            certificate = DifferenceQuotients(model, steps=LOCAL_STEPS)(x[top], v[top])
            batch_max = _round_down(certificate.values.max(), self.value.dtype)
            # Also outside inference mode, so that the state never becomes an inference tensor.
            self.value = torch.maximum(self.value, batch_max.to(self.value.device))
        self._sample_ndim = x.ndim - 1

    def compute(self) -> Tensor:
        """The running maximum of the certified quotients (0 before any update)."""
        return self.value


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _device_and_dtype(model: nn.Module, x: Tensor) -> tuple[torch.device, torch.dtype]:
    """Device and floating dtype of the model's first floating parameter or buffer."""
    for t in (*model.parameters(), *model.buffers()):
        if t.is_floating_point():
            return t.device, t.dtype
    return x.device, x.dtype if x.is_floating_point() else torch.get_default_dtype()


def _round_down(t: Tensor, dtype: torch.dtype) -> Tensor:
    """``t`` cast to ``dtype``, rounded towards zero so that the cast never increases it."""
    out = t.to(dtype)
    if out.dtype == t.dtype:
        return out
    wide = torch.promote_types(t.dtype, dtype)
    too_big = out.to(wide) > t.to(wide)
    return torch.where(too_big, torch.nextafter(out, torch.zeros_like(out)), out)
