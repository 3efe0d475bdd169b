"""SafeCLIP's cheaper mixed epochs: one view for the risky pairs, split updates from the steps' features."""

import json

import pytest
import torch
from _trainers import batch_of, set_up
from safetensors.torch import load_file

from clipguard import defenses
from clipguard.defenses.nn_pool import nn_self_loss
from clipguard.errors import ConfigError
from clipguard.training.trainer import TrainConfig, Trainer


def _cfg(**kw):
    base = dict(model="cg-tiny", epochs=4, batch_size=64, lr=1e-3, warmup=2, seed=0, device="cpu", quiet=True)
    base.update(kw)
    return TrainConfig(**base)


def _small(**kw):
    opts = dict(warmup_epochs=0, clip_warmup_epochs=1, lr_low_factor=1.0, min_initial_fraction=0.3,
                step=0.2, pool_size=128, density_z=1.0, repeat_z=None)
    opts.update(kw)
    return defenses.build("safeclip", opts)


def _built(data, strategy, tmp_path, **kw):
    return set_up(_cfg(**kw), data, strategy, tmp_path)


def _batch(t, idx, seed=7):
    return batch_of(t, idx, seed)


def test_one_view_risky_loss_encodes_each_pair_once(fm_train, tmp_path):
    t = _built(fm_train.subset(range(256)), _small(risky_loss="one-view"), tmp_path)
    s = t.strategy
    s._img_pool.push(torch.nn.functional.normalize(torch.randn(64, s._img_pool.dim), dim=1))
    s._txt_pool.push(torch.nn.functional.normalize(torch.randn(64, s._txt_pool.dim), dim=1))
    rows, seen = [], {}
    fwd = t.ctx.forward

    def spy(px, tk):
        rows.append(len(px))
        out = fwd(px, tk)
        seen["img"], seen["txt"] = out[0], out[1]
        return out

    t.ctx.forward = spy
    safe = torch.zeros(32, dtype=torch.bool)
    safe[:20] = True
    img_bank, txt_bank = s._img_pool.bank.clone(), s._txt_pool.bank.clone()
    terms = s.loss_terms(_batch(t, range(32)), safe)
    assert rows == [32]  # no second views
    # the unimodal terms: each risky view against its own pool neighbour (the pool as it was
    # before this step pushed the batch)
    s._img_pool.bank.copy_(img_bank)
    s._txt_pool.bank.copy_(txt_bank)
    s._img_pool.filled.fill_(64)
    s._txt_pool.filled.fill_(64)
    s._img_pool.ptr.fill_(64)
    s._txt_pool.ptr.fill_(64)
    want_img = nn_self_loss(seen["img"], s._img_pool, ~safe, s.opt.temperature)
    want_txt = nn_self_loss(seen["txt"], s._txt_pool, ~safe, s.opt.temperature)
    got_img, got_txt = float(terms["unimodal_image"].detach()), float(terms["unimodal_text"].detach())
    assert got_img == pytest.approx(float(want_img.detach()), rel=1e-5) and got_img > 0
    assert got_txt == pytest.approx(float(want_txt.detach()), rel=1e-5)
    assert terms["unimodal_image"].requires_grad


def test_a_mixed_step_keeps_the_safe_pairs_features_for_the_next_update(fm_train, tmp_path):
    t = _built(fm_train.subset(range(256)), _small(update_features="steps"), tmp_path)
    s = t.strategy
    t.ctx.epoch = 1  # mixed
    s._safe = torch.zeros(256, dtype=torch.bool)
    s._safe[40:60] = True
    idx = torch.arange(32, 96)
    s.loss(_batch(t, idx))
    kept = torch.nonzero(s._step_fresh).flatten()
    assert kept.tolist() == list(range(40, 60))  # the safe rows of the batch, no other
    img, txt = t.ctx.encode_dataset(indices=kept)
    want = torch.cat([img, txt], dim=1)
    assert torch.allclose(s._step_feats[kept].float(), want, atol=2e-3)  # fp16 storage
    assert float(s._step_feats[~s._step_fresh].abs().sum()) == 0.0


def test_an_update_encodes_only_the_candidates_the_steps_did_not_see(fm_train, tmp_path):
    data = fm_train.subset(range(256))
    t = _built(data, _small(update_features="steps", update_fraction=0.5, update_margin=0.0), tmp_path)
    s = t.strategy
    s.on_epoch_start(1)  # the first split encodes every pair and fills the feature cache
    assert bool(s._step_feats.abs().sum(dim=1).gt(0).all())
    s._step_fresh[:100] = True
    s._strikes = torch.zeros(256, dtype=torch.uint8)
    s._strikes[100:120] = 1  # out for good: their last features stand
    encoded = []
    enc = t.ctx.encode_dataset
    t.ctx.encode_dataset = lambda **kw: (encoded.append(kw["indices"].clone()), enc(**kw))[1]
    cand, _ = s._candidates(256)
    rec = s.on_epoch_start(2)
    done = torch.cat(encoded)
    want = cand[cand >= 120]
    assert sorted(done.tolist()) == sorted(want.tolist())
    assert rec["reused_features"] == len(cand) - len(want) and rec["evaluated_pairs"] == len(cand)
    assert not bool(s._step_fresh.any())  # the next epoch's steps start afresh


def test_update_features_is_checked():
    with pytest.raises(ConfigError, match="update_features"):
        _small(update_features="steps", safe_image_augment="simclr")
    with pytest.raises(ConfigError, match="update_features"):
        _small(update_features="cached")
    with pytest.raises(ConfigError, match="risky_loss"):
        _small(risky_loss="two-views")


@pytest.mark.parametrize("opts", [{"update_features": "steps"}, {"risky_loss": "one-view"}])
def test_the_cheaper_steps_resume_exactly(fm_train, tmp_path, opts):
    data = fm_train.subset(range(256))
    Trainer(_cfg(), data, tmp_path / "a", strategy=_small(**opts)).fit()
    Trainer(_cfg(stop_after=2), data, tmp_path / "b", strategy=_small(**opts)).fit()
    Trainer(_cfg(), data, tmp_path / "b", strategy=_small(**opts)).fit(resume="latest")
    wa, wb = (load_file(str(tmp_path / r / "checkpoints" / "epoch_004" / "model.safetensors")) for r in "ab")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    recs = [json.loads(x) for x in (tmp_path / "a" / "results.jsonl").read_text().splitlines()]
    updates = [r for r in recs if r.get("phase") == "mixed" and not r.get("first_split")]
    assert updates
    if "update_features" in opts:
        assert all(r["reused_features"] > 0 for r in updates)
