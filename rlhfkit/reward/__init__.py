"""Reward-model stage: ``rlhfkit reward CONFIG.yaml`` or ``train_reward(config)``.

``reward_scores`` (read at the last non-pad token, any padding side) is the one scoring
function for later stages too.
"""

from rlhfkit.reward.train import (
    REWARD_TRL_DEFAULTS,
    RewardStageConfig,
    conversation_ids,
    gold_agreement,
    reward_scores,
    tokenize_pairs,
    train_reward,
)

__all__ = [
    "REWARD_TRL_DEFAULTS",
    "RewardStageConfig",
    "conversation_ids",
    "gold_agreement",
    "reward_scores",
    "tokenize_pairs",
    "train_reward",
]
