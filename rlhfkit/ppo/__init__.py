"""PPO stage: our own RLHF-PPO on transformers + accelerate.

``train_ppo(PPOStageConfig(...))`` aligns a policy; the math is importable on its own
from ``rlhfkit.ppo`` (``compute_gae``, ``whiten``, ``kl_per_token``, ``policy_loss``,
``value_loss``, ...) without loading any trainer code.
"""

from rlhfkit.ppo.config import PPOStageConfig
from rlhfkit.core import (
    AdaptiveKLController,
    FixedKLController,
    approx_kl,
    compute_gae,
    entropy_from_logits,
    kl_per_token,
    logprobs_from_logits,
    mask_after_eos,
    masked_mean,
    masked_var,
    policy_loss,
    rewards_with_kl,
    value_loss,
    whiten,
)


def train_ppo(config, **kwargs):
    """Run the PPO stage (see ``rlhfkit.ppo.trainer.train_ppo``); imported lazily to keep the math light."""
    from rlhfkit.ppo.trainer import train_ppo as _train_ppo

    return _train_ppo(config, **kwargs)


__all__ = [
    "AdaptiveKLController", "FixedKLController", "PPOStageConfig", "approx_kl", "compute_gae",
    "entropy_from_logits", "kl_per_token", "logprobs_from_logits", "mask_after_eos", "masked_mean",
    "masked_var", "policy_loss", "rewards_with_kl", "train_ppo", "value_loss", "whiten",
]
