"""Reward-model stage: ``rlhfkit reward CONFIG.yaml`` or ``train_reward(config)``.

Its model scores a conversation as every later stage does: ``rlhfkit.engine.reward_scores``
over ``rlhfkit.engine.conversation_ids``.
"""

from rlhfkit.reward.train import (
    REWARD_TRL_DEFAULTS,
    RewardStageConfig,
    build_reward_trainer,
    gold_agreement,
    tokenize_pairs,
    train_reward,
)

__all__ = [
    "REWARD_TRL_DEFAULTS",
    "RewardStageConfig",
    "build_reward_trainer",
    "gold_agreement",
    "tokenize_pairs",
    "train_reward",
]
