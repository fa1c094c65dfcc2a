"""Open Assistant message trees: read nested exports and flat message tables, filter, emit.

Both input shapes become one forest of ``Msg`` records keyed by ``message_id``, so a tree
may even be spread over several sources. The output is canonical, independent of the
input's row order: trees by ``tree_id``, siblings by (rank, unranked last, message_id).
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Iterable, Iterator

from rlhfkit.data.corpus import Corpus
from rlhfkit.data.sources import RowStream
from rlhfkit.errors import DataError

ROLES = {"prompter": "user", "user": "user", "assistant": "assistant"}
# Columns of the public oasst1/oasst2 message tables that the build reads.
MESSAGE_COLUMNS = (
    "message_id", "parent_id", "message_tree_id", "text", "role", "lang",
    "review_result", "deleted", "rank", "synthetic",
)  # fmt: skip


class Msg:
    __slots__ = ("id", "parent_id", "tree_id", "role", "text", "lang", "review", "deleted", "rank", "synthetic",
                 "where", "children", "pool")  # fmt: skip

    def sort_key(self) -> tuple:
        return (self.rank is None, self.rank or 0, self.id)


def _rank(value: object, where: str, mid: str) -> int | None:
    """Ranks are ints; tables store them as float (nullable), sometimes NaN for none."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value):
        raise DataError(f"{where}: message {mid} has a non-integer rank {value!r}")
    return int(value)


def _message(row: dict, where: str, tree_id: str | None, parent_id: str | None) -> Msg:
    m = Msg()
    mid = row.get("message_id")
    if mid is None:
        raise DataError(f"{where}: missing required field 'message_id'")
    m.id = mid = str(mid)
    text = row.get("text")
    role = row.get("role")
    if text is None:
        raise DataError(f"{where}: missing required field 'text' (message {mid})")
    if role is None:
        raise DataError(f"{where}: missing required field 'role' (message {mid})")
    if not isinstance(text, str):
        raise DataError(f"{where}: field 'text' of message {mid} is not a string")
    m.role = ROLES.get(role)
    if m.role is None:
        raise DataError(f"{where}: message {mid} has unknown role {role!r} (expected prompter or assistant)")
    m.text = text
    m.parent_id = None if parent_id is None else str(parent_id)
    m.tree_id = tree_id
    lang = row.get("lang")
    m.lang = lang.lower() if isinstance(lang, str) else None
    m.review = row.get("review_result")
    m.deleted = bool(row.get("deleted"))
    m.rank = _rank(row.get("rank"), where, mid)
    m.synthetic = bool(row.get("synthetic"))
    m.where = where
    m.children = []
    return m


class Forest:
    """All messages of the oasst sources, linked and filtered into kept trees."""

    def __init__(self) -> None:
        self.by_id: dict[str, Msg] = {}

    def _add(self, m: Msg) -> None:
        first = self.by_id.setdefault(m.id, m)
        if first is not m:
            raise DataError(f"{m.where}: duplicate message_id {m.id} (first seen at {first.where})")

    def read_trees(self, stream: RowStream) -> int:
        """Nested export: one tree per row, root under ``prompt``, children under ``replies``."""
        n = 0
        for key, row in stream.rows():
            n += 1
            where = stream.where(key)
            root = row.get("prompt")
            if not isinstance(root, dict):
                raise DataError(f"{where}: missing required field 'prompt' (the root message object)")
            tree_id = row.get("message_tree_id") or root.get("message_id")
            stack: list[tuple[dict, str | None]] = [(root, None)]
            while stack:
                raw, parent_id = stack.pop()
                m = _message(raw, where, None if tree_id is None else str(tree_id), parent_id)
                self._add(m)
                replies = raw.get("replies") or ()
                if not isinstance(replies, list):
                    raise DataError(f"{where}: field 'replies' of message {m.id} is not a list")
                stack.extend((r, m.id) for r in replies)
        return n

    def read_messages(self, stream: RowStream) -> int:
        """Flat table: one row per message, linked by ``parent_id``, rows in any order."""
        n = 0
        for key, row in stream.rows(MESSAGE_COLUMNS):
            n += 1
            tree_id = row.get("message_tree_id")
            self._add(_message(row, stream.where(key), None if tree_id is None else str(tree_id), row.get("parent_id")))
        return n

    def emit(
        self,
        corpus: Corpus,
        *,
        lang: Iterable[str] | None,
        include_synthetic: bool,
        drop_orphans: bool,
        top_k: int | None,
    ) -> None:
        """Link, filter and write every kept tree's SFT examples and pairs into ``corpus``."""
        roots, orphans = self._link()
        self._check_cycles(roots, orphans)
        for o in orphans:
            if not drop_orphans:
                raise DataError(
                    f"{o.where}: message {o.id} has unknown parent_id {o.parent_id} (--drop-orphans drops such subtrees)"
                )
            corpus.dropped["orphan"] += _size(o)
        langs = None if lang is None else {x.lower() for x in lang}
        for root in sorted(roots, key=lambda r: (r.tree_id or r.id, r.id)):
            root.tree_id = root.tree_id or root.id
            reason = _drop_reason(root, langs, include_synthetic)
            if reason:
                corpus.dropped[reason] += _size(root)
            else:
                _emit_tree(root, corpus, langs, include_synthetic, top_k)

    def _link(self) -> tuple[list[Msg], list[Msg]]:
        roots, orphans = [], []
        for m in self.by_id.values():
            if m.parent_id is None:
                roots.append(m)
            else:
                parent = self.by_id.get(m.parent_id)
                if parent is None:
                    orphans.append(m)
                else:
                    parent.children.append(m)
        return roots, orphans

    def _check_cycles(self, roots: list[Msg], orphans: list[Msg]) -> None:
        """A message reachable from no root sits on a parent_id cycle."""
        reached = sum(_size(m) for m in roots) + sum(_size(m) for m in orphans)
        if reached != len(self.by_id):
            seen = {m.id for top in roots + orphans for m in _walk(top)}
            stuck = next(m for m in self.by_id.values() if m.id not in seen)
            raise DataError(f"{stuck.where}: message {stuck.id} is on a parent_id cycle")


def _walk(top: Msg) -> Iterator[Msg]:
    stack = [top]
    while stack:
        m = stack.pop()
        yield m
        stack.extend(m.children)


def _size(top: Msg) -> int:
    return sum(1 for _ in _walk(top))


def _drop_reason(m: Msg, langs: set[str] | None, include_synthetic: bool) -> str | None:
    if m.deleted:
        return "deleted"
    if m.review is False:
        return "review_failed"
    if langs is not None and m.lang not in langs:
        return "lang"
    if m.synthetic and not include_synthetic:
        return "synthetic"
    return None


def _emit_tree(root: Msg, corpus: Corpus, langs: set[str] | None, include_synthetic: bool, top_k: int | None) -> None:
    """Depth-first over kept messages; a dropped message takes its subtree with it.

    ``ok`` is False below an assistant reply ranked at position >= top_k among its kept
    ranked siblings, so ``--top-k`` prunes whole paths (unranked replies pass).
    """
    tree = root.tree_id
    dropped: Counter[str] = corpus.dropped
    root.pool = corpus.add_message(root.role, root.text)
    kept_count = 1
    stack: list[tuple[Msg, list[int], bool]] = [(root, [root.pool], True)]
    while stack:
        node, path, ok = stack.pop()
        if node.role == "assistant" and ok:
            corpus.add_sft(tree, node.id, path)
        kept: list[Msg] = []
        for child in sorted(node.children, key=Msg.sort_key):
            reason = _drop_reason(child, langs, include_synthetic)
            if reason:
                dropped[reason] += _size(child)
                continue
            child.pool = corpus.add_message(child.role, child.text)
            kept.append(child)
        kept_count += len(kept)
        ranked = [c for c in kept if c.rank is not None and c.role == "assistant"]
        if node.role == "user":
            for i, better in enumerate(ranked):
                for worse in ranked[i + 1 :]:
                    if better.rank != worse.rank and not corpus.drop_degenerate(better.text, worse.text):
                        corpus.add_pair(tree, path, [better.pool], [worse.pool], better.rank, worse.rank)
        position: dict[str, int] = {}  # 0 = best; ties share a position
        for i, c in enumerate(ranked):
            position[c.id] = position[ranked[i - 1].id] if i and ranked[i - 1].rank == c.rank else i
        for child in reversed(kept):
            passes = top_k is None or child.id not in position or position[child.id] < top_k
            stack.append((child, path + [child.pool], ok and passes))
    corpus.tree_messages[tree] = corpus.tree_messages.get(tree, 0) + kept_count
