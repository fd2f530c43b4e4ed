"""The one registry helper behind tasks, methods and backbones."""

import pytest

from workbench.registry import Registry


def test_register_get_and_list():
    reg = Registry("widget")
    a = object()
    assert reg.register("a", a) is a
    assert reg.get("a") is a and "a" in reg and len(reg) == 1
    reg.register("a", a)  # the same object again: a re-import, not a clash
    assert reg.names() == ["a"] and list(reg) == ["a"]


def test_duplicates_are_refused_and_unknown_names_listed():
    reg = Registry("widget")
    reg.register("round", object())
    with pytest.raises(ValueError, match="widget 'round' is already registered"):
        reg.register("round", object())
    with pytest.raises(ValueError, match=r"unknown widget 'rond' \(did you mean 'round'\?\); registered: round"):
        reg.get("rond")
    with pytest.raises(ValueError, match="non-empty string"):
        reg.register("", object())


def test_unregister():
    reg = Registry("widget")
    reg.register("x", 1)
    assert reg.unregister("x") == 1 and "x" not in reg
    with pytest.raises(ValueError, match="unknown widget"):
        reg.unregister("x")


def test_the_three_tables_are_registries():
    from workbench.data.tasks import TASKS
    from workbench.methods import METHODS
    from workbench.models.factory import BACKBONES

    for reg in (TASKS, METHODS, BACKBONES):
        assert isinstance(reg, Registry) and len(reg) > 0
