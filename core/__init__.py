"""lowmem: memory-efficient training of language models, with a plugin API.

A plugin subclasses ``lowmem.Optimizer`` (or ``Model``, ``Dataset``) and registers it from a
``@lowmem.hookimpl`` function; see README.md. Importing this package stays cheap: no torch.
"""

from lowmem.api import (
    CAUSAL_LM,
    CLASSIFICATION,
    MASKED_LM,
    ConfigError,
    DataRequest,
    Dataset,
    Model,
    ModelRequest,
    Optimizer,
    OptimizerSettings,
)
from lowmem.hookspecs import hookimpl

__version__ = "0.1.0"

__all__ = [
    "CAUSAL_LM",
    "CLASSIFICATION",
    "MASKED_LM",
    "ConfigError",
    "DataRequest",
    "Dataset",
    "Model",
    "ModelRequest",
    "Optimizer",
    "OptimizerSettings",
    "hookimpl",
    "__version__",
]
