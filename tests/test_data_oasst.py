"""Data build on the real Open Assistant sample: counts, input shapes, filters, --top-k."""

from __future__ import annotations

import json

import pytest
from data_helpers import (
    all_messages,
    build,
    flat_rows,
    reference_counts,
    rows_of,
    sample_trees,
    size,
    walk,
    write_jsonl,
    write_parquet,
)

COUNTS = ("trees", "messages", "sft_examples", "pairs")


def _counts(stats: dict) -> dict:
    return {k: stats[k] for k in COUNTS}


def test_real_sample_counts_and_schema(tmp_path):
    trees = sample_trees()
    src = write_jsonl(tmp_path / "trees.jsonl", trees)
    stats, sft, pairs = build(tmp_path, [src])
    # The figures of shared/data/oasst/README.md, counted by its authors' tooling, not ours.
    assert _counts(stats) == {"trees": 100, "messages": 1167, "sft_examples": 687, "pairs": 754}
    assert _counts(stats) == _counts(reference_counts(trees))
    assert all(v == 0 for v in stats["dropped"].values())
    for key in COUNTS:
        assert stats["splits"]["train"][key] + stats["splits"]["validation"][key] == stats[key]
    assert sum(len(sft[s]) for s in sft) == 687 and sum(len(pairs[s]) for s in pairs) == 754

    assert set(sft) == set(pairs) == {"train", "validation"}
    assert sft["train"].column_names == ["messages", "tree_id", "message_id"]
    assert pairs["train"].column_names == ["prompt", "chosen", "rejected", "tree_id", "chosen_rank", "rejected_rank"]
    assert "margin" not in pairs["train"].column_names  # RewardTrainer would use it

    by_id = {m["message_id"]: m for m in all_messages(trees)}
    for row in sft["train"]:
        last = by_id[row["message_id"]]
        assert last["role"] == "assistant" and row["messages"][-1] == {"role": "assistant", "content": last["text"]}
        roles = [m["role"] for m in row["messages"]]
        assert roles[0] == "user" and set(roles) <= {"user", "assistant"}
    for row in pairs["train"]:
        assert row["chosen_rank"] < row["rejected_rank"]
        assert len(row["chosen"]) == len(row["rejected"]) == 1 and row["chosen"][0]["role"] == "assistant"
        assert row["prompt"][-1]["role"] == "user"


def test_flat_table_jsonl_and_parquet_equal_nested(tmp_path):
    trees = sample_trees()
    _, sft, pairs = build(tmp_path, [write_jsonl(tmp_path / "trees.jsonl", trees)], "nested")
    rows = flat_rows(trees, seed=1)
    for name, src in (
        ("jsonl", write_jsonl(tmp_path / "messages.jsonl", rows)),
        ("parquet", write_parquet(tmp_path / "messages.parquet", flat_rows(trees, seed=2))),
    ):
        stats, sft2, pairs2 = build(tmp_path, [src], name)
        assert _counts(stats) == {"trees": 100, "messages": 1167, "sft_examples": 687, "pairs": 754}
        assert rows_of(sft2) == rows_of(sft) and rows_of(pairs2) == rows_of(pairs), name


def test_gzip_export(tmp_path):
    stats, _, _ = build(tmp_path, [write_jsonl(tmp_path / "trees.jsonl.gz", sample_trees())])
    assert _counts(stats) == {"trees": 100, "messages": 1167, "sft_examples": 687, "pairs": 754}


def _mark(trees, every: int, role: str | None, field: str, value) -> int:
    """Set ``field`` on every ``every``-th message (of ``role``) in file order; returns how many."""
    n = 0
    for i, m in enumerate(m for m in all_messages(trees) if role is None or m["role"] == role):
        if i % every == every - 1:
            m[field] = value
            n += 1
    return n


def test_filters_deleted_review_lang(tmp_path):
    trees = sample_trees()
    assert _mark(trees, 7, "assistant", "deleted", True) > 0
    assert _mark(trees, 11, None, "review_result", False) > 0
    assert _mark(trees, 13, "prompter", "lang", "de") > 0

    def reason(m, langs=("en",)):
        if m["deleted"]:
            return "deleted"
        if m["review_result"] is False:
            return "review_failed"
        if langs is not None and m["lang"] not in langs:
            return "lang"
        return None

    src = write_jsonl(tmp_path / "modified.jsonl", trees)
    stats, _, _ = build(tmp_path, [src], "en", lang=["en"])
    expected = reference_counts(trees, reason)
    assert _counts(stats) == _counts(expected)
    assert expected["dropped"]["lang"] > 0 and expected["dropped"]["review_failed"] > 0
    assert {k: v for k, v in stats["dropped"].items() if v} == expected["dropped"]
    # Every input message is either kept or counted under one reason.
    assert stats["messages"] + sum(stats["dropped"].values()) == 1167

    stats, _, _ = build(tmp_path, [src], "en_de", lang=["en", "de"])
    assert _counts(stats) == _counts(reference_counts(trees, lambda m: reason(m, None)))
    assert stats["dropped"]["lang"] == 0


def test_no_synthetic(tmp_path):
    trees = sample_trees()
    synthetic = [m for m in all_messages(trees) if m["synthetic"]]
    assert len(synthetic) == 22  # README figure
    src = write_jsonl(tmp_path / "trees.jsonl", trees)
    stats, sft, _ = build(tmp_path, [src], include_synthetic=False)
    expected = reference_counts(trees, lambda m: "synthetic" if m["synthetic"] else None)
    assert _counts(stats) == _counts(expected)
    assert stats["dropped"]["synthetic"] == expected["dropped"]["synthetic"] >= 22
    kept_ids = {r["message_id"] for s in sft for r in sft[s]}
    assert not kept_ids & {m["message_id"] for m in synthetic}


@pytest.mark.parametrize("k", [1, 2])
def test_top_k(tmp_path, k):
    trees = sample_trees()
    stats, sft, pairs = build(tmp_path, [write_jsonl(tmp_path / "trees.jsonl", trees)], top_k=k)
    expected = reference_counts(trees, top_k=k)
    assert _counts(stats) == _counts(expected)
    assert stats["sft_examples"] < 687 and stats["pairs"] == 754  # top-k filters SFT only
    # No assistant reply on any kept path is ranked K or worse among its siblings.
    rank = {m["message_id"]: m.get("rank") for m in all_messages(trees)}
    for split in sft:
        for row in sft[split]:
            assert rank[row["message_id"]] is None or rank[row["message_id"]] < k


def test_top_k_counts_position_among_kept_siblings(tmp_path):
    """With the best reply deleted, the second-best is first among the kept: K=1 keeps it."""
    trees = sample_trees()
    tree = next(t for t in trees if sum(1 for r in t["prompt"]["replies"] if r.get("rank") is not None) >= 2)
    best = min((r for r in tree["prompt"]["replies"] if r.get("rank") is not None), key=lambda r: r["rank"])
    best["deleted"] = True
    second = min((r for r in tree["prompt"]["replies"] if r.get("rank") not in (None, 0)), key=lambda r: r["rank"])
    stats, sft, _ = build(tmp_path, [write_jsonl(tmp_path / "t.jsonl", [tree])], top_k=1, val_fraction=0.0)
    assert second["message_id"] in {r["message_id"] for r in sft["train"]}
    assert stats["dropped"]["deleted"] == size(best)


def test_degenerate_pairs_dropped_and_counted(tmp_path):
    trees = sample_trees()
    tree = next(t for t in trees if sum(1 for r in t["prompt"]["replies"] if r.get("rank") is not None) == 3)
    a, b, c = sorted((r for r in tree["prompt"]["replies"] if r.get("rank") is not None), key=lambda r: r["rank"])
    b["text"] = a["text"]  # chosen == rejected
    c["text"] = "  \n"  # an empty answer
    src = write_jsonl(tmp_path / "t.jsonl", [tree])
    stats, _, pairs = build(tmp_path, [src], val_fraction=0.0)
    nested = reference_counts([tree])["pairs"]
    # (a,b) equal; (a,c) and (b,c) empty; pairs deeper in the tree stay.
    assert stats["dropped"]["degenerate_pairs"] == 3
    assert stats["pairs"] == nested - 3 == len(pairs["train"])
    for row in pairs["train"]:
        assert row["chosen"][0]["content"].strip() and row["chosen"][0]["content"] != row["rejected"][0]["content"]


def test_drop_orphans(tmp_path):
    trees = sample_trees()
    rows = flat_rows(trees)
    victim = next(m for m in walk(trees[3]["prompt"]) if m["role"] == "assistant" and m["replies"])
    for row in rows:
        if row["message_id"] == victim["message_id"]:
            row["parent_id"] = "no-such-parent"
    stats, _, _ = build(tmp_path, [write_jsonl(tmp_path / "m.jsonl", rows)], drop_orphans=True)
    assert stats["dropped"]["orphan"] == size(victim)
    assert stats["messages"] == 1167 - size(victim)


def test_stats_json_is_plain_integers(tmp_path):
    build(tmp_path, [write_jsonl(tmp_path / "t.jsonl", sample_trees())])
    stats = json.loads((tmp_path / "out" / "stats.json").read_text())
    for key in COUNTS:
        assert type(stats[key]) is int
        for split in ("train", "validation"):
            assert type(stats["splits"][split][key]) is int
    assert set(stats["dropped"]) >= {"deleted", "review_failed", "lang", "synthetic", "orphan", "degenerate_pairs"}


def _decoded(loads, data: bytes) -> str:
    """What ``loads`` makes of ``data``, or its error, as text (repr: NaN != NaN; ints stay ints)."""
    try:
        return repr(loads(data))
    except ValueError as e:
        return f"{type(e).__name__}: {e}"


def test_loads_json_reads_what_json_loads_reads():
    """The fast decoder hands what it refuses (a BOM, NaN, lone surrogates, malformed lines)
    to json.loads: every line gives json.loads's object, or json.loads's own error."""
    from rlhfkit.data.sources import loads_json

    lines = [
        b'{"a": 123456789012345678901234567890, "b": -9223372036854775809, "c": 18446744073709551616}',
        b'{"a": 0.1, "b": 1.5e-320, "c": -0, "d": [1, 2.0, "x"], "a": "last key wins"}',
        b'{"nan": NaN, "inf": Infinity}',
        b'\xef\xbb\xbf{"bom": 1}',
        b'{"lone": "\\ud800", "pair": "\\ud83d\\ude00", "nul": "\\u0000", "raw": "\xc3\xa9"}',
        b'{"encoded surrogate": "\xed\xa0\x80"}',
    ]
    for line in lines:
        assert _decoded(loads_json, line) == _decoded(json.loads, line)
    assert loads_json(lines[0])["a"] == 123456789012345678901234567890  # not a float (orjson's reading)
    for bad in (b'{"a": 1}x', b'{"a": tru}', b"\xff", b'{"prompt": '):
        error = _decoded(json.loads, bad)
        assert error.startswith(("JSONDecodeError", "UnicodeDecodeError")) and _decoded(loads_json, bad) == error


def test_loads_json_on_the_real_sample():
    from rlhfkit.data.sources import loads_json

    lines = [json.dumps(tree, ensure_ascii=False).encode() for tree in sample_trees()]
    assert len(lines) == 100 and all(loads_json(line) == json.loads(line) for line in lines)


def test_trees_decode_straight_to_what_json_loads_reads(tmp_path):
    """Tree lines are decoded straight to structs (other fields skipped); a line msgspec
    refuses goes through json.loads: either way a row is json.loads's object converted."""
    import msgspec

    from rlhfkit.data.oasst import TreeRow
    from rlhfkit.data.sources import jsonl_stream

    reply = b'{"message_id": "r", "role": "assistant", "text": "ok", "rank": %s, "detoxify": {"toxicity": 0.1}}'
    lines = [
        b'{"message_tree_id": 7, "prompt": {"message_id": 123456789012345678901234567890, "text": "a", '
        b'"role": "prompter", "labels": {"name": ["x"]}, "replies": [' + reply % b"0" + b"]}}",
        b'{"prompt": {"message_id": "p", "text": "b", "text": "last wins", "role": "prompter", "replies": ['
        + reply % b"NaN" + b"]}}",
        b'\xef\xbb\xbf{"prompt": {"message_id": "q", "text": "\\ud800", "role": "prompter", "replies": null}}',
        b'{"prompt": {"message_id": "s", "text": "\xc3\xa9 \\ud83d\\ude00", "role": "prompter", "deleted": 1.0}}',
    ]
    trees = [json.dumps(tree, ensure_ascii=False).encode() for tree in sample_trees()]
    src = tmp_path / "trees.jsonl"
    src.write_bytes(b"\n".join(lines + trees) + b"\n")
    rows = [row for _, row in jsonl_stream(src, str(src)).rows(as_type=TreeRow)]
    expected = [msgspec.convert(json.loads(line), TreeRow) for line in lines + trees]
    assert repr(rows) == repr(expected) and len(rows) == 104  # repr: NaN != NaN
    assert rows[0].prompt.message_id == 123456789012345678901234567890 and rows[1].prompt.text == "last wins"


def test_unusual_json_builds_as_json_loads_reads_it(tmp_path):
    """End to end: a numeric id over 64 bits keeps its digits, a NaN rank is unranked, a
    lone surrogate becomes '?', a line opening with a BOM is read."""
    root = (
        '{"prompt": {"message_id": 123456789012345678901234567890, "role": "prompter", "text": "Hi", "replies": ['
        '{"message_id": "a1", "role": "assistant", "text": "Hello \\ud800 there", "rank": 0},'
        '{"message_id": "a2", "role": "assistant", "text": "Hey", "rank": 1},'
        '{"message_id": "a3", "role": "assistant", "text": "Yo", "rank": NaN}]}}'
    )
    src = tmp_path / "unusual.jsonl"
    src.write_bytes(b"\xef\xbb\xbf" + root.encode() + b"\n")
    stats, sft, pairs = build(tmp_path, [src], val_fraction=0.0)
    assert _counts(stats) == {"trees": 1, "messages": 4, "sft_examples": 3, "pairs": 1}
    rows = sft["train"].to_list()
    assert {r["tree_id"] for r in rows} == {"123456789012345678901234567890"}
    assert [r["messages"][-1]["content"] for r in rows] == ["Hello ? there", "Hey", "Yo"]
    (pair,) = pairs["train"].to_list()
    assert (pair["chosen"][0]["content"], pair["rejected"][0]["content"]) == ("Hello ? there", "Hey")
    assert (pair["chosen_rank"], pair["rejected_rank"]) == (0, 1)

