"""Fixtures shared by the test modules (small and generic; opt in with ``usefixtures``)."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture
def seeded() -> None:
    """Start from the same global torch RNG state, so that weights a test creates do not
    depend on which tests ran before it."""
    torch.manual_seed(0)


@pytest.fixture
def one_rank_group(tmp_path):
    """A one-process gloo group (fully_shard / FSDP need one); destroyed afterwards."""
    dist = torch.distributed
    if not dist.is_available() or dist.is_initialized():
        pytest.skip("needs torch.distributed and no process group already running")
    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1
    )
    try:
        yield
    finally:
        dist.destroy_process_group()
