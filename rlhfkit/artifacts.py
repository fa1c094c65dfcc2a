"""Atomic artifacts: a folder or file appears complete or not at all.

Pattern (pitfall 9): write into a hidden sibling temp path, fsync, one ``os.replace``;
a completion marker is the last thing written; stale temp folders are ignored and swept.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

TEMP_PREFIX = ".tmp-"


def _fsync_tree(path: Path) -> None:
    for root, _dirs, files in os.walk(path):
        for name in files:
            fsync_path(os.path.join(root, name))
    fsync_path(path)


def fsync_path(path: str | os.PathLike) -> None:
    """Flush a file's (or a folder's entries') data to disk; quick when already flushed."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temp_sibling(final: Path) -> Path:
    """A unique hidden path next to ``final`` (same filesystem, so rename is atomic)."""
    return final.parent / f"{TEMP_PREFIX}{final.name}-{uuid.uuid4().hex[:8]}"


def sweep_stale_temps(parent: Path, name: str) -> None:
    """Remove temp siblings left by a killed writer of ``parent/name``."""
    if parent.is_dir():
        for stale in parent.glob(f"{TEMP_PREFIX}{name}-*"):
            shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink(missing_ok=True)


@contextmanager
def atomic_dir(final: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temp folder; on clean exit it replaces ``final`` in one rename.

    On an exception the temp folder is removed and ``final`` is left as it was
    (absent if it was absent), so readers never see a half-written folder.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale_temps(final.parent, final.name)
    tmp = temp_sibling(final)
    tmp.mkdir()
    try:
        yield tmp
        _fsync_tree(tmp)
        if final.exists():
            old = temp_sibling(final)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        fsync_path(final.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write a file through a temp sibling and ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(path)
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=False, allow_nan=False) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


@dataclasses.dataclass
class StageResult:
    """What every stage function returns: its artifact folder and its metrics."""

    output_dir: Path
    metrics: dict[str, Any]


def resolve_model_path(path: str | os.PathLike) -> str:
    """A stage folder holds its final model in ``model/``; accept the stage folder itself.

    Anything else (a plain Hugging Face folder, a hub id) is returned unchanged.
    """
    candidate = Path(path) / "model"
    if (candidate / "config.json").is_file():
        return str(candidate)
    return os.fspath(path)


# Files that mark a folder as a stage's output, and the stages that write them: the SFT and
# reward stages write stage_config.json first (and metrics.json with its "stage" last); PPO
# writes metrics.jsonl from its first update.
STAGE_MARKERS = {"stage_config.json": ("sft", "reward"), "metrics.jsonl": ("ppo",)}


def other_stage(folder: str | os.PathLike, stage: str) -> str | None:
    """The stage whose output ``folder`` holds when that is not ``stage`` (it would be overwritten), else None."""
    folder = Path(folder)
    metrics = folder / "metrics.json"
    if metrics.is_file():
        try:
            owner = json.loads(metrics.read_text(encoding="utf-8")).get("stage")
        except (OSError, ValueError, AttributeError):
            owner = None
        if isinstance(owner, str) and owner != stage:
            return owner
    for marker, owners in STAGE_MARKERS.items():
        if stage not in owners and (folder / marker).is_file():
            return " or ".join(owners)
    return None


def refuse_other_stage(folder: str | os.PathLike, stage: str) -> None:
    """One line instead of overwriting another stage's model and metrics with this stage's."""
    from rlhfkit.errors import ConfigError

    owner = other_stage(folder, stage)
    if owner is not None:
        raise ConfigError(f"output_dir {folder}: holds the output of the {owner} stage, which the {stage} stage would "
                          "overwrite; choose another output folder")
