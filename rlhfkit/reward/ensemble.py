"""Reward-model ensembles: members' score scales and the ensemble's held-out figures.

An ensemble is K reward-stage folders trained from the same SFT model with different seeds
(different head initialisation and data order). Bradley-Terry rewards have an arbitrary
offset and scale per model, so every member's score is standardised by its own held-out
mean and std (``metrics.json``) before the members are combined by
``rlhfkit.core.ensemble_reward`` -- in PPO and in the figures below alike.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import torch

from rlhfkit.engine.scoring import held_out_norm
from rlhfkit.errors import ConfigError

SCORES_FILE = "eval_scores.jsonl"  # the reward stage's per-pair held-out scores


def member_folders(reward_dir: str | Path, size: int) -> list[Path]:
    """Where a chain keeps its ``size`` reward models: member 0 is the reward stage's folder itself,
    member i (seed + i) its ``members/i``."""
    return [Path(reward_dir)] + [Path(reward_dir) / "members" / str(i) for i in range(1, size)]


def agreement_with_gold(r_chosen: Sequence[float], r_rejected: Sequence[float],
                        golds: Sequence[tuple[float, float] | None]) -> tuple[float | None, int]:
    """``(agreement, pairs counted)``: of the pairs whose gold scores differ, the fraction whose
    reward order is the gold order (a reward tie disagrees); ``None`` golds are not counted."""
    agree = counted = 0
    for rc, rr, gold in zip(r_chosen, r_rejected, golds):
        if gold is None or gold[0] == gold[1]:
            continue
        counted += 1
        agree += int((rc - rr) * (gold[0] - gold[1]) > 0)
    return (agree / counted if counted else None), counted


def ensemble_metrics(folders: Sequence[str | Path], reduction: str = "mean", std_coef: float = 1.0) -> dict[str, Any]:
    """The combined reward's accuracy and gold agreement on the held-out pairs every member scored.

    Reads each member's ``eval_scores.jsonl``; a pair counts for gold agreement when the gold
    judge scored its replies differently (as ``gold_agreement`` of one model).
    """
    from rlhfkit.core import ensemble_reward

    rows = []
    for folder in folders:
        lines = (Path(folder) / SCORES_FILE).read_text(encoding="utf-8").splitlines()
        rows.append([json.loads(line) for line in lines if line.strip()])
    if len({len(r) for r in rows}) != 1 or not rows[0]:
        raise ConfigError(f"reward ensemble: members scored different held-out pairs ({[len(r) for r in rows]})")
    norms = [held_out_norm(f) for f in folders]

    def combined(key: str) -> torch.Tensor:
        scores = torch.tensor([[row[key] for row in member] for member in rows], dtype=torch.float64)
        mean = torch.tensor([m for m, _ in norms], dtype=torch.float64)[:, None]
        std = torch.tensor([s for _, s in norms], dtype=torch.float64)[:, None]
        return ensemble_reward((scores - mean) / std, reduction, std_coef)[0]

    chosen, rejected = combined("chosen_reward"), combined("rejected_reward")
    accuracy = float((chosen > rejected).double().mean())
    golds = [(row["gold_chosen"], row["gold_rejected"]) if "gold_chosen" in row else None for row in rows[0]]
    agreement, counted = agreement_with_gold(chosen.tolist(), rejected.tolist(), golds)
    return {"ensemble_size": len(folders), "ensemble_eval_accuracy": accuracy,
            "ensemble_gold_agreement": agreement, "ensemble_gold_pairs": counted}
