"""Faults injected into a real lowmem process, from outside the real code path: the save's
stages (``lowmem.checkpoint_files``: checksum_files -> write_manifest -> publish) are wrapped
here so that a test can kill the process, or fail the write as a full disk would, just before
one of them. ``main`` runs the CLI with the tiny test models registered."""

from __future__ import annotations

import errno
import os
import signal
from collections.abc import Callable
from typing import Any

STAGES = {"files": "checksum_files", "manifest": "write_manifest", "rename": "publish"}


def inject(fault: str, set_attribute: Callable[[Any, str, Any], None] = setattr) -> None:
    """``kill:<stage>@<step>`` sends SIGKILL, ``disk-full:<stage>@<step>`` raises ENOSPC, right
    before that stage of the save of that step."""
    from lowmem import checkpoint_files

    action, _, where = fault.partition(":")
    stage, _, step = where.partition("@")
    name = STAGES[stage]
    real: Callable[..., Any] = getattr(checkpoint_files, name)

    def faulty(tmp, *args: Any) -> Any:
        saving = args[-1] if name != "write_manifest" else args[0]
        if not step or int(step) == saving:
            if action == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(tmp, *args)

    set_attribute(checkpoint_files, name, faulty)


def main(fault: str, argv: list[str]) -> None:
    import sys

    import tiny_plugin
    import torch

    from lowmem import cli, registry

    registry.EXTRA_PLUGINS.append(tiny_plugin)
    torch.set_num_threads(1)
    if fault:
        inject(fault)
    sys.argv = ["lowmem", *argv]
    cli.main()
