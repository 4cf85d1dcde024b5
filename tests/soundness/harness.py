"""Shared checks of the soundness harness and its per-family tally.

:func:`check_soundness` bounds one model with ``lipreg.autolip`` and either

* records an intentional refusal (``UnsupportedOperationError`` / ``TraceError``) and checks
  that its message names the op, or
* checks ``certified_upper ≥ oracle_lower · (1 − 1e-6)`` with the independent oracle,

and in both cases that bounding left the model bit-identical (parameters, buffers, plain
tensor attributes, ``training`` flags) and the global RNG untouched.
"""

from __future__ import annotations

import math
import re
import time
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

import lipreg
from tests.soundness.oracle import OracleResult, fingerprint_diff, model_fingerprint
from tests.soundness.oracle import oracle_lower_bound as _oracle

__all__ = ["STATS", "Outcome", "check_soundness", "refusal_reasons", "summary_lines"]

REL_TOL = 1e-6


@dataclass
class Outcome:
    label: str
    families: list[str]
    status: str  # "certified", "refused", "unsound", "error", "mutated", "bad-refusal"
    upper: float | None = None
    lower: float | None = None
    jacobian_norm: float | None = None
    reasons: list[str] = field(default_factory=list)
    block_names: list[tuple[str, ...]] = field(default_factory=list)
    message: str = ""
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.status in ("certified", "refused")


@dataclass
class _Stats:
    per_family: dict[str, Counter[str]] = field(default_factory=lambda: defaultdict(Counter))
    reasons: Counter[str] = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)
    cases: int = 0
    seconds: float = 0.0


STATS = _Stats()


def refusal_reasons(message: str) -> list[str]:
    """One short line per refused node of a lipreg refusal message."""
    lines = [ln.strip()[2:] for ln in message.splitlines() if ln.strip().startswith("- ")]
    if not lines:
        lines = [message.split(". ")[0]]
    return [re.sub(r"\s+", " ", ln)[:140] for ln in lines]


_BLOCK = re.compile(r"blocks[._](\d+)")


def _culprit(reason: str, families: Sequence[str], names: Sequence[Sequence[str]]) -> str:
    """The family a refusal reason is about: the block with the longest of its op names in
    the reason, else the block it names (``blocks.3`` → ``families[3]``)."""
    low = reason.lower()
    best, best_len = "", 0
    for fam, words in zip(families, names, strict=False):
        for w in words:
            if w.lower() in low and len(w) > best_len:
                best, best_len = fam, len(w)
    if best:
        return best
    found = _BLOCK.search(reason)
    if found and int(found.group(1)) < len(families):
        return families[int(found.group(1))]
    return "(whole model)" if len(families) > 1 else families[0]


def _record(outcome: Outcome) -> None:
    STATS.cases += 1
    STATS.seconds += outcome.seconds
    for fam in set(outcome.families):
        STATS.per_family[fam][outcome.status] += 1
    culprits = set()
    for reason in outcome.reasons:
        fam = _culprit(reason, outcome.families, outcome.block_names)
        culprits.add(fam)
        generic = _BLOCK.sub("blocks.*", reason)
        generic = re.sub(r"'blocks\.\*[\w.]*'", "'blocks.*'", generic)
        STATS.reasons[f"[{fam}] {generic[:110]}"] += 1
    for fam in culprits:
        STATS.per_family[fam]["caused refusal"] += 1
    if not outcome.ok:
        STATS.failures.append(f"{outcome.label}: {outcome.status}: {outcome.message[:300]}")


def check_soundness(
    model: nn.Module,
    input_shape: Sequence[int],
    *,
    label: str,
    families: Sequence[str],
    names: Sequence[str],
    block_names: Sequence[Sequence[str]] | None = None,
    seed: int = 0,
    oracle_kwargs: dict | None = None,
    autolip_kwargs: dict | None = None,
    check_lower_bound: bool = False,
    lower_bound_kwargs: dict | None = None,
) -> Outcome:
    """Bound ``model`` with lipreg and judge the result (see the module docstring)."""
    start = time.perf_counter()
    outcome = Outcome(label=label, families=list(families), status="certified")
    outcome.block_names = [tuple(b) for b in (block_names or [names] * len(families))]
    before = model_fingerprint(model)
    rng_before = torch.random.get_rng_state()
    try:
        try:
            result = lipreg.autolip(model, tuple(input_shape), **(autolip_kwargs or {}))
        except (lipreg.UnsupportedOperationError, lipreg.TraceError) as exc:
            message = str(exc)
            outcome.status = "refused"
            outcome.reasons = refusal_reasons(message)
            outcome.message = message
            if not any(n.lower() in message.lower() for n in names):
                outcome.status = "bad-refusal"
                outcome.message = f"the refusal names none of {list(names)}: {message}"
        except Exception as exc:  # a raw error is a bug: lipreg must refuse by name
            outcome.status = "error"
            outcome.message = f"{type(exc).__name__}: {exc}"
        else:
            mutated = fingerprint_diff(before, model_fingerprint(model))
            outcome.upper = float(result.value)
            oracle: OracleResult = _oracle(model, input_shape, seed=seed, **(oracle_kwargs or {}))
            outcome.lower, outcome.jacobian_norm = oracle.lower, oracle.jacobian_norm
            if not (result.certified and result.kind == "upper"):
                outcome.status = "unsound"
                outcome.message = f"not certified: certified={result.certified}, kind={result.kind}"
            elif not math.isfinite(outcome.upper) or outcome.upper < oracle.lower * (1 - REL_TOL):
                outcome.status = "unsound"
                outcome.message = (
                    f"certified upper bound {outcome.upper:.6g} < certified lower bound "
                    f"{oracle.lower:.6g} (‖J‖ = {oracle.jacobian_norm:.6g})"
                )
            elif check_lower_bound:
                try:
                    lb = lipreg.lower_bound(
                        model, tuple(input_shape), **(lower_bound_kwargs or _CHEAP_LOWER_BOUND)
                    )
                except (lipreg.UnsupportedOperationError, lipreg.TraceError, ValueError) as exc:
                    outcome.reasons.append(f"lower_bound: {refusal_reasons(str(exc))[0]}")
                except Exception as exc:
                    outcome.status = "error"
                    outcome.message = (
                        f"lipreg.lower_bound raised {type(exc).__name__}: {exc} (autolip "
                        f"certified {outcome.upper:.6g}, oracle {oracle.lower:.6g})"
                    )
                else:
                    _check_lower(outcome, lb)
            if mutated and outcome.ok:
                outcome.status = "mutated"
                outcome.message = f"autolip changed {mutated}"
        diff = fingerprint_diff(before, model_fingerprint(model))
        rng_same = torch.equal(rng_before, torch.random.get_rng_state())
        if (diff or not rng_same) and outcome.ok:
            outcome.status = "mutated"
            outcome.message = f"bounding changed {diff}" + ("" if rng_same else " + global RNG")
    finally:
        outcome.seconds = time.perf_counter() - start
        _record(outcome)
    return outcome


def _check_lower(outcome: Outcome, lb: lipreg.LipschitzResult) -> None:
    assert outcome.upper is not None
    if lb.kind != "lower" or not lb.value <= outcome.upper * (1 + REL_TOL):
        outcome.status = "unsound"
        outcome.message = (
            f"lipreg.lower_bound {lb.value:.6g} (kind {lb.kind}) > certified upper "
            f"bound {outcome.upper:.6g}"
        )


_CHEAP_LOWER_BOUND = {"n_random": 32, "n_anneal_steps": 5, "n_chains": 2, "batch_size": 32}


def summary_lines() -> list[str]:
    """The per-family table of the run (for the terminal summary)."""
    if not STATS.cases:
        return []
    out = [
        f"soundness harness: {STATS.cases} cases in {STATS.seconds:.1f} s (bounding + oracle time)",
        "models: cases containing the family; refused: those refused (by any block); "
        "caused: refusals naming this family's block",
        f"{'family':34s} {'models':>6s} {'certified':>9s} {'refused':>7s} {'caused':>6s} "
        f"{'failed':>6s}",
    ]
    for fam in sorted(STATS.per_family):
        c = STATS.per_family[fam]
        total = sum(n for k, n in c.items() if k != "caused refusal")
        failed = total - c["certified"] - c["refused"]
        out.append(
            f"{fam:34s} {total:6d} {c['certified']:9d} {c['refused']:7d} "
            f"{c['caused refusal']:6d} {failed:6d}"
        )
    if STATS.reasons:
        out.append("refusal reasons (count):")
        out += [f"  {n:4d}  {r}" for r, n in STATS.reasons.most_common(60)]
    if STATS.failures:
        out.append(f"failures ({len(STATS.failures)}):")
        out += [f"  {f}" for f in STATS.failures]
    return out
