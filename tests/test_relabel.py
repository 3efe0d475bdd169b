"""Borrowed captions for dropped pairs: from the kept pairs around the image, by the medoid caption."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from clipguard.detection.relabel import borrowed_captions


def _unit(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(x, dim=1)


def test_a_dropped_image_borrows_a_caption_of_its_own_cluster_not_a_kept_poisons():
    g = torch.Generator().manual_seed(0)
    d = 16
    centres_img = _unit(torch.randn(3, d, generator=g))
    centres_txt = _unit(torch.randn(3, d, generator=g))
    cls = torch.arange(3).repeat_interleave(20)                       # 60 pairs, 3 classes
    image = _unit(centres_img[cls] + 0.05 * torch.randn(60, d, generator=g))
    text = _unit(centres_txt[cls] + 0.05 * torch.randn(60, d, generator=g))
    # two kept poisons in class 0's image cluster carry class 2's caption
    text[[1, 2]] = _unit(centres_txt[2] + 0.05 * torch.randn(2, d, generator=g))
    keep = np.ones(60, dtype=bool)
    dropped = [0, 5, 25, 45]
    keep[dropped] = False
    got = borrowed_captions(image, text, keep, k=8)
    assert got.shape == (4,) and keep[got].all()
    assert [int(cls[r]) for r in got] == [0, 0, 1, 2]
    assert not set(got.tolist()) & {1, 2}              # outvoted by the clean captions around them
    # k = 1 takes the nearest kept pair whatever its caption: the poisons can pass theirs on
    nearest = borrowed_captions(image, text, keep, k=1)
    sims = image[dropped] @ image[torch.from_numpy(np.flatnonzero(keep))].T
    assert nearest.tolist() == np.flatnonzero(keep)[sims.argmax(dim=1).numpy()].tolist()
    # chunking does not change the answer
    assert borrowed_captions(image, text, keep, k=8, chunk=1).tolist() == got.tolist()


def test_edge_cases_are_plain():
    image = _unit(torch.randn(5, 4))
    text = _unit(torch.randn(5, 4))
    assert borrowed_captions(image, text, np.ones(5, dtype=bool)).size == 0
    assert borrowed_captions(image, text, np.array([1, 0, 0, 0, 0], dtype=bool), k=16).tolist() == [0, 0, 0, 0]
    with pytest.raises(ValueError, match="no pair is kept"):
        borrowed_captions(image, text, np.zeros(5, dtype=bool))
    with pytest.raises(ValueError, match="one flag per pair"):
        borrowed_captions(image, text, np.ones(4, dtype=bool))
    with pytest.raises(ValueError, match="k must be"):
        borrowed_captions(image, text, np.ones(5, dtype=bool), k=0)
