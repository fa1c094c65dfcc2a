"""The stage skeleton (rlhfkit.stage): the order every training stage runs its steps in, and what
each step's failure leaves behind. The stages themselves are tested through it in test_sft,
test_reward, test_dpo and test_ppo_trainer; here the steps are plain functions that record calls."""

import json
import math

import pytest

from rlhfkit.artifacts import StageResult, claim_dir
from rlhfkit.errors import ConfigError, OutputError, TrainingError
from rlhfkit.stage import METRICS_FILE, Stage, run_stage


def recording_stage(out, calls, *, problems=(), finished=None, save_fails=False):
    """A stage whose steps append their names to ``calls``; load claims the folder as a stage does."""

    def validate():
        calls.append("validate")
        if problems:
            raise ConfigError("; ".join(problems))

    def load():
        calls.append("load")
        claim_dir(out)
        return 3

    def train(loaded):
        calls.append("train")
        assert not (out / METRICS_FILE).exists()
        return loaded * 2

    def save(trained):
        calls.append("save")
        if save_fails:
            raise TrainingError("disk full")
        (out / "model").mkdir()
        return {"stage": "toy", "trained": trained, "loss": math.nan}

    def was_finished():
        calls.append("finished")
        return finished

    return Stage("toy", out, validate=validate, finished=was_finished, load=load, train=train, save=save)


def test_steps_run_in_order_and_metrics_json_is_written_last(tmp_path):
    out, calls = tmp_path / "run", []
    result = run_stage(recording_stage(out, calls))
    assert calls == ["validate", "finished", "load", "train", "save"]
    # train got load's 3 and returned 6; a non-finite figure is written as null (strict JSON)
    assert result.metrics["trained"] == 6
    assert json.loads((out / METRICS_FILE).read_text()) == {"stage": "toy", "trained": 6, "loss": None}
    assert (out / "model").is_dir()


def test_a_bad_config_stops_before_the_folder_is_looked_at(tmp_path):
    out, calls = tmp_path / "run", []
    with pytest.raises(ConfigError, match="seed: must be >= 0; lr: must be > 0"):
        run_stage(recording_stage(out, calls, problems=["seed: must be >= 0", "lr: must be > 0"]))
    assert calls == ["validate"] and not out.exists()


def test_a_folder_of_the_users_own_is_refused_before_anything_loads(tmp_path):
    out, calls = tmp_path / "mine", []
    out.mkdir()
    (out / "notes.txt").write_text("my notes")
    with pytest.raises(OutputError):
        run_stage(recording_stage(out, calls))
    assert calls == ["validate"]
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


def test_another_stages_folder_is_refused(tmp_path):
    out, calls = tmp_path / "sft", []
    claim_dir(out)
    (out / "stage_config.json").write_text("{}")
    (out / METRICS_FILE).write_text(json.dumps({"stage": "sft"}))
    with pytest.raises(ConfigError, match="holds the output of the sft stage"):
        run_stage(recording_stage(out, calls))
    assert calls == ["validate"]


def test_a_finished_run_is_returned_without_loading(tmp_path):
    out, calls = tmp_path / "run", []
    earlier = StageResult(out, {"stage": "toy", "trained": 6})
    assert run_stage(recording_stage(out, calls, finished=earlier)) is earlier
    assert calls == ["validate", "finished"]


def test_a_failed_save_leaves_no_metrics_json(tmp_path):
    # metrics.json marks a stage complete: a run that failed after training must not look complete
    out, calls = tmp_path / "run", []
    with pytest.raises(TrainingError, match="disk full"):
        run_stage(recording_stage(out, calls, save_fails=True))
    assert calls[-1] == "save" and not (out / METRICS_FILE).exists()
