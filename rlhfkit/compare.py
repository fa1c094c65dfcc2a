"""Configurations compared over seeds: a sweep's runs grouped by their grid point, each figure's
mean and standard error across seeds, best-of-n on the same footing, and which one wins at
each KL budget.

The question it answers (for ``--grid ppo.algorithm=ppo,rloo,grpo --seeds 3``): which method
gives the most true improvement per nat of KL and per CPU-second. Gains are paired (the RL
policy minus SFT on the same held-out prompts, within a run), so seed-to-seed differences of
the SFT model cancel; the standard errors here are across seeds (std / sqrt(seeds)), the
spread a user would see re-running the comparison, not across prompts.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping, Sequence

# (key in a sweep row, label): the figures averaged over seeds
FIGURES: tuple[tuple[str, str], ...] = (
    ("eval.gold_gain", "gold gain, sampled"),
    ("eval.greedy_gold_gain", "gold gain, greedy"),
    ("eval.ppo.kl", "KL to SFT (nats)"),
    ("eval.ppo.reward", "reward-model score"),
    ("eval.ppo.length", "length (tokens)"),
    ("ppo.wall_time_s", "RL training time (s)"),
    ("gain_per_nat", "gold gain per nat of KL"),
    ("gain_per_kcpu_s", "gold gain per 1000 s of training"),
)


def mean_se(values: Sequence[float | None]) -> tuple[float | None, float | None]:
    """The evaluation's mean and standard error (``rlhfkit.evaluate.mean_se``) over the runs that
    have the figure (missing or non-finite values left out); None where there is no value, and an
    SE of None for a single value (no spread to estimate), so that the CSV shows an empty cell."""
    from rlhfkit.evaluate import mean_se as evaluation_mean_se

    return evaluation_mean_se([float(v) for v in values if v is not None and math.isfinite(float(v))])


def _derived(row: Mapping[str, Any]) -> dict[str, float | None]:
    """Per-run ratios: gold gain per nat of KL and per 1000 s of the RL stage's training."""
    gain, kl, wall = row.get("eval.gold_gain"), row.get("eval.ppo.kl"), row.get("ppo.wall_time_s")
    return {"gain_per_nat": gain / kl if gain is not None and kl and kl > 0 else None,
            "gain_per_kcpu_s": 1000 * gain / wall if gain is not None and wall else None}


def group_runs(rows: Sequence[Mapping[str, Any]], varied: Sequence[str]) -> list[dict[str, Any]]:
    """One entry per grid point (the varied keys except ``seed``), in first-seen order:
    ``{"config": label, "seeds": n, KEY: mean, KEY + "_se": SE}`` for every figure of ``FIGURES``."""
    keys = [k for k in varied if k != "seed"]
    groups: dict[tuple, list[Mapping[str, Any]]] = {}
    for row in rows:
        groups.setdefault(tuple(row.get(k) for k in keys), []).append(row)
    out = []
    for point, members in groups.items():
        entry: dict[str, Any] = {"config": ", ".join(f"{k}={v}" for k, v in zip(keys, point)) or "all runs",
                                 "seeds": len(members)}
        members = [{**m, **_derived(m)} for m in members]
        for key, _ in FIGURES:
            entry[key], entry[key + "_se"] = mean_se([m.get(key) for m in members])
        out.append(entry)
    return out


def best_of_n_gains(curves: Sequence[tuple[Any, Mapping[str, Any]]]) -> list[dict[str, Any]]:
    """Best-of-n's gold gain over SFT for each n, mean ± SE over the distinct seeds in ``curves``
    (``(seed, curve.json)`` pairs; runs of one seed share it). The SFT baseline is best-of-1 of
    the same samples when the curve has it (paired: the same draws), else the curve's update-0 point."""
    by_seed = {}
    for seed, curve in curves:
        if curve.get("best_of_n") and curve.get("ppo") and curve["ppo"][0].get("gold") is not None:
            by_seed.setdefault(seed, curve)
    gains: dict[int, list[float]] = {}
    kls: dict[int, float] = {}
    for curve in by_seed.values():
        one = [p["gold"] for p in curve["best_of_n"] if p["n"] == 1 and p.get("gold") is not None]
        sft_gold = one[0] if one else curve["ppo"][0]["gold"]
        for point in curve["best_of_n"]:
            if point.get("gold") is not None:
                gains.setdefault(point["n"], []).append(point["gold"] - sft_gold)
                kls[point["n"]] = point["kl"]
    return [dict(zip(("gain", "gain_se"), mean_se(g)), n=n, kl=kls[n], seeds=len(g)) for n, g in sorted(gains.items())]


def winners(groups: Sequence[Mapping[str, Any]], best_of_n: Sequence[Mapping[str, Any]]) -> list[str]:
    """For each KL budget (each contender's mean KL, ascending): the contender with the highest
    mean sampled gold gain among those within the budget, and its lead over the runner-up in
    standard errors of the difference (independent seeds: sqrt(se_a² + se_b²))."""
    contenders = [(g["config"], g["eval.ppo.kl"], g["eval.gold_gain"], g.get("eval.gold_gain_se"))
                  for g in groups if g.get("eval.ppo.kl") is not None and g.get("eval.gold_gain") is not None]
    contenders += [(f"best-of-{b['n']}", b["kl"], b["gain"], b["gain_se"]) for b in best_of_n if b["n"] > 1]
    lines = []
    for budget in sorted({c[1] for c in contenders}):
        within = sorted((c for c in contenders if c[1] <= budget), key=lambda c: -c[2])
        name, kl, gain, se = within[0]
        text = f"KL ≤ {budget:.2f} nats: {name} (gold gain {gain:+.3f}{f' ± {se:.3f}' if se is not None else ''}"
        if len(within) > 1:
            other = within[1]
            if se is not None and other[3] is not None and (se or other[3]):
                text += f"; ahead of {other[0]} by {(gain - other[2]) / math.hypot(se, other[3]):.1f} SE"
            else:
                text += f"; ahead of {other[0]} by {gain - other[2]:.3f}"
        lines.append(text + ")")
    return lines


def plot_gain_vs_kl(groups: Sequence[Mapping[str, Any]], best_of_n: Sequence[Mapping[str, Any]], path: Path) -> None:
    """Gold gain against sqrt(KL to SFT): one point per configuration (mean over seeds, ± 1 SE
    both ways), best-of-n dashed, on the same axes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for g in groups:
        if g.get("eval.ppo.kl") is None or g.get("eval.gold_gain") is None:
            continue
        x = math.sqrt(max(g["eval.ppo.kl"], 0.0))
        kl_se = g.get("eval.ppo.kl_se")
        xerr = kl_se / (2 * x) if kl_se and x > 0 else 0  # delta method: se(sqrt K) = se(K) / (2 sqrt K)
        ax.errorbar([x], [g["eval.gold_gain"]], xerr=[xerr], yerr=[g.get("eval.gold_gain_se") or 0], fmt="o",
                    capsize=3, label=f"{g['config']} ({g['seeds']} seed{'s' if g['seeds'] > 1 else ''})")
    if best_of_n:
        ax.errorbar([math.sqrt(b["kl"]) for b in best_of_n], [b["gain"] for b in best_of_n],
                    yerr=[b["gain_se"] or 0 for b in best_of_n], fmt="s--", color="#555753", ms=4, capsize=2,
                    label="best-of-n (n = " + ", ".join(str(b["n"]) for b in best_of_n) + ")")
    ax.axhline(0, color="#888a85", lw=0.8)
    ax.set_xlabel("sqrt(KL to SFT)  [sqrt(nats/response)]")
    ax.set_ylabel("gold gain over SFT, sampled")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
