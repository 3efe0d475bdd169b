import csv

import numpy as np
import pytest
from PIL import Image

from clipguard.data.classes import ClassInfo
from clipguard.data.csv_dataset import CsvSpec, load_csv, write_csv
from clipguard.data.fashion_mnist import CLASSES, load_split, materialise
from clipguard.errors import DataError


def test_materialise_is_lossless_and_balanced(fm_dir, fm_train):
    imgs, labels = load_split("train")
    rows = list(csv.DictReader(open(fm_dir / "train.csv"), delimiter="\t"))
    assert len(rows) == 512 == len(fm_train)
    i = int(rows[3]["filepath"].split("/")[1].split(".")[0])
    png = np.asarray(Image.open(fm_dir / rows[3]["filepath"]))
    assert (png == imgs[i]).all() and int(rows[3]["label"]) == labels[i]
    assert fm_train.images.shape == (512, 3, 28, 28) and fm_train.images.dtype.__str__() == "torch.uint8"
    counts = np.bincount(fm_train.labels.numpy(), minlength=10)
    assert counts.min() >= 50 and counts.max() <= 52
    assert len(set(fm_train.captions)) > 300  # captions are varied
    info = ClassInfo.load(fm_dir / "classes.json")
    assert info.classes == CLASSES and all("{}" in t for t in info.templates)


def test_materialise_same_seed_same_bytes(tmp_path):
    a = materialise(tmp_path / "a", train_size=40, test_size=20, seed=3)
    b = materialise(tmp_path / "b", train_size=40, test_size=20, seed=3)
    c = materialise(tmp_path / "c", train_size=40, test_size=20, seed=4)
    assert (a / "train.csv").read_bytes() == (b / "train.csv").read_bytes()
    assert (a / "train.csv").read_bytes() != (c / "train.csv").read_bytes()


def test_caption_mentions_its_class(fm_train):
    from clipguard.data.fashion_mnist import SYNONYMS

    for cap, lab in zip(fm_train.captions[:100], fm_train.labels[:100].tolist()):
        assert any(s in cap for s in SYNONYMS[CLASSES[lab]])


def test_every_zero_shot_class_name_is_a_caption_word():
    """Zero-shot prompts use the class names: each must be one of the words captions are made of
    (Fashion-MNIST's 'trouser' once was not, and its prompt was an untrained token)."""
    import random

    from clipguard.data.fashion_mnist import SYNONYMS, make_caption

    rng = random.Random(0)
    for label, name in enumerate(CLASSES):
        assert SYNONYMS[name][0] == name
        assert any(f" {name}" in make_caption(label, rng) for _ in range(200))


def _csv(tmp_path, rows, header=("filepath", "title", "label"), sep="\t"):
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "ok.png")
    write_csv(tmp_path / "d.csv", [dict(zip(header, r)) for r in rows], list(header), sep)
    return tmp_path / "d.csv"


@pytest.mark.parametrize("rows,field,row,msg", [
    ([("ok.png", "a cat", "1"), ("missing.png", "a dog", "2")], "filepath", 3, "not found"),
    ([("ok.png", "a cat", "1"), ("ok.png", "  ", "2")], "title", 3, "empty caption"),
    ([("ok.png", "a cat", "x")], "label", 2, "not an integer"),
])
def test_bad_rows_name_file_row_field(tmp_path, rows, field, row, msg):
    path = _csv(tmp_path, rows)
    with pytest.raises(DataError) as e:
        load_csv(path)
    assert e.value.row == row and e.value.field == field and str(path) in str(e.value) and msg in str(e.value)


def test_corrupt_image_and_skip_bad_rows(tmp_path):
    path = _csv(tmp_path, [("ok.png", "a cat", "1"), ("bad.png", "a dog", "2"), ("ok.png", "", "3")])
    (tmp_path / "bad.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match="cannot decode"):
        load_csv(path)
    data = load_csv(path, skip_bad_rows=True)
    assert len(data) == 1 and data.skipped == 2 and data.rows == [2]


def test_missing_column_and_wrong_separator(tmp_path):
    path = _csv(tmp_path, [("ok.png", "a cat", "1")], sep=",")
    with pytest.raises(DataError, match="comma-separated") as e:
        load_csv(path)
    assert e.value.field == "filepath"
    data = load_csv(path, CsvSpec(separator=","))
    assert data.captions == ["a cat"]
    with pytest.raises(DataError, match="column 'caption'"):
        load_csv(path, CsvSpec(separator=",", caption_key="caption"))


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="file not found"):
        load_csv(tmp_path / "nope.csv")


def test_resize_to_model_size(tmp_path):
    Image.fromarray(np.zeros((40, 60, 3), np.uint8)).save(tmp_path / "big.png")
    write_csv(tmp_path / "d.csv", [{"filepath": "big.png", "title": "x"}], ["filepath", "title"])
    assert load_csv(tmp_path / "d.csv", image_size=28).images.shape == (1, 3, 28, 28)


def test_classinfo_index(fm_dir):
    info = ClassInfo.load(fm_dir / "classes.json")
    assert info.index("bag") == 8 and info.index("handbag") == 8 and info.index(3) == 3
    with pytest.raises(DataError, match="unknown class"):
        info.index("giraffe")
