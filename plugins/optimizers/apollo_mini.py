"""``apollo-mini``: APOLLO-Mini, APOLLO at rank 1 with one scaling factor per tensor (the APOLLO
authors' preset: rank 1, scale_type tensor, scale 128, random projection). Same package and
extra as ``apollo`` (``pip install 'lowmem[apollo]'``); see apollo.py."""

from __future__ import annotations

from typing import Any

import lowmem
from lowmem.plugins.optimizers.apollo import APOLLO_DEFAULTS, Apollo

APOLLO_MINI_DEFAULTS: dict[str, Any] = {**APOLLO_DEFAULTS, "rank": 1, "scale_type": "tensor", "scale": 128.0}


@lowmem.hookimpl
def register_optimizers(register):
    register(ApolloMini())


class ApolloMini(Apollo):
    name = "apollo-mini"
    summary = "APOLLO-Mini: rank-1 APOLLO with tensor-wise scaling, SGD-like optimizer memory"
    default_config = dict(APOLLO_MINI_DEFAULTS)
