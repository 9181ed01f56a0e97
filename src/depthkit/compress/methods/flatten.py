"""FlattenGPT methods for the registry: `flatten` (pruned, a standard checkpoint) and
`flatten_unpruned` (wide blocks, an upper bound that cannot be saved as a standard model, so it
is never streamed to a checkpoint).

Plan: the flattens in the order the pair selection chose them (`reuse` "prefix": a greedy choice,
see `depthkit.compress.flatten`; "exact" with explicit `groups`). The channels are chosen in apply,
with the least squares they are fitted with, so a plan may be applied with other pruning options
(criterion, target, ridge) and other fitting tokens; both methods share one search, so a plan of
either applies to the other.
"""

from __future__ import annotations

import time
from typing import ClassVar

import torch

from depthkit.compress.base import CompressionMethod, CompressionOutcome, register_method
from depthkit.compress.common import selection_subset
from depthkit.compress.flatten import PRUNING_OPTIONS, FlattenOptions, apply_steps, check_groups, flatten_steps
from depthkit.compress.plan import CompressionPlan
from depthkit.models.runner import BlockSink, BlockSource


class _FlattenBase(CompressionMethod):
    prune: ClassVar[bool] = True
    options_class = FlattenOptions
    plan_method = "flatten"
    apply_options = PRUNING_OPTIONS
    step_keys = ("blocks", "removes")
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

    @property
    def refits_weights(self) -> bool:
        return self.prune

    def check_depth(self, num_layers: int, num_remove: int) -> None:
        if self.settings.groups:
            check_groups(self.settings.groups, num_layers, num_remove)

    @torch.no_grad()
    def search(self, source: BlockSource, calib_ids: torch.Tensor, num_remove: int) -> CompressionPlan:
        """Pairs are chosen on the first `selection_blocks` sequences."""
        selection_ids = selection_subset(calib_ids, self.settings.selection_blocks)
        began = time.perf_counter()
        steps, reuse = flatten_steps(source, selection_ids, num_remove, self.settings)
        return self.new_plan(source, num_remove, reuse, steps,
                             {"selection_tokens": int(selection_ids.numel()),
                              "seconds_selection": time.perf_counter() - began},
                             "explicit groups fix the count" if reuse == "exact" else "")

    @torch.no_grad()
    def apply(
        self, source: BlockSource, plan: CompressionPlan, calib_ids: torch.Tensor, num_remove: int, sink: BlockSink
    ) -> CompressionOutcome:
        """The plan's first `num_remove` flattens, pruned with least squares on all calibration sequences."""
        steps = plan.steps[: plan.steps_for(num_remove)]
        details = apply_steps(source, steps, calib_ids, self.settings, self.prune, sink)
        search = {key: plan.details.get(key) for key in ("selection_tokens", "seconds_selection")}
        return CompressionOutcome(details=details | search, saveable=self.prune)


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
