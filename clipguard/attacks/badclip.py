"""BadCLIP-style optimised patch (Liang et al., 2024): a patch trained against a given model so
that patched images move towards the target captions (contrastive loss) and towards target-class
images and away from their own clean embedding (triplet loss, weight 500, margin 1).

``content_weight`` > 0 (with ``triplet_weight: 0``) turns it into a content-preserving trigger
against filters: the patched image is also pulled towards its OWN clean embedding (weight times
one minus their cosine), so it agrees with the target captions while staying among the images
of its class, where a density detector finds nothing unusual (docs/threat-model.md).

The optimised patch is quantised to uint8 and stored in the manifest, so the trigger is fixed
afterwards like any other patch; it runs on the CPU with a tiny model in seconds.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from clipguard.attacks import ATTACKS
from clipguard.attacks.badnet import PatchAttack
from clipguard.attacks.base import PoisonContext, seeded_generator, to_float
from clipguard.attacks.captions import caption_pool
from clipguard.attacks.patch import paste
from clipguard.errors import ConfigError


@ATTACKS.register("badclip")
class BadCLIP(PatchAttack):
    name = "badclip"

    def __init__(self, checkpoint: str | None = None, model: str | None = None, steps: int = 100,
                 lr: float = 0.05, batch_size: int = 64, triplet_weight: float = 500.0,
                 triplet_margin: float = 1.0, size: int | None = None, size_frac: float = 1 / 7,
                 location: str = "fixed", position: str = "bottom-right", margin: int = 0,
                 device: str = "cpu", content_weight: float = 0.0):
        super().__init__(size, size_frac, location, position, margin)
        if int(steps) < 0:
            raise ConfigError("attack 'badclip': steps must be >= 0")
        if float(content_weight) < 0 or float(triplet_weight) < 0:
            raise ConfigError("attack 'badclip': content_weight and triplet_weight must be >= 0")
        self.content_weight = float(content_weight)
        self.checkpoint, self.model, self.steps, self.lr = checkpoint, model, int(steps), float(lr)
        self.batch_size, self.triplet_weight = int(batch_size), float(triplet_weight)
        self.triplet_margin, self.device = float(triplet_margin), device
        self.history: list[float] = []

    def setup(self, ctx: PoisonContext) -> None:
        if not self.checkpoint:
            raise ConfigError("attack 'badclip' optimises its patch against a model: pass "
                              "--checkpoint (a run folder, checkpoint folder or .safetensors)")
        super().setup(ctx)

    def params(self) -> dict:
        out = super().params()
        out["patch"] = (self.patch * 255).round().to(torch.int64).tolist()
        out["loss_first_last"] = [round(self.history[0], 5), round(self.history[-1], 5)] if self.history else []
        return out

    def make_patch(self, size: int, ctx: PoisonContext) -> torch.Tensor:
        from clipguard.evaluation.features import encode_images, encode_texts
        from clipguard.evaluation.runner import load_model
        from clipguard.models.factory import get_tokenizer, image_size
        from clipguard.tensors import normalize

        model, name = load_model(self.checkpoint, self.model, self.device)
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        tok = get_tokenizer(name)
        dev = torch.device(self.device)
        size_m = image_size(model)
        data = ctx.data
        gen = seeded_generator("badclip", ctx.trigger_seed)
        labelled = bool((data.labels >= 0).all())
        others = torch.tensor([i for i in range(len(data)) if not labelled or int(data.labels[i]) != ctx.target])
        tgt_rows = [i for i in range(len(data)) if labelled and int(data.labels[i]) == ctx.target]
        pool, _ = caption_pool(ctx, ctx.target)
        t_feats = encode_texts(model, tok, pool[:512], dev).to(dev)
        if tgt_rows:
            pos = encode_images(model, data.images[tgt_rows[:512]], dev).mean(0)
        else:
            pos = t_feats.mean(0)
        pos = F.normalize(pos, dim=0).to(dev)

        def embed(px: torch.Tensor) -> torch.Tensor:
            if px.shape[-1] != size_m:
                px = F.interpolate(px, size=(size_m, size_m), mode="bilinear", align_corners=False)
            return model.encode_image(normalize(px), normalize=True)

        patch = torch.rand(3, size, size, generator=gen).to(dev).requires_grad_(True)
        opt = torch.optim.Adam([patch], lr=self.lr)
        scale = float(model.logit_scale.exp().clamp(max=100))
        seed = int(ctx.trigger_seed)
        self.history = []
        for _ in range(self.steps):
            pick = others[torch.randint(len(others), (min(self.batch_size, len(others)),), generator=gen)]
            x = to_float(data.images[pick]).to(dev)
            with torch.no_grad():
                f_clean = embed(x)
                own = encode_texts(model, tok, [data.captions[i] for i in pick.tolist()], dev).to(dev)
            f_p = embed(paste(x, patch, self.location, self.position, seed, self.margin))
            logits = scale * f_p @ torch.cat([t_feats, own]).t()
            m = len(t_feats)
            contrastive = (torch.logsumexp(logits, 1) - torch.logsumexp(logits[:, :m], 1)).mean()
            triplet = F.relu((f_p - pos).norm(dim=1) - (f_p - f_clean).norm(dim=1)
                             + self.triplet_margin).mean()
            content = (1.0 - (f_p * f_clean).sum(dim=1)).mean()
            loss = contrastive + self.triplet_weight * triplet + self.content_weight * content
            opt.zero_grad()
            loss.backward()
            opt.step()
            with torch.no_grad():
                patch.clamp_(0, 1)
            self.history.append(float(loss.detach()))
        return (patch.detach().cpu().clamp(0, 1) * 255).round() / 255
