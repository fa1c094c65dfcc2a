"""Supervised fine-tuning stage: ``rlhfkit sft CONFIG.yaml`` or ``train_sft(config)``."""

from rlhfkit.sft.train import (
    SFT_TRL_DEFAULTS,
    SFTStageConfig,
    build_sft_trainer,
    to_prompt_completion,
    train_sft,
)

__all__ = ["SFTStageConfig", "SFT_TRL_DEFAULTS", "build_sft_trainer", "to_prompt_completion", "train_sft"]
