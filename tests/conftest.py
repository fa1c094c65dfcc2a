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


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> Path:
    """A finished tiny chain (test_pipeline.TINY), shared read-only: a test that changes it works on a copy."""
    from rlhfkit.pipeline import run_chain
    from test_pipeline import tiny_config

    out = tmp_path_factory.mktemp("tiny-chain") / "run"
    run_chain(tiny_config(out), log=lambda _: None)
    return out
