"""WordNet reader: parts of speech, morphology, first-sense synonyms, co-hyponyms."""

import random
from pathlib import Path

import pytest

from clipguard.data.wordnet import WordNet, get_wordnet
from clipguard.errors import ConfigError

pytestmark = pytest.mark.skipif(not Path("/usr/share/wordnet/index.noun").is_file(),
                                reason="WordNet (wordnet-base) not installed")


@pytest.fixture(scope="module")
def wn() -> WordNet:
    return get_wordnet()


def test_cached(wn):
    assert get_wordnet() is wn


def test_pos_of_with_morphology(wn):
    assert "n" in wn.pos_of("dog")
    assert "n" in wn.pos_of("dresses")          # detachment rule: dresses -> dress
    assert wn.lemma("dresses", "n") == "dress"
    assert "v" in wn.pos_of("ran")              # exception list: ran -> run
    assert wn.lemma("ran", "v") == "run"
    assert "a" in wn.pos_of("red")
    assert wn.pos_of("qzxv") == set()
    assert wn.pos_of("") == set()


def test_first_sense_synonyms(wn):
    syn = wn.synonyms("dog", "n")
    assert "domestic dog" in syn
    assert "cad" not in syn                      # a later, noisy sense
    assert "dog" not in syn
    assert "photograph" in wn.synonyms("photo")


def test_cohyponyms(wn):
    shoes = wn.cohyponyms("sneaker", "n")
    assert shoes and "sneaker" not in shoes
    assert "gym shoe" not in shoes               # a synonym, not a sibling
    colours = wn.cohyponyms("red", "a")
    assert colours and "red" not in colours
    assert wn.cohyponyms("qzxv", "n") == []


def test_random_word_is_seeded(wn):
    a = [wn.random_word("n", random.Random(3)) for _ in range(3)]
    b = [wn.random_word("n", random.Random(3)) for _ in range(3)]
    assert a == b
    w = wn.random_word("v", random.Random(1))
    assert w.isalpha() and "v" in wn.pos_of(w)
    with pytest.raises(ConfigError):
        wn.random_word("x", random.Random(0))


def test_missing_root_is_clear(tmp_path):
    with pytest.raises(ConfigError, match="index.noun"):
        WordNet(tmp_path)


def test_sense_counts_and_lexfiles(wn):
    counts = wn.sense_counts("n")
    assert counts["man"] > counts["horse"] == 104 and counts.get("zebra", 0) == 0   # horse: 103 + 1
    assert wn.first_synset("horse", "n").lexfile == 5          # noun.animal
    assert wn.first_synset("shirt", "n").lexfile == 6          # noun.artifact


def test_irregular_forms(wn):
    assert wn.irregular_forms("man", "n")[0] == "men"
    assert {"ran", "running"} <= set(wn.irregular_forms("run", "v"))
    assert wn.irregular_forms("dog", "n") == []


def test_frequent_words_are_ranked_filtered_and_stable(wn):
    nouns = wn.frequent_words("n", 500, lexfiles=frozenset({5, 6}))
    assert len(nouns) == 500 and len(set(nouns)) == 500
    assert all(w.isalpha() and len(w) >= 3 for w in nouns)
    assert all(wn.first_synset(w, "n").lexfile in (5, 6) for w in nouns[:50])
    counts = wn.sense_counts("n")
    assert [counts[w] for w in nouns] == sorted((counts[w] for w in nouns), reverse=True)   # common -> rare
    assert "cows" not in wn.frequent_words("n", 5000)                 # an inflection of "cow"
    adjs = wn.frequent_words("a", 300, exclude=frozenset({"new"}))
    assert "new" not in adjs and "old" in adjs
    assert "light" not in wn.frequent_words("v", 3000)               # used mostly as another pos
    assert wn.frequent_words("n", 50) == WordNet().frequent_words("n", 50)


def test_frequent_words_without_cntlist(tmp_path):
    for f in Path("/usr/share/wordnet").iterdir():
        if f.is_file() and f.name != "cntlist.rev":
            (tmp_path / f.name).symlink_to(f)
    bare = WordNet(tmp_path)
    assert bare.sense_counts("v") == {}
    verbs = bare.frequent_words("v", 100)
    assert len(verbs) == 100 and all(w.isalpha() for w in verbs)
