"""The plugin docs work as written and cover the whole API.

* docs/plugins.md: its Python blocks are run as the tutorial's module, registered through the
  plugin path, trained and evaluated on the tiny corpus and put through the lmkit contract; its
  pyproject snippet declares the entry point.
* docs/hooks.md documents every hookspec, and some test exercises each one.
* docs/api.md names every public name, every field of the API's data classes and every check
  of the contract kit.
"""

from __future__ import annotations

import dataclasses
import re
import sys
import tomllib
import types
from pathlib import Path

import pytest

import lmkit
from lmkit import hookspecs, protocols
from lmkit.core import registry as registry_mod
from lmkit.core.bpb import Metric
from lmkit.core.config import resolve_config
from lmkit.core.data import open_data
from lmkit.core.evaluate import evaluate_run
from lmkit.core.registry import Registry
from lmkit.core.train import train
from lmkit.testing import OBJECTIVE_CHECKS, SAMPLER_CHECKS, Contract

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)


def blocks(doc: str) -> dict[str, str]:
    """Code blocks by the file they belong to: a block whose first line is a comment naming a
    file starts that file; a block without one continues the previous file."""
    files: dict[str, str] = {}
    current = None
    for lang, code in FENCE.findall((DOCS / doc).read_text()):
        first = code.splitlines()[0] if code.strip() else ""
        named = re.match(r"#\s*(\S+\.(?:py|toml))\s*$", first)
        if named:
            current = named.group(1)
        if current is not None and lang in ("python", "toml"):
            files[current] = files.get(current, "") + code + "\n"
    return files


@pytest.fixture(scope="module")
def tutorial() -> types.ModuleType:
    """The tutorial's plugin module, built from its code blocks."""
    module = types.ModuleType("lmkit_r2l")
    sys.modules["lmkit_r2l"] = module  # dataclasses look their module up while being built
    try:
        exec(compile(blocks("plugins.md")["lmkit_r2l/__init__.py"], "docs/plugins.md", "exec"),
             module.__dict__)
        yield module
    finally:
        del sys.modules["lmkit_r2l"]


@pytest.fixture(scope="module")
def registered(tutorial):
    registry = Registry()
    registry.load(entry_points=False)
    registry.add_plugin(tutorial, "r2l", "lmkit-r2l", "0.1.0")
    registry_mod.reset_registry(registry)
    yield registry
    registry_mod.reset_registry(None)


def test_tutorial_plugin_registers_trains_and_evaluates(registered, tiny_data, tmp_path):
    entry = registered.get("objective", "r2l")
    assert (entry.plugin, entry.distribution, entry.version) == ("r2l", "lmkit-r2l", "0.1.0")
    assert registered.get("sampler", "min_p").obj.objectives == ("ar",)
    cfg = resolve_config(preset="tiny", flags={"objective": "r2l", "train.steps": 3,
                                               "data.path": str(tiny_data)},
                         sets=["train.seq_len=32", "train.batch_tokens=256",
                               "train.val_tokens=512", "train.dtype=fp32"])
    summary = train(cfg, open_data(tiny_data), tmp_path / "run")
    assert summary["steps"] == 3 and summary["val"][0]["name"] == "nll_r2l"
    result = evaluate_run(tmp_path / "run", max_tokens=400, options={"windows": 4}, device="cpu")
    (metric,) = [Metric.from_dict(m) for m in result["metrics"]]
    assert metric.kind == "exact" and metric.stderr is None and metric.tokens == 4 * 32
    assert 0 < metric.value < 20


def test_tutorial_plugin_passes_its_contract_tests(registered, tiny_data, tmp_path):
    """Run the test file the tutorial tells the reader to write."""
    namespace: dict = {}
    exec(blocks("plugins.md")["tests/test_r2l.py"], namespace)
    test = namespace["test_contract"]
    (mark,) = [m for m in test.pytestmark if m.name == "parametrize"]
    cases = list(mark.args[1])
    assert len(cases) == len(OBJECTIVE_CHECKS) + len(SAMPLER_CHECKS)
    contract = Contract(tiny_data, tmp_path)
    for case in cases:
        test(case, contract)


def test_tutorial_pyproject_declares_the_entry_point():
    project = tomllib.loads(blocks("plugins.md")["pyproject.toml"])
    assert project["project"]["entry-points"]["lmkit"] == {"r2l": "lmkit_r2l"}


def hookspec_names() -> list[str]:
    return sorted(name for name, fn in vars(hookspecs).items()
                  if callable(fn) and hasattr(fn, "lmkit_spec"))


def test_every_hook_is_documented_and_exercised_by_a_test():
    names = hookspec_names()
    assert {"register_objectives", "register_samplers", "register_corpora",
            "register_commands"} <= set(names)
    reference = (DOCS / "hooks.md").read_text()
    tests = {p.name: p.read_text() for p in (ROOT / "tests").glob("test_*.py")
             if p.name != Path(__file__).name}
    for name in names:
        section = re.search(rf"^## {name}\n(.*?)(?=^## |\Z)", reference, re.S | re.M)
        assert section, f"docs/hooks.md has no '## {name}' section"
        for arg in getattr(hookspecs, name).__code__.co_varnames[
                :getattr(hookspecs, name).__code__.co_argcount]:
            assert f"{arg}" in section.group(1), f"docs/hooks.md: {name} does not explain {arg}"
        assert "@hookimpl" in section.group(1), f"docs/hooks.md: {name} has no example"
        pattern = re.compile(rf"\b{name}\(")
        assert any(pattern.search(text) for text in tests.values()), (
            f"no test implements or calls the hook {name}")


def test_the_api_reference_covers_the_public_api():
    api = (DOCS / "api.md").read_text()
    missing = [n for n in lmkit.__all__ if f"`{n}`" not in api]
    assert not missing, f"docs/api.md does not mention {missing}"
    for cls in (protocols.TokenSpec, protocols.Batch, protocols.LossOutput,
                protocols.EvalContext, protocols.SampleContext, protocols.SampleResult, Metric):
        fields = [f.name for f in dataclasses.fields(cls)]
        undocumented = [f for f in fields if f"`{f}`" not in api]
        assert not undocumented, f"docs/api.md: {cls.__name__} fields {undocumented}"
    sampler_attrs = registry_mod.KINDS["register_samplers"][1]
    for attr in (*protocols.REQUIRED_OBJECTIVE_ATTRS, *sampler_attrs):
        assert f"`{attr}`" in api or f"`{attr}(" in api, f"docs/api.md lacks {attr}"
    for check in (*OBJECTIVE_CHECKS, *SAMPLER_CHECKS):
        assert f"`{check}`" in api, f"docs/api.md does not describe the contract check {check}"
