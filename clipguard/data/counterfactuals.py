"""Counterfactual sub-captions for CleanerCLIP: the paper's rules, or one hard-negative slot.

``paper`` (CleanerCLIP, Sec. 3.2): one of three operations per sample, drawn uniformly among
those the factual sub-caption allows: (1) replace the adjectives (the subject's and the
object's: every adjective of the sub-caption), (2) replace the relational verb, (3) replace the
subject and object nouns (every noun). An operation whose words are missing is skipped and
another is drawn. Each word is replaced by a random word of the same part of speech from a word
list, inflected like the word it replaces. The paper's lists hold 3,000 terms each, "from common
to rare", built with WordNet and ChatGPT; ours come from WordNet alone (``WordLists``): the
most frequent lemmas by WordNet's sense-tagged counts, with nouns limited to concrete ones
(first sense a person, animal, plant, artifact, food, body part, natural object or substance),
verbs without the stative ones (``be``, ``have``, ``seem``) and adjectives without determiners
and numerals.

``slot`` (the earlier hard-negative mode): ``SubcaptionGenerator.counterfactual``, which
replaces ONE adjective, verb or noun by a near miss (an opposite adjective, a co-hyponym).

Both draw only from the ``random.Random`` they are given. When none of the allowed kinds is in
the sub-caption (``kinds=("verb",)`` and no verb), the nouns are replaced instead, which is
always possible since a factual sub-caption has a noun, and the result says so
(``fallback=True``) so the caller can count it.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Literal

from clipguard.data import subcaptions as sc
from clipguard.data.subcaptions import KINDS, SubCaption, SubcaptionGenerator
from clipguard.data.wordnet import WordNet, get_wordnet

Mode = Literal["paper", "slot"]
MODES = ("paper", "slot")
_KIND_POS = {"adj": "a", "verb": "v", "noun": "n"}

# Lexicographer files (WordNet's lexnames): what a noun's / verb's first sense must be.
NOUN_LEXFILES = frozenset({5, 6, 8, 13, 17, 18, 20, 27})  # animal artifact body food object person plant substance
VERB_LEXFILES = frozenset(range(29, 44)) - {42}            # every verb file but verb.stative
NUMERALS = frozenset("""one two three four five six seven eight nine ten eleven twelve twenty
thirty forty fifty hundred thousand million billion first second third fourth fifth sixth
seventh eighth ninth tenth last next""".split())
QUANTIFIERS = frozenset("other such own same certain various former latter whole main sure able".split())
STOP_WORDS = (sc.DETERMINERS | sc.PREPOSITIONS | sc.AUXILIARIES | sc.PRONOUNS | sc.CONJUNCTIONS
              | sc.OTHER_FUNCTION | sc.FRAME_NOUNS | NUMERALS | QUANTIFIERS)
_VOWELS = re.compile(r"[aeiouy]+")


class WordLists:
    """Replacement words per kind (adj, verb, noun), ``size`` each at most, built on first use."""

    def __init__(self, wordnet: WordNet | None = None, size: int = 3000) -> None:
        if size < 1:
            raise ValueError(f"word list size must be >= 1, got {size}")
        self._wn = wordnet
        self.size = size
        self._lists: dict[str, list[str]] = {}

    @property
    def wn(self) -> WordNet:
        if self._wn is None:
            self._wn = get_wordnet()
        return self._wn

    def words(self, kind: str) -> list[str]:
        if kind not in _KIND_POS:
            raise ValueError(f"unknown kind {kind!r}; choose from {KINDS}")
        if kind not in self._lists:
            lexfiles = {"noun": NOUN_LEXFILES, "verb": VERB_LEXFILES}.get(kind)
            self._lists[kind] = self.wn.frequent_words(_KIND_POS[kind], self.size, lexfiles, STOP_WORDS)
        return self._lists[kind]


@dataclass(frozen=True)
class Counterfactual:
    """A counterfactual sub-caption, the kind of word it replaced, and whether that kind was a
    fallback (none of the allowed kinds was present)."""

    sub: SubCaption
    kind: str
    fallback: bool = False

    @property
    def text(self) -> str:
        return self.sub.text


class CounterfactualMaker:
    """Factual sub-captions (via ``SubcaptionGenerator``) and seeded counterfactuals of them.

    ``mode='paper'``: the paper's three operations with word lists; ``mode='slot'``: one slot,
    near-miss words. ``kinds`` limits the operations (paper) or slots (slot) that may be drawn.
    """

    def __init__(self, mode: Mode = "paper", kinds: tuple[str, ...] = KINDS, wordnet: WordNet | None = None,
                 list_size: int = 3000) -> None:
        if mode not in MODES:
            raise ValueError(f"unknown counterfactual mode {mode!r}; choose from {MODES}")
        self.mode = mode
        self.gen = SubcaptionGenerator(wordnet, kinds=tuple(kinds))
        self.kinds = self.gen.kinds
        self.lists = WordLists(wordnet, list_size)

    @property
    def wn(self) -> WordNet:
        return self.gen.wn

    def factual(self, caption: str) -> SubCaption | None:
        return self.gen.factual(caption)

    def make(self, fact: SubCaption, rng: random.Random) -> Counterfactual:
        """A counterfactual of ``fact``; deterministic given ``rng``'s state."""
        present = [k for k in self.kinds if fact.slots(k)]
        if self.mode == "slot" and present:
            counter = self.gen.counterfactual(fact, rng)
            assert counter is not None  # a kind is present, so a slot exists
            changed = [k for (w, k), (w0, _) in zip(counter.parts, fact.parts) if w != w0]
            return Counterfactual(counter, changed[0] if changed else present[0])
        kind = rng.choice(present) if present else "noun"
        if self.mode == "slot":   # fallback: one noun, as a near miss
            parts = list(fact.parts)
            slot = rng.choice(fact.slots("noun"))
            parts[slot] = (self.gen.replacement(parts[slot][0], "noun", rng,
                                                exclude={w for w, _ in fact.parts}), "noun")
            return Counterfactual(SubCaption(tuple(parts)), "noun", fallback=True)
        return Counterfactual(self.replace_all(fact, kind, rng), kind, fallback=not present)

    def replace_all(self, fact: SubCaption, kind: str, rng: random.Random) -> SubCaption:
        """``fact`` with every word of ``kind`` replaced from the word list (the paper's rule)."""
        parts = list(fact.parts)
        used = {w.lower() for w, _ in fact.parts}
        for slot in fact.slots(kind):
            new = self.replacement(parts[slot][0], kind, rng, used)
            used.add(new.lower())
            parts[slot] = (new, kind)
        return SubCaption(tuple(parts))

    def replacement(self, word: str, kind: str, rng: random.Random, exclude: set[str] | None = None) -> str:
        """A random list word of ``kind``: not ``word``, its lemma, a first-sense synonym of it, or
        in ``exclude``; inflected like ``word`` (plural, -s, -ing, past)."""
        pos = _KIND_POS[kind]
        lemma = self.wn.lemma(word, pos) or word
        bad = {w.lower() for w in (exclude or set())} | {word.lower(), lemma.lower()}
        bad |= {s.lower() for s in self.wn.synonyms(lemma, pos)}
        words = self.lists.words(kind)
        new = words[0]
        for _ in range(50):
            new = rng.choice(words)
            if new not in bad:
                break
        return inflect_like(new, word, lemma, kind, self.wn)


def inflect_like(new: str, word: str, lemma: str, kind: str, wn: WordNet) -> str:
    """``new`` (a lemma) in the form ``word`` has relative to ``lemma``: a plural noun, or a verb's
    -s, -ing or past form (irregular forms from WordNet's exception lists). Adjectives and forms
    not recognised stay as the lemma."""
    w, lw = word.lower(), lemma.lower()
    if w == lw or kind == "adj":
        return new
    words = new.split(" ")
    k = 0 if kind == "verb" else len(words) - 1     # "tote bag" -> "tote bags"
    head = words[k]
    if kind == "noun":
        head = _plural(head, wn)
    elif w.endswith("ing"):
        head = _form(head, "ing", wn)
    elif w.endswith("s") and not w.endswith("ss"):
        head = _third_person(head)
    elif w.endswith("ed") or w in wn.irregular_forms(lw, "v"):
        head = _form(head, "ed", wn)
    words[k] = head
    return " ".join(words)


def _plural(noun: str, wn: WordNet) -> str:
    irregular = [f for f in wn.irregular_forms(noun, "n") if f != noun]
    if irregular:
        return irregular[0]
    if noun.endswith(("s", "x", "z", "ch", "sh")):
        return noun + "es"
    if noun.endswith("y") and len(noun) > 1 and noun[-2] not in "aeiou":
        return noun[:-1] + "ies"
    return noun + "s"


def _third_person(verb: str) -> str:
    if verb.endswith(("s", "x", "z", "ch", "sh", "o")):
        return verb + "es"
    if verb.endswith("y") and len(verb) > 1 and verb[-2] not in "aeiou":
        return verb[:-1] + "ies"
    return verb + "s"


def _form(verb: str, suffix: str, wn: WordNet) -> str:
    """-ing or past (``suffix`` 'ing' or 'ed') of a verb lemma."""
    for f in wn.irregular_forms(verb, "v"):
        if (suffix == "ing") == f.endswith("ing") and not (suffix == "ed" and f.endswith("s")):
            return f
    if suffix == "ing":
        if verb.endswith("ie"):
            return verb[:-2] + "ying"
        if verb.endswith("e") and not verb.endswith(("ee", "ye", "oe")):
            return verb[:-1] + "ing"
        return (verb + verb[-1] if _doubles(verb) else verb) + "ing"
    if verb.endswith("e"):
        return verb + "d"
    if verb.endswith("y") and len(verb) > 1 and verb[-2] not in "aeiou":
        return verb[:-1] + "ied"
    return (verb + verb[-1] if _doubles(verb) else verb) + "ed"


def _doubles(verb: str) -> bool:
    """One-syllable consonant-vowel-consonant verbs double their last letter (stop -> stopping)."""
    return (len(verb) >= 3 and len(_VOWELS.findall(verb)) == 1 and verb[-1] not in "aeiouwxy"
            and verb[-2] in "aeiou" and verb[-3] not in "aeiou")
