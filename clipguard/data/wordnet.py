"""A small reader of the WordNet 3.0 database files (no nltk, no downloads).

Why our own: text augmentation (EDA) and counterfactual sub-captions need only part-of-speech
look-ups, first-sense synonyms, co-hyponyms and lists of frequent words. The index files give the
part of speech; the ``data.*`` files are read lazily by byte offset, one synset at a time, so unit
tests stay fast; ``cntlist.rev`` (sense-tagged counts) ranks words from common to rare.
First senses only: later senses are noisy (``dog`` -> ``cad``).
"""

from __future__ import annotations

import functools
import os
import random
from dataclasses import dataclass
from pathlib import Path

from clipguard.errors import ConfigError

POS_FILES = {"n": "noun", "v": "verb", "a": "adj", "r": "adv"}
POS_ORDER = ("n", "v", "a", "r")

# Morphological detachment rules of WordNet's morphy (suffix, replacement).
_RULES: dict[str, tuple[tuple[str, str], ...]] = {
    "n": (("s", ""), ("ses", "s"), ("xes", "x"), ("zes", "z"), ("ches", "ch"), ("shes", "sh"),
          ("men", "man"), ("ies", "y")),
    "v": (("s", ""), ("ies", "y"), ("es", "e"), ("es", ""), ("ed", "e"), ("ed", ""),
          ("ing", "e"), ("ing", "")),
    "a": (("er", ""), ("est", ""), ("er", "e"), ("est", "e")),
    "r": (),
}


@dataclass(frozen=True)
class Synset:
    """One synset: its lemmas (spaces, not underscores) and pointers (symbol, offset, pos)."""

    offset: int
    pos: str            # 'n', 'v', 'a', 'r' ('s' satellites are reported as 'a')
    satellite: bool
    lemmas: tuple[str, ...]
    pointers: tuple[tuple[str, int, str], ...]
    lexfile: int = -1   # lexicographer file: 5 noun.animal, 6 noun.artifact, 13 noun.food, ...


def _norm(word: str) -> str:
    return word.strip().lower().replace(" ", "_")


def _lemma_text(lemma: str) -> str:
    # Adjective lemmas may carry a syntactic marker: "big(a)", "galore(ip)".
    if lemma.endswith(")") and "(" in lemma:
        lemma = lemma[: lemma.index("(")]
    return lemma.replace("_", " ")


class WordNet:
    """Lazy reader: each part of speech's index is parsed on first use, synsets on demand."""

    def __init__(self, root: str | Path = "/usr/share/wordnet") -> None:
        self.root = Path(root)
        for name in POS_FILES.values():
            if not (self.root / f"index.{name}").is_file():
                raise ConfigError(f"WordNet index file missing: {self.root / f'index.{name}'} "
                                  "(install the Debian package wordnet-base)")
        self._index: dict[str, dict[str, tuple[int, ...]]] = {}
        self._tagged: dict[str, dict[str, int]] = {}
        self._exc: dict[str, dict[str, tuple[str, ...]]] = {}
        self._words: dict[str, list[str]] = {}
        self._synsets: dict[tuple[str, int], Synset] = {}
        self._counts: dict[str, dict[str, int]] | None = None
        self._rev: dict[tuple[str, str], dict[str, list[str]]] = {}

    # ---- index and morphology ---------------------------------------------------------
    def _idx(self, pos: str) -> dict[str, tuple[int, ...]]:
        if pos not in self._index:
            table: dict[str, tuple[int, ...]] = {}
            tagged: dict[str, int] = {}
            with open(self.root / f"index.{POS_FILES[pos]}", encoding="latin-1") as fh:
                for line in fh:
                    if line.startswith(" "):
                        continue  # licence header
                    parts = line.split()
                    n_synsets = int(parts[2])
                    table[parts[0]] = tuple(int(o) for o in parts[len(parts) - n_synsets:])
                    tagged[parts[0]] = int(parts[len(parts) - n_synsets - 1])
            self._index[pos], self._tagged[pos] = table, tagged
        return self._index[pos]

    def _exceptions(self, pos: str) -> dict[str, tuple[str, ...]]:
        if pos not in self._exc:
            table: dict[str, tuple[str, ...]] = {}
            path = self.root / f"{POS_FILES[pos]}.exc"
            if path.is_file():
                with open(path, encoding="latin-1") as fh:
                    for line in fh:
                        parts = line.split()
                        if len(parts) >= 2:
                            table[parts[0]] = tuple(parts[1:])
            self._exc[pos] = table
        return self._exc[pos]

    def irregular_forms(self, base: str, pos: str) -> list[str]:
        """Inflected forms the exception list gives for ``base`` (``run`` -> ``ran``, ``running``;
        ``man`` -> ``men``), in file order; empty for regular words."""
        key = ("rev", pos)
        if key not in self._rev:
            rev: dict[str, list[str]] = {}
            for form, bases in self._exceptions(pos).items():
                for b in bases:
                    rev.setdefault(b, []).append(form)
            self._rev[key] = rev
        return list(self._rev[key].get(_norm(base), []))

    def base_forms(self, word: str, pos: str) -> list[str]:
        """Lemmas in the index for ``word`` as ``pos`` (the word itself first, like morphy)."""
        w = _norm(word)
        if not w:
            return []
        index = self._idx(pos)
        out: list[str] = []
        if w in index:
            out.append(w)
        for base in self._exceptions(pos).get(w, ()):
            if base in index and base not in out:
                out.append(base)
        for suffix, repl in _RULES[pos]:
            if w.endswith(suffix) and len(w) > len(suffix):
                base = w[: len(w) - len(suffix)] + repl
                if base in index and base not in out:
                    out.append(base)
        return out

    def pos_of(self, word: str) -> set[str]:
        """Parts of speech ('n', 'v', 'a', 'r') the word (or an inflection of it) can take."""
        return {pos for pos in POS_ORDER if self.base_forms(word, pos)}

    def primary_pos(self, word: str) -> str | None:
        """The word's most frequent part of speech (by WordNet's sense-tagged counts), or None.

        Why: ``white`` is mostly an adjective; synonyms of its verb sense (``whiten``) would
        change a caption's meaning.
        """
        best, best_count = None, -1
        for pos in POS_ORDER:
            forms = self.base_forms(word, pos)
            if forms:
                count = self._tagged[pos][forms[0]]
                if count > best_count:
                    best, best_count = pos, count
        return best

    def lemma(self, word: str, pos: str) -> str | None:
        """The base form of ``word`` for ``pos`` (``dresses`` -> ``dress``), or None."""
        forms = self.base_forms(word, pos)
        return forms[0].replace("_", " ") if forms else None

    # ---- synsets --------------------------------------------------------------------------
    def synset(self, pos: str, offset: int) -> Synset:
        key = (pos, offset)
        if key not in self._synsets:
            with open(self.root / f"data.{POS_FILES[pos]}", "rb") as fh:
                fh.seek(offset)
                line = fh.readline().decode("latin-1")
            self._synsets[key] = _parse_synset(line, pos)
        return self._synsets[key]

    def first_synset(self, word: str, pos: str) -> Synset | None:
        for base in self.base_forms(word, pos):
            offsets = self._idx(pos)[base]
            if offsets:
                return self.synset(pos, offsets[0])
        return None

    def synonyms(self, word: str, pos: str | None = None) -> list[str]:
        """First-sense lemmas other than the word itself, for ``pos`` or every pos it has."""
        w = _norm(word).replace("_", " ")
        out: list[str] = []
        for p in ([pos] if pos else POS_ORDER):
            syn = self.first_synset(word, p)
            if syn is None:
                continue
            bases = {b.replace("_", " ") for b in self.base_forms(word, p)}
            for lemma in syn.lemmas:
                if lemma.lower() != w and lemma.lower() not in bases and lemma not in out:
                    out.append(lemma)
        return out

    def cohyponyms(self, word: str, pos: str) -> list[str]:
        """Words that share the first sense's parent: siblings for nouns/verbs (``shirt`` ->
        ``blouse``...); for adjectives the other members of the similar-to cluster and antonyms.

        Used to build counterfactual captions that are plausible but wrong.
        """
        syn = self.first_synset(word, pos)
        if syn is None:
            return []
        bases = {b.replace("_", " ") for b in self.base_forms(word, pos)} | {_norm(word)}
        siblings: list[Synset] = []
        if pos in ("n", "v"):
            for sym, off, p in syn.pointers:
                if sym in ("@", "@i"):
                    parent = self.synset(p, off)
                    siblings += [self.synset(q, o) for s, o, q in parent.pointers
                                 if s in ("~", "~i") and o != syn.offset]
        elif pos == "a":
            heads = [syn] if not syn.satellite else [
                self.synset("a", off) for sym, off, _ in syn.pointers if sym == "&"]
            for head in heads:
                if head.offset != syn.offset:
                    siblings.append(head)
                siblings += [self.synset("a", o) for s, o, _ in head.pointers
                             if s in ("&", "!") and o != syn.offset]
        out: list[str] = []
        for sib in siblings:
            for lemma in sib.lemmas[:1]:   # the synset's head word; the rest are often obscure
                if lemma.lower() not in bases and lemma not in out:
                    out.append(lemma)
        return out

    def opposites(self, word: str) -> list[str]:
        """Adjectives on the other side of the first sense's cluster: the antonym heads and their
        satellites (``stylish`` -> ``styleless``, ``dowdy``...; ``new`` -> ``old``...).

        Why: satellites of the word's own cluster are near-synonyms (``stylish`` -> ``chic``),
        useless as counterfactuals.
        """
        syn = self.first_synset(word, "a")
        if syn is None:
            return []
        heads = [syn] if not syn.satellite else [
            self.synset("a", off) for sym, off, _ in syn.pointers if sym == "&"]
        out: list[str] = []
        for head in heads:
            for sym, off, _ in head.pointers:
                if sym != "!":
                    continue
                anti = self.synset("a", off)
                group = [anti] + [self.synset("a", o) for s, o, _ in anti.pointers if s == "&"]
                for g in group:
                    if g.lemmas and g.lemmas[0] not in out:
                        out.append(g.lemmas[0])
        return out

    def words(self, pos: str) -> list[str]:
        """Single-word, alphabetic lemmas of ``pos`` (sorted, so seeded choices are stable)."""
        if pos not in self._words:
            self._words[pos] = sorted(w for w in self._idx(pos) if w.isalpha())
        return self._words[pos]

    def random_word(self, pos: str, rng: random.Random) -> str:
        """A random single-word lemma of ``pos``; deterministic given ``rng``."""
        if pos not in POS_FILES:
            raise ConfigError(f"unknown part of speech {pos!r}; use one of {list(POS_FILES)}")
        return rng.choice(self.words(pos))


    # ---- frequencies and word lists ----------------------------------------------------------
    def sense_counts(self, pos: str) -> dict[str, int]:
        """How often each lemma of ``pos`` is tagged in WordNet's sense-tagged corpora (SemCor),
        summed over its senses, from ``cntlist.rev``; empty when that file is missing."""
        if self._counts is None:
            counts: dict[str, dict[str, int]] = {p: {} for p in POS_FILES}
            path = self.root / "cntlist.rev"
            if path.is_file():
                with open(path, encoding="latin-1") as fh:
                    for line in fh:
                        parts = line.split()
                        if len(parts) != 3 or "%" not in parts[0]:
                            continue
                        lemma, key = parts[0].split("%", 1)
                        p = _SS_TYPE.get(key[:1])
                        if p is not None:
                            counts[p][lemma] = counts[p].get(lemma, 0) + int(parts[2])
            self._counts = counts
        return self._counts[pos]

    def frequent_words(self, pos: str, n: int, lexfiles: frozenset[int] | None = None,
                       exclude: frozenset[str] = frozenset()) -> list[str]:
        """Up to ``n`` single-word lemmas of ``pos``, most frequent first (common to rare).

        Kept: alphabetic lemmas of three letters or more that the sense-tagged corpora use, and
        use mostly as ``pos`` (``light`` is an adjective more than a noun), that are not an
        inflection of another lemma (``cows``), and whose first sense lies in ``lexfiles`` when
        given (e.g. concrete nouns only). Ties are ranked by the index's tagged-sense count, then
        alphabetically, so the list is stable. Without ``cntlist.rev`` every lemma counts and
        that index count alone ranks them.
        """
        if pos not in POS_FILES:
            raise ConfigError(f"unknown part of speech {pos!r}; use one of {list(POS_FILES)}")
        index = self._idx(pos)
        freq = self.sense_counts(pos)
        others = [self.sense_counts(p) for p in POS_ORDER if p != pos]
        ranked = sorted(index, key=lambda w: (-freq.get(w, 0), -self._tagged[pos][w], w))
        out: list[str] = []
        for w in ranked:
            if len(out) >= n:
                break
            if not w.isalpha() or w in exclude or len(w) < 3 or (freq and not freq.get(w)):
                continue
            if freq and freq.get(w, 0) < max((c.get(w, 0) for c in others), default=0):
                continue
            if len(self.base_forms(w, pos)) > 1:
                continue
            if lexfiles is not None and self.synset(pos, index[w][0]).lexfile not in lexfiles:
                continue
            out.append(w)
        return out


_SS_TYPE = {"1": "n", "2": "v", "3": "a", "4": "r", "5": "a"}  # sense keys' synset types


def _parse_synset(line: str, pos: str) -> Synset:
    """Parse one ``data.*`` line: offset lex_filenum ss_type w_cnt(hex) word lex_id ... p_cnt ..."""
    parts = line.split(" | ")[0].split()
    offset, ss_type = int(parts[0]), parts[2]
    n_words = int(parts[3], 16)
    lemmas = tuple(_lemma_text(parts[4 + 2 * i]) for i in range(n_words))
    k = 4 + 2 * n_words
    n_ptr = int(parts[k])
    pointers = []
    for i in range(n_ptr):
        sym, off, p = parts[k + 1 + 4 * i: k + 4 + 4 * i]
        pointers.append((sym, int(off), "a" if p == "s" else p))
    return Synset(offset, "a" if ss_type == "s" else ss_type, ss_type == "s", lemmas,
                  tuple(pointers), int(parts[1]))


def get_wordnet(root: str | None = None) -> WordNet:
    """The shared, cached reader (indexes load lazily on first use).

    ``root`` defaults to $CLIPGUARD_WORDNET, else /usr/share/wordnet (Debian's wordnet-base).
    """
    return _cached(root or os.environ.get("CLIPGUARD_WORDNET") or "/usr/share/wordnet")


@functools.lru_cache(maxsize=4)
def _cached(root: str) -> WordNet:
    return WordNet(root)
