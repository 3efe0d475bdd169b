"""benchmarks/finetune_canary.py: the canaries' targets are the defender's seeded draw (whatever
the classes file's form), and a malformed recipe is refused before anything runs."""

import json
import random

import pytest
from _benchmarks import load_benchmark


def test_targets_are_a_seeded_draw_from_the_classes(tmp_path):
    mod = load_benchmark("finetune_canary")
    names = ["t-shirt", "trouser", "pullover", "dress", "coat"]
    for form in (names, {"classes": names, "templates": ["a photo of a {}."]}):
        f = tmp_path / "classes.json"
        f.write_text(json.dumps(form))
        assert mod.canary_targets(f, [9003, 9004]) == [random.Random(9003).choice(names),
                                                       random.Random(9004).choice(names)]


def test_a_recipe_without_a_name_is_refused(tmp_path):
    mod = load_benchmark("finetune_canary")
    with pytest.raises(SystemExit, match="expected NAME=ARGS"):
        mod.main([str(tmp_path), "--config", "x.yaml", "--seeds", "4", "--work", str(tmp_path / "w"),
                  "--recipe", "--defense par"])
