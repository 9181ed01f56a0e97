"""Run a model whose attention-dropped sublayers are really skipped (attention drop's runtime).

A plain Hugging Face config cannot express a block without attention, so attention drop saves a
checkpoint whose dropped sublayers have all-zero projections: exactly the intended model, but
every zero is still multiplied and cached. `skip_zeroed_attention` replaces such a sublayer by
`SkippedAttention`, which returns zeros without computing anything and caches no keys or values,
so the speed and the KV cache of the dropped model are measured for real. The logits are the
same (an all-zero attention adds exactly zero to the residual stream).

The cache still needs to know how many tokens it holds (transformers reads the sequence length from
the first layer's keys), so a skipped layer stores a 1 x 1 placeholder per token and head instead of
`num_kv_heads x head_dim` keys and values.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import PreTrainedModel

from depthkit.models.adapters import ATTENTION_PROJECTIONS, get_adapter


class SkippedAttention(nn.Module):
    """An attention sublayer that was dropped: adds nothing, computes nothing, caches a placeholder."""

    def __init__(self, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> tuple[torch.Tensor, None]:
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        if cache is not None:
            batch, tokens = hidden_states.shape[:2]
            placeholder = hidden_states.new_zeros(batch, 1, tokens, 1)
            cache.update(placeholder, placeholder, self.layer_idx)
        return torch.zeros_like(hidden_states), None


def is_zeroed_attention(model: PreTrainedModel, layer: nn.Module) -> bool:
    """True when every weight and bias of `layer`'s query, key, value and output projections is zero."""
    parts = get_adapter(model).block(layer)
    return all(not bool(param.detach().any())
               for role in ATTENTION_PROJECTIONS for param in parts.role(role).parameters())


def skip_zeroed_attention(model: PreTrainedModel) -> list[int]:
    """Replace every all-zero attention sublayer of `model` by `SkippedAttention`; their indices.

    For evaluation and serving only: the model then cannot be compressed or saved as a plain
    checkpoint again (reload the checkpoint for that).
    """
    adapter = get_adapter(model)
    skipped = []
    for index, layer in enumerate(adapter.layers(model)):
        attention = adapter.attention_module(layer)
        if isinstance(attention, SkippedAttention) or not is_zeroed_attention(model, layer):
            continue
        adapter.replace_part(layer, "attention", SkippedAttention(attention.layer_idx))
        skipped.append(index)
    return skipped
