"""Shared steps of a grid, computed once and reused by every cell that needs them.

On disk (so a re-run reuses them): the materialised built-in dataset and the poisoned data per
(dataset, attack, seed). In memory (per process): decoded CSVs, so ten cells on one poisoned set
decode its PNGs once.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from clipguard.bench.config import AttackSpec, BenchConfig, DatasetSpec
from clipguard.data.classes import ClassInfo
from clipguard.data.csv_dataset import CsvSpec, ImageCaptionData, load_csv
from clipguard.errors import ConfigError, DataError
from clipguard.io import sha256_file, write_json
from clipguard.models.factory import model_image_size
from clipguard.training.context import step_seed


@dataclass
class PoisonedSet:
    """The training data of one (dataset, attack, seed) and what we know about its poisons."""

    csv: Path | None  # None: the clean training CSV is used as is
    manifests: list[Path] = field(default_factory=list)  # one per attack part, in order
    masks: list[torch.Tensor] = field(default_factory=list)  # per part: bool (N,) over csv rows
    seconds: float = 0.0

    @property
    def mask(self) -> torch.Tensor | None:
        if not self.masks:
            return None
        out = self.masks[0].clone()
        for m in self.masks[1:]:
            out |= m
        return out


def _image_key(img: torch.Tensor, caption: str) -> str:
    h = hashlib.sha1(img.contiguous().numpy().tobytes())
    h.update(caption.encode())
    return h.hexdigest()


class BenchCache:
    """Resolves datasets, poisoned sets and decoded data for the runner; idempotent on disk."""

    def __init__(self, cfg: BenchConfig, out: Path):
        self.cfg = cfg
        self.out = Path(out)
        self.size = model_image_size(cfg.model)
        self._csv: dict[str, ImageCaptionData] = {}
        self._poison: dict[tuple[str, str, int], PoisonedSet] = {}
        self._aside: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._split_done: set[str] = set()

    # ------------------------------------------------------------------ datasets
    def spec(self, ds: DatasetSpec) -> CsvSpec:
        # the validation split's CSVs are the bench's own, written with absolute image paths of
        # rows that passed the root check when the source CSV was read
        return CsvSpec(img_key=ds.img_key, caption_key=ds.caption_key, label_key=ds.label_key,
                       separator=ds.separator, allow_outside_root=ds.val_size > 0)

    def split_paths(self, ds: DatasetSpec) -> tuple[Path, Path, Path]:
        """(training CSV, evaluation CSV, classes.json) of the grid's ``split``.

        With ``val_size`` > 0, a seeded set of clean labelled rows is held out of the training CSV
        (it is neither trained on nor poisoned); ``split: val`` evaluates on those rows, and the
        attacks draw their ASR images from them, so settings are chosen without the test split."""
        train, test, classes = self.dataset_paths(ds)
        if ds.val_size == 0:
            if self.cfg.split == "val":
                raise ConfigError(f"{self.cfg.source}: split: val needs datasets.{ds.label}.val_size > 0")
            return train, test, classes
        folder = self.out / "data" / ds.label / f"val{ds.val_size}-seed{ds.data_seed}"
        fit, val = folder / "train.csv", folder / "val.csv"
        if ds.label not in self._split_done:
            # made from this very training CSV (its hash is the stamp), else made again
            stamp, source = folder / "split.json", {"source_sha256": sha256_file(train)}
            if not (fit.is_file() and val.is_file() and stamp.is_file()
                    and json.loads(stamp.read_text()) == source):
                self._write_split(ds, train, fit, val)
                write_json(stamp, source)
            self._split_done.add(ds.label)
        return fit, (val if self.cfg.split == "val" else test), classes

    def _write_split(self, ds: DatasetSpec, train: Path, fit: Path, val: Path) -> None:
        from clipguard.data.csv_dataset import read_rows, require_labels, write_csv

        data = self.load(train, ds)
        require_labels(data, f"datasets.{ds.label}.val_size (validation rows need labels)")
        if ds.val_size >= len(data):
            raise ConfigError(f"{self.cfg.source}: datasets.{ds.label}.val_size {ds.val_size} leaves no "
                              f"training rows of {len(data)}")
        header, rows = read_rows(train, self.spec(ds))
        g = torch.Generator().manual_seed(step_seed(ds.data_seed, "bench-val", ds.label))
        held = set(torch.randperm(len(rows), generator=g)[: ds.val_size].tolist())
        out_rows = []
        for i, row in enumerate(rows):
            r = dict(row)
            r[ds.img_key] = str((train.parent / data.paths[i]).resolve())
            out_rows.append(r)
        write_csv(val, [r for i, r in enumerate(out_rows) if i in held], header, ds.separator)
        write_csv(fit, [r for i, r in enumerate(out_rows) if i not in held], header, ds.separator)

    def dataset_paths(self, ds: DatasetSpec) -> tuple[Path, Path, Path]:
        """(train.csv, test.csv, classes.json); a built-in dataset is materialised on first use."""
        if ds.builtin is None:
            paths = (Path(ds.train), Path(ds.test), Path(ds.classes))
            for p, key in zip(paths, ("train", "test", "classes")):
                if not p.is_file():
                    raise ConfigError(f"{self.cfg.source}: datasets.{ds.label}.{key}: file not found: {p}")
            return paths
        folder = self.out / "data" / ds.label
        made_with = {"builtin": ds.builtin, "train_size": ds.train_size, "test_size": ds.test_size,
                     "seed": ds.data_seed}
        stamp = folder / "bench_dataset.json"
        fresh = stamp.is_file() and json.loads(stamp.read_text()) == made_with
        if not fresh:  # first use, or the config now asks for another size/seed: (re)materialise
            from clipguard.data import builtin

            builtin.materialise(builtin.get(ds.builtin), folder, train_size=ds.train_size, test_size=ds.test_size,
                                seed=ds.data_seed, overwrite=True)  # the bench's own data folder: only files it wrote are replaced
            write_json(stamp, made_with)
        return folder / "train.csv", folder / "test.csv", folder / "classes.json"

    def load(self, path: Path, ds: DatasetSpec) -> ImageCaptionData:
        key = str(Path(path).resolve())
        if key not in self._csv:
            kw = {"lazy": True} if ds.lazy else {}
            self._csv[key] = load_csv(path, self.spec(ds), image_size=self.size, **kw)
        return self._csv[key]

    def classes(self, ds: DatasetSpec) -> ClassInfo:
        return ClassInfo.load(self.dataset_paths(ds)[2])

    def test_data(self, ds: DatasetSpec) -> ImageCaptionData:
        """The evaluation rows of the grid's split (test, or the held-out validation rows)."""
        return self.load(self.split_paths(ds)[1], ds)

    def clean_train(self, ds: DatasetSpec) -> ImageCaptionData:
        return self.load(self.split_paths(ds)[0], ds)

    def _aside_indices(self, ds: DatasetSpec) -> tuple[torch.Tensor, torch.Tensor]:
        """Two disjoint, seeded subsets of the CLEAN training rows: linear-probe fit, clean fine-tuning.

        Fine-tuning defences (CleanCLIP) assume the defender holds some clean pairs; we take them
        from the clean source CSV (or the dataset's own ``finetune`` CSV), never from the
        poisoned copy."""
        if ds.label not in self._aside:
            n = len(self.clean_train(ds))
            g = torch.Generator().manual_seed(step_seed(ds.data_seed, "bench-aside", ds.label))
            perm = torch.randperm(n, generator=g)
            probe = perm[: min(ds.probe_size, n)] if ds.probe is None else perm[:0]
            rest = perm[len(probe):]
            ft = rest[: min(ds.finetune_size, len(rest))] if len(rest) else perm[: min(ds.finetune_size, n)]
            self._aside[ds.label] = (probe.sort().values, ft.sort().values)
        return self._aside[ds.label]

    def _head(self, data: ImageCaptionData, size: int, ds: DatasetSpec, purpose: str) -> ImageCaptionData:
        """A seeded subset of ``size`` rows of a separate CSV (all rows when size >= its length)."""
        if size >= len(data):
            return data
        g = torch.Generator().manual_seed(step_seed(ds.data_seed, purpose, ds.label))
        return data.subset(torch.randperm(len(data), generator=g)[:size].sort().values)

    def probe_data(self, ds: DatasetSpec) -> ImageCaptionData | None:
        """Labelled clean images for the linear probe; None (no linear probe) when there are none."""
        if ds.probe_size == 0:
            return None
        if ds.probe is not None:
            sub = self._head(self.load(Path(ds.probe), ds), ds.probe_size, ds, "bench-probe")
            where = ds.probe
        else:
            sub = self.clean_train(ds).subset(self._aside_indices(ds)[0])
            where = str(self.split_paths(ds)[0])
        if (sub.labels < 0).any():
            if ds.probe is None:
                return None  # unlabelled web pairs: no linear probe unless a labelled `probe` CSV is given
            raise DataError("the linear probe needs a label on every row", file=where, field=ds.label_key)
        return sub

    def finetune_clean(self, ds: DatasetSpec) -> ImageCaptionData:
        if ds.finetune is not None:
            return self._head(self.load(Path(ds.finetune), ds), ds.finetune_size, ds, "bench-finetune")
        idx = self._aside_indices(ds)[1]
        if len(idx) == 0:
            raise ConfigError(f"{self.cfg.source}: datasets.{ds.label}.finetune_size is 0 but the grid "
                              f"fine-tunes on clean data")
        return self.clean_train(ds).subset(idx)

    # ------------------------------------------------------------------ poisoned data
    def poison_dir(self, ds: DatasetSpec, attack: AttackSpec, seed: int) -> Path:
        return self.out / "poison" / ds.label / attack.label / f"seed{seed}"

    def poisoned(self, ds: DatasetSpec, attack: AttackSpec, seed: int) -> PoisonedSet:
        """Poison once per (dataset, attack, seed); parts are chained (each poisons the previous
        output), and each part's poisons are located in the final CSV by image bytes + caption, so
        the bench never assumes how an attack orders its rows."""
        key = (ds.label, attack.label, seed)
        if key in self._poison:
            return self._poison[key]
        if attack.clean:
            self._poison[key] = PoisonedSet(csv=None)
            return self._poison[key]
        src, manifests, seconds = self.write_poisoned(ds, attack, seed)
        final = self.load(src, ds)
        masks = self._masks(ds, attack, manifests, final)
        self._poison[key] = PoisonedSet(csv=src, manifests=manifests, masks=masks, seconds=seconds)
        return self._poison[key]

    def write_poisoned(self, ds: DatasetSpec, attack: AttackSpec, seed: int) -> tuple[Path, list[Path], float]:
        """Write the poisoned set's folders (each part's, unless already there) without loading it:
        (final training CSV, each part's manifest, seconds the poisoning took). Sets of different
        (dataset, attack, seed) write to separate folders, so they can be made in parallel once the
        dataset itself exists."""
        from clipguard import attacks

        train_csv, test_csv, classes = self.split_paths(ds)
        folder = self.poison_dir(ds, attack, seed)
        timing = folder / "timing.json"
        src = train_csv
        manifests: list[Path] = []
        t0 = time.perf_counter()
        made = False
        for i, part in enumerate(attack.parts):
            # the folder name carries a hash of the data and of this and every earlier part, so a
            # changed dose, option or dataset never reuses a stale poisoned set
            key_i = {"data": [str(train_csv), str(test_csv), ds.train_size, ds.test_size, ds.data_seed], "seed": seed,
                     "parts": [asdict(p) for p in attack.parts[: i + 1]]}
            digest = hashlib.sha256(json.dumps(key_i, sort_keys=True, default=str).encode()).hexdigest()[:8]
            pdir = folder / f"part{i}-{part.attack}-{digest}"
            if not (pdir / "manifest.json").is_file():
                made = True
                attacks.poison_csv(str(src), part.attack, target=part.target_for(seed), rate=part.rate, count=part.count,
                                   seed=step_seed(seed, "bench-poison", i) if i else seed, out=str(pdir),
                                   eval_csv=str(test_csv), options=dict(part.options), spec=self.spec(ds),
                                   mode=part.mode, classes=str(classes))
            manifests.append(pdir / "manifest.json")
            src = pdir / "train.csv"
        if made:
            write_json(timing, {"seconds": round(time.perf_counter() - t0, 3)})
        seconds = float(json.loads(timing.read_text()).get("seconds", 0.0)) if timing.is_file() else 0.0
        return src, manifests, seconds

    def _masks(self, ds: DatasetSpec, attack: AttackSpec, manifests: list[Path],
               final: ImageCaptionData) -> list[torch.Tensor]:
        from clipguard.attacks.manifest import poison_mask

        if len(manifests) == 1:
            return [poison_mask(str(manifests[0]), final).bool()]
        final_keys: dict[str, list[int]] = {}
        for i in range(len(final)):
            final_keys.setdefault(_image_key(final.images[i], final.captions[i]), []).append(i)
        masks = []
        for m in manifests:
            own = self.load(m.parent / "train.csv", ds)
            own_mask = poison_mask(str(m), own).bool()
            mask = torch.zeros(len(final), dtype=torch.bool)
            for j in own_mask.nonzero().flatten().tolist():
                for i in final_keys.get(_image_key(own.images[j], own.captions[j]), []):
                    mask[i] = True
            masks.append(mask)
        return masks

    def train_data(self, ds: DatasetSpec, attack: AttackSpec, seed: int) -> tuple[ImageCaptionData, PoisonedSet]:
        ps = self.poisoned(ds, attack, seed)
        data = self.clean_train(ds) if ps.csv is None else self.load(ps.csv, ds)
        return data, ps

