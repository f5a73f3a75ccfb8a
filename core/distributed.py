"""Data parallelism on torch.distributed, as launched by torchrun or accelerate.

lowmem writes no launcher and no communication layer: the process group comes from the
launcher's environment (``env://``), gradients are all-reduced by DDP, and this module only
answers the few questions the loop asks (who am I, do all ranks agree, sum this).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

from lowmem.api import ConfigError


@dataclass
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str = ""

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1

    @classmethod
    def from_launcher(cls, environ: dict[str, str], want_cuda: bool) -> DistContext:
        """Join the process group a launcher set up; refuse a launch that silently became one
        process when several were asked for (accelerate's --cpu without MPI does that)."""
        world = int(environ.get("WORLD_SIZE", "1"))
        asked = int(environ.get("LOWMEM_EXPECTED_WORLD_SIZE", environ.get("ACCELERATE_NUM_PROCESSES", "0")) or 0)
        if asked > 1 and world != asked:
            raise ConfigError(
                f"{asked} processes were asked for but this one sees WORLD_SIZE={world}; the launcher started "
                "a single-process job (accelerate launch --cpu needs MPI for several processes: use torchrun)"
            )
        if world <= 1:
            return cls()
        import torch
        import torch.distributed as dist

        backend = "nccl" if want_cuda and torch.cuda.is_available() else "gloo"
        if not dist.is_initialized():
            dist.init_process_group(backend=backend)
        return cls(dist.get_rank(), dist.get_world_size(), int(environ.get("LOCAL_RANK", "0")), backend)

    # -- what the loop asks -----------------------------------------------------------------
    def wrap(self, model):
        if not self.active:
            return model
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [self.local_rank] if self.backend == "nccl" else None
        return DistributedDataParallel(model, device_ids=device_ids)

    def no_sync(self, model, sync: bool):
        """Skip the all-reduce on all but the last micro-batch of an accumulation group."""
        if self.active and not sync:
            return model.no_sync()
        return nullcontext()

    def sum(self, value: float, device) -> float:
        if not self.active:
            return value
        import torch
        import torch.distributed as dist

        tensor = torch.tensor([float(value)], dtype=torch.float64, device=device)
        dist.all_reduce(tensor)
        return float(tensor.item())

    def all_true(self, flag: bool, device) -> bool:
        return self.sum(0.0 if flag else 1.0, device) == 0.0

    def gather(self, obj: Any) -> list[Any]:
        if not self.active:
            return [obj]
        import torch.distributed as dist

        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def broadcast(self, obj: Any) -> Any:
        if not self.active:
            return obj
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.active:
            import torch.distributed as dist

            dist.barrier()

    def close(self) -> None:
        if self.active:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()


def launch_torchrun(nproc: int, argv: list[str]) -> int:
    """``lowmem train --nproc N ...`` re-runs itself under torchrun (the engine's launcher)."""
    args: list[str] = []
    rest = iter(argv[1:])
    for arg in rest:
        if arg == "--nproc":
            next(rest, None)  # drop its value too
        elif not arg.startswith("--nproc="):
            args.append(arg)
    torchrun = shutil.which("torchrun")
    launcher = [torchrun] if torchrun else [sys.executable, "-m", "torch.distributed.run"]
    command = [*launcher, "--standalone", f"--nproc-per-node={nproc}", "-m", "lowmem", *args]
    env = {**os.environ, "LOWMEM_EXPECTED_WORLD_SIZE": str(nproc)}
    return subprocess.call(command, env=env)
