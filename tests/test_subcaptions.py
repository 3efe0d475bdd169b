"""Factual / counterfactual sub-captions: head noun kept, exactly one slot changed, seeded."""

from __future__ import annotations

import json
import random

import pytest

from clipguard.data.fashion_mnist import ADJECTIVES, CAPTION_TEMPLATES, SYNONYMS
from clipguard.data.subcaptions import KINDS, SubcaptionGenerator


@pytest.fixture(scope="module")
def gen() -> SubcaptionGenerator:
    return SubcaptionGenerator()


# (caption, head noun that must survive, words that must be dropped)
CASES = [
    ("a photo of a stylish tote.", "tote", {"photo", "a"}),
    ("a man riding a brown horse on the beach", "man", {"beach", "the"}),
    ("a black leather ankle boot on a white background", "boot", {"background", "leather"}),
    ("someone is selling a cheap handbag online.", "handbag", {"online", "is"}),
    ("a picture of an apple", "apple", {"picture"}),
    ("the tee I bought last week.", "tee", {"bought", "week"}),
    ("a cat sleeps on the old sofa", "cat", set()),
    # a cardinal that names the thing is its head (MNIST's captions); one that counts a noun is not
    ("a close-up of a handwritten slanted 7.", "7", {"close-up"}),
    ("a 0 written in ink.", "0", set()),
    ("two dogs play in the park", "dogs", {"two"}),
    ("one of the best bags", "bags", {"one", "of"}),
]


@pytest.mark.parametrize("caption,head,dropped", CASES)
def test_factual_keeps_head_noun_and_drops_modifiers(gen, caption, head, dropped):
    fact = gen.factual(caption)
    assert fact is not None
    words = fact.text.split()
    assert head in words
    assert (head, "noun") in fact.parts
    assert not dropped & set(words)


@pytest.mark.parametrize("caption,compound", [
    ("a large digit two written in ink.", "digit two"),
    ("a white neat number 3 on a black background.", "number 3"),
    ("an iphone 12 on a table", "iphone 12"),
])
def test_a_number_after_a_noun_joins_it(gen, caption, compound):
    fact = gen.factual(caption)
    assert fact is not None and (compound, "noun") in fact.parts


def test_factual_keeps_verb_and_object(gen):
    fact = gen.factual("a man riding a brown horse on the beach")
    assert fact.text == "man riding brown horse"
    assert [k for _, k in fact.parts] == ["noun", "verb", "adj", "noun"]


def test_counterfactual_differs_in_exactly_one_slot(gen):
    rng = random.Random(0)
    caps = [t.format(f"{a} {n}".strip()) for t in CAPTION_TEMPLATES for a in ADJECTIVES[2:6]
            for n in (SYNONYMS["bag"] + SYNONYMS["ankle boot"])[:4]] + [c for c, _, _ in CASES]
    kinds_seen = set()
    for cap in caps:
        fact = gen.factual(cap)
        counter = gen.counterfactual(cap, rng)
        assert fact is not None and counter is not None, cap
        assert len(fact.parts) == len(counter.parts)
        diff = [i for i, (a, b) in enumerate(zip(fact.parts, counter.parts)) if a != b]
        assert len(diff) == 1, (cap, fact.text, counter.text)
        i = diff[0]
        assert fact.parts[i][1] == counter.parts[i][1] in KINDS     # same kind of slot
        assert fact.parts[i][0].lower() != counter.parts[i][0].lower()
        kinds_seen.add(fact.parts[i][1])
    assert kinds_seen == {"adj", "verb", "noun"}


def test_counterfactual_is_seeded(gen):
    cap = "someone is selling a cheap handbag online."
    a = [gen.counterfactual(cap, r).text for r in [random.Random(4)] for _ in range(6)]
    b = [gen.counterfactual(cap, r).text for r in [random.Random(4)] for _ in range(6)]
    assert a == b and len(set(a)) > 1


def test_replacements_prefer_cohyponyms_and_opposites(gen):
    rng = random.Random(0)
    shoes = {gen.replacement("sneaker", "noun", rng) for _ in range(20)}
    assert shoes & set(gen.wn.cohyponyms("sneaker", "n"))
    assert gen.replacement("stylish", "adj", rng) in {"styleless", "dowdy"}
    assert gen.replacement("bags", "noun", rng).endswith("s")            # inflection kept
    assert gen.replacement("riding", "verb", rng).endswith("ing")


def test_only_requested_kinds_change():
    g = SubcaptionGenerator(kinds=("noun",))
    rng = random.Random(1)
    for _ in range(10):
        fact = g.factual("someone is selling a cheap handbag online.")
        counter = g.counterfactual(fact, rng)
        diff = [i for i, (a, b) in enumerate(zip(fact.parts, counter.parts)) if a != b]
        assert fact.parts[diff[0]][1] == "noun"
    with pytest.raises(ValueError):
        SubcaptionGenerator(kinds=("colour",))


def test_no_noun_gives_none(gen):
    assert gen.factual("") is None
    assert gen.factual("of the and") is None
    assert gen.pair("...", random.Random(0)) is None


def test_cli_prints_subcaptions(capsys):
    from clipguard.cli import main

    assert main(["subcaptions", "--caption", "a man riding a brown horse", "--n", "2", "--seed", "1",
                 "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["factual"] == "man riding brown horse" and len(out["counterfactual"]) == 2
    assert main(["subcaptions"]) == 2   # nothing to do is a clear error


def test_cli_summary_counts_the_factuals(capsys):
    from clipguard.cli import main

    caps = ["a slanted 7", "a bold 7", "a large digit two", "an old photo of", "a red bag"]
    args = ["subcaptions", "--summary", "--json"] + [x for c in caps for x in ("--caption", c)]
    assert main(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["captions"] == 5 and out["with_factual"] + out["no_noun"] == 5
    facts = {c["factual"]: c["count"] for c in out["commonest"]}
    assert facts["large digit two"] == 1 and facts["red bag"] == 1 and out["no_noun"] == 1
    assert sum(facts.values()) == out["with_factual"] and out["distinct_factuals"] == len(facts)
    assert main(["subcaptions", "--summary", "--caption", "a slanted 7"]) == 0
    assert "distinct factuals: 1" in capsys.readouterr().out
