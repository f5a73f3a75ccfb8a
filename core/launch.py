"""``lowmem train --nproc N``: starting the workers through torchrun, and the workers' watch on
whoever started them."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time

from lowmem.errors import ExitCode

# Seconds a worker whose launcher is gone gives its run to stop cleanly before it is killed.
STOP_GRACE_S = 120.0
_watching = False  # one watch per process, however many runs it makes


# Exit codes after which the worker has already said why (plugin fault or Python traceback, bad
# input, non-finite, signals): passed through as they are. Anything else is named by rank.
_OWN_EXIT_CODES = set(ExitCode) - {ExitCode.OK}


def launch_torchrun(nproc: int, argv: list[str]) -> int:
    """``lowmem train --nproc N ...`` re-runs itself under torchrun (the engine's launcher),
    in-process so that the workers' exit code comes back instead of torchrun's generic 1 and
    its failure report: a refused config is then one line and exit 2, as on one process."""
    import logging

    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    args: list[str] = []
    rest = iter(argv[1:])
    for arg in rest:
        if arg == "--nproc":
            next(rest, None)  # drop its value too
        elif not arg.startswith("--nproc="):
            args.append(arg)
    launch = get_args_parser().parse_args(
        ["--standalone", f"--nproc-per-node={nproc}", "-m", "lowmem", *args])
    # The workers inherit this process's environment; the count lets them refuse a mismatch.
    os.environ["LOWMEM_EXPECTED_WORLD_SIZE"] = str(nproc)
    # The agent logs every worker exit and the SIGTERMs it sends to the others; the workers
    # print their own errors, and a crash is summarised below.
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    try:
        run(launch)
    except ChildFailedError as exc:
        rank, failure = exc.get_first_failure()
        code = failure.exitcode
        if code < 0:
            print(f"error: the process of rank {rank} was killed by signal {-code}", file=sys.stderr)
            return 128 - code
        if code not in _OWN_EXIT_CODES:
            print(f"error: the process of rank {rank} exited with code {code}", file=sys.stderr)
        return code
    except SignalException as exc:  # this launcher was stopped; the workers got the signal too
        return 128 + int(exc.sigval)
    return 0


def stop_without_launcher(environ: dict[str, str]) -> None:
    """In a worker that torchrun's agent started (``lowmem train --nproc``, ``torchrun``,
    ``accelerate launch``): when the agent dies, stop the run as a SIGTERM to the agent would have
    (finish the step, save a checkpoint, exit), then, after ``STOP_GRACE_S``, kill this process.

    The agent starts each worker in a session of its own, so a SIGKILL of the agent, or of its
    process group, reaches no worker, and nothing can forward it: the workers would go on
    training and writing the run folder, beside a resumed run or a new one. The agent is this
    process's parent; a daemon thread polls for the parent changing (the orphan is re-parented)."""
    global _watching
    if "TORCHELASTIC_RUN_ID" not in environ or _watching:
        return
    _watching, agent = True, os.getppid()

    def watch() -> None:
        while os.getppid() == agent:
            time.sleep(1.0)
        print("error: the launcher is gone; this process stops after its step", file=sys.stderr, flush=True)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(STOP_GRACE_S)
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, name="lowmem-launcher-watch", daemon=True).start()
