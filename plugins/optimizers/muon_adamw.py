"""Two optimizers behind one ``torch.optim.Optimizer``: torch's Muon for the 2-D hidden weights,
AdamW for the rest (``muon`` plugin).

torch.optim.Muon accepts only 2-D parameters, so embeddings, heads, norms and biases need a second
optimizer. To the training loop, LR schedulers and checkpoints this is one optimizer:
``param_groups`` is the Muon groups followed by the AdamW groups (the very dicts the two use, so a
scheduler setting ``lr`` drives both), ``state`` shows every parameter's state, ``step()`` and
``zero_grad()`` act on both, ``state_dict()`` holds both, under "muon" and "adamw".

Imported only from inside plugin methods (it imports torch).
"""

from __future__ import annotations

from typing import Any

import torch


class MuonWithAdamW(torch.optim.Optimizer):
    def __init__(self, muon: torch.optim.Optimizer, adamw: torch.optim.Optimizer):
        params = [p for inner in (muon, adamw) for group in inner.param_groups for p in group["params"]]
        super().__init__(params, {})
        self.muon = muon
        self.adamw = adamw
        self._link()

    def _link(self) -> None:
        """Expose the inner groups and states as this optimizer's. The per-parameter state dicts
        are shared (live); re-linked after each step (new entries) and load (new dicts)."""
        self.param_groups = self.muon.param_groups + self.adamw.param_groups
        self.state.clear()
        for inner in (self.muon, self.adamw):
            self.state.update(inner.state)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.muon.step()
        self.adamw.step()
        self._link()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.muon.zero_grad(set_to_none=set_to_none)
        self.adamw.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if hasattr(self, "adamw"):
            raise NotImplementedError("muon: add parameters to .muon (2-D only) or .adamw instead")
        super().add_param_group(param_group)

    def state_dict(self) -> dict[str, Any]:
        return {"muon": self.muon.state_dict(), "adamw": self.adamw.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.muon.load_state_dict(state_dict["muon"])
        self.adamw.load_state_dict(state_dict["adamw"])
        self._link()
