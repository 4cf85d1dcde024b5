"""A differentiable AutoLip regulariser with warm-started power iteration (torch-style).

:class:`LipschitzPenalty` is an ``nn.Module`` owned by the LightningModule (or any training
loop). Calling it returns ``weight · f(L̂)``, a differentiable scalar to add to the loss, where
``L̂`` is AutoLip evaluated with the current layer-norm estimates

.. math::

    \\hat\\sigma_c = u_c^\\top A_c v_c , \\qquad u_c = \\frac{A_c v_c}{\\lVert A_c v_c \\rVert},

one per merged affine map ``A_c`` (Linear, Conv at its real input shape — the operator norm,
not the norm of the reshaped kernel —, conv → BN, ...). As in ``torch.nn.utils.parametrizations
.spectral_norm``, the vectors ``v_c`` are buffers refined under ``no_grad`` by a few power
iterations per call in training mode only, then cloned, so that the gradient is
``∂σ̂/∂A = u vᵀ`` (the gradient of the top singular value). After a cold start at construction
(Lanczos to ``tol``) one iteration per step keeps them converged.

**State.** One buffer per chain, named after the chain (:func:`buffer_name`:
``v_`` + the chain name with every character outside ``[0-9A-Za-z_]`` replaced by ``_``,
e.g. ``v_layer2_0_downsample_0_1`` for ``layer2.0.downsample[0+1]``), plus a versioned extra
state (``{"version": 2, "chains": [...], "buffers": [...]}``). Loading a state dict saved for
another architecture raises ``ValueError`` naming the expected and the found chains; a version-1
state dict (buffers ``v_0``, ``v_1``… by position, no extra state) loads when it holds one
vector per chain of the right size.

Forms (``form=``): ``"log"`` — ``Σ_c log σ̂_c`` (sum of log layer norms, scale-free);
``"linear"`` — ``L̂``; ``"hinge"`` — ``max(0, L̂ − target)`` (penalise only above a target).

**Sharded models** (FSDP2, ``torch.distributed.fsdp.fully_shard``; every rank calls the
penalty at the same point of its step, as for any collective): each merged map's parameters
are gathered in turn with ``DTensor.full_tensor()`` (differentiable; one map at a time, in
graph order), the power iteration runs on the gathered map and ``v`` is then rank 0's on
every rank (:func:`lipreg.functional.sharding.shared_from_first_rank`), so that every rank
computes the same ``σ̂_c`` and the gradient of ``loss + penalty`` reaching each shard is the
unsharded one. The buffers and the extra state are the unsharded ones (plain tensors, same
names). FSDP1 and ``method="seqlip"``/``"lipsdp"`` on sharded models are refused.

.. note:: ``L̂`` uses power-iteration values, which approach each norm from below: the penalty
   is a training signal, not a certified bound. Use :func:`lipreg.autolip` (or the callback)
   to *report* the certified bound.
"""

from __future__ import annotations

import contextlib
import math
import re
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn

from lipreg.functional.analysis import analyse
from lipreg.functional.chain_lmi import lipsdp_value
from lipreg.functional.chains import (
    AffineChain,
    SeqChain,
    chain_linear_map,
    find_affine_chains,
    segment_chains,
)
from lipreg.functional.compose import output_value, propagate
from lipreg.functional.linear_map import LinearMap
from lipreg.functional.lipsdp import lipsdp_neuron
from lipreg.functional.power_iteration import operator_norm
from lipreg.functional.seqlip_pairs import pair_matrices, pair_name, pair_norm_greedy
from lipreg.functional.sharding import (
    all_ranks_succeed,
    check_shardable,
    full_parameters,
    is_sharded,
    shared_from_first_rank,
)
from lipreg.functional.trace import check_input_shape, trace

__all__ = ["STATE_VERSION", "LipschitzPenalty", "buffer_name"]

_FORMS = ("log", "linear", "hinge")
STATE_VERSION = 2
"""Version of the penalty's extra state: 2 = buffers named by chain; 1 (no extra state) =
buffers ``v_0, v_1, …`` by position."""


def buffer_name(chain_name: str) -> str:
    """``v_`` + ``chain_name`` with every character outside ``[0-9A-Za-z_]`` replaced by ``_``
    (a buffer name may not contain ``.``), runs of them collapsed."""
    return "v_" + re.sub(r"[^0-9A-Za-z_]+", "_", chain_name).strip("_")


def _buffer_names(chain_names: list[str]) -> list[str]:
    """:func:`buffer_name` of each chain, made unique by ``_2``, ``_3``… in chain order."""
    names: list[str] = []
    for chain in chain_names:
        base = name = buffer_name(chain)
        k = 1
        while name in names:
            k += 1
            name = f"{base}_{k}"
        names.append(name)
    return names


class LipschitzPenalty(nn.Module):
    """Differentiable AutoLip penalty with warm-started power-iteration buffers.

    Args:
        model: the network to regularise (kept by reference, not registered as a submodule,
            so that the owner's ``state_dict`` holds its parameters once).
        input_shape: shape of ONE input, without the batch dimension.
        method: ``"autolip"``, or ``"seqlip"`` for sequential networks whose multi-layer
            SeqLip chains are small enough to materialise (smaller side ``≤ dense_limit``):
            the penalty is then ``Σ log`` (or the product) of the SeqLip pair norms
            ``‖Σ̃ Vᵀ diag(σ*) U Σ̃‖`` through differentiable SVDs, with the activation
            patterns ``σ*`` re-searched greedily (no gradient) at every training-mode call;
            or ``"lipsdp"`` (same networks): each multi-layer chain contributes the
            LipSDP-Neuron value ``√ρ*(T; W)`` (:func:`lipreg.functional.chain_lmi.lipsdp_value`,
            the tight certificate of :func:`lipreg.certified_bound`) for multipliers ``T``
            held fixed and re-optimised (warm, :func:`lipreg.functional.lipsdp.lipsdp_neuron`)
            every ``refresh_every`` training-mode calls, or at once when the weights moved
            out of ``T``'s feasible set.
        dense_limit: see ``method="seqlip"``.
        refresh_every: see ``method="lipsdp"``.
        weight: multiplier of the penalty.
        target: required by ``form="hinge"``.
        form: ``"log"``, ``"linear"`` or ``"hinge"`` (see the module docstring).
        n_power_iterations: power iterations per training-mode call (1 is enough warm).
        tol: tolerance of the cold start at construction.
        seed: seed of the private generator of the cold start.

    Example:
        >>> import torch, lipreg
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        >>> penalty = lipreg.LipschitzPenalty(net, (4,), weight=1e-2, form="log")
        >>> loss = net(torch.randn(3, 4)).pow(2).mean() + penalty()
        >>> loss.backward()
    """

    def __init__(
        self,
        model: nn.Module,
        input_shape: Sequence[int],
        *,
        method: Literal["autolip", "seqlip", "lipsdp"] = "autolip",
        dense_limit: int = 1024,
        refresh_every: int = 20,
        weight: float = 1e-3,
        target: float | None = None,
        form: Literal["log", "linear", "hinge"] = "log",
        n_power_iterations: int = 1,
        tol: float = 1e-4,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if method not in ("autolip", "seqlip", "lipsdp"):
            raise ValueError(f"method must be 'autolip', 'seqlip' or 'lipsdp', got {method!r}.")
        if not isinstance(refresh_every, int) or refresh_every < 1:
            raise ValueError(f"refresh_every must be an int >= 1, got {refresh_every!r}.")
        if form not in _FORMS:
            raise ValueError(f"form must be one of {_FORMS}, got {form!r}.")
        if form == "hinge" and (target is None or not target > 0):
            raise ValueError(f"form='hinge' needs a positive target, got target={target!r}.")
        if not isinstance(n_power_iterations, int) or n_power_iterations < 0:
            raise ValueError(f"n_power_iterations must be an int >= 0, got {n_power_iterations}.")
        if not math.isfinite(weight) or weight < 0:
            raise ValueError(f"weight must be a finite number >= 0, got {weight!r}.")
        object.__setattr__(self, "_model", model)  # a reference, not a submodule
        self.input_shape = check_input_shape(input_shape)
        self.method, self.weight, self.target, self.form = method, weight, target, form
        self.n_power_iterations = n_power_iterations
        self._check_sharding()  # before tracing: an FSDP1 wrapper fails to trace, unexplained
        object.__setattr__(self, "_traced", trace(model))  # not a submodule either
        self._analysis = self._analyse()
        self._chains = find_affine_chains(self._analysis)
        self.chain_names = [c.name for c in self._chains.values()]
        self.buffer_names = _buffer_names(self.chain_names)
        generator = torch.Generator(device=self._analysis.device).manual_seed(seed)
        for name, chain in zip(self.buffer_names, self._chains.values(), strict=True):
            self.register_buffer(name, self._cold_start(chain, tol, generator))
        self.register_load_state_dict_pre_hook(_check_and_upgrade_state)
        self._seq_items: list = []
        self.refresh_every = refresh_every
        self._multipliers: dict[int, list[Tensor]] = {}  # LipSDP multipliers per SeqLip chain
        self._calls = 0
        if method in ("seqlip", "lipsdp"):
            self._init_seqlip(dense_limit)

    @property
    def model(self) -> nn.Module:
        return self._model

    def _placement(self) -> tuple[torch.dtype, torch.device]:
        first = next(iter(self._model.parameters()), None)
        if first is None:
            return torch.float32, torch.device("cpu")
        return (torch.float64 if first.dtype == torch.float64 else torch.float32), first.device

    def _check_sharding(self) -> None:
        """Refuse the sharded models the penalty cannot follow one map at a time (FSDP1;
        SeqLip/LipSDP factors, which need several maps of a chain at once), saying what to do."""
        check_shardable(self._model)
        if self.method != "autolip" and is_sharded(self._model):
            raise NotImplementedError(
                f"LipschitzPenalty(method={self.method!r}) materialises every map of a SeqLip "
                "chain at once, which lipreg does not do on FSDP-sharded models (the penalty "
                "gathers one merged map at a time). Use method='autolip' on the sharded "
                f"model, or method={self.method!r} on an unsharded model."
            )

    def _analyse(self):
        self._check_sharding()
        dtype, _ = self._placement()
        return analyse(
            self._model, self.input_shape, dtype=dtype, traced=self._traced, differentiable=True
        )

    def _follow_model(self) -> None:
        """Re-analyse after the model moved to another dtype or device (``.double()``,
        ``.to("cuda")``) or was sharded (``fully_shard`` after the penalty was built), so that
        the penalty computes where and how the model lives."""
        a = self._analysis
        if (a.dtype, a.device) != self._placement() or a.sharded != is_sharded(self._model):
            self._analysis = self._analyse()
            self._chains = find_affine_chains(self._analysis)
            # the same graph: the same chains, so the buffers keep their meaning
            assert [c.name for c in self._chains.values()] == self.chain_names

    @contextlib.contextmanager
    def _chain_reader(self, chain: AffineChain) -> Iterator[Callable[[], LinearMap]]:
        """For the block, a reader of ``chain``'s linear map with the current weights.

        Unsharded: the map of the specs refreshed by the caller. Sharded: the chain's
        parameters are gathered for the block (:func:`full_parameters`, differentiable) and
        the reader re-reads the chain's specs from them; the analysis gets its sealed specs
        back after the block, while autograd keeps what the penalty's graph needs."""
        a = self._analysis
        if not a.sharded:
            yield lambda: chain_linear_map(a, chain)
            return
        nodes = list(chain.nodes)
        saved = {n: a.specs[n] for n in nodes}

        def read() -> LinearMap:
            a.refresh_specs(nodes)
            return chain_linear_map(a, chain)

        try:
            with full_parameters(a.modules_of(nodes)):
                yield read
        finally:
            a.specs.update(saved)

    def _agreed(self, v: Tensor, what: str) -> contextlib.AbstractContextManager[None]:
        """Sharded: the ranks agree that the block succeeded and take rank 0's ``v``
        (identical vectors, so identical ``σ̂`` and gradients); unsharded: nothing, so that
        a DDP model's penalty stays free of collectives."""
        if not self._analysis.sharded:
            return contextlib.nullcontext()
        return shared_from_first_rank(v, what)

    def _cold_start(self, chain: AffineChain, tol: float, generator: torch.Generator) -> Tensor:
        """The chain's ``v`` after Lanczos to ``tol`` from the private generator."""
        a = self._analysis
        v = torch.zeros(math.prod(a.shapes[chain.source]), dtype=a.dtype, device=a.device)
        what = f"starting the power iteration of {chain.name!r}"
        with torch.no_grad(), self._chain_reader(chain) as read, self._agreed(v, what):
            v.copy_(operator_norm(read(), tol=tol, generator=generator).v.reshape(-1))
        return v

    def _refine(self, op: LinearMap, v: Tensor) -> None:
        """``n_power_iterations`` steps ``v ← AᵀA v / ‖AᵀA v‖`` in place (training mode only;
        a zero or non-finite step leaves ``v`` as it was)."""
        if not (self.training and self.n_power_iterations > 0):
            return
        with torch.no_grad():
            for _ in range(self.n_power_iterations):
                g, _ = op.gram_matvec(v.to(op.dtype)[None])
                norm = g.norm()
                if norm > 0 and torch.isfinite(norm):
                    v.copy_(g[0] / norm)

    def layer_norms(self) -> dict[str, Tensor]:
        """Differentiable ``σ̂_c`` of every merged affine map (refreshing ``v`` in training).

        Sharded models: one chain's parameters gathered at a time, every rank the same ``v``
        (see the module docstring); all ranks must call it together."""
        self._follow_model()
        if not self._analysis.sharded:
            self._analysis.refresh_specs()  # closures over the current parameters, with autograd
        return {
            chain.name: self._sigma(chain, getattr(self, name))
            for name, chain in zip(self.buffer_names, self._chains.values(), strict=True)
        }

    def _sigma(self, chain: AffineChain, v: Tensor) -> Tensor:
        """``σ̂ = uᵀ A v`` of one chain (``v`` refined first in training). A method of its
        own so that the chain's map (its gathered weights, when sharded) is released on
        return, before the next chain is gathered (measured: one layer more held otherwise)."""
        with self._chain_reader(chain) as read:
            with self._agreed(v, f"refining the power iteration of {chain.name!r}"):
                op = read()
                self._refine(op, v)
            # Clone: v is updated in place at the next step, while autograd may still need
            # this value for the backward pass (same reason as in torch's spectral_norm).
            v_used = v.clone().to(op.dtype)
            av = op.apply(v_used.reshape(1, *op.in_shape)).reshape(-1)
            u = (av / av.norm().clamp_min(1e-12)).detach()
            return torch.dot(u, av)

    def _refresh_other_specs(self) -> None:
        """Sharded: re-read, from gathered parameters, the specs outside the chains whose
        rules read parameters (e.g. a PReLU's slope), which the unsharded path refreshes at
        every call; their specs hold numbers only, nothing gathered."""
        a = self._analysis
        in_chains = {n for chain in self._chains.values() for n in chain.nodes}
        for node in a.contexts:
            modules = [] if node in in_chains else a.modules_of([node])
            if any(True for m in modules for _ in m.parameters()):
                what = f"ruling {a.label(node)}"
                with torch.no_grad(), full_parameters(modules), all_ranks_succeed(what):
                    a.refresh_specs([node])

    def lipschitz_estimate(self, sigmas: dict[str, Tensor] | None = None) -> Tensor:
        """Differentiable AutoLip value ``L̂`` from the layer norms (an estimate, see note)."""
        sigmas = self.layer_norms() if sigmas is None else sigmas
        a = self._analysis
        if a.sharded:
            self._refresh_other_specs()
        one = torch.ones((), dtype=a.dtype, device=a.device)
        values = propagate(a, self._chains, lambda chain: sigmas[chain.name], one)
        value = output_value(a, values)
        return 0 * one if value is None else value

    # ---------------------------------------------------------------- state
    def get_extra_state(self) -> dict[str, Any]:
        """``{"version", "chains", "buffers"}``: what the buffers belong to."""
        return {
            "version": STATE_VERSION,
            "chains": list(self.chain_names),
            "buffers": list(self.buffer_names),
        }

    def set_extra_state(self, state: Any) -> None:
        """Check that a loaded state belongs to this network (see :func:`check_extra_state`)."""
        self.check_extra_state(state)

    def check_extra_state(self, state: Any) -> None:
        """Raise ``ValueError`` unless ``state`` is a version-2 extra state for the same chains."""
        if not isinstance(state, dict) or "version" not in state:
            raise ValueError(
                f"LipschitzPenalty: the saved extra state is {state!r}, expected a dict with a "
                "'version' (a state dict saved by this class)."
            )
        if state["version"] != STATE_VERSION:
            raise ValueError(
                f"LipschitzPenalty: the state dict has format version {state['version']}, this "
                f"lipreg reads version {STATE_VERSION}; save it again with this version."
            )
        if list(state.get("chains", [])) != self.chain_names:
            raise ValueError(
                "LipschitzPenalty: the state dict was saved for another network: it holds "
                f"vectors for the chains {list(state.get('chains', []))}, this penalty's network "
                f"has the chains {self.chain_names}. Load it into a penalty of the same "
                "architecture (and input shape), or build a new penalty (cold start)."
            )

    # ---------------------------------------------------------------- SeqLip
    def _init_seqlip(self, dense_limit: int) -> None:
        items, _ = segment_chains(self._analysis)  # raises NotSequentialError for branching graphs
        for item in items:
            if isinstance(item, SeqChain) and len(item.maps) > 1:
                for m in item.maps:
                    op = chain_linear_map(self._analysis, m)
                    if min(op.in_features, op.out_features) > dense_limit:
                        raise ValueError(
                            f"method={self.method!r} materialises every map of a SeqLip chain; "
                            f"{m.name!r} is {op.out_features}x{op.in_features}, larger than "
                            f"dense_limit={dense_limit}. Use method='autolip' for this network."
                        )
        self._seq_items = items

    def seqlip_factors(self) -> dict[str, Tensor]:
        """Differentiable SeqLip factors: pair norms, single-map norms and constants."""
        sigmas = self.layer_norms()  # single-map chains, with their warm power iteration
        factors: dict[str, Tensor] = {}
        for item in self._seq_items:
            if not isinstance(item, SeqChain):
                factors[item.name] = torch.as_tensor(item.value, dtype=self._analysis.dtype)
                continue
            if len(item.maps) == 1:
                factors[item.maps[0].name] = sigmas[item.maps[0].name]
                continue
            mats = [chain_linear_map(self._analysis, m) for m in item.maps]
            svds = [torch.linalg.svd(_dense(op), full_matrices=False) for op in mats]
            for k, (A, B) in enumerate(pair_matrices(svds)):
                lo, hi, act = item.boxes[k]
                with torch.no_grad():  # the pattern is a maximiser, found without gradient
                    _, pattern = pair_norm_greedy(A.detach(), B.detach(), lo, hi, n_restarts=0)
                pair = (A * pattern.to(A.dtype)) @ B
                name = pair_name(item.maps[k].name, act, item.maps[k + 1].name)
                factors[name] = torch.linalg.matrix_norm(pair, ord=2)
        return factors

    def lipsdp_factors(self) -> dict[str, Tensor]:
        """Differentiable LipSDP factors: ``√ρ*(T; W)`` per multi-layer SeqLip chain (``T``
        fixed, refreshed as documented for ``method="lipsdp"``), single-map norms, constants."""
        sigmas = self.layer_norms()
        refresh = self.training and self._calls % self.refresh_every == 0
        self._calls += int(self.training)
        factors: dict[str, Tensor] = {}
        for index, item in enumerate(self._seq_items):
            if not isinstance(item, SeqChain):
                factors[item.name] = torch.as_tensor(item.value, dtype=self._analysis.dtype)
            elif len(item.maps) == 1:
                factors[item.maps[0].name] = sigmas[item.maps[0].name]
            else:
                weights = [_dense(chain_linear_map(self._analysis, m)) for m in item.maps]
                slopes = [(lo, hi) for lo, hi, _ in item.boxes]
                name = " -> ".join(m.name for m in item.maps)
                factors[name] = self._lipsdp_factor(index, weights, slopes, refresh)
        return factors

    def _lipsdp_factor(
        self, index: int, weights: list[Tensor], slopes: list[tuple[float, float]], refresh: bool
    ) -> Tensor:
        value = None
        if index in self._multipliers and not refresh:
            value = lipsdp_value(weights, slopes, self._multipliers[index])
        if value is None:  # first call, refresh due, or the weights left T's feasible set
            with torch.no_grad():
                cert = lipsdp_neuron(
                    [w.detach() for w in weights],
                    slopes,
                    warm=self._multipliers.get(index),
                    max_steps=50,
                )
            self._multipliers[index] = list(cert.multipliers)
            value = lipsdp_value(weights, slopes, self._multipliers[index])
        if value is None:  # a certified T is feasible for these very weights: unreachable
            raise RuntimeError("LipschitzPenalty: freshly certified multipliers are infeasible.")
        return value

    def forward(self) -> Tensor:
        """The weighted penalty, a differentiable scalar to add to the loss."""
        if self.method in ("seqlip", "lipsdp"):
            factors = self.seqlip_factors() if self.method == "seqlip" else self.lipsdp_factors()
            if self.form == "log":
                value = sum(torch.log(f.clamp_min(1e-12)) for f in factors.values())
            else:
                lip = torch.stack(list(factors.values())).prod()
                value = lip if self.form == "linear" else torch.relu(lip - self.target)
            return self.weight * value
        sigmas = self.layer_norms()
        if self.form == "log":
            value = sum(torch.log(s.clamp_min(1e-12)) for s in sigmas.values())
        else:
            lip = self.lipschitz_estimate(sigmas)
            value = lip if self.form == "linear" else torch.relu(lip - self.target)
        return self.weight * value

    def extra_repr(self) -> str:
        return (
            f"method={self.method!r}, form={self.form!r}, weight={self.weight}, "
            f"target={self.target}, layers={len(self.chain_names)}"
        )


def _dense(op) -> Tensor:
    """The matrix of a linear map, differentiably: the weight of a lone dense layer, else the
    map applied to the identity."""
    eye = torch.eye(op.in_features, dtype=op.dtype, device=op.device)
    return op.apply(eye.reshape(-1, *op.in_shape)).reshape(op.in_features, -1).T


def _check_and_upgrade_state(
    module: LipschitzPenalty,
    state_dict: dict[str, Any],
    prefix: str,
    local_metadata: Any,
    strict: bool,
    missing_keys: list[str],
    unexpected_keys: list[str],
    error_msgs: list[str],
) -> None:
    """Load-state-dict pre-hook: refuse another network's state with a clear message before
    any tensor is copied, and rename a version-1 state (``v_0, v_1…`` by position, no extra
    state) to the chains' buffers when it holds one vector of the right size per chain."""
    extra_key = prefix + "_extra_state"
    if extra_key in state_dict:
        module.check_extra_state(state_dict[extra_key])
        return
    positional = []
    while f"{prefix}v_{len(positional)}" in state_dict:
        positional.append(f"{prefix}v_{len(positional)}")
    if not positional:
        return  # nothing of ours: torch reports the missing keys (strict) or keeps the buffers
    if len(positional) != len(module.chain_names):
        raise ValueError(
            f"LipschitzPenalty: the state dict holds {len(positional)} positional vectors "
            f"(v_0..v_{len(positional) - 1}, format version 1), this penalty's network has "
            f"{len(module.chain_names)} chains {module.chain_names}: it was saved for another "
            "network. Build a new penalty (cold start) instead of loading it."
        )
    vectors = [state_dict.pop(key) for key in positional]
    for chain, name, v in zip(module.chain_names, module.buffer_names, vectors, strict=True):
        expected = getattr(module, name).numel()
        if v.numel() != expected:
            raise ValueError(
                f"LipschitzPenalty: the version-1 state dict's vector for chain {chain!r} has "
                f"{v.numel()} entries, this network's chain has {expected}: it was saved for "
                "another network. Build a new penalty (cold start) instead of loading it."
            )
        state_dict[prefix + name] = v
    state_dict[extra_key] = module.get_extra_state()
