"""The comparison of configurations over seeds (rlhfkit.compare), by hand."""

import math

import pytest

from rlhfkit.compare import best_of_n_gains, group_runs, mean_se, winners


def test_mean_se_by_hand():
    # 1, 2, 6: mean 3; sample variance (4 + 1 + 9) / 2 = 7; SE sqrt(7 / 3)
    assert mean_se([1.0, 2.0, 6.0]) == pytest.approx((3.0, math.sqrt(7 / 3)))
    assert mean_se([5.0]) == (5.0, None)  # one seed: no spread to speak of
    assert mean_se([None, float("nan")]) == (None, None)


def _row(algorithm, seed, gain, kl, wall):
    return {"ppo.algorithm": algorithm, "seed": seed, "eval.gold_gain": gain, "eval.ppo.kl": kl,
            "ppo.wall_time_s": wall, "eval.greedy_gold_gain": 0.0}


def test_group_runs_averages_each_configuration_over_its_seeds():
    rows = [_row("ppo", 0, 0.10, 0.20, 100.0), _row("ppo", 1, 0.14, 0.30, 120.0),
            _row("rloo", 0, 0.12, 0.40, 50.0), _row("rloo", 1, 0.16, 0.40, 70.0)]
    groups = group_runs(rows, ["ppo.algorithm", "seed"])
    assert [g["config"] for g in groups] == ["ppo.algorithm=ppo", "ppo.algorithm=rloo"]
    ppo, rloo = groups
    assert ppo["seeds"] == 2 and ppo["eval.gold_gain"] == pytest.approx(0.12)
    assert ppo["eval.gold_gain_se"] == pytest.approx(0.02)  # |0.10 - 0.14| / 2: the SE of two values
    # per-run ratios, then averaged: gain / KL = 0.5, 0.4667; per 1000 s: 1.0, 1.1667
    assert ppo["gain_per_nat"] == pytest.approx((0.5 + 0.14 / 0.3) / 2)
    assert ppo["gain_per_kcpu_s"] == pytest.approx((1.0 + 140 / 120) / 2)
    assert rloo["gain_per_kcpu_s"] == pytest.approx((2.4 + 160 / 70) / 2)
    assert rloo["eval.ppo.kl_se"] == 0.0  # equal KLs


def test_best_of_n_gains_are_over_sft_and_counted_once_per_seed():
    def curve(sft_gold, bon):
        return {"ppo": [{"update": 0, "gold": sft_gold}], "best_of_n": [{"n": n, "kl": kl, "gold": g} for n, kl, g in bon]}

    seed0 = curve(0.3, [(1, 0.0, 0.31), (4, 0.636, 0.45)])
    seed1 = curve(0.2, [(1, 0.0, 0.19), (4, 0.636, 0.29)])
    # seed 0's curve twice (two methods of one seed share SFT and best-of-n): counted once;
    # the baseline is best-of-1 of the same samples: gains 0.45 - 0.31 = 0.14 and 0.29 - 0.19 = 0.10
    out = best_of_n_gains([(0, seed0), (0, seed0), (1, seed1)])
    assert [b["n"] for b in out] == [1, 4] and all(b["seeds"] == 2 for b in out)
    assert out[0]["gain"] == 0.0
    assert out[1]["gain"] == pytest.approx((0.14 + 0.10) / 2) and out[1]["gain_se"] == pytest.approx(0.02)
    # without best-of-1, the curve's SFT point is the baseline: 0.45 - 0.3, 0.29 - 0.2
    no_one = [(s, {**c, "best_of_n": c["best_of_n"][1:]}) for s, c in ((0, seed0), (1, seed1))]
    assert best_of_n_gains(no_one)[0]["gain"] == pytest.approx((0.15 + 0.09) / 2)


def test_winners_at_each_budget():
    groups = [{"config": "ppo", "eval.ppo.kl": 0.2, "eval.gold_gain": 0.10, "eval.gold_gain_se": 0.03},
              {"config": "rloo", "eval.ppo.kl": 0.5, "eval.gold_gain": 0.14, "eval.gold_gain_se": 0.04}]
    bon = [{"n": 1, "kl": 0.0, "gain": 0.0, "gain_se": 0.0}, {"n": 4, "kl": 0.636, "gain": 0.12, "gain_se": 0.01}]
    lines = winners(groups, bon)
    assert len(lines) == 3  # budgets 0.2, 0.5, 0.636 (best-of-1 is SFT itself, not a contender)
    assert lines[0].startswith("KL ≤ 0.20 nats: ppo (gold gain +0.100 ± 0.030)")
    # rloo leads ppo by 0.04 / sqrt(0.03² + 0.04²) = 0.04 / 0.05 = 0.8 SE
    assert lines[1] == "KL ≤ 0.50 nats: rloo (gold gain +0.140 ± 0.040; ahead of ppo by 0.8 SE)"
    assert lines[2].startswith("KL ≤ 0.64 nats: rloo") and "ahead of best-of-4 by 0.5 SE" in lines[2]
