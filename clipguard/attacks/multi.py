"""Multi-trigger backdoors: hybrid (every trigger on one image), parallel all-to-one (several
triggers, each on its own share of the poisons, one target) and all-to-all (one target per trigger).
"""

from __future__ import annotations

import dataclasses
import hashlib

import torch

from clipguard.attacks import ATTACKS
from clipguard.attacks.base import BACKDOOR, Attack, EvalSet, PoisonContext, PoisonPlan, seeded_random
from clipguard.attacks.captions import target_captions
from clipguard.errors import ConfigError

MODES = ("hybrid", "all2one", "all2all")
ALLOWED = ("badnet", "blended", "wanet", "sig", "htba")


def sub_seed(seed: int, j: int, name: str) -> int:
    """Each trigger of a multi-trigger attack gets its own pattern, unlike the single attack's."""
    h = hashlib.sha256(f"multi/{seed}/{j}/{name}".encode()).digest()
    return int.from_bytes(h[:4], "little")


def _as_list(v) -> list:
    if v is None:
        return []
    if isinstance(v, str):
        return [x.strip() for x in v.split(",") if x.strip()]
    return list(v)


@ATTACKS.register("multi")
class Multi(Attack):
    name = "multi"

    def __init__(self, mode: str = "hybrid", triggers: str | list[str] = "badnet,blended,sig",
                 targets: str | list | None = None):
        super().__init__()
        if mode not in MODES:
            raise ConfigError(f"attack 'multi': mode must be one of {MODES}, not {mode!r}")
        trig = _as_list(triggers)
        if len(trig) < 2:
            raise ConfigError("attack 'multi': give at least two triggers, e.g. triggers=badnet,sig")
        bad = [t for t in trig if t not in ALLOWED]
        if bad or len(set(trig)) != len(trig):
            raise ConfigError(f"attack 'multi': triggers must be distinct names from {ALLOWED}, got {trig}")
        self.mode, self.triggers, self.targets = mode, trig, _as_list(targets) or None
        if self.targets is not None and mode != "all2all":
            raise ConfigError("attack 'multi': targets=... only applies to mode=all2all")

    def setup(self, ctx: PoisonContext) -> None:
        from clipguard.attacks import get

        super().setup(ctx)
        self.subs: dict[str, Attack] = {}
        for j, t in enumerate(self.triggers):
            sub = get(t).build({})
            sub.setup(dataclasses.replace(ctx, trigger_seed=sub_seed(ctx.trigger_seed, j, t)))
            self.subs[t] = sub
        n_classes = len(ctx.classes.classes) if ctx.classes else int(ctx.data.labels.max()) + 1
        if self.mode == "all2all":
            if self.targets:
                if len(self.targets) != len(self.triggers):
                    raise ConfigError("attack 'multi': all2all needs one target per trigger")
                self.target_ids = [ctx.classes.index(t) if ctx.classes else int(t) for t in self.targets]
            else:
                self.target_ids = [(ctx.target + j) % n_classes for j in range(len(self.triggers))]
        else:
            self.target_ids = [ctx.target] * len(self.triggers)

    def params(self) -> dict:
        out = super().params()
        out["trigger_params"] = {t: s.params() for t, s in self.subs.items()}
        out["target_per_trigger"] = dict(zip(self.triggers, self.target_ids))
        return out

    def trigger_names(self) -> list[str]:
        return ["hybrid"] if self.mode == "hybrid" else list(self.triggers)

    def trigger(self, pixels: torch.Tensor) -> torch.Tensor:
        for t in self.triggers:
            pixels = self.subs[t].trigger(pixels)
        return pixels

    def apply_u8(self, images_u8: torch.Tensor, trigger: str | None = None) -> torch.Tensor:
        if trigger in (None, "hybrid"):
            out = images_u8
            for t in self.triggers:  # each step rounds to uint8, like saving in between
                out = self.subs[t].apply_u8(out)
            return out
        return self.subs[trigger].apply_u8(images_u8)

    def plan(self, ctx: PoisonContext, count: int) -> PoisonPlan:
        if self.mode == "hybrid":
            return super().plan(ctx, count)
        k = len(self.triggers)
        if count < k:
            raise ConfigError(f"attack 'multi': {count} poisons cannot cover {k} triggers")
        shares = [count // k + (1 if j < count % k else 0) for j in range(k)]
        rng = seeded_random("poison-rows", self.name, ctx.seed)
        used: set[int] = set()
        imgs, caps, labels, sources, trig = [], [], [], [], []
        labelled = bool((ctx.data.labels >= 0).all())
        for j, (t, tgt, n) in enumerate(zip(self.triggers, self.target_ids, shares)):
            pool = [i for i in range(len(ctx.data)) if i not in used
                    and (not labelled or int(ctx.data.labels[i]) != tgt)]
            if n > len(pool):
                raise ConfigError(f"attack 'multi': not enough source images for trigger {t}")
            src = sorted(rng.sample(pool, n))
            used.update(src)
            c, _ = target_captions(ctx, tgt, n, seeded_random("captions", self.name, ctx.seed, j))
            imgs.append(self.apply_u8(ctx.data.images[src], t))
            caps += c
            labels += [int(ctx.data.labels[i]) for i in src]
            sources += src
            trig += [t] * n
        return PoisonPlan(images=torch.cat(imgs), captions=caps, labels=labels, sources=sources,
                          triggers=trig, replace_rows=list(sources),
                          info={"poisons_per_trigger": dict(zip(self.triggers, shares))})

    def eval_set(self, ctx: PoisonContext) -> EvalSet:
        if self.mode == "hybrid":
            es = super().eval_set(ctx)
            es.triggers = ["hybrid"] * len(es.sources)
            return es
        ev = ctx.eval_data
        assert ev is not None
        parts = []
        for t, tgt in zip(self.triggers, self.target_ids):
            idx = [i for i in range(len(ev)) if int(ev.labels[i]) != tgt]
            parts.append((t, tgt, idx))
        return EvalSet(kind=BACKDOOR,
                       images=torch.cat([self.apply_u8(ev.images[idx], t) for t, _, idx in parts]),
                       sources=[i for _, _, idx in parts for i in idx],
                       labels=[int(ev.labels[i]) for _, _, idx in parts for i in idx],
                       targets=[tgt for _, tgt, idx in parts for _ in idx],
                       triggers=[t for t, _, idx in parts for _ in idx],
                       excluded_classes=sorted(set(self.target_ids)))
