"""Shared steps: several attacks chained into one poisoned set, each part's poisons located exactly;
held-aside clean subsets for the probe and for fine-tuning."""

from __future__ import annotations

from pathlib import Path

import torch

from clipguard.bench.cache import BenchCache
from clipguard.bench.config import parse_config


def _cfg(fm_dir, parts):
    return parse_config({
        "seeds": [0],
        "datasets": {"fm": {"train": str(fm_dir / "train.csv"), "test": str(fm_dir / "test.csv"),
                            "probe_size": 100, "finetune_size": 50}},
        "attacks": {"combo": {"parts": parts}},
        "pretrain": {"defenses": {"CLIP": "none"}},
    })


def test_chained_parts_have_exact_disjoint_masks(fm_dir, tmp_path):
    cfg = _cfg(fm_dir, [{"attack": "badnet", "target": "bag", "count": 8},
                        {"attack": "blended", "target": "sandal", "count": 12},
                        {"attack": "tdpa", "target": "trouser", "count": 6, "options": {"targets": 2}}])
    cache = BenchCache(cfg, tmp_path)
    ds, attack = cfg.datasets[0], cfg.attacks[0]
    data, ps = cache.train_data(ds, attack, 0)
    n_clean = len(cache.clean_train(ds))
    assert len(data) == n_clean + 8 + 12 + 6
    assert [int(m.sum()) for m in ps.masks] == [8, 12, 6]
    assert int(ps.mask.sum()) == 26  # disjoint
    assert not bool(ps.mask[:n_clean].any())  # inject mode: the clean rows are untouched
    # every part's own manifest evaluates on its own held-out set
    assert [p.parent.name.rsplit("-", 1)[0] for p in ps.manifests] == ["part0-badnet", "part1-blended", "part2-tdpa"]
    # cached on disk: a second cache (a re-run) poisons nothing and finds the same masks
    stamp = (ps.manifests[0]).stat().st_mtime_ns
    again = BenchCache(cfg, tmp_path).poisoned(ds, attack, 0)
    assert again.manifests[0].stat().st_mtime_ns == stamp
    assert all(torch.equal(a, b) for a, b in zip(again.masks, ps.masks))


def test_probe_and_finetune_subsets_are_clean_disjoint_and_seeded(fm_dir, tmp_path):
    cfg = _cfg(fm_dir, [{"attack": "badnet", "target": "bag", "count": 8}])
    ds = cfg.datasets[0]
    a, b = BenchCache(cfg, tmp_path), BenchCache(cfg, tmp_path)
    probe, ft = a.probe_data(ds), a.finetune_clean(ds)
    assert len(probe) == 100 and len(ft) == 50
    assert not set(probe.rows) & set(ft.rows)
    assert probe.rows == b.probe_data(ds).rows and ft.rows == b.finetune_clean(ds).rows
    clean_paths = set(a.clean_train(ds).paths)
    assert set(ft.paths) <= clean_paths  # fine-tuning data comes from the clean CSV


def test_changed_dose_never_reuses_a_stale_poisoned_set(fm_dir, tmp_path):
    parts = [{"attack": "badnet", "target": "bag", "count": 8}, {"attack": "blended", "target": "sandal", "count": 4}]
    cfg = _cfg(fm_dir, parts)
    first = BenchCache(cfg, tmp_path).poisoned(cfg.datasets[0], cfg.attacks[0], 0)
    parts[0]["count"] = 10
    cfg2 = _cfg(fm_dir, parts)
    second = BenchCache(cfg2, tmp_path).poisoned(cfg2.datasets[0], cfg2.attacks[0], 0)
    assert [int(m.sum()) for m in second.masks] == [10, 4]
    # both parts are redone: the second part poisons the output of the first
    assert all(a.parent != b.parent for a, b in zip(first.manifests, second.manifests))


def test_safe_set_diagnostic_counts_each_attack_part():
    from clipguard.evaluation.detection import poison_diagnostics
    from clipguard.training.strategy import PairSelector

    a = torch.zeros(10, dtype=torch.bool)
    a[[0, 1]] = True
    b = torch.zeros(10, dtype=torch.bool)
    b[[2, 3, 4]] = True

    class Chosen(PairSelector):
        def selected(self):
            s = torch.zeros(10, dtype=torch.bool)
            s[[1, 2, 3, 9]] = True
            return s

    rec = poison_diagnostics(a | b, {"0-tdpa": a, "1-badnet": b})(Chosen(), 0, None)
    assert rec["safe_poison_in"] == {"0-tdpa": "1/2", "1-badnet": "2/3"}
    assert rec["safe_fraction"] == 0.4 and rec["safe_poison_recall"] == 0.6 and rec["safe_poison_rate"] == 0.75
    assert rec["safe_poison_count"] == 3 and rec["poison_total"] == 5
    assert "safe_poison_in" not in poison_diagnostics(a | b)(Chosen(), 0, None)


def test_validation_split_holds_rows_out_of_training_and_poisoning(fm_dir, tmp_path):
    import json

    import pytest

    from clipguard.errors import ConfigError

    grid = {"seeds": [0], "split": "val",
            "datasets": {"fm": {"train": str(fm_dir / "train.csv"), "test": str(fm_dir / "test.csv"),
                                "probe_size": 50, "finetune_size": 50, "val_size": 100}},
            "attacks": {"tdpa": {"attack": "tdpa", "target": "trouser", "count": 4, "options": {"targets": 2}}},
            "pretrain": {"defenses": {"CLIP": "none"}}}
    cfg = parse_config(grid)
    cache = BenchCache(cfg, tmp_path)
    ds = cfg.datasets[0]
    fit, val, _ = cache.split_paths(ds)
    fit_d, val_d = cache.clean_train(ds), cache.test_data(ds)
    assert len(fit_d) == 512 - 100 and len(val_d) == 100
    full = cache.load(fm_dir / "train.csv", ds)
    key = {(val_d.images[i].numpy().tobytes(), val_d.captions[i]) for i in range(len(val_d))}
    assert not any((fit_d.images[i].numpy().tobytes(), fit_d.captions[i]) in key for i in range(len(fit_d)))
    assert len(full) == len(fit_d) + len(val_d)
    # the TDPA targets (the ASR set) come from the validation rows, never from the test split
    _, ps = cache.train_data(ds, cfg.attacks[0], 0)
    manifest = json.loads(ps.manifests[0].read_text())
    assert Path(manifest["eval"]["source_csv"]).resolve() == val.resolve()
    grid["datasets"]["fm"]["val_size"] = 0
    with pytest.raises(ConfigError, match="val_size"):
        parse_config(grid)


def test_validation_split_is_made_again_when_its_training_csv_changes(fm_dir, tmp_path):
    import shutil

    src = tmp_path / "fm"
    shutil.copytree(fm_dir, src)
    grid = {"seeds": [0], "split": "val",
            "datasets": {"fm": {"train": str(src / "train.csv"), "test": str(src / "test.csv"),
                                "probe_size": 0, "finetune_size": 0, "val_size": 50}},
            "attacks": {"clean": "none"}, "pretrain": {"defenses": {"CLIP": "none"}}}
    cfg = parse_config(grid)
    ds = cfg.datasets[0]
    assert len(BenchCache(cfg, tmp_path / "b").clean_train(ds)) == 512 - 50
    lines = (src / "train.csv").read_text().splitlines(keepends=True)
    (src / "train.csv").write_text("".join(lines[:301]))  # header + 300 rows
    assert len(BenchCache(cfg, tmp_path / "b").clean_train(ds)) == 300 - 50


def test_poisoned_sets_made_in_parallel_equal_the_serial_ones(fm_dir, tmp_path):
    """`--jobs` makes the poisoned sets in worker processes; the files must be exactly those one
    process writes, whatever order the workers finish in."""
    from clipguard.bench.runner import _poison_parallel

    cfg = _cfg(fm_dir, [{"attack": "badnet", "target": "bag", "count": 8},
                        {"attack": "tdpa", "target": "trouser", "count": 6, "options": {"targets": 2}}])
    cfg.seeds = [0, 1]
    ds, attack = cfg.datasets[0], cfg.attacks[0]
    serial, parallel = tmp_path / "serial", tmp_path / "parallel"
    for seed in (0, 1):
        BenchCache(cfg, serial).write_poisoned(ds, attack, seed)
    cache = BenchCache(cfg, parallel)
    _poison_parallel(cfg, parallel, cache, [(ds, attack, 0), (ds, attack, 1)], jobs=2)

    def files(root: Path) -> dict[str, bytes]:
        base = root / "poison"
        return {str(p.relative_to(base)): p.read_bytes() for p in sorted(base.rglob("*"))
                if p.is_file() and p.name != "timing.json"}

    got, want = files(parallel), files(serial)
    assert set(got) == set(want) and len(want) > 2 * (512 + 14)  # both seeds, every image of both parts
    # the manifests name their own folder: compare them with the out folder taken out
    for k, v in want.items():
        if k.endswith((".json", ".csv")):
            assert got[k].replace(str(parallel).encode(), b"OUT") == v.replace(str(serial).encode(), b"OUT"), k
        else:
            assert got[k] == v, k
    # the sets load and locate their poisons as if made in this process
    data, ps = cache.train_data(ds, attack, 1)
    assert [int(m.sum()) for m in ps.masks] == [8, 6]


def test_a_list_of_targets_gives_each_seed_its_own_class(fm_dir, tmp_path):
    """``target: [a, b]``: seed s poisons towards item s % 2, and the manifest says which."""
    import json

    cfg = _cfg(fm_dir, [{"attack": "badnet", "target": ["bag", "sandal"], "count": 8}])
    cache = BenchCache(cfg, tmp_path)
    ds, attack = cfg.datasets[0], cfg.attacks[0]
    targets = [json.loads(cache.poisoned(ds, attack, s).manifests[0].read_text())["target"]["name"]
               for s in (0, 1, 2)]
    assert targets == ["bag", "sandal", "bag"]
    # seed 1 of the list poisons exactly as a grid with that one target would
    one = _cfg(fm_dir, [{"attack": "badnet", "target": "sandal", "count": 8}])
    single = BenchCache(one, tmp_path / "one").poisoned(one.datasets[0], one.attacks[0], 1)
    listed = cache.poisoned(ds, attack, 1)
    assert torch.equal(single.masks[0], listed.masks[0])
    assert single.csv.read_bytes() == listed.csv.read_bytes()
