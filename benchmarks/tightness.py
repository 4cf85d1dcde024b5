"""Tightness of lipreg's certified bounds against independent references, on the same weights.

Per network: lipreg's certified upper bounds (AutoLip, and — when they exist in the installed
lipreg — the tight dense LipSDP-type certificate, its ECLipsE-Fast certificate, certified
SeqLip and ``certified_bound``), exact SeqLip where the widths allow enumeration, lipreg's
certified lower bound; and two references written independently of lipreg
(``benchmarks/references``): ECLipsE-Fast re-derived in numpy and LipSDP-Neuron solved by
cvxpy, both *verified* by a float64 positive-definiteness test with an explicit rounding
margin (a solver's "optimal" is not a proof). Every upper bound is also given as a ratio to
the best lower bound known on the same map, and every method's CPU time (``process_time``,
one thread; cheap methods: median over interleaved rounds, cvxpy: one run).

Networks: LipSDP random 2-10-30-20-2 and MNIST 784-50-10; GLipSDP FNN-2/FNN-3/CNN-2/CNN-3
(logit 7, CNN features flattened "whc", see ``lipreg.models.benchmark_nets``; seeds 0-9);
the paper's MLP architecture 2-20-20-20(-20)-1 (random init) and a random 784-256-256-10 MLP.
CNNs enter the dense references as their exact dense matrices (conv = a 512×64 matrix).

Run: ``OMP_NUM_THREADS=1 python benchmarks/tightness.py [--quick] [--seeds 0-9]
[--no-cvxpy] [--cvxpy-max-size N] [--rounds R]``. A full run writes
``benchmarks/results/tightness.md``; ``--quick`` (2 small networks) only prints.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import math
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from _common import machine_load, print_footer, print_table, setup_threads
from references.dense_chain import dense_chain
from references.eclipse_reference import eclipse_fast_reference
from references.lipsdp_cvxpy import (
    chain_digest,
    lipsdp_neuron_cvxpy,
    load_solution,
    save_solution,
)
from tightness_lipreg import (
    LAST_CERTIFICATE,
    NOT_YET,
    REPO,
    UPPER_COLUMNS,
    certified_value,
    cross_check,
    lipreg_columns,
)

import lipreg
from lipreg.models import PAPER_MODELS, load_glipsdp, load_glipsdp_summary, load_lipsdp

RESULTS = Path(__file__).resolve().parent / "results" / "tightness.md"
#: Stored cvxpy solves (solver's ρ and multipliers; re-verified on every load).
LIPSDP_CACHE = RESULTS.with_name("tightness_lipsdp_solves.json")
NAN = float("nan")


@dataclass
class Net:
    """One benchmark network: the model, its input shape, how to search its lower bound and
    the lower bounds known from elsewhere on the same map (value, source)."""

    name: str
    group: str
    model: torch.nn.Module
    shape: tuple[int, ...]
    lower_kwargs: dict[str, Any]
    known_lower: tuple[float, str] | None = None
    seed: int = 0


@dataclass
class Cell:
    """A measured value (NaN if none), its CPU seconds and a short text when it is not a
    number (``n/a ...``, ``error``)."""

    value: float = NAN
    cpu: float = NAN
    text: str = ""


@dataclass
class Row:
    """All cells of one network, keyed by column, plus notes for the table's footer."""

    net: Net
    cells: dict[str, Cell] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def best_lower(self) -> tuple[float, str]:
        """The largest certified/known lower bound on this map and where it comes from."""
        ours = self.cells["lower"].value
        best = (ours, "lipreg") if math.isfinite(ours) else (NAN, "")
        known = self.net.known_lower
        if known is not None and not known[0] <= best[0]:
            best = known
        return best


def cpu_call(fn: Callable[[], Any]) -> tuple[float, Any]:
    """CPU seconds (``time.process_time``, all threads of this process) of one call."""
    start = time.process_time()
    out = fn()
    return time.process_time() - start, out


#: A statement whose first call takes longer than this (CPU seconds) is run only once: its
#: time is far above the noise, and repeating it would dominate the benchmark.
LONG_SECONDS = 2.0


def interleaved_cpu(statements: dict[str, Callable[[], float]], rounds: int) -> dict[str, Cell]:
    """Run every statement once per round, in turn (a, b, c, a, b, c, ...), so that a change
    of the machine's load hits them alike; per statement the median CPU time and the last
    value. A statement that raises is reported as ``error`` (with the message), not retried;
    one slower than :data:`LONG_SECONDS` is not repeated.
    """
    times: dict[str, list[float]] = {k: [] for k in statements}
    cells: dict[str, Cell] = {}
    for _ in range(rounds):
        for key, fn in statements.items():
            if key in cells and (cells[key].text or times[key][0] > LONG_SECONDS):
                continue
            try:
                cpu, value = cpu_call(fn)
            except Exception as exc:  # shown in the table: a failed method is a finding
                cells[key] = Cell(text=f"error: {type(exc).__name__}: {exc}"[:300])
                continue
            times[key].append(cpu)
            cells[key] = Cell(value=float(value))
    for key, cell in cells.items():
        if times[key]:
            cell.cpu = statistics.median(times[key])
    return cells


def lipsdp_nets() -> list[Net]:
    random_net = load_lipsdp("random")
    mnist = load_lipsdp("mnist")
    return [
        Net(
            "LipSDP random 2-10-30-20-2",
            "lipsdp",
            random_net.model,
            (2,),
            {"scale": 3.0, "n_random": 2048, "n_anneal_steps": 100},
            (random_net.meta["published"]["exact"], "exact (published)"),
        ),
        Net(
            "LipSDP MNIST 784-50-10",
            "lipsdp",
            mnist.model,
            (784,),
            {"scale": 1.0, "n_random": 2048, "n_anneal_steps": 100},
            (mnist.meta["published"]["lower_bound"], "published LB"),
        ),
    ]


def digits_inputs(meta: dict[str, Any], shape: tuple[int, ...]) -> torch.Tensor | None:
    """The standardised scikit-learn digits (the GLipSDP networks' inputs), if available."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        return None
    x = torch.as_tensor(load_digits().data, dtype=torch.float64)
    mean = torch.as_tensor(meta["input_mean"], dtype=torch.float64).reshape(-1)
    scale = torch.as_tensor(meta["input_scale"], dtype=torch.float64).reshape(-1)
    return ((x - mean) / scale).reshape(-1, *shape)


GLIPSDP_SHAPES = {"fnn2": (64,), "fnn3": (64,), "cnn2": (1, 8, 8), "cnn3": (1, 8, 8)}


def glipsdp_nets(archs: list[str], seeds: list[int]) -> list[Net]:
    """The GLipSDP nets; the known lower bound is the published per-seed sampled one (a
    gradient norm of the same network with its biases, on the input box [0, 1]^64)."""
    summary = load_glipsdp_summary()
    nets = []
    for arch in archs:
        sampled = summary[arch]["lower_bound_sampled"]["values"]
        for seed in seeds:
            loaded = load_glipsdp(arch, seed)
            shape = GLIPSDP_SHAPES[arch]
            inputs = digits_inputs(loaded.meta, shape)
            nets.append(
                Net(
                    f"GLipSDP {arch} seed {seed}",
                    f"glipsdp-{arch}",
                    loaded.model,
                    shape,
                    {"inputs": inputs, "n_random": 256, "n_anneal_steps": 30},
                    (float(sampled[seed]), "published sampled LB"),
                    seed,
                )
            )
    return nets


def mlp_nets() -> list[Net]:
    """The paper's MLP architecture (2-D input, width 20; random init, seed 0; exact SeqLip
    is computable at this width) and a random 784-256-256-10 MLP (seed 0)."""
    nets = []
    for n_hidden in (3, 4):
        torch.manual_seed(0)
        model = PAPER_MODELS["mlp"](2, (20,) * n_hidden, 1).double()
        name = f"paper MLP 2-{'-'.join(['20'] * n_hidden)}-1 (random init)"
        lower = {"scale": 4.0, "n_random": 4096, "n_anneal_steps": 100}
        nets.append(Net(name, "paper-mlp", model, (2,), lower))
    torch.manual_seed(0)
    model = PAPER_MODELS["mlp"](784, (256, 256), 10).double()
    lower = {"scale": 1.0, "n_random": 256, "n_anneal_steps": 30}
    nets.append(Net("random MLP 784-256-256-10", "random-mlp", model, (784,), lower))
    return nets


# --- measuring one network ---------------------------------------------------------------

EXACT_WIDTH_LIMIT = 20


@dataclass
class Options:
    """What to run: interleaved rounds of the cheap methods; the cvxpy reference (``cvxpy``),
    the largest LMI side it is given, and the largest solved by Clarabel rather than SCS.
    Clarabel's PSD-cone blocks are dense in the ``n(n+1)/2`` triangle, so its memory grows as
    ``n⁴``: at ``n = 576`` (CNN-2) it asked for 138 GB and aborted the process (uncatchable).
    """

    rounds: int
    cvxpy: bool
    cvxpy_max_size: int
    clarabel_max_size: int
    refresh: bool = False
    save: bool = True
    cvxpy_cnn_seeds: tuple[int, ...] = (0,)


def lmi_size(weights: list[Any]) -> int:
    """Side of the LMI cvxpy solves: ``min(n_0, n_1) + n_1 + … + n_{L-1}`` (a wide first
    layer is reduced, ``references.lipsdp_cvxpy.reduce_input``)."""
    n0 = min(weights[0].shape[1], weights[0].shape[0])
    return int(n0 + sum(w.shape[0] for w in weights[:-1]))


def cheap_statements(
    net: Net, chain: tuple[list[Any], list[tuple[float, float]]], columns: dict[str, Any]
) -> tuple[dict[str, Callable[[], float]], dict[str, Cell]]:
    """The interleaved statements (lipreg's upper bounds, exact SeqLip, ECLipsE-Fast ref)
    and the cells already decided (n/a)."""
    statements: dict[str, Callable[[], float]] = {}
    fixed: dict[str, Cell] = {}
    for key, fn in columns.items():
        if fn is None:
            fixed[key] = Cell(text=NOT_YET)
        else:
            statements[key] = lambda fn=fn: fn(net, chain)
    widths = [w.shape[0] for w in chain[0][:-1]]
    if max(widths) <= EXACT_WIDTH_LIMIT:
        statements["seqlip_exact"] = lambda: certified_value(
            lipreg.seqlip(net.model, net.shape, method="exact", dtype=torch.float64)
        )
    else:
        fixed["seqlip_exact"] = Cell(text=f"— (width {max(widths)} > {EXACT_WIDTH_LIMIT})")

    def eclipse_ref() -> float:
        result = eclipse_fast_reference(*chain)
        if not result.verified.passed:
            raise RuntimeError(f"not verified: {result.verified.reason}")
        return result.verified.value

    statements["eclipse_ref"] = eclipse_ref
    return statements, fixed


def lipsdp_cell(row: Row, chain: tuple[list[Any], list[Any]], opts: Options) -> Cell:
    """The cvxpy LipSDP-Neuron reference, verified; solver details go to the row's notes.
    A stored solve of the same chain is used (and re-verified) whatever its size; the size
    and CNN-seed limits only decide which new solves are attempted."""
    size = lmi_size(chain[0])
    if not opts.cvxpy:
        return Cell(text="n/a (cvxpy off)")
    sol = None if opts.refresh else load_solution(LIPSDP_CACHE, row.net.name, *chain)
    if sol is None:
        if size > opts.cvxpy_max_size:
            return Cell(text=f"skipped (LMI {size} > {opts.cvxpy_max_size})")
        if row.net.group.startswith("glipsdp-cnn") and row.net.seed not in opts.cvxpy_cnn_seeds:
            return Cell(text="skipped (--cvxpy-cnn-seeds)")
        try:
            solver = "CLARABEL" if size <= opts.clarabel_max_size else "SCS"
            sol = lipsdp_neuron_cvxpy(*chain, solver=solver)
        except ImportError as exc:
            return Cell(text=f"n/a ({exc})"[:80])
        if opts.save:
            save_solution(LIPSDP_CACHE, row.net.name, chain_digest(*chain), sol)
    v = sol.verified
    row.notes.append(
        f"LipSDP cvxpy {sol.solver} ({sol.status}, LMI {size}): solver √ρ = "
        f"{sol.solver_value:.8g}; "
        + (
            f"verified {v.value:.8g} (raised by {v.inflation:.2e})"
            if v.passed
            else f"NOT verified ({v.reason})"
        )
        + f"; CPU {sol.cpu_solve:.3g} s solve + {sol.cpu_verify:.3g} s verify"
    )
    cpu = sol.cpu_solve + sol.cpu_verify
    if not v.passed:
        return Cell(cpu=cpu, text=f"unverified ({sol.solver_value:.6g})")
    return Cell(value=v.value, cpu=cpu)


def measure(net: Net, columns: dict[str, Any], opts: Options) -> Row:
    """Every column of one network."""
    row = Row(net)
    chain = dense_chain(net.model, net.shape)
    statements, fixed = cheap_statements(net, chain, columns)
    row.cells.update(fixed)
    row.cells.update(interleaved_cpu(statements, opts.rounds))
    for key in list(LAST_CERTIFICATE):
        row.notes.append(cross_check(key, chain))
    row.cells["lipsdp_ref"] = lipsdp_cell(row, chain, opts)
    cpu, lower = cpu_call(lambda: lipreg.lower_bound(net.model, net.shape, **net.lower_kwargs))
    row.cells["lower"] = Cell(value=float(lower.value), cpu=cpu)
    for key, cell in row.cells.items():
        if cell.text.startswith("error"):
            row.notes.append(f"{UPPER_COLUMNS.get(key, key)}: {cell.text}")
            cell.text = "error (see notes)"
    return row


# --- tables ------------------------------------------------------------------------------


def fmt_value(cell: Cell) -> str:
    return cell.text if cell.text else f"{cell.value:.7g}"


def fmt_cpu(cell: Cell) -> str:
    return "–" if not math.isfinite(cell.cpu) else f"{cell.cpu:.3g}"


def ratio(row: Row, key: str) -> float:
    best, _ = row.best_lower()
    return row.cells[key].value / best if math.isfinite(best) and best > 0 else NAN


def fmt_ratios(rows: list[Row], key: str) -> str:
    """``value / best LB`` of one row, or for a group the median (min–max) over its rows;
    a non-numeric cell shows its text."""
    values = [ratio(r, key) for r in rows]
    if not all(math.isfinite(v) for v in values):
        texts = {r.cells[key].text for r in rows if r.cells[key].text}
        return next(iter(texts)) if len(texts) == 1 else "; ".join(sorted(texts))
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{statistics.median(values):.4f} ({min(values):.4f}–{max(values):.4f})"


def grouped(rows: list[Row]) -> list[tuple[str, list[Row]]]:
    """Rows of the same GLipSDP architecture together (named by their seeds), others alone."""
    groups: dict[str, list[Row]] = {}
    for r in rows:
        key = r.net.group if r.net.group.startswith("glipsdp") else r.net.name
        groups.setdefault(key, []).append(r)
    out = []
    for key, members in groups.items():
        if key.startswith("glipsdp"):
            seeds = f"{len(members)} seed{'s' if len(members) > 1 else ''}"
            key = f"GLipSDP {key.split('-')[1]} ({seeds}: median (min–max))"
        out.append((key, members))
    return out


def table_text(headers: list[str], rows: list[list[str]]) -> str:
    """``_common.print_table``'s Markdown, as a string."""
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        print_table(headers, rows)
    return buffer.getvalue()


LIPREG_UPPER = ("autolip", "tight", "eclipse", "seqlip_cert", "certified_bound")


def best_lipreg(row: Row) -> tuple[str, Cell] | None:
    """lipreg's tightest certified column on this row, or ``None``."""
    found = [(k, row.cells[k]) for k in LIPREG_UPPER if math.isfinite(row.cells[k].value)]
    return min(found, key=lambda kc: kc[1].value) if found else None


def quotient(num: float, den: float) -> float:
    return num / den if math.isfinite(num) and math.isfinite(den) and den > 0 else NAN


def target_rows(rows: list[Row]) -> list[list[str]]:
    """Per network group: lipreg's tightest certificate divided by each reference (median
    (min–max) over seeds), and the CPU-time ratio cvxpy / that certificate (issue 9's
    targets: ≤ 1.01 / 1.03 × LipSDP, ≥ 20× faster, never above ECLipsE-Fast)."""

    def spread(values: list[float]) -> str:
        if not values or not all(math.isfinite(v) for v in values):
            return "–"
        if len(values) == 1:
            return f"{values[0]:.4f}"
        return f"{statistics.median(values):.4f} ({min(values):.4f}–{max(values):.4f})"

    out = []
    for name, members in grouped(rows):
        best = [best_lipreg(r) for r in members]
        if any(b is None for b in best):
            continue
        keys = sorted({b[0] for b in best if b is not None})
        vals = [b[1] for b in best if b is not None]
        per_ref = [
            spread(
                [quotient(v.value, r.cells[ref].value) for v, r in zip(vals, members, strict=True)]
            )
            for ref in ("lipsdp_ref", "eclipse_ref", "seqlip_exact")
        ]
        cpu = [
            quotient(r.cells["lipsdp_ref"].cpu, v.cpu) for v, r in zip(vals, members, strict=True)
        ]
        finite = [c for c in cpu if math.isfinite(c)]
        speed = f"{statistics.median(finite):.3g}×" if finite else "–"
        out.append([name, ", ".join(UPPER_COLUMNS[k] for k in keys), *per_ref, speed])
    return out


def report(rows: list[Row], header: str) -> str:
    """The tables (issue-9 targets, ratios per network/group, values, CPU seconds) and the
    notes."""
    uppers = list(UPPER_COLUMNS)
    labels = [UPPER_COLUMNS[k] for k in uppers]
    parts = [header]
    targets = target_rows(rows)
    if targets:
        parts.append("\n### lipreg's tightest certified bound / references (issue 9 targets)\n\n")
        heads = ["network", "lipreg's tightest", "÷ LipSDP cvxpy", "÷ ECLipsE-Fast ref"]
        heads += ["÷ SeqLip exact", "CPU cvxpy ÷ lipreg (median)"]
        parts.append(table_text(heads, targets))
    parts.append("\n### Upper bound / best lower bound (1 = tight)\n\n")
    ratio_rows = [[name] + [fmt_ratios(m, k) for k in uppers] for name, m in grouped(rows)]
    parts.append(table_text(["network", *labels], ratio_rows))
    parts.append("\n### Values (certified upper bounds; lower bounds)\n\n")
    value_rows = []
    for r in rows:
        best, source = r.best_lower()
        value_rows.append(
            [
                r.net.name,
                *(fmt_value(r.cells[k]) for k in uppers),
                fmt_value(r.cells["lower"]),
                f"{best:.7g} ({source})",
            ]
        )
    parts.append(table_text(["network", *labels, "lipreg LB", "best LB"], value_rows))
    parts.append("\n### CPU seconds (process time, one thread)\n\n")
    cpu_rows = [[r.net.name, *(fmt_cpu(r.cells[k]) for k in [*uppers, "lower"])] for r in rows]
    parts.append(table_text(["network", *labels, "lipreg LB"], cpu_rows))
    notes = [f"- {r.net.name}: {n}" for r in rows for n in r.notes]
    if notes:
        parts.append("\n### Notes\n\n" + "\n".join(notes) + "\n")
    return "".join(parts)


# --- main --------------------------------------------------------------------------------


def parse_seeds(text: str) -> list[int]:
    """``"0-9"``, ``"0,3,5"``, ``"2"`` or ``"none"`` -> a list of seeds."""
    seeds: list[int] = []
    if text.strip().lower() == "none":
        return seeds
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        seeds += list(range(int(lo), int(hi or lo) + 1))
    return seeds


def networks(args: argparse.Namespace) -> list[Net]:
    if args.quick:
        quick_lower = {"n_random": 128, "n_anneal_steps": 10}
        nets = [lipsdp_nets()[0], *glipsdp_nets(["fnn2"], [0])]
        for net in nets:
            net.lower_kwargs.update(quick_lower)
        return nets
    return [
        *lipsdp_nets(),
        *glipsdp_nets(["fnn2", "fnn3", "cnn2", "cnn3"], parse_seeds(args.seeds)),
        *mlp_nets(),
    ]


def header(columns: dict[str, Any], rounds: int, load: str) -> str:
    head = subprocess.run(
        ["git", "log", "-1", "--format=%h %s"], cwd=REPO, capture_output=True, text=True
    ).stdout.strip()
    missing = [UPPER_COLUMNS[k] for k, fn in columns.items() if fn is None]
    return (
        "## Tightness of certified Lipschitz bounds (benchmarks/tightness.py)\n\n"
        f"lipreg at `{head[:100]}`; arguments: `{' '.join(sys.argv[1:]) or '(none)'}`; "
        f"machine load before: {load}.\n"
        f"Columns not yet in lipreg: {', '.join(missing) or 'none'}.\n"
        "Every upper-bound column is certified (lipreg: `certified=True`; references: a float64 "
        "Cholesky test with an explicit rounding margin accepted the multipliers). LipSDP-Neuron "
        "cvxpy shows the verified value (the solver's own value is in the notes). 'best LB' is "
        "the larger of lipreg's certified lower bound and a lower bound known on the same map.\n"
        "\nColumns: AutoLip = `lipreg.autolip(certify=True)`; lipreg LipSDP-Neuron / ECLipsE-Fast "
        "= `lipreg.functional.lipsdp.lipsdp_neuron` / `lipreg.functional.eclipse.eclipse_fast` "
        "on the network's dense chain (CNNs: their exact dense conv matrices); lipreg SeqLip "
        "(cert.) = `lipreg.seqlip(certify=True)`; certified_bound = `lipreg.certified_bound` "
        "(default budget); SeqLip exact = `lipreg.seqlip(method='exact')` (hidden widths ≤ 20); "
        "ECLipsE-Fast ref and LipSDP-Neuron cvxpy = `benchmarks/references` (independent of "
        "lipreg; cvxpy solves stored in `results/tightness_lipsdp_solves.json` and re-verified "
        "on every run, CPU = the stored solve's). CPU: `time.process_time`, one thread, median "
        f"of {rounds} interleaved rounds (one run above {LONG_SECONDS:g} s).\n"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 small networks, 1 round")
    parser.add_argument("--seeds", default="0-9", help="GLipSDP seeds, e.g. 0-9 or 0,3")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds (3)")
    parser.add_argument("--no-cvxpy", action="store_true", help="skip the LipSDP reference")
    parser.add_argument("--cvxpy-max-size", type=int, default=600, help="largest LMI side")
    parser.add_argument("--cvxpy-cnn-seeds", default="0", help="CNN seeds given to cvxpy (or none)")
    parser.add_argument("--refresh", action="store_true", help="re-solve stored cvxpy solves")
    parser.add_argument(
        "--lipsdp-only", action="store_true", help="only solve and store the cvxpy references"
    )
    parser.add_argument(
        "--clarabel-max-size",
        type=int,
        default=200,
        help="larger LMIs are solved by SCS (Clarabel's memory: see Options)",
    )
    args = parser.parse_args()
    setup_threads()
    load = machine_load()
    opts = Options(
        rounds=args.rounds or (1 if args.quick else 3),
        cvxpy=not args.no_cvxpy,
        cvxpy_max_size=args.cvxpy_max_size,
        clarabel_max_size=args.clarabel_max_size,
        refresh=args.refresh,
        save=not args.quick,
        cvxpy_cnn_seeds=tuple(parse_seeds(args.cvxpy_cnn_seeds)),
    )
    if args.lipsdp_only:
        for net in networks(args):
            row = Row(net)
            lipsdp_cell(row, dense_chain(net.model, net.shape), opts)
            print(f"{net.name}: {'; '.join(row.notes) or 'skipped'}", flush=True)
        return
    columns = lipreg_columns()
    rows = []
    for net in networks(args):
        print(f"... {net.name}", file=sys.stderr, flush=True)
        rows.append(measure(net, columns, opts))
    text = report(rows, header(columns, opts.rounds, load))
    print(text)
    print_footer(
        load, "2 small networks, 1 round, small lower-bound search" if args.quick else None
    )
    if not args.quick:
        footer = f"\nMachine load before: {load}; after: {machine_load()}.\n"
        RESULTS.write_text(text + footer)
        print(f"written to {RESULTS.relative_to(REPO)}")


if __name__ == "__main__":
    main()
