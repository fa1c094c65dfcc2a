"""Synthetic Open Assistant-style conversation trees for the embedded world.

``rlhfkit data synth`` writes one JSON tree per line in the nested "ready export" format
(``message_tree_id``, ``tree_state``, ``prompt``; messages nest under ``replies``), so the
data stage reads it exactly as it reads a real export.

A tree: a user prompt from ``gold.py``'s task families, 2-4 sibling assistant replies drawn
from a quality mixture, and in about 15 % of trees a follow-up user turn ("Now in
uppercase.", "Again, reversed.") under the best reply, itself answered by 2-4 replies (and
sometimes one more follow-up). Reply mixture (after the probe): 35 % correct, 15 % correct
+ rambling, 25 % wrong, 15 % wrong + rambling, 10 % off-task. So SFT on all replies gives a
middling policy (mean gold of the replies ~0.45) and RL has room to climb.

Annotators (Thurstone): each ranked sibling gets utility
``gold + length_bias * words/10 + annotator_noise * N(0, 1)`` with ``length_bias =
0.2 * annotator_noise`` (words capped at 40); rank 0 = highest utility. Noise 0 therefore
gives exactly the gold order (equal gold: generation order, which is random). The length
bias is the tempting proxy: polite filler ("I hope this helps!") lengthens a reply and costs
0.3 gold, but noisy annotators sometimes prefer the longer reply, so a reward model can
pick up a taste for length that the gold judge does not share.

Like real exports: ~2 % of non-root messages deleted, ~2 % failing review
(``review_result: false``), ~5 % of assistant replies unranked (``rank: null``), ~2 %
``synthetic: true``; the tree language follows ``lang_mix`` (wrappers translated, the words
to copy stay in the shared vocabulary). Deleted and review-failed replies keep their rank,
as in real data, so readers must filter them.

Determinism: one ``random.Random`` for the content and one for the annotators, both from
``seed``; the content does not depend on ``annotator_noise`` (only ranks and quality labels
do). Same arguments give a byte-identical file.
"""

from __future__ import annotations

import json
import math
import random
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

from rlhfkit.artifacts import StageResult, claim_problem, is_ours, locks_output, write_text_atomic
from rlhfkit.config import field
from rlhfkit.errors import ConfigError, OutputError
from rlhfkit.world import gold as G

__all__ = [
    "SynthConfig",
    "synth_data",
    "generate_trees",
    "parse_lang_mix",
    "tree_stats",
    "REPLY_MIXTURE",
    "LENGTH_BIAS_PER_NOISE",
]

# Quality mixture of sibling replies (the probe's).
REPLY_MIXTURE: dict[str, float] = {
    "correct": 0.35,
    "correct_ramble": 0.15,
    "wrong": 0.25,
    "wrong_ramble": 0.15,
    "off_task": 0.10,
}
LENGTH_BIAS_PER_NOISE = 0.2  # annotators' length bias per 10 words, per unit of noise
MAX_LENGTH_WORDS = 40
FOLLOWUP_RATE = 0.19  # of trees whose root task admits a follow-up (~15 % of all trees)
SECOND_FOLLOWUP_RATE = 0.25  # of follow-up turns that get one more follow-up
DELETED_RATE = 0.02
REVIEW_FAILED_RATE = 0.02
UNRANKED_RATE = 0.05
SYNTHETIC_RATE = 0.02
MODEL_NAME = "rlhfkit-synth-v1"  # model_name of messages marked synthetic

_MIX_NAMES = tuple(REPLY_MIXTURE)
_MIX_WEIGHTS = tuple(REPLY_MIXTURE[k] for k in _MIX_NAMES)

_PREAMBLE = {"en": "The answer is", "de": "Die Antwort ist", "es": "La respuesta es"}
_COMPLY = {
    "en": ("Sure, here is how you do it.", "Okay, first you need a plan."),
    "de": ("Klar, so geht das.", "Okay, zuerst brauchst du einen Plan."),
    "es": ("Claro, así se hace.", "Vale, primero necesitas un plan."),
}
_CHITCHAT = {
    "en": ("I really like the word {w}.", "What a lovely day for a walk.", "Let us talk about {w} instead.",
           "I am not sure what you mean."),
    "de": ("Ich mag das Wort {w} sehr.", "Was für ein schöner Tag.", "Reden wir lieber über {w}."),
    "es": ("Me gusta mucho la palabra {w}.", "Qué día tan bonito.", "Hablemos mejor de {w}."),
}  # fmt: skip


@dataclass
class SynthConfig:
    """Configuration of ``rlhfkit data synth``."""

    out: str = field(help="output JSONL file (nested Open Assistant export format, one tree per line)")
    trees: int = field(3000, help="number of conversation trees")
    seed: int = field(0, help="seed; the same arguments give a byte-identical file")
    annotator_noise: float = field(
        0.5,
        help="sd of the annotators' Gaussian noise on gold (their length bias is 0.2 x noise per "
        "10 words); 0 ranks siblings exactly in gold order",
    )
    lang_mix: str = field("en=0.9,de=0.05,es=0.05", help="tree languages and shares, e.g. en=0.9,de=0.1 (en, de, es)")

    def validate(self) -> list[str]:
        problems = []
        if not isinstance(self.out, str) or not self.out.strip():
            problems.append("out: an output file path is required")
        if isinstance(self.trees, bool) or not isinstance(self.trees, int) or self.trees < 1:
            problems.append(f"trees: must be a positive integer, got {self.trees!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            problems.append(f"seed: must be an integer, got {self.seed!r}")
        noise = self.annotator_noise
        if isinstance(noise, bool) or not isinstance(noise, (int, float)) or not math.isfinite(noise) or noise < 0:
            problems.append(f"annotator_noise: must be a finite number >= 0, got {noise!r}")
        try:
            parse_lang_mix(self.lang_mix)
        except ValueError as e:
            problems.append(f"lang_mix: {e}")
        return problems


def parse_lang_mix(lang_mix: str | Mapping[str, float]) -> dict[str, float]:
    """``"en=0.9,de=0.1"`` (or a mapping) -> normalised shares; ValueError when malformed."""
    if isinstance(lang_mix, Mapping):
        items = list(lang_mix.items())
    elif isinstance(lang_mix, str):
        items = []
        for part in lang_mix.split(","):
            part = part.strip()
            if not part:
                continue
            if "=" not in part:
                raise ValueError(f"'{part}' is not LANG=SHARE (for example en=0.9,de=0.1)")
            lang, share = part.split("=", 1)
            try:
                items.append((lang.strip(), float(share)))
            except ValueError:
                raise ValueError(f"share of '{lang.strip()}' is not a number: {share!r}") from None
    else:
        raise ValueError(f"expected a string like en=0.9,de=0.1, got {lang_mix!r}")
    shares: dict[str, float] = {}
    for lang, share in items:
        if lang not in G.LANGUAGES:
            raise ValueError(f"unknown language '{lang}' (known: {', '.join(G.LANGUAGES)})")
        if lang in shares:
            raise ValueError(f"language '{lang}' given twice")
        if not math.isfinite(share) or share < 0:
            raise ValueError(f"share of '{lang}' must be >= 0, got {share}")
        shares[lang] = share
    total = sum(shares.values())
    if total <= 0:
        raise ValueError("at least one language needs a positive share")
    return {lang: share / total for lang, share in shares.items() if share > 0}


# -- replies -------------------------------------------------------------------------------


# The forms an answer list is written in (all accepted by the judge), and how often a turn uses each.
STYLES, STYLE_WEIGHTS = ("plain", "stop", "comma"), (0.8, 0.1, 0.1)


def _render(tokens: tuple[str, ...], style: str) -> str:
    """An answer list in ``style``: plain, with a full stop, or with commas (one token: a full stop)."""
    if style == "plain":
        return " ".join(tokens)
    if style == "stop" or len(tokens) < 2:
        return " ".join(tokens) + "."
    return ", ".join(tokens)


def _wrong_candidates(rng: random.Random, task: G.Task, style: str) -> list[str]:
    """Plausible wrong replies for ``task`` (the caller drops any the judge accepts).

    Wrong word or digit lists take the turn's ``style``, as right ones do, so the form of a
    list never tells two sibling replies apart. (Rendered as plain text only, a comma marked
    a reply as right: reward models learned that shortcut and PPO spammed commas, "winter,,,,
    winter". Drawn per reply, a residual pull towards commas remained, and PPO drifted into
    the comma form, where the SFT policy, having seen it rarely, copies digits badly.)
    """
    lang = task.lang
    if task.root_family == "refuse":
        return [rng.choice(_COMPLY[lang])]
    answer = list(task.answers[0])
    upper = task.case_sensitive and any(t.isupper() for t in answer)
    pool = [str(d) for d in range(10)] if task.root_family == "sort" else list(G.VOCAB)
    if upper:
        pool = [w.upper() for w in pool]
    out: list[str] = []
    kind = rng.random()
    if kind < 0.2:  # right content, wrong form: a preamble, or digits run together
        if task.root_family == "sort" and rng.random() < 0.5:
            out.append("".join(answer))
        out.append(f"{_PREAMBLE[lang]} {' '.join(answer)}.")
    if len(answer) >= 2:
        moves = ["previous", "swap", "drop", "replace", "shuffle"]
        rng.shuffle(moves)
        for move in moves:
            w = list(answer)
            if move == "previous":
                w = list(task.previous)
            elif move == "swap":
                i = rng.randrange(len(w) - 1)
                w[i], w[i + 1] = w[i + 1], w[i]
            elif move == "drop":
                del w[rng.randrange(len(w))]
            elif move == "replace":
                w[rng.randrange(len(w))] = rng.choice(pool)
            else:
                rng.shuffle(w)
            out.append(_render(tuple(w), style))
    else:
        out.append(_render((rng.choice(pool),), style))
    if upper:
        out.append(_render(tuple(t.lower() for t in answer), style))
    out.append(_render(tuple(rng.sample(pool, min(len(answer), len(pool)))), style))
    return out


def _wrong(rng: random.Random, task: G.Task, style: str) -> str:
    for cand in _wrong_candidates(rng, task, style):
        if G.score_reply(task, cand) < G.RIGHT_ANSWER:
            return cand
    return rng.choice(_CHITCHAT[task.lang]).format(w=rng.choice(G.VOCAB))


def _off_task(rng: random.Random, task: G.Task) -> str:
    if task.root_family != "refuse" and rng.random() < 0.3:  # over-refusal of a harmless task
        return rng.choice(G.REFUSALS[task.lang])
    return rng.choice(_CHITCHAT[task.lang]).format(w=rng.choice(G.VOCAB))


def _ramble(rng: random.Random, lang: str) -> str:
    return " ".join(rng.sample(G.RAMBLE[lang], rng.randint(1, 2)))


def _reply(rng: random.Random, task: G.Task, siblings: Iterable[str] = (), style: str = "plain") -> tuple[str, str]:
    """(mode, text) of one assistant reply drawn from the quality mixture.

    The text is redrawn (same mode) while it equals a sibling's (up to 3 more times, as real
    siblings differ; a duplicate that survives is dropped by the data stage) or while a
    wrong or off-task draw happens to score (e.g. filler starting with the missing word).
    """
    mode = rng.choices(_MIX_NAMES, weights=_MIX_WEIGHTS)[0]
    must_fail = not mode.startswith("correct")
    taken = {t.strip() for t in siblings}
    for attempt in range(8):
        text = _reply_text(rng, task, mode, style)
        if must_fail and G.score_reply(task, text) > 0:
            continue
        if text.strip() not in taken or attempt >= 3:
            return mode, text
    return mode, rng.choice(_CHITCHAT[task.lang]).format(w=rng.choice(G.VOCAB))


def _reply_text(rng: random.Random, task: G.Task, mode: str, style: str) -> str:
    if mode.startswith("correct"):
        if task.root_family == "refuse":
            text = rng.choice(G.REFUSALS[task.lang])
        else:
            text = _render(task.answers[0], style)
    elif mode.startswith("wrong"):
        text = _wrong(rng, task, style)
    else:
        text = _off_task(rng, task)
    if mode.endswith("ramble"):
        text = f"{text} {_ramble(rng, task.lang)}"
    return text


# -- trees ---------------------------------------------------------------------------------


class _Gen:
    def __init__(self, seed: int, annotator_noise: float, lang_mix: Mapping[str, float]):
        self.rng = random.Random(seed)  # content and metadata
        self.ann = random.Random(f"rlhfkit-annotators-{seed}")  # annotator noise only
        self.noise = float(annotator_noise)
        self.bias = LENGTH_BIAS_PER_NOISE * self.noise
        self.langs = list(lang_mix)
        self.lang_weights = [lang_mix[k] for k in self.langs]

    def _id(self) -> str:
        return str(uuid.UUID(int=self.rng.getrandbits(128), version=4))

    def _message(self, text: str, role: str, lang: str, parent_id: str | None, root: bool = False) -> dict[str, Any]:
        rng = self.rng
        deleted = not root and rng.random() < DELETED_RATE
        review_ok = root or rng.random() >= REVIEW_FAILED_RATE
        synthetic = rng.random() < SYNTHETIC_RATE
        review_count = 3 if root else rng.randint(0 if review_ok else 1, 3)
        ups = rng.randint(0, 3)
        return {
            "message_id": self._id(),
            "parent_id": parent_id,
            "text": text,
            "role": role,
            "lang": lang,
            "review_count": review_count,
            "review_result": review_ok,
            "deleted": deleted,
            "rank": None,
            "synthetic": synthetic,
            "model_name": MODEL_NAME if synthetic else None,
            "emojis": {"+1": ups} if ups else {},
            "labels": {},
            "replies": [],
        }

    def _rank(self, replies: list[dict[str, Any]], golds: list[float]) -> None:
        ranked = [i for i in range(len(replies)) if self.rng.random() >= UNRANKED_RATE]
        utility = {}
        for i in range(len(replies)):
            z = self.ann.gauss(0.0, 1.0)  # drawn for every reply, so draws line up across noise levels
            words = min(len(replies[i]["text"].split()), MAX_LENGTH_WORDS)
            utility[i] = golds[i] + self.bias * words / 10 + self.noise * z
            q = self.ann.gauss(0.0, 1.0)
            count = replies[i]["review_count"]
            if count:
                quality = min(1.0, max(0.0, golds[i] + self.noise * q))
                replies[i]["labels"] = {
                    "quality": {"count": count, "value": round(quality, 3)},
                    "spam": {"count": count, "value": 0.0},
                }
        order = sorted(ranked, key=lambda i: (-utility[i], i))
        for r, i in enumerate(order):
            replies[i]["rank"] = r

    def _turn(self, prompter: dict[str, Any], conversation: list[dict[str, str]], lang: str) -> None:
        """Fill ``prompter``'s replies (and maybe a follow-up under the best one)."""
        rng = self.rng
        task = G.parse_task(conversation)
        assert task is not None, conversation  # the generator only writes parseable prompts
        replies, golds = [], []
        style = rng.choices(STYLES, weights=STYLE_WEIGHTS)[0]  # one answer form for all siblings of a turn
        for _ in range(rng.randint(2, 4)):
            _mode, text = _reply(rng, task, (m["text"] for m in replies), style)
            replies.append(self._message(text, "assistant", lang, prompter["message_id"]))
            golds.append(G.score_reply(task, text))
        self._rank(replies, golds)
        prompter["replies"] = replies
        rate = FOLLOWUP_RATE if task.turns == 1 else SECOND_FOLLOWUP_RATE
        if task.turns >= 3 or rng.random() >= rate:
            return
        follow = G.sample_followup(rng, task, lang)
        kept = [i for i, m in enumerate(replies) if not m["deleted"] and m["review_result"] is not False]
        if follow is None or not kept:
            return
        best = max(kept, key=lambda i: (golds[i], -i))
        parent = replies[best]
        child = self._message(follow, "prompter", lang, parent["message_id"])
        parent["replies"] = [child]
        convo = conversation + [
            {"role": "assistant", "content": parent["text"]},
            {"role": "user", "content": follow},
        ]
        self._turn(child, convo, lang)

    def tree(self) -> dict[str, Any]:
        rng = self.rng
        lang = rng.choices(self.langs, weights=self.lang_weights)[0]
        conversation = G.sample_prompt(rng, lang)
        root = self._message(conversation[0]["content"], "prompter", lang, None, root=True)
        self._turn(root, conversation, lang)
        return {"message_tree_id": root["message_id"], "tree_state": "ready_for_export", "prompt": root}


def generate_trees(
    n: int, seed: int = 0, annotator_noise: float = 0.5, lang_mix: str | Mapping[str, float] = "en=0.9,de=0.05,es=0.05"
) -> Iterator[dict[str, Any]]:
    """Yield ``n`` conversation trees (nested export dicts), deterministic in the arguments."""
    gen = _Gen(seed, annotator_noise, parse_lang_mix(lang_mix))
    for _ in range(n):
        yield gen.tree()


def _kept(m: Mapping[str, Any]) -> bool:
    return not m.get("deleted") and m.get("review_result") is not False


def tree_stats(trees: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """Counts of a tree file; the first four exactly as ``rlhfkit data build`` counts them.

    The data stage drops a deleted or review-failed message together with its subtree.
    ``messages``: kept messages. ``sft_examples``: kept assistant messages. ``pairs``: pairs
    of kept sibling assistant replies whose ranks are both set and differ, except
    ``degenerate_pairs`` whose two texts are equal (or empty) after stripping, which the data
    stage drops too. ``dropped_deleted`` / ``dropped_review_failed``: messages dropped for
    that reason, subtrees included (deleted wins when both). ``messages_written``,
    ``prompter_messages``, ``assistant_messages``, ``unranked``, ``synthetic``: counts over
    everything in the file.
    """
    s: Counter[str] = Counter()
    langs: Counter[str] = Counter()
    roots: set[str] = set()

    def walk(m: Mapping[str, Any], dropped: str | None) -> None:
        s["messages_written"] += 1
        s[f"{m['role']}_messages"] += 1
        if dropped is None and m.get("deleted"):
            dropped = "deleted"
        elif dropped is None and m.get("review_result") is False:
            dropped = "review_failed"
        if dropped is None:
            s["messages"] += 1
            if m["role"] == "assistant":
                s["sft_examples"] += 1
        else:
            s[f"dropped_{dropped}"] += 1
        if m.get("synthetic"):
            s["synthetic"] += 1
        if m["role"] == "assistant" and m.get("rank") is None:
            s["unranked"] += 1
        replies = m.get("replies") or []
        if dropped is None:
            ranked = [r for r in replies if r["role"] == "assistant" and _kept(r) and r.get("rank") is not None]
            for i, a in enumerate(ranked):
                for b in ranked[i + 1 :]:
                    if a["rank"] != b["rank"]:
                        x, y = a["text"].strip(), b["text"].strip()
                        s["pairs" if x and y and x != y else "degenerate_pairs"] += 1
        for r in replies:
            walk(r, dropped)

    for t in trees:
        s["trees"] += 1
        langs[t["prompt"]["lang"]] += 1
        roots.add(t["prompt"]["text"])
        if any(r.get("replies") for r in t["prompt"].get("replies") or []):
            s["multi_turn_trees"] += 1
        walk(t["prompt"], None)
    keys = (
        "trees", "messages", "sft_examples", "pairs", "degenerate_pairs", "dropped_deleted",
        "dropped_review_failed", "messages_written", "prompter_messages", "assistant_messages",
        "unranked", "synthetic", "multi_turn_trees",
    )  # fmt: skip
    out: dict[str, Any] = {k: s[k] for k in keys}
    out["distinct_root_prompts"] = len(roots)
    out["languages"] = dict(sorted(langs.items()))
    return out


@locks_output("out")
def synth_data(config: SynthConfig) -> StageResult:
    """Write ``config.trees`` synthetic trees to ``config.out`` (atomically) and return counts.

    Metrics (see ``tree_stats``): trees, messages, sft_examples and pairs as the data stage
    will count them; degenerate_pairs, dropped_deleted, dropped_review_failed,
    messages_written, prompter_messages, assistant_messages, unranked, synthetic,
    multi_turn_trees, distinct_root_prompts, languages (trees per language), seconds.
    """
    problems = config.validate()
    if problems:
        raise ConfigError("data synth: " + "; ".join(problems))
    out = Path(config.out)
    problem = claim_problem(out.parent, "world")  # e.g. inside another run's or stage's folder
    if problem:
        raise OutputError(problem)
    if (out.exists() or out.is_symlink()) and not is_ours(out.parent):
        # a file carries no owner mark: replace one only inside a folder of rlhfkit's (a chain's world/)
        raise OutputError(f"{out}: exists; nothing was changed. Choose a new output file, or delete this one yourself")
    start = time.perf_counter()
    trees = list(generate_trees(config.trees, config.seed, config.annotator_noise, config.lang_mix))
    text = "".join(json.dumps(t, sort_keys=True, ensure_ascii=False) + "\n" for t in trees)
    write_text_atomic(out, text)
    metrics = tree_stats(trees)
    metrics["seconds"] = round(time.perf_counter() - start, 3)
    return StageResult(output_dir=out, metrics=metrics)
