"""The plugin contract: pluggy markers and the three hooks a plugin may implement."""

import pluggy

hookspec = pluggy.HookspecMarker("lowmem")
hookimpl = pluggy.HookimplMarker("lowmem")


@hookspec
def register_optimizers(register):
    """Call ``register(optimizer)`` once for each ``lowmem.Optimizer`` this plugin provides.

    Its ``name`` becomes a valid ``--optimizer`` value.
    """


@hookspec
def register_models(register):
    """Call ``register(model)`` once for each ``lowmem.Model`` this plugin provides.

    Its ``name`` becomes a valid ``--model`` value.
    """


@hookspec
def register_datasets(register):
    """Call ``register(dataset)`` once for each ``lowmem.Dataset`` this plugin provides.

    Its ``name`` becomes a valid ``--dataset`` value.
    """
