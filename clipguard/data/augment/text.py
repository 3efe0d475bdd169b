"""EDA caption augmentation (Wei & Zou, 2019), drawn fresh on every call.

Why: CleanCLIP's in-modal text loss and RoCLIP need a new textual view of each caption every
step (a known reference bug computed EDA once and reused it). All randomness comes from the
``random.Random`` the caller passes (the trainer seeds it per step), so views are reproducible.
"""

from __future__ import annotations

import random
import re

from clipguard.data.wordnet import WordNet, get_wordnet

# Function words are never replaced or used as insertion sources (as in the EDA paper).
STOPWORDS = frozenset("""
a about above after again against all am an and any are as at be because been before being below
between both but by can could did do does doing down during each few for from further had has have
having he her here hers herself him himself his how i if in into is it its itself just me more most
my myself no nor not now of off on once only or other our ours ourselves out over own same she
should so some such than that the their theirs them themselves then there these they this those
through to too under until up very was we were what when where which while who whom why will with
would you your yours yourself yourselves
""".split())

_WORD = re.compile(r"[A-Za-z][A-Za-z'-]*")

_CACHE_WORDS = 500_000  # distinct words remembered by one EDA before its synonym cache starts over

OPERATIONS = ("synonym", "insert", "swap", "delete")


class EDA:
    """One random EDA operation per call: synonym replacement, random insertion, random swap
    (each ``n = max(1, alpha * words)`` times) or random deletion (each word with ``p_delete``).

    The result is never empty: if an operation would empty the caption, a random word of the
    original is kept.
    """

    def __init__(self, alpha: float = 0.1, p_delete: float = 0.1,
                 wordnet: WordNet | None = None,
                 operations: tuple[str, ...] = OPERATIONS) -> None:
        bad = [op for op in operations if op not in OPERATIONS]
        if bad or not operations:
            raise ValueError(f"unknown EDA operations {bad}; choose from {OPERATIONS}")
        self.alpha, self.p_delete = alpha, p_delete
        self.operations = tuple(operations)
        self._wordnet = wordnet
        # word -> its synonyms: a pure function of the word, asked for every word of every caption
        # on every step, and WordNet's morphology is the slow part of EDA (a caption vocabulary is small)
        self._synonym_cache: dict[str, tuple[str, ...]] = {}

    @property
    def wordnet(self) -> WordNet:
        if self._wordnet is None:
            self._wordnet = get_wordnet()
        return self._wordnet

    def _synonyms(self, word: str) -> tuple[str, ...]:
        hit = self._synonym_cache.get(word)
        if hit is None:
            if len(self._synonym_cache) >= _CACHE_WORDS:
                self._synonym_cache.clear()
            hit = self._synonym_cache[word] = tuple(self._lookup_synonyms(word))
        return hit

    def _lookup_synonyms(self, word: str) -> list[str]:
        m = _WORD.fullmatch(word.strip(".,;:!?\"()"))
        if not m or m.group(0).lower() in STOPWORDS:
            return []
        pos = self.wordnet.primary_pos(m.group(0))
        if pos is None:
            return []
        # Capitalised lemmas of a lower-case word are proper-noun senses ("White person").
        keep_case = not m.group(0)[0].isupper()
        return [s for s in self.wordnet.synonyms(m.group(0), pos)
                if s.lower() != word.lower() and not (keep_case and s[0].isupper())]

    def augment(self, caption: str, rng: random.Random) -> str:
        """A new view of ``caption``; deterministic given the state of ``rng``."""
        words = caption.split()
        if not words:
            return caption
        n = max(1, int(self.alpha * len(words)))
        op = rng.choice(self.operations)
        if op == "synonym":
            out = self._synonym_replacement(words, n, rng)
        elif op == "insert":
            out = self._random_insertion(words, n, rng)
        elif op == "swap":
            out = self._random_swap(words, n, rng)
        else:
            out = self._random_deletion(words, rng)
        return " ".join(out) if out else rng.choice(words)

    def augment_batch(self, captions: list[str], rng: random.Random) -> list[str]:
        return [self.augment(c, rng) for c in captions]

    def _synonym_replacement(self, words: list[str], n: int, rng: random.Random) -> list[str]:
        out = list(words)
        candidates = [i for i, w in enumerate(words) if w.lower() not in STOPWORDS]
        rng.shuffle(candidates)
        replaced = 0
        for i in candidates:
            syns = self._synonyms(words[i])
            if syns:
                out[i] = rng.choice(syns)
                replaced += 1
                if replaced >= n:
                    break
        return out

    def _random_insertion(self, words: list[str], n: int, rng: random.Random) -> list[str]:
        """Insert a synonym of a random word (one that has synonyms) at a random position."""
        out = list(words)
        sources = [s for s in (self._synonyms(w) for w in words) if s]
        for _ in range(n if sources else 0):
            out.insert(rng.randint(0, len(out)), rng.choice(rng.choice(sources)))
        return out

    @staticmethod
    def _random_swap(words: list[str], n: int, rng: random.Random) -> list[str]:
        out = list(words)
        if len(out) < 2:
            return out
        for _ in range(n):
            i, j = rng.sample(range(len(out)), 2)
            out[i], out[j] = out[j], out[i]
        return out

    def _random_deletion(self, words: list[str], rng: random.Random) -> list[str]:
        if len(words) == 1:
            return list(words)
        return [w for w in words if rng.random() > self.p_delete]
