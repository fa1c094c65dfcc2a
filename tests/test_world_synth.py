"""The embedded world's tree generator: determinism, the export format, annotator
noise against the gold order, and counts checked by an independent walk of the file."""

import hashlib
import json
import re
import statistics
import time
from collections import Counter

import pytest

from rlhfkit.errors import ConfigError
from rlhfkit.world.gold import LANGUAGES, VOCAB, gold_score, parse_task, reference_answer, task_family
from rlhfkit.world.synth import SynthConfig, generate_trees, parse_lang_mix, synth_data

MESSAGE_FIELDS = {
    "message_id", "parent_id", "text", "role", "lang", "review_count", "review_result", "deleted",
    "rank", "synthetic", "model_name", "emojis", "labels", "replies",
}  # fmt: skip


@pytest.fixture(scope="module")
def default_file(tmp_path_factory):
    """3000 trees, seed 0, default noise: the demo's data."""
    out = tmp_path_factory.mktemp("synth") / "world.jsonl"
    start = time.perf_counter()
    result = synth_data(SynthConfig(out=str(out)))
    print(f"3000 trees in {time.perf_counter() - start:.2f} s: {result.metrics}")
    trees = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    return out, result, trees


def kept(m):
    return not m["deleted"] and m["review_result"] is not False


def turns(tree):
    """(conversation up to a user turn, its assistant replies, dropped?) for every user turn."""
    out = []

    def walk(m, context, dropped):
        dropped = dropped or not kept(m)
        context = context + [{"role": "user" if m["role"] == "prompter" else "assistant", "content": m["text"]}]
        if m["role"] == "prompter":
            out.append((context, m["replies"], dropped))
        for r in m["replies"]:
            walk(r, context, dropped)

    walk(tree["prompt"], [], False)
    return out


def ranked_pairs(tree):
    """(gold_i, gold_j, rank_i, rank_j, text_i, text_j) for kept ranked sibling replies."""
    for context, replies, dropped in turns(tree):
        if dropped:
            continue
        rs = [r for r in replies if r["role"] == "assistant" and kept(r) and r["rank"] is not None]
        golds = [gold_score(context, r["text"]) for r in rs]
        for i in range(len(rs)):
            for j in range(i + 1, len(rs)):
                yield golds[i], golds[j], rs[i]["rank"], rs[j]["rank"], rs[i]["text"], rs[j]["text"]


def agreement(trees):
    agree = total = 0
    for gi, gj, ri, rj, _, _ in (p for t in trees for p in ranked_pairs(t)):
        if gi != gj:
            total += 1
            agree += (gi > gj) == (ri < rj)
    return agree / total, total


def test_same_seed_byte_identical_other_seed_differs(tmp_path):
    digests = []
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        synth_data(SynthConfig(out=str(tmp_path / f"{name}.jsonl"), trees=200, seed=seed))
        digests.append(hashlib.sha256((tmp_path / f"{name}.jsonl").read_bytes()).hexdigest())
    assert digests[0] == digests[1]
    assert digests[0] != digests[2]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]  # atomic write left no temp


def test_export_format(default_file):
    _, _, trees = default_file
    ids = set()
    for t in trees:
        assert set(t) == {"message_tree_id", "tree_state", "prompt"}
        assert t["tree_state"] == "ready_for_export"
        root = t["prompt"]
        assert t["message_tree_id"] == root["message_id"] and root["parent_id"] is None
        assert root["role"] == "prompter"
        stack = [root]
        while stack:
            m = stack.pop()
            assert set(m) == MESSAGE_FIELDS, set(m) ^ MESSAGE_FIELDS
            assert m["message_id"] not in ids
            ids.add(m["message_id"])
            assert isinstance(m["text"], str) and m["text"].strip()
            assert m["lang"] == root["lang"] and m["lang"] in LANGUAGES
            assert isinstance(m["review_count"], int) and isinstance(m["emojis"], dict) and isinstance(m["labels"], dict)
            assert (m["model_name"] is not None) == m["synthetic"]
            children = m["replies"]
            for c in children:
                assert c["parent_id"] == m["message_id"]
                assert c["role"] != m["role"]  # turns alternate
            if m["role"] == "prompter":
                assert m["rank"] is None
                assert 2 <= len(children) <= 4
                ranks = sorted(c["rank"] for c in children if c["rank"] is not None)
                assert ranks == list(range(len(ranks)))  # 0 = best, among the ranked siblings
            else:
                assert len(children) <= 1
            stack.extend(children)


def test_noise_zero_gives_gold_order_and_noise_lowers_agreement():
    n = 1500
    a0, total = agreement(generate_trees(n, seed=1, annotator_noise=0.0))
    a05, _ = agreement(generate_trees(n, seed=1, annotator_noise=0.5))
    a2, _ = agreement(generate_trees(n, seed=1, annotator_noise=2.0))
    print(f"agreement with gold order over {total} pairs: noise 0 {a0:.3f}, 0.5 {a05:.3f}, 2.0 {a2:.3f}")
    assert total > 2000
    assert a0 == 1.0
    assert 0.75 < a05 < 0.95
    assert a2 < a05 - 0.1
    assert a2 > 0.5  # still better than chance


def test_noise_changes_only_ranks_and_labels():
    def strip(m):
        return (m["message_id"], m["text"], m["deleted"], m["review_result"], m["rank"] is None,
                tuple(strip(r) for r in m["replies"]))  # fmt: skip

    a = [strip(t["prompt"]) for t in generate_trees(100, seed=5, annotator_noise=0.0)]
    b = [strip(t["prompt"]) for t in generate_trees(100, seed=5, annotator_noise=1.0)]
    assert a == b


def test_annotators_sometimes_prefer_rambling():
    """The tempting proxy: a right answer with filler (0.7) beats the concise one (1.0) in
    a minority of annotations at the default noise, never at noise 0."""
    for noise, lo, hi in ((0.0, 0.0, 0.0), (0.5, 0.2, 0.5)):
        won = total = 0
        for t in generate_trees(1500, seed=2, annotator_noise=noise):
            for gi, gj, ri, rj, _, _ in ranked_pairs(t):
                if {gi, gj} == {1.0, 0.7}:
                    total += 1
                    won += (gi == 0.7) == (ri < rj)
        assert total > 200
        assert lo <= won / total <= hi, (noise, won / total)


def walk_stats(trees):
    """Counts by the data stage's rules, written independently of synth.tree_stats:
    a deleted or review-failed message is dropped with its subtree."""
    s = Counter()
    for t in trees:
        s["trees"] += 1
        stack = [t["prompt"]]
        while stack:
            m = stack.pop()
            if not kept(m):
                continue
            s["messages"] += 1
            s["sft_examples"] += m["role"] == "assistant"
            stack.extend(m["replies"])
        for gi, gj, ri, rj, ti, tj in ranked_pairs(t):
            if ri != rj and ti.strip() != tj.strip():
                s["pairs"] += 1
        s["written"] += len(json.dumps(t).split('"message_id"')) - 1
    return s


def test_metrics_match_an_independent_walk(default_file):
    _, result, trees = default_file
    s = walk_stats(trees)
    m = result.metrics
    for key in ("trees", "messages", "sft_examples", "pairs"):
        assert m[key] == s[key], key
    assert m["messages_written"] == s["written"] == m["prompter_messages"] + m["assistant_messages"]
    assert m["messages_written"] - m["messages"] == m["dropped_deleted"] + m["dropped_review_failed"]
    assert m["trees"] == 3000
    assert 2.5 < m["assistant_messages"] / m["prompter_messages"] < 3.5


def test_file_has_the_features_of_real_exports(default_file):
    _, result, trees = default_file
    m = result.metrics
    flags = Counter()
    depth_max = 0
    for t in trees:
        stack = [(t["prompt"], 1)]
        while stack:
            msg, depth = stack.pop()
            depth_max = max(depth_max, depth)
            flags["messages"] += 1
            flags["deleted"] += msg["deleted"]
            flags["review_failed"] += msg["review_result"] is False
            flags["synthetic"] += msg["synthetic"]
            flags["unranked"] += msg["role"] == "assistant" and msg["rank"] is None
            flags["assistant"] += msg["role"] == "assistant"
            stack.extend((r, depth + 1) for r in msg["replies"])
    n = flags["messages"]
    assert 0.01 < flags["deleted"] / n < 0.035
    assert 0.01 < flags["review_failed"] / n < 0.035
    assert 0.01 < flags["synthetic"] / n < 0.035
    assert 0.03 < flags["unranked"] / flags["assistant"] < 0.08
    assert depth_max >= 4  # prompt -> reply -> follow-up -> reply
    langs = Counter(t["prompt"]["lang"] for t in trees)
    assert set(langs) == {"en", "de", "es"} and 0.85 < langs["en"] / 3000 < 0.95
    assert m["languages"] == dict(langs)
    assert 0.10 < m["multi_turn_trees"] / 3000 < 0.20
    assert m["distinct_root_prompts"] > 1500


def test_follow_up_turns_are_judged(default_file):
    _, _, trees = default_file
    fam = Counter()
    best_follow = []
    for t in trees[:600]:
        for context, replies, _ in turns(t):
            f = task_family(context)
            assert f is not None, context  # the judge parses every prompt it generated
            fam[f] += 1
            if f == "followup":
                assert reference_answer(context) is not None
                best_follow.append(max(gold_score(context, r["text"]) for r in replies))
    assert set(fam) == {"reverse", "sort", "keyword", "refuse", "followup"}
    assert statistics.mean(best_follow) > 0.5


def test_quality_mixture(default_file):
    _, _, trees = default_file
    golds, words = Counter(), {0.0: [], 0.7: [], 1.0: []}
    for t in trees:
        for context, replies, _ in turns(t):
            for r in replies:
                g = gold_score(context, r["text"])
                golds[g] += 1
                words[g].append(len(r["text"].split()))
    n = sum(golds.values())
    mean = sum(g * c for g, c in golds.items()) / n
    print(f"gold of replies: mean {mean:.3f}, shares {dict((g, round(c / n, 3)) for g, c in golds.items())}")
    assert 0.40 < mean < 0.50  # 0.35 x 1.0 + 0.15 x 0.7 = 0.455 expected
    assert 0.30 < golds[1.0] / n < 0.40 and 0.10 < golds[0.7] / n < 0.20
    assert statistics.mean(words[0.7]) > statistics.mean(words[1.0]) + 4  # rambling is longer
    assert max(max(w) for w in words.values()) <= 30  # replies stay short


VOCAB_SET = {w.lower() for w in VOCAB}


def test_answer_form_is_not_a_label_of_gold(default_file):
    """The form of an answer list (plain, full stop, commas) never tells sibling replies apart.

    Before the first fix only right answers were ever rendered with commas or a full stop
    (P(right | comma) was 1.000 against 0.544 for plain answers): reward models learned
    "comma = right" and PPO spammed commas into broken answers ("winter,,,,,,,, winter").
    Drawing the form per reply left a pull towards commas (non-list wrong replies cannot
    carry one), and PPO drifted into the comma form, where the SFT policy copies badly. Now
    a turn draws one form for all its replies, right and wrong: no preference pair contrasts
    two forms of a list, and each form is as often right as the others.
    """
    _, _, trees = default_file
    counts = Counter()  # (form, right?) over bare answer lists of two or more tokens with gold 0 or 1
    forms_per_turn = Counter()  # turns by the number of distinct forms among their bare answer lists
    for t in trees:
        for context, replies, _ in turns(t):
            task = parse_task(context)
            if task is None or task.root_family == "refuse":
                continue
            forms = set()
            for r in replies:
                text = r["text"]
                words = text.replace(",", " ").replace(".", " ").split()
                if not (2 <= len(words) <= len(task.answers[0]) + 1 and re.fullmatch(r"[A-Za-z0-9 ,.]+", text)
                        and all(w.isdigit() or w.lower() in VOCAB_SET for w in words)):
                    continue  # not a bare answer list (a refusal, chit-chat, a preamble, a ramble)
                form = "comma" if "," in text else "stop" if text.endswith(".") else "plain"
                forms.add(form)
                g = gold_score(context, text)
                if g in (0.0, 1.0):
                    counts[form, g == 1.0] += 1
            if forms:
                forms_per_turn[len(forms)] += 1

    assert forms_per_turn[1] > 1000 and forms_per_turn[2] == forms_per_turn[3] == 0, forms_per_turn

    def p_right(form: str) -> float:
        right, wrong = counts[form, True], counts[form, False]
        assert right + wrong > 50, counts
        return right / (right + wrong)

    for form in ("comma", "stop"):
        assert counts[form, False] > 20, counts  # wrong answers do take this form
        # binomial SE of a share from ~150-300 lists is ~0.04: 0.1 is > 2 SE, far below the old 0.46
        assert abs(p_right(form) - p_right("plain")) < 0.1, (form, p_right(form), p_right("plain"))


def test_lang_mix_and_validation(tmp_path):
    assert parse_lang_mix("en=9,de=1") == {"en": 0.9, "de": 0.1}
    trees = list(generate_trees(50, seed=0, lang_mix="de=1"))
    assert {t["prompt"]["lang"] for t in trees} == {"de"}
    for t in trees:
        for context, replies, _ in turns(t):
            assert gold_score(context, reference_answer(context)) == 1.0
    for bad in (
        {"trees": 0},
        {"annotator_noise": -1.0},
        {"annotator_noise": float("nan")},
        {"lang_mix": "fr=1"},
        {"lang_mix": "en"},
        {"lang_mix": "en=0"},
    ):
        config = SynthConfig(out=str(tmp_path / "x.jsonl"), **bad)
        assert config.validate()
        with pytest.raises(ConfigError):
            synth_data(config)
    assert not (tmp_path / "x.jsonl").exists()
    assert SynthConfig(out="x.jsonl").validate() == []


def test_cli_data_synth(tmp_path, capsys):
    from rlhfkit.cli import main

    out = tmp_path / "cli.jsonl"
    assert main(["data", "synth", "--out", str(out), "--trees", "20", "--seed", "7", "--annotator-noise", "0"]) == 0
    assert "20 trees" in capsys.readouterr().out
    direct = tmp_path / "direct.jsonl"
    synth_data(SynthConfig(out=str(direct), trees=20, seed=7, annotator_noise=0.0))
    assert out.read_bytes() == direct.read_bytes()
    assert main(["data", "synth", "--out", str(out), "--lang-mix", "xx=1"]) == 2


def test_data_stage_reads_the_file_with_the_same_counts(default_file, tmp_path):
    from rlhfkit.data import DataBuildConfig, build_data

    path, result, _ = default_file
    built = build_data(DataBuildConfig(sources=[str(path)], out=str(tmp_path / "data")))
    for key in ("trees", "messages", "sft_examples", "pairs"):
        assert built.metrics[key] == result.metrics[key], (key, built.metrics[key], result.metrics[key])
    dropped = built.metrics["dropped"]
    assert dropped["deleted"] == result.metrics["dropped_deleted"]
    assert dropped["review_failed"] == result.metrics["dropped_review_failed"]
    assert dropped["degenerate_pairs"] == result.metrics["degenerate_pairs"]
