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
