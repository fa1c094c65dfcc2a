"""The held-out evaluation's verdict: one plain-words line computed from the figures."""

import pytest

from rlhfkit.evaluate import mean_se, verdict


def figures(sampled, greedy, reward=(0.9, 0.04), kl=2.0, gold=True):
    out = {"ppo": {"kl": kl}, "reward_gain": reward[0], "reward_gain_se": reward[1]}
    if gold:
        out.update(gold_gain=sampled[0], gold_gain_se=sampled[1])
        if greedy is not None:
            out.update(greedy_gold_gain=greedy[0], greedy_gold_gain_se=greedy[1])
    else:
        out.update(gold_gain=None, gold_gain_se=None)
    return out


@pytest.mark.parametrize("sampled, greedy, reward, starts", [
    # both gains beyond 2 SE: truly better
    ((0.20, 0.02), (0.05, 0.02), (0.9, 0.04), "PPO improved the true score, sampled and greedy"),
    # greedy within 2 SE of zero (0.03 < 2 x 0.02)
    ((0.20, 0.02), (0.03, 0.02), (0.9, 0.04), "PPO improved the true score of sampled answers; greedy answers did not"),
    # the demo before this fix: sampled up, greedy significantly down, the proxy up
    ((0.06, 0.02), (-0.16, 0.03), (0.9, 0.04),
     "Past the peak: the reward-model score rose while greedy answers got truly worse, though sampled answers improved"),
    ((-0.10, 0.02), (-0.16, 0.03), (0.9, 0.04), "Past the peak: the reward-model score rose while sampled and greedy"),
    ((-0.10, 0.02), (0.0, 0.03), (-0.2, 0.04), "Worse than SFT: sampled answers got truly worse"),
    # gold flat, proxy up: over-optimised
    ((0.01, 0.02), (0.0, 0.02), (0.9, 0.04), "Past the peak: the reward-model score rose while the true score did not"),
    ((0.01, 0.02), (0.0, 0.02), (0.02, 0.04), "No significant change in the true score"),
])
def test_verdict_follows_the_figures(sampled, greedy, reward, starts):
    text = verdict(figures(sampled, greedy, reward))
    assert text.startswith(starts), text
    assert f"sampled {sampled[0]:+.3f} ± {sampled[1]:.3f}" in text and "KL 2.00 nats" in text


def test_verdict_threshold_is_two_standard_errors():
    assert verdict(figures((0.041, 0.02), (0.041, 0.02))).startswith("PPO improved the true score, sampled and greedy")
    assert verdict(figures((0.039, 0.02), (0.041, 0.02), reward=(0.0, 0.1))).startswith("No significant change")


def test_verdict_without_gold_reports_only_the_proxy():
    text = verdict(figures(None, None, reward=(0.5, 0.05), kl=1.25, gold=False))
    assert text.startswith("No gold judge: the reward-model score changed by +0.500 ± 0.050 at KL 1.25 nats")
    text = verdict({**figures(None, None, reward=(0.5, 0.05), kl=1.25, gold=False),
                    "greedy_reward_gain": -0.25, "greedy_reward_gain_se": 0.125})
    assert text.startswith("No gold judge: the reward-model score changed by +0.500 ± 0.050 (greedy -0.250 ± 0.125) "
                           "at KL 1.25 nats")


def test_mean_se_by_hand():
    # values 1, 2, 3, 6: mean 3, sample variance (4 + 1 + 0 + 9) / 3 = 14/3, se = sqrt(14/3 / 4) = 1.0801
    mean, se = mean_se([1.0, 2.0, 3.0, 6.0])
    assert mean == 3.0 and se == pytest.approx(1.0801234497, abs=1e-9)
