"""PAR's structured triggers (stripes, text-trigger, triangles): the pixels are as defined, bounded,
in the right region, sized with the image, deterministic, and written like every other attack."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from _attack_data import ctx_for, make_dataset, pixels, setup

from clipguard import attacks
from clipguard.data.csv_dataset import load_csv
from clipguard.errors import ConfigError


def only_changed_in(y: torch.Tensor, x: torch.Tensor, rows: slice, cols: slice) -> bool:
    mask = torch.ones(x.shape[-2:], dtype=torch.bool)
    mask[rows, cols] = False
    return torch.equal(y[..., mask], x[..., mask])


def test_registered_with_options_listed():
    assert {"stripes", "text-trigger", "triangles"} <= set(attacks.names())
    for name in ("stripes", "triangles", "text-trigger"):
        assert {"mode", "alpha", "location", "position"} <= set(attacks.get(name).option_names())


# ---------------------------------------------------------------------------------- stripes
def test_stripes_blend_is_the_formula_with_signed_stripes():
    a = setup("stripes", alpha=0.2)
    S = a.P
    assert S.shape == (3, 28, 28) and set(S.unique().tolist()) <= {-1.0, 1.0}
    assert torch.equal(S, S[:, :1, :].expand_as(S))                 # vertical: constant down each column
    assert len({tuple(S[:, 0, j].tolist()) for j in range(28)}) > 1  # stripes differ
    x = pixels()
    y = a.trigger(x)
    assert torch.allclose(y, (0.8 * x + 0.2 * S).clamp(0, 1), atol=1e-6)
    assert y.min() >= 0 and y.max() <= 1
    assert torch.equal(setup("stripes", alpha=0.0).trigger(x), x)
    h = setup("stripes", orientation="horizontal").P
    assert torch.equal(h, h[:, :, :1].expand_as(h))                  # horizontal: constant along rows


def test_stripe_width_scales_with_the_image():
    assert setup("stripes").width_px == 1                               # PAR: 1 px at 224; 1 px at 28
    assert setup("stripes", ctx_for(224, 224)).width_px == 1
    assert setup("stripes", ctx_for(448, 448)).width_px == 2
    assert setup("stripes", width_frac=1 / 28).width_px == 1
    assert setup("stripes", ctx_for(224, 224), width_frac=1 / 28).width_px == 8
    a = setup("stripes", width=3)
    for k in range(0, 27, 3):
        block = a.P[:, :, k:k + 3]
        assert torch.equal(block, block[:, :, :1].expand_as(block))      # 3 px wide stripes


def test_stripes_patch_is_a_pasted_square_of_0_1_stripes():
    a = setup("stripes", mode="patch")
    assert a.patch_px == 4 and a.P.shape == (3, 4, 4)
    assert set(a.P.unique().tolist()) <= {0.0, 1.0}
    x = pixels()
    y = a.trigger(x)
    assert torch.equal(y[:, :, -4:, -4:], a.P.expand(3, -1, -1, -1))
    assert only_changed_in(y, x, slice(-4, None), slice(-4, None))
    assert setup("stripes", ctx_for(224, 224), mode="patch").patch_px == 32
    # the patch's stripes are the blend's signs mapped to 0/1 (same seed, same first stripes)
    assert torch.equal(a.P[:, 0, :], (setup("stripes").P[:, 0, :4] + 1) / 2)


def test_stripes_depend_on_the_trigger_seed():
    a, b, c = (setup("stripes", ctx_for(seed=s)) for s in (1, 1, 2))
    assert torch.equal(a.P, b.P) and not torch.equal(a.P, c.P)
    assert a.params()["pattern_sha256"] == b.params()["pattern_sha256"] != c.params()["pattern_sha256"]


# ---------------------------------------------------------------------------------- triangles
def expected_triangles(h: int, w: int, c: int, lo: float = 0.4, hi: float = 0.8) -> torch.Tensor:
    t = torch.empty(h, w)
    for i in range(h):
        for j in range(w):
            t[i, j] = lo if i % c >= j % c else hi
    return ((t * 255).round() / 255).expand(3, h, w)


def test_triangles_blend_is_the_tiling_blended():
    a = setup("triangles")
    assert a.cell_px == 4
    assert torch.equal(a.P, expected_triangles(28, 28, 4))
    x = pixels()
    assert torch.allclose(a.trigger(x), 0.8 * x + 0.2 * a.P, atol=1e-6)
    b = setup("triangles", ctx_for(224, 224))
    assert b.cell_px == 14                                      # PAR's 14 px cells at 224 px
    assert torch.equal(b.P[:, :28, :28], expected_triangles(28, 28, 14))
    assert setup("triangles", ctx_for(12, 12)).cell_px == 4     # never below 4 px by default
    assert setup("triangles", cell=2).cell_px == 2              # unless asked


def test_triangles_patch_and_random_palette():
    a = setup("triangles", mode="patch", size=8, position="top-left")
    assert torch.equal(a.P, expected_triangles(8, 8, 4))
    x = pixels()
    y = a.trigger(x)
    assert torch.equal(y[:, :, :8, :8], a.P.expand(3, -1, -1, -1))
    assert only_changed_in(y, x, slice(0, 8), slice(0, 8))
    r = setup("triangles", palette="random", ctx=ctx_for(seed=3))
    assert torch.equal(r.P, (r.P * 255).round() / 255)         # on the uint8 grid
    cell = r.P[:, :4, :4]
    ii, jj = torch.meshgrid(torch.arange(4), torch.arange(4), indexing="ij")
    lower, upper = cell[:, ii >= jj], cell[:, ii < jj]
    assert torch.equal(lower, lower[:, :1].expand_as(lower))     # one colour per triangle
    assert torch.equal(upper, upper[:, :1].expand_as(upper))
    assert not torch.equal(lower[:, 0], upper[:, 0])
    assert not torch.equal(r.P, setup("triangles", palette="random", ctx=ctx_for(seed=4)).P)


# ---------------------------------------------------------------------------------- text
def test_text_blend_changes_only_the_glyphs_in_the_centred_box():
    a = setup("text-trigger", alpha=0.5)
    m = a.M[0]
    h, w = m.shape
    assert h == 7 and a.height_px == 7 and 1 < w <= 28
    assert m.min() == 0 and 0.5 < m.max() <= 1 and torch.equal(m, (m * 255).round() / 255)
    top, left = (28 - h) // 2, (28 - w) // 2
    x = pixels()
    y = a.trigger(x)
    assert only_changed_in(y, x, slice(top, top + h), slice(left, left + w))
    box_x, box_y = x[:, :, top:top + h, left:left + w], y[:, :, top:top + h, left:left + w]
    red = torch.tensor([1.0, 0.0, 0.0]).view(1, 3, 1, 1)
    assert torch.allclose(box_y, (1 - 0.5 * m) * box_x + 0.5 * m * red, atol=1e-6)
    assert torch.equal(box_y[..., m == 0], box_x[..., m == 0])     # off the glyphs: untouched
    assert setup("text-trigger", ctx_for(224, 224)).height_px == 56


def test_text_patch_is_an_opaque_box_at_the_position():
    a = setup("text-trigger", mode="patch", position="top-left", margin=1, text="Hi",
              color=1.0, background=[0.0, 0.0, 1.0])
    h, w = a.P.shape[-2:]
    x = pixels()
    y = a.trigger(x)
    assert torch.equal(y[:, :, 1:1 + h, 1:1 + w], a.P.expand(3, -1, -1, -1))
    assert only_changed_in(y, x, slice(1, 1 + h), slice(1, 1 + w))
    m = setup("text-trigger", text="Hi").M                          # the glyph coverage
    bg, fg = torch.tensor([0.0, 0.0, 1.0]).view(3, 1, 1), torch.ones(3, 1, 1)
    assert torch.equal(a.P, ((bg * (1 - m) + fg * m) * 255).round() / 255)
    assert torch.equal(a.P[:, m[0] == 0], bg.view(3, 1).expand(3, int((m == 0).sum())))


def test_text_is_deterministic_and_recorded():
    a, b = setup("text-trigger", ctx_for(seed=1)), setup("text-trigger", ctx_for(seed=2))
    assert torch.equal(a.M, b.M)                       # the rendering has no randomness at all
    p = a.params()
    assert p["text"] == "ABC" and p["height_px"] == 7 and p["text_box_px"] == list(a.M.shape[-2:])
    assert p["pillow_version"] and p["font"] and len(p["pattern_sha256"]) == 64
    assert not torch.equal(setup("text-trigger", text="XYZ").M, a.M)


# ---------------------------------------------------------------------------------- errors
@pytest.mark.parametrize("name,opts,msg", [
    ("stripes", {"mode": "sideways"}, "mode must be one of"),
    ("stripes", {"alpha": 1.5}, r"alpha must be in \[0, 1\]"),
    ("stripes", {"orientation": "diagonal"}, "orientation"),
    ("stripes", {"width": 0}, "at least 1 px"),
    ("stripes", {"width": 2.5}, "whole number"),
    ("triangles", {"palette": "rainbow"}, "palette"),
    ("triangles", {"levels": [0.5]}, "levels must be two values"),
    ("triangles", {"levels": [0.5, 2]}, "levels must be in"),
    ("triangles", {"cell": 1}, "at least 2 px"),
    ("text-trigger", {"text": ""}, "non-empty line"),
    ("text-trigger", {"text": "a\nb"}, "one non-empty line"),
    ("text-trigger", {"text": True}, "must be a string"),
    ("text-trigger", {"color": [1, 0]}, "color must be one value or three"),
    ("text-trigger", {"location": "somewhere"}, "location"),
    ("text-trigger", {"margin": -1}, "margin"),
    ("triangles", {"sizee": 3}, "no option"),
])
def test_bad_options_are_config_errors(name, opts, msg):
    with pytest.raises(ConfigError, match=msg):
        attacks.build(name, opts)


@pytest.mark.parametrize("name,opts,msg", [
    ("stripes", {"mode": "patch", "size": 29}, "larger than the 28x28 image"),
    ("triangles", {"cell": 40}, "larger than the 28x28 image"),
    ("text-trigger", {"text": "a much too long trigger"}, "wider than the 28x28 image"),
])
def test_triggers_that_do_not_fit_are_config_errors(name, opts, msg):
    with pytest.raises(ConfigError, match=msg):
        setup(name, **opts)


# ---------------------------------------------------------------------------------- poison_csv
@pytest.fixture(scope="module")
def ds(tmp_path_factory) -> tuple[Path, Path]:
    return make_dataset(tmp_path_factory.mktemp("syn") / "syn", size=28)


def files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("name,opts,derived", [
    ("stripes", {"mode": "blend", "alpha": 0.3}, {"width_px": 1, "patch_px": None}),
    ("stripes", {"mode": "patch", "location": "random"}, {"patch_px": 4}),
    ("triangles", {"palette": "random"}, {"cell_px": 4}),
    ("triangles", {"mode": "patch"}, {"patch_px": 4, "cell_px": 4}),
    ("text-trigger", {"text": "hi", "alpha": 0.6}, {"height_px": 7}),
    ("text-trigger", {"mode": "patch", "position": "bottom-left"}, {"height_px": 7}),
])
def test_poisoned_folder_records_the_trigger_and_is_reproducible(ds, tmp_path, name, opts, derived):
    train, test = ds
    kw = dict(target="star", count=4, eval_csv=test, options=opts)
    m = attacks.poison_csv(train, name, seed=5, out=tmp_path / "a", **kw)
    attacks.poison_csv(train, name, seed=5, out=tmp_path / "b", **kw)
    assert files(tmp_path / "a") == files(tmp_path / "b")            # same seed: byte-identical
    p = m["params"]
    assert m["attack"] == name and m["kind"] == "backdoor" and p["trigger_seed"] == 5
    assert {k: p[k] for k in opts} == opts and {k: p[k] for k in derived} == derived
    assert len(p["pattern_sha256"]) == 64
    # training poisons and ASR images carry the same trigger: re-applying it to the clean images
    # gives exactly what was written
    a = attacks.build(name, opts)
    a.setup(ctx_for(28, 28, seed=5))
    src, out = load_csv(train), load_csv(tmp_path / "a" / "train.csv")
    for row, s in zip(m["poisoned_rows"], m["poison_sources"]):
        assert int(src.labels[s]) != 2
        assert torch.equal(out.images[row], a.apply_u8(src.images[s]))
    clean_test = load_csv(test)
    asr = load_csv(tmp_path / "a" / "asr_eval.csv")
    assert m["eval"]["kind"] == "backdoor" and len(asr) == int((clean_test.labels != 2).sum())
    idx = [i for i in range(len(clean_test)) if int(clean_test.labels[i]) != 2]
    assert torch.equal(asr.images, a.apply_u8(clean_test.images[idx]))


def test_another_trigger_seed_changes_seeded_patterns_only(ds, tmp_path):
    train, _ = ds
    m1 = attacks.poison_csv(train, "stripes", target="star", count=2, seed=0, out=tmp_path / "a")
    m2 = attacks.poison_csv(train, "stripes", target="star", count=2, seed=0, trigger_seed=1, out=tmp_path / "b")
    assert m1["poison_sources"] == m2["poison_sources"]
    assert m1["params"]["pattern_sha256"] != m2["params"]["pattern_sha256"]
