"""What every detector shares: the pair features it scores, its options, its keep rule.

A detector turns the embeddings of N image-caption pairs into N scores, higher meaning more
suspicious, and says which pairs to keep when the user gives no fraction (``keep_rule``). It is
one module under ``clipguard/detection/detectors/`` with one ``@DETECTORS.register("name")``.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import numpy as np
import torch

from clipguard.detection.search import NeighbourSearch
from clipguard.errors import ConfigError
from clipguard.options import Options, require
from clipguard.registry import Registry

SPACES = ("image", "text", "joint", "pixels")
MAD_TO_STD = 1.4826  # the MAD of a normal distribution times this is its standard deviation


# ---------------------------------------------------------------------------- features
@dataclass
class Neighbours:
    """k nearest neighbours of every pair among the other pairs, nearest first."""

    distances: torch.Tensor  # (N, k) float32, CPU
    indices: torch.Tensor    # (N, k) long, CPU
    seconds: float           # what the search cost

    def first(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.distances[:, :k], self.indices[:, :k]


@dataclass
class PairFeatures:
    """L2-normalised image and text embeddings of N pairs (row i of both is pair i), and the
    pair's cosine similarity (computed when not given).

    ``device`` is where neighbour searches run and ``search`` how (exact, or approximate with
    faiss); their results are cached per (space, metric), so several density detectors on one
    space pay for one search (the largest k asked for).

    ``reference``: the same pairs under a reference model (one trained without the data under
    scan), for detectors that compare the two (``Detector.needs_reference``)."""

    image: torch.Tensor
    text: torch.Tensor
    similarity: torch.Tensor | None = None
    device: str | torch.device = "cpu"
    search: NeighbourSearch = field(default_factory=NeighbourSearch)
    pixels: torch.Tensor | None = None  # coarse pixel signatures (clipguard.data.signatures), when asked for
    residuals: torch.Tensor | None = None  # high-passed grey images (signatures.pixel_residuals), when asked for
    reference: PairFeatures | None = None
    _cache: dict[tuple[str, str], Neighbours] = field(default_factory=dict, init=False, repr=False)
    _joint: torch.Tensor | None = field(default=None, init=False, repr=False)
    _spent: float = field(default=0.0, init=False, repr=False)
    _searches: dict[str, dict] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.image.ndim != 2 or self.text.ndim != 2 or len(self.image) != len(self.text):
            raise ValueError(f"image and text features must be (N, d) with the same N, got "
                             f"{tuple(self.image.shape)} and {tuple(self.text.shape)}")
        self.image = torch.nn.functional.normalize(self.image.detach().float().cpu(), dim=1)
        self.text = torch.nn.functional.normalize(self.text.detach().float().cpu(), dim=1)
        if self.similarity is None:
            if self.image.shape[1] != self.text.shape[1]:
                raise ValueError("image and text features of different widths: pass the similarity")
            self.similarity = (self.image * self.text).sum(dim=1)
        self.similarity = self.similarity.detach().float().cpu().reshape(-1)
        if len(self.similarity) != len(self.image):
            raise ValueError(f"{len(self.similarity)} similarities for {len(self.image)} pairs")
        if self.pixels is not None:
            self.pixels = self.pixels.detach().float().cpu()
            if self.pixels.ndim != 2 or len(self.pixels) != len(self.image):
                raise ValueError(f"pixel signatures must be (N, d) for {len(self.image)} pairs, got "
                                 f"{tuple(self.pixels.shape)}")
        if self.residuals is not None:
            self.residuals = self.residuals.detach().float().cpu()
            if self.residuals.ndim != 2 or len(self.residuals) != len(self.image):
                raise ValueError(f"pixel residuals must be (N, d) for {len(self.image)} pairs, got "
                                 f"{tuple(self.residuals.shape)}")
        if self.reference is not None and len(self.reference) != len(self.image):
            raise ValueError(f"the reference features hold {len(self.reference)} pairs, these {len(self.image)}")

    def __len__(self) -> int:
        return len(self.image)

    def space(self, name: str) -> torch.Tensor:
        """The embedding a density detector works in: image, text, or both (concatenated and
        renormalised, so each modality weighs the same); or, for near-copies, the images' coarse
        pixel signatures, which need no model at all."""
        if name == "image":
            return self.image
        if name == "text":
            return self.text
        if name == "joint":
            if self._joint is None:
                self._joint = torch.nn.functional.normalize(torch.cat([self.image, self.text], dim=1), dim=1)
            return self._joint
        if name == "pixels":
            if self.pixels is None:
                raise ConfigError("space 'pixels' needs the images' pixel signatures, which these features "
                                  "were encoded without")
            return self.pixels
        raise ConfigError(f"unknown feature space '{name}'; choose one of: {', '.join(SPACES)}")

    def search_seconds(self) -> float:
        """Seconds spent on every neighbour search so far (the reference's included)."""
        return self._spent + (self.reference.search_seconds() if self.reference is not None else 0.0)

    def search_cost(self, space: str, metric: str) -> float:
        """Seconds the (cached) search in ``space`` with ``metric`` took; 0 if none ran."""
        hit = self._cache.get((space, metric))
        return hit.seconds if hit is not None else 0.0

    def cached(self, space: str, metric: str, k: int) -> Neighbours | None:
        hit = self._cache.get((space, metric))
        return hit if hit is not None and hit.distances.shape[1] >= k else None

    def neighbours(self, space: str, k: int, metric: str = "l2") -> Neighbours:
        """The k nearest other pairs of each pair in ``space`` (by ``search``; cached)."""
        hit = self.cached(space, metric, k)
        if hit is not None:
            return hit
        if k >= len(self):
            raise ConfigError(f"k = {k} neighbours needs more than {k} pairs; the data has {len(self)}")
        x = self.space(space)
        t0 = time.perf_counter()
        # pixel signatures are not normalised: their L2 distance is measured as it is (exactly)
        d, i, info = self.search.find(x, k, "euclidean" if space == "pixels" else metric, self.device)
        if torch.device(self.device).type == "cuda":
            torch.cuda.synchronize(self.device)
        found = Neighbours(d.float().cpu(), i.cpu(), time.perf_counter() - t0)
        self._spent += found.seconds
        self._cache[(space, metric)] = found
        self._searches[f"{space}/{metric}"] = {**info, "k": k}
        return found

    def searches(self) -> dict[str, dict]:
        """What each neighbour search was ("space/metric": method, k, and for an approximate
        search its cells and measured recall), the reference's under "reference/..."."""
        out = dict(self._searches)
        if self.reference is not None:
            out.update({f"reference/{key}": v for key, v in self.reference.searches().items()})
        return out


def mean_cosine_to_neighbours(x: torch.Tensor, idx: torch.Tensor, step: int) -> torch.Tensor:
    """Each row's mean cosine with the rows ``idx`` names (unit rows; ``idx`` (N, k)), computed in
    blocks of ``step`` rows so that N x k x d floats are never held at once (16 GB for 64
    neighbours of 64 floats at a million pairs)."""
    out = torch.empty(len(x))
    step = max(1, step)
    for i in range(0, len(x), step):
        out[i:i + step] = (x[i:i + step].unsqueeze(1) * x[idx[i:i + step]]).sum(dim=2).mean(dim=1)
    return out


# ---------------------------------------------------------------------------- keep rules
@dataclass
class KeepDecision:
    """Which pairs to keep (True) and how that was decided, for scan.json."""

    mask: np.ndarray
    rule: dict[str, Any]

    @property
    def kept(self) -> int:
        return int(self.mask.sum())


def robust_keep(scores: np.ndarray, z: float) -> KeepDecision:
    """Keep pairs whose score is at most median + z * 1.4826 * MAD (a robust z-score cut).

    When over half the scores are equal (MAD 0) the mean absolute deviation stands in; when all
    are equal, every pair is kept."""
    s = np.asarray(scores, dtype=np.float64)
    med = float(np.median(s))
    mad = float(np.median(np.abs(s - med)))
    spread, how = MAD_TO_STD * mad, "mad"
    if spread == 0.0:
        spread, how = math.sqrt(math.pi / 2) * float(np.mean(np.abs(s - med))), "mean_abs_dev"
    cut = med + z * spread if spread > 0 else math.inf
    mask = s <= cut
    return KeepDecision(mask, {"rule": "robust_z", "z": z, "median": med, "spread": spread,
                               "spread_from": how, "threshold": cut if math.isfinite(cut) else None})


def fraction_keep(scores: np.ndarray, fraction: float) -> KeepDecision:
    """Keep the ``fraction`` of pairs with the lowest scores (ties: the earlier row first)."""
    from clipguard.defenses.split import top_fraction_mask

    if not 0.0 < fraction <= 1.0:
        raise ConfigError(f"--keep-fraction must be in (0, 1], got {fraction}")
    s = torch.from_numpy(np.asarray(scores, dtype=np.float64))
    mask = top_fraction_mask(-s, fraction).numpy()
    kept = s[torch.from_numpy(mask)]
    return KeepDecision(mask, {"rule": "fraction", "fraction": fraction,
                               "threshold": float(kept.max()) if len(kept) else None})


def veto_keep(primary: KeepDecision, vetoes: dict[str, KeepDecision]) -> KeepDecision:
    """``primary``'s kept pairs minus every pair a veto detector's own rule rejects.

    One detector rarely sees every kind of poison: a general one (caption agreement, density)
    misses groups of copies larger than its neighbourhood, which ``repeat`` flags exactly. A veto
    adds such a narrow detector's verdict without replacing the main ranking."""
    mask = primary.mask.copy()
    info = []
    for name, d in vetoes.items():
        info.append({"detector": name, **d.rule, "rejected": int((~d.mask).sum()),
                     "dropped_by_it_alone": int((mask & ~d.mask).sum())})
        mask &= d.mask
    return KeepDecision(mask, {**primary.rule, "vetoes": info})


def within_keep(primary: KeepDecision, earlier: np.ndarray, source: str) -> KeepDecision:
    """``primary``'s kept pairs that an earlier scan (``source``) kept too: a second pass that
    cannot let back what the first dropped."""
    mask = primary.mask & earlier
    return KeepDecision(mask, {**primary.rule, "within": source,
                               "dropped_by_within_only": int((primary.mask & ~earlier).sum())})


# ---------------------------------------------------------------------------- detectors
@dataclass
class DetectorOptions(Options):
    """Options every score-based detector takes: ``z`` of its robust keep rule."""

    kind: ClassVar[str] = "detector"
    z: float = 3.0  # keep score <= median + z * 1.4826 * MAD when no --keep-fraction is given
    # what a pair's score is measured against: "all", as it is (every pair against every pair);
    # "caption", minus the median score of the caption_k pairs whose captions are nearest its own.
    # A class whose clean pairs all score high (diverse or easily confused images) is then not
    # dropped whole, and a poison is measured against the clean pairs of the caption it carries
    relative_to: Literal["all", "caption"] = field(default="all", metadata={"neutral": "all"})
    caption_k: int = field(default=64, metadata={"neutral": 64})

    def validate(self) -> None:
        require(self.z > 0, f"option 'z' must be > 0, got {self.z}")
        require(self.relative_to in ("all", "caption"),
                f"option 'relative_to' must be 'all' or 'caption', got {self.relative_to!r}")
        require(self.caption_k >= 1, f"option 'caption_k' must be >= 1, got {self.caption_k}")


class Detector:
    """Base class. Subclasses set ``name`` and define ``score``.

    A detector with options of its own sets ``options_class`` (a ``DetectorOptions`` dataclass
    whose ``kind`` names it); one that only takes its base's options leaves it out and gets an
    empty subclass of them, named after it (``KDistDetector`` -> ``KDistOptions``, kind
    ``detector 'kdist'``), so its errors and ``build``'s type check name that detector."""

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""  # one line for --list and the docs
    options_class: ClassVar[type[DetectorOptions]] = DetectorOptions
    # compares the scanned model with a reference model (PairFeatures.reference); such a detector
    # is left out of the default set when no reference is given, and refused when named without one
    needs_reference: ClassVar[bool] = False
    # reads the images' high-passed pixels (PairFeatures.residuals), computed only when asked for
    needs_residuals: ClassVar[bool] = False
    # run when the user names no detector; a detector that needs more than the embeddings (a copy of
    # every image's pixels) runs only when named
    in_default_set: ClassVar[bool] = True

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.name and "options_class" not in cls.__dict__:
            cls.options_class = _named_options(cls)

    def __init__(self, options: DetectorOptions | None = None) -> None:
        self.opt = options if options is not None else self.options_class()

    def neighbour_key(self) -> tuple[str, str] | None:
        """(space, metric) of the neighbour search this detector uses, if any (for timing)."""
        return None

    def searches(self, features: PairFeatures) -> list[tuple[PairFeatures, str, str]]:
        """The neighbour searches this detector reads: (features searched, space, metric)."""
        key = self.neighbour_key()
        return [(features, *key)] if key is not None else []

    def search_cost(self, features: PairFeatures) -> float:
        """Seconds of the (cached) neighbour searches this detector reads, each counted once, for
        scan.json."""
        once = {(id(f), space, metric): f.search_cost(space, metric) for f, space, metric in self.searches(features)}
        return float(sum(once.values()))

    def reference_of(self, features: PairFeatures) -> PairFeatures:
        """``features.reference``, or the error that says how to give one."""
        if features.reference is None:
            raise missing_reference(self.name)
        return features.reference

    def score(self, features: PairFeatures) -> np.ndarray:
        """(N,) float64 scores; higher means more likely poisoned."""
        raise NotImplementedError

    def scores(self, features: PairFeatures) -> np.ndarray:
        """``score``, made relative to the pairs with the nearest captions when the options ask
        (``relative_to: caption``). What the scan runs."""
        s = self.score(features)
        if self.opt.relative_to == "caption":
            s = caption_relative(s, features, self.opt.caption_k)
        return s

    def keep_rule(self, scores: np.ndarray) -> KeepDecision:
        """The pairs to keep when the user gives no ``--keep-fraction``."""
        return robust_keep(scores, self.opt.z)


def missing_reference(name: str) -> ConfigError:
    """The error for a detector that needs a reference model run without one."""
    return ConfigError(f"detector '{name}' compares the model with a reference model: give --reference "
                       f"CHECKPOINT (a model trained without the data under scan, e.g. on a small trusted set)")


def caption_relative(scores: np.ndarray, features: PairFeatures, k: int) -> np.ndarray:
    """Each score minus the median score of the ``k`` other pairs whose captions are nearest its
    own (text space, the search shared with text-space detectors)."""
    if k >= len(features):
        raise ConfigError(f"caption_k = {k} needs more than {k} pairs; the data has {len(features)}")
    _, idx = features.neighbours("text", k, "l2").first(k)
    s = np.asarray(scores, dtype=np.float64)
    return s - np.median(s[idx.numpy()], axis=1)


def _named_options(cls: type[Detector]) -> type[DetectorOptions]:
    """``cls``'s inherited options as a dataclass of their own, kind ``detector '<name>'``, set in
    the detector's module under its name (so it imports and pickles like a written one)."""
    title = cls.__name__.removesuffix("Detector") + "Options"
    body = {"kind": f"detector '{cls.name}'", "__module__": cls.__module__, "__qualname__": title}
    opts = dataclass(type(title, (cls.options_class,), body))
    setattr(sys.modules[cls.__module__], title, opts)
    return opts


DETECTORS: Registry[type[Detector]] = Registry("detector", package="clipguard.detection.detectors")


def names() -> list[str]:
    return DETECTORS.names()


def get(name: str) -> type[Detector]:
    return DETECTORS.get(name)


def build(name: str, options: dict[str, Any] | DetectorOptions | None = None, *, where: str = "") -> Detector:
    """A detector with validated options; a bad name, key or value is a one-line ConfigError."""
    cls = get(name)
    if isinstance(options, Options):
        if not isinstance(options, cls.options_class):
            raise ConfigError(f"{where + ': ' if where else ''}detector '{name}' takes "
                              f"{cls.options_class.__name__}, got {type(options).__name__}")
        options.check(where)
        opt = options
    else:
        opt = cls.options_class.from_dict(options, where=where)
    det = cls(opt)
    det.name = name
    return det


def needs_reference(name: str, options: dict[str, Any] | DetectorOptions | None = None) -> bool:
    """Whether detector ``name`` with these options compares with a reference model (``shift``, or
    an ensemble with it among its members): such a detector runs only where a reference is given."""
    return build(name, options).needs_reference


def default_detectors(reference: bool) -> list[str]:
    """The detectors a scan runs when none is named: every registered one that runs unnamed, those
    that compare with a reference model only when one is given."""
    return [n for n in names() if get(n).in_default_set and (reference or not needs_reference(n))]


def finite_scores(scores: torch.Tensor | np.ndarray, fill: float | None = None) -> np.ndarray:
    """float64 scores with NaN and infinities replaced (by the largest finite score + 1, unless
    ``fill``): a degenerate neighbourhood ranks as most suspicious, never breaks a metric."""
    s = np.asarray(scores.detach().cpu().numpy() if isinstance(scores, torch.Tensor) else scores,
                   dtype=np.float64).reshape(-1)
    bad = ~np.isfinite(s)
    if bad.any():
        finite = s[~bad]
        top = fill if fill is not None else (float(finite.max()) + 1.0 if finite.size else 0.0)
        s = s.copy()
        s[np.isneginf(s)] = float(finite.min()) if finite.size else 0.0
        s[np.isnan(s) | np.isposinf(s)] = top
    return s
