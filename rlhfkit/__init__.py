"""rlhfkit: supervised fine-tuning -> reward model -> PPO, end to end.

Stages live in subpackages: ``rlhfkit.data`` (Open Assistant and TRL formats),
``rlhfkit.world`` (the embedded synthetic world and its gold judge), ``rlhfkit.sft``,
``rlhfkit.reward``, ``rlhfkit.ppo``; ``rlhfkit.pipeline`` chains them and ``rlhfkit.sweep``
runs the chain over a grid.
"""

from rlhfkit.errors import ConfigError, DataError, RlhfkitError, TrainingError

__version__ = "0.1.0"
__all__ = ["ConfigError", "DataError", "RlhfkitError", "TrainingError", "__version__"]
