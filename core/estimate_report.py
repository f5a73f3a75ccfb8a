"""How ``lowmem estimate`` shows its breakdowns: a table with one column per optimizer, or JSON."""

from __future__ import annotations

from lowmem.activations import ACTIVATION_FORMULA
from lowmem.estimate import Breakdown
from lowmem.estimate_overhead import overhead_note
from lowmem.text import format_bytes

BATCH_SEARCH_LIMIT = 1 << 16  # --gpu-memory searches batch sizes up to this


def footnotes(results: dict[str, Breakdown | str]) -> list[str]:
    lines = [
        "weights: fp32 master weights (4 bytes/parameter; autocast computes in 16 bits), or bf16 with "
        "--dtype bf16-pure; gradients: one per trainable parameter (per-layer: the largest single one)",
        ACTIVATION_FORMULA,
    ]
    shown = [result for result in results.values() if isinstance(result, Breakdown)]
    lines += [f"{overhead_note(device)}; GiB = 2^30 bytes"
              for device in sorted({result.settings["device"] for result in shown}) or ["cuda"]]
    for name, result in results.items():
        if isinstance(result, Breakdown):
            lines += [f"{name}: {note}" for note in result.notes]
    return lines


def print_estimates(results: dict[str, Breakdown | str], device_bytes: int | None,
                    as_json: bool = False) -> None:
    """A table with one column per optimizer (an optimizer that cannot apply shows n/a and why),
    or JSON."""
    import json

    if as_json:
        data = {
            name: {**r.to_json(), "fits": r.fits(device_bytes), "device_memory": device_bytes}
            if isinstance(r, Breakdown) else {"optimizer": name, "error": r}
            for name, r in results.items()
        }
        print(json.dumps(data, indent=2))
        return
    from rich.table import Table

    from lowmem.progress import results_console

    first = next((r for r in results.values() if isinstance(r, Breakdown)), None)
    title = "memory estimate"
    if first is not None:
        s = first.settings
        title += (f": {first.model}, {s['mode']}, batch {s['batch_size']} x {s['max_length']} tokens, "
                  f"{s['dtype']}{', per-layer' if first.per_layer else ''}, on {s.get('device', 'cuda')}")
    table = Table(title=title)
    table.add_column("")
    for name in results:
        table.add_column(name, justify="right")
    labels = [label for label, _ in (first.rows() if first else [])]
    for index, label in enumerate(labels):
        cells = [format_bytes(r.rows()[index][1]) if isinstance(r, Breakdown) else "n/a"
                 for r in results.values()]
        style = "bold" if label == "total" else None
        table.add_row(label, *cells, style=style)
    breakdowns = [r if isinstance(r, Breakdown) else None for r in results.values()]
    table.add_row("parameters", *[f"{r.total_params:,}" if r else "" for r in breakdowns])
    table.add_row("trainable", *[f"{r.trainable_params:,}" if r else "" for r in breakdowns])
    table.add_row("states from", *[
        ("plugin" if r.state_source == "plugin" else "generic guess") if isinstance(r, Breakdown) else ""
        for r in results.values()
    ])
    if device_bytes is not None:
        table.add_row(f"fits in {format_bytes(device_bytes)}", *[
            ("[green]yes[/green]" if r.fits(device_bytes) else "[red]no[/red]") if r else ""
            for r in breakdowns
        ])
    console = results_console()
    console.print(table)
    for name, r in results.items():
        if not isinstance(r, Breakdown):
            console.print(f"n/a for {name}: {r}", markup=False)
    for line in footnotes(results):
        console.print(f"* {line}", markup=False, highlight=False)


def fits(plain: dict[str, Breakdown | str], recomputed: dict[str, Breakdown | str],
         device_bytes: int) -> list[dict[str, object]]:
    """Per optimizer: the largest batch that fits without and with activation checkpointing
    (0: not even batch 1), or why the optimizer does not apply."""
    rows: list[dict[str, object]] = []
    for name, result in plain.items():
        other = recomputed[name]
        if not isinstance(result, Breakdown):
            rows.append({"optimizer": name, "error": result})
            continue
        largest = largest_batch(result, device_bytes)
        # at_search_limit: the search stopped at BATCH_SEARCH_LIMIT, so a larger batch may fit too
        row: dict[str, object] = {"optimizer": name, "per_layer": result.per_layer,
                                  "largest_batch": largest, "fits_at_batch_1": largest > 0,
                                  "total_at_batch_1": result.at_batch(1).total,
                                  "at_search_limit": largest == BATCH_SEARCH_LIMIT}
        if isinstance(other, Breakdown):
            largest_recomputed = largest_batch(other, device_bytes)
            row.update(largest_batch_checkpointing=largest_recomputed,
                       fits_at_batch_1_checkpointing=largest_recomputed > 0,
                       total_at_batch_1_checkpointing=other.at_batch(1).total,
                       at_search_limit_checkpointing=largest_recomputed == BATCH_SEARCH_LIMIT)
        else:  # the model cannot checkpoint: a run refuses it
            row.update(largest_batch_checkpointing=None, fits_at_batch_1_checkpointing=None,
                       total_at_batch_1_checkpointing=None, at_search_limit_checkpointing=None,
                       checkpointing_error=other)
        rows.append(row)
    return rows


def assumed_levers(breakdowns: list[Breakdown]) -> str:
    """The levers beyond the dtype that the rows of a "what fits" table assumed, for its title."""
    if not breakdowns:
        return ""
    settings = breakdowns[0].settings
    levers = []
    if settings.get("lean_loss"):
        levers.append("lean loss")
    if (settings.get("grad_accum") or 1) > 1:
        levers.append(f"grad-accum {settings['grad_accum']}")
    if settings.get("parallel") == "fsdp":
        levers.append(f"per process of {settings.get('world_size')} (FSDP)")
    if any(b.per_layer for b in breakdowns):
        levers.append("per-layer" if all(b.per_layer for b in breakdowns) else "per-layer where offered")
    return "".join(f", {lever}" for lever in levers)


def print_fits(plain: dict[str, Breakdown | str], recomputed: dict[str, Breakdown | str], device_bytes: int,
               as_json: bool = False) -> None:
    """``lowmem estimate --gpu-memory``: what fits, as a table or JSON."""
    import json

    rows = fits(plain, recomputed, device_bytes)
    first = next((r for r in plain.values() if isinstance(r, Breakdown)), None)
    length = first.settings["max_length"] if first else 0
    device, dtype = (first.settings["device"], first.settings["dtype"]) if first else ("", "")
    # What the estimates say about the settings (a lever not used, --dtype auto's choice), once.
    notes = shared_notes({name: r for name, r in plain.items() if isinstance(r, Breakdown)})
    if as_json:
        # A largest batch equal to the search limit means "at least that".
        # The settings every row assumed (checkpointing is both columns; per-layer is per row).
        assumed = {key: value for key, value in (first.settings if first else {}).items()
                   if key not in ("batch_size", "activation_checkpointing", "optimizer_config")}
        print(json.dumps({"device_memory": device_bytes, "device": device, "dtype": dtype,
                          "max_length": length, "batch_search_limit": BATCH_SEARCH_LIMIT,
                          "settings": assumed, "optimizers": rows, "notes": notes}, indent=2))
        return
    from rich.table import Table

    from lowmem.progress import results_console

    model = first.model if first else ""
    table = Table(title=f"what fits in {format_bytes(device_bytes)} of {device} memory: {model}, batches of "
                        f"{length} tokens, {dtype}"
                        f"{assumed_levers([r for r in plain.values() if isinstance(r, Breakdown)])}")
    for column in ("optimizer", "largest batch", "with checkpointing", "at batch 1"):
        table.add_column(column, justify="left" if column == "optimizer" else "right")
    for row in rows:
        if "error" in row:
            table.add_row(str(row["optimizer"]), "n/a", "n/a", str(row["error"]))
            continue
        checkpoints = "checkpointing_error" not in row
        smallest = "_checkpointing" if checkpoints else ""  # the smallest run this model can make
        cells = [_batch(row["largest_batch"]),
                 _batch(row["largest_batch_checkpointing"]) if checkpoints else "n/a"]
        needed = format_bytes(int(row[f"total_at_batch_1{smallest}"]))  # type: ignore[call-overload]
        table.add_row(str(row["optimizer"]), *cells, f"cannot fit (needs {needed})"
                      if not row[f"largest_batch{smallest}"] else f"needs {needed}")
    results_console().print(table)
    results_console().print("* estimates include weights, gradients, optimizer states, activations and the "
                            "framework overhead (lowmem estimate's table shows it); 0 = not even batch 1; "
                            "at batch 1: the smallest run, with checkpointing where the model can",
                            markup=False, highlight=False)
    for note in notes:
        results_console().print(f"* {note}", markup=False, highlight=False)
    for reason in sorted({str(row["checkpointing_error"]) for row in rows if "checkpointing_error" in row}):
        results_console().print(f"* with checkpointing: n/a, {reason}", markup=False, highlight=False)
    if rows and not any(row.get("largest_batch_checkpointing") or row.get("largest_batch") for row in rows) \
            and first is not None:
        hints = [hint for hint, applies in (
            ("--dtype bf16-pure (bf16 weights, no fp32 master copy)", first.settings["dtype"] != "bf16-pure"),
            ("--per-layer (one gradient at a time; optimizers that have it)", not first.per_layer))
            if applies]
        if hints:
            results_console().print(f"* nothing fits even at batch 1; try {' or '.join(hints)}",
                                    markup=False, highlight=False)


def shared_notes(estimates: dict[str, Breakdown]) -> list[str]:
    """The notes of several estimates, once each: named by optimizer where not every one has it."""
    notes: dict[str, list[str]] = {}
    for name, breakdown in estimates.items():
        for note in breakdown.notes:
            notes.setdefault(note, []).append(name)
    return [note if len(names) == len(estimates) else f"{', '.join(names)}: {note}"
            for note, names in notes.items()]


def _batch(value: object) -> str:
    if value == BATCH_SEARCH_LIMIT:
        return f">= {value}"  # the search stops there
    return "[red]0 (cannot fit)[/red]" if value == 0 else str(value)


def largest_batch(breakdown: Breakdown, device_bytes: int, limit: int = BATCH_SEARCH_LIMIT) -> int:
    """The largest batch size ``b`` whose estimate fits in ``device_bytes`` (0: not even batch 1),
    up to ``limit`` (returned when that fits: "at least"). The total grows with the batch: a
    doubling search, then a bisection."""

    def fit(batch_size: int) -> Breakdown:
        return breakdown.at_batch(batch_size)

    if fit(1).total > device_bytes:
        return 0
    low, high = 1, 2
    while high <= limit and fit(high).total <= device_bytes:
        low, high = high, high * 2
    high = min(high, limit + 1)  # the answer is at most ``limit``: the search stops there
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if fit(middle).total <= device_bytes else (low, middle)
    return low
