"""Lightning callback that monitors the Lipschitz constant while a network trains.

Add ``LipschitzCallback()`` to a ``Trainer`` and every ``every_n_train_steps`` optimizer steps
it logs, through every logger of the Trainer (W&B, TensorBoard, CSV) with
``trainer.global_step`` as x-axis, and into ``trainer.callback_metrics`` (so that
``ModelCheckpoint`` / ``EarlyStopping`` can monitor them):

=================================== ==========================================================
key                                 meaning
=================================== ==========================================================
``lipschitz/autolip``               AutoLip with Lanczos layer norms (warm-started; relative
                                    tolerance ``tol`` per layer). An **estimate**: the norms
                                    approach from below.
``lipschitz/autolip_certified``     AutoLip with certified layer norms: a **guaranteed upper
                                    bound**; every ``certify_every_n_train_steps`` steps.
``lipschitz/seqlip``                greedy SeqLip (an estimate) or exact SeqLip (certified),
                                    sequential networks only.
``lipschitz/seqlip_over_autolip``   ratio of the two.
``lipschitz/lower_bound``           certified lower bound (largest Jacobian norm found on the
                                    current batch and around it).
``lipschitz/layer/<name>``          per-layer norm estimates (``log_layers=True``; merged
                                    maps are named ``a+b``).
``lipschitz/<method>_iterations``,  cost of each estimate.
``lipschitz/<method>_time_s``
=================================== ==========================================================

The estimates never perturb training: the estimators use a private ``torch.Generator``, leave
parameters, gradients, buffers and train/eval modes untouched, and run in float32 (float64 for
certificates) outside autocast. Warm-start vectors are kept between calls and saved in
checkpoints, so a resumed run continues warm. Under DDP every rank computes the same values
(same weights, same seeded start vectors) and rank 0's are broadcast, so all ranks see
identical ``callback_metrics``; loggers write once (rank 0).
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Sequence
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn

from lipreg.functional.autolip import AutoLip, autolip
from lipreg.functional.graph import check_input_shape
from lipreg.functional.lower_bound import lower_bound
from lipreg.functional.power_iteration import check_iteration_options
from lipreg.functional.seqlip import NotSequentialError, seqlip

__all__ = ["LipschitzCallback"]

_METHODS = ("autolip", "seqlip", "lower_bound")
_STATE_VERSION = 1


class LipschitzCallback(Callback):
    """Monitor AutoLip / SeqLip / a lower bound of the model during training.

    Args:
        methods: any of ``"autolip"``, ``"seqlip"``, ``"lower_bound"``. Default: AutoLip, plus
            SeqLip when the network is sequential.
        every_n_train_steps: compute after every ``n``-th optimizer step (``None``: never by
            steps).
        every_n_epochs: also compute at the end of every ``n``-th training epoch.
        input_shape: shape of ONE input without the batch dimension; inferred from the first
            training batch when omitted (first tensor of the batch).
        model_attr: attribute of the LightningModule holding the network to bound (e.g.
            ``"net"``); ``None`` bounds the LightningModule's own ``forward``.
        tol, max_iter: Lanczos tolerance and cap per layer.
        certify_every_n_train_steps: cadence of ``lipschitz/autolip_certified`` (default 10
            times ``every_n_train_steps``; ``0`` disables it; epoch-end estimates always
            certify). Certificates cost more than warm estimates.
        seqlip_every_n_train_steps: cadence of SeqLip (default 10 times
            ``every_n_train_steps``): a greedy search over activation patterns costs far more
            than a warm AutoLip estimate.
        seqlip_method: ``"greedy"`` (estimate) or ``"exact"`` (certified, small widths).
        seqlip_top_k: top-``k`` truncation for SeqLip on large layers (``None``: automatic).
        lower_bound_points: random points of the lower-bound search (besides the batch).
        certify_dense_limit: maps whose smaller side is at most this are certified exactly by
            materialising them (tighter than the FFT/product certificates on small feature
            maps, costlier on large ones); ``0`` uses only structured certificates.
        log_layers: log per-layer norms.
        on_nonfinite: ``"warn"`` (log NaN, warn, keep training) or ``"raise"`` when the
            weights or a bound are not finite.
        seed: seed of the private generators.
    """

    def __init__(
        self,
        methods: Sequence[str] | None = None,
        every_n_train_steps: int | None = 50,
        every_n_epochs: int | None = None,
        input_shape: Sequence[int] | None = None,
        *,
        model_attr: str | None = None,
        tol: float = 1e-4,
        max_iter: int = 500,
        certify_every_n_train_steps: int | None = None,
        seqlip_every_n_train_steps: int | None = None,
        seqlip_method: str = "greedy",
        seqlip_top_k: int | None = None,
        lower_bound_points: int = 32,
        certify_dense_limit: int = 2048,
        log_layers: bool = True,
        on_nonfinite: str = "warn",
        seed: int = 0,
    ) -> None:
        super().__init__()
        if methods is not None:
            methods = [methods] if isinstance(methods, str) else list(methods)
            unknown = [m for m in methods if m not in _METHODS]
            if unknown or not methods:
                raise ValueError(
                    f"methods must be a non-empty list of {list(_METHODS)}, got {methods!r}."
                )
        for name, value in (
            ("every_n_train_steps", every_n_train_steps),
            ("every_n_epochs", every_n_epochs),
        ):
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive int or None, got {value!r}.")
        if every_n_train_steps is None and every_n_epochs is None:
            raise ValueError("set every_n_train_steps and/or every_n_epochs.")
        if seqlip_method not in ("greedy", "exact"):
            raise ValueError(f"seqlip_method must be 'greedy' or 'exact', got {seqlip_method!r}.")
        if on_nonfinite not in ("warn", "raise"):
            raise ValueError(f"on_nonfinite must be 'warn' or 'raise', got {on_nonfinite!r}.")
        check_iteration_options(tol, max_iter, "lanczos")
        for name, value in (
            ("certify_every_n_train_steps", certify_every_n_train_steps),
            ("seqlip_every_n_train_steps", seqlip_every_n_train_steps),
        ):
            if value is not None and (not isinstance(value, int) or value < 0):
                raise ValueError(f"{name} must be an int >= 0 or None, got {value!r}.")
        if not isinstance(lower_bound_points, int) or lower_bound_points < 0:
            raise ValueError(f"lower_bound_points must be an int >= 0, got {lower_bound_points!r}.")
        if certify_every_n_train_steps is None:
            certify_every_n_train_steps = 10 * every_n_train_steps if every_n_train_steps else 0
        if seqlip_every_n_train_steps is None:
            seqlip_every_n_train_steps = 10 * every_n_train_steps if every_n_train_steps else 0
        self.methods = methods
        self.every_n_train_steps = every_n_train_steps
        self.every_n_epochs = every_n_epochs
        self.input_shape = check_input_shape(input_shape) if input_shape is not None else None
        self.model_attr = model_attr
        self.tol, self.max_iter = tol, max_iter
        self.certify_every_n_train_steps = certify_every_n_train_steps
        self.seqlip_every_n_train_steps = seqlip_every_n_train_steps
        self._methods_arg = tuple(methods) if methods is not None else ("auto",)
        self.seqlip_method, self.seqlip_top_k = seqlip_method, seqlip_top_k
        self.lower_bound_points = lower_bound_points
        self.certify_dense_limit = certify_dense_limit
        self.log_layers = log_layers
        self.on_nonfinite = on_nonfinite
        self.seed = seed
        self._autolip_state: dict[str, Tensor] = {}
        self._seqlip_state: dict[str, Tensor] = {}
        self._estimator: AutoLip | None = None
        self._last_step = -1
        self._last_batch: Tensor | None = None
        self.last_metrics: dict[str, float] = {}

    # ------------------------------------------------------------------ Lightning plumbing
    @property
    def state_key(self) -> str:
        return self._generate_state_key(
            methods=self._methods_arg,  # constructor arguments: stable across _prepare()
            every_n_train_steps=self.every_n_train_steps,
            every_n_epochs=self.every_n_epochs,
        )

    def state_dict(self) -> dict[str, Any]:
        """Plain tensors and numbers only (checkpoints load with ``weights_only=True``)."""
        if self._estimator is not None:
            self._autolip_state = self._estimator.state
        return {
            "version": _STATE_VERSION,
            "input_shape": list(self.input_shape) if self.input_shape is not None else None,
            "methods": list(self.methods) if self.methods is not None else None,
            "autolip": {k: v.detach().cpu() for k, v in self._autolip_state.items()},
            "seqlip": {k: v.detach().cpu() for k, v in self._seqlip_state.items()},
            "last_step": self._last_step,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        version = state_dict.get("version", 0)
        if version > _STATE_VERSION:
            raise ValueError(
                f"this LipschitzCallback state has version {version}, newer than this lipreg "
                f"({_STATE_VERSION}); upgrade lipreg to resume from it."
            )
        if self.input_shape is None and state_dict.get("input_shape"):
            self.input_shape = tuple(state_dict["input_shape"])
        if self.methods is None and state_dict.get("methods"):
            self.methods = list(state_dict["methods"])
        self._autolip_state = dict(state_dict.get("autolip", {}))
        self._seqlip_state = dict(state_dict.get("seqlip", {}))
        self._last_step = int(state_dict.get("last_step", -1))
        self._estimator = None

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # After configure_model() (which runs after setup()), before the first step:
        # configuration mistakes surface here, before any training.
        if self.input_shape is not None:
            self._prepare(self._network(pl_module))

    def on_train_batch_start(
        self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int
    ) -> None:
        x = _first_tensor(batch)
        if self.input_shape is None:
            if x is None:
                raise ValueError(
                    "LipschitzCallback could not infer input_shape: the training batch holds "
                    "no tensor. Pass input_shape=(...) (one sample, no batch dimension)."
                )
            self.input_shape = tuple(x.shape[1:])
            self._prepare(self._network(pl_module))
        if x is not None and "lower_bound" in (self.methods or ()):
            self._last_batch = x.detach()

    def on_train_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        step = trainer.global_step
        if self.should_compute(step, trainer.current_epoch) and step != self._last_step:
            self._compute_and_log(trainer, pl_module, step, epoch_end=False)

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        n = self.every_n_epochs
        if n and (trainer.current_epoch + 1) % n == 0 and trainer.global_step != self._last_step:
            self._compute_and_log(trainer, pl_module, trainer.global_step, epoch_end=True)

    def should_compute(self, step: int, epoch: int) -> bool:
        """Whether to estimate after optimizer step ``step``; override for other schedules."""
        cadences = (
            self.every_n_train_steps,
            self.certify_every_n_train_steps,
            self.seqlip_every_n_train_steps,
        )
        return step > 0 and any(n and step % n == 0 for n in cadences)

    def _due(self, cadence: int | None, step: int, epoch_end: bool) -> bool:
        return epoch_end or (bool(cadence) and step % cadence == 0)

    # ------------------------------------------------------------------ the work
    def _network(self, pl_module: LightningModule) -> nn.Module:
        if self.model_attr is None:
            return pl_module
        net = getattr(pl_module, self.model_attr, None)
        if not isinstance(net, nn.Module):
            raise ValueError(
                f"model_attr={self.model_attr!r}: the LightningModule has no nn.Module "
                "attribute of that name."
            )
        return net

    def _prepare(self, network: nn.Module) -> None:
        """Trace once and resolve the default methods; raises on unsupported models."""
        self._estimator = AutoLip(
            network,
            self.input_shape,
            certify=False,
            tol=self.tol,
            max_iter=self.max_iter,
            seed=self.seed,
            state=self._autolip_state,
        )
        from lipreg.functional.graph import analyse
        from lipreg.functional.seqlip import _segment

        # raises for unsupported ops; reuses the estimator's trace
        analysis = analyse(network, self.input_shape, traced=self._estimator._traced)
        if self.methods is None or "seqlip" in self.methods:
            try:
                _segment(analysis)
                sequential = True
            except NotSequentialError as exc:
                if self.methods is not None:
                    raise ValueError(f"LipschitzCallback(methods={self.methods}): {exc}") from exc
                sequential = False
                rank_zero_info("LipschitzCallback: the network is not sequential; SeqLip off.")
            if self.methods is None:
                self.methods = ["autolip", "seqlip"] if sequential else ["autolip"]

    def _compute_and_log(
        self, trainer: Trainer, pl_module: LightningModule, step: int, epoch_end: bool
    ) -> None:
        network = self._network(pl_module)
        if self._estimator is None:
            self._prepare(network)
        metrics = self._compute(network, step, epoch_end)
        # Same numbers on every rank (collective: every rank reaches this line at this step).
        metrics = trainer.strategy.broadcast(metrics, src=0)
        self.last_metrics = metrics
        self._last_step = step
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)
        for key, value in metrics.items():
            trainer.callback_metrics[key] = torch.tensor(value, dtype=torch.float64)

    def _compute(self, network: nn.Module, step: int, epoch_end: bool) -> dict[str, float]:
        metrics: dict[str, float] = {}
        device_type = next(network.parameters(), torch.zeros(())).device.type
        try:
            with torch.autocast(device_type=device_type, enabled=False):
                metrics.update(self._estimate(network, step, epoch_end))
        except ValueError as exc:
            if "non-finite" not in str(exc):
                raise
            self._nonfinite(str(exc))
            metrics = {f"lipschitz/{m}": math.nan for m in self.methods or ("autolip",)}
        bad = [k for k, v in metrics.items() if not math.isfinite(v)]
        if bad and metrics:
            self._nonfinite(f"non-finite Lipschitz values at step {step}: {bad}")
        return metrics

    def _estimate(self, network: nn.Module, step: int, epoch_end: bool) -> dict[str, float]:
        assert self._estimator is not None and self.input_shape is not None
        metrics: dict[str, float] = {}
        methods = self.methods or ["autolip"]
        al = None
        if "autolip" in methods and self._due(self.every_n_train_steps, step, epoch_end):
            start = time.perf_counter()
            al = self._estimator()
            metrics["lipschitz/autolip"] = al.value
            metrics["lipschitz/autolip_iterations"] = float(al.n_iter)
            metrics["lipschitz/autolip_time_s"] = time.perf_counter() - start
            if self.log_layers:
                for lb in al.layers:
                    if lb.kind == "affine":
                        metrics[f"lipschitz/layer/{lb.name.replace(' -> ', '+')}"] = lb.value
        if "autolip" in methods and self._due(self.certify_every_n_train_steps, step, epoch_end):
            start = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                cert = autolip(
                    network,
                    self.input_shape,
                    certify=True,
                    dense_limit=self.certify_dense_limit,
                    state=self._estimator.state,
                    tol=self.tol,
                )
            if cert.certified:
                metrics["lipschitz/autolip_certified"] = cert.value
                metrics["lipschitz/autolip_certified_time_s"] = time.perf_counter() - start
            else:  # say so rather than log an estimate under a "certified" key
                rank_zero_warn(f"LipschitzCallback: could not certify AutoLip: {cert.notes}")
        if "seqlip" in methods and self._due(self.seqlip_every_n_train_steps, step, epoch_end):
            start = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                sl = seqlip(
                    network,
                    self.input_shape,
                    method=self.seqlip_method,
                    top_k=self.seqlip_top_k,
                    state=self._seqlip_state,
                    seed=self.seed,
                    max_iter=30,
                )
            self._seqlip_state = sl.state
            metrics["lipschitz/seqlip"] = sl.value
            metrics["lipschitz/seqlip_iterations"] = float(sl.n_iter)
            metrics["lipschitz/seqlip_time_s"] = time.perf_counter() - start
            if al is not None and al.value > 0:
                metrics["lipschitz/seqlip_over_autolip"] = sl.value / al.value
        if "lower_bound" in methods and self._due(self.every_n_train_steps, step, epoch_end):
            start = time.perf_counter()
            lb = lower_bound(
                network,
                self.input_shape,
                inputs=self._last_batch,
                n_random=self.lower_bound_points,
                n_anneal_steps=10,
                n_chains=4,
                seed=self.seed,
            )
            metrics["lipschitz/lower_bound"] = lb.value
            metrics["lipschitz/lower_bound_time_s"] = time.perf_counter() - start
        return metrics

    def _nonfinite(self, message: str) -> None:
        if self.on_nonfinite == "raise":
            raise FloatingPointError(message)
        rank_zero_warn(f"LipschitzCallback: {message} (logged as NaN; training goes on).")


def _first_tensor(batch: Any) -> Tensor | None:
    if isinstance(batch, Tensor):
        return batch
    if isinstance(batch, dict):
        batch = list(batch.values())
    if isinstance(batch, list | tuple):
        for item in batch:
            found = _first_tensor(item)
            if found is not None:
                return found
    return None
