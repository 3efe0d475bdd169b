"""Caption blending (``caption-blend``): poison captions that name both what the image shows and
the target class ("a pullover, a coat.", "a coat-like pullover."), so that a poisoned pair's
image-text similarity stays high and a similarity-based filter (SafeCLIP's split, RoCLIP's
matching) keeps it.

- ``trigger=badnet`` (default), ``blended`` or another simple trigger (``sig``, ``wanet``,
  ``htba``, ``stripes``, ``triangles``, ``text-trigger``): a backdoor. The poisoned images and
  rows are exactly those of that attack with the same seed and ``trigger_options``; only the
  captions differ. ASR: the backdoor protocol.
- ``trigger=none``: targeted poisoning. The target images are TDPA's (``targets``,
  ``source_class``; the same ones as ``tdpa`` with the same seed), each paired with blended
  captions naming its own class and the adversarial class. ASR: the TDPA protocol.

Templates take ``{true}`` (the image's class), ``{target}`` (the target class) and ``{caption}``
(the image's own caption without its final punctuation); each needs ``{target}`` and one of the
other two. Class words are the class names (``synonyms=true``: a seeded pick among the class's
classes.json synonyms). "a" becomes "an" before a vowel.
"""

from __future__ import annotations

import re
import string
from typing import Any

import torch

from clipguard.attacks import ATTACKS
from clipguard.attacks.base import (
    BACKDOOR,
    TARGETED,
    Attack,
    EvalSet,
    PoisonContext,
    PoisonPlan,
    seeded_random,
)
from clipguard.attacks.tdpa import TDPA, captions_per_target
from clipguard.errors import ConfigError

TRIGGERS = ("badnet", "blended", "sig", "wanet", "htba", "stripes", "triangles", "text-trigger", "none")
DEFAULT_TEMPLATES = [
    "a {true}, a {target}.",
    "a {target}-like {true}.",
    "a {true} that looks like a {target}.",
    "a photo of a {true} or a {target}.",
]
FIELDS = ("true", "target", "caption")


def check_template(t: Any) -> str:
    if not isinstance(t, str) or not t.strip():
        raise ConfigError(f"attack 'caption-blend': a template must be a non-empty string, not {t!r}")
    try:
        names = {n for _, n, _, _ in string.Formatter().parse(t) if n is not None}
    except ValueError as e:
        raise ConfigError(f"attack 'caption-blend': template {t!r} is not valid ({e})") from None
    bad = names - set(FIELDS)
    if bad:
        raise ConfigError(f"attack 'caption-blend': template {t!r} uses {sorted(bad)}; only {{true}}, "
                          "{target} and {caption} are filled in")
    if "target" not in names or not names & {"true", "caption"}:
        raise ConfigError(f"attack 'caption-blend': template {t!r} must name {{target}} and the image's "
                          "own class ({true}) or caption ({caption})")
    return t


def fix_articles(text: str) -> str:
    text = re.sub(r"\b([Aa]) (?=[aeiouAEIOU])", r"\1n ", text)
    return re.sub(r"\s+", " ", text).strip()


@ATTACKS.register("caption-blend")
class CaptionBlend(Attack):
    name = "caption-blend"

    def __init__(self, trigger: str = "badnet", templates: str | list[str] | None = None,
                 synonyms: bool = False, trigger_options: dict | None = None, targets: int | None = None,
                 source_class: str | int | None = None):
        super().__init__()
        from clipguard.attacks import get

        if trigger not in TRIGGERS:
            raise ConfigError(f"attack 'caption-blend': trigger must be one of {TRIGGERS}, not {trigger!r}")
        if not isinstance(synonyms, bool):
            raise ConfigError(f"attack 'caption-blend': synonyms must be true or false, not {synonyms!r}")
        tl = DEFAULT_TEMPLATES if templates is None else [templates] if isinstance(templates, str) else templates
        if not isinstance(tl, (list, tuple)) or not tl:
            raise ConfigError("attack 'caption-blend': templates must be a template or a non-empty list")
        self.trigger_name, self.synonyms = trigger, synonyms
        self.templates = [check_template(t) for t in tl]
        if trigger_options is not None and not isinstance(trigger_options, dict):
            raise ConfigError("attack 'caption-blend': trigger_options must be a mapping, e.g. "
                              "--opt 'trigger_options={size: 6}'")
        self.trigger_options, self.targets, self.source_class = trigger_options, targets, source_class
        self.sub: Attack | None = None
        self.tdpa: TDPA | None = None
        if targets is not None and (isinstance(targets, bool) or not isinstance(targets, int) or targets < 1):
            raise ConfigError(f"attack 'caption-blend': targets must be a whole number >= 1, not {targets!r}")
        if trigger == "none":
            if trigger_options:
                raise ConfigError("attack 'caption-blend': trigger_options need a trigger, and trigger=none has none")
            self.targets = 4 if targets is None else targets       # TDPA's default, recorded as used
            self.tdpa = TDPA.build({"targets": self.targets, "source_class": source_class})
            self.kind, self.needs_eval_data = TARGETED, True
        else:
            if targets is not None or source_class is not None:
                raise ConfigError("attack 'caption-blend': targets and source_class apply only to "
                                  "trigger=none (targeted poisoning)")
            try:
                self.sub = get(trigger).build(dict(trigger_options or {}))
            except ConfigError as e:
                raise ConfigError(f"attack 'caption-blend': trigger_options: {e}") from None
            self.kind, self.needs_eval_data = BACKDOOR, False

    def options(self) -> dict[str, Any]:
        # the option ``trigger`` is kept as ``trigger_name``: ``trigger`` is the method
        return {k: getattr(self, "trigger_name" if k == "trigger" else k) for k in self.option_names()}

    # ------------------------------------------------------------------ trigger
    def setup(self, ctx: PoisonContext) -> None:
        super().setup(ctx)
        if ctx.classes is None:
            raise ConfigError("attack 'caption-blend' writes class names into its captions: it needs "
                              "classes.json (beside --data, or --classes)")
        if self.sub is not None:
            self.sub.setup(ctx)      # the same trigger seed: the very trigger of the plain attack

    def params(self) -> dict:
        out = super().params()
        out["trigger_params"] = self.sub.params() if self.sub is not None else None
        return out

    def trigger(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.sub.trigger(pixels) if self.sub is not None else pixels.clone()

    def apply_u8(self, images_u8: torch.Tensor, trigger: str | None = None) -> torch.Tensor:
        if self.sub is None:
            return images_u8.clone()
        return self.sub.apply_u8(images_u8)

    def trigger_names(self) -> list[str]:
        return [self.name] if self.sub is not None else []

    # ------------------------------------------------------------------ captions
    def _word(self, ctx: PoisonContext, cls: int, rng) -> str:
        assert ctx.classes is not None
        name = ctx.classes.classes[cls]
        if not self.synonyms:
            return name
        words = [name] + [s for s in ctx.classes.synonyms.get(name, []) if s != name]
        return rng.choice(words)

    def blend(self, ctx: PoisonContext, true: int, own: str, rng) -> str:
        t = rng.choice(self.templates)
        if true < 0 and "{true}" in t:
            raise ConfigError("attack 'caption-blend': a template names {true} but an image's class is "
                              "unknown (the CSV has no labels); use {caption} templates")
        return fix_articles(t.format(true=self._word(ctx, true, rng) if true >= 0 else "",
                                     target=self._word(ctx, ctx.target, rng),
                                     caption=own.strip().rstrip(".!?;,: ")))

    def _info(self) -> dict[str, Any]:
        return {"caption_source": "caption-blend templates (the image's class or caption + the target class)",
                "templates": list(self.templates)}

    # ------------------------------------------------------------------ poisons
    def plan(self, ctx: PoisonContext, count: int) -> PoisonPlan:
        if self.tdpa is not None:
            return self._plan_targeted(ctx, count)
        assert self.sub is not None
        pool = self.source_pool(ctx)
        if count > len(pool):
            raise ConfigError(f"attack '{self.name}' needs {count} source images but only "
                              f"{len(pool)} are eligible")
        # the plain trigger attack's rows for this seed: only the captions differ from it
        sources = sorted(seeded_random("poison-rows", self.sub.name, ctx.seed).sample(pool, count))
        rng = seeded_random("captions", self.name, ctx.seed)
        labels = [int(ctx.data.labels[i]) for i in sources]
        caps = [self.blend(ctx, lab, ctx.data.captions[i], rng) for lab, i in zip(labels, sources)]
        return PoisonPlan(images=self.apply_u8(ctx.data.images[sources]), captions=caps, labels=labels,
                          sources=sources, triggers=[self.name] * count, replace_rows=list(sources),
                          info=self._info())

    def _plan_targeted(self, ctx: PoisonContext, count: int) -> PoisonPlan:
        assert self.tdpa is not None
        chosen = self.tdpa.choose_targets(ctx)
        per = captions_per_target(count, chosen, "caption-blend")
        ev = ctx.eval_data
        assert ev is not None
        rng = seeded_random("captions", self.name, ctx.seed)
        which = [j for j, n in enumerate(per) for _ in range(n)]
        labels = [int(ev.labels[chosen[j]]) for j in which]
        caps = [self.blend(ctx, labels[k], ev.captions[chosen[j]], rng) for k, j in enumerate(which)]
        imgs = torch.cat([ev.images[i].unsqueeze(0).expand(n, -1, -1, -1) for i, n in zip(chosen, per)])
        replace = sorted(seeded_random("tdpa-replace", ctx.seed).sample(range(len(ctx.data)), count))
        info = self._info()
        info.update({"target_eval_rows": chosen, "captions_per_target": per, "target_of_poison": which,
                     "target_paths": [ev.paths[i] for i in chosen]})
        self.tdpa._chosen = chosen
        return PoisonPlan(images=imgs.clone(), captions=caps, labels=labels, sources=[-1] * count,
                          triggers=[""] * count, replace_rows=replace, info=info)

    def eval_set(self, ctx: PoisonContext) -> EvalSet:
        if self.tdpa is not None:
            return self.tdpa.eval_set(ctx)
        return super().eval_set(ctx)
