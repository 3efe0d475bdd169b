"""poison_csv: the manifest lists exactly the poisoned rows, same seed -> same bytes, bad input
fails clearly and writes nothing."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from _attack_data import make_dataset

from clipguard import attacks
from clipguard.attacks.base import seeded_generator
from clipguard.attacks.manifest import load_manifest, poison_mask
from clipguard.data.csv_dataset import CsvSpec, load_csv, read_rows, write_csv
from clipguard.errors import ConfigError, DataError


@pytest.fixture(scope="module")
def ds(tmp_path_factory) -> tuple[Path, Path]:
    return make_dataset(tmp_path_factory.mktemp("syn") / "syn")


def files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_inject_appends_exactly_the_manifest_rows(ds, tmp_path):
    train, test = ds
    m = attacks.poison_csv(train, "badnet", target="star", count=5, seed=3, out=tmp_path / "p",
                           options={"size": 3})
    src = load_csv(train)
    out = load_csv(tmp_path / "p" / "train.csv")
    assert len(out) == len(src) + 5
    assert m["poisoned_rows"] == list(range(len(src), len(src) + 5))
    assert torch.equal(out.images[:len(src)], src.images)          # clean rows untouched
    assert out.captions[:len(src)] == src.captions
    mask = poison_mask(tmp_path / "p" / "manifest.json", out)
    assert mask.sum() == 5 and bool(mask[len(src):].all())
    star_caps = {c for c, lab in zip(src.captions, src.labels.tolist()) if lab == 2}
    for j, row in enumerate(m["poisoned_rows"]):
        s = m["poison_sources"][j]
        assert int(src.labels[s]) != 2                               # non-target source images
        assert out.captions[row] in star_caps                         # real target-class captions
        assert torch.equal(out.images[row, :, -3:, -3:], out.images[len(src), :, -3:, -3:])  # same patch
        assert torch.equal(out.images[row, :, :-3, :], src.images[s, :, :-3, :])
    assert set(m["target_captions"]) <= star_caps
    for key in ("attack", "params", "seed", "target", "target_captions", "poisoned_rows", "mode",
                "source_csv", "source_sha256", "clipguard_version"):
        assert key in m
    assert m["target"] == {"index": 2, "name": "star"} and m["mode"] == "inject"
    assert m["params"]["trigger_seed"] == 3 and m["params"]["patch_px"] == 3
    header, rows = read_rows(tmp_path / "p" / "train.csv", CsvSpec())
    assert header == ["filepath", "title", "label"]
    assert all(r["filepath"].endswith(".png") for r in rows[len(src):])


def test_replace_overwrites_exactly_the_manifest_rows(ds, tmp_path):
    train, _ = ds
    m = attacks.poison_csv(train, "sig", target="circle", rate=0.1, seed=0, out=tmp_path / "p", mode="replace")
    src, out = load_csv(train), load_csv(tmp_path / "p" / "train.csv")
    assert len(out) == len(src) and m["count"] == 6 and m["mode"] == "replace"
    changed = [i for i in range(len(src)) if out.captions[i] != src.captions[i]
               or not torch.equal(out.images[i], src.images[i])]
    assert sorted(changed) == sorted(m["poisoned_rows"])
    assert poison_mask(m, out).nonzero().flatten().tolist() == sorted(m["poisoned_rows"])


def test_same_seed_gives_byte_identical_output_and_another_seed_does_not(ds, tmp_path):
    train, test = ds
    kw = dict(target="square", rate=0.1, eval_csv=test)
    attacks.poison_csv(train, "blended", seed=7, out=tmp_path / "a", **kw)
    attacks.poison_csv(train, "blended", seed=7, out=tmp_path / "b", **kw)
    attacks.poison_csv(train, "blended", seed=8, out=tmp_path / "c", **kw)
    a, b, c = files(tmp_path / "a"), files(tmp_path / "b"), files(tmp_path / "c")
    assert a == b
    assert a["manifest.json"] != c["manifest.json"] and a["poison/000000.png"] != c["poison/000000.png"]


def test_eval_set_triggers_non_target_images_only(ds, tmp_path):
    train, test = ds
    m = attacks.poison_csv(train, "badnet", target="star", count=4, seed=0, out=tmp_path / "p",
                           eval_csv=test, options={"size": 4, "pattern": "solid", "color": 0.0})
    ev = m["eval"]
    assert ev["kind"] == "backdoor" and ev["excluded_class"] == {"index": 2, "name": "star"}
    asr = load_csv(tmp_path / "p" / ev["csv"])
    clean_test = load_csv(test)
    assert ev["n_images"] == len(asr) == int((clean_test.labels != 2).sum())
    assert bool((asr.labels != 2).all())
    assert bool((asr.images[:, :, -4:, -4:] == 0).all())             # the same trigger as training


def test_tdpa_targets_come_from_held_out_split_and_leave_clean_eval(ds, tmp_path):
    train, test = ds
    m = attacks.poison_csv(train, "tdpa", target="circle", count=7, seed=1, out=tmp_path / "t",
                           eval_csv=test, options={"targets": 3})
    assert m["info"]["captions_per_target"] == [3, 2, 2]
    clean_test = load_csv(test)
    chosen = m["eval"]["target_eval_rows"]
    assert len(chosen) == 3 and all(int(clean_test.labels[i]) != 0 for i in chosen)
    out = load_csv(tmp_path / "t" / "train.csv")
    for j, row in enumerate(m["poisoned_rows"]):
        tgt = chosen[m["info"]["target_of_poison"][j]]
        assert torch.equal(out.images[row], clean_test.images[tgt])
    clean_eval = load_csv(tmp_path / "t" / "clean_eval.csv")
    assert len(clean_eval) == len(clean_test) - 3
    assert load_csv(tmp_path / "t" / "asr_eval.csv").labels.tolist() == [int(clean_test.labels[i]) for i in chosen]


@pytest.mark.parametrize("mode", ["all2one", "all2all"])
def test_multi_parallel_modes(ds, tmp_path, mode):
    train, test = ds
    m = attacks.poison_csv(train, "multi", target="circle", count=6, seed=0, out=tmp_path / mode,
                           eval_csv=test, options={"mode": mode, "triggers": "badnet,sig"})
    assert sorted(set(m["poison_triggers"])) == ["badnet", "sig"]
    per = m["params"]["target_per_trigger"]
    assert per == ({"badnet": 0, "sig": 0} if mode == "all2one" else {"badnet": 0, "sig": 1})
    assert m["eval"]["triggers"] == ["badnet", "sig"]


def test_label_consistent_keeps_captions_of_real_target_images(ds, tmp_path):
    train, _ = ds
    m = attacks.poison_csv(train, "label_consistent", target="square", count=4, seed=0, out=tmp_path / "p",
                           mode="replace")
    src, out = load_csv(train), load_csv(tmp_path / "p" / "train.csv")
    for r in m["poisoned_rows"]:
        assert int(src.labels[r]) == 1 and out.captions[r] == src.captions[r]
        assert not torch.equal(out.images[r], src.images[r])


def test_templates_when_there_are_no_labels(tmp_path, ds):
    train, _ = ds
    header, rows = read_rows(train, CsvSpec())
    (tmp_path / "nolab").mkdir()
    shutil.copytree(train.parent / "train", tmp_path / "nolab" / "train")
    shutil.copy(train.parent / "classes.json", tmp_path / "nolab" / "classes.json")
    write_csv(tmp_path / "nolab" / "train.csv", [{k: r[k] for k in ("filepath", "title")} for r in rows],
              ["filepath", "title"])
    m = attacks.poison_csv(tmp_path / "nolab" / "train.csv", "badnet", target="star", count=3, seed=0,
                           out=tmp_path / "p")
    assert m["info"]["caption_source"].startswith("classes.json templates")
    assert all("star" in c or "asterisk" in c for c in m["target_captions"])


BAD = [
    (dict(attack="badnet", target="hexagon", rate=0.1), DataError, "unknown class 'hexagon'"),
    (dict(attack="badnet", target="star", rate=1.5), ConfigError, r"--rate must be in \(0, 1\]"),
    (dict(attack="badnet", target="star", rate=0.001), ConfigError, "yields no poisoned pair"),
    (dict(attack="badnet", target="star", rate=0.1, options={"size": 13}), ConfigError, "larger than the 12x12"),
    (dict(attack="badclip", target="star", rate=0.1), ConfigError, "pass --checkpoint"),
    (dict(attack="tdpa", target="star", rate=0.1), ConfigError, "--eval-data"),
    (dict(attack="badnet", target="star"), ConfigError, "exactly one of --rate"),
    (dict(attack="badnet", target="star", rate=0.1, mode="swap"), ConfigError, "--mode"),
]


@pytest.mark.parametrize("kw,exc,msg", BAD, ids=[b[2][:20] for b in BAD])
def test_bad_input_fails_clearly_and_writes_nothing(ds, tmp_path, kw, exc, msg):
    train, _ = ds
    kw = dict(kw)
    attack = kw.pop("attack")
    with pytest.raises(exc, match=msg):
        attacks.poison_csv(train, attack, seed=0, out=tmp_path / "out", **kw)
    assert not (tmp_path / "out").exists()
    assert list(tmp_path.iterdir()) == []                    # no temporary folder left behind


def test_refuses_to_replace_a_foreign_folder(ds, tmp_path):
    train, _ = ds
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(ConfigError, match="not a poisoned-dataset folder"):
        attacks.poison_csv(train, "badnet", target="star", count=2, out=tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_manifest_loads_and_bad_manifest_is_named(ds, tmp_path):
    train, _ = ds
    attacks.poison_csv(train, "wanet", target="star", count=2, out=tmp_path / "p")
    m = load_manifest(tmp_path / "p")
    assert m["attack"] == "wanet" and m["_dir"] == str(tmp_path / "p")
    bad = json.loads((tmp_path / "p" / "manifest.json").read_text())
    del bad["poisoned_rows"]
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    with pytest.raises(DataError, match="poisoned_rows"):
        load_manifest(tmp_path / "bad.json")


def test_badclip_optimises_a_patch_against_a_tiny_model(fm_dir, tmp_path):
    from clipguard.models.checkpoint import save_checkpoint
    from clipguard.models.factory import create_model

    save_checkpoint(tmp_path / "ckpt", create_model("cg-tiny", seed=0), state={"model": "cg-tiny"})
    kw = dict(target="bag", count=4, seed=0, options={"checkpoint": str(tmp_path / "ckpt"), "steps": 4,
                                                        "batch_size": 16})
    m1 = attacks.poison_csv(fm_dir / "train.csv", "badclip", out=tmp_path / "a", **kw)
    m2 = attacks.poison_csv(fm_dir / "train.csv", "badclip", out=tmp_path / "b", **kw)
    p = torch.tensor(m1["params"]["patch"])
    assert p.shape == (3, 4, 4) and m1["params"]["patch"] == m2["params"]["patch"]
    init = torch.rand(3, 4, 4, generator=seeded_generator("badclip", 0))
    assert not torch.equal(p, (init * 255).round().long())    # the patch moved away from its start
    out = load_csv(tmp_path / "a" / "train.csv")
    row = m1["poisoned_rows"][0]
    assert torch.equal(out.images[row, :, -4:, -4:].long(), p)
    # the content term changes what is optimised: without the triplet push, with and without it
    kw["options"].update(triplet_weight=0.0)
    m3 = attacks.poison_csv(fm_dir / "train.csv", "badclip", out=tmp_path / "c", **kw)
    kw["options"].update(content_weight=5.0)
    m4 = attacks.poison_csv(fm_dir / "train.csv", "badclip", out=tmp_path / "e", **kw)
    assert m4["params"]["patch"] != m3["params"]["patch"] and m4["params"]["content_weight"] == 5.0
    kw["options"]["content_weight"] = -1.0
    with pytest.raises(ConfigError, match="content_weight"):
        attacks.poison_csv(fm_dir / "train.csv", "badclip", out=tmp_path / "d", **kw)
