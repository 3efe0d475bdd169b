"""Linear probe: logistic regression on frozen image features (scikit-learn)."""

from __future__ import annotations

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression

from clipguard.errors import DataError
from clipguard.evaluation.features import encode_images


class LinearProbe:
    """fit/score like scikit-learn; also predicts top-k for the linear-probe ASR."""

    def __init__(self, C: float = 1.0, max_iter: int = 1000, seed: int = 0):
        self.C, self.max_iter, self.seed = C, max_iter, seed
        self.clf: LogisticRegression | None = None
        self.source, self.n_train = "", 0  # what it was fitted on, for the protocols that quote it

    def fit(self, features: torch.Tensor, labels: torch.Tensor, source: str = "") -> "LinearProbe":
        y = labels.numpy()
        if (y < 0).any():
            raise DataError("linear probe needs a label for every training image (column 'label')")
        if len(np.unique(y)) < 2:
            raise DataError("linear probe needs at least two classes in the training data")
        self.clf = LogisticRegression(C=self.C, max_iter=self.max_iter, random_state=self.seed)
        self.clf.fit(features.numpy(), y)
        self.source, self.n_train = source, len(y)
        return self

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
    """A probe fitted on ``model``'s features of the labelled clean images in ``data``: the one
    behind both the linear-probe accuracy and the linear-probe ASR."""
    return LinearProbe(seed=seed).fit(encode_images(model, data.images, device), data.labels, source=str(data.source))
