"""CleanerCLIP: the L_fc form, exact reduction to CLIP, the per-step subset mini-batch (L_fc has
negatives on every step at the paper's proportion), determinism, exact resume, DDP shares and the
gathered loss, and the paper's counterfactual rules."""

from __future__ import annotations

import dataclasses
import json
import math
import random
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from clipguard import defenses
from clipguard.data.counterfactuals import CounterfactualMaker, inflect_like
from clipguard.defenses.cleanerclip import factual_counterfactual_loss, subset_fc_loss
from clipguard.errors import ConfigError
from clipguard.training.context import to_pixels
from clipguard.training.distributed import DistInfo
from clipguard.training.strategy import ClipStrategy
from clipguard.training.trainer import TrainConfig, Trainer
from tests.test_cleanclip import make_batch, make_ctx

pytestmark = [pytest.mark.usefixtures("one_thread"),  # conftest.py
              pytest.mark.skipif(not Path("/usr/share/wordnet/index.noun").is_file(),
                                 reason="WordNet (wordnet-base) not installed")]


def _unit(*shape, seed=0):
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)), dim=-1)


def test_fc_loss_matches_the_reference_formula():
    img, pos, neg = _unit(3, 8, seed=1), _unit(3, 8, seed=2), _unit(3, 8, seed=3)
    tp, tn = 0.3, 0.5
    l_img = l_txt = 0.0
    for i in range(3):
        p = math.exp(float(img[i] @ pos[i]) / tp)
        l_img += -math.log(p / (p + sum(math.exp(float(img[i] @ neg[j]) / tn) for j in range(3))))
        l_txt += -math.log(p / (p + sum(math.exp(float(pos[i] @ img[j]) / tn) for j in range(3) if j != i)))
    want = 0.5 * (l_img / 3 + l_txt / 3)
    assert float(factual_counterfactual_loss(img, pos, neg, tp, tn)) == pytest.approx(want, rel=1e-5)
    # a single sample has no other images: its text term is zero
    one = factual_counterfactual_loss(img[:1], pos[:1], neg[:1], tp, tn)
    p = math.exp(float(img[0] @ pos[0]) / tp)
    assert float(one) == pytest.approx(0.5 * -math.log(p / (p + math.exp(float(img[0] @ neg[0]) / tn))), rel=1e-5)
    assert float(factual_counterfactual_loss(img[:0], pos[:0], neg[:0], tp, tn)) == 0.0


def test_options_are_validated():
    s = defenses.build("cleanerclip", {"fc_batch": "16", "counterfactuals": "slot"})
    assert s.opt.fc_batch == 16 and s.opt.counterfactuals == "slot"
    for bad, match in [({"counterfactuals": "eda"}, "counterfactuals"), ({"fc_batch": 0}, "fc_batch"),
                       ({"fc_samples": 2.5}, "fc_samples"), ({"word_list_size": 0}, "word_list_size"),
                       ({"slot_kinds": ["adverb"]}, "slot_kinds")]:
        with pytest.raises(ConfigError, match=match):
            defenses.build("cleanerclip", bad)


def test_lambda2_lambda3_zero_is_exactly_clip(toy):
    ctx = make_ctx(toy)
    ref = ClipStrategy()
    ref.bind(ctx)
    want, _ = ref.loss(make_batch(ctx, 0))
    s = defenses.build("cleanerclip", {"lambda2": 0.0, "lambda3": 0.0})
    s.bind(ctx)
    s.on_epoch_start(0)
    got, logs = s.loss(make_batch(ctx, 0))
    assert torch.equal(want, got) and "fc_loss" not in logs


def test_epoch_subset_is_seeded_sized_and_fresh(toy):
    ctx = make_ctx(toy)
    s = defenses.build("cleanerclip", {"fc_samples": 10})
    s.bind(ctx)
    rec = s.on_epoch_start(0)
    rows0, facts0 = s._subset.clone(), list(s._facts)
    assert rec["fc_subset"] == 10 == len(facts0) and rec["fc_unparsed"] == 0
    assert rec["fc_batch"] == 10                                             # min(batch 32, subset 10)
    s.on_epoch_start(0)
    assert torch.equal(rows0, s._subset) and facts0 == s._facts             # resume rebuilds it
    s.on_epoch_start(1)
    assert not torch.equal(rows0, s._subset)                                 # a new draw per epoch
    frac = defenses.build("cleanerclip", {"fc_samples": 0.5})
    frac.bind(ctx)
    assert frac._subset_size() == 16


def test_captions_without_a_noun_are_skipped_and_counted(toy):
    captions = list(toy.captions)
    captions[::2] = ["very quickly"] * len(captions[::2])                    # no noun: no sub-caption
    data = dataclasses.replace(toy, captions=captions)
    ctx = make_ctx(data)
    s = defenses.build("cleanerclip", {"fc_samples": 8})
    s.bind(ctx)
    rec = s.on_epoch_start(0)
    assert rec["fc_subset"] == 8 and rec["fc_unparsed"] > 0                  # topped up from other rows
    assert all(i % 2 == 1 for i in s._subset.tolist())
    _, logs = s.loss(make_batch(ctx, 0))
    assert logs["fc_rows"] == 8 and logs["fc_txt_loss"] > 0
    none = defenses.build("cleanerclip", {"fc_samples": 8})
    none.bind(make_ctx(dataclasses.replace(toy, captions=["very quickly"] * len(toy))))
    rec = none.on_epoch_start(0)
    assert rec["fc_subset"] == 0 and rec["fc_unparsed"] == 32
    loss, logs = none.loss(make_batch(none.ctx, 0))                         # no crash: CLIP + in-modal only
    assert torch.isfinite(loss) and logs["fc_rows"] == 0 and logs["fc_loss"] == 0.0


def test_total_is_weighted_sum_and_one_forward(toy):
    ctx = make_ctx(toy)
    calls = []
    orig = ctx.forward
    ctx.forward = lambda *a, **k: calls.append(1) or orig(*a, **k)
    s = defenses.build("cleanerclip", {"fc_samples": 32, "fc_batch": 12, "lambda1": 1.0, "lambda2": 0.5,
                                       "lambda3": 2.0})
    s.bind(ctx)
    s.on_epoch_start(0)
    loss, logs = s.loss(make_batch(ctx, 0))
    assert len(calls) == 1 and logs["fc_rows"] == 12
    assert logs["fc_loss"] == pytest.approx(0.5 * (logs["fc_img_loss"] + logs["fc_txt_loss"]), rel=1e-6)
    assert float(loss.detach()) == pytest.approx(logs["clip_loss"] + 0.5 * logs["inmodal_loss"] + 2.0 * logs["fc_loss"],
                                                 rel=1e-5)


@pytest.mark.parametrize("opts", [{}, {"lambda2": 0.0}, {"image_views": False}, {"text_views": False}])
def test_subset_rows_are_sliced_out_of_the_one_forward(toy, opts):
    ctx = make_ctx(toy)
    s = defenses.build("cleanerclip", {"fc_samples": 8, **opts})
    s.bind(ctx)
    s.on_epoch_start(0)
    batch = make_batch(ctx, 0, idx=torch.arange(6))
    idx, facts, rng = s._draw(batch)
    pos, neg, _ = s._texts(facts, rng)
    pixels, tokens = to_pixels(toy.images[idx], ctx.device), ctx.tokenize(pos + neg)
    with torch.no_grad():
        img, _, txt, _, sub_img, sub_txt, _ = s._forward_all(batch, pixels, tokens)
        want_img, want_txt, _ = ctx.forward(pixels, tokens)
        ref_img, ref_txt, _ = ctx.forward(batch.pixels, batch.tokens)
    assert torch.allclose(sub_img, want_img, atol=1e-5) and torch.allclose(sub_txt, want_txt, atol=1e-5)
    assert torch.allclose(img, ref_img, atol=1e-5) and torch.allclose(txt, ref_txt, atol=1e-5)


def test_same_seed_same_loss_sequence(toy):
    def run(seed_offset=0):
        ctx = make_ctx(toy)
        s = defenses.build("cleanerclip", {"fc_samples": 6, "crop_scale_min": 0.5})
        s.bind(ctx)
        s.on_epoch_start(0)
        opt = torch.optim.AdamW(ctx.model.parameters(), lr=1e-3)
        out = []
        for step in range(3):
            loss, logs = s.loss(make_batch(ctx, step + seed_offset))
            opt.zero_grad()
            loss.backward()
            opt.step()
            out.append(logs)
        return out

    a, b = run(), run()
    assert a == b
    assert [r["fc_loss"] for r in run(seed_offset=100)] != [r["fc_loss"] for r in a]


def test_ddp_ranks_draw_disjoint_equal_shares(toy):
    draws = []
    for rank in range(2):
        ctx = make_ctx(toy)
        ctx.dist = DistInfo(rank=rank, world_size=2)
        s = defenses.build("cleanerclip", {"fc_samples": 20, "fc_batch": 6})
        s.bind(ctx)
        rec = s.on_epoch_start(0)
        assert rec["fc_batch"] == 12
        idx, facts, _ = s._draw(make_batch(ctx, 7 + rank))        # a rank's batch seed differs
        assert len(idx) == 6 == len(facts) and set(idx.tolist()) <= set(s._subset.tolist())
        draws.append(set(idx.tolist()))
    assert not draws[0] & draws[1]


def _ddp_worker(rank: int, world: int, init: str, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    img, pos, neg = (_unit(8, 16, seed=s).requires_grad_(True) for s in (1, 2, 3))
    k = 8 // world
    mine = [x[rank * k:(rank + 1) * k].detach().clone().requires_grad_(True) for x in (img, pos, neg)]
    l_fc, l_img, l_txt = subset_fc_loss(*mine, 0.3, 0.3, DistInfo(rank=rank, world_size=world))
    l_fc.backward()
    grads = torch.cat([m.grad for m in mine], 1)
    all_grads = [torch.empty_like(grads) for _ in range(world)]
    dist.all_gather(all_grads, grads)
    if rank == 0:
        # DDP averages parameter gradients over ranks: the mean of each rank's own-row gradients
        torch.save({"loss": l_fc.detach(), "txt": l_txt.detach(), "grad": torch.cat(all_grads) / world}, out)
    dist.destroy_process_group()


def test_gathered_fc_loss_matches_one_process(tmp_path):
    mp = pytest.importorskip("torch.multiprocessing")
    out = str(tmp_path / "ddp.pt")
    mp.spawn(_ddp_worker, args=(2, f"file://{tmp_path / 'pg'}", out), nprocs=2, join=True)
    got = torch.load(out, weights_only=True)
    img, pos, neg = (_unit(8, 16, seed=s).requires_grad_(True) for s in (1, 2, 3))
    l_fc, _, l_txt = subset_fc_loss(img, pos, neg, 0.3, 0.3)
    l_fc.backward()
    want = torch.cat([img.grad, pos.grad, neg.grad], 1)
    assert float(got["loss"]) == pytest.approx(float(l_fc.detach()), rel=1e-6)
    assert float(got["txt"]) == pytest.approx(float(l_txt.detach()), rel=1e-6)
    assert torch.allclose(got["grad"], want, atol=1e-7, rtol=1e-5)


def _cfg(**kw):
    base = dict(model="cg-tiny", epochs=1, batch_size=8, lr=1e-3, warmup=3, seed=0, device="cpu", quiet=True)
    base.update(kw)
    return TrainConfig(**base)


def test_text_term_is_nonzero_on_every_step_at_the_papers_proportion(fm_train, tmp_path):
    """The paper: 1,000 of 500k pairs per epoch, batch 64, so 0.13 subset rows per batch. Here
    4 of 256 pairs with batch 8 (0.125 per batch): the subset draws its own mini-batch of 4."""
    data = fm_train.subset(range(256))
    s = defenses.build("cleanerclip", {"fc_samples": 4})
    steps, orig = [], s.loss

    def recorded(batch):
        loss, logs = orig(batch)
        steps.append({**logs, "in_batch": int(torch.isin(batch.indices, s._subset).sum())})
        return loss, logs

    s.loss = recorded
    Trainer(_cfg(), data, tmp_path, strategy=s).fit()
    assert len(steps) == 32
    assert sum(r["in_batch"] for r in steps) / len(steps) < 1                # what a batch itself holds
    assert all(r["fc_rows"] == 4 and r["fc_txt_loss"] > 0 and r["fc_img_loss"] > 0 for r in steps)
    rec = json.loads((tmp_path / "results.jsonl").read_text().splitlines()[0])
    assert rec["fc_subset"] == 4 and rec["fc_batch"] == 4 and rec["fc_txt_loss"] > 0


def _weights(run):
    return load_file(str(run / "checkpoints" / (run / "checkpoints" / "latest").read_text() / "model.safetensors"))


def test_resume_is_exact(fm_train, tmp_path):
    data = fm_train.subset(range(96))
    opts = {"fc_samples": 0.1, "fc_batch": 4}
    cfg = dict(epochs=2, batch_size=16)
    Trainer(_cfg(**cfg), data, tmp_path / "a", strategy=defenses.build("cleanerclip", opts)).fit()
    Trainer(_cfg(**cfg, stop_after=1), data, tmp_path / "b", strategy=defenses.build("cleanerclip", opts)).fit()
    Trainer(_cfg(**cfg), data, tmp_path / "b", strategy=defenses.build("cleanerclip", opts)).fit(resume="latest")
    wa, wb = _weights(tmp_path / "a"), _weights(tmp_path / "b")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    ra, rb = ([json.loads(x) for x in (tmp_path / r / "results.jsonl").read_text().splitlines()] for r in "ab")
    assert [r["fc_loss"] for r in ra] == [r["fc_loss"] for r in rb] and len(ra) == 2


def test_per_step_mode_is_seeded(toy):
    ctx = make_ctx(toy)
    s = defenses.build("cleanerclip", {"fc_per_step": 8})
    s.bind(ctx)
    s.on_epoch_start(0)
    b1, b2 = make_batch(ctx, 5), make_batch(ctx, 5)
    rows, facts = s._in_batch_rows(b1)
    rows2, facts2 = s._in_batch_rows(b2)
    assert 0 < len(rows) <= 8 and rows.tolist() == rows2.tolist() and facts == facts2
    pos, neg, _ = s._texts(facts, b1.rng)
    assert (pos, neg) == s._texts(facts2, b2.rng)[:2] and all(p != n for p, n in zip(pos, neg))
    _, logs = s.loss(make_batch(ctx, 5))
    assert logs["fc_rows"] == len(rows)


def test_losses_fall_over_a_few_steps(toy):
    ctx = make_ctx(toy)
    s = defenses.build("cleanerclip", {"fc_samples": 32, "crop_scale_min": 0.5})
    s.bind(ctx)
    s.on_epoch_start(0)
    opt = torch.optim.AdamW(ctx.model.parameters(), lr=2e-3)
    hist = []
    for step in range(12):
        loss, logs = s.loss(make_batch(ctx, step))
        opt.zero_grad()
        loss.backward()
        opt.step()
        hist.append(logs)
    for key in ("clip_loss", "inmodal_loss", "fc_loss"):
        assert hist[-1][key] < hist[0][key], key


# ---- counterfactual rules ------------------------------------------------------------------
@pytest.fixture(scope="module")
def paper():
    return CounterfactualMaker("paper")


def _diff(fact, cf):
    return [(w0, w, k) for (w0, k), (w, _) in zip(fact.parts, cf.sub.parts) if w0 != w]


def test_paper_rules_replace_both_adjectives_or_the_verb_or_both_nouns(paper):
    fact = paper.factual("a small dog chasing a red ball in the park")
    assert [k for _, k in fact.parts] == ["adj", "noun", "verb", "adj", "noun"]
    seen = set()
    for seed in range(40):
        cf = paper.make(fact, random.Random(seed))
        changed = _diff(fact, cf)
        assert not cf.fallback and len(cf.sub.parts) == len(fact.parts)
        assert {k for *_, k in changed} == {cf.kind}                    # one operation per sample
        assert len(changed) == len(fact.slots(cf.kind))                 # ...on every word of its kind
        if cf.kind == "verb":
            assert changed[0][1].endswith("ing")                        # inflection kept
        seen.add(cf.kind)
        words = {w for w0, w, _ in changed}
        listed = set(paper.lists.words(cf.kind))
        assert all(paper.wn.lemma(w, {"adj": "a", "verb": "v", "noun": "n"}[cf.kind]) in listed or w in listed
                   for w in words)
    assert seen == {"adj", "verb", "noun"}
    assert paper.make(fact, random.Random(3)) == paper.make(fact, random.Random(3))   # seeded


def test_paper_rules_skip_missing_kinds_and_keep_plurals(paper):
    fact = paper.factual("two young women are sitting on old benches")
    kinds = {paper.make(fact, random.Random(s)).kind for s in range(30)}
    assert kinds == {"adj", "verb", "noun"}
    for s in range(30):
        cf = paper.make(fact, random.Random(s))
        if cf.kind == "noun":
            changed = _diff(fact, cf)
            assert len(changed) == 2
            assert all(w.endswith("s") or paper.wn.lemma(w, "n") != w for _, w, _ in changed), changed  # plurals
    apple = paper.factual("a photo of an apple")
    assert apple.text == "apple"
    for s in range(10):                                                   # no adjective, no verb: nouns
        cf = paper.make(apple, random.Random(s))
        assert cf.kind == "noun" and not cf.fallback and cf.text != "apple"


def test_no_allowed_word_falls_back_to_the_nouns():
    verbs = CounterfactualMaker("paper", kinds=("verb",))
    fact = verbs.factual("a plain dress on a plain background.")
    cf = verbs.make(fact, random.Random(0))
    assert cf.fallback and cf.kind == "noun" and cf.sub.parts[0] == ("plain", "adj") and cf.text != fact.text
    slot = CounterfactualMaker("slot", kinds=("verb",))
    cf = slot.make(fact, random.Random(0))
    assert cf.fallback and cf.kind == "noun" and len(_diff(fact, cf)) == 1


def test_slot_mode_replaces_exactly_one_word():
    slot = CounterfactualMaker("slot")
    fact = slot.factual("a small dog chasing a red ball")
    for seed in range(15):
        cf = slot.make(fact, random.Random(seed))
        changed = _diff(fact, cf)
        assert len(changed) == 1 and changed[0][2] == cf.kind and not cf.fallback


def test_inflection(paper):
    wn = paper.wn
    assert inflect_like("run", "chasing", "chase", "verb", wn) == "running"
    assert inflect_like("stop", "chased", "chase", "verb", wn) == "stopped"
    assert inflect_like("eat", "ran", "run", "verb", wn) == "ate"
    assert inflect_like("carry", "sleeps", "sleep", "verb", wn) == "carries"
    assert inflect_like("mouse", "benches", "bench", "noun", wn) == "mice"
    assert inflect_like("berry", "dogs", "dog", "noun", wn) == "berries"
    assert inflect_like("box", "dogs", "dog", "noun", wn) == "boxes"
    assert inflect_like("tote bag", "dogs", "dog", "noun", wn) == "tote bags"
    assert inflect_like("red", "bigger", "big", "adj", wn) == "red"
    assert inflect_like("horse", "dog", "dog", "noun", wn) == "horse"
