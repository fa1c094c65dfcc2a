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


def test_report_page_escapes_text_and_shows_only_measured_cards(tmp_path):
    """report.html comes from the Jinja2 template with every value escaped; without a gold judge it
    shows no gold cards (they would all read "–")."""
    import json

    from rlhfkit.report import write_report

    run = tmp_path / "run"
    (run / "eval").mkdir(parents=True)
    ev = {"prompts": 2, "samples_per_prompt": 1, "temperature": 1.0,
          "sft": {"reward": 0.5, "length": 3.0}, "ppo": {"reward": 0.75, "length": 4.0, "kl": 0.25, "kl_se": 0.05},
          "reward_gain": 0.25, "reward_gain_se": 0.125, "verdict": "No gold judge: <b>read</b> the samples."}
    (run / "eval" / "eval.json").write_text(json.dumps(ev))
    (run / "eval" / "examples.json").write_text(json.dumps([{
        "prompt": "<script>alert(1)</script>", "sft": "a & b", "sft_reward": 0.5, "sft_gold": None,
        "ppo": "x < y", "ppo_reward": 0.75, "ppo_gold": None}]))
    summary = collect({"sft": {"eval_loss": 1.5}}, ev)
    write_report(run, summary)
    page = (run / "report.html").read_text()
    assert "<script>alert" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "a &amp; b" in page and "x &lt; y" in page and "&lt;b&gt;read&lt;/b&gt;" in page
    assert "Reward gain, sampled (PPO − SFT, paired)<b>0.25 ± 0.12</b>" in page
    assert "Gold gain" not in page and "gold judge<b>" not in page  # no gold judge: no gold cards
    assert page.startswith("<!doctype html>") and page.rstrip().endswith("</html>")
    # the policies table: no gold columns without a gold judge, no greedy column without greedy draws
    header = page.split("<h2>Policies on held-out prompts</h2>")[1].split("</thead>")[0]
    assert "<th>reward</th>" in header and "gold" not in header and "greedy" not in header
    assert "· gold" not in page and "(r 0.75) |" in (run / "report.md").read_text()
    # an RLOO run's report and summary name the aligned policy by its method, not "PPO"
    from rlhfkit.report import summary_text

    rloo = collect({"sft": {"eval_loss": 1.5}, "ppo": {"algorithm": "rloo"}}, ev)
    write_report(run, rloo)
    page = (run / "report.html").read_text()
    assert "Reward gain, sampled (RLOO − SFT, paired)<b>0.25 ± 0.12</b>" in page and "<th>RLOO</th>" in page
    assert "<td>RLOO</td>" in page and "PPO" not in page.split("<h2>Configuration")[0]
    text = summary_text(run, rloo)
    assert "RLOO − SFT" in text and "PPO" not in text
    # greedy rewards measured and a gold judge present: both columns, the samples' gold scores too
    ev["sft"]["greedy"], ev["ppo"]["greedy"] = {"reward": 0.25, "reward_se": 0.5}, {"reward": 0.5, "reward_se": 0.5}
    ev["sft"]["gold"], ev["ppo"]["gold"] = 0.25, 0.5
    (run / "eval" / "eval.json").write_text(json.dumps(ev))
    (run / "eval" / "examples.json").write_text(json.dumps([{
        "prompt": "p", "sft": "a", "sft_reward": 0.5, "sft_gold": 0.0, "ppo": "b", "ppo_reward": 0.75, "ppo_gold": 1.0}]))
    write_report(run, collect({"sft": {"eval_loss": 1.5}}, ev))
    page = (run / "report.html").read_text()
    header = page.split("<h2>Policies on held-out prompts</h2>")[1].split("</thead>")[0]
    assert [h.split("</th>")[0] for h in header.split("<th>")[1:]] == [
        "policy", "reward", "reward (greedy)", "gold", "length", "KL to SFT"]  # no greedy gold was measured
    assert "<td>0.25 ± 0.5</td><td>0.25</td>" in page and "reward 0.75 · gold 1" in page
