"""Publish a finished study run into the committed ``results/<study>/``: the explicit step.

    python -m experiments.studies.publish outputs/2026-01-01/12-00-00          # -> results/
    python -m experiments.studies.publish RUN_DIR --results-dir /tmp/results
    python experiments/train.py experiment=paper_mlp study.publish=true          # run + publish

A study writes only into its run directory; its last act is the manifest ``study.json``
(study name, quick or not, the tables and plots it wrote). Publishing copies those files into
``<results_dir>/<study>/``, each one atomically (a temporary file in the destination folder,
then ``os.replace``): a reader, or a kill at any moment, sees every table either whole and old
or whole and new. A run without a manifest (killed, still running) is refused, and so is a
``study.quick=true`` run unless ``--allow-quick`` (quick numbers are smoke tests, not results).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from experiments.reporting import atomic_write
from experiments.studies.driver import MANIFEST

__all__ = ["default_results_dir", "main", "publish"]


def default_results_dir() -> Path:
    """The repository's committed ``results/`` folder."""
    return Path(__file__).resolve().parents[2] / "results"


def publish(run_dir: Path, results_dir: Path | None = None, *, allow_quick: bool = False) -> Path:
    """Copy the outputs listed in ``run_dir/study.json`` into ``results_dir/<study>/``
    (each file replaced atomically); returns that folder."""
    run_dir = Path(run_dir)
    manifest_path = run_dir / MANIFEST
    if not manifest_path.is_file():
        raise FileNotFoundError(
            f"{manifest_path} not found: the study in {run_dir} did not finish (a study writes "
            "its manifest last), so there is nothing complete to publish; re-run it."
        )
    manifest = json.loads(manifest_path.read_text())
    if manifest.get("quick") and not allow_quick:
        raise ValueError(
            f"{run_dir} is a study.quick=true run (a smoke test, not the study's numbers); "
            "publish a full run, or pass allow_quick=True / --allow-quick on purpose."
        )
    files = [run_dir / name for name in manifest["files"]]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise FileNotFoundError(f"files listed in {manifest_path} are missing: {missing}")
    dest = Path(results_dir if results_dir is not None else default_results_dir())
    dest = dest / str(manifest["study"])
    dest.mkdir(parents=True, exist_ok=True)
    for src in files:  # read each whole first: a failure leaves the destination file as it was
        atomic_write(dest / src.name, src.read_bytes())
    return dest


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, help="the Hydra run directory of a study")
    parser.add_argument("--results-dir", type=Path, default=None, help="default: results/")
    parser.add_argument("--allow-quick", action="store_true", help="publish a quick run too")
    args = parser.parse_args(argv)
    try:
        dest = publish(args.run_dir, args.results_dir, allow_quick=args.allow_quick)
    except (FileNotFoundError, ValueError) as exc:
        parser.error(str(exc))  # the reason and what to do, without a traceback
    print(f"published {args.run_dir} -> {dest}")


if __name__ == "__main__":
    main()
