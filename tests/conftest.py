"""Fixtures shared by the test modules (small and generic; opt in with ``usefixtures``)."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture
def seeded() -> None:
    """Start from the same global torch RNG state, so that weights a test creates do not
    depend on which tests ran before it."""
    torch.manual_seed(0)
