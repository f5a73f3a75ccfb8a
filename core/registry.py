"""Plugin loading: built-in plugins first, then entry points, each isolated from the others."""

from __future__ import annotations

import importlib
import importlib.metadata
import sys
from collections.abc import Callable, Iterable
from contextlib import contextmanager
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import pluggy

from lowmem import hookspecs
from lowmem.api import ConfigError, Dataset, Model, Optimizer

ENTRY_POINT_GROUP = "lowmem"
BUILT_IN = "built-in"

# hook name -> (registry attribute, base class the registered objects must subclass)
HOOKS: dict[str, tuple[str, type]] = {
    "register_optimizers": ("optimizers", Optimizer),
    "register_models": ("models", Model),
    "register_datasets": ("datasets", Dataset),
}
KIND_OF = {"optimizers": "optimizer", "models": "model", "datasets": "dataset"}


class PluginFault(RuntimeError):
    """A plugin raised while lowmem was using it."""


@dataclass
class PluginInfo:
    name: str
    origin: str  # "built-in" or "<distribution> <version>"
    hooks: list[str] = field(default_factory=list)
    status: str = "ok"


@dataclass
class Entry:
    """One registered optimizer, model or dataset and the plugin that registered it."""

    obj: Any
    origin: str
    conflicts: list[str] = field(default_factory=list)


class Registry:
    """Everything the loaded plugins registered, by name."""

    def __init__(self) -> None:
        self.pm = pluggy.PluginManager("lowmem")
        self.pm.add_hookspecs(hookspecs)
        self.plugins: list[PluginInfo] = []
        self.optimizers: dict[str, Entry] = {}
        self.models: dict[str, Entry] = {}
        self.datasets: dict[str, Entry] = {}
        self.warnings: list[str] = []

    # -- loading ---------------------------------------------------------------------------
    def add(self, plugin: object, name: str, origin: str) -> PluginInfo:
        """Register one plugin object (a module or a class instance) and collect what it registers.

        A plugin with misspelt hooks, or whose hook raises, is left out with a warning; the
        plugins registered before and after it are unaffected.
        """
        info = PluginInfo(name=name, origin=origin)
        self.plugins.append(info)
        try:
            self.pm.register(plugin, name=name)
            self.pm.check_pending()
        except Exception as exc:  # noqa: BLE001 - any plugin fault is isolated
            if self.pm.is_registered(plugin):
                self.pm.unregister(plugin)
            return self._fail(info, f"{type(exc).__name__}: {exc}")
        for hook_name, (attr, base) in HOOKS.items():
            impls = [i for i in getattr(self.pm.hook, hook_name).get_hookimpls() if i.plugin is plugin]
            for impl in impls:
                info.hooks.append(hook_name)
                collected: list[Any] = []
                try:
                    impl.function(register=collected.append)
                    for obj in collected:
                        _check_registered(obj, base, hook_name)
                except Exception as exc:  # noqa: BLE001
                    return self._fail(info, f"{hook_name} raised {type(exc).__name__}: {exc}")
                for obj in collected:
                    self._store(attr, obj, origin)
        return info

    def _fail(self, info: PluginInfo, reason: str) -> PluginInfo:
        info.status = f"failed: {reason}"
        self.warnings.append(f"lowmem: plugin {info.name} ({info.origin}) skipped: {reason}")
        return info

    def _store(self, attr: str, obj: Any, origin: str) -> None:
        table: dict[str, Entry] = getattr(self, attr)
        existing = table.get(obj.name)
        if existing is None:
            table[obj.name] = Entry(obj, origin)
            return
        # Two plugins claiming one name is an error for that name: never silently first-wins.
        existing.conflicts.append(origin)
        self.warnings.append(
            f"lowmem: {KIND_OF[attr]} {obj.name!r} is registered by both {existing.origin} and {origin}"
        )

    def load_entry_points(self, only: Iterable[str] | None = None) -> None:
        """Load each entry point of the ``lowmem`` group on its own (pluggy's loader stops at the
        first broken one). ``only`` limits loading to those entry-point names."""
        wanted = None if only is None else set(only)
        for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
            if wanted is not None and ep.name not in wanted:
                continue
            dist = getattr(ep, "dist", None)
            origin = f"{dist.name} {dist.version}" if dist is not None else ep.value
            if any(p.name == ep.name and p.origin == origin for p in self.plugins):
                continue  # the same distribution seen twice on sys.path
            try:
                plugin = ep.load()
            except Exception as exc:  # noqa: BLE001
                info = PluginInfo(name=ep.name, origin=origin)
                self.plugins.append(info)
                self._fail(info, f"import failed: {type(exc).__name__}: {exc}")
                continue
            self.add(plugin, ep.name, origin)

    # -- lookup ----------------------------------------------------------------------------
    def get(self, attr: str, name: str) -> Any:
        """The registered object, or a ConfigError listing the valid names."""
        table: dict[str, Entry] = getattr(self, attr)
        entry = table.get(name)
        kind = KIND_OF[attr]
        if entry is None:
            choices = ", ".join(sorted(table)) or "none registered"
            raise ConfigError(f"unknown {kind} {name!r}; choose one of: {choices}")
        if entry.conflicts:
            others = " and ".join([entry.origin, *entry.conflicts])
            raise ConfigError(
                f"{kind} {name!r} is registered by both {others}; uninstall one, "
                "or choose plugins with LOWMEM_LOAD_PLUGINS"
            )
        return entry.obj

    def describe(self, obj: Any) -> str:
        """'name' (origin) of a registered object, for messages."""
        for attr in KIND_OF:
            for name, entry in getattr(self, attr).items():
                if entry.obj is obj:
                    return f"{KIND_OF[attr]} {name!r} ({entry.origin})"
        return repr(obj)

    @contextmanager
    def guard(self, obj: Any, method: str):
        """Turn an unexpected exception from plugin code into a PluginFault naming the plugin
        and the method, so a run stops with one clear line instead of a traceback."""
        try:
            yield
        except ConfigError:
            raise
        except Exception as exc:  # noqa: BLE001 - any plugin failure
            raise PluginFault(f"{self.describe(obj)} failed in {method}(): {type(exc).__name__}: {exc}") from exc

    def optimizer(self, name: str) -> Optimizer:
        return self.get("optimizers", name)

    def model(self, name: str) -> Model:
        return self.get("models", name)

    def dataset(self, name: str) -> Dataset:
        return self.get("datasets", name)


def _check_registered(obj: Any, base: type, hook_name: str) -> None:
    if not isinstance(obj, base):
        raise TypeError(f"{hook_name} registered {obj!r}, which is not a lowmem.{base.__name__}")
    if not getattr(obj, "name", ""):
        raise TypeError(f"{hook_name} registered a {type(obj).__name__} without a name")


def built_in_plugins() -> list[ModuleType]:
    from lowmem.plugins import BUILT_IN_MODULES

    return [importlib.import_module(name) for name in BUILT_IN_MODULES]


def load_registry(
    load_plugins: str | None = None,
    extra: Iterable[object] = (),
    warn: Callable[[str], None] | None = None,
) -> Registry:
    """Built-in plugins, then ``extra`` objects (tests), then entry points.

    ``load_plugins`` is the LOWMEM_LOAD_PLUGINS value: None loads every entry point, a
    comma-separated list only those, an empty string none.
    """
    registry = Registry()
    for module in built_in_plugins():
        registry.add(module, module.__name__.rsplit(".", 1)[-1], BUILT_IN)
    for i, plugin in enumerate(extra):
        registry.add(plugin, getattr(plugin, "__name__", f"extra-{i}"), "test")
    only = None if load_plugins is None else [n.strip() for n in load_plugins.split(",") if n.strip()]
    registry.load_entry_points(only)
    for message in registry.warnings:
        (warn or _stderr)(message)
    return registry


def _stderr(message: str) -> None:
    print(message, file=sys.stderr)
