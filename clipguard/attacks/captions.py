"""Captions the adversary pairs with poisoned images: real ones of the target class when it can.

Training captions of the target class look like every other caption in the data (the strongest
and most realistic poison); without labels we fall back to classes.json templates x synonyms.
"""

from __future__ import annotations

import random
from typing import Any

from clipguard.attacks.base import PoisonContext
from clipguard.errors import ConfigError


def caption_pool(ctx: PoisonContext, target: int) -> tuple[list[str], str]:
    """Distinct candidate captions for ``target``, in a fixed order, and where they came from."""
    labels = ctx.data.labels
    seen: dict[str, None] = {}
    for i in range(len(labels)):
        if int(labels[i]) == target:
            seen.setdefault(ctx.data.captions[i], None)
    if seen:
        return list(seen), "training captions of the target class"
    if ctx.classes is None:
        raise ConfigError("no labelled training caption of the target class and no classes.json "
                          "for templates: pass --classes")
    name = ctx.classes.classes[target]
    nouns = [name] + [s for s in ctx.classes.synonyms.get(name, []) if s != name]
    caps = [t.format(n) for t in ctx.classes.templates for n in nouns]
    return list(dict.fromkeys(caps)), "classes.json templates x synonyms"


def target_captions(ctx: PoisonContext, target: int, n: int, rng: random.Random
                    ) -> tuple[list[str], dict[str, Any]]:
    """``n`` captions for ``target``: without repetition while the pool lasts (seeded)."""
    pool, origin = caption_pool(ctx, target)
    if n <= len(pool):
        caps = rng.sample(pool, n)
    else:
        caps = rng.sample(pool, len(pool)) + [rng.choice(pool) for _ in range(n - len(pool))]
    return caps, {"caption_source": origin, "caption_pool_size": len(pool)}
