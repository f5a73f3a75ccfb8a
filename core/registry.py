"""Plugin loading and lookup: built-in plugins first, then entry points, each isolated.

Every registration goes through pluggy's own hook calls, so ``tryfirst``/``trylast`` and
wrappers behave as pluggy documents; a plugin whose hook raises (or registers something that
is not a lowmem object) is left out with a one-line warning and the call is made again
without it. ``get_registry()`` is the process's registry, loaded once.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable, Iterable
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from types import ModuleType
from typing import Any

import pluggy

from lowmem import hookspecs
from lowmem.api import Dataset, Model, Optimizer
from lowmem.errors import ConfigError, PluginFault
from lowmem.hook_calls import call_hook

ENTRY_POINT_GROUP = "lowmem"
BUILT_IN = "built-in"

# hook name -> (registry attribute, base class the registered objects must subclass)
HOOKS: dict[str, tuple[str, type]] = {
    "register_optimizers": ("optimizers", Optimizer),
    "register_models": ("models", Model),
    "register_datasets": ("datasets", Dataset),
}
KIND_OF = {"optimizers": "optimizer", "models": "model", "datasets": "dataset"}


@dataclass
class PluginInfo:
    """One loaded plugin, for ``lowmem plugins``."""
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
        self._info_of: dict[int, PluginInfo] = {}

    # -- loading ---------------------------------------------------------------------------
    def add(self, plugin: object, name: str, origin: str, collect: bool = True) -> PluginInfo:
        """Register one plugin object (a module or a class instance); with ``collect``, call the
        hooks again so its registrations show at once. Misspelt hooks fail the plugin."""
        info = PluginInfo(name=name, origin=origin)
        self.plugins.append(info)
        try:
            self.pm.register(plugin, name=f"{name}#{len(self.plugins)}")
            self.pm.check_pending()
        except Exception as exc:  # noqa: BLE001 - any plugin fault is isolated
            if self.pm.is_registered(plugin):
                self.pm.unregister(plugin)
            self._fail(info, f"{type(exc).__name__}: {exc}")
            return info
        self._info_of[id(plugin)] = info
        info.hooks = [hook for hook in HOOKS
                      if any(i.plugin is plugin for i in getattr(self.pm.hook, hook).get_hookimpls())]
        if collect:
            self.collect()
        return info

    def collect(self) -> None:
        """Fill the name tables by calling each hook once over every registered plugin. A plugin
        whose hook fails is unregistered with its reason, and the tables are filled again."""
        while True:
            for attr in KIND_OF:
                getattr(self, attr).clear()
            failed = None
            for hook_name, (attr, base) in HOOKS.items():
                collected, failed = call_hook(self.pm, hook_name, partial(_check_registered, base=base,
                                                                          hook_name=hook_name))
                if failed is not None:
                    break
                for plugin, obj in collected:
                    self._store(attr, obj, self._info_of[id(plugin)].origin)
            if failed is None:
                return
            plugin, reason = failed
            self.pm.unregister(plugin)
            self._fail(self._info_of.pop(id(plugin)), reason)

    def _fail(self, info: PluginInfo, reason: str) -> None:
        info.status = f"failed: {reason}"
        self.warnings.append(f"lowmem: plugin {info.name} ({info.origin}) skipped: {reason}")

    def _store(self, attr: str, obj: Any, origin: str) -> None:
        table: dict[str, Entry] = getattr(self, attr)
        existing = table.get(obj.name)
        if existing is None:
            table[obj.name] = Entry(obj, origin)
            return
        # Two plugins claiming one name is an error for that name: never silently first-wins.
        existing.conflicts.append(origin)
        message = f"lowmem: {KIND_OF[attr]} {obj.name!r} is registered by both {existing.origin} and {origin}"
        if message not in self.warnings:
            self.warnings.append(message)

    def load_entry_points(self, only: Iterable[str] | None = None) -> None:
        """Load each entry point of the ``lowmem`` group on its own (pluggy's loader stops at the
        first broken one). ``only`` limits loading to those entry-point names."""
        wanted = None if only is None else set(only)
        if wanted == set():
            return
        from lowmem.entry_points import entry_points

        for ep in entry_points(ENTRY_POINT_GROUP):
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
            self.add(plugin, ep.name, origin, collect=False)

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

    def optimizer(self, name: str) -> Optimizer:
        return self.get("optimizers", name)

    def model(self, name: str) -> Model:
        return self.get("models", name)

    def dataset(self, name: str) -> Dataset:
        return self.get("datasets", name)

    def model_for(self, name: str) -> Model:
        """The model registered as ``name``, else one a model plugin loads from ``name`` as a source
        (``Model.from_source``: a Hugging Face folder or hub id)."""
        if name in self.models:
            return self.model(name)
        for _, entry in sorted(self.models.items()):
            found = entry.obj.from_source(name)
            if found is not None:
                return found
        choices = ", ".join(sorted(self.models)) or "none registered"
        raise ConfigError(f"unknown model {name!r}: not registered ({choices}), not a Hugging Face model "
                          "folder, not a hub id")

    def default_dataset(self, mode: str) -> str:
        """The dataset a plugin marks as the default for ``mode`` (``Dataset.default_for``)."""
        for name, entry in sorted(self.datasets.items()):
            if mode in entry.obj.default_for:
                return name
        raise ConfigError(f"no dataset is registered as the default for {mode}; pass --dataset")

    def tokenizer_corpus(self) -> Dataset:
        """The dataset the offline fallback tokenizer is trained on (``Dataset.tokenizer_corpus``)."""
        for _, entry in sorted(self.datasets.items()):
            if entry.obj.tokenizer_corpus:
                return entry.obj
        raise ConfigError("no dataset offers a corpus for the fallback tokenizer; pass --tokenizer")

    def reference_optimizer(self) -> str | None:
        """The full-rank reference optimizer (``Optimizer.reference``), if one is registered."""
        return next((name for name, e in sorted(self.optimizers.items()) if e.obj.reference), None)

    def describe(self, obj: Any) -> str:
        """'name' (origin) of a registered object, for messages."""
        for attr in KIND_OF:
            for name, entry in getattr(self, attr).items():
                if entry.obj is obj:
                    return f"{KIND_OF[attr]} {name!r} ({entry.origin})"
        name = getattr(obj, "name", "")  # one a plugin made for a source (a model folder)
        return f"{type(obj).__name__} {name!r}" if name else repr(obj)

    @contextmanager
    def guard(self, obj: Any, method: str):
        """Turn an unexpected exception from plugin code into a PluginFault naming the plugin
        and the method, so a run stops with one clear line instead of a traceback."""
        try:
            yield
        except ConfigError:
            raise
        except Exception as exc:  # noqa: BLE001 - any plugin failure
            from lowmem.text import first_line

            reason = f"{type(exc).__name__}: {first_line(exc)}"
            raise PluginFault(f"{self.describe(obj)} failed in {method}(): {reason}") from exc


def _check_registered(obj: Any, *, base: type, hook_name: str) -> None:
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
    say: Callable[[str], None] | None = None,
) -> Registry:
    """Built-in plugins, then ``extra`` objects (tests), then entry points.

    ``load_plugins`` is the LOWMEM_LOAD_PLUGINS value: None loads every entry point, a
    comma-separated list only those, an empty string none.
    """
    registry = Registry()
    for module in built_in_plugins():
        registry.add(module, module.__name__.rsplit(".", 1)[-1], BUILT_IN, collect=False)
    for i, plugin in enumerate(extra):
        registry.add(plugin, getattr(plugin, "__name__", f"extra-{i}"), "test", collect=False)
    only = None if load_plugins is None else [n.strip() for n in load_plugins.split(",") if n.strip()]
    registry.load_entry_points(only)
    registry.collect()
    for message in registry.warnings:
        if say is not None:
            say(message)
        else:
            print(message, file=sys.stderr)
    return registry


# -- the process's registry ------------------------------------------------------------------
# Tests inject inline plugins here instead of installing distributions.
EXTRA_PLUGINS: list[object] = []
_registry: Registry | None = None


def get_registry() -> Registry:
    """The plugin registry, loaded once per process (LOWMEM_LOAD_PLUGINS chooses entry points)."""
    global _registry
    if _registry is None:
        _registry = load_registry(os.environ.get("LOWMEM_LOAD_PLUGINS"), extra=EXTRA_PLUGINS)
    return _registry


def reset_registry() -> None:
    global _registry
    _registry = None
