"""A real pretrained model (SmolLM2-135M-Instruct, imported from GGUF) through every stage.

The real-model pitfalls a 2 M-parameter model of our own cannot show: pad = eos, a ChatML
template with a default system prompt and a newline after each turn's EOS, grouped-query
attention (9 query heads, 3 KV heads), tied embeddings, rope_theta 100000; and a reward
model with another tokenizer (all-MiniLM-L6-v2, a BERT encoder). See tests/real_model.py
for where the models come from. Slow (a LoRA step of the 135 M model takes seconds on
2 cores): every run here is a few steps.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from real_model import minilm_dir, smollm2_dir

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
CHAT = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def smollm2() -> Path:
    return smollm2_dir()


@pytest.fixture(scope="module")
def tokenizer(smollm2):
    from rlhfkit.artifacts import load_tokenizer

    return load_tokenizer(smollm2)


@pytest.fixture(scope="module")
def policy(smollm2):
    from transformers import AutoModelForCausalLM

    from rlhfkit.artifacts import load_pretrained

    return load_pretrained(AutoModelForCausalLM, smollm2).eval()


# -- import -------------------------------------------------------------------------------------


def test_import_keeps_the_config_and_writes_safetensors_only(smollm2, tokenizer):
    config = json.loads((smollm2 / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["rope_parameters"]["rope_theta"] == 100000.0  # not Llama's default 10000
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["num_hidden_layers"]) == (9, 3, 30)
    assert config["tie_word_embeddings"] is True
    assert "quantization_config" not in config  # the folder is plain float32; nothing points at the GGUF file
    weights = sorted(p.name for p in smollm2.iterdir() if p.suffix in (".safetensors", ".bin", ".pt", ".pth"))
    assert weights == ["model.safetensors"]
    record = json.loads((smollm2 / "gguf_import.json").read_text())
    assert record["parameters"] == 134_515_008 and record["check"].startswith("logits of the saved folder equal")
    assert tokenizer.eos_token == tokenizer.pad_token == "<|im_end|>"
    assert "You are a helpful AI assistant named SmolLM" in tokenizer.chat_template


def test_import_refuses_what_is_not_gguf_and_a_users_folder(tmp_path, smollm2):
    cli = [sys.executable, "-m", "rlhfkit.cli", "model", "import"]
    text = tmp_path / "model.gguf"
    text.write_text("not a model")
    proc = subprocess.run([*cli, str(text), "--out", str(tmp_path / "out")], capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1
    assert "not a GGUF file" in proc.stderr and not (tmp_path / "out").exists()
    users = tmp_path / "mine"
    users.mkdir()
    (users / "notes.txt").write_text("keep me")
    gguf = next((smollm2.parent / "gguf").glob("*.gguf"))
    proc = subprocess.run([*cli, str(gguf), "--out", str(users)], capture_output=True, text=True)
    assert proc.returncode == 2 and "holds files rlhfkit did not write" in proc.stderr
    assert sorted(p.name for p in users.iterdir()) == ["notes.txt"]


def test_every_stage_loader_loads_the_imported_folder(smollm2):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
    from transformers.models.llama import modeling_llama as llama

    from rlhfkit.training import load_model

    causal = load_model(str(smollm2), AutoModelForCausalLM, None, False)  # SFT and PPO (TRL's loader)
    assert type(causal) is llama.LlamaForCausalLM
    assert causal.lm_head.weight.data_ptr() == causal.model.embed_tokens.weight.data_ptr()  # still tied
    scorer = load_model(str(smollm2), AutoModelForSequenceClassification, None, False, num_labels=1)  # reward stage
    assert type(scorer) is llama.LlamaForSequenceClassification and scorer.score.out_features == 1
    assert scorer.config.rope_parameters["rope_theta"] == 100000.0


# -- the chat template: one system prompt, one BOS, the same prompt ids in every stage ------------


def test_prompts_have_one_system_prompt_and_one_bos_and_rewards_end_at_eos(tokenizer):
    from rlhfkit.engine import conversation_ids, encode_prompts
    from rlhfkit.ppo.trainer import Demonstrations

    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    [default] = encode_prompts(tokenizer, [CHAT], 10_000)
    text = tokenizer.decode(default)
    assert text.count("<|im_start|>system") == 1 and text.count("named SmolLM") == 1
    assert default[0] == bos and default[1] != bos  # BOS once: the template's, no tokenizer BOS before it
    assert text.endswith("<|im_start|>assistant\n")
    own = [{"role": "system", "content": "Answer briefly."}, *CHAT]
    [with_system] = encode_prompts(tokenizer, [own], 10_000)
    assert "named SmolLM" not in tokenizer.decode(with_system)  # the user's system prompt replaces the default
    conversation = [*CHAT, {"role": "assistant", "content": "Paris."}]
    # the reward model reads the conversation up to the reply's EOS: ChatML's newline after it is cut,
    # so training scores the token a sampled response ends with
    ids = conversation_ids(tokenizer, conversation)
    assert ids[:len(default)] == default and ids[-1] == eos
    assert tokenizer.decode(ids[len(default):]) == "Paris.<|im_end|>"
    full = tokenizer.apply_chat_template(conversation, tokenize=True, return_dict=True)["input_ids"]
    assert full[len(ids):] == tokenizer("\n", add_special_tokens=False)["input_ids"]
    demo = Demonstrations.encode(tokenizer, [conversation], 10_000, 64)  # PPO-ptx: the reply as it is sampled
    assert demo.pairs == [(default, ids[len(default):])]


def test_sft_trains_on_the_prompt_ids_ppo_samples_from(smollm2, oasst_sample, tmp_path, tokenizer):
    from rlhfkit.config import load_config
    from rlhfkit.data import DataBuildConfig, build_data
    from rlhfkit.engine import encode_prompts
    from rlhfkit.sft import SFTStageConfig, build_sft_trainer

    data = build_data(DataBuildConfig(sources=[str(oasst_sample)], out=str(tmp_path / "data"))).output_dir
    config = load_config(SFTStageConfig, {"model": str(smollm2), "data": str(data), "output_dir": str(tmp_path / "sft"),
                                          "assistant_only_loss": False, "max_length": 4096})
    prepared = build_sft_trainer(config)
    rows = prepared.trainer.train_dataset
    raw = prepared.train_dataset
    eos = tokenizer.eos_token_id
    for i in range(5):
        prompt = encode_prompts(tokenizer, [raw[i]["prompt"]], 10_000)[0]
        ids, labels = rows[i]["input_ids"], rows[i]["labels"]
        assert ids[:len(prompt)] == prompt  # the SFT prompt is token for token the one PPO samples from
        assert all(x == -100 for x in labels[:len(prompt)]) and labels[len(prompt):] == ids[len(prompt):]
        reply = tokenizer.decode(ids[len(prompt):])
        assert reply.endswith("<|im_end|>\n") and reply.count("<|im_end|>") == 1
    # pad = eos, yet the reply's EOS stays a trained label after collation (docs/pitfalls.md#1): labels come
    # from the rows, not from comparing with the pad id; the padding itself is ignored
    batch = prepared.trainer.data_collator([rows[i] for i in range(4)])
    for row, labels in zip(range(4), batch["labels"]):
        ids, n = rows[row]["input_ids"], len(rows[row]["input_ids"])
        [end] = [j for j in range(n) if ids[j] == eos and rows[row]["labels"][j] != -100]
        assert labels[end] == eos and (labels[n:] == -100).all()
    assert len({len(rows[i]["input_ids"]) for i in range(4)}) > 1  # rows of different lengths: padding happened


# -- sampling: the hand-written Llama decode step on GQA + rope_theta 100000 -------------------------


def test_fast_decode_equals_the_generic_path_and_a_full_forward(policy, tokenizer, monkeypatch):
    from rlhfkit.engine import fast_cpu, forward, sampling
    from rlhfkit.core import logprobs_from_logits
    from rlhfkit.engine import encode_prompts

    assert fast_cpu.LlamaDecoder.for_model(policy) is not None  # the fast path takes this model
    prompts = [CHAT, [{"role": "user", "content": "Name three colours."}],
               [{"role": "user", "content": "Write one sentence about the sea, please, in plain words."}]]
    ids, mask = sampling.left_pad(encode_prompts(tokenizer, prompts, 10_000), tokenizer.pad_token_id)
    assert not bool(mask.all())  # rows of different lengths: left padding is exercised
    eos, pad, temperature = tokenizer.eos_token_id, tokenizer.pad_token_id, 0.7

    def draw():
        return sampling.sample(policy, ids, mask, 16, temperature, eos, pad, torch.Generator().manual_seed(3))

    fast_tokens, fast_logprobs = draw()
    monkeypatch.setattr(fast_cpu.LlamaDecoder, "for_model", classmethod(lambda cls, model: None))
    generic_tokens, generic_logprobs = draw()
    assert torch.equal(fast_tokens, generic_tokens)
    # float32 logits through two orders of the same sums: ~1e-6 apart; 1e-4 is far below any real difference
    torch.testing.assert_close(fast_logprobs, generic_logprobs, atol=1e-4, rtol=0)
    response, response_mask, _ = sampling.truncate_at_eos(fast_tokens, eos, pad)
    with torch.no_grad():
        logits = forward.response_logits(policy, torch.cat([ids, response], 1),
                                         torch.cat([mask, response_mask], 1), response.shape[1])
    full = logprobs_from_logits(logits, response, temperature) * response_mask
    torch.testing.assert_close(fast_logprobs * response_mask, full, atol=1e-4, rtol=0)
    assert tokenizer.decode(fast_tokens[0], skip_special_tokens=True).strip()


# -- the reward is read at the last real token although pad = eos ---------------------------------


def test_reward_is_read_at_the_last_real_token_with_pad_equal_eos(smollm2, tokenizer):
    from transformers import AutoModelForSequenceClassification

    from rlhfkit.engine import conversation_ids, left_pad, reward_scores, sequence_scores
    from rlhfkit.training import load_model

    torch.manual_seed(0)
    model = load_model(str(smollm2), AutoModelForSequenceClassification, None, False, num_labels=1).eval()
    eos = tokenizer.eos_token_id
    assert tokenizer.pad_token_id == eos
    rows = [conversation_ids(tokenizer, [*CHAT, {"role": "assistant", "content": reply}])
            for reply in ("Paris.", "The capital of France is Paris, a city on the Seine.")]
    with torch.no_grad():
        alone = []
        for row in rows:
            hidden = model.model(input_ids=torch.tensor([row])).last_hidden_state[0]
            alone.append((model.score(hidden[-1]).item(), model.score(hidden[-2]).item()))  # at EOS, before it
    ids, mask = left_pad(rows, eos)  # the short row is padded with eos tokens
    got = sequence_scores(model, ids, mask)
    for (at_eos, before_eos), score in zip(alone, got.tolist()):
        assert score == pytest.approx(at_eos, abs=1e-4) and abs(at_eos - before_eos) > 1e-3
    right = reward_scores(model, rows, eos, padding_side="right")  # the reward stage's scoring
    torch.testing.assert_close(right, got, atol=1e-4, rtol=0)


# -- the whole chain, a few real steps of each stage -------------------------------------------------


@pytest.fixture(scope="module")
def chain(smollm2, tmp_path_factory):
    from rlhfkit.config import load_config
    from rlhfkit.pipeline import RunConfig, run_chain
    from data_helpers import SAMPLE, require_shared

    sample = require_shared(SAMPLE)
    run = tmp_path_factory.mktemp("real") / "run"
    lora = {"lora": True, "lora_r": 8, "lora_alpha": 16}
    config = load_config(RunConfig, {
        "output_dir": str(run), "seed": 0,
        "data": {"source": [str(sample)], "val_fraction": 0.1},
        "model": {"name": str(smollm2)},
        "sft": {**lora, "lora_target_modules": ["all-linear"], "max_steps": 2, "per_device_train_batch_size": 2,
                "max_length": 128, "learning_rate": 2e-4, "assistant_only_loss": False, "save_steps": 100,
                "per_device_eval_batch_size": 16},
        "reward": {**lora, "lora_target_modules": ["all-linear"], "max_steps": 2, "per_device_train_batch_size": 2,
                   "max_length": 192, "learning_rate": 2e-4, "gold_agreement": "off", "save_steps": 100,
                   "per_device_eval_batch_size": 16},
        "ppo": {**lora, "num_updates": 1, "rollout_batch_size": 4, "num_mini_batches": 1,
                "per_device_train_batch_size": 4, "num_ppo_epochs": 1, "response_length": 12,
                "max_prompt_length": 96, "temperature": 0.7, "learning_rate": 1e-4, "save_steps": 0},
        "eval": {"max_prompts": 4, "samples_per_prompt": 1, "batch_size": 4},
    })
    result = run_chain(config, log=lambda line: None)
    return run, result


@pytest.mark.slow
def test_chain_runs_every_stage_on_the_real_model(chain, tokenizer):
    run, result = chain
    sft = json.loads((run / "sft" / "metrics.json").read_text())
    assert sft["lora"] and sft["steps"] == 2 and sft["eval_loss"] < 4.0  # a pretrained model: far below ln(49152) = 10.8
    reward = json.loads((run / "reward" / "metrics.json").read_text())
    assert reward["steps"] == 2 and 0.0 <= reward["eval_accuracy"] <= 1.0
    reward_tokenizer = json.loads((run / "reward" / "model" / "tokenizer_config.json").read_text())
    assert reward_tokenizer["pad_token"] == "<|endoftext|>"  # pad = eos replaced by the unknown token
    assert json.loads((run / "reward" / "model" / "config.json").read_text())["pad_token_id"] == 0
    [first] = [json.loads(line) for line in (run / "ppo" / "metrics.jsonl").read_text().splitlines()]
    # LoRA: the reference is the policy with its adapter disabled, and a new adapter is the identity
    assert abs(first["objective/kl"]) < 1e-4
    evaluation = json.loads((run / "eval" / "eval.json").read_text())
    assert evaluation["prompts"] == 4 and all(len(e["ppo"]) > 0 for e in json.loads((run / "eval" / "examples.json").read_text()))


def test_final_policy_answers_a_chat_in_a_transformers_pipeline(chain):
    from transformers import pipeline

    run, _ = chain
    chat = pipeline("text-generation", model=str(run / "ppo" / "model"), device="cpu")
    out = chat(CHAT, max_new_tokens=12, do_sample=False)
    reply = out[0]["generated_text"][-1]
    assert reply["role"] == "assistant" and "Paris" in reply["content"]


# -- a reward model with another tokenizer: MiniLM (BERT) ---------------------------------------------


@pytest.mark.slow
def test_minilm_reward_model_scores_ppo_responses_through_decode_and_re_encode(chain, tmp_path):
    from transformers import AutoModelForSequenceClassification

    from rlhfkit.artifacts import load_pretrained, load_tokenizer
    from rlhfkit.config import load_config
    from rlhfkit.ppo import PPOStageConfig, train_ppo
    from rlhfkit.engine import Scorer, conversation_ids, reward_scores
    from rlhfkit.reward import RewardStageConfig, train_reward

    run, _ = chain
    template = ROOT / "configs" / "templates" / "encoder_plain.jinja"
    result = train_reward(load_config(RewardStageConfig, {
        "model": str(minilm_dir()), "data": str(run / "data"), "output_dir": str(tmp_path / "minilm"),
        "chat_template_path": str(template), "max_steps": 2, "per_device_train_batch_size": 4, "max_length": 256,
        "learning_rate": 1e-4, "gold_agreement": "off", "save_steps": 100, "seed": 0}))
    assert 0.0 <= result.metrics["eval_accuracy"] <= 1.0
    folder = tmp_path / "minilm" / "model"
    model = load_pretrained(AutoModelForSequenceClassification, folder, num_labels=1).eval()
    bert = load_tokenizer(folder)
    assert bert.chat_template and bert.get_vocab() != load_tokenizer(run / "sft" / "model").get_vocab()
    # the Scorer re-encodes what the policy wrote with the reward model's own template: the same
    # scores as scoring those conversations directly
    prompts, texts = [CHAT, CHAT], ["Paris.", "It is Paris, of course."]
    dummy = torch.zeros((2, 3), dtype=torch.long)
    got = Scorer(model=model, tokenizer=bert, same_tokenizer=False)(dummy, torch.ones_like(dummy), prompts, texts)
    rows = [conversation_ids(bert, [*CHAT, {"role": "assistant", "content": t}]) for t in texts]
    assert rows[0][0] == bert.cls_token_id and rows[0][-1] == bert.sep_token_id
    torch.testing.assert_close(got, reward_scores(model, rows, bert.pad_token_id), atol=1e-5, rtol=0)
    assert abs(got[0] - got[1]) > 1e-6
    # a conversation longer than BERT's 512 positions (Open Assistant has them) keeps [CLS] and its end
    long_prompt = [{"role": "user", "content": "Tell me about the sea. " * 200}]
    [row] = [conversation_ids(bert, [*long_prompt, {"role": "assistant", "content": "Paris."}])]
    assert len(row) > 512
    cut = row[:1] + row[len(row) - 511:]
    got = Scorer(model=model, tokenizer=bert, same_tokenizer=False)(dummy[:1], dummy[:1] + 1, [long_prompt], ["Paris."])
    torch.testing.assert_close(got, reward_scores(model, [cut], bert.pad_token_id), atol=1e-5, rtol=0)
    # one PPO update of the SFT policy against it (the critic from the policy: the tokenizers differ)
    ppo = train_ppo(load_config(PPOStageConfig, {
        "model": str(run / "sft"), "reward_model": str(tmp_path / "minilm"), "data": str(run / "data"),
        "output_dir": str(tmp_path / "ppo"), "value_model": "policy", "lora": True, "lora_r": 8, "num_updates": 1,
        "rollout_batch_size": 4, "num_mini_batches": 1, "per_device_train_batch_size": 4, "num_ppo_epochs": 1,
        "response_length": 12, "max_prompt_length": 96, "temperature": 0.7, "learning_rate": 1e-4, "save_steps": 0}))
    [row] = [json.loads(line) for line in (tmp_path / "ppo" / "metrics.jsonl").read_text().splitlines()]
    assert ppo.metrics["updates_done"] == 1 and abs(row["objective/kl"]) < 1e-4
    assert all(map(lambda v: v == v, (row["objective/scores"], row["loss/policy_avg"])))  # finite, not NaN
