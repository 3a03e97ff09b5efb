"""Plugin isolation end to end: real distributions on disk, found through their entry points.

Each test writes tiny "installed" distributions (a ``*.dist-info`` with ``entry_points.txt`` next
to their modules) into a directory put on the path, then runs ``python -m lmkit ...`` in a fresh
process, as a user would after ``pip install``. tests/test_registry.py covers the same rules
in-process with fake entry points.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest

from lmkit.core import registry as registry_mod
from lmkit.core.registry import PluginWarning, Registry

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--set", "train.seq_len=32", "--set",
        "train.batch_tokens=256", "--set", "train.val_tokens=512", "--set", "train.dtype=fp32"]

GOOD = '''
from lmkit import hookimpl
from lmkit.plugins.ar import ARObjective


class {cls}(ARObjective):
    name = "{objective}"
    description = "an AR clone from a third-party distribution"


@hookimpl
def register_objectives(register):
    register({cls})


@hookimpl
def register_commands(cli):
    @cli.command("{command}")
    def hello():
        """Say hello from a plugin."""
        print("hello from {dist}")
'''


def install(site: Path, dist: str, version: str, entry_point: str, module: str,
            source: str) -> None:
    """Write an installed distribution: its metadata, one ``lmkit`` entry point, one module."""
    info = site / f"{dist.replace('-', '_')}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
    (info / "entry_points.txt").write_text(f"[lmkit]\n{entry_point} = {module}\n")
    (site / f"{module}.py").write_text(textwrap.dedent(source))


def good_plugin(site: Path, dist: str = "lmkit-twin", objective: str = "twin",
                entry_point: str = "twin", module: str = "lmkit_iso_twin") -> None:
    install(site, dist, "1.2.3", entry_point, module,
            GOOD.format(cls="Twin", objective=objective, command=f"hello-{entry_point}",
                        dist=dist))


def broken_plugin(site: Path) -> None:
    install(site, "lmkit-broken", "0.3", "broken", "lmkit_iso_broken",
            'raise RuntimeError("boom at import")\n')


def lmkit(site: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    """``python -m lmkit ARGS`` in a fresh process that sees the distributions in ``site``."""
    base = {k: v for k, v in os.environ.items()
            if k not in ("LMKIT_STRICT_PLUGINS", "LMKIT_LOAD_PLUGINS")}
    path = os.pathsep.join([str(site), str(ROOT), base.get("PYTHONPATH", "")])
    full = {**base, "PYTHONPATH": path, "OMP_NUM_THREADS": "1", "COLUMNS": "200", **env}
    return subprocess.run([sys.executable, "-m", "lmkit", *args], capture_output=True,
                          text=True, env=full, timeout=120)


def lines_about(text: str, needle: str) -> list[str]:
    return [line for line in text.splitlines() if needle in line]


@pytest.fixture
def site(tmp_path: Path) -> Path:
    site = tmp_path / "site"
    site.mkdir()
    return site


def test_a_broken_plugin_leaves_train_working_with_a_warning(site, tiny_data, tmp_path):
    broken_plugin(site)
    run = tmp_path / "run"
    out = lmkit(site, "train", "--objective", "ar", "--preset", "tiny", "--steps", "2", "--data",
                str(tiny_data), "--out", str(run), "--quiet", "--device", "cpu", *FAST)
    assert out.returncode == 0, out.stderr
    assert (run / "checkpoint" / "model.safetensors").exists()
    assert "Traceback" not in out.stderr
    (warning,) = lines_about(out.stderr, "boom at import")  # reported exactly once
    for needle in ("'broken'", "lmkit-broken 0.3", "RuntimeError"):
        assert needle in warning


def test_plugins_listing_shows_name_version_hooks_and_skips_the_broken_one(site):
    broken_plugin(site)
    good_plugin(site)
    out = lmkit(site, "plugins", "--json")
    assert out.returncode == 0, out.stderr
    rows = {row["name"]: row for row in json.loads(out.stdout)}
    assert rows["twin"]["distribution"] == "lmkit-twin" and rows["twin"]["version"] == "1.2.3"
    assert rows["twin"]["hooks"] == ["register_commands", "register_objectives"]
    assert "broken" not in rows and not rows["twin"]["builtin"]
    assert len(lines_about(out.stderr, "'broken'")) == 1

    out = lmkit(site, "objectives", "--json")
    twin = next(o for o in json.loads(out.stdout) if o["name"] == "twin")
    assert (twin["plugin"], twin["distribution"], twin["version"]) == ("twin", "lmkit-twin",
                                                                       "1.2.3")


def test_the_warning_is_one_line(site):
    broken_plugin(site)
    out = lmkit(site, "objectives")
    assert out.returncode == 0
    assert len([line for line in out.stderr.splitlines() if line.strip()]) == 1, out.stderr


def test_plugin_commands_join_the_cli(site):
    good_plugin(site)
    out = lmkit(site, "hello-twin")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "hello from lmkit-twin"


@pytest.mark.slow  # fresh processes; the default run keeps the one-warning case
def test_strict_mode_fails_naming_the_plugin(site):
    """Strict mode makes a broken plugin an error for every command that uses the registered
    entries; `lmkit plugins` and `--help` still answer (issue 14, defect 8)."""
    broken_plugin(site)
    for args in (["plugins"], ["--help"]):
        out = lmkit(site, *args, LMKIT_STRICT_PLUGINS="1")
        assert out.returncode == 0, out.stderr
        assert "Traceback" not in out.stderr
    assert "'broken'" in lmkit(site, "plugins", LMKIT_STRICT_PLUGINS="1").stderr
    out = lmkit(site, "objectives", LMKIT_STRICT_PLUGINS="1")
    assert out.returncode == 1
    assert "Traceback" not in out.stderr
    text = " ".join(out.stderr.split())
    assert text.startswith("Error:") and "'broken'" in text and "lmkit-broken 0.3" in text
    assert "boom at import" in text


@pytest.mark.slow  # fresh processes; the default run keeps the one-warning case
def test_two_plugins_with_one_objective_name_is_an_error_naming_both(site):
    good_plugin(site, dist="lmkit-twin-a", entry_point="twin_a", module="lmkit_iso_a")
    good_plugin(site, dist="lmkit-twin-b", entry_point="twin_b", module="lmkit_iso_b")
    # issue 14, defect 8: the second plugin is rejected with one warning naming both; the rest
    # (the first plugin included) keeps working
    out = lmkit(site, "objectives", "--json")
    assert out.returncode == 0 and "Traceback" not in out.stderr
    assert [o["plugin"] for o in json.loads(out.stdout) if o["name"] == "twin"] == ["twin_a"]
    (warning,) = lines_about(out.stderr, "registered twice")
    for needle in ("'twin_a'", "lmkit-twin-a 1.2.3", "'twin_b'", "lmkit-twin-b 1.2.3"):
        assert needle in warning
    assert lmkit(site, "plugins", LMKIT_STRICT_PLUGINS="1").returncode == 0
    out = lmkit(site, "objectives", LMKIT_STRICT_PLUGINS="1")
    assert out.returncode == 1 and "Traceback" not in out.stderr
    text = " ".join(out.stderr.split())
    assert text.startswith("Error: plugin 'twin_b'") and "registered twice" in text
    for needle in ("'twin_a'", "lmkit-twin-a 1.2.3", "'twin_b'", "lmkit-twin-b 1.2.3"):
        assert needle in text


def test_allow_list_loads_only_the_named_plugins(site, monkeypatch):
    """In-process (no warnings filter in the way): the real metadata of distributions on
    sys.path, with LMKIT_LOAD_PLUGINS unset, empty and naming one plugin."""
    broken_plugin(site)
    good_plugin(site)
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.delenv("LMKIT_STRICT_PLUGINS", raising=False)

    def load(allow: str | None) -> tuple[Registry, list[str]]:
        if allow is None:
            monkeypatch.delenv("LMKIT_LOAD_PLUGINS", raising=False)
        else:
            monkeypatch.setenv("LMKIT_LOAD_PLUGINS", allow)
        registry = Registry()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            registry.load()
        return registry, [str(w.message) for w in caught if w.category is PluginWarning]

    try:
        registry, warned = load(None)
        assert "twin" in registry.plugins and len(warned) == 1 and "'broken'" in warned[0]
        registry, warned = load("")
        assert not [p for p in registry.plugins.values() if not p.builtin] and not warned
        assert "ar" in registry.entries["objective"]  # built-ins are never filtered
        registry, warned = load("twin")
        assert [p.name for p in registry.plugins.values() if not p.builtin] == ["twin"]
        assert not warned  # the broken plugin was never imported
    finally:
        registry_mod.reset_registry(None)


# -- issue 14, defect 8: no plugin can take the CLI down ---------------------------------------
COMMANDS_RAISE = """
from lmkit import hookimpl


@hookimpl
def register_commands(cli):
    raise ValueError("commands exploded")
"""

EXITS_AT_IMPORT = "import sys\nsys.exit(3)\n"

TAKES_TRAIN = """
from lmkit import hookimpl


@hookimpl
def register_commands(cli):
    @cli.command("train")
    def train():
        print("hijacked")
"""

UNKNOWN_HOOK = """
from lmkit import hookimpl


@hookimpl
def register_everything(cli):
    pass
"""


@pytest.mark.parametrize("source, needle", [  # 8 fresh processes each: all under -m slow
    pytest.param(COMMANDS_RAISE, "commands exploded", marks=pytest.mark.slow),
    pytest.param(EXITS_AT_IMPORT, "sys.exit(3)", marks=pytest.mark.slow),
    pytest.param(TAKES_TRAIN, "'train' is already taken", marks=pytest.mark.slow),
    pytest.param(UNKNOWN_HOOK, "register_everything", marks=pytest.mark.slow),
])
def test_plugin_isolation_one_broken_plugin_costs_one_warning(site, source, needle):
    install(site, "lmkit-bad", "0.1", "bad", "lmkit_iso_bad", source)
    good_plugin(site)
    for args in (["--help"], ["plugins", "--json"], ["objectives", "--json"], ["hello-twin"]):
        out = lmkit(site, *args)
        assert out.returncode == 0, (args, out.stderr)
        assert "Traceback" not in out.stderr
        (warning,) = lines_about(out.stderr, "'bad'")
        assert needle in warning and "lmkit-bad 0.1" in warning
    assert "hijacked" not in lmkit(site, "train", "--help").stdout
    for args in (["--help"], ["plugins"]):
        out = lmkit(site, *args, LMKIT_STRICT_PLUGINS="1")
        assert out.returncode == 0, (args, out.stderr)
    out = lmkit(site, "objectives", LMKIT_STRICT_PLUGINS="1")
    assert out.returncode == 1 and "Traceback" not in out.stderr and "'bad'" in out.stderr
