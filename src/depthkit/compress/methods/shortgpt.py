"""ShortGPT (Men et al., 2024, "ShortGPT: Layers in Large Language Models are More Redundant Than
You Expect"): remove the blocks with the lowest Block Influence.

Block Influence BI_l = 1 - mean over tokens of cos(block input, block output), measured once on
calibration tokens in the original model. The k blocks that change the hidden state least are
deleted in one shot (no re-measurement), which is what makes the method cheap: one forward pass.

Plan: every block ranked by its Block Influence, lowest first (`reuse` "ranking"). The scores do
not depend on how many blocks go, so the first k of one ranking are exactly what a search for k
would remove, whatever k the ranking was searched for: one plan serves every ratio.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from depthkit.analysis.metrics import block_influence
from depthkit.compress.base import CompressionMethod, CompressionOutcome, register_method
from depthkit.compress.common import ranked_blocks, ranking_steps, scores_by_block
from depthkit.compress.plan import CompressionPlan
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
    step_keys = ("block", "score")

    def deviations(self) -> list[str]:
        return ["calibration: the calibration on the card, not the paper's own sample set; Block Influence as the "
                "paper defines it (1 - mean token cosine of a block's input and output, on the original model)"]

    def search(self, source: BlockSource, calib_ids: torch.Tensor, num_remove: int) -> CompressionPlan:
        """Scores from one pass; every block ranked, lowest influence first."""
        scores = block_influences(source, calib_ids, self.settings.batch_size)
        return self.new_plan(source, num_remove, "ranking", ranking_steps(scores))

    def apply(
        self, source: BlockSource, plan: CompressionPlan, calib_ids: torch.Tensor, num_remove: int, sink: BlockSink
    ) -> CompressionOutcome:
        """The first `num_remove` blocks of the ranking go; the kept ones are written one at a time."""
        plan.check_count(num_remove)
        removed = ranked_blocks(plan, num_remove)
        layers = source.layers()
        kept = [i for i in range(len(layers)) if i not in removed]
        for new_index, old_index in enumerate(kept):
            sink.write_layer(new_index, layers[old_index])
        return CompressionOutcome({"removed_blocks": removed, "block_influence": scores_by_block(plan)})
