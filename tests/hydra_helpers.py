"""Hydra composition for the tests: the repository's ``conf/``, composed as a run would be.

``compose_config(overrides, tmp_path)`` composes ``conf/train.yaml`` with the overrides, with
Hydra's run directory, ``paths.output_dir`` and ``paths.results_dir`` inside ``tmp_path`` (so a
test never writes into ``outputs/`` or the committed ``results/``), and registers the Hydra
config so that ``${hydra:...}`` interpolations resolve as under ``@hydra.main``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"


def group_options(group: str) -> list[str]:
    """The options of a config group (``conf/<group>/*.yaml``), sorted by name."""
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def compose_config(
    overrides: Sequence[str],
    tmp_path: Path,
    *,
    run_subdir: str | None = None,
    config_name: str = "train",
) -> DictConfig:
    """Compose ``conf/<config_name>.yaml`` with ``overrides``, writing only under ``tmp_path``.

    The run's output directory is ``tmp_path`` (or ``tmp_path / run_subdir``), results go to
    ``tmp_path / "results"``; later overrides in ``overrides`` win over these defaults.
    The returned config includes the ``hydra`` node (as ``HydraConfig`` needs).
    """
    out = Path(tmp_path) / run_subdir if run_subdir else Path(tmp_path)
    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF)):
        cfg = compose(
            config_name=config_name,
            overrides=[f"hydra.run.dir={out}", f"paths.results_dir={tmp_path}/results", *overrides],
            return_hydra_config=True,
        )
    HydraConfig().set_config(cfg)
    with open_dict(cfg):
        cfg.paths.output_dir = str(out)
    return cfg


def clear_hydra() -> None:
    """Forget the global Hydra state (call after a test that composed a config)."""
    GlobalHydra.instance().clear()
