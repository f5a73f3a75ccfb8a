"""Calling a lowmem hook through pluggy with every plugin's registrations attributed to it and
its failures isolated: pluggy's own call order (``tryfirst``/``trylast``) and wrappers apply,
and a plugin that raises does not stop the plugins after it."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pluggy


def call_hook(pm: pluggy.PluginManager, hook_name: str, check: Callable[[Any], None]
              ) -> tuple[list[tuple[object, Any]], tuple[object, str] | None]:
    """One pluggy call of ``hook_name`` with a ``register`` callback. Returns the (plugin, object)
    pairs registered, each checked with ``check``, and the first (plugin, reason) failure. Each
    hook function runs inside a wrapper that notes whose registrations follow and catches its
    failure, so the other plugins still run."""
    collected: list[tuple[object, Any]] = []
    failures: list[tuple[object, str]] = []
    calling: list[object] = []

    def attributed(function: Callable[..., Any], plugin: object) -> Callable[..., Any]:
        def run(*args: Any, **kwargs: Any) -> Any:
            calling.append(plugin)
            try:
                return function(*args, **kwargs)
            except Exception as exc:  # noqa: BLE001 - a plugin fault is isolated
                failures.append((plugin, f"{hook_name} raised {type(exc).__name__}: {exc}"))
                return None
            finally:
                calling.pop()

        return run

    def register(obj: Any) -> None:
        check(obj)  # raises inside the plugin's hook: counted as its failure
        collected.append((calling[-1], obj))

    caller = getattr(pm.hook, hook_name)
    impls = [i for i in caller.get_hookimpls() if not (i.hookwrapper or i.wrapper)]
    originals = [impl.function for impl in impls]
    for impl in impls:
        impl.function = attributed(impl.function, impl.plugin)
    try:
        caller(register=register)
    finally:
        for impl, function in zip(impls, originals, strict=True):
            impl.function = function
    return collected, (failures[0] if failures else None)
