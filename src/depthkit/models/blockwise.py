"""Run a decoder one block at a time: the primitives under the block runner (`models/runner.py`).

Calibration for analysis and compression needs each block's input and output on the same tokens.
Running the whole model once per block is quadratic; keeping every layer's activations is memory
hungry. Instead we keep ONE tensor of hidden states (all calibration sequences at the current
depth) and push it through the blocks in order: memory is one block plus its activations. Here:
the per-block context (positions, masks, rotary tables), one block over all sequences in chunks,
the embedding and the LM head of a model in memory.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from transformers import Cache, PretrainedConfig, PreTrainedModel
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

from depthkit.models.adapters import ArchitectureAdapter, accepts, get_adapter


def cache_keyword(function: Callable) -> str:
    """The name under which `function` (a decoder layer's forward, a mask builder) takes the KV cache.

    transformers renamed `past_key_values` to `cache` during v5 (5.24 warns that the old name goes in
    5.40); passing the name the installed version declares works on both sides of the rename.
    """
    return "cache" if accepts(function, "cache") else "past_key_values"


def cache_kwargs(layer: nn.Module, kv_cache: Cache | None) -> dict:
    """The KV-cache keyword arguments of one decoder layer call (the cache and whether to use it)."""
    return {cache_keyword(type(layer).forward): kv_cache, "use_cache": kv_cache is not None}


@dataclass
class BlockContext:
    """What a block needs besides its hidden states: positions, and per attention type (full or
    sliding window) its causal mask and rotary tables."""

    position_ids: torch.Tensor
    position_embeddings: dict[str, tuple[torch.Tensor, torch.Tensor]]
    masks: dict[str, torch.Tensor | None]
    adapter: ArchitectureAdapter
    config: PretrainedConfig

    def layer_kwargs(self, layer: nn.Module) -> dict:
        kind = self.adapter.layer_type(layer, self.config)
        if kind not in self.masks:
            kind = "full_attention"
        return {
            "attention_mask": self.masks[kind],
            "position_ids": self.position_ids,
            "position_embeddings": self.position_embeddings[kind],
        }


def block_context(model: PreTrainedModel, hidden: torch.Tensor, past_key_values: Cache | None = None) -> BlockContext:
    """Rotary embeddings and causal masks for hidden states of shape (batch, seq, dim).

    With `past_key_values` (incremental decoding), positions continue after the cached tokens.
    """
    adapter = get_adapter(model)
    past = past_key_values.get_seq_length() if past_key_values is not None else 0
    position_ids = torch.arange(past, past + hidden.shape[1], device=hidden.device).unsqueeze(0)
    # Masks are built for one sequence and broadcast over the batch: with eager attention (Gemma 2)
    # a materialised mask carries its batch size, and callers run chunks of any size with one context.
    mask_args = {"config": model.config, "inputs_embeds": hidden[:1], "attention_mask": None,
                 cache_keyword(create_causal_mask): past_key_values, "position_ids": position_ids}
    masks = {"full_attention": create_causal_mask(**mask_args)}
    if getattr(model.config, "sliding_window", None):
        masks["sliding_attention"] = create_sliding_window_causal_mask(**mask_args)
    tables = adapter.position_embeddings(model, hidden, position_ids)
    return BlockContext(position_ids, tables, masks, adapter, model.config)


@torch.no_grad()
def embed(model: PreTrainedModel, input_ids: torch.Tensor) -> torch.Tensor:
    """Input embeddings of token ids (the input of block 0)."""
    return get_adapter(model).embed_tokens(model)(input_ids)


@torch.no_grad()
def run_block(
    model: PreTrainedModel,
    layer: nn.Module,
    hidden: torch.Tensor,
    batch_size: int = 8,
    context: BlockContext | None = None,
) -> torch.Tensor:
    """Apply one block to every calibration sequence, `batch_size` sequences at a time."""
    outputs = []
    for start in range(0, hidden.shape[0], batch_size):
        chunk = hidden[start : start + batch_size]
        ctx = context if context is not None and context.position_ids.shape[1] == chunk.shape[1] else None
        ctx = ctx or block_context(model, chunk)
        outputs.append(layer(chunk, **ctx.layer_kwargs(layer)))
    return torch.cat(outputs)


@torch.no_grad()
def logits_from_hidden(model: PreTrainedModel, hidden: torch.Tensor) -> torch.Tensor:
    """Final norm and LM head applied to the last block's output."""
    adapter = get_adapter(model)
    return adapter.softcap(model.config, adapter.lm_head(model)(adapter.final_norm(model)(hidden)))
