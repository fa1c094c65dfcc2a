"""The DPO stage on the real Open Assistant sample's pairs: it learns the pairs it trains on,
reports TRL's implicit-reward figures before and after, saves a plain causal LM (LoRA merged,
the reference being the adapter disabled), and refuses bad input in one line.

The data and model fixtures come from test_sft.py.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from rlhfkit.config import load_config
from rlhfkit.errors import ConfigError

from test_sft import (  # noqa: E402  (shared fixtures)
    micro_model_dir,  # noqa: F401
    oasst_data,  # noqa: F401
    one_torch_thread,  # noqa: F401  (autouse)
    weights,
)


def dpo_config(out: Path, model: Path, data: Path | None = None, **overrides):
    from rlhfkit.dpo import DPOStageConfig

    base = {"output_dir": str(out), "model": str(model), "data": str(data) if data else "", "learning_rate": 3e-3,
            "num_train_epochs": 4, "per_device_train_batch_size": 8, "per_device_eval_batch_size": 24,
            "max_length": 256, "logging_steps": 1, "save_steps": 1000, "disable_tqdm": True, "beta": 0.1}
    base.update(overrides)
    return load_config(DPOStageConfig, base)


def test_dpo_learns_the_real_pairs_and_reports_implicit_rewards(oasst_data, micro_model_dir, tmp_path):  # noqa: F811
    from rlhfkit.dpo import train_dpo

    out = tmp_path / "dpo"
    result = train_dpo(dpo_config(out, micro_model_dir, oasst_data))
    history = json.loads((out / "log_history.json").read_text())
    train = [e for e in history if "rewards/accuracies" in e and "loss" in e]
    assert len(train) == result.metrics["steps"] == 4 * math.ceil(48 / 8)  # 48 training pairs, 4 epochs
    # step 1: the policy is the reference, so every implicit reward is 0 and the loss is log 2
    assert train[0]["loss"] == pytest.approx(math.log(2), abs=1e-3)
    assert train[0]["rewards/margins"] == pytest.approx(0.0, abs=1e-3)
    # the last epoch: the chosen replies of the pairs it trains on win clearly
    last_epoch = train[-6:]
    assert sum(e["rewards/accuracies"] for e in last_epoch) / 6 >= 0.8, last_epoch
    assert sum(e["loss"] for e in last_epoch) / 6 < 0.5 * math.log(2)
    m = result.metrics
    assert m["stage"] == "dpo" and m["algorithm"] == "dpo" and m["pairs"] == 48 and m["eval_pairs"] == 24
    assert m["eval_reward_margin_start"] == pytest.approx(0.0, abs=1e-4)  # before training: the reference itself
    assert m["eval_loss_start"] == pytest.approx(math.log(2), abs=1e-3)
    for key in ("eval_loss", "eval_reward_accuracy", "eval_reward_margin"):
        assert math.isfinite(m[key])
    assert 0.0 <= m["eval_reward_accuracy"] <= 1.0
    assert json.loads((out / "metrics.json").read_text()) == json.loads(json.dumps(m))
    # a plain causal LM that differs from the SFT model it started from
    assert (out / "model" / "model.safetensors").is_file() and not list((out / "model").glob("*.bin"))
    before, after = weights(micro_model_dir), weights(out / "model")
    assert max((after[k] - before[k]).abs().max().item() for k in before) > 1e-3
    # re-running the finished stage does nothing
    again = train_dpo(dpo_config(out, micro_model_dir, oasst_data))
    assert again.metrics == result.metrics


def test_dpo_with_lora_uses_the_disabled_adapter_as_reference_and_saves_merged(oasst_data, micro_model_dir,  # noqa: F811
                                                                               tmp_path):
    from transformers import AutoModelForCausalLM

    from rlhfkit.dpo import build_dpo_trainer, train_dpo

    config = dpo_config(tmp_path / "lora", micro_model_dir, oasst_data, lora=True, lora_r=4, num_train_epochs=1,
                        learning_rate=1e-2, lora_dropout=0.0)
    prepared = build_dpo_trainer(config)
    assert prepared.trainer.ref_model is None  # no copy: the reference is the adapter disabled
    result = train_dpo(config)
    assert result.metrics["lora"] is True
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "lora" / "model")
    assert not any("lora" in name for name, _ in model.named_parameters())  # merged
    before, after = weights(micro_model_dir), weights(tmp_path / "lora" / "model")
    assert max((after[k] - before[k]).abs().max().item() for k in before) > 1e-5


def test_dpo_bad_input_is_one_line(oasst_data, micro_model_dir, tmp_path, capsys):  # noqa: F811
    from rlhfkit.cli import main

    cfg = tmp_path / "dpo.yaml"
    cfg.write_text(f"output_dir: {tmp_path / 'out'}\nmodel: {micro_model_dir}\ndata: {tmp_path / 'nowhere'}\n")
    assert main(["dpo", str(cfg)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nowhere" in err[0] and "Traceback" not in err[0]
    with pytest.raises(ConfigError, match="beta"):
        dpo_config(tmp_path / "x", micro_model_dir, oasst_data, beta="high")
