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

**It never breaks a fit.** Every option is validated (types included) when the callback is
constructed. Everything that can go wrong later — finding the network or its input, tracing,
one of the bounds — is reported once per cause with ``rank_zero_warn`` (what was expected,
what was found, what to do); the part that failed is switched off and training goes on. The
one documented way to make the callback raise is ``on_nonfinite="raise"`` (NaN/Inf weights or
bounds).

The estimates never perturb training: the estimators use a private ``torch.Generator``, leave
parameters, gradients, buffers and train/eval modes untouched, and run in float32 (float64 for
certificates) outside autocast. Warm-start vectors are kept between calls and saved in
checkpoints, so a resumed run continues warm (vectors that no longer fit, e.g. after a change
of input size, are dropped with a note). Under DDP every rank computes the same values (same
weights, same seeded start vectors) and rank 0's are broadcast, so all ranks see identical
``callback_metrics``; loggers write once (rank 0).
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import re
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn

from lipreg.functional.autolip import AutoLip, autolip
from lipreg.functional.graph import (
    check_finite_parameters,
    evaluation_mode,
    has_forward,
    unwrap_compiled,
)
from lipreg.functional.lower_bound import lower_bound
from lipreg.functional.seqlip import NotSequentialError, seqlip

__all__ = ["SCHEDULED", "LipschitzCallback"]

_METHODS = ("autolip", "seqlip", "lower_bound")
#: What :meth:`LipschitzCallback.should_compute` schedules, one name per computation.
SCHEDULED = ("autolip", "autolip_certified", "seqlip", "lower_bound")
# Version 2: the checkpoint no longer fixes input_shape / methods of the resumed fit (they are
# re-derived); "input_shape" now records the shape the warm vectors belong to. Version 1
# states load (their "methods" entry is ignored).
_STATE_VERSION = 2
_PREFIX = "LipschitzCallback: "
_ATTR_PATH = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")
_MAX_MESSAGE = 1500  # long core messages (one line per unsupported node) are cut here


class _SwitchOff(Exception):
    """Internal: the callback cannot run for this fit; ``str(self)`` says why and what to do."""


class LipschitzCallback(Callback):
    """Monitor AutoLip / SeqLip / a lower bound of the model during training.

    **Which network.** ``model_attr=None`` bounds the LightningModule's own ``forward``;
    ``model_attr="net"`` (or a dotted path, ``"model.encoder"``) bounds that sub-network.
    ``torch.compile``d modules — the attribute itself or submodules inside it — are bounded
    through their original modules (``_orig_mod``), never through the compiled wrapper, and
    the wrappers the training uses are left untouched. A LightningModule without ``forward``
    (an autoencoder with ``encoder``/``decoder``, a GAN with ``generator``/``discriminator``)
    has no single function to bound: one warning lists its sub-networks and the
    ``model_attr=...`` to pick, and the callback switches itself off for that fit (no lower
    bound either: without a forward there is no function to bound). A ``forward`` that needs
    two inputs gets the same treatment (set ``model_attr`` to a one-input sub-network or wrap
    the network in a one-input module).

    **Which input.** Unless ``input_shape`` is given, it is inferred at the first training
    batch of every fit by checking candidates against a real forward: every floating-point
    tensor of the batch with a per-sample shape (dicts in any key order, tuples, lists,
    dataclasses, nested) is tried in order; the network is called on one sample of it, in
    eval mode under ``torch.no_grad()`` (every module's ``training`` flag and the global RNG
    are restored), and the first candidate whose forward succeeds and returns a tensor is the
    input. Labels (integer tensors, ``(B,)`` vectors, targets of the wrong width) are thereby
    rejected. The lower bound searches from the same tensor of every batch.

    **Which methods.** ``methods=None``: AutoLip, plus SeqLip when the network is sequential.
    When AutoLip refuses the network (a LayerNorm, attention, an LSTM, ``x * x``...: the core
    raises ``UnsupportedOperationError``/``TraceError`` naming the reason), one warning gives
    that reason and the callback falls back to ``lipschitz/lower_bound``, computable for any
    differentiable network. With explicit ``methods`` the refused ones are switched off (one
    warning) and the others run. ``methods=["lower_bound"]`` never traces the network.

    **Resuming.** ``input_shape`` (when not passed) and the default methods are re-derived at
    every fit, so a run resumed on data of another size bounds the new size; warm-start
    vectors of another input shape are dropped with a note (cold start).

    Args:
        methods: any of ``"autolip"``, ``"seqlip"``, ``"lower_bound"`` (a string or a list).
            Default: AutoLip, plus SeqLip when the network is sequential.
        every_n_train_steps: compute after every ``n``-th optimizer step (``None``: never by
            steps).
        every_n_epochs: also compute at the end of every ``n``-th training epoch.
        input_shape: shape of ONE input without the batch dimension; inferred from the first
            training batch of each fit when omitted (see above).
        model_attr: attribute (dotted path allowed) of the LightningModule holding the
            network to bound; ``None`` bounds the LightningModule's own ``forward``.
        tol, max_iter: Lanczos tolerance (``> 0``) and iteration cap (``>= 1``) per layer.
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
        on_nonfinite: ``"warn"`` (log NaN, warn once, keep training) or ``"raise"``
            (``FloatingPointError``) when the weights or a bound are not finite.
        seed: seed (an int ``>= 0``) of the private generators.

    Raises:
        TypeError, ValueError: at construction, for an option of the wrong type or value
            (the message names the option, the value and what is accepted).
    """

    def __init__(
        self,
        methods: Sequence[str] | str | None = None,
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
        methods = _check_methods(methods)
        _check_int("every_n_train_steps", every_n_train_steps, minimum=1, allow_none=True)
        _check_int("every_n_epochs", every_n_epochs, minimum=1, allow_none=True)
        if every_n_train_steps is None and every_n_epochs is None:
            raise ValueError(
                f"{_PREFIX}every_n_train_steps and every_n_epochs are both None: the callback "
                "would never compute. Set every_n_train_steps (e.g. 50) and/or every_n_epochs."
            )
        shape = _check_input_shape(input_shape)
        _check_model_attr(model_attr)
        _check_number("tol", tol)
        _check_int("max_iter", max_iter, minimum=1)
        _check_int("certify_every_n_train_steps", certify_every_n_train_steps, 0, True)
        _check_int("seqlip_every_n_train_steps", seqlip_every_n_train_steps, 0, True)
        _check_choice("seqlip_method", seqlip_method, ("greedy", "exact"))
        _check_int("seqlip_top_k", seqlip_top_k, minimum=1, allow_none=True)
        _check_int("lower_bound_points", lower_bound_points, minimum=0)
        _check_int("certify_dense_limit", certify_dense_limit, minimum=0)
        if not isinstance(log_layers, bool):
            raise TypeError(
                f"{_PREFIX}log_layers must be True or False, got {log_layers!r} "
                f"({type(log_layers).__name__})."
            )
        _check_choice("on_nonfinite", on_nonfinite, ("warn", "raise"))
        _check_int("seed", seed, minimum=0)
        if certify_every_n_train_steps is None:
            certify_every_n_train_steps = 10 * every_n_train_steps if every_n_train_steps else 0
        if seqlip_every_n_train_steps is None:
            seqlip_every_n_train_steps = 10 * every_n_train_steps if every_n_train_steps else 0

        self._methods_requested: list[str] | None = methods
        self._input_shape_requested: tuple[int, ...] | None = shape
        self.methods: list[str] | None = list(methods) if methods is not None else None
        self.input_shape: tuple[int, ...] | None = shape
        self.every_n_train_steps = every_n_train_steps
        self.every_n_epochs = every_n_epochs
        self.model_attr = model_attr
        self.tol, self.max_iter = float(tol), max_iter
        self.certify_every_n_train_steps = certify_every_n_train_steps
        self.seqlip_every_n_train_steps = seqlip_every_n_train_steps
        self._methods_arg = tuple(methods) if methods is not None else ("auto",)
        self.seqlip_method, self.seqlip_top_k = seqlip_method, seqlip_top_k
        self.lower_bound_points = lower_bound_points
        self.certify_dense_limit = certify_dense_limit
        self.log_layers = log_layers
        self.on_nonfinite = on_nonfinite
        self.seed = seed
        # warm-start vectors, and the input shape they belong to
        self._autolip_state: dict[str, Tensor] = {}
        self._seqlip_state: dict[str, Tensor] = {}
        self._warm_shape: tuple[int, ...] | None = None
        self._last_step = -1
        self.last_metrics: dict[str, float] = {}
        self._reset_fit_state()

    def _reset_fit_state(self) -> None:
        """Per-fit state: everything derived from the model and the data of one fit."""
        self.input_shape = self._input_shape_requested
        self.methods = list(self._methods_requested) if self._methods_requested else None
        self._estimator: AutoLip | None = None
        self._network_cache: nn.Module | None = None
        self._prepared = False
        self._off = False  # the whole callback is switched off for this fit
        self._disabled: set[str] = set()  # parts switched off after a failure
        self._reported: set[str] = set()  # causes already warned about
        self._input_path: tuple[Any, ...] | None = None
        self._last_batch: Tensor | None = None

    # ------------------------------------------------------------------ Lightning plumbing
    @property
    def state_key(self) -> str:
        return self._generate_state_key(
            methods=self._methods_arg,  # constructor arguments: stable across preparation
            every_n_train_steps=self.every_n_train_steps,
            every_n_epochs=self.every_n_epochs,
        )

    def state_dict(self) -> dict[str, Any]:
        """Plain tensors and numbers only (checkpoints load with ``weights_only=True``)."""
        if self._estimator is not None:
            self._autolip_state = self._estimator.state
            self._warm_shape = self.input_shape
        shape = self._warm_shape if self._warm_shape is not None else self.input_shape
        return {
            "version": _STATE_VERSION,
            "input_shape": list(shape) if shape is not None else None,
            "autolip": {k: v.detach().cpu() for k, v in self._autolip_state.items()},
            "seqlip": {k: v.detach().cpu() for k, v in self._seqlip_state.items()},
            "last_step": self._last_step,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the warm-start vectors (versions 1 and 2); the input shape and the
        default methods are re-derived by the resumed fit. A state this version cannot read
        (newer, or damaged) is ignored with a warning: the resumed fit starts cold."""
        self._estimator = None
        version = state_dict.get("version", 0) if isinstance(state_dict, dict) else None
        problem = None
        if not isinstance(version, int) or version > _STATE_VERSION:
            problem = f"has version {version!r}; this lipreg reads versions 1 to {_STATE_VERSION}"
        else:
            try:
                shape = state_dict.get("input_shape")
                warm_shape = tuple(int(s) for s in shape) if shape else None
                autolip_state = {str(k): v for k, v in dict(state_dict.get("autolip", {})).items()}
                seqlip_state = {str(k): v for k, v in dict(state_dict.get("seqlip", {})).items()}
                if not all(isinstance(v, Tensor) for v in (autolip_state | seqlip_state).values()):
                    raise TypeError("warm-start entries that are not tensors")
                last_step = int(state_dict.get("last_step", -1))
            except Exception as exc:
                problem = f"cannot be read ({_describe(exc, 300)})"
        if problem is not None:
            rank_zero_warn(
                f"{_PREFIX}the checkpoint's LipschitzCallback state {problem}. Its warm-start "
                "vectors are ignored (the estimates start cold); training resumes normally. "
                "Upgrade lipreg to use them if the checkpoint comes from a newer version."
            )
            return
        self._warm_shape = warm_shape
        self._autolip_state, self._seqlip_state = autolip_state, seqlip_state
        self._last_step = last_step

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # Checkpoint state (if any) is already loaded; everything else is derived anew.
        if self._estimator is not None:  # a second fit() with the same callback
            self._autolip_state = self._estimator.state
            self._warm_shape = self.input_shape
        self._reset_fit_state()

    def on_train_batch_start(
        self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if not self._prepared:
            self._prepare_safely(pl_module, batch)
        if self._off or "lower_bound" not in self._active():
            return
        x = _at_path(batch, self._input_path) if self._input_path is not None else None
        ok = isinstance(x, Tensor) and tuple(x.shape[1:]) == self.input_shape
        self._last_batch = x.detach() if ok else None  # type: ignore[union-attr]

    def on_train_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        step = trainer.global_step
        if step == self._last_step:
            return
        due = {m for m in SCHEDULED if self.should_compute(m, step, trainer.current_epoch)}
        if due:
            self._compute_and_log(trainer, pl_module, step, due)

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        n = self.every_n_epochs
        if n and (trainer.current_epoch + 1) % n == 0 and trainer.global_step != self._last_step:
            self._compute_and_log(trainer, pl_module, trainer.global_step, set(SCHEDULED))

    def should_compute(self, method: str, step: int, epoch: int) -> bool:
        """Whether ``method`` runs after optimizer step ``step`` of epoch ``epoch``.

        The one schedule gate: ``method`` is one of :data:`SCHEDULED` (``"autolip"``,
        ``"autolip_certified"``, ``"seqlip"``, ``"lower_bound"``). The default follows the
        step cadences of the constructor; override it for any other schedule (the callback
        computes exactly what it returns ``True`` for). Epoch ends selected by
        ``every_n_epochs`` compute every method.
        """
        cadence = {
            "autolip": self.every_n_train_steps,
            "autolip_certified": self.certify_every_n_train_steps,
            "seqlip": self.seqlip_every_n_train_steps,
            "lower_bound": self.every_n_train_steps,
        }[method]
        return step > 0 and bool(cadence) and step % cadence == 0

    def _active(self) -> list[str]:
        return [m for m in (self.methods or ()) if m not in self._disabled]

    # ------------------------------------------------------------------ reporting
    def _report(self, cause: str, message: str) -> None:
        """Warn once per cause (rank zero)."""
        if cause in self._reported:
            return
        self._reported.add(cause)
        rank_zero_warn(_PREFIX + message)

    def _switch_off(self, message: str) -> None:
        self._off = True
        self._report("off", f"{message} The callback is off for this fit; training continues.")

    # ------------------------------------------------------------------ preparation
    def _prepare_safely(self, pl_module: LightningModule, batch: Any) -> None:
        """Find the network, its input and the methods; never raises."""
        self._prepared = True
        try:
            with torch.autocast(device_type=_device_type(pl_module), enabled=False):
                self._prepare(pl_module, batch)
        except _SwitchOff as exc:
            self._switch_off(str(exc))
        except Exception as exc:
            self._switch_off(
                f"preparing the bounds failed unexpectedly: {_describe(exc)}. Please report "
                "this to lipreg with the model; meanwhile pass input_shape=/model_attr= "
                "explicitly or remove the callback."
            )

    def _prepare(self, pl_module: LightningModule, batch: Any) -> None:
        network = self._network(pl_module)
        candidates = list(_tensors(batch))
        if self._input_shape_requested is None:
            self._input_path, self.input_shape = _infer_input(network, candidates)
        else:
            _check_given_input(network, self._input_shape_requested, candidates)
            self._input_path = next(
                (p for p, t in candidates if tuple(t.shape[1:]) == self.input_shape), None
            )
        self._drop_stale_warm_vectors()
        requested = self._methods_requested
        if requested is None or {"autolip", "seqlip"} & set(requested):
            self._prepare_autolip(network, requested)
        if "lower_bound" in self._active() and self._input_path is None:
            self._report(
                "lower_bound_inputs",
                f"no tensor of the training batch has per-sample shape {self.input_shape} "
                f"(found {_describe_candidates(candidates)}); lipschitz/lower_bound searches "
                "from random points only. Pass the input_shape of the network's real input to "
                "search from the data too.",
            )
        if not self._active():
            raise _SwitchOff("no method is left to compute (see the warning above).")

    def _network(self, pl_module: LightningModule) -> nn.Module:
        """The module to bound, compiled wrappers removed; raises :class:`_SwitchOff`."""
        if self._network_cache is not None:
            return self._network_cache
        root = unwrap_compiled(pl_module)
        owner_name = type(root).__name__
        if self.model_attr is None:
            net, what = root, f"{owner_name} (the LightningModule)"
        else:
            net = root
            for part in self.model_attr.split("."):
                net = getattr(unwrap_compiled(net), part, None)
                if net is None:
                    break
            if not isinstance(net, nn.Module):
                found = "nothing" if net is None else f"a {type(net).__name__}"
                raise _SwitchOff(
                    f"model_attr={self.model_attr!r}: expected an nn.Module attribute of "
                    f"{owner_name}, found {found}. {_subnetworks_hint(root)}"
                )
            net = unwrap_compiled(net)
            what = f"{owner_name}.{self.model_attr} ({type(net).__name__})"
        if not has_forward(net):
            raise _SwitchOff(
                f"{what} has no forward(), so there is no single network to bound. "
                f"{_subnetworks_hint(net)}"
            )
        n_inputs = _required_inputs(net)
        if n_inputs is not None and n_inputs != 1:
            raise _SwitchOff(
                f"{what}.forward takes {n_inputs} required inputs "
                f"({_signature_text(net)}); a Lipschitz bound is for a network of ONE tensor "
                "input. Set model_attr= to a one-input sub-network, or wrap the network in a "
                f"one-input nn.Module (fixing the other inputs). {_subnetworks_hint(root)}"
            )
        self._network_cache = net  # compiled submodules are traced through their eager code
        return net

    def _drop_stale_warm_vectors(self) -> None:
        warm = self._autolip_state or self._seqlip_state
        if warm and self._warm_shape is not None and self._warm_shape != self.input_shape:
            rank_zero_info(
                f"{_PREFIX}the saved warm-start vectors are for input shape {self._warm_shape}, "
                f"this fit's input shape is {self.input_shape}: dropped (cold start)."
            )
            self._autolip_state, self._seqlip_state = {}, {}
        self._warm_shape = self.input_shape

    def _prepare_autolip(self, network: nn.Module, requested: list[str] | None) -> None:
        """Trace once for AutoLip (and test SeqLip); on refusal fall back (see class doc)."""
        from lipreg.functional.graph import analyse
        from lipreg.functional.seqlip import segment_chains

        assert self.input_shape is not None
        name = type(network).__name__
        try:
            self._estimator = AutoLip(
                network,
                self.input_shape,
                certify=False,
                tol=self.tol,
                max_iter=self.max_iter,
                seed=self.seed,
                state=self._autolip_state,
            )
            # raises for unsupported ops; reuses the estimator's trace
            analysis = analyse(network, self.input_shape, traced=self._estimator.traced)
        except Exception as exc:
            self._estimator = None
            reason = _describe(exc)
            if requested is None:
                self.methods = ["lower_bound"]
                self._report(
                    "autolip_refused",
                    f"AutoLip cannot bound {name} at input shape {self.input_shape}: {reason}\n"
                    "Falling back to lipschitz/lower_bound (a certified lower bound, "
                    "computable for any differentiable network); no upper bound is logged. "
                    "To bound a supported part, set model_attr= to it.",
                )
            else:
                dropped = [m for m in requested if m in ("autolip", "seqlip")]
                self._disabled.update(dropped)
                rest = [m for m in requested if m not in dropped]
                message = (
                    f"AutoLip cannot bound {name} at input shape {self.input_shape}: {reason}\n"
                    "methods=['lower_bound'] works for any differentiable network."
                )
                if not rest:  # one warning: the cause, and that the callback is off
                    raise _SwitchOff(message) from exc
                self._report(
                    "autolip_refused",
                    f"{message} Switched off {dropped} for this fit; {rest} still run.",
                )
            return
        if requested is None or "seqlip" in requested:
            try:
                segment_chains(analysis)
                sequential = True
            except NotSequentialError as exc:
                sequential = False
                if requested is not None:
                    self._disabled.add("seqlip")
                    self._report(
                        "seqlip_refused",
                        f"methods={requested} asks for SeqLip, but {exc} SeqLip is off for "
                        "this fit; AutoLip bounds any graph.",
                    )
                else:
                    rank_zero_info(f"{_PREFIX}{name} is not sequential; SeqLip off.")
            if requested is None:
                self.methods = ["autolip", "seqlip"] if sequential else ["autolip"]

    # ------------------------------------------------------------------ the work
    def _compute_and_log(
        self, trainer: Trainer, pl_module: LightningModule, step: int, due: set[str]
    ) -> None:
        metrics: dict[str, float] = {}
        if self._prepared and not self._off and self._network_cache is not None:
            network = self._network_cache
            with torch.autocast(device_type=_device_type(network), enabled=False):
                metrics = self._compute(network, step, due)
        # Same numbers on every rank (collective: every rank reaches this line at this step,
        # even with the callback off, so that a rank-dependent failure cannot hang DDP).
        metrics = trainer.strategy.broadcast(metrics, src=0)
        self._last_step = step
        if not metrics:
            return
        self.last_metrics = metrics
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)
        for key, value in metrics.items():
            trainer.callback_metrics[key] = torch.tensor(value, dtype=torch.float64)

    def _compute(self, network: nn.Module, step: int, due: set[str]) -> dict[str, float]:
        active = self._active()
        tasks: list[tuple[str, Callable[[], dict[str, float]]]] = []
        if "autolip" in active and self._estimator is not None:
            if "autolip" in due:
                tasks.append(("autolip", self._autolip_estimate))
            if "autolip_certified" in due and "autolip_certified" not in self._disabled:
                tasks.append(("autolip_certified", lambda: self._autolip_certified(network)))
        if "seqlip" in active and "seqlip" in due:
            tasks.append(("seqlip", lambda: self._seqlip(network)))
        if "lower_bound" in active and "lower_bound" in due:
            tasks.append(("lower_bound", lambda: self._lower_bound(network)))
        if not tasks:
            return {}
        try:
            check_finite_parameters(network)
        except ValueError as exc:
            self._nonfinite(f"at step {step}: {exc}")
            return {f"lipschitz/{name}": math.nan for name, _ in tasks}

        metrics: dict[str, float] = {}
        nonfinite: list[str] = []
        for name, task in tasks:
            try:
                metrics.update(self._run(name, task))
            except Exception as exc:
                if isinstance(exc, ValueError) and "non-finite" in str(exc):
                    metrics[f"lipschitz/{name}"] = math.nan
                    nonfinite.append(str(exc))
                    continue
                self._disabled.add(name)
                label = f"lipschitz/{name}"
                self._report(
                    f"failed:{name}",
                    f"computing {label} failed at step {step}: {_describe(exc)}\n{label} is "
                    "switched off for the rest of this fit; the other bounds and training "
                    f"continue. To silence this, leave {name!r} out of methods=.",
                )
        if "lipschitz/seqlip" in metrics and metrics.get("lipschitz/autolip", 0.0) > 0:
            metrics["lipschitz/seqlip_over_autolip"] = (
                metrics["lipschitz/seqlip"] / metrics["lipschitz/autolip"]
            )
        bad = [k for k, v in metrics.items() if not math.isfinite(v)]
        if bad or nonfinite:
            detail = "; ".join(nonfinite) if nonfinite else ""
            self._nonfinite(f"non-finite Lipschitz values at step {step}: {bad}. {detail}")
        return metrics

    def _run(self, name: str, task: Callable[[], dict[str, float]]) -> dict[str, float]:
        """Run one method; if it fails while warm-started, retry it once from a cold start
        (warm vectors that no longer fit the network must not switch a method off)."""
        if name == "seqlip":
            warm = bool(self._seqlip_state)
        elif name.startswith("autolip") and self._estimator is not None:
            warm = bool(self._estimator.state)
        else:
            warm = False
        try:
            return task()
        except Exception as exc:
            if not warm or "non-finite" in str(exc):
                raise
            rank_zero_info(
                f"{_PREFIX}{name} failed with the warm-start vectors ({_describe(exc, 300)}); "
                "they were dropped and it is retried from a cold start."
            )
            if name == "seqlip":
                self._seqlip_state = {}
            elif self._estimator is not None:
                self._estimator.state = {}
            return task()

    def _autolip_estimate(self) -> dict[str, float]:
        assert self._estimator is not None
        start = time.perf_counter()
        al = self._estimator()
        metrics = {
            "lipschitz/autolip": al.value,
            "lipschitz/autolip_iterations": float(al.n_iter),
            "lipschitz/autolip_time_s": time.perf_counter() - start,
        }
        if self.log_layers:
            for lb in al.layers:
                if lb.kind == "affine":
                    metrics[f"lipschitz/layer/{lb.name.replace(' -> ', '+')}"] = lb.value
        return metrics

    def _autolip_certified(self, network: nn.Module) -> dict[str, float]:
        assert self._estimator is not None and self.input_shape is not None
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
                max_iter=self.max_iter,
                seed=self.seed,
                traced=self._estimator.traced,
            )
        if not cert.certified:  # say so rather than log an estimate under a "certified" key
            self._disabled.add("autolip_certified")
            self._report(
                "not_certified",
                f"AutoLip could not be certified: {' '.join(cert.notes)} "
                "lipschitz/autolip_certified is off for this fit (raise certify_dense_limit, "
                "or register a rule with certify= for that layer); lipschitz/autolip goes on.",
            )
            return {}
        return {
            "lipschitz/autolip_certified": cert.value,
            "lipschitz/autolip_certified_time_s": time.perf_counter() - start,
        }

    def _seqlip(self, network: nn.Module) -> dict[str, float]:
        assert self.input_shape is not None
        start = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            sl = seqlip(
                network,
                self.input_shape,
                method=self.seqlip_method,  # type: ignore[arg-type]
                top_k=self.seqlip_top_k,
                state=self._seqlip_state,
                seed=self.seed,
                max_iter=30,
            )
        self._seqlip_state = sl.state
        return {
            "lipschitz/seqlip": sl.value,
            "lipschitz/seqlip_iterations": float(sl.n_iter),
            "lipschitz/seqlip_time_s": time.perf_counter() - start,
        }

    def _lower_bound(self, network: nn.Module) -> dict[str, float]:
        assert self.input_shape is not None
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
        return {
            "lipschitz/lower_bound": lb.value,
            "lipschitz/lower_bound_time_s": time.perf_counter() - start,
        }

    def _nonfinite(self, message: str) -> None:
        if self.on_nonfinite == "raise":
            raise FloatingPointError(_PREFIX + message)
        self._report(
            "nonfinite",
            f"{message.strip()} Logged as NaN; training goes on (this is reported once). "
            "Check the learning rate / loss scaling, or pass on_nonfinite='raise' to stop the "
            "run at the first non-finite value.",
        )


# ---------------------------------------------------------------------- option checks
def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_int(name: str, value: Any, minimum: int, allow_none: bool = False) -> None:
    accepted = f"an int >= {minimum}" + (" or None" if allow_none else "")
    if value is None and allow_none:
        return
    if not _is_int(value):
        raise TypeError(
            f"{_PREFIX}{name} must be {accepted}, got {value!r} ({type(value).__name__})."
        )
    if value < minimum:
        raise ValueError(f"{_PREFIX}{name} must be {accepted}, got {value!r}.")


def _check_number(name: str, value: Any) -> None:
    accepted = "a positive finite number (e.g. 1e-4)"
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise TypeError(
            f"{_PREFIX}{name} must be {accepted}, got {value!r} ({type(value).__name__})."
        )
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{_PREFIX}{name} must be {accepted}, got {value!r}.")


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if not isinstance(value, str):
        raise TypeError(
            f"{_PREFIX}{name} must be one of {list(choices)}, got {value!r} "
            f"({type(value).__name__})."
        )
    if value not in choices:
        raise ValueError(f"{_PREFIX}{name} must be one of {list(choices)}, got {value!r}.")


def _check_methods(methods: Any) -> list[str] | None:
    accepted = f"None, one of {list(_METHODS)} or a non-empty list of them"
    if methods is None:
        return None
    if isinstance(methods, str):
        methods = [methods]
    if not isinstance(methods, Sequence) and not isinstance(methods, set | frozenset):
        raise TypeError(
            f"{_PREFIX}methods must be {accepted}, got {methods!r} ({type(methods).__name__})."
        )
    methods = list(methods)
    if not all(isinstance(m, str) for m in methods):
        raise TypeError(f"{_PREFIX}methods must be {accepted}, got {methods!r}.")
    unknown = [m for m in methods if m not in _METHODS]
    if unknown or not methods:
        raise ValueError(f"{_PREFIX}methods must be {accepted}, got {methods!r}.")
    return list(dict.fromkeys(methods))  # order kept, duplicates dropped


def _check_input_shape(input_shape: Any) -> tuple[int, ...] | None:
    if input_shape is None:
        return None
    accepted = (
        "None (inferred from the batch) or a non-empty tuple of positive ints: the shape of "
        "ONE input without the batch dimension, e.g. (1, 28, 28)"
    )
    if _is_int(input_shape):
        input_shape = (input_shape,)
    if isinstance(input_shape, str | bytes) or not isinstance(input_shape, Sequence):
        raise TypeError(
            f"{_PREFIX}input_shape must be {accepted}; got {input_shape!r} "
            f"({type(input_shape).__name__})."
        )
    if not input_shape or not all(_is_int(s) and s > 0 for s in input_shape):
        raise ValueError(f"{_PREFIX}input_shape must be {accepted}; got {input_shape!r}.")
    return tuple(int(s) for s in input_shape)


def _check_model_attr(model_attr: Any) -> None:
    accepted = "None or the name of an nn.Module attribute of the LightningModule ('net', 'a.b')"
    if model_attr is None:
        return
    if not isinstance(model_attr, str):
        raise TypeError(
            f"{_PREFIX}model_attr must be {accepted}, got {model_attr!r} "
            f"({type(model_attr).__name__})."
        )
    if not _ATTR_PATH.match(model_attr):
        raise ValueError(f"{_PREFIX}model_attr must be {accepted}, got {model_attr!r}.")


# ---------------------------------------------------------------------- networks
def _required_inputs(module: nn.Module) -> int | None:
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


def _signature_text(module: nn.Module) -> str:
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


def _subnetworks_hint(module: nn.Module) -> str:
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


def _device_type(module: nn.Module) -> str:
    first = next(iter(list(module.parameters()) + list(module.buffers())), None)
    return first.device.type if first is not None else "cpu"


# ---------------------------------------------------------------------- batches and inputs
def _tensors(batch: Any, path: tuple[Any, ...] = ()) -> Iterator[tuple[tuple[Any, ...], Tensor]]:
    """Every tensor of a batch with its path (keys/indices/attribute names), in order."""
    if isinstance(batch, Tensor):
        yield path, batch
    elif isinstance(batch, Mapping):
        for key, value in batch.items():
            yield from _tensors(value, (*path, key))
    elif isinstance(batch, list | tuple):
        for i, value in enumerate(batch):
            yield from _tensors(value, (*path, i))
    elif dataclasses.is_dataclass(batch) and not isinstance(batch, type):
        for f in dataclasses.fields(batch):
            yield from _tensors(getattr(batch, f.name), (*path, f"@{f.name}"))


def _at_path(batch: Any, path: tuple[Any, ...]) -> Any:
    for key in path:
        try:
            if isinstance(key, str) and key.startswith("@") and not isinstance(batch, Mapping):
                batch = getattr(batch, key[1:])
            else:
                batch = batch[key]
        except (KeyError, IndexError, TypeError, AttributeError):
            return None
    return batch


def _path_text(path: tuple[Any, ...]) -> str:
    text = "batch"
    for key in path:
        if isinstance(key, str) and key.startswith("@"):
            text += f".{key[1:]}"
        else:
            text += f"[{key!r}]"
    return text


def _describe_candidates(candidates: list[tuple[tuple[Any, ...], Tensor]]) -> str:
    if not candidates:
        return "no tensor"
    return ", ".join(
        f"{_path_text(p)}: {str(t.dtype).replace('torch.', '')} {tuple(t.shape)}"
        for p, t in candidates
    )


def _try_forward(network: nn.Module, x: Tensor) -> str | None:
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
        return f"forward raised {_describe(exc, limit=300)}"
    if not isinstance(out, Tensor):
        return f"forward returned a {type(out).__name__}, not a tensor"
    return None


def _check_given_input(
    network: nn.Module,
    input_shape: tuple[int, ...],
    candidates: list[tuple[tuple[Any, ...], Tensor]],
) -> None:
    """Raise :class:`_SwitchOff` when ``network`` does not accept ``input_shape``."""
    problem = _try_forward(network, torch.zeros(1, *input_shape))
    if problem is not None:
        raise _SwitchOff(
            f"input_shape={input_shape} does not fit {type(network).__name__}: on an input "
            f"of shape {(1, *input_shape)} its {problem}. The training batch holds "
            f"{_describe_candidates(candidates)}. Pass the shape of ONE input without the "
            "batch dimension, or omit input_shape to infer it from the batch."
        )


def _infer_input(
    network: nn.Module, candidates: list[tuple[tuple[Any, ...], Tensor]]
) -> tuple[tuple[Any, ...], tuple[int, ...]]:
    """Path and per-sample shape of the first batch tensor the network accepts."""
    tried: list[str] = []
    for path, x in candidates:
        where = f"{_path_text(path)} ({str(x.dtype).replace('torch.', '')} {tuple(x.shape)})"
        if not x.is_floating_point():
            tried.append(f"{where}: not floating-point (a label or token ids?)")
            continue
        if x.ndim < 2 or x.shape[0] == 0:
            tried.append(f"{where}: no per-sample shape (a (B,) vector or an empty batch)")
            continue
        problem = _try_forward(network, x)
        if problem is not None:
            tried.append(f"{where}: {problem}")
            continue
        return path, tuple(int(s) for s in x.shape[1:])
    found = "\n  - ".join(tried) if tried else "the batch holds no tensor"
    raise _SwitchOff(
        f"could not find the input of {type(network).__name__} in the training batch: a "
        "floating-point tensor on which forward() returns a tensor. Tried:\n  - "
        f"{found}\nPass input_shape=(...) (one sample, no batch dimension), and model_attr= "
        "if the network to bound is a sub-network."
    )


def _describe(exc: BaseException, limit: int = _MAX_MESSAGE) -> str:
    text = f"{type(exc).__name__}: {exc}".strip()
    return text if len(text) <= limit else text[: limit - 5] + " [...]"
