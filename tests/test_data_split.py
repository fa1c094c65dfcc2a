"""The split by tree: no leakage, deterministic per seed, independent of the other trees."""

from __future__ import annotations

import pytest
from data_helpers import build, sample_trees, write_jsonl

from rlhfkit.data import assign_splits


def _trees_by_split(*dds) -> dict[str, set[str]]:
    return {split: {t for dd in dds for t in dd[split]["tree_id"]} for split in ("train", "validation")}


def test_no_tree_in_two_splits_and_stats_per_split(tmp_path):
    src = write_jsonl(tmp_path / "t.jsonl", sample_trees())
    stats, sft, pairs = build(tmp_path, [src], val_fraction=0.3, seed=7)
    trees = _trees_by_split(sft, pairs)
    assert trees["train"] and trees["validation"]
    assert not trees["train"] & trees["validation"]  # SFT rows and pairs of a tree share its split
    for split in ("train", "validation"):
        assert stats["splits"][split]["sft_examples"] == len(sft[split])
        assert stats["splits"][split]["pairs"] == len(pairs[split])
    assert stats["splits"]["train"]["trees"] + stats["splits"]["validation"]["trees"] == 100
    assert 10 <= stats["splits"]["validation"]["trees"] <= 50  # ~30 of 100 expected


def test_deterministic_per_seed(tmp_path):
    src = write_jsonl(tmp_path / "t.jsonl", sample_trees())
    _, a, _ = build(tmp_path, [src], "a", val_fraction=0.2, seed=3)
    _, b, _ = build(tmp_path, [src], "b", val_fraction=0.2, seed=3)
    _, c, _ = build(tmp_path, [src], "c", val_fraction=0.2, seed=4)
    assert a["train"].to_list() == b["train"].to_list() and a["validation"].to_list() == b["validation"].to_list()
    assert _trees_by_split(a) != _trees_by_split(c)


def test_assignment_ignores_the_other_trees(tmp_path):
    """A tree's split depends on (seed, tree_id) only: a subset keeps its assignments."""
    trees = sample_trees()
    _, full, _ = build(tmp_path, [write_jsonl(tmp_path / "all.jsonl", trees)], "all", val_fraction=0.3)
    _, half, _ = build(tmp_path, [write_jsonl(tmp_path / "half.jsonl", trees[::2])], "half", val_fraction=0.3)
    full_split, half_split = _trees_by_split(full), _trees_by_split(half)
    for split in ("train", "validation"):
        assert half_split[split] <= full_split[split]


def test_assign_splits_guarantees():
    ids = [f"tree-{i}" for i in range(200)]
    split = assign_splits(ids, seed=0, val_fraction=0.05)
    assert {t: s for t, s in assign_splits(ids[:50], seed=0, val_fraction=0.05).items()} == {t: split[t] for t in ids[:50]}
    assert 2 <= sum(s == "validation" for s in split.values()) <= 25
    # Two trees and a tiny fraction: validation still gets one; train keeps the other.
    assert sorted(assign_splits(["a", "b"], seed=0, val_fraction=1e-9).values()) == ["train", "validation"]
    # One tree: always train. No validation when val_fraction = 0.
    assert assign_splits(["only"], seed=0, val_fraction=0.9) == {"only": "train"}
    assert set(assign_splits(ids, seed=0, val_fraction=0.0).values()) == {"train"}
    # Nearly everything in validation: train keeps at least one tree.
    assert "train" in assign_splits(ids[:3], seed=1, val_fraction=0.999999).values()


@pytest.mark.parametrize("fraction", [0.0, 0.5])
def test_single_tree_goes_to_train_and_empty_split_is_saved(tmp_path, fraction):
    stats, sft, pairs = build(tmp_path, [write_jsonl(tmp_path / "one.jsonl", sample_trees()[:1])], val_fraction=fraction)
    assert stats["splits"]["validation"] == {"trees": 0, "messages": 0, "sft_examples": 0, "pairs": 0}
    assert len(sft["validation"]) == 0 and len(pairs["validation"]) == 0
    assert sft["validation"].features == sft["train"].features
    assert pairs["validation"].features == pairs["train"].features


def test_validation_guarantee_picks_a_tree_with_rows(tmp_path):
    """A tree left with only its prompt has no rows: it never counts as the validation tree."""
    trees = sample_trees()[:3]
    trees[0]["prompt"]["replies"] = []
    stats, sft, pairs = build(tmp_path, [write_jsonl(tmp_path / "t.jsonl", trees)], val_fraction=1e-9)
    assert stats["trees"] == 3 and len(sft["validation"]) > 0 and len(sft["train"]) > 0
    assert trees[0]["message_tree_id"] not in set(sft["validation"]["tree_id"]) | set(pairs["validation"]["tree_id"])
