"""The text tower on the captions only (``trim_text``): the same features and gradients as
open_clip's padded encode_text, installed only where that holds, off by default on the CPU."""

import copy
import pickle

import open_clip
import pytest
import torch

from clipguard.models import text_trim
from clipguard.models.factory import create_model, get_tokenizer
from clipguard.models.text_trim import enable_text_trim, trimmed_length
from clipguard.training.spec import resolve_spec
from clipguard.training.trainer import TrainConfig, Trainer

pytestmark = pytest.mark.usefixtures("one_thread")

CAPTIONS = ["a photo of a sandal", "a bag", "someone is selling a cheap ankle boot online, with a long story",
            "x", "a shirt that a man wore to the office on a rainy tuesday morning in spring"]


def _stock(model, tokens, normalize=False):
    return type(model).encode_text(model, tokens, normalize=normalize)  # open_clip's own method


def test_trimmed_length_rounds_up_and_never_exceeds_the_row():
    tok = get_tokenizer("cg-tiny")  # context 32
    t = tok(["a photo of a sandal"])  # start + 5 words + end = 7 positions
    assert trimmed_length(t) == 8
    assert trimmed_length(tok(CAPTIONS)) == 24  # the longest caption (17 positions), a multiple of 8
    assert trimmed_length(tok(["word " * 100])) == 32  # truncated rows stay whole
    assert trimmed_length(t[:, :6]) == 6  # a row no longer than the bucket is left as it is
    assert trimmed_length(torch.zeros(0, 32, dtype=torch.long)) == 32


@pytest.mark.parametrize("name", ["cg-nano", "cg-tiny"])
def test_same_features_and_gradients_as_open_clip(name):
    model = create_model(name, seed=0, trim_text=False)
    trimmed = copy.deepcopy(model)
    assert enable_text_trim(trimmed)
    tokens = get_tokenizer(name)(CAPTIONS[:4])  # at most 16 positions: cg-nano's rows have 20
    assert trimmed_length(tokens) < tokens.shape[1]  # the test trims something
    for normalize in (False, True):
        torch.testing.assert_close(trimmed.encode_text(tokens, normalize=normalize),
                                   _stock(model, tokens, normalize), rtol=1e-5, atol=1e-6)
    images = torch.rand(len(tokens), 3, 28, 28)
    for m in (model, trimmed):
        img, txt, scale = m(images, tokens)
        (img @ txt.T * scale).logsumexp(dim=1).sum().backward()
    grads = dict(model.named_parameters())
    for k, p in trimmed.named_parameters():
        torch.testing.assert_close(p.grad, grads[k].grad, rtol=1e-4, atol=1e-6, msg=k)


def test_installed_per_instance_and_by_device():
    assert "encode_text" not in vars(create_model("cg-nano", seed=0))  # CPU default: open_clip's method
    assert "encode_text" not in vars(create_model("cg-nano", seed=0, trim_text=False))
    on = create_model("cg-nano", seed=0, trim_text=True)
    assert vars(on)["encode_text"].func is text_trim._encode_text_trimmed
    assert "encode_text" not in vars(create_model("cg-nano", seed=0))  # other instances untouched
    twin = copy.deepcopy(on)  # a copy (EMA, a teacher) encodes with its own weights
    assert twin.encode_text.args[0] is twin
    back = pickle.loads(pickle.dumps(on))  # and the model still pickles
    assert back.encode_text.args[0] is back
    tokens = get_tokenizer("cg-nano")(CAPTIONS[:2])
    torch.testing.assert_close(back.encode_text(tokens), on.encode_text(tokens))
    assert set(on.state_dict()) == set(create_model("cg-nano", seed=0).state_dict())  # open_clip's keys


def test_left_alone_where_padding_can_matter():
    cfg = {"embed_dim": 32, "vision_cfg": {"image_size": 28, "layers": 1, "width": 32, "head_width": 16, "patch_size": 7},
           "text_cfg": {"context_length": 20, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
    bidirectional = open_clip.CLIP(**{**cfg, "text_cfg": {**cfg["text_cfg"], "no_causal_mask": True}})
    last_token = open_clip.CLIP(**{**cfg, "text_cfg": {**cfg["text_cfg"], "pool_type": "last"}})
    for m in (bidirectional, last_token):
        assert not enable_text_trim(m) and "encode_text" not in vars(m)
    assert enable_text_trim(open_clip.CLIP(**cfg))


def test_not_installed_when_the_probe_disagrees(monkeypatch, caplog):
    model = create_model("cg-nano", seed=0, trim_text=False)
    monkeypatch.setattr(text_trim, "_encode_text_trimmed", lambda self, text, normalize=False: torch.zeros(2, 64))
    assert not enable_text_trim(model) and "encode_text" not in vars(model)
    with caplog.at_level("WARNING", logger="clipguard"):  # asked for explicitly: the user is told
        assert "encode_text" not in vars(create_model("cg-nano", seed=0, trim_text=True))
    assert "keeps open_clip's encode_text" in caplog.text


def test_trainer_setting_is_speed_only(fm_train, tmp_path):
    assert TrainConfig().trim_text is None
    plain, fast = resolve_spec(defense="safeclip"), resolve_spec(defense="safeclip", train={"trim_text": True})
    assert fast.train.trim_text is True and fast.fingerprint() == plain.fingerprint()
    cfg = TrainConfig(model="cg-nano", epochs=1, batch_size=32, warmup=1, device="cpu", quiet=True, trim_text=True)
    t = Trainer(cfg, fm_train.subset(range(64)), tmp_path / "run")
    t.fit()
    assert vars(t.model)["encode_text"].func is text_trim._encode_text_trimmed


def test_speed_flags_of_train_and_finetune():
    from clipguard.cli import build_parser
    from clipguard.commands.train import spec_from_args

    base = ["--data", "d.csv", "--out", "o"]
    t = spec_from_args(build_parser().parse_args(["train", *base])).train
    assert (t.compile, t.channels_last, t.trim_text, t.workers) == (False, False, None, None)
    args = build_parser().parse_args(["train", *base, "--compile", "--channels-last", "--trim-text", "--workers", "3"])
    t = spec_from_args(args).train
    assert (t.compile, t.channels_last, t.trim_text, t.workers) == (True, True, True, 3)
    args = build_parser().parse_args(["finetune", *base, "--checkpoint", "ck", "--no-trim-text"])
    assert spec_from_args(args, stage="finetune", checkpoint="ck").train.trim_text is False
    preset = {"train": {"compile": True, "channels_last": True}}  # a preset's speed settings ...
    args = build_parser().parse_args(["train", *base])
    args.preset = preset
    t = spec_from_args(args).train
    assert (t.compile, t.channels_last) == (True, True)  # ... hold when no flag is given
    args = build_parser().parse_args(["train", *base, "--no-compile", "--no-channels-last"])
    args.preset = preset
    t = spec_from_args(args).train
    assert (t.compile, t.channels_last) == (False, False)  # ... and a --no-flag turns them off
    plain = spec_from_args(build_parser().parse_args(["train", *base, "--defense", "safeclip"]))
    fast = spec_from_args(build_parser().parse_args(["train", *base, "--defense", "safeclip", "--compile", "--trim-text"]))
    assert fast.fingerprint() == plain.fingerprint()
