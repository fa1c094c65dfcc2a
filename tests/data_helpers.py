"""Shared helpers of the data-stage tests: the real Open Assistant sample, writers of its
other shapes, and a reference count written independently of rlhfkit.data (plain
recursion over the nested trees)."""

from __future__ import annotations

import copy
import gzip
import json
import os
import random
from itertools import combinations
from pathlib import Path
from typing import Callable, Iterator

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

SAMPLE = Path(__file__).resolve().parents[1].parent / "shared/data/oasst/oasst_en_100_trees.jsonl"
FLAT_FIELDS = ("message_id", "parent_id", "message_tree_id", "text", "role", "lang", "review_count",
               "review_result", "deleted", "rank", "synthetic", "model_name")  # fmt: skip


def require_shared(path: Path) -> Path:
    """``path`` under ../shared; skipped when absent, except under CI=true, where it must be there (a fail)."""
    if not path.is_file():
        message = f"real Open Assistant sample not found at {path} (see shared/data/oasst/README.md)"
        if os.environ.get("CI") == "true":
            pytest.fail(message + "; CI=true: the shared material must be beside the checkout")
        pytest.skip(message)
    return path


def sample_trees() -> list[dict]:
    """The 100 real trees (a fresh deep copy each call, so tests may modify them)."""
    require_shared(SAMPLE)
    return [json.loads(line) for line in SAMPLE.read_text(encoding="utf-8").splitlines() if line.strip()]


def walk(message: dict) -> Iterator[dict]:
    yield message
    for reply in message.get("replies") or []:
        yield from walk(reply)


def all_messages(trees: list[dict]) -> Iterator[dict]:
    for tree in trees:
        yield from walk(tree["prompt"])


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wt", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path


def flat_rows(trees: list[dict], seed: int = 0) -> list[dict]:
    """The public message-table shape (one row per message), rows shuffled."""
    rows = []
    for tree in trees:
        for m in walk(tree["prompt"]):
            row = {k: m.get(k) for k in FLAT_FIELDS}
            row["message_tree_id"] = tree["message_tree_id"]
            rows.append(row)
    random.Random(seed).shuffle(rows)
    return rows


def write_parquet(path: Path, rows: list[dict]) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def size(m: dict) -> int:
    return sum(1 for _ in walk(m))


def reference_counts(
    trees: list[dict],
    drop: Callable[[dict], str | None] = lambda m: None,
    top_k: int | None = None,
) -> dict:
    """Counts by the issue's rules, computed by plain recursion (independent of rlhfkit.data).

    ``drop(message)`` returns the drop reason or None. A ranked assistant reply passes
    top-k when fewer than K kept ranked siblings have a strictly lower rank.
    """
    out = {"trees": 0, "messages": 0, "sft_examples": 0, "pairs": 0, "dropped": {}}

    def visit(m: dict, ok: bool) -> None:
        out["messages"] += 1
        if m["role"] == "assistant" and ok:
            out["sft_examples"] += 1
        kids = []
        for r in m.get("replies") or []:
            reason = drop(r)
            if reason:
                out["dropped"][reason] = out["dropped"].get(reason, 0) + size(r)
            else:
                kids.append(r)
        ranked = [r for r in kids if r["role"] == "assistant" and r.get("rank") is not None]
        if m["role"] == "prompter":
            out["pairs"] += sum(1 for a, b in combinations(ranked, 2) if a["rank"] != b["rank"])
        for r in kids:
            position = sum(1 for o in ranked if o["rank"] < r["rank"]) if r in ranked else None
            visit(r, ok and (top_k is None or position is None or position < top_k))

    for tree in trees:
        reason = drop(tree["prompt"])
        if reason:
            out["dropped"][reason] = out["dropped"].get(reason, 0) + size(tree["prompt"])
            continue
        out["trees"] += 1
        visit(tree["prompt"], True)
    return out


def build(tmp_path: Path, sources: list, name: str = "out", datasets: list | None = None, **options):
    """Run build_data in-process; returns (stats, sft DatasetDict, pairs DatasetDict)."""
    import datasets as hf

    from rlhfkit.data import DataBuildConfig, build_data

    out = tmp_path / name
    config = DataBuildConfig(sources=[str(s) for s in sources], out=str(out), **options)
    stats = build_data(config, datasets=datasets).metrics
    assert json.loads((out / "stats.json").read_text()) == stats
    return stats, hf.load_from_disk(str(out / "sft")), hf.load_from_disk(str(out / "pairs"))


def rows_of(dd) -> dict[str, list[dict]]:
    return {split: dd[split].to_list() for split in dd}


def copy_trees(trees: list[dict]) -> list[dict]:
    return copy.deepcopy(trees)
