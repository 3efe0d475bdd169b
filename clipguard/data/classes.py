"""classes.json: class names, caption vocabulary and zero-shot templates for a labelled dataset."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from clipguard.errors import DataError

DEFAULT_ZEROSHOT_TEMPLATES = [
    "a photo of a {}.",
    "a picture of a {}.",
    "an image of a {}.",
    "a photo of the {}.",
    "a black and white photo of a {}.",
]


@dataclass
class ClassInfo:
    """What zero-shot evaluation and caption-based attacks need to know about the classes."""

    classes: list[str]
    templates: list[str] = field(default_factory=lambda: list(DEFAULT_ZEROSHOT_TEMPLATES))
    synonyms: dict[str, list[str]] = field(default_factory=dict)

    def index(self, name_or_index: str | int) -> int:
        """Resolve a class given by name, synonym or index, with a clear error otherwise."""
        if isinstance(name_or_index, int) or str(name_or_index).isdigit():
            i = int(name_or_index)
            if 0 <= i < len(self.classes):
                return i
            raise DataError(f"class index {i} out of range 0..{len(self.classes) - 1}")
        key = str(name_or_index).strip().lower()
        for i, c in enumerate(self.classes):
            if key == c.lower() or key in [s.lower() for s in self.synonyms.get(c, [])]:
                return i
        raise DataError(f"unknown class {name_or_index!r}; classes are {self.classes}")

    def prompts(self, i: int) -> list[str]:
        return [t.format(self.classes[i]) for t in self.templates]

    def save(self, path: str | Path) -> None:
        from clipguard.io import write_json

        write_json(path, asdict(self))

    @classmethod
    def load(cls, path: str | Path) -> "ClassInfo":
        from clipguard.io import read_json_object

        path = Path(path)
        obj = read_json_object(path, "classes file")
        if not isinstance(obj.get("classes"), list) or not obj["classes"]:
            raise DataError("needs a non-empty list 'classes'", file=str(path), field="classes")
        templates = obj.get("templates") or list(DEFAULT_ZEROSHOT_TEMPLATES)
        for t in templates:
            if "{}" not in t:
                raise DataError(f"template {t!r} has no '{{}}'", file=str(path), field="templates")
        return cls(classes=[str(c) for c in obj["classes"]], templates=templates,
                   synonyms=obj.get("synonyms") or {})
