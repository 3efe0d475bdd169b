"""GPU path check: the one trainer on CUDA with bf16 autocast and fp16 + GradScaler, a real
open_clip architecture at 224 px, and (when present) each registered defence for one epoch.

    python benchmarks/gpu_check.py --data DIR_WITH_train.csv_test.csv --out results.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from clipguard import defenses
from clipguard.data.classes import ClassInfo
from clipguard.data.csv_dataset import ImageCaptionData, load_csv
from clipguard.evaluation.runner import evaluate_model
from clipguard.training.build import build_trainer
from clipguard.training.spec import RunSpec
from clipguard.training.trainer import TrainConfig


def run(name: str, data, cfg: TrainConfig, strategy=None, test=None, classes=None) -> dict:
    torch.cuda.reset_peak_memory_stats()
    with tempfile.TemporaryDirectory() as d:
        spec = RunSpec(stage="pretrain", defense=strategy.name if strategy else "none",
                       options=strategy.opt if strategy else defenses.options_class("none")(), train=cfg)
        trainer = build_trainer(spec, data, d)
        t0 = time.perf_counter()
        last = trainer.fit()
        wall = time.perf_counter() - t0
    res = {"run": name, "wall_s": round(wall, 2), "images_per_s_last_epoch": last.get("images_per_s"),
           "loss": last.get("loss"), "precision": trainer.precision,
           "max_mem_gb": round(torch.cuda.max_memory_allocated() / 2 ** 30, 2)}
    if test is not None:
        m = evaluate_model(trainer.model, cfg.model, test, classes, device="cuda", retrieval=False)
        res["zeroshot_top1"] = m["zeroshot"]["acc1"]
    print(json.dumps(res), flush=True)
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--epochs", type=int, default=5)
    args = ap.parse_args()
    assert torch.cuda.is_available(), "no GPU"
    d = Path(args.data)
    train, test = load_csv(d / "train.csv"), load_csv(d / "test.csv")
    classes = ClassInfo.load(d / "classes.json")
    results = [{"device": torch.cuda.get_device_name(), "torch": torch.__version__}]

    base = dict(model="cg-tiny", epochs=args.epochs, batch_size=128, lr=1e-3, device="cuda", quiet=True)
    results.append(run("cg-tiny bf16", train, TrainConfig(**base, precision="bf16"), test=test, classes=classes))
    results.append(run("cg-tiny fp32", train, TrainConfig(**base, precision="fp32"), test=test, classes=classes))
    results.append(run("cg-tiny fp16+scaler", train, TrainConfig(**base, precision="amp"), test=test, classes=classes))
    for name in defenses.names():
        if name in ("none", "ft"):
            continue
        try:
            strat = defenses.build(name)
            cfg = TrainConfig(**{**base, "epochs": 2}, precision="bf16")
            results.append(run(f"defense {name} (defaults, 2 epochs)", train, cfg, strategy=strat))
        except Exception as e:  # report, keep checking the others
            results.append({"run": f"defense {name}", "error": repr(e)[:500]})
            print(results[-1], flush=True)
    g = torch.Generator().manual_seed(0)
    n = 4096
    big = ImageCaptionData(images=torch.randint(0, 256, (n, 3, 224, 224), dtype=torch.uint8, generator=g),
                           captions=[f"a photo of thing number {i % 97}" for i in range(n)],
                           labels=torch.full((n,), -1), paths=[""] * n)
    for arch in ("ViT-B-32", "RN50"):
        cfg = TrainConfig(model=arch, epochs=1, batch_size=256, lr=5e-4, device="cuda", quiet=True, precision="bf16",
                          warmup=2)
        results.append(run(f"{arch} bf16 224px random data", big, cfg))
    Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
