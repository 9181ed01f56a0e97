"""Layer flattening: several adjacent blocks become ONE standard block of wider width.

Blocks `l .. l+k-1` computed in parallel on the same input,
`y = x + sum_i A_i(N_i x)`, `z = y + sum_i M_i(P_i y)`, are exactly one standard block whose
attention has the heads of all k blocks and whose MLP has all their neurons:

- RMSNorm's scale depends on its input alone, so each block's norm gain (`w`, or `1 + w` for
  Gemma) folds into the input columns of the projections that read it (query/key/value for N_i,
  gate/up for P_i); the merged block's norms get gain 1.
- q heads and KV groups are concatenated block after block, so head j of block i still reads
  its own KV group (GQA grouping is preserved because every block has the same group size).
- the output projections (`attn_out`, `mlp_out`) are concatenated along their input; their biases add up.

Exact for pre-norm blocks (LLaMA, Mistral, Qwen2; Qwen3 and Gemma 3 when their q/k norm gains
agree). Two parts cannot be exact in a standard block and are approximated, then repaired by the
least-squares step (`prune.py`), which records the error before and after per block:
- per-head q/k norm gains that differ between the blocks (RoPE acts after them, so they cannot
  be folded): their mean (`qk_norm="average"`, the default);
- post-norms on each branch's output (Gemma 2/3): a sum of normalised branches is not one
  normalised branch (`_post_norm_merge`).

The wide block is a normal Hugging Face decoder layer (a copy of the first block sharing the
model config) whose Linear modules are simply larger: the attention forward reshapes with
`-1` heads and `num_key_value_groups` is unchanged, so no attribute needs patching.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn
from transformers import PreTrainedModel

from depthkit.errors import DepthkitError, require
from depthkit.models.adapters import ATTENTION_INPUTS, MLP_INPUTS, BlockParts, get_adapter

# How the per-head q/k norm gains of different blocks are merged (see `_merged_qk_gain`).
QK_NORM_MODES = ("exact", "average")
QK_NORM_DEFAULT = "average"  # the one default of the knob (FlattenOptions and every function take it)


def _folded_weight(linear: nn.Linear, gain: torch.Tensor) -> torch.Tensor:
    """The weight of `linear` with the preceding norm's gain folded into its input columns."""
    return linear.weight.detach().float() * gain[None, :]


def _new_linear(weight: torch.Tensor, bias: torch.Tensor | None, like: nn.Linear) -> nn.Linear:
    """A Linear holding `weight` (out, in) and `bias`, in the dtype/device of `like`."""
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    linear = linear.to(device=like.weight.device, dtype=like.weight.dtype)
    with torch.no_grad():
        linear.weight.copy_(weight)
        if bias is not None:
            linear.bias.copy_(bias)
    return linear


def _stack_rows(linears: list[nn.Linear], gains: list[torch.Tensor]) -> nn.Linear:
    """Concatenate output rows (heads / neurons) of projections that read normed inputs."""
    weight = torch.cat([_folded_weight(lin, gain) for lin, gain in zip(linears, gains)], dim=0)
    biases = [lin.bias for lin in linears]
    bias = torch.cat([b.detach().float() for b in biases]) if biases[0] is not None else None
    return _new_linear(weight, bias, linears[0])


def _stack_columns(linears: list[nn.Linear], row_scales: list[torch.Tensor] | None = None) -> nn.Linear:
    """Concatenate input columns of output projections; their outputs (and biases) add up,
    each first scaled per output channel by `row_scales` (post-norm gains, see `_post_norm_merge`)."""
    scales = row_scales or [torch.ones(linears[0].out_features)] * len(linears)
    weight = torch.cat([lin.weight.detach().float() * s[:, None] for lin, s in zip(linears, scales)], dim=1)
    bias = None
    if linears[0].bias is not None:
        bias = sum(lin.bias.detach().float() * s for lin, s in zip(linears, scales))
    return _new_linear(weight, bias, linears[0])


def _post_norm_merge(gains: list[torch.Tensor]) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Row scales of each branch's output projection and the merged post-norm gain (APPROXIMATE).

    Blocks i compute `g_i * u_i / rms(u_i)`; one merged block can only compute `G * v / rms(v)`
    for `v = sum_i s_i * u_i`. With `s_i = g_i / mean(g)` and `G = sqrt(k) * mean(g)` the merge
    is exact for one block and, for branches of equal rms and orthogonal outputs, exact in scale;
    the least-squares step then refits the output projection and G on calibration data.
    """
    mean = torch.stack(gains).mean(0)
    safe = torch.where(mean.abs() < 1e-6, torch.full_like(mean, 1e-6), mean)
    return [g / safe for g in gains], safe * math.sqrt(len(gains))


def _merged_qk_gain(gains: list[torch.Tensor], mode: str) -> torch.Tensor:
    """One per-head norm gain for the q/k norms (Qwen3, Gemma 3) of all merged blocks.

    The gain scales each head dimension after normalisation and before RoPE; RoPE rotates
    dimension pairs, so it cannot be folded into a projection and one shared gain can only be
    exact when the blocks' gains agree. `exact` refuses otherwise; `average` takes the mean
    (an approximation that the least-squares compensation partly repairs).
    """
    if all(torch.allclose(g, gains[0]) for g in gains[1:]):
        return gains[0]
    if mode == "average":
        return torch.stack(gains).mean(0)
    raise DepthkitError(
        "these blocks have different q/k norm weights, so flattening them is not exact; "
        "pass qk_norm='average' to accept an approximation repaired by the least-squares step"
    )


def same_attention(model: PreTrainedModel, layers: list[nn.Module]) -> bool:
    """Whether the blocks share one attention type (a sliding-window block never merges with a full one)."""
    adapter = get_adapter(model)
    return len({adapter.layer_type(layer, model.config) for layer in layers}) == 1


def flatten_layers(model: PreTrainedModel, layers: list[nn.Module], qk_norm: str = QK_NORM_DEFAULT) -> nn.Module:
    """One wide decoder layer computing `layers` in parallel (exact, see the module docstring)."""
    require(len(layers) >= 2, "flattening needs at least two blocks")
    require(qk_norm in QK_NORM_MODES, f"qk_norm must be one of {', '.join(QK_NORM_MODES)}, got '{qk_norm}'")
    adapter = get_adapter(model)
    types = {adapter.layer_type(layer, model.config) for layer in layers}
    require(len(types) == 1, f"cannot flatten blocks with different attention types {sorted(types)}")
    parts: list[BlockParts] = [adapter.block(layer) for layer in layers]
    # Share the config (attention implementation, layer types) instead of copying it.
    merged = copy.deepcopy(layers[0], memo={id(model.config): model.config})
    gains = {role: [adapter.norm_gain(p.role(role)) for p in parts] for role in ("attn_norm", "mlp_norm")}
    for role in ATTENTION_INPUTS:
        adapter.replace_part(merged, role, _stack_rows([p.role(role) for p in parts], gains["attn_norm"]))
    for role in MLP_INPUTS:
        adapter.replace_part(merged, role, _stack_rows([p.role(role) for p in parts], gains["mlp_norm"]))
    post_gains = {}
    for role, post in (("attn_out", "attn_post_norm"), ("mlp_out", "mlp_post_norm")):
        scales = None
        if parts[0].role(post) is not None:
            scales, post_gains[post] = _post_norm_merge([adapter.norm_gain(p.role(post)) for p in parts])
        adapter.replace_part(merged, role, _stack_columns([p.role(role) for p in parts], scales))
    merged_parts = adapter.block(merged)
    adapter.set_norm_gain(merged_parts.attn_norm, 1.0)
    adapter.set_norm_gain(merged_parts.mlp_norm, 1.0)
    for post, gain in post_gains.items():
        adapter.set_norm_gain(merged_parts.role(post), gain)
    for role in ("q_norm", "k_norm"):
        if merged_parts.role(role) is not None:
            gain = _merged_qk_gain([adapter.norm_gain(p.role(role)) for p in parts], qk_norm)
            adapter.set_norm_gain(merged_parts.role(role), gain)
    return merged


def block_widths(model: PreTrainedModel, layer: nn.Module) -> tuple[int, int]:
    """(KV groups, MLP neurons) of a possibly wide block, from its weight shapes."""
    adapter = get_adapter(model)
    parts = adapter.block(layer)
    return parts.key.weight.shape[0] // adapter.head_dim(model.config), parts.mlp_out.weight.shape[1]
