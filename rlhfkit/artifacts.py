"""Atomic artifacts: a folder or file appears complete or not at all; and nothing lost.

Pattern (docs/pitfalls.md#9): write into a hidden sibling temp path, fsync, one ``os.replace``;
a completion marker is the last thing written; stale temp folders are ignored and swept.

Nothing a user owns is deleted or overwritten: every output folder rlhfkit creates holds an
owner file (``.rlhfkit``), and a folder is replaced, emptied or written into only when it is
rlhfkit's (the owner file, or a stage file of a run written before owner files existed) or
empty (``claim_dir``, ``atomic_dir``). One run at a time per output folder: ``output_lock``
holds an OS file lock that dies with its process (a SIGKILLed run leaves no stale lock).
"""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import functools
import hashlib
import json
import math
import os
import shutil
import sys
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

TEMP_PREFIX = ".tmp-"
OWNER_FILE = ".rlhfkit"  # in every output folder rlhfkit creates: the folder is rlhfkit's to replace
OWNER_TEXT = "written by rlhfkit: this folder may be replaced by rlhfkit runs\n"
# What an output folder holds, on the owner file's second line ("holds: KIND"): a chain's run folder,
# a sweep's folder, or one stage's output (the stage's name). A folder is claimed for one kind and
# never written as another, nor placed inside another run's or stage's folder (``claim_problem``).
RUN, SWEEP = "run", "sweep"
# A run folder's stage folders, each with the stages that may write it (run/ppo holds RL's or DPO's policy).
RUN_STAGE_FOLDERS = {"world": ("world",), "data": ("data",), "model": ("model",), "sft": ("sft",),
                     "reward": ("reward",), "ppo": ("ppo", "dpo"), "eval": ("eval",)}
# How a folder written before owner files existed is recognisably a stage's output: a file of
# that name whose content is ours (common names such as manifest.json are checked by their keys).
LEGACY_OWNER_FILES = {"stage_config.json": (), "manifest.json": ("fingerprint", "stages"),
                      "metrics.json": ("stage",), "metrics.jsonl": ("objective/kl",)}


def is_ours(folder: str | os.PathLike) -> bool:
    """Whether rlhfkit wrote ``folder`` (its owner file, or a stage file of an older rlhfkit)."""
    folder = Path(folder)
    if (folder / OWNER_FILE).is_file():
        return True
    for name, keys in LEGACY_OWNER_FILES.items():
        if (folder / name).is_file():
            if not keys:
                return True
            try:
                with open(folder / name, encoding="utf-8") as f:
                    first = json.loads(f.readline() if name.endswith(".jsonl") else f.read())
            except (OSError, ValueError):
                continue
            if isinstance(first, dict) and any(k in first for k in keys):
                return True
    return False


def _not_ours(folder: Path) -> Exception:
    from rlhfkit.errors import OutputError

    names = sorted(p.name for p in folder.iterdir())
    shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
    return OutputError(f"{folder}: exists and holds files rlhfkit did not write ({shown}); nothing was changed. "
                       "Choose a new output folder, or empty this one yourself")


def held(folder: str | os.PathLike) -> str | None:
    """What rlhfkit folder ``folder`` is: RUN, SWEEP, a stage's name, or None (not one, or not known).

    The owner file says it; folders written before it did are recognised by their files."""
    folder = Path(folder)
    try:
        lines = (folder / OWNER_FILE).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError):
        lines = []
    for line in lines[1:]:
        if line.startswith("holds: "):
            return line.removeprefix("holds: ").strip()
    if not is_ours(folder):
        return None
    for name, key, kind in (("manifest.json", "stages", RUN), ("sweep.json", "grid", SWEEP),
                            ("metrics.json", "stage", None), ("eval.json", None, "eval")):
        try:
            data = read_json(folder / name)
        except (OSError, ValueError):
            continue
        if isinstance(data, dict) and (key is None or key in data):
            return kind or str(data[key])
    owners = [owners for marker, owners in STAGE_MARKERS.items() if (folder / marker).is_file()]
    return " or ".join(owners[0]) if owners else None


def _what(kind: str) -> str:
    return {RUN: "a chain's run", SWEEP: "a sweep"}.get(kind, f"the {kind} stage's output")


def claim_problem(folder: str | os.PathLike, kind: str) -> str | None:
    """Why ``folder`` may not be claimed for ``kind`` (RUN, SWEEP or a stage's name), else None.

    Refused: a folder that holds another kind (a run's stage folder taken as a run's output would
    have its model replaced), and any folder inside another run or stage's folder, at any depth;
    allowed inside: a run's own stage folders (``RUN_STAGE_FOLDERS``), the reward ensemble's members
    (reward/members/N), anything in a sweep (its runs and shared stages)."""
    folder = Path(os.path.abspath(folder))
    if folder.is_dir() and not folder.is_symlink():
        own = held(folder)
        if own is not None and kind not in own.split(" or "):
            return (f"{folder}: holds {_what(own)}, which {_what(kind)} would replace; nothing was changed. "
                    "Choose another output folder")
    real = Path(os.path.realpath(folder))  # a sweep's run links its stage folders into the sweep's store
    for parent in real.parents:
        outer = held(parent)
        if outer is None:
            continue
        if outer == SWEEP:
            return None
        if outer == RUN and parent == real.parent and kind in RUN_STAGE_FOLDERS.get(real.name, ()):
            return None
        if outer == kind == "reward" and real.parent == parent / "members":  # an ensemble member (reward/members/N)
            return None
        return (f"{folder}: inside {parent}, which holds {_what(outer)}; writing {_what(kind)} there could replace "
                "its files; nothing was changed. Choose an output folder outside it")
    return None


def check_output_dir(folder: str | os.PathLike, kind: str | None = None) -> bool:
    """Whether ``folder`` exists and may be written (empty, or rlhfkit's own); absent: False; else OutputError.

    ``kind``: what it is claimed for (see ``claim_problem``), checked too."""
    from rlhfkit.errors import OutputError

    folder = Path(folder)
    if kind is not None:
        problem = claim_problem(folder, kind)
        if problem:
            raise OutputError(problem)
    if not folder.exists():
        return False
    if not folder.is_dir():
        raise OutputError(f"{folder}: exists and is a file, not a folder; nothing was changed. Choose another output path")
    if is_ours(folder) or not any(folder.iterdir()):
        return True
    raise _not_ours(folder)


def claim_dir(folder: str | os.PathLike, kind: str | None = None) -> Path:
    """Create ``folder`` (with its owner file, saying it holds ``kind``), or accept it when empty or already
    rlhfkit's (and, given ``kind``, not another kind's or inside another run or stage); else OutputError."""
    folder = Path(folder)
    if not check_output_dir(folder, kind):
        folder.mkdir(parents=True, exist_ok=True)
    owner = folder / OWNER_FILE
    if not owner.is_file() or (kind is not None and held(folder) != kind):
        write_text_atomic(owner, OWNER_TEXT + (f"holds: {kind}\n" if kind else ""))
    return folder


def remove_ours(folder: str | os.PathLike, recorded: bool = False) -> None:
    """Delete ``folder`` only when it is rlhfkit's (else OutputError); a symlink is unlinked, never followed.

    ``recorded``: a run's manifest lists the folder as one of its stages (proof enough for a
    folder written before owner files existed)."""
    folder = Path(folder)
    if folder.is_symlink():
        folder.unlink()
    elif folder.exists():
        if not recorded:
            check_output_dir(folder)
        shutil.rmtree(folder)


def _lock_path(folder: Path) -> Path:
    """The lock file of ``folder``: in the user's cache (no file beside their folders), else beside it."""
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "rlhfkit" / "locks"
    try:
        cache.mkdir(parents=True, exist_ok=True)
        if os.access(cache, os.W_OK):
            return cache / f"{hashlib.sha256(str(folder).encode()).hexdigest()[:32]}.lock"
    except OSError:
        pass
    folder.parent.mkdir(parents=True, exist_ok=True)
    return folder.parent / f".{folder.name}.rlhfkit-lock"


_held_locks: dict[str, tuple[int, int]] = {}  # lock path -> (fd, depth): re-entrant within one process


@contextmanager
def output_lock(folder: str | os.PathLike) -> Iterator[None]:
    """Hold the one-writer lock of ``folder`` (a file in ~/.cache/rlhfkit/locks) or fail at once.

    ``flock`` is released by the OS when the process ends however it ends, so a killed run
    never leaves a stale lock; the lock file itself stays (deleting it would race a new holder).
    Re-entrant within a process (a chain holds its run folder while its stages hold theirs).
    """
    from rlhfkit.errors import OutputError

    if not launch_main():  # other processes of one launch: rank 0 holds it for all
        yield
        return
    folder = Path(folder).resolve()  # one lock per real folder, whatever the path that names it
    path = str(_lock_path(folder))
    if path in _held_locks:
        fd, depth = _held_locks[path]
        _held_locks[path] = (fd, depth + 1)
    else:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip() or "another process"
            os.close(fd)
            raise OutputError(f"{folder}: another rlhfkit run is writing it ({holder}); wait for it to finish "
                              "or choose another output folder") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()}, started {time.strftime('%Y-%m-%d %H:%M:%S')}: "
                      f"{' '.join(os.path.basename(a) if i == 0 else a for i, a in enumerate(sys.argv))}".encode(), 0)
        _held_locks[path] = (fd, 1)
    try:
        yield
    finally:
        fd, depth = _held_locks[path]
        if depth > 1:
            _held_locks[path] = (fd, depth - 1)
        else:
            del _held_locks[path]
            os.close(fd)  # releases the flock


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
    """Remove temp siblings left by a killed writer of ``parent/name`` (callers hold its lock).

    Only names ``temp_sibling`` makes (8 hex digits), and of those folders only rlhfkit's
    (``atomic_dir`` writes the owner file first) or empty ones: a user's look-alike stays."""
    if parent.is_dir():
        for stale in parent.glob(f"{TEMP_PREFIX}{name}-" + "[0-9a-f]" * 8):
            if stale.is_symlink() or not stale.is_dir():
                stale.unlink(missing_ok=True)
            elif is_ours(stale) or not any(stale.iterdir()):
                shutil.rmtree(stale, ignore_errors=True)


F = TypeVar("F", bound=Callable[..., Any])


def launch_main() -> bool:
    """Whether this is the main process of its launch (rank 0; a plain run has only that one)."""
    from rlhfkit.processes import launch_rank

    return launch_rank() == 0


def locks_output(attribute: str) -> Callable[[F], F]:
    """Decorate a stage function ``fn(config, ...)``: it holds ``output_lock(config.<attribute>)`` while it runs."""
    def wrap(fn: F) -> F:
        @functools.wraps(fn)
        def locked(config, *args, **kwargs):
            with output_lock(getattr(config, attribute)):
                return fn(config, *args, **kwargs)
        return locked  # type: ignore[return-value]
    return wrap


@contextmanager
def atomic_dir(final: str | os.PathLike, kind: str | None = None) -> Iterator[Path]:
    """Yield a temp folder (holding only the owner file); on clean exit it replaces ``final`` in one rename.

    On an exception the temp folder is removed and ``final`` is left as it was
    (absent if it was absent), so readers never see a half-written folder. An existing
    ``final`` is replaced only when it is rlhfkit's or empty (else OutputError, before any
    work); a symlink there is replaced as a link, its target left alone. The new folder
    gets the owner file (saying it holds ``kind``: see ``claim_problem``, checked first).
    """
    final = Path(final)
    if kind is not None:
        check_output_dir(final, kind)  # before the parent is made
    final.parent.mkdir(parents=True, exist_ok=True)
    if not final.is_symlink():
        check_output_dir(final)
    sweep_stale_temps(final.parent, final.name)
    tmp = temp_sibling(final)
    tmp.mkdir()
    try:
        claim_dir(tmp)  # the owner file first: the new folder is rlhfkit's
        if kind is not None:
            write_text_atomic(tmp / OWNER_FILE, OWNER_TEXT + f"holds: {kind}\n")
        yield tmp
        _fsync_tree(tmp)
        if final.is_symlink():
            final.unlink()
            os.replace(tmp, final)
        elif final.exists():
            check_output_dir(final)  # still ours: nothing else wrote there meanwhile
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


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def file_digests(folder: Path, skip: tuple[str, ...] = ()) -> dict[str, str]:
    """SHA-256 of every file under ``folder`` (relative path -> digest), except under sub-folders named in ``skip``."""
    return {str(f.relative_to(folder)): sha256_file(f) for f in sorted(folder.rglob("*"))
            if f.is_file() and not set(f.relative_to(folder).parts) & set(skip)}


def damage(folder: Path, recorded: dict[str, str] | None) -> str | None:
    """Which recorded file of ``folder`` is missing or no longer matches its digest (truncated, changed), or None."""
    for name, digest in (recorded or {}).items():  # written by older versions: nothing recorded
        if not (folder / name).is_file():
            return f"{name} is missing"
        if sha256_file(folder / name) != digest:
            return f"{name} does not match its recorded SHA-256 (truncated or changed)"
    return None


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


def sanitize(obj: Any) -> Any:
    """JSON-safe: non-finite floats become None (strict JSON has no NaN)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): sanitize(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [sanitize(v) for v in obj]
    if hasattr(obj, "item") and callable(obj.item):
        return sanitize(obj.item())
    return obj


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


# -- model folders: safetensors only ---------------------------------------------------------

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


def link_problem(source: str) -> str | None:
    """The one-line problem of a path that is a link to nothing (a loop or a missing target), else None.
    ``Path.exists`` is False for both, which made such a path look like a hub id."""
    path = Path(source).expanduser()
    try:
        os.stat(path)
        return None
    except OSError as e:
        loop = e.errno == errno.ELOOP
    if not loop and not path.is_symlink():
        return None
    hops, seen, p = [source], {os.path.normpath(path)}, path
    while p.is_symlink() and len(hops) < 10:
        target = os.readlink(p)
        hops.append(target)
        p = p.parent / target
        if os.path.normpath(p) in seen:
            break
        seen.add(os.path.normpath(p))
    chain = f" ({' -> '.join(hops)})" if loop else f" ({' -> '.join(hops)}, which does not exist)"
    what = "a symbolic link loop" if loop else "a broken symbolic link"
    return f"{source}: {what}{chain if len(hops) > 1 else ''}; point the link at a file or folder"


def missing_model_folder(name: str | os.PathLike) -> str | None:
    """The one-line problem of a model named by a local path that does not exist, else None.

    A name that could be a hub id ("org/model", "gpt2") is left to the loader; one that can
    only be a path (absolute, ``./``, ``../``, ``~``, more than one ``/``, or a link to nothing) is
    checked here, so a typo is named before any stage runs rather than as the hub's "Repo id must
    use ..."; one that could be either is looked up by ``hub_problem`` when a run starts."""
    text = os.fspath(name)
    problem = link_problem(text)
    if problem:
        return problem
    looks_local = os.path.isabs(text) or text.startswith((".", "~")) or text.strip("/").count("/") > 1
    if looks_local and not Path(text).expanduser().exists():
        return f"{text}: no such model folder; {GIVE_A_MODEL}"
    return None


GIVE_A_MODEL = ("give a model folder (a hub download, `rlhfkit model import FILE.gguf --out DIR`, or a stage's output "
                "folder) or a hub id")


def not_a_model_folder(name: str | os.PathLike) -> str | None:
    """The one-line problem of a starting model that is a local file, or a folder without config.json
    (empty, or the wrong level of a download), else None: said before a tokenizer error would."""
    path = Path(os.fspath(name)).expanduser()
    if path.is_file():
        return f"{name}: a file, not a model folder; {GIVE_A_MODEL}"
    if path.is_dir() and not (Path(resolve_model_path(path)) / "config.json").is_file():
        return f"{name}: holds no config.json, so it is not a model folder; {GIVE_A_MODEL}"
    return None


HUB_TIMEOUT_S = 5  # one look at the hub before any stage runs, instead of a loader's retries after the first stages


def hub_problem(name: str) -> str | None:
    """A model name that is not a folder here: fine when the local hub cache holds it or the hub answers
    within ``HUB_TIMEOUT_S`` seconds (one try); else the one-line problem, said before any stage runs."""
    from huggingface_hub import HfApi, constants, try_to_load_from_cache
    from huggingface_hub.errors import HFValidationError, RepositoryNotFoundError

    from rlhfkit.errors import first_line

    if Path(name).expanduser().exists():
        return None
    try:
        if isinstance(try_to_load_from_cache(name, "config.json"), str):
            return None
    except HFValidationError:
        return f"{name}: neither a model folder here nor a hub id (owner/name); give a folder"
    if constants.HF_HUB_OFFLINE:
        return (f"{name}: not a folder here, and not in the local hub cache (HF_HUB_OFFLINE is set); give a model "
                "folder, or download it once where the hub can be reached")
    try:
        HfApi(endpoint=constants.ENDPOINT).model_info(name, timeout=HUB_TIMEOUT_S)
    except RepositoryNotFoundError:
        return f"{name}: no such model on the hub (or a private one: log in first); give a model folder or a hub id"
    except Exception as e:  # noqa: BLE001 - any network failure (refused, timed out, DNS, proxy) reads the same
        return (f"{name}: not a folder here, and the hub did not answer within {HUB_TIMEOUT_S} s "
                f"({first_line(e)}); give a model folder, or set HF_HUB_OFFLINE=1 to use the local cache")
    return None


def refuse_pickle_only(path: str | os.PathLike) -> None:
    """One line, before anything is unpickled, for a model folder that does not exist or holds pickle
    weights and no safetensors."""
    from rlhfkit.errors import ConfigError

    missing = missing_model_folder(path)
    if missing:
        raise ConfigError(missing)
    folder = Path(path)
    if not folder.is_dir():
        return
    names = [p.name for p in folder.iterdir() if p.is_file()]
    pickles = sorted(n for n in names if n.endswith(PICKLE_SUFFIXES))
    if pickles and not any(n.endswith(".safetensors") for n in names):
        raise ConfigError(
            f"{folder}: holds only pickle weights ({', '.join(pickles[:2])}); rlhfkit loads safetensors only, because "
            "loading a pickle can run any code. If you trust the file, convert it once: python -c \"from transformers "
            f"import AutoModel; AutoModel.from_pretrained('{folder}', use_safetensors=False)"
            f".save_pretrained('{folder}-safetensors')\" (with the model's own Auto class) and use that folder")


GENERATIVE_HEADS = ("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")
OTHER_HEADS = ("ForSequenceClassification", "ForTokenClassification", "ForQuestionAnswering", "ForMaskedLM", "Model")


def head_problem(path: str | os.PathLike, role: str) -> str | None:
    """From a model folder's config.json alone, before anything loads: why it cannot be the ``role`` given --
    "reward_model"/"value_model" (one trained score per sequence) or "model" (a language-model head to
    generate with) -- else None. A hub id or a folder without config.json is left to the loader."""
    folder = Path(resolve_model_path(path))
    try:
        config = read_json(folder / "config.json")
        architectures = config.get("architectures") or []
    except (OSError, ValueError, AttributeError):
        return None
    kinds = ", ".join(architectures)
    generative = any(a.endswith(GENERATIVE_HEADS) for a in architectures)
    known = architectures and all(a.endswith(GENERATIVE_HEADS + OTHER_HEADS) for a in architectures)
    if not known:  # none named, or one transformers may not know: the loader says what is wrong
        return None
    if role == "model":
        if not generative:
            return (f"{role} {path}: holds a {kinds}, not a language model; a policy (or an SFT starting point) "
                    "needs its language-model head (…ForCausalLM), e.g. the sft stage's folder")
        return None
    if not any(a.endswith("ForSequenceClassification") for a in architectures):
        return (f"{role} {path}: holds a {kinds}, whose scoring head would be newly initialised, so its scores "
                "would be noise; give a reward model trained by `rlhfkit reward` (the chain's reward/ folder)")
    labels = len(config.get("id2label") or {}) or config.get("num_labels") or 2
    if labels != 1:
        return (f"{role} {path}: gives {labels} scores per sequence; a reward or value model gives one "
                "(train one with `rlhfkit reward`)")
    return None


POSITION_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")


def positions_of(config: Any) -> int | None:
    """The most tokens a model takes (prompt and response together), from its config (object or dict), or None."""
    get = config.get if isinstance(config, dict) else lambda key: getattr(config, key, None)
    text = get("text_config")  # a multimodal model's language part
    if text is not None:
        return positions_of(text)
    return next((int(get(k)) for k in POSITION_KEYS if isinstance(get(k), int)), None)


def model_positions(path: str | os.PathLike) -> int | None:
    """``positions_of`` a model folder's config.json (a stage folder: its model/), or None (a hub id, no config)."""
    try:
        return positions_of(read_json(Path(resolve_model_path(path)) / "config.json"))
    except (OSError, ValueError, AttributeError):
        return None


def length_problem(key: str, tokens: int, positions: int | None, what: str = "") -> str | None:
    """``key`` asks for ``tokens`` positions (``what``: how they add up) and the model has fewer: the line, else None.

    Past its trained positions a model samples from positions it never saw (RoPE extrapolates silently)."""
    if positions is None or tokens <= positions:
        return None
    return (f"{key}: {what + ' = ' if what else ''}{tokens} tokens, but the model has {positions} positions "
            "(max_position_embeddings); lower it")


def refuse_non_generative(path: str | os.PathLike) -> None:
    """One line for a policy folder that holds no language-model head (a reward model, a bare encoder):
    loaded as a causal LM its head would be newly initialised and it would generate noise."""
    from rlhfkit.errors import ConfigError

    problem = head_problem(path, "model")
    if problem:
        raise ConfigError(problem)


def _load_reporting_missing(auto_cls, path: str, trust_remote_code: bool, role: str, **kwargs):
    """``auto_cls.from_pretrained`` (safetensors only) -> (model, the weights it initialised anew, sorted).

    transformers' own load report of them is silenced: the callers say what the missing weights mean."""
    from transformers.utils import logging as hf_logging

    from rlhfkit.errors import ConfigError, first_line

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        model, info = auto_cls.from_pretrained(path, trust_remote_code=trust_remote_code, use_safetensors=True,
                                               output_loading_info=True, **kwargs)
    except (OSError, ValueError, KeyError) as e:
        raise ConfigError(f"{role}{path}: cannot load the model ({first_line(e)})") from None
    finally:
        hf_logging.set_verbosity(verbosity)
    return model, sorted(info["missing_keys"])


def load_pretrained(auto_cls, path: str | os.PathLike, trust_remote_code: bool = False, **kwargs):
    """``auto_cls.from_pretrained`` with safetensors only and one-line errors (missing, pickle, unknown
    architecture, a policy folder without a language-model head, weights missing from the folder)."""
    from rlhfkit.errors import ConfigError

    path = resolve_model_path(path)  # a stage folder holds its model in model/
    refuse_pickle_only(path)
    if auto_cls.__name__ == "AutoModelForCausalLM":
        refuse_non_generative(path)
    model, missing = _load_reporting_missing(auto_cls, path, trust_remote_code, "", **kwargs)
    if missing:
        raise ConfigError(f"{path}: {len(missing)} weight(s) of the model are not in the folder ({', '.join(missing[:3])}): "
                          "they would start random. Give the complete model folder")
    return model


def load_scoring_model(path: str | os.PathLike, role: str = "reward_model", trust_remote_code: bool = False,
                       new_head: str | None = None, **kwargs):
    """A reward or value model: ``AutoModelForSequenceClassification`` giving one score per sequence from trained
    weights. A folder whose scoring head would be newly initialised (a causal LM, a bare encoder) or that gives
    several scores is refused in one line: PPO against a random head optimises noise. ``new_head``: the head is
    meant to start new (a value model initialised from the policy): allowed, and this line says so."""
    from transformers import AutoModelForSequenceClassification

    from rlhfkit.errors import ConfigError

    path = resolve_model_path(path)  # a stage folder holds its model in model/
    refuse_pickle_only(path)
    problem = None if new_head else head_problem(path, role)
    if problem:
        raise ConfigError(problem)
    model, missing = _load_reporting_missing(AutoModelForSequenceClassification, path, trust_remote_code, f"{role} ",
                                             num_labels=1, **kwargs)
    if missing and new_head is None:  # e.g. a hub model without config.json architectures, or a cut-down folder
        raise ConfigError(
            f"{role} {path}: its scoring head would be newly initialised ({', '.join(missing[:3])} not in the folder), "
            "so its scores would be noise; give a reward model trained by `rlhfkit reward` (the chain's reward/ folder)")
    if missing and launch_main():
        print(f"{role}: {new_head}; its head ({', '.join(missing[:3])}) starts new, as intended", file=sys.stderr)
    return model


def load_tokenizer(path: str | os.PathLike, trust_remote_code: bool = False):
    """``AutoTokenizer.from_pretrained`` with one-line errors."""
    from transformers import AutoTokenizer

    from rlhfkit.errors import ConfigError, first_line

    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError) as e:
        raise ConfigError(f"{path}: cannot load a tokenizer ({first_line(e)})") from None


def resolve_model_path(path: str | os.PathLike) -> str:
    """A stage folder holds its final model in ``model/``; accept the stage folder itself.

    Anything else (a plain Hugging Face folder, a hub id) is returned unchanged.
    """
    candidate = Path(path) / "model"
    if (candidate / "config.json").is_file():
        return str(candidate)
    return os.fspath(path)


# Files that mark a folder as a stage's output, and the stages that write them: the SFT, reward
# and DPO stages write stage_config.json first (and metrics.json with its "stage" last); PPO
# writes metrics.jsonl from its first update.
STAGE_MARKERS = {"stage_config.json": ("sft", "reward", "dpo"), "metrics.jsonl": ("ppo",)}


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
