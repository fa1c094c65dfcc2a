"""Open Assistant message trees: read nested exports and flat message tables, filter, emit.

Both shapes are walked as the same nested ``Message`` structs: a nested export's row is
decoded straight into them (root under ``prompt``, children under ``replies``; fields the
build does not read are skipped by the decoder); flat-table rows are collected, then
linked by ``parent_id`` into that shape. A nested tree is emitted as soon as its line is
read, so memory holds the kept texts, not the parsed JSON. Output order is canonical
(siblings by rank, unranked last, then message_id; trees sorted by the writer), so a
shuffled flat table gives exactly the datasets of its nested export.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterable, Iterator

import msgspec

from rlhfkit.data.corpus import Corpus
from rlhfkit.data.sources import RowStream
from rlhfkit.errors import DataError

ROLES = {"prompter": "user", "user": "user", "assistant": "assistant"}


class Message(msgspec.Struct):
    """The fields of an Open Assistant message that the build reads. Their types stay
    loose (``_fields`` checks and converts them where used), so that numeric ids or the
    float ranks of tables read as they always did; only the shape is fixed: ``replies``
    is a list of messages, and anything else is named as an error with its JSON path."""

    message_id: Any = None
    role: Any = None
    text: Any = None
    rank: Any = None
    deleted: Any = None
    review_result: Any = None
    lang: Any = None
    synthetic: Any = None
    parent_id: Any = None  # flat tables
    message_tree_id: Any = None  # flat tables
    replies: list[Message] | None = None


class TreeRow(msgspec.Struct):
    """One line of a nested export."""

    prompt: Message | None = None
    message_tree_id: Any = None


# Columns of the public oasst1/oasst2 message tables that the build reads.
MESSAGE_COLUMNS = tuple(f for f in Message.__struct_fields__ if f != "replies")


class _BadMessage(Exception):
    """A message lacks a field; the caller adds the location it knows."""

    def __init__(self, problem: str, message: Message):
        super().__init__(problem)
        self.message = message


def _rank(value: object, mid: str, message: Message) -> int | None:
    """Ranks are ints; tables store them as nullable floats (NaN or None for unranked)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value):
        raise _BadMessage(f"message {mid} has a non-integer rank {value!r}", message)
    return int(value)


def _fields(m: Message) -> tuple[str, str, str, int | None]:
    """(message_id, role, text, rank) of a message, checked."""
    mid, role, text = m.message_id, m.role, m.text
    if mid is None:
        raise _BadMessage("missing required field 'message_id'", m)
    mid = mid if type(mid) is str else str(mid)
    if text is None or role is None:
        raise _BadMessage(f"missing required field '{'text' if text is None else 'role'}' (message {mid})", m)
    if type(text) is not str:
        raise _BadMessage(f"field 'text' of message {mid} is not a string", m)
    mapped = ROLES.get(role) if isinstance(role, str) else None
    if mapped is None:
        raise _BadMessage(f"message {mid} has unknown role {role!r} (expected prompter or assistant)", m)
    rank = m.rank
    if rank is not None and type(rank) is not int:
        rank = _rank(rank, mid, m)
    return mid, mapped, text, rank


def _ranked_replies(kept: list[tuple]) -> list[tuple]:
    """The ranked assistant replies among ``TreeReader._kept`` tuples, in their (rank) order."""
    return [k for k in kept if not k[0] and k[4] == "assistant"]


def _walk(top: Message) -> Iterator[Message]:
    stack = [top]
    while stack:
        m = stack.pop()
        yield m
        stack.extend(m.replies or ())


def _size(m: Message) -> int:
    """Messages in the subtree of ``m`` (all of them leave when ``m`` is dropped)."""
    return sum(1 for _ in _walk(m))


class TreeReader:
    """Filters Open Assistant trees into a Corpus: SFT paths and ranked sibling pairs."""

    def __init__(self, corpus: Corpus, *, lang: Iterable[str] | None, include_synthetic: bool, top_k: int | None):
        self.corpus = corpus
        self.langs = None if lang is None else {x.lower() for x in lang}
        self.include_synthetic = include_synthetic
        self.top_k = top_k
        self.ids: set[str] = set()
        self.flat: dict[str, Message] = {}
        self.flat_where: dict[int, str] = {}  # id() of a flat-table message -> its file:line
        self._add_message = corpus.add_message
        self._selective = self.langs is not None or not include_synthetic

    def read_trees(self, stream: RowStream) -> int:
        """Nested export: one tree per row, emitted at once."""
        n = 0
        for key, row in stream.rows(as_type=TreeRow):
            n += 1
            root = row.prompt
            if root is None:
                raise DataError(f"{stream.where(key)}: missing required field 'prompt' (the root message object)")
            tree_id = row.message_tree_id or root.message_id
            self._emit(root, None if tree_id is None else str(tree_id), lambda: stream.where(key))
        return n

    def read_messages(self, stream: RowStream) -> int:
        """Flat table rows, in any order; linked and emitted by ``finish``."""
        n = 0
        for key, row in stream.rows(MESSAGE_COLUMNS, as_type=Message):
            n += 1
            where = stream.where(key)
            if row.message_id is None:
                raise DataError(f"{where}: missing required field 'message_id'")
            mid = str(row.message_id)
            first = self.flat.setdefault(mid, row)
            if first is not row:
                raise DataError(f"{where}: duplicate message_id {mid} (first at {self.flat_where[id(first)]})")
            self.flat_where[id(row)] = where
            row.replies = []
        return n

    def finish(self, drop_orphans: bool) -> None:
        """Link the flat rows by parent_id, check orphans and cycles, emit their trees."""
        roots, orphans = [], []
        for row in self.flat.values():
            parent_id = row.parent_id
            parent = None if parent_id is None else self.flat.get(str(parent_id))
            if parent_id is None:
                roots.append(row)
            elif parent is None:
                orphans.append(row)
            else:
                parent.replies.append(row)
        reached = sum(_size(r) for r in roots) + sum(_size(o) for o in orphans)
        if reached != len(self.flat):
            seen = {id(m) for top in roots + orphans for m in _walk(top)}
            stuck = next(m for m in self.flat.values() if id(m) not in seen)
            raise DataError(f"{self.flat_where[id(stuck)]}: message {stuck.message_id} is on a parent_id cycle")
        for o in orphans:
            if not drop_orphans:
                raise DataError(
                    f"{self.flat_where[id(o)]}: message {o.message_id} has unknown parent_id {o.parent_id} "
                    "(--drop-orphans drops such subtrees)"
                )
            self.corpus.dropped["orphan"] += _size(o)
        for root in roots:
            tree_id = root.message_tree_id or root.message_id
            self._emit(root, str(tree_id), lambda: self.flat_where[id(root)])
        self.flat, self.flat_where = {}, {}

    def _drop_reason(self, m: Message) -> str | None:
        if m.deleted:
            return "deleted"
        if m.review_result is False:
            return "review_failed"
        if self.langs is not None and str(m.lang).lower() not in self.langs:
            return "lang"
        if not self.include_synthetic and m.synthetic:
            return "synthetic"
        return None

    def _kept(self, messages: Iterable[Message]) -> list[tuple]:
        """(unranked, rank or 0, message_id, rank, role, text, pool index, message) of each kept
        message, sorted (the first three fields order siblings); a dropped message is counted
        with its subtree.

        The hot path of the build, hence one call per group of siblings rather than per
        message, and the inlined fast checks: anything unusual (a missing field, another
        type, an unknown role) goes to ``_fields``, which converts or names the problem.
        """
        kept, ids, add_message = [], self.ids, self._add_message
        for m in messages:
            if m.deleted or m.review_result is False or self._selective:
                reason = self._drop_reason(m)
                if reason:
                    self.corpus.dropped[reason] += _size(m)
                    continue
            mid, text, rank = m.message_id, m.text, m.rank
            try:
                role = ROLES[m.role]
            except (KeyError, TypeError):
                role = None
            if type(mid) is not str or type(text) is not str or role is None or (rank is not None and type(rank) is not int):
                mid, role, text, rank = _fields(m)
            if mid in ids:
                raise _BadMessage(f"duplicate message_id {mid}", m)
            ids.add(mid)
            kept.append((rank is None, rank or 0, mid, rank, role, text, add_message(role, text), m))
        if len(kept) > 1:
            kept.sort()
        return kept

    def _emit(self, root: Message, tree_id: str | None, where: Callable[[], str]) -> None:
        """Depth-first over kept messages; a dropped message takes its subtree with it. A kept
        tree must start with a prompter message and alternate roles, else it is refused.

        A path holds the pool indices from the root: the conversation of an SFT example
        (when it ends at an assistant reply) or the prompt of pairs (at a user message).
        """
        corpus = self.corpus
        try:
            top = self._kept((root,))
            if not top:
                return
            tree_id = tree_id or top[0][2]
            if top[0][4] != "user":  # its paths would be SFT examples without a user turn
                raise _BadMessage(f"message {top[0][2]} is the root of tree {tree_id} but has role {root.role}; "
                                  "a tree starts with the prompter's message (fix or remove the tree)", root)
            tree = corpus.add_tree(tree_id, (0, tree_id, 0))
            kept_count = 1
            stack = [(top[0], (top[0][6],), True)]
            while stack:
                (_, _, mid, _, role, _, _, m), path, ok = stack.pop()
                if ok and role == "assistant":
                    corpus.add_sft(tree, mid, path)
                replies = m.replies
                if not replies:
                    continue
                kept = self._kept(replies)
                for k in kept:  # roles alternate: many chat templates refuse two turns of one role in a row
                    if k[4] == role:
                        raise _BadMessage(f"message {k[2]} ({k[7].role}) replies to {m.role} message {mid} in tree "
                                          f"{tree_id}; roles must alternate prompter, assistant (fix or remove the tree)", k[7])
                kept_count += len(kept)
                if role == "user" and len(kept) > 1:
                    self._pairs(tree, path, kept)
                if self.top_k is None:
                    stack.extend([(k, (*path, k[6]), ok) for k in reversed(kept)])
                else:
                    late = self._late(kept)
                    stack.extend([(k, (*path, k[6]), ok and k[2] not in late) for k in reversed(kept)])
            corpus.tree_messages[tree] += kept_count
        except _BadMessage as e:
            raise DataError(f"{self.flat_where.get(id(e.message)) or where()}: {e}") from None

    def _pairs(self, tree: int, prompt: tuple[int, ...], kept: list[tuple]) -> None:
        """Every two differently ranked assistant replies to ``prompt``, the better first
        (``kept`` is sorted, so by rank); degenerate pairs are counted and skipped."""
        corpus = self.corpus
        ranked = _ranked_replies(kept)
        if len(ranked) < 2:
            return
        pairs = []
        for i, (_, _, _, rank, _, text, pool, _) in enumerate(ranked):
            for _, _, _, worse_rank, _, worse_text, worse_pool, _ in ranked[i + 1 :]:
                if rank != worse_rank and not corpus.drop_degenerate(text, worse_text):
                    pairs.append((pool, worse_pool, rank, worse_rank))
        if pairs:
            corpus.add_ranked_pairs(tree, corpus.prompts.append(prompt), pairs)

    def _late(self, kept: list[tuple]) -> set[str]:
        """--top-k: the ids of the assistant replies in ``kept`` (sorted) at position >= top_k
        among the ranked ones (0 = best, ties share a position); their paths are not SFT
        examples, and neither is anything below them. Unranked replies pass."""
        ranked = _ranked_replies(kept)
        late, position = set(), 0
        for i, k in enumerate(ranked):
            if i and ranked[i - 1][3] != k[3]:
                position = i
            if position >= self.top_k:
                late.add(k[2])
        return late
