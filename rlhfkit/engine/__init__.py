"""The rollout engine, below every stage that samples or scores (PPO, evaluation, best-of-n).

- ``sampling``: prompts -> chat-templated ids -> sampled responses with their log-probs,
  masks and texts (``encode_prompts``, ``generate``, ``sample``);
- ``forward``: forwards over padded rows (``response_logits``, ``token_values``,
  ``sequence_scores``, ``reward_scores``), skipping the prompts' left padding;
- ``scoring``: how a response gets its reward (``Scorer``, ``EnsembleScorer``);
- ``fast_cpu``: the CPU fast path of sampling, used only where it gives what the generic
  path gives.

The math (log-probs from logits, masks, KL) is in ``rlhfkit.core``.
"""

from rlhfkit.engine.forward import (left_pad, model_device, pad_rows, position_ids, response_logits, reward_scores,
                                    row_groups, sequence_scores, token_values)
from rlhfkit.engine.sampling import Generation, Sequences, as_messages, conversation_ids, encode_prompts, generate, sample, truncate_at_eos
from rlhfkit.engine.scoring import EnsembleScorer, RewardFn, Scorer, shares_tokenizer

__all__ = [
    "EnsembleScorer", "Generation", "RewardFn", "Scorer", "Sequences", "as_messages", "conversation_ids", "encode_prompts",
    "generate", "left_pad", "model_device", "pad_rows", "position_ids", "response_logits", "reward_scores",
    "row_groups", "sample", "sequence_scores", "shares_tokenizer", "token_values", "truncate_at_eos",
]
