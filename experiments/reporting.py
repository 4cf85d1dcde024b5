"""Tables and plots of the experiments: written atomically, readable at a glance.

* Tables: :func:`write_table` writes ``table.md`` (title, notes, a NARROW main table of the
  columns that matter) and ``table.csv`` (every column: the full breakdown). Numbers are shown
  to 4 significant digits in Markdown and exactly (``repr``) in CSV; a value that was not
  computed is ``–`` in both.
* Plots: :func:`new_figure` / :func:`save_figure` give figures with a constrained layout (no
  label cut at the frame); :func:`plot_points` draws points (joined only when the x values are
  sorted, so a sweep never zig-zags); :func:`finish_axes` puts the legend where it hides the
  least (``loc="best"``) with the markers shown in it.
* Every file goes through :func:`atomic_write`: a temporary file in the same folder, then
  ``os.replace``, so a killed process leaves either the old file or the new one, never half.
"""

from __future__ import annotations

import csv
import io
import math
import os
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "CURVE_KEYS",
    "DASH",
    "LEGEND",
    "atomic_write",
    "cell",
    "columns_of",
    "csv_text",
    "finish_axes",
    "markdown_table",
    "new_figure",
    "num",
    "plot_curves",
    "plot_points",
    "ratio",
    "save_figure",
    "write_table",
]

DASH = "–"
LEGEND = (
    "Kinds: '(certified upper)' = guaranteed upper bound on the Lipschitz constant; "
    "'(estimate)' = no guarantee either way (iterative layer norms, greedy or top-k SeqLip); "
    "'(certified lower)' = the largest local Jacobian norm found, a guaranteed lower bound. "
    f"'{DASH}' = not computed (or not reported by the paper)."
)


def atomic_write(path: Path, data: str | bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder and
    ``os.replace`` (atomic on POSIX): readers see the old content or the new, never a part."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data.encode() if isinstance(data, str) else data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# ------------------------------------------------------------------------------------------
# Tables
# ------------------------------------------------------------------------------------------


def num(value: Any) -> float | None:
    """A finite float, or ``None`` (not computed)."""
    if value is None or isinstance(value, bool):
        return None
    try:
        f = float(value)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def ratio(a: Any, b: Any) -> float | None:
    """``a / b``, or ``None`` when either is missing or ``b`` is zero."""
    a, b = num(a), num(b)
    if a is None or b is None or b == 0:
        return None
    return a / b


def cell(value: Any, csv_cell: bool) -> str:
    """One table cell: booleans as yes/no, floats to 4 digits (Markdown) or exact (CSV)."""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float) or value is None:
        f = num(value)
        if f is None:
            return DASH
        return repr(f) if csv_cell else f"{f:.4g}"
    text = str(value)
    return text if csv_cell else text.replace("|", "\\|").replace("\n", " ")


def columns_of(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """Every column of ``rows``, in order of first appearance."""
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    return columns


def markdown_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None) -> str:
    """A GitHub-flavoured Markdown table of ``columns`` (default: all) of ``rows``."""
    # Four lines, so no pandas + tabulate dependency (``DataFrame.to_markdown``) for them; the
    # CSV side uses the standard library's csv writer.
    columns = list(columns) if columns is not None else columns_of(rows)
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(cell(row.get(c), False) for c in columns) + " |")
    return "\n".join(lines) + "\n"


def csv_text(rows: Sequence[Mapping[str, Any]]) -> str:
    """Every column of ``rows`` as CSV (exact floats, ``–`` for missing values)."""
    columns = columns_of(rows)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        writer.writerow([cell(row.get(c), True) for c in columns])
    return buf.getvalue()


def write_table(
    out: Path,
    title: str,
    rows: Sequence[Mapping[str, Any]],
    notes: Iterable[str] = (),
    extra_md: str = "",
    main_columns: Sequence[str] | None = None,
) -> None:
    """``table.md`` (title, notes, the main table) and ``table.csv`` (every column), each
    written atomically. ``main_columns`` narrows the Markdown table to those columns (the ones
    present in ``rows``); the CSV always keeps the full breakdown."""
    notes = list(notes)
    shown = None
    if main_columns is not None:
        present = set(columns_of(rows))
        shown = [c for c in main_columns if c in present]
        notes.append(
            "Main columns only; every column (data, weights, times, each lower "
            "bound, the paper's other values) is in table.csv."
        )
    md = f"# {title}\n\n" + "".join(f"- {n}\n" for n in [*notes, LEGEND]) + "\n"
    md += markdown_table(rows, shown) + extra_md
    atomic_write(Path(out) / "table.md", md)
    atomic_write(Path(out) / "table.csv", csv_text(rows))


# ------------------------------------------------------------------------------------------
# Plots
# ------------------------------------------------------------------------------------------


def new_figure(nrows: int = 1, ncols: int = 1, **kwargs: Any) -> tuple[Any, Any]:
    """``plt.subplots`` on the Agg backend with a constrained layout (labels stay inside)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt.subplots(nrows, ncols, layout="constrained", **kwargs)


def save_figure(fig: Any, path: Path) -> None:
    """PNG at 120 dpi, written atomically; the figure is closed."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    atomic_write(Path(path), buf.getvalue())


def plot_points(
    ax: Any, points: Iterable[tuple[Any, Any]], *, join: bool = True, **style: Any
) -> bool:
    """Draw the finite positive ``(x, y)`` points, sorted by x; joined by a line when ``join``
    (sorted x, so a line never zig-zags), else markers only. Returns whether anything was
    drawn. ``style`` goes to ``ax.plot`` (give a ``marker`` so the legend shows it)."""
    pts = sorted((float(x), float(y)) for x, y in points if num(x) is not None and num(y))
    pts = [(x, y) for x, y in pts if y > 0]
    if not pts:
        return False
    style.setdefault("marker", "o")
    if not join:
        style["linestyle"] = "none"
    xs, ys = zip(*pts, strict=True)
    ax.plot(xs, ys, **style)
    return True


def finish_axes(
    ax: Any,
    xlabel: str,
    ylabel: str,
    title: str,
    *,
    logy: bool = True,
    legend_size: int = 8,
    legend_outside: bool = False,
) -> None:
    """Labels, grid, log y axis and a legend where it hides the fewest points, or outside the
    frame on the right (``legend_outside``: many entries, or lines spanning the whole width)."""
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    if not ax.get_legend_handles_labels()[0]:
        return
    if legend_outside:
        ax.legend(fontsize=legend_size, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    else:
        ax.legend(fontsize=legend_size, loc="best")


CURVE_KEYS = {  # LipschitzCallback metric -> (label, marker, joined)
    "lipschitz/autolip": ("AutoLip estimate", ".", True),
    "lipschitz/autolip_certified": ("AutoLip certified", "o", False),
    "lipschitz/seqlip": ("greedy SeqLip (estimate)", ".", True),
    "lipschitz/lower_bound": ("lower bound (certified)", ".", True),
}


def plot_curves(path: Path, curves: Mapping[str, Sequence[Mapping[str, Any]]], title: str) -> None:
    """One panel per run: the bounds recorded during training vs the global step (log y).
    ``curves`` maps a run name to its rows (``step`` and the ``lipschitz/*`` keys)."""
    n = max(len(curves), 1)
    ncols = min(n, 2)
    nrows = math.ceil(n / ncols)
    fig, axes = new_figure(nrows, ncols, figsize=(8.0 * ncols, 4.0 * nrows), squeeze=False)
    for ax, (run, rows) in zip(axes.flat, curves.items(), strict=False):
        for key, (label, marker, joined) in CURVE_KEYS.items():
            pts = [(r.get("step"), r.get(key)) for r in rows]
            hollow = {} if joined else {"mfc": "none"}
            plot_points(ax, pts, join=joined, marker=marker, ms=5, label=label, **hollow)
        if not rows:
            ax.text(0.5, 0.5, "no LipschitzCallback values", ha="center", transform=ax.transAxes)
        finish_axes(ax, "global step", "Lipschitz bound", run, logy=bool(rows), legend_outside=True)
    for ax in list(axes.flat)[len(curves) :]:
        ax.set_visible(False)
    fig.suptitle(title)
    save_figure(fig, path)
