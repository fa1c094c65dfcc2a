"""Input formats: detection from the first row, and converters for the TRL-style formats.

Instruction data (Alpaca, ShareGPT, TRL ``messages``, TRL prompt-completion) feeds SFT
only: one example per row, the conversation up to its last assistant turn. TRL preference
data feeds pairs only. Such rows have no tree, so each row is its own tree,
``"<stem>:<row index>"``, and the split by tree still applies.
"""

from __future__ import annotations

from typing import Any, Callable

from rlhfkit.data.corpus import Corpus
from rlhfkit.data.sources import RowStream
from rlhfkit.errors import DataError

FORMATS = ("oasst-trees", "oasst-messages", "preference", "sharegpt", "messages", "alpaca", "prompt-completion")
_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                   "chatgpt": "assistant", "system": "system"}  # fmt: skip
_ROLES = {"user": "user", "assistant": "assistant", "system": "system"}

Turns = list[tuple[str, str]]


def detect_format(row: dict) -> str | None:
    """The format whose fields the row has, most specific first (an oasst tree also has 'prompt')."""
    keys = row.keys()
    if isinstance(row.get("prompt"), dict):
        return "oasst-trees"
    if {"message_id", "text", "role"} <= keys:
        return "oasst-messages"
    if {"chosen", "rejected"} <= keys:
        return "preference"
    if "conversations" in keys:
        return "sharegpt"
    if "messages" in keys:
        return "messages"
    if {"instruction", "output"} <= keys:
        return "alpaca"
    if {"prompt", "completion"} <= keys:
        return "prompt-completion"
    return None


def _require(row: dict, name: str, where: str) -> Any:
    value = row.get(name)
    if value is None:
        raise DataError(f"{where}: missing required field '{name}'")
    return value


def _text(value: Any, field: str, where: str) -> str:
    if not isinstance(value, str):
        raise DataError(f"{where}: field '{field}' must be a string, got {type(value).__name__}")
    return value


def _turns(value: Any, field: str, where: str, role_key: str = "role", text_key: str = "content",
           roles: dict[str, str] = _ROLES) -> Turns:  # fmt: skip
    """A message list -> [(role, text)], naming the exact field on error."""
    if not isinstance(value, list):
        raise DataError(f"{where}: field '{field}' must be a list of messages, got {type(value).__name__}")
    out = []
    for i, msg in enumerate(value):
        if not isinstance(msg, dict):
            raise DataError(f"{where}: field '{field}[{i}]' must be a message object")
        role, text = msg.get(role_key), msg.get(text_key)
        if role is None:
            raise DataError(f"{where}: missing required field '{field}[{i}].{role_key}'")
        if text is None:
            raise DataError(f"{where}: missing required field '{field}[{i}].{text_key}'")
        if not isinstance(role, str) or role not in roles:
            raise DataError(f"{where}: field '{field}[{i}].{role_key}' has unsupported role {role!r}")
        out.append((roles[role], _text(text, f"{field}[{i}].{text_key}", where)))
    return out


def _side(value: Any, field: str, where: str, role: str) -> Turns:
    """A string (one message of ``role``) or a message list: TRL accepts both."""
    return [(role, value)] if isinstance(value, str) else _turns(value, field, where)


def _alpaca(row: dict, where: str) -> Turns:
    instruction = _text(_require(row, "instruction", where), "instruction", where)
    extra = row.get("input")
    if extra:
        instruction = f"{instruction}\n\n{_text(extra, 'input', where)}"
    return [("user", instruction), ("assistant", _text(_require(row, "output", where), "output", where))]


def _sharegpt(row: dict, where: str) -> Turns:
    conv = _require(row, "conversations", where)
    first = conv[0] if isinstance(conv, list) and conv and isinstance(conv[0], dict) else {}
    keys = ("from", "value") if "from" in first or "value" in first else ("role", "content")
    return _turns(conv, "conversations", where, *keys, roles=_SHAREGPT_ROLES)


def _messages(row: dict, where: str) -> Turns:
    return _turns(_require(row, "messages", where), "messages", where)


def _prompt_completion(row: dict, where: str) -> Turns:
    prompt = _side(_require(row, "prompt", where), "prompt", where, "user")
    return prompt + _side(_require(row, "completion", where), "completion", where, "assistant")


SFT_CONVERTERS: dict[str, Callable[[dict, str], Turns]] = {
    "alpaca": _alpaca,
    "sharegpt": _sharegpt,
    "messages": _messages,
    "prompt-completion": _prompt_completion,
}


def _common_prefix(a: list | str, b: list | str) -> int:
    """TRL's implicit-prompt rule: the shared prefix of chosen and rejected is the prompt."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _preference(row: dict, where: str) -> tuple[Turns, Turns, Turns]:
    chosen, rejected = _require(row, "chosen", where), _require(row, "rejected", where)
    prompt = row.get("prompt")
    if prompt is None:  # implicit prompt: split off the common prefix
        if type(chosen) is not type(rejected):
            raise DataError(f"{where}: fields 'chosen' and 'rejected' must both be strings or both message lists")
        if isinstance(chosen, str):
            n = _common_prefix(chosen, rejected)
            if 0 < n < len(chosen) and chosen[n - 1] == " ":  # as TRL: the answer keeps its leading space
                n -= 1
            return [("user", chosen[:n])], [("assistant", chosen[n:])], [("assistant", rejected[n:])]
        c, r = _turns(chosen, "chosen", where), _turns(rejected, "rejected", where)
        n = _common_prefix(c, r)
        return c[:n], c[n:], r[n:]
    return (
        _side(prompt, "prompt", where, "user"),
        _side(chosen, "chosen", where, "assistant"),
        _side(rejected, "rejected", where, "assistant"),
    )


def read_rows(stream: RowStream, fmt: str, corpus: Corpus, stem: str, group: int) -> int:
    """Convert every row of a non-oasst stream into ``corpus``; returns the row count.

    ``group`` orders this stream's rows after the oasst trees and the earlier sources.
    """
    n = 0
    for i, (key, row) in enumerate(stream.rows()):
        n += 1
        where = stream.where(key)
        tree_id = f"{stem}:{i}"
        if fmt == "preference":
            prompt, chosen, rejected = _preference(row, where)
            if not corpus.drop_degenerate("".join(t for _, t in chosen), "".join(t for _, t in rejected)):
                p, c, j = ([corpus.add_message(r, t) for r, t in side] for side in (prompt, chosen, rejected))
                tree = corpus.add_tree(tree_id, (group, "", i))
                corpus.add_pair(tree, corpus.prompts.append(p), c, j)
                corpus.tree_messages[tree] += len(p) + len(c) + len(j)
            continue
        turns = SFT_CONVERTERS[fmt](row, where)
        last = max((k for k, (role, _) in enumerate(turns) if role == "assistant"), default=-1)
        if last < 0:
            corpus.dropped["no_reply"] += 1
            continue
        if not any(role == "user" for role, _ in turns[:last]):  # a reply to nothing: nothing to learn to answer
            corpus.dropped["no_prompt"] += 1
            continue
        ids = [corpus.add_message(r, t) for r, t in turns[: last + 1]]
        tree = corpus.add_tree(tree_id, (group, "", i))
        corpus.add_sft(tree, f"{tree_id}:{last}", ids)
        corpus.tree_messages[tree] += len(ids)
    return n
