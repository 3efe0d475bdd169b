import tarfile
from io import BytesIO

import pytest
import torch

from clipguard.cli import main
from clipguard.data.registry import load_dataset
from clipguard.data.webdataset import expand_urls, load_webdataset, write_shards
from clipguard.errors import DataError


def test_shards_roundtrip_exactly(fm_train, tmp_path):
    sub = fm_train.subset(range(50))
    write_shards(sub, tmp_path / "shards", per_shard=20)
    assert expand_urls(str(tmp_path / "shards/{00000..00002}.tar")) == [str(tmp_path / f"shards/0000{i}.tar") for i in range(3)]
    data = load_dataset(str(tmp_path / "shards/{00000..00002}.tar"), spec=None, image_size=28)
    assert len(data) == 50 and data.captions == sub.captions and torch.equal(data.labels, sub.labels)
    assert torch.equal(data.images[torch.arange(50)], sub.images)  # lossless PNG
    assert torch.equal(data.subset([7, 3]).images[torch.arange(2)], sub.images[[7, 3]])


def test_missing_caption_names_shard_and_sample(tmp_path):
    path = tmp_path / "bad.tar"
    with tarfile.open(path, "w") as tar:
        info = tarfile.TarInfo("000.png")
        info.size = 3
        tar.addfile(info, BytesIO(b"abc"))
    with pytest.raises(DataError, match="no .txt") as e:
        load_webdataset(str(path), image_size=28)
    assert e.value.file == str(path) and e.value.row == 1 and e.value.field == "txt"


def test_train_cli_on_shards(fm_train, tmp_path):
    write_shards(fm_train.subset(range(128)), tmp_path / "s", per_shard=64)
    assert main(["train", "--data", str(tmp_path / "s/{00000..00001}.tar"), "--epochs", "1",
                 "--batch-size", "32", "--out", str(tmp_path / "run"), "--quiet"]) == 0
    assert (tmp_path / "run/checkpoints/latest").is_file()
