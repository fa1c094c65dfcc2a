"""A careless user's inputs: malformed conversation roles, a key given twice, a grid value
given twice, a symlink loop as a source. Each is refused in one line (exit 2) or, where the
input is legitimate, counted and said in one line."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
from data_helpers import build, flat_rows, sample_trees, write_jsonl

import rlhfkit.pipeline
import rlhfkit.sft
from rlhfkit.config import read_yaml
from rlhfkit.errors import ConfigError
from rlhfkit.sweep import parse_grid, plan_sweep
from cli_helpers import one_line_error


BASE = {"ppo": {"num_updates": 4}}  # the smallest valid run config
BASE_YAML = "ppo:\n  num_updates: 4\n"


def _fails(capsys, *argv: str) -> str:
    return one_line_error(capsys, [str(a) for a in argv])


# --- roles of Open Assistant trees -------------------------------------------------------


def _assistant_root(trees):
    return trees[6], trees[6]["prompt"]


def _two_prompters(trees):  # the first reply to the root becomes a second prompter turn
    return trees[3], trees[3]["prompt"]["replies"][0]


def _two_assistants(trees):  # a follow-up question becomes a second assistant turn
    reply = next(r for r in trees[5]["prompt"]["replies"] if r.get("replies"))
    return trees[5], reply["replies"][0]


@pytest.mark.parametrize("shape", ["nested", "flat"])
@pytest.mark.parametrize("pick, role, words", [
    (_assistant_root, "assistant", "is the root of tree {tree} but has role assistant"),
    (_two_prompters, "prompter", "replies to prompter message {parent} in tree {tree}"),
    (_two_assistants, "assistant", "replies to assistant message {parent} in tree {tree}"),
])  # fmt: skip
def test_a_tree_whose_roles_do_not_alternate_from_the_prompter_is_refused(tmp_path, capsys, shape, pick, role, words):
    trees = sample_trees()
    tree, bad = pick(trees)
    parent = next((m for m in _all(tree["prompt"]) if any(r is bad for r in m.get("replies") or [])), None)
    bad["role"] = role
    if shape == "nested":
        src = write_jsonl(tmp_path / "t.jsonl", trees)
        line = trees.index(tree) + 1
    else:
        rows = flat_rows(trees)
        src = write_jsonl(tmp_path / "m.jsonl", rows)
        line = next(i for i, r in enumerate(rows, 1) if r["message_id"] == bad["message_id"])
    out = tmp_path / "out"
    msg = _fails(capsys, "data", "build", src, "--out", out)
    expected = words.format(tree=tree["message_tree_id"], parent=parent and parent["message_id"])
    assert f"{src}:{line}: message {bad['message_id']} " in msg and expected in msg, msg
    assert not out.exists()


def _all(m):
    yield m
    for r in m.get("replies") or []:
        yield from _all(r)


def test_instruction_rows_without_a_user_turn_are_dropped_counted_and_said(tmp_path, caplog):
    def msgs(*turns):
        return {"messages": [{"role": r, "content": t} for r, t in turns]}

    src = write_jsonl(tmp_path / "m.jsonl", [
        msgs(("user", "Hi"), ("assistant", "Hello")),
        msgs(("assistant", "Unprompted")),  # no user turn: dropped
        msgs(("system", "Be brief."), ("assistant", "OK")),  # no user turn: dropped
        msgs(("assistant", "Hi!"), ("user", "Hello"), ("assistant", "How can I help?")),  # a user turn before the reply
        msgs(("user", "Anyone?")),  # no reply: dropped
    ])  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="rlhfkit"):
        stats, sft, _ = build(tmp_path, [src], val_fraction=0.0)
    assert stats["sft_examples"] == 2 and stats["dropped"]["no_prompt"] == 2 and stats["dropped"]["no_reply"] == 1
    assert all(any(m["role"] == "user" for m in row) for row in sft["train"]["messages"])
    lines = [r.getMessage() for r in caplog.records if r.name == "rlhfkit"]
    assert len(lines) == 1 and "2 rows with no user turn" in lines[0] and "1 row with no assistant" in lines[0], lines


# --- the same key twice ------------------------------------------------------------------


@pytest.fixture
def ran(monkeypatch):
    """The stage functions replaced by a recorder: these tests are about parsing only."""
    calls = []

    def record(config):
        calls.append(config)
        return SimpleNamespace(output_dir=config.output_dir)

    monkeypatch.setattr(rlhfkit.pipeline, "run_chain", record)
    monkeypatch.setattr(rlhfkit.sft, "train_sft", record)
    return calls


@pytest.mark.parametrize("overrides, words", [
    (["ppo.kl_coef=0.1", "ppo.kl_coef=0.2"], "ppo.kl_coef given twice on the command line (0.1, 0.2); give it once"),
    (["seed=1", " seed =1"], "seed given twice on the command line (1, 1); give it once"),
    (["ppo.kl_coef=0.1", "ppo={kl_coef: 0.2}"], "ppo.kl_coef and ppo both given on the command line"),
])  # fmt: skip
def test_a_key_given_twice_on_the_command_line_is_refused(tmp_path, capsys, ran, overrides, words):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(BASE_YAML)
    msg = _fails(capsys, "run", cfg, *overrides)
    assert words in msg and not ran, msg
    with pytest.raises(ConfigError, match="given"):
        plan_sweep(BASE, {"data.val_fraction": [0.1, 0.2]}, tmp_path / "sweep", overrides=overrides)


def test_out_and_output_dir_together_are_refused(tmp_path, capsys, ran):
    cfg = tmp_path / "sft.yaml"
    cfg.write_text("model: m\ndata: d\n")
    msg = _fails(capsys, "sft", cfg, "output_dir=a", "--out", "b")
    assert "output_dir given twice on the command line (output_dir=a, --out b); give it once" in msg and not ran


def test_an_override_of_a_grid_key_is_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"ppo.kl_coef is both a KEY=VALUE override \(0.3\) and a grid key"):
        plan_sweep({**BASE, "sweep": {"grid": {"ppo.kl_coef": [0.1, 0.2]}}}, {}, tmp_path / "s",
                   overrides=["ppo.kl_coef=0.3"])


def test_a_key_given_twice_in_a_yaml_config_is_refused(tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("seed: 0\nppo:\n  kl_coef: 0.1\n  learning_rate: 1e-5\n  kl_coef: 0.2\n")
    with pytest.raises(ConfigError) as e:
        read_yaml(cfg)
    assert str(e.value) == f"{cfg} line 5: key 'kl_coef' given twice (first on line 3); give it once"
    # a YAML merge (<<) is not a duplicate: its keys are defaults the mapping's own keys replace
    cfg.write_text("base: &b {learning_rate: 1e-5, kl_coef: 0.1}\nppo:\n  <<: *b\n  kl_coef: 0.2\n")
    assert read_yaml(cfg)["ppo"] == {"learning_rate": 1e-5, "kl_coef": 0.2}


# --- a grid value twice ------------------------------------------------------------------


@pytest.mark.parametrize("config, grid", [
    (BASE, ["ppo.kl_coef=0.1,0.1"]),
    (BASE, ["ppo.kl_coef=0.1,1e-1"]),
    (BASE, ["ppo.kl_coef=1,1.0"]),
    ({**BASE, "sweep": {"grid": {"ppo.kl_coef": [0.1, 0.2, 0.1]}}}, []),
])  # fmt: skip
def test_a_grid_value_given_twice_is_refused(tmp_path, config, grid):
    with pytest.raises(ConfigError) as e:
        plan_sweep(config, parse_grid(grid), tmp_path / "s")
    value = "1 is given twice (as 1 and 1.0)" if grid == ["ppo.kl_coef=1,1.0"] else "0.1 is given twice"
    assert str(e.value) == f"grid ppo.kl_coef: the value {value}; give each value once"


def test_a_grid_value_given_twice_is_one_line_at_the_cli(tmp_path, capsys, monkeypatch):
    import rlhfkit.sweep

    def must_not_run(*args, **kwargs):
        raise AssertionError("a run started")

    monkeypatch.setattr(rlhfkit.sweep, "run_chain", must_not_run)
    cfg = tmp_path / "run.yaml"
    cfg.write_text(BASE_YAML)
    msg = _fails(capsys, "sweep", cfg, "--grid", "data.lang=[en],[en,de],[ en ]", "--out", tmp_path / "s")
    assert 'grid data.lang: the value ["en"] is given twice; give each value once' in msg
    assert not (tmp_path / "s").exists()


def test_distinct_grid_values_pass(tmp_path):
    plan = plan_sweep(BASE, parse_grid(["ppo.kl_coef=0.1,0.01,1", "data.lang=[en],[en,de]"]), tmp_path / "s")
    assert len(plan.runs) == 6


# --- links as sources --------------------------------------------------------------------


@pytest.fixture
def links(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    d = Path("d")
    d.mkdir()
    os.symlink("loop2", d / "loop1")
    os.symlink("loop1", d / "loop2")
    os.symlink("gone.jsonl", d / "dangling")
    return d


@pytest.mark.parametrize("source, words", [
    ("d/loop1", "d/loop1: a symbolic link loop (d/loop1 -> loop2 -> loop1); point the link at a file or folder"),
    ("d/dangling", "d/dangling: a broken symbolic link (d/dangling -> gone.jsonl, which does not exist); "
                   "point the link at a file or folder"),
    ("d/missing", "d/missing: no such file or folder"),
])  # fmt: skip
def test_a_local_path_is_never_taken_for_a_hub_id(tmp_path, capsys, links, monkeypatch, source, words):
    import datasets

    def hub(name, *args, **kwargs):
        raise AssertionError(f"{name} was sent to the hub")

    monkeypatch.setattr(datasets, "load_dataset", hub)
    msg = _fails(capsys, "data", "build", source, "--out", "out")
    assert words in msg, msg


def test_the_chain_names_a_looping_source_before_any_stage(tmp_path, links):
    from rlhfkit.data.sources import source_problem

    assert source_problem("d/loop1") == ("d/loop1: a symbolic link loop (d/loop1 -> loop2 -> loop1); "
                                         "point the link at a file or folder")
    assert source_problem("d/missing.jsonl") == "d/missing.jsonl: no such file or folder"
    assert source_problem("OpenAssistant/oasst1") is None  # a hub id stays one
    assert source_problem(str(tmp_path / "d")) is None  # a folder


def test_a_seed_override_is_the_base_of_the_seeds_of_a_sweep(tmp_path):
    plan = plan_sweep(BASE, {"ppo.kl_coef": [0.1]}, tmp_path / "s", seeds=2, overrides=["seed=5"])
    assert [cfg.seed for _, _, cfg in plan.runs] == [5, 6]


def test_an_option_given_twice_is_refused(tmp_path, capsys):
    line = _fails(capsys, "data", "synth", "--out", tmp_path / "a.jsonl", "--out", tmp_path / "b.jsonl")
    assert line == "rlhfkit: error: --out given twice on the command line; give it once"
    assert not (tmp_path / "a.jsonl").exists() and not (tmp_path / "b.jsonl").exists()
