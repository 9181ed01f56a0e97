"""Attention-only drop (He et al., 2024, "What Matters in Transformers? Not All Attention is Needed").

Importance of the attention sublayer of block l: 1 - mean over tokens of cos(X, X + Attn(N(X))),
its residual-stream input against its output, measured once on calibration tokens. The sublayers
with the lowest importance (highest similarity) are dropped in one shot; MLPs are all kept.

Design choices, recorded on the compression card:
- Budget. Removing k blocks is matched by dropping `attention_per_block` x k attention sublayers
  (default 2). Parameters cannot be matched: an attention sublayer of SmolLM2-135M holds 0.55M of
  a block's 3.2M parameters, so matching 6 blocks would need 35 of its 30 attention sublayers.
- Checkpoint. A plain LLaMA/Qwen/Mistral config cannot express a block without attention, so a
  dropped sublayer is stored with ALL-ZERO q/k/v/o weights (and biases): its output is exactly
  zero, the model computes what the method intends, and it reloads in plain transformers. But
  the depth, the file size and the speed are unchanged: the zeroed attention is still computed.
  `effective` parameter counts leave the zeroed tensors out; throughput does not improve.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from depthkit.analysis.metrics import token_cosine
from depthkit.compress.base import CompressionMethod, CompressionOutcome, MethodOptions, option, register_method
from depthkit.compress.common import lowest, num_blocks
from depthkit.errors import require
from depthkit.models.adapters import get_adapter
from depthkit.models.blockwise import iterate_blocks

NO_SPEEDUP_WARNING = (
    "attention sublayers are zeroed, not removed: the checkpoint keeps its depth, size and speed "
    "(plain Hugging Face configs cannot express a block without attention)"
)


@torch.no_grad()
def attention_importance(model: PreTrainedModel, calib_ids: torch.Tensor, batch_size: int = 8) -> list[float]:
    """1 - cos(attention sublayer input, its residual output) for every block."""
    adapter = get_adapter(model)
    captured: list[torch.Tensor] = []
    hooks = [adapter.block(layer).post_attention_norm.register_forward_pre_hook(
        lambda _module, args: captured.append(args[0])) for layer in adapter.layers(model)]
    scores = []
    try:
        blocks = iterate_blocks(model, calib_ids, batch_size)
        for _index, block_in, _block_out in tqdm(blocks, total=num_blocks(model), desc="attn_drop", leave=False):
            scores.append(float(1 - token_cosine(block_in, torch.cat(captured)).mean()))
            captured.clear()
    finally:
        for hook in hooks:
            hook.remove()
    return scores


@torch.no_grad()
def zero_attention(model: PreTrainedModel, index: int) -> None:
    """Make block `index`'s attention output exactly zero (weights and biases of q, k, v, o)."""
    parts = get_adapter(model).block(get_adapter(model).layers(model)[index])
    for proj in (parts.q_proj, parts.k_proj, parts.v_proj, parts.o_proj):
        proj.weight.zero_()
        if proj.bias is not None:
            proj.bias.zero_()


@dataclass
class AttentionDropOptions(MethodOptions):
    attention_per_block: float = option(2.0, "attention sublayers dropped per requested block (default 2)")


@register_method("attn_drop")
class AttentionDrop(CompressionMethod):
    description = "drop (zero) the attention sublayers closest to identity; depth and speed unchanged"
    options_class = AttentionDropOptions

    def compress(self, model: PreTrainedModel, calib_ids: torch.Tensor, num_remove: int) -> CompressionOutcome:
        per_block = self.settings.attention_per_block
        depth = num_blocks(model)
        count = round(per_block * num_remove)
        require(1 <= count < depth, f"attn_drop would drop {count} of {depth} attention sublayers "
                                    f"({per_block} per block x {num_remove}); lower attention_per_block or the ratio")
        scores = attention_importance(model, calib_ids, self.settings.batch_size)
        dropped = lowest(scores, count)
        for index in dropped:
            zero_attention(model, index)
        return CompressionOutcome({
            "dropped_attention": dropped,
            "attention_per_block": per_block,
            "attention_importance": scores,
            "warning": NO_SPEEDUP_WARNING,
        })
