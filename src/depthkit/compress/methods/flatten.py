"""FlattenGPT methods for the registry: `flatten` (pruned, a standard checkpoint) and
`flatten_unpruned` (wide blocks, an upper bound that cannot be saved as a standard model, so it
is never streamed to a checkpoint)."""

from __future__ import annotations

from typing import ClassVar

import torch

from depthkit.compress.base import CompressionMethod, CompressionOutcome, register_method
from depthkit.compress.common import selection_subset
from depthkit.compress.flatten import FlattenOptions, check_groups, flatten_gpt
from depthkit.models.runner import BlockSink, BlockSource


class _FlattenBase(CompressionMethod):
    prune: ClassVar[bool] = True
    options_class = FlattenOptions
    paper = "FlattenGPT: Depth Compression for Transformer with Layer Flattening (arXiv 2602.08858, 2026)"

    def deviations(self) -> list[str]:
        if self.settings.preset == "paper":
            return ["the paper's recipe as depthkit reads it (no official code is public): the Nystrom choice "
                    "spans the contribution correlation (activations weighted by the output projection's column "
                    "norms), the ridge strength is depthkit's (1e-3 of the mean channel energy)"]
        return ["depthkit's recipe, not the paper's (`preset=paper` gives that): pairs chosen by the calibration "
                "loss they add, channels by greedy least squares, the refit aimed at the original pair's "
                "sequential output and pulled towards the kept weights (chosen by leave-one-domain-out "
                "cross-validation, benchmarks/domains.py)"]

    def check_depth(self, num_layers: int, num_remove: int) -> None:
        if self.settings.groups:
            check_groups(self.settings.groups, num_layers, num_remove)

    def compress_blocks(
        self, source: BlockSource, calib_ids: torch.Tensor, num_remove: int, sink: BlockSink
    ) -> CompressionOutcome:
        """Pairs are chosen on the first `selection_blocks` sequences; least squares uses all of them."""
        options = self.settings
        selection_ids = selection_subset(calib_ids, options.selection_blocks)
        details = flatten_gpt(source, selection_ids, calib_ids, num_remove, options, prune=self.prune, sink=sink)
        return CompressionOutcome(details=details, saveable=self.prune)


@register_method("flatten")
class FlattenGPT(_FlattenBase):
    description = (
        "FlattenGPT: flatten adjacent block pairs into one wide block, then prune heads and MLP neurons back "
        "to the original width with least-squares compensation (standard checkpoint)"
    )


@register_method("flatten_unpruned")
class FlattenUnpruned(_FlattenBase):
    description = "flatten adjacent block pairs without pruning (double-width blocks; an upper bound, not saveable)"
    prune = False
    produces_checkpoint = False
