"""The scan's neighbour search: exact, or approximate with faiss's inverted-file index."""

from __future__ import annotations

import sys

import pytest
import torch

from clipguard.detection import PairFeatures
from clipguard.detection.knn import knn
from clipguard.detection.search import NeighbourSearch, _drop_self
from clipguard.errors import ConfigError

pytest.importorskip("faiss")  # installed with clipguard[dev]; the search tells users how to get it otherwise


def clustered(n: int = 4000, dim: int = 16, clusters: int = 12, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(clusters, dim, generator=g)
    x = centres[torch.randint(0, clusters, (n,), generator=g)] + 0.4 * torch.randn(n, dim, generator=g)
    return torch.nn.functional.normalize(x, dim=1)


def test_ivf_finds_nearly_every_exact_neighbour_and_says_how_many():
    x = clustered()
    d_exact, i_exact = knn(x, x, 10, metric="l2", exclude_self=True)
    d, i, info = NeighbourSearch(method="ivf", nprobe=8, recall_sample=4000).find(x, 10, "l2")
    assert info["method"] == "ivf" and info["nlist"] == 4000 // 39 and info["nprobe"] == 8  # 4 sqrt(N) = 253, capped
    hit = (i_exact.unsqueeze(2) == i.unsqueeze(1)).any(dim=2).float().mean().item()
    assert 0.95 < hit < 1.0  # approximate, and close
    assert info["recall_at_k"] == pytest.approx(hit, abs=1e-4)  # every row sampled: the same share
    assert not (i == torch.arange(len(x)).unsqueeze(1)).any()   # a pair is never its own neighbour
    assert (d[:, 1:] >= d[:, :-1] - 1e-6).all()                  # nearest first
    same = i == i_exact
    assert torch.allclose(d[same], d_exact[same], atol=1e-5)     # the same neighbour at the same distance


def test_ivf_probing_every_cell_is_the_exact_search_and_is_repeatable():
    x = clustered(n=1000)
    s = NeighbourSearch(method="ivf", nlist=8, nprobe=8)
    d, i, info = s.find(x, 5, "cosine")
    d_exact, i_exact = knn(x, x, 5, metric="cosine", exclude_self=True)
    assert info["recall_at_k"] == 1.0
    assert torch.allclose(d, d_exact, atol=1e-5)
    assert torch.equal(s.find(x, 5, "cosine")[1], i)


def test_an_exact_copy_does_not_stop_the_row_itself_from_being_removed():
    idx = torch.tensor([[1, 0, 2], [0, 1, 2], [3, 1, 0]])  # row 0 after its copy 1; row 2 lacks itself
    sims = torch.tensor([[1.0, 1.0, 0.5], [1.0, 1.0, 0.4], [0.9, 0.8, 0.7]])
    s, i = _drop_self(sims, idx, 2)
    assert i.tolist() == [[1, 2], [0, 2], [3, 1]] and s[0].tolist() == [1.0, 0.5]


def test_pixel_signatures_and_tiny_data_stay_exact():
    x = clustered(n=60)
    assert NeighbourSearch(method="ivf").find(x, 5, "l2")[2] == {"method": "exact"}
    f = PairFeatures(clustered(n=400), clustered(n=400, seed=1), pixels=torch.randn(400, 8),
                     search=NeighbourSearch(method="ivf"))
    f.neighbours("pixels", 4)
    f.neighbours("joint", 4)
    found = f.searches()
    assert found["pixels/l2"]["method"] == "exact" and found["joint/l2"]["method"] == "ivf"


@pytest.mark.parametrize("values, message", [
    ({"method": "annoy"}, "option 'method' must be one of"),
    ({"nprobe": 0}, "nprobe must be >= 1"),
    ({"nlist": 0}, "nlist must be >= 1"),
    ({"chunk": 0}, "chunk must be >= 1"),
    ({"nprob": 3}, "did you mean 'nprobe'?"),
])
def test_bad_settings_are_named(values, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)").replace("?", r"\?")):
        NeighbourSearch.from_dict(values)


def test_without_faiss_the_error_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "faiss", None)  # import faiss now raises ImportError
    with pytest.raises(ConfigError, match=r"pip install 'clipguard\[ann\]'"):
        NeighbourSearch(method="ivf").find(clustered(n=500), 5, "l2")


def test_a_low_recall_is_a_warning(caplog):
    x = clustered(n=4000, dim=64, clusters=2)  # broad clouds in many dimensions: hard for any index
    with caplog.at_level("WARNING", logger="clipguard"):
        info = NeighbourSearch(method="ivf", nlist=8, nprobe=1).find(x, 10, "l2")[2]
    assert info["recall_at_k"] < 0.98
    assert "raise --nprobe (now 1 of 8 cells)" in caplog.text


def test_too_narrow_a_search_for_k_is_a_clear_error():
    with pytest.raises(ConfigError, match="neighbours not found with nprobe 1 of 102 cells for k = 10; raise nprobe"):
        NeighbourSearch(method="ivf", nprobe=1).find(clustered(n=4000, dim=64, clusters=2), 10, "l2")


def test_cells_and_probes_grow_with_the_data_unless_given():
    s = NeighbourSearch()
    assert s.cells(60_000) == 980 and s.cells(1_000_000) == 4000 and s.cells(100) == 2  # 4 sqrt(N), N / 39 at most
    assert s.probes(980) == 32 and s.probes(4000) == 63 and s.probes(10) == 10
    assert NeighbourSearch(nlist=50, nprobe=5).cells(60_000) == 50 and NeighbourSearch(nprobe=5).probes(980) == 5


def test_a_long_exact_search_on_the_cpu_names_the_approximate_one(caplog):
    from clipguard.detection.runner import EXACT_HINT_PAIRS, hint_search

    with caplog.at_level("WARNING", logger="clipguard"):
        hint_search(NeighbourSearch(), EXACT_HINT_PAIRS - 1, torch.device("cpu"))
        hint_search(NeighbourSearch(method="ivf"), 10 ** 6, torch.device("cpu"))
        hint_search(NeighbourSearch(), 10 ** 6, torch.device("cuda"))
        assert caplog.text == ""
        hint_search(NeighbourSearch(), 10 ** 6, torch.device("cpu"))
    assert "1000000 pairs" in caplog.text and "--neighbour-search ivf" in caplog.text
