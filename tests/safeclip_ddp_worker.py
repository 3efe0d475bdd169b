"""Run under torchrun: SafeCLIP through its first split; each rank dumps its split and weights.

An optional third argument, JSON, adds SafeCLIP options and sets the number of epochs (``epochs``)."""

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from clipguard import defenses
from clipguard.data.csv_dataset import load_csv
from clipguard.defenses.pair_scores import shard_similarities
from clipguard.training.trainer import TrainConfig, Trainer

csv, out = sys.argv[1], Path(sys.argv[2])
extra = json.loads(sys.argv[3]) if len(sys.argv) > 3 else {}
epochs = extra.pop("epochs", 3)
torch.set_num_threads(1)
data = load_csv(csv).subset(range(130))  # not a multiple of the world size: shards differ in length
strategy = defenses.build("safeclip", {"warmup_epochs": 1, "clip_warmup_epochs": 1, "lr_low_factor": 0.1,
                                       "min_initial_fraction": 0.3, "step": 0.2, "pool_size": 64, **extra})
cfg = TrainConfig(model="cg-tiny", epochs=epochs, batch_size=16, lr=1e-3, warmup=1, seed=0, device="cpu", quiet=True)
t = Trainer(cfg, data, out / "run", strategy=strategy)
t.fit()
rank = t.ctx.dist.rank
sims_now = shard_similarities(t.ctx, torch.arange(len(data)))
save_file({"safe": strategy.selected().to(torch.uint8), "sims": strategy.pair_scores().contiguous(),
           "sims_now": sims_now.contiguous(),
           **{f"w.{k}": v.contiguous() for k, v in t.model.state_dict().items()}},
          str(out / f"rank{rank}.safetensors"))
if strategy._step_feats is not None:
    save_file({"features": strategy._step_feats.contiguous()}, str(out / f"features{rank}.safetensors"))
