"""ShortGPT (Men et al., 2024, "ShortGPT: Layers in Large Language Models are More Redundant Than
You Expect"): remove the blocks with the lowest Block Influence.

Block Influence BI_l = 1 - mean over tokens of cos(block input, block output), measured once on
calibration tokens in the original model. The k blocks that change the hidden state least are
deleted in one shot (no re-measurement), which is what makes the method cheap: one forward pass.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from depthkit.analysis.metrics import block_influence
from depthkit.compress.base import CompressionMethod, CompressionOutcome, register_method
from depthkit.compress.common import lowest, num_blocks, remove_blocks
from depthkit.models.blockwise import iterate_blocks
from depthkit.models.streaming import StreamingModel, StreamingWriter


@torch.no_grad()
def block_influences(model: PreTrainedModel, calib_ids: torch.Tensor, batch_size: int = 8) -> list[float]:
    """Block Influence of every block on `calib_ids`, one block's activations in memory at a time."""
    return _influences(iterate_blocks(model, calib_ids, batch_size), num_blocks(model))


def _influences(blocks: Iterator[tuple[int, torch.Tensor, torch.Tensor]], total: int) -> list[float]:
    return [block_influence(block_in, block_out)
            for _i, block_in, block_out in tqdm(blocks, total=total, desc="shortgpt", leave=False)]


@register_method("shortgpt")
class ShortGPT(CompressionMethod):
    description = "drop the k blocks with the lowest block influence (1 - cos(in, out)), one shot"
    paper = ("Men et al., 2024, ShortGPT: Layers in Large Language Models are More Redundant Than You Expect")

    def deviations(self) -> list[str]:
        return ["calibration: the calibration on the card, not the paper's own sample set; Block Influence as the "
                "paper defines it (1 - mean token cosine of a block's input and output, on the original model)"]

    def compress(self, model: PreTrainedModel, calib_ids: torch.Tensor, num_remove: int) -> CompressionOutcome:
        scores = block_influences(model, calib_ids, self.settings.batch_size)
        removed = remove_blocks(model, lowest(scores, num_remove))
        return CompressionOutcome({"removed_blocks": removed, "block_influence": scores})

    def compress_streaming(
        self, source: StreamingModel, calib_ids: torch.Tensor, num_remove: int, writer: StreamingWriter
    ) -> CompressionOutcome:
        """The same scores from one streamed pass, then the kept blocks copied one at a time."""
        blocks = source.iterate_blocks(calib_ids, self.settings.batch_size)
        scores = _influences(blocks, source.num_layers)
        removed = lowest(scores, num_remove)
        kept = [i for i in range(source.num_layers) if i not in removed]
        for new_index, old_index in enumerate(kept):
            writer.write_layer(new_index, source.load_layer(old_index))
        return CompressionOutcome({"removed_blocks": removed, "block_influence": scores})
