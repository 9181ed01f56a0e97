"""LoRA adapters on every projection of the decoder blocks, and merging them back.

Recovery after depth compression has to repair every surviving block (their inputs changed), so
LoRA goes on all seven projections of each block (q/k/v/o, gate/up/down) and nowhere else: not
the embeddings or the head, which compression does not touch.

Adapter weights are kept in float32 even when the frozen base is bfloat16 (peft's
`autocast_adapter_dtype`): with bf16's 8-bit mantissa an Adam update smaller than ~0.4% of a
weight is rounded away, so bf16 adapters lag at small learning rates (measured on a tiny LLaMA,
100 steps at lr 1e-4: loss 5.279 with bf16 adapters, 5.253 with fp32 adapters on the bf16 base,
5.244 all-fp32). The bf16 base itself is stable: gradients flow through it in bf16 and fp32
adapters track all-fp32 training (a test checks this). Merging folds the fp32 delta into the
base weights once, in float32, then rounds to the base dtype.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import PreTrainedModel

from depthkit.models.adapters import get_adapter

ADAPTER = "default"  # peft's name for the one adapter attached here
PEFT_PREFIX = "base_model.model."  # what peft puts before the wrapped model's own parameter names


def attach_lora(model: PreTrainedModel, rank: int = 8, alpha: float | None = None,
                dropout: float = 0.0) -> PeftModel:
    """Freeze `model` and wrap it with fp32 LoRA adapters of `rank` on every block projection."""
    targets = get_adapter(model).projection_pattern(model)  # every block projection, by role
    config = LoraConfig(r=rank, lora_alpha=alpha if alpha is not None else 2 * rank, lora_dropout=dropout,
                        target_modules=targets, bias="none", task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, config, autocast_adapter_dtype=True)
    for name, param in peft_model.named_parameters():
        if param.requires_grad and param.dtype != torch.float32:  # autocast covers bf16/fp16 only
            raise AssertionError(f"LoRA parameter {name} is {param.dtype}, expected float32")
    return peft_model


def merged_state_dict(peft_model: PeftModel, state: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The plain model's weights with every adapter folded in: W + (alpha / r) B A, in W's dtype.

    Computed from a full state dict (by default the model's own) rather than by merging modules in
    place: under FSDP or DeepSpeed ZeRO-3 each process holds only shards of the modules, so the
    trainer passes `accelerator.get_state_dict(model)`, which gathers them on the main process.
    """
    config = peft_model.peft_config[ADAPTER]
    scaling = config.lora_alpha / (math.sqrt(config.r) if config.use_rslora else config.r)
    state = peft_model.state_dict() if state is None else state
    merged = {}
    for key, tensor in state.items():
        if ".lora_" in key:
            continue
        if key.endswith(".base_layer.weight"):
            stem = key.removesuffix(".base_layer.weight")
            lora_a, lora_b = state[f"{stem}.lora_A.{ADAPTER}.weight"], state[f"{stem}.lora_B.{ADAPTER}.weight"]
            tensor = (tensor.float() + scaling * (lora_b.float() @ lora_a.float())).to(tensor.dtype)
        merged[key.removeprefix(PEFT_PREFIX).replace(".base_layer.", ".")] = tensor.detach()
    return merged


def save_merged(peft_model: PeftModel, folder: str | Path, state: dict[str, torch.Tensor] | None = None) -> None:
    """Save the merged model (`merged_state_dict`) as a plain transformers checkpoint."""
    peft_model.get_base_model().save_pretrained(folder, state_dict=merged_state_dict(peft_model, state))


def trainable_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
