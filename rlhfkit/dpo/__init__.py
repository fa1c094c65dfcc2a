"""DPO stage: TRL's DPOTrainer on the data stage's preference pairs, from the SFT model."""

from rlhfkit.dpo.train import DPOStageConfig, build_dpo_trainer, train_dpo

__all__ = ["DPOStageConfig", "build_dpo_trainer", "train_dpo"]
