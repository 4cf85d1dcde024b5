"""Train a network with Lipschitz monitoring (and optionally a penalty), configured by Hydra.

    python experiments/train.py                       # the paper's 4-layer CNN on digits
    python experiments/train.py model=alexnet         # AlexNet at 224x224 on digits
    python experiments/train.py model=mlp logger=csv  # an MLP, CSV logs
    python experiments/train.py experiment=paper_mlp  # a study of the paper (see conf/)
    python experiments/train.py -m penalty=autolip penalty.weight=1e-4,1e-3,1e-2
    python experiments/train.py ckpt_path=outputs/train/<date>/checkpoints/last.ckpt  # resume
    python -m experiments.train ...                   # the same, as a module

Compose ``conf/train.yaml``, then :func:`experiments.run.train`: instantiate, fit (or resume
from ``ckpt_path``), test; write the certified bounds of the trained network to
``<output_dir>/bounds.json`` and ``bounds.md`` and log them to every logger.

``experiments`` is an installed package (``pip install -e ".[experiments]"``), so this file
runs from any working directory; Hydra reads ``conf/`` next to this file's folder.
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from experiments.run import train

__all__ = ["main"]


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    """Run ``cfg``; the validation loss is the value a Hydra sweeper optimises."""
    metrics = train(cfg)
    value = metrics.get("val/loss")
    return float(value) if value is not None else None


if __name__ == "__main__":
    main()
