"""The built data in memory, before it is split and written.

Every kept message's text is stored once in a pool; SFT conversations and pair prompts are
lists of pool indices, so a long shared context costs one Python string, not one per
example (an Open Assistant tree repeats its root in every path). The Arrow tables are
built from the pool with ``take``, at C speed.
"""

from __future__ import annotations

from array import array
from collections import Counter
from typing import Sequence

import numpy as np
import pyarrow as pa

DROP_REASONS = ("deleted", "review_failed", "lang", "synthetic", "orphan", "no_reply", "degenerate_pairs")
# Rows per Arrow chunk: keeps every chunk's string buffer far below Arrow's 2 GiB limit.
CHUNK_ROWS = 32768
_MESSAGE_TYPE = pa.struct([("role", pa.string()), ("content", pa.string())])


class MessageLists:
    """A column whose cells are lists of pool indices (offsets + flat, like Arrow's own lists)."""

    __slots__ = ("offsets", "flat")

    def __init__(self) -> None:
        self.offsets = array("q", [0])
        self.flat = array("q")

    def append(self, indices: Sequence[int]) -> None:
        self.flat.extend(indices)
        self.offsets.append(len(self.flat))

    def __len__(self) -> int:
        return len(self.offsets) - 1


class Corpus:
    """Kept messages, SFT examples and preference pairs, plus the counts for stats.json.

    ``tree_messages`` maps each kept tree to its number of kept messages (split stats);
    ``dropped`` counts removed messages by reason, plus ``no_reply`` (instruction rows
    without an assistant turn) and ``degenerate_pairs`` (pitfall 5).
    """

    def __init__(self) -> None:
        self.roles: list[str] = []
        self.texts: list[str] = []
        self.tree_messages: dict[str, int] = {}
        self.dropped: Counter[str] = Counter({reason: 0 for reason in DROP_REASONS})
        self.sft_messages = MessageLists()
        self.sft_tree: list[str] = []
        self.sft_message_id: list[str] = []
        self.pair_prompt = MessageLists()
        self.pair_chosen = MessageLists()
        self.pair_rejected = MessageLists()
        self.pair_tree: list[str] = []
        self.chosen_rank: list[int | None] = []
        self.rejected_rank: list[int | None] = []

    def add_message(self, role: str, text: str) -> int:
        self.roles.append(role)
        self.texts.append(text)
        return len(self.texts) - 1

    def add_sft(self, tree_id: str, message_id: str, messages: Sequence[int]) -> None:
        self.sft_messages.append(messages)
        self.sft_tree.append(tree_id)
        self.sft_message_id.append(message_id)

    def drop_degenerate(self, chosen: str, rejected: str) -> bool:
        """Count and report a pair whose answers are equal or empty (pitfall 5: zero gradient or NaN)."""
        a, b = chosen.strip(), rejected.strip()
        if a and b and a != b:
            return False
        self.dropped["degenerate_pairs"] += 1
        return True

    def add_pair(
        self,
        tree_id: str,
        prompt: Sequence[int],
        chosen: Sequence[int],
        rejected: Sequence[int],
        chosen_rank: int | None = None,
        rejected_rank: int | None = None,
    ) -> None:
        self.pair_prompt.append(prompt)
        self.pair_chosen.append(chosen)
        self.pair_rejected.append(rejected)
        self.pair_tree.append(tree_id)
        self.chosen_rank.append(chosen_rank)
        self.rejected_rank.append(rejected_rank)

    # Arrow tables ---------------------------------------------------------------------

    def _pool(self) -> tuple[pa.Array, pa.Array]:
        return pa.array(self.roles, pa.string()), pa.array(self.texts, pa.string())

    @staticmethod
    def _lists(pool: tuple[pa.Array, pa.Array], col: MessageLists) -> pa.ChunkedArray:
        roles, texts = pool
        offsets = np.frombuffer(col.offsets, dtype=np.int64)
        flat = np.frombuffer(col.flat, dtype=np.int64)
        chunks = []
        for start in range(0, max(len(col), 1), CHUNK_ROWS):
            stop = min(start + CHUNK_ROWS, len(col))
            lo, hi = offsets[start], offsets[stop]
            idx = pa.array(flat[lo:hi])
            values = pa.StructArray.from_arrays([roles.take(idx), texts.take(idx)], fields=list(_MESSAGE_TYPE))
            chunks.append(pa.ListArray.from_arrays(pa.array(offsets[start : stop + 1] - lo, pa.int32()), values))
        return pa.chunked_array(chunks, pa.list_(_MESSAGE_TYPE))

    def sft_table(self, pool: tuple[pa.Array, pa.Array] | None = None) -> pa.Table:
        pool = pool or self._pool()
        return pa.table(
            {
                "messages": self._lists(pool, self.sft_messages),
                "tree_id": pa.array(self.sft_tree, pa.string()),
                "message_id": pa.array(self.sft_message_id, pa.string()),
            }
        )

    def pairs_table(self, pool: tuple[pa.Array, pa.Array] | None = None) -> pa.Table:
        pool = pool or self._pool()
        return pa.table(
            {
                "prompt": self._lists(pool, self.pair_prompt),
                "chosen": self._lists(pool, self.pair_chosen),
                "rejected": self._lists(pool, self.pair_rejected),
                "tree_id": pa.array(self.pair_tree, pa.string()),
                "chosen_rank": pa.array(self.chosen_rank, pa.int64()),
                "rejected_rank": pa.array(self.rejected_rank, pa.int64()),
            }
        )
