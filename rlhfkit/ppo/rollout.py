"""PPO's episodes: one typed container, filled by ``trainer.make_rollout`` from the rollout engine.

Sequences are ``[query | response]``: queries left-padded to a common length P, responses
right-padded after their EOS to R tokens (``rlhfkit.engine.sampling``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rlhfkit.engine.sampling import Sequences


@dataclass
class Rollout(Sequences):
    """One batch of episodes: the sampled ``Sequences`` (``logprobs`` = log pi_old) and what PPO adds.

    B = episodes, R = response length.
    """

    ref_logprobs: torch.Tensor  # [B, R] log pi_ref(a_t | s_t), same temperature, 0 on padding
    values: torch.Tensor  # [B, R] V(s_t) of the state before each response token, 0 on padding
    scores: torch.Tensor  # [B] reward for the whole response (EOS penalty and clipping applied)
    raw_scores: torch.Tensor  # [B] reward before penalty and clipping
    has_eos: torch.Tensor  # [B] bool: the response ended with EOS within R tokens
    score_std: torch.Tensor  # [B] disagreement of a reward-model ensemble (std of standardised scores; 0 for one)
