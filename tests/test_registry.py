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


def test_autoload_imports_the_package_on_first_lookup():
    from clipguard.defenses import DEFENSES

    assert {"none", "ft", "safeclip", "roclip", "cleanclip", "cleanerclip"} <= set(DEFENSES.names())
