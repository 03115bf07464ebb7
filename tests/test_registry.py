"""The registry resolves names, import paths and entry points, and fails clearly."""

from __future__ import annotations

import sys
import textwrap

import pytest

from unimoe.registry import Registry, RegistryError


class Widget:
    def __init__(self, size: int, colour: str = "red") -> None:
        self.size, self.colour = size, colour


class Gadget:
    def __init__(self, size: int, *, speed: float = 1.0, hidden: int = 0) -> None:
        self.size, self.speed, self.hidden = size, speed, hidden


@pytest.fixture
def reg() -> Registry:
    r = Registry("widgets_test", "widget")
    r.register("widget", Widget)
    r.register("gadget")(Gadget)
    return r


def test_build_by_every_spec_form(reg):
    assert reg.build("widget", size=3).size == 3
    w = reg.build({"class_path": "widget", "init_args": {"colour": "blue"}}, size=1)
    assert (w.size, w.colour) == (1, "blue")
    g = reg.build({"name": "gadget", "speed": 2.5}, size=4)
    assert (g.size, g.speed) == (4, 2.5)
    by_path = reg.build({"class_path": f"{__name__}.Gadget", "init_args": {"speed": 0.5}}, size=2)
    assert isinstance(by_path, Gadget) and by_path.speed == 0.5
    colon = reg.build(f"{__name__}:Widget", size=7)
    assert isinstance(colon, Widget) and colon.size == 7
    prebuilt = Widget(9)
    assert reg.build(prebuilt) is prebuilt


def test_context_only_passed_where_accepted(reg):
    # Widget has no `hidden` parameter: the context kwarg is dropped, not an error.
    w = reg.build("widget", size=2, hidden=64)
    assert w.size == 2
    g = reg.build("gadget", size=2, hidden=64)
    assert g.hidden == 64


def test_unknown_name_lists_registered(reg):
    with pytest.raises(RegistryError) as err:
        reg.build("wigdet", size=1)
    msg = str(err.value)
    assert "wigdet" in msg and "gadget" in msg and "widget" in msg


def test_unknown_init_arg_names_the_field(reg):
    with pytest.raises(RegistryError, match="colr"):
        reg.build({"name": "widget", "colr": "blue"}, size=1)


def test_missing_required_argument(reg):
    with pytest.raises(RegistryError, match="size"):
        reg.build("widget")


def test_bad_spec_shapes(reg):
    with pytest.raises(RegistryError, match="class_path"):
        reg.build({"colour": "blue"})
    with pytest.raises(RegistryError, match="init_args"):
        reg.build({"class_path": "widget", "colour": "blue"})
    with pytest.raises(RegistryError, match="cannot import"):
        reg.build("no_such_module_xyz.Thing")


def test_duplicate_registration_rejected(reg):
    with pytest.raises(RegistryError, match="already registered"):
        reg.register("widget", Gadget)


def test_entry_points_from_an_installed_distribution(tmp_path, monkeypatch):
    """A package that only declares an entry point becomes buildable by name."""
    pkg = tmp_path / "thirdparty_widgets"
    pkg.mkdir()
    (pkg / "__init__.py").write_text(
        textwrap.dedent(
            """
            class Sprocket:
                def __init__(self, size, teeth=12):
                    self.size, self.teeth = size, teeth
            """
        )
    )
    dist = tmp_path / "thirdparty_widgets-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: thirdparty-widgets\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[unimoe.widgets_ep]\nsprocket = thirdparty_widgets:Sprocket\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    reg = Registry("widgets_ep", "widget")
    assert "sprocket" in reg.names()
    s = reg.build({"name": "sprocket", "teeth": 30}, size=5)
    assert (type(s).__name__, s.size, s.teeth) == ("Sprocket", 5, 30)
    sys.modules.pop("thirdparty_widgets", None)


def _fake_distribution(root, name: str, entry_points: str, modules: dict[str, str]) -> None:
    dist = root / f"{name}-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(entry_points)
    for module, source in modules.items():
        (root / f"{module}.py").write_text(textwrap.dedent(source))


def test_entry_points_are_imported_only_when_their_name_is_used(tmp_path, monkeypatch):
    _fake_distribution(tmp_path, "lazy-widgets", "[unimoe.widgets_lazy]\nbolt = lazy_widgets_mod:Bolt\n",
                       {"lazy_widgets_mod": "class Bolt:\n    def __init__(self, size):\n        self.size = size\n"})
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("lazy_widgets_mod", None)
    reg = Registry("widgets_lazy", "widget")
    assert reg.names() == ["bolt"] and "bolt" in reg
    assert "lazy_widgets_mod" not in sys.modules  # listed from the metadata, nothing imported
    assert reg.build("bolt", size=2).size == 2
    assert "lazy_widgets_mod" in sys.modules
    sys.modules.pop("lazy_widgets_mod", None)


def test_broken_duplicate_and_module_entry_points_fail_naming_the_package(tmp_path, monkeypatch):
    _fake_distribution(tmp_path, "pkg-one", "[unimoe.widgets_bad]\ntwin = bad_one:A\nbroken = bad_one:Missing\n"
                       "mod = bad_one\n", {"bad_one": "class A:\n    pass\n"})
    _fake_distribution(tmp_path, "pkg-two", "[unimoe.widgets_bad]\ntwin = bad_two:B\n", {"bad_two": "class B:\n    pass\n"})
    monkeypatch.syspath_prepend(str(tmp_path))
    reg = Registry("widgets_bad", "widget")
    with pytest.raises(RegistryError, match=r"'twin' is declared by more than one installed package: bad_one:A \(package pkg-one\); bad_two:B \(package pkg-two\)"):
        reg.get("twin")
    with pytest.raises(RegistryError, match=r"'broken' = 'bad_one:Missing'.*pkg-one.*failed to import"):
        reg.get("broken")
    with pytest.raises(RegistryError, match="names a module"):
        reg.get("mod")
    with pytest.raises(RegistryError, match="already declared by the entry point bad_one:A, bad_two:B"):
        reg.register("twin", Widget)
    for module in ("bad_one", "bad_two"):
        sys.modules.pop(module, None)
