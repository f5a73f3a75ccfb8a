"""Data parallelism on torch.distributed, as launched by torchrun or accelerate.

lowmem writes no launcher and no communication layer: the process group comes from the
launcher's environment (``env://``), gradients are all-reduced by DDP, and this module only
answers the few questions the loop asks (who am I, do all ranks agree, sum this).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lowmem.errors import ConfigError, ReplicaMismatch

# Set by mpirun (Open MPI, MPICH/Intel MPI, MVAPICH) in each process it starts.
MPI_WORLD_SIZE = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "MV2_COMM_WORLD_SIZE")
# What ``accelerate launch --use_fsdp`` etc. export for the Accelerator to read.
SHARDING_ENGINES = {"FSDP": "ACCELERATE_USE_FSDP", "DeepSpeed": "ACCELERATE_USE_DEEPSPEED",
                    "Megatron-LM": "ACCELERATE_USE_MEGATRON_LM"}


@dataclass
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str = ""
    owns_group: bool = False  # a one-process group made for FSDP (``ensure_group``)
    # The launcher's group was already joined by the caller (``lowmem compare`` holds one for all
    # its runs): leaving it is the caller's job. Joining anew after leaving would meet the first
    # group's keys in the launcher's store, and gloo can then hang.
    borrowed: bool = False

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
        expected = int(environ.get("LOWMEM_EXPECTED_WORLD_SIZE", "0") or 0)
        asked = expected or accelerate_single_process_ask(environ)
        if asked > 1 and world != asked:
            machines = 1 if expected else accelerate_setting(environ, "num_machines") or 1
            use = (f"`lowmem train --nproc {asked}`, `torchrun --nproc-per-node {asked} -m lowmem train` or "
                   f"`accelerate launch --multi_gpu --num_processes {asked} -m lowmem train` (gloo on CPU)")
            if machines > 1:
                use = (f"on each of the {machines} machines `torchrun --nnodes {machines} "
                       f"--nproc-per-node {max(1, asked // machines)} ... -m lowmem train`, or "
                       "`accelerate launch --multi_gpu` with the same machine settings")
            raise ConfigError(
                f"{asked} processes were asked for but this one sees "
                f"WORLD_SIZE={environ.get('WORLD_SIZE', 'unset')}: the launcher started single-process "
                f"jobs (accelerate launch --cpu runs several only through MPI); use {use}"
            )
        engines = [name for name, var in SHARDING_ENGINES.items() if environ.get(var, "").lower() == "true"]
        if engines:
            # lowmem builds its own loop and never reads accelerate's settings (sharding
            # strategy, offload, wrap policy): honouring some of them silently would be worse.
            hint = ("lowmem shards with FSDP2 itself: launch without --use_fsdp and pass --parallel fsdp"
                    if engines[0] == "FSDP" else "launch without it (--parallel fsdp shards with FSDP2)")
            raise ConfigError(f"accelerate was asked for {engines[0]}, whose settings lowmem does not read; "
                              f"{hint}")
        mpi_world = max((int(environ.get(k, "1") or 1) for k in MPI_WORLD_SIZE), default=1)
        if world <= 1 and mpi_world > 1:
            # N independent jobs would each write the same run folder.
            raise ConfigError(
                f"started by MPI as one of {mpi_world} processes, but lowmem joins its process group "
                "through torchrun's environment (WORLD_SIZE, RANK, MASTER_ADDR); launch with torchrun"
            )
        if world <= 1:
            return cls()
        import torch
        import torch.distributed as dist

        backend = "nccl" if want_cuda and torch.cuda.is_available() else "gloo"
        borrowed = dist.is_initialized()
        if borrowed:
            backend = dist.get_backend()
        else:
            dist.init_process_group(backend=backend)
        from lowmem.launch import stop_without_launcher

        stop_without_launcher(environ)
        return cls(dist.get_rank(), dist.get_world_size(), int(environ.get("LOCAL_RANK", "0")), backend,
                   borrowed=borrowed)

    # -- what the loop asks -----------------------------------------------------------------
    def wrap(self, model):
        if not self.active:
            return model
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [self.local_rank] if self.backend == "nccl" else None
        # The gradients are views of DDP's communication buckets, not a second copy of them:
        # without this every process holds all gradients twice.
        return DistributedDataParallel(model, device_ids=device_ids, gradient_as_bucket_view=True)

    def no_sync(self, model, sync: bool):
        """Skip DDP's all-reduce on all but the last micro-batch of an accumulation group. A
        sharded model (FSDP) reduce-scatters every micro-batch instead: it keeps only its shard
        of the gradients, never the whole."""
        if self.active and not sync and hasattr(model, "no_sync"):
            return model.no_sync()
        return nullcontext()

    def sum_(self, tensor):
        """Sum ``tensor`` over all ranks, in place, without a host read: the loop packs every
        per-step figure into one tensor so each step costs one collective."""
        if self.active:
            import torch.distributed as dist

            dist.all_reduce(tensor)
        return tensor

    def all_true(self, flag, device) -> bool:
        """Whether ``flag`` (a bool or a 0-dim bool tensor) holds on every rank; a host read."""
        if not self.active:
            return bool(flag)
        import torch

        tensor = torch.as_tensor(flag, device=device).logical_not().to(torch.float64).reshape(1)
        return float(self.sum_(tensor).item()) == 0.0

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

    def check_replicas(self, model) -> None:
        """Fail unless every rank holds bit-identical parameters. DDP keeps replicas equal only
        while each rank applies the same update to the same all-reduced gradient; an optimizer
        that keeps rank-local state or steps before the reduction makes them drift silently,
        and rank 0 alone would then save one of several different models."""
        self.compare_across_ranks(list(model.named_parameters()), "parameters differ between ranks after "
                                  "training", "the optimizer did not apply the same update on every process")

    def compare_across_ranks(self, named: list[tuple[str, Any]], what: str, why: str = "") -> None:
        """Raise ``ReplicaMismatch`` (``what (names): why``) unless every rank holds bit-identical
        tensors; ``named`` lists the same names in the same order on every rank."""
        if not self.active:
            return
        import torch
        import torch.distributed as dist

        as_int = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
        names, sums = [], []
        for name, tensor in named:
            # Sum of the raw bit patterns: a changed element changes it (barring collisions).
            flat = tensor.detach().contiguous().view(-1)
            sums.append(flat.view(as_int[flat.element_size()]).sum(dtype=torch.int64).cpu())
            names.append(name)
        # Every rank takes part even with nothing to compare: the counts must agree first.
        counts = self.gather(len(sums))
        if len(set(counts)) > 1:
            raise ReplicaMismatch(f"{what}: the ranks hold {counts} such tensors")
        if not sums:
            return
        mine = torch.stack(sums).to(self._device())
        every = [torch.empty_like(mine) for _ in range(self.world_size)]
        dist.all_gather(every, mine)
        stacked = torch.stack(every)
        differ = [names[i] for i in (stacked != stacked[0]).any(0).nonzero().view(-1).tolist()]
        if differ:
            shown = ", ".join(differ[:3]) + (f" and {len(differ) - 3} more" if len(differ) > 3 else "")
            raise ReplicaMismatch(f"{what} ({shown})" + (f": {why}" if why else ""))

    def _device(self) -> Any:
        import torch

        return torch.device("cuda", self.local_rank) if self.backend == "nccl" else torch.device("cpu")

    def ensure_group(self, want_cuda: bool) -> None:
        """A process group even for a single process: FSDP's sharded parameters need one."""
        import torch
        import torch.distributed as dist

        if dist.is_initialized():
            return
        self.backend = "nccl" if want_cuda and torch.cuda.is_available() else "gloo"
        dist.init_process_group(self.backend, store=dist.HashStore(), rank=0, world_size=1)
        self.owns_group = True

    def close(self, completed: bool = False) -> None:
        """Leave the process group. After a completed run every process waits for the others
        first: gloo aborts a process (SIGABRT) whose peer tears its connections down while it
        still holds them. The finished run's model, DDP wrapper and FSDP state hold the group
        too, in reference cycles; collected here, while the interpreter is whole, and not at its
        shutdown, where a gloo group freed last has aborted a process that had finished."""
        if self.active or self.owns_group:
            import gc

            import torch.distributed as dist

            if dist.is_initialized():
                gc.collect()
                if completed and self.active:
                    dist.barrier()
                if not self.borrowed:
                    dist.destroy_process_group()
                    gc.collect()


@contextmanager
def launcher_group(environ: dict[str, str], want_cuda: bool) -> Iterator[DistContext]:
    """The launcher's process group, joined once for several runs in one process (``lowmem
    compare``): each run borrows it, and it is left at the end."""
    context = DistContext.from_launcher(environ, want_cuda)
    completed = False
    try:
        yield context
        completed = True
    finally:
        context.close(completed)  # leaves the group unless a caller had joined it before


def processes_to_start(environ: dict[str, str]) -> int:
    """``lowmem train`` under an ``accelerate launch`` that started one process where it was asked
    for N on this one machine: N, which lowmem then starts itself (as with ``--nproc N``); else 1
    (several machines: refused by ``from_launcher``)."""
    asked = accelerate_single_process_ask(environ)
    return asked if asked > 1 and accelerate_setting(environ, "num_machines") in (None, 1) else 1


def accelerate_single_process_ask(environ: dict[str, str]) -> int:
    """Processes asked of ``accelerate launch`` when it used its single-process launcher.

    Without a GPU (or with --cpu) and without MPI, accelerate starts the script once and exports
    no process count, only ACCELERATE_USE_CPU and MASTER_ADDR/PORT; WORLD_SIZE stays unset. The
    count it was asked for is on its own command line (our parent process) or in its config file.
    """
    if "ACCELERATE_USE_CPU" not in environ or "WORLD_SIZE" in environ:
        return 0
    return accelerate_setting(environ, "num_processes") or 0


def accelerate_setting(environ: dict[str, str], name: str) -> int | None:
    """An integer setting of the ``accelerate launch`` that started this process: from its command
    line, else its config file; None where neither says (or the parent is not accelerate)."""
    try:
        argv = Path(f"/proc/{os.getppid()}/cmdline").read_bytes().decode().split("\0")
    except (OSError, UnicodeDecodeError):  # not Linux, or the parent is gone
        return None
    if "launch" not in argv:
        return None
    value = _option(argv, name)
    if value is None:
        try:
            from accelerate.commands.config import default_config_file, load_config_from_file

            config_file = _option(argv, "config_file") or default_config_file
            if not Path(config_file).is_file():
                return None
            value = getattr(load_config_from_file(config_file), name, None)
        except Exception:  # noqa: BLE001 - an unreadable config: accelerate itself would have refused it
            return None
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


def _option(argv: list[str], name: str) -> str | None:
    """The value of --name / --name-with-dashes in ``argv`` (separate or after '='); the last wins."""
    spellings = {f"--{name}", f"--{name.replace('_', '-')}"}
    found = None
    for i, arg in enumerate(argv):
        key, eq, value = arg.partition("=")
        if key in spellings:
            found = value if eq else (argv[i + 1] if i + 1 < len(argv) else None)
    return found
