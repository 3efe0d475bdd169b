"""Adaptive attacks against similarity-based filtering: tdpa-close (target images from a look-alike
class) and caption-blend (captions naming the image's class and the target class)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from _attack_data import make_dataset
from PIL import Image

from clipguard import attacks
from clipguard.bench.config import parse_config, validate_names
from clipguard.cli import main
from clipguard.data.csv_dataset import load_csv, write_csv
from clipguard.data.fashion_mnist import CLASSES, class_info, make_caption
from clipguard.errors import ConfigError, DataError


def _split(root: Path, split: str, per_class: int, seed: int) -> Path:
    rng, crng = np.random.default_rng(seed), random.Random(seed)
    (root / split).mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(per_class * len(CLASSES)):
        c = i % len(CLASSES)
        img = np.clip(rng.normal(20 + 22 * c, 15, (12, 12, 3)), 0, 255).astype(np.uint8)
        rel = f"{split}/{i:04d}.png"
        Image.fromarray(img, mode="RGB").save(root / rel)
        rows.append({"filepath": rel, "title": make_caption(c, crng), "label": str(c)})
    path = root / f"{split}.csv"
    write_csv(path, rows, ["filepath", "title", "label"])
    return path


@pytest.fixture(scope="module")
def fm(tmp_path_factory) -> tuple[Path, Path]:
    """Fashion-MNIST's class names and caption style on tiny synthetic images (no download)."""
    root = tmp_path_factory.mktemp("fmsyn") / "fm"
    root.mkdir()
    train, test = _split(root, "train", 4, 0), _split(root, "test", 3, 1)
    class_info().save(root / "classes.json")
    return train, test


def idx(name: str) -> int:
    return CLASSES.index(name)


def files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------------------------- tdpa-close
@pytest.mark.parametrize("target,close", [("coat", "pullover"), ("pullover", "coat"), ("t-shirt", "shirt"),
                                          ("shirt", "t-shirt"), ("sneaker", "sandal"),
                                          ("ankle boot", "sneaker")])
def test_tdpa_close_default_table_takes_targets_only_from_the_close_class(fm, tmp_path, target, close):
    train, test = fm
    m = attacks.poison_csv(train, "tdpa-close", target=target, count=4, seed=0, out=tmp_path / "p",
                           eval_csv=test, options={"targets": 2})
    ev = load_csv(test)
    rows = m["eval"]["target_eval_rows"]
    assert len(rows) == 2 and all(int(ev.labels[r]) == idx(close) for r in rows)
    assert m["kind"] == "tdpa" and m["eval"]["kind"] == "tdpa"
    assert m["params"]["close_class"] == {"index": idx(close), "name": close}
    assert m["params"]["close_class_from"] == "default Fashion-MNIST look-alike table"
    assert m["info"]["close_class"]["name"] == close
    out = load_csv(tmp_path / "p" / "train.csv")
    for j, row in enumerate(m["poisoned_rows"]):
        assert torch.equal(out.images[row], ev.images[rows[m["info"]["target_of_poison"][j]]])
        assert int(out.labels[row]) == idx(close)            # the true class of the poisoned image
    asr = load_csv(tmp_path / "p" / "asr_eval.csv")
    assert asr.labels.tolist() == [idx(close)] * 2


def test_tdpa_close_explicit_source_class_and_same_targets_as_tdpa(fm, tmp_path):
    train, test = fm
    kw = dict(target="coat", count=3, seed=4, eval_csv=test)
    m = attacks.poison_csv(train, "tdpa-close", out=tmp_path / "c", options={"targets": 3, "source_class": "shirt"}, **kw)
    t = attacks.poison_csv(train, "tdpa", out=tmp_path / "t", options={"targets": 3, "source_class": "shirt"}, **kw)
    ev = load_csv(test)
    assert all(int(ev.labels[r]) == idx("shirt") for r in m["eval"]["target_eval_rows"])
    assert m["eval"]["target_eval_rows"] == t["eval"]["target_eval_rows"]
    assert m["params"]["close_class_from"] == "source_class option"


def test_tdpa_close_from_a_similarity_source(fm, tmp_path):
    train, test = fm
    n = len(CLASSES)
    matrix = [[1.0 if i == j else 0.0 for j in range(n)] for i in range(n)]
    matrix[idx("bag")][idx("dress")] = 0.7
    matrix[idx("bag")][idx("sandal")] = 0.5
    sim = tmp_path / "sim.json"
    sim.write_text(json.dumps({"matrix": matrix}))
    m = attacks.poison_csv(train, "tdpa-close", target="bag", count=2, seed=0, out=tmp_path / "a",
                           eval_csv=test, options={"targets": 2, "similarity": str(sim)})
    assert m["params"]["close_class"]["name"] == "dress" and m["params"]["close_class_from"] == "similarity"
    m = attacks.poison_csv(train, "tdpa-close", target="bag", count=2, seed=0, out=tmp_path / "b",
                           eval_csv=test, options={"targets": 2,
                                                   "similarity": {"lookalikes": {"bag": ["trouser"]}}})
    ev = load_csv(test)
    assert all(int(ev.labels[r]) == idx("trouser") for r in m["eval"]["target_eval_rows"])


def test_tdpa_close_is_reproducible(fm, tmp_path):
    train, test = fm
    kw = dict(target="sandal", count=5, seed=3, eval_csv=test, options={"targets": 2})
    attacks.poison_csv(train, "tdpa-close", out=tmp_path / "a", **kw)
    attacks.poison_csv(train, "tdpa-close", out=tmp_path / "b", **kw)
    assert files(tmp_path / "a") == files(tmp_path / "b")


@pytest.mark.parametrize("attack", ["tdpa", "tdpa-close"])
def test_jitter_makes_every_copy_of_a_target_differ_within_its_bound(fm, tmp_path, attack):
    train, test = fm
    kw = dict(target="coat", count=6, seed=2, eval_csv=test)
    m = attacks.poison_csv(train, attack, out=tmp_path / "j", options={"targets": 2, "jitter": 8}, **kw)
    ev, out = load_csv(test), load_csv(tmp_path / "j" / "train.csv")
    copies = out.images[m["poisoned_rows"]].to(torch.int16)
    for j in range(len(m["poisoned_rows"])):
        clean = ev.images[m["eval"]["target_eval_rows"][m["info"]["target_of_poison"][j]]].to(torch.int16)
        assert int((copies[j] - clean).abs().max()) <= 8
    assert len({c.numpy().tobytes() for c in copies}) == 6  # no two copies identical
    assert m["params"]["jitter"] == 8
    attacks.poison_csv(train, attack, out=tmp_path / "k", options={"targets": 2, "jitter": 8}, **kw)
    assert files(tmp_path / "j") == files(tmp_path / "k")  # seeded


@pytest.mark.parametrize("target,opts,exc,msg", [
    ("coat", {"jitter": 300}, ConfigError, "jitter must be a whole number"),
    ("coat", {"jitter": 1.5}, ConfigError, "jitter must be a whole number"),
    ("bag", {}, ConfigError, "no look-alike class known for the adversarial class 'bag'"),
    ("trouser", {}, ConfigError, "give --opt source_class"),
    ("coat", {"source_class": "coat"}, ConfigError, "must differ"),
    ("coat", {"source_class": "hat"}, ConfigError, "unknown class 'hat'"),
    ("coat", {"targets": 4}, ConfigError, "only 3 held-out images of the close class 'pullover'"),
    ("coat", {"targets": "two"}, ConfigError, "whole number"),
    ("coat", {"similarity": {"matrix": [[1.0]]}}, ConfigError, "10 x 10"),
    ("coat", {"similarity": {"other": 1}}, ConfigError, "'matrix' or a 'lookalikes'"),
    ("coat", {"similarity": "/no/such/file.json"}, ConfigError, "not found"),
    ("coat", {"similarity": {"lookalikes": {}}, "source_class": "shirt"}, ConfigError, "not both"),
])
def test_tdpa_close_bad_pairings_fail_clearly_and_write_nothing(fm, tmp_path, target, opts, exc, msg):
    train, test = fm
    with pytest.raises(exc, match=msg):
        attacks.poison_csv(train, "tdpa-close", target=target, count=4, seed=0, out=tmp_path / "o",
                           eval_csv=test, options=opts)
    assert not (tmp_path / "o").exists()


def test_tdpa_close_needs_the_held_out_split(fm, tmp_path):
    train, _ = fm
    with pytest.raises(ConfigError, match="--eval-data"):
        attacks.poison_csv(train, "tdpa-close", target="coat", count=4, out=tmp_path / "o")


# ---------------------------------------------------------------------------------- caption-blend
def test_caption_blend_backdoor_is_badnet_with_blended_captions(fm, tmp_path):
    train, test = fm
    kw = dict(target="coat", count=6, seed=2, eval_csv=test)
    cb = attacks.poison_csv(train, "caption-blend", out=tmp_path / "cb",
                            options={"trigger_options": {"size": 3}}, **kw)
    bn = attacks.poison_csv(train, "badnet", out=tmp_path / "bn", options={"size": 3}, **kw)
    assert cb["kind"] == "backdoor" and cb["params"]["trigger"] == "badnet"
    assert cb["params"]["trigger_params"]["patch_px"] == 3
    assert cb["poison_sources"] == bn["poison_sources"]                  # the same rows ...
    a, b = load_csv(tmp_path / "cb" / "train.csv"), load_csv(tmp_path / "bn" / "train.csv")
    rows = cb["poisoned_rows"]
    assert torch.equal(a.images[rows], b.images[rows])                   # ... the same trigger
    assert torch.equal(load_csv(tmp_path / "cb" / "asr_eval.csv").images,
                       load_csv(tmp_path / "bn" / "asr_eval.csv").images)
    src = load_csv(train)
    for r, s in zip(rows, cb["poison_sources"]):
        cap = a.captions[r]
        assert "coat" in cap and CLASSES[int(src.labels[s])] in cap        # both class words
        assert cap != b.captions[r]
    assert set(cb["target_captions"]) == {a.captions[r] for r in rows}
    assert cb["info"]["templates"] == cb["params"]["templates"]


def test_caption_blend_targeted_without_trigger(fm, tmp_path):
    train, test = fm
    kw = dict(target="coat", count=4, seed=1, eval_csv=test)
    cb = attacks.poison_csv(train, "caption-blend", out=tmp_path / "cb",
                            options={"trigger": "none", "targets": 2, "source_class": "pullover"}, **kw)
    td = attacks.poison_csv(train, "tdpa", out=tmp_path / "td", options={"targets": 2, "source_class": "pullover"},
                            **kw)
    assert cb["kind"] == "tdpa" and cb["eval"]["kind"] == "tdpa" and cb["params"]["targets"] == 2
    assert attacks.build("caption-blend", {"trigger": "none"}).options()["targets"] == 4
    assert cb["eval"]["target_eval_rows"] == td["eval"]["target_eval_rows"]
    out = load_csv(tmp_path / "cb" / "train.csv")
    for r in cb["poisoned_rows"]:
        assert "pullover" in out.captions[r] and "coat" in out.captions[r]
    assert (tmp_path / "cb" / "clean_eval.csv").is_file()


def test_caption_blend_blended_trigger_templates_and_synonyms(fm, tmp_path):
    train, _ = fm
    m = attacks.poison_csv(train, "caption-blend", target="ankle boot", count=5, seed=0, out=tmp_path / "p",
                           options={"trigger": "blended", "templates": ["{caption}, like a {target}"],
                                    "synonyms": True})
    out, src = load_csv(tmp_path / "p" / "train.csv"), load_csv(train)
    syn = set(class_info().synonyms["ankle boot"])
    for r, s in zip(m["poisoned_rows"], m["poison_sources"]):
        own = src.captions[s].rstrip(".!?")
        assert out.captions[r].startswith(own + ", like ")
        assert any(out.captions[r].endswith(f" {w}") for w in syn)
        assert " a ankle" not in out.captions[r] and " a a" not in out.captions[r]   # "an" before vowels
    blended = attacks.build("blended", {})
    assert m["params"]["trigger_params"]["alpha"] == blended.alpha


def test_caption_blend_is_reproducible(fm, tmp_path):
    train, test = fm
    kw = dict(target="sneaker", count=5, seed=9, eval_csv=test, options={"synonyms": True})
    attacks.poison_csv(train, "caption-blend", out=tmp_path / "a", **kw)
    attacks.poison_csv(train, "caption-blend", out=tmp_path / "b", **kw)
    attacks.poison_csv(train, "caption-blend", out=tmp_path / "c", **dict(kw, seed=10))
    a, b, c = files(tmp_path / "a"), files(tmp_path / "b"), files(tmp_path / "c")
    assert a == b and a["manifest.json"] != c["manifest.json"]


@pytest.mark.parametrize("opts,msg", [
    ({"trigger": "multi"}, "trigger must be one of"),
    ({"templates": ["a {true} only"]}, "must name {target}"),
    ({"templates": ["a {target} only"]}, "must name {target} and the image's"),
    ({"templates": ["a {true} {colour} {target}"]}, "only {true}"),
    ({"templates": []}, "non-empty list"),
    ({"targets": 2}, "only to trigger=none"),
    ({"trigger": "none", "trigger_options": {"size": 3}}, "need a trigger"),
    ({"trigger_options": {"sizee": 3}}, "trigger_options: attack 'badnet' has no option"),
    ({"trigger_options": "size=3"}, "must be a mapping"),
    ({"trigger": "none", "targets": 0}, "whole number >= 1"),
    ({"synonyms": "maybe"}, "true or false"),
])
def test_caption_blend_bad_options(opts, msg):
    with pytest.raises(ConfigError, match=msg.replace("{", r"\{").replace("}", r"\}")):
        attacks.build("caption-blend", opts)


def test_caption_blend_needs_class_names(tmp_path):
    train, _ = make_dataset(tmp_path / "syn")
    (train.parent / "classes.json").unlink()
    with pytest.raises((ConfigError, DataError), match="classes"):
        attacks.poison_csv(train, "caption-blend", target=1, count=2, out=tmp_path / "o")
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------------------------- CLI and bench
def test_cli_runs_the_new_attacks(fm, tmp_path, capsys):
    train, test = fm
    base = ["poison", "--data", str(train), "--eval-data", str(test), "--count", "4", "--seed", "1"]
    assert main(base + ["--attack", "caption-blend", "--target", "coat", "--out", str(tmp_path / "cb"),
                        "--opt", "trigger_options={size: 2, pattern: checker}"]) == 0
    m = json.loads((tmp_path / "cb" / "manifest.json").read_text())
    assert m["params"]["trigger_params"]["pattern"] == "checker"
    assert main(base + ["--attack", "tdpa-close", "--target", "coat", "--out", str(tmp_path / "tc"),
                        "--opt", "targets=2"]) == 0
    assert main(base + ["--attack", "triangles", "--target", "bag", "--out", str(tmp_path / "tr"),
                        "--opt", "mode=patch", "--opt", "levels=[0.2, 0.6]"]) == 0
    assert "4 poisoned by triangles" in capsys.readouterr().out
    assert main(base + ["--attack", "tdpa-close", "--target", "bag", "--out", str(tmp_path / "x")]) == 2
    assert "no look-alike class known" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
    assert main(["poison", "--list"]) == 0
    listing = capsys.readouterr().out
    for name in ("stripes", "text-trigger", "triangles", "tdpa-close", "caption-blend"):
        assert f"{name} (" in listing


def test_bench_configs_accept_the_new_attacks():
    grid = {
        "name": "t", "seeds": [0],
        "datasets": {"fm": {"builtin": "fashion-mnist", "train_size": 200, "test_size": 100}},
        "attacks": {
            "stripes": {"attack": "stripes", "target": "bag", "rate": 0.05, "options": {"mode": "patch"}},
            "text": {"attack": "text-trigger", "target": "bag", "rate": 0.05, "options": {"text": "hi"}},
            "tri": {"attack": "triangles", "target": "bag", "rate": 0.05, "options": {"alpha": 0.1}},
            "close": {"attack": "tdpa-close", "target": "coat", "count": 8, "options": {"targets": 2}},
            "blend": {"attack": "caption-blend", "target": "bag", "rate": 0.05,
                      "options": {"trigger": "blended", "trigger_options": {"alpha": 0.1}}},
        },
        "pretrain": {"train": {"epochs": 1}, "defenses": {"CLIP": "none"}},
    }
    validate_names(parse_config(grid))
    grid["attacks"]["blend"]["options"]["trigger_options"] = {"alpha": 3}
    with pytest.raises(ConfigError, match="attacks.blend.*alpha"):
        validate_names(parse_config(grid))
