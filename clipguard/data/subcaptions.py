"""Factual and counterfactual sub-captions for CleanerCLIP, built offline from WordNet.

Why a rule-based parser: the paper uses SceneGraphParser (spaCy models, downloads); we need
only the template ``(adj) subject (verb (prep)) (adj) object`` and which words are adjectives,
verbs and nouns. Parts of speech come from WordNet plus closed-class word lists and a few
positional rules (a verb follows an auxiliary or a noun phrase; the last noun of a noun
phrase is its head). Replacement words come from WordNet: co-hyponyms of the word's first
sense first (``bag`` -> ``basket``), then random entries of the same part of speech.

A sub-caption is a tuple of (word, kind) parts, so "differs in exactly one slot" is checkable.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field

from clipguard.data.wordnet import WordNet, get_wordnet

KINDS = ("adj", "verb", "noun")  # the replaceable slot kinds
_KIND_POS = {"adj": "a", "verb": "v", "noun": "n"}

DETERMINERS = frozenset("""a an the this that these those my your his her its our their some any
another each every no one two three four five several many few much more most all both""".split())
PREPOSITIONS = frozenset("""on in at with for of by from under over near behind beside into onto
inside outside above below across along around against between through to toward towards
without upon beneath among""".split())
AUXILIARIES = frozenset("""is are was were be been being am has have had does do did can could will
would shall should may might must 's 're""".split())
PRONOUNS = frozenset("""i you he she it we they me him them us someone somebody something
everyone everybody nobody anyone anybody people""".split())
CONJUNCTIONS = frozenset("and or but nor so yet while as than if because".split())
OTHER_FUNCTION = frozenset("""not very too just also only here there then now again really quite
which who whom whose what where when why how""".split())
# "a photo of X" describes X: the frame is dropped, as in the paper's "a picture of an apple".
FRAME_NOUNS = frozenset("""photo photograph picture pic image snapshot shot close-up closeup
view drawing painting illustration rendering render sketch still""".split())

# Cardinals: a quantifier before a noun ("two dogs"), the thing itself otherwise ("a bold 7", "the
# digit two", "a 0 written in ink"), where they are the caption's subject and must stay in it.
NUMBER_WORDS = frozenset("""zero one two three four five six seven eight nine ten eleven twelve thirteen
fourteen fifteen sixteen seventeen eighteen nineteen twenty""".split())

_PLAIN = re.compile(r"[a-z][a-z-]*(?: [a-z][a-z-]*)?")  # usable replacements: 1-2 plain words
_TOKEN = re.compile(r"[a-z0-9]+(?:[-'][a-z0-9]+)*")


@dataclass(frozen=True)
class SubCaption:
    """Ordered parts (word, kind), kind in adj/verb/noun/prep/pron."""

    parts: tuple[tuple[str, str], ...]

    @property
    def text(self) -> str:
        return " ".join(w for w, _ in self.parts)

    def slots(self, kind: str) -> list[int]:
        return [i for i, (_, k) in enumerate(self.parts) if k == kind]

    def __str__(self) -> str:
        return self.text


@dataclass
class _Token:
    word: str
    tag: str = ""                     # det/prep/aux/pron/conj/func/verb/adv/content
    cands: set[str] = field(default_factory=set)


@dataclass(frozen=True)
class _Phrase:
    """A noun phrase: its head noun and the adjective kept for the template (or None)."""

    head: str
    adj: str | None
    pronoun: bool = False


class SubcaptionGenerator:
    """Makes the factual sub-caption of a caption and seeded counterfactual variants.

    ``factual(caption)`` is deterministic; ``counterfactual(caption, rng)`` and
    ``pair(caption, rng)`` draw from ``rng`` only (same seed, same output).
    """

    def __init__(self, wordnet: WordNet | None = None, kinds: tuple[str, ...] = KINDS) -> None:
        bad = [k for k in kinds if k not in KINDS]
        if bad or not kinds:
            raise ValueError(f"unknown slot kinds {bad}; choose from {KINDS}")
        self._wn = wordnet
        self.kinds = tuple(kinds)
        self._cache: dict[str, SubCaption | None] = {}

    @property
    def wn(self) -> WordNet:
        if self._wn is None:
            self._wn = get_wordnet()
        return self._wn

    # ---- parsing --------------------------------------------------------------------------
    def _compound(self, words: list[str], i: int) -> bool:
        """Whether words[i] words[i+1] is one WordNet noun; an inflected match ("cat sleeps" ->
        "cat_sleep") only counts at the end of a phrase it cannot be a verb of."""
        forms = self.wn.base_forms(f"{words[i]}_{words[i + 1]}", "n")
        if not forms:
            return False
        if forms[0] == f"{words[i]}_{words[i + 1]}":
            return True
        nxt = words[i + 2] if i + 2 < len(words) else None
        return nxt is not None and nxt not in PREPOSITIONS and nxt not in DETERMINERS

    def _tokens(self, caption: str) -> list[_Token]:
        words = _TOKEN.findall(caption.lower())
        # drop a leading frame: "a (low resolution) photo of", "a close-up of"
        for i, w in enumerate(words[:6]):
            if w in FRAME_NOUNS and i + 1 < len(words) and words[i + 1] == "of":
                words = words[i + 2:]
                break
        # join WordNet noun compounds ("running shoe", "tee shirt") into one token
        joined: list[str] = []
        i = 0
        while i < len(words):
            if i + 1 < len(words) and self._compound(words, i):
                joined.append(f"{words[i]} {words[i + 1]}")
                i += 2
            else:
                joined.append(words[i])
                i += 1
        toks = []
        for w in joined:
            if w in DETERMINERS:
                tag = "det"
            elif w in PREPOSITIONS:
                tag = "prep"
            elif w in AUXILIARIES:
                tag = "aux"
            elif w in PRONOUNS:
                tag = "pron"
            elif w in CONJUNCTIONS:
                tag = "conj"
            elif w in OTHER_FUNCTION or w.isdigit():
                tag = "func"
            else:
                tag = "content"
            toks.append(_Token(w, tag, self.wn.pos_of(w) if tag == "content" else set()))
        toks = self._tag_numbers(toks)
        self._tag_verbs(toks)
        return toks

    @staticmethod
    def _tag_numbers(toks: list[_Token]) -> list[_Token]:
        """A cardinal that does not quantify what follows is a noun ("a slanted 7"); after a noun
        (or a word WordNet does not know) it joins it as one compound ("digit two", "iphone 12"),
        the way WordNet compounds are joined."""
        out: list[_Token] = []
        for i, t in enumerate(toks):
            nxt = toks[i + 1] if i + 1 < len(toks) else None
            if not (t.word.isdigit() or t.word in NUMBER_WORDS) or (
                    nxt is not None and ((nxt.tag == "content" and "n" in nxt.cands) or nxt.word == "of")):
                out.append(t)  # not a number, or a quantifier ("two dogs", "one of the bags"): as before
                continue
            prev = out[-1] if out else None
            if prev is not None and prev.tag == "content" and ("n" in prev.cands or not prev.cands):
                out[-1] = _Token(f"{prev.word} {t.word}", "content", {"n"})
            else:
                out.append(_Token(t.word, "content", {"n"}))
        return out

    def _tag_verbs(self, toks: list[_Token]) -> None:
        """Content words that act as verbs or adverbs, by position and WordNet's usual sense."""
        for i, t in enumerate(toks):
            if t.tag != "content":
                continue
            prev = toks[i - 1] if i > 0 else None
            nxt = toks[i + 1] if i + 1 < len(toks) else None
            if "v" in t.cands:
                after_aux = prev is not None and prev.tag in ("aux", "pron")
                # after "det adj" ("a plain dress", "a small slacks") a noun reading wins
                after_adj = (prev is not None and prev.tag == "content" and "a" in prev.cands
                             and "n" in t.cands and (i < 2 or toks[i - 2].tag in ("det", "prep")))
                after_np = (prev is not None and prev.tag == "content" and "n" in prev.cands
                            and not after_adj)
                opens_np = (nxt is None or nxt.tag in ("det", "prep", "pron")
                            or (nxt.tag == "content" and bool(nxt.cands) and nxt.cands <= {"a", "r"}))
                sentence_start = prev is None and nxt is not None and nxt.tag in ("det", "prep")
                # "a cat sleeps on ...": a third-person -s right after "det noun" is a verb
                third_person = (t.word.endswith("s") and not t.word.endswith("ss") and i >= 2
                                and toks[i - 2].tag == "det")
                verb_like = (t.word.endswith("ing") or third_person
                             or self.wn.primary_pos(t.word) == "v")
                if after_aux or sentence_start or (after_np and opens_np and verb_like):
                    t.tag = "verb"
                    continue
            if t.cands == {"r"} or (t.cands and t.cands <= {"r", "a"} and
                                    (nxt is None or nxt.tag != "content") and
                                    prev is not None and prev.tag == "content"):
                t.tag = "adv"   # "online", "quickly": modifiers, dropped

    def _phrases(self, toks: list[_Token]) -> list[tuple[int, _Phrase | str]]:
        """Sequence of (position, phrase-or-marker): noun phrases, verbs, prepositions."""
        out: list[tuple[int, _Phrase | str]] = []
        i = 0
        while i < len(toks):
            t = toks[i]
            if t.tag == "content":
                j = i
                while j < len(toks) and toks[j].tag == "content":
                    j += 1
                run = toks[i:j]
                head_k = max((k for k, r in enumerate(run) if "n" in r.cands), default=len(run) - 1)
                head = run[head_k]
                adjs = [r.word for r in run[:head_k] if "a" in r.cands]
                out.append((i, _Phrase(head.word, adjs[-1] if adjs else None)))
                i = j
                continue
            if t.tag == "pron":
                if out and isinstance(out[-1][1], _Phrase) and not out[-1][1].pronoun:
                    break   # "the bag I bought ...": a relative clause, not the main relation
                out.append((i, _Phrase(t.word, None, pronoun=True)))
            elif t.tag in ("verb", "prep", "conj"):
                out.append((i, f"{t.tag}:{t.word}"))
            i += 1
        return out

    def factual(self, caption: str) -> SubCaption | None:
        """``(adj) subject (verb (prep) (adj) object)``; None if the caption has no noun."""
        if caption in self._cache:
            return self._cache[caption]
        items = self._phrases(self._tokens(caption))
        nps = [(k, p) for k, (_, p) in enumerate(items) if isinstance(p, _Phrase)]
        result: SubCaption | None = None
        if nps:
            subj = next((p for _, p in nps if not p.pronoun), nps[0][1])
            parts: list[tuple[str, str]] = []
            verb_at = next((k for k, (_, p) in enumerate(items) if isinstance(p, str)
                            and p.startswith("verb:")), None)
            obj = None
            if verb_at is not None:
                before = [p for k, p in nps if k < verb_at]
                after = [p for k, p in nps if k > verb_at]
                if before and after:     # subject - verb - object
                    subj, obj = before[-1], after[0]
                elif after:              # imperative or frame-less: "look at this bag" -> "bag"
                    subj, verb_at = after[0], None
                else:                    # intransitive: keep the noun only
                    verb_at = None
            if subj.pronoun and obj is None:
                subj = next((p for _, p in nps if not p.pronoun), subj)
            parts += self._np_parts(subj)
            if verb_at is not None and obj is not None:
                parts.append((items[verb_at][1].split(":", 1)[1], "verb"))
                nxt = items[verb_at + 1][1] if verb_at + 1 < len(items) else None
                if isinstance(nxt, str) and nxt.startswith("prep:"):
                    parts.append((nxt.split(":", 1)[1], "prep"))
                parts += self._np_parts(obj)
            if any(k == "noun" for _, k in parts):
                result = SubCaption(tuple(parts))
        self._cache[caption] = result
        return result

    @staticmethod
    def _np_parts(p: _Phrase) -> list[tuple[str, str]]:
        if p.pronoun:
            return [(p.head, "pron")]
        return ([(p.adj, "adj")] if p.adj else []) + [(p.head, "noun")]

    # ---- counterfactuals ------------------------------------------------------------------
    def counterfactual(self, caption: str | SubCaption, rng: random.Random) -> SubCaption | None:
        """The factual sub-caption with ONE adjective, verb or noun slot replaced.

        The kind is drawn uniformly among the kinds present, then one slot of that kind.
        """
        fact = caption if isinstance(caption, SubCaption) else self.factual(caption)
        if fact is None:
            return None
        kinds = [k for k in self.kinds if fact.slots(k)]
        if not kinds:
            return None
        kind = rng.choice(kinds)
        slot = rng.choice(fact.slots(kind))
        word = fact.parts[slot][0]
        others = {w.lower() for w, _ in fact.parts}
        new = self.replacement(word, kind, rng, exclude=others)
        parts = list(fact.parts)
        parts[slot] = (new, kind)
        return SubCaption(tuple(parts))

    def replacement(self, word: str, kind: str, rng: random.Random,
                    exclude: set[str] | None = None) -> str:
        """A different word of the same part of speech, inflected like ``word``."""
        pos = _KIND_POS[kind]
        exclude = {w.lower() for w in (exclude or set())} | {word.lower()}
        lemma = self.wn.lemma(word, pos) or word
        exclude.add(lemma.lower())
        synonyms = {s.lower() for s in self.wn.synonyms(lemma, pos)}
        def usable(words: list[str]) -> list[str]:
            return [c for c in words if c.lower() not in exclude and c.lower() not in synonyms
                    and _PLAIN.fullmatch(c)]

        cands = usable(self.wn.opposites(lemma)) if pos == "a" else []
        cands = cands or usable(self.wn.cohyponyms(lemma, pos))
        if cands:
            new = rng.choice(cands)
        else:
            new = lemma
            for _ in range(100):
                new = self.wn.random_word(pos, rng)
                if new.lower() not in exclude and new.lower() not in synonyms:
                    break
        return _inflect_like(new, word, lemma, kind)

    def pair(self, caption: str, rng: random.Random) -> tuple[SubCaption, SubCaption] | None:
        fact = self.factual(caption)
        if fact is None:
            return None
        counter = self.counterfactual(fact, rng)
        return None if counter is None else (fact, counter)


def _inflect_like(new: str, word: str, lemma: str, kind: str) -> str:
    """Give ``new`` the inflection ``word`` has relative to its lemma (plural, -ing, -ed, -s)."""
    if word == lemma:
        return new
    words = new.split(" ")
    k = 0 if kind == "verb" else len(words) - 1   # "try for" -> "trying for"; "tote bag" -> "tote bags"
    w = words[k]
    if kind == "noun" and word.endswith("s"):
        w = w + ("es" if w.endswith(("s", "x", "z", "ch", "sh")) else "s")
    elif kind == "verb" and word.endswith("ing"):
        w = (w[:-1] if w.endswith("e") and not w.endswith("ee") else w) + "ing"
    elif kind == "verb" and word.endswith("ed"):
        w = w + ("d" if w.endswith("e") else "ed")
    elif kind == "verb" and word.endswith("s"):
        w = w + ("es" if w.endswith(("s", "x", "z", "ch", "sh")) else "s")
    words[k] = w
    return " ".join(words)
