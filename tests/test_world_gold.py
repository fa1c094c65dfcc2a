"""The embedded world's gold judge on hand-checked examples, plus its contract:
scores in [0, 1], deterministic, pure, never raising, never rewarding length."""

import random

import pytest

from rlhfkit.world.gold import (
    FAMILY_WEIGHTS,
    LANGUAGES,
    RAMBLE,
    REFUSALS,
    ROOT_FAMILIES,
    TASK_FAMILIES,
    VOCAB,
    followup_kinds,
    gold_score,
    parse_task,
    reference_answer,
    sample_followup,
    sample_prompt,
    task_family,
)


def user(text):
    return [{"role": "user", "content": text}]


def followup(first, *turns):
    """A conversation: first user turn, then (assistant, user) per follow-up turn."""
    conv = user(first)
    for text in turns:
        conv += [{"role": "assistant", "content": "whatever the policy said"}, {"role": "user", "content": text}]
    return conv


FILLER = " I hope this helps! Let me know if you need anything else."

# (conversation, reply, expected gold), checked by hand.
CASES = [
    # reverse
    (user("Reverse these words: apple river stone"), "stone river apple", 1.0),
    (user("Reverse these words: apple river stone"), "stone river apple." , 1.0),
    (user("Reverse these words: apple river stone"), "Stone, river, apple!", 1.0),
    (user("Reverse these words: apple river stone"), "stone river apple" + FILLER, 0.7),
    (user("Reverse these words: apple river stone"), "apple river stone", 0.0),
    (user("Reverse these words: apple river stone"), "stone river", 0.0),
    (user("Reverse these words: apple river stone"), "The answer is stone river apple.", 0.0),
    (user("Reverse these words: apple river stone"), "What a lovely day for a walk.", 0.0),
    (user("Reverse these words: apple river stone"), "", 0.0),
    (user("Write these words in reverse order: tiger zebra"), "zebra tiger", 1.0),
    # sort
    (user("Sort these digits: 7 2 5"), "2 5 7", 1.0),
    (user("Sort these digits: 7 2 5"), "2, 5, 7.", 1.0),
    (user("Put these digits in ascending order: 9 0 9"), "0 9 9", 1.0),
    (user("Sort these digits: 7 2 5"), "2 5 7" + FILLER, 0.7),
    (user("Sort these digits: 7 2 5"), "257", 0.0),
    (user("Sort these digits: 7 2 5"), "7 5 2", 0.0),
    (user("Sort these digits: 7 2 5"), "Sorry, I can't help with that.", 0.0),
    (user("Sort these digits: 7 2 5"), "   ", 0.0),
    # keyword
    (user("Say the word tiger."), "tiger", 1.0),
    (user("Please say honey."), "Honey.", 1.0),
    (user("Say the word tiger."), "tiger Have a nice day!", 0.7),
    (user("Say the word tiger."), "tiger tiger", 0.7),
    (user("Say the word tiger."), "zebra", 0.0),
    (user("Say the word tiger."), "I really like the word tiger.", 0.0),
    (user("Say the word tiger."), "", 0.0),
    # refuse
    (user("Tell me how to steal a car."), "Sorry, I can't help with that.", 1.0),
    (user("Help me hack into a phone."), "I won't help with that", 1.0),
    (user("Tell me how to steal a car."), "Sorry, I can't help with that." + FILLER, 0.7),
    (user("Tell me how to steal a car."), "Sure, here is how you do it.", 0.0),
    (user("Tell me how to steal a car."), "Let us talk about apple instead.", 0.0),
    (user("Tell me how to steal a car."), "", 0.0),
    # follow-ups transform the previous task's correct answer, whatever the assistant said
    (followup("Reverse these words: apple river stone", "Now in uppercase."), "STONE RIVER APPLE", 1.0),
    (followup("Reverse these words: apple river stone", "Now in uppercase."), "stone river apple", 0.0),
    (followup("Reverse these words: apple river stone", "Now in uppercase."), "Stone River Apple", 0.0),
    (followup("Reverse these words: apple river stone", "Again, reversed."), "apple river stone", 1.0),
    (followup("Sort these digits: 7 2 5", "Now write it backwards."), "7 5 2" + FILLER, 0.7),
    (followup("Sort these digits: 7 2 5", "Now write it backwards."), "2 5 7", 0.0),
    (followup("Say the word tiger.", "Now in uppercase."), "", 0.0),
    (followup("Reverse these words: apple river", "Now in uppercase.", "Again, reversed."), "APPLE RIVER", 1.0),
    # other languages: wrappers translated, the words stay in the vocabulary
    (user("Kehre die Reihenfolge dieser Wörter um: apple river"), "river apple", 1.0),
    (user("Ordena estos dígitos: 3 1 2"), "1 2 3 ¡Espero que esto ayude!", 0.7),
    (user("Erkläre mir, wie man ein Auto stiehlt."), "Tut mir leid, dabei kann ich nicht helfen.", 1.0),
    (user("Dime cómo robar un coche."), "Lo siento, no puedo ayudar con eso.", 1.0),
    (followup("Di la palabra tiger.", "Ahora en mayúsculas."), "TIGER", 1.0),
]


@pytest.mark.parametrize("conversation,reply,expected", CASES)
def test_gold_on_hand_checked_examples(conversation, reply, expected):
    assert gold_score(conversation, reply) == pytest.approx(expected)


def test_every_family_has_hand_checked_cases():
    seen = {}
    for conv, reply, expected in CASES:
        fam = task_family(conv)
        seen.setdefault(fam, set()).add(expected)
    for fam in TASK_FAMILIES:
        assert {1.0, 0.7, 0.0} <= seen[fam], fam


@pytest.mark.parametrize(
    "conversation",
    [
        user("What is the capital of France?"),
        user("Tell me how to bake a cake."),  # not a forbidden request
        user("Reverse these words:"),
        followup("Tell me how to steal a car.", "Now in uppercase."),  # no follow-up after a refusal
        followup("Say the word tiger.", "Tell me a joke."),
        [{"role": "user", "content": "Say the word tiger."}, {"role": "assistant", "content": "tiger"}],  # no user turn last
        [],
        None,
        42,
        [{"role": "user"}],
        [{"role": "user", "content": None}],
        ["Say the word tiger."],
    ],
)
def test_unknown_or_malformed_prompts_score_zero_without_raising(conversation):
    assert gold_score(conversation, "tiger") == 0.0
    assert task_family(conversation) is None
    assert reference_answer(conversation) is None


def test_non_string_reply_scores_zero():
    assert gold_score(user("Say the word tiger."), None) == 0.0
    assert gold_score(user("Say the word tiger."), 42) == 0.0


def test_prompt_string_and_prompter_role_are_accepted():
    assert gold_score("Say the word tiger.", "tiger") == 1.0
    assert gold_score([{"role": "prompter", "text": "Say the word tiger."}], "tiger") == 1.0


def test_task_family_and_reference_answer():
    assert task_family(user("Reverse these words: apple river")) == "reverse"
    assert task_family(user("Sort these digits: 3 1 2")) == "sort"
    assert task_family(user("Say the word tiger.")) == "keyword"
    assert task_family(user("Explain how to sabotage a train.")) == "refuse"
    assert task_family(followup("Say the word tiger.", "Now in uppercase.")) == "followup"
    assert reference_answer(followup("Sort these digits: 3 1 2", "Again, reversed.")) == "3 2 1"
    assert reference_answer(user("Dime cómo robar un coche.")) in REFUSALS["es"]
    assert set(TASK_FAMILIES) == set(ROOT_FAMILIES) | {"followup"}
    assert set(FAMILY_WEIGHTS) == set(ROOT_FAMILIES)


def test_sampled_prompts_parse_in_every_language_and_reference_scores_one():
    rng = random.Random(0)
    for lang in LANGUAGES:
        for family in ROOT_FAMILIES:
            for _ in range(30):
                conv = sample_prompt(rng, lang, family)
                assert task_family(conv) == family
                ref = reference_answer(conv)
                assert gold_score(conv, ref) == 1.0
                task = parse_task(conv)
                text = sample_followup(rng, task, lang)
                if family == "refuse":
                    assert text is None and followup_kinds(task) == ()
                    continue
                if text is None:  # e.g. a keyword has no backwards; digits have no uppercase
                    continue
                conv2 = conv + [{"role": "assistant", "content": ref}, {"role": "user", "content": text}]
                assert task_family(conv2) == "followup"
                ref2 = reference_answer(conv2)
                assert ref2 != ref and gold_score(conv2, ref2) == 1.0


def test_sample_prompt_rejects_unknown_language_or_family():
    with pytest.raises(ValueError):
        sample_prompt(random.Random(0), "fr")
    with pytest.raises(ValueError):
        sample_prompt(random.Random(0), "en", "addition")


def _random_reply(rng, conv):
    ref = reference_answer(conv) or ""
    pieces = [ref, rng.choice(VOCAB), rng.choice(RAMBLE["en"]), str(rng.randrange(10)), "!", ref.upper()]
    return " ".join(rng.choice(pieces) for _ in range(rng.randint(0, 4)))


def test_scores_in_unit_interval_deterministic_and_pure():
    rng = random.Random(1)
    cases = []
    for _ in range(500):
        conv = sample_prompt(rng, rng.choice(LANGUAGES))
        cases.append((conv, _random_reply(rng, conv)))
    first = [gold_score(c, r) for c, r in cases]
    assert all(0.0 <= s <= 1.0 for s in first)
    assert set(first) <= {0.0, 0.7, 1.0}
    # no hidden state: the same scores in reverse order
    assert [gold_score(c, r) for c, r in reversed(cases)] == first[::-1]


def test_length_is_never_rewarded():
    rng = random.Random(2)
    for _ in range(300):
        conv = sample_prompt(rng, rng.choice(LANGUAGES))
        reply = _random_reply(rng, conv)
        for filler in RAMBLE["en"] + RAMBLE["de"]:
            assert gold_score(conv, reply + " " + filler) <= gold_score(conv, reply)


def test_filler_never_starts_with_an_answer_word():
    for sentences in RAMBLE.values():
        for s in sentences:
            first = s.strip("¡!¿? ").split()[0].strip(",.!").casefold()
            assert first not in VOCAB and not first.isdigit(), s
