"""Bad input at the CLI: one line naming file, line and field; exit 2; no traceback; no DIR."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from data_helpers import SAMPLE, flat_rows, sample_trees, write_jsonl

from rlhfkit.cli import main


def _fails(tmp_path: Path, capsys, *args: str) -> str:
    out = tmp_path / "out"
    code = main(["data", "build", *map(str, args), "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("rlhfkit: error: "), err
    assert not out.exists() and not list(tmp_path.glob(".tmp-out*"))
    return lines[0]


def _sample_lines() -> list[str]:
    sample_trees()  # skips when the sample is absent
    return SAMPLE.read_text(encoding="utf-8").splitlines()


def test_truncated_last_line(tmp_path, capsys):
    lines = _sample_lines()
    src = tmp_path / "cut.jsonl"
    src.write_text("\n".join(lines[:-1] + [lines[-1][: len(lines[-1]) // 2]]) + "\n", encoding="utf-8")
    msg = _fails(tmp_path, capsys, src)
    assert f"{src}:100: not valid JSON" in msg


def test_non_json_line(tmp_path, capsys):
    lines = _sample_lines()
    src = tmp_path / "bad.jsonl"
    src.write_text("\n".join(lines[:2] + ["this is not json"] + lines[2:]) + "\n", encoding="utf-8")
    assert f"{src}:3: not valid JSON" in _fails(tmp_path, capsys, src)


def test_truncated_gzip(tmp_path, capsys):
    full = write_jsonl(tmp_path / "t.jsonl.gz", sample_trees())
    src = tmp_path / "cut.jsonl.gz"
    src.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    msg = _fails(tmp_path, capsys, src)
    assert str(src) in msg


def test_unknown_parent_id(tmp_path, capsys):
    rows = flat_rows(sample_trees())
    victim = next(r for r in rows if r["parent_id"] is not None)
    victim["parent_id"] = "no-such-parent"
    src = write_jsonl(tmp_path / "m.jsonl", rows)
    msg = _fails(tmp_path, capsys, src)
    line = rows.index(victim) + 1
    assert f"{src}:{line}: message {victim['message_id']} has unknown parent_id no-such-parent" in msg
    assert "--drop-orphans" in msg


def test_missing_required_field_nested(tmp_path, capsys):
    trees = sample_trees()
    del trees[4]["prompt"]["replies"][0]["text"]
    src = write_jsonl(tmp_path / "t.jsonl", trees)
    msg = _fails(tmp_path, capsys, src)
    assert f"{src}:5: missing required field 'text'" in msg


@pytest.mark.parametrize(
    ("field", "value", "problem"),
    [
        ("role", "moderator", "has unknown role 'moderator'"),
        ("role", ["assistant"], "has unknown role ['assistant']"),
        ("text", 42, "field 'text' of message"),
        ("rank", 1.5, "has a non-integer rank 1.5"),
        ("rank", True, "has a non-integer rank True"),
    ],
)
def test_bad_field_nested(tmp_path, capsys, field, value, problem):
    """Values the fast path of the reader does not take go to the checked path, which names them."""
    trees = sample_trees()
    trees[2]["prompt"]["replies"][0][field] = value
    src = write_jsonl(tmp_path / "t.jsonl", trees)
    msg = _fails(tmp_path, capsys, src)
    assert f"{src}:3: " in msg and problem in msg


@pytest.mark.parametrize(
    ("where", "value", "problem"),
    [
        ("replies", "oops", "Expected `array | null`, got `str` - at `$.prompt.replies[0].replies`"),
        ("replies", ["oops"], "Expected `object`, got `str` - at `$.prompt.replies[0].replies[0]`"),
        ("replies", {"text": "hi"}, "Expected `array | null`, got `object` - at `$.prompt.replies[0].replies`"),
        ("prompt", "oops", "Expected `object | null`, got `str` - at `$.prompt`"),
    ],
)
def test_bad_shape_nested(tmp_path, capsys, where, value, problem):
    """A tree whose replies are not a list of messages is named with its JSON path (the
    line's other oddities, such as a NaN, must not hide it: they send it to json.loads first)."""
    trees = sample_trees()
    if where == "prompt":
        trees[6]["prompt"] = value
    else:
        trees[6]["prompt"]["replies"][0]["replies"] = value
    trees[6]["detoxify"] = float("nan")
    src = write_jsonl(tmp_path / "t.jsonl", trees)
    assert "NaN" in src.read_text(encoding="utf-8").splitlines()[6]
    msg = _fails(tmp_path, capsys, src)
    assert f"{src}:7: {problem}" in msg


def test_nesting_too_deep(tmp_path, capsys):
    deep = "[" * 100_000 + "]" * 100_000
    src = tmp_path / "deep.jsonl"
    src.write_text('{"prompt": ' + deep + "}\n", encoding="utf-8")
    assert f"{src}:1: not valid JSON (maximum recursion depth exceeded" in _fails(tmp_path, capsys, src)
    array = tmp_path / "deep.json"
    array.write_text("[" + deep + "]", encoding="utf-8")
    assert f"{array}: not valid JSON (maximum recursion depth exceeded" in _fails(tmp_path, capsys, array)


def test_missing_required_field_flat(tmp_path, capsys):
    rows = flat_rows(sample_trees())
    del rows[9]["role"]
    src = write_jsonl(tmp_path / "m.jsonl", rows)
    assert f"{src}:10: missing required field 'role'" in _fails(tmp_path, capsys, src)


def test_missing_field_in_trl_format(tmp_path, capsys):
    src = write_jsonl(tmp_path / "a.jsonl", [{"instruction": "Say hi", "output": "hi"}, {"instruction": "x"}])
    assert f"{src}:2: missing required field 'output'" in _fails(tmp_path, capsys, src, "--format", "alpaca")


def test_empty_input(tmp_path, capsys):
    src = tmp_path / "empty.jsonl"
    src.write_text("\n\n", encoding="utf-8")
    assert f"{src}: empty input" in _fails(tmp_path, capsys, src)


def test_nonexistent_source(tmp_path, capsys):
    src = tmp_path / "nope.jsonl"
    assert f"{src}: no such file or folder" in _fails(tmp_path, capsys, src)


def test_undetectable_format(tmp_path, capsys):
    src = write_jsonl(tmp_path / "x.jsonl", [{"question": "?", "answer": "!"}])
    msg = _fails(tmp_path, capsys, src)
    assert "cannot detect the format" in msg and "question" in msg
    for name in ("oasst-trees", "oasst-messages", "alpaca", "sharegpt", "messages", "prompt-completion", "preference"):
        assert name in msg


def test_duplicate_message_id(tmp_path, capsys):
    src = write_jsonl(tmp_path / "t.jsonl", sample_trees())
    msg = _fails(tmp_path, capsys, src, src)
    first_id = json.loads(SAMPLE.read_text(encoding="utf-8").splitlines()[0])["prompt"]["message_id"]
    assert f"duplicate message_id {first_id}" in msg


def test_duplicate_message_id_flat(tmp_path, capsys):
    rows = flat_rows(sample_trees())
    rows.append(dict(rows[0]))
    src = write_jsonl(tmp_path / "m.jsonl", rows)
    msg = _fails(tmp_path, capsys, src)
    assert f"{src}:{len(rows)}: duplicate message_id {rows[0]['message_id']} (first at {src}:1)" in msg


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--val-fraction", "1.5"], "val_fraction"),
        (["--top-k", "0"], "top_k"),
        (["--format", "csv"], "format"),
    ],
)
def test_bad_options(tmp_path, capsys, args, words):
    src = write_jsonl(tmp_path / "t.jsonl", sample_trees()[:2])
    assert words in _fails(tmp_path, capsys, src, *args)


def test_nothing_left_after_filtering(tmp_path, capsys):
    src = write_jsonl(tmp_path / "t.jsonl", sample_trees()[:3])
    msg = _fails(tmp_path, capsys, src, "--lang", "xx")
    assert "no SFT examples or pairs left" in msg and "lang" in msg


def test_real_process_prints_one_line(tmp_path):
    """The installed entry point, as a user runs it: stderr is one line, exit code 2."""
    src = tmp_path / "bad.jsonl"
    src.write_text('{"prompt": {"message_id": "a", "text": "hi", "role": "prompter"}}\n{"prompt": \n', encoding="utf-8")
    exe = Path(sys.executable).with_name("rlhfkit")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "rlhfkit.cli"]
    out = tmp_path / "out"
    proc = subprocess.run([*cmd, "data", "build", str(src), "--out", str(out)], capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=120)  # fmt: skip
    assert proc.returncode == 2
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith(f"rlhfkit: error: {src}:2: not valid JSON (Expecting value, column ")
    assert not out.exists()
