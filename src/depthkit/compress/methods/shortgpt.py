"""ShortGPT (Men et al., 2024, "ShortGPT: Layers in Large Language Models are More Redundant Than
You Expect"): remove the blocks with the lowest Block Influence.

Block Influence BI_l = 1 - mean over tokens of cos(block input, block output), measured once on
calibration tokens in the original model. The k blocks that change the hidden state least are
deleted in one shot (no re-measurement), which is what makes the method cheap: one forward pass.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from depthkit.analysis.metrics import block_influence
from depthkit.compress.base import CompressionMethod, CompressionOutcome, register_method
from depthkit.compress.common import lowest, num_blocks, remove_blocks
from depthkit.models.blockwise import iterate_blocks


@torch.no_grad()
def block_influences(model: PreTrainedModel, calib_ids: torch.Tensor, batch_size: int = 8) -> list[float]:
    """Block Influence of every block on `calib_ids`, one block's activations in memory at a time."""
    blocks = iterate_blocks(model, calib_ids, batch_size)
    return [block_influence(block_in, block_out)
            for _i, block_in, block_out in tqdm(blocks, total=num_blocks(model), desc="shortgpt", leave=False)]


@register_method("shortgpt")
class ShortGPT(CompressionMethod):
    description = "drop the k blocks with the lowest block influence (1 - cos(in, out)), one shot"
    option_help = {"batch_size": "calibration sequences per forward (default 8)"}

    def compress(self, model: PreTrainedModel, calib_ids: torch.Tensor, num_remove: int) -> CompressionOutcome:
        scores = block_influences(model, calib_ids, int(self.options.get("batch_size", 8)))
        removed = remove_blocks(model, lowest(scores, num_remove))
        return CompressionOutcome({"removed_blocks": removed, "block_influence": scores})
