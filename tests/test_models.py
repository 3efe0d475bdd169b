import open_clip
import torch

from clipguard.models import create_model, get_tokenizer, list_models
from clipguard.models.checkpoint import save_checkpoint


def test_tiny_model_is_open_clip_and_seeded():
    a, b = create_model("cg-tiny", seed=1), create_model("cg-tiny", seed=1)
    assert isinstance(a, open_clip.model.CLIP)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert "cg-tiny" in list_models() and "ViT-B-32" in list_models()


def test_tokenizer_keeps_end_of_text_when_truncating():
    tok = get_tokenizer("cg-tiny")
    t = tok(["word " * 100])
    assert t.shape == (1, 32) and int(t[0, -1]) == tok.eot_token_id


def test_checkpoint_loads_in_open_clip(tmp_path):
    m = create_model("cg-tiny", seed=0)
    save_checkpoint(tmp_path / "ck", m, state={"model": "cg-tiny"})
    m2 = open_clip.create_model("cg-tiny", pretrained=str(tmp_path / "ck" / "model.safetensors"))
    assert all(torch.equal(x, y) for x, y in zip(m.state_dict().values(), m2.state_dict().values()))
    m3 = create_model("cg-tiny", checkpoint=tmp_path / "ck")
    assert torch.equal(m3.logit_scale, m.logit_scale)


def test_real_architecture_by_name():
    m = create_model("RN50", seed=0)
    assert m.visual.image_size == 224 or tuple(m.visual.image_size) == (224, 224)


def test_cached_tokenizer_gives_open_clips_tokens_exactly():
    """The memo (whole captions, and word by word for plain ASCII) must never change a token."""
    import random

    import open_clip

    from clipguard.data.augment import EDA

    tok = get_tokenizer("cg-tiny")  # registers our configs first: the reference must use context 32
    ref = open_clip.get_tokenizer("cg-tiny")
    assert ref.context_length == tok.context_length == 32
    rng = random.Random(0)
    base = ["someone is selling a cheap sandal online.", "my new tee.", "A close-up of a PLAIN   dress!",
            "it's the t-shirt's 2nd wash; it'll shrink (maybe)", "rock & roll <start_of_text> jeans",
            "café crème brûlée", "tab\tseparated\nlines", "&amp; html &lt;b&gt;", "", "   ",
            "word " * 40, "quote \"x\" ~weird~ {braces} [x] a|b ^_^ `tick` @home #1 $5 50% *star* +plus/slash\\"]
    alphabet = [chr(c) for c in range(32, 127)] + ["é", "\u2019", "&", "<", "\t"]
    fuzz = ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 60))) for _ in range(300)]
    eda = EDA()
    aug = [eda.augment_batch(base[:4], rng) for _ in range(50)]
    texts = base + fuzz + [c for batch in aug for c in batch]
    for _ in range(2):  # the second pass is served from the caches
        assert torch.equal(tok(texts), ref(texts))
    assert torch.equal(tok(texts[0]), ref(texts[0]))
    assert torch.equal(tok(texts[:3], context_length=6), ref(texts[:3], context_length=6))


def test_building_a_model_does_not_warn_that_it_is_random(caplog):
    """open_clip's "initialized randomly" warning is dropped (it printed for every model, loaded
    checkpoints included); other warnings still reach the log."""
    import logging

    with caplog.at_level(logging.WARNING):
        create_model("cg-nano", seed=0)
        logging.warning("something else")
    assert "initialized randomly" not in caplog.text and "something else" in caplog.text
