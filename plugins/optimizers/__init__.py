"""Built-in optimizers.

Plugin modules here import nothing heavy at module level (``lowmem --help`` must stay instant);
torch, peft, galore_torch and bitsandbytes are imported inside methods, after
``quiet_bitsandbytes()``.
"""

def quiet_bitsandbytes() -> None:
    """Silence bitsandbytes' CPU-backend noise ("Failed to load CPU gemm_4bit_forward ...").

    Must run before bitsandbytes is first imported, directly or through peft / galore_torch.
    """
    import logging  # here, not at registration time: `lowmem --help` imports this package

    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)


def plugin_config(plugin, settings):
    """``settings.config``, which lowmem passes merged with ``plugin.default_config`` and checked by
    ``plugin.check_config``. A cheap guard against a caller (a script, a test) that passes a
    partial config: the plugins read every key without falling back to defaults."""
    missing = [key for key in plugin.default_config if key not in settings.config]
    if missing:
        raise ValueError(
            f"optimizer {plugin.name!r}: settings.config lacks {', '.join(missing)}; pass the plugin's "
            "default_config overlaid by the user's values"
        )
    return settings.config
