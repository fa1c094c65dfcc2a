"""The split by tree: every row of a tree lands in the same split, decided by a hash of
(seed, tree id) alone, so adding or removing other trees never moves a tree."""

from __future__ import annotations

import hashlib
from array import array
from typing import Container, Iterable

import numpy as np

from rlhfkit.data.corpus import Corpus, int64_view


def _unit(seed: int, tree_id: str) -> float:
    """A uniform number in [0, 1) from (seed, tree_id) alone: a tree's split ignores other trees."""
    digest = hashlib.blake2b(f"{seed}\x00{tree_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def assign_splits(
    tree_ids: Iterable[str], seed: int, val_fraction: float, with_rows: Container[str] | None = None
) -> dict[str, str]:
    """Tree -> 'train' | 'validation' by hash of (seed, tree id); then, among the trees
    ``with_rows`` (default: all), make train non-empty and, when val_fraction > 0 and
    there are >= 2 of them, validation non-empty, by moving one tree."""
    unit = {t: _unit(seed, t) for t in tree_ids}
    split = {t: "validation" if u < val_fraction else "train" for t, u in unit.items()}
    movable = [t for t in unit if with_rows is None or t in with_rows]
    if movable and all(split[t] == "validation" for t in movable):
        split[max(movable, key=lambda t: (unit[t], t))] = "train"
    if val_fraction > 0 and len(movable) >= 2 and all(split[t] == "train" for t in movable):
        split[min(movable, key=lambda t: (unit[t], t))] = "validation"
    return split


def _rows_by_split(row_trees: array, tree_rank: np.ndarray, in_val: np.ndarray) -> dict[str, np.ndarray]:
    trees = int64_view(row_trees)
    order = np.argsort(tree_rank[trees], kind="stable")
    val = in_val[trees][order]
    return {"train": order[~val], "validation": order[val]}


def split_corpus(corpus: Corpus, seed: int, val_fraction: float) -> tuple[np.ndarray, dict, dict]:
    """(validation flag per tree, SFT row indices per split, pair row indices per split).

    Rows are ordered canonically: trees by their sort key (oasst trees by id, other rows
    in input order), then rows as emitted within the tree.
    """
    with_rows = {corpus.tree_ids[t] for t in {*corpus.sft_tree, *corpus.pair_tree}}
    split = assign_splits(corpus.tree_ids, seed, val_fraction, with_rows)
    in_val = np.array([split[t] == "validation" for t in corpus.tree_ids], dtype=bool)
    tree_rank = np.empty(len(corpus.tree_ids), dtype=np.int64)
    tree_rank[sorted(range(len(corpus.tree_ids)), key=corpus.tree_order.__getitem__)] = np.arange(len(tree_rank))
    return in_val, _rows_by_split(corpus.sft_tree, tree_rank, in_val), _rows_by_split(corpus.pair_tree, tree_rank, in_val)
