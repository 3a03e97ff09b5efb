"""The plugin host: one pluggy manager, built-ins and third-party plugins loaded the same way.

Every registration goes through one callback that records which plugin (and distribution and
version) registered it, validates it, and rejects duplicate names naming both plugins. A plugin
that fails to import or register is rolled back with one warning; ``LMKIT_STRICT_PLUGINS=1``
re-raises instead, and ``LMKIT_LOAD_PLUGINS=a,b`` restricts third-party plugins to an allow-list.

Loading imports the plugin modules and registers them with pluggy; their registration hooks run
(through pluggy, one plugin at a time, in load order) the first time anything asks for the
registered entries. So a command that needs none (``lmkit --help``, ``--version``) costs only
the plugin modules' own imports.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.metadata as md
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pluggy

from lmkit import __version__, hookspecs
from lmkit.errors import LmkitError

ENTRY_POINT_GROUP = "lmkit"
BUILTIN_PLUGINS = (
    "lmkit.plugins.ar",
    "lmkit.plugins.mdlm",
    "lmkit.plugins.maskrecon",
    "lmkit.plugins.mtp",
    "lmkit.plugins.samplers",
    "lmkit.plugins.corpora",
    "lmkit.plugins.loggers",
)
KINDS = {
    # hook name -> (kind, attributes every registered object must have)
    "register_objectives": ("objective", None),
    "register_samplers": ("sampler", ("name", "description", "sample")),
    "register_corpora": ("corpus", ("name", "description", "documents")),
    "register_loggers": ("logger", ("name", "description", "log", "close")),
}


class PluginWarning(UserWarning):
    """A plugin failed to load and was skipped."""


@dataclass(frozen=True)
class Entry:
    """One registered thing and where it came from."""

    kind: str
    name: str
    obj: Any
    plugin: str
    distribution: str
    version: str
    description: str = ""


@dataclass
class PluginInfo:
    name: str
    distribution: str
    version: str
    builtin: bool
    hooks: list[str] = field(default_factory=list)


class Registry:
    """Loaded plugins and everything they registered."""

    def __init__(self) -> None:
        self.pm = pluggy.PluginManager("lmkit")
        self.pm.add_hookspecs(hookspecs)
        self.plugins: dict[str, PluginInfo] = {}
        self._entries: dict[str, dict[str, Entry]] = {kind: {} for kind, _ in KINDS.values()}
        self._pending: list[tuple[Any, PluginInfo]] = []  # attached, registration hooks not run
        self.failures: list[str] = []
        # strict mode: failures of lazily loaded plugins, raised when an entry is used (so
        # `lmkit --help` and `lmkit plugins` still answer)
        self.deferred: list[LmkitError] = []

    @property
    def entries(self) -> dict[str, dict[str, Entry]]:
        """kind -> name -> Entry, after every loaded plugin's registration hooks have run."""
        while self._pending:
            plugin, info = self._pending.pop(0)
            self._collect(plugin, info, isolate=True)
        return self._entries

    def check_strict(self) -> None:
        """In strict mode, the first plugin failure as the error of whatever uses the entries."""
        self.entries  # noqa: B018
        if self.deferred:
            raise self.deferred[0]

    # -- loading -----------------------------------------------------------------------------
    def load(self, builtins: tuple[str, ...] = BUILTIN_PLUGINS, entry_points: bool = True) -> None:
        for module_name in builtins:
            module = importlib.import_module(module_name)
            self._pending.append((module, self._attach(module, module_name, "lmkit", __version__,
                                                       builtin=True)))
        if entry_points:
            self._load_entry_points()
        self.pm.check_pending()

    def _load_entry_points(self) -> None:
        allow = os.environ.get("LMKIT_LOAD_PLUGINS")
        allowed = None if allow is None else {a.strip() for a in allow.split(",") if a.strip()}
        for ep in sorted(md.entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
            if allowed is not None and ep.name not in allowed:
                continue
            dist = getattr(ep, "dist", None)
            dist_name = dist.metadata["Name"] if dist is not None else "?"
            version = dist.version if dist is not None else "?"
            what = f"entry point {ep.name!r} ({ep.value}) of {dist_name} {version}"
            try:
                plugin = ep.load()
            except KeyboardInterrupt:
                raise
            except BaseException as exc:  # noqa: BLE001 - sys.exit() at import included
                self._fail(what, exc, defer=True)
                continue
            if self.pm.get_plugin(ep.name) is not None or ep.name in self.plugins:
                self._fail(what, LmkitError(f"a plugin named {ep.name!r} is already loaded; "
                                            "uninstall one of them"), defer=True)
                continue
            try:
                info = self._attach(plugin, ep.name, dist_name, version)
                unknown = [c.name for c in self.pm.get_hookcallers(plugin) or []
                           if not c.has_spec()]
                if unknown:
                    raise LmkitError(f"it implements unknown hooks {', '.join(unknown)}")
            except KeyboardInterrupt:
                raise
            except BaseException as exc:  # noqa: BLE001 - pluggy validation of a bad plugin
                if self.pm.get_plugin(ep.name) is plugin:
                    self._rollback(ep.name)
                self._fail(what, exc, defer=True)
                continue
            self._pending.append((plugin, info))

    def add_plugin(
        self, plugin: Any, name: str, distribution: str, version: str, builtin: bool = False
    ) -> None:
        """Register ``plugin`` now and collect its registrations; roll it back if a hook raises."""
        self.entries  # noqa: B018 - plugins loaded earlier register first, in load order
        self._collect(plugin, self._attach(plugin, name, distribution, version, builtin),
                      isolate=False)

    def _attach(self, plugin: Any, name: str, distribution: str, version: str,
                builtin: bool = False) -> PluginInfo:
        """Register ``plugin`` with pluggy and record where it came from (no hook runs yet)."""
        if self.pm.get_plugin(name) is not None:
            raise LmkitError(f"two plugins are both named {name!r}; uninstall one of them")
        self.pm.register(plugin, name=name)
        info = PluginInfo(name, distribution, version, builtin)
        info.hooks = sorted(
            impl.function.__name__
            for caller in self.pm.get_hookcallers(plugin) or []
            for impl in caller.get_hookimpls()
            if impl.plugin is plugin
        )
        self.plugins[name] = info
        return info

    def _collect(self, plugin: Any, info: PluginInfo, isolate: bool) -> None:
        """Run ``plugin``'s registration hooks (through pluggy, that plugin only).

        ``isolate``: a plugin found through its entry point costs one warning (strict mode: an
        error when entries are used) whatever it does, a duplicate name included; a plugin
        added explicitly (:meth:`add_plugin`) raises its LmkitError to the caller.
        """
        others = [p for p in self.pm.get_plugins() if p is not plugin]
        try:
            for hook_name, (kind, _) in KINDS.items():
                caller = self.pm.subset_hook_caller(hook_name, remove_plugins=others)
                caller(register=self._register_callback(kind, info))
        except KeyboardInterrupt:
            self._rollback(info.name)
            raise
        except LmkitError as exc:
            self._rollback(info.name)
            if not isolate:
                raise
            self._fail(f"plugin {info.name!r} of {info.distribution} {info.version}", exc,
                       defer=True)
        except BaseException as exc:  # noqa: BLE001 - isolate any failure of third-party code
            self._rollback(info.name)
            self._fail(f"plugin {info.name!r} of {info.distribution} {info.version}", exc,
                       defer=isolate)

    def add_commands(self, cli: Any) -> None:
        """Run each plugin's ``register_commands`` on its own: one that raises (or exits), or
        that takes a command name already in use, is rolled back with one warning."""
        for name, info in list(self.plugins.items()):
            plugin = self.pm.get_plugin(name)
            caller_impls = [impl for c in self.pm.get_hookcallers(plugin) or []
                            if c.name == "register_commands" for impl in c.get_hookimpls()
                            if impl.plugin is plugin]
            if not caller_impls:
                continue
            others = [p for p in self.pm.get_plugins() if p is not plugin]
            before = dict(cli.commands)
            try:
                self.pm.subset_hook_caller("register_commands", remove_plugins=others)(cli=cli)
                taken = [n for n, cmd in before.items() if cli.commands.get(n) is not cmd]
                if taken:
                    raise LmkitError(f"command {taken[0]!r} is already taken; rename the "
                                     "plugin's command")
            except KeyboardInterrupt:
                raise
            except BaseException as exc:  # noqa: BLE001 - sys.exit() in a hook included
                cli.commands.clear()
                cli.commands.update(before)
                self._rollback(name)
                self._fail(f"plugin {name!r} of {info.distribution} {info.version}", exc,
                           defer=not info.builtin)

    def _register_callback(self, kind: str, info: PluginInfo) -> Callable[[Any], None]:
        def register(obj: Any) -> None:
            self._validate(kind, obj, info)
            name = obj.name
            existing = self._entries[kind].get(name)
            if existing is not None:
                raise LmkitError(
                    f"{kind} {name!r} is registered twice: by plugin {existing.plugin!r} "
                    f"({existing.distribution} {existing.version}) and by plugin {info.name!r} "
                    f"({info.distribution} {info.version}); uninstall or rename one of them"
                )
            self._entries[kind][name] = Entry(
                kind, name, obj, info.name, info.distribution, info.version,
                str(getattr(obj, "description", "")),
            )

        return register

    @staticmethod
    def _validate(kind: str, obj: Any, info: PluginInfo) -> None:
        if kind == "objective":
            from lmkit.protocols import REQUIRED_OBJECTIVE_ATTRS

            required: tuple[str, ...] = REQUIRED_OBJECTIVE_ATTRS
        else:
            required = next(attrs for k, attrs in KINDS.values() if k == kind)
        missing = [a for a in required if not hasattr(obj, a)]
        if kind == "sampler" and not (hasattr(obj, "requires") or hasattr(obj, "objectives")):
            missing.append("objectives (names it serves) or requires (capabilities)")
        name = getattr(obj, "name", None)
        if missing or not isinstance(name, str) or not name:
            raise TypeError(
                f"{kind} {obj!r} from plugin {info.name!r} lacks {', '.join(missing) or 'a name'}"
            )

    def _rollback(self, name: str) -> None:
        self._pending = [(p, i) for p, i in self._pending if i.name != name]
        for by_name in self._entries.values():
            for entry_name in [n for n, e in by_name.items() if e.plugin == name]:
                del by_name[entry_name]
        self.plugins.pop(name, None)
        if self.pm.get_plugin(name) is not None:
            self.pm.unregister(name=name)

    def _fail(self, what: str, exc: BaseException, defer: bool = False) -> None:
        """One warning for a plugin that failed; strict mode makes it an error: at once, or
        (``defer``) when something uses the registered entries."""
        detail = " ".join(str(exc).split())[:300]
        if isinstance(exc, SystemExit):
            detail = f"the plugin called sys.exit({exc.code!r})"
        if os.environ.get("LMKIT_STRICT_PLUGINS", "") not in ("", "0"):
            error = LmkitError(f"{what} failed to load: {type(exc).__name__}: {detail}")
            error.__cause__ = exc if isinstance(exc, Exception) else None
            if not defer:
                raise error
            self.failures.append(f"lmkit: {error} (LMKIT_STRICT_PLUGINS)")
            self.deferred.append(error)
            return
        message = f"lmkit: skipped {what}: {type(exc).__name__}: {detail}"
        self.failures.append(message)
        warnings.warn(message, PluginWarning, stacklevel=2)

    # -- lookup ------------------------------------------------------------------------------
    def get(self, kind: str, name: str) -> Entry:
        self.check_strict()
        try:
            return self.entries[kind][name]
        except KeyError:
            known = ", ".join(sorted(self.entries[kind])) or "none"
            raise LmkitError(
                f"unknown {kind} {name!r}; available: {known} (see `lmkit plugins`)"
            ) from None


_REGISTRY: Registry | None = None


def get_registry() -> Registry:
    """The process-wide registry, loaded on first use."""
    global _REGISTRY
    if _REGISTRY is None:
        registry = Registry()
        registry.load()
        _REGISTRY = registry
    return _REGISTRY


def reset_registry(registry: Registry | None = None) -> None:
    """Replace (or drop, to reload lazily) the process-wide registry; used by tests."""
    global _REGISTRY
    _REGISTRY = registry


def get_objective(name: str) -> Entry:
    return get_registry().get("objective", name)


def get_corpus(name: str) -> Entry:
    return get_registry().get("corpus", name)


def get_logger(name: str) -> Entry:
    return get_registry().get("logger", name)


# -- listings (`lmkit plugins`, `lmkit objectives`, `lmkit samplers`, `lmkit loggers`) -------
def plugin_listing(include_builtins: bool = False) -> list[dict[str, Any]]:
    """Installed plugins; their registration hooks run first, so a broken one is not listed."""
    registry = get_registry()
    registry.entries  # noqa: B018
    return [dataclasses.asdict(p) for p in registry.plugins.values()
            if include_builtins or not p.builtin]


def entry_listing(kind: str) -> list[dict[str, Any]]:
    """Registered objectives / samplers / corpora / loggers; a sampler also lists the objectives it
    serves now (and the capabilities it requires)."""
    from lmkit.core.generate import served_by

    registry = get_registry()
    registry.check_strict()
    rows = []
    for e in sorted(registry.entries[kind].values(), key=lambda e: e.name):
        row = {"name": e.name, "description": e.description, "plugin": e.plugin,
               "distribution": e.distribution, "version": e.version}
        if kind == "sampler":
            row["objectives"] = served_by(e)
            row["requires"] = list(getattr(e.obj, "requires", ()))
        rows.append(row)
    return rows
