"""Shared test set-up: never touch a hub; locate the real Open Assistant sample."""

import os
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_MODE", "disabled")



@pytest.fixture(scope="session")
def oasst_sample() -> Path:
    """The 100 real Open Assistant trees beside the project; skip when absent (fail under CI=true)."""
    from data_helpers import SAMPLE, require_shared

    return require_shared(SAMPLE)
