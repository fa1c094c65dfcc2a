"""TRL / Alpaca / ShareGPT formats, dataset folders, the hub path, in-memory datasets."""

from __future__ import annotations

import json

import datasets as hf
import pytest
from data_helpers import build, flat_rows, rows_of, sample_trees, write_jsonl, write_parquet

from rlhfkit.data import DataBuildConfig, build_data, data_fingerprint, features, prompts_from_data_dir

REAL = {"trees": 100, "messages": 1167, "sft_examples": 687, "pairs": 754}


def _all(dd) -> list[dict]:
    return [row for split in dd for row in dd[split]]


def _key(row: dict) -> str:
    return json.dumps({k: v for k, v in row.items() if k not in ("tree_id", "message_id")}, sort_keys=True)


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    """The real sample built once from its nested export."""
    tmp = tmp_path_factory.mktemp("real")
    src = write_jsonl(tmp / "trees.jsonl", sample_trees())
    stats, sft, pairs = build(tmp, [src])
    return {"dir": tmp / "out", "stats": stats, "sft": sft, "pairs": pairs}


def test_trl_messages_and_preference_round_trip(tmp_path, real):
    """The real SFT rows written as TRL `messages` rows, the real pairs as TRL preference
    rows: building those gives the same conversations and pairs."""
    sft_rows, pair_rows = _all(real["sft"]), _all(real["pairs"])
    msgs = write_jsonl(tmp_path / "chat.jsonl", [{"messages": r["messages"]} for r in sft_rows])
    prefs = write_jsonl(tmp_path / "prefs.jsonl", [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in pair_rows])
    stats, sft, pairs = build(tmp_path, [msgs, prefs])
    assert stats["sft_examples"] == 687 and stats["pairs"] == 754 and stats["trees"] == 687 + 754
    assert sorted(map(_key, _all(sft))) == sorted(map(_key, sft_rows))
    want = sorted(_key({**r, "chosen_rank": None, "rejected_rank": None}) for r in pair_rows)
    assert sorted(map(_key, _all(pairs))) == want
    # Each row is its own tree, "<stem>:<row index>", so splitting by tree still works.
    assert {r["tree_id"] for r in _all(sft)} == {f"chat:{i}" for i in range(687)}
    assert all(r["message_id"].startswith(r["tree_id"] + ":") for r in _all(sft))


def test_alpaca_sharegpt_prompt_completion(tmp_path):
    alpaca = write_jsonl(tmp_path / "alpaca.jsonl", [
        {"instruction": "Add 2 and 2.", "input": "", "output": "4"},
        {"instruction": "Translate to English.", "input": "Guten Morgen", "output": "Good morning"},
    ])  # fmt: skip
    sharegpt = write_jsonl(tmp_path / "sharegpt.jsonl", [
        {"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Hi"},
                           {"from": "gpt", "value": "Hello"}, {"from": "human", "value": "Bye"}]},
        {"conversations": [{"from": "human", "value": "Anyone?"}]},
    ])  # fmt: skip
    pc = write_jsonl(tmp_path / "pc.jsonl", [
        {"prompt": "Capital of France?", "completion": "Paris"},
        {"prompt": [{"role": "user", "content": "2+3?"}], "completion": [{"role": "assistant", "content": "5"}]},
    ])  # fmt: skip
    stats, sft, pairs = build(tmp_path, [alpaca, sharegpt, pc], val_fraction=0.0)
    got = {r["tree_id"]: r["messages"] for r in sft["train"]}
    assert got == {
        "alpaca:0": [{"role": "user", "content": "Add 2 and 2."}, {"role": "assistant", "content": "4"}],
        "alpaca:1": [{"role": "user", "content": "Translate to English.\n\nGuten Morgen"},
                     {"role": "assistant", "content": "Good morning"}],
        # the trailing user turn is cut: an example ends at its last assistant turn
        "sharegpt:0": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                       {"role": "assistant", "content": "Hello"}],
        "pc:0": [{"role": "user", "content": "Capital of France?"}, {"role": "assistant", "content": "Paris"}],
        "pc:1": [{"role": "user", "content": "2+3?"}, {"role": "assistant", "content": "5"}],
    }  # fmt: skip
    assert stats["dropped"]["no_reply"] == 1  # "Anyone?" has no answer
    assert stats["pairs"] == 0 and len(pairs["train"]) == 0  # instruction data feeds SFT alone
    assert list(sft["train"]["message_id"])[:2] == ["alpaca:0:1", "alpaca:1:1"]


def test_preference_variants_and_degenerate(tmp_path):
    user = [{"role": "user", "content": "Name a colour."}]
    src = write_jsonl(tmp_path / "pref.jsonl", [
        {"prompt": "Name a fruit.", "chosen": "Apple", "rejected": "Rock"},
        {"chosen": user + [{"role": "assistant", "content": "Blue"}],
         "rejected": user + [{"role": "assistant", "content": "Seven"}]},  # implicit prompt
        {"chosen": "Q: sky? A: blue", "rejected": "Q: sky? A: green"},  # implicit, strings (TRL rule)
        {"prompt": "Same?", "chosen": "Yes", "rejected": "Yes"},  # degenerate: dropped, counted
        {"prompt": "Empty?", "chosen": "Fine", "rejected": " "},  # degenerate
    ])  # fmt: skip
    stats, sft, pairs = build(tmp_path, [src], val_fraction=0.0)
    rows = pairs["train"].to_list()
    assert stats["pairs"] == 3 and stats["dropped"]["degenerate_pairs"] == 2 and stats["sft_examples"] == 0
    assert rows[0]["prompt"] == [{"role": "user", "content": "Name a fruit."}]
    assert rows[0]["chosen"] == [{"role": "assistant", "content": "Apple"}]
    assert rows[1]["prompt"] == user and rows[1]["rejected"] == [{"role": "assistant", "content": "Seven"}]
    assert rows[2]["prompt"] == [{"role": "user", "content": "Q: sky? A:"}]
    assert rows[2]["chosen"] == [{"role": "assistant", "content": " blue"}]
    assert rows[0]["chosen_rank"] is None and len(sft["train"]) == 0


def test_format_is_forced(tmp_path):
    src = write_jsonl(tmp_path / "both.jsonl", [
        {"prompt": "Hi", "completion": "Hello", "messages": [{"role": "user", "content": "x"}]},
    ])  # fmt: skip
    _, sft, _ = build(tmp_path, [src], format="prompt-completion", val_fraction=0.0)
    assert sft["train"][0]["messages"][0]["content"] == "Hi"


def test_save_to_disk_folders(tmp_path):
    trees = sample_trees()
    _, sft, pairs = build(tmp_path, [write_jsonl(tmp_path / "t.jsonl", trees)], "nested")
    rows = flat_rows(trees, seed=5)
    half = len(rows) // 2
    hf.DatasetDict({"train": hf.Dataset.from_list(rows[:half]), "test": hf.Dataset.from_list(rows[half:])}).save_to_disk(
        str(tmp_path / "dd")
    )
    hf.Dataset.from_list(rows).save_to_disk(str(tmp_path / "ds"))
    for name in ("dd", "ds"):  # all splits are read; a tree may span splits
        stats, sft2, pairs2 = build(tmp_path, [tmp_path / name], f"from_{name}")
        assert {k: stats[k] for k in REAL} == REAL
        assert rows_of(sft2) == rows_of(sft) and rows_of(pairs2) == rows_of(pairs)


def _oasst1_like_repo(tmp_path, trees) -> str:
    """A folder shaped like the hub repo OpenAssistant/oasst1: data/{train,validation}-*.parquet
    with the public columns (rank as float, struct columns the build does not read)."""
    rows = flat_rows(trees, seed=3)
    for row in rows:
        row["rank"] = None if row["rank"] is None else float(row["rank"])
        row["emojis"] = {"name": ["+1"], "count": [1]}
        row["detoxify"] = {"toxicity": 0.01}
        row["tree_state"] = "ready_for_export"
    val_trees = {t["message_tree_id"] for t in trees[:10]}
    (tmp_path / "repo" / "data").mkdir(parents=True)
    write_parquet(tmp_path / "repo/data/train-00000-of-00001.parquet", [r for r in rows if r["message_tree_id"] not in val_trees])
    write_parquet(tmp_path / "repo/data/validation-00000-of-00001.parquet", [r for r in rows if r["message_tree_id"] in val_trees])
    return str(tmp_path / "repo")


def test_hub_path_with_local_repo_folder(tmp_path, monkeypatch, real):
    monkeypatch.setattr(hf.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")
    repo = _oasst1_like_repo(tmp_path, sample_trees())
    stats, sft, pairs = build(tmp_path, [repo], "folder")  # load_dataset(folder): the real hub code path
    assert {k: stats[k] for k in REAL} == REAL
    assert rows_of(sft) == rows_of(real["sft"]) and rows_of(pairs) == rows_of(real["pairs"])

    calls = []
    real_load = hf.load_dataset

    def offline_hub(name, *args, **kwargs):
        calls.append(name)
        return real_load(repo, *args, **kwargs)

    monkeypatch.setattr(hf, "load_dataset", offline_hub)
    stats, _, _ = build(tmp_path, ["OpenAssistant/oasst1"], "hub_id")
    assert calls == ["OpenAssistant/oasst1"] and {k: stats[k] for k in REAL} == REAL


def test_hub_failure_is_one_line(tmp_path, monkeypatch, capsys):
    from rlhfkit.cli import main

    def offline(name, *args, **kwargs):
        raise ConnectionError(f"Couldn't reach '{name}' on the Hub (LocalEntryNotFoundError)\nmore detail")

    monkeypatch.setattr(hf, "load_dataset", offline)
    assert main(["data", "build", "someone/missing-dataset", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["rlhfkit: error: someone/missing-dataset: datasets.load_dataset failed "
                   "(Couldn't reach 'someone/missing-dataset' on the Hub (LocalEntryNotFoundError))"]  # fmt: skip


def test_in_memory_datasets_combine_with_sources(tmp_path):
    trees = sample_trees()
    alpaca = hf.Dataset.from_list([{"instruction": "Say yes.", "input": "", "output": "Yes."}])
    flat = hf.Dataset.from_list(flat_rows(trees[:50]))
    src = write_jsonl(tmp_path / "rest.jsonl", trees[50:])
    config = DataBuildConfig(sources=[str(src)], out=str(tmp_path / "mem"), val_fraction=0.0)
    stats = build_data(config, datasets=[flat, alpaca]).metrics
    assert stats["trees"] == 101 and stats["messages"] == 1167 + 2 and stats["sft_examples"] == 688
    assert stats["pairs"] == 754


def test_prompts_from_data_dir(real):
    prompts = prompts_from_data_dir(real["dir"], "train")
    expected, seen = [], set()
    for row in real["sft"]["train"]:
        key = json.dumps(row["messages"][:-1])
        if key not in seen:
            seen.add(key)
            expected.append(row["messages"][:-1])
    assert prompts == expected
    assert all(p[-1]["role"] == "user" for p in prompts)
    assert len(prompts) < len(real["sft"]["train"])  # siblings share their context


def test_fingerprint_follows_inputs_and_options(tmp_path, real):
    src = write_jsonl(tmp_path / "t.jsonl", sample_trees())
    build(tmp_path, [src], "a")
    build(tmp_path, [src], "b")
    build(tmp_path, [src], "c", seed=1)
    assert data_fingerprint(tmp_path / "a") == data_fingerprint(tmp_path / "b") == data_fingerprint(real["dir"])
    assert data_fingerprint(tmp_path / "c") != data_fingerprint(tmp_path / "a")
    write_jsonl(src, sample_trees()[:99])
    build(tmp_path, [src], "d")
    assert data_fingerprint(tmp_path / "d") != data_fingerprint(tmp_path / "a")


def test_json_array_file_and_dataset_dict_in_memory(tmp_path):
    """Alpaca is often shipped as one JSON array (alpaca_data.json); a DatasetDict may be passed in."""
    src = tmp_path / "alpaca_data.json"
    src.write_text(json.dumps([{"instruction": "Say hi.", "input": "", "output": "Hi!"}] * 3), encoding="utf-8")
    chat = hf.DatasetDict({
        "train": hf.Dataset.from_list([{"messages": [{"role": "user", "content": "1+1?"}, {"role": "assistant", "content": "2"}]}]),
        "test": hf.Dataset.from_list([{"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]}]),
    })  # fmt: skip
    stats, sft, _ = build(tmp_path, [src], datasets=[chat], val_fraction=0.0)
    assert stats["sft_examples"] == 5 and stats["trees"] == 5
    assert sorted(sft["train"]["tree_id"]) == ["alpaca_data:0", "alpaca_data:1", "alpaca_data:2",
                                               "dataset0/test:0", "dataset0/train:0"]  # fmt: skip
    assert sft["train"].features == features("sft")
