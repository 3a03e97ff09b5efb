"""The plugin host: built-ins go through the same path as third-party plugins; failures isolate."""

from __future__ import annotations

import importlib.metadata as md
import types
from dataclasses import dataclass

import pytest

from lmkit import hookimpl
from lmkit.core import registry as registry_mod
from lmkit.core.registry import PluginWarning, Registry
from lmkit.errors import LmkitError
from lmkit.plugins.ar import ARObjective


def make_objective(name: str) -> type:
    @dataclass
    class Opts:
        pass

    return type(name.title(), (ARObjective,), {"name": name, "description": f"test {name}",
                                               "Options": Opts})


def plugin_module(name: str, *objectives: type, raises: Exception | None = None):
    mod = types.ModuleType(name)

    @hookimpl
    def register_objectives(register):
        for obj in objectives:
            register(obj)
        if raises is not None:
            raise raises

    mod.register_objectives = register_objectives
    return mod


@pytest.fixture
def registry():
    """A fresh registry with the built-ins only; the process-wide one is restored afterwards."""
    reg = Registry()
    reg.load(entry_points=False)
    registry_mod.reset_registry(reg)
    yield reg
    registry_mod.reset_registry(None)


def test_builtins_register_through_the_plugin_path(registry):
    assert "ar" in registry.entries["objective"]
    assert "sotu" in registry.entries["corpus"]
    entry = registry.get("objective", "ar")
    assert entry.plugin == "lmkit.plugins.ar" and entry.distribution == "lmkit"
    assert registry.plugins["lmkit.plugins.ar"].builtin
    assert registry.plugins["lmkit.plugins.ar"].hooks == ["register_objectives"]


def test_third_party_plugin_registers_and_unregisters(registry):
    registry.add_plugin(plugin_module("mine", make_objective("mine")), "mine", "lmkit-mine", "1.2")
    entry = registry.get("objective", "mine")
    assert (entry.plugin, entry.distribution, entry.version) == ("mine", "lmkit-mine", "1.2")
    registry._rollback("mine")
    with pytest.raises(LmkitError, match="unknown objective 'mine'"):
        registry.get("objective", "mine")


def test_duplicate_name_names_both_plugins(registry):
    registry.add_plugin(plugin_module("one", make_objective("dup")), "one", "dist-one", "1")
    with pytest.raises(LmkitError) as err:
        registry.add_plugin(plugin_module("two", make_objective("dup")), "two", "dist-two", "2")
    message = str(err.value)
    assert "'one'" in message and "'two'" in message and "dist-one" in message
    assert registry.get("objective", "dup").plugin == "one"
    assert "two" not in registry.plugins


def test_failing_plugin_is_rolled_back_with_one_warning(registry, monkeypatch):
    monkeypatch.delenv("LMKIT_STRICT_PLUGINS", raising=False)
    broken = plugin_module("broken", make_objective("half"), raises=RuntimeError("boom"))
    with pytest.warns(PluginWarning, match="broken.*boom"):
        registry.add_plugin(broken, "broken", "lmkit-broken", "0.1")
    assert "half" not in registry.entries["objective"]  # its partial registration is gone
    assert "broken" not in registry.plugins
    assert registry.get("objective", "ar")  # the rest keeps working


def test_strict_mode_reraises(registry, monkeypatch):
    monkeypatch.setenv("LMKIT_STRICT_PLUGINS", "1")
    broken = plugin_module("broken", raises=RuntimeError("boom"))
    with pytest.raises(LmkitError, match="broken.*boom"):
        registry.add_plugin(broken, "broken", "lmkit-broken", "0.1")


def test_invalid_objective_is_rejected(registry, monkeypatch):
    monkeypatch.delenv("LMKIT_STRICT_PLUGINS", raising=False)

    class NoLoss:
        name = "noloss"
        description = "lacks everything"

    with pytest.warns(PluginWarning, match="lacks"):
        registry.add_plugin(plugin_module("bad", NoLoss), "bad", "lmkit-bad", "0")
    assert "noloss" not in registry.entries["objective"]


class FakeEntryPoint:
    def __init__(self, name, module, fail=False):
        self.name, self.value = name, f"{name}_module"
        self._module, self._fail = module, fail
        self.dist = types.SimpleNamespace(metadata={"Name": f"lmkit-{name}"}, version="9.9")

    def load(self):
        if self._fail:
            raise ImportError(f"no module named {self.name}_dep")
        return self._module


def _fake_entry_points(monkeypatch, eps):
    def entry_points(group=None):
        assert group == "lmkit"
        return eps

    monkeypatch.setattr(md, "entry_points", entry_points)


def test_entry_points_load_with_isolation_and_allow_list(monkeypatch):
    monkeypatch.delenv("LMKIT_STRICT_PLUGINS", raising=False)
    good = FakeEntryPoint("good", plugin_module("good", make_objective("good")))
    bad = FakeEntryPoint("bad", None, fail=True)
    _fake_entry_points(monkeypatch, [good, bad])

    monkeypatch.delenv("LMKIT_LOAD_PLUGINS", raising=False)
    reg = Registry()
    with pytest.warns(PluginWarning, match="'bad'.*lmkit-bad 9.9.*no module named bad_dep"):
        reg.load()
    assert reg.get("objective", "good").distribution == "lmkit-good"
    assert len(reg.failures) == 1

    monkeypatch.setenv("LMKIT_LOAD_PLUGINS", "")
    reg = Registry()
    reg.load()
    assert "good" not in reg.entries["objective"] and not reg.failures
    assert "ar" in reg.entries["objective"]  # built-ins are not subject to the allow-list

    monkeypatch.setenv("LMKIT_LOAD_PLUGINS", "good")
    reg = Registry()
    reg.load()
    assert "good" in reg.entries["objective"] and not reg.failures
