"""Logger factories for the Hydra configs."""

from __future__ import annotations

import os
from typing import Literal

from lightning.pytorch.loggers import WandbLogger


def wandb_logged_in() -> bool:
    """Whether W&B credentials are available (env var or ~/.netrc from `wandb login`)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        import wandb

        return bool(wandb.api.api_key)
    except Exception:
        return False


def wandb_logger(
    project: str = "lipreg",
    save_dir: str = ".",
    name: str | None = None,
    mode: Literal["auto", "online", "offline", "disabled"] = "auto",
    **kwargs,
) -> WandbLogger:
    """A ``WandbLogger`` that is online when logged in and offline otherwise.

    ``mode="auto"`` honours ``WANDB_MODE`` if set. Offline runs are written under
    ``<save_dir>/wandb/offline-run-*``; upload them later with ``wandb sync <that folder>``.
    """
    if mode not in ("auto", "online", "offline", "disabled"):
        raise ValueError(f"mode must be auto/online/offline/disabled, got {mode!r}.")
    if mode == "auto":
        env = os.environ.get("WANDB_MODE")
        mode = (
            env
            if env in ("online", "offline", "disabled")
            else ("online" if wandb_logged_in() else "offline")
        )
    os.makedirs(save_dir, exist_ok=True)
    return WandbLogger(project=project, save_dir=save_dir, name=name, mode=mode, **kwargs)
