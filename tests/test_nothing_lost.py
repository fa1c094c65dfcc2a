"""Nothing lost (issue 16): rlhfkit never deletes or overwrites what it did not write, and
one run at a time writes an output folder.

Through the CLI (exit code 2, one line, the files on disk before and after) and the Python
API (the exception type). Every folder rlhfkit creates carries an owner file (``.rlhfkit``);
a folder without it (and without a stage file of an older rlhfkit) that is not empty is the
user's, and is refused before any work.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from rlhfkit.artifacts import OWNER_FILE, atomic_dir, claim_dir, output_lock, remove_ours
from rlhfkit.cli import main
from rlhfkit.errors import OutputError, RlhfkitError
from cli_helpers import one_line_error, snapshot


@pytest.fixture(scope="module")
def trees(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("src") / "trees.jsonl"
    assert main(["data", "synth", "--out", str(path), "--trees", "40"]) == 0
    return path


def test_data_build_into_a_users_folder_is_refused_and_nothing_changes(tmp_path, capsys, trees):
    users = tmp_path / "d"
    (users / "notes").mkdir(parents=True)
    (users / "keep.txt").write_text("keep")
    (users / "notes" / "n.md").write_text("mine")
    before = snapshot(users)
    line = one_line_error(capsys, ["data", "build", str(trees), "--out", str(users)])
    assert str(users) in line and "rlhfkit did not write (keep.txt, notes)" in line and "nothing was changed" in line
    assert snapshot(users) == before
    assert not list(tmp_path.glob(".tmp-*"))
    # a relative path is the same folder
    cwd = os.getcwd()
    try:
        os.chdir(tmp_path)
        one_line_error(capsys, ["data", "build", str(trees), "--out", "d"])
    finally:
        os.chdir(cwd)
    assert snapshot(users) == before


def test_rlhfkits_own_and_empty_folders_are_written_and_replaced(tmp_path, capsys, trees):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["data", "build", str(trees), "--out", str(empty)]) == 0
    assert (empty / OWNER_FILE).is_file() and (empty / "sft").is_dir()
    first = (empty / "manifest.json").read_text()
    assert main(["data", "build", str(trees), "--out", str(empty), "--seed", "1"]) == 0  # its own: replaced
    assert (empty / "manifest.json").read_text() != first
    assert not list(tmp_path.glob(".tmp-*"))


def test_data_synth_does_not_overwrite_a_users_file(tmp_path, capsys):
    target = tmp_path / "mine.jsonl"
    target.write_text("my data\n")
    line = one_line_error(capsys, ["data", "synth", "--out", str(target), "--trees", "5"])
    assert f"{target}: exists" in line
    assert target.read_text() == "my data\n"


def test_a_file_where_a_folder_goes_is_refused(tmp_path, capsys, trees):
    target = tmp_path / "out"
    target.write_text("not a folder")
    line = one_line_error(capsys, ["data", "build", str(trees), "--out", str(target)])
    assert "is a file, not a folder" in line and target.read_text() == "not a folder"


def test_atomic_dir_refuses_a_users_folder_before_the_work_and_never_follows_a_symlink(tmp_path):
    users = tmp_path / "users"
    users.mkdir()
    (users / "x.bin").write_bytes(b"\x00\x01")
    ran = []
    with pytest.raises(OutputError, match="rlhfkit did not write"):
        with atomic_dir(users):
            ran.append(True)
    assert not ran and (users / "x.bin").read_bytes() == b"\x00\x01"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["users"]  # no temp folder left behind
    # a symlinked output: the link is replaced by the new folder, its target is untouched
    link = tmp_path / "link"
    link.symlink_to(users, target_is_directory=True)
    with atomic_dir(link) as tmp:
        (tmp / "new.txt").write_text("new")
    assert not link.is_symlink() and (link / "new.txt").read_text() == "new"
    assert sorted(p.name for p in users.iterdir()) == ["x.bin"]
    assert not list(tmp_path.glob(".tmp-*"))


def test_remove_ours_deletes_only_rlhfkits_folders_and_unlinks_symlinks(tmp_path):
    ours = claim_dir(tmp_path / "ours")
    (ours / "model.safetensors").write_bytes(b"1")
    users = tmp_path / "users"
    users.mkdir()
    (users / "thesis.tex").write_text("years of work")
    link = tmp_path / "link"
    link.symlink_to(users, target_is_directory=True)
    remove_ours(ours)
    remove_ours(link)
    remove_ours(tmp_path / "absent")
    with pytest.raises(OutputError):
        remove_ours(users)
    assert not ours.exists() and not link.exists() and (users / "thesis.tex").read_text() == "years of work"


def test_chain_and_stages_refuse_a_users_folder_before_any_work(tmp_path):
    from rlhfkit.config import load_config
    from rlhfkit.pipeline import RunConfig, run_chain
    from rlhfkit.ppo import PPOStageConfig, train_ppo

    users = tmp_path / "users"
    users.mkdir()
    (users / "keep.txt").write_text("keep")
    config = load_config(RunConfig, Path(__file__).resolve().parents[1] / "configs" / "demo.yaml",
                         [f"output_dir={users}"])
    with pytest.raises(OutputError, match="rlhfkit did not write"):
        run_chain(config, log=lambda line: None)
    ppo = PPOStageConfig(model=str(tmp_path / "no-model"), reward_model=str(tmp_path / "no-rm"), num_updates=1,
                         output_dir=str(users))
    with pytest.raises(OutputError, match="rlhfkit did not write"):
        train_ppo(ppo)
    assert sorted(p.name for p in users.iterdir()) == ["keep.txt"]
    assert issubclass(OutputError, RlhfkitError)  # the CLI turns it into one line and exit 2


HOLDER = """
import sys, time
from rlhfkit.artifacts import output_lock
with output_lock(sys.argv[1]):
    print("held", flush=True)
    time.sleep(120)
"""


def test_a_second_run_into_a_busy_folder_is_refused_and_a_killed_holder_leaves_no_stale_lock(tmp_path, capsys, trees):
    out = tmp_path / "data"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        line = one_line_error(capsys, ["data", "build", str(trees), "--out", str(out)])
        assert f"{out}: another rlhfkit run is writing it (pid {holder.pid}" in line
        assert not out.exists()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert main(["data", "build", str(trees), "--out", str(out)]) == 0  # the OS released the dead run's lock
    assert (out / "sft").is_dir()


def test_the_lock_is_reentrant_within_a_process_and_released_after(tmp_path):
    folder = tmp_path / "run"
    with output_lock(folder):
        with output_lock(folder):  # a chain holds its folder while a step inside takes it again
            pass
        probe = subprocess.run([sys.executable, "-c", HOLDER.replace("time.sleep(120)", "pass"), str(folder)],
                               capture_output=True, text=True, timeout=60)
        assert probe.returncode != 0 and "another rlhfkit run is writing it" in probe.stderr
    probe = subprocess.run([sys.executable, "-c", HOLDER.replace("time.sleep(120)", "pass"), str(folder)],
                           capture_output=True, text=True, timeout=60)
    assert probe.returncode == 0 and probe.stdout.strip() == "held", probe.stderr


# ---------------------------------------------------------------------------------------
# safetensors only: a pickle is never loaded, and the refusal says how to convert
# ---------------------------------------------------------------------------------------
class _Hostile:
    """Unpickling this creates a file: the proof that a loader ran the pickle."""

    def __init__(self, sentinel: Path):
        self.sentinel = str(sentinel)

    def __reduce__(self):
        return (open, (self.sentinel, "w"))


@pytest.fixture(scope="module")
def pickle_model(tmp_path_factory, trees):
    import pickle

    from rlhfkit.world.model import build_model, train_tokenizer

    root = tmp_path_factory.mktemp("pickle")
    folder = root / "model"
    tokenizer = train_tokenizer(["hello world", "sort these digits 1 2 3"] * 20, 300)
    build_model(tokenizer, "micro", seed=0).config.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    sentinel = root / "unpickled"
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps({"weight": _Hostile(sentinel)}))
    data = root / "data"
    assert main(["data", "build", str(trees), "--out", str(data)]) == 0
    return folder, sentinel, data


def test_sft_and_reward_refuse_pickle_weights_before_touching_the_output(tmp_path, capsys, pickle_model):
    folder, sentinel, data = pickle_model
    for stage in ("sft", "reward"):
        config = tmp_path / f"{stage}.yaml"
        config.write_text(f"model: {folder}\ndata: {data}\noutput_dir: {tmp_path / stage}\n")
        line = one_line_error(capsys, [stage, str(config)])
        assert f"{folder}: holds only pickle weights (pytorch_model.bin)" in line
        assert "safetensors only" in line and "save_pretrained(" in line  # how to convert, if trusted
        assert not (tmp_path / stage).exists()
    assert not sentinel.exists()


def test_a_model_path_that_does_not_exist_is_named_before_anything_runs(tmp_path, capsys, pickle_model):
    """A typo in a model folder is one line naming it, before any stage runs or folder is made (not
    the hub's "Repo id must use alphanumeric chars" after the data stage); a hub-id-shaped name is
    left to the loader."""
    from rlhfkit.artifacts import missing_model_folder

    _, _, data = pickle_model
    missing = tmp_path / "no" / "such-model"
    for stage in ("sft", "reward"):
        config = tmp_path / f"{stage}.yaml"
        config.write_text(f"model: {missing}\ndata: {data}\noutput_dir: {tmp_path / stage}\n")
        line = one_line_error(capsys, [stage, str(config)])
        assert f"{missing}: no such model folder" in line and "rlhfkit model import" in line
        assert not (tmp_path / stage).exists()
    chain = tmp_path / "chain.yaml"
    chain.write_text(f"output_dir: {tmp_path / 'run'}\nmodel:\n  name: ./typo-model\n")
    line = one_line_error(capsys, ["run", str(chain)])
    assert "model.name: ./typo-model: no such model folder" in line
    assert not (tmp_path / "run").exists()
    assert missing_model_folder("HuggingFaceTB/SmolLM2-135M-Instruct") is None  # a hub id: the loader decides
    assert missing_model_folder("gpt2") is None and missing_model_folder(str(tmp_path)) is None  # exists
    assert missing_model_folder("runs/x/sft") is not None  # two slashes: only a path


def test_ppo_refuses_pickle_weights(tmp_path, pickle_model):
    from rlhfkit.errors import ConfigError
    from rlhfkit.ppo import PPOStageConfig, train_ppo

    folder, sentinel, data = pickle_model
    config = PPOStageConfig(model=str(folder), value_model="policy", data=str(data), num_updates=1,
                            output_dir=str(tmp_path / "ppo"))
    with pytest.raises(ConfigError, match="holds only pickle weights"):
        train_ppo(config, reward_fn=lambda prompts, responses: [0.0] * len(responses))
    assert not sentinel.exists()


def test_an_unknown_architecture_is_one_line(tmp_path, pickle_model):
    import json

    from rlhfkit.artifacts import load_pretrained
    from rlhfkit.errors import ConfigError
    from transformers import AutoModelForCausalLM

    folder = tmp_path / "custom"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "frobnicator", "architectures": ["Frob"],
                                                    "auto_map": {"AutoModelForCausalLM": "modeling_frob.Frob"}}))
    (folder / "model.safetensors").write_bytes(b"")
    with pytest.raises(ConfigError) as info:
        load_pretrained(AutoModelForCausalLM, folder)
    message = str(info.value)
    assert message.startswith(f"{folder}: cannot load the model (") and "\n" not in message
    assert not (folder / "modeling_frob.py").exists()  # remote code stays off


# ---------------------------------------------------------------------------------------
# every section validated before anything runs; unreadable configs are one line
# ---------------------------------------------------------------------------------------
DEMO = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"


@pytest.mark.parametrize("overrides, expected", [
    (["eval.max_prompts=0", "eval.samples_per_prompt=-1"],
     ["eval.max_prompts must be at least 1, got 0", "eval.samples_per_prompt must be at least 1, got -1"]),
    (["world.trees=0", "data.val_fraction=2", "model.size=huge"],
     ["world.trees: must be a positive integer, got 0", "data.val_fraction: must be in [0, 1), got 2.0",
      "model.size: must be one of micro, tiny, small, got 'huge'"]),
    (["sft.learning_rate=nan", "ppo.kl_coef=inf", "reward.learning_rate=-inf"],
     ["sft.learning_rate: must be a finite number, got nan", "ppo.kl_coef: must be a finite number, got inf",
      "reward.learning_rate: must be a finite number, got -inf"]),
    (["ppo.num_updates=0"], ["ppo.num_updates must be at least 1, got 0"]),
])
def test_the_chain_rejects_every_bad_section_before_writing_anything(tmp_path, capsys, overrides, expected):
    out = tmp_path / "run"
    line = one_line_error(capsys, ["run", str(DEMO), "--out", str(out), *overrides])
    for problem in expected:
        assert problem in line
    assert list(tmp_path.iterdir()) == []


def test_a_binary_config_and_non_text_keys_are_one_line(tmp_path, capsys):
    binary = tmp_path / "model.yaml"
    binary.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")
    assert "not a text file (byte 0 is not UTF-8)" in one_line_error(capsys, ["run", str(binary)])
    keys = tmp_path / "keys.yaml"
    keys.write_text("ppo:\n  3: x\n")
    assert "key ppo.3 is not a name" in one_line_error(capsys, ["run", str(keys)])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keys.yaml", "model.yaml"]


# ---------------------------------------------------------------------------------------
# faults of the machine are one line, and the same command then resumes
# ---------------------------------------------------------------------------------------
def test_a_full_disk_is_one_line_and_the_same_command_then_completes(tmp_path, capsys, monkeypatch, trees):
    import errno

    import rlhfkit.data.build as build

    out = tmp_path / "data"
    real = build.write_json_atomic

    def full(path, obj):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(build, "write_json_atomic", full)
    line = one_line_error(capsys, ["data", "build", str(trees), "--out", str(out)])
    assert "the disk is full: free some space, then run the same command again" in line and "stats.json" in line
    assert not out.exists() and list(tmp_path.iterdir()) == []  # no half-written folder, no temp left
    monkeypatch.setattr(build, "write_json_atomic", real)
    assert main(["data", "build", str(trees), "--out", str(out)]) == 0
    assert (out / "stats.json").is_file()


def test_an_os_fault_inside_a_library_is_one_line():
    from rlhfkit.cli import machine_fault

    e = PermissionError(13, "Permission denied", "/data/x")
    wrapped = RuntimeError("saving failed")
    wrapped.__cause__ = e  # libraries re-raise: the fault is found along the chain of causes
    assert machine_fault(wrapped) == ("/data/x: permission denied: choose a folder you can write, then run the "
                                      "same command again (it resumes; nothing written is lost)")
    assert machine_fault(RuntimeError("Error while serializing: IoError(StorageFull)")).startswith("the disk is full")
    assert machine_fault(RuntimeError("a bug")) is None


def test_a_bug_of_ours_keeps_its_traceback_and_says_so(tmp_path, capsys, monkeypatch):
    import rlhfkit.world

    def broken(config):
        raise ZeroDivisionError("oops")

    monkeypatch.setattr(rlhfkit.world, "synth_data", broken)
    assert main(["data", "synth", "--out", str(tmp_path / "x.jsonl")]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "ZeroDivisionError: oops" in err
    assert err.strip().splitlines()[-1] == ("rlhfkit: internal error: this is a bug in rlhfkit; please report it "
                                            "with the traceback above")


def test_a_users_folder_with_a_common_file_name_is_not_taken_for_rlhfkits(tmp_path):
    from rlhfkit.artifacts import is_ours

    users = tmp_path / "users"
    users.mkdir()
    (users / "manifest.json").write_text('{"files": ["a", "b"]}')  # another tool's manifest
    (users / "metrics.json").write_text('{"accuracy": 0.9}')
    assert not is_ours(users)
    with pytest.raises(OutputError):
        remove_ours(users)
    old_run = tmp_path / "old"  # a chain folder of an rlhfkit from before owner files
    old_run.mkdir()
    (old_run / "manifest.json").write_text('{"stages": {}}')
    assert is_ours(old_run)


def test_a_users_training_folder_is_refused_before_its_checkpoints_are_touched(tmp_path, pickle_model):
    from rlhfkit.sft import SFTStageConfig, train_sft

    _, _, data = pickle_model
    users = tmp_path / "hf_run"  # another tool's output: a half-written checkpoint rlhfkit would clean up in its own
    half = users / "checkpoints" / "checkpoint-5"
    half.mkdir(parents=True)
    (half / "model.safetensors").write_bytes(b"their bytes")
    before = snapshot(users)
    model = tmp_path / "unread-model"  # exists (a missing one is refused first); never loaded: the output check comes first
    model.mkdir()
    with pytest.raises(OutputError, match="rlhfkit did not write"):
        train_sft(SFTStageConfig(model=str(model), data=str(data), output_dir=str(users)))
    assert snapshot(users) == before


def test_stale_temp_sweep_removes_only_rlhfkits_temps(tmp_path):
    from rlhfkit.artifacts import sweep_stale_temps

    ours = claim_dir(tmp_path / ".tmp-out-0badcafe")  # a killed atomic_dir: the owner file is its first file
    (ours / "half.bin").write_bytes(b"x")
    (tmp_path / ".tmp-out-12345678").mkdir()  # killed before the owner file: empty
    (tmp_path / ".tmp-out-a1b2c3d4").write_text("{")  # a killed write_text_atomic
    users = [tmp_path / ".tmp-out-deadbeef", tmp_path / ".tmp-out-notes"]  # look-alikes holding a user's files
    for folder in users:
        folder.mkdir()
        (folder / "keep.txt").write_text("keep")
    sweep_stale_temps(tmp_path, "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".tmp-out-deadbeef", ".tmp-out-notes"]
    assert all((folder / "keep.txt").read_text() == "keep" for folder in users)
