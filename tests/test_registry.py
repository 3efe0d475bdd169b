import pytest

from clipguard.errors import ConfigError
from clipguard.registry import Registry


def test_register_get_and_clear_errors():
    r: Registry[int] = Registry("widget")
    r.register("a")(1)
    assert r.get("a") == 1 and "a" in r and r.names() == ["a"]
    with pytest.raises(ConfigError, match="unknown widget 'b'; choose one of: a"):
        r.get("b")
    with pytest.raises(ValueError, match="registered twice"):
        r.register("a")(2)


def test_a_mistyped_name_or_option_gets_the_nearest_known_one():
    from clipguard import attacks, defenses

    with pytest.raises(ConfigError, match=r"unknown defense 'safclip'; choose one of: .*\(did you mean 'safeclip'\?\)$"):
        defenses.get("safclip")
    with pytest.raises(ConfigError, match=r"unknown attack 'zzzz'; choose one of: [a-z_, -]*$"):  # nothing near
        attacks.get("zzzz")
    with pytest.raises(ConfigError, match=r"attack 'badnet' has no option 'sise' \(did you mean 'size'\?\); it takes: size,"):
        attacks.get("badnet").build({"sise": 3})
    from clipguard.models.factory import model_config

    with pytest.raises(ConfigError, match=r"unknown model 'cg-nan' \(did you mean 'cg-nano'\?\)"):
        model_config("cg-nan")


def test_autoload_imports_the_package_on_first_lookup():
    from clipguard.defenses import DEFENSES

    assert {"none", "ft", "safeclip", "roclip", "cleanclip", "cleanerclip"} <= set(DEFENSES.names())


def test_named_modules_are_imported_on_first_lookup(tmp_path, monkeypatch):
    import sys

    (tmp_path / "cg_widget_a.py").write_text("from tests_reg_shared import R\nR.register('a')(1)\n")
    (tmp_path / "cg_widget_b.py").write_text("from tests_reg_shared import R\nR.register('b')(2)\n")
    (tmp_path / "cg_widget_c.py").write_text("from tests_reg_shared import R\nR.register('c')(3)\n")
    (tmp_path / "tests_reg_shared.py").write_text(
        "from clipguard.registry import Registry\nR = Registry('widget', modules=('cg_widget_a', 'cg_widget_b'))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import tests_reg_shared

    try:
        assert "cg_widget_a" not in sys.modules  # nothing imported before a lookup
        assert tests_reg_shared.R.names() == ["a", "b"]  # the named modules only
        assert "cg_widget_c" not in sys.modules
    finally:
        for m in ("tests_reg_shared", "cg_widget_a", "cg_widget_b"):
            sys.modules.pop(m, None)
    with pytest.raises(ValueError, match="either a package or named modules"):
        Registry("widget", package="clipguard.defenses", modules=("x",))
