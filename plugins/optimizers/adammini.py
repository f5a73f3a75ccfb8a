"""``adam-mini``: Adam-mini (the adam-mini package's ``Adam_mini``), Adam with one second-moment
value per block (attention head, output neuron, token embedding row, whole norm) instead of one
per weight: about half of AdamW's state.

Adam-mini partitions the weights by their names and needs the model's width and head counts; they
come from the model's config (hidden_size / num_attention_heads / num_key_value_heads, or GPT-2's
n_embd / n_head), never from a user setting, so they always match the weights. lowmem adjusts
three things after constructing it, all commented below: the world size it reads from
torch.cuda.device_count(), its own weight-decay rule, and 1-D weights its name rules would send
to a per-row block (RoBERTa's "attention.output.LayerNorm.weight" contains "output": it crashes).
"""

from __future__ import annotations

from typing import Any

import lowmem
from lowmem.plugins.optimizers import plugin_config
from lowmem.plugins.optimizers.extras import check_number, model_dims, whole_or_per_layer

# Adam_mini's defaults.
ADAM_MINI_DEFAULTS: dict[str, Any] = {"betas": [0.9, 0.999], "eps": 1e-8, "per_layer": False}
# A group name that matches none of Adam-mini's name rules: its one-value-per-tensor block, the
# one it intends for norm weights.
SINGLE_BLOCK_NAME = "1-d tensor"


@lowmem.hookimpl
def register_optimizers(register):
    register(AdamMini())


def block_kind(optimizer: Any, name: str) -> str:
    """Which branch of Adam_mini.step updates the group called ``name``, by the optimizer's own name
    sets and in its order: "adam" (biases: full moments), "heads" (query/key: one value per head),
    "rows" (embeddings, output, value, attention output, MLP: one per row), else "single"."""
    def has(names):
        return any(part in name for part in names)

    if has(optimizer.adam_block_names):
        return "adam"
    if has(optimizer.wqk_names):
        return "heads"
    if has(optimizer.embd_names | optimizer.output_names | optimizer.wv_names | optimizer.mlp_names
           | optimizer.attn_proj_names):
        return "rows"
    return "single"


def make_adam_mini(named: list[tuple[str, Any]], model: Any, settings: lowmem.OptimizerSettings,
                   config: dict[str, Any], decay: dict[int, float]) -> Any:
    """Adam_mini over ``named`` (name, parameter) pairs, adjusted for lowmem."""
    from adam_mini import Adam_mini

    dim, heads, kv_heads = model_dims(model)
    optimizer = Adam_mini(named, lr=settings.lr, betas=tuple(config["betas"]), eps=config["eps"],
                          weight_decay=settings.weight_decay, dim=dim, n_heads=heads, n_kv_heads=kv_heads,
                          verbose=False)
    # Adam_mini sets world_size = torch.cuda.device_count() and, above 1, all-gathers and
    # all-reduces statistics of whole-tensor blocks, for sharded training (FSDP / ZeRO). lowmem
    # never shards: every process holds every parameter and DDP has already averaged the
    # gradients. On a CPU this is 0, but a single process on a multi-GPU machine would call
    # collectives without a process group (and its CPU path moves tensors to CUDA).
    optimizer.world_size = 1
    for group in optimizer.param_groups:
        p = group["params"][0]
        # Adam_mini exempts names containing "norm", "ln" or "bias" from decay; lowmem's rule
        # (decay.py, with decay_norms_and_biases) decides instead.
        group["weight_decay"] = decay[id(p)]
        kind = block_kind(optimizer, group["name"])
        if p.dim() < 2 and kind in ("heads", "rows"):
            # These branches view the tensor as rows (mean over dim 1): a 1-D weight crashes there.
            group["name"] = SINGLE_BLOCK_NAME
        elif kind == "heads" and p.numel() % optimizer.head_numel:
            raise lowmem.ConfigError(
                f"adam-mini: {group['name']} {tuple(p.shape)} does not split into heads of hidden_size^2 / "
                f"num_attention_heads = {optimizer.head_numel} elements; the model's config does not match "
                "its attention weights"
            )
    return optimizer


class AdamMini(lowmem.Optimizer):
    name = "adam-mini"
    description = "Adam-mini: Adam with one second-moment value per head / neuron / block"
    default_config = dict(ADAM_MINI_DEFAULTS)

    def check_config(self, config):
        betas = config["betas"]
        if len(betas) != 2 or not all(isinstance(b, int | float) and 0 <= b < 1 for b in betas):
            raise lowmem.ConfigError(f"'betas' must be two numbers in [0, 1), got {betas!r}")
        check_number(config, "eps", 0.0)

    def build_inner(self, model, settings):
        """(per-layer groups, make_optimizer, config, the whole model's one group) for
        whole_or_per_layer."""
        from lowmem.plugins.optimizers.decay import decay_groups, trainable_named_parameters

        config = plugin_config(self, settings)
        named = trainable_named_parameters(model)
        if not named:
            raise lowmem.ConfigError("the model has no trainable parameters")
        groups = decay_groups(model, named, settings.weight_decay, settings.decay_norms_and_biases)
        decay = {id(p): group["weight_decay"] for group in groups for p in group["params"]}
        name_of = {id(p): n for n, p in named}

        def make_optimizer(param_groups):
            # Adam_mini takes (name, parameter) pairs and makes one group per parameter itself.
            pairs = [(name_of[id(p)], p) for group in param_groups for p in group["params"]]
            return make_adam_mini(pairs, model, settings, config, decay)

        # Whole: one Adam_mini over every parameter in model order (its groups are per parameter).
        return groups, make_optimizer, config, [{"params": [p for _, p in named]}]

    def build(self, model, settings):
        groups, make_optimizer, config, whole = self.build_inner(model, settings)
        return whole_or_per_layer(settings, config, groups if config["per_layer"] else whole, make_optimizer)

    def state_bytes(self, model, settings):
        """Per parameter, in its dtype: a first moment like it, plus the second moment of its
        block kind: like it ("adam"), one per head ("heads"), one per row ("rows") or one
        ("single"). Found by building Adam_mini itself (no memory: groups only), so the
        partition is the package's own."""
        _, make_optimizer, _, whole = self.build_inner(model, settings)
        optimizer = make_optimizer(whole)
        total = 0
        for group in optimizer.param_groups:
            p = group["params"][0]
            kind = block_kind(optimizer, group["name"])
            second = {"adam": p.numel(), "heads": p.numel() // max(optimizer.head_numel, 1),
                      "rows": p.shape[0] if p.dim() else 1, "single": 1}[kind]
            total += (p.numel() + second) * p.element_size()
        return total
