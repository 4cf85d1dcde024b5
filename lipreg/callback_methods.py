"""The work behind each row of :class:`lipreg.LipschitzCallback`'s method table.

:data:`METHOD_TABLE` lists the callback's computations (one :class:`Method` per logged
``lipschitz/<name>``, with its cadence, warm-start vectors, whether the cost budget may skip
it, and the cost assumed before its first run); :class:`MethodWork` is the part of the
callback that runs one of them (warm retry, timing for the budget) and the methods
themselves. A new computation is one row here plus one method of :class:`MethodWork` (or of
a subclass of the callback); the budget (:mod:`lipreg.callback_budget`) then measures it and
schedules it like the others.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn

from lipreg.callback_budget import CostBudget
from lipreg.callback_inputs import describe
from lipreg.callback_options import PREFIX
from lipreg.callback_records import Computed, Method, layer_key, metric_values
from lipreg.functional.autolip import AutoLip, autolip
from lipreg.functional.lower_bound import lower_bound
from lipreg.functional.results import LipschitzResult
from lipreg.functional.seqlip import seqlip
from lipreg.functional.tight import tighten

__all__ = ["FIT_END", "METHOD_TABLE", "SCHEDULED", "MethodWork"]


class MethodWork:
    """Running the rows of :data:`METHOD_TABLE` (mixed into the callback, whose options and
    per-fit state the methods read)."""

    budget: CostBudget
    input_shape: tuple[int, ...] | None
    log_layers: bool
    certify_dense_limit: int
    seqlip_method: str
    seqlip_top_k: int | None
    seqlip_max_iter: int
    lower_bound_points: int
    seed: int
    _estimator: AutoLip | None
    _seqlip_state: dict[str, Tensor]
    _tight_state: dict[str, Tensor]
    _last_batch: Tensor | None
    _fresh_cert: LipschitzResult | None  # the certificate of the current step, if any
    _disabled: set[str]
    tol: float
    max_iter: int
    _report: Callable[[str, str], None]  # warn once per cause (the callback's)

    def _iterations(self) -> dict[str, Any]:
        """The iteration options every AutoLip call of the callback shares."""
        return {"tol": self.tol, "max_iter": self.max_iter, "seed": self.seed}

    def _run(self, method: Method, network: nn.Module) -> dict[str, float]:
        """Run one method, time it (for the budget) and name its metrics; if it fails while
        warm-started, retry it once from a cold start (warm vectors that no longer fit the
        network must not switch a method off)."""
        compute = getattr(self, method.compute)
        clock = self.budget.clock
        start = clock()
        try:
            result = compute(network)
        except Exception as exc:
            if not self._is_warm(method.warm) or "non-finite" in str(exc):
                raise
            rank_zero_info(
                f"{PREFIX}{method.name} failed with the warm-start vectors "
                f"({describe(exc, 300)}); they were dropped and it is retried from a cold start."
            )
            self._drop_warm(method.warm)
            start = clock()
            result = compute(network)
        seconds = clock() - start
        self.budget.record(method, seconds)
        if result is None:
            return {}
        return metric_values(method.name, result, seconds)

    def _is_warm(self, kind: str | None) -> bool:
        if kind == "seqlip":
            return bool(self._seqlip_state)
        return kind == "autolip" and self._estimator is not None and bool(self._estimator.state)

    def _drop_warm(self, kind: str | None) -> None:
        if kind == "seqlip":
            self._seqlip_state = {}
        elif kind == "autolip" and self._estimator is not None:
            self._estimator.state = {}

    # ------------------------------------------------------------------ the methods
    def _autolip_estimate(self, network: nn.Module) -> Computed:
        assert self._estimator is not None
        al = self._estimator()
        layers = {layer_key(lb.name): lb.value for lb in al.layers if lb.kind == "affine"}
        return Computed(al.value, al.n_iter, layers if self.log_layers else {})

    def _certify(self, network: nn.Module) -> Computed | None:
        assert self._estimator is not None and self.input_shape is not None
        shape, traced = self.input_shape, self._estimator.traced
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            cert = autolip(
                network,
                shape,
                certify=True,
                dense_limit=self.certify_dense_limit,
                state=self._estimator.state,
                traced=traced,
                **self._iterations(),
            )
        if not cert.certified:  # say so rather than log an estimate under a "certified" key
            self._disabled.add("autolip_certified")
            self._report(
                "not_certified",
                f"AutoLip could not be certified: {' '.join(cert.notes)} "
                "lipschitz/autolip_certified is off for this fit (raise certify_dense_limit, "
                "or register a rule with certify= for that layer); lipschitz/autolip goes on.",
            )
            return None
        self._fresh_cert = cert
        return Computed(cert.value)

    def _tighten(self, network: nn.Module) -> Computed | None:
        """``lipschitz/certified``: the certificate of this step tightened by the dense
        LipSDP-Neuron blocks (up to 2048 neurons; multipliers warm-started from the last
        call; the Fourier conv pairs, seconds to minutes each, are left to
        ``lipreg.certified_bound``). Nothing without a certificate at this step."""
        cert = self._fresh_cert
        if cert is None:
            return None
        assert self._estimator is not None and self.input_shape is not None
        tight = tighten(
            network,
            self.input_shape,
            cert,
            methods=("lipsdp",),
            state=self._tight_state,
            traced=self._estimator.traced,
            max_lmi_size=2048,
        )
        self._tight_state = tight.state
        return Computed(tight.value)

    def _seqlip(self, network: nn.Module) -> Computed:
        assert self.input_shape is not None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            sl = seqlip(
                network,
                self.input_shape,
                method=self.seqlip_method,  # type: ignore[arg-type]
                top_k=self.seqlip_top_k,
                state=self._seqlip_state,
                seed=self.seed,
                max_iter=self.seqlip_max_iter,
            )
        self._seqlip_state = sl.state
        return Computed(sl.value, sl.n_iter)

    def _lower_bound(self, network: nn.Module) -> Computed:
        assert self.input_shape is not None
        lb = lower_bound(
            network,
            self.input_shape,
            inputs=self._last_batch,
            n_random=self.lower_bound_points,
            n_anneal_steps=10,
            n_chains=4,
            seed=self.seed,
        )
        return Computed(lb.value)


#: The callback's computations, in the order they run at one step (the certificate after the
#: estimate, so that it starts from the estimate's warm vectors). Columns: name, the entry of
#: methods= it belongs to, its cadence attribute, its warm-start vectors, the work, whether
#: the budget may skip it, and its assumed cost before the first run in multiples of the warm
#: estimate (measured on the MNIST MLP / CNN-4 of benchmarks/callback_budget.py: certificate
#: 45-220x, greedy SeqLip 1,300-2,800x, lower bound with 32 points 550-700x, the LipSDP
#: tightening of the MLP's 1000-neuron blocks thousands; rounded up, since a guess too high
#: only delays a first run). The estimate is the price of monitoring at all: it always runs
#: (and is counted). ``lipschitz/certified`` refines the certificate of the same step
#: (``needs``), so it is budgeted apart: the fit end's promise is the certificate alone.
METHOD_TABLE: dict[str, Method] = {
    m.name: m
    for m in (
        Method("autolip", "autolip", "every_n_train_steps", "autolip", "_autolip_estimate"),
        Method(
            "autolip_certified",
            "autolip",
            "certify_every_n_train_steps",
            "autolip",
            "_certify",
            budgeted=True,
            prior=300.0,
        ),
        Method(
            "certified",
            "autolip",
            "certify_every_n_train_steps",
            None,
            "_tighten",
            budgeted=True,
            prior=3000.0,
            needs="autolip_certified",
        ),
        Method(
            "seqlip",
            "seqlip",
            "seqlip_every_n_train_steps",
            "seqlip",
            "_seqlip",
            budgeted=True,
            prior=3000.0,
        ),
        Method(
            "lower_bound",
            "lower_bound",
            "every_n_train_steps",
            None,
            "_lower_bound",
            budgeted=True,
            prior=1000.0,
        ),
    )
}
#: What :meth:`LipschitzCallback.should_compute` schedules, one name per computation.
SCHEDULED = tuple(METHOD_TABLE)
#: What ``compute_at_fit_end`` adds at the end of a fit: the certified bound and its estimate.
FIT_END = ("autolip", "autolip_certified")
