"""Each trigger does what its definition says, and is a deterministic function of (image, params, seed)."""

from __future__ import annotations

import math

import pytest
import torch
from _attack_data import ctx_for, pixels, setup

from clipguard import attacks
from clipguard.errors import ConfigError


def test_registry_lists_every_attack():
    assert set(attacks.names()) >= {"tdpa", "badnet", "blended", "wanet", "sig", "label_consistent",
                                    "htba", "multi", "badclip"}
    with pytest.raises(ConfigError, match="unknown attack"):
        attacks.get("ssba")
    with pytest.raises(ConfigError, match="no option"):
        attacks.build("badnet", {"sizee": 3})


@pytest.mark.parametrize("pattern", ["noise", "solid", "checker"])
def test_badnet_patch_pixels_equal_the_pattern_and_nothing_else_changes(pattern):
    a = setup("badnet", pattern=pattern, size=5)
    x = pixels()
    y = a.trigger(x)
    assert a.patch.shape == (3, 5, 5)
    assert torch.equal(y[:, :, -5:, -5:], a.patch.expand(3, -1, -1, -1))
    mask = torch.ones(28, 28, dtype=torch.bool)
    mask[-5:, -5:] = False
    assert torch.equal(y[:, :, mask], x[:, :, mask])


def test_badnet_default_size_scales_with_the_image():
    assert setup("badnet").patch_px == 4                      # 28 px -> 4 px
    assert setup("badnet", ctx_for(224, 224)).patch_px == 32  # 224 px -> 32 px
    assert setup("badnet", ctx_for(7, 7)).patch_px == 1       # never below 1 px


def test_patch_larger_than_image_is_an_error():
    with pytest.raises(ConfigError, match="larger than the 28x28 image"):
        setup("badnet", size=29)
    with pytest.raises(ConfigError, match="location"):
        attacks.build("badnet", {"location": "somewhere"})


def test_badnet_four_corners_and_random_location_are_deterministic():
    a = setup("badnet", size=3, location="corners", pattern="checker")
    y = a.trigger(pixels(1))
    for sl in [(slice(0, 3), slice(0, 3)), (slice(0, 3), slice(-3, None)),
               (slice(-3, None), slice(0, 3)), (slice(-3, None), slice(-3, None))]:
        assert torch.equal(y[0, :, sl[0], sl[1]], a.patch)
    r = setup("badnet", size=3, location="random")
    x = pixels(6)
    y1, y2 = r.trigger(x), r.trigger(x)
    assert torch.equal(y1, y2)                       # same image, same place
    changed = [(y1[i] != x[i]).any(0).nonzero().min(0).values.tolist() for i in range(6)]
    assert len({tuple(c) for c in changed}) > 1      # but the place depends on the image


def test_patterns_depend_on_the_trigger_seed_only():
    a, b = setup("badnet", ctx_for(seed=1)), setup("badnet", ctx_for(seed=1))
    c = setup("badnet", ctx_for(seed=2))
    assert torch.equal(a.patch, b.patch) and not torch.equal(a.patch, c.patch)
    assert torch.equal(a.patch, (a.patch * 255).round() / 255)  # on the uint8 grid: PNG stores it exactly


def test_blended_formula_and_identity_at_alpha_zero():
    x = pixels()
    assert torch.equal(setup("blended", alpha=0.0).trigger(x), x)
    a = setup("blended", alpha=0.2)
    assert torch.allclose(a.trigger(x), 0.8 * x + 0.2 * a.P)
    assert torch.equal(setup("blended", alpha=1.0).trigger(x), a.P.expand_as(x))
    with pytest.raises(ConfigError):
        attacks.build("blended", {"alpha": 1.5})


def test_sig_equals_its_formula():
    x = torch.full((2, 3, 28, 28), 0.5)
    a = setup("sig")
    y = a.trigger(x)
    j = torch.arange(28, dtype=torch.float64)
    v = (20 / 255) * torch.sin(2 * math.pi * j * 6 / 28)
    expected = 0.5 + v.float().view(1, 1, 1, 28).expand(2, 3, 28, 28)
    assert torch.allclose(y, expected, atol=1e-6)
    assert torch.allclose(y[:, :, 0], y[:, :, 17])       # constant down each column
    assert setup("sig", delta=0.3).trigger(torch.ones(1, 3, 28, 28)).max() <= 1.0  # clamped


def test_wanet_identity_at_zero_strength():
    x = pixels()
    y = setup("wanet", s=0.0).trigger(x)
    assert torch.allclose(y, x, atol=1e-6)
    u8 = (x * 255).round().to(torch.uint8)
    assert torch.equal(setup("wanet", s=0.0).apply_u8(u8), u8)


def test_wanet_is_a_smooth_bounded_warp():
    a = setup("wanet", k=4, s=0.5)
    ys = torch.linspace(-1, 1, 28, dtype=torch.float64)
    yy, xx = torch.meshgrid(ys, ys, indexing="ij")
    flow = a.grid[0] - torch.stack((xx, yy), -1)
    # bounded: each displacement at most s/size * max|normalised field| (bicubic may overshoot a bit)
    assert flow.abs().max() <= 0.5 / 28 * 4 * 1.5
    assert flow.abs().max() > 0.5 / 28 * 0.5      # and not the identity
    # smooth: neighbouring displacements differ far less than the displacement itself (inside
    # the border, where clamping to the image cuts the field off)
    inner = flow[1:-1, 1:-1]
    assert (inner[1:] - inner[:-1]).abs().max() < 0.35 * inner.abs().max()
    assert (inner[:, 1:] - inner[:, :-1]).abs().max() < 0.35 * inner.abs().max()
    x = pixels()
    y = a.trigger(x)
    assert y.min() >= 0 and y.max() <= 1
    assert (y - x).abs().mean() < 0.2              # a warp, not a new image
    # a warp only moves pixel values: a constant image stays constant
    c = torch.full((1, 3, 28, 28), 0.3)
    assert torch.allclose(a.trigger(c), c, atol=1e-6)


def test_htba_patch_is_top_left_and_smooth():
    a = setup("htba", size=6, cells=2)
    x = pixels(2)
    y = a.trigger(x)
    assert torch.equal(y[:, :, :6, :6], a.patch.expand(2, -1, -1, -1))
    assert torch.equal(y[:, :, 6:, :], x[:, :, 6:, :])


def test_multi_hybrid_applies_every_trigger():
    ctx = ctx_for()
    m = setup("multi", ctx, triggers="badnet,sig")
    x = torch.full((1, 3, 28, 28), 0.5)
    u8 = (x * 255).round().to(torch.uint8)
    y = m.apply_u8(u8)
    expected = m.subs["sig"].apply_u8(m.subs["badnet"].apply_u8(u8))
    assert torch.equal(y, expected)
    assert not torch.equal(m.subs["badnet"].patch, setup("badnet", ctx).patch)  # own trigger seed
    with pytest.raises(ConfigError, match="at least two"):
        attacks.build("multi", {"triggers": "badnet"})
