"""How ``lowmem estimate`` shows its breakdowns: a table with one column per optimizer, or JSON."""

from __future__ import annotations

from lowmem.estimate import ACTIVATION_FORMULA, FRAMEWORK_OVERHEAD, Breakdown
from lowmem.text import format_bytes


def footnotes(results: dict[str, Breakdown | str]) -> list[str]:
    lines = [
        "weights: fp32 master weights (4 bytes/parameter; autocast computes in 16 bits), or bf16 with "
        "--dtype bf16-pure; gradients: one per trainable parameter (per-layer: the largest single one)",
        ACTIVATION_FORMULA,
        f"framework overhead: {FRAMEWORK_OVERHEAD:.0%} of the rest (allocator slack, backward temporaries); "
        "GiB = 2^30 bytes",
    ]
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
                  f"{s['dtype']}{', per-layer' if first.per_layer else ''}")
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
