"""Layer flattening: several adjacent pre-norm blocks become ONE standard block of wider width.

Blocks `l .. l+k-1` computed in parallel on the same input,
`y = x + sum_i A_i(N_i x)`, `z = y + sum_i M_i(P_i y)`, are exactly one standard block whose
attention has the heads of all k blocks and whose MLP has all their neurons:

- RMSNorm's scale depends on its input alone, so each block's norm weight folds into the input
  columns of the projections that read it (q/k/v for N_i, gate/up for P_i); the merged block's
  norms get weight 1.
- q heads and KV groups are concatenated block after block, so head j of block i still reads
  its own KV group (GQA grouping is preserved because every block has the same group size).
- `o_proj` and `down_proj` are concatenated along their input; their biases add up.

The wide block is a normal Hugging Face decoder layer (a copy of the first block sharing the
model config) whose Linear modules are simply larger: the attention forward reshapes with
`-1` heads and `num_key_value_groups` is unchanged, so no attribute needs patching.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from transformers import PreTrainedModel

from depthkit.errors import DepthkitError, require
from depthkit.models.adapters import BlockParts, get_adapter

# How Qwen3's per-head q_norm/k_norm weights of different blocks are merged (see `_merged_qk_norm`).
QK_NORM_MODES = ("exact", "average")


def _folded_weight(linear: nn.Linear, norm: nn.Module | None) -> torch.Tensor:
    """The weight of `linear` with the preceding RMSNorm's scale folded into its input columns."""
    weight = linear.weight.detach().float()
    if norm is not None:
        weight = weight * norm.weight.detach().float()[None, :]
    return weight


def _new_linear(weight: torch.Tensor, bias: torch.Tensor | None, like: nn.Linear) -> nn.Linear:
    """A Linear holding `weight` (out, in) and `bias`, in the dtype/device of `like`."""
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    linear = linear.to(device=like.weight.device, dtype=like.weight.dtype)
    with torch.no_grad():
        linear.weight.copy_(weight)
        if bias is not None:
            linear.bias.copy_(bias)
    return linear


def _stack_rows(linears: list[nn.Linear], norms: list[nn.Module | None]) -> nn.Linear:
    """Concatenate output rows (heads / neurons) of projections that read normed inputs."""
    weight = torch.cat([_folded_weight(lin, norm) for lin, norm in zip(linears, norms)], dim=0)
    biases = [lin.bias for lin in linears]
    bias = torch.cat([b.detach().float() for b in biases]) if biases[0] is not None else None
    return _new_linear(weight, bias, linears[0])


def _stack_columns(linears: list[nn.Linear]) -> nn.Linear:
    """Concatenate input columns of output projections; their outputs (and biases) add up."""
    weight = torch.cat([lin.weight.detach().float() for lin in linears], dim=1)
    bias = sum(lin.bias.detach().float() for lin in linears) if linears[0].bias is not None else None
    return _new_linear(weight, bias, linears[0])


def _merged_qk_norm(norms: list[nn.Module], mode: str) -> torch.Tensor:
    """One per-head norm weight for Qwen3's q_norm/k_norm of all merged blocks.

    The weight scales each head dimension after normalisation and before RoPE; RoPE rotates
    dimension pairs, so it cannot be folded into a projection and one shared weight can only be
    exact when the blocks' weights agree. `exact` refuses otherwise; `average` takes the mean
    (an approximation that the least-squares compensation partly repairs).
    """
    weights = [norm.weight.detach().float() for norm in norms]
    if all(torch.allclose(w, weights[0]) for w in weights[1:]):
        return weights[0]
    if mode == "average":
        return torch.stack(weights).mean(0)
    raise DepthkitError(
        "these Qwen3 blocks have different q_norm/k_norm weights, so flattening them is not exact; "
        "pass qk_norm='average' to accept an approximation repaired by the least-squares step"
    )


def _reset_norm(norm: nn.Module, weight: torch.Tensor | None = None) -> None:
    with torch.no_grad():
        if weight is None:
            norm.weight.fill_(1.0)
        else:
            norm.weight.copy_(weight)


def flatten_layers(model: PreTrainedModel, layers: list[nn.Module], qk_norm: str = "exact") -> nn.Module:
    """One wide decoder layer computing `layers` in parallel (exact, see the module docstring)."""
    require(len(layers) >= 2, "flattening needs at least two blocks")
    require(qk_norm in QK_NORM_MODES, f"qk_norm must be one of {', '.join(QK_NORM_MODES)}, got '{qk_norm}'")
    types = {getattr(layer, "attention_type", None) for layer in layers}
    require(len(types) == 1, f"cannot flatten blocks with different attention types {sorted(map(str, types))}")
    adapter = get_adapter(model)
    parts: list[BlockParts] = [adapter.block(layer) for layer in layers]
    # Share the config (attention implementation, layer types) instead of copying it.
    merged = copy.deepcopy(layers[0], memo={id(model.config): model.config})
    attn, mlp = merged.self_attn, merged.mlp
    norms_in = [p.input_norm for p in parts]
    norms_post = [p.post_attention_norm for p in parts]
    attn.q_proj = _stack_rows([p.q_proj for p in parts], norms_in)
    attn.k_proj = _stack_rows([p.k_proj for p in parts], norms_in)
    attn.v_proj = _stack_rows([p.v_proj for p in parts], norms_in)
    attn.o_proj = _stack_columns([p.o_proj for p in parts])
    mlp.gate_proj = _stack_rows([p.gate_proj for p in parts], norms_post)
    mlp.up_proj = _stack_rows([p.up_proj for p in parts], norms_post)
    mlp.down_proj = _stack_columns([p.down_proj for p in parts])
    merged_parts = adapter.block(merged)
    _reset_norm(merged_parts.input_norm)
    _reset_norm(merged_parts.post_attention_norm)
    if merged_parts.q_norm is not None:
        _reset_norm(merged_parts.q_norm, _merged_qk_norm([p.q_norm for p in parts], qk_norm))
        _reset_norm(merged_parts.k_norm, _merged_qk_norm([p.k_norm for p in parts], qk_norm))
    return merged


def block_widths(model: PreTrainedModel, layer: nn.Module) -> tuple[int, int]:
    """(KV groups, MLP neurons) of a possibly wide block, from its weight shapes."""
    adapter = get_adapter(model)
    parts = adapter.block(layer)
    return parts.k_proj.weight.shape[0] // adapter.head_dim(model.config), parts.down_proj.weight.shape[1]
