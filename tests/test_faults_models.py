"""Nothing lost, round 2: models that would load with a newly initialised head, and lengths.

A reward or value model whose scoring head is not in its folder (a causal LM, a bare encoder)
or that gives several scores per sequence, and a policy folder without a language-model head,
are refused in one line before the output folder is touched; a value model initialised from
the policy on purpose loads and says so.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from rlhfkit.artifacts import load_pretrained, load_scoring_model
from rlhfkit.errors import ConfigError
from cli_helpers import one_line_error


@pytest.fixture
def empty_yaml(tmp_path) -> Path:
    path = tmp_path / "empty.yaml"
    path.write_text("{}\n")
    return path


def _ppo(run: Path, empty: Path, out: Path, **keys: str) -> list[str]:
    given = {"model": run / "sft", "reward_model": run / "reward", "data": run / "data", "output_dir": out,
             "num_updates": 1, "rollout_batch_size": 8, "num_mini_batches": 1, "per_device_train_batch_size": 8,
             "response_length": 8, **keys}
    return ["ppo", str(empty), *(f"{k}={v}" for k, v in given.items())]


def test_a_causal_lm_as_reward_model_is_refused_before_anything_is_written(tiny_run, empty_yaml, tmp_path, capsys):
    out = tmp_path / "ppo"
    line = one_line_error(capsys, _ppo(tiny_run, empty_yaml, out, reward_model=tiny_run / "sft"))
    assert "LlamaForCausalLM" in line and "newly initialised" in line and "rlhfkit reward" in line
    line = one_line_error(capsys, _ppo(tiny_run, empty_yaml, out, value_model=tiny_run / "sft"))
    assert line.startswith(f"rlhfkit: error: value_model {tiny_run / 'sft'}: holds a LlamaForCausalLM")
    line = one_line_error(capsys, _ppo(tiny_run, empty_yaml, out, model=tiny_run / "reward"))
    assert "LlamaForSequenceClassification, not a language model" in line
    assert not out.exists()
    line = one_line_error(capsys, ["eval", str(empty_yaml), f"policy={tiny_run / 'ppo'}", f"reference={tiny_run / 'sft'}",
                                    f"reward_model={tiny_run / 'sft'}", f"data={tiny_run / 'data'}",
                                    f"output_dir={tmp_path / 'eval'}", "max_prompts=2"])
    assert "newly initialised" in line and not (tmp_path / "eval").exists()
    line = one_line_error(capsys, ["sft", str(empty_yaml), f"model={tiny_run / 'reward'}", f"data={tiny_run / 'data'}",
                                    f"output_dir={tmp_path / 'sft'}"])
    assert "not a language model" in line


def test_a_reward_model_with_several_scores_is_refused(tiny_run, tmp_path):
    three = tmp_path / "three-labels"
    shutil.copytree(tiny_run / "reward" / "model", three)
    config = json.loads((three / "config.json").read_text())
    config["id2label"] = {str(i): f"LABEL_{i}" for i in range(3)}
    config["label2id"] = {f"LABEL_{i}": i for i in range(3)}
    (three / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="gives 3 scores per sequence"):
        load_scoring_model(three)


def test_missing_weights_are_named_even_without_architectures(tiny_run, tmp_path):
    """A folder whose config names no architecture (as some hub uploads) is caught by the load's own report."""
    bare = tmp_path / "bare"
    shutil.copytree(tiny_run / "sft" / "model", bare)
    config = json.loads((bare / "config.json").read_text())
    del config["architectures"]
    (bare / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=r"scoring head would be newly initialised \(score.weight not in the folder\)"):
        load_scoring_model(bare)
    cut = tmp_path / "cut"  # a policy folder that lost a layer's weight
    shutil.copytree(tiny_run / "ppo" / "model", cut)
    tensors = load_file(cut / "model.safetensors")
    dropped = sorted(tensors)[-1]
    save_file({k: v for k, v in tensors.items() if k != dropped}, cut / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ConfigError, match=f"1 weight\\(s\\) of the model are not in the folder \\({dropped}\\)"):
        load_pretrained(AutoModelForCausalLM, cut)


def test_a_value_model_from_the_policy_starts_its_head_on_purpose_and_says_so(tiny_run, capsys):
    value = load_scoring_model(tiny_run / "sft" / "model", "value_model", new_head="initialised from the policy")
    assert "value_model: initialised from the policy; its head (score.weight) starts new, as intended" in capsys.readouterr().err
    policy = load_pretrained(AutoModelForCausalLM, tiny_run / "sft" / "model")
    backbone = dict(policy.model.named_parameters())
    assert all(torch.equal(p, backbone[n]) for n, p in value.model.named_parameters())  # only the head is new
    trained = load_scoring_model(tiny_run / "reward")  # the reward stage's folder: its model/ inside
    assert trained.config.num_labels == 1


@pytest.mark.parametrize("override, key", [("ppo.response_length=600", "ppo.response_length"),
                                           ("ppo.response_length=100000", "ppo.response_length"),
                                           ("sft.max_length=2000", "sft.max_length"),
                                           ("eval.response_length=400", "eval.response_length"),
                                           ("model.max_position_embeddings=64", "ppo.response_length")])
def test_every_length_is_checked_against_the_models_positions_before_any_stage(tmp_path, capsys, override, key):
    import yaml

    from test_pipeline import TINY

    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(TINY))
    out = tmp_path / "run"
    line = one_line_error(capsys, ["run", str(config), override, "--out", str(out)])
    positions = 64 if "64" in override else 512  # the embedded model's max_position_embeddings
    assert f"tiny.yaml: {key}: " in line and f"the model has {positions} positions" in line, line
    assert not out.exists()


def test_a_stage_alone_checks_its_lengths_against_its_model(tiny_run, empty_yaml, tmp_path, capsys):
    out = tmp_path / "ppo"
    line = one_line_error(capsys, _ppo(tiny_run, empty_yaml, out, response_length=600))
    assert "max_prompt_length 256 + response_length 600 = 856 tokens, but the model has 512 positions" in line
    line = one_line_error(capsys, ["sft", str(empty_yaml), f"model={tiny_run / 'model'}", f"data={tiny_run / 'data'}",
                                    f"output_dir={tmp_path / 'sft'}", "max_length=4096"])
    assert "max_length: 4096 tokens, but the model has 512 positions" in line
    assert not out.exists() and not (tmp_path / "sft").exists()


def test_a_model_name_that_is_no_folder_and_not_reachable_fails_at_once_before_any_stage(tmp_path, capsys, monkeypatch):
    """Offline: not in the local cache. Online: one look at the hub with a short timeout (here a closed port on
    this machine: refused at once), never a loader's retries after the world and data stages ran."""
    import yaml
    from huggingface_hub import constants

    from test_pipeline import TINY

    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(TINY))
    out = tmp_path / "run"
    line = one_line_error(capsys, ["run", str(config), "model.name=someone/not-cached", "--out", str(out)])
    assert "model.name: someone/not-cached: not a folder here, and not in the local hub cache" in line
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # discard port: nothing listens
    line = one_line_error(capsys, ["run", str(config), "model.name=someone/not-cached", "--out", str(out)])
    assert "the hub did not answer within 5 s" in line
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "loop1").symlink_to("loop2")
    (tmp_path / "d" / "loop2").symlink_to("loop1")
    monkeypatch.chdir(tmp_path)
    line = one_line_error(capsys, ["run", str(config), "model.name=d/loop1", "--out", str(out)])
    assert "d/loop1: a symbolic link loop (d/loop1 -> loop2 -> loop1)" in line
    (tmp_path / "empty").mkdir()
    (tmp_path / "weights.safetensors").write_bytes(b"")
    line = one_line_error(capsys, ["run", str(config), f"model.name={tmp_path / 'empty'}", "--out", str(out)])
    assert "empty: holds no config.json, so it is not a model folder" in line
    line = one_line_error(capsys, ["run", str(config), f"model.name={tmp_path / 'weights.safetensors'}", "--out", str(out)])
    assert "weights.safetensors: a file, not a model folder" in line
    assert not out.exists()


def test_the_evaluation_alone_checks_prompt_and_response_against_the_models_positions(tiny_run, empty_yaml, tmp_path,
                                                                                     capsys):
    line = one_line_error(capsys, ["eval", str(empty_yaml), f"policy={tiny_run / 'ppo'}", f"reference={tiny_run / 'sft'}",
                                    f"data={tiny_run / 'data'}", f"output_dir={tmp_path / 'eval'}", "max_prompts=2",
                                    "response_length=600"])
    assert "eval: response_length: the longest prompt (" in line and "+ response_length 600" in line
    assert "the model has 512 positions" in line and "or set max_prompt_length" in line
    assert not (tmp_path / "eval").exists()


def test_a_chain_without_held_out_prompts_stops_after_the_data_stage(tmp_path, capsys):
    import yaml

    from test_pipeline import TINY

    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump({**TINY, "data": {"val_fraction": 0.0}}))
    line = one_line_error(capsys, ["run", str(config), "--out", str(tmp_path / "run")])
    assert "holds no held-out prompts for the evaluation (data.val_fraction 0.0)" in line
    assert (tmp_path / "run" / "data").is_dir() and not (tmp_path / "run" / "sft").exists()  # nothing trained
