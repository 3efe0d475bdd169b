"""Run under torchrun: a few DDP steps of the one trainer; each rank dumps its parameters."""

import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from clipguard.data.csv_dataset import load_csv
from clipguard.training.trainer import TrainConfig, Trainer

csv, out, world_batch = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
torch.set_num_threads(1)
data = load_csv(csv).subset(range(128))
cfg = TrainConfig(model="cg-tiny", epochs=1, batch_size=world_batch, lr=1e-3, warmup=1, seed=0,
                  device="cpu", quiet=True, grad_clip=None)
t = Trainer(cfg, data, out / "run")
t.fit()
rank = t.ctx.dist.rank
save_file({k: v.contiguous() for k, v in t.model.state_dict().items()}, str(out / f"rank{rank}.safetensors"))
if t.ddp is not None:  # plain CLIP uses every parameter each step: DDP need not search for unused ones
    (out / f"find_unused{rank}.txt").write_text(str(t.ddp.find_unused_parameters))
