"""The embedded world: synthetic Open Assistant-style trees with a known gold judge,
and the tiny tokenizer and model that live in it. Nothing is downloaded."""

from rlhfkit.world.model import ModelInitConfig, init_model

try:  # gold.py / synth.py land in the same change; keep model init importable meanwhile
    from rlhfkit.world.gold import gold_score
    from rlhfkit.world.synth import SynthConfig, synth_data
except ImportError:  # pragma: no cover
    pass
