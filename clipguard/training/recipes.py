"""Fine-tuning recipes per model: what ``clipguard finetune --defense X`` runs when nothing else is set.

A fine-tuning defence removes a backdoor only if it moves the model far enough, and how far a
learning rate moves a model depends on the model: CleanCLIP's published recipe (lr 1e-5, for a
ResNet-50 CLIP pre-trained on millions of pairs) leaves a tiny model trained from scratch at lr
1e-3 exactly as poisoned as it was. So the recipe is looked up by model name:

- clipguard's small ``cg-*`` models get :data:`SMALL_FINETUNE`, chosen on validation data by a
  rule a defender can apply without knowing the trigger: of the candidates that keep clean
  validation zero-shot accuracy within 3 points of the model they start from, the one that moves
  the clean validation images farthest (configs/finetune-select.yaml, rounds 2-5; docs/finetuning.md);
  PAR's by round 7 (no candidate within 3 points on fresh seeds: the most accurate).
- every other (open_clip) architecture gets the published recipe, :data:`PAPER_FINETUNE` (PAR:
  its authors' learning rate, :data:`PAPER_LR`).

Anything a preset, a bench entry or a flag sets wins over the recipe.
"""

from __future__ import annotations

from typing import Any

# CleanCLIP's reference fine-tuning recipe (arXiv 2303.03323).
PAPER_FINETUNE: dict[str, Any] = {"epochs": 10, "batch_size": 64, "lr": 1e-5, "warmup": 50, "weight_decay": 0.1}
# clipguard's cg-* models (pre-trained from scratch at lr 1e-3): chosen on validation, see above.
# The learning rate is the defence's own: the in-modal and factual/counterfactual terms keep clean
# accuracy at rates where plain fine-tuning loses it, so each defence can be pushed as far as its
# own accuracy allows.
SMALL_FINETUNE: dict[str, Any] = {"epochs": 20, "batch_size": 64, "warmup": 20, "weight_decay": 0.1}
# PAR: 1e-4 under its authors' schedule (from 10 x lr falling to lr over half the run; round 7)
SMALL_LR: dict[str, float] = {"ft": 3e-4, "cleanclip": 5e-4, "cleanerclip": 3e-3, "par": 1e-4}
# PAR on every other architecture: its authors' --lr (their schedule starts at 10 x, 3e-5), the
# setting of their ViT-B/32 and larger models; the rest of the recipe stays CleanCLIP's
PAPER_LR: dict[str, float] = {"par": 3e-6}
# warm-up steps where a defence's differ from SMALL_FINETUNE's: CleanerCLIP at lr 3e-3 over 62
# steps (two epochs of 2,000 pairs at batch 64), chosen by the same rule (round 5 of
# configs/finetune-select.yaml: it moved the images farther than 20 steps, at less accuracy cost)
SMALL_WARMUP: dict[str, int] = {"cleanerclip": 62}
SMALL_MODELS: tuple[str, ...] = ("cg-nano", "cg-tiny", "cg-tiny-224", "cg-small")


def finetune_recipe(model: str | None, defense: str = "ft") -> dict[str, Any]:
    """The trainer settings fine-tuning starts from for ``model`` and ``defense`` (a new dict)."""
    if model not in SMALL_MODELS:
        return {**PAPER_FINETUNE, "lr": PAPER_LR.get(defense, PAPER_FINETUNE["lr"])}
    return {**SMALL_FINETUNE, "lr": SMALL_LR.get(defense, SMALL_LR["ft"]),
            "warmup": SMALL_WARMUP.get(defense, SMALL_FINETUNE["warmup"])}


def recipe_name(model: str | None) -> str:
    """Which recipe ``finetune_recipe`` gives, in words (printed by ``clipguard finetune``)."""
    return ("clipguard's validated recipe for its small models" if model in SMALL_MODELS
            else "CleanCLIP's published recipe")
