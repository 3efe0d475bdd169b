"""Grid config parsing, validation and cell planning (no training)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from clipguard.bench.config import load_config, parse_config, validate_names
from clipguard.bench.plan import base_cell, plan_cells
from clipguard.errors import ConfigError

GRID = {
    "name": "t",
    "seeds": [0, 1],
    "datasets": {"fm": {"builtin": "fashion-mnist", "train_size": 200, "test_size": 100}},
    "attacks": {"clean": "none", "badnet": {"attack": "badnet", "target": "bag", "rate": 0.05}},
    "pretrain": {"train": {"epochs": 1}, "defenses": {"CLIP": "none"}},
    "finetune": {"train": {"epochs": 1, "lr": 1e-5}, "defenses": {"FT": "ft"}},
}


def _write(tmp_path: Path, obj) -> Path:
    p = tmp_path / "grid.yaml"
    p.write_text(yaml.safe_dump(obj))
    return p


def test_parse_and_plan_orders_base_before_finetune():
    cfg = parse_config(GRID)
    cells = plan_cells(cfg)
    # dataset x attacks x seeds x pretrain, plus fine-tuning of the poisoned attack only (a clean
    # model has no backdoor to remove)
    assert len(cells) == 1 * 2 * 2 + 1 * 1 * 2
    assert not any(c.stage == "finetune" and c.attack.clean for c in cells)
    assert len({c.id for c in cells}) == len(cells)
    for i, c in enumerate(cells):
        if c.stage == "finetune":
            base = base_cell(cfg, c)
            assert c.method == "CLIP+FT"
            assert any(b.id == base.id for b in cells[:i]), "base pre-training cell must come first"
    assert cfg.attacks[0].clean and not cfg.attacks[1].clean
    assert cfg.finetune.base == "CLIP"


def test_an_attack_can_restrict_the_pretrain_defences_run_on_it():
    import copy

    g = copy.deepcopy(GRID)
    g["pretrain"]["defenses"]["Other"] = "none"
    g["attacks"]["clean"] = {"attack": "none", "defenses": ["CLIP"]}
    cells = plan_cells(parse_config(g))
    on_clean = sorted({c.method for c in cells if c.attack.clean})
    on_badnet = sorted({c.method for c in cells if c.attack.label == "badnet"})
    assert on_clean == ["CLIP"] and on_badnet == ["CLIP", "CLIP+FT", "Other"]


def test_an_attack_can_restrict_the_seeds_it_runs_with():
    import copy

    g = copy.deepcopy(GRID)
    g["seeds"] = [0, 1]
    g["attacks"]["clean"] = {"attack": "none", "defenses": ["CLIP"], "seeds": [1]}
    cells = plan_cells(parse_config(g))
    assert sorted(c.seed for c in cells if c.attack.clean) == [1]
    assert sorted({c.seed for c in cells if c.attack.label == "badnet"}) == [0, 1]


@pytest.mark.parametrize("mutate, message", [
    (lambda g: g.update(epochs=3), "unknown key"),
    (lambda g: g["attacks"]["badnet"].pop("target"), "needs 'target'"),
    (lambda g: g["attacks"]["badnet"].update(count=4), "exactly one of 'rate' or 'count'"),
    (lambda g: g["pretrain"]["train"].update(epoch=3), "pretrain.train"),
    (lambda g: g["finetune"].update(base="SafeCLIP"), "finetune.base"),
    (lambda g: g.update(seeds=[0, 0]), "duplicates"),
    (lambda g: g["datasets"]["fm"].update(builtin="cifar"), "unknown dataset"),
    (lambda g: g["datasets"].update(x={"train": "a.csv"}), "needs 'test'"),
    (lambda g: g["attacks"].update(clean={"attack": "none", "defenses": ["SafeCLIP"]}), "not pretrain defence labels"),
    (lambda g: g["attacks"].update(clean={"attack": "none", "defenses": "CLIP"}), "non-empty list"),
    (lambda g: g["attacks"].update(clean={"attack": "none", "seeds": [7]}), "not among the grid's seeds"),
    (lambda g: g["attacks"].update(clean={"attack": "none", "seeds": "0"}), "attacks.clean: 'seeds' must be"),
    (lambda g: g.update(epoch_zeroshot="yes"), "'epoch_zeroshot' must be true or false"),
    (lambda g: g.update(trim_text="on"), "'trim_text' must be true or false"),
    (lambda g: g["attacks"]["badnet"].update(target=[]), r"attacks.badnet.target: a list of targets"),
    (lambda g: g["attacks"]["badnet"].update(target=["bag", 1.5]), r"attacks.badnet.target: a list of targets"),
    (lambda g: g["attacks"]["badnet"].update(target={"name": "bag"}), r"attacks.badnet.target must be"),
])
def test_bad_configs_name_the_key(mutate, message):
    import copy

    g = copy.deepcopy(GRID)
    mutate(g)
    with pytest.raises(ConfigError, match=message):
        parse_config(g, source="grid.yaml")


def test_trim_text_reaches_every_training_cell_and_not_the_fingerprint():
    """A runtime setting like the device: each cell's TrainConfig gets it, its fingerprint does not
    (a finished cell is reused whichever way its captions were encoded)."""
    import copy

    from clipguard.bench.cell import cell_config, cell_spec

    plain, trimmed = parse_config(copy.deepcopy(GRID)), parse_config({**copy.deepcopy(GRID), "trim_text": True})
    pairs = [(a, b) for a, b in zip(plan_cells(plain), plan_cells(trimmed)) if a.stage != "scan"]
    assert pairs
    for a, b in pairs:
        assert cell_spec(plain, a).train.trim_text is None and cell_spec(trimmed, b).train.trim_text is True
        assert cell_config(plain, a) == cell_config(trimmed, b)


def test_overrides_and_env(tmp_path, monkeypatch):
    g = {k: v for k, v in GRID.items() if k != "datasets"}
    g["datasets"] = {"real": {"train": "${CG_TEST_CSV}", "test": "test.csv"}}
    path = _write(tmp_path, g)
    with pytest.raises(ConfigError, match="CG_TEST_CSV is not set"):
        load_config(path)
    monkeypatch.setenv("CG_TEST_CSV", "/data/train.csv")
    cfg = load_config(path, ["seeds=[3]", "pretrain.train.epochs=7"])
    assert cfg.datasets[0].train == "/data/train.csv"
    assert cfg.datasets[0].test == str(tmp_path / "test.csv")  # relative to the config file
    assert cfg.seeds == [3] and cfg.pretrain.train["epochs"] == 7
    cfg = load_config(path, ["datasets.real.train=/other.csv"])
    assert cfg.datasets[0].train == "/other.csv"


def test_validate_names_fails_before_training():
    import copy

    g = copy.deepcopy(GRID)
    g["pretrain"]["defenses"]["Nope"] = {"defense": "no-such-defence"}
    with pytest.raises(ConfigError, match="pretrain.defenses.Nope.*no-such-defence"):
        validate_names(parse_config(g))
    g = copy.deepcopy(GRID)
    g["attacks"]["badnet"]["attack"] = "no-such-attack"
    with pytest.raises(ConfigError, match="attacks.badnet.*no-such-attack"):
        validate_names(parse_config(g))
    g = copy.deepcopy(GRID)
    g["finetune"]["defenses"]["FT"] = {"defense": "ft", "options": {"bogus": 1}}
    with pytest.raises(ConfigError, match="bogus"):
        validate_names(parse_config(g))
    validate_names(parse_config(GRID))


def test_shipped_configs_parse(monkeypatch):
    import re

    root = Path(__file__).resolve().parents[1] / "configs"
    # every grid (a file with a top-level `datasets:`); the rest are presets of `--preset`
    grids = [p for p in sorted(root.glob("*.yaml")) if re.search(r"^datasets:", p.read_text(), re.M)]
    assert len(grids) >= 20 and {"demo.yaml", "detect-60k.yaml", "stress.yaml"} <= {p.name for p in grids}
    for p in grids:
        for var in set(re.findall(r"\$\{(\w+)\}", p.read_text())):
            monkeypatch.setenv(var, f"/data/{var.lower()}.csv")
        cfg = load_config(p)
        assert plan_cells(cfg)
        validate_names(cfg)  # every attack and defence (and option) of the shipped grids exists


def test_finished_cell_with_other_config_is_refused(tmp_path):
    import copy

    from clipguard.bench.cell import cell_config, fingerprint, is_done
    from clipguard.io import write_json

    cfg = parse_config(GRID)
    cell = plan_cells(cfg)[0]
    assert not is_done(cfg, cell, tmp_path)
    write_json(cell.json_path(tmp_path), {"fingerprint": fingerprint(cell_config(cfg, cell))})
    assert is_done(cfg, cell, tmp_path)
    g = copy.deepcopy(GRID)
    g["pretrain"]["train"]["epochs"] = 2
    cfg2 = parse_config(g)
    with pytest.raises(ConfigError, match="different config"):
        is_done(cfg2, plan_cells(cfg2)[0], tmp_path)
    # a fine-tuning cell is stale when its base model's config changed
    ft = next(c for c in plan_cells(cfg) if c.stage == "finetune")
    ft2 = next(c for c in plan_cells(cfg2) if c.stage == "finetune")
    assert ft.id == ft2.id and fingerprint(cell_config(cfg, ft)) != fingerprint(cell_config(cfg2, ft2))


def test_asr_columns_stay_apart_when_two_attacks_share_part_names():
    """The same attacks at two doses: each dose keeps its own columns (they used to pool into one)."""
    from clipguard.bench.cell import attack_columns

    parts = lambda n: [{"attack": "badnet", "target": "bag", "count": n},  # noqa: E731
                       {"attack": "tdpa", "target": "trouser", "count": n, "options": {"targets": 2}}]
    g = {"seeds": [0], "datasets": {"fm": {"train": "/d/train.csv", "test": "/d/test.csv"}},
         "attacks": {"low": {"parts": parts(4)}, "high": {"parts": parts(40)},
                     "mix": {"parts": [{"attack": "sig", "target": "bag", "count": 4},
                                       {"attack": "blended", "target": "bag", "count": 4}]},
                     "badnet": {"attack": "badnet", "target": "bag", "count": 4}},
         "pretrain": {"defenses": {"CLIP": "none"}}}
    cfg = parse_config(g)
    cols = {a.label: attack_columns(a, cfg.attacks) for a in cfg.attacks}
    assert cols["low"] == ["low:badnet", "low:tdpa"] and cols["high"] == ["high:badnet", "high:tdpa"]
    assert cols["mix"] == ["sig", "blended"]  # names no other attack uses stay as they were
    assert cols["badnet"] == ["badnet"]  # a single-part attack's column is its label
    all_cols = [c for v in cols.values() for c in v]
    assert len(all_cols) == len(set(all_cols))
    assert attack_columns(cfg.attacks[0]) == ["badnet", "tdpa"]  # without the grid: the part names


def test_defense_options_pin_what_every_entry_of_a_defence_starts_from():
    """A stage's defense_options sit under each entry's own options and skip entries with a preset,
    whose values must win over the library's and the grid's alike."""
    import copy

    g = copy.deepcopy(GRID)
    g["pretrain"]["defenses"] = {
        "S": "safeclip",
        "S2": {"defense": "safeclip", "options": {"repeat_z": 4.0}},
        "P": {"preset": "safeclip-paper"},
        "CLIP": "none",
    }
    g["pretrain"]["defense_options"] = {"safeclip": {"repeat_z": None, "warmup_epochs": None}}
    cfg = parse_config(g, base_dir=Path(__file__).resolve().parents[1] / "configs")
    by = {d.label: d for d in cfg.pretrain.defenses}
    assert by["S"].options == {"repeat_z": None, "warmup_epochs": None}
    assert by["S2"].options == {"repeat_z": 4.0, "warmup_epochs": None}
    assert by["P"].options == {} and by["CLIP"].options == {}
    g["pretrain"]["defense_options"] = {"roclip": {"keep_own": 0.1}}
    with pytest.raises(ConfigError, match="no entry of this stage uses defence 'roclip'"):
        parse_config(g)


def test_defense_options_may_name_a_preset_that_writes_the_pinned_defaults_out(tmp_path):
    """``preset:`` in defense_options takes that preset's options (under the keys beside it), so
    grids pinned to one set of earlier defaults share one file; a preset of another defence, or one
    with train settings, is refused with the key."""
    import copy

    cfgdir = Path(__file__).resolve().parents[1] / "configs"
    g = copy.deepcopy(GRID)
    g["pretrain"]["defenses"] = {"S": "safeclip", "S2": {"defense": "safeclip", "options": {"repeat_z": 4.0}}}
    g["pretrain"]["defense_options"] = {"safeclip": {"preset": "safeclip-previous", "density_k": 16}}
    by = {d.label: d for d in parse_config(g, base_dir=cfgdir).pretrain.defenses}
    previous = yaml.safe_load((cfgdir / "safeclip-previous.yaml").read_text())["options"]
    assert by["S"].options == {**previous, "density_k": 16}
    assert by["S2"].options == {**previous, "density_k": 16, "repeat_z": 4.0}
    g["pretrain"]["defense_options"] = {"safeclip": {"preset": "roclip"}}
    with pytest.raises(ConfigError, match=r"defense_options.safeclip.preset: .*roclip.yaml is a preset of defence 'roclip'"):
        parse_config(g, base_dir=cfgdir)
    (tmp_path / "long.yaml").write_text("defense: safeclip\noptions: {repeat_z: 4}\ntrain: {epochs: 48}\n")
    g["pretrain"]["defense_options"] = {"safeclip": {"preset": "long"}}
    with pytest.raises(ConfigError, match="has train settings; defense_options takes options only"):
        parse_config(g, base_dir=tmp_path)
