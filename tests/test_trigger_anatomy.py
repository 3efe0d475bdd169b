"""benchmarks/trigger_anatomy.py: the image tower's stages, their activations per image, and the
weight change per stage (zero for the same model, only where weights moved)."""

import copy

import torch
from _benchmarks import load_benchmark


def test_stages_activations_and_weight_change():
    from clipguard.models.factory import create_model

    mod = load_benchmark("trigger_anatomy")
    net = create_model("cg-nano", seed=0)
    names = list(mod.stages(net.visual))
    assert names[0] == "patch" and names[-1] == "post" and len(names) == 2 + len(net.visual.transformer.resblocks)
    images = torch.randint(0, 256, (5, 3, 28, 28), dtype=torch.uint8)
    feats, acts = mod.activations(net, images)
    assert feats.shape[0] == 5 and torch.allclose(feats.norm(dim=1), torch.ones(5), atol=1e-5)
    assert set(acts) == set(names) and all(a.shape[0] == 5 for a in acts.values())
    again, _ = mod.activations(net, images)
    assert torch.equal(feats, again)  # hooks removed, eval mode: the same features twice
    other = copy.deepcopy(net)
    assert all(v == 0.0 for v in mod.weight_change(net, other).values())
    with torch.no_grad():
        other.visual.transformer.resblocks[0].mlp.c_fc.weight.add_(0.1)
    dw = mod.weight_change(net, other)
    assert dw["block1"] > 0 and all(v == 0.0 for k, v in dw.items() if k != "block1")
