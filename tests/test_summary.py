"""summary.json's one table of figures: every key once, read from the right place, used by the sweep."""

from rlhfkit.summary import BY_KEY, FIGURES, RESULT_KEYS, collect, figure_text


def test_every_key_once_and_every_standard_error_is_a_figure():
    keys = [f.key for f in FIGURES]
    assert len(keys) == len(set(keys)) == len(BY_KEY)
    assert all(f.se in BY_KEY for f in FIGURES if f.se)
    assert set(RESULT_KEYS) <= set(keys) and "eval.gold_gain" in RESULT_KEYS and "eval.verdict" not in RESULT_KEYS


def test_collect_reads_stage_metrics_and_eval_json():
    stages = {"sft": {"eval_loss": 1.25}, "reward": {"eval_accuracy": 0.75, "eval_accuracy_se": 0.05}}
    ev = {"sft": {"gold": 0.25, "greedy": {"gold": 0.5}}, "ppo": {"gold": 0.375, "kl": 0.5, "kl_se": 0.125},
          "gold_gain": 0.125, "gold_gain_se": 0.03125, "verdict": "PPO improved"}
    s = collect(stages, ev)
    assert list(s) == [f.key for f in FIGURES]  # the table's order
    assert s["sft.eval_loss"] == 1.25 and s["reward.eval_accuracy"] == 0.75
    assert s["eval.sft.gold"] == 0.25 and s["eval.sft.greedy_gold"] == 0.5 and s["eval.ppo.greedy_gold"] is None
    assert s["eval.ppo.kl"] == 0.5 and s["eval.gold_gain"] == 0.125 and s["eval.verdict"] == "PPO improved"
    assert s["reward.ensemble_size"] == 1  # the default where the stage did not record it
    assert s["reward.gold_agreement"] is None and s["eval.win_rate_gold"] is None
    assert figure_text(s, "eval.gold_gain", lambda v, se: f"{v} ± {se}") == "0.125 ± 0.03125"
    assert figure_text(s, "eval.ppo.kl", lambda v, se: f"{v} ± {se}") == "0.5 ± 0.125"
    assert figure_text(s, "sft.eval_loss", lambda v, se: f"{v} ± {se}") == "1.25 ± None"
