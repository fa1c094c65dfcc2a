"""The chained run: end to end on a tiny config, skip when unchanged, rerun downstream on
change, resume after SIGKILL during PPO, and config errors as one line."""

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from rlhfkit.cli import main
from rlhfkit.config import load_config
from rlhfkit.errors import ConfigError
from rlhfkit.pipeline import RunConfig, run_chain
from weight_helpers import same_weights

REPO = Path(__file__).resolve().parents[1]

TINY = {
    "seed": 0,
    "world": {"trees": 240},
    "data": {"val_fraction": 0.2},
    "model": {"size": "micro", "vocab_size": 512},
    "sft": {"learning_rate": 3e-3, "num_train_epochs": 1, "per_device_train_batch_size": 32, "save_steps": 1000,
            "train_sampling_strategy": "group_by_length"},
    "reward": {"learning_rate": 1e-3, "num_train_epochs": 1, "per_device_train_batch_size": 32, "save_steps": 1000,
               "train_sampling_strategy": "group_by_length", "eval_strategy": "steps", "eval_steps": 3},
    # micro-batch 4: the same config divides on 1 and 2 processes (gradient accumulation 2 and 1)
    "ppo": {"num_updates": 4, "rollout_batch_size": 16, "num_mini_batches": 2, "per_device_train_batch_size": 4,
            "num_ppo_epochs": 1, "response_length": 12, "learning_rate": 1e-4, "save_steps": 2, "sample_every": 2},
    "eval": {"max_prompts": 16, "samples_per_prompt": 2, "num_examples": 3},
}


def tiny_config(out: Path, **changes) -> RunConfig:
    return load_config(RunConfig, {**TINY, "output_dir": str(out)}, [f"{k}={v}" for k, v in changes.items()])


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("chain") / "run"
    result = run_chain(tiny_config(out), log=lambda _: None)
    return out, result


def test_chain_end_to_end(finished_run):
    out, result = finished_run
    assert result.ran == ["world", "data", "model", "sft", "reward", "ppo", "eval"]
    summary = json.loads((out / "summary.json").read_text())
    for key in ("sft.eval_loss", "reward.eval_accuracy", "reward.gold_agreement", "eval.sft.reward", "eval.sft.gold",
                "eval.sft.length", "eval.ppo.reward", "eval.ppo.gold", "eval.ppo.length", "eval.ppo.kl",
                "eval.win_rate_gold", "eval.win_rate_reward"):
        assert isinstance(summary[key], float), key
    assert 0 <= summary["eval.win_rate_gold"] <= 1 and 0 <= summary["eval.ppo.gold"] <= 1
    assert set(summary["wall_time_s"]) == {"world", "data", "model", "sft", "reward", "ppo", "eval"}
    manifest = json.loads((out / "manifest.json").read_text())
    assert all(s["status"] == "done" for s in manifest["stages"].values())
    html = (out / "report.html").read_text()
    assert "<img" in html and "Samples" in html and (out / "report.md").is_file()
    assert (out / "plots" / "ppo_curves.png").is_file() and (out / "plots" / "reward_vs_gold.png").is_file()
    from rlhfkit.report import summary_text

    text = summary_text(out, summary)  # what the run prints at the end: one screen, the figures and the report
    assert len(text.splitlines()) <= 20 and text.endswith(f"report: {out / 'report.html'}")
    assert f"{summary['eval.ppo.gold']:.4g} ± {summary['eval.ppo.gold_se']:.2g}" in text


def test_rerun_skips_unchanged_and_reruns_downstream_of_a_change(finished_run, tmp_path, monkeypatch):
    import rlhfkit.pipeline
    import rlhfkit.ppo
    import rlhfkit.sft

    out, _ = finished_run
    with monkeypatch.context() as patched:  # a skipped stage loads no model: its function is never entered
        for module, name in ((rlhfkit.sft, "train_sft"), (rlhfkit.ppo, "train_ppo"), (rlhfkit.pipeline, "evaluate_stage")):
            patched.setattr(module, name, lambda *a, name=name, **k: pytest.fail(f"{name} ran for an unchanged stage"))
        again = run_chain(tiny_config(out), log=lambda _: None)
    assert again.ran == [] and len(again.skipped) == 7
    ppo_model = (out / "ppo" / "model" / "model.safetensors").stat().st_mtime_ns
    sft_model = (out / "sft" / "model" / "model.safetensors").stat().st_mtime_ns
    changed = run_chain(tiny_config(out, **{"ppo.kl_coef": 0.2}), log=lambda _: None)
    assert changed.ran == ["ppo", "eval"]
    assert (out / "sft" / "model" / "model.safetensors").stat().st_mtime_ns == sft_model
    assert (out / "ppo" / "model" / "model.safetensors").stat().st_mtime_ns != ppo_model


@pytest.mark.slow
def test_kill_during_ppo_then_resume(tmp_path):
    out = tmp_path / "run"
    cfg_path = tmp_path / "tiny.yaml"
    cfg = {**TINY, "output_dir": str(out)}
    # long enough that the kill lands mid-PPO; keep every checkpoint so the poll cannot miss one
    cfg["ppo"] = {**TINY["ppo"], "num_updates": 40, "save_total_limit": 100}
    cfg_path.write_text(yaml.safe_dump(cfg))
    cmd = [sys.executable, "-m", "rlhfkit.cli", "run", str(cfg_path)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    log = open(tmp_path / "run.log", "w")
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    checkpoint = out / "ppo" / "checkpoints" / "update-000002" / "state.json"
    deadline = time.time() + 600
    while not checkpoint.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    assert checkpoint.exists(), "no PPO checkpoint; the run said: " + (tmp_path / "run.log").read_text()[-2000:]
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "the run finished before it could be killed"
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["stages"]["ppo"]["status"] == "running"
    sft_mtime = (out / "sft" / "model" / "model.safetensors").stat().st_mtime_ns
    logs = []
    result = run_chain(load_config(RunConfig, cfg_path), log=logs.append)
    assert result.ran == ["ppo", "eval"]
    assert any("ppo: resuming" in line for line in logs)
    assert (out / "sft" / "model" / "model.safetensors").stat().st_mtime_ns == sft_mtime
    rows = [json.loads(line) for line in (out / "ppo" / "metrics.jsonl").read_text().splitlines()]
    assert [r["update"] for r in rows] == list(range(1, 41))


def _launch_run(cfg_path: Path, log: Path, *flags: str, command: tuple[str, ...] = ("run",),
                **launch_env: str) -> subprocess.Popen:
    """``rlhfkit run CONFIG`` (or another ``command``) on 2 CPU processes (gloo) through ``accelerate launch``."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    accelerate = Path(sys.executable).parent / "accelerate"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1", **launch_env}
    env.pop("WORLD_SIZE", None)
    return subprocess.Popen([str(accelerate), "launch", *(flags or ("--multi_gpu",)), "--num_processes", "2",
                             "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                             "--main_process_port", str(port), "-m", "rlhfkit.cli", command[0], str(cfg_path),
                             *command[1:]],
                            cwd=REPO, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT)


@pytest.mark.slow
def test_two_process_run_killed_and_resumed_equals_an_uninterrupted_one(tmp_path):
    """`rlhfkit run` under a 2-process launch: the main process runs world, data, model and eval and
    writes the manifest, both train; SIGKILLed mid-PPO and run again with 2 processes, it resumes PPO
    and ends with the uninterrupted 2-process run's outputs (the same seeds, the same split of work).
    The same config under FSDP, DeepSpeed ZeRO-2 and ZeRO-3 launches ends there too."""
    import psutil  # accelerate's dependency

    def config(name: str) -> Path:
        cfg = {**TINY, "output_dir": str(tmp_path / name)}
        cfg["ppo"] = {**TINY["ppo"], "num_updates": 40, "save_total_limit": 100}  # long enough to kill mid-PPO
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        return path

    straight = _launch_run(config("straight"), tmp_path / "straight.log")
    assert straight.wait(timeout=600) == 0, (tmp_path / "straight.log").read_text()[-3000:]
    printed = (tmp_path / "straight.log").read_text()
    assert printed.count("[1/7] world: running") == 1 and printed.count("run: done") == 1  # the main process logs
    assert "PPO batch arithmetic (2 processes)" in printed

    killed = tmp_path / "killed"
    proc = _launch_run(config("killed"), tmp_path / "killed.log")
    checkpoint = killed / "ppo" / "checkpoints" / "update-000002" / "state.json"
    deadline = time.time() + 600
    while not checkpoint.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert checkpoint.exists(), (tmp_path / "killed.log").read_text()[-3000:]
    for process in [*psutil.Process(proc.pid).children(recursive=True), psutil.Process(proc.pid)]:
        process.kill()  # SIGKILL: the workers (in sessions of their own under torchrun), then the launcher
    proc.wait(timeout=60)
    assert json.loads((killed / "manifest.json").read_text())["stages"]["ppo"]["status"] == "running"
    assert not (killed / "ppo" / "model").exists(), "the run finished before it could be killed"

    again = _launch_run(config("killed"), tmp_path / "again.log")
    assert again.wait(timeout=600) == 0, (tmp_path / "again.log").read_text()[-3000:]
    printed = (tmp_path / "again.log").read_text()
    for stage in ("world", "data", "model", "sft", "reward"):
        assert f"{stage}: unchanged, skipped" in printed, stage
    assert "ppo: resuming" in printed and "resuming from" in printed

    a, b = tmp_path / "straight", killed
    for name in ("sft/model/model.safetensors", "reward/model/model.safetensors", "ppo/model/model.safetensors"):
        same_weights(a, b, name, atol=1e-6)  # the same arithmetic in the same order: float32 rounding at most
    rows_a = [json.loads(line) for line in (a / "ppo" / "metrics.jsonl").read_text().splitlines()]
    rows_b = [json.loads(line) for line in (b / "ppo" / "metrics.jsonl").read_text().splitlines()]
    assert [r["update"] for r in rows_b] == list(range(1, 41))
    for ra, rb in zip(rows_a, rows_b):
        for key in set(ra) - {"eps", "elapsed_s"}:
            assert rb[key] == pytest.approx(ra[key], rel=1e-5, abs=1e-6), (ra["update"], key)
    sa, sb = (json.loads((d / "summary.json").read_text()) for d in (a, b))
    for key, value in sa.items():
        timing = any(word in key for word in ("time", "elapsed", "eps", "per_second"))
        if isinstance(value, float) and not timing:
            assert sb[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key

    # the same config under FSDP (the RL stage's policy and value sharded): the data-parallel run's
    # outputs, to the float32 rounding of another summation order (test_ppo_trainer.py says which)
    fsdp = _launch_run(config("fsdp"), tmp_path / "fsdp.log", "--use_fsdp", "--fsdp_version", "2")
    assert fsdp.wait(timeout=600) == 0, (tmp_path / "fsdp.log").read_text()[-3000:]
    assert "FSDP: the policy and value model sharded over 2 processes (one unit per decoder layer), the reference" in (tmp_path / "fsdp.log").read_text()
    for name in ("sft/model/model.safetensors", "reward/model/model.safetensors", "ppo/model/model.safetensors"):
        same_weights(a, tmp_path / "fsdp", name)

    # and under DeepSpeed ZeRO-2 and ZeRO-3 (what deepspeed_zero2/3.yaml export; on the CPU accelerate keeps
    # the TRL stages data parallel, the RL stage partitions its models' state itself). The tiny chain's
    # responses end at EOS at different steps on the two processes: sampling must not be a collective
    for stage in (2, 3):
        name = f"zero{stage}"
        zero = _launch_run(config(name), tmp_path / f"{name}.log", ACCELERATE_USE_DEEPSPEED="true",
                           ACCELERATE_DEEPSPEED_ZERO_STAGE=str(stage))
        assert zero.wait(timeout=300) == 0, (tmp_path / f"{name}.log").read_text()[-3000:]
        assert f"DeepSpeed ZeRO-{stage}: the optimizer state" in (tmp_path / f"{name}.log").read_text()
        for weights in ("sft/model/model.safetensors", "reward/model/model.safetensors", "ppo/model/model.safetensors"):
            same_weights(a, tmp_path / name, weights)


@pytest.mark.slow
def test_two_process_sweep_shares_stages_and_writes_once(tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump({**TINY, "output_dir": str(tmp_path / "unused")}))
    out = tmp_path / "sweep"
    proc = _launch_run(path, tmp_path / "sweep.log", "--multi_gpu",
                       command=("sweep", "--out", str(out), "--grid", "ppo.kl_coef=0.05,0.1"))
    assert proc.wait(timeout=600) == 0, (tmp_path / "sweep.log").read_text()[-3000:]
    printed = (tmp_path / "sweep.log").read_text()
    assert printed.count("sweep: 2 runs done") == 1  # the main process logs
    assert "stages computed: world 1, data 1, model 1, sft 1, reward 1, ppo 2, eval 2" in printed
    rows = (out / "results.csv").read_text().splitlines()
    assert len(rows) == 3 and rows[1].split(",")[1:3] == ["0.05", "0"] and rows[2].split(",")[1:3] == ["0.1", "0"]
    for run in ("000-ppo.kl_coef=0.05-seed=0", "001-ppo.kl_coef=0.1-seed=0"):
        assert (out / "runs" / run / "sft").is_symlink()  # linked to the one shared SFT stage
        assert json.loads((out / "runs" / run / "manifest.json").read_text())["stages"]["eval"]["status"] == "done"


def test_a_zero1_launch_of_an_rl_chain_is_refused_before_any_stage(tmp_path, monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")  # what a DeepSpeed launch with zero_stage: 1 exports
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "1")
    with pytest.raises(ConfigError, match="ZeRO stage 1: the RL stage runs ZeRO-2 or ZeRO-3"):
        run_chain(tiny_config(tmp_path / "run"), log=lambda _: None)
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_evaluation_spread_over_two_processes_gives_the_one_process_figures(finished_run, tmp_path):
    """`rlhfkit eval` under a 2-process launch spreads its draws and curve points (each seeds its own
    generator) and writes the very files one process writes."""
    run, _ = finished_run
    assert (run / "ppo" / "checkpoints" / "update-000002").is_dir()  # a curve point besides best-of-n

    def config(name: str) -> Path:
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump({
            "policy": str(run / "ppo"), "reference": str(run / "sft"), "reward_model": str(run / "reward"),
            "data": str(run / "data"), "output_dir": str(tmp_path / name), "max_prompts": 16, "samples_per_prompt": 2,
            "temperature": 1.0, "response_length": 12, "num_examples": 3, "checkpoints": True, "best_of_n": [1, 2]}))
        return path

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}  # the launched processes' thread count
    env.pop("WORLD_SIZE", None)
    one = subprocess.run([sys.executable, "-m", "rlhfkit.cli", "eval", str(config("one"))], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    two = _launch_run(config("two"), tmp_path / "two.log", command=("eval",))
    assert two.wait(timeout=600) == 0, (tmp_path / "two.log").read_text()[-3000:]
    for name in ("eval.json", "curve.json", "examples.json", "scatter.json"):
        a, b = (json.loads((tmp_path / d / name).read_text()) for d in ("one", "two"))
        assert a == b, name
    curve = json.loads((tmp_path / "two" / "curve.json").read_text())
    assert [p["update"] for p in curve["ppo"]] == [0, 2, 4] and len(curve["best_of_n"]) == 2


@pytest.mark.slow
def test_reward_ensemble_trains_seeded_members_and_ppo_optimises_their_combination(finished_run, tmp_path):
    out = tmp_path / "run"
    result = run_chain(tiny_config(out, reward_ensemble=3, **{"ppo.ensemble_reduction": "mean_minus_std"}),
                       log=lambda _: None)
    members = [out / "reward", out / "reward" / "members" / "1", out / "reward" / "members" / "2"]
    seeds = [json.loads((m / "stage_config.json").read_text())["seed"] for m in members]
    assert seeds == [0, 1, 2]
    # member 0 is exactly the single reward model of the same config (same seed, same data)
    single, _ = finished_run
    assert (members[0] / "model" / "model.safetensors").read_bytes() == \
        (single / "reward" / "model" / "model.safetensors").read_bytes()
    from rlhfkit.reward.ensemble import ensemble_metrics

    summary = result.summary
    assert summary["reward.ensemble_size"] == 3
    assert summary["reward.ensemble_gold_agreement"] == \
        ensemble_metrics(members, "mean_minus_std")["ensemble_gold_agreement"]
    assert summary["reward.gold_agreement"] == json.loads((members[0] / "metrics.json").read_text())["gold_agreement"]
    rows = [json.loads(line) for line in (out / "ppo" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["objective/ensemble_std"] > 0 for r in rows)  # three different models disagree somewhere
    assert "Reward ensemble of 3: agreement with gold" in (out / "report.html").read_text()
    # the TRL peer benchmark on this ensemble: ours reduces the three by their minimum, TRL sums them weighted
    script = Path(__file__).resolve().parent.parent / "benchmarks" / "trl_peers.py"
    proc = subprocess.run([sys.executable, str(script), str(out), "--systems", "rlhfkit-rloo-ensemble-min,trl-rloo-ensemble",
                           "--updates", "1", "--prompts", "4", "--threads", "1", "--out", str(tmp_path / "peers")],
                          capture_output=True, text=True, timeout=600, cwd=script.parent,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    peers = json.loads(proc.stdout.strip().splitlines()[-1])["rows"]
    assert [(r["system"], r["reward_models"]) for r in peers] == [("rlhfkit-rloo-ensemble-min", 3),
                                                                  ("trl-rloo-ensemble", 3)]
    ours = tmp_path / "peers" / "rlhfkit-rloo-ensemble-min-seed0" / "train"
    # logged only when the RL stage's reward_model is several folders; > 0: three models disagree
    assert json.loads((ours / "metrics.jsonl").read_text().splitlines()[0])["objective/ensemble_std"] > 0
    assert (tmp_path / "peers" / "trl-rloo-ensemble-seed0" / "train" / "model" / "model.safetensors").is_file()
    single = subprocess.run([sys.executable, str(script), str(finished_run[0]), "--systems", "trl-rloo-ensemble"],
                            capture_output=True, text=True, cwd=script.parent)
    assert single.returncode == 2 and "has one reward model; train the chain with reward_ensemble=3" in single.stderr
    # another reduction: the members are not retrained (the reduction is the RL stage's), and the summary's
    # ensemble figures are the new combination's, not the one the members were first combined with
    old, new = (ensemble_metrics(members, reduction) for reduction in ("mean_minus_std", "min"))
    assert old["ensemble_gold_agreement"] != new["ensemble_gold_agreement"]  # the two differ on these pairs
    again = run_chain(tiny_config(out, reward_ensemble=3, **{"ppo.ensemble_reduction": "min"}), log=lambda _: None)
    assert again.ran == ["ppo", "eval"]
    assert again.summary["reward.ensemble_gold_agreement"] == new["ensemble_gold_agreement"]
    assert json.loads((out / "summary.json").read_text())["reward.ensemble_gold_agreement"] == new["ensemble_gold_agreement"]


def test_trl_peer_reward_weights_make_trls_weighted_sum_the_ensemble_mean(tmp_path, monkeypatch):
    """TRL sums reward functions with weights; with w_k = 1/(K sigma_k) its reward is rlhfkit's mean of
    standardised scores plus a constant, sum_k mu_k/(K sigma_k), which RLOO's and GRPO's baselines remove.
    Members (mu, sigma) = (1, 2) and (-1, 0.5): w = (1/4, 1); scores (3, 0): ours ((3-1)/2 + (0+1)/0.5)/2
    = 1.5, TRL's 3/4 + 0 = 0.75; scores (-1, 2): ours (-1 + 6)/2 = 2.5, TRL's -1/4 + 2 = 1.75."""
    import torch

    from rlhfkit.core import ensemble_reward

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parent.parent / "benchmarks"))
    import trl_peers

    members = []
    for i, (mean, std) in enumerate([(1.0, 2.0), (-1.0, 0.5)]):
        members.append(tmp_path / f"m{i}")
        members[-1].mkdir()
        (members[-1] / "metrics.json").write_text(json.dumps({"eval_reward_mean": mean, "eval_reward_std": std}))
    weights = trl_peers.trl_reward_weights(members)
    assert weights == [0.25, 1.0]
    raw = [[3.0, -1.0], [0.0, 2.0]]  # [K, B]
    ours, _ = ensemble_reward(torch.tensor([[(s - m) / d for s in row] for row, (m, d) in zip(raw, [(1, 2), (-1, .5)])]))
    theirs = [sum(w * raw[k][b] for k, w in enumerate(weights)) for b in range(2)]
    assert ours.tolist() == [1.5, 2.5] and theirs == [0.75, 1.75]
    (run := tmp_path / "run").mkdir()
    assert trl_peers.reward_members(run) == [run / "reward"]  # no config.json: one reward model
    (run / "config.json").write_text(json.dumps({"reward_ensemble": 3}))  # what the chain trained
    assert trl_peers.reward_members(run) == [run / "reward", run / "reward" / "members" / "1",
                                             run / "reward" / "members" / "2"]


@pytest.mark.parametrize("override, message", [
    ("ppo.kl_coeff=0.1", "unknown key 'ppo.kl_coeff' (did you mean 'kl_coef'?)"),
    ("sft.num_train_epochs=many", "sft.num_train_epochs: expected a number, got 'many'"),
    ("data.source=/nonexistent/export.jsonl", "data.source: /nonexistent/export.jsonl: no such file or folder"),
    ("ppo.num_mini_batches=3", "does not split into num_mini_batches=3"),
])
def test_config_errors_one_line_no_traceback(tmp_path, capsys, override, message):
    cfg_path = tmp_path / "tiny.yaml"
    cfg_path.write_text(yaml.safe_dump({**TINY, "output_dir": str(tmp_path / "run")}))
    assert main(["run", str(cfg_path), override]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "run").exists()
    with pytest.raises(ConfigError) as raised:  # the API raises what the CLI prints
        load_config(RunConfig, cfg_path, [override])
    assert message in str(raised.value) and f"rlhfkit: error: {raised.value}" == err.strip()


def test_shipped_configs_validate():
    """Every shipped config gives its exact command in its header, loads and validates (no download)."""
    from rlhfkit.cli import CONFIG_STAGES, _load

    paths = sorted((REPO / "configs").glob("*.yaml"))
    assert paths
    for path in paths:
        found = re.search(r"rlhfkit(?:\.cli)? (sft|reward|ppo|run|sweep) \S*" + re.escape(path.name), path.read_text())
        assert found, f"{path.name}: the header must give the exact command"
        if found.group(1) == "sweep":  # a run config with a sweep section: every run of its grid validates
            from rlhfkit.sweep import plan_sweep

            assert len(plan_sweep(path, {}, "runs/x").runs) > 1
            continue
        module, cls_name, _, _ = CONFIG_STAGES[found.group(1)]
        load_config(_load(module, cls_name), path)


def test_a_damaged_output_of_a_finished_stage_is_noticed_and_the_stage_redone(finished_run):
    out, _ = finished_run
    trees = out / "world" / "trees.jsonl"
    original = trees.read_bytes()
    trees.write_bytes(original[: len(original) // 3])  # a copy cut short, a disk that lost a block
    logs = []
    result = run_chain(load_config(RunConfig, json.loads((out / "config.json").read_text())), log=logs.append)
    assert result.ran == ["world"]  # the same config and inputs: everything downstream is still valid
    assert any("world: trees.jsonl does not match its recorded SHA-256 (truncated or changed) since it finished; "
               "redoing the stage" in line for line in logs), logs
    assert trees.read_bytes() == original  # the world generator is deterministic


def test_evaluation_is_a_stage_on_any_two_folders(finished_run, tmp_path, capsys):
    """``rlhfkit eval`` (and ``evaluate_stage``) on the chain's SFT and PPO folders reproduces the
    chain's own eval.json exactly: the chain runs the same stage function."""
    out, _ = finished_run
    chain_eval = json.loads((out / "eval" / "eval.json").read_text())
    ppo = TINY["ppo"]
    config = {"policy": str(out / "ppo"), "reference": str(out / "sft"), "reward_model": str(out / "reward"),
              "data": str(out / "data"), "temperature": 1.0, "response_length": ppo["response_length"],
              "max_prompt_length": 256, **TINY["eval"]}
    (tmp_path / "eval.yaml").write_text(yaml.safe_dump(config))
    main(["eval", str(tmp_path / "eval.yaml"), "--out", str(tmp_path / "ev")])
    assert "eval: done" in capsys.readouterr().out
    got = json.loads((tmp_path / "ev" / "eval.json").read_text())
    assert got == chain_eval  # gold judged automatically: the world's prompts are all known to it
    assert {p.name for p in (tmp_path / "ev").iterdir()} >= {"eval.json", "examples.json", "scatter.json"}
    # the same from Python, without gold: no gold figures, the reward figures unchanged
    from rlhfkit.evaluate import EvalStageConfig, evaluate_stage

    result = evaluate_stage(EvalStageConfig(**{**config, "gold": "off", "output_dir": str(tmp_path / "ev2")}))
    assert result.metrics["gold_gain"] is None and result.metrics["reward_gain"] == chain_eval["reward_gain"]


def test_evaluation_refuses_a_users_folder_and_bad_config_in_one_line(finished_run, tmp_path, capsys):
    out, _ = finished_run
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    args = [f"policy={out / 'ppo'}", f"reference={out / 'sft'}", f"data={out / 'data'}"]
    (tmp_path / "e.yaml").write_text("max_prompts: 2\n")
    assert main(["eval", str(tmp_path / "e.yaml"), *args, "--out", str(mine)]) == 2
    err = capsys.readouterr().err
    assert "holds files rlhfkit did not write" in err and err.count("\n") == 1
    assert [p.name for p in mine.iterdir()] == ["notes.txt"] and (mine / "notes.txt").read_text() == "keep me"
    # the policy's own PPO folder: refused, its model and metrics left as they were
    before = sorted(p.name for p in (out / "ppo").iterdir())
    assert main(["eval", str(tmp_path / "e.yaml"), *args, "--out", str(out / "ppo")]) == 2
    err = capsys.readouterr().err
    assert "holds the output of the ppo stage" in err and err.count("\n") == 1
    assert sorted(p.name for p in (out / "ppo").iterdir()) == before and (out / "ppo" / "model").is_dir()
    assert main(["eval", str(tmp_path / "e.yaml"), *args, "gold=maybe", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "gold: must be auto, on or off" in err and err.count("\n") == 1 and not (tmp_path / "x").exists()


@pytest.mark.slow
def test_dpo_in_place_of_reward_and_ppo_learns_the_small_worlds_preferences(tmp_path):
    """`ppo.algorithm: dpo`: sft -> dpo -> eval; DPO's implicit reward ranks the held-out pairs above
    chance (0.5), where it started at 0 (policy = reference: every implicit reward is 0). The
    annotators are noiseless here, so the held-out labels are the gold judge's order."""
    out = tmp_path / "run"
    result = run_chain(tiny_config(out, **{"world.annotator_noise": 0.0, "ppo.algorithm": "dpo",
                                           "dpo.learning_rate": 3e-3, "dpo.num_train_epochs": 2,
                                           "dpo.per_device_train_batch_size": 16, "dpo.save_steps": 1000}),
                       log=lambda _: None)
    metrics = json.loads((out / "ppo" / "metrics.json").read_text())
    assert metrics["stage"] == "dpo" and metrics["eval_reward_accuracy_start"] == 0.0
    n = metrics["eval_pairs"]
    se = math.sqrt(0.25 / n)  # binomial SE at chance
    assert metrics["eval_reward_accuracy"] > 0.5 + 2 * se, (metrics["eval_reward_accuracy"], n)
    summary = result.summary
    assert summary["ppo.algorithm"] == "dpo" and summary["ppo.wall_time_s"] > 0
    assert summary["eval.gold_gain"] is not None and summary["eval.ppo.kl"] > 0  # evaluated as any aligned policy
    assert not (out / "ppo" / "metrics.jsonl").exists()  # no RL ran
    assert (out / "reward" / "model").is_dir()  # the reward model still scores the evaluation


@pytest.mark.slow
def test_the_trl_peer_benchmark_runs_every_system_on_a_finished_chain(finished_run, tmp_path):
    """benchmarks/trl_peers.py on the tiny chain, one update each: rlhfkit's rloo and grpo and TRL's
    RLOOTrainer and GRPOTrainer train from the same SFT folder against the same reward model, and
    rlhfkit's evaluation scores each policy."""
    run, _ = finished_run
    script = Path(__file__).resolve().parent.parent / "benchmarks" / "trl_peers.py"
    systems = ["rlhfkit-rloo", "trl-rloo", "rlhfkit-rloo-sequence-ptx", "rlhfkit-grpo", "trl-grpo", "rlhfkit-ppo"]
    proc = subprocess.run([sys.executable, str(script), str(run), str(run), "--seeds", "0,1", "--systems",
                           ",".join(systems), "--updates", "1", "--prompts", "4", "--threads", "1",
                           "--out", str(tmp_path / "peers")], capture_output=True, text=True, timeout=900,
                          cwd=script.parent, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert lines[0].startswith("machine: ")
    rows = json.loads(lines[-1])["rows"]
    assert [(r["system"], r["seed"]) for r in rows] == [(s, seed) for seed in (0, 1) for s in systems]
    for r in rows:
        assert r["train_s"] > 0 and math.isfinite(r["kl"]) and r["gold_gain"] is not None
    for mine, peer in (("rlhfkit-rloo", "trl-rloo"), ("rlhfkit-rloo-sequence-ptx", "trl-rloo"),
                       ("rlhfkit-grpo", "trl-grpo")):
        assert f"  {mine}: {peer} / {mine} training time, median over seeds: " in proc.stdout
    across = proc.stdout[proc.stdout.index("across seeds [0, 1]"):].splitlines()[1:]
    assert sum("paired gold" in line for line in across) == 3  # each rlhfkit system against its TRL peer
    one_run_dir = subprocess.run([sys.executable, str(script), str(run), str(run), "--seeds", "0,1,2"],
                                 capture_output=True, text=True, cwd=script.parent)
    assert one_run_dir.returncode == 2 and "one per seed (3); got 2" in one_run_dir.stderr
    with_ptx = json.loads((tmp_path / "peers" / "rlhfkit-rloo-sequence-ptx-seed0" / "train" / "metrics.jsonl")
                          .read_text().splitlines()[0])
    assert with_ptx["loss/ptx_avg"] > 0  # the variant trained on the SFT demonstrations too
    ppo = tmp_path / "peers" / "rlhfkit-ppo-seed0" / "train"  # PPO: a value model, one sample of each of 64 prompts
    first = json.loads((ppo / "metrics.jsonl").read_text().splitlines()[0])
    assert first["loss/value_avg"] > 0 and "reward_std" not in first  # no groups: one sample per prompt
    unknown = subprocess.run([sys.executable, str(script), str(run), "--systems", "trl-rloo-ptx"],
                             capture_output=True, text=True, cwd=script.parent)
    assert unknown.returncode == 2 and "system 'trl-rloo-ptx': rlhfkit-<rloo|grpo|ppo>[-sequence][-ptx]" in unknown.stderr
    # each TRL policy was saved and evaluated against the same SFT reference
    for system in ("trl-rloo", "trl-grpo"):
        assert (tmp_path / "peers" / f"{system}-seed0" / "train" / "model" / "model.safetensors").is_file()
    zero_lr = subprocess.run([sys.executable, str(script), str(run), "--learning-rate", "0"],
                             capture_output=True, text=True, cwd=script.parent)
    assert zero_lr.returncode == 2 and "--learning-rate must be > 0, got 0.0" in zero_lr.stderr


@pytest.mark.slow
def test_the_launch_benchmark_runs_the_rl_stage_under_one_two_and_sharded_processes(finished_run, tmp_path):
    """benchmarks/launches.py on the tiny chain, one update each: 1 process, 2 processes data parallel,
    FSDP, ZeRO-2 and ZeRO-3. The 2-process launches sample the same episodes (each process its own
    generator), so their first update's score is the same: what differs is only how the state is held."""
    run, _ = finished_run
    script = Path(__file__).resolve().parent.parent / "benchmarks" / "launches.py"
    proc = subprocess.run([sys.executable, str(script), str(run), "--updates", "1", "--repeats", "1",
                           "--micro-batch", "4"], capture_output=True, text=True, timeout=600, cwd=script.parent,
                          env={**os.environ, "TMPDIR": str(tmp_path)})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.startswith("machine: ")
    rows = json.loads(proc.stdout.strip().splitlines()[-1])["rows"]
    assert [r["launch"] for r in rows] == ["1 process", "2 processes, DDP", "2 processes, FSDP", "2 processes, ZeRO-2",
                                           "2 processes, ZeRO-3"]
    assert all(r["loop_s_per_update"] > 0 and r["command_s"] > r["loop_s_per_update"] for r in rows)
    for row in rows[2:]:
        assert row["score"] == pytest.approx(rows[1]["score"], rel=1e-4, abs=1e-6), row["launch"]
    assert not list(tmp_path.glob("rlhfkit-launches-*"))  # its own work folder removed (torchrun leaves its own)
    not_a_run = subprocess.run([sys.executable, str(script), str(run / "sft")], capture_output=True, text=True,
                               cwd=script.parent)
    assert not_a_run.returncode == 2 and "not a finished `rlhfkit run` folder" in not_a_run.stderr
