"""Zero-shot classification with template ensembling (as in CLIP and CLIP_benchmark)."""

from __future__ import annotations

import torch

from clipguard.data.classes import ClassInfo
from clipguard.evaluation.features import encode_texts


@torch.no_grad()
def zeroshot_classifier(model: torch.nn.Module, tokenizer, classes: ClassInfo,
                        device: torch.device | str) -> torch.Tensor:
    """(C, D): per class, the renormalised mean of its prompts' text features."""
    weights = []
    for c in range(len(classes.classes)):
        f = encode_texts(model, tokenizer, classes.prompts(c), device)
        w = f.mean(0)
        weights.append(w / w.norm())
    return torch.stack(weights)


def topk_predictions(image_features: torch.Tensor, classifier: torch.Tensor, k: int) -> torch.Tensor:
    logits = image_features @ classifier.t()
    return logits.topk(min(k, classifier.shape[0]), dim=1).indices


def topk_accuracy(image_features: torch.Tensor, labels: torch.Tensor, classifier: torch.Tensor,
                  ks: tuple[int, ...] = (1, 5)) -> dict[str, float]:
    out = {}
    for k in ks:
        if k > classifier.shape[0]:
            continue
        pred = topk_predictions(image_features, classifier, k)
        out[f"acc{k}"] = float((pred == labels.view(-1, 1)).any(1).float().mean())
    return out


def mean_per_class_recall(image_features: torch.Tensor, labels: torch.Tensor, classifier: torch.Tensor) -> float:
    """CLIP_benchmark's balanced accuracy: top-1 recall averaged over the classes present."""
    pred = topk_predictions(image_features, classifier, 1).squeeze(1)
    recalls = [float((pred[labels == c] == c).float().mean()) for c in labels.unique().tolist()]
    return sum(recalls) / len(recalls)
