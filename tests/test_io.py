import os
import stat

import pytest

from clipguard.errors import DataError
from clipguard.io import atomic_dir, atomic_path, read_json_object, write_json


def test_atomic_outputs_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        write_json(tmp_path / "a.json", {"x": 1})
        with atomic_dir(tmp_path / "d") as d:
            (d / "f").write_text("y")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a.json").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "d").stat().st_mode) == 0o755


def test_failed_write_leaves_the_old_file(tmp_path):
    write_json(tmp_path / "a.json", {"x": 1})
    with pytest.raises(RuntimeError):
        with atomic_path(tmp_path / "a.json") as tmp:
            tmp.write_text("half")
            raise RuntimeError("crash")
    assert read_json_object(tmp_path / "a.json") == {"x": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]


def test_read_json_object_errors(tmp_path):
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(DataError, match="invalid JSON"):
        read_json_object(tmp_path / "bad.json")
    (tmp_path / "list.json").write_text("[]")
    with pytest.raises(DataError, match="must be a JSON object"):
        read_json_object(tmp_path / "list.json", "manifest")
