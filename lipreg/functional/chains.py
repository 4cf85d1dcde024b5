"""Affine chains (what AutoLip bounds as one map) and SeqLip chains (what SeqLip pairs up).

An **affine chain** is a maximal run of consecutive affine nodes (conv → BN, linear → linear,
conv → flatten → linear) whose intermediate values are used nowhere else: its bias-free linear
part is one map, whose norm is at most the product of its members' norms (often much less).

**Chain names.** A chain's name is its one name in every output (``LayerBound.name``, warm-start
``state`` keys, the callback's ``lipschitz/layer/<name>`` keys, W&B tables, the penalty's
buffers). A chain of one node is named by that node's label (its module path, e.g.
``features.0``, or the fx node name for functions). A longer chain is named by the longest
common dotted module-path prefix of its members followed by the rest of each member in
brackets, joined by ``+``: ``layer2.0.downsample.0`` and ``layer2.0.downsample.1`` give
``layer2.0.downsample[0+1]``; ``conv1`` and ``bn1`` (no common prefix) give ``conv1+bn1``.
Labels are unique within a network and members are disjoint, so names are unique; should a
user-chosen module name still make two names equal, the later one gets ``#2``, ``#3``...
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import fx

from lipreg.functional.analysis import Analysis
from lipreg.functional.linear_map import LinearMap, compose
from lipreg.functional.results import LayerBound
from lipreg.functional.specs import Affine, Combine, Elementwise, Nonlinear

__all__ = [
    "AffineChain",
    "NotSequentialError",
    "SeqChain",
    "chain_linear_map",
    "chain_name",
    "find_affine_chains",
    "node_linear_map",
    "segment_chains",
]


@dataclass
class AffineChain:
    """Consecutive affine nodes ``nodes`` applied to the output of ``source``."""

    nodes: list[fx.Node]
    source: fx.Node
    name: str


def chain_name(labels: list[str]) -> str:
    """The readable name of a chain whose members have ``labels`` (module docstring)."""
    if len(labels) == 1:
        return labels[0]
    parts = [label.split(".") for label in labels]
    common = 0
    # Keep at least one component of every member after the prefix.
    while all(len(p) > common + 1 for p in parts) and len({p[common] for p in parts}) == 1:
        common += 1
    rests = "+".join(".".join(p[common:]) for p in parts)
    if common == 0:
        return rests
    return f"{'.'.join(parts[0][:common])}[{rests}]"


def find_affine_chains(analysis: Analysis) -> dict[fx.Node, AffineChain]:
    """Maximal chains of affine nodes, keyed by their last node, in graph order.

    A node extends its input's chain when that input is affine and has no other user (and is
    not the network's output): its intermediate value is then never needed on its own.
    """
    chain_of: dict[fx.Node, AffineChain] = {}
    ends: dict[fx.Node, AffineChain] = {}
    for node in analysis.order[1:]:
        if not isinstance(analysis.specs[node], Affine):
            continue
        (parent,) = analysis.inputs[node]
        extend = (
            isinstance(analysis.specs.get(parent), Affine)
            and analysis.users(parent) == [node]
            and not analysis.is_output(parent)
        )
        if extend:
            chain = chain_of[parent]
            ends.pop(parent, None)
            chain.nodes.append(node)
        else:
            chain = AffineChain(nodes=[node], source=parent, name="")
        chain_of[node] = chain
        ends[node] = chain
    taken: set[str] = set()
    for chain in ends.values():
        base = chain_name([analysis.label(n) for n in chain.nodes])
        name, k = base, 1
        while name in taken:  # only with user module names containing "[", "+" or "."
            k += 1
            name = f"{base}#{k}"
        taken.add(name)
        chain.name = name
    return ends


def node_linear_map(analysis: Analysis, node: fx.Node) -> LinearMap:
    """The bias-free linear part of one affine node as a :class:`LinearMap`."""
    spec = analysis.specs[node]
    assert isinstance(spec, Affine)
    (parent,) = analysis.inputs[node]
    return LinearMap(
        apply=spec.linear,
        in_shape=analysis.shapes[parent],
        out_shape=analysis.shapes[node],
        dtype=analysis.dtype,
        device=analysis.device,
        name=analysis.label(node),
    )


def chain_linear_map(analysis: Analysis, chain: AffineChain) -> LinearMap:
    """The bias-free linear part of a chain as one :class:`LinearMap`."""
    return compose([node_linear_map(analysis, n) for n in chain.nodes], name=chain.name)


# ---------------------------------------------------------------- SeqLip chains
class NotSequentialError(ValueError):
    """SeqLip needs a network whose graph is a single path."""


@dataclass
class SeqChain:
    """Affine chains ``maps[0..K-1]`` separated by activation slope boxes ``boxes[0..K-2]``."""

    maps: list[AffineChain] = field(default_factory=list)
    boxes: list[tuple[float, float, str]] = field(default_factory=list)


def _compose_box(a: tuple[float, float], b: tuple[float, float]) -> tuple[float, float]:
    prods = [x * y for x in a for y in b]
    return min(prods), max(prods)


def _check_sequential(analysis: Analysis) -> None:
    problems = [
        analysis.label(n)
        for n in analysis.order[1:]
        if isinstance(analysis.specs[n], Combine) or len(analysis.inputs[n]) != 1
    ]
    problems += [
        analysis.label(n)
        for n in analysis.order
        if n is not analysis.output_node and len(analysis.users(n)) > 1
    ]
    if problems:
        raise NotSequentialError(
            f"SeqLip applies to sequential networks (one path from input to output); nodes "
            f"{sorted(set(problems))} branch or merge (residual additions, concatenations, "
            "shared inputs). Use lipreg.autolip for such graphs."
        )


def segment_chains(analysis: Analysis) -> tuple[list[SeqChain | LayerBound], list[str]]:
    """Split a sequential graph into SeqLip chains and breaker factors, in order.

    Consecutive element-wise activations between two affine chains compose into one slope box
    (``[a, b]·[c, d]``, named ``"act1 -> act2"``); an activation outside a chain, or any
    non-element-wise node, is a factor of its own (its rule's constant).

    Raises:
        NotSequentialError: the graph branches or merges.
    """
    _check_sequential(analysis)
    chains = find_affine_chains(analysis)
    items: list[SeqChain | LayerBound] = []
    current: SeqChain | None = None
    pending: tuple[float, float, str] | None = None

    def close() -> None:
        nonlocal current, pending
        if current is not None:
            items.append(current)
        if pending is not None:
            lip = max(abs(pending[0]), abs(pending[1]))
            items.append(LayerBound.from_rule(pending[2], "activation", lip))
        current, pending = None, None

    for node in analysis.order[1:]:
        spec = analysis.specs[node]
        if isinstance(spec, Affine):
            if node not in chains:
                continue
            if current is not None and pending is not None:
                current.boxes.append(pending)
                current.maps.append(chains[node])
                pending = None
            else:
                close()
                current = SeqChain(maps=[chains[node]])
        elif isinstance(spec, Elementwise):
            box = (spec.slope_min, spec.slope_max, analysis.label(node))
            if current is None:
                items.append(LayerBound.from_rule(box[2], "activation", spec.lipschitz))
            elif pending is None:
                pending = box
            else:
                lo, hi = _compose_box(pending[:2], box[:2])
                pending = (lo, hi, f"{pending[2]} -> {box[2]}")
        elif isinstance(spec, Nonlinear):
            close()
            items.append(LayerBound.from_rule(analysis.label(node), "nonlinear", spec.lipschitz))
    close()
    return items, []
