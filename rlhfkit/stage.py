"""The skeleton every training stage runs: SFT, reward, DPO (TRL's trainers) and the RL stage.

1. validate: every problem of the config and of the objects given, in one line (ConfigError),
   before any data is read, model loaded or folder touched;
2. the output folder: one holding another stage's outputs, or files rlhfkit did not write,
   is refused (nothing in it is touched);
3. already finished? an earlier complete run of exactly this config is returned, not redone;
4. load: data, tokenizer and models (one set of loaders, safetensors only) and the checkpoint to
   resume from;
5. train;
6. save: the final model into ``output_dir/model`` (one ordinary folder, whatever the sharding)
   and the stage's figures of it;
7. ``metrics.json``, written last by the main process: its presence marks the stage complete.

A stage is its five callables (``Stage``); ``run_stage`` runs them in this order. Each stage's
module says what its steps do; nothing else is shared here.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Generic, TypeVar

from rlhfkit.artifacts import StageResult, check_output_dir, refuse_other_stage, sanitize, write_json_atomic

METRICS_FILE = "metrics.json"

Loaded = TypeVar("Loaded")
Trained = TypeVar("Trained")


@dataclass
class Stage(Generic[Loaded, Trained]):
    """What one stage does at each step of the skeleton (see the module docstring)."""

    name: str  # "sft", "reward", "dpo", "ppo": the name its folder is claimed under
    output_dir: Path
    validate: Callable[[], None]  # 1. raises ConfigError naming every problem
    finished: Callable[[], StageResult | None]  # 3. the result of an earlier complete run, else None
    load: Callable[[], Loaded]  # 4.
    train: Callable[[Loaded], Trained]  # 5.
    save: Callable[[Trained], dict[str, Any]]  # 6. the final model saved -> the stage's metrics


def run_stage(stage: Stage) -> StageResult:
    """Steps 1-7 of the module docstring, in order; every process of a launch runs them."""
    stage.validate()  # 1.
    refuse_other_stage(stage.output_dir, stage.name)  # 2.
    check_output_dir(stage.output_dir, stage.name)
    done = stage.finished()  # 3.
    if done is not None:
        return done
    metrics = stage.save(stage.train(stage.load()))  # 4.-6.
    write_metrics(stage.output_dir, metrics)  # 7.
    return StageResult(stage.output_dir, metrics)


def write_metrics(out: Path, metrics: dict[str, Any]) -> None:
    """metrics.json (non-finite floats as null), by the main process; the others wait for it."""
    from accelerate import PartialState

    state = PartialState()  # the launch's processes, as the stage's Trainer or Accelerator joined them
    if state.is_main_process:
        write_json_atomic(out / METRICS_FILE, sanitize(metrics))
    state.wait_for_everyone()
