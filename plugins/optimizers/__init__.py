"""Built-in optimizers.

Plugin modules here import nothing heavy at module level (``lowmem --help`` must stay instant);
torch, peft, galore_torch and bitsandbytes are imported inside methods, after
``quiet_bitsandbytes()``.
"""

import logging


def quiet_bitsandbytes() -> None:
    """Silence bitsandbytes' CPU-backend noise ("Failed to load CPU gemm_4bit_forward ...").

    Must run before bitsandbytes is first imported, directly or through peft / galore_torch.
    """
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
