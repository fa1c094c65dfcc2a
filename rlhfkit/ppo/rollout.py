"""PPO's episodes: one typed container, filled by ``trainer.make_rollout`` from the rollout engine.

Sequences are ``[query | response]``: queries left-padded to a common length P, responses
right-padded after their EOS to R tokens (``rlhfkit.engine.sampling``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


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
    score_std: torch.Tensor  # [B] disagreement of a reward-model ensemble (std of standardised scores; 0 for one)

    @property
    def input_ids(self) -> torch.Tensor:
        return torch.cat([self.query_ids, self.response_ids], dim=1)

    @property
    def attention_mask(self) -> torch.Tensor:
        return torch.cat([self.query_mask, self.response_mask], dim=1)
