"""GaLore with 8-bit bitsandbytes Adam states: a small replacement for galore_torch's AdamW8bit.

Why it exists: galore-torch 1.0's GaLoreAdamW8bit (a) calls torch.cuda.synchronize() after every
parameter, which raises on CPU torch and on CUDA torch without a GPU, and (b) passes
Optimizer2State's arguments positionally with the pre-0.45 signature, so on bitsandbytes >= 0.45
it silently runs with max_unorm=100 and skip_zeros=True. This class passes keywords only,
synchronises only where bitsandbytes itself does (CUDA/XPU tensors), and keeps the
projector state loadable with torch.load(weights_only=True).

Imported only from inside plugin methods (bitsandbytes is heavy).
"""

from __future__ import annotations

from lowmem.plugins.optimizers import quiet_bitsandbytes

quiet_bitsandbytes()

import torch  # noqa: E402
from bitsandbytes.optim.optimizer import Optimizer2State  # noqa: E402
from bitsandbytes.utils import sync_gpu  # noqa: E402

from lowmem.plugins.optimizers.galore8bit_checkpoint import for_these_slices, with_fp32_slices  # noqa: E402
from lowmem.plugins.optimizers.galore_common import ProjectorStateMixin, new_projector  # noqa: E402
from lowmem.plugins.optimizers.galore_sharded import WHOLE_MOMENT, on_local_shards  # noqa: E402


@on_local_shards  # FSDP: steps each process's slices (galore_sharded)
class GaLoreAdamW8bit(ProjectorStateMixin, Optimizer2State):
    """AdamW with blockwise 8-bit moments; groups with a ``rank`` key are GaLore-projected.
    eps (1e-8, bitsandbytes' and galore_torch's AdamW8bit default) is the same for every group:
    projected updates and plain ones go through the same bitsandbytes kernel."""

    projector_waits_for_gradient = True  # see _projected_step

    def __init__(self, params, lr: float, weight_decay: float = 0.0, min_8bit_size: int = 4096,
                 betas=(0.9, 0.999), eps: float = 1e-8):
        super().__init__(
            "adam",
            params,
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            optim_bits=8,
            min_8bit_size=min_8bit_size,
            max_unorm=0.0,
            skip_zeros=False,
            is_paged=False,
        )

    def get_config(self, gindex, pindex, group):
        config = super().get_config(gindex, pindex, group)
        whole = getattr(group["params"][pindex], WHOLE_MOMENT, None)
        if whole is not None and group["params"][pindex].numel() > 0:
            # An FSDP slice: bitsandbytes would compare the slice with min_8bit_size, so two
            # processes would keep in fp32 a moment that one process keeps in 8 bits (LoRA's
            # 8 x 512 factors at 4,096 elements, say). Decide on the whole moment instead.
            config["min_8bit_size"] = 0 if whole >= config["min_8bit_size"] else whole + 1
        return config

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if not self.initialized:
            self.check_overrides()
            self.to_gpu()
            self.initialized = True
        for gindex, group in enumerate(self.param_groups):
            for pindex, p in enumerate(group["params"]):
                if p.grad is None:
                    continue
                if "rank" in group:
                    self._projected_step(group, p, gindex, pindex)
                else:
                    if len(self.state[p]) == 0:
                        self.init_state(group, p, gindex, pindex)
                    self.update_step(group, p, gindex, pindex)
                sync_gpu(p)  # as bitsandbytes' own step does; a no-op on CPU
        return loss

    def _projected_step(self, group, p, gindex, pindex) -> None:
        state = self.state[p]
        if "projector" not in state:
            # An SVD of an all-zero gradient gives an arbitrary basis that would confine the
            # updates for update_proj_gap steps. LoRA's A factor has exactly zero gradient until
            # B leaves zero, so its projector (and its first step) waits for a real gradient.
            # Decoupled weight decay does not wait: a zero gradient makes Adam's update zero, and
            # GaLoreAdamW still decays the weight then.
            if not p.grad.any():
                if group["weight_decay"] > 0:
                    p.add_(p, alpha=-group["lr"] * group["weight_decay"])
                return
            state["projector"] = new_projector(group)
        low_rank_grad = state["projector"].project(p.grad, state.get("step", 0))
        # bitsandbytes updates a tensor in place from its .grad; give it a zero stand-in of the
        # low-rank shape, so afterwards the stand-in holds exactly -lr * Adam's update. The
        # stand-in shares p's state dict, so the moments live (low-rank) under p.
        update = torch.zeros_like(low_rank_grad)
        update.grad = low_rank_grad
        self.state[update] = state
        try:
            if "state1" not in state:
                self.init_state(group, update, gindex, pindex)
            # Weight decay inside the kernel acts on the zero stand-in, i.e. not at all; it is
            # applied to the full weight below, after the update, as GaLoreAdamW does.
            self.update_step(group, update, gindex, pindex)
        finally:
            del self.state[update]
        p.add_(state["projector"].project_back(update))
        if group["weight_decay"] > 0:
            p.add_(p, alpha=-group["lr"] * group["weight_decay"])

    def state_dict(self):
        # Under FSDP the 8-bit moments are checkpointed with fp32 copies, so that a checkpoint
        # loads into another number of processes (galore8bit_checkpoint).
        return with_fp32_slices(super().state_dict(), self)

    def load_state_dict(self, state_dict, *args, **kwargs):
        super().load_state_dict(for_these_slices(state_dict, self), *args, **kwargs)
        share_quantization_maps([self])


def share_quantization_maps(optimizers: list[torch.optim.Optimizer]) -> None:
    """Make every parameter state of ``optimizers`` use one pair of quantisation maps.

    The maps are constants, but each optimizer creates its own and load_state_dict deep-copies
    them; the per-layer mode would otherwise hold one pair per parameter."""
    maps: dict[str, torch.Tensor] = {}
    for optimizer in optimizers:
        for state in optimizer.state.values():
            for key, name in (("qmap1", "dynamic"), ("qmap2", "udynamic")):
                if key in state:
                    maps.setdefault(name, state[key])
    for optimizer in optimizers:
        for name in ("dynamic", "udynamic"):
            maps.setdefault(name, optimizer.name2qmap[name])  # type: ignore[attr-defined]
        optimizer.name2qmap.update(maps)  # type: ignore[attr-defined]
        for state in optimizer.state.values():
            for key, name in (("qmap1", "dynamic"), ("qmap2", "udynamic")):
                if key in state:
                    state[key] = maps[name]
