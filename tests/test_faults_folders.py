"""Nothing lost, round 2: folders and stale results.

A run or stage written inside another run's or stage's folder (at any depth) is refused before
anything is written, with one line and exit 2, and the other run's files stay byte for byte;
a rerun that changes a stage withdraws every result that read the old output the moment it
starts, so an interrupt never leaves an earlier configuration's figures presented as current;
a stage redone because its output was damaged sends the stages after it round again only when
it came out different.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from rlhfkit.artifacts import OWNER_FILE, claim_dir, claim_problem, held
from rlhfkit.errors import OutputError
from rlhfkit.pipeline import STAGES, _Chain, downstream, run_chain, stage_inputs
from test_pipeline import TINY, tiny_config
from cli_helpers import one_line_error, snapshot


@pytest.fixture
def finished(tiny_run) -> Path:
    return tiny_run


@pytest.fixture
def run_copy(finished, tmp_path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(finished, copy, symlinks=True)
    return copy


def test_every_folder_says_what_it_holds(finished):
    assert held(finished) == "run"
    assert {name: held(finished / name) for name in STAGES} == {name: name for name in STAGES}
    assert held(finished / "sft" / "model") is None  # a model folder inside a stage: not a claimed output


@pytest.mark.parametrize("inside", ["sft", "sft/model", "reward", "eval", "ppo/checkpoints", "notes", "sft/x/y"])
def test_a_run_inside_another_run_is_refused_and_nothing_changes(run_copy, tmp_path, capsys, inside):
    before = snapshot(run_copy)
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(TINY))
    line = one_line_error(capsys, ["run", str(config), "--out", str(run_copy / inside)])
    assert "nothing was changed" in line and str(run_copy) in line
    assert snapshot(run_copy) == before
    assert not (run_copy / inside / "manifest.json").exists()


def test_stage_commands_inside_another_stage_are_refused_and_nothing_changes(run_copy, tmp_path, capsys):
    before = snapshot(run_copy)
    sft_model = run_copy / "sft" / "model"
    empty = tmp_path / "empty.yaml"
    empty.write_text("{}\n")
    commands = [
        ["data", "synth", "--out", str(sft_model / "trees.jsonl"), "--trees", "20"],
        ["data", "build", str(run_copy / "world" / "trees.jsonl"), "--out", str(sft_model)],
        ["model", "init", "--corpus", str(run_copy / "world" / "trees.jsonl"), "--out", str(run_copy / "ppo" / "model")],
        ["sft", str(empty), f"model={run_copy / 'model'}", f"data={run_copy / 'data'}",
         f"output_dir={run_copy / 'reward' / 'x'}"],
        ["reward", str(empty), f"model={run_copy / 'sft'}", f"data={run_copy / 'data'}",
         f"output_dir={run_copy / 'sft' / 'rm'}"],
        ["dpo", str(empty), f"model={run_copy / 'sft'}", f"data={run_copy / 'data'}", f"output_dir={run_copy / 'ppo'}"],
        ["ppo", str(empty), "num_updates=1", f"model={run_copy / 'sft'}", f"reward_model={run_copy / 'reward'}", f"data={run_copy / 'data'}",
         f"output_dir={run_copy / 'eval'}"],
        ["eval", str(empty), f"policy={run_copy / 'ppo'}", f"reference={run_copy / 'sft'}", f"data={run_copy / 'data'}",
         f"output_dir={sft_model}"],
        ["sweep", str(tmp_path / "none.yaml"), "--grid", "seed=0,1", "--out", str(run_copy / "eval")],
    ]
    (tmp_path / "none.yaml").write_text(yaml.safe_dump(TINY))
    for argv in commands:
        line = one_line_error(capsys, argv)
        assert "nothing was changed" in line or "would overwrite" in line, (argv, line)
    assert snapshot(run_copy) == before


def test_what_may_be_claimed_where(tmp_path):
    run, sweep = tmp_path / "run", tmp_path / "sweep"
    claim_dir(run, "run")
    claim_dir(run / "sft", "sft")
    claim_dir(run / "ppo", "dpo")  # DPO aligns in the RL stage's place
    claim_dir(run / "reward", "reward")
    claim_dir(run / "reward" / "members" / "1", "reward")  # an ensemble member inside its stage
    claim_dir(sweep, "sweep")
    claim_dir(sweep / "runs" / "a", "run")
    claim_dir(sweep / "stages" / "sft-0123", "sft")
    assert claim_problem(run, "run") is None and claim_problem(tmp_path / "elsewhere", "run") is None
    refused = [(run / "sft", "run"), (run / "sft", "reward"), (run / "ppo2", "ppo"), (run / "sft" / "x", "sft"),
               (run / "sft" / "model", "data"), (run / "reward" / "members" / "1", "sft"), (sweep, "run"),
               (sweep / "runs" / "a", "sweep"), (sweep / "stages" / "sft-0123" / "deep", "run")]
    for folder, kind in refused:
        assert claim_problem(folder, kind), (folder, kind)
        with pytest.raises(OutputError):
            claim_dir(folder, kind)
    # a folder written before owner files said what they hold is still recognised by its files
    legacy = tmp_path / "legacy"
    claim_dir(legacy / "sft")
    (legacy / OWNER_FILE).write_text("written by rlhfkit\n")
    (legacy / "manifest.json").write_text(json.dumps({"stages": {}}))
    (legacy / "sft" / "metrics.json").write_text(json.dumps({"stage": "sft"}))
    assert held(legacy) == "run" and held(legacy / "sft") == "sft"
    assert claim_problem(legacy / "sft", "run") and claim_problem(legacy / "sft" / "deep", "eval")


def test_the_stage_graph_says_what_reads_what():
    rl, dpo = stage_inputs(False), stage_inputs(True)
    assert downstream(rl, "sft") == ["reward", "ppo", "eval"]
    assert downstream(rl, "reward") == ["ppo", "eval"]
    assert downstream(dpo, "reward") == ["eval"]  # DPO reads the pairs, not the reward model; eval scores with it
    assert downstream(rl, "world") == ["data", "model", "sft", "reward", "ppo", "eval"]
    assert downstream(rl, "eval") == []


@pytest.mark.parametrize("changed, stage", [({"ppo.num_updates": 3}, "ppo"), ({"reward.learning_rate": 2e-3}, "reward")])
def test_an_interrupted_rerun_leaves_no_earlier_result_presented(run_copy, monkeypatch, changed, stage):
    import rlhfkit.ppo
    import rlhfkit.reward

    assert (run_copy / "summary.json").is_file() and (run_copy / "report.html").is_file()
    upstream = {s: snapshot(run_copy / s) for s in ("data", "sft")}

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(rlhfkit.ppo if stage == "ppo" else rlhfkit.reward, f"train_{stage}", interrupted)
    logs: list[str] = []
    with pytest.raises(KeyboardInterrupt):
        run_chain(tiny_config(run_copy, **changed), log=logs.append)
    later = downstream(stage_inputs(False), stage)
    manifest = json.loads((run_copy / "manifest.json").read_text())["stages"]
    assert manifest[stage]["status"] == "running"
    for name in later:
        assert manifest[name] == {"status": "stale"} and not (run_copy / name).exists(), name
    for name in ("summary.json", "report.html", "report.md"):
        assert not (run_copy / name).exists(), name
    assert {s: snapshot(run_copy / s) for s in ("data", "sft")} == upstream  # what the change does not touch
    assert any("out of date" in line and "summary.json" in line for line in logs), logs


class _FakeStages:
    """The chain's bookkeeping with stages that write one file each (fast): ``outputs[name]`` is what it writes."""

    def __init__(self, run: Path):
        self.config = tiny_config(run)
        self.outputs = {name: name for name in STAGES}
        self.calls: list[str] = []

    def run(self, log=lambda _: None) -> _Chain:
        chain = _Chain(self.config, log)
        claim_dir(chain.run_dir, "run")
        for name in STAGES:
            def fn(out: Path, name=name) -> dict:
                self.calls.append(name)
                (out / "out.txt").write_text(self.outputs[name])
                return {"written": self.outputs[name]}
            chain.stage(name, {"spec": name}, fn)
        return chain


def test_a_redone_stage_sends_later_stages_round_again_only_when_it_came_out_different(tmp_path):
    stages = _FakeStages(tmp_path / "run")
    stages.run()
    assert stages.calls == list(STAGES)
    sft = tmp_path / "run" / "sft" / "out.txt"
    # damaged, and the redo writes what was recorded: the later stages read that very output; kept
    stages.calls.clear()
    sft.write_text("damaged")
    stages.run()
    assert stages.calls == ["sft"]
    # damaged (an untrained model put in its place), and the redo writes something else: reward, ppo, eval redone
    stages.calls.clear()
    sft.write_text("damaged")
    stages.outputs["sft"] = "a different sft"
    logs: list[str] = []
    stages.run(logs.append)
    assert stages.calls == ["sft", "reward", "ppo", "eval"]
    assert any("out of date" in line for line in logs), logs
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())["stages"]
    assert all(entry["status"] == "done" for entry in manifest.values())
