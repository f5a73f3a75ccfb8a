"""lowmem: memory-efficient training of language models, with a plugin API.

Train from Python::

    import lowmem

    result = lowmem.train(lowmem.TrainConfig(mode="pretraining", optimizer="galore", model="llama_60m"))
    print(result.eval_perplexity, result.optimizer_state_bytes)

A plugin subclasses ``lowmem.Optimizer`` (or ``Model``, ``Dataset``) and registers it from a
``@lowmem.hookimpl`` function; see README.md. Importing this package stays cheap: no torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from lowmem.api import (
    CAUSAL_LM,
    CLASSIFICATION,
    MASKED_LM,
    DataRequest,
    Dataset,
    Model,
    ModelRequest,
    Optimizer,
    OptimizerSettings,
)
from lowmem.config import TrainConfig
from lowmem.errors import (
    CheckpointError,
    ConfigError,
    ExitCode,
    Interrupted,
    LowmemError,
    NonFiniteError,
    PluginFault,
)
from lowmem.hookspecs import hookimpl
from lowmem.result import RunResult

if TYPE_CHECKING:  # pragma: no cover - typing only
    from collections.abc import Callable

    from lowmem.registry import Registry

__version__ = "0.1.0"


def train(config: TrainConfig, registry: Registry | None = None,
          say: Callable[[str], None] | None = None) -> RunResult:
    """Train as ``config`` says and return its ``RunResult``; see ``lowmem.training.train``.

    Raises ``ConfigError`` on bad input, ``NonFiniteError``, ``PluginFault`` or ``Interrupted``;
    never exits the process.
    """
    from lowmem.training import train as run_training

    return run_training(config, registry, say)


__all__ = [
    "CAUSAL_LM",
    "CLASSIFICATION",
    "MASKED_LM",
    "CheckpointError",
    "ConfigError",
    "DataRequest",
    "Dataset",
    "ExitCode",
    "Interrupted",
    "LowmemError",
    "Model",
    "ModelRequest",
    "NonFiniteError",
    "Optimizer",
    "OptimizerSettings",
    "PluginFault",
    "RunResult",
    "TrainConfig",
    "hookimpl",
    "train",
    "__version__",
]
