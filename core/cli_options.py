"""How the CLI reads what users type: the option checks (each raises ``typer.BadParameter``:
exit 2 with one line naming the option), the value parsers and the ``train`` options built from
``TrainConfig``'s fields. How errors end: ``lowmem.cli_commands``."""

from __future__ import annotations

import inspect
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer
import typer.core

from lowmem.config import CHOICES, TrainConfig, default_of

Opt = typer.Option


# -- value parsers ---------------------------------------------------------------------------
_SUFFIXES = {"": 1, "k": 10**3, "m": 10**6, "b": 10**9, "g": 10**9, "t": 10**12}


def parse_count(text: str) -> int:
    """'1e9', '100M', '1B', '2.5k', '1_000' -> int. Raises ValueError with a clear message."""
    cleaned = str(text).strip().lower().replace("_", "").replace(",", "")
    match = re.fullmatch(r"([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)([kmbgt]?)", cleaned)
    if not match:
        raise ValueError(f"{text!r} is not a count (examples: 1000000, 1e9, 100M, 1B)")
    value = float(match.group(1)) * _SUFFIXES[match.group(2)]
    if not math.isfinite(value) or value != int(value):
        raise ValueError(f"{text!r} is not a whole number")
    return int(value)


def parse_bool(text: str) -> bool:
    lowered = str(text).strip().lower()
    if lowered in ("true", "1", "yes", "on"):
        return True
    if lowered in ("false", "0", "no", "off"):
        return False
    raise ValueError(f"{text!r} is not true or false")


def parse_bytes(text: str) -> int:
    """'24GB', '24GiB', '80G', '512MiB', '1e9' -> bytes (GB and GiB both mean 2**30)."""
    cleaned = str(text).strip().lower().replace(" ", "")
    number = r"([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)"
    units = r"(b|k|kb|kib|m|mb|mib|g|gb|gib|t|tb|tib|p|pb|pib)?"
    match = re.fullmatch(number + units, cleaned)
    if not match:
        raise ValueError(f"{text!r} is not a size (examples: 24GB, 80GiB, 512MB)")
    scale = {"b": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40, "p": 2**50}[(match.group(2) or "b")[0]]
    value = float(match.group(1)) * scale
    if not math.isfinite(value):
        raise ValueError(f"{text!r} is not a finite size")
    return int(value)


# -- option callbacks ------------------------------------------------------------------------
def positive_int(value: int | None) -> int | None:
    if value is not None and value <= 0:
        raise typer.BadParameter(f"must be a positive integer, got {value}")
    return value


def non_negative_int(value: int | None) -> int | None:
    if value is not None and value < 0:
        raise typer.BadParameter(f"must be 0 or more, got {value}")
    return value


def positive_float(value: float | None) -> float | None:
    if value is not None and not value > 0:
        raise typer.BadParameter(f"must be a positive number, got {value}")
    return value


def non_negative_float(value: float | None) -> float | None:
    if value is not None and not value >= 0:
        raise typer.BadParameter(f"must be 0 or more, got {value}")
    return value


def ratio(value: float | None) -> float | None:
    if value is not None and not 0 <= value <= 1:
        raise typer.BadParameter(f"must be between 0 and 1, got {value}")
    return value


def _parsed(parse: Callable[[str], Any], hint: str = "") -> Callable[[str | None], Any]:
    def check(value: str | None) -> Any:
        if value is None:
            return None
        try:
            return parse(value)
        except ValueError as exc:
            raise typer.BadParameter(f"{exc}{hint}") from None

    return check


boolean = _parsed(parse_bool, "; use true or false")


def size(value: str | None) -> int | None:
    """A memory size: positive, and a bare number only when it is plainly bytes (``24`` for 24 GiB
    would otherwise fit nothing)."""
    parsed = _parsed(parse_bytes)(value)
    if parsed is None:
        return None
    if parsed <= 0:
        raise typer.BadParameter(f"{value!r} is not a positive size")
    if parsed < 2**20 and re.fullmatch(r"[0-9.e+-]+", str(value).strip().lower()):
        raise typer.BadParameter(f"{value!r} has no unit, so it means {parsed} bytes; give one, "
                                 f"e.g. {value}GiB")
    return parsed


def count(value: str | None) -> int | None:
    parsed = _parsed(parse_count)(value)
    if parsed is not None and parsed <= 0:
        raise typer.BadParameter(f"must be positive, got {value}")
    return parsed


def choice(choices: tuple[str, ...]) -> Callable[[str | None], str | None]:
    def check(value: str | None) -> str | None:
        if value is not None and value not in choices:
            raise typer.BadParameter(f"{value!r} is not one of: {', '.join(choices)}")
        return value

    return check


def existing_file(value: Path | str | None) -> str | None:
    if value is None:
        return None
    path = Path(value)
    if path.is_dir():
        raise typer.BadParameter(f"{str(path)!r} is a directory, not a file")
    if not path.is_file():
        raise typer.BadParameter(f"file {str(path)!r} does not exist")
    return str(path)


def report_targets(value: str | None) -> tuple[str, ...]:
    return tuple(x.strip() for x in str(value or "").split(",") if x.strip())


# -- the train options: one per TrainConfig field ----------------------------------------------
@dataclass(frozen=True)
class TrainOption:
    field: str  # the TrainConfig field it sets (its default is that field's)
    flags: tuple[str, ...]
    kind: Any  # the type the command line value has before its callback
    help: str = ""
    callback: Callable[..., Any] | None = None
    shown_default: Any = None  # the default as typed on a command line, where it differs


TRAIN_OPTIONS = (
    TrainOption("mode", ("--mode",), str, "pretraining or finetuning", choice(CHOICES["mode"])),
    TrainOption("optimizer", ("--optimizer",), str, "A registered optimizer (lowmem list-optimizers)"),
    TrainOption("model", ("--model",), str, "A registered model (lowmem list-models)"),
    TrainOption("batch_size", ("--batch_size", "--batch-size"), int, "Sequences per micro-batch",
                positive_int),
    TrainOption("num_epochs", ("--num_epochs", "--num-epochs"), int, "Finetuning epochs", positive_int),
    TrainOption("max_length", ("--max_length", "--max-length"), int, "Tokens per sequence", positive_int),
    TrainOption("num_training_tokens", ("--num_training_tokens", "--num-training-tokens"), str,
                "Pretraining budget in real tokens: 1e9, 100M, 1B", count, "1e9"),
    TrainOption("max_steps", ("--max-steps", "--max_steps"), int | None, "Stop after N optimizer steps",
                positive_int),
    TrainOption("shuffle", ("--shuffle",), str, "true or false", boolean, "true"),
    TrainOption("dtype", ("--dtype",), str, "auto, bf16, fp16 (loss scaling), fp32, or bf16-pure (bf16 "
                "weights, no fp32 copy); auto: bf16 where fast, else fp32 on CPU / fp16 on old GPUs",
                choice(CHOICES["dtype"])),
    TrainOption("lr", ("--lr",), float, "Peak learning rate", positive_float),
    TrainOption("weight_decay", ("--weight_decay", "--weight-decay"), float, "Decoupled weight decay",
                non_negative_float),
    TrainOption("decay_norms_and_biases", ("--decay-norms-and-biases", "--decay_norms_and_biases"), bool,
                "Also decay biases and normalisation weights (default: not, as in HF Trainer)"),
    TrainOption("tmax", ("--tmax",), int | None,
                "Cosine period in optimizer steps after warm-up (default: the rest of the run)",
                positive_int),
    TrainOption("warmup_steps", ("--warmup_steps", "--warmup-steps"), int | None,
                "Linear warm-up steps (default: 10% of the run)", non_negative_int),
    TrainOption("min_lr_ratio", ("--min-lr-ratio", "--min_lr_ratio"), float,
                "Final LR as a fraction of --lr", ratio),
    TrainOption("lora_config_file", ("--lora_config", "--lora-config"), Path | None, "JSON LoRA settings",
                existing_file),
    TrainOption("galore_config_file", ("--galore_config", "--galore-config"), Path | None,
                "JSON GaLore settings", existing_file),
    TrainOption("optimizer_config_file", ("--optimizer-config", "--optimizer_config"), Path | None,
                "JSON settings for any optimizer", existing_file),
    TrainOption("target_modules", ("--target-modules", "--target_modules"), str,
                "Layers for LoRA/GaLore: names (comma-separated), a regex, or all-linear "
                "(default: the model's)"),
    TrainOption("packing", ("--packing",), bool,
                "Pack examples into full-length rows (attention stays within each example)"),
    TrainOption("activation_checkpointing", ("--activation-checkpointing", "--activation_checkpointing",
                                             "--gradient-checkpointing", "--gradient_checkpointing"), bool,
                "Recompute each transformer block in backward: less activation memory, ~30% more compute"),
    TrainOption("compile", ("--compile",), bool, "torch.compile the model (inductor)"),
    TrainOption("lean_loss", ("--lean-loss", "--lean_loss"), bool,
                "Causal LMs: compute the loss in chunks, never the whole batch's logits"),
    TrainOption("bf16_rounding", ("--bf16-rounding", "--bf16_rounding"), str,
                "With --dtype bf16-pure: kahan (keeps small updates; 2 bytes/weight), stochastic "
                "(no memory, noisier) or nearest (small updates are lost)", choice(CHOICES["bf16_rounding"])),
    TrainOption("test", ("--test",), str, "Smoke mode: ~1000 tokens or a few batches", boolean, "false"),
    TrainOption("dataset", ("--dataset",), str,
                "A registered dataset, a local file or folder, or a hub id (default: per mode)"),
    TrainOption("output_dir", ("--output-dir", "--output_dir"), str,
                "Run folder (default runs/<date>-<model>-<optimizer>)"),
    TrainOption("seed", ("--seed",), int),
    TrainOption("grad_accum", ("--grad-accum", "--grad_accum"), int, "Micro-batches per optimizer step",
                positive_int),
    TrainOption("per_layer", ("--per-layer", "--per_layer"), bool,
                "Update each weight during backward as its gradient is ready (optimizers with a "
                "per_layer setting; the others refuse it in one line)"),
    TrainOption("parallel", ("--parallel",), str, "ddp (a full model per process) or fsdp (weights, "
                "gradients and optimizer states sharded over the processes)", choice(CHOICES["parallel"])),
    TrainOption("max_grad_norm", ("--max-grad-norm", "--max_grad_norm"), float | None,
                "Clip the global gradient norm; 0 turns clipping off (default: 1.0, none for optimizers "
                "that update inside backward)", non_negative_float),
    TrainOption("eval_every", ("--eval-every", "--eval_every"), int,
                "Evaluate every N optimizer steps (0: at the end only)", non_negative_int),
    TrainOption("eval_batches", ("--eval-batches", "--eval_batches"), int, "Held-out batches per evaluation",
                positive_int),
    TrainOption("log_every", ("--log-every", "--log_every"), int, "Optimizer steps per metrics row",
                positive_int),
    TrainOption("save_every", ("--save-every", "--save_every"), int,
                "Checkpoint every N optimizer steps (and at the end)", non_negative_int),
    TrainOption("keep_checkpoints", ("--keep-checkpoints", "--keep_checkpoints"), int,
                "Newest checkpoints kept", positive_int),
    TrainOption("resume", ("--resume",), str | None, "A checkpoint folder, a run folder, or 'latest'"),
    TrainOption("on_nonfinite", ("--on-nonfinite", "--on_nonfinite"), str, "stop (exit 3) or skip the update",
                choice(CHOICES["on_nonfinite"])),
    TrainOption("max_nonfinite_skips", ("--max-nonfinite-skips", "--max_nonfinite_skips"), int,
                "Consecutive skipped updates before stopping anyway", positive_int),
    TrainOption("model_path", ("--model-path", "--model_path"), str | None,
                "Hugging Face folder (or hub id) with weights to finetune"),
    TrainOption("tokenizer", ("--tokenizer",), str | None, "Tokenizer folder or hub id"),
    TrainOption("trust_remote_code", ("--trust-remote-code", "--trust_remote_code"), bool,
                "Allow model folders that ship their own code"),
    TrainOption("device", ("--device",), str, "auto, cpu or cuda", choice(CHOICES["device"])),
    TrainOption("report_to", ("--report-to", "--report_to"), str, "Comma-separated: tensorboard, wandb",
                report_targets,
                ""),
)
REQUIRED = ("mode", "optimizer", "model")


def train_parameters(leave_out: tuple[str, ...] = ()) -> list[inspect.Parameter]:
    """The train options as function parameters Typer reads (see ``with_parameters``)."""
    parameters = []
    for option in TRAIN_OPTIONS:
        if option.field in leave_out:
            continue
        info = Opt(*option.flags, help=option.help, callback=option.callback)
        default = inspect.Parameter.empty if option.field in REQUIRED else (
            option.shown_default if option.shown_default is not None else default_of(option.field))
        parameters.append(inspect.Parameter(option.field, inspect.Parameter.KEYWORD_ONLY, default=default,
                                            annotation=Annotated[option.kind, info]))
    return parameters


def with_parameters(*extra: inspect.Parameter, leave_out: tuple[str, ...] = ()) -> Callable[[Any], Any]:
    """Give a command taking ``**options`` the train options (plus ``extra``) as its signature,
    so ``train`` and ``compare`` share one definition of each option."""

    def decorate(command: Any) -> Any:
        command.__signature__ = inspect.Signature([*extra, *train_parameters(leave_out)])
        return command

    return decorate


def config_from_options(options: dict[str, Any], **overrides: Any) -> TrainConfig:
    """The TrainConfig the checked option values describe."""
    values = {o.field: options[o.field] for o in TRAIN_OPTIONS if o.field in options}
    return TrainConfig(**{**values, **overrides})


NPROC = inspect.Parameter(
    "nproc", inspect.Parameter.KEYWORD_ONLY, default=1,
    annotation=Annotated[int, Opt("--nproc", callback=positive_int,
                                  help="Start N data-parallel processes through torchrun")])
