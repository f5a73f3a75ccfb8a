"""lowmem benchmarks (`nox -s bench`): writes bench/results.md and bench/results.json.

    python bench/run.py [--quick] [--sections 1,2,3,4,5,6,7] [--no-merge]

Sections: 1 lowmem vs Hugging Face Trainer, 2 vs galore_torch (step and SVD refresh),
3 optimizer overhead vs baseline (from section 1's runs), 4 optimizer-state memory,
5 start-up time, 6 GPU (skipped without CUDA), 7 lowmem's step overhead vs a plain torch loop.
Sections not run keep their earlier results (read back from results.json) unless --no-merge.
Not part of the test run.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.update({k: v for k, v in __import__("common").offline_env().items() if k not in os.environ})

import common  # noqa: E402

TITLES = {
    "1": "1. lowmem vs Hugging Face Trainer (throughput, peak memory)",
    "2": "2. lowmem GaLore vs galore_torch (optimizer step, projection refresh)",
    "3": "3. Optimizer overhead vs baseline within lowmem",
    "4": "4. Optimizer-state memory",
    "5": "5. Start-up time",
    "6": "6. GPU",
    "7": "7. lowmem step overhead vs a plain torch loop",
}
# The repetition settings each section's figures depend on (shown in its header line).
SETTINGS = {
    "1": ("repeats", "warmup", "steps"), "2": ("step_repeats", "svd_repeats"),
    "3": ("repeats", "warmup", "steps"), "4": (), "5": ("startup_repeats",), "6": (),
    "7": ("overhead_repeats", "overhead_warmup", "overhead_steps", "micro_rounds", "micro_steps"),
}


def parse(argv):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer steps and repeats (development)")
    parser.add_argument("--sections", default=",".join(TITLES), help="comma-separated section numbers")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads in training runs (1: stable under other load on a small "
                             "machine; 0: default)")
    parser.add_argument("--output", default=str(Path(__file__).resolve().parent), help="folder for results.*")
    parser.add_argument("--render", action="store_true",
                        help="only rewrite results.md from results.json and notes.md (after editing notes)")
    parser.add_argument("--no-merge", action="store_true",
                        help="write only this run's sections (default: keep the other sections' earlier "
                             "results from results.json)")
    args = parser.parse_args(argv)
    args.sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = [s for s in args.sections if s not in TITLES]
    if unknown:
        parser.error(f"unknown section(s) {', '.join(unknown)}; known: {', '.join(TITLES)}")
    quick = args.quick
    args.repeats, args.warmup, args.steps = (1, 1, 2) if quick else (2, 1, 3)
    args.step_repeats, args.svd_repeats, args.startup_repeats = (3, 1, 3) if quick else (7, 3, 7)
    args.overhead_repeats, args.micro_rounds = (2, 1) if quick else (5, 5)
    args.overhead_warmup, args.overhead_steps, args.micro_steps = (10, 10, 50) if quick else (10, 30, 150)
    return args


def main(argv=None) -> int:
    args = parse(argv)
    if args.render:
        write(json.loads((Path(args.output) / "results.json").read_text()), Path(args.output))
        return 0

    def say(message):
        print(message, flush=True)

    info = common.machine()
    say(f"machine: {common.machine_line(info)}")
    results: dict = {"machine": info, "quick": args.quick, "sections": {}}
    started = time.perf_counter()
    training = None
    for section in args.sections:
        say(f"== {TITLES[section]}")
        t0 = time.perf_counter()
        if section in ("1", "3"):
            if training is None:
                import s_training

                training = s_training.run(args, say)
            found = training["trainer" if section == "1" else "overhead"]
            found = {**found, "errors": training["errors"]}
            if section == "1":
                found["raw"] = training["raw"]
        elif section == "2":
            import s_galore

            found = s_galore.run(args, say)
        elif section == "4":
            import s_memory

            found = s_memory.run(args, say)
        elif section == "5":
            import s_startup

            found = s_startup.run(args, say)
        elif section == "7":
            import s_overhead

            found = s_overhead.run(args, say)
        else:
            import s_gpu

            found = s_gpu.run(args, say)
        found["seconds"] = round(time.perf_counter() - t0, 1)
        found["repeats"] = {key: getattr(args, key) for key in SETTINGS[section]}
        found["machine"], found["quick"] = info, args.quick
        results["sections"][section] = found
        say(found["table"])
    results["total_seconds"] = round(time.perf_counter() - started, 1)
    results["ran"] = args.sections
    folder = Path(args.output)
    if not args.no_merge:
        results = merge(results, folder / "results.json", say)
    write(results, folder)
    say(f"done in {results['total_seconds']:.0f} s")
    return 0


def merge(results: dict, previous: Path, say) -> dict:
    """This run's sections over the earlier results.json's others; each kept section keeps the
    machine line and --quick flag of the run that measured it."""
    try:
        old = json.loads(previous.read_text())
        kept = {k: v for k, v in old["sections"].items() if k in TITLES and k not in results["sections"]}
    except (OSError, ValueError, KeyError, AttributeError) as error:
        if previous.exists():
            say(f"note: earlier {previous.name} not merged ({error})")
        return results
    for found in kept.values():
        found.setdefault("machine", old.get("machine"))
        found.setdefault("quick", old.get("quick", False))
    if kept:
        say(f"kept earlier results of section(s) {', '.join(sorted(kept, key=int))}")
    merged = {**kept, **results["sections"]}
    return {**results, "sections": {k: merged[k] for k in sorted(merged, key=int)}}


def write(results: dict, folder: Path) -> None:
    (folder / "results.json").write_text(json.dumps(results, indent=1, default=str) + "\n")
    info = results["machine"]
    ran = results.get("ran") or list(results["sections"])
    kept = [k for k in results["sections"] if k not in ran]
    lines = ["# lowmem benchmark results", "",
             f"Written by `bench/run.py --sections {','.join(ran)}{' --quick' if results['quick'] else ''}` "
             f"on {info['date']} in {results['total_seconds']:.0f} s"
             + (f"; sections {', '.join(kept)} are kept from earlier runs (dates in their machine lines)."
                if kept else "."), ""]
    for section, found in results["sections"].items():
        where = found.get("machine") or info
        when = f"{where.get('date')}{', --quick' if found.get('quick') else ''}"
        repeats = ", ".join(f"{k} {v}" for k, v in found["repeats"].items()) or "n/a"
        lines += [f"## {TITLES[section]}", "", f"Machine ({when}): {common.machine_line(where)}. "
                  f"Repeats: {repeats}.", "", found["table"], ""]
        for name, error in (found.get("errors") or {}).items():
            lines += [f"- error in `{name}`: `{error.splitlines()[-1] if error else ''}`", ""]
    notes = folder / "notes.md"
    if notes.exists():  # hand-written analysis of the measured numbers (causes, goals met or not)
        lines += [notes.read_text()]
    (folder / "results.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
