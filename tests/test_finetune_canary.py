"""benchmarks/finetune_canary.py: the canaries' targets are the ones ``clipguard finetune --select
canary`` draws, and a malformed recipe is refused before anything runs."""

import json

import pytest
from _benchmarks import load_benchmark


def test_targets_are_the_products_seeded_draw(tmp_path):
    from clipguard.training.canary import canary_targets

    mod = load_benchmark("finetune_canary")
    names = ["t-shirt", "trouser", "pullover", "dress", "coat"]
    f = tmp_path / "classes.json"
    f.write_text(json.dumps({"classes": names, "templates": ["a photo of a {}."]}))
    got = mod.canary_targets(f, [9003, 9004])
    assert got == canary_targets(names, [9003, 9004]) and len(set(got)) == 2


def test_a_recipe_without_a_name_is_refused(tmp_path):
    mod = load_benchmark("finetune_canary")
    with pytest.raises(SystemExit, match="expected NAME=ARGS"):
        mod.main([str(tmp_path), "--config", "x.yaml", "--seeds", "4", "--work", str(tmp_path / "w"),
                  "--recipe", "--defense par"])
