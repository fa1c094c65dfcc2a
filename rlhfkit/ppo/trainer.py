"""RLHF with PPO (Ziegler et al. 2019; Ouyang et al. 2022), RLOO (Ahmadian et al. 2024) or GRPO
(Shao et al. 2024) on transformers + accelerate: one loop, ``algorithm`` picks the advantages.

One update, top to bottom:
  1. take the next ``rollout_batch_size / num_generations`` prompts (order fixed by seed and
     update index), each ``num_generations`` times;
  2. ``make_rollout``: sample, truncate at EOS, score with reference / value / reward;
  3. advantages: ppo: per-token rewards = -beta * KL + score at the last response token; GAE;
     whiten A.  rloo / grpo: one advantage per episode from its group (``critic_free_advantages``);
  4. ``ppo_update``: ``num_ppo_epochs`` x ``num_mini_batches`` optimizer steps of the clipped
     policy loss (+ vf_coef x clipped value loss for ppo; + beta x k3 KL for grpo), aggregated
     as ``loss_type`` says over the minibatch (``micro_batch_losses``); how the gradients are
     accumulated, synchronised and applied under this launch is the backend's (``rlhfkit.backends``);
  5. adapt beta (adaptive KL), log one metrics row (TRL's keys);
  6. stop once the KL budget is spent, else checkpoint every ``save_steps`` updates.

``train_ppo`` runs the stage skeleton (``rlhfkit.stage``): ``_config_problems``, ``_finished_run``,
``load_run`` (``set_up``: models, the launch's backend with its optimizer, generators, a ``RunState``;
``resume``), ``update_loop``
(the update above; ``advantages_of`` is step 3) and ``save_policy``.

The math lives in ``rlhfkit.core``; sampling and scoring in the rollout engine
(``rlhfkit.engine``); checkpoints in ``rlhfkit.checkpoint``.
"""

from __future__ import annotations

import copy
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from rlhfkit.artifacts import (StageResult, atomic_dir, claim_dir, head_problem, length_problem, load_pretrained,
                               load_scoring_model, load_tokenizer, locks_output, model_positions, positions_of, read_json,
                               resolve_model_path)
from rlhfkit.backends import Backend, DataParallel, Sharded, Zero
from rlhfkit.errors import ConfigError, RlhfkitError, first_line
from rlhfkit import checkpoint as ckpt
from rlhfkit.ppo.config import PPOStageConfig, launch_problems
from rlhfkit.core import (
    AdaptiveKLController,
    FixedKLController,
    approx_kl,
    compute_gae,
    critic_free_advantages,
    kl_penalty_loss,
    kl_per_token,
    logprobs_from_logits,
    loss_weight,
    masked_mean,
    policy_loss,
    rewards_with_kl,
    sequence_policy_loss,
    shaped_scores,
    value_loss,
    whiten,
)
from rlhfkit.engine.forward import left_pad, response_logits, token_values
from rlhfkit.engine.sampling import apply_chat_template, encode_prompts, generate
from rlhfkit.engine.scoring import EnsembleScorer, RewardFn, Scorer, held_out_norm, shares_tokenizer
from rlhfkit.engine.zero import ZeroModels, zero_stage
from rlhfkit.engine.sharding import (every_process_loads, fsdp_requested, full_state, gathered,
                                    is_partitioned, shard)
from rlhfkit.ppo.rollout import Rollout
from rlhfkit.stage import Stage, run_stage

MetricFn = Callable[[list[Any], list[str]], Sequence[float]]


class PolicyAndValue(torch.nn.Module):
    """Policy and value model as one module, so accelerate wraps (DDP, FSDP, ...) and syncs both.

    ``value`` is None for the critic-free estimators (rloo, grpo): no value model is loaded."""

    def __init__(self, policy: torch.nn.Module, value: torch.nn.Module | None):
        super().__init__()
        self.policy = policy
        self.value = value

    def forward(self, input_ids, attention_mask, response_length: int):
        logits = response_logits(self.policy, input_ids, attention_mask, response_length)
        values = None if self.value is None else token_values(self.value, input_ids, attention_mask, response_length)
        return logits, values


@dataclass
class Demonstrations:
    """PPO-ptx's data: each SFT demonstration as (prompt ids, reply ids), tokenized as the policy samples.

    The prompt is what ``encode_prompts`` gives the policy; the reply is what the chat template
    writes after it, through the first EOS (the token that ends a sampled response), cut to
    ``response_length`` tokens (the policy never writes more).
    """

    pairs: list[tuple[list[int], list[int]]]
    pad_id: int

    @classmethod
    def encode(cls, tokenizer, conversations: Sequence[list[dict]], max_prompt_length: int,
               response_length: int) -> "Demonstrations":
        eos = tokenizer.eos_token_id
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
        pairs = []
        for messages, prompt in zip(conversations, encode_prompts(tokenizer, [m[:-1] for m in conversations], 10**9)):
            full = list(apply_chat_template(tokenizer, messages, tokenize=True, return_dict=True)["input_ids"]) \
                if tokenizer.chat_template else None
            if full is not None and full[:len(prompt)] == prompt:
                reply = full[len(prompt):]
            else:  # no template, or one that renders a context differently once a reply follows
                reply = list(tokenizer(messages[-1]["content"], add_special_tokens=False)["input_ids"]) + [eos]
            if eos in reply:
                reply = reply[:reply.index(eos) + 1]
            if reply:
                pairs.append((prompt[-max_prompt_length:], reply[:response_length]))
        if not pairs:
            raise ConfigError("ptx_coef: no demonstrations with a reply in the data's SFT split")
        return cls(pairs, pad)

    def nll(self, policy: torch.nn.Module, idx: Sequence[int], device) -> torch.Tensor:
        """Token-mean negative log-likelihood of the replies ``idx`` under ``policy`` (temperature 1)."""
        query_ids, query_mask = left_pad([self.pairs[i][0] for i in idx], self.pad_id, device=device)
        replies = [self.pairs[i][1] for i in idx]
        width = max(len(r) for r in replies)
        reply_ids = torch.tensor([r + [self.pad_id] * (width - len(r)) for r in replies], device=device)
        reply_mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in replies], device=device)
        logits = response_logits(policy, torch.cat([query_ids, reply_ids], 1), torch.cat([query_mask, reply_mask], 1),
                                 width)
        return -masked_mean(logprobs_from_logits(logits, reply_ids, 1.0), reply_mask)


def disable_dropout(model: torch.nn.Module) -> None:
    """PPO's log-prob ratios assume a deterministic forward: dropout off everywhere."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    for name in ("attention_dropout", "hidden_dropout", "dropout", "resid_pdrop", "embd_pdrop", "attn_pdrop"):
        if hasattr(model.config, name) and isinstance(getattr(model.config, name), float):
            setattr(model.config, name, 0.0)


def batch_indices(update: int, batch_size: int, num_prompts: int, seed: int) -> list[int]:
    """Prompt indices of an update: epochs over a seeded permutation, derived from the update index.

    Deriving the order from (seed, update) makes the data position part of the update counter,
    so a resumed run draws exactly the prompts the uninterrupted run would have (docs/pitfalls.md#10).
    """
    start = update * batch_size
    out = []
    for position in range(start, start + batch_size):
        epoch, offset = divmod(position, num_prompts)
        generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        out.append(int(torch.randperm(num_prompts, generator=generator, device="cpu")[offset]))
    return out


@torch.no_grad()
def make_rollout(
    module: PolicyAndValue,
    ref_policy: torch.nn.Module | None,
    scorer: EnsembleScorer,
    tokenizer,
    prompts: list[Any],
    prompt_ids: list[list[int]],
    config: PPOStageConfig,
    generator: torch.Generator,
) -> tuple[Rollout, list[str]]:
    """Episodes for one batch of prompts, in ``rollout_forward_batch_size`` chunks.

    Steps: (1) sample responses at temperature T, keeping the sampled tokens' log-probs as
    the old log-probs; (2) truncate after the first EOS and pad; (3) reference log-probs at
    the same T (the adapter disabled in LoRA mode); (4) values V(s_t); (5) scores from the
    reward model or function, minus the penalty for a missing EOS, clipped if asked.
    """
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    chunks = []
    texts: list[str] = []
    step = config.rollout_forward_batch_size
    for start in range(0, len(prompts), step):
        # (1)-(2) sample, truncate after the first EOS
        with gathered(module.policy):  # FSDP or ZeRO-3: the whole policy unsharded for the decode loop
            gen = generate(module.policy, tokenizer, prompt_ids[start:start + step], config.response_length,
                           config.temperature, generator)
        response_ids, response_mask = gen.response_ids, gen.response_mask
        input_ids, attention_mask = gen.input_ids, gen.attention_mask
        width = response_ids.shape[1]
        # (3) reference log-probs
        if ref_policy is None:  # LoRA: the reference is the policy without its adapter
            with module.policy.disable_adapter():
                ref_logits = response_logits(module.policy, input_ids, attention_mask, width)
        else:
            ref_logits = response_logits(ref_policy, input_ids, attention_mask, width)
        ref_logprobs = logprobs_from_logits(ref_logits, response_ids, config.temperature) * response_mask
        del ref_logits
        # (4) values (none without a value model)
        values = (torch.zeros_like(ref_logprobs) if module.value is None
                  else token_values(module.value, input_ids, attention_mask, width) * response_mask)
        # (5) scores
        raw, score_std = scorer(input_ids, attention_mask, prompts[start:start + step], gen.texts)
        scores = shaped_scores(raw, gen.has_eos, config.missing_eos_penalty, config.score_clip)
        texts.extend(gen.texts)
        chunks.append(Rollout(gen.query_ids, gen.query_mask, response_ids, response_mask, gen.logprobs, ref_logprobs,
                              values, scores, raw, gen.has_eos, score_std))
    return concat_rollouts(chunks, pad), texts


def concat_rollouts(chunks: list[Rollout], pad_id: int) -> Rollout:
    """Join chunks whose query and response widths differ (queries pad left, responses right)."""
    if len(chunks) == 1:
        return chunks[0]
    query_width = max(c.query_ids.shape[1] for c in chunks)
    response_width = max(c.response_ids.shape[1] for c in chunks)

    def pad(t: torch.Tensor, width: int, value, left: bool) -> torch.Tensor:
        extra = width - t.shape[1]
        if extra == 0:
            return t
        filler = torch.full((t.shape[0], extra), value, dtype=t.dtype, device=t.device)
        return torch.cat([filler, t] if left else [t, filler], 1)

    return Rollout(
        query_ids=torch.cat([pad(c.query_ids, query_width, pad_id, True) for c in chunks]),
        query_mask=torch.cat([pad(c.query_mask, query_width, 0, True) for c in chunks]),
        response_ids=torch.cat([pad(c.response_ids, response_width, pad_id, False) for c in chunks]),
        response_mask=torch.cat([pad(c.response_mask, response_width, 0, False) for c in chunks]),
        logprobs=torch.cat([pad(c.logprobs, response_width, 0.0, False) for c in chunks]),
        ref_logprobs=torch.cat([pad(c.ref_logprobs, response_width, 0.0, False) for c in chunks]),
        values=torch.cat([pad(c.values, response_width, 0.0, False) for c in chunks]),
        scores=torch.cat([c.scores for c in chunks]),
        raw_scores=torch.cat([c.raw_scores for c in chunks]),
        has_eos=torch.cat([c.has_eos for c in chunks]),
        score_std=torch.cat([c.score_std for c in chunks]),
    )


def ppo_update(
    backend: Backend,
    rollout: Rollout,
    advantages: torch.Tensor,
    returns: torch.Tensor,
    config: PPOStageConfig,
    generator: torch.Generator,
    train_policy: bool = True,
    demonstrations: Demonstrations | None = None,
    kl_coef: float = 0.0,
) -> dict[str, float]:
    """``num_ppo_epochs`` passes of ``num_mini_batches`` optimizer steps over this process's episodes.

    ``backend`` (``rlhfkit.backends``) is how gradients are accumulated, synchronised and applied under
    this launch; the losses are ``micro_batch_losses``'s, the same under every launch.
    ``train_policy=False`` (critic warm-up) drops the policy loss: the policy gets zero
    gradients, so AdamW (whose moments are still zero) leaves it unchanged.

    Each micro-batch's loss is weighted (``loss_weight``) so that the accumulated gradient is the
    ``loss_type`` aggregate (dapo: the token mean) over the whole minibatch on all processes,
    whatever the split into micro-batches (docs/pitfalls.md#8). With ``demonstrations`` and
    ``ptx_coef`` > 0 (PPO-ptx), each micro-batch also adds ``ptx_coef`` x the NLL of
    ``per_device_train_batch_size`` random demonstrations, so each optimizer step's gradient gains
    ``ptx_coef`` x the mean NLL over its demonstration batches. Each micro-batch drops the response
    columns that are padding in all its rows (``micro_batch``). The statistics stay on the device
    until one ``.tolist()`` at the end: each a minibatch mean (of tokens; clipfrac and pg_loss as
    the policy loss is averaged), then the mean over minibatches.
    """
    accelerator, module = backend.accelerator, backend.module
    local = rollout.query_ids.shape[0]
    mini = local // config.num_mini_batches
    micro = config.per_device_train_batch_size
    # accelerate divides each backward by the accumulation steps and DDP (or FSDP) averages the
    # gradients over processes: a loss term multiplied by this is the minibatch's sum of its parts
    undo_means = config.gradient_accumulation_steps * accelerator.num_processes
    device = rollout.response_mask.device
    lengths = rollout.response_mask.sum(1).tolist()  # one sync per update: the trimmed widths
    ptx = demonstrations is not None and config.ptx_coef > 0 and train_policy
    ptx_losses: list[torch.Tensor] = []
    per_response = config.importance_sampling_level == "sequence"
    minibatch_stats: list[torch.Tensor] = []  # each minibatch's statistics, in the order of names
    stop_early = False
    for _epoch in range(config.num_ppo_epochs):
        order = torch.randperm(local, generator=generator, device=generator.device)
        for mb_start in range(0, local, mini):
            mb = order[mb_start:mb_start + mini]
            minibatch_tokens = accelerator.reduce(rollout.response_mask[mb.to(device)].sum().float(), reduction="sum")
            sums: dict[str, torch.Tensor] = {}
            for mc_start in range(0, mini, micro):
                idx = mb[mc_start:mc_start + micro]
                batch = micro_batch(rollout, advantages, returns, idx.to(device), max(lengths[i] for i in idx.tolist()))
                m = batch["mask"]
                backend.before_forward()
                ptx_term = 0.0
                if ptx:
                    pick = torch.randint(len(demonstrations.pairs), (micro,), generator=generator).tolist()
                    nll, ptx_term = backend.ptx(lambda policy: demonstrations.nll(policy, pick, device), config.ptx_coef)
                    ptx_losses.append(nll.detach())
                with backend.micro_batch():
                    logits, new_values = module(batch["input_ids"], batch["attention_mask"], m.shape[1])
                    # token losses are masked means over this micro-batch; `share` makes each its part of
                    # the minibatch's loss_type aggregate
                    share = loss_weight(config.loss_type, m.sum(), minibatch_tokens, config.mini_batch_size,
                                        config.response_length) * undo_means
                    losses = micro_batch_losses(logits, new_values, batch, config, share, undo_means,
                                                kl_coef if config.algorithm == "grpo" else 0.0)
                    del logits
                    # the policy's loss and the value model's, apart (under ZeRO each has its own engine)
                    policy_part = (losses.policy if train_policy else 0.0 * losses.policy) + ptx_term
                    if losses.kl is not None:
                        policy_part = policy_part + losses.kl
                    loss = policy_part if losses.value is None else policy_part + losses.value
                    if not torch.isfinite(loss):
                        raise RlhfkitError("PPO loss is not finite (NaN or inf): lower learning_rate or check the reward scale")
                    backend.backward_and_step(policy_part, losses.value)
                with torch.no_grad():  # this micro-batch's part of the minibatch means
                    tokens = m.sum() / minibatch_tokens * accelerator.num_processes
                    responses = torch.tensor(m.shape[0] / config.mini_batch_size * accelerator.num_processes, device=device)
                    policy_mean = responses if per_response else tokens
                    for name, value in losses.stats.items():
                        weight = policy_mean if name in ("clipfrac", "pg_loss") else tokens
                        sums[name] = sums.get(name, torch.zeros((), device=device)) + weight * value
            names = list(sums)  # "approxkl" first: target_kl reads it
            mb_stats = torch.stack([sums[name] for name in names])
            mb_stats = accelerator.reduce(mb_stats, reduction="mean") if accelerator.num_processes > 1 else mb_stats
            minibatch_stats.append(mb_stats)
            if config.target_kl is not None and mb_stats[0].item() > config.target_kl:
                stop_early = True
                break
        if stop_early:
            break
    out = dict(zip(names, torch.stack(minibatch_stats).mean(0).tolist()))
    out["early_stopped"] = float(stop_early)
    if ptx_losses:
        ptx_mean = torch.stack(ptx_losses).mean()
        out["ptx_loss"] = (accelerator.reduce(ptx_mean, reduction="mean") if accelerator.num_processes > 1 else ptx_mean).item()
    return out


@dataclass
class MicroBatchLosses:
    """One micro-batch's losses, each already weighted as its part of the minibatch aggregate."""

    policy: torch.Tensor  # the clipped surrogate
    value: torch.Tensor | None  # vf_coef x clipped value loss; None without a value model (rloo, grpo)
    kl: torch.Tensor | None  # grpo: kl_coef x the k3 KL to the reference, joining the policy's loss; else None
    stats: dict[str, torch.Tensor]  # detached, unweighted: approxkl, clipfrac, pg_loss[, vf_loss, vf_clipfrac][, kl_loss]


def micro_batch_losses(logits: torch.Tensor, new_values: torch.Tensor | None, batch: dict[str, torch.Tensor],
                       config: PPOStageConfig, share: torch.Tensor, undo_means: int, kl_coef: float) -> MicroBatchLosses:
    """The losses of one micro-batch from the policy's logits [b, T, V] and values [b, T] (None without
    a value model), whatever the launch.

    Token level: L_clip = masked mean of max(-A r, -A clip(r, 1-eps, 1+eps)), r = exp(logp - logp_old),
    times ``share``. ``importance_sampling_level: sequence``: one ratio per response
    (``sequence_policy_loss``), the policy loss its mean over the minibatch's responses. With a value
    model, vf_coef x the clipped value loss times ``share``; with grpo and ``kl_coef`` > 0 (the
    controller's beta of this update), kl_coef x the k3 KL to the reference joins the policy's loss.
    """
    m = batch["mask"]
    new_logprobs = logprobs_from_logits(logits, batch["response_ids"], config.temperature)
    if config.importance_sampling_level == "sequence":  # the minibatch's response mean
        seq_losses, clipped = sequence_policy_loss(new_logprobs, batch["logprobs"],
                                                   batch["advantages"][:, 0],  # A_i (token 0 is never masked)
                                                   m, config.cliprange, length_normalise=config.algorithm == "grpo")
        pg_loss, pg_clipfrac = seq_losses.mean(), clipped.mean()
        policy = seq_losses.sum() / config.mini_batch_size * undo_means
    else:
        pg_loss, pg_clipfrac = policy_loss(new_logprobs, batch["logprobs"], batch["advantages"], m, config.cliprange)
        policy = pg_loss * share
    with torch.no_grad():
        stats = {"approxkl": approx_kl(new_logprobs, batch["logprobs"], m), "clipfrac": pg_clipfrac,
                 "pg_loss": pg_loss.detach()}
    value = kl = None
    if new_values is not None:
        vf_loss, vf_clipfrac = value_loss(new_values, batch["values"], batch["returns"], m, config.cliprange_value)
        value = config.vf_coef * vf_loss * share
        stats.update(vf_loss=vf_loss.detach(), vf_clipfrac=vf_clipfrac)
    if kl_coef > 0:
        kl_loss = kl_penalty_loss(new_logprobs, batch["ref_logprobs"], m)
        kl = kl_coef * kl_loss * share
        stats["kl_loss"] = kl_loss.detach()
    return MicroBatchLosses(policy, value, kl, stats)


def micro_batch(rollout: Rollout, advantages: torch.Tensor, returns: torch.Tensor, idx: torch.Tensor,
                width: int) -> dict[str, torch.Tensor]:
    """Rows ``idx`` of the rollout with responses cut to ``width`` columns (the longest response among them).

    The columns cut are padding in every row of the micro-batch: the model is causal, so the
    outputs at the kept positions are unchanged, and the masked losses see the same tokens.
    (Left padding is skipped inside the forwards: ``row_groups`` in rlhfkit.engine.forward.)
    """
    response = {
        "response_ids": rollout.response_ids, "mask": rollout.response_mask, "logprobs": rollout.logprobs,
        "ref_logprobs": rollout.ref_logprobs, "values": rollout.values, "advantages": advantages, "returns": returns,
    }
    batch = {key: value[idx, :width] for key, value in response.items()}
    batch["input_ids"] = torch.cat([rollout.query_ids[idx], batch["response_ids"]], 1)
    batch["attention_mask"] = torch.cat([rollout.query_mask[idx], batch["mask"]], 1)
    return batch


def load_prompts(config: PPOStageConfig, prompts: Any = None) -> list[Any]:
    """Prompts from the argument (list or Dataset), a data-build folder, or a dataset with 'prompt'."""
    if prompts is None:
        if config.data is None:
            raise ConfigError("no prompts: set data (a data-build folder or a dataset folder with a 'prompt' column)")
        path = Path(config.data)
        if not path.exists():
            raise ConfigError(f"data: {path} not found")
        if (path / "sft").is_dir():
            from rlhfkit.data import prompts_from_data_dir

            return prompts_from_data_dir(path, config.prompt_split)
        from datasets import DatasetDict, load_from_disk

        try:
            prompts = load_from_disk(str(path))
        except (FileNotFoundError, ValueError) as e:
            raise ConfigError(f"data: {path} is neither a data-build folder nor a saved dataset ({e})") from None
        if isinstance(prompts, DatasetDict):
            if config.prompt_split not in prompts:
                raise ConfigError(f"data: {path} has no split '{config.prompt_split}' (has {', '.join(prompts)})")
            prompts = prompts[config.prompt_split]
    if hasattr(prompts, "column_names"):
        if "prompt" not in prompts.column_names:
            raise ConfigError(f"prompt dataset has no 'prompt' column (columns: {', '.join(prompts.column_names)})")
        prompts = prompts["prompt"]
    prompts = list(prompts)
    if not prompts:
        raise ConfigError("no prompts found")
    return prompts


def load_demonstrations(config: PPOStageConfig, demonstrations: Any = None) -> list[list[dict]]:
    """PPO-ptx's demonstrations: the argument (conversations or a Dataset with 'messages'), else the data folder's SFT split."""
    if demonstrations is None:
        if config.data is None or not (Path(config.data) / "sft").is_dir():
            raise ConfigError("ptx_coef: set data to a data-build folder (its SFT split holds the demonstrations) "
                              "or pass demonstrations")
        from rlhfkit.data import demonstrations_from_data_dir

        return demonstrations_from_data_dir(config.data, "train")
    if hasattr(demonstrations, "column_names"):
        if "messages" not in demonstrations.column_names:
            raise ConfigError(f"demonstrations have no 'messages' column (columns: {', '.join(demonstrations.column_names)})")
        demonstrations = demonstrations["messages"]
    return [list(m) for m in demonstrations]


def load_scorer(config: PPOStageConfig, tokenizer, reward_model=None, reward_tokenizer=None,
                reward_fn: RewardFn | None = None, value_from_reward: bool = False) -> tuple[EnsembleScorer, str | None]:
    """The reward: ``reward_fn``, an in-memory model, or the folder(s) of ``config.reward_model`` (an ensemble
    standardised by each member's held-out scores). Returns it and member 0's folder (the value model's start)."""
    scorer = EnsembleScorer([Scorer(fn=reward_fn)], [(0.0, 1.0)])
    folders = [config.reward_model] if isinstance(config.reward_model, str) else list(config.reward_model or [])
    reward_path = resolve_model_path(folders[0]) if folders else None  # member 0: the value model's start
    if reward_fn is None:
        if reward_model is not None:  # in memory: one model, its tokenizer the given one (or the policy's)
            loaded, norms = [(reward_model, reward_tokenizer)], [(0.0, 1.0)]
        else:  # folders: each with its own tokenizer (member 0 may take the given one)
            paths = [resolve_model_path(f) for f in folders]
            loaded = [(load_scoring_model(path, "reward_model", config.trust_remote_code),
                       reward_tokenizer if i == 0 and reward_tokenizer is not None
                       else load_tokenizer(path, config.trust_remote_code)) for i, path in enumerate(paths)]
            norms = [held_out_norm(f) for f in folders] if len(folders) > 1 else [(0.0, 1.0)]
        members = []
        for i, (model, member_tokenizer) in enumerate(loaded):
            member_tokenizer = member_tokenizer or tokenizer
            same = shares_tokenizer(member_tokenizer, tokenizer)
            if i == 0 and not same and value_from_reward:
                # the value model reads the policy's token ids: initialised from a reward model with
                # another vocabulary it would embed the wrong tokens (or index past its table)
                raise ConfigError("value_model: 'reward' needs a reward model with the policy's tokenizer; this one has "
                                  "another, so set value_model=policy (or a folder that shares the policy's tokenizer)")
            members.append(Scorer(model=model.eval().requires_grad_(False), tokenizer=member_tokenizer,
                                  same_tokenizer=same))
        scorer = EnsembleScorer(members, norms, config.ensemble_reduction, config.ensemble_std_coef)
    return scorer, reward_path


def load_value_model(config: PPOStageConfig, tokenizer, policy, policy_path: str | None, reward_path: str | None,
                     value_model=None):
    """V(s): given, or initialised from the reward model, the policy, or a folder (``config.value_model``)."""
    from transformers import AutoModelForSequenceClassification

    if value_model is None and config.value_model == "policy" and policy_path is None:
        # an in-memory policy: a value model of the same architecture, its backbone copied, a fresh head
        value_config = copy.deepcopy(policy.config)
        value_config.num_labels = 1
        value_model = AutoModelForSequenceClassification.from_config(value_config)
        value_model.load_state_dict(policy.state_dict(), strict=False)
    if value_model is None:
        value_source = {"reward": reward_path, "policy": policy_path}.get(config.value_model, config.value_model)
        if value_source is None:
            raise ConfigError("value_model: 'reward' needs reward_model; use value_model=policy with reward_fn")
        value_model = load_scoring_model(value_source, "value_model", config.trust_remote_code,
                                         new_head="initialised from the policy" if config.value_model == "policy" else None)
    if value_model.config.pad_token_id is None:
        value_model.config.pad_token_id = tokenizer.pad_token_id
    return value_model


def _scheduler_problems(config: PPOStageConfig) -> list[str]:
    """Build the scheduler once on a dummy optimizer, so a bad name fails before any model loads."""
    from transformers import get_scheduler

    try:
        get_scheduler(config.lr_scheduler_type, torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0),
                      num_warmup_steps=config.warmup_steps, num_training_steps=100)
    except (ValueError, TypeError, KeyError) as e:
        return [f"lr_scheduler_type: cannot build {config.lr_scheduler_type!r} ({str(e).splitlines()[0] if str(e) else type(e).__name__})"]
    return []


def _episode_metrics(rollout: Rollout, kl: torch.Tensor, beta: float, config: PPOStageConfig) -> dict[str, float]:
    """TRL's objective/* keys: per-sequence sums, averaged over episodes (computed on the device, one ``.tolist()``)."""
    mask = rollout.response_mask.float()
    kl_seq = (kl * mask).sum(1)
    non_score = -beta * kl_seq
    means = torch.stack([
        kl_seq.mean(),
        (-rollout.logprobs * mask).sum(1).mean(),
        non_score.mean(),
        (rollout.scores + non_score).mean(),
        rollout.scores.mean(),
        rollout.raw_scores.mean(),
        rollout.has_eos.sum().float(),  # responses that ended (not eos ids: the pad may be eos)
        mask.sum(1).mean(),
    ]).tolist()
    out = dict(zip(("objective/kl", "objective/entropy", "objective/non_score_reward", "objective/rlhf_reward",
                    "objective/scores", "objective/raw_scores"), means))
    out["objective/kl_coef"] = beta
    if isinstance(config.reward_model, list) and len(config.reward_model) > 1:
        out["objective/ensemble_std"] = rollout.score_std.mean().item()
    if config.generations > 1:  # TRL's GRPO/RLOO keys: the spread of scores within each prompt's group;
        # a group whose samples all score the same gives every sample advantage 0 (no learning signal)
        group_std = rollout.scores.reshape(-1, config.generations).std(dim=1)
        out["reward_std"], out["frac_reward_zero_std"] = group_std.mean().item(), (group_std == 0).float().mean().item()
    out["val/num_eos_tokens"], out["val/response_length"] = means[-2:]
    return out


def metrics_row(update: int, rollout_batch_size: int, episode_stats: dict[str, float], train_stats: dict[str, float],
                lr: float, elapsed: float) -> dict[str, Any]:
    """One row of metrics.jsonl under TRL's PPO log keys; a non-finite figure stops the run with one line."""
    episodes = update * rollout_batch_size
    row = {
        "update": update,
        "episode": episodes,
        **episode_stats,
        "policy/approxkl_avg": train_stats["approxkl"],
        "policy/clipfrac_avg": train_stats["clipfrac"],
        "loss/policy_avg": train_stats["pg_loss"],
        **({"loss/value_avg": train_stats["vf_loss"], "val/clipfrac_avg": train_stats["vf_clipfrac"]}
           if "vf_loss" in train_stats else {}),
        **({"loss/kl_avg": train_stats["kl_loss"]} if "kl_loss" in train_stats else {}),
        "policy/early_stopped": train_stats["early_stopped"],
        **({"loss/ptx_avg": train_stats["ptx_loss"]} if "ptx_loss" in train_stats else {}),
        "lr": lr,
        "eps": episodes / elapsed if elapsed > 0 else 0.0,
        "elapsed_s": elapsed,
    }
    for key, value in row.items():
        if isinstance(value, float) and not math.isfinite(value):
            raise RlhfkitError(f"update {update}: {key} is {value}; stopping (lower learning_rate or check rewards)")
    return row


def save_final_policy(policy: torch.nn.Module, tokenizer, folder: Path, merge_lora: bool,
                      state_dict: dict[str, torch.Tensor] | None = None) -> None:
    """The final policy as an ordinary safetensors folder (a LoRA adapter merged into a copy), atomically.

    ``state_dict``: the full weights of a sharded policy (``sharding.full_state``); with LoRA they
    go into an unsharded copy built on the meta device (no second set of weights), merged by PEFT."""
    if merge_lora and state_dict is not None:
        final, state_dict = unsharded_peft_copy(policy, state_dict).merge_and_unload(), None
    else:
        final = copy.deepcopy(policy).merge_and_unload() if merge_lora else policy
    with atomic_dir(folder) as tmp:
        final.save_pretrained(tmp, safe_serialization=True, state_dict=state_dict)
        tokenizer.save_pretrained(tmp)


def unsharded_peft_copy(policy: torch.nn.Module, state_dict: dict[str, torch.Tensor]) -> torch.nn.Module:
    """A PEFT model of ``policy``'s architecture and adapter holding ``state_dict`` (all names, as
    ``full_state(policy, all_names=True)`` gives them): built on the meta device, then the tensors
    assigned, so it costs no memory beyond ``state_dict`` itself."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        base = AutoModelForCausalLM.from_config(policy.get_base_model().config)
    copied = get_peft_model(base, copy.deepcopy(policy.peft_config["default"]))
    copied.load_state_dict(state_dict, assign=True)
    return copied


def make_accelerator(config: PPOStageConfig, out: Path):
    """accelerate's Accelerator for this run, refused when the launcher disagrees with the batch arithmetic."""
    from accelerate import Accelerator

    key = "ACCELERATE_GRADIENT_ACCUMULATION_STEPS"
    launcher_value = os.environ.get(key)
    if zero_stage() is not None and launcher_value == "1":
        # a DeepSpeed launch exports its config file's gradient_accumulation_steps (1 in the shipped
        # files): the RL stage's engines take the batch arithmetic's instead (any other value is refused below)
        os.environ.pop(key)
    try:
        accelerator = Accelerator(
            gradient_accumulation_steps=config.gradient_accumulation_steps,
            log_with=None if config.report_to == ["none"] else config.report_to,
            project_dir=str(out),
        )
    finally:
        if launcher_value is not None:
            os.environ[key] = launcher_value
    if (accelerator.num_processes, accelerator.gradient_accumulation_steps) != (config.num_processes,
                                                                             config.gradient_accumulation_steps):
        # `accelerate launch --gradient_accumulation_steps N` overrides the accumulation through the
        # environment (the loss weights in ppo_update and the optimizer-step cadence would disagree);
        # WORLD_SIZE without a working process group (e.g. `--multi_gpu` on a CPU-only machine without
        # ACCELERATE_USE_CPU) gives N independent single-process runs writing the same output_dir
        raise ConfigError(
            f"the launcher gives {accelerator.num_processes} process(es) and gradient accumulation "
            f"{accelerator.gradient_accumulation_steps}, but the batch arithmetic (WORLD_SIZE={config.num_processes}) "
            f"expects {config.num_processes} and {config.gradient_accumulation_steps}; do not set gradient "
            "accumulation in the launcher, and on CPU launch with ACCELERATE_USE_CPU=true"
        )
    return accelerator


def resume(config: PPOStageConfig, out: Path, accelerator, backend: Backend, kl_ctl, generators) -> tuple[int, float]:
    """Load the newest verified checkpoint, if any (the main process picks it, all load it): (first update, elapsed s)."""
    start_update, elapsed_before = 0, 0.0
    main = accelerator.is_main_process
    state = ckpt.latest_verified(out / "checkpoints", log=lambda line: print(line, flush=True)) if main else None
    if accelerator.num_processes > 1:  # every process resumes from the checkpoint the main one verified
        from accelerate.utils import broadcast_object_list

        state = broadcast_object_list([state])[0]
    if state is not None:
        ckpt.check_config(state, config)
        ckpt.check_processes(state, accelerator.num_processes)
        try:
            start_update, elapsed_before = ckpt.load(state, accelerator.unwrap_model(backend.module), backend, kl_ctl,
                                                     generators, accelerator.process_index)
        except Exception as e:  # noqa: BLE001 - safetensors/torch errors of a damaged file without recorded digests
            raise RlhfkitError(f"checkpoint {state} cannot be loaded ({first_line(e)}); move it out of "
                               f"{state.parent} to resume from an older one or start over") from None
        if main:
            print(f"resuming from {state} (update {start_update} of {config.updates})", flush=True)
    return start_update, elapsed_before


def _finished_run(out: Path, config: PPOStageConfig) -> StageResult | None:
    """A finished run of this config is not redone: ``metrics.json`` (written last) says all
    updates are done and the checkpoints were made by the same config (else ConfigError,
    as for a resume). Without checkpoints the config cannot be checked, so the run is redone."""
    state = ckpt.latest(out / "checkpoints")
    if state is None or not (out / "metrics.json").is_file() or not (out / "model").is_dir():
        return None
    metrics = read_json(out / "metrics.json")
    if metrics.get("updates") != config.updates:
        return None
    ckpt.check_config(state, config)
    print(f"{out}: finished earlier ({config.updates} updates); nothing to do", flush=True)
    return StageResult(out, metrics)


def _config_problems(config: PPOStageConfig, policy, reward_model, reward_fn, value_model) -> list[str]:
    """Every problem of the config and the in-memory objects given, found before anything loads."""
    problems = config.validate()
    if policy is None and not config.model:
        problems.append("model: set the policy to align (the SFT stage's folder)")
    if reward_fn is None and reward_model is None and config.reward_model is None:
        problems.append("reward_model: set it (the reward stage's folder) or pass reward_fn")
    elif (config.uses_value_model and value_model is None and config.value_model == "reward" and reward_model is None
          and config.reward_model is None):
        problems.append("value_model: 'reward' needs reward_model; use value_model=policy with reward_fn")
    # a folder that would load with a newly initialised head: named now, before the output folder is touched
    folders = [("model", config.model)] if policy is None and config.model else []
    if reward_fn is None and reward_model is None:
        members = [config.reward_model] if isinstance(config.reward_model, str) else config.reward_model or []
        folders += [("reward_model", m) for m in members]
    if config.uses_value_model and value_model is None and config.value_model not in ("reward", "policy"):
        folders.append(("value_model", config.value_model))
    problems += [p for role, path in folders if (p := head_problem(path, role))]
    positions = positions_of(policy.config) if policy is not None else model_positions(config.model or "")
    problem = length_problem("response_length", config.max_prompt_length + config.response_length, positions,
                             f"max_prompt_length {config.max_prompt_length} + response_length {config.response_length}")
    return problems + ([problem] if problem else []) + _scheduler_problems(config) + launch_problems()


@dataclass
class RunState:
    """What the update loop works with, built once by ``set_up``."""

    tokenizer: Any
    prompt_list: list[Any]
    prompt_ids: list[list[int]]
    ptx_data: Demonstrations | None
    module: torch.nn.Module  # PolicyAndValue, as accelerate prepared it (DDP) or sharded in place (FSDP)
    unwrapped: PolicyAndValue
    ref_policy: torch.nn.Module | None  # None with LoRA: the reference is the adapter-disabled policy
    scorer: Scorer
    backend: Backend  # how the update steps under this launch: the optimizer(s) and schedule are its
    kl_ctl: AdaptiveKLController | FixedKLController
    sample_gen: torch.Generator
    shuffle_gen: torch.Generator
    params_held: int  # parameters held in memory (rloo and grpo save the value model's)
    accelerator: Any
    start_update: int = 0  # set by the resume (the first update this process runs)
    elapsed_before: float = 0.0  # training seconds of the run before it was resumed

    @property
    def generators(self) -> tuple[torch.Generator, torch.Generator]:
        """What a checkpoint saves of the randomness: sampling, minibatch order."""
        return self.sample_gen, self.shuffle_gen


def set_up(config: PPOStageConfig, accelerator, sharded: bool, zero: bool = False, *, policy=None, tokenizer=None, reward_model=None,
           reward_tokenizer=None, reward_fn=None, value_model=None, prompts=None, demonstrations=None) -> RunState:
    """Prompts, demonstrations, models (every process loads full weights), optimizer, scheduler, KL controller
    and generators; under FSDP the models are sharded before the optimizer is built."""
    from transformers import AutoModelForCausalLM, get_scheduler

    prompt_list = load_prompts(config, prompts)
    conversations = load_demonstrations(config, demonstrations) if config.ptx_coef > 0 else None
    policy_path = resolve_model_path(config.model) if config.model else None
    with every_process_loads():  # under FSDP too: each process reads the full weights, then keeps its shards
        if tokenizer is None:
            tokenizer = load_tokenizer(policy_path, config.trust_remote_code)
        if policy is None:
            policy = load_pretrained(AutoModelForCausalLM, policy_path, config.trust_remote_code)
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token  # padding is masked everywhere; only EOS stops
        prompt_ids = encode_prompts(tokenizer, prompt_list, config.max_prompt_length)
        ptx_data = None if conversations is None else Demonstrations.encode(
            tokenizer, conversations, config.max_prompt_length, config.response_length)
        scorer, reward_path = load_scorer(config, tokenizer, reward_model, reward_tokenizer, reward_fn,
                                          value_from_reward=config.uses_value_model and value_model is None
                                          and config.value_model == "reward")
        value_model = (load_value_model(config, tokenizer, policy, policy_path, reward_path, value_model)
                       if config.uses_value_model else None)
    ref_policy = None
    if config.lora:
        from peft import LoraConfig, get_peft_model

        policy = get_peft_model(policy, LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha,
                                                   lora_dropout=config.lora_dropout,
                                                   target_modules=config.lora_target_modules, task_type="CAUSAL_LM"))
    else:
        ref_policy = copy.deepcopy(policy).eval().requires_grad_(False)
    for model in (policy, value_model, ref_policy, *scorer.models):
        if model is not None:
            disable_dropout(model)
    module = PolicyAndValue(policy, value_model)
    module.train()
    params_held = sum(p.numel() for m in (module, ref_policy, *scorer.models) if m is not None for p in m.parameters())
    frozen = [m for m in (ref_policy, *scorer.models) if m is not None]  # forwards only
    if sharded:  # parameters become DTensors (each process holds 1/N): before the optimizer is built
        for model in (policy, value_model, *frozen):
            if model is not None:
                shard(model.to(accelerator.device))
        if accelerator.is_main_process:
            print(f"FSDP: the policy{' and value model' if value_model is not None else ''} sharded over "
                  f"{accelerator.num_processes} processes (one unit per decoder layer), "
                  f"{'the reference and ' if ref_policy is not None else ''}{len(scorer.models)} reward model(s) too",
                  flush=True)

    def make_optimizer(params):  # fused: one kernel over all parameters (on CPU 4-5x faster than the per-tensor loop)
        return torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay, fused=True)

    def make_scheduler(optimizer):
        return get_scheduler(config.lr_scheduler_type, optimizer, num_warmup_steps=config.warmup_steps,
                             num_training_steps=config.updates * config.optimizer_steps_per_update)

    if zero:  # DeepSpeed ZeRO: an engine (its own AdamW and schedule) per trained model
        module.to(accelerator.device)
        backend = Zero(accelerator, module, ZeroModels(
            [m for m in (module.policy, module.value) if m is not None], make_optimizer, make_scheduler,
            stage=zero_stage(), micro_batch=config.per_device_train_batch_size,
            accumulation=config.gradient_accumulation_steps, max_grad_norm=config.max_grad_norm))
        if accelerator.is_main_process:
            held = "the optimizer state and gradients" + (", and the weights," if zero_stage() == 3 else "")
            print(f"DeepSpeed ZeRO-{zero_stage()}: {held} of the policy"
                  f"{' and value model' if value_model is not None else ''} partitioned over "
                  f"{accelerator.num_processes} processes", flush=True)
    else:
        optimizer = make_optimizer([p for p in module.parameters() if p.requires_grad])
        scheduler = make_scheduler(optimizer)
        if not sharded:  # data parallel (DDP) or one process; sharded modules are not wrapped again
            module, optimizer = accelerator.prepare(module, optimizer)
        backend = (Sharded if sharded else DataParallel)(accelerator, module, optimizer, scheduler, config.max_grad_norm)
    for model in frozen:
        model.to(accelerator.device)
    kl_ctl = (AdaptiveKLController(config.kl_coef, config.kl_target, config.kl_horizon)
              if config.kl_target is not None else FixedKLController(config.kl_coef))
    rank_seed = config.seed * 1000 + accelerator.process_index
    sample_gen = torch.Generator(device=accelerator.device).manual_seed(rank_seed)  # sampling runs there
    shuffle_gen = torch.Generator().manual_seed(rank_seed + 1)  # CPU: the minibatch order is bookkeeping
    return RunState(tokenizer, prompt_list, prompt_ids, ptx_data, module, accelerator.unwrap_model(module), ref_policy,
                    scorer, backend, kl_ctl, sample_gen, shuffle_gen, params_held, accelerator)


def advantages_of(rollout: Rollout, beta: float, config: PPOStageConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(per-token KL to the reference, advantages, returns), each [B, T] and zero past the response.

    ppo: per-token rewards = score at the last token - beta * KL, GAE with the value model, whitened
    advantages.  rloo / grpo: one advantage per episode from the other samples of its prompt (returns
    unused: zeros)."""
    kl = kl_per_token(rollout.logprobs, rollout.ref_logprobs, config.kl_estimator) * rollout.response_mask
    if config.algorithm == "ppo":
        rewards, _ = rewards_with_kl(rollout.scores, rollout.logprobs, rollout.ref_logprobs,
                                     rollout.response_mask, beta, config.kl_estimator)
        if config.whiten_rewards:
            rewards = whiten(rewards, rollout.response_mask, shift_mean=False)
        advantages, returns = compute_gae(rewards, rollout.values, rollout.response_mask, config.gamma, config.lam)
        return kl, whiten(advantages, rollout.response_mask), returns
    episode = critic_free_advantages(config.algorithm, rollout.scores, kl.sum(1), config.generations, beta,
                                     config.scale_rewards)
    return kl, episode.unsqueeze(1) * rollout.response_mask, torch.zeros_like(rollout.values)


def episode_stats_of(accelerator, rollout: Rollout, kl: torch.Tensor, beta: float, config: PPOStageConfig,
                     gold: torch.Tensor | None) -> dict[str, float]:
    """This update's episode metrics (TRL's objective/* keys, ``objective/gold`` when measured), averaged over processes."""
    stats = _episode_metrics(rollout, kl, beta, config)
    if gold is not None:
        stats["objective/gold"] = gold.mean().item()
    if accelerator.num_processes > 1:
        keys = sorted(stats)
        reduced = accelerator.reduce(torch.tensor([stats[k] for k in keys], device=accelerator.device),
                                     reduction="mean")
        stats = dict(zip(keys, reduced.tolist()))
    return stats


def write_samples(path: Path, update: int, tokenizer, rollout: Rollout, responses: list[str], n: int,
                  gold: torch.Tensor | None) -> None:
    """The first ``n`` (prompt, response, score[, gold]) of this update, appended to samples.jsonl."""
    queries = tokenizer.batch_decode(rollout.query_ids[:n], skip_special_tokens=True)
    for j, (q, r) in enumerate(zip(queries, responses[:n])):
        ckpt.append_jsonl(path, {"update": update, "prompt": q, "response": r, "score": rollout.scores[j].item(),
                                 **({"gold": gold[j].item()} if gold is not None else {})})


@dataclass
class LoopEnd:
    """What the update loop leaves for the save step."""

    run: RunState
    last_row: dict[str, float]  # the metrics row of the last update done
    stopped_at: int | None  # the update at which the KL budget stopped the run, else None


def load_run(config: PPOStageConfig, out: Path, given: dict[str, Any]) -> RunState:
    """Step 4 of the stage skeleton: the launch's processes, the folder claimed, ``set_up`` (models,
    optimizer, generators; ``given`` = the in-memory objects of ``train_ppo``), the newest checkpoint
    resumed and the logs cut back to it."""
    from transformers.utils import logging as hf_logging

    if config.torch_threads:
        torch.set_num_threads(config.torch_threads)
    hf_logging.disable_progress_bar()
    torch.manual_seed(config.seed)
    accelerator = make_accelerator(config, out)
    # FSDP when the launcher asks for it (--use_fsdp): our own fully_shard, on CPU and GPU alike
    sharded = fsdp_requested(accelerator.distributed_type) and accelerator.num_processes > 1
    # DeepSpeed ZeRO when the launcher asks for it: our own deepspeed.initialize, on CPU and GPU alike
    zero = zero_stage() is not None and accelerator.num_processes > 1
    if accelerator.is_main_process:
        claim_dir(out, "ppo")
        print(config.batch_arithmetic(), flush=True)
    r = set_up(config, accelerator, sharded, zero, **given)
    r.start_update, r.elapsed_before = resume(config, out, accelerator, r.backend, r.kl_ctl,
                                              r.generators)
    if accelerator.is_main_process:
        ckpt.truncate_log(out / "metrics.jsonl", r.start_update)
        ckpt.truncate_log(out / "samples.jsonl", r.start_update)
    if config.report_to != ["none"]:
        accelerator.init_trackers("rlhfkit-ppo", config={k: v for k, v in vars(config).items() if isinstance(v, (int, float, str, bool))})
    return r


def update_loop(config: PPOStageConfig, out: Path, r: RunState, gold_fn: MetricFn | None) -> LoopEnd:
    """Step 5 of the stage skeleton: the updates of the module docstring, from the one resumed at."""
    from tqdm.auto import tqdm

    accelerator = r.accelerator
    main = accelerator.is_main_process
    k = config.generations
    local_prompts = config.local_rollout_batch_size // k
    started = time.perf_counter()
    bar = tqdm(total=config.updates, initial=r.start_update, desc=config.algorithm, unit="update", disable=not main, dynamic_ncols=True)
    last_row: dict[str, float] = {}
    # the KL of the last kl_budget_window updates (after a resume, from the log the run kept)
    recent_kl = [row["objective/kl"] for row in ckpt.read_jsonl(out / "metrics.jsonl")][-config.kl_budget_window:]
    stopped_at = None
    for update in range(r.start_update, config.updates):
        # 1. prompts of this update, this process's slice, each k times in a row (a group)
        indices = batch_indices(update, config.prompts_per_update, len(r.prompt_list), config.seed)
        indices = indices[accelerator.process_index * local_prompts:(accelerator.process_index + 1) * local_prompts]
        indices = [i for i in indices for _ in range(k)]
        batch_prompts = [r.prompt_list[i] for i in indices]
        # 2. rollout
        r.unwrapped.eval()
        rollout, responses = make_rollout(r.unwrapped, r.ref_policy, r.scorer, r.tokenizer, batch_prompts,
                                          [r.prompt_ids[i] for i in indices], config, r.sample_gen)
        r.unwrapped.train()
        # 3. rewards, advantages
        beta = r.kl_ctl.value
        kl, advantages, returns = advantages_of(rollout, beta, config)
        # 4. optimise
        train_stats = ppo_update(r.backend, rollout, advantages, returns, config, r.shuffle_gen, train_policy=update >= config.value_warmup_updates,
                                 demonstrations=r.ptx_data, kl_coef=beta)
        # 5. bookkeeping: adapt beta, one metrics row, samples
        gold = (None if gold_fn is None else  # host data
                torch.tensor([float(g) for g in gold_fn(batch_prompts, responses)], device="cpu"))
        episode_stats = episode_stats_of(accelerator, rollout, kl, beta, config, gold)
        mean_kl = episode_stats["objective/kl"]
        r.kl_ctl.update(mean_kl, config.rollout_batch_size)
        elapsed = r.elapsed_before + time.perf_counter() - started
        last_row = metrics_row(update + 1, config.rollout_batch_size, episode_stats, train_stats,
                               r.backend.scheduler.get_last_lr()[0], elapsed)
        if main and ((update + 1) % config.logging_steps == 0 or update + 1 == config.updates):
            ckpt.append_jsonl(out / "metrics.jsonl", last_row)
        if config.report_to != ["none"]:
            accelerator.log(last_row, step=update + 1)
        if main and config.sample_every and ((update + 1) % config.sample_every == 0 or update == 0):
            write_samples(out / "samples.jsonl", update + 1, r.tokenizer, rollout, responses, config.num_samples, gold)
        bar.set_postfix(score=f"{last_row['objective/scores']:.3f}", kl=f"{mean_kl:.2f}")
        bar.update(1)
        # 6. stop at the KL budget (the mean KL of the last kl_budget_window updates), or checkpoint
        recent_kl = (recent_kl + [mean_kl])[-config.kl_budget_window:]
        window_kl = sum(recent_kl) / len(recent_kl)
        if (config.kl_budget is not None and len(recent_kl) == config.kl_budget_window
                and window_kl >= config.kl_budget):
            stopped_at = update + 1
            if main:
                print(f"\nKL budget reached at update {stopped_at}: mean KL of the last {len(recent_kl)} updates "
                      f"{window_kl:.2f} >= kl_budget {config.kl_budget}; this policy is final", flush=True)
            break
        if config.save_steps and (update + 1) % config.save_steps == 0 and update + 1 < config.updates:
            ckpt.save(accelerator, out / "checkpoints", update + 1, elapsed, r.unwrapped, r.backend, r.kl_ctl,
                      r.generators, config)
    bar.close()
    accelerator.wait_for_everyone()
    if config.report_to != ["none"]:
        accelerator.end_training()
    return LoopEnd(r, last_row, stopped_at)


def save_policy(config: PPOStageConfig, out: Path, end: LoopEnd) -> dict[str, Any]:
    """Step 6 of the stage skeleton: the final policy (adapter merged; gathered from the shards under
    FSDP) as an ordinary folder in ``out/model``, and the stage's metrics."""
    r, last_row = end.run, end.last_row
    metrics = {"stage": "ppo", "algorithm": config.algorithm, "params_held": r.params_held, **last_row,
               "updates": config.updates, "updates_done": end.stopped_at or config.updates,
               "stopped_at_kl_budget": end.stopped_at is not None,
               "wall_time_s": last_row.get("elapsed_s", r.elapsed_before)}
    # FSDP or ZeRO-3: all processes, the shards all-gathered
    weights = full_state(r.unwrapped.policy, all_names=True) if is_partitioned(r.unwrapped.policy) else None
    if r.accelerator.is_main_process:
        save_final_policy(r.unwrapped.policy, r.tokenizer, out / "model", merge_lora=config.lora, state_dict=weights)
    return metrics


@locks_output("output_dir")
def train_ppo(
    config: PPOStageConfig,
    *,
    policy: torch.nn.Module | None = None,
    tokenizer: Any = None,
    reward_model: torch.nn.Module | None = None,
    reward_tokenizer: Any = None,
    reward_fn: RewardFn | None = None,
    value_model: torch.nn.Module | None = None,
    prompts: Any = None,
    demonstrations: Any = None,
    gold_fn: MetricFn | None = None,
) -> StageResult:
    """Align ``config.model`` against the reward model (or ``reward_fn``) with PPO.

    In-memory objects replace the paths in ``config``: ``policy`` + ``tokenizer``,
    ``reward_model`` (+ ``reward_tokenizer`` when it differs), ``reward_fn(prompts,
    responses) -> scores`` instead of a model, ``prompts`` (a list or a Dataset with a
    'prompt' column), ``demonstrations`` for ``ptx_coef`` (conversations ending in
    the assistant reply, or a Dataset with a 'messages' column). ``gold_fn`` is only measured and logged (``objective/gold``), never
    optimised. Writes ``output_dir/model`` (the final policy), ``metrics.jsonl`` (a row per
    update), ``samples.jsonl`` and ``metrics.json``; re-running resumes from the last checkpoint,
    and does nothing once the run has finished.
    """
    out = Path(config.output_dir)
    given = dict(policy=policy, tokenizer=tokenizer, reward_model=reward_model, reward_tokenizer=reward_tokenizer,
                 reward_fn=reward_fn, value_model=value_model, prompts=prompts, demonstrations=demonstrations)

    def validate() -> None:
        problems = _config_problems(config, policy, reward_model, reward_fn, value_model)
        if problems:
            raise ConfigError("; ".join(problems))

    return run_stage(Stage("ppo", out, validate=validate, finished=lambda: _finished_run(out, config),
                           load=lambda: load_run(config, out, given),
                           train=lambda run: update_loop(config, out, run, gold_fn),
                           save=lambda end: save_policy(config, out, end)))
