"""Shared pytest setup: GPU-marked tests skip with the reason on CPU machines."""

import os

import pytest
import torch

os.environ.setdefault("WANDB_MODE", "offline")


def pytest_collection_modifyitems(config, items):
    """Skip ``@pytest.mark.gpu`` tests when no CUDA device is present, saying why."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (Transformer Engine / NCCL / SGLang); this machine is CPU-only")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
