"""lowmem's built-in plugins. They register through the same hooks a third party uses."""

# Registered in this order, before any entry point.
BUILT_IN_MODULES = (
    "lowmem.plugins.optimizers.baseline",
    "lowmem.plugins.optimizers.lora",
    "lowmem.plugins.optimizers.galore",
    "lowmem.plugins.optimizers.galore8bit",
    "lowmem.plugins.optimizers.lora_galore8bit",
    "lowmem.plugins.optimizers.adamw8bit",
    "lowmem.plugins.optimizers.adafactor",
    "lowmem.plugins.optimizers.apollo",
    "lowmem.plugins.optimizers.apollo_mini",
    "lowmem.plugins.optimizers.adammini",
    "lowmem.plugins.optimizers.muon",
    "lowmem.plugins.optimizers.lomo",
    "lowmem.plugins.optimizers.adalomo",
    "lowmem.plugins.models.llama",
    "lowmem.plugins.models.roberta",
    "lowmem.plugins.models.gpt2",
    "lowmem.plugins.models.auto",
    "lowmem.plugins.datasets.stdlib_docs",
    "lowmem.plugins.datasets.stdlib_topics",
    "lowmem.plugins.datasets.files",
    "lowmem.plugins.datasets.hub",
    "lowmem.plugins.datasets.glue",
)
