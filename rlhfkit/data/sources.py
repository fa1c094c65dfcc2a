"""Open each SOURCE as streams of rows, each row with a location for error messages.

A SOURCE is a JSONL file (optionally ``.gz``), a ``.json`` array, a Parquet file, a folder
written by ``datasets.save_to_disk``, any other folder or a hub id (read through
``datasets.load_dataset``), or an in-memory ``datasets.Dataset`` / ``DatasetDict``.
Files are streamed: only one line or one record batch is held at a time.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import json
import mmap
import os
import re
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import msgspec

from rlhfkit.artifacts import link_problem
from rlhfkit.errors import DataError

BATCH_ROWS = 4096
# owner/name as on the hub; a path with a file suffix is never taken for a hub id.
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
_FILE_SUFFIXES = {".jsonl", ".json", ".gz", ".parquet", ".csv", ".txt"}

Rows = Iterator[tuple[int, Any]]


@dataclass
class RowStream:
    """One table of rows: a file, or one split of a dataset.

    ``rows(columns, as_type)`` yields ``(key, row)``: ``row`` a dict (only ``columns``
    when the source is a table), or with ``as_type`` (a msgspec Struct) the row as that
    type, the fields it does not name skipped (JSONL is decoded to it directly, without the
    dicts). ``where(key)`` turns the key into ``file:line`` (JSON files) or ``label row N``
    (tables) for error messages. ``digest()`` identifies the content.
    """

    label: str
    stem: str
    digest: Callable[[], str]
    read: Callable[[Sequence[str] | None], Rows]
    by_line: bool
    read_as: Callable[[type], Rows] | None = None  # decodes straight to a type (JSONL)

    def rows(self, columns: Sequence[str] | None = None, as_type: type | None = None) -> Rows:
        if as_type is None:
            return self.read(columns)
        if self.read_as is not None:
            return self.read_as(as_type)
        return ((key, typed_row(row, self.where(key), as_type)) for key, row in self.read(columns))

    def where(self, key: int) -> str:
        return f"{self.label}:{key}" if self.by_line else f"{self.label} row {key}"


def typed_row(row: Any, where: str, as_type: type | None = None) -> Any:
    """A decoded row checked to be an object, and converted to ``as_type`` if given."""
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
    if as_type is None:
        return row
    try:
        return msgspec.convert(row, as_type)
    except msgspec.ValidationError as e:
        raise DataError(f"{where}: {e}") from None


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _file_digest(path: Path) -> Callable[[], str]:
    """The file's sha256, computed on another core while the file is parsed; call the
    result to wait for it. One ``update`` over a memory map releases the GIL once for the
    whole file: chunked reads would take it back for every chunk, slowing the parser."""

    def digest() -> str:
        with open(path, "rb") as f:
            if os.fstat(f.fileno()).st_size == 0:
                return hashlib.sha256().hexdigest()
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
                return hashlib.sha256(mapped).hexdigest()

    pool = ThreadPoolExecutor(max_workers=1)
    future = pool.submit(digest)
    pool.shutdown(wait=False)
    return future.result


_strict_decode = msgspec.json.Decoder().decode


def loads_json(data: bytes) -> Any:
    """``json.loads``, about twice as fast. msgspec decodes strict JSON to the same objects
    (big integers exactly, unlike orjson); what it refuses (NaN, a BOM, lone surrogates,
    malformed input) goes to ``json.loads``, which reads it or raises its own error."""
    try:
        return _strict_decode(data)
    except (ValueError, RecursionError):
        return json.loads(data)


@functools.cache
def _decoder(as_type: type | None) -> Callable[[bytes], Any]:
    """msgspec's decoder to ``as_type``, or to a dict (a line that is not an object fails)."""
    return msgspec.json.Decoder(dict if as_type is None else as_type).decode


def _jsonl_rows(path: Path, as_type: type | None = None) -> Rows:
    """Rows of the lines of ``path``, as dicts or as ``as_type``. A line msgspec refuses is
    read by ``json.loads`` (as ``loads_json`` would) and then converted, or its error named."""
    opener = gzip.open if path.suffix == ".gz" else open
    decode = _decoder(as_type)
    lineno = 0
    try:
        with opener(path, "rb") as f:
            for lineno, line in enumerate(f, 1):
                if line.isspace():
                    continue
                try:
                    row = decode(line)
                except (ValueError, RecursionError):
                    row = typed_row(_json_loads_line(line, path, lineno), f"{path}:{lineno}", as_type)
                yield lineno, row
    except (OSError, EOFError, zlib.error) as e:
        after = f" after line {lineno}" if lineno else ""
        raise DataError(f"{path}: cannot read{after} ({_one_line(e)})") from None


def _json_loads_line(line: bytes, path: Path, lineno: int) -> Any:
    try:
        return json.loads(line)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg}, column {e.pos + 1})") from None
    except (ValueError, RecursionError) as e:  # bytes that are not UTF-8; absurd nesting
        raise DataError(f"{path}:{lineno}: not valid JSON ({_one_line(e)})") from None


def jsonl_stream(path: Path, label: str) -> RowStream:
    """The rows of a JSONL file, with its digest."""
    return RowStream(label, _stem(path), _file_digest(path), lambda _c: _jsonl_rows(path), by_line=True,
                     read_as=lambda as_type: _jsonl_rows(path, as_type))  # fmt: skip


def _json_array_rows(path: Path) -> Rows:
    try:
        items = loads_json(path.read_bytes())
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
    except (ValueError, RecursionError) as e:
        raise DataError(f"{path}: not valid JSON ({_one_line(e)})") from None
    for i, row in enumerate(items):
        yield i, typed_row(row, f"{path} row {i}")


def _is_json_array(path: Path) -> bool:
    with open(path, "rb") as f:
        head = f.read(4096).lstrip()
    return head.startswith(b"[")


def _parquet_stream(path: Path, label: str, stem: str) -> RowStream:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        names = pq.ParquetFile(path).schema_arrow.names
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{path}: not a readable Parquet file ({_one_line(e)})") from None

    def read(columns: Sequence[str] | None) -> Rows:
        wanted = [c for c in names if columns is None or c in columns]
        i = 0
        try:
            for batch in pq.ParquetFile(path).iter_batches(batch_size=BATCH_ROWS, columns=wanted):
                for row in batch.to_pylist():
                    yield i, row
                    i += 1
        except (pa.ArrowException, OSError) as e:
            raise DataError(f"{path}: cannot read after row {i} ({_one_line(e)})") from None

    return RowStream(label, stem, _file_digest(path), read, by_line=False)


def _stem(path: Path) -> str:
    name = path.name
    for suffix in (".gz", ".jsonl", ".json", ".parquet"):
        name = name.removesuffix(suffix)
    return name or path.name


def _file_streams(path: Path, label: str) -> list[RowStream]:
    stem = _stem(path)
    if path.suffix == ".parquet":
        return [_parquet_stream(path, label, stem)]
    if path.suffix == ".json" and _is_json_array(path):
        return [RowStream(label, stem, _file_digest(path), lambda _c: _json_array_rows(path), by_line=False)]
    return [jsonl_stream(path, label)]


def dataset_streams(ds: Any, label: str, stem: str) -> list[RowStream]:
    """Streams over a ``Dataset`` or every split of a ``DatasetDict``."""
    import datasets

    if isinstance(ds, (datasets.DatasetDict, dict)):
        out = []
        for split, part in ds.items():
            out.extend(dataset_streams(part, f"{label}[{split}]", f"{stem}/{split}"))
        return out
    if not isinstance(ds, datasets.Dataset):
        raise DataError(f"{label}: expected a datasets.Dataset or DatasetDict, got {type(ds).__name__}")

    def read(columns: Sequence[str] | None) -> Rows:
        names = [c for c in ds.column_names if columns is None or c in columns]
        i = 0
        for table in ds.select_columns(names).with_format("arrow").iter(batch_size=BATCH_ROWS):
            for row in table.to_pylist():
                yield i, row
                i += 1

    return [RowStream(label, stem, lambda: ds._fingerprint, read, by_line=False)]


def _load_dataset(source: str) -> Any:
    """The real hub path (also any dataset-shaped local folder): ``datasets.load_dataset``."""
    import datasets

    try:
        return datasets.load_dataset(source)
    except Exception as e:  # noqa: BLE001 - any loader failure is a bad SOURCE for the user
        raise DataError(f"{source}: datasets.load_dataset failed ({_one_line(e)})") from None


def open_source(source: str) -> list[RowStream]:
    """The row streams of one SOURCE string (a file, a folder or a hub id)."""
    path = Path(source).expanduser()
    if path.is_file():
        return _file_streams(path, source)
    if path.is_dir():
        if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
            import datasets

            try:
                ds = datasets.load_from_disk(str(path))
            except Exception as e:  # noqa: BLE001 - a broken saved folder is bad input
                raise DataError(f"{source}: cannot load the saved dataset ({_one_line(e)})") from None
        else:
            ds = _load_dataset(str(path))
        return dataset_streams(ds, source, path.name)
    problem = source_problem(source)
    if problem:
        raise DataError(problem)
    return dataset_streams(_load_dataset(source), source, source.rsplit("/", 1)[-1])


def source_problem(source: str) -> str | None:
    """The one-line problem of a SOURCE that is neither a file, a folder nor a hub id, else None.

    Only an ``owner/name`` that does not look local goes to the hub: a path that is absolute,
    starts with ``.`` or ``~``, has a file suffix, or lies under a folder that exists here is
    named as missing instead of as a dataset the hub cannot find."""
    if Path(source).expanduser().exists():
        return None
    problem = link_problem(source)
    if problem:
        return problem
    first = source.split("/", 1)[0]
    local = (os.path.isabs(source) or source.startswith((".", "~")) or Path(source).suffix in _FILE_SUFFIXES
             or ("/" in source and os.path.isdir(first)))
    if local or not _HUB_ID.fullmatch(source):
        return f"{source}: no such file or folder"
    return None
