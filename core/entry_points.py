"""Finding the installed distributions that declare ``lowmem`` entry points, cheaply.

``importlib.metadata`` costs ~25 ms to import and scans every installed distribution; most
environments have no lowmem plugin at all. A look at the ``entry_points.txt`` files on
``sys.path`` says whether any distribution could declare the group; only then is
``importlib.metadata`` asked, and it stays the authority on what is found.
"""

from __future__ import annotations

import os
import sys
from typing import Any

GROUP = "lowmem"
_STANDARD_FINDERS = {"PathFinder", "BuiltinImporter", "FrozenImporter"}


def group_declared(group: str = GROUP) -> bool:
    """Whether some distribution on sys.path may declare entry points in ``group``. True when
    unsure (a zip archive on sys.path, an import hook that finds distributions of its own)."""
    for finder in sys.meta_path:
        name = getattr(finder, "__name__", type(finder).__name__)
        if hasattr(finder, "find_distributions") and name not in _STANDARD_FINDERS:
            return True
    header = f"[{group}]"
    for entry in sys.path:
        root = entry or "."
        try:
            with os.scandir(root) as children:
                infos = [c.name for c in children if c.name.lower().endswith((".dist-info", ".egg-info"))]
        except NotADirectoryError:
            return True  # a zip archive on sys.path
        except OSError:
            continue
        for name in infos:
            try:
                with open(os.path.join(root, name, "entry_points.txt"), encoding="utf-8") as file:
                    if any(line.strip() == header for line in file):
                        return True
            except OSError:
                continue
    return False


def entry_points(group: str = GROUP) -> list[Any]:
    """The entry points of ``group`` (``importlib.metadata``'s), or none without a declaration."""
    if "importlib.metadata" not in sys.modules and not group_declared(group):
        return []
    import importlib.metadata

    return list(importlib.metadata.entry_points(group=group))
