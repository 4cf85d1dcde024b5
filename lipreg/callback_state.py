"""What :class:`lipreg.LipschitzCallback` keeps in a checkpoint: its warm-start vectors.

Plain tensors, lists and ints only, so that checkpoints load with ``weights_only=True``.
Version 2: the checkpoint no longer fixes ``input_shape`` / ``methods`` of the resumed fit
(they are re-derived); ``input_shape`` records the shape the warm vectors belong to. Version 1
states load (their ``methods`` entry is ignored).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from lipreg.callback_inputs import describe

__all__ = ["STATE_VERSION", "WarmState", "read_state"]

STATE_VERSION = 2


@dataclass
class WarmState:
    """Warm-start vectors of AutoLip and SeqLip, the input shape they belong to, and the
    global step of the last computation."""

    autolip: dict[str, Tensor] = field(default_factory=dict)
    seqlip: dict[str, Tensor] = field(default_factory=dict)
    input_shape: tuple[int, ...] | None = None
    last_step: int = -1

    def as_dict(self) -> dict[str, Any]:
        """The checkpoint entry (detached CPU tensors)."""
        shape = self.input_shape
        return {
            "version": STATE_VERSION,
            "input_shape": list(shape) if shape is not None else None,
            "autolip": {k: v.detach().cpu() for k, v in self.autolip.items()},
            "seqlip": {k: v.detach().cpu() for k, v in self.seqlip.items()},
            "last_step": self.last_step,
        }


def read_state(state_dict: Any) -> WarmState:
    """Parse a checkpoint entry of versions 1 to :data:`STATE_VERSION`.

    Raises:
        ValueError: the entry is newer or damaged; the message completes "the state ...".
    """
    version = state_dict.get("version", 0) if isinstance(state_dict, dict) else None
    if not isinstance(version, int) or version > STATE_VERSION:
        raise ValueError(
            f"has version {version!r}; this lipreg reads versions 1 to {STATE_VERSION}"
        )
    try:
        shape = state_dict.get("input_shape")
        autolip = {str(k): v for k, v in dict(state_dict.get("autolip", {})).items()}
        seqlip = {str(k): v for k, v in dict(state_dict.get("seqlip", {})).items()}
        if not all(isinstance(v, Tensor) for v in (autolip | seqlip).values()):
            raise TypeError("warm-start entries that are not tensors")
        return WarmState(
            autolip=autolip,
            seqlip=seqlip,
            input_shape=tuple(int(s) for s in shape) if shape else None,
            last_step=int(state_dict.get("last_step", -1)),
        )
    except Exception as exc:
        raise ValueError(f"cannot be read ({describe(exc, 300)})") from exc
