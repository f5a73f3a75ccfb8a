"""``lowmem estimate`` as a user asks it: a model and optimizer names, settings files, a dataset and
``--dtype auto``, resolved as ``lowmem train`` resolves them, then ``lowmem.estimate`` for each
optimizer (the breakdown of one run)."""

from __future__ import annotations

from typing import Any

from lowmem.errors import ConfigError
from lowmem.estimate import Breakdown, estimate


def estimate_many(registry: Any, model: str, optimizer: str | list[str] | None, *, mode: str, batch_size: int,
                  max_length: int | None, dtype: str, per_layer: bool, grad_accum: int,
                  optimizer_config_file: Any = None, lora_config_file: Any = None,
                  galore_config_file: Any = None, checkpointing: bool = False,
                  lean_loss: bool = False, world_size: int = 1,
                  parallel: str = "ddp", bf16_rounding: str = "kahan",
                  device: str = "cuda", dataset: str | None = None) -> dict[str, Breakdown | str]:
    """``estimate`` for one optimizer, a list of them, or (``optimizer`` None) every registered
    one; among several, an optimizer that cannot apply (no per-layer mode, say) maps to its
    reason instead of a Breakdown. Unknown names are errors. ``max_length`` None: train's
    default, or the model's whole context where that is shorter. The settings files overlay each
    optimizer's defaults as in ``train``: ``--lora_config`` / ``--galore_config`` where it reads
    that family, then ``--optimizer-config``."""
    from lowmem.resolve import config_file_layers, length_for, merge_layers

    auto_note = ""
    if dtype == "auto":
        dtype, auto_note = resolve_auto_dtype(device)
    model_plugin = registry.model_for(model)
    max_length = length_for(model_plugin.max_positions, max_length)
    if max_length > model_plugin.max_positions:
        raise ConfigError(f"--max_length {max_length} is longer than model {model!r} allows "
                          f"({model_plugin.max_positions} positions)")
    objective = model_plugin.objective(mode, dataset_kind_for(registry, dataset, mode))
    names = [optimizer] if isinstance(optimizer, str) else optimizer or sorted(registry.optimizers)
    plugins = {name: registry.optimizer(name) for name in names}  # unknown names fail first
    results: dict[str, Breakdown | str] = {}
    for name, optimizer_plugin in plugins.items():
        # Among several optimizers a family file fits some, not all: a note only for one asked by name.
        ignored: list[str] = []
        say = ignored.append if isinstance(optimizer, str) else None
        files = config_file_layers(optimizer_plugin, lora_config_file, galore_config_file,
                                   optimizer_config_file, say)
        try:
            breakdown = estimate(
                model_plugin, optimizer_plugin, mode=mode, objective=objective, batch_size=batch_size,
                max_length=max_length, dtype=dtype, optimizer_config=merge_layers(optimizer_plugin, files),
                per_layer=per_layer, grad_accum=grad_accum, checkpointing=checkpointing, lean_loss=lean_loss,
                world_size=world_size, parallel=parallel, bf16_rounding=bf16_rounding, device=device,
            )
        except ConfigError as exc:
            if isinstance(optimizer, str):
                raise
            results[name] = str(exc)  # shown as "n/a" with the reason, the others still shown
            continue
        breakdown.notes.extend(note.removeprefix("note: ") for note in ignored)
        results[name] = breakdown
    for result in results.values():
        if auto_note and isinstance(result, Breakdown):
            result.notes.append(auto_note)
    return results


def resolve_auto_dtype(device: str) -> tuple[str, str]:
    """What ``--dtype auto`` becomes in a run on ``device``, and a note saying so: on a GPU, bf16
    (what any GPU since Ampere picks; an older one picks fp16, the same bytes); on CPU, what this
    machine's CPU picks."""
    if device != "cpu":
        return "bf16", ("--dtype auto: estimated as bf16, what a GPU with bf16 picks (fp16 takes the same "
                        "bytes)")
    import torch

    from lowmem.precision import choose_dtype

    chosen = choose_dtype("auto", torch.device("cpu"))
    return chosen, f"--dtype auto: estimated as {chosen}, what this machine's CPU picks"


def dataset_kind_for(registry: Any, dataset: str | None, mode: str) -> str:
    """The kind of data a run with ``--dataset`` (default: the mode's) trains on, as train finds it
    (a folder of the user's files is read for its layout): it decides the model's objective."""
    from lowmem.resolve import dataset_choice

    name, source = dataset_choice(dataset or registry.default_dataset(mode), None, registry)
    plugin = registry.dataset(name)
    with registry.guard(plugin, "kind_of"):
        return str(plugin.kind_of(source))
