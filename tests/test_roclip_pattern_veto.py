"""RoCLIP's pattern veto: after each pool epoch the pairs whose image carries the pattern their
caption group's suspects share train in no step until the next veto (a default, at 4)."""

from __future__ import annotations

import json

import pytest
import torch
from _trainers import batch_of, set_up
from safetensors.torch import load_file

from clipguard import defenses
from clipguard.errors import ConfigError
from clipguard.training.trainer import TrainConfig, Trainer

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py

# a small pool and a low cut, so that a tiny run has pool epochs and flags pairs
SMALL = dict(match_every=2, align_before_pool=None, pool_fraction=0.25, pattern_z=2.0, pattern_clusters=4)


def test_pattern_options_are_checked_and_on_by_default():
    with pytest.raises(ConfigError, match="pattern_z must be > 0"):
        defenses.build("roclip", {"pattern_z": 0})
    with pytest.raises(ConfigError, match="pattern_z needs keep_own"):
        defenses.build("roclip", {"pattern_z": 3, "keep_own": 0.0, "keep_own_margin": 0.0, "unmatched": "pooled",
                                  "plain_trains_kept": False})
    with pytest.raises(ConfigError, match="pattern_share"):
        defenses.build("roclip", {"pattern_z": 3, "pattern_share": 0.0})
    with pytest.raises(ConfigError, match="pattern_clusters"):
        defenses.build("roclip", {"pattern_z": 3, "pattern_clusters": 0})
    with pytest.raises(ConfigError, match="pattern_group_pairs"):
        defenses.build("roclip", {"pattern_z": 3, "pattern_group_pairs": 0})
    assert defenses.build("roclip", {"pattern_group_pairs": 300})._pattern.groups_for(4460) == 14
    s = defenses.build("roclip", {})
    assert "pattern_group_pairs" not in s.opt.identity()
    assert s.opt.pattern_z == 4.0 and s._pattern is not None  # the default since the twenty-seventh round
    assert s.opt.pattern_text == "pool-epoch" and s.opt.pattern_suspects == "latest"  # since the twenty-eighth
    assert s.opt.identity()["pattern_z"] == 4.0
    off = defenses.build("roclip", {"pattern_z": None})
    assert off._pattern is None and "pattern_z" not in off.opt.identity()  # off: not part of a run's identity


def test_flagged_pairs_leave_plain_and_pool_steps_and_the_selection(fm_train, tmp_path):
    """With flags set, a plain step's rows and a pool step's kept pairs both exclude the flagged
    rows, and the diagnostics' selection does too."""
    t = set_up(TrainConfig(model="cg-tiny", epochs=4, batch_size=32, seed=0, device="cpu", quiet=True),
               fm_train.subset(range(256)), defenses.build("roclip", SMALL), tmp_path)
    s = t.strategy
    flagged = torch.zeros(256, dtype=torch.bool)
    flagged[torch.arange(0, 32, 3)] = True
    s._patterned = flagged
    rows = s._plain_rows(torch.arange(32), torch.device("cpu"))  # no pool epoch yet: every unflagged row
    assert torch.equal(rows, ~flagged[:32])
    t.ctx.epoch = 1
    assert s.is_pool_epoch(1)
    s.on_epoch_start(1)
    s.loss(batch_of(t, range(32), 5))
    assert not s._kept[:32][flagged[:32]].any() and s._kept[:32].any()
    assert bool(s._agreed[:32][flagged[:32]].any())  # the test passed some flagged pairs; the veto kept them out
    t.ctx.epoch = 2
    rows = s._plain_rows(torch.arange(32), torch.device("cpu"))
    assert not rows[flagged[:32]].any()
    assert not s.selected()[flagged].any()


def test_suspicion_ranks_failed_keep_tests_first_then_by_distance():
    s = defenses.build("roclip", SMALL)
    s._agreement = torch.tensor([0.9, 0.2, 0.95, float("nan"), 0.5])
    s._agreed = torch.tensor([True, True, False, False, False])
    s._kept = torch.tensor([False, True, False, False, False])  # the veto's earlier verdicts do not count
    order = torch.argsort(s._suspicion(), descending=True).tolist()
    assert order[:2] == [4, 2]  # failed the test: the farther pick first
    assert order[2] == 1 and order[-1] == 3  # passed it, far; unreached last


def _cfg(**kw):
    return TrainConfig(model="cg-tiny", epochs=4, batch_size=64, lr=1e-3, warmup=2, seed=0, device="cpu",
                       quiet=True, **kw)


def test_a_run_with_the_pattern_veto_logs_its_flags_and_resumes_exactly(fm_train, tmp_path):
    """Each pool epoch's record counts the flagged pairs (and its hook time includes the veto's); a
    run stopped after its first pool epoch resumes to the same weights (the flags are part of the
    checkpoint)."""
    data = fm_train.subset(range(256))
    Trainer(_cfg(), data, tmp_path / "a", strategy=defenses.build("roclip", SMALL)).fit()
    Trainer(_cfg(stop_after=2), data, tmp_path / "b", strategy=defenses.build("roclip", SMALL)).fit()
    Trainer(_cfg(), data, tmp_path / "b", strategy=defenses.build("roclip", SMALL)).fit(resume="latest")
    wa, wb = (load_file(str(tmp_path / r / "checkpoints" / "epoch_004" / "model.safetensors")) for r in "ab")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    recs = [json.loads(x) for x in (tmp_path / "a" / "results.jsonl").read_text().splitlines()]
    pools = [r for r in recs if r.get("pool_epoch")]
    assert len(pools) == 2 and all(r.get("pattern_flagged", 0) >= 1 for r in pools)
    assert all(r["hook_seconds"] > 0 for r in pools)  # the veto runs in the end hook, and is timed
    assert not any("pattern_flagged" in r for r in recs if r.get("pool_epoch") is False)
    # the flags change what trains: without the veto the same run ends at other weights
    Trainer(_cfg(), data, tmp_path / "c", strategy=defenses.build("roclip", {**SMALL, "pattern_z": None})).fit()
    wc = load_file(str(tmp_path / "c" / "checkpoints" / "epoch_004" / "model.safetensors"))
    assert any(not torch.equal(wa[k], wc[k]) for k in wa)


def test_cumulative_suspects_count_every_failed_keep_test():
    """``pattern_suspects: cumulative``: a pair that failed the keep test in earlier pool epochs stays
    a suspect after it starts passing; the latest epoch's order only breaks ties."""
    s = defenses.build("roclip", {**SMALL, "pattern_suspects": "cumulative"})
    s._agreement = torch.tensor([0.9, 0.2, 0.95, float("nan"), 0.5])
    s._agreed = torch.tensor([True, True, False, False, False])
    s._failures = torch.tensor([3, 0, 1, 0, 1])  # the latest epoch's failures already counted
    order = torch.argsort(s._suspicion(), descending=True).tolist()
    assert order[:3] == [0, 4, 2]  # three failures, though it passed now; then one each, the farther first
    assert order[-1] == 3


def test_veto_only_options_leave_the_identity_without_the_veto():
    off = defenses.build("roclip", {"pattern_z": None, "pattern_suspects": "cumulative", "pattern_text": "pool-epoch"})
    assert not {"pattern_suspects", "pattern_text"} & set(off.opt.identity())
    on = defenses.build("roclip", {"pattern_suspects": "cumulative", "pattern_text": "pool-epoch"})
    assert on.opt.identity()["pattern_suspects"] == "cumulative" and on.opt.identity()["pattern_text"] == "pool-epoch"
    assert "pattern_suspects" not in defenses.build("roclip", {"pattern_suspects": "latest"}).opt.identity()


def test_pool_epoch_text_is_each_pairs_own_caption_and_unreached_pairs_are_encoded(fm_train, tmp_path):
    """``pattern_text: pool-epoch``: a pool step stores each pair's own-caption embedding (the one its
    keep test read); the veto encodes only the pairs the epoch did not reach."""
    from clipguard.defenses.pattern_veto import caption_embeddings
    from clipguard.evaluation.features import encode_tokens

    t = set_up(TrainConfig(model="cg-tiny", epochs=4, batch_size=32, seed=0, device="cpu", quiet=True),
               fm_train.subset(range(256)), defenses.build("roclip", {**SMALL, "pattern_text": "pool-epoch"}),
               tmp_path)
    s = t.strategy
    t.ctx.epoch = 1
    s.on_epoch_start(1)
    s.loss(batch_of(t, range(32), 5))
    stored = s._own_text
    assert not stored[:32].isnan().any() and stored[32:].isnan().all()
    assert torch.allclose(stored[:32].norm(dim=1), torch.ones(32), atol=1e-4)  # normalised embeddings
    full = caption_embeddings(t.ctx, stored)
    assert torch.equal(full[:32], stored[:32])
    assert torch.allclose(full[32:], encode_tokens(t.ctx.raw_model, t.ctx.tokens[32:], "cpu"), atol=1e-6)


def test_cumulative_and_pool_epoch_text_resume_exactly(fm_train, tmp_path):
    """The failure counts are part of the checkpoint: a run stopped after its first pool epoch
    resumes to the same weights as one that ran through."""
    data = fm_train.subset(range(256))
    cfg = dict(SMALL, pattern_suspects="cumulative", pattern_text="pool-epoch")
    Trainer(_cfg(), data, tmp_path / "a",
            strategy=defenses.build("roclip", cfg)).fit()
    Trainer(_cfg(stop_after=2), data, tmp_path / "b", strategy=defenses.build("roclip", cfg)).fit()
    Trainer(_cfg(), data, tmp_path / "b", strategy=defenses.build("roclip", cfg)).fit(resume="latest")
    wa, wb = (load_file(str(tmp_path / r / "checkpoints" / "epoch_004" / "model.safetensors")) for r in "ab")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    sa, sb = (load_file(str(tmp_path / r / "checkpoints" / "epoch_004" / "strategy.safetensors")) for r in "ab")
    assert int(sa["keep_test_failures"].max()) >= 1
    assert torch.equal(sa["keep_test_failures"], sb["keep_test_failures"])  # both pool epochs counted


def test_pattern_unlearn_is_checked_is_a_default_and_stays_out_of_the_identity_when_off():
    """0.02 since the thirty-first round; None (the paper, and every preset before that round) and
    a run without the pattern veto, which flags nothing to unlearn, leave it out of the identity."""
    with pytest.raises(ConfigError, match="pattern_unlearn must be > 0"):
        defenses.build("roclip", {"pattern_unlearn": 0.0})
    assert defenses.build("roclip", {}).opt.identity()["pattern_unlearn"] == 0.02
    assert "pattern_unlearn" not in defenses.build("roclip", {"pattern_unlearn": None}).opt.identity()
    no_veto = defenses.build("roclip", {"pattern_z": None})  # the default weight, nothing to unlearn
    assert no_veto.opt.pattern_unlearn == 0.02 and "pattern_unlearn" not in no_veto.opt.identity()
    assert defenses.build("roclip", {"pattern_unlearn": 0.05}).opt.identity()["pattern_unlearn"] == 0.05


def test_pattern_unlearn_adds_the_unlearning_term_of_the_flagged_rows_to_plain_and_pool_steps(fm_train, tmp_path):
    """With flags set, a plain step's loss is the same step's loss without the option plus the weight
    times the flagged rows' unlearning term; a pool step logs the term too; without flags nothing is added."""
    data = fm_train.subset(range(256))
    cfg = TrainConfig(model="cg-tiny", epochs=4, batch_size=32, seed=0, device="cpu", quiet=True)
    plain_t = set_up(cfg, data, defenses.build("roclip", {**SMALL, "pattern_unlearn": None}), tmp_path / "a")
    t = set_up(cfg, data, defenses.build("roclip", {**SMALL, "pattern_unlearn": 0.5}), tmp_path / "b")
    t.ctx.raw_model.load_state_dict(plain_t.ctx.raw_model.state_dict())
    s = t.strategy
    loss, logs = s.loss(batch_of(t, range(32), 5))  # no veto has run: no term
    assert "pattern_unlearn" not in logs
    flagged = torch.zeros(256, dtype=torch.bool)
    flagged[torch.arange(0, 32, 4)] = True
    s._patterned = flagged
    plain_t.strategy._patterned = flagged.clone()
    loss, logs = s.loss(batch_of(t, range(32), 5))
    base, _ = plain_t.strategy.loss(batch_of(plain_t, range(32), 5))
    assert logs["pattern_unlearn"] > 0
    assert float(loss.detach()) == pytest.approx(float(base.detach()) + 0.5 * logs["pattern_unlearn"], rel=1e-5)
    t.ctx.epoch = 1
    assert s.is_pool_epoch(1)
    s.on_epoch_start(1)
    _, logs = s.loss(batch_of(t, range(32), 5))
    assert logs["pattern_unlearn"] > 0


def test_a_run_with_pattern_unlearn_resumes_exactly_and_trains_other_weights(fm_train, tmp_path):
    data = fm_train.subset(range(256))
    opts = {**SMALL, "pattern_unlearn": 0.5}
    Trainer(_cfg(), data, tmp_path / "a", strategy=defenses.build("roclip", opts)).fit()
    Trainer(_cfg(stop_after=3), data, tmp_path / "b", strategy=defenses.build("roclip", opts)).fit()
    Trainer(_cfg(), data, tmp_path / "b", strategy=defenses.build("roclip", opts)).fit(resume="latest")
    wa, wb = (load_file(str(tmp_path / r / "checkpoints" / "epoch_004" / "model.safetensors")) for r in "ab")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    recs = [json.loads(x) for x in (tmp_path / "a" / "results.jsonl").read_text().splitlines()]
    assert any(r.get("pattern_unlearn", 0) > 0 for r in recs[2:])  # after the first veto
    Trainer(_cfg(), data, tmp_path / "c", strategy=defenses.build("roclip", {**SMALL, "pattern_unlearn": None})).fit()
    wc = load_file(str(tmp_path / "c" / "checkpoints" / "epoch_004" / "model.safetensors"))
    assert any(not torch.equal(wa[k], wc[k]) for k in wa)
