"""One way to build a run: CLI flags, presets and bench entries resolve into the same RunSpec."""

from __future__ import annotations

import copy
import subprocess
from pathlib import Path

import pytest
import yaml

from clipguard import defenses
from clipguard.bench.cell import cell_config, cell_spec, fingerprint
from clipguard.bench.config import parse_config
from clipguard.bench.plan import plan_cells
from clipguard.cli import main
from clipguard.errors import ConfigError
from clipguard.training.recipes import PAPER_FINETUNE, SMALL_FINETUNE, SMALL_LR, SMALL_WARMUP
from clipguard.training.spec import load_preset, parse_options, resolve_spec

ROOT = Path(__file__).resolve().parents[1]
SMALL = ROOT / "configs" / "safeclip-small.yaml"


def test_precedence_defaults_preset_flags():
    spec = resolve_spec(preset=SMALL)
    preset = load_preset(SMALL)
    assert spec.defense == "safeclip" and spec.preset == str(SMALL)
    assert spec.options.warmup_epochs == preset["options"]["warmup_epochs"]
    assert spec.options.temperature == 0.1 and spec.options.gmm_seed == 0  # library default
    assert spec.train.epochs == preset["train"]["epochs"]
    flags = resolve_spec(preset=SMALL, options={"warmup_epochs": 3}, train=[{"epochs": 20, "lr": None}])
    assert flags.options.warmup_epochs == 3 and flags.train.epochs == 20
    assert flags.train.lr == preset["train"]["lr"]  # an unset flag (None) leaves the preset's value


def test_finetune_recipe_follows_the_model():
    spec = resolve_spec(stage="finetune")  # the trainer's default model, cg-tiny
    assert spec.defense == "ft"
    assert {k: getattr(spec.train, k) for k in SMALL_FINETUNE} == SMALL_FINETUNE
    assert spec.train.lr == SMALL_LR["ft"]
    for name, lr in SMALL_LR.items():  # each defence has its own learning rate on the small models
        assert resolve_spec(stage="finetune", defense=name).train.lr == lr
        warm = SMALL_WARMUP.get(name, SMALL_FINETUNE["warmup"])  # and CleanerCLIP its own warm-up
        assert resolve_spec(stage="finetune", defense=name).train.warmup == warm
    assert resolve_spec(stage="finetune", defense="cleanerclip").train.warmup == 62
    assert resolve_spec(stage="finetune", defense="cleanerclip", train={"warmup": 5}).train.warmup == 5
    big = resolve_spec(stage="finetune", defense="cleanerclip", train={"model": "ViT-B-32"})
    assert {k: getattr(big.train, k) for k in PAPER_FINETUNE} == PAPER_FINETUNE
    par = resolve_spec(stage="finetune", defense="par", train={"model": "ViT-B-32"})  # PAR: its authors' lr
    assert par.train.lr == 3e-6 and par.train.epochs == PAPER_FINETUNE["epochs"]
    # the model can come from any layer, the last one naming it wins
    assert resolve_spec(stage="finetune", base={"model": "ViT-B-32"}, train={"model": "cg-nano"}).train.lr == SMALL_LR["ft"]
    assert resolve_spec(stage="finetune", train={"lr": 3e-4}).train.lr == 3e-4  # a set value wins
    assert resolve_spec(stage="pretrain", train={"model": "cg-nano"}).train.epochs != SMALL_FINETUNE["epochs"]


def test_writing_a_default_out_keeps_the_fingerprint():
    a = resolve_spec(defense="safeclip")
    b = resolve_spec(defense="safeclip", options={"threshold": 0.9, "step": None}, train={"weight_decay": 0.2})
    assert a.fingerprint() == b.fingerprint()
    assert resolve_spec(defense="safeclip", options={"step": 0.02}).fingerprint() != a.fingerprint()
    # runtime-only settings (bars, checkpoints kept) do not decide the weights
    assert resolve_spec(defense="safeclip", train={"quiet": True, "keep_checkpoints": 5}).fingerprint() == a.fingerprint()


@pytest.mark.parametrize("kwargs, match", [
    ({"defense": "safeclip", "options": {"warmup": 3}}, "did you mean 'warmup_epochs'"),
    ({"defense": "safeclip", "options": {"warmup_epochs": "abc"}}, "warmup_epochs' must be an integer"),
    ({"defense": "cleanclip", "options": {"lambda2": -1}}, "lambda2 must be >= 0"),
    ({"defense": "roclip", "options": {"match_every": 0}}, "match_every"),
    ({"defense": "nope"}, "unknown defense 'nope'"),
    ({"train": {"epochz": 3}}, "did you mean 'epochs'"),
    ({"train": {"batch_size": 0}}, "batch_size must be >= 1"),
    ({"train": {"accum_steps": 0}}, "accum_steps must be >= 1"),
    ({"train": {"lr": float("nan")}}, "finite"),
    ({"train": {"lr": -1e-3}}, "lr must be in"),
    ({"train": {"lr": 1e6}}, "lr must be in"),
    ({"train": {"epochs": 0}}, "epochs must be >= 1"),
    ({"train": {"precision": "fp8"}}, "precision"),
    ({"train": {"device": "tpu"}}, "device"),
    ({"defense": "roclip", "preset": SMALL}, "preset .* is for defense 'safeclip'"),
])
def test_bad_options_are_config_errors(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        resolve_spec(**kwargs)


def test_cuda_without_a_gpu_is_refused_up_front():
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    with pytest.raises(ConfigError, match="no CUDA GPU"):
        resolve_spec(train={"device": "cuda"})


@pytest.mark.parametrize("text, match", [
    ("defense: safeclip\noptions: {warmup_epochs: [\n", "not a valid YAML"),
    ("defense: safeclip\nepochz: 3\n", "unknown key"),
    ("defense: safeclip\ntrain: {epochz: 3}\n", "did you mean 'epochs'"),
    ("defense: safeclip\noptions: 5\n", "'options' must be a mapping"),
    ("- a\n- b\n", "a preset is a mapping"),
])
def test_bad_presets(tmp_path, text, match):
    p = tmp_path / "p.yaml"
    p.write_text(text)
    with pytest.raises(ConfigError, match=match) as err:
        resolve_spec(preset=p)
    assert "\n" not in str(err.value)  # one line, whatever the parser printed


def test_a_yaml_error_says_where_in_one_line(tmp_path):
    p = tmp_path / "p.yaml"
    p.write_text("defense: safeclip\noptions: {a: 1\ntrain: x\n")
    with pytest.raises(ConfigError, match=r"p.yaml: not a valid YAML file: line 3, column 6: expected ',' or '}'"):
        resolve_spec(preset=p)


def test_opt_values_parse_as_yaml_scalars():
    assert parse_options(["a=1", "b=true", "c=[adj, noun]", "d=x: y: z", "e=0.5"]) == {
        "a": 1, "b": True, "c": ["adj", "noun"], "d": "x: y: z", "e": 0.5}
    with pytest.raises(ConfigError, match="key=value"):
        parse_options(["novalue"])


GRID = {
    "name": "t", "seeds": [0],
    "datasets": {"fm": {"builtin": "fashion-mnist", "train_size": 200, "test_size": 100}},
    "attacks": {"badnet": {"attack": "badnet", "target": "bag", "rate": 0.05}},
    "pretrain": {"train": {"epochs": 12}, "defenses": {
        "SafeCLIP": {"defense": "safeclip"},
        "Small": {"preset": str(SMALL)},
        "SmallByName": {"preset": "safeclip-small"},
    }},
}


def test_bench_entries_resolve_like_the_cli(monkeypatch):
    monkeypatch.chdir(ROOT)
    cfg = parse_config(copy.deepcopy(GRID))
    cells = {c.defense.label: c for c in plan_cells(cfg)}
    small = cell_spec(cfg, cells["Small"])
    cli = resolve_spec(preset=SMALL, base={"model": cfg.model, "device": cfg.device, "seed": 0},
                       train=[{"epochs": 12}])
    assert small.resolved() == cli.resolved()
    assert small.train.epochs == 12  # the grid's stage settings win over the preset's
    assert cell_spec(cfg, cells["SmallByName"]).resolved() == small.resolved()
    # a default written out explicitly in the grid keeps the cached result
    g2 = copy.deepcopy(GRID)
    g2["pretrain"]["defenses"]["SafeCLIP"]["options"] = {"threshold": 0.9}
    g2["pretrain"]["train"]["weight_decay"] = 0.2
    cfg2 = parse_config(g2)
    cell2 = next(c for c in plan_cells(cfg2) if c.defense.label == "SafeCLIP")
    assert fingerprint(cell_config(cfg, cells["SafeCLIP"])) == fingerprint(cell_config(cfg2, cell2))


def test_bench_plan_refuses_a_misspelt_defence(tmp_path, capsys):
    g = copy.deepcopy(GRID)
    g["pretrain"]["defenses"] = {"X": {"defense": "safeclp"}}
    p = tmp_path / "g.yaml"
    p.write_text(yaml.safe_dump(g))
    assert main(["bench", str(p), "--out", str(tmp_path / "b"), "--plan"]) == 2
    err = capsys.readouterr().err
    assert "unknown defense 'safeclp'" in err and "Traceback" not in err


def test_one_place_constructs_a_trainer():
    hits = subprocess.run(["grep", "-rn", r"Trainer(", str(ROOT / "clipguard")], capture_output=True, text=True).stdout
    makers = [h for h in hits.splitlines() if "return Trainer(" in h or "= Trainer(" in h]
    assert len(makers) == 1 and "training/build.py" in makers[0], makers


def test_every_defence_has_a_validating_options_class():
    for name in defenses.names():
        cls = defenses.options_class(name)
        assert cls().to_dict() == cls.from_dict({}).to_dict()
        s = defenses.build(name)
        assert s.config() == cls().to_dict()


def test_an_option_at_its_neutral_value_leaves_the_fingerprint_alone():
    # PAR's clip_on was added after PAR runs existed: at "views" it is the loss those runs used
    a = resolve_spec(stage="finetune", defense="par")
    assert "clip_on" not in a.resolved()["options"] and a.options.to_dict()["clip_on"] == "views"
    b = resolve_spec(stage="finetune", defense="par", options={"clip_on": "originals"})
    assert b.resolved()["options"]["clip_on"] == "originals" and b.fingerprint() != a.fingerprint()


def test_shipped_presets_resolve():
    """Every preset in configs/ (a file without a grid's `datasets:`) resolves for its stage."""
    import re

    root = Path(__file__).resolve().parents[1] / "configs"
    presets = [p for p in sorted(root.glob("*.yaml")) if not re.search(r"^datasets:", p.read_text(), re.M)]
    assert {"safeclip-paper.yaml", "roclip.yaml", "cleanclip.yaml"} <= {p.name for p in presets}
    for p in presets:
        for stage in ("pretrain", "finetune"):  # a preset names no stage; its options must resolve in both
            spec = resolve_spec(stage=stage, preset=p)
            assert spec.defense == load_preset(p).get("defense") and spec.preset == str(p)
