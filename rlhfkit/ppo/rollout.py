"""Rollouts: sample responses, then score them with the reference, value and reward models.

Sequences are ``[query | response]``: queries left-padded to a common length P, responses
right-padded after their EOS to R tokens. Position ids come from the attention mask in
sampling and in every scoring forward, so left padding cannot shift them (the log-probs
used for training then match the sampled ones).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from transformers import DynamicCache

from rlhfkit.ppo.core import logprobs_from_logits, mask_after_eos

RewardFn = Callable[[list[Any], list[str]], Sequence[float]]


@dataclass
class Rollout:
    """One batch of episodes. B = episodes, P = query length, R = response length."""

    query_ids: torch.Tensor  # [B, P] left-padded prompt tokens
    query_mask: torch.Tensor  # [B, P] 1 on prompt tokens
    response_ids: torch.Tensor  # [B, R] sampled tokens, pad after EOS
    response_mask: torch.Tensor  # [B, R] 1 up to and including EOS (a prefix)
    logprobs: torch.Tensor  # [B, R] log pi_old(a_t | s_t) at the sampling temperature, 0 on padding
    ref_logprobs: torch.Tensor  # [B, R] log pi_ref(a_t | s_t), same temperature, 0 on padding
    values: torch.Tensor  # [B, R] V(s_t) of the state before each response token, 0 on padding
    scores: torch.Tensor  # [B] reward for the whole response (EOS penalty and clipping applied)
    raw_scores: torch.Tensor  # [B] reward before penalty and clipping
    has_eos: torch.Tensor  # [B] bool: the response ended with EOS within R tokens

    @property
    def input_ids(self) -> torch.Tensor:
        return torch.cat([self.query_ids, self.response_ids], dim=1)

    @property
    def attention_mask(self) -> torch.Tensor:
        return torch.cat([self.query_mask, self.response_mask], dim=1)


def left_pad(sequences: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists -> (ids [B, P], mask [B, P]) padded on the left."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, seq in enumerate(sequences):
        if seq:
            ids[i, width - len(seq):] = torch.tensor(seq, dtype=torch.long)
            mask[i, width - len(seq):] = 1
    return ids, mask


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """0, 1, 2, ... over the real tokens of each row; padding gets 0."""
    return (attention_mask.cumsum(-1) - 1).clamp(min=0)


@torch.no_grad()
def sample(
    model: torch.nn.Module,
    query_ids: torch.Tensor,
    query_mask: torch.Tensor,
    max_new_tokens: int,
    temperature: float,
    eos_id: int,
    pad_id: int,
    generator: torch.Generator | None = None,
    greedy: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample up to ``max_new_tokens`` with a KV cache; stop rows at EOS and pad after it.

    Returns (response_ids [B, R], logprobs [B, R]) where logprobs are log-softmax(logits / T)
    of the sampled tokens, 0 after EOS. R <= max_new_tokens: the loop ends when every row
    has emitted EOS.
    """
    batch = query_ids.shape[0]
    cache = DynamicCache()
    attention = query_mask
    positions = position_ids(query_mask)
    out = model(input_ids=query_ids, attention_mask=attention, position_ids=positions,
                past_key_values=cache, use_cache=True, logits_to_keep=1)
    next_position = positions[:, -1:] + 1
    finished = torch.zeros(batch, dtype=torch.bool)
    tokens, logprobs = [], []
    for _ in range(max_new_tokens):
        logits = out.logits[:, -1, :].float()
        if greedy:
            token = logits.argmax(-1)
            logp = torch.log_softmax(logits / temperature, -1).gather(-1, token[:, None])[:, 0]
        else:
            log_probs = torch.log_softmax(logits / temperature, -1)
            token = torch.multinomial(log_probs.exp(), 1, generator=generator)[:, 0]
            logp = log_probs.gather(-1, token[:, None])[:, 0]
        token = torch.where(finished, torch.full_like(token, pad_id), token)
        tokens.append(token)
        logprobs.append(torch.where(finished, torch.zeros_like(logp), logp))
        finished |= token == eos_id
        if bool(finished.all()):
            break
        attention = torch.cat([attention, torch.ones((batch, 1), dtype=attention.dtype)], dim=1)
        out = model(input_ids=token[:, None], attention_mask=attention, position_ids=next_position,
                    past_key_values=cache, use_cache=True)
        next_position = next_position + 1
    return torch.stack(tokens, 1), torch.stack(logprobs, 1)


def response_logits(model: torch.nn.Module, input_ids, attention_mask, response_length: int) -> torch.Tensor:
    """Logits that predict each response token: positions P-1 .. P+R-2 -> [B, R, V].

    ``logits_to_keep`` skips the LM head on prompt positions.
    """
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids(attention_mask),
                logits_to_keep=response_length + 1, use_cache=False)
    return out.logits[:, :-1, :]


def token_values(value_model: torch.nn.Module, input_ids, attention_mask, response_length: int) -> torch.Tensor:
    """Per-token values V(s_t) from a sequence-classification model's backbone and head -> [B, R]."""
    backbone = getattr(value_model, value_model.base_model_prefix)
    hidden = backbone(input_ids=input_ids, attention_mask=attention_mask,
                      position_ids=position_ids(attention_mask), use_cache=False).last_hidden_state
    hidden = hidden[:, -response_length - 1:-1, :]
    return value_model.score(hidden).squeeze(-1).float()


def sequence_scores(reward_model: torch.nn.Module, input_ids, attention_mask) -> torch.Tensor:
    """The reward model's score read at each row's last real token -> [B] (pitfall 3).

    The index comes from the attention mask, so it is right for left and right padding
    alike and never confuses a pad with an EOS.
    """
    backbone = getattr(reward_model, reward_model.base_model_prefix)
    hidden = backbone(input_ids=input_ids, attention_mask=attention_mask,
                      position_ids=position_ids(attention_mask), use_cache=False).last_hidden_state
    width = attention_mask.shape[1]
    last = width - 1 - attention_mask.flip(-1).long().argmax(-1)
    picked = hidden[torch.arange(hidden.shape[0]), last]
    return reward_model.score(picked).squeeze(-1).float()


def truncate_at_eos(response_ids: torch.Tensor, eos_id: int, pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mask everything after the first EOS: (ids with pad after EOS, mask [B, R], has_eos [B])."""
    mask = mask_after_eos(response_ids, eos_id)
    ids = torch.where(mask.bool(), response_ids, torch.full_like(response_ids, pad_id))
    has_eos = (ids == eos_id).any(-1)
    return ids, mask.long(), has_eos
