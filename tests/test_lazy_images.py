import torch
from safetensors.torch import load_file

from clipguard.data.csv_dataset import load_csv
from clipguard.errors import DataError
from clipguard.training.trainer import TrainConfig, Trainer


def test_lazy_equals_in_memory(fm_dir):
    eager = load_csv(fm_dir / "train.csv", image_size=28)
    lazy = load_csv(fm_dir / "train.csv", image_size=28, lazy=True)
    assert lazy.lazy and not eager.lazy and lazy.images.shape == eager.images.shape
    idx = torch.tensor([5, 0, 77])
    assert torch.equal(lazy.images[idx], eager.images[idx])
    assert torch.equal(lazy.images[10:13], eager.images[10:13])
    sub = lazy.subset([3, 4])
    assert sub.lazy and torch.equal(sub.images[torch.arange(2)], eager.images[3:5])


def test_lazy_training_is_identical(fm_dir, tmp_path):
    cfg = dict(model="cg-tiny", epochs=1, batch_size=32, lr=1e-3, warmup=1, seed=0, device="cpu", quiet=True)
    for name, lazy in (("a", False), ("b", True)):
        data = load_csv(fm_dir / "train.csv", image_size=28, lazy=lazy).subset(range(128))
        Trainer(TrainConfig(**cfg), data, tmp_path / name).fit()
    wa = load_file(str(tmp_path / "a/checkpoints/epoch_001/model.safetensors"))
    wb = load_file(str(tmp_path / "b/checkpoints/epoch_001/model.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_lazy_corrupt_image_names_row(fm_dir, tmp_path):
    import shutil

    d = tmp_path / "copy"
    shutil.copytree(fm_dir, d)
    lazy = load_csv(d / "train.csv", image_size=28, lazy=True)
    (d / lazy.paths[2]).write_bytes(b"broken")
    try:
        lazy.images[torch.tensor([0, 1, 2])]
    except DataError as e:
        assert e.row == 4 and e.field == "filepath" and "train.csv" in str(e)
    else:
        raise AssertionError("corrupt image went unnoticed")
