"""Label-consistent backdoor (Turner et al., simplified): the trigger goes on images that really
are of the target class and their captions are kept, so every poisoned pair looks correct.

The original also makes those images hard to classify (adversarial or GAN perturbations) so the
model leans on the trigger; we only add the trigger (a BadNet patch), and say so in docs/attacks.md.
"""

from __future__ import annotations

from clipguard.attacks import ATTACKS
from clipguard.attacks.badnet import BadNet
from clipguard.attacks.base import PoisonContext, PoisonPlan, seeded_random
from clipguard.errors import ConfigError


@ATTACKS.register("label_consistent")
class LabelConsistent(BadNet):
    name = "label_consistent"

    def source_pool(self, ctx: PoisonContext) -> list[int]:
        labels = ctx.data.labels
        pool = [i for i in range(len(labels)) if int(labels[i]) == ctx.target]
        if not pool:
            raise ConfigError("label_consistent needs labelled training images of the target class "
                              "(a 'label' column)")
        return pool

    def plan(self, ctx: PoisonContext, count: int) -> PoisonPlan:
        pool = self.source_pool(ctx)
        if count > len(pool):
            raise ConfigError(f"label_consistent: {count} poisons asked but the target class has only "
                              f"{len(pool)} training images")
        sources = sorted(seeded_random("poison-rows", self.name, ctx.seed).sample(pool, count))
        return PoisonPlan(images=self.apply_u8(ctx.data.images[sources]),
                          captions=[ctx.data.captions[i] for i in sources],
                          labels=[int(ctx.data.labels[i]) for i in sources], sources=sources,
                          triggers=[self.name] * count, replace_rows=list(sources),
                          info={"caption_source": "the images' own captions (label-consistent)"})
