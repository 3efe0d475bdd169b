"""Bad input on the data side of the CLI: a clear error (exit 2, file/row/field named, no traceback,
nothing written, the input untouched) or a counted skip; never a silently wrong result."""

from __future__ import annotations

import csv
import io
import json
import shutil
import struct
import tarfile
import zlib
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
from _attack_data import make_dataset
from PIL import Image

from clipguard.cli import main
from clipguard.data.classes import ClassInfo
from clipguard.data.csv_dataset import CsvSpec, ImageCaptionData, load_csv, require_labels, write_csv
from clipguard.errors import ConfigError, DataError

HEADER = ["filepath", "title", "label"]


# ------------------------------------------------------------------------------------------ helpers
@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("syn") / "syn")[0].parent


@pytest.fixture
def ds(base, tmp_path) -> Path:
    """A private copy of the synthetic dataset (60 train rows, 3 classes); returns its folder."""
    shutil.copytree(base, tmp_path / "d")
    return tmp_path / "d"


def rows_of(csv_path: Path) -> list[dict[str, str]]:
    with open(csv_path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f, delimiter="\t"))


def rewrite(csv_path: Path, edit: Callable[[list[dict[str, str]]], None], header=HEADER) -> None:
    rows = rows_of(csv_path)
    edit(rows)
    write_csv(csv_path, rows, list(header))


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def cli(argv: list[str], capsys) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def poison(data: Path, out: Path, *extra) -> list:
    return ["poison", "--data", data, "--attack", "badnet", "--target", "star", "--count", "2",
            "--opt", "size=3", "--out", out, *extra]


def bomb_png(path: Path, side: int = 100_000) -> None:
    """A valid 1x1 PNG whose header claims side x side pixels (a decompression bomb)."""
    buf = io.BytesIO()
    Image.new("L", (1, 1)).save(buf, format="PNG")
    b = bytearray(buf.getvalue())
    b[16:24] = struct.pack(">II", side, side)                    # IHDR width, height
    b[29:33] = struct.pack(">I", zlib.crc32(bytes(b[12:29])))     # IHDR CRC
    path.write_bytes(bytes(b))


def truncated_png(path: Path) -> None:
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (12, 12, 3), dtype=np.uint8)).save(path)
    path.write_bytes(path.read_bytes()[:60])  # header intact, pixel data cut


# ------------------------------------------------------------------- bad CSVs: exit 2, row and field
def _latin1_caption(d: Path) -> None:
    rows = rows_of(d / "train.csv")
    rows[4]["title"] = "a café photo of a star"
    text = "\t".join(HEADER) + "\n" + "".join("\t".join(r[k] for k in HEADER) + "\n" for r in rows)
    (d / "train.csv").write_bytes(text.encode("latin-1"))


def _set(i: int, key: str, value: str) -> Callable[[Path], None]:
    def edit(d: Path) -> None:
        rewrite(d / "train.csv", lambda rows: rows[i].__setitem__(key, value))
    return edit


def _bomb(d: Path) -> None:
    bomb_png(d / rows_of(d / "train.csv")[2]["filepath"])


def _symlink_out(d: Path) -> None:
    Image.new("RGB", (12, 12)).save(d.parent / "secret.png")
    (d / "train" / "link.png").symlink_to(d.parent / "secret.png")
    _set(3, "filepath", "train/link.png")(d)


def _abs_outside(d: Path) -> None:
    Image.new("RGB", (12, 12)).save(d.parent / "secret.png")
    _set(1, "filepath", str(d.parent / "secret.png"))(d)


BAD_CSV = [  # (id, edit, row, field, words in the message)
    ("latin1", _latin1_caption, 6, "title", ["not UTF-8", "re-save"]),
    ("bomb", _bomb, 4, "filepath", ["decompression bomb"]),
    ("dotdot", _set(0, "filepath", "../../etc/passwd"), 2, "filepath", ["outside the dataset root",
                                                                        "--allow-outside-root"]),
    ("absolute", _abs_outside, 3, "filepath", ["outside the dataset root"]),
    ("symlink", _symlink_out, 5, "filepath", ["outside the dataset root"]),
    ("unknown-name", _set(7, "label", "giraffe"), 9, "label", ["'giraffe'", "classes.json"]),
    ("index-range", _set(2, "label", "7"), 4, "label", ["out of range", "3 classes"]),
    ("negative", _set(2, "label", "-4"), 4, "label", ["negative"]),
]


@pytest.mark.parametrize("edit,row,field,words", [c[1:] for c in BAD_CSV], ids=[c[0] for c in BAD_CSV])
def test_bad_csv_exits_2_naming_file_row_field(ds, tmp_path, capsys, edit, row, field, words):
    edit(ds)
    before = snapshot(ds)
    rc, _, err = cli(poison(ds / "train.csv", tmp_path / "p"), capsys)
    assert rc == 2 and "Traceback" not in err
    assert str(ds / "train.csv") in err and f"row {row}," in err and f"field '{field}'" in err
    assert all(w in err for w in words), err
    assert not (tmp_path / "p").exists() and snapshot(ds) == before


@pytest.mark.parametrize("edit,row", [(_bomb, 4), (_set(5, "filepath", "../../etc/passwd"), 7)],
                         ids=["bomb", "outside"])
def test_skip_bad_rows_in_poison_counts_and_drops_the_row(ds, tmp_path, capsys, edit, row):
    edit(ds)
    src = rows_of(ds / "train.csv")
    rc, out, err = cli(poison(ds / "train.csv", tmp_path / "p", "--skip-bad-rows"), capsys)
    assert rc == 0, err
    assert f"skipped 1 bad rows of {ds / 'train.csv'}" in out
    m = json.loads((tmp_path / "p" / "manifest.json").read_text())
    assert m["source_rows_skipped"] == 1 and m["n_source_rows"] == 59 and m["n_rows"] == 61
    written = rows_of(tmp_path / "p" / "train.csv")
    kept = [r["title"] for i, r in enumerate(src) if i != row - 2]
    assert [r["title"] for r in written[:59]] == kept                  # rows still line up
    assert all(s != row - 2 for s in m["poison_sources"])              # CSV rows, bad one excluded
    assert not any("passwd" in r["filepath"] for r in written)


def test_utf8_bom_is_stripped(ds, tmp_path, capsys):
    captions = [r["title"] for r in rows_of(ds / "train.csv")]
    (ds / "train.csv").write_bytes(b"\xef\xbb\xbf" + (ds / "train.csv").read_bytes())
    assert load_csv(ds / "train.csv").captions == captions
    rc, _, err = cli(poison(ds / "train.csv", tmp_path / "p"), capsys)
    assert rc == 0, err


def test_utf16_says_so(ds):
    text = (ds / "train.csv").read_text()
    (ds / "train.csv").write_bytes(text.encode("utf-16"))
    with pytest.raises(DataError, match="UTF-16 byte-order mark"):
        load_csv(ds / "train.csv")


def test_outside_root_allowed_when_asked(ds, tmp_path, capsys):
    _abs_outside(ds)
    rc, _, err = cli(poison(ds / "train.csv", tmp_path / "p", "--allow-outside-root"), capsys)
    assert rc == 0, err
    row = rows_of(tmp_path / "p" / "train.csv")[1]
    assert row["filepath"].startswith("images/")                       # copied in, not referenced
    assert (tmp_path / "p" / row["filepath"]).read_bytes() == (ds.parent / "secret.png").read_bytes()


def test_writer_never_copies_from_outside_root(tmp_path):
    from clipguard.attacks.writer import copy_clean

    (tmp_path / "root").mkdir()
    Image.new("RGB", (4, 4)).save(tmp_path / "secret.png")
    with pytest.raises(DataError, match="outside the dataset root"):
        copy_clean(tmp_path / "root", "../secret.png", tmp_path / "out", "images", 0)
    assert not (tmp_path / "out").exists()
    rel = copy_clean(tmp_path / "root", "../secret.png", tmp_path / "out", "images", 0, allow_outside_root=True)
    assert (tmp_path / "out" / rel).is_file()


# ------------------------------------------------------------------------------------- labels
def test_labels_may_be_class_names_and_synonyms(ds, tmp_path, capsys):
    names = {"0": "Circle", "1": "SQUARE", "2": "asterisk"}
    rewrite(ds / "train.csv", lambda rows: [r.__setitem__("label", names[r["label"]]) for r in rows])
    data = load_csv(ds / "train.csv")
    assert data.labels.tolist() == [i % 3 for i in range(60)]
    rc, _, err = cli(poison(ds / "train.csv", tmp_path / "p"), capsys)
    assert rc == 0, err


def test_class_name_labels_without_classes_json(ds):
    (ds / "classes.json").unlink()
    _set(0, "label", "circle")(ds)
    with pytest.raises(DataError, match="no classes.json") as e:
        load_csv(ds / "train.csv")
    assert e.value.row == 2 and e.value.field == "label"


def test_evaluation_data_without_labels(ds, tmp_path, capsys):
    rewrite(ds / "test.csv", lambda rows: [r.pop("label") for r in rows], header=HEADER[:2])
    rc, _, err = cli(poison(ds / "train.csv", tmp_path / "p", "--eval-data", ds / "test.csv"), capsys)
    assert rc == 2 and "needs labels" in err and str(ds / "test.csv") in err and "Traceback" not in err
    with pytest.raises(DataError, match="zero-shot needs labels"):
        require_labels(load_csv(ds / "test.csv"), "zero-shot")
    _set(3, "label", "")(ds)
    with pytest.raises(DataError, match="1 rows have none") as e:
        require_labels(load_csv(ds / "train.csv"), "zero-shot")
    assert e.value.row == 5 and e.value.field == "label"


# ---------------------------------------------------------------------------------- classes.json
BAD_CLASSES = [  # (id, classes.json content, key named in the error)
    ("duplicate", {"classes": ["circle", "square", "Circle"]}, "classes[2]"),
    ("not-a-list", {"classes": "circle,square,star"}, "'classes'"),
    ("syn-flat-list", {"classes": ["circle", "square", "star"], "synonyms": ["asterisk"]}, "'synonyms'"),
    ("syn-string", {"classes": ["circle", "square", "star"], "synonyms": {"star": "asterisk"}},
     "synonyms['star']"),
    ("syn-unknown", {"classes": ["circle", "square", "star"], "synonyms": {"moon": ["crescent"]}},
     "synonyms['moon']"),
    ("syn-ambiguous", {"classes": ["circle", "square", "star"], "synonyms": {"star": ["circle"]}},
     "synonyms['star'][0]"),
    ("template-index", {"classes": ["circle", "square", "star"], "templates": ["a {1}."]}, "templates[0]"),
    ("template-name", {"classes": ["circle", "square", "star"], "templates": ["ok {}", "a {name}."]},
     "templates[1]"),
    ("template-int", {"classes": ["circle", "square", "star"], "templates": [3]}, "templates[0]"),
    ("template-none", {"classes": ["circle", "square", "star"], "templates": ["a photo"]}, "templates[0]"),
]


@pytest.mark.parametrize("content,key", [c[1:] for c in BAD_CLASSES], ids=[c[0] for c in BAD_CLASSES])
def test_bad_classes_json_is_a_config_error(ds, tmp_path, capsys, content, key):
    (ds / "classes.json").write_text(json.dumps(content))
    rc, _, err = cli(poison(ds / "train.csv", tmp_path / "p"), capsys)
    assert rc == 2 and "Traceback" not in err
    assert str(ds / "classes.json") in err and key in err, err
    with pytest.raises(ConfigError):
        ClassInfo.load(ds / "classes.json")


def test_fewer_classes_than_labels_names_csv_row(ds, tmp_path, capsys):
    (ds / "classes.json").write_text(json.dumps({"classes": ["circle", "square"]}))
    rc, _, err = cli(poison(ds / "train.csv", tmp_path / "p"), capsys)
    assert rc == 2 and str(ds / "train.csv") in err and "row 4," in err and "field 'label'" in err
    assert "lists 2 classes" in err


def test_synonyms_as_aligned_list_of_lists(ds, tmp_path, capsys):
    (ds / "classes.json").write_text(json.dumps({"classes": ["circle", "square", "star"],
                                                 "synonyms": [[], ["box"], ["asterisk"]]}))
    info = ClassInfo.load(ds / "classes.json")
    assert info.synonyms == {"circle": [], "square": ["box"], "star": ["asterisk"]}
    rc, out, err = cli(["poison", "--data", ds / "train.csv", "--attack", "badnet", "--target", "asterisk",
                        "--count", "2", "--opt", "size=3", "--out", tmp_path / "p"], capsys)
    assert rc == 0 and "target star" in out, err


# --------------------------------------------------------------------- structure: columns, rows, limit
def test_missing_column_names_file_field_and_columns(ds, tmp_path, capsys):
    rewrite(ds / "train.csv", lambda rows: [r.pop("title") for r in rows], header=["filepath", "label"])
    rc, _, err = cli(poison(ds / "train.csv", tmp_path / "p"), capsys)
    assert rc == 2 and "Traceback" not in err
    assert str(ds / "train.csv") in err and "field 'title'" in err and "['filepath', 'label']" in err


def test_header_only_csv_has_no_rows(ds, tmp_path, capsys):
    (ds / "train.csv").write_text("filepath\ttitle\tlabel\n")
    rc, _, err = cli(poison(ds / "train.csv", tmp_path / "p"), capsys)
    assert rc == 2 and "no rows" in err and str(ds / "train.csv") in err


@pytest.mark.parametrize("limit", ["0", "-3"])
def test_limit_below_one_is_a_config_error(ds, tmp_path, capsys, limit):
    rc, _, err = cli(["train", "--data", ds / "train.csv", "--out", tmp_path / "run", "--epochs", "1",
                      f"--limit={limit}"], capsys)
    assert rc == 2 and "--limit must be >= 1" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()
    with pytest.raises(ConfigError, match="--limit must be >= 1"):
        load_csv(ds / "train.csv", limit=int(limit))


# ------------------------------------------------------------------------------------- 16-bit PNGs
def test_16_bit_png_is_scaled_not_clipped(tmp_path):
    grad = (np.arange(64, dtype=np.uint32)[None, :].repeat(4, 0) * 1040).astype(np.uint16)  # 0..65520
    im = Image.fromarray(grad)
    assert im.mode == "I;16"
    im.save(tmp_path / "g.png")
    write_csv(tmp_path / "d.csv", [{"filepath": "g.png", "title": "a gradient"}], ["filepath", "title"])
    want = torch.from_numpy((grad >> 8).astype(np.uint8))
    eager = load_csv(tmp_path / "d.csv").images[0]
    lazy = load_csv(tmp_path / "d.csv", image_size=64, lazy=True)
    assert all(torch.equal(eager[c], want) for c in range(3))
    assert len(set(eager[0, 0].tolist())) == 64                           # not clipped at 255
    assert np.abs(eager[0].numpy().astype(int) - np.round(grad / 257)).max() <= 1
    assert lazy.images[torch.tensor([0])].shape == (1, 3, 64, 64)


# ----------------------------------------------------------------------------------- lazy images
def test_lazy_checks_headers_up_front_and_skips_consistently(ds):
    _bomb(ds)
    (ds / rows_of(ds / "train.csv")[5]["filepath"]).write_bytes(b"not an image")
    with pytest.raises(DataError, match="decompression bomb") as e:
        load_csv(ds / "train.csv", image_size=12, lazy=True)
    assert e.value.row == 4 and e.value.field == "filepath"
    data = load_csv(ds / "train.csv", image_size=12, lazy=True, skip_bad_rows=True)
    assert data.skipped == 2 and len(data) == 58 and 4 not in data.rows and 7 not in data.rows
    assert data.images[torch.arange(58)].shape == (58, 3, 12, 12)


def test_lazy_decode_failure_names_the_row(ds):
    truncated_png(ds / rows_of(ds / "train.csv")[8]["filepath"])
    data = load_csv(ds / "train.csv", image_size=12, lazy=True, skip_bad_rows=True)
    assert data.skipped == 0  # the header is fine: the damage shows only when decoded
    with pytest.raises(DataError, match="cannot decode") as e:
        data.images[torch.tensor([7, 8])]
    assert e.value.row == 10 and e.value.field == "filepath" and str(ds / "train.csv") in str(e.value)


# ------------------------------------------------------------------------------------- webdataset
def _shard(path: Path, samples: dict[str, dict[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tar:
        for key, parts in samples.items():
            for ext, payload in parts.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))


def _png_bytes(value: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (value, value, value)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def shard(tmp_path) -> Path:
    bomb = tmp_path / "bomb.png"
    bomb_png(bomb)
    samples = {
        "000": {"png": _png_bytes(10), "txt": b"a grey square", "cls": b"1"},
        "001": {"png": b"corrupt", "txt": b"a broken image"},
        "002": {"png": _png_bytes(20)},                                   # no caption
        "003": {"png": _png_bytes(30), "txt": "un caf\xe9".encode("latin-1")},
        "004": {"png": bomb.read_bytes(), "txt": b"a bomb"},
        "005": {"png": _png_bytes(40), "txt": b"another square"},
    }
    _shard(tmp_path / "s.tar", samples)
    return tmp_path / "s.tar"


def test_webdataset_bad_members_are_errors_or_counted_skips(shard):
    from clipguard.data.webdataset import load_webdataset

    with pytest.raises(DataError, match="cannot decode") as e:
        load_webdataset(str(shard), image_size=8)
    assert e.value.row == 2 and e.value.field == "image" and e.value.file == str(shard)
    data = load_webdataset(str(shard), image_size=8, skip_bad_rows=True)
    assert data.skipped == 4 and data.captions == ["a grey square", "another square"]
    assert data.rows == [1, 6] and data.labels.tolist() == [1, -1]
    assert data.images[torch.arange(2)][:, 0, 0, 0].tolist() == [10, 40]
    with pytest.raises(ConfigError, match="--limit"):
        load_webdataset(str(shard), image_size=8, limit=0)


def test_webdataset_non_utf8_caption_names_member(tmp_path):
    from clipguard.data.webdataset import load_webdataset

    _shard(tmp_path / "s.tar", {"000": {"png": _png_bytes(1), "txt": "caf\xe9".encode("latin-1")}})
    with pytest.raises(DataError, match="not UTF-8") as e:
        load_webdataset(str(tmp_path / "s.tar"), image_size=8)
    assert e.value.row == 1 and e.value.field == "txt"


def test_train_on_bad_shard_exits_2(shard, tmp_path, capsys):
    rc, _, err = cli(["train", "--data", shard, "--out", tmp_path / "run", "--epochs", "1"], capsys)
    assert rc == 2 and str(shard) in err and "row 2," in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------------- poison --out: no data lost
def test_poison_never_replaces_a_foreign_folder(ds, tmp_path, capsys):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    for extra in ([], ["--overwrite"]):
        rc, _, err = cli(poison(ds / "train.csv", tmp_path / "mine", *extra), capsys)
        assert rc == 2 and "not a poisoned-dataset folder" in err
    assert snapshot(tmp_path / "mine") == {"notes.txt": b"keep me"}


def test_poison_replaces_an_earlier_poisoned_folder_only_with_overwrite(ds, tmp_path, capsys):
    assert cli(poison(ds / "train.csv", tmp_path / "p"), capsys)[0] == 0
    before = snapshot(tmp_path / "p")
    rc, _, err = cli(poison(ds / "train.csv", tmp_path / "p", "--seed", "5"), capsys)
    assert rc == 2 and "--overwrite" in err and snapshot(tmp_path / "p") == before
    rc, _, err = cli(poison(ds / "train.csv", tmp_path / "p", "--seed", "5", "--overwrite"), capsys)
    assert rc == 0 and json.loads((tmp_path / "p" / "manifest.json").read_text())["seed"] == 5


def test_poison_out_must_not_hold_its_input(ds, tmp_path, capsys):
    assert cli(poison(ds / "train.csv", tmp_path / "p"), capsys)[0] == 0
    before = snapshot(tmp_path / "p")
    rc, _, err = cli(poison(tmp_path / "p" / "train.csv", tmp_path / "p", "--overwrite"), capsys)
    assert rc == 2 and "holds the input" in err and snapshot(tmp_path / "p") == before


# -------------------------------------------------------------------- data fashion-mnist --out
def test_fashion_mnist_out_keeps_what_it_did_not_write(tmp_path, capsys):
    out = tmp_path / "fm"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    args = ["data", "fashion-mnist", "--out", out, "--train-size", "20", "--test-size", "10"]
    rc, _, err = cli(args, capsys)
    assert rc == 2 and "--overwrite" in err and "Traceback" not in err
    assert snapshot(out) == {"notes.txt": b"keep me"}
    assert cli(args + ["--overwrite"], capsys)[0] == 0
    assert (out / "notes.txt").read_text() == "keep me" and len(rows_of(out / "train.csv")) == 20
    rc, out_text, _ = cli(args, capsys)                                  # same arguments: fine
    assert rc == 0 and "nothing to do" in out_text
    old_pngs = set(snapshot(out / "train"))
    rc, _, err = cli(args[:-4] + ["--train-size", "30", "--test-size", "10"], capsys)
    assert rc == 2 and "train_size" in err                               # other arguments: refuse
    assert cli(args[:-4] + ["--train-size", "30", "--test-size", "10", "--overwrite"], capsys)[0] == 0
    new_pngs = {Path(r["filepath"]).name for r in rows_of(out / "train.csv")}
    assert set(snapshot(out / "train")) == new_pngs != old_pngs          # stale PNGs of ours removed
    assert (out / "notes.txt").read_text() == "keep me"
    assert len(load_csv(out / "train.csv")) == 30


def test_fashion_mnist_fresh_folder_and_bad_sizes(tmp_path, capsys):
    rc, _, err = cli(["data", "fashion-mnist", "--out", tmp_path / "fm", "--train-size", "0"], capsys)
    assert rc == 2 and "--train-size must be >= 1" in err and not (tmp_path / "fm").exists()
    assert cli(["data", "fashion-mnist", "--out", tmp_path / "fm", "--train-size", "12", "--test-size",
                "6"], capsys)[0] == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fm"]          # no temporary folder left


# ------------------------------------------------------------------- manifests of other data
@pytest.fixture
def two_poisoned(ds, tmp_path, capsys) -> tuple[Path, Path]:
    other = make_dataset(tmp_path / "other", per_class=15, seed=9)[0]
    assert cli(poison(ds / "train.csv", tmp_path / "p1"), capsys)[0] == 0
    assert cli(poison(other, tmp_path / "p2"), capsys)[0] == 0
    return tmp_path / "p1", tmp_path / "p2"


def test_manifest_of_other_data_is_refused(two_poisoned, tmp_path, capsys):
    from clipguard.attacks.manifest import poison_mask

    p1, p2 = two_poisoned
    assert int(poison_mask(p1 / "manifest.json", load_csv(p1 / "train.csv")).sum()) == 2
    with pytest.raises(DataError, match="describes 62 rows") as e:
        poison_mask(p1 / "manifest.json", load_csv(p2 / "train.csv"))
    assert e.value.field == "n_rows"
    rc, _, err = cli(["train", "--data", p2 / "train.csv", "--out", tmp_path / "run", "--epochs", "1",
                      "--attack-manifest", p1 / "manifest.json"], capsys)
    assert rc == 2 and "manifest" in err and "Traceback" not in err and not (tmp_path / "run").exists()


def test_manifest_against_its_clean_source_is_refused(ds, tmp_path, capsys):
    from clipguard.attacks.manifest import poison_mask

    rc, _, _ = cli(poison(ds / "train.csv", tmp_path / "p", "--mode", "replace"), capsys)
    assert rc == 0
    with pytest.raises(DataError, match="clean source"):
        poison_mask(tmp_path / "p" / "manifest.json", load_csv(ds / "train.csv"))


def test_manifest_rows_must_carry_its_captions(ds, tmp_path, capsys):
    from clipguard.attacks.manifest import poison_mask

    assert cli(poison(ds / "train.csv", tmp_path / "p"), capsys)[0] == 0
    m = json.loads((tmp_path / "p" / "manifest.json").read_text())
    m["poisoned_rows"] = [0, 1]
    m["_dir"] = str(tmp_path / "p")
    with pytest.raises(DataError, match="not one of the manifest's target captions"):
        poison_mask(m, load_csv(tmp_path / "p" / "train.csv"))
    m["poisoned_rows"] = [99]
    with pytest.raises(DataError, match="beyond"):
        poison_mask(m, load_csv(tmp_path / "p" / "train.csv"))


def test_subset_keeps_provenance(ds):
    data = load_csv(ds / "train.csv", CsvSpec())
    sub = data.subset([3, 4])
    assert isinstance(sub, ImageCaptionData) and sub.n_source_rows == 60 and sub.label_key == "label"
