"""The embedded world: synthetic Open Assistant-style trees with a known gold judge,
and the tiny tokenizer and model that live in it. Nothing is downloaded."""

from rlhfkit.world.gold import TASK_FAMILIES, gold_score, reference_answer, sample_prompt, task_family
from rlhfkit.world.model import ModelInitConfig, init_model
from rlhfkit.world.synth import SynthConfig, generate_trees, synth_data

__all__ = [
    "TASK_FAMILIES", "ModelInitConfig", "SynthConfig", "generate_trees", "gold_score", "init_model",
    "reference_answer", "sample_prompt", "synth_data", "task_family",
]
