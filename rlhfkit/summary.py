"""The figures a run reports, in one table: ``summary.json``'s keys, where each comes from, its label,
its standard error, and whether the sweep's ``results.csv`` has a column for it.

The chain writes ``summary.json`` from this table (``collect``), the sweep copies the ``csv``
figures into ``results.csv`` (``RESULT_KEYS``), and the run's summary text and report label
each figure with its ``label``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping


@dataclass(frozen=True)
class Figure:
    key: str  # the summary.json key: "<stage>.<metric>" or "eval.<path in eval.json>"
    label: str  # how the summary text and the report name it
    se: str | None = None  # the key of its standard error, when it has one
    csv: bool = False  # a column of the sweep's results.csv
    path: tuple[str, ...] | None = None  # its place in eval.json when not the key's own dotted path
    default: Any = None  # the value when the run does not have it


FIGURES: tuple[Figure, ...] = (
    Figure("sft.eval_loss", "SFT eval loss", csv=True),
    Figure("sft.eval_loss_start", "SFT eval loss before training"),
    Figure("reward.eval_accuracy", "reward model accuracy (held-out pairs)", se="reward.eval_accuracy_se", csv=True),
    Figure("reward.eval_accuracy_se", "reward model accuracy, standard error"),
    Figure("reward.gold_agreement", "reward model agreement with gold", csv=True),
    Figure("reward.ensemble_size", "reward models in the ensemble", default=1),
    Figure("reward.ensemble_gold_agreement", "reward ensemble agreement with gold", csv=True),
    Figure("ppo.algorithm", "RL algorithm", csv=True, default="ppo"),
    Figure("ppo.wall_time_s", "RL stage training time, s", csv=True),
    Figure("ppo.params_held", "parameters held by the RL stage (policy, reference, value, reward)", csv=True),
    Figure("eval.sft.reward", "reward-model score, SFT", csv=True),
    Figure("eval.sft.gold", "gold score, SFT", se="eval.sft.gold_se", csv=True),
    Figure("eval.sft.length", "response length, SFT", csv=True),
    Figure("eval.ppo.reward", "reward-model score, PPO", csv=True),
    Figure("eval.ppo.gold", "gold score, PPO", se="eval.ppo.gold_se", csv=True),
    Figure("eval.ppo.length", "response length, PPO", csv=True),
    Figure("eval.ppo.kl", "KL(PPO ‖ SFT), nats per response", se="eval.ppo.kl_se", csv=True),
    Figure("eval.ppo.kl_se", "KL(PPO ‖ SFT): standard error", csv=True),
    Figure("eval.win_rate_gold", "win rate of PPO over SFT, gold judge", se="eval.win_rate_gold_se", csv=True),
    Figure("eval.win_rate_reward", "win rate of PPO over SFT, reward model", se="eval.win_rate_reward_se", csv=True),
    Figure("eval.gold_gain", "gold gain, sampled (PPO − SFT, paired)", se="eval.gold_gain_se", csv=True),
    Figure("eval.gold_gain_se", "gold gain, sampled: standard error", csv=True),
    Figure("eval.reward_gain", "reward gain, sampled (PPO − SFT, paired)", se="eval.reward_gain_se", csv=True),
    Figure("eval.reward_gain_se", "reward gain, sampled: standard error", csv=True),
    Figure("eval.greedy_reward_gain", "reward gain, greedy (PPO − SFT, paired)", se="eval.greedy_reward_gain_se",
           csv=True),
    Figure("eval.greedy_reward_gain_se", "reward gain, greedy: standard error", csv=True),
    Figure("eval.sft.gold_se", "gold score, SFT: standard error"),
    Figure("eval.ppo.gold_se", "gold score, PPO: standard error", csv=True),
    Figure("eval.win_rate_gold_se", "win rate, gold judge: standard error"),
    Figure("eval.win_rate_reward_se", "win rate, reward model: standard error"),
    Figure("eval.sft.greedy_gold", "gold score, greedy, SFT", csv=True, path=("sft", "greedy", "gold")),
    Figure("eval.ppo.greedy_gold", "gold score, greedy, PPO", csv=True, path=("ppo", "greedy", "gold")),
    Figure("eval.greedy_gold_gain", "gold gain, greedy (PPO − SFT, paired)", se="eval.greedy_gold_gain_se", csv=True),
    Figure("eval.greedy_gold_gain_se", "gold gain, greedy: standard error", csv=True),
    Figure("eval.verdict", "verdict"),
    Figure("eval.prompts", "held-out prompts"),
    Figure("eval.samples_per_prompt", "samples per prompt"),
)
BY_KEY: dict[str, Figure] = {f.key: f for f in FIGURES}
RESULT_KEYS: tuple[str, ...] = tuple(f.key for f in FIGURES if f.csv)


def collect(stage_metrics: Mapping[str, Mapping[str, Any]], eval_json: Mapping[str, Any]) -> dict[str, Any]:
    """Every figure of ``FIGURES``, in its order, from the stages' metrics and the evaluation's eval.json."""
    out: dict[str, Any] = {}
    for figure in FIGURES:
        source, *path = figure.key.split(".")
        node: Any = eval_json if source == "eval" else stage_metrics.get(source, {})
        for part in figure.path or path:
            node = node.get(part) if isinstance(node, Mapping) else None
        out[figure.key] = figure.default if node is None else node
    return out


def figure_text(summary: Mapping[str, Any], key: str, fmt, no_se: Any = None) -> str:
    """``key``'s value formatted by ``fmt(value, se)``, with its standard error where it has one, else
    ``no_se``: a figure without a standard error differs from one whose SE is None (undefined: one prompt)."""
    se = BY_KEY[key].se
    return fmt(summary.get(key), summary.get(se) if se else no_se)
