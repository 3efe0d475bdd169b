"""Atomic writes: a crash or a failed run never leaves a half-written file behind.

Every temporary name these helpers create starts with ``.`` and ends with ``TMP_SUFFIX``, so an
orphan left by a killed process is recognisable (``is_atomic_temp``) and never mistaken for an
output. A write that cannot happen (a directory in the way, a parent that is a file, a read-only
folder, a full disk) raises ``OutputError`` naming the path, removes its temporary and leaves the
previous content of the path as it was.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

from clipguard.errors import OutputError

TMP_SUFFIX = ".cgtmp"
# errors of the writing itself: in the caller's block they are about the output, not an input
_WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG}


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def is_atomic_temp(name: str) -> bool:
    """Whether a file or folder name is a temporary that ``atomic_path``/``atomic_dir`` made."""
    return name.startswith(".") and name.endswith(TMP_SUFFIX) and len(name) > len(TMP_SUFFIX) + 1


def _reason(e: OSError) -> str:
    if e.errno == errno.ENOSPC:
        return "no space left on device"
    if e.errno == errno.EDQUOT:
        return "disk quota exceeded"
    if e.errno == errno.EROFS:
        return "read-only file system"
    if isinstance(e, PermissionError):
        return "permission denied (is the folder read-only?)"
    if isinstance(e, IsADirectoryError):
        return "a directory is in the way of the file"
    if isinstance(e, NotADirectoryError):
        return "a file is in the way of one of its folders"
    return e.strerror or str(e)


def _check_target(path: Path, want_dir: bool = False) -> None:
    """Fail before any work when the path can obviously not be written."""
    if not want_dir and path.is_dir():
        raise OutputError("it is an existing directory; expected a file path", path=str(path))
    if want_dir and path.exists() and not path.is_dir():
        raise OutputError("it is an existing file; expected a folder", path=str(path))
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise OutputError(f"{parent} is a file, not a folder", path=str(path))
            break


def check_output_path(path: str | os.PathLike, *, folder: bool = False) -> Path:
    """Fail early (OutputError) when ``path`` can obviously not be written as a file (or, with
    ``folder``, a folder): a directory or file in the way, a file where a parent folder should be."""
    path = Path(path)
    _check_target(path, folder)
    return path


def _prepare_parent(path: Path, want_dir: bool = False) -> None:
    _check_target(path, want_dir)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(_reason(e), path=str(path)) from e


def _remove(p: Path) -> None:
    with contextlib.suppress(OSError):
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        elif p.exists() or p.is_symlink():
            p.unlink()


@contextlib.contextmanager
def _write_errors(path: Path) -> Iterator[None]:
    """Inside a write block: a full disk, a read-only folder and the like become an OutputError."""
    try:
        yield
    except OSError as e:
        if e.errno in _WRITE_ERRNOS:
            raise OutputError(_reason(e), path=str(path)) from e
        raise


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path in the same folder; rename it onto ``path`` only on success."""
    path = Path(path)
    _prepare_parent(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TMP_SUFFIX, dir=path.parent)
    except OSError as e:
        raise OutputError(_reason(e), path=str(path)) from e
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        with _write_errors(path):
            yield tmp_path
        try:
            os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp makes 0600; outputs follow the umask
            os.replace(tmp_path, path)
        except OSError as e:
            raise OutputError(_reason(e), path=str(path)) from e
    finally:
        _remove(tmp_path)


def round_floats(obj: Any, digits: int = 6) -> Any:
    """``obj`` with every float rounded to ``digits`` significant digits (never into its integer
    part: 1234567.89 -> 1234568.0), recursively through dicts, lists and tuples.

    This removes float32 noise (0.6520000100135803 -> 0.652) and keeps small values such as
    learning rates (3.1999999e-07 -> 3.2e-07). NaN and infinities become ``None`` (JSON has no
    such numbers). Ints, bools and strings are left alone; numpy/torch scalars and arrays become
    Python numbers and lists first.
    """
    if isinstance(obj, float):
        if not math.isfinite(obj):
            return None
        if obj == 0.0:
            return 0.0
        decimals = max(0, digits - 1 - math.floor(math.log10(abs(obj))))
        return round(float(obj), decimals)
    if isinstance(obj, dict):
        return {k: round_floats(v, digits) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [round_floats(v, digits) for v in obj]
    if hasattr(obj, "dtype") and hasattr(obj, "tolist"):  # numpy / torch scalars and arrays
        return round_floats(obj.tolist(), digits)
    return obj


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def _dumps(obj: Any, digits: int | None, indent: int | None) -> str:
    if digits is not None:
        obj = round_floats(obj, digits)
    return json.dumps(obj, indent=indent, sort_keys=False, default=_json_default)


def write_json(path: str | os.PathLike, obj: Any, *, digits: int | None = 6) -> None:
    """Write ``obj`` as indented JSON; floats go through ``round_floats(obj, digits)`` unless
    ``digits`` is None."""
    write_text(path, _dumps(obj, digits, 2) + "\n")


def append_jsonl(path: str | os.PathLike, obj: Any, *, digits: int | None = 6) -> None:
    """Append one record; the file is rewritten atomically so a crash cannot truncate history."""
    path = Path(path)
    _check_target(path)
    try:
        old = path.read_text() if path.exists() else ""
    except OSError as e:
        raise OutputError(_reason(e), path=str(path)) from e
    if old and not old.endswith("\n"):
        old += "\n"
    write_text(path, old + _dumps(obj, digits, None) + "\n")


def read_json_object(path: str | os.PathLike, what: str = "file") -> dict[str, Any]:
    """A JSON object from a user-supplied file, with errors that name the file."""
    from clipguard.errors import DataError

    path = Path(path)
    if not path.is_file():
        raise DataError(f"{what} not found", file=str(path))
    try:
        obj = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DataError(f"invalid JSON: {e}", file=str(path)) from None
    except UnicodeDecodeError:
        raise DataError("not a text file (invalid UTF-8)", file=str(path)) from None
    if not isinstance(obj, dict):
        raise DataError(f"{what} must be a JSON object", file=str(path))
    return obj


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    from clipguard.errors import DataError

    path = Path(path)
    if not path.exists():
        return []
    out = []
    try:
        lines = path.read_text().splitlines()
    except UnicodeDecodeError:
        raise DataError("not a text file (invalid UTF-8)", file=str(path)) from None
    for i, line in enumerate(lines, 1):
        if line.strip():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise DataError(f"invalid JSON line: {e}", file=str(path), row=i) from None
    return out


def _json_default(o: Any) -> Any:
    if hasattr(o, "item"):
        return o.item()
    if hasattr(o, "tolist"):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Build a directory under a temporary name; it replaces ``path`` only if the block succeeds."""
    path = Path(path)
    _prepare_parent(path, want_dir=True)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=TMP_SUFFIX, dir=path.parent))
    except OSError as e:
        raise OutputError(_reason(e), path=str(path)) from e
    try:
        with _write_errors(path):
            yield tmp
        try:
            os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700
            if path.exists():
                old = path.with_name(f".{path.name}.old{TMP_SUFFIX}")
                shutil.rmtree(old, ignore_errors=True)
                os.replace(path, old)
                try:
                    os.replace(tmp, path)
                except OSError:
                    os.replace(old, path)  # put the previous folder back
                    raise
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, path)
        except OSError as e:
            raise OutputError(_reason(e), path=str(path)) from e
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
