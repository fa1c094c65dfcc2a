"""``rlhfkit data build``: sources -> filtered trees -> SFT examples and pairs -> split by tree.

Everything is read and checked before the output folder is touched, and the folder is
written through ``atomic_dir``, so bad input leaves no folder behind.
"""

from __future__ import annotations

import gc
import hashlib
import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np

from rlhfkit import __version__
from rlhfkit.artifacts import StageResult, atomic_dir, check_output_dir, locks_output, write_json_atomic
from rlhfkit.config import field
from rlhfkit.data.corpus import Corpus, int64_view
from rlhfkit.data.formats import FORMATS, detect_format, read_rows
from rlhfkit.data.oasst import TreeReader
from rlhfkit.data.output import SPLITS, quiet_datasets, save_splits
from rlhfkit.data.split import split_corpus
from rlhfkit.data.sources import RowStream, dataset_streams, open_source
from rlhfkit.errors import ConfigError, DataError

logger = logging.getLogger("rlhfkit")

# Bump when the same inputs and options would give different output (cache keys, docs/pitfalls.md#7).
OUTPUT_VERSION = 1


@dataclass
class DataBuildConfig:
    """Options of ``rlhfkit data build``."""

    sources: list[str] = field(help="export files (.jsonl, .jsonl.gz, .json, .parquet), saved dataset folders or hub ids")
    out: str = field(help="output folder; it appears only when complete")
    lang: list[str] | None = field(
        None, help="keep only Open Assistant messages in these languages (e.g. [en, de]); None keeps all"
    )
    val_fraction: float = field(0.05, help="expected fraction of trees in the validation split, in [0, 1)")
    seed: int = field(0, help="seed of the split by tree (a hash of seed and tree id)")
    top_k: int | None = field(
        None, help="SFT from Open Assistant trees: keep an example only if every assistant reply on its path "
        "is among the K best of its kept ranked siblings (fewer than K rank strictly better; unranked replies pass)",
    )  # fmt: skip
    include_synthetic: bool = field(
        True, help="keep Open Assistant messages marked synthetic; False drops them with their subtrees"
    )
    drop_orphans: bool = field(False, help="drop subtrees whose parent_id is unknown instead of failing")
    format: str | None = field(None, help=f"force the input format instead of detecting it: {', '.join(FORMATS)}")

    def validate(self) -> list[str]:
        problems = []
        if not isinstance(self.sources, list) or not all(isinstance(s, (str, os.PathLike)) and s for s in self.sources):
            problems.append("sources: expected a list of file, folder or hub id strings")
        if not self.out:
            problems.append("out: an output folder is required")
        if self.lang is not None and (not self.lang or not all(isinstance(x, str) and x.strip() for x in self.lang)):
            problems.append(f"lang: expected a non-empty list of language codes, got {self.lang!r}")
        if not isinstance(self.val_fraction, (int, float)) or not 0 <= self.val_fraction < 1:
            problems.append(f"val_fraction: must be in [0, 1), got {self.val_fraction!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            problems.append(f"seed: expected an integer, got {self.seed!r}")
        if self.top_k is not None and (isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 1):
            problems.append(f"top_k: must be an integer >= 1, got {self.top_k!r}")
        if self.format is not None and self.format not in FORMATS:
            problems.append(f"format: must be one of {', '.join(FORMATS)}, got {self.format!r}")
        return problems


def _detect(stream: RowStream) -> str | None:
    """The format of the stream's first row; None when the stream has no rows."""
    for _key, row in stream.rows():
        fmt = detect_format(row)
        if fmt is None:
            raise DataError(
                f"{stream.label}: cannot detect the format from fields {', '.join(sorted(row)) or '(none)'}; "
                f"tried {', '.join(FORMATS)} (use --format)"
            )
        return fmt
    return None


def _stem(stream: RowStream, used: set[str]) -> str:
    """A synthetic-tree-id prefix unique across sources (two 'train.jsonl' must not merge)."""
    stem, n = stream.stem, 1
    while stem in used:
        n += 1
        stem = f"{stream.stem}#{n}"
    used.add(stem)
    return stem


@contextmanager
def _gc_paused() -> Iterator[None]:
    """Pause the cyclic GC while reading: the rows kept (a flat table's messages) hold no
    cycles, and the GC would otherwise rescan them again and again (up to ~30% of the time)."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def load_sources(
    sources: Sequence[str | os.PathLike] = (),
    *,
    datasets: Iterable[Any] | None = None,
    lang: Iterable[str] | None = None,
    include_synthetic: bool = True,
    drop_orphans: bool = False,
    top_k: int | None = None,
    format: str | None = None,
) -> tuple[Corpus, list[dict]]:
    """Read, check and filter every source into one Corpus; also return what was read.

    Nested Open Assistant trees are emitted as read; flat message tables of all sources
    are linked together at the end (a tree may span tables); other formats are converted
    row by row. Raises DataError naming the file, line and field.
    """
    streams_by_source = [(os.fspath(s), open_source(os.fspath(s))) for s in sources]
    for i, ds in enumerate(datasets or ()):
        name = getattr(getattr(ds, "info", None), "dataset_name", None) or f"dataset{i}"
        streams_by_source.append((f"datasets[{i}]", dataset_streams(ds, f"datasets[{i}]", name)))
    if not streams_by_source:
        raise DataError("no input: give at least one SOURCE (or datasets=)")
    corpus, used, read = Corpus(), set(), []
    trees = TreeReader(corpus, lang=lang, include_synthetic=include_synthetic, top_k=top_k)
    with _gc_paused():
        for group, (label, streams) in enumerate(streams_by_source, 1):
            rows = 0
            for stream in streams:
                fmt = format or _detect(stream)
                if fmt is None:
                    continue  # an empty split
                if fmt == "oasst-trees":
                    n = trees.read_trees(stream)
                elif fmt == "oasst-messages":
                    n = trees.read_messages(stream)
                else:
                    n = read_rows(stream, fmt, corpus, _stem(stream, used), group)
                rows += n
                read.append({"source": stream.label, "format": fmt, "rows": n, "digest": stream.digest()})
            if rows == 0:
                raise DataError(f"{label}: empty input (no rows)")
        trees.finish(drop_orphans)
    return corpus, read


def _warn_skipped_rows(corpus: Corpus) -> None:
    """One line for instruction rows that gave no SFT example: legitimate input, but a user
    would otherwise learn of them only from stats.json."""
    why = {"no_prompt": "with no user turn before the assistant's reply", "no_reply": "with no assistant reply"}
    parts = [f"{n} row{'s' * (n != 1)} {text}" for key, text in why.items() if (n := corpus.dropped[key])]
    if parts:
        logger.warning("data build: skipped %s (counted in stats.json 'dropped')", " and ".join(parts))


def _stats(corpus: Corpus, in_val: np.ndarray, sft_rows: dict, pair_rows: dict) -> dict[str, Any]:
    """stats.json: counts after filtering, in total and per split, and the drops by reason."""
    messages = int64_view(corpus.tree_messages)
    per = {}
    for name, trees in (("train", ~in_val), ("validation", in_val)):
        per[name] = {"trees": int(trees.sum()), "messages": int(messages[trees].sum()),
                     "sft_examples": len(sft_rows[name]), "pairs": len(pair_rows[name])}  # fmt: skip
    stats: dict[str, Any] = {k: sum(per[s][k] for s in SPLITS) for k in per["train"]}
    stats["dropped"] = dict(corpus.dropped)
    stats["splits"] = per
    return stats


def _fingerprint(config: DataBuildConfig, read: list[dict]) -> str:
    options = {k: v for k, v in asdict(config).items() if k not in ("sources", "out")}
    key = {"output_version": OUTPUT_VERSION, "rlhfkit": __version__, "options": options,
           "inputs": [(r["format"], r["digest"]) for r in read]}  # fmt: skip
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]


@locks_output("out")
def build_data(config: DataBuildConfig, *, datasets: list | None = None) -> StageResult:
    """Build ``config.out`` (sft/, pairs/, stats.json, manifest.json) from sources and datasets."""
    problems = config.validate()
    if problems:
        raise ConfigError("; ".join(problems))
    out = Path(config.out)
    check_output_dir(out, "data")  # a file, a user's folder, or one inside a run or stage: refused before any work
    corpus, read = load_sources(
        config.sources, datasets=datasets, lang=config.lang, include_synthetic=config.include_synthetic,
        drop_orphans=config.drop_orphans, top_k=config.top_k, format=config.format,
    )  # fmt: skip
    if not corpus.sft_tree and not corpus.pair_tree:
        dropped = ", ".join(f"{k} {v}" for k, v in corpus.dropped.items() if v) or "none"
        raise DataError(f"no SFT examples or pairs left after filtering (dropped: {dropped})")
    _warn_skipped_rows(corpus)
    in_val, sft_rows, pair_rows = split_corpus(corpus, config.seed, config.val_fraction)
    stats = _stats(corpus, in_val, sft_rows, pair_rows)
    fingerprint = _fingerprint(config, read)
    manifest = {"fingerprint": fingerprint, "output_version": OUTPUT_VERSION, "rlhfkit": __version__,
                "config": {**asdict(config), "sources": [os.fspath(s) for s in config.sources]},
                "inputs": read}  # fmt: skip
    with atomic_dir(out, "data") as tmp, quiet_datasets(), ThreadPoolExecutor(max_workers=2) as pool:
        # Both folders at once: Arrow's gathers and the file writes release the GIL.
        jobs = [
            pool.submit(save_splits, {s: corpus.sft_batches(r) for s, r in sft_rows.items()}, "sft", tmp / "sft", fingerprint),
            pool.submit(save_splits, {s: corpus.pair_batches(r) for s, r in pair_rows.items()}, "pairs", tmp / "pairs", fingerprint),
        ]  # fmt: skip
        for job in jobs:
            job.result()
        write_json_atomic(tmp / "stats.json", stats)
        write_json_atomic(tmp / "manifest.json", manifest)
    return StageResult(output_dir=out, metrics=stats)
