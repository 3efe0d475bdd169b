"""classes.json: class names, caption vocabulary and zero-shot templates for a labelled dataset.

Format::

    {"classes": ["cat", "dog"],
     "templates": ["a photo of a {}."],                 # optional; '{}' is the class name
     "synonyms": {"cat": ["kitten"], "dog": ["puppy"]}}  # optional; or [["kitten"], ["puppy"]]

``load`` validates all of it and names the file and key of the first problem (``ConfigError``):
a duplicate class or an ambiguous synonym would make name look-ups pick a class silently, and a
template with a field other than ``{}`` would fail only in the middle of an evaluation.
"""

from __future__ import annotations

import string
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from clipguard.errors import ConfigError, DataError

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

    def lookup(self) -> dict[str, int]:
        """Lower-cased class names and synonyms -> index; a class's own name wins over synonyms."""
        table: dict[str, int] = {}
        for i, c in enumerate(self.classes):
            for s in self.synonyms.get(c, []):
                table.setdefault(s.strip().lower(), i)
        table.update({c.strip().lower(): i for i, c in enumerate(self.classes)})
        return table

    def index(self, name_or_index: str | int) -> int:
        """Resolve a class given by name, synonym or index, with a clear error otherwise."""
        if isinstance(name_or_index, int) or str(name_or_index).strip().isdigit():
            i = int(name_or_index)
            if 0 <= i < len(self.classes):
                return i
            raise DataError(f"class index {i} out of range 0..{len(self.classes) - 1}")
        i = self.lookup().get(str(name_or_index).strip().lower())
        if i is None:
            raise DataError(f"unknown class {name_or_index!r}; classes are {self.classes}")
        return i

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
        classes = _check_classes(obj.get("classes"), path)
        return cls(classes=classes, templates=_check_templates(obj.get("templates"), path),
                   synonyms=_check_synonyms(obj.get("synonyms"), classes, path))


def _bad(path: Path, key: str, msg: str) -> ConfigError:
    return ConfigError(f"{path}: '{key}': {msg}")


def _check_classes(value: Any, path: Path) -> list[str]:
    if not isinstance(value, list) or not value:
        raise _bad(path, "classes", "needs a non-empty list of class names")
    seen: dict[str, int] = {}
    for i, c in enumerate(value):
        if not isinstance(c, str) or not c.strip():
            raise _bad(path, f"classes[{i}]", f"{c!r} is not a non-empty string")
        key = c.strip().lower()
        if key in seen:
            raise _bad(path, f"classes[{i}]", f"{c!r} duplicates classes[{seen[key]}] "
                       "(names are matched case-insensitively)")
        seen[key] = i
    return list(value)


def _template_problem(t: Any) -> str | None:
    """Why a template cannot be ``t.format(class_name)``, or None if it can."""
    if not isinstance(t, str):
        return f"{t!r} is not a string"
    try:
        names = [name for _, name, _, _ in string.Formatter().parse(t) if name is not None]
        if not names:
            return f"{t!r} has no '{{}}' for the class name"
        other = [n for n in names if n not in ("", "0")]
        if other:
            return f"{t!r} uses '{{{other[0]}}}'; only '{{}}' (the class name) is filled in"
        t.format("x")
    except (ValueError, IndexError, KeyError) as e:
        return f"{t!r} is not a valid template ({e})"
    return None


def _check_templates(value: Any, path: Path) -> list[str]:
    if value is None:
        return list(DEFAULT_ZEROSHOT_TEMPLATES)
    if not isinstance(value, list) or not value:
        raise _bad(path, "templates", "must be a non-empty list of strings with '{}' for the class "
                   "name (omit the key for the defaults)")
    for i, t in enumerate(value):
        problem = _template_problem(t)
        if problem:
            raise _bad(path, f"templates[{i}]", problem)
    return list(value)


def _check_synonyms(value: Any, classes: list[str], path: Path) -> dict[str, list[str]]:
    if value is None:
        return {}
    if isinstance(value, list):
        value = _synonyms_from_list(value, classes, path)
    if not isinstance(value, dict):
        raise _bad(path, "synonyms", "must be an object {class name: [synonyms]}")
    by_name = {c.strip().lower(): c for c in classes}
    out: dict[str, list[str]] = {}
    owner: dict[str, str] = {}
    for key, syns in value.items():
        cls_name = by_name.get(str(key).strip().lower())
        if cls_name is None:
            raise _bad(path, f"synonyms['{key}']", f"not one of the classes {classes}")
        if not isinstance(syns, list) or not all(isinstance(s, str) and s.strip() for s in syns):
            raise _bad(path, f"synonyms['{key}']", "must be a list of non-empty strings")
        for j, s in enumerate(syns):
            k = s.strip().lower()
            other = owner.get(k, by_name.get(k, cls_name))
            if other != cls_name:
                raise _bad(path, f"synonyms['{key}'][{j}]", f"{s!r} also names class {other!r}; "
                           "a synonym must point to one class")
            owner[k] = cls_name
        out[cls_name] = list(syns)
    return out


def _synonyms_from_list(value: list, classes: list[str], path: Path) -> dict[str, Any]:
    """A list of lists aligned with ``classes`` is accepted; anything else is ambiguous."""
    if len(value) != len(classes) or not all(isinstance(v, list) for v in value):
        raise _bad(path, "synonyms", f"is a list; give an object {{class name: [synonyms]}} or a list "
                   f"of {len(classes)} lists aligned with 'classes'")
    return {c: syns for c, syns in zip(classes, value)}
