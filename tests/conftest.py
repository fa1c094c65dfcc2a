"""Shared test set-up: never touch a hub; locate the real Open Assistant sample."""

import os
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_MODE", "disabled")

REPO_ROOT = Path(__file__).resolve().parents[1]
OASST_SAMPLE = REPO_ROOT.parent / "shared" / "data" / "oasst" / "oasst_en_100_trees.jsonl"


@pytest.fixture(scope="session")
def oasst_sample() -> Path:
    """The 100 real Open Assistant trees beside the project; skip when absent."""
    if not OASST_SAMPLE.is_file():
        pytest.skip(f"real Open Assistant sample not found at {OASST_SAMPLE}")
    return OASST_SAMPLE
