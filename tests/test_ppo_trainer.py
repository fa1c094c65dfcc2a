"""Tests for the PPO trainer: sampling log-probs, reward pooling, gradient accumulation,
batch arithmetic, resume after a real SIGKILL, learning, KL control, LoRA, a reward model
with its own tokenizer, a 2-process run and user errors.

Everything runs on tiny local models (``build_model(tokenizer, "micro")``, ~0.1 M
parameters, a ~330-token BPE vocabulary) with one torch thread: the machine has two
cores, other jobs may share them, and a tiny model is slower with two threads fighting
for one core than with one.
"""

from __future__ import annotations

import copy
import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from rlhfkit.errors import ConfigError
from rlhfkit.ppo import PPOStageConfig, train_ppo
from rlhfkit.ppo import trainer as trainer_mod
from rlhfkit.core import logprobs_from_logits, policy_loss, value_loss
from rlhfkit.engine import encode_prompts, left_pad, response_logits, sample, sequence_scores, token_values, truncate_at_eos
from rlhfkit.ppo.rollout import Rollout
from rlhfkit.backends import DataParallel
from rlhfkit.ppo.trainer import PolicyAndValue, batch_indices, ppo_update
from rlhfkit.world.model import build_model, train_tokenizer
from weight_helpers import same_weights

REPO = Path(__file__).resolve().parents[1]
PYTHON = sys.executable

WORDS = "apple banana cherry grape lemon mango melon peach pear plum".split()
TEXTS = [f"sort: {' '.join(WORDS[i:i + 3])} then {i} {i + 1} {i + 2}" for i in range(8)] * 20 + [
    "Sorry, I can't help with that.", "reverse the words", "count to three", "why?"] * 10
OTHER_TEXTS = ["the quick brown fox jumps over the lazy dog", "a stitch in time saves nine"] * 40

# Per-update metric keys of TRL's PPOTrainer that every metrics row must carry.
TRL_KEYS = ["objective/kl", "objective/entropy", "objective/non_score_reward", "objective/rlhf_reward",
            "objective/scores", "policy/approxkl_avg", "policy/clipfrac_avg", "loss/policy_avg",
            "loss/value_avg", "val/clipfrac_avg", "val/num_eos_tokens", "lr", "episode", "eps"]
TIME_KEYS = {"eps", "elapsed_s"}


def has_digit(prompts, responses):
    """Toy reward: 1 if the response contains a digit. About 7% of the vocabulary holds a
    digit, so a random policy earns it on roughly a third of 6-token responses."""
    return [float(any(c.isdigit() for c in r)) for r in responses]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _reward_model(tokenizer, seed: int):
    from transformers import LlamaForSequenceClassification

    base = build_model(tokenizer, "micro", seed=seed)
    config = base.config.__class__(**{**base.config.to_dict(), "num_labels": 1})
    torch.manual_seed(seed)
    model = LlamaForSequenceClassification(config)
    with torch.no_grad():  # a score head with some spread, so different sequences score differently
        model.score.weight.normal_(0, 1.0)
    return model.eval()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("ppo_world")
    tok = train_tokenizer(TEXTS, 400)
    policy = build_model(tok, "micro", seed=0)
    policy.save_pretrained(root / "policy")
    tok.save_pretrained(root / "policy")
    rm = _reward_model(tok, seed=1)
    rm.save_pretrained(root / "rm")
    tok.save_pretrained(root / "rm")
    tok2 = train_tokenizer(TEXTS + OTHER_TEXTS, 360)  # another vocabulary for the reward model
    assert len(tok2) != len(tok)
    rm2 = _reward_model(tok2, seed=2)
    rm2.save_pretrained(root / "rm2")
    tok2.save_pretrained(root / "rm2")
    prompts = [[{"role": "user", "content": t}] for t in sorted(set(TEXTS))]
    return SimpleNamespace(root=root, tok=tok, tok2=tok2, policy=policy.eval(), rm=rm, rm2=rm2,
                           policy_dir=root / "policy", rm_dir=root / "rm", rm2_dir=root / "rm2", prompts=prompts)


def small_config(world, out, **overrides) -> PPOStageConfig:
    """A run of a few seconds: 8 episodes per update, 6-token responses."""
    base = dict(model=str(world.policy_dir), value_model="policy", output_dir=str(out), num_updates=2,
                rollout_batch_size=8, num_mini_batches=2, per_device_train_batch_size=2, num_ppo_epochs=1,
                response_length=6, learning_rate=3e-3, lr_scheduler_type="constant", save_steps=0,
                sample_every=0, missing_eos_penalty=None, torch_threads=1, seed=0)
    base.update(overrides)
    return PPOStageConfig(**base)


def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def same_rows(straight: Path, resumed: Path, updates: int) -> list[dict]:
    """The resumed run logged the uninterrupted run's rows (all but the timings); returns the latter."""
    rows_a, rows_b = read_rows(straight / "metrics.jsonl"), read_rows(resumed / "metrics.jsonl")
    assert len(rows_a) == len(rows_b) == updates
    for a, b in zip(rows_a, rows_b):
        for key in set(a) - TIME_KEYS:
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), (a["update"], key)
    return rows_a


# ---------------------------------------------------------------------------------------
# 1. log-probs of the sampled tokens
# ---------------------------------------------------------------------------------------
def _queries(world, n=3):
    """Chat-templated prompts of different lengths, left-padded."""
    prompts = [[{"role": "user", "content": t}] for t in
               ["sort: apple banana cherry then 0 1 2", "why?", "count to three"]][:n]
    ids = encode_prompts(world.tok, prompts, 256)
    assert len({len(i) for i in ids}) == len(ids), "prompts must differ in length"
    q, m = left_pad(ids, world.tok.pad_token_id)
    return ids, q, m


@pytest.mark.parametrize("temperature", [0.7, 1.0])
def test_sampled_logprobs_equal_full_forward_and_uncached_loop(world, temperature):
    ids, q, m = _queries(world)
    assert (m == 0).any(), "at least one row is left-padded"
    gen = torch.Generator().manual_seed(0)
    response, logprobs = sample(world.policy, q, m, 8, temperature, world.tok.eos_token_id,
                                world.tok.pad_token_id, gen)
    assert response.shape == logprobs.shape == (3, 8)
    assert (logprobs < 0).all()
    # one forward over [query | response] (no cache), as the trainer does for the loss
    with torch.no_grad():
        full = logprobs_from_logits(
            response_logits(world.policy, torch.cat([q, response], 1), torch.cat([m, torch.ones_like(response)], 1), 8),
            response, temperature)
    torch.testing.assert_close(logprobs, full, atol=1e-4, rtol=0)
    # explicit loop: each row on its own (no padding), no cache, log_softmax(logits / T)
    with torch.no_grad():
        for b, prompt in enumerate(ids):
            seq = list(prompt)
            for t in range(response.shape[1]):
                logits = world.policy(input_ids=torch.tensor([seq]), use_cache=False).logits[0, -1]
                expected = torch.log_softmax(logits / temperature, -1)[response[b, t]]
                assert abs(logprobs[b, t].item() - expected.item()) < 1e-4, (b, t)
                seq.append(int(response[b, t]))
    # the temperature is really applied: at T = 1 the same tokens would score differently
    if temperature != 1.0:
        with torch.no_grad():
            at_one = logprobs_from_logits(
                response_logits(world.policy, torch.cat([q, response], 1),
                                torch.cat([m, torch.ones_like(response)], 1), 8), response, 1.0)
        assert (at_one - logprobs).abs().max() > 1e-2


@pytest.mark.parametrize("temperature", [0.7, 1.0])
def test_first_minibatch_sees_ratio_one_at_any_temperature(world, tmp_path, temperature):
    """One minibatch, one epoch: the loss is computed before any step, so the training forward
    must reproduce the sampled log-probs (same temperature, same positions) -> approx-KL ~ 0
    and nothing clipped; the reference (same weights, same temperature) gives KL ~ 0 too."""
    config = small_config(world, tmp_path / "t", num_updates=1, num_mini_batches=1, per_device_train_batch_size=4,
                          temperature=temperature)
    train_ppo(config, prompts=world.prompts, reward_fn=has_digit)
    row = read_rows(tmp_path / "t" / "metrics.jsonl")[0]
    assert row["policy/approxkl_avg"] < 1e-9
    assert row["policy/clipfrac_avg"] == 0
    assert abs(row["objective/kl"]) < 1e-4


class _EosBoost(torch.nn.Module):
    """The micro policy with +boost on the EOS logit, so responses end at different steps."""

    def __init__(self, model, eos_id, boost):
        super().__init__()
        self.model, self.eos_id, self.boost = model, eos_id, boost

    def forward(self, **kwargs):
        out = self.model(**kwargs)
        logits = out.logits.clone()
        logits[..., self.eos_id] += self.boost
        out.logits = logits
        return out


def test_tokens_after_eos_are_pad_and_masked(world):
    eos, pad = world.tok.eos_token_id, world.tok.pad_token_id
    ids = encode_prompts(world.tok, world.prompts[:8], 256)
    q, m = left_pad(ids, pad)
    model = _EosBoost(world.policy, eos, 5.0)  # P(EOS) ~ 0.3 per step
    response, logprobs = sample(model, q, m, 16, 1.0, eos, pad, torch.Generator().manual_seed(1))
    first = [(row == eos).nonzero()[0, 0].item() if (row == eos).any() else None for row in response]
    ended = [f for f in first if f is not None]
    assert len(set(ended)) >= 3, f"responses should end at different steps, got {first}"
    for b, f in enumerate(first):
        if f is None:
            continue
        assert (response[b, f + 1:] == pad).all()
        assert (logprobs[b, f + 1:] == 0).all()
        assert (logprobs[b, : f + 1] < 0).all()
    if all(f is not None for f in first):  # sampling stops once every row has ended
        assert response.shape[1] == max(ended) + 1
    ids_t, mask, has_eos = truncate_at_eos(response, eos, pad)
    assert torch.equal(ids_t, response)
    assert has_eos.tolist() == [f is not None for f in first]
    assert mask.sum(1).tolist() == [f + 1 if f is not None else response.shape[1] for f in first]
    # log-probs of the kept tokens equal one full forward with that response mask (as make_rollout scores)
    width = response.shape[1]
    with torch.no_grad():
        full = logprobs_from_logits(
            response_logits(model, torch.cat([q, response], 1), torch.cat([m, mask], 1), width), response, 1.0)
    torch.testing.assert_close(logprobs, full * mask, atol=1e-4, rtol=0)


# ---------------------------------------------------------------------------------------
# 2. the reward is read at the last real token (docs/pitfalls.md#3)
# ---------------------------------------------------------------------------------------
def test_num_eos_tokens_counts_responses_that_ended_when_pad_is_eos():
    # pad = eos (most hub models): the padding after an EOS must not be counted as more EOS tokens
    eos = 2
    raw = torch.tensor([[5, 2, 7, 7], [5, 6, 7, 8], [2, 9, 9, 9]])
    ids, mask, has_eos = truncate_at_eos(raw, eos, pad_id=eos)
    assert ids.tolist() == [[5, 2, 2, 2], [5, 6, 7, 8], [2, 2, 2, 2]]
    zeros = torch.zeros(3, 4)
    rollout = SimpleNamespace(response_ids=ids, response_mask=mask, logprobs=zeros, scores=torch.zeros(3),
                              raw_scores=torch.zeros(3), has_eos=has_eos)
    config = PPOStageConfig(model="x", reward_model="rm", num_updates=1)
    out = trainer_mod._episode_metrics(rollout, zeros, 0.1, config)
    assert out["val/num_eos_tokens"] == 2 and out["val/response_length"] == pytest.approx((2 + 4 + 1) / 3)


def test_sequence_scores_same_for_left_and_right_padding_and_match_hf_pooling(world):
    rm = world.rm
    seqs = _queries(world)[0]
    seqs = [s + [world.tok.eos_token_id] for s in seqs]
    pad = world.tok.pad_token_id
    assert all(pad not in s for s in seqs)
    left_ids, left_mask = left_pad(seqs, pad)
    width = left_ids.shape[1]
    right_ids = torch.full_like(left_ids, pad)
    right_mask = torch.zeros_like(left_mask)
    for i, s in enumerate(seqs):
        right_ids[i, : len(s)] = torch.tensor(s)
        right_mask[i, : len(s)] = 1
    assert width > min(len(s) for s in seqs)
    with torch.no_grad():
        left = sequence_scores(rm, left_ids, left_mask)
        right = sequence_scores(rm, right_ids, right_mask)
        alone = torch.stack([rm(input_ids=torch.tensor([s])).logits[0, 0] for s in seqs])
        # reading at the last column (what a model that assumes left padding does) is wrong for right padding
        backbone = rm.model(input_ids=right_ids, attention_mask=right_mask).last_hidden_state
        naive = rm.score(backbone[:, -1]).squeeze(-1)
    torch.testing.assert_close(left, alone, atol=1e-5, rtol=0)
    torch.testing.assert_close(right, alone, atol=1e-5, rtol=0)
    assert alone.max() - alone.min() > 1e-2, "scores must differ between sequences for the test to mean anything"
    assert (naive - alone).abs().max() > 1e-3


# ---------------------------------------------------------------------------------------
# 3. gradient accumulation does not change the update (docs/pitfalls.md#8)
# ---------------------------------------------------------------------------------------
def _fixed_rollout(world, value_model):
    """16 episodes whose responses have lengths 1..8 (so token means != mean of means)."""
    g = torch.Generator().manual_seed(3)
    n, width = 16, 8
    prompts = [world.prompts[i % len(world.prompts)] for i in range(0, 5 * n, 5)]
    q, qm = left_pad(encode_prompts(world.tok, prompts, 256), world.tok.pad_token_id)
    lengths = torch.tensor([1 + (i * 5) % width for i in range(n)])
    mask = (torch.arange(width)[None, :] < lengths[:, None]).long()
    response = torch.randint(10, len(world.tok), (n, width), generator=g)
    response = torch.where(mask.bool(), response, torch.full_like(response, world.tok.pad_token_id))
    ids, am = torch.cat([q, response], 1), torch.cat([qm, mask], 1)
    with torch.no_grad():
        logprobs = logprobs_from_logits(response_logits(world.policy, ids, am, width), response)
        values = token_values(value_model, ids, am, width)
    noise = lambda: torch.randn(n, width, generator=g)  # noqa: E731
    rollout = Rollout(q, qm, response, mask, (logprobs + 0.1 * noise()) * mask, logprobs * mask,
                      (values + 0.1 * noise()) * mask, torch.zeros(n), torch.zeros(n), torch.zeros(n, dtype=torch.bool),
                      torch.zeros(n))
    advantages = (noise() + (lengths <= 4).float()[:, None]) * mask  # short responses fare better
    returns = noise() * mask
    return rollout, advantages, returns


def _one_ppo_update(policy, value, rollout, advantages, returns, micro, **change):
    from accelerate import Accelerator
    from transformers import get_scheduler

    config = PPOStageConfig(model="unused", num_updates=1, rollout_batch_size=16, num_mini_batches=2,
                            per_device_train_batch_size=micro, num_ppo_epochs=2, learning_rate=1e-3,
                            lr_scheduler_type="constant", **change)
    assert not config.validate()
    module = PolicyAndValue(copy.deepcopy(policy), copy.deepcopy(value))
    module.train()
    optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=config.learning_rate)
    scheduler = get_scheduler("constant", optimizer)
    accelerator = Accelerator(gradient_accumulation_steps=config.gradient_accumulation_steps)
    assert accelerator.gradient_accumulation_steps == 8 // micro
    module, optimizer = accelerator.prepare(module, optimizer)
    backend = DataParallel(accelerator, module, optimizer, scheduler, config.max_grad_norm)
    stats = ppo_update(backend, rollout, advantages, returns, config, torch.Generator().manual_seed(0))
    return accelerator.unwrap_model(module), stats


def test_ppo_update_is_invariant_to_gradient_accumulation(world):
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)
    value = AutoModelForSequenceClassification.from_pretrained(world.policy_dir, num_labels=1)
    trainer_mod.disable_dropout(value)
    rollout, advantages, returns = _fixed_rollout(world, value)
    assert len(set(rollout.response_mask.sum(1).tolist())) >= 6
    one, stats_one = _one_ppo_update(world.policy, value, rollout, advantages, returns, micro=8)  # GA 1
    four, stats_four = _one_ppo_update(world.policy, value, rollout, advantages, returns, micro=2)  # GA 4
    moved = 0.0
    for (name, p1), (_, p4), p0 in zip(one.named_parameters(), four.named_parameters(),
                                       PolicyAndValue(world.policy, value).parameters()):
        torch.testing.assert_close(p1, p4, atol=1e-5, rtol=0, msg=lambda m: f"{name}: {m}")
        moved = max(moved, (p1 - p0).abs().max().item())
    assert moved > 1e-3, "the update must move the weights"
    for key in ("approxkl", "clipfrac", "pg_loss", "vf_loss", "vf_clipfrac"):
        assert stats_one[key] == pytest.approx(stats_four[key], rel=1e-4, abs=1e-6), key
    assert stats_one["clipfrac"] > 0  # the clipped branch is exercised (old log-probs were perturbed)

    # The naive accumulation (mean of the 4 micro-batch token means) is another loss:
    # with lengths 1..8 it weights the tokens of short responses more.
    with torch.no_grad():
        logits = response_logits(world.policy, rollout.input_ids[:8], rollout.attention_mask[:8], 8)
        new_logprobs = logprobs_from_logits(logits, rollout.response_ids[:8])
        m = rollout.response_mask[:8]
        token_mean, _ = policy_loss(new_logprobs, rollout.logprobs[:8], advantages[:8], m, 0.2)
        naive = sum(policy_loss(new_logprobs[i:i + 2], rollout.logprobs[i:i + 2], advantages[i:i + 2],
                                m[i:i + 2], 0.2)[0] for i in range(0, 8, 2)) / 4
    assert abs(naive - token_mean) > 0.25 * abs(token_mean), (naive, token_mean)


def test_sequence_level_update_is_invariant_to_gradient_accumulation_and_is_another_objective(world):
    # importance_sampling_level: sequence averages per-response losses over the minibatch, so its
    # micro-batches are weighted by responses, not tokens; the split must not change the update
    from transformers import AutoModelForSequenceClassification

    value = AutoModelForSequenceClassification.from_pretrained(world.policy_dir, num_labels=1)  # fills the rollout only
    rollout, advantages, returns = _fixed_rollout(world, value)
    per_response = advantages[:, :1] * rollout.response_mask  # one advantage per response
    runs = {}
    for level, micro in (("sequence", 8), ("sequence", 2), ("token", 8)):
        runs[level, micro] = _one_ppo_update(world.policy, None, rollout, per_response, returns, micro,
                                             algorithm="rloo", importance_sampling_level=level)
    (one, stats_one), (four, stats_four), (token, _) = runs.values()
    moved = differ = 0.0
    for (name, p1), p4, pt, p0 in zip(one.named_parameters(), four.parameters(), token.parameters(),
                                      world.policy.parameters()):
        torch.testing.assert_close(p1, p4, atol=1e-5, rtol=0, msg=lambda m: f"{name}: {m}")
        moved = max(moved, (p1 - p0).abs().max().item())
        differ = max(differ, (p1 - pt).abs().max().item())
    assert moved > 1e-3 and differ > 1e-4, (moved, differ)  # it learns, and not what token level learns
    assert set(stats_one) == {"approxkl", "clipfrac", "pg_loss", "early_stopped"}  # no value, no KL term
    for key in ("approxkl", "clipfrac", "pg_loss"):
        assert stats_one[key] == pytest.approx(stats_four[key], rel=1e-4, abs=1e-6), key
    assert stats_one["clipfrac"] > 0  # whole-response ratios of perturbed log-probs leave the clip band



def test_micro_batch_cut_to_its_longest_response_changes_no_output_or_gradient(world):
    """ppo_update drops the response columns that are padding in all rows of a micro-batch:
    log-probs, values, losses and gradients must equal those of the full width."""
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)
    value = AutoModelForSequenceClassification.from_pretrained(world.policy_dir, num_labels=1)
    rollout, advantages, returns = _fixed_rollout(world, value)
    idx = (rollout.response_mask.sum(1) <= 4).nonzero()[:, 0]  # short responses: columns 4..7 are padding
    full_width = rollout.response_ids.shape[1]
    module = PolicyAndValue(copy.deepcopy(world.policy), value).train()

    def loss_and_grads(width):
        batch = trainer_mod.micro_batch(rollout, advantages, returns, idx, width)
        m = batch["mask"]
        module.zero_grad()
        logits, values = module(batch["input_ids"], batch["attention_mask"], width)
        logprobs = logprobs_from_logits(logits, batch["response_ids"])
        loss = policy_loss(logprobs, batch["logprobs"], batch["advantages"], m, 0.2)[0] + value_loss(
            values, batch["values"], batch["returns"], m, 0.2)[0]
        loss.backward()
        grads = [p.grad.clone() for p in module.parameters()]
        return (logprobs * m).detach(), (values * m).detach(), loss.detach(), grads

    lp_cut, v_cut, loss_cut, grads_cut = loss_and_grads(4)
    lp_full, v_full, loss_full, grads_full = loss_and_grads(full_width)
    assert full_width > 4
    torch.testing.assert_close(lp_cut, lp_full[:, :4], atol=1e-5, rtol=0)
    torch.testing.assert_close(v_cut, v_full[:, :4], atol=1e-5, rtol=0)
    torch.testing.assert_close(loss_cut, loss_full, atol=1e-6, rtol=1e-5)
    for g_cut, g_full in zip(grads_cut, grads_full):
        torch.testing.assert_close(g_cut, g_full, atol=1e-6, rtol=1e-4)


def test_training_creates_every_tensor_on_the_models_device(world, tmp_path):
    """With meta as torch's default device, any tensor made without ``device=`` lands on meta and
    the first op mixing it with the (CPU) models' tensors, or reading it, fails: this catches on
    the CPU what a GPU run would hit (models moved by accelerate, bookkeeping left on the CPU).
    The run covers sampling, scoring, the update, metrics, samples, adaptive KL and checkpoints."""
    config = small_config(world, tmp_path / "m", model="", save_steps=1, sample_every=1, kl_target=1.0,
                          missing_eos_penalty=1.0)
    models = dict(policy=copy.deepcopy(world.policy), reward_model=copy.deepcopy(world.rm),
                  value_model=_reward_model(world.tok, seed=3))
    with torch.device("meta"):
        result = train_ppo(config, tokenizer=world.tok, prompts=world.prompts, **models,
                           gold_fn=lambda prompts, responses: [1.0] * len(responses))
    assert result.metrics["updates"] == 2
    assert all(math.isfinite(v) for v in result.metrics.values() if isinstance(v, float))
    assert len(read_rows(tmp_path / "m" / "samples.jsonl")) > 0

def test_a_finished_run_is_not_redone(world, tmp_path):
    out = tmp_path / "done"

    def run(**changes):
        return train_ppo(small_config(world, out, save_steps=1, **{"num_updates": 3, **changes}),
                         reward_model=world.rm, prompts=world.prompts)

    first = run()
    stamps = {name: (out / name).stat().st_mtime_ns for name in ("metrics.jsonl", "metrics.json")}
    model = (out / "model" / "model.safetensors").stat().st_mtime_ns
    again = run(sample_every=1)  # a change a resume accepts
    assert again.metrics == first.metrics
    assert {name: (out / name).stat().st_mtime_ns for name in stamps} == stamps
    assert (out / "model" / "model.safetensors").stat().st_mtime_ns == model
    with pytest.raises(ConfigError, match="differs in learning_rate"):  # another config is refused, as on resume
        run(learning_rate=1e-4)
    with pytest.raises(ConfigError, match="differs in num_updates"):
        run(num_updates=4)
    assert [r["update"] for r in read_rows(out / "metrics.jsonl")] == [1, 2, 3]


def test_resume_with_another_process_count_is_refused(world, tmp_path):
    import shutil

    out = tmp_path / "two"
    config = small_config(world, out, num_updates=2, save_steps=1)
    train_ppo(config, prompts=world.prompts, reward_fn=has_digit)
    (out / "metrics.json").unlink()  # as if killed after the update-1 checkpoint
    shutil.rmtree(out / "model")
    state = out / "checkpoints" / "update-000001" / "state.json"
    data = json.loads(state.read_text())
    assert data["num_processes"] == 1
    state.write_text(json.dumps({**data, "num_processes": 2}))  # as if written by a 2-process launch
    with pytest.raises(ConfigError, match=r"written by a run on 2 process\(es\); resume it with 2 \(this launch has 1\)"):
        train_ppo(config, prompts=world.prompts, reward_fn=has_digit)


def test_evaluation_creates_every_tensor_on_the_models_device(world):
    """The same meta-device check for the held-out evaluation, the curve point and best-of-n
    (it catches tensors made without ``device=``; that they follow the models' device on a GPU
    -- ``left_pad(..., device)``, a generator on that device -- is checked by reading only)."""
    from rlhfkit.evaluate import EvalConfig, best_of_n_curve, curve_point, evaluate

    config = EvalConfig(max_prompts=6, samples_per_prompt=2, batch_size=4, best_of_n=[1, 2])
    ppo = copy.deepcopy(world.policy)
    gold = lambda prompt, response: float(len(response) % 2)  # noqa: E731
    with torch.device("meta"):
        metrics, _ = evaluate(world.policy, ppo, world.rm, world.tok, world.prompts, config, 1.0, 8, gold)
        point = curve_point(ppo, world.policy, world.rm, world.tok, world.prompts, config, 1.0, 8, gold)
        bon = best_of_n_curve(world.policy, world.rm, world.tok, world.prompts, config, 1.0, 8, gold)
    assert metrics["prompts"] == 6 and math.isfinite(metrics["ppo"]["kl"]) and math.isfinite(metrics["sft"]["greedy"]["gold"])
    # same prompts, seed and weights: the curve point is the evaluation's PPO figures
    assert point["gold"] == metrics["ppo"]["gold"] and point["kl"] == pytest.approx(metrics["ppo"]["kl"])
    assert [b["n"] for b in bon] == [1, 2]


def test_evaluation_keeps_the_last_prompt_tokens_like_ppo(world):
    """Held-out prompts are cut as PPO cuts them (the last max_prompt_length tokens), and the
    KL to the reference is taken over the response tokens only."""
    from rlhfkit.evaluate import _kl_to_reference, generate

    full = encode_prompts(world.tok, world.prompts[:4], 1_000_000)
    cut = 5
    assert max(len(ids) for ids in full) > cut
    samples = generate(world.policy, world.rm, world.tok, world.prompts[:4], 2, 1.0, 6, 4, 0, max_prompt_length=cut)
    assert samples.prompt_lengths == [min(len(ids), cut) for ids in full]
    for ids, rows, length in zip(full, samples.input_ids, samples.prompt_lengths):
        for row in rows:
            assert row[:length].tolist() == ids[-cut:]
    # the policy against itself: KL 0 per sequence (same log-probs over the same response tokens)
    kl = _kl_to_reference(world.policy, samples, 1.0)
    assert all(abs(v) < 1e-4 for per_prompt in kl for v in per_prompt)


# ---------------------------------------------------------------------------------------
# 4. batch arithmetic: validated before any model loads
# ---------------------------------------------------------------------------------------
BASE = {"model": "unused", "num_updates": 1, "rollout_batch_size": 16, "num_mini_batches": 2,
        "per_device_train_batch_size": 4}


@pytest.mark.parametrize("change, expected", [
    ({"rollout_batch_size": 10, "num_mini_batches": 4}, ["rollout_batch_size=10", "num_mini_batches=4"]),
    ({"per_device_train_batch_size": 3}, ["mini_batch_size=8", "per_device_train_batch_size=3"]),
    ({"num_updates": None, "total_episodes": 100}, ["total_episodes=100", "rollout_batch_size=16"]),
    ({"total_episodes": 32}, ["total_episodes", "num_updates"]),
    ({"num_updates": None}, ["total_episodes", "num_updates"]),
])
def test_validate_rejects_bad_batch_arithmetic(change, expected, monkeypatch):
    from rlhfkit.config import load_config

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    data = {k: v for k, v in {**BASE, **change}.items() if v is not None}
    with pytest.raises(ConfigError) as info:
        load_config(PPOStageConfig, data)
    message = str(info.value)
    for text in expected:
        assert text in message
    assert "\n" not in message


def test_validate_world_size_and_all_errors_at_once(monkeypatch):
    from rlhfkit.config import load_config

    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError) as info:
        load_config(PPOStageConfig, {**BASE, "rollout_batch_size": 7, "num_mini_batches": 1,
                                     "per_device_train_batch_size": 1, "kl_coef": -1})
    message = str(info.value)
    assert "rollout_batch_size=7 does not split over 2 processes" in message
    assert "per_device_train_batch_size=1 x 2 process(es)" in message
    assert "kl_coef" in message  # every problem at once
    good = load_config(PPOStageConfig, BASE)
    assert (good.mini_batch_size, good.gradient_accumulation_steps, good.local_rollout_batch_size) == (8, 1, 8)
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert load_config(PPOStageConfig, BASE).gradient_accumulation_steps == 2


def test_validate_rejects_values_that_would_fail_or_be_ignored_mid_run():
    # logging_steps=0 divided by zero after the first update, save_total_limit=0 deleted the
    # checkpoint just written, kl_horizon=0 raised a ValueError mid-run, max_grad_norm=0 zeroed
    # every gradient, lora_dropout was silently forced to 0
    bad = PPOStageConfig(model="x", num_updates=1, logging_steps=0, save_total_limit=0, kl_horizon=0,
                         lora_dropout=0.1, lr_scheduler_type="reduce_lr_on_plateau", max_grad_norm=0.0, sample_every=-1)
    problems = bad.validate()
    for name in ("logging_steps", "save_total_limit", "kl_horizon", "lora_dropout", "lr_scheduler_type",
                 "max_grad_norm", "sample_every"):
        assert sum(p.startswith(name) for p in problems) == 1, (name, problems)
    assert PPOStageConfig(model="x", num_updates=1).validate() == []


def test_bad_scheduler_name_fails_before_loading(world, tmp_path):
    config = small_config(world, tmp_path / "o", model=str(tmp_path / "absent"), lr_scheduler_type="linearr")
    with pytest.raises(ConfigError, match="lr_scheduler_type: cannot build 'linearr'") as info:
        train_ppo(config, prompts=world.prompts, reward_fn=has_digit)
    assert "cannot load" not in str(info.value)


def test_accumulation_forced_by_the_launcher_is_refused(world, tmp_path, monkeypatch):
    # `accelerate launch --gradient_accumulation_steps 3` exports this; Accelerator() obeys it
    monkeypatch.setenv("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", "3")
    with pytest.raises(ConfigError, match="gradient accumulation 3"):
        train_ppo(small_config(world, tmp_path / "o"), prompts=world.prompts, reward_fn=has_digit)


def test_world_size_without_process_group_is_refused(world, tmp_path, monkeypatch):
    # what `accelerate launch --multi_gpu` gives on a CPU-only machine without ACCELERATE_USE_CPU:
    # WORLD_SIZE=2 in every process, but each one alone (process 0 of 1)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="gives 1 process"):
        train_ppo(small_config(world, tmp_path / "o"), prompts=world.prompts, reward_fn=has_digit)
    assert not (tmp_path / "o" / "metrics.jsonl").exists()


def test_cli_reports_arithmetic_error_in_one_line_before_loading_a_model(tmp_path, capsys):
    from rlhfkit.cli import main

    missing = tmp_path / "no-such-model"
    config = tmp_path / "ppo.yaml"
    from datasets import Dataset

    Dataset.from_dict({"prompt": ["hi", "why?"]}).save_to_disk(str(tmp_path / "data"))
    capsys.readouterr()
    config.write_text(f"model: {missing}\nreward_model: {missing}\noutput_dir: {tmp_path / 'out'}\n"
                      f"data: {tmp_path / 'data'}\nnum_updates: 2\nrollout_batch_size: 12\nnum_mini_batches: 5\n")
    assert main(["ppo", str(config)]) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("rlhfkit: error:")
    assert "rollout_batch_size=12" in err and "num_mini_batches=5" in err
    assert "Traceback" not in err and "no-such-model" not in err
    assert not (tmp_path / "out").exists()
    # a KEY=VALUE override is checked the same way
    assert main(["ppo", str(config), "num_mini_batches=4", "per_device_train_batch_size=2"]) == 2
    err = capsys.readouterr().err
    assert "mini_batch_size=3" in err and "per_device_train_batch_size=2" in err
    # arithmetic fixed: now the missing model is the (one-line) error
    assert main(["ppo", str(config), "num_mini_batches=4", "per_device_train_batch_size=1"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and str(missing) in err and "Traceback" not in err


def test_cli_help_lists_keys_and_batch_arithmetic(capsys):
    import dataclasses

    from rlhfkit.cli import main

    with pytest.raises(SystemExit) as info:
        main(["ppo", "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for f in dataclasses.fields(PPOStageConfig):
        assert f"  {f.name} (" in out, f.name
    assert "mini_batch_size           = rollout_batch_size / num_mini_batches" in out
    assert "gradient_accumulation_steps   = mini_batch_size / (per_device_train_batch_size x processes)" in out
    assert "rejected before any model loads" in out


# ---------------------------------------------------------------------------------------
# 5. resume after SIGKILL equals the uninterrupted run (docs/pitfalls.md#9, #10, #11)
# ---------------------------------------------------------------------------------------
RUN_SCRIPT = """
import json, os, sys, time
from pathlib import Path
from rlhfkit.ppo import PPOStageConfig, train_ppo

config = PPOStageConfig(**json.loads(Path(sys.argv[1]).read_text()))
prompts = json.loads(Path(sys.argv[2]).read_text())
hang_at = int(os.environ.get("HANG_AT_CALL", "0"))
calls = 0

def has_digit(prompts, responses):
    global calls
    calls += 1
    if calls == hang_at:  # park the run after its checkpoint until the test kills it
        if os.environ.get("PARKED"):  # what the test waits for: the run is in this update
            Path(os.environ["PARKED"]).touch()
        time.sleep(600)
    return [float(any(c.isdigit() for c in r)) for r in responses]

demonstrations = json.loads(Path(os.environ["DEMOS"]).read_text()) if os.environ.get("DEMOS") else None
train_ppo(config, prompts=prompts, reward_fn=has_digit, demonstrations=demonstrations)
import torch.distributed as dist
if dist.is_initialized():  # as the CLI does (gloo's threads may abort an unclosed process at exit)
    dist.destroy_process_group()
print("finished", flush=True)
"""


def _run_env(**extra):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.pop("WORLD_SIZE", None)
    env.update(extra)
    return env


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def test_resume_after_sigkill_equals_uninterrupted_run(world, tmp_path):
    # linear schedule and adaptive KL: the scheduler and the KL controller must be restored too
    kwargs = dict(num_updates=4, save_steps=2, num_ppo_epochs=2, learning_rate=1e-2, kl_coef=0.1,
                  lr_scheduler_type="linear", kl_target=0.5, kl_horizon=64)
    straight = small_config(world, tmp_path / "straight", **kwargs)
    train_ppo(straight, prompts=world.prompts, reward_fn=has_digit)

    # the same run in a subprocess, SIGKILLed once the update-2 checkpoint is complete
    out = tmp_path / "killed"
    killed = small_config(world, out, sample_every=1, **kwargs)
    (tmp_path / "config.json").write_text(json.dumps(vars(killed)))
    (tmp_path / "prompts.json").write_text(json.dumps(world.prompts))
    (tmp_path / "run.py").write_text(RUN_SCRIPT)
    proc = subprocess.Popen([PYTHON, str(tmp_path / "run.py"), str(tmp_path / "config.json"), str(tmp_path / "prompts.json")],
                            env=_run_env(HANG_AT_CALL="3", PARKED=str(tmp_path / "parked")),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.time() + 120
    try:
        while not (tmp_path / "parked").exists():  # parked in update 3, after the update-2 checkpoint
            assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
            assert time.time() < deadline, "the run did not reach update 3 in 120 s"
            time.sleep(0.05)
        assert (out / "checkpoints" / "update-000002" / "state.json").is_file()
        assert proc.poll() is None, "the run must still be going when it is killed"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "model").exists()
    assert [r["update"] for r in read_rows(out / "metrics.jsonl")] == [1, 2]
    assert {r["update"] for r in read_rows(out / "samples.jsonl")} == {1, 2}

    # as if killed later (after logging update 3, mid-way through writing a row): the resume drops both
    with open(out / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"update": 3, "objective/scores": 123.0}) + "\n" + '{"update": 4, "obj')
    # a stale temp folder of a killed save, with junk, is ignored
    stale = out / "checkpoints" / ".tmp-update-000003-deadbeef"
    stale.mkdir()
    (stale / "state.json").write_text("{ not json")
    (stale / "policy.safetensors").write_bytes(b"junk")
    # and so is a checkpoint-named folder without its completion marker (state.json is written last)
    (out / "checkpoints" / "update-000003").mkdir()
    (out / "checkpoints" / "update-000003" / "policy.safetensors").write_bytes(b"junk")

    # a changed training field is refused, naming it; nothing is touched
    log_before = (out / "metrics.jsonl").read_text()
    with pytest.raises(ConfigError, match="kl_coef"):
        train_ppo(small_config(world, out, sample_every=2, **{**kwargs, "kl_coef": 0.2}),
                  prompts=world.prompts, reward_fn=has_digit)
    assert (out / "metrics.jsonl").read_text() == log_before

    # resume in this process, with a changed (allowed) sample_every
    result = train_ppo(small_config(world, out, sample_every=2, **kwargs), prompts=world.prompts, reward_fn=has_digit)
    assert result.metrics["update"] == 4
    rows_a, rows_b = read_rows(tmp_path / "straight" / "metrics.jsonl"), read_rows(out / "metrics.jsonl")
    assert [r["update"] for r in rows_b] == [1, 2, 3, 4]
    for a, b in zip(rows_a, rows_b):
        assert set(a) == set(b)
        for key in set(a) - TIME_KEYS:
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), (a["update"], key)
    assert rows_a[-1]["objective/kl"] != rows_a[0]["objective/kl"]  # the runs did move
    assert len({r["lr"] for r in rows_a}) == 4 and len({r["objective/kl_coef"] for r in rows_a}) == 4
    assert {r["update"] for r in read_rows(out / "samples.jsonl")} == {1, 2, 4}
    wa, wb = _weights(tmp_path / "straight" / "model"), _weights(out / "model")
    assert wa.keys() == wb.keys()
    for key in wa:
        torch.testing.assert_close(wb[key], wa[key], atol=1e-6, rtol=0, msg=lambda m: f"{key}: {m}")
    initial = world.policy.state_dict()
    assert any((wa[k] - initial[k]).abs().max() > 1e-3 for k in wa)


def test_batch_indices_visit_every_prompt_once_per_epoch():
    n, batch = 10, 4
    order = [i for u in range(5) for i in batch_indices(u, batch, n, seed=7)]  # 20 positions = 2 epochs
    assert sorted(order[:10]) == list(range(10)) and sorted(order[10:]) == list(range(10))
    assert order[:10] != order[10:]
    assert batch_indices(3, batch, n, seed=7) == order[12:16]  # position depends only on the update index
    assert batch_indices(0, batch, n, seed=8) != order[:4]


# ---------------------------------------------------------------------------------------
# 6. learning on a toy task, metrics sanity, final model
# ---------------------------------------------------------------------------------------
def test_ppo_learns_toy_reward_and_writes_sane_metrics(world, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "learn"
    config = small_config(world, out, num_updates=10, rollout_batch_size=16, num_mini_batches=2,
                          per_device_train_batch_size=8, num_ppo_epochs=4, learning_rate=1e-2, sample_every=5)
    result = train_ppo(config, prompts=world.prompts, reward_fn=has_digit)
    rows = read_rows(out / "metrics.jsonl")
    assert [r["update"] for r in rows] == list(range(1, 11))
    assert [r["episode"] for r in rows] == [16 * u for u in range(1, 11)]
    for row in rows:
        for key in TRL_KEYS:
            assert key in row and math.isfinite(row[key]), key
        assert row["objective/entropy"] >= 0
        assert row["policy/approxkl_avg"] >= 0
        assert 0 <= row["policy/clipfrac_avg"] <= 1 and 0 <= row["val/clipfrac_avg"] <= 1
        assert row["loss/value_avg"] >= 0
        assert -1 < row["objective/kl"] < 30  # nats per 6-token sequence; log(V) x 6 is ~35
        assert row["objective/rlhf_reward"] == pytest.approx(row["objective/scores"] + row["objective/non_score_reward"], abs=1e-5)
        assert row["objective/non_score_reward"] == pytest.approx(-0.05 * row["objective/kl"], abs=1e-5)
    assert abs(rows[0]["objective/kl"]) < 1e-4  # the first rollout comes from the reference weights
    scores = [r["objective/scores"] for r in rows]
    first, last = sum(scores[:3]) / 3, sum(scores[-3:]) / 3
    assert last - first >= 0.25, scores
    assert last >= 0.7, scores
    assert result.metrics["objective/scores"] == rows[-1]["objective/scores"]
    assert json.loads((out / "metrics.json").read_text())["updates"] == 10
    assert {r["update"] for r in read_rows(out / "samples.jsonl")} == {1, 5, 10}
    # final model: safetensors, loads with the plain Auto class, and is the trained policy
    assert (out / "model" / "model.safetensors").is_file()
    assert not list((out / "model").glob("*.bin"))
    model = AutoModelForCausalLM.from_pretrained(out / "model")
    prompt = torch.tensor([encode_prompts(world.tok, world.prompts[:1], 256)[0]])
    with torch.no_grad():
        p_new = torch.softmax(model(prompt).logits[0, -1], -1)
        p_old = torch.softmax(world.policy(prompt).logits[0, -1], -1)
    digit_ids = [i for t, i in world.tok.get_vocab().items() if any(c.isdigit() for c in world.tok.convert_tokens_to_string([t]))]
    assert p_new[digit_ids].sum() > 1.5 * p_old[digit_ids].sum()


# ---------------------------------------------------------------------------------------
# 7. KL penalty and adaptive KL
# ---------------------------------------------------------------------------------------
def test_large_kl_coef_keeps_policy_closer(world, tmp_path):
    kwargs = dict(num_updates=6, rollout_batch_size=16, per_device_train_batch_size=8, num_ppo_epochs=4,
                  learning_rate=1e-2)
    train_ppo(small_config(world, tmp_path / "free", kl_coef=0.0, **kwargs), prompts=world.prompts, reward_fn=has_digit)
    train_ppo(small_config(world, tmp_path / "tied", kl_coef=2.0, **kwargs), prompts=world.prompts, reward_fn=has_digit)
    free, tied = read_rows(tmp_path / "free" / "metrics.jsonl"), read_rows(tmp_path / "tied" / "metrics.jsonl")
    assert free[0]["objective/kl"] == pytest.approx(tied[0]["objective/kl"], abs=1e-6)  # same seed, same start
    assert all(r["objective/non_score_reward"] == 0 for r in free)
    kl_free = sum(r["objective/kl"] for r in free[-3:]) / 3
    kl_tied = sum(r["objective/kl"] for r in tied[-3:]) / 3
    assert kl_free > 0.5 and kl_tied < 0.5 * kl_free, (kl_free, kl_tied)


def test_adaptive_kl_moves_coef_toward_target(world, tmp_path):
    target = 0.5
    config = small_config(world, tmp_path / "adaptive", num_updates=6, rollout_batch_size=16,
                          per_device_train_batch_size=8, num_ppo_epochs=4, learning_rate=1e-2,
                          kl_coef=0.1, kl_target=target, kl_horizon=16)
    train_ppo(config, prompts=world.prompts, reward_fn=has_digit)
    rows = read_rows(tmp_path / "adaptive" / "metrics.jsonl")
    assert rows[0]["objective/kl_coef"] == pytest.approx(0.1)
    directions = set()
    for before, after in zip(rows, rows[1:]):
        error = before["objective/kl"] / target - 1
        change = after["objective/kl_coef"] / before["objective/kl_coef"] - 1
        # beta <- beta (1 + clip(error, -0.2, 0.2) * 16 / 16)
        assert change == pytest.approx(max(-0.2, min(0.2, error)), abs=1e-6)
        directions.add(math.copysign(1, change))
    assert directions == {-1.0, 1.0}, "the run should see KL both below and above the target"


# ---------------------------------------------------------------------------------------
# 8. LoRA: the reference is the adapter disabled
# ---------------------------------------------------------------------------------------
def test_lora_uses_disabled_adapter_as_reference_and_saves_merged_model(world, tmp_path, monkeypatch):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    seen = []
    original = trainer_mod.make_rollout

    def spy(module, ref_policy, *args, **kwargs):
        seen.append((type(module.policy), ref_policy))
        return original(module, ref_policy, *args, **kwargs)

    monkeypatch.setattr(trainer_mod, "make_rollout", spy)
    policy = AutoModelForCausalLM.from_pretrained(world.policy_dir)
    out = tmp_path / "lora"
    config = small_config(world, out, lora=True, lora_r=4, num_updates=None, total_episodes=24, num_ppo_epochs=4,
                          learning_rate=3e-2)
    train_ppo(config, policy=policy, tokenizer=world.tok, prompts=world.prompts, reward_fn=has_digit)
    assert len(seen) == 3 and all(ref is None and issubclass(cls, PeftModel) for cls, ref in seen)
    rows = read_rows(out / "metrics.jsonl")
    assert abs(rows[0]["objective/kl"]) < 1e-5  # adapter B = 0 at the start: policy == reference
    assert abs(rows[-1]["objective/kl"]) > 1e-3  # the adapter moved away from the disabled-adapter reference
    model_dir = out / "model"
    assert not (model_dir / "adapter_config.json").exists()
    assert json.loads((model_dir / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    weights = _weights(model_dir)
    assert not any("lora" in k for k in weights)
    merged = AutoModelForCausalLM.from_pretrained(model_dir)
    assert not isinstance(merged, PeftModel)
    prompt = torch.tensor([encode_prompts(world.tok, world.prompts[:1], 256)[0]])
    with torch.no_grad():  # `policy` now carries the trained adapter: merged == base + adapter
        torch.testing.assert_close(merged(prompt).logits, policy(prompt).logits, atol=1e-4, rtol=0)
        assert (merged(prompt).logits - world.policy(prompt).logits).abs().max() > 1e-3


class _Crash(Exception):
    pass


def _crash_at_call(n):
    calls = []

    def reward(prompts, responses):
        calls.append(1)
        if len(calls) == n:
            raise _Crash()
        return has_digit(prompts, responses)

    return reward


def test_lora_resume_restores_the_trained_adapter(world, tmp_path):
    """A crash after the update-2 checkpoint, then a re-run: same rows and weights as 4 straight updates
    (a resume that started from fresh adapters would show KL ~ 0 again at update 3)."""
    kwargs = dict(lora=True, lora_r=4, num_updates=4, save_steps=2, num_ppo_epochs=2, learning_rate=3e-2)
    train_ppo(small_config(world, tmp_path / "straight", **kwargs), prompts=world.prompts, reward_fn=has_digit)
    out = tmp_path / "crashed"
    with pytest.raises(_Crash):
        train_ppo(small_config(world, out, **kwargs), prompts=world.prompts, reward_fn=_crash_at_call(3))
    assert [r["update"] for r in read_rows(out / "metrics.jsonl")] == [1, 2]
    train_ppo(small_config(world, out, **kwargs), prompts=world.prompts, reward_fn=has_digit)
    rows_a = same_rows(tmp_path / "straight", out, 4)
    assert abs(rows_a[2]["objective/kl"]) > 1e-3
    wa, wb = _weights(tmp_path / "straight" / "model"), _weights(out / "model")
    for key in wa:
        torch.testing.assert_close(wb[key], wa[key], atol=1e-6, rtol=0)


def test_target_kl_stops_the_epochs_early(world, tmp_path):
    config = small_config(world, tmp_path / "early", num_updates=1, num_ppo_epochs=4, learning_rate=1e-2, target_kl=1e-6)
    train_ppo(config, prompts=world.prompts, reward_fn=has_digit)
    assert read_rows(tmp_path / "early" / "metrics.jsonl")[0]["policy/early_stopped"] == 1.0
    config = small_config(world, tmp_path / "full", num_updates=1, num_ppo_epochs=4, learning_rate=1e-2, target_kl=10.0)
    train_ppo(config, prompts=world.prompts, reward_fn=has_digit)
    assert read_rows(tmp_path / "full" / "metrics.jsonl")[0]["policy/early_stopped"] == 0.0


# ---------------------------------------------------------------------------------------
# 9. a reward model with its own tokenizer
# ---------------------------------------------------------------------------------------
def _spy_rollouts(monkeypatch):
    records = SimpleNamespace(rollouts=[], scorers=[])
    original = trainer_mod.make_rollout

    def spy(module, ref_policy, scorer, tokenizer, prompts, *args, **kwargs):
        rollout, texts = original(module, ref_policy, scorer, tokenizer, prompts, *args, **kwargs)
        records.rollouts.append((prompts, rollout, texts))
        records.scorers.extend(scorer.members)
        return rollout, texts

    monkeypatch.setattr(trainer_mod, "make_rollout", spy)
    return records


def test_reward_model_with_other_tokenizer_scores_reencoded_text(world, tmp_path, monkeypatch):
    records = _spy_rollouts(monkeypatch)
    config = small_config(world, tmp_path / "rm2", reward_model=str(world.rm2_dir), num_updates=1)
    train_ppo(config, prompts=world.prompts)
    scorer = records.scorers[0]
    assert scorer.same_tokenizer is False and len(scorer.tokenizer) == len(world.tok2)
    prompts, rollout, texts = records.rollouts[0]
    with torch.no_grad():
        expected = []
        for prompt, text in zip(prompts, texts):
            ids = world.tok2.apply_chat_template(prompt + [{"role": "assistant", "content": text}], tokenize=True,
                                                 return_dict=True)["input_ids"]
            expected.append(world.rm2(input_ids=torch.tensor([ids])).logits[0, 0])
    torch.testing.assert_close(rollout.raw_scores, torch.stack(expected), atol=1e-4, rtol=0)
    with torch.no_grad():  # the policy's token ids through rm2 would give other scores
        wrong = sequence_scores(world.rm2, rollout.input_ids, rollout.attention_mask)
    assert (wrong - rollout.raw_scores).abs().max() > 1e-3


def test_reward_model_with_same_tokenizer_scores_rollout_ids(world, tmp_path, monkeypatch):
    """Same tokenizer: the reward model reads the rollout's own ids. Sampled in chunks of 3
    (rollout_forward_batch_size), so this also checks the re-padding of concatenated chunks."""
    records = _spy_rollouts(monkeypatch)
    prompts = world.prompts + [[{"role": "user", "content": "why?"}], [{"role": "user", "content": "count to three"}]] * 3
    config = small_config(world, tmp_path / "rm", reward_model=str(world.rm_dir), value_model="reward", num_updates=1,
                          rollout_forward_batch_size=3, missing_eos_penalty=1.0, score_clip=50.0)
    train_ppo(config, prompts=prompts)
    assert records.scorers[0].same_tokenizer is True
    _, rollout, _ = records.rollouts[0]
    mask = rollout.response_mask
    assert len(set(rollout.query_mask.sum(1).tolist())) > 1, "queries of several lengths"
    with torch.no_grad():
        expected = sequence_scores(world.rm, rollout.input_ids, rollout.attention_mask)
        logits = response_logits(world.policy, rollout.input_ids, rollout.attention_mask, mask.shape[1])
        logprobs = logprobs_from_logits(logits, rollout.response_ids) * mask
        values = token_values(world.rm, rollout.input_ids, rollout.attention_mask, mask.shape[1]) * mask
    torch.testing.assert_close(rollout.raw_scores, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(rollout.scores, rollout.raw_scores - 1.0 * (~rollout.has_eos), atol=1e-6, rtol=0)
    # update 1 samples from the initial policy, which is also the reference; the value model starts as the RM
    torch.testing.assert_close(rollout.logprobs, logprobs, atol=1e-4, rtol=0)
    torch.testing.assert_close(rollout.ref_logprobs, logprobs, atol=1e-4, rtol=0)
    torch.testing.assert_close(rollout.values, values, atol=1e-4, rtol=0)


def test_value_model_from_reward_model_with_other_tokenizer_is_rejected(world, tmp_path):
    config = small_config(world, tmp_path / "bad", reward_model=str(world.rm2_dir), value_model="reward")
    with pytest.raises(ConfigError, match="value_model: 'reward' needs a reward model with the policy's tokenizer"):
        train_ppo(config, prompts=world.prompts)


# ---------------------------------------------------------------------------------------
# 10. two processes on CPU (gloo) through accelerate launch
# ---------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(tmp_path: Path, config: PPOStageConfig, prompts: list, *flags: str, **env) -> subprocess.Popen:
    """``accelerate launch`` of RUN_SCRIPT on 2 CPU processes."""
    name = Path(config.output_dir).name
    (tmp_path / f"{name}.json").write_text(json.dumps(vars(config)))
    (tmp_path / "prompts.json").write_text(json.dumps(prompts))
    (tmp_path / "run.py").write_text(RUN_SCRIPT)
    accelerate = Path(PYTHON).parent / "accelerate"
    # accelerate 1.15: `--cpu --num_processes 2` silently starts ONE process (simple launcher);
    # two CPU processes on gloo take the torchrun launcher (--multi_gpu or --use_fsdp) plus ACCELERATE_USE_CPU.
    return subprocess.Popen(
        [str(accelerate), "launch", *(flags or ("--multi_gpu",)), "--num_processes", "2", "--num_machines", "1",
         "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
         str(tmp_path / "run.py"), str(tmp_path / f"{name}.json"), str(tmp_path / "prompts.json")],
        env=_run_env(ACCELERATE_USE_CPU="true", **env), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        cwd=tmp_path)


def _finish(proc: subprocess.Popen, timeout: int = 300) -> str:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-4000:]
    assert out.count("finished") == 2, out[-4000:]
    return out


FSDP = ("--use_fsdp", "--fsdp_version", "2")


def same_training(world, straight: Path, other: Path) -> None:
    """``other`` (another launch of the same config) ended with ``straight``'s final policy and update-2
    checkpoint (policy, value, and AdamW's moments, which are not scale-free as the weights' steps are:
    the averaged gradients agree), and they trained."""
    from safetensors.torch import load_file

    for name in ("model/model.safetensors", "checkpoints/update-000002/policy.safetensors",
                 "checkpoints/update-000002/value.safetensors"):
        same_weights(straight, other, name)
    initial = load_file(str(world.policy_dir / "model.safetensors"))
    final = load_file(str(straight / "model/model.safetensors"))
    assert max((final[k] - initial[k]).abs().max().item() for k in initial) > 1e-3  # it trained
    opt_a = torch.load(straight / "checkpoints/update-000002/optimizer.pt", weights_only=True)
    opt_b = torch.load(other / "checkpoints/update-000002/optimizer.pt", weights_only=True)
    assert opt_a["param_groups"] == opt_b["param_groups"] and sorted(opt_a["state"]) == sorted(opt_b["state"])
    assert len(opt_a["state"]) > 10
    for i, entries in opt_a["state"].items():
        assert sorted(entries) == sorted(opt_b["state"][i])
        for key, value in entries.items():
            torch.testing.assert_close(opt_b["state"][i][key], value, rtol=1e-3, atol=1e-7, msg=f"{i} {key}")


@pytest.mark.slow
def test_two_process_cpu_run_with_accelerate_launch(world, tmp_path):
    out = tmp_path / "ddp"
    config = small_config(world, out, num_updates=2, rollout_batch_size=8, num_mini_batches=2,
                          per_device_train_batch_size=2, save_steps=1, sample_every=1)
    stdout = _finish(_launch(tmp_path, config, world.prompts))
    assert "2 processes" in stdout  # the batch arithmetic saw both processes
    assert "FSDP" not in stdout
    rows = read_rows(out / "metrics.jsonl")
    assert [(r["update"], r["episode"]) for r in rows] == [(1, 8), (2, 16)]
    for row in rows:
        for key in TRL_KEYS:
            assert key in row and math.isfinite(row[key]), key
    assert (out / "checkpoints" / "update-000001" / "state.json").is_file()
    assert (out / "model" / "model.safetensors").is_file()


@pytest.mark.slow
def test_fsdp_run_killed_and_resumed_equals_data_parallel_run(world, tmp_path):
    """The same config under `--use_fsdp` (policy and value sharded over 2 processes), SIGKILLed
    after its update-2 checkpoint and resumed, against a straight data-parallel (DDP) run.

    Each process samples its half of the batch with its own generator in both runs, so the
    episodes are the same; what sharding changes is arithmetic order: FSDP samples through the
    model's forward (DDP takes the CPU fast path: log-probs ~1e-6 apart), reduce-scatters rather
    than all-reduces, and sums the gradient norm shard by shard. So the figures agree to float32
    rounding carried through 8 AdamW steps, far inside what a lost shard, a wrong average or a
    misplaced resume would move (the weights move by ~1e-2 at this learning rate)."""
    # micro-batch 1: gradient accumulation 2, so FSDP's deferred gradient sync is exercised too
    kwargs = dict(num_updates=4, rollout_batch_size=8, num_mini_batches=2, per_device_train_batch_size=1,
                  save_steps=2, save_total_limit=2, sample_every=1, kl_coef=0.1)
    ddp, fsdp = tmp_path / "ddp", tmp_path / "fsdp"
    straight = _launch(tmp_path, small_config(world, ddp, **kwargs), world.prompts)
    _finish(straight)

    config = small_config(world, fsdp, **kwargs)
    parked = tmp_path / "parked"  # a process parks in update 3, after the update-2 checkpoint
    proc = _launch(tmp_path, config, world.prompts, *FSDP, HANG_AT_CALL="3", PARKED=str(parked))
    try:
        deadline = time.time() + 180
        while not parked.exists():
            assert proc.poll() is None, proc.communicate()[0][-4000:]
            assert time.time() < deadline, "the run did not reach update 3 in 180 s"
            time.sleep(0.05)
        assert (fsdp / "checkpoints" / "update-000002" / "state.json").is_file()
        assert proc.poll() is None, "the run must still be going when it is killed"
    finally:
        import psutil  # accelerate's dependency

        for process in [*psutil.Process(proc.pid).children(recursive=True), psutil.Process(proc.pid)]:
            process.kill()  # SIGKILL: both workers (torchrun starts them in sessions of their own), then the launcher
        proc.communicate(timeout=60)
    assert not (fsdp / "model").exists()
    stdout = _finish(_launch(tmp_path, config, world.prompts, *FSDP))
    assert "FSDP: the policy and value model sharded over 2 processes (one unit per decoder layer), the reference" in stdout
    assert "resuming from" in stdout and "update 2 of 4" in stdout

    from safetensors.torch import load_file

    # the log, the final policy and the update-2 checkpoint (written sharded, before the kill): the straight run's
    same_rows(ddp, fsdp, updates=4)
    same_training(world, ddp, fsdp)
    final = load_file(str(ddp / "model/model.safetensors"))
    # and the final folder loads as an ordinary model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(fsdp / "model")
    loaded = model.state_dict()
    for key, value in final.items():
        torch.testing.assert_close(loaded[key], value, atol=1e-5, rtol=0)
    assert model.lm_head.weight is model.model.embed_tokens.weight  # still tied


@pytest.mark.slow
def test_lora_under_fsdp_equals_lora_data_parallel_and_resumes(world, tmp_path):
    """LoRA on a sharded policy (frozen base and trained adapter in the same FSDP units; the reference
    is the sharded policy with its adapter disabled) against the same LoRA run data parallel: the same
    rows, the same checkpoint (full PEFT weights, adapter included) and the same merged final model,
    which PEFT merges in an unsharded copy built from the gathered weights. The FSDP run then loses its
    end (final model, summary, last row: as a kill after the update-2 checkpoint leaves it) and resumes
    from the checkpoint, cutting the full PEFT weights back into shards, to the same final model."""
    kwargs = dict(lora=True, lora_r=4, num_updates=3, rollout_batch_size=8, num_mini_batches=2,
                  per_device_train_batch_size=1, save_steps=1, save_total_limit=3, learning_rate=3e-2, kl_coef=0.1)
    ddp, fsdp = tmp_path / "ddp", tmp_path / "fsdp"
    _finish(_launch(tmp_path, small_config(world, ddp, **kwargs), world.prompts))
    config = small_config(world, fsdp, **kwargs)
    stdout = _finish(_launch(tmp_path, config, world.prompts, *FSDP))
    assert "sharded over 2 processes (one unit per decoder layer), 0 reward model(s) too" in stdout  # no reference copy

    from safetensors.torch import load_file

    rows = same_rows(ddp, fsdp, updates=3)
    assert abs(rows[0]["objective/kl"]) < 1e-5 < abs(rows[-1]["objective/kl"])  # reference = adapter disabled
    ckpt_weights = same_weights(ddp, fsdp, "checkpoints/update-000002/policy.safetensors")
    assert any("lora_B" in k for k in ckpt_weights) and any(k.endswith("base_layer.weight") for k in ckpt_weights)
    final = same_weights(ddp, fsdp, "model/model.safetensors")
    assert not any("lora" in k or "base_layer" in k for k in final)  # merged: an ordinary model's names
    initial = load_file(str(world.policy_dir / "model.safetensors"))
    assert sorted(final) == sorted(initial)
    assert max((final[k] - initial[k]).abs().max().item() for k in initial) > 1e-3  # the adapter was merged in

    import shutil

    shutil.rmtree(fsdp / "model")
    (fsdp / "metrics.json").unlink()
    assert not (fsdp / "checkpoints" / "update-000003").exists()  # the last update is not saved
    lines = (fsdp / "metrics.jsonl").read_text().splitlines()
    (fsdp / "metrics.jsonl").write_text("\n".join(lines[:2]) + "\n")
    stdout = _finish(_launch(tmp_path, config, world.prompts, *FSDP))
    assert "resuming from" in stdout and "update 2 of 3" in stdout
    same_rows(ddp, fsdp, updates=3)
    same_weights(ddp, fsdp, "model/model.safetensors")


# what `accelerate launch --config_file configs/accelerate/deepspeed_zero2.yaml` exports (its config's accumulation
# of 1 included: the RL stage's engines take the batch arithmetic's)
ZERO2 = {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "2", "ACCELERATE_GRADIENT_ACCUMULATION_STEPS": "1"}


def _cut_back_to(out: Path, update: int) -> None:
    """Leave ``out`` as a kill after its update-``update`` checkpoint does: no final model, no summary,
    no later rows or checkpoints."""
    import shutil

    shutil.rmtree(out / "model")
    (out / "metrics.json").unlink()
    for later in (out / "checkpoints").iterdir():
        if later.name > f"update-{update:06d}":
            shutil.rmtree(later)
    lines = (out / "metrics.jsonl").read_text().splitlines()
    (out / "metrics.jsonl").write_text("\n".join(lines[:update]) + "\n")


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_zero_equals_data_parallel_and_resumes_from_either(world, tmp_path, stage):
    """PPO (policy and value model) under DeepSpeed ZeRO-2 and ZeRO-3 on 2 processes (gloo): each model in
    its own engine, its optimizer state and gradients (ZeRO-3: and weights) partitioned, against the same
    config data parallel (DDP).

    Each process samples its half of the batch with its own generator in both runs, so the episodes are
    the same; ZeRO reduces the gradients in buckets and clips from the partitions' norms, so the figures
    agree to float32 rounding carried through 6 AdamW steps. The checkpoints hold the optimizer state
    whole, in the layout of one AdamW: the ZeRO run cut back to its update-2 checkpoint resumes to the
    same end, and so does a copy of the DDP run's folder resumed under ZeRO."""
    kwargs = dict(num_updates=3, rollout_batch_size=8, num_mini_batches=2, per_device_train_batch_size=1,
                  save_steps=1, save_total_limit=3, kl_coef=0.1, max_grad_norm=0.05)  # clipping active
    ddp, zero = tmp_path / "ddp", tmp_path / "zero"
    _finish(_launch(tmp_path, small_config(world, ddp, **kwargs), world.prompts))
    config = small_config(world, zero, **kwargs)
    launch = {**ZERO2, "ACCELERATE_DEEPSPEED_ZERO_STAGE": str(stage)}
    stdout = _finish(_launch(tmp_path, config, world.prompts, **launch))
    held = "the optimizer state and gradients" + (", and the weights," if stage == 3 else "")
    assert f"DeepSpeed ZeRO-{stage}: {held} of the policy and value model partitioned over 2" in stdout
    same_rows(ddp, zero, updates=3)
    same_training(world, ddp, zero)  # the optimizer state assembled from the partitions: one AdamW's, as DDP wrote it

    _cut_back_to(zero, 2)
    stdout = _finish(_launch(tmp_path, config, world.prompts, **launch))
    assert "resuming from" in stdout and "update 2 of 3" in stdout
    same_rows(ddp, zero, updates=3)
    same_weights(ddp, zero, "model/model.safetensors")

    import shutil

    crossed = tmp_path / "crossed"  # the DDP run's checkpoint, resumed under ZeRO
    shutil.copytree(ddp, crossed)
    _cut_back_to(crossed, 2)
    _finish(_launch(tmp_path, small_config(world, crossed, **kwargs), world.prompts, **launch))
    same_rows(ddp, crossed, updates=3)
    same_weights(ddp, crossed, "model/model.safetensors")


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_rloo_with_lora_under_zero_equals_data_parallel(world, tmp_path, stage):
    """No value model (one engine), LoRA (the engine's optimizer holds the adapter only; the reference is
    the policy with its adapter disabled): the data-parallel run's rows and merged final model."""
    kwargs = dict(algorithm="rloo", num_generations=2, lora=True, lora_r=4, num_updates=2, rollout_batch_size=8,
                  num_mini_batches=2, per_device_train_batch_size=1, learning_rate=3e-2, kl_coef=0.1)
    ddp, zero = tmp_path / "ddp", tmp_path / "zero"
    _finish(_launch(tmp_path, small_config(world, ddp, **kwargs), world.prompts))
    stdout = _finish(_launch(tmp_path, small_config(world, zero, **kwargs), world.prompts,
                             **{**ZERO2, "ACCELERATE_DEEPSPEED_ZERO_STAGE": str(stage)}))
    assert f"DeepSpeed ZeRO-{stage}: the optimizer state" in stdout and "of the policy partitioned over 2 processes" in stdout
    rows = same_rows(ddp, zero, updates=2)
    assert abs(rows[0]["objective/kl"]) < 1e-5 < abs(rows[-1]["objective/kl"])  # reference = adapter disabled
    final = same_weights(ddp, zero, "model/model.safetensors")
    assert not any("lora" in k for k in final)


@pytest.mark.slow
def test_ptx_under_zero2_equals_data_parallel(world, tmp_path):
    """PPO-ptx: under ZeRO-2 the demonstrations' loss joins the policy's loss in one backward (ZeRO-2 has no
    no_sync), where data parallelism runs it as a backward of its own without a gradient sync: the same sum."""
    demos = tmp_path / "demos.json"
    demos.write_text(json.dumps(_demonstrations(world.prompts)))
    kwargs = dict(num_updates=2, rollout_batch_size=8, num_mini_batches=2, per_device_train_batch_size=1,
                  ptx_coef=0.5, kl_coef=0.1)
    ddp, zero = tmp_path / "ddp", tmp_path / "zero"
    _finish(_launch(tmp_path, small_config(world, ddp, **kwargs), world.prompts, DEMOS=str(demos)))
    _finish(_launch(tmp_path, small_config(world, zero, **kwargs), world.prompts, DEMOS=str(demos), **ZERO2))
    rows = same_rows(ddp, zero, updates=2)
    assert all(r["loss/ptx_avg"] > 0 for r in rows)
    same_weights(ddp, zero, "model/model.safetensors")


# ---------------------------------------------------------------------------------------
# 11. user errors
# ---------------------------------------------------------------------------------------
def test_no_reward_model_and_no_reward_fn_is_a_config_error(world, tmp_path):
    with pytest.raises(ConfigError, match="reward_model"):
        train_ppo(small_config(world, tmp_path / "o"), prompts=world.prompts)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("env, message", [
    ({"ACCELERATE_DEEPSPEED_ZERO_STAGE": "1"}, "ZeRO stage 1: the RL stage runs ZeRO-2 or ZeRO-3"),
    ({"ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE": "cpu"}, "offload_optimizer_device cpu: .* set it to none"),
    ({"ACCELERATE_DEEPSPEED_CONFIG_FILE": "ds.json"}, "a DeepSpeed config file"),
])
def test_what_a_deepspeed_launch_asks_that_the_rl_stage_cannot_do_is_refused_before_loading(world, tmp_path, monkeypatch, env, message):
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")  # what `accelerate launch` with a DeepSpeed file exports
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    config = small_config(world, tmp_path / "o", model=str(tmp_path / "absent"))
    with pytest.raises(ConfigError, match=message) as info:
        train_ppo(config, prompts=world.prompts, reward_fn=has_digit)
    assert "cannot load" not in str(info.value) and not (tmp_path / "o").exists()


def test_value_model_reward_without_reward_model_fails_before_loading(world, tmp_path):
    config = small_config(world, tmp_path / "o", model=str(tmp_path / "absent"), value_model="reward")
    with pytest.raises(ConfigError, match="value_model: 'reward' needs reward_model") as info:
        train_ppo(config, prompts=world.prompts, reward_fn=has_digit)
    assert "cannot load" not in str(info.value)


def test_nan_reward_stops_with_one_line_and_logs_no_nan(world, tmp_path):
    from rlhfkit.errors import RlhfkitError

    def nan_reward(prompts, responses):
        return [float("nan")] * len(responses)

    with pytest.raises(RlhfkitError, match="not finite") as info:
        train_ppo(small_config(world, tmp_path / "nan"), prompts=world.prompts, reward_fn=nan_reward)
    assert "\n" not in str(info.value)
    assert not (tmp_path / "nan" / "metrics.jsonl").exists()


def test_nonexistent_model_path_is_a_config_error_naming_it(world, tmp_path):
    missing = tmp_path / "nowhere" / "policy"
    with pytest.raises(ConfigError) as info:
        train_ppo(small_config(world, tmp_path / "o", model=str(missing)), prompts=world.prompts, reward_fn=has_digit)
    assert str(missing) in str(info.value)


def test_dataset_without_prompt_column_is_a_config_error(world, tmp_path):
    from datasets import Dataset

    data = Dataset.from_dict({"text": ["a", "b"], "label": [0, 1]})
    data.save_to_disk(str(tmp_path / "data"))
    config = small_config(world, tmp_path / "o", data=str(tmp_path / "data"))
    with pytest.raises(ConfigError, match="'prompt' column"):
        train_ppo(config, reward_fn=has_digit)
    with pytest.raises(ConfigError, match="'prompt' column"):
        train_ppo(small_config(world, tmp_path / "o"), prompts=data, reward_fn=has_digit)


# ---------------------------------------------------------------------------------------
# 11. reward-model ensembles and critic warm-up
# ---------------------------------------------------------------------------------------
def _member(world, folder: Path, source: Path, mean: float, std: float) -> Path:
    """A reward-stage-like folder: the model plus the held-out score scale in metrics.json."""
    import shutil

    shutil.copytree(source, folder / "model")
    (folder / "metrics.json").write_text(json.dumps({"eval_reward_mean": mean, "eval_reward_std": std}))
    return folder


def test_ensemble_scores_are_standardised_members_combined(world, tmp_path, monkeypatch):
    from rlhfkit.ppo import trainer as trainer_mod

    a = _member(world, tmp_path / "a", world.rm_dir, mean=0.5, std=2.0)
    b = _member(world, tmp_path / "b", world.rm_dir, mean=-1.0, std=0.5)  # same weights, another scale
    records = []
    original = trainer_mod.make_rollout

    def spy(module, ref_policy, scorer, tokenizer, prompts, *args, **kwargs):
        rollout, texts = original(module, ref_policy, scorer, tokenizer, prompts, *args, **kwargs)
        records.append((scorer, rollout))
        return rollout, texts

    monkeypatch.setattr(trainer_mod, "make_rollout", spy)
    config = small_config(world, tmp_path / "out", num_updates=1, reward_model=[str(a), str(b)],
                          ensemble_reduction="min")
    train_ppo(config, prompts=world.prompts)
    scorer, rollout = records[0]
    assert [n for n in scorer.norms] == [(0.5, 2.0), (-1.0, 0.5)]
    # by hand: both members give the same raw score s; standardised (s - 0.5) / 2 and (s + 1) / 0.5
    raw = sequence_scores(world.rm, rollout.input_ids, rollout.attention_mask)
    z = torch.stack([(raw - 0.5) / 2.0, (raw + 1.0) / 0.5])
    torch.testing.assert_close(rollout.raw_scores, z.min(0).values, atol=1e-5, rtol=0)
    torch.testing.assert_close(rollout.score_std, (z[0] - z[1]).abs() / 2, atol=1e-5, rtol=0)
    row = read_rows(tmp_path / "out" / "metrics.jsonl")[0]
    assert row["objective/ensemble_std"] == pytest.approx(rollout.score_std.mean().item(), abs=1e-6)
    # a member without its held-out scale is refused before training, naming the folder
    bare = tmp_path / "bare"
    bare.mkdir()
    import shutil

    shutil.copytree(world.rm_dir, bare / "model")
    with pytest.raises(ConfigError, match="bare has no metrics.json"):
        train_ppo(small_config(world, tmp_path / "out2", reward_model=[str(a), str(bare)]), prompts=world.prompts)


def test_value_warmup_trains_only_the_critic(world, tmp_path):
    from safetensors.torch import load_file

    out = tmp_path / "warm"
    config = small_config(world, out, num_updates=3, value_warmup_updates=2, save_steps=1, save_total_limit=5,
                          learning_rate=1e-2)
    train_ppo(config, prompts=world.prompts, reward_fn=has_digit)
    start = {k: v for k, v in world.policy.state_dict().items()}
    after_warmup = load_file(out / "checkpoints" / "update-000002" / "policy.safetensors")
    assert all(torch.equal(after_warmup[k], start[k]) for k in after_warmup if k in start)
    value_1 = load_file(out / "checkpoints" / "update-000001" / "value.safetensors")
    value_2 = load_file(out / "checkpoints" / "update-000002" / "value.safetensors")
    assert any(not torch.equal(value_1[k], value_2[k]) for k in value_1)  # the critic did train
    rows = read_rows(out / "metrics.jsonl")
    assert rows[1]["objective/kl"] == pytest.approx(0.0, abs=1e-5)  # update 2 still samples the start policy
    final = load_file(out / "model" / "model.safetensors")
    assert any(not torch.equal(final[k], start[k]) for k in final if k in start)  # update 3 moved the policy
    with pytest.raises(ConfigError, match="value_warmup_updates=3 leaves no policy update"):
        train_ppo(small_config(world, tmp_path / "x", num_updates=3, value_warmup_updates=3), prompts=world.prompts,
                  reward_fn=has_digit)


def test_kl_budget_stops_at_the_first_window_over_budget(world, tmp_path):
    out = tmp_path / "budget"
    config = small_config(world, out, num_updates=12, rollout_batch_size=16, per_device_train_batch_size=8,
                          num_ppo_epochs=4, learning_rate=1e-2, kl_coef=0.0, kl_budget=0.5, kl_budget_window=2)
    result = train_ppo(config, prompts=world.prompts, reward_fn=has_digit)
    rows = read_rows(out / "metrics.jsonl")
    done = result.metrics["updates_done"]
    assert result.metrics["stopped_at_kl_budget"] and 2 <= done < 12 and len(rows) == done
    kls = [r["objective/kl"] for r in rows]
    windows = [(a + b) / 2 for a, b in zip(kls, kls[1:])]  # mean of updates (u, u+1)
    assert windows[-1] >= 0.5 and all(w < 0.5 for w in windows[:-1]), kls
    assert result.metrics["updates"] == 12  # the planned run: a re-run finds it finished, does nothing
    again = train_ppo(config, prompts=world.prompts, reward_fn=has_digit)
    assert again.metrics == json.loads((out / "metrics.json").read_text()) and len(read_rows(out / "metrics.jsonl")) == done
    with pytest.raises(ConfigError, match="kl_budget must be > 0"):
        train_ppo(small_config(world, tmp_path / "x", kl_budget=0.0), prompts=world.prompts, reward_fn=has_digit)
    with pytest.raises(ConfigError, match="learning_rate must be a finite number, got nan"):
        train_ppo(small_config(world, tmp_path / "x", learning_rate=float("nan")), prompts=world.prompts,
                  reward_fn=has_digit)


def test_ppo_refuses_to_overwrite_another_stages_folder(world, tmp_path):
    """A PPO run pointed at a reward stage's folder once replaced its model/ and metrics.json."""
    import shutil

    reward = tmp_path / "reward"
    shutil.copytree(world.rm_dir, reward / "model")
    (reward / "stage_config.json").write_text("{}")
    (reward / "metrics.json").write_text(json.dumps({"stage": "reward", "eval_accuracy": 0.7}))
    before = {p: p.read_bytes() for p in reward.rglob("*") if p.is_file()}
    with pytest.raises(ConfigError, match=f"output_dir {reward}: holds the output of the reward stage"):
        train_ppo(small_config(world, reward), prompts=world.prompts, reward_fn=has_digit)
    assert {p: p.read_bytes() for p in reward.rglob("*") if p.is_file()} == before
    # and the SFT / reward stages refuse a PPO folder
    from rlhfkit.artifacts import other_stage

    out = tmp_path / "ppo"
    result = train_ppo(small_config(world, out, num_updates=1), prompts=world.prompts, reward_fn=has_digit)
    assert result.metrics["stage"] == "ppo" and other_stage(out, "ppo") is None
    assert other_stage(out, "sft") == "ppo" and other_stage(out, "reward") == "ppo"
    (out / "metrics.json").unlink()  # a PPO run still in progress: its log marks the folder
    assert other_stage(out, "reward") == "ppo"


# ---------------------------------------------------------------------------------------
# 13. PPO-ptx: the SFT demonstrations' NLL added to every optimizer step
# ---------------------------------------------------------------------------------------
REFUSAL = "Sorry, I can't help with that."


def _demonstrations(prompts):
    return [p + [{"role": "assistant", "content": REFUSAL}] for p in prompts]


def test_demonstrations_are_tokenized_as_the_policy_samples_them(world):
    from rlhfkit.ppo.trainer import Demonstrations

    convs = [[{"role": "user", "content": "why?"}, {"role": "assistant", "content": "count to three"}],
             [{"role": "user", "content": "reverse the words"}, {"role": "assistant", "content": REFUSAL}]]
    demos = Demonstrations.encode(world.tok, convs, max_prompt_length=256, response_length=48)
    eos = world.tok.eos_token_id
    for (prompt, reply), conv, context in zip(demos.pairs, convs, encode_prompts(world.tok, [c[:1] for c in convs], 256)):
        assert prompt == context  # exactly the ids PPO samples from
        assert reply == world.tok(conv[1]["content"], add_special_tokens=False)["input_ids"] + [eos]
    short = Demonstrations.encode(world.tok, convs, max_prompt_length=3, response_length=2)
    assert [(p, r) for p, r in short.pairs] == [(p[-3:], r[:2]) for p, r in demos.pairs]


def test_ptx_nll_is_the_token_mean_over_all_demonstrated_tokens(world):
    from rlhfkit.ppo.trainer import Demonstrations

    convs = [[{"role": "user", "content": "why?"}, {"role": "assistant", "content": "ok"}],
             [{"role": "user", "content": "sort: apple banana cherry then 0 1 2"},
              {"role": "assistant", "content": "apple banana cherry then 0 1 2 and " + REFUSAL}]]
    demos = Demonstrations.encode(world.tok, convs, 256, 64)
    with torch.no_grad():
        got = demos.nll(world.policy, [0, 1], "cpu").item()
        per_token = []  # each example alone, no padding, one full forward, in float64 from the logits on
        for prompt, reply in demos.pairs:
            logp = torch.log_softmax(world.policy(torch.tensor([prompt + reply])).logits[0].double(), -1)
            per_token.append([-logp[len(prompt) + j - 1, t].item() for j, t in enumerate(reply)])
    token_mean = sum(map(sum, per_token)) / sum(map(len, per_token))
    sequence_mean = sum(sum(x) / len(x) for x in per_token) / 2
    assert len(per_token[1]) > 4 * len(per_token[0])
    # float32 logits of a ~6-nat scale: ~1e-6 per token, far below the gap to the wrong means
    assert abs(token_mean - sequence_mean) > 1e-2
    assert got == pytest.approx(token_mean, abs=1e-4)


def test_ptx_teaches_the_demonstrations_while_ppo_runs(world, tmp_path):
    from rlhfkit.ppo.trainer import Demonstrations

    demos = _demonstrations(world.prompts)
    encoded = Demonstrations.encode(world.tok, demos, 256, 6)
    every = list(range(len(encoded.pairs)))

    def zero(prompts, responses):  # no reward signal: only PPO-ptx can pull towards the demonstrations
        return [0.0] * len(responses)

    with torch.no_grad():
        before = encoded.nll(world.policy, every, "cpu").item()
    after, rows = {}, {}
    for coef in (0.0, 1.0):
        out = tmp_path / f"ptx{coef}"
        train_ppo(small_config(world, out, num_updates=4, ptx_coef=coef), reward_fn=zero, prompts=world.prompts,
                  demonstrations=demos)
        from transformers import AutoModelForCausalLM

        with torch.no_grad():
            after[coef] = encoded.nll(AutoModelForCausalLM.from_pretrained(out / "model"), every, "cpu").item()
        rows[coef] = read_rows(out / "metrics.jsonl")
    assert "loss/ptx_avg" not in rows[0.0][0]
    ptx = [r["loss/ptx_avg"] for r in rows[1.0]]
    assert all(math.isfinite(x) for x in ptx) and ptx[-1] < ptx[0]
    # 8 AdamW steps at lr 3e-3 on the demonstrations: their NLL (~6 nats at the start) falls by
    # nats; PPO alone with no reward leaves it within a fraction of a nat
    assert after[1.0] < before - 1.0, (before, after)
    assert after[1.0] < after[0.0] - 1.0, (before, after)


def test_ptx_without_demonstrations_is_a_config_error(world, tmp_path):
    config = small_config(world, tmp_path / "p", ptx_coef=0.5)
    with pytest.raises(ConfigError, match="ptx_coef: set data to a data-build folder"):
        train_ppo(config, reward_fn=has_digit, prompts=world.prompts)
    assert "ptx_coef must be >= 0" in "; ".join(small_config(world, tmp_path / "q", ptx_coef=-1.0).validate())


def test_resume_skips_a_damaged_checkpoint_and_says_so(world, tmp_path, capsys):
    kwargs = dict(num_updates=3, save_steps=1, save_total_limit=2)
    train_ppo(small_config(world, tmp_path / "straight", **kwargs), prompts=world.prompts, reward_fn=has_digit)
    out = tmp_path / "damaged"
    train_ppo(small_config(world, out, **kwargs), prompts=world.prompts, reward_fn=has_digit)
    # as if killed after the update-2 checkpoint, whose policy file then lost its second half (a full disk)
    import shutil

    shutil.rmtree(out / "model")
    (out / "metrics.json").unlink()
    policy = out / "checkpoints" / "update-000002" / "policy.safetensors"
    policy.write_bytes(policy.read_bytes()[: policy.stat().st_size // 2])
    capsys.readouterr()
    result = train_ppo(small_config(world, out, **kwargs), prompts=world.prompts, reward_fn=has_digit)
    printed = capsys.readouterr().out
    assert "update-000002 is damaged: policy.safetensors does not match its recorded SHA-256" in printed
    assert "resuming from" in printed and "update-000001 (update 1 of 3)" in printed
    assert (out / "checkpoints" / "corrupt-update-000002" / "policy.safetensors").is_file()  # kept, never loaded
    assert result.metrics["update"] == 3 and [r["update"] for r in read_rows(out / "metrics.jsonl")] == [1, 2, 3]
    wa, wb = _weights(tmp_path / "straight" / "model"), _weights(out / "model")
    for key in wa:  # the resumed run is the uninterrupted one
        torch.testing.assert_close(wb[key], wa[key], atol=1e-6, rtol=0, msg=lambda m: f"{key}: {m}")


# ---------------------------------------------------------------------------------------
# 12. the critic-free estimators: rloo and grpo on the same loop
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("algorithm, level", [("rloo", "token"), ("grpo", "token"), ("rloo", "sequence"),
                                              ("grpo", "sequence")])
def test_critic_free_estimator_learns_the_toy_reward_without_a_value_model(world, tmp_path, algorithm, level):
    out = tmp_path / algorithm
    config = small_config(world, out, algorithm=algorithm, num_generations=4, num_updates=10, rollout_batch_size=16,
                          per_device_train_batch_size=8, learning_rate=1e-2, save_steps=5,
                          importance_sampling_level=level)
    result = train_ppo(config, prompts=world.prompts, reward_fn=has_digit)
    rows = read_rows(out / "metrics.jsonl")
    scores = [r["objective/scores"] for r in rows]
    first, last = sum(scores[:3]) / 3, sum(scores[-3:]) / 3
    assert last - first >= 0.25 and last >= 0.7, scores
    assert all(r["objective/kl"] < 30 for r in rows)  # nats per 6-token response; log(V) x 6 is ~35
    for row in rows:  # no value model: no value loss; grpo logs its KL loss term, rloo has none
        assert "loss/value_avg" not in row and "val/clipfrac_avg" not in row
        assert ("loss/kl_avg" in row) == (algorithm == "grpo")
        # 0/1 rewards: a group of 4 has std 0 when all agree; TRL's keys for it
        assert 0 <= row["frac_reward_zero_std"] <= 1 and 0 <= row["reward_std"] <= math.sqrt(1 / 3) + 1e-6
    zero_std = [r["frac_reward_zero_std"] for r in rows]
    assert sum(zero_std[-3:]) > sum(zero_std[:3]), zero_std  # more groups all-digit at the end
    assert not list((out / "checkpoints").glob("*/value.safetensors"))
    # the memory it saves, counted: ppo holds policy + value + reference (+ no reward model with reward_fn)
    ppo = train_ppo(small_config(world, tmp_path / "ppo", num_updates=1), prompts=world.prompts, reward_fn=has_digit)
    n_policy = sum(p.numel() for p in world.policy.parameters())
    assert result.metrics["params_held"] == 2 * n_policy  # policy + reference
    assert ppo.metrics["params_held"] > result.metrics["params_held"] + 0.9 * n_policy  # + a value model
    assert result.metrics["algorithm"] == algorithm


def test_each_prompt_is_sampled_num_generations_times_in_a_row(world, tmp_path, monkeypatch):
    records = _spy_rollouts(monkeypatch)
    train_ppo(small_config(world, tmp_path / "groups", algorithm="rloo", num_generations=4, num_updates=2,
                           rollout_batch_size=16, per_device_train_batch_size=8), prompts=world.prompts, reward_fn=has_digit)
    for update, (prompts, rollout, texts) in enumerate(records.rollouts):
        groups = [prompts[i:i + 4] for i in range(0, 16, 4)]
        assert all(g == [g[0]] * 4 for g in groups)
        expected = [world.prompts[i] for i in batch_indices(update, 4, len(world.prompts), 0)]
        assert [g[0] for g in groups] == expected  # 16 / 4 = 4 prompts per update, the seeded order
        assert len(set(texts)) > 4  # samples of one prompt differ


def test_grpo_resume_without_a_value_model_equals_the_uninterrupted_run(world, tmp_path):
    kwargs = dict(algorithm="grpo", num_generations=2, num_updates=4, save_steps=2, learning_rate=1e-2, kl_coef=0.1)
    train_ppo(small_config(world, tmp_path / "straight", **kwargs), prompts=world.prompts, reward_fn=has_digit)
    out = tmp_path / "crashed"
    with pytest.raises(_Crash):
        train_ppo(small_config(world, out, **kwargs), prompts=world.prompts, reward_fn=_crash_at_call(3))
    train_ppo(small_config(world, out, **kwargs), prompts=world.prompts, reward_fn=has_digit)
    same_rows(tmp_path / "straight", out, 4)


@pytest.mark.parametrize("change, expected", [
    ({"algorithm": "grpo", "num_generations": 1}, "num_generations: grpo needs at least 2 samples per prompt"),
    ({"algorithm": "rloo", "num_generations": 1}, "num_generations: rloo needs at least 2 samples per prompt"),
    ({"algorithm": "rloo", "num_generations": 3}, "rollout_batch_size=16 is not whole groups of num_generations=3"),
    ({"algorithm": "rloo", "num_generations": 2, "value_warmup_updates": 1}, "value_warmup_updates: rloo has no value"),
    ({"algorithm": "dpo"}, "algorithm: must be one of 'ppo', 'rloo', 'grpo', got 'dpo'"),
    ({"loss_type": "grpo"}, "loss_type: must be one of 'dapo', 'dr_grpo', got 'grpo'"),
    ({"importance_sampling_level": "sequence"}, "importance_sampling_level: sequence needs one advantage per response"),
])
def test_critic_free_settings_that_cannot_work_are_refused_in_one_line(change, expected, monkeypatch):
    from rlhfkit.config import load_config

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(ConfigError) as info:
        load_config(PPOStageConfig, {**BASE, **change})
    assert expected in str(info.value) and "\n" not in str(info.value)


def test_a_misspelt_choice_in_a_config_built_in_python_fails_before_any_model_loads(monkeypatch):
    # load_config checks choices as it reads a file; validate checks them for PPOStageConfig(...)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    config = PPOStageConfig(model="unused", num_updates=1, kl_estimator="k2", ensemble_reduction="median",
                            importance_sampling_level="sequence", algorithm="grpo")
    assert config.validate() == ["ensemble_reduction: must be one of 'mean', 'min', 'mean_minus_std', got 'median'",
                                 "kl_estimator: must be one of 'k1', 'k3', got 'k2'"]
    with pytest.raises(ConfigError, match="kl_estimator: must be one of"):
        train_ppo(config, reward_fn=has_digit)


def test_cli_refuses_grpo_with_one_sample_per_prompt_in_one_line(world, tmp_path, capsys):
    from rlhfkit.cli import main

    config = tmp_path / "grpo.yaml"
    config.write_text(f"model: {world.policy_dir}\nreward_model: {world.rm_dir}\noutput_dir: {tmp_path / 'o'}\n"
                      "algorithm: grpo\nnum_generations: 1\nnum_updates: 1\n")
    capsys.readouterr()
    assert main(["ppo", str(config)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "num_generations: grpo needs at least 2 samples per prompt" in err[0]
    assert not (tmp_path / "o").exists()


def test_num_generations_defaults_to_one_for_ppo_and_four_for_the_group_estimators():
    sizes = {a: PPOStageConfig(model="x", num_updates=1, algorithm=a) for a in ("ppo", "rloo", "grpo")}
    assert {a: (c.generations, c.prompts_per_update) for a, c in sizes.items()} == {
        "ppo": (1, 64), "rloo": (4, 16), "grpo": (4, 16)}  # the same 64 episodes per update
    assert all(c.validate() == [] for c in sizes.values())
    assert "16 prompts x num_generations 4" in sizes["grpo"].batch_arithmetic()
