"""The trainer's GPU speed settings (compile, channels_last, workers, pin_memory), checked on the CPU:
they validate, keep a run's fingerprint, keep checkpoints plain open_clip, and keep resume exact."""

import functools

import open_clip
import pytest
import torch
from safetensors.torch import load_file

from clipguard.data.csv_dataset import load_csv
from clipguard.errors import ConfigError
from clipguard.models.factory import register_model_configs
from clipguard.training.distributed import DistInfo
from clipguard.training.spec import resolve_spec
from clipguard.training.trainer import TrainConfig, Trainer

pytestmark = pytest.mark.usefixtures("one_thread")


def _cfg(**kw):
    base = dict(model="cg-nano", epochs=1, batch_size=32, lr=1e-3, warmup=1, seed=0, device="cpu", quiet=True)
    base.update(kw)
    return TrainConfig(**base)


def _weights(run, epoch=None):
    cdir = run / "checkpoints"
    name = f"epoch_{epoch:03d}" if epoch else (cdir / "latest").read_text()
    return load_file(str(cdir / name / "model.safetensors"))


def test_speed_settings_validate_and_keep_the_fingerprint():
    plain = resolve_spec(defense="safeclip")
    fast = resolve_spec(defense="safeclip", train={"compile": "true", "channels_last": True, "workers": 4,
                                                   "pin_memory": False})
    assert fast.train.compile is True and fast.train.workers == 4 and fast.train.pin_memory is False
    assert fast.fingerprint() == plain.fingerprint()  # speed only: old runs and bench cells stay valid
    defaults = TrainConfig()
    assert (defaults.compile, defaults.channels_last, defaults.workers, defaults.pin_memory) == (False, False, None, True)
    with pytest.raises(ConfigError, match="workers must be >= 1"):
        TrainConfig(workers=0)
    with pytest.raises(ConfigError, match="compile"):
        TrainConfig(compile="sometimes")


def test_compiled_run_writes_plain_open_clip_checkpoints(fm_train, tmp_path, monkeypatch):
    # dynamo traces the real forward; the eager backend skips inductor's C++ build (CPU tests stay fast)
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))
    torch._dynamo.reset()
    data = fm_train.subset(range(64))
    t = Trainer(_cfg(compile=True), data, tmp_path / "c")
    t.fit()
    assert isinstance(t.ctx.model, torch._dynamo.eval_frame.OptimizedModule)
    assert t.ctx.raw_model is t.model and not hasattr(t.model, "_orig_mod")
    w = _weights(tmp_path / "c")
    assert not any("_orig_mod" in k for k in w)
    Trainer(_cfg(), data, tmp_path / "e").fit()
    assert w.keys() == _weights(tmp_path / "e").keys()
    register_model_configs()
    model = open_clip.create_model("cg-nano", pretrained=str(tmp_path / "c/checkpoints/epoch_001/model.safetensors"))
    assert torch.equal(model.state_dict()["logit_scale"], w["logit_scale"])
    torch._dynamo.reset()


def test_channels_last_resume_is_exact(fm_train, tmp_path):
    data = fm_train.subset(range(96))
    Trainer(_cfg(epochs=2, channels_last=True), data, tmp_path / "a").fit()
    t = Trainer(_cfg(epochs=2, channels_last=True, stop_after=1), data, tmp_path / "b")
    t.fit()
    assert t.model.visual.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    Trainer(_cfg(epochs=2, channels_last=True), data, tmp_path / "b").fit(resume="latest")
    wa, wb = _weights(tmp_path / "a"), _weights(tmp_path / "b")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    # the same weights as a default run, up to NHWC kernels' float rounding
    Trainer(_cfg(epochs=2), data, tmp_path / "p").fit()
    wp = _weights(tmp_path / "p")
    assert all(torch.allclose(wa[k], wp[k], atol=1e-4) for k in wa)


def test_host_batches_are_prefetched_and_pinned_only_for_cuda(fm_dir, fm_train, tmp_path):
    cpu, cuda = DistInfo(), DistInfo(device=torch.device("cuda"))  # only the device type is read
    t = Trainer(_cfg(), fm_train.subset(range(64)), tmp_path / "m")
    t.setup(cpu)
    assert t._host_batches(cpu) == (False, False)  # in memory on the CPU: indexed in place, as before
    assert t._host_batches(cuda) == (True, True)   # host memory on a GPU run: gathered ahead and pinned
    t.cfg.pin_memory = False
    assert t._host_batches(cuda) == (False, False)
    lazy = load_csv(fm_dir / "train.csv", image_size=28, lazy=True).subset(range(64))
    t = Trainer(_cfg(workers=3), lazy, tmp_path / "l")
    t.setup(cpu)
    assert t._host_batches(cpu) == (True, False) and t._host_batches(cuda) == (True, True)
    assert lazy.images.workers == 3


def test_lazy_take_decodes_the_same_pixels(fm_dir):
    eager = load_csv(fm_dir / "train.csv", image_size=28)
    lazy = load_csv(fm_dir / "train.csv", image_size=28, lazy=True)
    idx = torch.tensor([7, 0, 3, 3])
    assert torch.equal(lazy.images.take(idx), eager.images[idx])
    lazy.images.set_workers(2)
    assert lazy.images.workers == 2 and torch.equal(lazy.images[idx], eager.images[idx])
    assert lazy.images.take([]).shape == (0, 3, 28, 28)
