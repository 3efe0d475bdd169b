"""``clipguard scan`` end to end on a small poisoned Fashion-MNIST CSV with an untrained model."""

from __future__ import annotations

import csv
import json

import pytest

from clipguard.cli import main
from clipguard.errors import ConfigError

pytestmark = pytest.mark.usefixtures("one_thread")

N = 512 + 12  # BadNet injects its 12 poisons next to the 512 clean pairs
DETECTORS = ["caption-agreement", "dao", "ensemble", "iforest", "kdist", "lid", "mixture", "repeat", "similarity", "slof", "spectral"]


@pytest.fixture(scope="module")
def poisoned(fm_dir, tmp_path_factory):
    """A BadNet-poisoned copy (12 injected pairs) of the session's 512-pair CSV and a tiny untrained checkpoint."""
    from clipguard import attacks
    from clipguard.models.checkpoint import save_checkpoint
    from clipguard.models.factory import create_model

    root = tmp_path_factory.mktemp("scan")
    attacks.poison_csv(fm_dir / "train.csv", "badnet", target="bag", count=12, seed=0, out=root / "p",
                       eval_csv=fm_dir / "test.csv")
    save_checkpoint(root / "ck", create_model("cg-nano", seed=0), state={"model": "cg-nano"})
    return root


def _scan(root, out, *extra):
    return main(["scan", "--data", str(root / "p" / "train.csv"), "--checkpoint", str(root / "ck"),
                 "--out", str(out), "--device", "cpu", "--quiet", *extra])


def _rows(path, delimiter=","):
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f, delimiter=delimiter))


def test_scan_writes_scores_kept_and_metrics(poisoned, tmp_path, capsys):
    from clipguard.data.csv_dataset import CsvSpec, load_csv, read_rows

    out = tmp_path / "scan"
    manifest = poisoned / "p" / "manifest.json"
    assert _scan(poisoned, out, "--attack-manifest", str(manifest), "--top", "20") == 0
    assert "kept" in capsys.readouterr().out
    summary = json.loads((out / "scan.json").read_text())
    assert list(summary["detectors"]) == DETECTORS and summary["n_pairs"] == N
    assert summary["n_poisoned"] == 12 and summary["keep"]["detector"] == "dao"
    for rec in summary["detectors"].values():
        assert {"auroc", "auprc", "tpr@1%fpr", "precision@k"} <= rec["metrics"].keys()
        assert rec["pairs_per_s"] > 0 and rec["keep"]["kept"] > 0
        assert 0.0 <= rec["metrics"]["auroc"] <= 1.0
    # scores.csv: one row per pair, a score and a rank per detector, the truth from the manifest
    scores = _rows(out / "scores.csv")
    assert len(scores) == N
    assert sum(int(r["poisoned"]) for r in scores) == 12
    assert sorted(int(r["dao_rank"]) for r in scores) == list(range(1, N + 1))
    bad_rows = json.loads(manifest.read_text())["poisoned_rows"]
    assert {int(r["row"]) for r in scores if r["poisoned"] == "1"} == set(bad_rows)
    # kept.csv: the input's columns and separator, loadable as it is, the keep rule's rows
    kept = load_csv(out / "kept.csv")
    assert read_rows(out / "kept.csv", CsvSpec())[0] == read_rows(poisoned / "p" / "train.csv", CsvSpec())[0]
    assert len(kept) == summary["keep"]["kept"] == sum(int(r["kept"]) for r in scores)
    kept_captions = [r["caption"] for r in scores if r["kept"] == "1"]
    assert kept.captions == kept_captions
    # suspicious.csv: the top rows by the keep detector's score, highest first
    top = _rows(out / "suspicious.csv")
    assert len(top) == 20 and [int(r["rank"]) for r in top] == list(range(1, 21))
    by_rank = sorted(scores, key=lambda r: int(r["dao_rank"]))[:20]
    assert [r["row"] for r in top] == [r["row"] for r in by_rank]
    assert (out / "plots" / "score_hist.png").stat().st_size > 0 and (out / "plots" / "roc.png").is_file()


def test_existing_scan_needs_overwrite_and_fraction_overrides_the_rule(poisoned, tmp_path, capsys):
    from clipguard.detection import scan

    out = tmp_path / "scan"
    assert _scan(poisoned, out, "--detector", "similarity", "--attack-manifest",
                 str(poisoned / "p" / "manifest.json")) == 0
    assert (out / "plots" / "roc.png").is_file()
    capsys.readouterr()
    assert _scan(poisoned, out, "--detector", "kdist") == 2
    err = capsys.readouterr().err
    assert "scan.json exists" in err and "--overwrite" in err and "Traceback" not in err
    # the Python function is the command: a fraction replaces the keep rule; old plots go
    summary = scan(poisoned / "p" / "train.csv", poisoned / "ck", out, detectors=["kdist", "lid"],
                   options={"kdist": {"k": "8"}}, keep_fraction=0.9, overwrite=True, device="cpu",
                   progress=False)
    assert list(summary["detectors"]) == ["kdist", "lid"] and summary["keep"]["detector"] == "kdist"
    assert summary["keep"]["rule"] == "fraction" and summary["keep"]["kept"] == 471
    assert summary["detectors"]["kdist"]["options"]["k"] == 8 and "metrics" not in summary["detectors"]["kdist"]
    assert not (out / "plots" / "roc.png").exists()
    assert len(_rows(out / "kept.csv", "\t")) == 471
    assert json.loads((out / "scan.json").read_text())["keep"]["kept"] == 471


@pytest.mark.parametrize("args, message", [
    (["--detector", "nope"], "unknown detector 'nope'; choose one of: caption-agreement, dao, ensemble, iforest"),
    (["--detector-option", "dao.kk=3"], "detector 'dao' has no option 'kk' (did you mean 'k'?)"),
    (["--detector-option", "dao.k=many"], "option 'k' must be an integer"),
    (["--detector-option", "dao=3"], "expected DETECTOR.KEY=VALUE"),
    (["--detector", "kdist", "--detector-option", "lid.k=3"], "'lid', which is not among the detectors run"),
    (["--detector", "kdist", "--keep-detector", "dao"], "--keep-detector 'dao' is not among"),
    (["--keep-fraction", "1.5"], "--keep-fraction must be in (0, 1]"),
    (["--detector", "kdist", "--veto-detector", "kdist"], "--veto-detector 'kdist' is the keep detector"),
    (["--veto-detector", "nope"], "unknown detector 'nope'"),
    (["--combine", "median"], "--combine must be one of mean, max, got 'median'"),
    (["--detector", "shift"], "detector 'shift' compares the model with a reference model: give --reference"),
    (["--attack-manifest", "missing.json"], "missing.json: attack manifest not found"),
    (["--neighbour-search", "ivf", "--nprobe", "0"], "--neighbour-search: neighbour search: nprobe must be >= 1, got 0"),
])
def test_bad_settings_are_one_line_errors(poisoned, tmp_path, capsys, args, message):
    assert _scan(poisoned, tmp_path / "scan", *args) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and err.count("\n") == 1
    assert not (tmp_path / "scan").exists()


def test_a_veto_detector_runs_and_drops_what_its_rule_rejects(poisoned, tmp_path, capsys):
    out = tmp_path / "scan"
    assert _scan(poisoned, out, "--detector", "similarity", "--veto-detector", "repeat",
                 "--detector-option", "repeat.z=0.5", "--keep-fraction", "0.95") == 0
    assert "+ repeat veto" in capsys.readouterr().out
    summary = json.loads((out / "scan.json").read_text())
    assert list(summary["detectors"]) == ["similarity", "repeat"]
    keep = summary["keep"]
    veto = keep["vetoes"][0]
    assert keep["detector"] == "similarity" and veto["detector"] == "repeat" and veto["z"] == 0.5
    rows = _rows(out / "scores.csv")
    assert keep["kept"] == sum(int(r["kept"]) for r in rows)
    rejected = {r["row"] for r in rows if float(r["repeat_score"]) > veto["threshold"]}
    assert len(rejected) == veto["rejected"] >= veto["dropped_by_it_alone"] > 0
    assert not rejected & {r["row"] for r in rows if r["kept"] == "1"}
    assert keep["kept"] + veto["dropped_by_it_alone"] in (int(0.95 * N), int(0.95 * N) + 1)


def test_the_python_api_scans_like_the_command(poisoned, tmp_path):
    import clipguard

    summary = clipguard.scan(poisoned / "p" / "train.csv", poisoned / "ck", tmp_path / "api", detectors=["similarity"],
                             keep_fraction=0.9, veto_detectors=["repeat"], device="cpu", top=5)
    assert _scan(poisoned, tmp_path / "cli", "--detector", "similarity", "--keep-fraction", "0.9",
                 "--veto-detector", "repeat", "--top", "5") == 0
    cli, api = (json.loads((tmp_path / d / "scan.json").read_text()) for d in ("cli", "api"))
    assert summary["keep"]["kept"] == cli["keep"]["kept"] and api["keep"]["vetoes"] == cli["keep"]["vetoes"]
    assert len(_rows(tmp_path / "api" / "suspicious.csv")) == 5
    with pytest.raises(ConfigError, match="--veto-detector 'similarity' is the keep detector"):
        clipguard.scan(poisoned / "p" / "train.csv", poisoned / "ck", tmp_path / "bad", detectors=["similarity"],
                       veto_detectors=["similarity"], device="cpu")


def test_bad_data_file_names_the_file(poisoned, tmp_path, capsys):
    rc = main(["scan", "--data", str(tmp_path / "none.csv"), "--checkpoint", str(poisoned / "ck"),
               "--out", str(tmp_path / "scan"), "--device", "cpu", "--quiet"])
    assert rc == 2 and "none.csv: file not found" in capsys.readouterr().err


def test_scan_in_pixel_space_finds_targeted_copies_with_noise(fm_dir, poisoned, tmp_path):
    """TDPA copies each with their own noise, scanned with repeat in the pixel signatures: every
    copy ranks above every clean pair, with an untrained model (the signatures need none)."""
    from clipguard import attacks

    attacks.poison_csv(fm_dir / "train.csv", "tdpa", target="bag", count=12, seed=0, out=tmp_path / "t",
                       eval_csv=fm_dir / "test.csv", options={"targets": 2, "jitter": 32})
    out = tmp_path / "scan"
    assert main(["scan", "--data", str(tmp_path / "t" / "train.csv"), "--checkpoint", str(poisoned / "ck"),
                 "--out", str(out), "--device", "cpu", "--quiet", "--detector", "repeat",
                 "--detector-option", "repeat.space=pixels", "--attack-manifest",
                 str(tmp_path / "t" / "manifest.json")]) == 0
    rec = json.loads((out / "scan.json").read_text())["detectors"]["repeat"]
    assert rec["options"]["space"] == "pixels" and rec["metrics"]["auroc"] == 1.0
    assert rec["keep"]["poisons_kept"] == 0


def test_rank_shares_and_combined_scans():
    """Rank shares put every model's scores on one scale (ties share their mean rank); combining
    a scan with itself changes no ranking and no keep decision; two models' rules keep a pair only
    if both keep it."""
    import numpy as np

    from clipguard.detection.base import PairFeatures, build
    from clipguard.detection.runner import combine_results, rank_shares, scan_features

    assert np.allclose(rank_shares(np.array([0.5, 0.1, 0.9, 0.1])), [0.75, 0.375, 1.0, 0.375])
    rng = np.random.default_rng(0)
    import torch

    def feats(seed):
        g = torch.Generator().manual_seed(seed)
        return PairFeatures(torch.nn.functional.normalize(torch.randn(60, 8, generator=g), dim=1),
                            torch.nn.functional.normalize(torch.randn(60, 8, generator=g), dim=1))

    dets = [build("similarity"), build("kdist", {"k": 4})]
    poisoned = rng.random(60) < 0.2
    a = scan_features(feats(0), dets, keep_detector="similarity", poisoned=poisoned, progress=False)
    same = combine_results([a, a], poisoned=poisoned)
    for r, s in zip(a.runs, same.runs):
        assert np.array_equal(np.argsort(-r.scores, kind="stable"), np.argsort(-s.scores, kind="stable"))
        assert np.array_equal(r.keep.mask, s.keep.mask) and s.keep.rule["rule"] == "every_model"
        assert s.metrics["auroc"] == pytest.approx(r.metrics["auroc"])
    b = scan_features(feats(1), dets, keep_detector="similarity", poisoned=poisoned, progress=False)
    both = combine_results([a, b], keep_fraction=0.8, veto_detectors=["kdist"], poisoned=poisoned)
    kd = both.runs[1]
    assert np.array_equal(kd.keep.mask, a.runs[1].keep.mask & b.runs[1].keep.mask)
    assert np.allclose(both.runs[0].scores, (rank_shares(a.runs[0].scores) + rank_shares(b.runs[0].scores)) / 2)
    assert both.keep.rule["rule"] == "fraction" and both.keep.rule["vetoes"][0]["detector"] == "kdist"
    assert not (both.keep.mask & ~kd.keep.mask).any()
    # the largest rank share: a pair is kept only if both models rank it low
    most = combine_results([a, b], keep_fraction=0.5, combine="max", poisoned=poisoned)
    ra, rb = rank_shares(a.runs[0].scores), rank_shares(b.runs[0].scores)
    assert np.allclose(most.runs[0].scores, np.maximum(ra, rb))
    kept = most.keep.mask
    assert kept.sum() == 30 and np.maximum(ra, rb)[kept].max() <= np.maximum(ra, rb)[~kept].min()
    assert np.array_equal(most.runs[1].keep.mask, both.runs[1].keep.mask)  # own rules: every model keeps
    with pytest.raises(ConfigError, match="--combine must be one of mean, max, got 'median'"):
        combine_results([a, b], combine="median")


def test_scan_with_two_models(poisoned, tmp_path, capsys):
    """--checkpoint twice: both models encode the pairs; scan.json names them and gives each
    model's own metrics beside the combined ones."""
    from clipguard.models.checkpoint import save_checkpoint
    from clipguard.models.factory import create_model

    save_checkpoint(tmp_path / "ck2", create_model("cg-tiny", seed=1), state={"model": "cg-tiny"})
    out = tmp_path / "scan"
    assert _scan(poisoned, out, "--checkpoint", str(tmp_path / "ck2"), "--detector", "similarity,caption-agreement",
                 "--attack-manifest", str(poisoned / "p" / "manifest.json"), "--keep-fraction", "0.9") == 0
    summary = json.loads((out / "scan.json").read_text())
    assert summary["models"] == ["cg-nano", "cg-tiny"] and len(summary["checkpoints"]) == 2
    assert "mean of its rank shares" in summary["combined"] and summary["combine"] == "mean"
    for rec in summary["detectors"].values():
        assert len(rec["per_model"]) == 2 and all(0 <= m["auroc"] <= 1 for m in rec["per_model"])
        assert rec["keep"]["rule"] == "every_model"
    scores = _rows(out / "scores.csv")
    assert sorted(int(r["similarity_rank"]) for r in scores) == list(range(1, N + 1))
    assert summary["keep"]["kept"] == sum(int(r["kept"]) for r in scores) in (int(0.9 * N), int(0.9 * N) + 1)
    mean_scores = {r["row"]: float(r["similarity_score"]) for r in scores}
    out_max = tmp_path / "scan-max"
    assert _scan(poisoned, out_max, "--checkpoint", str(tmp_path / "ck2"), "--detector", "similarity",
                 "--keep-fraction", "0.9", "--combine", "max") == 0
    summary = json.loads((out_max / "scan.json").read_text())
    assert summary["combine"] == "max" and "largest of its rank shares" in summary["combined"]
    max_scores = {r["row"]: float(r["similarity_score"]) for r in _rows(out_max / "scores.csv")}
    assert all(max_scores[k] >= mean_scores[k] - 1e-6 for k in mean_scores)  # the max is never below the mean
    assert any(max_scores[k] > mean_scores[k] + 1e-6 for k in mean_scores)
    capsys.readouterr()
    assert _scan(poisoned, tmp_path / "one", "--detector", "similarity", "--combine", "max") == 2
    assert "--combine max: combines the scores of several models" in capsys.readouterr().err
    # models of different image sizes cannot score one decoded set
    save_checkpoint(tmp_path / "ck224", create_model("cg-tiny-224", seed=0), state={"model": "cg-tiny-224"})
    capsys.readouterr()
    assert _scan(poisoned, tmp_path / "bad", "--checkpoint", str(tmp_path / "ck224"), "--detector", "similarity") == 2
    assert "the models take images of different sizes ([28, 224])" in capsys.readouterr().err


def test_scan_with_a_reference_model(poisoned, tmp_path, capsys):
    """--reference: a second model encodes the pairs once; ``shift`` reads it, the default set
    then includes ``shift``, and scan.json names the reference."""
    from clipguard.models.checkpoint import save_checkpoint
    from clipguard.models.factory import create_model

    save_checkpoint(tmp_path / "ref", create_model("cg-nano", seed=3), state={"model": "cg-nano"})
    out = tmp_path / "scan"
    assert _scan(poisoned, out, "--reference", str(tmp_path / "ref"), "--detector", "shift,similarity",
                 "--attack-manifest", str(poisoned / "p" / "manifest.json")) == 0
    summary = json.loads((out / "scan.json").read_text())
    assert summary["reference"] == str(tmp_path / "ref") and summary["reference_model"] == "cg-nano"
    assert list(summary["detectors"]) == ["shift", "similarity"] and summary["keep"]["detector"] == "shift"
    assert 0 <= summary["detectors"]["shift"]["metrics"]["auroc"] <= 1
    scores = _rows(out / "scores.csv")
    assert sorted(int(r["shift_rank"]) for r in scores) == list(range(1, N + 1))
    based = tmp_path / "scan-based"
    assert _scan(poisoned, based, "--reference", str(tmp_path / "ref"), "--detector", "shift",
                 "--detector-option", "shift.baseline=reference") == 0
    assert json.loads((based / "scan.json").read_text())["detectors"]["shift"]["options"]["baseline"] == "reference"
    assert [r["shift_score"] for r in _rows(based / "scores.csv")] != [r["shift_score"] for r in scores]
    out_all = tmp_path / "scan-all"
    assert _scan(poisoned, out_all, "--reference", str(tmp_path / "ref")) == 0
    assert "shift" in json.loads((out_all / "scan.json").read_text())["detectors"]
    import clipguard

    clipguard.scan(poisoned / "p" / "train.csv", poisoned / "ck", tmp_path / "api", detectors=["shift", "similarity"],
                   reference=tmp_path / "ref", device="cpu")
    api = _rows(tmp_path / "api" / "scores.csv")
    assert [r["shift_score"] for r in api] == [r["shift_score"] for r in scores]


def test_a_second_scan_within_the_first_keeps_only_what_both_keep(poisoned, tmp_path, capsys):
    first, second = tmp_path / "first", tmp_path / "second"
    assert _scan(poisoned, first, "--detector", "similarity", "--keep-fraction", "0.8") == 0
    assert _scan(poisoned, second, "--detector", "caption-agreement", "--keep-fraction", "0.8",
                 "--within", str(first)) == 0
    assert f"within {first}" in capsys.readouterr().out
    a, b = _rows(first / "scores.csv"), _rows(second / "scores.csv")
    assert [r["row"] for r in a] == [r["row"] for r in b]
    own = [float(r["caption-agreement_rank"]) for r in b]  # rank 1 = the most suspicious
    own_keep = [rk > N - int(0.8 * N) for rk in own]
    want = [r["kept"] == "1" and k for r, k in zip(a, own_keep)]
    assert [r["kept"] == "1" for r in b] == want
    keep = json.loads((second / "scan.json").read_text())["keep"]
    assert keep["within"] == str(first) and keep["kept"] == sum(want)
    assert keep["dropped_by_within_only"] == sum(k and r["kept"] == "0" for r, k in zip(a, own_keep)) > 0
    assert len(_rows(second / "kept.csv")) == keep["kept"]
    # not a finished scan, its own --out, other rows: clear errors, nothing written
    for within, extra, message in ((tmp_path / "nothing", (), "not a finished scan"),
                                   (tmp_path / "third", (), "is the --out of this scan"),
                                   (first, ("--limit", "100"), "that scan read 524 rows, this one 100")):
        assert _scan(poisoned, tmp_path / "third", "--detector", "similarity", "--within", str(within), *extra) != 0
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err
        assert not (tmp_path / "third").exists()


def test_an_approximate_search_scores_like_the_exact_one_and_reports_its_recall(poisoned, tmp_path, capsys):
    pytest.importorskip("faiss")
    args = ["--detector", "caption-agreement", "--detector", "kdist", "--detector", "similarity"]
    assert _scan(poisoned, tmp_path / "exact", *args) == 0
    assert _scan(poisoned, tmp_path / "ivf", *args, "--neighbour-search", "ivf", "--nlist", "13") == 0
    summary = json.loads((tmp_path / "ivf" / "scan.json").read_text())
    search = summary["neighbour_search"]
    assert search["method"] == "ivf"
    found = search["searches"]["image/l2"]
    assert found["method"] == "ivf" and found["nlist"] == 13 and found["nprobe"] == 13 and found["k"] == 64
    assert found["recall_at_k"] == 1.0  # every cell probed: every neighbour found
    exact = json.loads((tmp_path / "exact" / "scan.json").read_text())["neighbour_search"]
    assert exact == {"method": "exact", "searches": {"image/l2": {"method": "exact", "k": 64}}}
    a, b = _rows(tmp_path / "exact" / "scores.csv"), _rows(tmp_path / "ivf" / "scores.csv")
    for name in ("caption-agreement", "kdist"):
        assert [float(r[f"{name}_score"]) for r in a] == pytest.approx([float(r[f"{name}_score"]) for r in b], abs=1e-4)


def test_scan_with_the_pattern_detector_reads_the_images(poisoned, tmp_path):
    """``pattern`` runs only when named, reads the images' high-passed pixels and, seeded by a
    reference-free detector, ranks every pair; its suspects' detector options pass through."""
    out = tmp_path / "scan"
    assert _scan(poisoned, out, "--detector", "pattern", "--detector-option", "pattern.suspects_from=similarity",
                 "--detector-option", "pattern.clusters=5", "--attack-manifest",
                 str(poisoned / "p" / "manifest.json")) == 0
    summary = json.loads((out / "scan.json").read_text())
    assert list(summary["detectors"]) == ["pattern"]
    assert summary["detectors"]["pattern"]["options"]["suspects_from"] == "similarity"
    assert 0 <= summary["detectors"]["pattern"]["metrics"]["auroc"] <= 1
    assert sorted(int(r["pattern_rank"]) for r in _rows(out / "scores.csv")) == list(range(1, N + 1))
    assert _scan(poisoned, tmp_path / "bad", "--detector", "pattern", "--detector-option",
                 "pattern.suspects_from=shift") == 2  # its suspects need a reference
    knn = tmp_path / "knn"  # the suspects' own options pass through, value and all
    assert _scan(poisoned, knn, "--detector", "pattern", "--detector-option", "pattern.suspects_options=k=8",
                 "--detector-option", "pattern.clusters=5") == 0
    assert json.loads((knn / "scan.json").read_text())["detectors"]["pattern"]["options"]["suspects_options"] == "k=8"
