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
