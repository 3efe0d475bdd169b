"""Augmentations: seeded, fresh per call, never empty; image views keep shape and range."""

import random

import pytest
import torch

from clipguard.data.augment import EDA, simclr_augment

CAPTION = "a photo of a black leather ankle boot on a white background"


@pytest.fixture(scope="module")
def eda() -> EDA:
    return EDA()


def test_eda_deterministic_under_seed(eda):
    a = [eda.augment(CAPTION, r) for r in [random.Random(7)] for _ in range(20)]
    b = [eda.augment(CAPTION, r) for r in [random.Random(7)] for _ in range(20)]
    assert a == b
    assert eda.augment_batch([CAPTION] * 5, random.Random(2)) == \
        eda.augment_batch([CAPTION] * 5, random.Random(2))


def test_eda_draws_fresh_each_call(eda):
    rng = random.Random(0)
    views = {eda.augment(CAPTION, rng) for _ in range(30)}
    assert len(views) > 5
    assert any(v != CAPTION for v in views)


@pytest.mark.parametrize("op", ["synonym", "insert", "swap", "delete"])
def test_eda_each_operation_changes_something(op):
    eda = EDA(operations=(op,), p_delete=0.3)
    rng = random.Random(1)
    views = [eda.augment(CAPTION, rng) for _ in range(10)]
    assert any(v != CAPTION for v in views)
    if op == "swap":
        assert all(sorted(v.split()) == sorted(CAPTION.split()) for v in views)
    if op == "delete":
        assert all(len(v.split()) <= len(CAPTION.split()) for v in views)
    if op == "insert":
        assert all(len(v.split()) > len(CAPTION.split()) for v in views)


def test_eda_never_empty():
    eda = EDA(operations=("delete",), p_delete=1.0)
    rng = random.Random(0)
    for cap in ["boot", "a bag", "the the the", CAPTION]:
        for _ in range(10):
            assert eda.augment(cap, rng).strip()
    assert EDA().augment("", rng) == ""


def test_eda_rejects_unknown_operation():
    with pytest.raises(ValueError):
        EDA(operations=("shout",))


def _pixels(n=8, size=16):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(0))


def test_simclr_shape_range_deterministic():
    x = _pixels()
    a = simclr_augment(x, torch.Generator().manual_seed(5))
    b = simclr_augment(x, torch.Generator().manual_seed(5))
    assert a.shape == x.shape and a.dtype == x.dtype
    assert a.min() >= 0 and a.max() <= 1
    assert torch.equal(a, b)
    c = simclr_augment(x, torch.Generator().manual_seed(6))
    assert not torch.equal(a, c)


def test_simclr_differs_per_sample():
    # Identical inputs must get different views: the randomness is per sample, not per batch.
    x = _pixels(1).expand(6, -1, -1, -1).contiguous()
    y = simclr_augment(x, torch.Generator().manual_seed(0))
    flat = y.flatten(1)
    assert all(not torch.allclose(flat[0], flat[i]) for i in range(1, 6))


def test_simclr_identity_settings_keep_image():
    x = _pixels(4)
    y = simclr_augment(x, torch.Generator().manual_seed(0), scale=(1.0, 1.0), ratio=(1.0, 1.0),
                       flip_p=0.0, jitter_p=0.0, gray_p=0.0)
    assert torch.allclose(x, y, atol=1e-5)


def test_simclr_flip_only_flips():
    x = _pixels(4)
    y = simclr_augment(x, torch.Generator().manual_seed(0), scale=(1.0, 1.0), ratio=(1.0, 1.0),
                       flip_p=1.0, jitter_p=0.0, gray_p=0.0)
    assert torch.allclose(y, x.flip(-1), atol=1e-5)


def test_simclr_grayscale_makes_channels_equal():
    x = _pixels(4)
    y = simclr_augment(x, torch.Generator().manual_seed(0), scale=(1.0, 1.0), ratio=(1.0, 1.0),
                       flip_p=0.0, jitter_p=0.0, gray_p=1.0)
    assert torch.allclose(y[:, 0], y[:, 1]) and torch.allclose(y[:, 1], y[:, 2])


def test_simclr_bad_shape():
    with pytest.raises(ValueError):
        simclr_augment(torch.rand(2, 1, 8, 8), torch.Generator())
    assert simclr_augment(torch.rand(0, 3, 8, 8), torch.Generator()).shape[0] == 0
    with pytest.raises(ValueError, match="hue"):
        simclr_augment(torch.rand(2, 3, 8, 8), torch.Generator(), jitter=(0.4, 0.4, 0.4, 0.7))


@pytest.mark.parametrize("geometric_only", [False, True])
def test_simclr_views_of_some_rows_are_those_of_the_whole_batch(geometric_only):
    """``rows`` transforms only those samples but draws for the whole batch: the views equal the
    full call's rows bit for bit, and the generator ends in the same state (so a later draw, and
    a run, does not depend on which rows were asked for); no rows still consumes the draws."""
    from clipguard.data.augment import Views

    views = Views(crop_scale_min=0.08)
    px = torch.rand(48, 3, 28, 28, generator=torch.Generator().manual_seed(0))
    for rows in (torch.tensor([0, 5, 6, 47]), torch.arange(48), torch.tensor([], dtype=torch.long)):
        g_all, g_some = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
        full = views.images(px, g_all, geometric_only=geometric_only)
        some = views.images(px, g_some, geometric_only=geometric_only, rows=rows)
        assert some.shape == (len(rows), 3, 28, 28)
        assert torch.equal(full[rows], some)
        assert torch.equal(g_all.get_state(), g_some.get_state())


def test_simclr_blur_smooths_noise_keeps_the_mean_and_changes_nothing_at_zero():
    """``blur_p`` 1 low-passes every view (a noise pattern loses most of its pixel-to-pixel
    variation, the mean stays); ``blur_p`` 0 draws nothing, so views and generator state equal the
    call without it; ``rows`` gives the full call's blurred views."""
    from clipguard.data.augment import Views

    noise = torch.rand(6, 3, 28, 28, generator=torch.Generator().manual_seed(1))
    ident = dict(scale=(1.0, 1.0), ratio=(1.0, 1.0), flip_p=0.0, jitter_p=0.0, gray_p=0.0)
    y = simclr_augment(noise, torch.Generator().manual_seed(0), blur_p=1.0, blur_sigma=(1.0, 1.0), **ident)

    def roughness(t):
        return float((t[..., 1:] - t[..., :-1]).abs().mean())

    assert roughness(y) < 0.6 * roughness(noise)
    assert abs(float(y.mean()) - float(noise.mean())) < 0.02
    g0, g1 = torch.Generator().manual_seed(4), torch.Generator().manual_seed(4)
    assert torch.equal(simclr_augment(noise, g0), simclr_augment(noise, g1, blur_p=0.0))
    assert torch.equal(g0.get_state(), g1.get_state())
    views = Views(crop_scale_min=0.5, blur_p=0.5)
    rows = torch.tensor([1, 4])
    full = views.images(noise, torch.Generator().manual_seed(9))
    some = views.images(noise, torch.Generator().manual_seed(9), rows=rows)
    assert torch.equal(full[rows], some)


def test_roclip_blur_option_is_checked():
    from clipguard import defenses

    assert defenses.build("roclip", {"blur_p": 0.5}).opt.blur_p == 0.5
    with pytest.raises(Exception, match="blur_p"):
        defenses.build("roclip", {"blur_p": 1.5})


def test_noise_erase_is_seeded_and_does_what_the_par_authors_views_do():
    from clipguard.data.augment import noise_erase
    from clipguard.tensors import OPENAI_MEAN

    x = torch.rand(64, 3, 28, 28) * 0.5
    a = noise_erase(x, torch.Generator().manual_seed(3))
    b = noise_erase(x, torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and a.shape == x.shape and float(a.min()) >= 0 and float(a.max()) <= 1
    assert not torch.equal(a, noise_erase(x, torch.Generator().manual_seed(4)))
    # nothing drawn: the image itself; noise only: never darker (the authors clamp it to [0, 1])
    assert torch.equal(noise_erase(x, torch.Generator(), noise_p=0.0, erase_p=0.0), x)
    noisy = noise_erase(x, torch.Generator().manual_seed(0), noise_p=1.0, erase_p=0.0)
    assert bool((noisy >= x).all()) and float((noisy - x).mean()) > 0.05
    # erasing only: one square per image of 0.5-1% of the area (2-3 px at 28 px), CLIP's mean colour
    erased = noise_erase(x, torch.Generator().manual_seed(0), noise_p=0.0, erase_p=1.0)
    changed = (erased != x).any(1)                       # (B, H, W)
    counts = changed.flatten(1).sum(1)
    assert set(counts.tolist()) <= {4, 9} and bool((counts > 0).all())
    mean = torch.tensor(OPENAI_MEAN).view(3, 1)
    assert torch.allclose(erased.permute(0, 2, 3, 1)[changed].t(), mean.expand(3, int(changed.sum())))
    half = noise_erase(x, torch.Generator().manual_seed(1))
    touched = (half != x).flatten(1).any(1).float().mean()
    assert 0.55 < float(touched) < 0.95                   # 1 - 0.5 * 0.5 of the images, give or take
    with pytest.raises(ValueError, match="erase_area"):
        noise_erase(x, torch.Generator(), erase_area=(0.0, 0.1))


def test_hue_shift_is_the_textbook_hsv_round_trip():
    """The batched hue rotation against Python's ``colorsys`` per pixel (grey, saturated,
    black and white pixels included), for shifts of either sign and across the wrap."""
    import colorsys

    from clipguard.data.augment.image import _shift_hue

    g = torch.Generator().manual_seed(0)
    x = torch.rand(6, 3, 5, 5, generator=g)
    x[0] = x[0, :1]                       # grey: hue undefined, unchanged
    x[1, :, 0, 0] = torch.tensor([1.0, 0.0, 0.0])
    x[1, :, 0, 1] = torch.tensor([0.0, 0.0, 0.0])
    x[1, :, 0, 2] = torch.tensor([1.0, 1.0, 1.0])
    x[1, :, 0, 3] = torch.tensor([0.2, 0.9, 0.9])   # max shared by two channels
    shift = torch.tensor([0.3, -0.1, 0.5, -0.5, 0.05, 0.0]).view(6, 1, 1, 1)
    y = _shift_hue(x, shift)
    for i in range(6):
        for r in range(5):
            for c in range(5):
                h, s, v = colorsys.rgb_to_hsv(*x[i, :, r, c].tolist())
                want = colorsys.hsv_to_rgb((h + float(shift[i])) % 1.0, s, v)
                assert y[i, :, r, c].tolist() == pytest.approx(want, abs=1e-5)


def test_wrap_is_the_float_remainder_bit_for_bit():
    from clipguard.data.augment.image import _wrap

    g = torch.Generator().manual_seed(1)
    for period in (1.0, 6.0):
        a = torch.empty(200_000).uniform_(-period, 2 * period, generator=g)
        a = torch.cat([a, torch.tensor([-period, -0.0, 0.0, period, -1e-30, 1e-30])])
        a = torch.cat([a, torch.nextafter(a, torch.tensor(2 * period)), torch.nextafter(a, torch.tensor(-period))])
        a = a[(a >= -period) & (a < 2 * period)]
        assert torch.equal(_wrap(a, period), a % period)


def test_colour_jitter_leaves_the_samples_it_skips_untouched():
    """Jitter applies to a drawn share of the samples and is computed for those only: the others
    come back as they went in, bit for bit."""
    from clipguard.data.augment.image import _color_jitter

    x = torch.rand(64, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    some = _color_jitter(x, torch.Generator().manual_seed(5), (0.4, 0.4, 0.4, 0.1), 0.5, 64, None)
    g = torch.Generator().manual_seed(5)
    for _ in range(4):  # the four factors' draws come first
        torch.rand(64, generator=g)
    apply = torch.rand(64, generator=g) < 0.5
    assert 0 < int(apply.sum()) < 64
    assert torch.equal(some[~apply], x[~apply])
    assert not torch.equal(some[apply], x[apply])


def test_hue_jitter_skips_grey_samples_bit_for_bit():
    """Grey samples are fixed points of the hue rotation, so the jitter computes only the samples
    with colour; the result is the full computation's, bit for bit, on grey, colour and mixed
    batches (a grey sample comes back clamped, as the full computation returns it)."""
    from clipguard.data.augment.image import _hue_jitter, _shift_hue

    g = torch.Generator().manual_seed(3)
    x = torch.rand(40, 3, 9, 9, generator=g)
    x[::2] = x[::2, :1].expand(-1, 3, -1, -1)        # every other sample grey
    x[1, :, :4] = x[1, :1, :4]                         # a colour sample with grey pixels
    x[3] = x[3] * 1.001                                # a little out of range before the clamp
    x[4] = x[4] * 1.001                                # grey, out of range too
    shift = torch.empty(40).uniform_(-0.5, 0.5, generator=g).view(-1, 1, 1, 1)
    for rows in (slice(None), slice(0, None, 2), slice(1, None, 2), slice(0, 0)):
        batch, s = x[rows], shift[rows]
        assert torch.equal(_hue_jitter(batch, s), _shift_hue(batch, s).clamp(0, 1))
    grey = x[::2].clone()
    assert torch.equal(_hue_jitter(grey, shift[::2]), grey.clamp(0, 1))
