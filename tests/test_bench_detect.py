"""Detection in the bench: detect-then-train entries and scan-only cells (config, cache key, plan,
a tiny grid end to end, the detection table)."""

from __future__ import annotations

import copy
import csv
import json
from pathlib import Path

import pytest
import yaml

from clipguard.bench.cell import cell_config
from clipguard.bench.config import load_config, parse_config, validate_names
from clipguard.bench.plan import dependency, plan_cells
from clipguard.errors import ConfigError
from clipguard.training.spec import fingerprint

GRID = {
    "name": "t",
    "seeds": [0, 1],
    "datasets": {"fm": {"builtin": "fashion-mnist", "train_size": 200, "test_size": 100}},
    "attacks": {"clean": {"attack": "none", "defenses": ["CLIP"]},
                "badnet": {"attack": "badnet", "target": "bag", "rate": 0.05}},
    "pretrain": {"train": {"epochs": 1}, "defenses": {
        "DAO-then-CLIP": {"detect": {"detector": "dao", "options": {"k": 8}}},
        "CLIP": "none",
    }},
    "scan": {"base": "CLIP", "detectors": ["dao", "similarity"]},
}


def _fp(cfg, method: str, seed: int = 0, attack: str = "badnet") -> str:
    cell = next(c for c in plan_cells(cfg) if c.method == method and c.seed == seed and c.attack.label == attack)
    return fingerprint(cell_config(cfg, cell))


def test_detect_entry_and_scan_plan_after_their_base():
    cfg = parse_config(GRID)
    entry = next(d for d in cfg.pretrain.defenses if d.label == "DAO-then-CLIP")
    assert entry.defense == "none"  # plain CLIP trains on the kept pairs unless told otherwise
    assert entry.detect.base == "CLIP"  # default: the plain CLIP entry, trained on the poisoned data
    assert entry.detect.keep_fraction is None
    cells = plan_cells(cfg)
    ids = [c.id for c in cells]
    # the detect entry is listed first in the YAML but planned after its base
    assert ids.index("fm/badnet/CLIP/seed0") < ids.index("fm/badnet/DAO-then-CLIP/seed0")
    assert ids.index("fm/badnet/CLIP/seed0") < ids.index("fm/badnet/CLIP+scan/seed0")
    # scan-only cells need poisons; the clean attack runs CLIP only
    assert sorted(c.method for c in cells if c.attack.clean) == ["CLIP", "CLIP"]
    scans = [c for c in cells if c.stage == "scan"]
    assert [c.id for c in scans] == ["fm/badnet/CLIP+scan/seed0", "fm/badnet/CLIP+scan/seed1"]
    for c in cells:
        dep = dependency(cfg, c)
        if c.stage == "scan" or c.defense.detect is not None:
            assert dep.id == f"fm/{c.attack.label}/CLIP/seed{c.seed}"
        else:
            assert dep is None
    assert scans[0].run_dir(Path("o")).name == "scan-CLIP"
    validate_names(cfg)


def test_a_named_defence_trains_on_the_kept_pairs():
    g = copy.deepcopy(GRID)
    g["pretrain"]["defenses"]["DAO-then-RoCLIP"] = {
        "defense": "roclip", "options": {"match_every": 3}, "train": {"epochs": 2},
        "detect": {"detector": "dao", "base": "CLIP", "keep_fraction": 0.95}}
    cfg = parse_config(g)
    validate_names(cfg)
    entry = next(d for d in cfg.pretrain.defenses if d.label == "DAO-then-RoCLIP")
    assert entry.defense == "roclip" and entry.detect.keep_fraction == 0.95
    cell = next(c for c in plan_cells(cfg) if c.method == "DAO-then-RoCLIP")
    conf = cell_config(cfg, cell)
    assert conf["run"]["defense"] == "roclip" and conf["run"]["train"]["epochs"] == 2
    assert conf["detect"]["keep_fraction"] == 0.95 and conf["detect"]["base"]["method"] == "CLIP"
    g["pretrain"]["defenses"]["DAO-then-RoCLIP"]["options"] = {"match_evry": 3}
    with pytest.raises(ConfigError, match="DAO-then-RoCLIP.*match_evry"):
        validate_names(parse_config(g))


def _bad(mutate):
    g = copy.deepcopy(GRID)
    mutate(g)
    return g


def _detect(g):
    return g["pretrain"]["defenses"]["DAO-then-CLIP"]["detect"]


@pytest.mark.parametrize("mutate, message", [
    (lambda g: _detect(g).update(detector="daoo"),
     r"pretrain.defenses.DAO-then-CLIP.detect.detector: unknown detector 'daoo'; choose one of"),
    (lambda g: _detect(g).pop("detector"), r"DAO-then-CLIP.detect: needs 'detector'"),
    (lambda g: _detect(g).update(options={"kk": 3}), r"detect.options: detector 'dao' has no option 'kk'"),
    (lambda g: _detect(g).update(options={"space": "audio"}), r"DAO-then-CLIP.detect.options"),
    (lambda g: _detect(g).update(base="SafeCLIP"), r"detect: base 'SafeCLIP' is not a pre-training defence label"),
    (lambda g: _detect(g).update(base="DAO-then-CLIP"), r"detect bases form a cycle: DAO-then-CLIP -> DAO-then-CLIP"),
    (lambda g: (g["pretrain"]["defenses"].update(B={"detect": {"detector": "dao", "base": "DAO-then-CLIP"}}),
                _detect(g).update(base="B")), r"detect bases form a cycle: DAO-then-CLIP -> B -> DAO-then-CLIP"),
    (lambda g: _detect(g).update(keep_fraction=1.5), r"detect.keep_fraction must be null or a number in \(0, 1\]"),
    (lambda g: _detect(g).update(relabel=0), r"DAO-then-CLIP.detect.relabel must be null .* or a whole number >= 1"),
    (lambda g: _detect(g).update(relabel=True), r"detect.relabel must be null"),
    (lambda g: _detect(g).update(threshold=3), r"DAO-then-CLIP.detect' has unknown key"),
    (lambda g: _detect(g).update(veto=["dao"]), r"DAO-then-CLIP.detect.veto: 'dao' is the entry's detector"),
    (lambda g: _detect(g).update(veto=["nope"]), r"DAO-then-CLIP.detect.veto: unknown detector 'nope'"),
    (lambda g: _detect(g).update(veto={"repeat": {"zz": 4}}), r"detect.veto.repeat: detector 'repeat' has no option 'zz'"),
    (lambda g: g["pretrain"]["defenses"].update(CLIP="safeclip"),
     r"DAO-then-CLIP.detect: needs 'base' .*no plain CLIP entry"),
    (lambda g: g.update(finetune={"defenses": {"F": {"defense": "ft", "detect": {"detector": "dao"}}}}),
     r"finetune.defenses.F' has unknown key"),
    (lambda g: g["attacks"]["badnet"].update(defenses=["DAO-then-CLIP"]), r"not the model of its detect.base 'CLIP'"),
    (lambda g: g["scan"].update(detectors=["dao", "nope"]), r"scan.detectors.1: unknown detector 'nope'"),
    (lambda g: g["scan"].update(options={"kdist": {"k": 4}}), r"scan.options: \['kdist'\] are not among"),
    (lambda g: g["scan"].update(options={"dao": {"k": 0}}), r"scan.options.dao"),
    (lambda g: g["scan"].update(base="Nope"), r"scan.base: base 'Nope' is not a pre-training defence label"),
    (lambda g: g["scan"].update(bogus=1), r"'scan' has unknown key"),
    (lambda g: _detect(g).update(detector="shift"), r"DAO-then-CLIP.detect: detector 'shift' compares .* give .*reference"),
    (lambda g: _detect(g).update(reference="CLIP"), r"DAO-then-CLIP.detect.reference: none of \['dao'\] compares"),
    (lambda g: _detect(g).update(detector="shift", reference="Nope"), r"detect.reference: base 'Nope' is not"),
    (lambda g: g["scan"].update(detectors=["shift"]), r"scan: detector 'shift' compares .* give scan.reference"),
    (lambda g: g["scan"].update(detectors=["ensemble"], options={"ensemble": {"members": "caption-agreement,shift"}}),
     r"scan: detector 'ensemble' compares .* give scan.reference"),
    (lambda g: g["scan"].update(detectors=["shift"], reference="Nope"), r"scan.reference: base 'Nope' is not"),
    (lambda g: g.update(neighbour_search={"method": "annoy"}), r"grid.yaml: neighbour_search: .*option 'method' must be one of"),
    (lambda g: g.update(neighbour_search={"nprob": 4}), r"neighbour_search: .*did you mean 'nprobe'"),
    (lambda g: g.update(neighbour_search="ivf"), r"'neighbour_search' must be a mapping"),
])
def test_bad_detect_and_scan_entries_name_the_key(mutate, message):
    with pytest.raises(ConfigError, match=message):
        parse_config(_bad(mutate), source="grid.yaml")


def test_a_detect_entry_can_scan_with_a_model_an_earlier_detection_cleaned():
    """Detect twice: the second entry scores the full poisoned set with the model trained on what
    the first kept. It plans after its base, whatever the YAML order, and its cache key follows the
    whole chain."""
    g = copy.deepcopy(GRID)
    g["pretrain"]["defenses"] = {
        "Twice": {"detect": {"detector": "dao", "base": "DAO-then-CLIP", "keep_fraction": 0.9}},
        **g["pretrain"]["defenses"]}
    cfg = parse_config(g)
    ids = [c.id for c in plan_cells(cfg)]
    assert ids.index("fm/badnet/CLIP/seed0") < ids.index("fm/badnet/DAO-then-CLIP/seed0") < \
        ids.index("fm/badnet/Twice/seed0")
    twice = next(c for c in plan_cells(cfg) if c.id == "fm/badnet/Twice/seed0")
    assert dependency(cfg, twice).id == "fm/badnet/DAO-then-CLIP/seed0"
    fp = _fp(cfg, "Twice")
    # a scan-only cell may score with such a model too (which model scores: one trained on kept pairs)
    g3 = copy.deepcopy(g)
    g3["scan"]["base"] = ["CLIP", "DAO-then-CLIP"]
    cells = plan_cells(parse_config(g3))
    ids = [c.id for c in cells]
    assert ids.index("fm/badnet/DAO-then-CLIP/seed0") < ids.index("fm/badnet/DAO-then-CLIP+scan/seed0")
    scan = next(c for c in cells if c.id == "fm/badnet/DAO-then-CLIP+scan/seed0")
    assert dependency(parse_config(g3), scan).id == "fm/badnet/DAO-then-CLIP/seed0"
    g2 = copy.deepcopy(g)
    g2["pretrain"]["defenses"]["DAO-then-CLIP"]["detect"]["options"]["k"] = 6  # the first detection
    assert _fp(parse_config(g2), "Twice") != fp


def test_scan_defaults_and_explicit_bases():
    from clipguard.detection import names

    g = copy.deepcopy(GRID)
    g["scan"] = None  # --set scan=null: no scan-only cells
    assert parse_config(g).scan is None
    assert not any(c.stage == "scan" for c in plan_cells(parse_config(g)))
    g["scan"] = {}  # every detector on the plain CLIP entry's model
    cfg = parse_config(g)
    # every detector that needs no reference model (shift compares with one)
    assert cfg.scan.bases == ["CLIP"] and cfg.scan.detectors == [n for n in names() if n not in ("shift", "pattern")]
    g["scan"] = {"detectors": "dao,kdist", "base": ["CLIP"]}
    cfg = parse_config(g)
    assert cfg.scan.bases == ["CLIP"] and cfg.scan.detectors == ["dao", "kdist"]


def test_cache_key_covers_detector_options_keep_rule_and_base():
    base = parse_config(GRID)
    fp = _fp(base, "DAO-then-CLIP")
    clip_fp = _fp(base, "CLIP")
    scan_fp = _fp(base, "CLIP+scan")

    def variant(mutate):
        g = copy.deepcopy(GRID)
        mutate(g)
        return parse_config(g)

    # a detector option, the detector, the keep rule: a new key; the base is untouched
    for mutate in (lambda g: _detect(g).update(options={"k": 12}),
                   lambda g: _detect(g).update(options={"k": 8, "z": 2.5}),
                   lambda g: _detect(g).update(detector="slof", options={}),
                   lambda g: _detect(g).update(keep_fraction=0.9),
                   lambda g: _detect(g).update(veto=["repeat"]),
                   lambda g: _detect(g).update(relabel=8)):
        cfg = variant(mutate)
        assert _fp(cfg, "DAO-then-CLIP") != fp
        assert _fp(cfg, "CLIP") == clip_fp and _fp(cfg, "CLIP+scan") == scan_fp
    # a veto's options are resolved too: a list of names is the mapping with no options
    assert _fp(variant(lambda g: _detect(g).update(veto=["repeat"])), "DAO-then-CLIP") == \
        _fp(variant(lambda g: _detect(g).update(veto={"repeat": {"k": 4}})), "DAO-then-CLIP") != \
        _fp(variant(lambda g: _detect(g).update(veto={"repeat": {"z": 4}})), "DAO-then-CLIP")
    assert _fp(variant(lambda g: _detect(g).update(veto=[])), "DAO-then-CLIP") == fp
    assert _fp(variant(lambda g: _detect(g).update(relabel=None)), "DAO-then-CLIP") == fp
    # writing a default out keeps the key (the options are resolved)
    assert _fp(variant(lambda g: _detect(g).update(options={"k": 8, "space": "image", "metric": "l2"})),
               "DAO-then-CLIP") == fp
    # the base cell's config is part of the key of the cells that read its model
    cfg = variant(lambda g: g["pretrain"]["defenses"].update(CLIP={"defense": "none", "train": {"lr": 5e-4}}))
    assert _fp(cfg, "CLIP") != clip_fp
    assert _fp(cfg, "DAO-then-CLIP") != fp and _fp(cfg, "CLIP+scan") != scan_fp
    # what trains on the kept pairs, too
    assert _fp(variant(lambda g: g["pretrain"]["defenses"]["DAO-then-CLIP"].update(train={"epochs": 2})),
               "DAO-then-CLIP") != fp
    # the scan's detectors and their options
    assert _fp(variant(lambda g: g["scan"].update(options={"dao": {"k": 32}})), "CLIP+scan") != scan_fp
    assert _fp(variant(lambda g: g["scan"].update(detectors=["dao"])), "CLIP+scan") != scan_fp
    # the grid's neighbour search keys every scan, and only when it is not the default exact one
    exact = variant(lambda g: g.update(neighbour_search={"method": "exact", "chunk": 4096}))
    assert exact.neighbour_search == {} and _fp(exact, "CLIP+scan") == scan_fp and _fp(exact, "DAO-then-CLIP") == fp
    ivf = variant(lambda g: g.update(neighbour_search={"method": "ivf"}))
    assert ivf.neighbour_search == {"method": "ivf"}
    assert _fp(ivf, "CLIP+scan") != scan_fp and _fp(ivf, "DAO-then-CLIP") != fp and _fp(ivf, "CLIP") == clip_fp


def test_shipped_detect_config_plans(tmp_path):
    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "detect-fmnist.yaml")
    validate_names(cfg)
    cells = plan_cells(cfg)
    attacks = [a.label for a in cfg.attacks if not a.clean]
    assert attacks == ["TDPA", "BadNet", "Blended", "SIG", "WaNet"]
    assert all(len(a.parts) == 1 and a.parts[0].count == 100 for a in cfg.attacks if not a.clean)
    assert {c.method for c in cells} == {"CLIP", "DAO-then-CLIP", "SLOF-then-CLIP", "CLIP+scan"}
    assert len([c for c in cells if c.stage == "scan"]) == 5 * 3
    assert sorted(cfg.scan.detectors) == ["dao", "iforest", "kdist", "lid", "mixture", "similarity", "slof"]
    assert len(cells) == 1 + 5 * 3 * 4


# ---------------------------------------------------------------------------- reporting
def _det_cell(seed: int, stage: str, method: str, aurocs: dict[str, float], label_opts: str = "") -> dict:
    return {"cell": f"fm/bad/{method}/seed{seed}", "dataset": "fm", "attack": "bad", "seed": seed, "stage": stage,
            "method": method, "detection": {"base": "CLIP", "base_fingerprint": f"b{seed}", "detectors": {
                name: {"label": name + label_opts, "keep": {"kept": 90, "poisons_kept_parts": {"bad": 1}},
                       "metrics": {"auroc": v, "tpr@1%fpr": v / 2, "n": 100, "n_poison": 10,
                                   "parts": {"bad": {"auroc": v, "tpr@1%fpr": v / 2, "n": 100, "n_poison": 10}}}}
                for name, v in aurocs.items()}}}


def test_detection_table_means_over_seeds_and_counts_a_repeat_once():
    from clipguard.reporting.merge import detection_rows
    from clipguard.reporting.tables import detection_table, to_markdown

    cells = [_det_cell(0, "scan", "CLIP+scan", {"dao": 0.9, "similarity": 0.5}),
             _det_cell(1, "scan", "CLIP+scan", {"dao": 0.8}),
             # the same detector on the same base model and seed, from a detect-then-train cell
             _det_cell(0, "pretrain", "DAO-then-CLIP", {"dao": 0.9}),
             _det_cell(0, "pretrain", "DAO32-then-CLIP", {"dao": 0.7}, label_opts=" (k=32)")]
    rows = detection_rows(cells)
    assert len(rows) == 5 and {r["column"] for r in rows} == {"bad"}
    t = detection_table(rows)
    body = {r[0]: r[1:] for r in t.rows}
    assert list(body) == ["dao on CLIP", "similarity on CLIP", "dao (k=32) on CLIP"]
    assert body["dao on CLIP"] == ["85.0 ± 7.1", "42.5 ± 3.5"]
    assert body["similarity on CLIP"][0] == "50.0 (n=1)"
    assert body["dao (k=32) on CLIP"][0] == "70.0 (n=1)"
    assert t.header[0] == ["Data (attack)", "fm (bad)"]
    assert "Detection" in to_markdown(t)


# ---------------------------------------------------------------------------- end to end
@pytest.mark.slow
def test_tiny_grid_with_detect_then_train_and_scan_cells(fm_dir, tmp_path):
    from clipguard.bench.runner import run_bench
    from clipguard.reporting.merge import read_results_csv

    grid = {
        "name": "tiny-detect", "seeds": [0], "model": "cg-nano",
        "datasets": {"fm": {"train": str(fm_dir / "train.csv"), "test": str(fm_dir / "test.csv"),
                            "probe_size": 100, "finetune_size": 0}},
        "attacks": {"badnet": {"attack": "badnet", "target": "bag", "count": 26}},
        "pretrain": {"train": {"epochs": 1, "batch_size": 64, "warmup": 2}, "defenses": {
            "CLIP": "none",
            "DAO-then-CLIP": {"detect": {"detector": "dao", "base": "CLIP", "options": {"k": 8}}},
            "KD90-then-CLIP": {"detect": {"detector": "kdist", "keep_fraction": 0.9,
                                          "veto": {"repeat": {"z": 0.5}}}},
            "Twice": {"detect": {"detector": "similarity", "base": "DAO-then-CLIP", "keep_fraction": 0.95}},
            "KD90-relabel": {"detect": {"detector": "kdist", "keep_fraction": 0.9, "veto": {"repeat": {"z": 0.5}},
                                        "relabel": 4}},
        }},
        "scan": {"base": "CLIP", "detectors": ["dao", "similarity", "kdist"], "options": {"dao": {"k": 8}}},
    }
    config = tmp_path / "grid.yaml"
    config.write_text(yaml.safe_dump(grid))
    cfg = load_config(config)
    out = tmp_path / "bench"
    meta = run_bench(cfg, out, quiet=True)
    assert meta["cells_run"] == 6

    def cell(name: str) -> dict:
        return json.loads((out / "cells" / f"fm__badnet__{name}__seed0.json").read_text())

    n = 512 + 26
    dao = cell("DAO-then-CLIP")
    det = dao["detection"]
    assert det["base"] == "CLIP" and det["base_cell"] == "fm/badnet/CLIP/seed0" and det["n_pairs"] == n
    assert det["checkpoint"].startswith("runs/fm/badnet/seed0/pretrain-CLIP/checkpoints/")
    m = det["detectors"]["dao"]["metrics"]
    for key in ("auroc", "auprc", "tpr@1%fpr", "precision@k"):
        assert 0.0 <= m[key] <= 1.0
    assert m["n_poison"] == 26 and m["parts"]["badnet"]["n_poison"] == 26
    keep = det["keep"]
    assert keep["detector"] == "dao" and keep["rule"] == "robust_z"
    assert keep["kept"] + keep["dropped"] == n and keep["poisons"] == 26
    assert keep["parts"] == {"badnet": {"poisons": 26, "kept": keep["poisons_kept"]}}
    assert dao["train_pairs"] == keep["kept"]  # trained on the kept pairs only
    assert "dropped_rows" not in det  # kept in the run folder's detection.json
    stored = json.loads((out / dao["run_dir"] / "detection.json").read_text())
    assert len(stored["dropped_rows"]) == keep["dropped"]
    assert (out / dao["run_dir"] / "scores.csv").is_file()
    assert dao["metrics"]["zeroshot_top1"] is not None and dao["asr"][0]["column"] == "badnet"
    assert dao["config"]["detect"]["options"] == {"z": 3.0, "k": 8, "space": "image", "metric": "l2"}

    kd_cell = cell("KD90-then-CLIP")
    kd = kd_cell["detection"]["keep"]
    veto = kd["vetoes"][0]
    assert kd["rule"] == "fraction" and veto["detector"] == "repeat" and veto["dropped_by_it_alone"] > 0
    assert abs(kd["kept"] + veto["dropped_by_it_alone"] - 0.9 * n) <= 1  # the fraction, then the veto
    assert kd_cell["train_pairs"] == kd["kept"] and list(kd_cell["detection"]["detectors"]) == ["kdist", "repeat"]

    # the same scores and keep rule, the dropped images trained with borrowed captions
    rel_cell = cell("KD90-relabel")
    rel = rel_cell["detection"]["keep"]
    assert rel["kept"] == kd["kept"] and rel["relabelled"] == n - rel["kept"]
    assert rel_cell["train_pairs"] == n and "borrowed_rows" not in rel_cell["detection"]
    stored = json.loads((out / rel_cell["run_dir"] / "detection.json").read_text())
    kept_rows = set(range(n)) - set(stored["dropped_rows"])
    assert len(stored["borrowed_rows"]) == len(stored["dropped_rows"]) and set(stored["borrowed_rows"]) <= kept_rows
    assert 0 <= rel["borrowed_from_poisons"] <= rel["relabelled"]

    twice = cell("Twice")
    assert twice["detection"]["base_cell"] == "fm/badnet/DAO-then-CLIP/seed0" and twice["detection"]["n_pairs"] == n
    assert abs(twice["train_pairs"] - 0.95 * n) <= 1

    scan = cell("CLIP+scan")
    assert scan["stage"] == "scan" and "asr" not in scan and "metrics" not in scan
    assert list(scan["detection"]["detectors"]) == ["dao", "similarity", "kdist"]
    assert "keep" not in scan["detection"]
    # the same detector, options, base model and data as DAO-then-CLIP's: the same scores
    assert scan["detection"]["detectors"]["dao"]["metrics"]["auroc"] == pytest.approx(m["auroc"])
    assert scan["detection"]["detectors"]["dao"]["label"] == "dao (k=8)"

    md = (out / "report.md").read_text()
    table = md.split("Detection: AUROC")[1]
    for label in ("dao (k=8) on CLIP", "similarity on CLIP", "kdist on CLIP"):
        assert label in table
    assert table.count("dao (k=8) on CLIP") == 1  # the detect cell's repeat counts once
    assert "Detect-then-train: % of the training pairs kept" in md
    table1 = md.split("Table 1:")[1].split("Table 2")[0]
    assert "CLIP+scan" not in table1 and "DAO-then-CLIP" in table1
    rows = read_results_csv(out / "results.csv")
    assert {r["method"] for r in rows} == {"CLIP", "DAO-then-CLIP", "KD90-then-CLIP", "KD90-relabel", "Twice",
                                           "CLIP+scan"}
    dao_row = next(r for r in rows if r["method"] == "DAO-then-CLIP")
    assert int(dao_row["detect_kept"]) == keep["kept"] and dao_row["detect_auroc.badnet"] != ""
    det_rows = read_results_csv(out / "detection.csv")
    assert {r["label"] for r in det_rows} == {"dao (k=8)", "similarity", "kdist", "repeat (z=0.5)"}

    # nothing to redo; a changed detector option is a stale cell, not a silent reuse
    assert run_bench(cfg, out, quiet=True, report=False)["cells_run"] == 0
    grid["pretrain"]["defenses"]["DAO-then-CLIP"]["detect"]["options"]["k"] = 6
    config.write_text(yaml.safe_dump(grid))
    with pytest.raises(ConfigError, match="different config"):
        run_bench(load_config(config), out, quiet=True, report=False, only="DAO-then-CLIP")


# ---------------------------------------------------------------------------- held-aside (trusted) models
def _trusted_grid() -> dict:
    g = copy.deepcopy(GRID)
    g["datasets"]["fm"]["finetune_size"] = 40
    g["pretrain"]["defenses"] = {
        "CLIP": "none",
        "Trusted": {"defense": "none", "data": "held-aside", "train": {"epochs": 3}},
        "CA-then-CLIP": {"detect": {"detector": "caption-agreement", "base": "Trusted"}},
    }
    g["scan"] = {"base": "Trusted", "detectors": ["caption-agreement", "similarity"]}
    return g


def test_a_held_aside_entry_is_a_scan_and_detect_base():
    cfg = parse_config(_trusted_grid())
    validate_names(cfg)
    entry = next(d for d in cfg.pretrain.defenses if d.label == "Trusted")
    assert entry.data == "held-aside" and next(d for d in cfg.pretrain.defenses if d.label == "CLIP").data == "train"
    conf = cell_config(cfg, next(c for c in plan_cells(cfg) if c.method == "Trusted"))
    assert conf["train_data"] == "held-aside"
    assert "train_data" not in cell_config(cfg, next(c for c in plan_cells(cfg) if c.method == "CLIP"))
    for c in plan_cells(cfg):
        if c.stage == "scan" or c.defense.detect is not None:
            assert dependency(cfg, c).method == "Trusted"


@pytest.mark.parametrize("mutate, message", [
    (lambda g: g["pretrain"]["defenses"]["Trusted"].update(data="trusted"), r"Trusted.data must be one of train, held-aside"),
    (lambda g: g["pretrain"]["defenses"]["CA-then-CLIP"].update(data="held-aside"), r"do not combine"),
])
def test_bad_held_aside_entries_name_the_key(mutate, message):
    g = _trusted_grid()
    mutate(g)
    with pytest.raises(ConfigError, match=message):
        parse_config(g)


def test_a_held_aside_entry_trains_on_the_held_aside_clean_rows(fm_dir, tmp_path):
    from clipguard.bench.cache import BenchCache
    from clipguard.bench.cell import prepare_trainer

    g = _trusted_grid()
    g["datasets"]["fm"] = {"train": str(fm_dir / "train.csv"), "test": str(fm_dir / "test.csv"),
                           "probe_size": 0, "finetune_size": 40}
    g["model"] = "cg-nano"
    cfg = parse_config(g)
    out = tmp_path / "bench"
    cache = BenchCache(cfg, out)
    cell = next(c for c in plan_cells(cfg) if c.method == "Trusted" and c.attack.label == "badnet")
    _, data, _ = prepare_trainer(cfg, cell, out, cache, quiet=True)
    held = cache.finetune_clean(cell.dataset)
    assert len(data) == 40 and data.captions == held.captions
    clip = next(c for c in plan_cells(cfg) if c.method == "CLIP" and c.attack.label == "badnet")
    _, poisoned, _ = prepare_trainer(cfg, clip, out, cache, quiet=True)
    assert len(poisoned) > 500


def _cleaned_grid() -> dict:
    """Plain CLIP on the poisoned data, cleaned by fine-tuning on the held-aside rows; the cleaned
    model scores the poisoned data (scan-only and detect-then-train)."""
    g = copy.deepcopy(GRID)
    g["datasets"]["fm"]["finetune_size"] = 40
    g["pretrain"]["defenses"] = {
        "CA-then-CLIP": {"detect": {"detector": "caption-agreement", "base": "CLIP+FT", "keep_fraction": 0.9}},
        "CLIP": "none"}
    g["finetune"] = {"base": "CLIP", "data": "clean", "defenses": {"FT": "ft"}}
    g["scan"] = {"base": ["CLIP", "CLIP+FT"], "detectors": ["similarity"]}
    return g


def test_a_fine_tuned_model_is_a_scan_and_detect_base():
    """'BASE+ENTRY' names the model a fine-tuning defence cleaned: it is made after its pre-training
    base and before the cells that score with it, and the cache key follows the chain."""
    g = _cleaned_grid()
    cfg = parse_config(g)
    validate_names(cfg)
    cells = plan_cells(cfg)
    ids = [c.id for c in cells]
    assert ids.index("fm/badnet/CLIP/seed0") < ids.index("fm/badnet/CLIP+FT/seed0") \
        < ids.index("fm/badnet/CA-then-CLIP/seed0")
    assert ids.index("fm/badnet/CLIP+FT/seed0") < ids.index("fm/badnet/CLIP+FT+scan/seed0")
    by_id = {c.id: c for c in cells}
    assert dependency(cfg, by_id["fm/badnet/CA-then-CLIP/seed0"]).id == "fm/badnet/CLIP+FT/seed0"
    assert dependency(cfg, by_id["fm/badnet/CLIP+FT+scan/seed0"]).id == "fm/badnet/CLIP+FT/seed0"
    assert dependency(cfg, by_id["fm/badnet/CLIP+FT/seed0"]).id == "fm/badnet/CLIP/seed0"
    # the clean column makes no fine-tuned model, so it plans no cell that needs one
    assert sorted(c.method for c in cells if c.attack.clean) == ["CLIP", "CLIP"]
    fp = _fp(cfg, "CA-then-CLIP")
    g2 = _cleaned_grid()
    g2["finetune"]["defenses"]["FT"] = {"defense": "ft", "train": {"lr": 1.0e-5}}  # another cleaned model
    assert _fp(parse_config(g2), "CA-then-CLIP") != fp
    # the scheduler starts the fine-tuned base before other fine-tuning or scan cells
    from clipguard.bench.schedule import priority

    assert priority(by_id["fm/badnet/CLIP+FT/seed0"], {"fm/badnet/CLIP+FT/seed0"}) == 0


@pytest.mark.parametrize("mutate, message", [
    (lambda g: g["attacks"]["clean"].update(defenses=["CLIP", "CA-then-CLIP"]),
     r"attacks.clean runs 'CA-then-CLIP' but not the model of its detect.base 'CLIP\+FT', which .*\(a fine-tuning model"),
    (lambda g: g["pretrain"]["defenses"]["CA-then-CLIP"]["detect"].update(base="CLIP+Nope"),
     r"base 'CLIP\+Nope' is not a pre-training defence label or a fine-tuning row; choose one of .*'CLIP\+FT'"),
    (lambda g: g["finetune"].update(base="CA-then-CLIP"), r"detect bases form a cycle: CA-then-CLIP -> CA-then-CLIP\+FT"),
])
def test_bad_fine_tuned_bases_name_the_key(mutate, message):
    g = _cleaned_grid()
    mutate(g)
    if g["finetune"]["base"] == "CA-then-CLIP":
        g["pretrain"]["defenses"]["CA-then-CLIP"]["detect"]["base"] = "CA-then-CLIP+FT"
        g["scan"]["base"] = "CLIP"
    with pytest.raises(ConfigError, match=message):
        parse_config(g)


def _tiny(g: dict, fm_dir) -> dict:
    """The grid ``g`` made small enough to run: one seed, the session's CSV, one BadNet column."""
    g.update(seeds=[0], model="cg-nano")
    g["datasets"]["fm"] = {"train": str(fm_dir / "train.csv"), "test": str(fm_dir / "test.csv"),
                           "probe_size": 0, "finetune_size": 64}
    g["attacks"] = {"badnet": {"attack": "badnet", "target": "bag", "count": 26}}
    g["pretrain"]["train"] = {"epochs": 1, "batch_size": 64, "warmup": 2}
    if g.get("finetune"):
        g["finetune"]["train"] = {"epochs": 1, "batch_size": 32, "warmup": 1}
    return g


def _run_tiny(g: dict, tmp_path, cells: int):
    """Run the tiny grid ``g`` (``cells`` cells); return a reader of its BadNet cells' JSON by method."""
    from clipguard.bench.runner import run_bench

    config = tmp_path / "grid.yaml"
    config.write_text(yaml.safe_dump(g))
    out = tmp_path / "bench"
    assert run_bench(load_config(config), out, quiet=True)["cells_run"] == cells

    def cell(name: str) -> dict:
        return json.loads((out / "cells" / f"fm__badnet__{name}__seed0.json").read_text())

    return cell, out


def test_tiny_grid_scans_with_a_fine_tuned_model(fm_dir, tmp_path):
    cell, out = _run_tiny(_tiny(_cleaned_grid(), fm_dir), tmp_path, cells=5)
    det = cell("CA-then-CLIP")["detection"]
    assert det["base"] == "CLIP+FT" and det["base_cell"] == "fm/badnet/CLIP+FT/seed0"
    assert det["checkpoint"].startswith("runs/fm/badnet/seed0/finetune-FT/checkpoints/")
    assert cell("CA-then-CLIP")["train_pairs"] == det["keep"]["kept"] < det["n_pairs"]
    scan = cell("CLIP+FT+scan")["detection"]
    assert scan["base"] == "CLIP+FT" and scan["n_poisoned"] == 26
    # the cleaned model is not the poisoned one: the same detector scores the pairs differently
    plain = (out / "runs/fm/badnet/seed0/scan-CLIP/scores.csv").read_text()
    cleaned = (out / "runs/fm/badnet/seed0/scan-CLIP+FT/scores.csv").read_text()
    assert plain != cleaned


def test_a_grid_scans_with_the_approximate_search_and_records_its_recall(fm_dir, tmp_path):
    pytest.importorskip("faiss")
    g = _tiny(copy.deepcopy(GRID), fm_dir)
    g["neighbour_search"] = {"method": "ivf", "nlist": 4}
    cell, _ = _run_tiny(g, tmp_path, cells=3)
    for name in ("DAO-then-CLIP", "CLIP+scan"):
        search = cell(name)["detection"]["neighbour_search"]
        assert search["method"] == "ivf" and search["nlist"] == 4
        found = search["searches"]["image/l2"]
        # every cell probed: the exact neighbours, up to the order of near-ties
        assert found["method"] == "ivf" and found["nprobe"] == 4 and found["recall_at_k"] > 0.99


def test_a_detect_entry_scored_by_two_models(fm_dir, tmp_path):
    """``base: [A, B]``: both models score the pairs (mean rank shares); the cell waits for both,
    its cache key follows both, and one-base entries keep their keys."""
    from clipguard.bench.runner import run_bench
    from clipguard.bench.schedule import CellQueue

    g = _cleaned_grid()
    g["pretrain"]["defenses"]["Both"] = {"detect": {"detector": "caption-agreement", "base": ["CLIP", "CLIP+FT"],
                                                    "keep_fraction": 0.9, "veto": ["repeat"]}}
    cfg = parse_config(g)
    cells = {c.id: c for c in plan_cells(cfg)}
    both = cells["fm/badnet/Both/seed0"]
    from clipguard.bench.plan import dependencies

    assert [d.id for d in dependencies(cfg, both)] == ["fm/badnet/CLIP/seed0", "fm/badnet/CLIP+FT/seed0"]
    ids = list(cells)
    assert ids.index("fm/badnet/CLIP+FT/seed0") < ids.index("fm/badnet/Both/seed0")
    queue = CellQueue(cfg, tmp_path / "none", list(cells.values()))
    assert not queue.ready(both)
    assert _fp(cfg, "CA-then-CLIP") == _fp(parse_config(_cleaned_grid()), "CA-then-CLIP")
    g2 = copy.deepcopy(g)
    g2["pretrain"]["defenses"]["Both"]["detect"]["base"] = ["CLIP+FT", "CLIP"]
    assert _fp(parse_config(g2), "Both") != _fp(cfg, "Both")
    bad = copy.deepcopy(g)
    bad["pretrain"]["defenses"]["Both"]["detect"]["base"] = ["CLIP", "CLIP"]
    with pytest.raises(ConfigError, match="a list of distinct labels"):
        parse_config(bad)
    # combine: max is part of the cell's key; mean (the default) written out is the same cell
    g3 = copy.deepcopy(g)
    g3["pretrain"]["defenses"]["Both"]["detect"]["combine"] = "max"
    assert _fp(parse_config(g3), "Both") != _fp(cfg, "Both")
    g3["pretrain"]["defenses"]["Both"]["detect"]["combine"] = "mean"
    assert _fp(parse_config(g3), "Both") == _fp(cfg, "Both")
    g3["pretrain"]["defenses"]["Both"]["detect"]["combine"] = "median"
    with pytest.raises(ConfigError, match="combine must be one of mean, max, got 'median'"):
        parse_config(g3)
    g3 = copy.deepcopy(_cleaned_grid())
    g3["pretrain"]["defenses"]["CA-then-CLIP"]["detect"]["combine"] = "max"
    with pytest.raises(ConfigError, match="combine combines the scores of several models; it needs base"):
        parse_config(g3)
    # end to end on a tiny grid
    g = _tiny(g, fm_dir)
    g["scan"] = None
    config = tmp_path / "grid.yaml"
    config.write_text(yaml.safe_dump(g))
    out = tmp_path / "bench"
    run_bench(load_config(config), out, quiet=True, only="Both,CLIP/,CLIP+FT/")
    det = json.loads((out / "cells" / "fm__badnet__Both__seed0.json").read_text())["detection"]
    assert det["base"] == "CLIP & CLIP+FT" and det["bases"] == ["CLIP", "CLIP+FT"] and len(det["checkpoints"]) == 2
    assert det["detectors"]["caption-agreement"]["keep"]["rule"] == "every_model"
    assert det["keep"]["rule"] == "fraction" and det["keep"]["vetoes"][0]["detector"] == "repeat"


def _reference_grid() -> dict:
    """A trusted model as the reference of ``shift``: in a detect-then-train entry, and in the scan
    cells of the poisoned model (the scan of the trusted model itself runs without it)."""
    g = copy.deepcopy(GRID)
    g["datasets"]["fm"]["finetune_size"] = 40
    g["pretrain"]["defenses"] = {
        "Shift-then-CLIP": {"detect": {"detector": "shift", "base": "CLIP", "reference": "Trusted",
                                       "keep_fraction": 0.9, "veto": ["repeat"]}},
        "CLIP": "none",
        "Trusted": {"defense": "none", "data": "held-aside", "train": {"epochs": 2}}}
    g["scan"] = {"base": ["CLIP", "Trusted"], "detectors": ["similarity", "shift"], "reference": "Trusted"}
    return g


def test_a_reference_model_is_waited_for_and_keys_the_cells(fm_dir, tmp_path):
    from clipguard.bench.plan import dependencies

    cfg = parse_config(_reference_grid())
    cells = {c.id: c for c in plan_cells(cfg)}
    ids = list(cells)
    for name in ("Shift-then-CLIP", "CLIP+scan"):
        deps = [d.id for d in dependencies(cfg, cells[f"fm/badnet/{name}/seed0"])]
        assert deps == ["fm/badnet/CLIP/seed0", "fm/badnet/Trusted/seed0"]
        assert ids.index("fm/badnet/Trusted/seed0") < ids.index(f"fm/badnet/{name}/seed0")
    assert [d.id for d in dependencies(cfg, cells["fm/badnet/Trusted+scan/seed0"])] == ["fm/badnet/Trusted/seed0"]
    conf = cell_config(cfg, cells["fm/badnet/CLIP+scan/seed0"])
    assert conf["scan"]["reference"]["method"] == "Trusted"
    assert [d["name"] for d in conf["scan"]["detectors"]] == ["similarity", "shift"]
    own = cell_config(cfg, cells["fm/badnet/Trusted+scan/seed0"])["scan"]
    assert "reference" not in own and [d["name"] for d in own["detectors"]] == ["similarity"]
    assert cell_config(cfg, cells["fm/badnet/Shift-then-CLIP/seed0"])["detect"]["reference"]["method"] == "Trusted"
    longer = _reference_grid()
    longer["pretrain"]["defenses"]["Trusted"]["train"]["epochs"] = 3  # another reference model: another cell
    assert _fp(parse_config(longer), "Shift-then-CLIP") != _fp(cfg, "Shift-then-CLIP")
    assert _fp(parse_config(longer), "CLIP+scan") != _fp(cfg, "CLIP+scan")
    # end to end on a tiny grid
    cell, _ = _run_tiny(_tiny(_reference_grid(), fm_dir), tmp_path, cells=5)
    det = cell("Shift-then-CLIP")["detection"]
    assert det["base"] == "CLIP" and det["reference"] == "Trusted"
    assert det["keep"]["detector"] == "shift" and det["keep"]["vetoes"][0]["detector"] == "repeat"
    assert cell("Shift-then-CLIP")["train_pairs"] == det["keep"]["kept"] < det["n_pairs"]
    scan = cell("CLIP+scan")["detection"]
    assert scan["reference"] == "Trusted" and set(scan["detectors"]) == {"similarity", "shift"}
    assert 0 <= scan["detectors"]["shift"]["metrics"]["auroc"] <= 1
    assert set(cell("Trusted+scan")["detection"]["detectors"]) == {"similarity"}


def _within_grid() -> dict:
    """A second pass inside the first: ``Both`` keeps only what its own rule and ``First`` keep."""
    g = copy.deepcopy(GRID)
    g["pretrain"]["defenses"] = {
        "CLIP": "none",
        "First": {"detect": {"detector": "similarity", "base": "CLIP", "keep_fraction": 0.8}},
        "Both": {"detect": {"detector": "caption-agreement", "base": "CLIP", "options": {"k": 8},
                            "keep_fraction": 0.8, "within": "First"}}}
    g["scan"] = None
    return g


def test_within_drops_what_the_other_entry_dropped(fm_dir, tmp_path):
    from clipguard.bench.plan import dependencies

    cfg = parse_config(_within_grid())
    cells = {c.id: c for c in plan_cells(cfg)}
    ids = list(cells)
    assert [d.id for d in dependencies(cfg, cells["fm/badnet/Both/seed0"])] == ["fm/badnet/CLIP/seed0",
                                                                               "fm/badnet/First/seed0"]
    assert ids.index("fm/badnet/First/seed0") < ids.index("fm/badnet/Both/seed0")
    assert cell_config(cfg, cells["fm/badnet/Both/seed0"])["detect"]["within"]["method"] == "First"
    other = _within_grid()
    other["pretrain"]["defenses"]["First"]["detect"]["keep_fraction"] = 0.7  # another first pass: another cell
    assert _fp(parse_config(other), "Both") != _fp(cfg, "Both")
    assert "within" not in cell_config(cfg, cells["fm/badnet/First/seed0"])["detect"]
    for bad, match in (("CLIP", "'CLIP' is not another detect-then-train entry"),
                       ("Both", "'Both' is not another detect-then-train entry"),
                       ("Nope", "'Nope' is not another detect-then-train entry")):
        g = _within_grid()
        g["pretrain"]["defenses"]["Both"]["detect"]["within"] = bad
        with pytest.raises(ConfigError, match=match):
            parse_config(g)
    g = _within_grid()
    g["pretrain"]["defenses"]["Both"]["detect"]["relabel"] = 4
    with pytest.raises(ConfigError, match="within and relabel cannot be combined"):
        parse_config(g)
    # end to end: the kept pairs are those both rules keep
    cell, out = _run_tiny(_tiny(_within_grid(), fm_dir), tmp_path, cells=3)
    first, both = (json.loads((out / "runs" / "fm" / "badnet" / "seed0" / f"pretrain-{m}" / "detection.json").read_text())
                   for m in ("First", "Both"))
    keep = both["keep"]
    assert keep["within"] == "First" and cell("Both")["detection"]["keep"] == keep
    assert set(first["dropped_rows"]) <= set(both["dropped_rows"])
    assert keep["dropped"] == len(both["dropped_rows"]) and keep["dropped_by_within_only"] > 0
    assert cell("Both")["train_pairs"] == keep["kept"]
    # the kept column of its scores.csv is what trained: its own rule's keep, less First's drops
    with open(out / "runs" / "fm" / "badnet" / "seed0" / "pretrain-Both" / "scores.csv", newline="") as f:
        kept_col = [r["kept"] == "1" for r in csv.DictReader(f)]
    assert sum(kept_col) == keep["kept"]
    assert not any(kept_col[i] for i in both["dropped_rows"])
