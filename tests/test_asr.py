"""The ASR protocol on a model with hand-built embeddings, so every number is known exactly."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from clipguard.data.classes import ClassInfo
from clipguard.data.csv_dataset import ImageCaptionData, write_csv
from clipguard.errors import DataError
from clipguard.evaluation.asr import asr_for_model, asr_ks, hits_at_k
from clipguard.evaluation.intervals import wilson_ci95
from clipguard.tensors import OPENAI_MEAN, OPENAI_STD

CLASSES = ["zero", "one", "two", "three", "four", "five"]
TARGET = 2


class HandBuiltCLIP(torch.nn.Module):
    """Image embedding = the RGB values of pixels (0,0) and (0,1), i.e. six numbers we choose;
    text embedding = one-hot of the class named in the prompt. So the zero-shot ranking of an
    image is the order of its six numbers."""

    def __init__(self):
        super().__init__()
        self.visual = SimpleNamespace(image_size=4)
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def encode_image(self, x: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        mean = torch.tensor(OPENAI_MEAN).view(1, 3)
        std = torch.tensor(OPENAI_STD).view(1, 3)
        px = torch.cat([x[:, :, 0, 0] * std + mean, x[:, :, 0, 1] * std + mean], 1)
        return torch.nn.functional.normalize(px, dim=1) if normalize else px

    def encode_text(self, tokens: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        return torch.nn.functional.one_hot(tokens[:, 0], len(CLASSES)).float()


def tokenizer(texts: list[str]) -> torch.Tensor:
    ids = []
    for t in texts:
        words = t.replace(".", " ").split()
        ids.append([next(i for i, c in enumerate(CLASSES) if c in words)])
    return torch.tensor(ids)


def image(scores: list[int]) -> np.ndarray:
    """4x4 RGB whose pixels (0,0),(0,1) carry the six class scores (uint8)."""
    a = np.full((4, 4, 3), 7, dtype=np.uint8)
    a[0, 0], a[0, 1] = scores[:3], scores[3:]
    return a


def ranked(order: list[int]) -> list[int]:
    """Scores that rank the classes in ``order`` (first = highest)."""
    vals = [230, 128, 100, 75, 50, 25]
    out = [0] * 6
    for v, c in zip(vals, order):
        out[c] = v
    return out


# (true label, triggered ranking, clean ranking); target = 2
BACKDOOR_ROWS = [
    (0, [2, 0, 1, 3, 4, 5], [0, 1, 3, 4, 5, 2]),   # target 1st: hit @1 @3 @5
    (1, [1, 2, 0, 3, 4, 5], [1, 0, 3, 4, 5, 2]),   # target 2nd: hit @3 @5
    (3, [3, 0, 1, 2, 4, 5], [3, 0, 1, 4, 2, 5]),   # target 4th: hit @5 only (clean: 5th -> hit @5)
    (4, [4, 0, 1, 3, 5, 2], [4, 0, 1, 3, 5, 2]),   # target last: no hit
    (2, [2, 0, 1, 3, 4, 5], [2, 0, 1, 3, 4, 5]),   # target-class image: must be left out
]


def write_set(root: Path, rows, kind: str) -> dict:
    (root / "asr_eval").mkdir(parents=True)
    (root / "eval_clean").mkdir()
    out = []
    for j, (lab, trig, clean) in enumerate(rows):
        Image.fromarray(image(ranked(trig))).save(root / f"asr_eval/{j}.png")
        Image.fromarray(image(ranked(clean))).save(root / f"eval_clean/{j}.png")
        out.append({"filepath": f"asr_eval/{j}.png", "title": "x", "label": str(lab), "target": str(TARGET),
                    "trigger": "" if kind == "tdpa" else "badnet", "clean_filepath": f"eval_clean/{j}.png",
                    "eval_row": str(j)})
    write_csv(root / "asr_eval.csv", out, list(out[0]))
    ClassInfo(classes=CLASSES, templates=["a photo of a {}.", "a {}."]).save(root / "classes.json")
    return {"attack": "badnet" if kind == "backdoor" else "tdpa", "params": {}, "seed": 0,
            "target": {"index": TARGET, "name": "two"}, "target_captions": [], "poisoned_rows": [],
            "mode": "inject", "source_csv": "", "source_sha256": "", "clipguard_version": "test",
            "classes": "classes.json", "_dir": str(root),
            "eval": {"csv": "asr_eval.csv", "kind": kind, "n_images": len(rows)}}


def test_ks_follow_the_number_of_classes():
    assert asr_ks(6) == [1, 3, 5] and asr_ks(10) == [1, 3, 5] and asr_ks(11) == [1, 3, 5, 10]
    assert asr_ks(3) == [1] and asr_ks(2) == [1]
    s = torch.tensor([[0.1, 0.9, 0.5], [0.9, 0.1, 0.5]])
    assert hits_at_k(s, torch.tensor([2, 2]), 1).tolist() == [False, False]
    assert hits_at_k(s, torch.tensor([2, 2]), 2).tolist() == [True, True]


def test_backdoor_asr_is_exact_and_excludes_the_target_class(tmp_path):
    m = write_set(tmp_path, BACKDOOR_ROWS, "backdoor")
    r = asr_for_model(HandBuiltCLIP(), "hand", m, tokenizer=tokenizer)["zeroshot"]
    assert r["asr@1"] == 0.25 and r["asr@3"] == 0.5 and r["asr@5"] == 0.75
    assert r["clean_rate@1"] == 0.0 and r["clean_rate@3"] == 0.0 and r["clean_rate@5"] == 0.25
    assert r["triggered_accuracy@1"] == 0.75 and r["clean_accuracy@1"] == 1.0
    assert r["n"] == 4 and r["n_success@1"] == 1 and r["asr@1_ci95"] == wilson_ci95(1, 4)
    p = r["protocol"]
    assert p["n_images"] == 4 and p["ks"] == [1, 3, 5] and p["kind"] == "backdoor"
    assert p["excluded_class"] == [{"index": 2, "name": "two"}] and p["triggers"] == ["badnet"]


def test_linear_probe_asr_uses_a_probe_fit_on_clean_features(tmp_path):
    m = write_set(tmp_path, BACKDOOR_ROWS, "backdoor")
    rng = np.random.default_rng(0)
    imgs, labels = [], []
    for c in range(6):
        for _ in range(15):
            s = rng.integers(10, 60, 6)
            s[c] = 230
            imgs.append(torch.from_numpy(image(s.tolist())).permute(2, 0, 1))
            labels.append(c)
    probe = ImageCaptionData(images=torch.stack(imgs), captions=["x"] * len(labels),
                             labels=torch.tensor(labels), paths=[""] * len(labels), source="probe")
    r = asr_for_model(HandBuiltCLIP(), "hand", m, tokenizer=tokenizer, probe_data=probe)
    lp = r["linear_probe"]
    assert lp["asr@1"] == 0.25 and lp["clean_rate@1"] == 0.0
    assert lp["protocol"]["n_images"] == 4 and "logistic regression" in lp["protocol"]["classifier"]
    assert "chosen on a" in lp["protocol"]["classifier"]  # C from the probe's validation split
    assert lp["n"] == 4 and lp["asr@1_ci95"] == wilson_ci95(1, 4)


def test_tdpa_asr_is_top1_of_the_target_images(tmp_path):
    rows = [(0, [2, 0, 1, 3, 4, 5], [0] + [1, 2, 3, 4, 5]),
            (1, [1, 2, 0, 3, 4, 5], [1, 0, 2, 3, 4, 5]),
            (4, [2, 4, 1, 3, 0, 5], [4, 2, 1, 3, 0, 5])]
    m = write_set(tmp_path, rows, "tdpa")
    r = asr_for_model(HandBuiltCLIP(), "hand", m, tokenizer=tokenizer)["zeroshot"]
    assert r["asr@1"] == pytest.approx(2 / 3, abs=1e-6) and r["n_success"] == 2
    assert r["n"] == 3 and r["asr@1_ci95"] == wilson_ci95(2, 3)
    assert [t["predicted"] for t in r["per_target"]] == ["two", "one", "two"]
    assert r["protocol"]["ks"] == [1] and r["protocol"]["n_images"] == 3


def test_missing_eval_section_is_a_clear_error(tmp_path):
    m = write_set(tmp_path, BACKDOOR_ROWS, "backdoor")
    del m["eval"]
    with pytest.raises(DataError, match="--eval-data"):
        asr_for_model(HandBuiltCLIP(), "hand", m, tokenizer=tokenizer)


def test_evaluate_command_reports_attack_metrics_with_protocol(fm_dir, tmp_path):
    """``clipguard evaluate --attack-manifest`` end to end on an untrained tiny model."""
    import json

    from clipguard import attacks
    from clipguard.cli import main
    from clipguard.models.checkpoint import save_checkpoint
    from clipguard.models.factory import create_model

    save_checkpoint(tmp_path / "ckpt", create_model("cg-tiny", seed=0), state={"model": "cg-tiny"})
    attacks.poison_csv(fm_dir / "train.csv", "badnet", target="bag", count=5, seed=0, out=tmp_path / "p",
                       eval_csv=fm_dir / "test.csv")
    rc = main(["evaluate", "--checkpoint", str(tmp_path / "ckpt"), "--data", str(fm_dir / "test.csv"),
               "--attack-manifest", str(tmp_path / "p" / "manifest.json"), "--out", str(tmp_path / "r.json")])
    assert rc == 0
    a = json.loads((tmp_path / "r.json").read_text())["metrics"]["attack"]
    test_labels = [int(r.split("\t")[2]) for r in (fm_dir / "test.csv").read_text().splitlines()[1:]]
    n = sum(lab != 8 for lab in test_labels)
    for block in ("zeroshot", "linear_probe"):
        assert a[block]["protocol"]["n_images"] == n and a[block]["protocol"]["ks"] == [1, 3, 5]
        assert a[block]["protocol"]["excluded_class"] == [{"index": 8, "name": "bag"}]
        assert 0.0 <= a[block]["asr@1"] <= a[block]["asr@3"] <= a[block]["asr@5"] <= 1.0
    assert "512 images" in a["linear_probe"]["protocol"]["classifier"]   # probe on the clean source CSV
