"""The on-disk schema of a data folder, its writer, and readers for later stages.

``DIR/sft`` and ``DIR/pairs`` are ``datasets.DatasetDict`` folders with splits ``train``
and ``validation`` in TRL's conversational formats; ``DIR/stats.json`` holds the counts;
``DIR/manifest.json`` holds the fingerprint later stages put in their cache keys
(docs/pitfalls.md#7: a cache built from other data must never be reused).
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator

import pyarrow as pa

from rlhfkit.artifacts import fsync_path, read_json
from rlhfkit.errors import DataError

SPLITS = ("train", "validation")
# the columns a preference pair needs, in TRL's preference format (the reward and DPO stages read them)
PAIR_COLUMNS = ("prompt", "chosen", "rejected")


def features(kind: str):
    """The ``datasets.Features`` of ``DIR/sft`` (kind "sft") or ``DIR/pairs`` (kind "pairs")."""
    from datasets import Features, List, Value

    message = {"role": Value("string"), "content": Value("string")}
    if kind == "sft":
        return Features({"messages": List(message), "tree_id": Value("string"), "message_id": Value("string")})
    return Features(
        {
            "prompt": List(message),
            "chosen": List(message),
            "rejected": List(message),
            "tree_id": Value("string"),
            "chosen_rank": Value("int64"),
            "rejected_rank": Value("int64"),
        }
    )


@contextmanager
def quiet_datasets() -> Iterator[None]:
    """No 'Saving the dataset' bars on the CLI's stderr; restore the user's setting after.
    Wrap all concurrent ``save_splits`` calls in one: the setting is global."""
    import datasets

    was_enabled = not datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if was_enabled:
            datasets.enable_progress_bars()


def save_splits(batches: dict[str, Iterable[pa.Table]], kind: str, out: Path, fingerprint: str) -> None:
    """Write a DatasetDict folder (features of ``kind``) from each split's stream of batches.

    datasets writes the folder's metadata (saving empty splits); the rows then stream into
    each split's data file through datasets' own ArrowWriter, so the whole output table is
    never in memory at once.
    """
    from datasets import Dataset, DatasetDict, DatasetInfo
    from datasets.arrow_writer import ArrowWriter

    schema = features(kind)
    empty = {
        split: Dataset(schema.arrow_schema.empty_table(), info=DatasetInfo(features=schema), split=split,
                       fingerprint=f"{fingerprint}-{kind}-{split}")  # fmt: skip
        for split in batches
    }
    DatasetDict(empty).save_to_disk(str(out), num_shards=dict.fromkeys(batches, 1))
    for split, parts in batches.items():
        (data_file,) = read_json(out / split / "state.json")["_data_files"]
        path = out / split / data_file["filename"]
        writer = ArrowWriter(features=schema, path=str(path))
        # The disk catches up while later batches are built: an fsync runs in the background
        # whenever the last one is done, so the final fsync waits only for the tail.
        with ThreadPoolExecutor(max_workers=1) as flusher:
            flushing = None
            try:
                for table in parts:
                    writer.write_table(table)
                    if flushing is None or flushing.done():
                        flushing = flusher.submit(fsync_path, path)
                writer.finalize()
            finally:
                writer.close()
        fsync_path(path)


def _sft_conversations(path: str | os.PathLike, split: str) -> Iterator[list[dict]]:
    """Each SFT example's ``messages`` of one split, in file order."""
    import datasets

    folder = Path(path) / "sft"
    if not folder.is_dir():
        raise DataError(f"{path}: not a data folder (no sft/ inside; run 'rlhfkit data build')")
    ds = datasets.load_from_disk(str(folder))
    if split not in ds:
        raise DataError(f"{folder}: no split '{split}' (has {', '.join(ds)})")
    for table in ds[split].select_columns(["messages"]).with_format("arrow").iter(batch_size=4096):
        yield from table.column("messages").to_pylist()


def prompts_from_data_dir(path: str | os.PathLike, split: str = "train") -> list[list[dict]]:
    """Distinct user-turn contexts (each SFT example's ``messages[:-1]``), first-seen order.

    These are the prompts PPO generates from: the context every SFT answer was given.
    """
    seen: set[tuple] = set()
    prompts = []
    for messages in _sft_conversations(path, split):
        context = messages[:-1]
        key = tuple((m["role"], m["content"]) for m in context)
        if context and key not in seen:
            seen.add(key)
            prompts.append(context)
    return prompts


def demonstrations_from_data_dir(path: str | os.PathLike, split: str = "train") -> list[list[dict]]:
    """The SFT examples themselves (context + the demonstrated assistant reply): PPO-ptx's data."""
    return [m for m in _sft_conversations(path, split) if len(m) > 1 and m[-1]["role"] == "assistant"]


def data_fingerprint(path: str | os.PathLike) -> str:
    """The fingerprint of a data folder's inputs, options and code version (for cache keys)."""
    manifest = Path(path) / "manifest.json"
    if not manifest.is_file():
        raise DataError(f"{path}: not a data folder (no manifest.json; run 'rlhfkit data build')")
    return read_json(manifest)["fingerprint"]
