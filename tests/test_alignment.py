"""PPO against the gold judge makes a policy truly better, sampled AND greedy.

A toy world where the SFT policy's *mode* is wrong: for "Say the word W." the SFT data
holds three rambling replies ("W I hope this helps!", gold 0.7) for every two exact ones
("W", gold 1.0), so greedy decoding picks the ramble. PPO with the gold judge as reward
must shift the mode, not only trim the tails: the greedy gold score rises from about 0.7
to 1.0 on held-out words, and the sampled score rises with it. This is the upper-bound
check of issue 17 (if greedy gold fell even here, the loss would be in our PPO, its
sampling/EOS handling or the evaluation, not in a reward model).
"""

from __future__ import annotations

import pytest
import torch

from rlhfkit.evaluate import EvalConfig, evaluate
from rlhfkit.ppo import PPOStageConfig, train_ppo
from rlhfkit.world import gold_score
from rlhfkit.world.gold import RAMBLE, VOCAB, task_family
from rlhfkit.world.model import build_model, train_tokenizer

TRAIN_WORDS, HELD_OUT = VOCAB[:24], VOCAB[24:]


def prompt(word: str) -> list[dict]:
    return [{"role": "user", "content": f"Say the word {word}."}]


def sft_examples() -> list[tuple[list[dict], str]]:
    out = []
    for word in VOCAB:  # the replies of held-out words are seen in SFT; their prompts never in PPO
        # one ramble text, so that after "W" the ramble's next token (3/5) beats EOS (2/5) under greedy
        out += [(prompt(word), f"{word} {RAMBLE['en'][0]}")] * 3 + [(prompt(word), word)] * 2
    return out


def supervised_fine_tune(model, tokenizer, examples, steps: int, seed: int) -> None:
    """Plain next-token cross-entropy on the assistant reply (and its EOS) only."""
    rows = []
    for messages, reply in examples:
        context = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                return_dict=True)["input_ids"]
        full = tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": reply}], tokenize=True,
                                             return_dict=True)["input_ids"]
        labels = [-100] * len(context) + list(full[len(context):])
        rows.append((list(full), labels))
    width = max(len(ids) for ids, _ in rows)
    ids = torch.tensor([r + [tokenizer.pad_token_id] * (width - len(r)) for r, _ in rows])
    labels = torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in rows])
    mask = (torch.arange(width)[None] < torch.tensor([len(r) for r, _ in rows])[:, None]).long()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        batch = torch.randint(0, len(rows), (32,), generator=generator)
        loss = model(input_ids=ids[batch], attention_mask=mask[batch], labels=labels[batch]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()


def gold(prompts, responses):
    return [gold_score(p, r) for p, r in zip(prompts, responses)]


@pytest.mark.slow
def test_ppo_on_the_gold_reward_raises_sampled_and_greedy_gold(tmp_path):
    torch.manual_seed(0)
    assert all(task_family(prompt(w)) == "keyword" for w in VOCAB)
    texts = [f"{m[0]['content']} {r}" for m, r in sft_examples()]
    tokenizer = train_tokenizer(texts, 400)
    sft = build_model(tokenizer, "micro", seed=0)
    supervised_fine_tune(sft, tokenizer, sft_examples(), steps=300, seed=0)
    sft.save_pretrained(tmp_path / "sft")
    tokenizer.save_pretrained(tmp_path / "sft")

    config = PPOStageConfig(model=str(tmp_path / "sft"), value_model="policy", output_dir=str(tmp_path / "ppo"),
                            num_updates=30, rollout_batch_size=32, num_mini_batches=2, per_device_train_batch_size=16,
                            num_ppo_epochs=4, response_length=10, learning_rate=3e-4, kl_coef=0.02,
                            lr_scheduler_type="constant", save_steps=0, sample_every=0, torch_threads=1, seed=0)
    train_ppo(config, prompts=[prompt(w) for w in TRAIN_WORDS], reward_fn=gold)

    from transformers import AutoModelForCausalLM

    ppo = AutoModelForCausalLM.from_pretrained(tmp_path / "ppo" / "model")
    held_out = [prompt(w) for w in HELD_OUT]  # words PPO never saw a prompt for
    metrics, _ = evaluate(sft, ppo, None, tokenizer, held_out, EvalConfig(max_prompts=6, samples_per_prompt=16),
                          temperature=1.0, response_length=10, gold_fn=gold_score)
    sft_greedy, ppo_greedy = metrics["sft"]["greedy"]["gold"], metrics["ppo"]["greedy"]["gold"]
    # the SFT mode is the ramble: greedy gold 0.7 on (nearly) every held-out word
    assert 0.6 <= sft_greedy <= 0.8, metrics["sft"]
    # PPO moved the mode to the exact answer (1.0) and the samples with it, beyond noise (measured on
    # one machine: greedy +0.30 on all 6 words, sampled +0.11 +- 0.025 over 6 x 16 samples)
    assert ppo_greedy >= sft_greedy + 0.2, (sft_greedy, ppo_greedy)
    assert metrics["gold_gain"] > 0.03 and metrics["gold_gain"] > 3 * metrics["gold_gain_se"], metrics
    assert metrics["verdict"].startswith("PPO improved the true score, sampled and greedy"), metrics["verdict"]
