"""Fixtures shared by the test files: one thread for torch, one tiny Qwen2.5-VL built once."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    # Tiny models run fastest on one thread, and do not fight other processes for the cores.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A randomly initialised "test"-size Qwen2.5-VL directory (seed 0). Read it, never write into it."""
    from zoomless.models.tiny import build_tiny_vlm

    return build_tiny_vlm(tmp_path_factory.mktemp("tiny") / "model", family="qwen2_5_vl", size="test", seed=0)
