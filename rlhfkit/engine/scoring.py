"""Scoring: how a sampled response gets its reward, for PPO, evaluation and best-of-n alike.

A ``Scorer`` is a reward model that reads the policy's token ids as they are, a reward
model with its own tokenizer (the text is decoded and re-encoded with its chat template),
or a Python function of (prompts, responses). An ``EnsembleScorer`` combines several into
one conservative reward (``core.ensemble_reward``).
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from rlhfkit.core import ensemble_reward
from rlhfkit.engine.forward import model_device, reward_scores, sequence_scores
from rlhfkit.engine.sampling import as_messages, conversation_ids
from rlhfkit.artifacts import read_json
from rlhfkit.errors import ConfigError, RlhfkitError

RewardFn = Callable[[list[Any], list[str]], Sequence[float]]


@contextmanager
def _no_length_warning():
    """Silence the tokenizer's "sequence length is longer than the specified maximum" while ``Scorer``
    encodes: it cuts over-long conversations itself, right after encoding them."""
    log = logging.getLogger("transformers.tokenization_utils_base")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def shares_tokenizer(reward_tokenizer, policy_tokenizer) -> bool:
    """Whether a reward model can score the policy's token ids as they are (else: decode and re-encode)."""
    return (reward_tokenizer.get_vocab() == policy_tokenizer.get_vocab()
            and reward_tokenizer.chat_template == policy_tokenizer.chat_template)


@dataclass
class Scorer:
    """How a response gets its score: a reward model (maybe with its own tokenizer) or a function."""

    model: torch.nn.Module | None = None
    tokenizer: Any = None
    same_tokenizer: bool = True
    fn: RewardFn | None = None

    @torch.no_grad()
    def __call__(self, rollout_ids, rollout_mask, prompts: list[Any], responses: list[str]) -> torch.Tensor:
        """Scores [B] on ``rollout_ids``' device for [query | response] rows and their texts."""
        if self.fn is not None:
            scores = [float(s) for s in self.fn(prompts, responses)]
            if len(scores) != len(responses):
                raise RlhfkitError(f"reward_fn returned {len(scores)} scores for {len(responses)} responses")
            return torch.tensor(scores, dtype=torch.float32, device=rollout_ids.device)
        if self.same_tokenizer:
            device = model_device(self.model)  # it may live elsewhere than the policy
            return sequence_scores(self.model, rollout_ids.to(device), rollout_mask.to(device)).to(rollout_ids.device)
        # Different tokenizer: decode, re-encode as the reward model was trained (its own chat template).
        # A conversation longer than the reward model's positions (BERT: 512) keeps its first token
        # (BOS / [CLS], where an encoder's head reads) and its end, as the policy keeps its prompt's end.
        limit = getattr(self.model.config, "max_position_embeddings", None) or 10**9
        with _no_length_warning():
            encoded = [conversation_ids(self.tokenizer, as_messages(p) + [{"role": "assistant", "content": r}])
                       for p, r in zip(prompts, responses)]
        encoded = [ids if len(ids) <= limit else ids[:1] + ids[len(ids) - limit + 1:] for ids in encoded]
        # scored as the reward stage scores its held-out pairs
        return reward_scores(self.model, encoded, self.tokenizer.pad_token_id or 0).to(rollout_ids.device)


def held_out_norm(folder: str | Path) -> tuple[float, float]:
    """``(mean, std)`` of a reward stage's held-out scores, the scale its member is standardised by."""
    path = Path(folder) / "metrics.json"
    metrics = read_json(path) if path.is_file() else {}
    mean, std = metrics.get("eval_reward_mean"), metrics.get("eval_reward_std")
    if not isinstance(mean, (int, float)) or not isinstance(std, (int, float)) or not std > 0:
        raise ConfigError(f"reward_model: ensemble member {folder} has no metrics.json with eval_reward_mean and a "
                          "positive eval_reward_std (the reward stage writes them); an ensemble needs each member's "
                          "held-out score scale")
    return float(mean), float(std)


@dataclass
class EnsembleScorer:
    """K scorers (reward models) combined into one conservative reward (``core.ensemble_reward``).

    Each member's score is first standardised by its own held-out mean and std (``norms``):
    Bradley-Terry rewards have an arbitrary offset and scale per model, so raw scores of two
    models are not comparable. One member with norm (0, 1) is the plain reward model.
    """

    members: list[Scorer]
    norms: list[tuple[float, float]]
    reduction: str = "mean"
    std_coef: float = 1.0

    @torch.no_grad()
    def __call__(self, rollout_ids, rollout_mask, prompts: list[Any], responses: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(reward [B], disagreement [B])`` (disagreement 0 for one member)."""
        scores = torch.stack([(member(rollout_ids, rollout_mask, prompts, responses) - mean) / std
                              for member, (mean, std) in zip(self.members, self.norms)])
        return ensemble_reward(scores, self.reduction, self.std_coef)

    @property
    def models(self) -> list[torch.nn.Module]:
        return [m.model for m in self.members if m.model is not None]
