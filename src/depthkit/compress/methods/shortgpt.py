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
from depthkit.compress.common import lowest
from depthkit.models.runner import BlockSink, BlockSource, as_source, iterate_blocks


@torch.no_grad()
def block_influences(
    model: PreTrainedModel | BlockSource, calib_ids: torch.Tensor, batch_size: int = 8
) -> list[float]:
    """Block Influence of every block on `calib_ids`, one block's weights and activations in memory at a time."""
    source = as_source(model)
    blocks = iterate_blocks(source, calib_ids, batch_size)
    return [block_influence(block_in, block_out)
            for _i, block_in, block_out in tqdm(blocks, total=len(source.layers()), desc="shortgpt", leave=False)]


@register_method("shortgpt")
class ShortGPT(CompressionMethod):
    description = "drop the k blocks with the lowest block influence (1 - cos(in, out)), one shot"
    paper = ("Men et al., 2024, ShortGPT: Layers in Large Language Models are More Redundant Than You Expect")

    def deviations(self) -> list[str]:
        return ["calibration: the calibration on the card, not the paper's own sample set; Block Influence as the "
                "paper defines it (1 - mean token cosine of a block's input and output, on the original model)"]

    def compress_blocks(
        self, source: BlockSource, calib_ids: torch.Tensor, num_remove: int, sink: BlockSink
    ) -> CompressionOutcome:
        """Scores from one pass, then the kept blocks written one at a time."""
        scores = block_influences(source, calib_ids, self.settings.batch_size)
        removed = lowest(scores, num_remove)
        layers = source.layers()
        kept = [i for i in range(len(layers)) if i not in removed]
        for new_index, old_index in enumerate(kept):
            sink.write_layer(new_index, layers[old_index])
        return CompressionOutcome({"removed_blocks": removed, "block_influence": scores})
