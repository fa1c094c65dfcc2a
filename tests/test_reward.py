"""Reward-model stage: real sample (from an SFT folder), reward read at the last non-pad
token with either padding side, margin column, gold agreement, resume, LoRA, config errors,
and a reward model that learns the embedded world's preferences.

The data and model fixtures come from test_sft.py.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from rlhfkit.config import load_config
from rlhfkit.errors import ConfigError, DataError

import trl  # noqa: F401,E402  (a dependency: missing it must fail, not skip)

from test_sft import (  # noqa: E402  (shared fixtures and helpers)
    SimulatedKill,
    kill_after_checkpoint,
    make_half_written_checkpoint,
    micro_model_dir,  # noqa: F401
    oasst_data,  # noqa: F401
    one_torch_thread,  # noqa: F401  (autouse)
    sft_config,
    step_losses,
    weights,
)


def reward_config(out: Path, model: Path | str, data: Path | None = None, **overrides):
    from rlhfkit.reward import RewardStageConfig

    base = {
        "output_dir": str(out),
        "model": str(model),
        "data": str(data) if data else "",
        "learning_rate": 3e-3,
        "max_steps": 6,
        "per_device_train_batch_size": 8,
        "per_device_eval_batch_size": 24,
        "max_length": 384,
        "logging_steps": 1,
        "save_steps": 2,
        "disable_tqdm": True,
    }
    base.update(overrides)
    return load_config(RewardStageConfig, base)


@pytest.fixture(scope="module")
def rm_model(micro_model_dir):  # noqa: F811
    """The micro model as a sequence-classification model with a score head, and its tokenizer."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(micro_model_dir))
    model = AutoModelForSequenceClassification.from_pretrained(str(micro_model_dir), num_labels=1)
    model.config.pad_token_id = tok.pad_token_id
    model.eval()
    return model, tok


def test_reward_on_real_sample_from_sft_folder(oasst_data, micro_model_dir, tmp_path):  # noqa: F811
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from rlhfkit.engine import reward_scores
    from rlhfkit.reward import train_reward
    from rlhfkit.sft import train_sft

    sft_out = tmp_path / "sft"
    train_sft(sft_config(sft_out, micro_model_dir, oasst_data, max_steps=2, eval_strategy="no"))
    out = tmp_path / "rm"
    # the SFT stage folder itself is the model: its model/ is found
    result = train_reward(reward_config(out, sft_out, oasst_data, max_steps=12, learning_rate=2e-3,
                                        eval_strategy="epoch"))
    m = result.metrics
    for key in ("eval_accuracy", "eval_loss", "train_loss", "train_loss_first", "pairs_per_s", "wall_time_s"):
        assert m[key] is not None and math.isfinite(m[key]), key
    assert 0.0 <= m["eval_accuracy"] <= 1.0 and m["eval_pairs"] > 0
    assert m["train_loss"] < m["train_loss_first"]
    assert m["gold_agreement"] is None and m["gold_pairs"] == 0  # real prompts: no gold judge
    assert m["train_pairs"] + m["train_pairs_dropped"]["too_long"] + m["train_pairs_dropped"]["identical"] == 48
    assert json.loads((out / "metrics.json").read_text()) == json.loads(json.dumps(m))
    # the saved model loads offline as a plain reward model and reproduces the held-out scores
    model = AutoModelForSequenceClassification.from_pretrained(str(out / "model"))
    tok = AutoTokenizer.from_pretrained(str(out / "model"))
    assert model.config.num_labels == 1 and model.config.pad_token_id == tok.pad_token_id != tok.eos_token_id
    rows = [json.loads(line) for line in (out / "eval_scores.jsonl").read_text().splitlines()]
    assert len(rows) == m["eval_pairs"]
    from datasets import load_from_disk

    from rlhfkit.reward import tokenize_pairs

    val, _ = tokenize_pairs(load_from_disk(str(oasst_data / "pairs"))["validation"], tok, margin_scale=0.0,
                            max_length=384, num_proc=None, where="val")
    scores = reward_scores(model, val["chosen_ids"], tok.pad_token_id)
    assert scores.tolist() == pytest.approx([r["chosen_reward"] for r in rows], abs=1e-5)
    acc = sum(r["chosen_reward"] > r["rejected_reward"] for r in rows) / len(rows)
    assert acc == pytest.approx(m["eval_accuracy"])
    assert m["eval_accuracy_se"] == pytest.approx((acc * (1 - acc) / len(rows)) ** 0.5)  # binomial SE


def test_reward_is_read_at_the_last_non_pad_token(rm_model):
    """Pitfall 3: left and right padding give the same rewards, equal to unpadded ones,
    and the training collator's batch reads the same token."""
    import torch
    from trl.trainer.reward_trainer import DataCollatorForPreference

    from rlhfkit.engine import reward_scores

    model, tok = rm_model
    convs = [
        [{"role": "user", "content": "Say the word tiger."}, {"role": "assistant", "content": "tiger"}],
        [{"role": "user", "content": "Reverse these words: apple river stone"},
         {"role": "assistant", "content": "stone river apple. I hope this helps! Let me know if you need anything."}],
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}],
    ]
    seqs = [tok.apply_chat_template(c, tokenize=True, return_dict=True)["input_ids"] for c in convs]
    assert len({len(s) for s in seqs}) == 3 and all(s[-1] == tok.eos_token_id for s in seqs)
    alone = torch.tensor([model(input_ids=torch.tensor([s])).logits.item() for s in seqs])
    right = reward_scores(model, seqs, tok.pad_token_id, padding_side="right")
    left = reward_scores(model, seqs, tok.pad_token_id, padding_side="left")
    torch.testing.assert_close(right, alone, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(left, alone, rtol=1e-5, atol=1e-5)
    # TRL's training batch (right padding, chosen then rejected) through the model's own head
    batch = DataCollatorForPreference(pad_token_id=tok.pad_token_id)(
        [{"chosen_ids": seqs[0], "rejected_ids": seqs[1]}, {"chosen_ids": seqs[2], "rejected_ids": seqs[0]}]
    )
    with torch.no_grad():
        trained = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.squeeze(-1)
    torch.testing.assert_close(trained, alone[[0, 2, 1, 0]], rtol=1e-5, atol=1e-5)


def test_margin_column_only_when_margin_scale_is_positive(rm_model, oasst_data):  # noqa: F811
    from datasets import load_from_disk

    from rlhfkit.reward import tokenize_pairs
    from rlhfkit.reward.train import trainer_columns

    _, tok = rm_model
    pairs = load_from_disk(str(oasst_data / "pairs"))["train"].select(range(12))
    plain, _ = tokenize_pairs(pairs, tok, margin_scale=0.0, max_length=None, num_proc=None, where="t")
    assert "margin" not in plain.column_names and "margin" not in trainer_columns(plain).column_names
    with_margin, _ = tokenize_pairs(pairs, tok, margin_scale=0.5, max_length=None, num_proc=None, where="t")
    assert trainer_columns(with_margin).column_names == ["chosen_ids", "rejected_ids", "margin"]
    for row in with_margin:
        assert row["margin"] == pytest.approx(0.5 * (row["rejected_rank"] - row["chosen_rank"]))
        assert row["margin"] > 0
    # group_by_length sampling reads the longer side of each pair
    grouped = trainer_columns(plain, with_length=True)
    assert grouped.column_names == ["chosen_ids", "rejected_ids", "length"]
    assert grouped["length"] == [max(len(r["chosen_ids"]), len(r["rejected_ids"])) for r in plain]
    # one BOS, eos last, and chosen != rejected after tokenization (docs/pitfalls.md#2, #5)
    for row in plain:
        for ids in (row["chosen_ids"], row["rejected_ids"]):
            assert ids.count(tok.bos_token_id) == 1 and ids[-1] == tok.eos_token_id
        assert row["chosen_ids"] != row["rejected_ids"]


def test_too_long_and_identical_pairs_are_dropped_and_counted(rm_model):
    from datasets import Dataset

    from rlhfkit.reward import tokenize_pairs

    _, tok = rm_model
    user = [{"role": "user", "content": "Say the word tiger."}]
    rows = [
        {"prompt": user, "chosen": [{"role": "assistant", "content": "tiger"}],
         "rejected": [{"role": "assistant", "content": "lion"}]},
        {"prompt": user, "chosen": [{"role": "assistant", "content": "tiger"}],
         "rejected": [{"role": "assistant", "content": "tiger"}]},
        {"prompt": user, "chosen": [{"role": "assistant", "content": "tiger " * 50}],
         "rejected": [{"role": "assistant", "content": "no"}]},
    ]
    kept, dropped = tokenize_pairs(Dataset.from_list(rows), tok, margin_scale=0.0, max_length=40, num_proc=None,
                                   where="t")
    assert len(kept) == 1 and dropped == {"too_long": 1, "identical": 1}
    bad = [{"prompt": user, "chosen": [{"role": "user", "content": "x"}], "rejected": rows[0]["rejected"]}]
    with pytest.raises(DataError, match="chosen must be a one-element list with an assistant message"):
        tokenize_pairs(Dataset.from_list(bad), tok, margin_scale=0.0, max_length=None, num_proc=None, where="t")


def test_gold_agreement_counts_only_pairs_gold_can_order():
    from rlhfkit.reward import gold_agreement

    task = [{"role": "user", "content": "Reverse these words: apple river stone"}]
    other = [{"role": "user", "content": "What is the capital of France?"}]
    prompts = [task, task, task, other]
    chosen = ["stone river apple", "stone river apple", "apple", "Paris"]
    rejected = ["apple river stone", "stone river apple. I hope this helps!", "river", "Lyon"]
    # gold: (1.0, 0.0) agree; (1.0, 0.7) reward disagrees; (0, 0) equal -> skipped; unknown prompt -> skipped
    value, counted, golds = gold_agreement("auto", prompts, chosen, rejected, [2.0, 0.1, 1.0, 5.0], [1.0, 0.5, 0.0, 0.0])
    assert counted == 2 and value == pytest.approx(0.5)
    assert golds[0] == (1.0, 0.0) and golds[1] == pytest.approx((1.0, 0.7)) and golds[3] is None
    assert gold_agreement("off", prompts, chosen, rejected, [0.0] * 4, [0.0] * 4)[0] is None
    assert gold_agreement("auto", [other], ["a"], ["b"], [1.0], [0.0]) == (None, 0, None)


def test_reward_resume_after_kill(oasst_data, micro_model_dir, tmp_path):  # noqa: F811
    """Resume equivalence for the reward stage, margin and centring on."""
    import torch

    from rlhfkit.reward import train_reward

    extra = {"margin_scale": 0.25, "center_rewards_coefficient": 0.01, "eval_strategy": "no"}
    train_reward(reward_config(tmp_path / "a", micro_model_dir, oasst_data, **extra))
    out = tmp_path / "b"
    with pytest.raises(SimulatedKill):
        train_reward(reward_config(out, micro_model_dir, oasst_data, **extra), callbacks=[kill_after_checkpoint(2)])
    make_half_written_checkpoint(out / "checkpoints", 4, out / "checkpoints" / "checkpoint-2")
    resumed = train_reward(reward_config(out, micro_model_dir, oasst_data, **extra))
    assert resumed.metrics["resumed_from"].endswith("checkpoint-2") and resumed.metrics["steps_this_run"] == 4
    a, b = step_losses(tmp_path / "a"), step_losses(out)
    assert sorted(a) == sorted(b) == list(range(1, 7))
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=1e-5, abs=1e-6), step
    wa, wb = weights(tmp_path / "a" / "model"), weights(out / "model")
    for name in wa:
        torch.testing.assert_close(wb[name], wa[name], rtol=1e-5, atol=1e-6)


def test_reward_lora_saves_a_plain_model(oasst_data, micro_model_dir, tmp_path):  # noqa: F811
    from transformers import AutoModelForSequenceClassification

    from rlhfkit.reward import train_reward

    out = tmp_path / "lora"
    m = train_reward(reward_config(out, micro_model_dir, oasst_data, lora=True, lora_r=4, max_steps=2,
                                   eval_strategy="no")).metrics
    assert m["lora"] is True and math.isfinite(m["eval_loss"])
    saved = weights(out / "model")
    assert "score.weight" in saved and not any("lora" in k or "modules_to_save" in k for k in saved)
    model = AutoModelForSequenceClassification.from_pretrained(str(out / "model"))
    assert model.config.num_labels == 1


def test_reward_config_and_model_errors(oasst_data, micro_model_dir, tmp_path, rm_model, capsys):  # noqa: F811
    from rlhfkit.cli import main
    from rlhfkit.reward import train_reward

    with pytest.raises(ConfigError, match="unknown key 'margin_scal' \\(did you mean 'margin_scale'\\?\\)"):
        reward_config(tmp_path, micro_model_dir, oasst_data, margin_scal=0.1)
    with pytest.raises(ConfigError, match="gold_agreement: must be one of 'auto', 'on', 'off'"):
        reward_config(tmp_path, micro_model_dir, oasst_data, gold_agreement="maybe")
    with pytest.raises(ConfigError, match="margin_scale: must be >= 0"):
        reward_config(tmp_path, micro_model_dir, oasst_data, margin_scale=-1)
    with pytest.raises(ConfigError, match="center_rewards_coefficient: must be >= 0"):
        reward_config(tmp_path, micro_model_dir, oasst_data, center_rewards_coefficient=-0.1)
    with pytest.raises(DataError, match="pairs"):
        train_reward(reward_config(tmp_path / "x", micro_model_dir, tmp_path))  # a folder without pairs/
    # a tokenizer whose pad is eos would read rewards at the wrong token: refused
    model, tok = rm_model
    same = tok.__class__.from_pretrained(str(micro_model_dir))
    same.pad_token = same.eos_token
    with pytest.raises(ConfigError, match="pad token must exist and differ from eos"):
        train_reward(reward_config(tmp_path / "y", micro_model_dir, oasst_data), model=model, tokenizer=same)
    config = tmp_path / "reward.yaml"
    config.write_text(f"model: {micro_model_dir}\ndata: {oasst_data}\nmargin_scal: 0.1\n")
    assert main(["reward", str(config), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "did you mean 'margin_scale'" in err


@pytest.mark.slow
def test_reward_model_learns_the_embedded_world(tmp_path):
    """On the synthetic world, held-out pairs are ordered as the annotators ordered them
    clearly above chance, and the reward order agrees with the gold judge."""
    import rlhfkit.data as data_mod  # our own modules: a broken import must fail, not skip
    import rlhfkit.world.synth as synth

    from rlhfkit.reward import train_reward
    from rlhfkit.world.model import ModelInitConfig, init_model

    world = tmp_path / "world.jsonl"
    synth.synth_data(synth.SynthConfig(out=str(world), trees=1000, seed=0, annotator_noise=0.0))
    data_mod.build_data(data_mod.DataBuildConfig(sources=[str(world)], out=str(tmp_path / "data"), val_fraction=0.2))
    init_model(ModelInitConfig(out=str(tmp_path / "model"), corpus=str(world), vocab_size=512, size="micro"))
    m = train_reward(reward_config(
        tmp_path / "rm", tmp_path / "model", tmp_path / "data", max_steps=-1, num_train_epochs=3,
        per_device_train_batch_size=32, per_device_eval_batch_size=64, logging_steps=10, save_steps=1000,
        eval_strategy="no", max_length=128,
    )).metrics
    assert m["gold_pairs"] > 100
    assert m["eval_accuracy"] >= 0.62, m
    assert m["gold_agreement"] >= 0.7, m


def test_a_tokenizer_without_chat_template_is_refused_before_loading(oasst_data, micro_model_dir, tmp_path):  # noqa: F811
    """Conversational pairs need a chat template; the error names the fix (TRL's chat_template_path)."""
    import shutil

    from rlhfkit.reward import train_reward
    from rlhfkit.sft import train_sft

    bare = tmp_path / "bare"
    shutil.copytree(micro_model_dir, bare)
    (bare / "chat_template.jinja").unlink()
    cfg = json.loads((bare / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (bare / "tokenizer_config.json").write_text(json.dumps(cfg))
    for train, make in ((train_sft, sft_config), (train_reward, reward_config)):
        with pytest.raises(ConfigError, match="has no chat template; give one with chat_template_path"):
            train(make(tmp_path / make.__name__, bare, oasst_data))
    # the template given as a file works for the reward stage, which tokenizes pairs itself
    m = train_reward(reward_config(tmp_path / "rm", bare, oasst_data, max_steps=1, eval_strategy="no",
                                   chat_template_path=str(micro_model_dir / "chat_template.jinja"))).metrics
    assert math.isfinite(m["eval_loss"])
