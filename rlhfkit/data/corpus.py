"""The built data in memory, before it is split and written.

Every kept message is encoded once into a UTF-8 pool (one bytearray); SFT conversations
and pair prompts are lists of pool indices, so a shared context costs its bytes once, not
once per example (an Open Assistant tree repeats its root in every path), and no Python
string outlives the row it came from. Rows refer to trees by number. The Arrow tables are
gathered from the pool with ``take``, at C speed, one batch at a time.
"""

from __future__ import annotations

from array import array
from collections import Counter
from typing import Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

DROP_REASONS = ("deleted", "review_failed", "lang", "synthetic", "orphan", "no_reply", "no_prompt", "degenerate_pairs")
ROLE_NAMES = ("user", "assistant", "system")
_ROLE_CODES = {name: code for code, name in enumerate(ROLE_NAMES)}
# Output is built and written in batches: bounded memory, and each batch's text stays far
# below the 2 GiB that a string array's int32 offsets allow.
BATCH_ROWS = 4096
BATCH_BYTES = 256 << 20
_MESSAGE_TYPE = pa.struct([("role", pa.string()), ("content", pa.string())])


def int64_view(values: array) -> np.ndarray:
    """A zero-copy numpy view of an array("q")."""
    return np.frombuffer(values, dtype=np.int64)


class MessageLists:
    """A column whose cells are lists of pool indices (offsets + flat, like Arrow's own lists)."""

    __slots__ = ("offsets", "flat")

    def __init__(self) -> None:
        self.offsets = array("q", [0])
        self.flat = array("q")

    def append(self, indices: Sequence[int]) -> int:
        self.flat.extend(indices)
        self.offsets.append(len(self.flat))
        return len(self.offsets) - 2

    def __len__(self) -> int:
        return len(self.offsets) - 1


class Corpus:
    """Kept messages, SFT examples and preference pairs, plus the counts for stats.json.

    Trees are numbered in order of arrival: ``tree_ids``, their kept ``tree_messages``
    (split stats) and ``tree_order``, the sort key that makes the output independent of
    the input's row order (oasst trees by id, other rows in input order). ``dropped``
    counts removed messages by reason, plus ``no_reply`` (instruction rows without an
    assistant turn), ``no_prompt`` (rows without a user turn before the last assistant turn)
    and ``degenerate_pairs`` (docs/pitfalls.md#5).
    """

    def __init__(self) -> None:
        self._text = bytearray()
        self._ends = array("q", [0])
        self._roles = array("b")
        self.tree_ids: list[str] = []
        self.tree_order: list[tuple] = []
        self.tree_messages = array("q")
        self._tree_index: dict[str, int] = {}
        self.dropped: Counter[str] = Counter({reason: 0 for reason in DROP_REASONS})
        self.sft_messages = MessageLists()
        self.sft_tree = array("q")
        self.sft_message_id: list[str] = []
        self.prompts = MessageLists()  # each pair prompt once: siblings' pairs share it
        self.pair_prompt = array("q")
        self.pair_chosen = MessageLists()
        self.pair_rejected = MessageLists()
        self.pair_tree = array("q")
        self.chosen_rank: list[int | None] = []
        self.rejected_rank: list[int | None] = []

    def add_message(self, role: str, text: str) -> int:
        """Pool index of a new message. Lone surrogates (valid JSON, invalid UTF-8) become '?'."""
        try:
            self._text += text.encode()
        except UnicodeEncodeError:
            self._text += text.encode("utf-8", "replace")
        self._ends.append(len(self._text))
        self._roles.append(_ROLE_CODES[role])
        return len(self._roles) - 1

    def add_tree(self, tree_id: str, order: tuple) -> int:
        """The number of tree ``tree_id``, registered on first sight with its sort key."""
        index = self._tree_index.get(tree_id)
        if index is None:
            index = self._tree_index[tree_id] = len(self.tree_ids)
            self.tree_ids.append(tree_id)
            self.tree_order.append(order)
            self.tree_messages.append(0)
        return index

    def add_sft(self, tree: int, message_id: str, messages: Sequence[int]) -> None:
        col = self.sft_messages
        col.flat.extend(messages)
        col.offsets.append(len(col.flat))
        self.sft_tree.append(tree)
        self.sft_message_id.append(message_id)

    def drop_degenerate(self, chosen: str, rejected: str) -> bool:
        """Count and report a pair whose answers are equal or empty (docs/pitfalls.md#5: zero gradient or NaN)."""
        a, b = chosen.strip(), rejected.strip()
        if a and b and a != b:
            return False
        self.dropped["degenerate_pairs"] += 1
        return True

    def add_pair(
        self,
        tree: int,
        prompt: int,
        chosen: Sequence[int],
        rejected: Sequence[int],
        chosen_rank: int | None = None,
        rejected_rank: int | None = None,
    ) -> None:
        """A pair whose prompt is ``prompt = self.prompts.append(messages)``."""
        self.pair_prompt.append(prompt)
        self.pair_chosen.flat.extend(chosen)
        self.pair_chosen.offsets.append(len(self.pair_chosen.flat))
        self.pair_rejected.flat.extend(rejected)
        self.pair_rejected.offsets.append(len(self.pair_rejected.flat))
        self.pair_tree.append(tree)
        self.chosen_rank.append(chosen_rank)
        self.rejected_rank.append(rejected_rank)

    def add_ranked_pairs(self, tree: int, prompt: int, pairs: list[tuple[int, int, int, int]]) -> None:
        """Pairs of one-message answers to one prompt, ``(chosen, rejected, chosen_rank,
        rejected_rank)`` with pool indices: the Open Assistant case, added in bulk (there are
        about as many pairs as messages)."""
        n = len(pairs)
        chosen, rejected, chosen_rank, rejected_rank = zip(*pairs)
        self.pair_prompt.extend([prompt] * n)
        for col, answers in ((self.pair_chosen, chosen), (self.pair_rejected, rejected)):
            start = len(col.flat)
            col.flat.extend(answers)
            col.offsets.extend(range(start + 1, start + n + 1))
        self.pair_tree.extend([tree] * n)
        self.chosen_rank.extend(chosen_rank)
        self.rejected_rank.extend(rejected_rank)

    # Arrow tables ---------------------------------------------------------------------

    def _pool(self) -> tuple[pa.Array, pa.Array]:
        """(roles, texts) of the pool as Arrow arrays; texts share the bytearray's memory."""
        n = len(self._roles)
        texts = pa.Array.from_buffers(pa.large_string(), n, [None, pa.py_buffer(self._ends), pa.py_buffer(self._text)])
        roles = pc.take(pa.array(ROLE_NAMES), pa.array(np.frombuffer(self._roles, dtype=np.int8)))
        return roles, texts

    def _row_bytes(self, col: MessageLists) -> np.ndarray:
        """Text bytes of every row of ``col``."""
        cum = np.concatenate([[0], np.cumsum(np.diff(int64_view(self._ends))[int64_view(col.flat)])])
        offsets = int64_view(col.offsets)
        return cum[offsets[1:]] - cum[offsets[:-1]]

    @staticmethod
    def _batches(row_bytes: np.ndarray, rows: np.ndarray) -> Iterator[np.ndarray]:
        """``rows`` cut every BATCH_ROWS rows and wherever the text crosses a BATCH_BYTES multiple."""
        if not len(rows):
            return
        end = np.cumsum(row_bytes[rows])
        grid = np.arange(1, int(end[-1]) // BATCH_BYTES + 1, dtype=np.int64) * BATCH_BYTES
        cuts = sorted({*range(0, len(rows), BATCH_ROWS), len(rows), *np.searchsorted(end, grid, "right").tolist()})
        for a, b in zip(cuts, cuts[1:]):
            yield rows[a:b]

    @staticmethod
    def _lists(pool: tuple[pa.Array, pa.Array], col: MessageLists, rows: np.ndarray) -> pa.ListArray:
        """The message lists of ``rows`` (in that order), gathered from the pool."""
        roles, texts = pool
        offsets = int64_view(col.offsets)
        begin = offsets[rows]
        lengths = offsets[rows + 1] - begin
        new_offsets = np.zeros(len(rows) + 1, dtype=np.int64)
        np.cumsum(lengths, out=new_offsets[1:])
        gather = np.repeat(begin - new_offsets[:-1], lengths) + np.arange(new_offsets[-1])
        idx = pa.array(int64_view(col.flat)[gather])
        values = pa.StructArray.from_arrays(
            [pc.take(roles, idx), pc.take(texts, idx).cast(pa.string())], fields=list(_MESSAGE_TYPE)
        )
        return pa.ListArray.from_arrays(pa.array(new_offsets, pa.int32()), values)

    def sft_batches(self, rows: np.ndarray | None = None) -> Iterator[pa.Table]:
        """SFT rows (all, or ``rows`` in that order) in TRL's conversational format, in batches."""
        rows = np.arange(len(self.sft_tree)) if rows is None else rows
        pool = self._pool()
        tree_ids = pa.array(self.tree_ids, pa.string())
        trees = int64_view(self.sft_tree)
        message_ids = pa.array(self.sft_message_id, pa.string())
        for part in self._batches(self._row_bytes(self.sft_messages), rows):
            yield pa.table(
                {
                    "messages": self._lists(pool, self.sft_messages, part),
                    "tree_id": pc.take(tree_ids, trees[part]),
                    "message_id": pc.take(message_ids, part),
                }
            )

    def pair_batches(self, rows: np.ndarray | None = None) -> Iterator[pa.Table]:
        """Pairs (all, or ``rows`` in that order) in TRL's conversational preference format, in batches."""
        rows = np.arange(len(self.pair_tree)) if rows is None else rows
        pool = self._pool()
        tree_ids = pa.array(self.tree_ids, pa.string())
        trees = int64_view(self.pair_tree)
        prompt_of = int64_view(self.pair_prompt)
        chosen_rank = pa.array(self.chosen_rank, pa.int64())
        rejected_rank = pa.array(self.rejected_rank, pa.int64())
        sizes = self._row_bytes(self.prompts)[prompt_of] + self._row_bytes(self.pair_chosen)
        for part in self._batches(sizes + self._row_bytes(self.pair_rejected), rows):
            yield pa.table(
                {
                    "prompt": self._lists(pool, self.prompts, prompt_of[part]),
                    "chosen": self._lists(pool, self.pair_chosen, part),
                    "rejected": self._lists(pool, self.pair_rejected, part),
                    "tree_id": pc.take(tree_ids, trees[part]),
                    "chosen_rank": pc.take(chosen_rank, part),
                    "rejected_rank": pc.take(rejected_rank, part),
                }
            )
