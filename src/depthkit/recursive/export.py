"""Looped checkpoints that travel: one folder that plain `transformers` loads with remote code.

The folder holds `config.json` (model type `depthkit_looped`, an `auto_map` to the modeling file
copied beside it, the base model's config and the loop described explicitly: layer order, cache
slots, connector and adapter shapes, where each part sits in a block), every weight in
`model.safetensors` under the names of `RecursiveModel.state_dict()`, the tokenizer, and depthkit's
own `recursive_config.json`. There is no `base/` subfolder any more, so no part of the folder loads
as a plain (non-looped) model with other logits.
"""

from __future__ import annotations

import shutil
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import save_file

from depthkit.errors import require
from depthkit.models.adapters import NORM_ROLES, PROJECTION_ROLES, module_prefix
from depthkit.models.loading import looped_config

MODELING_FILE = Path(__file__).with_name("modeling_depthkit_looped.py")
WEIGHTS = "model.safetensors"
AUTO_MAP = {"AutoConfig": "modeling_depthkit_looped.DepthkitLoopedConfig",
            "AutoModelForCausalLM": "modeling_depthkit_looped.DepthkitLoopedForCausalLM"}


def loop_spec(model: torch.nn.Module) -> dict:
    """Everything the standalone modeling file needs to rebuild a `RecursiveModel`'s loop around its base."""
    config, adapter, base = model.config, model.adapter, model.base
    require(config.num_modalities == 1, "a looped model with several modalities is a VLM, not a causal LM checkpoint")
    layout = asdict(adapter.layout)
    layers = adapter.layers(base)
    return {
        "prelude": config.prelude, "block": config.block, "coda": config.coda, "order": config.order,
        "num_loops": config.num_loops, "residual": config.residual,
        "connector": None if model.connector is None else {
            "positions": model.connector.positions, "relative": model.connector.relative,
            "projection": config.projection, "fuse": config.fuse, "eps": model.connector.norms[0].eps},
        "adapters": {
            "relax": {key: lora_shape(lora) for key, lora in model.adapters.relax.items()},
            "shared": {key: lora_shape(lora) for key, lora in model.adapters.shared.items()},
            "norms": {key: weight.numel() for key, weight in model.adapters.norms.items()},
            "norm_offset": adapter.norm_offset},
        "parts": {
            "layers": module_prefix(base, layers), "rotary": module_prefix(base, adapter.rotary_embedding(base)),
            "final_norm": module_prefix(base, adapter.final_norm(base)), "attention": layout["attention"],
            "projections": {role: layout[role] for role in PROJECTION_ROLES if layout[role]},
            "norms": {role: layout[role] for role in NORM_ROLES if layout[role]}},
        "layer_types": [adapter.layer_type(layer, base.config) for layer in layers],
        "attention": base.config._attn_implementation,
    }


def lora_shape(lora: torch.nn.Module) -> list:
    """The arguments that rebuild a LoRA module: rank, in and out features, scaling, bias."""
    return [lora.lora_A.shape[0], lora.lora_A.shape[1], lora.lora_B.shape[0], lora.scaling, lora.bias is not None]


def write_portable(model: torch.nn.Module, folder: Path, exit_threshold: float | None = None,
                   exit_rule: str = "kl") -> None:
    """A `RecursiveModel`'s `config.json`, `model.safetensors` and the modeling file into `folder`.

    `exit_threshold` (with `exit_rule`) turns the remote code's per-token early exit on by default for
    whoever loads the folder; None leaves it off (every token runs all R steps), as depthkit's default.
    """
    from depthkit.recursive.modeling_depthkit_looped import EXIT_RULES, DepthkitLoopedConfig

    require(exit_threshold is None or exit_threshold >= 0, f"exit threshold must be >= 0, got {exit_threshold}")
    require(exit_rule in EXIT_RULES, f"unknown exit rule '{exit_rule}'; choose from {', '.join(EXIT_RULES)}")
    base_config = model.base.config
    config = DepthkitLoopedConfig(
        base_config=base_config.to_dict(), loop=loop_spec(model), auto_map=AUTO_MAP,
        exit_threshold=exit_threshold, exit_rule=exit_rule,
        architectures=["DepthkitLoopedForCausalLM"], vocab_size=base_config.vocab_size,
        bos_token_id=base_config.bos_token_id, eos_token_id=base_config.eos_token_id,
        pad_token_id=getattr(base_config, "pad_token_id", None), tie_word_embeddings=False,
        # one KV-cache layer per layer application, so `generate`'s own cache has a slot for each
        num_hidden_layers=model.num_slots(model.config.num_loops),
        dtype=str(next(model.base.parameters()).dtype).removeprefix("torch."))
    config.save_pretrained(folder)
    model.base.generation_config.save_pretrained(folder)
    save_file(unshared_state(model), str(folder / WEIGHTS), metadata={"format": "pt"})
    shutil.copyfile(MODELING_FILE, folder / MODELING_FILE.name)


def saved_exit(folder: str | Path) -> tuple[float | None, str | None]:
    """The early-exit default (threshold, rule) that `write_portable` saved into `folder`'s `config.json`;
    (None, None) where the folder has none (a plain checkpoint, an older depthkit folder, not a folder)."""
    from depthkit.recursive.modeling_depthkit_looped import EXIT_RULES

    config = looped_config(folder)
    if config is None:
        return None, None
    threshold, rule = config.get("exit_threshold"), config.get("exit_rule", "kl")
    path = Path(folder) / "config.json"
    require(threshold is None or (isinstance(threshold, (int, float)) and not isinstance(threshold, bool)
                                  and 0 <= threshold < float("inf")),
            f"{path}: exit_threshold must be null or a number >= 0, got {threshold!r}")
    require(rule in EXIT_RULES, f"{path}: unknown exit_rule {rule!r}; choose from {', '.join(EXIT_RULES)}")
    return (None if threshold is None else float(threshold)), rule


def unshared_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The state dict with tensors that share memory (tied embeddings) stored once each."""
    seen: set[int] = set()
    state = {}
    for key, value in model.state_dict().items():
        pointer = value.untyped_storage().data_ptr()
        state[key] = value.detach().clone().contiguous() if pointer in seen else value.detach().contiguous()
        seen.add(pointer)
    return state
