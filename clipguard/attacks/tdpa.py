"""Targeted data poisoning (TDPA): make the model misclassify a few chosen held-out images.

Each target image (from the held-out split, of a class other than the adversarial one) is paired
with k captions of the adversarial class (``--target``). The poison budget (rate/count) is
spread over ``targets`` images, so k = count / targets. Success is per image: its top-1 zero-shot
prediction is the adversarial class. The targets must then be left out of the clean evaluation
(``clean_eval.csv`` in the poisoned folder).
"""

from __future__ import annotations

import torch

from clipguard.attacks import ATTACKS
from clipguard.attacks.base import (
    TARGETED,
    Attack,
    EvalSet,
    PoisonContext,
    PoisonPlan,
    seeded_generator,
    seeded_random,
)
from clipguard.attacks.captions import target_captions
from clipguard.data.csv_dataset import ImageCaptionData
from clipguard.errors import ConfigError


def captions_per_target(count: int, chosen: list[int], attack: str) -> list[int]:
    """``count`` poisoned pairs spread over the ``chosen`` targets, the first ones one more when it
    does not divide; at least one each."""
    if count < len(chosen):
        raise ConfigError(f"{attack}: {count} poisoned pairs cannot cover {len(chosen)} targets "
                          "(at least one caption each); raise the rate/count or lower targets")
    return [count // len(chosen) + (1 if j < count % len(chosen) else 0) for j in range(len(chosen))]


@ATTACKS.register("tdpa")
class TDPA(Attack):
    name = "tdpa"
    kind = TARGETED
    needs_eval_data = True

    def __init__(self, targets: int = 4, source_class: str | int | None = None, jitter: int = 0):
        super().__init__()
        if int(targets) < 1:
            raise ConfigError("attack 'tdpa': targets must be at least 1")
        if isinstance(jitter, bool) or not isinstance(jitter, int) or not 0 <= jitter <= 255:
            raise ConfigError(f"attack '{self.name}': jitter must be a whole number of grey levels in "
                              f"[0, 255], not {jitter!r}")
        self.targets, self.source_class, self.jitter = int(targets), source_class, int(jitter)

    def _jittered(self, imgs: torch.Tensor, ctx: PoisonContext) -> torch.Tensor:
        """Each copy of a target image with its own seeded uniform noise of +-``jitter`` grey
        levels, so no two copies are identical (an attacker evading de-duplication)."""
        if self.jitter == 0:
            return imgs.clone()
        g = seeded_generator(self.name, "jitter", ctx.seed)
        noise = torch.randint(-self.jitter, self.jitter + 1, imgs.shape, generator=g)
        return (imgs.to(torch.int16) + noise).clamp(0, 255).to(imgs.dtype)

    def trigger(self, pixels: torch.Tensor) -> torch.Tensor:
        return pixels.clone()  # no trigger: the target images themselves are the poison

    def trigger_names(self) -> list[str]:
        return []

    def labelled_eval_data(self, ctx: PoisonContext) -> ImageCaptionData:
        """The held-out split the target images come from; it must be there and labelled."""
        ev = ctx.eval_data
        if ev is None:
            raise ConfigError(f"{self.name} takes its target images from the held-out split: pass --eval-data")
        if not bool((ev.labels >= 0).all()):
            raise ConfigError(f"{self.name} needs a labelled held-out split (a 'label' column in --eval-data)")
        return ev

    def choose_targets(self, ctx: PoisonContext) -> list[int]:
        ev = self.labelled_eval_data(ctx)
        src = None
        if self.source_class is not None:
            src = ctx.classes.index(self.source_class) if ctx.classes else int(self.source_class)
            if src == ctx.target:
                raise ConfigError("tdpa: source_class must differ from the adversarial (target) class")
        pool = [i for i in range(len(ev)) if int(ev.labels[i]) != ctx.target
                and (src is None or int(ev.labels[i]) == src)]
        if len(pool) < self.targets:
            raise ConfigError(f"tdpa: {self.targets} target images asked, only {len(pool)} eligible")
        return sorted(seeded_random("tdpa-targets", ctx.seed).sample(pool, self.targets))

    def plan(self, ctx: PoisonContext, count: int) -> PoisonPlan:
        chosen = self.choose_targets(ctx)
        per = captions_per_target(count, chosen, "tdpa")
        ev = ctx.eval_data
        assert ev is not None
        caps, info = target_captions(ctx, ctx.target, count, seeded_random("captions", self.name, ctx.seed))
        imgs = torch.cat([ev.images[i].unsqueeze(0).expand(n, -1, -1, -1) for i, n in zip(chosen, per)])
        labels = [int(ev.labels[i]) for i, n in zip(chosen, per) for _ in range(n)]
        which = [j for j, n in enumerate(per) for _ in range(n)]
        replace = sorted(seeded_random("tdpa-replace", ctx.seed).sample(range(len(ctx.data)), count))
        info.update({"target_eval_rows": chosen, "captions_per_target": per,
                     "target_of_poison": which,
                     "target_paths": [ev.paths[i] for i in chosen]})
        self._chosen = chosen
        return PoisonPlan(images=self._jittered(imgs, ctx), captions=caps, labels=labels, sources=[-1] * count,
                          triggers=[""] * count, replace_rows=replace, info=info)

    def eval_set(self, ctx: PoisonContext) -> EvalSet:
        chosen = getattr(self, "_chosen", None) or self.choose_targets(ctx)
        ev = ctx.eval_data
        assert ev is not None
        return EvalSet(kind=TARGETED, images=ev.images[chosen].clone(), sources=list(chosen),
                       labels=[int(ev.labels[i]) for i in chosen], targets=[ctx.target] * len(chosen),
                       triggers=[""] * len(chosen), excluded_classes=[ctx.target],
                       info={"exclude_from_clean_eval": list(chosen)})
