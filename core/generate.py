"""``lowmem generate``: a finished run's exported model answers a prompt, formatted the way the
run trained (the chat template for chat data), so a user can see that a finetune worked."""

from __future__ import annotations

import json
from pathlib import Path

from lowmem.api import CAUSAL_LM, CHAT
from lowmem.errors import ConfigError
from lowmem.text import first_line


def read_messages(path: Path) -> list[dict[str, str]]:
    """A JSON list of {role, content} (or an object holding one under "messages"), ending with a
    turn the model should answer."""
    from lowmem.plugins.datasets.layouts import ROLES

    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path}: not a readable JSON file ({first_line(exc)})") from None
    if isinstance(data, dict):
        data = data.get("messages")
    if not isinstance(data, list) or not data:
        raise ConfigError(f"{path}: expected a non-empty JSON list of {{role, content}} messages")
    for turn in data:
        well_formed = isinstance(turn, dict) and isinstance(turn.get("content"), str)
        if not well_formed or turn.get("role") not in ROLES:
            raise ConfigError(f"{path}: each message needs a role ({', '.join(ROLES)}) and a string content, "
                              f"got {turn!r}")
    return [{"role": t["role"], "content": t["content"]} for t in data]


def generate(run_dir: Path, prompt: str | None, messages: list[dict[str, str]] | None,
             max_new_tokens: int) -> str:
    """The model's greedy continuation, decoded, without the prompt."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lowmem import examples

    model_dir = run_dir / "model"
    config_file = run_dir / "config.json"
    if not (model_dir / "config.json").is_file() or not config_file.is_file():
        raise ConfigError(f"{run_dir}: no exported model (model/config.json): not a finished lowmem run")
    run = json.loads(config_file.read_text(encoding="utf-8"))
    if run.get("objective") != CAUSAL_LM:
        raise ConfigError(f"{run_dir}: generate needs a causal language model; this run trained "
                          f"{run.get('objective')!r}")
    trust = bool(run.get("trust_remote_code"))
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir), trust_remote_code=trust)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), trust_remote_code=trust)
    model.eval()
    if messages is None and run.get("data_kind") == CHAT:
        messages = [{"role": "user", "content": prompt or ""}]
    if messages is not None:
        text = examples.render(tokenizer, messages, generation_prompt=True)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    else:
        ids = examples.prompt_ids(tokenizer, prompt or "")
    import torch

    with torch.no_grad():
        mask = torch.ones(1, len(ids), dtype=torch.int64)
        output = model.generate(torch.tensor([ids]), attention_mask=mask, max_new_tokens=max_new_tokens,
                                do_sample=False,
                                pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    return str(tokenizer.decode(output[0, len(ids):], skip_special_tokens=True))
