"""Linear probe: logistic regression on frozen image features (scikit-learn).

Without an explicit ``C`` the probe follows the linear-probe protocol of the CLIP paper: the
L2 regularisation strength is chosen on a validation split held out of the probe's own training
features, then the probe is refitted on all of them with that ``C``.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split

from clipguard.errors import DataError
from clipguard.evaluation.features import encode_images

C_GRID = tuple(float(c) for c in np.logspace(-4, 4, 9))  # coarse sweep: one value per decade
VAL_FRACTION = 0.2
FALLBACK_C = 1.0  # when there are too few images to hold a validation split out


class LinearProbe:
    """fit/score like scikit-learn; also predicts top-k for the linear-probe ASR.

    ``C=None`` (the default) chooses C on a seeded, stratified validation split of the training
    features (``val_fraction`` of them): every C of ``C_GRID``, then the two half-decade
    neighbours of the best one; the highest validation accuracy wins, ties going to the smaller
    C. The probe is then refitted on all training features with that C. A given ``C`` is used
    as it is, with no validation split. After ``fit``: ``chosen_C``, ``val_accuracy`` (None with
    a given C), ``n_val`` and ``C_source`` ("given", "validation" or "fallback")."""

    def __init__(self, C: float | None = None, max_iter: int = 1000, seed: int = 0,
                 val_fraction: float = VAL_FRACTION):
        self.C, self.max_iter, self.seed, self.val_fraction = C, max_iter, seed, val_fraction
        self.clf: LogisticRegression | None = None
        self.source, self.n_train = "", 0  # what it was fitted on, for the protocols that quote it
        self.chosen_C: float | None = None
        self.val_accuracy: float | None = None
        self.n_val = 0
        self.C_source = ""
        self.val_curve: dict[float, float] = {}  # every C tried -> its validation accuracy

    def _clf(self, C: float, warm_start: bool = False) -> LogisticRegression:
        return LogisticRegression(C=C, max_iter=self.max_iter, random_state=self.seed, warm_start=warm_start)

    def _split(self, x: np.ndarray, y: np.ndarray):
        """(x_fit, x_val, y_fit, y_val), stratified where every class can be; None when the fitting
        part would not hold two classes (too few images for a validation split)."""
        idx = np.arange(len(y))
        try:
            fit_i, val_i = train_test_split(idx, test_size=self.val_fraction, random_state=self.seed, stratify=y)
        except ValueError:  # a class with a single image, or fewer validation images than classes
            try:
                fit_i, val_i = train_test_split(idx, test_size=self.val_fraction, random_state=self.seed)
            except ValueError:
                return None
        if len(val_i) == 0 or len(np.unique(y[fit_i])) < 2:
            return None
        return x[fit_i], x[val_i], y[fit_i], y[val_i]

    def select_C(self, x: np.ndarray, y: np.ndarray) -> float:
        """The C with the best validation accuracy (ties: the smaller C); sets the selection record."""
        split = self._split(x, y)
        if split is None:
            self.chosen_C, self.val_accuracy, self.n_val, self.C_source = FALLBACK_C, None, 0, "fallback"
            self.val_curve = {}
            return FALLBACK_C
        x_fit, x_val, y_fit, y_val = split
        curve: dict[float, float] = {}
        coefs: dict[float, tuple[np.ndarray, np.ndarray]] = {}
        clf = self._clf(C_GRID[0], warm_start=True)

        def trial(C: float) -> None:
            clf.set_params(C=C)
            with warnings.catch_warnings():  # a candidate that stops at max_iter is still a candidate
                warnings.simplefilter("ignore", ConvergenceWarning)
                clf.fit(x_fit, y_fit)
            curve[C] = float((clf.predict(x_val) == y_val).mean())
            coefs[C] = (clf.coef_.copy(), clf.intercept_.copy())

        for C in C_GRID:  # ascending: each fit starts from the more regularised solution before it
            trial(C)
        best = min(curve, key=lambda c: (-curve[c], c))
        for C in (best / np.sqrt(10.0), best * np.sqrt(10.0)):
            clf.coef_, clf.intercept_ = (a.copy() for a in coefs[best])
            trial(float(C))
        best = min(curve, key=lambda c: (-curve[c], c))
        self.chosen_C, self.val_accuracy, self.n_val, self.C_source = best, curve[best], len(y_val), "validation"
        self.val_curve = dict(sorted(curve.items()))
        return best

    def fit(self, features: torch.Tensor, labels: torch.Tensor, source: str = "") -> "LinearProbe":
        y = labels.numpy()
        if (y < 0).any():
            raise DataError("linear probe needs a label for every training image (column 'label')")
        if len(np.unique(y)) < 2:
            raise DataError("linear probe needs at least two classes in the training data")
        x = features.numpy()
        if self.C is None:
            C = self.select_C(x, y)
        else:
            C = self.C
            self.chosen_C, self.val_accuracy, self.n_val, self.C_source = C, None, 0, "given"
            self.val_curve = {}
        self.clf = self._clf(C)
        self.clf.fit(x, y)
        self.source, self.n_train = source, len(y)
        return self

    def selection(self) -> dict[str, Any]:
        """How C was set, for the result JSON: ``C``, ``C_source``, and with a validation split
        ``val_acc1`` (top-1 on it) and ``n_val``."""
        out: dict[str, Any] = {"C": self.chosen_C, "C_source": self.C_source}
        if self.C_source == "validation":
            out.update(val_acc1=self.val_accuracy, n_val=self.n_val)
        return out

    def describe(self) -> str:
        """One phrase for a protocol line: the C and where it came from."""
        if self.C_source == "validation":
            return (f"C={self.chosen_C:.3g} chosen on a {self.n_val}-image validation split "
                    f"(accuracy {self.val_accuracy:.3f})")
        if self.C_source == "fallback":
            return f"C={self.chosen_C:.3g} (too few images for a validation split)"
        return f"C={self.chosen_C:.3g}"

    def _check(self) -> LogisticRegression:
        if self.clf is None:
            raise RuntimeError("call fit() before predicting")
        return self.clf

    def topk(self, features: torch.Tensor, k: int) -> torch.Tensor:
        clf = self._check()
        proba = clf.predict_proba(features.numpy())
        order = np.argsort(-proba, axis=1)[:, :k]
        return torch.from_numpy(clf.classes_[order])

    def score(self, features: torch.Tensor, labels: torch.Tensor, ks: tuple[int, ...] = (1, 5)
              ) -> dict[str, float]:
        n_classes = len(self._check().classes_)
        out = {}
        for k in ks:
            if k <= n_classes:
                pred = self.topk(features, k)
                out[f"acc{k}"] = float((pred == labels.view(-1, 1)).any(1).float().mean())
        return out


def fit_probe(model: torch.nn.Module, data, device, seed: int = 0) -> LinearProbe:
    """A probe fitted on ``model``'s features of the labelled clean images in ``data``, its C
    chosen on a validation split of them: the one behind both the linear-probe accuracy and the
    linear-probe ASR."""
    return LinearProbe(seed=seed).fit(encode_images(model, data.images, device), data.labels, source=str(data.source))
