"""Our checkpoints open in plain open_clip: as ``local-dir:`` folders, in a process that never
imports clipguard, and by config name once ``register_model_configs`` ran."""

import json
import subprocess
import sys

import numpy as np
import open_clip
import torch
from PIL import Image

from clipguard.models import create_model, get_tokenizer, register_model_configs, save_checkpoint
from clipguard.models.checkpoint import MODEL_FILE, OPEN_CLIP_CONFIG
from clipguard.models.factory import CONFIG_DIR

CHILD = r"""
import json, sys
import torch, open_clip
from PIL import Image
from safetensors.torch import load_file

d = sys.argv[1]
model, _, preprocess = open_clip.create_model_and_transforms('local-dir:' + d)
tok = open_clip.get_tokenizer('local-dir:' + d)
sd, mine = load_file(d + '/model.safetensors'), model.state_dict()
same = sd.keys() == mine.keys() and all(torch.equal(sd[k], v) for k, v in mine.items())
x = preprocess(Image.open(sys.argv[2])).unsqueeze(0)
t = tok(['a photo of a bag.', 'a sandal'])
model.eval()
with torch.no_grad():
    img, txt = model.encode_image(x, normalize=True), model.encode_text(t, normalize=True)
print(json.dumps({'same': same, 'clipguard': sorted(m for m in sys.modules if m.startswith('clipguard')),
                  'tokens': t.tolist(), 'img': img.tolist(), 'txt': txt.tolist()}))
"""


def test_checkpoint_folder_is_an_open_clip_local_dir(tmp_path):
    from clipguard.evaluation.features import encode_images

    model = create_model("cg-nano", seed=3)
    folder = tmp_path / "run" / "checkpoints" / "epoch_001"
    save_checkpoint(folder, model, state={"model": "cg-nano"}, model_name="cg-nano")
    cfg = json.loads((folder / OPEN_CLIP_CONFIG).read_text())
    assert cfg["model_cfg"]["vision_cfg"]["image_size"] == 28 and cfg["preprocess_cfg"]["size"] == 28
    pixels = np.random.default_rng(0).integers(0, 256, (28, 28, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "img.png")

    r = subprocess.run([sys.executable, "-c", CHILD, str(folder), str(tmp_path / "img.png")],
                       capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["same"] and out["clipguard"] == []

    # same tokens, same embeddings as clipguard's own pipeline (uint8 -> [0, 1] -> OpenAI mean/std)
    tok = get_tokenizer("cg-nano")
    assert out["tokens"] == tok(["a photo of a bag.", "a sandal"]).tolist()
    model.eval()
    img = encode_images(model, torch.from_numpy(pixels).permute(2, 0, 1).unsqueeze(0), "cpu")
    assert torch.allclose(torch.tensor(out["img"]), img, atol=1e-5)
    with torch.no_grad():
        txt = model.encode_text(tok(["a photo of a bag.", "a sandal"]), normalize=True)
    assert torch.allclose(torch.tensor(out["txt"]), txt, atol=1e-5)


def test_save_without_model_name_writes_no_open_clip_config(tmp_path):
    save_checkpoint(tmp_path / "ck", create_model("cg-nano", seed=0), state={"model": "cg-nano"})
    assert (tmp_path / "ck" / MODEL_FILE).is_file() and not (tmp_path / "ck" / OPEN_CLIP_CONFIG).exists()


def test_clipguard_reads_local_dir_models(tmp_path):
    model = create_model("cg-nano", seed=1)
    save_checkpoint(tmp_path / "ck", model, state={"model": "cg-nano"}, model_name="cg-nano")
    name = f"local-dir:{tmp_path / 'ck'}"
    again = create_model(name)  # the folder's own weights
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
    assert torch.equal(get_tokenizer(name)(["a tee"]), get_tokenizer("cg-nano")(["a tee"]))


def test_register_model_configs_is_idempotent(tmp_path):
    names = register_model_configs()
    assert {"cg-nano", "cg-tiny"} <= set(names)
    assert register_model_configs() == names
    assert open_clip.factory._MODEL_CONFIG_PATHS.count(CONFIG_DIR) == 1
    assert {"cg-nano", "cg-tiny"} <= set(open_clip.list_models())

    model = create_model("cg-tiny", seed=0)
    save_checkpoint(tmp_path / "ck", model, state={"model": "cg-tiny"})
    theirs = open_clip.create_model("cg-tiny", pretrained=str(tmp_path / "ck" / MODEL_FILE))
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), theirs.state_dict().values()))
