"""Semantically close targeted poisoning (``tdpa-close``): TDPA whose target images come from a
class that looks like the adversarial class, e.g. held-out pullovers captioned as coats.

A similarity-based filter (SafeCLIP's split, RoCLIP's caption matching) removes a TDPA poison
because its image and caption disagree; a pullover captioned "a coat" disagrees much less. The
close class is, in this order:

1. ``source_class`` when given (any class other than the adversarial one);
2. else the most similar class in ``similarity``: a JSON file or mapping with either
   ``{"matrix": [[...]]}`` (a square class-similarity matrix in classes.json order, e.g. cosine
   similarities of class-name text embeddings or a confusion matrix; the diagonal is ignored) or
   ``{"lookalikes": {"coat": ["pullover", ...]}}`` (first listed class wins);
3. else the default Fashion-MNIST look-alike table below (first listed class wins).

No entry for the adversarial class is an error that names the table: give ``source_class``.
Target images, captions and the ASR are TDPA's (tdpa.py); with the same seed and the same
source class, tdpa-close picks the same target images as ``tdpa --opt source_class=...``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from clipguard.attacks import ATTACKS
from clipguard.attacks.base import PoisonContext, seeded_random
from clipguard.attacks.tdpa import TDPA
from clipguard.errors import ConfigError, DataError

# Fashion-MNIST classes that look alike (pullover/coat/shirt, t-shirt/shirt, sneaker/sandal/ankle
# boot): for each adversarial class, its look-alikes, the most alike first.
FASHION_MNIST_LOOKALIKES: dict[str, list[str]] = {
    "pullover": ["coat", "shirt"],
    "coat": ["pullover", "shirt"],
    "shirt": ["t-shirt", "pullover", "coat"],
    "t-shirt": ["shirt"],
    "sneaker": ["sandal", "ankle boot"],
    "sandal": ["sneaker", "ankle boot"],
    "ankle boot": ["sneaker", "sandal"],
}


def _table_text(table: dict[str, list[str]]) -> str:
    return "; ".join(f"{k} -> {', '.join(v)}" for k, v in table.items())


@ATTACKS.register("tdpa-close")
class TDPAClose(TDPA):
    name = "tdpa-close"

    def __init__(self, targets: int = 4, source_class: str | int | None = None,
                 similarity: str | dict | None = None, jitter: int = 0):
        if isinstance(targets, bool) or not isinstance(targets, int):
            raise ConfigError(f"attack 'tdpa-close': targets must be a whole number >= 1, not {targets!r}")
        super().__init__(targets, source_class, jitter)
        if similarity is not None and not isinstance(similarity, (str, dict)):
            raise ConfigError("attack 'tdpa-close': similarity must be a JSON file or a mapping with "
                              "'matrix' or 'lookalikes'")
        if similarity is not None and source_class is not None:
            raise ConfigError("attack 'tdpa-close': give source_class or similarity, not both")
        self.similarity = similarity
        self.close: int | None = None
        self.close_from = ""

    # ------------------------------------------------------------------ the close class
    def _index(self, ctx: PoisonContext, cls: Any, where: str) -> int:
        try:
            if ctx.classes is not None:
                return ctx.classes.index(cls)
            if isinstance(cls, int) or str(cls).strip().isdigit():
                return int(cls)
        except DataError as e:
            raise ConfigError(f"attack 'tdpa-close': {where}: {e}") from None
        raise ConfigError(f"attack 'tdpa-close': {where} names class {cls!r} but there is no classes.json "
                          "(pass --classes, or give class indices)")

    def _load_similarity(self) -> dict:
        sim = self.similarity
        if isinstance(sim, dict):
            return sim
        from clipguard.io import read_json_object

        path = Path(str(sim))
        if not path.is_file():
            raise ConfigError(f"attack 'tdpa-close': similarity file {path} not found")
        return read_json_object(path, "class-similarity file")

    def _from_similarity(self, ctx: PoisonContext) -> int:
        obj = self._load_similarity()
        n = len(ctx.classes.classes) if ctx.classes is not None else int(ctx.data.labels.max()) + 1
        if "matrix" in obj:
            m = obj["matrix"]
            if (not isinstance(m, list) or len(m) != n
                    or not all(isinstance(r, list) and len(r) == n for r in m)
                    or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for r in m for v in r)):
                raise ConfigError(f"attack 'tdpa-close': similarity.matrix must be a {n} x {n} list of "
                                  "numbers (one row and column per class, classes.json order)")
            row = [(float(v), j) for j, v in enumerate(m[ctx.target]) if j != ctx.target]
            best = max(row, key=lambda t: (t[0], -t[1]))   # ties: the lower class index
            return best[1]
        if "lookalikes" in obj:
            table = obj["lookalikes"]
            if not isinstance(table, dict):
                raise ConfigError("attack 'tdpa-close': similarity.lookalikes must map a class to a list "
                                  "of classes")
            return self._from_table(ctx, table, "similarity.lookalikes")
        raise ConfigError("attack 'tdpa-close': similarity needs a 'matrix' or a 'lookalikes' key")

    def _from_table(self, ctx: PoisonContext, table: dict[str, Any], where: str) -> int:
        name = ctx.class_name(ctx.target).strip().lower()
        entry = None
        for k, v in table.items():
            if str(k).strip().lower() == name or (str(k).strip().isdigit() and int(k) == ctx.target):
                entry = v
                break
        if not entry:
            raise ConfigError(
                f"attack 'tdpa-close': no look-alike class known for the adversarial class {name!r} in the "
                f"{where} ({_table_text(table)}); give --opt source_class=NAME (or similarity=FILE)")
        first = entry[0] if isinstance(entry, list) else entry
        return self._index(ctx, first, f"{where}[{name!r}]")

    def resolve_close(self, ctx: PoisonContext) -> int:
        if self.source_class is not None:
            src, self.close_from = self._index(ctx, self.source_class, "source_class"), "source_class option"
        elif self.similarity is not None:
            src, self.close_from = self._from_similarity(ctx), "similarity"
        else:
            if ctx.classes is None:
                raise ConfigError("attack 'tdpa-close': the default look-alike table names classes: pass "
                                  "--classes (classes.json) or give source_class")
            src = self._from_table(ctx, FASHION_MNIST_LOOKALIKES, "default Fashion-MNIST look-alike table")
            self.close_from = "default Fashion-MNIST look-alike table"
        if src == ctx.target:
            raise ConfigError("attack 'tdpa-close': the close (source) class must differ from the "
                              "adversarial (target) class")
        return src

    def setup(self, ctx: PoisonContext) -> None:
        super().setup(ctx)
        self.close = self.resolve_close(ctx)
        self._close_name = ctx.class_name(self.close)

    def params(self) -> dict:
        out = super().params()
        out["close_class"] = {"index": self.close, "name": getattr(self, "_close_name", None)}
        out["close_class_from"] = self.close_from
        return out

    # ------------------------------------------------------------------ targets
    def choose_targets(self, ctx: PoisonContext) -> list[int]:
        ev = self.labelled_eval_data(ctx)
        close = self.resolve_close(ctx) if self.close is None else self.close
        pool = [i for i in range(len(ev)) if int(ev.labels[i]) == close]
        if len(pool) < self.targets:
            raise ConfigError(f"tdpa-close: {self.targets} target images asked, only {len(pool)} held-out "
                              f"images of the close class {ctx.class_name(close)!r}")
        return sorted(seeded_random("tdpa-targets", ctx.seed).sample(pool, self.targets))

    def plan(self, ctx: PoisonContext, count: int):
        p = super().plan(ctx, count)
        p.info["close_class"] = {"index": self.close, "name": ctx.class_name(self.close)}
        return p
