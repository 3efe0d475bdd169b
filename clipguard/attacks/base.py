"""What every attack is: a deterministic trigger plus a policy for which pairs it poisons.

An attack is fixed by (parameters, trigger seed, image shape). ``setup`` derives everything
random (noise patterns, warp fields, optimised patches) from those alone, so the trigger seen in
training is bit-for-bit the one applied to the held-out images at test time.
"""

from __future__ import annotations

import hashlib
import inspect
import random
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from clipguard.data.classes import ClassInfo
from clipguard.data.csv_dataset import ImageCaptionData
from clipguard.errors import ConfigError, did_you_mean


def seeded_generator(*parts: Any) -> torch.Generator:
    """A torch generator seeded from a readable tuple (attack name, seed, purpose, ...)."""
    h = hashlib.sha256("/".join(str(p) for p in parts).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(h[:7], "little"))


def seeded_random(*parts: Any) -> random.Random:
    return random.Random("/".join(str(p) for p in parts))


def to_u8(pixels: torch.Tensor) -> torch.Tensor:
    """Float [0,1] -> uint8, rounding to nearest (what a lossless PNG stores)."""
    return pixels.clamp(0, 1).mul(255).round().to(torch.uint8)


def to_float(images_u8: torch.Tensor) -> torch.Tensor:
    return images_u8.float().div(255.0)


@dataclass
class PoisonContext:
    """What an attack may look at when it is set up and when it picks pairs to poison."""

    data: ImageCaptionData            # the clean training data, native image size
    target: int                       # the attack's target class (TDPA: the adversarial class)
    seed: int                         # the run's seed (sampling of rows, captions)
    trigger_seed: int                 # fixes patterns / warp fields / patch initialisation
    classes: ClassInfo | None = None
    eval_data: ImageCaptionData | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        c, h, w = self.data.images.shape[1:]
        return int(c), int(h), int(w)

    def class_name(self, i: int) -> str:
        return self.classes.classes[i] if self.classes is not None else str(i)


@dataclass
class PoisonPlan:
    """The poisoned pairs an attack wants, before they are written to disk."""

    images: torch.Tensor                       # uint8 (n, 3, H, W)
    captions: list[str]
    labels: list[int]                          # true class of each poisoned image (-1 unknown)
    sources: list[int]                         # row of ``data`` the image came from (-1: not from data)
    triggers: list[str]                        # trigger applied to each image ('' for none, TDPA)
    replace_rows: list[int] | None = None      # rows of ``data`` each poison overwrites (mode replace)
    info: dict[str, Any] = field(default_factory=dict)


# What an attack's success rate measures, stored in manifests as the eval set's "kind": a
# backdoor (a trigger sends any image to the target class) or targeted poisoning (chosen
# target images go to the adversarial class; stored as "tdpa").
BACKDOOR, TARGETED = "backdoor", "tdpa"


def is_targeted(kind: str) -> bool:
    """True for targeted poisoning: success is per target image, not per triggered image."""
    return kind == TARGETED


@dataclass
class EvalSet:
    """Held-out images for the ASR: triggered non-target images (backdoor) or TDPA targets."""

    kind: str                                  # BACKDOOR | TARGETED
    images: torch.Tensor                       # uint8, what the model is shown
    sources: list[int]                         # rows of eval data the images came from
    labels: list[int]                          # true class
    targets: list[int]                         # class the attacker wants predicted, per image
    triggers: list[str]
    excluded_classes: list[int]                # classes left out (images of the target class)
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def targeted(self) -> bool:
        return is_targeted(self.kind)


class Attack:
    """Base class. Subclasses define ``trigger`` and may override ``plan``/``eval_set``.

    ``__init__`` keyword arguments are the attack's options (``--opt key=value`` on the CLI).
    """

    name: ClassVar[str] = ""
    kind: ClassVar[str] = BACKDOOR
    needs_eval_data: ClassVar[bool] = False

    def __init__(self) -> None:
        self._ready = False
        self.trigger_seed: int | None = None

    # ------------------------------------------------------------------ options
    @classmethod
    def option_names(cls) -> list[str]:
        return [p for p in inspect.signature(cls.__init__).parameters if p not in ("self",)]

    @classmethod
    def build(cls, options: dict[str, Any] | None = None) -> "Attack":
        options = dict(options or {})
        known = cls.option_names()
        for key in options:
            if key not in known:
                raise ConfigError(f"attack '{cls.name}' has no option '{key}'{did_you_mean(key, known)}; "
                                  f"it takes: {', '.join(known)}")
        try:
            return cls(**options)
        except TypeError as e:
            raise ConfigError(f"attack '{cls.name}': {e}") from None

    def options(self) -> dict[str, Any]:
        """Every option with its value (the manifest records them all)."""
        return {k: getattr(self, k) for k in self.option_names()}

    def params(self) -> dict[str, Any]:
        """Options plus what ``setup`` derived (resolved sizes, seeds, optimised patches)."""
        out = self.options()
        out["trigger_seed"] = self.trigger_seed
        return out

    # ------------------------------------------------------------------ trigger
    def setup(self, ctx: PoisonContext) -> None:
        """Validate against the image shape and build the fixed pattern. Runs before any write."""
        self.trigger_seed = ctx.trigger_seed
        self._shape = ctx.image_shape
        self._ready = True

    def trigger(self, pixels: torch.Tensor) -> torch.Tensor:
        """Float (B,3,H,W) in [0,1] -> triggered float in [0,1]. Deterministic."""
        raise NotImplementedError

    def apply_u8(self, images_u8: torch.Tensor, trigger: str | None = None) -> torch.Tensor:
        """The trigger on uint8 images, as written to PNG (train poisons and ASR images alike)."""
        if not self._ready:
            raise RuntimeError(f"attack '{self.name}': call setup() first")
        if images_u8.dim() == 3:
            return self.apply_u8(images_u8.unsqueeze(0), trigger)[0]
        out = []
        for i in range(0, len(images_u8), 256):
            out.append(to_u8(self.trigger(to_float(images_u8[i:i + 256]))))
        return torch.cat(out) if out else images_u8.clone()

    def trigger_names(self) -> list[str]:
        return [self.name]

    # ------------------------------------------------------------------ poisoning policy
    def source_pool(self, ctx: PoisonContext) -> list[int]:
        """Rows whose images get the trigger: non-target images when labels are known."""
        labels = ctx.data.labels
        if bool((labels >= 0).all()):
            return [i for i in range(len(labels)) if int(labels[i]) != ctx.target]
        return list(range(len(labels)))

    def plan(self, ctx: PoisonContext, count: int) -> PoisonPlan:
        from clipguard.attacks.captions import target_captions

        pool = self.source_pool(ctx)
        if count > len(pool):
            raise ConfigError(f"attack '{self.name}' needs {count} source images but only "
                              f"{len(pool)} are eligible")
        rng = seeded_random("poison-rows", self.name, ctx.seed)
        sources = sorted(rng.sample(pool, count))
        caps, cinfo = target_captions(ctx, ctx.target, count, seeded_random("captions", self.name, ctx.seed))
        images = self.apply_u8(ctx.data.images[sources])
        return PoisonPlan(images=images, captions=caps, labels=[int(ctx.data.labels[i]) for i in sources],
                          sources=sources, triggers=[self.trigger_names()[0]] * count,
                          replace_rows=list(sources),
                          info=cinfo)

    def eval_set(self, ctx: PoisonContext) -> EvalSet:
        """Every held-out image whose true class is not the target, triggered."""
        ev = ctx.eval_data
        assert ev is not None
        idx = [i for i in range(len(ev)) if int(ev.labels[i]) != ctx.target]
        if not idx:
            raise ConfigError("the evaluation data has no image outside the target class")
        return EvalSet(kind=BACKDOOR, images=self.apply_u8(ev.images[idx]), sources=idx,
                       labels=[int(ev.labels[i]) for i in idx], targets=[ctx.target] * len(idx),
                       triggers=[self.trigger_names()[0]] * len(idx), excluded_classes=[ctx.target])
