import json

import pytest
import torch
from safetensors.torch import load_file

from clipguard.training.trainer import TrainConfig, Trainer


def _cfg(**kw):
    base = dict(model="cg-tiny", epochs=2, batch_size=64, lr=1e-3, warmup=3, seed=0, device="cpu", quiet=True)
    base.update(kw)
    return TrainConfig(**base)


def _weights(run):
    return load_file(str(run / "checkpoints" / (run / "checkpoints" / "latest").read_text() / "model.safetensors"))


def test_resume_is_exact(fm_train, tmp_path):
    data = fm_train.subset(range(256))
    Trainer(_cfg(), data, tmp_path / "a").fit()
    Trainer(_cfg(stop_after=1), data, tmp_path / "b").fit()
    assert len((tmp_path / "b" / "results.jsonl").read_text().splitlines()) == 1
    Trainer(_cfg(), data, tmp_path / "b").fit(resume="latest")
    wa, wb = _weights(tmp_path / "a"), _weights(tmp_path / "b")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    lines = [json.loads(x) for x in (tmp_path / "b" / "results.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [1, 2]


def test_training_reduces_loss_and_writes_run(fm_train, tmp_path):
    data = fm_train.subset(range(256))
    Trainer(_cfg(epochs=3, lr=2e-3), data, tmp_path).fit()
    recs = [json.loads(x) for x in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert recs[-1]["loss"] < recs[0]["loss"]
    assert recs[-1]["lr"] == pytest.approx(0.0)
    params = json.loads((tmp_path / "params.json").read_text())
    assert params["train"]["model"] == "cg-tiny" and params["steps_per_epoch"] == 4
    assert len(list((tmp_path / "checkpoints").glob("epoch_*"))) == 2  # keep_checkpoints=2


def test_accumulation_and_logit_clamp(fm_train, tmp_path):
    data = fm_train.subset(range(256))
    t = Trainer(_cfg(epochs=1, accum_steps=2, batch_size=32), data, tmp_path)
    t.fit()
    assert t.ctx.steps_per_epoch == 4
    assert float(t.model.logit_scale.detach()) <= 4.6052


def test_too_little_data_is_a_clear_error(fm_train, tmp_path):
    from clipguard.errors import ConfigError

    with pytest.raises(ConfigError, match="fewer than one step"):
        Trainer(_cfg(batch_size=1024), fm_train.subset(range(100)), tmp_path).fit()


def test_wrong_image_size_is_a_clear_error(fm_train, tmp_path):
    from clipguard.errors import ConfigError

    with pytest.raises(ConfigError, match="expects 224x224"):
        Trainer(_cfg(model="cg-tiny-224"), fm_train.subset(range(64)), tmp_path).fit()


def test_a_checkpoint_without_optimizer_state_resumes_only_a_finished_run(fm_train, tmp_path):
    """The bench drops a finished run's optimizer state: resuming it (to evaluate again) works,
    continuing a run from such a checkpoint is refused with the reason."""
    from clipguard.errors import ConfigError
    from clipguard.models.checkpoint import drop_optimizer

    data = fm_train.subset(range(128))
    Trainer(_cfg(epochs=1), data, tmp_path / "a").fit()
    latest = tmp_path / "a" / "checkpoints" / (tmp_path / "a" / "checkpoints" / "latest").read_text()
    assert drop_optimizer(latest) > 0 and not (latest / "optimizer.safetensors").exists()
    assert drop_optimizer(latest) == 0  # twice is harmless
    before = _weights(tmp_path / "a")
    Trainer(_cfg(epochs=1), data, tmp_path / "a").fit(resume="latest")  # nothing left to train
    after = _weights(tmp_path / "a")
    assert all(torch.equal(before[k], after[k]) for k in before)
    Trainer(_cfg(epochs=2, stop_after=1), data, tmp_path / "b").fit()
    mid = tmp_path / "b" / "checkpoints" / (tmp_path / "b" / "checkpoints" / "latest").read_text()
    drop_optimizer(mid)
    with pytest.raises(ConfigError, match="no optimizer state, so training cannot continue"):
        Trainer(_cfg(epochs=2), data, tmp_path / "b").fit(resume="latest")
