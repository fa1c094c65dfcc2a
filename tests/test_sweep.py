"""rlhfkit sweep: grid expansion, shared stages computed once, results.csv, the
over-optimisation curve and best-of-n on a tiny run, resume, and bad grids as one line."""

import csv
import json
import math

import pytest

from rlhfkit.cli import main
from rlhfkit.config import load_config
from rlhfkit.errors import ConfigError
from rlhfkit.evaluate import best_of_n, best_of_n_kl
from rlhfkit.pipeline import RunConfig
from rlhfkit.report import best_budget_sentence
from rlhfkit.sweep import expand_grid, parse_grid, run_name, run_sweep, split_values
from test_pipeline import TINY


def test_parse_grid_values_and_brackets():
    grid = parse_grid(["ppo.kl_coef=0,0.05,1e-3", "data.lang=[en],[en,de]", "model.size=micro,tiny"])
    assert grid == {"ppo.kl_coef": [0, 0.05, 0.001], "data.lang": [["en"], ["en", "de"]], "model.size": ["micro", "tiny"]}
    assert split_values("a, [b,c] ,{d: 1, e: 2}") == ["a", "[b,c]", "{d: 1, e: 2}"]


@pytest.mark.parametrize("items, message", [
    (["ppo.kl_coef"], "is not KEY=V1,V2"),
    (["=1,2"], "is not KEY=V1,V2"),
    (["seed=1,,2"], "empty value"),
    (["seed=1", "seed=2"], "given twice"),
])
def test_parse_grid_errors(items, message):
    with pytest.raises(ConfigError, match=message):
        parse_grid(items)


def test_expand_grid_cross_product_and_seeds():
    points = expand_grid({"a": [1, 2, 3], "b": ["x", "y"]}, seeds=2, base_seed=10)
    assert len(points) == 3 * 2 * 2
    assert points[0] == {"a": 1, "b": "x", "seed": 10} and points[1] == {"a": 1, "b": "x", "seed": 11}
    assert points[2] == {"a": 1, "b": "y", "seed": 10} and points[-1] == {"a": 3, "b": "y", "seed": 11}
    assert len({json.dumps(p, sort_keys=True) for p in points}) == 12
    assert expand_grid({"seed": [4, 5]}) == [{"seed": 4}, {"seed": 5}]
    with pytest.raises(ConfigError, match="either --seeds or --grid seed"):
        expand_grid({"seed": [4, 5]}, seeds=2)
    with pytest.raises(ConfigError, match="at least 1"):
        expand_grid({"a": [1]}, seeds=0)
    assert run_name(3, {"data.source": "/x/y z.jsonl", "seed": 1}) == "003-data.source=_x_y_z.jsonl-seed=1"


def test_best_of_n_by_hand():
    # one prompt, four samples: rewards 1 3 2 0, gold .1 .2 .3 .4
    curve = best_of_n([[1.0, 3.0, 2.0, 0.0]], [[0.1, 0.2, 0.3, 0.4]], [4, 1, 2])
    assert [p["n"] for p in curve] == [1, 2, 4]
    n1, n2, n4 = curve
    assert n1["reward"] == pytest.approx(1.5) and n1["gold"] == pytest.approx(0.25) and n1["kl"] == 0
    # groups (1, 3) -> sample 1 (gold .2) and (2, 0) -> sample 2 (gold .3)
    assert n2["reward"] == pytest.approx(2.5) and n2["gold"] == pytest.approx(0.25)
    assert n4["reward"] == pytest.approx(3.0) and n4["gold"] == pytest.approx(0.2)
    assert n2["kl"] == pytest.approx(math.log(2) - 0.5) and n4["kl"] == pytest.approx(math.log(4) - 0.75)
    assert n4["sqrt_kl"] == pytest.approx(math.sqrt(best_of_n_kl(4)))
    # two prompts: standard error across prompts
    two = best_of_n([[0.0, 1.0], [5.0, 4.0]], [[0.0, 1.0], [0.0, 0.5]], [2])[0]
    assert two["gold"] == pytest.approx(0.5) and two["gold_se"] == pytest.approx(0.5)


def test_budget_sentence_says_where_gold_peaked():
    pts = [{"update": 0, "kl": 0.0, "sqrt_kl": 0.0, "gold": 0.30, "gold_se": 0.02, "reward": 0.1},
           {"update": 10, "kl": 1.0, "sqrt_kl": 1.0, "gold": 0.40, "gold_se": 0.02, "reward": 0.5},
           {"update": 20, "kl": 4.0, "sqrt_kl": 2.0, "gold": 0.35, "gold_se": 0.02, "reward": 0.9}]
    text = best_budget_sentence({"ppo": pts, "best": pts[1]})
    assert "update 10" in text and "KL 1.00" in text and "over-optimised" in text
    rising = [dict(p, gold=p["gold"] + p["update"]) for p in pts]
    assert "over-optimised" not in best_budget_sentence({"ppo": rising, "best": rising[2]})
    # DPO's policy has no updates: its point is "the final policy", never "update None"
    dpo = [pts[0], dict(pts[2], update=None)]
    text = best_budget_sentence({"ppo": dpo, "best": dpo[1]})
    assert "None" not in text and "Gold peaked at the final policy (KL 4.00" in text


def test_checkpoint_curve_needs_every_checkpoint_kept(tmp_path):
    with pytest.raises(ConfigError, match="set ppo.save_total_limit to at least 2"):
        load_config(RunConfig, {**TINY, "output_dir": str(tmp_path)}, ["eval.checkpoints=true"])
    with pytest.raises(ConfigError, match="eval.best_of_n: n must be at least 1, got 0"):
        load_config(RunConfig, {**TINY, "output_dir": str(tmp_path)},
                    ["eval.checkpoints=true", "ppo.save_total_limit=2", "eval.best_of_n=[0,2]"])


STUDY = ["eval.checkpoints=true", "eval.best_of_n=[1,2,4]", "ppo.save_total_limit=10"]


@pytest.fixture(scope="module")
def tiny_sweep(tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep") / "sw"
    lines: list[str] = []
    result = run_sweep(TINY, {"ppo.kl_coef": [0.0, 0.3]}, out, overrides=STUDY, log=lines.append)
    return out, result, lines


@pytest.mark.slow
def test_sweep_shares_upstream_stages(tiny_sweep):
    out, result, lines = tiny_sweep
    assert result.stage_runs == {"world": 1, "data": 1, "model": 1, "sft": 1, "reward": 1, "ppo": 2, "eval": 2}
    runs = sorted((out / "runs").iterdir())
    assert [r.name for r in runs] == ["000-ppo.kl_coef=0.0-seed=0", "001-ppo.kl_coef=0.3-seed=0"]
    # both runs see the one SFT and reward model, and have PPO folders of their own
    for stage in ("sft", "reward"):
        assert (runs[0] / stage).resolve() == (runs[1] / stage).resolve()
    assert (runs[0] / "ppo").resolve() != (runs[1] / "ppo").resolve()
    assert len(list((out / "stages").glob("sft-*.json"))) == 1 and len(list((out / "stages").glob("ppo-*.json"))) == 2
    # each run's manifest and report are complete
    for run in runs:
        manifest = json.loads((run / "manifest.json").read_text())
        assert all(s["status"] == "done" for s in manifest["stages"].values())
        assert (run / "report.html").is_file()
    assert any("shared, skipped" in line for line in lines)


def test_results_csv_has_a_row_per_run(tiny_sweep):
    out, result, _ = tiny_sweep
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert [r["ppo.kl_coef"] for r in rows] == ["0.0", "0.3"] and [r["seed"] for r in rows] == ["0", "0"]
    for row in rows:
        for key in ("eval.ppo.gold", "eval.ppo.kl", "eval.gold_gain", "reward.gold_agreement", "best.kl"):
            float(row[key])  # a number, not empty
    # the same SFT and reward model: identical SFT figures in both rows
    assert rows[0]["eval.sft.gold"] == rows[1]["eval.sft.gold"]
    assert rows[0]["reward.eval_accuracy"] == rows[1]["reward.eval_accuracy"]


def test_overoptimization_curve_and_best_of_n(tiny_sweep):
    out, _, _ = tiny_sweep
    run = out / "runs" / "000-ppo.kl_coef=0.0-seed=0"
    curve = json.loads((run / "eval" / "curve.json").read_text())
    assert [p["update"] for p in curve["ppo"]] == [0, 2, 4]  # SFT, the checkpoint at 2, the final policy
    eval_json = json.loads((run / "eval" / "eval.json").read_text())
    assert curve["ppo"][0]["gold"] == eval_json["sft"]["gold"] and curve["ppo"][0]["kl"] == 0
    assert curve["ppo"][-1]["gold"] == eval_json["ppo"]["gold"] and curve["ppo"][-1]["kl"] == eval_json["ppo"]["kl"]
    assert all(p["sqrt_kl"] == pytest.approx(math.sqrt(max(p["kl"], 0))) for p in curve["ppo"])
    assert [b["n"] for b in curve["best_of_n"]] == [1, 2, 4]
    assert [b["kl"] for b in curve["best_of_n"]] == pytest.approx([0.0, math.log(2) - 0.5, math.log(4) - 0.75])
    # picking by the reward model cannot lower the mean reward-model score of the pick (same samples)
    rewards = [b["reward"] for b in curve["best_of_n"]]
    assert rewards[0] <= rewards[1] <= rewards[2]
    assert curve["best"]["gold"] == max(p["gold"] for p in curve["ppo"])
    assert (run / "plots" / "overoptimization.png").stat().st_size > 10_000
    assert "KL budget" in (run / "report.html").read_text()
    sweep_html = (out / "report.html").read_text()
    assert "plots/overoptimization.png" in sweep_html and "Best KL budget over all runs" in sweep_html
    assert (out / "plots" / "gold_vs_ppo.kl_coef.png").is_file()


def test_rerun_of_a_finished_sweep_computes_nothing(tiny_sweep):
    out, _, _ = tiny_sweep
    again = run_sweep(TINY, {"ppo.kl_coef": [0.0, 0.3]}, out, overrides=STUDY, log=lambda _: None)
    assert sum(again.stage_runs.values()) == 0 and len(again.rows) == 2
    # a new grid value reuses everything upstream of PPO
    more = run_sweep(TINY, {"ppo.kl_coef": [0.0, 0.3, 1.0]}, out, overrides=STUDY, log=lambda _: None)
    assert more.stage_runs == {"world": 0, "data": 0, "model": 0, "sft": 0, "reward": 0, "ppo": 1, "eval": 1}


def test_sweep_cli_errors_are_one_line(tmp_path, capsys):
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(json.dumps(TINY))
    assert main(["sweep", str(cfg), "--out", str(tmp_path / "sw"), "--grid", "ppo.kl_coeff=0,1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "kl_coeff" in err and "did you mean 'kl_coef'" in err and "Traceback" not in err
    assert main(["sweep", str(cfg), "--out", str(tmp_path / "sw")]) == 2
    assert "nothing to vary" in capsys.readouterr().err
    assert main(["sweep", str(cfg), "--out", str(tmp_path / "sw"), "--grid", "ppo.num_mini_batches=3"]) == 2
    assert "run 000-ppo.num_mini_batches=3-seed=0" in capsys.readouterr().err
    assert not (tmp_path / "sw").exists()  # nothing is started when any run's config is wrong


@pytest.mark.slow
def test_a_sweep_over_rl_methods_shares_sft_and_reward_and_compares_them_over_seeds(tmp_path):
    """`--grid ppo.algorithm=ppo,rloo --seeds 2`: one SFT and reward model per seed, shared by both
    methods; each method the same episodes; comparison.csv and the report average over the seeds."""
    out = tmp_path / "methods"
    result = run_sweep(TINY, {"ppo.algorithm": ["ppo", "rloo"]}, out, seeds=2, log=lambda _: None,
                       overrides=["eval.best_of_n=[1,2]", "ppo.num_updates=2", "eval.max_prompts=8"])
    assert result.stage_runs == {"world": 2, "data": 2, "model": 2, "sft": 2, "reward": 2, "ppo": 4, "eval": 4}
    runs = {r.name: r for r in (out / "runs").iterdir()}
    assert sorted(runs) == ["000-ppo.algorithm=ppo-seed=0", "001-ppo.algorithm=ppo-seed=1",
                            "002-ppo.algorithm=rloo-seed=0", "003-ppo.algorithm=rloo-seed=1"]
    for seed in (0, 1):
        ppo, rloo = runs[f"00{seed}-ppo.algorithm=ppo-seed={seed}"], runs[f"00{seed + 2}-ppo.algorithm=rloo-seed={seed}"]
        assert (ppo / "sft").resolve() == (rloo / "sft").resolve()
        assert (ppo / "reward").resolve() == (rloo / "reward").resolve()
        a, b = (json.loads((r / "ppo" / "metrics.json").read_text()) for r in (ppo, rloo))
        assert (a["algorithm"], b["algorithm"]) == ("ppo", "rloo")
        assert a["episode"] == b["episode"] == 2 * 16  # the same sampled episodes
        assert b["params_held"] < a["params_held"]  # no value model
    assert (runs["000-ppo.algorithm=ppo-seed=0"] / "sft").resolve() != (runs["001-ppo.algorithm=ppo-seed=1"] / "sft").resolve()
    groups = list(csv.DictReader((out / "comparison.csv").open()))
    assert [g["config"] for g in groups] == ["ppo.algorithm=ppo", "ppo.algorithm=rloo"]
    rows = list(csv.DictReader((out / "results.csv").open()))
    for g in groups:
        gains = [float(r["eval.gold_gain"]) for r in rows if f"ppo.algorithm={r['ppo.algorithm']}" == g["config"]]
        assert g["seeds"] == "2" and float(g["eval.gold_gain"]) == pytest.approx(sum(gains) / 2)
        assert float(g["eval.gold_gain_se"]) == pytest.approx(abs(gains[0] - gains[1]) / 2)
        assert float(g["ppo.wall_time_s"]) > 0
    html = (out / "report.html").read_text()
    assert "Compared over seeds" in html and "Which wins at each KL budget" in html, html
    assert html.count("KL ≤ ") == 3, html  # a budget at each method's KL and at best-of-2's
    assert (out / "plots" / "gain_vs_kl.png").stat().st_size > 10_000
